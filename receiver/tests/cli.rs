//! The receiver binary's command line: configuration mistakes name the file, key and fix and
//! exit with status 2. (Also makes `cargo test` build the binary the end-to-end tests run.)

use std::process::Command;

fn run_with(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("receiver.toml");
    std::fs::write(&path, config).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_lockstep-receiver")).arg("run").arg("--config").arg(&path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_listen_address_names_the_key() {
    let (code, err) =
        run_with("id = \"eu-west\"\nlisten = \"not-an-address\"\ndata_dir = \"d\"\nadmin_listen = \"127.0.0.1:0\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("receiver.toml") && err.contains("line 2"), "{err}");
}

#[test]
fn missing_tls_section_is_reported() {
    let (code, err) =
        run_with("id = \"eu-west\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\nadmin_listen = \"127.0.0.1:0\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("receiver.toml") && err.contains("missing field `tls`"), "{err}");
}
