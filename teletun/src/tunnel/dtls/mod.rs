//! DTLS 1.2: OpenSSL runs the handshake over an in-memory BIO; the records
//! after it are sealed and opened by [`record`] with the handshake's keys.
//!
//! Every IP packet is one record in one datagram, so a packet is never split
//! and reordering or loss can never splice two packets together. Both sides
//! present a self-signed certificate and accept only the pinned peer key. The
//! server answers a ClientHello with a HelloVerifyRequest (cookie, over the
//! client's address and port) before it does any other work, statelessly
//! ([`hello`]).

pub mod hello;
pub mod record;

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use foreign_types::ForeignTypeRef;
use openssl::hash::MessageDigest;
use openssl::memcmp;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;

use self::record::{content, Dropped, Opener, Record, Sealer, SessionKeys, Suite, OVERHEAD, PREFIX_LEN, TAG_LEN};
use super::liveness::{Due, Liveness};
use super::pmtu::{self, PathState, Prober};
use super::validation::{self, PathValidation};
use super::{ChannelBinding, Decapsulated, Encapsulated, Handshake, Inbound, Outbound, Session, Time, TunnelError};
use crate::io::batch::{PacketBatch, PacketRef, PacketRefs};
use crate::keys::{Identity, PinnedKey};

/// Bytes DTLS adds to each packet: record header, explicit nonce and tag.
pub const DTLS_OVERHEAD: usize = OVERHEAD;
const CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384";

/// How long a handshake may take before we give up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A heartbeat: a record with this one byte, never a valid IP packet (a
/// TeleTUN extension; a seed peer would just drop it as malformed).
pub const HEARTBEAT: &[u8] = &[0];

/// The close_notify alert: warning level, description 0.
const CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// Handshake datagrams are at most a path MTU; room for a jumbo one.
const HANDSHAKE_DATAGRAM: usize = 16384;

/// The in-memory BIO: at most one inbound datagram, a batch of outbound ones.
struct DatagramQueue {
    inbound: Vec<u8>,
    inbound_ready: bool,
    outbound: PacketBatch,
}

impl Read for DatagramQueue {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !std::mem::take(&mut self.inbound_ready) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // A datagram larger than OpenSSL's buffer is cut, as a UDP socket would.
        let n = self.inbound.len().min(buf.len());
        buf[..n].copy_from_slice(&self.inbound[..n]);
        Ok(n)
    }
}

impl Write for DatagramQueue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.outbound.push(buf) {
            Ok(buf.len())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DatagramQueue {
    fn new() -> Self {
        DatagramQueue {
            inbound: Vec::with_capacity(HANDSHAKE_DATAGRAM),
            inbound_ready: false,
            outbound: PacketBatch::with_capacity(16, HANDSHAKE_DATAGRAM),
        }
    }

    /// Moves what OpenSSL wrote into `out` (what does not fit is lost, as
    /// on a full socket; OpenSSL retransmits).
    fn drain_into(&mut self, out: &mut PacketBatch) {
        for p in self.outbound.iter() {
            if !out.push(p) {
                break;
            }
        }
        self.outbound.clear();
    }

    fn put(&mut self, datagram: &[u8]) {
        self.inbound.clear();
        self.inbound.extend_from_slice(datagram);
        self.inbound_ready = true;
    }
}

/// Which side of the handshake we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends the ClientHello.
    Client,
    /// Answers with a cookie, then the handshake.
    Server,
}

/// Datagrams for others than the bound client (HelloVerifyRequests, a
/// refused stranger's alert) kept between two sends: a sprayer gets no more.
const MAX_ADDRESSED: usize = 16;

/// Per-handshake secret for DTLS cookies: HMAC(secret, peer address and port).
struct CookieSecret([u8; 32]);

fn cookie_for(secret: &CookieSecret, peer: &[u8], out: &mut [u8]) -> Result<usize, openssl::error::ErrorStack> {
    let key = PKey::hmac(&secret.0)?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key)?;
    signer.update(peer)?;
    let mac = signer.sign_to_vec()?;
    let n = mac.len().min(out.len());
    out[..n].copy_from_slice(&mac[..n]);
    Ok(n)
}

/// What a client proves with its cookie: that it holds the control
/// channel's binding. A MAC over the cookie (so over its address and port),
/// truncated to [`hello::PROOF_LEN`].
fn proof_for(binding: &ChannelBinding, cookie: &[u8]) -> Option<[u8; hello::PROOF_LEN]> {
    let key = PKey::hmac(&binding.0).ok()?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key).ok()?;
    signer.update(b"teletun dtls hello proof").ok()?;
    signer.update(cookie).ok()?;
    let mac = signer.sign_to_vec().ok()?;
    mac.get(..hello::PROOF_LEN)?.try_into().ok()
}

/// What a server's cookies are made from: the client's address and port.
fn cookie_subject(peer: SocketAddr) -> Vec<u8> {
    peer.to_string().into_bytes()
}

/// A server's cookie secret, and the address its OpenSSL callbacks check
/// the cookie against (set when a ClientHello binds the handshake).
struct Cookies {
    secret: CookieSecret,
    subject: std::sync::Mutex<Vec<u8>>,
}

impl Cookies {
    fn new() -> Result<Self> {
        let mut secret = [0u8; 32];
        openssl::rand::rand_bytes(&mut secret)?;
        Ok(Cookies {
            secret: CookieSecret(secret),
            subject: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn subject(&self) -> Vec<u8> {
        self.subject.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The cookie for `peer` into `out`; its length.
    fn for_peer(&self, peer: SocketAddr, out: &mut [u8]) -> Option<usize> {
        cookie_for(&self.secret, &cookie_subject(peer), out).ok()
    }
}

fn context(role: Role, identity: &Identity, cookies: Option<Arc<Cookies>>) -> Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_certificate(&identity.cert)?;
    b.set_private_key(&identity.key)?;
    b.check_private_key()?;
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_RENEGOTIATION);
    if let (Role::Server, Some(cookies)) = (role, cookies) {
        b.set_options(SslOptions::COOKIE_EXCHANGE);
        let c = cookies.clone();
        b.set_cookie_generate_cb(move |_, out| cookie_for(&c.secret, &c.subject(), out));
        b.set_cookie_verify_cb(move |_, cookie| {
            let mut expected = [0u8; 64];
            match cookie_for(&cookies.secret, &cookies.subject(), &mut expected) {
                Ok(n) => n == cookie.len() && memcmp::eq(&expected[..n], cookie),
                Err(_) => false,
            }
        });
    }
    Ok(b.build())
}

// OpenSSL's DTLS timer controls (macros over SSL_ctrl in ssl.h) and its
// retransmission timer callback, which openssl-sys does not bind.
const DTLS_CTRL_GET_TIMEOUT: libc::c_int = 73;
const DTLS_CTRL_HANDLE_TIMEOUT: libc::c_int = 74;
type DtlsTimerCb = unsafe extern "C" fn(*mut openssl_sys::SSL, libc::c_uint) -> libc::c_uint;
extern "C" {
    fn DTLS_set_timer_cb(s: *mut openssl_sys::SSL, cb: Option<DtlsTimerCb>);
}

/// The first handshake retransmission after this long, doubling to
/// [`RETRANSMIT_MAX`] (OpenSSL's default starts at 1 s: too slow for a lost
/// datagram on a LAN, and the whole handshake has [`HANDSHAKE_TIMEOUT`]).
const RETRANSMIT_FIRST: Duration = Duration::from_millis(100);
const RETRANSMIT_MAX: Duration = Duration::from_millis(1600);

unsafe extern "C" fn retransmit_timer(_ssl: *mut openssl_sys::SSL, previous_us: libc::c_uint) -> libc::c_uint {
    let first = RETRANSMIT_FIRST.as_micros() as libc::c_uint;
    let max = RETRANSMIT_MAX.as_micros() as libc::c_uint;
    if previous_us == 0 {
        first
    } else {
        previous_us.saturating_mul(2).min(max)
    }
}

/// A fresh OpenSSL state for one handshake: pinned-key verification, the
/// path's MTU, our retransmission timer.
fn open_stream(
    ctx: &SslContext,
    role: Role,
    pin: PinnedKey,
    flag: Arc<AtomicBool>,
    mtu: usize,
) -> Result<SslStream<DatagramQueue>> {
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        move |_, store| {
            // Self-signed on purpose: ignore the chain verdict and check the pin.
            let ok = store.error_depth() != 0
                || store
                    .current_cert()
                    .and_then(|c| c.to_der().ok())
                    .is_some_and(|der| pin.matches_cert_der(&der));
            if ok {
                store.set_error(X509VerifyResult::OK);
            } else {
                // X509_V_ERR_CERT_REJECTED: the peer gets a bad_certificate alert.
                // SAFETY: 28 is X509_V_ERR_CERT_REJECTED, a valid verify result code.
                store.set_error(unsafe { X509VerifyResult::from_raw(28) });
                flag.store(true, Ordering::Relaxed);
            }
            ok
        },
    );
    ssl.set_mtu(mtu as u32)?;
    // SAFETY: the SSL object is live; the callback is a plain function.
    unsafe { DTLS_set_timer_cb(ssl.as_ptr(), Some(retransmit_timer)) };
    match role {
        Role::Client => ssl.set_connect_state(),
        Role::Server => ssl.set_accept_state(),
    }
    Ok(SslStream::new(ssl, DatagramQueue::new())?)
}

/// A DTLS handshake in progress, client or server side.
pub struct DtlsHandshake {
    /// OpenSSL's state; it moves into the inbound half once established.
    stream: Option<SslStream<DatagramQueue>>,
    /// Datagrams OpenSSL wrote, waiting for [`Handshake::poll_transmit`].
    pending: PacketBatch,
    role: Role,
    peer_rejected: Arc<AtomicBool>,
    pin_path: PathBuf,
    /// The largest UDP payload the path carries.
    mtu: usize,
    /// Server: the only IP a client may handshake from.
    expected_ip: Option<IpAddr>,
    /// Server: the client's address, fixed by the ClientHello that returned
    /// its cookie.
    bound: Option<SocketAddr>,
    /// Server: whether that ClientHello carried a valid proof (then no other
    /// address without one can take its place).
    proven: bool,
    /// The control channel's binding: the client proves with it, the server checks.
    binding: ChannelBinding,
    /// What a fresh OpenSSL state is made from (a server restarts when a
    /// proven client displaces an unproven one).
    ctx: SslContext,
    pin: PinnedKey,
    /// Server: the cookie secret and the address cookies are checked for.
    cookies: Option<Arc<Cookies>>,
    /// Server: datagrams each for its own address (HelloVerifyRequests to
    /// where their ClientHellos came from, a refused stranger's alert).
    addressed: Vec<(SocketAddr, Vec<u8>)>,
    deadline: Time,
    /// The latest time we were told.
    last_seen: Time,
    outcome: Option<Result<Session, TunnelError>>,
    /// Tests: keep OpenSSL's finished session instead of making a [`Session`].
    #[cfg(test)]
    keep_openssl: Option<Option<SslStream<DatagramQueue>>>,
}

impl DtlsHandshake {
    /// Starts a client handshake; its ClientHello is ready at once in
    /// [`Handshake::poll_transmit`]. `mtu` is the largest UDP payload the path carries.
    /// Its ClientHello that returns the server's cookie carries a proof made
    /// with `binding`.
    pub fn client(now: Time, identity: &Identity, pin: PinnedKey, mtu: usize, binding: ChannelBinding) -> Result<Self> {
        let mut hs = Self::new(now, Role::Client, identity, pin, mtu, None, binding)?;
        hs.advance(now);
        Ok(hs)
    }

    /// Waits for a client at `peer`'s IP (its UDP port is not known yet: the
    /// ClientHello that returns its cookie binds it, and one that also
    /// carries a proof made with `binding` wins over any that does not).
    pub fn server(
        now: Time,
        identity: &Identity,
        pin: PinnedKey,
        mtu: usize,
        peer: IpAddr,
        binding: ChannelBinding,
    ) -> Result<Self> {
        Self::new(now, Role::Server, identity, pin, mtu, Some(peer), binding)
    }

    fn new(
        now: Time,
        role: Role,
        identity: &Identity,
        pin: PinnedKey,
        mtu: usize,
        expected_ip: Option<IpAddr>,
        binding: ChannelBinding,
    ) -> Result<Self> {
        let cookies = match role {
            Role::Server => Some(Arc::new(Cookies::new()?)),
            Role::Client => None,
        };
        let ctx = context(role, identity, cookies.clone()).context("cannot set up DTLS")?;
        let peer_rejected = Arc::new(AtomicBool::new(false));
        Ok(DtlsHandshake {
            stream: Some(open_stream(&ctx, role, pin.clone(), peer_rejected.clone(), mtu)?),
            pending: PacketBatch::with_capacity(16, HANDSHAKE_DATAGRAM),
            role,
            peer_rejected,
            pin_path: pin.path.clone(),
            mtu,
            expected_ip,
            bound: None,
            proven: false,
            binding,
            ctx,
            pin,
            cookies,
            addressed: Vec::new(),
            deadline: now + HANDSHAKE_TIMEOUT,
            last_seen: now,
            outcome: None,
            #[cfg(test)]
            keep_openssl: None,
        })
    }

    fn classify(&self, e: &openssl::ssl::Error) -> TunnelError {
        if self.peer_rejected.load(Ordering::Relaxed) {
            return TunnelError::PeerKeyNotPinned(self.pin_path.display().to_string());
        }
        if e.code() == ErrorCode::ZERO_RETURN {
            return TunnelError::Closed;
        }
        let text = e.to_string();
        // Alerts our peer sends when its pin check fails.
        if text.contains("alert bad certificate") {
            return TunnelError::OurKeyRefused;
        }
        TunnelError::Failed(format!("DTLS failed: {text}"))
    }

    /// Server: a ClientHello from `from`, at the client's IP. One without
    /// the cookie for its address gets a HelloVerifyRequest and leaves no
    /// state. One with it goes on to OpenSSL if it comes from the bound
    /// address; otherwise it binds the handshake to its address if it carries
    /// a valid proof (displacing a binding without one: a host behind the
    /// client's NAT running a real DTLS client holds nothing), or if nobody
    /// holds the handshake yet (a client without proofs, as the seed's).
    /// Returns the hello for OpenSSL: the one its client's OpenSSL made,
    /// without the proof.
    fn admit_hello(&mut self, now: Time, from: SocketAddr, hello: &hello::ClientHello<'_>) -> Option<Vec<u8>> {
        let cookies = self.cookies.clone()?;
        let mut cookie = [0u8; 64];
        let n = cookies.for_peer(from, &mut cookie)?;
        let cookie = &cookie[..n];
        if hello.cookie().len() != n || !memcmp::eq(hello.cookie(), cookie) {
            // A first ClientHello, a stale cookie, or someone else's: at
            // most a few answers are kept between sends.
            if self.addressed.len() < MAX_ADDRESSED {
                let mut request = Vec::with_capacity(64);
                hello::hello_verify_request(hello.record_seq, cookie, &mut request);
                self.addressed.push((from, request));
            }
            return None;
        }
        let proven = match (hello.proof(), proof_for(&self.binding, cookie)) {
            (Some(got), Some(expected)) => memcmp::eq(got, &expected),
            _ => false,
        };
        let mut plain = Vec::with_capacity(hello.bytes().len());
        if hello.without_proof(&mut plain).is_none() {
            plain.extend_from_slice(hello.bytes());
        }
        if self.bound == Some(from) {
            self.proven |= proven;
            return Some(plain);
        }
        if !proven && self.bound.is_some() {
            return None;
        }
        if self.bound.is_some() {
            self.restart()?;
        }
        self.bind(now, from, &plain)?;
        self.proven = proven;
        Some(plain)
    }

    /// Binds the handshake to `from`, whose ClientHello `second` returned
    /// its cookie: OpenSSL is shown the first ClientHello it answers (and
    /// its reply to that is discarded: it went out already, as ours).
    fn bind(&mut self, now: Time, from: SocketAddr, second: &[u8]) -> Option<()> {
        let mut first = Vec::with_capacity(second.len());
        hello::parse(second)?.first(&mut first)?;
        if let Ok(mut subject) = self.cookies.as_ref()?.subject.lock() {
            *subject = cookie_subject(from);
        }
        self.bound = Some(from);
        self.addressed.clear();
        self.stream.as_mut()?.get_mut().put(&first);
        self.advance(now);
        self.pending.clear();
        self.stream.as_mut()?.get_mut().inbound_ready = false;
        Some(())
    }

    /// Server: forgets the binding and starts OpenSSL afresh (the deadline
    /// stays). `None` if a fresh state cannot be made: then that is the outcome.
    fn restart(&mut self) -> Option<()> {
        self.peer_rejected.store(false, Ordering::Relaxed);
        match open_stream(
            &self.ctx,
            self.role,
            self.pin.clone(),
            self.peer_rejected.clone(),
            self.mtu,
        ) {
            Ok(stream) => self.stream = Some(stream),
            Err(e) => {
                self.stream = None;
                self.outcome = Some(Err(TunnelError::Failed(format!("cannot set up DTLS: {e:#}"))));
                return None;
            }
        }
        self.pending.clear();
        self.bound = None;
        self.proven = false;
        Some(())
    }

    /// Client: `datagram` with a proof added, into `out`, if it is a
    /// ClientHello returning a cookie.
    fn proven_hello(&self, datagram: &[u8], out: &mut Vec<u8>) -> Option<()> {
        if self.role != Role::Client {
            return None;
        }
        let hello = hello::parse(datagram)?;
        if hello.cookie().is_empty() {
            return None;
        }
        hello.with_proof(&proof_for(&self.binding, hello.cookie())?, out)
    }

    /// Runs the handshake as far as it goes with what OpenSSL has, and keeps
    /// what it wrote for [`Handshake::poll_transmit`].
    fn advance(&mut self, now: Time) {
        let Some(stream) = self.stream.as_mut() else { return };
        let result = stream.do_handshake();
        stream.get_mut().drain_into(&mut self.pending);
        match result {
            Ok(()) => {
                let stream = self.stream.take().expect("checked above");
                #[cfg(test)]
                if let Some(kept) = self.keep_openssl.as_mut() {
                    *kept = Some(stream);
                    return;
                }
                self.outcome = Some(self.established(now, stream));
            }
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {}
            // A handshake nobody proved is no verdict on the client's: its
            // peer gets OpenSSL's alert, and the server waits on.
            Err(_) if self.role == Role::Server && !self.proven && self.bound.is_some() => {
                if let Some(to) = self.bound {
                    for p in self
                        .pending
                        .iter()
                        .take(MAX_ADDRESSED.saturating_sub(self.addressed.len()))
                    {
                        self.addressed.push((to, p.to_vec()));
                    }
                }
                let _ = self.restart();
            }
            Err(e) => {
                self.outcome = Some(Err(self.classify(&e)));
                self.stream = None;
            }
        }
    }

    /// The keys of the finished handshake, split into the two halves.
    fn established(&mut self, now: Time, stream: SslStream<DatagramQueue>) -> Result<Session, TunnelError> {
        let ssl = stream.ssl();
        let cipher = ssl.current_cipher().map(|c| c.name()).unwrap_or("none");
        let suite = Suite::from_openssl_name(cipher)
            .ok_or_else(|| TunnelError::Failed(format!("DTLS negotiated an unexpected cipher {cipher}")))?;
        let mut master = [0u8; 48];
        let master_len = ssl.session().map_or(0, |s| s.master_key(&mut master));
        let (mut client_random, mut server_random) = ([0u8; 32], [0u8; 32]);
        let randoms = (
            ssl.client_random(&mut client_random),
            ssl.server_random(&mut server_random),
        );
        if master_len != 48 || randoms != (32, 32) {
            return Err(TunnelError::Failed("DTLS finished without session secrets".into()));
        }
        let keys = SessionKeys::derive(suite, &master, &client_random, &server_random);
        master.fill(0);
        let (sealer, opener) = keys.split(self.role == Role::Client);
        let liveness = Arc::new(Liveness::standard(now));
        let max_packet = self.mtu - OVERHEAD;
        let path = Arc::new(PathState::new(max_packet));
        let validation = Arc::new(PathValidation::default());
        Ok(Session {
            outbound: Box::new(DtlsOutbound {
                sealer,
                liveness: liveness.clone(),
                max_packet,
                prober: Prober::new(now, max_packet),
                path: path.clone(),
                validation: validation.clone(),
                last_challenge: None,
            }),
            // OpenSSL stays for the rest of the session to answer a
            // retransmitted final flight.
            inbound: Box::new(DtlsInbound {
                opener,
                stream,
                liveness,
                peer: self.bound,
                // The handshake's address answered a cookie: validated.
                validated_peer: self.bound,
                validation,
                returning: false,
                path: path.clone(),
            }),
            peer: self.bound,
            description: format!("DTLS 1.2 {cipher}"),
            path,
        })
    }
}

impl Handshake for DtlsHandshake {
    fn handle_datagram(&mut self, now: Time, from: Option<SocketAddr>, datagram: &[u8]) {
        self.last_seen = self.last_seen.max(now);
        if self.stream.is_none() {
            return;
        }
        let admitted;
        let mut datagram = datagram;
        if self.role == Role::Server {
            let Some(from) = from else { return };
            if Some(from.ip()) != self.expected_ip {
                return;
            }
            if let Some(hello) = hello::parse(datagram) {
                let Some(plain) = self.admit_hello(now, from, &hello) else {
                    return;
                };
                admitted = plain;
                datagram = &admitted;
            } else if self.bound != Some(from) {
                return;
            }
        }
        let Some(stream) = self.stream.as_mut() else { return };
        stream.get_mut().put(datagram);
        self.advance(now);
        // Whatever OpenSSL did not read of the datagram is discarded.
        if let Some(s) = self.stream.as_mut() {
            s.get_mut().inbound_ready = false;
        }
    }

    fn poll_transmit(&mut self, out: &mut PacketBatch) -> Option<SocketAddr> {
        // Each HelloVerifyRequest to its own address, one per call.
        if let Some((to, request)) = self.addressed.pop() {
            out.push(&request);
            return Some(to);
        }
        let mut proven = Vec::new();
        for p in self.pending.iter() {
            let p = match self.proven_hello(p, &mut proven) {
                Some(()) => &proven[..],
                None => p,
            };
            if !out.push(p) {
                break;
            }
        }
        self.pending.clear();
        if self.role == Role::Server {
            self.bound
        } else {
            None
        }
    }

    fn poll_timeout(&self) -> Time {
        // OpenSSL's retransmission timer runs on its own clock; ask it what
        // is left, and look again at least every 100 ms.
        let mut left = Duration::from_millis(100);
        if let Some(stream) = &self.stream {
            let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
            // SAFETY: DTLS_CTRL_GET_TIMEOUT writes one timeval into a live one.
            let running = unsafe {
                openssl_sys::SSL_ctrl(
                    stream.ssl().as_ptr(),
                    DTLS_CTRL_GET_TIMEOUT,
                    0,
                    (&mut tv as *mut libc::timeval).cast(),
                )
            };
            if running > 0 {
                left = left.min(Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000));
            }
        }
        self.deadline.min(self.last_seen + left)
    }

    fn handle_timeout(&mut self, now: Time) {
        self.last_seen = self.last_seen.max(now);
        let Some(stream) = self.stream.as_mut() else { return };
        if now >= self.deadline {
            self.stream = None;
            self.outcome = Some(Err(TunnelError::HandshakeTimeout(HANDSHAKE_TIMEOUT)));
            return;
        }
        // SAFETY: DTLS_CTRL_HANDLE_TIMEOUT takes no argument.
        unsafe { openssl_sys::SSL_ctrl(stream.ssl().as_ptr(), DTLS_CTRL_HANDLE_TIMEOUT, 0, std::ptr::null_mut()) };
        stream.get_mut().drain_into(&mut self.pending);
    }

    fn outcome(&mut self) -> Option<Result<Session, TunnelError>> {
        self.outcome.take()
    }
}

/// The sending half: seals packets into records, keeps the timers.
struct DtlsOutbound {
    sealer: Sealer,
    liveness: Arc<Liveness>,
    /// The largest packet sent: the local path's, then what the probes found.
    max_packet: usize,
    prober: Prober,
    path: Arc<PathState>,
    /// Whether the peer's address is validated, and what it may be sent if not.
    validation: Arc<PathValidation>,
    /// When the last challenge went out.
    last_challenge: Option<Time>,
}

impl DtlsOutbound {
    fn seal_at(&mut self, content: u8, batch: &mut PacketBatch, i: usize) -> Result<bool, TunnelError> {
        self.seal_within(content, batch, i, self.max_packet)
    }

    /// Seals record `i` if it is at most `limit` bytes.
    fn seal_within(
        &mut self,
        content: u8,
        batch: &mut PacketBatch,
        i: usize,
        limit: usize,
    ) -> Result<bool, TunnelError> {
        let (buf, start, len) = batch.buffer_mut(i);
        if len == 0 || len > limit || start < PREFIX_LEN || start + len + TAG_LEN > buf.len() {
            return Ok(false);
        }
        let at = start - PREFIX_LEN;
        let n = self
            .sealer
            .seal(content, &mut buf[at..], len)
            .map_err(|e| TunnelError::Failed(e.to_string()))?;
        batch.set_bounds(i, at, n);
        Ok(true)
    }
}

impl DtlsOutbound {
    /// Appends a sealed record with `plaintext`; whether it went in.
    fn push_record(&mut self, out: &mut PacketBatch, plaintext: &[u8]) -> Result<bool, TunnelError> {
        if !out.push_at(PREFIX_LEN, plaintext) {
            return Ok(false);
        }
        let i = out.len() - 1;
        self.seal_within(content::APPLICATION_DATA, out, i, usize::MAX)
    }
}

impl Outbound for DtlsOutbound {
    fn headroom(&self) -> usize {
        PREFIX_LEN
    }

    fn tailroom(&self) -> usize {
        TAG_LEN
    }

    fn max_packet(&self) -> usize {
        self.max_packet
    }

    fn encapsulate(&mut self, now: Time, batch: &mut PacketBatch) -> Result<Encapsulated, TunnelError> {
        let mut done = Encapsulated::default();
        let mut keep = [true; crate::io::batch::BATCH_SIZE];
        // One load per batch while the address is validated (always, but after a move).
        let limited = self.validation.is_limited();
        for (i, keep) in keep.iter_mut().enumerate().take(batch.len()) {
            if !self.seal_at(content::APPLICATION_DATA, batch, i)? {
                *keep = false;
                done.oversize += 1;
            } else if limited && !self.validation.spend(batch.get(i).len()) {
                *keep = false;
                done.unvalidated += 1;
            } else {
                done.sealed += 1;
            }
        }
        if done.oversize + done.unvalidated > 0 {
            let mut i = 0;
            batch.retain(|_, _| {
                i += 1;
                keep[i - 1]
            });
        }
        if done.sealed > 0 {
            self.liveness.sent(now);
        }
        Ok(done)
    }

    fn poll_timeout(&self) -> Time {
        if self.validation.has_work() {
            // A challenge or a response: now, not at the next heartbeat.
            return Time::ZERO;
        }
        let mut due = self.liveness.poll_timeout();
        if let Some(p) = self.prober.poll_timeout() {
            due = due.min(p);
        }
        // An unanswered challenge is sent again on time, busy or not.
        if let (true, Some(last)) = (self.validation.is_limited(), self.last_challenge) {
            due = due.min(last + validation::RECHALLENGE_AFTER);
        }
        due
    }

    fn handle_timeout(&mut self, now: Time, out: &mut PacketBatch) -> Result<(), TunnelError> {
        let mut sent = false;
        // The peer's challenge answered, ours (re)sent to its new address.
        if let Some(token) = self.validation.take_owed() {
            sent |= self.push_record(out, &validation::record(validation::RESPONSE, token))?;
        }
        if let Some(token) = self.validation.challenge(now, &mut self.last_challenge) {
            sent |= self.push_record(out, &validation::record(validation::CHALLENGE, token))?;
        }
        // What of the peer's probes reached us, the largest (it cannot wait for a heartbeat).
        if let Some(size) = self.path.take_report() {
            let size = u16::try_from(size).unwrap_or(u16::MAX).to_be_bytes();
            sent |= self.push_record(out, &[pmtu::REPORT, size[0], size[1]])?;
        }
        // A round of probes, smallest first, each padded to its size; those
        // that do not fit `out` are left out of this round.
        for size in self.prober.probes_due(now) {
            let Some(buf) = out.next_free() else { break };
            let Some(room) = buf.get_mut(PREFIX_LEN..PREFIX_LEN + size) else {
                continue;
            };
            room.fill(0);
            room[0] = pmtu::PROBE;
            out.commit(PREFIX_LEN, size, None);
            let i = out.len() - 1;
            // Probes may exceed what we send today: that is what they are for.
            sent |= self.seal_within(content::APPLICATION_DATA, out, i, usize::MAX)?;
        }
        if let Some(limit) = self.prober.settle(now, &self.path) {
            if limit < self.max_packet {
                tracing::info!(
                    "packets over {limit} bytes do not reach the peer (the path's limit, probed); sending none larger"
                );
            }
            self.max_packet = self.max_packet.min(limit);
        }
        match self.liveness.due(now) {
            Due::Silent(d) => return Err(TunnelError::Silent(d)),
            Due::Heartbeat if !sent => sent = self.push_record(out, HEARTBEAT)?,
            Due::Heartbeat | Due::Nothing => {}
        }
        if sent {
            self.liveness.sent(now);
        }
        Ok(())
    }

    fn close(&mut self, out: &mut PacketBatch) {
        if out.push_at(PREFIX_LEN, &CLOSE_NOTIFY) {
            let i = out.len() - 1;
            let _ = self.seal_at(content::ALERT, out, i);
        }
    }
}

/// The receiving half: opens records; hands handshake records to OpenSSL.
struct DtlsInbound {
    /// Probes and reports of the path's size go here.
    path: Arc<PathState>,
    opener: Opener,
    stream: SslStream<DatagramQueue>,
    liveness: Arc<Liveness>,
    /// Server: where the client's records come from now.
    peer: Option<SocketAddr>,
    /// Server: the last of the client's addresses proven to be its own (by
    /// the cookie exchange, or by answering a challenge).
    validated_peer: Option<SocketAddr>,
    validation: Arc<PathValidation>,
    /// The last move was back to `validated_peer`.
    returning: bool,
}

impl DtlsInbound {
    /// Lets OpenSSL answer a handshake record (a retransmitted final flight).
    fn pass_to_openssl(&mut self, record: &[u8], reply: &mut PacketBatch) {
        self.stream.get_mut().put(record);
        let mut scratch = [0u8; 64];
        // Application data never goes this way; a retransmitted Finished makes
        // OpenSSL resend its last flight. Errors here are a forger's, not the peer's.
        let _ = self.stream.ssl_read(&mut scratch);
        let q = self.stream.get_mut();
        q.inbound_ready = false;
        q.drain_into(reply);
    }
}

impl Inbound for DtlsInbound {
    fn moved_back(&mut self) {
        if std::mem::take(&mut self.returning) {
            self.validation.returned();
        }
    }

    fn decapsulate(
        &mut self,
        now: Time,
        batch: &mut PacketBatch,
        packets: &mut PacketRefs,
        reply: &mut PacketBatch,
    ) -> Result<Decapsulated, TunnelError> {
        let mut done = Decapsulated::default();
        let mut alive = false;
        for i in 0..batch.len() {
            let from = batch.peer(i);
            let mut from_peer = self.peer.is_none() || from == self.peer;
            let stride = batch.stride(i);
            let (buf, start, len) = batch.buffer_mut(i);
            let stride = if stride == 0 { len } else { stride };
            let mut at = start;
            while at < start + len {
                let datagram_end = (at + stride).min(start + len);
                // Records within one datagram, one after the other.
                let mut r = at;
                while r < datagram_end {
                    let (result, used) = self.opener.open(&mut buf[r..datagram_end]);
                    match result {
                        Ok(Record::Opened {
                            content,
                            plaintext,
                            newest,
                        }) => {
                            alive = true;
                            if newest && !from_peer {
                                self.peer = from;
                                done.peer_moved = from;
                                from_peer = true;
                                // Back to a proven address: lifted in `moved_back`,
                                // after the sender's address has moved.
                                self.returning = from == self.validated_peer;
                                if !self.returning {
                                    self.validation.moved(used);
                                }
                            } else if from_peer && self.validation.is_limited() {
                                self.validation.earned(used);
                            }
                            let body = &buf[r + plaintext.start..r + plaintext.end];
                            match content {
                                content::APPLICATION_DATA if body == HEARTBEAT => {}
                                content::APPLICATION_DATA if body.first() == Some(&validation::CHALLENGE) => {
                                    if let Some(token) = validation::token_of(validation::CHALLENGE, body) {
                                        self.validation.owe(token);
                                    }
                                }
                                content::APPLICATION_DATA if body.first() == Some(&validation::RESPONSE) => {
                                    let answered = validation::token_of(validation::RESPONSE, body)
                                        .is_some_and(|t| from == self.peer && self.validation.answered(t));
                                    if answered {
                                        self.validated_peer = self.peer;
                                    }
                                }
                                content::APPLICATION_DATA if body.first() == Some(&pmtu::PROBE) => {
                                    self.path.probe_arrived(body.len());
                                }
                                content::APPLICATION_DATA if body.first() == Some(&pmtu::REPORT) => {
                                    if let [_, hi, lo] = *body {
                                        self.path.peer_reported(usize::from(u16::from_be_bytes([hi, lo])));
                                    }
                                }
                                content::APPLICATION_DATA => {
                                    packets.push(PacketRef {
                                        buffer: i as u16,
                                        start: (r + plaintext.start) as u32,
                                        len: plaintext.len() as u32,
                                    });
                                    done.packets += 1;
                                }
                                _ if body == CLOSE_NOTIFY => return Err(TunnelError::Closed),
                                _ if body.first() == Some(&2) => {
                                    let what = body.get(1).copied().unwrap_or(0);
                                    return Err(TunnelError::Failed(format!("the peer sent fatal alert {what}")));
                                }
                                _ => {}
                            }
                        }
                        Ok(Record::Handshake(range)) => {
                            if from_peer {
                                self.pass_to_openssl(&buf[r + range.start..r + range.end], reply);
                            } else {
                                done.dropped += 1;
                            }
                        }
                        Err(Dropped::Malformed | Dropped::Forged | Dropped::Replayed) => done.dropped += 1,
                    }
                    r += used.max(1);
                }
                at = datagram_end;
            }
        }
        if alive {
            self.liveness.received(now);
        }
        done.authentic = alive;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use std::collections::VecDeque;

    struct Keys {
        dir: PathBuf,
    }

    impl Keys {
        fn new() -> Self {
            let mut r = [0u8; 8];
            openssl::rand::rand_bytes(&mut r).unwrap();
            let dir = std::env::temp_dir().join(format!("teletun-dtls-{}", u64::from_le_bytes(r)));
            std::fs::create_dir_all(&dir).unwrap();
            for n in ["server", "client", "other"] {
                keys::generate(&dir.join(n)).unwrap();
            }
            Keys { dir }
        }
        fn id(&self, n: &str) -> Identity {
            keys::load_identity(&self.dir.join(format!("{n}.key")), false).unwrap()
        }
        fn pin(&self, n: &str) -> PinnedKey {
            keys::load_pinned(&self.dir.join(format!("{n}.pub"))).unwrap()
        }
    }

    impl Drop for Keys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const CLIENT: &str = "192.0.2.7:4000";

    fn client_addr() -> SocketAddr {
        CLIENT.parse().unwrap()
    }

    fn handshakes(
        k: &Keys,
        client_id: &str,
        client_pins: &str,
        server_id: &str,
        server_pins: &str,
    ) -> (DtlsHandshake, DtlsHandshake) {
        let now = crate::tunnel::now();
        let client = DtlsHandshake::client(now, &k.id(client_id), k.pin(client_pins), 1400, binding()).unwrap();
        let server = DtlsHandshake::server(
            now,
            &k.id(server_id),
            k.pin(server_pins),
            1400,
            client_addr().ip(),
            binding(),
        )
        .unwrap();
        (client, server)
    }

    /// The control connection's binding both ends of a test session share.
    fn binding() -> ChannelBinding {
        ChannelBinding([7; 32])
    }

    /// A real DTLS client at the client's IP that holds another control
    /// connection's binding (or none the server knows).
    fn stranger(k: &Keys, key: &str) -> DtlsHandshake {
        let now = crate::tunnel::now();
        DtlsHandshake::client(now, &k.id(key), k.pin("server"), 1400, ChannelBinding([8; 32])).unwrap()
    }

    fn drain(h: &mut dyn Handshake) -> Vec<Vec<u8>> {
        let mut out = PacketBatch::with_capacity(16, 2048);
        h.poll_transmit(&mut out);
        out.iter().map(<[u8]>::to_vec).collect()
    }

    /// Runs both handshakes in memory, on real time (OpenSSL's retransmission
    /// timer is its own), dropping the datagrams `lose` picks (by direction
    /// and count). Returns how many datagrams crossed each way.
    fn exchange(
        client: &mut DtlsHandshake,
        server: &mut DtlsHandshake,
        lose: impl FnMut(bool, usize) -> bool,
    ) -> (usize, usize) {
        exchange_from(client, client_addr(), server, lose)
    }

    /// [`exchange`], the client at `from`; it ends when the client has
    /// finished (or given up) and nothing is on its way.
    fn exchange_from(
        client: &mut DtlsHandshake,
        from: SocketAddr,
        server: &mut DtlsHandshake,
        mut lose: impl FnMut(bool, usize) -> bool,
    ) -> (usize, usize) {
        let (mut up, mut down) = (0, 0);
        let mut flight: VecDeque<(bool, Vec<u8>)> = VecDeque::new();
        let deadline = crate::tunnel::now() + Duration::from_secs(5);
        while crate::tunnel::now() < deadline {
            flight.extend(drain(client).into_iter().map(|d| (true, d)));
            flight.extend(drain(server).into_iter().map(|d| (false, d)));
            if client.stream.is_none() && (server.stream.is_none() || flight.is_empty()) {
                break;
            }
            let Some((to_server, d)) = flight.pop_front() else {
                let wake = client.poll_timeout().min(server.poll_timeout());
                std::thread::sleep(wake.saturating_sub(crate::tunnel::now()));
                client.handle_timeout(crate::tunnel::now());
                server.handle_timeout(crate::tunnel::now());
                continue;
            };
            let n = if to_server { &mut up } else { &mut down };
            *n += 1;
            if lose(to_server, *n) {
                continue;
            }
            if to_server {
                server.handle_datagram(crate::tunnel::now(), Some(from), &d);
            } else {
                client.handle_datagram(crate::tunnel::now(), None, &d);
            }
        }
        (up, down)
    }

    fn sessions(client: &mut DtlsHandshake, server: &mut DtlsHandshake) -> (Session, Session) {
        let c = client.outcome().expect("client finished").expect("client established");
        let s = server.outcome().expect("server finished").expect("server established");
        (c, s)
    }

    /// A client and a server session after a handshake of pinned keys.
    fn established() -> (Session, Session) {
        let k = Keys::new();
        let (mut c, mut s) = handshakes(&k, "client", "server", "server", "client");
        exchange(&mut c, &mut s, |_, _| false);
        sessions(&mut c, &mut s)
    }

    fn batch_of(packets: &[Vec<u8>]) -> PacketBatch {
        let mut b = PacketBatch::new();
        for p in packets {
            assert!(b.push_at(PREFIX_LEN, p));
        }
        b
    }

    /// Seals `packets` with `from` and returns the datagrams.
    fn seal(from: &mut Session, now: Time, packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut b = batch_of(packets);
        from.outbound.encapsulate(now, &mut b).unwrap();
        datagrams(&b)
    }

    /// Opens `datagrams` (each a buffer of its own, from `peer`) with `to`.
    fn open(
        to: &mut Session,
        now: Time,
        datagrams: &[Vec<u8>],
        peer: Option<SocketAddr>,
    ) -> (Vec<Vec<u8>>, Decapsulated, Vec<Vec<u8>>) {
        let mut b = PacketBatch::new();
        for d in datagrams {
            b.next_free().unwrap()[..d.len()].copy_from_slice(d);
            b.commit(0, d.len(), peer);
        }
        let mut refs = PacketRefs::default();
        let mut reply = PacketBatch::with_capacity(16, 2048);
        let r = to.inbound.decapsulate(now, &mut b, &mut refs, &mut reply).unwrap();
        if r.peer_moved.is_some() {
            // As the data plane does once the sender's address moved.
            to.inbound.moved_back();
        }
        (
            refs.packets(&b).map(<[u8]>::to_vec).collect(),
            r,
            reply.iter().map(<[u8]>::to_vec).collect(),
        )
    }

    fn packets(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![0x45; 20 + i * 13 % 1300 + 1]).collect()
    }

    #[test]
    fn handshake_then_packets_both_ways_once_each() {
        let (mut client, mut server) = established();
        assert_eq!(server.peer, Some(client_addr()));
        assert!(
            client.description.starts_with("DTLS 1.2 ECDHE-ECDSA-AES"),
            "{}",
            client.description
        );
        let now = crate::tunnel::now();
        let sent = packets(40);
        let datagrams = seal(&mut client, now, &sent);
        assert!(datagrams
            .iter()
            .all(|d| d.len() <= 1400 && d[0] == content::APPLICATION_DATA));
        let (got, r, _) = open(&mut server, now, &datagrams, Some(client_addr()));
        assert_eq!((got, r.dropped), (sent.clone(), 0));
        // Replayed: dropped, nothing delivered twice.
        let (got, r, _) = open(&mut server, now, &datagrams[..5], Some(client_addr()));
        assert_eq!((got.len(), r.dropped), (0, 5));
        // The other way, lost, reordered and duplicated on the path.
        let back = seal(&mut server, now, &sent);
        let mut path: Vec<Vec<u8>> = back
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 != 3)
            .map(|(_, d)| d.clone())
            .collect();
        path.reverse();
        path.push(path[0].clone());
        let (got, r, _) = open(&mut client, now, &path, None);
        let mut want: Vec<Vec<u8>> = sent
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 != 3)
            .map(|(_, p)| p.clone())
            .collect();
        want.reverse();
        assert_eq!((got, r.dropped), (want, 1));
    }

    #[test]
    fn a_gro_buffer_of_several_datagrams_opens_in_place() {
        let (mut client, mut server) = established();
        let now = crate::tunnel::now();
        // IP packets: the version nibble first (never a heartbeat, probe or report).
        let sent: Vec<Vec<u8>> = (0..6u8)
            .map(|i| vec![0x40 | i; if i == 5 { 300 } else { 1000 }])
            .collect();
        let datagrams = seal(&mut client, now, &sent);
        // One buffer, datagrams back to back at a stride, as UDP_GRO delivers them.
        let train = datagrams.concat();
        let mut b = PacketBatch::new();
        {
            let mut parts = b.raw_parts();
            parts.bufs[0][..train.len()].copy_from_slice(&train);
            parts.set(0, 0, train.len(), datagrams[0].len(), Some(client_addr()));
            *parts.count = 1;
        }
        let mut refs = PacketRefs::default();
        let mut reply = PacketBatch::new();
        let r = server.inbound.decapsulate(now, &mut b, &mut refs, &mut reply).unwrap();
        assert_eq!(r.packets, 6);
        assert_eq!(refs.packets(&b).map(<[u8]>::to_vec).collect::<Vec<_>>(), sent);
    }

    #[test]
    fn server_answers_a_client_hello_with_a_cookie_first() {
        let k = Keys::new();
        let (mut client, mut server) = handshakes(&k, "client", "server", "server", "client");
        let now = crate::tunnel::now();
        let hello = drain(&mut client);
        assert_eq!(hello.len(), 1);
        // Record type 22 (handshake), message type 1 (ClientHello) after the 13-byte header.
        assert_eq!((hello[0][0], hello[0][13]), (content::HANDSHAKE, 1));
        server.handle_datagram(now, Some(client_addr()), &hello[0]);
        let answer = drain(&mut server);
        assert_eq!(answer.len(), 1, "one HelloVerifyRequest, nothing else");
        assert_eq!(answer[0][13], 3, "message type 3 is HelloVerifyRequest");
        client.handle_datagram(now, None, &answer[0]);
        let hello2 = drain(&mut client);
        assert_eq!(hello2[0][13], 1);
        assert!(
            hello2[0].len() > hello[0].len(),
            "the second ClientHello carries the cookie"
        );
        // Another server (another cookie secret) does not accept that cookie.
        let (_, mut other) = handshakes(&k, "client", "server", "server", "client");
        other.handle_datagram(now, Some(client_addr()), &hello2[0]);
        assert!(
            drain(&mut other).iter().all(|d| d[13] != 2),
            "a cookie from another secret is refused"
        );
        server.handle_datagram(now, Some(client_addr()), &hello2[0]);
        assert!(
            drain(&mut server).iter().any(|d| d[13] == 2),
            "ServerHello follows a valid cookie"
        );
        // Other hosts and non-handshake datagrams are ignored.
        let (_, mut fresh) = handshakes(&k, "client", "server", "server", "client");
        fresh.handle_datagram(now, Some("192.0.2.8:4000".parse().unwrap()), &hello[0]);
        fresh.handle_datagram(now, Some(client_addr()), &[23, 0xfe, 0xfd, 0, 1]);
        assert!(drain(&mut fresh).is_empty());
        assert_eq!(fresh.bound, None);
    }

    /// Every datagram the handshake wants sent, with where it goes.
    fn drain_all(h: &mut dyn Handshake) -> Vec<(Option<SocketAddr>, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let mut out = PacketBatch::with_capacity(16, 2048);
            let to = h.poll_transmit(&mut out);
            if out.is_empty() {
                return all;
            }
            all.extend(out.iter().map(|d| (to, d.to_vec())));
        }
    }

    /// A host behind the client's NAT (same IP, other ports) spraying junk
    /// handshake records and real ClientHellos gets HelloVerifyRequests to
    /// its own ports, binds nothing, and the client's handshake goes through.
    #[test]
    fn a_sprayer_at_the_clients_ip_neither_binds_nor_poisons_the_handshake() {
        let k = Keys::new();
        let (mut client, mut server) = handshakes(&k, "client", "server", "server", "client");
        let now = crate::tunnel::now();
        let mut stranger = stranger(&k, "other");
        let stranger_hello = drain(&mut stranger);
        let junk = [22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3, 1, 2, 3];
        for port in 40000..40050 {
            let from = SocketAddr::new(client_addr().ip(), port);
            server.handle_datagram(now, Some(from), &junk);
            server.handle_datagram(now, Some(from), &stranger_hello[0]);
        }
        assert_eq!(server.bound, None);
        let answers = drain_all(&mut server);
        assert_eq!(answers.len(), MAX_ADDRESSED, "a bounded number of answers");
        for (to, d) in &answers {
            assert!(to.is_some_and(|a| a.port() >= 40000), "each to the sprayer's own port");
            assert_eq!(d[13], 3, "a HelloVerifyRequest");
        }
        // The stranger's second ClientHello, with the cookie for its port,
        // sent from another port: refused like a first one.
        stranger.handle_datagram(now, None, &answers[0].1);
        let with_cookie = drain(&mut stranger);
        let elsewhere = SocketAddr::new(client_addr().ip(), 41000);
        server.handle_datagram(now, Some(elsewhere), &with_cookie[0]);
        assert_eq!(server.bound, None, "a cookie is good only for its own port");
        drain_all(&mut server);
        // The client, meanwhile, completes.
        exchange(&mut client, &mut server, |_, _| false);
        let _ = sessions(&mut client, &mut server);
        assert_eq!(server.bound, Some(client_addr()));
    }

    /// The cookie exchange of `client` at `from` with `server`, up to and
    /// including the ClientHello that returns the cookie; what the server
    /// then sends to others than `from` is returned.
    fn return_cookie(
        client: &mut DtlsHandshake,
        from: SocketAddr,
        server: &mut DtlsHandshake,
    ) -> Vec<(Option<SocketAddr>, Vec<u8>)> {
        let now = crate::tunnel::now();
        let first = drain(client);
        server.handle_datagram(now, Some(from), &first[0]);
        let (ours, others): (Vec<_>, Vec<_>) = drain_all(server).into_iter().partition(|(to, _)| *to == Some(from));
        assert_eq!(ours.len(), 1, "a HelloVerifyRequest to {from}");
        client.handle_datagram(now, None, &ours[0].1);
        let second = drain(client);
        assert!(!hello::parse(&second[0]).unwrap().cookie().is_empty());
        server.handle_datagram(now, Some(from), &second[0]);
        others
    }

    /// A host behind the client's NAT running a real DTLS client returns its
    /// own cookie and goes silent: it holds the handshake only until the
    /// client's ClientHello with a proof arrives, and after that neither it
    /// nor another such host displaces the client.
    #[test]
    fn a_real_dtls_client_behind_the_same_nat_holds_nothing_against_the_proven_client() {
        let k = Keys::new();
        let (mut client, mut server) = handshakes(&k, "client", "server", "server", "client");
        let squatter = SocketAddr::new(client_addr().ip(), 41000);
        return_cookie(&mut stranger(&k, "other"), squatter, &mut server);
        assert_eq!(
            (server.bound, server.proven),
            (Some(squatter), false),
            "nobody held it before"
        );
        drain_all(&mut server);
        // The client's ClientHello carries its proof; it takes the handshake.
        return_cookie(&mut client, client_addr(), &mut server);
        assert_eq!((server.bound, server.proven), (Some(client_addr()), true));
        // Another squatter, after: refused.
        let flight = return_cookie(
            &mut stranger(&k, "other"),
            SocketAddr::new(client_addr().ip(), 41001),
            &mut server,
        );
        assert_eq!(server.bound, Some(client_addr()), "a proven client keeps the handshake");
        for (_, d) in flight.iter().filter(|(to, _)| *to == Some(client_addr())) {
            client.handle_datagram(crate::tunnel::now(), None, d);
        }
        exchange(&mut client, &mut server, |_, _| false);
        let (_, s) = sessions(&mut client, &mut server);
        assert_eq!(s.peer, Some(client_addr()));
    }

    /// A host at the client's IP that completes a handshake with some key
    /// is no verdict on the client: the server waits on, and the client
    /// connects after it.
    #[test]
    fn a_stranger_finishing_a_handshake_ends_nothing() {
        let k = Keys::new();
        let (mut client, mut server) = handshakes(&k, "client", "server", "server", "client");
        let mut squatter = stranger(&k, "other");
        exchange_from(
            &mut squatter,
            SocketAddr::new(client_addr().ip(), 41000),
            &mut server,
            |_, _| false,
        );
        assert!(matches!(squatter.outcome(), Some(Err(TunnelError::OurKeyRefused))));
        assert!(server.outcome().is_none(), "the server waits on");
        assert_eq!(server.bound, None);
        exchange(&mut client, &mut server, |_, _| false);
        let (_, s) = sessions(&mut client, &mut server);
        assert_eq!(s.peer, Some(client_addr()));
    }

    /// A client that sends no proof (one written from the seed's design)
    /// still connects when nobody else holds the handshake; the proof never
    /// reaches OpenSSL, so the transcripts of a proven client agree too.
    #[test]
    fn a_client_without_a_proof_still_connects_to_a_free_server() {
        let k = Keys::new();
        let (mut client, mut server) = handshakes(&k, "client", "server", "server", "client");
        let now = crate::tunnel::now();
        server.handle_datagram(now, Some(client_addr()), &drain(&mut client)[0]);
        client.handle_datagram(now, None, &drain(&mut server)[0]);
        let proven = drain(&mut client);
        let mut plain = Vec::new();
        hello::parse(&proven[0]).unwrap().without_proof(&mut plain).unwrap();
        server.handle_datagram(now, Some(client_addr()), &plain);
        assert_eq!((server.bound, server.proven), (Some(client_addr()), false));
        exchange(&mut client, &mut server, |_, _| false);
        let _ = sessions(&mut client, &mut server);
    }

    #[test]
    fn unpinned_keys_are_refused_both_ways() {
        let k = Keys::new();
        let (mut c, mut s) = handshakes(&k, "other", "server", "server", "client");
        exchange(&mut c, &mut s, |_, _| false);
        assert!(matches!(s.outcome(), Some(Err(TunnelError::PeerKeyNotPinned(_)))));
        assert!(matches!(c.outcome(), Some(Err(TunnelError::OurKeyRefused))));
        let (mut c, mut s) = handshakes(&k, "client", "server", "other", "client");
        exchange(&mut c, &mut s, |_, _| false);
        assert!(matches!(c.outcome(), Some(Err(TunnelError::PeerKeyNotPinned(_)))));
        assert!(matches!(s.outcome(), Some(Err(TunnelError::OurKeyRefused))));
    }

    #[test]
    fn lost_handshake_datagrams_are_retransmitted() {
        let k = Keys::new();
        let (mut c, mut s) = handshakes(&k, "client", "server", "server", "client");
        // The first ClientHello and the server's first answer are lost.
        let (up, down) = exchange(&mut c, &mut s, |to_server, n| n == 1 || (to_server && n == 3));
        let _ = sessions(&mut c, &mut s);
        assert!(up > 4 && down > 2, "retransmissions crossed: {up} up, {down} down");
    }

    /// The server's final flight is lost after the server is established:
    /// the client retransmits its own, and the server's inbound half (OpenSSL
    /// kept for that) answers it, so the client finishes too.
    #[test]
    fn a_lost_final_flight_is_answered_by_the_established_server() {
        let k = Keys::new();
        let (mut c, mut s) = handshakes(&k, "client", "server", "server", "client");
        let mut server_done = false;
        let deadline = crate::tunnel::now() + Duration::from_secs(5);
        let mut server_session = None;
        while c.stream.is_some() && crate::tunnel::now() < deadline {
            for d in drain(&mut c) {
                match server_session.as_mut() {
                    None => {
                        s.handle_datagram(crate::tunnel::now(), Some(client_addr()), &d);
                    }
                    Some(session) => {
                        let (got, _, reply) = open(session, crate::tunnel::now(), &[d], Some(client_addr()));
                        assert!(got.is_empty());
                        for r in reply {
                            c.handle_datagram(crate::tunnel::now(), None, &r);
                        }
                    }
                }
            }
            let flight = drain(&mut s);
            if let Some(Ok(session)) = s.outcome() {
                server_done = true;
                server_session = Some(session);
                continue; // the final flight is lost
            }
            for d in flight {
                c.handle_datagram(crate::tunnel::now(), None, &d);
            }
            std::thread::sleep(c.poll_timeout().saturating_sub(crate::tunnel::now()));
            c.handle_timeout(crate::tunnel::now());
        }
        assert!(server_done);
        let mut client = c.outcome().expect("client finished").expect("client established");
        let mut server = server_session.unwrap();
        let now = crate::tunnel::now();
        let d = seal(&mut client, now, &[b"after".to_vec()]);
        assert_eq!(
            open(&mut server, now, &d, Some(client_addr())).0,
            vec![b"after".to_vec()]
        );
    }

    #[test]
    fn heartbeats_silence_and_close_on_a_fake_clock() {
        let (mut client, mut server) = established();
        // The halves were made at real `now`; a fake clock starts there.
        let t0 = crate::tunnel::now();
        // First a round of path probes, due at once; the peer takes them
        // in (nothing delivered) and reports the largest.
        let start = client.outbound.poll_timeout();
        assert!(start <= t0);
        let mut out = PacketBatch::new();
        client.outbound.handle_timeout(start, &mut out).unwrap();
        let probes: Vec<Vec<u8>> = out.iter().map(<[u8]>::to_vec).collect();
        assert!(probes.len() > 5, "a round of probes");
        let (got, r, _) = open(&mut server, start, &probes, Some(client_addr()));
        assert!(got.is_empty() && r.dropped == 0, "probes deliver nothing");
        out.clear();
        server.outbound.handle_timeout(start, &mut out).unwrap();
        let report = out.get(0).to_vec();
        let (got, _, _) = open(&mut client, start, &[report], None);
        assert!(got.is_empty(), "a report delivers nothing");
        assert_eq!(client.path.limit(), None, "not settled before its time");
        // The next round goes out on its timer; the largest probe was
        // reported, so it is the last, and the limit is the largest.
        let round = client.outbound.poll_timeout();
        assert!(round > start && round < start + crate::tunnel::pmtu::SETTLE_AFTER);
        out.clear();
        client.outbound.handle_timeout(round, &mut out).unwrap();
        assert!(out.len() > 5, "another round of probes");
        let largest = client.outbound.max_packet();
        assert_eq!(client.path.limit(), Some(largest));
        // A heartbeat when nothing else went out for an interval.
        let beat_at = client.outbound.poll_timeout();
        assert_eq!(beat_at, round + crate::tunnel::liveness::HEARTBEAT_INTERVAL);
        out.clear();
        client.outbound.handle_timeout(beat_at, &mut out).unwrap();
        assert_eq!(out.len(), 1, "a heartbeat is due");
        let beat = out.get(0).to_vec();
        let (got, r, _) = open(&mut server, beat_at, &[beat], Some(client_addr()));
        assert!(got.is_empty() && r.dropped == 0, "a heartbeat delivers nothing");
        // Nothing due until the next interval.
        out.clear();
        client
            .outbound
            .handle_timeout(beat_at + Duration::from_millis(10), &mut out)
            .unwrap();
        assert!(out.is_empty());
        // Four silent seconds after the last record from the server: over.
        let late = t0 + crate::tunnel::liveness::SILENCE_LIMIT + Duration::from_millis(1);
        assert!(matches!(
            client.outbound.handle_timeout(late, &mut out),
            Err(TunnelError::Silent(_))
        ));
        // close_notify ends the peer's session.
        out.clear();
        server.outbound.close(&mut out);
        let d = out.get(0).to_vec();
        let mut b = PacketBatch::new();
        b.push(&d);
        let r = client
            .inbound
            .decapsulate(late, &mut b, &mut PacketRefs::default(), &mut PacketBatch::new());
        assert!(matches!(r, Err(TunnelError::Closed)));
    }

    #[test]
    fn only_the_newest_authentic_record_moves_the_peer() {
        let (mut client, mut server) = established();
        let now = crate::tunnel::now();
        let d = seal(&mut client, now, &packets(3));
        let roamed: SocketAddr = "198.51.100.9:5555".parse().unwrap();
        // A forged datagram from a new address moves nothing.
        let mut forged = d[0].clone();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(open(&mut server, now, &[forged], Some(roamed)).1.peer_moved, None);
        // The newest record from there does.
        assert_eq!(
            open(&mut server, now, &d[1..2], Some(roamed)).1.peer_moved,
            Some(roamed)
        );
        // An older one from the old address, arriving late, does not move it back.
        let (got, r, _) = open(&mut server, now, &d[..1], Some(client_addr()));
        assert_eq!((got.len(), r.peer_moved), (1, None));
    }

    fn datagrams(b: &PacketBatch) -> Vec<Vec<u8>> {
        b.iter().map(<[u8]>::to_vec).collect()
    }

    fn downstream() -> PacketBatch {
        batch_of(&vec![vec![0x45; 1000]; 64])
    }

    /// Someone on the path replays the client's newest record from a
    /// spoofed address: the server follows, but sends there at most three
    /// times what came from there until the address answers a challenge
    /// (which only the client can), and the client's next record takes the
    /// session back to its own address, with no limit.
    #[test]
    fn a_replayed_record_draws_at_most_three_times_its_size_to_the_spoofed_address() {
        let (mut client, mut server) = established();
        // Past the path probes of the session's start, so that only the
        // heartbeat and the challenge keep the server's timers.
        let t0 = crate::tunnel::now();
        let mut out = PacketBatch::new();
        for ms in (0..=600).step_by(100) {
            out.clear();
            server
                .outbound
                .handle_timeout(t0 + Duration::from_millis(ms), &mut out)
                .unwrap();
        }
        let now = t0 + Duration::from_millis(600);
        let d = seal(&mut client, now, &packets(2));
        let spoofed: SocketAddr = "198.51.100.9:5555".parse().unwrap();
        let replayed = d[0].clone();
        assert_eq!(
            open(&mut server, now, std::slice::from_ref(&replayed), Some(spoofed))
                .1
                .peer_moved,
            Some(spoofed)
        );
        let mut b = downstream();
        let r = server.outbound.encapsulate(now, &mut b).unwrap();
        let sent: usize = b.iter().map(<[u8]>::len).sum();
        assert!(
            sent <= 3 * replayed.len(),
            "{sent} bytes to the spoofed address for {}",
            replayed.len()
        );
        assert_eq!((r.sealed + r.unvalidated, b.len()), (64, r.sealed));
        assert!(r.unvalidated >= 62, "{r:?}");
        // The challenge goes out at once, not at the next heartbeat: the
        // client, opening what went out, owes a response.
        assert_eq!(server.outbound.poll_timeout(), Time::ZERO);
        out.clear();
        server.outbound.handle_timeout(now, &mut out).unwrap();
        open(&mut client, now, &datagrams(&out), None);
        assert_eq!(
            client.outbound.poll_timeout(),
            Time::ZERO,
            "no challenge reached the client"
        );
        // Its response is lost. Traffic goes on from the spoofed address
        // (which earns a budget and is sent within it), putting the
        // heartbeat off; the challenge is sent again on time all the same.
        let mut lost = PacketBatch::new();
        client.outbound.handle_timeout(now, &mut lost).unwrap();
        let later = now + Duration::from_millis(200);
        let more = seal(&mut client, later, &packets(8));
        open(&mut server, later, &more[..7], Some(spoofed));
        let mut small = batch_of(&[vec![0x45; 40]]);
        assert_eq!(server.outbound.encapsulate(later, &mut small).unwrap().sealed, 1);
        let again = server.outbound.poll_timeout();
        assert!(
            again <= now + validation::RECHALLENGE_AFTER,
            "not sent again on time: {again:?}"
        );
        out.clear();
        server.outbound.handle_timeout(again, &mut out).unwrap();
        open(&mut client, again, &datagrams(&out), None);
        assert_eq!(
            client.outbound.poll_timeout(),
            Time::ZERO,
            "the challenge was not sent again"
        );
        // The client's next record, from its own address, moves the session back.
        let (_, r, _) = open(&mut server, later, &more[7..], Some(client_addr()));
        assert_eq!(r.peer_moved, Some(client_addr()));
        let mut b = downstream();
        assert_eq!(server.outbound.encapsulate(later, &mut b).unwrap().sealed, 64);
    }

    /// A NAT that rebinds: the client's records come from a new address, it
    /// answers the challenge sent there, and from then on it gets everything.
    /// A response replayed from elsewhere proves nothing.
    #[test]
    fn a_rebound_client_answers_the_challenge_and_is_sent_everything() {
        let (mut client, mut server) = established();
        let now = crate::tunnel::now();
        let rebound: SocketAddr = "203.0.113.50:40000".parse().unwrap();
        let d = seal(&mut client, now, &packets(1));
        assert_eq!(open(&mut server, now, &d, Some(rebound)).1.peer_moved, Some(rebound));
        let mut out = PacketBatch::new();
        server.outbound.handle_timeout(now, &mut out).unwrap();
        open(&mut client, now, &datagrams(&out), None);
        // The client owes its response at once.
        assert_eq!(client.outbound.poll_timeout(), Time::ZERO);
        out.clear();
        client.outbound.handle_timeout(now, &mut out).unwrap();
        let answer = datagrams(&out);
        // Replayed first from a third address, the answer moves the session
        // there (it is the newest record) but validates nothing.
        let third: SocketAddr = "198.51.100.77:1".parse().unwrap();
        open(&mut server, now, &answer, Some(third));
        let mut b = downstream();
        assert!(server.outbound.encapsulate(now, &mut b).unwrap().unvalidated > 0);
        // The client answers again from its address (the server challenged
        // anew): validated, no limit.
        let mut out = PacketBatch::new();
        let d = seal(&mut client, now, &packets(1));
        open(&mut server, now, &d, Some(rebound));
        server.outbound.handle_timeout(now, &mut out).unwrap();
        open(&mut client, now, &datagrams(&out), None);
        out.clear();
        client.outbound.handle_timeout(now, &mut out).unwrap();
        open(&mut server, now, &datagrams(&out), Some(rebound));
        let mut b = downstream();
        let r = server.outbound.encapsulate(now, &mut b).unwrap();
        assert_eq!((r.sealed, r.unvalidated), (64, 0));
    }

    /// Our records are standard DTLS 1.2: OpenSSL's own record layer opens
    /// what we seal, and we open what it seals, in both roles.
    #[test]
    fn records_interoperate_with_openssl() {
        let k = Keys::new();
        for openssl_is_server in [true, false] {
            let (mut c, mut s) = handshakes(&k, "client", "server", "server", "client");
            let kept = if openssl_is_server { &mut s } else { &mut c };
            kept.keep_openssl = Some(None);
            exchange(&mut c, &mut s, |_, _| false);
            let (ours, theirs) = if openssl_is_server {
                (&mut c, &mut s)
            } else {
                (&mut s, &mut c)
            };
            let mut ours = ours.outcome().unwrap().unwrap();
            let mut theirs = theirs.keep_openssl.take().unwrap().expect("OpenSSL finished");
            let now = crate::tunnel::now();
            for p in packets(5) {
                let d = seal(&mut ours, now, std::slice::from_ref(&p));
                theirs.get_mut().put(&d[0]);
                let mut buf = [0u8; 2048];
                let n = theirs.ssl_read(&mut buf).expect("OpenSSL opens our record");
                assert_eq!(&buf[..n], &p[..]);
                theirs.ssl_write(&p).unwrap();
                let mut from_openssl = PacketBatch::new();
                theirs.get_mut().drain_into(&mut from_openssl);
                let d: Vec<Vec<u8>> = from_openssl.iter().map(<[u8]>::to_vec).collect();
                let peer = if openssl_is_server { None } else { Some(client_addr()) };
                assert_eq!(open(&mut ours, now, &d, peer).0, vec![p]);
            }
        }
    }
}
