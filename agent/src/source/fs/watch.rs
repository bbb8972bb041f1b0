//! The notify (inotify) watcher and how its events become work: the callback only forwards
//! each event into a channel (it must never block), and the engine gathers what arrives within
//! a few milliseconds into a [`Batch`] — renames in order, other paths deduplicated as hints to
//! re-compare against the index — so bursts cost one pass while latency stays tiny.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};

use crate::source::RepairRequest;

/// What reaches the engine thread.
pub(crate) enum Msg {
    Fs(notify::Result<Event>),
    Repair(RepairRequest),
    Stop,
}

/// Starts a recursive watcher on `root` whose events go to `tx`.
pub(crate) fn start(root: &Path, tx: Sender<Msg>) -> notify::Result<notify::RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |res: notify::Result<Event>| {
        // Our own reads produce open/close-nowrite events; dropping them here keeps the channel
        // quiet and avoids a feedback loop.
        if let Ok(ev) = &res {
            if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
                return;
            }
        }
        #[cfg(feature = "failpoints")]
        let renamed = res
            .as_ref()
            .ok()
            .filter(|ev| matches!(ev.kind, EventKind::Modify(ModifyKind::Name(RenameMode::Both))))
            .and_then(|ev| ev.paths.first().cloned());
        #[cfg(feature = "failpoints")]
        let created_dir = res
            .as_ref()
            .ok()
            .filter(|ev| matches!(ev.kind, EventKind::Create(CreateKind::Folder)))
            .and_then(|ev| ev.paths.first().cloned());
        let _ = tx.send(Msg::Fs(res));
        #[cfg(feature = "failpoints")]
        if let Some(from) = renamed {
            stall_after_rename(&from);
        }
        #[cfg(feature = "failpoints")]
        if let Some(dir) = created_dir {
            stall_after_mkdir(&dir);
        }
    })?;
    w.watch(root, RecursiveMode::Recursive)?;
    Ok(w)
}

/// Test hook (builds with the `failpoints` feature only): with the failpoint
/// `fs::watch::stall_after_rename` set to `return(DIR)`, notify's thread stops right after
/// handing on a rename of a path under DIR, until the failpoint `fs::watch::stalled` (set to
/// `pause`) is turned off — as a busy machine may hold it there, before notify has updated its
/// watches for the move, so that it still reports changes inside the moved directory under
/// the old path, or not at all.
#[cfg(feature = "failpoints")]
fn stall_after_rename(from: &Path) {
    fail::fail_point!("fs::watch::stall_after_rename", |dir: Option<String>| {
        if dir.is_some_and(|d| from.starts_with(d)) {
            fail::fail_point!("fs::watch::stalled");
        }
    });
}

/// Test hook (builds with the `failpoints` feature only): with the failpoint
/// `fs::watch::stall_after_mkdir` set to `return(DIR)`, notify's thread stops right after
/// handing on the creation of directory DIR, until the failpoint `fs::watch::stalled` (set to
/// `pause`) is turned off — before it has read (and added watches for) what happens next.
#[cfg(feature = "failpoints")]
fn stall_after_mkdir(created: &Path) {
    fail::fail_point!("fs::watch::stall_after_mkdir", |dir: Option<String>| {
        if dir.is_some_and(|d| created == Path::new(&d)) {
            fail::fail_point!("fs::watch::stalled");
        }
    });
}

/// Whether a watcher error means the inotify watch limit was hit.
pub(crate) fn is_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => io.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

/// What to re-check about one path.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Hint {
    /// Content may have changed even if size and mtime did not (a write was seen): read it.
    pub content: bool,
    /// If it is a directory, reconcile everything below it too (it was moved in, or just
    /// created).
    pub subtree: bool,
}

/// Watcher events gathered over one coalescing window.
#[derive(Default)]
pub(crate) struct Batch {
    pub renames: Vec<(PathBuf, PathBuf)>,
    pub hints: HashMap<PathBuf, Hint>,
    /// The kernel queue overflowed (or the watcher failed): only a full scan is trustworthy.
    pub rescan: bool,
    /// The kernel's inotify queue overflowed (events were lost).
    pub overflow: bool,
    /// The inotify watch limit was hit.
    pub watch_limit: bool,
    pub repairs: Vec<RepairRequest>,
    /// Something was moved to a path in the tree (a rename or a move in), or a directory was
    /// created: see `Engine::catch_up_with_watcher`.
    pub watches_changing: bool,
    pub stop: bool,
    pub events: usize,
}

impl Batch {
    fn hint(&mut self, p: &Path, h: Hint) {
        let e = self.hints.entry(p.to_path_buf()).or_default();
        e.content |= h.content;
        e.subtree |= h.subtree;
    }

    pub(crate) fn add(&mut self, msg: Msg) {
        let ev = match msg {
            Msg::Stop => {
                self.stop = true;
                return;
            }
            Msg::Repair(r) => {
                self.repairs.push(r);
                return;
            }
            Msg::Fs(Err(e)) => {
                if is_watch_limit(&e) {
                    self.watch_limit = true;
                } else {
                    tracing::warn!(error = %e, "file watcher error; running a full reconciliation scan");
                    self.rescan = true;
                }
                return;
            }
            Msg::Fs(Ok(ev)) => ev,
        };
        self.events += 1;
        if ev.need_rescan() {
            self.rescan = true;
            self.overflow = true;
            return;
        }
        let content = Hint { content: true, subtree: false };
        match ev.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) if ev.paths.len() == 2 => {
                self.renames.push((ev.paths[0].clone(), ev.paths[1].clone()));
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                self.watches_changing = true;
                for p in &ev.paths {
                    self.hint(p, Hint { content: true, subtree: true });
                }
            }
            EventKind::Modify(ModifyKind::Metadata(_)) => {
                for p in &ev.paths {
                    self.hint(p, Hint::default());
                }
            }
            // notify watches a new directory only after handing on its creation, so what is
            // created in it before then reports nothing: the engine walks it once the watcher
            // has caught up (`watches_changing`), even if it recorded it already through its parent.
            EventKind::Create(CreateKind::Folder) => {
                self.watches_changing = true;
                for p in &ev.paths {
                    self.hint(p, Hint { content: true, subtree: true });
                }
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Access(_)
            | EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(_)
            | EventKind::Any
            | EventKind::Other => {
                for p in &ev.paths {
                    self.hint(p, content);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, Flag};

    #[test]
    fn batch_dedupes_and_flags_overflow() {
        let mut b = Batch::default();
        let p = PathBuf::from("/r/a");
        b.add(Msg::Fs(Ok(
            Event::new(EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any))).add_path(p.clone())
        )));
        b.add(Msg::Fs(Ok(Event::new(EventKind::Create(CreateKind::File)).add_path(p.clone()))));
        b.add(Msg::Fs(Ok(Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(p.clone())
            .add_path(PathBuf::from("/r/b")))));
        assert_eq!(b.hints.len(), 1);
        assert!(b.hints[&p].content && !b.hints[&p].subtree);
        assert_eq!(b.renames.len(), 1);
        assert!(!b.rescan);
        b.add(Msg::Fs(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan))));
        assert!(b.rescan && b.overflow);
        let mut b = Batch::default();
        b.add(Msg::Fs(Err(notify::Error::new(notify::ErrorKind::MaxFilesWatch))));
        assert!(b.watch_limit);
    }
}
