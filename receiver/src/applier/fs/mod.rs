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
//! [`tree`]). Symlinks are created with their target verbatim, as `rsync -a` copies them
//! (absolute, outside the tree or dangling: the applier never follows them); with
//! `safe_links` those leading outside are left out, and kept track of (see [`safe_links`]).
//!
//! Beyond content, modes and mtimes, the applier reproduces what `rsync -aHAXS
//! --numeric-ids` keeps, each part switchable per target ([`FsTargetOptions`]): owner and
//! group, extended attributes and POSIX ACLs (see [`meta`]), holes (see [`sparse`]), hard
//! links and special files. What it cannot reproduce is counted and reported ([`report`]),
//! never failing the apply.
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
//! - mkdir, setattr (owner, attributes, mode), symlink, hard link and special file set an
//!   absolute state (links and special files are built at a staging name and renamed over the
//!   path); remove of a missing path does nothing;
//! - a rename whose source is already gone does nothing (the destination was renamed in
//!   before, or is re-sent as a repair if it is missing too); one onto its own ancestor picks
//!   up the source it had parked;
//! - the set of skipped symlinks is changed at most once per change (see [`safe_links`]).
//!
//! During a resync, file writes are applied by a few worker threads (see [`pool`]); every other
//! operation, the end of the resync and a commit wait for them first.
//!
//! Staging files are named deterministically per path, so a write whose earlier chunks were
//! committed (and therefore synced with the staging file) continues in the same file after a
//! restart.

mod mark;
mod meta;
mod pool;
mod report;
mod safe_links;
mod sparse;
mod tree;
mod write;

pub use self::report::{FsReport, What};

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lockstep_common::config::FsTargetOptions;
use lockstep_common::event::{Change, FsOp, JournalId, Meta, Seq, SpecialKind};
use lockstep_common::relpath::{RelPath, STAGING_SUFFIX};
use tracing::{info, warn};

use self::mark::AppliedMark;
use self::meta::{Ctx, Node};
use self::pool::Pool;
use self::safe_links::{Skipped, SkippedLink};
use self::sparse::{copy_keeping_holes, fill_holes};
use self::tree::{ensure_parents, io_err, lstat, remove_any, staging_path, symlink_escapes};
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
    /// The target's options, its report and what applying metadata needs (shared with the
    /// writers).
    ctx: Arc<Ctx>,
    /// `safe_links`: the source's symlinks left out (see [`safe_links`]).
    skipped: Skipped,
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
    /// person (restore it, or remove it to resync the target from scratch). The skipped
    /// symlinks are loaded too; a target whose `safe_links` changed since is brought in line
    /// with it (links it left out are created, or links now unsafe removed).
    pub fn open(
        root: PathBuf,
        position_file: PathBuf,
        opts: FsTargetOptions,
        report: Arc<FsReport>,
    ) -> Result<FsApplier, ApplyError> {
        fs::create_dir_all(&root).map_err(io_err(format!("create target root {}", root.display())))?;
        if let Some(dir) = position_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err(format!("create position directory {}", dir.display())))?;
        }
        let position = load_position(&position_file)?;
        let mark = AppliedMark::open(mark_path(&position_file))?;
        let ctx = Arc::new(Ctx::new(opts, report, &root));
        let (skipped, problem) = Skipped::open(skipped_path(&position_file))?;
        let mut a = FsApplier {
            root: root.clone(),
            position_file,
            committed: Arc::new(Mutex::new(Committed { pos: position, epoch: 0 })),
            mark,
            journal: None,
            unflushed: false,
            writer: Writer::new(root.clone(), ctx.clone()),
            ctx,
            skipped,
            pool: None,
            deferred: ApplyOutcome::default(),
            resync: None,
        };
        if let Some(problem) = problem {
            // Only a machine crash tears it, and then the tree is resynced anyway.
            warn!(target = %root.display(), problem = %problem,
                "the record of skipped symlinks is unreadable; the target is resynced");
            a.drop_position()?;
        }
        a.reconcile_links()?;
        a.report_skipped();
        Ok(a)
    }

    fn apply_fs(&mut self, op: FsOp, pos: Option<Position>) -> Result<ApplyOutcome, ApplyError> {
        match op {
            FsOp::Write(w) => self.writer.apply_write(w),
            FsOp::Mkdir { path, mode, meta } => self.mkdir(&path, mode, meta.as_ref()),
            FsOp::Remove { path } => self.remove(&path),
            FsOp::Rename { from, to } => self.rename(&from, &to, pos),
            FsOp::SetAttr { path, mode, meta } => self.setattr(&path, mode, meta.as_ref()),
            FsOp::Symlink { path, target, meta } => self.symlink(&path, &target, meta, pos),
            FsOp::Link { path, target } => self.link(&path, &target),
            FsOp::Special { path, kind, mode, rdev, meta } => self.special(&path, kind, mode, rdev, meta.as_ref()),
        }
    }

    fn mkdir(&mut self, rel: &RelPath, mode: u32, meta: Option<&Meta>) -> Result<ApplyOutcome, ApplyError> {
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
        self.ctx.apply(&Node::Path { path: &path, symlink: false }, rel, meta, Some(mode))?;
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

    /// Renames, and keeps the skipped symlinks in line (see [`safe_links`]): those below
    /// `from` move to `to`, where they may have become safe (then they are created); links
    /// the rename brought closer to the root may have become unsafe (then they are removed).
    fn rename(&mut self, from: &RelPath, to: &RelPath, pos: Option<Position>) -> Result<ApplyOutcome, ApplyError> {
        let redo = self.skipped.redo(pos);
        if !redo && from != to && self.skipped.contains(from) {
            // The source renamed a link this target left out: nothing of it is here to move.
            self.forget_writes_under(to);
            if ensure_parents(&self.root, to, false)? {
                remove_any(&to.under(&self.root))?;
            }
            let moved = self.skipped.take_under(from);
            self.skipped.remove_under(to);
            self.place_moved(from, to, moved)?;
            self.save_skipped(pos)?;
            return Ok(ApplyOutcome::default());
        }
        let outcome = self.rename_tree(from, to)?;
        if self.skipped.is_empty() && !self.ctx.opts.safe_links {
            return Ok(outcome);
        }
        if !redo {
            // Tree first (links restored), then the set's file, then the links it now lists
            // go (see `safe_links` for why this order is safe to redo).
            let moved = self.skipped.take_under(from);
            let mut changed = !moved.is_empty();
            changed |= self.skipped.remove_under(to);
            self.place_moved(from, to, moved)?;
            if self.ctx.opts.safe_links && to.depth() < from.depth() {
                for (rel, link) in self.find_unsafe(Some(to))? {
                    self.skip_link(&rel, link);
                    changed = true;
                }
            }
            if changed {
                self.save_skipped(pos)?;
            }
        }
        self.enforce_skipped(Some(to))?;
        Ok(outcome)
    }

    fn rename_tree(&mut self, from: &RelPath, to: &RelPath) -> Result<ApplyOutcome, ApplyError> {
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
            // (A link left out at the destination is there, as far as this target goes.)
            if !dst_exists && !self.skipped.contains(to) {
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

    /// Mode, owner and extended attributes of an existing path (a symlink: owner only).
    fn setattr(&mut self, rel: &RelPath, mode: u32, meta: Option<&Meta>) -> Result<ApplyOutcome, ApplyError> {
        let mut outcome = ApplyOutcome::default();
        if self.skipped.contains(rel) {
            // A link this target leaves out: nothing here to change.
            return Ok(outcome);
        }
        let path = rel.under(&self.root);
        let found = if ensure_parents(&self.root, rel, false)? {
            lstat(&path).map_err(io_err(format!("inspect {}", path.display())))?
        } else {
            None
        };
        match found {
            Some(m) => {
                let node = Node::Path { path: &path, symlink: m.file_type().is_symlink() };
                self.ctx.apply(&node, rel, meta, Some(mode))?;
            }
            None => outcome.repairs.push((rel.clone(), "chmod of a missing path".into())),
        }
        Ok(outcome)
    }

    fn symlink(
        &mut self,
        rel: &RelPath,
        target: &[u8],
        meta: Option<Meta>,
        pos: Option<Position>,
    ) -> Result<ApplyOutcome, ApplyError> {
        self.forget_writes_under(rel);
        let redo = self.skipped.redo(pos);
        let before = if redo { Vec::new() } else { self.skipped.take_under(rel) };
        if self.ctx.opts.safe_links && symlink_escapes(rel, target) {
            // Whatever was at the path is stale on the source; drop it rather than keep an
            // old version the source no longer has.
            if ensure_parents(&self.root, rel, false)? {
                remove_any(&rel.under(&self.root))?;
            }
            if !redo {
                let link =
                    SkippedLink { target: target.to_vec(), owner: meta.map(|m| Meta { xattrs: Vec::new(), ..m }) };
                let same = before.len() == 1 && before[0].0 == *rel && before[0].1 == link;
                if before.iter().any(|(p, _)| p == rel) {
                    // Skipped already (re-sent): not logged again.
                    self.skipped.insert(rel, link);
                } else {
                    self.skip_link(rel, link);
                }
                if !same {
                    self.save_skipped(pos)?;
                }
            }
            return Ok(ApplyOutcome::default());
        }
        self.make_symlink(rel, target, meta.as_ref())?;
        if !before.is_empty() {
            self.save_skipped(pos)?;
        }
        Ok(ApplyOutcome::default())
    }

    /// Creates (or replaces) the symlink at `rel`.
    fn make_symlink(&self, rel: &RelPath, target: &[u8], meta: Option<&Meta>) -> Result<(), ApplyError> {
        ensure_parents(&self.root, rel, true)?;
        let path = rel.under(&self.root);
        // Built beside and renamed over, so the path never goes missing for readers when it
        // replaces a file or another symlink.
        let tmp = staging_path(&self.root, rel, "symlink");
        remove_any(&tmp)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &tmp)
            .map_err(io_err(format!("create symlink {}", tmp.display())))?;
        self.ctx.apply(&Node::Path { path: &tmp, symlink: true }, rel, meta, None)?;
        if lstat(&path).map_err(io_err(format!("inspect {}", path.display())))?.is_some_and(|m| m.is_dir()) {
            remove_any(&path)?;
        }
        fs::rename(&tmp, &path).map_err(io_err(format!("install symlink {}", path.display())))?;
        Ok(())
    }

    /// `rel` becomes another name of the regular file `target` (a hard link; with
    /// `hard_links = false`, a copy of it). A target that is missing or not a regular file
    /// (the tree changed since on the source) asks for `rel`'s content instead.
    fn link(&mut self, rel: &RelPath, target: &RelPath) -> Result<ApplyOutcome, ApplyError> {
        self.forget_writes_under(rel);
        let tpath = target.under(&self.root);
        let target_ok = |root: &Path| -> Result<bool, ApplyError> {
            Ok(ensure_parents(root, target, false)?
                && lstat(&tpath)
                    .map_err(io_err(format!("inspect {}", tpath.display())))?
                    .is_some_and(|m| m.file_type().is_file()))
        };
        let repair = || ApplyOutcome {
            repairs: vec![(rel.clone(), "hard link target missing or not a regular file".into())],
            ..Default::default()
        };
        if !target_ok(&self.root)? {
            return Ok(repair());
        }
        ensure_parents(&self.root, rel, true)?;
        // Making `rel`'s directories may have replaced a non-directory in the way, the target
        // itself if the source's tree changed since: look again.
        if !target_ok(&self.root)? {
            return Ok(repair());
        }
        let path = rel.under(&self.root);
        let tmp = staging_path(&self.root, rel, "link");
        remove_any(&tmp)?;
        let linked = self.ctx.opts.hard_links
            && match fs::hard_link(&tpath, &tmp) {
                Ok(()) => true,
                // The inode has all the links it can take: a copy keeps the content right.
                Err(e) if e.raw_os_error() == Some(libc::EMLINK) => false,
                Err(e) => return Err(io_err(format!("link {} to {}", tmp.display(), tpath.display()))(e)),
            };
        if !linked {
            self.copy_for_link(&tpath, &tmp, rel)?;
        }
        if lstat(&path).map_err(io_err(format!("inspect {}", path.display())))?.is_some_and(|m| m.is_dir()) {
            remove_any(&path)?;
        }
        fs::rename(&tmp, &path).map_err(io_err(format!("install {}", path.display())))?;
        // rename(2) between two names of one file does nothing (a redo after a crash finds
        // `rel` linked already): the staging name must go itself.
        remove_any(&tmp)?;
        Ok(ApplyOutcome::default())
    }

    /// A copy of `src` at `tmp` with its owner, attributes, mode and mtime, holes kept.
    fn copy_for_link(&self, src: &Path, tmp: &Path, rel: &RelPath) -> Result<(), ApplyError> {
        let ctx = || format!("copy {} for {rel}", src.display());
        let from = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(src).map_err(io_err(ctx()))?;
        let to = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(io_err(ctx()))?;
        copy_keeping_holes(&from, &to).map_err(io_err(ctx()))?;
        if !self.ctx.opts.sparse {
            let len = to.metadata().map_err(io_err(ctx()))?.len();
            fill_holes(&to, len).map_err(io_err(ctx()))?;
        }
        self.ctx.copy_attrs(&from, &to, rel)
    }

    /// A FIFO (`specials`) or device node (`devices`) at `rel`. Switched off, or refused by
    /// the system (devices need CAP_MKNOD): counted, and whatever was at the path goes (the
    /// source has something else there now).
    fn special(
        &mut self,
        rel: &RelPath,
        kind: SpecialKind,
        mode: u32,
        rdev: u64,
        meta: Option<&Meta>,
    ) -> Result<ApplyOutcome, ApplyError> {
        self.forget_writes_under(rel);
        let opts = self.ctx.opts;
        let (what, wanted, format, key) = match kind {
            SpecialKind::Fifo => (What::Fifo, opts.specials, libc::S_IFIFO, "specials"),
            SpecialKind::CharDevice => (What::Device, opts.devices, libc::S_IFCHR, "devices"),
            SpecialKind::BlockDevice => (What::Device, opts.devices, libc::S_IFBLK, "devices"),
        };
        let path = rel.under(&self.root);
        let clear = |root: &Path| -> Result<(), ApplyError> {
            if ensure_parents(root, rel, false)? {
                remove_any(&path)?;
            }
            Ok(())
        };
        if !wanted {
            clear(&self.root)?;
            self.ctx.report.left_out(what, rel, &format!("{key} = false"));
            return Ok(ApplyOutcome::default());
        }
        ensure_parents(&self.root, rel, true)?;
        let tmp = staging_path(&self.root, rel, "special");
        remove_any(&tmp)?;
        let c = CString::new(tmp.as_os_str().as_bytes())
            .map_err(|_| ApplyError::Refused(format!("staging path for {rel} with NUL")))?;
        // SAFETY: `c` is a valid C string for the duration of the call.
        if unsafe { libc::mknod(c.as_ptr(), format | 0o600, rdev as libc::dev_t) } != 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
            ) {
                return Err(io_err(format!("create {}", tmp.display()))(e));
            }
            clear(&self.root)?;
            let fix = if what == What::Device {
                "run the receiver as root with CAP_MKNOD (not possible in most containers), or set devices = false \
                 for this target"
            } else {
                "put the standby on a filesystem with FIFOs, or set specials = false for this target"
            };
            self.ctx.report.not_applied(what, rel, &format!("mknod: {e}"), fix);
            return Ok(ApplyOutcome::default());
        }
        self.ctx.apply(&Node::Path { path: &tmp, symlink: false }, rel, meta, Some(mode))?;
        if lstat(&path).map_err(io_err(format!("inspect {}", path.display())))?.is_some_and(|m| m.is_dir()) {
            remove_any(&path)?;
        }
        fs::rename(&tmp, &path).map_err(io_err(format!("install {}", path.display())))?;
        Ok(ApplyOutcome::default())
    }

    /// Puts skipped links a rename moved from below `from` to below `to`: created where they
    /// are safe now, else still skipped (not logged again).
    fn place_moved(
        &mut self,
        from: &RelPath,
        to: &RelPath,
        moved: Vec<(RelPath, SkippedLink)>,
    ) -> Result<(), ApplyError> {
        for (rel, link) in moved {
            let rel = rel.rebase(from, to);
            if self.ctx.opts.safe_links && symlink_escapes(&rel, &link.target) {
                self.skipped.insert(&rel, link);
            } else {
                info!(target = %self.root.display(), path = %rel, "a skipped symlink is safe where a rename put it; created");
                self.make_symlink(&rel, &link.target, link.owner.as_ref())?;
            }
        }
        Ok(())
    }

    /// Symlinks at or below `top` (the whole tree for `None`) whose target leads outside the
    /// root from where they are, with what is needed to create them again.
    fn find_unsafe(&self, top: Option<&RelPath>) -> Result<Vec<(RelPath, SkippedLink)>, ApplyError> {
        let mut links = Vec::new();
        match top {
            None => collect_symlinks(&self.root, None, &mut links)?,
            Some(rel) => {
                if !ensure_parents(&self.root, rel, false)? {
                    return Ok(Vec::new());
                }
                let path = rel.under(&self.root);
                match lstat(&path).map_err(io_err(format!("inspect {}", path.display())))? {
                    Some(m) if m.file_type().is_symlink() => links.push(rel.clone()),
                    Some(m) if m.is_dir() => collect_symlinks(&path, Some(rel), &mut links)?,
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        for rel in links {
            let path = rel.under(&self.root);
            let ctx = || format!("inspect symlink {}", path.display());
            let target = fs::read_link(&path).map_err(io_err(ctx()))?.into_os_string().into_vec();
            if !symlink_escapes(&rel, &target) {
                continue;
            }
            let m = fs::symlink_metadata(&path).map_err(io_err(ctx()))?;
            let owner = Some(Meta { uid: m.uid(), gid: m.gid(), ..Default::default() });
            out.push((rel, SkippedLink { target, owner }));
        }
        Ok(out)
    }

    /// Records a link as skipped, logging it at WARN (once: when it becomes skipped).
    fn skip_link(&mut self, rel: &RelPath, link: SkippedLink) {
        let target = String::from_utf8_lossy(&link.target).into_owned();
        if self.skipped.insert(rel, link) {
            warn!(
                target = %self.root.display(), path = %rel, link_target = %target,
                "symlink left out: it leads outside the tree and safe_links is on (counted in \
                 lockstep_receiver_symlinks_skipped and the receiver's status)"
            );
        }
    }

    /// Removes the symlinks the skipped set lists at or below `top` (everywhere for `None`),
    /// where the tree still has them: the set's file is written before they go.
    fn enforce_skipped(&mut self, top: Option<&RelPath>) -> Result<(), ApplyError> {
        let listed: Vec<RelPath> = match top {
            None => self.skipped.all(),
            Some(top) => self.skipped.under(top),
        };
        for rel in listed {
            if !ensure_parents(&self.root, &rel, false)? {
                continue;
            }
            let path = rel.under(&self.root);
            if lstat(&path)
                .map_err(io_err(format!("inspect {}", path.display())))?
                .is_some_and(|m| m.file_type().is_symlink())
            {
                remove_any(&path)?;
            }
        }
        Ok(())
    }

    /// Brings the tree and the skipped set in line with `safe_links` when the option changed
    /// since the set was kept (or the tree comes from a receiver before 0.4.0), and makes sure
    /// no link the set lists is in the tree.
    fn reconcile_links(&mut self) -> Result<(), ApplyError> {
        let safe = self.ctx.opts.safe_links;
        if self.position().is_none() {
            // A resync comes first, and starts from an empty set.
            if !self.skipped.is_empty() || self.skipped.kept_safe != safe {
                self.skipped.reset(safe);
                self.skipped.changed(None, false)?;
            }
            return Ok(());
        }
        if safe && !self.skipped.kept_safe {
            info!(target = %self.root.display(), "safe_links is on: removing the symlinks that lead outside the tree");
            for (rel, link) in self.find_unsafe(None)? {
                self.skip_link(&rel, link);
            }
            self.skipped.kept_safe = true;
            self.skipped.changed(None, false)?;
            self.skipped.sync()?;
        } else if !safe && (self.skipped.kept_safe || !self.skipped.is_empty()) {
            let all = self.skipped.take_all();
            info!(target = %self.root.display(), links = all.len(), "safe_links is off: creating the symlinks it left out");
            for (rel, link) in all {
                self.make_symlink(&rel, &link.target, link.owner.as_ref())?;
            }
            syncfs(&self.root)?;
            self.skipped.kept_safe = false;
            self.skipped.changed(None, false)?;
            self.skipped.sync()?;
        }
        if safe {
            self.enforce_skipped(None)?;
        }
        Ok(())
    }

    /// The set changed by the change at `pos`: written (at the end, during a resync) and
    /// reported.
    fn save_skipped(&mut self, pos: Option<Position>) -> Result<(), ApplyError> {
        self.skipped.changed(pos, self.resync.is_some())?;
        self.report_skipped();
        Ok(())
    }

    fn report_skipped(&self) {
        self.ctx.report.skipped_symlinks(self.skipped.len(), self.skipped.paths());
    }

    /// What a change that is not a symlink or a rename does to the skipped set: a path that
    /// becomes a file, directory, hard link or special file (or goes) is no skipped link.
    fn unskip(&mut self, op: &FsOp, pos: Option<Position>) -> Result<(), ApplyError> {
        if self.skipped.is_empty() || self.skipped.redo(pos) {
            return Ok(());
        }
        let changed = match op {
            FsOp::Write(w) => self.skipped.remove_under(&w.path),
            // An existing directory keeps what is below it.
            FsOp::Mkdir { path, .. } => self.skipped.remove(path),
            FsOp::Remove { path } | FsOp::Link { path, .. } | FsOp::Special { path, .. } => {
                self.skipped.remove_under(path)
            }
            FsOp::Symlink { .. } | FsOp::Rename { .. } | FsOp::SetAttr { .. } => false,
        };
        if changed {
            self.save_skipped(pos)?;
        }
        Ok(())
    }

    /// Applies one change (see [`Applier::apply`]); `pos` is its journal position (`None` for
    /// resync entries).
    fn apply_change(&mut self, change: Change, pos: Option<Position>) -> Result<ApplyOutcome, ApplyError> {
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
        self.unskip(&op, pos)?;
        let Some(pool) = &mut self.pool else {
            return self.apply_fs(op, pos);
        };
        let mut outcome = match op {
            FsOp::Write(w) => {
                pool.dispatch(w, &mut self.writer);
                ApplyOutcome::default()
            }
            other => {
                // A barrier: see `pool`.
                self.settle()?;
                self.apply_fs(other, pos)?
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
        let pos = self.journal.filter(|_| seq > Seq::ZERO).map(|journal_id| Position { journal_id, seq });
        let outcome = self.apply_change(change, pos)?;
        if let Some(pos) = pos {
            self.mark.repairs.extend(outcome.repairs.iter().cloned());
            self.mark.record(pos)?;
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
        // The snapshot says again which links are left out.
        self.skipped.reset(self.ctx.opts.safe_links);
        self.skipped.changed(None, false)?;
        self.report_skipped();
        self.resync = Some(HashSet::new());
        if self.pool.is_none() {
            self.pool = Some(Pool::new(self.root.clone(), apply_threads(), self.ctx.clone()));
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
        let mut own =
            vec![self.position_file.clone(), self.position_file.with_extension("tmp"), mark_path(&self.position_file)];
        own.extend(self.skipped.own_files());
        self.prune(&self.root, None, &keep, &live, &own)?;
        self.skipped.write()
    }

    fn take_deferred(&mut self) -> ApplyOutcome {
        std::mem::take(&mut self.deferred)
    }

    fn prepare_commit(&mut self, pos: Position) -> Result<Option<CommitFn>, ApplyError> {
        self.settle()?;
        // A committed position must not cover a set of skipped links that is not durable (it
        // changes rarely: usually nothing to do).
        self.skipped.sync()?;
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
            self.skipped.sync()?;
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

/// The skipped symlinks live beside the position file.
fn skipped_path(position_file: &Path) -> PathBuf {
    let mut name = position_file.as_os_str().to_owned();
    name.push(".skipped");
    PathBuf::from(name)
}

/// Every symlink below the real directory `dir` (`prefix` its path in the tree), without
/// following any; staging files are not part of the tree.
fn collect_symlinks(dir: &Path, prefix: Option<&RelPath>, out: &mut Vec<RelPath>) -> Result<(), ApplyError> {
    let entries = fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
        let name = entry.file_name();
        let name = name.as_bytes();
        if name.ends_with(STAGING_SUFFIX.as_bytes()) {
            continue;
        }
        let rel = match prefix {
            None => RelPath::new(name.to_vec()),
            Some(p) => RelPath::new([p.as_bytes(), b"/", name].concat()),
        };
        let Ok(rel) = rel else { continue };
        let ft = entry.file_type().map_err(io_err(format!("inspect {}", entry.path().display())))?;
        if ft.is_symlink() {
            out.push(rel);
        } else if ft.is_dir() {
            collect_symlinks(&entry.path(), Some(&rel), out)?;
        }
    }
    Ok(())
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
