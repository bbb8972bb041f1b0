//! The fs snapshotter: the whole current tree as `Change::Fs` ops — `Mkdir` for each directory
//! before anything inside it, `Symlink` for symlinks, full-content `FileWrite`s for files — for
//! seeding a receiver. Independent of the index; runs on a blocking thread beside the source.
//!
//! It is the initial-sync path, so it reads each file once with `CHUNK_BYTES` buffers that are
//! handed to their events without copying, and hashes only the whole content (no block hashes).

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use lockstep_common::event::{Change, FsOp};
use lockstep_common::relpath::RelPath;
use tokio::sync::mpsc;

use super::content::{self, Plan};
use super::walk::{list_dir, Filter};
use crate::source::{Snapshotter, SourceError};

pub(crate) struct FsSnapshotter {
    pub(crate) name: Arc<str>,
    pub(crate) root: PathBuf,
    pub(crate) filter: Arc<Filter>,
}

/// The receiving side hung up: stop quietly.
struct Closed;

impl Snapshotter for FsSnapshotter {
    fn snapshot(&self, tx: mpsc::Sender<Change>) -> BoxFuture<'static, Result<(), SourceError>> {
        let name = self.name.clone();
        let root = self.root.clone();
        let filter = self.filter.clone();
        Box::pin(async move {
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

/// Walks the tree depth-first. The outer error is an I/O error on the root (fatal); entries
/// that vanish or cannot be read during the walk are skipped (the journal and repairs mend
/// them).
fn walk(root: &std::path::Path, filter: &Filter, tx: &mpsc::Sender<Change>) -> std::io::Result<Result<u64, Closed>> {
    let mut files = 0u64;
    let mut stack: Vec<Option<RelPath>> = vec![None];
    let mut first = true;
    while let Some(dir) = stack.pop() {
        let abs = match &dir {
            Some(d) => d.under(root),
            None => root.to_path_buf(),
        };
        let children = match list_dir(&abs, dir.as_ref(), filter) {
            Ok(c) => c,
            Err(e) if first => return Err(e),
            Err(e) => {
                tracing::debug!(dir = %abs.display(), error = %e, "list directory for snapshot");
                continue;
            }
        };
        first = false;
        let mut subdirs = Vec::new();
        for c in children {
            let path = c.rel.under(root);
            if c.file_type.is_dir() {
                let mode = match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => content::mode_of(&m),
                    _ => continue,
                };
                if send(tx, FsOp::Mkdir { path: c.rel.clone(), mode }).is_err() {
                    return Ok(Err(Closed));
                }
                if !filter.prunes(&c.rel) {
                    subdirs.push(Some(c.rel));
                }
            } else if c.file_type.is_symlink() {
                match std::fs::read_link(&path) {
                    Ok(t) => {
                        let target = std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str()).to_vec();
                        if send(tx, FsOp::Symlink { path: c.rel, target }).is_err() {
                            return Ok(Err(Closed));
                        }
                    }
                    Err(e) => tracing::debug!(path = %c.rel, error = %e, "read symlink for snapshot"),
                }
            } else if c.file_type.is_file() {
                let (mut file, meta) = match content::open_nofollow(&path) {
                    Ok((f, m)) if m.is_file() => (f, m),
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!(path = %c.rel, error = %e, "open file for snapshot");
                        continue;
                    }
                };
                let r =
                    content::read_file(&c.rel, &mut file, &meta, Plan::Full, false, &mut |w| send(tx, FsOp::Write(w)));
                if r.is_err() {
                    return Ok(Err(Closed));
                }
                files += 1;
            }
        }
        // Reverse so the stack pops directories in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(Ok(files))
}
