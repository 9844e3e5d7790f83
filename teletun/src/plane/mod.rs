//! The data plane's runtime: the threads that run: one per direction, batch by batch, until
//! stopped or until either side fails.
//!
//! A tunnel (client, server-external) runs a session's two halves:
//! - outbound: packets from a [`PacketSource`] are sealed in place by the
//!   session's [`Outbound`] and sent over UDP, runs of equal size as one GSO
//!   send; the thread also keeps the session's timers (heartbeat, silence);
//! - inbound: UDP datagrams (GRO trains) are opened in place by the
//!   session's [`Inbound`], checked, coalesced into frames and written to a
//!   [`FrameSink`].
//!
//! A relay (server-cluster) moves frames as they are, both ways.

mod handshake;
mod relay;
mod tunnel;

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

pub use self::handshake::handshake;
pub use self::relay::frame_packets;
pub use self::tunnel::FrameSplitter;
use crate::io::sys::StopSignal;
use crate::io::udp::{PeerAddress, Udp};
use crate::io::{FrameSink, FrameSource, PacketSource};
use crate::proto::packet;
use crate::tunnel::{Session, TunnelError};

/// Counters for one direction of a data plane.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Packets delivered to the sink.
    pub packets: AtomicU64,
    /// Bytes delivered to the sink.
    pub bytes: AtomicU64,
    /// Packets dropped because they are not well-formed (IP packets, TSO
    /// reads, frames).
    pub malformed: AtomicU64,
    /// Packets refused or lost on the way: too large, failed decryption,
    /// rejected by the kernel, refused by the network.
    pub refused: AtomicU64,
    /// Packets that travelled inside a super-packet begun by an earlier one.
    pub coalesced: AtomicU64,
    /// Packets dropped for an address the peer may not use (a source other
    /// than the pod's, a destination other than the tunnel's).
    pub spoofed: AtomicU64,
    /// When the peer last sent something authentic (a heartbeat counts), in
    /// nanoseconds on the tunnel's clock ([`crate::tunnel::now`]); 0: never.
    pub last_heard: AtomicU64,
}

impl DirectionStats {
    pub(crate) fn add(counter: &AtomicU64, n: impl TryInto<u64>) {
        counter.fetch_add(n.try_into().unwrap_or(0), Ordering::Relaxed);
    }

    /// Notes that the peer was heard from at `now`.
    pub(crate) fn heard(&self, now: crate::tunnel::Time) {
        let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        self.last_heard.fetch_max(nanos, Ordering::Relaxed);
    }

    /// How long the peer has been silent at `now`; `None` if never heard.
    pub fn silent_for(&self, now: crate::tunnel::Time) -> Option<std::time::Duration> {
        match self.last_heard.load(Ordering::Relaxed) {
            0 => None,
            n => Some(now.saturating_sub(std::time::Duration::from_nanos(n))),
        }
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        format!(
            "{} packets, {} bytes, {} malformed, {} refused, {} spoofed, {} coalesced",
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.malformed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.spoofed.load(Ordering::Relaxed),
            self.coalesced.load(Ordering::Relaxed)
        )
    }
}

/// Why a direction ended.
#[derive(Debug)]
pub struct PumpExit {
    /// The direction's name, e.g. "tun→udp".
    pub name: &'static str,
    /// `Ok` when stopped on request.
    pub result: io::Result<()>,
}

/// How a tunnel error reaches the role: the kinds tell them apart.
pub(crate) fn to_io(e: TunnelError) -> io::Error {
    match e {
        TunnelError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()),
        TunnelError::Silent(_) => io::Error::new(io::ErrorKind::TimedOut, e.to_string()),
        other => io::Error::other(other.to_string()),
    }
}

/// The text a panic carried.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Two directions that stop together.
pub struct DataPlane {
    stop: Arc<StopSignal>,
    threads: Vec<thread::JoinHandle<()>>,
    exits: tokio::sync::mpsc::UnboundedReceiver<PumpExit>,
    /// Towards the peer ("outbound" from this role's local side).
    pub outbound: Arc<DirectionStats>,
    /// From the peer.
    pub inbound: Arc<DirectionStats>,
    /// Where the peer is now (it may roam).
    pub peer: Arc<PeerAddress>,
}

/// Which addresses packets from the peer may carry: anti-spoofing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Accept {
    /// Any (server-external: server-cluster checks).
    #[default]
    Any,
    /// Only packets to these (the client: its tunnel's addresses).
    To(Vec<IpAddr>),
    /// Only packets from these (server-cluster: the pod's addresses).
    From(Vec<IpAddr>),
}

impl Accept {
    /// Whether a packet with these addresses may pass.
    pub fn allows(&self, info: &packet::PacketInfo) -> bool {
        match self {
            Accept::Any => true,
            Accept::To(addresses) => addresses.contains(&info.destination),
            Accept::From(addresses) => addresses.contains(&info.source),
        }
    }
}

/// The names of a data plane's two directions, for logs and reports.
pub struct Names {
    /// Towards the peer, e.g. "tun→udp".
    pub outbound: &'static str,
    /// From the peer, e.g. "udp→tun".
    pub inbound: &'static str,
}

impl DataPlane {
    fn new(peer: Arc<PeerAddress>) -> io::Result<(Self, tokio::sync::mpsc::UnboundedSender<PumpExit>)> {
        let (tx, exits) = tokio::sync::mpsc::unbounded_channel();
        Ok((
            DataPlane {
                stop: Arc::new(StopSignal::new()?),
                threads: Vec::new(),
                exits,
                outbound: Arc::default(),
                inbound: Arc::default(),
                peer,
            },
            tx,
        ))
    }

    /// Runs `work` on a thread of its own; its end (error or not) ends the
    /// data plane: it reports first (the first report says why), then stops
    /// its sibling.
    fn spawn<F>(
        &mut self,
        name: &'static str,
        exits: &tokio::sync::mpsc::UnboundedSender<PumpExit>,
        work: F,
    ) -> io::Result<()>
    where
        F: FnOnce(&StopSignal) -> io::Result<()> + Send + 'static,
    {
        let stop = self.stop.clone();
        let exits = exits.clone();
        let spawned = thread::Builder::new().name(name.into()).spawn(move || {
            // A bug that panics ends the data plane with a clear message,
            // never one direction silently while the other looks alive.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&stop))).unwrap_or_else(|payload| {
                    Err(io::Error::other(format!(
                        "the {name} thread stopped on an internal error: {}",
                        panic_message(payload.as_ref())
                    )))
                });
            let _ = exits.send(PumpExit { name, result });
            stop.stop();
        });
        match spawned {
            Ok(t) => {
                self.threads.push(t);
                Ok(())
            }
            Err(e) => {
                self.stop.stop();
                for t in self.threads.drain(..) {
                    let _ = t.join();
                }
                Err(e)
            }
        }
    }

    /// Runs an established session: `source` → seal → `udp` to the peer, and
    /// `udp` → open → check → coalesce → `sink`. On stop, the outbound
    /// direction tells the peer the session is over.
    pub fn tunnel<S, K>(
        names: Names,
        session: Session,
        udp: Arc<Udp>,
        source: S,
        sink: K,
        accept: Accept,
    ) -> io::Result<Self>
    where
        S: PacketSource + 'static,
        K: FrameSink + 'static,
    {
        let peer = Arc::new(PeerAddress::new(session.peer));
        let (mut plane, exits) = Self::new(peer.clone())?;
        let Session {
            outbound,
            inbound,
            path,
            ..
        } = session;
        let (stats, udp_out, peer_out, path_out) = (plane.outbound.clone(), udp.clone(), peer.clone(), path.clone());
        plane.spawn(names.outbound, &exits, move |stop| {
            tunnel::run_outbound(source, outbound, &path_out, &udp_out, &peer_out, &stats, stop)
        })?;
        let stats = plane.inbound.clone();
        plane.spawn(names.inbound, &exits, move |stop| {
            tunnel::run_inbound(&udp, (inbound, &path), sink, &accept, &peer, &stats, stop)
        })?;
        Ok(plane)
    }

    /// Relays frames both ways: `local` → `remote` as they are, and
    /// `remote` → `local` after checking each and its addresses against
    /// `accept` (server-cluster: its TUN and the AF_UNIX link to
    /// server-external).
    pub fn relay<A, B, C, D>(names: Names, local: (A, B), remote: (C, D), accept: Accept) -> io::Result<Self>
    where
        A: FrameSource + 'static,
        B: FrameSink + 'static,
        C: FrameSource + 'static,
        D: FrameSink + 'static,
    {
        let (mut plane, exits) = Self::new(Arc::default())?;
        let ((local_in, local_out), (remote_in, remote_out)) = (local, remote);
        let stats = plane.outbound.clone();
        plane.spawn(names.outbound, &exits, move |stop| {
            relay::run_relay(local_in, remote_out, None, &stats, stop)
        })?;
        let stats = plane.inbound.clone();
        plane.spawn(names.inbound, &exits, move |stop| {
            relay::run_relay(remote_in, local_out, Some(&accept), &stats, stop)
        })?;
        Ok(plane)
    }

    /// Waits until a direction ends (it failed, or its peer closed).
    pub async fn ended(&mut self) -> PumpExit {
        match self.exits.recv().await {
            Some(exit) => exit,
            None => PumpExit {
                name: "data plane",
                result: Ok(()),
            },
        }
    }

    /// Stops both directions and waits for their threads.
    pub fn stop(self) {
        self.stop.stop();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direction that panics ends the data plane with a clear message, and
    /// its sibling stops too.
    #[tokio::test]
    async fn a_panicking_direction_ends_the_plane_with_its_message() {
        let (mut plane, exits) = DataPlane::new(Arc::default()).unwrap();
        plane
            .spawn("failing", &exits, |_| -> io::Result<()> {
                panic!("index out of bounds")
            })
            .unwrap();
        plane
            .spawn("waiting", &exits, |stop| {
                crate::io::sys::wait(&[stop.fd()], libc::POLLIN, None)?;
                Ok(())
            })
            .unwrap();
        let first = plane.ended().await;
        assert_eq!(first.name, "failing");
        let e = first.result.unwrap_err().to_string();
        assert_eq!(
            e,
            "the failing thread stopped on an internal error: index out of bounds"
        );
        let second = plane.ended().await;
        assert_eq!((second.name, second.result.is_ok()), ("waiting", true));
        plane.stop();
    }
}
