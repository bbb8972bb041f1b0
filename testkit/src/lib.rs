//! Test kit shared by the workspace's test suites (the receiver's unit tests and the
//! end-to-end tests in `lockstep-tests`): throwaway PostgreSQL clusters ([`pg`]) and free
//! ports. A crate of its own because the receiver cannot depend on `lockstep-tests`, which
//! depends on the receiver. Test code only; never a dependency of a daemon.

pub mod pg;

use std::net::TcpListener;

/// A port on 127.0.0.1 that is free now and that this process has not handed out before.
///
/// Taken below the kernel's ephemeral range (32768 and up by default), walking up from a
/// per-process start: a port the kernel picked for `bind(0)` and released could be picked
/// again for the next caller (tests run in parallel) or become an outgoing connection's
/// source port before the daemon that was given it binds it — then that daemon fails with
/// "Address already in use".
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, std::process::id() % 1000 * 11, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
