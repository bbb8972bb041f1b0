//! PostgreSQL replication benchmark: lockstep next to PostgreSQL's own logical replication
//! (CREATE SUBSCRIPTION), in the same run, between two clusters on this machine.
//!
//!  1. insert-to-visible latency p50/p99 at a steady 200 single-row inserts/s: from the
//!     moment the source acknowledges an insert's commit to the moment the standby's commit
//!     of that row is announced (an `ENABLE ALWAYS` trigger on the standby table issues a
//!     NOTIFY, delivered at commit; both replication paths apply as `replica`, so it fires
//!     for both);
//!  2. a 1,000,000-row insert in one transaction, live: from sending the INSERT until its last
//!     row is visible on the standby, and from the source's COMMIT returning until then (both
//!     replicators stream a large transaction while it runs: lockstep always, native with the
//!     subscription's `streaming = on` — `parallel` from PostgreSQL 16 —, its best setting);
//!  3. the same transaction committed while the replicator is stopped (the backlog after an
//!     outage): from restarting it (lockstep: the agent; native: `ALTER SUBSCRIPTION ... ENABLE`)
//!     until the last row is visible;
//!  4. the initial copy of an existing database (`SNAP_TABLES` tables of `SNAP_ROWS` rows,
//!     mixed types): from starting the daemons (lockstep, which also creates the tables on the
//!     standby) or creating the subscription (native, `copy_data = true`, tables created
//!     beforehand) until every row is on the standby.
//!
//! Before the rounds it probes the disk's `fdatasync` latency, idle and while the source takes
//! the latency workload alone (the floor under the journal flush on lockstep's path).
//!
//! lockstep runs with its full path: journal fsync, mutual TLS, receiver commit with
//! `synchronous_commit = on`. Native logical replication uses its defaults (the subscription
//! applies with `synchronous_commit = off`) plus streaming. Every timed part starts after a
//! `sync`, so neither side pays for dirty pages the other left.
//!
//! Run: `cargo run --release -p lockstep-tests --bin bench_pg` (as root is fine: the clusters
//! run as an unprivileged user). `BENCH_PG_SECS` sets each latency run's length (default 10),
//! `BENCH_PG_ROUNDS` the number of alternating rounds (default 5; medians and the spread
//! (min–max) are reported);
//! `BENCH_PG_SAMPLES=<path>` writes each latency run's per-row times to `<path>.<standby db>`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lockstep_tests::measure::{fsync_latency, fsync_probe, percentile};
use lockstep_tests::pg::PgCluster;
use lockstep_tests::Setup;
use tokio_postgres::{AsyncMessage, NoTls};

const RATE: u64 = 200;
const SNAP_TABLES: usize = 4;
const SNAP_ROWS: u64 = 250_000;
const BULK_ROWS: u64 = 1_000_000;

const TABLES: &str = "
CREATE TABLE lat (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), pad text);
CREATE TABLE bulk (id bigint PRIMARY KEY, payload text);
CREATE TABLE backlog (id bigint PRIMARY KEY, payload text);
";

const TRIGGER: &str = "
CREATE FUNCTION notify_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('applied', NEW.id::text); RETURN NEW; END $$;
CREATE TRIGGER lat_applied AFTER INSERT ON lat FOR EACH ROW EXECUTE FUNCTION notify_applied();
ALTER TABLE lat ENABLE ALWAYS TRIGGER lat_applied;
";

/// Inserts single rows at `RATE`/s into the source for `secs` and measures, per row, the time
/// from its commit acknowledgement to the standby's NOTIFY. Returns (p50, p99) in ms.
async fn latency(src_dsn: &str, standby_dsn: &str, secs: u64, first_id: i64, label: &str) -> Result<(f64, f64, usize)> {
    let (listener, mut conn) = standby_dsn.parse::<tokio_postgres::Config>()?.connect(NoTls).await?;
    let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<(Instant, i64)>();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let AsyncMessage::Notification(n) = m {
                if let Ok(id) = n.payload().parse::<i64>() {
                    let _ = ntx.send((Instant::now(), id));
                }
            }
        }
    });
    listener.batch_execute("LISTEN applied").await?;
    let (client, conn) = src_dsn.parse::<tokio_postgres::Config>()?.connect(NoTls).await?;
    tokio::spawn(conn);
    let insert = client.prepare("INSERT INTO lat (id, pad) VALUES ($1, 'x')").await?;
    let n = (secs * RATE) as i64;
    let mut committed = std::collections::HashMap::new();
    let mut visible = std::collections::HashMap::new();
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_micros(i as u64 * 1_000_000 / RATE);
        tokio::time::sleep_until(due.into()).await;
        client.execute(&insert, &[&(first_id + i)]).await?;
        committed.insert(first_id + i, Instant::now());
        while let Ok((t, id)) = nrx.try_recv() {
            visible.insert(id, t);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while visible.len() < n as usize {
        match tokio::time::timeout_at(deadline.into(), nrx.recv()).await {
            Ok(Some((t, id))) => {
                visible.insert(id, t);
            }
            _ => bail!("only {} of {n} inserts became visible on the standby", visible.len()),
        }
    }
    if let Some(path) = std::env::var_os("BENCH_PG_SAMPLES") {
        // Per row: id, commit acknowledged and visible, as Unix µs (to line up with daemon logs).
        let (now_i, now_s) = (Instant::now(), std::time::SystemTime::now());
        let unix_us = |t: Instant| {
            (now_s - now_i.saturating_duration_since(t))
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros()
        };
        let mut out = String::new();
        let mut ids: Vec<_> = committed.keys().copied().collect();
        ids.sort();
        for id in ids {
            out += &format!("{id} {} {}\n", unix_us(committed[&id]), unix_us(visible[&id]));
        }
        let mut path = std::path::PathBuf::from(path);
        path.as_mut_os_string().push(format!(".{label}"));
        std::fs::write(&path, out)?;
    }
    let mut ms: Vec<f64> =
        committed.iter().map(|(id, c)| visible[id].saturating_duration_since(*c).as_secs_f64() * 1000.0).collect();
    let count = ms.len();
    Ok((percentile(&mut ms, 0.5), percentile(&mut ms, 0.99), count))
}

/// Inserts `BULK_ROWS` rows in one transaction and waits until the last is visible on the
/// standby. Returns (seconds until visible, seconds the source took to commit).
async fn bulk(src_dsn: &str, standby_dsn: &str) -> Result<(f64, f64)> {
    sync();
    let (client, conn) = src_dsn.parse::<tokio_postgres::Config>()?.connect(NoTls).await?;
    tokio::spawn(conn);
    let (standby, conn) = standby_dsn.parse::<tokio_postgres::Config>()?.connect(NoTls).await?;
    tokio::spawn(conn);
    let t0 = Instant::now();
    client
        .batch_execute(&format!("INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, {BULK_ROWS}) g"))
        .await?;
    let committed = t0.elapsed().as_secs_f64();
    let last = BULK_ROWS as i64;
    loop {
        if standby.query_opt("SELECT 1 FROM bulk WHERE id = $1", &[&last]).await?.is_some() {
            return Ok((t0.elapsed().as_secs_f64(), committed));
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("bulk insert not visible on the standby after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Flushes every dirty page on this machine, so that the timed part that follows pays only for
/// its own writes.
fn sync() {
    let _ = std::process::Command::new("sync").status();
}

/// The backlog after an outage: with the replicator stopped (`pause`), a `BULK_ROWS`-row
/// transaction commits on the source; then the replicator is started again (`resume`) and the
/// time until the last row is visible on the standby is returned.
fn backlog(
    rt: &tokio::runtime::Runtime,
    src: &PgCluster,
    dst: &PgCluster,
    db: &str,
    pause: &mut dyn FnMut() -> Result<()>,
    resume: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    pause()?;
    src.psql("src", &format!("INSERT INTO backlog SELECT g, md5(g::text) FROM generate_series(1, {BULK_ROWS}) g"))?;
    sync();
    let t0 = Instant::now();
    resume()?;
    let last = BULK_ROWS as i64;
    rt.block_on(async {
        let (standby, conn) = dst.dsn(db).parse::<tokio_postgres::Config>()?.connect(NoTls).await?;
        tokio::spawn(conn);
        loop {
            if standby.query_opt("SELECT 1 FROM backlog WHERE id = $1", &[&last]).await?.is_some() {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("backlog not visible on the standby after 600 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// One lockstep round into a fresh standby database `db`.
fn lockstep_round(
    rt: &tokio::runtime::Runtime,
    src: &PgCluster,
    dst: &PgCluster,
    db: &str,
    secs: u64,
) -> Result<Round> {
    // The agent runs on the database host and, as deployed, reaches PostgreSQL through its
    // unix socket (BENCH_PG_TCP=1: over TCP like the subscription).
    let agent_dsn = if std::env::var_os("BENCH_PG_TCP").is_some() {
        src.dsn("src")
    } else {
        format!("host={} port={} user=postgres dbname=src", src.dir().display(), src.port())
    };
    let mut s = pg_setup("shop", &agent_dsn, "lockstep_bench", &dst.dsn(db))?;
    s.start()?;
    // Seeded (empty tables) and streaming.
    wait_until("lockstep streaming", Duration::from_secs(60), || {
        s.check_alive()?;
        Ok(s.agent_status().ok().is_some_and(|st| lockstep_tests::receiver_caught_up(&st))
            && dst.query(db, "SELECT count(*) FROM lockstep.applied_position").is_ok_and(|r| r.len() == 1))
    })
    .map_err(|e| e.context(s.logs_tail()))?;
    let mut round = measure(rt, src, dst, db, secs)?;
    let s = std::cell::RefCell::new(s);
    round.backlog_s = backlog(
        rt,
        src,
        dst,
        db,
        &mut || {
            s.borrow_mut().stop_agent();
            Ok(())
        },
        &mut || s.borrow_mut().start_agent(),
    )
    .map_err(|e| e.context(s.borrow().logs_tail()))?;
    let mut s = s.into_inner();
    s.kill_agent();
    s.kill_receiver();
    src.psql(
        "src",
        "SELECT pg_drop_replication_slot('lockstep_bench'); DROP PUBLICATION lockstep; TRUNCATE lat, bulk, backlog;",
    )?;
    Ok(round)
}

/// A test setup whose agent reads PostgreSQL source `name` (slot `slot`) and whose receiver
/// applies it to the standby database at `standby_dsn`.
fn pg_setup(name: &str, agent_dsn: &str, slot: &str, standby_dsn: &str) -> Result<Setup> {
    let s = Setup::new()?;
    let mut a = std::fs::read_to_string(&s.agent_cfg)?;
    a.push_str(&format!(
        "\n[[sources]]\nname = \"{name}\"\nkind = \"postgres\"\ndsn = \"{agent_dsn}\"\nslot = \"{slot}\"\n"
    ));
    std::fs::write(&s.agent_cfg, a)?;
    let mut r = std::fs::read_to_string(&s.receiver_cfg)?;
    r.push_str(&format!(
        "\n[[targets]]\nagent = \"web-1\"\nsource = \"{name}\"\nkind = \"postgres\"\ndsn = \"{standby_dsn}\"\n"
    ));
    std::fs::write(&s.receiver_cfg, r)?;
    Ok(s)
}

/// The best `streaming` setting of the installed server's subscriptions: `parallel` (apply
/// while the transaction runs, by a parallel worker) from PostgreSQL 16, `on` (spooled on the
/// subscriber as it arrives) before.
fn native_streaming(dst: &PgCluster) -> Result<&'static str> {
    let v = dst.query("postgres", "SHOW server_version_num")?;
    let num: u32 = v.first().and_then(|r| r[0].as_deref()).unwrap_or("0").parse()?;
    Ok(if num >= 160000 { "parallel" } else { "on" })
}

/// One native round: a subscription into a fresh database `db`.
fn native_round(rt: &tokio::runtime::Runtime, src: &PgCluster, dst: &PgCluster, db: &str, secs: u64) -> Result<Round> {
    src.psql("src", "CREATE PUBLICATION native FOR TABLE lat, bulk, backlog;")?;
    dst.psql(
        db,
        &format!(
            "CREATE SUBSCRIPTION native_{db} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=src' PUBLICATION native WITH (copy_data = false, streaming = {});",
            src.port(),
            native_streaming(dst)?
        ),
    )?;
    wait_until("native subscription streaming", Duration::from_secs(60), || {
        Ok(dst
            .query(db, "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND received_lsn IS NOT NULL")
            .is_ok_and(|r| r.first().and_then(|r| r[0].as_deref()) == Some("1")))
    })
    .map_err(|e| e.context(dst.log_tail()))?;
    let mut round = measure(rt, src, dst, db, secs)?;
    let worker_running = |running: bool| {
        wait_until("native apply worker", Duration::from_secs(60), || {
            let n = dst.query(db, "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL")?;
            Ok((n.first().and_then(|r| r[0].as_deref()) != Some("0")) == running)
        })
    };
    round.backlog_s = backlog(
        rt,
        src,
        dst,
        db,
        &mut || {
            dst.psql(db, &format!("ALTER SUBSCRIPTION native_{db} DISABLE;"))?;
            worker_running(false)
        },
        &mut || {
            dst.psql(db, &format!("ALTER SUBSCRIPTION native_{db} ENABLE;"))?;
            Ok(())
        },
    )?;
    dst.psql(db, &format!("DROP SUBSCRIPTION native_{db};"))?;
    src.psql("src", "DROP PUBLICATION native; TRUNCATE lat, bulk, backlog;")?;
    Ok(round)
}

/// The seeded database the initial-copy comparison copies.
fn snap_schema() -> String {
    (0..SNAP_TABLES)
        .map(|i| {
            format!(
                "CREATE TABLE snap{i} (id bigint PRIMARY KEY, n integer NOT NULL, amount numeric(12,2), \
                 at timestamptz, label text, tags text[], doc jsonb);\n"
            )
        })
        .collect()
}

fn snap_seed() -> String {
    (0..SNAP_TABLES)
        .map(|i| {
            format!(
                "INSERT INTO snap{i} SELECT g, g % 1000, (g * 7 % 100000) / 100.0, \
                 '2026-01-01'::timestamptz + g * interval '1 second', md5(g::text), \
                 ARRAY['a' || g % 7, 'b'], jsonb_build_object('k', g, 'v', md5(g::text)) \
                 FROM generate_series(1, {SNAP_ROWS}) g;\n"
            )
        })
        .collect()
}

/// Whether every table of the seeded database holds all its rows in standby database `db`.
fn snap_complete(dst: &PgCluster, db: &str) -> bool {
    let counts: Vec<String> = (0..SNAP_TABLES).map(|i| format!("(SELECT count(*) FROM snap{i})")).collect();
    let q = format!("SELECT {}", counts.join(" + "));
    dst.query(db, &q).ok().and_then(|r| r.first().and_then(|r| r[0].clone())).and_then(|v| v.parse::<u64>().ok())
        == Some(SNAP_TABLES as u64 * SNAP_ROWS)
}

/// lockstep's initial copy of database `snap` into the empty standby database `db`: seconds
/// from starting the daemons until the agent reports the receiver caught up (its snapshot
/// committed) and every row is there.
fn lockstep_snapshot(src: &PgCluster, dst: &PgCluster, db: &str) -> Result<f64> {
    let agent_dsn = format!("host={} port={} user=postgres dbname=snap", src.dir().display(), src.port());
    let mut s = pg_setup("snap", &agent_dsn, "lockstep_snap", &dst.dsn(db))?;
    let t0 = Instant::now();
    s.start()?;
    wait_until("lockstep initial copy", Duration::from_secs(600), || {
        s.check_alive()?;
        Ok(s.agent_status().ok().is_some_and(|st| lockstep_tests::receiver_caught_up(&st)) && snap_complete(dst, db))
    })
    .map_err(|e| e.context(s.logs_tail()))?;
    let took = t0.elapsed().as_secs_f64();
    s.kill_agent();
    s.kill_receiver();
    src.psql("snap", "SELECT pg_drop_replication_slot('lockstep_snap'); DROP PUBLICATION lockstep;")?;
    Ok(took)
}

/// Native initial copy of database `snap` into standby database `db`, whose tables exist.
fn native_snapshot(src: &PgCluster, dst: &PgCluster, db: &str) -> Result<f64> {
    src.psql("snap", "CREATE PUBLICATION native_snap FOR ALL TABLES;")?;
    dst.psql(db, &snap_schema())?;
    let t0 = Instant::now();
    dst.psql(
        db,
        &format!(
            "CREATE SUBSCRIPTION native_snap_{db} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=snap' PUBLICATION native_snap;",
            src.port()
        ),
    )?;
    wait_until("native initial copy", Duration::from_secs(600), || {
        Ok(snap_complete(dst, db)
            && dst
                .query(db, "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's')")
                .is_ok_and(|r| r.first().and_then(|r| r[0].as_deref()) == Some("0")))
    })
    .map_err(|e| e.context(dst.log_tail()))?;
    let took = t0.elapsed().as_secs_f64();
    dst.psql(db, &format!("DROP SUBSCRIPTION native_snap_{db};"))?;
    src.psql("snap", "DROP PUBLICATION native_snap;")?;
    Ok(took)
}

/// Polls `ready` every 50 ms for up to `limit`.
fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    while !ready()? {
        if t0.elapsed() > limit {
            bail!("{what}: not ready after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The latency run, then the bulk insert, into standby database `db`.
fn measure(rt: &tokio::runtime::Runtime, src: &PgCluster, dst: &PgCluster, db: &str, secs: u64) -> Result<Round> {
    sync();
    let (p50, p99, _) = rt.block_on(latency(&src.dsn("src"), &dst.dsn(db), secs, 1, db))?;
    let (bulk_s, commit_s) = rt.block_on(bulk(&src.dsn("src"), &dst.dsn(db)))?;
    Ok(Round { p50, p99, bulk_s, after_commit_s: bulk_s - commit_s, backlog_s: 0.0 })
}

struct Round {
    p50: f64,
    p99: f64,
    bulk_s: f64,
    after_commit_s: f64,
    /// Catch-up of a backlog committed while the replicator was stopped.
    backlog_s: f64,
}

/// The disk's fdatasync latency (as [`fsync_latency`]) while the source takes the latency
/// workload alone — `RATE` single-row commits/s for `secs`, nothing replicating: what a
/// journal flush costs on this disk during the latency runs, before any replication load.
fn fsync_under_load(rt: &tokio::runtime::Runtime, src: &PgCluster, secs: u64) -> Result<(f64, f64, f64)> {
    // 5 ms apart plus the flush itself: a little under `secs`.
    let probe = std::thread::spawn(move || fsync_probe(secs as usize * 180));
    rt.block_on(async {
        let (client, conn) = src.dsn("src").parse::<tokio_postgres::Config>()?.connect(NoTls).await?;
        tokio::spawn(conn);
        let insert = client.prepare("INSERT INTO lat (id, pad) VALUES ($1, 'x')").await?;
        let start = Instant::now();
        for i in 0..(secs * RATE) as i64 {
            tokio::time::sleep_until((start + Duration::from_micros(i as u64 * 1_000_000 / RATE)).into()).await;
            client.execute(&insert, &[&i]).await?;
        }
        anyhow::Ok(())
    })?;
    let r = probe.join().map_err(|_| anyhow::anyhow!("fsync probe thread panicked"))??;
    src.psql("src", "TRUNCATE lat;")?;
    Ok(r)
}

/// Median and range of a set of figures.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn ms(&self) -> String {
        format!("{:.2} ms ({:.2}–{:.2})", self.median, self.min, self.max)
    }
    fn s(&self) -> String {
        format!("{:.2} s ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

fn spread(mut v: Vec<f64>) -> Spread {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Spread { median: percentile(&mut v, 0.5), min, max }
}

fn main() -> Result<()> {
    let secs: u64 = std::env::var("BENCH_PG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let rounds: usize = std::env::var("BENCH_PG_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    println!(
        "lockstep postgres benchmark — {}",
        std::process::Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    let (f50, f99, fmax) = fsync_latency()?;
    println!("this disk: fdatasync of a 200-byte append p50 {f50:.2} ms, p99 {f99:.2} ms, max {fmax:.2} ms");
    let src = PgCluster::start().context("start source cluster")?;
    let dst = PgCluster::start().context("start standby cluster")?;
    src.create_db("src")?;
    src.psql("src", TABLES)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (l50, l99, lmax) = fsync_under_load(&rt, &src, secs)?;
    println!(
        "this disk under the source's {RATE} commits/s alone: fdatasync p50 {l50:.2} ms, p99 {l99:.2} ms, max {lmax:.2} ms"
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for (who, list) in [("lockstep", &mut ours), ("native", &mut theirs)] {
            let db = format!("{}_{round}", if who == "lockstep" { "ls" } else { "native" });
            dst.create_db(&db)?;
            dst.psql(&db, TABLES)?;
            dst.psql(&db, TRIGGER)?;
            let r = if who == "lockstep" {
                lockstep_round(&rt, &src, &dst, &db, secs)?
            } else {
                native_round(&rt, &src, &dst, &db, secs)?
            };
            println!(
                "  round {round} {who:8}: insert-to-visible p50 {:.2} ms, p99 {:.2} ms; {BULK_ROWS} rows visible after {:.2} s ({:.2} s after the source commit); backlog caught up in {:.2} s",
                r.p50, r.p99, r.bulk_s, r.after_commit_s, r.backlog_s
            );
            list.push(r);
        }
    }
    // The initial copy, in alternating rounds too.
    src.create_db("snap")?;
    src.psql("snap", &snap_schema())?;
    src.psql("snap", &snap_seed())?;
    src.psql("snap", "VACUUM ANALYZE;")?;
    let (mut snap_ours, mut snap_theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let db = format!("snap_ls_{round}");
        dst.create_db(&db)?;
        sync();
        let l = lockstep_snapshot(&src, &dst, &db)?;
        let db = format!("snap_native_{round}");
        dst.create_db(&db)?;
        sync();
        let n = native_snapshot(&src, &dst, &db)?;
        println!(
            "  round {round} initial copy of {SNAP_TABLES} x {SNAP_ROWS} rows: lockstep {l:.2} s, native {n:.2} s"
        );
        snap_ours.push(l);
        snap_theirs.push(n);
    }
    let stat = |v: &[Round], f: fn(&Round) -> f64| spread(v.iter().map(f).collect());
    println!("medians (min–max) of {rounds} alternating rounds ({RATE} inserts/s for {secs} s; {BULK_ROWS}-row transactions):");
    for (who, v) in [("lockstep", &ours), ("native", &theirs)] {
        println!(
            "  {who:8}: p50 {}; p99 {}; live bulk {} (commit to visible {}); backlog catch-up {}",
            stat(v, |r| r.p50).ms(),
            stat(v, |r| r.p99).ms(),
            stat(v, |r| r.bulk_s).s(),
            stat(v, |r| r.after_commit_s).s(),
            stat(v, |r| r.backlog_s).s(),
        );
    }
    println!(
        "  initial copy of {} rows in {SNAP_TABLES} tables: lockstep {}, native {}",
        SNAP_TABLES as u64 * SNAP_ROWS,
        spread(snap_ours).s(),
        spread(snap_theirs).s()
    );
    Ok(())
}
