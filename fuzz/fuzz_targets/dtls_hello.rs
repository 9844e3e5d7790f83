//! The server's ClientHello reader, before the cookie exchange: fed datagrams
//! from anyone (a flood sends thousands a second), it must never panic, and
//! a hello it accepts, rewritten as the first ClientHello for OpenSSL, must
//! be what a cookie-less client would have sent: the same record type,
//! version and epoch 0, the record before, message_seq 0, an empty cookie,
//! and every other byte of the message as it came. A proof added to a hello
//! and removed again gives back the very bytes (both handshake transcripts
//! are the hello OpenSSL made), and a proof found is the last extension's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teletun::tunnel::dtls::hello;

/// DTLS record header and handshake header.
const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;

fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |n, &b| (n << 8) | u64::from(b))
}

/// Adding and removing a proof are each other's inverse, byte for byte.
fn proofs_round_trip(h: &hello::ClientHello<'_>, data: &[u8]) {
    let mut out = Vec::new();
    match h.proof() {
        Some(proof) => {
            let proof: [u8; hello::PROOF_LEN] = proof.try_into().expect("a proof is PROOF_LEN bytes");
            assert_eq!(data[data.len() - hello::PROOF_LEN..], proof, "the last bytes");
            h.without_proof(&mut out).expect("a proof found can be removed");
            assert_eq!(out.len(), data.len() - 4 - hello::PROOF_LEN);
            let plain = hello::parse(&out).expect("without its proof still a ClientHello");
            assert_eq!(plain.cookie(), h.cookie());
            let mut again = Vec::new();
            if plain.with_proof(&proof, &mut again).is_some() {
                assert_eq!(again, data, "the proof added back gives the hello as it came");
            }
        }
        None => {
            assert_eq!(h.without_proof(&mut out), None);
            if h.with_proof(&[0x5a; hello::PROOF_LEN], &mut out).is_some() {
                let proven = hello::parse(&out).expect("with a proof still a ClientHello");
                assert_eq!(proven.proof(), Some(&[0x5a; hello::PROOF_LEN][..]));
                assert_eq!(proven.cookie(), h.cookie());
                let mut plain = Vec::new();
                proven.without_proof(&mut plain).expect("the proof added can be removed");
                assert_eq!(plain, data, "removing the proof gives the hello as it came");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(h) = hello::parse(data) else { return };
    proofs_round_trip(&h, data);
    let mut first = Vec::new();
    if h.first(&mut first).is_none() {
        // Only a hello in the very first record has none before it.
        assert_eq!(h.record_seq, 0);
        return;
    }
    let f = hello::parse(&first).expect("the rewritten hello reads as a ClientHello");
    assert_eq!(f.cookie(), b"");
    assert_eq!((f.record_seq, f.message_seq), (h.record_seq - 1, 0));
    assert_eq!(be(&first[5..11]), h.record_seq - 1);
    assert_eq!(first[..5], data[..5], "type, version and epoch kept");
    // The message as it came with the cookie cut out (found here on its
    // own: after the version, random and session id).
    let body = RECORD_HEADER + HANDSHAKE_HEADER;
    let cookie_len_at = body + 35 + usize::from(data[body + 34]);
    let cookie_end = cookie_len_at + 1 + usize::from(data[cookie_len_at]);
    assert_eq!(h.cookie(), &data[cookie_len_at + 1..cookie_end]);
    let mut expected = data[body..cookie_len_at].to_vec();
    expected.push(0);
    expected.extend_from_slice(&data[cookie_end..]);
    assert_eq!(first[body..], expected[..], "the message but for its cookie");
    assert_eq!(first[RECORD_HEADER], data[RECORD_HEADER], "still a ClientHello");
    let len = expected.len() as u64;
    assert_eq!(be(&first[11..13]), len + HANDSHAKE_HEADER as u64, "record length");
    assert_eq!(be(&first[RECORD_HEADER + 1..RECORD_HEADER + 4]), len, "message length");
    assert_eq!(be(&first[RECORD_HEADER + 6..RECORD_HEADER + 9]), 0, "fragment offset");
    assert_eq!(
        be(&first[RECORD_HEADER + 9..RECORD_HEADER + 12]),
        len,
        "fragment length"
    );
});
