//! The AF_UNIX link's second message: right after its greeting, server-cluster
//! says which link protocol it speaks and which super-packets its TUN takes.
//! From then on every message, both ways, is a frame: a virtio-net header and
//! an IP packet or super-packet (docs/protocol.md).

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

#[cfg(test)]
mod tests {
    use super::*;

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
