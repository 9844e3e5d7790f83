//! The TLS peers: socat's DTLS and OpenVPN, each pinning the other end's
//! self-signed certificate.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::{udp_port_open, wait_until, Ends, Gentle, Peer, PEER_MTU, WAIT};
use crate::cluster::Cluster;

/// Starts the server in the node and the client on the laptop; both make
/// their TUN only once a client is there.
pub(super) fn start(ends: &Ends) -> Result<(Gentle, Gentle)> {
    let (peer, cluster) = (ends.peer, ends.cluster);
    let certs = Certificates::create(ends.dir)?;
    let (server_cmd, client_cmd) = if peer == Peer::SocatDtls {
        socat_commands(peer, ends.device, cluster, &certs)
    } else {
        openvpn_commands(peer, ends.device, cluster, &certs)
    };
    let mut server = ends.spawn("server", server_cmd)?;
    // Both make their TUN only once a client is there; until then they listen.
    wait_until(&format!("UDP port {} open", peer.port()), &mut [&mut server], || {
        udp_port_open(&cluster.node, peer.port())
    })?;
    let mut client = ends.spawn("client", client_cmd)?;
    if peer == Peer::SocatDtls {
        let what = format!("{} on both ends", ends.device);
        wait_until(&what, &mut [&mut server, &mut client], || {
            ends.device_in(&cluster.node) && ends.device_in(&cluster.laptop.ns)
        })?;
        // socat's TUN address has no MTU option.
        for ns in [&cluster.node, &cluster.laptop.ns] {
            ns.netlink()?.set_mtu(ends.device, PEER_MTU)?;
        }
    } else {
        client.wait_for_log("Initialization Sequence Completed", WAIT)?;
    }
    Ok((server, client))
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
            let issued = crate::pki::issue(name, None, true, &[])?;
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
