//! SQLite replication benchmark: a real agent following an application's database in WAL
//! mode, a real receiver applying to a standby file, mutual TLS on loopback.
//!
//!  1. commit-to-visible latency p50/p99 at a steady 1,000 single-row commits/s: from the
//!     moment the application's COMMIT returns to the moment a reader polling the standby
//!     (a fresh read transaction every ~200 µs) first sees the row;
//!  2. commits/s shipped: 20,000 single-row commits as fast as the application can make
//!     them; from the first commit until the last is visible on the standby.
//!
//! The application uses `synchronous = NORMAL` (the usual setting in WAL mode), so its own
//! commits cost no fsync and the rate is lockstep's, not the disk's. lockstep runs its full
//! path: journal fsync, mutual TLS, a durable receiver commit before acknowledging.
//! Reference: Litestream ships WAL changes every 1 s by default (`sync-interval`).
//!
//! Run: `cargo run --release -p lockstep-tests --bin bench_sqlite`. `BENCH_SQLITE_SECS` sets
//! the latency run's length (default 10).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lockstep_tests::measure::{fsync_latency, percentile};
use lockstep_tests::Setup;
use rusqlite::Connection;

const RATE: u64 = 1000;
const BURST: i64 = 20_000;

fn app(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(10))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(c)
}

/// Polls the standby's highest id and records when each id first became visible.
fn watcher(
    dst: PathBuf,
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<(i64, Instant)>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let c = loop {
            if let Ok(c) = Connection::open(&dst) {
                if c.query_row("SELECT count(*) FROM lat", [], |r| r.get::<_, i64>(0)).is_ok() {
                    break c;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = c.busy_timeout(Duration::from_secs(5));
        let mut st = c.prepare("SELECT coalesce(max(id), 0) FROM lat").expect("prepare");
        let mut max = 0i64;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(m) = st.query_row([], |r| r.get::<_, i64>(0)) {
                if m > max {
                    let now = Instant::now();
                    seen.lock().expect("lock").push((m, now));
                    max = m;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    })
}

/// The time id `id` was first visible, from the watcher's (max id, time) records.
fn visible_at(seen: &[(i64, Instant)], id: i64) -> Option<Instant> {
    let i = seen.partition_point(|(m, _)| *m < id);
    seen.get(i).map(|(_, t)| *t)
}

fn wait_visible(seen: &std::sync::Mutex<Vec<(i64, Instant)>>, id: i64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while seen.lock().expect("lock").last().is_none_or(|(m, _)| *m < id) {
        if Instant::now() > deadline {
            bail!("id {id} not visible on the standby within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn main() -> Result<()> {
    let secs: u64 = std::env::var("BENCH_SQLITE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let (f50, f99, fmax) = fsync_latency()?;
    println!("this disk: fdatasync of a 200-byte append p50 {f50:.2} ms, p99 {f99:.2} ms, max {fmax:.2} ms");
    let mut s = Setup::new()?;
    let (src, dst) = s.add_sqlite("")?;
    let c = app(&src)?;
    c.execute_batch("CREATE TABLE lat (id INTEGER PRIMARY KEY, at INTEGER, pad TEXT)")?;
    s.start()?;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = watcher(dst.clone(), stop.clone(), seen.clone());
    // Wait for the snapshot to land.
    let t0 = Instant::now();
    while !dst.exists()
        || Connection::open(&dst)?.query_row("SELECT count(*) FROM lat", [], |r| r.get::<_, i64>(0)).is_err()
    {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("standby never appeared\n{}", s.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut ins = c.prepare("INSERT INTO lat (id, at, pad) VALUES (?1, ?2, 'payload-0123456789')")?;
    // Warm up: the first start reseeds the receiver and reconnects; measure after that.
    const WARM: i64 = 100;
    for i in 1..=WARM {
        ins.execute(rusqlite::params![i, i])?;
        std::thread::sleep(Duration::from_millis(2));
    }
    wait_visible(&seen, WARM, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));

    // 1. Latency at a steady rate.
    let n = (secs * RATE) as i64;
    let mut committed = vec![Instant::now(); WARM as usize];
    let start = Instant::now();
    for i in WARM + 1..=WARM + n {
        let due = start + Duration::from_micros((i - WARM) as u64 * 1_000_000 / RATE);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        ins.execute(rusqlite::params![i, i])?;
        committed.push(Instant::now());
    }
    let n_end = WARM + n;
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    wait_visible(&seen, n_end, Duration::from_secs(60))?;
    let mut lat: Vec<f64> = {
        let seen = seen.lock().expect("lock");
        (WARM + 1..=n_end)
            .filter_map(|id| {
                visible_at(&seen, id)
                    .map(|t| t.saturating_duration_since(committed[(id - 1) as usize]).as_secs_f64() * 1e3)
            })
            .collect()
    };
    if std::env::var_os("BENCH_SQLITE_WORST").is_some() {
        let seen = seen.lock().expect("lock");
        let mut worst: Vec<(f64, i64)> = (WARM + 1..=n_end)
            .filter_map(|id| {
                visible_at(&seen, id)
                    .map(|t| (t.saturating_duration_since(committed[(id - 1) as usize]).as_secs_f64() * 1e3, id))
            })
            .collect();
        worst.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("no NaN"));
        for (ms, id) in worst.iter().take(8) {
            let at = committed[(*id - 1) as usize].duration_since(start).as_secs_f64();
            eprintln!("slow: id {id} committed at +{at:.3} s took {ms:.1} ms");
        }
        eprintln!("run started at {:?}", std::time::SystemTime::now() - start.elapsed());
    }
    let samples = lat.len();
    let (p50, p99, max) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99), percentile(&mut lat, 1.0));

    // 2. Commits/s shipped for a burst.
    let first = n_end + 1;
    let last = n_end + BURST;
    let b0 = Instant::now();
    for i in first..=last {
        ins.execute(rusqlite::params![i, i])?;
    }
    let app_secs = b0.elapsed().as_secs_f64();
    wait_visible(&seen, last, Duration::from_secs(120))?;
    let shipped_at = visible_at(&seen.lock().expect("lock"), last).expect("visible");
    let ship_secs = shipped_at.duration_since(b0).as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let _ = w.join();

    let agent = s.agent_status()?;
    println!("lockstep SQLite benchmark ({} cores)", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!(
        "commit-to-visible at {RATE} commits/s for {secs} s (achieved {achieved:.0}/s, {samples} samples): p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms"
    );
    println!(
        "burst of {BURST} single-row commits: application committed in {app_secs:.2} s ({:.0}/s); all visible on the standby after {ship_secs:.2} s => {:.0} commits/s shipped",
        BURST as f64 / app_secs,
        BURST as f64 / ship_secs
    );
    println!("reference: Litestream ships every 1 s by default (sync-interval), so its commit-to-replica delay is up to ~1000 ms");
    println!("agent journal: {}", agent["journal"]);
    Ok(())
}
