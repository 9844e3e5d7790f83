//! The control channel: TCP + TLS 1.3. It carries the server's greeting (the
//! pod's addresses and resolv.conf) and then stays open with TCP keepalive;
//! closing it ends the session on both sides.

pub mod admission;
pub mod channel;
pub mod tls;
