//! The encrypted data plane. DTLS 1.2 (OpenSSL) today.

pub mod dtls;
pub mod link;
