//! Tests against real temp directories: each op, chunked and delta writes, hash mismatches,
//! crash replay, symlink containment, resync pruning and the position file.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use lockstep_common::event::{Block, Change, FileWrite, FsOp, JournalId, Seq, BLOCK_SIZE, CHUNK_BYTES};
use lockstep_common::proto;
use lockstep_common::relpath::RelPath;

use super::FsApplier;
use crate::applier::{Applier, ApplyError, ApplyOutcome, Position};

fn rp(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn new_applier(dir: &Path) -> FsApplier {
    FsApplier::open(dir.join("root"), dir.join("state/position"), false).unwrap()
}

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The events a full write of `content` travels as: 64 KiB blocks, up to 1 MiB per event.
fn full_write(path: &str, content: &[u8], mode: u32, mtime_ns: i64) -> Vec<Change> {
    let blocks: Vec<Block> = content
        .chunks(BLOCK_SIZE)
        .enumerate()
        .map(|(i, c)| Block { offset: (i * BLOCK_SIZE) as u64, data: c.to_vec().into() })
        .collect();
    let per_event = CHUNK_BYTES / BLOCK_SIZE;
    let groups: Vec<Vec<Block>> =
        if blocks.is_empty() { vec![vec![]] } else { blocks.chunks(per_event).map(|g| g.to_vec()).collect() };
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, blocks)| {
            Change::Fs(FsOp::Write(FileWrite {
                path: rp(path),
                first: i == 0,
                last: i == n - 1,
                delta: false,
                size: content.len() as u64,
                mode,
                mtime_ns,
                blocks,
                content_hash: (i == n - 1).then(|| *blake3::hash(content).as_bytes()),
                meta: None,
            }))
        })
        .collect()
}

/// One-event delta changing `blocks` of a file whose final content is `result`.
fn delta_write(path: &str, result: &[u8], blocks: Vec<Block>) -> Change {
    Change::Fs(FsOp::Write(FileWrite {
        path: rp(path),
        first: true,
        last: true,
        delta: true,
        size: result.len() as u64,
        mode: 0o644,
        mtime_ns: 1_000_000_000,
        blocks,
        content_hash: Some(*blake3::hash(result).as_bytes()),
        meta: None,
    }))
}

fn fsop(op: FsOp) -> Change {
    Change::Fs(op)
}

fn apply_all(a: &mut FsApplier, changes: &[Change]) -> Vec<ApplyOutcome> {
    changes.iter().map(|c| a.apply(Seq(1), c.clone()).unwrap()).collect()
}

fn apply_ok(a: &mut FsApplier, change: Change) {
    let out = a.apply(Seq(1), change).unwrap();
    assert!(out.repairs.is_empty() && out.skipped.is_none(), "unexpected outcome {out:?}");
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File(Vec<u8>, u32),
    Dir(u32),
    Link(Vec<u8>),
}

/// Everything under `root`, by relative path, without following symlinks.
fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Entry>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            let m = fs::symlink_metadata(e.path()).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                use std::os::unix::ffi::OsStrExt;
                out.insert(name, Entry::Link(fs::read_link(e.path()).unwrap().as_os_str().as_bytes().to_vec()));
            } else if m.is_dir() {
                out.insert(name.clone(), Entry::Dir(mode));
                walk(&e.path(), &format!("{name}/"), out);
            } else {
                out.insert(name, Entry::File(fs::read(e.path()).unwrap(), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

#[test]
fn mkdir_chmod_remove() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let root = t.path().join("root");
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("a/b/c"), mode: 0o750, meta: None }));
    assert!(root.join("a/b/c").is_dir());
    assert_eq!(fs::metadata(root.join("a/b/c")).unwrap().mode() & 0o7777, 0o750);
    // Existing directory: only its mode changes.
    fs::write(root.join("a/b/c/keep"), b"k").unwrap();
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("a/b/c"), mode: 0o700, meta: None }));
    assert_eq!(fs::metadata(root.join("a/b/c")).unwrap().mode() & 0o7777, 0o700);
    assert!(root.join("a/b/c/keep").exists());
    // A file in the way of a directory is replaced.
    fs::write(root.join("f"), b"x").unwrap();
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("f/g"), mode: 0o755, meta: None }));
    assert!(root.join("f/g").is_dir());

    apply_ok(&mut a, fsop(FsOp::SetAttr { path: rp("a/b/c/keep"), mode: 0o604, meta: None }));
    assert_eq!(fs::metadata(root.join("a/b/c/keep")).unwrap().mode() & 0o7777, 0o604);
    let out = a.apply(Seq(1), fsop(FsOp::SetAttr { path: rp("nope/x"), mode: 0o600, meta: None })).unwrap();
    assert_eq!(out.repairs.len(), 1);
    assert_eq!(out.repairs[0].0, rp("nope/x"));

    apply_ok(&mut a, fsop(FsOp::Remove { path: rp("a") }));
    assert!(!root.join("a").exists());
    apply_ok(&mut a, fsop(FsOp::Remove { path: rp("a") }));
    apply_ok(&mut a, fsop(FsOp::Remove { path: rp("f/g/h/i") }));
    apply_ok(&mut a, fsop(FsOp::Remove { path: rp("f/g") }));
    assert!(root.join("f").is_dir() && !root.join("f/g").exists());

    let err = a.apply(Seq(1), Change::Other(proto::change_event::Change::Pg(proto::PgTransaction::default())));
    assert!(matches!(err, Err(ApplyError::Refused(_))));
}

#[test]
fn multi_chunk_full_write() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let content = data(3 * CHUNK_BYTES + 12345, 1);
    let events = full_write("d/big.bin", &content, 0o640, 1_700_000_000_123_456_789);
    assert_eq!(events.len(), 4);
    for ev in events {
        apply_ok(&mut a, ev);
    }
    let p = t.path().join("root/d/big.bin");
    assert_eq!(fs::read(&p).unwrap(), content);
    let m = fs::metadata(&p).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 123_456_789));
    // No staging files left behind.
    assert_eq!(fs::read_dir(t.path().join("root/d")).unwrap().count(), 1);

    // Empty file, and a write replacing a directory.
    fs::create_dir_all(t.path().join("root/was_dir/sub")).unwrap();
    for ev in full_write("was_dir", b"", 0o600, 0) {
        apply_ok(&mut a, ev);
    }
    assert_eq!(fs::read(t.path().join("root/was_dir")).unwrap(), b"");
}

#[test]
fn large_write_with_unaligned_blocks() {
    // Large files go around the page cache where their blocks are aligned; blocks of odd sizes
    // and offsets mix direct and ordinary writes in one file.
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let content = data(2 * CHUNK_BYTES + 100, 9);
    let cuts = [0, 4096 * 3 + 17, 4096 * 5, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES - 4096, content.len()];
    let blocks: Vec<Block> =
        cuts.windows(2).map(|w| Block { offset: w[0] as u64, data: content[w[0]..w[1]].to_vec().into() }).collect();
    let n = blocks.len();
    for (i, b) in blocks.into_iter().enumerate() {
        apply_ok(
            &mut a,
            fsop(FsOp::Write(FileWrite {
                path: rp("odd.bin"),
                first: i == 0,
                last: i == n - 1,
                delta: false,
                size: content.len() as u64,
                mode: 0o644,
                mtime_ns: 0,
                blocks: vec![b],
                content_hash: (i == n - 1).then(|| *blake3::hash(&content).as_bytes()),
                meta: None,
            })),
        );
    }
    assert!(fs::read(t.path().join("root/odd.bin")).unwrap() == content);
}

#[test]
fn out_of_order_blocks_are_verified_by_rereading() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let content = data(3 * BLOCK_SIZE + 7, 2);
    let mut blocks: Vec<Block> = content
        .chunks(BLOCK_SIZE)
        .enumerate()
        .map(|(i, c)| Block { offset: (i * BLOCK_SIZE) as u64, data: c.to_vec().into() })
        .collect();
    blocks.reverse();
    apply_ok(
        &mut a,
        fsop(FsOp::Write(FileWrite {
            path: rp("x"),
            first: true,
            last: true,
            delta: false,
            size: content.len() as u64,
            mode: 0o644,
            mtime_ns: 0,
            blocks,
            content_hash: Some(*blake3::hash(&content).as_bytes()),
            meta: None,
        })),
    );
    assert_eq!(fs::read(t.path().join("root/x")).unwrap(), content);
}

#[test]
fn delta_on_large_file() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let base = data(8 << 20, 3);
    for ev in full_write("big", &base, 0o444, 5) {
        apply_ok(&mut a, ev);
    }
    let mut next = base.clone();
    let off = 37 * BLOCK_SIZE;
    let patch = data(BLOCK_SIZE, 4);
    next[off..off + BLOCK_SIZE].copy_from_slice(&patch);
    apply_ok(&mut a, delta_write("big", &next, vec![Block { offset: off as u64, data: patch.into() }]));
    let got = fs::read(t.path().join("root/big")).unwrap();
    assert!(got == next, "delta result differs");

    // A delta that also shrinks the file.
    next.truncate(5 * BLOCK_SIZE + 3);
    next[0..3].copy_from_slice(b"abc");
    apply_ok(&mut a, delta_write("big", &next, vec![Block { offset: 0, data: bytes::Bytes::from_static(b"abc") }]));
    assert!(fs::read(t.path().join("root/big")).unwrap() == next);
}

#[test]
fn hash_mismatch_requests_repair_and_keeps_target() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    for ev in full_write("f", b"original", 0o644, 0) {
        apply_ok(&mut a, ev);
    }
    // A delta whose base differs from what the sender assumed.
    let assumed = b"ORIGINAL plus".to_vec();
    let out = a
        .apply(Seq(2), delta_write("f", &assumed, vec![Block { offset: 8, data: bytes::Bytes::from_static(b" plus") }]))
        .unwrap();
    assert_eq!(out.repairs.len(), 1);
    assert_eq!(out.repairs[0].0, rp("f"));
    assert_eq!(fs::read(t.path().join("root/f")).unwrap(), b"original");
    // A full write with a wrong hash.
    let mut evs = full_write("f", b"new", 0o600, 0);
    if let Change::Fs(FsOp::Write(w)) = &mut evs[0] {
        w.content_hash = Some([7; 32]);
    }
    let out = a.apply(Seq(3), evs.remove(0)).unwrap();
    assert_eq!(out.repairs.len(), 1);
    assert_eq!(fs::read(t.path().join("root/f")).unwrap(), b"original");
    assert_eq!(fs::read_dir(t.path().join("root")).unwrap().count(), 1, "staging file left behind");
}

#[test]
fn continued_write_without_first_chunk() {
    let t = tempfile::tempdir().unwrap();
    let content = data(2 * CHUNK_BYTES + 10, 5);
    let events = full_write("f", &content, 0o644, 0);
    assert_eq!(events.len(), 3);
    {
        // No staging at all: repair once, ignore the rest.
        let mut a = new_applier(t.path());
        let out = a.apply(Seq(2), events[1].clone()).unwrap();
        assert_eq!(out.repairs.len(), 1);
        let out = a.apply(Seq(3), events[2].clone()).unwrap();
        assert!(out.repairs.is_empty());
        assert!(!t.path().join("root/f").exists());
    }
    {
        // The first chunk was applied (and committed) before a restart: continue in its
        // staging file.
        let mut a = new_applier(t.path());
        apply_ok(&mut a, events[0].clone());
        a.commit(Position { journal_id: JournalId([1; 16]), seq: Seq(1) }).unwrap();
    }
    let mut a = new_applier(t.path());
    apply_ok(&mut a, events[1].clone());
    apply_ok(&mut a, events[2].clone());
    assert!(fs::read(t.path().join("root/f")).unwrap() == content);
}

/// A sequence exercising every op, with paths reused so that a replay runs over later state.
fn scenario() -> Vec<Change> {
    let v1 = data(200_000, 10);
    let v2 = data(150_000, 11);
    let mut v3 = v2.clone();
    v3[BLOCK_SIZE..BLOCK_SIZE + 4].copy_from_slice(b"WXYZ");
    let mut s = Vec::new();
    s.push(fsop(FsOp::Mkdir { path: rp("dir"), mode: 0o755, meta: None }));
    s.extend(full_write("dir/a", &v1, 0o644, 10));
    s.push(fsop(FsOp::Rename { from: rp("dir/a"), to: rp("dir/b") }));
    s.extend(full_write("dir/a", &v2, 0o600, 20));
    s.push(delta_write(
        "dir/a",
        &v3,
        vec![Block { offset: BLOCK_SIZE as u64, data: bytes::Bytes::from_static(b"WXYZ") }],
    ));
    s.push(fsop(FsOp::SetAttr { path: rp("dir/b"), mode: 0o640, meta: None }));
    s.push(fsop(FsOp::Symlink { path: rp("dir/link"), target: b"b".to_vec(), meta: None }));
    s.push(fsop(FsOp::Mkdir { path: rp("other/deep"), mode: 0o700, meta: None }));
    s.extend(full_write("other/deep/f", b"hello", 0o644, 30));
    s.push(fsop(FsOp::Rename { from: rp("other"), to: rp("moved") }));
    s.push(fsop(FsOp::Remove { path: rp("dir/b") }));
    s.extend(full_write("dir/b", b"again", 0o644, 40));
    s.push(fsop(FsOp::Symlink { path: rp("dir/link"), target: b"a".to_vec(), meta: None }));
    s
}

#[test]
fn replaying_a_sequence_ends_identical() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let s = scenario();
    apply_all(&mut a, &s);
    let once = snapshot(&t.path().join("root"));
    assert_eq!(once.get("dir/b"), Some(&Entry::File(b"again".to_vec(), 0o644)));
    assert_eq!(once.get("dir/link"), Some(&Entry::Link(b"a".to_vec())));
    assert_eq!(once.get("moved/deep/f"), Some(&Entry::File(b"hello".to_vec(), 0o644)));
    assert!(!once.contains_key("other"));
    // Crash before commit: everything is replayed, in a fresh applier as after a restart.
    drop(a);
    let mut a = new_applier(t.path());
    apply_all(&mut a, &s);
    assert_eq!(snapshot(&t.path().join("root")), once);
    // And once more in the same process (a session reconnect).
    apply_all(&mut a, &s);
    assert_eq!(snapshot(&t.path().join("root")), once);
}

#[test]
fn renames() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let root = t.path().join("root");
    // A directory with contents.
    fs::create_dir_all(root.join("d/sub")).unwrap();
    fs::write(root.join("d/sub/f"), b"1").unwrap();
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp("d"), to: rp("x/y/d2") }));
    assert_eq!(fs::read(root.join("x/y/d2/sub/f")).unwrap(), b"1");
    assert!(!root.join("d").exists());
    // File over file (replace-by-rename, as editors save).
    fs::write(root.join("t"), b"old").unwrap();
    fs::write(root.join(".t.swp"), b"new").unwrap();
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp(".t.swp"), to: rp("t") }));
    assert_eq!(fs::read(root.join("t")).unwrap(), b"new");
    // File over a non-empty directory, directory over a non-empty directory, dir over file.
    fs::create_dir_all(root.join("nd/z")).unwrap();
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp("t"), to: rp("nd") }));
    assert_eq!(fs::read(root.join("nd")).unwrap(), b"new");
    fs::create_dir_all(root.join("full/q")).unwrap();
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp("x"), to: rp("full") }));
    assert!(root.join("full/y/d2/sub/f").exists() && !root.join("full/q").exists());
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp("full"), to: rp("nd") }));
    assert!(root.join("nd/y/d2/sub/f").exists());
    // Onto its own ancestor.
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp("nd/y/d2"), to: rp("nd") }));
    assert_eq!(fs::read(root.join("nd/sub/f")).unwrap(), b"1");
    assert!(!root.join("nd/y").exists());
    // Source missing: repair the destination unless it exists.
    let out = a.apply(Seq(1), fsop(FsOp::Rename { from: rp("gone"), to: rp("nd") })).unwrap();
    assert!(out.repairs.is_empty());
    let out = a.apply(Seq(1), fsop(FsOp::Rename { from: rp("gone"), to: rp("new") })).unwrap();
    assert_eq!(out.repairs.len(), 1);
    assert_eq!(out.repairs[0].0, rp("new"));
    assert!(fs::read_dir(&root).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".lockstep-tmp")));
}

#[test]
fn symlinks_and_escapes() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let root = t.path().join("root");
    apply_ok(&mut a, fsop(FsOp::Symlink { path: rp("d/l"), target: b"../x".to_vec(), meta: None }));
    assert_eq!(fs::read_link(root.join("d/l")).unwrap(), Path::new("../x"));
    // Replaces a file and a directory.
    fs::write(root.join("f"), b"1").unwrap();
    apply_ok(&mut a, fsop(FsOp::Symlink { path: rp("f"), target: b"d".to_vec(), meta: None }));
    assert!(fs::symlink_metadata(root.join("f")).unwrap().file_type().is_symlink());
    fs::create_dir_all(root.join("g/h")).unwrap();
    apply_ok(&mut a, fsop(FsOp::Symlink { path: rp("g"), target: b"d".to_vec(), meta: None }));
    assert!(fs::symlink_metadata(root.join("g")).unwrap().file_type().is_symlink());

    fs::write(root.join("e1"), b"stale").unwrap();
    for (path, target) in [("e1", "/etc/passwd"), ("d/e2", "../../outside"), ("e3", "a/../../b")] {
        let out = a
            .apply(Seq(1), fsop(FsOp::Symlink { path: rp(path), target: target.as_bytes().to_vec(), meta: None }))
            .unwrap();
        assert!(out.skipped.is_some(), "{path} -> {target} not skipped");
        assert!(fs::symlink_metadata(root.join(path)).is_err());
    }
    // Allowed when configured.
    let mut b = FsApplier::open(t.path().join("root2"), t.path().join("pos2"), true).unwrap();
    apply_ok(&mut b, fsop(FsOp::Symlink { path: rp("e1"), target: b"/etc/passwd".to_vec(), meta: None }));
    assert_eq!(fs::read_link(t.path().join("root2/e1")).unwrap(), Path::new("/etc/passwd"));
}

#[test]
fn nothing_lands_outside_through_symlinks() {
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("y"), b"precious").unwrap();
    fs::set_permissions(outside.path().join("y"), fs::Permissions::from_mode(0o644)).unwrap();
    let before = snapshot(outside.path());

    let mut a = new_applier(t.path());
    let root = t.path().join("root");
    let plant = |name: &str, target: &Path| {
        let _ = fs::remove_file(root.join(name));
        let _ = fs::remove_dir_all(root.join(name));
        std::os::unix::fs::symlink(target, root.join(name)).unwrap();
    };

    // Ops that only need the path if it exists: they must not act through the symlink.
    plant("evil", outside.path());
    apply_ok(&mut a, fsop(FsOp::Remove { path: rp("evil/y") }));
    let out = a.apply(Seq(1), fsop(FsOp::SetAttr { path: rp("evil/y"), mode: 0o777, meta: None })).unwrap();
    assert_eq!(out.repairs.len(), 1);
    let out = a.apply(Seq(1), fsop(FsOp::Rename { from: rp("evil/y"), to: rp("stolen") })).unwrap();
    assert_eq!(out.repairs.len(), 1);
    assert!(!root.join("stolen").exists());
    assert!(fs::symlink_metadata(root.join("evil")).unwrap().file_type().is_symlink());

    // Ops that need the parent: the symlink is replaced by a real directory.
    let mut ops = full_write("evil/x", b"data", 0o644, 0);
    ops.push(fsop(FsOp::Mkdir { path: rp("evil/d"), mode: 0o755, meta: None }));
    ops.push(fsop(FsOp::Symlink { path: rp("evil/l"), target: b"x".to_vec(), meta: None }));
    ops.push(fsop(FsOp::Rename { from: rp("real"), to: rp("evil/sub/x2") }));
    for op in ops {
        plant("evil", outside.path());
        fs::write(root.join("real"), b"r").unwrap();
        let _ = a.apply(Seq(1), op).unwrap();
        assert!(fs::symlink_metadata(root.join("evil")).unwrap().is_dir());
    }
    // Writes into a directory whose parent chain contains a symlink deeper down.
    fs::create_dir_all(root.join("ok")).unwrap();
    plant("ok/evil", outside.path());
    for ev in full_write("ok/evil/deeper/z", b"zz", 0o644, 0) {
        apply_ok(&mut a, ev);
    }
    assert_eq!(fs::read(root.join("ok/evil/deeper/z")).unwrap(), b"zz");

    // Final components that are symlinks are replaced or removed themselves.
    plant("lf", &outside.path().join("y"));
    apply_ok(&mut a, fsop(FsOp::SetAttr { path: rp("lf"), mode: 0o777, meta: None }));
    for ev in full_write("lf", b"mine", 0o600, 0) {
        apply_ok(&mut a, ev);
    }
    assert_eq!(fs::read(root.join("lf")).unwrap(), b"mine");
    plant("lf2", &outside.path().join("y"));
    let out = a
        .apply(Seq(1), delta_write("lf2", b"pr", vec![Block { offset: 0, data: bytes::Bytes::from_static(b"pr") }]))
        .unwrap();
    assert!(out.repairs.is_empty(), "a delta over a symlink starts from empty");
    assert_eq!(fs::read(root.join("lf2")).unwrap(), b"pr");
    plant("lf3", &outside.path().join("y"));
    apply_ok(&mut a, fsop(FsOp::Remove { path: rp("lf3") }));
    plant("ld", outside.path());
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("ld"), mode: 0o700, meta: None }));
    assert!(fs::symlink_metadata(root.join("ld")).unwrap().is_dir());
    plant("lr", outside.path());
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp("lf"), to: rp("lr") }));

    assert_eq!(snapshot(outside.path()), before, "something changed outside the root");
}

#[test]
fn delta_through_symlink_starts_empty() {
    // A delta whose target is a symlink to an outside file must not copy that file in.
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"secret").unwrap();
    let mut a = new_applier(t.path());
    std::os::unix::fs::symlink(outside.path().join("secret"), t.path().join("root/l")).unwrap();
    let out = a.apply(Seq(1), delta_write("l", b"secret", vec![])).unwrap();
    assert_eq!(out.repairs.len(), 1, "delta must not be based on a file outside the root");
    assert!(fs::symlink_metadata(t.path().join("root/l")).unwrap().file_type().is_symlink());
}

#[test]
fn resync_prunes_unmentioned() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let root = t.path().join("root");
    fs::create_dir_all(root.join("keep/sub")).unwrap();
    fs::create_dir_all(root.join("junkdir/deep")).unwrap();
    fs::write(root.join("junkdir/deep/f"), b"x").unwrap();
    fs::write(root.join("keep/old"), b"x").unwrap();
    fs::write(root.join("keep/sub/file"), b"stale").unwrap();
    fs::write(root.join("keep/.file.0123abcd.lockstep-tmp"), b"x").unwrap();
    std::os::unix::fs::symlink("/", root.join("keep/sub/junklink")).unwrap();
    fs::write(root.join("toplevel"), b"x").unwrap();

    a.begin_resync().unwrap();
    let mut snap = vec![
        fsop(FsOp::Mkdir { path: rp("keep"), mode: 0o755, meta: None }),
        fsop(FsOp::Symlink { path: rp("keep/link"), target: b"sub".to_vec(), meta: None }),
        fsop(FsOp::Mkdir { path: rp("empty"), mode: 0o700, meta: None }),
    ];
    snap.extend(full_write("keep/sub/file", b"fresh", 0o644, 0));
    for c in snap {
        let out = a.apply(Seq::ZERO, c).unwrap();
        assert!(out.repairs.is_empty());
    }
    a.end_resync().unwrap();
    let got: Vec<String> = snapshot(&root).into_keys().collect();
    assert_eq!(got, ["empty", "keep", "keep/link", "keep/sub", "keep/sub/file"]);
    assert_eq!(fs::read(root.join("keep/sub/file")).unwrap(), b"fresh");
    assert!(a.end_resync().is_err());
}

#[test]
fn position_survives_reopen_and_corruption_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    assert_eq!(a.position(), None);
    let pos = Position { journal_id: JournalId([9; 16]), seq: Seq(42) };
    a.commit(pos).unwrap();
    assert_eq!(a.position(), Some(pos));
    drop(a);
    let a = new_applier(t.path());
    assert_eq!(a.position(), Some(pos));
    drop(a);

    let file = t.path().join("state/position");
    let mut bytes = fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&file, bytes).unwrap();
    let err = FsApplier::open(t.path().join("root"), file.clone(), false).err().expect("corruption undetected");
    assert!(err.to_string().contains(&file.display().to_string()), "{err}");
    assert!(matches!(err, ApplyError::Io { .. }));
}

#[test]
fn resync_keeps_staging_of_write_in_progress() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    let content = data(CHUNK_BYTES + 5, 6);
    let events = full_write("d/f", &content, 0o644, 0);
    a.begin_resync().unwrap();
    apply_ok(&mut a, events[0].clone());
    a.end_resync().unwrap();
    apply_ok(&mut a, events[1].clone());
    assert!(fs::read(t.path().join("root/d/f")).unwrap() == content);
}

const J: JournalId = JournalId([3; 16]);

fn at(seq: u64) -> Position {
    Position { journal_id: J, seq: Seq(seq) }
}

/// Applies `changes` as journal records `first..`, as a session does.
fn apply_from(a: &mut FsApplier, first: u64, changes: &[Change]) -> Vec<ApplyOutcome> {
    changes.iter().enumerate().map(|(i, c)| a.apply(Seq(first + i as u64), c.clone()).unwrap()).collect()
}

/// Changes that go wrong when replayed over their own result: the replayed write recreates
/// `a`, the replayed rename of `x` finds nothing to move, and the replayed rename of `a` then
/// replaces `b`, the directory that holds `x` by now.
fn unsafe_to_replay() -> Vec<Change> {
    let mut s = Vec::new();
    s.extend(full_write("x/keep", b"kept", 0o644, 1));
    s.extend(full_write("a/f", b"f", 0o644, 2));
    s.push(fsop(FsOp::Rename { from: rp("x"), to: rp("a/x") }));
    s.push(fsop(FsOp::Rename { from: rp("a"), to: rp("b") }));
    s
}

#[test]
fn a_restart_commits_what_was_applied_instead_of_replaying_it() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let s = unsafe_to_replay();
    let expected = {
        let mut a = new_applier(t.path());
        a.session_start(J).unwrap();
        apply_from(&mut a, 1, &s[..1]);
        assert!(a.commit(at(1)).unwrap());
        apply_from(&mut a, 2, &s[1..]);
        snapshot(&root)
        // Dropped without a commit: kill -9 after applying 2..=4.
    };
    assert_eq!(expected.get("b/x/keep"), Some(&Entry::File(b"kept".to_vec(), 0o644)));
    let mut a = new_applier(t.path());
    assert_eq!(a.position(), Some(at(1)));
    a.session_start(J).unwrap();
    assert_eq!(a.position(), Some(at(4)), "the restart must not ask for 2..=4 again");
    assert_eq!(new_applier(t.path()).position(), Some(at(4)), "and the position is durable");
    assert_eq!(snapshot(&root), expected);

    // What a replay would have done: `b/x/keep` is lost.
    apply_from(&mut a, 2, &s[1..]);
    assert_ne!(snapshot(&root), expected, "the scenario no longer shows why replays are avoided");
}

#[test]
fn a_machine_restart_resyncs_rather_than_trusting_the_tree() {
    let t = tempfile::tempdir().unwrap();
    let s = unsafe_to_replay();
    {
        let mut a = new_applier(t.path());
        a.session_start(J).unwrap();
        apply_from(&mut a, 1, &s[..1]);
        assert!(a.commit(at(1)).unwrap());
        apply_from(&mut a, 2, &s[1..3]);
    }
    super::mark::tests::age_to_previous_boot(&super::mark_path(&t.path().join("state/position")));
    let mut a = new_applier(t.path());
    a.session_start(J).unwrap();
    assert_eq!(a.position(), None, "a target whose tree is in doubt must be resynced");
    assert_eq!(new_applier(t.path()).position(), None);
}

#[test]
fn a_mark_not_ahead_of_the_position_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    {
        let mut a = new_applier(t.path());
        a.session_start(J).unwrap();
        apply_from(&mut a, 1, &unsafe_to_replay()[..1]);
        // Idle records after it moved the position further.
        assert!(a.commit(at(9)).unwrap());
    }
    let mut a = new_applier(t.path());
    a.session_start(J).unwrap();
    assert_eq!(a.position(), Some(at(9)));
    // Another journal: the mark says nothing about it.
    let mut a = new_applier(t.path());
    a.session_start(JournalId([4; 16])).unwrap();
    assert_eq!(a.position(), Some(at(9)));
}

#[test]
fn repairs_a_dead_process_asked_for_are_asked_for_again() {
    let t = tempfile::tempdir().unwrap();
    {
        let mut a = new_applier(t.path());
        a.session_start(J).unwrap();
        let out = apply_from(&mut a, 1, &[fsop(FsOp::SetAttr { path: rp("missing"), mode: 0o600, meta: None })]);
        assert_eq!(out[0].repairs.len(), 1);
        apply_from(&mut a, 2, &[fsop(FsOp::Mkdir { path: rp("d"), mode: 0o755, meta: None })]);
    }
    let mut a = new_applier(t.path());
    a.session_start(J).unwrap();
    assert_eq!(a.position(), None, "no position was ever committed: resync");
    // With a committed position the repair comes back.
    let t = tempfile::tempdir().unwrap();
    {
        let mut a = new_applier(t.path());
        a.session_start(J).unwrap();
        apply_from(&mut a, 1, &[fsop(FsOp::Mkdir { path: rp("d"), mode: 0o755, meta: None })]);
        assert!(a.commit(at(1)).unwrap());
        apply_from(&mut a, 2, &[fsop(FsOp::SetAttr { path: rp("missing"), mode: 0o600, meta: None })]);
        apply_from(&mut a, 3, &[fsop(FsOp::Mkdir { path: rp("e"), mode: 0o755, meta: None })]);
    }
    let mut a = new_applier(t.path());
    a.session_start(J).unwrap();
    assert_eq!(a.position(), Some(at(3)));
    let late = a.take_deferred();
    assert_eq!(late.repairs.len(), 1);
    assert_eq!(late.repairs[0].0, rp("missing"));
}

#[test]
fn a_resync_cut_short_starts_over() {
    let t = tempfile::tempdir().unwrap();
    let mut a = new_applier(t.path());
    a.session_start(J).unwrap();
    apply_from(&mut a, 1, &[fsop(FsOp::Mkdir { path: rp("d"), mode: 0o755, meta: None })]);
    // A commit prepared before the resync begins but finishing after.
    let late = a.prepare_commit(at(1)).unwrap().unwrap();
    a.begin_resync().unwrap();
    late().unwrap();
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("e"), mode: 0o755, meta: None }));
    assert_eq!(a.position(), None);
    drop(a);
    assert_eq!(new_applier(t.path()).position(), None);
}

#[test]
fn a_rename_onto_its_ancestor_cut_short_after_parking_completes() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let mut a = new_applier(t.path());
    fs::create_dir_all(root.join("a/b")).unwrap();
    fs::write(root.join("a/b/inner"), b"1").unwrap();
    fs::write(root.join("a/other"), b"2").unwrap();
    // The process died right after parking a/b beside a.
    let parked = super::tree::staging_path(&root, &rp("a"), "rename");
    fs::rename(root.join("a/b"), &parked).unwrap();
    apply_ok(&mut a, fsop(FsOp::Rename { from: rp("a/b"), to: rp("a") }));
    let snap = snapshot(&root);
    assert_eq!(snap.get("a/inner"), Some(&Entry::File(b"1".to_vec(), 0o644)));
    assert!(!snap.contains_key("a/other") && snap.len() == 2, "{snap:?}");
}
