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

/// Runs WAL flush barriers against the standby.
pub(super) struct Flusher {
    tx: Option<mpsc::Sender<Reply>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    pub(super) fn new(conn: PgConn) -> Result<Flusher, ApplyError> {
        let (tx, rx) = mpsc::channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name("pg-flush".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| ApplyError::Io { context: "start the standby flush thread".into(), error: e })?;
        Ok(Flusher { tx: Some(tx), thread: Some(thread) })
    }

    /// A function that returns once everything committed before it was called is durable.
    pub(super) fn barrier(&self) -> impl FnOnce() -> Result<(), ApplyError> + Send + 'static {
        let tx = self.tx.clone();
        move || {
            let (reply, rx) = oneshot::channel();
            tx.as_ref()
                .and_then(|t| t.send(reply).ok())
                .ok_or_else(|| target_err("flush the standby's WAL", "flush thread stopped"))?;
            match rx.blocking_recv() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(target_err("flush the standby's WAL", e)),
                Err(_) => Err(target_err("flush the standby's WAL", "flush thread stopped")),
            }
        }
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

fn run(conn: PgConn, rx: mpsc::Receiver<Reply>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let mut client: Option<tokio_postgres::Client> = None;
    while let Ok(reply) = rx.recv() {
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
                match c.batch_execute("SET synchronous_commit = on; SELECT pg_catalog.txid_current()").await {
                    Ok(()) => return Ok(()),
                    // A terminated or broken session: the barrier is harmless to repeat.
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
