//! File content: reads a file once, in `CHUNK_BYTES` pieces, and turns it into `FileWrite`
//! events — full content (snapshots, new files) or a block-level delta against the index's
//! block hashes — while computing the whole-content blake3 and the per-block hashes the index
//! keeps. Events go to a sink as soon as they are complete, so a large file is never held in
//! memory; the last one is held back until end of file is seen, because it must carry the
//! content hash.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;

use lockstep_common::event::{Block, FileWrite, Meta, BLOCK_SIZE, CHUNK_BYTES};
use lockstep_common::relpath::RelPath;

use super::index::{Attrs, BlockHash, Entry, BLOCK_HASH_BYTES};

/// How to turn the file into events.
pub(crate) enum Plan<'a> {
    /// Rebuild from empty (`delta = false`).
    Full,
    /// Patch the receiver's copy, described by this index entry.
    Delta(&'a Entry),
    /// Emit nothing; only compute hashes (the baseline index).
    Record,
}

/// What was read.
pub(crate) struct Outcome {
    /// Whether any event went to the sink (for a delta: whether anything differed besides mode).
    pub emitted: bool,
    /// The bytes read (what receivers now have).
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    /// Per-block hashes (empty unless asked for).
    pub blocks: Vec<BlockHash>,
    pub content_hash: [u8; 32],
    /// False when a read error cut the file short; what was sent is self-consistent (the
    /// prefix read), and the index entry should force a re-read.
    pub complete: bool,
}

impl Outcome {
    /// The index entry describing what receivers have after this read, with owner and
    /// extended attributes `attrs`.
    pub(crate) fn entry(&self, attrs: Attrs) -> Entry {
        Entry {
            kind: super::index::Kind::File,
            mode: self.mode,
            size: self.size,
            mtime_ns: if self.complete { self.mtime_ns } else { -1 },
            blocks: self.blocks.clone(),
            content_hash: self.content_hash,
            target: Vec::new(),
            attrs,
            rdev: 0,
        }
    }
}

pub(crate) fn mode_of(meta: &Metadata) -> u32 {
    meta.mode() & 0o7777
}

pub(crate) fn mtime_ns_of(meta: &Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

pub(crate) fn block_hash(data: &[u8]) -> BlockHash {
    let h = blake3::hash(data);
    let mut out = [0u8; BLOCK_HASH_BYTES];
    out.copy_from_slice(&h.as_bytes()[..BLOCK_HASH_BYTES]);
    out
}

fn round_up_block(n: u64) -> u64 {
    n.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64
}

/// Reads `file` (whose `fstat` is `meta`) and sends its events to `sink`, the last one carrying
/// `attrs` (owner and extended attributes). A full write leaves out blocks of zeros: receivers
/// keep them as holes, so a sparse file stays sparse and its holes cost nothing on the wire.
/// Read errors are not returned: the content read so far is what gets described (see
/// [`Outcome::complete`]). Errors from the sink abort the read and are returned.
pub(crate) fn read_file<E>(
    rel: &RelPath,
    file: &mut File,
    meta: &Metadata,
    plan: Plan<'_>,
    want_block_hashes: bool,
    attrs: Option<Meta>,
    sink: &mut dyn FnMut(FileWrite) -> Result<(), E>,
) -> Result<Outcome, E> {
    let stat_size = meta.len();
    let mode = mode_of(meta);
    let mtime_ns = mtime_ns_of(meta);
    let old = match plan {
        Plan::Delta(e) => Some(e),
        _ => None,
    };
    let emit = !matches!(plan, Plan::Record);
    let full = matches!(plan, Plan::Full);
    let hash_blocks = want_block_hashes || old.is_some();

    let template = |first: bool, delta: bool| FileWrite {
        path: rel.clone(),
        first,
        last: false,
        delta,
        size: 0,
        mode,
        mtime_ns,
        blocks: Vec::new(),
        content_hash: None,
        meta: None,
    };

    let mut hasher = blake3::Hasher::new();
    let mut blocks: Vec<BlockHash> = Vec::new();
    let mut pending: Option<FileWrite> = None;
    // The changed run still growing at the end of `pending` (deltas only): offset and bytes.
    let mut run: Option<(u64, Vec<u8>)> = None;
    let mut pending_bytes = 0usize;
    let mut sunk_any = false;
    let mut changed_any = false;
    let mut off = 0u64;
    let mut complete = true;
    // Reused for deltas and hash-only reads; full reads hand each buffer over to its event.
    let mut buf: Vec<u8> = Vec::new();
    // The last chunk read, when it began at offset 0 (i.e. it holds the whole file): lets a
    // small changed file go out in full without a second read.
    let mut whole_file_in_buf;

    // Reads ahead of the kernel's small default window: with several reads in flight the disk
    // delivers several times the throughput of one sequential stream.
    prefetch(file, 0, READ_AHEAD);
    loop {
        // Ask for one byte more than the file should still hold (rounded up to whole blocks) so
        // that a short read proves end of file without an extra probe, and so every chunk but
        // the last is block-aligned.
        let remaining = stat_size.saturating_sub(off);
        let want = round_up_block(remaining + 1).min(CHUNK_BYTES as u64) as usize;
        if full {
            buf = Vec::with_capacity(want);
        } else {
            buf.clear();
            buf.reserve(want);
        }
        if remaining > READ_AHEAD {
            prefetch(file, off + READ_AHEAD, want as u64);
        }
        let res = (&mut *file).take(want as u64).read_to_end(&mut buf);
        let n = buf.len();
        if let Err(e) = &res {
            tracing::warn!(path = %rel, error = %e, "read file; describing the part read and re-reading later");
            complete = false;
        }
        // The whole-content hash only travels with emitted writes; a baseline record (the
        // first index) needs just the block hashes, so it skips this second pass.
        if emit {
            hasher.update(&buf);
        }
        let first_block_index = (off / BLOCK_SIZE as u64) as usize;
        if hash_blocks {
            for (i, data) in buf.chunks(BLOCK_SIZE).enumerate() {
                let h = block_hash(data);
                if let Some(old) = old {
                    let idx = first_block_index + i;
                    if old.blocks.get(idx) != Some(&h) {
                        changed_any = true;
                        if emit {
                            let boff = off + (i * BLOCK_SIZE) as u64;
                            if pending_bytes + data.len() > CHUNK_BYTES {
                                if let Some(mut w) = pending.take() {
                                    close_run(&mut w, &mut run);
                                    w.size = stat_size.max(off + n as u64);
                                    sink(w)?;
                                    sunk_any = true;
                                }
                                pending_bytes = 0;
                            }
                            let w = pending.get_or_insert_with(|| template(!sunk_any, true));
                            // Adjacent changed blocks travel as one larger block.
                            match &mut run {
                                Some((roff, r)) if *roff + r.len() as u64 == boff => r.extend_from_slice(data),
                                _ => {
                                    close_run(w, &mut run);
                                    run = Some((boff, data.to_vec()));
                                }
                            }
                            pending_bytes += data.len();
                        }
                    }
                }
                if want_block_hashes {
                    blocks.push(h);
                }
            }
        }
        whole_file_in_buf = off == 0;
        let chunk_off = off;
        off += n as u64;
        let at_end = n < want || !complete;
        if full && n > 0 {
            if let Some(mut w) = pending.take() {
                w.size = stat_size.max(off);
                sink(w)?;
                sunk_any = true;
            }
            let mut w = template(!sunk_any, false);
            let data = bytes::Bytes::from(std::mem::take(&mut buf));
            for (start, end) in nonzero_runs(&data) {
                w.blocks.push(Block { offset: chunk_off + start as u64, data: data.slice(start..end) });
            }
            pending = Some(w);
        }
        if at_end {
            break;
        }
    }

    let content_hash = *hasher.finalize().as_bytes();
    let size = off;
    let mut emitted = sunk_any || pending.is_some();
    if emit {
        if let Some(old) = old {
            // Blocks past the new end cannot be "changed", but a shorter file is.
            let truncated = size != old.size;
            if !sunk_any && (changed_any || truncated) && whole_file_in_buf && size < 2 * BLOCK_SIZE as u64 {
                // Small file: the whole new content is cheaper to reason about than a patch.
                run = None;
                let mut w = template(true, false);
                if size > 0 {
                    w.blocks.push(Block { offset: 0, data: std::mem::take(&mut buf).into() });
                }
                pending = Some(w);
                emitted = true;
            } else if pending.is_none() && (sunk_any || truncated || mtime_ns != old.mtime_ns) {
                // Content unchanged (or truncation only / the tail of a delta): a delta with no
                // blocks carries the new size, mtime and mode.
                pending = Some(template(!sunk_any, true));
                emitted = true;
            }
        } else if pending.is_none() {
            // Empty file (or nothing could be read).
            pending = Some(template(true, false));
            emitted = true;
        }
        if let Some(mut w) = pending.take() {
            close_run(&mut w, &mut run);
            w.size = size;
            w.last = true;
            w.content_hash = Some(content_hash);
            w.meta = attrs;
            sink(w)?;
        }
    } else {
        emitted = false;
    }
    Ok(Outcome { emitted, size, mode, mtime_ns, blocks, content_hash, complete })
}

/// The byte ranges of `data` (a chunk starting on a block boundary) that are not whole blocks of
/// zeros, as runs of adjacent blocks.
fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in data.chunks(BLOCK_SIZE).enumerate() {
        // Data that is not zero almost always shows it in its first bytes: cheap to rule out.
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let (start, end) = (i * BLOCK_SIZE, i * BLOCK_SIZE + block.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Appends the changed run being gathered to `w`'s blocks.
fn close_run(w: &mut FileWrite, run: &mut Option<(u64, Vec<u8>)>) {
    if let Some((offset, data)) = run.take() {
        w.blocks.push(Block { offset, data: data.into() });
    }
}

/// How far ahead of the read position file content is requested from the disk.
pub(crate) const READ_AHEAD: u64 = 8 << 20;

/// Asks the kernel to start reading `len` bytes at `off` into the page cache, without waiting.
/// Only a hint: failures are ignored.
pub(crate) fn prefetch(file: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), off as libc::off_t, len as libc::off_t, libc::POSIX_FADV_WILLNEED);
    }
}

/// Opens `path` for reading without following a final symlink, and `fstat`s it, so the
/// metadata describes exactly the file read.
pub(crate) fn open_nofollow(path: &std::path::Path) -> io::Result<(File, Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn run(path: &std::path::Path, plan: Plan<'_>) -> (Outcome, Vec<FileWrite>) {
        let rel = RelPath::new(b"f".to_vec()).unwrap();
        let (mut f, meta) = open_nofollow(path).unwrap();
        let mut out = Vec::new();
        let o = read_file::<()>(&rel, &mut f, &meta, plan, true, None, &mut |w| {
            out.push(w);
            Ok(())
        })
        .unwrap();
        (o, out)
    }

    fn apply(base: &[u8], ws: &[FileWrite]) -> Vec<u8> {
        let mut cur = if ws[0].delta { base.to_vec() } else { Vec::new() };
        for w in ws {
            for b in &w.blocks {
                let end = b.offset as usize + b.data.len();
                if cur.len() < end {
                    cur.resize(end, 0);
                }
                cur[b.offset as usize..end].copy_from_slice(&b.data);
            }
        }
        let last = ws.last().unwrap();
        cur.resize(last.size as usize, 0);
        assert_eq!(last.content_hash, Some(*blake3::hash(&cur).as_bytes()));
        cur
    }

    #[test]
    fn full_delta_and_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut data: Vec<u8> = (0..(3 * CHUNK_BYTES + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let (o, ws) = run(&p, Plan::Full);
        assert!(ws.len() == 4 && ws[0].first && ws[3].last && !ws[1].first && !ws[2].last);
        assert!(ws.iter().all(|w| w.blocks.iter().map(|b| b.data.len()).sum::<usize>() <= CHUNK_BYTES));
        assert_eq!(apply(&[], &ws), data);
        let entry = o.entry(Attrs::UNKNOWN);
        assert_eq!(entry.blocks.len(), data.len().div_ceil(BLOCK_SIZE));

        // Unchanged content, same mtime: nothing.
        let (o2, ws2) = run(&p, Plan::Delta(&entry));
        assert!(!o2.emitted && ws2.is_empty());

        // Patch across a block boundary and append.
        let old = data.clone();
        for b in &mut data[BLOCK_SIZE * 5 - 10..BLOCK_SIZE * 5 + 10] {
            *b ^= 0xff;
        }
        data.extend_from_slice(b"tail");
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(&data).unwrap();
        drop(f);
        let (_, ws3) = run(&p, Plan::Delta(&entry));
        assert_eq!(ws3.len(), 1);
        assert!(ws3[0].delta && ws3[0].first && ws3[0].last);
        let bytes: usize = ws3[0].blocks.iter().map(|b| b.data.len()).sum();
        assert!(bytes <= 3 * BLOCK_SIZE, "{bytes}");
        // The two changed blocks around the boundary travel as one; the tail as another.
        assert_eq!(ws3[0].blocks.len(), 2);
        assert_eq!(ws3[0].blocks[0].data.len(), 2 * BLOCK_SIZE);
        assert_eq!(apply(&old, &ws3), data);
    }

    #[test]
    fn full_writes_leave_out_blocks_of_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut data = vec![0u8; 3 * CHUNK_BYTES + 100];
        data[10] = 1;
        data[CHUNK_BYTES + 5 * BLOCK_SIZE + 3] = 7;
        data[CHUNK_BYTES + 6 * BLOCK_SIZE] = 8;
        std::fs::write(&p, &data).unwrap();
        let (_, ws) = run(&p, Plan::Full);
        let blocks: Vec<(u64, usize)> = ws.iter().flat_map(|w| &w.blocks).map(|b| (b.offset, b.data.len())).collect();
        // The first block, and two adjacent ones in the second chunk as one run; nothing else.
        assert_eq!(blocks, vec![(0, BLOCK_SIZE), ((CHUNK_BYTES + 5 * BLOCK_SIZE) as u64, 2 * BLOCK_SIZE)]);
        assert_eq!(apply(&[], &ws), data);
        assert_eq!(ws.last().unwrap().size, data.len() as u64);
    }

    #[test]
    fn empty_and_small_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"").unwrap();
        let (o, ws) = run(&p, Plan::Full);
        assert_eq!(ws.len(), 1);
        assert!(ws[0].first && ws[0].last && ws[0].blocks.is_empty() && ws[0].size == 0);
        std::fs::write(&p, b"hello").unwrap();
        let (_, ws) = run(&p, Plan::Delta(&o.entry(Attrs::UNKNOWN)));
        assert_eq!(ws.len(), 1);
        assert!(!ws[0].delta);
        assert_eq!(apply(&[], &ws), b"hello");
    }
}
