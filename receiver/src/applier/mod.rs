//! Appliers: one per target, each applying one agent source's changes to its standby copy in
//! order and persisting how far it got.
//!
//! The session calls [`Applier::apply`] for each change of a batch, then [`Applier::commit`]
//! once, which makes everything applied durable and records the position — only then is the
//! batch acknowledged. After a crash the agent re-sends from the committed position, so
//! `apply` must be harmless to repeat for changes applied but not committed.
//!
//! Appliers do blocking I/O; the session runs them on blocking threads.

pub mod fs;
pub mod pg;
mod slots;
pub mod sqlite;

use std::io;
use std::path::Path;

use lockstep_common::event::{Change, JournalId, Seq};
use lockstep_common::frame;
use lockstep_common::relpath::RelPath;

/// Where a target stands: the journal it follows and the last seq applied and committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub journal_id: JournalId,
    pub seq: Seq,
}

/// Size of a [`Position`] in a position file: journal id (16 bytes) then seq (u64 LE).
pub(crate) const POSITION_LEN: usize = 24;

impl Position {
    /// The position as it starts a position file's body.
    pub(crate) fn to_bytes(self) -> [u8; POSITION_LEN] {
        let mut b = [0; POSITION_LEN];
        b[..16].copy_from_slice(&self.journal_id.0);
        b[16..].copy_from_slice(&self.seq.0.to_le_bytes());
        b
    }

    /// Reads a position from the first [`POSITION_LEN`] bytes of `b`.
    pub(crate) fn from_bytes(b: &[u8]) -> Position {
        let journal_id = JournalId::from_slice(&b[..16]).expect("16 bytes");
        let seq = Seq(u64::from_le_bytes(b[16..POSITION_LEN].try_into().expect("8 bytes")));
        Position { journal_id, seq }
    }
}

/// Reads a position file (a [`frame`]d record) whose body must be `len` bytes; missing means
/// "no position yet". A corrupt file is an error naming it and the fix (it needs a person:
/// restore it, or remove it to resync the target from scratch).
pub(crate) fn read_position_file(path: &Path, len: usize) -> Result<Option<Vec<u8>>, ApplyError> {
    let ctx = || format!("read position file {}", path.display());
    let rec = match std::fs::read(path) {
        Ok(rec) => rec,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(ApplyError::Io { context: ctx(), error }),
    };
    let corrupt = |why: String| ApplyError::Io {
        context: ctx(),
        error: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{why}; restore the file or remove it to resync this target"),
        ),
    };
    let body = frame::decode(&rec).map_err(|e| corrupt(e.to_string()))?;
    if body.len() != len {
        return Err(corrupt(format!("body is {} bytes, expected {len}", body.len())));
    }
    Ok(Some(body.to_vec()))
}

/// Writes a position file atomically and durably (see [`frame::write_atomic`]).
pub(crate) fn write_position_file(path: &Path, body: &[u8]) -> Result<(), ApplyError> {
    frame::write_atomic(path, &frame::encode(body))
        .map_err(|error| ApplyError::Io { context: format!("write position file {}", path.display()), error })
}

/// Removes a position file durably (the removal itself survives a machine crash).
pub(crate) fn remove_position_file(path: &Path) -> Result<(), ApplyError> {
    let ctx = || format!("remove position file {}", path.display());
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(ApplyError::Io { context: ctx(), error }),
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|error| ApplyError::Io { context: ctx(), error })
}

/// Apply failures.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The change itself is unacceptable (it tries to leave the target, or contradicts the
    /// protocol); the stream is refused and nothing of it is applied.
    #[error("refused: {0}")]
    Refused(String),
    /// Local I/O failed (disk full, permissions); the agent retries with backoff.
    #[error("{context}: {error}")]
    Io { context: String, error: std::io::Error },
}

/// What applying a change produced besides the change itself.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// Items the applier could not reproduce exactly and wants re-sent in full.
    pub repairs: Vec<(RelPath, String)>,
    /// The change was skipped on purpose (logged and counted as an apply error, not fatal),
    /// e.g. a symlink leading outside the target when that is not allowed.
    pub skipped: Option<String>,
}

/// Applies one source's changes to one standby.
pub trait Applier: Send + 'static {
    /// The committed position, if any.
    fn position(&self) -> Option<Position>;
    /// Applies one change. `seq` is 0 for resync snapshot entries.
    fn apply(&mut self, seq: Seq, change: Change) -> Result<ApplyOutcome, ApplyError>;
    /// A full snapshot of the source follows; remember what it mentions.
    fn begin_resync(&mut self) -> Result<(), ApplyError>;
    /// The snapshot is complete: remove whatever it did not mention.
    fn end_resync(&mut self) -> Result<(), ApplyError>;
    /// Repairs and skips found after the `apply` call that caused them returned (changes may be
    /// applied in the background during a resync; `end_resync` waits for them). The session
    /// collects these after `end_resync`.
    fn take_deferred(&mut self) -> ApplyOutcome {
        ApplyOutcome::default()
    }
    /// Starts a commit of everything applied so far at `pos`: settles in-flight work and
    /// returns the slow, durable half (flush, then record `pos`), which the session runs while
    /// the next changes are applied — so a slow disk delays acknowledgements, not visibility.
    /// The session runs the commits of one applier one at a time, in order.
    ///
    /// `Ok(None)`: nothing can be committed at this point (the last change applied is the
    /// middle of a source transaction); the session tries again after the next changes.
    fn prepare_commit(&mut self, pos: Position) -> Result<Option<CommitFn>, ApplyError>;
    /// Makes everything applied so far durable, then records `pos` durably. Returns whether it
    /// could (see [`prepare_commit`](Self::prepare_commit)).
    fn commit(&mut self, pos: Position) -> Result<bool, ApplyError> {
        match self.prepare_commit(pos)? {
            Some(f) => f().map(|()| true),
            None => Ok(false),
        }
    }
    /// A new session from the agent's journal `journal_id` is about to stream to this applier:
    /// settle whatever the previous one (or a crashed process) applied but did not commit —
    /// discard it, to be sent again from the committed position, or commit it — and reconnect
    /// to the standby if needed. Blocking.
    fn session_start(&mut self, _journal_id: JournalId) -> Result<(), ApplyError> {
        Ok(())
    }
}

/// The durable half of a commit (see [`Applier::prepare_commit`]).
pub type CommitFn = Box<dyn FnOnce() -> Result<(), ApplyError> + Send>;
