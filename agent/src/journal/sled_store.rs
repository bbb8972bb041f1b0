//! The sled-backed `JournalStore`. Records live in tree `events` keyed by big-endian seq, each
//! value a framed (version + crc32) encoded `proto::Event`; `meta` holds the journal id,
//! receiver cursors and source positions. sled stays behind this file.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
}

impl SledJournal {
    /// Opens (or creates) the journal under `dir`.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let path = dir.display().to_string();
        let st = |source| JournalError::Storage { path: path.clone(), source };
        let db =
            sled::Config::new().path(dir).cache_capacity(256 << 20).flush_every_ms(Some(1000)).open().map_err(st)?;
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
        Ok(SledJournal {
            path,
            db,
            events,
            meta,
            id,
            last: AtomicU64::new(last),
            bytes: AtomicU64::new(bytes),
            append_lock: Mutex::new(()),
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
        self.last.store(seq, Ordering::SeqCst);
        self.bytes.fetch_add(added, Ordering::SeqCst);
        Ok(metas)
    }

    fn flush(&self) -> Result<(), JournalError> {
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
    fn dense_seqs_survive_reopen_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let j = SledJournal::open(dir.path()).unwrap();
            id = j.journal_id();
            let m = j.append(&[rec(1), rec(2), rec(3)]).unwrap();
            assert_eq!(m.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![1, 2, 3]);
            j.flush().unwrap();
            j.truncate_through(Seq(3)).unwrap();
            j.flush().unwrap();
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
}
