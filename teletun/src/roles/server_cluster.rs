//! `teletun server-cluster`: runs in the pod the client replaces. It takes over
//! the pod's IP addresses (every packet for them goes to a TUN device and on to
//! the client; nothing is answered locally), and relays packets to and from
//! server-external over the AF_UNIX socket.
//!
//! Takeover, per address family (see docs/architecture.md):
//! - policy rule `pref 100: lookup local` replaces the default `pref 0` one, and
//!   `pref 50: iif <pod-if> to <pod-ip> lookup 4242` sits before it, where table
//!   4242 routes everything to the TUN: packets for the pod IP arriving from the
//!   cluster are forwarded to the client instead of being delivered locally;
//! - the addresses stay on the pod interface, so ARP/NDP keep working;
//! - the TUN accepts packets with the pod IP as source (`accept_local`), and
//!   forwarding sends them out of the pod interface.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ipnet::IpNet;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::io::seqpacket::{self, SeqPacket};
use crate::io::tun::Tun;
use crate::netconf::netlink::{Netlink, TABLE_LOCAL};
use crate::netconf::sysctl;
use crate::plane::{DataPlane, Names};
use crate::proto::control::Hello;
use crate::proto::link::LinkParams;

/// Routing table that sends everything to the TUN.
pub const TAKEOVER_TABLE: u32 = 4242;
/// Priority of the rule that steers pod-IP traffic into [`TAKEOVER_TABLE`].
pub const TAKEOVER_PRIORITY: u32 = 50;
/// Priority the `local` table rule moves to.
pub const LOCAL_PRIORITY: u32 = 100;

/// Everything `teletun server-cluster` needs.
pub struct ServerClusterConfig {
    /// The AF_UNIX socket to listen on.
    pub sockfile: PathBuf,
    /// The pod's interface; by default the one with the default route.
    pub interface: Option<String>,
    /// The resolv.conf to hand to the client.
    pub resolv_conf: PathBuf,
    /// TUN MTU; by default the pod interface's MTU minus tunnel overhead.
    pub mtu: Option<u16>,
    /// The data plane's transport (for its overhead).
    pub transport: crate::tunnel::Transport,
}

/// Metric of the on-link IPv6 prefix route server-cluster adds back after
/// moving the pod's IPv6 address off its interface.
const PREFIX_ROUTE_METRIC: u32 = 4242;

/// What a takeover changed, written to disk before each change so that a
/// server-cluster restarted in the same pod (after a crash) can put the pod back
/// first. Kept beside the socket: that directory outlives container restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct TakeoverState {
    /// The pod interface's name.
    interface: String,
    /// The pod's addresses with prefix lengths.
    addresses: Vec<(IpAddr, u8)>,
    /// Kernel parameters changed, with their previous values, in order.
    sysctls: Vec<(String, String)>,
}

impl TakeoverState {
    fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

struct Takeover {
    netlink: Netlink,
    state: std::sync::Mutex<TakeoverState>,
    state_file: PathBuf,
    interface_index: u32,
    tun_index: u32,
    tun_name: String,
}

impl Takeover {
    /// IPv4 keeps its address (so the kernel keeps using it as its source) and
    /// steers packets for it to the TUN with a policy rule placed before the
    /// `local` table.
    ///
    /// IPv6 cannot do the same: Neighbor Advertisements are IP packets addressed
    /// to the pod IP, and the rule would send them to the client. So the IPv6
    /// address moves off the pod interface, is routed to the TUN, and the pod
    /// interface answers neighbour solicitations for it by proxy NDP.
    async fn apply(&self) -> Result<()> {
        let snapshot = self.snapshot();
        snapshot.save(&self.state_file)?;
        let (iface, tun) = (&snapshot.interface, &self.tun_name);
        self.set("net.ipv4.ip_forward", "1")?;
        sysctl::set(&format!("net.ipv4.conf.{tun}.accept_local"), "1")?;
        sysctl::set(&format!("net.ipv4.conf.{tun}.rp_filter"), "0")?;
        if let Some(&(v4, _)) = snapshot.addresses.iter().find(|(a, _)| a.is_ipv4()) {
            // ARP looks up the target as a packet arriving on the pod interface
            // would, so our rule makes the kernel stop answering for the pod IP as
            // its own; proxy ARP answers instead (the route leads to another device).
            self.set(&format!("net.ipv4.conf.{iface}.proxy_arp"), "1")?;
            // Proxy ARP answers after a random wait of up to proxy_delay (0.8 s by
            // default): a neighbour's first packet to the pod would wait that long.
            self.set(&format!("net.ipv4.neigh.{iface}.proxy_delay"), "0")?;
            self.netlink
                .add_route_in("0.0.0.0/0".parse()?, self.tun_index, TAKEOVER_TABLE)
                .await?;
            self.netlink
                .add_rule(
                    false,
                    TAKEOVER_PRIORITY,
                    TAKEOVER_TABLE,
                    Some(iface),
                    Some(IpNet::from(v4)),
                )
                .await?;
            // Move the local table after our rule: add the new one before deleting the old.
            let rules = self.netlink.rules(false).await?;
            if !rules
                .iter()
                .any(|r| r.table == TABLE_LOCAL && r.priority == LOCAL_PRIORITY)
            {
                self.netlink
                    .add_rule(false, LOCAL_PRIORITY, TABLE_LOCAL, None, None)
                    .await?;
            }
            for r in rules.iter().filter(|r| r.table == TABLE_LOCAL && r.priority == 0) {
                self.netlink.del_rule(r).await?;
            }
        }
        let v6: Vec<(IpAddr, u8)> = snapshot
            .addresses
            .iter()
            .copied()
            .filter(|(a, _)| a.is_ipv6())
            .collect();
        if !v6.is_empty() {
            self.set("net.ipv6.conf.all.forwarding", "1")?;
            self.set(&format!("net.ipv6.conf.{iface}.proxy_ndp"), "1")?;
        }
        for (ip, prefix) in v6 {
            self.netlink.del_address(self.interface_index, ip, prefix).await?;
            if prefix < 128 {
                let on_link = IpNet::new(ip, prefix)?.trunc();
                self.netlink
                    .add_route_metric(on_link, self.interface_index, PREFIX_ROUTE_METRIC)
                    .await?;
            }
            self.netlink.add_route(IpNet::from(ip), self.tun_index).await?;
            self.netlink.add_proxy_neighbour(self.interface_index, ip).await?;
        }
        Ok(())
    }

    fn snapshot(&self) -> TakeoverState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sets a sysctl, recording the old value first.
    fn set(&self, key: &str, value: &str) -> Result<()> {
        let old = sysctl::get(key)?;
        let mut state = self.state.lock().map_err(|_| anyhow!("takeover state lock poisoned"))?;
        state.sysctls.push((key.to_owned(), old));
        state.save(&self.state_file)?;
        drop(state);
        sysctl::set(key, value)
    }

    /// Puts the pod back as it was. Routes via the TUN die with it.
    async fn undo(&self) -> Result<()> {
        undo_takeover(&self.netlink, &self.snapshot(), self.interface_index).await?;
        remove_if_present(&self.state_file)
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Reverses a takeover described by `state` on interface `index`: rules,
/// the moved IPv6 addresses, proxy entries, the re-added prefix routes, sysctls.
async fn undo_takeover(netlink: &Netlink, state: &TakeoverState, index: u32) -> Result<()> {
    for (key, old) in state.sysctls.iter().rev() {
        if let Err(e) = sysctl::set(key, old) {
            warn!("{e:#}");
        }
    }
    let rules = netlink.rules(false).await?;
    if !rules.iter().any(|r| r.table == TABLE_LOCAL && r.priority == 0) {
        netlink.add_rule(false, 0, TABLE_LOCAL, None, None).await?;
    }
    for r in rules.iter().filter(|r| {
        (r.table == TABLE_LOCAL && r.priority == LOCAL_PRIORITY)
            || (r.table == TAKEOVER_TABLE && r.priority == TAKEOVER_PRIORITY)
    }) {
        netlink.del_rule(r).await?;
    }
    let present: Vec<IpAddr> = netlink.addresses(index).await?.into_iter().map(|(a, _)| a).collect();
    for &(ip, prefix) in state.addresses.iter().filter(|(a, _)| a.is_ipv6()) {
        let _ = netlink.del_proxy_neighbour(index, ip).await;
        if !present.contains(&ip) {
            netlink.add_address(index, ip, prefix).await?;
        }
        if prefix < 128 {
            let on_link = IpNet::new(ip, prefix)?.trunc();
            let _ = netlink.del_route_metric(on_link, index, PREFIX_ROUTE_METRIC).await;
        }
    }
    Ok(())
}

/// The state file for a socket path.
fn state_file(sockfile: &Path) -> PathBuf {
    let mut name = sockfile.as_os_str().to_owned();
    name.push(".takeover.json");
    PathBuf::from(name)
}

/// If an earlier server-cluster in this pod died mid-takeover, put the pod back.
async fn recover_leftovers(netlink: &Netlink, path: &Path) -> Result<()> {
    let Ok(data) = std::fs::read(path) else {
        return Ok(());
    };
    let state: TakeoverState = serde_json::from_slice(&data).with_context(|| {
        format!(
            "{} is not a takeover record; remove it if no server-cluster runs",
            path.display()
        )
    })?;
    let index = netlink
        .link_index(&state.interface)
        .await?
        .ok_or_else(|| anyhow!("{} names interface {}, which is gone", path.display(), state.interface))?;
    warn!(
        "an earlier server-cluster left its takeover of {} in place; undoing it first",
        state.interface
    );
    undo_takeover(netlink, &state, index).await?;
    remove_if_present(path)
}

async fn pod_interface(netlink: &Netlink, configured: Option<&str>) -> Result<(String, u32)> {
    if let Some(name) = configured {
        let index = netlink
            .link_index(name)
            .await?
            .ok_or_else(|| anyhow!("interface {name} does not exist (--interface)"))?;
        return Ok((name.to_owned(), index));
    }
    let routes = netlink.routes(false).await?;
    let index = routes
        .iter()
        .find(|r| r.destination.prefix_len() == 0 && r.table == crate::netconf::netlink::TABLE_MAIN && r.oif.is_some())
        .and_then(|r| r.oif)
        .ok_or_else(|| anyhow!("no IPv4 default route: cannot tell which interface is the pod's; pass --interface"))?;
    let name = crate::netconf::netlink::interface_name(index)
        .ok_or_else(|| anyhow!("the default route's interface {index} vanished"))?;
    Ok((name, index))
}

fn mtu_of(interface: &str) -> Result<usize> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
        .with_context(|| format!("cannot read the MTU of {interface}"))?;
    s.trim().parse().with_context(|| format!("bad MTU for {interface}"))
}

/// Runs until SIGINT or SIGTERM, serving one server-external at a time.
pub async fn run(config: ServerClusterConfig) -> Result<()> {
    let resolv_conf = std::fs::read_to_string(&config.resolv_conf)
        .with_context(|| format!("cannot read {} (--resolv-conf)", config.resolv_conf.display()))?;
    let netlink = Netlink::connect()?;
    let state_file = state_file(&config.sockfile);
    if let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    recover_leftovers(&netlink, &state_file).await?;
    let (interface, index) = pod_interface(&netlink, config.interface.as_deref()).await?;
    let mut addresses: Vec<(IpAddr, u8)> = netlink
        .addresses(index)
        .await?
        .into_iter()
        .filter(|(ip, _)| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
        })
        .collect();
    addresses.sort_by_key(|(ip, _)| ip.is_ipv6());
    if addresses.iter().filter(|(a, _)| a.is_ipv4()).count() > 1 {
        let first = addresses[0].0;
        warn!("{interface} has several IPv4 addresses; taking over {first} only");
        let mut seen_v4 = false;
        addresses.retain(|(a, _)| a.is_ipv6() || !std::mem::replace(&mut seen_v4, true));
    }
    let hello = Hello {
        addresses: addresses.iter().map(|(a, _)| *a).collect(),
        resolv_conf,
    };
    let greeting = hello
        .encode()
        .with_context(|| format!("cannot describe {interface}'s addresses"))?;
    // Packets that fit the pod network but not the tunnel get an ICMP "too big" here.
    let mtu = match config.mtu {
        Some(m) => m,
        None => u16::try_from(
            mtu_of(&interface)?
                .saturating_sub(48 + config.transport.overhead())
                .max(1280),
        )
        .unwrap_or(1280),
    };
    let tun = Arc::new(Tun::create("teletun%d", mtu)?);
    if tun.offload() {
        // Frames go to server-external whole; it splits up to this many
        // segments at once. Larger GSO packets (forwarded from a pod whose
        // device allows more) the kernel segments first.
        netlink
            .set_gso_max_segments(tun.index()?, crate::io::offload::MAX_SEGMENTS as u32)
            .await?;
    }
    let takeover = Takeover {
        netlink,
        state: std::sync::Mutex::new(TakeoverState {
            interface: interface.clone(),
            addresses,
            sysctls: Vec::new(),
        }),
        state_file,
        interface_index: index,
        tun_index: tun.index()?,
        tun_name: tun.name().to_owned(),
    };
    let listener = match takeover.apply().await {
        Ok(()) => seqpacket::listen(&config.sockfile),
        Err(e) => Err(e),
    };
    let result = match listener {
        Ok(listener) => {
            info!(
                "took over {hello} on {interface} via {}; listening on {}",
                tun.name(),
                config.sockfile.display()
            );
            serve(listener, &tun, &greeting).await
        }
        Err(e) => Err(e),
    };
    let undo = takeover.undo().await;
    let _ = std::fs::remove_file(&config.sockfile);
    drop(tun);
    result.and(undo)
}

async fn serve(listener: socket2::Socket, tun: &Arc<Tun>, greeting: &[u8]) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    listener.set_nonblocking(true)?;
    // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same until it is dropped.
    let listener = unsafe { tokio::io::unix::AsyncFd::register(listener) }
        .map_err(|e| anyhow!("cannot watch the socket: {}", e.into_parts().1))?;
    loop {
        let sock = tokio::select! {
            r = listener.readable() => {
                let mut guard = r?;
                match guard.try_io(|l| l.get_ref().accept()) {
                    Ok(Ok((s, _))) => s,
                    Ok(Err(e)) => { warn!("accept failed: {e}"); continue; }
                    Err(_would_block) => continue,
                }
            }
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        };
        let link = Arc::new(SeqPacket::new(sock)?);
        let capabilities = tun.capabilities();
        let params = LinkParams {
            tcp: capabilities.tcp,
            udp: capabilities.udp,
        };
        let greeted = link
            .send_message(greeting, Duration::from_secs(5))
            .and_then(|()| link.send_message(&params.encode(), Duration::from_secs(5)));
        if let Err(e) = greeted {
            warn!("cannot greet server-external: {e}");
            continue;
        }
        info!("server-external connected");
        let mut plane = DataPlane::relay(
            Names {
                outbound: "tun→external",
                inbound: "external→tun",
            },
            (tun.clone(), tun.clone()),
            (link.clone(), link.clone()),
        )?;
        let stop = tokio::select! {
            exit = plane.ended() => {
                info!("server-external link ended: {}", exit.result.err().map_or("stopped".into(), |e| e.to_string()));
                false
            }
            _ = sigint.recv() => true,
            _ = sigterm.recv() => true,
        };
        info!(
            "to server-external: {}; from server-external: {}; {} malformed TSO reads",
            plane.outbound.summary(),
            plane.inbound.summary(),
            tun.unsplittable()
        );
        tokio::task::spawn_blocking(move || plane.stop()).await?;
        if stop {
            return Ok(());
        }
    }
}
