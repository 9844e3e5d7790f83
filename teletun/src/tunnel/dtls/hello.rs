//! The server's stateless cookie exchange (RFC 6347 §4.2.1), done before
//! OpenSSL sees anything: a ClientHello without a valid cookie gets a
//! HelloVerifyRequest built here, to the address it came from, and leaves no
//! state; only a ClientHello that returns the cookie for its own address and
//! port binds the handshake to that port. A host behind the same NAT as the
//! client (same IP, other ports) spraying handshake-looking datagrams can
//! neither take the client's port nor poison OpenSSL's state.
//!
//! A cookie proves an address, not an identity: a host behind the client's
//! NAT running a real DTLS client returns its own cookie too. So our client
//! adds a proof to the ClientHello that returns the cookie: a last extension
//! ([`PROOF_EXTENSION`]) carrying a MAC over the cookie, keyed from the
//! authenticated control channel. The server checks it and removes it before
//! OpenSSL sees the hello, so both ends' handshake transcripts stay the
//! hello OpenSSL made.
//!
//! OpenSSL's own state machine then runs as designed: it is shown the
//! cookie-less ClientHello the client must have sent first (the second one
//! without its cookie, RFC 6347 requires them equal otherwise), answers it
//! with a HelloVerifyRequest that is discarded, and then takes the second.

use std::ops::Range;

/// DTLS record header: type, version, epoch, 48-bit sequence number, length.
const RECORD_HEADER: usize = 13;
/// DTLS handshake header: type, length, message_seq, fragment offset and length.
const HANDSHAKE_HEADER: usize = 12;
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const HELLO_VERIFY_REQUEST: u8 = 3;

/// The extension type of a client's proof, from the private-use range
/// (RFC 8446 §4.2: 65280–65535).
pub const PROOF_EXTENSION: u16 = 0xff74;
/// Bytes of a proof (a truncated HMAC-SHA256).
pub const PROOF_LEN: usize = 16;
/// The proof extension on the wire: type, length, the proof.
const PROOF_WIRE: usize = 4 + PROOF_LEN;

/// An unfragmented DTLS ClientHello alone in a datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientHello<'a> {
    datagram: &'a [u8],
    /// The record's sequence number (epoch 0).
    pub record_seq: u64,
    /// The handshake message's sequence number (0 first, 1 after a cookie).
    pub message_seq: u16,
    /// Where the cookie is in `datagram`.
    cookie: Range<usize>,
    /// Where the extensions block's 2-byte length is, if the message ends
    /// in a well-formed one.
    extensions_at: Option<usize>,
    /// Where the proof is, if the last extension is one.
    proof: Option<Range<usize>>,
}

fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |n, &b| (n << 8) | u64::from(b))
}

/// Reads `datagram` as a ClientHello; `None` for anything else.
pub fn parse(datagram: &[u8]) -> Option<ClientHello<'_>> {
    let d = datagram;
    if d.len() < RECORD_HEADER + HANDSHAKE_HEADER + 35 || d[0] != HANDSHAKE || d[1] != 0xfe {
        return None;
    }
    let (epoch, record_seq, record_len) = (be(&d[3..5]), be(&d[5..11]), be(&d[11..13]) as usize);
    let h = &d[RECORD_HEADER..];
    if epoch != 0 || record_len != h.len() || h[0] != CLIENT_HELLO {
        return None;
    }
    let (len, message_seq, offset, fragment) = (
        be(&h[1..4]) as usize,
        be(&h[4..6]) as u16,
        be(&h[6..9]),
        be(&h[9..12]) as usize,
    );
    if offset != 0 || fragment != len || HANDSHAKE_HEADER + len != h.len() {
        return None;
    }
    // client_version, random, session_id, then the cookie.
    let body = RECORD_HEADER + HANDSHAKE_HEADER;
    let session_id_len = usize::from(*d.get(body + 34)?);
    let cookie_len_at = body + 35 + session_id_len;
    let cookie_len = usize::from(*d.get(cookie_len_at)?);
    let cookie = cookie_len_at + 1..cookie_len_at + 1 + cookie_len;
    // Cipher suites at least follow.
    if cookie.end + 2 > d.len() {
        return None;
    }
    let (extensions_at, proof) = match extensions(d, cookie.end) {
        Some((at, last)) => (Some(at), last.filter(|l| is_proof(d, l)).map(|l| l.start + 4..l.end)),
        None => (None, None),
    };
    Some(ClientHello {
        datagram,
        record_seq,
        message_seq,
        cookie,
        extensions_at,
        proof,
    })
}

/// After the cookie (ending at `from`): cipher suites, compression methods,
/// then an extensions block that ends the message. Where the block's length
/// is, and the last extension's whole range; `None` unless well-formed.
fn extensions(d: &[u8], from: usize) -> Option<(usize, Option<Range<usize>>)> {
    let suites = usize::from(u16::from_be_bytes([*d.get(from)?, *d.get(from + 1)?]));
    let compression_at = from + 2 + suites;
    let at = compression_at + 1 + usize::from(*d.get(compression_at)?);
    let len = usize::from(u16::from_be_bytes([*d.get(at)?, *d.get(at + 1)?]));
    if at + 2 + len != d.len() {
        return None;
    }
    let (mut i, mut last) = (at + 2, None);
    while i < d.len() {
        let ext_len = usize::from(u16::from_be_bytes([*d.get(i + 2)?, *d.get(i + 3)?]));
        let end = i + 4 + ext_len;
        if end > d.len() {
            return None;
        }
        last = Some(i..end);
        i = end;
    }
    Some((at, last))
}

fn is_proof(d: &[u8], ext: &Range<usize>) -> bool {
    u16::from_be_bytes([d[ext.start], d[ext.start + 1]]) == PROOF_EXTENSION && ext.len() == PROOF_WIRE
}

/// Adds `delta` to the big-endian length of `width` bytes at `at`.
fn grow(d: &mut [u8], at: usize, width: usize, delta: isize) {
    let n = be(&d[at..at + width]) as isize + delta;
    d[at..at + width].copy_from_slice(&(n as u32).to_be_bytes()[4 - width..]);
}

/// The record, message, fragment and extensions-block lengths, each by `delta`.
fn resize(d: &mut [u8], extensions_at: usize, delta: isize) {
    grow(d, 11, 2, delta);
    grow(d, RECORD_HEADER + 1, 3, delta);
    grow(d, RECORD_HEADER + 9, 3, delta);
    grow(d, extensions_at, 2, delta);
}

impl ClientHello<'_> {
    /// The cookie it returns (empty in a first ClientHello).
    pub fn cookie(&self) -> &[u8] {
        &self.datagram[self.cookie.clone()]
    }

    /// The whole datagram.
    pub fn bytes(&self) -> &[u8] {
        self.datagram
    }

    /// The proof it carries as its last extension, if any.
    pub fn proof(&self) -> Option<&[u8]> {
        self.proof.clone().map(|r| &self.datagram[r])
    }

    /// This hello with `proof` added as its last extension, into `out`.
    /// `None` if it has no well-formed extensions block to add it to, or
    /// carries a proof already.
    pub fn with_proof(&self, proof: &[u8; PROOF_LEN], out: &mut Vec<u8>) -> Option<()> {
        let at = self.extensions_at?;
        if self.proof.is_some() || self.datagram.len() + PROOF_WIRE > usize::from(u16::MAX) {
            return None;
        }
        out.clear();
        out.extend_from_slice(self.datagram);
        out.extend_from_slice(&PROOF_EXTENSION.to_be_bytes());
        out.extend_from_slice(&(PROOF_LEN as u16).to_be_bytes());
        out.extend_from_slice(proof);
        resize(out, at, PROOF_WIRE as isize);
        Some(())
    }

    /// This hello without its proof, into `out`: what the client's OpenSSL
    /// made. `None` if it carries none.
    pub fn without_proof(&self, out: &mut Vec<u8>) -> Option<()> {
        let (at, proof) = (self.extensions_at?, self.proof.clone()?);
        out.clear();
        out.extend_from_slice(&self.datagram[..proof.start - 4]);
        resize(out, at, -(PROOF_WIRE as isize));
        Some(())
    }

    /// The first ClientHello this one answers: the same without its cookie,
    /// message_seq 0, the record before. `None` if no record can come before.
    pub fn first(&self, out: &mut Vec<u8>) -> Option<()> {
        let record_seq = self.record_seq.checked_sub(1)?;
        let d = self.datagram;
        let removed = self.cookie.len();
        out.clear();
        out.extend_from_slice(&d[..self.cookie.start - 1]);
        out.push(0);
        out.extend_from_slice(&d[self.cookie.end..]);
        let record_len = out.len() - RECORD_HEADER;
        let len = record_len - HANDSHAKE_HEADER;
        out[5..11].copy_from_slice(&record_seq.to_be_bytes()[2..]);
        out[11..13].copy_from_slice(&(record_len as u16).to_be_bytes());
        let h = RECORD_HEADER;
        out[h + 1..h + 4].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
        out[h + 4..h + 6].copy_from_slice(&[0, 0]);
        out[h + 9..h + 12].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
        debug_assert_eq!(out.len(), d.len() - removed);
        Some(())
    }
}

/// A HelloVerifyRequest carrying `cookie`, answering a ClientHello sent in
/// record `record_seq` (RFC 6347: the same record number, DTLS 1.0 as the
/// version, message_seq 0).
pub fn hello_verify_request(record_seq: u64, cookie: &[u8], out: &mut Vec<u8>) {
    let body = 3 + cookie.len();
    out.clear();
    out.extend_from_slice(&[HANDSHAKE, 0xfe, 0xff, 0, 0]);
    out.extend_from_slice(&record_seq.to_be_bytes()[2..]);
    out.extend_from_slice(&((HANDSHAKE_HEADER + body) as u16).to_be_bytes());
    out.push(HELLO_VERIFY_REQUEST);
    out.extend_from_slice(&(body as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[0, 0, 0, 0, 0]);
    out.extend_from_slice(&(body as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[0xfe, 0xff, cookie.len() as u8]);
    out.extend_from_slice(cookie);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a client sends it, with `cookie`.
    fn hello(record_seq: u8, message_seq: u8, cookie: &[u8]) -> Vec<u8> {
        hello_with(record_seq, message_seq, cookie, None)
    }

    /// The same with an extensions block of `extensions` (type, data).
    fn hello_with(record_seq: u8, message_seq: u8, cookie: &[u8], extensions: Option<&[(u16, &[u8])]>) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]); // suites, compression
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (kind, data) in extensions {
                block.extend_from_slice(&kind.to_be_bytes());
                block.extend_from_slice(&(data.len() as u16).to_be_bytes());
                block.extend_from_slice(data);
            }
            body.extend_from_slice(&(block.len() as u16).to_be_bytes());
            body.extend_from_slice(&block);
        }
        let len = body.len() as u32;
        let mut h = vec![CLIENT_HELLO];
        h.extend_from_slice(&len.to_be_bytes()[1..]);
        h.extend_from_slice(&[0, message_seq, 0, 0, 0]);
        h.extend_from_slice(&len.to_be_bytes()[1..]);
        h.extend_from_slice(&body);
        let mut d = vec![HANDSHAKE, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, record_seq];
        d.extend_from_slice(&(h.len() as u16).to_be_bytes());
        d.extend_from_slice(&h);
        d
    }

    #[test]
    fn the_first_hello_is_the_second_without_its_cookie() {
        let second = hello(1, 1, &[9; 20]);
        let h = parse(&second).unwrap();
        assert_eq!((h.record_seq, h.message_seq, h.cookie()), (1, 1, &[9u8; 20][..]));
        let mut first = Vec::new();
        h.first(&mut first).unwrap();
        assert_eq!(first, hello(0, 0, &[]));
        assert_eq!(parse(&first).unwrap().cookie(), b"");
        // No record comes before the first.
        assert_eq!(parse(&hello(0, 1, &[9; 20])).unwrap().first(&mut first), None);
    }

    #[test]
    fn a_proof_is_added_as_the_last_extension_and_removed_exactly() {
        let groups: (u16, &[u8]) = (10, &[0, 2, 0, 23]);
        let made = hello_with(1, 1, &[9; 20], Some(&[groups, (11, &[1, 0])]));
        let h = parse(&made).unwrap();
        assert_eq!(h.proof(), None);
        let mut proven = Vec::new();
        h.with_proof(&[5; PROOF_LEN], &mut proven).unwrap();
        assert_eq!(
            proven,
            hello_with(
                1,
                1,
                &[9; 20],
                Some(&[groups, (11, &[1, 0]), (PROOF_EXTENSION, &[5; PROOF_LEN])])
            )
        );
        let p = parse(&proven).unwrap();
        assert_eq!((p.proof(), p.cookie()), (Some(&[5u8; PROOF_LEN][..]), &[9u8; 20][..]));
        assert_eq!(p.with_proof(&[6; PROOF_LEN], &mut Vec::new()), None, "one proof only");
        let mut stripped = Vec::new();
        p.without_proof(&mut stripped).unwrap();
        assert_eq!(stripped, made, "what OpenSSL made");
        assert_eq!(h.without_proof(&mut stripped), None);
    }

    #[test]
    fn only_a_well_formed_last_extension_is_a_proof() {
        let proof: (u16, &[u8]) = (PROOF_EXTENSION, &[5; PROOF_LEN]);
        let not_last = hello_with(1, 1, &[9; 20], Some(&[proof, (11, &[1, 0])]));
        assert_eq!(parse(&not_last).unwrap().proof(), None);
        let short = hello_with(1, 1, &[9; 20], Some(&[(PROOF_EXTENSION, &[5; 15])]));
        assert_eq!(parse(&short).unwrap().proof(), None);
        let mut overrun = hello_with(1, 1, &[9; 20], Some(&[proof]));
        let at = overrun.len() - PROOF_WIRE - 2;
        overrun[at + 1] += 1; // the block claims a byte more than there is
        let h = parse(&overrun).unwrap();
        assert_eq!(h.proof(), None);
        assert_eq!(h.with_proof(&[5; PROOF_LEN], &mut Vec::new()), None);
        // No extensions block: nothing to add a proof to.
        assert_eq!(
            parse(&hello(1, 1, &[9; 20]))
                .unwrap()
                .with_proof(&[5; PROOF_LEN], &mut Vec::new()),
            None
        );
    }

    #[test]
    fn junk_and_other_records_are_not_hellos() {
        let good = hello(0, 0, &[]);
        assert!(parse(&good).is_some());
        for cut in 0..good.len() {
            assert_eq!(parse(&good[..cut]), None, "cut at {cut}");
        }
        let mut other = good.clone();
        other[RECORD_HEADER] = 2; // ServerHello
        assert_eq!(parse(&other), None);
        let mut epoch1 = good.clone();
        epoch1[4] = 1;
        assert_eq!(parse(&epoch1), None);
        let mut fragment = good;
        fragment[RECORD_HEADER + 8] = 1; // offset 1
        assert_eq!(parse(&fragment), None);
        assert_eq!(parse(&[HANDSHAKE; 200]), None);
    }

    #[test]
    fn a_hello_verify_request_has_its_fields_where_a_client_reads_them() {
        let mut out = Vec::new();
        hello_verify_request(5, &[1, 2, 3], &mut out);
        assert_eq!(
            out,
            [
                22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 5, 0, 18, // record
                3, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 6, // handshake header
                0xfe, 0xff, 3, 1, 2, 3
            ]
        );
    }
}
