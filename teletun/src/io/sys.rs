//! Batched system calls: `recvmmsg`/`sendmmsg` for datagram sockets (UDP and
//! AF_UNIX `SOCK_SEQPACKET` alike), with UDP GRO on receive and UDP GSO on
//! send; `poll`; and an eventfd that stops pumps.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::SockAddr;

use super::batch::{PacketBatch, BATCH_SIZE, MAX_SEGMENTS};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Room for one `int` control message (UDP_GRO, UDP_SEGMENT): CMSG_SPACE(4).
const CMSG_INT_SPACE: usize = 24;

/// A control-message buffer aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_INT_SPACE]);

/// Receives as many datagrams as are waiting (up to the batch's free room)
/// without blocking, each into a whole buffer. Returns how many arrived (0:
/// none were waiting) and how many were dropped for being larger than a
/// buffer. With `gro`, a buffer may hold several datagrams of one size back
/// to back; its stride says so (the socket must have `UDP_GRO` on).
pub fn recv_batch(fd: RawFd, batch: &mut PacketBatch, gro: bool) -> io::Result<(usize, usize)> {
    let mut parts = batch.raw_parts();
    let start = *parts.count;
    let room = (parts.bufs.len() - start).min(BATCH_SIZE);
    if room == 0 {
        return Ok((0, 0));
    }
    let mut iovs: [MaybeUninit<libc::iovec>; BATCH_SIZE] = [MaybeUninit::uninit(); BATCH_SIZE];
    // SAFETY: sockaddr_storage and mmsghdr are plain C structs for which all-zero is valid.
    let mut names: [libc::sockaddr_storage; BATCH_SIZE] = unsafe { mem::zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH_SIZE] = unsafe { mem::zeroed() };
    let mut controls = [CmsgBuf([0; CMSG_INT_SPACE]); BATCH_SIZE];
    for k in 0..room {
        let buf = &mut parts.bufs[start + k];
        iovs[k].write(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
        let h = &mut msgs[k].msg_hdr;
        h.msg_iov = iovs[k].as_mut_ptr();
        h.msg_iovlen = 1;
        h.msg_name = (&mut names[k] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if gro {
            h.msg_control = controls[k].0.as_mut_ptr().cast();
            h.msg_controllen = CMSG_INT_SPACE as _;
        }
    }
    // SAFETY: every msg points at a live iovec over a live buffer, a live name
    // slot and, with GRO, a live control buffer of the stated size.
    let ret = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            room as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok((0, 0)),
            _ => Err(err),
        };
    }
    let mut truncated = 0;
    for (src, msg) in msgs.iter().enumerate().take(ret as usize) {
        if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            truncated += 1;
            continue;
        }
        let len = msg.msg_len as usize;
        let stride = if gro { gro_segment_size(&msg.msg_hdr) } else { 0 };
        let peer = (msg.msg_hdr.msg_namelen > 0)
            .then(|| {
                // SAFETY: the kernel wrote a sockaddr of msg_namelen bytes into names[src],
                // and sockaddr_storage has the layout of SockAddrStorage.
                let storage: socket2::SockAddrStorage = unsafe { mem::transmute(names[src]) };
                unsafe { SockAddr::new(storage, msg.msg_hdr.msg_namelen) }.as_socket()
            })
            .flatten();
        // Compact over dropped entries: slot k holds a dropped datagram or is src itself.
        let k = *parts.count;
        parts.swap(start + src, k);
        parts.set(k, 0, len, if stride > 0 && stride < len { stride } else { 0 }, peer);
        *parts.count += 1;
    }
    Ok((*parts.count - start, truncated))
}

/// The segment size of a GRO receive, from its `UDP_GRO` control message.
fn gro_segment_size(h: &libc::msghdr) -> usize {
    // SAFETY: the control buffer is the live one we passed; the CMSG macros
    // walk it within msg_controllen as the kernel filled it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let mut v: libc::c_int = 0;
                std::ptr::copy_nonoverlapping(libc::CMSG_DATA(c), (&mut v as *mut libc::c_int).cast(), 4);
                return v.max(0) as usize;
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    0
}

/// Sends every packet of `batch` (to `dest`, or to the connected peer), one
/// datagram (or AF_UNIX message) each, waiting for room in the socket buffer
/// when needed.
pub fn send_batch(fd: RawFd, batch: &PacketBatch, dest: Option<SocketAddr>) -> io::Result<()> {
    send_runs(fd, batch, dest, 1).map(|_| ())
}

/// What a [`send_gso`] did besides sending.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams the network refused ([`lost_on_the_way`]): lost, as on the wire.
    pub refused: usize,
    /// A GSO send failed with EIO (the route's device cannot do it); the
    /// rest went datagram by datagram.
    pub gso_refused: bool,
}

/// Sends every packet of `batch` as datagrams, runs of equal-sized ones as
/// one UDP GSO send each (`UDP_SEGMENT`, at most `max_segments` per send).
pub fn send_gso(fd: RawFd, batch: &PacketBatch, dest: Option<SocketAddr>, max_segments: usize) -> io::Result<Sent> {
    send_runs(fd, batch, dest, max_segments.clamp(1, MAX_SEGMENTS))
}

/// Errors that mean a datagram was lost on the way (or one sent earlier
/// was), not that the socket is broken: the network is where it happens.
pub fn lost_on_the_way(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EMSGSIZE
                | libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::ENETDOWN
                | libc::EHOSTDOWN
                | libc::EADDRNOTAVAIL
                | libc::EPERM
                | libc::ENOBUFS
                // A UDP socket being connected anew (the client moved).
                | libc::EDESTADDRREQ
        )
    )
}

/// The most bytes one GSO send may carry (the IP length field, less headers).
pub const MAX_GSO_BYTES: usize = 65000;

/// Splits packet lengths into GSO runs: consecutive packets of one size, the
/// last of a run allowed to be shorter, at most `max_segments` packets and
/// [`MAX_GSO_BYTES`] per run. Returns how many packets the run from `first` takes.
pub fn gso_run(lens: impl Iterator<Item = usize>, max_segments: usize) -> usize {
    let mut lens = lens.peekable();
    let Some(size) = lens.next() else { return 0 };
    let mut count = 1;
    let mut total = size;
    for len in lens {
        if count == max_segments || total + len > MAX_GSO_BYTES || len > size || size == 0 {
            break;
        }
        count += 1;
        total += len;
        if len < size {
            break;
        }
    }
    count
}

fn send_runs(fd: RawFd, batch: &PacketBatch, dest: Option<SocketAddr>, mut max_segments: usize) -> io::Result<Sent> {
    let dest = dest.map(SockAddr::from);
    let mut outcome = Sent::default();
    let mut sent = 0;
    while sent < batch.len() {
        let mut iovs: [MaybeUninit<libc::iovec>; BATCH_SIZE] = [MaybeUninit::uninit(); BATCH_SIZE];
        // SAFETY: all-zero is a valid mmsghdr.
        let mut msgs: [libc::mmsghdr; BATCH_SIZE] = unsafe { mem::zeroed() };
        let mut controls = [CmsgBuf([0; CMSG_INT_SPACE]); BATCH_SIZE];
        let mut runs = [0usize; BATCH_SIZE];
        let (mut n, mut next, mut used_iovs) = (0, sent, 0);
        while next < batch.len() && n < BATCH_SIZE && used_iovs < BATCH_SIZE {
            let room = (BATCH_SIZE - used_iovs).min(max_segments);
            let run = gso_run((next..batch.len()).map(|i| batch.get(i).len()), room);
            for k in 0..run {
                let p = batch.get(next + k);
                iovs[used_iovs + k].write(libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                });
            }
            let h = &mut msgs[n].msg_hdr;
            h.msg_iov = iovs[used_iovs].as_mut_ptr();
            h.msg_iovlen = run as _;
            if let Some(d) = &dest {
                h.msg_name = d.as_ptr() as *mut libc::c_void;
                h.msg_namelen = d.len();
            }
            if run > 1 {
                set_segment_size(h, &mut controls[n], batch.get(next).len());
            }
            runs[n] = run;
            used_iovs += run;
            next += run;
            n += 1;
        }
        // SAFETY: the messages point at live buffers from `batch`, `dest` and `controls`.
        let ret = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    wait(&[fd], libc::POLLOUT, Some(Duration::from_millis(100)))?;
                    continue;
                }
                // The first message failed: it is lost; the rest go on.
                _ if lost_on_the_way(&err) => {
                    outcome.refused += runs[0];
                    sent += runs[0];
                    continue;
                }
                _ if err.raw_os_error() == Some(libc::EIO) && runs[0] > 1 => {
                    outcome.gso_refused = true;
                    max_segments = 1;
                    continue;
                }
                _ => return Err(err),
            }
        }
        sent += runs[..ret as usize].iter().sum::<usize>();
    }
    Ok(outcome)
}

/// Attaches a `UDP_SEGMENT` control message of `size` to `h`, in `control`.
fn set_segment_size(h: &mut libc::msghdr, control: &mut CmsgBuf, size: usize) {
    h.msg_control = control.0.as_mut_ptr().cast();
    h.msg_controllen = CMSG_INT_SPACE as _;
    // SAFETY: the control buffer is live, aligned and CMSG_SPACE(sizeof(u16))
    // ≤ CMSG_INT_SPACE bytes long; CMSG_FIRSTHDR returns its start.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
        let v = size as u16;
        std::ptr::copy_nonoverlapping((&v as *const u16).cast::<u8>(), libc::CMSG_DATA(c), 2);
        h.msg_controllen = libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as _;
    }
}

/// Sets an integer socket option.
pub fn set_int_option(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a live c_int of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Gives a socket `bytes` of send and receive buffer: as asked where the
/// host's limits allow, past them where we may (`CAP_NET_ADMIN`), else as
/// much as the limits allow. A burst of 64 KiB frames or GSO trains needs it.
pub fn size_buffers(fd: RawFd, bytes: libc::c_int) {
    for (forced, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        if set_int_option(fd, libc::SOL_SOCKET, forced, bytes).is_err() {
            let _ = set_int_option(fd, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

/// How many descriptors [`wait`] watches at most.
pub const MAX_WAIT_FDS: usize = 4;

/// Waits until one of `fds` (at most [`MAX_WAIT_FDS`]) has `events`, or the
/// timeout passes. Returns the index of the first ready descriptor. Pumps call
/// it once per batch, so it does not allocate.
pub fn wait(fds: &[RawFd], events: libc::c_short, timeout: Option<Duration>) -> io::Result<Option<usize>> {
    let unused = libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    };
    let mut pfds = [unused; MAX_WAIT_FDS];
    let n = fds.len().min(MAX_WAIT_FDS);
    for (p, &fd) in pfds.iter_mut().zip(&fds[..n]) {
        *p = libc::pollfd { fd, events, revents: 0 };
    }
    // Round up: a timer due in 0.4 ms must not spin with 0 ms waits.
    let ms = timeout.map_or(-1, |t| {
        (t.as_micros().div_ceil(1000)).min(i32::MAX as u128) as libc::c_int
    });
    // SAFETY: pfds holds n valid pollfd entries for the duration of the call.
    match cvt(unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, ms) }) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(pfds[..n].iter().position(|p| p.revents != 0)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why [`wait_or_stop`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The descriptor is readable.
    Ready,
    /// The stop signal is set.
    Stop,
    /// The timeout passed (or a signal interrupted the wait).
    Timeout,
}

/// Waits until `fd` is readable, `stop` is set, or `timeout` passes: the one
/// wait of every data-plane thread.
pub fn wait_or_stop(fd: RawFd, stop: &StopSignal, timeout: Option<Duration>) -> io::Result<Wake> {
    Ok(match wait(&[fd, stop.fd()], libc::POLLIN, timeout)? {
        Some(1) => Wake::Stop,
        Some(_) => Wake::Ready,
        None => Wake::Timeout,
    })
}

/// A level-triggered stop signal that any number of data-plane threads poll on.
#[derive(Debug)]
pub struct StopSignal {
    fd: OwnedFd,
    flag: std::sync::atomic::AtomicBool,
}

impl StopSignal {
    /// A new, unset signal.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: fd is a fresh descriptor we own.
        Ok(StopSignal {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            flag: false.into(),
        })
    }

    /// Sets the signal; it stays set.
    pub fn stop(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. Failure means the
        // counter is already huge, i.e. already set.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Whether the signal is set.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(lens: &[usize], max: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < lens.len() {
            let n = gso_run(lens[i..].iter().copied(), max);
            out.push(n);
            i += n;
        }
        out
    }

    #[test]
    fn gso_runs_take_equal_sizes_and_one_shorter_last() {
        assert_eq!(runs(&[100, 100, 100, 40, 100, 100], 64), [4, 2]);
        assert_eq!(runs(&[100, 200, 200, 200], 64), [1, 3]);
        assert_eq!(runs(&[100; 10], 4), [4, 4, 2]);
        assert_eq!(runs(&[1400; 60], 64), [46, 14], "65000 bytes at most");
        assert_eq!(runs(&[], 64), Vec::<usize>::new());
    }

    /// UDP over loopback: a GSO send of equal-sized datagrams arrives as
    /// separate datagrams at a plain socket, and as one GRO train (with its
    /// stride) at a socket with UDP_GRO.
    #[test]
    fn gso_sends_arrive_whole_and_gro_receives_keep_the_stride() {
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gro = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a live c_int.
        let r = unsafe {
            libc::setsockopt(
                gro.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&on as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(r, 0);
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut out = PacketBatch::new();
        for i in 0..5u8 {
            out.push(&[i; 300]);
        }
        out.push(&[9; 100]);
        for target in [&plain, &gro] {
            let dest = target.local_addr().unwrap();
            send_gso(sender.as_raw_fd(), &out, Some(dest), 64).unwrap();
            let mut got = PacketBatch::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            let mut datagrams = Vec::new();
            while datagrams.len() < 6 && std::time::Instant::now() < deadline {
                wait(&[target.as_raw_fd()], libc::POLLIN, Some(Duration::from_millis(100))).unwrap();
                got.clear();
                recv_batch(target.as_raw_fd(), &mut got, std::ptr::eq(target, &gro)).unwrap();
                for i in 0..got.len() {
                    let stride = got.stride(i);
                    let p = got.get(i);
                    if stride == 0 {
                        datagrams.push(p.to_vec());
                    } else {
                        datagrams.extend(p.chunks(stride).map(<[u8]>::to_vec));
                    }
                }
            }
            let want: Vec<Vec<u8>> = out.iter().map(<[u8]>::to_vec).collect();
            assert_eq!(datagrams, want);
        }
    }
}
