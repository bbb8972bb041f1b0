//! File metadata as `rsync -aHAXS --numeric-ids` keeps it, with the default configuration:
//! owners and groups, sparse files, hard links, extended attributes and POSIX ACLs, FIFOs
//! (sockets are left out) — in the initial copy, live, and across kill -9 of either side. And
//! symlinks as rsync -a copies them: verbatim, whatever they point at. The comparison
//! (`tree::diff`) checks every one of these, sparseness included.

use std::ffi::CString;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use lockstep_tests::Setup;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of `value.len()` bytes.
    let rc = unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {name} on {}: {}", p.display(), std::io::Error::last_os_error());
}

fn remove_xattr(p: &Path, name: &str) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings.
    let rc = unsafe { libc::lremovexattr(c(p).as_ptr(), n.as_ptr()) };
    assert_eq!(rc, 0, "removexattr {name} on {}: {}", p.display(), std::io::Error::last_os_error());
}

fn mkfifo(p: &Path, mode: u32) {
    // SAFETY: a valid C string.
    let rc = unsafe { libc::mkfifo(c(p).as_ptr(), mode) };
    assert_eq!(rc, 0, "mkfifo {}: {}", p.display(), std::io::Error::last_os_error());
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// An access ACL (`system.posix_acl_access`, the kernel's binary form): owner rw, user `uid`
/// r, owning group r, mask r, others none.
fn acl_granting_read_to(uid: u32) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(0x01u16, 6u16, u32::MAX), (0x02, 4, uid), (0x04, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)]
    {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// A file of `len` bytes with data only at `at`: the rest are holes.
fn sparse(p: &Path, len: u64, at: &[u64]) {
    let mut f = fs::File::create(p).unwrap();
    f.set_len(len).unwrap();
    for &off in at {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&[0xab; 5000]).unwrap();
    }
}

const NOBODY: u32 = 65534;

#[test]
fn metadata_arrives_as_rsync_keeps_it_across_kills() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut s = Setup::new().unwrap();
    let src = s.src.clone();
    fs::create_dir_all(src.join("app/data")).unwrap();
    fs::write(src.join("app/owned"), b"owned by nobody").unwrap();
    fs::write(src.join("app/data/shared"), b"one file, two names").unwrap();
    fs::hard_link(src.join("app/data/shared"), src.join("app/alias")).unwrap();
    fs::write(src.join("app/tagged"), b"with xattrs").unwrap();
    set_xattr(&src.join("app/tagged"), "user.color", b"blue");
    set_xattr(&src.join("app/tagged"), "user.empty", b"");
    set_xattr(&src.join("app/data"), "user.dir", b"on a directory");
    fs::write(src.join("app/acl"), b"readable by uid 1000").unwrap();
    set_xattr(&src.join("app/acl"), "system.posix_acl_access", &acl_granting_read_to(1000));
    sparse(&src.join("app/sparse.img"), 100 << 20, &[0, 50 << 20]);
    mkfifo(&src.join("app/pipe"), 0o640);
    let _socket = std::os::unix::net::UnixListener::bind(src.join("app/socket")).unwrap();
    symlink("/usr/bin/python3", src.join("app/python")).unwrap();
    symlink("../../outside/release", src.join("app/data/current")).unwrap();
    if root {
        chown(&src.join("app/owned"), NOBODY, NOBODY);
        chown(&src.join("app/data"), 1000, 1000);
        std::os::unix::fs::lchown(src.join("app/python"), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    s.start().unwrap();
    s.wait_converged(Duration::from_secs(60)).unwrap();
    let st = s.agent_status().unwrap();
    assert_eq!(st["sources"][0]["sockets_skipped"], 1, "{st}");

    // Live: the same kinds of change while both sides run, then again across kill -9 of the
    // receiver and of the agent.
    let live = |s: &mut Setup, round: u32| {
        let src = s.src.clone();
        let d = src.join(format!("r{round}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("f"), format!("round {round}")).unwrap();
        fs::hard_link(d.join("f"), d.join("g")).unwrap();
        // Content changed through one name: the other follows.
        fs::OpenOptions::new().append(true).open(src.join("app/alias")).unwrap().write_all(b" +").unwrap();
        set_xattr(&src.join("app/tagged"), "user.round", round.to_string().as_bytes());
        sparse(&d.join("holes"), 30 << 20, &[10 << 20]);
        mkfifo(&d.join("fifo"), 0o600);
        if root {
            chown(&d.join("f"), NOBODY, 1000 + round);
        }
    };
    live(&mut s, 1);
    remove_xattr(&src.join("app/tagged"), "user.empty");
    s.wait_converged(Duration::from_secs(60)).unwrap();
    s.kill_receiver();
    live(&mut s, 2);
    s.start_receiver().unwrap();
    s.kill_agent();
    live(&mut s, 3);
    s.start_agent().unwrap();
    live(&mut s, 4);
    s.wait_converged(Duration::from_secs(90)).unwrap();
}

/// Writes a minimal wheel of package `name` (one module returning `text`) into `dir`.
fn wheel(python: &str, dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}-1.0-py3-none-any.whl"));
    let script = format!(
        r#"
import zipfile, hashlib, base64
files = {{
    "{name}/__init__.py": 'def hello():\n    return {text:?}\n',
    "{name}-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
    "{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: lockstep-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = []
with zipfile.ZipFile({path:?}, "w") as z:
    for n, t in files.items():
        b = t.encode()
        z.writestr(n, b)
        h = base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()
        record.append(f"{{n}},sha256={{h}},{{len(b)}}")
    record.append("{name}-1.0.dist-info/RECORD,,")
    z.writestr("{name}-1.0.dist-info/RECORD", "\n".join(record) + "\n")
"#,
        path = path.to_str().unwrap()
    );
    let o = std::process::Command::new(python).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "build wheel: {}", String::from_utf8_lossy(&o.stderr));
    path
}

/// A Python virtual environment built, filled by pip, compiled and partly uninstalled inside
/// the tree, with the default configuration: it arrives identical, links included
/// (`bin/python3` is an absolute symlink to the interpreter), and the standby's interpreter
/// imports what pip installed.
#[test]
fn a_python_venv_arrives_usable() {
    let python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| {
            std::process::Command::new(p)
                .args(["-c", "import venv, ensurepip"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("python3 with the venv and ensurepip modules (on every machine of this kind)");
    let mut s = Setup::new().unwrap();
    s.start().unwrap();
    let venv = s.src.join("venv");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    // pip comes from the wheel bundled with Python (no network).
    run(&[python, "-m", "venv", venv.to_str().unwrap()]);
    let wheels = tempfile::tempdir().unwrap();
    let greet = wheel(python, wheels.path(), "greet", "hello from the standby");
    let gone = wheel(python, wheels.path(), "gone", "never");
    let pip = venv.join("bin/pip");
    let pip = pip.to_str().unwrap();
    run(&[pip, "install", "-q", "--no-index", greet.to_str().unwrap(), gone.to_str().unwrap()]);
    run(&[venv.join("bin/python3").to_str().unwrap(), "-m", "compileall", "-q", venv.join("lib").to_str().unwrap()]);
    run(&[pip, "uninstall", "-q", "-y", "gone"]);
    s.wait_converged(Duration::from_secs(90)).unwrap();
    let standby_python = s.dst.join("venv/bin/python3");
    assert!(fs::symlink_metadata(&standby_python).unwrap().file_type().is_symlink());
    let o = std::process::Command::new(&standby_python)
        .args(["-c", "import greet, sys; print(greet.hello()); print(sys.prefix)"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello from the standby"));
    assert_eq!(lines.next(), Some(&*s.dst.join("venv").to_string_lossy()), "the standby's venv is its own");
    let gone = std::process::Command::new(&standby_python).args(["-c", "import gone"]).output().unwrap();
    assert!(!gone.status.success(), "the uninstalled package is gone on the standby too");
}
