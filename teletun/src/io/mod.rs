//! Batched packet I/O: sources and sinks of [`batch::PacketBatch`]es (TUN,
//! AF_UNIX seqpacket, DTLS over UDP) and the pump threads that connect them.

pub mod batch;
pub mod pump;
pub mod seqpacket;
pub mod sys;
pub mod tun;

use std::io;
use std::os::fd::RawFd;

use batch::PacketBatch;

/// Something packets come from, in batches. Non-blocking: `recv` returns 0
/// when nothing is waiting; the pump polls [`PacketSource::fd`].
pub trait PacketSource {
    /// The descriptor that becomes readable when packets may be waiting.
    fn fd(&self) -> RawFd;
    /// Appends waiting packets to `batch`; returns how many.
    fn recv(&mut self, batch: &mut PacketBatch) -> io::Result<usize>;
}

/// Something packets go to, in batches.
pub trait PacketSink {
    /// Sends every packet of `batch`. Returns how many the destination refused
    /// (dropped and counted, not an error).
    fn send(&mut self, batch: &PacketBatch) -> io::Result<usize>;
}
