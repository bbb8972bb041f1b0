//! Filling tables in parallel during a resync.
//!
//! A snapshot arrives as pieces of COPY data, each naming its table; the agent copies a few
//! tables at a time, so pieces of different tables interleave. Applied on the one standby
//! connection, the standby's COPY (parsing every value) runs on one core while the rest of the
//! pipeline waits. Here each table whose columns all have built-in types is handed, at its
//! first piece, to one of a few *copiers*: a thread with a connection of its own and an open
//! transaction, which creates or empties the table and runs its COPYs. Tables with
//! user-defined types (created on the main connection, invisible to others until it commits)
//! and tables in schemas the standby lacks stay on the main connection.
//!
//! Atomicity: a copier commits only when the whole snapshot has arrived and every copier has
//! applied its share ([`Copiers::finish`]), right before the main transaction commits with the
//! new position ([`Copiers::commit`]; the session ends a round at the resync's end, so nothing
//! else comes between). Until then nothing of the resync is visible, and an error, a lost
//! session or a crash rolls back every copier (its connection closes). The copiers' commits
//! and the main one are still separate: so that a crash or a failed main commit in between
//! can never leave new tables under the old position, the applier deletes its position row
//! (committed on a connection of its own) before it hands the first table to a copier — the
//! standby then has no position until the resync's own commit, and the agent resyncs it
//! again if that never comes.
//!
//! No connection waits for a lock forever while copiers run: each copier, and the main
//! connection's transaction, give up after [`LOCK_TIMEOUT`] (a lock another connection holds
//! until the resync's end could otherwise stall it for good, unseen by PostgreSQL's deadlock
//! detector). After any failure of a resync with copiers, the applier fills tables on the
//! main connection only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::SinkExt;
use lockstep_common::pgtls::PgConn;
use lockstep_common::proto::PgRelation;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Statement};

use super::{db_err, schema, sql, target_err};
use crate::applier::ApplyError;

/// Copiers per resync (PostgreSQL's subscriptions sync two tables at a time by default).
const COPIERS: usize = 2;
/// Pieces (about 1 MiB each) queued per copier before the applier waits for it.
const QUEUE: usize = 16;
/// How long a connection of a resync with copiers waits for a lock.
pub(super) const LOCK_TIMEOUT: &str = "10s";
/// Types with OIDs below this are built in: the same on every server.
const FIRST_USER_OID: u32 = 16384;

type Table = (String, String);

enum Job {
    /// Take on `rel`'s table: create or empty it. Answers false when its schema is missing.
    Take {
        rel: Box<PgRelation>,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    Copy {
        table: Table,
        data: Bytes,
    },
    /// Answers once every job before it is done; with `commit`, commits first.
    Finish {
        commit: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    /// Bytes queued and not yet copied.
    queued: Arc<AtomicUsize>,
    /// The first error, as soon as it happens.
    failed: Arc<Mutex<Option<String>>>,
    /// Set when the resync is abandoned: the copier stops at its next job.
    cancelled: Arc<AtomicBool>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// The copiers of one resync.
pub(super) struct Copiers {
    conn: PgConn,
    /// The (agent, source) whose tables these are.
    owner: (String, String),
    workers: Vec<Worker>,
    tables: HashMap<Table, usize>,
    /// A copier failed: resyncs use the main connection only.
    off: bool,
}

impl Copiers {
    pub(super) fn new(conn: PgConn, owner: (String, String)) -> Copiers {
        Copiers { conn, owner, workers: Vec::new(), tables: HashMap::new(), off: false }
    }

    /// Whether any table went to a copier in this resync.
    pub(super) fn in_use(&self) -> bool {
        !self.tables.is_empty()
    }

    /// Whether `table` is filled by a copier in this resync.
    pub(super) fn has(&self, schema: &str, name: &str) -> bool {
        self.tables.contains_key(&(schema.to_string(), name.to_string()))
    }

    /// Rolls back and forgets this resync's copiers (dropping a copier's queue ends its thread,
    /// which closes its connection). After a resync with copiers failed (`failed`: for any
    /// reason, a standby refusing the extra connections included), no more copiers: the retry
    /// fills every table on the main connection.
    pub(super) fn reset(&mut self, failed: bool) {
        if failed && !self.workers.is_empty() {
            self.off = true;
            tracing::warn!("a resync with parallel table copies failed; later resyncs fill tables one at a time");
        }
        self.workers.clear();
        self.tables.clear();
    }

    /// No copiers for this applier from now on.
    pub(super) fn turn_off(&mut self) {
        self.off = true;
    }

    /// Whether a copier may fill `rel`'s table: copiers are on and its columns all have
    /// built-in types.
    pub(super) fn eligible(&self, rel: &PgRelation) -> bool {
        !self.off && rel.columns.iter().all(|c| c.type_oid < FIRST_USER_OID)
    }

    /// Offers `rel`'s table (first seen in this resync) to a copier: true when one took it.
    /// Call only for an [`eligible`](Self::eligible) one.
    pub(super) async fn take(&mut self, rel: &PgRelation) -> Result<bool, ApplyError> {
        let took = self.try_take(rel).await;
        if took.is_err() {
            self.off = true;
        }
        took
    }

    async fn try_take(&mut self, rel: &PgRelation) -> Result<bool, ApplyError> {
        if self.workers.len() < COPIERS {
            self.workers.push(spawn(self.conn.clone(), self.owner.clone())?);
        }
        let w = (0..self.workers.len())
            .min_by_key(|&i| self.workers[i].queued.load(Ordering::Relaxed))
            .expect("at least one copier");
        let (reply, answer) = oneshot::channel();
        self.send(w, Job::Take { rel: Box::new(rel.clone()), reply }).await?;
        let took = answer.await.map_err(|_| gone())?.map_err(copier_err)?;
        if took {
            self.tables.insert((rel.schema.clone(), rel.name.clone()), w);
        }
        Ok(took)
    }

    /// Queues COPY data for a table a copier took.
    pub(super) async fn copy(&mut self, schema: &str, name: &str, data: Bytes) -> Result<(), ApplyError> {
        let table = (schema.to_string(), name.to_string());
        let w = *self.tables.get(&table).expect("table taken by a copier");
        if let Some(e) = self.workers[w].failed.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(copier_err(e));
        }
        self.workers[w].queued.fetch_add(data.len(), Ordering::Relaxed);
        self.send(w, Job::Copy { table, data }).await
    }

    /// Waits until every copier has applied its share (the snapshot is complete).
    pub(super) async fn finish(&mut self) -> Result<(), ApplyError> {
        self.all(false).await
    }

    /// Commits every copier (right before the main transaction commits). Copiers exist at a
    /// commit only after [`finish`](Self::finish): an open resync declines to commit, and a
    /// failed or abandoned one resets them.
    pub(super) async fn commit(&mut self) -> Result<(), ApplyError> {
        if self.workers.is_empty() {
            return Ok(());
        }
        self.all(true).await?;
        self.reset(false);
        Ok(())
    }

    async fn all(&mut self, commit: bool) -> Result<(), ApplyError> {
        let mut answers = Vec::with_capacity(self.workers.len());
        for w in 0..self.workers.len() {
            let (reply, answer) = oneshot::channel();
            self.send(w, Job::Finish { commit, reply }).await?;
            answers.push(answer);
        }
        for a in answers {
            a.await.map_err(|_| gone())?.map_err(copier_err)?;
        }
        Ok(())
    }

    async fn send(&self, w: usize, job: Job) -> Result<(), ApplyError> {
        self.workers[w].jobs.send(job).await.map_err(|_| gone())
    }
}

fn gone() -> ApplyError {
    target_err("parallel table copy", "a copier stopped")
}

fn copier_err(e: String) -> ApplyError {
    target_err("parallel table copy", e)
}

fn spawn(conn: PgConn, owner: (String, String)) -> Result<Worker, ApplyError> {
    let (jobs, rx) = mpsc::channel(QUEUE);
    let queued = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(None));
    let cancelled = Arc::new(AtomicBool::new(false));
    let (q, f, c) = (queued.clone(), failed.clone(), cancelled.clone());
    std::thread::Builder::new()
        .name("pg-copier".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    *f.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("start a copier: {e}"));
                    return;
                }
            };
            rt.block_on(run(conn, owner, rx, q, f, c));
        })
        .map_err(|e| ApplyError::Io { context: "start a copier thread".into(), error: e })?;
    Ok(Worker { jobs, queued, failed, cancelled })
}

/// One copier: its connection, one transaction, the jobs in order. Its first error goes to
/// `failed` (seen by the applier at once); after it, the copier only answers with it.
async fn run(
    conn: PgConn,
    owner: (String, String),
    mut jobs: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
    failed: Arc<Mutex<Option<String>>>,
    cancelled: Arc<AtomicBool>,
) {
    let error = || failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let fail = |e: ApplyError| {
        let msg = e.to_string();
        failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(msg.clone());
        msg
    };
    let mut c = Copier { client: None, owner, stmts: HashMap::new() };
    if let Err(e) = c.open(&conn).await {
        fail(e);
    }
    while let Some(job) = jobs.recv().await {
        if cancelled.load(Ordering::Relaxed) {
            // Abandoned: close the connection (rolling back) without working through the rest.
            return;
        }
        match job {
            Job::Take { rel, reply } => {
                let r = match error() {
                    Some(e) => Err(e),
                    None => c.take(&rel).await.map_err(fail),
                };
                let _ = reply.send(r);
            }
            Job::Copy { table, data } => {
                let n = data.len();
                if error().is_none() {
                    if let Err(e) = c.copy(&table, data).await {
                        fail(e);
                    }
                }
                queued.fetch_sub(n, Ordering::Relaxed);
            }
            Job::Finish { commit, reply } => {
                if commit && error().is_none() {
                    if let Err(e) = c.commit().await {
                        fail(e);
                    }
                }
                let _ = reply.send(error().map_or(Ok(()), Err));
                if commit {
                    return;
                }
            }
        }
    }
}

struct Copier {
    client: Option<Client>,
    owner: (String, String),
    /// COPY statements of the tables taken.
    stmts: HashMap<Table, (String, Statement)>,
}

impl Copier {
    async fn open(&mut self, conn: &PgConn) -> Result<(), ApplyError> {
        let client = super::open_session(conn).await?;
        client
            .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'; BEGIN"))
            .await
            .map_err(db_err("begin a copier's transaction"))?;
        self.client = Some(client);
        Ok(())
    }

    fn client(&self) -> Result<&Client, ApplyError> {
        self.client.as_ref().ok_or_else(gone)
    }

    async fn take(&mut self, rel: &PgRelation) -> Result<bool, ApplyError> {
        let client = self.client()?;
        let schema_exists: bool = client
            .query_one("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)", &[&rel.schema])
            .await
            .map_err(db_err(format!("look up schema {}", sql::ident(&rel.schema))))?
            .get(0);
        if !schema_exists {
            return Ok(false);
        }
        schema::ensure_table(client, (&self.owner.0, &self.owner.1), rel, None, true).await?;
        let table = sql::qualified(&rel.schema, &rel.name);
        let text = sql::copy_in(rel);
        let stmt = client.prepare(&text).await.map_err(db_err(format!("prepare {text}")))?;
        self.stmts.insert((rel.schema.clone(), rel.name.clone()), (table, stmt));
        Ok(true)
    }

    async fn copy(&mut self, table: &Table, data: Bytes) -> Result<(), ApplyError> {
        let (name, stmt) = self.stmts.get(table).ok_or_else(|| target_err("parallel table copy", "unknown table"))?;
        let ctx = || format!("copy snapshot data into {name}");
        let sink = self.client()?.copy_in::<_, Bytes>(stmt).await.map_err(db_err(ctx()))?;
        futures::pin_mut!(sink);
        sink.send(data).await.map_err(db_err(ctx()))?;
        sink.as_mut().finish().await.map_err(db_err(ctx()))?;
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), ApplyError> {
        self.client()?.batch_execute("COMMIT").await.map_err(db_err("commit a copier's transaction"))?;
        Ok(())
    }
}
