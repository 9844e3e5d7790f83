//! `teletun client`: connect to server-external, become the server-cluster pod
//! on a local TUN device, and undo every change on the way out.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::control::channel::{self, read_greeting};
use crate::control::tls::{self, KeyMismatch};
use crate::io::tun::Tun;
use crate::io::udp::{self, Udp};
use crate::keys::{Identity, PinnedKey};
use crate::kube::{discovery, networks, Kube, KubeOptions};
use crate::netconf::dns::DnsManager;
use crate::netconf::forwarder::{self, Forwarder, Sources};
use crate::netconf::netlink::Netlink;
use crate::netconf::record::Record;
use crate::netconf::routes::RouteKeeper;
use crate::plane::{self, Accept, DataPlane, Names};
use crate::proto::control::{Hello, ServerGreeting};
use crate::proto::dns::SplitDomains;
use crate::proto::resolv_conf::{self, ResolvConf};
use crate::tunnel::{Transport, TunnelError};

use super::cleanup;
use super::guard::Guard;

/// Where to find server-external through the Kubernetes API.
#[derive(Clone, Debug)]
pub struct KubeTarget {
    /// kubeconfig, context, namespace.
    pub options: KubeOptions,
    /// The server-external pod's name.
    pub pod: String,
}

/// Everything `teletun client` needs, already validated by the CLI.
pub struct ClientConfig {
    /// server-external's address (TCP and UDP, same port); an unspecified IP
    /// means: ask Kubernetes (`kube`).
    pub server: SocketAddr,
    /// The Kubernetes API: where server-external runs, and the cluster's networks.
    pub kube: Option<KubeTarget>,
    /// Route cluster networks even where they overlap existing routes.
    pub allow_conflicting: bool,
    /// Our key.
    pub identity: Identity,
    /// Where our private key came from (for messages).
    pub identity_path: std::path::PathBuf,
    /// The server key to accept.
    pub server_key: PinnedKey,
    /// Networks to route into the tunnel.
    pub routes: Vec<IpNet>,
    /// TUN name pattern, `tel%d` by default.
    pub tun_name: String,
    /// Skip DNS registration.
    pub no_dns: bool,
    /// The data plane's transport.
    pub transport: Transport,
}

/// How long to wait for TCP connect, TLS and the greeting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the session ended.
#[derive(Debug)]
enum End {
    Signal(&'static str),
    ServerClosed,
    ServerVanished,
    ServerSilent,
    ControlFailed(String),
    DataPlane(String),
}

/// SIGINT and SIGTERM as one stream.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// What this run changed, so it can be undone.
struct Changes {
    /// Undoes `record` if this process dies before it does so itself.
    guard: Option<Guard>,
    record: Option<Record>,
    tun: Option<Arc<Tun>>,
    /// The DNS manager used, and the TUN's interface index.
    dns: Option<(DnsManager, u32)>,
    /// The split-DNS forwarder (with resolvconf), stopped after the DNS entry goes.
    forwarder: Option<Forwarder>,
}

/// The live view of the cluster's networks.
struct ClusterView {
    kube: Kube,
    networks: tokio::sync::watch::Receiver<BTreeSet<IpNet>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for ClusterView {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Runs the client until a signal or the server ends the session.
pub async fn run(mut config: ClientConfig) -> Result<()> {
    let started = std::time::Instant::now();
    // Undo what dead instances left before adding anything.
    cleanup::undo_dead_instances(false).await?;
    // Everything the API can refuse is asked before this machine changes.
    let cluster = match config.kube.clone() {
        Some(target) => {
            let kube = Kube::connect(&target.options).await?;
            if config.server.ip().is_unspecified() {
                let ip = discovery::server_address(&kube, &target.pod).await?;
                info!(
                    "server-external {}/{} runs on a node reachable at {ip}",
                    kube.namespace, target.pod
                );
                config.server.set_ip(ip);
            }
            let (networks, watcher) = networks::watch(&kube).await?;
            Some(ClusterView {
                kube,
                networks,
                watcher,
            })
        }
        None => None,
    };
    if config.server.ip().is_unspecified() {
        bail!("no server to connect to: pass -pod=NAME (with a kubeconfig) or --server-address ADDR");
    }
    let keeper = route_keeper(&config, cluster.as_ref())?;
    let mut signals = Signals::new()?;
    let mut changes = Changes {
        guard: Some(Guard::start()?),
        record: None,
        tun: None,
        dns: None,
        forwarder: None,
    };
    // A signal during set-up drops `session` at its current step; `undo` follows.
    let outcome = session(&config, cluster.as_ref(), keeper, &mut changes, &mut signals, started).await;
    let undo = undo(&mut changes).await;
    let end = outcome?;
    undo?;
    match end {
        End::Signal(sig) => {
            info!("stopped by {sig}; removed the tunnel and its DNS entry");
            Ok(())
        }
        End::ServerClosed => {
            bail!("the server ended the session (control connection closed); removed the tunnel and its DNS entry")
        }
        End::ServerVanished => bail!(
            "the server at {} went away without ending the session (connection closed without TLS close_notify); \
             removed the tunnel and its DNS entry",
            config.server
        ),
        End::ServerSilent => bail!(
            "nothing heard from the server at {} for {} s: the network path or the server is gone; \
             removed the tunnel and its DNS entry",
            config.server,
            crate::tunnel::liveness::SILENCE_LIMIT.as_secs()
        ),
        End::ControlFailed(e) => bail!(
            "lost the control connection to {}: {e}; removed the tunnel and its DNS entry",
            config.server
        ),
        End::DataPlane(e) => bail!("the data plane failed: {e}; removed the tunnel and its DNS entry"),
    }
}

async fn undo(changes: &mut Changes) -> Result<()> {
    let mut first_error = None;
    if let (Some(record), Some((dns, ifindex))) = (&changes.record, &changes.dns) {
        if record.dns_registered {
            if let Err(e) = dns.unregister(record.dns_entry(), *ifindex).await {
                warn!("{e:#}");
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(f) = changes.forwarder.take() {
        info!("DNS forwarder on {}: {}", f.address(), f.counters());
    }
    crate::crashpoint::reached("mid-teardown").await;
    // Closing the last descriptor deletes the TUN device, and its addresses and routes with it.
    changes.tun = None;
    if let Some(record) = changes.record.take() {
        if let Err(e) = record.remove() {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        None => {
            if let Some(guard) = changes.guard.take() {
                guard.done();
            }
            Ok(())
        }
        // The guard sees its pipe close when we exit, and tries again.
        Some(e) => Err(e),
    }
}

fn explain_tls(e: std::io::Error, config: &ClientConfig) -> anyhow::Error {
    match tls::key_mismatch(&e) {
        Some(KeyMismatch::PeerKeyNotPinned) => anyhow!(
            "the server at {} presented a key that is not the server public key {}; check --server-pubkey",
            config.server,
            config.server_key.path.display()
        ),
        Some(KeyMismatch::OurKeyRefused) => anyhow!(
            "the server at {} refused our client key ({}): it pins a different client public key; check the server's --client-pubkey",
            config.server,
            config.identity_path.display()
        ),
        None => anyhow!("TLS with {} failed: {e}", config.server),
    }
}

/// A running tunnel.
struct Tunnel {
    control: tokio_rustls::client::TlsStream<TcpStream>,
    plane: DataPlane,
    /// Keeps the cluster routes in step with the API.
    routes: Option<tokio::task::JoinHandle<()>>,
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

async fn session(
    config: &ClientConfig,
    cluster: Option<&ClusterView>,
    keeper: RouteKeeper,
    changes: &mut Changes,
    signals: &mut Signals,
    started: std::time::Instant,
) -> Result<End> {
    let Tunnel {
        mut control,
        mut plane,
        routes,
    } = tokio::select! {
        biased;
        sig = signals.next() => return Ok(End::Signal(sig)),
        t = establish(config, cluster, keeper, changes, started) => t?,
    };
    // Routes die with the TUN; the task that keeps them goes with the session.
    let _routes = AbortOnDrop(routes);
    crate::crashpoint::reached("mid-traffic").await;
    let end = tokio::select! {
        biased;
        sig = signals.next() => End::Signal(sig),
        r = channel::wait_closed(&mut control) => match r {
            Ok(channel::Closed::Cleanly) => End::ServerClosed,
            Ok(channel::Closed::Abruptly) => End::ServerVanished,
            Err(e) => End::ControlFailed(format!("{e:#}")),
        },
        exit = plane.ended() => match exit.result {
            // close_notify: the server ends the session (its TLS close follows).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => End::ServerClosed,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => End::ServerSilent,
            Ok(()) => End::DataPlane(format!("{} stopped", exit.name)),
            Err(e) => End::DataPlane(format!("{}: {e}", exit.name)),
        },
    };
    info!(
        "session ends; to server: {}; from server: {}; {} malformed TSO reads",
        plane.outbound.summary(),
        plane.inbound.summary(),
        changes.tun.as_ref().map_or(0, |t| t.unsplittable())
    );
    tokio::task::spawn_blocking(move || plane.stop()).await?;
    if matches!(end, End::Signal(_)) {
        // Tell the server we are leaving (TLS close_notify, then FIN).
        let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(&mut control)).await;
    }
    Ok(end)
}

/// Connects, sets up DTLS, then configures this machine and starts the data plane.
async fn establish(
    config: &ClientConfig,
    cluster: Option<&ClusterView>,
    mut keeper: RouteKeeper,
    changes: &mut Changes,
    started: std::time::Instant,
) -> Result<Tunnel> {
    // 1. Control channel.
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(config.server))
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from {} within {CONNECT_TIMEOUT:?}; is server-external running and reachable?",
                config.server
            )
        })?
        .with_context(|| format!("cannot connect to {}", config.server))?;
    channel::tune_tcp(&tcp)?;
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&config.identity, config.server_key.clone())?);
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).expect("static name is valid");
    let mut control = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake with {} timed out", config.server))?
        .map_err(|e| explain_tls(e, config))?;
    let greeting = tokio::time::timeout(CONNECT_TIMEOUT, read_greeting(&mut control))
        .await
        .map_err(|_| anyhow!("{} sent no addresses within {CONNECT_TIMEOUT:?}", config.server))?
        .map_err(|e| match e.downcast::<std::io::Error>() {
            Ok(io) => explain_tls(io, config),
            Err(e) => e,
        })?;
    let hello = match greeting {
        ServerGreeting::Hello(h) => h,
        ServerGreeting::Refused(why) => bail!("the server at {} refused the session: {why}", config.server),
    };
    info!("connected to {}: {hello}", config.server);
    // The server's answer first (it may be busy), then whether it names
    // addresses this machine may take on, then whether our routes would collide.
    let (local, on_link) = local_networks().await?;
    if let Err(why) = hello.check_addresses(&local, &on_link) {
        let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(&mut control)).await;
        bail!(
            "the server at {} announced a pod address this machine must not take on: {why}; refusing the session (check the server-cluster pod)",
            config.server
        );
    }
    let networks = cluster.map(|c| c.networks.borrow().clone()).unwrap_or_default();
    if let Err(e) = keeper.check_conflicts(&networks).await {
        // Leave politely so the server frees its slot at once.
        let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(&mut control)).await;
        return Err(e);
    }

    // 2. Data plane handshake, before touching this machine's configuration.
    let bind: SocketAddr = if config.server.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse()?;
    let udp = Udp::bind(bind)?;
    udp.connect(config.server)?;
    let path_mtu = udp.path_mtu(config.server.is_ipv6())?;
    let payload = udp::udp_payload(path_mtu, config.server.is_ipv6());
    let mut hs = config.transport.client(
        crate::tunnel::now(),
        &config.identity,
        config.server_key.clone(),
        payload,
    )?;
    let udp = Arc::new(udp);
    let shaking = udp.clone();
    let result = tokio::task::spawn_blocking(move || plane::handshake(&shaking, hs.as_mut(), None)).await?;
    let session = match result {
        Ok(s) => s,
        Err(TunnelError::PeerKeyNotPinned(p)) => {
            bail!("the server's data-plane key is not the server public key {p}")
        }
        Err(TunnelError::OurKeyRefused) => bail!("the server refused our client key in the data-plane handshake"),
        Err(e) => bail!("data-plane handshake with {} failed: {e}", config.server),
    };
    let tun_mtu = payload - config.transport.overhead();
    let (gso, gro) = udp.offloads();
    info!(
        "{} up; path MTU {path_mtu}, tunnel MTU {tun_mtu}; UDP GSO {}, GRO {}",
        session.description,
        on_off(gso),
        on_off(gro)
    );

    // 3. The TUN device, its addresses, routes and DNS.
    let tun = Arc::new(Tun::create(
        &config.tun_name,
        u16::try_from(tun_mtu).unwrap_or(u16::MAX),
    )?);
    let record = Record::for_self(tun.name());
    record.save()?;
    changes.record = Some(record.clone());
    if let Some(guard) = changes.guard.as_mut() {
        guard.watch(&record.path())?;
    }
    changes.tun = Some(tun.clone());
    crate::crashpoint::reached("after-tun").await;
    add_addresses(&hello, &tun).await?;
    keeper.attach(tun.index()?, hello.addresses.iter().any(IpAddr::is_ipv6));
    let initial = cluster.map(|c| c.networks.borrow().clone()).unwrap_or_default();
    keeper.sync(&initial).await?;
    crate::crashpoint::reached("after-routes").await;
    let routes = cluster.map(|c| {
        let mut networks = c.networks.clone();
        tokio::spawn(async move {
            while networks.changed().await.is_ok() {
                let now = networks.borrow_and_update().clone();
                if let Err(e) = keeper.sync(&now).await {
                    warn!("{e:#}");
                }
            }
        })
    });
    if !config.no_dns {
        register_dns(&hello, &tun, changes).await?;
    }
    let plane = DataPlane::tunnel(
        Names {
            outbound: "tun→udp",
            inbound: "udp→tun",
        },
        session,
        udp,
        tun.clone(),
        tun.clone(),
        // The server may send only to the pod's addresses, never to this
        // machine's LAN or other interfaces through the tunnel.
        Accept::To(hello.addresses.clone()),
    )?;
    info!(
        "tunnel {} is up, with its addresses, routes and DNS, {} ms after start",
        tun.name(),
        started.elapsed().as_millis()
    );
    Ok(Tunnel { control, plane, routes })
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// This machine's own addresses and the networks it reaches directly.
async fn local_networks() -> Result<(Vec<IpAddr>, Vec<IpNet>)> {
    use rtnetlink::packet_route::route::RouteType;
    let netlink = Netlink::connect()?;
    let mut routes = netlink.routes(false).await?;
    routes.extend(netlink.routes(true).await?);
    let local = routes
        .iter()
        .filter(|r| r.kind == RouteType::Local)
        .map(|r| r.destination.addr())
        .collect();
    let on_link = routes
        .iter()
        .filter(|r| {
            let d = r.destination;
            r.kind == RouteType::Unicast
                && r.table == crate::netconf::netlink::TABLE_MAIN
                && r.gateway.is_none()
                && d.prefix_len() > 0
                && crate::proto::control::usable_unicast(d.addr())
        })
        .map(|r| r.destination)
        .collect();
    Ok((local, on_link))
}

async fn add_addresses(hello: &Hello, tun: &Tun) -> Result<()> {
    let netlink = Netlink::connect()?;
    let index = tun.index()?;
    if tun.offload() {
        netlink
            .set_gso_max_segments(index, Tun::MAX_GSO_SEGMENTS as u32)
            .await?;
    }
    for &address in &hello.addresses {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        netlink.add_address(index, address, prefix).await?;
    }
    crate::crashpoint::reached("after-addresses").await;
    Ok(())
}

/// Registers the cluster's DNS: with resolvconf, a local forwarder that
/// splits by domain, registered first; with systemd-resolved, the link's
/// servers with the cluster's domains as search and routing domains. Only the
/// pod's nameservers and its search domains in the cluster's domain are used;
/// its options (`ndots:5`) never reach this machine.
async fn register_dns(hello: &Hello, tun: &Tun, changes: &mut Changes) -> Result<()> {
    let index = tun.index()?;
    let mut pod = resolv_conf::parse(&hello.resolv_conf);
    pod.nameservers.retain(|ns| {
        let ok = crate::proto::control::usable_unicast(*ns);
        if !ok {
            warn!("not using the pod's nameserver {ns}: not a unicast address a cluster's DNS can have");
        }
        ok
    });
    let split = SplitDomains::from_search(&pod.search);
    for (domain, why) in &split.dropped {
        warn!("not installing the pod's search domain {domain}: {why}");
    }
    let manager = DnsManager::detect().await;
    let (entry, conf) = match &manager {
        DnsManager::Resolvconf => {
            let address = forwarder::address_for(tun.name())?;
            let f = Forwarder::start(address, pod.nameservers.clone(), split.clone(), Sources::default()).await?;
            info!(
                "DNS forwarder on {address}: names in {} to the cluster's DNS, all others to this machine's nameservers",
                split.zones.join(", ")
            );
            changes.forwarder = Some(f);
            let conf = ResolvConf {
                nameservers: vec![address],
                search: split.search.clone(),
            };
            (forwarder::registration_name(tun.name()), conf)
        }
        DnsManager::Resolved(_) => {
            let conf = ResolvConf {
                nameservers: pod.nameservers.clone(),
                search: split.search.clone(),
            };
            (tun.name().to_owned(), conf)
        }
    };
    crate::crashpoint::reached("after-forwarder").await;
    let record = changes.record.as_mut().expect("record exists once the TUN does");
    record.dns_registered = true;
    record.dns_via = manager.via();
    record.dns_name = Some(entry.clone());
    record.save()?;
    let manager = &changes.dns.insert((manager, index)).0;
    manager.register(&entry, index, &conf).await?;
    info!("registered the cluster's DNS for {} with {}", tun.name(), manager.via());
    crate::crashpoint::reached("after-dns").await;
    Ok(())
}

/// The keeper of the tunnel's routes: the `--route` networks plus the
/// cluster's networks as the API shows them, never one that covers the API
/// server or the tunnel's own endpoint.
fn route_keeper(config: &ClientConfig, cluster: Option<&ClusterView>) -> Result<RouteKeeper> {
    let mut never = vec![config.server.ip()];
    if let Some(c) = cluster {
        never.extend(c.kube.api_addresses.iter().copied());
    }
    if config.routes.is_empty() && cluster.is_none() {
        warn!("no routes: pass --route CIDR, or -pod with a kubeconfig, to reach the cluster");
    }
    RouteKeeper::new(&config.routes, never, config.allow_conflicting)
}
