//! Async helpers shared by both ends of the control channel.

use std::time::Duration;

use anyhow::{bail, Result};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use crate::proto::control::{HelloDecoder, ServerGreeting};

/// How long the control connection may go without hearing from the peer before
/// TCP gives up on it. This is a backstop: the data plane's heartbeat
/// (`tunnel::liveness::SILENCE_LIMIT`) notices a dead peer within 4 s; keepalive
/// probes come only once a second, so a tight TCP bound would mistake a lossy
/// path for a dead one.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(15);

/// Sets keepalive and the user timeout so a vanished peer ends the session
/// within [`DEAD_PEER_TIMEOUT`], and disables Nagle (messages are tiny).
pub fn tune_tcp(stream: &TcpStream) -> std::io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(12);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(DEAD_PEER_TIMEOUT))?;
    Ok(())
}

/// Reads one greeting. Bytes after it are a protocol error: the seed's server
/// sends nothing more.
pub async fn read_greeting<R: AsyncRead + Unpin>(reader: &mut R) -> Result<ServerGreeting> {
    let mut decoder = HelloDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the control connection before sending its addresses and resolv.conf");
        }
        if let Some((greeting, used)) = decoder.feed(&buf[..n])? {
            if used != n {
                bail!("the server sent unexpected bytes after its resolv.conf");
            }
            return Ok(greeting);
        }
    }
}

/// How a control connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed it properly (TLS close_notify).
    Cleanly,
    /// The peer's side vanished without close_notify (killed, or the connection reset).
    Abruptly,
}

/// Waits until the peer closes the connection. Any data the peer sends is a
/// protocol violation; other failures (timeouts, resets) are errors too.
pub async fn wait_closed<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Closed> {
    let mut buf = [0u8; 64];
    match reader.read(&mut buf).await {
        Ok(0) => Ok(Closed::Cleanly),
        Ok(_) => bail!("the peer sent unexpected data on the control connection"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Closed::Abruptly),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(Closed::Abruptly),
        Err(e) => Err(e.into()),
    }
}
