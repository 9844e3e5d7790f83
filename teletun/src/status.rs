//! `teletun status`: what each running client on this machine is doing.
//!
//! Every client answers on a Unix socket beside its change record
//! (`/run/teletun/<tun>.sock`, root's only) with one JSON [`Report`] and
//! closes; `teletun status` asks each socket it finds. The client keeps a
//! [`Board`]: its session loop sets the state, the running data plane's
//! counters are read when asked, and the routes come from the kernel then.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netconf::record::run_dir;
use crate::plane::DirectionStats;

/// Where a session stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum State {
    /// Setting up the first connection.
    Connecting,
    /// Traffic flows; since when (seconds since the Unix epoch).
    Connected {
        /// Since when.
        since: u64,
    },
    /// The session was lost and is being repaired.
    Reconnecting {
        /// Since when.
        since: u64,
        /// The attempt under way.
        attempt: u32,
        /// What was lost.
        lost: String,
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
    /// Repairing stopped; the client is removing its changes and exits.
    GaveUp {
        /// Why.
        why: String,
    },
}

/// Packets and bytes one way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes (of IP packets).
    pub bytes: u64,
}

/// The cluster's DNS as registered on this machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// `resolvconf` or `systemd-resolved`.
    pub manager: String,
    /// The cluster's domains.
    pub domains: Vec<String>,
    /// Where cluster names are sent.
    pub nameservers: Vec<String>,
}

/// One client's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The TUN device.
    pub tun: String,
    /// The client's process id.
    pub pid: u32,
    /// When the client started (seconds since the Unix epoch).
    pub started: u64,
    /// Where the session stands.
    #[serde(flatten)]
    pub state: State,
    /// server-external's address.
    pub server: String,
    /// The data plane's transport, as negotiated.
    pub transport: Option<String>,
    /// The pod's addresses, on the TUN.
    pub addresses: Vec<IpAddr>,
    /// Networks routed into the TUN (read from the kernel when asked).
    pub routes: Vec<String>,
    /// The cluster's DNS, unless `--no-dns`.
    pub dns: Option<Dns>,
    /// To the server, over every connection so far.
    pub sent: Traffic,
    /// From the server, over every connection so far.
    pub received: Traffic,
    /// Connections made (1 + reconnections).
    pub connections: u64,
    /// When the last data-plane handshake finished (seconds since the Unix epoch).
    pub last_handshake: Option<u64>,
    /// The path MTU to the server.
    pub path_mtu: Option<usize>,
    /// The TUN's MTU.
    pub tunnel_mtu: Option<usize>,
    /// The largest packet that passes both ways, probed.
    #[serde(default)]
    pub packet_limit: Option<usize>,
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The client's live status.
pub struct Board {
    report: Mutex<Report>,
    /// The running data plane's counters (to server, from server).
    live: Mutex<Option<(Arc<DirectionStats>, Arc<DirectionStats>)>>,
}

fn traffic(stats: &DirectionStats) -> Traffic {
    Traffic {
        packets: stats.packets.load(Ordering::Relaxed),
        bytes: stats.bytes.load(Ordering::Relaxed),
    }
}

fn add(a: Traffic, b: Traffic) -> Traffic {
    Traffic {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

impl Board {
    /// A client on `tun` dialling `server`.
    pub fn new(tun: &str, server: String) -> Self {
        Board {
            report: Mutex::new(Report {
                tun: tun.to_owned(),
                pid: std::process::id(),
                started: unix_now(),
                state: State::Connecting,
                server,
                transport: None,
                addresses: Vec::new(),
                routes: Vec::new(),
                dns: None,
                sent: Traffic::default(),
                received: Traffic::default(),
                connections: 0,
                last_handshake: None,
                path_mtu: None,
                tunnel_mtu: None,
                packet_limit: None,
            }),
            live: Mutex::new(None),
        }
    }

    /// Changes the report.
    pub fn update(&self, f: impl FnOnce(&mut Report)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// A data plane runs with these counters (to server, from server).
    pub fn attach(&self, sent: Arc<DirectionStats>, received: Arc<DirectionStats>) {
        if let Ok(mut live) = self.live.lock() {
            *live = Some((sent, received));
        }
    }

    /// The data plane stopped: its counters join the totals.
    pub fn detach(&self) {
        let ended = self.live.lock().ok().and_then(|mut l| l.take());
        if let Some((sent, received)) = ended {
            self.update(|r| {
                r.sent = add(r.sent, traffic(&sent));
                r.received = add(r.received, traffic(&received));
            });
        }
    }

    /// The report now, with the running data plane's counters added.
    pub fn report(&self) -> Report {
        let mut r = self
            .report
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        if let Ok(live) = self.live.lock() {
            if let Some((sent, received)) = live.as_ref() {
                r.sent = add(r.sent, traffic(sent));
                r.received = add(r.received, traffic(received));
            }
        }
        r
    }
}

/// The status socket of the client on `tun`.
pub fn socket_path(tun: &str) -> PathBuf {
    run_dir().join(format!("{tun}.sock"))
}

/// Serves a [`Board`] on its socket; the socket goes when this is dropped.
pub struct StatusServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers on `tun`'s status socket (root's only) until the returned server
/// is dropped; `routes` reads the routes into the TUN when asked.
pub fn serve<F, Fut>(board: Arc<Board>, tun: &str, routes: F) -> Result<StatusServer>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<String>> + Send,
{
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(tun);
    crate::netconf::record::ensure_run_dir()?;
    // A socket file left by a killed client with this TUN name.
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    let task = tokio::spawn(async move {
        loop {
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of descriptors a moment: the socket must stay answered.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut report = board.report();
            report.routes = routes()
                .await
                .into_iter()
                .filter(|r| !made_by_the_kernel(r, &report.addresses))
                .collect();
            if let Ok(mut json) = serde_json::to_vec(&report) {
                json.push(b'\n');
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&json)).await;
            }
        }
    });
    Ok(StatusServer { path, task })
}

/// Whether `route` is one the kernel adds for the TUN by itself: IPv6
/// link-local, or the host route of one of its own addresses.
fn made_by_the_kernel(route: &str, addresses: &[IpAddr]) -> bool {
    match route.parse::<ipnet::IpNet>() {
        Ok(ipnet::IpNet::V6(n)) if n.addr().is_unicast_link_local() => true,
        Ok(n) => n.prefix_len() == n.max_prefix_len() && addresses.contains(&n.addr()),
        Err(_) => false,
    }
}

/// What a status socket answered.
pub enum Answer {
    /// A running client's report.
    Report(Box<Report>),
    /// A socket nobody answers on (its client died); it was removed.
    Stale(PathBuf),
    /// A client that answered something unreadable.
    Broken(PathBuf, String),
}

/// Asks every client on this machine, in the order of their TUN names.
pub async fn query_all() -> Vec<Answer> {
    let Ok(entries) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    paths.sort();
    let mut answers = Vec::new();
    for path in paths {
        answers.push(query(&path).await);
    }
    answers
}

/// The longest status answer read (a report with every route of a large
/// cluster fits).
const MAX_REPORT_LEN: u64 = 4 << 20;

async fn query(path: &std::path::Path) -> Answer {
    let asked = async {
        let mut stream = tokio::net::UnixStream::connect(path).await?;
        // A report is a few KiB; whatever answers more is not a client.
        let mut text = Vec::new();
        (&mut stream).take(MAX_REPORT_LEN + 1).read_to_end(&mut text).await?;
        if text.len() as u64 > MAX_REPORT_LEN {
            return Err(std::io::Error::other(format!(
                "answer longer than {MAX_REPORT_LEN} bytes"
            )));
        }
        Ok::<_, std::io::Error>(text)
    };
    match tokio::time::timeout(Duration::from_secs(2), asked).await {
        Ok(Ok(text)) => match serde_json::from_slice::<Report>(&text) {
            Ok(r) => Answer::Report(Box::new(r)),
            Err(e) => Answer::Broken(path.to_owned(), format!("unreadable answer: {e}")),
        },
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(path);
            Answer::Stale(path.to_owned())
        }
        Ok(Err(e)) => Answer::Broken(path.to_owned(), e.to_string()),
        Err(_) => Answer::Broken(path.to_owned(), "no answer within 2 s".into()),
    }
}

/// How long from `then` to `now`, as people say it.
fn span(then: u64, now: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

fn amount(t: Traffic) -> String {
    let b = t.bytes as f64;
    let (v, unit) = if b >= 1e9 {
        (b / 1e9, "GB")
    } else if b >= 1e6 {
        (b / 1e6, "MB")
    } else if b >= 1e3 {
        (b / 1e3, "kB")
    } else {
        return format!("{} packets ({} B)", t.packets, t.bytes);
    };
    format!("{} packets ({v:.1} {unit})", t.packets)
}

/// A report as people read it; `verbose` lists the routes.
pub fn render(r: &Report, verbose: bool, now: u64) -> String {
    let mut out = match &r.state {
        State::Connecting => format!("{}: connecting to {}", r.tun, r.server),
        State::Connected { since } => format!(
            "{}: connected to {} ({}) for {}",
            r.tun,
            r.server,
            r.transport.as_deref().unwrap_or("?"),
            span(*since, now)
        ),
        State::Reconnecting {
            since,
            attempt,
            lost,
            last_error,
        } => {
            let mut s = format!(
                "{}: reconnecting to {} for {}, attempt {attempt}; lost: {lost}",
                r.tun,
                r.server,
                span(*since, now)
            );
            if let Some(e) = last_error {
                s += &format!("; last error: {e}");
            }
            s
        }
        State::GaveUp { why } => format!("{}: gave up: {why}", r.tun),
    };
    out += &format!("\n  client pid {}, started {} ago", r.pid, span(r.started, now));
    if r.connections > 1 {
        out += &format!(", {} connections", r.connections);
    }
    let addresses: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
    out += &format!("\n  addresses {}", addresses.join(", "));
    if let (Some(tunnel), Some(path)) = (r.tunnel_mtu, r.path_mtu) {
        out += &format!("; MTU {tunnel} (path MTU {path})");
    }
    if let Some(limit) = r.packet_limit {
        out += &format!("; packets up to {limit} bytes pass both ways (probed)");
    }
    out += &format!("\n  routes: {}", r.routes.len());
    if verbose {
        for route in &r.routes {
            out += &format!("\n    {route}");
        }
    }
    match &r.dns {
        Some(d) => {
            out += &format!(
                "\n  DNS: {} for {} via {}",
                d.manager,
                d.domains.join(", "),
                d.nameservers.join(", ")
            )
        }
        None => out += "\n  DNS: not registered",
    }
    out += &format!("\n  sent {}, received {}", amount(r.sent), amount(r.received));
    if let Some(t) = r.last_handshake {
        out += &format!("\n  last handshake {} ago", span(t, now));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: State) -> Report {
        let board = Board::new("tel0", "203.0.113.11:8443".into());
        board.update(|r| {
            r.state = state;
            r.pid = 4242;
            r.started = 1000;
            r.dns = Some(Dns {
                manager: "resolvconf".into(),
                domains: vec!["cluster.local".into()],
                nameservers: vec!["10.96.0.10".into()],
            });
            r.sent = Traffic {
                packets: 12,
                bytes: 3_400,
            };
            r.transport = Some("DTLS 1.2 ECDHE-ECDSA-AES128-GCM-SHA256".into());
            r.addresses = vec!["10.244.1.5".parse().unwrap()];
            r.routes = vec!["10.96.0.0/16".into(), "10.244.0.0/16".into()];
            r.connections = 3;
            r.last_handshake = Some(1100);
            r.path_mtu = Some(1500);
            r.tunnel_mtu = Some(1435);
        });
        board.report()
    }

    #[test]
    fn routes_the_kernel_makes_for_the_tun_are_left_out() {
        let own: Vec<IpAddr> = vec!["10.244.1.5".parse().unwrap(), "fd00:10:244:1::5".parse().unwrap()];
        for kernel in ["fe80::/64", "fd00:10:244:1::5/128", "10.244.1.5/32"] {
            assert!(made_by_the_kernel(kernel, &own), "{kernel}");
        }
        for cluster in ["10.244.0.0/16", "fd00:10:244::/48", "10.244.1.7/32"] {
            assert!(!made_by_the_kernel(cluster, &own), "{cluster}");
        }
    }

    #[test]
    fn counters_add_up_across_data_planes() {
        let board = Board::new("tel0", "x".into());
        let (sent, received) = (Arc::new(DirectionStats::default()), Arc::new(DirectionStats::default()));
        board.attach(sent.clone(), received.clone());
        sent.packets.store(3, Ordering::Relaxed);
        sent.bytes.store(300, Ordering::Relaxed);
        assert_eq!(board.report().sent, Traffic { packets: 3, bytes: 300 });
        board.detach();
        let again = Arc::new(DirectionStats::default());
        again.packets.store(2, Ordering::Relaxed);
        board.attach(again, received);
        assert_eq!(board.report().sent.packets, 5);
    }

    #[test]
    fn every_state_reads_as_a_sentence_and_round_trips_as_json() {
        let states = [
            State::Connecting,
            State::Connected { since: 1100 },
            State::Reconnecting {
                since: 1150,
                attempt: 4,
                lost: "nothing heard from the server for 4 s".into(),
                last_error: Some("cannot connect: Connection refused".into()),
            },
            State::GaveUp {
                why: "a key that will not change".into(),
            },
        ];
        let mut text = String::new();
        for s in states {
            let r = report(s);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);
            text += &render(&r, true, 1200);
            text += "\n";
        }
        insta::assert_snapshot!(text);
    }
}
