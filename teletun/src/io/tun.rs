//! The TUN device (tun-rs), as a packet source and sink.
//!
//! With offload (`IFF_VNET_HDR`, TSO and checksum offload), the kernel hands
//! over TCP segments of up to [`Tun::MAX_GSO_SEGMENTS`] packets in one read;
//! tun-rs splits each into MTU-sized packets with their checksums, straight
//! into the batch at the headroom a record needs. Writes are frames: a
//! virtio-net header and a packet, or a super-packet the coalescer
//! ([`super::offload`]) built, which the receiving kernel handles as one.
//! server-cluster moves frames as they are, both ways.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::batch::{PacketBatch, BATCH_SIZE};
use super::offload::{Capabilities, VIRTIO_HEADER_LEN};
use super::{FrameSink, FrameSource, PacketSource};

/// A layer-3 TUN device without packet information headers, non-blocking.
pub struct Tun {
    dev: tun_rs::SyncDevice,
    name: String,
    /// Whether reads and writes carry a virtio-net header (offload is on).
    offload: bool,
    /// Scratch for one offloaded read: header and a GSO packet of up to 64 KiB.
    read_buf: std::sync::Mutex<Box<[u8]>>,
    /// Reads that could not be split into packets (dropped).
    unsplittable: std::sync::atomic::AtomicU64,
}

impl Tun {
    /// Creates a TUN device. `pattern` may hold `%d` (the kernel picks the
    /// first free number: `tel%d` gives tel0, tel1, …). The device is up.
    pub fn create(pattern: &str, mtu: u16) -> Result<Tun> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(pattern)
                .mtu(mtu)
                .offload(offload)
                .enable(true)
                .build_sync()
        };
        // A kernel (or sandbox) without TUN offload still gets a plain device.
        let dev = build(true).or_else(|_| build(false)).with_context(|| {
            format!("cannot create TUN device {pattern} (needs root or CAP_NET_ADMIN and /dev/net/tun)")
        })?;
        dev.set_nonblocking(true)?;
        let name = dev.name().context("cannot read the TUN device's name")?;
        let offload = dev.tcp_gso();
        Ok(Tun {
            dev,
            name,
            offload,
            read_buf: std::sync::Mutex::new(vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535].into_boxed_slice()),
            unsplittable: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The most segments one offloaded read may hold: the batch must have
    /// this many free slots before a read. Set on the interface with
    /// [`crate::netconf::netlink::Netlink::set_gso_max_segments`].
    pub const MAX_GSO_SEGMENTS: usize = BATCH_SIZE;

    /// Whether the kernel hands over TSO packets (and expects virtio headers).
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Offloaded reads dropped because they could not be split (reported in
    /// the session summaries as malformed TSO reads).
    pub fn unsplittable(&self) -> u64 {
        self.unsplittable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index.
    pub fn index(&self) -> Result<u32> {
        Ok(self.dev.if_index()?)
    }
}

impl Tun {
    /// What super-packets the device takes in a write: TCP with offload, and
    /// UDP where the kernel has TUN USO (6.2+).
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            tcp: self.offload,
            udp: self.offload && self.dev.udp_gso(),
        }
    }

    /// The descriptor, for `poll`.
    pub fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    /// Reads packets until none are waiting or the batch has too little
    /// room, each placed after `headroom` bytes of its buffer; TSO reads are
    /// split (with their checksums) into several.
    pub fn recv_packets(&self, batch: &mut PacketBatch, headroom: usize) -> io::Result<usize> {
        if self.offload {
            return self.recv_offloaded(batch, headroom);
        }
        let mut n = 0;
        while let Some(buf) = batch.next_free() {
            let Some(room) = buf.get_mut(headroom..) else { break };
            match self.dev.recv(room) {
                Ok(len) => {
                    batch.commit(headroom, len, None);
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Reads (possibly TSO) packets while a whole split one still fits.
    fn recv_offloaded(&self, batch: &mut PacketBatch, headroom: usize) -> io::Result<usize> {
        let mut scratch = self
            .read_buf
            .lock()
            .map_err(|_| io::Error::other("TUN read buffer poisoned"))?;
        let mut sizes = [0usize; Self::MAX_GSO_SEGMENTS];
        let mut n = 0;
        while batch.room() >= Self::MAX_GSO_SEGMENTS {
            let mut parts = batch.raw_parts();
            let first = *parts.count;
            let bufs = &mut parts.bufs[first..first + Self::MAX_GSO_SEGMENTS];
            match self.dev.recv_multiple(&mut scratch, bufs, &mut sizes, headroom) {
                Ok(got) => {
                    for (k, &size) in sizes.iter().enumerate().take(got) {
                        parts.set(first + k, headroom, size, 0, None);
                    }
                    *parts.count += got;
                    n += got;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A failed read system call carries an errno; a packet tun-rs
                // could not split does not: drop that one and go on.
                Err(e) if e.raw_os_error().is_none() => {
                    let before = self.unsplittable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if before == 0 {
                        tracing::warn!("{}: dropped a TSO packet that could not be split: {e}", self.name);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Reads whole frames (virtio-net header + packet or TSO super-packet)
    /// into `batch`, one per buffer, until none are waiting. A device without
    /// offload gets an all-zero header put in front of each packet.
    pub fn recv_frames(&self, batch: &mut PacketBatch) -> io::Result<usize> {
        let mut n = 0;
        while let Some(buf) = batch.next_free() {
            let at = if self.offload { 0 } else { VIRTIO_HEADER_LEN };
            buf[..at].fill(0);
            // SAFETY: read into the live buffer past `at`, within its length.
            let r = unsafe { libc::read(self.fd(), buf[at..].as_mut_ptr().cast(), buf.len() - at) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            batch.commit(0, at + r as usize, None);
            n += 1;
        }
        Ok(n)
    }

    /// Writes every frame of `frames` (virtio-net header + packet or
    /// super-packet); a device without offload gets the packet alone. A frame
    /// the kernel refuses is skipped and counted.
    pub fn send_frames(&self, frames: &PacketBatch) -> io::Result<usize> {
        let mut refused = 0;
        for frame in frames.iter() {
            let bytes = if self.offload {
                frame
            } else {
                &frame[VIRTIO_HEADER_LEN.min(frame.len())..]
            };
            loop {
                // SAFETY: write from a live buffer of the given length.
                let r = unsafe { libc::write(self.fd(), bytes.as_ptr().cast(), bytes.len()) };
                if r >= 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        super::sys::wait(&[self.fd()], libc::POLLOUT, Some(std::time::Duration::from_millis(10)))?;
                    }
                    _ if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EIO)) => {
                        refused += 1;
                        break;
                    }
                    _ => return Err(e),
                }
            }
        }
        Ok(refused)
    }
}

impl PacketSource for Arc<Tun> {
    fn fd(&self) -> RawFd {
        Tun::fd(self)
    }

    fn recv(&mut self, batch: &mut PacketBatch, headroom: usize) -> io::Result<usize> {
        self.recv_packets(batch, headroom)
    }
}

impl FrameSink for Arc<Tun> {
    fn capabilities(&self) -> Capabilities {
        Tun::capabilities(self)
    }

    fn send_frames(&mut self, frames: &PacketBatch) -> io::Result<usize> {
        Tun::send_frames(self, frames)
    }
}

impl FrameSource for Arc<Tun> {
    fn fd(&self) -> RawFd {
        Tun::fd(self)
    }

    fn recv_frames(&mut self, frames: &mut PacketBatch) -> io::Result<usize> {
        Tun::recv_frames(self, frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root. Runs in a network namespace private to the test thread, so
    /// the devices never appear on the host and vanish with the thread.
    #[test]
    fn pattern_names_count_up() {
        std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread to a new namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare(CLONE_NEWNET) needs root: run the tests as root");
            let a = Tun::create("tel%d", 1400).unwrap();
            let b = Tun::create("tel%d", 1400).unwrap();
            assert_eq!((a.name(), b.name()), ("tel0", "tel1"));
            drop(a);
            // Another test's child process may hold the descriptor for a
            // moment (between its fork and exec): wait for tel0 to go.
            let name = std::ffi::CString::new("tel0").unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            // SAFETY: if_nametoindex reads a NUL-terminated name.
            while unsafe { libc::if_nametoindex(name.as_ptr()) } != 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let c = Tun::create("tel%d", 1400).unwrap();
            assert_eq!(c.name(), "tel0", "a freed number is reused");
        })
        .join()
        .unwrap();
    }

    /// The RFC 1071 sum over `parts`, folded; 0xffff for a correct checksum.
    fn ones_complement_sum(parts: &[&[u8]]) -> u16 {
        let mut sum: u32 = 0;
        for part in parts {
            for pair in part.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// An IPv4 header from 10.9.0.2 to 10.9.0.1 for `len` bytes of `protocol`.
    fn ipv4_header(protocol: u8, len: usize, id: u16) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6] = 0x40;
        h[8] = 64;
        h[9] = protocol;
        h[12..16].copy_from_slice(&[10, 9, 0, 2]);
        h[16..20].copy_from_slice(&[10, 9, 0, 1]);
        let sum = !ones_complement_sum(&[&h]);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h
    }

    /// The transport checksum of `segment` under 10.9.0.2 → 10.9.0.1.
    fn transport_checksum(protocol: u8, segment: &[u8]) -> u16 {
        let pseudo = [
            &[10, 9, 0, 2, 10, 9, 0, 1][..],
            &[0, protocol],
            &(segment.len() as u16).to_be_bytes(),
        ]
        .concat();
        !ones_complement_sum(&[&pseudo, segment])
    }

    fn udp_packet(from_port: u16, to_port: u16, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8 + payload.len()];
        u[0..2].copy_from_slice(&from_port.to_be_bytes());
        u[2..4].copy_from_slice(&to_port.to_be_bytes());
        let len = u.len() as u16;
        u[4..6].copy_from_slice(&len.to_be_bytes());
        u[8..].copy_from_slice(payload);
        let sum = transport_checksum(17, &u);
        u[6..8].copy_from_slice(&sum.to_be_bytes());
        [ipv4_header(17, u.len(), id), u].concat()
    }

    fn tcp_segment(seq: u32, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 20 + payload.len()];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&81u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&1u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x10;
        t[14..16].copy_from_slice(&1000u16.to_be_bytes());
        t[20..].copy_from_slice(payload);
        let sum = transport_checksum(6, &t);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        [ipv4_header(6, t.len(), id), t].concat()
    }

    /// The IPv4 packets from the TUN carrying `protocol`, waiting up to 2 s for `want`.
    fn read_packets(tun: &mut Arc<Tun>, protocol: u8, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut batch = PacketBatch::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < want && std::time::Instant::now() < deadline {
            crate::io::sys::wait(
                &[Tun::fd(tun)],
                libc::POLLIN,
                Some(std::time::Duration::from_millis(100)),
            )
            .unwrap();
            batch.clear();
            tun.recv_packets(&mut batch, 0).unwrap();
            got.extend(
                batch
                    .iter()
                    .filter(|p| p[0] >> 4 == 4 && p[9] == protocol)
                    .map(<[u8]>::to_vec),
            );
        }
        got
    }

    /// Needs root; a private network namespace as above. A UDP GSO send (one
    /// 8000-byte write in 1000-byte segments) and a TCP SYN, whose checksums
    /// the kernel leaves to the device, come out of the TUN as whole packets
    /// with correct checksums; a packet written to the TUN reaches a socket.
    #[test]
    fn offloaded_reads_come_out_as_checked_packets_and_writes_arrive() {
        std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread to a new namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare(CLONE_NEWNET) needs root: run the tests as root");
            let mut tun = Arc::new(Tun::create("tso%d", 1400).unwrap());
            assert!(tun.offload(), "this kernel offers TUN offload");
            // Netlink from this thread, rather than `ip`: a child process would
            // hold every TUN descriptor of this test process between fork and exec.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let netlink = crate::netconf::netlink::Netlink::connect().unwrap();
                let index = tun.index().unwrap();
                netlink.add_address(index, [10, 9, 0, 1].into(), 24).await.unwrap();
                netlink
                    .set_gso_max_segments(index, Tun::MAX_GSO_SEGMENTS as u32)
                    .await
                    .unwrap();
            });

            // UDP: one GSO send of 8 segments.
            let udp = std::net::UdpSocket::bind("10.9.0.1:0").unwrap();
            let segment: libc::c_int = 1000;
            // SAFETY: setsockopt on our socket with a c_int option value.
            let r = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&udp),
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    (&segment as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "UDP_SEGMENT: {}", io::Error::last_os_error());
            let data: Vec<u8> = (0..8000u32).map(|i| (i * 7 % 251) as u8).collect();
            udp.send_to(&data, "10.9.0.2:9").unwrap();
            let packets = read_packets(&mut tun, libc::IPPROTO_UDP as u8, 8);
            assert_eq!(packets.len(), 8, "one packet per segment");
            let mut joined = Vec::new();
            for p in &packets {
                crate::proto::packet::inspect(p).unwrap();
                assert_eq!(ones_complement_sum(&[&p[..20]]), 0xffff, "IPv4 header checksum");
                let udp_part = &p[20..];
                let pseudo = [&p[12..20], &[0, 17], &(udp_part.len() as u16).to_be_bytes()[..]].concat();
                assert_eq!(ones_complement_sum(&[&pseudo, udp_part]), 0xffff, "UDP checksum");
                joined.extend_from_slice(&udp_part[8..]);
            }
            assert_eq!(joined, data, "the segments carry the data in order");

            // TCP: a SYN, its checksum completed for the kernel.
            let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            tcp.set_nonblocking(true).unwrap();
            let target: std::net::SocketAddr = "10.9.0.2:80".parse().unwrap();
            let _ = tcp.connect(&target.into());
            let syn = read_packets(&mut tun, libc::IPPROTO_TCP as u8, 1);
            let syn = syn.first().expect("a SYN");
            let tcp_part = &syn[20..];
            let pseudo = [&syn[12..20], &[0, 6], &(tcp_part.len() as u16).to_be_bytes()[..]].concat();
            assert_eq!(ones_complement_sum(&[&pseudo, tcp_part]), 0xffff, "TCP checksum");

            // Writes: eight UDP datagrams from 10.9.0.2 to our socket, coalesced
            // into one USO frame where the kernel takes those, and a TCP burst
            // coalesced into one TSO frame to a closed port, which the kernel
            // answers with a reset.
            let port = udp.local_addr().unwrap().port();
            let datagrams: Vec<Vec<u8>> = (0..8u8)
                .map(|i| udp_packet(9, port, u16::from(i), &[i; 1000]))
                .collect();
            let mut frames = PacketBatch::new();
            let mut coalescer = crate::io::offload::Coalescer::new(tun.capabilities());
            for d in &datagrams {
                assert!(coalescer.push(d, &mut frames));
            }
            coalescer.finish(&mut frames);
            let expected_frames = if tun.capabilities().udp { 1 } else { 8 };
            assert_eq!(frames.len(), expected_frames);
            assert_eq!(tun.send_frames(&frames).unwrap(), 0, "the kernel took the frames");
            udp.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            for d in &datagrams {
                let mut buf = [0u8; 2048];
                let (n, from) = udp.recv_from(&mut buf).unwrap();
                assert_eq!((&buf[..n], from), (&d[28..], "10.9.0.2:9".parse().unwrap()));
            }
            let burst: Vec<Vec<u8>> = (0..10u32)
                .map(|i| tcp_segment(5000 + i * 1000, i as u16, &[7; 1000]))
                .collect();
            let mut frames = PacketBatch::new();
            for p in &burst {
                assert!(coalescer.push(p, &mut frames));
            }
            coalescer.finish(&mut frames);
            assert_eq!(frames.len(), 1, "one TSO frame");
            assert_eq!(tun.send_frames(&frames).unwrap(), 0, "the kernel took the TSO frame");
            let reset = read_packets(&mut tun, libc::IPPROTO_TCP as u8, 1);
            let reset = reset.first().expect("a reset for the closed port");
            assert_eq!(reset[20 + 13] & 0x04, 0x04, "RST");
        })
        .join()
        .unwrap();
    }
}
