//! The postgres source task: slot → pgoutput → one journal event per committed transaction.
//!
//! pgoutput (protocol 1) sends a transaction only once it has committed, as Begin, its row
//! changes, Commit. Each transaction becomes one `PgTransaction` event; one larger than
//! [`CHUNK_BYTES`] is journaled in chunks as it arrives, so it is never held whole in memory
//! (the receiver applies all chunks in one target transaction). Events are submitted to the
//! journal in order without waiting for each flush; once a transaction's events are durable,
//! the slot's flush position moves to its end LSN — never earlier.
//!
//! After a crash the slot re-sends from its confirmed position (at-least-once). The source
//! skips transactions whose commit LSN is below the end LSN it last journaled (kept in the
//! agent's sled database), and the receiver deduplicates on commit LSN as well.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lockstep_common::event::Change;
use lockstep_common::proto::{self, pg_op::Op};
use lockstep_common::{now_us, retry};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio_postgres::Client;
use tracing::{debug, error, info, warn};

use super::catalog::{self, Refusal, TypeNames};
use super::pgoutput::{self, OldKind, PgOutput, Tuple, Value};
use super::{ddl, streamed, Shared};
use crate::journal::{AppendTicket, JournalHandle, NewRecord};
use crate::source::{SourceContext, SourceError, SourceState};

/// Payload bytes after which an open transaction is journaled as a chunk.
const CHUNK_BYTES: usize = 4 << 20;
/// Journal submissions awaiting their flush before reading pauses.
const MAX_IN_FLIGHT: usize = 256;
/// How often the slot's retained WAL is checked.
const SLOT_CHECK: Duration = Duration::from_secs(10);
/// Retained WAL above which a warning is logged.
const RETAINED_WAL_WARN: i64 = 1 << 30;
/// How long a slot held by another session is waited for before giving up (after a kill -9
/// the server may not yet have noticed that our previous session is gone).
const SLOT_BUSY_PATIENCE: Duration = Duration::from_secs(60);

pub(crate) const RETAINED_WAL_METRIC: &str = "lockstep_pg_slot_retained_wal_bytes";

/// Runs the source on a thread of its own with a single-threaded runtime: the replication
/// client's reader task and this source hand over every row through a channel, and on one
/// thread that costs no cross-thread wake-ups.
pub(crate) async fn run(shared: Arc<Shared>, ctx: SourceContext) -> Result<(), SourceError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = shared.name.to_string();
    let io_err =
        |error| SourceError::Io { source_name: name.clone(), context: "start the source thread".into(), error };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io_err)?;
    std::thread::Builder::new()
        .name(format!("pg-{}", shared.name))
        .spawn(move || {
            let _ = tx.send(rt.block_on(run_here(shared, ctx)));
        })
        .map_err(io_err)?;
    rx.await.unwrap_or_else(|_| {
        Err(SourceError::Other { source_name: name.clone(), problem: "source thread ended without a result".into() })
    })
}

async fn run_here(shared: Arc<Shared>, ctx: SourceContext) -> Result<(), SourceError> {
    let tree = ctx
        .db
        .open_tree(format!("pg/{}", shared.name))
        .map_err(|error| SourceError::Index { source_name: shared.name.to_string(), error })?;
    let mut backoff = retry::reconnect();
    let mut busy_since: Option<std::time::Instant> = None;
    loop {
        if ctx.cancel.is_cancelled() {
            return Ok(());
        }
        let r = tokio::select! {
            r = session(&shared, &ctx, &tree) => r,
            _ = ctx.cancel.cancelled() => return Ok(()),
        };
        let e = match r {
            Ok(()) => return Ok(()),
            Err(Refusal::Retry(e)) => {
                busy_since = None;
                e
            }
            Err(Refusal::SlotBusy(e))
                if busy_since.get_or_insert_with(std::time::Instant::now).elapsed() <= SLOT_BUSY_PATIENCE =>
            {
                e
            }
            Err(Refusal::Fatal(e) | Refusal::SlotBusy(e)) => {
                error!(source = %shared.name, error = %e, "postgres source cannot run");
                ctx.status.set_state(SourceState::Error, Some(e.to_string()));
                return Err(e);
            }
        };
        let msg = e.to_string();
        ctx.status.set_state(SourceState::Error, Some(msg.clone()));
        let delay = retry::next_delay(&mut backoff);
        warn!(source = %shared.name, error = %msg, retry_in = ?delay, "postgres source interrupted; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.cancel.cancelled() => return Ok(()),
        }
    }
}

const LAST_END_KEY: &[u8] = b"last_end_lsn";
/// Set once this source has streamed from its slot: a missing slot then means one was lost.
const SLOT_USED_KEY: &[u8] = b"slot_used";
/// Set (durably) before a used slot is replaced, cleared once the receivers' resync is under
/// way: a restart in between still resyncs them.
const RESYNC_PENDING_KEY: &[u8] = b"slot_resync_pending";

/// One replication session: preflight, then stream until an error or cancellation.
async fn session(shared: &Shared, ctx: &SourceContext, tree: &sled::Tree) -> Result<(), Refusal> {
    let client = catalog::connect(shared).await.map_err(Refusal::Retry)?;
    let used_before = tree.get(SLOT_USED_KEY).ok().flatten().is_some();
    let will_recreate = || -> Result<(), String> {
        tree.insert(RESYNC_PENDING_KEY, &[1u8]).map_err(|e| e.to_string())?;
        tree.flush().map(|_| ()).map_err(|e| e.to_string())
    };
    let slot = catalog::preflight(shared, &client, used_before, &will_recreate).await?;
    // Set by `will_recreate` now, or by a session that died before the resync was under way.
    if tree.get(RESYNC_PENDING_KEY).ok().flatten().is_some() {
        // Everything journaled so far can no longer bring a receiver up to date: raise the
        // floor, journal a record above it, and make the shippers re-decide.
        let floor = ctx.resync_floor.clone();
        let name = shared.name.to_string();
        let raised = tokio::task::spawn_blocking(move || floor.raise(&name))
            .await
            .map_err(|e| Refusal::Fatal(shared.err(format!("raise the resync floor: {e}"))))?
            .map_err(|e| Refusal::Fatal(SourceError::Journal(e, shared.name.to_string())))?;
        let marker = proto::PgTransaction { last: true, ..Default::default() };
        ctx.journal
            .append(vec![NewRecord {
                source: shared.name.clone(),
                captured_at_us: now_us(),
                payload: Change::Other(proto::change_event::Change::Pg(marker)).encode(),
            }])
            .await
            .map_err(|e| Refusal::Fatal(SourceError::Journal(e, shared.name.to_string())))?;
        ctx.resync_floor.kick();
        // Durable with the next journal flush; until then a restart only resyncs again.
        let _ = tree.remove(RESYNC_PENDING_KEY);
        error!(source = %shared.name, floor = raised.0, "receivers behind the new slot will be resynced");
    }
    let _ = tree.insert(SLOT_USED_KEY, &[1u8]);
    shared.slot_ready.send_replace(true);

    let last_end = tree
        .get(LAST_END_KEY)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    // Resume past what the journal already holds; the slot's own position when that is later.
    let start = last_end.max(slot.confirmed_flush);
    // PostgreSQL 14+ streams a large transaction while it runs (see `streamed`).
    let streaming = catalog::server_version(shared, &client).await.map_err(Refusal::Retry)? >= 140_000;
    let cfg = shared
        .conn
        .replication(&shared.slot, &shared.publication, streaming)
        .with_start_lsn(Lsn::from_u64(start))
        .with_status_interval(Duration::from_millis(500))
        .with_wakeup_interval(Duration::from_secs(5));
    let mut repl = ReplicationClient::connect(cfg)
        .await
        .map_err(|e| Refusal::Retry(shared.err(format!("open replication stream on {}: {e}", shared.conn.server()))))?;
    repl.wait_started().await.map_err(|e| {
        let msg = e.to_string();
        let err = shared.err(format!("start replication from slot {:?}: {msg}", shared.slot));
        if msg.contains("is active for PID") {
            Refusal::SlotBusy(shared.err(format!(
                "slot {:?} on {} is in use by another session; stop that consumer or configure another slot name ({msg})",
                shared.slot,
                shared.conn.server()
            )))
        } else {
            Refusal::Retry(err)
        }
    })?;
    info!(source = %shared.name, slot = %shared.slot, from = %Lsn::from_u64(start), "streaming from replication slot");
    ctx.status.set_state(SourceState::Streaming, None);

    let mut s = Streamer {
        shared,
        client: &client,
        journal: &ctx.journal,
        tree,
        status: ctx,
        types: TypeNames::default(),
        relations: HashMap::new(),
        columns: ddl::Columns::default(),
        enums: Enums::default(),
        txn: None,
        in_flight: VecDeque::new(),
        last_end,
        confirmed: start,
        durable_end: start,
        spills: streaming.then(|| streamed::Spills::new(ctx.data_dir.join("pg-stream"))),
        in_stream: None,
    };
    let mut slot_check = tokio::time::interval(SLOT_CHECK);
    loop {
        // Settle flushed submissions first so the slot advances promptly.
        while let Some(r) = s.in_flight.front_mut().and_then(|f| f.ticket.try_durable()) {
            s.settle(r)?;
        }
        if s.in_flight.len() >= MAX_IN_FLIGHT {
            let r = s.in_flight.front_mut().expect("non-empty").ticket.durable().await;
            s.settle(r)?;
            continue;
        }
        s.confirm(&repl);
        tokio::select! {
            biased;
            r = async {
                match s.in_flight.front_mut() {
                    Some(f) => f.ticket.durable().await,
                    None => std::future::pending().await,
                }
            } => s.settle(r)?,
            ev = repl.recv() => {
                let ev = match ev {
                    Ok(Some(ev)) => ev,
                    Ok(None) => return Err(Refusal::Retry(shared.err("replication stream ended"))),
                    Err(e) => return Err(Refusal::Retry(shared.err(format!("replication stream on {}: {e}", shared.conn.server())))),
                };
                s.event(ev, &repl).await?;
            }
            _ = slot_check.tick() => {
                match catalog::retained_wal(shared, &client).await {
                    Ok(Some((bytes, wal_status))) => {
                        metrics::gauge!(RETAINED_WAL_METRIC, "source" => shared.name.to_string()).set(bytes as f64);
                        if wal_status == "lost" {
                            // The next session's preflight recreates it and resyncs receivers.
                            return Err(Refusal::Retry(shared.err(format!(
                                "slot {:?} was invalidated while streaming: PostgreSQL removed WAL it still needed (max_slot_wal_keep_size); changes were lost upstream; reconnecting to recreate it and resync the receivers",
                                shared.slot
                            ))));
                        }
                        if bytes > RETAINED_WAL_WARN {
                            warn!(source = %shared.name, slot = %shared.slot, retained_bytes = bytes, "replication slot holds back more than 1 GiB of WAL; is the agent keeping up?");
                        }
                    }
                    Ok(None) => {
                        return Err(Refusal::Retry(shared.err(format!(
                            "slot {:?} disappeared from {} while streaming (dropped by someone?); reconnecting to recreate it and resync the receivers",
                            shared.slot,
                            shared.conn.server()
                        ))))
                    }
                    Err(e) => return Err(Refusal::Retry(e)),
                }
            }
        }
    }
}

/// A transaction being read.
struct Txn {
    commit_lsn: u64,
    xid: u32,
    commit_time_us: i64,
    /// Already journaled (commit LSN below what the journal holds): read and dropped.
    skip: bool,
    chunk: u32,
    ops: Vec<proto::PgOp>,
    bytes: usize,
    /// Relations described in the current chunk.
    described: HashSet<u32>,
    /// Consecutive inserts into one table being gathered as COPY lines: (relation, rows, count).
    inserts: Option<(u32, Vec<u8>, u32)>,
}

impl Txn {
    /// Appends an op after any gathered inserts.
    fn push(&mut self, op: proto::PgOp) {
        self.flush_inserts();
        self.ops.push(op);
    }

    fn flush_inserts(&mut self) {
        if let Some((rel, rows, count)) = self.inserts.take() {
            self.ops.push(proto::PgOp { op: Some(Op::Insert(proto::PgInsert { rel, rows: rows.into(), count })) });
        }
    }

    /// The ops gathered so far, inserts included.
    fn take_ops(&mut self) -> Vec<proto::PgOp> {
        self.flush_inserts();
        std::mem::take(&mut self.ops)
    }
}

/// A journal submission, and the end LSN it completes (0 for a non-final chunk).
struct InFlight {
    ticket: AppendTicket,
    end_lsn: u64,
}

struct Streamer<'a> {
    shared: &'a Shared,
    client: &'a Client,
    journal: &'a JournalHandle,
    tree: &'a sled::Tree,
    status: &'a SourceContext,
    types: TypeNames,
    /// Relations as last described by the stream (pgoutput sends each before first use).
    relations: HashMap<u32, (Vec<proto::PgTypeDef>, proto::PgRelation)>,
    /// Tables' columns as the DDL trigger recorded them at the point of the stream decoded.
    columns: ddl::Columns,
    enums: Enums,
    txn: Option<Txn>,
    in_flight: VecDeque<InFlight>,
    /// End LSN of the last transaction submitted to the journal.
    last_end: u64,
    /// Highest LSN reported to the slot as flushed.
    confirmed: u64,
    /// End LSN of the last transaction known durable in the journal.
    durable_end: u64,
    /// Streamed in-progress transactions (protocol 2); `None` when the server cannot stream.
    spills: Option<streamed::Spills>,
    /// Inside a streamed block of this transaction.
    in_stream: Option<u32>,
}

impl Streamer<'_> {
    async fn event(&mut self, ev: ReplicationEvent, repl: &ReplicationClient) -> Result<(), Refusal> {
        match ev {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.begin(final_lsn.as_u64(), xid, commit_time_micros)?
            }
            ReplicationEvent::XLogData { data, .. } => {
                if let Some(spills) = &mut self.spills {
                    let bad = |e: String| Refusal::Retry(self.shared.err(format!("pgoutput stream: {e}")));
                    if let Some(c) = streamed::control(&data).map_err(bad)? {
                        return self.stream_control(c).await;
                    }
                    if let Some(xid) = self.in_stream {
                        return spills.append(xid, &data).map_err(bad);
                    }
                }
                self.change(&data).await?
            }
            ReplicationEvent::Message { transactional, lsn, prefix, content } => {
                self.message(transactional, lsn.as_u64(), prefix, content).await?
            }
            ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                self.commit(lsn.as_u64(), end_lsn.as_u64(), commit_time_micros).await?
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Nothing open and everything durable: the slot may move to the server's
                // position, or writes to unpublished tables would pin WAL forever.
                if self.txn.is_none() && self.in_flight.is_empty() && wal_end.as_u64() > self.durable_end {
                    self.durable_end = wal_end.as_u64();
                    self.confirm(repl);
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    fn begin(&mut self, commit_lsn: u64, xid: u32, commit_time_micros: i64) -> Result<(), Refusal> {
        if self.txn.is_some() {
            return Err(Refusal::Retry(self.shared.err("protocol: Begin inside a transaction")));
        }
        self.txn = Some(Txn {
            commit_lsn,
            xid,
            commit_time_us: pgoutput::pg_time_to_unix_us(commit_time_micros),
            skip: commit_lsn < self.last_end,
            chunk: 0,
            ops: Vec::new(),
            bytes: 0,
            described: HashSet::new(),
            inserts: None,
        });
        Ok(())
    }

    async fn message(&mut self, transactional: bool, lsn: u64, prefix: String, content: Bytes) -> Result<(), Refusal> {
        if transactional && prefix == ddl::PREFIX {
            // The DDL trigger's record of a table's columns: for the relation messages that
            // follow, not for the standby (and recorded even in a transaction already
            // journaled, as the catalog moved on all the same).
            self.columns.record(&content);
            return Ok(());
        }
        let size = 64 + prefix.len() + content.len();
        let op = proto::PgOp { op: Some(Op::Message(proto::PgMessage { transactional, prefix, content, lsn })) };
        match (&mut self.txn, transactional) {
            (Some(t), true) => {
                // Counted at its size: a transaction of many large messages is cut into chunks
                // like one of many rows.
                t.bytes += size;
                t.push(op);
                self.maybe_chunk().await?;
            }
            _ => {
                // Outside any transaction: an event of its own, ordered by its LSN. PostgreSQL
                // gives a message the LSN where its WAL record ends — where the next record
                // begins, which may be the commit of a transaction decoded after it (one that
                // emitted it non-transactionally, say). So the event spans [lsn - 1, lsn): a
                // commit at `lsn` is not taken for one already journaled (here, in the slot's
                // confirmed position, or in the receiver's dedupe), and the message itself is
                // journaled once.
                if lsn > self.last_end {
                    let ev = proto::PgTransaction {
                        commit_lsn: lsn - 1,
                        end_lsn: lsn,
                        commit_time_us: now_us(),
                        xid: 0,
                        chunk: 0,
                        last: true,
                        ops: vec![op],
                    };
                    self.submit(ev, lsn).await?;
                }
            }
        }
        Ok(())
    }

    async fn commit(&mut self, lsn: u64, end_lsn: u64, commit_time_micros: i64) -> Result<(), Refusal> {
        tracing::trace!(source = %self.shared.name, lsn = %Lsn::from_u64(lsn), "commit received");
        let Some(mut t) = self.txn.take() else {
            return Err(Refusal::Retry(self.shared.err("protocol: Commit outside a transaction")));
        };
        if t.skip {
            debug!(source = %self.shared.name, lsn = %Lsn::from_u64(lsn), "transaction already journaled; skipped");
            return Ok(());
        }
        let ev = proto::PgTransaction {
            commit_lsn: lsn,
            end_lsn,
            commit_time_us: pgoutput::pg_time_to_unix_us(commit_time_micros).max(t.commit_time_us),
            xid: t.xid,
            chunk: t.chunk,
            last: true,
            ops: t.take_ops(),
        };
        self.submit(ev, end_lsn).await
    }

    /// A stream-control message (protocol 2): a streamed transaction's block begins or ends,
    /// or its outcome arrives — at a commit its messages are replayed as one transaction.
    async fn stream_control(&mut self, c: streamed::Control) -> Result<(), Refusal> {
        let bad = |e: String| Refusal::Retry(self.shared.err(format!("pgoutput stream: {e}")));
        let spills = self.spills.as_mut().expect("stream control only when streaming");
        match c {
            streamed::Control::Start { xid, first } => {
                if self.txn.is_some() || self.in_stream.is_some() {
                    return Err(bad("Stream Start inside a transaction or another block".into()));
                }
                spills.start(xid, first).map_err(bad)?;
                self.in_stream = Some(xid);
                tracing::trace!(source = %self.shared.name, xid, first, "streamed block begins");
            }
            streamed::Control::Stop => {
                if self.in_stream.take().is_none() {
                    return Err(bad("Stream Stop outside a streamed block".into()));
                }
            }
            streamed::Control::Abort { xid, sub } => {
                debug!(source = %self.shared.name, xid, sub, "streamed transaction rolled back");
                spills.abort(xid, sub).map_err(bad)?;
            }
            streamed::Control::Commit { xid, commit_lsn, end_lsn, commit_time } => {
                if self.txn.is_some() || self.in_stream.is_some() {
                    return Err(bad("Stream Commit inside a transaction or a block".into()));
                }
                tracing::trace!(source = %self.shared.name, xid, lsn = %Lsn::from_u64(commit_lsn), "streamed transaction committed");
                let mut replay = spills.commit(xid).map_err(bad)?;
                self.begin(commit_lsn, xid, commit_time)?;
                // Already journaled (re-sent after a restart): nothing to replay.
                let skip = self.txn.as_ref().is_some_and(|t| t.skip);
                while let Some(msg) = if skip { None } else { replay.next_message().map_err(bad)? } {
                    if msg.first() == Some(&b'M') {
                        let decoded =
                            pgoutput::decode(&msg).map_err(|e| bad(format!("undecodable streamed message: {e}")))?;
                        if let PgOutput::Message { transactional, lsn, prefix, content } = decoded {
                            self.message(transactional, lsn, prefix, content).await?;
                        }
                    } else {
                        self.change(&msg).await?;
                    }
                }
                self.commit(commit_lsn, end_lsn, commit_time).await?;
            }
        }
        Ok(())
    }

    /// One pgoutput change message inside a transaction.
    async fn change(&mut self, data: &Bytes) -> Result<(), Refusal> {
        let msg = pgoutput::decode(data)
            .map_err(|e| Refusal::Retry(self.shared.err(format!("undecodable pgoutput message: {e}"))))?;
        let rel_of = |m: &PgOutput| -> Vec<u32> {
            match m {
                PgOutput::Insert { rel, .. } | PgOutput::Update { rel, .. } | PgOutput::Delete { rel, .. } => {
                    vec![*rel]
                }
                PgOutput::Truncate { rels, .. } => rels.clone(),
                _ => Vec::new(),
            }
        };
        match &msg {
            PgOutput::Relation(r) => {
                let rel = self
                    .types
                    .relation(self.shared, self.client, r, self.columns.get(r.id))
                    .await
                    .map_err(Refusal::Retry)?;
                let types = catalog::type_defs(
                    self.shared,
                    self.client,
                    r.columns.iter().map(|c| c.type_oid).collect(),
                    &mut Default::default(),
                )
                .await
                .map_err(Refusal::Retry)?;
                self.relations.insert(r.id, (types, rel));
                self.enums.describe(self.shared, self.client, r).await.map_err(Refusal::Retry)?;
                // Re-described in this chunk with its new shape (e.g. after ADD COLUMN).
                if let Some(t) = &mut self.txn {
                    t.described.remove(&r.id);
                }
                return Ok(());
            }
            PgOutput::Type { .. } | PgOutput::Origin { .. } => return Ok(()),
            PgOutput::Begin { .. } | PgOutput::Commit { .. } | PgOutput::Message { .. } => {
                return Err(Refusal::Retry(self.shared.err("protocol: unexpected boundary message in XLogData")))
            }
            _ => {}
        }
        // A row may carry an enum label added since its type was described: the standby's
        // type gets it first.
        let added = match (&msg, &self.txn) {
            (PgOutput::Insert { rel, new } | PgOutput::Update { rel, new, .. }, Some(t)) if !t.skip => {
                self.enums.added_labels(self.shared, self.client, *rel, new).await.map_err(Refusal::Retry)?
            }
            _ => Vec::new(),
        };
        let Some(t) = &mut self.txn else {
            return Err(Refusal::Retry(self.shared.err("protocol: row change outside a transaction")));
        };
        if t.skip {
            return Ok(());
        }
        for d in added {
            // Relations described earlier carry the type's old labels: later transactions
            // send the new ones with them.
            for (types, _) in self.relations.values_mut() {
                for old in types.iter_mut().filter(|o| o.schema == d.schema && o.name == d.name) {
                    *old = proto::PgTypeDef { labels_current: false, ..d.clone() };
                }
            }
            t.bytes += 128;
            t.push(proto::PgOp { op: Some(Op::TypeDef(d)) });
        }
        for id in rel_of(&msg) {
            if t.described.insert(id) {
                let (types, rel) = self.relations.get(&id).ok_or_else(|| {
                    Refusal::Retry(self.shared.err(format!("protocol: change for undescribed relation {id}")))
                })?;
                t.bytes += 64 + rel.columns.len() * 32 + types.len() * 128;
                for d in types {
                    t.push(proto::PgOp { op: Some(Op::TypeDef(d.clone())) });
                }
                t.push(proto::PgOp { op: Some(Op::Relation(rel.clone())) });
            }
        }
        let bad = |e: pgoutput::DecodeError| Refusal::Retry(self.shared.err(format!("pgoutput: {e}")));
        match msg {
            PgOutput::Insert { rel, new } => {
                if t.inserts.as_ref().is_some_and(|(r, ..)| *r != rel) {
                    t.flush_inserts();
                }
                let (_, rows, count) = t.inserts.get_or_insert_with(|| (rel, Vec::with_capacity(64 << 10), 0));
                let before = rows.len();
                pgoutput::copy_line(&new, rows).map_err(bad)?;
                *count += 1;
                t.bytes += rows.len() - before;
            }
            PgOutput::Update { rel, old, new } => {
                let (old, old_is_key) = match old {
                    Some((kind, tuple)) => (Some(tuple_proto(tuple)), kind == OldKind::Key),
                    None => (None, false),
                };
                let new = tuple_proto(new);
                t.bytes += tuple_bytes(&new) + old.as_ref().map_or(0, tuple_bytes) + 16;
                t.push(proto::PgOp { op: Some(Op::Update(proto::PgUpdate { rel, old, old_is_key, new: Some(new) })) });
            }
            PgOutput::Delete { rel, old: (kind, tuple) } => {
                let old = tuple_proto(tuple);
                t.bytes += tuple_bytes(&old) + 16;
                t.push(proto::PgOp {
                    op: Some(Op::Delete(proto::PgDelete { rel, old: Some(old), old_is_key: kind == OldKind::Key })),
                });
            }
            PgOutput::Truncate { rels, cascade, restart_identity } => {
                t.bytes += 16 + rels.len() * 4;
                t.push(proto::PgOp { op: Some(Op::Truncate(proto::PgTruncate { rels, cascade, restart_identity })) });
            }
            _ => {}
        }
        self.maybe_chunk().await
    }

    /// Journals the open transaction's ops as a chunk once they are large.
    async fn maybe_chunk(&mut self) -> Result<(), Refusal> {
        let Some(t) = &mut self.txn else { return Ok(()) };
        if t.bytes < CHUNK_BYTES {
            return Ok(());
        }
        let ev = proto::PgTransaction {
            commit_lsn: t.commit_lsn,
            end_lsn: 0,
            commit_time_us: t.commit_time_us,
            xid: t.xid,
            chunk: t.chunk,
            last: false,
            ops: t.take_ops(),
        };
        t.chunk += 1;
        t.bytes = 0;
        t.described.clear();
        self.submit(ev, 0).await
    }

    /// Hands one event to the journal; `end_lsn` (non-zero for a transaction's last event)
    /// becomes the slot's flush position once it is durable.
    async fn submit(&mut self, ev: proto::PgTransaction, end_lsn: u64) -> Result<(), Refusal> {
        let payload = Change::Other(proto::change_event::Change::Pg(ev)).encode();
        let ticket = self
            .journal
            .submit(vec![NewRecord { source: self.shared.name.clone(), captured_at_us: now_us(), payload }])
            .await
            .map_err(|e| Refusal::Fatal(SourceError::Journal(e, self.shared.name.to_string())))?;
        if end_lsn > 0 {
            self.last_end = end_lsn;
        }
        self.in_flight.push_back(InFlight { ticket, end_lsn });
        Ok(())
    }

    /// Completes the oldest submission with its outcome: once durable, the slot may move
    /// past it.
    fn settle(
        &mut self,
        r: Result<Vec<crate::journal::RecordMeta>, crate::journal::JournalError>,
    ) -> Result<(), Refusal> {
        let f = self.in_flight.pop_front().expect("settling a submission in flight");
        let metas = r.map_err(|e| Refusal::Fatal(SourceError::Journal(e, self.shared.name.to_string())))?;
        if let Some(last) = metas.last() {
            self.status.status.journaled(last.seq, metas.len() as u64);
        }
        if f.end_lsn > 0 {
            // Durable with the journal's next flush; a stale value only means re-reading
            // transactions the receiver then skips.
            let _ = self.tree.insert(LAST_END_KEY, &f.end_lsn.to_be_bytes());
            self.durable_end = self.durable_end.max(f.end_lsn);
        }
        Ok(())
    }

    /// Reports the durable position to the slot.
    fn confirm(&mut self, repl: &ReplicationClient) {
        if self.durable_end > self.confirmed {
            self.confirmed = self.durable_end;
            repl.update_applied_lsn(Lsn::from_u64(self.confirmed));
        }
    }
}

fn tuple_proto(t: Tuple) -> proto::PgTuple {
    proto::PgTuple {
        values: t
            .0
            .into_iter()
            .map(|v| proto::PgValue {
                value: Some(match v {
                    Value::Null => proto::pg_value::Value::Null(true),
                    Value::Unchanged => proto::pg_value::Value::Unchanged(true),
                    Value::Text(b) | Value::Binary(b) => proto::pg_value::Value::Text(b),
                }),
            })
            .collect(),
    }
}

fn tuple_bytes(t: &proto::PgTuple) -> usize {
    t.values
        .iter()
        .map(|v| match &v.value {
            Some(proto::pg_value::Value::Text(b)) => b.len() + 4,
            _ => 2,
        })
        .sum()
}

/// The enum labels known per enum type, to notice rows carrying labels added or renamed on the
/// source after the type was described (`ALTER TYPE ... ADD VALUE | RENAME VALUE` sends no
/// relation message).
#[derive(Default)]
struct Enums {
    /// Per column type OID: `Some((enum OID, is_array))` for enums and arrays of them.
    kinds: HashMap<u32, Option<(u32, bool)>>,
    /// Per relation: (column index, enum OID, is_array) of its enum columns.
    columns: HashMap<u32, Vec<(usize, u32, bool)>>,
    /// Per enum OID: the labels known.
    labels: HashMap<u32, HashSet<String>>,
}

impl Enums {
    async fn describe(&mut self, shared: &Shared, client: &Client, r: &pgoutput::Relation) -> Result<(), SourceError> {
        let mut cols = Vec::new();
        for (i, c) in r.columns.iter().enumerate() {
            let kind = match self.kinds.get(&c.type_oid) {
                Some(k) => *k,
                None => {
                    let k = catalog::enum_column(shared, client, c.type_oid).await?;
                    self.kinds.insert(c.type_oid, k);
                    k
                }
            };
            if let Some((oid, array)) = kind {
                if let std::collections::hash_map::Entry::Vacant(e) = self.labels.entry(oid) {
                    e.insert(catalog::enum_labels_of(shared, client, oid).await?.into_iter().collect());
                }
                cols.push((i, oid, array));
            }
        }
        if cols.is_empty() {
            self.columns.remove(&r.id);
        } else {
            self.columns.insert(r.id, cols);
        }
        Ok(())
    }

    /// Definitions, with every label, of the enums whose labels `row` of relation `rel`
    /// uses without them being known yet.
    async fn added_labels(
        &mut self,
        shared: &Shared,
        client: &Client,
        rel: u32,
        row: &pgoutput::Tuple,
    ) -> Result<Vec<proto::PgTypeDef>, SourceError> {
        let Some(cols) = self.columns.get(&rel) else { return Ok(Vec::new()) };
        let mut stale = Vec::new();
        for &(i, oid, array) in cols {
            let (Some(Value::Text(v) | Value::Binary(v)), Some(known)) = (row.0.get(i), self.labels.get(&oid)) else {
                continue;
            };
            let text = String::from_utf8_lossy(v);
            let unknown = if array {
                array_elements(&text).iter().any(|l| !known.contains(l.as_str()))
            } else {
                !known.contains(text.as_ref())
            };
            if unknown && !stale.contains(&oid) {
                stale.push(oid);
            }
        }
        let mut defs = Vec::new();
        for oid in stale {
            let now: HashSet<String> = catalog::enum_labels_of(shared, client, oid).await?.into_iter().collect();
            if self.labels.get(&oid) == Some(&now) {
                continue;
            }
            info!(source = %shared.name, type_oid = oid, labels = now.len(), "enum labels added or renamed on the source; passing them on");
            self.labels.insert(oid, now);
            for mut d in catalog::type_defs(shared, client, vec![oid], &mut Default::default()).await? {
                d.labels_current = true;
                defs.push(d);
            }
        }
        Ok(defs)
    }
}

/// The elements of a PostgreSQL array in text form (`{a,"b c",NULL}`, any nesting; NULLs
/// left out).
fn array_elements(text: &str) -> Vec<String> {
    // An explicit lower bound ("[0:1]={...}") precedes the braces.
    let body = match text.find('=') {
        Some(eq) if text.starts_with('[') => &text[eq + 1..],
        _ => text,
    };
    let mut out = Vec::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '}' | ',' | ' ' => {}
            '"' => {
                let mut e = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => e.extend(chars.next()),
                        '"' => break,
                        c => e.push(c),
                    }
                }
                out.push(e);
            }
            c => {
                let mut e = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n == ',' || n == '}' {
                        break;
                    }
                    e.push(n);
                    chars.next();
                }
                if !e.eq_ignore_ascii_case("NULL") {
                    out.push(e);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::array_elements;

    #[test]
    fn array_elements_of_text_arrays() {
        assert_eq!(array_elements("{sad,happy}"), ["sad", "happy"]);
        assert_eq!(array_elements("{}"), Vec::<String>::new());
        assert_eq!(
            array_elements(r#"{"very happy",NULL,"q\"uote","b\\s",ok}"#),
            ["very happy", "q\"uote", "b\\s", "ok"]
        );
        assert_eq!(array_elements("{{a,b},{c,NULL}}"), ["a", "b", "c"]);
        assert_eq!(array_elements("[0:1]={x,y}"), ["x", "y"]);
        assert_eq!(array_elements(r#"{"NULL"}"#), ["NULL"]);
    }
}
