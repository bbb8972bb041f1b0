//! The bar for directory replication: a seeded random workload (creates, appends, mid-file
//! overwrites, truncates, renames of files and directories, deletes, chmod, symlinks, atomic
//! replace-by-rename) while the receiver and the agent are each killed with SIGKILL
//! mid-stream; afterwards the standby must be byte-identical, modes and links included.
//! Replay a failure with LOCKSTEP_SEED=<seed printed below>.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep_tests::{tree, Setup};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn pick(rng: &mut StdRng, root: &Path, want_dir: Option<bool>) -> Option<PathBuf> {
    let entries = tree::scan(root).ok()?;
    let cands: Vec<&PathBuf> = entries
        .iter()
        .filter(|(_, e)| match want_dir {
            Some(true) => matches!(e, tree::Entry::Dir { .. }),
            Some(false) => matches!(e, tree::Entry::File { .. }),
            None => true,
        })
        .map(|(p, _)| p)
        .collect();
    if cands.is_empty() {
        return None;
    }
    Some(root.join(cands[rng.random_range(0..cands.len())]))
}

fn random_dir(rng: &mut StdRng, root: &Path) -> PathBuf {
    if rng.random_bool(0.3) {
        root.to_path_buf()
    } else {
        pick(rng, root, Some(true)).unwrap_or_else(|| root.to_path_buf())
    }
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..10) {
        0 => 0,
        1..=6 => rng.random_range(1..4096),
        7 | 8 => rng.random_range(4096..200_000),
        _ => rng.random_range(200_000..3_000_000),
    };
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// One random filesystem operation; errors (a path vanished under a race) are ignored.
fn op(rng: &mut StdRng, root: &Path, n: &mut u64) {
    *n += 1;
    let name = format!("n{n}");
    let _ = (|| -> std::io::Result<()> {
        match rng.random_range(0..14) {
            0..=2 => fs::write(random_dir(rng, root).join(format!("{name}.dat")), random_bytes(rng))?,
            3 => {
                if let Some(f) = pick(rng, root, Some(false)) {
                    use std::io::Write;
                    fs::OpenOptions::new().append(true).open(f)?.write_all(&random_bytes(rng))?;
                }
            }
            4 => {
                if let Some(f) = pick(rng, root, Some(false)) {
                    use std::io::{Seek, SeekFrom, Write};
                    let len = fs::metadata(&f)?.len();
                    let mut h = fs::OpenOptions::new().write(true).open(f)?;
                    h.seek(SeekFrom::Start(if len > 0 { rng.random_range(0..len) } else { 0 }))?;
                    let mut patch = vec![0u8; rng.random_range(1..70_000)];
                    rng.fill(&mut patch[..]);
                    h.write_all(&patch)?;
                }
            }
            5 => {
                if let Some(f) = pick(rng, root, Some(false)) {
                    let len = fs::metadata(&f)?.len();
                    fs::OpenOptions::new().write(true).open(f)?.set_len(if len > 0 {
                        rng.random_range(0..len)
                    } else {
                        0
                    })?;
                }
            }
            6 => {
                if let Some(f) = pick(rng, root, Some(false)) {
                    fs::rename(f, random_dir(rng, root).join(format!("{name}.moved")))?;
                }
            }
            7 => {
                if let Some(d) = pick(rng, root, Some(true)) {
                    let to = random_dir(rng, root).join(format!("{name}.dir"));
                    if !to.starts_with(&d) {
                        fs::rename(d, to)?;
                    }
                }
            }
            8 => {
                if let Some(f) = pick(rng, root, None) {
                    let m = fs::symlink_metadata(&f)?;
                    if m.is_dir() {
                        if rng.random_bool(0.3) {
                            fs::remove_dir_all(f)?;
                        }
                    } else {
                        fs::remove_file(f)?;
                    }
                }
            }
            9 => fs::create_dir_all(random_dir(rng, root).join(format!("{name}.d")).join("sub"))?,
            10 => {
                if let Some(f) = pick(rng, root, None) {
                    if !fs::symlink_metadata(&f)?.file_type().is_symlink() {
                        let mode = [0o600, 0o644, 0o755, 0o700, 0o640][rng.random_range(0..5)];
                        fs::set_permissions(f, fs::Permissions::from_mode(mode))?;
                    }
                }
            }
            11 => {
                let dir = random_dir(rng, root);
                symlink(format!("target-{}", rng.random_range(0..5)), dir.join(format!("{name}.lnk")))?;
            }
            _ => {
                // Atomic replace: write a temp file, rename it over an existing file.
                if let Some(f) = pick(rng, root, Some(false)) {
                    let tmp = f.with_file_name(format!(".{name}.tmp"));
                    fs::write(&tmp, random_bytes(rng))?;
                    fs::rename(tmp, f)?;
                }
            }
        }
        Ok(())
    })();
}

#[test]
fn random_workload_with_kill9_of_both_sides() {
    let seed: u64 = std::env::var("LOCKSTEP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("random_workload_with_kill9_of_both_sides: LOCKSTEP_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Setup::new().unwrap();
    let root = s.src.clone();
    let mut n = 0;
    for _ in 0..60 {
        op(&mut rng, &root, &mut n);
    }
    s.start().unwrap();
    for round in 0..6 {
        let kill_at = rng.random_range(20..120);
        for i in 0..150 {
            op(&mut rng, &root, &mut n);
            if i == kill_at {
                if round % 2 == 0 {
                    s.kill_receiver();
                } else {
                    s.kill_agent();
                }
            }
            if i == kill_at + 25 {
                if round % 2 == 0 {
                    s.start_receiver().unwrap();
                } else {
                    s.start_agent().unwrap();
                }
            }
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
            }
        }
        s.check_alive().unwrap();
    }
    s.wait_converged(Duration::from_secs(120)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}
