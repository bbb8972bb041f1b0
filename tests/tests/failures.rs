//! Failures an operator must be able to read, end to end with the real binaries: an agent
//! certificate from another CA, an expired certificate, a receiver certificate without the
//! name the agent expects, an agent the receiver has no target for, and a standby that cannot
//! write. Each shows its cause and fix in the agent's `status`, is retried slowly (a retry
//! cannot fix it), is counted by reason on the receiver, and replication resumes once it is
//! fixed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lockstep_tests::Setup;

const CONVERGE: Duration = Duration::from_secs(60);

/// Gives the receiver a metrics endpoint; returns its address.
fn receiver_metrics(s: &Setup) -> Result<SocketAddr> {
    let addr = SocketAddr::from(([127, 0, 0, 1], lockstep_tests::free_port()));
    let cfg = std::fs::read_to_string(&s.receiver_cfg)?;
    std::fs::write(&s.receiver_cfg, format!("metrics_listen = \"{addr}\"\n{cfg}"))?;
    Ok(addr)
}

/// The receiver's count of handshakes refused for `reason`.
fn refused(metrics: SocketAddr, reason: &str) -> u64 {
    let text = lockstep_tests::http_get(metrics, "/metrics").unwrap_or_default();
    let series = format!("lockstep_receiver_handshakes_refused_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn edit(path: &Path, from: &str, to: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    if !text.contains(from) {
        bail!("{} does not contain {from:?}", path.display());
    }
    std::fs::write(path, text.replace(from, to))?;
    Ok(())
}

/// Waits until the agent's first receiver shows a `last_error` for which `want` holds.
fn wait_error(s: &Setup, timeout: Duration, want: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(st) = s.agent_status() {
            last = st["receivers"][0]["last_error"].as_str().unwrap_or_default().to_string();
            if want(&last) {
                return Ok(last);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the agent never showed the expected error within {timeout:?}; last: {last:?}\n{}", s.logs_tail())
}

/// A certificate authority made here, and the certificates it signs.
struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A new CA, written to `dir`/ca.pem.
    fn new(dir: &Path) -> Result<Pki> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        std::fs::write(dir.join("ca.pem"), params.self_signed(&key)?.pem())?;
        Ok(Pki { issuer: rcgen::Issuer::new(params, key) })
    }

    /// `dir`/`id`.pem and .key, naming `id` and localhost, valid from `from` until `until`.
    fn issue(&self, dir: &Path, id: &str, from: (i32, u8, u8), until: (i32, u8, u8)) -> Result<()> {
        use rcgen::{date_time_ymd, CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![id.to_string(), "localhost".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = date_time_ymd(from.0, from.1, from.2);
        params.not_after = date_time_ymd(until.0, until.1, until.2);
        std::fs::write(dir.join(format!("{id}.pem")), params.signed_by(&key, &self.issuer)?.pem())?;
        std::fs::write(dir.join(format!("{id}.key")), key.serialize_pem())?;
        Ok(())
    }
}

#[test]
fn a_certificate_from_another_ca_is_named_retried_slowly_and_the_receiver_keeps_serving() -> Result<()> {
    let mut s = Setup::new()?;
    let metrics = receiver_metrics(&s)?;
    std::fs::write(s.src.join("a.txt"), b"replicated once the certificate is right")?;
    // Another `lockstep-agent certs` run: a CA of the same name, other keys.
    let foreign = s.root().join("foreign");
    lockstep_agent::certs::generate(&foreign, &["web-1".into()], &["localhost".into()]).map_err(anyhow::Error::msg)?;
    let right = "cert = \"certs/web-1.pem\"\nkey = \"certs/web-1.key\"";
    let wrong = "cert = \"foreign/web-1.pem\"\nkey = \"foreign/web-1.key\"";
    edit(&s.agent_cfg, right, wrong)?;
    s.start()?;
    let started = Instant::now();
    // (A connection refused while the receiver starts is transient, and retried at once.)
    let err = wait_error(&s, Duration::from_secs(20), |e| e.starts_with("unknown CA"))?;
    assert!(err.starts_with("unknown CA: receiver eu-west"), "{err}");
    assert!(err.contains("not signed by the CA in the receiver's tls.ca"), "{err}");
    assert!(err.contains(&foreign.join("web-1.pem").display().to_string()), "names the agent's tls.cert: {err}");
    assert!(err.ends_with("; retrying every 30 s"), "{err}");
    // A retry cannot fix it, so the agent does not hammer: over its first 10 s, the receiver
    // saw it at most twice.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()));
    let n = refused(metrics, "unknown_ca");
    assert!((1..=2).contains(&n), "{n} refused handshakes in 10 s\n{}", s.logs_tail());
    assert!(s.logs_contain("connection refused") && s.logs_contain("CN=web-1"), "{}", s.logs_tail());
    assert!(s.logs_contain("needs a person to act"), "the agent logs it as an error\n{}", s.logs_tail());
    assert_eq!(refused(metrics, "unknown_agent"), 0);

    // The whole foreign set (its CA too): now the agent refuses the receiver's certificate,
    // and the receiver counts that by its own reason.
    s.kill_agent();
    edit(&s.agent_cfg, "ca = \"certs/ca.pem\"", "ca = \"foreign/ca.pem\"")?;
    s.start_agent()?;
    let err = wait_error(&s, Duration::from_secs(20), |e| e.contains("receiver eu-west's certificate"))?;
    assert!(err.starts_with("unknown CA: receiver eu-west's certificate (subject \"CN=eu-west\""), "{err}");
    assert!(err.contains("is not signed by the CA in tls.ca"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(metrics, "refused_by_peer") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused(metrics, "refused_by_peer") >= 1, "{}", s.logs_tail());
    assert!(s.logs_contain("an agent refused this receiver's certificate"), "{}", s.logs_tail());

    // The receiver kept serving: the agent with the right certificates replicates.
    s.kill_agent();
    edit(&s.agent_cfg, "ca = \"foreign/ca.pem\"", "ca = \"certs/ca.pem\"")?;
    edit(&s.agent_cfg, wrong, right)?;
    s.start_agent()?;
    s.wait_converged(CONVERGE)?;
    assert!(s.agent_status()?["receivers"][0]["last_error"].is_null());
    Ok(())
}

#[test]
fn an_expired_agent_certificate_is_named_with_its_date() -> Result<()> {
    let mut s = Setup::new()?;
    let metrics = receiver_metrics(&s)?;
    // A PKI of our own: the receiver's certificate is fine, the agent's expired in 2020.
    let certs = s.root().join("certs");
    let pki = Pki::new(&certs)?;
    pki.issue(&certs, "eu-west", (2000, 1, 1), (4000, 1, 1))?;
    pki.issue(&certs, "web-1", (2019, 1, 1), (2020, 1, 2))?;
    s.start()?;
    let err = wait_error(&s, Duration::from_secs(20), |e| e.starts_with("certificate expired"))?;
    assert!(err.starts_with("certificate expired: receiver eu-west refused this agent's certificate"), "{err}");
    assert!(err.contains("it expired at 2020-01-02T00:00:00Z"), "{err}");
    assert!(err.ends_with("; retrying every 30 s"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(metrics, "expired") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused(metrics, "expired") >= 1, "{}", s.logs_tail());
    assert!(s.logs_contain("expired at 2020-01-02T00:00:00Z"), "the receiver's log names the date\n{}", s.logs_tail());
    assert!(s.logs_contain("this agent's certificate is not valid now"), "said at start-up\n{}", s.logs_tail());
    Ok(())
}

#[test]
fn a_receiver_certificate_without_the_expected_name_names_both() -> Result<()> {
    let mut s = Setup::new()?;
    let metrics = receiver_metrics(&s)?;
    // The last table of agent.toml is the receiver's entry.
    let mut cfg = std::fs::read_to_string(&s.agent_cfg)?;
    cfg.push_str("server_name = \"standby.example\"\n");
    std::fs::write(&s.agent_cfg, cfg)?;
    s.start()?;
    let err = wait_error(&s, Duration::from_secs(20), |e| e.starts_with("name mismatch"))?;
    assert!(err.starts_with("name mismatch: receiver eu-west's certificate"), "{err}");
    assert!(err.contains("carries the DNS names [\"eu-west\", \"localhost\"]"), "names found: {err}");
    assert!(err.contains("this agent expects \"standby.example\""), "name expected: {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(metrics, "refused_by_peer") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(refused(metrics, "refused_by_peer"), 1, "{}", s.logs_tail());
    assert!(s.logs_contain("most often a name mismatch"), "{}", s.logs_tail());
    Ok(())
}

#[test]
fn an_agent_without_a_target_is_told_what_to_add_and_counted() -> Result<()> {
    let mut s = Setup::new()?;
    let metrics = receiver_metrics(&s)?;
    // A valid certificate, but the receiver maps nothing of agent "us-east".
    edit(&s.agent_cfg, "id = \"web-1\"", "id = \"us-east\"")?;
    edit(&s.agent_cfg, "certs/web-1.", "certs/us-east.")?;
    s.start()?;
    let err = wait_error(&s, Duration::from_secs(20), |e| e.contains("no target"))?;
    assert!(err.contains("has no target for agent \"us-east\" source \"www\""), "{err}");
    assert!(err.contains("add a [[targets]] entry"), "{err}");
    assert!(err.ends_with("; retrying every 30 s"), "{err}");
    assert_eq!(refused(metrics, "unknown_agent"), 1, "{}", s.logs_tail());
    Ok(())
}

/// A receiver started with a file size limit (`ulimit -f`) of `limit` bytes; killed on drop.
struct Limited(std::process::Child);

impl Limited {
    fn start(s: &Setup, limit: u64) -> Result<Limited> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(s.root().join("receiver.limited.log"))?;
        let mut cmd = std::process::Command::new(lockstep_tests::bin("lockstep-receiver"));
        cmd.arg("run")
            .arg("--config")
            .arg(&s.receiver_cfg)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A write past the limit then fails with EFBIG instead of killing the process
                // (an ignored signal stays ignored across exec).
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit { rlim_cur: limit, rlim_max: libc::RLIM_INFINITY };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Limited(cmd.spawn()?))
    }

    /// Lifts the limit of the running receiver.
    fn lift(&self) -> Result<()> {
        let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: plain system call on a pid we own, with valid pointers.
        if unsafe { libc::prlimit(self.0.id() as libc::pid_t, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) } != 0 {
            bail!("prlimit: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The standby cannot write a file (here: past the receiver's file size limit, which fails
/// like a full disk does, with an error a retry cannot fix): the receiver sends the cause to
/// the agent, whose status names it with the fix; once the limit is lifted the standby
/// catches up by itself, identical. The disk-full message itself (ENOSPC) is covered by the
/// policy's unit tests: filling a real filesystem needs a mount, which CI may not allow.
#[test]
fn a_standby_that_cannot_write_reaches_the_agents_status_and_recovers() -> Result<()> {
    let mut s = Setup::new()?;
    std::fs::write(s.src.join("small.txt"), b"fits")?;
    let receiver = Limited::start(&s, 2 << 20)?;
    s.start_agent()?;
    s.wait_converged(CONVERGE)?;
    let big: Vec<u8> = (0..(8u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(s.src.join("big.bin"), &big)?;
    let err = wait_error(&s, Duration::from_secs(30), |e| e.contains("File too large"))?;
    assert!(err.starts_with("receiver eu-west: target www:"), "{err}");
    assert!(err.contains("raise the receiver's file size limit"), "the fix: {err}");
    assert!(err.contains("replication resumes by itself; retrying every 30 s"), "{err}");
    let rs = s.receiver_status()?;
    let target_err = rs["targets"][0]["last_error"].as_str().unwrap_or_default();
    assert!(target_err.contains("File too large"), "{rs}");
    assert!(s.logs_contain("session ended by a failure retrying cannot fix"), "logged as an error\n{}", s.logs_tail());
    receiver.lift()?;
    s.wait_converged(CONVERGE)?;
    assert_eq!(std::fs::read(s.dst.join("big.bin"))?, big);
    Ok(())
}

/// `run` refuses TLS files it cannot use at start-up, naming the config file, the key and the
/// path (exit 2); `status` does not need them.
#[test]
fn unusable_tls_files_are_refused_at_start_up_naming_the_key_and_the_path() -> Result<()> {
    let s = Setup::new()?;
    let run = |binary: &str, cfg: &Path| -> Result<(Option<i32>, String)> {
        let out = std::process::Command::new(lockstep_tests::bin(binary))
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok((out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    // The agent's key belongs to another certificate.
    edit(&s.agent_cfg, "key = \"certs/web-1.key\"", "key = \"certs/eu-west.key\"")?;
    let (code, err) = run("lockstep-agent", &s.agent_cfg)?;
    assert_eq!(code, Some(2), "{err}");
    let want = format!(
        "config {}: tls.key: {} is not the key of the certificate in tls.cert {}",
        s.agent_cfg.display(),
        s.root().join("certs/eu-west.key").display(),
        s.root().join("certs/web-1.pem").display()
    );
    assert!(err.contains(&want), "{err}");
    // The receiver's CA file is not PEM.
    std::fs::write(s.root().join("certs/ca.pem"), "not a certificate")?;
    let (code, err) = run("lockstep-receiver", &s.receiver_cfg)?;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("config {}: tls.ca: ", s.receiver_cfg.display())), "{err}");
    assert!(err.contains("holds no PEM CERTIFICATE block"), "{err}");
    Ok(())
}
