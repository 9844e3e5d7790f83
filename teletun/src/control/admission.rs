//! What server-external spends on strangers before they authenticate: a cap
//! on concurrent TLS handshakes, a per-source rate of connection attempts and
//! cap on its handshakes, a few handshakes kept for the last client's source,
//! and a quiet way to say it turned some away or saw some fail. Pure state,
//! tested on a made-up clock; the role applies it at `accept`.
//!
//! A source is an IPv4 address or an IPv6 /64: one subscriber gets a /64, and
//! anyone with one has 2^64 addresses to walk a per-address limit with.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::throttle::OncePerSecond;

/// At most this many TLS handshakes run at once; further connections are
/// reset at once (a handshake costs a signature, an accept nearly nothing).
pub const MAX_HANDSHAKES: usize = 256;
/// Of those, kept for the source the last client authenticated from: a
/// stranger's flood that fills the rest never keeps that client out.
pub const RESERVED_FOR_LAST_CLIENT: usize = 4;
/// At most this many of them from one source.
pub const HANDSHAKES_PER_SOURCE: usize = 32;
/// How long a connection may take to send its first bytes (a ClientHello):
/// a silent connect holds a handshake for this long, not the whole deadline.
pub const FIRST_BYTES_DEADLINE: Duration = Duration::from_secs(1);
/// How long an unauthenticated connection may take to finish TLS.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Connection attempts per second one source may make, on average…
pub const ATTEMPTS_PER_SECOND: f64 = 10.0;
/// …and at once.
pub const ATTEMPTS_BURST: f64 = 20.0;
/// Sources tracked at most; beyond, the longest idle are forgotten.
pub const TRACKED: usize = 4096;

/// The source `ip` counts as: itself if IPv4 (or IPv4-mapped IPv6, as a
/// dual-stack listener sees IPv4 peers), else its /64.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A token bucket per source.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<IpAddr, (f64, Duration)>,
}

impl RateLimiter {
    /// Whether `ip`'s source may make an attempt at `now` (time since any
    /// fixed start); takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now: Duration) -> bool {
        let source = source_of(ip);
        if self.buckets.len() >= TRACKED && !self.buckets.contains_key(&source) {
            self.forget_idle(now);
        }
        let (tokens, last) = self.buckets.entry(source).or_insert((ATTEMPTS_BURST, now));
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

    /// Drops buckets that have refilled (their source is as good as new),
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

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Why a connection was turned away before its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnedAway {
    /// Its source was over its rate of attempts.
    OverRate,
    /// Its source already had [`HANDSHAKES_PER_SOURCE`] handshakes running.
    OverSourceCap,
    /// [`MAX_HANDSHAKES`] were running (and it was not the last client's source).
    OverCap,
}

/// Handshakes running now: a cap on all, a cap per source, and a few kept
/// for the last client's source. Shared between the accept loop and the
/// connections (which give theirs back by dropping their [`Handshake`]).
pub struct Handshakes {
    open: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    last_client: Mutex<Option<IpAddr>>,
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes {
            open: Arc::new(Semaphore::new(MAX_HANDSHAKES - RESERVED_FOR_LAST_CLIENT)),
            reserved: Arc::new(Semaphore::new(RESERVED_FOR_LAST_CLIENT)),
            per_source: Arc::default(),
            last_client: Mutex::new(None),
        }
    }
}

/// One running handshake; dropping it frees its place.
pub struct Handshake {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut map = self.per_source.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

impl Handshakes {
    /// A place for a handshake from `ip`, if the caps allow one.
    pub fn begin(&self, ip: IpAddr) -> Result<Handshake, TurnedAway> {
        let source = source_of(ip);
        let mut map = self.per_source.lock().unwrap_or_else(PoisonError::into_inner);
        let running = map.get(&source).copied().unwrap_or(0);
        if running >= HANDSHAKES_PER_SOURCE {
            return Err(TurnedAway::OverSourceCap);
        }
        let last = *self.last_client.lock().unwrap_or_else(PoisonError::into_inner);
        let permit = match self.open.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if last == Some(source) => self
                .reserved
                .clone()
                .try_acquire_owned()
                .map_err(|_| TurnedAway::OverCap)?,
            Err(_) => return Err(TurnedAway::OverCap),
        };
        map.insert(source, running + 1);
        Ok(Handshake {
            _permit: permit,
            source,
            per_source: self.per_source.clone(),
        })
    }

    /// Notes that a client authenticated from `ip`: its source gets the
    /// reserved places from now on.
    pub fn authenticated(&self, ip: IpAddr) {
        *self.last_client.lock().unwrap_or_else(PoisonError::into_inner) = Some(source_of(ip));
    }

    /// Handshakes running now.
    pub fn running(&self) -> usize {
        MAX_HANDSHAKES - self.open.available_permits() - self.reserved.available_permits()
    }
}

/// Counts what was turned away and says so at most once per second.
#[derive(Debug, Default)]
pub struct Turnaways {
    /// Over the handshake cap.
    pub over_cap: u64,
    /// Over their source's cap of handshakes.
    pub over_source_cap: u64,
    /// Over their source's rate.
    pub over_rate: u64,
    said: OncePerSecond,
    said_total: u64,
}

impl Turnaways {
    /// Notes one turned away at `now`; returns the log line to write, if
    /// one is due.
    pub fn note(&mut self, why: TurnedAway, now: Duration) -> Option<String> {
        match why {
            TurnedAway::OverCap => self.over_cap += 1,
            TurnedAway::OverSourceCap => self.over_source_cap += 1,
            TurnedAway::OverRate => self.over_rate += 1,
        }
        if !self.said.due(now) {
            return None;
        }
        let total = self.over_cap + self.over_source_cap + self.over_rate;
        let fresh = total - self.said_total;
        self.said_total = total;
        Some(format!(
            "turned away {fresh} connection attempt(s) before authentication ({} in all over the cap of {MAX_HANDSHAKES} handshakes, {} over {HANDSHAKES_PER_SOURCE} handshakes per source, {} over {ATTEMPTS_PER_SECOND}/s per source)",
            self.over_cap, self.over_source_cap, self.over_rate
        ))
    }
}

/// Failed handshakes said one by one per second at most; the rest are
/// counted and said with the next line.
pub const FAILURES_SAID_PER_SECOND: u64 = 5;

/// Counts handshakes that failed before authentication (strangers, scanners,
/// a client with the wrong key): a few a second are said one by one (a lone
/// misconfigured client is seen at once), the rest only counted, and the
/// count said with the next line: a flood of them is a few lines a second.
#[derive(Debug, Default)]
pub struct HandshakeFailures {
    /// Failed in all.
    pub failed: u64,
    window: Option<Duration>,
    said_in_window: u64,
    unsaid: u64,
}

impl HandshakeFailures {
    /// Notes one failure (`why`, of a connection from `peer`) at `now`;
    /// returns the log line to write, if one is due.
    pub fn note(&mut self, peer: std::net::SocketAddr, why: &str, now: Duration) -> Option<String> {
        self.failed += 1;
        if self
            .window
            .is_none_or(|start| now.saturating_sub(start) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.said_in_window = 0;
        }
        if self.said_in_window >= FAILURES_SAID_PER_SECOND {
            self.unsaid += 1;
            return None;
        }
        self.said_in_window += 1;
        Some(match std::mem::take(&mut self.unsaid) {
            0 => format!("client {peer}: {why}"),
            n => format!(
                "client {peer}: {why} (and {n} more failed before authentication since, not said one by one; {} in all)",
                self.failed
            ),
        })
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
        let first = t.note(TurnedAway::OverCap, t0).unwrap();
        assert!(first.starts_with("turned away 1 connection"), "{first}");
        let kinds = [TurnedAway::OverCap, TurnedAway::OverRate, TurnedAway::OverSourceCap];
        for k in 0..99 {
            assert_eq!(t.note(kinds[k % 3], t0 + Duration::from_millis(k as u64)), None);
        }
        let next = t.note(TurnedAway::OverRate, t0 + Duration::from_secs(1)).unwrap();
        assert!(next.starts_with("turned away 100 "), "{next}");
        assert_eq!((t.over_cap, t.over_rate, t.over_source_cap), (34, 34, 33));
    }

    #[test]
    fn a_few_failed_handshakes_a_second_are_said_the_rest_counted() {
        let mut f = HandshakeFailures::default();
        let peer: std::net::SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let t0 = Duration::from_secs(5);
        for k in 0..FAILURES_SAID_PER_SECOND {
            let line = f.note(peer, "TLS handshake timed out", t0 + Duration::from_millis(k));
            assert_eq!(
                line.as_deref(),
                Some("client [2001:db8::1]:4000: TLS handshake timed out")
            );
        }
        for k in 0..500 {
            assert_eq!(f.note(peer, "no ClientHello", t0 + Duration::from_millis(10 + k)), None);
        }
        let next = f.note(peer, "bad key", t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(
            next,
            "client [2001:db8::1]:4000: bad key (and 500 more failed before authentication since, not said one by one; 506 in all)"
        );
        assert_eq!(f.failed, 506);
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        assert_eq!(source_of(v6("2001:db8:1:2:3:4:5:6")), v6("2001:db8:1:2::"));
        assert_eq!(source_of(v6("::ffff:198.51.100.7")), v6("198.51.100.7"));
        assert_eq!(source_of(v6("198.51.100.7")), v6("198.51.100.7"));
    }

    #[test]
    fn a_slash_64_walking_its_addresses_gets_one_burst() {
        let mut r = RateLimiter::default();
        let t0 = Duration::from_secs(100);
        let allowed = (0..1000u16)
            .filter(|&n| r.allow(v6(&format!("2001:db8:77::{n:x}")), t0))
            .count();
        assert_eq!(allowed, ATTEMPTS_BURST as usize);
        assert_eq!(r.tracked(), 1);
        // The next /64 is another subscriber.
        assert!(r.allow(v6("2001:db8:78::1"), t0));
    }

    #[test]
    fn one_source_gets_a_bounded_share_of_handshakes() {
        let h = Handshakes::default();
        let held: Vec<_> = (0..1000u16)
            .filter_map(|n| h.begin(v6(&format!("2001:db8:77::{n:x}"))).ok())
            .collect();
        assert_eq!(held.len(), HANDSHAKES_PER_SOURCE);
        assert_eq!(h.begin(v6("2001:db8:77::ffff")).err(), Some(TurnedAway::OverSourceCap));
        // Finished handshakes give their places back.
        drop(held);
        assert_eq!(h.running(), 0);
        assert!(h.begin(v6("2001:db8:77::1")).is_ok());
    }

    #[test]
    fn the_last_client_s_source_gets_in_when_strangers_fill_the_cap() {
        let h = Handshakes::default();
        h.authenticated(v6("198.51.100.7"));
        // Strangers from many sources take every open place.
        let held: Vec<_> = (0..2000u32).filter_map(|n| h.begin(ip(0x0a00_0000 + n)).ok()).collect();
        assert_eq!(held.len(), MAX_HANDSHAKES - RESERVED_FOR_LAST_CLIENT);
        assert_eq!(h.begin(ip(0x0b00_0001)).err(), Some(TurnedAway::OverCap));
        // The last client, seen through a dual-stack listener, still gets in.
        let back: Vec<_> = (0..RESERVED_FOR_LAST_CLIENT)
            .map(|_| h.begin(v6("::ffff:198.51.100.7")).expect("a reserved place"))
            .collect();
        assert_eq!(h.running(), MAX_HANDSHAKES);
        assert_eq!(h.begin(v6("198.51.100.7")).err(), Some(TurnedAway::OverCap));
        drop(back);
        drop(held);
        assert_eq!(h.running(), 0);
    }
}
