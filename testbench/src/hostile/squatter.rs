//! Squatters for `testbench agent flood --dtls-clients N`: real DTLS 1.2
//! clients (OpenSSL, as any host could run) that each open a fresh UDP port,
//! send a ClientHello, return the server's cookie in a second one, and then
//! go silent. A server that lets the first cookie-valid ClientHello from the
//! client's public address bind its handshake is held by them until its
//! handshake times out; from behind the laptop's NAT they share its address.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openssl::ssl::{Ssl, SslContext, SslMethod, SslStream, SslVerifyMode};

/// How long a squatter waits for the server's HelloVerifyRequest.
const PATIENCE: Duration = Duration::from_millis(500);
/// Squatters waiting for their answer at once, at most.
const MAX_WAITING: usize = 2000;

/// What the squatters did.
#[derive(Default)]
pub(super) struct SquatterCounts {
    /// ClientHellos sent (each from a port of its own).
    pub started: AtomicU64,
    /// Second ClientHellos sent: the server's cookie returned.
    pub returned_cookie: AtomicU64,
}

/// A connected UDP socket as OpenSSL's transport, counting what it sent.
struct Port {
    socket: UdpSocket,
    sent: usize,
}

impl Read for Port {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf)
    }
}

impl Write for Port {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sent += 1;
        self.socket.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn context() -> Result<SslContext> {
    let mut b = SslContext::builder(SslMethod::dtls())?;
    b.set_verify(SslVerifyMode::NONE);
    Ok(b.build())
}

fn start(ctx: &SslContext, to: SocketAddr) -> Result<(SslStream<Port>, Instant)> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let socket = UdpSocket::bind(bind)?;
    socket.connect(to)?;
    socket.set_nonblocking(true)?;
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Port { socket, sent: 0 })?;
    // Sends the ClientHello; then it waits for an answer.
    let _ = stream.do_handshake();
    Ok((stream, Instant::now()))
}

/// Starts `per_second` squatters aimed at `to` until `stop`.
pub(super) fn run(to: SocketAddr, per_second: u32, counts: &SquatterCounts, stop: &AtomicBool) -> Result<()> {
    let ctx = context().context("cannot set up OpenSSL's DTLS client")?;
    let begin = Instant::now();
    let mut started: u64 = 0;
    let mut waiting: Vec<(SslStream<Port>, Instant)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let due = (begin.elapsed().as_secs_f64() * f64::from(per_second)) as u64;
        while started < due {
            started += 1;
            if waiting.len() >= MAX_WAITING {
                continue;
            }
            // Out of ports or descriptors: the next tick tries again.
            if let Ok(s) = start(&ctx, to) {
                counts.started.fetch_add(1, Ordering::Relaxed);
                waiting.push(s);
            }
        }
        waiting.retain_mut(|(stream, since)| {
            let _ = stream.do_handshake();
            if stream.get_ref().sent >= 2 {
                // The cookie went back: silent from now on.
                counts.returned_cookie.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            since.elapsed() < PATIENCE
        });
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}
