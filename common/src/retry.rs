//! The one retry policy: exponential backoff with jitter, never giving up on its own (a
//! replication link retries until shutdown), capped so a returning peer is found quickly.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

/// Backoff for reconnecting to a peer: 100 ms doubling to 5 s, ±30% jitter, forever.
pub fn reconnect() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        randomization_factor: 0.3,
        multiplier: 2.0,
        max_interval: Duration::from_secs(5),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// Next delay from `b` (never `None`: the policies here do not expire).
pub fn next_delay(b: &mut ExponentialBackoff) -> Duration {
    b.next_backoff().unwrap_or(Duration::from_secs(5))
}
