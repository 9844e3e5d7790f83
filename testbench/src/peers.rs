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
    /// wireguard-go, WireGuard's userspace implementation, configured with `wg`.
    WireGuardGo,
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: [Peer; 3] = [Peer::SocatDtls, Peer::OpenVpn, Peer::WireGuardGo];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Peer::SocatDtls => "socat-dtls",
            Peer::OpenVpn => "openvpn",
            Peer::WireGuardGo => "wireguard-go",
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
            Peer::WireGuardGo => &[("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools")],
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
        };
        (Ipv4Addr::new(10, 254, third, 1), Ipv4Addr::new(10, 254, third, 2))
    }

    /// The UDP port its server listens on in the node.
    fn port(self) -> u16 {
        match self {
            Peer::SocatDtls => 4433,
            Peer::OpenVpn => 1194,
            Peer::WireGuardGo => 51820,
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
        };
        let suffix = run_id.rsplit('-').next().unwrap_or(run_id);
        format!("{prefix}-{suffix}")
    }
}

/// A running peer tunnel; dropping it stops both ends.
pub struct PeerTunnel {
    /// The node's end of the tunnel: the benchmark's target.
    pub target: Ipv4Addr,
    // Dropped in this order: the client stops before the server it talks to,
    // and the directory goes once both are gone.
    _client: Gentle,
    _server: Gentle,
    _made_dir: Option<MadeDir>,
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

/// Starts `peer` between the cluster's laptop and node and waits until a
/// ping crosses it.
pub fn start(peer: Peer, cluster: &Cluster) -> Result<PeerTunnel> {
    if let Some(why) = peer.missing() {
        bail!("{why}");
    }
    let dir = cluster.dir.join(peer.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let spawn = |side: &str, cmd: Command| {
        Background::spawn(
            &format!("{} {side}", peer.name()),
            cmd,
            &dir.join(format!("{side}.log")),
        )
        .map(Gentle)
    };
    let made_dir = (peer == Peer::WireGuardGo).then(|| MadeDir::watch(Path::new("/run/wireguard")));
    let (laptop_ip, node_ip) = peer.addresses();
    let device = peer.device(&cluster.id);
    let device_in = |ns: &Netns| ns.netlink().is_ok_and(|n| n.has_link(&device));
    let (mut server, mut client) = match peer {
        Peer::SocatDtls | Peer::OpenVpn => {
            let certs = Certificates::create(&dir)?;
            let (server_cmd, client_cmd) = if peer == Peer::SocatDtls {
                socat_commands(peer, &device, cluster, &certs)
            } else {
                openvpn_commands(peer, &device, cluster, &certs)
            };
            let mut server = spawn("server", server_cmd)?;
            // Both make their TUN only once a client is there; until then they listen.
            wait_until(&format!("UDP port {} open", peer.port()), &mut [&mut server], || {
                udp_port_open(&cluster.node, peer.port())
            })?;
            let mut client = spawn("client", client_cmd)?;
            if peer == Peer::SocatDtls {
                let what = format!("{} on both ends", &device);
                wait_until(&what, &mut [&mut server, &mut client], || {
                    device_in(&cluster.node) && device_in(&cluster.laptop.ns)
                })?;
                // socat's TUN address has no MTU option.
                for ns in [&cluster.node, &cluster.laptop.ns] {
                    ns.netlink()?.set_mtu(&device, PEER_MTU)?;
                }
            } else {
                client.wait_for_log("Initialization Sequence Completed", WAIT)?;
            }
            (server, client)
        }
        Peer::WireGuardGo => {
            let node_key = wireguard_key(&dir, "node")?;
            let laptop_key = wireguard_key(&dir, "laptop")?;
            // Foreground, so that dropping the Background stops it.
            let mut server = spawn("server", {
                let mut c = cluster.node.cmd("wireguard-go");
                c.args(["-f", &device]);
                c
            })?;
            wait_until(&format!("{} on the node", &device), &mut [&mut server], || {
                device_in(&cluster.node)
            })?;
            let mut client = spawn("client", {
                let mut c = cluster.laptop.cmd("wireguard-go");
                c.args(["-f", &device]);
                c
            })?;
            wait_until(&format!("{} on the laptop", &device), &mut [&mut client], || {
                device_in(&cluster.laptop.ns)
            })?;
            let port = peer.port().to_string();
            let mut wg = cluster.node.cmd("wg");
            wg.args(["set", &device, "listen-port", &port, "private-key"])
                .arg(&node_key.private)
                .args(["peer", &laptop_key.public, "allowed-ips", &format!("{laptop_ip}/32")]);
            exec::run(wg, Duration::from_secs(5))?;
            // The laptop's `wg` must run in its mount namespace, where
            // wireguard-go put its control socket.
            let mut wg = cluster.laptop.cmd("wg");
            wg.args(["set", &device, "private-key"])
                .arg(&laptop_key.private)
                .args(["peer", &node_key.public, "allowed-ips", &format!("{node_ip}/32")])
                .args(["endpoint", &format!("{}:{port}", cluster.node_ip)]);
            exec::run(wg, Duration::from_secs(5))?;
            for (ns, ip) in [(&cluster.node, node_ip), (&cluster.laptop.ns, laptop_ip)] {
                let netlink = ns.netlink()?;
                netlink.add_address(&device, ipnet::IpNet::new(ip.into(), 30)?)?;
                netlink.set_mtu(&device, PEER_MTU)?;
                netlink.set_up(&device)?;
            }
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
        _client: client,
        _server: server,
        _made_dir: made_dir,
    })
}

fn udp_port_open(ns: &Netns, port: u16) -> bool {
    ns.run("ss", &["-Hlun", &format!("sport = :{port}")])
        .is_ok_and(|out| !out.trim().is_empty())
}

/// A WireGuard key pair: the private key's file and the public key.
struct WireGuardKey {
    private: std::path::PathBuf,
    public: String,
}

fn wireguard_key(dir: &Path, name: &str) -> Result<WireGuardKey> {
    let private = dir.join(format!("{name}.wgkey"));
    let mut c = Command::new("sh");
    c.args(["-c", "umask 077 && wg genkey > \"$1\" && wg pubkey < \"$1\"", "sh"])
        .arg(&private);
    let public = exec::run(c, Duration::from_secs(5)).context("cannot make a WireGuard key with wg")?;
    Ok(WireGuardKey {
        private,
        public: public.trim().to_owned(),
    })
}

fn socat_commands(peer: Peer, device: &str, cluster: &Cluster, certs: &Certificates) -> (Command, Command) {
    let (laptop_ip, node_ip) = peer.addresses();
    let tun = |ip: Ipv4Addr| format!("TUN:{ip}/30,tun-name={device},tun-type=tun,iff-no-pi,iff-up");
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

fn openvpn_commands(peer: Peer, device: &str, cluster: &Cluster, certs: &Certificates) -> (Command, Command) {
    let (laptop_ip, node_ip) = peer.addresses();
    let common = |c: &mut Command, local: Ipv4Addr, remote: Ipv4Addr| {
        c.args(["--dev", device, "--dev-type", "tun", "--proto", "udp"])
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
    /// Self-signed certificates for laptop and node, written as PEM to `dir`.
    fn create(dir: &Path) -> Result<Certificates> {
        let make = |name: &str| -> Result<(String, String)> {
            let issued = crate::pki::issue(name, None, true, None)?;
            let crt = dir.join(format!("{name}.crt"));
            let key = dir.join(format!("{name}.key"));
            std::fs::write(&crt, issued.cert.to_pem()?).with_context(|| format!("cannot write {}", crt.display()))?;
            std::fs::write(&key, issued.key.private_key_to_pem_pkcs8()?)
                .with_context(|| format!("cannot write {}", key.display()))?;
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
        assert!(e.contains("socat-dtls, openvpn, wireguard-go"), "{e}");
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
