//! lockstep-receiver: the standby-side daemon. A gRPC server with mutual TLS authenticates
//! agents by their certificates, maps (agent, source) to configured targets and applies their
//! changes in order; the admin endpoint serves `status`; metrics go to Prometheus.

pub mod applier;
pub mod metrics;
pub mod server;
pub mod target;

use std::collections::BTreeMap;
use std::sync::Arc;

use lockstep_common::admin::{self, AdminRequest, AdminResponse};
use lockstep_common::config::ReceiverConfig;
use lockstep_common::proto::replication_server::ReplicationServer;
use lockstep_common::{tls, MAX_MESSAGE_BYTES};
use tokio_util::sync::CancellationToken;
use tracing::info;

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

    let tls = tls::server_config(&config.tls).context("load TLS material")?;
    let service = ReplicationService { receiver_id: config.id.clone(), targets: targets.clone() };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind listen address {}", config.listen))?;
    info!(receiver = %config.id, listen = %listener.local_addr()?, targets = targets.len(), "receiver running");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ReplicationServer<ReplicationService>>().await;
    let result = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("configure TLS")?
        .tcp_nodelay(true)
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
