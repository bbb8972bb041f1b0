//! Sources: each turns a native change feed into an ordered stream of [`Change`]s and appends
//! them to the journal. A source owns its upstream position and any index it needs (kept in
//! the agent's sled database under its own tree), and advances them only after the journal has
//! made its changes durable.
//!
//! Besides its own task, every source offers a [`Snapshotter`] — a consistent-enough full copy
//! of its current state, used to (re)seed a receiver whose position is not in the journal —
//! and accepts repair requests for single items a receiver could not reproduce.

pub mod fs;
pub mod pg;
pub mod sqlite;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use lockstep_common::event::{Change, Seq, SourceKind};
use lockstep_common::relpath::RelPath;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::journal::JournalHandle;

/// Source failures. All are fatal for the agent (the supervisor logs and exits non-zero),
/// except where a source retries internally.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name}: {context}: {error}")]
    Io { source_name: String, context: String, error: std::io::Error },
    #[error("source {source_name}: {0}", source_name = .1)]
    Journal(crate::journal::JournalError, String),
    #[error("source {source_name}: index: {error}")]
    Index { source_name: String, error: sled::Error },
    #[error("source {source_name}: {problem}")]
    Other { source_name: String, problem: String },
}

/// Coarse state shown in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    Snapshot,
    Streaming,
    Error,
}

/// Live status of one source, shared with the admin endpoint.
#[derive(Debug)]
pub struct SourceStatus {
    pub name: String,
    pub kind: SourceKind,
    state: Mutex<(SourceState, Option<String>)>,
    last_seq: AtomicU64,
    events: AtomicU64,
    /// Snapshots of this source being sent to receivers right now, and ever started.
    snapshots_active: AtomicU64,
    snapshots_started: AtomicU64,
    /// fs: sockets found in the tree and not replicated (they mean nothing on another host).
    sockets_skipped: AtomicU64,
    /// When the first snapshot of this run started (µs since the epoch; 0: none yet).
    first_snapshot_us: AtomicI64,
}

/// Counts one snapshot of a source as running until dropped.
pub struct SnapshotGuard(Arc<SourceStatus>);

impl Drop for SnapshotGuard {
    fn drop(&mut self) {
        self.0.snapshots_active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SourceStatus {
    pub fn new(name: &str, kind: SourceKind) -> Self {
        SourceStatus {
            name: name.to_string(),
            kind,
            state: Mutex::new((SourceState::Snapshot, None)),
            last_seq: AtomicU64::new(0),
            events: AtomicU64::new(0),
            snapshots_active: AtomicU64::new(0),
            snapshots_started: AtomicU64::new(0),
            sockets_skipped: AtomicU64::new(0),
            first_snapshot_us: AtomicI64::new(0),
        }
    }

    pub fn set_state(&self, s: SourceState, error: Option<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (s, error);
    }

    pub fn state(&self) -> (SourceState, Option<String>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records that events up to `seq` were journaled (`n` of them).
    pub fn journaled(&self, seq: Seq, n: u64) {
        self.last_seq.fetch_max(seq.0, Ordering::SeqCst);
        self.events.fetch_add(n, Ordering::SeqCst);
    }

    pub fn last_seq(&self) -> Seq {
        Seq(self.last_seq.load(Ordering::SeqCst))
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Marks a snapshot of this source as running (see [`SnapshotGuard`]).
    pub fn snapshot_started(self: &Arc<Self>) -> SnapshotGuard {
        let _ =
            self.first_snapshot_us.compare_exchange(0, lockstep_common::now_us(), Ordering::SeqCst, Ordering::SeqCst);
        self.snapshots_started.fetch_add(1, Ordering::SeqCst);
        self.snapshots_active.fetch_add(1, Ordering::SeqCst);
        SnapshotGuard(self.clone())
    }

    /// (snapshots running now, snapshots ever started).
    /// When the first snapshot of this run started (µs since the epoch), if one did.
    pub fn first_snapshot_us(&self) -> Option<i64> {
        Some(self.first_snapshot_us.load(Ordering::SeqCst)).filter(|&t| t != 0)
    }

    /// Counts one more socket left out (see `sockets_skipped`).
    pub fn skipped_socket(&self) {
        self.sockets_skipped.fetch_add(1, Ordering::SeqCst);
        ::metrics::counter!(crate::metrics::SOCKETS_SKIPPED_TOTAL, crate::metrics::L_SOURCE => self.name.clone())
            .increment(1);
    }

    pub fn sockets_skipped(&self) -> u64 {
        self.sockets_skipped.load(Ordering::SeqCst)
    }

    pub fn snapshots(&self) -> (u64, u64) {
        (self.snapshots_active.load(Ordering::SeqCst), self.snapshots_started.load(Ordering::SeqCst))
    }
}

/// A receiver asked for one item to be sent again in full.
#[derive(Debug, Clone)]
pub struct RepairRequest {
    pub path: RelPath,
    pub reason: String,
}

/// Marks the point before which a source's journal records can no longer bring a receiver up
/// to date (its upstream lost changes, e.g. an invalidated replication slot): every receiver
/// whose position for the source is below it is reseeded with a snapshot.
pub struct ResyncFloor {
    store: Arc<dyn crate::journal::JournalStore>,
    /// Bumped on every raise; shippers reconnect to re-decide.
    kick: tokio::sync::watch::Sender<u64>,
}

impl ResyncFloor {
    pub fn new(store: Arc<dyn crate::journal::JournalStore>) -> Self {
        let (kick, _) = tokio::sync::watch::channel(0);
        ResyncFloor { store, kick }
    }

    fn key(source: &str) -> String {
        format!("resync_floor/{source}")
    }

    /// The floor of `source` (0: none).
    pub fn get(&self, source: &str) -> Seq {
        self.store
            .get_meta(&Self::key(source))
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(Seq::ZERO, |b| Seq(u64::from_be_bytes(b)))
    }

    /// Raises the floor of `source` past everything journaled so far, durably (blocking I/O).
    /// The source then journals a record of its own (which lands at or above the floor), and
    /// calls [`kick`](Self::kick).
    pub fn raise(&self, source: &str) -> Result<Seq, crate::journal::JournalError> {
        let floor = Seq(self.store.last_seq().0 + 1);
        self.store.put_meta(&Self::key(source), &floor.0.to_be_bytes())?;
        self.store.flush()?;
        Ok(floor)
    }

    /// Makes connected shippers reconnect and re-decide who needs a resync.
    pub fn kick(&self) {
        self.kick.send_modify(|g| *g += 1);
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.kick.subscribe()
    }
}

/// What a running source gets from the agent.
pub struct SourceContext {
    pub name: Arc<str>,
    pub journal: JournalHandle,
    /// The agent's sled database; a source keeps its own trees in it (prefix them with its name).
    pub db: sled::Db,
    pub status: Arc<SourceStatus>,
    pub repairs: mpsc::Receiver<RepairRequest>,
    pub cancel: CancellationToken,
    pub resync_floor: Arc<ResyncFloor>,
    /// The agent's data directory (scratch files go here, never in the journal's own).
    pub data_dir: std::path::PathBuf,
}

/// A long-lived source task.
pub trait Source: Send + 'static {
    /// Captures changes until `ctx.cancel` fires. Returning early (Ok or Err) is fatal for the
    /// agent unless cancellation was requested.
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// Produces a full copy of a source's current state for a receiver being (re)seeded.
pub trait Snapshotter: Send + Sync + 'static {
    /// Sends the source's full current state into `tx` as changes, in an order the receiver can
    /// apply (parents before children). Ends when done or when `tx` is closed. The copy may be
    /// taken while the source keeps changing; the journal records after the snapshot's start
    /// position bring the receiver up to date (and repair requests mend any race).
    fn snapshot(&self, tx: mpsc::Sender<Change>) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// Everything the agent holds about one configured source.
pub struct SourceHandle {
    pub name: Arc<str>,
    pub kind: SourceKind,
    pub status: Arc<SourceStatus>,
    pub snapshotter: Arc<dyn Snapshotter>,
    pub repair_tx: mpsc::Sender<RepairRequest>,
}
