//! What server-external spends on strangers before they authenticate: a cap
//! on concurrent TLS handshakes, a per-address rate of connection attempts,
//! and a quiet way to say it turned some away. Pure state, tested on a
//! made-up clock; the role applies it at `accept`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// At most this many TLS handshakes run at once; further connections are
/// reset at once (a handshake costs a signature, an accept nearly nothing).
pub const MAX_HANDSHAKES: usize = 256;
/// How long an unauthenticated connection may take to finish TLS.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Connection attempts per second one address may make, on average…
pub const ATTEMPTS_PER_SECOND: f64 = 10.0;
/// …and at once.
pub const ATTEMPTS_BURST: f64 = 20.0;
/// Addresses tracked at most; beyond, the longest idle are forgotten.
pub const TRACKED: usize = 4096;

/// A token bucket per source address.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<IpAddr, (f64, Duration)>,
}

impl RateLimiter {
    /// Whether `ip` may make an attempt at `now` (time since any fixed start);
    /// takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now: Duration) -> bool {
        if self.buckets.len() >= TRACKED && !self.buckets.contains_key(&ip) {
            self.forget_idle(now);
        }
        let (tokens, last) = self.buckets.entry(ip).or_insert((ATTEMPTS_BURST, now));
        let refill = now.saturating_sub(*last).as_secs_f64() * ATTEMPTS_PER_SECOND;
        *tokens = (*tokens + refill).min(ATTEMPTS_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled (their address is as good as new),
    /// or, if none has, the older half.
    fn forget_idle(&mut self, now: Duration) {
        let full_after = Duration::from_secs_f64(ATTEMPTS_BURST / ATTEMPTS_PER_SECOND);
        self.buckets
            .retain(|_, (_, last)| now.saturating_sub(*last) < full_after);
        if self.buckets.len() >= TRACKED {
            let mut lasts: Vec<Duration> = self.buckets.values().map(|(_, l)| *l).collect();
            lasts.sort();
            let cut = lasts[lasts.len() / 2];
            self.buckets.retain(|_, (_, last)| *last > cut);
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Counts what was turned away and says so at most once per second.
#[derive(Debug, Default)]
pub struct Turnaways {
    /// Over the handshake cap.
    pub over_cap: u64,
    /// Over their address's rate.
    pub over_rate: u64,
    last_said: Option<Duration>,
    said_total: u64,
}

impl Turnaways {
    /// Notes one turned away (`over_cap` or else over the rate) at `now`;
    /// returns the log line to write, if one is due.
    pub fn note(&mut self, over_cap: bool, now: Duration) -> Option<String> {
        if over_cap {
            self.over_cap += 1;
        } else {
            self.over_rate += 1;
        }
        let due = self
            .last_said
            .is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(1));
        if !due {
            return None;
        }
        self.last_said = Some(now);
        let total = self.over_cap + self.over_rate;
        let fresh = total - self.said_total;
        self.said_total = total;
        Some(format!(
            "turned away {fresh} connection attempt(s) before authentication ({} in all over the cap of {MAX_HANDSHAKES} handshakes, {} over {ATTEMPTS_PER_SECOND}/s per address)",
            self.over_cap, self.over_rate
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn an_address_gets_its_burst_then_its_rate() {
        let mut r = RateLimiter::default();
        let t0 = Duration::from_secs(100);
        let allowed = (0..100).filter(|_| r.allow(ip(1), t0)).count();
        assert_eq!(allowed, ATTEMPTS_BURST as usize);
        // One second later: ten more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| r.allow(ip(1), t1)).count(), 10);
        // Another address is not held back by the first.
        assert!(r.allow(ip(2), t1));
    }

    #[test]
    fn a_flood_of_addresses_stays_bounded() {
        let mut r = RateLimiter::default();
        for n in 0..(3 * TRACKED as u32) {
            r.allow(ip(n), Duration::from_millis(u64::from(n)));
        }
        assert!(r.tracked() <= TRACKED, "{}", r.tracked());
    }

    #[test]
    fn turnaways_are_said_once_a_second_with_the_count() {
        let mut t = Turnaways::default();
        let t0 = Duration::from_secs(5);
        let first = t.note(true, t0).unwrap();
        assert!(first.starts_with("turned away 1 connection"), "{first}");
        for k in 0..99 {
            assert_eq!(t.note(k % 2 == 0, t0 + Duration::from_millis(k)), None);
        }
        let next = t.note(false, t0 + Duration::from_secs(1)).unwrap();
        assert!(next.starts_with("turned away 100 "), "{next}");
        assert_eq!((t.over_cap, t.over_rate), (51, 50));
    }
}
