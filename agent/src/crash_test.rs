//! Test support: running part of a unit test in a child process that dies by SIGKILL, to see
//! what a crash leaves on disk.

use std::path::Path;

/// Set in the child to the directory it works in.
pub const CRASH_DIR: &str = "LOCKSTEP_CRASH_TEST_DIR";

/// In a child started by [`run_killed_child`]: its directory.
pub fn child_dir() -> Option<String> {
    std::env::var(CRASH_DIR).ok()
}

/// Runs the test `test` (its full path, e.g. `module::tests::name`) again in a child process
/// working in `dir`, and checks it died (by the SIGKILL it sends itself).
pub fn run_killed_child(test: &str, dir: &Path) {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test])
        .env(CRASH_DIR, dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must die by SIGKILL");
}

/// Ends the (child) process as a crash would: no destructors, no flushes.
pub fn die() -> ! {
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL delivered")
}
