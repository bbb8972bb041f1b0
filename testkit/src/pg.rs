//! Throwaway PostgreSQL clusters for the receiver's applier tests, the end-to-end tests and the
//! benchmarks: `initdb` into a fresh directory, a postmaster on a free port of 127.0.0.1 (plus
//! a unix socket in that directory) configured for logical replication, and the client tools
//! (`psql`, `pgbench`) pointed at it.
//! Everything is blocking; nothing is shared between clusters except, when running as root, the
//! unprivileged system user [`PG_USER`] the server runs as (PostgreSQL refuses to run as root).
//!
//! Binaries: `$LOCKSTEP_PG_BIN` if set, else the highest version under
//! `/usr/lib/postgresql/*/bin`, else the directory of `initdb` on `PATH`, else
//! `pg_config --bindir`.
//!
//! Set `LOCKSTEP_KEEP=1` to keep a cluster's directory (data, `postgres.log`) after the test.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The system user the server runs as when the tests run as root.
pub const PG_USER: &str = "lockstep-pg";

/// How long a (re)start may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Rows larger than this many on either side are compared by hash only in [`PgCluster::diff_databases`].
const DIFF_DETAIL_MAX_ROWS: i64 = 50_000;

/// Field separator and NULL marker for query results that cannot go through `COPY`; psql has
/// no separator that cannot occur in data, so these are merely strings no test writes.
const FIELD_SEP: &str = "\x1f\x1e|lockstep-field|\x1e\x1f";
const NULL_MARK: &str = "\x1f\x1e|lockstep-null|\x1e\x1f";

/// A running PostgreSQL cluster in its own directory; stopped (immediate shutdown) and removed
/// on drop.
pub struct PgCluster {
    /// The cluster's own directory: `data/`, the unix socket, `postgres.log`, `initdb.log`.
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<&'static PgUser>,
    child: Option<Child>,
}

/// The unprivileged account the server runs as, and how to switch to it.
#[derive(Debug)]
struct PgUser {
    uid: u32,
    gid: u32,
    /// `setpriv` (preferred: execs, so the child is the postmaster itself) or `runuser`.
    switch: Switch,
}

#[derive(Debug)]
enum Switch {
    Setpriv(PathBuf),
    Runuser(PathBuf),
}

impl PgCluster {
    /// `initdb` a fresh cluster and start it with `wal_level = logical`, room for 20 slots and
    /// 20 walsenders, superuser `postgres`, trust authentication on 127.0.0.1 for ordinary and
    /// replication connections.
    pub fn start() -> Result<PgCluster> {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with extra `postgresql.conf` lines appended after the
    /// harness's own (so they win), e.g. `"wal_level = replica"`.
    pub fn start_with(conf: &[&str]) -> Result<PgCluster> {
        let bin = bin_dir()?.to_path_buf();
        let run_as = if unsafe { libc::geteuid() } == 0 { Some(pg_user()?) } else { None };
        let dir = tempfile::Builder::new()
            .prefix("lockstep-pg-")
            .tempdir_in(tmp_base(run_as.is_some()))
            .context("create cluster dir")?
            .keep();
        let mut cluster =
            PgCluster { data: dir.join("data"), log: dir.join("postgres.log"), dir, bin, port: 0, run_as, child: None };
        // From here on, Drop removes the directory if anything fails.
        if let Some(u) = run_as {
            std::os::unix::fs::chown(&cluster.dir, Some(u.uid), Some(u.gid)).context("chown cluster dir")?;
        }
        cluster.initdb()?;
        cluster.configure(conf)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.port = crate::free_port();
            match cluster.launch() {
                Ok(()) => return Ok(cluster),
                // Someone took the port between our probe and the postmaster's bind.
                Err(e) if attempt < 10 && is_port_clash(&e.to_string()) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (holds `data/`, the unix socket and `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Directory of the server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// libpq-style connection string for `db`, as superuser `postgres` over TCP.
    pub fn dsn(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    /// `CREATE DATABASE name`.
    pub fn create_db(&self, name: &str) -> Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE {}", quote_ident(name)))?;
        Ok(())
    }

    /// Runs a script (any number of statements; stops at the first error) against `db` and
    /// returns psql's output in unaligned, tuples-only form: one line per row, columns
    /// separated by `|`, no headers, no command tags.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = self.run_psql(db, &["-A", "-t"], sql, &[])?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Runs a query and returns its rows, every value in PostgreSQL's text form and NULL as
    /// `None`. A single SELECT/WITH/VALUES/TABLE statement goes through `COPY (...) TO STDOUT`
    /// and is exact for any data; anything else (e.g. `SHOW`, or several statements, whose
    /// rows are concatenated) goes through psql with a separator no test data contains.
    pub fn query(&self, db: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.query_env(db, sql, &[])
    }

    /// Runs `pgbench` against `db` with `args` (e.g. `["-i", "-s", "1"]` or
    /// `["-c", "4", "-T", "5"]`); returns its stdout followed by its stderr.
    pub fn pgbench(&self, db: &str, args: &[&str]) -> Result<String> {
        let pgbench = tool(&self.bin, "pgbench")?;
        let out = client_command(&pgbench)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .arg(db)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {}", pgbench.display()))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("pgbench {args:?} on {db} failed ({}):\n{text}", out.status);
        }
        Ok(text)
    }

    /// Kills the postmaster with SIGKILL (a crash: no shutdown checkpoint, backends orphaned)
    /// and starts it again on the same port; returns once it accepts connections, i.e. after
    /// crash recovery.
    pub fn restart(&mut self) -> Result<()> {
        self.signal_and_reap(libc::SIGKILL, Duration::from_secs(10));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                // Orphaned backends may still hold the old shared memory or the port for a moment.
                Err(e) if Instant::now() < deadline && is_transient_restart_failure(&e.to_string()) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(e.context("restart after SIGKILL")),
            }
        }
    }

    /// Turns TLS on with the given server certificate and key (PEM) and restarts the server
    /// with TCP connections admitted only over TLS (`hostssl`); the unix socket stays open
    /// for the harness's own tools.
    pub fn require_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<()> {
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = self.data.join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some(u) = self.run_as {
                std::os::unix::fs::chown(&path, Some(u.uid), Some(u.gid))?;
            }
        }
        let mut conf = OpenOptions::new().append(true).open(self.data.join("postgresql.conf"))?;
        writeln!(conf, "ssl = on")?;
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "# lockstep test harness: TLS required over TCP\n\
             local all all trust\n\
             local replication all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl replication all 127.0.0.1/32 trust\n",
        )?;
        self.stop();
        self.launch().context("restart with TLS")
    }

    /// Stops the server cleanly (fast shutdown: sessions terminated, checkpoint written).
    /// Drop does this too, with an immediate shutdown instead.
    pub fn stop(&mut self) {
        self.signal_and_reap(libc::SIGINT, Duration::from_secs(30));
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// Compares every user table (all schemas except `pg_catalog`, `information_schema`,
    /// `lockstep`, TOAST and temp schemas; partitioned tables as a whole) of two databases, row
    /// for row: each table's rows are rendered as text over the columns both sides have and
    /// compared as multisets (count and md5 of the sorted rows; the differing rows themselves
    /// when both sides have at most 50 000). Returns human-readable differences, empty when
    /// the databases hold the same data; tables or columns present on one side only, or with
    /// different types, are differences too.
    pub fn diff_databases(a: (&PgCluster, &str), b: (&PgCluster, &str)) -> Result<Vec<String>> {
        let la = format!("a ({}@127.0.0.1:{})", a.1, a.0.port);
        let lb = format!("b ({}@127.0.0.1:{})", b.1, b.0.port);
        let ta = tables(a.0, a.1).with_context(|| format!("list tables of {la}"))?;
        let tb = tables(b.0, b.1).with_context(|| format!("list tables of {lb}"))?;
        let mut diffs = Vec::new();
        for name in ta.keys().filter(|k| !tb.contains_key(*k)) {
            diffs.push(format!("table {name} only in {la}"));
        }
        for name in tb.keys().filter(|k| !ta.contains_key(*k)) {
            diffs.push(format!("table {name} only in {lb}"));
        }
        // For each common table: the row expression over the common columns, in a's order.
        let mut common = Vec::new();
        for (name, ca) in &ta {
            let Some(cb) = tb.get(name) else { continue };
            let mut cols = Vec::new();
            for (col, ty) in &ca.columns {
                match cb.column(col) {
                    None => diffs.push(format!("{name}: column {col} only in {la}")),
                    Some(tyb) => {
                        if ty != tyb {
                            diffs.push(format!("{name}: column {col} is {ty} in {la} but {tyb} in {lb}"));
                        }
                        cols.push(format!("t.{}", quote_ident(col)));
                    }
                }
            }
            for (col, _) in cb.columns.iter().filter(|(c, _)| ca.column(c).is_none()) {
                diffs.push(format!("{name}: column {col} only in {lb}"));
            }
            common.push((
                name.clone(),
                ca.sql_name.clone(),
                cb.sql_name.clone(),
                format!("ROW({})::text", cols.join(", ")),
            ));
        }
        if common.is_empty() {
            return Ok(diffs);
        }
        let summary = |side: (&PgCluster, &str), pick_a: bool| -> Result<Vec<(i64, String)>> {
            let parts: Vec<String> = common
                .iter()
                .enumerate()
                .map(|(i, (_, sa, sb, row))| {
                    format!(
                        "SELECT {i} AS i, count(*) AS n, md5(coalesce(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\"), '')) \
                         FROM (SELECT {row} AS r FROM {} t) s",
                        if pick_a { sa } else { sb }
                    )
                })
                .collect();
            let rows = side.0.query_env(side.1, &format!("{} ORDER BY i", parts.join(" UNION ALL ")), DIFF_ENV)?;
            rows.into_iter()
                .map(|r| match r.as_slice() {
                    [_, Some(n), Some(h)] => Ok((n.parse()?, h.clone())),
                    other => Err(anyhow!("unexpected summary row {other:?}")),
                })
                .collect()
        };
        let sa = summary(a, true).with_context(|| format!("summarise tables of {la}"))?;
        let sb = summary(b, false).with_context(|| format!("summarise tables of {lb}"))?;
        for (((name, qa, qb, row), (na, ha)), (nb, hb)) in common.iter().zip(&sa).zip(&sb) {
            if ha == hb && na == nb {
                continue;
            }
            if na != nb {
                diffs.push(format!("{name}: {na} rows in {la}, {nb} rows in {lb}"));
            }
            if *na > DIFF_DETAIL_MAX_ROWS || *nb > DIFF_DETAIL_MAX_ROWS {
                diffs.push(format!("{name}: contents differ (too many rows to list the differences)"));
                continue;
            }
            let fetch = |side: (&PgCluster, &str), q: &str| -> Result<BTreeMap<String, i64>> {
                let rows = side.0.query_env(side.1, &format!("SELECT {row} FROM {q} t"), DIFF_ENV)?;
                let mut m = BTreeMap::new();
                for r in rows {
                    *m.entry(r.into_iter().next().flatten().unwrap_or_default()).or_insert(0) += 1;
                }
                Ok(m)
            };
            let ra = fetch(a, qa)?;
            let rb = fetch(b, qb)?;
            let mut listed = 0;
            for (rows_x, rows_y, label) in [(&ra, &rb, &la), (&rb, &ra, &lb)] {
                let mut extra = 0;
                for (r, n) in rows_x {
                    let surplus = n - rows_y.get(r).copied().unwrap_or(0);
                    for _ in 0..surplus.max(0) {
                        if extra < 10 {
                            diffs.push(format!("{name}: row only in {label}: {}", shorten(r, 300)));
                        }
                        extra += 1;
                    }
                }
                if extra > 10 {
                    diffs.push(format!("{name}: ... and {} more rows only in {label}", extra - 10));
                }
                listed += extra;
            }
            if listed == 0 {
                diffs.push(format!("{name}: contents differ (same rows, different hash: {ha} vs {hb})"));
            }
        }
        Ok(diffs)
    }

    // ---- internals -------------------------------------------------------------------------

    fn initdb(&self) -> Result<()> {
        let log_path = self.dir.join("initdb.log");
        let log = std::fs::File::create(&log_path)?;
        let status = self
            .server_command(&tool(&self.bin, "initdb")?)
            .arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("run initdb")?;
        if !status.success() {
            bail!("initdb failed ({status}):\n{}", tail(&log_path, 40));
        }
        Ok(())
    }

    fn configure(&self, extra: &[&str]) -> Result<()> {
        let mut conf = OpenOptions::new().append(true).open(self.data.join("postgresql.conf"))?;
        let socket_dir = self.dir.display().to_string().replace('\'', "''");
        writeln!(
            conf,
            "\n# lockstep test harness\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 20\n\
             max_connections = 100\n\
             fsync = on\n\
             synchronous_commit = on\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             log_replication_commands = on\n\
             log_min_messages = warning\n\
             log_connections = off\n"
        )?;
        for line in extra {
            writeln!(conf, "{line}")?;
        }
        // Logical walsenders match the `all` database lines, physical ones the `replication` line.
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "# lockstep test harness: trust everything local\n\
             local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )?;
        Ok(())
    }

    /// Starts the postmaster on `self.port` and waits until it accepts connections.
    fn launch(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "postmaster already running");
        let log = OpenOptions::new().create(true).append(true).open(&self.log)?;
        let postgres = tool(&self.bin, "postgres")?;
        let child = self
            .server_command(&postgres)
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", postgres.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().expect("child").try_wait()? {
                self.child = None;
                bail!("postgres exited during startup ({status}) on port {}; log:\n{}", self.port, self.log_tail());
            }
            if self.ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.signal_and_reap(libc::SIGKILL, Duration::from_secs(5));
                bail!("postgres not ready within {START_TIMEOUT:?} on port {}; log:\n{}", self.port, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        let port = self.port.to_string();
        match tool(&self.bin, "pg_isready") {
            Ok(isready) => client_command(&isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres", "-t", "2"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            Err(_) => self.run_psql("postgres", &[], "SELECT 1", &[]).is_ok(),
        }
    }

    /// Sends `sig` to the postmaster, waits up to `grace` for it to exit, then SIGKILLs it.
    fn signal_and_reap(&mut self, sig: libc::c_int, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        // With setpriv the child is the postmaster; with runuser it is its parent.
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<libc::pid_t>().ok()))
            .filter(|_| matches!(self.run_as.map(|u| &u.switch), Some(Switch::Runuser(_))))
            .unwrap_or(child.id() as libc::pid_t);
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: plain kill(2) on a process we started.
            unsafe { libc::kill(pid, sig) };
        }
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// A command for a server-side binary, run as [`PG_USER`] when we are root.
    fn server_command(&self, program: &Path) -> Command {
        let mut cmd = match self.run_as {
            None => Command::new(program),
            Some(PgUser { uid, gid, switch: Switch::Setpriv(setpriv) }) => {
                let mut c = Command::new(setpriv);
                c.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}")).arg("--init-groups").arg("--");
                c.arg(program);
                c
            }
            Some(PgUser { switch: Switch::Runuser(runuser), .. }) => {
                let mut c = Command::new(runuser);
                c.args(["-u", PG_USER, "--"]).arg(program);
                c
            }
        };
        strip_pg_env(&mut cmd);
        cmd.current_dir(&self.dir).env("LC_ALL", "C");
        cmd
    }

    fn run_psql(&self, db: &str, args: &[&str], sql: &str, env: &[(&str, &str)]) -> Result<Vec<u8>> {
        let psql = tool(&self.bin, "psql")?;
        let mut child = client_command(&psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db])
            .args(args)
            .args(["-f", "-"])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", psql.display()))?;
        let mut stdin = child.stdin.take().expect("stdin");
        let script = sql.to_owned();
        let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        let out: Output = child.wait_with_output()?;
        let _ = writer.join();
        if !out.status.success() {
            bail!(
                "psql on {db} (port {}) failed ({}): {}\nSQL: {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                shorten(sql, 2000)
            );
        }
        Ok(out.stdout)
    }

    fn query_env(&self, db: &str, sql: &str, env: &[(&str, &str)]) -> Result<Vec<Vec<Option<String>>>> {
        let stmt = sql.trim().trim_end_matches(|c: char| c == ';' || c.is_whitespace());
        let first = stmt.split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or("").to_ascii_lowercase();
        if matches!(first.as_str(), "select" | "with" | "values" | "table") && !stmt.contains(';') {
            let out = self.run_psql(db, &[], &format!("COPY ({stmt}) TO STDOUT"), env)?;
            let text = String::from_utf8(out).context("query output is not UTF-8")?;
            return Ok(parse_copy_text(&text));
        }
        let out =
            self.run_psql(db, &["-A", "-t", "-0", "-F", FIELD_SEP, "-P", &format!("null={NULL_MARK}")], sql, env)?;
        let text = String::from_utf8(out).context("query output is not UTF-8")?;
        let mut rows: Vec<&str> = text.split('\0').collect();
        if rows.last() == Some(&"") {
            rows.pop();
        }
        Ok(rows
            .into_iter()
            .map(|r| r.split(FIELD_SEP).map(|f| (f != NULL_MARK).then(|| f.to_owned())).collect())
            .collect())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.signal_and_reap(libc::SIGQUIT, Duration::from_secs(10));
        if std::thread::panicking() || std::env::var_os("LOCKSTEP_KEEP").is_some() {
            eprintln!("==> {} <==\n{}", self.log.display(), self.log_tail());
            eprintln!("keeping PostgreSQL cluster dir {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Session settings for [`PgCluster::diff_databases`], so both sides render values alike.
const DIFF_ENV: &[(&str, &str)] = &[("PGTZ", "UTC"), ("PGDATESTYLE", "ISO, MDY"), ("PGCLIENTENCODING", "UTF8")];

struct TableInfo {
    /// `"schema"."table"`, quoted for SQL.
    sql_name: String,
    /// (name, type) in column order.
    columns: Vec<(String, String)>,
}

impl TableInfo {
    fn column(&self, name: &str) -> Option<&String> {
        self.columns.iter().find(|(c, _)| c == name).map(|(_, t)| t)
    }
}

/// User tables of `db`, keyed by `schema.table`.
fn tables(c: &PgCluster, db: &str) -> Result<BTreeMap<String, TableInfo>> {
    let rows = c.query(
        db,
        "SELECT n.nspname, c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
                a.attname, format_type(a.atttypid, a.atttypmod) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'lockstep') \
           AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)' \
         ORDER BY 1, 2, a.attnum",
    )?;
    let mut out: BTreeMap<String, TableInfo> = BTreeMap::new();
    for r in rows {
        let [Some(schema), Some(table), Some(sql_name), col, ty] =
            <[Option<String>; 5]>::try_from(r).map_err(|r| anyhow!("unexpected catalog row {r:?}"))?
        else {
            bail!("unexpected NULL in catalog row");
        };
        let t = out.entry(format!("{schema}.{table}")).or_insert_with(|| TableInfo { sql_name, columns: Vec::new() });
        if let (Some(col), Some(ty)) = (col, ty) {
            t.columns.push((col, ty));
        }
    }
    Ok(out)
}

/// Rows of `COPY ... TO STDOUT` text format: tab-separated, `\N` for NULL, backslash escapes.
fn parse_copy_text(text: &str) -> Vec<Vec<Option<String>>> {
    text.split_terminator('\n')
        .map(|line| {
            line.split('\t')
                .map(|f| {
                    if f == "\\N" {
                        return None;
                    }
                    let mut s = String::with_capacity(f.len());
                    let mut it = f.chars().peekable();
                    while let Some(ch) = it.next() {
                        if ch != '\\' {
                            s.push(ch);
                            continue;
                        }
                        match it.next() {
                            Some('b') => s.push('\u{8}'),
                            Some('f') => s.push('\u{c}'),
                            Some('n') => s.push('\n'),
                            Some('r') => s.push('\r'),
                            Some('t') => s.push('\t'),
                            Some('v') => s.push('\u{b}'),
                            Some(d @ '0'..='7') => {
                                let mut v = d.to_digit(8).unwrap_or(0);
                                for _ in 0..2 {
                                    match it.peek().and_then(|c| c.to_digit(8)) {
                                        Some(x) => {
                                            v = v * 8 + x;
                                            it.next();
                                        }
                                        None => break,
                                    }
                                }
                                s.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                            }
                            Some(other) => s.push(other),
                            None => s.push('\\'),
                        }
                    }
                    Some(s)
                })
                .collect()
        })
        .collect()
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn is_port_clash(msg: &str) -> bool {
    msg.contains("could not bind")
        || msg.contains("Address already in use")
        || msg.contains("could not create any TCP/IP sockets")
}

fn is_transient_restart_failure(msg: &str) -> bool {
    is_port_clash(msg)
        || msg.contains("is still in use")
        || msg.contains("lock file")
        || msg.contains("pre-existing shared memory block")
}

/// A client-side command (psql, pgbench, pg_isready): runs as whoever we are, with no
/// inherited PG* variables steering it elsewhere.
fn client_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    strip_pg_env(&mut cmd);
    cmd.env("PGCONNECT_TIMEOUT", "10");
    cmd
}

fn strip_pg_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
}

/// The directory holding `initdb`, `postgres`, `psql`, `pgbench`, ...
pub fn bin_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_bin_dir().map_err(|e| format!("{e:#}"))).as_deref().map_err(|e| anyhow!("{e}"))
}

fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LOCKSTEP_PG_BIN") {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").exists() {
            bail!("LOCKSTEP_PG_BIN={} has no initdb", dir.display());
        }
        return Ok(dir);
    }
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let bin = e.path().join("bin");
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(version) = name.split('.').map(str::parse::<u32>).collect::<Result<Vec<u32>, _>>() else {
                continue;
            };
            if bin.join("initdb").exists() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }
    if let Some(dir) = which("initdb").and_then(|p| p.parent().map(Path::to_path_buf)) {
        return Ok(dir);
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    if let Ok(out) = out {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    bail!(
        "PostgreSQL server binaries not found (set LOCKSTEP_PG_BIN, or install them: \
         apt-get install postgresql)"
    )
}

/// `name` from the server's bin dir, else from PATH (psql may live only in /usr/bin).
fn tool(bin: &Path, name: &str) -> Result<PathBuf> {
    let p = bin.join(name);
    if p.exists() {
        return Ok(p);
    }
    which(name).ok_or_else(|| anyhow!("{name} not found in {} or PATH", bin.display()))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Where cluster dirs go: the temp dir, unless (as root) [`PG_USER`] could not reach it or the
/// unix socket path would be too long, then `/tmp`.
fn tmp_base(as_root: bool) -> PathBuf {
    let base = std::env::temp_dir();
    let reachable =
        !as_root || base.ancestors().all(|d| d.metadata().is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    // sun_path is 108 bytes: room for "/lockstep-pg-XXXXXX/.s.PGSQL.65535.lock".
    if reachable && base.as_os_str().len() <= 60 {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

/// [`PG_USER`], created on first use (tolerating a concurrent creation by another process).
fn pg_user() -> Result<&'static PgUser> {
    static USER: OnceLock<std::result::Result<PgUser, String>> = OnceLock::new();
    USER.get_or_init(|| ensure_pg_user().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
}

fn ensure_pg_user() -> Result<PgUser> {
    let switch = if let Some(p) = which("setpriv") {
        Switch::Setpriv(p)
    } else if let Some(p) = which("runuser") {
        Switch::Runuser(p)
    } else {
        bail!("running as root, but neither setpriv nor runuser (util-linux) is installed to drop to {PG_USER}");
    };
    if let (Some(uid), Some(gid)) = (id_of("-u"), id_of("-g")) {
        return Ok(PgUser { uid, gid, switch });
    }
    // Concurrent useradds (several test processes at once) were seen to overwrite each other's
    // /etc/passwd here, leaving one process with a uid that no longer exists; so harness
    // processes take turns, with an advisory lock on /etc/passwd itself. useradd replaces the
    // file by rename, but anyone who opened the new file sees the user and does not create it.
    let passwd = std::fs::File::open("/etc/passwd").context("open /etc/passwd")?;
    // SAFETY: flock(2) on a descriptor we own; released when `passwd` is dropped.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&passwd), libc::LOCK_EX) } != 0 {
        bail!("lock /etc/passwd: {}", std::io::Error::last_os_error());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_err = String::new();
    loop {
        if let (Some(uid), Some(gid)) = (id_of("-u"), id_of("-g")) {
            return Ok(PgUser { uid, gid, switch });
        }
        if Instant::now() > deadline {
            bail!("could not create system user {PG_USER}: {last_err}");
        }
        let useradd = which("useradd").ok_or_else(|| anyhow!("useradd not found; create user {PG_USER} by hand"))?;
        let out = Command::new(useradd)
            .args(["--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", PG_USER])
            .output()
            .context("run useradd")?;
        if !out.status.success() {
            // Exit 9: created meanwhile by someone else; 10: /etc/passwd locked by a concurrent useradd.
            last_err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            std::thread::sleep(Duration::from_millis(100 + rand::random::<u64>() % 200));
        }
    }
}

fn id_of(flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, PG_USER]).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_decoding() {
        let rows = parse_copy_text("1\t\\N\ta\\tb\\nc\\\\d\n\t\\101x\n");
        assert_eq!(
            rows,
            vec![vec![Some("1".into()), None, Some("a\tb\nc\\d".into())], vec![Some(String::new()), Some("Ax".into())],]
        );
        assert!(parse_copy_text("").is_empty());
    }
}
