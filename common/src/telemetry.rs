//! Logging and metrics setup shared by both daemons: `tracing` to stderr (text or JSON,
//! filtered by `RUST_LOG`), and the Prometheus exporter on `metrics_listen`.

use std::net::SocketAddr;
use std::sync::Once;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {s:?}; use text or json")),
        }
    }
}

static LOG_INIT: Once = Once::new();
static METRICS_INIT: Once = Once::new();

/// Installs the global `tracing` subscriber once per process (later calls do nothing).
pub fn init_logging(format: LogFormat) {
    LOG_INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        let _ = match format {
            LogFormat::Text => b.try_init(),
            LogFormat::Json => b.json().try_init(),
        };
    });
}

/// Serves Prometheus text format at `http://addr/metrics`. Installs the global recorder once
/// per process; must be called inside a tokio runtime.
pub fn init_metrics(addr: SocketAddr) -> Result<(), String> {
    let mut result = Ok(());
    METRICS_INIT.call_once(|| {
        result = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("metrics exporter on {addr}: {e}"));
    });
    result
}
