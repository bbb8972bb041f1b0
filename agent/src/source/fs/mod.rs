//! The fs source: replicates a directory tree.
//!
//! A notify (inotify) watcher is started first, then the tree is walked — on first start to
//! build the index without journaling (receivers are seeded by the [`snapshotter`]), on later
//! starts to reconcile the disk with the index and journal what changed while the agent was
//! down. After that, watcher events are hints: each affected path is compared with the index
//! and the difference journaled (`Mkdir`, `Remove`, `Rename`, `Chmod`, `Symlink`, and
//! `FileWrite` — full content or a block-level delta). Queue overflows and the watch limit fall
//! back to reconciliation scans, never to silent loss.
//!
//! Layout: [`engine`] decides and journals changes; [`index`] is what the journal has
//! described; [`content`] reads files into events; [`watch`] wires notify; [`walk`] lists
//! directories and applies excludes; [`snapshot`] produces a full copy for seeding receivers.
//!
//! [`snapshotter`]: FsSource::snapshotter

mod content;
mod engine;
mod index;
mod links;
mod meta;
mod snapshot;
mod walk;
mod watch;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lockstep_common::config::SourceConfig;
use lockstep_common::event::SourceKind;
use tracing::Instrument;

use self::engine::Engine;
use self::index::Index;
use self::walk::Filter;
use self::watch::Msg;
use super::{Snapshotter, Source, SourceContext, SourceError};

/// A configured fs source, ready to run.
pub struct FsSource {
    name: Arc<str>,
    root: PathBuf,
    filter: Arc<Filter>,
    rescan_interval: Duration,
    /// Set once the tree is watched and the index knows whether a first index was begun: no
    /// snapshot reads the tree before that.
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FsSource {
    /// Builds the source from its config (`kind = "fs"`, `path` = the tree's root).
    pub fn new(cfg: &SourceConfig) -> Result<FsSource, SourceError> {
        let other = |problem: String| SourceError::Other { source_name: cfg.name.clone(), problem };
        if cfg.kind != SourceKind::Fs {
            return Err(other(format!("kind is {}, not fs", cfg.kind)));
        }
        let path = cfg.path.as_ref().ok_or_else(|| other("path is required for an fs source".into()))?;
        // Absolute, so watcher paths (which are joined onto it) strip back to relative paths.
        let root = std::path::absolute(path).map_err(|error| SourceError::Io {
            source_name: cfg.name.clone(),
            context: format!("resolve path {}", path.display()),
            error,
        })?;
        let filter = Filter::new(&cfg.exclude).map_err(|e| other(format!("exclude: {e}")))?;
        Ok(FsSource {
            name: cfg.name.as_str().into(),
            root,
            filter: Arc::new(filter),
            rescan_interval: cfg.rescan_interval,
            ready: Arc::new(tokio::sync::watch::channel(false).0),
        })
    }

    /// The snapshotter that seeds receivers with the tree's full current state.
    pub fn snapshotter(&self) -> Arc<dyn Snapshotter> {
        Arc::new(snapshot::FsSnapshotter {
            name: self.name.clone(),
            root: self.root.clone(),
            filter: self.filter.clone(),
            ready: self.ready.subscribe(),
        })
    }
}

impl Source for FsSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        let span = tracing::info_span!("source", source = %self.name, kind = "fs");
        Box::pin(
            async move {
                let SourceContext { name: _, journal, db, status, mut repairs, cancel, resync_floor, data_dir: _ } = ctx;
                let name = self.name.clone();
                let index = Index::open(&db, &name)
                    .map_err(|error| SourceError::Index { source_name: name.to_string(), error })?;
                let (tx, rx) = std::sync::mpsc::channel::<Msg>();

                // The watcher starts before any walk, so nothing that changes during the walk
                // is missed: its events wait in the channel.
                let mut engine = Engine::new(
                    name.clone(),
                    self.root.clone(),
                    self.filter.clone(),
                    index,
                    db,
                    journal,
                    status,
                    cancel.clone(),
                    self.rescan_interval,
                    resync_floor,
                );
                match watch::start(&self.root, tx.clone()) {
                    Ok(w) => engine.watcher = Some(w),
                    Err(e) if watch::is_watch_limit(&e) => {
                        tracing::warn!(
                            "inotify watch limit reached (fs.inotify.max_user_watches); falling back to reconciliation \
                             scans every 2s until it is raised, e.g. `sysctl -w fs.inotify.max_user_watches=1048576`"
                        );
                        engine.fallback = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not watch the tree; falling back to reconciliation scans every 2s");
                        engine.fallback = true;
                    }
                }

                // Repairs and cancellation reach the engine thread through the same channel.
                let (engine, prepared) = tokio::task::spawn_blocking(move || {
                    let r = engine.prepare_baseline();
                    (engine, r)
                })
                .await
                .map_err(|e| SourceError::Other { source_name: name.to_string(), problem: format!("engine thread: {e}") })?;
                prepared?;
                self.ready.send_replace(true);

                let fwd_tx = tx;
                let fwd_cancel = cancel.clone();
                let forwarder = tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = fwd_cancel.cancelled() => break,
                            r = repairs.recv() => match r {
                                Some(r) => {
                                    if fwd_tx.send(Msg::Repair(r)).is_err() {
                                        return;
                                    }
                                }
                                None => {
                                    fwd_cancel.cancelled().await;
                                    break;
                                }
                            },
                        }
                    }
                    let _ = fwd_tx.send(Msg::Stop);
                });

                let span = tracing::Span::current();
                let result = tokio::task::spawn_blocking(move || {
                    let _g = span.enter();
                    engine.run(rx)
                })
                .await
                .map_err(|e| SourceError::Other { source_name: name.to_string(), problem: format!("engine thread: {e}") })?;
                forwarder.abort();
                result
            }
            .instrument(span),
        )
    }
}
