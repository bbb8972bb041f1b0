//! The PostgreSQL test harness itself: clusters start configured for logical replication,
//! queries return exact values, database comparison finds equal and differing data, a crashed
//! postmaster comes back on its port with committed data intact.

use lockstep_tests::pg::PgCluster;

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

#[test]
fn cluster_query_and_diff() {
    let pg = PgCluster::start().unwrap();
    assert_eq!(pg.query("postgres", "SHOW wal_level").unwrap(), vec![vec![s("logical")]]);
    assert_eq!(pg.psql("postgres", "SHOW max_replication_slots").unwrap().trim(), "20");
    assert!(pg.dsn("x").contains(&format!("port={}", pg.port())));

    let schema = "CREATE TABLE t (id int PRIMARY KEY, name text, at timestamptz, data bytea);
                  CREATE SCHEMA other; CREATE TABLE other.\"Mixed Case\" (k text, v jsonb);";
    let rows = "INSERT INTO t VALUES (1, 'plain', '2024-01-02 03:04:05+00', '\\x00ff'),
                                     (2, NULL, NULL, NULL),
                                     (3, E'tab\\there\\nnewline \\\\ back|pipe', now(), ''),
                                     (4, '', '-infinity', '\\x');
                INSERT INTO other.\"Mixed Case\" VALUES ('a', '{\"x\": [1, 2]}'), (NULL, 'null');";
    for db in ["one", "two"] {
        pg.create_db(db).unwrap();
        pg.psql(db, schema).unwrap();
    }
    pg.psql("one", rows).unwrap();
    pg.psql("two", &rows.replace("now()", "'2030-01-01'")).unwrap();

    // Exact values through COPY: NULL vs empty string, tabs, newlines, backslashes.
    let got = pg.query("one", "SELECT id, name FROM t ORDER BY id;").unwrap();
    assert_eq!(
        got,
        vec![
            vec![s("1"), s("plain")],
            vec![s("2"), None],
            vec![s("3"), s("tab\there\nnewline \\ back|pipe")],
            vec![s("4"), s("")],
        ]
    );
    // The non-COPY path (several statements) keeps NULL and empty apart too.
    let got = pg.query("one", "SET search_path = other; SELECT k FROM \"Mixed Case\" ORDER BY k NULLS FIRST").unwrap();
    assert_eq!(got, vec![vec![None], vec![s("a")]]);
    assert_eq!(pg.query("one", "SELECT 1 WHERE false").unwrap(), Vec::<Vec<Option<String>>>::new());
    assert!(pg.psql("one", "SELECT * FROM missing").unwrap_err().to_string().contains("missing"));

    // Only row 3's timestamp differs.
    let diff = PgCluster::diff_databases((&pg, "one"), (&pg, "two")).unwrap();
    assert_eq!(diff.len(), 2, "{diff:#?}");
    assert!(diff.iter().all(|d| d.starts_with("public.t: row only in ")), "{diff:#?}");

    let at = pg.query("one", "SELECT at FROM t WHERE id = 3").unwrap()[0][0].clone().unwrap();
    pg.psql("two", &format!("UPDATE t SET at = '{at}' WHERE id = 3")).unwrap();
    let diff = PgCluster::diff_databases((&pg, "one"), (&pg, "two")).unwrap();
    assert!(diff.is_empty(), "{diff:#?}");

    // Missing rows, extra tables and columns are all reported.
    pg.psql(
        "two",
        "DELETE FROM t WHERE id = 2; CREATE TABLE extra (x int); ALTER TABLE other.\"Mixed Case\" ADD COLUMN z int",
    )
    .unwrap();
    let diff = PgCluster::diff_databases((&pg, "one"), (&pg, "two")).unwrap();
    let text = diff.join("\n");
    assert!(text.contains("table public.extra only in b"), "{text}");
    assert!(text.contains("other.Mixed Case: column z only in b"), "{text}");
    assert!(text.contains("public.t: 4 rows in a"), "{text}");
    assert!(text.contains("public.t: row only in a (one@127.0.0.1"), "{text}");
    assert!(text.contains(": (2,,,)"), "{text}");
}

#[test]
fn crash_restart_conf_and_pgbench() {
    let mut a = PgCluster::start().unwrap();
    let b = PgCluster::start_with(&["wal_level = replica"]).unwrap();
    assert_eq!(b.query("postgres", "SHOW wal_level").unwrap(), vec![vec![s("replica")]]);
    assert_ne!(a.port(), b.port());

    for pg in [&a, &b] {
        pg.create_db("bench").unwrap();
        pg.pgbench("bench", &["-i", "-s", "1", "-q"]).unwrap();
    }
    // Same deterministic data in two clusters: equal (100 000 accounts compared by hash).
    let diff = PgCluster::diff_databases((&a, "bench"), (&b, "bench")).unwrap();
    assert!(diff.is_empty(), "{diff:#?}");

    let out = a.pgbench("bench", &["-c", "2", "-t", "20"]).unwrap();
    assert!(out.contains("tps = "), "{out}");
    let port = a.port();
    a.restart().unwrap();
    assert_eq!(a.port(), port);
    let n = a.query("bench", "SELECT count(*) FROM pgbench_history").unwrap();
    assert_eq!(n, vec![vec![s("40")]], "committed transactions survive kill -9");

    let diff = PgCluster::diff_databases((&a, "bench"), (&b, "bench")).unwrap();
    let text = diff.join("\n");
    assert!(text.contains("public.pgbench_history: 40 rows in a"), "{text}");
    assert!(text.contains("public.pgbench_accounts: contents differ"), "{text}");
}
