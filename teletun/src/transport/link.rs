//! A DTLS session over a UDP socket as a packet source and sink, so pumps can
//! connect it to a TUN device or the AF_UNIX socket.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dtls::{DtlsError, DtlsSession};
use crate::io::batch::PacketBatch;
use crate::io::{sys, PacketSink, PacketSource};

/// A heartbeat: a record with this one byte, never a valid IP packet (a TeleTUN
/// extension; a seed peer would just drop it as malformed).
pub const HEARTBEAT: &[u8] = &[0];
/// Each side sends a heartbeat when it has sent nothing for this long.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A peer that sent no record for this long is gone. Sixteen heartbeats in a
/// row must be lost first, which even a badly lossy path does not do.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(4);

/// When a record was last sent and received, as milliseconds since `epoch`.
struct Liveness {
    epoch: Instant,
    last_rx: AtomicU64,
    last_tx: AtomicU64,
}

impl Liveness {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// The shared parts of both directions.
#[derive(Clone)]
pub struct DtlsLink {
    session: Arc<Mutex<DtlsSession>>,
    udp: Arc<socket2::Socket>,
    /// Where datagrams go and the only address they are accepted from; `None`
    /// on a connected socket.
    peer: Option<SocketAddr>,
    liveness: Arc<Liveness>,
}

fn to_io(e: DtlsError) -> io::Error {
    match e {
        DtlsError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()),
        other => io::Error::other(other.to_string()),
    }
}

impl DtlsLink {
    /// Joins an established session with its socket.
    pub fn new(session: DtlsSession, udp: Arc<socket2::Socket>, peer: Option<SocketAddr>) -> Self {
        DtlsLink {
            session: Arc::new(Mutex::new(session)),
            udp,
            peer,
            liveness: Arc::new(Liveness {
                epoch: Instant::now(),
                last_rx: AtomicU64::new(0),
                last_tx: AtomicU64::new(0),
            }),
        }
    }

    /// Sends heartbeats while the link is otherwise idle and fails once the peer
    /// has been silent for [`SILENCE_LIMIT`]; returns when `stop` is set. Run it
    /// on its own thread beside the two pumps.
    pub fn heartbeat(&self, stop: &sys::StopSignal) -> io::Result<()> {
        let mut beat = PacketBatch::new();
        beat.push(HEARTBEAT);
        let mut sink = self.sink();
        let interval = HEARTBEAT_INTERVAL.as_millis() as u64;
        loop {
            sys::wait(&[stop.fd()], libc::POLLIN, Some(HEARTBEAT_INTERVAL / 2))?;
            if stop.is_stopped() {
                return Ok(());
            }
            let now = self.liveness.now();
            if now.saturating_sub(self.liveness.last_tx.load(Ordering::Relaxed)) >= interval {
                sink.send(&beat)?;
            }
            let silent = now.saturating_sub(self.liveness.last_rx.load(Ordering::Relaxed));
            if silent >= SILENCE_LIMIT.as_millis() as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing heard from the peer for {} s", silent / 1000),
                ));
            }
        }
    }

    /// The receiving half (UDP → plaintext packets).
    pub fn source(&self) -> DtlsSource {
        DtlsSource {
            link: self.clone(),
            cipher: PacketBatch::new(),
            pending: PacketBatch::new(),
        }
    }

    /// The sending half (plaintext packets → UDP).
    pub fn sink(&self) -> DtlsSink {
        DtlsSink {
            link: self.clone(),
            cipher: PacketBatch::new(),
        }
    }

    /// Sends close_notify to the peer, best effort.
    pub fn close(&self) {
        let mut out = PacketBatch::new();
        if let Ok(mut s) = self.session.lock() {
            s.close();
            s.take_outbound(&mut out);
        }
        let _ = sys::send_batch(self.udp.as_raw_fd(), &out, self.peer);
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, DtlsSession>> {
        self.session
            .lock()
            .map_err(|_| io::Error::other("DTLS session lock poisoned"))
    }
}

/// UDP datagrams in, IP packets out.
pub struct DtlsSource {
    link: DtlsLink,
    cipher: PacketBatch,
    pending: PacketBatch,
}

impl PacketSource for DtlsSource {
    fn fd(&self) -> RawFd {
        self.link.udp.as_raw_fd()
    }

    fn recv(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        self.cipher.clear();
        match sys::recv_batch(self.link.udp.as_raw_fd(), &mut self.cipher) {
            Ok(_) => {}
            // An ICMP error for an earlier datagram; the control channel decides
            // whether the peer is gone.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(0),
            Err(e) => return Err(e),
        }
        if let Some(peer) = self.link.peer {
            self.cipher.retain(|_, from| from == Some(peer));
        }
        if self.cipher.is_empty() {
            return Ok(0);
        }
        let before = batch.len();
        let dropped = {
            let mut s = self.link.lock()?;
            let dropped = s.open(&mut self.cipher, batch).map_err(to_io)?;
            s.take_outbound(&mut self.pending);
            dropped
        };
        if dropped < self.cipher.len() {
            // Any authentic record, heartbeat or packet, is a sign of life.
            let liveness = &self.link.liveness;
            liveness.last_rx.store(liveness.now(), Ordering::Relaxed);
            if batch.len() > before {
                let mut i = 0;
                batch.retain(|p, _| {
                    i += 1;
                    i <= before || p != HEARTBEAT
                });
            }
        }
        if !self.pending.is_empty() {
            sys::send_batch(self.link.udp.as_raw_fd(), &self.pending, self.link.peer)?;
            self.pending.clear();
        }
        Ok(batch.len() - before)
    }
}

/// IP packets in, UDP datagrams out.
pub struct DtlsSink {
    link: DtlsLink,
    cipher: PacketBatch,
}

impl PacketSink for DtlsSink {
    fn send(&mut self, batch: &PacketBatch) -> io::Result<usize> {
        let mut next = 0;
        let mut refused = 0;
        while next < batch.len() {
            self.cipher.clear();
            refused += self
                .link
                .lock()?
                .seal(batch, &mut next, &mut self.cipher)
                .map_err(to_io)?;
            match sys::send_batch(self.link.udp.as_raw_fd(), &self.cipher, self.link.peer) {
                Ok(()) => {}
                // Peer not listening (ICMP) or path MTU shrank: the datagrams are lost,
                // as they would be on the wire.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED) | Some(libc::EMSGSIZE)) => {
                    refused += self.cipher.len();
                }
                Err(e) => return Err(e),
            }
        }
        let liveness = &self.link.liveness;
        liveness.last_tx.store(liveness.now(), Ordering::Relaxed);
        Ok(refused)
    }
}
