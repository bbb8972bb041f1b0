//! Seeding a receiver with a consistent copy of every published table.
//!
//! A temporary logical slot is created on a replication connection with an exported snapshot;
//! its consistent point splits history exactly: transactions committed before it are visible
//! in the snapshot, later ones are decoded from slots. Each published table is copied with
//! `COPY ... TO STDOUT` inside a transaction that imports the snapshot, and sent as its
//! catalog definition plus COPY text data in ~1 MiB pieces of whole lines. Up to two connections,
//! each with the snapshot imported, copy tables at the same time; their pieces interleave
//! (each piece names its table), so the receiver can fill tables in parallel too. A closing
//! `PgSnapshotEnd` carries the consistent point, so the receiver skips the journal's
//! transactions the copy already holds (commit LSN below it).
//!
//! The source's own slot exists before any snapshot starts (its consistent point is earlier),
//! so no transaction can fall between the copy and the journal. A snapshot interrupted by a
//! restart is simply taken again: the receiver commits nothing of it until `ResyncEnd`.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::StreamExt;
use lockstep_common::event::Change;
use lockstep_common::proto::{self, pg_op::Op};
use pgwire_replication::ReplicationClient;
use tokio::sync::mpsc;

use super::catalog::{self, db_message, parse_lsn};
use super::{ident, literal, Shared};
use crate::source::{Snapshotter, SourceError};

/// COPY data per event.
const PIECE_BYTES: usize = 1 << 20;
/// Connections copying tables at the same time (PostgreSQL's own subscriptions sync two
/// tables at a time by default, `max_sync_workers_per_subscription`).
const SNAPSHOT_CONNECTIONS: usize = 2;

pub(crate) struct PgSnapshotter {
    pub(crate) shared: Arc<Shared>,
}

impl Snapshotter for PgSnapshotter {
    fn snapshot(&self, tx: mpsc::Sender<Change>) -> BoxFuture<'static, Result<(), SourceError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            // Wait for the source's slot (see the module docs).
            let mut ready = shared.slot_ready.subscribe();
            if ready.wait_for(|r| *r).await.is_err() {
                return Err(shared.err("source stopped before its replication slot was ready"));
            }
            take(&shared, &tx).await
        })
    }
}

async fn take(shared: &Shared, tx: &mpsc::Sender<Change>) -> Result<(), SourceError> {
    let server = shared.conn.server();
    let temp_slot = format!("lockstep_snap_{}_{:08x}", std::process::id(), rand::random::<u32>());
    let mut repl = ReplicationClient::connect_gated(shared.conn.replication(&temp_slot, &shared.publication, false))
        .await
        .map_err(|e| shared.err(format!("open replication connection to {server} for a snapshot: {e}")))?;
    let rows = repl
        .simple_query(&format!("CREATE_REPLICATION_SLOT {temp_slot} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"))
        .await
        .map_err(|e| shared.err(format!("create temporary slot for a snapshot on {server}: {e}")))?;
    let text = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i).cloned().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or_else(|| shared.err(format!("CREATE_REPLICATION_SLOT returned no column {i}")))
    };
    let consistent_point =
        parse_lsn(&text(1)?).ok_or_else(|| shared.err("CREATE_REPLICATION_SLOT returned a bad consistent point"))?;
    let snapshot_name = text(2)?;
    tracing::info!(source = %shared.name, lsn = %pgwire_replication::Lsn::from_u64(consistent_point), "snapshot exported");

    // Every connection imports the snapshot before the exporting session may go.
    let import = || async {
        let client = catalog::connect(shared).await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                literal(&snapshot_name)
            ))
            .await
            .map_err(|e| shared.err(format!("import the snapshot on {server}: {}", db_message(&e))))?;
        Ok::<_, SourceError>(client)
    };
    let first = import().await?;
    let tables: Vec<(String, String)> = first
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&shared.publication],
        )
        .await
        .map_err(|e| shared.err(format!("list published tables on {server}: {}", db_message(&e))))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut clients = vec![first];
    // The extra connections only speed the copy up: without them (a server short of
    // connections, say) the copy goes on with fewer.
    while clients.len() < SNAPSHOT_CONNECTIONS.min(tables.len()) {
        match import().await {
            Ok(c) => clients.push(c),
            Err(e) => {
                tracing::warn!(source = %shared.name, error = %e, "no extra connection for the snapshot; copying one table at a time");
                break;
            }
        }
    }
    // The snapshot is imported; the exporting session (and its temporary slot) may go.
    drop(repl);
    let count = tables.len();
    // Tables are copied a few at a time, each connection taking the next table when it is done
    // with one; their pieces interleave on the way to the receiver.
    let queue = std::sync::Mutex::new(tables.into_iter());
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
    let copiers = clients.iter().map(|client| async {
        let mut rows = 0u64;
        while let Some((schema, table)) = next() {
            rows += copy_table(shared, client, &schema, &table, tx).await?;
        }
        Ok::<u64, SourceError>(rows)
    });
    let rows_total: u64 = futures::future::try_join_all(copiers).await?.into_iter().sum();
    for client in &clients {
        let _ = client.batch_execute("COMMIT").await;
    }
    send(tx, vec![proto::PgOp { op: Some(Op::SnapshotEnd(proto::PgSnapshotEnd { lsn: consistent_point })) }]).await?;
    tracing::info!(source = %shared.name, tables = count, rows = rows_total, "snapshot sent");
    Ok(())
}

/// Copies one table inside the imported snapshot: its catalog definition, then its rows as
/// COPY text in pieces of whole lines, each piece an event carrying the definition again.
/// Returns the rows copied.
async fn copy_table(
    shared: &Shared,
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    tx: &mpsc::Sender<Change>,
) -> Result<u64, SourceError> {
    let server = shared.conn.server();
    let rel = catalog::table_relation(shared, client, schema, table).await?;
    let rel_id = rel.id;
    let types =
        catalog::type_defs(shared, client, rel.columns.iter().map(|c| c.type_oid).collect(), &mut Default::default())
            .await?;
    let relation = || {
        let mut ops: Vec<proto::PgOp> =
            types.iter().map(|t| proto::PgOp { op: Some(Op::TypeDef(t.clone())) }).collect();
        ops.push(proto::PgOp { op: Some(Op::Relation(rel.clone())) });
        ops
    };
    let cols: Vec<String> = rel.columns.iter().map(|c| ident(&c.name)).collect();
    let copy = format!("COPY {}.{} ({}) TO STDOUT", ident(schema), ident(table), cols.join(", "));
    let stream = client
        .copy_out(copy.as_str())
        .await
        .map_err(|e| shared.err(format!("copy {schema}.{table} on {server}: {}", db_message(&e))))?;
    futures::pin_mut!(stream);
    let mut buf: Vec<u8> = Vec::with_capacity(PIECE_BYTES * 2);
    let mut sent_any = false;
    let mut rows = 0u64;
    loop {
        let next = stream.next().await;
        let end = next.is_none();
        if let Some(chunk) = next {
            let chunk =
                chunk.map_err(|e| shared.err(format!("copy {schema}.{table} on {server}: {}", db_message(&e))))?;
            buf.extend_from_slice(&chunk);
        }
        if buf.len() >= PIECE_BYTES || (end && (!buf.is_empty() || !sent_any)) {
            // Whole lines only; the rest waits for more data.
            let cut = if end { buf.len() } else { buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) };
            if cut > 0 || !sent_any {
                let rest = buf.split_off(cut);
                let data = std::mem::replace(&mut buf, rest);
                rows += data.iter().filter(|&&b| b == b'\n').count() as u64;
                let mut ops = relation();
                if !data.is_empty() {
                    ops.push(proto::PgOp { op: Some(Op::Copy(proto::PgCopy { rel: rel_id, data: data.into() })) });
                }
                send(tx, ops).await?;
                sent_any = true;
            }
        }
        if end {
            return Ok(rows);
        }
    }
}

/// Sends one snapshot event. A closed channel means the shipper gave up on this session.
async fn send(tx: &mpsc::Sender<Change>, ops: Vec<proto::PgOp>) -> Result<(), SourceError> {
    let ev = proto::PgTransaction { ops, last: true, ..Default::default() };
    tx.send(Change::Other(proto::change_event::Change::Pg(ev)))
        .await
        .map_err(|_| SourceError::Other { source_name: String::new(), problem: "snapshot no longer wanted".into() })
}
