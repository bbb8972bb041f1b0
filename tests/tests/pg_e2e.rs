//! PostgreSQL end to end: a real PostgreSQL cluster (started by the harness), a real agent
//! following it through a logical replication slot, a real receiver applying to a standby
//! database, mutual TLS on loopback. Each test ends by comparing every table row for row.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lockstep_tests::pg::PgCluster;
use lockstep_tests::Setup;

/// An agent + receiver pair replicating database `shop` to `shop_standby` in the same cluster
/// (the fs source of the default setup stays too; it idles on an empty tree).
fn pg_setup(pg: &PgCluster) -> Result<Setup> {
    pg_setup_with(pg, "")
}

/// [`pg_setup`] with `dsn_extra` appended to both connection strings (e.g. TLS settings).
fn pg_setup_with(pg: &PgCluster, dsn_extra: &str) -> Result<Setup> {
    pg_setup_on(pg, pg, dsn_extra)
}

/// [`pg_setup_with`] with database `shop` on `src` and `shop_standby` on `dst`, which may be
/// another cluster.
fn pg_setup_on(src: &PgCluster, dst: &PgCluster, dsn_extra: &str) -> Result<Setup> {
    src.create_db("shop")?;
    dst.create_db("shop_standby")?;
    let s = Setup::new()?;
    let mut a = std::fs::read_to_string(&s.agent_cfg)?;
    a.push_str(&format!(
        "\n[[sources]]\nname = \"shop\"\nkind = \"postgres\"\ndsn = \"{}{dsn_extra}\"\npublication = \"lockstep\"\nslot = \"lockstep_test\"\n",
        src.dsn("shop")
    ));
    std::fs::write(&s.agent_cfg, a)?;
    let mut r = std::fs::read_to_string(&s.receiver_cfg)?;
    r.push_str(&format!(
        "\n[[targets]]\nagent = \"web-1\"\nsource = \"shop\"\nkind = \"postgres\"\ndsn = \"{}{dsn_extra}\"\n",
        dst.dsn("shop_standby")
    ));
    std::fs::write(&s.receiver_cfg, r)?;
    Ok(s)
}

/// Commits a marker row on the source and waits until the standby shows it — every earlier
/// commit is then applied too (the standby applies in commit order) — then compares the two
/// databases.
fn wait_equal(s: &mut Setup, pg: &PgCluster, timeout: Duration) -> Result<()> {
    wait_equal_across(s, pg, pg, timeout)
}

/// A xorshift generator seeded from `LOCKSTEP_SEED` (printed, to replay a run) or at random.
fn seeded_rng() -> impl FnMut() -> u64 {
    let seed: u64 = std::env::var("LOCKSTEP_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("LOCKSTEP_SEED={seed}");
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// kill -9 of the agent and of the receiver, three times each in turn, `pause_ms` plus up to
/// 1.5 s apart, each restarted after up to 0.5 s.
fn kill_in_turn(s: &mut Setup, next: &mut impl FnMut() -> u64, pause_ms: u64) -> Result<()> {
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(pause_ms + next() % 1500));
        if i % 2 == 0 {
            s.kill_agent();
            std::thread::sleep(Duration::from_millis(next() % 500));
            s.start_agent()?;
        } else {
            s.kill_receiver();
            std::thread::sleep(Duration::from_millis(next() % 500));
            s.start_receiver()?;
        }
    }
    Ok(())
}

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE typed (
    id bigint PRIMARY KEY,
    i int, n numeric(40, 10), f float8, r real, b boolean,
    t text, vc varchar(20), ch char(3),
    ts timestamptz, tsn timestamp, d date, tm time, iv interval,
    u uuid, j jsonb, js json, ba bytea,
    ia int[], ta text[], m mood, ip inet,
    big text
);
CREATE TABLE nokey (a int, b text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, qty int DEFAULT 0);
"#;

/// Rows with every common type, awkward text, NULLs and a TOASTed column.
fn typed_rows(from: i64, to: i64) -> String {
    format!(
        r#"INSERT INTO typed SELECT g, g % 1000 - 500, (g * 12345.678901)::numeric(40,10) * 1e12, g / 7.0, g / 3.0, g % 2 = 0,
    E'tab\there\nnew line \\ backslash '' quote "dq" ünïcödé 🚀 ' || g, 'vc' || g, 'c' || (g % 10),
    '2024-02-29 23:59:59.123456+05:30'::timestamptz + g * interval '1 minute', '1999-12-31 12:00'::timestamp, '2000-01-01'::date + g::int,
    '12:34:56.789', interval '1 year 2 mons 3 days 04:05:06.7',
    md5(g::text)::uuid, jsonb_build_object('k', g, 'arr', jsonb_build_array(1, 'two', null), 'nested', jsonb_build_object('x', 1.5e300)),
    '{{"b": 1,   "a": 2}}'::json, decode(md5(g::text), 'hex') || '\x00ff'::bytea,
    ARRAY[g, -g, NULL]::int[], ARRAY['a b', NULL, E'c\\d', '{{}}', '"q"']::text[], (ARRAY['sad','ok','happy'])[g % 3 + 1]::mood, '10.0.0.1/8'::inet,
    CASE WHEN g % 5 = 0 THEN repeat(md5(g::text), 400) END
  FROM generate_series({from}, {to}) g;
INSERT INTO typed (id) VALUES ({nullrow});
"#,
        nullrow = to + 1_000_000
    )
}

#[test]
fn pg_snapshot_stream_types_toast_truncate_ddl() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut s = pg_setup(&pg)?;
    // Existing data: the initial snapshot must carry it (and create the tables).
    pg.psql("shop", SCHEMA)?;
    pg.psql("shop", &typed_rows(1, 2000))?;
    pg.psql("shop", "INSERT INTO nokey VALUES (1, 'x'), (1, 'x'), (2, NULL); INSERT INTO items (name) SELECT 'item' || g FROM generate_series(1, 500) g;")?;
    s.start()?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;

    // Streaming: inserts of every type, updates that leave the TOASTed column untouched, key
    // changes, deletes, a table without a key, a logical message, in several transactions.
    pg.psql("shop", &typed_rows(3000, 3500))?;
    pg.psql(
        "shop",
        "BEGIN;
         UPDATE typed SET i = i + 1, t = t || ' updated' WHERE id % 5 = 0;   -- big (TOAST) untouched
         UPDATE typed SET id = id + 100000 WHERE id BETWEEN 10 AND 20;        -- key change
         DELETE FROM typed WHERE id % 7 = 0;
         SELECT pg_logical_emit_message(true, 'lockstep-test', 'in txn');
         COMMIT;
         UPDATE nokey SET b = 'y' WHERE a = 1 AND ctid = (SELECT ctid FROM nokey WHERE a = 1 LIMIT 1);
         DELETE FROM nokey WHERE a = 2;
         SELECT pg_logical_emit_message(false, 'lockstep-test', 'outside');
         UPDATE items SET qty = qty + 1 WHERE id <= 100;",
    )?;
    // A message emitted outside the transaction that emits it (decoded at once, ahead of the
    // transaction) ends where the transaction's commit record begins: the transaction is not
    // taken for one already journaled.
    pg.psql(
        "shop",
        "BEGIN;
         INSERT INTO items (name) VALUES ('behind a barrier');
         SELECT pg_logical_emit_message(false, 'lockstep-test', 'barrier');
         COMMIT;",
    )?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    // The TOASTed values are really there on the standby (not placeholders).
    let big = pg.query("shop_standby", "SELECT count(*) FROM typed WHERE big IS NOT NULL AND length(big) = 12800")?;
    let src_big = pg.query("shop", "SELECT count(*) FROM typed WHERE big IS NOT NULL AND length(big) = 12800")?;
    assert_eq!(big, src_big);

    // Schema change mid-stream, then truncate and refill.
    pg.psql(
        "shop",
        "ALTER TABLE items ADD COLUMN note text;
         INSERT INTO items (name, note) VALUES ('after-ddl', 'hello');
         UPDATE items SET note = 'n' || id WHERE id % 3 = 0;
         ALTER TABLE items DROP COLUMN qty;
         INSERT INTO items (name, note) VALUES ('after-drop', 'bye');",
    )?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    // Columns added with a default: the rows already there hold it (PostgreSQL writes no row
    // change for them), awkward text, arrays and JSON included; a later row carries its own.
    pg.psql(
        "shop",
        r#"ALTER TABLE items ADD COLUMN flag int NOT NULL DEFAULT 9, ADD COLUMN label text DEFAULT E'a,"b} c''d\\e',
            ADD COLUMN tags int[] DEFAULT '{1,NULL,3}', ADD COLUMN meta jsonb DEFAULT '{"k": [1, "x"]}',
            ADD COLUMN price numeric(12,3) DEFAULT 1.5, ADD COLUMN gone text DEFAULT NULL;
         INSERT INTO items (name, flag, label) VALUES ('after-defaults', 1, NULL);"#,
    )?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    pg.psql("shop", "TRUNCATE nokey; INSERT INTO nokey VALUES (5, 'five');")?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;

    // Enum labels added on the source (no relation message announces them), then used.
    pg.psql("shop", "ALTER TYPE mood ADD VALUE 'meh' BEFORE 'ok'; ALTER TYPE mood ADD VALUE 'ecstatic';")?;
    pg.psql(
        "shop",
        "INSERT INTO typed (id, m) VALUES (900001, 'ecstatic'), (900002, 'meh'); UPDATE typed SET m = 'meh' WHERE id = 3001;",
    )?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    let labels = "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = 'mood'::regtype ORDER BY enumsortorder";
    assert_eq!(pg.query("shop_standby", labels)?, pg.query("shop", labels)?);
    // A label renamed on the source renames every row holding it; the standby's label is
    // renamed too once a row carries the new name.
    pg.psql("shop", "ALTER TYPE mood RENAME VALUE 'happy' TO 'glad';")?;
    pg.psql("shop", "INSERT INTO typed (id, m) VALUES (900003, 'glad');")?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    assert_eq!(pg.query("shop_standby", labels)?, pg.query("shop", labels)?);

    // One large transaction: travels in chunks, applied atomically.
    pg.psql("shop", "CREATE TABLE bulk (id bigint PRIMARY KEY, payload text);")?;
    pg.psql("shop", "INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 1000000) g;")?;
    // While its chunks are applied, the agent's view of the receiver (acked_seq, and so lag)
    // never runs ahead of what the standby committed: lag 0 means the standby has it all.
    let t0 = Instant::now();
    let mut samples = 0;
    let arrived = || -> Result<bool> {
        // The standby's table is created with the transaction's first chunk.
        Ok(!pg.query("shop_standby", "SELECT 1 FROM pg_class WHERE relname = 'bulk'")?.is_empty()
            && pg.query("shop_standby", "SELECT count(*) FROM bulk")?[0][0].as_deref() == Some("1000000"))
    };
    while !arrived()? {
        let acked = s.agent_status()?["receivers"][0]["acked_seq"].as_u64().unwrap_or(0);
        let st = s.receiver_status()?;
        let committed = st["targets"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["source"] == "shop"))
            .and_then(|t| t["committed_seq"].as_u64())
            .unwrap_or(0);
        assert!(acked <= committed, "the agent holds seq {acked} acknowledged, the standby committed {committed}");
        samples += 1;
        if t0.elapsed() > Duration::from_secs(180) {
            bail!("the bulk insert did not arrive\n{}", s.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(samples > 0, "no sample taken while the bulk insert was applied");
    wait_equal(&mut s, &pg, Duration::from_secs(180))?;

    // A transaction of 40 MB of logical messages (more than one gRPC message may carry) is
    // journaled in chunks like one of many rows; what follows it arrives.
    pg.psql(
        "shop",
        "BEGIN;
         SELECT count(pg_logical_emit_message(true, 'lockstep-test', repeat('m', 1000000))) FROM generate_series(1, 40);
         INSERT INTO items (name) VALUES ('after 40 MB of messages');
         COMMIT;",
    )?;
    wait_equal(&mut s, &pg, Duration::from_secs(120))?;
    let n = pg.query("shop_standby", "SELECT count(*) FROM bulk")?;
    assert_eq!(n[0][0].as_deref(), Some("1000000"));
    Ok(())
}

/// pgbench and a mixed churn while the agent and the receiver are killed with SIGKILL at
/// random moments; afterwards every table is equal row for row.
#[test]
fn pg_kill9_under_load() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut s = pg_setup(&pg)?;
    pg.pgbench("shop", &["-i", "-s", "2", "-q"])?;
    pg.psql("shop", SCHEMA)?;
    pg.psql("shop", &typed_rows(1, 300))?;
    s.start()?;

    let stop = AtomicBool::new(false);
    let mut next = seeded_rng();
    std::thread::scope(|sc| -> Result<()> {
        let load = sc.spawn(|| -> Result<()> {
            let mut round = 0i64;
            while !stop.load(Ordering::SeqCst) {
                pg.pgbench("shop", &["-c", "4", "-T", "2", "-n"])?;
                let base = 10_000 + round * 1000;
                pg.psql(
                    "shop",
                    &format!(
                        "{}
                         UPDATE typed SET i = i + 1 WHERE id % 5 = 0;
                         DELETE FROM typed WHERE id % 11 = {r};
                         INSERT INTO nokey SELECT g, 'r{round}' FROM generate_series(1, 20) g;
                         DELETE FROM nokey WHERE a = 3;",
                        typed_rows(base, base + 200),
                        r = round % 11
                    ),
                )?;
                round += 1;
            }
            Ok(())
        });
        let kills = kill_in_turn(&mut s, &mut next, 700);
        stop.store(true, Ordering::SeqCst);
        let loaded = load.join().expect("load thread");
        kills.and(loaded)
    })?;
    wait_equal(&mut s, &pg, Duration::from_secs(120))?;
    Ok(())
}

/// One large transaction of load thread `t`, round `round`: thousands of rows with nested
/// savepoints, some rolled back, a transactional logical message, updates of TOASTed rows
/// and deletes; every third one rolls back whole. Far above a `logical_decoding_work_mem` of
/// 64 kB, so the server streams it while it runs, interleaved with the other thread's.
fn streamed_txn(t: i64, round: i64) -> String {
    let base = t * 100_000_000 + round * 100_000;
    let rows = |from: i64, n: i64| {
        format!(
            "INSERT INTO big SELECT g, {t}, md5(g::text) || repeat('x', g % 300), CASE WHEN g % 50 = 0 THEN repeat(md5(g::text), 300) END FROM generate_series({}, {}) g;",
            base + from,
            base + from + n - 1
        )
    };
    let wide = if t == 0 && round % 4 == 1 {
        format!("ALTER TABLE wide ADD COLUMN c{round} int DEFAULT {round}; INSERT INTO wide (id, c{round}) SELECT g, g FROM generate_series({}, {}) g;", base, base + 999)
    } else {
        String::new()
    };
    let end = if round % 3 == 2 { "ROLLBACK;" } else { "COMMIT;" };
    format!(
        "BEGIN;
         {first}
         SAVEPOINT a;
         UPDATE big SET v = v || 'u' WHERE t = {t} AND id % 7 = 0;
         SAVEPOINT b;
         {inner}
         ROLLBACK TO SAVEPOINT b;
         DELETE FROM big WHERE t = {t} AND id % 13 = {r13};
         RELEASE SAVEPOINT a;
         {wide}
         SAVEPOINT c;
         {kept}
         SAVEPOINT d;
         {dropped}
         ROLLBACK TO SAVEPOINT d;
         RELEASE SAVEPOINT c;
         SELECT pg_logical_emit_message(true, 'lockstep-test', 'round {round} of {t}');
         UPDATE big SET big = NULL WHERE t = {t} AND id % 100 = 0;
         {last}
         {end}",
        first = rows(0, 3000),
        inner = rows(10_000, 2000),
        kept = rows(20_000, 1500),
        dropped = rows(30_000, 1500),
        last = rows(40_000, 500),
        r13 = round % 13,
    )
}

/// Large transactions streamed while they run (pgoutput protocol 2): savepoints rolled back
/// and released, whole transactions rolled back, two at a time interleaved with small pgbench
/// transactions, a column added inside one — with kill -9 of the agent and of the receiver
/// mid-stream. The standby ends equal, and the server did stream.
#[test]
fn pg_streamed_transactions_with_savepoints_and_kills() -> Result<()> {
    let pg = PgCluster::start()?;
    // The agent's walsender streams above 8 MB unless the dsn's `options` say otherwise.
    let mut s = pg_setup_with(&pg, " options='-c logical_decoding_work_mem=64kB'")?;
    pg.pgbench("shop", &["-i", "-s", "1", "-q"])?;
    pg.psql(
        "shop",
        "CREATE TABLE big (id bigint PRIMARY KEY, t int NOT NULL, v text, big text);
         CREATE TABLE wide (id bigint PRIMARY KEY);",
    )?;
    s.start()?;
    let stop = AtomicBool::new(false);
    let mut next = seeded_rng();
    std::thread::scope(|sc| -> Result<()> {
        let loads: Vec<_> = (0..2i64)
            .map(|t| {
                let (pg, stop) = (&pg, &stop);
                sc.spawn(move || -> Result<i64> {
                    let mut round = 0;
                    while !stop.load(Ordering::SeqCst) {
                        pg.psql("shop", &streamed_txn(t, round))?;
                        round += 1;
                    }
                    Ok(round)
                })
            })
            .collect();
        let small = sc.spawn(|| -> Result<()> {
            while !stop.load(Ordering::SeqCst) {
                pg.pgbench("shop", &["-c", "2", "-T", "1", "-n"])?;
            }
            Ok(())
        });
        let kills = kill_in_turn(&mut s, &mut next, 1000);
        stop.store(true, Ordering::SeqCst);
        let mut rounds = 0;
        for l in loads {
            rounds += l.join().expect("load thread")?;
        }
        small.join().expect("pgbench thread")?;
        eprintln!("{rounds} large transactions");
        kills
    })?;
    wait_equal(&mut s, &pg, Duration::from_secs(180))?;
    let streamed = pg.query(
        "shop",
        "SELECT coalesce(sum(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = 'lockstep_test'",
    )?;
    let streamed: i64 = streamed[0][0].as_deref().unwrap_or("0").parse()?;
    eprintln!("transactions the server streamed to the agent: {streamed}");
    assert!(streamed > 0, "the server streamed no transaction: the test did not exercise streaming");
    Ok(())
}

/// A server that admits TCP clients only over TLS: both sides connect with
/// `sslmode=verify-full`, the replication stream included, and the copy is exact. The
/// connection settings refuse a server signed by another CA, and plaintext is refused.
#[test]
fn pg_over_tls_with_verify_full() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let ours = certs.path().join("ours");
    let other = certs.path().join("other");
    lockstep_agent::certs::generate(&ours, &["db".into()], &["127.0.0.1".into()]).map_err(anyhow::Error::msg)?;
    lockstep_agent::certs::generate(&other, &["db".into()], &["127.0.0.1".into()]).map_err(anyhow::Error::msg)?;
    let mut pg = PgCluster::start()?;
    pg.require_tls(&std::fs::read_to_string(ours.join("db.pem"))?, &std::fs::read_to_string(ours.join("db.key"))?)?;
    let tls = format!(" sslmode=verify-full sslrootcert={}", ours.join("ca.pem").display());
    let mut s = pg_setup_with(&pg, &tls)?;
    pg.psql("shop", SCHEMA)?;
    pg.psql("shop", &typed_rows(1, 200))?;
    s.start()?;
    pg.psql("shop", &typed_rows(201, 400))?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    // Both of lockstep's kinds of connection really are encrypted.
    let rows = pg.query(
        "postgres",
        "SELECT count(*) FILTER (WHERE a.backend_type = 'walsender'), count(*) FILTER (WHERE a.backend_type = 'client backend') \
         FROM pg_stat_activity a JOIN pg_stat_ssl t USING (pid) WHERE t.ssl AND a.application_name LIKE 'lockstep%'",
    )?;
    let (walsenders, clients) = (rows[0][0].clone().unwrap_or_default(), rows[0][1].clone().unwrap_or_default());
    assert!(walsenders != "0" && clients != "0", "TLS walsenders {walsenders}, TLS clients {clients}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let try_connect = |extra: &str| {
        let conn =
            lockstep_common::pgtls::PgConn::parse(&format!("{}{extra}", pg.dsn("shop"))).map_err(anyhow::Error::msg)?;
        rt.block_on(conn.connect()).map(|_| ()).map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    try_connect(&tls)?;
    let wrong_ca = try_connect(&format!(" sslmode=verify-full sslrootcert={}", other.join("ca.pem").display()));
    assert!(format!("{wrong_ca:?}").contains("InvalidCertificate"), "{wrong_ca:?}");
    let plain = try_connect(" sslmode=disable");
    assert!(format!("{plain:?}").contains("no encryption"), "{plain:?}");
    // As libpq, a unix-domain socket is used without TLS whatever sslmode says.
    let local = format!("host={} port={} user=postgres dbname=shop sslmode=require", pg.dir().display(), pg.port());
    let local = lockstep_common::pgtls::PgConn::parse(&local).map_err(anyhow::Error::msg)?;
    rt.block_on(async {
        let (client, conn) = local.connect().await?;
        tokio::spawn(conn);
        client.simple_query("SELECT 1").await.map(|_| ())
    })?;
    Ok(())
}

/// Waits until the daemons' logs contain every one of `needles`.
fn expect_logs(s: &Setup, needles: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = s.logs_tail();
        if needles.iter().all(|n| logs.contains(n)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("expected {needles:?} in the logs:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server that cannot do logical replication is refused with the setting and the fix.
#[test]
fn pg_refuses_wal_level_replica() -> Result<()> {
    let pg = PgCluster::start_with(&["wal_level = replica"])?;
    let mut s = pg_setup(&pg)?;
    s.start()?;
    expect_logs(&s, &["wal_level is \"replica\"", "wal_level = logical", "restart PostgreSQL"])
}

/// A role without REPLICATION, and a publication that misses tables, are refused with the fix;
/// a table whose updates cannot be replicated gets a warning naming the fix.
#[test]
fn pg_refuses_role_and_partial_publication() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut s = pg_setup(&pg)?;
    pg.psql(
        "shop",
        "CREATE ROLE app LOGIN; CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);",
    )?;
    let cfg = std::fs::read_to_string(&s.agent_cfg)?;
    let as_app = cfg.replace(&pg.dsn("shop"), &pg.dsn("shop").replace("user=postgres", "user=app"));
    std::fs::write(&s.agent_cfg, &as_app)?;
    s.start()?;
    expect_logs(&s, &["lacks the REPLICATION attribute", "ALTER ROLE \"app\" REPLICATION"])?;
    s.kill_agent();

    pg.psql("shop", "CREATE PUBLICATION lockstep FOR TABLE a; CREATE TABLE keyless (v text);")?;
    std::fs::write(&s.agent_cfg, &cfg)?;
    s.start_agent()?;
    expect_logs(
        &s,
        &["does not include table(s) public.b, public.keyless", "ALTER PUBLICATION \"lockstep\" ADD TABLE"],
    )?;
    s.kill_agent();

    pg.psql("shop", "DROP PUBLICATION lockstep;")?;
    s.start_agent()?;
    expect_logs(&s, &["only its inserts are replicated", "REPLICA IDENTITY FULL"])?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    s.kill_agent();

    // Another consumer holds the slot: refused with the fix, and replication resumes once
    // that consumer is gone.
    let mut other = std::process::Command::new(pg.bin_dir().join("pg_recvlogical"))
        .args(["-d", &pg.dsn("shop"), "--slot", "lockstep_test", "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=lockstep"])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.query("shop", "SELECT active FROM pg_replication_slots WHERE slot_name = 'lockstep_test'")?[0][0]
        .as_deref()
        != Some("t")
    {
        if Instant::now() > deadline {
            let _ = other.kill();
            bail!("pg_recvlogical never took the slot");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pg.psql("shop", "INSERT INTO a VALUES (1), (2)")?;
    s.start_agent()?;
    let refused =
        expect_logs(&s, &["is in use by another session", "stop that consumer or configure another slot name"]);
    let _ = other.kill();
    let _ = other.wait();
    refused?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))
}

/// The slot is invalidated upstream while the agent is down (PostgreSQL removed WAL it still
/// needed): the agent says so loudly, creates a new slot and reseeds the receiver from a fresh
/// snapshot — the changes in the lost WAL reach the standby anyway, nothing silently missing.
#[test]
fn pg_lost_slot_resyncs_receivers() -> Result<()> {
    let pg = PgCluster::start_with(&["max_slot_wal_keep_size = 32MB", "max_wal_size = 64MB", "min_wal_size = 32MB"])?;
    let mut s = pg_setup(&pg)?;
    pg.psql("shop", "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'a' FROM generate_series(1, 100) g;")?;
    s.start()?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;

    s.kill_agent();
    pg.psql("shop", "UPDATE items SET v = 'changed while the agent was down'; CREATE TABLE filler (v text);")?;
    let mut lost = false;
    for _ in 0..20 {
        pg.psql(
            "shop",
            "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 20000) g; TRUNCATE filler; SELECT pg_switch_wal(); CHECKPOINT;",
        )?;
        let st = pg.query("shop", "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'lockstep_test'")?;
        if st.first().and_then(|r| r[0].as_deref()) == Some("lost") {
            lost = true;
            break;
        }
    }
    assert!(lost, "could not get the slot invalidated");
    pg.psql("shop", "INSERT INTO items VALUES (1000, 'after the loss');")?;

    s.start_agent()?;
    expect_logs(&s, &["replication slot was invalidated", "resyncing every receiver"])?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    let v = pg.query("shop_standby", "SELECT count(*) FROM items WHERE v = 'changed while the agent was down'")?;
    assert_eq!(v[0][0].as_deref(), Some("100"));
    Ok(())
}

/// A restart of either side while the initial snapshot is being copied: the snapshot is taken
/// again from scratch and the standby ends equal (nothing of a half-copied snapshot stays).
#[test]
fn pg_restart_during_snapshot() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut s = pg_setup(&pg)?;
    pg.psql(
        "shop",
        "CREATE TABLE big (id bigint PRIMARY KEY, v text);
         INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 400000) g;
         CREATE TABLE small (id int PRIMARY KEY, v text); INSERT INTO small VALUES (1, 'one');",
    )?;
    let snapshot_running = |s: &Setup| {
        s.receiver_status().ok().is_some_and(|st| {
            st["targets"]
                .as_array()
                .is_some_and(|ts| ts.iter().any(|t| t["source"] == "shop" && t["resyncing"] == true))
        })
    };
    for victim in ["receiver", "agent"] {
        s.start()?;
        let t0 = Instant::now();
        while !snapshot_running(&s) {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the snapshot never started\n{}", s.logs_tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(150));
        if victim == "receiver" {
            s.kill_receiver();
        } else {
            s.kill_agent();
        }
        pg.psql(
            "shop",
            &format!(
                "INSERT INTO small VALUES ({}, 'during {victim} restart');",
                if victim == "agent" { 2 } else { 3 }
            ),
        )?;
        s.kill_agent();
        s.kill_receiver();
    }
    s.start()?;
    wait_equal(&mut s, &pg, Duration::from_secs(120))?;
    Ok(())
}

/// [`wait_equal`] with the source database `shop` on `src` and the standby `shop_standby` on
/// `dst`, which may be another cluster.
fn wait_equal_across(s: &mut Setup, src: &PgCluster, dst: &PgCluster, timeout: Duration) -> Result<()> {
    let token = format!("{:x}", rand::random::<u64>());
    src.psql(
        "shop",
        &format!(
            "CREATE TABLE IF NOT EXISTS sentinel (id serial PRIMARY KEY, token text); INSERT INTO sentinel (token) VALUES ('{token}');"
        ),
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        s.check_alive()?;
        let seen = dst
            .query("shop_standby", &format!("SELECT count(*) FROM sentinel WHERE token = '{token}'"))
            .ok()
            .and_then(|rows| rows.first().and_then(|r| r[0].clone()))
            .is_some_and(|c| c == "1");
        if seen {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "standby did not catch up within {timeout:?}\nagent status: {}\nreceiver status: {}\n{}",
                s.agent_status().map(|v| v.to_string()).unwrap_or_else(|e| e.to_string()),
                s.receiver_status().map(|v| v.to_string()).unwrap_or_else(|e| e.to_string()),
                s.logs_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let diff = PgCluster::diff_databases((src, "shop"), (dst, "shop_standby"))?;
    if !diff.is_empty() {
        bail!("standby differs from the source:\n{}\n{}", diff.join("\n"), s.logs_tail());
    }
    s.wait_caught_up(timeout)
}

/// The standby's server crashes (SIGKILL of its postmaster) mid-load, then the source's: the
/// receiver reconnects to the standby with backoff and resumes from the position committed
/// with the data; the agent reconnects to the source, whose slot may send again what it had
/// already sent (its position is saved at checkpoints), and duplicates are recognised by
/// commit LSN. Every table equal afterwards.
#[test]
fn pg_source_and_standby_servers_crash_mid_load() -> Result<()> {
    let mut src = PgCluster::start()?;
    let mut dst = PgCluster::start()?;
    let mut s = pg_setup_on(&src, &dst, "")?;
    src.pgbench("shop", &["-i", "-s", "1", "-q"])?;
    src.psql("shop", SCHEMA)?;
    src.psql("shop", &typed_rows(1, 200))?;
    s.start()?;

    let stop = AtomicBool::new(false);
    let src_port = src.port();
    let ok_rounds = std::thread::scope(|sc| -> Result<u32> {
        let (psql, dsn) = (src.bin_dir().join("psql"), src.dsn("shop"));
        let stopref = &stop;
        let load = sc.spawn(move || {
            // Errors are expected while the source is down; the rounds that fail did not commit
            // (each is one transaction), or committed and are on the source anyway.
            let mut ok = 0u32;
            let mut round = 0i64;
            while !stopref.load(Ordering::SeqCst) {
                let base = 10_000 + round * 1000;
                let sql = format!(
                    "BEGIN; {}
                     UPDATE typed SET i = i + 1 WHERE id % 5 = 0;
                     DELETE FROM typed WHERE id % 11 = {r};
                     INSERT INTO nokey SELECT g, 'r{round}' FROM generate_series(1, 20) g;
                     DELETE FROM nokey WHERE a = 3;
                     UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 97 = {r};
                     COMMIT;",
                    typed_rows(base, base + 100),
                    r = round % 11
                );
                let committed = std::process::Command::new(&psql)
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &dsn, "-c", &sql])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|st| st.success());
                if committed {
                    ok += 1;
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                }
                round += 1;
            }
            ok
        });
        std::thread::sleep(Duration::from_millis(1500));
        dst.restart()?;
        std::thread::sleep(Duration::from_millis(2000));
        src.restart()?;
        assert_eq!(src.port(), src_port);
        std::thread::sleep(Duration::from_millis(2000));
        stop.store(true, Ordering::SeqCst);
        Ok(load.join().expect("load thread"))
    })?;
    eprintln!("load rounds committed: {ok_rounds}");
    wait_equal_across(&mut s, &src, &dst, Duration::from_secs(120))?;
    if ok_rounds < 5 {
        bail!("only {ok_rounds} load rounds committed; the load did not really run");
    }
    Ok(())
}

/// The standby gets a transaction before the agent's journal has flushed it (the flush is
/// held back here by a test hook). An agent killed in that window loses the record though the
/// standby applied it; restarted, it captures the transaction again from the slot under a new
/// seq, and the receiver recognises it by commit LSN. Nothing may be lost, applied twice (the
/// keyless table would show a doubled row) or resynced, and the stream must go on. Once the
/// receiver is restarted in that window too, coming back ahead of the journal's durable end.
/// The hook is the agent's failpoint `journal::hold_flushes`, in builds with its `failpoints`
/// feature (which `cargo test --workspace` enables; see README, Tests).
#[test]
fn pg_agent_killed_between_shipping_and_journal_flush() -> Result<()> {
    lockstep_tests::require_agent_failpoints()?;
    let pg = PgCluster::start()?;
    let mut s = pg_setup(&pg)?;
    pg.psql(
        "shop",
        "CREATE TABLE nokey (a int, b text); ALTER TABLE nokey REPLICA IDENTITY FULL;
         CREATE TABLE items (id int PRIMARY KEY, v text);",
    )?;
    s.start()?;
    wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    for round in 0..3 {
        s.kill_agent();
        // Nothing this agent appends is durable before `started` + the delay: the kill must
        // come before that for the test to mean anything.
        const HELD: Duration = Duration::from_secs(30);
        s.agent_env = vec![("FAILPOINTS".into(), format!("journal::hold_flushes=return({})", HELD.as_millis()))];
        let started = Instant::now();
        s.start_agent()?;
        s.wait_caught_up(Duration::from_secs(15))?;
        let insert_and_see = |s: &Setup, from: i64| -> Result<()> {
            for i in from..from + 5 {
                pg.psql(
                    "shop",
                    &format!("INSERT INTO nokey VALUES ({round}, 'early {i}'); INSERT INTO items VALUES ({round} * 100 + {i}, 'x');"),
                )?;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let n = pg.query("shop_standby", &format!("SELECT count(*) FROM nokey WHERE a = {round}"))?;
                if n[0][0].as_deref() == Some((from + 5).to_string().as_str()) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("round {round}: the standby did not get the transactions while the journal's flush was held back\n{}", s.logs_tail());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        insert_and_see(&s, 0)?;
        if round == 1 {
            // The receiver comes back holding records the journal has not flushed yet: the
            // agent resumes after them.
            s.kill_receiver();
            s.start_receiver()?;
            s.wait_caught_up(Duration::from_secs(15))?;
            insert_and_see(&s, 5)?;
        }
        if started.elapsed() >= HELD {
            bail!("round {round}: too slow to kill the agent before its first journal flush ({:?})", started.elapsed());
        }
        s.kill_agent();
        s.agent_env.clear();
        s.start_agent()?;
        pg.psql(
            "shop",
            &format!("INSERT INTO nokey VALUES ({round}, 'after the restart'); UPDATE items SET v = 'y' WHERE id = {round} * 100;"),
        )?;
        wait_equal(&mut s, &pg, Duration::from_secs(60))?;
    }
    let seeds = std::fs::read_dir(s.root())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("agent."))
        .map(|e| {
            std::fs::read_to_string(e.path()).unwrap_or_default().matches("resync: sending a full snapshot").count()
        })
        .sum::<usize>();
    assert_eq!(seeds, 2, "only the first start seeds the standby (the fs and the postgres source)\n{}", s.logs_tail());
    Ok(())
}

/// Writes rows into `a` (`id`, `k` only: the columns the DDL below leaves alone) until `stop`,
/// so that every schema change lands between row changes.
fn column_load(pg: &PgCluster, stop: &AtomicBool) -> Result<()> {
    let mut id = 1_000_000i64;
    while !stop.load(Ordering::SeqCst) {
        pg.psql(
            "shop",
            &format!(
                "INSERT INTO a (id, k) SELECT g, 1 FROM generate_series({id}, {}) g; UPDATE a SET k = k + 1 WHERE id % 13 = {};",
                id + 20,
                id % 13
            ),
        )?;
        id += 21;
    }
    Ok(())
}

/// Schema changes on a live source, under load and across kill -9 of either side: renamed
/// columns (live, and twice in a row with rows in between while the agent is down), a type
/// change, a column dropped and added again under the same name, a renamed table, and two
/// columns swapping names in one transaction. Every row keeps every value on the standby
/// (a rename taken for a drop would leave the renamed column NULL there). `settle`: wait
/// until the standby has caught up after each change, so that no two changes to one table
/// are ever both ahead of the agent (what identifies columns without the event trigger).
fn renames_under_load(s: &mut Setup, pg: &PgCluster, settle: bool) -> Result<()> {
    pg.psql(
        "shop",
        "CREATE TABLE a (id int PRIMARY KEY, k int NOT NULL DEFAULT 0, v text, n int);
         INSERT INTO a SELECT g, 0, 'v' || g, g FROM generate_series(1, 2000) g;
         CREATE TABLE b (id int PRIMARY KEY, w text);
         INSERT INTO b SELECT g, 'w' || g FROM generate_series(1, 500) g;",
    )?;
    s.start()?;
    wait_equal(s, pg, Duration::from_secs(60))?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| -> Result<()> {
        let load = sc.spawn(|| column_load(pg, &stop));
        let steps = (|| -> Result<()> {
            let pause = |s: &mut Setup| -> Result<()> {
                if settle {
                    wait_caught_up_on_sentinel(s, pg)
                } else {
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(())
                }
            };
            pg.psql("shop", "ALTER TABLE a RENAME COLUMN v TO val; UPDATE a SET val = val || '+' WHERE id % 10 = 0;")?;
            pause(s)?;
            s.kill_agent();
            pg.psql(
                "shop",
                "ALTER TABLE a RENAME COLUMN val TO label; UPDATE a SET label = label || '#' WHERE id % 7 = 0;",
            )?;
            if settle {
                s.start_agent()?;
                pause(s)?;
                s.kill_agent();
            }
            pg.psql(
                "shop",
                "ALTER TABLE a ALTER COLUMN n TYPE bigint USING n * 10; UPDATE a SET n = n + 1 WHERE id % 3 = 0;",
            )?;
            std::thread::sleep(Duration::from_millis(300));
            s.start_agent()?;
            pause(s)?;
            pg.psql(
                "shop",
                "ALTER TABLE a DROP COLUMN n; ALTER TABLE a ADD COLUMN n text DEFAULT 'fresh';
                 UPDATE a SET n = 'x' || id WHERE id % 5 = 0;",
            )?;
            pause(s)?;
            s.kill_receiver();
            pg.psql(
                "shop",
                "ALTER TABLE b RENAME TO b2; ALTER TABLE b2 RENAME COLUMN w TO ww;
                 INSERT INTO b2 SELECT g, 'n' || g FROM generate_series(501, 600) g;",
            )?;
            s.start_receiver()?;
            pause(s)?;
            pg.psql(
                "shop",
                "BEGIN; ALTER TABLE b2 ADD COLUMN z text DEFAULT 'z'; ALTER TABLE b2 RENAME COLUMN ww TO tmp;
                 ALTER TABLE b2 RENAME COLUMN z TO ww; ALTER TABLE b2 RENAME COLUMN tmp TO z; COMMIT;
                 UPDATE b2 SET z = z || '!' WHERE id % 4 = 0;",
            )?;
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let loaded = load.join().expect("load thread");
        steps.and(loaded)
    })?;
    wait_equal(s, pg, Duration::from_secs(120))?;
    let kept = pg.query("shop_standby", "SELECT count(*) FROM pg_attribute WHERE attname LIKE '%lockstep_kept%'")?;
    if kept[0][0].as_deref() != Some("0") {
        bail!("the standby kept columns aside although every change was identifiable");
    }
    Ok(())
}

/// Commits a sentinel row and waits until the standby has it (everything before is applied).
fn wait_caught_up_on_sentinel(s: &mut Setup, pg: &PgCluster) -> Result<()> {
    let token = format!("{:x}", rand::random::<u64>());
    pg.psql(
        "shop",
        &format!(
            "CREATE TABLE IF NOT EXISTS sentinel (id serial PRIMARY KEY, token text); INSERT INTO sentinel (token) VALUES ('{token}');"
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        s.check_alive()?;
        let seen = pg
            .query("shop_standby", &format!("SELECT count(*) FROM sentinel WHERE token = '{token}'"))
            .ok()
            .and_then(|rows| rows.first().and_then(|r| r[0].clone()))
            .is_some_and(|c| c == "1");
        if seen {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("standby did not catch up\n{}", s.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With the event trigger the agent installs as a superuser (DDL recorded in the stream).
#[test]
fn pg_column_renames_keep_their_data() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut s = pg_setup(&pg)?;
    renames_under_load(&mut s, &pg, false)?;
    let trigger = pg.query("shop", "SELECT count(*) FROM pg_event_trigger WHERE evtname = 'lockstep_columns'")?;
    assert_eq!(trigger[0][0].as_deref(), Some("1"), "the agent installs its event trigger as a superuser");
    Ok(())
}

/// Without the trigger (the agent's role is not a superuser): attribute numbers come from the
/// catalog where it still matches the stream: every change above, made one at a time (each
/// caught up before the next), is still identified, and a
/// column the receiver cannot place is kept aside, not dropped.
#[test]
fn pg_column_renames_without_the_event_trigger() -> Result<()> {
    let pg = PgCluster::start()?;
    let mut s = pg_setup(&pg)?;
    pg.psql(
        "shop",
        "CREATE ROLE repl LOGIN REPLICATION; CREATE PUBLICATION lockstep FOR ALL TABLES;
         ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO repl;",
    )?;
    let cfg = std::fs::read_to_string(&s.agent_cfg)?;
    std::fs::write(&s.agent_cfg, cfg.replace(&pg.dsn("shop"), &pg.dsn("shop").replace("user=postgres", "user=repl")))?;
    renames_under_load(&mut s, &pg, true)?;
    let trigger = pg.query("shop", "SELECT count(*) FROM pg_event_trigger")?;
    assert_eq!(trigger[0][0].as_deref(), Some("0"));

    // Two changes to one table while the agent is down, with rows in between: the rows written
    // between them are described by a relation the current catalog no longer matches. The
    // standby keeps the column it cannot place (with every value) instead of dropping it.
    s.kill_agent();
    pg.psql(
        "shop",
        "UPDATE a SET label = label || '1' WHERE id % 2 = 0; ALTER TABLE a RENAME COLUMN label TO label2;
         UPDATE a SET label2 = label2 || '2' WHERE id % 3 = 0; ALTER TABLE a ADD COLUMN extra int;
         UPDATE a SET extra = id WHERE id % 5 = 0;",
    )?;
    s.start_agent()?;
    wait_caught_up_on_sentinel(&mut s, &pg)?;
    // Nothing lost: every value the source had in `label` before the rename is on the standby,
    // in the renamed column or in the one kept aside.
    let lost = pg.query(
        "shop_standby",
        "SELECT count(*) FROM a WHERE coalesce(label2, label_lockstep_kept) IS NULL AND id <= 2000",
    )?;
    assert_eq!(lost[0][0].as_deref(), Some("0"), "{}", s.logs_tail());
    expect_logs(&s, &["kept on the standby under the new name"])?;
    Ok(())
}
