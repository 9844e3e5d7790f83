//! The AF_UNIX link's first messages. When both servers hold the pair's link
//! key, they first prove it to each other ([`AuthMessage`]): server-cluster
//! challenges, server-external answers, server-cluster confirms. Then comes
//! server-cluster's greeting and, right after it, [`LinkParams`]: which link
//! protocol it speaks and which super-packets its TUN takes. From then on
//! every message, both ways, is a frame: a virtio-net header and an IP packet
//! or super-packet (docs/protocol.md).

/// The message's first bytes.
pub const MAGIC: &[u8; 6] = b"TTLINK";
/// This link protocol (1 was one bare IP packet per message).
pub const VERSION: u8 = 2;
/// The encoded length.
pub const LEN: usize = 8;

const TCP: u8 = 1;
const UDP: u8 = 2;

/// What server-cluster's side of the link takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkParams {
    /// TCP super-packets (its TUN does TSO).
    pub tcp: bool,
    /// UDP super-packets (its TUN does USO).
    pub udp: bool,
}

/// Why a link message was not understood.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Something else, or nothing.
    #[error("server-cluster sent no link parameters after its greeting (an older teletun?); run the same teletun release for server-external and server-cluster")]
    NotLinkParams,
    /// Another version.
    #[error("server-cluster speaks link protocol {0}, this server-external {VERSION}; run the same teletun release for both")]
    Version(u8),
}

impl LinkParams {
    /// The message.
    pub fn encode(&self) -> [u8; LEN] {
        let mut m = [0u8; LEN];
        m[..6].copy_from_slice(MAGIC);
        m[6] = VERSION;
        m[7] = if self.tcp { TCP } else { 0 } | if self.udp { UDP } else { 0 };
        m
    }

    /// Reads the message.
    pub fn decode(m: &[u8]) -> Result<LinkParams, LinkError> {
        if m.len() != LEN || &m[..6] != MAGIC {
            return Err(LinkError::NotLinkParams);
        }
        if m[6] != VERSION {
            return Err(LinkError::Version(m[6]));
        }
        Ok(LinkParams {
            tcp: m[7] & TCP != 0,
            udp: m[7] & UDP != 0,
        })
    }
}

/// How an authentication message starts (a greeting starts with an
/// address or `!`, so the two are never confused).
pub const AUTH_MAGIC: &[u8; 6] = b"TTAUTH";
/// The fresh random value each side contributes.
pub const NONCE_LEN: usize = 32;
/// An HMAC-SHA256 over both nonces, keyed with the link key.
pub const MAC_LEN: usize = 32;

/// The link's authentication, in the order it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMessage {
    /// server-cluster → server-external: its nonce.
    Challenge {
        /// server-cluster's nonce.
        cluster: [u8; NONCE_LEN],
    },
    /// server-external → server-cluster: its nonce and its proof.
    Answer {
        /// server-external's nonce.
        external: [u8; NONCE_LEN],
        /// [`link_mac`] by server-external.
        mac: [u8; MAC_LEN],
    },
    /// server-cluster → server-external: its proof.
    Confirm {
        /// [`link_mac`] by server-cluster.
        mac: [u8; MAC_LEN],
    },
}

/// Which server a MAC speaks for: each side's proof has its own label, so
/// one side's proof never passes for the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prover {
    /// server-external's answer.
    External,
    /// server-cluster's confirmation.
    Cluster,
}

/// HMAC-SHA256 (link key; label, server-cluster's nonce, server-external's
/// nonce): fresh on both sides, so a proof seen once is worth nothing again.
pub fn link_mac(key: &[u8], prover: Prover, cluster: &[u8; NONCE_LEN], external: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
    use openssl::{hash::MessageDigest, pkey::PKey, sign::Signer};
    let label: &[u8] = match prover {
        Prover::External => b"teletun link v1: server-external",
        Prover::Cluster => b"teletun link v1: server-cluster",
    };
    let mac = PKey::hmac(key)
        .and_then(|key| {
            let mut signer = Signer::new(MessageDigest::sha256(), &key)?;
            signer.update(label)?;
            signer.update(cluster)?;
            signer.update(external)?;
            signer.sign_to_vec()
        })
        // Only allocation failure makes OpenSSL's HMAC fail.
        .expect("HMAC-SHA256");
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&mac);
    out
}

impl AuthMessage {
    /// Whether a message is one of these (and not a greeting).
    pub fn is_auth(m: &[u8]) -> bool {
        m.starts_with(AUTH_MAGIC)
    }

    /// The message.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = AUTH_MAGIC.to_vec();
        match self {
            AuthMessage::Challenge { cluster } => {
                m.push(1);
                m.extend_from_slice(cluster);
            }
            AuthMessage::Answer { external, mac } => {
                m.push(2);
                m.extend_from_slice(external);
                m.extend_from_slice(mac);
            }
            AuthMessage::Confirm { mac } => {
                m.push(3);
                m.extend_from_slice(mac);
            }
        }
        m
    }

    /// Reads a message; `None` for anything else or a wrong length.
    pub fn decode(m: &[u8]) -> Option<AuthMessage> {
        let body = m.strip_prefix(AUTH_MAGIC.as_slice())?;
        let (&kind, rest) = body.split_first()?;
        match (kind, rest.len()) {
            (1, NONCE_LEN) => Some(AuthMessage::Challenge {
                cluster: rest.try_into().ok()?,
            }),
            (2, n) if n == NONCE_LEN + MAC_LEN => Some(AuthMessage::Answer {
                external: rest[..NONCE_LEN].try_into().ok()?,
                mac: rest[NONCE_LEN..].try_into().ok()?,
            }),
            (3, MAC_LEN) => Some(AuthMessage::Confirm {
                mac: rest.try_into().ok()?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_messages_round_trip_and_nothing_else_decodes() {
        let all = [
            AuthMessage::Challenge {
                cluster: [1; NONCE_LEN],
            },
            AuthMessage::Answer {
                external: [2; NONCE_LEN],
                mac: [3; MAC_LEN],
            },
            AuthMessage::Confirm { mac: [4; MAC_LEN] },
        ];
        for m in all {
            let bytes = m.encode();
            assert!(AuthMessage::is_auth(&bytes));
            assert_eq!(AuthMessage::decode(&bytes), Some(m));
            assert_eq!(AuthMessage::decode(&bytes[..bytes.len() - 1]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(AuthMessage::decode(&longer), None);
        }
        assert_eq!(AuthMessage::decode(b"TTAUTH\x04"), None);
        // A greeting is not an authentication message.
        assert!(!AuthMessage::is_auth(b"10.244.1.5\0nameserver 10.96.0.10\0"));
        assert!(!AuthMessage::is_auth(&LinkParams::default().encode()));
    }

    #[test]
    fn each_mac_depends_on_the_key_the_prover_and_both_nonces() {
        let (key, c, e) = ([7u8; 32], [1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let mac = link_mac(&key, Prover::External, &c, &e);
        assert_eq!(mac, link_mac(&key, Prover::External, &c, &e));
        assert_ne!(mac, link_mac(&[8u8; 32], Prover::External, &c, &e));
        assert_ne!(mac, link_mac(&key, Prover::Cluster, &c, &e));
        assert_ne!(mac, link_mac(&key, Prover::External, &e, &e));
        assert_ne!(mac, link_mac(&key, Prover::External, &c, &c));
    }

    #[test]
    fn round_trip_and_refusals() {
        for (tcp, udp) in [(false, false), (true, false), (true, true)] {
            let p = LinkParams { tcp, udp };
            assert_eq!(LinkParams::decode(&p.encode()), Ok(p));
        }
        let mut old = LinkParams::default().encode();
        old[6] = 1;
        assert_eq!(LinkParams::decode(&old), Err(LinkError::Version(1)));
        assert_eq!(LinkParams::decode(b"\x45\x00"), Err(LinkError::NotLinkParams));
    }
}
