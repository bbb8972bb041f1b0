//! Hard links: the names a file with several links has in the tree, as the engine last saw them,
//! so that a new name of a file already sent goes out as a link (not a second copy) and a
//! content change through one name re-links the others on the receivers (whose copy of the
//! changed name is a new inode). Only files with more than one link are tracked; a name that
//! no longer leads to the same file is forgotten when next looked at.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use lockstep_common::relpath::RelPath;

#[derive(Default)]
pub(crate) struct Links {
    /// (device, inode) → the names seen for it.
    names: HashMap<(u64, u64), Vec<RelPath>>,
}

impl Links {
    /// Records that `rel` is a name of the file `md` describes, when that file has several.
    pub(crate) fn note(&mut self, rel: &RelPath, md: &Metadata) {
        if md.nlink() < 2 {
            return;
        }
        let v = self.names.entry((md.dev(), md.ino())).or_default();
        if !v.contains(rel) {
            v.push(rel.clone());
        }
    }

    /// The other names of `md`'s file that still lead to it on disk now (under `root`).
    pub(crate) fn names(&mut self, rel: &RelPath, md: &Metadata, root: &Path) -> Vec<RelPath> {
        let key = (md.dev(), md.ino());
        let Some(v) = self.names.get_mut(&key) else { return Vec::new() };
        v.retain(|p| {
            p == rel
                || std::fs::symlink_metadata(p.under(root))
                    .is_ok_and(|m| m.is_file() && m.dev() == key.0 && m.ino() == key.1)
        });
        let others: Vec<RelPath> = v.iter().filter(|p| *p != rel).cloned().collect();
        if v.is_empty() {
            self.names.remove(&key);
        }
        others
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let rp = |s: &str| RelPath::new(s.as_bytes().to_vec()).unwrap();
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("single"), b"y").unwrap();
        let md = |n: &str| std::fs::symlink_metadata(dir.path().join(n)).unwrap();
        let mut l = Links::default();
        l.note(&rp("a"), &md("a"));
        l.note(&rp("b"), &md("b"));
        l.note(&rp("single"), &md("single"));
        assert_eq!(l.names(&rp("a"), &md("a"), dir.path()), vec![rp("b")]);
        assert!(l.names(&rp("single"), &md("single"), dir.path()).is_empty());
        // b now names another file: forgotten.
        let a = md("a");
        std::fs::remove_file(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b"), b"other").unwrap();
        assert!(l.names(&rp("a"), &a, dir.path()).is_empty());
    }
}
