//! The PostgreSQL applier: applies a PostgreSQL source's transactions (`PgTransaction`s, see
//! the "PostgreSQL" section of `replication.proto`) to a standby database, and records how far
//! it got in `lockstep.applied_position` in the same transaction as the changes.
//!
//! # Transactions
//!
//! Changes are applied inside one open standby transaction, begun at the first change after a
//! commit; [`Applier::prepare_commit`] writes the position row and commits it, synchronously.
//! Many small source transactions of one session round thus become one standby transaction;
//! a large source transaction travels as chunks in several journal events and is committed
//! only after its last chunk (`prepare_commit` declines in between). Any error rolls the open
//! transaction back and leaves the applier refusing further work until the next
//! [`Applier::session_start`], so a half-applied event or round is never committed; the agent
//! re-sends from the committed position.
//!
//! # At-least-once source delivery
//!
//! A replication slot may deliver a transaction again. The applier keeps the source LSN up to
//! which everything is applied (`lsn` in the position row): a transaction whose `commit_lsn` is
//! below it is skipped with all its chunks; applying a transaction's last chunk moves it to the
//! transaction's `end_lsn`; a resync sets it to the snapshot's end.
//!
//! # How rows are written
//!
//! The session runs with `session_replication_role = replica`, so triggers and foreign-key
//! checks on the standby behave as under native replication. Inserts and snapshot data arrive
//! as COPY text lines and go through `COPY ... FROM STDIN` unchanged (the fast path); during a
//! resync, tables of built-in types are filled on connections of their own, in parallel, and
//! committed right before the position (see [`copiers`]). Updates
//! and deletes are prepared statements (cached per relation and column set) taking every value
//! as text and casting it in SQL; consecutive ones are pipelined. Rows are found by the replica
//! identity's key columns, or, for identity FULL, by comparing every old column's text form
//! (one row only, even among identical rows). TOAST values the source did not send are left
//! as they are.
//!
//! # Table shapes
//!
//! Every PgRelation is compared with the standby table (once per distinct relation message):
//! missing tables are created, renamed relations renamed, columns added, dropped or retyped.
//! See [`schema`]. User-defined types (PgTypeDef: enums, domains) are created when the standby
//! lacks them, after a check that their definition can do nothing but define the type (see
//! [`sql::type_def`]). Names, type names and defaults from the agent are checked before they go
//! into SQL (see [`sql`]); nothing is written to the `lockstep` or system schemas.
//!
//! The applier is driven from blocking sections of the session; it owns a small
//! current-thread runtime for tokio-postgres and blocks on it.

mod copiers;
mod flush;
mod schema;
mod sql;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use lockstep_common::config::TargetConfig;
use lockstep_common::event::{Change, JournalId, Seq};
use lockstep_common::pgtls::PgConn;
use lockstep_common::proto::{self, pg_op, pg_value, PgRelation, PgTransaction, PgTuple, PgValue};
use tokio::runtime::Runtime;
use tokio_postgres::{Client, Statement};
use tracing::{debug, info, warn};

use self::sql::Match;
use super::{Applier, ApplyError, ApplyOutcome, CommitFn, Position};

/// Connection attempts per (re)connect, with growing pauses between them. The agent retries
/// the whole session with its own backoff after that.
const CONNECT_ATTEMPTS: u32 = 3;
const CONNECT_PAUSE: Duration = Duration::from_millis(200);
/// Most updates and deletes in flight on the connection at once.
const PIPELINE: usize = 512;
/// Most prepared statements kept for table changes.
const MAX_STATEMENTS: usize = 4096;

/// Applies a PostgreSQL source to a standby database.
pub struct PgApplier {
    /// Drives the connection; `None` only while dropping.
    rt: Option<Runtime>,
    st: State,
}

/// A relation as last described by the source.
struct Rel {
    msg: PgRelation,
    /// `"schema"."name"`.
    table: String,
    /// The standby table was made to match `msg` (in a transaction that has not been rolled
    /// back since).
    checked: bool,
}

/// The source transaction whose chunks are being applied (or skipped).
#[derive(Debug)]
struct SourceTx {
    xid: u32,
    commit_lsn: u64,
    next_chunk: u32,
    skip: bool,
    /// Length of [`State::rels_undo`] at the transaction's savepoint.
    undo_mark: usize,
}

/// A resync in progress.
#[derive(Default)]
struct Resync {
    /// Tables (schema, name) seen in this resync: created or emptied once, then filled.
    seen: HashSet<(String, String)>,
    /// The snapshot's end, once its PgSnapshotEnd arrived.
    end_lsn: Option<u64>,
    /// The position row is deleted (before the first table went to a copier).
    position_dropped: bool,
    /// Tables the main connection renamed (from and to) in this resync: never a copier's.
    renamed: HashSet<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum StmtKind {
    Copy,
    /// A multi-row INSERT of this many rows.
    Insert(u32),
    Update(Match),
    Delete(Match),
}

/// A prepared statement for one relation, operation and column set (per column: 1 = set,
/// 2 = used to find the row).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StmtKey {
    rel: u32,
    kind: StmtKind,
    cols: Vec<u8>,
}

/// An update or delete waiting in the pipeline.
struct Queued<'a> {
    stmt: Statement,
    params: Vec<Option<&'a str>>,
    rel: u32,
    what: &'static str,
}

/// The latest logical message passed through (cutover barriers ride on these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastMessage {
    pub prefix: String,
    pub content: Bytes,
    pub lsn: u64,
}

/// Everything but the runtime, so methods can borrow it while the runtime blocks on them.
struct State {
    /// The standby's connection string, with its TLS settings.
    conn: PgConn,
    /// `None` after the connection was found dead; the next session reconnects.
    client: Option<Arc<Client>>,
    /// A transaction's last insert, sent but not yet answered: its answer is awaited with the
    /// commit's, one round trip fewer per small transaction.
    deferred: Option<Deferred>,
    agent: String,
    source: String,
    /// The committed position, as read or written.
    position: Option<Position>,
    /// The position row's lsn.
    committed_lsn: u64,
    /// Source LSN up to which everything is applied (committed or in the open transaction).
    applied_lsn: u64,
    /// A standby transaction is open.
    in_tx: bool,
    /// Something was applied in it (it is opened ahead, right after the previous commit).
    tx_used: bool,
    /// The last change applied was a chunk of this source transaction, not its last.
    source_tx: Option<SourceTx>,
    /// An error rolled the open transaction back; nothing more until the next session.
    failed: bool,
    resync: Option<Resync>,
    rels: HashMap<u32, Rel>,
    /// What [`State::remember_relation`] replaced since the last commit, oldest first (see
    /// [`State::rolled_back`]).
    rels_undo: Vec<(u32, Option<Rel>)>,
    stmts: HashMap<StmtKey, Statement>,
    upsert: Option<Statement>,
    emit: Option<Statement>,
    /// The standby role may call pg_logical_emit_message.
    can_emit: bool,
    last_message: Option<LastMessage>,
    /// User-defined types (schema, name) known to exist on the standby.
    types: HashSet<(String, String)>,
    /// Per enum type: the source's labels last made present on the standby.
    enum_labels: HashMap<(String, String), Vec<String>>,
    /// Makes asynchronously committed rounds durable (see [`flush`]).
    flusher: flush::Flusher,
    /// Fill tables in parallel during a resync (see [`copiers`]).
    copiers: copiers::Copiers,
    /// Updates and deletes of the current event that found no row.
    missing: usize,
    first_missing: Option<String>,
    /// Something of the current event was skipped on purpose (reported as its outcome).
    skipped: Option<String>,
}

/// A statement sent to the standby whose answer is collected later.
struct Deferred {
    reply: Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>,
    what: String,
}

impl Deferred {
    /// Waits for the answer of `d`, if any.
    async fn answer(d: Option<Deferred>) -> Result<(), ApplyError> {
        match d {
            Some(d) => d.reply.await.map(drop).map_err(db_err(d.what)),
            None => Ok(()),
        }
    }
}

fn connection_lost() -> ApplyError {
    target_err("standby connection", "lost earlier; the next session reconnects")
}

/// An apply error for a failure of the standby (connection, SQL): the agent retries.
pub(crate) fn target_err(context: impl Into<String>, msg: impl Into<String>) -> ApplyError {
    ApplyError::Io { context: context.into(), error: std::io::Error::other(msg.into()) }
}

/// Turns a tokio-postgres error into an apply error under `context`, with the server's
/// message, detail, hint and table.
pub(crate) fn db_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
    let context = context.into();
    move |e| target_err(context, describe(&e))
}

fn describe(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return if e.is_closed() { "connection to the standby closed".into() } else { e.to_string() };
    };
    let mut s = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    if let (Some(schema), Some(table)) = (db.schema(), db.table()) {
        s.push_str(&format!("; table {}", sql::qualified(schema, table)));
    }
    if let Some(c) = db.constraint() {
        s.push_str(&format!("; constraint {}", sql::ident(c)));
    }
    if let Some(d) = db.detail() {
        s.push_str("; ");
        s.push_str(d);
    }
    if let Some(h) = db.hint() {
        s.push_str("; hint: ");
        s.push_str(h);
    }
    if let Some(w) = db.where_() {
        let w: String = w.chars().take(300).collect();
        s.push_str("; at: ");
        s.push_str(&w);
    }
    s
}

fn refused(msg: impl Into<String>) -> ApplyError {
    ApplyError::Refused(msg.into())
}

/// A column value of a tuple.
enum Val<'a> {
    Text(&'a str),
    Null,
    Unchanged,
}

/// Appends the sent values of `tuple` (not the unchanged TOASTed ones) to `params`, marking
/// their columns with `bit`; returns how many.
fn push_values<'a>(
    tuple: &'a PgTuple,
    rel: &PgRelation,
    bit: u8,
    cols: &mut [u8],
    params: &mut Vec<Option<&'a str>>,
) -> Result<usize, ApplyError> {
    let before = params.len();
    for (i, v) in tuple.values.iter().enumerate() {
        match value(v, rel, i)? {
            Val::Text(s) => params.push(Some(s)),
            Val::Null => params.push(None),
            Val::Unchanged => continue,
        }
        cols[i] |= bit;
    }
    Ok(params.len() - before)
}

fn value<'a>(v: &'a PgValue, rel: &PgRelation, col: usize) -> Result<Val<'a>, ApplyError> {
    let name = || format!("{}.{}.{}", rel.schema, rel.name, rel.columns[col].name);
    match &v.value {
        Some(pg_value::Value::Text(b)) => std::str::from_utf8(b)
            .map(Val::Text)
            .map_err(|_| refused(format!("value of column {} is not valid UTF-8", name()))),
        Some(pg_value::Value::Null(_)) => Ok(Val::Null),
        Some(pg_value::Value::Unchanged(_)) => Ok(Val::Unchanged),
        None => Err(refused(format!("value of column {} is neither text, null nor unchanged", name()))),
    }
}

fn check_width(t: &PgTuple, rel: &PgRelation) -> Result<(), ApplyError> {
    if t.values.len() != rel.columns.len() {
        return Err(refused(format!(
            "a row of {}.{} has {} values but the relation has {} columns",
            rel.schema,
            rel.name,
            t.values.len(),
            rel.columns.len()
        )));
    }
    Ok(())
}

/// How to find the row an update or delete is about: the matching mode, the columns compared
/// and their values. Appends to `cols` (role 2) and `params`.
fn find_row<'a>(
    rel: &PgRelation,
    old: Option<&'a PgTuple>,
    old_is_key: bool,
    new: Option<&'a PgTuple>,
    cols: &mut [u8],
    params: &mut Vec<Option<&'a str>>,
) -> Result<Match, ApplyError> {
    if let (true, Some(old), false) = (rel.replica_identity == "f", old, old_is_key) {
        check_width(old, rel)?;
        if push_values(old, rel, 2, cols, params)? == 0 {
            return Err(refused(format!("the old row of {}.{} has no values to find it by", rel.schema, rel.name)));
        }
        return Ok(Match::Full);
    }
    let keys: Vec<usize> = rel.columns.iter().enumerate().filter(|(_, c)| c.key).map(|(i, _)| i).collect();
    if keys.is_empty() {
        return Err(refused(format!(
            "{}.{} has no key columns and the change carries no full old row to find the row by \
             (give the source table a primary key or REPLICA IDENTITY FULL)",
            rel.schema, rel.name
        )));
    }
    let src = old
        .or(new)
        .ok_or_else(|| refused(format!("a change of {}.{} carries no row to find by", rel.schema, rel.name)))?;
    check_width(src, rel)?;
    for k in keys {
        match value(&src.values[k], rel, k)? {
            Val::Text(s) => params.push(Some(s)),
            Val::Null => params.push(None),
            Val::Unchanged => {
                return Err(refused(format!(
                    "key column {} of {}.{} is marked unchanged",
                    rel.columns[k].name, rel.schema, rel.name
                )))
            }
        }
        cols[k] |= 2;
    }
    Ok(Match::Key)
}

/// Runs the queued statements pipelined (each one's request is sent on its first poll, in
/// order, before any answer is awaited) and returns their row counts in order.
async fn run_pipelined(client: &Client, queue: &[Queued<'_>]) -> Vec<Result<u64, tokio_postgres::Error>> {
    type Exec<'f> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + 'f>>;
    let mut futs: Vec<Exec<'_>> =
        queue.iter().map(|q| Box::pin(client.execute_raw(&q.stmt, q.params.iter())) as Exec<'_>).collect();
    let mut results: Vec<Option<Result<u64, tokio_postgres::Error>>> = Vec::with_capacity(futs.len());
    for f in futs.iter_mut() {
        results.push(match futures::poll!(f.as_mut()) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        });
    }
    let mut out = Vec::with_capacity(futs.len());
    for (f, r) in futs.iter_mut().zip(results) {
        out.push(match r {
            Some(r) => r,
            None => f.await,
        });
    }
    out
}

impl PgApplier {
    /// Connects to the standby named by the target's `dsn` (libpq key/value or URL form),
    /// prepares the session and the position table, and reads the committed position.
    pub fn open(cfg: &TargetConfig) -> Result<PgApplier, ApplyError> {
        let ctx = || format!("open PostgreSQL target for {}/{}", cfg.agent, cfg.source);
        let dsn = cfg.dsn.as_deref().ok_or_else(|| target_err(ctx(), "the target has no dsn"))?;
        let mut conn = PgConn::parse(dsn).map_err(|e| target_err(ctx(), format!("invalid dsn: {e}")))?;
        let config = &mut conn.config;
        if config.get_application_name().is_none() {
            config.application_name("lockstep-receiver");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // A standby that vanishes from the network must turn into an error, not a hang.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(60));
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(Duration::from_secs(30));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ApplyError::Io { context: ctx(), error: e })?;
        let mut st = State {
            conn: conn.clone(),
            client: None,
            agent: cfg.agent.clone(),
            source: cfg.source.clone(),
            position: None,
            committed_lsn: 0,
            applied_lsn: 0,
            in_tx: false,
            tx_used: false,
            source_tx: None,
            failed: false,
            resync: None,
            rels: HashMap::new(),
            rels_undo: Vec::new(),
            stmts: HashMap::new(),
            upsert: None,
            emit: None,
            can_emit: false,
            last_message: None,
            types: HashSet::new(),
            enum_labels: HashMap::new(),
            flusher: flush::Flusher::new(conn.clone(), cfg.agent.clone(), cfg.source.clone())?,
            copiers: copiers::Copiers::new(conn.clone(), (cfg.agent.clone(), cfg.source.clone())),
            deferred: None,
            missing: 0,
            first_missing: None,
            skipped: None,
        };
        rt.block_on(st.connect())?;
        Ok(PgApplier { rt: Some(rt), st })
    }

    /// The source LSN up to which the standby holds everything (committed or not).
    pub fn applied_lsn(&self) -> u64 {
        self.st.applied_lsn
    }

    /// The latest logical message passed through.
    pub fn last_message(&self) -> Option<&LastMessage> {
        self.st.last_message.as_ref()
    }
}

impl Drop for PgApplier {
    fn drop(&mut self) {
        self.st.stmts.clear();
        self.st.upsert = None;
        self.st.emit = None;
        self.st.client = None;
        // May run on an async thread (a session dropping a failed applier): never block here.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The standby's address, database and role, for messages.
fn describe_server(conn: &PgConn) -> String {
    let hosts: Vec<String> = conn
        .config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = conn.config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "PostgreSQL {}:{port}/{} as {}",
        hosts.join(","),
        conn.config.get_dbname().unwrap_or("(default)"),
        conn.config.get_user().unwrap_or("(default)")
    )
}

/// Connects to the standby (the connection driven by a task on the current runtime) and sets
/// the session up for applying: `session_replication_role = replica`, the source's text forms.
async fn open_session(conn: &PgConn) -> Result<Client, ApplyError> {
    let ctx = || format!("connect to {}", describe_server(conn));
    let (client, connection) = conn.connect().await.map_err(db_err(ctx()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "standby connection ended");
        }
    });
    client.batch_execute("SET session_replication_role = replica").await.map_err(|e| {
        target_err(
            ctx(),
            format!(
                "cannot SET session_replication_role = replica ({}); the receiver's role must be a superuser \
                     or hold GRANT SET ON PARAMETER session_replication_role",
                describe(&e)
            ),
        )
    })?;
    // Values arrive in the source's text forms; parse them the way they were written.
    client
        .batch_execute(
            "SET synchronous_commit = on; SET datestyle = 'ISO, MDY'; SET intervalstyle = 'postgres'; \
             SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0",
        )
        .await
        .map_err(db_err(ctx()))?;
    Ok(client)
}

impl State {
    fn client(&self) -> Result<&Client, ApplyError> {
        self.client.as_deref().ok_or_else(connection_lost)
    }

    /// The connection, for a request that outlives this borrow (see [`Deferred`]).
    fn shared_client(&self) -> Result<Arc<Client>, ApplyError> {
        self.client.clone().ok_or_else(connection_lost)
    }

    fn where_(&self) -> String {
        describe_server(&self.conn)
    }

    /// (Re)connects with a few quick retries, prepares the session and reads the position.
    async fn connect(&mut self) -> Result<(), ApplyError> {
        self.forget_statements();
        self.upsert = None;
        self.emit = None;
        self.client = None;
        let mut pause = CONNECT_PAUSE;
        let mut attempt = 1;
        let client = loop {
            match self.connect_once().await {
                Ok(c) => break c,
                Err(e) if attempt < CONNECT_ATTEMPTS => {
                    warn!(target_db = %self.where_(), error = %e, attempt, "cannot connect to the standby; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        self.can_emit = client
            .query_one(
                "SELECT pg_catalog.has_function_privilege('pg_catalog.pg_logical_emit_message(boolean, text, bytea)', 'EXECUTE')",
                &[],
            )
            .await
            .map_err(db_err("check privileges on the standby"))?
            .get(0);
        if !self.can_emit {
            warn!(target_db = %self.where_(), "the standby role may not call pg_logical_emit_message; logical messages are not passed through");
        }
        self.client = Some(Arc::new(client));
        self.read_position().await?;
        info!(target_db = %self.where_(), position = ?self.position, lsn = self.committed_lsn, "connected to the standby");
        Ok(())
    }

    async fn connect_once(&self) -> Result<Client, ApplyError> {
        let ctx = || format!("connect to {}", self.where_());
        let client = open_session(&self.conn).await?;
        let exists: bool = client
            .query_one("SELECT pg_catalog.to_regclass('lockstep.applied_position') IS NOT NULL", &[])
            .await
            .map_err(db_err(ctx()))?
            .get(0);
        if !exists {
            client
                .batch_execute(
                    "CREATE SCHEMA IF NOT EXISTS lockstep; \
                     CREATE TABLE IF NOT EXISTS lockstep.applied_position ( \
                       agent text, source text, journal_id text NOT NULL, seq bigint NOT NULL, \
                       lsn bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), \
                       PRIMARY KEY (agent, source))",
                )
                .await
                .map_err(db_err("create lockstep.applied_position on the standby"))?;
        }
        let columns_known: bool = client
            .query_one("SELECT pg_catalog.to_regclass('lockstep.flush_barrier') IS NOT NULL", &[])
            .await
            .map_err(db_err(ctx()))?
            .get(0);
        if !columns_known {
            // Which source relation each standby table holds and which source attribute each
            // of its columns (see `schema`), and the flush barrier's row (see `flush`); added
            // in 0.4.0, so standbys set up before get them here.
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS lockstep.source_columns ( \
                       relid oid NOT NULL, attname text NOT NULL, src_attnum smallint NOT NULL, \
                       PRIMARY KEY (relid, attname)); \
                     CREATE TABLE IF NOT EXISTS lockstep.source_tables ( \
                       agent text NOT NULL, source text NOT NULL, src_relid oid NOT NULL, relid oid NOT NULL, \
                       PRIMARY KEY (agent, source, src_relid)); \
                     CREATE TABLE IF NOT EXISTS lockstep.flush_barrier ( \
                       agent text NOT NULL, source text NOT NULL, n bigint NOT NULL, PRIMARY KEY (agent, source))",
                )
                .await
                .map_err(db_err("create lockstep's bookkeeping tables on the standby"))?;
        }
        Ok(client)
    }

    async fn read_position(&mut self) -> Result<(), ApplyError> {
        let row = self
            .client()?
            .query_opt(
                "SELECT journal_id, seq, lsn FROM lockstep.applied_position WHERE agent = $1 AND source = $2",
                &[&self.agent, &self.source],
            )
            .await
            .map_err(db_err("read lockstep.applied_position"))?;
        let (position, lsn) = match row {
            None => (None, 0),
            Some(r) => {
                let id: String = r.get(0);
                let seq: i64 = r.get(1);
                let lsn: i64 = r.get(2);
                let journal_id = parse_journal_id(&id).ok_or_else(|| {
                    target_err(
                        "read lockstep.applied_position",
                        format!(
                            "journal_id {id:?} of {}/{} is not 32 hex digits; fix or delete the row (deleting it resyncs the target)",
                            self.agent, self.source
                        ),
                    )
                })?;
                (Some(Position { journal_id, seq: Seq(seq as u64) }), lsn as u64)
            }
        };
        self.position = position;
        self.committed_lsn = lsn;
        self.applied_lsn = lsn;
        Ok(())
    }

    /// After a rollback to when [`State::rels_undo`] held `mark` entries: the rollback also
    /// undid the standby DDL (added, dropped, retyped or renamed columns and tables) done
    /// since, so the relation cache goes back too, and every table is checked again.
    fn rolled_back(&mut self, mark: usize) {
        for (id, before) in self.rels_undo.drain(mark..).rev() {
            match before {
                Some(rel) => self.rels.insert(id, rel),
                None => self.rels.remove(&id),
            };
        }
        self.forget_statements();
    }

    fn forget_statements(&mut self) {
        self.stmts.clear();
        self.types.clear();
        for r in self.rels.values_mut() {
            r.checked = false;
        }
    }

    /// Rolls back whatever is open and forgets the state of it (prepared table statements and
    /// table checks too: the rollback may have undone DDL). A connection that fails the
    /// rollback is dropped.
    async fn discard(&mut self) {
        // Its answer, if any, is dropped with the transaction.
        self.deferred = None;
        if let Some(c) = &self.client {
            if c.is_closed() || (self.in_tx && c.batch_execute("ROLLBACK").await.is_err()) {
                self.client = None;
            }
        }
        self.in_tx = false;
        self.tx_used = false;
        self.source_tx = None;
        self.resync = None;
        self.copiers.reset(false);
        self.applied_lsn = self.committed_lsn;
        self.rolled_back(0);
    }

    async fn fail(&mut self, e: ApplyError) -> ApplyError {
        self.copiers.reset(true);
        self.discard().await;
        self.failed = true;
        e
    }

    fn check_usable(&self) -> Result<(), ApplyError> {
        if self.failed {
            return Err(target_err(
                "PostgreSQL target",
                "an earlier error rolled back this session's uncommitted work; waiting for the agent to reconnect",
            ));
        }
        Ok(())
    }

    async fn begin(&mut self) -> Result<(), ApplyError> {
        if !self.in_tx {
            self.client()?.batch_execute("BEGIN").await.map_err(db_err("begin a standby transaction"))?;
            self.in_tx = true;
        }
        self.tx_used = true;
        Ok(())
    }

    async fn session_start(&mut self) -> Result<(), ApplyError> {
        self.discard().await;
        self.failed = false;
        if self.client.is_some() {
            match self.read_position().await {
                Ok(()) => return self.position_durable().await,
                Err(e) => {
                    info!(error = %e, "standby connection unusable; reconnecting");
                    self.client = None;
                }
            }
        }
        self.connect().await?;
        self.position_durable().await
    }

    /// Waits until the position just read is durable: it may come from a commit whose flush
    /// barrier never ran (a receiver killed right after the commit), and acknowledgements
    /// report it as stored.
    async fn position_durable(&mut self) -> Result<(), ApplyError> {
        self.flusher.barrier_now(self.position.map(|p| p.seq.0)).await
    }

    /// Dedupe and chunk bookkeeping for a journal event: whether to apply it. A transaction
    /// that begins while another is still open means the agent restarted part-way through
    /// journaling the open one (it is journaled again in full later, or is this one): the
    /// open one's chunks are rolled back to its savepoint.
    async fn track(&mut self, tx: &PgTransaction) -> Result<bool, ApplyError> {
        if tx.chunk == 0 {
            if let Some(cur) = self.source_tx.take() {
                warn!(
                    xid = cur.xid,
                    commit_lsn = cur.commit_lsn,
                    chunks = cur.next_chunk,
                    "transaction cut off by an agent restart; discarding its chunks (it is sent again in full)"
                );
                if !cur.skip {
                    self.client()?
                        .batch_execute("ROLLBACK TO SAVEPOINT lockstep_tx; RELEASE SAVEPOINT lockstep_tx")
                        .await
                        .map_err(db_err("roll back a cut-off transaction"))?;
                    self.rolled_back(cur.undo_mark);
                }
            }
            let skip = tx.commit_lsn < self.applied_lsn;
            if skip {
                debug!(
                    xid = tx.xid,
                    commit_lsn = tx.commit_lsn,
                    applied_lsn = self.applied_lsn,
                    "transaction already applied; skipped"
                );
            }
            if !tx.last {
                let undo_mark = self.rels_undo.len();
                if !skip {
                    self.begin().await?;
                    self.client()?
                        .batch_execute("SAVEPOINT lockstep_tx")
                        .await
                        .map_err(db_err("start a chunked transaction"))?;
                }
                self.source_tx =
                    Some(SourceTx { xid: tx.xid, commit_lsn: tx.commit_lsn, next_chunk: 1, skip, undo_mark });
            }
            return Ok(!skip);
        }
        match &mut self.source_tx {
            Some(cur) if cur.xid == tx.xid && cur.commit_lsn == tx.commit_lsn && cur.next_chunk == tx.chunk => {
                let skip = cur.skip;
                if tx.last {
                    self.source_tx = None;
                    if !skip {
                        self.client()?
                            .batch_execute("RELEASE SAVEPOINT lockstep_tx")
                            .await
                            .map_err(db_err("finish a chunked transaction"))?;
                    }
                } else {
                    cur.next_chunk += 1;
                }
                Ok(!skip)
            }
            // The tail of a transaction applied before.
            None if tx.commit_lsn < self.applied_lsn => Ok(false),
            _ => Err(refused(format!(
                "chunk {} of transaction {} (commit LSN {}) arrived out of sequence",
                tx.chunk, tx.xid, tx.commit_lsn
            ))),
        }
    }

    async fn apply(&mut self, seq: Seq, change: Change) -> Result<ApplyOutcome, ApplyError> {
        self.check_usable()?;
        match self.apply_inner(seq, change).await {
            Ok(o) => Ok(o),
            Err(e) => Err(self.fail(e).await),
        }
    }

    async fn apply_inner(&mut self, seq: Seq, change: Change) -> Result<ApplyOutcome, ApplyError> {
        self.settle().await?;
        let tx = match change {
            Change::Other(proto::change_event::Change::Pg(tx)) => tx,
            _ => return Err(refused("a PostgreSQL target accepts only PostgreSQL changes")),
        };
        let snapshot = seq == Seq::ZERO;
        if snapshot && self.resync.is_none() {
            return Err(refused("snapshot entry outside a resync"));
        }
        if !snapshot && !self.track(&tx).await? {
            return Ok(ApplyOutcome::default());
        }
        if snapshot && self.hand_to_copier(&tx).await? {
            return Ok(ApplyOutcome::default());
        }
        if !tx.ops.is_empty() {
            self.begin().await?;
        }
        self.missing = 0;
        self.first_missing = None;
        self.skipped = None;
        self.apply_ops(&tx).await?;
        if !snapshot && tx.last {
            self.applied_lsn = self.applied_lsn.max(tx.end_lsn);
        }
        let mut outcome = ApplyOutcome { skipped: self.skipped.take(), ..Default::default() };
        if self.missing > 0 {
            outcome.skipped = Some(format!(
                "{} update(s)/delete(s) found no row on the standby (first in {}); the standby differs from the source",
                self.missing,
                self.first_missing.take().unwrap_or_default()
            ));
        }
        Ok(outcome)
    }

    async fn apply_ops<'a>(&mut self, tx: &'a PgTransaction) -> Result<(), ApplyError> {
        let mut queue: Vec<Queued<'a>> = Vec::new();
        for (n, op) in tx.ops.iter().enumerate() {
            let Some(op) = &op.op else {
                return Err(refused("a PostgreSQL change op without content"));
            };
            match op {
                pg_op::Op::Update(u) => {
                    if let Some(q) = self.queue_update(u).await? {
                        queue.push(q);
                    }
                }
                pg_op::Op::Delete(d) => {
                    let q = self.queue_delete(d).await?;
                    queue.push(q);
                }
                other => {
                    self.flush(&mut queue).await?;
                    match other {
                        pg_op::Op::Relation(r) => self.relation(r).await?,
                        pg_op::Op::Insert(i) => {
                            // The transaction's last statement may be answered with its commit.
                            let last = tx.last && n + 1 == tx.ops.len() && self.resync.is_none();
                            self.insert(i, last).await?
                        }
                        pg_op::Op::Truncate(t) => self.truncate(t).await?,
                        pg_op::Op::Message(m) => self.message(m).await?,
                        pg_op::Op::TypeDef(t) => self.type_def(t).await?,
                        pg_op::Op::Copy(c) => {
                            let Some(rs) = &self.resync else {
                                return Err(refused("snapshot COPY data outside a resync"));
                            };
                            let rel = self.rels.get(&c.rel).ok_or_else(|| {
                                refused(format!(
                                    "snapshot COPY data for relation {}, which no PgRelation described",
                                    c.rel
                                ))
                            })?;
                            self.not_a_copier_table(&rel.msg.schema, &rel.msg.name)?;
                            if !rs.seen.contains(&(rel.msg.schema.clone(), rel.msg.name.clone())) {
                                return Err(refused(format!(
                                    "snapshot COPY data for {} before its PgRelation in this resync",
                                    rel.table
                                )));
                            }
                            self.copy(c.rel, &c.data, None, "copy snapshot data into").await?;
                        }
                        pg_op::Op::SnapshotEnd(e) => {
                            let Some(rs) = &mut self.resync else {
                                return Err(refused("snapshot end outside a resync"));
                            };
                            rs.end_lsn = Some(e.lsn);
                        }
                        pg_op::Op::Update(_) | pg_op::Op::Delete(_) => unreachable!("handled above"),
                    }
                }
            }
            if queue.len() >= PIPELINE {
                self.flush(&mut queue).await?;
            }
        }
        self.flush(&mut queue).await
    }

    /// Hands a snapshot piece (its table's relation and COPY data) to a copier when its table
    /// is, or can be, filled by one (see [`copiers`]); false: it is applied here.
    async fn hand_to_copier(&mut self, tx: &PgTransaction) -> Result<bool, ApplyError> {
        let ops: Vec<&pg_op::Op> = tx.ops.iter().filter_map(|o| o.op.as_ref()).collect();
        let (rel, data) = match ops.as_slice() {
            [pg_op::Op::Relation(r)] => (r, None),
            [pg_op::Op::Relation(r), pg_op::Op::Copy(c)] if c.rel == r.id => (r, Some(&c.data)),
            _ => return Ok(false),
        };
        let Some(rs) = &mut self.resync else { return Ok(false) };
        if !self.copiers.has(&rel.schema, &rel.name) {
            let key = (rel.schema.clone(), rel.name.clone());
            if rs.seen.contains(&key) {
                return Ok(false);
            }
            sql::check_relation(rel).map_err(ApplyError::Refused)?;
            // A relation renamed since it was last seen, or a table whose name another relation
            // had (dropped and created again, or renamed away), is handled here, on the main
            // connection: renames touch two tables.
            let renamed = rs.renamed.contains(&key)
                || self.rels.iter().any(|(id, c)| {
                    (*id == rel.id && (c.msg.schema != rel.schema || c.msg.name != rel.name))
                        || (*id != rel.id && c.msg.schema == rel.schema && c.msg.name == rel.name)
                });
            if renamed || !self.copiers.eligible(rel) {
                return Ok(false);
            }
            if !rs.position_dropped && !self.drop_position().await? {
                return Ok(false);
            }
            if !self.copiers.take(rel).await? {
                return Ok(false);
            }
            let Some(rs) = &mut self.resync else { return Ok(false) };
            rs.seen.insert(key);
            // The main connection checks the table again after the resync.
            self.remember_relation(rel, false);
        }
        if let Some(data) = data.filter(|d| !d.is_empty()) {
            self.copiers.copy(&rel.schema, &rel.name, data.clone()).await?;
        }
        Ok(true)
    }

    /// Before the first table of a resync goes to a copier: deletes the position row, committed
    /// on a connection of its own, so that no crash or failure between the copiers' commits and
    /// the main one can leave their tables under the old position (see [`copiers`]); and makes
    /// the main transaction's lock waits end (a copier may hold a lock until the resync ends).
    /// False when the row cannot be deleted (no connection to spare, no DELETE privilege):
    /// then copiers are off and every table is filled on the main connection.
    async fn drop_position(&mut self) -> Result<bool, ApplyError> {
        let deleted = async {
            let client = open_session(&self.conn).await?;
            client
                .batch_execute(&format!("SET lock_timeout = '{}'", copiers::LOCK_TIMEOUT))
                .await
                .map_err(db_err("limit lock waits"))?;
            client
                .execute(
                    "DELETE FROM lockstep.applied_position WHERE agent = $1 AND source = $2",
                    &[&self.agent, &self.source],
                )
                .await
                .map_err(db_err("delete the position row before a parallel resync"))
        }
        .await;
        if let Err(e) = deleted {
            warn!(error = %e, "cannot fill tables in parallel; filling them one at a time");
            self.copiers.turn_off();
            return Ok(false);
        }
        self.client()?
            .batch_execute(&format!("SET LOCAL lock_timeout = '{}'", copiers::LOCK_TIMEOUT))
            .await
            .map_err(db_err("limit lock waits during a parallel resync"))?;
        self.position = None;
        if let Some(rs) = &mut self.resync {
            rs.position_dropped = true;
        }
        Ok(true)
    }

    /// Refuses work on the main connection for a table a copier fills (it would wait for the
    /// copier's locks, and the copier for the resync's end).
    fn not_a_copier_table(&self, schema: &str, name: &str) -> Result<(), ApplyError> {
        if self.copiers.has(schema, name) {
            return Err(refused(format!(
                "snapshot piece for {} in a form other than relation plus COPY data",
                sql::qualified(schema, name)
            )));
        }
        Ok(())
    }

    /// Makes sure relation `id` is known and its standby table checked.
    async fn rel_ready(&mut self, id: u32) -> Result<&Rel, ApplyError> {
        let Some(rel) = self.rels.get(&id) else {
            return Err(refused(format!("change for relation {id}, which no PgRelation described")));
        };
        if !rel.checked {
            let msg = rel.msg.clone();
            schema::ensure_table(self.client()?, (&self.agent, &self.source), &msg, None, false).await?;
            self.stmts.retain(|k, _| k.rel != id);
            if let Some(r) = self.rels.get_mut(&id) {
                r.checked = true;
            }
        }
        Ok(&self.rels[&id])
    }

    async fn relation(&mut self, r: &PgRelation) -> Result<(), ApplyError> {
        sql::check_relation(r).map_err(ApplyError::Refused)?;
        self.not_a_copier_table(&r.schema, &r.name)?;
        let first_in_resync = match &mut self.resync {
            Some(rs) => rs.seen.insert((r.schema.clone(), r.name.clone())),
            None => false,
        };
        let cached = self.rels.get(&r.id);
        if !first_in_resync && cached.is_some_and(|c| c.checked && c.msg == *r) {
            return Ok(());
        }
        let previous =
            cached.map(|c| (c.msg.schema.clone(), c.msg.name.clone())).filter(|(s, n)| *s != r.schema || *n != r.name);
        if let Some((s, n)) = &previous {
            self.not_a_copier_table(s, n)?;
            if let Some(rs) = &mut self.resync {
                rs.renamed.insert((s.clone(), n.clone()));
                rs.renamed.insert((r.schema.clone(), r.name.clone()));
            }
        }
        schema::ensure_table(
            self.client()?,
            (&self.agent, &self.source),
            r,
            previous.as_ref().map(|(s, n)| (s.as_str(), n.as_str())),
            first_in_resync,
        )
        .await?;
        self.remember_relation(r, true);
        Ok(())
    }

    /// Caches relation `r` (`checked`: its standby table matches it). Other relation ids naming
    /// the same table (dropped and recreated on the source) may hold statements for its old
    /// shape: they are checked again before use.
    fn remember_relation(&mut self, r: &PgRelation, checked: bool) {
        let mut stale: HashSet<u32> = HashSet::from([r.id]);
        for (id, c) in self.rels.iter_mut() {
            if c.msg.schema == r.schema && c.msg.name == r.name {
                c.checked = false;
                stale.insert(*id);
            }
        }
        self.stmts.retain(|k, _| !stale.contains(&k.rel));
        let before = self.rels.insert(r.id, Rel { msg: r.clone(), table: sql::qualified(&r.schema, &r.name), checked });
        self.rels_undo.push((r.id, before));
    }

    async fn statement(
        &mut self,
        key: StmtKey,
        sql: impl FnOnce(&PgRelation) -> String,
    ) -> Result<Statement, ApplyError> {
        if let Some(s) = self.stmts.get(&key) {
            return Ok(s.clone());
        }
        let rel = &self.rels[&key.rel];
        let text = sql(&rel.msg);
        let stmt = self
            .client()?
            .prepare(&text)
            .await
            .map_err(db_err(format!("prepare a statement for {} ({text})", rel.table)))?;
        if self.stmts.len() >= MAX_STATEMENTS {
            // Many column combinations (unchanged TOAST values vary): start over.
            self.stmts.clear();
        }
        self.stmts.insert(key, stmt.clone());
        Ok(stmt)
    }

    async fn copy(&mut self, id: u32, data: &Bytes, count: Option<u32>, what: &str) -> Result<(), ApplyError> {
        let table = self.rel_ready(id).await?.table.clone();
        if data.is_empty() {
            return Ok(());
        }
        let stmt = self.statement(StmtKey { rel: id, kind: StmtKind::Copy, cols: Vec::new() }, sql::copy_in).await?;
        let ctx = || format!("{what} {table}");
        let sink = self.client()?.copy_in::<_, Bytes>(&stmt).await.map_err(db_err(ctx()))?;
        futures::pin_mut!(sink);
        sink.send(data.clone()).await.map_err(db_err(ctx()))?;
        let rows = sink.as_mut().finish().await.map_err(db_err(ctx()))?;
        if let Some(n) = count.filter(|&n| n != 0 && u64::from(n) != rows) {
            return Err(refused(format!("an insert into {table} says {n} rows but its data holds {rows}")));
        }
        Ok(())
    }

    /// Most rows inserted with one INSERT statement; more go through COPY.
    const INSERT_ROWS: u32 = 4;

    /// Inserts the rows of `i`. A few rows: one INSERT (one round trip); more: COPY (two, but
    /// cheaper per row). With `defer`, a few rows are only sent: their answer is collected by
    /// [`State::settle`] or with the commit.
    async fn insert(&mut self, i: &proto::PgInsert, defer: bool) -> Result<(), ApplyError> {
        if (1..=Self::INSERT_ROWS).contains(&i.count) {
            let width = self.rel_ready(i.rel).await?.msg.columns.len();
            if let Some(rows) = sql::parse_copy_rows(&i.rows, width).filter(|r| r.len() == i.count as usize) {
                let n = i.count;
                let stmt = self
                    .statement(StmtKey { rel: i.rel, kind: StmtKind::Insert(n), cols: Vec::new() }, |r| {
                        sql::insert(r, n as usize)
                    })
                    .await?;
                let table = self.rels.get(&i.rel).map(|r| r.table.clone()).unwrap_or_default();
                let what = format!("insert into {table}");
                if defer {
                    let client = self.shared_client()?;
                    let params: Vec<Option<String>> = rows.into_iter().flatten().collect();
                    let mut reply: Pin<Box<dyn Future<Output = _> + Send>> =
                        Box::pin(async move { client.execute_raw(&stmt, params.iter().map(|v| v.as_deref())).await });
                    // The first poll queues the request on the connection, ahead of anything
                    // sent after it.
                    match futures::poll!(reply.as_mut()) {
                        Poll::Ready(r) => {
                            r.map_err(db_err(what))?;
                        }
                        Poll::Pending => self.deferred = Some(Deferred { reply, what }),
                    }
                    return Ok(());
                }
                let params: Vec<Option<&str>> = rows.iter().flatten().map(|v| v.as_deref()).collect();
                self.client()?.execute_raw(&stmt, params.iter()).await.map_err(db_err(what))?;
                return Ok(());
            }
        }
        self.copy(i.rel, &i.rows, Some(i.count), "insert into").await
    }

    /// Waits for the answer of a deferred statement.
    async fn settle(&mut self) -> Result<(), ApplyError> {
        Deferred::answer(self.deferred.take()).await
    }

    async fn queue_update<'a>(&mut self, u: &'a proto::PgUpdate) -> Result<Option<Queued<'a>>, ApplyError> {
        let rel = &self.rel_ready(u.rel).await?.msg;
        let new = u
            .new
            .as_ref()
            .ok_or_else(|| refused(format!("an update of {}.{} without a new row", rel.schema, rel.name)))?;
        check_width(new, rel)?;
        let mut cols = vec![0u8; rel.columns.len()];
        let mut params = Vec::with_capacity(rel.columns.len() + 2);
        // TOASTed values not sent are skipped: the standby keeps its value.
        if push_values(new, rel, 1, &mut cols, &mut params)? == 0 {
            return Ok(None);
        }
        let how = find_row(rel, u.old.as_ref(), u.old_is_key, Some(new), &mut cols, &mut params)?;
        let set: Vec<usize> = (0..cols.len()).filter(|&i| cols[i] & 1 != 0).collect();
        let by: Vec<usize> = (0..cols.len()).filter(|&i| cols[i] & 2 != 0).collect();
        let key = StmtKey { rel: u.rel, kind: StmtKind::Update(how), cols };
        let stmt = self.statement(key, |r| sql::update(r, &set, &by, how)).await?;
        Ok(Some(Queued { stmt, params, rel: u.rel, what: "update" }))
    }

    async fn queue_delete<'a>(&mut self, d: &'a proto::PgDelete) -> Result<Queued<'a>, ApplyError> {
        let rel = &self.rel_ready(d.rel).await?.msg;
        let old = d
            .old
            .as_ref()
            .ok_or_else(|| refused(format!("a delete from {}.{} without its old row", rel.schema, rel.name)))?;
        let mut cols = vec![0u8; rel.columns.len()];
        let mut params = Vec::with_capacity(rel.columns.len());
        let how = find_row(rel, Some(old), d.old_is_key, None, &mut cols, &mut params)?;
        let by: Vec<usize> = (0..cols.len()).filter(|&i| cols[i] & 2 != 0).collect();
        let key = StmtKey { rel: d.rel, kind: StmtKind::Delete(how), cols };
        let stmt = self.statement(key, |r| sql::delete(r, &by, how)).await?;
        Ok(Queued { stmt, params, rel: d.rel, what: "delete from" })
    }

    async fn flush(&mut self, queue: &mut Vec<Queued<'_>>) -> Result<(), ApplyError> {
        if queue.is_empty() {
            return Ok(());
        }
        let results = run_pipelined(self.client()?, queue).await;
        let mut first_err = None;
        for (q, r) in queue.iter().zip(results) {
            let table = || self.rels.get(&q.rel).map_or_else(|| q.rel.to_string(), |r| r.table.clone());
            match r {
                Ok(0) => {
                    self.missing += 1;
                    if self.first_missing.is_none() {
                        self.first_missing = Some(table());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    first_err = Some(db_err(format!("{} {}", q.what, table()))(e));
                    break;
                }
            }
        }
        queue.clear();
        first_err.map_or(Ok(()), Err)
    }

    async fn truncate(&mut self, t: &proto::PgTruncate) -> Result<(), ApplyError> {
        let mut tables = Vec::with_capacity(t.rels.len());
        for &id in &t.rels {
            tables.push(self.rel_ready(id).await?.table.clone());
        }
        if tables.is_empty() {
            return Ok(());
        }
        // The source names every table it truncated: each is truncated alone (ONLY), as in
        // native apply, except a partitioned table, which is truncated with its partitions.
        let partitioned: Vec<bool> = self
            .client()?
            .query(
                "SELECT coalesce(c.relkind = 'p', false) FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n) \
                 LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.name) ORDER BY t.n",
                &[&tables],
            )
            .await
            .map_err(db_err(format!("look up {}", tables.join(", "))))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let targets: Vec<String> = tables
            .iter()
            .zip(partitioned.iter().chain(std::iter::repeat(&false)))
            .map(|(t, &p)| if p { t.clone() } else { format!("ONLY {t}") })
            .collect();
        let mut stmt = format!("TRUNCATE {}", targets.join(", "));
        if t.restart_identity {
            stmt.push_str(" RESTART IDENTITY");
        }
        if t.cascade {
            stmt.push_str(" CASCADE");
        }
        self.client()?.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("truncate {}", tables.join(", "))))?;
        Ok(())
    }

    /// Creates a user-defined type the source's columns use, unless the standby has one of that
    /// name. A definition that does not pass [`sql::type_def`] is not run: the event's outcome
    /// says so, and the table using it cannot be created until someone creates the type.
    async fn type_def(&mut self, t: &proto::PgTypeDef) -> Result<(), ApplyError> {
        sql::check_ident("schema", &t.schema).map_err(ApplyError::Refused)?;
        sql::check_ident("type", &t.name).map_err(ApplyError::Refused)?;
        let q = sql::qualified(&t.schema, &t.name);
        if sql::reserved_schema(&t.schema) {
            return Err(refused(format!("type {q} is in a reserved schema")));
        }
        let key = (t.schema.clone(), t.name.clone());
        let same_labels = t.enum_labels.is_empty() || self.enum_labels.get(&key) == Some(&t.enum_labels);
        if self.types.contains(&key) && same_labels {
            return Ok(());
        }
        let client = self.client()?;
        if !schema::type_exists(client, &t.schema, &t.name).await? {
            match sql::type_def(&t.schema, &t.name, &t.create_sql) {
                Ok(stmt) => schema::create_type(client, &t.schema, &stmt, &q).await?,
                Err(why) => {
                    let msg = format!("type {q} not created on the standby: {why}; create it there by hand");
                    warn!(reason = %msg, "type definition not run");
                    self.skipped = Some(msg);
                }
            }
        } else if !t.enum_labels.is_empty() {
            self.add_enum_labels(t, &q).await?;
        }
        if !t.enum_labels.is_empty() {
            self.enum_labels.insert(key.clone(), t.enum_labels.clone());
        }
        self.types.insert(key);
        Ok(())
    }

    /// Gives the standby's enum the labels of the source's enum `t`: new ones added next to
    /// their neighbour in the source's order, and, when `t` says its labels are current at
    /// this point of the stream, renamed ones renamed (see [`sql::sync_enum_labels`]). A label
    /// added inside a transaction cannot be used before that transaction commits, so they are
    /// added on a connection of their own, committed at once: the round's open transaction
    /// can then insert rows carrying them.
    async fn add_enum_labels(&mut self, t: &proto::PgTypeDef, q: &str) -> Result<(), ApplyError> {
        let have: Vec<String> = self
            .client()?
            .query(
                "SELECT e.enumlabel::text FROM pg_catalog.pg_enum e JOIN pg_catalog.pg_type ty ON ty.oid = e.enumtypid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = ty.typnamespace \
                 WHERE n.nspname = $1 AND ty.typname = $2 ORDER BY e.enumsortorder",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(db_err(format!("read the labels of {q}")))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let stmts = if t.labels_current {
            sql::sync_enum_labels(q, &have, &t.enum_labels)
        } else {
            sql::add_enum_labels(q, &have, &t.enum_labels)
        };
        if stmts.is_empty() {
            return Ok(());
        }
        let ctx = || format!("add labels to {q} on {}", self.where_());
        let (client, connection) = self.conn.connect().await.map_err(db_err(ctx()))?;
        let conn = tokio::spawn(connection);
        for stmt in &stmts {
            client.batch_execute(stmt).await.map_err(db_err(ctx()))?;
        }
        drop(client);
        let _ = conn.await;
        info!(type_name = %q, changes = ?stmts, "enum labels renamed or added on the standby");
        Ok(())
    }

    async fn message(&mut self, m: &proto::PgMessage) -> Result<(), ApplyError> {
        if self.can_emit {
            let stmt = match &self.emit {
                Some(s) => s.clone(),
                None => {
                    let s = self
                        .client()?
                        .prepare("SELECT pg_catalog.pg_logical_emit_message($1::boolean, $2::text, $3::bytea)")
                        .await
                        .map_err(db_err("prepare pg_logical_emit_message"))?;
                    self.emit = Some(s.clone());
                    s
                }
            };
            let content: &[u8] = &m.content;
            self.client()?
                .execute(&stmt, &[&m.transactional, &m.prefix, &content])
                .await
                .map_err(db_err(format!("pass through logical message with prefix {:?}", m.prefix)))?;
        }
        debug!(prefix = %m.prefix, lsn = m.lsn, bytes = m.content.len(), transactional = m.transactional, "logical message");
        self.last_message = Some(LastMessage { prefix: m.prefix.clone(), content: m.content.clone(), lsn: m.lsn });
        Ok(())
    }

    async fn begin_resync(&mut self) -> Result<(), ApplyError> {
        self.check_usable()?;
        self.discard().await;
        self.resync = Some(Resync::default());
        if let Err(e) = self.begin().await {
            return Err(self.fail(e).await);
        }
        Ok(())
    }

    async fn end_resync(&mut self) -> Result<(), ApplyError> {
        self.check_usable()?;
        if let Err(e) = self.settle().await {
            return Err(self.fail(e).await);
        }
        let Some(rs) = self.resync.take() else {
            return Err(self.fail(refused("end of resync without a beginning")).await);
        };
        let Some(lsn) = rs.end_lsn else {
            return Err(self.fail(refused("the resync snapshot ended without a PgSnapshotEnd")).await);
        };
        if let Err(e) = self.copiers.finish().await {
            return Err(self.fail(e).await);
        }
        self.applied_lsn = lsn;
        info!(lsn, tables = rs.seen.len(), parallel = self.copiers.in_use(), "resync snapshot applied");
        Ok(())
    }

    async fn prepare_commit(&mut self, pos: Position) -> Result<Option<CommitFn>, ApplyError> {
        if self.failed || self.resync.is_some() || self.source_tx.is_some() {
            return Ok(None);
        }
        // Tables a resync filled in parallel commit first, right before the position.
        if let Err(e) = self.copiers.commit().await {
            return Err(self.fail(e).await);
        }
        let done: CommitFn = Box::new(|| Ok(()));
        if !self.tx_used && self.position == Some(pos) && self.applied_lsn == self.committed_lsn {
            return Ok(Some(done));
        }
        let was_in_tx = self.in_tx;
        if let Err(e) = self.write_position(pos).await {
            return Err(self.fail(e).await);
        }
        self.rels_undo.clear();
        // write_position opened the next transaction right behind the commit.
        self.in_tx = was_in_tx;
        self.tx_used = false;
        self.position = Some(pos);
        self.committed_lsn = self.applied_lsn;
        if was_in_tx {
            // Committed asynchronously: visible now, durable once the barrier returns.
            return Ok(Some(Box::new(self.flusher.barrier(Some(pos.seq.0)))));
        }
        Ok(Some(done))
    }

    /// Records `pos` and the applied LSN and commits the open transaction with it (or, with
    /// none open, on its own).
    async fn write_position(&mut self, pos: Position) -> Result<(), ApplyError> {
        let stmt = match &self.upsert {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .client()?
                    .prepare(
                        "INSERT INTO lockstep.applied_position (agent, source, journal_id, seq, lsn, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, now()) ON CONFLICT (agent, source) DO UPDATE SET \
                         journal_id = EXCLUDED.journal_id, seq = EXCLUDED.seq, lsn = EXCLUDED.lsn, updated_at = now()",
                    )
                    .await
                    .map_err(db_err("prepare the position update"))?;
                self.upsert = Some(s.clone());
                s
            }
        };
        let deferred = self.deferred.take();
        let client = self.client()?;
        let journal_id = pos.journal_id.to_string();
        let seq = pos.seq.0 as i64;
        let lsn = self.applied_lsn as i64;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&self.agent, &self.source, &journal_id, &seq, &lsn];
        let upsert = client.execute(&stmt, &params);
        if self.in_tx {
            // Both requests go out together; a failed upsert turns the COMMIT into a rollback.
            // Visible without waiting for the WAL flush; the commit's durable half is a
            // flush barrier (see `flush`).
            // The next round's transaction opens in the same round trip (BEGIN alone takes no
            // snapshot and no transaction id, so an idle one holds nothing back).
            // A deferred insert's answer comes first: when it failed, the transaction was
            // aborted and the COMMIT rolls it back.
            let (inserted, written, committed) = futures::join!(
                Deferred::answer(deferred),
                upsert,
                client.batch_execute("SET LOCAL synchronous_commit TO off; COMMIT; BEGIN")
            );
            inserted?;
            written.map_err(db_err("record the applied position"))?;
            committed.map_err(db_err("commit on the standby"))?;
        } else {
            Deferred::answer(deferred).await?;
            upsert.await.map_err(db_err("record the applied position"))?;
        }
        Ok(())
    }
}

fn parse_journal_id(s: &str) -> Option<JournalId> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(JournalId(id))
}

impl Applier for PgApplier {
    fn position(&self) -> Option<Position> {
        self.st.position
    }

    fn apply(&mut self, seq: Seq, change: Change) -> Result<ApplyOutcome, ApplyError> {
        let rt = self.rt.as_ref().expect("runtime present until dropped");
        rt.block_on(self.st.apply(seq, change))
    }

    fn begin_resync(&mut self) -> Result<(), ApplyError> {
        let rt = self.rt.as_ref().expect("runtime present until dropped");
        rt.block_on(self.st.begin_resync())
    }

    fn end_resync(&mut self) -> Result<(), ApplyError> {
        let rt = self.rt.as_ref().expect("runtime present until dropped");
        rt.block_on(self.st.end_resync())
    }

    fn prepare_commit(&mut self, pos: Position) -> Result<Option<CommitFn>, ApplyError> {
        let rt = self.rt.as_ref().expect("runtime present until dropped");
        rt.block_on(self.st.prepare_commit(pos))
    }

    fn session_start(&mut self, _journal_id: JournalId) -> Result<(), ApplyError> {
        let rt = self.rt.as_ref().expect("runtime present until dropped");
        rt.block_on(self.st.session_start())
    }
}
