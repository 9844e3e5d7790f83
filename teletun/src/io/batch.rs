//! Preallocated packet batches: the unit every data-path stage works on.
//!
//! A batch is a fixed set of buffers allocated once. Each holds one packet or
//! datagram somewhere inside it: after some *headroom* (so a record header or
//! a virtio header can be written in front without copying) and before some
//! *tailroom* (for an AEAD tag). A buffer may also hold several datagrams of
//! one size back to back — what a UDP GRO receive hands over — which its
//! *stride* says.

use std::net::SocketAddr;

/// Packets per batch: one `recvmmsg`/`sendmmsg` call moves up to this many.
pub const BATCH_SIZE: usize = 64;
/// Capacity of a buffer that must take anything: the largest UDP payload, a
/// GRO-coalesced datagram train, or a 64 KiB super-packet with its virtio
/// header (or a record's overhead) around it.
pub const BUFFER_SIZE: usize = 65536 + 64;

/// Where one buffer's contents are.
#[derive(Clone, Copy, Debug, Default)]
struct Meta {
    start: usize,
    len: usize,
    /// The size of each datagram in a buffer of several (GRO); 0: just one.
    stride: usize,
    peer: Option<SocketAddr>,
}

/// Up to `slots` packets in buffers allocated once, reused forever.
pub struct PacketBatch {
    bufs: Vec<Box<[u8]>>,
    meta: Vec<Meta>,
    count: usize,
}

impl Default for PacketBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBatch {
    /// [`BATCH_SIZE`] buffers of [`BUFFER_SIZE`] bytes (zeroed pages are mapped lazily).
    pub fn new() -> Self {
        Self::with_capacity(BATCH_SIZE, BUFFER_SIZE)
    }

    /// `slots` buffers of `size` bytes each.
    pub fn with_capacity(slots: usize, size: usize) -> Self {
        PacketBatch {
            bufs: (0..slots).map(|_| vec![0u8; size].into_boxed_slice()).collect(),
            meta: vec![Meta::default(); slots],
            count: 0,
        }
    }

    /// Number of packets held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// How many buffers the batch has.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Each buffer's size.
    pub fn buffer_size(&self) -> usize {
        self.bufs.first().map_or(0, |b| b.len())
    }

    /// Whether the batch holds no packets.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether no further packet fits.
    pub fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }

    /// Free buffers left.
    pub fn room(&self) -> usize {
        self.bufs.len() - self.count
    }

    /// Forgets all packets (buffers stay allocated).
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// The `i`th packet.
    pub fn get(&self, i: usize) -> &[u8] {
        debug_assert!(i < self.count);
        let m = &self.meta[i];
        &self.bufs[i][m.start..m.start + m.len]
    }

    /// The `i`th packet, to change in place.
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        debug_assert!(i < self.count);
        let m = &self.meta[i];
        &mut self.bufs[i][m.start..m.start + m.len]
    }

    /// Where the `i`th packet starts in its buffer (its headroom).
    pub fn start(&self, i: usize) -> usize {
        self.meta[i].start
    }

    /// The `i`th buffer whole, with where its packet starts and its length.
    pub fn buffer_mut(&mut self, i: usize) -> (&mut [u8], usize, usize) {
        let m = self.meta[i];
        (&mut self.bufs[i], m.start, m.len)
    }

    /// Moves the `i`th packet's bounds within its buffer (after sealing or
    /// opening it in place).
    pub fn set_bounds(&mut self, i: usize, start: usize, len: usize) {
        debug_assert!(start + len <= self.bufs[i].len());
        self.meta[i].start = start;
        self.meta[i].len = len;
    }

    /// The address the `i`th packet came from, where the source knows it.
    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        self.meta[i].peer
    }

    /// The size of each datagram in the `i`th buffer when it holds several
    /// back to back (a GRO receive); 0 when it holds one.
    pub fn stride(&self, i: usize) -> usize {
        self.meta[i].stride
    }

    /// Iterates over the packets.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.count).map(|i| self.get(i))
    }

    /// Appends a copy of `packet` at the start of the next buffer. Returns
    /// false (and copies nothing) when the batch is full or the packet is
    /// larger than a buffer.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        self.push_at(0, packet)
    }

    /// Appends a copy of `packet` after `headroom` bytes of the next buffer.
    pub fn push_at(&mut self, headroom: usize, packet: &[u8]) -> bool {
        let Some(buf) = self.bufs.get_mut(self.count) else {
            return false;
        };
        if headroom + packet.len() > buf.len() {
            return false;
        }
        buf[headroom..headroom + packet.len()].copy_from_slice(packet);
        self.meta[self.count] = Meta {
            start: headroom,
            len: packet.len(),
            stride: 0,
            peer: None,
        };
        self.count += 1;
        true
    }

    /// The next free buffer, whole, to be filled in place and committed with
    /// [`Self::commit`].
    pub fn next_free(&mut self) -> Option<&mut [u8]> {
        let i = self.count;
        self.bufs.get_mut(i).map(|b| &mut b[..])
    }

    /// Commits `len` bytes written at `start` into the buffer
    /// [`Self::next_free`] returned.
    pub fn commit(&mut self, start: usize, len: usize, peer: Option<SocketAddr>) {
        debug_assert!(self.count < self.bufs.len() && start + len <= self.bufs[self.count].len());
        self.meta[self.count] = Meta {
            start,
            len,
            stride: 0,
            peer,
        };
        self.count += 1;
    }

    /// Keeps only the packets for which `keep` is true, in order (drops
    /// without copying).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], Option<SocketAddr>) -> bool) {
        let mut w = 0;
        for r in 0..self.count {
            let m = self.meta[r];
            if keep(&self.bufs[r][m.start..m.start + m.len], m.peer) {
                if r != w {
                    self.bufs.swap(r, w);
                    self.meta.swap(r, w);
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
            meta: &mut self.meta,
            count: &mut self.count,
        }
    }
}

/// A batch opened up for the system calls: buffers, contents and the count.
pub(crate) struct RawParts<'a> {
    pub bufs: &'a mut [Box<[u8]>],
    meta: &'a mut [Meta],
    pub count: &'a mut usize,
}

impl RawParts<'_> {
    /// Records buffer `i`'s contents.
    pub fn set(&mut self, i: usize, start: usize, len: usize, stride: usize, peer: Option<SocketAddr>) {
        self.meta[i] = Meta {
            start,
            len,
            stride,
            peer,
        };
    }

    /// Exchanges buffers `a` and `b` with their contents.
    pub fn swap(&mut self, a: usize, b: usize) {
        self.bufs.swap(a, b);
        self.meta.swap(a, b);
    }
}

/// Where a packet is: which buffer of a batch, and which bytes of it. Several
/// may point into one buffer (the datagrams of a GRO receive, opened in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketRef {
    /// The buffer's index in its batch.
    pub buffer: u16,
    /// The first byte.
    pub start: u32,
    /// The length.
    pub len: u32,
}

/// A list of packets inside a batch, preallocated for the most a batch of
/// GRO receives can hold, so that listing them never allocates.
#[derive(Debug)]
pub struct PacketRefs {
    refs: Vec<PacketRef>,
}

/// The most datagrams one GRO receive coalesces (`UDP_GRO` stops at 64 segments).
pub const MAX_SEGMENTS: usize = 64;

impl Default for PacketRefs {
    fn default() -> Self {
        PacketRefs {
            refs: Vec::with_capacity(BATCH_SIZE * MAX_SEGMENTS),
        }
    }
}

impl PacketRefs {
    /// Forgets every reference.
    pub fn clear(&mut self) {
        self.refs.clear();
    }

    /// Adds one.
    pub fn push(&mut self, r: PacketRef) {
        self.refs.push(r);
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// The references themselves.
    pub fn iter(&self) -> impl Iterator<Item = &PacketRef> {
        self.refs.iter()
    }

    /// The packets, read from `batch`.
    pub fn packets<'a>(&'a self, batch: &'a PacketBatch) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.refs.iter().map(move |r| {
            let start = r.start as usize;
            &batch.bufs[usize::from(r.buffer)][start..start + r.len as usize]
        })
    }
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

    #[test]
    fn headroom_and_bounds() {
        let mut b = PacketBatch::with_capacity(2, 100);
        assert!(b.push_at(21, b"packet"));
        assert_eq!((b.get(0), b.start(0)), (&b"packet"[..], 21));
        assert!(!b.push_at(95, b"packet"), "no room after the headroom");
        b.set_bounds(0, 0, 27);
        assert_eq!(b.get(0).len(), 27);
        let mut refs = PacketRefs::default();
        refs.push(PacketRef {
            buffer: 0,
            start: 21,
            len: 3,
        });
        assert_eq!(refs.packets(&b).collect::<Vec<_>>(), vec![&b"pac"[..]]);
    }
}
