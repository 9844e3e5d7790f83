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
use crate::netconf::local::LocalNetworks;
use crate::netconf::netlink::{ChangeWatch, Netlink};
use crate::netconf::record::Record;
use crate::netconf::routes::RouteKeeper;
use crate::plane::{self, Accept, DataPlane, Names};
use crate::proto::control::{Hello, ServerGreeting};
use crate::proto::dns::SplitDomains;
use crate::proto::resolv_conf::{self, ResolvConf};
use crate::status::{self, Board, State, StatusServer};
use crate::tunnel::{ChannelBinding, Session, Transport, TunnelError};

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
    /// Route public networks from the API and take on a public pod address.
    pub allow_public_networks: bool,
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
    /// Domains the user lets the cluster's DNS answer for (`--cluster-domain`).
    pub cluster_domains: Vec<String>,
    /// The data plane's transport.
    pub transport: Transport,
    /// Stop reconnecting a lost session after this long (`None`: never).
    pub give_up_after: Option<Duration>,
}

/// How long the first connection waits for TCP connect, TLS and the greeting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A reconnection's TCP connect: short, so that a server back after an
/// outage is found at the next attempt, not after SYN retransmissions.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A reconnection's TLS handshake and greeting.
const RECONNECT_STEP_TIMEOUT: Duration = Duration::from_secs(3);
/// A session shorter than this keeps the backoff going (a server that
/// fails each session at once is not hammered).
const SHORT_SESSION: Duration = Duration::from_secs(1);
/// How long a burst of address and route changes takes to settle.
const SETTLE: Duration = Duration::from_millis(20);

/// Why the client stops.
#[derive(Debug)]
enum End {
    Signal(&'static str),
    /// The session was lost and could not be repaired: why.
    GaveUp(String),
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
    /// The status socket (`teletun status`), gone with the record.
    status: Option<StatusServer>,
}

/// The live view of the cluster's networks.
struct ClusterView {
    kube: Kube,
    /// The server-external pod, when the server's address comes from the API
    /// (looked up again before each reconnection: the pod may have moved).
    pod: Option<String>,
    networks: tokio::sync::watch::Receiver<BTreeSet<IpNet>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for ClusterView {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Runs the client until a signal, or until a lost session cannot be repaired.
pub async fn run(mut config: ClientConfig) -> Result<()> {
    let started = std::time::Instant::now();
    // Undo what dead instances left before adding anything.
    cleanup::undo_dead_instances(false).await?;
    // Everything the API can refuse is asked before this machine changes.
    let cluster = match config.kube.clone() {
        Some(target) => {
            let kube = Kube::connect(&target.options).await?;
            let discover = config.server.ip().is_unspecified();
            if discover {
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
                pod: discover.then_some(target.pod),
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
        status: None,
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
        End::GaveUp(why) => bail!("{why}; removed the tunnel and its DNS entry"),
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
    changes.status = None;
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

/// A failed attempt to connect, and whether trying again can help.
#[derive(Debug)]
struct Failure {
    error: anyhow::Error,
    /// Trying again will not help: a key the other side refuses, a refusal
    /// that lasts, an API that forbids.
    lasting: bool,
    /// The server-external pod is not in the API (it may be recreated under
    /// its name; gone for [`POD_GONE_LIMIT`], it counts as lasting).
    pod_gone: bool,
}

/// How long server-external's pod may be missing from the API while the
/// client reconnects before it gives up (a pod recreated under its name,
/// as a StatefulSet's is, comes back within it).
const POD_GONE_LIMIT: Duration = Duration::from_secs(30);

impl Failure {
    fn lasting(error: anyhow::Error) -> Self {
        Failure {
            error,
            lasting: true,
            pod_gone: false,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            error,
            lasting: false,
            pod_gone: false,
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

fn explain_tls(e: std::io::Error, server: SocketAddr, config: &ClientConfig) -> Failure {
    match tls::key_mismatch(&e) {
        Some(KeyMismatch::PeerKeyNotPinned) => Failure::lasting(anyhow!(
            "the server at {server} presented a key that is not the server public key {}; check --server-pubkey",
            config.server_key.path.display()
        )),
        Some(KeyMismatch::OurKeyRefused) => Failure::lasting(anyhow!(
            "the server at {server} refused our client key ({}): it pins a different client public key; check the server's --client-pubkey",
            config.identity_path.display()
        )),
        None => anyhow!("TLS with {server} failed: {e}").into(),
    }
}

/// A control connection that has delivered the server's greeting.
struct Control {
    server: SocketAddr,
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    hello: Hello,
    /// What the data-plane handshake proves it belongs to this connection with.
    binding: ChannelBinding,
}

impl Control {
    /// Leaves politely (TLS close_notify, then FIN), so the server frees the
    /// slot at once.
    async fn leave(&mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::AsyncWriteExt::shutdown(&mut self.stream),
        )
        .await;
    }
}

/// Connects to server-external, runs TLS and reads the greeting.
async fn connect_control(
    config: &ClientConfig,
    server: SocketAddr,
    connect_timeout: Duration,
    step_timeout: Duration,
) -> Result<Control, Failure> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(server))
        .await
        .map_err(|_| {
            anyhow!("no answer from {server} within {connect_timeout:?}; is server-external running and reachable?")
        })?
        .with_context(|| format!("cannot connect to {server}"))?;
    channel::tune_tcp(&tcp)?;
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&config.identity, config.server_key.clone())?);
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).expect("static name is valid");
    let mut stream = tokio::time::timeout(step_timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake with {server} timed out"))?
        .map_err(|e| explain_tls(e, server, config))?;
    let greeting = tokio::time::timeout(step_timeout, read_greeting(&mut stream))
        .await
        .map_err(|_| anyhow!("{server} sent no addresses within {step_timeout:?}"))?
        .map_err(|e| match e.downcast::<std::io::Error>() {
            Ok(io) => explain_tls(io, server, config),
            Err(e) => e.into(),
        })?;
    match greeting {
        ServerGreeting::Hello(hello) => {
            let binding = tls::channel_binding(stream.get_ref().1)?;
            Ok(Control {
                server,
                stream,
                hello,
                binding,
            })
        }
        ServerGreeting::Refused(why) => {
            let error = anyhow!("the server at {server} refused the session: {why}");
            Err(Failure {
                error,
                lasting: !crate::proto::control::refusal_is_temporary(&why),
                pod_gone: false,
            })
        }
    }
}

/// Stops a blocking handshake when its caller goes away.
struct StopOnDrop(Arc<crate::io::sys::StopSignal>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The data plane's handshake with the server that just greeted us.
struct DataLink {
    session: Session,
    /// What was negotiated ("DTLS 1.2 …").
    description: String,
    udp: Arc<Udp>,
    path_mtu: usize,
    /// The largest packet a record carries on this path: the TUN's MTU.
    tunnel_mtu: usize,
}

async fn data_handshake(config: &ClientConfig, control: &Control) -> Result<DataLink, Failure> {
    let server = control.server;
    let any = if server.is_ipv6() {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    };
    let udp = Udp::bind(SocketAddr::new(any, 0))?;
    udp.connect(server)?;
    let path_mtu = udp.path_mtu(server.is_ipv6())?;
    let payload = udp::udp_payload(path_mtu, server.is_ipv6());
    let mut hs = config.transport.client(
        crate::tunnel::now(),
        &config.identity,
        config.server_key.clone(),
        payload,
        control.binding.clone(),
    )?;
    let udp = Arc::new(udp);
    let shaking = udp.clone();
    // An attempt given up (a signal) stops its handshake thread too.
    let stop = StopOnDrop(Arc::new(crate::io::sys::StopSignal::new()?));
    let stopper = stop.0.clone();
    let result = tokio::task::spawn_blocking(move || plane::handshake(&shaking, hs.as_mut(), Some(&stopper)))
        .await
        .map_err(anyhow::Error::from)?;
    drop(stop);
    let session = match result {
        Ok(s) => s,
        Err(TunnelError::PeerKeyNotPinned(p)) => {
            return Err(Failure::lasting(anyhow!(
                "the server's data-plane key is not the server public key {p}"
            )))
        }
        Err(TunnelError::OurKeyRefused) => {
            return Err(Failure::lasting(anyhow!(
                "the server refused our client key in the data-plane handshake"
            )))
        }
        Err(e) => return Err(anyhow!("data-plane handshake with {server} failed: {e}").into()),
    };
    let (gso, gro) = udp.offloads();
    let tunnel_mtu = payload - config.transport.overhead();
    info!(
        "{} up with {server}; path MTU {path_mtu}, tunnel MTU {tunnel_mtu}; UDP GSO {}, GRO {}",
        session.description,
        on_off(gso),
        on_off(gro)
    );
    Ok(DataLink {
        description: session.description.clone(),
        session,
        udp,
        path_mtu,
        tunnel_mtu,
    })
}

/// What the first connection set up on this machine, kept while the session
/// is repaired: the TUN device, its addresses, routes and DNS.
struct Installed {
    tun: Arc<Tun>,
    /// What `teletun status` reports.
    board: Arc<Board>,
    /// The pod's addresses, on the TUN.
    addresses: Vec<IpAddr>,
    resolv_conf: String,
    tunnel_mtu: usize,
    /// Keeps the cluster routes in step with the API.
    _routes: AbortOnDrop,
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

impl Installed {
    /// Follows what a new connection says: the pod's addresses (a new pod
    /// may have others) and the path's MTU (a new uplink may have another).
    async fn adopt(&mut self, hello: &Hello, link: &DataLink) -> Result<()> {
        let netlink = Netlink::connect()?;
        let index = self.tun.index()?;
        if hello.addresses != self.addresses {
            for &old in self.addresses.iter().filter(|a| !hello.addresses.contains(a)) {
                netlink.del_address(index, old, host_prefix(old)).await?;
            }
            for &new in hello.addresses.iter().filter(|a| !self.addresses.contains(a)) {
                netlink.add_address(index, new, host_prefix(new)).await?;
            }
            info!(
                "the pod's addresses changed from {} to {}; {} follows",
                list(&self.addresses),
                list(&hello.addresses),
                self.tun.name()
            );
            self.addresses = hello.addresses.clone();
        }
        if hello.resolv_conf != self.resolv_conf {
            warn!("the pod's resolv.conf changed; the cluster's DNS stays as registered at start (restart the client to take the new one)");
            self.resolv_conf = hello.resolv_conf.clone();
        }
        if link.tunnel_mtu != self.tunnel_mtu {
            let mtu = u32::try_from(link.tunnel_mtu).unwrap_or(u32::MAX);
            netlink.set_mtu(index, mtu).await?;
            info!(
                "{} MTU {} → {} (path MTU {})",
                self.tun.name(),
                self.tunnel_mtu,
                link.tunnel_mtu,
                link.path_mtu
            );
            self.tunnel_mtu = link.tunnel_mtu;
        }
        Ok(())
    }
}

fn host_prefix(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

fn list(addresses: &[IpAddr]) -> String {
    addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Connects, configures this machine, and keeps the session alive until a
/// signal: a lost session is repaired (reconnecting with backoff) while the
/// TUN device keeps its addresses, routes and DNS.
async fn session(
    config: &ClientConfig,
    cluster: Option<&ClusterView>,
    keeper: RouteKeeper,
    changes: &mut Changes,
    signals: &mut Signals,
    started: std::time::Instant,
) -> Result<End> {
    // The first connection: any failure ends the run, with its reason.
    let first = tokio::select! {
        biased;
        sig = signals.next() => return Ok(End::Signal(sig)),
        r = first_connection(config, cluster, keeper, changes) => r?,
    };
    let (mut control, mut link, mut installed) = first;
    crate::crashpoint::reached("mid-traffic").await;
    let mut watch = ChangeWatch::start()?;
    let mut first_start = Some(started);
    let mut repairs = Repairs {
        server: config.server,
        backoff: Backoff::new(),
    };
    loop {
        let began = tokio::time::Instant::now();
        let served = serve_link(control, link, &installed, signals, &mut watch, first_start.take()).await?;
        let mut lost = match served {
            Served::Signal(sig) => return Ok(End::Signal(sig)),
            Served::Lost(why) => why,
        };
        // A session that ends soon after it began is no reason to hurry:
        // the backoff goes on from where it was, and waits first.
        let short = began.elapsed() < SHORT_SESSION;
        if short {
            let wait = repairs.backoff.next(random_u32());
            tokio::select! {
                biased;
                sig = signals.next() => return Ok(End::Signal(sig)),
                () = tokio::time::sleep(wait) => {}
            }
        } else {
            repairs.backoff = Backoff::new();
        }
        warn!(
            "{lost}; reconnecting; {} keeps its addresses, routes and DNS meanwhile",
            installed.tun.name()
        );
        (control, link) = loop {
            installed.board.update(|r| {
                r.state = State::Reconnecting {
                    since: status::unix_now(),
                    attempt: 1,
                    lost: lost.clone(),
                    last_error: None,
                }
            });
            let again = match reconnect(config, cluster, &mut repairs, &installed, signals, &mut watch, &lost).await {
                Reconnected::Signal(sig) => return Ok(End::Signal(sig)),
                Reconnected::GaveUp(why) => {
                    installed.board.update(|r| r.state = State::GaveUp { why: why.clone() });
                    return Ok(End::GaveUp(why));
                }
                Reconnected::Again(again) => again,
            };
            let (mut c, l) = *again;
            match installed.adopt(&c.hello, &l).await {
                Ok(()) => {
                    installed.board.update(|r| {
                        connected(r, &c, &l);
                        r.connections += 1;
                    });
                    break (c, l);
                }
                Err(e) => {
                    // This machine refused what the new connection asks:
                    // leave it, and try again (the backoff goes on).
                    c.leave().await;
                    lost = format!("{lost}; then this machine could not follow the new connection: {e:#}");
                    warn!("{lost}; reconnecting");
                }
            }
        };
    }
}

/// The first connection: the server's answer, the checks that it names
/// addresses this machine may take on and routes that do not collide, the
/// data plane's handshake, then this machine's TUN, addresses, routes and DNS.
async fn first_connection(
    config: &ClientConfig,
    cluster: Option<&ClusterView>,
    mut keeper: RouteKeeper,
    changes: &mut Changes,
) -> Result<(Control, DataLink, Installed)> {
    let mut control = connect_control(config, config.server, CONNECT_TIMEOUT, CONNECT_TIMEOUT)
        .await
        .map_err(|f| f.error)?;
    let hello = control.hello.clone();
    info!("connected to {}: {hello}", config.server);
    if let Err(why) = check_pod_addresses(&hello, None, config, cluster).await? {
        control.leave().await;
        bail!(
            "the server at {} announced a pod address this machine must not take on: {why}; refusing the session (check the server-cluster pod)",
            config.server
        );
    }
    let networks = cluster.map(|c| c.networks.borrow().clone()).unwrap_or_default();
    if let Err(e) = keeper.check_conflicts(&networks).await {
        control.leave().await;
        return Err(e);
    }
    // The data plane's handshake, before touching this machine's configuration.
    let link = data_handshake(config, &control).await.map_err(|f| f.error)?;

    // The TUN device, its addresses, routes and DNS.
    let tun = Arc::new(Tun::create(
        &config.tun_name,
        u16::try_from(link.tunnel_mtu).unwrap_or(u16::MAX),
    )?);
    let record = Record::for_self(tun.name());
    record.save()?;
    changes.record = Some(record.clone());
    if let Some(guard) = changes.guard.as_mut() {
        guard.watch(&record.path())?;
    }
    changes.tun = Some(tun.clone());
    let board = Arc::new(Board::new(tun.name(), config.server.to_string()));
    changes.status = Some(status::serve(board.clone(), tun.name(), tun_routes(tun.index()?))?);
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
    let routes = AbortOnDrop(routes);
    let dns = match config.no_dns {
        true => None,
        false => Some(register_dns(&hello, &config.cluster_domains, &tun, changes).await?),
    };
    board.update(|r| {
        connected(r, &control, &link);
        r.dns = dns;
        r.connections = 1;
    });
    let installed = Installed {
        board,
        tun,
        addresses: hello.addresses.clone(),
        resolv_conf: hello.resolv_conf.clone(),
        tunnel_mtu: link.tunnel_mtu,
        _routes: routes,
    };
    Ok((control, link, installed))
}

/// Whether the pod's addresses may go on this machine: private-use unless
/// `--allow-public-networks`, never the server's or the API's, nor this
/// machine's own or on-link. On a reconnection (`tun`: the TUN's index) the
/// TUN's own addresses and routes do not count.
async fn check_pod_addresses(
    hello: &Hello,
    tun: Option<u32>,
    config: &ClientConfig,
    cluster: Option<&ClusterView>,
) -> Result<Result<(), String>> {
    let never = never_routed(config, cluster);
    let reason = hello
        .addresses
        .iter()
        .find_map(|ip| crate::netconf::routes::pod_address_reason(*ip, &never, config.allow_public_networks));
    if let Some(why) = reason {
        return Ok(Err(why));
    }
    let own = LocalNetworks::read(&Netlink::connect()?, tun).await?;
    Ok(hello.check_addresses(&own.addresses, &own.on_link))
}

/// How a served link ended.
enum Served {
    Signal(&'static str),
    /// The session is lost: why.
    Lost(String),
}

/// Runs the data plane over `link` until a signal, or until the session is
/// lost: the server closed or vanished, the peer fell silent, or this
/// machine's address towards the server changed. The first time (`started`:
/// when the client started), it says the tunnel is up.
async fn serve_link(
    mut control: Control,
    link: DataLink,
    installed: &Installed,
    signals: &mut Signals,
    watch: &mut ChangeWatch,
    started: Option<std::time::Instant>,
) -> Result<Served> {
    let server = control.server;
    let local = link.udp.local_addr()?.ip();
    let udp = link.udp.clone();
    let path = link.session.path.clone();
    let mut path_known = false;
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let tun = &installed.tun;
    let mut plane = DataPlane::tunnel(
        Names {
            outbound: "tun→udp",
            inbound: "udp→tun",
        },
        link.session,
        link.udp,
        tun.clone(),
        tun.clone(),
        // The server may send only to the pod's addresses, never to this
        // machine's LAN or other interfaces through the tunnel.
        Accept::To(installed.addresses.clone()),
    )?;
    installed.board.attach(plane.outbound.clone(), plane.inbound.clone());
    if let Some(started) = started {
        info!(
            "tunnel {} is up, with its addresses, routes and DNS, {} ms after start",
            tun.name(),
            started.elapsed().as_millis()
        );
    }
    let end = loop {
        tokio::select! {
            biased;
            sig = signals.next() => break Served::Signal(sig),
            r = channel::wait_closed(&mut control.stream) => break Served::Lost(match r {
                Ok(channel::Closed::Cleanly) => "the server ended the session (control connection closed)".to_string(),
                Ok(channel::Closed::Abruptly) => format!(
                    "the server at {server} went away without ending the session (connection closed without TLS close_notify)"
                ),
                Err(e) => format!("lost the control connection to {server}: {e:#}"),
            }),
            exit = plane.ended() => break Served::Lost(match exit.result {
                // close_notify: the server ends the session (its TLS close follows).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    "the server ended the session (close_notify on the data plane)".to_string()
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => format!(
                    "nothing heard from the server at {server} for {} s: the network path or the server is gone",
                    crate::tunnel::liveness::SILENCE_LIMIT.as_secs()
                ),
                Ok(()) => format!("the data plane's {} stopped", exit.name),
                Err(e) => format!("the data plane failed: {}: {e}", exit.name),
            }),
            _ = check.tick(), if !path_known => if let Some(limit) = path.both_ways() {
                path_known = true;
                installed.board.update(|r| r.packet_limit = Some(limit));
                fit_tun_to_path(installed, limit, link.tunnel_mtu).await;
            },
            () = watch.changed(SETTLE) => match source_towards(server) {
                Some(now) if now == local => {}
                now => break Served::Lost(format!(
                    "this machine's address towards {server} changed ({local} → {})",
                    now.map_or_else(|| "no route".to_string(), |a| a.to_string())
                )),
            },
        }
    };
    info!(
        "session ends; to server: {}; from server: {}; {} malformed TSO reads",
        plane.outbound.summary(),
        plane.inbound.summary(),
        tun.unsplittable()
    );
    if let Served::Lost(_) = &end {
        // The old session's close_notify goes out from where this machine is
        // now: the server follows its newest authentic record, ends the old
        // session, and frees our slot for the reconnection at once.
        if let Err(e) = udp.repath(server) {
            tracing::debug!("{e:#}");
        }
    }
    // Stopping says close_notify to the server.
    tokio::task::spawn_blocking(move || plane.stop()).await?;
    installed.board.detach();
    if matches!(end, Served::Signal(_)) {
        control.leave().await;
    }
    Ok(end)
}

/// Sets the TUN's MTU to what the path carries both ways (`limit`, probed),
/// never above `most` (what the kernel's path MTU allows) nor, with IPv6 on
/// the TUN, below IPv6's 1280 (TCP's MSS is clamped to `limit` anyway).
async fn fit_tun_to_path(installed: &Installed, limit: usize, most: usize) {
    let floor = if installed.addresses.iter().any(IpAddr::is_ipv6) {
        1280
    } else {
        576
    };
    let mtu = limit.max(floor).min(most);
    let name = installed.tun.name();
    let now: Option<usize> = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()
        .and_then(|t| t.trim().parse().ok());
    if now == Some(mtu) {
        return;
    }
    let set = async {
        let netlink = Netlink::connect()?;
        netlink.set_mtu(installed.tun.index()?, mtu as u32).await
    };
    match set.await {
        Ok(()) => {
            info!("packets over {limit} bytes do not pass both ways (probed): {name} MTU {mtu}, TCP MSS clamped to fit")
        }
        Err(e) => warn!("cannot set {name}'s MTU to {mtu}: {e:#}"),
    }
}

/// The source address this machine would use towards `server` now (`None`:
/// no route).
fn source_towards(server: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if server.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().ok()?;
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(server).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

/// What reconnections carry from one to the next.
struct Repairs {
    /// Where server-external is (it may move with its pod).
    server: SocketAddr,
    backoff: Backoff,
}

/// How a reconnection ended.
enum Reconnected {
    Signal(&'static str),
    GaveUp(String),
    Again(Box<(Control, DataLink)>),
}

/// Waits between reconnection attempts: 100 ms, doubling to 1 s, each drawn
/// between half and all of that (jitter: the clients of a server that came
/// back do not all return in the same instant). Attempts are spaced from
/// their starts, so a slow failure (a connect timing out) is not followed by
/// a long wait too.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// The next wait; `random` is any random number.
    fn next(&mut self, random: u32) -> Duration {
        let full = self.next;
        self.next = (full * 2).min(Self::CAP);
        let fraction = 0.5 + 0.5 * f64::from(random) / f64::from(u32::MAX);
        full.mul_f64(fraction)
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = openssl::rand::rand_bytes(&mut b);
    u32::from_le_bytes(b)
}

/// Reconnects after the session was lost (`lost`: why), with backoff, until
/// it works, a failure that will not change, `--give-up-after`, or a signal.
async fn reconnect(
    config: &ClientConfig,
    cluster: Option<&ClusterView>,
    repairs: &mut Repairs,
    installed: &Installed,
    signals: &mut Signals,
    watch: &mut ChangeWatch,
    lost: &str,
) -> Reconnected {
    let Repairs { server, backoff } = repairs;
    let since = tokio::time::Instant::now();
    let mut gone_since = None;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let began = tokio::time::Instant::now();
        let result = tokio::select! {
            biased;
            sig = signals.next() => return Reconnected::Signal(sig),
            r = attempt_once(config, cluster, server, installed) => r,
        };
        let failure = match result {
            Ok((control, link)) => {
                info!(
                    "reconnected to {} after {} ms (attempt {attempt}); traffic flows again",
                    control.server,
                    since.elapsed().as_millis()
                );
                return Reconnected::Again(Box::new((control, link)));
            }
            Err(f) => f,
        };
        let waited = since.elapsed();
        if failure.pod_gone {
            let gone = *gone_since.get_or_insert_with(tokio::time::Instant::now);
            if gone.elapsed() >= POD_GONE_LIMIT {
                return Reconnected::GaveUp(format!(
                    "{lost}, and server-external's pod has been gone for {} s: {:#}",
                    POD_GONE_LIMIT.as_secs(),
                    failure.error
                ));
            }
        } else {
            gone_since = None;
        }
        if failure.lasting {
            return Reconnected::GaveUp(format!(
                "{lost}, and reconnecting failed in a way that will not change: {:#}",
                failure.error
            ));
        }
        if let Some(limit) = config.give_up_after {
            if waited >= limit {
                return Reconnected::GaveUp(format!(
                    "{lost}, and {attempt} attempts over {} s to reconnect failed (--give-up-after {} s); the last: {:#}",
                    waited.as_secs(),
                    limit.as_secs(),
                    failure.error
                ));
            }
        }
        installed.board.update(|r| {
            if let State::Reconnecting {
                attempt: a, last_error, ..
            } = &mut r.state
            {
                *a = attempt + 1;
                *last_error = Some(format!("{:#}", failure.error));
            }
        });
        // Attempts 1, 2, 4, 8, … are said; the rest are counted.
        if attempt.is_power_of_two() {
            info!("reconnection attempt {attempt} failed: {:#}", failure.error);
        }
        let mut until = began + backoff.next(random_u32());
        if let Some(end) = config.give_up_after.and_then(|limit| since.checked_add(limit)) {
            until = until.min(end);
        }
        tokio::select! {
            biased;
            sig = signals.next() => return Reconnected::Signal(sig),
            () = tokio::time::sleep_until(until) => {}
            // A new address or route may be what was missing: try at once.
            () = watch.changed(SETTLE) => {}
        }
    }
}

/// One attempt: look the server's node up again (with Kubernetes), connect,
/// check the pod's addresses if they changed, and shake hands.
async fn attempt_once(
    config: &ClientConfig,
    cluster: Option<&ClusterView>,
    server: &mut SocketAddr,
    installed: &Installed,
) -> Result<(Control, DataLink), Failure> {
    if let Some((c, pod)) = cluster.and_then(|c| c.pod.as_ref().map(|p| (c, p))) {
        // The API's connection may be as dead as ours was: a bounded wait.
        let looked_up = tokio::time::timeout(RECONNECT_STEP_TIMEOUT, discovery::server_address(&c.kube, pod)).await;
        match looked_up {
            Ok(Ok(ip)) if ip != server.ip() => {
                info!("server-external {pod} now runs on a node reachable at {ip}");
                server.set_ip(ip);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.gone => {
                return Err(Failure {
                    error: e.error,
                    lasting: false,
                    pod_gone: true,
                })
            }
            Ok(Err(e)) if e.lasting => return Err(Failure::lasting(e.error)),
            // The API may be out of reach too; the last address may still work.
            Ok(Err(e)) => warn!("cannot look server-external up again ({:#}); trying {server}", e.error),
            Err(_) => warn!("the Kubernetes API did not answer within {RECONNECT_STEP_TIMEOUT:?}; trying {server}"),
        }
    }
    let mut control = connect_control(config, *server, RECONNECT_TIMEOUT, RECONNECT_STEP_TIMEOUT).await?;
    if control.hello.addresses != installed.addresses {
        let tun = installed.tun.index()?;
        if let Err(why) = check_pod_addresses(&control.hello, Some(tun), config, cluster).await? {
            control.leave().await;
            return Err(Failure::lasting(anyhow!(
                "the server at {server} now announces a pod address this machine must not take on: {why}"
            )));
        }
    }
    // The keys were checked on the control connection a moment ago: a key
    // refusal now is someone on the path, not a lasting answer.
    let link = data_handshake(config, &control)
        .await
        .map_err(|f| Failure { lasting: false, ..f })?;
    Ok((control, link))
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
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
async fn register_dns(hello: &Hello, trusted: &[String], tun: &Tun, changes: &mut Changes) -> Result<status::Dns> {
    let index = tun.index()?;
    let mut pod = resolv_conf::parse(&hello.resolv_conf);
    pod.nameservers.retain(|ns| {
        let ok = crate::proto::control::usable_unicast(*ns);
        if !ok {
            warn!("not using the pod's nameserver {ns}: not a unicast address a cluster's DNS can have");
        }
        ok
    });
    let split = SplitDomains::from_search(&pod.search, trusted);
    for (domain, why) in &split.dropped {
        warn!("not installing the pod's search domain {domain}: {why}");
    }
    if split.zones.is_empty() {
        warn!("the pod's resolv.conf names no cluster domain this machine may send names to: cluster names will not resolve (--cluster-domain=DOMAIN names one)");
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
    Ok(status::Dns {
        manager: manager.via().to_string(),
        domains: split.zones.clone(),
        nameservers: pod.nameservers.iter().map(ToString::to_string).collect(),
    })
}

/// A report's fields for a connection that just came up.
fn connected(r: &mut status::Report, control: &Control, link: &DataLink) {
    let now = status::unix_now();
    r.state = State::Connected { since: now };
    r.server = control.server.to_string();
    r.transport = Some(link.description.clone());
    r.addresses = control.hello.addresses.clone();
    r.last_handshake = Some(now);
    r.path_mtu = Some(link.path_mtu);
    r.tunnel_mtu = Some(link.tunnel_mtu);
    // The new session probes the path again.
    r.packet_limit = None;
}

/// Reads the routes into TUN `index` from the kernel, for `teletun status`.
fn tun_routes(index: u32) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send>> {
    move || {
        Box::pin(async move {
            use rtnetlink::packet_route::route::RouteType;
            let Ok(netlink) = Netlink::connect() else {
                return Vec::new();
            };
            let mut routes = Vec::new();
            for v6 in [false, true] {
                if let Ok(found) = netlink.routes(v6).await {
                    routes.extend(
                        found
                            .into_iter()
                            .filter(|r| {
                                r.oif == Some(index)
                                    && r.table == crate::netconf::netlink::TABLE_MAIN
                                    && r.kind == RouteType::Unicast
                            })
                            .map(|r| r.destination.to_string()),
                    );
                }
            }
            routes
        })
    }
}

/// Addresses that must stay outside the tunnel: the server's and the API's.
fn never_routed(config: &ClientConfig, cluster: Option<&ClusterView>) -> Vec<IpAddr> {
    let mut never = vec![config.server.ip()];
    if let Some(c) = cluster {
        never.extend(c.kube.api_addresses.iter().copied());
    }
    never
}

/// The keeper of the tunnel's routes: the `--route` networks plus the
/// cluster's networks as the API shows them, never one that covers the API
/// server or the tunnel's own endpoint.
fn route_keeper(config: &ClientConfig, cluster: Option<&ClusterView>) -> Result<RouteKeeper> {
    if config.routes.is_empty() && cluster.is_none() {
        warn!("no routes: pass --route CIDR, or -pod with a kubeconfig, to reach the cluster");
    }
    RouteKeeper::new(
        &config.routes,
        never_routed(config, cluster),
        config.allow_conflicting,
        config.allow_public_networks,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_below_each_step() {
        let mut b = Backoff::new();
        let (low, high) = (0, u32::MAX);
        assert_eq!(b.next(high), Duration::from_millis(100));
        assert_eq!(b.next(low), Duration::from_millis(100), "half of 200 ms");
        assert_eq!(b.next(high), Duration::from_millis(400));
        assert_eq!(b.next(high), Duration::from_millis(800));
        for _ in 0..10 {
            let d = b.next(random_u32());
            assert!((Backoff::CAP / 2..=Backoff::CAP).contains(&d), "{d:?}");
        }
    }

    #[test]
    fn the_source_towards_a_server_is_what_the_kernel_picks() {
        assert_eq!(
            source_towards("127.0.0.1:9".parse().unwrap()),
            Some("127.0.0.1".parse().unwrap())
        );
    }
}
