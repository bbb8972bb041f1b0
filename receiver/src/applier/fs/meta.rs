//! Owner, group and extended attributes (POSIX ACLs included) of what the fs applier creates,
//! as `rsync -aHAX --numeric-ids` keeps them, from the source's [`Meta`].
//!
//! Order on one path: the owner first (chown clears set-uid and set-gid bits), then the
//! extended attributes — exactly the listed ones: others the path has are removed, since a new
//! file inherits an access ACL from its directory's default ACL —, then the mode (after the
//! ACL, so that the group bits, which are the ACL's mask, end as the source has them). Each
//! step sets an absolute state, so redoing it over a partial result after a crash gives the
//! same result. Files are handled through their open descriptor, every other node by path
//! with calls that do not follow a symlink (`lchown`, `l*xattr`; chmod only after `lstat`
//! said it is not a symlink). Symlinks get their owner only: Linux cannot chmod a link, and
//! `user.*` attributes are not allowed on links.
//!
//! A step the receiver cannot take (no CAP_CHOWN, EPERM on `trusted.*`, a filesystem without
//! extended attributes or ACLs) never fails the apply: it is counted and reported (see
//! [`FsReport`]) and the rest is applied. `security.selinux` is never removed: the receiving
//! host's policy labels what it creates.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use lockstep_common::config::FsTargetOptions;
use lockstep_common::event::{Meta, Xattr};
use lockstep_common::relpath::RelPath;
use tracing::warn;

use super::report::{FsReport, What};
use super::tree::{chmod_nofollow, io_err};
use crate::applier::ApplyError;

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// Attributes the receiving host owns, left alone unless the source lists them.
const HOST_OWNED: &[&[u8]] = &[b"security.selinux"];

const FIX_OWNER: &str = "run the receiver as root (or grant it CAP_CHOWN), or set owners = false for this target";
const FIX_XATTR: &str = "trusted.* and security.* need the receiver to run as root; a filesystem without extended \
     attributes needs another filesystem (or mount option user_xattr); or set xattrs = false for this target";
const FIX_ACL: &str = "put the standby on a filesystem with POSIX ACLs (mount option acl), or set acls = false for \
     this target";

/// Linux capability number of CAP_CHOWN (bit in /proc/self/status CapEff).
const CAP_CHOWN: u32 = 0;

fn is_acl(name: &[u8]) -> bool {
    name == ACL_ACCESS || name == ACL_DEFAULT
}

fn kind_of(name: &[u8]) -> What {
    if is_acl(name) {
        What::Acl
    } else {
        What::Xattr
    }
}

fn fix_of(what: What) -> &'static str {
    if what == What::Acl {
        FIX_ACL
    } else {
        FIX_XATTR
    }
}

/// Something metadata is applied to.
pub(super) enum Node<'a> {
    /// An open regular file (a staging file).
    File(&'a File),
    /// A directory or special file (`symlink` false) or a symlink, by path; the caller has
    /// seen it with `lstat`.
    Path { path: &'a Path, symlink: bool },
}

/// What the applier and its workers share to apply metadata: the target's options, its
/// report, and the privilege and name lookups found at open.
pub(super) struct Ctx {
    pub(super) opts: FsTargetOptions,
    pub(super) report: Arc<FsReport>,
    /// Whether this process may give files away (CAP_CHOWN). Without it owners are not set.
    can_chown: bool,
    /// The receiver's ids for the source's user and group names (`numeric_ids = false`),
    /// looked up once each; `None`: unknown here.
    users: Mutex<HashMap<String, Option<u32>>>,
    groups: Mutex<HashMap<String, Option<u32>>>,
}

impl Ctx {
    /// Finds out whether owners can be set; when they should be and cannot, says so once per
    /// target at WARN (what is lost, why, and the fix).
    pub(super) fn new(opts: FsTargetOptions, report: Arc<FsReport>, root: &Path) -> Ctx {
        let can_chown = may_chown();
        if opts.owners && !can_chown && report.first_time("owners-privilege") {
            // SAFETY: geteuid cannot fail.
            let euid = unsafe { libc::geteuid() };
            warn!(
                target = %root.display(), euid,
                "the receiver lacks CAP_CHOWN: files on this standby will be owned by the receiver's user instead of \
                 the source's owners, and would be wrong after a cutover; run the receiver as root (or grant it \
                 CAP_CHOWN, e.g. AmbientCapabilities=CAP_CHOWN in its systemd unit), or set owners = false for this \
                 target to keep it so knowingly"
            );
        }
        Ctx { opts, report, can_chown, users: Mutex::default(), groups: Mutex::default() }
    }

    /// Applies `meta` (when the agent sent it: without, owner and attributes stay as they are)
    /// and then `mode` (unless `node` is a symlink) to `node`, which stands for `rel`.
    pub(super) fn apply(
        &self,
        node: &Node<'_>,
        rel: &RelPath,
        meta: Option<&Meta>,
        mode: Option<u32>,
    ) -> Result<(), ApplyError> {
        let symlink = matches!(node, Node::Path { symlink: true, .. });
        if let Some(m) = meta {
            if self.opts.owners {
                let (uid, gid) = self.ids(m);
                self.chown(node, rel, uid, gid)?;
            }
            if !symlink {
                self.set_xattrs(node, rel, &m.xattrs);
            }
        }
        match (mode, node) {
            (None, _) | (_, Node::Path { symlink: true, .. }) => {}
            (Some(mode), Node::File(f)) => {
                f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_err(format!("chmod {rel}")))?
            }
            (Some(mode), Node::Path { path, .. }) => {
                chmod_nofollow(path, mode)?;
            }
        }
        Ok(())
    }

    /// Gives `dst` the owner, attributes, mode and mtime of `src` (a copy standing in for a
    /// hard link, `hard_links = false`).
    pub(super) fn copy_attrs(&self, src: &File, dst: &File, rel: &RelPath) -> Result<(), ApplyError> {
        let m = src.metadata().map_err(io_err(format!("inspect hard link target of {rel}")))?;
        let dst_node = Node::File(dst);
        if self.opts.owners {
            self.chown(&dst_node, rel, m.uid(), m.gid())?;
        }
        if self.opts.xattrs || self.opts.acls {
            let src_node = Node::File(src);
            match src_node.list_xattrs() {
                Ok(names) => {
                    let mut wanted = Vec::new();
                    for name in names {
                        if let Ok(value) = src_node.get_xattr(&name) {
                            wanted.push(Xattr { name, value });
                        }
                    }
                    self.set_xattrs(&dst_node, rel, &wanted);
                }
                // The standby's own filesystem has none: nothing to copy.
                Err(e) if unsupported(&e) => {}
                Err(e) => self.report.not_applied(What::Xattr, rel, &e, FIX_XATTR),
            }
        }
        dst.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(io_err(format!("chmod copy of {rel}")))?;
        if let Ok(t) = m.modified() {
            dst.set_modified(t).map_err(io_err(format!("set mtime of copy of {rel}")))?;
        }
        Ok(())
    }

    /// The receiver's ids for the source's owner: numeric, or by name (`numeric_ids = false`)
    /// with the numeric id where the name is unknown here. Root is never mapped by name (as
    /// rsync).
    fn ids(&self, m: &Meta) -> (u32, u32) {
        if self.opts.numeric_ids {
            return (m.uid, m.gid);
        }
        let map = |cache: &Mutex<HashMap<String, Option<u32>>>, name: Option<&String>, id: u32, user: bool| {
            let Some(name) = name.filter(|_| id != 0) else { return id };
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            let found = *cache.entry(name.clone()).or_insert_with(|| lookup_id(name, user));
            found.unwrap_or(id)
        };
        (map(&self.users, m.user.as_ref(), m.uid, true), map(&self.groups, m.group.as_ref(), m.gid, false))
    }

    fn chown(&self, node: &Node<'_>, rel: &RelPath, uid: u32, gid: u32) -> Result<(), ApplyError> {
        let current = node.owner().map_err(io_err(format!("inspect owner of {rel}")))?;
        if current == (uid, gid) {
            return Ok(());
        }
        if !self.can_chown {
            // Said once at WARN when the target opened.
            self.report.left_out(What::Owner, rel, "the receiver lacks CAP_CHOWN");
            return Ok(());
        }
        if let Err(e) = node.chown(uid, gid) {
            self.report.not_applied(What::Owner, rel, &format!("chown to {uid}:{gid}: {e}"), FIX_OWNER);
        }
        Ok(())
    }

    /// Makes the attributes this target keeps (`xattrs`, `acls`) exactly `wanted`.
    fn set_xattrs(&self, node: &Node<'_>, rel: &RelPath, wanted: &[Xattr]) {
        let governed = |name: &[u8]| if is_acl(name) { self.opts.acls } else { self.opts.xattrs };
        if !self.opts.xattrs && !self.opts.acls {
            return;
        }
        let have = match node.list_xattrs() {
            Ok(have) => have,
            Err(e) => {
                // Nothing can be set either; say so only if something was to be set.
                if let Some(x) = wanted.iter().find(|x| governed(&x.name)) {
                    let what = kind_of(&x.name);
                    self.report.not_applied(what, rel, &format!("list extended attributes: {e}"), fix_of(what));
                }
                return;
            }
        };
        for name in &have {
            let listed = wanted.iter().any(|x| x.name == *name);
            if listed || !governed(name) || HOST_OWNED.contains(&name.as_slice()) {
                continue;
            }
            if let Err(e) = node.remove_xattr(name) {
                let what = kind_of(name);
                let detail = format!("remove {}: {e}", String::from_utf8_lossy(name));
                self.report.not_applied(what, rel, &detail, fix_of(what));
            }
        }
        for x in wanted.iter().filter(|x| governed(&x.name)) {
            if let Err(e) = node.set_xattr(&x.name, &x.value) {
                let what = kind_of(&x.name);
                let detail = format!("set {}: {e}", String::from_utf8_lossy(&x.name));
                self.report.not_applied(what, rel, &detail, fix_of(what));
            }
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

impl Node<'_> {
    fn owner(&self) -> io::Result<(u32, u32)> {
        let m = match self {
            Node::File(f) => f.metadata()?,
            Node::Path { path, .. } => std::fs::symlink_metadata(path)?,
        };
        Ok((m.uid(), m.gid()))
    }

    fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        match self {
            Node::File(f) => std::os::unix::fs::fchown(f, Some(uid), Some(gid)),
            Node::Path { path, .. } => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
        }
    }

    /// Calls the descriptor (`f*`) or the no-follow path (`l*`) form of an xattr call.
    fn call(
        &self,
        fd_call: impl FnOnce(libc::c_int) -> isize,
        path_call: impl FnOnce(&CStr) -> isize,
    ) -> io::Result<usize> {
        let r = match self {
            Node::File(f) => fd_call(f.as_raw_fd()),
            Node::Path { path, .. } => path_call(&cstring(path.as_os_str().as_bytes())?),
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    pub(super) fn list_xattrs(&self) -> io::Result<Vec<Vec<u8>>> {
        loop {
            // SAFETY (all calls below): the descriptor is open, the C strings live for the
            // call, and the buffer pointers and lengths describe owned, writable memory.
            let size = self.call(
                |fd| unsafe { libc::flistxattr(fd, std::ptr::null_mut(), 0) },
                |p| unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) },
            )?;
            if size == 0 {
                return Ok(Vec::new());
            }
            let mut buf = vec![0u8; size];
            let (ptr, len) = (buf.as_mut_ptr().cast::<libc::c_char>(), buf.len());
            match self.call(
                |fd| unsafe { libc::flistxattr(fd, ptr, len) },
                |p| unsafe { libc::llistxattr(p.as_ptr(), ptr, len) },
            ) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf.split(|b| *b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec).collect());
                }
                // Grew in between: ask again.
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) fn get_xattr(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        let name = cstring(name)?;
        loop {
            let size = self.call(
                |fd| unsafe { libc::fgetxattr(fd, name.as_ptr(), std::ptr::null_mut(), 0) },
                |p| unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) },
            )?;
            let mut buf = vec![0u8; size];
            let (ptr, len) = (buf.as_mut_ptr().cast::<libc::c_void>(), buf.len());
            match self.call(
                |fd| unsafe { libc::fgetxattr(fd, name.as_ptr(), ptr, len) },
                |p| unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), ptr, len) },
            ) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn set_xattr(&self, name: &[u8], value: &[u8]) -> io::Result<()> {
        let name = cstring(name)?;
        let (ptr, len) = (value.as_ptr().cast::<libc::c_void>(), value.len());
        self.call(
            |fd| unsafe { libc::fsetxattr(fd, name.as_ptr(), ptr, len, 0) as isize },
            |p| unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), ptr, len, 0) as isize },
        )
        .map(drop)
    }

    fn remove_xattr(&self, name: &[u8]) -> io::Result<()> {
        let name = cstring(name)?;
        self.call(
            |fd| unsafe { libc::fremovexattr(fd, name.as_ptr()) as isize },
            |p| unsafe { libc::lremovexattr(p.as_ptr(), name.as_ptr()) as isize },
        )
        .map(drop)
    }
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name with NUL"))
}

/// Whether this process may give files away: CAP_CHOWN in its effective set.
fn may_chown() -> bool {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    chown_capability(std::fs::read_to_string("/proc/self/status").ok().as_deref(), euid)
}

/// CAP_CHOWN from the `CapEff` line of `/proc/self/status`; where that cannot be read, whether
/// the effective uid is root.
pub(super) fn chown_capability(proc_status: Option<&str>, euid: u32) -> bool {
    let capeff = proc_status
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:")))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    match capeff {
        Some(caps) => caps & (1 << CAP_CHOWN) != 0,
        None => euid == 0,
    }
}

/// The receiver's uid (`user`) or gid for `name`, if it has one.
fn lookup_id(name: &str, user: bool) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 1024];
    loop {
        let mut out: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: the record, the buffer and the result pointer are valid for the call; the
        // result points into `pwd`/`grp` (or is null), read only before they go out of scope.
        let (rc, id) = unsafe {
            if user {
                let mut pwd: libc::passwd = std::mem::zeroed();
                let rc = libc::getpwnam_r(
                    cname.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    std::ptr::addr_of_mut!(out).cast(),
                );
                (rc, pwd.pw_uid)
            } else {
                let mut grp: libc::group = std::mem::zeroed();
                let rc = libc::getgrnam_r(
                    cname.as_ptr(),
                    &mut grp,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    std::ptr::addr_of_mut!(out).cast(),
                );
                (rc, grp.gr_gid)
            }
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !out.is_null()).then_some(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_logic() {
        let status = |capeff: &str| format!("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{capeff}\nCapBnd:\t1\n");
        assert!(chown_capability(Some(&status("000001ffffffffff")), 1000));
        assert!(chown_capability(Some(&status("0000000000000001")), 1000));
        // Root whose capabilities were dropped cannot chown; a plain user cannot either.
        assert!(!chown_capability(Some(&status("00000000a80425fa")), 0));
        assert!(!chown_capability(Some(&status("0000000000000000")), 1000));
        // Without /proc: judged by the uid.
        assert!(chown_capability(None, 0));
        assert!(!chown_capability(None, 1000));
        assert!(!chown_capability(Some("garbage"), 1000));
    }

    #[test]
    fn names_are_looked_up_here() {
        assert_eq!(lookup_id("root", true), Some(0));
        assert_eq!(lookup_id("root", false), Some(0));
        assert_eq!(lookup_id("no-such-user-lockstep", true), None);
        assert_eq!(lookup_id("no-such-group-lockstep", false), None);
    }
}
