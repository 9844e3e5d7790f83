//! Whether the peer is alive, and when to show it that we are: a heartbeat
//! when we have sent nothing for a while, and an end to the session when the
//! peer has sent nothing authentic for longer than the silence limit.
//!
//! Both halves of a session share one [`Liveness`] through atomics (the
//! outbound half notes what it sends and keeps the timers; the inbound half
//! notes what it receives), so neither waits for the other. Times are the
//! caller's: on [`super::now`]'s clock in production, on a fake one in tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Time;

/// Each side sends a heartbeat when it has sent nothing for this long.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A peer that sent no authentic record for this long is gone. Sixteen
/// heartbeats in a row must be lost first, which even a badly lossy path does
/// not do.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(4);

/// What the timers say now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing to do before [`Liveness::poll_timeout`].
    Nothing,
    /// Send a heartbeat.
    Heartbeat,
    /// The peer has been silent for this long: the session is over.
    Silent(Duration),
}

/// The last send and receive, and the limits.
#[derive(Debug)]
pub struct Liveness {
    interval: Duration,
    silence_limit: Duration,
    last_tx: AtomicU64,
    last_rx: AtomicU64,
}

fn nanos(t: Time) -> u64 {
    t.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl Liveness {
    /// Both clocks start at `now`: a new session counts as just heard from.
    pub fn new(now: Time, interval: Duration, silence_limit: Duration) -> Self {
        Liveness {
            interval,
            silence_limit,
            last_tx: AtomicU64::new(nanos(now)),
            last_rx: AtomicU64::new(nanos(now)),
        }
    }

    /// With the production limits.
    pub fn standard(now: Time) -> Self {
        Self::new(now, HEARTBEAT_INTERVAL, SILENCE_LIMIT)
    }

    /// We sent a record at `now`.
    pub fn sent(&self, now: Time) {
        self.last_tx.fetch_max(nanos(now), Ordering::Relaxed);
    }

    /// An authentic record arrived at `now`.
    pub fn received(&self, now: Time) {
        self.last_rx.fetch_max(nanos(now), Ordering::Relaxed);
    }

    fn last(&self) -> (Time, Time) {
        (
            Duration::from_nanos(self.last_tx.load(Ordering::Relaxed)),
            Duration::from_nanos(self.last_rx.load(Ordering::Relaxed)),
        )
    }

    /// When [`Self::due`] next has something to say.
    pub fn poll_timeout(&self) -> Time {
        let (tx, rx) = self.last();
        (tx + self.interval).min(rx + self.silence_limit)
    }

    /// What is due at `now`.
    pub fn due(&self, now: Time) -> Due {
        let (tx, rx) = self.last();
        let silent = now.saturating_sub(rx);
        if silent >= self.silence_limit {
            Due::Silent(silent)
        } else if now.saturating_sub(tx) >= self.interval {
            Due::Heartbeat
        } else {
            Due::Nothing
        }
    }

    /// How long ago the last authentic record arrived.
    pub fn since_received(&self, now: Time) -> Duration {
        now.saturating_sub(self.last().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn heartbeats_when_idle_and_ends_after_the_silence_limit() {
        let t0 = Duration::from_secs(100);
        let l = Liveness::standard(t0);
        assert_eq!(l.due(t0), Due::Nothing);
        assert_eq!(l.poll_timeout(), t0 + HEARTBEAT_INTERVAL);
        assert_eq!(l.due(t0 + 249 * MS), Due::Nothing);
        assert_eq!(l.due(t0 + 250 * MS), Due::Heartbeat);
        // Sending resets the heartbeat, not the silence.
        l.sent(t0 + 250 * MS);
        assert_eq!(l.due(t0 + 300 * MS), Due::Nothing);
        assert_eq!(l.poll_timeout(), t0 + 500 * MS);
        // Heartbeats every 250 ms; the peer's silence ends it at 4 s.
        let mut t = t0 + 500 * MS;
        while t < t0 + SILENCE_LIMIT {
            assert_eq!(l.due(t), Due::Heartbeat, "{t:?}");
            l.sent(t);
            t = l.poll_timeout();
        }
        assert_eq!(t, t0 + SILENCE_LIMIT);
        assert_eq!(l.due(t), Due::Silent(SILENCE_LIMIT));
        // One authentic record and it is alive again (a heartbeat is due).
        l.received(t);
        assert_eq!(l.due(t), Due::Heartbeat);
        assert_eq!(l.since_received(t + 7 * MS), 7 * MS);
    }

    #[test]
    fn time_never_runs_backwards_between_threads() {
        let t0 = Duration::from_secs(5);
        let l = Liveness::standard(t0);
        l.received(t0 + 100 * MS);
        // A thread with an older reading must not move it back.
        l.received(t0 + 50 * MS);
        assert_eq!(l.since_received(t0 + 100 * MS), Duration::ZERO);
    }
}
