//! The control channel's server greeting, as the client decodes it from a
//! server it does not trust yet: fed in arbitrary pieces, it must never panic,
//! and a greeting it accepts re-encodes to bytes that decode to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teletun::proto::control::{DecodeError, HelloDecoder, ServerGreeting};

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the stream is cut, as TCP may cut it.
    let Some((&cut, stream)) = data.split_first() else { return };
    let cut = usize::from(cut).min(stream.len());
    let mut decoder = HelloDecoder::new();
    let mut result = decoder.feed(&stream[..cut]);
    if let Ok(None) = result {
        result = decoder.feed(&stream[cut..]);
    }
    if let Ok(Some((ServerGreeting::Hello(hello), used))) = result {
        assert!(used <= stream.len());
        let bytes = match hello.encode() {
            Ok(b) => b,
            // Addresses may print longer than they were written (`::ffff:0:0`
            // is `::ffff:0.0.0.0`), past the list's limit: refused, not a bug.
            Err(DecodeError::TooLong { .. }) => return,
            Err(e) => panic!("a decoded greeting does not encode: {e}"),
        };
        let again = HelloDecoder::new().feed(&bytes).expect("its encoding decodes");
        match again {
            Some((ServerGreeting::Hello(h), n)) => {
                assert_eq!(h, hello);
                assert_eq!(n, bytes.len());
            }
            other => panic!("re-encoded greeting decoded as {other:?}"),
        }
    }
});
