//! The WireGuard peers: wireguard-go and boringtun-cli, each making its TUN
//! and a control socket in `/run/wireguard`, configured with `wg`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{builds, wait_until, Ends, Gentle, Peer, PEER_MTU};
use crate::exec;

/// Starts both ends, keys them to each other, and returns them with the
/// version that runs.
pub(super) fn start(ends: &Ends) -> Result<(Gentle, Gentle, String)> {
    let (peer, cluster, device) = (ends.peer, ends.cluster, ends.device);
    let (program, version) = match peer {
        Peer::Boringtun => builds::boringtun()?,
        _ => builds::wireguard_go()?,
    };
    let (laptop_ip, node_ip) = peer.addresses();
    let node_key = wireguard_key(ends.dir, "node")?;
    let laptop_key = wireguard_key(ends.dir, "laptop")?;
    // Both in the foreground, so that dropping the Background stops them.
    let command = |ns_cmd: Command| daemon_command(peer, ns_cmd, device);
    let mut server = ends.spawn("server", command(cluster.node.cmd(&program)))?;
    wait_until(&format!("{device} on the node"), &mut [&mut server], || {
        ends.device_in(&cluster.node)
    })?;
    let mut client = ends.spawn("client", command(cluster.laptop.cmd(&program)))?;
    wait_until(&format!("{device} on the laptop"), &mut [&mut client], || {
        ends.device_in(&cluster.laptop.ns)
    })?;
    let port = peer.port().to_string();
    let mut wg = cluster.node.cmd("wg");
    wg.args(["set", device, "listen-port", &port, "private-key"])
        .arg(&node_key.private)
        .args(["peer", &laptop_key.public, "allowed-ips", &format!("{laptop_ip}/32")]);
    exec::run(wg, Duration::from_secs(5))?;
    // The laptop's `wg` must run in its mount namespace, where the daemon put
    // its control socket.
    let mut wg = cluster.laptop.cmd("wg");
    wg.args(["set", device, "private-key"])
        .arg(&laptop_key.private)
        .args(["peer", &node_key.public, "allowed-ips", &format!("{node_ip}/32")])
        .args(["endpoint", &format!("{}:{port}", cluster.node_ip)]);
    exec::run(wg, Duration::from_secs(5))?;
    for (ns, ip) in [(&cluster.node, node_ip), (&cluster.laptop.ns, laptop_ip)] {
        let netlink = ns.netlink()?;
        netlink.add_address(device, ipnet::IpNet::new(ip.into(), 30)?)?;
        netlink.set_mtu(device, PEER_MTU)?;
        netlink.set_up(device)?;
    }
    Ok((server, client, version))
}

/// The daemon's command line: foreground, and for boringtun, root kept (it
/// would drop to nobody and then fail to configure its device).
fn daemon_command(peer: Peer, mut cmd: Command, device: &str) -> Command {
    cmd.arg("-f");
    if peer == Peer::Boringtun {
        cmd.arg("--disable-drop-privileges");
    }
    cmd.arg(device);
    cmd
}

/// A WireGuard key pair: the private key's file and the public key.
struct WireGuardKey {
    private: PathBuf,
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
