//! Compares two directory trees the way a user would: same entries, same kinds, same bytes,
//! same permission bits, same symlink targets, empty directories included. Never follows
//! symlinks.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, len: u64, hash: [u8; 32] },
    Symlink { target: PathBuf },
}

/// Every entry under `root`, keyed by relative path.
pub fn scan(root: &Path) -> std::io::Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            let ft = meta.file_type();
            let entry = if ft.is_symlink() {
                Entry::Symlink { target: std::fs::read_link(&path)? }
            } else if ft.is_dir() {
                stack.push(path.clone());
                Entry::Dir { mode }
            } else {
                let data = std::fs::read(&path)?;
                Entry::File { mode, len: data.len() as u64, hash: *blake3::hash(&data).as_bytes() }
            };
            out.insert(rel, entry);
        }
    }
    Ok(out)
}

/// Human-readable differences between two trees (empty when equal).
pub fn diff(a: &Path, b: &Path) -> std::io::Result<Vec<String>> {
    let left = scan(a)?;
    let right = scan(b)?;
    let mut out = Vec::new();
    for (p, e) in &left {
        match right.get(p) {
            None => out.push(format!("missing on standby: {} ({})", p.display(), kind(e))),
            Some(r) if r != e => out.push(format!("differs: {}: source {} standby {}", p.display(), show(e), show(r))),
            _ => {}
        }
    }
    for (p, e) in &right {
        if !left.contains_key(p) {
            out.push(format!("extra on standby: {} ({})", p.display(), kind(e)));
        }
    }
    out.truncate(40);
    Ok(out)
}

fn kind(e: &Entry) -> &'static str {
    match e {
        Entry::Dir { .. } => "dir",
        Entry::File { .. } => "file",
        Entry::Symlink { .. } => "symlink",
    }
}

fn show(e: &Entry) -> String {
    match e {
        Entry::Dir { mode } => format!("dir {mode:o}"),
        Entry::File { mode, len, hash } => {
            format!("file {mode:o} {len} bytes {:02x}{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2], hash[3])
        }
        Entry::Symlink { target } => format!("symlink -> {}", target.display()),
    }
}
