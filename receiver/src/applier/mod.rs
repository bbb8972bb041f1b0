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

use lockstep_common::event::{Change, JournalId, Seq};
use lockstep_common::relpath::RelPath;

/// Where a target stands: the journal it follows and the last seq applied and committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub journal_id: JournalId,
    pub seq: Seq,
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
    /// A new session is about to stream to this applier: discard whatever was applied but not
    /// committed by the previous one (it will be sent again from the committed position), and
    /// reconnect to the standby if needed. Blocking.
    fn session_start(&mut self) -> Result<(), ApplyError> {
        Ok(())
    }
}

/// The durable half of a commit (see [`Applier::prepare_commit`]).
pub type CommitFn = Box<dyn FnOnce() -> Result<(), ApplyError> + Send>;
