//! `safe_links`: the source's symlinks this target leaves out, remembered, so that the standby
//! holds exactly the source's links that are safe *at this moment*, however they arrived.
//!
//! A link is unsafe when its target is absolute or climbs above the root from the link's own
//! directory (judged lexically, see [`super::tree::symlink_escapes`]). That depends on where
//! the link is, so a directory rename can change it: a held link that becomes unsafe is
//! removed, and a skipped link that becomes safe is created again. The agent does not re-send
//! the links a rename carries, so the receiver keeps every skipped link's path and target
//! (and owner) here.
//!
//! The set lives in a file beside the position file (`<position>.skipped`), rewritten (temp +
//! rename, no fsync) whenever it changes — it changes rarely — and synced before any commit
//! that follows a change, so a committed position never covers a set that is not durable.
//! After the process dies, the file holds exactly what the applied changes left, as the tree
//! does (see `mark`); after a machine restart with changes past the committed position the
//! target is resynced, which clears it. During a resync it is written at the end only (a
//! resync cut short starts over).
//!
//! Each write records the change that made it (its journal position). The change under way
//! when the process died is redone after the restart, and must not change the set a second
//! time: a redone rename would find its moved entries already under the destination and drop
//! them as replaced. So a change updates the tree first and the set file last, and a redo that
//! finds its own position in the file leaves the set alone (its tree part is idempotent).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use lockstep_common::event::{JournalId, Meta, Seq};
use lockstep_common::frame;
use lockstep_common::relpath::RelPath;

use super::tree::io_err;
use crate::applier::{ApplyError, Position};

/// Format of the file's body.
const VERSION: u8 = 1;

/// One skipped symlink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SkippedLink {
    pub(super) target: Vec<u8>,
    /// Its owner (uid, gid and the source's names; no attributes), when the agent sent one.
    pub(super) owner: Option<Meta>,
}

/// The skipped set and its file.
pub(super) struct Skipped {
    file: PathBuf,
    /// Skipped links by path (raw bytes, so that a subtree is one range: `a/` .. `a0`).
    links: BTreeMap<Vec<u8>, SkippedLink>,
    /// The change that last changed the set.
    stamp: Option<Position>,
    /// Whether the set was kept with `safe_links` on. A target whose option changed is
    /// reconciled once when it opens.
    pub(super) kept_safe: bool,
    /// Changed since last written (during a resync, written at its end).
    unwritten: bool,
    /// Written since last synced.
    unsynced: bool,
}

impl Skipped {
    /// Reads the file (missing: an empty set, kept without `safe_links`). `Err(problem)` in
    /// the second slot: the file exists but cannot be decoded (only a machine crash can tear
    /// it); the caller resyncs the target.
    pub(super) fn open(file: PathBuf) -> Result<(Skipped, Option<String>), ApplyError> {
        let mut s =
            Skipped { file, links: BTreeMap::new(), stamp: None, kept_safe: false, unwritten: false, unsynced: false };
        let rec = match fs::read(&s.file) {
            Ok(rec) => rec,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((s, None)),
            Err(e) => return Err(io_err(format!("read skipped symlinks {}", s.file.display()))(e)),
        };
        let problem = match frame::decode(&rec) {
            Err(e) => Some(e.to_string()),
            Ok(body) => match decode(body) {
                Some((kept_safe, stamp, links)) => {
                    s.kept_safe = kept_safe;
                    s.stamp = stamp;
                    s.links = links;
                    None
                }
                None => Some("malformed body".to_string()),
            },
        };
        Ok((s, problem))
    }

    pub(super) fn len(&self) -> usize {
        self.links.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub(super) fn contains(&self, rel: &RelPath) -> bool {
        self.links.contains_key(rel.as_bytes())
    }

    /// Paths, in order.
    pub(super) fn paths(&self) -> impl Iterator<Item = String> + '_ {
        self.links.keys().map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// Whether the change at `pos` already changed the set: it is being redone after a crash.
    pub(super) fn redo(&self, pos: Option<Position>) -> bool {
        matches!((pos, self.stamp), (Some(p), Some(s)) if s.journal_id == p.journal_id && s.seq >= p.seq)
    }

    /// Every path.
    pub(super) fn all(&self) -> Vec<RelPath> {
        self.links.keys().filter_map(|k| RelPath::new(k.clone()).ok()).collect()
    }

    /// The paths at and below `rel`.
    pub(super) fn under(&self, rel: &RelPath) -> Vec<RelPath> {
        self.keys_under(rel).into_iter().filter_map(|k| RelPath::new(k).ok()).collect()
    }

    fn keys_under(&self, rel: &RelPath) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        if self.links.contains_key(rel.as_bytes()) {
            keys.push(rel.as_bytes().to_vec());
        }
        // Everything below `rel` sorts between `rel/` and `rel0` ('0' follows '/').
        let lo = [rel.as_bytes(), b"/"].concat();
        let hi = [rel.as_bytes(), b"0"].concat();
        keys.extend(self.links.range(lo..hi).map(|(k, _)| k.clone()));
        keys
    }

    /// Removes and returns the entries at and below `rel`.
    pub(super) fn take_under(&mut self, rel: &RelPath) -> Vec<(RelPath, SkippedLink)> {
        let mut out = Vec::new();
        for k in self.keys_under(rel) {
            let l = self.links.remove(&k).expect("listed above");
            if let Ok(p) = RelPath::new(k) {
                out.push((p, l));
            }
        }
        out
    }

    /// Forgets the entries at and below `rel`; whether there were any.
    pub(super) fn remove_under(&mut self, rel: &RelPath) -> bool {
        !self.take_under(rel).is_empty()
    }

    /// Forgets the entry at `rel` only; whether there was one.
    pub(super) fn remove(&mut self, rel: &RelPath) -> bool {
        self.links.remove(rel.as_bytes()).is_some()
    }

    /// Records a skipped link; whether it was not skipped before (then it is logged).
    pub(super) fn insert(&mut self, rel: &RelPath, link: SkippedLink) -> bool {
        self.links.insert(rel.as_bytes().to_vec(), link).is_none()
    }

    /// Takes every entry (to restore them all).
    pub(super) fn take_all(&mut self) -> Vec<(RelPath, SkippedLink)> {
        std::mem::take(&mut self.links).into_iter().filter_map(|(k, l)| RelPath::new(k).ok().map(|p| (p, l))).collect()
    }

    /// Empties the set, to be kept with `safe_links` as given (a resync begins, or one will).
    pub(super) fn reset(&mut self, safe_links: bool) {
        self.links.clear();
        self.stamp = None;
        self.kept_safe = safe_links;
    }

    /// The set changed by the change at `pos` (`None`: a resync entry or no change at all):
    /// written now, or at the end of a resync (`defer`).
    pub(super) fn changed(&mut self, pos: Option<Position>, defer: bool) -> Result<(), ApplyError> {
        self.stamp = pos.or(self.stamp);
        self.unwritten = true;
        if defer {
            return Ok(());
        }
        self.write()
    }

    /// Writes the file if it is behind (temp + rename, no fsync).
    pub(super) fn write(&mut self) -> Result<(), ApplyError> {
        if !self.unwritten {
            return Ok(());
        }
        let ctx = || format!("write skipped symlinks {}", self.file.display());
        let tmp = self.file.with_extension("skipped-tmp");
        let rec = frame::encode(&encode(self.kept_safe, self.stamp, &self.links));
        File::create(&tmp).and_then(|mut f| f.write_all(&rec)).map_err(io_err(ctx()))?;
        fs::rename(&tmp, &self.file).map_err(io_err(ctx()))?;
        self.unwritten = false;
        self.unsynced = true;
        Ok(())
    }

    /// Makes the file durable (before a commit that follows a change).
    pub(super) fn sync(&mut self) -> Result<(), ApplyError> {
        self.write()?;
        if !self.unsynced {
            return Ok(());
        }
        let ctx = || format!("sync skipped symlinks {}", self.file.display());
        File::open(&self.file).and_then(|f| f.sync_all()).map_err(io_err(ctx()))?;
        let dir = self.file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(ctx()))?;
        self.unsynced = false;
        Ok(())
    }

    /// The file and its temp file (spared when a resync prunes a root that holds them).
    pub(super) fn own_files(&self) -> [PathBuf; 2] {
        [self.file.clone(), self.file.with_extension("skipped-tmp")]
    }
}

/// `[version][flags: 1 kept_safe, 2 stamp][stamp: journal 16, seq u64 LE][count u32]` then per
/// link `[u32 len][path][u32 len][target][u8 has owner]` and, with an owner,
/// `[uid u32][gid u32][u32 len][user][u32 len][group]` (an empty name: none).
fn encode(kept_safe: bool, stamp: Option<Position>, links: &BTreeMap<Vec<u8>, SkippedLink>) -> Vec<u8> {
    let mut b = vec![VERSION, u8::from(kept_safe) | if stamp.is_some() { 2 } else { 0 }];
    if let Some(p) = stamp {
        b.extend_from_slice(&p.journal_id.0);
        b.extend_from_slice(&p.seq.0.to_le_bytes());
    }
    let put = |b: &mut Vec<u8>, part: &[u8]| {
        b.extend_from_slice(&(part.len() as u32).to_le_bytes());
        b.extend_from_slice(part);
    };
    b.extend_from_slice(&(links.len() as u32).to_le_bytes());
    for (path, l) in links {
        put(&mut b, path);
        put(&mut b, &l.target);
        match &l.owner {
            None => b.push(0),
            Some(m) => {
                b.push(1);
                b.extend_from_slice(&m.uid.to_le_bytes());
                b.extend_from_slice(&m.gid.to_le_bytes());
                put(&mut b, m.user.as_deref().unwrap_or("").as_bytes());
                put(&mut b, m.group.as_deref().unwrap_or("").as_bytes());
            }
        }
    }
    b
}

type Decoded = (bool, Option<Position>, BTreeMap<Vec<u8>, SkippedLink>);

fn decode(body: &[u8]) -> Option<Decoded> {
    let mut rest = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    let head = take(2)?;
    if head[0] != VERSION {
        return None;
    }
    let kept_safe = head[1] & 1 != 0;
    let stamp = if head[1] & 2 != 0 {
        let journal_id = JournalId::from_slice(take(16)?)?;
        let seq = Seq(u64::from_le_bytes(take(8)?.try_into().ok()?));
        Some(Position { journal_id, seq })
    } else {
        None
    };
    let u32_of = |b: &[u8]| -> Option<u32> { Some(u32::from_le_bytes(b.try_into().ok()?)) };
    let count = u32_of(take(4)?)?;
    let mut links = BTreeMap::new();
    for _ in 0..count {
        let n = u32_of(take(4)?)? as usize;
        let path = take(n)?.to_vec();
        RelPath::new(path.clone()).ok()?;
        let n = u32_of(take(4)?)? as usize;
        let target = take(n)?.to_vec();
        let owner = match take(1)?[0] {
            0 => None,
            _ => {
                let uid = u32_of(take(4)?)?;
                let gid = u32_of(take(4)?)?;
                let n = u32_of(take(4)?)? as usize;
                let user = String::from_utf8(take(n)?.to_vec()).ok().filter(|s| !s.is_empty());
                let n = u32_of(take(4)?)? as usize;
                let group = String::from_utf8(take(n)?.to_vec()).ok().filter(|s| !s.is_empty());
                Some(Meta { uid, gid, user, group, xattrs: Vec::new() })
            }
        };
        links.insert(path, SkippedLink { target, owner });
    }
    rest.is_empty().then_some((kept_safe, stamp, links))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn round_trips_and_ranges() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("pos.skipped");
        let (mut s, problem) = Skipped::open(file.clone()).unwrap();
        assert!(problem.is_none() && s.is_empty() && !s.kept_safe);
        let link = |t: &str| SkippedLink { target: t.as_bytes().to_vec(), owner: None };
        for p in ["a", "a-b", "a/x", "a/y/z", "a0", "b"] {
            assert!(s.insert(&rp(p), link("/abs")));
        }
        s.insert(
            &rp("o"),
            SkippedLink {
                target: b"../../up".to_vec(),
                owner: Some(Meta { uid: 7, gid: 8, user: Some("u".into()), group: None, xattrs: vec![] }),
            },
        );
        assert!(!s.insert(&rp("b"), link("/other")));
        let moved: Vec<String> = s.take_under(&rp("a")).into_iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(moved, ["a", "a/x", "a/y/z"]);
        assert!(s.contains(&rp("a-b")) && s.contains(&rp("a0")));
        s.kept_safe = true;
        let pos = Position { journal_id: JournalId([5; 16]), seq: Seq(9) };
        s.changed(Some(pos), false).unwrap();
        s.sync().unwrap();
        let (r, problem) = Skipped::open(file.clone()).unwrap();
        assert!(problem.is_none());
        assert_eq!(r.links, s.links);
        assert!(r.kept_safe && r.redo(Some(pos)) && !r.redo(Some(Position { seq: Seq(10), ..pos })));
        assert!(!r.redo(None));
        fs::write(&file, b"torn").unwrap();
        assert!(Skipped::open(file).unwrap().1.is_some());
    }
}
