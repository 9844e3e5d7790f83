//! Preallocated packet batches: the unit every data-path stage works on.

use std::net::SocketAddr;

/// Packets per batch: one `recvmmsg`/`sendmmsg` call moves up to this many.
pub const BATCH_SIZE: usize = 64;
/// Capacity of each packet buffer: the largest UDP payload or IP packet.
pub const BUFFER_SIZE: usize = 65536;

/// Up to [`BATCH_SIZE`] packets in buffers allocated once, reused forever.
pub struct PacketBatch {
    bufs: Vec<Box<[u8]>>,
    lens: Vec<usize>,
    peers: Vec<Option<SocketAddr>>,
    count: usize,
}

impl Default for PacketBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBatch {
    /// An empty batch with all buffers allocated (zeroed pages are mapped lazily).
    pub fn new() -> Self {
        PacketBatch {
            bufs: (0..BATCH_SIZE)
                .map(|_| vec![0u8; BUFFER_SIZE].into_boxed_slice())
                .collect(),
            lens: vec![0; BATCH_SIZE],
            peers: vec![None; BATCH_SIZE],
            count: 0,
        }
    }

    /// Number of packets held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no packets.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether no further packet fits.
    pub fn is_full(&self) -> bool {
        self.count == BATCH_SIZE
    }

    /// Forgets all packets (buffers stay allocated).
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// The `i`th packet.
    pub fn get(&self, i: usize) -> &[u8] {
        debug_assert!(i < self.count);
        &self.bufs[i][..self.lens[i]]
    }

    /// The address the `i`th packet came from, where the source knows it.
    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        self.peers[i]
    }

    /// Iterates over the packets.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.count).map(|i| self.get(i))
    }

    /// Appends a copy of `packet`. Returns false (and copies nothing) when the
    /// batch is full or the packet is larger than a buffer.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if self.is_full() || packet.len() > BUFFER_SIZE {
            return false;
        }
        let i = self.count;
        self.bufs[i][..packet.len()].copy_from_slice(packet);
        self.lens[i] = packet.len();
        self.peers[i] = None;
        self.count += 1;
        true
    }

    /// The next free buffer, to be filled in place and committed with [`Self::commit`].
    pub fn next_free(&mut self) -> Option<&mut [u8]> {
        let i = self.count;
        self.bufs.get_mut(i).map(|b| &mut b[..])
    }

    /// Commits `len` bytes written into the buffer [`Self::next_free`] returned.
    pub fn commit(&mut self, len: usize, peer: Option<SocketAddr>) {
        debug_assert!(self.count < BATCH_SIZE && len <= BUFFER_SIZE);
        self.lens[self.count] = len;
        self.peers[self.count] = peer;
        self.count += 1;
    }

    /// Exchanges buffer `i` with `other` (same capacity) without copying.
    pub fn swap_buffer(&mut self, i: usize, other: &mut Box<[u8]>) {
        std::mem::swap(&mut self.bufs[i], other);
    }

    /// Keeps only the packets for which `keep` is true, in order (used to drop
    /// malformed packets without copying).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], Option<SocketAddr>) -> bool) {
        let mut w = 0;
        for r in 0..self.count {
            if keep(&self.bufs[r][..self.lens[r]], self.peers[r]) {
                if r != w {
                    self.bufs.swap(r, w);
                    self.lens.swap(r, w);
                    self.peers.swap(r, w);
                }
                w += 1;
            }
        }
        self.count = w;
    }

    /// Raw parts for the batched system calls in `io::sys`.
    pub(crate) fn raw_parts(&mut self) -> RawParts<'_> {
        RawParts {
            bufs: &mut self.bufs,
            lens: &mut self.lens,
            peers: &mut self.peers,
            count: &mut self.count,
        }
    }
}

/// A batch opened up for `recvmmsg`: buffers, lengths, senders and the count.
pub(crate) struct RawParts<'a> {
    pub bufs: &'a mut [Box<[u8]>],
    pub lens: &'a mut [usize],
    pub peers: &'a mut [Option<SocketAddr>],
    pub count: &'a mut usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_retain_and_limits() {
        let mut b = PacketBatch::new();
        for i in 0..BATCH_SIZE {
            assert!(b.push(&[i as u8; 3]));
        }
        assert!(!b.push(&[0]));
        b.retain(|p, _| p[0] % 2 == 0);
        assert_eq!(b.len(), BATCH_SIZE / 2);
        assert!(b.iter().enumerate().all(|(i, p)| p == [(2 * i) as u8; 3]));
        b.clear();
        assert!(b.is_empty());
        assert!(!b.push(&vec![0; BUFFER_SIZE + 1]));
    }
}
