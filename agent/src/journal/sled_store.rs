//! The sled-backed `JournalStore`. Records live in tree `events` keyed by big-endian seq, each
//! value a framed (version + crc32) encoded `proto::Event`; `meta` holds the journal id,
//! receiver cursors, source positions, the reserved seq horizon and the gaps it left. sled
//! stays behind this file.
//!
//! Records may be shipped before they are flushed (see [`JournalStore::ship_limit`]), so a
//! crash can lose seqs a receiver has already applied. Such seqs must never be handed out
//! again: every flush also makes durable a horizon a little ahead of the last seq, only seqs
//! at or below a durable horizon go out early, and a reopened journal continues above the
//! horizon, recording the unused seqs in between as a gap.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use lockstep_common::event::{JournalId, Seq};
use lockstep_common::{frame, proto};
use prost::Message;

use super::{JournalError, JournalStore, NewRecord, RecordMeta};

/// sled implementation of [`JournalStore`].
pub struct SledJournal {
    path: String,
    db: sled::Db,
    events: sled::Tree,
    meta: sled::Tree,
    id: JournalId,
    /// Last assigned seq; appends are serialized by `append_lock`.
    last: AtomicU64,
    bytes: AtomicU64,
    append_lock: Mutex<()>,
    /// Highest seq reserved in `meta` (written, maybe not yet flushed).
    horizon: AtomicU64,
    /// Highest seq reserved by a completed flush: records up to here may be shipped early.
    horizon_durable: AtomicU64,
    /// Seq ranges never used (left by reopening above a horizon), oldest first.
    gaps: RwLock<Vec<(u64, u64)>>,
}

/// How far ahead of the last seq the horizon is reserved. A crash skips at most this many
/// seqs; the horizon is rewritten (one small metadata write) every `HORIZON / 2` records.
const HORIZON: u64 = 4096;
const HORIZON_KEY: &str = "horizon";
const GAPS_KEY: &str = "gaps";

impl SledJournal {
    /// Opens (or creates) the journal under `dir`.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let path = dir.display().to_string();
        let st = |source| JournalError::Storage { path: path.clone(), source };
        // sled's own periodic flush makes metadata (cursors, positions) durable when no
        // records arrive; the test hook that holds flushes back stops it too.
        let every = if super::test_flush_delay().is_some() { None } else { Some(1000) };
        let db = sled::Config::new().path(dir).cache_capacity(256 << 20).flush_every_ms(every).open().map_err(st)?;
        let events = db.open_tree("events").map_err(st)?;
        let meta = db.open_tree("meta").map_err(st)?;
        let id = match meta.get("journal_id").map_err(st)? {
            Some(v) => JournalId::from_slice(&v)
                .ok_or_else(|| JournalError::Corrupt { seq: 0, source: frame::FrameError::Short(v.len()) })?,
            None => {
                let id = JournalId::random();
                meta.insert("journal_id", &id.0[..]).map_err(st)?;
                db.flush().map_err(st)?;
                id
            }
        };
        let mut last = match events.last().map_err(st)? {
            Some((k, _)) => key_seq(&k),
            None => 0,
        };
        // Truncation may have emptied the tree; the high-water mark keeps seqs increasing.
        if let Some(v) = meta.get("last_seq").map_err(st)? {
            if let Ok(b) = <[u8; 8]>::try_from(&v[..]) {
                last = last.max(u64::from_be_bytes(b));
            }
        }
        let mut bytes = 0u64;
        for kv in events.iter() {
            let (_, v) = kv.map_err(st)?;
            bytes += v.len() as u64;
        }
        let first = match events.first().map_err(st)? {
            Some((k, _)) => key_seq(&k),
            None => last + 1,
        };
        let mut gaps = decode_gaps(meta.get(GAPS_KEY).map_err(st)?.as_deref());
        let horizon = meta.get(HORIZON_KEY).map_err(st)?.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok());
        if let Some(h) = horizon.map(u64::from_be_bytes).filter(|h| *h > last) {
            // Seqs above `last` up to the horizon may have reached a receiver before the
            // crash (or stop) that lost them here: never reuse them.
            match gaps.last_mut() {
                // Restarts with nothing appended in between: one gap.
                Some(g) if g.1 == last => g.1 = h,
                _ => gaps.push((last + 1, h)),
            }
            last = h;
        }
        // Gaps wholly below what is held no longer matter (adjacent gaps are merged, so a
        // position in a gap still leads to the first held record).
        gaps.retain(|&(_, end)| end + 1 >= first);
        // The gaps before the new last seq: sled keeps a prefix of these writes on a crash
        // (its own flusher runs meanwhile), and a last seq without its gap would wedge a
        // receiver positioned in it.
        meta.insert(GAPS_KEY, encode_gaps(&gaps)).map_err(st)?;
        meta.insert("last_seq", &last.to_be_bytes()).map_err(st)?;
        // Reserve right away, so the first records after a start can go out early too.
        let reserved = last + HORIZON;
        meta.insert(HORIZON_KEY, &reserved.to_be_bytes()).map_err(st)?;
        db.flush().map_err(st)?;
        Ok(SledJournal {
            path,
            db,
            events,
            meta,
            id,
            last: AtomicU64::new(last),
            bytes: AtomicU64::new(bytes),
            append_lock: Mutex::new(()),
            horizon: AtomicU64::new(reserved),
            horizon_durable: AtomicU64::new(reserved),
            gaps: RwLock::new(gaps),
        })
    }

    /// The underlying database, for sources that keep their own trees (indexes, positions)
    /// next to the journal so that both are lost or kept together.
    pub fn db(&self) -> sled::Db {
        self.db.clone()
    }

    fn st(&self) -> impl Fn(sled::Error) -> JournalError + '_ {
        |source| JournalError::Storage { path: self.path.clone(), source }
    }
}

fn key_seq(k: &[u8]) -> u64 {
    u64::from_be_bytes(k.try_into().unwrap_or([0; 8]))
}

fn encode_gaps(gaps: &[(u64, u64)]) -> Vec<u8> {
    gaps.iter().flat_map(|(a, b)| a.to_be_bytes().into_iter().chain(b.to_be_bytes())).collect()
}

fn decode_gaps(v: Option<&[u8]>) -> Vec<(u64, u64)> {
    v.unwrap_or_default().chunks_exact(16).map(|c| (key_seq(&c[..8]), key_seq(&c[8..]))).collect()
}

fn decode(seq: u64, v: &[u8]) -> Result<proto::Event, JournalError> {
    let body = frame::decode(v).map_err(|source| JournalError::Corrupt { seq, source })?;
    proto::Event::decode(body).map_err(|source| JournalError::Decode { seq, source })
}

impl JournalStore for SledJournal {
    fn journal_id(&self) -> JournalId {
        self.id
    }

    fn append(&self, records: &[NewRecord]) -> Result<Vec<RecordMeta>, JournalError> {
        let _g = self.append_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut seq = self.last.load(Ordering::SeqCst);
        let mut writes = Vec::with_capacity(records.len());
        let mut metas = Vec::with_capacity(records.len());
        let mut added = 0u64;
        for r in records {
            seq += 1;
            let ev = lockstep_common::event::make_event(Seq(seq), &r.source, r.captured_at_us, r.payload.clone());
            let val = frame::encode(&ev.encode_to_vec());
            added += val.len() as u64;
            metas.push(RecordMeta {
                seq: Seq(seq),
                source: r.source.clone(),
                captured_at_us: r.captured_at_us,
                bytes: val.len() as u64,
            });
            writes.push((seq.to_be_bytes(), val));
        }
        if let [(k, v)] = &writes[..] {
            // One key is atomic on its own. A batch would cost two extra log writes, each
            // synced, ahead of the flush (sled puts a batch's manifest in an I/O buffer of its
            // own): most of a small transaction's time in the journal.
            self.events.insert(k, v.as_slice()).map_err(self.st())?;
        } else {
            let mut batch = sled::Batch::default();
            for (k, v) in writes {
                batch.insert(&k, v);
            }
            self.events.apply_batch(batch).map_err(self.st())?;
        }
        self.meta.insert("last_seq", &seq.to_be_bytes()).map_err(self.st())?;
        if seq + HORIZON / 2 > self.horizon.load(Ordering::SeqCst) {
            let h = seq + HORIZON;
            self.meta.insert(HORIZON_KEY, &h.to_be_bytes()).map_err(self.st())?;
            self.horizon.store(h, Ordering::SeqCst);
        }
        self.last.store(seq, Ordering::SeqCst);
        self.bytes.fetch_add(added, Ordering::SeqCst);
        Ok(metas)
    }

    fn flush(&self) -> Result<(), JournalError> {
        let h = self.horizon.load(Ordering::SeqCst);
        self.db.flush().map_err(self.st())?;
        // Unless a release withdrew the reservation meanwhile (appends only raise it).
        if self.horizon.load(Ordering::SeqCst) >= h {
            self.horizon_durable.fetch_max(h, Ordering::SeqCst);
        }
        Ok(())
    }

    fn ship_limit(&self) -> Seq {
        Seq(self.horizon_durable.load(Ordering::SeqCst))
    }

    fn skip_gap(&self, seq: Seq) -> Seq {
        let gaps = self.gaps.read().unwrap_or_else(|e| e.into_inner());
        let mut seq = seq.0;
        // Oldest first.
        for &(a, b) in gaps.iter() {
            if (a..=b).contains(&seq) {
                seq = b + 1;
            }
        }
        Seq(seq)
    }

    fn release_horizon(&self) -> Result<(), JournalError> {
        let _g = self.append_lock.lock().unwrap_or_else(|e| e.into_inner());
        let last = self.last.load(Ordering::SeqCst);
        self.meta.insert(HORIZON_KEY, &last.to_be_bytes()).map_err(self.st())?;
        self.horizon.store(last, Ordering::SeqCst);
        self.horizon_durable.store(last, Ordering::SeqCst);
        self.db.flush().map_err(self.st())?;
        Ok(())
    }

    fn read_from(&self, from: Seq, max_records: usize, max_bytes: usize) -> Result<Vec<proto::Event>, JournalError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.events.range(from.0.to_be_bytes()..) {
            let (k, v) = kv.map_err(self.st())?;
            if !out.is_empty() && (bytes + v.len() > max_bytes || out.len() >= max_records) {
                break;
            }
            bytes += v.len();
            out.push(decode(key_seq(&k), &v)?);
        }
        Ok(out)
    }

    fn first_seq(&self) -> Seq {
        match self.events.first() {
            Ok(Some((k, _))) => Seq(key_seq(&k)),
            _ => Seq(self.last.load(Ordering::SeqCst) + 1),
        }
    }

    fn last_seq(&self) -> Seq {
        Seq(self.last.load(Ordering::SeqCst))
    }

    fn truncate_through(&self, through: Seq) -> Result<u64, JournalError> {
        // Removed one key at a time, oldest first: a crash keeps a prefix of the removals,
        // which leaves the journal contiguous. (A batch would cost extra synced log writes
        // that the next append's flush waits behind.)
        let mut freed = 0u64;
        for kv in self.events.range(..=through.0.to_be_bytes()) {
            let (k, v) = kv.map_err(self.st())?;
            self.events.remove(k).map_err(self.st())?;
            freed += v.len() as u64;
        }
        self.bytes.fetch_sub(freed.min(self.bytes.load(Ordering::SeqCst)), Ordering::SeqCst);
        Ok(freed)
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn scan_meta(&self) -> Result<Vec<RecordMeta>, JournalError> {
        let mut out = Vec::new();
        for kv in self.events.iter() {
            let (k, v) = kv.map_err(self.st())?;
            let seq = key_seq(&k);
            let ev = decode(seq, &v)?;
            out.push(RecordMeta {
                seq: Seq(seq),
                source: ev.source.as_str().into(),
                captured_at_us: ev.captured_at_us,
                bytes: v.len() as u64,
            });
        }
        Ok(out)
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        Ok(self.meta.get(key).map_err(self.st())?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), JournalError> {
        self.meta.insert(key, value).map_err(self.st())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u8) -> NewRecord {
        NewRecord { source: "s".into(), captured_at_us: i as i64, payload: vec![i; 10] }
    }

    #[test]
    fn dense_seqs_survive_a_clean_reopen_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let j = SledJournal::open(dir.path()).unwrap();
            id = j.journal_id();
            let m = j.append(&[rec(1), rec(2), rec(3)]).unwrap();
            assert_eq!(m.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![1, 2, 3]);
            j.flush().unwrap();
            j.truncate_through(Seq(3)).unwrap();
            j.release_horizon().unwrap();
            assert_eq!(j.bytes(), 0);
        }
        let j = SledJournal::open(dir.path()).unwrap();
        assert_eq!(j.journal_id(), id);
        assert_eq!(j.last_seq(), Seq(3));
        assert_eq!(j.first_seq(), Seq(4));
        let m = j.append(&[rec(4)]).unwrap();
        assert_eq!(m[0].seq, Seq(4));
        let evs = j.read_from(Seq(1), 100, 1 << 20).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].seq, 4);
        assert_eq!(evs[0].crc32, crc32fast::hash(&evs[0].payload));
    }

    /// Run in a child process: appends 10 records durably, 5 more without a flush (as if
    /// shipped early), and dies by SIGKILL.
    fn crash_child(dir: &str) {
        let j = SledJournal::open(Path::new(dir)).unwrap();
        j.append(&(1..=10).map(rec).collect::<Vec<_>>()).unwrap();
        j.flush().unwrap();
        assert!(j.ship_limit() >= Seq(15), "the flushed horizon must cover the next records");
        for i in 11..=15 {
            j.append(&[rec(i)]).unwrap();
        }
        crate::crash_test::die();
    }

    /// Records shipped before their flush and then lost to a crash: their seqs are never
    /// handed out again, and the skipped range is known as a gap, also after more restarts.
    #[test]
    fn seqs_that_may_have_been_shipped_are_never_reused() {
        if let Some(dir) = crate::crash_test::child_dir() {
            crash_child(&dir);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        crate::crash_test::run_killed_child(
            "journal::sled_store::tests::seqs_that_may_have_been_shipped_are_never_reused",
            dir.path(),
        );
        let j = SledJournal::open(dir.path()).unwrap();
        assert!(j.last_seq() >= Seq(15), "last seq {} would reuse shipped seqs", j.last_seq());
        let held: Vec<u64> = j.read_from(Seq(1), 100, 1 << 20).unwrap().iter().map(|e| e.seq).collect();
        let lost = held.last().copied().unwrap_or(0);
        assert!((10..=15).contains(&lost), "held {held:?}");
        // Every seq after what is held up to the new last is a gap; the next record follows it.
        let resume = j.skip_gap(Seq(lost + 1));
        assert_eq!(resume, j.last_seq().next());
        assert_eq!(j.skip_gap(Seq(3)), Seq(3));
        let m = j.append(&[rec(99)]).unwrap();
        assert_eq!(m[0].seq, resume);
        j.flush().unwrap();
        drop(j);

        // A crash after that record leaves a second gap; crashes with nothing appended in
        // between extend it, even once the records before it are truncated.
        let j = SledJournal::open(dir.path()).unwrap();
        assert!(j.last_seq() > resume, "the horizon reserved past {resume} must be skipped too");
        j.truncate_through(resume).unwrap();
        j.flush().unwrap();
        drop(j);
        let j = SledJournal::open(dir.path()).unwrap();
        let after = j.last_seq();
        assert_eq!(j.first_seq(), after.next());
        assert_eq!(j.skip_gap(resume.next()), after.next(), "a position after the record leads past both crashes");
        j.append(&[rec(100)]).unwrap();
        j.flush().unwrap();
        assert_eq!(j.skip_gap(Seq(lost + 1)), Seq(lost + 1), "the first gap lies below what is held");
        // A clean stop withdraws the reservation: the next open continues without a gap.
        j.release_horizon().unwrap();
        let last = j.last_seq();
        drop(j);
        let j = SledJournal::open(dir.path()).unwrap();
        assert_eq!(j.last_seq(), last);
        assert_eq!(j.append(&[rec(101)]).unwrap()[0].seq, last.next());
        // Truncating past a gap forgets it.
        j.truncate_through(last).unwrap();
        j.flush().unwrap();
        drop(j);
        let j = SledJournal::open(dir.path()).unwrap();
        assert_eq!(j.skip_gap(Seq(lost + 1)), Seq(lost + 1), "gaps below the held records are forgotten");
    }
}
