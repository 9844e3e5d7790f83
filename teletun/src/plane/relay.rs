//! server-cluster's relay: frames as they are, between its TUN and the
//! AF_UNIX link, checked on the way in.

use std::io;

use super::DirectionStats;
use crate::io::batch::{PacketBatch, BUFFER_SIZE};
use crate::io::offload::{VirtioHeader, GSO_NONE, VIRTIO_HEADER_LEN};
use crate::io::sys::{self, StopSignal};
use crate::io::{FrameSink, FrameSource};
use crate::proto::packet;

/// Frames per batch.
const FRAME_BUFFERS: usize = 16;

/// How many packets a frame stands for, or `None` when it is not a
/// well-formed frame (a header that does not fit the packet behind it).
pub fn frame_packets(frame: &[u8]) -> Option<usize> {
    let header = VirtioHeader::decode(frame)?;
    let packet = &frame[VIRTIO_HEADER_LEN..];
    packet::inspect(packet).ok()?;
    if header.gso_type == GSO_NONE {
        return Some(1);
    }
    let (hdr_len, gso_size) = (usize::from(header.hdr_len), usize::from(header.gso_size));
    if gso_size == 0 || hdr_len > packet.len() || usize::from(header.csum_start) >= hdr_len {
        return None;
    }
    Some((packet.len() - hdr_len).div_ceil(gso_size).max(1))
}

pub(super) fn run_relay<A: FrameSource, B: FrameSink>(
    mut from: A,
    mut to: B,
    check: bool,
    stats: &DirectionStats,
    stop: &StopSignal,
) -> io::Result<()> {
    let mut frames = PacketBatch::with_capacity(FRAME_BUFFERS, BUFFER_SIZE);
    let fds = [from.fd(), stop.fd()];
    loop {
        match sys::wait(&fds, libc::POLLIN, None)? {
            Some(1) => return Ok(()),
            None => continue,
            Some(_) => {}
        }
        loop {
            frames.clear();
            if from.recv_frames(&mut frames)? == 0 {
                break;
            }
            let (mut count, mut bad) = (0, 0);
            frames.retain(|frame, _| match frame_packets(frame) {
                Some(n) => {
                    count += n;
                    true
                }
                None if check => {
                    bad += 1;
                    false
                }
                None => {
                    count += 1;
                    true
                }
            });
            DirectionStats::add(&stats.malformed, bad);
            let bytes: usize = frames.iter().map(|f| f.len().saturating_sub(VIRTIO_HEADER_LEN)).sum();
            let refused = to.send_frames(&frames)?;
            DirectionStats::add(&stats.refused, refused);
            DirectionStats::add(&stats.packets, count);
            DirectionStats::add(&stats.bytes, bytes);
            if stop.is_stopped() {
                return Ok(());
            }
        }
    }
}
