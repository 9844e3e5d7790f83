//! The roles: thin orchestration that wires codecs, transport, I/O and network
//! configuration together.

pub mod cleanup;
pub mod client;
pub mod guard;
pub mod keygen;
pub mod link_auth;
pub mod server_cluster;
pub mod server_external;
