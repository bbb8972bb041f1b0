//! File metadata beyond mode and mtime, as `rsync -aHAXS` keeps it: owner and group (with the
//! names the source has for them, for receivers that map owners by name), extended attributes
//! (POSIX ACLs are the `system.posix_acl_*` ones), the identity hard links share, and what a
//! special file is. Always read without following a final symlink.
//!
//! The index keeps only a hash of a path's extended attributes ([`xattr_hash`]): enough to see
//! that they changed, without holding every value for every path.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use lockstep_common::event::{Meta, SpecialKind, Xattr, MAX_XATTRS, MAX_XATTR_VALUE};

/// Bytes of blake3 kept for a path's extended attributes.
pub(crate) const XATTR_HASH_BYTES: usize = 16;

/// The hash of "no extended attributes".
pub(crate) const NO_XATTRS: [u8; XATTR_HASH_BYTES] = [0; XATTR_HASH_BYTES];

/// What kind of special file `meta` describes; sockets (and other types) are `None`.
pub(crate) fn special_kind(meta: &Metadata) -> Option<SpecialKind> {
    let ft = meta.file_type();
    if ft.is_fifo() {
        Some(SpecialKind::Fifo)
    } else if ft.is_char_device() {
        Some(SpecialKind::CharDevice)
    } else if ft.is_block_device() {
        Some(SpecialKind::BlockDevice)
    } else {
        None
    }
}

/// A hash of `xattrs` (sorted by name), [`NO_XATTRS`] for none.
pub(crate) fn xattr_hash(xattrs: &[Xattr]) -> [u8; XATTR_HASH_BYTES] {
    if xattrs.is_empty() {
        return NO_XATTRS;
    }
    let mut h = blake3::Hasher::new();
    for x in xattrs {
        h.update(&(x.name.len() as u32).to_le_bytes());
        h.update(&x.name);
        h.update(&(x.value.len() as u32).to_le_bytes());
        h.update(&x.value);
    }
    let mut out = [0u8; XATTR_HASH_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..XATTR_HASH_BYTES]);
    // A real hash is never the "none" value.
    if out == NO_XATTRS {
        out[0] = 1;
    }
    out
}

/// Names of user and group ids, looked up once each (the system's databases: /etc/passwd,
/// NSS).
#[derive(Default)]
pub(crate) struct Names {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl Names {
    fn user(&mut self, uid: u32) -> Option<String> {
        self.users.entry(uid).or_insert_with(|| lookup_name(uid, false)).clone()
    }

    fn group(&mut self, gid: u32) -> Option<String> {
        self.groups.entry(gid).or_insert_with(|| lookup_name(gid, true)).clone()
    }

    /// The metadata of the path `abs` whose `lstat` is `md`. Extended attributes that cannot be
    /// read (a filesystem without them, a permission problem) are reported as none, with a
    /// debug log: the content still replicates.
    pub(crate) fn meta_of(&mut self, abs: &Path, md: &Metadata) -> Meta {
        let xattrs = if md.file_type().is_symlink() {
            // Linux allows no user attributes on symlinks; the rest are not kept (as rsync).
            Vec::new()
        } else {
            read_xattrs(abs).unwrap_or_else(|e| {
                tracing::debug!(path = %abs.display(), error = %e, "read extended attributes");
                Vec::new()
            })
        };
        Meta { uid: md.uid(), gid: md.gid(), user: self.user(md.uid()), group: self.group(md.gid()), xattrs }
    }
}

/// The name of user (or group) `id`, if the system has one.
fn lookup_name(id: u32, group: bool) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        let mut result: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: the out-structs and the buffer outlive the calls; the returned pointers
        // point into them and are read before they go out of scope.
        let (rc, name) = unsafe {
            if group {
                let mut gr: libc::group = std::mem::zeroed();
                let rc = libc::getgrgid_r(
                    id,
                    &mut gr,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    (&mut result as *mut *mut libc::c_void).cast(),
                );
                (rc, (!result.is_null()).then(|| std::ffi::CStr::from_ptr(gr.gr_name).to_bytes().to_vec()))
            } else {
                let mut pw: libc::passwd = std::mem::zeroed();
                let rc = libc::getpwuid_r(
                    id,
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    (&mut result as *mut *mut libc::c_void).cast(),
                );
                (rc, (!result.is_null()).then(|| std::ffi::CStr::from_ptr(pw.pw_name).to_bytes().to_vec()))
            }
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return name.and_then(|n| String::from_utf8(n).ok()).filter(|n| !n.is_empty() && n.len() <= 256);
    }
}

/// Every extended attribute of `path` (not following a final symlink), sorted by name.
pub(crate) fn read_xattrs(path: &Path) -> io::Result<Vec<Xattr>> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let names = loop {
        // SAFETY: `c` is a valid C string; a null buffer of size 0 asks for the size.
        let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: `buf` has `buf.len()` writable bytes.
        let m = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if m < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                // Grew in between: ask again.
                continue;
            }
            return Err(e);
        }
        buf.truncate(m as usize);
        break buf;
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if out.len() >= MAX_XATTRS {
            tracing::warn!(path = %path.display(), "more than {MAX_XATTRS} extended attributes; the rest are not replicated");
            break;
        }
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        match get_xattr(&c, &cname)? {
            Some(value) if value.len() <= MAX_XATTR_VALUE => out.push(Xattr { name: name.to_vec(), value }),
            Some(value) => tracing::warn!(
                path = %path.display(), name = %String::from_utf8_lossy(name), len = value.len(),
                "extended attribute larger than 64 KiB; not replicated"
            ),
            // Removed since it was listed.
            None => {}
        }
    }
    out.sort();
    Ok(out)
}

/// One attribute's value; `None` when it vanished meanwhile.
fn get_xattr(path: &CString, name: &CString) -> io::Result<Option<Vec<u8>>> {
    loop {
        // SAFETY: valid C strings; a null buffer of size 0 asks for the size.
        let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENODATA) { Ok(None) } else { Err(e) };
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: `buf` has `buf.len()` writable bytes.
        let m = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if m < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => continue,
                Some(libc::ENODATA) => return Ok(None),
                _ => return Err(e),
            }
        }
        buf.truncate(m as usize);
        return Ok(Some(buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: valid C strings and a buffer of `value.len()` bytes.
        let rc = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    #[test]
    fn owner_names_and_xattrs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let md = std::fs::symlink_metadata(&f).unwrap();
        let mut names = Names::default();
        let m = names.meta_of(&f, &md);
        assert_eq!((m.uid, m.gid), (md.uid(), md.gid()));
        if md.uid() == 0 {
            assert_eq!(m.user.as_deref(), Some("root"));
        }
        assert!(m.xattrs.is_empty());
        assert_eq!(xattr_hash(&m.xattrs), NO_XATTRS);
        match set_xattr(&f, "user.b", b"2").and_then(|_| set_xattr(&f, "user.a", b"")) {
            Ok(()) => {
                let m = names.meta_of(&f, &md);
                let got: Vec<(&[u8], &[u8])> = m.xattrs.iter().map(|x| (&x.name[..], &x.value[..])).collect();
                assert_eq!(got, vec![(&b"user.a"[..], &b""[..]), (&b"user.b"[..], &b"2"[..])]);
                assert_ne!(xattr_hash(&m.xattrs), NO_XATTRS);
            }
            // A filesystem without user xattrs (some tmpfs): reading still works.
            Err(e) => eprintln!("user xattrs unsupported here: {e}"),
        }
        let nobody = lookup_name(65534, false);
        assert!(nobody.is_none() || nobody.as_deref() == Some("nobody"), "{nobody:?}");
    }
}
