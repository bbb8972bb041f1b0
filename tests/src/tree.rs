//! Compares two directory trees the way a user of `rsync -aHAXS --numeric-ids` would: same
//! entries, same kinds, same bytes, same permission bits, owners and groups, extended
//! attributes (POSIX ACLs included), symlink targets, FIFOs and device numbers, hard links
//! (which names share a file), empty directories included — and sparse files still sparse.
//! Never follows symlinks.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Owner, group and extended attributes (name → value, sorted) of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attrs {
    pub uid: u32,
    pub gid: u32,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
        attrs: Attrs,
    },
    File {
        mode: u32,
        len: u64,
        hash: [u8; 32],
        attrs: Attrs,
        /// The file's other names in the tree (hard links), sorted.
        links: Vec<PathBuf>,
    },
    Symlink {
        target: PathBuf,
        uid: u32,
        gid: u32,
    },
    Special {
        /// `p` FIFO, `c` character device, `b` block device, `s` socket.
        kind: char,
        mode: u32,
        rdev: u64,
        attrs: Attrs,
    },
}

/// Every entry under `root`, keyed by relative path.
pub fn scan(root: &Path) -> std::io::Result<BTreeMap<PathBuf, Entry>> {
    Ok(scan_with_allocation(root)?.0)
}

/// [`scan`], plus the bytes each regular file has allocated on disk (`st_blocks * 512`).
fn scan_with_allocation(root: &Path) -> std::io::Result<(BTreeMap<PathBuf, Entry>, HashMap<PathBuf, u64>)> {
    let mut out = BTreeMap::new();
    let mut allocated = HashMap::new();
    // (device, inode) → names, for files with several links.
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            // A live tree: an entry (a receiver's staging file, say) may vanish while it is
            // listed; it is not part of the tree then.
            let (entry, meta) = match read_entry(&path) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match &entry {
                Entry::Dir { .. } => stack.push(path),
                Entry::File { .. } => {
                    allocated.insert(rel.clone(), meta.blocks() * 512);
                    if meta.nlink() > 1 {
                        inodes.entry((meta.dev(), meta.ino())).or_default().push(rel.clone());
                    }
                }
                _ => {}
            }
            out.insert(rel, entry);
        }
    }
    for names in inodes.values() {
        for n in names {
            if let Some(Entry::File { links, .. }) = out.get_mut(n) {
                *links = names.iter().filter(|o| *o != n).cloned().collect();
                links.sort();
            }
        }
    }
    Ok((out, allocated))
}

/// The entry at `path` (not followed), with its lstat.
fn read_entry(path: &Path) -> std::io::Result<(Entry, std::fs::Metadata)> {
    let meta = std::fs::symlink_metadata(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    let attrs = || -> std::io::Result<Attrs> { Ok(Attrs { uid: meta.uid(), gid: meta.gid(), xattrs: xattrs(path)? }) };
    let entry = if ft.is_symlink() {
        Entry::Symlink { target: std::fs::read_link(path)?, uid: meta.uid(), gid: meta.gid() }
    } else if ft.is_dir() {
        Entry::Dir { mode, attrs: attrs()? }
    } else if ft.is_file() {
        let data = std::fs::read(path)?;
        Entry::File {
            mode,
            len: data.len() as u64,
            hash: *blake3::hash(&data).as_bytes(),
            attrs: attrs()?,
            links: Vec::new(),
        }
    } else {
        let kind = if ft.is_fifo() {
            'p'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else {
            's'
        };
        Entry::Special { kind, mode, rdev: meta.rdev(), attrs: attrs()? }
    };
    Ok((entry, meta))
}

/// Every extended attribute of `path` (not following symlinks).
pub fn xattrs(path: &Path) -> std::io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL in path");
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: valid C string and a buffer of `names.len()` bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) { Ok(out) } else { Err(e) };
    }
    names.truncate(n as usize);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).expect("no NUL in a name");
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: valid C strings and a buffer of `value.len()` bytes.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if m < 0 {
            return Err(std::io::Error::last_os_error());
        }
        value.truncate(m as usize);
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

/// Human-readable differences between two trees (empty when equal). A file sparse on `a`
/// (allocating less than its length) must not allocate more than that plus a little slack on
/// `b`. Sockets on `a` are not expected on `b`.
pub fn diff(a: &Path, b: &Path) -> std::io::Result<Vec<String>> {
    let (left, left_alloc) = scan_with_allocation(a)?;
    let (right, right_alloc) = scan_with_allocation(b)?;
    let mut out = Vec::new();
    for (p, e) in &left {
        if matches!(e, Entry::Special { kind: 's', .. }) {
            // Sockets are not replicated (they mean nothing on another host).
            continue;
        }
        match right.get(p) {
            None => out.push(format!("missing on standby: {} ({})", p.display(), kind(e))),
            Some(r) if r != e => out.push(format!("differs: {}: source {} standby {}", p.display(), show(e), show(r))),
            _ => {}
        }
        if let (Entry::File { len, .. }, Some(&la), Some(&ra)) = (e, left_alloc.get(p), right_alloc.get(p)) {
            const SLACK: u64 = 256 * 1024;
            if la + SLACK < *len && ra > la + SLACK {
                out.push(format!(
                    "not sparse on standby: {}: {len} bytes, {la} allocated on the source, {ra} on the standby",
                    p.display()
                ));
            }
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
        Entry::Special { .. } => "special",
    }
}

fn show_attrs(a: &Attrs) -> String {
    let names: Vec<String> = a.xattrs.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    format!(
        "{}:{}{}",
        a.uid,
        a.gid,
        if names.is_empty() { String::new() } else { format!(" xattrs [{}]", names.join(",")) }
    )
}

fn show(e: &Entry) -> String {
    match e {
        Entry::Dir { mode, attrs } => format!("dir {mode:o} {}", show_attrs(attrs)),
        Entry::File { mode, len, hash, attrs, links } => {
            format!(
                "file {mode:o} {} {len} bytes {:02x}{:02x}{:02x}{:02x}{}",
                show_attrs(attrs),
                hash[0],
                hash[1],
                hash[2],
                hash[3],
                if links.is_empty() { String::new() } else { format!(" linked with {links:?}") }
            )
        }
        Entry::Symlink { target, uid, gid } => format!("symlink -> {} {uid}:{gid}", target.display()),
        Entry::Special { kind, mode, rdev, attrs } => {
            format!("special {kind} {mode:o} rdev {rdev:x} {}", show_attrs(attrs))
        }
    }
}
