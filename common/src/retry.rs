//! The one retry policy: which failures a retry can fix and which need a person, and how often
//! each kind is retried. Every layer that decides how loudly to report a failure, which gRPC
//! code to send for it, or when to try again asks here, so a failure is classified once.
//!
//! - **Transient** ([`Remedy::Retry`]): connection refused or reset, timeouts, a receiver
//!   restarting, a corrupted link. Retried with exponential backoff and jitter (500 ms doubling
//!   to 5 s), reported at INFO/WARN.
//! - **A person must act** ([`Remedy::Person`]): certificates, authorization, configuration,
//!   the standby's disk full or unwritable. Retrying cannot fix these, so they are retried only
//!   every [`SLOW_RETRY`] (the fix is noticed without a restart), reported at ERROR, and their
//!   messages say so ([`Remedy::note`]).
//!
//! A replication link never gives up on its own: it retries until shutdown.

use std::io;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

use crate::tls::Reason;

/// How often a failure that needs a person is retried.
pub const SLOW_RETRY: Duration = Duration::from_secs(30);

/// What a failure needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remedy {
    /// Transient: retry with backoff.
    Retry,
    /// A person must act (certificates, authorization, configuration, a full or unwritable
    /// standby); retried slowly.
    Person,
}

impl Remedy {
    /// A gRPC status received from (or sent to) the peer.
    pub fn of_grpc(code: tonic::Code) -> Remedy {
        use tonic::Code as C;
        match code {
            C::Unauthenticated
            | C::PermissionDenied
            | C::FailedPrecondition
            | C::ResourceExhausted
            | C::Unimplemented => Remedy::Person,
            _ => Remedy::Retry,
        }
    }

    /// A failed TLS handshake.
    pub fn of_tls(reason: Reason) -> Remedy {
        match reason {
            // Bytes that were not TLS: a corrupted link, or a stray client.
            Reason::Malformed => Remedy::Retry,
            _ => Remedy::Person,
        }
    }

    /// What the message of a failure with this remedy ends with, e.g. in the agent's status.
    pub fn note(self) -> &'static str {
        match self {
            Remedy::Retry => "",
            Remedy::Person => "; retrying every 30 s",
        }
    }
}

/// How a local I/O failure (writing the standby, its position) is handled and reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoVerdict {
    pub remedy: Remedy,
    /// The gRPC code that carries it to the agent.
    pub code: tonic::Code,
    /// What a person should do (empty for transient failures).
    pub fix: &'static str,
}

/// Classifies a local I/O failure on the receiver's side.
pub fn local_io(e: &io::Error) -> IoVerdict {
    let person = |code, fix| IoVerdict { remedy: Remedy::Person, code, fix };
    match e.raw_os_error() {
        Some(libc::ENOSPC) => person(tonic::Code::ResourceExhausted, "free space on the standby's filesystem"),
        Some(libc::EDQUOT) => {
            person(tonic::Code::ResourceExhausted, "raise the disk quota of the receiver's user, or free space")
        }
        Some(libc::EFBIG) => person(
            tonic::Code::ResourceExhausted,
            "raise the receiver's file size limit (ulimit -f, systemd LimitFSIZE=) or use a filesystem that holds files this large",
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => person(
            tonic::Code::FailedPrecondition,
            "give the receiver's user write access to the target path (or fix what makes it unwritable)",
        ),
        Some(libc::EROFS) => person(tonic::Code::FailedPrecondition, "mount the standby's filesystem read-write"),
        _ => IoVerdict { remedy: Remedy::Retry, code: tonic::Code::Internal, fix: "" },
    }
}

/// When to reconnect to a peer after a failure: with exponential backoff and jitter after a
/// transient one, every [`SLOW_RETRY`] after one that needs a person.
pub struct Pacer {
    backoff: ExponentialBackoff,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer { backoff: reconnect() }
    }
}

impl Pacer {
    /// The delay before the next attempt after a failure with `remedy`.
    pub fn next(&mut self, remedy: Remedy) -> Duration {
        match remedy {
            Remedy::Retry => next_delay(&mut self.backoff),
            Remedy::Person => {
                // Once fixed, a later transient failure starts from a short delay again.
                self.reset();
                SLOW_RETRY
            }
        }
    }

    /// Forget past failures (after a session that lasted).
    pub fn reset(&mut self) {
        self.backoff = reconnect();
    }
}

/// Backoff for reconnecting to a peer: 500 ms doubling to 5 s, ±30% jitter, forever.
pub fn reconnect() -> ExponentialBackoff {
    ExponentialBackoff {
        // The first delay is `current_interval`; `initial_interval` only after a reset.
        current_interval: Duration::from_millis(500),
        initial_interval: Duration::from_millis(500),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_and_authorization_failures_need_a_person() {
        for code in [tonic::Code::PermissionDenied, tonic::Code::Unauthenticated, tonic::Code::ResourceExhausted] {
            assert_eq!(Remedy::of_grpc(code), Remedy::Person, "{code:?}");
        }
        for code in [tonic::Code::Unavailable, tonic::Code::Internal, tonic::Code::DataLoss, tonic::Code::Unknown] {
            assert_eq!(Remedy::of_grpc(code), Remedy::Retry, "{code:?}");
        }
        for r in Reason::ALL {
            let want = if r == Reason::Malformed { Remedy::Retry } else { Remedy::Person };
            assert_eq!(Remedy::of_tls(r), want, "{r:?}");
        }
        assert!(Remedy::Person.note().contains("every 30 s"));
    }

    #[test]
    fn a_full_or_unwritable_standby_needs_a_person_and_says_what_to_do() {
        let full = local_io(&io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.remedy, Remedy::Person);
        assert_eq!(full.code, tonic::Code::ResourceExhausted);
        assert!(full.fix.contains("free space"), "{}", full.fix);
        let denied = local_io(&io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!((denied.remedy, denied.code), (Remedy::Person, tonic::Code::FailedPrecondition));
        let big = local_io(&io::Error::from_raw_os_error(libc::EFBIG));
        assert_eq!((big.remedy, big.code), (Remedy::Person, tonic::Code::ResourceExhausted));
        let eio = local_io(&io::Error::from_raw_os_error(libc::EIO));
        assert_eq!((eio.remedy, eio.code), (Remedy::Retry, tonic::Code::Internal));
        assert_eq!(local_io(&io::Error::other("pg said no")).remedy, Remedy::Retry);
    }

    #[test]
    fn the_pacer_waits_long_for_a_person_and_backs_off_for_the_rest() {
        let mut p = Pacer::default();
        let first = p.next(Remedy::Retry);
        assert!(first <= Duration::from_millis(650), "{first:?}");
        let mut last = first;
        for _ in 0..10 {
            last = p.next(Remedy::Retry);
        }
        assert!(last >= Duration::from_millis(3000) && last <= Duration::from_millis(6500), "{last:?}");
        assert_eq!(p.next(Remedy::Person), SLOW_RETRY);
        // After a person's fix, a transient failure is retried quickly again.
        assert!(p.next(Remedy::Retry) <= Duration::from_millis(650));
    }
}
