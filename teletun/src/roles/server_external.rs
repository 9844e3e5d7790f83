//! `teletun server-external`: accepts one client at a time over TCP+TLS and
//! UDP+DTLS on the same port, and relays its packets to server-cluster over the
//! AF_UNIX socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::control::admission::{
    Handshake, HandshakeFailures, Handshakes, RateLimiter, Turnaways, TurnedAway, FIRST_BYTES_DEADLINE,
    HANDSHAKE_DEADLINE,
};
use crate::control::channel;
use crate::control::tls::{self, KeyMismatch};
use crate::io::offload::Capabilities;
use crate::io::seqpacket::SeqPacket;
use crate::io::sys::StopSignal;
use crate::io::udp::Udp;
use crate::keys::{Identity, PinnedKey};
use crate::plane::{self, Accept, DataPlane, FrameSplitter, Names};
use crate::proto::control::{
    encode_refusal, Hello, HelloDecoder, ServerGreeting, MAX_ADDRESSES_LEN, MAX_RESOLV_CONF_LEN, REFUSED_BUSY,
    REFUSED_NO_CLUSTER,
};
use crate::proto::link::{AuthMessage, LinkParams};
use crate::roles::link_auth;
use crate::tunnel::{Transport, TunnelError};

/// Everything `teletun server-external` needs, already validated by the CLI.
pub struct ServerExternalConfig {
    /// Address to listen on (TCP and UDP).
    pub listen: SocketAddr,
    /// Our key.
    pub identity: Identity,
    /// The one client key we accept.
    pub client_key: PinnedKey,
    /// server-cluster's AF_UNIX socket.
    pub sockfile: PathBuf,
    /// The pair's link key: server-cluster must prove it holds it before its
    /// greeting is believed.
    pub link_key: Option<crate::keys::LinkKey>,
    /// The only uid server-cluster may run as.
    pub peer_uid: u32,
    /// UDP payload size the data plane assumes for the path to clients.
    pub path_mtu: usize,
    /// The data plane's transport.
    pub transport: Transport,
}

/// server-cluster as last seen: its link and greeting, or nothing.
type ClusterState = Option<(Arc<SeqPacket>, Hello)>;

struct Shared {
    config: ServerExternalConfig,
    /// TLS for clients, made once (a key load per connection would be work
    /// any stranger could make us do).
    tls: tokio_rustls::TlsAcceptor,
    /// Unauthenticated TLS handshakes running now, within their caps.
    handshakes: Handshakes,
    /// Handshakes that failed, said about once a second.
    failures: std::sync::Mutex<HandshakeFailures>,
    /// The clock admission and its reports count time on.
    clock: std::time::Instant,
    udp: Arc<Udp>,
    /// The client being served, if any.
    serving: ClientSlot,
    cluster: watch::Sender<ClusterState>,
}

/// How often a session looks whether it should give its slot away.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How long a new client waits for the slot of a session that is ending: a
/// client restarted at once must not be refused only because the old
/// session's teardown has not run yet.
const SLOT_GRACE: Duration = Duration::from_secs(2);

/// How long a session must have heard nothing from its client before a new
/// connection with the client's key takes its place: two heartbeats. A
/// client that moved (new address, woke from sleep, restarted) reconnects at
/// once, and its old session, silent since, must not keep it out; a second
/// client with the same key while the first is alive is still refused.
const SUPERSEDE_AFTER: Duration = Duration::from_millis(500);

/// The one client slot: who is being served, if anyone, and whether an
/// authenticated client waits for it.
#[derive(Default)]
struct ClientSlot {
    serving: watch::Sender<Option<SocketAddr>>,
    /// Authenticated clients waiting for the slot now.
    waiting: std::sync::atomic::AtomicUsize,
}

/// Counts a claimant as waiting while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ClientSlot {
    fn is_free(&self) -> bool {
        self.serving.borrow().is_none()
    }

    /// Whether an authenticated client waits for the slot.
    fn wanted(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Takes the slot for `peer`, waiting up to `grace` for it to free (a
    /// silent session gives it up, see [`SUPERSEDE_AFTER`]); on refusal
    /// returns the client being served.
    async fn claim(&self, peer: SocketAddr, grace: Duration) -> Result<(), SocketAddr> {
        let mut freed = self.serving.subscribe();
        let deadline = tokio::time::Instant::now() + grace;
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        loop {
            let mut current = None;
            self.serving.send_if_modified(|slot| match *slot {
                None => {
                    *slot = Some(peer);
                    true
                }
                Some(other) => {
                    current = Some(other);
                    false
                }
            });
            let Some(current) = current else { return Ok(()) };
            // The borrow `wait_for` returns ends with this statement.
            let freed_in_time = matches!(
                tokio::time::timeout_at(deadline, freed.wait_for(Option::is_none)).await,
                Ok(Ok(_))
            );
            if !freed_in_time {
                return Err(current);
            }
        }
    }

    fn release(&self) {
        self.serving.send_replace(None);
    }
}

/// Whether a session silent for `silent` gives its slot to a waiting client.
fn superseded(slot: &ClientSlot, silent: Duration) -> bool {
    slot.wanted() && silent >= SUPERSEDE_AFTER
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(config: ServerExternalConfig) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on TCP {}", config.listen))?;
    let udp = Arc::new(Udp::bind(config.listen)?);
    info!(
        "listening on TCP and UDP {}; server-cluster socket {}",
        config.listen,
        config.sockfile.display()
    );
    let (cluster, _) = watch::channel(None);
    let tls = tokio_rustls::TlsAcceptor::from(tls::server_config(&config.identity, config.client_key.clone())?);
    let shared = Arc::new(Shared {
        config,
        tls,
        handshakes: Handshakes::default(),
        failures: std::sync::Mutex::default(),
        clock: std::time::Instant::now(),
        udp,
        serving: ClientSlot::default(),
        cluster,
    });
    tokio::spawn(keep_cluster_connected(shared.clone()));
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let (mut limiter, mut turnaways) = (RateLimiter::default(), Turnaways::default());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Strangers get little before they authenticate: a few
                    // attempts a second per source, and a bounded number of
                    // handshakes at once; the rest are reset at once.
                    let now = shared.clock.elapsed();
                    let permit = if limiter.allow(peer.ip(), now) {
                        shared.handshakes.begin(peer.ip())
                    } else {
                        Err(TurnedAway::OverRate)
                    };
                    let permit = match permit {
                        Ok(p) => p,
                        Err(why) => {
                            // A reset, not a close: no TIME_WAIT left behind
                            // per stranger (thousands a second in a flood),
                            // and no FIN exchange to finish.
                            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                            drop(tcp);
                            if let Some(line) = turnaways.note(why, now) {
                                warn!("{line}");
                            }
                            continue;
                        }
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let failed = match serve(shared.clone(), tcp, peer, permit).await {
                            Ok(()) => return,
                            Err(Failed::BeforeAuthentication(e)) => e,
                            Err(Failed::After(e)) => return warn!("client {peer}: {e:#}"),
                        };
                        let now = shared.clock.elapsed();
                        let line = shared
                            .failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .note(peer, &format!("{failed:#}"), now);
                        if let Some(line) = line {
                            warn!("{line}");
                        }
                    });
                }
                Err(e) => warn!("accept failed: {e}"),
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("stopping");
    Ok(())
}

/// Connects to server-cluster (retrying until it is there), reads its
/// greeting, and reconnects whenever the link is lost.
async fn keep_cluster_connected(shared: Arc<Shared>) {
    // The last failure said, so that each new one is said once.
    let mut announced: Option<String> = None;
    loop {
        if shared.cluster.borrow().is_none() {
            match connect_cluster(shared.clone()).await {
                Ok((link, hello)) => {
                    info!("server-cluster connected: {hello}");
                    announced = None;
                    shared.cluster.send_replace(Some((Arc::new(link), hello)));
                }
                Err(failure) => {
                    let text = failure.to_string();
                    if announced.as_deref() != Some(text.as_str()) {
                        let at = shared.config.sockfile.display();
                        match &failure {
                            LinkFailure::Absent(e) => info!("waiting for server-cluster at {at}: {e:#}"),
                            LinkFailure::Refused(e) => warn!("refused the server-cluster at {at}: {e:#}"),
                        }
                        announced = Some(text);
                    }
                    if matches!(failure, LinkFailure::Refused(_)) {
                        // Another pair's server-cluster: not worth asking 5 times a second.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        } else {
            // Notice a departure even while no client is connected.
            let gone = shared.cluster.borrow().as_ref().is_some_and(|(l, _)| l.peer_closed());
            let idle = shared.serving.is_free();
            if gone && idle {
                warn!("server-cluster went away; waiting for it to come back");
                shared.cluster.send_replace(None);
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why no server-cluster is linked.
#[derive(Debug, thiserror::Error)]
enum LinkFailure {
    /// Not there yet, or gone during its greeting.
    #[error("{0:#}")]
    Absent(anyhow::Error),
    /// There, but not this pair's: another uid, or no proof of the link key.
    #[error("{0:#}")]
    Refused(anyhow::Error),
}

/// Connects to server-cluster, checks who it is (its uid, and with a link
/// key its proof), and reads its two first messages: the greeting, and the
/// link parameters (what its TUN takes).
async fn connect_cluster(shared: Arc<Shared>) -> Result<(SeqPacket, Hello), LinkFailure> {
    tokio::task::spawn_blocking(move || {
        let config = &shared.config;
        let mut link = SeqPacket::connect(&config.sockfile).map_err(|e| LinkFailure::Absent(e.into()))?;
        match link.peer_credentials() {
            Ok((uid, _)) if uid == config.peer_uid => {}
            Ok((uid, pid)) => {
                return Err(LinkFailure::Refused(anyhow!(
                    "it runs as uid {uid} (pid {pid}), but only uid {} may (--peer-uid)",
                    config.peer_uid
                )))
            }
            Err(e) => return Err(LinkFailure::Refused(anyhow!("its credentials are unknown: {e}"))),
        }
        let mut buf = vec![0u8; MAX_ADDRESSES_LEN + MAX_RESOLV_CONF_LEN + 8];
        let absent = |e: anyhow::Error| LinkFailure::Absent(e);
        let mut n = link
            .recv_message(&mut buf, Duration::from_secs(5))
            .context("no greeting from server-cluster")
            .map_err(absent)?;
        if n > 0 && (config.link_key.is_some() || AuthMessage::is_auth(&buf[..n])) {
            link_auth::prove_external(&link, &buf[..n], config.link_key.as_ref()).map_err(LinkFailure::Refused)?;
            n = link
                .recv_message(&mut buf, Duration::from_secs(5))
                .context("no greeting from server-cluster")
                .map_err(absent)?;
        }
        if n == 0 {
            return Err(absent(anyhow!("server-cluster closed the socket before its greeting")));
        }
        let hello = match HelloDecoder::new().feed(&buf[..n]).map_err(|e| absent(e.into()))? {
            Some((ServerGreeting::Hello(h), used)) if used == n => h,
            Some((ServerGreeting::Refused(why), _)) => return Err(absent(anyhow!("server-cluster refused: {why}"))),
            _ => return Err(absent(anyhow!("server-cluster sent a malformed greeting"))),
        };
        let n = link
            .recv_message(&mut buf, Duration::from_secs(5))
            .map_err(|_| absent(crate::proto::link::LinkError::NotLinkParams.into()))?;
        let params = LinkParams::decode(&buf[..n]).map_err(|e| absent(e.into()))?;
        link.set_peer_takes(Capabilities {
            tcp: params.tcp,
            udp: params.udp,
        });
        Ok((link, hello))
    })
    .await
    .unwrap_or_else(|e| Err(LinkFailure::Absent(e.into())))
}

async fn refuse<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, why: &str) -> Result<()> {
    stream.write_all(&encode_refusal(why)).await?;
    stream.shutdown().await?;
    Ok(())
}

/// How a connection ended badly: before the client authenticated (said in
/// aggregate: any stranger can make these), or after (said each time).
enum Failed {
    BeforeAuthentication(anyhow::Error),
    After(anyhow::Error),
}

impl From<anyhow::Error> for Failed {
    fn from(e: anyhow::Error) -> Self {
        Failed::After(e)
    }
}

async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, handshake: Handshake) -> Result<(), Failed> {
    let authenticated = authenticate(&shared, tcp).await;
    // Authenticated or not, this stranger's handshake is over.
    drop(handshake);
    let mut control = authenticated.map_err(Failed::BeforeAuthentication)?;
    shared.handshakes.authenticated(peer.ip());
    serve_authenticated(&shared, &mut control, peer).await?;
    Ok(())
}

/// TLS with the pinned client key, within the deadlines: first bytes within
/// [`FIRST_BYTES_DEADLINE`] (a silent connect gives its place back soon),
/// the whole handshake within [`HANDSHAKE_DEADLINE`].
async fn authenticate(shared: &Shared, tcp: TcpStream) -> Result<tokio_rustls::server::TlsStream<TcpStream>> {
    channel::tune_tcp(&tcp)?;
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(FIRST_BYTES_DEADLINE, tcp.peek(&mut [0u8; 1])).await {
        Err(_) => {
            return Err(anyhow!(
                "sent no ClientHello within {} s",
                FIRST_BYTES_DEADLINE.as_secs()
            ))
        }
        Ok(Ok(0)) => return Err(anyhow!("closed the connection before its ClientHello")),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(anyhow!("connection failed before its ClientHello: {e}")),
    }
    let accepted = tokio::time::timeout_at(started + HANDSHAKE_DEADLINE, shared.tls.accept(tcp)).await;
    match accepted {
        Err(_) => Err(anyhow!("TLS handshake timed out")),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(match tls::key_mismatch(&e) {
            Some(KeyMismatch::PeerKeyNotPinned) => anyhow!(
                "refused: the client's key is not the client public key {}",
                shared.config.client_key.path.display()
            ),
            Some(KeyMismatch::OurKeyRefused) => {
                anyhow!("the client refused our server key: it pins a different server public key")
            }
            None => anyhow!("TLS handshake failed: {e}"),
        }),
    }
}

/// Serves an authenticated client: one at a time.
async fn serve_authenticated(
    shared: &Arc<Shared>,
    control: &mut tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
) -> Result<()> {
    // A client that leaves while it waits stops waiting (it would otherwise
    // count as wanting the slot, and might get it).
    let claimed = tokio::select! {
        r = shared.serving.claim(peer, SLOT_GRACE) => r,
        _ = channel::wait_closed(control) => return Ok(()),
    };
    if let Err(current) = claimed {
        info!("refusing {peer}: already serving {current}");
        return refuse(
            control,
            &format!("{REFUSED_BUSY}this server already serves a client ({current}); it serves one client at a time"),
        )
        .await;
    }
    let result = serve_session(shared, control, peer).await;
    shared.serving.release();
    let _ = control.shutdown().await;
    result
}

async fn serve_session(
    shared: &Arc<Shared>,
    control: &mut tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
) -> Result<()> {
    let Some((cluster, hello)) = shared.cluster.borrow().clone() else {
        return refuse(
            control,
            &format!(
                "{REFUSED_NO_CLUSTER} (socket {}); try again when it runs",
                shared.config.sockfile.display()
            ),
        )
        .await;
    };
    // Stale datagrams of an earlier session must go before the new client's
    // ClientHello can arrive, i.e. before it hears from us; a flood must not
    // hold the runtime, so off it, and for 50 ms at most.
    let udp = shared.udp.clone();
    tokio::task::spawn_blocking(move || udp.drain(Duration::from_millis(50))).await?;
    control.write_all(&hello.encode()?).await?;
    control.flush().await?;
    info!("session for {peer} started: sent {hello}");

    let config = &shared.config;
    let mut hs = config.transport.server(
        crate::tunnel::now(),
        &config.identity,
        config.client_key.clone(),
        config.path_mtu,
        peer.ip(),
        tls::channel_binding(control.get_ref().1)?,
    )?;
    // A client that leaves during the handshake frees the slot at once.
    let stop = Arc::new(StopSignal::new()?);
    let (udp, stop_handshake) = (shared.udp.clone(), stop.clone());
    let mut handshake = tokio::task::spawn_blocking(move || plane::handshake(&udp, hs.as_mut(), Some(&stop_handshake)));
    let shaking_since = std::time::Instant::now();
    let mut check = tokio::time::interval(CHECK_INTERVAL);
    let result = loop {
        tokio::select! {
            done = &mut handshake => break done?,
            _ = channel::wait_closed(control) => {
                stop.stop();
                let _ = handshake.await;
                return Err(anyhow!("the client left before the data-plane handshake finished"));
            }
            _ = check.tick() => if superseded(&shared.serving, shaking_since.elapsed()) {
                stop.stop();
                let _ = handshake.await;
                return Err(anyhow!(
                    "the client connected again before this data-plane handshake finished; serving the new connection"
                ));
            }
        }
    };
    let session = match result {
        Ok(s) => s,
        Err(TunnelError::PeerKeyNotPinned(p)) => {
            return Err(anyhow!("refused the data plane: the client's key is not {p}"))
        }
        Err(e) => return Err(anyhow!("data-plane handshake with {peer} failed: {e}")),
    };
    let udp_peer = session
        .peer
        .ok_or_else(|| anyhow!("the data-plane handshake ended without a peer address"))?;
    info!("{} with {udp_peer}", session.description);
    let mut plane = DataPlane::tunnel(
        Names {
            outbound: "cluster→udp",
            inbound: "udp→cluster",
        },
        session,
        shared.udp.clone(),
        FrameSplitter::new(cluster.clone()),
        cluster.clone(),
        // server-cluster checks what the client may send as the pod.
        Accept::Any,
    )?;
    let started = crate::tunnel::now();
    let reason = loop {
        tokio::select! {
            r = channel::wait_closed(control) => break match r {
                Ok(channel::Closed::Cleanly) => "the client closed the control connection".to_string(),
                Ok(channel::Closed::Abruptly) => "the client vanished without closing the control connection".to_string(),
                Err(e) => format!("control connection failed: {e:#}"),
            },
            exit = plane.ended() => break match exit.result {
                Ok(()) => format!("{} stopped", exit.name),
                Err(e) => format!("{}: {e}", exit.name),
            },
            _ = check.tick() => {
                let now = crate::tunnel::now();
                let silent = plane.inbound.silent_for(now).unwrap_or_else(|| now.saturating_sub(started));
                if superseded(&shared.serving, silent) {
                    break format!(
                        "the client connected again after {} ms of silence here (it moved, slept or restarted); serving the new connection",
                        silent.as_millis()
                    );
                }
            }
        }
    };
    if cluster.peer_closed() {
        // Forget the dead AF_UNIX link so the connector waits for a new one.
        shared.cluster.send_replace(None);
    }
    info!(
        "session for {peer} ended ({reason}); to client: {}; from client: {}",
        plane.outbound.summary(),
        plane.inbound.summary()
    );
    tokio::task::spawn_blocking(move || plane.stop()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_client_is_refused_after_the_grace_while_the_first_is_served() {
        let slot = ClientSlot::default();
        slot.claim(addr(1), SLOT_GRACE).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(slot.claim(addr(2), SLOT_GRACE).await, Err(addr(1)));
        assert_eq!(started.elapsed(), SLOT_GRACE);
        assert!(!slot.is_free());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_gets_a_slot_freed_within_the_grace() {
        let slot = Arc::new(ClientSlot::default());
        slot.claim(addr(1), SLOT_GRACE).await.unwrap();
        let ending = slot.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SLOT_GRACE / 4).await;
            ending.release();
        });
        assert_eq!(slot.claim(addr(2), SLOT_GRACE).await, Ok(()));
        // Now it is the second client's, and a third waits for it.
        assert_eq!(slot.claim(addr(3), Duration::ZERO).await, Err(addr(2)));
        slot.release();
        assert!(slot.is_free());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_session_gives_its_slot_to_a_waiting_client_and_a_live_one_does_not() {
        let slot = Arc::new(ClientSlot::default());
        slot.claim(addr(1), SLOT_GRACE).await.unwrap();
        assert!(!superseded(&slot, Duration::from_secs(60)), "nobody waits");
        let waiting = slot.clone();
        let waiter = tokio::spawn(async move { waiting.claim(addr(2), SLOT_GRACE).await });
        tokio::task::yield_now().await;
        assert!(slot.wanted());
        assert!(
            !superseded(&slot, SUPERSEDE_AFTER / 2),
            "heard from lately: keeps the slot"
        );
        assert!(superseded(&slot, SUPERSEDE_AFTER));
        // The session ends; the waiting client gets the slot and stops waiting.
        slot.release();
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(!slot.wanted());
    }
}
