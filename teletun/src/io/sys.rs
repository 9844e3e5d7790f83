//! Batched system calls: `recvmmsg`/`sendmmsg` for datagram sockets (UDP and
//! AF_UNIX `SOCK_SEQPACKET` alike), `poll`, and an eventfd that stops pumps.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::SockAddr;

use super::batch::{PacketBatch, BATCH_SIZE};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Receives as many datagrams as are waiting (up to the batch's free room)
/// without blocking. Returns how many arrived; 0 means none were waiting.
/// Datagrams larger than a buffer are cut by the kernel; they are dropped here
/// and counted in the second value.
pub fn recv_batch(fd: RawFd, batch: &mut PacketBatch) -> io::Result<(usize, usize)> {
    let super::batch::RawParts {
        bufs,
        lens,
        peers,
        count,
    } = batch.raw_parts();
    let start = *count;
    let room = BATCH_SIZE - start;
    if room == 0 {
        return Ok((0, 0));
    }
    let mut iovs: [MaybeUninit<libc::iovec>; BATCH_SIZE] = [MaybeUninit::uninit(); BATCH_SIZE];
    // SAFETY: sockaddr_storage and mmsghdr are plain C structs for which all-zero is valid.
    let mut names: [libc::sockaddr_storage; BATCH_SIZE] = unsafe { mem::zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH_SIZE] = unsafe { mem::zeroed() };
    for k in 0..room {
        let buf = &mut bufs[start + k];
        iovs[k].write(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
        msgs[k].msg_hdr.msg_iov = iovs[k].as_mut_ptr();
        msgs[k].msg_hdr.msg_iovlen = 1;
        msgs[k].msg_hdr.msg_name = (&mut names[k] as *mut libc::sockaddr_storage).cast();
        msgs[k].msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    }
    // SAFETY: every msg points at a live iovec over a live buffer and a live name slot.
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
        // Compact over dropped entries: slot k holds a dropped datagram or is src itself.
        let k = *count;
        bufs.swap(start + src, k);
        lens[k] = msg.msg_len as usize;
        peers[k] = (msg.msg_hdr.msg_namelen > 0)
            .then(|| {
                // SAFETY: the kernel wrote a sockaddr of msg_namelen bytes into names[src],
                // and sockaddr_storage has the layout of SockAddrStorage.
                let storage: socket2::SockAddrStorage = unsafe { mem::transmute(names[src]) };
                unsafe { SockAddr::new(storage, msg.msg_hdr.msg_namelen) }.as_socket()
            })
            .flatten();
        *count += 1;
    }
    Ok((*count - start, truncated))
}

/// Sends every packet of `batch` (to `dest`, or to the connected peer),
/// waiting for room in the socket buffer when needed.
pub fn send_batch(fd: RawFd, batch: &PacketBatch, dest: Option<SocketAddr>) -> io::Result<()> {
    let dest = dest.map(SockAddr::from);
    let mut sent = 0;
    while sent < batch.len() {
        let n = (batch.len() - sent).min(BATCH_SIZE);
        let mut iovs: [MaybeUninit<libc::iovec>; BATCH_SIZE] = [MaybeUninit::uninit(); BATCH_SIZE];
        // SAFETY: all-zero is a valid mmsghdr.
        let mut msgs: [libc::mmsghdr; BATCH_SIZE] = unsafe { mem::zeroed() };
        for k in 0..n {
            let p = batch.get(sent + k);
            iovs[k].write(libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            });
            msgs[k].msg_hdr.msg_iov = iovs[k].as_mut_ptr();
            msgs[k].msg_hdr.msg_iovlen = 1;
            if let Some(d) = &dest {
                msgs[k].msg_hdr.msg_name = d.as_ptr() as *mut libc::c_void;
                msgs[k].msg_hdr.msg_namelen = d.len();
            }
        }
        // SAFETY: the messages point at live buffers from `batch` and `dest`.
        let ret = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    wait(&[fd], libc::POLLOUT, Some(Duration::from_millis(100)))?;
                    continue;
                }
                _ => return Err(err),
            }
        }
        sent += ret as usize;
    }
    Ok(())
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
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: pfds holds n valid pollfd entries for the duration of the call.
    match cvt(unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, ms) }) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(pfds[..n].iter().position(|p| p.revents != 0)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// A level-triggered stop signal that any number of pump threads poll on.
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
