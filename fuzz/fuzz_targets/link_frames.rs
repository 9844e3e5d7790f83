//! The AF_UNIX link between server-cluster and server-external: its
//! authentication and parameters messages, and frames (virtio-net header +
//! packet or super-packet) split into packets. Never a panic; a plain frame gives its packet back as it is (the
//! tunnel's receiver inspects it), and every segment of a super-packet is a
//! well-formed IP packet; each lands after the headroom asked for.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use teletun::io::batch::PacketBatch;
use teletun::io::offload::{gso_header_len, split_frame, VirtioHeader, GSO_NONE, VIRTIO_HEADER_LEN};
use teletun::proto::link::{AuthMessage, LinkParams};
use teletun::proto::packet::inspect;

/// Headroom as server-external leaves it for the record header.
const HEADROOM: usize = 21;

static OUT: Mutex<Option<PacketBatch>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    if let Ok(params) = LinkParams::decode(data) {
        assert_eq!(LinkParams::decode(&params.encode()), Ok(params));
    }
    // The link's authentication messages: what decodes is exactly what encodes.
    if let Some(m) = AuthMessage::decode(data) {
        assert_eq!(m.encode(), data);
    }
    let mut guard = OUT.lock().unwrap();
    let out = guard.get_or_insert_with(PacketBatch::new);
    out.clear();
    let mut frame = data.to_vec();
    if let Ok(n) = split_frame(&mut frame, out, HEADROOM) {
        assert_eq!(n, out.len());
        let plain = data[1] == GSO_NONE;
        if !plain {
            // The segments' payloads, in order, are the super-packet's payload.
            let header = VirtioHeader::decode(data).expect("it split");
            let packet = &data[VIRTIO_HEADER_LEN..];
            let (_, len) = gso_header_len(packet, &header).expect("it split");
            let payload: Vec<u8> = (0..out.len()).flat_map(|i| out.get(i)[len..].to_vec()).collect();
            assert_eq!(payload, &packet[len..], "segments do not carry the super-packet's payload");
        }
        for i in 0..out.len() {
            assert_eq!(out.start(i), HEADROOM);
            let packet = out.get(i);
            if plain {
                // Only a checksum the header asks for may have been filled in.
                assert_eq!(packet.len(), data.len() - VIRTIO_HEADER_LEN);
            } else {
                assert!(inspect(packet).is_ok(), "split into a malformed segment: {packet:02x?}");
            }
        }
    }
});
