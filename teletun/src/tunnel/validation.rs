//! Following a roaming peer without being led astray (in the spirit of
//! QUIC's path validation, RFC 9000 §8.2 and §9.3). When the peer's newest
//! authentic record comes from a new address the server sends there at once —
//! a NAT that rebinds must not stall the session — but, until the peer answers
//! a challenge sent there, at most [`AMPLIFICATION`] times the bytes that
//! arrived from it. Someone on the path who replays a record it saw first,
//! from a spoofed address, so draws at most three times its own traffic
//! there (and only until the real peer's next record moves the session back
//! to its address, which is known good), instead of the session's downstream.
//!
//! The records (TeleTUN extensions, application data that is never an IP
//! packet, like the path-MTU probes):
//! - challenge: `03` and 8 random bytes, sent to the new address;
//! - response: `04` and the challenge's 8 bytes, which the peer sends where
//!   it sends everything.
//!
//! Both halves of a session share one [`PathValidation`] through atomics:
//! the inbound half notes moves, earnings, challenges and responses; the
//! outbound half spends the budget and sends the records.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use super::Time;

/// A challenge's first byte.
pub const CHALLENGE: u8 = 3;
/// A response's first byte.
pub const RESPONSE: u8 = 4;
/// A record of either kind: its first byte and the 8-byte token.
pub const RECORD_LEN: usize = 9;
/// An unvalidated address gets at most this many times what came from it.
pub const AMPLIFICATION: i64 = 3;
/// A challenge unanswered this long is sent again (while the address is
/// unvalidated; a lost one must not leave the session throttled).
pub const RECHALLENGE_AFTER: Duration = Duration::from_millis(250);

/// The budget of a validated address.
const UNLIMITED: i64 = i64::MAX;

/// What both halves know of the peer's address's validation.
#[derive(Debug)]
pub struct PathValidation {
    /// Bytes the outbound half may still send to the peer's current address;
    /// [`UNLIMITED`] once it is validated.
    budget: AtomicI64,
    /// The challenge for the current address (0: none).
    token: AtomicU64,
    /// The challenge is to be sent now (a new address).
    challenge_due: AtomicBool,
    /// The token of a challenge from the peer we owe a response to (0: none).
    owed: AtomicU64,
}

impl Default for PathValidation {
    fn default() -> Self {
        PathValidation {
            budget: AtomicI64::new(UNLIMITED),
            token: AtomicU64::new(0),
            challenge_due: AtomicBool::new(false),
            owed: AtomicU64::new(0),
        }
    }
}

fn token() -> u64 {
    let mut b = [0u8; 8];
    // 0 means "no challenge": draw again in the unlikely event.
    loop {
        openssl::rand::rand_bytes(&mut b).expect("the system's random numbers");
        let t = u64::from_be_bytes(b);
        if t != 0 {
            return t;
        }
    }
}

/// The 8 bytes of a challenge or response record, if it is one of `kind`.
pub fn token_of(kind: u8, body: &[u8]) -> Option<u64> {
    match body {
        [k, rest @ ..] if *k == kind && rest.len() == RECORD_LEN - 1 => {
            Some(u64::from_be_bytes(rest.try_into().ok()?)).filter(|&t| t != 0)
        }
        _ => None,
    }
}

/// A challenge or response record's plaintext.
pub fn record(kind: u8, token: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = kind;
    r[1..].copy_from_slice(&token.to_be_bytes());
    r
}

impl PathValidation {
    /// The peer moved to an address not validated before, with a datagram of
    /// `received` bytes: a budget of three times that, and a new challenge.
    pub fn moved(&self, received: usize) {
        self.token.store(token(), Ordering::Relaxed);
        // Release: a sender that sees the address moved sees this limit too.
        self.budget.store(AMPLIFICATION * received as i64, Ordering::Release);
        self.challenge_due.store(true, Ordering::Release);
    }

    /// The peer moved back to an address validated before (called once the
    /// sender's address is that one).
    pub fn returned(&self) {
        self.validated();
    }

    /// More arrived from the unvalidated address: the budget grows by three
    /// times `received`.
    pub fn earned(&self, received: usize) {
        if self.is_limited() {
            self.budget.fetch_add(AMPLIFICATION * received as i64, Ordering::AcqRel);
        }
    }

    /// Whether the current address is not validated yet.
    pub fn is_limited(&self) -> bool {
        self.budget.load(Ordering::Acquire) != UNLIMITED
    }

    /// Takes `bytes` from the budget; false (nothing taken) if it has not
    /// that much left.
    pub fn spend(&self, bytes: usize) -> bool {
        let bytes = bytes as i64;
        self.budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                if b == UNLIMITED {
                    Some(b)
                } else {
                    (b >= bytes).then_some(b - bytes)
                }
            })
            .is_ok()
    }

    /// A response arrived from the current address: whether it answers the
    /// current challenge (the address is then validated).
    pub fn answered(&self, token: u64) -> bool {
        let ours = self.token.load(Ordering::Relaxed);
        if ours == 0 || token != ours {
            return false;
        }
        self.validated();
        true
    }

    fn validated(&self) {
        self.token.store(0, Ordering::Relaxed);
        self.challenge_due.store(false, Ordering::Relaxed);
        // Release: a sender that sees no limit sees the address it is for.
        self.budget.store(UNLIMITED, Ordering::Release);
    }

    /// The peer challenged us: the response is owed.
    pub fn owe(&self, token: u64) {
        self.owed.store(token, Ordering::Release);
    }

    /// Whether a record is waiting to go out (the outbound half should not
    /// wait for its timers).
    pub fn has_work(&self) -> bool {
        self.challenge_due.load(Ordering::Acquire) || self.owed.load(Ordering::Acquire) != 0
    }

    /// The response owed, marked sent.
    pub fn take_owed(&self) -> Option<u64> {
        Some(self.owed.swap(0, Ordering::AcqRel)).filter(|&t| t != 0)
    }

    /// The challenge to send at `now`, if one is due: at once for a new
    /// address, then every [`RECHALLENGE_AFTER`] while it is unvalidated.
    /// `last` is the outbound half's note of when it last sent one.
    pub fn challenge(&self, now: Time, last: &mut Option<Time>) -> Option<u64> {
        let fresh = self.challenge_due.swap(false, Ordering::AcqRel);
        let token = self.token.load(Ordering::Relaxed);
        if token == 0 || !self.is_limited() {
            return None;
        }
        let again = last.is_some_and(|t| now.saturating_sub(t) >= RECHALLENGE_AFTER);
        (fresh || again).then(|| {
            *last = Some(now);
            token
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_address_gets_three_times_what_came_until_it_answers() {
        let v = PathValidation::default();
        assert!(!v.is_limited() && v.spend(1 << 40), "validated at first: no limit");
        v.moved(100);
        assert!(v.is_limited());
        assert!(v.spend(250));
        assert!(!v.spend(51), "301 bytes for 100 received");
        assert!(v.spend(50));
        v.earned(10);
        assert!(v.spend(30) && !v.spend(1));
        let mut last = None;
        let t = v.challenge(Duration::ZERO, &mut last).expect("due at once");
        assert_eq!(v.challenge(Duration::from_millis(10), &mut last), None);
        assert_eq!(v.challenge(RECHALLENGE_AFTER, &mut last), Some(t), "sent again");
        assert!(!v.answered(t ^ 1), "a wrong token proves nothing");
        assert!(v.is_limited());
        assert!(v.answered(t));
        assert!(!v.is_limited() && v.spend(1 << 40));
        assert_eq!(v.challenge(RECHALLENGE_AFTER * 4, &mut last), None);
        assert!(!v.answered(t), "a token answers once");
        // A move to an address known good needs no new proof.
        v.moved(10);
        v.returned();
        assert!(!v.is_limited());
    }

    #[test]
    fn each_move_makes_a_new_challenge() {
        let v = PathValidation::default();
        let mut last = None;
        v.moved(10);
        let first = v.challenge(Duration::ZERO, &mut last).unwrap();
        v.moved(10);
        let second = v.challenge(Duration::ZERO, &mut last).unwrap();
        assert_ne!(first, second);
        assert!(!v.answered(first), "the old address's answer is not the new one's");
    }

    #[test]
    fn records_round_trip_and_nothing_else_is_one() {
        let r = record(CHALLENGE, 0x0102_0304_0506_0708);
        assert_eq!(token_of(CHALLENGE, &r), Some(0x0102_0304_0506_0708));
        assert_eq!(token_of(RESPONSE, &r), None);
        assert_eq!(token_of(CHALLENGE, &r[..8]), None);
        assert_eq!(token_of(CHALLENGE, &record(CHALLENGE, 0)), None);
        let v = PathValidation::default();
        assert!(!v.has_work());
        v.owe(7);
        assert!(v.has_work());
        assert_eq!(v.take_owed(), Some(7));
        assert_eq!(v.take_owed(), None);
        assert!(!v.has_work());
    }
}
