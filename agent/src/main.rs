//! `lockstep-agent`: parses flags, loads config, starts telemetry and calls
//! `lockstep_agent::run`. Exit status: 0 done, 1 the operation failed, 2 bad usage or config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lockstep_common::config::AgentConfig;
use lockstep_common::telemetry::{self, LogFormat};

/// `--version`; a build with test failpoints says so, so a binary can be checked for them.
const VERSION: &str = if cfg!(feature = "failpoints") {
    concat!(env!("CARGO_PKG_VERSION"), " (test failpoints compiled in: not for production)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Parser)]
#[command(name = "lockstep-agent", version = VERSION, about = "lockstep source agent: capture, journal and ship changes")]
struct Cli {
    /// Log format on stderr: text or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show journal, sources and per-receiver lag of the running agent.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write a development CA and certificates (ca.pem, ca.key, ID.pem, ID.key) into DIR.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// The agent's id.
        #[arg(long)]
        agent: String,
        /// A receiver's id (repeatable).
        #[arg(long = "receiver", required = true)]
        receivers: Vec<String>,
        /// Extra DNS name for every certificate (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

fn load(path: &std::path::Path) -> Result<AgentConfig, ExitCode> {
    AgentConfig::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(e) = lockstep_common::config::check_tls_material(&config, &cfg.tls) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            // Test builds only: failpoints named in FAILPOINTS (e.g.
            // `journal::hold_flushes=return(30000)`) stay configured while this guard lives,
            // i.e. until the daemon stops.
            #[cfg(feature = "failpoints")]
            let _failpoints = {
                tracing::warn!(failpoints = %std::env::var("FAILPOINTS").unwrap_or_default(), "built with test failpoints");
                fail::FailScenario::setup()
            };
            lockstep_common::daemon::run_until_signal(|shutdown| async move {
                lockstep_agent::run(cfg, shutdown).await.map_err(|e| format!("{e:#}"))
            })
        }
        Cmd::Status { config, json } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            lockstep_common::daemon::status(cfg.admin_listen, |v| {
                if json {
                    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
                } else {
                    print_status(v);
                }
            })
        }
        Cmd::Certs { out, agent, receivers, hosts } => {
            let mut ids = vec![agent];
            ids.extend(receivers);
            match lockstep_agent::certs::generate(&out, &ids, &hosts) {
                Ok(()) => {
                    println!("wrote ca.pem, ca.key and {} certificate/key pairs to {}", ids.len(), out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn print_status(v: &serde_json::Value) {
    let j = &v["journal"];
    println!("agent {}  journal last_seq {}  bytes {}", v["agent"].as_str().unwrap_or("?"), j["last_seq"], j["bytes"]);
    for s in v["sources"].as_array().into_iter().flatten() {
        println!(
            "  source {:<16} {:<8} {:<10} last_seq {}",
            s["name"].as_str().unwrap_or(""),
            s["kind"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["last_seq"]
        );
    }
    for r in v["receivers"].as_array().into_iter().flatten() {
        println!(
            "  receiver {:<14} {:<12} acked {}  lag {:.3}s  behind {} events / {} bytes{}",
            r["name"].as_str().unwrap_or(""),
            if r["connected"].as_bool() == Some(true) { "connected" } else { "disconnected" },
            r["acked_seq"],
            r["lag_seconds"].as_f64().unwrap_or(0.0),
            r["events_behind"],
            r["bytes_behind"],
            r["last_error"].as_str().map(|e| format!("  last error: {e}")).unwrap_or_default()
        );
    }
}
