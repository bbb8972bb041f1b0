//! Holes (`sparse`): ranges of zeros a file does not store. A full write leaves what no block
//! covers as holes, a delta's base copy keeps the holes of the file it copies (copying data
//! extents only, found with `SEEK_DATA`/`SEEK_HOLE`: `std::fs::copy` fills them on ext4), and
//! a delta block of zeros punches a hole. With `sparse = false` the holes of a finished file
//! are allocated (`fallocate`), or written as zeros where that is not supported.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Zeros for hashing and writing gaps.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Whether `data` is all zeros.
pub(super) fn is_zero(data: &[u8]) -> bool {
    // 16 bytes at a time: a block of real data fails on its first word.
    let mut words = data.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

/// Feeds `len` zeros to `hasher` (the content of a hole).
pub(super) fn hash_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// Makes `[off, off + len)` of `file` a hole (reads as zeros; the size is kept). `Ok(false)`
/// where the filesystem cannot punch holes: then the caller writes the zeros.
pub(super) fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<bool> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(e),
    }
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`: `None` past the last data (`ENXIO`).
fn seek(file: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The data ranges of the first `size` bytes of `file`; the whole range where the filesystem
/// cannot tell (`SEEK_DATA` unsupported).
fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let start = match seek(file, off, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && off == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        out.push((start, end));
        off = end;
    }
    Ok(out)
}

/// Copies `src` into the empty `dst` keeping its holes: only data extents are copied
/// (`copy_file_range`, which clones on filesystems that can), then the size is set.
pub(super) fn copy_keeping_holes(src: &File, dst: &File) -> io::Result<()> {
    let size = src.metadata()?.len();
    for (start, end) in data_ranges(src, size)? {
        copy_range(src, dst, start, end)?;
    }
    dst.set_len(size)
}

fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut off = start;
    while off < end {
        let (mut a, mut b) = (off as libc::loff_t, off as libc::loff_t);
        let want = ((end - off) as usize).min(1 << 30);
        // SAFETY: both descriptors are open; the offsets are owned locals.
        let r = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, want, 0) };
        if r > 0 {
            off += r as u64;
            continue;
        }
        if r == 0 {
            // The source shrank under us (it cannot: only the applier writes here); stop.
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
                return copy_by_reading(src, dst, off, end);
            }
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
    Ok(())
}

fn copy_by_reading(src: &File, dst: &File, mut off: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while off < end {
        let want = buf.len().min((end - off) as usize);
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Allocates every hole in the first `size` bytes of `file` (`sparse = false`): `fallocate`,
/// or zeros written where that is not supported.
pub(super) fn fill_holes(file: &File, size: u64) -> io::Result<()> {
    let mut holes = Vec::new();
    let mut at = 0;
    for (start, end) in data_ranges(file, size)? {
        if start > at {
            holes.push((at, start));
        }
        at = end;
    }
    if at < size {
        holes.push((at, size));
    }
    for (start, end) in holes {
        // SAFETY: plain syscall on an open descriptor.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, start as libc::off_t, (end - start) as libc::off_t) };
        if r == 0 {
            continue;
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)) {
            return Err(e);
        }
        let mut off = start;
        while off < end {
            let n = (end - off).min(ZEROS.len() as u64) as usize;
            file.write_all_at(&ZEROS[..n], off)?;
            off += n as u64;
        }
    }
    Ok(())
}
