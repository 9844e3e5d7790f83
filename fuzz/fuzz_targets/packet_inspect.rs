//! IP packet inspection, which every packet from the TUN, the tunnel or the
//! AF_UNIX link goes through: never a panic, and an accepted packet has the
//! version its first nibble says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teletun::proto::packet::inspect;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = inspect(data) {
        match data[0] >> 4 {
            4 => assert!(info.source.is_ipv4() && info.destination.is_ipv4()),
            6 => assert!(info.source.is_ipv6() && info.destination.is_ipv6()),
            v => panic!("accepted a packet of IP version {v}"),
        }
    }
});
