//! The fs applier: applies a filesystem source's changes (`FsOp`s) to a standby directory tree
//! (`root`) and persists how far it got in a position file.
//!
//! In: one change at a time, in journal order, plus resync snapshots and commits from the
//! session. Out: the tree under `root`, the position file, and per change an [`ApplyOutcome`]
//! with repair requests for what could not be reproduced exactly.
//!
//! Safety: nothing is ever written outside `root`. Every ancestor of a path is checked to be a
//! real directory (a symlink in the way is unlinked and replaced when a directory is needed,
//! never followed), and final components are handled without following symlinks (see
//! [`tree`]). Symlinks whose target leads outside the root are skipped unless allowed.
//!
//! # Durability
//!
//! Changes are applied without per-file fsync (fsyncing each of 10,000 small files is far too
//! slow). [`Applier::commit`] calls `syncfs(2)` once on the root's filesystem, which flushes
//! file data, renames and directory entries of everything applied so far, and only then writes
//! the position file atomically (temp, fsync, rename, dir fsync). So a durable position never
//! covers changes that are not durable.
//!
//! After a crash, the changes applied after the committed position are not re-applied: that
//! is not safe in general (a replayed write recreates a directory a later rename moved away,
//! and the replayed rename then replaces the newer directory with it). Instead the applier
//! records after every change how far it got (see [`mark`]): after the process dies it commits
//! that position (the page cache holds exactly what it did); after the machine restarts it
//! resyncs the target. A resync in progress is not resumable either: it removes the position
//! file first, so an interrupted one starts over.
//!
//! What must still be harmless to redo is the one change that was under way when the process
//! died, over its own partial result:
//! - a file write rebuilds the content in a staging file and installs it only if its blake3
//!   matches the sender's hash; otherwise it leaves the target alone and asks for a repair;
//! - mkdir, chmod and symlink set an absolute state; remove of a missing path does nothing;
//! - a rename whose source is already gone does nothing (the destination was renamed in
//!   before, or is re-sent as a repair if it is missing too); one onto its own ancestor picks
//!   up the source it had parked.
//!
//! During a resync, file writes are applied by a few worker threads (see [`pool`]); every other
//! operation, the end of the resync and a commit wait for them first.
//!
//! Staging files are named deterministically per path, so a write whose earlier chunks were
//! committed (and therefore synced with the staging file) continues in the same file after a
//! restart.

mod mark;
mod pool;
mod tree;
mod write;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lockstep_common::event::{Change, FsOp, JournalId, Seq};
use lockstep_common::relpath::{RelPath, STAGING_SUFFIX};
use tracing::{info, warn};

use self::mark::AppliedMark;
use self::pool::Pool;
use self::tree::{chmod_nofollow, ensure_parents, io_err, lstat, remove_any, staging_path, symlink_escapes};
use self::write::Writer;
use super::{
    read_position_file, remove_position_file, write_position_file, Applier, ApplyError, ApplyOutcome, CommitFn,
    Position, POSITION_LEN,
};

/// Applies a filesystem source to a standby directory tree.
pub struct FsApplier {
    /// The standby tree; nothing outside it is ever written.
    root: PathBuf,
    /// Where the committed position is persisted (framed with version and crc32).
    position_file: PathBuf,
    /// Whether symlinks pointing outside `root` are recreated (else skipped).
    allow_external_symlinks: bool,
    /// The last committed position, as loaded or as written by a commit (which may finish on
    /// another thread).
    committed: Arc<Mutex<Committed>>,
    /// How far applying got, past the committed position (see [`mark`]).
    mark: AppliedMark,
    /// The journal the current session streams from (positions are recorded in it).
    journal: Option<JournalId>,
    /// Something was applied since the last commit was prepared (so the next one must flush).
    unflushed: bool,
    /// Content writes applied on this thread, with their staging state.
    writer: Writer,
    /// During a resync: workers applying independent file writes in parallel.
    pool: Option<Pool>,
    /// Repairs found by the pool's workers, not yet handed to the session.
    deferred: ApplyOutcome,
    /// During a resync: every path the snapshot mentioned, with its ancestors.
    resync: Option<HashSet<RelPath>>,
}

impl FsApplier {
    /// Opens (creating `root` and the position file's directory if missing) and loads the
    /// committed position, if any. A corrupt position file is an error naming it; it needs a
    /// person (restore it, or remove it to resync the target from scratch).
    pub fn open(root: PathBuf, position_file: PathBuf, allow_external_symlinks: bool) -> Result<FsApplier, ApplyError> {
        fs::create_dir_all(&root).map_err(io_err(format!("create target root {}", root.display())))?;
        if let Some(dir) = position_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err(format!("create position directory {}", dir.display())))?;
        }
        let position = load_position(&position_file)?;
        let mark = AppliedMark::open(mark_path(&position_file))?;
        Ok(FsApplier {
            root: root.clone(),
            position_file,
            allow_external_symlinks,
            committed: Arc::new(Mutex::new(Committed { pos: position, epoch: 0 })),
            mark,
            journal: None,
            unflushed: false,
            writer: Writer { root: root.clone(), ..Default::default() },
            pool: None,
            deferred: ApplyOutcome::default(),
            resync: None,
        })
    }

    fn apply_fs(&mut self, op: FsOp) -> Result<ApplyOutcome, ApplyError> {
        match op {
            FsOp::Write(w) => self.writer.apply_write(w),
            FsOp::Mkdir { path, mode, .. } => self.mkdir(&path, mode),
            FsOp::Remove { path } => self.remove(&path),
            FsOp::Rename { from, to } => self.rename(&from, &to),
            FsOp::SetAttr { path, mode, .. } => self.chmod(&path, mode),
            FsOp::Symlink { path, target, .. } => self.symlink(&path, &target),
            // Not applied yet (issue 18 work in progress): the agent does not send them yet.
            FsOp::Link { .. } | FsOp::Special { .. } => {
                Err(ApplyError::Refused("hard links and special files are not supported by this receiver".into()))
            }
        }
    }

    fn mkdir(&mut self, rel: &RelPath, mode: u32) -> Result<ApplyOutcome, ApplyError> {
        ensure_parents(&self.root, rel, true)?;
        let path = rel.under(&self.root);
        match lstat(&path).map_err(io_err(format!("inspect {}", path.display())))? {
            Some(m) if m.is_dir() => {}
            existing => {
                if existing.is_some() {
                    remove_any(&path)?;
                }
                fs::create_dir(&path).map_err(io_err(format!("create directory {}", path.display())))?;
            }
        }
        chmod_nofollow(&path, mode)?;
        Ok(ApplyOutcome::default())
    }

    fn remove(&mut self, rel: &RelPath) -> Result<ApplyOutcome, ApplyError> {
        self.forget_writes_under(rel);
        // Below a missing or non-directory ancestor the path does not exist: nothing to do.
        if ensure_parents(&self.root, rel, false)? {
            remove_any(&rel.under(&self.root))?;
        }
        Ok(ApplyOutcome::default())
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<ApplyOutcome, ApplyError> {
        self.forget_writes_under(from);
        self.forget_writes_under(to);
        let src = from.under(&self.root);
        let dst = to.under(&self.root);
        let src_meta = if ensure_parents(&self.root, from, false)? {
            lstat(&src).map_err(io_err(format!("inspect {}", src.display())))?
        } else {
            None
        };
        // Moving a/b onto its own ancestor a parks b beside a first (below); a crash after
        // that leaves b parked, and the redo continues from there.
        let parked = from.starts_with(to).then(|| staging_path(&self.root, to, "rename"));
        let (src_meta, src) = match (src_meta, &parked) {
            (None, Some(parked)) if ensure_parents(&self.root, to, false)? => {
                (lstat(parked).map_err(io_err(format!("inspect {}", parked.display())))?, parked.clone())
            }
            (meta, _) => (meta, src),
        };
        let Some(src_meta) = src_meta else {
            // Redone after a crash (already renamed) or raced with a later change on the
            // source: keep what is there, ask for the destination if it is missing.
            let dst_exists = ensure_parents(&self.root, to, false)?
                && lstat(&dst).map_err(io_err(format!("inspect {}", dst.display())))?.is_some();
            let mut outcome = ApplyOutcome::default();
            if !dst_exists {
                outcome.repairs.push((to.clone(), "rename source missing".into()));
            }
            return Ok(outcome);
        };
        if from == to {
            return Ok(ApplyOutcome::default());
        }
        let mut src = src;
        if let Some(parked) = parked.filter(|p| *p != src) {
            // Moving a/b onto its own ancestor a: a must go, but b lives inside it. Park b next
            // to a first.
            ensure_parents(&self.root, to, true)?;
            remove_any(&parked)?;
            fs::rename(&src, &parked).map_err(io_err(format!("move {} aside", src.display())))?;
            src = parked;
        }
        ensure_parents(&self.root, to, true)?;
        if let Some(m) = lstat(&dst).map_err(io_err(format!("inspect {}", dst.display())))? {
            // rename(2) replaces a file by a file and an empty directory by a directory; any
            // other combination must clear the destination first.
            let replaceable = if m.is_dir() { src_meta.is_dir() && dir_is_empty(&dst)? } else { !src_meta.is_dir() };
            if !replaceable {
                remove_any(&dst)?;
            }
        }
        fs::rename(&src, &dst).map_err(io_err(format!("rename {} to {}", src.display(), dst.display())))?;
        Ok(ApplyOutcome::default())
    }

    fn chmod(&mut self, rel: &RelPath, mode: u32) -> Result<ApplyOutcome, ApplyError> {
        let mut outcome = ApplyOutcome::default();
        let found = ensure_parents(&self.root, rel, false)? && chmod_nofollow(&rel.under(&self.root), mode)?;
        if !found {
            outcome.repairs.push((rel.clone(), "chmod of a missing path".into()));
        }
        Ok(outcome)
    }

    fn symlink(&mut self, rel: &RelPath, target: &[u8]) -> Result<ApplyOutcome, ApplyError> {
        self.forget_writes_under(rel);
        if !self.allow_external_symlinks && symlink_escapes(rel, target) {
            // Whatever was at the path is stale on the source; drop it rather than keep an
            // old version the source no longer has.
            if ensure_parents(&self.root, rel, false)? {
                remove_any(&rel.under(&self.root))?;
            }
            return Ok(ApplyOutcome {
                skipped: Some(format!(
                    "symlink {rel} -> {} points outside the target",
                    String::from_utf8_lossy(target)
                )),
                ..Default::default()
            });
        }
        ensure_parents(&self.root, rel, true)?;
        let path = rel.under(&self.root);
        // Built beside and renamed over, so the path never goes missing for readers when it
        // replaces a file or another symlink.
        let tmp = staging_path(&self.root, rel, "symlink");
        remove_any(&tmp)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &tmp)
            .map_err(io_err(format!("create symlink {}", tmp.display())))?;
        if lstat(&path).map_err(io_err(format!("inspect {}", path.display())))?.is_some_and(|m| m.is_dir()) {
            remove_any(&path)?;
        }
        fs::rename(&tmp, &path).map_err(io_err(format!("install symlink {}", path.display())))?;
        Ok(ApplyOutcome::default())
    }

    /// Applies one change (see [`Applier::apply`]).
    fn apply_change(&mut self, change: Change) -> Result<ApplyOutcome, ApplyError> {
        self.unflushed = true;
        let op = match change {
            Change::Fs(op) => op,
            Change::Other(_) => return Err(ApplyError::Refused("a filesystem target accepts only fs changes".into())),
        };
        if self.resync.is_some() {
            match &op {
                // What a snapshot removes or renames away is not part of it.
                FsOp::Remove { .. } => {}
                other => self.mention(other.path()),
            }
        }
        let Some(pool) = &mut self.pool else {
            return self.apply_fs(op);
        };
        let mut outcome = match op {
            FsOp::Write(w) => {
                pool.dispatch(w, &mut self.writer);
                ApplyOutcome::default()
            }
            other => {
                // A barrier: see `pool`.
                self.settle()?;
                self.apply_fs(other)?
            }
        };
        self.collect()?;
        outcome.repairs.append(&mut self.deferred.repairs);
        if outcome.skipped.is_none() {
            outcome.skipped = self.deferred.skipped.take();
        }
        Ok(outcome)
    }

    /// Drops in-memory staging state of writes at or below `rel` (their files move or vanish
    /// with it; a later chunk then reopens or asks for a repair).
    fn forget_writes_under(&mut self, rel: &RelPath) {
        self.writer.staging.retain(|p, _| !p.starts_with(rel));
    }

    /// Waits for the pool's workers (if any) to finish what they were given; their repairs go
    /// to `deferred`, their first error is returned.
    fn settle(&mut self) -> Result<(), ApplyError> {
        if let Some(pool) = &mut self.pool {
            pool.drain(&mut self.writer);
        }
        self.collect()
    }

    /// Moves what the workers found so far into `deferred`; returns their first error.
    fn collect(&mut self) -> Result<(), ApplyError> {
        let Some(pool) = &self.pool else { return Ok(()) };
        let (outcome, error) = pool.take_results();
        self.deferred.repairs.extend(outcome.repairs);
        if outcome.skipped.is_some() {
            self.deferred.skipped = outcome.skipped;
        }
        error.map_or(Ok(()), Err)
    }

    /// Records `rel` and its ancestors as mentioned by the resync snapshot.
    fn mention(&mut self, rel: &RelPath) {
        let Some(seen) = &mut self.resync else { return };
        let mut cur = Some(rel.clone());
        while let Some(p) = cur {
            cur = p.parent();
            if !seen.insert(p) {
                // Its ancestors were recorded with it.
                break;
            }
        }
    }

    /// Removes, below `dir`, every entry the snapshot did not mention and every staging file
    /// not belonging to a write in progress, sparing the applier's `own` files. Never follows
    /// symlinks: only real directories are descended into.
    fn prune(
        &self,
        dir: &Path,
        prefix: Option<&RelPath>,
        keep: &HashSet<RelPath>,
        live: &HashSet<&Path>,
        own: &[PathBuf],
    ) -> Result<(), ApplyError> {
        let entries = fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
            let path = entry.path();
            if own.contains(&path) {
                continue;
            }
            let name = entry.file_name();
            let name = name.as_bytes();
            if name.ends_with(STAGING_SUFFIX.as_bytes()) {
                if !live.contains(path.as_path()) {
                    remove_any(&path)?;
                }
                continue;
            }
            let rel = match prefix {
                None => RelPath::new(name.to_vec()),
                Some(p) => RelPath::new([p.as_bytes(), b"/", name].concat()),
            };
            // A name that is not a valid path (too long) cannot have been mentioned.
            let Some(rel) = rel.ok().filter(|r| keep.contains(r)) else {
                remove_any(&path)?;
                continue;
            };
            let ft = entry.file_type().map_err(io_err(format!("inspect {}", path.display())))?;
            if ft.is_dir() {
                self.prune(&path, Some(&rel), keep, live, own)?;
            }
        }
        Ok(())
    }
}

impl Applier for FsApplier {
    fn position(&self) -> Option<Position> {
        self.committed.lock().unwrap_or_else(|e| e.into_inner()).pos
    }

    fn apply(&mut self, seq: Seq, change: Change) -> Result<ApplyOutcome, ApplyError> {
        if let Change::Fs(op) = &change {
            tracing::trace!(seq = seq.0, op = %op, "apply");
        }
        let outcome = self.apply_change(change)?;
        if let Some(journal_id) = self.journal.filter(|_| seq > Seq::ZERO) {
            self.mark.repairs.extend(outcome.repairs.iter().cloned());
            self.mark.record(Position { journal_id, seq })?;
        }
        Ok(outcome)
    }

    fn begin_resync(&mut self) -> Result<(), ApplyError> {
        // Whatever an abandoned earlier resync left queued is finished (its outcome is moot:
        // this resync re-sends everything).
        let _ = self.settle();
        self.deferred = ApplyOutcome::default();
        // A resync cut short leaves a tree that is neither the old position's nor the new
        // one's: without a position, the agent starts the resync over. Commits still running
        // for the old position must not bring it back.
        self.drop_position()?;
        self.resync = Some(HashSet::new());
        if self.pool.is_none() {
            self.pool = Some(Pool::new(self.root.clone(), apply_threads()));
        }
        Ok(())
    }

    fn end_resync(&mut self) -> Result<(), ApplyError> {
        self.unflushed = true;
        if self.resync.is_none() {
            return Err(ApplyError::Refused("end of resync without a beginning".into()));
        }
        self.settle()?;
        self.pool = None;
        let keep = self.resync.take().ok_or_else(|| ApplyError::Refused("end of resync without a beginning".into()))?;
        let live: HashSet<&Path> = self.writer.staging.values().map(|s| s.tmp.as_path()).collect();
        // The position file, its temp file and the applied mark may live inside the root; they
        // are not part of the copy.
        let own =
            [self.position_file.clone(), self.position_file.with_extension("tmp"), mark_path(&self.position_file)];
        self.prune(&self.root, None, &keep, &live, &own)
    }

    fn take_deferred(&mut self) -> ApplyOutcome {
        std::mem::take(&mut self.deferred)
    }

    fn prepare_commit(&mut self, pos: Position) -> Result<Option<CommitFn>, ApplyError> {
        self.settle()?;
        // Their requests go out with this round; a crash from here on loses at most a
        // duplicate request (the mark file still lists them until the next change).
        self.mark.repairs.clear();
        let root = self.root.clone();
        let position_file = self.position_file.clone();
        let committed = self.committed.clone();
        let epoch = committed.lock().unwrap_or_else(|e| e.into_inner()).epoch;
        // Nothing applied since the last commit: only the position moves, no flush needed.
        let flush = std::mem::take(&mut self.unflushed);
        Ok(Some(Box::new(move || {
            // See the module docs: flush everything applied, then record the position. A
            // syncfs that also catches changes applied after `prepare_commit` is harmless.
            if flush {
                syncfs(&root)?;
            }
            commit_position(&committed, &position_file, pos, epoch)
        })))
    }

    fn session_start(&mut self, journal_id: JournalId) -> Result<(), ApplyError> {
        // A resync the previous session left unfinished is abandoned (its begin removed the
        // position, so the agent starts it over).
        let _ = self.settle();
        self.pool = None;
        self.resync = None;
        self.deferred = ApplyOutcome::default();
        self.journal = Some(journal_id);
        self.recover()
    }
}

impl FsApplier {
    /// Brings the committed position up to the applied mark (see [`mark`]) when it is ahead:
    /// commits it when this boot's page cache holds what was applied, else drops the position
    /// so that the target is resynced. Repairs the mark lists are handed to the session again.
    fn recover(&mut self) -> Result<(), ApplyError> {
        let committed = self.position();
        let Some(mark) = self.mark.pos else { return Ok(()) };
        let ahead = committed.is_some_and(|c| c.journal_id == mark.journal_id && c.seq < mark.seq);
        if ahead && self.mark.this_boot {
            info!(
                target = %self.root.display(), committed = %committed.map_or(0, |c| c.seq.0), applied = %mark.seq,
                "changes applied before a restart are flushed and committed, not applied again"
            );
            syncfs(&self.root)?;
            let epoch = self.committed.lock().unwrap_or_else(|e| e.into_inner()).epoch;
            commit_position(&self.committed, &self.position_file, mark, epoch)?;
            self.deferred.repairs.extend(std::mem::take(&mut self.mark.repairs));
        } else if ahead {
            warn!(
                target = %self.root.display(),
                "the machine restarted while changes past the committed position were being applied; \
                 the tree may hold any part of them, so the target is resynced"
            );
            self.drop_position()?;
        }
        // From here on the mark describes this process's work.
        self.mark.this_boot = true;
        Ok(())
    }

    /// Forgets the committed position, durably, so that the agent resyncs the target; commits
    /// prepared before cannot bring it back.
    fn drop_position(&mut self) -> Result<(), ApplyError> {
        let mut c = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        c.epoch += 1;
        c.pos = None;
        remove_position_file(&self.position_file)
    }
}

/// The committed position, shared with commits finishing on other threads.
struct Committed {
    pos: Option<Position>,
    /// Bumped when the position is dropped (a resync begins): commits prepared before that
    /// must not bring it back.
    epoch: u64,
}

/// Records `pos` as committed (file, then memory) unless the position was dropped since the
/// commit was prepared (`epoch`) or is already further on.
fn commit_position(
    committed: &Mutex<Committed>,
    position_file: &Path,
    pos: Position,
    epoch: u64,
) -> Result<(), ApplyError> {
    let mut c = committed.lock().unwrap_or_else(|e| e.into_inner());
    let behind = c.pos.is_some_and(|cur| cur.journal_id == pos.journal_id && cur.seq >= pos.seq);
    if c.epoch != epoch || behind {
        return Ok(());
    }
    write_position_file(position_file, &pos.to_bytes())?;
    c.pos = Some(pos);
    Ok(())
}

/// Flushes everything written to the filesystem holding `root`.
fn syncfs(root: &Path) -> Result<(), ApplyError> {
    let dir = File::open(root).map_err(io_err(format!("open target root {}", root.display())))?;
    // SAFETY: `dir` is an open file descriptor for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io_err(format!("sync filesystem of {}", root.display()))(io::Error::last_os_error()));
    }
    Ok(())
}

/// The applied mark lives beside the position file.
fn mark_path(position_file: &Path) -> PathBuf {
    let mut name = position_file.as_os_str().to_owned();
    name.push(".applied");
    PathBuf::from(name)
}

/// Worker threads applying file writes during a resync.
fn apply_threads() -> usize {
    // At least two even on one core: a worker blocked in the kernel (inode allocation,
    // page-cache writes) then does not stall the other.
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4)
}

fn dir_is_empty(path: &Path) -> Result<bool, ApplyError> {
    let mut it = fs::read_dir(path).map_err(io_err(format!("list {}", path.display())))?;
    Ok(it.next().is_none())
}

/// Reads the position file; missing means "no position yet".
fn load_position(path: &Path) -> Result<Option<Position>, ApplyError> {
    Ok(read_position_file(path, POSITION_LEN)?.map(|body| Position::from_bytes(&body)))
}
