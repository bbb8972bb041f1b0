//! Durability off the visibility path.
//!
//! The applier commits each round's standby transaction with `synchronous_commit = off`: the
//! changes are visible at once, without waiting for the standby's WAL flush. Before that round
//! is acknowledged (and so before the agent may forget it), the session runs the commit's
//! durable half — here: a WAL flush barrier on a second connection. A transaction that gets a
//! transaction id and commits synchronously waits until WAL is flushed up to its own commit
//! record, which lies after every commit that returned before it; so once the barrier returns,
//! the round's transaction (and its position row) is on disk.
//!
//! A barrier proves nothing across a restart of the standby: the commits it should cover may
//! have been lost with the unflushed WAL, and a barrier on the restarted server succeeds. So
//! each barrier carries the server start time the applier's connection saw, and fails when the
//! server it ran on started at another time (a restart, or another host of a multi-host dsn).
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

/// A barrier request: where to answer, and the server start time of the commits it covers.
struct Request {
    reply: Reply,
    started: String,
}

/// Runs WAL flush barriers against the standby.
pub(super) struct Flusher {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    pub(super) fn new(conn: PgConn) -> Result<Flusher, ApplyError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("pg-flush".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| ApplyError::Io { context: "start the standby flush thread".into(), error: e })?;
        Ok(Flusher { tx: Some(tx), thread: Some(thread) })
    }

    /// Asks for a barrier now; the function it returns waits until everything committed before
    /// this call, on the server that started at `started` (see `State::server_started`), is
    /// durable.
    pub(super) fn barrier(&self, started: String) -> impl FnOnce() -> Result<(), ApplyError> + Send + 'static {
        let rx = self.request(started);
        move || answer(rx.and_then(|rx| rx.blocking_recv().ok()))
    }

    /// [`barrier`](Self::barrier), awaited.
    pub(super) async fn barrier_now(&self, started: String) -> Result<(), ApplyError> {
        let rx = self.request(started);
        let reply = match rx {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        answer(reply)
    }

    fn request(&self, started: String) -> Option<oneshot::Receiver<Result<(), String>>> {
        let (reply, rx) = oneshot::channel();
        self.tx.as_ref()?.send(Request { reply, started }).ok()?;
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

fn run(conn: PgConn, rx: mpsc::Receiver<Request>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let mut client: Option<tokio_postgres::Client> = None;
    while let Ok(Request { reply, started }) = rx.recv() {
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
                            client = Some(c);
                        }
                        Err(e) => return Err(format!("connect: {}", describe(&e))),
                    }
                }
                let c = client.as_ref().expect("connected above");
                let barrier = c
                    .simple_query(
                        "SET synchronous_commit = on; \
                         SELECT pg_catalog.txid_current(), extract(epoch FROM pg_catalog.pg_postmaster_start_time())::text",
                    )
                    .await;
                match barrier {
                    Ok(msgs) => {
                        let now = msgs.iter().find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(1).map(str::to_string),
                            _ => None,
                        });
                        return match now {
                            Some(now) if now == started => Ok(()),
                            now => Err(format!(
                                "the standby server started at {} since these commits (then {started}); \
                                 commits not yet flushed before that may be lost, so they are sent again",
                                now.as_deref().unwrap_or("an unknown time")
                            )),
                        };
                    }
                    // A terminated or broken session: the barrier is harmless to repeat (a restarted
                    // server shows in its start time).
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
