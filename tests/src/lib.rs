//! Test harness for lockstep's end-to-end, fault-injection and benchmark runs: real binaries
//! as child processes (so they can be killed with SIGKILL), real certificates, real TLS and
//! gRPC on loopback, real files in temp dirs, and a tree comparison that checks content, modes,
//! symlinks and empty directories.

pub mod measure;
pub mod proxy;
pub mod tree;

/// The PostgreSQL cluster harness and free ports live in `lockstep-testkit`, shared with the
/// receiver's unit tests.
pub use lockstep_testkit::{free_port, pg};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Directory holding the built `lockstep-agent` and `lockstep-receiver` binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace --bins` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// Fails unless the built `lockstep-agent` has the test failpoints compiled in (its
/// `failpoints` feature), for tests that configure them through `FAILPOINTS`: without them the
/// agent would ignore the variable and such a test would prove nothing.
pub fn require_agent_failpoints() -> Result<()> {
    let out = Command::new(bin("lockstep-agent")).arg("--version").output()?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !version.contains("test failpoints compiled in") {
        bail!(
            "{} was built without test failpoints ({}); build it with `cargo test --workspace` or \
             `cargo build -p lockstep-agent --features failpoints`",
            bin("lockstep-agent").display(),
            version.trim()
        );
    }
    Ok(())
}

/// A replication setup on this host: one agent watching `src`, one receiver applying to
/// `dst`, dev certificates, configs — and the processes, started on demand.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub agent_cfg: PathBuf,
    pub receiver_cfg: PathBuf,
    pub agent_admin: SocketAddr,
    pub receiver_admin: SocketAddr,
    pub receiver_listen: SocketAddr,
    pub agent_metrics: SocketAddr,
    pub receiver2_cfg: PathBuf,
    pub dst2: PathBuf,
    /// Extra environment for the agent process from its next start on.
    pub agent_env: Vec<(String, String)>,
    agent: Option<Child>,
    receiver: Option<Child>,
    receiver2: Option<Child>,
    starts: u32,
}

/// Options for [`Setup::new`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Extra lines for the agent's `[[sources]]` entry.
    pub source_extra: String,
    /// Extra top-level lines for agent.toml (before any table).
    pub agent_extra: String,
    /// Endpoint the agent dials instead of the receiver's own port (e.g. a proxy).
    pub via: Option<SocketAddr>,
    /// Add a second receiver, "us-east", applying to `standby2` (started separately).
    pub second_receiver: bool,
}

impl Setup {
    pub fn new() -> Result<Setup> {
        Self::with(Options::default())
    }

    pub fn with(opts: Options) -> Result<Setup> {
        let dir = tempfile::Builder::new().prefix("lockstep-test-").tempdir()?;
        let root = dir.path();
        let src = root.join("src");
        let dst = root.join("standby");
        std::fs::create_dir_all(&src)?;
        let certs = root.join("certs");
        lockstep_agent::certs::generate(
            &certs,
            &["web-1".into(), "eu-west".into(), "us-east".into()],
            &["localhost".into()],
        )
        .map_err(anyhow::Error::msg)?;
        let port = |_: ()| SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (agent_admin, receiver_admin, receiver_listen, agent_metrics) = (port(()), port(()), port(()), port(()));
        let (receiver2_listen, receiver2_admin) = (port(()), port(()));
        let endpoint = opts.via.unwrap_or(receiver_listen);
        let agent_cfg = root.join("agent.toml");
        std::fs::write(
            &agent_cfg,
            format!(
                r#"id = "web-1"
data_dir = "agent-data"
admin_listen = "{agent_admin}"
metrics_listen = "{agent_metrics}"
heartbeat_interval = "500ms"
{extra}
[tls]
ca = "certs/ca.pem"
cert = "certs/web-1.pem"
key = "certs/web-1.key"

[[sources]]
name = "www"
kind = "fs"
path = "src"
{source_extra}

[[receivers]]
name = "eu-west"
endpoint = "https://{endpoint}"
{second}"#,
                extra = opts.agent_extra,
                source_extra = opts.source_extra,
                second = if opts.second_receiver {
                    format!("\n[[receivers]]\nname = \"us-east\"\nendpoint = \"https://{receiver2_listen}\"\n")
                } else {
                    String::new()
                }
            ),
        )?;
        let receiver2_cfg = root.join("receiver2.toml");
        let dst2 = root.join("standby2");
        std::fs::write(
            &receiver2_cfg,
            format!(
                r#"id = "us-east"
listen = "{receiver2_listen}"
data_dir = "receiver2-data"
admin_listen = "{receiver2_admin}"

[tls]
ca = "certs/ca.pem"
cert = "certs/us-east.pem"
key = "certs/us-east.key"

[[targets]]
agent = "web-1"
source = "www"
kind = "fs"
path = "standby2"
"#
            ),
        )?;
        let receiver_cfg = root.join("receiver.toml");
        std::fs::write(
            &receiver_cfg,
            format!(
                r#"id = "eu-west"
listen = "{receiver_listen}"
data_dir = "receiver-data"
admin_listen = "{receiver_admin}"

[tls]
ca = "certs/ca.pem"
cert = "certs/eu-west.pem"
key = "certs/eu-west.key"

[[targets]]
agent = "web-1"
source = "www"
kind = "fs"
path = "standby"
"#
            ),
        )?;
        Ok(Setup {
            dir,
            src,
            dst,
            agent_cfg,
            receiver_cfg,
            agent_admin,
            receiver_admin,
            receiver_listen,
            agent_metrics,
            agent: None,
            receiver: None,
            receiver2: None,
            receiver2_cfg,
            dst2,
            starts: 0,
            agent_env: Vec::new(),
        })
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a sqlite source "app" following `app/app.db` (`source_extra`: more lines for its
    /// `[[sources]]` entry) and its target applying to `standby-app/app.db`; returns
    /// (source database, standby database). The directories exist; the databases do not.
    pub fn add_sqlite(&self, source_extra: &str) -> Result<(PathBuf, PathBuf)> {
        let src = self.root().join("app").join("app.db");
        let dst = self.root().join("standby-app").join("app.db");
        std::fs::create_dir_all(src.parent().expect("parent"))?;
        std::fs::create_dir_all(dst.parent().expect("parent"))?;
        let mut a = std::fs::read_to_string(&self.agent_cfg)?;
        a.push_str(&format!(
            "\n[[sources]]\nname = \"app\"\nkind = \"sqlite\"\npath = \"{}\"\n{source_extra}\n",
            src.display()
        ));
        std::fs::write(&self.agent_cfg, a)?;
        let mut r = std::fs::read_to_string(&self.receiver_cfg)?;
        r.push_str(&format!(
            "\n[[targets]]\nagent = \"web-1\"\nsource = \"app\"\nkind = \"sqlite\"\npath = \"{}\"\n",
            dst.display()
        ));
        std::fs::write(&self.receiver_cfg, r)?;
        Ok((src, dst))
    }

    fn spawn(&mut self, binary: &str, cfg: &Path, log: &str, env: &[(String, String)]) -> Result<Child> {
        self.starts += 1;
        let log_path = self.root().join(format!("{log}.{}.log", self.starts));
        let log = std::fs::File::create(&log_path)?;
        Command::new(bin(binary))
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .env("RUST_LOG", std::env::var("LOCKSTEP_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {binary}"))
    }

    pub fn start_agent(&mut self) -> Result<()> {
        assert!(self.agent.is_none(), "agent already running");
        let cfg = self.agent_cfg.clone();
        self.agent = Some(self.spawn("lockstep-agent", &cfg, "agent", &self.agent_env.clone())?);
        Ok(())
    }

    pub fn start_receiver(&mut self) -> Result<()> {
        assert!(self.receiver.is_none(), "receiver already running");
        let cfg = self.receiver_cfg.clone();
        self.receiver = Some(self.spawn("lockstep-receiver", &cfg, "receiver", &[])?);
        Ok(())
    }

    pub fn start_receiver2(&mut self) -> Result<()> {
        assert!(self.receiver2.is_none(), "receiver2 already running");
        let cfg = self.receiver2_cfg.clone();
        self.receiver2 = Some(self.spawn("lockstep-receiver", &cfg, "receiver2", &[])?);
        Ok(())
    }

    pub fn start(&mut self) -> Result<()> {
        self.start_receiver()?;
        self.start_agent()
    }

    /// CPU seconds (user, system) the running agent and receiver have used so far, from
    /// `/proc` (all their threads); `None` for one not running.
    pub fn daemon_cpu(&self) -> [Option<(f64, f64)>; 2] {
        let cpu = |c: &Option<Child>| {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.as_ref()?.id())).ok()?;
            // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            Some((f.get(11)?.parse::<f64>().ok()? / tick, f.get(12)?.parse::<f64>().ok()? / tick))
        };
        [cpu(&self.agent), cpu(&self.receiver)]
    }

    fn kill(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Stops the agent cleanly (SIGTERM) and waits for it to exit.
    pub fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// kill -9 the agent.
    pub fn kill_agent(&mut self) {
        Self::kill(&mut self.agent);
    }

    /// kill -9 the receiver.
    pub fn kill_receiver(&mut self) {
        Self::kill(&mut self.receiver);
    }

    /// Fails if a daemon has exited on its own.
    pub fn check_alive(&mut self) -> Result<()> {
        let mut dead = None;
        for (name, c) in [("agent", &mut self.agent), ("receiver", &mut self.receiver)] {
            if let Some(child) = c {
                if let Some(st) = child.try_wait()? {
                    dead = Some(format!("{name} exited on its own with {st}"));
                }
            }
        }
        match dead {
            Some(d) => bail!("{d}; logs:\n{}", self.logs_tail()),
            None => Ok(()),
        }
    }

    /// Whether any daemon log (of any start) contains `needle`.
    pub fn logs_contain(&self, needle: &str) -> bool {
        std::fs::read_dir(self.root()).into_iter().flatten().filter_map(|e| e.ok()).any(|e| {
            let p = e.path();
            p.extension().is_some_and(|x| x == "log")
                && std::fs::read_to_string(&p).is_ok_and(|text| text.contains(needle))
        })
    }

    /// The last lines of every daemon log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<_> = std::fs::read_dir(self.root())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("==> {} <==\n", p.display()));
            for l in &lines[lines.len().saturating_sub(30)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn agent_status(&self) -> Result<serde_json::Value> {
        admin_get(self.agent_admin, "/status")
    }

    pub fn receiver_status(&self) -> Result<serde_json::Value> {
        admin_get(self.receiver_admin, "/status")
    }

    /// Waits until the agent reports its first receiver caught up: connected, no resync under
    /// way (the receiver has committed every snapshot it was sent), nothing behind.
    pub fn wait_caught_up(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let st = self.agent_status().ok();
            if st.as_ref().is_some_and(receiver_caught_up) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not report the receiver caught up within {timeout:?}
agent status: {}
{}",
                    st.map(|v| v.to_string()).unwrap_or_default(),
                    self.logs_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the standby equals the source tree and the agent reports nothing behind.
    pub fn wait_converged(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_diff;
        loop {
            self.check_alive()?;
            if self.agent_status().ok().as_ref().is_some_and(receiver_caught_up) {
                match tree::diff(&self.src, &self.dst) {
                    Ok(d) if d.is_empty() => return Ok(()),
                    Ok(d) => last_diff = d.join("\n"),
                    Err(e) => last_diff = e.to_string(),
                }
            } else {
                last_diff = "agent not caught up".into();
            }
            if Instant::now() > deadline {
                bail!(
                    "standby did not converge within {timeout:?}:\n{last_diff}\nagent status: {}\n{}",
                    self.agent_status().map(|v| v.to_string()).unwrap_or_else(|e| e.to_string()),
                    self.logs_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        Self::kill(&mut self.agent);
        Self::kill(&mut self.receiver);
        Self::kill(&mut self.receiver2);
        if std::thread::panicking() || std::env::var_os("LOCKSTEP_KEEP").is_some() {
            eprintln!("{}", self.logs_tail());
            let path = self.dir.path().to_path_buf();
            eprintln!("keeping test dir {}", path.display());
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")));
        }
    }
}

/// Whether an agent status shows its first receiver connected, with no resync under way (the
/// receiver has committed every snapshot it was sent) and nothing behind.
pub fn receiver_caught_up(agent_status: &serde_json::Value) -> bool {
    let r = &agent_status["receivers"][0];
    r["connected"] == true && r["events_behind"] == 0 && r["resyncing"].is_null()
}

/// GET an admin path (blocking; for tests and benches).
pub fn admin_get(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (code, v) = rt.block_on(lockstep_common::admin::call(addr, "GET", path, None, Duration::from_secs(5)))?;
    if code != 200 {
        bail!("admin {path} answered {code}: {v}");
    }
    Ok(v)
}

/// Plain HTTP GET of a path (for the Prometheus endpoint).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}
