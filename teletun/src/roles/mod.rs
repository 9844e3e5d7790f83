//! The roles: thin orchestration that wires codecs, transport, I/O and network
//! configuration together.

pub mod cleanup;
pub mod client;
pub mod guard;
pub mod keygen;
pub mod server_cluster;
pub mod server_external;
