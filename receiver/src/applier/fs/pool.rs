//! Parallel application of file writes during a resync.
//!
//! A snapshot is mostly full-content writes of distinct files; applied one at a time, the
//! receiver spends most of its time in the kernel (inode allocation, page-cache copies) on a
//! single core. During a resync the applier therefore hands file writes to a few worker
//! threads. Everything else (mkdir, symlink, remove, rename, chmod, hard links, special files,
//! the end of the resync, a commit) first waits for the workers to finish what they were given (a barrier) and then runs
//! on the applier's thread as before.
//!
//! Why this gives the same result as applying in order:
//! - all chunks of one path go to the same worker (chosen by hashing the path), in order, so a
//!   file's writes stay ordered, and its staging state lives with that worker;
//! - between two barriers, writes run concurrently only when no written path is an ancestor of
//!   another written path (otherwise a barrier is placed before the later one), so concurrent
//!   writes touch disjoint staging files and targets; the only shared thing they may touch is a
//!   common ancestor directory, which all of them need as a directory (`ensure_parents` copes
//!   with two of them creating or replacing it at once);
//! - the workers only ever create directories and regular files, never symlinks, so the
//!   "every ancestor is a real directory" checks in [`super::tree`] cannot be invalidated by a
//!   concurrent worker: symlinks are only made by barrier operations;
//! - a hard link needs its target's content in place: it is a barrier, so every write queued
//!   before it (the target's included) has been installed when it is applied.
//!
//! Errors and repair requests found by workers are reported at the next `apply` or barrier.
//! Nothing is lost by reporting them late: a target is never committed while it is resyncing,
//! and the end of the resync (a barrier) comes before its commit.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use lockstep_common::event::FileWrite;
use lockstep_common::relpath::RelPath;

use super::meta::Ctx;
use super::write::{Staging, Writer};
use crate::applier::{ApplyError, ApplyOutcome};

/// Chunks (each up to 1 MiB) queued per worker before the applier's thread waits.
const QUEUE: usize = 8;

enum Job {
    Write {
        // Boxed: a write is far larger than a drain request, and jobs sit in bounded queues.
        w: Box<FileWrite>,
        staging: Option<Box<Staging>>,
        abandoned: bool,
    },
    /// Reply with the staging state of writes in progress once everything before is done.
    Drain(mpsc::Sender<(HashMap<RelPath, Staging>, HashSet<RelPath>)>),
}

#[derive(Default)]
struct Results {
    outcome: ApplyOutcome,
    error: Option<ApplyError>,
}

pub(super) struct Pool {
    workers: Vec<(SyncSender<Job>, JoinHandle<()>)>,
    results: Arc<Mutex<Results>>,
    /// Paths written since the last barrier, and their ancestors.
    files: HashSet<RelPath>,
    dirs: HashSet<RelPath>,
}

impl Pool {
    pub(super) fn new(root: PathBuf, threads: usize, ctx: Arc<Ctx>) -> Pool {
        let results = Arc::new(Mutex::new(Results::default()));
        let workers = (0..threads.max(1))
            .map(|i| {
                let (tx, rx) = mpsc::sync_channel(QUEUE);
                let writer = Writer::new(root.clone(), ctx.clone());
                let res = results.clone();
                let h = std::thread::Builder::new()
                    .name(format!("apply-{i}"))
                    .spawn(move || work(writer, rx, res))
                    .expect("spawn apply worker");
                (tx, h)
            })
            .collect();
        Pool { workers, results, files: HashSet::new(), dirs: HashSet::new() }
    }

    /// Queues a write, placing a barrier first if it conflicts with a write since the last one.
    pub(super) fn dispatch(&mut self, w: FileWrite, writer: &mut Writer) {
        let conflict = self.dirs.contains(&w.path) || ancestors(&w.path).any(|a| self.files.contains(&a));
        if conflict {
            self.drain(writer);
        }
        if self.files.insert(w.path.clone()) {
            for a in ancestors(&w.path) {
                if !self.dirs.insert(a) {
                    break;
                }
            }
        }
        let staging = writer.staging.remove(&w.path);
        let abandoned = writer.abandoned.remove(&w.path);
        let mut h = DefaultHasher::new();
        w.path.hash(&mut h);
        let i = (h.finish() % self.workers.len() as u64) as usize;
        // A worker only stops when the pool is dropped.
        let _ = self.workers[i].0.send(Job::Write { w: Box::new(w), staging: staging.map(Box::new), abandoned });
    }

    /// Waits until the workers have applied everything queued, and takes back the staging
    /// state of writes still in progress.
    pub(super) fn drain(&mut self, writer: &mut Writer) {
        let replies: Vec<_> = self
            .workers
            .iter()
            .filter_map(|(tx, _)| {
                let (rtx, rrx) = mpsc::channel();
                tx.send(Job::Drain(rtx)).ok().map(|_| rrx)
            })
            .collect();
        for r in replies {
            if let Ok((staging, abandoned)) = r.recv() {
                writer.staging.extend(staging);
                writer.abandoned.extend(abandoned);
            }
        }
        self.files.clear();
        self.dirs.clear();
    }

    /// Repairs and the first error found by the workers so far.
    pub(super) fn take_results(&self) -> (ApplyOutcome, Option<ApplyError>) {
        let mut r = self.results.lock().expect("apply worker panicked");
        (std::mem::take(&mut r.outcome), r.error.take())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (tx, h) in self.workers.drain(..) {
            drop(tx);
            let _ = h.join();
        }
    }
}

/// Proper ancestors of `p`, nearest first.
fn ancestors(p: &RelPath) -> impl Iterator<Item = RelPath> {
    std::iter::successors(p.parent(), |a| a.parent())
}

fn work(mut writer: Writer, rx: Receiver<Job>, results: Arc<Mutex<Results>>) {
    while let Ok(job) = rx.recv() {
        match job {
            Job::Write { w, staging, abandoned } => {
                let path = w.path.clone();
                if let Some(st) = staging {
                    writer.staging.insert(path.clone(), *st);
                }
                if abandoned {
                    writer.abandoned.insert(path);
                }
                let res = writer.apply_write(*w);
                let mut r = results.lock().expect("results lock");
                match res {
                    Ok(o) => {
                        r.outcome.repairs.extend(o.repairs);
                        if o.skipped.is_some() {
                            r.outcome.skipped = o.skipped;
                        }
                    }
                    Err(e) => {
                        if r.error.is_none() {
                            r.error = Some(e);
                        }
                    }
                }
            }
            Job::Drain(reply) => {
                let _ = reply.send((std::mem::take(&mut writer.staging), std::mem::take(&mut writer.abandoned)));
            }
        }
    }
}
