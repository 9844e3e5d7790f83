//! IP packet inspection and the TCP MSS clamp, which every packet from the
//! TUN, the tunnel or the AF_UNIX link goes through: never a panic, an
//! accepted packet has the version its first nibble says, and the clamp
//! changes at most the four bytes of the MSS value and the checksum, once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teletun::proto::packet::inspect;
use teletun::tunnel::pmtu::clamp_mss;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = inspect(data) {
        match data[0] >> 4 {
            4 => assert!(info.source.is_ipv4() && info.destination.is_ipv4()),
            6 => assert!(info.source.is_ipv6() && info.destination.is_ipv6()),
            v => panic!("accepted a packet of IP version {v}"),
        }
    }
    let mut clamped = data.to_vec();
    if clamp_mss(&mut clamped, 1200) {
        let changed = data.iter().zip(&clamped).filter(|(a, b)| a != b).count();
        assert!(changed <= 4, "the clamp changed {changed} bytes");
        assert!(!clamp_mss(&mut clamped, 1200), "clamped twice");
    }
});
