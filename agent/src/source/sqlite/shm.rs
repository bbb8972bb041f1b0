//! A read-only look at SQLite's WAL index (the `-shm` file) and at the locks other processes
//! hold on it (format: <https://sqlite.org/walformat.html#the_wal_index_file_format>), and the
//! one lock the source takes on it itself: read-mark 0, to block copying back for a moment
//! ([`Shm::block_copy_back`]).
//!
//! The source lets go of its read transaction — the only moment the log may be reset — only
//! when the index shows that doing so cannot lose a frame it has not read; see
//! [`super::follow`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Byte offset of the lock slots in the `-shm` file (the unix VFS locks one byte each).
const LOCK_BASE: i64 = 120;
const WRITE_LOCK: i64 = 0;
const CKPT_LOCK: i64 = 1;
/// Read-mark 0 ("reading the database file only"): a checkpoint holds it exclusively while it
/// copies frames back.
const READ0_LOCK: i64 = 3;
/// Read-mark slots 1..=4 (slot 0 means "reading the database file only").
const READ_LOCKS_USING_WAL: std::ops::RangeInclusive<i64> = 4..=7;

/// What the WAL index says right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexState {
    /// Last valid commit frame of the log.
    pub mx_frame: u32,
    /// Frames already copied back into the database file.
    pub n_backfill: u32,
    pub salt: [u32; 2],
    /// The read-mark slots 0..=4 (for diagnostics: which log state each reader slot is on).
    pub read_marks: [u32; 5],
}

/// The descriptor is never closed: closing any descriptor of a file drops every POSIX lock
/// this process holds on it — SQLite's read locks (the pins) included. One descriptor is
/// leaked per database opened, which only a replaced database file repeats.
pub struct Shm {
    file: std::mem::ManuallyDrop<File>,
}

impl Shm {
    pub fn open(path: &std::path::Path) -> io::Result<Shm> {
        let file = std::fs::OpenOptions::new().read(true).open(path)?;
        Ok(Shm { file: std::mem::ManuallyDrop::new(file) })
    }

    /// The index header, if its two copies agree (a writer is not half-way through it).
    pub fn state(&self) -> io::Result<Option<IndexState>> {
        let mut b = [0u8; 136];
        match self.file.read_exact_at(&mut b, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if b[..48] != b[48..96] || b[12] == 0 {
            return Ok(None);
        }
        // Native byte order, except the salts: copied from the log header, big-endian.
        let word = |at: usize| <[u8; 4]>::try_from(&b[at..at + 4]).expect("4 bytes");
        Ok(Some(IndexState {
            mx_frame: u32::from_ne_bytes(word(16)),
            salt: [u32::from_be_bytes(word(32)), u32::from_be_bytes(word(36))],
            n_backfill: u32::from_ne_bytes(word(96)),
            read_marks: std::array::from_fn(|i| u32::from_ne_bytes(word(100 + 4 * i))),
        }))
    }

    /// Whether another process holds the write lock (a writer or a blocking checkpoint).
    pub fn other_writer(&self) -> io::Result<bool> {
        self.held_by_other(LOCK_BASE + WRITE_LOCK)
    }

    /// Whether another process holds the checkpoint lock (with the write lock: a FULL, RESTART
    /// or TRUNCATE checkpoint is running).
    pub fn other_checkpointer(&self) -> io::Result<bool> {
        self.held_by_other(LOCK_BASE + CKPT_LOCK)
    }

    /// Takes a shared lock on read-mark 0, if no checkpoint holds it (one that is copying frames
    /// back does). While it is held, no checkpoint can copy a frame back, so the count of
    /// frames copied back cannot grow — and SQLite resets the log only once that count has
    /// reached its last frame (a RESTART or TRUNCATE checkpoint, or a writer starting over).
    /// So if the log was not wholly copied back when the block was taken, it cannot be reset
    /// until the block is dropped, pinned or not.
    ///
    /// The lock is an open-file-description lock: unlike a POSIX lock it is not merged with
    /// the ones SQLite holds in this process, so dropping it never drops one of theirs, and it
    /// conflicts with their exclusive locks too. Linux only; elsewhere this returns None.
    pub fn block_copy_back(&self) -> io::Result<Option<CopyBackBlock>> {
        #[cfg(target_os = "linux")]
        {
            let fd = self.file.as_raw_fd();
            if ofd_lock(fd, libc::F_RDLCK)? {
                return Ok(Some(CopyBackBlock { fd }));
            }
        }
        Ok(None)
    }

    /// Whether another process holds a read lock on a slot that reads from the log.
    pub fn other_wal_readers(&self) -> io::Result<bool> {
        for slot in READ_LOCKS_USING_WAL {
            if self.held_by_other(LOCK_BASE + slot)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Which of the eight lock bytes (write, checkpoint, recover, read 0..4) another process
    /// holds, for diagnostics.
    pub fn held(&self) -> String {
        (0..8).map(|i| if self.held_by_other(LOCK_BASE + i).unwrap_or(false) { '1' } else { '0' }).collect()
    }

    /// POSIX record locks: F_GETLK reports locks of other processes only (and this process's
    /// [`CopyBackBlock`], an open-file-description lock).
    fn held_by_other(&self, byte: i64) -> io::Result<bool> {
        // SAFETY: an all-zero `flock` is a valid value; the fields set below follow fcntl(2).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as _;
        fl.l_whence = libc::SEEK_SET as _;
        fl.l_start = byte as _;
        fl.l_len = 1;
        // SAFETY: the descriptor is open for the call, and `fl` outlives it.
        if unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLK, &mut fl) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(i32::from(fl.l_type) != libc::F_UNLCK)
    }
}

/// A shared lock on read-mark 0 (see [`Shm::block_copy_back`]); let go when dropped. It may
/// outlive its [`Shm`]: a `Shm`'s descriptor is never closed.
pub struct CopyBackBlock {
    fd: std::os::fd::RawFd,
}

impl Drop for CopyBackBlock {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        {
            // Unlocking a lock that is held cannot fail short of a bad descriptor, and the
            // descriptor is never closed.
            let _ = ofd_lock(self.fd, libc::F_UNLCK);
        }
    }
}

/// Takes (F_RDLCK) or lets go of (F_UNLCK) an open-file-description lock on read-mark 0's
/// byte without waiting; false if a conflicting lock is held (by anyone, this process too).
#[cfg(target_os = "linux")]
fn ofd_lock(fd: std::os::fd::RawFd, kind: libc::c_int) -> io::Result<bool> {
    // SAFETY: an all-zero `flock` is a valid value (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = (LOCK_BASE + READ0_LOCK) as _;
    fl.l_len = 1;
    // SAFETY: the descriptor is open for the call, and `fl` outlives it.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}
