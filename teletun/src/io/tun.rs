//! The TUN device (tun-rs), as a packet source and sink.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::batch::PacketBatch;
use super::{PacketSink, PacketSource};

/// A layer-3 TUN device without packet information headers, non-blocking.
pub struct Tun {
    dev: tun_rs::SyncDevice,
    name: String,
}

impl Tun {
    /// Creates a TUN device. `pattern` may hold `%d` (the kernel picks the
    /// first free number: `tel%d` gives tel0, tel1, …). The device is up.
    pub fn create(pattern: &str, mtu: u16) -> Result<Tun> {
        let dev = tun_rs::DeviceBuilder::new()
            .name(pattern)
            .mtu(mtu)
            .enable(true)
            .build_sync()
            .with_context(|| {
                format!("cannot create TUN device {pattern} (needs root or CAP_NET_ADMIN and /dev/net/tun)")
            })?;
        dev.set_nonblocking(true)?;
        let name = dev.name().context("cannot read the TUN device's name")?;
        Ok(Tun { dev, name })
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

impl PacketSink for Arc<Tun> {
    /// Writes every packet. A packet the kernel refuses is skipped and counted.
    fn send(&mut self, batch: &PacketBatch) -> io::Result<usize> {
        let mut refused = 0;
        for p in batch.iter() {
            loop {
                match self.dev.send(p) {
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
            let c = Tun::create("tel%d", 1400).unwrap();
            assert_eq!(c.name(), "tel0", "a freed number is reused");
        })
        .join()
        .unwrap();
    }
}
