//! lockstep directory-replication benchmark. Prints:
//!  1. write-to-visible latency p50/p99 of single small-file writes,
//!  2. events/s for a burst of 10,000 small files,
//!  3. initial sync MB/s of a ~1 GiB tree of mixed sizes, next to `rsync -a` into an rsync
//!     daemon on loopback over the same tree in the same run,
//!  4. bytes on the wire for a 64 KiB patch in a 64 MiB file.
//!
//! Run: `cargo run --release -p lockstep-tests --bin bench` (installs rsync with apt-get if
//! missing). `BENCH_TREE_MIB` changes the tree size (default 1024).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lockstep_tests::measure::percentile;
use lockstep_tests::{free_port, http_get, Setup};

fn xorshift_fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
    }
}

fn latency() -> Result<(f64, f64)> {
    // Start from a settled disk: write-back left by whatever ran before would otherwise show
    // up as fsync stalls of the journal (see BENCHMARKS.md).
    let _ = Command::new("sync").status();
    let mut s = Setup::new()?;
    s.start()?;
    s.wait_converged(Duration::from_secs(30))?;
    let mut samples = Vec::new();
    for i in 0..300 {
        let name = format!("lat-{i}.txt");
        let body = format!("sample {i} {}", lockstep_common::now_us());
        let t0 = Instant::now();
        fs::write(s.src.join(&name), &body)?;
        let dst = s.dst.join(&name);
        loop {
            if let Ok(b) = fs::read_to_string(&dst) {
                if b == body {
                    break;
                }
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("write {i} never became visible");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((percentile(&mut samples, 0.5), percentile(&mut samples, 0.99)))
}

fn burst() -> Result<f64> {
    let mut s = Setup::new()?;
    s.start()?;
    s.wait_converged(Duration::from_secs(30))?;
    let t0 = Instant::now();
    for d in 0..100 {
        let dir = s.src.join(format!("d{d:03}"));
        fs::create_dir(&dir)?;
        for f in 0..100 {
            fs::write(dir.join(format!("f{f:03}")), format!("small file {d}/{f}\n"))?;
        }
    }
    s.wait_converged(Duration::from_secs(300))?;
    Ok(10_000.0 / t0.elapsed().as_secs_f64())
}

/// A tree of mixed sizes: many small files, some medium, a few large; incompressible data.
fn make_tree(root: &Path, total_mib: u64) -> Result<u64> {
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut written = 0u64;
    let budget = total_mib << 20;
    let mut buf = vec![0u8; 64 << 20];
    let mut n = 0u64;
    // 10% in ~5,000 small files, 30% in 512 KiB..4 MiB files, 60% in 32..64 MiB files.
    let plan: [(u64, u64, u64); 3] = [
        (budget / 10, 1 << 10, 40 << 10),
        (budget * 3 / 10, 512 << 10, 4 << 20),
        (budget * 6 / 10, 32 << 20, 64 << 20),
    ];
    for (share, lo, hi) in plan {
        let mut used = 0u64;
        while used < share {
            let size = (lo + (seed % (hi - lo))).min(share - used).max(1);
            xorshift_fill(&mut buf[..size as usize], &mut seed);
            let dir = root.join(format!("dir{:02}/sub{}", n % 37, n % 5));
            fs::create_dir_all(&dir)?;
            fs::write(dir.join(format!("file{n}.bin")), &buf[..size as usize])?;
            used += size;
            n += 1;
        }
        written += used;
    }
    Ok(written)
}

fn ensure_rsync() -> Result<PathBuf> {
    if let Ok(p) = which("rsync") {
        return Ok(p);
    }
    eprintln!("rsync not found; installing it with apt-get");
    let _ = Command::new("apt-get").arg("update").stdout(Stdio::null()).status();
    let st = Command::new("apt-get").args(["install", "-y", "rsync"]).stdout(Stdio::null()).status()?;
    if !st.success() {
        bail!("apt-get install rsync failed");
    }
    which("rsync")
}

fn which(name: &str) -> Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found")
}

/// `BENCH_COLD=1`: start each initial sync with the source tree out of the page cache (as on
/// a host whose data was not just written), which needs root.
fn cold() -> bool {
    std::env::var_os("BENCH_COLD").is_some_and(|v| v == "1")
}

fn drop_caches() {
    // Same starting point for both tools: dirty data flushed so neither pays for the other's
    // write-back; the tree in page cache (it was just written) unless BENCH_COLD=1.
    let _ = Command::new("sync").status();
    if cold() {
        if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "3") {
            eprintln!("BENCH_COLD=1 needs root to drop the page cache: {e}");
            std::process::exit(2);
        }
    }
}

fn rsync_initial(src: &Path, work: &Path, round: usize) -> Result<(f64, f64)> {
    let rsync = ensure_rsync()?;
    let dest = work.join(format!("rsync-dest-{round}"));
    fs::create_dir_all(&dest)?;
    let port = free_port();
    let conf = work.join("rsyncd.conf");
    fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\npid file = {}\n[bench]\npath = {}\nread only = no\n",
            work.join("rsyncd.pid").display(),
            dest.display()
        ),
    )?;
    let mut daemon = Command::new(&rsync)
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stderr(Stdio::null())
        .spawn()
        .context("start rsync daemon")?;
    std::thread::sleep(Duration::from_millis(500));
    drop_caches();
    let t0 = Instant::now();
    let st = Command::new(&rsync)
        .arg("-a")
        .arg(format!("{}/", src.display()))
        .arg(format!("rsync://127.0.0.1:{port}/bench/"))
        .status()?;
    let secs = t0.elapsed().as_secs_f64();
    // rsync does not fsync; lockstep acknowledges only what is on disk. Flushing rsync's copy
    // afterwards gives the like-for-like figure.
    let _ = Command::new("sync").arg("-f").arg(&dest).status();
    let durable_secs = t0.elapsed().as_secs_f64();
    let _ = daemon.kill();
    let _ = daemon.wait();
    if !st.success() {
        bail!("rsync failed: {st}");
    }
    // The copy stays until the process ends: deleting thousands of files right before
    // lockstep's run would make ext4's inode allocator slower for it than it was for rsync.
    Ok((secs, durable_secs))
}

/// Runs of each tool, alternating; the medians are reported (this 2-core VM is noisy).
const INITIAL_ROUNDS: usize = 5;

/// Median, minimum and maximum.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Returns (lockstep seconds, rsync seconds, rsync+sync seconds) as (median, min, max), and
/// the tree's bytes.
type Spread = (f64, f64, f64);
fn lockstep_initial(tree_mib: u64) -> Result<(Spread, Spread, Spread, u64)> {
    let mut s = Setup::new()?;
    let bytes = make_tree(&s.src, tree_mib)?;
    let agent_cfg = fs::read_to_string(&s.agent_cfg)?;
    let receiver_cfg = fs::read_to_string(&s.receiver_cfg)?;
    let (src, work) = (s.src.clone(), s.root().to_path_buf());
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..INITIAL_ROUNDS {
        // Who goes first alternates: the first gigabytes written after a quiet spell go faster.
        let rsync_first = round % 2 == 0;
        // Nothing of lockstep's runs while rsync runs (an idle agent still watches the source
        // tree, and inotify wakes it for every file rsync opens).
        s.kill_agent();
        s.kill_receiver();
        if rsync_first {
            theirs.push(rsync_initial(&src, &work, round)?);
        }
        // A cold start of both daemons into a new standby each round (nothing is deleted in
        // between: deletions would slow ext4's inode allocation for whoever runs next).
        fs::write(&s.agent_cfg, agent_cfg.replace("agent-data", &format!("agent-data-{round}")))?;
        fs::write(
            &s.receiver_cfg,
            receiver_cfg
                .replace("receiver-data", &format!("receiver-data-{round}"))
                .replace("path = \"standby\"", &format!("path = \"standby-{round}\"")),
        )?;
        let standby = work.join(format!("standby-{round}"));
        drop_caches();
        let t0 = Instant::now();
        s.start()?;
        // Timed until the agent reports the receiver caught up: it has acknowledged
        // everything and committed (synced) the whole snapshot.
        loop {
            s.check_alive()?;
            if s.agent_status().is_ok_and(|st| {
                lockstep_tests::receiver_caught_up(&st)
                    && st["receivers"][0]["acked_seq"].as_u64() == st["journal"]["last_seq"].as_u64()
            }) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("initial sync did not finish\n{}", s.logs_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ours.push(t0.elapsed().as_secs_f64());
        let [agent_cpu, receiver_cpu] = s.daemon_cpu();
        let show = |c: Option<(f64, f64)>| c.map_or("?".into(), |(u, k)| format!("{u:.2} s user + {k:.2} s system"));
        eprintln!("  round {round}: CPU used by the agent {}, by the receiver {}", show(agent_cpu), show(receiver_cpu));
        // Not timed: confirm the standby really is byte-identical.
        let diff = lockstep_tests::tree::diff(&s.src, &standby)?;
        if !diff.is_empty() {
            bail!("standby differs after the initial sync:\n{}", diff.join("\n"));
        }
        if !rsync_first {
            s.kill_agent();
            s.kill_receiver();
            theirs.push(rsync_initial(&src, &work, round)?);
        }
        eprintln!(
            "  round {round} ({} first): lockstep {:.2} s, rsync {:.2} s, rsync+sync {:.2} s",
            if rsync_first { "rsync" } else { "lockstep" },
            ours[round],
            theirs[round].0,
            theirs[round].1
        );
    }
    let (theirs, theirs_durable) = theirs.into_iter().unzip();
    Ok((spread(ours), spread(theirs), spread(theirs_durable), bytes))
}

fn patch_bytes() -> Result<f64> {
    let mut s = Setup::new()?;
    let mut data = vec![0u8; 64 << 20];
    let mut seed = 42u64;
    xorshift_fill(&mut data, &mut seed);
    fs::write(s.src.join("big.img"), &data)?;
    s.start()?;
    s.wait_converged(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    let sent = |s: &Setup| -> Result<f64> {
        Ok(http_get(s.agent_metrics, "/metrics")?
            .lines()
            .filter(|l| l.starts_with("lockstep_replication_bytes_sent_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    };
    let before = sent(&s)?;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(s.src.join("big.img"))?;
        f.seek(SeekFrom::Start(40 << 20))?;
        f.write_all(&vec![0xABu8; 64 << 10])?;
    }
    s.wait_converged(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(sent(&s)? - before)
}

fn main() -> Result<()> {
    let tree_mib: u64 = std::env::var("BENCH_TREE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    println!(
        "lockstep fs benchmark — {}",
        Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    // BENCH_ONLY=latency|burst|initial|patch runs one part.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |part: &str| only.is_empty() || only == part;
    if want("latency") {
        let (p50, p99) = latency()?;
        println!("write-to-visible latency (300 single small-file writes): p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
    if want("initial") {
        let (ours, rsync, rsync_durable, bytes) = lockstep_initial(tree_mib)?;
        let mb = bytes as f64 / 1e6;
        let show = |(med, min, max): Spread| format!("{med:.2} s ({min:.2}–{max:.2}) = {:.0} MB/s", mb / med);
        println!(
            "initial sync of {mb:.0} MB tree ({} cache, `sync` before each run; median (min–max) of {INITIAL_ROUNDS} alternating runs): lockstep {} (durable, acknowledged); rsync -a to loopback daemon {} (not flushed), {} with a sync of its copy; lockstep runs at {:.2}x the speed of rsync, {:.2}x rsync + sync",
            if cold() { "cold" } else { "warm" },
            show(ours),
            show(rsync),
            show(rsync_durable),
            rsync.0 / ours.0,
            rsync_durable.0 / ours.0,
        );
    }
    if want("burst") {
        let eps = burst()?;
        println!("burst of 10,000 small files: {eps:.0} events/s (create to all visible on the standby)");
    }
    if want("patch") {
        let patch = patch_bytes()?;
        println!("64 KiB patch inside a 64 MiB file: {patch:.0} bytes on the wire");
    }
    Ok(())
}
