//! File content: `FileWrite` chunks go to a staging file next to the target; on the last chunk
//! the result is verified against the sender's blake3 and renamed over the target, or discarded
//! with a repair request. The target is therefore either the old or the new complete content.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockstep_common::event::FileWrite;
use lockstep_common::relpath::RelPath;

use super::tree::{ensure_parents, io_err, lstat, remove_any, staging_path};
use crate::applier::{ApplyError, ApplyOutcome};

/// Purpose tag of content staging files (see [`staging_path`]).
const WRITE_KIND: &str = "write";

/// A file being assembled from `FileWrite` chunks.
pub(super) struct Staging {
    /// Open read/write handle on the staging file; chunks are written at their offsets.
    file: File,
    /// Where the staging file lives (a sibling of the target).
    pub(super) tmp: PathBuf,
    /// Running hash of a full write while its blocks arrive contiguously from offset 0; `None`
    /// once they did not (or for deltas and reopened staging files), then the file is re-read.
    hasher: Option<blake3::Hasher>,
    /// How many leading bytes `hasher` has seen.
    hashed: u64,
}

/// Applies `FileWrite`s under `root`: the staging state of writes in progress. The applier owns
/// one, and during a resync each parallel worker owns one (see `pool`).
#[derive(Default)]
pub(super) struct Writer {
    pub(super) root: PathBuf,
    /// Writes in progress (between a `first` and a `last` chunk), by path.
    pub(super) staging: HashMap<RelPath, Staging>,
    /// Writes whose staging was lost (continued after a restart without their first chunk):
    /// their remaining chunks are ignored; a repair was requested.
    pub(super) abandoned: HashSet<RelPath>,
}

impl Writer {
    pub(super) fn apply_write(&mut self, w: FileWrite) -> Result<ApplyOutcome, ApplyError> {
        let mut outcome = ApplyOutcome::default();
        if w.first {
            self.abandoned.remove(&w.path);
            self.staging.remove(&w.path);
            let st = self.start_staging(&w)?;
            self.staging.insert(w.path.clone(), st);
        } else if !self.staging.contains_key(&w.path) {
            if self.abandoned.contains(&w.path) {
                if w.last {
                    self.abandoned.remove(&w.path);
                }
                return Ok(outcome);
            }
            match self.reopen_staging(&w.path)? {
                Some(st) => {
                    self.staging.insert(w.path.clone(), st);
                }
                None => {
                    if !w.last {
                        self.abandoned.insert(w.path.clone());
                    }
                    outcome.repairs.push((w.path, "file write continued without its first chunk".into()));
                    return Ok(outcome);
                }
            }
        }

        let st = self.staging.get_mut(&w.path).expect("staging present");
        for b in &w.blocks {
            st.file
                .write_all_at(&b.data, b.offset)
                .map_err(io_err(format!("write staging file {}", st.tmp.display())))?;
            match &mut st.hasher {
                Some(h) if b.offset == st.hashed => {
                    h.update(&b.data);
                    st.hashed += b.data.len() as u64;
                }
                Some(_) => st.hasher = None,
                None => {}
            }
        }
        if !w.last {
            return Ok(outcome);
        }

        let st = self.staging.remove(&w.path).expect("staging present");
        if let Some(reason) = self.finish(st, &w)? {
            tracing::debug!(path = %w.path, reason, "file write not installed; asking for repair");
            outcome.repairs.push((w.path, reason));
        }
        Ok(outcome)
    }

    /// Creates the staging file for a write's first chunk: a copy of the current target for a
    /// delta (when the target is a regular file), else empty.
    fn start_staging(&self, w: &FileWrite) -> Result<Staging, ApplyError> {
        ensure_parents(&self.root, &w.path, true)?;
        let target = w.path.under(&self.root);
        let tmp = staging_path(&self.root, &w.path, WRITE_KIND);
        // Whatever an earlier attempt left is rebuilt from scratch.
        remove_any(&tmp)?;
        let base_is_file = w.delta
            && lstat(&target)
                .map_err(io_err(format!("inspect {}", target.display())))?
                .is_some_and(|m| m.file_type().is_file());
        if base_is_file {
            // Reflink or copy_file_range where the filesystem supports it. `target` was just
            // seen as a regular file (not a symlink), and `tmp` was just removed.
            fs::copy(&target, &tmp).map_err(io_err(format!("copy {} to staging", target.display())))?;
            // The copy carries the target's mode, which may lack write permission.
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("chmod staging file {}", tmp.display())))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!base_is_file)
            .truncate(!base_is_file)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io_err(format!("create staging file {}", tmp.display())))?;
        let hasher = (!w.delta).then(blake3::Hasher::new);
        Ok(Staging { file, tmp, hasher, hashed: 0 })
    }

    /// After a restart, a write that resumes mid-file continues in the staging file its earlier
    /// (committed, hence synced) chunks went to.
    fn reopen_staging(&self, rel: &RelPath) -> Result<Option<Staging>, ApplyError> {
        if !ensure_parents(&self.root, rel, false)? {
            return Ok(None);
        }
        let tmp = staging_path(&self.root, rel, WRITE_KIND);
        match lstat(&tmp).map_err(io_err(format!("inspect {}", tmp.display())))? {
            Some(m) if m.file_type().is_file() => {}
            _ => return Ok(None),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io_err(format!("reopen staging file {}", tmp.display())))?;
        Ok(Some(Staging { file, tmp, hasher: None, hashed: 0 }))
    }

    /// Completes a staged write. Returns a repair reason when the result was discarded.
    fn finish(&self, st: Staging, w: &FileWrite) -> Result<Option<String>, ApplyError> {
        let ctx = |what: &str| format!("{what} staging file {}", st.tmp.display());
        st.file.set_len(w.size).map_err(io_err(ctx("truncate")))?;
        let hash = match st.hasher {
            Some(h) if st.hashed == w.size => h.finalize(),
            _ => hash_file(&st.file, w.size).map_err(io_err(ctx("read back")))?,
        };
        if Some(*hash.as_bytes()) != w.content_hash {
            drop(st.file);
            remove_any(&st.tmp)?;
            return Ok(Some("content hash mismatch".into()));
        }
        st.file.set_permissions(fs::Permissions::from_mode(w.mode)).map_err(io_err(ctx("chmod")))?;
        st.file.set_modified(mtime(w.mtime_ns)).map_err(io_err(ctx("set mtime of")))?;
        drop(st.file);

        // The parent may have been removed or replaced since the first chunk; then the staging
        // file went with it and the content must be re-sent.
        if !ensure_parents(&self.root, &w.path, false)? || lstat(&st.tmp).ok().flatten().is_none() {
            return Ok(Some("staging file disappeared before the last chunk".into()));
        }
        let target = w.path.under(&self.root);
        if lstat(&target).map_err(io_err(format!("inspect {}", target.display())))?.is_some_and(|m| m.is_dir()) {
            remove_any(&target)?;
        }
        // rename(2) replaces a file or symlink at `target` itself, never what a symlink points to.
        fs::rename(&st.tmp, &target).map_err(io_err(format!("install {}", target.display())))?;
        Ok(None)
    }
}

/// blake3 of the first `size` bytes of `file`.
fn hash_file(file: &File, size: u64) -> io::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let want = buf.len().min((size - off) as usize);
        let n = file.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize())
}

/// Nanoseconds since the epoch (possibly negative) as a `SystemTime`.
fn mtime(ns: i64) -> SystemTime {
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}
