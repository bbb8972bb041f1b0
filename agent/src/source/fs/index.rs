//! The fs source's index: what the journal has described so far, one entry per path, kept in
//! the agent's sled database under `fs/<source>/index` (key = `RelPath` bytes).
//!
//! Comparing the disk against this index is how every change is decided, so duplicated or
//! coalesced watcher events are harmless. Entries change only after the journal has made the
//! ops describing them durable: the engine *stages* point updates and subtree removals here
//! (visible to its own lookups at once) and commits them after each journal append. A crash in
//! between loses only staged updates, and the next scan re-emits those changes (receivers
//! apply idempotently).

use std::collections::HashMap;

use lockstep_common::event::{Meta, SpecialKind};
use lockstep_common::relpath::RelPath;

use super::meta::{self, XATTR_HASH_BYTES};

/// Version byte leading every encoded entry; bump and upgrade explicitly when the layout changes.
/// 2 added owner, group, the extended attributes' hash and the device number (special files).
const ENTRY_VERSION: u8 = 2;

/// Bytes of blake3 kept per `BLOCK_SIZE` block: enough to detect changed blocks, small enough
/// that a 1 GiB file's list is 256 KiB.
pub(crate) const BLOCK_HASH_BYTES: usize = 16;

/// A truncated blake3 hash of one block.
pub(crate) type BlockHash = [u8; BLOCK_HASH_BYTES];

/// What a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    CharDevice = 5,
    BlockDevice = 6,
}

impl Kind {
    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::CharDevice,
            6 => Kind::BlockDevice,
            _ => return None,
        })
    }

    pub(crate) fn special(k: SpecialKind) -> Kind {
        match k {
            SpecialKind::Fifo => Kind::Fifo,
            SpecialKind::CharDevice => Kind::CharDevice,
            SpecialKind::BlockDevice => Kind::BlockDevice,
        }
    }
}

/// Owner, group and extended attributes as the journal last described them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attrs {
    pub uid: u32,
    pub gid: u32,
    /// [`meta::xattr_hash`] of the extended attributes.
    pub xattrs: [u8; XATTR_HASH_BYTES],
}

impl Attrs {
    /// Attributes of an entry from before they were recorded (version 1): they match nothing,
    /// so the next comparison sends them.
    pub(crate) const UNKNOWN: Attrs = Attrs { uid: u32::MAX, gid: u32::MAX, xattrs: [0xff; XATTR_HASH_BYTES] };

    pub(crate) fn of(m: &Meta) -> Attrs {
        Attrs { uid: m.uid, gid: m.gid, xattrs: meta::xattr_hash(&m.xattrs) }
    }
}

/// One path as the journal last described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// File length the receivers have (0 for others).
    pub size: u64,
    /// mtime of the file when it was read; -1 forces a re-read at the next comparison (the read
    /// was cut short).
    pub mtime_ns: i64,
    /// Per-block hashes of the content receivers have, for block-level deltas.
    pub blocks: Vec<BlockHash>,
    /// blake3 of the whole content (files only).
    pub content_hash: [u8; 32],
    /// Symlink target bytes (symlinks only).
    pub target: Vec<u8>,
    pub attrs: Attrs,
    /// Device number (device nodes only).
    pub rdev: u64,
}

impl Entry {
    pub(crate) fn dir(mode: u32, attrs: Attrs) -> Entry {
        Entry {
            kind: Kind::Dir,
            mode,
            size: 0,
            mtime_ns: 0,
            blocks: Vec::new(),
            content_hash: [0; 32],
            target: Vec::new(),
            attrs,
            rdev: 0,
        }
    }

    pub(crate) fn special(kind: SpecialKind, mode: u32, rdev: u64, attrs: Attrs) -> Entry {
        Entry { kind: Kind::special(kind), rdev, ..Entry::dir(mode, attrs) }
    }

    /// An entry matching nothing on disk: a file of impossible size and mtime, with no block
    /// hashes (so a delta against it carries every block).
    pub(crate) fn stale() -> Entry {
        Entry {
            kind: Kind::File,
            mode: 0,
            size: u64::MAX,
            mtime_ns: -1,
            blocks: Vec::new(),
            content_hash: [0; 32],
            target: Vec::new(),
            attrs: Attrs::UNKNOWN,
            rdev: 0,
        }
    }

    /// Whether this is a marker left by [`Entry::stale`] (a crash lost the real entry).
    pub(crate) fn is_stale(&self) -> bool {
        self.kind == Kind::File && self.size == u64::MAX && self.mtime_ns == -1
    }

    pub(crate) fn symlink(target: Vec<u8>, attrs: Attrs) -> Entry {
        Entry { kind: Kind::Symlink, mode: 0o777, target, ..Entry::dir(0o777, attrs) }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(70 + self.target.len() + self.blocks.len() * BLOCK_HASH_BYTES);
        out.push(ENTRY_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_ns.to_le_bytes());
        out.extend_from_slice(&self.content_hash);
        out.extend_from_slice(&(self.target.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.target);
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for b in &self.blocks {
            out.extend_from_slice(b);
        }
        out.extend_from_slice(&self.attrs.uid.to_le_bytes());
        out.extend_from_slice(&self.attrs.gid.to_le_bytes());
        out.extend_from_slice(&self.attrs.xattrs);
        out.extend_from_slice(&self.rdev.to_le_bytes());
        out
    }

    /// Decodes an entry; `None` for an unknown version or a damaged value (the caller treats
    /// the path as unindexed, so it is simply re-sent in full).
    pub(crate) fn decode(v: &[u8]) -> Option<Entry> {
        let mut r = Reader(v);
        let version = r.take(1)?[0];
        if version != 1 && version != ENTRY_VERSION {
            return None;
        }
        let kind = Kind::from_code(r.take(1)?[0])?;
        let mode = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
        let size = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let mtime_ns = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let content_hash: [u8; 32] = r.take(32)?.try_into().ok()?;
        let tlen = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
        let target = r.take(tlen)?.to_vec();
        let nblocks = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
        let raw = r.take(nblocks.checked_mul(BLOCK_HASH_BYTES)?)?;
        let blocks =
            raw.chunks_exact(BLOCK_HASH_BYTES).map(|c| c.try_into().unwrap_or([0; BLOCK_HASH_BYTES])).collect();
        let (attrs, rdev) = if version == 1 {
            (Attrs::UNKNOWN, 0)
        } else {
            let uid = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
            let gid = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
            let xattrs = r.take(XATTR_HASH_BYTES)?.try_into().ok()?;
            let rdev = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
            (Attrs { uid, gid, xattrs }, rdev)
        };
        if !r.0.is_empty() {
            return None;
        }
        Some(Entry { kind, mode, size, mtime_ns, blocks, content_hash, target, attrs, rdev })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
}

/// The index trees plus the engine's staged (not yet durable-in-journal) updates.
pub(crate) struct Index {
    tree: sled::Tree,
    meta: sled::Tree,
    /// Point updates staged since the last commit (`None` = removed).
    staged: HashMap<RelPath, Option<Entry>>,
    /// Subtree removals staged since the last commit; applied before `staged` on commit.
    staged_prefixes: Vec<RelPath>,
}

const BASELINE_KEY: &[u8] = b"baseline_done";
/// Set (durably) before any snapshot of the source may start: a restart that finds it without
/// `BASELINE_KEY` knows a first index was cut short after receivers may have been seeded.
const BASELINE_STARTED_KEY: &[u8] = b"baseline_started";

impl Index {
    pub(crate) fn open(db: &sled::Db, source: &str) -> sled::Result<Index> {
        Ok(Index {
            tree: db.open_tree(format!("fs/{source}/index"))?,
            meta: db.open_tree(format!("fs/{source}/meta"))?,
            staged: HashMap::new(),
            staged_prefixes: Vec::new(),
        })
    }

    pub(crate) fn baseline_done(&self) -> sled::Result<bool> {
        Ok(self.meta.get(BASELINE_KEY)?.is_some())
    }

    /// Whether a first index was begun (see `BASELINE_STARTED_KEY`).
    pub(crate) fn baseline_started(&self) -> sled::Result<bool> {
        Ok(self.meta.get(BASELINE_STARTED_KEY)?.is_some())
    }

    pub(crate) fn set_baseline_started(&self, db: &sled::Db) -> sled::Result<()> {
        self.meta.insert(BASELINE_STARTED_KEY, &[1u8][..])?;
        db.flush()?;
        Ok(())
    }

    /// Marks the baseline complete and flushes the database, so the index written by the
    /// baseline walk is on disk before the marker claims it is.
    pub(crate) fn set_baseline_done(&self, db: &sled::Db) -> sled::Result<()> {
        db.flush()?;
        self.meta.insert(BASELINE_KEY, &[1u8][..])?;
        db.flush()?;
        Ok(())
    }

    /// The entry for `rel`, staged updates included.
    pub(crate) fn get(&self, rel: &RelPath) -> sled::Result<Option<Entry>> {
        if let Some(e) = self.staged.get(rel) {
            return Ok(e.clone());
        }
        if self.staged_prefixes.iter().any(|p| rel.starts_with(p)) {
            return Ok(None);
        }
        Ok(self.tree.get(rel.as_bytes())?.and_then(|v| Entry::decode(&v)))
    }

    pub(crate) fn stage_put(&mut self, rel: &RelPath, e: Entry) {
        self.staged.insert(rel.clone(), Some(e));
    }

    /// Stages removal of `rel` and everything below it.
    pub(crate) fn stage_remove(&mut self, rel: &RelPath, kind: Kind) {
        if kind == Kind::Dir {
            self.staged.retain(|k, _| !k.starts_with(rel));
            self.staged_prefixes.push(rel.clone());
        } else {
            self.staged.insert(rel.clone(), None);
        }
    }

    pub(crate) fn staged_len(&self) -> usize {
        self.staged.len() + self.staged_prefixes.len()
    }

    /// Drops every entry (a baseline walk starts from nothing).
    pub(crate) fn clear(&mut self) -> sled::Result<()> {
        self.staged.clear();
        self.staged_prefixes.clear();
        self.tree.clear()
    }

    pub(crate) fn has_staged(&self) -> bool {
        !self.staged.is_empty() || !self.staged_prefixes.is_empty()
    }

    /// Whether `rel` has a committed (not merely staged) entry.
    pub(crate) fn committed(&self, rel: &RelPath) -> sled::Result<bool> {
        self.tree.contains_key(rel.as_bytes())
    }

    /// Writes "stale" entries for new paths straight into the tree (see `Engine::flush`): an
    /// entry that matches nothing on disk, so the next comparison re-sends the path in full or
    /// journals its removal. The staged updates committed after the append replace them.
    pub(crate) fn put_stale_markers(&self, paths: &[RelPath]) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        let stale = Entry::stale().encode();
        for p in paths {
            batch.insert(p.as_bytes(), stale.clone());
        }
        self.tree.apply_batch(batch)
    }

    /// Applies staged updates; call only after the journal made the matching ops durable.
    ///
    /// One sled batch, so a crash keeps all of it or none. Never two: sled writes out what
    /// precedes a batch as the batch begins, so a kill between two batches would keep the
    /// first (say, a subtree removal that also clears a stale marker) and lose the second
    /// (the entries put back), and the next scan would not know what receivers hold there.
    pub(crate) fn commit(&mut self) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        for p in std::mem::take(&mut self.staged_prefixes) {
            self.remove_subtree_into(&p, &mut batch)?;
        }
        // After the removals: a path removed and put again ends up put.
        for (k, v) in self.staged.drain() {
            match v {
                Some(e) => batch.insert(k.as_bytes(), e.encode()),
                None => batch.remove(k.as_bytes()),
            }
        }
        self.tree.apply_batch(batch)
    }

    /// Adds the removal of `rel` and everything below it to `batch`.
    fn remove_subtree_into(&self, rel: &RelPath, batch: &mut sled::Batch) -> sled::Result<()> {
        batch.remove(rel.as_bytes());
        for kv in self.tree.scan_prefix(child_prefix(rel)) {
            let (k, _) = kv?;
            batch.remove(k);
        }
        Ok(())
    }

    /// Moves `from` and its subtree to `to`, replacing whatever `to` held (a stale marker
    /// included), in one batch (see [`Index::commit`]). Requires no staged updates (the engine
    /// commits before a rename).
    pub(crate) fn move_subtree_now(&self, from: &RelPath, to: &RelPath) -> sled::Result<()> {
        debug_assert!(!self.has_staged());
        let mut batch = sled::Batch::default();
        self.remove_subtree_into(to, &mut batch)?;
        if let Some(v) = self.tree.get(from.as_bytes())? {
            batch.remove(from.as_bytes());
            batch.insert(to.as_bytes(), v);
        }
        for kv in self.tree.scan_prefix(child_prefix(from)) {
            let (k, v) = kv?;
            if let Ok(old) = RelPath::new(k.to_vec()) {
                batch.insert(old.rebase(from, to).as_bytes(), v);
            }
            batch.remove(k);
        }
        self.tree.apply_batch(batch)
    }

    /// Every indexed path (committed state), below `prefix` (itself included) or all.
    pub(crate) fn keys(&self, prefix: Option<&RelPath>) -> sled::Result<Vec<RelPath>> {
        let mut out = Vec::new();
        let mut push = |k: &[u8]| {
            if let Ok(p) = RelPath::new(k.to_vec()) {
                out.push(p);
            }
        };
        match prefix {
            None => {
                for kv in self.tree.iter() {
                    push(&kv?.0);
                }
            }
            Some(p) => {
                if self.tree.contains_key(p.as_bytes())? {
                    push(p.as_bytes());
                }
                for kv in self.tree.scan_prefix(child_prefix(p)) {
                    push(&kv?.0);
                }
            }
        }
        Ok(out)
    }
}

fn child_prefix(rel: &RelPath) -> Vec<u8> {
    let mut p = rel.as_bytes().to_vec();
    p.push(b'/');
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn entry_roundtrip_and_damage() {
        let e = Entry {
            kind: Kind::File,
            mode: 0o644,
            size: 70000,
            mtime_ns: 123,
            blocks: vec![[1; 16], [2; 16]],
            content_hash: [9; 32],
            target: Vec::new(),
            attrs: Attrs { uid: 1000, gid: 100, xattrs: [3; 16] },
            rdev: 0,
        };
        let v = e.encode();
        assert_eq!(Entry::decode(&v), Some(e.clone()));
        assert_eq!(Entry::decode(&v[..v.len() - 1]), None);
        let mut bad = v.clone();
        bad[0] = 99;
        assert_eq!(Entry::decode(&bad), None);
        let s = Entry::symlink(b"../x".to_vec(), Attrs::UNKNOWN);
        assert_eq!(Entry::decode(&s.encode()), Some(s));
        let f = Entry::special(SpecialKind::CharDevice, 0o600, 0x0103, Attrs { uid: 0, gid: 0, xattrs: [0; 16] });
        assert_eq!(Entry::decode(&f.encode()), Some(f));
        // An entry of version 1 (before owners were recorded) reads with unknown attributes.
        let mut v1 = v.clone();
        v1.truncate(v.len() - 8 - 16 - 8);
        v1[0] = 1;
        assert_eq!(Entry::decode(&v1), Some(Entry { attrs: Attrs::UNKNOWN, ..e }));
    }

    #[test]
    fn staged_updates_and_subtree_moves() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut ix = Index::open(&db, "t").unwrap();
        ix.stage_put(&rp("a"), Entry::dir(0o755, Attrs::UNKNOWN));
        ix.stage_put(&rp("a/x"), Entry::symlink(b"t".to_vec(), Attrs::UNKNOWN));
        ix.stage_put(&rp("ab"), Entry::dir(0o755, Attrs::UNKNOWN));
        assert!(ix.get(&rp("a/x")).unwrap().is_some());
        ix.commit().unwrap();
        ix.move_subtree_now(&rp("a"), &rp("z")).unwrap();
        assert_eq!(ix.keys(None).unwrap(), vec![rp("ab"), rp("z"), rp("z/x")]);
        ix.stage_remove(&rp("z"), Kind::Dir);
        assert!(ix.get(&rp("z/x")).unwrap().is_none());
        ix.stage_put(&rp("z"), Entry::symlink(b"q".to_vec(), Attrs::UNKNOWN));
        ix.commit().unwrap();
        assert_eq!(ix.keys(None).unwrap(), vec![rp("ab"), rp("z")]);
        assert_eq!(ix.get(&rp("z")).unwrap().unwrap().kind, Kind::Symlink);
    }

    /// Run in a child process: indexes `old` (with a file) and a stale marker at `new`, makes
    /// that durable, moves `old` to `new` (and, in the same way, replaces `old2` by a
    /// directory through a staged subtree removal) and dies by SIGKILL without any flush.
    fn crash_child(dir: &str) {
        let db = sled::open(dir).unwrap();
        let mut ix = Index::open(&db, "t").unwrap();
        ix.stage_put(&rp("old"), Entry::dir(0o755, Attrs::UNKNOWN));
        ix.stage_put(&rp("old/f"), Entry::symlink(b"t".to_vec(), Attrs::UNKNOWN));
        ix.stage_put(&rp("old2"), Entry::dir(0o755, Attrs::UNKNOWN));
        ix.stage_put(&rp("old2/g"), Entry::symlink(b"t".to_vec(), Attrs::UNKNOWN));
        ix.commit().unwrap();
        ix.put_stale_markers(&[rp("new"), rp("old2")]).unwrap();
        db.flush().unwrap();
        ix.move_subtree_now(&rp("old"), &rp("new")).unwrap();
        ix.stage_remove(&rp("old2"), Kind::Dir);
        ix.stage_put(&rp("old2"), Entry::dir(0o700, Attrs::UNKNOWN));
        ix.commit().unwrap();
        crate::crash_test::die();
    }

    /// A process killed right after a subtree move (or a commit replacing a subtree) must
    /// leave either the state before it, stale markers included, or the state after it —
    /// never the marker removed and the move lost. The engine's restart relies on the marker
    /// to clear what a receiver may hold under the new path.
    #[test]
    fn a_kill_never_keeps_half_of_a_subtree_move() {
        if let Some(dir) = crate::crash_test::child_dir() {
            crash_child(&dir);
            return;
        }
        for attempt in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            crate::crash_test::run_killed_child(
                "source::fs::index::tests::a_kill_never_keeps_half_of_a_subtree_move",
                dir.path(),
            );
            let db = sled::open(dir.path()).unwrap();
            let ix = Index::open(&db, "t").unwrap();
            let keys = ix.keys(None).unwrap();
            let stale = |p: &str| ix.get(&rp(p)).unwrap().is_some_and(|e| e.is_stale());
            let moved = keys.contains(&rp("new/f")) && !keys.contains(&rp("old"));
            let before = stale("new") && keys.contains(&rp("old/f"));
            assert!(moved || before, "attempt {attempt}: half a move survived: {keys:?}");
            let replaced =
                ix.get(&rp("old2")).unwrap().is_some_and(|e| e.mode == 0o700) && !keys.contains(&rp("old2/g"));
            let kept = stale("old2") && keys.contains(&rp("old2/g"));
            assert!(replaced || kept, "attempt {attempt}: half a commit survived: {keys:?}");
        }
    }
}
