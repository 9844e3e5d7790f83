//! Peer VPNs for `testbench bench`: other tunnels over the same laptop ↔ node
//! underlay, measured in the same run as teletun (design.md §5).
//!
//! Each peer runs its server in the node's namespace and its client in the
//! laptop's, with a point-to-point TUN on each side; the benchmark then
//! targets the node's tunnel address, whose iperf3 server also serves the raw
//! path. Both sides authenticate with throwaway self-signed ECDSA P-256
//! certificates, each pinning the other's, like teletun's pinned keys.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::Cluster;
use crate::exec::{self, Background};
use crate::netns::Netns;

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
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: [Peer; 2] = [Peer::SocatDtls, Peer::OpenVpn];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Peer::SocatDtls => "socat-dtls",
            Peer::OpenVpn => "openvpn",
        }
    }

    /// Parses a `--peers` entry.
    pub fn parse(name: &str) -> Result<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == name).with_context(|| {
            let known: Vec<_> = Peer::ALL.iter().map(|p| p.name()).collect();
            format!("unknown peer {name:?}; known peers: {}", known.join(", "))
        })
    }

    /// The program it needs and the Debian package holding it.
    fn program(self) -> (&'static str, &'static str) {
        match self {
            Peer::SocatDtls => ("socat", "socat"),
            Peer::OpenVpn => ("openvpn", "openvpn"),
        }
    }

    /// Why it cannot run here, if it cannot: the program is not installed.
    pub fn missing(self) -> Option<String> {
        let (program, package) = self.program();
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
            .unwrap_or(false);
        (!found).then(|| format!("{program} is not installed (apt-get install {package})"))
    }

    /// Addresses of the laptop's and the node's tunnel ends (a /30 each).
    fn addresses(self) -> (Ipv4Addr, Ipv4Addr) {
        let third = match self {
            Peer::SocatDtls => 1,
            Peer::OpenVpn => 2,
        };
        (Ipv4Addr::new(10, 254, third, 1), Ipv4Addr::new(10, 254, third, 2))
    }

    /// The UDP port its server listens on in the node.
    fn port(self) -> u16 {
        match self {
            Peer::SocatDtls => 4433,
            Peer::OpenVpn => 1194,
        }
    }

    /// The TUN device name on both sides.
    fn device(self) -> &'static str {
        match self {
            Peer::SocatDtls => "sdtls0",
            Peer::OpenVpn => "ovpn0",
        }
    }
}

/// A running peer tunnel; dropping it stops both ends.
pub struct PeerTunnel {
    /// The node's end of the tunnel: the benchmark's target.
    pub target: Ipv4Addr,
    // Client first: it stops before the server it talks to.
    _client: Background,
    _server: Background,
}

/// Starts `peer` between the cluster's laptop and node and waits until a
/// ping crosses it.
pub fn start(peer: Peer, cluster: &Cluster) -> Result<PeerTunnel> {
    if let Some(why) = peer.missing() {
        bail!("{why}");
    }
    let dir = cluster.dir.join(peer.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let certs = Certificates::create(&dir)?;
    let (laptop_ip, node_ip) = peer.addresses();
    let (server_cmd, client_cmd) = match peer {
        Peer::SocatDtls => socat_commands(peer, cluster, &certs),
        Peer::OpenVpn => openvpn_commands(peer, cluster, &certs),
    };
    let mut server = Background::spawn(&format!("{} server", peer.name()), server_cmd, &dir.join("server.log"))?;
    // Both servers make their TUN only once a client is there; before that
    // they only listen.
    let listening = format!("sport = :{}", peer.port());
    wait_until(&format!("UDP port {} open", peer.port()), &mut [&mut server], || {
        cluster
            .node
            .run("ss", &["-Hlun", &listening])
            .is_ok_and(|out| !out.trim().is_empty())
    })?;
    let mut client = Background::spawn(&format!("{} client", peer.name()), client_cmd, &dir.join("client.log"))?;
    let device_in = |ns: &Netns| ns.ip(&["link", "show", peer.device()]).is_ok();
    match peer {
        Peer::SocatDtls => {
            let what = format!("{} on both ends", peer.device());
            wait_until(&what, &mut [&mut server, &mut client], || {
                device_in(&cluster.node) && device_in(&cluster.laptop.ns)
            })?;
            // socat's TUN address has no MTU option.
            for ns in [&cluster.node, &cluster.laptop.ns] {
                ns.ip(&["link", "set", peer.device(), "mtu", &PEER_MTU.to_string()])?;
            }
        }
        Peer::OpenVpn => client.wait_for_log("Initialization Sequence Completed", WAIT)?,
    }
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
        _client: client,
        _server: server,
    })
}

fn socat_commands(peer: Peer, cluster: &Cluster, certs: &Certificates) -> (Command, Command) {
    let (laptop_ip, node_ip) = peer.addresses();
    let tun = |ip: Ipv4Addr| format!("TUN:{ip}/30,tun-name={},tun-type=tun,iff-no-pi,iff-up", peer.device());
    let mut server = cluster.node.cmd("socat");
    server.args(["-b", "65536"]).arg(format!(
        "OPENSSL-DTLS-SERVER:{},cert={},key={},cafile={},verify=1",
        peer.port(),
        certs.node_crt,
        certs.node_key,
        certs.laptop_crt
    ));
    server.arg(tun(node_ip));
    let mut client = cluster.laptop.cmd("socat");
    client.args(["-b", "65536"]).arg(format!(
        "OPENSSL-DTLS-CLIENT:{}:{},cert={},key={},cafile={},verify=1,commonname=node",
        cluster.node_ip,
        peer.port(),
        certs.laptop_crt,
        certs.laptop_key,
        certs.node_crt
    ));
    client.arg(tun(laptop_ip));
    (server, client)
}

fn openvpn_commands(peer: Peer, cluster: &Cluster, certs: &Certificates) -> (Command, Command) {
    let (laptop_ip, node_ip) = peer.addresses();
    let common = |c: &mut Command, local: Ipv4Addr, remote: Ipv4Addr| {
        c.args(["--dev", peer.device(), "--dev-type", "tun", "--proto", "udp"])
            .args(["--ifconfig", &local.to_string(), &remote.to_string()])
            .args(["--tun-mtu", &PEER_MTU.to_string()])
            .args(["--data-ciphers", "AES-256-GCM", "--disable-dco", "--dh", "none"])
            .args(["--verb", "3"]);
    };
    let mut server = cluster.node.cmd("openvpn");
    common(&mut server, node_ip, laptop_ip);
    server
        .args(["--tls-server", "--lport", &peer.port().to_string()])
        .args([
            "--ca",
            &certs.laptop_crt,
            "--cert",
            &certs.node_crt,
            "--key",
            &certs.node_key,
        ]);
    let mut client = cluster.laptop.cmd("openvpn");
    common(&mut client, laptop_ip, node_ip);
    client
        .args(["--tls-client", "--nobind", "--remote", &cluster.node_ip.to_string()])
        .args(["--rport", &peer.port().to_string()])
        .args([
            "--ca",
            &certs.node_crt,
            "--cert",
            &certs.laptop_crt,
            "--key",
            &certs.laptop_key,
        ]);
    (server, client)
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

/// Self-signed certificates for both ends, each pinned by the other.
struct Certificates {
    laptop_crt: String,
    laptop_key: String,
    node_crt: String,
    node_key: String,
}

impl Certificates {
    fn create(dir: &Path) -> Result<Certificates> {
        let make = |name: &str| -> Result<(String, String)> {
            let crt = dir.join(format!("{name}.crt"));
            let key = dir.join(format!("{name}.key"));
            let mut c = Command::new("openssl");
            c.args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt);
            exec::run(c, Duration::from_secs(10)).context("cannot make a certificate with openssl")?;
            Ok((crt.display().to_string(), key.display().to_string()))
        };
        let (laptop_crt, laptop_key) = make("laptop")?;
        let (node_crt, node_key) = make("node")?;
        Ok(Certificates {
            laptop_crt,
            laptop_key,
            node_crt,
            node_key,
        })
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
        assert!(e.contains("socat-dtls, openvpn"), "{e}");
    }

    #[test]
    fn peers_do_not_share_ports_devices_or_networks() {
        let [a, b] = Peer::ALL;
        assert_ne!(a.port(), b.port());
        assert_ne!(a.device(), b.device());
        assert_ne!(a.addresses().0, b.addresses().0);
    }
}
