//! The fs source's engine: a single blocking thread that owns the index and decides every
//! change by comparing the disk with it — for watcher hints, reconciliation scans, and repair
//! requests alike — then journals the ops in the order decided and, once they are durable,
//! updates the index.
//!
//! Journal appends happen from this thread with `futures::executor::block_on` (the append
//! future only talks to the journal writer through channels). Ops are gathered and appended in
//! groups (at most `GROUP_BYTES`), so scans do not pay one flush per file and a large file is
//! never held in memory.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_common::event::{Change, FsOp, Meta};
use lockstep_common::relpath::RelPath;
use tokio_util::sync::CancellationToken;

use super::content::{self, Plan};
use super::index::{Attrs, Entry, Index, Kind};
use super::links::Links;
use super::meta::{self, Names};
use super::walk::{list_dir, Filter};
use super::watch::{Batch, Hint, Msg};
use crate::journal::{JournalHandle, NewRecord};
use crate::source::{RepairRequest, ResyncFloor, SourceError, SourceState, SourceStatus};

/// How long to keep gathering watcher events after the first one before acting. Short: the
/// write-to-visible budget is tens of milliseconds end to end.
const COALESCE: Duration = Duration::from_millis(5);
/// Most events gathered into one batch, so a storm still makes steady progress.
const MAX_BATCH_EVENTS: usize = 20_000;
/// Payload bytes gathered before a journal append.
const GROUP_BYTES: usize = 16 << 20;
/// Records gathered before a journal append (bounds the staged index updates too).
const GROUP_RECORDS: usize = 2048;
/// Reconciliation scan period once the inotify watch limit was hit.
const FALLBACK_SCAN: Duration = Duration::from_secs(2);

type R<T> = Result<T, SourceError>;

/// What `sync_entry` found.
#[derive(PartialEq, Eq)]
enum Synced {
    Other,
    /// A directory that was already indexed.
    Dir,
    /// A directory that was not (its content must be walked).
    NewDir,
}

pub(crate) struct Engine {
    pub(crate) name: Arc<str>,
    pub(crate) root: PathBuf,
    pub(crate) filter: Arc<Filter>,
    pub(crate) index: Index,
    pub(crate) db: sled::Db,
    pub(crate) journal: JournalHandle,
    pub(crate) status: Arc<SourceStatus>,
    pub(crate) cancel: CancellationToken,
    pub(crate) rescan_interval: Duration,
    /// The watcher must live as long as the engine; `None` when it could not be started.
    pub(crate) watcher: Option<notify::RecommendedWatcher>,
    /// The inotify watch limit was hit: events may be missing, so scan every `FALLBACK_SCAN`.
    pub(crate) fallback: bool,
    /// Building the baseline index: nothing is journaled.
    silent: bool,
    pending: Vec<NewRecord>,
    pending_bytes: usize,
    /// New paths (no committed index entry) that the pending ops create; see `flush`.
    markers: Vec<RelPath>,
    /// Paths already compared in the current batch: later hints for them are redundant
    /// (anything that changed after the comparison produces a new event).
    done: HashSet<RelPath>,
    resync_floor: Arc<ResyncFloor>,
    /// A first index was begun by an earlier run and never finished: receivers seeded
    /// meanwhile must be seeded again (see `prepare_baseline`).
    reseed: bool,
    /// Snapshots started, as last seen (see `in_snapshot_shadow`).
    snapshots_seen: u64,
    /// Until then, a path gone from disk that the index does not know is removed anyway.
    shadow_until: Instant,
    /// User and group names, looked up once.
    names: Names,
    /// The names of files with several hard links.
    links: Links,
    /// Sockets already counted as skipped.
    sockets_seen: HashSet<RelPath>,
    /// Re-sending a path in full (a repair): its content goes out, not a link to another name.
    sending_whole: bool,
    /// Directories the first index journaled (see [`Engine::sync_entry`]): everything below
    /// them is journaled too (a tree moved in keeps its children's old ctimes).
    loud_dirs: HashSet<RelPath>,
    /// Paths the first index journaled.
    loud_count: u64,
}

/// Margin before the first snapshot's start for [`Engine::sync_entry`]: the kernel stamps
/// ctime from a coarse clock that lags the real time by up to a tick (10 ms at 100 Hz).
/// Journaling a path that changed a moment before the snapshot started costs only a resend.
const CUTOFF_MARGIN_NS: i64 = 50_000_000;

/// How long after the engine last saw a snapshot running (or learnt that one ran) it still
/// treats vanished unknown paths as possibly sent by it; covers the watcher's events of
/// changes made during the snapshot that are still on their way.
const SNAPSHOT_SHADOW: Duration = Duration::from_secs(5);

/// Makes the calling thread idle-priority (nice 19). Best effort: failure changes only speed.
fn lower_thread_priority() {
    // SAFETY: plain syscalls on the calling thread; no memory is passed.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || e.raw_os_error() == Some(libc::ENOTDIR)
        || e.raw_os_error() == Some(libc::ELOOP)
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: Arc<str>,
        root: PathBuf,
        filter: Arc<Filter>,
        index: Index,
        db: sled::Db,
        journal: JournalHandle,
        status: Arc<SourceStatus>,
        cancel: CancellationToken,
        rescan_interval: Duration,
        resync_floor: Arc<ResyncFloor>,
    ) -> Engine {
        Engine {
            name,
            root,
            filter,
            index,
            db,
            journal,
            status,
            cancel,
            rescan_interval,
            watcher: None,
            fallback: false,
            silent: false,
            pending: Vec::new(),
            pending_bytes: 0,
            markers: Vec::new(),
            done: HashSet::new(),
            snapshots_seen: 0,
            shadow_until: Instant::now(),
            resync_floor,
            reseed: false,
            names: Names::default(),
            links: Links::default(),
            sockets_seen: HashSet::new(),
            sending_whole: false,
            loud_dirs: HashSet::new(),
            loud_count: 0,
        }
    }

    /// Before any snapshot may read the tree: records durably that a first index is begun,
    /// or learns that an earlier one was cut short. In that case a receiver may hold a
    /// snapshot taken back then, and the changes made since (seen only by the lost run's
    /// watcher) would never reach it: it is seeded again.
    pub(crate) fn prepare_baseline(&mut self) -> R<()> {
        let done = self.index.baseline_done();
        if self.ix(done)? {
            return Ok(());
        }
        let started = self.index.baseline_started();
        if self.ix(started)? {
            self.reseed = true;
        } else {
            let r = self.index.set_baseline_started(&self.db);
            self.ix(r)?;
        }
        Ok(())
    }

    /// Raises the resync floor past everything journaled, journals a record above it (a
    /// removal of a path that does not exist, a no-op on receivers) and has the shippers
    /// re-decide: every receiver is seeded from a new snapshot.
    fn reseed_receivers(&mut self) -> R<()> {
        let floor = self.resync_floor.raise(&self.name).map_err(|e| SourceError::Journal(e, self.name.to_string()))?;
        let mut marker = RelPath::new(b".lockstep-reseed".to_vec()).expect("a valid path");
        let mut n = 0u32;
        while std::fs::symlink_metadata(marker.under(&self.root)).is_ok() {
            n += 1;
            marker = RelPath::new(format!(".lockstep-reseed-{n}").into_bytes()).expect("a valid path");
        }
        self.emit(FsOp::Remove { path: marker })?;
        self.flush()?;
        self.resync_floor.kick();
        tracing::warn!(
            floor = floor.0,
            "the first index was cut short by a stop of the agent; every receiver is seeded again"
        );
        Ok(())
    }

    /// Whether a snapshot may have sent a path that the index never knew. A snapshot reads the
    /// disk on its own, concurrently: a file created and deleted while it runs (before the
    /// engine looked at it, or before the first index was built) can be in the snapshot
    /// without ever being indexed, and its deletion would otherwise journal nothing, leaving
    /// it on the standby.
    fn in_snapshot_shadow(&mut self) -> bool {
        let (active, started) = self.status.snapshots();
        let now = Instant::now();
        if active > 0 || started != self.snapshots_seen {
            self.snapshots_seen = started;
            self.shadow_until = now + SNAPSHOT_SHADOW;
        }
        now < self.shadow_until
    }

    fn ix<T>(&self, r: sled::Result<T>) -> R<T> {
        r.map_err(|error| SourceError::Index { source_name: self.name.to_string(), error })
    }

    fn rel(&self, abs: &Path) -> Option<RelPath> {
        match RelPath::from_under(&self.root, abs)? {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(path = %abs.display(), error = %e, "skipping a path that cannot be replicated");
                None
            }
        }
    }

    // ---- journaling ----

    fn emit(&mut self, op: FsOp) -> R<()> {
        if self.silent {
            return Ok(());
        }
        let created = match &op {
            FsOp::Write(w) if w.first => Some(&w.path),
            FsOp::Mkdir { path, .. } | FsOp::Symlink { path, .. } => Some(path),
            FsOp::Rename { to, .. } => Some(to),
            _ => None,
        };
        if let Some(p) = created {
            let known = self.index.committed(p);
            if !self.ix(known)? {
                self.markers.push(p.clone());
            }
        }
        tracing::trace!(op = %op, "journal");
        let payload = Change::Fs(op).encode();
        self.pending_bytes += payload.len();
        self.pending.push(NewRecord { source: self.name.clone(), captured_at_us: lockstep_common::now_us(), payload });
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> R<()> {
        if self.pending_bytes >= GROUP_BYTES
            || self.pending.len() >= GROUP_RECORDS
            || self.index.staged_len() >= GROUP_RECORDS
        {
            self.flush()?;
        }
        Ok(())
    }

    /// Appends the gathered ops, waits until they are durable, then commits the staged index
    /// updates. Not interruptible: once started, it finishes or fails.
    ///
    /// Before the append, every new path the ops create gets a "stale" index entry, written
    /// into the same sled database ahead of the journal records: sled recovers a prefix of its
    /// log, so if a crash loses the index updates that follow the append, the markers survive
    /// whenever the records did. The next scan then finds "something may exist here on the
    /// standby" for those paths and re-sends or removes them. Without markers, a path created
    /// and shipped just before a crash, and gone from disk afterwards (a temp file renamed away,
    /// say), would stay on the standby forever, because the old index and the disk agree.
    fn flush(&mut self) -> R<()> {
        if !self.markers.is_empty() {
            let markers = std::mem::take(&mut self.markers);
            let r = self.index.put_stale_markers(&markers);
            self.ix(r)?;
        }
        if !self.pending.is_empty() {
            let records = std::mem::take(&mut self.pending);
            self.pending_bytes = 0;
            let n = records.len() as u64;
            let metas = futures::executor::block_on(self.journal.append(records))
                .map_err(|e| SourceError::Journal(e, self.name.to_string()))?;
            if let Some(last) = metas.last() {
                self.status.journaled(last.seq, n);
            }
        }
        if self.index.has_staged() {
            let r = self.index.commit();
            self.ix(r)?;
        }
        Ok(())
    }

    fn remove(&mut self, rel: &RelPath, kind: Kind) -> R<()> {
        self.emit(FsOp::Remove { path: rel.clone() })?;
        self.index.stage_remove(rel, kind);
        self.done.insert(rel.clone());
        Ok(())
    }

    // ---- the main loop ----

    /// Runs until cancelled. Builds the baseline index on first start, reconciles on later
    /// starts, then follows watcher events.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) -> R<()> {
        let r = self.run_inner(rx);
        if let Err(e) = &r {
            self.status.set_state(SourceState::Error, Some(e.to_string()));
        }
        r
    }

    fn run_inner(&mut self, rx: Receiver<Msg>) -> R<()> {
        let baseline = self.index.baseline_done();
        if !self.ix(baseline)? {
            self.status.set_state(SourceState::Snapshot, None);
            if std::mem::take(&mut self.reseed) {
                self.reseed_receivers()?;
            }
            self.wait_for_first_snapshots();
            let t = Instant::now();
            let cleared = self.index.clear();
            self.ix(cleared)?;
            self.silent = true;
            // When the baseline reads and hashes the whole tree while receivers are still
            // being seeded from the same files, at idle priority it takes only the CPU they
            // leave, so the first copy reaches the standbys sooner. Only then: on a host busy
            // with other work, an idle-priority baseline would crawl, and changes are journaled
            // only once it is done. (A scoped thread: niceness is per thread, and this engine
            // thread comes from tokio's blocking pool.)
            let seeding = self.status.snapshots().0 > 0;
            let done = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        if seeding {
                            lower_thread_priority();
                        }
                        self.reconcile(None)
                    })
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })?;
            self.silent = false;
            self.done.clear();
            self.loud_dirs.clear();
            if !done {
                return Ok(());
            }
            if self.loud_count > 0 {
                tracing::info!(
                    paths = self.loud_count,
                    "paths changed since the first snapshot started were journaled while the first index was built"
                );
            }
            let r = self.index.set_baseline_done(&self.db);
            self.ix(r)?;
            if !self.resend_changed_during_baseline(&rx)? {
                return Ok(());
            }
            tracing::info!(elapsed_ms = t.elapsed().as_millis() as u64, "baseline index built");
        } else {
            self.status.set_state(SourceState::Streaming, None);
            self.full_scan("start-up")?;
        }
        self.status.set_state(SourceState::Streaming, None);

        let mut next_scan = self.next_scan_deadline();
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            let timeout =
                next_scan.map(|d| d.saturating_duration_since(Instant::now())).unwrap_or(Duration::from_secs(3600));
            let first = match rx.recv_timeout(timeout) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    if next_scan.is_some_and(|d| d <= Instant::now()) {
                        self.full_scan(if self.fallback { "watch limit fallback" } else { "periodic" })?;
                        next_scan = self.next_scan_deadline();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let mut batch = Batch::default();
            batch.add(first);
            let window_end = Instant::now() + COALESCE;
            while !batch.stop && batch.events < MAX_BATCH_EVENTS {
                let left = window_end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(m) => batch.add(m),
                    Err(_) => break,
                }
            }
            if batch.stop {
                return Ok(());
            }
            if self.process(batch)? {
                next_scan = self.next_scan_deadline();
            }
        }
    }

    fn next_scan_deadline(&self) -> Option<Instant> {
        let mut every = (!self.rescan_interval.is_zero()).then_some(self.rescan_interval);
        if self.fallback || self.watcher.is_none() {
            every = Some(every.map_or(FALLBACK_SCAN, |e| e.min(FALLBACK_SCAN)));
        }
        every.map(|e| Instant::now() + e)
    }

    /// Handles one batch; returns whether a full scan ran.
    fn process(&mut self, mut batch: Batch) -> R<bool> {
        let mut scanned = false;
        if batch.watch_limit && !self.fallback {
            tracing::warn!(
                "inotify watch limit reached (fs.inotify.max_user_watches); changes in unwatched directories are \
                 caught by reconciliation scans every {}s until it is raised, e.g. `sysctl -w fs.inotify.max_user_watches=1048576`",
                FALLBACK_SCAN.as_secs()
            );
            self.fallback = true;
            batch.rescan = true;
        }
        if batch.rescan {
            if batch.overflow {
                tracing::warn!(
                    "inotify event queue overflowed; running a full reconciliation scan (raise fs.inotify.max_queued_events, \
                     e.g. `sysctl -w fs.inotify.max_queued_events=1048576`)"
                );
            }
            self.full_scan("watcher overflow")?;
            scanned = true;
        } else {
            for (from, to) in std::mem::take(&mut batch.renames) {
                let ok = match (self.rel(&from), self.rel(&to)) {
                    (Some(f), Some(t)) => self.try_rename(&f, &t)?,
                    _ => false,
                };
                if !ok {
                    batch.hints.entry(from).or_default().content = true;
                }
                let h = batch.hints.entry(to).or_default();
                h.content = true;
                h.subtree = true;
            }
            if batch.watches_changing {
                self.catch_up_with_watcher();
            }
            let mut hints: Vec<(RelPath, Hint)> =
                batch.hints.drain().filter_map(|(p, h)| self.rel(&p).map(|r| (r, h))).collect();
            // Sorted, parents come before their children.
            hints.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (rel, h) in hints {
                if self.cancel.is_cancelled() {
                    return Ok(scanned);
                }
                self.sync_path(&rel, h)?;
            }
        }
        for r in std::mem::take(&mut batch.repairs) {
            self.repair(r)?;
        }
        self.flush()?;
        self.done.clear();
        Ok(scanned)
    }

    /// Waits until the watcher has finished handling the events it handed on so far. Called
    /// before new directories are walked: notify hands on a directory's creation before it
    /// adds the watch on it, and what is created inside before then reports nothing. And
    /// before the destinations of moves are compared with the disk: notify's inotify backend
    /// learns of a moved directory only when its thread handles the move, and until then it
    /// reports changes inside the directory under the old path (which the engine cannot place),
    /// then none at all until it has re-registered the watches under the new path. A
    /// comparison made before that could miss a change made in that window, for good (a
    /// deleted file would stay on the standby). Made after it, it sees every such change; later
    /// ones come with their right paths. notify's thread handles requests in turn with the
    /// kernel's events, after the batch of events that held the move (the watch updates
    /// included): a request that changes nothing, answered, shows that it is done.
    fn catch_up_with_watcher(&mut self) {
        if let Some(w) = self.watcher.as_mut() {
            use notify::Watcher as _;
            let _ = w.configure(notify::Config::default());
        }
    }

    fn full_scan(&mut self, why: &str) -> R<()> {
        let t = Instant::now();
        tracing::info!(why, "reconciliation scan started");
        let done = self.reconcile(None)?;
        self.flush()?;
        self.done.clear();
        tracing::info!(
            why,
            completed = done,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "reconciliation scan finished"
        );
        Ok(())
    }

    // ---- deciding changes ----

    /// A rename seen by the watcher: one `Rename` op (moving the index subtree) when the old
    /// path is indexed and gone. Returns false when it must be handled as plain hints.
    fn try_rename(&mut self, from: &RelPath, to: &RelPath) -> R<bool> {
        if from == to || to.starts_with(from) || self.filter.out_of_scope(from) || self.filter.out_of_scope(to) {
            return Ok(false);
        }
        let old = self.index.get(from);
        if self.ix(old)?.is_none() {
            return Ok(false);
        }
        match std::fs::symlink_metadata(from.under(&self.root)) {
            Err(e) if gone(&e) => {}
            _ => return Ok(false),
        }
        if let Some(parent) = to.parent() {
            let p = self.index.get(&parent);
            if !matches!(self.ix(p)?, Some(e) if e.kind == Kind::Dir) {
                return Ok(false);
            }
        }
        // The subtree move works on committed entries: make everything before it durable.
        self.flush()?;
        self.emit(FsOp::Rename { from: from.clone(), to: to.clone() })?;
        self.flush()?;
        let r = self.index.move_subtree_now(from, to);
        self.ix(r)?;
        tracing::debug!(%from, %to, "rename");
        Ok(true)
    }

    /// Compares one path (from a hint) with the index and journals the difference.
    fn sync_path(&mut self, rel: &RelPath, hint: Hint) -> R<()> {
        if self.done.contains(rel) {
            return Ok(());
        }
        if self.filter.out_of_scope(rel) {
            let old = self.index.get(rel);
            if let Some(e) = self.ix(old)? {
                self.remove(rel, e.kind)?;
            }
            return Ok(());
        }
        if let Some(parent) = rel.parent() {
            let p = self.index.get(&parent);
            if !matches!(self.ix(p)?, Some(e) if e.kind == Kind::Dir) {
                // An unknown parent is a new directory: syncing it walks it, covering `rel`.
                return self.sync_path(&parent, Hint::default());
            }
        }
        let meta = match std::fs::symlink_metadata(rel.under(&self.root)) {
            Ok(m) => m,
            Err(e) if gone(&e) => {
                let old = self.index.get(rel);
                match self.ix(old)? {
                    Some(old) => self.remove(rel, old.kind)?,
                    // Removing what a receiver may not have is harmless.
                    None if self.in_snapshot_shadow() => {
                        self.emit(FsOp::Remove { path: rel.clone() })?;
                        self.done.insert(rel.clone());
                    }
                    None => {}
                }
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(path = %rel, error = %e, "inspect changed path");
                return Ok(());
            }
        };
        let synced = self.sync_entry(rel, &meta, hint.content)?;
        if synced == Synced::NewDir || (synced == Synced::Dir && hint.subtree) {
            self.reconcile(Some(rel))?;
        }
        Ok(())
    }

    /// Compares one existing entry with its index entry and journals the difference. With
    /// `force_content`, a file is read even when size and mtime match (a write was seen, and
    /// mtime granularity can hide it).
    ///
    /// While the first index is built (silently, as receivers are seeded from snapshots), a
    /// path that changed after a snapshot started may be in that snapshot as it was before the
    /// change, and its watcher event may be missed (a directory created before its watch
    /// existed) or arrive after the index recorded the new state: such a path is journaled
    /// (its ctime is after the first snapshot's start), and so is everything below a directory
    /// journaled this way.
    fn sync_entry(&mut self, rel: &RelPath, meta: &std::fs::Metadata, force_content: bool) -> R<Synced> {
        let changed_since_snapshot = || {
            self.status.first_snapshot_us().is_some_and(|t| {
                meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec())
                    >= t.saturating_mul(1000) - CUTOFF_MARGIN_NS
            })
        };
        if self.silent && (changed_since_snapshot() || rel.parent().is_some_and(|p| self.loud_dirs.contains(&p))) {
            self.silent = false;
            let r = self.compare_entry(rel, meta, force_content);
            self.silent = true;
            if matches!(r, Ok(Synced::NewDir | Synced::Dir)) {
                self.loud_dirs.insert(rel.clone());
            }
            self.loud_count += 1;
            return r;
        }
        self.compare_entry(rel, meta, force_content)
    }

    /// [`Engine::sync_entry`] without the first index's special case.
    fn compare_entry(&mut self, rel: &RelPath, meta: &std::fs::Metadata, force_content: bool) -> R<Synced> {
        self.done.insert(rel.clone());
        let old = self.index.get(rel);
        let mut old = self.ix(old)?;
        if old.as_ref().is_some_and(Entry::is_stale) {
            // A crash lost the index update for what the journal sent here (see `flush`): the
            // standby may hold anything at this path — say a directory renamed here, with
            // children since deleted that no index entry remembers. Clear it and send what the
            // disk has, whole.
            self.emit(FsOp::Remove { path: rel.clone() })?;
            self.index.stage_remove(rel, Kind::Dir);
            old = None;
        }
        let ft = meta.file_type();
        let abs = rel.under(&self.root);
        let mode = content::mode_of(meta);
        if ft.is_dir() {
            let m = self.names.meta_of(&abs, meta);
            let attrs = Attrs::of(&m);
            match &old {
                Some(o) if o.kind == Kind::Dir => {
                    if o.mode != mode || o.attrs != attrs {
                        self.emit(FsOp::SetAttr { path: rel.clone(), mode, meta: Some(m) })?;
                        self.index.stage_put(rel, Entry::dir(mode, attrs));
                    }
                    return Ok(Synced::Dir);
                }
                // The applier replaces a non-directory by a directory itself.
                _ => {}
            }
            self.emit(FsOp::Mkdir { path: rel.clone(), mode, meta: Some(m) })?;
            self.index.stage_put(rel, Entry::dir(mode, attrs));
            return Ok(Synced::NewDir);
        }
        if ft.is_symlink() {
            let target = match std::fs::read_link(&abs) {
                Ok(t) => std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str()).to_vec(),
                Err(e) if gone(&e) || e.kind() == io::ErrorKind::InvalidInput => {
                    // Replaced since the stat; its own event brings it back here.
                    return Ok(Synced::Other);
                }
                Err(e) => {
                    tracing::warn!(path = %rel, error = %e, "read symlink");
                    return Ok(Synced::Other);
                }
            };
            let m = self.names.meta_of(&abs, meta);
            let attrs = Attrs::of(&m);
            if let Some(o) = &old {
                if o.kind == Kind::Symlink && o.target == target {
                    if o.attrs != attrs {
                        self.emit(FsOp::SetAttr { path: rel.clone(), mode: o.mode, meta: Some(m) })?;
                        self.index.stage_put(rel, Entry::symlink(target, attrs));
                    }
                    return Ok(Synced::Other);
                }
                if o.kind == Kind::Dir {
                    self.remove(rel, Kind::Dir)?;
                }
            }
            self.emit(FsOp::Symlink { path: rel.clone(), target: target.clone(), meta: Some(m) })?;
            self.index.stage_put(rel, Entry::symlink(target, attrs));
            return Ok(Synced::Other);
        }
        if let Some(kind) = meta::special_kind(meta) {
            let m = self.names.meta_of(&abs, meta);
            let attrs = Attrs::of(&m);
            let entry = Entry::special(kind, mode, meta.rdev(), attrs);
            match &old {
                Some(o) if o.kind == entry.kind && o.rdev == entry.rdev => {
                    if o.mode != mode || o.attrs != attrs {
                        self.emit(FsOp::SetAttr { path: rel.clone(), mode, meta: Some(m) })?;
                        self.index.stage_put(rel, entry);
                    }
                }
                _ => {
                    if old.as_ref().is_some_and(|o| o.kind == Kind::Dir) {
                        self.remove(rel, Kind::Dir)?;
                    }
                    self.emit(FsOp::Special { path: rel.clone(), kind, mode, rdev: meta.rdev(), meta: Some(m) })?;
                    self.index.stage_put(rel, entry);
                }
            }
            return Ok(Synced::Other);
        }
        if !ft.is_file() {
            // Sockets mean nothing on another host (rsync skips them too without --specials).
            if self.sockets_seen.insert(rel.clone()) {
                self.status.skipped_socket();
                tracing::debug!(path = %rel, "socket not replicated");
            }
            if let Some(o) = &old {
                self.remove(rel, o.kind)?;
            }
            return Ok(Synced::Other);
        }
        let m = self.names.meta_of(&abs, meta);
        let attrs = Attrs::of(&m);
        let old_file = old.as_ref().filter(|o| o.kind == Kind::File);
        if let Some(o) = old_file {
            if !force_content && o.size == meta.len() && o.mtime_ns == content::mtime_ns_of(meta) {
                if o.mode != mode || o.attrs != attrs {
                    self.emit(FsOp::SetAttr { path: rel.clone(), mode, meta: Some(m) })?;
                    self.index.stage_put(rel, Entry { mode, attrs, ..o.clone() });
                }
                self.links.note(rel, meta);
                return Ok(Synced::Other);
            }
        }
        if let Some(o) = &old {
            if o.kind == Kind::Dir {
                self.remove(rel, Kind::Dir)?;
            }
        }
        if !self.silent && !self.sending_whole && self.link_to_other_name(rel, meta, attrs)? {
            return Ok(Synced::Other);
        }
        self.sync_file(rel, &abs, old_file.cloned(), m)?;
        Ok(Synced::Other)
    }

    /// A file with several names (hard links) whose content changed or that is new here: when
    /// another of its names already went out with exactly this content, this name becomes a
    /// hard link to it on the receivers instead of a second copy. Returns whether it did.
    fn link_to_other_name(&mut self, rel: &RelPath, meta: &std::fs::Metadata, attrs: Attrs) -> R<bool> {
        if meta.nlink() < 2 {
            return Ok(false);
        }
        for other in self.links.names(rel, meta, &self.root) {
            let e = self.index.get(&other);
            let Some(e) = self.ix(e)? else { continue };
            let sent = e.kind == Kind::File && e.size == meta.len() && e.mtime_ns == content::mtime_ns_of(meta);
            if sent && !e.is_stale() {
                self.emit(FsOp::Link { path: rel.clone(), target: other })?;
                self.index.stage_put(rel, Entry { mode: content::mode_of(meta), attrs, ..e });
                self.links.note(rel, meta);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads a file and journals its new content (a delta against `old` when there is one),
    /// with its owner and extended attributes `m`; then, for a file with several names, makes
    /// its other names links to this one again (the receiver replaced this name's inode).
    fn sync_file(&mut self, rel: &RelPath, abs: &Path, old: Option<Entry>, m: Meta) -> R<()> {
        let (mut file, fmeta) = match content::open_nofollow(abs) {
            Ok((f, md)) if md.is_file() => (f, md),
            Ok(_) => return Ok(()),
            Err(e) if gone(&e) => {
                // Vanished (or replaced by a symlink) since the stat: its own event follows.
                if old.is_some() && std::fs::symlink_metadata(abs).is_err() {
                    self.remove(rel, Kind::File)?;
                }
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(path = %rel, error = %e, "open file");
                return Ok(());
            }
        };
        let plan = match (&old, self.silent) {
            (_, true) => Plan::Record,
            (Some(o), false) => Plan::Delta(o),
            (None, false) => Plan::Full,
        };
        let attrs = Attrs::of(&m);
        let outcome = content::read_file(rel, &mut file, &fmeta, plan, true, Some(m.clone()), &mut |w| {
            self.emit(FsOp::Write(w))
        })?;
        if !outcome.emitted {
            if let Some(o) = &old {
                if o.mode != outcome.mode || o.attrs != attrs {
                    self.emit(FsOp::SetAttr { path: rel.clone(), mode: outcome.mode, meta: Some(m) })?;
                }
            }
        }
        let entry = outcome.entry(attrs);
        if old.as_ref() != Some(&entry) {
            self.index.stage_put(rel, entry.clone());
        }
        self.links.note(rel, &fmeta);
        if outcome.emitted && fmeta.nlink() > 1 {
            for other in self.links.names(rel, &fmeta, &self.root) {
                self.emit(FsOp::Link { path: other.clone(), target: rel.clone() })?;
                self.index.stage_put(&other, entry.clone());
            }
        }
        Ok(())
    }

    /// Walks the tree below `prefix` (or all of it), syncing every entry against the index,
    /// then removes index entries (journaling `Remove`) for paths no longer on disk. Returns
    /// false when cancelled part-way (nothing is removed then).
    fn reconcile(&mut self, prefix: Option<&RelPath>) -> R<bool> {
        let mut seen: HashSet<RelPath> = HashSet::new();
        // Directories that could not be listed: keep what the index says is inside them.
        let mut unlisted: Vec<RelPath> = Vec::new();
        if let Some(p) = prefix {
            seen.insert(p.clone());
        }
        let mut stack: Vec<Option<RelPath>> = vec![prefix.cloned()];
        while let Some(dir) = stack.pop() {
            if self.cancel.is_cancelled() {
                return Ok(false);
            }
            let abs = match &dir {
                Some(d) => d.under(&self.root),
                None => self.root.clone(),
            };
            let children = match list_dir(&abs, dir.as_ref(), &self.filter) {
                Ok(c) => c,
                Err(error) if dir.is_none() => {
                    return Err(SourceError::Io {
                        source_name: self.name.to_string(),
                        context: format!("list root {}", self.root.display()),
                        error,
                    })
                }
                Err(e) => {
                    if !gone(&e) {
                        tracing::warn!(dir = %abs.display(), error = %e, "list directory");
                    }
                    if let Some(d) = dir {
                        unlisted.push(d);
                    }
                    continue;
                }
            };
            let mut subdirs = Vec::new();
            for c in children {
                let meta = match std::fs::symlink_metadata(c.rel.under(&self.root)) {
                    Ok(m) => m,
                    Err(e) if gone(&e) => continue,
                    Err(e) => {
                        tracing::warn!(path = %c.rel, error = %e, "inspect path");
                        seen.insert(c.rel);
                        continue;
                    }
                };
                seen.insert(c.rel.clone());
                let synced = if self.done.contains(&c.rel) && !meta.is_dir() {
                    Synced::Other
                } else {
                    self.sync_entry(&c.rel, &meta, false)?
                };
                if synced != Synced::Other && !self.filter.prunes(&c.rel) {
                    subdirs.push(Some(c.rel));
                }
                self.maybe_flush()?;
            }
            stack.extend(subdirs.into_iter().rev());
        }
        // Whatever the index holds that the walk did not see is gone.
        self.flush()?;
        let keys = self.index.keys(prefix);
        for k in self.ix(keys)? {
            if seen.contains(&k) || unlisted.iter().any(|u| k.starts_with(u) && k != *u) {
                continue;
            }
            let e = self.index.get(&k);
            if let Some(e) = self.ix(e)? {
                self.remove(&k, e.kind)?;
                self.maybe_flush()?;
            }
        }
        self.flush()?;
        Ok(true)
    }

    /// A receiver could not reproduce `path`: journal its full current state.
    /// On first start every receiver is seeded with a snapshot that reads the whole tree; the
    /// baseline index reads and hashes it too. Letting the snapshots go first halves the work
    /// competing for CPU and disk while the standbys are filled. Waits while a snapshot runs,
    /// up to `FIRST_SNAPSHOT_WAIT`, and gives up after `FIRST_CONNECT_WAIT` if none starts (no
    /// receiver reachable). Safe because whatever changes meanwhile is re-sent in full once
    /// the baseline is built (`resend_changed_during_baseline`).
    fn wait_for_first_snapshots(&self) {
        const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(3);
        const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(60);
        let start = Instant::now();
        while !self.cancel.is_cancelled() && start.elapsed() < FIRST_SNAPSHOT_WAIT {
            let (active, started) = self.status.snapshots();
            if active == 0 && (started > 0 || start.elapsed() >= FIRST_CONNECT_WAIT) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A receiver's first snapshot runs while the baseline is built, so for a path changed
    /// meanwhile the snapshot may hold an older version than the index now records, and a
    /// later comparison would find nothing to send. Everything the watcher reported during
    /// the baseline is therefore journaled again in full (directories with their subtrees, vanished paths as
    /// removals). Returns false when asked to stop.
    fn resend_changed_during_baseline(&mut self, rx: &Receiver<Msg>) -> R<bool> {
        let mut batch = Batch::default();
        while let Ok(m) = rx.try_recv() {
            batch.add(m);
        }
        if batch.stop {
            return Ok(false);
        }
        if batch.overflow || batch.rescan {
            tracing::warn!(
                "the watcher lost events while the first index was built; changes made then may be missing on receivers seeded meanwhile until the next resync"
            );
        }
        if batch.watches_changing {
            self.catch_up_with_watcher();
        }
        let mut paths = std::collections::BTreeSet::new();
        for (from, to) in &batch.renames {
            paths.extend(self.rel(from));
            paths.extend(self.rel(to));
        }
        for abs in batch.hints.keys() {
            paths.extend(self.rel(abs));
        }
        for rel in paths {
            self.resend_subtree(&rel)?;
        }
        for req in std::mem::take(&mut batch.repairs) {
            self.repair(req)?;
        }
        self.flush()?;
        self.done.clear();
        Ok(true)
    }

    fn resend_subtree(&mut self, rel: &RelPath) -> R<()> {
        self.repair(RepairRequest { path: rel.clone(), reason: "changed while the first index was built".into() })
    }

    /// A receiver found the standby unable to follow at `req.path` (e.g. a rename whose source
    /// it lacks): sends that path again whole — a directory with everything under it, since
    /// the standby may lack all of it while the index says it was sent.
    fn repair(&mut self, req: RepairRequest) -> R<()> {
        tracing::info!(path = %req.path, reason = %req.reason, "repair requested");
        self.resend(&req.path)
    }

    /// Sends `rel` as it is on disk now, in full (no deltas), and for a directory everything
    /// under it; a path gone from disk is removed.
    fn resend(&mut self, rel: &RelPath) -> R<()> {
        let rel = rel.clone();
        self.done.remove(&rel);
        let abs = rel.under(&self.root);
        let meta = if self.filter.out_of_scope(&rel) { None } else { std::fs::symlink_metadata(&abs).ok() };
        let Some(meta) = meta else {
            self.emit(FsOp::Remove { path: rel.clone() })?;
            self.index.stage_remove(&rel, Kind::Dir);
            return Ok(());
        };
        if meta.is_dir() {
            let mode = content::mode_of(&meta);
            let m = self.names.meta_of(&abs, &meta);
            let attrs = Attrs::of(&m);
            self.emit(FsOp::Mkdir { path: rel.clone(), mode, meta: Some(m) })?;
            self.index.stage_put(&rel, Entry::dir(mode, attrs));
            let Ok(entries) = std::fs::read_dir(&abs) else { return Ok(()) };
            for e in entries.flatten() {
                if let Some(child) = self.rel(&e.path()) {
                    if !self.filter.out_of_scope(&child) {
                        self.resend(&child)?;
                    }
                }
            }
        } else {
            // Forget the index entry so the path goes out whole (full content, not a delta,
            // not a link to another name: a repair is asked for when the receiver could not
            // reproduce the path, which may be because it lacks that other name). A socket
            // is removed there.
            self.index.stage_remove(&rel, Kind::File);
            self.sending_whole = true;
            let r = self.sync_entry(&rel, &meta, true);
            self.sending_whole = false;
            if !meta.file_type().is_symlink() && !meta.is_file() && meta::special_kind(&meta).is_none() {
                self.emit(FsOp::Remove { path: rel.clone() })?;
            }
            r?;
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Ops not yet appended are simply dropped: their index entries were never committed,
        // so the next scan re-emits them.
        if !self.pending.is_empty() {
            tracing::debug!(records = self.pending.len(), "dropping unjournaled ops at shutdown");
        }
    }
}
