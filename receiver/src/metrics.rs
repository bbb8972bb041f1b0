//! Metric names and label keys of the receiver.

pub const EVENTS_APPLIED_TOTAL: &str = "lockstep_receiver_events_applied_total";
pub const APPLY_ERRORS_TOTAL: &str = "lockstep_receiver_apply_errors_total";
pub const APPLIED_SEQ: &str = "lockstep_receiver_applied_seq";
pub const SESSIONS_REFUSED_TOTAL: &str = "lockstep_receiver_sessions_refused_total";
pub const CORRUPT_RECORDS_TOTAL: &str = "lockstep_receiver_corrupt_records_total";

/// TLS handshakes and identities refused, by `reason` (see `lockstep_common::tls::Reason`).
pub const HANDSHAKES_REFUSED_TOTAL: &str = "lockstep_receiver_handshakes_refused_total";

pub const L_AGENT: &str = "agent";
pub const L_SOURCE: &str = "source";
pub const L_REASON: &str = "reason";
/// fs targets with `safe_links`: how many of the source's symlinks are currently left out.
pub const SYMLINKS_SKIPPED: &str = "lockstep_receiver_symlinks_skipped";
/// fs targets: owners, extended attributes, ACLs, devices or FIFOs that could not (or, for
/// devices and FIFOs switched off, would not) be reproduced; label `what`.
pub const METADATA_NOT_APPLIED_TOTAL: &str = "lockstep_receiver_metadata_not_applied_total";
pub const L_WHAT: &str = "what";
