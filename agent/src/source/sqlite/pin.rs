//! The follower's pin on the log: a read transaction on one of two connections, rolled forward
//! by taking the new one before letting go of the old (see [`super::follow`] for why the log
//! must stay pinned, and when it may be let go).
//!
//! **A checkpoint stuck on a stale read mark.** A FULL, RESTART or TRUNCATE checkpoint looks at
//! each read-mark slot once: when the slot's mark is below the frame it wants to copy up to, it
//! waits (with the application's busy handler) until it can lock *that slot* exclusively —
//! it never looks at the mark again. If our pin claims the slot in between (rewriting its mark
//! to the newest frame, which the checkpoint no longer minds), the checkpoint keeps waiting for
//! the slot; and every later roll of the pin lands on that same slot (it is the one whose mark
//! equals the newest frame) while the previous pin still holds it, so the slot is never free
//! and the checkpoint waits out its whole busy timeout. Rolling cannot help then: the pin has
//! to let go of its slot for as long as the checkpoint takes to try it again.
//! [`Pins::step_aside`] does so safely: it first blocks every copy back with a lock on
//! read-mark 0, which keeps the log from being reset while it is not pinned, then lets go of
//! the pin, waits, pins again and lifts the block.

use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::shm::Shm;

/// Longest pause between two tries of SQLite's default busy handler (`sqliteDefaultBusyCallback`
/// sleeps 1, 2, 5, …, 50, then 100 ms): a checkpoint waiting for a slot tries it again within
/// this time.
pub(super) const BUSY_RETRY: Duration = Duration::from_millis(100);

/// The two pin connections and which one holds the read transaction.
pub(super) struct Pins {
    conns: [Connection; 2],
    /// The connection holding the read transaction, if any.
    active: Option<usize>,
}

/// What [`Pins::step_aside`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StepAside {
    /// Nothing: a checkpoint is copying back (it holds read-mark 0), or the log is already
    /// copied back to its end (a checkpoint waiting now waits for the pin to be released, not
    /// moved), or read-mark 0 cannot be locked on this platform.
    NotNeeded,
    /// Let go of the pin for a while and pinned again at this snapshot (last frame, salts).
    Repinned(u32, [u32; 2]),
    /// Let go of the pin and could not pin again: the log is not pinned.
    Unpinned,
}

impl Pins {
    pub(super) fn new(conns: [Connection; 2]) -> Pins {
        Pins { conns, active: None }
    }

    pub(super) fn is_pinned(&self) -> bool {
        self.active.is_some()
    }

    /// The connection not holding the pin (for the follower's own PASSIVE checkpoints).
    pub(super) fn idle(&self) -> &Connection {
        &self.conns[self.active.map_or(0, |a| 1 - a)]
    }

    /// Which connections are inside a transaction, for diagnostics.
    pub(super) fn describe(&self) -> String {
        let t = |c: &Connection| if c.is_autocommit() { '-' } else { 'T' };
        format!("pins {}{} (active {:?})", t(&self.conns[0]), t(&self.conns[1]), self.active)
    }

    /// Takes a read transaction at the newest state on the idle connection, then lets go of
    /// the previous one. Returns the new snapshot (last frame, salts), or None when the log is
    /// empty or the snapshot could not be taken — the previous pin, if any, is kept then.
    pub(super) fn roll(&mut self) -> rusqlite::Result<Option<(u32, [u32; 2])>> {
        let next = self.active.map_or(0, |a| 1 - a);
        let conn = &self.conns[next];
        conn.execute_batch("BEGIN")?;
        match snapshot_get(conn) {
            Some((mx_frame, salt)) if mx_frame > 0 => {
                if let Some(old) = self.active.replace(next) {
                    let _ = self.conns[old].execute_batch("COMMIT");
                }
                Ok(Some((mx_frame, salt)))
            }
            _ => {
                let _ = conn.execute_batch("COMMIT");
                Ok(None)
            }
        }
    }

    /// Lets go of the pin.
    pub(super) fn release(&mut self) {
        if let Some(a) = self.active.take() {
            let _ = self.conns[a].execute_batch("COMMIT");
        }
    }

    /// Lets a checkpoint stuck on the pin's read-mark slot through (see the module docs)
    /// without letting the log be reset: blocks copying back (read-mark 0), checks that the
    /// log is not yet copied back to its end, lets go of the pin for `window` (or until
    /// `keep_waiting` says no more), pins again, and only then lifts the block. The block
    /// holds up every checkpoint's copying for that long, so this is for a checkpoint already
    /// held up by us.
    pub(super) fn step_aside(
        &mut self,
        shm: &Shm,
        window: Duration,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> std::io::Result<StepAside> {
        let Some(block) = shm.block_copy_back()? else { return Ok(StepAside::NotNeeded) };
        // Only now, with copying back blocked, is "not all copied back" sure to last.
        match shm.state()? {
            Some(st) if st.n_backfill < st.mx_frame => {}
            _ => return Ok(StepAside::NotNeeded),
        }
        self.release();
        let until = Instant::now() + window;
        while Instant::now() < until && keep_waiting() {
            thread::sleep(Duration::from_millis(1));
        }
        // Pin again before the block is lifted. A failure here is a transient busy
        // (recovery running, say): try for a while, then give up and report it.
        let mut repinned = None;
        for _ in 0..50 {
            if let Ok(Some(snap)) = self.roll() {
                repinned = Some(snap);
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        drop(block);
        Ok(match repinned {
            Some((mx, salt)) => StepAside::Repinned(mx, salt),
            None => StepAside::Unpinned,
        })
    }
}

/// Starts `conn`'s read transaction (it must be in `BEGIN` and not have read yet) through
/// `sqlite3_snapshot_get`, which never reads from the database file alone while the log holds
/// frames — so the transaction pins the log. Returns the snapshot's last frame and salts.
pub(super) fn snapshot_get(conn: &Connection) -> Option<(u32, [u32; 2])> {
    use rusqlite::ffi;
    let mut snap: *mut ffi::sqlite3_snapshot = std::ptr::null_mut();
    // SAFETY: the handle is valid while `conn` lives and is used from this thread only;
    // "main" is NUL-terminated; `snap` is freed below.
    let rc = unsafe { ffi::sqlite3_snapshot_get(conn.handle(), c"main".as_ptr(), &mut snap) };
    if rc != ffi::SQLITE_OK || snap.is_null() {
        return None;
    }
    // SAFETY: a snapshot is the 48-byte WAL index header (`sqlite3_snapshot::hidden`), which
    // holds mxFrame at offset 16 (native byte order) and the salts at 32 (copied from the log
    // header, big-endian).
    let hdr: [u8; 48] = unsafe { (*snap).hidden };
    // SAFETY: `snap` came from sqlite3_snapshot_get and is freed once.
    unsafe { ffi::sqlite3_snapshot_free(snap) };
    let word = |at: usize| <[u8; 4]>::try_from(&hdr[at..at + 4]).expect("4 bytes");
    Some((u32::from_ne_bytes(word(16)), [u32::from_be_bytes(word(32)), u32::from_be_bytes(word(36))]))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::thread::JoinHandle;

    use super::*;

    /// Per test: 0 before the checkpoint first finds its slot busy, 1 while it waits for the
    /// test to set the stage, 2 after.
    static STAGE: [AtomicU8; 2] = [AtomicU8::new(0), AtomicU8::new(0)];

    /// The application checkpoint's busy handler: the first call hands over to the test and
    /// waits for it; later ones retry every 10 ms, for 3 s at most (the application's busy
    /// timeout, shortened).
    fn busy<const T: usize>(n: i32) -> bool {
        if n == 0 {
            STAGE[T].store(1, Ordering::SeqCst);
            while STAGE[T].load(Ordering::SeqCst) != 2 {
                thread::sleep(Duration::from_millis(1));
            }
            return true;
        }
        thread::sleep(Duration::from_millis(10));
        n < 300
    }

    fn open(path: &Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    /// A WAL database with table `t` and no automatic checkpoints, and the application's
    /// connection to it.
    fn app_db() -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let app = open(&path);
        app.pragma_update(None, "journal_mode", "WAL").unwrap();
        app.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        app.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").unwrap();
        (dir, path, app)
    }

    fn insert(c: &Connection, n: usize) {
        for i in 0..n {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")]).unwrap();
        }
    }

    struct Stuck {
        _dir: tempfile::TempDir,
        path: PathBuf,
        pins: Pins,
        shm: Shm,
        /// The log's last frame.
        mx: u32,
        /// The application's checkpoint: (busy, log, checkpointed) and how long it took.
        ckpt: JoinHandle<(i64, i64, i64, Duration)>,
    }

    /// An application checkpoint (`mode`) stuck on a stale read mark: it saw slot 1 at an old
    /// frame (a reader's) and waits for the slot; the reader finishes and the pin claims the
    /// slot, moving its mark to the last frame, before the checkpoint tries the slot again.
    fn stuck_checkpoint<const T: usize>(mode: &'static str) -> Stuck {
        let (dir, path, app) = app_db();
        // A new generation: read marks [0, 0, unused...].
        app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        insert(&app, 3);
        let reader = open(&path);
        reader.execute_batch("BEGIN").unwrap();
        reader.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap();
        // The checkpoint's connection reads the schema now: later, that first read would
        // claim a slot of its own.
        let ckpt_conn = Connection::open(&path).unwrap();
        ckpt_conn.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap();
        insert(&app, 5);
        let shm = Shm::open(&dir.path().join("t.db-shm")).unwrap();
        let st = shm.state().unwrap().unwrap();
        assert_eq!(st.read_marks[1], 3, "the reader's mark: {st:?}");
        let mx = st.mx_frame;
        assert_eq!(mx, 8);

        let ckpt = {
            let c = ckpt_conn;
            thread::spawn(move || {
                c.busy_handler(Some(busy::<T>)).unwrap();
                let t = Instant::now();
                let r = c
                    .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .unwrap();
                (r.0, r.1, r.2, t.elapsed())
            })
        };
        let t = Instant::now();
        while STAGE[T].load(Ordering::SeqCst) != 1 {
            assert!(t.elapsed() < Duration::from_secs(5), "the checkpoint never waited for the reader");
            thread::sleep(Duration::from_millis(1));
        }
        reader.execute_batch("COMMIT").unwrap();
        let mut pins = Pins::new([open(&path), open(&path)]);
        assert_eq!(pins.roll().unwrap().map(|s| s.0), Some(mx));
        let st = shm.state().unwrap().unwrap();
        assert_eq!(st.read_marks[1], mx, "the pin claimed slot 1: {st:?}");
        STAGE[T].store(2, Ordering::SeqCst);
        Stuck { _dir: dir, path, pins, shm, mx, ckpt }
    }

    #[test]
    fn a_checkpoint_stuck_on_a_stale_read_mark_gets_through_when_the_pin_steps_aside() {
        let mut s = stuck_checkpoint::<0>("FULL");
        // Rolling the pin, as the follower does, keeps the slot held: the checkpoint stays stuck.
        for _ in 0..40 {
            assert_eq!(s.pins.roll().unwrap().map(|s| s.0), Some(s.mx));
            thread::sleep(Duration::from_millis(5));
        }
        assert!(!s.ckpt.is_finished(), "the checkpoint was expected to be stuck on the pin's slot");

        let r = s.pins.step_aside(&s.shm, Duration::from_millis(100), || true).unwrap();
        assert!(matches!(r, StepAside::Repinned(mx, _) if mx == s.mx), "{r:?}");
        assert!(s.pins.is_pinned());
        let (busy, log, done, took) = s.ckpt.join().unwrap();
        assert_eq!((busy, done), (0, log), "the checkpoint copied everything back");
        assert!(took < Duration::from_secs(2), "the checkpoint took {took:?}");
    }

    #[test]
    fn stepping_aside_never_lets_a_checkpoint_reset_the_log() {
        let mut s = stuck_checkpoint::<1>("TRUNCATE");
        let salt = s.shm.state().unwrap().unwrap().salt;
        let r = s.pins.step_aside(&s.shm, Duration::from_millis(100), || true).unwrap();
        // While the pin was let go, the checkpoint got its slot but could not copy back, let
        // alone reset the log: the pin is back on the same generation.
        assert_eq!(r, StepAside::Repinned(s.mx, salt));
        // Now it copies everything back and waits for the pin to be released.
        let t = Instant::now();
        while s.shm.state().unwrap().unwrap().n_backfill != s.mx {
            assert!(t.elapsed() < Duration::from_secs(2), "the checkpoint did not copy back");
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(50));
        assert!(!s.ckpt.is_finished(), "a TRUNCATE checkpoint finished while the log was pinned");
        let st = s.shm.state().unwrap().unwrap();
        assert_eq!((st.salt, st.mx_frame), (salt, s.mx), "the log was reset under the pin");
        assert!(std::fs::metadata(s.path.with_extension("db-wal")).unwrap().len() > 0);
        // Released, the log is reset at once.
        s.pins.release();
        let (busy, log, done, took) = s.ckpt.join().unwrap();
        assert_eq!((busy, log, done), (0, 0, 0));
        assert!(took < Duration::from_secs(2), "the checkpoint took {took:?}");
    }

    #[test]
    fn no_step_aside_once_the_log_is_copied_back() {
        let (dir, path, app) = app_db();
        insert(&app, 3);
        let mut pins = Pins::new([open(&path), open(&path)]);
        assert!(pins.roll().unwrap().is_some());
        app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).unwrap();
        let shm = Shm::open(&dir.path().join("t.db-shm")).unwrap();
        assert_eq!(pins.step_aside(&shm, Duration::from_millis(10), || true).unwrap(), StepAside::NotNeeded);
        assert!(pins.is_pinned(), "the pin must stay when stepping aside is not needed");
    }
}
