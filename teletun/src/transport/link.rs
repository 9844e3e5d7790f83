//! A DTLS session over a UDP socket as a packet source and sink, so pumps can
//! connect it to a TUN device or the AF_UNIX socket.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use super::dtls::{DtlsError, DtlsSession};
use crate::io::batch::PacketBatch;
use crate::io::{sys, PacketSink, PacketSource};

/// The shared parts of both directions.
#[derive(Clone)]
pub struct DtlsLink {
    session: Arc<Mutex<DtlsSession>>,
    udp: Arc<socket2::Socket>,
    /// Where datagrams go and the only address they are accepted from; `None`
    /// on a connected socket.
    peer: Option<SocketAddr>,
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
        {
            let mut s = self.link.lock()?;
            s.open(&mut self.cipher, batch).map_err(to_io)?;
            s.take_outbound(&mut self.pending);
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
        Ok(refused)
    }
}
