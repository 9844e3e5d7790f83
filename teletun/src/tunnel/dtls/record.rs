//! DTLS 1.2 AES-GCM records (RFC 6347, RFC 5288), sealed and opened in place
//! outside OpenSSL, with the keys of the handshake OpenSSL ran.
//!
//! OpenSSL's `SSL_write`/`SSL_read` cost ~2.6 µs per record here, most of it
//! bookkeeping rather than AES-GCM (well under 1 µs for a full packet). So, as
//! kernel TLS does, OpenSSL runs the handshake and the records are done here:
//! the wire format stays standard DTLS 1.2 (an OpenSSL peer reads our records
//! and we read its; both are tested), sealing is in place in the packet's own
//! buffer with no allocation, and the two directions share nothing.
//!
//! Keys come from the key block of the session (TLS 1.2 PRF over the master
//! secret and both randoms, RFC 5246 §6.3). Our records carry epoch 1 and
//! sequence numbers from [`FIRST_SEQUENCE`], above any OpenSSL could have used
//! during the handshake, so the *sequence numbers* (replay window, record
//! header) never repeat. Our explicit nonce is epoch and sequence (RFC 5288
//! §3): it counts up from `2^48 + 2^20` and never repeats among our records.
//!
//! The nonce is shared with OpenSSL under the same write key, though, and
//! OpenSSL does not use the sequence number: its epoch-1 records (Finished,
//! and any retransmission of the final flight it answers later) carry an
//! explicit nonce that starts at a random 64-bit value and counts up
//! (`EVP_CTRL_GCM_SET_IV_FIXED` draws it; `EVP_CTRL_GCM_IV_GEN` increments
//! it). One of those can equal one of ours only if that random start falls
//! within our used range: with `k` OpenSSL records and `n` of ours, the chance
//! is at most `k·n / 2^64` (below 2^-40 for a session of 2^20 of ours per
//! OpenSSL record, 2^-28 after 2^32 records) — the random-IV bound of
//! NIST SP 800-38D §8.2.2, not a guarantee. A repeat would expose the XOR of
//! two plaintexts and the GHASH key of that direction for the session.

use std::ops::Range;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use ring::hmac;

/// Record header: type, version, epoch, sequence number, length.
pub const HEADER_LEN: usize = 13;
/// The explicit part of the GCM nonce, sent before the ciphertext.
pub const EXPLICIT_NONCE_LEN: usize = 8;
/// Bytes before the plaintext in a record: where a packet must start in its
/// buffer to be sealed in place.
pub const PREFIX_LEN: usize = HEADER_LEN + EXPLICIT_NONCE_LEN;
/// The GCM tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes a record adds to its plaintext.
pub const OVERHEAD: usize = PREFIX_LEN + TAG_LEN;

/// Record content types (RFC 5246 §6.2.1).
pub mod content {
    /// ChangeCipherSpec (handshake, OpenSSL's).
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    /// Alert.
    pub const ALERT: u8 = 21;
    /// Handshake (OpenSSL's).
    pub const HANDSHAKE: u8 = 22;
    /// Application data: our packets.
    pub const APPLICATION_DATA: u8 = 23;
}

/// DTLS 1.2 on the wire.
const VERSION: [u8; 2] = [0xfe, 0xfd];
/// The epoch after the one handshake (renegotiation is off).
const EPOCH: u16 = 1;
/// The first sequence number we seal with: OpenSSL sent a handful of epoch-1
/// records (Finished and its retransmissions) before us.
pub const FIRST_SEQUENCE: u64 = 1 << 20;
/// Sequence numbers are 48 bits.
const MAX_SEQUENCE: u64 = (1 << 48) - 1;
/// Records within this many sequence numbers below the highest seen are
/// accepted once each, out of order (RFC 6347 asks for at least 32; a batch of
/// GSO segments reordered by a path needs more).
pub const REPLAY_WINDOW: u64 = 2048;

/// The negotiated cipher suite, as far as the records care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// ECDHE-ECDSA-AES128-GCM-SHA256.
    Aes128GcmSha256,
    /// ECDHE-ECDSA-AES256-GCM-SHA384.
    Aes256GcmSha384,
}

impl Suite {
    /// The suite of an OpenSSL cipher name, if it is one we allow.
    pub fn from_openssl_name(name: &str) -> Option<Suite> {
        match name {
            "ECDHE-ECDSA-AES128-GCM-SHA256" => Some(Suite::Aes128GcmSha256),
            "ECDHE-ECDSA-AES256-GCM-SHA384" => Some(Suite::Aes256GcmSha384),
            _ => None,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Suite::Aes128GcmSha256 => 16,
            Suite::Aes256GcmSha384 => 32,
        }
    }

    fn prf_hash(self) -> hmac::Algorithm {
        match self {
            Suite::Aes128GcmSha256 => hmac::HMAC_SHA256,
            Suite::Aes256GcmSha384 => hmac::HMAC_SHA384,
        }
    }

    fn aead(self) -> &'static ring::aead::Algorithm {
        match self {
            Suite::Aes128GcmSha256 => &AES_128_GCM,
            Suite::Aes256GcmSha384 => &AES_256_GCM,
        }
    }
}

/// The TLS 1.2 PRF (RFC 5246 §5): P_hash(secret, label + seed) into `out`.
pub fn prf(hash: hmac::Algorithm, secret: &[u8], label: &[u8], seed: &[u8], out: &mut [u8]) {
    let key = hmac::Key::new(hash, secret);
    // A(1) = HMAC(secret, label + seed); A(i) = HMAC(secret, A(i-1)).
    let mut a = {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(label);
        ctx.update(seed);
        ctx.sign()
    };
    for chunk in out.chunks_mut(hash.digest_algorithm().output_len()) {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(a.as_ref());
        ctx.update(label);
        ctx.update(seed);
        let block = ctx.sign();
        chunk.copy_from_slice(&block.as_ref()[..chunk.len()]);
        a = hmac::sign(&key, a.as_ref());
    }
}

/// One direction's key and fixed nonce part.
struct DirectionKey {
    key: LessSafeKey,
    fixed_iv: [u8; 4],
}

impl DirectionKey {
    fn nonce(&self, explicit: [u8; EXPLICIT_NONCE_LEN]) -> Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.fixed_iv);
        n[4..].copy_from_slice(&explicit);
        Nonce::assume_unique_for_key(n)
    }
}

/// The key block's parts, by direction (RFC 5246 §6.3; GCM has no MAC keys).
pub struct SessionKeys {
    client: DirectionKey,
    server: DirectionKey,
}

impl SessionKeys {
    /// Derives both directions' keys from a finished handshake's secrets.
    pub fn derive(suite: Suite, master_secret: &[u8], client_random: &[u8], server_random: &[u8]) -> SessionKeys {
        let k = suite.key_len();
        let mut block = [0u8; 2 * 32 + 2 * 4];
        let block = &mut block[..2 * k + 8];
        let seed = [server_random, client_random].concat();
        prf(suite.prf_hash(), master_secret, b"key expansion", &seed, block);
        let direction = |key: &[u8], iv: &[u8]| DirectionKey {
            key: LessSafeKey::new(UnboundKey::new(suite.aead(), key).expect("key length matches the suite")),
            fixed_iv: iv.try_into().expect("4 bytes"),
        };
        let client = direction(&block[..k], &block[2 * k..2 * k + 4]);
        let server = direction(&block[k..2 * k], &block[2 * k + 4..2 * k + 8]);
        block.fill(0);
        SessionKeys { client, server }
    }

    /// The sealing half for the client (`is_client`) or the server, and the
    /// opening half for the same side.
    pub fn split(self, is_client: bool) -> (Sealer, Opener) {
        let (ours, theirs) = if is_client {
            (self.client, self.server)
        } else {
            (self.server, self.client)
        };
        (
            Sealer {
                key: ours,
                next: FIRST_SEQUENCE,
            },
            Opener {
                key: theirs,
                window: ReplayWindow::default(),
            },
        )
    }
}

/// Why a record could not be sealed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// 2^48 records under one key: the session must end.
    #[error("the DTLS sequence numbers are used up; the session must be renewed")]
    SequenceExhausted,
    /// The buffer has no room for the record around the plaintext.
    #[error("no room for a record of {0} bytes")]
    NoRoom(usize),
}

/// Seals records towards the peer.
pub struct Sealer {
    key: DirectionKey,
    next: u64,
}

impl Sealer {
    /// Seals the `len` bytes at `buf[PREFIX_LEN..]` in place into one record
    /// of `content` type occupying `buf[..len + OVERHEAD]`; returns its length.
    pub fn seal(&mut self, content: u8, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        let total = len + OVERHEAD;
        if buf.len() < total || len > usize::from(u16::MAX) - OVERHEAD {
            return Err(SealError::NoRoom(total));
        }
        if self.next > MAX_SEQUENCE {
            return Err(SealError::SequenceExhausted);
        }
        let explicit = (u64::from(EPOCH) << 48 | self.next).to_be_bytes();
        self.next += 1;
        let header = record_header(content, explicit, (total - HEADER_LEN) as u16);
        buf[..HEADER_LEN].copy_from_slice(&header);
        buf[HEADER_LEN..PREFIX_LEN].copy_from_slice(&explicit);
        let aad = additional_data(explicit, content, len as u16);
        let (body, rest) = buf[PREFIX_LEN..].split_at_mut(len);
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(self.key.nonce(explicit), Aad::from(aad), body)
            .map_err(|_| SealError::NoRoom(total))?;
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Records sealed so far.
    pub fn sealed(&self) -> u64 {
        self.next - FIRST_SEQUENCE
    }
}

fn record_header(content: u8, epoch_and_sequence: [u8; 8], length: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = content;
    h[1..3].copy_from_slice(&VERSION);
    h[3..11].copy_from_slice(&epoch_and_sequence);
    h[11..13].copy_from_slice(&length.to_be_bytes());
    h
}

/// The AEAD's additional data: epoch and sequence, type, version, plaintext length.
fn additional_data(epoch_and_sequence: [u8; 8], content: u8, plaintext_len: u16) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&epoch_and_sequence);
    aad[8] = content;
    aad[9..11].copy_from_slice(&VERSION);
    aad[11..13].copy_from_slice(&plaintext_len.to_be_bytes());
    aad
}

/// What a record turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    /// An authentic record of `content` type; its plaintext is at this range
    /// of the buffer it was opened in.
    Opened {
        /// Its content type.
        content: u8,
        /// Where its plaintext is now.
        plaintext: Range<usize>,
        /// Whether it is the newest record so far (not one that overtook no
        /// other): only the newest may move the peer's address.
        newest: bool,
    },
    /// A record for OpenSSL (epoch 0, or a handshake or ChangeCipherSpec
    /// record): the bytes at this range.
    Handshake(Range<usize>),
}

/// Why a record was dropped. None of these ends a session: a forger, a
/// corrupting path or a replaying middlebox must not be able to end it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// Not a DTLS 1.2 record (too short, wrong version, length beyond the datagram).
    #[error("malformed record")]
    Malformed,
    /// Did not authenticate (forged, corrupted, another session's).
    #[error("record failed authentication")]
    Forged,
    /// Authentic but seen before, or too old for the replay window.
    #[error("replayed record")]
    Replayed,
}

/// Opens records from the peer.
pub struct Opener {
    key: DirectionKey,
    window: ReplayWindow,
}

impl Opener {
    /// Opens the record at the start of `buf` (a datagram may hold several:
    /// the next starts at `record_len`, the second value). Application data
    /// and alerts of epoch 1 are opened in place; anything else is left for
    /// OpenSSL.
    pub fn open(&mut self, buf: &mut [u8]) -> (Result<Record, Dropped>, usize) {
        if buf.len() < HEADER_LEN || buf[1..3] != VERSION {
            return (Err(Dropped::Malformed), buf.len());
        }
        let length = usize::from(u16::from_be_bytes([buf[11], buf[12]]));
        let record_len = HEADER_LEN + length;
        if record_len > buf.len() {
            return (Err(Dropped::Malformed), buf.len());
        }
        let content = buf[0];
        let epoch = u16::from_be_bytes([buf[3], buf[4]]);
        let ours = epoch == EPOCH && matches!(content, content::APPLICATION_DATA | content::ALERT);
        if !ours {
            return (Ok(Record::Handshake(0..record_len)), record_len);
        }
        (self.open_ours(&mut buf[..record_len]), record_len)
    }

    fn open_ours(&mut self, record: &mut [u8]) -> Result<Record, Dropped> {
        if record.len() < OVERHEAD {
            return Err(Dropped::Malformed);
        }
        let header_seq: [u8; 8] = record[3..11].try_into().expect("8 bytes");
        let sequence = u64::from_be_bytes(header_seq) & MAX_SEQUENCE;
        if !self.window.may_accept(sequence) {
            return Err(Dropped::Replayed);
        }
        let explicit: [u8; 8] = record[HEADER_LEN..PREFIX_LEN].try_into().expect("8 bytes");
        let plaintext_len = record.len() - OVERHEAD;
        let content = record[0];
        let aad = additional_data(header_seq, content, plaintext_len as u16);
        self.key
            .key
            .open_in_place(self.key.nonce(explicit), Aad::from(aad), &mut record[PREFIX_LEN..])
            .map_err(|_| Dropped::Forged)?;
        let newest = self.window.accept(sequence);
        Ok(Record::Opened {
            content,
            plaintext: PREFIX_LEN..PREFIX_LEN + plaintext_len,
            newest,
        })
    }
}

/// Which sequence numbers have been seen: the highest, and a bitmap of the
/// [`REPLAY_WINDOW`] below it.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// One more than the highest sequence number accepted; 0 before any.
    next: u64,
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            bits: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }
}

impl ReplayWindow {
    fn slot(sequence: u64) -> (usize, u64) {
        let bit = sequence % REPLAY_WINDOW;
        ((bit / 64) as usize, 1 << (bit % 64))
    }

    /// Whether `sequence` is new and within the window (checked before the
    /// costly authentication; recorded only after it, with [`Self::accept`]).
    pub fn may_accept(&self, sequence: u64) -> bool {
        if sequence >= self.next {
            return true;
        }
        if self.next - sequence > REPLAY_WINDOW {
            return false;
        }
        let (word, mask) = Self::slot(sequence);
        self.bits[word] & mask == 0
    }

    /// Records `sequence` as seen (it passed [`Self::may_accept`]); returns
    /// whether it is the highest so far.
    pub fn accept(&mut self, sequence: u64) -> bool {
        let newest = sequence >= self.next;
        if newest {
            // Forget the slots the window slides past.
            let advance = sequence + 1 - self.next;
            if advance >= REPLAY_WINDOW {
                self.bits = [0; (REPLAY_WINDOW / 64) as usize];
            } else {
                for s in self.next..=sequence {
                    let (word, mask) = Self::slot(s);
                    self.bits[word] &= !mask;
                }
            }
            self.next = sequence + 1;
        }
        let (word, mask) = Self::slot(sequence);
        self.bits[word] |= mask;
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The TLS 1.2 PRF test vector for SHA-256 that implementations share
    /// (published on the IETF TLS list, used by Go's crypto/tls among others).
    #[test]
    fn prf_matches_the_published_sha256_vector() {
        let secret = hex("9bbe436ba940f017b17652849a71db35");
        let seed = hex("a0ba9f936cda311827a6f796ffd5198c");
        let mut out = [0u8; 100];
        prf(hmac::HMAC_SHA256, &secret, b"test label", &seed, &mut out);
        let want = hex(
            "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff70187347b66",
        );
        assert_eq!(out.to_vec(), want);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pair(suite: Suite) -> ((Sealer, Opener), (Sealer, Opener)) {
        let master = [7u8; 48];
        let (cr, sr) = ([1u8; 32], [2u8; 32]);
        (
            SessionKeys::derive(suite, &master, &cr, &sr).split(true),
            SessionKeys::derive(suite, &master, &cr, &sr).split(false),
        )
    }

    fn sealed(sealer: &mut Sealer, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; packet.len() + OVERHEAD];
        buf[PREFIX_LEN..PREFIX_LEN + packet.len()].copy_from_slice(packet);
        let n = sealer.seal(content::APPLICATION_DATA, &mut buf, packet.len()).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    #[test]
    fn records_open_once_and_only_unaltered() {
        for suite in [Suite::Aes128GcmSha256, Suite::Aes256GcmSha384] {
            let ((mut client_seal, _), (_, mut server_open)) = pair(suite);
            let record = sealed(&mut client_seal, b"an IP packet");
            assert_eq!(record[0], content::APPLICATION_DATA);
            assert_eq!(&record[1..5], &[0xfe, 0xfd, 0, 1]);
            let mut copy = record.clone();
            let (r, used) = server_open.open(&mut copy);
            assert_eq!(used, record.len());
            let Ok(Record::Opened {
                content,
                plaintext,
                newest,
            }) = r
            else {
                panic!("{r:?}")
            };
            assert!(newest);
            assert_eq!(
                (content, &copy[plaintext]),
                (content::APPLICATION_DATA, &b"an IP packet"[..])
            );
            // Replayed.
            assert_eq!(server_open.open(&mut record.clone()).0, Err(Dropped::Replayed));
            // Every single-bit flip is caught.
            let mut next = sealed(&mut client_seal, b"second");
            for i in 0..next.len() {
                for bit in 0..8 {
                    let mut bad = next.clone();
                    bad[i] ^= 1 << bit;
                    let (r, _) = server_open.open(&mut bad);
                    assert!(!matches!(r, Ok(Record::Opened { .. })), "flip at {i}.{bit} accepted");
                }
            }
            assert!(matches!(server_open.open(&mut next).0, Ok(Record::Opened { .. })));
        }
    }

    #[test]
    fn handshake_records_and_epoch_zero_are_left_for_openssl() {
        let ((_, mut open), _) = pair(Suite::Aes128GcmSha256);
        let mut hs = vec![content::HANDSHAKE, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 3, 0, 2, 9, 9, 0xaa];
        assert_eq!(open.open(&mut hs), (Ok(Record::Handshake(0..15)), 15));
        let mut epoch0 = vec![content::ALERT, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 40];
        assert_eq!(open.open(&mut epoch0).0, Ok(Record::Handshake(0..15)));
        assert_eq!(open.open(&mut [23, 0xfe, 0xff, 0, 1]).0, Err(Dropped::Malformed));
        let mut long = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 1];
        assert_eq!(open.open(&mut long).0, Err(Dropped::Malformed));
    }

    proptest! {
        /// The window accepts exactly what a set of seen numbers and the
        /// highest one say it should.
        #[test]
        fn replay_window_matches_a_model(seqs in proptest::collection::vec(
            prop_oneof![0u64..5000, 1u64 << 40..(1u64 << 40) + 3000], 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = BTreeSet::new();
            for s in seqs {
                let highest = seen.iter().next_back().copied();
                let fresh = !seen.contains(&s)
                    && highest.is_none_or(|h| s > h || h - s < REPLAY_WINDOW);
                prop_assert_eq!(w.may_accept(s), fresh, "sequence {}", s);
                if fresh {
                    prop_assert_eq!(w.accept(s), highest.is_none_or(|h| s > h));
                    seen.insert(s);
                }
            }
        }

        /// Whatever arrives, opening never panics, and only sealed records open.
        #[test]
        fn arbitrary_datagrams_never_open(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let ((_, mut open), _) = pair(Suite::Aes256GcmSha384);
            let mut d = data.clone();
            let (r, used) = open.open(&mut d);
            prop_assert!(used <= data.len());
            let opened = matches!(r, Ok(Record::Opened { .. }));
            prop_assert!(!opened);
        }
    }
}
