//! Batched packet I/O: the TUN device, the AF_UNIX link, the UDP socket, the
//! batched system calls beneath them, and segmentation offload in userspace.

pub mod batch;
pub mod offload;
pub mod seqpacket;
pub mod sys;
pub mod tun;
pub mod udp;

use std::io;
use std::os::fd::RawFd;

use batch::PacketBatch;
use offload::Capabilities;

/// Where plaintext packets come from, each placed after the headroom a
/// record needs (TUN reads; frames from the AF_UNIX link, split).
/// Non-blocking: `recv` returns 0 when nothing is waiting.
pub trait PacketSource: Send {
    /// The descriptor that becomes readable when packets may be waiting.
    fn fd(&self) -> RawFd;
    /// Appends waiting packets to `batch`, each after `headroom` bytes of
    /// its buffer; returns how many.
    fn recv(&mut self, batch: &mut PacketBatch, headroom: usize) -> io::Result<usize>;
    /// Input dropped as malformed since the last call.
    fn dropped(&mut self) -> u64 {
        0
    }
}

/// Where frames go: a virtio-net header and an IP packet or super-packet
/// each (TUN writes; the AF_UNIX link).
pub trait FrameSink: Send {
    /// What super-packets it takes (what a coalescer may build for it).
    fn capabilities(&self) -> Capabilities;
    /// Sends every frame of `frames`. Returns how many the destination
    /// refused (dropped and counted, not an error).
    fn send_frames(&mut self, frames: &PacketBatch) -> io::Result<usize>;
}

/// Where frames come from (server-cluster's TUN reads; the AF_UNIX link).
pub trait FrameSource: Send {
    /// The descriptor that becomes readable when frames may be waiting.
    fn fd(&self) -> RawFd;
    /// Appends waiting frames to `frames`, one per buffer; returns how many.
    fn recv_frames(&mut self, frames: &mut PacketBatch) -> io::Result<usize>;
}
