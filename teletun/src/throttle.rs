//! Log lines that anyone on the path could otherwise make us write by the
//! thousand (turned-away strangers, a peer's moves): said at most once a
//! second, with counts kept by the caller.

use std::time::Duration;

/// Lets a line through at most once a second, on any clock of `Duration`s.
#[derive(Debug, Default)]
pub struct OncePerSecond {
    last_said: Option<Duration>,
}

impl OncePerSecond {
    /// Whether a line may be said at `now`; if so, the next waits a second.
    pub fn due(&mut self, now: Duration) -> bool {
        let due = self
            .last_said
            .is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(1));
        if due {
            self.last_said = Some(now);
        }
        due
    }
}
