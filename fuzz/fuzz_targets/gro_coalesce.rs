//! GRO coalescing (packets → super-packet frames for the TUN and the link)
//! and GSO splitting (frames → packets): arbitrary packets never panic either,
//! every frame the coalescer makes splits cleanly, and splitting them gives
//! back exactly the packets that went in (as a multiset: flows may be
//! reordered among themselves, never within).
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use teletun::io::batch::PacketBatch;
use teletun::io::offload::{split_frame, Capabilities, Coalescer};

static BATCHES: Mutex<Option<(PacketBatch, PacketBatch)>> = Mutex::new(None);

/// The input as packets: each a 2-byte big-endian length (at most 1,600) and its bytes.
fn packets(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = (usize::from(u16::from_be_bytes([data[0], data[1]])) % 1601).min(data.len() - 2);
        out.push(&data[2..2 + len]);
        data = &data[2 + len..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&caps, rest)) = data.split_first() else { return };
    let capabilities = Capabilities { tcp: caps & 1 != 0, udp: caps & 2 != 0 };
    let sent = packets(rest);
    let mut guard = BATCHES.lock().unwrap();
    let (frames, split) = guard.get_or_insert_with(|| (PacketBatch::new(), PacketBatch::new()));
    let mut coalescer = Coalescer::new(capabilities);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut drain = |frames: &mut PacketBatch, got: &mut Vec<Vec<u8>>| {
        for i in 0..frames.len() {
            let (buf, start, len) = frames.buffer_mut(i);
            split.clear();
            split_frame(&mut buf[start..start + len], split, 0).expect("the coalescer made a frame that does not split");
            got.extend(split.iter().map(<[u8]>::to_vec));
        }
        frames.clear();
    };
    frames.clear();
    for p in &sent {
        while !coalescer.push(p, frames) {
            coalescer.finish(frames);
            drain(frames, &mut got);
        }
    }
    coalescer.finish(frames);
    drain(frames, &mut got);
    // Empty packets are dropped and counted; every other one comes back.
    let mut want: Vec<Vec<u8>> = sent.iter().filter(|p| !p.is_empty()).map(|p| p.to_vec()).collect();
    assert_eq!(coalescer.stats.dropped, (sent.len() - want.len()) as u64);
    want.sort();
    got.sort();
    assert_eq!(got, want, "coalesce then split changed the packets");
});
