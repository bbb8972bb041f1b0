//! Relative paths inside a replicated tree, validated once at the boundary.
//!
//! A `RelPath` is raw bytes (Linux names need not be UTF-8), '/'-separated, never absolute,
//! never empty, with no '.', '..' or empty components and no NUL. Whatever a peer sends, a
//! `RelPath` joined to a target root stays lexically inside that root; the applier separately
//! refuses to traverse symlinks.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Longest path accepted (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// Suffix of the receiver's staging files; paths ending in it are refused so a peer can never
/// address (or collide with) them.
pub const STAGING_SUFFIX: &str = ".lockstep-tmp";

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path is {0} bytes, longer than {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("absolute path {0:?} refused")]
    Absolute(String),
    #[error("path {0:?} contains NUL")]
    Nul(String),
    #[error("path {0:?} has a '.', '..' or empty component")]
    BadComponent(String),
    #[error("path {0:?} names a lockstep staging file")]
    Reserved(String),
}

/// A validated relative path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// Validates raw bytes from the wire or from a directory walk.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        let show = || String::from_utf8_lossy(&bytes).into_owned();
        if bytes.is_empty() {
            return Err(PathError::Empty);
        }
        if bytes.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(bytes.len()));
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute(show()));
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul(show()));
        }
        for comp in bytes.split(|b| *b == b'/') {
            if comp.is_empty() || comp == b"." || comp == b".." {
                return Err(PathError::BadComponent(show()));
            }
            if comp.ends_with(STAGING_SUFFIX.as_bytes()) {
                return Err(PathError::Reserved(show()));
            }
        }
        Ok(RelPath(bytes))
    }

    /// The path of `full` relative to `root`, if `full` lies under it.
    pub fn from_under(root: &Path, full: &Path) -> Option<Result<Self, PathError>> {
        let rel = full.strip_prefix(root).ok()?;
        if rel.as_os_str().is_empty() {
            return None;
        }
        Some(RelPath::new(rel.as_os_str().as_bytes().to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// `root` joined with this path (stays inside `root` lexically).
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(self.as_path())
    }

    /// The parent directory, or `None` at the top level.
    pub fn parent(&self) -> Option<RelPath> {
        let i = self.0.iter().rposition(|b| *b == b'/')?;
        Some(RelPath(self.0[..i].to_vec()))
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0 || (self.0.starts_with(&other.0) && self.0.get(other.0.len()) == Some(&b'/'))
    }

    /// Replaces the prefix `from` (which `self` starts with) by `to`.
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> RelPath {
        let mut out = to.0.clone();
        out.extend_from_slice(&self.0[from.0.len()..]);
        RelPath(out)
    }

    /// Number of components (depth 1 = top level).
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|b| **b == b'/').count() + 1
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        for bad in
            [&b""[..], b"/etc/passwd", b"..", b"a/../../b", b"a//b", b"./a", b"a/.", b"a\0b", b"a/", b"x.lockstep-tmp"]
        {
            assert!(RelPath::new(bad.to_vec()).is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
        assert!(RelPath::new(vec![b'a'; MAX_PATH_BYTES + 1]).is_err());
    }

    #[test]
    fn accepts_ordinary_and_non_utf8() {
        for ok in [&b"a"[..], b"a/b/c.txt", b"..a", b"a..", b".hidden", b"\xff\xfe"] {
            assert!(RelPath::new(ok.to_vec()).is_ok());
        }
        let p = RelPath::new(b"a/b/c".to_vec()).unwrap();
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert_eq!(p.file_name(), b"c");
        assert!(p.starts_with(&RelPath::new(b"a/b".to_vec()).unwrap()));
        assert!(!p.starts_with(&RelPath::new(b"a/b/cc".to_vec()).unwrap()));
        assert!(!RelPath::new(b"a/bc".to_vec()).unwrap().starts_with(&RelPath::new(b"a/b".to_vec()).unwrap()));
        let moved = p.rebase(&RelPath::new(b"a".to_vec()).unwrap(), &RelPath::new(b"z/y".to_vec()).unwrap());
        assert_eq!(moved.as_bytes(), b"z/y/b/c");
    }
}
