//! Small helpers shared by the benchmark binaries.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;

/// The value at fraction `p` (0.0–1.0) of `v`, which is sorted in place.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The disk's own small-write flush latency: 500 appends of 200 bytes to a file in the temp
/// directory, each followed by `fdatasync`, 5 ms apart. Returns (p50, p99, max) in ms — the
/// floor under any path with an fsync on it, such as the agent's journal.
pub fn fsync_latency() -> Result<(f64, f64, f64)> {
    fsync_probe(500)
}

/// [`fsync_latency`] with `n` probes (5 ms apart: about `n / 200` seconds).
pub fn fsync_probe(n: usize) -> Result<(f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::File::create(dir.path().join("probe"))?;
    let mut ms = Vec::new();
    for _ in 0..n {
        f.write_all(&[b'x'; 200])?;
        let t = Instant::now();
        f.sync_data()?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((percentile(&mut ms, 0.5), percentile(&mut ms, 0.99), percentile(&mut ms, 1.0)))
}
