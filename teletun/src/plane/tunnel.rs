//! A tunnel's two directions: seal and send, receive and open.

use std::io;

use super::{to_io, Accept, DirectionStats};
use crate::io::batch::{PacketBatch, PacketRefs, BATCH_SIZE, BUFFER_SIZE, MAX_SEGMENTS};
use crate::io::offload::{split_frame, Coalescer, SplitError};
use crate::io::sys::{self, StopSignal, Wake};
use crate::io::udp::{PeerAddress, Udp};
use crate::io::{FrameSink, FrameSource, PacketSource};
use crate::proto::packet;
use crate::throttle::OncePerSecond;
use crate::tunnel::pmtu::{self, PathState};
use crate::tunnel::{self, Inbound, Outbound};

/// Clamps the MSS of TCP SYNs among `batch`'s packets to what the path
/// carries both ways.
fn clamp_syns(batch: &mut PacketBatch, path: &PathState) {
    let limit = path.clamp_limit();
    for i in 0..batch.len() {
        let (buf, start, len) = batch.buffer_mut(i);
        pmtu::clamp_mss(&mut buf[start..start + len], limit);
    }
}

pub(super) fn run_outbound<S: PacketSource>(
    mut source: S,
    mut outbound: Box<dyn Outbound>,
    path: &PathState,
    udp: &Udp,
    peer: &PeerAddress,
    stats: &DirectionStats,
    stop: &StopSignal,
) -> io::Result<()> {
    let headroom = outbound.headroom();
    let buffer = (headroom + outbound.max_packet() + outbound.tailroom()).max(2048);
    let mut batch = PacketBatch::with_capacity(BATCH_SIZE, buffer);
    // Heartbeats, reports, and a round of path probes (up to a full-size packet each).
    let mut control = PacketBatch::with_capacity(16, buffer);
    let mut dest = peer.reader();
    let result = loop {
        let now = tunnel::now();
        let due = outbound.poll_timeout();
        if now >= due {
            control.clear();
            if let Err(e) = outbound.handle_timeout(now, &mut control) {
                break Err(to_io(e));
            }
            udp.send(&control, dest.get())?;
            continue;
        }
        match sys::wait_or_stop(source.fd(), stop, Some(due - now))? {
            Wake::Stop => break Ok(()),
            Wake::Timeout => continue,
            Wake::Ready => {}
        }
        // Drain the source before polling again: one poll per burst.
        loop {
            batch.clear();
            let n = source.recv(&mut batch, headroom)?;
            DirectionStats::add(&stats.malformed, source.dropped());
            if n == 0 {
                break;
            }
            let bytes: usize = batch.iter().map(<[u8]>::len).sum();
            clamp_syns(&mut batch, path);
            let moves = dest.moves();
            let sealed = outbound.encapsulate(tunnel::now(), &mut batch).map_err(to_io)?;
            // The peer moved while the batch was sealed: what it may be sent
            // was judged for the old address, so the batch is held back
            // (rare: one batch at a move) rather than sent past the new
            // address's limit (tunnel/validation.rs).
            let (refused, held) = match dest.current() {
                (to, now) if now == moves => (udp.send(&batch, to)?, 0),
                _ => (0, sealed.sealed),
            };
            DirectionStats::add(&stats.refused, sealed.oversize + sealed.unvalidated + refused + held);
            DirectionStats::add(&stats.packets, sealed.sealed - refused - held);
            DirectionStats::add(&stats.bytes, bytes);
            // A busy sender still keeps its timers.
            if stop.is_stopped() || tunnel::now() >= outbound.poll_timeout() {
                break;
            }
        }
    };
    // Tell the peer the session is over, whatever ended it.
    control.clear();
    outbound.close(&mut control);
    let _ = udp.send(&control, dest.get());
    result
}

/// Datagram buffers per receive: with GRO each holds a train of up to 64 KiB
/// of datagrams, so a few suffice (and each is 64 KiB of the client's memory).
const RECEIVE_BUFFERS: usize = 8;
/// Frames built per write batch (64 KiB each).
const FRAME_BUFFERS: usize = 8;

/// Says the peer's moves at most once a second, with how many there were:
/// a peer whose NAT rebinds often, or someone replaying its records from
/// other addresses, must not write a line per datagram.
#[derive(Debug, Default)]
struct MoveLog {
    unsaid: u64,
    said: OncePerSecond,
}

impl MoveLog {
    fn note(&mut self, to: std::net::SocketAddr, now: tunnel::Time) -> Option<String> {
        self.unsaid += 1;
        if !self.said.due(now) {
            return None;
        }
        Some(match std::mem::take(&mut self.unsaid) {
            1 => format!("the peer moved to {to}"),
            n => format!("the peer moved {n} times since the last report; now at {to}"),
        })
    }
}

/// `half`: the session's receiving half, and what it learns of the path.
pub(super) fn run_inbound<K: FrameSink>(
    udp: &Udp,
    half: (Box<dyn Inbound>, &PathState),
    mut sink: K,
    accept: &Accept,
    peer: &PeerAddress,
    stats: &DirectionStats,
    stop: &StopSignal,
) -> io::Result<()> {
    let mut batch = PacketBatch::with_capacity(RECEIVE_BUFFERS, BUFFER_SIZE);
    let mut packets = PacketRefs::default();
    let mut reply = PacketBatch::with_capacity(16, 2048);
    let mut frames = PacketBatch::with_capacity(FRAME_BUFFERS, BUFFER_SIZE);
    let mut coalescer = Coalescer::new(sink.capabilities());
    let mut dest = peer.reader();
    let (mut inbound, path) = half;
    let mut moves = MoveLog::default();
    loop {
        match sys::wait_or_stop(udp.fd(), stop, None)? {
            Wake::Stop => return Ok(()),
            Wake::Timeout => continue,
            Wake::Ready => {}
        }
        loop {
            batch.clear();
            if udp.recv(&mut batch)? == 0 {
                break;
            }
            packets.clear();
            reply.clear();
            let now = tunnel::now();
            let opened = inbound
                .decapsulate(now, &mut batch, &mut packets, &mut reply)
                .map_err(to_io)?;
            DirectionStats::add(&stats.refused, opened.dropped);
            if opened.authentic {
                stats.heard(now);
            }
            if let Some(moved) = opened.peer_moved {
                peer.set(moved);
                // Only now, with the address moved, may a proven one lift the limit.
                inbound.moved_back();
                if let Some(line) = moves.note(moved, now) {
                    tracing::info!("{line}");
                }
            }
            if !reply.is_empty() {
                udp.send(&reply, dest.get())?;
            }
            let limit = path.clamp_limit();
            for r in packets.iter() {
                let (buf, _, _) = batch.buffer_mut(usize::from(r.buffer));
                let (start, len) = (r.start as usize, r.len as usize);
                pmtu::clamp_mss(&mut buf[start..start + len], limit);
            }
            let merged_before = coalescer.stats.merged;
            for p in packets.packets(&batch) {
                match packet::inspect(p) {
                    Err(_) => {
                        DirectionStats::add(&stats.malformed, 1);
                        continue;
                    }
                    Ok(info) if !accept.allows(&info) => {
                        DirectionStats::add(&stats.spoofed, 1);
                        continue;
                    }
                    Ok(_) => {}
                }
                while !coalescer.push(p, &mut frames) {
                    flush(&mut coalescer, &mut frames, &mut sink, stats)?;
                }
                DirectionStats::add(&stats.packets, 1);
                DirectionStats::add(&stats.bytes, p.len());
            }
            flush(&mut coalescer, &mut frames, &mut sink, stats)?;
            DirectionStats::add(&stats.coalesced, coalescer.stats.merged - merged_before);
            if stop.is_stopped() {
                return Ok(());
            }
        }
    }
}

/// Completes the frames being built and writes them.
fn flush<K: FrameSink>(
    coalescer: &mut Coalescer,
    frames: &mut PacketBatch,
    sink: &mut K,
    stats: &DirectionStats,
) -> io::Result<()> {
    coalescer.finish(frames);
    if !frames.is_empty() {
        let refused = sink.send_frames(frames)?;
        DirectionStats::add(&stats.refused, refused);
        frames.clear();
    }
    Ok(())
}

/// Frames from an AF_UNIX link, split into the packets they stand for: the
/// packet source of server-external's outbound direction.
pub struct FrameSplitter<S: FrameSource> {
    source: S,
    frames: PacketBatch,
    next: usize,
    malformed: u64,
}

impl<S: FrameSource> FrameSplitter<S> {
    /// Splits what `source` sends.
    pub fn new(source: S) -> Self {
        FrameSplitter {
            source,
            frames: PacketBatch::with_capacity(FRAME_BUFFERS, BUFFER_SIZE),
            next: 0,
            malformed: 0,
        }
    }
}

impl<S: FrameSource> PacketSource for FrameSplitter<S> {
    fn fd(&self) -> std::os::fd::RawFd {
        self.source.fd()
    }

    fn recv(&mut self, batch: &mut PacketBatch, headroom: usize) -> io::Result<usize> {
        let before = batch.len();
        loop {
            while self.next < self.frames.len() {
                let (buf, start, len) = self.frames.buffer_mut(self.next);
                match split_frame(&mut buf[start..start + len], batch, headroom) {
                    Ok(_) => self.next += 1,
                    // The rest waits for the next call, unless nothing fits at all.
                    Err(SplitError::NoRoom) if batch.len() > before || batch.room() < MAX_SEGMENTS => {
                        return Ok(batch.len() - before)
                    }
                    Err(e) => {
                        if self.malformed == 0 {
                            tracing::warn!("dropped a frame from server-cluster: {e}");
                        }
                        self.malformed += 1;
                        self.next += 1;
                    }
                }
            }
            self.frames.clear();
            self.next = 0;
            if self.source.recv_frames(&mut self.frames)? == 0 {
                return Ok(batch.len() - before);
            }
        }
    }

    fn dropped(&mut self) -> u64 {
        std::mem::take(&mut self.malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::MoveLog;
    use std::time::Duration;

    #[test]
    fn moves_are_said_once_a_second_with_their_count() {
        let mut log = MoveLog::default();
        let (a, b) = ("192.0.2.1:4000".parse().unwrap(), "192.0.2.2:4000".parse().unwrap());
        let t0 = Duration::from_secs(10);
        assert_eq!(log.note(a, t0).as_deref(), Some("the peer moved to 192.0.2.1:4000"));
        for k in 0..1000 {
            assert_eq!(
                log.note(if k % 2 == 0 { b } else { a }, t0 + Duration::from_micros(k)),
                None
            );
        }
        let next = log.note(b, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(
            next,
            "the peer moved 1001 times since the last report; now at 192.0.2.2:4000"
        );
        assert_eq!(
            log.note(a, t0 + Duration::from_secs(3)).as_deref(),
            Some("the peer moved to 192.0.2.1:4000")
        );
    }
}
