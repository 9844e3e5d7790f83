//! `teletun server-cluster`: runs in the pod the client replaces. It takes over
//! the pod's IP addresses (every packet for them goes to a TUN device and on to
//! the client; nothing is answered locally), and relays packets to and from
//! server-external over the AF_UNIX socket.
//!
//! The takeover's steps are planned in `netconf::takeover` (IPv4: a policy
//! rule before the `local` table steers the pod IP to the TUN, proxy ARP
//! answers for it; IPv6: the address moves to the TUN, proxy NDP answers;
//! docs/architecture.md) and taken here, each written down first.

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::io::seqpacket::{self, SeqPacket};
use crate::io::tun::Tun;
use crate::netconf::netlink::{Netlink, TABLE_LOCAL};
use crate::netconf::takeover::{
    self, current_netns, undo, Done, Record, Step, Sysctl, Undo, LOCAL_PRIORITY, PREFIX_ROUTE_METRIC,
    TAKEOVER_PRIORITY, TAKEOVER_TABLE,
};
use crate::plane::{Accept, DataPlane, Names};
use crate::proto::control::Hello;
use crate::proto::link::LinkParams;
use crate::roles::link_auth;

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
    /// Where the takeover record lives: a directory of this pod's own that
    /// outlives container restarts (an emptyDir), not shared with server-external.
    pub state_dir: PathBuf,
    /// The only uid that may connect to the socket (server-external's).
    pub peer_uid: u32,
    /// The pair's link key: a peer must prove it holds it before it is greeted.
    pub link_key: Option<crate::keys::LinkKey>,
}

/// A takeover in progress: what it did, written down before each change.
struct Takeover {
    netlink: Netlink,
    record: Record,
    path: PathBuf,
    interface_index: u32,
    tun_index: u32,
}

impl Takeover {
    /// Takes each step of `steps`, recording it (with a parameter's old
    /// value) before it is taken.
    async fn apply(&mut self, steps: Vec<Step>) -> Result<()> {
        for step in steps {
            let old = match &step {
                Step::Set { sysctl, .. } => Some(read_sysctl(sysctl)?),
                _ => None,
            };
            self.record.done.push(Done {
                step: step.clone(),
                old,
            });
            self.record.save(&self.path)?;
            self.take(&step).await?;
        }
        Ok(())
    }

    async fn take(&self, step: &Step) -> Result<()> {
        let (netlink, iface, tun) = (&self.netlink, self.interface_index, self.tun_index);
        match step {
            Step::Set { sysctl, value } => set_sysctl(netlink, sysctl, &value.to_string(), &[iface, tun]).await,
            Step::TunTable => netlink.add_route_in("0.0.0.0/0".parse()?, tun, TAKEOVER_TABLE).await,
            Step::SteerRule { to } => {
                netlink
                    .add_rule(
                        false,
                        TAKEOVER_PRIORITY,
                        TAKEOVER_TABLE,
                        Some(&self.record.interface),
                        Some(IpNet::from(IpAddr::V4(*to))),
                    )
                    .await
            }
            Step::MoveLocalRule => {
                // The new one first, then the old: never a moment without one.
                let rules = netlink.rules(false).await?;
                if !rules
                    .iter()
                    .any(|r| r.table == TABLE_LOCAL && r.priority == LOCAL_PRIORITY)
                {
                    netlink.add_rule(false, LOCAL_PRIORITY, TABLE_LOCAL, None, None).await?;
                }
                for r in rules.iter().filter(|r| r.table == TABLE_LOCAL && r.priority == 0) {
                    netlink.del_rule(r).await?;
                }
                Ok(())
            }
            &Step::MoveV6 { ip, prefix } => {
                let ip = IpAddr::V6(ip);
                netlink.del_address(iface, ip, prefix).await?;
                if prefix < 128 {
                    let on_link = IpNet::new(ip, prefix)?.trunc();
                    netlink.add_route_metric(on_link, iface, PREFIX_ROUTE_METRIC).await?;
                }
                netlink.add_route(IpNet::from(ip), tun).await?;
                netlink.add_proxy_neighbour(iface, ip).await
            }
        }
    }

    /// Puts the pod back as it was. Routes via the TUN die with it.
    async fn undo(&self) -> Result<()> {
        undo_record(&self.netlink, &self.record, self.interface_index).await?;
        remove_if_present(&self.path)
    }
}

fn read_sysctl(s: &Sysctl) -> Result<String> {
    let path = s.path();
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_owned())
}

/// `IPV4_DEVCONF_*` numbers (include/uapi/linux/ip.h) of the parameters set.
const DEVCONF_FORWARDING: u16 = 1;
const DEVCONF_PROXY_ARP: u16 = 3;
const DEVCONF_RP_FILTER: u16 = 8;
const DEVCONF_ACCEPT_LOCAL: u16 = 23;

/// Sets `s` to `value`. Nothing to do if it is so already (the pod's
/// `securityContext.sysctls` may have set it); else through /proc/sys, or
/// where that is read-only (runc mounts it so in an unprivileged container)
/// through netlink, which takes IPv4's interface parameters.
/// `forwarding_links`: the interfaces whose own forwarding stands in for
/// `net.ipv4.ip_forward` then.
async fn set_sysctl(netlink: &Netlink, s: &Sysctl, value: &str, forwarding_links: &[u32]) -> Result<()> {
    // (Not ip_forward: read-only, it stands for the interfaces' own, which it does not show.)
    if *s != Sysctl::IpForward && read_sysctl(s).is_ok_and(|now| now == value) {
        return Ok(());
    }
    let path = s.path();
    match std::fs::write(&path, value) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => set_by_netlink(netlink, s, value, forwarding_links).await,
        r => r.with_context(|| {
            format!(
                "cannot set {} to {value} (needs CAP_NET_ADMIN in this network namespace)",
                path.display()
            )
        }),
    }
}

async fn set_by_netlink(netlink: &Netlink, s: &Sysctl, value: &str, forwarding_links: &[u32]) -> Result<()> {
    let path = s.path();
    let number: u32 = value
        .parse()
        .with_context(|| format!("{} cannot be set to {value:?} over netlink", path.display()))?;
    let (param, links) = match s {
        Sysctl::IpForward => (DEVCONF_FORWARDING, forwarding_links.to_vec()),
        Sysctl::ProxyArp(i) | Sysctl::AcceptLocal(i) | Sysctl::RpFilter(i) => {
            let index = netlink
                .link_index(i)
                .await?
                .with_context(|| format!("no interface {i} to set {} on", path.display()))?;
            let param = match s {
                Sysctl::ProxyArp(_) => DEVCONF_PROXY_ARP,
                Sysctl::AcceptLocal(_) => DEVCONF_ACCEPT_LOCAL,
                _ => DEVCONF_RP_FILTER,
            };
            (param, vec![index])
        }
        Sysctl::ProxyDelay(_) => {
            // Netlink has it only in the neighbour table; answering late is no failure.
            warn!(
                "cannot set {} to {value} (/proc/sys is read-only): proxy ARP answers for the pod's address may wait up to 0.8 s",
                path.display()
            );
            return Ok(());
        }
        Sysctl::Ipv6Forwarding | Sysctl::ProxyNdp(_) => bail!(
            "cannot set {} to {value}: /proc/sys is read-only here (an unprivileged container) and the kernel takes IPv6's parameters nowhere else; set it in the pod's securityContext.sysctls (docs/deploy/teletun-servers.yaml says how)",
            path.display()
        ),
    };
    for index in links {
        netlink.set_ipv4_devconf(index, param, number).await?;
    }
    // The global ip_forward stays as it was; the interfaces' own were set.
    if *s != Sysctl::IpForward && read_sysctl(s)? != value {
        bail!("{} is still not {value} after setting it over netlink", path.display());
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Reverses what `record` says was done on interface `index`.
async fn undo_record(netlink: &Netlink, record: &Record, index: u32) -> Result<()> {
    for u in undo(&record.done) {
        match u {
            Undo::Set { sysctl, value } => {
                if let Err(e) = set_sysctl(netlink, &sysctl, &value, &[index]).await {
                    warn!("{e:#}");
                }
            }
            Undo::DelSteerRule => {
                let rules = netlink.rules(false).await?;
                for r in rules
                    .iter()
                    .filter(|r| r.table == TAKEOVER_TABLE && r.priority == TAKEOVER_PRIORITY)
                {
                    netlink.del_rule(r).await?;
                }
            }
            Undo::RestoreLocalRule => {
                let rules = netlink.rules(false).await?;
                if !rules.iter().any(|r| r.table == TABLE_LOCAL && r.priority == 0) {
                    netlink.add_rule(false, 0, TABLE_LOCAL, None, None).await?;
                }
                for r in rules
                    .iter()
                    .filter(|r| r.table == TABLE_LOCAL && r.priority == LOCAL_PRIORITY)
                {
                    netlink.del_rule(r).await?;
                }
            }
            Undo::RestoreV6 { ip, prefix } => {
                let ip = IpAddr::V6(ip);
                let _ = netlink.del_proxy_neighbour(index, ip).await;
                let present = netlink.addresses(index).await?.iter().any(|(a, _)| *a == ip);
                if !present {
                    netlink.add_address(index, ip, prefix).await?;
                }
                if prefix < 128 {
                    let on_link = IpNet::new(ip, prefix)?.trunc();
                    let _ = netlink.del_route_metric(on_link, index, PREFIX_ROUTE_METRIC).await;
                }
            }
        }
    }
    Ok(())
}

/// If an earlier server-cluster in this pod died mid-takeover, put the pod
/// back. A record from another network namespace, one that names an
/// interface that is gone, or one with anything this module never writes,
/// is logged and discarded, never applied.
async fn recover_leftovers(netlink: &Netlink, path: &Path) -> Result<()> {
    let record = match Record::load(path) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            warn!("discarding {}: {e:#}", path.display());
            return remove_if_present(path);
        }
    };
    if let Err(why) = record.check(current_netns()?) {
        warn!("discarding the takeover record {}: {why}", path.display());
        return remove_if_present(path);
    }
    let Some(index) = netlink.link_index(&record.interface).await? else {
        warn!(
            "discarding the takeover record {}: interface {} is gone",
            path.display(),
            record.interface
        );
        return remove_if_present(path);
    };
    warn!(
        "an earlier server-cluster left its takeover of {} in place; undoing it first",
        record.interface
    );
    undo_record(netlink, &record, index).await?;
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
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| format!("cannot create directory {} (--state-dir)", config.state_dir.display()))?;
    let state_file = config.state_dir.join("takeover.json");
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
    let v4 = addresses.iter().find_map(|(a, _)| match a {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let v6: Vec<(std::net::Ipv6Addr, u8)> = addresses
        .iter()
        .filter_map(|&(a, p)| match a {
            IpAddr::V6(v6) => Some((v6, p)),
            IpAddr::V4(_) => None,
        })
        .collect();
    let mut takeover = Takeover {
        netlink,
        record: Record {
            netns: current_netns()?,
            interface: interface.clone(),
            done: Vec::new(),
        },
        path: state_file,
        interface_index: index,
        tun_index: tun.index()?,
    };
    let steps = takeover::plan(&interface, tun.name(), v4, &v6);
    let listener = match takeover.apply(steps).await {
        Ok(()) => seqpacket::listen(&config.sockfile).and_then(|l| {
            // The socket is its owner's alone (0600): a server-external of
            // another uid may connect only if it owns it.
            // SAFETY: geteuid has no preconditions.
            if config.peer_uid != unsafe { libc::geteuid() } {
                std::os::unix::fs::chown(&config.sockfile, Some(config.peer_uid), None)
                    .with_context(|| format!("cannot give {} to uid {}", config.sockfile.display(), config.peer_uid))?;
            }
            Ok(l)
        }),
        Err(e) => Err(e),
    };
    let result = match listener {
        Ok(listener) => {
            info!(
                "took over {hello} on {interface} via {}; listening on {}",
                tun.name(),
                config.sockfile.display()
            );
            serve(
                listener,
                &tun,
                &greeting,
                &hello.addresses,
                config.peer_uid,
                config.link_key.map(Arc::new),
            )
            .await
        }
        Err(e) => Err(e),
    };
    let undo = takeover.undo().await;
    let _ = std::fs::remove_file(&config.sockfile);
    drop(tun);
    result.and(undo)
}

/// Accepts one connection waiting on `listener`, if any, with the uid of
/// the process at the other end.
fn accept_one(
    listener: &tokio::io::unix::AsyncFd<socket2::Socket>,
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, socket2::Socket>,
) -> Option<(socket2::Socket, Option<(u32, i32)>)> {
    match guard.try_io(|l| l.get_ref().accept()) {
        Ok(Ok((s, _))) => {
            let cred = seqpacket::peer_credentials(&s).ok();
            Some((s, cred))
        }
        Ok(Err(e)) => {
            warn!("accept on {} failed: {e}", describe(listener));
            None
        }
        Err(_would_block) => None,
    }
}

fn describe(listener: &tokio::io::unix::AsyncFd<socket2::Socket>) -> String {
    listener
        .get_ref()
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_else(|| "the socket".into())
}

/// Runs until SIGINT or SIGTERM, relaying for one server-external at a time:
/// a connection from another uid than `peer_uid`, one that does not prove it
/// holds `link_key`, or a second one while the first lives, is refused with a
/// log line.
async fn serve(
    listener: socket2::Socket,
    tun: &Arc<Tun>,
    greeting: &[u8],
    pod_addresses: &[IpAddr],
    peer_uid: u32,
    link_key: Option<Arc<crate::keys::LinkKey>>,
) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    listener.set_nonblocking(true)?;
    // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same until it is dropped.
    let listener = unsafe { tokio::io::unix::AsyncFd::register(listener) }
        .map_err(|e| anyhow!("cannot watch the socket: {}", e.into_parts().1))?;
    // Connections proving the link key, each on a blocking thread of its own:
    // one that stays silent holds only itself up, not the one that answers.
    let mut proving = tokio::task::JoinSet::new();
    loop {
        let (sock, cred) = tokio::select! {
            r = listener.readable() => {
                let mut guard = r?;
                match accept_one(&listener, &mut guard) {
                    Some(accepted) => accepted,
                    None => continue,
                }
            }
            Some(proven) = proving.join_next(), if !proving.is_empty() => match proven {
                Ok((link, _, Ok(()))) => {
                    // The others are not waited for: their links close when they end.
                    proving = tokio::task::JoinSet::new();
                    if relay(&listener, link, tun, greeting, pod_addresses, (&mut sigint, &mut sigterm)).await? {
                        return Ok(());
                    }
                    continue;
                }
                Ok((_, pid, Err(e))) => {
                    warn!("refused a connection on {} from pid {pid}: {e:#}", describe(&listener));
                    continue;
                }
                Err(e) => {
                    warn!("a link authentication ended: {e}");
                    continue;
                }
            },
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        };
        let pid = match cred {
            Some((uid, pid)) if uid == peer_uid => pid,
            Some((uid, pid)) => {
                warn!(
                    "refused a connection on {} from pid {pid} (uid {uid}): only uid {peer_uid} may connect (--peer-uid)",
                    describe(&listener)
                );
                continue;
            }
            None => {
                warn!(
                    "refused a connection on {}: its peer's credentials are unknown",
                    describe(&listener)
                );
                continue;
            }
        };
        let link = Arc::new(SeqPacket::new(sock)?);
        match &link_key {
            Some(_) if proving.len() >= MAX_PROVING => warn!(
                "refused a connection on {} from pid {pid}: {MAX_PROVING} others are proving the link key",
                describe(&listener)
            ),
            Some(key) => {
                let key = key.clone();
                proving.spawn_blocking(move || {
                    let proven = link_auth::prove_cluster(&link, &key);
                    (link, pid, proven)
                });
            }
            None => {
                if relay(
                    &listener,
                    link,
                    tun,
                    greeting,
                    pod_addresses,
                    (&mut sigint, &mut sigterm),
                )
                .await?
                {
                    return Ok(());
                }
            }
        }
    }
}

/// Connections that may prove the link key at once.
const MAX_PROVING: usize = 8;

/// Greets a linked server-external and relays for it until the link ends
/// (false: accept the next) or SIGINT or SIGTERM says stop (true).
async fn relay(
    listener: &tokio::io::unix::AsyncFd<socket2::Socket>,
    link: Arc<SeqPacket>,
    tun: &Arc<Tun>,
    greeting: &[u8],
    pod_addresses: &[IpAddr],
    (sigint, sigterm): (&mut tokio::signal::unix::Signal, &mut tokio::signal::unix::Signal),
) -> Result<bool> {
    {
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
            return Ok(false);
        }
        info!("server-external connected");
        let mut plane = DataPlane::relay(
            Names {
                outbound: "tun→external",
                inbound: "external→tun",
            },
            (tun.clone(), tun.clone()),
            (link.clone(), link.clone()),
            // The client may speak only as this pod.
            Accept::From(pod_addresses.to_vec()),
        )?;
        let stop = loop {
            tokio::select! {
                exit = plane.ended() => {
                    info!("server-external link ended: {}", exit.result.err().map_or("stopped".into(), |e| e.to_string()));
                    break false;
                }
                r = listener.readable() => {
                    let mut guard = r?;
                    if let Some((second, cred)) = accept_one(listener, &mut guard) {
                        let who = cred.map_or("an unknown process".into(), |(uid, pid)| format!("pid {pid} (uid {uid})"));
                        warn!(
                            "refused a second connection on {} from {who}: server-external is connected",
                            describe(listener)
                        );
                        drop(second);
                    }
                }
                _ = sigint.recv() => break true,
                _ = sigterm.recv() => break true,
            }
        };
        info!(
            "to server-external: {}; from server-external: {}; {} malformed TSO reads",
            plane.outbound.summary(),
            plane.inbound.summary(),
            tun.unsplittable()
        );
        tokio::task::spawn_blocking(move || plane.stop()).await?;
        Ok(stop)
    }
}
