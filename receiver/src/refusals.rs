//! Refused handshakes and identities: each is counted in
//! `lockstep_receiver_handshakes_refused_total{reason}` and logged with the peer's address and
//! the subject of the certificate it presented. An agent with a bad certificate retries
//! forever and a scanner may knock all day, so the log gets one line per peer address and
//! reason a minute, and the next line says how many were suppressed in between.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lockstep_common::tls::{Reason, TlsProblem};
use tracing::{error, warn};

use crate::metrics as m;

/// One log line per peer address and reason within this long.
const WINDOW: Duration = Duration::from_secs(60);
/// Entries kept before old ones are dropped (a scan from many addresses).
const MAX_ENTRIES: usize = 4096;

/// Who was refused and why: the unit of rate limiting.
type Key = (Option<IpAddr>, Reason);

/// Rate-limited reporting of refusals, shared by the accept loop and the sessions.
#[derive(Default)]
pub struct Refusals {
    /// When each (peer address, reason) was last logged, and how many refusals were not
    /// logged since.
    logged: Mutex<HashMap<Key, (Instant, u64)>>,
}

impl Refusals {
    /// Makes every reason's counter exist at 0, so dashboards and alerts see the series
    /// before the first refusal.
    pub fn register_metrics() {
        for r in Reason::ALL {
            metrics::counter!(m::HANDSHAKES_REFUSED_TOTAL, m::L_REASON => r.label()).absolute(0);
        }
    }

    /// Counts a refusal and logs it unless one like it was logged within the last minute.
    pub fn record(&self, peer: Option<SocketAddr>, problem: &TlsProblem) {
        metrics::counter!(m::HANDSHAKES_REFUSED_TOTAL, m::L_REASON => problem.reason.label()).increment(1);
        let Some(suppressed) = self.due(peer.map(|p| p.ip()), problem.reason, Instant::now()) else { return };
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
        let subject = problem.subject.as_deref().unwrap_or("(none presented)");
        let reason = problem.reason.label();
        if problem.reason == Reason::RefusedByPeer {
            // This receiver's own certificate (or the agent's trust in it) is what needs fixing.
            error!(peer = %peer, reason, suppressed, error = %problem, "an agent refused this receiver's certificate");
        } else {
            warn!(peer = %peer, subject = %subject, reason, suppressed, error = %problem, "connection refused");
        }
    }

    /// `Some(suppressed since the last line)` when a line is due for (ip, reason) at `now`.
    fn due(&self, ip: Option<IpAddr>, reason: Reason, now: Instant) -> Option<u64> {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() >= MAX_ENTRIES {
            logged.retain(|_, (at, _)| now.duration_since(*at) < WINDOW);
        }
        match logged.get_mut(&(ip, reason)) {
            Some((at, suppressed)) if now.duration_since(*at) < WINDOW => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = std::mem::take(suppressed);
                *at = now;
                Some(n)
            }
            None => {
                logged.insert((ip, reason), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_peer_and_reason_a_minute_with_the_repeats_counted() {
        let r = Refusals::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(r.due(Some(a), Reason::UnknownCa, t0), Some(0));
        assert_eq!(r.due(Some(a), Reason::UnknownCa, t0 + Duration::from_secs(1)), None);
        assert_eq!(r.due(Some(a), Reason::UnknownCa, t0 + Duration::from_secs(30)), None);
        // Another reason, another peer: their own lines.
        assert_eq!(r.due(Some(a), Reason::Expired, t0 + Duration::from_secs(31)), Some(0));
        assert_eq!(r.due(Some(b), Reason::UnknownCa, t0 + Duration::from_secs(31)), Some(0));
        // After the minute, the next line carries the two suppressed in between.
        assert_eq!(r.due(Some(a), Reason::UnknownCa, t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(r.due(Some(a), Reason::UnknownCa, t0 + Duration::from_secs(62)), None);
    }
}
