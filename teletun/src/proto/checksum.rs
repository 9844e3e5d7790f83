//! The Internet checksum (RFC 1071): a ones' complement sum of 16-bit
//! big-endian words, eight bytes at a time.

/// The folded ones' complement sum of `data` (an odd last byte padded with
/// zero), not yet complemented.
pub fn sum(data: &[u8]) -> u16 {
    fold(sum_wide(data))
}

/// The sum of `data` as 64-bit big-endian words in a wide accumulator:
/// because 2^16 ≡ 1 (mod 2^16 − 1), folding it gives the 16-bit word sum.
fn sum_wide(data: &[u8]) -> u128 {
    let mut acc: u128 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        acc += u128::from(u64::from_be_bytes(c.try_into().expect("8 bytes")));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u128::from(u64::from_be_bytes(tail))
}

/// Folds a wide sum to 16 bits with end-around carries.
pub fn fold(mut acc: u128) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Adds two folded sums.
pub fn add(a: u16, b: u16) -> u16 {
    fold(u128::from(a) + u128::from(b))
}

/// The sum of the TCP/UDP pseudo-header: the addresses as they sit in the IP
/// header (`addresses`: source then destination), the protocol and the
/// transport length.
pub fn pseudo_header(addresses: &[u8], protocol: u8, length: u32) -> u16 {
    fold(sum_wide(addresses) + u128::from(protocol) + u128::from(length >> 16) + u128::from(length & 0xffff))
}

/// Whether the transport checksum of `segment` (header and payload) is
/// correct under the pseudo-header sum `pseudo`.
pub fn transport_valid(pseudo: u16, segment: &[u8]) -> bool {
    add(pseudo, sum(segment)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071's definition, two bytes at a time.
    fn naive(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for pair in data.chunks(2) {
            s += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
    }

    proptest! {
        #[test]
        fn matches_the_definition(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let n = naive(&data);
            let s = sum(&data);
            // 0x0000 and 0xffff are the same number in ones' complement.
            prop_assert!(s == n || (s, n) == (0xffff, 0) || (s, n) == (0, 0xffff), "{s:#x} vs {n:#x}");
        }
    }
}
