//! Tests against a real, throwaway PostgreSQL cluster (one per test): every common type through
//! COPY, updates with unchanged TOAST values and key changes, deletes, identity FULL tables
//! with identical rows, truncate, schema changes, chunked transactions, dedupe, resync, the
//! position row, refusals, SQL errors, reconnects and a bulk insert.
//!
//! The clusters come from `lockstep-testkit`, the harness the end-to-end tests use too: it
//! finds the server binaries (`LOCKSTEP_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`,
//! else `PATH`), picks free ports, and when run as root runs the server as an unprivileged
//! system user (PostgreSQL refuses to run as root).

use std::time::{Duration, Instant};

use bytes::Bytes;
use lockstep_common::config::TargetConfig;
use lockstep_common::event::{Change, JournalId, Seq, SourceKind};
use lockstep_common::proto::{self, pg_op, pg_value, PgColumn, PgOp, PgRelation, PgTransaction, PgTuple, PgValue};
use lockstep_testkit::pg::PgCluster;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::PgApplier;
use crate::applier::{Applier, ApplyError, Position};

// ---------------------------------------------------------------- throwaway cluster

/// A cluster for one test, with the standby database `postgres`.
struct Cluster(PgCluster);

impl Cluster {
    fn start() -> Cluster {
        Self::start_with(&[])
    }

    /// With extra `postgresql.conf` lines.
    fn start_with(conf: &[&str]) -> Cluster {
        Cluster(PgCluster::start_with(conf).unwrap_or_else(|e| panic!("start a PostgreSQL cluster: {e:#}")))
    }

    fn dsn(&self) -> String {
        self.0.dsn("postgres")
    }

    fn target(&self) -> TargetConfig {
        TargetConfig {
            agent: "agent-1".into(),
            source: "db".into(),
            kind: SourceKind::Postgres,
            path: None,
            dsn: Some(self.dsn()),
            safe_links: None,
            allow_external_symlinks: None,
            owners: None,
            numeric_ids: None,
            xattrs: None,
            acls: None,
            sparse: None,
            hard_links: None,
            specials: None,
            devices: None,
        }
    }

    fn open(&self) -> PgApplier {
        PgApplier::open(&self.target()).unwrap()
    }

    fn db(&self) -> Db {
        Db::connect(&self.dsn())
    }
}

/// A plain client to set up and inspect the standby.
struct Db {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Db {
    fn connect(dsn: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (client, conn) = rt.block_on(tokio_postgres::connect(dsn, NoTls)).unwrap();
        rt.spawn(conn);
        rt.block_on(client.batch_execute("SET timezone = 'UTC'")).unwrap();
        Db { rt, client }
    }

    fn exec(&self, sql: &str) {
        self.rt.block_on(self.client.batch_execute(sql)).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Rows in text form.
    fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let msgs = self.rt.block_on(self.client.simple_query(sql)).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        msgs.into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
                _ => None,
            })
            .collect()
    }

    fn one(&self, sql: &str) -> Option<String> {
        let rows = self.rows(sql);
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0][0].clone()
    }

    fn count(&self, sql: &str) -> i64 {
        self.one(sql).unwrap().parse().unwrap()
    }

    fn copy_out(&self, sql: &str) -> String {
        use futures::TryStreamExt;
        self.rt.block_on(async {
            let stream = self.client.copy_out(sql).await.unwrap();
            let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
            String::from_utf8(chunks.concat()).unwrap()
        })
    }
}

// ---------------------------------------------------------------- events

const JOURNAL: JournalId = JournalId([7; 16]);

fn pos(seq: u64) -> Position {
    Position { journal_id: JOURNAL, seq: Seq(seq) }
}

fn col(name: &str, type_name: &str, key: bool) -> PgColumn {
    PgColumn { name: name.into(), type_name: type_name.into(), key, ..Default::default() }
}

fn relation(id: u32, name: &str, identity: &str, columns: Vec<PgColumn>) -> PgOp {
    PgOp {
        op: Some(pg_op::Op::Relation(PgRelation {
            id,
            schema: "public".into(),
            name: name.into(),
            columns,
            replica_identity: identity.into(),
            primary_key: vec![],
        })),
    }
}

/// One COPY text-format field.
fn field(v: Option<&str>) -> String {
    let Some(v) = v else { return "\\N".into() };
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\t' => s.push_str("\\t"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            c => s.push(c),
        }
    }
    s
}

fn copy_lines(rows: &[Vec<Option<&str>>]) -> String {
    rows.iter().map(|r| r.iter().map(|v| field(*v)).collect::<Vec<_>>().join("\t") + "\n").collect()
}

fn insert(rel: u32, rows: &[Vec<Option<&str>>]) -> PgOp {
    PgOp {
        op: Some(pg_op::Op::Insert(proto::PgInsert {
            rel,
            rows: Bytes::from(copy_lines(rows)),
            count: rows.len() as u32,
        })),
    }
}

fn text(s: &str) -> PgValue {
    PgValue { value: Some(pg_value::Value::Text(Bytes::copy_from_slice(s.as_bytes()))) }
}

fn null() -> PgValue {
    PgValue { value: Some(pg_value::Value::Null(true)) }
}

fn unchanged() -> PgValue {
    PgValue { value: Some(pg_value::Value::Unchanged(true)) }
}

fn tuple(values: Vec<PgValue>) -> PgTuple {
    PgTuple { values }
}

fn update(rel: u32, old: Option<PgTuple>, old_is_key: bool, new: PgTuple) -> PgOp {
    PgOp { op: Some(pg_op::Op::Update(proto::PgUpdate { rel, old, old_is_key, new: Some(new) })) }
}

fn delete(rel: u32, old: PgTuple, old_is_key: bool) -> PgOp {
    PgOp { op: Some(pg_op::Op::Delete(proto::PgDelete { rel, old: Some(old), old_is_key })) }
}

/// A whole source transaction committed at `lsn` (ending at `lsn + 1`).
fn tx(lsn: u64, ops: Vec<PgOp>) -> Change {
    chunk(lsn, 0, true, ops)
}

fn chunk(lsn: u64, n: u32, last: bool, ops: Vec<PgOp>) -> Change {
    Change::Other(proto::change_event::Change::Pg(PgTransaction {
        commit_lsn: lsn,
        end_lsn: lsn + 1,
        commit_time_us: 0,
        xid: (lsn % 1_000_000) as u32,
        chunk: n,
        last,
        ops,
    }))
}

fn snapshot(ops: Vec<PgOp>) -> Change {
    Change::Other(proto::change_event::Change::Pg(PgTransaction { ops, last: true, ..Default::default() }))
}

/// Applies `change` as journal record `seq` and commits at it.
fn apply_commit(a: &mut PgApplier, seq: u64, change: Change) {
    a.apply(Seq(seq), change).unwrap();
    assert!(a.commit(pos(seq)).unwrap(), "commit at {seq} declined");
}

/// Applies `change` and prepares the commit of `seq`, expecting one of the two to fail: a
/// transaction's last insert is answered with the commit, so its error may surface there.
fn apply_commit_err(a: &mut PgApplier, seq: u64, change: Change) -> ApplyError {
    match a.apply(Seq(seq), change) {
        Err(e) => e,
        Ok(_) => match a.prepare_commit(pos(seq)) {
            Err(e) => e,
            Ok(_) => panic!("seq {seq} applied and committed"),
        },
    }
}

fn kv_relation(id: u32, name: &str) -> PgOp {
    relation(id, name, "d", vec![col("id", "integer", true), col("v", "text", false)])
}

/// Commits seq 1 (LSN 100): table `kv` (relation 1) with the row (1, 'a').
fn commit_first_kv_row(a: &mut PgApplier) {
    apply_commit(a, 1, tx(100, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("1"), Some("a")]])]));
}

fn kv_rows(db: &Db, table: &str) -> Vec<Vec<Option<String>>> {
    db.rows(&format!("SELECT id::text AS key, v FROM {table} ORDER BY id"))
}

fn row(id: &str, v: Option<&str>) -> Vec<Option<String>> {
    vec![Some(id.to_string()), v.map(str::to_string)]
}

fn is_refused(r: Result<impl std::fmt::Debug, ApplyError>) -> String {
    match r {
        Err(ApplyError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn pg_inserts_every_common_type_through_insert_and_copy() {
    let pg = Cluster::start();
    let mut a = pg.open();
    assert_eq!(a.position(), None);
    let cols = vec![
        col("id", "integer", true),
        col("big", "bigint", false),
        col("num", "numeric", false),
        col("f8", "double precision", false),
        col("txt", "text", false),
        col("raw", "bytea", false),
        col("ts", "timestamp with time zone", false),
        col("d", "date", false),
        col("u", "uuid", false),
        col("j", "jsonb", false),
        col("ai", "integer[]", false),
        col("at", "text[]", false),
        col("bo", "boolean", false),
        col("nothing", "text", false),
    ];
    let weird = "tab\there\nnew line\\back \"double\" 'single' ü € 😀 \r cr";
    let rows: Vec<Vec<Option<&str>>> = vec![
        vec![
            Some("1"),
            Some("9223372036854775807"),
            Some("123456789012345678901234567890.123456789"),
            Some("NaN"),
            Some(weird),
            Some("\\x00ff10"),
            Some("2024-02-29 12:34:56.789+00"),
            Some("2024-02-29"),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Some(r#"{"a": [1, 2, {"b": null}], "s": "x\ty"}"#),
            Some("{1,2,NULL}"),
            Some(r#"{"x y","a\"b",NULL,"NULL"}"#),
            Some("t"),
            None,
        ],
        vec![
            Some("2"),
            Some("-9223372036854775808"),
            Some("-0.000000000000000000000000000001"),
            Some("Infinity"),
            Some(""),
            Some("\\x"),
            Some("1970-01-01 00:00:00+00"),
            Some("infinity"),
            Some("00000000-0000-0000-0000-000000000000"),
            Some("[]"),
            Some("{}"),
            Some("{}"),
            Some("f"),
            None,
        ],
        vec![Some("3"), None, None, Some("-Infinity"), None, None, None, None, None, None, None, None, None, None],
        vec![
            Some("4"),
            Some("0"),
            Some("0"),
            Some("0.1"),
            Some("plain"),
            Some("\\x5c"),
            Some("2000-01-01 00:00:00.000001+00"),
            Some("2000-01-01"),
            Some("ffffffff-ffff-ffff-ffff-ffffffffffff"),
            Some(r#"{"k": "\\"}"#),
            Some("{{1,2},{3,4}}"),
            Some(r#"{"",a}"#),
            Some("t"),
            None,
        ],
    ];
    apply_commit(&mut a, 1, tx(100, vec![relation(16384, "types", "d", cols.clone()), insert(16384, &rows)]));
    let db = pg.db();
    let back = db.copy_out("COPY (SELECT * FROM public.types ORDER BY id) TO STDOUT");
    assert_eq!(back, copy_lines(&rows));
    assert_eq!(db.one("SELECT txt FROM types WHERE id = 1").as_deref(), Some(weird));
    assert_eq!(db.one("SELECT octet_length(raw)::text FROM types WHERE id = 1").as_deref(), Some("3"));
    assert_eq!(db.one("SELECT (j->'a'->2->'b') IS NOT NULL FROM types WHERE id = 1").as_deref(), Some("t"));
    assert_eq!(
        db.one("SELECT num::text FROM types WHERE id = 1").as_deref(),
        Some("123456789012345678901234567890.123456789")
    );
    // The created table's primary key comes from the key columns (identity default).
    assert_eq!(
        db.one("SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'public.types'::regclass AND i.indisprimary").as_deref(),
        Some("id")
    );
    assert_eq!(a.position(), Some(pos(1)));
    assert_eq!(a.applied_lsn(), 101);

    // Four rows went in as one INSERT; more rows take the COPY path: same values either way.
    let ids: Vec<String> = (11..=14).map(|i| i.to_string()).collect();
    let mut many = rows.clone();
    for (r, id) in rows.iter().zip(&ids) {
        let mut r = r.clone();
        r[0] = Some(id.as_str());
        many.push(r);
    }
    apply_commit(&mut a, 2, tx(200, vec![relation(16385, "types_copy", "d", cols.clone()), insert(16385, &many)]));
    let copied = db.copy_out("COPY (SELECT * FROM public.types_copy WHERE id < 10 ORDER BY id) TO STDOUT");
    assert_eq!(copied, copy_lines(&rows));
}

#[test]
fn pg_update_with_unchanged_toast_keeps_the_standby_value() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let big = "x".repeat(100_000);
    let cols = vec![col("id", "integer", true), col("big", "text", false), col("n", "integer", false)];
    apply_commit(
        &mut a,
        1,
        tx(100, vec![relation(1, "t", "d", cols.clone()), insert(1, &[vec![Some("1"), Some(&big), Some("1")]])]),
    );
    apply_commit(
        &mut a,
        2,
        tx(
            200,
            vec![relation(1, "t", "d", cols), update(1, None, false, tuple(vec![text("1"), unchanged(), text("2")]))],
        ),
    );
    let db = pg.db();
    assert_eq!(
        db.rows("SELECT length(big)::text, n::text FROM t"),
        vec![vec![Some("100000".into()), Some("2".into())]]
    );
}

#[test]
fn pg_update_changing_the_primary_key_and_delete() {
    let pg = Cluster::start();
    let mut a = pg.open();
    apply_commit(
        &mut a,
        1,
        tx(
            100,
            vec![
                kv_relation(1, "kv"),
                insert(1, &[vec![Some("1"), Some("a")], vec![Some("2"), Some("b")], vec![Some("3"), Some("c")]]),
            ],
        ),
    );
    // Key change: the old key travels in `old` (only key columns meaningful).
    apply_commit(
        &mut a,
        2,
        tx(
            200,
            vec![
                kv_relation(1, "kv"),
                update(1, Some(tuple(vec![text("1"), null()])), true, tuple(vec![text("10"), text("a2")])),
                update(1, None, false, tuple(vec![text("2"), null()])),
                delete(1, tuple(vec![text("3"), null()]), true),
            ],
        ),
    );
    let db = pg.db();
    assert_eq!(kv_rows(&db, "kv"), vec![row("2", None), row("10", Some("a2"))]);
}

#[test]
fn pg_identity_full_touches_one_of_two_identical_rows() {
    let pg = Cluster::start();
    let mut a = pg.open();
    // pgoutput flags every column as key under REPLICA IDENTITY FULL. json and point have no
    // equality operator.
    let cols = vec![col("n", "integer", true), col("j", "json", true), col("p", "point", true), col("s", "text", true)];
    let r = || relation(5, "nokey", "f", cols.clone());
    let same = vec![Some("1"), Some(r#"{"a": 1}"#), Some("(1,2)"), None];
    apply_commit(
        &mut a,
        1,
        tx(
            100,
            vec![r(), insert(5, &[same.clone(), same.clone(), vec![Some("2"), Some("[]"), Some("(0,0)"), Some("x")]])],
        ),
    );
    let old = || tuple(vec![text("1"), text(r#"{"a": 1}"#), text("(1,2)"), null()]);
    apply_commit(
        &mut a,
        2,
        tx(
            200,
            vec![
                r(),
                update(5, Some(old()), false, tuple(vec![text("7"), text(r#"{"a": 1}"#), text("(1,2)"), text("new")])),
            ],
        ),
    );
    let db = pg.db();
    let q = "SELECT n::text, s FROM nokey ORDER BY n, s";
    assert_eq!(
        db.rows(q),
        vec![
            vec![Some("1".into()), None],
            vec![Some("2".into()), Some("x".into())],
            vec![Some("7".into()), Some("new".into())]
        ]
    );
    apply_commit(&mut a, 3, tx(300, vec![r(), delete(5, old(), false)]));
    assert_eq!(db.rows(q), vec![vec![Some("2".into()), Some("x".into())], vec![Some("7".into()), Some("new".into())]]);
    // A row that is not there is reported as skipped, not fatal.
    let out = a.apply(Seq(4), tx(400, vec![r(), delete(5, old(), false)])).unwrap();
    assert!(out.skipped.unwrap().contains("found no row"));
    assert!(a.commit(pos(4)).unwrap());
}

#[test]
fn pg_truncate() {
    let pg = Cluster::start();
    let mut a = pg.open();
    apply_commit(
        &mut a,
        1,
        tx(
            100,
            vec![
                kv_relation(1, "t1"),
                insert(1, &[vec![Some("1"), Some("a")]]),
                kv_relation(2, "t2"),
                insert(2, &[vec![Some("1"), Some("a")]]),
                kv_relation(3, "t3"),
                insert(3, &[vec![Some("1"), Some("a")]]),
            ],
        ),
    );
    let truncate = PgOp {
        op: Some(pg_op::Op::Truncate(proto::PgTruncate { rels: vec![1, 2], cascade: false, restart_identity: true })),
    };
    apply_commit(&mut a, 2, tx(200, vec![kv_relation(1, "t1"), kv_relation(2, "t2"), truncate]));
    let db = pg.db();
    assert_eq!(db.count("SELECT (SELECT count(*) FROM t1) + (SELECT count(*) FROM t2)"), 0);
    assert_eq!(db.count("SELECT count(*) FROM t3"), 1);
    // Only the tables the source names: an inheritance child on the standby keeps its rows.
    db.exec("CREATE TABLE t3_kid () INHERITS (t3); INSERT INTO t3_kid VALUES (2, 'kid')");
    let truncate = PgOp {
        op: Some(pg_op::Op::Truncate(proto::PgTruncate { rels: vec![3], cascade: false, restart_identity: false })),
    };
    apply_commit(&mut a, 3, tx(300, vec![kv_relation(3, "t3"), truncate]));
    assert_eq!(db.count("SELECT count(*) FROM ONLY t3"), 0);
    assert_eq!(db.count("SELECT count(*) FROM t3_kid"), 1);
}

#[test]
fn pg_relation_changes_add_and_drop_columns() {
    let pg = Cluster::start();
    let mut a = pg.open();
    apply_commit(&mut a, 1, tx(100, vec![kv_relation(1, "t"), insert(1, &[vec![Some("1"), Some("a")]])]));
    // With the source's attribute numbers, as the agent sends them (the first relation had
    // none: the standby adopts them by name).
    let numbered = |c: PgColumn, attnum: i32| PgColumn { attnum, ..c };
    let v2 = relation(
        1,
        "t",
        "d",
        vec![
            numbered(col("id", "integer", true), 1),
            numbered(col("v", "text", false), 2),
            numbered(col("extra", "numeric(10,2)", false), 3),
        ],
    );
    apply_commit(&mut a, 2, tx(200, vec![v2, insert(1, &[vec![Some("2"), Some("b"), Some("3.50")]])]));
    let db = pg.db();
    let columns = "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 't'::regclass AND attnum > 0 AND NOT attisdropped";
    assert_eq!(db.one(columns).as_deref(), Some("id integer, v text, extra numeric(10,2)"));
    assert_eq!(
        db.rows("SELECT id::text, extra::text FROM t ORDER BY id"),
        vec![vec![Some("1".into()), None], vec![Some("2".into()), Some("3.50".into())]]
    );
    // v dropped, extra widened.
    let v3 = relation(
        1,
        "t",
        "d",
        vec![numbered(col("id", "integer", true), 1), numbered(col("extra", "numeric(12,3)", false), 3)],
    );
    apply_commit(
        &mut a,
        3,
        tx(
            300,
            vec![
                v3,
                insert(1, &[vec![Some("3"), Some("1.125")]]),
                update(1, None, false, tuple(vec![text("1"), text("9.999")])),
            ],
        ),
    );
    assert_eq!(db.one(columns).as_deref(), Some("id integer, extra numeric(12,3)"));
    assert_eq!(
        db.rows("SELECT id::text, extra::text FROM t ORDER BY id"),
        vec![
            vec![Some("1".into()), Some("9.999".into())],
            vec![Some("2".into()), Some("3.500".into())],
            vec![Some("3".into()), Some("1.125".into())]
        ]
    );
    // A rename of the relation renames the standby table.
    apply_commit(
        &mut a,
        4,
        tx(
            400,
            vec![relation(1, "t_renamed", "d", vec![col("id", "integer", true), col("extra", "numeric(12,3)", false)])],
        ),
    );
    assert_eq!(db.count("SELECT count(*) FROM t_renamed"), 3);
    // Without attribute numbers (the agent could not tell at that point of the stream), a
    // column the relation lacks is kept aside with its data, not dropped.
    apply_commit(&mut a, 5, tx(500, vec![kv_relation(1, "t_renamed"), insert(1, &[vec![Some("4"), Some("d")]])]));
    assert_eq!(
        db.one(&columns.replace("'t'::regclass", "'t_renamed'::regclass")).as_deref(),
        Some("id integer, extra_lockstep_kept numeric(12,3), v text")
    );
    assert_eq!(
        db.rows("SELECT id::text, extra_lockstep_kept::text, v FROM t_renamed ORDER BY id"),
        vec![
            vec![Some("1".into()), Some("9.999".into()), None],
            vec![Some("2".into()), Some("3.500".into()), None],
            vec![Some("3".into()), Some("1.125".into()), None],
            vec![Some("4".into()), None, Some("d".into())]
        ]
    );
}

#[test]
fn pg_chunked_transaction_commits_only_after_its_last_chunk() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let db = pg.db();
    commit_first_kv_row(&mut a);
    a.apply(Seq(2), chunk(200, 0, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])]))
        .unwrap();
    assert!(a.prepare_commit(pos(2)).unwrap().is_none());
    a.apply(Seq(3), chunk(200, 1, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("3"), Some("c")]])]))
        .unwrap();
    assert!(a.prepare_commit(pos(3)).unwrap().is_none());
    assert_eq!(db.count("SELECT count(*) FROM kv"), 1, "nothing of the open transaction visible");
    a.apply(Seq(4), chunk(200, 2, true, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("4"), Some("d")]])])).unwrap();
    assert!(a.commit(pos(4)).unwrap());
    assert_eq!(db.count("SELECT count(*) FROM kv"), 4);
    assert_eq!(a.position(), Some(pos(4)));

    // A half-applied transaction is discarded by the next session.
    a.apply(Seq(5), chunk(300, 0, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("5"), Some("e")]])]))
        .unwrap();
    assert!(a.prepare_commit(pos(5)).unwrap().is_none());
    a.session_start(JOURNAL).unwrap();
    assert_eq!(a.position(), Some(pos(4)));
    assert_eq!(a.applied_lsn(), 201);
    assert_eq!(db.count("SELECT count(*) FROM kv"), 4);
    // ... and is sent again from its first chunk.
    a.apply(Seq(5), chunk(300, 0, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("5"), Some("e")]])]))
        .unwrap();
    a.apply(Seq(6), chunk(300, 1, true, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("6"), Some("f")]])])).unwrap();
    assert!(a.commit(pos(6)).unwrap());
    assert_eq!(db.count("SELECT count(*) FROM kv"), 6);

    // The agent died part-way through journaling a chunked transaction: its first chunks are
    // in the journal, then (after the agent's restart) the same transaction again in full.
    // The cut-off copy is rolled back to its savepoint; nothing is applied twice.
    a.apply(Seq(7), chunk(400, 0, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("7"), Some("g")]])]))
        .unwrap();
    a.apply(Seq(8), chunk(400, 1, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("8"), Some("h")]])]))
        .unwrap();
    a.apply(Seq(9), chunk(400, 0, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("7"), Some("g")]])]))
        .unwrap();
    a.apply(Seq(10), chunk(400, 1, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("8"), Some("h")]])]))
        .unwrap();
    a.apply(Seq(11), chunk(400, 2, true, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("9"), Some("i")]])]))
        .unwrap();
    assert!(a.commit(pos(11)).unwrap());
    assert_eq!(db.count("SELECT count(*) FROM kv"), 9);

    // Chunks out of sequence are refused.
    let why = is_refused(a.apply(Seq(12), chunk(500, 1, true, vec![])));
    assert!(why.contains("out of sequence"), "{why}");
}

#[test]
fn pg_dedupe_skips_transactions_already_applied() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let db = pg.db();
    let first = || tx(100, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("1"), Some("a")]])]);
    apply_commit(&mut a, 1, first());
    // The slot delivers it again (new journal records): no duplicate key error, no change.
    apply_commit(&mut a, 2, first());
    // So is an older chunked one, all its chunks.
    a.apply(Seq(3), chunk(50, 0, false, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("1"), Some("x")]])])).unwrap();
    assert!(a.prepare_commit(pos(3)).unwrap().is_none());
    a.apply(Seq(4), chunk(50, 1, true, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("1"), Some("y")]])])).unwrap();
    assert!(a.commit(pos(4)).unwrap());
    assert_eq!(kv_rows(&db, "kv"), vec![row("1", Some("a"))]);
    // Also after reopening: the applied LSN is persisted with the position.
    drop(a);
    let mut a = pg.open();
    assert_eq!(a.applied_lsn(), 101);
    apply_commit(&mut a, 5, first());
    assert_eq!(kv_rows(&db, "kv"), vec![row("1", Some("a"))]);
    // A later transaction applies.
    apply_commit(&mut a, 6, tx(101, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])]));
    assert_eq!(db.count("SELECT count(*) FROM kv"), 2);
    assert_eq!(db.one("SELECT lsn::text FROM lockstep.applied_position").as_deref(), Some("102"));
}

#[test]
fn pg_resync_replaces_rows_with_the_snapshot() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let db = pg.db();
    apply_commit(
        &mut a,
        1,
        tx(
            100,
            vec![
                kv_relation(1, "kv"),
                insert(1, &[vec![Some("1"), Some("old")], vec![Some("2"), Some("old")]]),
                kv_relation(2, "other"),
                insert(2, &[vec![Some("1"), Some("kept")]]),
            ],
        ),
    );
    db.exec("CREATE TABLE child (id int PRIMARY KEY, kv_id int REFERENCES kv(id)); INSERT INTO child VALUES (1, 1)");
    a.begin_resync().unwrap();
    let snap_kv = PgRelation {
        id: 11,
        schema: "public".into(),
        name: "kv".into(),
        columns: vec![
            PgColumn { not_null: true, ..col("id", "integer", true) },
            PgColumn { default_expr: "'none'::text".into(), ..col("v", "text", false) },
        ],
        replica_identity: "d".into(),
        primary_key: vec!["id".into()],
    };
    let snap_new = PgRelation {
        id: 12,
        schema: "app".into(),
        name: "fresh".into(),
        columns: vec![
            PgColumn { not_null: true, ..col("a", "integer", false) },
            PgColumn { not_null: true, ..col("b", "text", false) },
            PgColumn { default_expr: "42".into(), ..col("c", "bigint", false) },
        ],
        replica_identity: "d".into(),
        primary_key: vec!["b".into(), "a".into()],
    };
    let copy = |rel: u32, rows: &[Vec<Option<&str>>]| PgOp {
        op: Some(pg_op::Op::Copy(proto::PgCopy { rel, data: Bytes::from(copy_lines(rows)) })),
    };
    let rel_op = |r: &PgRelation| PgOp { op: Some(pg_op::Op::Relation(r.clone())) };
    a.apply(Seq(0), snapshot(vec![rel_op(&snap_kv), copy(11, &[vec![Some("10"), Some("new")]])])).unwrap();
    // A second batch of the same table is not emptied again.
    a.apply(Seq(0), snapshot(vec![rel_op(&snap_kv), copy(11, &[vec![Some("11"), Some("new")]])])).unwrap();
    a.apply(Seq(0), snapshot(vec![rel_op(&snap_new), copy(12, &[vec![Some("1"), Some("x"), Some("5")]])])).unwrap();
    assert!(a.prepare_commit(pos(1)).unwrap().is_none(), "no commit during a resync");
    a.apply(Seq(0), snapshot(vec![PgOp { op: Some(pg_op::Op::SnapshotEnd(proto::PgSnapshotEnd { lsn: 5000 })) }]))
        .unwrap();
    a.end_resync().unwrap();
    assert_eq!(
        kv_rows(&db, "kv"),
        vec![row("1", Some("old")), row("2", Some("old"))],
        "old rows visible until the commit"
    );
    assert!(a.commit(pos(9)).unwrap());
    assert_eq!(kv_rows(&db, "kv"), vec![row("10", Some("new")), row("11", Some("new"))]);
    assert_eq!(kv_rows(&db, "other"), vec![row("1", Some("kept"))], "tables outside the snapshot are left alone");
    assert_eq!(
        db.rows("SELECT a::text, b, c::text FROM app.fresh"),
        vec![vec![Some("1".into()), Some("x".into()), Some("5".into())]]
    );
    assert_eq!(db.one("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'app.fresh'::regclass AND contype = 'p'").as_deref(), Some("PRIMARY KEY (b, a)"));
    assert_eq!(db.one("SELECT string_agg(attname || ':' || attnotnull::text || ':' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-'), ',' ORDER BY attnum) FROM pg_attribute LEFT JOIN pg_attrdef d ON d.adrelid = attrelid AND d.adnum = attnum WHERE attrelid = 'app.fresh'::regclass AND attnum > 0").as_deref(), Some("a:true:-,b:true:-,c:false:42"));
    assert_eq!(
        db.rows("SELECT seq::text, lsn::text FROM lockstep.applied_position"),
        vec![vec![Some("9".into()), Some("5000".into())]]
    );
    assert_eq!(a.applied_lsn(), 5000);
    // Transactions the snapshot holds are skipped, later ones applied (the stream names the
    // table by the OID the snapshot had).
    apply_commit(&mut a, 10, tx(4999, vec![kv_relation(11, "kv"), insert(11, &[vec![Some("10"), Some("dup")]])]));
    apply_commit(&mut a, 11, tx(5000, vec![kv_relation(11, "kv"), insert(11, &[vec![Some("12"), Some("after")]])]));
    assert_eq!(db.count("SELECT count(*) FROM kv"), 3);

    // A resync without its snapshot end is refused, and commits nothing.
    a.begin_resync().unwrap();
    a.apply(Seq(0), snapshot(vec![rel_op(&snap_kv), copy(11, &[])])).unwrap();
    is_refused(a.end_resync());
    assert!(a.prepare_commit(pos(12)).unwrap().is_none());
    assert_eq!(db.count("SELECT count(*) FROM kv"), 3);
}

/// A snapshot relation of table `name` (id, v) with built-in types, and a piece of its rows.
fn snap_piece(id: u32, name: &str, rows: &[Vec<Option<&str>>]) -> Change {
    let rel = PgRelation {
        id,
        schema: "public".into(),
        name: name.into(),
        columns: vec![
            PgColumn { not_null: true, type_oid: 23, ..col("id", "integer", true) },
            PgColumn { type_oid: 25, ..col("v", "text", false) },
        ],
        replica_identity: "d".into(),
        primary_key: vec!["id".into()],
    };
    snapshot(vec![
        PgOp { op: Some(pg_op::Op::Relation(rel)) },
        PgOp { op: Some(pg_op::Op::Copy(proto::PgCopy { rel: id, data: Bytes::from(copy_lines(rows)) })) },
    ])
}

fn borrowed(rows: &[Vec<Option<String>>]) -> Vec<Vec<Option<&str>>> {
    rows.iter().map(|r| r.iter().map(|v| v.as_deref()).collect()).collect()
}

fn snap_end(lsn: u64) -> Change {
    snapshot(vec![PgOp { op: Some(pg_op::Op::SnapshotEnd(proto::PgSnapshotEnd { lsn })) }])
}

#[test]
fn pg_resync_fills_tables_in_parallel_and_commits_them_with_the_position() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let db = pg.db();
    // Referenced by another table, t1 is emptied with DELETE (not TRUNCATE), so readers see
    // its old rows until the resync commits.
    db.exec("CREATE TABLE t1 (id int PRIMARY KEY, v text); INSERT INTO t1 VALUES (1, 'old');");
    db.exec("CREATE TABLE t1_child (id int PRIMARY KEY, t1_id int REFERENCES t1(id))");
    apply_commit(&mut a, 1, tx(100, vec![kv_relation(2, "t1"), insert(2, &[vec![Some("2"), Some("old")]])]));
    db.exec("DELETE FROM t1 WHERE id = 2");
    db.exec("CREATE TYPE mood AS ENUM ('ok', 'meh')");
    let mood = PgRelation {
        id: 30,
        schema: "public".into(),
        name: "moods".into(),
        columns: vec![
            PgColumn { not_null: true, type_oid: 23, ..col("id", "integer", true) },
            PgColumn { type_oid: 40000, ..col("m", "public.mood", false) },
        ],
        replica_identity: "d".into(),
        primary_key: vec!["id".into()],
    };
    let many = |from: i32, n: i32| -> Vec<Vec<Option<String>>> {
        (from..from + n).map(|i| vec![Some(i.to_string()), Some(format!("row {i}"))]).collect()
    };
    a.begin_resync().unwrap();
    // Pieces of three tables interleave, as the agent's parallel copy sends them.
    for k in 0..4 {
        for (id, name) in [(21, "t1"), (22, "t2"), (23, "t3")] {
            let rows = many(k * 1000, 1000);
            a.apply(Seq(0), snap_piece(id, name, &borrowed(&rows))).unwrap();
        }
    }
    a.apply(
        Seq(0),
        snapshot(vec![
            PgOp { op: Some(pg_op::Op::Relation(mood.clone())) },
            PgOp {
                op: Some(pg_op::Op::Copy(proto::PgCopy {
                    rel: 30,
                    data: Bytes::from(copy_lines(&[vec![Some("1"), Some("meh")]])),
                })),
            },
        ]),
    )
    .unwrap();
    assert!(a.st.copiers.has("public", "t2"), "a table of built-in types goes to a copier");
    assert!(!a.st.copiers.has("public", "moods"), "a table of a user-defined type stays on the main connection");
    assert!(!a.st.copiers.has("public", "t1"), "a table another relation id named stays on the main connection");
    assert_eq!(
        db.count("SELECT count(*) FROM lockstep.applied_position"),
        0,
        "the position row is gone while copiers hold tables"
    );
    a.apply(Seq(0), snap_end(7000)).unwrap();
    a.end_resync().unwrap();
    assert_eq!(kv_rows(&db, "t1"), vec![row("1", Some("old"))], "nothing of the resync visible before its commit");
    assert_eq!(db.one("SELECT to_regclass('public.t2')::text"), None);
    assert!(a.commit(pos(3)).unwrap());
    for t in ["t1", "t2", "t3"] {
        assert_eq!(db.count(&format!("SELECT count(*) FROM {t}")), 4000, "{t}");
        assert_eq!(db.one(&format!("SELECT v FROM {t} WHERE id = 3999")).as_deref(), Some("row 3999"));
    }
    assert_eq!(db.one("SELECT m::text FROM moods").as_deref(), Some("meh"));
    assert_eq!(
        db.rows("SELECT seq::text, lsn::text FROM lockstep.applied_position"),
        vec![vec![Some("3".into()), Some("7000".into())]]
    );
    // After the resync the tables take changes on the main connection.
    apply_commit(&mut a, 4, tx(7001, vec![kv_relation(22, "t2"), insert(22, &[vec![Some("5000"), Some("after")]])]));
    assert_eq!(db.count("SELECT count(*) FROM t2"), 4001);

    // A copier that fails (a value its column refuses) fails the resync: nothing of it is
    // committed, other copiers' tables included, and the next resync fills every table on the
    // main connection.
    a.begin_resync().unwrap();
    a.apply(Seq(0), snap_piece(23, "t3", &[vec![Some("1"), Some("new")]])).unwrap();
    let bad = a
        .apply(Seq(0), snap_piece(22, "t2", &[vec![Some("not a number"), Some("x")]]))
        .and_then(|_| a.apply(Seq(0), snap_end(8000)))
        .and_then(|_| a.end_resync());
    let e = bad.expect_err("a copier's COPY error fails the resync");
    assert!(e.to_string().contains("t2"), "{e}");
    assert!(a.prepare_commit(pos(5)).unwrap().is_none());
    assert_eq!(db.count("SELECT count(*) FROM t3"), 4000);
    assert_eq!(db.count("SELECT count(*) FROM t2"), 4001);
    assert_eq!(db.count("SELECT count(*) FROM lockstep.applied_position"), 0, "no position until a resync commits");
    a.session_start(JOURNAL).unwrap();
    a.begin_resync().unwrap();
    a.apply(Seq(0), snap_piece(21, "t1", &[vec![Some("1"), Some("new")]])).unwrap();
    a.apply(Seq(0), snap_piece(22, "t2", &[vec![Some("2"), Some("new")]])).unwrap();
    assert!(!a.st.copiers.has("public", "t2"), "after a copier failure, tables stay on the main connection");
    a.apply(Seq(0), snap_end(9000)).unwrap();
    a.end_resync().unwrap();
    assert!(a.commit(pos(6)).unwrap());
    assert_eq!(kv_rows(&db, "t1"), vec![row("1", Some("new"))]);
    assert_eq!(kv_rows(&db, "t2"), vec![row("2", Some("new"))]);
    assert_eq!(db.count("SELECT count(*) FROM t3"), 4000, "a table the snapshot does not mention is left alone");
    assert_eq!(db.rows("SELECT seq::text FROM lockstep.applied_position"), vec![vec![Some("6".into())]]);

    // An inheritance child is a table of its own in a snapshot: emptying its parent, whose
    // piece may come later, leaves the child's rows alone — with copiers (a fresh applier) and
    // without (this one).
    db.exec("CREATE TABLE par (id int PRIMARY KEY, v text); CREATE TABLE kid () INHERITS (par);");
    for (applier, seq) in [(&mut pg.open(), 7), (&mut a, 8)] {
        db.exec("TRUNCATE par; INSERT INTO par VALUES (1, 'old parent'); INSERT INTO kid VALUES (2, 'old kid');");
        applier.begin_resync().unwrap();
        applier.apply(Seq(0), snap_piece(41, "kid", &[vec![Some("20"), Some("kid")]])).unwrap();
        applier.apply(Seq(0), snap_piece(40, "par", &[vec![Some("10"), Some("parent")]])).unwrap();
        applier.apply(Seq(0), snap_end(9500)).unwrap();
        applier.end_resync().unwrap();
        assert!(applier.commit(pos(seq)).unwrap());
        assert_eq!(kv_rows(&db, "ONLY par"), vec![row("10", Some("parent"))]);
        assert_eq!(kv_rows(&db, "kid"), vec![row("20", Some("kid"))]);
    }
}

/// A transaction cut off by an agent restart is rolled back to its savepoint, standby DDL its
/// chunks caused included (a rename, an added column); the relation cache goes back with it, so
/// the transaction sent again in full makes the same changes again instead of trusting the
/// cache.
#[test]
fn pg_cut_off_transaction_undoes_its_ddl_and_the_cache_with_it() {
    let pg = Cluster::start();
    let db = pg.db();
    let mut a = pg.open();
    commit_first_kv_row(&mut a);
    let renamed = || kv_relation(1, "kv2");
    let wider =
        || relation(1, "kv2", "d", vec![col("id", "integer", true), col("v", "text", false), col("w", "text", false)]);
    let first = || chunk(200, 0, false, vec![renamed(), insert(1, &[vec![Some("2"), Some("b")]])]);
    let second = || chunk(200, 1, false, vec![wider(), insert(1, &[vec![Some("3"), Some("c"), Some("w")]])]);
    // Cut off after two chunks (table renamed, column added), then sent again in full.
    a.apply(Seq(2), first()).unwrap();
    a.apply(Seq(3), second()).unwrap();
    a.apply(Seq(4), first()).unwrap();
    a.apply(Seq(5), second()).unwrap();
    a.apply(Seq(6), chunk(200, 2, true, vec![wider(), insert(1, &[vec![Some("4"), Some("d"), Some("x")]])])).unwrap();
    assert!(a.commit(pos(6)).unwrap());
    assert_eq!(db.one("SELECT to_regclass('public.kv')::text"), None);
    assert_eq!(
        db.rows("SELECT id::text, v, w FROM kv2 ORDER BY id"),
        vec![
            vec![Some("1".into()), Some("a".into()), None],
            vec![Some("2".into()), Some("b".into()), None],
            vec![Some("3".into()), Some("c".into()), Some("w".into())],
            vec![Some("4".into()), Some("d".into()), Some("x".into())],
        ]
    );
}

/// A round that fails after a transaction renamed a table rolls the rename back with
/// everything else; the relation cache goes back too, so the re-sent transaction renames the
/// table again instead of creating an empty one under the new name.
#[test]
fn pg_failed_round_undoes_its_ddl_and_the_cache_with_it() {
    let pg = Cluster::start();
    let db = pg.db();
    let mut a = pg.open();
    commit_first_kv_row(&mut a);
    let renaming = || tx(200, vec![kv_relation(1, "kv2"), insert(1, &[vec![Some("2"), Some("b")]])]);
    a.apply(Seq(2), renaming()).unwrap();
    apply_commit_err(&mut a, 3, tx(300, vec![kv_relation(1, "kv2"), insert(1, &[vec![Some("x"), Some("c")]])]));
    a.session_start(JOURNAL).unwrap();
    assert_eq!(db.one("SELECT to_regclass('public.kv2')::text"), None, "the rename was rolled back");
    a.apply(Seq(2), renaming()).unwrap();
    apply_commit(&mut a, 3, tx(300, vec![kv_relation(1, "kv2"), insert(1, &[vec![Some("3"), Some("c")]])]));
    assert_eq!(db.one("SELECT to_regclass('public.kv')::text"), None);
    assert_eq!(kv_rows(&db, "kv2"), vec![row("1", Some("a")), row("2", Some("b")), row("3", Some("c"))]);
}

/// A crash after the copiers committed their tables but before the main transaction committed
/// the new position: the standby must not show the old position (the agent would resume from
/// it with tables already replaced by the snapshot), so it shows none and the agent resyncs.
#[test]
fn pg_crash_between_the_copiers_commit_and_the_position_leads_to_a_resync() {
    let pg = Cluster::start();
    let db = pg.db();
    let mut a = pg.open();
    commit_first_kv_row(&mut a);
    assert_eq!(a.position(), Some(pos(1)));
    a.begin_resync().unwrap();
    a.apply(Seq(0), snap_piece(1, "kv", &[vec![Some("1"), Some("snap")], vec![Some("2"), Some("snap")]])).unwrap();
    a.apply(Seq(0), snap_piece(3, "fresh", &[vec![Some("7"), Some("new table")]])).unwrap();
    assert!(a.st.copiers.has("public", "kv") && a.st.copiers.has("public", "fresh"));
    a.apply(Seq(0), snap_end(5000)).unwrap();
    a.end_resync().unwrap();
    // The copiers' half of prepare_commit, then the process dies before the main commit.
    let rt = a.rt.take().expect("runtime");
    rt.block_on(a.st.copiers.commit()).unwrap();
    a.rt = Some(rt);
    drop(a);
    assert_eq!(kv_rows(&db, "kv"), vec![row("1", Some("snap")), row("2", Some("snap"))], "the copiers committed");
    let mut b = pg.open();
    assert_eq!(b.position(), None, "no position: the agent resyncs instead of resuming from seq 1");
    b.session_start(JOURNAL).unwrap();
    b.begin_resync().unwrap();
    b.apply(Seq(0), snap_piece(1, "kv", &[vec![Some("1"), Some("again")]])).unwrap();
    b.apply(Seq(0), snap_piece(3, "fresh", &[vec![Some("7"), Some("again")]])).unwrap();
    b.apply(Seq(0), snap_end(6000)).unwrap();
    b.end_resync().unwrap();
    assert!(b.commit(pos(2)).unwrap());
    assert_eq!(kv_rows(&db, "kv"), vec![row("1", Some("again"))]);
    assert_eq!(kv_rows(&db, "fresh"), vec![row("7", Some("again"))]);
    assert_eq!(b.position(), Some(pos(2)));
    drop(b);
    assert_eq!(pg.open().position(), Some(pos(2)));
}

#[test]
fn pg_position_survives_reopening() {
    let pg = Cluster::start();
    let mut a = pg.open();
    apply_commit(&mut a, 41, tx(1000, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("1"), Some("a")]])]));
    // Only the position moves (idle target): its own short transaction.
    assert!(a.commit(pos(42)).unwrap());
    drop(a);
    let a = pg.open();
    assert_eq!(a.position(), Some(pos(42)));
    assert_eq!(a.applied_lsn(), 1001);
    let db = pg.db();
    assert_eq!(
        db.one("SELECT journal_id FROM lockstep.applied_position WHERE agent = 'agent-1' AND source = 'db'"),
        Some(JOURNAL.to_string())
    );
}

#[test]
fn pg_refuses_bad_changes_and_commits_nothing_of_them() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let db = pg.db();
    commit_first_kv_row(&mut a);
    let cases: Vec<(Change, &str)> = vec![
        (tx(200, vec![insert(99, &[vec![Some("1")]])]), "no PgRelation described"),
        (tx(200, vec![kv_relation(1, "kv"), update(1, None, false, tuple(vec![text("1")]))]), "has 1 values"),
        (
            tx(
                200,
                vec![
                    relation(3, "nokey", "d", vec![col("a", "integer", false)]),
                    delete(3, tuple(vec![text("1")]), false),
                ],
            ),
            "no key columns",
        ),
        (
            tx(200, vec![PgOp { op: Some(pg_op::Op::Copy(proto::PgCopy { rel: 1, data: Bytes::new() })) }]),
            "outside a resync",
        ),
        (tx(200, vec![PgOp { op: Some(pg_op::Op::SnapshotEnd(proto::PgSnapshotEnd { lsn: 1 })) }]), "outside a resync"),
        (tx(200, vec![relation(4, "x", "d", vec![col("a", "int) OR (true", true)])]), "type name"),
        (
            tx(
                200,
                vec![PgOp {
                    op: Some(pg_op::Op::Relation(PgRelation {
                        id: 5,
                        schema: "lockstep".into(),
                        name: "applied_position".into(),
                        ..Default::default()
                    })),
                }],
            ),
            "reserved schema",
        ),
        (Change::Other(proto::change_event::Change::Sqlite(proto::SqliteFrames::default())), "only PostgreSQL"),
    ];
    for (i, (change, expect)) in cases.into_iter().enumerate() {
        // A good change first in the same round: it is rolled back with the bad one.
        a.apply(Seq(2), tx(150, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])])).unwrap();
        let why = is_refused(a.apply(Seq(3), change));
        assert!(why.contains(expect), "case {i}: {why}");
        assert!(a.prepare_commit(pos(2)).unwrap().is_none(), "case {i}: committed after a refusal");
        assert_eq!(db.count("SELECT count(*) FROM kv"), 1, "case {i}");
        a.session_start(JOURNAL).unwrap();
        assert_eq!(a.position(), Some(pos(1)));
    }
    assert!(is_refused(a.apply(Seq(0), tx(1, vec![]))).contains("outside a resync"));
}

#[test]
fn pg_sql_errors_roll_back_and_name_the_table() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let db = pg.db();
    commit_first_kv_row(&mut a);
    a.apply(Seq(2), tx(200, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])])).unwrap();
    let err =
        apply_commit_err(&mut a, 3, tx(300, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("1"), Some("dup")]])]));
    let msg = err.to_string();
    assert!(matches!(err, ApplyError::Io { .. }), "{msg}");
    assert!(msg.contains("\"public\".\"kv\"") && msg.contains("duplicate key"), "{msg}");
    assert!(a.prepare_commit(pos(2)).unwrap().is_none());
    assert!(a.apply(Seq(4), tx(400, vec![])).is_err(), "no more work until the next session");
    assert_eq!(db.count("SELECT count(*) FROM kv"), 1);
    a.session_start(JOURNAL).unwrap();
    assert_eq!(a.applied_lsn(), 101);
    apply_commit(&mut a, 2, tx(200, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])]));
    assert_eq!(db.count("SELECT count(*) FROM kv"), 2);
}

#[test]
fn pg_session_start_reconnects_after_the_connection_died() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let db = pg.db();
    commit_first_kv_row(&mut a);
    db.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'lockstep-receiver'");
    std::thread::sleep(Duration::from_millis(100));
    let err =
        apply_commit_err(&mut a, 2, tx(200, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])]));
    assert!(matches!(err, ApplyError::Io { .. }), "{err:?}");
    a.session_start(JOURNAL).unwrap();
    assert_eq!(a.position(), Some(pos(1)));
    apply_commit(&mut a, 2, tx(200, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])]));
    assert_eq!(db.count("SELECT count(*) FROM kv"), 2);
}

/// A commit's durable half (its WAL flush barrier) fails when the standby no longer holds the
/// commit — lost in a crash — rather than succeeding on the recovered server; the next session
/// starts from what the standby kept, made durable first.
#[test]
fn pg_flush_barrier_fails_when_the_standby_lost_the_commit() {
    let mut pg = Cluster::start();
    let mut a = pg.open();
    commit_first_kv_row(&mut a);
    a.apply(Seq(2), tx(200, vec![kv_relation(1, "kv"), insert(1, &[vec![Some("2"), Some("b")]])])).unwrap();
    assert!(a.prepare_commit(pos(2)).unwrap().is_some());
    // A crash: the postmaster is killed and started again (crash recovery) on the same port.
    pg.0.restart().unwrap_or_else(|e| panic!("{e:#}"));
    // Whether the restart kept seq 2 depends on the WAL writer; a barrier for a commit the
    // standby does not hold (seq 3 here) must fail either way.
    let e = a.st.flusher.barrier(Some(3))().expect_err("a barrier for a commit the standby lacks");
    assert!(e.to_string().contains("lost"), "{e}");
    a.session_start(JOURNAL).unwrap();
    let kept = a.position().expect("a position");
    assert!(kept == pos(1) || kept == pos(2), "{kept:?}");
    assert_eq!(pg.db().count("SELECT count(*) FROM kv"), kept.seq.0 as i64);
    a.st.flusher.barrier(Some(kept.seq.0))().expect("a barrier for what the standby holds");
}

/// A round is committed asynchronously (visible at once); the durable half of its commit must
/// leave the standby's WAL flushed through that commit. PostgreSQL flushes WAL at a synchronous
/// commit only for a transaction that wrote WAL itself (one that merely took a transaction id
/// commits asynchronously), so a barrier that writes nothing returns with the round still in
/// WAL buffers, and a crash of the standby then loses a round already acknowledged. The WAL
/// writer is slowed down here, so that nothing else flushes the round meanwhile.
#[test]
fn pg_the_durable_half_of_a_commit_flushes_the_standby_wal() {
    let pg = Cluster::start_with(&["wal_writer_delay = 10s"]);
    let mut a = pg.open();
    let db = pg.db();
    commit_first_kv_row(&mut a);
    let lsn = |f: &str| -> i64 { db.count(&format!("SELECT (pg_catalog.{f}() - '0/0'::pg_lsn)::bigint")) };
    for seq in 2..10u64 {
        let id = seq.to_string();
        a.apply(Seq(seq), tx(seq * 100, vec![kv_relation(1, "kv"), insert(1, &[vec![Some(id.as_str()), Some("x")]])]))
            .unwrap();
        let durable = a.prepare_commit(pos(seq)).unwrap().expect("a commit with a durable half");
        let committed = lsn("pg_current_wal_insert_lsn");
        if lsn("pg_current_wal_flush_lsn") >= committed {
            // Flushed by someone else before the barrier ran: proves nothing, try another round.
            durable().unwrap();
            continue;
        }
        durable().unwrap();
        let flushed = lsn("pg_current_wal_flush_lsn");
        assert!(flushed >= committed, "WAL flushed to {flushed}, but round {seq} committed at {committed}");
        return;
    }
    panic!("every round's WAL was flushed before its barrier ran; the barrier went untested");
}

#[test]
fn pg_logical_messages_pass_through() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let msg = |transactional| PgOp {
        op: Some(pg_op::Op::Message(proto::PgMessage {
            transactional,
            prefix: "lockstep-barrier".into(),
            content: Bytes::from_static(b"cutover-1"),
            lsn: 555,
        })),
    };
    apply_commit(&mut a, 1, tx(554, vec![msg(false)]));
    apply_commit(&mut a, 2, tx(600, vec![kv_relation(1, "kv"), msg(true)]));
    let last = a.last_message().unwrap();
    assert_eq!((last.prefix.as_str(), &last.content[..], last.lsn), ("lockstep-barrier", &b"cutover-1"[..], 555));
    assert_eq!(a.applied_lsn(), 601);
}

#[test]
fn pg_bulk_insert_of_200k_rows() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let n = 200_000;
    let mut data = String::with_capacity(n * 80);
    for i in 0..n {
        data.push_str(&format!(
            "{i}\tuser-{i}@example.com\t{}.{:02}\t2024-01-01 00:00:{:02}+00\n",
            i * 3,
            i % 100,
            i % 60
        ));
    }
    let cols = vec![
        col("id", "bigint", true),
        col("email", "text", false),
        col("amount", "numeric(12,2)", false),
        col("at", "timestamp with time zone", false),
    ];
    let ins =
        PgOp { op: Some(pg_op::Op::Insert(proto::PgInsert { rel: 1, rows: Bytes::from(data), count: n as u32 })) };
    let change = tx(100, vec![relation(1, "bulk", "d", cols), ins]);
    let start = Instant::now();
    apply_commit(&mut a, 1, change);
    let took = start.elapsed();
    eprintln!(
        "bulk insert: {n} rows in {:.3} s = {:.0} rows/s (COPY, with primary key, committed)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    assert_eq!(pg.db().count("SELECT count(*) FROM bulk"), n as i64);
}

#[test]
fn pg_many_updates_and_deletes_apply_in_order() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let n = 20_000;
    let rows: Vec<Vec<Option<String>>> = (0..n).map(|i| vec![Some(i.to_string()), Some("v0".to_string())]).collect();
    let rows: Vec<Vec<Option<&str>>> = rows.iter().map(|r| r.iter().map(|v| v.as_deref()).collect()).collect();
    apply_commit(&mut a, 1, tx(100, vec![kv_relation(1, "kv"), insert(1, &rows)]));
    // Every row updated twice (the second must win), then every other row deleted: the
    // pipeline keeps their order.
    let mut ops = vec![kv_relation(1, "kv")];
    for round in 1..=2 {
        for i in 0..n {
            ops.push(update(1, None, false, tuple(vec![text(&i.to_string()), text(&format!("v{round}"))])));
        }
    }
    for i in (0..n).step_by(2) {
        ops.push(delete(1, tuple(vec![text(&i.to_string()), null()]), true));
    }
    let count = ops.len() - 1;
    let start = Instant::now();
    apply_commit(&mut a, 2, tx(200, ops));
    let took = start.elapsed();
    eprintln!(
        "{count} updates/deletes in {:.3} s = {:.0} ops/s (pipelined)",
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64()
    );
    let db = pg.db();
    assert_eq!(db.count("SELECT count(*) FROM kv"), n as i64 / 2);
    assert_eq!(db.count("SELECT count(*) FROM kv WHERE v = 'v2' AND id % 2 = 1"), n as i64 / 2);
}

#[test]
fn pg_user_defined_types_are_created_when_missing() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let type_def = |schema: &str, name: &str, sql: &str| PgOp {
        op: Some(pg_op::Op::TypeDef(proto::PgTypeDef {
            schema: schema.into(),
            name: name.into(),
            create_sql: sql.into(),
            enum_labels: Vec::new(),
            labels_current: false,
        })),
    };
    let mood = type_def("app", "mood", r#"CREATE TYPE "app"."mood" AS ENUM ('sad', 'it''s ok', 'happy')"#);
    let email = type_def(
        "public",
        "email",
        r#"CREATE DOMAIN "public"."email" AS text CONSTRAINT "email_check" CHECK ((VALUE ~ '@'::text) AND (char_length(VALUE) > 2))"#,
    );
    let rel = || {
        relation(
            1,
            "people",
            "d",
            vec![
                col("id", "integer", true),
                col("m", "app.mood", false),
                col("e", "email", false),
                col("ms", "app.mood[]", false),
            ],
        )
    };
    let row = vec![Some("1"), Some("it's ok"), Some("a@b"), Some("{sad,happy}")];
    apply_commit(&mut a, 1, tx(100, vec![mood.clone(), email.clone(), rel(), insert(1, &[row])]));
    let db = pg.db();
    assert_eq!(
        db.rows("SELECT m::text, e::text, ms::text FROM people"),
        vec![vec![Some("it's ok".into()), Some("a@b".into()), Some("{sad,happy}".into())]]
    );
    // Sent again with every event: already there, nothing to do.
    apply_commit(&mut a, 2, tx(200, vec![mood, email, rel(), insert(1, &[vec![Some("2"), Some("sad"), None, None]])]));
    assert_eq!(db.count("SELECT count(*) FROM people"), 2);
    // A definition with a call that may have side effects is not run.
    let evil = type_def(
        "public",
        "evil",
        r#"CREATE DOMAIN "public"."evil" AS integer CONSTRAINT "c" CHECK ((pg_terminate_backend(VALUE)))"#,
    );
    let out = a.apply(Seq(3), tx(300, vec![evil])).unwrap();
    assert!(out.skipped.unwrap().contains("pg_terminate_backend"));
    assert!(a.commit(pos(3)).unwrap());
    assert_eq!(db.count("SELECT count(*) FROM pg_type WHERE typname = 'evil'"), 0);
}

#[test]
fn pg_enum_labels_added_on_the_source_reach_the_standby_type() {
    let pg = Cluster::start();
    let mut a = pg.open();
    let mood = |labels: &[&str]| PgOp {
        op: Some(pg_op::Op::TypeDef(proto::PgTypeDef {
            schema: "public".into(),
            name: "mood".into(),
            create_sql: r#"CREATE TYPE "public"."mood" AS ENUM ('sad', 'happy')"#.into(),
            enum_labels: labels.iter().map(|l| l.to_string()).collect(),
            labels_current: true,
        })),
    };
    let rel = || {
        relation(1, "feel", "d", vec![col("id", "integer", true), col("m", "mood", false), col("ms", "mood[]", false)])
    };
    apply_commit(
        &mut a,
        1,
        tx(100, vec![mood(&["sad", "happy"]), rel(), insert(1, &[vec![Some("1"), Some("sad"), None]])]),
    );
    // Labels added on the source (one before, one between, one after the others) arrive with a
    // row that uses them, in the same standby transaction as earlier rows of the round.
    a.apply(Seq(2), tx(200, vec![insert(1, &[vec![Some("2"), Some("happy"), None]])])).unwrap();
    let labels = ["bleak", "sad", "it's ok", "happy", "ecstatic"];
    a.apply(
        Seq(3),
        tx(
            300,
            vec![mood(&labels), insert(1, &[vec![Some("3"), Some("it's ok"), Some(r#"{bleak,"it's ok",ecstatic}"#)]])],
        ),
    )
    .unwrap();
    assert!(a.commit(pos(3)).unwrap());
    let db = pg.db();
    assert_eq!(
        db.rows("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = 'mood'::regtype ORDER BY enumsortorder"),
        labels.iter().map(|l| vec![Some(l.to_string())]).collect::<Vec<_>>()
    );
    assert_eq!(
        db.rows("SELECT id::text, m::text, ms::text FROM feel ORDER BY id"),
        vec![
            vec![Some("1".into()), Some("sad".into()), None],
            vec![Some("2".into()), Some("happy".into()), None],
            vec![Some("3".into()), Some("it's ok".into()), Some(r#"{bleak,"it's ok",ecstatic}"#.into())],
        ]
    );
    // The same definition again: nothing to do.
    apply_commit(&mut a, 4, tx(400, vec![mood(&labels), insert(1, &[vec![Some("4"), Some("ecstatic"), None]])]));
    assert_eq!(db.count("SELECT count(*) FROM feel"), 4);
    // A label renamed on the source: the standby's rows holding it read the new name too.
    let renamed = ["bleak", "sad", "it's ok", "glad", "ecstatic"];
    apply_commit(&mut a, 5, tx(500, vec![mood(&renamed), insert(1, &[vec![Some("5"), Some("glad"), Some("{glad}")]])]));
    assert_eq!(
        db.rows("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = 'mood'::regtype ORDER BY enumsortorder"),
        renamed.iter().map(|l| vec![Some(l.to_string())]).collect::<Vec<_>>()
    );
    assert_eq!(db.count("SELECT count(*) FROM feel WHERE m = 'glad'"), 2);
}
