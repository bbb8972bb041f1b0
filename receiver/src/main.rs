//! `lockstep-receiver`: parses flags, loads config, starts telemetry and calls
//! `lockstep_receiver::run`. Exit status: 0 done, 1 the operation failed, 2 bad usage or config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lockstep_common::config::ReceiverConfig;
use lockstep_common::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(name = "lockstep-receiver", version, about = "lockstep receiver: apply replicated changes to standby copies")]
struct Cli {
    /// Log format on stderr: text or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the receiver daemon.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show each target's applied position and connection state.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn load(path: &std::path::Path) -> Result<ReceiverConfig, ExitCode> {
    ReceiverConfig::load(path).map_err(|e| {
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
            lockstep_common::daemon::run_until_signal(|shutdown| async move {
                lockstep_receiver::run(cfg, shutdown).await.map_err(|e| format!("{e:#}"))
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
                    println!("receiver {}", v["receiver"].as_str().unwrap_or("?"));
                    for t in v["targets"].as_array().into_iter().flatten() {
                        println!(
                            "  {}/{} ({}) -> {}  {}  committed {}  applied {} events{}",
                            t["agent"].as_str().unwrap_or(""),
                            t["source"].as_str().unwrap_or(""),
                            t["kind"].as_str().unwrap_or(""),
                            t["path"].as_str().unwrap_or("-"),
                            if t["connected"].as_bool() == Some(true) { "connected" } else { "disconnected" },
                            t["committed_seq"],
                            t["events_applied"],
                            t["last_error"].as_str().map(|e| format!("  last error: {e}")).unwrap_or_default()
                        );
                    }
                }
            })
        }
    }
}
