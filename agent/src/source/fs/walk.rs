//! Walking the watched tree: the exclude filter and directory listing shared by the engine's
//! scans and the snapshotter. Symlinks are never followed; names `RelPath` refuses (e.g. the
//! receiver's staging suffix) are skipped with a warning.

use std::ffi::OsString;
use std::fs::FileType;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use lockstep_common::relpath::RelPath;

/// The `exclude` globs, matched against paths relative to the root.
pub(crate) struct Filter {
    /// Paths matching these are not replicated (nor, for directories, descended into).
    excluded: GlobSet,
    /// Directories matching these are not descended into: derived from patterns ending in
    /// `/**`, so `cache/**` skips walking `cache/` instead of rejecting each entry in it.
    prune: GlobSet,
}

impl Filter {
    pub(crate) fn new(patterns: &[String]) -> Result<Filter, globset::Error> {
        let mut ex = GlobSetBuilder::new();
        let mut pr = GlobSetBuilder::new();
        for p in patterns {
            ex.add(Glob::new(p)?);
            if let Some(dir) = p.strip_suffix("/**") {
                if !dir.is_empty() {
                    pr.add(Glob::new(dir)?);
                }
            }
        }
        Ok(Filter { excluded: ex.build()?, prune: pr.build()? })
    }

    /// Whether `rel` itself matches an exclude pattern.
    pub(crate) fn excludes(&self, rel: &RelPath) -> bool {
        self.excluded.is_match(rel.as_path())
    }

    /// Whether the walk must not descend into directory `rel`.
    pub(crate) fn prunes(&self, rel: &RelPath) -> bool {
        self.excludes(rel) || self.prune.is_match(rel.as_path())
    }

    /// Whether `rel` is out of scope: excluded itself or below a pruned directory. For paths
    /// reported by the watcher, which does not know about excludes.
    pub(crate) fn out_of_scope(&self, rel: &RelPath) -> bool {
        if self.excludes(rel) {
            return true;
        }
        let mut cur = rel.parent();
        while let Some(p) = cur {
            if self.prunes(&p) {
                return true;
            }
            cur = p.parent();
        }
        false
    }
}

/// One directory entry, validated.
pub(crate) struct Child {
    pub rel: RelPath,
    pub file_type: FileType,
}

/// Lists directory `dir` (absolute) whose relative path is `rel_dir` (`None` at the root),
/// dropping names `RelPath` refuses and excluded paths. Sorted by name, for a stable order.
pub(crate) fn list_dir(dir: &Path, rel_dir: Option<&RelPath>, filter: &Filter) -> io::Result<Vec<Child>> {
    let mut out = Vec::new();
    for de in std::fs::read_dir(dir)? {
        let de = de?;
        let name: OsString = de.file_name();
        let mut bytes = match rel_dir {
            Some(d) => {
                let mut b = d.as_bytes().to_vec();
                b.push(b'/');
                b
            }
            None => Vec::new(),
        };
        bytes.extend_from_slice(name.as_bytes());
        let rel = match RelPath::new(bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "skipping a name that cannot be replicated");
                continue;
            }
        };
        if filter.excludes(&rel) {
            continue;
        }
        let file_type = match de.file_type() {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        out.push(Child { rel, file_type });
    }
    out.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn excludes_and_prunes() {
        let f = Filter::new(&["*.swp".into(), "cache/**".into()]).unwrap();
        assert!(f.excludes(&rp("a/b.swp")));
        assert!(f.excludes(&rp("cache/x")));
        assert!(!f.excludes(&rp("cache")));
        assert!(f.prunes(&rp("cache")));
        assert!(f.out_of_scope(&rp("cache/x/y")));
        assert!(!f.out_of_scope(&rp("cachex/y")));
        assert!(!f.out_of_scope(&rp("src/main.rs")));
    }
}
