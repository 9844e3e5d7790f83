//! `testbench agent` tools that play strangers and intruders: a connect and
//! datagram flood, raw UDP packets with forged addresses, a collector that
//! says what arrived, and a probe of an AF_UNIX socket.

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

mod flood;
mod squatter;

/// The hostile agent commands.
#[derive(Debug, Subcommand)]
pub enum HostileCommand {
    /// Flood `control` with TCP connects and `data` with UDP datagrams until
    /// SIGTERM; then print what happened as one JSON line.
    Flood {
        /// TCP address to connect to.
        #[arg(long)]
        control: SocketAddr,
        /// UDP address to send to.
        #[arg(long)]
        data: SocketAddr,
        /// Connects per second.
        #[arg(long)]
        connects: u32,
        /// Datagrams per second.
        #[arg(long)]
        datagrams: u32,
        /// Connect from a random address of this IPv6 prefix each time (it
        /// must be routed locally here, non-local binds allowed).
        #[arg(long)]
        sources: Option<ipnet::Ipv6Net>,
        /// Real DTLS clients per second at `data`, each from a port of its
        /// own, that return the server's cookie and go silent.
        #[arg(long, default_value_t = 0)]
        dtls_clients: u32,
    },
    /// Send `count` UDP datagrams carrying `token` from a forged `source`
    /// (raw IPv4 socket, header built here).
    ForgeUdp {
        #[arg(long)]
        source: Ipv4Addr,
        #[arg(long)]
        dest: SocketAddrV4,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Print "ready", then each datagram received on `port` for `seconds`, one per line.
    CollectUdp {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        seconds: u64,
    },
    /// Connect to an AF_UNIX SEQPACKET socket and say what came of it:
    /// "refused: …", "greeted: N bytes", "closed" or "silent".
    LinkProbe { path: PathBuf },
}

/// Runs one hostile command.
pub fn run(cmd: HostileCommand) -> Result<()> {
    match cmd {
        HostileCommand::Flood {
            control,
            data,
            connects,
            datagrams,
            sources,
            dtls_clients,
        } => flood::flood(
            control,
            data,
            flood::Rates {
                connects,
                datagrams,
                dtls_clients,
            },
            sources,
        ),
        HostileCommand::ForgeUdp {
            source,
            dest,
            token,
            count,
        } => forge_udp(source, dest, &token, count),
        HostileCommand::CollectUdp { port, seconds } => collect_udp(port, seconds),
        HostileCommand::LinkProbe { path } => {
            println!("{}", link_probe(&path));
            Ok(())
        }
    }
}

fn forge_udp(source: Ipv4Addr, dest: SocketAddrV4, token: &str, count: u32) -> Result<()> {
    // SAFETY: a plain socket(2) call; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("cannot open a raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let packet = udp_packet(source, dest, token.as_bytes());
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dest.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    for _ in 0..count {
        // SAFETY: the buffer and address outlive the call; their lengths are theirs.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            bail!(
                "cannot send a forged packet to {dest}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// An IPv4 UDP packet from `source` to `dest` with `payload`, checksums
/// filled in (the kernel fills the IPv4 header checksum of raw sends anyway).
fn udp_packet(source: Ipv4Addr, dest: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&source.octets());
    p[16..20].copy_from_slice(&dest.ip().octets());
    let header_sum = teletun::proto::checksum::sum(&p[..20]);
    p[10..12].copy_from_slice(&(!header_sum).to_be_bytes());
    p[20..22].copy_from_slice(&40_000u16.to_be_bytes());
    p[22..24].copy_from_slice(&dest.port().to_be_bytes());
    p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + udp_len);
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&p[20..]);
    let sum = !teletun::proto::checksum::sum(&pseudo);
    p[26..28].copy_from_slice(&(if sum == 0 { 0xffff } else { sum }).to_be_bytes());
    p
}

fn collect_udp(port: u16, seconds: u64) -> Result<()> {
    let socket = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("cannot bind UDP port {port}"))?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                writeln!(out, "{} from {from}", String::from_utf8_lossy(&buf[..n]))?;
                out.flush()?;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for a `collect-udp` child's "ready" line.
pub fn wait_ready(child: &mut std::process::Child) -> Result<std::io::BufReader<std::process::ChildStdout>> {
    let out = child.stdout.take().context("collect-udp's output is not piped")?;
    let mut reader = std::io::BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("collect-udp did not start: {line:?}");
    }
    Ok(reader)
}

fn link_probe(path: &std::path::Path) -> String {
    let link = match teletun::io::seqpacket::SeqPacket::connect(path) {
        Ok(l) => l,
        Err(e) => return format!("refused: {e}"),
    };
    let mut buf = vec![0u8; 65536];
    match link.recv_message(&mut buf, Duration::from_secs(2)) {
        Ok(0) => "closed".into(),
        Ok(n) => format!("greeted: {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
            if link.peer_closed() {
                "closed".into()
            } else {
                "silent".into()
            }
        }
        Err(_) => "closed".into(),
    }
}

/// A running flood generator, and a watch on the process it aims at.
pub struct FloodRun {
    /// The generator.
    pub generator: crate::exec::Background,
    /// Whether server-external must report turning it away (connections
    /// aimed at it).
    pub at_server: bool,
    /// The watched process and the generator, their CPU seconds when the
    /// flood began, and when that was.
    cpu_at_start: (u32, f64, f64, Instant),
    watching: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<u64>>,
}

impl FloodRun {
    /// Wraps a started generator and samples the open files of process
    /// `target` every 100 ms until [`FloodRun::finish`].
    pub fn watch(generator: crate::exec::Background, at_server: bool, target: u32) -> FloodRun {
        let generator_pid = generator.child.id();
        let watching = Arc::new(AtomicBool::new(true));
        let flag = watching.clone();
        let watcher = std::thread::spawn(move || {
            let mut most = 0;
            while flag.load(Ordering::Relaxed) {
                if let Ok(entries) = std::fs::read_dir(format!("/proc/{target}/fd")) {
                    most = most.max(entries.count() as u64);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            most
        });
        FloodRun {
            generator,
            at_server,
            cpu_at_start: (
                target,
                crate::bench::cpu_seconds(&[target]),
                crate::bench::cpu_seconds(&[generator_pid]),
                Instant::now(),
            ),
            watching,
            watcher: Some(watcher),
        }
    }

    /// Stops the generator; returns its last output line (its counts, as
    /// JSON), the most open files the target had, and the shares of one CPU
    /// the target and the generator used while the flood ran.
    pub fn finish(mut self) -> Result<(serde_json::Value, u64, (f64, f64))> {
        let (pid, target_before, generator_before, began) = self.cpu_at_start;
        let seconds = began.elapsed().as_secs_f64();
        let cpu_share = (
            (crate::bench::cpu_seconds(&[pid]) - target_before) / seconds,
            (crate::bench::cpu_seconds(&[self.generator.child.id()]) - generator_before) / seconds,
        );
        self.generator.signal(libc::SIGTERM);
        let status = self.generator.wait(Duration::from_secs(15))?;
        let most_fds = self.stop_watching();
        let text = self.generator.log_text();
        if !status.success() {
            bail!(
                "the flood generator failed ({status}): {}",
                crate::exec::last_lines(&text, 3)
            );
        }
        let last = text.lines().last().unwrap_or("");
        let counts = serde_json::from_str(last).with_context(|| format!("the flood generator's counts: {last:?}"))?;
        Ok((counts, most_fds, cpu_share))
    }

    fn stop_watching(&mut self) -> u64 {
        self.watching.store(false, Ordering::Relaxed);
        self.watcher.take().map_or(0, |w| w.join().unwrap_or(0))
    }
}

impl Drop for FloodRun {
    fn drop(&mut self) {
        self.stop_watching();
    }
}
