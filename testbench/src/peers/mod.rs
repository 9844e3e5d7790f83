//! Peer VPNs for `testbench bench`: other tunnels over the same laptop ↔ node
//! underlay, measured in the same run as teletun (design.md §5).
//!
//! Each peer runs its server in the node's namespace and its client in the
//! laptop's, with a point-to-point TUN on each side; the benchmark then
//! targets the node's tunnel address, whose iperf3 server also serves the raw
//! path. Both sides pin each other's throwaway key, like teletun: self-signed
//! ECDSA P-256 certificates for socat and OpenVPN, WireGuard keys for
//! wireguard-go.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::Cluster;
use crate::exec::{self, Background};
use crate::netns::Netns;

mod builds;
pub(crate) use builds::go_command;
mod tls;
mod wireguard;

/// The MTU of the peers' TUN devices: WireGuard's default, which leaves room
/// for DTLS or OpenVPN framing inside a 1500-byte underlay.
pub const PEER_MTU: u32 = 1420;

/// A peer VPN the benchmark knows how to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `socat` with OPENSSL-DTLS on one side of a TUN: one record per packet.
    SocatDtls,
    /// OpenVPN 2.x in point-to-point TLS mode over UDP, AES-256-GCM, no DCO.
    OpenVpn,
    /// wireguard-go, WireGuard's userspace implementation, configured with
    /// `wg`: a modern one, with its offloads (builds.rs).
    WireGuardGo,
    /// boringtun-cli, Cloudflare's Rust WireGuard, configured with `wg`
    /// (built from its crate, builds.rs).
    Boringtun,
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: [Peer; 4] = [Peer::SocatDtls, Peer::OpenVpn, Peer::WireGuardGo, Peer::Boringtun];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Peer::SocatDtls => "socat-dtls",
            Peer::OpenVpn => "openvpn",
            Peer::WireGuardGo => "wireguard-go",
            Peer::Boringtun => "boringtun",
        }
    }

    /// Parses a `--peers` entry.
    pub fn parse(name: &str) -> Result<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == name).with_context(|| {
            let known: Vec<_> = Peer::ALL.iter().map(|p| p.name()).collect();
            format!("unknown peer {name:?}; known peers: {}", known.join(", "))
        })
    }

    /// The programs it needs, each with the Debian package holding it.
    fn programs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Peer::SocatDtls => &[("socat", "socat")],
            Peer::OpenVpn => &[("openvpn", "openvpn")],
            // The implementations themselves are built (builds.rs).
            Peer::WireGuardGo | Peer::Boringtun => &[("wg", "wireguard-tools")],
        }
    }

    /// Why it cannot run here, if it cannot: a program is not installed.
    pub fn missing(self) -> Option<String> {
        let installed = |program: &str| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
                .unwrap_or(false)
        };
        let missing: Vec<_> = self.programs().iter().filter(|(p, _)| !installed(p)).collect();
        if missing.is_empty() {
            return None;
        }
        let programs: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        Some(format!(
            "{} not installed (apt-get install {})",
            programs.join(" and "),
            packages.join(" ")
        ))
    }

    /// Addresses of the laptop's and the node's tunnel ends (a /30 each).
    fn addresses(self) -> (Ipv4Addr, Ipv4Addr) {
        let third = match self {
            Peer::SocatDtls => 1,
            Peer::OpenVpn => 2,
            Peer::WireGuardGo => 3,
            Peer::Boringtun => 4,
        };
        (Ipv4Addr::new(10, 254, third, 1), Ipv4Addr::new(10, 254, third, 2))
    }

    /// The UDP port its server listens on in the node.
    fn port(self) -> u16 {
        match self {
            Peer::SocatDtls => 4433,
            Peer::OpenVpn => 1194,
            Peer::WireGuardGo => 51820,
            Peer::Boringtun => 51821,
        }
    }

    /// The TUN device name on both sides, unique to the run `run_id` (the
    /// cluster's id, `ttPID-HEX`): wireguard-go's control socket lives in the
    /// host's `/run/wireguard`, shared by every namespace.
    fn device(self, run_id: &str) -> String {
        let prefix = match self {
            Peer::SocatDtls => "sd",
            Peer::OpenVpn => "ov",
            Peer::WireGuardGo => "wg",
            Peer::Boringtun => "bt",
        };
        let suffix = run_id.rsplit('-').next().unwrap_or(run_id);
        format!("{prefix}-{suffix}")
    }
}

/// A running peer tunnel; dropping it stops both ends.
pub struct PeerTunnel {
    /// The node's end of the tunnel: the benchmark's target.
    pub target: Ipv4Addr,
    /// Which version runs, where that is not simply the Debian package's.
    pub version: Option<String>,
    // Dropped in this order: the client stops before the server it talks to,
    // and the directory goes once both are gone.
    client: Gentle,
    server: Gentle,
    _made_dir: Option<MadeDir>,
}

impl PeerTunnel {
    /// Both ends' processes, whose CPU time the bench counts.
    pub fn pids(&self) -> [u32; 2] {
        [self.client.child.id(), self.server.child.id()]
    }
}

/// A host directory a peer creates if it is missing (wireguard-go's
/// `/run/wireguard`), removed on drop if it was missing before and is empty.
struct MadeDir(Option<&'static Path>);

impl MadeDir {
    fn watch(path: &'static Path) -> MadeDir {
        MadeDir((!path.exists()).then_some(path))
    }
}

impl Drop for MadeDir {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            // Fails, and leaves it, if someone else's socket is in it now.
            let _ = std::fs::remove_dir(path);
        }
    }
}

/// A peer process that gets SIGTERM rather than SIGKILL when dropped, so it
/// removes what it made (wireguard-go its control socket in `/run`).
struct Gentle(Background);

impl Drop for Gentle {
    fn drop(&mut self) {
        if let Ok(None) = self.0.child.try_wait() {
            self.0.signal(libc::SIGTERM);
            // Kills it if SIGTERM was not enough.
            let _ = self.0.wait(Duration::from_secs(3));
        }
    }
}

impl std::ops::Deref for Gentle {
    type Target = Background;
    fn deref(&self) -> &Background {
        &self.0
    }
}

impl std::ops::DerefMut for Gentle {
    fn deref_mut(&mut self) -> &mut Background {
        &mut self.0
    }
}

/// What starting one peer's two ends needs.
struct Ends<'a> {
    peer: Peer,
    cluster: &'a Cluster,
    /// Its keys, certificates and logs.
    dir: &'a Path,
    /// Its TUN device's name on both ends.
    device: &'a str,
}

impl Ends<'_> {
    /// Starts one end (`server` in the node, `client` on the laptop).
    fn spawn(&self, side: &str, cmd: Command) -> Result<Gentle> {
        let name = format!("{} {side}", self.peer.name());
        Background::spawn(&name, cmd, &self.dir.join(format!("{side}.log"))).map(Gentle)
    }

    /// Whether its TUN device exists in `ns` yet.
    fn device_in(&self, ns: &Netns) -> bool {
        ns.netlink().is_ok_and(|n| n.has_link(self.device))
    }
}

/// Starts `peer` between the cluster's laptop and node and waits until a
/// ping crosses it.
pub fn start(peer: Peer, cluster: &Cluster) -> Result<PeerTunnel> {
    if let Some(why) = peer.missing() {
        bail!("{why}");
    }
    let dir = cluster.dir.join(peer.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let wireguard = matches!(peer, Peer::WireGuardGo | Peer::Boringtun);
    let made_dir = wireguard.then(|| MadeDir::watch(Path::new("/run/wireguard")));
    let mut version = None;
    let (laptop_ip, node_ip) = peer.addresses();
    let device = peer.device(&cluster.id);
    let ends = Ends {
        peer,
        cluster,
        dir: &dir,
        device: &device,
    };
    let (mut server, mut client) = match peer {
        Peer::SocatDtls | Peer::OpenVpn => tls::start(&ends)?,
        Peer::WireGuardGo | Peer::Boringtun => {
            let (server, client, built) = wireguard::start(&ends)?;
            version = Some(built);
            (server, client)
        }
    };
    wait_until(
        &format!("a ping from {laptop_ip} to {node_ip} (logs in {})", dir.display()),
        &mut [&mut server, &mut client],
        || {
            let mut ping = cluster.laptop.cmd("ping");
            ping.args(["-c", "1", "-W", "1", &node_ip.to_string()]);
            exec::run(ping, Duration::from_secs(5)).is_ok()
        },
    )?;
    Ok(PeerTunnel {
        target: node_ip,
        version,
        client,
        server,
        _made_dir: made_dir,
    })
}

fn udp_port_open(ns: &Netns, port: u16) -> bool {
    ns.run("ss", &["-Hlun", &format!("sport = :{port}")])
        .is_ok_and(|out| !out.trim().is_empty())
}

/// How long each step of starting a peer may take.
const WAIT: Duration = Duration::from_secs(15);

/// Polls `done` until it holds; fails when one of `procs` exits or [`WAIT`] passes.
fn wait_until(what: &str, procs: &mut [&mut Background], mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if done() {
            return Ok(());
        }
        exec::check_interrupted()?;
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before {what}: {}",
                    p.name,
                    exec::last_lines(&p.log_text(), 5)
                );
            }
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("{}: {}", p.name, exec::last_lines(&p.log_text(), 3)))
                .collect();
            bail!("no {what} within {WAIT:?}; {}", logs.join("; "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_by_name_and_an_unknown_one_lists_the_known() {
        for p in Peer::ALL {
            assert_eq!(Peer::parse(p.name()).unwrap(), p);
        }
        let e = Peer::parse("wireguard").unwrap_err().to_string();
        assert!(e.contains("socat-dtls, openvpn, wireguard-go, boringtun"), "{e}");
    }

    #[test]
    fn peers_do_not_share_ports_devices_or_networks() {
        for (i, a) in Peer::ALL.iter().enumerate() {
            for b in &Peer::ALL[i + 1..] {
                assert_ne!(a.port(), b.port());
                assert_ne!(a.device("tt1-abcdef"), b.device("tt1-abcdef"));
                assert!(a.device("tt4194304-abcdef").len() <= 15, "IFNAMSIZ");
                assert_ne!(a.addresses().0, b.addresses().0);
            }
        }
    }
}
