//! The sqlite source: every committed transaction of a SQLite database in WAL mode, read
//! from its write-ahead log while the application keeps writing and checkpointing.
//!
//! - [`wal`]: the WAL file format — headers, frames, checksums, committed transactions.
//! - [`shm`]: a read-only look at the WAL index and at other processes' locks on it.
//! - [`pin`]: the read transaction that keeps the log from being reset, rolled forward on two
//!   connections, and stepping aside for a checkpoint stuck on its read-mark slot.
//! - [`follow`]: the long-lived [`Source`]: pins the log with a read transaction so no
//!   checkpoint can reset it past a frame not yet read, ships each committed transaction as
//!   the pages it wrote, and lets go of the log only at moments when doing so cannot lose a
//!   frame (see its module docs for the argument).
//! - The [`Snapshotter`] here seeds a receiver: the follower briefly takes the write lock,
//!   reads the log to its end and opens a read transaction at exactly that point; every page
//!   is then read inside it through `sqlite_dbpage`, and the receiver skips the journal's
//!   transactions at or below that point.

mod follow;
mod pin;
mod shm;
pub mod wal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use lockstep_common::config::SourceConfig;
use lockstep_common::event::{Change, SourceKind};
use lockstep_common::proto;
use tokio::sync::{mpsc, oneshot};

use super::{Snapshotter, Source, SourceContext, SourceError};

/// Page bytes per snapshot piece and per journal event of a large transaction.
pub(crate) const PIECE_BYTES: usize = 4 << 20;

/// The pages of one piece of a transaction or snapshot, compressed, gathered until about
/// [`PIECE_BYTES`] of them are held.
#[derive(Default)]
pub(crate) struct Piece {
    pages: BTreeMap<u32, bytes::Bytes>,
    bytes: usize,
}

impl Piece {
    /// Adds a page, compressed; a later version of a page replaces the one held.
    pub(crate) fn add(&mut self, pgno: u32, page: &[u8]) -> std::io::Result<()> {
        let data = bytes::Bytes::from(zstd::bulk::compress(page, 1)?);
        self.bytes += data.len();
        if let Some(old) = self.pages.insert(pgno, data) {
            self.bytes -= old.len();
        }
        Ok(())
    }

    pub(crate) fn is_full(&self) -> bool {
        self.bytes >= PIECE_BYTES
    }

    /// The pages held, in page order, leaving the piece empty.
    pub(crate) fn take(&mut self) -> Vec<proto::SqlitePage> {
        self.bytes = 0;
        std::mem::take(&mut self.pages).into_iter().map(|(pgno, data)| proto::SqlitePage { pgno, data }).collect()
    }
}

/// A request from the snapshotter to the follower for a consistent starting point.
pub(crate) struct SnapRequest {
    pub reply: oneshot::Sender<Result<SnapStart, String>>,
}

/// A read transaction on the database at exactly (gen, frame) of the follower's stream.
pub(crate) struct SnapStart {
    pub conn: rusqlite::Connection,
    pub gen: u64,
    pub frame: u32,
    pub page_size: u32,
    pub db_pages: u32,
}

pub(crate) struct Shared {
    pub name: Arc<str>,
    pub path: PathBuf,
    pub switch_to_wal: bool,
    pub snap_tx: std::sync::mpsc::Sender<SnapRequest>,
    pub snap_rx: Mutex<Option<std::sync::mpsc::Receiver<SnapRequest>>>,
}

impl Shared {
    pub fn err(&self, problem: impl Into<String>) -> SourceError {
        SourceError::Other { source_name: self.name.to_string(), problem: problem.into() }
    }
}

/// A configured sqlite source, ready to run.
pub struct SqliteSource {
    shared: Arc<Shared>,
}

impl SqliteSource {
    /// Builds the source from its config (`kind = "sqlite"`, `path`, optional
    /// `switch_to_wal`). Does not open the database yet.
    pub fn new(cfg: &SourceConfig) -> Result<SqliteSource, SourceError> {
        let other = |problem: String| SourceError::Other { source_name: cfg.name.clone(), problem };
        if cfg.kind != SourceKind::Sqlite {
            return Err(other(format!("kind is {}, not sqlite", cfg.kind)));
        }
        let path = cfg.path.clone().ok_or_else(|| other("path is required for a sqlite source".into()))?;
        let (snap_tx, snap_rx) = std::sync::mpsc::channel();
        Ok(SqliteSource {
            shared: Arc::new(Shared {
                name: cfg.name.as_str().into(),
                path,
                switch_to_wal: cfg.switch_to_wal,
                snap_tx,
                snap_rx: Mutex::new(Some(snap_rx)),
            }),
        })
    }

    pub fn snapshotter(&self) -> Arc<dyn Snapshotter> {
        Arc::new(SqliteSnapshotter { shared: self.shared.clone() })
    }
}

impl Source for SqliteSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(follow::run(self.shared, ctx))
    }
}

struct SqliteSnapshotter {
    shared: Arc<Shared>,
}

impl Snapshotter for SqliteSnapshotter {
    fn snapshot(&self, tx: mpsc::Sender<Change>) -> BoxFuture<'static, Result<(), SourceError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            shared.snap_tx.send(SnapRequest { reply }).map_err(|_| shared.err("source stopped"))?;
            let start = rx
                .await
                .map_err(|_| shared.err("source stopped before the snapshot could start"))?
                .map_err(|e| shared.err(format!("start a snapshot: {e}")))?;
            let name = shared.clone();
            tokio::task::spawn_blocking(move || send_pages(start, &tx))
                .await
                .map_err(|e| name.err(format!("snapshot task: {e}")))?
                .map_err(|e| name.err(format!("read pages for a snapshot of {}: {e}", name.path.display())))
        })
    }
}

/// Compressed snapshot bytes held in memory so that the snapshot's read transaction can end
/// before they are sent (see [`send_pages`]).
const SPOOL_BYTES: usize = 256 << 20;

/// Reads every page inside the snapshot's read transaction and sends it in pieces.
///
/// Sending waits for the receiver (flow control), and an application checkpoint that resets
/// the log (RESTART, TRUNCATE) waits for every reader — this read transaction too, which,
/// unlike the follower's pin, cannot step aside. So the pages are read into memory first
/// (compressed, up to [`SPOOL_BYTES`]) and the transaction ends before anything is sent. A
/// larger database is streamed from inside the transaction once the spool is full.
fn send_pages(start: SnapStart, tx: &mpsc::Sender<Change>) -> rusqlite::Result<()> {
    let piece = |pages: Vec<proto::SqlitePage>, chunk: u32, last: bool| {
        Change::Other(proto::change_event::Change::Sqlite(proto::SqliteFrames {
            gen: start.gen,
            frame: start.frame,
            page_size: start.page_size,
            db_pages: start.db_pages,
            chunk,
            last,
            pages,
            snapshot: true,
            zstd: true,
        }))
    };
    let mut spool: Vec<Change> = Vec::new();
    let mut spooled = 0usize;
    let mut streaming = false;
    // Queues or sends one piece; false once the receiving side has gone.
    let mut out = |c: Change, bytes: usize| -> bool {
        if !streaming && spooled + bytes <= SPOOL_BYTES {
            spooled += bytes;
            spool.push(c);
            return true;
        }
        streaming = true;
        spool.drain(..).chain(std::iter::once(c)).all(|c| tx.blocking_send(c).is_ok())
    };
    {
        let mut stmt = start.conn.prepare("SELECT pgno, data FROM sqlite_dbpage WHERE pgno <= ?1 ORDER BY pgno")?;
        let mut rows = stmt.query([start.db_pages])?;
        let mut pages = Piece::default();
        let mut chunk = 0u32;
        while let Some(row) = rows.next()? {
            let data: Vec<u8> = row.get(1)?;
            pages.add(row.get(0)?, &data).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            if pages.is_full() {
                let bytes = pages.bytes;
                if !out(piece(pages.take(), chunk, false), bytes) {
                    return Ok(());
                }
                chunk += 1;
            }
        }
        let bytes = pages.bytes;
        if !out(piece(pages.take(), chunk, true), bytes) {
            return Ok(());
        }
    }
    // Everything is read (or already sent): let checkpoints through before sending the rest.
    start.conn.execute_batch("ROLLBACK")?;
    for c in spool {
        if tx.blocking_send(c).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
