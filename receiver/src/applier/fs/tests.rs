//! Tests against real temp directories: each op, chunked and delta writes, hash mismatches,
//! crash replay, symlink containment, resync pruning and the position file; owners, extended
//! attributes and ACLs, holes, hard links, special files and `safe_links` (they run as root,
//! here and in CI; the unprivileged receiver is tested in a child process that drops root).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use lockstep_common::config::FsTargetOptions;
use lockstep_common::event::{
    Block, Change, FileWrite, FsOp, JournalId, Meta, Seq, SpecialKind, Xattr, BLOCK_SIZE, CHUNK_BYTES,
};
use lockstep_common::proto;
use lockstep_common::relpath::RelPath;

use super::{FsApplier, FsReport, What};
use crate::applier::{Applier, ApplyError, ApplyOutcome, Position};

fn rp(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn new_applier(dir: &Path) -> FsApplier {
    open_with(dir, FsTargetOptions::default()).0
}

/// An applier on `dir/root` (position in `dir/state`) with `opts`, and its report.
fn open_with(dir: &Path, opts: FsTargetOptions) -> (FsApplier, Arc<FsReport>) {
    let report = Arc::new(FsReport::new("web-1", "www"));
    let a = FsApplier::open(dir.join("root"), dir.join("state/position"), opts, report.clone()).unwrap();
    (a, report)
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

    // As rsync -a copies them: absolute, leading outside, dangling, all verbatim.
    fs::write(root.join("e1"), b"stale").unwrap();
    let verbatim = [("e1", "/etc/passwd"), ("d/e2", "../../outside"), ("e3", "a/../../b"), ("e4", "no/such/thing")];
    for (path, target) in verbatim {
        apply_ok(&mut a, fsop(FsOp::Symlink { path: rp(path), target: target.as_bytes().to_vec(), meta: None }));
        assert_eq!(fs::read_link(root.join(path)).unwrap(), Path::new(target));
    }
    // Skipped with safe_links, and whatever was at the path goes.
    let t2 = tempfile::tempdir().unwrap();
    let (mut b, report) = open_with(t2.path(), FsTargetOptions { safe_links: true, ..Default::default() });
    let root2 = t2.path().join("root");
    fs::write(root2.join("e1"), b"stale").unwrap();
    for (path, target) in verbatim.iter().take(3) {
        apply_ok(&mut b, fsop(FsOp::Symlink { path: rp(path), target: target.as_bytes().to_vec(), meta: None }));
        assert!(fs::symlink_metadata(root2.join(path)).is_err(), "{path} -> {target} not skipped");
    }
    apply_ok(&mut b, fsop(FsOp::Symlink { path: rp("e4"), target: b"no/such/thing".to_vec(), meta: None }));
    assert!(fs::symlink_metadata(root2.join("e4")).unwrap().file_type().is_symlink(), "a safe dangling link");
    assert_eq!(report.skipped_count(), 3);
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
    let err = FsApplier::open(
        t.path().join("root"),
        file.clone(),
        FsTargetOptions::default(),
        Arc::new(FsReport::new("a", "s")),
    )
    .err()
    .expect("corruption undetected");
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

// ------------------------------------------------------------------ metadata (issue 18)

fn meta(uid: u32, gid: u32, xattrs: &[(&str, &[u8])]) -> Meta {
    let mut xattrs: Vec<Xattr> =
        xattrs.iter().map(|(n, v)| Xattr { name: n.as_bytes().to_vec(), value: v.to_vec() }).collect();
    xattrs.sort();
    Meta { uid, gid, user: None, group: None, xattrs }
}

/// A one-event full write of `size` bytes holding `blocks` (zeros elsewhere).
fn write_blocks(path: &str, size: u64, blocks: &[(u64, Vec<u8>)], mode: u32, meta: Option<Meta>) -> Change {
    let mut content = vec![0u8; size as usize];
    for (off, data) in blocks {
        content[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    Change::Fs(FsOp::Write(FileWrite {
        path: rp(path),
        first: true,
        last: true,
        delta: false,
        size,
        mode,
        mtime_ns: 1_600_000_000_000_000_000,
        blocks: blocks.iter().map(|(o, d)| Block { offset: *o, data: d.clone().into() }).collect(),
        content_hash: Some(*blake3::hash(&content).as_bytes()),
        meta,
    }))
}

/// A small full write with `meta`.
fn write_meta(path: &str, content: &[u8], mode: u32, meta: Option<Meta>) -> Change {
    write_blocks(path, content.len() as u64, &[(0, content.to_vec())], mode, meta)
}

fn cpath(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// An extended attribute of `path` (not following a symlink).
fn getx(path: &Path, name: &str) -> Option<Vec<u8>> {
    let (p, n) = (cpath(path), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings and buffer for the call.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn setx(path: &Path, name: &str, value: &[u8]) {
    let (p, n) = (cpath(path), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings and buffer for the call.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
}

/// Names of `path`'s extended attributes, sorted.
fn listx(path: &Path) -> Vec<String> {
    let p = cpath(path);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C string and buffer for the call.
    let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr: {}", std::io::Error::last_os_error());
    let mut v: Vec<String> = buf[..r as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    v.sort();
    v
}

/// A POSIX ACL in its extended attribute form (`system.posix_acl_*`): version 2, then
/// (tag, permissions, id) entries in the kernel's order.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

#[test]
fn owners_by_number_and_by_name() {
    let t = tempfile::tempdir().unwrap();
    let (mut a, report) = open_with(t.path(), FsTargetOptions::default());
    let root = t.path().join("root");
    // Numeric (the default): whatever names the source had.
    let mut m = meta(1234, 5678, &[]);
    m.user = Some("nobody".into());
    apply_ok(&mut a, write_meta("f", b"x", 0o4755, Some(m.clone())));
    let st = fs::metadata(root.join("f")).unwrap();
    assert_eq!((st.uid(), st.gid()), (1234, 5678));
    // chown clears set-uid: the mode is set after it.
    assert_eq!(st.mode() & 0o7777, 0o4755);
    // Directories, symlinks (the link itself), special files, and a SetAttr of a file.
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("d"), mode: 0o2750, meta: Some(meta(11, 12, &[])) }));
    let st = fs::metadata(root.join("d")).unwrap();
    assert_eq!((st.uid(), st.gid(), st.mode() & 0o7777), (11, 12, 0o2750));
    apply_ok(&mut a, fsop(FsOp::Symlink { path: rp("d/l"), target: b"../f".to_vec(), meta: Some(meta(21, 22, &[])) }));
    let st = fs::symlink_metadata(root.join("d/l")).unwrap();
    assert_eq!((st.uid(), st.gid()), (21, 22));
    assert_eq!(fs::metadata(root.join("f")).unwrap().uid(), 1234, "the link's target is not touched");
    apply_ok(&mut a, fsop(FsOp::SetAttr { path: rp("f"), mode: 0o640, meta: Some(meta(31, 32, &[])) }));
    let st = fs::metadata(root.join("f")).unwrap();
    assert_eq!((st.uid(), st.gid(), st.mode() & 0o7777), (31, 32, 0o640));
    // Without Meta (an agent before 0.4.0) the owner stays as it is.
    apply_ok(&mut a, fsop(FsOp::SetAttr { path: rp("f"), mode: 0o600, meta: None }));
    assert_eq!(fs::metadata(root.join("f")).unwrap().uid(), 31);
    assert_eq!(report.not_applied_count(What::Owner), 0);

    // By name: the receiver's id for the name, the numeric id for a name it does not know,
    // and root never by name (as rsync).
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions { numeric_ids: false, ..Default::default() });
    let root = t.path().join("root");
    let named = |uid, user: &str, gid, group: &str| Meta {
        uid,
        gid,
        user: Some(user.into()),
        group: Some(group.into()),
        xattrs: vec![],
    };
    apply_ok(&mut a, write_meta("known", b"x", 0o644, Some(named(1234, "nobody", 4321, "nogroup"))));
    let st = fs::metadata(root.join("known")).unwrap();
    assert_eq!((st.uid(), st.gid()), (65534, 65534));
    apply_ok(&mut a, write_meta("unknown", b"x", 0o644, Some(named(1234, "no-such-user-here", 4321, "nor-group"))));
    let st = fs::metadata(root.join("unknown")).unwrap();
    assert_eq!((st.uid(), st.gid()), (1234, 4321));
    apply_ok(&mut a, write_meta("root", b"x", 0o644, Some(named(0, "nobody", 0, "nogroup"))));
    let st = fs::metadata(root.join("root")).unwrap();
    assert_eq!((st.uid(), st.gid()), (0, 0));
    // Switched off: left as the receiver creates it.
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions { owners: false, ..Default::default() });
    apply_ok(&mut a, write_meta("f", b"x", 0o644, Some(meta(1234, 5678, &[]))));
    assert_eq!(fs::metadata(t.path().join("root/f")).unwrap().uid(), 0);
}

#[test]
fn extended_attributes_are_exactly_the_sources() {
    let t = tempfile::tempdir().unwrap();
    let (mut a, report) = open_with(t.path(), FsTargetOptions::default());
    let root = t.path().join("root");
    let m = meta(0, 0, &[("user.a", b"1"), ("user.b", b"2"), ("trusted.t", b"secret")]);
    apply_ok(&mut a, write_meta("f", b"x", 0o644, Some(m)));
    let f = root.join("f");
    assert_eq!(listx(&f), ["trusted.t", "user.a", "user.b"]);
    assert_eq!(getx(&f, "user.b").unwrap(), b"2");
    // Replaced and removed (SetAttr), on a file and on a directory.
    setx(&f, "user.stray", b"left by someone");
    apply_ok(&mut a, fsop(FsOp::SetAttr { path: rp("f"), mode: 0o644, meta: Some(meta(0, 0, &[("user.a", b"3")])) }));
    assert_eq!(listx(&f), ["user.a"]);
    assert_eq!(getx(&f, "user.a").unwrap(), b"3");
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("d"), mode: 0o755, meta: Some(meta(0, 0, &[("user.d", b"")])) }));
    assert_eq!(getx(&root.join("d"), "user.d").unwrap(), b"");
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("d"), mode: 0o755, meta: Some(meta(0, 0, &[])) }));
    assert!(listx(&root.join("d")).is_empty());
    // Redone over a partial result (another value, a stray attribute): the same end state.
    let m = meta(7, 8, &[("user.a", b"final"), ("user.z", b"z")]);
    let change = fsop(FsOp::SetAttr { path: rp("f"), mode: 0o600, meta: Some(m) });
    apply_ok(&mut a, change.clone());
    setx(&f, "user.a", b"half");
    setx(&f, "user.stray", b"x");
    apply_ok(&mut a, change);
    assert_eq!(listx(&f), ["user.a", "user.z"]);
    assert_eq!(getx(&f, "user.a").unwrap(), b"final");
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o600);
    // A delta keeps them (the staging copy gets them again from Meta).
    let m = meta(0, 0, &[("user.kept", b"k")]);
    apply_ok(&mut a, write_meta("g", b"abc", 0o644, Some(m.clone())));
    let Change::Fs(FsOp::Write(mut w)) =
        delta_write("g", b"aXc", vec![Block { offset: 1, data: bytes::Bytes::from_static(b"X") }])
    else {
        unreachable!()
    };
    w.meta = Some(m);
    apply_ok(&mut a, fsop(FsOp::Write(w)));
    assert_eq!(fs::read(root.join("g")).unwrap(), b"aXc");
    assert_eq!(getx(&root.join("g"), "user.kept").unwrap(), b"k");
    assert_eq!(report.not_applied_count(What::Xattr), 0);

    // xattrs = false leaves them alone (neither set nor removed); ACLs still apply.
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions { xattrs: false, ..Default::default() });
    apply_ok(&mut a, write_meta("f", b"x", 0o644, Some(meta(0, 0, &[("user.a", b"1")]))));
    assert!(listx(&t.path().join("root/f")).is_empty());
}

#[test]
fn acls_round_trip_and_inherited_ones_go() {
    let t = tempfile::tempdir().unwrap();
    let (mut a, report) = open_with(t.path(), FsTargetOptions::default());
    let root = t.path().join("root");
    // user::rw- user:1000:r-- group::r-- mask::r-- other::--- (mode 0640: group bits = mask).
    let access = acl(&[
        (ACL_USER_OBJ, 6, NO_ID),
        (ACL_USER, 4, 1000),
        (ACL_GROUP_OBJ, 4, NO_ID),
        (ACL_MASK, 4, NO_ID),
        (ACL_OTHER, 0, NO_ID),
    ]);
    apply_ok(&mut a, write_meta("f", b"x", 0o640, Some(meta(0, 0, &[("system.posix_acl_access", &access)]))));
    assert_eq!(getx(&root.join("f"), "system.posix_acl_access").unwrap(), access);
    assert_eq!(fs::metadata(root.join("f")).unwrap().mode() & 0o7777, 0o640);
    // A directory with a default ACL: new files in it inherit an access ACL from it, which
    // the source's file does not have.
    let default = acl(&[
        (ACL_USER_OBJ, 7, NO_ID),
        (ACL_GROUP_OBJ, 5, NO_ID),
        (ACL_GROUP, 7, 1234),
        (ACL_MASK, 7, NO_ID),
        (ACL_OTHER, 5, NO_ID),
    ]);
    let dir_meta = meta(0, 0, &[("system.posix_acl_default", &default)]);
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("shared"), mode: 0o755, meta: Some(dir_meta) }));
    assert_eq!(getx(&root.join("shared"), "system.posix_acl_default").unwrap(), default);
    apply_ok(&mut a, write_meta("shared/plain", b"x", 0o644, Some(meta(0, 0, &[]))));
    let plain = root.join("shared/plain");
    assert_eq!(getx(&plain, "system.posix_acl_access"), None, "an inherited ACL the source does not have");
    assert_eq!(fs::metadata(&plain).unwrap().mode() & 0o7777, 0o644);
    // (Without Meta, an old agent's file keeps what it inherits, as before.)
    apply_ok(&mut a, write_meta("shared/old", b"x", 0o644, None));
    assert!(getx(&root.join("shared/old"), "system.posix_acl_access").is_some());
    assert_eq!(report.not_applied_count(What::Acl), 0);

    // acls = false: not set, other attributes still are.
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions { acls: false, ..Default::default() });
    let m = meta(0, 0, &[("system.posix_acl_access", &access), ("user.a", b"1")]);
    apply_ok(&mut a, write_meta("f", b"x", 0o640, Some(m)));
    assert_eq!(listx(&t.path().join("root/f")), ["user.a"]);
}

/// Bytes the file really occupies on disk.
fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn sparse_full_writes_keep_holes() {
    const MIB: u64 = 1 << 20;
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions::default());
    let root = t.path().join("root");
    let (b1, b2) = (data(BLOCK_SIZE, 1), data(BLOCK_SIZE, 2));
    // Blocks at 0 and 5 MiB of a 16 MiB file, across two events with a gap between them and a
    // hole at the end; one block of zeros sent anyway (as agents before 0.4.0 do).
    let blocks = [(0, b1.clone()), (2 * MIB, vec![0u8; BLOCK_SIZE]), (5 * MIB, b2.clone())];
    let size = 16 * MIB;
    let Change::Fs(FsOp::Write(whole)) = write_blocks("s", size, &blocks, 0o644, None) else { unreachable!() };
    let first = FileWrite { last: false, content_hash: None, blocks: whole.blocks[..2].to_vec(), ..whole.clone() };
    let second = FileWrite { first: false, blocks: whole.blocks[2..].to_vec(), ..whole.clone() };
    apply_ok(&mut a, fsop(FsOp::Write(first)));
    apply_ok(&mut a, fsop(FsOp::Write(second)));
    let p = root.join("s");
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len() as u64, size);
    assert!(got[..BLOCK_SIZE] == b1[..] && got[5 * MIB as usize..][..BLOCK_SIZE] == b2[..]);
    assert!(got[BLOCK_SIZE..5 * MIB as usize].iter().all(|b| *b == 0));
    // The two data blocks, not the block of zeros.
    assert!(allocated(&p) < 3 * BLOCK_SIZE as u64, "holes filled: {} bytes allocated", allocated(&p));

    // A delta on the sparse file keeps its holes (the base copy copies data only); a block of
    // zeros in a delta punches a hole.
    let mut next = got.clone();
    let patch = data(BLOCK_SIZE, 3);
    next[MIB as usize..][..BLOCK_SIZE].copy_from_slice(&patch);
    next[..BLOCK_SIZE].fill(0);
    let blocks =
        vec![Block { offset: MIB, data: patch.into() }, Block { offset: 0, data: vec![0u8; BLOCK_SIZE].into() }];
    apply_ok(&mut a, delta_write("s", &next, blocks));
    assert!(fs::read(&p).unwrap() == next);
    // Two data blocks: the patch and the one at 5 MiB; the first became a hole.
    assert!(allocated(&p) < 3 * BLOCK_SIZE as u64, "delta filled holes: {} bytes allocated", allocated(&p));
    assert!(allocated(&p) >= 2 * BLOCK_SIZE as u64);

    // A file of one big hole, with O_DIRECT-sized data at its end.
    let tail = data(2 * MIB as usize, 4);
    apply_ok(&mut a, write_blocks("h", 64 * MIB, &[(62 * MIB, tail)], 0o600, None));
    assert!(allocated(&root.join("h")) <= 3 * MIB);

    // sparse = false: every byte allocated, same content.
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions { sparse: false, ..Default::default() });
    apply_ok(&mut a, write_blocks("s", size, &[(0, b1), (5 * MIB, b2)], 0o644, None));
    let p = t.path().join("root/s");
    assert!(allocated(&p) >= size, "{} of {size} allocated", allocated(&p));
    assert!(fs::read(&p).unwrap() == got);
}

#[test]
fn hard_links_live_and_in_a_resync() {
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions::default());
    let root = t.path().join("root");
    apply_ok(&mut a, write_meta("d/f", b"shared", 0o640, Some(meta(5, 6, &[]))));
    fs::write(root.join("other"), b"old file in the way").unwrap();
    let link = |p: &str, t: &str| fsop(FsOp::Link { path: rp(p), target: rp(t) });
    for change in [link("e/g", "d/f"), link("other", "d/f"), link("e/g", "d/f")] {
        apply_ok(&mut a, change);
    }
    let (f, g, o) = (
        fs::metadata(root.join("d/f")).unwrap(),
        fs::metadata(root.join("e/g")).unwrap(),
        fs::metadata(root.join("other")).unwrap(),
    );
    assert_eq!((f.ino(), f.nlink()), (g.ino(), 3));
    assert_eq!(o.ino(), f.ino());
    assert!(fs::read_dir(root.join("e")).unwrap().count() == 1, "staging name left behind");
    // A target that is missing, or not a regular file: the content is asked for.
    apply_ok(&mut a, fsop(FsOp::Mkdir { path: rp("dir"), mode: 0o755, meta: None }));
    for target in ["missing", "dir", "d/f/below"] {
        let out = a.apply(Seq(1), link("h", target)).unwrap();
        assert_eq!(out.repairs.len(), 1, "{target}");
        assert_eq!(out.repairs[0].0, rp("h"));
    }
    // A link's name replaced by a write gets its own file; the other names keep theirs.
    apply_ok(&mut a, write_meta("e/g", b"new", 0o644, None));
    assert_eq!(fs::read(root.join("d/f")).unwrap(), b"shared");

    // In a resync, writes run on workers; the link waits for its target's content.
    a.begin_resync().unwrap();
    let mut snap = full_write("big/f", &data(3 * CHUNK_BYTES, 7), 0o644, 0);
    snap.push(link("big/g", "big/f"));
    snap.extend(full_write("x", b"x", 0o644, 0));
    snap.push(link("y", "x"));
    for c in snap {
        apply_ok(&mut a, c);
    }
    a.end_resync().unwrap();
    let (f, g) = (fs::metadata(root.join("big/f")).unwrap(), fs::metadata(root.join("big/g")).unwrap());
    assert_eq!((f.ino(), f.nlink()), (g.ino(), 2));
    assert_eq!(fs::metadata(root.join("y")).unwrap().ino(), fs::metadata(root.join("x")).unwrap().ino());
    assert!(!root.join("d").exists(), "pruned");

    // hard_links = false: a copy with the same content, mode, owner, attributes and mtime.
    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions { hard_links: false, ..Default::default() });
    let root = t.path().join("root");
    apply_ok(&mut a, write_meta("f", b"content", 0o604, Some(meta(5, 6, &[("user.x", b"1")]))));
    apply_ok(&mut a, link("g", "f"));
    let (f, g) = (fs::metadata(root.join("f")).unwrap(), fs::metadata(root.join("g")).unwrap());
    assert_ne!(f.ino(), g.ino());
    assert_eq!(fs::read(root.join("g")).unwrap(), b"content");
    assert_eq!((g.mode(), g.uid(), g.gid(), g.mtime(), g.mtime_nsec()), (f.mode(), 5, 6, f.mtime(), f.mtime_nsec()));
    assert_eq!(getx(&root.join("g"), "user.x").unwrap(), b"1");
}

#[test]
fn fifos_and_devices() {
    use std::os::unix::fs::FileTypeExt;
    let t = tempfile::tempdir().unwrap();
    let (mut a, report) = open_with(t.path(), FsTargetOptions::default());
    let root = t.path().join("root");
    let special =
        |p: &str, kind, mode, rdev| fsop(FsOp::Special { path: rp(p), kind, mode, rdev, meta: Some(meta(3, 4, &[])) });
    fs::write(root.join("p"), b"a file where the FIFO goes").unwrap();
    apply_ok(&mut a, special("p", SpecialKind::Fifo, 0o620, 0));
    let m = fs::symlink_metadata(root.join("p")).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o620, 3, 4));
    apply_ok(&mut a, special("p", SpecialKind::Fifo, 0o600, 0));
    assert_eq!(fs::symlink_metadata(root.join("p")).unwrap().mode() & 0o7777, 0o600);
    // Devices only when asked: what was at the path goes, and it is counted.
    fs::write(root.join("null"), b"stale").unwrap();
    let null = libc::makedev(1, 3);
    apply_ok(&mut a, special("null", SpecialKind::CharDevice, 0o666, null));
    assert!(fs::symlink_metadata(root.join("null")).is_err());
    assert_eq!(report.not_applied_count(What::Device), 1);
    assert!(report.json()["metadata_not_applied"]["device"] == 1);

    let t = tempfile::tempdir().unwrap();
    let (mut a, _) = open_with(t.path(), FsTargetOptions { devices: true, specials: false, ..Default::default() });
    let root = t.path().join("root");
    apply_ok(&mut a, special("null", SpecialKind::CharDevice, 0o666, null));
    let m = fs::symlink_metadata(root.join("null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!((m.rdev(), m.mode() & 0o7777, m.uid()), (null, 0o666, 3));
    apply_ok(&mut a, special("p", SpecialKind::Fifo, 0o600, 0));
    assert!(fs::symlink_metadata(root.join("p")).is_err(), "specials = false");
    assert!(fs::read_dir(&root).unwrap().count() == 1, "staging name left behind");
}

/// The test binary re-runs one test as a child that dropped root: the variable names its
/// directory.
const UNPRIVILEGED_DIR: &str = "LOCKSTEP_TEST_UNPRIVILEGED_DIR";

#[test]
fn unprivileged_receiver_applies_what_it_can() {
    use std::os::unix::fs::FileTypeExt;
    const NOBODY: u32 = 65534;
    if let Ok(dir) = std::env::var(UNPRIVILEGED_DIR) {
        // The child: from here on as nobody, without capabilities.
        // SAFETY: plain syscalls; the process is this one test.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setgid(NOBODY), 0);
            assert_eq!(libc::setuid(NOBODY), 0);
        }
        assert!(!super::meta::chown_capability(fs::read_to_string("/proc/self/status").ok().as_deref(), NOBODY));
        let dir = Path::new(&dir);
        let (mut a, report) = open_with(dir, FsTargetOptions { devices: true, ..Default::default() });
        let root = dir.join("root");
        let m = meta(1234, 1234, &[("user.ok", b"1"), ("trusted.secret", b"2")]);
        apply_ok(&mut a, write_meta("f", b"content", 0o640, Some(m)));
        let f = root.join("f");
        assert_eq!(fs::read(&f).unwrap(), b"content");
        let st = fs::metadata(&f).unwrap();
        assert_eq!((st.uid(), st.mode() & 0o7777), (NOBODY, 0o640), "owned by the receiver's user");
        assert_eq!(listx(&f), ["user.ok"]);
        assert_eq!(report.not_applied_count(What::Owner), 1);
        assert_eq!(report.not_applied_count(What::Xattr), 1);
        // A FIFO needs no privilege; a device does, and is counted.
        apply_ok(
            &mut a,
            fsop(FsOp::Special { path: rp("p"), kind: SpecialKind::Fifo, mode: 0o600, rdev: 0, meta: None }),
        );
        assert!(fs::symlink_metadata(root.join("p")).unwrap().file_type().is_fifo());
        let dev = FsOp::Special { path: rp("c"), kind: SpecialKind::CharDevice, mode: 0o600, rdev: 0x103, meta: None };
        apply_ok(&mut a, fsop(dev));
        assert!(fs::symlink_metadata(root.join("c")).is_err());
        assert_eq!(report.not_applied_count(What::Device), 1);
        return;
    }
    let t = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(t.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let name = "applier::fs::tests::unprivileged_receiver_applies_what_it_can";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(UNPRIVILEGED_DIR, t.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "the child did not run the test:\n{stdout}");
}

// ------------------------------------------------------------------ safe_links (issue 18)

fn symlink_op(path: &str, target: &str) -> Change {
    fsop(FsOp::Symlink { path: rp(path), target: target.as_bytes().to_vec(), meta: None })
}

fn rename_op(from: &str, to: &str) -> Change {
    fsop(FsOp::Rename { from: rp(from), to: rp(to) })
}

fn link_at(root: &Path, p: &str) -> Option<String> {
    fs::read_link(root.join(p)).ok().map(|t| t.display().to_string())
}

#[test]
fn safe_links_follow_renames() {
    let t = tempfile::tempdir().unwrap();
    let safe = FsTargetOptions { safe_links: true, ..Default::default() };
    let (mut a, report) = open_with(t.path(), safe);
    let root = t.path().join("root");
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        a.session_start(J).unwrap();
        apply_from(
            &mut a,
            1,
            &[
                fsop(FsOp::Mkdir { path: rp("a/b"), mode: 0o755, meta: None }),
                // Safe from a/b (climbs to the root), unsafe one level up.
                symlink_op("a/b/held", "../../x"),
                // Unsafe now, safe two levels deeper.
                symlink_op("a/out", "../../y"),
                symlink_op("abs", "/etc/passwd"),
            ],
        );
    });
    assert_eq!(link_at(&root, "a/b/held").as_deref(), Some("../../x"));
    assert_eq!(link_at(&root, "a/out"), None);
    assert_eq!(report.skipped_count(), 2);
    let text = handle.render();
    assert!(text.contains("lockstep_receiver_symlinks_skipped{agent=\"web-1\",source=\"www\"} 2"), "{text}");
    let status = report.json();
    assert_eq!(status["skipped_symlinks"]["count"], 2);
    assert_eq!(status["skipped_symlinks"]["examples"], serde_json::json!(["a/out", "abs"]));

    // A rename that makes a held link unsafe removes it...
    apply_from(&mut a, 5, &[rename_op("a/b", "c")]);
    assert_eq!(link_at(&root, "c/held"), None);
    assert!(root.join("c").is_dir());
    assert_eq!(report.skipped_count(), 3);
    // ... one that makes a skipped link safe brings it back, with its target verbatim.
    apply_from(&mut a, 6, &[rename_op("c", "p/q/c"), rename_op("a", "p/q/a")]);
    assert_eq!(link_at(&root, "p/q/c/held").as_deref(), Some("../../x"));
    assert_eq!(link_at(&root, "p/q/a/out").as_deref(), Some("../../y"));
    assert_eq!(report.skipped_count(), 1);
    // A skipped link renamed itself stays skipped under its new name (and asks for nothing).
    let out = apply_from(&mut a, 8, &[rename_op("abs", "p/abs2")]);
    assert!(out[0].repairs.is_empty());
    assert!(!root.join("p/abs2").exists());
    // A SetAttr of it changes nothing and asks for nothing.
    let out = apply_from(&mut a, 9, &[fsop(FsOp::SetAttr { path: rp("p/abs2"), mode: 0o777, meta: None })]);
    assert!(out[0].repairs.is_empty());
    assert_eq!(report.json()["skipped_symlinks"]["examples"], serde_json::json!(["p/abs2"]));
    // A file written at a skipped path replaces it; a removal of its directory forgets it.
    apply_from(&mut a, 10, &[symlink_op("p/q/a/b2", "../../../../z")]);
    assert_eq!(report.skipped_count(), 2);
    apply_from(&mut a, 11, &write_meta("p/abs2", b"now a file", 0o644, None).into_iter_once());
    apply_from(&mut a, 12, &[fsop(FsOp::Remove { path: rp("p/q") })]);
    assert_eq!(report.skipped_count(), 0);
    assert!(a.commit(at(12)).unwrap());

    // What the standby holds equals what a fresh receiver of the final tree holds.
    let mut expected = BTreeMap::new();
    expected.insert("p".to_string(), Entry::Dir(0o755));
    expected.insert("p/abs2".to_string(), Entry::File(b"now a file".to_vec(), 0o644));
    assert_eq!(snapshot(&root), expected);
}

/// Lets a single change be passed where a slice is expected.
trait IntoIterOnce {
    fn into_iter_once(self) -> Vec<Change>;
}
impl IntoIterOnce for Change {
    fn into_iter_once(self) -> Vec<Change> {
        vec![self]
    }
}

#[test]
fn skipped_links_survive_a_restart_and_a_resync_clears_them() {
    let t = tempfile::tempdir().unwrap();
    let safe = FsTargetOptions { safe_links: true, ..Default::default() };
    let root = t.path().join("root");
    {
        let (mut a, _) = open_with(t.path(), safe);
        a.session_start(J).unwrap();
        apply_from(
            &mut a,
            1,
            &[fsop(FsOp::Mkdir { path: rp("a"), mode: 0o755, meta: None }), symlink_op("a/l", "../../y")],
        );
        assert!(a.commit(at(2)).unwrap());
    }
    let (mut a, report) = open_with(t.path(), safe);
    a.session_start(J).unwrap();
    assert_eq!(report.skipped_count(), 1, "the skipped set is kept beside the position");
    apply_from(&mut a, 3, &[rename_op("a", "d/a")]);
    assert_eq!(link_at(&root, "d/a/l").as_deref(), Some("../../y"), "restored after a restart");
    // Killed right after applying a change that made a link skipped (no commit): the restart
    // commits what was applied, skipped set included.
    apply_from(&mut a, 4, &[symlink_op("abs", "/abs")]);
    drop(a);
    let (mut a, report) = open_with(t.path(), safe);
    a.session_start(J).unwrap();
    assert_eq!(a.position(), Some(at(4)));
    assert_eq!(report.skipped_count(), 1);

    // A resync clears the set: the snapshot says again what is left out.
    a.begin_resync().unwrap();
    assert_eq!(report.skipped_count(), 0);
    for c in [fsop(FsOp::Mkdir { path: rp("d/a"), mode: 0o755, meta: None }), symlink_op("top", "../out")] {
        apply_ok(&mut a, c);
    }
    a.end_resync().unwrap();
    assert!(a.commit(at(10)).unwrap());
    drop(a);
    let (_, report) = open_with(t.path(), safe);
    assert_eq!(report.json()["skipped_symlinks"]["examples"], serde_json::json!(["top"]));
    assert!(snapshot(&root).keys().all(|k| k.starts_with('d')), "{:?}", snapshot(&root));

    // safe_links switched off: the links it left out are created; on again: removed.
    let (_, report) = open_with(t.path(), FsTargetOptions::default());
    assert_eq!(report.skipped_count(), 0);
    assert_eq!(link_at(&root, "top").as_deref(), Some("../out"));
    let (_, report) = open_with(t.path(), safe);
    assert_eq!(report.skipped_count(), 1);
    assert_eq!(link_at(&root, "top"), None);
}

#[test]
fn a_redone_rename_changes_the_skipped_set_once() {
    let safe = FsTargetOptions { safe_links: true, ..Default::default() };
    let setup = [
        fsop(FsOp::Mkdir { path: rp("a/b"), mode: 0o755, meta: None }),
        symlink_op("a/b/l", "../../../x"),
        symlink_op("a/b/held", "../../h"),
    ];
    // Applied whole, then redone (the process died before recording it as applied).
    let t = tempfile::tempdir().unwrap();
    let (mut a, report) = open_with(t.path(), safe);
    a.session_start(J).unwrap();
    apply_from(&mut a, 1, &setup);
    assert_eq!(report.skipped_count(), 1);
    for _ in 0..2 {
        let out = apply_from(&mut a, 4, &[rename_op("a", "d/e/a")]);
        assert!(out[0].repairs.is_empty());
        assert_eq!(report.skipped_count(), 0);
    }
    let done = snapshot(&t.path().join("root"));
    assert_eq!(done.get("d/e/a/b/l"), Some(&Entry::Link(b"../../../x".to_vec())));
    assert_eq!(done.get("d/e/a/b/held"), Some(&Entry::Link(b"../../h".to_vec())));
    // Died after the tree's rename, before the set's: the redo finds the source gone and
    // still moves (and restores) the skipped link.
    let t = tempfile::tempdir().unwrap();
    let (mut a, report) = open_with(t.path(), safe);
    let root = t.path().join("root");
    a.session_start(J).unwrap();
    apply_from(&mut a, 1, &setup);
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::rename(root.join("a"), root.join("d/e/a")).unwrap();
    let out = apply_from(&mut a, 4, &[rename_op("a", "d/e/a")]);
    assert!(out[0].repairs.is_empty());
    assert_eq!(report.skipped_count(), 0);
    assert_eq!(snapshot(&root), done);

    // Moving closer to the root: the removal of a link that became unsafe is redone from the
    // set when the process died after recording it.
    let t = tempfile::tempdir().unwrap();
    let (mut a, report) = open_with(t.path(), safe);
    let root = t.path().join("root");
    a.session_start(J).unwrap();
    apply_from(&mut a, 1, &setup);
    apply_from(&mut a, 4, &[rename_op("a/b", "c")]);
    assert_eq!(report.skipped_count(), 2);
    assert_eq!(link_at(&root, "c/held"), None);
    std::os::unix::fs::symlink("../../h", root.join("c/held")).unwrap();
    apply_from(&mut a, 4, &[rename_op("a/b", "c")]);
    assert_eq!(link_at(&root, "c/held"), None, "the redo removes what the set lists");
    assert_eq!(report.skipped_count(), 2);
}
