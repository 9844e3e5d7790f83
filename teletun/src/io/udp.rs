//! The data plane's UDP socket: DF set, large buffers, non-blocking, with UDP
//! GSO on send and GRO on receive where the kernel has them (each probed at
//! start; a GSO send the route's device refuses turns GSO off, counted).
//! Losses that a network causes (unreachable, refused, too big) are counted,
//! never fatal: the tunnel's silence timer decides when a peer is gone.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};

use super::batch::{PacketBatch, MAX_SEGMENTS};
use super::sys;

/// A UDP socket for the data plane.
pub struct Udp {
    sock: socket2::Socket,
    gso: AtomicBool,
    gro: bool,
    /// GSO sends refused by the route's device (after which GSO is off).
    pub gso_fallbacks: AtomicU64,
}

use super::sys::set_int_option as set_int;

/// Whether this kernel segments UDP sends (`UDP_SEGMENT`), tried on a
/// throwaway socket so our own keeps no socket-wide segment size.
fn gso_supported(v6: bool) -> bool {
    let domain = if v6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    socket2::Socket::new(domain, socket2::Type::DGRAM, None)
        .map(|s| set_int(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT, 1200).is_ok())
        .unwrap_or(false)
}

impl Udp {
    /// Binds a socket at `bind` with DF set, 4 MiB buffers (forced past the
    /// host's limits when root), GRO on where the kernel has it.
    pub fn bind(bind: SocketAddr) -> Result<Udp> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(
            Domain::for_address(bind),
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        if bind.is_ipv6() {
            s.set_only_v6(false).ok();
        }
        // No SO_REUSEADDR (nor SO_REUSEPORT): on Linux any other process
        // setting it too could bind the same address and port and take the
        // session's datagrams. UDP has no TIME_WAIT to reuse past.
        let fd = s.as_raw_fd();
        sys::size_buffers(fd, 4 << 20);
        let (level, opt, val) = if bind.is_ipv6() {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO)
        } else {
            (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
        };
        set_int(fd, level, opt, val).context("cannot set DF on the UDP socket")?;
        if bind.is_ipv6() {
            // A dual-stack socket sends IPv4 too; that takes the IPv4 option
            // (without it, routers fragment what should have been refused).
            set_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
                .context("cannot set DF for IPv4 on the UDP socket")?;
        }
        let gro = set_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        s.bind(&bind.into())
            .with_context(|| format!("cannot bind UDP {bind}"))?;
        Ok(Udp {
            sock: s,
            gso: AtomicBool::new(gso_supported(bind.is_ipv6())),
            gro,
            gso_fallbacks: AtomicU64::new(0),
        })
    }

    /// Sends only to `peer` and receives only from it from now on.
    pub fn connect(&self, peer: SocketAddr) -> Result<()> {
        self.sock
            .connect(&peer.into())
            .with_context(|| format!("cannot reach {peer} over UDP"))
    }

    /// Connects to `peer` afresh, so the kernel picks the source address
    /// (and port) the current routes give: after this machine's address
    /// changed, the socket speaks from the new one. The session goes on; the
    /// peer follows its next authentic record.
    pub fn repath(&self, peer: SocketAddr) -> Result<()> {
        // SAFETY: a zeroed sockaddr with family AF_UNSPEC dissolves the
        // association (connect(2)); the length is that of the struct passed.
        let r = unsafe {
            let mut unspec: libc::sockaddr = std::mem::zeroed();
            unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
            libc::connect(
                self.fd(),
                &unspec,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(anyhow!(
                "cannot dissolve the UDP socket's association: {}",
                io::Error::last_os_error()
            ));
        }
        self.connect(peer)
    }

    /// Whether sends are segmented by the kernel (GSO) and receives coalesced (GRO).
    pub fn offloads(&self) -> (bool, bool) {
        (self.gso.load(Ordering::Relaxed), self.gro)
    }

    /// The descriptor, for `poll`.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| anyhow!("the UDP socket has no IP address"))
    }

    /// Receives what is waiting into `batch` (with GRO, several datagrams of
    /// one size may share a buffer: its stride). Returns how many buffers
    /// filled; an ICMP error for an earlier send counts as nothing received.
    pub fn recv(&self, batch: &mut PacketBatch) -> io::Result<usize> {
        match sys::recv_batch(self.fd(), batch, self.gro) {
            Ok((n, _truncated)) => Ok(n),
            Err(e) if lost_on_the_way(&e) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Sends every datagram of `batch` to `dest` (or the connected peer),
    /// runs of equal size as one GSO send. Returns how many the network
    /// refused (lost, as on the wire).
    pub fn send(&self, batch: &PacketBatch, dest: Option<SocketAddr>) -> io::Result<usize> {
        let segments = if self.gso.load(Ordering::Relaxed) {
            MAX_SEGMENTS
        } else {
            1
        };
        let sent = sys::send_gso(self.fd(), batch, dest, segments)?;
        if sent.gso_refused {
            // The route's device cannot do it: segment ourselves from now on.
            self.gso.store(false, Ordering::Relaxed);
            if self.gso_fallbacks.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("UDP GSO refused by the route's device (EIO); sending datagram by datagram");
            }
        }
        Ok(sent.refused)
    }

    /// The path MTU the kernel knows for the connected peer (`IP_MTU`).
    pub fn path_mtu(&self, v6: bool) -> Result<usize> {
        let (level, opt) = if v6 {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU)
        } else {
            (libc::IPPROTO_IP, libc::IP_MTU)
        };
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a live c_int of the given length.
        let r = unsafe { libc::getsockopt(self.fd(), level, opt, (&mut val as *mut libc::c_int).cast(), &mut len) };
        if r < 0 {
            return Err(anyhow!("cannot read the path MTU: {}", io::Error::last_os_error()));
        }
        if val < 576 {
            bail!("the path MTU to the server is {val}, too small for a tunnel");
        }
        Ok(val as usize)
    }

    /// Discards the datagrams waiting, for at most `budget` (a flood must not
    /// hold the caller). The server calls it before it greets a new client:
    /// what waits then belongs to no session.
    pub fn drain(&self, budget: std::time::Duration) {
        let deadline = std::time::Instant::now() + budget;
        let mut scratch = PacketBatch::with_capacity(8, super::batch::BUFFER_SIZE);
        while matches!(sys::recv_batch(self.fd(), &mut scratch, self.gro), Ok((n, _)) if n > 0)
            && std::time::Instant::now() < deadline
        {
            scratch.clear();
        }
    }
}

pub use super::sys::lost_on_the_way;

/// UDP payload available on a path with this IP MTU.
pub fn udp_payload(path_mtu: usize, v6: bool) -> usize {
    path_mtu - if v6 { 40 } else { 20 } - 8
}

/// Where datagrams go: the peer's current address, which the receiving
/// thread may change (the peer roamed) while the sending thread reads it
/// once per batch. A generation counter keeps the common read lock-free.
#[derive(Debug, Default)]
pub struct PeerAddress {
    generation: AtomicU64,
    address: Mutex<Option<SocketAddr>>,
}

impl PeerAddress {
    /// Starts at `address`.
    pub fn new(address: Option<SocketAddr>) -> Self {
        PeerAddress {
            generation: AtomicU64::new(0),
            address: Mutex::new(address),
        }
    }

    /// Moves it.
    pub fn set(&self, address: SocketAddr) {
        if let Ok(mut a) = self.address.lock() {
            *a = Some(address);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A reader that looks again only when it moved.
    pub fn reader(&self) -> PeerReader<'_> {
        PeerReader {
            cell: self,
            seen: u64::MAX,
            cached: None,
        }
    }
}

/// A sending thread's view of a [`PeerAddress`].
pub struct PeerReader<'a> {
    cell: &'a PeerAddress,
    seen: u64,
    cached: Option<SocketAddr>,
}

impl PeerReader<'_> {
    /// How many times the address has moved: a sender that counts before
    /// sealing a batch compares with [`Self::current`]'s count after, and
    /// holds the batch back if it moved meanwhile (what was sealed may have
    /// been judged for the old address).
    pub fn moves(&self) -> u64 {
        self.cell.generation.load(Ordering::Acquire)
    }

    /// The current address, and the count of moves it is the address after.
    pub fn current(&mut self) -> (Option<SocketAddr>, u64) {
        let g = self.cell.generation.load(Ordering::Acquire);
        if g != self.seen {
            self.seen = g;
            self.cached = self.cell.address.lock().map(|a| *a).unwrap_or(self.cached);
        }
        (self.cached, g)
    }

    /// The current address.
    pub fn get(&mut self) -> Option<SocketAddr> {
        self.current().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_peer_is_seen_by_the_reader() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:2".parse().unwrap();
        let cell = PeerAddress::new(Some(a));
        let mut r = cell.reader();
        assert_eq!(r.get(), Some(a));
        cell.set(b);
        assert_eq!(r.get(), Some(b));
        assert_eq!(r.get(), Some(b));
    }

    #[test]
    fn a_repathed_socket_keeps_its_peer_and_still_reaches_it() {
        let peer = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = peer.local_addr().unwrap();
        let u = Udp::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        u.connect(to).unwrap();
        u.repath(to).unwrap();
        let mut b = PacketBatch::new();
        b.push(b"after");
        assert_eq!(u.send(&b, None).unwrap(), 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut got = PacketBatch::new();
        assert_eq!(peer.recv(&mut got).unwrap(), 1);
        assert_eq!(got.get(0), b"after");
        assert_eq!(got.peer(0).map(|p| p.ip()), Some(u.local_addr().unwrap().ip()));
    }

    /// Another process (a hostNetwork pod on the node, a local user on the
    /// laptop) must not share the socket's address and port, whichever
    /// sharing option it sets.
    #[test]
    fn nobody_else_can_bind_the_sessions_port() {
        use socket2::{Domain, Socket, Type};
        for bind in ["127.0.0.1:0", "[::]:0"] {
            let u = Udp::bind(bind.parse().unwrap()).unwrap();
            let taken = u.local_addr().unwrap();
            for (reuse_address, reuse_port) in [(true, false), (false, true), (true, true)] {
                let other = Socket::new(Domain::for_address(taken), Type::DGRAM, None).unwrap();
                other.set_reuse_address(reuse_address).unwrap();
                other.set_reuse_port(reuse_port).unwrap();
                let e = other
                    .bind(&taken.into())
                    .expect_err("a second socket bound the session's port");
                assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{taken}: {e}");
            }
        }
    }

    #[test]
    fn a_loopback_socket_has_its_offloads_probed() {
        let u = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // Kernel 4.18+ has both; this project's machines do.
        assert_eq!(u.offloads(), (true, true));
        let peer = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        u.connect(peer.local_addr().unwrap()).unwrap();
        assert!(u.path_mtu(false).unwrap() >= 576);
        // Sending to a port nobody listens on is a loss, not an error.
        let nobody = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let gone = nobody.local_addr().unwrap();
        drop(nobody);
        let lonely = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        lonely.connect(gone).unwrap();
        let mut b = PacketBatch::new();
        b.push(b"x");
        assert_eq!(lonely.send(&b, None).unwrap(), 0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The ICMP error comes back on the next call, as a loss.
        assert_eq!(lonely.send(&b, None).unwrap(), 1, "refused: lost, counted");
        let mut got = PacketBatch::new();
        assert_eq!(lonely.recv(&mut got).unwrap(), 0);
    }
}
