//! The flood generator of `testbench agent flood`: TCP connects (half held
//! idle, half replaying a real TLS ClientHello), optionally each from another
//! address of an IPv6 prefix, UDP datagrams (half DTLS-ClientHello-shaped,
//! half junk) and real DTLS clients that return the server's cookie and go
//! silent ([`super::squatter`]), until SIGTERM; then one JSON line of what
//! happened.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::squatter::{self, SquatterCounts};

/// What the flood did, by outcome.
#[derive(Default)]
struct FloodCounts {
    attempted: AtomicU64,
    connected: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    /// Connections the server closed before we gave up on them.
    closed_by_server: AtomicU64,
    /// Connects not tried because too many were still open here.
    skipped: AtomicU64,
    datagrams: AtomicU64,
}

/// Most connections the generator keeps open at once (its own descriptors).
const MAX_OPEN: usize = 20_000;
/// How long an idle or replaying connection is held, at most.
const HOLD: Duration = Duration::from_secs(10);

/// How much of each the flood sends, per second.
pub(super) struct Rates {
    pub connects: u32,
    pub datagrams: u32,
    pub dtls_clients: u32,
}

pub(super) fn flood(
    control: SocketAddr,
    data: SocketAddr,
    rates: Rates,
    sources: Option<ipnet::Ipv6Net>,
) -> Result<()> {
    raise_fd_limit();
    let Rates {
        connects,
        datagrams,
        dtls_clients,
    } = rates;
    let counts = Arc::new(FloodCounts::default());
    let squatters = Arc::new(SquatterCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGTERM, stop.clone())?;
    let udp = {
        let (counts, stop) = (counts.clone(), stop.clone());
        std::thread::spawn(move || udp_flood(data, datagrams, &counts, &stop))
    };
    let squatting = {
        let (counts, stop) = (squatters.clone(), stop.clone());
        std::thread::spawn(move || match dtls_clients {
            0 => Ok(()),
            n => squatter::run(data, n, &counts, &stop),
        })
    };
    let hello = client_hello()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let flood = TcpFlood {
        to: control,
        per_second: connects,
        sources,
    };
    runtime.block_on(flood.run(hello, counts.clone(), stop.clone()));
    udp.join()
        .map_err(|_| anyhow::anyhow!("the UDP flood thread panicked"))??;
    squatting
        .join()
        .map_err(|_| anyhow::anyhow!("the DTLS client thread panicked"))??;
    let c = &counts;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "attempted": n(&c.attempted),
            "connected": n(&c.connected),
            "refused": n(&c.refused),
            "failed": n(&c.failed),
            "closed_by_server": n(&c.closed_by_server),
            "skipped": n(&c.skipped),
            "datagrams": n(&c.datagrams),
            "dtls_clients": n(&squatters.started),
            "dtls_cookies_returned": n(&squatters.returned_cookie),
        })
    );
    Ok(())
}

fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// A real TLS 1.3 ClientHello (rustls, as a client would send), replayed
/// on every other connection.
fn client_hello() -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("teletun").expect("a DNS name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)?;
    Ok(hello)
}

/// Where the TCP flood goes, how fast, and from where.
#[derive(Clone, Copy)]
struct TcpFlood {
    to: SocketAddr,
    per_second: u32,
    /// A prefix to take each connection's source address from, or the
    /// namespace's own address.
    sources: Option<ipnet::Ipv6Net>,
}

impl TcpFlood {
    async fn run(self, hello: Vec<u8>, counts: Arc<FloodCounts>, stop: Arc<AtomicBool>) {
        let Self {
            to,
            per_second,
            sources,
        } = self;
        let hello: Arc<[u8]> = hello.into();
        let open = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN));
        // Connects in 10 ms ticks, the remainder carried over.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let start = Instant::now();
        let mut sent: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let due = (start.elapsed().as_secs_f64() * f64::from(per_second)) as u64;
            while sent < due {
                sent += 1;
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    counts.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                counts.attempted.fetch_add(1, Ordering::Relaxed);
                let (counts, hello) = (counts.clone(), hello.clone());
                let replay = sent % 2 == 0;
                tokio::spawn(async move {
                    one_connection(to, sources, replay.then_some(&hello[..]), &counts).await;
                    drop(permit);
                });
            }
        }
    }
}

/// A random address of `prefix`.
fn address_in(prefix: ipnet::Ipv6Net) -> std::net::Ipv6Addr {
    let host = u128::MAX.checked_shr(u32::from(prefix.prefix_len())).unwrap_or(0);
    std::net::Ipv6Addr::from((u128::from(prefix.network()) & !host) | (fastrand::u128(..) & host))
}

async fn connect_from(to: SocketAddr, sources: Option<ipnet::Ipv6Net>) -> std::io::Result<tokio::net::TcpStream> {
    let Some(prefix) = sources else {
        return tokio::net::TcpStream::connect(to).await;
    };
    let socket = tokio::net::TcpSocket::new_v6()?;
    socket.bind(SocketAddr::from((address_in(prefix), 0)))?;
    socket.connect(to).await
}

async fn one_connection(to: SocketAddr, sources: Option<ipnet::Ipv6Net>, hello: Option<&[u8]>, counts: &FloodCounts) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::time::timeout(Duration::from_secs(2), connect_from(to, sources)).await;
    let mut tcp = match connect {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            counts.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        _ => {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    counts.connected.fetch_add(1, Ordering::Relaxed);
    if let Some(hello) = hello {
        if tcp.write_all(hello).await.is_err() {
            counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Hold the connection, reading whatever comes, until the server closes it.
    let mut buf = [0u8; 4096];
    let held = tokio::time::timeout(HOLD, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    if held.is_ok() {
        counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
    }
}

fn udp_flood(to: SocketAddr, per_second: u32, counts: &FloodCounts, stop: &AtomicBool) -> Result<()> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let socket = UdpSocket::bind(bind)?;
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut datagram = [0u8; 1200];
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * f64::from(per_second)) as u64;
        while sent < due {
            let len = shape(sent, &mut datagram);
            sent += 1;
            // Errors (an ICMP unreachable from a closed port) do not stop a flood.
            if socket.send_to(&datagram[..len], to).is_ok() {
                counts.datagrams.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The `n`th datagram: every other one a DTLS 1.2 ClientHello's first record
/// (epoch 0, a fresh random and no cookie), the rest junk of varying length,
/// some shaped as epoch-1 application data.
fn shape(n: u64, d: &mut [u8]) -> usize {
    fastrand::fill(d);
    if n % 2 == 0 {
        let body = 100usize;
        d[..3].copy_from_slice(&[22, 0xfe, 0xfd]);
        d[3..11].copy_from_slice(&n.to_be_bytes()[..8]);
        d[3..5].copy_from_slice(&[0, 0]);
        d[11..13].copy_from_slice(&(body as u16).to_be_bytes());
        // Handshake header: ClientHello, length, message seq 0, fragment offset 0.
        d[13] = 1;
        d[14..17].copy_from_slice(&[0, 0, (body - 12) as u8]);
        d[17..19].copy_from_slice(&[0, 0]);
        d[19..22].copy_from_slice(&[0, 0, 0]);
        d[22..25].copy_from_slice(&[0, 0, (body - 12) as u8]);
        d[25..27].copy_from_slice(&[0xfe, 0xfd]);
        13 + body
    } else {
        if n % 4 == 1 {
            d[..5].copy_from_slice(&[23, 0xfe, 0xfd, 0, 1]);
            let len = 200u16;
            d[11..13].copy_from_slice(&len.to_be_bytes());
            return 13 + usize::from(len);
        }
        1 + fastrand::usize(..d.len() - 1)
    }
}
