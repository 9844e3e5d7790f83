//! The tunnel seam: what roles see of the encrypted data plane.
//!
//! One sans-IO core per transport (DTLS 1.2 today, in [`dtls`]) that never
//! touches a socket or reads a clock, in the manner of quinn-proto and
//! boringtun's `Tunn`:
//! - a [`Handshake`] takes datagrams and the time, says what to send and when
//!   to call it again, and ends as a [`Session`] or an error;
//! - a [`Session`] is two halves that share no lock: [`Outbound`] turns a
//!   batch of plaintext packets into datagrams in place and keeps the timers
//!   (heartbeat, silence limit); [`Inbound`] turns a batch of datagrams into
//!   plaintext packets in place.
//!
//! Roles and the runtime in `io` know only these traits; a second transport
//! would touch only this folder and the CLI.

pub mod dtls;
pub mod liveness;
pub mod pmtu;
pub mod validation;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::io::batch::{PacketBatch, PacketRefs};
use crate::keys::{Identity, PinnedKey};

/// The transports there are; roles get one from the CLI and never name it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// DTLS 1.2 (OpenSSL handshake, AES-GCM records).
    #[default]
    Dtls,
}

impl Transport {
    /// Bytes each packet costs on the wire beyond itself (inside UDP).
    pub fn overhead(self) -> usize {
        match self {
            Transport::Dtls => dtls::DTLS_OVERHEAD,
        }
    }

    /// A client handshake; `mtu` is the largest UDP payload the path carries.
    pub fn client(
        self,
        now: Time,
        identity: &Identity,
        pin: PinnedKey,
        mtu: usize,
        binding: ChannelBinding,
    ) -> anyhow::Result<Box<dyn Handshake>> {
        match self {
            Transport::Dtls => Ok(Box::new(dtls::DtlsHandshake::client(now, identity, pin, mtu, binding)?)),
        }
    }

    /// A server handshake waiting for a client at `peer`.
    pub fn server(
        self,
        now: Time,
        identity: &Identity,
        pin: PinnedKey,
        mtu: usize,
        peer: IpAddr,
        binding: ChannelBinding,
    ) -> anyhow::Result<Box<dyn Handshake>> {
        match self {
            Transport::Dtls => Ok(Box::new(dtls::DtlsHandshake::server(
                now, identity, pin, mtu, peer, binding,
            )?)),
        }
    }
}

/// A secret both ends of one authenticated control connection hold and
/// nobody else does (exported from its TLS session, RFC 8446 §7.5). The
/// data-plane handshake proves with it that it belongs to that session, so
/// a host sharing the client's address cannot take the client's place.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelBinding(pub [u8; 32]);

impl std::fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelBinding(…)")
    }
}

/// A moment on the tunnel's clock, as time since the clock's start. The
/// runtime reads `CLOCK_BOOTTIME` ([`now`]), which keeps counting while the
/// machine sleeps, so a laptop that slept knows how long its peer was silent.
pub type Time = Duration;

/// `CLOCK_BOOTTIME` now.
pub fn now() -> Time {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into a live one.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    debug_assert_eq!(r, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Why a session ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Our verification refused the peer's certificate: it is not the pinned key.
    #[error("the peer's key is not the pinned key {0}")]
    PeerKeyNotPinned(String),
    /// The peer refused our certificate.
    #[error("the peer refused our key")]
    OurKeyRefused,
    /// The peer ended the session (close_notify).
    #[error("the peer closed the session")]
    Closed,
    /// No handshake within the limit.
    #[error("no handshake within {0:?}: is UDP to the server's port blocked?")]
    HandshakeTimeout(Duration),
    /// Nothing authentic heard from the peer for this long.
    #[error("nothing heard from the peer for {} s", .0.as_secs())]
    Silent(Duration),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// Setting up a session.
pub trait Handshake: Send {
    /// A datagram arrived from `from` (`None` on a connected socket).
    fn handle_datagram(&mut self, now: Time, from: Option<SocketAddr>, datagram: &[u8]);
    /// Appends the datagrams to send now to `out`; returns where to send them
    /// (`None`: the connected peer).
    fn poll_transmit(&mut self, out: &mut PacketBatch) -> Option<SocketAddr>;
    /// When to call [`Self::handle_timeout`] if nothing arrives first.
    fn poll_timeout(&self) -> Time;
    /// Time passed: retransmit, or give up.
    fn handle_timeout(&mut self, now: Time);
    /// The result, once there is one (taken once).
    fn outcome(&mut self) -> Option<Result<Session, TunnelError>>;
}

/// An established session, in two halves.
pub struct Session {
    /// Plaintext → datagrams, and the timers.
    pub outbound: Box<dyn Outbound>,
    /// Datagrams → plaintext.
    pub inbound: Box<dyn Inbound>,
    /// Where the peer's handshake came from (the server's view of the client).
    pub peer: Option<SocketAddr>,
    /// What was negotiated, for logs ("DTLS 1.2 ECDHE-ECDSA-AES128-GCM-SHA256").
    pub description: String,
    /// What the session found out about the path (the largest packet that passes).
    pub path: std::sync::Arc<pmtu::PathState>,
}

/// What [`Outbound::encapsulate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encapsulated {
    /// Packets turned into datagrams.
    pub sealed: usize,
    /// Packets dropped: empty, or larger than [`Outbound::max_packet`].
    pub oversize: usize,
    /// Packets held back from a peer address not validated yet, past what
    /// it may be sent (`validation.rs`).
    pub unvalidated: usize,
}

/// The sending half of a session.
pub trait Outbound: Send {
    /// Bytes every packet must have free before it in its buffer.
    fn headroom(&self) -> usize;
    /// Bytes every packet must have free after it in its buffer.
    fn tailroom(&self) -> usize;
    /// The largest packet one datagram carries.
    fn max_packet(&self) -> usize;
    /// Turns every packet of `batch` into a datagram in place, dropping (and
    /// counting) those that cannot go.
    fn encapsulate(&mut self, now: Time, batch: &mut PacketBatch) -> Result<Encapsulated, TunnelError>;
    /// When to call [`Self::handle_timeout`].
    fn poll_timeout(&self) -> Time;
    /// Appends a heartbeat to `out` when one is due; fails when the peer has
    /// been silent too long.
    fn handle_timeout(&mut self, now: Time, out: &mut PacketBatch) -> Result<(), TunnelError>;
    /// Appends the datagram that ends the session to `out`.
    fn close(&mut self, out: &mut PacketBatch);
}

/// What [`Inbound::decapsulate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decapsulated {
    /// Packets listed for delivery.
    pub packets: usize,
    /// Datagrams or records dropped: malformed, forged, replayed.
    pub dropped: usize,
    /// The peer's newest authentic record came from this new address: send
    /// there from now on (roaming, NAT rebinding).
    pub peer_moved: Option<SocketAddr>,
    /// At least one authentic record arrived (a heartbeat counts): the peer
    /// is alive.
    pub authentic: bool,
}

/// The receiving half of a session.
pub trait Inbound: Send {
    /// Opens every datagram of `batch` in place (several per buffer where a
    /// GRO receive coalesced them) and lists the plaintext packets in
    /// `packets`; datagrams the transport must answer (handshake
    /// retransmissions) go to `reply`, for the current peer.
    fn decapsulate(
        &mut self,
        now: Time,
        batch: &mut PacketBatch,
        packets: &mut PacketRefs,
        reply: &mut PacketBatch,
    ) -> Result<Decapsulated, TunnelError>;

    /// Called once the sender's address follows a `peer_moved`: a move back
    /// to an address proven before lifts the limit on what it is sent only
    /// then, so that no batch judged unlimited goes to the address left.
    fn moved_back(&mut self) {}
}
