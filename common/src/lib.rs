//! lockstep-common: what the agent and the receiver share — the wire contract (`proto`), the
//! event model and its validation (`event`, `relpath`), on-disk record framing with crc32
//! (`frame`), configuration (`config`), mutual TLS (`tls`), the admin endpoint (`admin`),
//! retry policy (`retry`), and logging/metrics setup (`telemetry`).

pub mod admin;
pub mod config;
pub mod daemon;
pub mod event;
pub mod frame;
pub mod pgtls;
pub mod proto;
pub mod relpath;
pub mod retry;
pub mod telemetry;
pub mod tls;

/// Version of the `lockstep.v1` stream protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message either side accepts. Journal records are at most ~1 MiB of payload
/// (files travel in chunks), and a batch holds a few of them.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Microseconds since the Unix epoch on this host's clock.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
