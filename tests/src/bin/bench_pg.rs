//! PostgreSQL replication benchmark: lockstep next to PostgreSQL's own logical replication
//! (CREATE SUBSCRIPTION), in the same run, between two clusters on this machine.
//!
//!  1. insert-to-visible latency p50/p99 at a steady 200 single-row inserts/s: from the
//!     moment the source acknowledges an insert's commit to the moment the standby's commit
//!     of that row is announced (an `ENABLE ALWAYS` trigger on the standby table issues a
//!     NOTIFY, delivered at commit; both replication paths apply as `replica`, so it fires
//!     for both);
//!  2. a 1,000,000-row insert in one transaction: from sending the INSERT until its last row
//!     is visible on the standby.
//!
//! lockstep runs with its full path: journal fsync, mutual TLS, receiver commit with
//! `synchronous_commit = on`. Native logical replication uses its defaults (the subscription
//! applies with `synchronous_commit = off`).
//!
//! Run: `cargo run --release -p lockstep-tests --bin bench_pg` (as root is fine: the clusters
//! run as an unprivileged user). `BENCH_PG_SECS` sets the latency run's length (default 15).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lockstep_tests::pg::PgCluster;
use lockstep_tests::Setup;
use tokio_postgres::{AsyncMessage, NoTls};

const RATE: u64 = 200;
const BULK_ROWS: u64 = 1_000_000;

const TABLES: &str = "
CREATE TABLE lat (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), pad text);
CREATE TABLE bulk (id bigint PRIMARY KEY, payload text);
";

const TRIGGER: &str = "
CREATE FUNCTION notify_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('applied', NEW.id::text); RETURN NEW; END $$;
CREATE TRIGGER lat_applied AFTER INSERT ON lat FOR EACH ROW EXECUTE FUNCTION notify_applied();
ALTER TABLE lat ENABLE ALWAYS TRIGGER lat_applied;
";

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Inserts single rows at `RATE`/s into the source for `secs` and measures, per row, the time
/// from its commit acknowledgement to the standby's NOTIFY. Returns (p50, p99) in ms.
async fn latency(src_dsn: &str, standby_dsn: &str, secs: u64, first_id: i64) -> Result<(f64, f64, usize)> {
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
    let mut ms: Vec<f64> =
        committed.iter().map(|(id, c)| visible[id].saturating_duration_since(*c).as_secs_f64() * 1000.0).collect();
    let count = ms.len();
    Ok((percentile(&mut ms, 0.5), percentile(&mut ms, 0.99), count))
}

/// Inserts `BULK_ROWS` rows in one transaction and waits until the last is visible on the
/// standby. Returns (seconds until visible, seconds the source took to commit).
async fn bulk(src_dsn: &str, standby_dsn: &str) -> Result<(f64, f64)> {
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

fn main() -> Result<()> {
    let secs: u64 = std::env::var("BENCH_PG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    println!(
        "lockstep postgres benchmark — {}",
        std::process::Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    let src = PgCluster::start().context("start source cluster")?;
    let dst = PgCluster::start().context("start standby cluster")?;
    src.create_db("src")?;
    src.psql("src", TABLES)?;
    for db in ["ls", "native"] {
        dst.create_db(db)?;
        dst.psql(db, TABLES)?;
        dst.psql(db, TRIGGER)?;
    }
    let rt = tokio::runtime::Runtime::new()?;

    // lockstep. The agent runs on the database host and, as deployed, reaches PostgreSQL
    // through its unix socket (BENCH_PG_TCP=1: over TCP like the subscription).
    let agent_dsn = if std::env::var_os("BENCH_PG_TCP").is_some() {
        src.dsn("src")
    } else {
        format!("host={} port={} user=postgres dbname=src", src.dir().display(), src.port())
    };
    println!("lockstep agent connects with {agent_dsn:?}");
    let mut s = Setup::new()?;
    let mut a = std::fs::read_to_string(&s.agent_cfg)?;
    a.push_str(&format!(
        "\n[[sources]]\nname = \"shop\"\nkind = \"postgres\"\ndsn = \"{}\"\nslot = \"lockstep_bench\"\n",
        agent_dsn
    ));
    std::fs::write(&s.agent_cfg, a)?;
    let mut r = std::fs::read_to_string(&s.receiver_cfg)?;
    r.push_str(&format!(
        "\n[[targets]]\nagent = \"web-1\"\nsource = \"shop\"\nkind = \"postgres\"\ndsn = \"{}\"\n",
        dst.dsn("ls")
    ));
    std::fs::write(&s.receiver_cfg, r)?;
    s.start()?;
    // Seeded (empty tables) and streaming.
    let t0 = Instant::now();
    loop {
        s.check_alive()?;
        let ok = s.agent_status().ok().is_some_and(|st| {
            let r = &st["receivers"][0];
            r["connected"] == true && r["resyncing"].is_null() && r["events_behind"] == 0
        }) && dst.query("ls", "SELECT count(*) FROM lockstep.applied_position").is_ok_and(|r| r.len() == 1);
        if ok {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("lockstep did not start streaming\n{}", s.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (l50, l99, n) = rt.block_on(latency(&src.dsn("src"), &dst.dsn("ls"), secs, 1))?;
    println!("lockstep: insert-to-visible at {RATE} inserts/s ({n} rows): p50 {l50:.2} ms, p99 {l99:.2} ms");
    // Where the time goes: when the agent had journaled the whole transaction.
    let journaled_at = std::sync::Mutex::new(None::<f64>);
    let done = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    let (lb, lc) = std::thread::scope(|sc| -> Result<(f64, f64)> {
        let watch = sc.spawn(|| {
            let mut last = (0u64, 0.0f64);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(st) = s.agent_status() {
                    let seq = st["journal"]["last_seq"].as_u64().unwrap_or(0);
                    if seq != last.0 {
                        last = (seq, t0.elapsed().as_secs_f64());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            *journaled_at.lock().unwrap() = Some(last.1);
        });
        let r = rt.block_on(bulk(&src.dsn("src"), &dst.dsn("ls")));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = watch.join();
        r
    })?;
    if let Some(j) = *journaled_at.lock().unwrap() {
        println!("lockstep: (the agent had journaled the whole transaction {j:.2} s after the INSERT was sent)");
    }
    println!(
        "lockstep: {BULK_ROWS}-row insert visible on the standby after {lb:.2} s = {:.0} rows/s (source commit took {lc:.2} s)",
        BULK_ROWS as f64 / lb
    );
    s.kill_agent();
    s.kill_receiver();
    src.psql(
        "src",
        "SELECT pg_drop_replication_slot('lockstep_bench'); DROP PUBLICATION lockstep; TRUNCATE lat, bulk;",
    )?;

    // Native logical replication.
    src.psql("src", "CREATE PUBLICATION native FOR TABLE lat, bulk;")?;
    dst.psql(
        "native",
        &format!(
            "CREATE SUBSCRIPTION native CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=src' PUBLICATION native WITH (copy_data = false);",
            src.port()
        ),
    )?;
    let t0 = Instant::now();
    loop {
        let ready = dst
            .query(
                "native",
                "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND received_lsn IS NOT NULL",
            )
            .is_ok_and(|r| r.first().and_then(|r| r[0].as_deref()) == Some("1"));
        if ready {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("native subscription did not start\n{}", dst.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (n50, n99, n) = rt.block_on(latency(&src.dsn("src"), &dst.dsn("native"), secs, 1))?;
    println!("native:   insert-to-visible at {RATE} inserts/s ({n} rows): p50 {n50:.2} ms, p99 {n99:.2} ms");
    let (nb, nc) = rt.block_on(bulk(&src.dsn("src"), &dst.dsn("native")))?;
    println!(
        "native:   {BULK_ROWS}-row insert visible on the standby after {nb:.2} s = {:.0} rows/s (source commit took {nc:.2} s)",
        BULK_ROWS as f64 / nb
    );
    println!(
        "bars: p99 {l99:.2} ms vs limit 2 x {n99:.2} + 0.5 = {:.2} ms ({}); 1M rows {lb:.2} s vs native {nb:.2} s ({})",
        2.0 * n99 + 0.5,
        if l99 <= 2.0 * n99 + 0.5 { "met" } else { "NOT met" },
        if lb <= nb { "met" } else { "NOT met" }
    );
    dst.psql("native", "DROP SUBSCRIPTION native;")?;
    Ok(())
}
