//! Path handling inside a target root that never leaves it: every ancestor of a path is checked
//! with `lstat` to be a real directory (never a symlink) before anything below it is touched,
//! and final components are always handled with calls that do not follow symlinks (`lstat`,
//! `unlink`, `rename`, `O_NOFOLLOW`).
//!
//! Only the applier writes inside a target, and it applies one change at a time, so a check
//! followed by the operation is not raced by the agent: the agent can only influence the tree
//! through changes, which are applied after the check of the previous one has finished. (During
//! a resync, file writes run on several threads; they never create symlinks, so they cannot
//! invalidate each other's checks either — see `pool`.)

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lockstep_common::relpath::{RelPath, STAGING_SUFFIX};

use crate::applier::ApplyError;

/// Wraps an I/O error with a verb-phrase context naming the path.
pub(super) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let context = context.into();
    move |error| ApplyError::Io { context, error }
}

/// `lstat`, with "missing" as `None`.
pub(super) fn lstat(path: &Path) -> io::Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the ancestors of `rel` are all real directories below `root`.
///
/// With `create`, missing ancestors are created and anything else in the way (a regular file,
/// a symlink, a fifo...) is removed first and replaced by a directory — the symlink itself is
/// unlinked, never followed. Without `create`, `false` means the path cannot exist inside the
/// target (an ancestor is missing or not a directory), which callers treat as "missing".
pub(super) fn ensure_parents(root: &Path, rel: &RelPath, create: bool) -> Result<bool, ApplyError> {
    let comps: Vec<&[u8]> = rel.as_bytes().split(|b| *b == b'/').collect();
    let mut cur = root.to_path_buf();
    for comp in &comps[..comps.len() - 1] {
        cur.push(OsStr::from_bytes(comp));
        let meta = lstat(&cur).map_err(io_err(format!("inspect {}", cur.display())))?;
        match meta {
            Some(m) if m.is_dir() => continue,
            _ if !create => return Ok(false),
            Some(_) => {
                if let Err(e) = fs::remove_file(&cur) {
                    // During a resync another worker may have replaced it at the same moment
                    // (see `pool`): fine if a directory is there now.
                    match lstat(&cur) {
                        Ok(Some(m)) if m.is_dir() => continue,
                        Ok(None) => {}
                        _ => return Err(io_err(format!("remove non-directory {}", cur.display()))(e)),
                    }
                }
                make_dir(&cur)?;
            }
            None => make_dir(&cur)?,
        }
    }
    Ok(true)
}

/// Creates one directory level for an ancestor. Its real mode arrives with its own `Mkdir`.
fn make_dir(path: &Path) -> Result<(), ApplyError> {
    match fs::DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(format!("create directory {}", path.display()))(e)),
    }
}

/// Removes whatever is at `path` (file, symlink, or whole directory tree) without following a
/// symlink. Missing is fine. `std::fs::remove_dir_all` does not follow symlinks inside the tree.
pub(super) fn remove_any(path: &Path) -> Result<(), ApplyError> {
    let meta = lstat(path).map_err(io_err(format!("inspect {}", path.display())))?;
    let res = match meta {
        None => return Ok(()),
        Some(m) if m.is_dir() => fs::remove_dir_all(path),
        Some(_) => fs::remove_file(path),
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", path.display()))(e)),
    }
}

/// Sets permission bits on `path` unless it is a symlink (chmod would follow it).
pub(super) fn chmod_nofollow(path: &Path, mode: u32) -> Result<bool, ApplyError> {
    match lstat(path).map_err(io_err(format!("inspect {}", path.display())))? {
        None => Ok(false),
        Some(m) if m.file_type().is_symlink() => Ok(true),
        Some(_) => {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("chmod {}", path.display())))?;
            Ok(true)
        }
    }
}

/// Linux NAME_MAX: the longest single file name.
const NAME_MAX: usize = 255;

/// The sibling staging path for `rel`: `.<name>.<8 hex>.lockstep-tmp` in the same directory.
///
/// Deterministic, so that after a restart a write that continues mid-file finds the staging
/// file its earlier chunks went to. The hex tag hashes the whole relative path and `kind`, so
/// two purposes (file content, symlink, rename shuffle) never share a staging file, and a name
/// truncated to fit NAME_MAX stays distinct. No `RelPath` component can end in the suffix, so a
/// staging file never collides with a replicated file.
pub(super) fn staging_path(root: &Path, rel: &RelPath, kind: &str) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(kind.as_bytes());
    h.update(&[0]);
    h.update(rel.as_bytes());
    let tag = h.finalize();
    let tag = &tag.as_bytes()[..4];
    let name = rel.file_name();
    let overhead = 1 + 1 + 8 + STAGING_SUFFIX.len();
    let name = &name[..name.len().min(NAME_MAX - overhead)];
    let mut out = Vec::with_capacity(name.len() + overhead);
    out.push(b'.');
    out.extend_from_slice(name);
    out.push(b'.');
    for b in tag {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out.extend_from_slice(STAGING_SUFFIX.as_bytes());
    let full = rel.under(root);
    full.parent().unwrap_or(root).join(OsStr::from_bytes(&out))
}

/// Whether a symlink at `link` with `target` would point outside the root, judged lexically
/// from the link's directory: absolute targets, and relative ones whose `..` climb above the
/// root at any point, do.
///
/// This judges one link on its own, as the protocol defines it. It cannot see that the kernel
/// resolves `d/..` through `d` when `d` is itself a symlink (`d -> .` makes `d/../x` leave the
/// root), nor that a later rename of the link's directory to a shallower place changes where
/// `../` leads. The applier itself never follows symlinks, so neither lets it write outside the
/// root; they matter only to programs that later read the standby.
pub(super) fn symlink_escapes(link: &RelPath, target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return true;
    }
    // Depth of the link's directory below the root.
    let mut depth = link.depth() - 1;
    for comp in target.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn symlink_escape_rules() {
        assert!(symlink_escapes(&rp("l"), b"/etc/passwd"));
        assert!(symlink_escapes(&rp("l"), b".."));
        assert!(symlink_escapes(&rp("a/l"), b"../../x"));
        assert!(symlink_escapes(&rp("a/l"), b"b/../../../x"));
        assert!(!symlink_escapes(&rp("a/l"), b"../x"));
        assert!(!symlink_escapes(&rp("a/l"), b"./b/../c"));
        assert!(!symlink_escapes(&rp("l"), b"x/y"));
    }

    #[test]
    fn staging_names_fit_and_differ() {
        let root = Path::new("/r");
        let p = staging_path(root, &rp("a/b.txt"), "w");
        let name = p.file_name().unwrap().as_bytes();
        assert!(name.starts_with(b".b.txt."));
        assert!(name.ends_with(STAGING_SUFFIX.as_bytes()));
        assert_eq!(p.parent().unwrap(), Path::new("/r/a"));
        assert_ne!(p, staging_path(root, &rp("a/b.txt"), "s"));
        let long = "x".repeat(255);
        let p = staging_path(root, &rp(&long), "w");
        assert_eq!(p.file_name().unwrap().len(), NAME_MAX);
    }
}
