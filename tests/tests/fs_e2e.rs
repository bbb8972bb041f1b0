//! Directory replication end to end: every kind of change, bulk creation, block-level deltas,
//! a receiver restored from an older copy, a cut and corrupted link, kills mid initial sync.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::time::Duration;

use lockstep_tests::{proxy::Proxy, Options, Setup};

const CONVERGE: Duration = Duration::from_secs(60);

fn write(p: &std::path::Path, data: &[u8]) {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(p, data).unwrap();
}

#[test]
fn each_kind_of_change_replicates() {
    let mut s = Setup::new().unwrap();
    // Present before the agent first starts: reaches the standby through the initial sync.
    write(&s.src.join("pre/a.txt"), b"existing");
    fs::create_dir_all(s.src.join("pre/empty-dir")).unwrap();
    write(&s.src.join("pre/big.bin"), &vec![7u8; 3 << 20]);
    symlink("a.txt", s.src.join("pre/link")).unwrap();
    s.start().unwrap();
    s.wait_converged(CONVERGE).unwrap();

    let src = s.src.clone();
    write(&src.join("new.txt"), b"hello");
    write(&src.join("empty"), b"");
    fs::OpenOptions::new().append(true).open(src.join("pre/a.txt")).unwrap();
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(src.join("pre/a.txt")).unwrap();
        f.write_all(b" + appended").unwrap();
    }
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(src.join("pre/big.bin")).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[9u8; 5000]).unwrap();
    }
    fs::create_dir_all(src.join("d1/d2/d3")).unwrap();
    write(&src.join("d1/d2/d3/deep.txt"), b"deep");
    s.wait_converged(CONVERGE).unwrap();

    fs::OpenOptions::new().write(true).open(src.join("pre/big.bin")).unwrap().set_len(100_000).unwrap();
    fs::remove_file(src.join("new.txt")).unwrap();
    fs::rename(src.join("d1"), src.join("moved")).unwrap();
    fs::rename(src.join("empty"), src.join("moved/empty-renamed")).unwrap();
    fs::set_permissions(src.join("pre/a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("moved/d2"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("../pre/a.txt", src.join("moved/link-up")).unwrap();
    fs::remove_dir(src.join("pre/empty-dir")).unwrap();
    fs::create_dir(src.join("fresh-empty")).unwrap();
    // Atomic replace-by-rename, the way editors and deploy tools write.
    write(&src.join("config.tmp"), b"version 2");
    fs::rename(src.join("config.tmp"), src.join("pre/a.txt")).unwrap();
    s.wait_converged(CONVERGE).unwrap();

    fs::remove_dir_all(src.join("moved")).unwrap();
    fs::remove_file(src.join("pre/link")).unwrap();
    write(&src.join("pre/link"), b"now a file");
    s.wait_converged(CONVERGE).unwrap();
}

#[test]
fn excluded_paths_stay_behind() {
    let mut s = Setup::with(Options {
        source_extra: "exclude = [\"*.swp\", \"cache/**\", \"cache\"]".into(),
        ..Default::default()
    })
    .unwrap();
    s.start().unwrap();
    write(&s.src.join("keep.txt"), b"k");
    write(&s.src.join("x.swp"), b"swap");
    write(&s.src.join("cache/blob"), b"c");
    std::thread::sleep(Duration::from_millis(500));
    let deadline = std::time::Instant::now() + CONVERGE;
    while !s.dst.join("keep.txt").exists() {
        assert!(std::time::Instant::now() < deadline, "keep.txt never arrived\n{}", s.logs_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!s.dst.join("x.swp").exists());
    assert!(!s.dst.join("cache").exists());
}

#[test]
fn ten_thousand_small_files() {
    let mut s = Setup::new().unwrap();
    s.start().unwrap();
    s.wait_converged(CONVERGE).unwrap();
    for d in 0..100 {
        for f in 0..100 {
            write(&s.src.join(format!("d{d:03}/f{f:03}.txt")), format!("file {d} {f}\n").repeat(d % 7 + 1).as_bytes());
        }
    }
    s.wait_converged(Duration::from_secs(180)).unwrap();
}

fn bytes_sent(s: &Setup) -> f64 {
    let text = lockstep_tests::http_get(s.agent_metrics, "/metrics").unwrap();
    text.lines()
        .filter(|l| l.starts_with("lockstep_replication_bytes_sent_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn small_patch_in_large_file_sends_few_bytes() {
    let mut s = Setup::new().unwrap();
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    write(&s.src.join("big.img"), &data);
    s.start().unwrap();
    s.wait_converged(CONVERGE).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = bytes_sent(&s);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(s.src.join("big.img")).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&vec![0xABu8; 64 << 10]).unwrap();
    }
    s.wait_converged(CONVERGE).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sent = bytes_sent(&s) - before;
    eprintln!("64 KiB patch in a 64 MiB file: {sent} bytes sent");
    assert!(sent > 0.0 && sent < (256 << 10) as f64, "sent {sent} bytes for a 64 KiB patch");
}

#[test]
fn receiver_restored_from_older_copy_converges() {
    let mut s = Setup::new().unwrap();
    write(&s.src.join("a/one.txt"), b"one");
    s.start().unwrap();
    s.wait_converged(CONVERGE).unwrap();
    // Back up the receiver (data dir and standby) as an operator's snapshot would.
    s.kill_receiver();
    let backup = s.root().join("backup");
    copy_tree(&s.root().join("receiver-data"), &backup.join("receiver-data"));
    copy_tree(&s.dst, &backup.join("standby"));
    s.start_receiver().unwrap();
    for i in 0..50 {
        write(&s.src.join(format!("a/later-{i}.txt")), format!("later {i}").as_bytes());
    }
    fs::remove_file(s.src.join("a/one.txt")).unwrap();
    fs::rename(s.src.join("a"), s.src.join("b")).unwrap();
    s.wait_converged(CONVERGE).unwrap();
    // Restore the old copy: its position predates what the agent's journal still holds.
    s.kill_receiver();
    fs::remove_dir_all(s.root().join("receiver-data")).unwrap();
    fs::remove_dir_all(&s.dst).unwrap();
    copy_tree(&backup.join("receiver-data"), &s.root().join("receiver-data"));
    copy_tree(&backup.join("standby"), &s.dst);
    write(&s.dst.join("junk-only-on-standby"), b"stale");
    s.start_receiver().unwrap();
    s.wait_converged(CONVERGE).unwrap();
    // And a receiver whose data dir is gone entirely, with stale files in the standby.
    s.kill_receiver();
    fs::remove_dir_all(s.root().join("receiver-data")).unwrap();
    write(&s.dst.join("stale/file"), b"stale");
    s.start_receiver().unwrap();
    s.wait_converged(CONVERGE).unwrap();
}

#[test]
fn cut_and_corrupted_link_recovers() {
    let receiver_port = lockstep_tests::free_port();
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], receiver_port));
    let proxy = Proxy::start(target).unwrap();
    let mut s = Setup::with(Options { via: Some(proxy.addr), ..Default::default() }).unwrap();
    // Point the receiver at the port the proxy forwards to.
    let cfg = fs::read_to_string(&s.receiver_cfg).unwrap().replace(&s.receiver_listen.to_string(), &target.to_string());
    fs::write(&s.receiver_cfg, cfg).unwrap();
    s.start().unwrap();
    for i in 0..200 {
        write(&s.src.join(format!("f{i}")), &vec![i as u8; 20_000]);
        if i == 50 {
            proxy.cut();
        }
        if i == 100 {
            proxy.corrupt_after(30_000);
        }
        if i == 150 {
            proxy.block(true);
            std::thread::sleep(Duration::from_millis(700));
            proxy.block(false);
        }
    }
    s.wait_converged(CONVERGE).unwrap();
    proxy.delay(Duration::from_millis(40));
    write(&s.src.join("slow-link"), b"still arrives");
    s.wait_converged(CONVERGE).unwrap();
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

fn metric(s: &Setup, name: &str) -> f64 {
    let text = lockstep_tests::http_get(s.agent_metrics, "/metrics").unwrap();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn journal_size_cap_forces_a_resync_not_a_loss() {
    let mut s =
        Setup::with(Options { agent_extra: "[journal]\nmax_bytes = 2000000".into(), ..Default::default() }).unwrap();
    write(&s.src.join("seed.txt"), b"seed");
    s.start().unwrap();
    s.wait_converged(CONVERGE).unwrap();
    assert_eq!(metric(&s, "lockstep_replication_resyncs_total"), 1.0, "the initial sync");
    s.kill_receiver();
    // 10 MB of changes while the receiver is away: more than the journal may hold.
    for i in 0..100 {
        write(&s.src.join(format!("while-away/{i}.bin")), &vec![i as u8; 100_000]);
    }
    fs::remove_file(s.src.join("seed.txt")).unwrap();
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let st = s.agent_status().unwrap();
        if st["journal"]["bytes"].as_u64().unwrap() < 2_000_000 && st["journal"]["first_seq"].as_u64().unwrap() > 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "journal never truncated: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.start_receiver().unwrap();
    s.wait_converged(CONVERGE).unwrap();
    assert_eq!(metric(&s, "lockstep_replication_resyncs_total"), 2.0, "the lagging receiver was resynced");
}

#[test]
fn unreachable_receiver_holds_back_no_other() {
    let mut s = Setup::with(Options { second_receiver: true, ..Default::default() }).unwrap();
    write(&s.src.join("before.txt"), b"before");
    s.start().unwrap(); // eu-west only; us-east is down
    for i in 0..200 {
        write(&s.src.join(format!("d/{i}.txt")), format!("{i}").as_bytes());
    }
    s.wait_converged(CONVERGE).unwrap();
    let st = s.agent_status().unwrap();
    let us = st["receivers"].as_array().unwrap().iter().find(|r| r["name"] == "us-east").unwrap().clone();
    assert_eq!(us["connected"], false, "{us}");
    assert!(us["last_error"].is_string(), "the unreachable receiver reports why: {us}");
    // The late receiver catches up from the journal / a snapshot on its own.
    s.start_receiver2().unwrap();
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        if lockstep_tests::tree::diff(&s.src, &s.dst2).is_ok_and(|d| d.is_empty()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "us-east never converged\n{}", s.logs_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Changes made while the agent builds its first index and seeds the receiver (both read the
/// tree at the same time) must not be lost: the snapshot may read a file before a change and
/// the index after it.
#[test]
fn changes_during_first_start_are_not_lost() {
    let mut s = Setup::new().unwrap();
    for i in 0..300 {
        write(&s.src.join(format!("d{}/f{i}", i % 10)), &vec![(i % 251) as u8; 200_000]);
    }
    s.start().unwrap();
    let t0 = std::time::Instant::now();
    let mut round = 0u8;
    while t0.elapsed() < Duration::from_millis(1500) {
        round = round.wrapping_add(1);
        for i in (0..300).step_by(7) {
            // Same size, new bytes: only content tells the versions apart.
            let _ = fs::write(s.src.join(format!("d{}/f{i}", i % 10)), vec![round; 200_000]);
        }
        let _ = fs::rename(
            s.src.join(format!("d1/f{}", 1 + 10 * (round as usize % 30))),
            s.src.join(format!("d2/moved-{round}")),
        );
        write(&s.src.join(format!("new/{round}")), &[round; 1000]);
        std::thread::sleep(Duration::from_millis(20));
    }
    s.wait_converged(CONVERGE).unwrap();
}

/// Regular files under `dir` whose names do not start with a dot (finished ones, not staging).
fn installed_files(dir: &std::path::Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => installed_files(&e.path()),
            Ok(t) if t.is_file() && !e.file_name().to_string_lossy().starts_with('.') => 1,
            _ => 0,
        })
        .sum()
}

/// Waits until at least `n` files are installed on the standby; false if the sync finished
/// (or stalled) first.
fn wait_installed(s: &Setup, n: usize, total: usize) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < CONVERGE {
        let got = installed_files(&s.dst);
        if got >= total {
            return false;
        }
        if got >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn kill9_mid_initial_sync_of_large_files() {
    // Large files reach the standby through staging files written around the page cache, with
    // unaligned tails; kill -9 of the receiver and then of the agent part-way through the
    // initial sync must still end byte-identical, with no staging file left behind.
    use rand::{Rng, SeedableRng};
    let mut s = Setup::new().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let total = 40;
    for i in 0..total {
        let mut data = vec![0u8; rng.random_range((1 << 20)..(6 << 20)) + 4097];
        rng.fill(&mut data[..]);
        write(&s.src.join(format!("big{}/f{i}.bin", i % 4)), &data);
    }
    s.start().unwrap();
    let receiver_killed = wait_installed(&s, 5, total);
    if receiver_killed {
        s.kill_receiver();
        std::thread::sleep(Duration::from_millis(100));
        s.start_receiver().unwrap();
    }
    // The restarted receiver resyncs from scratch; kill the agent part-way through that.
    let agent_killed = wait_installed(&s, 12, total);
    if agent_killed {
        s.kill_agent();
        std::thread::sleep(Duration::from_millis(100));
        s.start_agent().unwrap();
    }
    eprintln!("killed mid initial sync: receiver {receiver_killed}, agent {agent_killed}");
    s.wait_converged(CONVERGE).unwrap();
    assert!(receiver_killed, "the initial sync finished before the receiver could be killed");
    let leftovers: Vec<_> = fs::read_dir(&s.dst)
        .unwrap()
        .flatten()
        .flat_map(|d| fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".lockstep-tmp"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "staging files left on the standby: {leftovers:?}");
}

/// Polls the agent's status until it reports the receiver caught up (connected, no resync,
/// nothing behind, no lag), then the standby must already equal the source: an operator
/// draining for a cutover promotes the standby at that moment. Returns how many polls saw the
/// resync still under way.
fn caught_up_means_identical(s: &mut Setup) -> usize {
    let t0 = std::time::Instant::now();
    let mut during = 0;
    loop {
        s.check_alive().unwrap();
        assert!(t0.elapsed() < CONVERGE, "never caught up: {}", s.logs_tail());
        let Ok(st) = s.agent_status() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let r = &st["receivers"][0];
        if lockstep_tests::receiver_caught_up(&st) && r["lag_seconds"] == 0.0 {
            let diff = lockstep_tests::tree::diff(&s.src, &s.dst).unwrap();
            assert!(
                diff.is_empty(),
                "the agent reported the receiver caught up while the standby lacked:\n{}\nstatus: {st}",
                diff.join("\n")
            );
            return during;
        }
        if !r["resyncing"].is_null() {
            assert!(r["lag_seconds"].as_f64().unwrap() > 0.0, "a resync shows no lag: {st}");
            during += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn caught_up_status_waits_for_the_snapshot_to_be_committed() {
    // 48 MiB fits in the flow window, so the agent has sent the whole snapshot long before the
    // receiver has written and synced it; the status must not call the receiver caught up
    // until the receiver has committed the snapshot.
    let mut s = Setup::new().unwrap();
    for i in 0..24 {
        write(&s.src.join(format!("d{}/f{i}.bin", i % 3)), &vec![i as u8 ^ 0x5a; 2 << 20]);
    }
    s.start().unwrap();
    let first = caught_up_means_identical(&mut s);
    // A receiver that lost its data dir is reseeded while the agent keeps running.
    s.kill_receiver();
    let t0 = std::time::Instant::now();
    while s.agent_status().unwrap()["receivers"][0]["connected"] == true {
        assert!(t0.elapsed() < CONVERGE, "the agent never noticed the receiver was gone");
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::remove_dir_all(s.root().join("receiver-data")).unwrap();
    fs::remove_dir_all(&s.dst).unwrap();
    s.start_receiver().unwrap();
    let second = caught_up_means_identical(&mut s);
    eprintln!("polls that saw the resync under way: {first}, {second}");
    assert!(first > 0 && second > 0, "the resyncs were never seen in the status");
}
