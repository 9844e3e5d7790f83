//! `testbench agent`: tiny servers and probes that run inside namespaces.
//! Servers: TCP and UDP echo, an HTTP responder. Probes: check an echo or an
//! HTTP answer and exit 0, or print why not and exit 1.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

/// Agent commands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Serve TCP+UDP echo and HTTP until killed.
    Serve {
        /// Name to put in HTTP answers.
        #[arg(long)]
        name: String,
        /// TCP and UDP echo port.
        #[arg(long)]
        echo_port: u16,
        /// HTTP port.
        #[arg(long)]
        http_port: u16,
    },
    /// Send bytes over TCP and expect them echoed.
    TcpEcho { addr: SocketAddr },
    /// Send a datagram and expect it echoed.
    UdpEcho { addr: SocketAddr },
    /// GET / and expect 200 with `expect` in the body.
    Http { addr: SocketAddr, expect: String },
    /// Accept one TCP connection and expect `token` from it.
    Listen {
        port: u16,
        token: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Connect and send `token`.
    Send { addr: SocketAddr, token: String },
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn any(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
}

fn token() -> Vec<u8> {
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.to_vec()
}

/// Runs an agent command.
pub fn run(cmd: AgentCommand) -> Result<()> {
    match cmd {
        AgentCommand::Serve {
            name,
            echo_port,
            http_port,
        } => serve(name, echo_port, http_port),
        AgentCommand::TcpEcho { addr } => {
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let t = token();
            s.write_all(&t)?;
            let mut back = vec![0u8; t.len()];
            s.read_exact(&mut back).context("no echo")?;
            if back != t {
                bail!("echo differs");
            }
            println!("ok: {} bytes echoed by {addr}", t.len());
            Ok(())
        }
        AgentCommand::UdpEcho { addr } => {
            let s = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            s.connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let t = token();
            let mut buf = [0u8; 2048];
            for _ in 0..5 {
                s.send(&t)?;
                if let Ok(n) = s.recv(&mut buf) {
                    if buf[..n] == t[..] {
                        println!("ok: datagram echoed by {addr}");
                        return Ok(());
                    }
                }
            }
            bail!("no UDP echo from {addr} after 5 tries")
        }
        AgentCommand::Http { addr, expect } => {
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            if !answer.starts_with("HTTP/1.0 200") || !answer.contains(&expect) {
                bail!("unexpected answer: {:?}", answer.lines().next().unwrap_or(""));
            }
            println!("ok: {}", answer.lines().last().unwrap_or(""));
            Ok(())
        }
        AgentCommand::Listen { port, token, timeout } => {
            let l = TcpListener::bind(any(port))?;
            println!("listening on {port}");
            l.set_nonblocking(true)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
            let (mut s, from) = loop {
                match l.accept() {
                    Ok(x) => break x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            bail!("no connection within {timeout} s");
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let mut got = String::new();
            s.read_to_string(&mut got)?;
            if got.trim() != token {
                bail!("got {got:?} from {from}, expected {token:?}");
            }
            println!("ok: {token} from {from}");
            Ok(())
        }
        AgentCommand::Send { addr, token } => {
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
            s.write_all(token.as_bytes())?;
            Ok(())
        }
    }
}

fn serve(name: String, echo_port: u16, http_port: u16) -> Result<()> {
    let tcp = TcpListener::bind(any(echo_port))?;
    let udp = UdpSocket::bind(any(echo_port))?;
    let http = TcpListener::bind(any(http_port))?;
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    println!("serving echo on {echo_port} and HTTP on {http_port} as {name}");
    for s in http.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let mut s = s;
            let _ = s.set_read_timeout(Some(TIMEOUT));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let body = format!("hello from {name} to {peer}\n");
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        });
    }
    Ok(())
}
