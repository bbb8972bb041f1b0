//! Tests against real SQLite files: a source database in WAL mode is changed with rusqlite, its
//! pages are read through `sqlite_dbpage` (whole for snapshots, diffed between two states for
//! transactions) and applied; the standby must then match the source row for row and pass
//! `PRAGMA integrity_check`, also while readers have it open.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lockstep_common::event::{Change, FsOp, JournalId, Seq};
use lockstep_common::proto::{self, SqliteFrames, SqlitePage};
use lockstep_common::relpath::RelPath;
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};

use super::{sidecar, SqliteApplier, WalPos};
use crate::applier::{Applier, ApplyError, Position};

const JOURNAL: JournalId = JournalId([7; 16]);

type Pages = BTreeMap<u32, Vec<u8>>;

fn read_pages(conn: &Connection) -> Pages {
    let mut stmt = conn.prepare("SELECT pgno, data FROM sqlite_dbpage").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

fn page_size(conn: &Connection) -> u32 {
    conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap()
}

/// sqlite_master, then every table's rows in rowid order.
fn dump_conn(conn: &Connection) -> Vec<String> {
    try_dump(conn).unwrap()
}

/// [`dump_conn`], returning SQLite's error (a reader that may see a broken database).
fn try_dump(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut tables = Vec::new();
    let mut stmt = conn.prepare("SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master ORDER BY type, name")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row = (0..5).map(|i| r.get(i)).collect::<rusqlite::Result<Vec<Value>>>()?;
        if row[0] == Value::Text("table".into()) {
            let Value::Text(name) = &row[1] else { unreachable!() };
            tables.push(name.clone());
        }
        out.push(format!("{row:?}"));
    }
    for t in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\" ORDER BY rowid"))?;
        let n = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let row = (0..n).map(|i| r.get(i)).collect::<rusqlite::Result<Vec<Value>>>()?;
            out.push(format!("{t}: {row:?}"));
        }
    }
    Ok(out)
}

fn integrity(conn: &Connection) -> String {
    try_integrity(conn).unwrap()
}

fn try_integrity(conn: &Connection) -> rusqlite::Result<String> {
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?.join("; "))
}

/// Asserts that reader `r` sees, intact, either the database `old` or the database `new`
/// (dumps), and says which.
fn assert_old_or_new(r: &Connection, what: &str, old: &[String], new: &[String]) -> &'static str {
    let dump = try_dump(r).unwrap_or_else(|e| panic!("{what}: reading the standby fails: {e}"));
    let seen = if dump == old {
        "old"
    } else if dump == new {
        "new"
    } else {
        panic!(
            "{what} sees neither the old nor the new database: {} rows, not {} or {}",
            dump.len(),
            old.len(),
            new.len()
        )
    };
    let check = try_integrity(r).unwrap_or_else(|e| panic!("{what}: integrity_check fails: {e}"));
    assert_eq!(check, "ok", "{what}: integrity of the {seen} database");
    seen
}

/// A reader of the standby, as an operator's `sqlite3` would be (read-only: it never
/// checkpoints).
fn reader(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).unwrap()
}

/// Dump of the standby by a fresh reader, after checking its integrity.
fn standby_dump(path: &Path) -> Vec<String> {
    let r = reader(path);
    assert_eq!(integrity(&r), "ok", "standby integrity");
    dump_conn(&r)
}

fn sqlite(f: SqliteFrames) -> Change {
    Change::Other(proto::change_event::Change::Sqlite(f))
}

fn frames(pages: impl IntoIterator<Item = (u32, Vec<u8>)>) -> Vec<SqlitePage> {
    pages.into_iter().map(|(pgno, data)| SqlitePage { pgno, data: Bytes::from(data) }).collect()
}

/// The snapshot pieces of `pages` at `at`, `per_piece` pages each; only the last piece says
/// how large the database is, as the receiver must accept.
fn snapshot_pieces(pages: &Pages, page_size: u32, at: WalPos, per_piece: usize) -> Vec<SqliteFrames> {
    let all: Vec<(u32, Vec<u8>)> = pages.iter().map(|(k, v)| (*k, v.clone())).collect();
    let groups: Vec<_> = all.chunks(per_piece).collect();
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let last = i == n - 1;
            SqliteFrames {
                gen: if last { at.gen } else { 0 },
                frame: if last { at.frame } else { 0 },
                page_size,
                db_pages: if last { pages.len() as u32 } else { 0 },
                chunk: i as u32,
                last,
                pages: frames(g.to_vec()),
                snapshot: true,
                zstd: false,
            }
        })
        .collect()
}

/// A source database in WAL mode, and what of it was shipped.
struct Source {
    conn: Connection,
    page_size: u32,
    /// The pages as of the last event produced.
    shipped: Pages,
    at: WalPos,
}

impl Source {
    fn new(path: &Path, page_size: u32) -> Source {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!("PRAGMA page_size = {page_size}; PRAGMA journal_mode = WAL;")).unwrap();
        Source { conn, page_size, shipped: Pages::new(), at: WalPos { gen: 1, frame: 0 } }
    }

    fn exec(&self, sql: &str) {
        self.conn.execute_batch(sql).unwrap();
    }

    fn dump(&self) -> Vec<String> {
        dump_conn(&self.conn)
    }

    /// A snapshot of the current state, in a new generation.
    fn snapshot(&mut self, per_piece: usize) -> Vec<SqliteFrames> {
        self.shipped = read_pages(&self.conn);
        self.at = WalPos { gen: self.at.gen + 1, frame: 3 };
        snapshot_pieces(&self.shipped, self.page_size, self.at, per_piece)
    }

    /// What changed since the last event, as one transaction of chunks of `per_chunk` pages.
    fn transaction(&mut self, per_chunk: usize) -> Vec<SqliteFrames> {
        let now = read_pages(&self.conn);
        let changed: Vec<(u32, Vec<u8>)> =
            now.iter().filter(|(k, v)| self.shipped.get(k) != Some(v)).map(|(k, v)| (*k, v.clone())).collect();
        self.at.frame += changed.len().max(1) as u32;
        let db_pages = now.len() as u32;
        self.shipped = now;
        let groups: Vec<Vec<(u32, Vec<u8>)>> =
            if changed.is_empty() { vec![vec![]] } else { changed.chunks(per_chunk).map(|c| c.to_vec()).collect() };
        let n = groups.len();
        groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| SqliteFrames {
                gen: self.at.gen,
                frame: self.at.frame,
                page_size: self.page_size,
                db_pages,
                chunk: i as u32,
                last: i == n - 1,
                // Transactions travel compressed, as the agent sends them.
                pages: frames(g)
                    .into_iter()
                    .map(|p| SqlitePage { data: zstd::bulk::compress(&p.data, 1).unwrap().into(), ..p })
                    .collect(),
                snapshot: false,
                zstd: true,
            })
            .collect()
    }
}

/// A source, an applier and the standby, with the journal seq the session would use.
struct Harness {
    dir: tempfile::TempDir,
    src: Source,
    applier: SqliteApplier,
    seq: u64,
}

impl Harness {
    /// A source of 4 KiB pages with `SCHEMA`, resynced to a committed standby.
    fn seeded() -> Harness {
        let mut h = Harness::new(4096);
        h.src.exec(SCHEMA);
        h.resync(16);
        h.commit();
        h
    }

    fn new(page_size: u32) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let src = Source::new(&dir.path().join("source.db"), page_size);
        let applier = open_applier(dir.path());
        Harness { dir, src, applier, seq: 0 }
    }

    fn standby(&self) -> PathBuf {
        self.dir.path().join("standby/db.sqlite")
    }

    fn pos(&self) -> Position {
        Position { journal_id: JOURNAL, seq: Seq(self.seq) }
    }

    /// Applies one journal event.
    fn send(&mut self, f: SqliteFrames) -> Result<(), ApplyError> {
        self.seq += 1;
        self.applier.apply(Seq(self.seq), sqlite(f)).map(|_| ())
    }

    fn resync(&mut self, per_piece: usize) {
        let pieces = self.src.snapshot(per_piece);
        self.applier.begin_resync().unwrap();
        for p in pieces {
            self.applier.apply(Seq::ZERO, sqlite(p)).unwrap();
        }
        self.applier.end_resync().unwrap();
    }

    /// Runs `sql` on the source and ships it as one transaction (not committed).
    fn ship(&mut self, sql: &str) -> Vec<SqliteFrames> {
        self.src.exec(sql);
        let events = self.src.transaction(usize::MAX);
        for e in events.clone() {
            self.send(e).unwrap();
        }
        events
    }

    fn commit(&mut self) {
        assert!(self.applier.commit(self.pos()).unwrap(), "commit declined");
    }

    fn assert_in_sync(&self) {
        assert_eq!(standby_dump(&self.standby()), self.src.dump());
    }
}

fn open_applier(dir: &Path) -> SqliteApplier {
    let mut a = SqliteApplier::open(dir.join("standby/db.sqlite"), dir.join("state/positions/src.pos")).unwrap();
    a.session_start(JOURNAL).unwrap();
    a
}

const SCHEMA: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, n INT);
    WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < 300)
    INSERT INTO t(name, n) SELECT 'row ' || value, value * 7 FROM s;";

/// `INSERT INTO {into} SELECT {select} FROM s` with `s(value)` counting 1..=n.
fn insert_series(into: &str, select: &str, n: u32) -> String {
    format!(
        "WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < {n}) \
         INSERT INTO {into} SELECT {select} FROM s;"
    )
}

#[test]
fn snapshot_creates_the_standby() {
    let mut h = Harness::new(4096);
    h.src.exec(SCHEMA);
    h.src.exec("CREATE TABLE blobs(b BLOB); INSERT INTO blobs VALUES (randomblob(20000));");
    assert!(!h.standby().exists());
    h.resync(3);
    // Installed by a rename at the end of the resync: readable before the commit.
    assert!(!h.dir.path().join("standby/db.sqlite.lockstep-tmp").exists());
    h.assert_in_sync();
    assert_eq!(h.applier.position(), None);
    h.seq = 5;
    h.commit();
    assert_eq!(h.applier.position(), Some(h.pos()));
    h.assert_in_sync();

    // The position survives a reopen.
    drop(h.applier);
    let a = open_applier(h.dir.path());
    assert_eq!(a.position(), Some(Position { journal_id: JOURNAL, seq: Seq(5) }));
    assert_eq!(a.applied, h.src.at);
}

#[test]
fn transactions_follow_the_source() {
    let mut h = Harness::seeded();

    let first = h.ship("INSERT INTO t(name, n) VALUES ('new', 1), ('newer', 2)");
    h.commit();
    h.assert_in_sync();

    // Several source transactions in one standby commit.
    h.ship("UPDATE t SET name = upper(name) WHERE id % 3 = 0");
    h.ship("DELETE FROM t WHERE id BETWEEN 50 AND 120");
    h.ship("CREATE TABLE u(k TEXT PRIMARY KEY, v BLOB)");
    h.ship("CREATE INDEX t_name ON t(name); INSERT INTO u VALUES ('a', x'00ff'), ('b', randomblob(5000));");
    h.commit();
    h.assert_in_sync();

    // A 20,000-row transaction in chunks: nothing of it is committed before its last chunk.
    let before = standby_dump(&h.standby());
    h.src.exec(&insert_series("t(name, n)", "printf('bulk %08d %s', value, hex(randomblob(16))), value", 20_000));
    let chunks = h.src.transaction(64);
    assert!(chunks.len() >= 4, "only {} chunks", chunks.len());
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        h.send(c).unwrap();
        let pos = h.pos();
        let prepared = h.applier.prepare_commit(pos).unwrap();
        if i < n - 1 {
            assert!(prepared.is_none(), "commit offered after chunk {i}");
            assert_eq!(standby_dump(&h.standby()), before);
        } else {
            prepared.expect("commit after the last chunk")().unwrap();
        }
    }
    h.assert_in_sync();
    assert_eq!(h.applier.position(), Some(h.pos()));

    // Re-sent transactions at or below the applied position change nothing.
    let old = h.ship("UPDATE t SET n = n + 1 WHERE id < 10");
    h.commit();
    for e in first.into_iter().chain(old) {
        h.send(e).unwrap();
    }
    h.commit();
    h.assert_in_sync();
}

#[test]
fn shrinking_database_truncates_the_standby() {
    let mut h = Harness::new(4096);
    h.src.exec(SCHEMA);
    h.src.exec(&insert_series("t(name, n)", "hex(randomblob(200)), value", 5000));
    h.resync(64);
    h.commit();
    let big: u32 = reader(&h.standby()).query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();

    h.ship("DELETE FROM t WHERE id > 100");
    h.ship("VACUUM");
    h.commit();
    h.assert_in_sync();
    let pages = h.src.shipped.len() as u32;
    assert!(pages < big / 10, "source did not shrink: {pages} of {big} pages");
    let standby_pages: u32 = reader(&h.standby()).query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    assert_eq!(standby_pages, pages);

    // Checkpointed, the file itself is that small.
    let c = Connection::open(h.standby()).unwrap();
    let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).unwrap();
    assert_eq!(busy, 0);
    drop(c);
    assert_eq!(fs::metadata(h.standby()).unwrap().len(), u64::from(pages) * 4096);
    h.assert_in_sync();
}

#[test]
fn reapply_after_a_crash_waits_for_the_horizon() {
    let mut h = Harness::seeded();
    let committed = h.pos();

    let mut log = Vec::new();
    log.extend(h.ship("DELETE FROM t WHERE id % 2 = 0"));
    log.extend(h.ship(&format!("CREATE TABLE w(x); {}", insert_series("w", "randomblob(3000)", 40))));
    log.extend(h.ship("UPDATE t SET name = 'changed' WHERE id < 50; DROP TABLE w;"));
    // The standby commits, then the process dies before the position is recorded.
    let f = h.applier.prepare_commit(h.pos()).unwrap().expect("commit");
    drop(f);
    drop(std::mem::replace(&mut h.applier, open_applier(h.dir.path())));
    h.assert_in_sync();
    assert_eq!(h.applier.position(), Some(committed));

    // The agent re-sends from the recorded position: nothing is committed (readers keep the
    // later state) until the re-sent transactions reach what the standby already showed.
    h.seq = committed.seq.0;
    let n = log.len();
    for (i, e) in log.into_iter().enumerate() {
        h.send(e).unwrap();
        let prepared = h.applier.prepare_commit(h.pos()).unwrap();
        if i < n - 1 {
            assert!(prepared.is_none(), "commit offered below the horizon after event {i}");
            h.assert_in_sync();
        } else {
            prepared.expect("commit at the horizon")().unwrap();
        }
    }
    h.assert_in_sync();
    assert_eq!(h.applier.position(), Some(h.pos()));

    // Beyond the horizon, commits go through at once again.
    h.ship("INSERT INTO t(name) VALUES ('after')");
    h.commit();
    h.assert_in_sync();
}

#[test]
fn resync_over_an_existing_standby_keeps_readers_consistent() {
    let mut h = Harness::seeded();
    h.ship("CREATE INDEX t_n ON t(n)");
    h.commit();
    let old = h.src.dump();

    // A reader in the middle of a read transaction.
    let r = reader(&h.standby());
    r.execute_batch("BEGIN").unwrap();
    assert_eq!(dump_conn(&r), old);

    // The source moves on in ways the agent did not ship (so it resyncs).
    h.src.exec("DROP INDEX t_n; DELETE FROM t WHERE id < 200; CREATE TABLE v(a, b);");
    h.src.exec(&insert_series("v", "value, randomblob(700)", 2000));
    h.src.exec("VACUUM");
    let pieces = h.src.snapshot(10);
    h.applier.begin_resync().unwrap();
    for (i, p) in pieces.into_iter().enumerate() {
        h.applier.apply(Seq::ZERO, sqlite(p)).unwrap();
        if i % 20 == 0 {
            // New readers see the old database while the snapshot streams in.
            assert_eq!(standby_dump(&h.standby()), old);
        }
    }
    h.applier.end_resync().unwrap();
    assert!(!h.dir.path().join("standby/db.sqlite.lockstep-tmp").exists(), "went through a temp file");
    assert_eq!(standby_dump(&h.standby()), old);
    h.seq += 1;
    h.commit();

    // The reader still sees its snapshot, intact; once it ends its transaction it sees the new one.
    assert_eq!(integrity(&r), "ok");
    assert_eq!(dump_conn(&r), old);
    r.execute_batch("COMMIT").unwrap();
    assert_eq!(integrity(&r), "ok");
    assert_eq!(dump_conn(&r), h.src.dump());
    h.assert_in_sync();

    // And replication continues from the snapshot.
    h.ship("INSERT INTO v VALUES ('x', 'y')");
    h.commit();
    h.assert_in_sync();
}

/// The standby file's inode: whether a resync replaced the file or rewrote it.
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().ino()
}

/// The source database replaced by a larger one with 8 KiB pages, continuing at the same
/// position (the agent notices and resyncs).
fn replace_source_with_8k_pages(h: &mut Harness) {
    let at = h.src.at;
    h.src = Source::new(&h.dir.path().join("source2.db"), 8192);
    h.src.at = at;
    h.src.exec(SCHEMA);
    h.src.exec(&insert_series("t(name, n)", "hex(randomblob(100)), value", 3000));
}

/// Readers that have read the standby hold its WAL open, so it cannot leave WAL mode: the
/// new database replaces the file by a rename, and they keep reading the old one.
#[test]
fn resync_with_another_page_size_replaces_the_standby() {
    let mut h = Harness::new(4096);
    h.applier.wal_release_wait = Duration::from_millis(300);
    h.src.exec(SCHEMA);
    h.resync(16);
    h.commit();
    // Frames in the old standby's WAL (kept there by the readers below), which must not be
    // applied to the new file.
    h.ship("UPDATE t SET name = 'in the wal' WHERE id > 5");
    h.commit();
    let old = h.src.dump();
    // One in the middle of a read transaction, one that has read and is idle.
    let r = reader(&h.standby());
    r.execute_batch("BEGIN").unwrap();
    assert_eq!(dump_conn(&r), old);
    let idle = reader(&h.standby());
    assert_eq!(dump_conn(&idle), old);
    let before = inode(&h.standby());

    replace_source_with_8k_pages(&mut h);
    let started = Instant::now();
    h.resync(16);
    assert!(started.elapsed() < Duration::from_secs(5), "the resync waited {:?}", started.elapsed());
    h.seq += 1;
    h.commit();
    h.assert_in_sync();
    assert_ne!(inode(&h.standby()), before, "the standby was not replaced by a rename");
    assert_eq!(page_size(&reader(&h.standby())), 8192);
    // The readers keep the old file, also once the new database has a WAL of its own.
    assert_eq!(dump_conn(&r), old);
    assert_eq!(integrity(&r), "ok");
    h.ship("UPDATE t SET n = -n WHERE id < 20");
    h.commit();
    h.assert_in_sync();
    assert_eq!(dump_conn(&r), old);
    r.execute_batch("COMMIT").unwrap();
    let new = h.src.dump();
    assert_eq!(assert_old_or_new(&r, "a reader after its read transaction", &old, &new), "old");
    assert_eq!(assert_old_or_new(&idle, "an idle reader", &old, &new), "old");
    drop((r, idle));

    h.ship("UPDATE t SET n = -n");
    h.commit();
    h.assert_in_sync();
}

/// Connections opened on the standby before a resync replaces it with a database of another
/// page size, but first used after that (an application's pool, an idle `sqlite3` shell), see
/// the old database or the new one: never the old file read through the new database's WAL
/// (SQLITE_CORRUPT, SQLITE_IOERR, or rows of neither).
#[test]
fn resync_with_another_page_size_under_readers_not_yet_reading() {
    let mut h = Harness::seeded();
    // The old standby has frames in its WAL.
    h.ship("UPDATE t SET name = 'in the wal' WHERE id > 5");
    h.commit();
    let old = h.src.dump();
    let early = reader(&h.standby());
    let late = reader(&h.standby());
    let before = inode(&h.standby());

    replace_source_with_8k_pages(&mut h);
    h.resync(16);
    h.seq += 1;
    h.commit();
    // Page 1 as the source has it: the schema cookie too (readers compare it with the one of
    // the schema they cached).
    let cookie = |c: &Connection| c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(cookie(&reader(&h.standby())), cookie(&h.src.conn));
    let new = h.src.dump();
    assert_old_or_new(&early, "a reader opened before the resync", &old, &new);

    // The next transaction gives the new database a WAL (holding a few of its pages).
    h.ship("UPDATE t SET n = -n WHERE id = 1");
    h.commit();
    let newer = h.src.dump();
    assert_old_or_new(&early, "a reader opened before the resync, again", &old, &newer);
    assert_old_or_new(&late, "a reader opened before the resync, first used after", &old, &newer);
    assert_eq!(page_size(&reader(&h.standby())), 8192);
    h.assert_in_sync();
    assert_eq!(inode(&h.standby()), before, "the snapshot was not copied into the standby's file");
    let left: Vec<_> = fs::read_dir(h.dir.path().join("standby")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().contains("lockstep-tmp")), "left behind: {left:?}");
}

/// Readers opening the standby throughout a resync that changes its page size, each first
/// reading a moment after it opened, see the old database or the new one, never an error.
#[test]
fn resync_with_another_page_size_under_readers_coming_and_going() {
    let mut h = Harness::seeded();
    h.ship("UPDATE t SET name = 'in the wal' WHERE id > 5");
    h.commit();
    let old = h.src.dump();
    replace_source_with_8k_pages(&mut h);
    let new = h.src.dump();

    let done = Arc::new(AtomicBool::new(false));
    let readers = {
        let (path, done, old, new) = (h.standby(), done.clone(), old.clone(), new.clone());
        std::thread::spawn(move || {
            let mut seen = (0, 0);
            while !done.load(Ordering::Relaxed) || seen.1 == 0 {
                let r = reader(&path);
                // As applications do: wait for a writer's lock rather than fail.
                r.busy_timeout(Duration::from_secs(20)).unwrap();
                std::thread::sleep(Duration::from_millis(2));
                match assert_old_or_new(&r, "a reader", &old, &new) {
                    "old" => seen.0 += 1,
                    _ => seen.1 += 1,
                }
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let before = inode(&h.standby());
    h.resync(16);
    h.seq += 1;
    h.commit();
    assert_eq!(inode(&h.standby()), before, "the snapshot was not copied into the standby's file");
    done.store(true, Ordering::Relaxed);
    let (olds, news) = readers.join().expect("a reader failed");
    assert!(olds > 0 && news > 0, "{olds} reads of the old database, {news} of the new one");
    h.assert_in_sync();
}

/// A crash in the middle of copying a snapshot into the standby's file leaves a hot journal
/// and a file holding pages of both databases (its header may give the new page size): the
/// applier rolls it back when it opens, before it reads the page size.
#[test]
fn open_rolls_back_a_copy_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crashed.db");
    let c = Connection::open(&db).unwrap();
    c.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = DELETE;").unwrap();
    c.execute_batch(SCHEMA).unwrap();
    c.execute_batch(&insert_series("t(name, n)", "hex(randomblob(200)), value", 3000)).unwrap();
    let before = dump_conn(&c);
    // A transaction large enough to spill into the database file before its commit.
    c.execute_batch("PRAGMA cache_size = 10; BEGIN; UPDATE t SET name = hex(randomblob(300));").unwrap();
    let journal = sidecar(&db, "-journal");
    assert!(journal.exists(), "no journal");
    // The "crash": the files as they are now. (Copying drops this process's locks on the
    // database file; `c` is not used again.)
    fs::create_dir_all(dir.path().join("standby")).unwrap();
    let standby = dir.path().join("standby/db.sqlite");
    fs::copy(&db, &standby).unwrap();
    fs::copy(&journal, sidecar(&standby, "-journal")).unwrap();
    // As if the copy had written the new database's page 1.
    let f = fs::OpenOptions::new().write(true).open(&standby).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &8192u16.to_be_bytes(), 16).unwrap();
    drop(f);
    drop(c);

    let a = open_applier(dir.path());
    assert_eq!(a.page_size, Some(4096));
    assert!(!sidecar(&standby, "-journal").exists());
    assert_eq!(standby_dump(&standby), before);
}

#[test]
fn orphaned_and_stray_chunks_are_dropped() {
    let mut h = Harness::seeded();
    h.src.exec(&insert_series("t(name, n)", "hex(randomblob(100)), value", 3000));
    let chunks = h.src.transaction(20);
    assert!(chunks.len() >= 3);

    // The agent restarts part-way through journaling the transaction, then sends it again.
    h.send(chunks[0].clone()).unwrap();
    h.send(chunks[1].clone()).unwrap();
    assert!(h.applier.prepare_commit(h.pos()).unwrap().is_none());
    for c in &chunks {
        h.send(c.clone()).unwrap();
        if c.chunk == 0 {
            // A chunk that does not continue what is buffered (another transaction's, or one
            // skipped ahead) is ignored.
            let mut stray = chunks[2].clone();
            stray.frame += 1;
            h.send(stray).unwrap();
            h.send(chunks[2].clone()).unwrap();
        }
    }
    h.commit();
    h.assert_in_sync();
}

#[test]
fn malformed_input_is_refused() {
    let mut h = Harness::seeded();
    let before = h.src.dump();
    h.src.exec("UPDATE t SET n = 0 WHERE id = 1; INSERT INTO t(name) VALUES (hex(randomblob(5000)));");
    let good_z = h.src.transaction(usize::MAX).remove(0);
    assert!(good_z.zstd && good_z.pages.len() >= 2);
    // The same transaction uncompressed, for the checks of page contents.
    let mut good = good_z.clone();
    good.zstd = false;
    for p in &mut good.pages {
        p.data = zstd::bulk::decompress(&p.data, 4096).unwrap().into();
    }

    let mut cases: Vec<(SqliteFrames, &str)> = Vec::new();
    let mut f = good_z.clone();
    f.pages[0].data = Bytes::from_static(b"not zstd at all");
    cases.push((f, "does not decompress"));
    // A page that would inflate past the page size (a decompression bomb) is refused too.
    let mut f = good_z.clone();
    f.pages[0].data = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap().into();
    cases.push((f, "does not decompress"));
    let mut f = good_z.clone();
    f.pages[0].data = zstd::bulk::compress(&[7u8; 100], 1).unwrap().into();
    cases.push((f, "100 bytes"));
    for ps in [1000, 256, 131072, 0] {
        let mut f = good.clone();
        f.page_size = ps;
        cases.push((f, "powers of two"));
    }
    let mut f = good.clone();
    f.db_pages = 0;
    cases.push((f, "0 pages"));
    let mut f = good.clone();
    f.pages[0].pgno = 0;
    cases.push((f, "carries page 0"));
    let mut f = good.clone();
    f.pages[0].pgno = f.db_pages + 1;
    cases.push((f, "of a database of"));
    let mut f = good.clone();
    f.pages[1].data = f.pages[1].data.slice(..4095);
    cases.push((f, "4095 bytes"));
    let mut f = good.clone();
    f.page_size = 8192;
    for p in &mut f.pages {
        p.data = Bytes::from(vec![0; 8192]);
    }
    cases.push((f, "delete the standby"));
    let mut f = good.clone();
    f.snapshot = true;
    cases.push((f, "outside a resync"));
    for (f, why) in cases {
        let err = h.send(f).expect_err(why);
        assert!(matches!(&err, ApplyError::Refused(m) if m.contains(why)), "{why}: {err}");
    }
    let fs_change = Change::Fs(FsOp::Remove { path: RelPath::new(b"x".to_vec()).unwrap() });
    assert!(matches!(h.applier.apply(Seq(99), fs_change), Err(ApplyError::Refused(_))));
    h.commit();
    assert_eq!(standby_dump(&h.standby()), before);

    // Refusals leave the applier usable.
    h.send(good).unwrap();
    h.commit();
    h.assert_in_sync();

    // A snapshot that never sends its last piece, or lacks a page, is not installed.
    let mut pieces = h.src.snapshot(2);
    assert!(pieces.len() > 2);
    h.applier.begin_resync().unwrap();
    h.applier.apply(Seq::ZERO, sqlite(pieces[0].clone())).unwrap();
    assert!(matches!(h.applier.end_resync(), Err(ApplyError::Refused(m)) if m.contains("last piece")));
    h.applier.session_start(JOURNAL).unwrap();
    pieces[1].pages.pop();
    h.applier.begin_resync().unwrap();
    for p in pieces {
        h.applier.apply(Seq::ZERO, sqlite(p)).unwrap();
    }
    assert!(matches!(h.applier.end_resync(), Err(ApplyError::Refused(m)) if m.contains("lacks page")));
    h.applier.session_start(JOURNAL).unwrap();
    h.assert_in_sync();
}

#[test]
fn transaction_without_a_standby_is_refused() {
    let mut h = Harness::new(4096);
    h.src.exec(SCHEMA);
    let f = h.src.transaction(usize::MAX).remove(0);
    let err = h.send(f).unwrap_err();
    assert!(matches!(&err, ApplyError::Refused(m) if m.contains("no standby database")), "{err}");
    assert!(!h.standby().exists());
}

#[test]
fn position_file_corruption_and_a_missing_standby() {
    let mut h = Harness::seeded();
    let pos_file = h.dir.path().join("state/positions/src.pos");
    let standby = h.standby();
    drop(h.applier);

    // Damage the record in every slot of the file (two alternately written slots).
    let mut bytes = fs::read(&pos_file).unwrap();
    let damaged: Vec<usize> = (0..bytes.len()).step_by(512).map(|s| s + 10).filter(|&i| i < bytes.len()).collect();
    for &i in &damaged {
        bytes[i] ^= 1;
    }
    fs::write(&pos_file, &bytes).unwrap();
    let err = SqliteApplier::open(standby.clone(), pos_file.clone()).err().expect("corruption undetected");
    assert!(err.to_string().contains(&pos_file.display().to_string()), "{err}");
    assert!(err.to_string().contains("remove it to resync"), "{err}");
    for &i in &damaged {
        bytes[i] ^= 1;
    }
    fs::write(&pos_file, &bytes).unwrap();
    assert!(open_applier(h.dir.path()).position().is_some());

    // The standby was deleted: the position is forgotten, so the agent resyncs.
    fs::remove_file(&standby).unwrap();
    let _ = fs::remove_file(h.dir.path().join("standby/db.sqlite-wal"));
    let _ = fs::remove_file(h.dir.path().join("standby/db.sqlite-shm"));
    h.applier = open_applier(h.dir.path());
    assert_eq!(h.applier.position(), None);
    h.resync(16);
    h.commit();
    h.assert_in_sync();
}

/// `CREATE TABLE` statements (with an index each) for tables `{prefix}0..n`, long enough that
/// sqlite_master spans many pages.
fn many_tables(prefix: &str, n: u32) -> String {
    let pad = "x".repeat(300);
    (0..n)
        .map(|i| {
            format!(
                "CREATE TABLE {prefix}{i}(a INTEGER PRIMARY KEY, b TEXT DEFAULT '{pad}', c); \
                 CREATE INDEX {prefix}{i}_c ON {prefix}{i}(c); INSERT INTO {prefix}{i}(c) VALUES ({i});"
            )
        })
        .collect()
}

#[test]
fn schema_spanning_many_pages_changes_under_the_writer() {
    let mut h = Harness::new(1024);
    h.src.exec(&many_tables("a", 60));
    h.resync(7);
    h.commit();
    h.assert_in_sync();

    // DDL rewrites sqlite_master (page 1 and many others) in every transaction, several of them
    // per standby commit.
    for round in 0..3 {
        h.ship(&many_tables(&format!("r{round}_"), 30));
        h.ship(&(0..20).map(|i| format!("DROP TABLE a{};", i * 3 + round)).collect::<String>());
        h.commit();
        h.assert_in_sync();
    }

    // A resync over the standby, into a quite different schema.
    h.src.exec(&(0..30).map(|i| format!("DROP TABLE r0_{i};")).collect::<String>());
    h.src.exec(&many_tables("z", 80));
    h.src.exec("VACUUM");
    h.resync(5);
    h.seq += 1;
    h.commit();
    h.assert_in_sync();
    h.ship(&many_tables("after", 10));
    h.commit();
    h.assert_in_sync();
}
