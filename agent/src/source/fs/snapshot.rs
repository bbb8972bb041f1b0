//! The fs snapshotter: the whole current tree as `Change::Fs` ops — `Mkdir` for each directory
//! before anything inside it, `Symlink` for symlinks, full-content `FileWrite`s for files (a
//! second name of a file already sent as a `Link` to it), `Special` for FIFOs and device
//! nodes, each with its owner and extended attributes — for seeding a receiver. Independent of the index; runs on a blocking thread beside the source.
//!
//! It is the initial-sync path, so it reads each file once with `CHUNK_BYTES` buffers that are
//! handed to their events without copying, and hashes only the whole content (no block hashes).

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use lockstep_common::event::{Change, FsOp, Meta, SpecialKind};
use lockstep_common::relpath::RelPath;
use tokio::sync::mpsc;

use super::content::{self, Plan};
use super::meta::{self, Names};
use super::walk::{list_dir, Filter};
use crate::source::{Snapshotter, SourceError};

pub(crate) struct FsSnapshotter {
    pub(crate) name: Arc<str>,
    pub(crate) root: PathBuf,
    pub(crate) filter: Arc<Filter>,
    /// True once the source watches the tree (see `FsSource::ready`).
    pub(crate) ready: tokio::sync::watch::Receiver<bool>,
}

/// The receiving side hung up: stop quietly.
struct Closed;

impl Snapshotter for FsSnapshotter {
    fn snapshot(&self, tx: mpsc::Sender<Change>) -> BoxFuture<'static, Result<(), SourceError>> {
        let name = self.name.clone();
        let root = self.root.clone();
        let filter = self.filter.clone();
        let mut ready = self.ready.clone();
        Box::pin(async move {
            // A snapshot read before the watcher runs could hold a path whose later deletion
            // the source never sees.
            if ready.wait_for(|r| *r).await.is_err() {
                return Err(SourceError::Other { source_name: name.to_string(), problem: "source stopped".into() });
            }
            let span = tracing::info_span!("snapshot", source = %name);
            let n = name.clone();
            tokio::task::spawn_blocking(move || {
                let _g = span.enter();
                match walk(&root, &filter, &tx) {
                    Ok(Ok(files)) => {
                        tracing::info!(files, "snapshot sent");
                        Ok(())
                    }
                    Ok(Err(Closed)) => {
                        tracing::debug!("snapshot receiver closed");
                        Ok(())
                    }
                    Err(error) => Err(SourceError::Io {
                        source_name: n.to_string(),
                        context: "walk tree for snapshot".into(),
                        error,
                    }),
                }
            })
            .await
            .map_err(|e| SourceError::Other { source_name: name.to_string(), problem: format!("snapshot task: {e}") })?
        })
    }
}

fn send(tx: &mpsc::Sender<Change>, op: FsOp) -> Result<(), Closed> {
    tx.blocking_send(Change::Fs(op)).map_err(|_| Closed)
}

/// One entry of the walk, ready to send. Files are opened (and their first bytes requested
/// from the disk) when they enter the look-ahead queue.
enum Item {
    Dir { rel: RelPath, mode: u32, meta: Meta },
    Symlink { rel: RelPath, target: Vec<u8>, meta: Meta },
    File { rel: RelPath, file: std::fs::File, md: std::fs::Metadata, meta: Meta },
    Special { rel: RelPath, kind: SpecialKind, mode: u32, rdev: u64, meta: Meta },
}

/// Most bytes of upcoming files requested from the disk ahead of the one being read.
const LOOKAHEAD_BYTES: u64 = 24 << 20;
/// Most entries queued ahead (bounds open file descriptors).
const LOOKAHEAD_ITEMS: usize = 256;

/// Depth-first walk in name order, producing [`Item`]s.
struct Walker<'a> {
    root: &'a std::path::Path,
    filter: &'a Filter,
    names: Names,
    stack: Vec<Option<RelPath>>,
    children: std::vec::IntoIter<super::walk::Child>,
    subdirs: Vec<Option<RelPath>>,
    first: bool,
}

impl Walker<'_> {
    /// The next item, `Ok(None)` at the end. Errors only for the root itself; entries that
    /// vanish or cannot be read during the walk are skipped (the journal and repairs mend them).
    fn next(&mut self) -> std::io::Result<Option<Item>> {
        loop {
            let Some(c) = self.children.next() else {
                // Reverse so the stack pops directories in name order.
                self.stack.extend(self.subdirs.drain(..).rev());
                let Some(dir) = self.stack.pop() else { return Ok(None) };
                let abs = match &dir {
                    Some(d) => d.under(self.root),
                    None => self.root.to_path_buf(),
                };
                match list_dir(&abs, dir.as_ref(), self.filter) {
                    Ok(c) => self.children = c.into_iter(),
                    Err(e) if self.first => return Err(e),
                    Err(e) => tracing::debug!(dir = %abs.display(), error = %e, "list directory for snapshot"),
                }
                self.first = false;
                continue;
            };
            let path = c.rel.under(self.root);
            if c.file_type.is_dir() {
                let md = match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => m,
                    _ => continue,
                };
                if !self.filter.prunes(&c.rel) {
                    self.subdirs.push(Some(c.rel.clone()));
                }
                let meta = self.names.meta_of(&path, &md);
                return Ok(Some(Item::Dir { rel: c.rel, mode: content::mode_of(&md), meta }));
            } else if c.file_type.is_symlink() {
                match (std::fs::read_link(&path), std::fs::symlink_metadata(&path)) {
                    (Ok(t), Ok(md)) if md.file_type().is_symlink() => {
                        let target = std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str()).to_vec();
                        let meta = self.names.meta_of(&path, &md);
                        return Ok(Some(Item::Symlink { rel: c.rel, target, meta }));
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::debug!(path = %c.rel, error = %e, "read symlink for snapshot")
                    }
                    _ => {}
                }
            } else if c.file_type.is_file() {
                match content::open_nofollow(&path) {
                    Ok((file, md)) if md.is_file() => {
                        content::prefetch(&file, 0, md.len().min(content::READ_AHEAD));
                        let meta = self.names.meta_of(&path, &md);
                        return Ok(Some(Item::File { rel: c.rel, file, md, meta }));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(path = %c.rel, error = %e, "open file for snapshot"),
                }
            } else if let Ok(md) = std::fs::symlink_metadata(&path) {
                // Sockets are left out (the engine counts them).
                if let Some(kind) = meta::special_kind(&md) {
                    let meta = self.names.meta_of(&path, &md);
                    let (mode, rdev) = (content::mode_of(&md), md.rdev());
                    return Ok(Some(Item::Special { rel: c.rel, kind, mode, rdev, meta }));
                }
            }
        }
    }
}

/// Walks the tree and sends it. The outer error is an I/O error on the root (fatal). Upcoming
/// files are opened and requested from the disk while earlier ones are read and sent, so the
/// disk always has several reads in flight.
fn walk(root: &std::path::Path, filter: &Filter, tx: &mpsc::Sender<Change>) -> std::io::Result<Result<u64, Closed>> {
    let mut walker = Walker {
        root,
        filter,
        names: Names::default(),
        stack: vec![None],
        children: Vec::new().into_iter(),
        subdirs: Vec::new(),
        first: true,
    };
    // Files with several names: the first name sent, by (device, inode); the others go out as
    // links to it.
    let mut first_names: HashMap<(u64, u64), RelPath> = HashMap::new();
    let mut files = 0u64;
    let mut ahead: VecDeque<Item> = VecDeque::new();
    let mut ahead_bytes = 0u64;
    let mut done = false;
    loop {
        while !done && ahead_bytes < LOOKAHEAD_BYTES && ahead.len() < LOOKAHEAD_ITEMS {
            match walker.next()? {
                Some(item) => {
                    if let Item::File { md, .. } = &item {
                        ahead_bytes += md.len().min(content::READ_AHEAD);
                    }
                    ahead.push_back(item);
                }
                None => done = true,
            }
        }
        let Some(item) = ahead.pop_front() else { break };
        let sent = match item {
            Item::Dir { rel, mode, meta } => send(tx, FsOp::Mkdir { path: rel, mode, meta: Some(meta) }),
            Item::Symlink { rel, target, meta } => send(tx, FsOp::Symlink { path: rel, target, meta: Some(meta) }),
            Item::Special { rel, kind, mode, rdev, meta } => {
                send(tx, FsOp::Special { path: rel, kind, mode, rdev, meta: Some(meta) })
            }
            Item::File { rel, mut file, md, meta } => {
                ahead_bytes -= md.len().min(content::READ_AHEAD);
                files += 1;
                let first = (md.nlink() > 1).then(|| first_names.get(&(md.dev(), md.ino()))).flatten();
                match first {
                    Some(target) => send(tx, FsOp::Link { path: rel, target: target.clone() }),
                    None => {
                        if md.nlink() > 1 {
                            first_names.insert((md.dev(), md.ino()), rel.clone());
                        }
                        content::read_file(&rel, &mut file, &md, Plan::Full, false, Some(meta), &mut |w| {
                            send(tx, FsOp::Write(w))
                        })
                        .map(|_| ())
                    }
                }
            }
        };
        if sent.is_err() {
            return Ok(Err(Closed));
        }
    }
    Ok(Ok(files))
}
