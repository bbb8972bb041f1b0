//! The journal: every captured change, durably, under a dense increasing sequence number,
//! until every receiver has acknowledged it (or the size cap forces a lagging receiver to
//! resync).
//!
//! Sources hand changes to the [`JournalWriter`] task through a bounded channel; it appends
//! whatever has queued up, flushes once for the whole group, and only then answers each
//! source — so a source's upstream position advances only after its changes are durable.
//! Shippers follow the durable end through a `watch` channel and read records back.

mod sled_store;

use std::sync::Arc;

use lockstep_common::event::{JournalId, Seq};
use lockstep_common::frame::FrameError;
use lockstep_common::proto;
use tokio::sync::{mpsc, oneshot, watch};

pub use sled_store::SledJournal;

/// Journal failures. `Storage` and `Corrupt` need a person (disk full, damaged data dir);
/// `Closed` means the agent is shutting down.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal storage at {path}: {source}")]
    Storage { path: String, source: sled::Error },
    #[error("journal record {seq} is corrupt: {source}; the journal in data_dir is damaged")]
    Corrupt { seq: u64, source: FrameError },
    #[error("journal record {seq} does not decode: {source}")]
    Decode { seq: u64, source: prost::DecodeError },
    #[error("journal writer has stopped")]
    Closed,
}

/// A change ready to be journaled: its source, capture time and encoded payload.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub source: Arc<str>,
    pub captured_at_us: i64,
    pub payload: Vec<u8>,
}

/// What the lag tracker needs to know about each durable record.
#[derive(Debug, Clone)]
pub struct RecordMeta {
    pub seq: Seq,
    pub source: Arc<str>,
    pub captured_at_us: i64,
    pub bytes: u64,
}

/// Durable storage for journal records and small agent metadata. Implementations are
/// synchronous and may block on I/O; call them from blocking contexts for flushes.
pub trait JournalStore: Send + Sync + 'static {
    /// The identity of this journal incarnation.
    fn journal_id(&self) -> JournalId;
    /// Appends records with the next sequence numbers; not durable until [`flush`](Self::flush).
    fn append(&self, records: &[NewRecord]) -> Result<Vec<RecordMeta>, JournalError>;
    /// Makes every appended record durable.
    fn flush(&self) -> Result<(), JournalError>;
    /// Records with seq >= `from`, in order, until `max_bytes` of payload (at least one record).
    fn read_from(&self, from: Seq, max_records: usize, max_bytes: usize) -> Result<Vec<proto::Event>, JournalError>;
    /// Oldest record still held, or `last_seq + 1` when empty.
    fn first_seq(&self) -> Seq;
    /// Newest record appended (0 when none ever was).
    fn last_seq(&self) -> Seq;
    /// Removes records with seq <= `through`; returns bytes freed.
    fn truncate_through(&self, through: Seq) -> Result<u64, JournalError>;
    /// Bytes of records held.
    fn bytes(&self) -> u64;
    /// Metadata of every record held (for rebuilding lag state at start-up).
    fn scan_meta(&self) -> Result<Vec<RecordMeta>, JournalError>;
    /// Small durable key/value metadata (receiver cursors, source positions).
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, JournalError>;
    /// Stores metadata; durable after the next flush.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), JournalError>;
}

struct AppendRequest {
    records: Vec<NewRecord>,
    reply: oneshot::Sender<Result<Vec<RecordMeta>, String>>,
}

/// Cloneable handle sources use to append.
#[derive(Clone)]
pub struct JournalHandle {
    tx: mpsc::Sender<AppendRequest>,
    durable: watch::Receiver<Seq>,
}

impl JournalHandle {
    /// Appends `records` and waits until they are durable. Returns their metadata (with the
    /// assigned sequence numbers). Not cancel-safe with respect to durability: if cancelled,
    /// the records may or may not have been journaled.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<RecordMeta>, JournalError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut ticket = self.submit(records).await?;
        ticket.durable().await
    }

    /// Hands `records` to the journal writer, which assigns their sequence numbers in the
    /// order of `submit` calls; the ticket resolves once they are durable. Lets a source keep
    /// reading while earlier records are being flushed.
    pub async fn submit(&self, records: Vec<NewRecord>) -> Result<AppendTicket, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(AppendRequest { records, reply }).await.map_err(|_| JournalError::Closed)?;
        Ok(AppendTicket(rx))
    }

    /// Follows the durable end of the journal.
    pub fn durable(&self) -> watch::Receiver<Seq> {
        self.durable.clone()
    }
}

/// Records submitted to the journal (see [`JournalHandle::submit`]).
pub struct AppendTicket(oneshot::Receiver<Result<Vec<RecordMeta>, String>>);

impl AppendTicket {
    /// Waits until the records are durable; returns their metadata. Call once.
    pub async fn durable(&mut self) -> Result<Vec<RecordMeta>, JournalError> {
        Self::outcome((&mut self.0).await.map_err(|_| ()))
    }

    /// The outcome if the records are durable (or failed) already.
    pub fn try_durable(&mut self) -> Option<Result<Vec<RecordMeta>, JournalError>> {
        match self.0.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => None,
            r => Some(Self::outcome(r.map_err(|_| ()))),
        }
    }

    fn outcome(r: Result<Result<Vec<RecordMeta>, String>, ()>) -> Result<Vec<RecordMeta>, JournalError> {
        match r {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(msg)) => {
                Err(JournalError::Storage { path: msg, source: sled::Error::Unsupported("append failed".into()) })
            }
            Err(()) => Err(JournalError::Closed),
        }
    }
}

/// The group-commit task: the only writer of the journal.
pub struct JournalWriter {
    store: Arc<dyn JournalStore>,
    rx: mpsc::Receiver<AppendRequest>,
    durable_tx: watch::Sender<Seq>,
    on_durable: mpsc::UnboundedSender<Vec<RecordMeta>>,
}

impl JournalWriter {
    /// Creates the writer and the handle sources use. Durable record metadata is also sent to
    /// `on_durable` (for lag tracking and metrics).
    pub fn new(
        store: Arc<dyn JournalStore>,
        on_durable: mpsc::UnboundedSender<Vec<RecordMeta>>,
    ) -> (Self, JournalHandle) {
        let (tx, rx) = mpsc::channel(1024);
        let (durable_tx, durable) = watch::channel(store.last_seq());
        (JournalWriter { store, rx, durable_tx, on_durable }, JournalHandle { tx, durable })
    }

    /// Runs until every handle is dropped. A storage error is fatal.
    ///
    /// The loop runs on a thread of its own: a flush blocks, and handing each group to the
    /// blocking pool would add two thread wake-ups to every small transaction's latency.
    pub async fn run(self) -> Result<(), JournalError> {
        let (done, finished) = oneshot::channel();
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || {
                let _ = done.send(self.run_blocking());
            })
            .map_err(|e| JournalError::Storage { path: "journal writer thread".into(), source: sled::Error::Io(e) })?;
        finished.await.unwrap_or(Err(JournalError::Closed))
    }

    fn run_blocking(mut self) -> Result<(), JournalError> {
        const MAX_GROUP_BYTES: usize = 16 << 20;
        while let Some(first) = self.rx.blocking_recv() {
            let mut group = vec![first];
            let mut bytes: usize = group[0].records.iter().map(|r| r.payload.len()).sum();
            while bytes < MAX_GROUP_BYTES {
                match self.rx.try_recv() {
                    Ok(req) => {
                        bytes += req.records.iter().map(|r| r.payload.len()).sum::<usize>();
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            let t = std::time::Instant::now();
            let result = (|| -> Result<Vec<Vec<RecordMeta>>, JournalError> {
                let mut metas = Vec::with_capacity(group.len());
                for r in &group {
                    metas.push(self.store.append(&r.records)?);
                }
                let appended = t.elapsed();
                self.store.flush()?;
                if t.elapsed() > std::time::Duration::from_millis(20) {
                    tracing::debug!(
                        append_ms = appended.as_millis() as u64,
                        flush_ms = (t.elapsed() - appended).as_millis() as u64,
                        "slow journal group"
                    );
                }
                Ok(metas)
            })();
            match result {
                Ok(metas) => {
                    // Shippers first: they are on the way to the standby; the sources'
                    // answers and the lag tracker's reports are not.
                    if let Some(last) = metas.iter().rev().find_map(|m| m.last().map(|x| x.seq)) {
                        tracing::trace!(seq = last.0, "journal durable");
                        self.durable_tx.send_replace(last);
                    }
                    for (req, m) in group.into_iter().zip(metas) {
                        let _ = self.on_durable.send(m.clone());
                        let _ = req.reply.send(Ok(m));
                    }
                }
                Err(e) => {
                    for req in group {
                        let _ = req.reply.send(Err(e.to_string()));
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
