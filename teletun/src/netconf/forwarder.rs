//! The client's local DNS forwarder, for laptops whose DNS manager merges
//! nameservers into one list (Debian resolvconf, openresolv): registered
//! first, it sends names in the cluster's zones into the tunnel to the
//! cluster's DNS and everything else to the nameservers the laptop had
//! (read again on each query, so it follows changes to them). It listens
//! only on a loopback address of its own (127.0.53.N for telN-1), over UDP and
//! TCP; a truncated answer reaches the client truncated, and its retry over TCP
//! goes upstream over TCP.
//!
//! Several clients at once: each forwarder asks the others (loopback
//! addresses in 127.0.53.0/24) before the laptop's nameservers, and answers
//! another forwarder only for its own zones (REFUSED otherwise, so the asker
//! moves on): every cluster's names resolve whichever forwarder is first.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::proto::dns::{self, Query, ResponseCode, SplitDomains};
use crate::proto::resolv_conf;

/// The DNS port.
const PORT: u16 = 53;
/// How long one upstream may take to answer one try.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// At most this many TCP clients at once.
const MAX_TCP_CLIENTS: usize = 32;
/// At most this many UDP queries in flight (each holds a task, an upstream
/// socket and a buffer until answered or timed out); the rest are dropped
/// and counted, as a busy nameserver drops them, so a local flood cannot
/// take the client's file descriptors (which its reconnections need).
const MAX_UDP_IN_FLIGHT: usize = 256;

/// The loopback network the forwarders listen in.
pub fn is_forwarder_address(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 53])
}

/// The forwarder address of the TUN device `iface` (`tel0` → 127.0.53.1).
pub fn address_for(iface: &str) -> Result<IpAddr> {
    let n: u8 = iface
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
        .filter(|n| *n < 254)
        .with_context(|| format!("no DNS forwarder address for interface {iface:?} (tel0 to tel253 have one)"))?;
    Ok(IpAddr::V4(Ipv4Addr::new(127, 0, 53, n + 1)))
}

/// What the forwarder did, for the session summary.
#[derive(Debug, Default)]
pub struct Counters {
    /// Queries answered by the cluster's DNS.
    pub cluster: AtomicU64,
    /// Queries passed to the laptop's own nameservers.
    pub elsewhere: AtomicU64,
    /// Queries refused (another forwarder asking for a name outside our zones).
    pub refused: AtomicU64,
    /// Queries no server answered (SERVFAIL).
    pub failed: AtomicU64,
    /// Packets that were not a DNS query, dropped.
    pub malformed: AtomicU64,
    /// Queries that came over TCP.
    pub tcp: AtomicU64,
    /// UDP queries and TCP clients dropped: too many at once.
    pub busy: AtomicU64,
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "{} to the cluster, {} elsewhere, {} refused, {} unanswered, {} malformed, {} dropped (too many at once); {} over TCP",
            n(&self.cluster),
            n(&self.elsewhere),
            n(&self.refused),
            n(&self.failed),
            n(&self.malformed),
            n(&self.busy),
            n(&self.tcp)
        )
    }
}

/// Where the forwarder finds the laptop's nameservers: `/etc/resolv.conf`,
/// and the per-interface records of Debian resolvconf
/// (`/run/resolvconf/interface/`, which it stops listing in resolv.conf after a
/// loopback nameserver such as ours) and openresolv (`/run/resolvconf/interfaces/`).
#[derive(Clone, Debug)]
pub struct Sources {
    /// The resolv.conf.
    pub resolv_conf: PathBuf,
    /// Directories of per-interface resolv.conf records.
    pub records: Vec<PathBuf>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            resolv_conf: "/etc/resolv.conf".into(),
            records: vec!["/run/resolvconf/interface".into(), "/run/resolvconf/interfaces".into()],
        }
    }
}

impl Sources {
    /// The laptop's nameservers other than `own`: other forwarders first, then
    /// the rest, each once, in the order found.
    pub fn nameservers(&self, own: IpAddr) -> Vec<IpAddr> {
        let mut texts = vec![std::fs::read_to_string(&self.resolv_conf).unwrap_or_default()];
        for dir in &self.records {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
            files.sort();
            texts.extend(files.iter().filter_map(|f| std::fs::read_to_string(f).ok()));
        }
        let mut all: Vec<IpAddr> = Vec::new();
        for text in &texts {
            for ip in resolv_conf::parse(text).nameservers {
                if ip != own && !all.contains(&ip) {
                    all.push(ip);
                }
            }
        }
        all.sort_by_key(|ip| !is_forwarder_address(*ip));
        all
    }
}

/// A running forwarder; dropping it stops it.
pub struct Forwarder {
    address: IpAddr,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    own: IpAddr,
    cluster_servers: Vec<IpAddr>,
    split: SplitDomains,
    sources: Sources,
    counters: Arc<Counters>,
}

impl Forwarder {
    /// Listens on `address`:53 (UDP and TCP) and starts answering.
    pub async fn start(
        address: IpAddr,
        cluster_servers: Vec<IpAddr>,
        split: SplitDomains,
        sources: Sources,
    ) -> Result<Forwarder> {
        let at = SocketAddr::new(address, PORT);
        let busy = |e: std::io::Error| {
            anyhow::anyhow!(
                "cannot listen for DNS on {at}: {e}; is another DNS server bound to port 53 on all addresses? \
                 --no-dns skips cluster DNS"
            )
        };
        let udp = Arc::new(UdpSocket::bind(at).await.map_err(busy)?);
        let tcp = TcpListener::bind(at).await.map_err(busy)?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            own: address,
            cluster_servers,
            split,
            sources,
            counters: counters.clone(),
        });
        let tasks = vec![
            tokio::spawn(serve_udp(udp, shared.clone())),
            tokio::spawn(serve_tcp(tcp, shared)),
        ];
        Ok(Forwarder {
            address,
            counters,
            tasks,
        })
    }

    /// Where it listens.
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// What it did so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_UDP_IN_FLIGHT));
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!("DNS forwarder: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.counters.busy.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let packet = buf[..n].to_vec();
        let (socket, shared) = (socket.clone(), shared.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Some(reply) = answer(&shared, &packet, from.ip(), false).await {
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Too many at once: this one is closed unanswered.
            shared.counters.busy.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut stream = stream;
            while let Ok(Ok(Some(packet))) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await {
                let Some(reply) = answer(&shared, &packet, from.ip(), true).await else {
                    break;
                };
                if write_framed(&mut stream, &reply).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Reads one length-prefixed DNS message; `None` at a clean end of stream.
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut packet).await?;
    Ok(Some(packet))
}

async fn write_framed(stream: &mut TcpStream, packet: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(packet.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await
}

/// The answer to one packet from `from`, or `None` to drop it.
async fn answer(shared: &Shared, packet: &[u8], from: IpAddr, tcp: bool) -> Option<Vec<u8>> {
    let Some(query) = dns::read_query(packet) else {
        shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let c = &shared.counters;
    if tcp {
        c.tcp.fetch_add(1, Ordering::Relaxed);
    }
    let servers = if shared.split.is_cluster_name(&query.name) {
        c.cluster.fetch_add(1, Ordering::Relaxed);
        shared.cluster_servers.clone()
    } else if is_forwarder_address(from) && from != shared.own {
        // Another forwarder asks everyone in turn: we speak only for our zones.
        c.refused.fetch_add(1, Ordering::Relaxed);
        return Some(dns::error_reply(&query, ResponseCode::Refused));
    } else {
        c.elsewhere.fetch_add(1, Ordering::Relaxed);
        shared.sources.nameservers(shared.own)
    };
    let last = servers.len().saturating_sub(1);
    for (i, server) in servers.iter().enumerate() {
        match exchange(shared.own, *server, packet, &query, tcp).await {
            // A REFUSED from one (another forwarder, say) lets the next one try.
            Some((reply, code)) if code != ResponseCode::Refused || i == last => return Some(reply),
            _ => {}
        }
    }
    c.failed.fetch_add(1, Ordering::Relaxed);
    Some(dns::error_reply(&query, ResponseCode::ServFail))
}

/// Asks `server` the way the client asked: over UDP, or over TCP. A truncated
/// UDP answer goes back as it is, so the client asks again over TCP (an answer
/// larger than it can take over UDP must not reach it over UDP).
async fn exchange(
    own: IpAddr,
    server: IpAddr,
    packet: &[u8],
    query: &Query,
    tcp: bool,
) -> Option<(Vec<u8>, ResponseCode)> {
    let id = query.message.metadata.id;
    let to = SocketAddr::new(server, PORT);
    let reply = if tcp {
        tokio::time::timeout(UPSTREAM_TIMEOUT, tcp_exchange(to, packet))
            .await
            .ok()??
    } else {
        tokio::time::timeout(UPSTREAM_TIMEOUT, udp_exchange(own, to, packet, id))
            .await
            .ok()??
    };
    let header = dns::read_reply_header(&reply)?;
    (header.id == id).then_some((reply, header.code))
}

async fn udp_exchange(own: IpAddr, to: SocketAddr, packet: &[u8], id: u16) -> Option<Vec<u8>> {
    // From our own address to another forwarder, so it knows who asks.
    let from = if to.ip().is_loopback() {
        SocketAddr::new(own, 0)
    } else if to.is_ipv6() {
        "[::]:0".parse().ok()?
    } else {
        "0.0.0.0:0".parse().ok()?
    };
    let socket = UdpSocket::bind(from).await.ok()?;
    socket.connect(to).await.ok()?;
    socket.send(packet).await.ok()?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await.ok()?;
        // Only the answer to this query (a connected socket hears only `to`).
        if dns::read_reply_header(&buf[..n]).is_some_and(|h| h.id == id) {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

async fn tcp_exchange(to: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(to).await.ok()?;
    write_framed(&mut stream, packet).await.ok()?;
    read_framed(&mut stream).await.ok()?
}

/// The name the forwarder is registered under with resolvconf: a `lo.` name,
/// which both Debian resolvconf and openresolv list before every LAN interface.
pub fn registration_name(iface: &str) -> String {
    format!("lo.teletun-{iface}")
}

/// Builds [`Sources`] under `root` (tests).
pub fn sources_under(root: &Path) -> Sources {
    Sources {
        resolv_conf: root.join("resolv.conf"),
        records: vec![root.join("interface"), root.join("interfaces")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_tun_number() {
        assert_eq!(address_for("tel0").unwrap().to_string(), "127.0.53.1");
        assert_eq!(address_for("tel12").unwrap().to_string(), "127.0.53.13");
        assert!(address_for("tel999").is_err());
        assert!(is_forwarder_address("127.0.53.9".parse().unwrap()));
        assert!(!is_forwarder_address("127.0.0.53".parse().unwrap()));
    }

    #[test]
    fn the_laptops_nameservers_come_from_resolv_conf_and_the_records() {
        let root = std::env::temp_dir().join(format!("teletun-fwd-{}", std::process::id()));
        std::fs::create_dir_all(root.join("interface")).unwrap();
        // Debian resolvconf cut resolv.conf after our loopback address.
        std::fs::write(root.join("resolv.conf"), "nameserver 127.0.53.1\nsearch home.arpa\n").unwrap();
        std::fs::write(
            root.join("interface/eth0.dhclient"),
            "nameserver 192.168.1.1\nnameserver 192.168.1.1\n",
        )
        .unwrap();
        std::fs::write(root.join("interface/lo.teletun-tel0"), "nameserver 127.0.53.1\n").unwrap();
        std::fs::write(root.join("interface/lo.teletun-tel1"), "nameserver 127.0.53.2\n").unwrap();
        let found = sources_under(&root).nameservers("127.0.53.1".parse().unwrap());
        let _ = std::fs::remove_dir_all(&root);
        let found: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found, ["127.0.53.2", "192.168.1.1"]);
    }

    /// A DNS query for `name` (type A, recursion desired) with `id`.
    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    fn open_files() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// A local flood of queries to a cluster DNS that never answers: the
    /// forwarder's descriptors stay bounded, the excess is dropped and
    /// counted, and it answers again once the flood is over.
    #[tokio::test]
    async fn a_query_flood_takes_a_bounded_number_of_sockets() {
        let own: IpAddr = "127.0.53.250".parse().unwrap();
        // The cluster's DNS: a socket that hears and never answers.
        let silent = UdpSocket::bind("127.0.53.251:53")
            .await
            .expect("bind 127.0.53.251:53 (root)");
        let root = std::env::temp_dir().join(format!("teletun-flood-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let split = SplitDomains::from_search(&["svc.cluster.local".to_owned()], &[]);
        let forwarder = Forwarder::start(own, vec!["127.0.53.251".parse().unwrap()], split, sources_under(&root))
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = SocketAddr::new(own, PORT);
        let before = open_files();
        const FLOOD: u16 = 700;
        for id in 0..FLOOD {
            client
                .send_to(&query(id, "web.default.svc.cluster.local"), to)
                .await
                .unwrap();
            if id % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = open_files();
        let busy = forwarder.counters().busy.load(Ordering::Relaxed);
        assert!(
            during < before + MAX_UDP_IN_FLIGHT + 50,
            "{} descriptors opened for a flood of {FLOOD}",
            during - before
        );
        assert!(busy >= u64::from(FLOOD) - MAX_UDP_IN_FLIGHT as u64, "{busy} dropped");
        // After the upstream timeout the slots are free: a query is answered
        // (SERVFAIL: the cluster's DNS never answers).
        tokio::time::sleep(UPSTREAM_TIMEOUT + Duration::from_millis(500)).await;
        let mut buf = [0u8; 512];
        while tokio::time::timeout(Duration::from_millis(50), client.recv_from(&mut buf))
            .await
            .is_ok()
        {}
        client
            .send_to(&query(9999, "web.default.svc.cluster.local"), to)
            .await
            .unwrap();
        let got = tokio::time::timeout(UPSTREAM_TIMEOUT * 2, async {
            loop {
                let (n, _) = client.recv_from(&mut buf).await.unwrap();
                if let Some(h) = dns::read_reply_header(&buf[..n]).filter(|h| h.id == 9999) {
                    return h.code;
                }
            }
        })
        .await
        .expect("an answer after the flood");
        assert_eq!(got, ResponseCode::ServFail);
        drop((forwarder, silent));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_registration_is_named_to_come_first() {
        assert_eq!(registration_name("tel0"), "lo.teletun-tel0");
    }
}
