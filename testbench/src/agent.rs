//! `testbench agent`: tiny servers and probes that run inside namespaces.
//! Servers: TCP and UDP echo, an HTTP responder. Probes: check an echo or an
//! HTTP answer and exit 0, or print why not and exit 1.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

/// Agent commands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Serve TCP+UDP echo and HTTP until killed.
    Serve {
        /// Name to put in HTTP answers.
        #[arg(long)]
        name: String,
        /// TCP and UDP echo port.
        #[arg(long)]
        echo_port: u16,
        /// HTTP port.
        #[arg(long)]
        http_port: u16,
    },
    /// Send bytes over TCP and expect them echoed.
    TcpEcho { addr: SocketAddr },
    /// Send a datagram and expect it echoed.
    UdpEcho { addr: SocketAddr },
    /// GET / and expect 200 with `expect` in the body.
    Http { addr: SocketAddr, expect: String },
    /// Accept one TCP connection and expect `token` from it.
    Listen {
        port: u16,
        token: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Connect and send `token`.
    Send { addr: SocketAddr, token: String },
    /// Fetch (`get`) or send (`put`) `bytes` seeded bytes through the blob
    /// service and check their SHA-256; prints the throughput.
    Blob {
        /// get or put.
        direction: String,
        /// The blob service.
        addr: SocketAddr,
        /// How many bytes.
        bytes: u64,
        /// Seed of the content.
        seed: u64,
    },
    /// Resolve `name` `count` times as applications do (getaddrinfo) and
    /// print the median and 90th percentile time of one lookup.
    Lookup {
        name: String,
        count: u32,
        /// The name must not resolve (each lookup ends in "not found").
        #[arg(long)]
        missing: bool,
        /// Send one A query to this DNS server per lookup instead of calling
        /// getaddrinfo.
        #[arg(long)]
        server: Option<IpAddr>,
    },
    /// Impair packets routed through TUN device `tun` (see impair.rs).
    Impair {
        /// TUN device to create.
        #[arg(long)]
        tun: String,
        #[command(flatten)]
        impairment: crate::impair::Impairment,
    },
    #[command(flatten)]
    Hostile(crate::hostile::HostileCommand),
}

/// Port of the blob service on `serve`.
pub const BLOB_PORT: u16 = 7009;

/// Writes or checks `bytes` of the content generated from `seed`.
struct Blob {
    rng: fastrand::Rng,
    left: u64,
    chunk: Vec<u8>,
}

impl Blob {
    fn new(bytes: u64, seed: u64) -> Blob {
        Blob {
            rng: fastrand::Rng::with_seed(seed),
            left: bytes,
            chunk: vec![0u8; 65536],
        }
    }

    /// The next chunk of content, empty at the end.
    fn next_chunk(&mut self) -> &[u8] {
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.rng.fill(&mut self.chunk[..n]);
        self.left -= n as u64;
        &self.chunk[..n]
    }

    /// SHA-256 of the whole content.
    fn digest(bytes: u64, seed: u64) -> [u8; 32] {
        let mut blob = Blob::new(bytes, seed);
        let mut h = openssl::sha::Sha256::new();
        loop {
            let c = blob.next_chunk();
            if c.is_empty() {
                return h.finish();
            }
            h.update(c);
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads exactly `bytes` from `s` and returns their SHA-256.
fn read_digest(s: &mut impl Read, bytes: u64) -> Result<[u8; 32]> {
    let mut h = openssl::sha::Sha256::new();
    let mut buf = vec![0u8; 65536];
    let mut left = bytes;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            bail!("stream ended {left} bytes early");
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finish())
}

fn write_blob(s: &mut impl Write, bytes: u64, seed: u64) -> Result<()> {
    let mut blob = Blob::new(bytes, seed);
    loop {
        let c = blob.next_chunk();
        if c.is_empty() {
            return Ok(());
        }
        s.write_all(c)?;
    }
}

fn blob(direction: &str, addr: SocketAddr, bytes: u64, seed: u64) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(s, "{direction} {bytes} {seed}")?;
    let want = Blob::digest(bytes, seed);
    let start = std::time::Instant::now();
    match direction {
        "get" => {
            let got = read_digest(&mut s, bytes)?;
            if got != want {
                bail!("content differs: sha256 {} expected {}", hex(&got), hex(&want));
            }
        }
        "put" => {
            write_blob(&mut s, bytes, seed)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            if answer.trim() != format!("ok {}", hex(&want)) {
                bail!("the receiver says: {}", answer.trim());
            }
        }
        other => bail!("unknown direction {other:?}: use get or put"),
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ok: {bytes} bytes, sha256 {}, {:.1} s, {:.1} Mbit/s",
        hex(&want),
        secs,
        bytes as f64 * 8.0 / secs / 1e6
    );
    Ok(())
}

fn serve_blob(s: TcpStream) -> Result<()> {
    let mut s = s;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 && b[0] != b'\n' && line.len() < 100 {
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let words: Vec<&str> = line.split_whitespace().collect();
    let [direction, bytes, seed] = words[..] else {
        bail!("bad blob request {line:?}");
    };
    let (bytes, seed): (u64, u64) = (bytes.parse()?, seed.parse()?);
    match direction {
        "get" => write_blob(&mut s, bytes, seed),
        "put" => {
            let got = read_digest(&mut s, bytes)?;
            let want = Blob::digest(bytes, seed);
            if got == want {
                writeln!(s, "ok {}", hex(&got))?;
            } else {
                writeln!(s, "mismatch: got sha256 {}", hex(&got))?;
            }
            Ok(())
        }
        _ => bail!("bad blob direction {direction:?}"),
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn any(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
}

fn token() -> Vec<u8> {
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.to_vec()
}

/// Runs an agent command.
/// `lookup`: times `count` lookups of `name`, each of which must find an
/// address (or, with `missing`, must not): getaddrinfo calls, or A queries
/// sent straight to `server`.
fn lookup(name: &str, count: u32, missing: bool, server: Option<IpAddr>) -> Result<()> {
    use std::net::ToSocketAddrs;
    let socket = match server {
        Some(ip) => {
            let s = UdpSocket::bind((unspecified(ip), 0))?;
            s.connect((ip, 53))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Some(s)
        }
        None => None,
    };
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..count.max(1) {
        let t = std::time::Instant::now();
        let found = match &socket {
            Some(s) => query_a(s, name)?,
            None => (name, 0).to_socket_addrs().map(|a| a.count()).unwrap_or(0),
        };
        times.push(t.elapsed());
        match (found, missing) {
            (0, false) => bail!("{name} does not resolve"),
            (n, true) if n > 0 => bail!("{name} resolved to {n} addresses; it should not exist"),
            _ => {}
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "ok: {} lookups of {name}: median {:.3} ms, p90 {:.3} ms",
        times.len(),
        at(0.5),
        at(0.9)
    );
    Ok(())
}

/// The unspecified address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// One A query for `name` on the connected `socket`: how many addresses the
/// answer holds (0 for NXDOMAIN or no data).
fn query_a(socket: &UdpSocket, name: &str) -> Result<usize> {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let id = query.metadata.id;
    socket.send(&query.to_vec()?)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).context("no answer from the DNS server")?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if reply.metadata.id != id {
            continue; // a late answer to an earlier query
        }
        return match reply.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(reply
                .answers
                .iter()
                .filter(|r| r.record_type() == RecordType::A)
                .count()),
            code => bail!("the DNS server answered {code}"),
        };
    }
}

pub fn run(cmd: AgentCommand) -> Result<()> {
    match cmd {
        AgentCommand::Lookup {
            name,
            count,
            missing,
            server,
        } => lookup(&name, count, missing, server),
        AgentCommand::Serve {
            name,
            echo_port,
            http_port,
        } => serve(name, echo_port, http_port),
        AgentCommand::TcpEcho { addr } => {
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let t = token();
            s.write_all(&t)?;
            let mut back = vec![0u8; t.len()];
            s.read_exact(&mut back).context("no echo")?;
            if back != t {
                bail!("echo differs");
            }
            println!("ok: {} bytes echoed by {addr}", t.len());
            Ok(())
        }
        AgentCommand::UdpEcho { addr } => {
            let s = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            s.connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let t = token();
            let mut buf = [0u8; 2048];
            for _ in 0..5 {
                s.send(&t)?;
                if let Ok(n) = s.recv(&mut buf) {
                    if buf[..n] == t[..] {
                        println!("ok: datagram echoed by {addr}");
                        return Ok(());
                    }
                }
            }
            bail!("no UDP echo from {addr} after 5 tries")
        }
        AgentCommand::Http { addr, expect } => {
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            if !answer.starts_with("HTTP/1.0 200") || !answer.contains(&expect) {
                bail!("unexpected answer: {:?}", answer.lines().next().unwrap_or(""));
            }
            println!("ok: {}", answer.lines().last().unwrap_or(""));
            Ok(())
        }
        AgentCommand::Listen { port, token, timeout } => {
            let l = TcpListener::bind(any(port))?;
            println!("listening on {port}");
            l.set_nonblocking(true)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
            let (mut s, from) = loop {
                match l.accept() {
                    Ok(x) => break x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            bail!("no connection within {timeout} s");
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let mut got = String::new();
            s.read_to_string(&mut got)?;
            if got.trim() != token {
                bail!("got {got:?} from {from}, expected {token:?}");
            }
            println!("ok: {token} from {from}");
            Ok(())
        }
        AgentCommand::Blob {
            direction,
            addr,
            bytes,
            seed,
        } => blob(&direction, addr, bytes, seed),
        AgentCommand::Impair { tun, impairment } => crate::impair::run(&tun, &impairment),
        AgentCommand::Hostile(c) => crate::hostile::run(c),
        AgentCommand::Send { addr, token } => {
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
            s.write_all(token.as_bytes())?;
            Ok(())
        }
    }
}

fn serve(name: String, echo_port: u16, http_port: u16) -> Result<()> {
    let tcp = TcpListener::bind(any(echo_port))?;
    let udp = UdpSocket::bind(any(echo_port))?;
    let http = TcpListener::bind(any(http_port))?;
    let blobs = TcpListener::bind(any(BLOB_PORT))?;
    std::thread::spawn(move || {
        for s in blobs.incoming().flatten() {
            std::thread::spawn(move || {
                if let Err(e) = serve_blob(s) {
                    eprintln!("blob: {e:#}");
                }
            });
        }
    });
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    println!("serving echo on {echo_port} and HTTP on {http_port} as {name}");
    for s in http.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let mut s = s;
            let _ = s.set_read_timeout(Some(TIMEOUT));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let body = format!("hello from {name} to {peer}\n");
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        });
    }
    Ok(())
}
