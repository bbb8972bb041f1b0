//! Transactions PostgreSQL streams while they are still running (pgoutput protocol 2,
//! `streaming 'on'`, PostgreSQL 14+).
//!
//! Once a transaction's decoded changes outgrow `logical_decoding_work_mem`, the walsender
//! sends what it has so far in a *streamed block* — `Stream Start (xid)`, the changes, each
//! carrying the (sub)transaction's xid first, `Stream Stop` — instead of spilling them to its
//! own disk and sending everything only after the commit. Blocks of several transactions
//! interleave with each other and with ordinary transactions; the outcome arrives later as
//! `Stream Commit` or `Stream Abort` (of the whole transaction, or of one subtransaction:
//! `ROLLBACK TO SAVEPOINT`).
//!
//! The source keeps each streamed transaction's messages, xid removed, in an unnamed scratch
//! file in the agent's data directory (never whole in memory) and, at its `Stream Commit`,
//! replays them as if the transaction had arrived as `Begin`, changes, `Commit` — so the
//! journal still holds one transaction after another in commit order, and nothing of a
//! transaction that rolls back ever reaches it. Like PostgreSQL's own apply worker, a
//! subtransaction's abort cuts its file back to where that subtransaction's first change
//! began: a backend's subtransactions nest, so everything after that point belongs to the
//! aborted one or to subtransactions inside it.
//!
//! The files are unlinked from the start (`O_TMPFILE`): a crash leaves nothing behind, and
//! the slot sends the transaction again from its start after a restart.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use bytes::Bytes;

/// A stream-control message of protocol 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    /// `'S'`: changes of `xid` follow; `first` for its first block.
    Start { xid: u32, first: bool },
    /// `'E'`: the block ends.
    Stop,
    /// `'c'`: the streamed transaction `xid` committed.
    Commit { xid: u32, commit_lsn: u64, end_lsn: u64, commit_time: i64 },
    /// `'A'`: subtransaction `sub` of `xid` rolled back (`sub == xid`: the whole transaction).
    Abort { xid: u32, sub: u32 },
}

fn u32_at(d: &[u8], at: usize, what: &str) -> Result<u32, String> {
    d.get(at..at + 4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("{what}: message of {} bytes is too short", d.len()))
}

fn u64_at(d: &[u8], at: usize, what: &str) -> Result<u64, String> {
    d.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("{what}: message of {} bytes is too short", d.len()))
}

/// Decodes a stream-control message; `None` for any other message.
pub(crate) fn control(d: &[u8]) -> Result<Option<Control>, String> {
    Ok(Some(match d.first() {
        Some(b'S') => Control::Start {
            xid: u32_at(d, 1, "Stream Start")?,
            first: *d.get(5).ok_or("Stream Start: no first-segment flag")? == 1,
        },
        Some(b'E') => Control::Stop,
        Some(b'c') => Control::Commit {
            xid: u32_at(d, 1, "Stream Commit")?,
            // d[5] is the flags byte (always 0).
            commit_lsn: u64_at(d, 6, "Stream Commit")?,
            end_lsn: u64_at(d, 14, "Stream Commit")?,
            commit_time: u64_at(d, 22, "Stream Commit")? as i64,
        },
        Some(b'A') => Control::Abort { xid: u32_at(d, 1, "Stream Abort")?, sub: u32_at(d, 5, "Stream Abort")? },
        _ => return Ok(None),
    }))
}

/// A message of a streamed block: the (sub)transaction's xid, its tag, and the rest after the
/// xid — together the message as protocol 1 would have sent it.
fn split_xid(d: &[u8]) -> Result<(u32, u8, &[u8]), String> {
    let tag = *d.first().ok_or("empty message in a streamed block")?;
    if !matches!(tag, b'I' | b'U' | b'D' | b'T' | b'R' | b'Y' | b'M') {
        return Err(format!("unexpected message {:?} in a streamed block", tag as char));
    }
    let xid = u32_at(d, 1, "streamed change")?;
    Ok((xid, tag, &d[5..]))
}

/// One streamed transaction's messages so far.
struct Spill {
    file: BufWriter<File>,
    len: u64,
    /// Where each (sub)transaction's first message begins.
    starts: HashMap<u32, u64>,
}

/// The streamed transactions not yet committed or aborted.
pub(crate) struct Spills {
    dir: PathBuf,
    open: HashMap<u32, Spill>,
}

impl Spills {
    pub(crate) fn new(dir: PathBuf) -> Spills {
        Spills { dir, open: HashMap::new() }
    }

    /// Starts (`first`) or continues transaction `xid`. A continued transaction must be
    /// known: this session saw its first block.
    pub(crate) fn start(&mut self, xid: u32, first: bool) -> Result<(), String> {
        if first {
            std::fs::create_dir_all(&self.dir).map_err(|e| format!("create {}: {e}", self.dir.display()))?;
            let file = tempfile::tempfile_in(&self.dir)
                .map_err(|e| format!("create a scratch file in {}: {e}", self.dir.display()))?;
            self.open
                .insert(xid, Spill { file: BufWriter::with_capacity(256 << 10, file), len: 0, starts: HashMap::new() });
        } else if !self.open.contains_key(&xid) {
            return Err(format!("a streamed block continues transaction {xid}, whose first block never arrived"));
        }
        Ok(())
    }

    /// Keeps `d`, a message of a streamed block of `xid`, without its xid (that of `xid` itself
    /// or of one of its subtransactions, noted for [`Spills::abort`]).
    pub(crate) fn append(&mut self, xid: u32, d: &[u8]) -> Result<(), String> {
        // The first block of a transaction replayed from another origin (the source is itself
        // a subscriber) names that origin, with no xid: nothing to keep, as in protocol 1.
        if d.first() == Some(&b'O') {
            return Ok(());
        }
        let (sub, tag, body) = split_xid(d)?;
        let s = self.open.get_mut(&xid).ok_or_else(|| format!("a change of transaction {xid} outside its stream"))?;
        s.starts.entry(sub).or_insert(s.len);
        let len = 1 + body.len();
        let io = |e: std::io::Error| format!("write a scratch file: {e}");
        s.file.write_all(&(len as u32).to_be_bytes()).map_err(io)?;
        s.file.write_all(&[tag]).map_err(io)?;
        s.file.write_all(body).map_err(io)?;
        s.len += 4 + len as u64;
        Ok(())
    }

    /// Forgets what subtransaction `sub` of `xid` (and any begun after it) streamed; `sub ==
    /// xid` forgets the whole transaction.
    pub(crate) fn abort(&mut self, xid: u32, sub: u32) -> Result<(), String> {
        if sub == xid {
            self.open.remove(&xid);
            return Ok(());
        }
        let Some(s) = self.open.get_mut(&xid) else { return Ok(()) };
        let Some(&cut) = s.starts.get(&sub) else { return Ok(()) };
        let io = |e: std::io::Error| format!("cut back a scratch file: {e}");
        s.file.flush().map_err(io)?;
        s.file.get_ref().set_len(cut).map_err(io)?;
        s.file.seek(SeekFrom::Start(cut)).map_err(io)?;
        s.len = cut;
        s.starts.retain(|_, at| *at < cut);
        Ok(())
    }

    /// Transaction `xid` committed: its messages in order (none if nothing was streamed).
    pub(crate) fn commit(&mut self, xid: u32) -> Result<Replay, String> {
        let Some(s) = self.open.remove(&xid) else { return Ok(Replay { file: None, left: 0 }) };
        let io = |e: std::io::Error| format!("read back a scratch file: {e}");
        let mut file = s.file.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        Ok(Replay { file: Some(BufReader::with_capacity(256 << 10, file)), left: s.len })
    }
}

/// A committed streamed transaction's messages, read back in order.
pub(crate) struct Replay {
    file: Option<BufReader<File>>,
    left: u64,
}

impl Replay {
    pub(crate) fn next_message(&mut self) -> Result<Option<Bytes>, String> {
        let Some(f) = self.file.as_mut() else { return Ok(None) };
        if self.left == 0 {
            return Ok(None);
        }
        let io = |e: std::io::Error| format!("read back a scratch file: {e}");
        let mut len = [0u8; 4];
        f.read_exact(&mut len).map_err(io)?;
        let len = u32::from_be_bytes(len) as usize;
        let mut msg = vec![0u8; len];
        f.read_exact(&mut msg).map_err(io)?;
        self.left = self.left.saturating_sub(4 + len as u64);
        Ok(Some(msg.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, xid: u32, body: &[u8]) -> Bytes {
        let mut v = vec![tag];
        v.extend_from_slice(&xid.to_be_bytes());
        v.extend_from_slice(body);
        v.into()
    }

    fn all(mut r: Replay) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(m) = r.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn control_messages_decode() {
        let mut c = vec![b'c'];
        c.extend_from_slice(&7u32.to_be_bytes());
        c.push(0);
        c.extend_from_slice(&0x10u64.to_be_bytes());
        c.extend_from_slice(&0x20u64.to_be_bytes());
        c.extend_from_slice(&5i64.to_be_bytes());
        assert_eq!(
            control(&c).unwrap(),
            Some(Control::Commit { xid: 7, commit_lsn: 0x10, end_lsn: 0x20, commit_time: 5 })
        );
        assert_eq!(control(&[b'S', 0, 0, 0, 9, 1]).unwrap(), Some(Control::Start { xid: 9, first: true }));
        assert_eq!(control(b"E").unwrap(), Some(Control::Stop));
        assert_eq!(control(&[b'A', 0, 0, 0, 9, 0, 0, 0, 10]).unwrap(), Some(Control::Abort { xid: 9, sub: 10 }));
        assert_eq!(control(b"I....").unwrap(), None);
        assert!(control(&[b'c', 0, 0]).is_err(), "a truncated commit is refused");
        assert!(split_xid(b"B0000").is_err(), "a Begin has no place in a streamed block");
        assert!(split_xid(b"I00").is_err(), "a truncated change is refused");
    }

    #[test]
    fn a_rolled_back_subtransaction_is_cut_out_and_the_rest_replays_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spills::new(dir.path().join("spill"));
        s.start(100, true).unwrap();
        // An Origin message (no xid) opens the first block of a replicated-in transaction.
        let mut origin = vec![b'O'];
        origin.extend_from_slice(&0x99u64.to_be_bytes());
        origin.extend_from_slice(b"pg_16384\0");
        s.append(100, &origin).unwrap();
        for (sub, body) in [(100, "a"), (101, "b"), (100, "c"), (102, "d"), (103, "e"), (102, "f")] {
            s.append(100, &msg(b'I', sub, body.as_bytes())).unwrap();
        }
        // Another transaction streams in between and rolls back whole.
        s.start(200, true).unwrap();
        s.append(200, &msg(b'I', 200, b"x")).unwrap();
        s.abort(200, 200).unwrap();
        // ROLLBACK TO the savepoint of subtransaction 102: "d", "e" (nested in it), "f" go.
        s.abort(100, 102).unwrap();
        // Aborting one that streamed nothing changes nothing.
        s.abort(100, 104).unwrap();
        s.start(100, false).unwrap();
        s.append(100, &msg(b'I', 105, b"g")).unwrap();
        assert_eq!(s.open.len(), 1);
        let got = all(s.commit(100).unwrap());
        assert_eq!(got, vec![Bytes::from("Ia"), Bytes::from("Ib"), Bytes::from("Ic"), Bytes::from("Ig")]);
        assert_eq!(s.open.len(), 0);
        assert!(all(s.commit(300).unwrap()).is_empty(), "a transaction that streamed nothing replays nothing");
        assert!(s.start(400, false).is_err(), "a block continuing an unknown transaction is refused");
        assert_eq!(std::fs::read_dir(dir.path().join("spill")).unwrap().count(), 0, "scratch files are unnamed");
    }
}
