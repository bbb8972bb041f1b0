//! Durability off the visibility path.
//!
//! The applier commits each round's standby transaction with `synchronous_commit = off`: the
//! changes are visible at once, without waiting for the standby's WAL flush. Before that round
//! is acknowledged (and so before the agent may forget it), the session runs the commit's
//! durable half — here: a WAL flush barrier on a second connection. A transaction that writes
//! WAL and commits synchronously waits until WAL is flushed up to its own commit record, which
//! lies after every commit that returned before it; so once the barrier returns, the round's
//! transaction (and its position row) is on disk. It must write WAL itself: PostgreSQL commits
//! a transaction that wrote none asynchronously even with `synchronous_commit = on`, a
//! transaction id (`txid_current()`) notwithstanding — which is what the barrier once relied
//! on, and a crash of the standby then lost rounds already acknowledged. So the barrier
//! rewrites the position row unchanged (`SET seq = seq`), and reads it back in the same
//! statement. With no position row there is nothing to make durable, and nothing is written.
//!
//! A barrier proves nothing about commits a crash of the standby already threw away (a
//! crash-restart after a backend was killed, an immediate shutdown, a failover): it would
//! succeed on the recovered server. So the barrier transaction also reads the position row and
//! fails unless it shows at least the seq the barrier is to make durable.
//!
//! The barrier connection lives on its own thread with its own runtime, so it runs while the
//! applier's thread applies the next round.

use std::sync::mpsc;
use std::thread::JoinHandle;

use lockstep_common::pgtls::PgConn;
use tokio::sync::oneshot;
use tracing::debug;

use super::{describe, target_err};
use crate::applier::ApplyError;

type Reply = oneshot::Sender<Result<(), String>>;

/// A barrier request: where to answer, and the seq whose commit it covers (`None`: whatever
/// is committed).
struct Request {
    reply: Reply,
    seq: Option<u64>,
}

/// Runs WAL flush barriers against the standby.
pub(super) struct Flusher {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Barriers for the position row of `agent`/`source`.
    pub(super) fn new(conn: PgConn, agent: String, source: String) -> Result<Flusher, ApplyError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("pg-flush".into())
            .spawn(move || run(conn, agent, source, rx))
            .map_err(|e| ApplyError::Io { context: "start the standby flush thread".into(), error: e })?;
        Ok(Flusher { tx: Some(tx), thread: Some(thread) })
    }

    /// Asks for a barrier now; the function it returns waits until everything committed before
    /// this call is durable, and fails when the standby's position row is below `seq` (lost).
    pub(super) fn barrier(&self, seq: Option<u64>) -> impl FnOnce() -> Result<(), ApplyError> + Send + 'static {
        let rx = self.request(seq);
        move || answer(rx.and_then(|rx| rx.blocking_recv().ok()))
    }

    /// [`barrier`](Self::barrier), awaited.
    pub(super) async fn barrier_now(&self, seq: Option<u64>) -> Result<(), ApplyError> {
        let rx = self.request(seq);
        let reply = match rx {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        answer(reply)
    }

    fn request(&self, seq: Option<u64>) -> Option<oneshot::Receiver<Result<(), String>>> {
        let (reply, rx) = oneshot::channel();
        self.tx.as_ref()?.send(Request { reply, seq }).ok()?;
        Some(rx)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(reply: Option<Result<(), String>>) -> Result<(), ApplyError> {
    match reply {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(target_err("flush the standby's WAL", e)),
        None => Err(target_err("flush the standby's WAL", "flush thread stopped")),
    }
}

fn run(conn: PgConn, agent: String, source: String, rx: mpsc::Receiver<Request>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    // The connection and its prepared barrier statement.
    let mut client: Option<(tokio_postgres::Client, tokio_postgres::Statement)> = None;
    while let Ok(Request { reply, seq }) = rx.recv() {
        let r = rt.block_on(async {
            // One reconnect per request: a broken connection shows up as the barrier failing.
            for attempt in 0..2 {
                if client.is_none() {
                    match conn.connect().await {
                        Ok((c, conn)) => {
                            tokio::spawn(async move {
                                if let Err(e) = conn.await {
                                    debug!(error = %e, "standby flush connection ended");
                                }
                            });
                            // One autocommit transaction that writes WAL (the position row,
                            // rewritten unchanged) commits synchronously; it returns the row.
                            let setup = async {
                                c.batch_execute("SET synchronous_commit = on").await?;
                                c.prepare(
                                    "UPDATE lockstep.applied_position SET seq = seq \
                                     WHERE agent = $1 AND source = $2 RETURNING seq",
                                )
                                .await
                            };
                            match setup.await {
                                Ok(stmt) => client = Some((c, stmt)),
                                Err(e) => return Err(format!("set up the flush connection: {}", describe(&e))),
                            }
                        }
                        Err(e) => return Err(format!("connect: {}", describe(&e))),
                    }
                }
                let (c, stmt) = client.as_ref().expect("connected above");
                let barrier = c.query_opt(stmt, &[&agent, &source]).await;
                match barrier {
                    Ok(row) => {
                        let kept: Option<i64> = row.map(|r| r.get(0));
                        return match (seq, kept) {
                            (None, _) => Ok(()),
                            (Some(want), Some(kept)) if kept as u64 >= want => Ok(()),
                            (Some(want), kept) => {
                                // Perhaps another server (a multi-host dsn): connect afresh next time.
                                client = None;
                                Err(format!(
                                    "the standby's position row shows seq {} where commits up to {want} were made: \
                                     the standby lost them (a crash-restart or failover), so they are sent again",
                                    kept.map_or("none".to_string(), |k| k.to_string())
                                ))
                            }
                        };
                    }
                    // A terminated or broken session: the barrier is harmless to repeat (commits a
                    // restart lost show in the position row).
                    Err(_) if attempt == 0 => client = None,
                    Err(e) => {
                        client = None;
                        return Err(describe(&e));
                    }
                }
            }
            Err("standby connection closed".to_string())
        });
        let _ = reply.send(r);
    }
}
