//! Segmentation offload in userspace, as pure functions over batches:
//! - [`Coalescer`] (GRO): consecutive TCP segments (and UDP datagrams) of one
//!   flow become one super-packet behind a virtio-net header, so the kernel
//!   that receives it from a TUN (or server-cluster, over the AF_UNIX link)
//!   handles one large packet instead of ~40 small ones;
//! - [`split_frame`] (GSO): a super-packet with its virtio-net header becomes
//!   the packets it stands for, each at the headroom a record needs.
//!
//! The rules follow the kernel's GRO (and wireguard-go's
//! `tun/offload_linux.go`): only in-order segments of one flow with equal
//! headers merge, all but the last of one size, PSH only on the last, and every
//! merged segment's checksum is checked first, because the merged packet
//! goes to the kernel with its checksum marked as still to be done.

use crate::io::batch::PacketBatch;
use crate::proto::checksum;

/// Bytes of the virtio-net header in front of every frame (`struct
/// virtio_net_hdr`, the size a TUN with `IFF_VNET_HDR` uses by default).
pub const VIRTIO_HEADER_LEN: usize = 10;

/// `flags`: the checksum at `csum_start + csum_offset` is still to be done.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a super-packet.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP (either IP version).
pub const GSO_UDP_L4: u8 = 5;

/// The virtio-net header (fields in host byte order, as the TUN driver
/// reads them on a little-endian host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioHeader {
    /// [`F_NEEDS_CSUM`] or 0.
    pub flags: u8,
    /// [`GSO_NONE`], [`GSO_TCPV4`], [`GSO_TCPV6`] or [`GSO_UDP_L4`].
    pub gso_type: u8,
    /// Bytes of IP and transport headers.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Where in it the checksum field is.
    pub csum_offset: u16,
}

impl VirtioHeader {
    /// Reads a header from the first [`VIRTIO_HEADER_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..VIRTIO_HEADER_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VirtioHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VIRTIO_HEADER_LEN`] bytes.
    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// Frames being built at once (flows interleaved in one batch).
const MAX_OPEN: usize = 8;
/// Segments in one super-packet at most.
pub const MAX_SEGMENTS: usize = 64;
/// The longest super-packet (the IPv4 total length field).
const MAX_PACKET: usize = 65535;

/// A TCP or UDP packet's layout, where it has one we understand.
#[derive(Clone, Copy, Debug)]
struct Layout {
    v6: bool,
    protocol: u8,
    /// IP header bytes.
    ip: usize,
    /// Transport header bytes.
    transport: usize,
}

impl Layout {
    /// The layout of `p`: IPv4 without options or fragments, or IPv6 with
    /// TCP or UDP right after the fixed header; lengths consistent.
    fn of(p: &[u8]) -> Option<Layout> {
        let (v6, ip, protocol) = match p.first()? >> 4 {
            4 => {
                if p.len() < 20 || p[0] & 0x0f != 5 || usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len() {
                    return None;
                }
                // More fragments, or a fragment offset.
                if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
                    return None;
                }
                (false, 20, p[9])
            }
            6 => {
                if p.len() < 40 || usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 != p.len() {
                    return None;
                }
                (true, 40, p[6])
            }
            _ => return None,
        };
        let transport = match protocol {
            TCP => {
                let len = usize::from(p.get(ip + 12)? >> 4) * 4;
                if len < 20 || ip + len > p.len() {
                    return None;
                }
                len
            }
            UDP => {
                if ip + 8 > p.len() || usize::from(u16::from_be_bytes([p[ip + 4], p[ip + 5]])) != p.len() - ip {
                    return None;
                }
                8
            }
            _ => return None,
        };
        Some(Layout {
            v6,
            protocol,
            ip,
            transport,
        })
    }

    fn headers(&self) -> usize {
        self.ip + self.transport
    }

    /// The addresses' bytes in the IP header.
    fn addresses(&self) -> std::ops::Range<usize> {
        if self.v6 {
            8..40
        } else {
            12..20
        }
    }

    /// Whether `a` and `b` (of this layout) belong to one flow.
    fn same_flow(&self, a: &[u8], b: &[u8]) -> bool {
        let r = self.addresses();
        a[r.clone()] == b[r] && a[self.ip..self.ip + 4] == b[self.ip..self.ip + 4]
    }

    /// Whether the checksums of `p` are right: the transport's, and for
    /// IPv4 the header's (splitting writes fresh headers, so a merged packet
    /// with a bad one would come out repaired; the fuzzer found that).
    fn checksum_valid(&self, p: &[u8]) -> bool {
        if !self.v6 && checksum::sum(&p[..self.ip]) != 0xffff {
            return false;
        }
        // Only the form a split writes back may merge: a TCP checksum of
        // 0xffff is the other zero (never computed), a UDP one of 0 means
        // "none" (found in review: both came out of a split changed).
        let at = self.ip + if self.protocol == TCP { 16 } else { 6 };
        let field = u16::from_be_bytes([p[at], p[at + 1]]);
        if (self.protocol == TCP && field == 0xffff) || (self.protocol == UDP && field == 0) {
            return false;
        }
        let pseudo = checksum::pseudo_header(&p[self.addresses()], self.protocol, (p.len() - self.ip) as u32);
        checksum::transport_valid(pseudo, &p[self.ip..])
    }
}

/// A super-packet being built in one buffer of the output batch.
#[derive(Clone, Copy, Debug)]
struct Frame {
    buffer: usize,
    layout: Layout,
    gso_size: usize,
    segments: usize,
    last_payload: usize,
    next_seq: u32,
    next_id: u16,
    psh: bool,
    first_checked: bool,
}

/// What super-packets the destination takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// TCP super-packets (TSO).
    pub tcp: bool,
    /// UDP super-packets (USO).
    pub udp: bool,
}

/// Counters of what the coalescer saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Packets merged into a frame begun by an earlier one.
    pub merged: u64,
    /// Packets that could have merged but whose checksum was wrong (sent on
    /// alone: the kernel drops and counts them).
    pub bad_checksums: u64,
    /// Packets no frame can carry (empty, or too large for a buffer), dropped.
    pub dropped: u64,
}

/// Builds frames (virtio-net header + packet or super-packet) from packets.
#[derive(Debug, Default)]
pub struct Coalescer {
    capabilities: Capabilities,
    open: Vec<Frame>,
    /// What it has done.
    pub stats: CoalesceStats,
}

impl Coalescer {
    /// A coalescer for a destination that takes `capabilities`; with neither,
    /// every packet becomes a frame of its own.
    pub fn new(capabilities: Capabilities) -> Self {
        Coalescer {
            capabilities,
            open: Vec::with_capacity(MAX_OPEN),
            stats: CoalesceStats::default(),
        }
    }

    /// Adds `packet`: appended to the frame it continues, or a frame of its
    /// own in `out`. Returns false, having done nothing, when `out` has no
    /// free buffer for it: [`Self::finish`], send `out`, clear it, and push again.
    pub fn push(&mut self, packet: &[u8], out: &mut PacketBatch) -> bool {
        let layout = Layout::of(packet);
        let mut may_start = true;
        if let Some(layout) = layout {
            let open = self.open.iter().position(|f| {
                f.layout.protocol == layout.protocol
                    && f.layout.v6 == layout.v6
                    && layout.same_flow(packet, first_packet(out, f.buffer))
            });
            if let Some(k) = open {
                match self.try_append(k, layout, packet, out) {
                    Append::Done => return true,
                    Append::No => {}
                    Append::BadChecksum => may_start = false,
                }
                // Whatever comes next of this flow must not overtake this packet.
                let f = self.open.remove(k);
                finalize(&f, out);
            }
        }
        if out.is_full() {
            return false;
        }
        if packet.is_empty() || VIRTIO_HEADER_LEN + packet.len() > out.buffer_size() {
            // Only garbage is empty or larger than a buffer sized for the
            // largest super-packet (the fuzzer found the empty case: a frame
            // without a packet is one no kernel takes).
            self.stats.dropped += 1;
            return true;
        }
        let buffer = out.len();
        let buf = out.next_free().expect("not full");
        buf[..VIRTIO_HEADER_LEN].fill(0);
        buf[VIRTIO_HEADER_LEN..VIRTIO_HEADER_LEN + packet.len()].copy_from_slice(packet);
        out.commit(0, VIRTIO_HEADER_LEN + packet.len(), None);
        if let Some(layout) = layout.filter(|l| may_start && self.may_merge(l, packet)) {
            if self.open.len() == MAX_OPEN {
                let f = self.open.remove(0);
                finalize(&f, out);
            }
            let payload = packet.len() - layout.headers();
            let (seq, id) = sequence_and_id(&layout, packet);
            self.open.push(Frame {
                buffer,
                layout,
                gso_size: payload,
                segments: 1,
                last_payload: payload,
                next_seq: seq.wrapping_add(payload as u32),
                next_id: id.wrapping_add(1),
                psh: layout.protocol == TCP && packet[layout.ip + 13] & TCP_PSH != 0,
                first_checked: false,
            });
        }
        true
    }

    /// Completes every open frame; `out` is then ready to send.
    pub fn finish(&mut self, out: &mut PacketBatch) {
        for f in self.open.drain(..) {
            finalize(&f, out);
        }
    }

    /// Whether a packet of `layout` may start or join a super-packet.
    fn may_merge(&self, layout: &Layout, p: &[u8]) -> bool {
        let payload = p.len() - layout.headers();
        match layout.protocol {
            TCP => {
                let flags = p[layout.ip + 13];
                self.capabilities.tcp && payload > 0 && (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH)
            }
            UDP => self.capabilities.udp && payload > 0,
            _ => false,
        }
    }

    fn try_append(&mut self, k: usize, layout: Layout, p: &[u8], out: &mut PacketBatch) -> Append {
        let f = self.open[k];
        if !self.may_merge(&layout, p) || layout.transport != f.layout.transport {
            return Append::No;
        }
        let payload = p.len() - layout.headers();
        let (seq, id) = sequence_and_id(&layout, p);
        let (_, start, len) = out.buffer_mut(f.buffer);
        let frame_len = len - VIRTIO_HEADER_LEN;
        let fits = frame_len + payload <= MAX_PACKET && start + len + payload <= out.buffer_size();
        if f.psh
            || f.segments == MAX_SEGMENTS
            || f.last_payload != f.gso_size
            || payload > f.gso_size
            || !fits
            || (layout.protocol == TCP && seq != f.next_seq)
            || (!layout.v6 && id != f.next_id)
            || !headers_match(&layout, first_packet(out, f.buffer), p)
        {
            return Append::No;
        }
        if !f.first_checked && !layout.checksum_valid(first_packet(out, f.buffer)) {
            self.stats.bad_checksums += 1;
            return Append::No;
        }
        if !layout.checksum_valid(p) {
            self.stats.bad_checksums += 1;
            return Append::BadChecksum;
        }
        let (buf, start, len) = out.buffer_mut(f.buffer);
        buf[start + len..start + len + payload].copy_from_slice(&p[layout.headers()..]);
        out.set_bounds(f.buffer, start, len + payload);
        let f = &mut self.open[k];
        f.first_checked = true;
        f.segments += 1;
        f.last_payload = payload;
        f.next_seq = seq.wrapping_add(payload as u32);
        f.next_id = id.wrapping_add(1);
        f.psh = layout.protocol == TCP && p[layout.ip + 13] & TCP_PSH != 0;
        self.stats.merged += 1;
        Append::Done
    }
}

/// What became of a packet offered to an open frame.
enum Append {
    /// It is part of the frame now.
    Done,
    /// It does not continue the frame.
    No,
    /// Its checksum is wrong: it must travel alone.
    BadChecksum,
}

/// The packet of a frame (after its virtio-net header) in `out`.
fn first_packet(out: &PacketBatch, buffer: usize) -> &[u8] {
    &out.get(buffer)[VIRTIO_HEADER_LEN..]
}

/// TCP sequence number (0 for UDP) and IPv4 identification (0 for IPv6).
fn sequence_and_id(l: &Layout, p: &[u8]) -> (u32, u16) {
    let seq = if l.protocol == TCP {
        u32::from_be_bytes(p[l.ip + 4..l.ip + 8].try_into().expect("4 bytes"))
    } else {
        0
    };
    let id = if l.v6 { 0 } else { u16::from_be_bytes([p[4], p[5]]) };
    (seq, id)
}

/// Whether `p` carries the same headers as the frame's first packet `a`,
/// but for what segmentation changes (lengths, IPv4 id, checksums, TCP
/// sequence number and PSH): what splitting the frame would give back.
fn headers_match(l: &Layout, a: &[u8], p: &[u8]) -> bool {
    let ip_same = if l.v6 {
        a[..4] == p[..4] && a[6..40] == p[6..40]
    } else {
        a[..2] == p[..2] && a[6..10] == p[6..10] && a[12..20] == p[12..20]
    };
    let t = l.ip;
    let transport_same = if l.protocol == TCP {
        // Ports, ack, data offset, window, urgent pointer, options; flags
        // differ at most in PSH.
        a[t..t + 4] == p[t..t + 4]
            && a[t + 8..t + 13] == p[t + 8..t + 13]
            && a[t + 13] & !TCP_PSH == p[t + 13] & !TCP_PSH
            && a[t + 14..t + 16] == p[t + 14..t + 16]
            && a[t + 18..t + l.transport] == p[t + 18..t + l.transport]
    } else {
        a[t..t + 4] == p[t..t + 4]
    };
    ip_same && transport_same
}

/// Writes a merged frame's lengths, checksums and virtio-net header; a
/// frame of one packet keeps its all-zero header (nothing to do).
fn finalize(f: &Frame, out: &mut PacketBatch) {
    if f.segments < 2 {
        return;
    }
    let l = f.layout;
    let (buf, start, len) = out.buffer_mut(f.buffer);
    let p = &mut buf[start + VIRTIO_HEADER_LEN..start + len];
    let total = p.len();
    if l.v6 {
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[10..12].fill(0);
        let sum = !checksum::sum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let t = l.ip;
    let transport_len = (total - t) as u32;
    let csum_offset = if l.protocol == TCP {
        if f.psh {
            p[t + 13] |= TCP_PSH;
        }
        16
    } else {
        p[t + 4..t + 6].copy_from_slice(&(transport_len as u16).to_be_bytes());
        6
    };
    // The kernel completes the checksum from here (CHECKSUM_PARTIAL): the
    // pseudo-header's sum, not complemented.
    let pseudo = checksum::pseudo_header(&p[l.addresses()], l.protocol, transport_len);
    p[t + csum_offset..t + csum_offset + 2].copy_from_slice(&pseudo.to_be_bytes());
    let gso_type = match (l.protocol, l.v6) {
        (TCP, false) => GSO_TCPV4,
        (TCP, true) => GSO_TCPV6,
        _ => GSO_UDP_L4,
    };
    VirtioHeader {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: l.headers() as u16,
        gso_size: f.gso_size as u16,
        csum_start: t as u16,
        csum_offset: csum_offset as u16,
    }
    .encode(&mut buf[start..start + VIRTIO_HEADER_LEN]);
}

/// Why a frame could not be split.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// Shorter than its header, or a header that does not describe the packet.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// More segments than the batch has free buffers.
    #[error("the frame has more segments than the batch has room")]
    NoRoom,
}

/// Splits `frame` (virtio-net header + packet) into the packets it stands
/// for, each appended to `out` after `headroom` bytes, with complete
/// checksums. Returns how many.
pub fn split_frame(frame: &mut [u8], out: &mut PacketBatch, headroom: usize) -> Result<usize, SplitError> {
    let header = VirtioHeader::decode(frame).ok_or_else(|| SplitError::Malformed("no header".into()))?;
    let packet = &mut frame[VIRTIO_HEADER_LEN..];
    if packet.is_empty() {
        return Err(SplitError::Malformed("empty".into()));
    }
    if header.gso_type == GSO_NONE {
        // Room first: completing a checksum twice would spoil it.
        if out.is_full() {
            return Err(SplitError::NoRoom);
        }
        if headroom + packet.len() > out.buffer_size() {
            return Err(SplitError::Malformed("larger than a packet buffer".into()));
        }
        if header.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(packet, header.csum_start.into(), header.csum_offset.into())?;
        }
        out.push_at(headroom, packet);
        return Ok(1);
    }
    let (is_v6, header_len) = gso_header_len(packet, &header)?;
    let hdr = tun_rs::VirtioNetHdr {
        flags: header.flags,
        gso_type: header.gso_type & !GSO_ECN,
        hdr_len: header_len as u16,
        gso_size: header.gso_size,
        csum_start: header.csum_start,
        csum_offset: header.csum_offset,
    };
    let mut sizes = [0usize; MAX_SEGMENTS];
    let parts = out.raw_parts();
    let first = *parts.count;
    let room = (parts.bufs.len() - first).min(MAX_SEGMENTS);
    let n = tun_rs::gso_split(
        packet,
        hdr,
        &mut parts.bufs[first..first + room],
        &mut sizes[..room],
        headroom,
        is_v6,
    )
    .map_err(|e| {
        if e.to_string().contains("too many") {
            SplitError::NoRoom
        } else {
            SplitError::Malformed(e.to_string())
        }
    })?;
    let mut parts = out.raw_parts();
    for (k, &size) in sizes.iter().enumerate().take(n) {
        parts.set(first + k, headroom, size, 0, None);
    }
    *parts.count += n;
    Ok(n)
}

/// `gso_type`: the kernel may add this ECN bit to the type.
const GSO_ECN: u8 = 0x80;

/// Where a super-packet's headers end, read from the packet itself, after
/// checking they agree with its virtio header: an IP header of the version
/// the GSO type says, the transport header at `csum_start` (right after the
/// IPv4 header; for IPv6 after its header and any extension headers) of the
/// type's protocol. Returns whether it is IPv6 and the headers' length.
///
/// The virtio header's own `hdr_len` is not that length: the kernel sets it
/// to the packet's linear part, which may hold payload too (a forwarded
/// packet GRO built, say), and cutting by it would copy that payload into
/// every segment. (A frame whose headers disagree with its virtio header is
/// never cut by them either: the fuzzer showed it would give broken segments.)
pub fn gso_header_len(packet: &[u8], header: &VirtioHeader) -> Result<(bool, usize), SplitError> {
    let bad = |what: &str| Err(SplitError::Malformed(format!("super-packet: {what}")));
    let (is_v6, ip_len) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => (false, usize::from(packet[0] & 0x0f) * 4),
        Some(6) if packet.len() >= 40 => (true, 40),
        _ => return bad("no IPv4 or IPv6 header"),
    };
    let (protocol, transport_len) = match header.gso_type & !GSO_ECN {
        GSO_TCPV4 if !is_v6 => (TCP, 20),
        GSO_TCPV6 if is_v6 => (TCP, 20),
        GSO_UDP_L4 => (UDP, 8),
        t => return bad(&format!("GSO type {t} for an IPv{} packet", if is_v6 { 6 } else { 4 })),
    };
    let start = usize::from(header.csum_start);
    let placed = if is_v6 {
        // Extension headers may come between; without them, the next header is the transport.
        start > ip_len || (start == ip_len && packet[6] == protocol)
    } else {
        ip_len >= 20 && start == ip_len && packet[9] == protocol
    };
    if !placed {
        return bad("the transport header is not where the virtio header says");
    }
    let len = match protocol {
        TCP if packet.len() >= start + 20 => start + usize::from(packet[start + 12] >> 4) * 4,
        TCP => return bad("no room for its TCP header"),
        _ => start + transport_len,
    };
    if len < start + transport_len || len > packet.len() || header.gso_size == 0 {
        return bad("its headers do not fit it");
    }
    Ok((is_v6, len))
}

/// Completes a checksum the sender left to us (`CHECKSUM_PARTIAL`): the sum
/// from `start` to the end, stored at `start + offset`.
fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), SplitError> {
    if start + offset + 2 > packet.len() {
        return Err(SplitError::Malformed("checksum outside the packet".into()));
    }
    // The field holds the pseudo-header's sum already.
    let mut sum = !checksum::sum(&packet[start..]);
    if sum == 0 && offset == 6 {
        // UDP sends a computed 0 as all ones (0 means "no checksum").
        sum = 0xffff;
    }
    packet[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests;
