//! Running a [`Handshake`] over a UDP socket: what it says to send goes out,
//! what arrives goes in, and its timers get their calls.

use crate::io::batch::{PacketBatch, BUFFER_SIZE};
use crate::io::sys::{self, StopSignal};
use crate::io::udp::Udp;
use crate::tunnel::{self, Handshake, Session, TunnelError};

/// Runs `hs` over `udp` until it ends, or `stop` is set. Blocks: call it
/// from a blocking task.
pub fn handshake(udp: &Udp, hs: &mut dyn Handshake, stop: Option<&StopSignal>) -> Result<Session, TunnelError> {
    let mut inbox = PacketBatch::with_capacity(8, BUFFER_SIZE);
    let mut outbox = PacketBatch::with_capacity(16, 16384);
    let failed = |e: std::io::Error| TunnelError::Failed(e.to_string());
    loop {
        // Everything due, each batch to its own address.
        loop {
            outbox.clear();
            let dest = hs.poll_transmit(&mut outbox);
            if outbox.is_empty() {
                break;
            }
            udp.send(&outbox, dest).map_err(failed)?;
        }
        // The last flight went out above; now the result.
        if let Some(outcome) = hs.outcome() {
            return outcome;
        }
        if stop.is_some_and(StopSignal::is_stopped) {
            return Err(TunnelError::Failed("stopped".into()));
        }
        let now = tunnel::now();
        let due = hs.poll_timeout();
        if now >= due {
            hs.handle_timeout(now);
            continue;
        }
        let fds = [udp.fd(), stop.map_or(-1, StopSignal::fd)];
        let n = if stop.is_some() { 2 } else { 1 };
        if sys::wait(&fds[..n], libc::POLLIN, Some(due - now)).map_err(failed)? != Some(0) {
            continue;
        }
        inbox.clear();
        udp.recv(&mut inbox).map_err(failed)?;
        let now = tunnel::now();
        for i in 0..inbox.len() {
            let (from, stride, data) = (inbox.peer(i), inbox.stride(i), inbox.get(i));
            let stride = if stride == 0 { data.len() } else { stride };
            for datagram in data.chunks(stride.max(1)) {
                hs.handle_datagram(now, from, datagram);
            }
        }
    }
}
