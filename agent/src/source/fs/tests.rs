//! Tests of the fs source against real files in temp dirs, a real sled journal and the real
//! group-commit writer. Most check the outcome a user cares about: replaying the journaled ops
//! (over the snapshot, or over the tree as it was at start) reproduces the tree byte for byte.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_common::config::SourceConfig;
use lockstep_common::event::{open_event, Change, FsOp, Seq, SourceKind, BLOCK_SIZE};
use lockstep_common::relpath::RelPath;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::FsSource;
use crate::journal::{JournalHandle, JournalStore, JournalWriter, SledJournal};
use crate::source::{RepairRequest, Source, SourceContext, SourceState, SourceStatus};

fn rp(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn config(root: &Path, exclude: &[&str]) -> SourceConfig {
    SourceConfig {
        name: "www".into(),
        kind: SourceKind::Fs,
        path: Some(root.to_path_buf()),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        rescan_interval: Duration::ZERO,
        dsn: None,
        publication: None,
        slot: None,
        switch_to_wal: false,
    }
}

/// A journal, an index database and a running source over `root`.
struct Harness {
    root: PathBuf,
    exclude: Vec<String>,
    store: Arc<SledJournal>,
    handle: JournalHandle,
    db: sled::Db,
    running: Option<Running>,
    /// First seq not yet looked at by `ops_since_mark`.
    mark: Seq,
    _dirs: Vec<tempfile::TempDir>,
}

struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), crate::source::SourceError>>,
    status: Arc<SourceStatus>,
    repair_tx: mpsc::Sender<RepairRequest>,
}

impl Harness {
    fn new(exclude: &[&str]) -> Harness {
        let root_dir = tempfile::tempdir().unwrap();
        let jdir = tempfile::tempdir().unwrap();
        let ddir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledJournal::open(jdir.path()).unwrap());
        let (on_durable, mut durable_rx) = mpsc::unbounded_channel();
        let (writer, handle) = JournalWriter::new(store.clone(), on_durable);
        tokio::spawn(writer.run());
        tokio::spawn(async move { while durable_rx.recv().await.is_some() {} });
        let db = sled::open(ddir.path()).unwrap();
        Harness {
            root: root_dir.path().to_path_buf(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            store,
            handle,
            db,
            running: None,
            mark: Seq(1),
            _dirs: vec![root_dir, jdir, ddir],
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn source(&self) -> FsSource {
        let ex: Vec<&str> = self.exclude.iter().map(|s| s.as_str()).collect();
        FsSource::new(&config(&self.root, &ex)).unwrap()
    }

    /// Starts the source and waits until it streams.
    async fn start(&mut self) {
        self.start_with(Arc::new(SourceStatus::new("www", SourceKind::Fs))).await
    }

    /// [`Harness::start`] with a status of the test's.
    async fn start_with(&mut self, status: Arc<SourceStatus>) {
        let src = Box::new(self.source());
        let (repair_tx, repairs) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let ctx = SourceContext {
            name: "www".into(),
            journal: self.handle.clone(),
            db: self.db.clone(),
            status: status.clone(),
            repairs,
            cancel: cancel.clone(),
            resync_floor: Arc::new(crate::source::ResyncFloor::new(self.store.clone())),
            data_dir: std::env::temp_dir(),
        };
        let task = tokio::spawn(src.run(ctx));
        let t = Instant::now();
        loop {
            // Snapshot is also the initial state, so wait for the status to move on.
            if status.state().0 == SourceState::Streaming {
                break;
            }
            assert!(!task.is_finished(), "source ended during start-up");
            assert!(t.elapsed() < Duration::from_secs(20), "source never started streaming");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.running = Some(Running { cancel, task, status, repair_tx });
    }

    async fn stop(&mut self) {
        let r = self.running.take().unwrap();
        r.cancel.cancel();
        r.task.await.unwrap().unwrap();
    }

    fn all_ops(&self, from: Seq) -> Vec<FsOp> {
        let mut out = Vec::new();
        let mut next = from;
        loop {
            let evs = self.store.read_from(next, 10_000, 64 << 20).unwrap();
            if evs.is_empty() {
                return out;
            }
            for ev in &evs {
                assert_eq!(ev.source, "www");
                match open_event(ev).unwrap() {
                    Change::Fs(op) => out.push(op),
                    other => panic!("unexpected change {other:?}"),
                }
                next = Seq(ev.seq + 1);
            }
        }
    }

    /// Ops journaled since the last call, once `done` holds for them (or a timeout).
    async fn ops_until(&mut self, done: impl Fn(&[FsOp]) -> bool) -> Vec<FsOp> {
        let t = Instant::now();
        loop {
            let ops = self.all_ops(self.mark);
            if done(&ops) {
                // Let anything that follows (it should not) show up, then take it all.
                tokio::time::sleep(Duration::from_millis(150)).await;
                let ops = self.all_ops(self.mark);
                self.mark = self.store.last_seq().next();
                return ops;
            }
            if t.elapsed() > Duration::from_secs(10) {
                if let Some(r) = self.running.take() {
                    if r.task.is_finished() {
                        panic!("source ended: {:?}", r.task.await);
                    }
                }
                panic!("timed out; ops so far: {ops:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the source has been quiet for a while and returns what it journaled.
    async fn settle(&mut self) -> Vec<FsOp> {
        let mut last = self.store.last_seq();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(300) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.store.last_seq();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
        let ops = self.all_ops(self.mark);
        self.mark = self.store.last_seq().next();
        ops
    }
}

/// A receiver's view: what applying the ops produces.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir(u32),
    File { mode: u32, data: Vec<u8> },
    Link(Vec<u8>),
    Special(u32),
}

#[derive(Default, Debug, Clone, PartialEq, Eq)]
struct Model {
    nodes: BTreeMap<RelPath, Node>,
    staged: Option<(RelPath, Vec<u8>)>,
}

impl Model {
    fn remove_tree(&mut self, p: &RelPath) {
        self.nodes.retain(|k, _| !k.starts_with(p));
    }

    fn apply(&mut self, op: &FsOp) {
        if let Some(parent) = op.path().parent() {
            assert!(
                matches!(self.nodes.get(&parent), Some(Node::Dir(_))),
                "op on {} before its parent exists: {op:?}",
                op.path()
            );
        }
        match op {
            FsOp::Mkdir { path, mode, .. } => {
                if !matches!(self.nodes.get(path), Some(Node::Dir(_))) {
                    self.remove_tree(path);
                }
                self.nodes.insert(path.clone(), Node::Dir(*mode));
            }
            FsOp::Remove { path } => self.remove_tree(path),
            FsOp::Rename { from, to } => {
                assert!(self.nodes.contains_key(from), "rename of missing {from}");
                self.remove_tree(to);
                let moved: Vec<(RelPath, Node)> = self
                    .nodes
                    .iter()
                    .filter(|(k, _)| k.starts_with(from))
                    .map(|(k, v)| (k.rebase(from, to), v.clone()))
                    .collect();
                self.remove_tree(from);
                self.nodes.extend(moved);
            }
            FsOp::SetAttr { path, mode, .. } => match self.nodes.get_mut(path) {
                Some(Node::Dir(m)) | Some(Node::File { mode: m, .. }) | Some(Node::Special(m)) => *m = *mode,
                // Owner only.
                Some(Node::Link(_)) => {}
                other => panic!("setattr of {path}: {other:?}"),
            },
            FsOp::Symlink { path, target, .. } => {
                self.remove_tree(path);
                self.nodes.insert(path.clone(), Node::Link(target.clone()));
            }
            FsOp::Link { path, target } => {
                let node = match self.nodes.get(target) {
                    Some(n @ Node::File { .. }) => n.clone(),
                    other => panic!("hard link {path} to {target}: {other:?}"),
                };
                self.remove_tree(path);
                self.nodes.insert(path.clone(), node);
            }
            FsOp::Special { path, mode, .. } => {
                self.remove_tree(path);
                self.nodes.insert(path.clone(), Node::Special(*mode));
            }
            FsOp::Write(w) => {
                if w.first {
                    let base = match (w.delta, self.nodes.get(&w.path)) {
                        (true, Some(Node::File { data, .. })) => data.clone(),
                        (true, other) => panic!("delta on {}: {other:?}", w.path),
                        (false, _) => Vec::new(),
                    };
                    self.staged = Some((w.path.clone(), base));
                }
                let (p, data) = self.staged.as_mut().expect("write chunk without first");
                assert_eq!(*p, w.path, "interleaved file writes");
                for b in &w.blocks {
                    let end = b.offset as usize + b.data.len();
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    data[b.offset as usize..end].copy_from_slice(&b.data);
                }
                if w.last {
                    let (p, mut data) = self.staged.take().unwrap();
                    data.resize(w.size as usize, 0);
                    assert_eq!(w.content_hash, Some(*blake3::hash(&data).as_bytes()), "content hash of {p}");
                    self.remove_tree(&p);
                    self.nodes.insert(p, Node::File { mode: w.mode, data });
                }
            }
        }
    }

    fn apply_all(&mut self, ops: &[FsOp]) {
        for op in ops {
            self.apply(op);
        }
        assert!(self.staged.is_none(), "unfinished file write");
    }

    /// The tree on disk, as a model (honouring excludes by leaving out `skip` prefixes).
    fn from_disk(root: &Path, skip: &[&str]) -> Model {
        fn walk(root: &Path, dir: &Path, skip: &[&str], m: &mut Model) {
            for de in std::fs::read_dir(dir).unwrap() {
                let de = de.unwrap();
                let full = de.path();
                let rel = RelPath::from_under(root, &full).unwrap().unwrap();
                let s = rel.to_string();
                if skip.iter().any(|k| s == *k || s.starts_with(&format!("{k}/")) || s.ends_with(k)) {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&full).unwrap();
                let mode = meta.permissions().mode() & 0o7777;
                if meta.file_type().is_symlink() {
                    let t = std::fs::read_link(&full).unwrap();
                    m.nodes.insert(rel, Node::Link(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str()).to_vec()));
                } else if meta.is_dir() {
                    m.nodes.insert(rel, Node::Dir(mode));
                    walk(root, &full, skip, m);
                } else {
                    m.nodes.insert(rel, Node::File { mode, data: std::fs::read(&full).unwrap() });
                }
            }
        }
        let mut m = Model::default();
        walk(root, root, skip, &mut m);
        m
    }
}

async fn snapshot_ops(src: &FsSource) -> Vec<FsOp> {
    let (tx, mut rx) = mpsc::channel(64);
    // Not running here: nothing else would say the tree is watched.
    src.ready.send_replace(true);
    let snap = src.snapshotter();
    let task = tokio::spawn(async move { snap.snapshot(tx).await });
    let mut ops = Vec::new();
    while let Some(c) = rx.recv().await {
        match c {
            Change::Fs(op) => ops.push(op),
            other => panic!("unexpected {other:?}"),
        }
    }
    task.await.unwrap().unwrap();
    ops
}

fn writes_of<'a>(ops: &'a [FsOp], path: &str) -> Vec<&'a lockstep_common::event::FileWrite> {
    ops.iter()
        .filter_map(|o| match o {
            FsOp::Write(w) if w.path == rp(path) => Some(w),
            _ => None,
        })
        .collect()
}

fn is_last_write(ops: &[FsOp], path: &str) -> bool {
    writes_of(ops, path).iter().any(|w| w.last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_operations_replicate() {
    let mut h = Harness::new(&[]);
    std::fs::write(h.p("seed"), b"seed").unwrap();
    h.start().await;
    assert!(h.all_ops(Seq(1)).is_empty(), "baseline must not journal content");
    let mut model = Model::from_disk(&h.root, &[]);

    // create
    std::fs::write(h.p("a.txt"), b"hello").unwrap();
    let ops = h.ops_until(|o| is_last_write(o, "a.txt")).await;
    let w = writes_of(&ops, "a.txt");
    assert!(!w[0].delta && w[0].first && w.last().unwrap().size == 5);
    model.apply_all(&ops);

    // append
    let mut f = std::fs::OpenOptions::new().append(true).open(h.p("a.txt")).unwrap();
    std::io::Write::write_all(&mut f, b" world").unwrap();
    drop(f);
    let ops = h.ops_until(|o| writes_of(o, "a.txt").iter().any(|w| w.last && w.size == 11)).await;
    model.apply_all(&ops);

    // truncate
    std::fs::OpenOptions::new().write(true).open(h.p("a.txt")).unwrap().set_len(3).unwrap();
    let ops = h.ops_until(|o| writes_of(o, "a.txt").iter().any(|w| w.last && w.size == 3)).await;
    model.apply_all(&ops);

    // empty file, mkdir, nested file, empty dir
    std::fs::write(h.p("empty"), b"").unwrap();
    std::fs::create_dir(h.p("d")).unwrap();
    std::fs::write(h.p("d/inner"), b"x").unwrap();
    std::fs::create_dir(h.p("emptydir")).unwrap();
    let ops = h
        .ops_until(|o| {
            is_last_write(o, "empty")
                && is_last_write(o, "d/inner")
                && o.iter().any(|op| matches!(op, FsOp::Mkdir { path, .. } if *path == rp("emptydir")))
        })
        .await;
    assert!(ops.iter().any(|op| matches!(op, FsOp::Mkdir { path, .. } if *path == rp("d"))));
    let e = writes_of(&ops, "empty");
    assert!(e.len() == 1 && e[0].size == 0 && e[0].blocks.is_empty());
    model.apply_all(&ops);

    // chmod
    std::fs::set_permissions(h.p("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let ops = h
        .ops_until(|o| o.iter().any(|op| matches!(op, FsOp::SetAttr { path, mode: 0o600, .. } if *path == rp("a.txt"))))
        .await;
    assert_eq!(ops.len(), 1, "{ops:?}");
    model.apply_all(&ops);

    // symlink
    symlink("a.txt", h.p("link")).unwrap();
    let ops = h
        .ops_until(|o| {
            o.iter()
                .any(|op| matches!(op, FsOp::Symlink { path, target, .. } if *path == rp("link") && target == b"a.txt"))
        })
        .await;
    model.apply_all(&ops);

    // delete file, rmdir (with content)
    std::fs::remove_file(h.p("a.txt")).unwrap();
    std::fs::remove_dir_all(h.p("d")).unwrap();
    std::fs::remove_dir(h.p("emptydir")).unwrap();
    let ops = h
        .ops_until(|o| {
            ["a.txt", "d", "emptydir"]
                .iter()
                .all(|p| o.iter().any(|op| matches!(op, FsOp::Remove { path } if *path == rp(p))))
        })
        .await;
    assert!(!ops.iter().any(|op| matches!(op, FsOp::Remove { path } if *path == rp("d/inner"))), "{ops:?}");
    model.apply_all(&ops);

    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directory_rename_is_one_op_and_atomic_replace_works() {
    let mut h = Harness::new(&[]);
    std::fs::create_dir_all(h.p("d/sub")).unwrap();
    for i in 0..20 {
        std::fs::write(h.p(&format!("d/sub/f{i}")), vec![i as u8; 1000]).unwrap();
    }
    std::fs::write(h.p("target"), b"old content").unwrap();
    h.start().await;
    let mut model = Model::from_disk(&h.root, &[]);

    std::fs::rename(h.p("d"), h.p("e")).unwrap();
    let ops = h.ops_until(|o| !o.is_empty()).await;
    assert_eq!(ops, vec![FsOp::Rename { from: rp("d"), to: rp("e") }]);
    model.apply_all(&ops);

    // Write a temporary file, then rename it over the target.
    std::fs::write(h.p("target.tmp"), b"new content, longer").unwrap();
    std::fs::rename(h.p("target.tmp"), h.p("target")).unwrap();
    let ops = h.settle().await;
    assert!(!ops.is_empty());
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_in_large_file_is_a_small_delta() {
    let mut h = Harness::new(&[]);
    let mut data: Vec<u8> = (0..8 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(h.p("big"), &data).unwrap();
    h.start().await;
    let mut model = Model::from_disk(&h.root, &[]);

    let at = 3 * 1024 * 1024 + 100;
    for b in &mut data[at..at + BLOCK_SIZE] {
        *b = !*b;
    }
    let f = std::fs::OpenOptions::new().write(true).open(h.p("big")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data[at..at + BLOCK_SIZE], at as u64).unwrap();
    drop(f);
    let ops = h.ops_until(|o| is_last_write(o, "big")).await;
    let ws = writes_of(&ops, "big");
    assert!(ws.iter().all(|w| w.delta), "{ws:?}");
    let bytes: usize = ws.iter().flat_map(|w| &w.blocks).map(|b| b.data.len()).sum();
    assert!(bytes <= 2 * BLOCK_SIZE, "delta carried {bytes} bytes");
    assert!(ws.iter().map(|w| w.blocks.len()).sum::<usize>() <= 2);
    assert_eq!(ws.last().unwrap().size, 8 << 20);
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_journals_exactly_the_offline_changes() {
    let mut h = Harness::new(&[]);
    std::fs::create_dir_all(h.p("keep/deep")).unwrap();
    std::fs::write(h.p("keep/deep/same"), b"unchanged").unwrap();
    std::fs::write(h.p("keep/edit"), b"before").unwrap();
    std::fs::write(h.p("gone"), b"bye").unwrap();
    std::fs::create_dir(h.p("gonedir")).unwrap();
    std::fs::write(h.p("gonedir/x"), b"x").unwrap();
    std::fs::write(h.p("mode"), b"m").unwrap();
    h.start().await;
    let mut model = Model::from_disk(&h.root, &[]);
    h.stop().await;
    assert!(h.all_ops(Seq(1)).is_empty());

    // Offline changes.
    std::fs::write(h.p("keep/edit"), b"after, and longer").unwrap();
    std::fs::remove_file(h.p("gone")).unwrap();
    std::fs::remove_dir_all(h.p("gonedir")).unwrap();
    std::fs::set_permissions(h.p("mode"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::create_dir(h.p("newdir")).unwrap();
    std::fs::write(h.p("newdir/n"), b"new").unwrap();

    h.start().await;
    let ops = h.settle().await;
    let mut paths: Vec<String> = ops.iter().map(|o| o.path().to_string()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths, ["gone", "gonedir", "keep/edit", "mode", "newdir", "newdir/n"], "{ops:#?}");
    assert!(ops.iter().any(|o| matches!(o, FsOp::SetAttr { path, mode: 0o640, .. } if *path == rp("mode"))));
    assert!(ops.contains(&FsOp::Remove { path: rp("gonedir") }));
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);

    // And the restarted source keeps following changes.
    std::fs::write(h.p("keep/deep/same"), b"changed now").unwrap();
    let ops = h.ops_until(|o| is_last_write(o, "keep/deep/same")).await;
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

/// The first index is built silently while receivers are seeded from snapshots; a path that
/// changed after a snapshot started may be in it as it was before, and its watcher event may
/// be missed or arrive after the index recorded the new state. So the first index journals
/// what changed since just before the first snapshot started — and everything below a
/// directory it journals (a tree moved in keeps its children's old change times) — and only
/// records the rest. (Here a snapshot "starts" without a receiver, before the source does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_index_journals_what_changed_since_the_first_snapshot() {
    let mut h = Harness::new(&[]);
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(outside.path().join("tree/deep")).unwrap();
    std::fs::write(outside.path().join("tree/deep/child"), b"moved in").unwrap();
    std::fs::write(h.p("old"), b"unchanged for long").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let status = Arc::new(SourceStatus::new("www", SourceKind::Fs));
    let snapshot = status.snapshot_started();
    std::fs::write(h.p("new"), b"just written").unwrap();
    std::fs::rename(outside.path().join("tree"), h.p("tree")).unwrap();
    drop(snapshot);
    h.start_with(status).await;
    let ops = h.settle().await;
    let mut paths: Vec<String> = ops.iter().map(|o| o.path().to_string()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths, ["new", "tree", "tree/deep", "tree/deep/child"], "{ops:#?}");
    assert!(is_last_write(&ops, "tree/deep/child"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn excludes_are_honoured() {
    let mut h = Harness::new(&["*.swp", "cache/**"]);
    std::fs::create_dir(h.p("cache")).unwrap();
    std::fs::write(h.p("cache/old"), b"c").unwrap();
    h.start().await;
    std::fs::write(h.p("x.swp"), b"swap").unwrap();
    std::fs::create_dir(h.p("cache/sub")).unwrap();
    std::fs::write(h.p("cache/sub/y"), b"cached").unwrap();
    std::fs::write(h.p("cache/z"), b"cached").unwrap();
    std::fs::write(h.p("real"), b"real").unwrap();
    let ops = h.ops_until(|o| is_last_write(o, "real")).await;
    for op in &ops {
        let p = op.path().to_string();
        assert!(!p.ends_with(".swp") && !p.starts_with("cache/"), "excluded path journaled: {op:?}");
    }
    let snap = snapshot_ops(&h.source()).await;
    for op in &snap {
        let p = op.path().to_string();
        assert!(!p.ends_with(".swp") && !p.starts_with("cache/"), "excluded path in snapshot: {op:?}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_sends_parents_first_and_full_content() {
    let h = Harness::new(&[]);
    std::fs::create_dir_all(h.p("a/b/c")).unwrap();
    std::fs::create_dir(h.p("empty")).unwrap();
    std::fs::write(h.p("a/b/c/small"), b"small").unwrap();
    std::fs::write(h.p("a/empty-file"), b"").unwrap();
    let big: Vec<u8> = (0..(3 << 20) + 777).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(h.p("a/big"), &big).unwrap();
    symlink("b/c/small", h.p("a/link")).unwrap();
    std::fs::set_permissions(h.p("a/b"), std::fs::Permissions::from_mode(0o750)).unwrap();

    let ops = snapshot_ops(&h.source()).await;
    assert!(ops.iter().all(|o| match o {
        FsOp::Write(w) => !w.delta,
        FsOp::Mkdir { .. } | FsOp::Symlink { .. } => true,
        _ => false,
    }));
    assert!(writes_of(&ops, "a/big").len() >= 4);
    let mut model = Model::default();
    model.apply_all(&ops); // panics on a child before its parent or a bad content hash
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_resends_full_state() {
    let mut h = Harness::new(&[]);
    std::fs::write(h.p("f"), vec![7u8; 300_000]).unwrap();
    h.start().await;
    let tx = h.running.as_ref().unwrap().repair_tx.clone();
    tx.send(RepairRequest { path: rp("f"), reason: "test".into() }).await.unwrap();
    tx.send(RepairRequest { path: rp("missing"), reason: "test".into() }).await.unwrap();
    let ops = h.ops_until(|o| is_last_write(o, "f") && o.iter().any(|op| matches!(op, FsOp::Remove { .. }))).await;
    let ws = writes_of(&ops, "f");
    assert!(!ws[0].delta && ws.last().unwrap().size == 300_000);
    let mut model = Model::default();
    model.apply_all(&ops);
    assert_eq!(model.nodes.get(&rp("f")), Model::from_disk(&h.root, &[]).nodes.get(&rp("f")));
    let status = h.running.as_ref().unwrap().status.clone();
    assert!(status.last_seq() >= Seq(1));
    h.stop().await;
}

/// A repair of a directory (a receiver lacking a rename's source, say) re-sends everything
/// under it, not just the directory: the index says its children were sent, so nothing else
/// would send them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_of_a_directory_resends_its_whole_subtree() {
    let mut h = Harness::new(&[]);
    std::fs::create_dir_all(h.p("d/sub")).unwrap();
    std::fs::write(h.p("d/a"), b"aaa").unwrap();
    std::fs::write(h.p("d/sub/b"), vec![3u8; 70_000]).unwrap();
    std::os::unix::fs::symlink("target-2", h.p("d/sub/l.lnk")).unwrap();
    h.start().await;
    h.settle().await;
    let tx = h.running.as_ref().unwrap().repair_tx.clone();
    tx.send(RepairRequest { path: rp("d"), reason: "rename source missing".into() }).await.unwrap();
    let ops = h
        .ops_until(|o| o.iter().any(|op| matches!(op, FsOp::Symlink { path, .. } if *path == rp("d/sub/l.lnk"))))
        .await;
    // Applied to an empty standby, the repair alone rebuilds the directory.
    let mut model = Model::default();
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_of_changes_converges() {
    let mut h = Harness::new(&[]);
    h.start().await;
    let mut model = Model::from_disk(&h.root, &[]);
    for i in 0..50 {
        let d = h.p(&format!("dir{}", i % 5));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), vec![i as u8; (i * 997) % 200_000]).unwrap();
        if i % 7 == 0 {
            std::fs::rename(d.join(format!("f{i}")), d.join(format!("g{i}"))).unwrap();
        }
        if i % 11 == 0 {
            let tmp = h.p("swap.new");
            std::fs::write(&tmp, format!("version {i}")).unwrap();
            std::fs::rename(&tmp, h.p("swap")).unwrap();
        }
    }
    std::fs::rename(h.p("dir1"), h.p("dir1-moved")).unwrap();
    std::fs::remove_dir_all(h.p("dir2")).unwrap();
    let ops = h.settle().await;
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

/// A crash after journaling a new path but before its index update leaves only the stale
/// marker written ahead of the records; the restart must then re-send the path if it exists,
/// or journal its removal if it is gone (a temp file renamed away), so no receiver keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_markers_left_by_a_crash_are_resolved_on_restart() {
    let mut h = Harness::new(&[]);
    std::fs::write(h.p("base"), b"base").unwrap();
    h.start().await;
    h.stop().await;
    std::fs::write(h.p("still-here"), b"content").unwrap();
    // What the crash left: markers for two new paths, no index entries, and the disk moved on
    // (one of the paths no longer exists).
    let index = super::index::Index::open(&h.db, "www").unwrap();
    index.put_stale_markers(&[rp("renamed-away.tmp"), rp("still-here")]).unwrap();
    drop(index);
    let before = h.store.last_seq();
    h.start().await;
    let ops = h.settle().await;
    assert!(ops.contains(&FsOp::Remove { path: rp("renamed-away.tmp") }), "{ops:#?}");
    assert!(is_last_write(&ops, "still-here"), "{ops:#?}");
    let mut model = Model::from_disk(&h.root, &[]);
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    assert!(h.store.last_seq() > before);
    h.stop().await;
}

/// A crash right after a directory rename was journaled, before the index moved the subtree:
/// the standby has the directory under its new name with everything it held, the index has
/// a stale marker there and the old subtree under the old name, and a file in it was deleted
/// meanwhile. After the restart the standby must not keep that file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_a_rename_and_its_index_move_leaves_nothing_behind() {
    let mut h = Harness::new(&[]);
    std::fs::create_dir_all(h.p("old/sub")).unwrap();
    std::fs::write(h.p("old/keep"), b"keep").unwrap();
    std::fs::write(h.p("old/sub/gone"), b"gone").unwrap();
    h.start().await;
    h.settle().await;
    h.stop().await;
    // The standby had everything, then applied the rename before the crash.
    let mut standby = Model::from_disk(&h.root, &[]);
    standby.apply(&FsOp::Rename { from: rp("old"), to: rp("new") });
    // What the agent's index kept: the marker written before the append, not the move.
    let index = super::index::Index::open(&h.db, "www").unwrap();
    index.put_stale_markers(&[rp("new")]).unwrap();
    drop(index);
    // The disk: renamed, and a file deleted while the agent was down.
    std::fs::rename(h.p("old"), h.p("new")).unwrap();
    std::fs::remove_file(h.p("new/sub/gone")).unwrap();
    h.start().await;
    standby.apply_all(&h.settle().await);
    assert_eq!(standby.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

/// Changes made inside a directory right after it was renamed (before the watcher has caught
/// up with the move) must all reach the journal under the new path: deletes, creates and
/// nested renames, repeated with directories moved deeper and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_right_after_a_directory_rename_are_not_lost() {
    let mut h = Harness::new(&[]);
    std::fs::create_dir_all(h.p("a/sub/deep")).unwrap();
    std::fs::create_dir_all(h.p("x/y")).unwrap();
    for i in 0..20 {
        std::fs::write(h.p(&format!("a/f{i}")), format!("f{i}")).unwrap();
        std::fs::write(h.p(&format!("a/sub/g{i}")), format!("g{i}")).unwrap();
        std::fs::write(h.p(&format!("a/sub/deep/h{i}")), format!("h{i}")).unwrap();
    }
    h.start().await;
    let mut model = Model::from_disk(&h.root, &[]);
    let mut at = "a".to_string();
    for round in 0..40 {
        let to = match round % 3 {
            0 => format!("x/y/m{round}"),
            1 => format!("x/m{round}"),
            _ => format!("m{round}"),
        };
        std::fs::rename(h.p(&at), h.p(&to)).unwrap();
        // No pause: these race the watcher's handling of the move.
        let i = round % 20;
        let _ = std::fs::remove_file(h.p(&format!("{to}/f{i}")));
        let _ = std::fs::remove_file(h.p(&format!("{to}/sub/g{i}")));
        let _ = std::fs::remove_file(h.p(&format!("{to}/sub/deep/h{i}")));
        std::fs::write(h.p(&format!("{to}/sub/deep/new{round}")), format!("n{round}")).unwrap();
        if round % 4 == 0 {
            std::fs::rename(h.p(&format!("{to}/sub/deep")), h.p(&format!("{to}/deep{round}"))).unwrap();
            std::fs::rename(h.p(&format!("{to}/deep{round}")), h.p(&format!("{to}/sub/deep"))).unwrap();
        }
        at = to;
        if round % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    let ops = h.settle().await;
    model.apply_all(&ops);
    assert_eq!(model.nodes, Model::from_disk(&h.root, &[]).nodes);
    h.stop().await;
}

/// notify learns of a directory rename only when its thread handles the event: until then it
/// reports changes inside the directory under the old path, and while it re-registers the
/// watches, not at all. A busy machine can hold its thread there after the engine has handled
/// the rename (the destination compared with the disk as it then was). A file deleted and one
/// created in the moved directory in that window must still reach the journal. The window is
/// forced by a failpoint that stops notify's thread right after it handed on the rename.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_in_a_moved_directory_before_the_watcher_caught_up_are_not_lost() {
    const { assert!(cfg!(feature = "failpoints"), "needs the failpoints feature (the crate's dev-dependencies enable it)") };
    let scenario = fail::FailScenario::setup();
    let mut h = Harness::new(&[]);
    std::fs::create_dir_all(h.p("a/sub")).unwrap();
    for f in ["a/f", "a/g", "a/sub/h"] {
        std::fs::write(h.p(f), f).unwrap();
    }
    h.start().await;
    let mut model = Model::from_disk(&h.root, &[]);
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    fail::cfg("fs::watch::stall_after_rename", &format!("return({})", h.root.display())).unwrap();
    fail::cfg_callback("fs::watch::stalled", move || {
        let _ = reached_tx.send(());
        let _ = go_rx.lock().unwrap().recv();
    })
    .unwrap();
    std::fs::rename(h.p("a"), h.p("b")).unwrap();
    reached.recv_timeout(Duration::from_secs(10)).expect("notify's thread stopped after the rename");
    // The engine handles the rename meanwhile (its thread is not the one stopped).
    model.apply_all(&h.ops_until(|ops| ops.iter().any(|o| matches!(o, FsOp::Rename { .. }))).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::remove_file(h.p("b/f")).unwrap();
    std::fs::remove_file(h.p("b/sub/h")).unwrap();
    std::fs::write(h.p("b/sub/new"), "new").unwrap();
    drop(go);
    fail::remove("fs::watch::stall_after_rename");
    model.apply_all(&h.settle().await);
    let on_disk = Model::from_disk(&h.root, &[]).nodes;
    // Stopped before asserting: a failed assertion must not leave the engine's thread running.
    h.stop().await;
    scenario.teardown();
    assert_eq!(model.nodes, on_disk);
}

/// notify hands on a directory's creation before it adds the watch on it (at the end of the
/// batch of kernel events it read); what is created inside before then reports nothing. An
/// engine that walked the new directory right away could record it without a file created a
/// moment later, and never hear of that file. The engine walks a new directory only once the
/// watcher has caught up, and walks it again when the directory's own creation arrives (it may
/// have recorded it already through its parent).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_created_in_a_new_directory_before_its_watch_are_not_lost() {
    const { assert!(cfg!(feature = "failpoints"), "needs the failpoints feature (the crate's dev-dependencies enable it)") };
    let scenario = fail::FailScenario::setup();
    let mut h = Harness::new(&[]);
    h.start().await;
    let mut model = Model::from_disk(&h.root, &[]);
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    fail::cfg("fs::watch::stall_after_mkdir", &format!("return({})", h.p("p").display())).unwrap();
    fail::cfg_callback("fs::watch::stalled", move || {
        let _ = reached_tx.send(());
        let _ = go_rx.lock().unwrap().recv();
    })
    .unwrap();
    std::fs::create_dir(h.p("p")).unwrap();
    reached.recv_timeout(Duration::from_secs(10)).expect("notify's thread stopped after p's creation");
    // notify has handed on p's creation but not yet watched p.
    std::fs::create_dir(h.p("p/d")).unwrap();
    // An engine that walks p now records p/d empty (give it the chance; a correct one waits).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2)
        && !h.all_ops(h.mark).iter().any(|o| matches!(o, FsOp::Mkdir { path, .. } if *path == rp("p/d")))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(h.p("p/d/f"), "made before p/d was watched").unwrap();
    drop(go);
    fail::remove("fs::watch::stall_after_mkdir");
    model.apply_all(&h.settle().await);
    let on_disk = Model::from_disk(&h.root, &[]).nodes;
    h.stop().await;
    scenario.teardown();
    assert_eq!(model.nodes, on_disk);
}

/// A snapshot reads the disk on its own: a file created and deleted while one runs can be in
/// it without the index ever knowing the file. Its deletion must still reach the journal, or
/// the receiver seeded by that snapshot keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_path_a_running_snapshot_may_have_sent_is_removed_when_it_vanishes() {
    let mut h = Harness::new(&[]);
    std::fs::create_dir(h.p("d")).unwrap();
    h.start().await;
    h.settle().await;
    let status = h.running.as_ref().unwrap().status.clone();
    let ops = {
        let _snapshot = status.snapshot_started();
        for i in 0..20 {
            // Created and gone before the engine looks: the index never has them.
            std::fs::write(h.p(&format!("t{i}")), b"x").unwrap();
            std::fs::write(h.p(&format!("d/u{i}")), b"y").unwrap();
            std::fs::remove_file(h.p(&format!("t{i}"))).unwrap();
            std::fs::remove_file(h.p(&format!("d/u{i}"))).unwrap();
        }
        // One quiet spell of `settle` can end before a loaded machine has delivered every
        // event: keep collecting until all the removals are in, or 20 s have passed.
        let want: Vec<RelPath> = (0..20).flat_map(|i| [rp(&format!("t{i}")), rp(&format!("d/u{i}"))]).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut ops = h.settle().await;
        while Instant::now() < deadline
            && !want.iter().all(|p| ops.iter().any(|op| matches!(op, FsOp::Remove { path } if path == p)))
        {
            ops.extend(h.settle().await);
        }
        ops
    };
    h.stop().await;
    for i in 0..20 {
        for p in [format!("t{i}"), format!("d/u{i}")] {
            assert!(
                ops.iter().any(|op| matches!(op, FsOp::Remove { path } if *path == rp(&p))),
                "no removal of {p}: {ops:#?}"
            );
        }
    }
}

/// An agent stopped while building its first index may already have seeded receivers from a
/// snapshot; the changes its watcher saw since are lost with it. The next run must have every
/// receiver seeded again: the resync floor rises past the journal, with a record above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_index_cut_short_has_receivers_seeded_again() {
    let mut h = Harness::new(&[]);
    std::fs::write(h.p("a"), b"a").unwrap();
    let index = super::index::Index::open(&h.db, "www").unwrap();
    index.set_baseline_started(&h.db).unwrap();
    drop(index);
    let floor = crate::source::ResyncFloor::new(h.store.clone());
    assert_eq!(floor.get("www"), Seq::ZERO);
    h.start().await;
    let ops = h.settle().await;
    h.stop().await;
    assert!(floor.get("www") > Seq::ZERO, "the floor did not rise");
    assert!(h.store.last_seq() >= floor.get("www"), "no record at or above the floor");
    assert_eq!(ops, vec![FsOp::Remove { path: rp(".lockstep-reseed") }]);

    // A first run that finishes its index asks for nothing of the kind.
    let mut h = Harness::new(&[]);
    std::fs::write(h.p("a"), b"a").unwrap();
    h.start().await;
    h.settle().await;
    h.stop().await;
    assert_eq!(crate::source::ResyncFloor::new(h.store.clone()).get("www"), Seq::ZERO);
}
