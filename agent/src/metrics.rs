//! Metric names and label keys of the agent (Prometheus text format at `metrics_listen`).

pub const EVENTS_CAPTURED_TOTAL: &str = "lockstep_agent_events_captured_total";
/// fs sources: sockets found and not replicated (each path counted once per agent run).
pub const SOCKETS_SKIPPED_TOTAL: &str = "lockstep_agent_fs_sockets_skipped_total";
pub const JOURNAL_BYTES: &str = "lockstep_agent_journal_bytes";
pub const JOURNAL_LAST_SEQ: &str = "lockstep_agent_journal_last_seq";
pub const LAG_SECONDS: &str = "lockstep_replication_lag_seconds";
pub const EVENTS_BEHIND: &str = "lockstep_replication_events_behind";
pub const BYTES_BEHIND: &str = "lockstep_replication_bytes_behind";
pub const BYTES_SENT_TOTAL: &str = "lockstep_replication_bytes_sent_total";
pub const RECEIVER_CONNECTED: &str = "lockstep_replication_connected";
pub const RESYNCS_TOTAL: &str = "lockstep_replication_resyncs_total";

pub const L_SOURCE: &str = "source";
pub const L_RECEIVER: &str = "receiver";
