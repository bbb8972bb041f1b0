//! lockstep-agent: the source-side daemon. Sources capture changes into the journal; one
//! shipper per receiver streams the journal over gRPC + mutual TLS and tracks acknowledgements;
//! the admin endpoint serves `status`; metrics go to Prometheus.
//!
//! `run` is what `main` calls and what in-process tests call.

pub mod certs;
#[cfg(test)]
mod crash_test;
pub mod journal;
pub mod lag;
pub mod metrics;
pub mod shipper;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use lockstep_common::admin::{self, AdminRequest, AdminResponse};
use lockstep_common::config::AgentConfig;
use lockstep_common::event::{Seq, SourceKind};
use lockstep_common::now_us;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::journal::{JournalStore, JournalWriter, SledJournal};
use crate::lag::Tracker;
use crate::source::{Source, SourceContext, SourceHandle, SourceStatus};

/// Everything `status` reports, shared with the admin endpoint.
pub struct AgentState {
    pub id: String,
    pub store: Arc<dyn JournalStore>,
    pub sources: Vec<Arc<SourceHandle>>,
    pub tracker: Arc<Tracker>,
}

impl AgentState {
    /// The `status --json` document (see INTERFACE.md).
    pub fn status_json(&self) -> serde_json::Value {
        let receivers = self.tracker.snapshot(now_us());
        serde_json::json!({
            "agent": self.id,
            "journal": {
                "id": self.store.journal_id().to_string(),
                "first_seq": self.store.first_seq().0,
                "last_seq": self.store.last_seq().0,
                "bytes": self.store.bytes(),
            },
            "sources": self.sources.iter().map(|s| {
                let (state, err) = s.status.state();
                serde_json::json!({
                    "name": &*s.name,
                    "kind": s.kind.as_str(),
                    "state": state,
                    "last_seq": s.status.last_seq().0,
                    "events_captured": s.status.events(),
                    "error": err,
                    "sockets_skipped": (s.kind == SourceKind::Fs).then(|| s.status.sockets_skipped()),
                })
            }).collect::<Vec<_>>(),
            "receivers": receivers,
        })
    }
}

fn build_source(
    cfg: &lockstep_common::config::SourceConfig,
) -> anyhow::Result<(Box<dyn Source>, Arc<dyn source::Snapshotter>)> {
    match cfg.kind {
        SourceKind::Fs => {
            let s = source::fs::FsSource::new(cfg)?;
            let snap = s.snapshotter();
            Ok((Box::new(s), snap))
        }
        SourceKind::Postgres => {
            let s = source::pg::PgSource::new(cfg)?;
            let snap = s.snapshotter();
            Ok((Box::new(s), snap))
        }
        SourceKind::Sqlite => {
            let s = source::sqlite::SqliteSource::new(cfg)?;
            let snap = s.snapshotter();
            Ok((Box::new(s), snap))
        }
    }
}

/// Runs the agent until `shutdown` fires or a task fails. Returns an error if any long-lived
/// task ended unexpectedly (the caller exits non-zero so a supervisor restarts it).
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data_dir {}", config.data_dir.display()))?;
    if let Some(problem) = lockstep_common::tls::own_certificate_problem(&config.tls) {
        error!(error = %problem, "this agent's certificate is not valid now; receivers will refuse it");
    }
    let journal_dir = config.data_dir.join("journal");
    let sled_store = tokio::task::spawn_blocking(move || SledJournal::open(&journal_dir)).await??;
    let db = sled_store.db();
    let store: Arc<dyn JournalStore> = Arc::new(sled_store);
    info!(journal = %store.journal_id(), first = %store.first_seq(), last = %store.last_seq(), "journal open");

    let tracker = Arc::new(Tracker::new());
    {
        let st = store.clone();
        let metas = tokio::task::spawn_blocking(move || st.scan_meta()).await??;
        tracker.recorded(&metas);
    }
    let (durable_tx, mut durable_rx) = mpsc::unbounded_channel();
    let (writer, handle) = JournalWriter::new(store.clone(), durable_tx);

    let cancel = shutdown.child_token();
    let mut tasks: JoinSet<(String, anyhow::Result<()>)> = JoinSet::new();

    let resync_floor = Arc::new(source::ResyncFloor::new(store.clone()));
    let mut handles = Vec::new();
    let mut runnable = Vec::new();
    for sc in &config.sources {
        let (src, snapshotter) = build_source(sc)?;
        let status = Arc::new(SourceStatus::new(&sc.name, sc.kind));
        let (repair_tx, repairs) = mpsc::channel(4096);
        let h = Arc::new(SourceHandle {
            name: sc.name.as_str().into(),
            kind: sc.kind,
            status: status.clone(),
            snapshotter,
            repair_tx,
        });
        runnable.push((
            src,
            SourceContext {
                name: h.name.clone(),
                journal: handle.clone(),
                db: db.clone(),
                status,
                repairs,
                cancel: cancel.child_token(),
                resync_floor: resync_floor.clone(),
                data_dir: config.data_dir.clone(),
            },
        ));
        handles.push(h);
    }

    for r in &config.receivers {
        let names: Vec<String> = match &r.sources {
            Some(list) => list.clone(),
            None => config.sources.iter().map(|s| s.name.clone()).collect(),
        };
        let cursor = store
            .get_meta(&shipper::cursor_key(&r.name))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(|b| Seq(u64::from_be_bytes(b)))
            .unwrap_or(Seq::ZERO);
        tracker.add_receiver(&r.name, names, cursor);
    }

    let state = Arc::new(AgentState {
        id: config.id.clone(),
        store: store.clone(),
        sources: handles.clone(),
        tracker: tracker.clone(),
    });

    // Admin endpoint first: its address being taken is a configuration error worth failing on.
    let admin_listener = admin::bind(config.admin_listen).await?;
    if let Some(addr) = config.metrics_listen {
        if let Err(e) = lockstep_common::telemetry::init_metrics(addr) {
            anyhow::bail!("{e}; change metrics_listen or stop whatever holds the port");
        }
    }
    {
        let state = state.clone();
        let handler: admin::Handler = Arc::new(move |req: AdminRequest| {
            let state = state.clone();
            Box::pin(async move { admin_route(&state, req) })
        });
        let c = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = admin::serve(admin_listener, handler) => {}
                _ = c.cancelled() => {}
            }
            ("admin".to_string(), Ok(()))
        });
    }

    // Durable-record bookkeeping: lag state and metrics.
    {
        let tracker = tracker.clone();
        let store = store.clone();
        tasks.spawn(async move {
            while let Some(metas) = durable_rx.recv().await {
                tracker.recorded(&metas);
                for m in &metas {
                    ::metrics::counter!(metrics::EVENTS_CAPTURED_TOTAL, metrics::L_SOURCE => m.source.to_string())
                        .increment(1);
                }
                ::metrics::gauge!(metrics::JOURNAL_BYTES).set(store.bytes() as f64);
                ::metrics::gauge!(metrics::JOURNAL_LAST_SEQ).set(store.last_seq().0 as f64);
            }
            ("journal bookkeeping".to_string(), Ok(()))
        });
    }

    let writer_cancel = cancel.clone();
    tasks.spawn(async move {
        let r = writer.run().await.map_err(anyhow::Error::from);
        if r.is_ok() && !writer_cancel.is_cancelled() {
            return ("journal writer".to_string(), Err(anyhow::anyhow!("journal writer stopped")));
        }
        ("journal writer".to_string(), r)
    });

    for (src, ctx) in runnable {
        let name = format!("source {}", ctx.name);
        let c = cancel.clone();
        tasks.spawn(async move {
            let r = src.run(ctx).await;
            match r {
                Ok(()) if c.is_cancelled() => (name, Ok(())),
                Ok(()) => (name.clone(), Err(anyhow::anyhow!("{name} stopped unexpectedly"))),
                Err(e) => (name, Err(e.into())),
            }
        });
    }

    for r in &config.receivers {
        let wanted: Vec<Arc<SourceHandle>> = handles
            .iter()
            .filter(|h| r.sources.as_ref().is_none_or(|l| l.iter().any(|n| **n == *h.name)))
            .cloned()
            .collect();
        let shipper = shipper::Shipper {
            agent_id: config.id.clone(),
            endpoint: r.clone(),
            tls: config.tls.clone(),
            store: store.clone(),
            durable: handle.durable(),
            appended: handle.appended(),
            sources: wanted,
            tracker: tracker.clone(),
            heartbeat: config.heartbeat_interval,
            cancel: cancel.child_token(),
            resync_floor: resync_floor.clone(),
        };
        let name = format!("shipper {}", r.name);
        tasks.spawn(async move { (name, shipper.run().await.map_err(anyhow::Error::from)) });
    }
    // From here only the sources hold the journal: on a clean stop the writer finishes (and
    // flushes) once they have, instead of running into the shutdown timeout.
    drop(handle);

    // Journal housekeeping: drop what every receiver acknowledged; enforce the size cap.
    {
        let store = store.clone();
        let tracker = tracker.clone();
        let cap = config.journal.max_bytes;
        let c = cancel.clone();
        let has_receivers = !config.receivers.is_empty();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = c.cancelled() => return ("journal housekeeping".to_string(), Ok(())),
                }
                let r = housekeep(&*store, &tracker, cap, has_receivers);
                if let Err(e) = r {
                    return ("journal housekeeping".to_string(), Err(e));
                }
                let now = now_us();
                for rl in tracker.snapshot(now) {
                    for s in &rl.sources {
                        let labels = [(metrics::L_RECEIVER, rl.name.clone()), (metrics::L_SOURCE, s.name.clone())];
                        ::metrics::gauge!(metrics::LAG_SECONDS, &labels).set(s.lag_seconds);
                        ::metrics::gauge!(metrics::EVENTS_BEHIND, &labels).set(s.events_behind as f64);
                        ::metrics::gauge!(metrics::BYTES_BEHIND, &labels).set(s.bytes_behind as f64);
                    }
                }
            }
        });
    }

    info!(agent = %config.id, sources = config.sources.len(), receivers = config.receivers.len(), "agent running");
    let mut failure = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            done = tasks.join_next() => match done {
                None => break,
                Some(Ok((name, Ok(())))) => {
                    if !cancel.is_cancelled() {
                        info!(task = %name, "task finished");
                    }
                }
                Some(Ok((name, Err(e)))) => {
                    error!(task = %name, error = %format!("{e:#}"), "task failed; stopping the agent");
                    failure = Some(e.context(name));
                    break;
                }
                Some(Err(e)) => {
                    error!(error = %e, "task panicked; stopping the agent");
                    failure = Some(anyhow::anyhow!("task panicked: {e}"));
                    break;
                }
            }
        }
    }
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(done) = tasks.join_next().await {
            // A failure that lost the race to be reported first is still worth a line.
            if let Ok((name, Err(e))) = done {
                warn!(task = %name, error = %format!("{e:#}"), "task failed while the agent stopped");
            }
        }
    })
    .await;
    let st = store.clone();
    let _ = tokio::task::spawn_blocking(move || st.release_horizon()).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn housekeep(store: &dyn JournalStore, tracker: &Tracker, cap: u64, has_receivers: bool) -> anyhow::Result<()> {
    let first = store.first_seq();
    if has_receivers {
        if let Some(min) = tracker.min_committed() {
            if min >= first {
                store.truncate_through(min)?;
                tracker.truncated(min);
            }
        }
    }
    if store.bytes() > cap {
        // Drop the oldest records until under 90% of the cap; receivers still needing them
        // are resynced when they next connect.
        let target = cap / 10 * 9;
        let mut through = store.first_seq();
        let last = store.last_seq();
        while store.bytes() > target && through <= last {
            let step = Seq(through.0 + 1000).min(last);
            store.truncate_through(step)?;
            tracker.truncated(step);
            through = step.next();
        }
        let behind = tracker.behind(through);
        warn!(cap_bytes = cap, dropped_through = %through.prev(), receivers = ?behind,
            "journal size cap reached: dropped unacknowledged records; these receivers will be resynced");
    }
    Ok(())
}

fn admin_route(state: &AgentState, req: AdminRequest) -> AdminResponse {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/status") => (200, state.status_json()),
        _ => (404, serde_json::json!({"error": format!("no such admin route {} {}", req.method, req.path)})),
    }
}
