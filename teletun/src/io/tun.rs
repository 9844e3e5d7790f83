//! The TUN device (tun-rs), as a packet source and sink.
//!
//! With offload (`IFF_VNET_HDR`, TSO and checksum offload), the kernel hands
//! over TCP segments of up to [`Tun::MAX_GSO_SEGMENTS`] packets in one read;
//! tun-rs splits each into MTU-sized packets with their checksums, straight
//! into the batch. Writes carry an empty virtio header (one packet each).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::batch::{PacketBatch, BATCH_SIZE};
use super::{PacketSink, PacketSource};

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
    pub const MAX_GSO_SEGMENTS: usize = BATCH_SIZE / 2;

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

impl PacketSource for Arc<Tun> {
    fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    /// Reads packets until none are waiting or the batch is full.
    fn recv(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        if self.offload {
            return self.recv_offloaded(batch);
        }
        let mut n = 0;
        while let Some(buf) = batch.next_free() {
            match self.dev.recv(buf) {
                Ok(len) => {
                    batch.commit(len, None);
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

impl Tun {
    /// Reads (possibly TSO) packets while a whole split one still fits.
    fn recv_offloaded(&self, batch: &mut PacketBatch) -> io::Result<usize> {
        let mut scratch = self
            .read_buf
            .lock()
            .map_err(|_| io::Error::other("TUN read buffer poisoned"))?;
        let mut n = 0;
        while BATCH_SIZE - batch.len() >= Self::MAX_GSO_SEGMENTS {
            let parts = batch.raw_parts();
            let first = *parts.count;
            let result = self
                .dev
                .recv_multiple(&mut scratch, &mut parts.bufs[first..], &mut parts.lens[first..], 0);
            match result {
                Ok(got) => {
                    parts.peers[first..first + got].fill(None);
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
}

impl PacketSink for Arc<Tun> {
    /// Writes every packet. A packet the kernel refuses is skipped and counted.
    fn send(&mut self, batch: &PacketBatch) -> io::Result<usize> {
        let mut refused = 0;
        for p in batch.iter() {
            loop {
                let sent = if self.offload {
                    self.send_with_header(p)
                } else {
                    self.dev.send(p)
                };
                match sent {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        super::sys::wait(
                            &[self.dev.as_raw_fd()],
                            libc::POLLOUT,
                            Some(std::time::Duration::from_millis(10)),
                        )?;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EIO) => {
                        refused += 1;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(refused)
    }
}

impl Tun {
    /// Writes one packet behind an all-zero virtio header (no GSO, checksum
    /// complete), without copying it.
    fn send_with_header(&self, packet: &[u8]) -> io::Result<usize> {
        const HEADER: [u8; tun_rs::VIRTIO_NET_HDR_LEN] = [0; tun_rs::VIRTIO_NET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: HEADER.as_ptr() as *mut libc::c_void,
                iov_len: HEADER.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut libc::c_void,
                iov_len: packet.len(),
            },
        ];
        // SAFETY: both iovecs point into live buffers of the given lengths,
        // which writev only reads.
        let n = unsafe { libc::writev(self.dev.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((n as usize).saturating_sub(HEADER.len()))
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

    /// The IPv4 packets from the TUN carrying `protocol`, waiting up to 2 s for `want`.
    fn read_packets(tun: &mut Arc<Tun>, protocol: u8, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut batch = PacketBatch::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < want && std::time::Instant::now() < deadline {
            crate::io::sys::wait(&[tun.fd()], libc::POLLIN, Some(std::time::Duration::from_millis(100))).unwrap();
            batch.clear();
            tun.recv(&mut batch).unwrap();
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

            // A write: a UDP packet from 10.9.0.2 to our socket.
            let port = udp.local_addr().unwrap().port();
            let payload = b"through the TUN";
            let mut packet = vec![0u8; 28 + payload.len()];
            packet[0] = 0x45;
            let total = packet.len() as u16;
            packet[2..4].copy_from_slice(&total.to_be_bytes());
            packet[8] = 64;
            packet[9] = 17;
            packet[12..16].copy_from_slice(&[10, 9, 0, 2]);
            packet[16..20].copy_from_slice(&[10, 9, 0, 1]);
            let header_sum = !ones_complement_sum(&[&packet[..20]]);
            packet[10..12].copy_from_slice(&header_sum.to_be_bytes());
            packet[20..22].copy_from_slice(&9u16.to_be_bytes());
            packet[22..24].copy_from_slice(&port.to_be_bytes());
            packet[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            packet[28..].copy_from_slice(payload);
            let mut batch = PacketBatch::new();
            assert!(batch.push(&packet));
            assert_eq!(tun.send(&batch).unwrap(), 0, "the kernel took the packet");
            udp.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&payload[..], "10.9.0.2:9".parse().unwrap()));
        })
        .join()
        .unwrap();
    }
}
