//! Following a SQLite database's write-ahead log without missing a committed frame.
//!
//! **The danger.** A checkpoint copies the log's frames back into the database file; once all
//! are copied and no reader uses the log, SQLite *resets* it: the next writer starts a new
//! generation at frame 1 (RESTART), or a TRUNCATE checkpoint empties the file. Frames written
//! after the source last read the log and before such a reset would be gone from the log.
//!
//! **The pin.** SQLite never resets the log while a reader holds a read transaction on it
//! (read-mark slot 1..4). The follower keeps one open — started with `sqlite3_snapshot_get`,
//! which never settles for read-mark 0 while the log holds frames — and rolls it forward to
//! the newest state after reading new transactions (two connections, the new pin taken
//! before the old is released, so the log is never left unpinned by accident). While pinned,
//! application checkpoints of any mode copy frames back up to the pin; RESTART and TRUNCATE
//! wait for it, and the follower releases it for them (below).
//!
//! **Stepping aside.** A FULL, RESTART or TRUNCATE checkpoint can also get stuck on the pin's
//! read-mark slot when the pin is already at the newest frame: it read the slot's mark before
//! the pin claimed the slot, and waits for the slot itself, which rolling the pin never frees
//! (see [`super::pin`]). When such a checkpoint runs for a while with the log read to its end
//! but not copied back, the follower blocks copying back (a lock on read-mark 0: the log
//! cannot be reset until it is lifted), lets go of the pin long enough for the checkpoint to
//! try the slot again, pins again, and only then lifts the block. The log is never unpinned
//! and resettable at once, so this is not a release.
//!
//! **Letting go.** The pin is dropped only when the log, as it stands, has been read to its
//! last frame *and no other frame can be added to this generation*:
//! - *for a waiting checkpoint*: another process holds the write lock (so no frame can be
//!   committed), the WAL index shows every frame both read by us and copied back, no other
//!   process reads from the log, and no uncommitted frame follows the last commit. The writer
//!   is then either a checkpoint (which resets the log) or a writer whose snapshot reads the
//!   database file only — and such a writer starts a new generation rather than appending;
//! - *our own recycle* when the log has grown past [`RECYCLE_FRAMES`]: the follower takes the
//!   write lock itself, reads to the end, checks that no other process reads from the log,
//!   drops the pin, copies everything back (PASSIVE), and lets go of the write lock. The next
//!   writer starts a new generation.
//!
//! After letting go, the only acceptable next generation is the one right after it: its
//! checkpoint sequence and salt-1 are each one higher. Anything else — a generation skipped,
//! a reset while pinned, a log reset while the agent was stopped — means frames may have been
//! missed, and the source says so at ERROR and has every receiver resynced from a new snapshot
//! (the resync floor), never silently carrying on. So does a database file that is deleted or
//! replaced underneath it.
//!
//! Positions: each transaction is shipped with (gen, commit frame), `gen` counting the
//! generations followed. The position after the last durable transaction is kept in the
//! agent's sled database, so a restart resumes mid-generation; transactions re-read after a
//! crash carry the same (gen, frame), and receivers skip them.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_common::event::Change;
use lockstep_common::now_us;
use lockstep_common::proto;
use rusqlite::{Connection, OpenFlags};
use tokio::runtime::Handle;
use tracing::{debug, error, info, warn};

use super::pin::{Pins, StepAside, BUSY_RETRY};
use super::shm::{IndexState, Shm};
use super::wal::{self, Txn, WalHeader, WalPos};
use super::{Piece, Shared, SnapRequest, SnapStart};
use crate::journal::{AppendTicket, NewRecord, RecordMeta};
use crate::source::{SourceContext, SourceError, SourceState};

/// How often the log is looked at when nothing new was found.
const POLL: Duration = Duration::from_millis(1);
/// How often the database file's identity is checked.
const IDENTITY_EVERY: Duration = Duration::from_millis(500);
/// Least time between rolls of the pin while transactions keep arriving.
const ROLL_EVERY: Duration = Duration::from_millis(5);
/// How long the log is polled without pause after the pin was released.
const HOT_AFTER_RELEASE: Duration = Duration::from_millis(50);
/// Log length (frames) past which the follower resets the log itself.
const RECYCLE_FRAMES: u32 = 4096;
/// Page bytes read per pass over the log.
const READ_BUDGET: usize = 64 << 20;
/// A transaction writing more pages than this is not held in memory: it is journaled piece by
/// piece straight from its frames.
const HOLD_BYTES: usize = 32 << 20;
/// Frames re-read per step when journaling such a transaction.
const LARGE_READ_FRAMES: u32 = 1024;
/// How long the follower waits for the write lock at a time while it holds the pin (the
/// holder may be a checkpoint waiting for the pin to move).
const LOCK_TRY: Duration = Duration::from_millis(20);
/// How long a blocking checkpoint may run with the log read to its end but not copied back
/// before the pin steps aside for it (it may be stuck on a stale mark of the pin's slot).
const STEP_ASIDE_AFTER: Duration = Duration::from_millis(30);
/// Longest the pin steps aside at once.
const STEP_ASIDE_MAX: Duration = Duration::from_secs(1);
/// How long a snapshot or a resync waits for the application's writer.
const WRITE_LOCK_PATIENCE: Duration = Duration::from_secs(30);

const POS_KEY: &[u8] = b"pos";

/// Logs a call on the follower's thread that took long: that thread is what lets waiting
/// checkpoints through, so a stall there shows up as an application checkpoint held up.
struct SlowCall(&'static str, Instant);

impl SlowCall {
    fn start(what: &'static str) -> SlowCall {
        SlowCall(what, Instant::now())
    }
}

impl Drop for SlowCall {
    fn drop(&mut self) {
        let took = self.1.elapsed();
        if took > Duration::from_millis(500) {
            warn!(
                call = self.0,
                took_ms = took.as_millis() as u64,
                "a SQLite call on the WAL follower's thread was slow"
            );
        }
    }
}

pub(crate) async fn run(shared: Arc<Shared>, ctx: SourceContext) -> Result<(), SourceError> {
    let rt = Handle::current();
    let snaps = shared
        .snap_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| shared.err("the source was started twice"))?;
    let name = shared.name.to_string();
    let tree = ctx
        .db
        .open_tree(format!("sqlite/{name}"))
        .map_err(|error| SourceError::Index { source_name: name.clone(), error })?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("sqlite-{name}"))
        .spawn(move || {
            let mut f = Follower {
                shared,
                ctx,
                rt,
                tree,
                snaps,
                db: None,
                gen: 0,
                pos: WalPos { ckpt_seq: 0, salt: [0, 0], frame: 0, cksum: [0, 0] },
                fresh: true,
                fresh_block: None,
                released: true,
                last_roll: Instant::now(),
                pinned_at: 0,
                hot_until: Instant::now(),
                last_hold_log: Instant::now(),
                last_recycle: Instant::now(),
                in_flight: VecDeque::new(),
                snap_waiting: Vec::new(),
                ckpt_wait: None,
            };
            let r = f.run();
            if let Err(e) = &r {
                error!(source = %f.shared.name, error = %e, "sqlite source stopped");
                f.ctx.status.set_state(SourceState::Error, Some(e.to_string()));
            }
            let _ = tx.send(r);
        })
        .map_err(|error| SourceError::Io {
            source_name: name.clone(),
            context: "start the source thread".into(),
            error,
        })?;
    rx.await.unwrap_or_else(|_| Err(SourceError::Other { source_name: name, problem: "source thread ended".into() }))
}

/// The open database: the pins, a connection for the write lock, the log and its index.
struct Db {
    pins: Pins,
    writer: Connection,
    wal_path: PathBuf,
    shm_path: PathBuf,
    wal: Option<File>,
    shm: Option<Shm>,
    /// (device, inode) of the database file when opened.
    ident: (u64, u64),
    checked: Instant,
}

struct InFlight {
    ticket: AppendTicket,
    /// (gen, position) reached once these records are durable.
    pos: Option<(u64, WalPos)>,
}

struct Follower {
    shared: Arc<Shared>,
    ctx: SourceContext,
    rt: Handle,
    tree: sled::Tree,
    snaps: std::sync::mpsc::Receiver<SnapRequest>,
    db: Option<Db>,
    gen: u64,
    /// After the last transaction read.
    pos: WalPos,
    /// No generation known yet (the log was empty): the first one seen is followed.
    fresh: bool,
    /// While `fresh`: a block on copying frames back (see [`Shm::block_copy_back`]). An empty
    /// log cannot be pinned, so without it the application could write a first generation,
    /// copy it back and reset the log before the source ever read it — and the source would
    /// take the next generation for the first. Dropped once the first generation is pinned.
    fresh_block: Option<super::shm::CopyBackBlock>,
    /// Not pinned, after reading every frame of `pos`'s generation at a moment when no more
    /// could be added to it (see the module docs): the next generation may follow.
    released: bool,
    last_roll: Instant,
    /// Poll without pausing until then: right after the pin was released, the next
    /// generation must be pinned before the application can reset it again.
    hot_until: Instant,
    last_hold_log: Instant,
    /// Last frame of the pin's snapshot (0: not pinned).
    pinned_at: u32,
    last_recycle: Instant,
    in_flight: VecDeque<InFlight>,
    /// Snapshot requests waiting for the write lock, and since when.
    snap_waiting: Vec<(SnapRequest, Instant)>,
    /// A blocking checkpoint seen running with the log read to its end but not copied back.
    ckpt_wait: Option<CkptWait>,
}

/// A checkpoint that may be stuck on the pin (see [`Follower::maybe_step_aside`]).
struct CkptWait {
    /// The log's state it was seen at; another state is another wait.
    salt: [u32; 2],
    mx: u32,
    since: Instant,
    /// Last seen (a gap means it ended).
    seen: Instant,
    /// Not stepping aside before then.
    next: Instant,
    /// How long to step aside next time.
    window: Duration,
}

type R<T> = Result<T, SourceError>;

impl Follower {
    fn err(&self, problem: impl Into<String>) -> SourceError {
        self.shared.err(problem)
    }

    fn sql(&self, what: &str) -> impl Fn(rusqlite::Error) -> SourceError + '_ {
        let what = what.to_string();
        move |e| self.err(format!("{what} ({}): {e}", self.shared.path.display()))
    }

    fn io(&self, what: &str) -> impl Fn(std::io::Error) -> SourceError + '_ {
        let what = what.to_string();
        move |error| SourceError::Io { source_name: self.shared.name.to_string(), context: what.clone(), error }
    }

    fn run(&mut self) -> R<()> {
        self.db = Some(self.open_db()?);
        self.start()?;
        loop {
            if self.ctx.cancel.is_cancelled() {
                return Ok(());
            }
            while let Ok(req) = self.snaps.try_recv() {
                self.snap_waiting.push((req, Instant::now()));
            }
            self.serve_snapshots();
            if let Some(why) = self.identity_changed() {
                self.reopen(&why)?;
                continue;
            }
            let got = match self.poll() {
                Ok(n) => n,
                Err(e) => {
                    warn!(source = %self.shared.name, error = %e, "reading the WAL failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    0
                }
            };
            self.settle(false)?;
            // (Rate-limited: every new pin may rewrite a read-mark slot, and a storm of them
            // makes the application's own readers retry.)
            if got == 0
                && self.db().pins.is_pinned()
                && self.pinned_at < self.pos.frame
                && self.last_roll.elapsed() >= ROLL_EVERY
            {
                // Idle with the pin behind the newest transaction: move it up, so that a
                // checkpoint (FULL and up waits for readers on older states) can proceed.
                if let Err(e) = self.pin() {
                    warn!(source = %self.shared.name, error = %e, "moving the WAL pin failed; retrying");
                }
            }
            if got == 0 {
                if let Err(e) = self.maybe_release().and_then(|()| self.maybe_recycle()) {
                    warn!(source = %self.shared.name, error = %e, "WAL housekeeping failed; retrying later");
                }
                if Instant::now() < self.hot_until {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// Opens the database and checks that it can be followed.
    fn open_db(&self) -> R<Db> {
        let path = &self.shared.path;
        let meta = std::fs::metadata(path).map_err(|e| {
            self.err(format!("database {} cannot be opened: {e}; fix the source's path", path.display()))
        })?;
        let open = || {
            let c =
                Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                    .map_err(self.sql("open the database"))?;
            c.busy_timeout(Duration::from_secs(5)).map_err(self.sql("set busy_timeout"))?;
            persist_wal(&c);
            Ok::<_, SourceError>(c)
        };
        let writer = open()?;
        let mode: String = writer
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(self.sql("read journal_mode (is it a SQLite database?)"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            if !self.shared.switch_to_wal {
                return Err(self.err(format!(
                    "database {p} is in journal_mode={mode}; lockstep follows SQLite databases in WAL mode. \
                     Switch it once with `sqlite3 {p} 'PRAGMA journal_mode=WAL'` (it stays in WAL mode), \
                     or set switch_to_wal = true for this source",
                    p = path.display()
                )));
            }
            let now: String = writer
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(self.sql("switch to WAL mode"))?;
            if !now.eq_ignore_ascii_case("wal") {
                return Err(self.err(format!(
                    "database {} could not be switched to WAL mode (still {now}); is another process holding it?",
                    path.display()
                )));
            }
            warn!(source = %self.shared.name, db = %path.display(), from = %mode, "switched the database to WAL mode (switch_to_wal)");
        }
        // A first read creates the log and its index if they do not exist yet.
        writer
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))
            .map_err(self.sql("read the schema"))?;
        let mut wal_path = path.clone().into_os_string();
        wal_path.push("-wal");
        let mut shm_path = path.clone().into_os_string();
        shm_path.push("-shm");
        Ok(Db {
            pins: Pins::new([open()?, open()?]),
            writer,
            wal_path: wal_path.into(),
            shm_path: shm_path.into(),
            wal: None,
            shm: None,
            ident: (meta.dev(), meta.ino()),
            checked: Instant::now(),
        })
    }

    fn db(&mut self) -> &mut Db {
        self.db.as_mut().expect("database open while following")
    }

    /// Resumes from the saved position, or starts over with a resync when the log cannot be
    /// shown to continue from it.
    fn start(&mut self) -> R<()> {
        let saved = self.tree.get(POS_KEY).ok().flatten().and_then(|v| {
            let gen = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
            Some((gen, WalPos::decode(&v[8..])?))
        });
        let Some((gen, pos)) = saved else {
            info!(source = %self.shared.name, db = %self.shared.path.display(), "first start: receivers will be seeded with a snapshot");
            return self.resync(None);
        };
        self.gen = gen;
        self.pos = pos;
        self.fresh = false;
        // Pin first, so that the log cannot be reset while we look at it.
        self.released = false;
        self.pin()?;
        let h = self.header()?;
        if h.is_some_and(|h| h.salt == pos.salt && h.ckpt_seq == pos.ckpt_seq) {
            info!(source = %self.shared.name, gen, frame = pos.frame, "resuming from the saved WAL position");
            self.ctx.status.set_state(SourceState::Streaming, None);
            Ok(())
        } else {
            self.resync(Some((
                "the WAL was reset while the agent was stopped (a checkpoint ran), so the transactions after the saved position cannot be read back".into(),
                false,
            )))
        }
    }

    fn wal(&mut self) -> R<Option<&File>> {
        let db = self.db.as_mut().expect("database open");
        if db.wal.is_none() {
            match File::open(&db.wal_path) {
                Ok(f) => db.wal = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => {
                    return Err(SourceError::Io {
                        source_name: self.shared.name.to_string(),
                        context: format!("open {}", db.wal_path.display()),
                        error,
                    })
                }
            }
        }
        Ok(db.wal.as_ref())
    }

    fn shm(&mut self) -> Option<&Shm> {
        let db = self.db.as_mut().expect("database open");
        if db.shm.is_none() {
            db.shm = Shm::open(&db.shm_path).ok();
        }
        db.shm.as_ref()
    }

    fn header(&mut self) -> R<Option<WalHeader>> {
        let Some(f) = self.wal()? else { return Ok(None) };
        let h = wal::read_header(f);
        h.map_err(self.io("read the WAL header"))
    }

    /// Reads and journals the transactions committed since the last poll; returns how many.
    fn poll(&mut self) -> R<usize> {
        let Some(h) = self.header()? else { return Ok(0) };
        if self.fresh {
            self.fresh = false;
            self.pos = WalPos::start(&h);
            // Nothing of it is read yet: it must be pinned (below) before it may be reset.
            self.released = false;
        } else if h.salt != self.pos.salt {
            let next = h.ckpt_seq == self.pos.ckpt_seq.wrapping_add(1) && h.salt[0] == self.pos.salt[0].wrapping_add(1);
            if self.released && next {
                self.gen += 1;
                self.pos = WalPos::start(&h);
                // Nothing of this generation is known to be read until it is pinned: if it is
                // reset before that, the next one must not be taken for its successor.
                self.released = false;
                self.pin()?;
                debug!(source = %self.shared.name, gen = self.gen, ckpt = h.ckpt_seq, "following the next WAL generation");
            } else {
                let pinned = self.db().pins.is_pinned();
                let why = if !self.released && !pinned {
                    "the WAL was reset again before the source could pin its new generation (the application \
                     checkpoints with RESTART or TRUNCATE faster than the source polls)"
                        .to_string()
                } else if self.released {
                    format!(
                        "the WAL jumped from checkpoint {} to {}: a whole generation was written and reset before it could be read",
                        self.pos.ckpt_seq, h.ckpt_seq
                    )
                } else {
                    "the WAL was reset while the source held it pinned".to_string()
                };
                self.resync(Some((why, true)))?;
                return Ok(0);
            }
        } else if self.pos.frame == 0 {
            // The same generation, nothing read yet: its header starts the chain.
            self.pos = WalPos::start(&h);
        }
        if !self.released && !self.db().pins.is_pinned() {
            // A new generation taken on but not pinned yet (its first transaction was not
            // committed when it was seen): pin it before reading, or a checkpoint could
            // reset it while we read.
            self.pin()?;
        }
        if self.fresh_block.is_some() && self.db().pins.is_pinned() {
            // The first generation is held by the pin now.
            self.fresh_block = None;
        }
        let pos = self.pos;
        let f = self.wal()?.expect("header was read");
        let (txns, end) = wal::read_committed(f, &h, pos, READ_BUDGET, HOLD_BYTES).map_err(self.io("read the WAL"))?;
        if txns.is_empty() {
            return Ok(0);
        }
        let n = txns.len();
        for t in txns {
            self.journal(t, &h)?;
        }
        self.pos = end;
        if !self.db().pins.is_pinned() || self.last_roll.elapsed() >= ROLL_EVERY {
            self.pin()?;
        }
        Ok(n)
    }

    /// One journal record: piece `chunk` of the transaction committed at frame `t.frame`.
    fn piece(&self, t: &Txn, h: &WalHeader, chunk: u32, last: bool, pages: Vec<proto::SqlitePage>) -> NewRecord {
        NewRecord {
            source: self.shared.name.clone(),
            captured_at_us: now_us(),
            payload: Change::Other(proto::change_event::Change::Sqlite(proto::SqliteFrames {
                gen: self.gen,
                frame: t.frame,
                page_size: h.page_size,
                db_pages: t.db_pages,
                chunk,
                last,
                pages,
                snapshot: false,
                zstd: true,
            }))
            .encode(),
        }
    }

    /// Hands one transaction to the journal in pieces of about `PIECE_BYTES`. Only the last
    /// carries the position: after a crash before it, the transaction is read and journaled
    /// again whole (the receiver drops the orphaned pieces). A transaction too large to hold
    /// (`Txn::large_from`) is re-read from its frames as it goes: committed frames do not
    /// change while the log is pinned.
    fn journal(&mut self, mut t: Txn, h: &WalHeader) -> R<()> {
        let at = WalPos { frame: t.frame, cksum: t.cksum, ..self.pos };
        let mut piece = Piece::default();
        let mut chunk = 0;
        match t.large_from {
            None => {
                for (pgno, data) in std::mem::take(&mut t.pages) {
                    self.add_page(&t, h, &mut piece, &mut chunk, pgno, &data)?;
                }
            }
            Some(from) => {
                let mut n = from;
                while n <= t.frame {
                    let f = self.wal()?.expect("the WAL is open while pinned");
                    let frames = wal::read_frames(f, h, n, (t.frame - n + 1).min(LARGE_READ_FRAMES))
                        .map_err(self.io("re-read a large transaction"))?;
                    if frames.is_empty() {
                        return Err(self
                            .shared
                            .err(format!("frames {n}..={} of a committed transaction vanished", t.frame)));
                    }
                    n += frames.len() as u32;
                    for (pgno, data) in frames {
                        self.add_page(&t, h, &mut piece, &mut chunk, pgno, &data)?;
                    }
                }
                info!(source = %self.shared.name, frame = t.frame, pieces = chunk + 1, "large transaction journaled piece by piece");
            }
        }
        let rec = self.piece(&t, h, chunk, true, piece.take());
        self.submit(vec![rec], Some((self.gen, at)))
    }

    /// Adds a page of `t` to its current piece, journaling the piece first if it is full.
    fn add_page(
        &mut self,
        t: &Txn,
        h: &WalHeader,
        piece: &mut Piece,
        chunk: &mut u32,
        pgno: u32,
        data: &[u8],
    ) -> R<()> {
        if piece.is_full() {
            let rec = self.piece(t, h, *chunk, false, piece.take());
            self.submit(vec![rec], None)?;
            *chunk += 1;
        }
        piece.add(pgno, data).map_err(self.io("compress a page"))
    }

    fn submit(&mut self, records: Vec<NewRecord>, pos: Option<(u64, WalPos)>) -> R<()> {
        let journal = self.ctx.journal.clone();
        let t = Instant::now();
        let ticket = self
            .rt
            .block_on(journal.submit(records))
            .map_err(|e| SourceError::Journal(e, self.shared.name.to_string()))?;
        if t.elapsed() > Duration::from_millis(20) {
            debug!(source = %self.shared.name, waited_ms = t.elapsed().as_millis() as u64, "the journal held up a submission");
        }
        self.in_flight.push_back(InFlight { ticket, pos });
        Ok(())
    }

    /// Completes durable submissions in order (all of them, waiting, if `wait`), saving the
    /// position they reach.
    fn settle(&mut self, wait: bool) -> R<()> {
        while let Some(front) = self.in_flight.front_mut() {
            let r = if wait {
                self.rt.block_on(front.ticket.durable())
            } else {
                match front.ticket.try_durable() {
                    Some(r) => r,
                    None => break,
                }
            };
            let f = self.in_flight.pop_front().expect("non-empty");
            let metas: Vec<RecordMeta> = r.map_err(|e| SourceError::Journal(e, self.shared.name.to_string()))?;
            if let Some(m) = metas.last() {
                self.ctx.status.journaled(m.seq, metas.len() as u64);
            }
            if let Some((gen, p)) = f.pos {
                self.save(gen, p);
            }
        }
        Ok(())
    }

    /// Saved with the journal's next flush; a stale value only means re-reading transactions
    /// the receivers then skip.
    fn save(&self, gen: u64, p: WalPos) {
        let mut v = gen.to_be_bytes().to_vec();
        v.extend_from_slice(&p.encode());
        let _ = self.tree.insert(POS_KEY, v);
    }

    /// Takes a read transaction at the newest state on the idle pin connection, then lets go
    /// of the previous one. Returns whether the log is now pinned.
    fn pin(&mut self) -> R<bool> {
        let _slow = SlowCall::start("pin");
        self.last_roll = Instant::now();
        let db = self.db.as_mut().expect("database open");
        let got = db.pins.roll().map_err(|e| self.shared.err(format!("pin the WAL: {e}")))?;
        // (None: an empty log, or busy; the previous pin, if any, stays.)
        if let Some((mx_frame, salt)) = got {
            self.pinned(mx_frame, salt);
        }
        Ok(self.db().pins.is_pinned())
    }

    /// Notes a new pin at (last frame, salts).
    fn pinned(&mut self, mx_frame: u32, salt: [u32; 2]) {
        self.pinned_at = mx_frame;
        if salt == self.pos.salt {
            self.released = false;
        }
    }

    /// Which of the follower's connections are inside a transaction (for diagnostics: the
    /// lock probes cannot see this process's own locks).
    fn own_transactions(&mut self) -> String {
        let db = self.db();
        format!("{} writer {}", db.pins.describe(), if db.writer.is_autocommit() { '-' } else { 'T' })
    }

    fn unpin(&mut self) {
        let _slow = SlowCall::start("unpin");
        self.pinned_at = 0;
        self.db().pins.release();
    }

    /// Lets a checkpoint that waits for the pin (RESTART, TRUNCATE) reset the log, when that
    /// cannot lose a frame (see the module docs).
    fn maybe_release(&mut self) -> R<()> {
        if !self.db().pins.is_pinned() || self.fresh {
            return Ok(());
        }
        let pos = self.pos;
        let log_hold = self.last_hold_log.elapsed() > Duration::from_secs(1);
        let Some(shm) = self.shm() else { return Ok(()) };
        if !shm.other_writer().unwrap_or(false) {
            return Ok(());
        }
        let Some(st) = shm.state().unwrap_or(None) else { return Ok(()) };
        let caught_up = st.salt == pos.salt && st.mx_frame == pos.frame;
        // Four lock probes: only worth it once the index shows everything read.
        let readers = caught_up && shm.other_wal_readers().unwrap_or(true);
        let locks = log_hold.then(|| shm.held());
        let checkpointer = caught_up && st.n_backfill < st.mx_frame && shm.other_checkpointer().unwrap_or(false);
        if checkpointer {
            // A checkpoint that stays stuck although everything is read: maybe on a stale
            // mark of the pin's slot (see `pin`), which only stepping aside lets through —
            // worth trying when no other process reads from the log (it could be waiting for
            // that reader instead).
            self.maybe_step_aside(st, !readers)?;
        }
        if caught_up && !readers && st.n_backfill < st.mx_frame {
            // A checkpoint is copying back and may wait on our pin's read-mark slot: when
            // SQLite could not claim a free slot, a reader shares one whose mark is older
            // than its snapshot. Take the pin again (on a fresh slot) and free the old one.
            if self.last_roll.elapsed() >= ROLL_EVERY {
                self.pin()?;
            }
            if log_hold {
                self.last_hold_log = Instant::now();
                let own = self.own_transactions();
                debug!(source = %self.shared.name, ?st, read = pos.frame, pinned_at = self.pinned_at, ?locks, own,
                    "another process holds the write lock and copies back; moved the WAL pin up");
            }
            return Ok(());
        }
        if !caught_up || readers || st.n_backfill != st.mx_frame {
            if log_hold {
                self.last_hold_log = Instant::now();
                let own = self.own_transactions();
                debug!(source = %self.shared.name, ?st, read = pos.frame, pinned_at = self.pinned_at, other_readers = readers, ?locks, own,
                    "another process holds the write lock; keeping the WAL pinned");
            }
            return Ok(());
        }
        let Some(h) = self.header()? else { return Ok(()) };
        let f = self.wal()?.expect("header was read");
        if h.salt != pos.salt || wal::frame_follows(f, &h, pos).unwrap_or(true) {
            return Ok(());
        }
        self.settle(true)?;
        self.unpin();
        self.released = true;
        self.hot_until = Instant::now() + HOT_AFTER_RELEASE;
        // A commit that slipped in between the checks and the release: pin it again at once.
        if let Some(st) = self.shm().and_then(|s| s.state().ok().flatten()) {
            if st.salt == pos.salt && st.mx_frame != pos.frame {
                self.released = false;
                self.pin()?;
            }
        }
        debug!(source = %self.shared.name, frame = pos.frame, "released the WAL to a waiting checkpoint");
        Ok(())
    }

    /// Steps aside (see [`Pins::step_aside`]) for a blocking checkpoint that has been running
    /// for [`STEP_ASIDE_AFTER`] with the log read to its end but not copied back: the pin is
    /// let go for a while, with copying back blocked so that the log cannot be reset.
    /// Repeated, with a longer pause each time, while the same checkpoint stays stuck; only
    /// when `now_ok`.
    fn maybe_step_aside(&mut self, st: IndexState, now_ok: bool) -> R<()> {
        let now = Instant::now();
        let w = match &mut self.ckpt_wait {
            Some(w) if w.salt == st.salt && w.mx == st.mx_frame && now - w.seen < STEP_ASIDE_AFTER => w,
            _ => self.ckpt_wait.insert(CkptWait {
                salt: st.salt,
                mx: st.mx_frame,
                since: now,
                seen: now,
                next: now + STEP_ASIDE_AFTER,
                window: BUSY_RETRY + STEP_ASIDE_AFTER,
            }),
        };
        w.seen = now;
        if now < w.next || !now_ok {
            return Ok(());
        }
        let window = w.window;
        w.window = (w.window * 2).min(STEP_ASIDE_MAX);
        let waited = now - w.since;
        let db = self.db.as_mut().expect("database open");
        let Some(shm) = db.shm.as_ref() else { return Ok(()) };
        let r = db.pins.step_aside(shm, window, || shm.other_writer().unwrap_or(true));
        if let Some(w) = &mut self.ckpt_wait {
            // Give the checkpoint its turn before trying again.
            w.next = Instant::now() + window;
        }
        match r {
            Ok(StepAside::NotNeeded) => {}
            Ok(StepAside::Repinned(mx_frame, salt)) => {
                self.pinned(mx_frame, salt);
                self.last_roll = Instant::now();
                debug!(source = %self.shared.name, ?st, waited_ms = waited.as_millis() as u64, window_ms = window.as_millis() as u64,
                    "a checkpoint stayed stuck on the WAL pin; stepped aside with copying back blocked");
            }
            Ok(StepAside::Unpinned) => {
                // Not released: a reset before the next pin is caught (and resynced) by `poll`.
                self.pinned_at = 0;
                warn!(source = %self.shared.name, "stepping aside for a checkpoint, the WAL could not be pinned again; retrying");
            }
            Err(e) => debug!(source = %self.shared.name, error = %e, "could not block copying back to step aside"),
        }
        Ok(())
    }

    /// Resets a long log itself: under the write lock, reads it to the end, copies it back
    /// and lets the next writer start a new generation.
    fn maybe_recycle(&mut self) -> R<()> {
        if self.pos.frame < RECYCLE_FRAMES || self.last_recycle.elapsed() < Duration::from_secs(1) {
            return Ok(());
        }
        self.last_recycle = Instant::now();
        if !self.db().pins.is_pinned() {
            return Ok(());
        }
        // Copy back what the pin allows before holding up the application's writers.
        let _ = self.checkpoint_passive(false);
        if !self.try_write_lock(LOCK_TRY)? {
            return Ok(());
        }
        let t = Instant::now();
        let r = self.recycle_locked();
        let _ = self.db().writer.execute_batch("ROLLBACK");
        debug!(source = %self.shared.name, held_ms = t.elapsed().as_millis() as u64, "write lock released after recycling");
        r
    }

    fn recycle_locked(&mut self) -> R<()> {
        while self.poll()? > 0 {}
        self.settle(true)?;
        if self.shm().is_none_or(|s| s.other_wal_readers().unwrap_or(true)) {
            return Ok(());
        }
        self.unpin();
        if self.checkpoint_passive(true)? {
            self.released = true;
            self.hot_until = Instant::now() + HOT_AFTER_RELEASE;
            debug!(source = %self.shared.name, frames = self.pos.frame, "recycled the WAL");
        } else {
            self.pin()?;
        }
        Ok(())
    }

    /// PASSIVE checkpoint on an idle pin connection; returns whether every frame is copied
    /// back.
    fn checkpoint_passive(&mut self, must: bool) -> R<bool> {
        let _slow = SlowCall::start("checkpoint_passive");
        let db = self.db.as_mut().expect("database open");
        let r = db.pins.idle().query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match r {
            Ok((busy, log, done)) => Ok(busy == 0 && log == done),
            Err(e) if must => Err(self.shared.err(format!("checkpoint: {e}"))),
            Err(_) => Ok(false),
        }
    }

    /// Starts over from the log's current end: every receiver is reseeded with a snapshot.
    /// `why`: the reason and whether it is an alarm (ERROR) or an expected cost (WARN, e.g.
    /// after the agent was down); None on a first start.
    fn resync(&mut self, why: Option<(String, bool)>) -> R<()> {
        self.settle(true)?;
        self.gen += 1;
        let own_lock = self.db().writer.is_autocommit();
        if own_lock {
            // Starting over anyway: nothing is lost by letting go of the log, and a checkpoint
            // holding the write lock while it waits for our pin can then finish.
            self.unpin();
            if !self.try_write_lock(WRITE_LOCK_PATIENCE)? {
                return Err(self.err(format!(
                    "the write lock of {} stayed busy for {WRITE_LOCK_PATIENCE:?}; cannot find the end of the WAL",
                    self.shared.path.display()
                )));
            }
        }
        let r = self.find_end();
        if own_lock {
            let _ = self.db().writer.execute_batch("ROLLBACK");
        }
        r?;
        self.save(self.gen, self.pos);
        let floor = self.ctx.resync_floor.clone();
        let raised =
            floor.raise(&self.shared.name).map_err(|e| SourceError::Journal(e, self.shared.name.to_string()))?;
        // A record of this source at or above the floor, so a receiver seeded after it is
        // past the floor.
        let marker = proto::SqliteFrames { gen: self.gen, frame: self.pos.frame, last: true, ..Default::default() };
        self.submit(
            vec![NewRecord {
                source: self.shared.name.clone(),
                captured_at_us: now_us(),
                payload: Change::Other(proto::change_event::Change::Sqlite(marker)).encode(),
            }],
            Some((self.gen, self.pos)),
        )?;
        self.settle(true)?;
        self.ctx.resync_floor.kick();
        match why {
            Some((why, true)) => {
                error!(source = %self.shared.name, floor = raised.0, "{why}; every receiver will be resynced from a new snapshot")
            }
            Some((why, false)) => {
                warn!(source = %self.shared.name, floor = raised.0, "{why}; every receiver will be resynced from a new snapshot")
            }
            None => info!(source = %self.shared.name, gen = self.gen, frame = self.pos.frame, "following the WAL"),
        }
        self.ctx.status.set_state(SourceState::Streaming, None);
        Ok(())
    }

    /// With the write lock held: the position after the last committed frame, pinned.
    fn find_end(&mut self) -> R<()> {
        self.unpin();
        match self.header()? {
            Some(h) => {
                let mut pos = WalPos::start(&h);
                loop {
                    let f = self.wal()?.expect("header was read");
                    let (txns, end) =
                        wal::read_committed(f, &h, pos, READ_BUDGET, HOLD_BYTES).map_err(self.io("read the WAL"))?;
                    pos = end;
                    if txns.is_empty() {
                        break;
                    }
                }
                self.pos = pos;
                self.fresh = false;
                self.fresh_block = None;
            }
            None => {
                self.pos = WalPos { ckpt_seq: 0, salt: [0, 0], frame: 0, cksum: [0, 0] };
                self.fresh = true;
                // Linux only (elsewhere None: the first generation is then unprotected until
                // it is pinned).
                self.fresh_block = match self.shm() {
                    Some(shm) => shm.block_copy_back().map_err(self.io("block copying back in the empty WAL"))?,
                    None => None,
                };
            }
        }
        // Nothing can be added while we hold the write lock: the log is read to its end.
        self.released = true;
        self.pin()?;
        Ok(())
    }

    /// With the write lock held, reads the log to its end and opens a read transaction at
    /// exactly that point for the snapshotter.
    /// Starts the snapshots waiting for the write lock. The lock is only tried briefly: the
    /// holder may be a checkpoint waiting for this very thread to move or release the pin,
    /// so between tries the loop goes on doing that.
    fn serve_snapshots(&mut self) {
        if self.snap_waiting.is_empty() {
            return;
        }
        let r = match self.try_write_lock(LOCK_TRY) {
            Ok(true) => {
                let r = self.snapshot_locked();
                let _ = self.db().writer.execute_batch("ROLLBACK");
                r.map_err(|e| e.to_string())
            }
            Ok(false) => {
                // Busy: tell the ones that waited too long, keep the others.
                let (late, keep): (Vec<_>, Vec<_>) =
                    self.snap_waiting.drain(..).partition(|(_, since)| since.elapsed() > WRITE_LOCK_PATIENCE);
                self.snap_waiting = keep;
                for (req, _) in late {
                    let _ = req.reply.send(Err(format!(
                        "the database's write lock stayed busy for {WRITE_LOCK_PATIENCE:?}; retrying later"
                    )));
                }
                return;
            }
            Err(e) => Err(e.to_string()),
        };
        // Each snapshot needs a read transaction of its own: one per turn of the loop.
        let (req, _) = self.snap_waiting.remove(0);
        let _ = req.reply.send(r);
    }

    /// Tries to take the database's write lock, waiting at most `patience`; false if it
    /// stayed busy.
    fn try_write_lock(&mut self, patience: Duration) -> R<bool> {
        let _slow = (patience <= LOCK_TRY).then(|| SlowCall::start("try_write_lock"));
        let w = &self.db().writer;
        let _ = w.busy_timeout(patience);
        let r = w.execute_batch("BEGIN IMMEDIATE");
        let _ = w.busy_timeout(Duration::from_secs(5));
        match r {
            Ok(()) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => Ok(false),
            Err(e) => Err(self.err(format!("take the write lock ({}): {e}", self.shared.path.display()))),
        }
    }

    fn snapshot_locked(&mut self) -> R<SnapStart> {
        let _slow = SlowCall::start("snapshot_locked");
        while self.poll()? > 0 {}
        let conn = Connection::open_with_flags(
            &self.shared.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(self.sql("open the database for a snapshot"))?;
        conn.execute_batch("BEGIN").map_err(self.sql("begin the snapshot"))?;
        let q = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, u32>(0));
        q("SELECT count(*) FROM sqlite_master").map_err(self.sql("read the schema"))?;
        let page_size = q("PRAGMA page_size").map_err(self.sql("read page_size"))?;
        let db_pages = q("PRAGMA page_count").map_err(self.sql("read page_count"))?;
        info!(source = %self.shared.name, gen = self.gen, frame = self.pos.frame, pages = db_pages, "snapshot starts");
        Ok(SnapStart { conn, gen: self.gen, frame: self.pos.frame, page_size, db_pages })
    }

    /// Why the database file is no longer the one opened, if it is not.
    fn identity_changed(&mut self) -> Option<String> {
        let path = self.shared.path.clone();
        let db = self.db.as_mut()?;
        if db.checked.elapsed() < IDENTITY_EVERY {
            return None;
        }
        db.checked = Instant::now();
        match std::fs::metadata(&path) {
            Ok(m) if (m.dev(), m.ino()) == db.ident => None,
            Ok(_) => Some("was replaced by another file".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("was deleted".into()),
            Err(e) => Some(format!("cannot be examined ({e})")),
        }
    }

    /// The database file changed underneath: report it, wait for a database at the path
    /// again, and resync from it.
    fn reopen(&mut self, why: &str) -> R<()> {
        let msg = format!(
            "database file {} {why} while lockstep was following it; waiting for a database at that path to resync from",
            self.shared.path.display()
        );
        error!(source = %self.shared.name, "{msg}");
        self.ctx.status.set_state(SourceState::Error, Some(msg));
        self.settle(true)?;
        self.db = None;
        loop {
            if self.ctx.cancel.is_cancelled() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
            if !self.shared.path.exists() {
                continue;
            }
            match self.open_db() {
                Ok(db) => {
                    self.db = Some(db);
                    break;
                }
                Err(e) => debug!(source = %self.shared.name, error = %e, "database not ready yet"),
            }
        }
        self.resync(Some((format!("the database file {why}"), true)))
    }
}

/// Closing the agent's last connection must never delete the log by name: after the
/// database file was replaced, that name may belong to the new database's log.
fn persist_wal(conn: &Connection) {
    let mut on: std::ffi::c_int = 1;
    // SAFETY: valid handle; SQLITE_FCNTL_PERSIST_WAL takes a pointer to an int.
    unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut on as *mut std::ffi::c_int).cast(),
        );
    }
}
