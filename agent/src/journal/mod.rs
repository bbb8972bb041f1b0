//! The journal: every captured change, durably, under a dense increasing sequence number,
//! until every receiver has acknowledged it (or the size cap forces a lagging receiver to
//! resync).
//!
//! Sources hand changes to the [`JournalWriter`] task through a bounded channel; it appends
//! whatever has queued up, flushes once for the whole group, and only then answers each
//! source — so a source's upstream position advances only after its changes are durable.
//! Shippers follow the appended and durable ends through `watch` channels and read records
//! back; records not yet durable go out only where a lost record cannot harm a receiver (see
//! [`JournalStore::ship_limit`] and `shipper`).

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
    /// Appended records up to this seq may be shipped before they are durable: a crash that
    /// loses them also makes the reopened journal continue above it, so a receiver that
    /// applied them never sees their seqs reused for other changes.
    fn ship_limit(&self) -> Seq;
    /// `seq`, or the first seq after it when it lies in a range that was never used (seqs
    /// skipped on reopening after records were lost).
    fn skip_gap(&self, seq: Seq) -> Seq;
    /// Flushes everything and withdraws the reservation above the last seq, for a clean stop
    /// after which nothing is appended: the next open then leaves no gap.
    fn release_horizon(&self) -> Result<(), JournalError>;
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

/// Where a source learns that its records are durable (or that appending them failed).
type Reply = oneshot::Sender<Result<Vec<RecordMeta>, String>>;

struct AppendRequest {
    records: Vec<NewRecord>,
    reply: Reply,
}

/// Cloneable handle sources use to append.
#[derive(Clone)]
pub struct JournalHandle {
    tx: mpsc::Sender<AppendRequest>,
    durable: watch::Receiver<Seq>,
    appended: watch::Receiver<Seq>,
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

    /// Follows the appended end of the journal (ahead of the durable end while a flush runs).
    pub fn appended(&self) -> watch::Receiver<Seq> {
        self.appended.clone()
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
///
/// Two threads: one appends whatever has queued up and announces it on the `appended` watch
/// (shippers may send it right away, within the store's [`JournalStore::ship_limit`]); the
/// other flushes the appended groups, announces the durable end and only then answers the
/// sources. So a slow fsync delays the sources' upstream positions, not the standby.
pub struct JournalWriter {
    store: Arc<dyn JournalStore>,
    rx: mpsc::Receiver<AppendRequest>,
    appended_tx: watch::Sender<Seq>,
    durable_tx: watch::Sender<Seq>,
    on_durable: mpsc::UnboundedSender<Vec<RecordMeta>>,
}

/// An appended group waiting for the flush thread: each source's reply with its records.
type FlushJob = Vec<(Reply, Vec<RecordMeta>)>;

/// The newest seq in a group.
fn last_of(group: &FlushJob) -> Option<Seq> {
    group.iter().rev().find_map(|(_, m)| m.last().map(|x| x.seq))
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
        let (appended_tx, appended) = watch::channel(store.last_seq());
        (JournalWriter { store, rx, appended_tx, durable_tx, on_durable }, JournalHandle { tx, durable, appended })
    }

    /// Runs until every handle is dropped. A storage error is fatal.
    ///
    /// Both loops run on threads of their own: a flush blocks, and handing each group to the
    /// blocking pool would add two thread wake-ups to every small transaction's latency.
    pub async fn run(self) -> Result<(), JournalError> {
        let JournalWriter { store, rx, appended_tx, durable_tx, on_durable } = self;
        let spawn_err = |e| JournalError::Storage { path: "journal writer thread".into(), source: sled::Error::Io(e) };
        // Bounded: the appender waits when the disk falls this many groups behind.
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<FlushJob>(64);
        let (a_done, a_finished) = oneshot::channel();
        let a_store = store.clone();
        std::thread::Builder::new()
            .name("journal-append".into())
            .spawn(move || {
                let _ = a_done.send(append_loop(&*a_store, rx, &appended_tx, &jobs_tx));
            })
            .map_err(spawn_err)?;
        let (f_done, f_finished) = oneshot::channel();
        std::thread::Builder::new()
            .name("journal-flush".into())
            .spawn(move || {
                let _ = f_done.send(flush_loop(&*store, jobs_rx, &durable_tx, &on_durable));
            })
            .map_err(spawn_err)?;
        // The flush thread ends after the appender (its channel closes), or first on a
        // storage error: then the appender, which may be waiting for requests, is left to
        // fail on its next hand-off while the agent stops.
        f_finished.await.unwrap_or(Err(JournalError::Closed))?;
        a_finished.await.unwrap_or(Err(JournalError::Closed))
    }
}

fn append_loop(
    store: &dyn JournalStore,
    mut rx: mpsc::Receiver<AppendRequest>,
    appended_tx: &watch::Sender<Seq>,
    jobs: &std::sync::mpsc::SyncSender<FlushJob>,
) -> Result<(), JournalError> {
    const MAX_GROUP_BYTES: usize = 16 << 20;
    while let Some(first) = rx.blocking_recv() {
        let mut requests = vec![first];
        let mut bytes: usize = requests[0].records.iter().map(|r| r.payload.len()).sum();
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(req) => {
                    bytes += req.records.iter().map(|r| r.payload.len()).sum::<usize>();
                    requests.push(req);
                }
                Err(_) => break,
            }
        }
        let mut group = Vec::with_capacity(requests.len());
        let mut failed = None;
        for req in requests {
            if failed.is_some() {
                let _ = req.reply.send(Err("an earlier append failed".into()));
                continue;
            }
            match store.append(&req.records) {
                Ok(m) => group.push((req.reply, m)),
                Err(e) => {
                    let _ = req.reply.send(Err(e.to_string()));
                    failed = Some(e);
                }
            }
        }
        if let Some(last) = last_of(&group) {
            tracing::trace!(seq = last.0, "journal appended");
            appended_tx.send_replace(last);
        }
        // Records appended before a failure still get their flush and answers.
        if jobs.send(group).is_err() {
            return Err(failed.unwrap_or(JournalError::Closed));
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(())
}

fn flush_loop(
    store: &dyn JournalStore,
    jobs: std::sync::mpsc::Receiver<FlushJob>,
    durable_tx: &watch::Sender<Seq>,
    on_durable: &mpsc::UnboundedSender<Vec<RecordMeta>>,
) -> Result<(), JournalError> {
    let delay = test_flush_delay();
    while let Ok(first) = jobs.recv() {
        let mut group = first;
        while let Ok(more) = jobs.try_recv() {
            group.extend(more);
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let t = std::time::Instant::now();
        if let Err(e) = store.flush() {
            for (reply, _) in group {
                let _ = reply.send(Err(e.to_string()));
            }
            return Err(e);
        }
        if t.elapsed() > std::time::Duration::from_millis(20) {
            tracing::debug!(flush_ms = t.elapsed().as_millis() as u64, "slow journal flush");
        }
        // Shippers first: records they have not sent early are on their way to the standby;
        // the sources' answers and the lag tracker's reports are not.
        if let Some(last) = last_of(&group) {
            tracing::trace!(seq = last.0, "journal durable");
            durable_tx.send_replace(last);
        }
        for (reply, m) in group {
            let _ = on_durable.send(m.clone());
            let _ = reply.send(Ok(m));
        }
    }
    Ok(())
}

/// Test hook, the failpoint `journal::hold_flushes` (`return(MS)`): holds every journal flush
/// back MS milliseconds (and stops sled's own periodic flush), so tests can kill the agent while
/// records are shipped but not yet durable. It exists only in builds with the `failpoints`
/// feature, which release builds never enable; elsewhere this is always `None`.
pub(crate) fn test_flush_delay() -> Option<std::time::Duration> {
    fail::fail_point!("journal::hold_flushes", |ms| {
        ms.and_then(|v| v.parse().ok()).map(std::time::Duration::from_millis)
    });
    None
}
