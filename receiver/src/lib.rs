//! lockstep-receiver: the standby-side daemon. A gRPC server with mutual TLS authenticates
//! agents by their certificates, maps (agent, source) to configured targets and applies their
//! changes in order; the admin endpoint serves `status`; metrics go to Prometheus.

pub mod applier;
pub mod metrics;
pub mod refusals;
pub mod server;
pub mod target;

use std::collections::BTreeMap;
use std::sync::Arc;

use lockstep_common::admin::{self, AdminRequest, AdminResponse};
use lockstep_common::config::ReceiverConfig;
use lockstep_common::proto::replication_server::ReplicationServer;
use lockstep_common::{tls, MAX_MESSAGE_BYTES};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::refusals::Refusals;
use crate::server::ReplicationService;
use crate::target::Target;

/// Runs the receiver until `shutdown` fires or the server fails.
pub async fn run(config: ReceiverConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data_dir {}", config.data_dir.display()))?;
    let targets: BTreeMap<(String, String), Arc<Target>> = config
        .targets
        .iter()
        .map(|t| ((t.agent.clone(), t.source.clone()), Arc::new(Target::new(t.clone(), &config.data_dir))))
        .collect();
    let targets = Arc::new(targets);

    let admin_listener = admin::bind(config.admin_listen).await?;
    if let Some(addr) = config.metrics_listen {
        if let Err(e) = lockstep_common::telemetry::init_metrics(addr) {
            anyhow::bail!("{e}; change metrics_listen or stop whatever holds the port");
        }
    }
    let id = config.id.clone();
    let handler: admin::Handler = {
        let targets = targets.clone();
        Arc::new(move |req: AdminRequest| {
            let targets = targets.clone();
            let id = id.clone();
            Box::pin(async move { admin_route(&id, &targets, req) })
        })
    };
    let admin_task = tokio::spawn(admin::serve(admin_listener, handler));

    let tls = tls::ServerTls::new(&config.tls).context("load TLS material")?;
    if let Some(problem) = tls::own_certificate_problem(&config.tls) {
        error!(error = %problem, "this receiver's certificate is not valid now; agents will refuse it");
    }
    Refusals::register_metrics();
    let refusals = Arc::new(Refusals::default());
    let service =
        ReplicationService { receiver_id: config.id.clone(), targets: targets.clone(), refusals: refusals.clone() };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind listen address {}", config.listen))?;
    info!(receiver = %config.id, listen = %listener.local_addr()?, targets = targets.len(), "receiver running");
    let incoming = accept_tls(listener, Arc::new(tls), refusals, shutdown.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ReplicationServer<ReplicationService>>().await;
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .initial_stream_window_size(Some(64 << 20))
        .initial_connection_window_size(Some(128 << 20))
        .add_service(health_service)
        .add_service(
            ReplicationServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await;
    admin_task.abort();
    result.context("gRPC server")?;
    Ok(())
}

/// Accepts connections and runs their TLS handshakes (each on a task of its own, so a slow
/// client holds up nobody), handing finished streams to tonic. A refused handshake is
/// counted and logged (see [`Refusals`]); a connection that goes away before a handshake (a
/// port probe) is not a refusal.
fn accept_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<tls::ServerTls>,
    refusals: Arc<Refusals>,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<tls::ServerStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, mostly: wait rather than spin.
                        warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (tls, refusals, tx) = (tls.clone(), refusals.clone(), tx.clone());
            tokio::spawn(async move {
                match tls.accept(tcp, peer).await {
                    Ok(stream) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(tls::AcceptError::Refused(problem)) => refusals.record(Some(peer), &problem),
                    Err(tls::AcceptError::Dropped(e)) => {
                        debug!(peer = %peer, error = %e, "connection closed before a TLS handshake")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The `status --json` document of a receiver.
pub fn status_json(id: &str, targets: &BTreeMap<(String, String), Arc<Target>>) -> serde_json::Value {
    serde_json::json!({
        "receiver": id,
        "targets": targets.values().map(|t| t.json()).collect::<Vec<_>>(),
    })
}

fn admin_route(id: &str, targets: &BTreeMap<(String, String), Arc<Target>>, req: AdminRequest) -> AdminResponse {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/status") => (200, status_json(id, targets)),
        _ => (404, serde_json::json!({"error": format!("no such admin route {} {}", req.method, req.path)})),
    }
}
