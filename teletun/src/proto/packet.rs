//! IP packet inspection (sans-IO): just enough to tell a well-formed IPv4 or IPv6
//! packet from garbage and to read its addresses. The data plane drops (and
//! counts) anything that does not pass, so malformed network input never reaches
//! a TUN device or the AF_UNIX socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER: usize = 40;

/// What the data plane needs to know about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    /// Source address.
    pub source: IpAddr,
    /// Destination address.
    pub destination: IpAddr,
    /// The protocol number (IPv4) or first next-header value (IPv6).
    pub protocol: u8,
}

/// Why a buffer is not a usable IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than the smallest header of its version.
    #[error("packet too short")]
    TooShort,
    /// Version nibble is neither 4 nor 6.
    #[error("not an IPv4 or IPv6 packet")]
    UnknownVersion,
    /// The header's length fields disagree with the buffer.
    #[error("length fields do not match the packet")]
    BadLength,
}

/// Inspects `packet`, which must hold exactly one IP packet.
pub fn inspect(packet: &[u8]) -> Result<PacketInfo, PacketError> {
    let first = *packet.first().ok_or(PacketError::TooShort)?;
    match first >> 4 {
        4 => {
            if packet.len() < IPV4_MIN_HEADER {
                return Err(PacketError::TooShort);
            }
            let header_len = usize::from(first & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if header_len < IPV4_MIN_HEADER || total_len < header_len || total_len != packet.len() {
                return Err(PacketError::BadLength);
            }
            let src: [u8; 4] = packet[12..16].try_into().expect("length checked");
            let dst: [u8; 4] = packet[16..20].try_into().expect("length checked");
            Ok(PacketInfo {
                source: Ipv4Addr::from(src).into(),
                destination: Ipv4Addr::from(dst).into(),
                protocol: packet[9],
            })
        }
        6 => {
            if packet.len() < IPV6_HEADER {
                return Err(PacketError::TooShort);
            }
            let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            // A zero payload length with data behind it is a jumbogram; we never carry those.
            if IPV6_HEADER + payload_len != packet.len() {
                return Err(PacketError::BadLength);
            }
            let src: [u8; 16] = packet[8..24].try_into().expect("length checked");
            let dst: [u8; 16] = packet[24..40].try_into().expect("length checked");
            Ok(PacketInfo {
                source: Ipv6Addr::from(src).into(),
                destination: Ipv6Addr::from(dst).into(),
                protocol: packet[6],
            })
        }
        _ => Err(PacketError::UnknownVersion),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ipv4_packet(payload: usize) -> Vec<u8> {
        let total = IPV4_MIN_HEADER + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p
    }

    #[test]
    fn reads_ipv4() {
        let info = inspect(&ipv4_packet(8)).unwrap();
        assert_eq!(info.source, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(info.destination, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(info.protocol, 17);
    }

    #[test]
    fn reads_ipv6() {
        let mut p = vec![0u8; IPV6_HEADER + 4];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&4u16.to_be_bytes());
        p[6] = 58;
        p[23] = 1;
        p[39] = 2;
        let info = inspect(&p).unwrap();
        assert_eq!(info.source, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(info.destination, "::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rejects_truncated_and_spliced() {
        let p = ipv4_packet(100);
        assert_eq!(inspect(&p[..60]), Err(PacketError::BadLength));
        let mut two = p.clone();
        two.extend_from_slice(&p);
        assert_eq!(inspect(&two), Err(PacketError::BadLength));
        assert_eq!(inspect(&[]), Err(PacketError::TooShort));
        assert_eq!(inspect(&[0x10; 40]), Err(PacketError::UnknownVersion));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = inspect(&bytes);
        }
    }
}
