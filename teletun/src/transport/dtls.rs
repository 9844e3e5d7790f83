//! DTLS 1.2 over UDP with OpenSSL.
//!
//! OpenSSL never touches the socket: its BIO is a [`DatagramQueue`] in memory.
//! The pumps move whole batches with `recvmmsg`/`sendmmsg` and hand OpenSSL one
//! datagram at a time (by swapping buffers, not copying). Every IP packet is one
//! DTLS record in one datagram, so a packet is never split and reordering or
//! loss of datagrams can never splice two packets together.
//!
//! Both sides present a self-signed certificate and accept only the pinned peer
//! key. The server answers a ClientHello with a HelloVerifyRequest (cookie) before
//! it keeps any state for the client beyond the one SSL object of the session.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use openssl::hash::MessageDigest;
use openssl::memcmp;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;

use crate::io::batch::{PacketBatch, BUFFER_SIZE};
use crate::io::sys;
use crate::keys::{Identity, PinnedKey};

/// Bytes DTLS adds to each packet with AES-GCM: record header (13), explicit
/// nonce (8) and tag (16). The cipher list below allows nothing else.
pub const DTLS_OVERHEAD: usize = 13 + 8 + 16;
const CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384";
/// DTLS record content type of handshake messages.
const RECORD_HANDSHAKE: u8 = 22;

/// How long a handshake may take before we give up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The in-memory BIO: at most one inbound datagram, a batch of outbound ones.
struct DatagramQueue {
    inbound: Box<[u8]>,
    inbound_len: Option<usize>,
    outbound: PacketBatch,
}

impl Read for DatagramQueue {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbound_len.take() {
            // A datagram larger than OpenSSL's buffer is cut, as a UDP socket would.
            Some(len) => {
                let n = len.min(buf.len());
                buf[..n].copy_from_slice(&self.inbound[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
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

/// Which side of the handshake we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends the ClientHello.
    Client,
    /// Answers with a cookie, then the handshake.
    Server,
}

/// Why a DTLS session ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DtlsError {
    /// Our verification refused the peer's certificate: it is not the pinned key.
    #[error("the peer's key is not the pinned key {0}")]
    PeerKeyNotPinned(String),
    /// The peer refused our certificate.
    #[error("the peer refused our key")]
    OurKeyRefused,
    /// The peer closed the session (close_notify).
    #[error("the peer closed the DTLS session")]
    Closed,
    /// No handshake within [`HANDSHAKE_TIMEOUT`].
    #[error("no DTLS handshake within {0:?}: is UDP to the server's port blocked?")]
    Timeout(Duration),
    /// Anything else OpenSSL reports.
    #[error("DTLS failed: {0}")]
    Other(String),
}

/// An established or establishing DTLS session.
pub struct DtlsSession {
    stream: SslStream<DatagramQueue>,
    role: Role,
    peer_rejected: Arc<AtomicBool>,
    pin: PinnedKey,
    mtu: usize,
}

/// Per-process secret for DTLS cookies: HMAC(secret, peer address).
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

fn context(role: Role, identity: &Identity) -> Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_certificate(&identity.cert)?;
    b.set_private_key(&identity.key)?;
    b.check_private_key()?;
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_RENEGOTIATION);
    if role == Role::Server {
        b.set_options(SslOptions::COOKIE_EXCHANGE);
        let mut secret = [0u8; 32];
        openssl::rand::rand_bytes(&mut secret)?;
        let secret = Arc::new(CookieSecret(secret));
        let index = peer_index()?;
        let s = secret.clone();
        b.set_cookie_generate_cb(move |ssl, out| {
            let peer = ssl.ex_data(index).map(Vec::as_slice).unwrap_or_default();
            cookie_for(&s, peer, out)
        });
        b.set_cookie_verify_cb(move |ssl, cookie| {
            let peer = ssl.ex_data(index).map(Vec::as_slice).unwrap_or_default();
            let mut expected = [0u8; 64];
            match cookie_for(&secret, peer, &mut expected) {
                Ok(n) => n == cookie.len() && memcmp::eq(&expected[..n], cookie),
                Err(_) => false,
            }
        });
    }
    Ok(b.build())
}

static PEER_INDEX: std::sync::OnceLock<openssl::ex_data::Index<Ssl, Vec<u8>>> = std::sync::OnceLock::new();

/// The one SSL ex-data slot that holds the client's IP for its cookie.
fn peer_index() -> Result<openssl::ex_data::Index<Ssl, Vec<u8>>, openssl::error::ErrorStack> {
    if let Some(i) = PEER_INDEX.get() {
        return Ok(*i);
    }
    let fresh = Ssl::new_ex_index()?;
    Ok(*PEER_INDEX.get_or_init(|| fresh))
}

impl DtlsSession {
    /// Prepares a session. `mtu` is the largest UDP payload the path carries.
    /// `peer` (server side) is the client's address, bound into the cookie.
    pub fn new(role: Role, identity: &Identity, pin: PinnedKey, mtu: usize, peer: Option<SocketAddr>) -> Result<Self> {
        let ctx = context(role, identity).context("cannot set up DTLS")?;
        let mut ssl = Ssl::new(&ctx)?;
        let peer_rejected = Arc::new(AtomicBool::new(false));
        let (pin2, flag) = (pin.clone(), peer_rejected.clone());
        ssl.set_verify_callback(
            SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
            move |_, store| {
                // Self-signed on purpose: ignore the chain verdict and check the pin.
                let ok = store.error_depth() != 0
                    || store
                        .current_cert()
                        .and_then(|c| c.to_der().ok())
                        .is_some_and(|der| pin2.matches_cert_der(&der));
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
        if let (Role::Server, Some(peer)) = (role, peer) {
            // The cookie binds the client's IP (its UDP port is not known yet).
            ssl.set_ex_data(peer_index()?, peer.ip().to_string().into_bytes());
        }
        match role {
            Role::Client => ssl.set_connect_state(),
            Role::Server => ssl.set_accept_state(),
        }
        let queue = DatagramQueue {
            inbound: vec![0u8; BUFFER_SIZE].into_boxed_slice(),
            inbound_len: None,
            outbound: PacketBatch::new(),
        };
        Ok(DtlsSession {
            stream: SslStream::new(ssl, queue)?,
            role,
            peer_rejected,
            pin,
            mtu,
        })
    }

    /// The largest IP packet one record carries within the path MTU.
    pub fn max_packet(&self) -> usize {
        self.mtu - DTLS_OVERHEAD
    }

    fn classify(&self, e: openssl::ssl::Error) -> DtlsError {
        if self.peer_rejected.load(Ordering::Relaxed) {
            return DtlsError::PeerKeyNotPinned(self.pin.path.display().to_string());
        }
        if e.code() == ErrorCode::ZERO_RETURN {
            return DtlsError::Closed;
        }
        let text = e.to_string();
        // Alerts our peer sends when its pin check fails.
        if text.contains("alert bad certificate") {
            return DtlsError::OurKeyRefused;
        }
        DtlsError::Other(text)
    }

    /// Runs the handshake over `fd` (a UDP socket, connected on the client).
    /// The server accepts datagrams only from `peer`'s IP and adopts the port of
    /// the first one; returns the peer address the session is bound to.
    pub fn handshake(
        &mut self,
        fd: RawFd,
        peer: Option<SocketAddr>,
        stop: Option<&sys::StopSignal>,
    ) -> Result<Option<SocketAddr>, DtlsError> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut bound = if self.role == Role::Client { peer } else { None };
        let mut inbox = PacketBatch::new();
        let mut outbox = PacketBatch::new();
        let io_err = |e: io::Error| DtlsError::Other(e.to_string());
        loop {
            if self.advance(fd, bound, &mut outbox)? {
                return Ok(bound);
            }
            // Wait for the next datagram; OpenSSL retransmits on its own timer
            // whenever do_handshake runs after the timer expired.
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(DtlsError::Timeout(HANDSHAKE_TIMEOUT));
                }
                if stop.is_some_and(|s| s.is_stopped()) {
                    return Err(DtlsError::Other("stopped".into()));
                }
                let slice = (deadline - now).min(Duration::from_millis(100));
                if sys::wait(&[fd], libc::POLLIN, Some(slice)).map_err(io_err)?.is_none() {
                    break; // let OpenSSL check its retransmission timer
                }
                inbox.clear();
                match sys::recv_batch(fd, &mut inbox) {
                    Ok(_) => {}
                    // ICMP port unreachable from a server that is not (yet) listening.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(io_err(e)),
                }
                let mut fed = false;
                for i in 0..inbox.len() {
                    let from = inbox.peer(i);
                    if self.role == Role::Server {
                        let expected_ip = peer.map(|p| p.ip());
                        if from.map(|f| f.ip()) != expected_ip || (bound.is_some() && from != bound) {
                            continue;
                        }
                        // Only a handshake record may bind the session's port: stale
                        // datagrams of an earlier session from the same host must not.
                        if bound.is_none() && inbox.get(i).first() != Some(&RECORD_HANDSHAKE) {
                            continue;
                        }
                        bound = from;
                    }
                    self.feed(&mut inbox, i);
                    fed = true;
                    // Let OpenSSL consume this datagram before the next one.
                    if self.advance(fd, bound, &mut outbox)? {
                        return Ok(bound);
                    }
                }
                if fed {
                    break;
                }
            }
        }
    }

    /// Runs the handshake as far as it goes with what OpenSSL has, and sends
    /// what it wrote (to `bound` on the server). Returns whether it is done.
    fn advance(&mut self, fd: RawFd, bound: Option<SocketAddr>, outbox: &mut PacketBatch) -> Result<bool, DtlsError> {
        let result = self.stream.do_handshake();
        self.take_outbound(outbox);
        if !outbox.is_empty() {
            let dest = if self.role == Role::Server { bound } else { None };
            sys::send_batch(fd, outbox, dest).map_err(|e| DtlsError::Other(e.to_string()))?;
            outbox.clear();
        }
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => Ok(false),
            Err(e) => Err(self.classify(e)),
        }
    }

    fn feed(&mut self, batch: &mut PacketBatch, i: usize) {
        let len = batch.get(i).len();
        let q = self.stream.get_mut();
        batch.swap_buffer(i, &mut q.inbound);
        q.inbound_len = Some(len);
    }

    /// Moves records OpenSSL wrote (handshake messages, alerts) into `out`.
    pub fn take_outbound(&mut self, out: &mut PacketBatch) {
        let q = self.stream.get_mut();
        for p in q.outbound.iter() {
            if !out.push(p) {
                break;
            }
        }
        q.outbound.clear();
    }

    /// Seals packets from `plain`, starting at `*next`, into `cipher` (one record
    /// per packet) until `cipher` is full or `plain` is done. Packets larger than
    /// [`Self::max_packet`] are skipped and counted in the return value.
    pub fn seal(
        &mut self,
        plain: &PacketBatch,
        next: &mut usize,
        cipher: &mut PacketBatch,
    ) -> Result<usize, DtlsError> {
        let mut oversize = 0;
        let max = self.max_packet();
        // Records go straight into `cipher`: lend it to the BIO for the duration.
        std::mem::swap(&mut self.stream.get_mut().outbound, cipher);
        let mut result = Ok(());
        while *next < plain.len() && !self.stream.get_ref().outbound.is_full() {
            let p = plain.get(*next);
            *next += 1;
            if p.len() > max || p.is_empty() {
                oversize += 1;
                continue;
            }
            if let Err(e) = self.stream.ssl_write(p) {
                result = Err(e);
                break;
            }
        }
        std::mem::swap(&mut self.stream.get_mut().outbound, cipher);
        match result {
            Ok(()) => Ok(oversize),
            Err(e) => Err(self.classify(e)),
        }
    }

    /// Opens every datagram of `cipher` into `plain`. Datagrams that are not a
    /// valid record for this session (forged, replayed, corrupted) are dropped by
    /// OpenSSL; their number is returned. `plain` must have room for `cipher.len()`.
    pub fn open(&mut self, cipher: &mut PacketBatch, plain: &mut PacketBatch) -> Result<usize, DtlsError> {
        let mut dropped = 0;
        for i in 0..cipher.len() {
            self.feed(cipher, i);
            let Some(buf) = plain.next_free() else { break };
            match self.stream.ssl_read(buf) {
                Ok(n) => plain.commit(n, None),
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => dropped += 1,
                Err(e) => return Err(self.classify(e)),
            }
            // Whatever OpenSSL did not consume of this datagram is discarded.
            self.stream.get_mut().inbound_len = None;
        }
        Ok(dropped)
    }

    /// Sends close_notify into the outbound queue (take it with [`Self::take_outbound`]).
    pub fn close(&mut self) {
        let _ = self.stream.shutdown();
    }
}

/// Discards every datagram waiting on `fd`. The server calls it before it
/// greets a new client: what waits then belongs to no session.
pub fn drain(fd: RawFd) {
    let mut scratch = PacketBatch::new();
    while matches!(sys::recv_batch(fd, &mut scratch), Ok((n, _)) if n > 0) {
        scratch.clear();
    }
}

/// Opens a UDP socket for the data plane with DF set, large buffers and
/// non-blocking mode.
pub fn udp_socket(bind: SocketAddr) -> Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(bind),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    if bind.is_ipv6() {
        s.set_only_v6(false).ok();
    }
    s.set_reuse_address(true)?;
    // Root may exceed net.core.{r,w}mem_max; a burst of 64 KiB packets needs it.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    force_buffers(&s);
    set_dont_fragment(&s, bind.is_ipv6());
    s.bind(&bind.into())
        .with_context(|| format!("cannot bind UDP {bind}"))?;
    Ok(s)
}

fn force_buffers(s: &socket2::Socket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a live c_int; failure (not root) is harmless.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

fn set_dont_fragment(s: &socket2::Socket, v6: bool) {
    use std::os::fd::AsRawFd;
    let (level, opt, val) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
    };
    // SAFETY: setsockopt with a live c_int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// The path MTU the kernel knows for a connected socket (`IP_MTU`).
pub fn path_mtu(s: &socket2::Socket, v6: bool) -> Result<usize> {
    use std::os::fd::AsRawFd;
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live c_int of the given length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(anyhow!("cannot read the path MTU: {}", io::Error::last_os_error()));
    }
    if val < 576 {
        bail!("the path MTU to the server is {val}, too small for a tunnel");
    }
    Ok(val as usize)
}

/// UDP payload available on a path with this IP MTU.
pub fn udp_payload(path_mtu: usize, v6: bool) -> usize {
    path_mtu - if v6 { 40 } else { 20 } - 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;

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
            keys::load_identity(&self.dir.join(format!("{n}.key"))).unwrap()
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

    /// Both ends of a loopback handshake and how each side's handshake ended.
    struct Pair {
        client_result: Result<Option<SocketAddr>, DtlsError>,
        server_result: Result<Option<SocketAddr>, DtlsError>,
        client: DtlsSession,
        server: DtlsSession,
        client_sock: socket2::Socket,
    }

    /// Runs a handshake between a client and a server on loopback.
    fn pair(k: &Keys, client_id: &str, client_pins: &str, server_id: &str, server_pins: &str) -> Pair {
        let server_sock = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let server_addr = server_sock.local_addr().unwrap().as_socket().unwrap();
        let client_sock = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        client_sock.connect(&server_addr.into()).unwrap();
        let client_addr = client_sock.local_addr().unwrap().as_socket().unwrap();
        let mut server = DtlsSession::new(
            Role::Server,
            &k.id(server_id),
            k.pin(server_pins),
            1400,
            Some(client_addr),
        )
        .unwrap();
        let mut client = DtlsSession::new(Role::Client, &k.id(client_id), k.pin(client_pins), 1400, None).unwrap();
        let sfd = server_sock.as_raw_fd();
        let cfd = client_sock.as_raw_fd();
        let (sr, cr, server, client) = std::thread::scope(|s| {
            let h = s.spawn(move || {
                let r = server.handshake(sfd, Some(client_addr), None);
                (r, server)
            });
            let cr = client.handshake(cfd, None, None);
            let (sr, server) = h.join().unwrap();
            (sr, cr, server, client)
        });
        drop(server_sock);
        Pair {
            client_result: cr,
            server_result: sr,
            client,
            server,
            client_sock,
        }
    }

    #[test]
    fn handshake_and_packets_both_ways() {
        let k = Keys::new();
        let Pair {
            client_result,
            server_result,
            mut client,
            mut server,
            client_sock,
        } = pair(&k, "client", "server", "server", "client");
        client_result.unwrap();
        let bound = server_result.unwrap().expect("server binds the client address");
        assert_eq!(bound, client_sock.local_addr().unwrap().as_socket().unwrap());

        let mut plain = PacketBatch::new();
        for i in 0..10u8 {
            plain.push(&vec![i; 100 + i as usize]);
        }
        plain.push(&vec![0; client.max_packet() + 1]);
        let mut cipher = PacketBatch::new();
        let mut next = 0;
        let oversize = client.seal(&plain, &mut next, &mut cipher).unwrap();
        assert_eq!((oversize, cipher.len()), (1, 10));
        assert!(cipher.iter().all(|c| c.len() <= 1400));
        // Corrupt one datagram: it must be dropped, not delivered.
        let mut damaged = PacketBatch::new();
        for (i, c) in cipher.iter().enumerate() {
            let mut c = c.to_vec();
            if i == 3 {
                let last = c.len() - 1;
                c[last] ^= 1;
            }
            damaged.push(&c);
        }
        let mut out = PacketBatch::new();
        let dropped = server.open(&mut damaged, &mut out).unwrap();
        assert_eq!(dropped, 1);
        let got: Vec<Vec<u8>> = out.iter().map(<[u8]>::to_vec).collect();
        let want: Vec<Vec<u8>> = (0..10u8)
            .filter(|&i| i != 3)
            .map(|i| vec![i; 100 + i as usize])
            .collect();
        assert_eq!(got, want);
        // A replayed datagram is dropped too.
        let mut replay = PacketBatch::new();
        replay.push(cipher.get(0));
        let mut out = PacketBatch::new();
        assert_eq!(server.open(&mut replay, &mut out).unwrap(), 1);
        assert!(out.is_empty());
    }

    /// Drives one handshake step of `s` with `incoming` and returns what it sends.
    fn step(s: &mut DtlsSession, incoming: Option<&[u8]>) -> Vec<Vec<u8>> {
        if let Some(d) = incoming {
            let mut b = PacketBatch::new();
            b.push(d);
            s.feed(&mut b, 0);
        }
        let _ = s.stream.do_handshake();
        let mut out = PacketBatch::new();
        s.take_outbound(&mut out);
        out.iter().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn server_answers_a_client_hello_with_a_cookie_first() {
        let k = Keys::new();
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut server = DtlsSession::new(Role::Server, &k.id("server"), k.pin("client"), 1400, Some(peer)).unwrap();
        let mut client = DtlsSession::new(Role::Client, &k.id("client"), k.pin("server"), 1400, None).unwrap();
        let hello = step(&mut client, None);
        assert_eq!(hello.len(), 1);
        // Record type 22 (handshake), message type 1 (ClientHello) after the 13-byte header.
        assert_eq!((hello[0][0], hello[0][13]), (RECORD_HANDSHAKE, 1));
        let answer = step(&mut server, Some(&hello[0]));
        assert_eq!(answer.len(), 1, "one HelloVerifyRequest, nothing else");
        assert_eq!(answer[0][13], 3, "message type 3 is HelloVerifyRequest");
        // The client repeats its hello with the cookie; only now does the server proceed.
        let hello2 = step(&mut client, Some(&answer[0]));
        assert_eq!(hello2[0][13], 1);
        assert!(
            hello2[0].len() > hello[0].len(),
            "the second ClientHello carries the cookie"
        );
        let flight = step(&mut server, Some(&hello2[0]));
        assert!(flight.iter().any(|d| d[13] == 2), "ServerHello follows a valid cookie");
        // A second ClientHello with a forged cookie from another session gets no ServerHello.
        let mut other = DtlsSession::new(Role::Server, &k.id("server"), k.pin("client"), 1400, Some(peer)).unwrap();
        let reply = step(&mut other, Some(&hello2[0]));
        assert!(
            reply.iter().all(|d| d[13] != 2),
            "a cookie from another secret is not accepted"
        );
    }

    #[test]
    fn server_refuses_an_unpinned_client_key() {
        let k = Keys::new();
        let p = pair(&k, "other", "server", "server", "client");
        assert!(
            matches!(p.server_result, Err(DtlsError::PeerKeyNotPinned(_))),
            "{:?}",
            p.server_result
        );
        assert!(
            matches!(p.client_result, Err(DtlsError::OurKeyRefused)),
            "{:?}",
            p.client_result
        );
    }

    #[test]
    fn client_refuses_an_unpinned_server_key() {
        let k = Keys::new();
        let p = pair(&k, "client", "server", "other", "client");
        assert!(
            matches!(p.client_result, Err(DtlsError::PeerKeyNotPinned(_))),
            "{:?}",
            p.client_result
        );
        assert!(
            matches!(p.server_result, Err(DtlsError::OurKeyRefused)),
            "{:?}",
            p.server_result
        );
    }
}
