//! The agent binary's command line: configuration mistakes are reported with the file, the key
//! and the fix, and exit with status 2. (Also makes `cargo test` build the binary that the
//! end-to-end tests in `lockstep-tests` run as a child process.)

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep-agent"))
}

fn run_with(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = agent()
        .args(["certs", "--out"])
        .arg(&certs)
        .args(["--agent", "web-1", "--receiver", "eu-west"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let out = agent().arg("run").arg("--config").arg(&path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

const GOOD_HEAD: &str = r#"
id = "web-1"
data_dir = "data"
admin_listen = "127.0.0.1:0"
[tls]
ca = "certs/ca.pem"
cert = "certs/web-1.pem"
key = "certs/web-1.key"
"#;

#[test]
fn missing_source_path_names_file_key_and_fix() {
    let cfg = format!("{GOOD_HEAD}\n[[sources]]\nname = \"www\"\nkind = \"fs\"\npath = \"nope\"\n");
    let (code, err) = run_with(&cfg);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("agent.toml") && err.contains("sources[0].path") && err.contains("not a directory"), "{err}");
}

#[test]
fn unknown_key_is_refused_with_its_line() {
    let cfg = format!("{GOOD_HEAD}\nbogus = 1\n[[sources]]\nname = \"www\"\nkind = \"fs\"\npath = \"www\"\n");
    let (code, err) = run_with(&cfg);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("agent.toml") && err.contains("unknown field `bogus`") && err.contains("line"), "{err}");
}

#[test]
fn plaintext_endpoint_is_refused() {
    let cfg = format!(
        "{GOOD_HEAD}\n[[sources]]\nname = \"www\"\nkind = \"fs\"\npath = \"www\"\n[[receivers]]\nname = \"eu-west\"\nendpoint = \"http://127.0.0.1:7443\"\n"
    );
    let (code, err) = run_with(&cfg);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("receivers[0].endpoint") && err.contains("https://"), "{err}");
}

#[test]
fn missing_certificate_points_at_certs_command() {
    let cfg = GOOD_HEAD.replace("certs/web-1.pem", "certs/missing.pem")
        + "\n[[sources]]\nname = \"www\"\nkind = \"fs\"\npath = \"www\"\n";
    let (code, err) = run_with(&cfg);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tls.cert") && err.contains("lockstep-agent certs"), "{err}");
}

#[test]
fn duplicate_source_names_are_refused() {
    let cfg = format!("{GOOD_HEAD}\n[[sources]]\nname = \"www\"\nkind = \"fs\"\npath = \"www\"\n[[sources]]\nname = \"www\"\nkind = \"fs\"\npath = \"www\"\n");
    let (code, err) = run_with(&cfg);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sources[1].name") && err.contains("duplicate"), "{err}");
}
