//! What both binaries' `main` share: running a daemon until SIGINT/SIGTERM, and asking a
//! running daemon for its status through the admin endpoint. Exit codes follow INTERFACE.md.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("build tokio runtime")
}

/// Runs `daemon` on a multi-threaded runtime, cancelling its token on SIGINT or SIGTERM.
/// Exit 0 when it returns Ok, 1 (with the error, rendered by the caller, on stderr) otherwise.
pub fn run_until_signal<F, Fut>(daemon: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    runtime().block_on(async move {
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown requested");
            s.cancel();
        });
        match daemon(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}

/// Fetches `/status` from the admin endpoint at `addr` and hands it to `show`.
/// Exit 1 when the daemon cannot be reached or answers an error.
pub fn status(addr: SocketAddr, show: impl FnOnce(&serde_json::Value)) -> ExitCode {
    runtime().block_on(async move {
        match crate::admin::call(addr, "GET", "/status", None, Duration::from_secs(10)).await {
            Ok((200, v)) => {
                show(&v);
                ExitCode::SUCCESS
            }
            Ok((code, v)) => {
                eprintln!("error: admin endpoint answered {code}: {v}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}
