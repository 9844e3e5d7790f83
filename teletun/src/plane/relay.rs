//! server-cluster's relay: frames as they are, between its TUN and the
//! AF_UNIX link, checked on the way in.

use std::io;

use super::{Accept, DirectionStats};
use crate::io::batch::{PacketBatch, BUFFER_SIZE};
use crate::io::offload::{gso_header_len, VirtioHeader, GSO_NONE, VIRTIO_HEADER_LEN};
use crate::io::sys::{self, StopSignal, Wake};
use crate::io::{FrameSink, FrameSource};
use crate::proto::packet;

/// Frames per batch.
const FRAME_BUFFERS: usize = 16;

/// How many packets a frame stands for and its packet's addresses, or
/// `None` when it is not a well-formed frame (a header that does not fit the
/// packet behind it). The segments of a super-packet share its addresses.
pub fn frame_packets(frame: &[u8]) -> Option<(usize, packet::PacketInfo)> {
    let header = VirtioHeader::decode(frame)?;
    let packet = &frame[VIRTIO_HEADER_LEN..];
    let info = packet::inspect(packet).ok()?;
    if header.gso_type == GSO_NONE {
        return Some((1, info));
    }
    let (_, header_len) = gso_header_len(packet, &header).ok()?;
    Some((
        (packet.len() - header_len)
            .div_ceil(usize::from(header.gso_size))
            .max(1),
        info,
    ))
}

/// Moves frames from `from` to `to`; with `check`, only well-formed frames
/// whose addresses it allows.
pub(super) fn run_relay<A: FrameSource, B: FrameSink>(
    mut from: A,
    mut to: B,
    check: Option<&Accept>,
    stats: &DirectionStats,
    stop: &StopSignal,
) -> io::Result<()> {
    let mut frames = PacketBatch::with_capacity(FRAME_BUFFERS, BUFFER_SIZE);
    loop {
        match sys::wait_or_stop(from.fd(), stop, None)? {
            Wake::Stop => return Ok(()),
            Wake::Timeout => continue,
            Wake::Ready => {}
        }
        loop {
            frames.clear();
            if from.recv_frames(&mut frames)? == 0 {
                break;
            }
            let (mut count, mut bad, mut spoofed) = (0, 0, 0);
            frames.retain(|frame, _| match (frame_packets(frame), check) {
                (Some((n, info)), Some(accept)) if !accept.allows(&info) => {
                    spoofed += n;
                    false
                }
                (Some((n, _)), _) => {
                    count += n;
                    true
                }
                (None, Some(_)) => {
                    bad += 1;
                    false
                }
                (None, None) => {
                    count += 1;
                    true
                }
            });
            DirectionStats::add(&stats.malformed, bad);
            DirectionStats::add(&stats.spoofed, spoofed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::offload::VIRTIO_HEADER_LEN;

    fn frame(source: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; VIRTIO_HEADER_LEN + 28];
        let p = &mut f[VIRTIO_HEADER_LEN..];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&source);
        p[16..20].copy_from_slice(&[10, 96, 0, 10]);
        f
    }

    #[test]
    fn the_client_may_speak_only_as_the_pod() {
        let pod = Accept::From(vec!["10.244.1.5".parse().unwrap()]);
        let (n, info) = frame_packets(&frame([10, 244, 1, 5])).unwrap();
        assert_eq!(n, 1);
        assert!(pod.allows(&info));
        let (_, forged) = frame_packets(&frame([10, 244, 2, 9])).unwrap();
        assert!(!pod.allows(&forged));
        assert!(Accept::Any.allows(&forged));
        // The server may send only to the tunnel's address.
        let laptop = Accept::To(vec!["10.96.0.10".parse().unwrap()]);
        assert!(laptop.allows(&forged));
        assert!(!Accept::To(vec!["192.168.1.1".parse().unwrap()]).allows(&forged));
        // Not a frame at all.
        assert!(frame_packets(&[0; 5]).is_none());
    }
}
