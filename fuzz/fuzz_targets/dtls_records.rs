//! DTLS 1.2 records as the data plane reads them before anything reaches
//! OpenSSL. Two inputs: a datagram from anyone (never a panic; nothing opens
//! without the key), and a record we sealed, with one byte changed or not: it
//! opens to exactly what was sealed, or, changed, is dropped or handed to
//! OpenSSL as a handshake record, never opened to other bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teletun::tunnel::dtls::record::{content, Opener, Record, Sealer, SessionKeys, Suite, OVERHEAD, PREFIX_LEN};

fn fresh() -> (Sealer, Opener) {
    let (sealer, _) = SessionKeys::derive(Suite::Aes128GcmSha256, &[7; 48], &[1; 32], &[2; 32]).split(true);
    let (_, opener) = SessionKeys::derive(Suite::Aes128GcmSha256, &[7; 48], &[1; 32], &[2; 32]).split(false);
    (sealer, opener)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    // Fresh keys and replay window for every input, so a crash reproduces alone.
    let (mut sealer, mut opener) = fresh();
    if mode & 1 == 0 {
        // A stranger's datagram: every record in it, in turn.
        let mut buf = rest.to_vec();
        let mut at = 0;
        while at < buf.len() {
            let (result, len) = opener.open(&mut buf[at..]);
            assert!(len > 0 && at + len <= buf.len());
            assert!(!matches!(result, Ok(Record::Opened { .. })), "opened a record nobody sealed");
            at += len;
        }
        return;
    }
    // Our own record, maybe with one byte flipped.
    let Some((&flip, plaintext)) = rest.split_first() else { return };
    let mut buf = vec![0u8; plaintext.len() + OVERHEAD];
    buf[PREFIX_LEN..PREFIX_LEN + plaintext.len()].copy_from_slice(plaintext);
    let len = sealer.seal(content::APPLICATION_DATA, &mut buf, plaintext.len()).expect("room");
    let at = usize::from(flip) % (len + 1);
    let changed = at < len && mode & 2 != 0;
    if changed {
        buf[at] ^= 1 | (mode >> 2);
    }
    let (result, _) = opener.open(&mut buf[..len]);
    match result {
        Ok(Record::Opened { plaintext: range, .. }) => {
            assert!(!changed, "a changed record opened");
            assert_eq!(&buf[range], plaintext);
        }
        other => assert!(changed, "our own record did not open: {other:?}"),
    }
});
