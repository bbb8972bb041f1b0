//! The SQLite applier: applies a SQLite source's committed transactions (`SqliteFrames`, see
//! the SQLite section of `replication.proto`) to a standby database file, page by page, and
//! records how far it got in a position file.
//!
//! In: whole source transactions as the pages they wrote (large ones in chunks), resync
//! snapshots, commits from the session. Out: the standby database (readable by any SQLite
//! client at every moment) and the position file.
//!
//! # Writing pages
//!
//! Pages go into the standby through the `sqlite_dbpage` virtual table inside one SQLite write
//! transaction: readers keep seeing the last committed state until the COMMIT, which makes
//! everything in it visible at once (the standby is in WAL mode: its page 1 comes from a
//! WAL-mode source). Many source transactions are grouped into one standby transaction, which
//! [`Applier::prepare_commit`] ends by truncating the database to the latest size (the
//! truncate must be the last statement: a later page write cancels it) and committing. A
//! chunked source transaction is buffered in memory until its last chunk and written whole,
//! so a standby transaction never holds part of one.
//!
//! The connection writing pages never parses the standby's schema after it attached the file:
//! its main database is an in-memory one and the standby is attached as `standby`, so its page
//! writes check only the in-memory schema's cookie. With the standby as the main database, a
//! page 1 carrying a new schema cookie makes the next statement re-read the schema from
//! half-written pages, through b-tree page descriptors cached from before the pages were
//! overwritten ("malformed database schema"; see the schema test).
//!
//! # Durability and the horizon
//!
//! A standby commit is visible at once; the position file is written afterwards, in the
//! commit's durable half (after an fdatasync of the WAL and the database file). After a crash
//! the standby may therefore be ahead of the recorded position, and the agent re-sends what
//! followed it. Applying such an older transaction on top of the newer state and committing it
//! alone would show readers a mix of page versions (a b-tree whose pages disagree). So before
//! any standby commit the position file durably records a *horizon* at or beyond everything in
//! it; while the applied position is below the horizon (only after a restart), `prepare_commit`
//! declines, so every re-sent transaction up to the horizon lands in one standby commit, which
//! takes the standby from some state at or before the horizon to exactly the horizon's state.
//! A resync resets the horizon to the snapshot's position; one that replaces the standby
//! records it before the new database becomes visible (the copy's commit or the rename below).
//!
//! # Resync
//!
//! Snapshot pieces for a standby that exists with the snapshot's page size are written through
//! `sqlite_dbpage` in one write transaction, committed by the next `prepare_commit` after the
//! resync (readers see the old database until then). Otherwise (no standby, or another page
//! size) they are written into `<standby>.lockstep-tmp`, which replaces the standby at the end
//! of the resync.
//!
//! Replacing the file by a rename is not safe for readers: a connection holds the file it
//! opened, but finds the WAL and its index by name (`-wal`, `-shm`) at every read transaction
//! until it has the WAL open. One opened on the old file and first used after the rename reads
//! the old file through the new database's WAL: SQLITE_CORRUPT, or rows of neither database.
//! So where the old standby exists, the snapshot is copied into the standby's own file
//! instead: the old standby leaves WAL mode (SQLite checkpoints and deletes the WAL and marks the
//! header rollback-journal), the snapshot is copied in with SQLite's backup API (one
//! rollback-journal transaction, which may change the page size; the journal's deletion is
//! synced, with `synchronous = EXTRA`), its page 1 is restored as the source has it (the backup
//! gives the copy a schema cookie of its own), and the next connection to use the file puts it
//! back into WAL mode (its header says so). An exclusive lock is held from leaving WAL mode to
//! the end: readers wait (or get SQLITE_BUSY without a busy timeout) for the length of the copy,
//! then see the new database whole; none reads the old content in rollback-journal mode and
//! keeps its schema across the copy (the new database may repeat the old schema cookie).
//! A crash during the copy leaves a hot journal, which [`SqliteApplier::open`] rolls back
//! before it reads the page size.
//!
//! SQLite leaves WAL mode only while no other connection has the WAL open, and a connection
//! that has read the standby keeps it open until it closes. If that lasts beyond a wait (or the
//! copy fails otherwise), the temp file replaces the standby by a rename after all, with a
//! warning: readers that have read the old standby keep reading it, consistently, until they
//! reopen; a connection opened before the rename but first used after it may fail or read
//! rows of neither database until it reopens.
//!
//! Changes are applied in the calling (blocking) thread; commits' durable halves run on
//! another one, so the position file is shared behind a mutex.

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lockstep_common::event::{Change, JournalId, Seq};
use lockstep_common::proto::{self, SqliteFrames};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode};
use tracing::{debug, info, warn};

use super::{Applier, ApplyError, ApplyOutcome, CommitFn, Position, POSITION_LEN};

/// Size of the position file's body: the journal position, then the applied position and the
/// horizon (each gen u64 LE, frame u32 LE).
const STATE_LEN: usize = POSITION_LEN + 2 * 12;
/// The byte offset SQLite reserves for locking; the page holding it is never used.
const PENDING_BYTE: u64 = 0x4000_0000;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Overwrites (or appends) page `?1` of the standby (attached as `standby`) in the open
/// transaction.
const WRITE_PAGE: &str = "INSERT INTO sqlite_dbpage(pgno, data, schema) VALUES (?1, ?2, 'standby')";
/// Truncates the standby to `?1 - 1` pages at COMMIT.
const TRUNCATE: &str = "INSERT INTO sqlite_dbpage(pgno, data, schema) VALUES (?1, NULL, 'standby')";

/// A position in the source's WAL history: transactions are ordered by (gen, frame).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalPos {
    /// The agent's count of WAL generations it followed.
    pub gen: u64,
    /// The 1-based index of a transaction's commit frame within its generation.
    pub frame: u32,
}

impl fmt::Display for WalPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.gen, self.frame)
    }
}

impl WalPos {
    fn of(f: &SqliteFrames) -> WalPos {
        WalPos { gen: f.gen, frame: f.frame }
    }

    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.gen.to_le_bytes());
        out.extend_from_slice(&self.frame.to_le_bytes());
    }

    fn get(b: &[u8]) -> WalPos {
        WalPos {
            gen: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            frame: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
        }
    }
}

/// What the position file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Recorded {
    pos: Position,
    /// Everything up to here is in the standby (committed and durable).
    applied: WalPos,
    /// No standby commit went beyond this (see the module docs).
    horizon: WalPos,
}

impl Recorded {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(STATE_LEN);
        b.extend_from_slice(&self.pos.to_bytes());
        self.applied.put(&mut b);
        self.horizon.put(&mut b);
        b
    }

    fn decode(b: &[u8]) -> Recorded {
        Recorded {
            pos: Position::from_bytes(b),
            applied: WalPos::get(&b[POSITION_LEN..]),
            horizon: WalPos::get(&b[POSITION_LEN + 12..]),
        }
    }
}

/// The position file, shared with the durable halves of commits (which run on another
/// thread). Every write happens under its lock, so a horizon written before a standby commit
/// and a position written after an earlier one never interleave, and neither undoes the other.
struct StateFile {
    path: PathBuf,
    file: super::slots::SlotFile,
    /// What the file holds; `None` while no position is known (nothing to protect then: the
    /// agent resyncs).
    rec: Option<Recorded>,
    /// The horizon to record: raised before each standby commit, reset by a resync.
    horizon: WalPos,
}

impl StateFile {
    fn write(&mut self, rec: Recorded) -> Result<(), ApplyError> {
        self.file.write(&rec.encode())?;
        self.rec = Some(rec);
        Ok(())
    }

    /// Durably records `self.horizon` (with the position already recorded) if the file says
    /// otherwise. Called before anything beyond the recorded horizon becomes visible.
    fn record_horizon(&mut self) -> Result<(), ApplyError> {
        match self.rec {
            Some(rec) if rec.horizon != self.horizon => self.write(Recorded { horizon: self.horizon, ..rec }),
            _ => Ok(()),
        }
    }
}

/// A chunked source transaction whose last chunk has not arrived yet.
/// A source transaction arriving in chunks: its pages so far are written in the open standby
/// transaction, after savepoint `lockstep_tx` (rolled back to if the rest never comes), so
/// a large transaction is never held in memory.
struct Partial {
    at: WalPos,
    page_size: u32,
    next_chunk: u32,
}

/// Where the pieces of a snapshot go.
enum SnapshotSink {
    /// Into the open standby write transaction.
    Dbpage,
    /// Into a temp file that replaces the standby at the end.
    TempFile(File),
}

/// A resync in progress.
#[derive(Default)]
struct Resync {
    /// Chosen by the first piece, with the snapshot's page size.
    sink: Option<(SnapshotSink, u32)>,
    /// Which pages the pieces carried.
    seen: PageSet,
    /// The snapshot's position and size, from its last piece.
    end: Option<(WalPos, u32)>,
}

/// A set of page numbers: one bit per page up to the largest seen.
#[derive(Default)]
struct PageSet(Vec<u64>);

impl PageSet {
    fn insert(&mut self, pgno: u32) {
        let (i, bit) = (pgno as usize / 64, pgno % 64);
        if self.0.len() <= i {
            self.0.resize(i + 1, 0);
        }
        self.0[i] |= 1 << bit;
    }

    fn contains(&self, pgno: u32) -> bool {
        self.0.get(pgno as usize / 64).is_some_and(|w| w & (1 << (pgno % 64)) != 0)
    }
}

/// Applies a SQLite source to a standby database file.
pub struct SqliteApplier {
    /// The standby database.
    standby: PathBuf,
    state: Arc<Mutex<StateFile>>,
    /// The writing connection (main: in memory; the standby attached as `standby`). Opened
    /// when first needed; dropped when an error may have left it unusable.
    conn: Option<Connection>,
    /// The standby's page size, from its header; `None` while it does not exist (or is not a
    /// SQLite database).
    page_size: Option<u32>,
    /// A standby write transaction is open on `conn`.
    in_tx: bool,
    /// Database size in pages after the latest source transaction (or snapshot) in the open
    /// write transaction.
    db_pages: Option<u32>,
    /// Everything up to here is in the standby, committed or in the open transaction.
    applied: WalPos,
    partial: Option<Partial>,
    resync: Option<Resync>,
    /// The WAL's directory entry is durable (fsynced once per connection).
    wal_dir_synced: bool,
    /// An error rolled the open transaction back; nothing more until the next session.
    failed: bool,
    /// A second connection, used by a thread of its own to copy the WAL back into the
    /// database (PASSIVE) off the apply and commit paths; the writing connection never
    /// checkpoints.
    checkpointer: Arc<Mutex<Option<Connection>>>,
    /// Wakes that thread (started on first use) after a commit.
    checkpoint_kick: Option<std::sync::mpsc::SyncSender<()>>,
    /// How long a resync replacing the standby waits for other connections to let go of the
    /// old standby's WAL before it falls back to a rename (see [`SqliteApplier::install_temp`]).
    wal_release_wait: Duration,
}

/// WAL size past which the durable half of a commit copies it back into the database.
const CHECKPOINT_WAL_BYTES: u64 = 4 << 20;

/// Copies the standby's WAL back into the database when it has grown, on `slot`'s own
/// connection (opened on first use). Failures only postpone it.
fn checkpoint_if_large(standby: &Path, slot: &Mutex<Option<Connection>>) {
    let large = fs::metadata(sidecar(standby, "-wal")).is_ok_and(|m| m.len() > CHECKPOINT_WAL_BYTES);
    if !large {
        return;
    }
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        match Connection::open_with_flags(standby, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE) {
            Ok(c) => *slot = Some(c),
            Err(e) => {
                debug!(error = %e, "cannot open a checkpoint connection on the standby");
                return;
            }
        }
    }
    if let Some(c) = slot.as_ref() {
        if let Err(e) = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            debug!(error = %e, "standby checkpoint postponed");
        }
    }
}

fn refused(msg: impl Into<String>) -> ApplyError {
    ApplyError::Refused(msg.into())
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let context = context.into();
    move |error| ApplyError::Io { context, error }
}

/// An apply error for a failed SQLite call on the standby: the agent retries.
fn db_err(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> ApplyError {
    let context = context.into();
    move |e| ApplyError::Io { context, error: io::Error::other(e.to_string()) }
}

/// `<path><suffix>`, as SQLite names a database's companion files.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_if_present(path: &Path) -> Result<(), ApplyError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(format!("remove {}", path.display()))(e)),
        _ => Ok(()),
    }
}

/// The page size recorded in a database header, or `None` if `path` does not exist or does
/// not start with a SQLite header.
fn header_page_size(path: &Path) -> Result<Option<u32>, ApplyError> {
    let ctx = || format!("read the header of standby {}", path.display());
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(ctx())(e)),
    };
    let mut h = [0u8; 100];
    match f.read_exact_at(&mut h, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io_err(ctx())(e)),
    }
    if &h[..16] != b"SQLite format 3\0" {
        return Ok(None);
    }
    Ok(Some(match u16::from_be_bytes([h[16], h[17]]) {
        1 => 65536,
        n => u32::from(n),
    }))
}

/// The page SQLite never uses (it holds the lock byte) for this page size.
fn pending_page(page_size: u32) -> u32 {
    (PENDING_BYTE / u64::from(page_size) + 1) as u32
}

/// A connection with the standby attached as `standby` to an in-memory main database. Its
/// schema is never used; one this build cannot parse (unknown collations, functions) must not
/// stop pages from being copied, hence the writable schema.
fn attach_standby(standby: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_in_memory()?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_WRITABLE_SCHEMA, true)?;
    conn.execute("ATTACH DATABASE ?1 AS standby", [attach_uri(standby)])?;
    Ok(conn)
}

/// A `file:` URI for `path` that opens it read-write but never creates it.
fn attach_uri(path: &Path) -> String {
    let mut s = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push_str("?mode=rw");
    s
}

/// The record the agent journals when it starts over from a new snapshot (so that a receiver
/// seeded after it is past the resync floor): no pages, no sizes. Nothing to apply.
fn is_marker(f: &SqliteFrames) -> bool {
    !f.snapshot && f.pages.is_empty() && f.page_size == 0 && f.db_pages == 0
}

/// Inflates zstd-compressed pages, never beyond one page each (a hostile peer cannot make
/// the receiver allocate more than the page size per page).
fn decompress(mut f: SqliteFrames) -> Result<SqliteFrames, ApplyError> {
    if !f.zstd {
        return Ok(f);
    }
    if !f.page_size.is_power_of_two() || !(512..=65536).contains(&f.page_size) {
        return Err(refused(format!("compressed pages of page size {}", f.page_size)));
    }
    let (at, page_size) = (WalPos::of(&f), f.page_size as usize);
    for p in &mut f.pages {
        let data = zstd::bulk::decompress(&p.data, page_size)
            .map_err(|e| refused(format!("page {} of transaction {at} does not decompress: {e}", p.pgno)))?;
        p.data = data.into();
    }
    f.zstd = false;
    Ok(f)
}

/// Checks what can be checked of an event without the standby.
fn validate(f: &SqliteFrames) -> Result<(), ApplyError> {
    let what = if f.snapshot {
        "a snapshot piece".to_string()
    } else {
        format!("transaction {} chunk {}", WalPos::of(f), f.chunk)
    };
    if !f.page_size.is_power_of_two() || !(512..=65536).contains(&f.page_size) {
        return Err(refused(format!(
            "{what} has page size {}; SQLite page sizes are powers of two from 512 to 65536",
            f.page_size
        )));
    }
    // Only a snapshot's last piece must say how large the database is.
    if f.db_pages == 0 && (!f.snapshot || f.last) {
        return Err(refused(format!("{what} says the database has 0 pages")));
    }
    for p in &f.pages {
        if p.pgno == 0 || (f.db_pages != 0 && p.pgno > f.db_pages) {
            return Err(refused(format!("{what} carries page {} of a database of {} pages", p.pgno, f.db_pages)));
        }
        if p.data.len() != f.page_size as usize {
            return Err(refused(format!(
                "{what} carries page {} of {} bytes; the page size is {}",
                p.pgno,
                p.data.len(),
                f.page_size
            )));
        }
    }
    Ok(())
}

impl SqliteApplier {
    /// Opens the applier for the standby database `standby` (created by the first resync),
    /// recording its position in `position_file` (both parent directories are created). A
    /// corrupt position file is an error naming it; it needs a person (restore it, or remove
    /// it to resync the standby). A position without a standby is forgotten (with a warning),
    /// so the agent resyncs.
    pub fn open(standby: PathBuf, position_file: PathBuf) -> Result<SqliteApplier, ApplyError> {
        for dir in [standby.parent(), position_file.parent()].into_iter().flatten() {
            if !dir.as_os_str().is_empty() {
                fs::create_dir_all(dir).map_err(io_err(format!("create directory {}", dir.display())))?;
            }
        }
        let (file, rec) = super::slots::SlotFile::open(&position_file, STATE_LEN)?;
        let mut rec = rec.map(|b| Recorded::decode(&b));
        let exists = standby.try_exists().map_err(io_err(format!("inspect standby {}", standby.display())))?;
        if rec.is_some() && !exists {
            warn!(
                standby = %standby.display(),
                position_file = %position_file.display(),
                "the position file has a position but the standby database is missing; resyncing it"
            );
            rec = None;
        }
        // Left by a resync cut short; a new one starts from scratch.
        remove_temp(&sidecar(&standby, ".lockstep-tmp"))?;
        if exists {
            roll_back_hot_journal(&standby)?;
        }
        let page_size = header_page_size(&standby)?;
        let horizon = rec.map(|r| r.horizon).unwrap_or_default();
        Ok(SqliteApplier {
            applied: rec.map(|r| r.applied).unwrap_or_default(),
            standby,
            state: Arc::new(Mutex::new(StateFile { path: position_file, file, rec, horizon })),
            conn: None,
            page_size,
            in_tx: false,
            db_pages: None,
            partial: None,
            resync: None,
            wal_dir_synced: false,
            failed: false,
            checkpointer: Arc::default(),
            checkpoint_kick: None,
            wal_release_wait: BUSY_TIMEOUT,
        })
    }

    fn state(&self) -> MutexGuard<'_, StateFile> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The checkpoint thread's wake-up, starting the thread on first use.
    fn checkpoint_kick(&mut self) -> Option<std::sync::mpsc::SyncSender<()>> {
        if self.checkpoint_kick.is_none() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            let standby = self.standby.clone();
            let slot = self.checkpointer.clone();
            let spawned = std::thread::Builder::new().name("sqlite-checkpoint".into()).spawn(move || {
                while rx.recv().is_ok() {
                    checkpoint_if_large(&standby, &slot);
                }
            });
            if spawned.is_ok() {
                self.checkpoint_kick = Some(tx);
            }
        }
        self.checkpoint_kick.clone()
    }

    fn temp_path(&self) -> PathBuf {
        sidecar(&self.standby, ".lockstep-tmp")
    }

    /// The writing connection, opened if needed.
    fn conn(&mut self) -> Result<&Connection, ApplyError> {
        if self.conn.is_none() {
            let ctx = || format!("open standby {}", self.standby.display());
            let conn = attach_standby(&self.standby).map_err(db_err(ctx()))?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err(ctx()))?;
            conn.execute_batch("PRAGMA standby.synchronous = NORMAL").map_err(db_err(ctx()))?;
            // Checkpoints run in the durable half of commits, on their own connection.
            conn.execute_batch("PRAGMA wal_autocheckpoint = 0").map_err(db_err(ctx()))?;
            self.wal_dir_synced = false;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_ref().expect("opened above"))
    }

    /// Opens the standby write transaction if none is open.
    fn begin(&mut self) -> Result<(), ApplyError> {
        if !self.in_tx {
            self.conn()?.execute_batch("BEGIN IMMEDIATE").map_err(db_err("begin a standby transaction"))?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Writes one page into the open write transaction.
    fn write_page(&mut self, page_size: u32, pgno: u32, data: Bytes) -> Result<(), ApplyError> {
        if pgno == pending_page(page_size) {
            // SQLite never stores anything there (and refuses to hand out the page).
            return Ok(());
        }
        self.conn()?
            .prepare_cached(WRITE_PAGE)
            .and_then(|mut s| s.execute(rusqlite::params![pgno, &data[..]]))
            .map(|_| ())
            .map_err(db_err(format!("write page {pgno} of the standby")))
    }

    /// Truncates and commits the open write transaction.
    fn finish(&mut self) -> Result<(), ApplyError> {
        if let Some(n) = self.db_pages {
            // The last statement before COMMIT: a page write after it would cancel it.
            self.conn()?
                .prepare_cached(TRUNCATE)
                .and_then(|mut s| s.execute([i64::from(n) + 1]))
                .map_err(db_err(format!("truncate the standby to {n} pages")))?;
        }
        self.conn()?.execute_batch("COMMIT").map_err(db_err("commit on the standby"))?;
        self.in_tx = false;
        self.db_pages = None;
        Ok(())
    }

    /// Rolls back whatever is open and forgets everything not committed. A connection that
    /// fails the rollback is dropped.
    fn discard(&mut self) {
        if let Some(c) = &self.conn {
            // SQLite may have rolled back already (after some errors).
            if !c.is_autocommit() && c.execute_batch("ROLLBACK").is_err() {
                self.conn = None;
            }
        }
        self.in_tx = false;
        self.db_pages = None;
        self.partial = None;
        if let Some(Resync { sink: Some((SnapshotSink::TempFile(_), _)), .. }) = self.resync.take() {
            if let Err(e) = remove_temp(&self.temp_path()) {
                warn!(error = %e, "could not remove the temp file of an abandoned resync");
            }
        }
        let committed = self.state().rec.map(|r| r.applied).unwrap_or_default();
        self.applied = committed;
    }

    fn fail(&mut self, e: ApplyError) -> ApplyError {
        self.discard();
        self.failed = true;
        e
    }

    fn check_usable(&self) -> Result<(), ApplyError> {
        if self.failed {
            return Err(ApplyError::Io {
                context: format!("SQLite standby {}", self.standby.display()),
                error: io::Error::other(
                    "an earlier error rolled back this session's uncommitted work; waiting for the agent to reconnect",
                ),
            });
        }
        Ok(())
    }

    /// Whether the standby can take transaction `f`: it exists, with `f`'s page size.
    fn check_standby(&self, f: &SqliteFrames) -> Result<(), ApplyError> {
        match self.page_size {
            None => Err(refused(format!(
                "transaction {} arrived but there is no standby database at {} to apply it to; \
                 reconnect the agent so it resyncs the standby",
                WalPos::of(f),
                self.standby.display()
            ))),
            Some(ps) if ps != f.page_size => Err(refused(format!(
                "transaction {} has page size {} but the standby {} has page size {ps}; delete the standby \
                 and its position file {} to resync it",
                WalPos::of(f),
                f.page_size,
                self.standby.display(),
                self.state().path.display()
            ))),
            Some(_) => Ok(()),
        }
    }

    fn apply_frames(&mut self, f: SqliteFrames) -> Result<(), ApplyError> {
        validate(&f)?;
        if f.snapshot {
            return self.apply_piece(f);
        }
        if self.resync.is_some() {
            return Err(refused(format!("transaction {} arrived during a resync", WalPos::of(&f))));
        }
        let at = WalPos::of(&f);
        if at <= self.applied {
            debug!(at = %at, applied = %self.applied, chunk = f.chunk, "transaction already applied; skipped");
            return Ok(());
        }
        self.check_standby(&f)?;
        if f.chunk == 0 {
            if let Some(p) = self.partial.take() {
                warn!(
                    at = %p.at,
                    chunks = p.next_chunk,
                    "transaction cut off by an agent restart; discarding its chunks (it is sent again in full)"
                );
                self.savepoint("ROLLBACK TO lockstep_tx; RELEASE lockstep_tx")?;
            }
            if f.last {
                return self.write_tx(f.page_size, f.db_pages, f.pages.into_iter().map(|p| (p.pgno, p.data)), at);
            }
            self.begin().map_err(|e| self.fail(e))?;
            self.savepoint("SAVEPOINT lockstep_tx")?;
            self.write_pages(f.page_size, f.pages.into_iter().map(|p| (p.pgno, p.data))).map_err(|e| self.fail(e))?;
            self.partial = Some(Partial { at, page_size: f.page_size, next_chunk: 1 });
            return Ok(());
        }
        let continues = self.partial.as_ref().is_some_and(|p| p.at == at && p.next_chunk == f.chunk);
        if !continues {
            warn!(
                at = %at,
                chunk = f.chunk,
                buffered = ?self.partial.as_ref().map(|p| (p.at, p.next_chunk)),
                "chunk does not continue the transaction being received; ignored"
            );
            return Ok(());
        }
        let p = self.partial.as_mut().expect("checked above");
        if p.page_size != f.page_size {
            return Err(refused(format!(
                "chunk {} of transaction {at} has page size {} but its chunk 0 had {}",
                f.chunk, f.page_size, p.page_size
            )));
        }
        p.next_chunk += 1;
        let page_size = p.page_size;
        // Later chunks may carry a newer version of a page: written in order, it wins.
        self.write_pages(page_size, f.pages.into_iter().map(|pg| (pg.pgno, pg.data))).map_err(|e| self.fail(e))?;
        if !f.last {
            return Ok(());
        }
        self.partial = None;
        self.savepoint("RELEASE lockstep_tx")?;
        self.db_pages = Some(f.db_pages);
        self.applied = at;
        Ok(())
    }

    /// Runs a savepoint statement for a chunked transaction on the open write transaction.
    fn savepoint(&mut self, sql: &str) -> Result<(), ApplyError> {
        let r = self.conn().and_then(|c| c.execute_batch(sql).map_err(db_err(format!("{sql} on the standby"))));
        r.map_err(|e| self.fail(e))
    }

    /// Writes a whole source transaction into the open standby transaction.
    fn write_tx(
        &mut self,
        page_size: u32,
        db_pages: u32,
        pages: impl Iterator<Item = (u32, Bytes)>,
        at: WalPos,
    ) -> Result<(), ApplyError> {
        self.write_pages(page_size, pages).map_err(|e| self.fail(e))?;
        self.db_pages = Some(db_pages);
        self.applied = at;
        Ok(())
    }

    fn write_pages(&mut self, page_size: u32, pages: impl Iterator<Item = (u32, Bytes)>) -> Result<(), ApplyError> {
        self.begin()?;
        for (pgno, data) in pages {
            self.write_page(page_size, pgno, data)?;
        }
        Ok(())
    }

    fn apply_piece(&mut self, f: SqliteFrames) -> Result<(), ApplyError> {
        let standby_page_size = self.page_size;
        let tmp = self.temp_path();
        let Some(rs) = &mut self.resync else {
            return Err(refused("a snapshot piece arrived outside a resync"));
        };
        if rs.end.is_some() {
            return Err(refused("a snapshot piece arrived after the snapshot's last piece"));
        }
        let page_size = match &rs.sink {
            Some((_, ps)) if *ps != f.page_size => {
                return Err(refused(format!(
                    "a snapshot piece has page size {} but the snapshot began with page size {ps}",
                    f.page_size
                )))
            }
            Some((_, ps)) => *ps,
            None => {
                let sink = if standby_page_size == Some(f.page_size) {
                    SnapshotSink::Dbpage
                } else {
                    // Its companions, if any, belong to an earlier snapshot.
                    remove_temp(&tmp)?;
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&tmp)
                        .map_err(io_err(format!("create {}", tmp.display())))?;
                    SnapshotSink::TempFile(file)
                };
                rs.sink = Some((sink, f.page_size));
                f.page_size
            }
        };
        for p in &f.pages {
            rs.seen.insert(p.pgno);
        }
        if f.last {
            rs.end = Some((WalPos::of(&f), f.db_pages));
        }
        let r = match &rs.sink {
            Some((SnapshotSink::TempFile(file), _)) => f.pages.iter().try_for_each(|p| {
                file.write_all_at(&p.data, u64::from(p.pgno - 1) * u64::from(page_size)).map_err(io_err(format!(
                    "write page {} to {}",
                    p.pgno,
                    tmp.display()
                )))
            }),
            _ => self.write_pages(page_size, f.pages.into_iter().map(|p| (p.pgno, p.data))),
        };
        r.map_err(|e| self.fail(e))
    }

    fn end_snapshot(&mut self) -> Result<(), ApplyError> {
        let Some(rs) = self.resync.take() else {
            return Err(refused("end of resync without a beginning"));
        };
        let (Some((sink, page_size)), Some((at, db_pages))) = (rs.sink, rs.end) else {
            return Err(refused("the resync snapshot ended before its last piece"));
        };
        let pending = pending_page(page_size);
        if let Some(missing) = (1..=db_pages).find(|&n| n != pending && !rs.seen.contains(n)) {
            return Err(refused(format!("the resync snapshot at {at} of {db_pages} pages lacks page {missing}")));
        }
        match sink {
            SnapshotSink::Dbpage => {
                // Committed, with the truncate, by the next prepare_commit.
                self.db_pages = Some(db_pages);
            }
            SnapshotSink::TempFile(file) => self.install_temp(file, page_size, db_pages, at)?,
        }
        self.applied = at;
        self.state().horizon = at;
        info!(at = %at, pages = db_pages, page_size, "resync snapshot applied");
        Ok(())
    }

    /// Makes the temp file the standby (see "Resync" in the module docs): copied into the old
    /// standby's own file where no other connection has its WAL open, renamed over it otherwise.
    fn install_temp(&mut self, file: File, page_size: u32, db_pages: u32, at: WalPos) -> Result<(), ApplyError> {
        let tmp = self.temp_path();
        file.set_len(u64::from(db_pages) * u64::from(page_size))
            .and_then(|()| file.sync_all())
            .map_err(io_err(format!("sync {}", tmp.display())))?;
        let mut page1 = vec![0; page_size as usize];
        file.read_exact_at(&mut page1, 0).map_err(io_err(format!("read page 1 of {}", tmp.display())))?;
        drop(file);
        // Nothing of ours may hold the old files: the copy needs the only connection to the
        // standby, and closing a descriptor of it would drop our connections' locks.
        self.conn = None;
        *self.checkpointer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.page_size = None;
        let old_page_size = header_page_size(&self.standby)?;
        {
            // The new database becomes visible with the copy's commit or the rename: record the
            // horizon first.
            let mut st = self.state();
            st.horizon = at;
            st.record_horizon()?;
        }
        if let Some(old_page_size) = old_page_size {
            match copy_into_standby(&self.standby, &tmp, &page1, self.wal_release_wait) {
                Ok(()) => {
                    info!(
                        standby = %self.standby.display(),
                        old_page_size,
                        page_size,
                        "copied a snapshot of another page size into the standby's file"
                    );
                    if let Err(e) = remove_temp(&tmp) {
                        warn!(error = %e, "could not remove the temp file of a resync");
                    }
                    self.page_size = Some(page_size);
                    return Ok(());
                }
                Err(e) => warn!(
                    standby = %self.standby.display(),
                    old_page_size,
                    page_size,
                    error = %e,
                    "cannot copy a snapshot of another page size into the standby's file; replacing the file \
                     by a rename instead: connections that have read the old standby keep reading it until they \
                     reopen, but one opened before the rename and first used after it gets errors (SQLITE_CORRUPT, \
                     SQLITE_IOERR) or wrong rows until it is reopened"
                ),
            }
        }
        // A WAL or journal left beside the standby belongs to the old database and would be
        // applied to the new one.
        remove_companions(&self.standby)?;
        fs::rename(&tmp, &self.standby).map_err(io_err(format!(
            "rename {} to {}",
            tmp.display(),
            self.standby.display()
        )))?;
        let dir = self.standby.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(format!("sync directory {}", dir.display())))?;
        // The connection opens with the next write: nothing after the rename may fail.
        self.page_size = Some(page_size);
        Ok(())
    }
}

/// Whether SQLite failed for a lock another connection holds.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// Replaces the content of the standby's own file with the snapshot database `tmp` (whose page
/// 1 is `page1`), as one rollback-journal transaction, so that every connection that has the
/// file open sees either database whole (see "Resync" in the module docs).
///
/// SQLite changes a database's page size only in rollback-journal mode, and leaves WAL mode
/// only while no other connection has the WAL open; this waits up to `wait` for that. An error
/// means the standby holds its old content (possibly in rollback-journal mode).
fn copy_into_standby(standby: &Path, tmp: &Path, page1: &[u8], wait: Duration) -> Result<(), ApplyError> {
    let ctx = || format!("open standby {}", standby.display());
    let mut conn = attach_standby(standby).map_err(db_err(ctx()))?;
    // Every lock taken from here is held until the close: once out of WAL mode, no reader may
    // start on the old content (and cache its schema, whose cookie the new database may repeat
    // with another schema), and none may see the copy before page 1 is restored below.
    conn.query_row("PRAGMA standby.locking_mode = EXCLUSIVE", [], |_| Ok(())).map_err(db_err(ctx()))?;
    // Checkpoints the WAL into the file, deletes it and marks the header rollback-journal.
    let leave_wal = "take the standby out of WAL mode";
    let deadline = Instant::now() + wait;
    loop {
        match conn.query_row("PRAGMA standby.journal_mode = DELETE", [], |r| r.get::<_, String>(0)) {
            Ok(mode) if mode.eq_ignore_ascii_case("delete") => break,
            Ok(mode) => return Err(io_err(leave_wal)(io::Error::other(format!("it stays in journal mode {mode}")))),
            Err(e) if is_busy(&e) && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) if is_busy(&e) => {
                return Err(io_err(leave_wal)(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "other connections kept its WAL open for {wait:?} (a connection that has read it holds \
                         it until it closes)"
                    ),
                )))
            }
            Err(e) => return Err(db_err(leave_wal)(e)),
        }
    }
    conn.busy_timeout(wait).map_err(db_err(ctx()))?;
    // The exclusive lock now, also where the standby was in rollback-journal mode already; and
    // the journal's deletion (the commit) durable before the position file says it happened.
    conn.execute_batch("BEGIN EXCLUSIVE; COMMIT; PRAGMA standby.synchronous = EXTRA")
        .map_err(db_err("lock the standby"))?;
    let snapshot = Connection::open_with_flags(tmp, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(db_err(format!("open {}", tmp.display())))?;
    backup(&snapshot, &mut conn, "standby").map_err(db_err(format!("copy {} into the standby", tmp.display())))?;
    snapshot.close().map_err(|(_, e)| db_err(format!("close {}", tmp.display()))(e))?;
    // The backup gave the copy a schema cookie of its own (the old one plus one); page 1 as the
    // source has it carries the source's, which later transactions continue.
    conn.execute_batch("BEGIN").map_err(db_err("restore page 1 of the standby"))?;
    conn.execute(WRITE_PAGE, rusqlite::params![1, page1]).map_err(db_err("restore page 1 of the standby"))?;
    conn.execute_batch("COMMIT").map_err(db_err("restore page 1 of the standby"))?;
    conn.close().map_err(|(_, e)| db_err(format!("close standby {}", standby.display()))(e))
}

/// Copies the main database of `from` over the attached database `name` of `to`, in one step
/// of SQLite's online backup API: one write transaction on `to`, which may have another page
/// size unless it is in WAL mode.
fn backup(from: &Connection, to: &mut Connection, name: &str) -> rusqlite::Result<()> {
    use rusqlite::backup::{Backup, StepResult};
    let b = Backup::new_with_names(from, rusqlite::MAIN_DB, to, name)?;
    match b.step(-1)? {
        StepResult::Done => Ok(()),
        // A single step copies everything or fails; anything else means the destination was
        // busy or locked part-way.
        _ => Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("the standby was busy during the copy".into()),
        )),
    }
}

/// Removes the WAL, its index and the rollback journal SQLite may keep beside `db`.
fn remove_companions(db: &Path) -> Result<(), ApplyError> {
    for suffix in ["-wal", "-shm", "-journal"] {
        remove_if_present(&sidecar(db, suffix))?;
    }
    Ok(())
}

/// Removes the temp file of a resync and whatever SQLite left beside it.
fn remove_temp(tmp: &Path) -> Result<(), ApplyError> {
    remove_if_present(tmp)?;
    remove_companions(tmp)
}

/// Rolls back a transaction a crash cut short in the standby (a copied snapshot's, see
/// [`copy_into_standby`]), whose journal SQLite plays back at the next read: until then the
/// file may hold pages of both databases, and its header a page size it does not have.
fn roll_back_hot_journal(standby: &Path) -> Result<(), ApplyError> {
    let journal = sidecar(standby, "-journal");
    if !journal.try_exists().map_err(io_err(format!("inspect {}", journal.display())))? {
        return Ok(());
    }
    let ctx = || format!("roll back {} into standby {}", journal.display(), standby.display());
    let conn = attach_standby(standby).map_err(db_err(ctx()))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err(ctx()))?;
    conn.query_row("PRAGMA standby.user_version", [], |_| Ok(())).map_err(db_err(ctx()))?;
    conn.close().map_err(|(_, e)| db_err(ctx())(e))
}

/// The durable half of a standby commit: the WAL (with its directory entry) reaches the disk.
/// The database file is SQLite's to sync (it does after each checkpoint with
/// `synchronous = NORMAL`) — and it must not be opened here at all: closing a descriptor of
/// it would drop the POSIX locks the standby connection holds on it (SQLite locks the
/// database file and the `-shm` file, never the `-wal` file).
fn sync_standby(standby: &Path, sync_dir: bool) -> Result<(), ApplyError> {
    let wal = sidecar(standby, "-wal");
    match File::open(&wal) {
        Ok(f) => f.sync_data().map_err(io_err(format!("sync {}", wal.display())))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("open {}", wal.display()))(e)),
    }
    if sync_dir {
        let dir = standby.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(format!("sync directory {}", dir.display())))?;
    }
    Ok(())
}

impl Applier for SqliteApplier {
    fn position(&self) -> Option<Position> {
        self.state().rec.map(|r| r.pos)
    }

    fn apply(&mut self, _seq: Seq, change: Change) -> Result<ApplyOutcome, ApplyError> {
        self.check_usable()?;
        let f = match change {
            Change::Other(proto::change_event::Change::Sqlite(f)) => f,
            _ => return Err(refused("a SQLite target accepts only SQLite changes")),
        };
        if is_marker(&f) {
            return Ok(ApplyOutcome::default());
        }
        let f = decompress(f)?;
        self.apply_frames(f)?;
        Ok(ApplyOutcome::default())
    }

    fn begin_resync(&mut self) -> Result<(), ApplyError> {
        self.check_usable()?;
        self.discard();
        self.resync = Some(Resync::default());
        Ok(())
    }

    fn end_resync(&mut self) -> Result<(), ApplyError> {
        self.check_usable()?;
        self.end_snapshot().map_err(|e| self.fail(e))
    }

    fn prepare_commit(&mut self, pos: Position) -> Result<Option<CommitFn>, ApplyError> {
        // Nothing of a snapshot is committed before its end (as for PostgreSQL).
        if self.failed || self.resync.is_some() || self.partial.is_some() {
            return Ok(None);
        }
        if self.applied < self.state().horizon {
            // Re-applying after a restart: the standby may already show a later state.
            return Ok(None);
        }
        let committed = self.in_tx;
        if committed {
            let r = {
                let mut st = self.state();
                st.horizon = st.horizon.max(self.applied);
                st.record_horizon()
            }
            .and_then(|()| self.finish());
            if let Err(e) = r {
                return Err(self.fail(e));
            }
        }
        let sync_dir = committed && !self.wal_dir_synced;
        self.wal_dir_synced |= committed;
        let applied = self.applied;
        let standby = self.standby.clone();
        let state = self.state.clone();
        let kick = committed.then(|| self.checkpoint_kick()).flatten();
        Ok(Some(Box::new(move || {
            if committed {
                sync_standby(&standby, sync_dir)?;
            }
            {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                let horizon = st.horizon;
                st.write(Recorded { pos, applied, horizon })?;
            }
            if let Some(k) = kick {
                let _ = k.try_send(());
            }
            Ok(())
        })))
    }

    fn session_start(&mut self, _journal_id: JournalId) -> Result<(), ApplyError> {
        self.discard();
        if std::mem::take(&mut self.failed) {
            // Whatever broke may have left the connection unusable: start afresh.
            self.conn = None;
        }
        let exists =
            self.standby.try_exists().map_err(io_err(format!("inspect standby {}", self.standby.display())))?;
        if !exists {
            self.conn = None;
            let mut st = self.state();
            if st.rec.is_some() {
                warn!(standby = %self.standby.display(), "the standby database is missing; resyncing it");
                st.rec = None;
            }
            st.horizon = WalPos::default();
            drop(st);
            self.applied = WalPos::default();
        }
        self.page_size = match &self.conn {
            // Never open (and close) the database file beside a live connection: closing any
            // descriptor of a file drops every POSIX lock this process holds on it, SQLite's
            // included — another process could then checkpoint or delete the WAL under it.
            Some(c) => Some(
                c.query_row("PRAGMA standby.page_size", [], |r| r.get::<_, u32>(0))
                    .map_err(db_err("read the standby's page size"))?,
            ),
            None => header_page_size(&self.standby)?,
        };
        self.wal_dir_synced = false;
        Ok(())
    }
}
