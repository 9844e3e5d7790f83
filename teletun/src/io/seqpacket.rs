//! AF_UNIX `SOCK_SEQPACKET` between server-external and server-cluster: one
//! frame (virtio-net header + IP packet or super-packet) per message,
//! boundaries kept by the kernel.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, SockAddr, Socket, Type};

use super::batch::PacketBatch;
use super::offload::Capabilities;
use super::{sys, FrameSink, FrameSource};

/// One end of the AF_UNIX packet link.
pub struct SeqPacket {
    sock: Socket,
    /// What super-packets the other end takes (server-cluster's TUN).
    peer_takes: Capabilities,
}

fn new_socket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
}

/// Binds and listens at `path`, replacing a stale socket file that nobody
/// listens on. Fails if another process is listening there.
pub fn listen(path: &Path) -> Result<Socket> {
    if path.exists() {
        let probe = new_socket()?;
        match probe.connect(&SockAddr::unix(path)?) {
            Ok(()) => anyhow::bail!(
                "another process already listens on {}; stop it or choose another --sockfile",
                path.display()
            ),
            Err(_) => {
                std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let s = new_socket()?;
    s.bind(&SockAddr::unix(path)?)
        .with_context(|| format!("cannot bind socket {}", path.display()))?;
    // Only the owner may connect (the peer's uid is checked on accept too).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict socket {}", path.display()))?;
    s.listen(4)?;
    Ok(s)
}

/// The uid and pid of the process at the other end of a connected socket
/// (`SO_PEERCRED`).
pub fn peer_credentials(s: &Socket) -> io::Result<(u32, i32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes one ucred into a live one of the given length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

impl SeqPacket {
    /// Wraps an accepted or connected socket and makes it non-blocking with big buffers.
    pub fn new(sock: Socket) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        // A sender may queue only its send buffer's worth: the host's
        // default (~200 KiB) is three 64 KiB frames, and the two ends would
        // wake each other for every few.
        sys::size_buffers(sock.as_raw_fd(), 8 << 20);
        Ok(SeqPacket {
            sock,
            peer_takes: Capabilities::default(),
        })
    }

    /// Notes what super-packets the other end takes.
    pub fn set_peer_takes(&mut self, capabilities: Capabilities) {
        self.peer_takes = capabilities;
    }

    /// The uid and pid of the process at the other end (for a connected
    /// socket, the listener's when it listened).
    pub fn peer_credentials(&self) -> io::Result<(u32, i32)> {
        peer_credentials(&self.sock)
    }

    /// Connects to `path` once.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let s = new_socket()?;
        s.connect(&SockAddr::unix(path)?)?;
        Self::new(s)
    }

    /// Sends one message, waiting for buffer room.
    pub fn send_message(&self, msg: &[u8], timeout: Duration) -> io::Result<()> {
        loop {
            match self.sock.send(msg) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sys::wait(&[self.fd()], libc::POLLOUT, Some(timeout))?.is_none() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one message into `buf`, waiting up to `timeout`. Returns 0 at end
    /// of stream; a message larger than `buf` is an error.
    pub fn recv_message(&self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        loop {
            // SAFETY: recv into a live, writable buffer of buf.len() bytes.
            let r = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
            if r >= 0 {
                let n = r as usize;
                if n > buf.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "message too large"));
                }
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    if sys::wait(&[self.fd()], libc::POLLIN, Some(timeout))?.is_none() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether the peer has closed its end, checked without consuming data:
    /// the hang-up is seen even while messages it sent before leaving are
    /// still queued (a frame that came after the last session ended; a
    /// peek would see that frame and never the end).
    pub fn peer_closed(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: polls one live pollfd, without waiting.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
    }
}

impl FrameSource for Arc<SeqPacket> {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Receives waiting messages (frames), one per buffer.
    fn recv_frames(&mut self, frames: &mut PacketBatch) -> io::Result<usize> {
        let before = frames.len();
        let (n, truncated) = sys::recv_batch(self.sock.as_raw_fd(), frames, false)?;
        if truncated > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame larger than 64 KiB on the AF_UNIX link",
            ));
        }
        // End of stream arrives as a zero-length message; no peer sends empty frames.
        if (before..frames.len()).any(|i| frames.get(i).is_empty()) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the AF_UNIX peer closed the socket",
            ));
        }
        Ok(n)
    }
}

impl FrameSink for Arc<SeqPacket> {
    fn capabilities(&self) -> Capabilities {
        self.peer_takes
    }

    fn send_frames(&mut self, frames: &PacketBatch) -> io::Result<usize> {
        sys::send_batch(self.sock.as_raw_fd(), frames, None)?;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket file is the owner's alone, and an accepted connection
    /// names the process at its other end (server-cluster's uid check).
    #[test]
    fn the_socket_is_private_and_names_its_peer() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("teletun-seqpacket-{}", std::process::id()));
        let path = dir.join("link.sock");
        let listener = listen(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _client = SeqPacket::connect(&path).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (uid, pid) = peer_credentials(&accepted).unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(uid, unsafe { libc::geteuid() });
        assert_eq!(pid, std::process::id() as i32);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A peer that sent a message and left is seen gone while the message
    /// is still queued (server-external must notice server-cluster's restart
    /// even with a late frame unread).
    #[test]
    fn a_departure_is_seen_behind_a_queued_message() {
        let dir = std::env::temp_dir().join(format!("teletun-seqpacket-gone-{}", std::process::id()));
        let path = dir.join("link.sock");
        let listener = listen(&path).unwrap();
        let ours = SeqPacket::connect(&path).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        let theirs = SeqPacket::new(theirs).unwrap();
        assert!(!ours.peer_closed());
        theirs.send_message(b"a late frame", Duration::from_secs(1)).unwrap();
        assert!(!ours.peer_closed(), "a message is not a departure");
        drop(theirs);
        assert!(ours.peer_closed(), "gone, with its message still queued");
        let mut buf = [0u8; 64];
        assert_eq!(ours.recv_message(&mut buf, Duration::from_secs(1)).unwrap(), 12);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
