//! SQLite end to end: an application writing a real database in WAL mode (with its own
//! checkpoints of every mode, a VACUUM and a 20,000-row transaction), a real agent following
//! its log, a real receiver applying to a standby file, mutual TLS on loopback. A reader keeps
//! the standby open and checks it while it is being applied; each test ends with the standby's
//! `.dump` equal to the source's and `PRAGMA integrity_check` ok.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lockstep_tests::Setup;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

struct Sq {
    s: Setup,
    src: PathBuf,
    dst: PathBuf,
}

/// An agent + receiver pair replicating `app/app.db` to `standby-app/app.db` (the fs source
/// of the default setup stays too; it idles on an empty tree).
fn sqlite_setup(source_extra: &str) -> Result<Sq> {
    let s = Setup::new()?;
    let (src, dst) = s.add_sqlite(source_extra)?;
    Ok(Sq { s, src, dst })
}

fn open_app(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(10))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    Ok(c)
}

const SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER, price REAL, data BLOB);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER, msg TEXT);
CREATE INDEX items_name ON items(name);
";

/// `sqlite3 DB .dump` when the CLI is installed; otherwise the same content (schema, then
/// every row of every table in rowid order) read through rusqlite.
fn dump(path: &Path) -> Result<String> {
    if let Ok(out) = std::process::Command::new("sqlite3").arg(path).arg(".dump").output() {
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        bail!("sqlite3 .dump {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
    let c = Connection::open(path)?;
    let mut out = String::new();
    let mut tables = Vec::new();
    {
        let mut st = c.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (ty, name, sql): (String, String, Option<String>) = (r.get(0)?, r.get(1)?, r.get(3)?);
            out.push_str(&format!("{ty} {name}: {}\n", sql.unwrap_or_default()));
            if ty == "table" {
                tables.push(name);
            }
        }
    }
    for t in tables {
        let mut st = c.prepare(&format!("SELECT * FROM \"{}\" ORDER BY rowid", t.replace('"', "\"\"")))?;
        let n = st.column_count();
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let vals: Vec<String> = (0..n).map(|i| format!("{:?}", r.get_ref(i).map(|v| v.to_owned()))).collect();
            out.push_str(&format!("{t}: {}\n", vals.join(",")));
        }
    }
    Ok(out)
}

fn integrity(path: &Path) -> Result<String> {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))?)
}

/// Waits until the standby's dump equals the source's, then checks its integrity.
fn wait_equal(sq: &mut Sq, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut why;
    loop {
        sq.s.check_alive()?;
        let want = dump(&sq.src)?;
        if sq.dst.exists() {
            match dump(&sq.dst) {
                Ok(got) if got == want => break,
                Ok(got) => {
                    why = format!("dumps differ ({} vs {} bytes)", want.len(), got.len());
                }
                Err(e) => why = e.to_string(),
            }
        } else {
            why = "standby does not exist yet".into();
        }
        if Instant::now() > deadline {
            bail!(
                "standby did not converge within {timeout:?}: {why}\nagent status: {}\nreceiver status: {}\n{}",
                sq.s.agent_status().map(|v| v.to_string()).unwrap_or_else(|e| e.to_string()),
                sq.s.receiver_status().map(|v| v.to_string()).unwrap_or_else(|e| e.to_string()),
                sq.s.logs_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ic = integrity(&sq.dst)?;
    if ic != "ok" {
        bail!("standby integrity_check: {ic}");
    }
    // And the agent says so: any resync it ran has been confirmed committed.
    sq.s.wait_caught_up(timeout)
}

/// What the application writer did, for the test's own checks.
#[derive(Default, Debug)]
struct Did {
    commits: u64,
    checkpoints: [u64; 4],
    truncated: u64,
    slowest_checkpoint: Duration,
    vacuums: u64,
    big: u64,
}

const MODES: [&str; 4] = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"];

/// One step of the application's workload.
fn app_step(c: &mut Connection, rng: &mut rand::rngs::StdRng, step: u64, did: &mut Did) -> Result<()> {
    let name = |rng: &mut rand::rngs::StdRng| format!("item-{:06}", rng.random_range(0..1_000_000u32));
    if step % 97 == 50 && did.big < 2 {
        // A large transaction: 20,000 rows at once; the second one writes ~40 MB of pages,
        // more than the agent holds in memory (it journals such a transaction piece by piece
        // from the WAL) — and so do the VACUUMs after it.
        let row_bytes = if did.big == 0 { 40 } else { 2000 };
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT INTO items (name, qty, price, data) VALUES (?1, ?2, ?3, ?4)")?;
            for i in 0..20_000u32 {
                st.execute(rusqlite::params![
                    format!("bulk-{step}-{i}"),
                    i,
                    f64::from(i) / 7.0,
                    vec![(i % 251) as u8; row_bytes]
                ])?;
            }
        }
        tx.commit()?;
        did.big += 1;
        did.commits += 1;
        return Ok(());
    }
    if step % 211 == 150 {
        // Shrink the database: delete most of the bulk rows and VACUUM.
        c.execute("DELETE FROM items WHERE name LIKE 'bulk-%' AND qty % 4 != 0", [])?;
        c.execute_batch("VACUUM")?;
        did.vacuums += 1;
        did.commits += 2;
        return Ok(());
    }
    match rng.random_range(0..100) {
        0..=54 => {
            let tx = c.transaction()?;
            for _ in 0..rng.random_range(1..=5) {
                let len = rng.random_range(0..3000);
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                tx.execute(
                    "INSERT INTO items (name, qty, price, data) VALUES (?1, ?2, ?3, ?4)",
                    rusqlite::params![name(rng), rng.random_range(0..1000), rng.random::<f64>(), data],
                )?;
            }
            tx.execute("INSERT INTO events (at, msg) VALUES (?1, 'insert')", [step as i64])?;
            tx.commit()?;
        }
        55..=74 => {
            c.execute(
                "UPDATE items SET qty = qty + 1, name = ?1 WHERE id IN (SELECT id FROM items ORDER BY random() LIMIT 3)",
                [name(rng)],
            )?;
        }
        75..=86 => {
            c.execute("DELETE FROM items WHERE id IN (SELECT id FROM items ORDER BY random() LIMIT 2)", [])?;
        }
        87..=89 => {
            c.execute(
                "INSERT INTO events (at, msg) VALUES (?1, ?2)",
                rusqlite::params![step as i64, "x".repeat(5000)],
            )?;
        }
        _ => {
            let m = rng.random_range(0..4);
            let t = Instant::now();
            let (busy, log, done): (i64, i64, i64) =
                c.query_row(&format!("PRAGMA wal_checkpoint({})", MODES[m]), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            did.slowest_checkpoint = did.slowest_checkpoint.max(t.elapsed());
            if t.elapsed() > Duration::from_secs(1) {
                eprintln!(
                    "{:?}: checkpoint {} took {:?} (busy {busy}, log {log}, done {done})",
                    std::time::SystemTime::now(),
                    MODES[m],
                    t.elapsed()
                );
            }
            did.checkpoints[m] += 1;
            if m == 3 && busy == 0 && log == 0 && done == 0 {
                did.truncated += 1;
            }
            return Ok(());
        }
    }
    did.commits += 1;
    Ok(())
}

/// Runs the application until `stop`; returns what it did.
fn app_writer(path: PathBuf, seed: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<Did>> {
    std::thread::spawn(move || {
        let mut c = open_app(&path)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut did = Did::default();
        let mut step = 0u64;
        while !stop.load(Ordering::SeqCst) {
            app_step(&mut c, &mut rng, step, &mut did).with_context(|| format!("app step {step}"))?;
            step += 1;
            if step.is_multiple_of(4) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(did)
    })
}

/// Keeps the standby open: holds read transactions across applies and checks that every
/// state it sees is a consistent database. Returns the problems seen and the checks made.
fn standby_reader(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, u64)> {
    std::thread::spawn(move || {
        let mut problems = Vec::new();
        let mut checks = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if !path.exists() {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let r = (|| -> Result<()> {
                let c = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
                c.busy_timeout(Duration::from_secs(5))?;
                c.execute_batch("BEGIN")?;
                let n1: i64 = c.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).unwrap_or(-1);
                // Stay inside this snapshot while the receiver keeps applying.
                std::thread::sleep(Duration::from_millis(150));
                let n2: i64 = c.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).unwrap_or(-1);
                if n1 != n2 {
                    problems.push(format!(
                        "{:?}: a read transaction saw items change from {n1} to {n2} rows",
                        std::time::SystemTime::now()
                    ));
                }
                let ic: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
                if ic != "ok" {
                    problems.push(format!(
                        "{:?}: quick_check inside a read transaction: {ic}",
                        std::time::SystemTime::now()
                    ));
                }
                c.execute_batch("COMMIT")?;
                let ic: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
                if ic != "ok" {
                    problems.push(format!("{:?}: integrity_check: {ic}", std::time::SystemTime::now()));
                }
                checks += 1;
                Ok(())
            })();
            if let Err(e) = r {
                // The schema is not there until the first snapshot lands.
                if !e.to_string().contains("no such table") {
                    problems.push(format!("reading the standby: {e:#}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (problems, checks)
    })
}

#[test]
fn sqlite_workload_with_checkpoints_vacuum_and_kills() -> Result<()> {
    let seed = std::env::var("LOCKSTEP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("LOCKSTEP_SEED={seed}");
    let mut sq = sqlite_setup("")?;
    {
        let c = open_app(&sq.src)?;
        c.execute_batch(SCHEMA)?;
        for i in 0..500 {
            c.execute("INSERT INTO items (name, qty) VALUES (?1, ?2)", rusqlite::params![format!("seed-{i}"), i])?;
        }
    }
    sq.s.start()?;
    wait_equal(&mut sq, Duration::from_secs(60)).context("initial snapshot")?;

    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = Arc::new(AtomicBool::new(false));
    let writer = app_writer(sq.src.clone(), seed, stop.clone());
    let reader = standby_reader(sq.dst.clone(), stop_reader.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(rng.random_range(800..2000)));
        if round % 2 == 0 {
            sq.s.kill_agent();
            std::thread::sleep(Duration::from_millis(rng.random_range(50..500)));
            sq.s.start_agent()?;
        } else {
            sq.s.kill_receiver();
            std::thread::sleep(Duration::from_millis(rng.random_range(50..500)));
            sq.s.start_receiver()?;
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let did = writer.join().expect("writer thread")?;
    eprintln!("application: {did:?}");
    wait_equal(&mut sq, Duration::from_secs(90)).context("after the workload")?;
    stop_reader.store(true, Ordering::SeqCst);
    let (problems, checks) = reader.join().expect("reader thread");
    eprintln!("standby reader: {checks} consistent checks");
    assert!(problems.is_empty(), "the standby was seen inconsistent:\n{}", problems.join("\n"));
    assert!(checks > 0, "the reader never got to check the standby");
    assert!(did.big >= 1 && did.vacuums >= 1, "workload too short: {did:?}");
    assert!(did.checkpoints.iter().all(|&n| n > 0), "not every checkpoint mode ran: {did:?}");
    // The agent's pin must never hold the application up: a checkpoint waiting for it gets it
    // within a poll or two (a cross-wait with the agent's snapshot once cost the full 10 s
    // busy_timeout here).
    assert!(did.slowest_checkpoint < Duration::from_secs(5), "an application checkpoint was held up: {did:?}");
    assert!(did.truncated > 0, "no TRUNCATE checkpoint ever got through while the agent followed the log: {did:?}");
    Ok(())
}

#[test]
fn sqlite_not_in_wal_mode_is_refused_with_the_fix_or_switched() -> Result<()> {
    let mut sq = sqlite_setup("")?;
    {
        let c = Connection::open(&sq.src)?;
        c.pragma_update(None, "journal_mode", "DELETE")?;
        c.execute_batch(SCHEMA)?;
        c.execute("INSERT INTO items (name) VALUES ('a')", [])?;
    }
    sq.s.start_agent()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let logs = loop {
        let logs = sq.s.logs_tail();
        if logs.contains("journal_mode") || Instant::now() > deadline {
            break logs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        logs.contains("journal_mode=delete")
            && logs.contains("PRAGMA journal_mode=WAL")
            && logs.contains("switch_to_wal"),
        "refusal should name the mode and both fixes:\n{logs}"
    );
    sq.s.kill_agent();
    // With switch_to_wal the agent converts it and replicates.
    let cfg = std::fs::read_to_string(&sq.s.agent_cfg)?
        .replace("kind = \"sqlite\"", "kind = \"sqlite\"\nswitch_to_wal = true");
    std::fs::write(&sq.s.agent_cfg, cfg)?;
    sq.s.start()?;
    wait_equal(&mut sq, Duration::from_secs(60))?;
    let c = Connection::open(&sq.src)?;
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    assert_eq!(mode, "wal");
    c.execute("INSERT INTO items (name) VALUES ('after the switch')", [])?;
    wait_equal(&mut sq, Duration::from_secs(30))
}

#[test]
fn sqlite_database_replaced_underneath_is_reported_and_resynced() -> Result<()> {
    let mut sq = sqlite_setup("")?;
    {
        let c = open_app(&sq.src)?;
        c.execute_batch(SCHEMA)?;
        c.execute("INSERT INTO items (name) VALUES ('original')", [])?;
    }
    sq.s.start()?;
    wait_equal(&mut sq, Duration::from_secs(60))?;
    // Another database is moved into place (as a restore or a deploy would).
    let other = sq.src.with_file_name("other.db");
    {
        let c = open_app(&other)?;
        c.execute_batch("CREATE TABLE replaced (id INTEGER PRIMARY KEY, v TEXT);")?;
        c.execute("INSERT INTO replaced (v) VALUES ('new database')", [])?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    std::fs::rename(&other, &sq.src)?;
    // The old database's log and index go with it (a careful restore removes them).
    let _ = std::fs::remove_file(sq.src.with_file_name("app.db-wal"));
    let _ = std::fs::remove_file(sq.src.with_file_name("app.db-shm"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sq.s.logs_tail().contains("was replaced") {
        if Instant::now() > deadline {
            bail!("replacement not reported:\n{}", sq.s.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_equal(&mut sq, Duration::from_secs(60))?;
    Ok(())
}

/// Transactions larger than the agent holds in memory (~40 MB of incompressible pages each)
/// travel in pieces straight from the WAL and land on the standby whole, with each side
/// killed while they are in flight.
#[test]
fn sqlite_large_transactions_travel_in_pieces_through_kills() -> Result<()> {
    let mut sq = sqlite_setup("")?;
    let mut c = open_app(&sq.src)?;
    c.execute_batch(SCHEMA)?;
    sq.s.start()?;
    wait_equal(&mut sq, Duration::from_secs(60)).context("initial snapshot")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut big = |c: &mut Connection, tag: &str| -> Result<()> {
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT INTO items (name, qty, data) VALUES (?1, ?2, ?3)")?;
            for i in 0..10_000u32 {
                let data: Vec<u8> = (0..4000).map(|_| rng.random()).collect();
                st.execute(rusqlite::params![format!("{tag}-{i}"), i, data])?;
            }
        }
        tx.execute("DELETE FROM items WHERE qty % 3 = 0 AND name NOT LIKE ?1", [format!("{tag}-%")])?;
        Ok(tx.commit()?)
    };
    big(&mut c, "one")?;
    c.execute("INSERT INTO events (at, msg) VALUES (1, 'after one')", [])?;
    std::thread::sleep(Duration::from_millis(300));
    sq.s.kill_receiver();
    sq.s.start_receiver()?;
    big(&mut c, "two")?;
    std::thread::sleep(Duration::from_millis(150));
    sq.s.kill_agent();
    sq.s.start_agent()?;
    big(&mut c, "three")?;
    wait_equal(&mut sq, Duration::from_secs(120)).context("after the large transactions")?;
    assert_eq!(integrity(&sq.dst)?, "ok");
    assert!(
        sq.s.logs_contain("large transaction journaled piece by piece"),
        "no transaction was journaled piece by piece\n{}",
        sq.s.logs_tail()
    );
    Ok(())
}

/// Stops (SIGSTOP) the process `pid` and waits until it is stopped.
fn stop_process(pid: i32) -> Result<()> {
    // SAFETY: a plain kill(2) on a process this test started.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        bail!("SIGSTOP {pid}: {}", std::io::Error::last_os_error());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        if stat[stat.rfind(')').context("stat")? + 2..].starts_with('T') {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("process {pid} did not stop");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Transactions of a log generation that was written, copied back and reset before the agent
/// first looked at the log must reach the standby (or the agent must resync it): the agent is
/// stopped right after the initial snapshot, while it has not pinned the (empty) log, and the
/// application writes one generation, resets the log with a TRUNCATE checkpoint and writes
/// the next one. (An empty log cannot be pinned; the agent blocks copying back until it has
/// pinned the first generation. Without that, the standby silently lacked the first
/// generation's transactions — in the workload test, "Tree 2 page 11: btreeInitPage() returns
/// error code 11" or "wrong # of entries in index items_name" right after the initial
/// snapshot.)
#[test]
fn sqlite_generation_reset_before_the_agent_looks_is_not_lost() -> Result<()> {
    let mut sq = sqlite_setup("")?;
    {
        let c = open_app(&sq.src)?;
        c.execute_batch(SCHEMA)?;
        for i in 0..50 {
            c.execute("INSERT INTO items (name, qty) VALUES (?1, ?2)", rusqlite::params![format!("seed-{i}"), i])?;
        }
    }
    sq.s.start()?;
    wait_equal(&mut sq, Duration::from_secs(60)).context("initial snapshot")?;
    let pid = sq.s.agent_pid().context("the agent is not running")? as i32;
    let c = open_app(&sq.src)?;
    stop_process(pid)?;
    let wrote = (|| -> Result<bool> {
        // Pages of another table than the next generation writes, so that the later
        // transaction's pages cannot stand in for this one's.
        c.execute("INSERT INTO events (at, msg) VALUES (1, 'first generation')", [])?;
        // An agent holding the log cannot let go of it now: it is stopped.
        c.busy_timeout(Duration::from_millis(200))?;
        let (busy, log, done): (i64, i64, i64) =
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        c.busy_timeout(Duration::from_secs(10))?;
        c.execute("INSERT INTO items (name, qty) VALUES ('second generation', 2)", [])?;
        Ok((busy, log, done) == (0, 0, 0))
    })();
    // SAFETY: a plain kill(2) on a process this test started.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let reset = wrote?;
    wait_equal(&mut sq, Duration::from_secs(30))
        .with_context(|| format!("the log was reset while the agent was stopped: {reset}"))
}

/// A receiver configured for some of the agent's sources (`sources = ["app"]`) keeps up
/// while another source (the fs one) changes alongside: the agent passes over the other
/// source's records instead of sending what the receiver refuses (it used to, and retried
/// forever), across an agent restart.
#[test]
fn a_receiver_gets_only_its_sources() -> Result<()> {
    let mut sq = sqlite_setup("")?;
    let cfg = std::fs::read_to_string(&sq.s.agent_cfg)?;
    let (head, tail) = cfg.split_once("[[receivers]]\n").expect("receivers table");
    std::fs::write(&sq.s.agent_cfg, format!("{head}[[receivers]]\nsources = [\"app\"]\n{tail}"))?;
    {
        let c = open_app(&sq.src)?;
        c.execute_batch(SCHEMA)?;
    }
    std::fs::write(sq.s.src.join("before.txt"), b"not for this receiver")?;
    sq.s.start()?;
    for round in 0..3 {
        let c = open_app(&sq.src)?;
        for i in 0..50 {
            std::fs::write(sq.s.src.join(format!("f{round}-{i}.txt")), format!("{round} {i}"))?;
            c.execute("INSERT INTO items (name, qty) VALUES (?1, ?2)", rusqlite::params![format!("r{round}-{i}"), i])?;
        }
        drop(c);
        wait_equal(&mut sq, Duration::from_secs(60))?;
        if round == 1 {
            sq.s.kill_agent();
            sq.s.start_agent()?;
        }
    }
    assert!(!sq.s.logs_contain("not announced"), "{}", sq.s.logs_tail());
    Ok(())
}
