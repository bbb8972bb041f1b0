//! Reading SQLite's write-ahead log file directly (format: <https://sqlite.org/fileformat2.html#walformat>).
//!
//! A WAL file is a 32-byte header followed by frames, each a 24-byte frame header and one
//! database page. A frame is valid only if its salts equal the header's and its checksum — a
//! running checksum over every frame since the header — matches; a frame whose header names
//! the database size ("commit size") ends a transaction. When the log is reset (a checkpoint
//! restarts it), the next writer writes a new header with salt-1 incremented, a fresh salt-2
//! and the checkpoint sequence number incremented, and overwrites frames from the start:
//! stale frames of the previous generation then fail the salt or checksum test.
//!
//! [`read_committed`] returns whole committed transactions after a known point, never a frame
//! of a transaction whose commit frame is not yet written (or that was rolled back).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const HEADER_LEN: usize = 32;
pub const FRAME_HEADER_LEN: usize = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const VERSION: u32 = 3_007_000;

/// A valid WAL file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums use big-endian words (magic 0x377f0683) rather than little-endian.
    pub big_endian: bool,
    pub page_size: u32,
    pub ckpt_seq: u32,
    pub salt: [u32; 2],
    pub cksum: [u32; 2],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The WAL checksum: over `data` in pairs of 32-bit words, continuing from `s`.
pub fn checksum(big_endian: bool, data: &[u8], s: [u32; 2]) -> [u32; 2] {
    debug_assert_eq!(data.len() % 8, 0);
    let (mut s0, mut s1) = (s[0], s[1]);
    for w in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (be32(w, 0), be32(w, 4))
        } else {
            (u32::from_le_bytes(w[0..4].try_into().expect("4")), u32::from_le_bytes(w[4..8].try_into().expect("4")))
        };
        s0 = s0.wrapping_add(x0).wrapping_add(s1);
        s1 = s1.wrapping_add(x1).wrapping_add(s0);
    }
    [s0, s1]
}

impl WalHeader {
    /// Parses and checks a header; `None` if these bytes are not a valid one (an empty or
    /// half-written log).
    pub fn parse(b: &[u8]) -> Option<WalHeader> {
        if b.len() < HEADER_LEN {
            return None;
        }
        let big_endian = match be32(b, 0) {
            MAGIC_LE => false,
            MAGIC_BE => true,
            _ => return None,
        };
        if be32(b, 4) != VERSION {
            return None;
        }
        let page_size = be32(b, 8);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return None;
        }
        let cksum = [be32(b, 24), be32(b, 28)];
        if checksum(big_endian, &b[..24], [0, 0]) != cksum {
            return None;
        }
        Some(WalHeader { big_endian, page_size, ckpt_seq: be32(b, 12), salt: [be32(b, 16), be32(b, 20)], cksum })
    }

    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.page_size)
    }

    /// File offset of frame `n` (1-based).
    pub fn frame_offset(&self, n: u32) -> u64 {
        HEADER_LEN as u64 + u64::from(n - 1) * self.frame_len()
    }
}

/// Reads the header of the WAL file; `None` when the file is shorter than a header or holds
/// no valid one.
pub fn read_header(file: &File) -> io::Result<Option<WalHeader>> {
    let mut b = [0u8; HEADER_LEN];
    match file.read_exact_at(&mut b, 0) {
        Ok(()) => Ok(WalHeader::parse(&b)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// A point in one WAL generation: after commit frame `frame` (0: before the first frame),
/// with the running checksum there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalPos {
    pub ckpt_seq: u32,
    pub salt: [u32; 2],
    pub frame: u32,
    pub cksum: [u32; 2],
}

impl WalPos {
    /// The start of the generation `h` heads.
    pub fn start(h: &WalHeader) -> WalPos {
        WalPos { ckpt_seq: h.ckpt_seq, salt: h.salt, frame: 0, cksum: h.cksum }
    }

    pub const ENCODED_LEN: usize = 24;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        for (i, v) in [self.ckpt_seq, self.salt[0], self.salt[1], self.frame, self.cksum[0], self.cksum[1]]
            .into_iter()
            .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<WalPos> {
        if b.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(WalPos {
            ckpt_seq: be32(b, 0),
            salt: [be32(b, 4), be32(b, 8)],
            frame: be32(b, 12),
            cksum: [be32(b, 16), be32(b, 20)],
        })
    }
}

/// One committed transaction: the last version of every page it wrote.
#[derive(Debug, Default)]
pub struct Txn {
    /// Index of its commit frame.
    pub frame: u32,
    /// Database size in pages after it.
    pub db_pages: u32,
    /// Running checksum after its commit frame.
    pub cksum: [u32; 2],
    pub pages: BTreeMap<u32, Vec<u8>>,
    /// Set when the transaction wrote more than the reader holds in memory: `pages` is then
    /// empty and its pages are in frames `from..=frame` (read them with [`read_frames`]; a
    /// page may appear more than once, the last version wins).
    pub large_from: Option<u32>,
}

impl Txn {
    pub fn bytes(&self) -> usize {
        self.pages.values().map(|p| p.len() + 8).sum()
    }
}

/// Frames read per `pread`.
const READ_FRAMES: u32 = 256;

/// Reads the committed transactions that follow `pos` in the generation `h` heads (whose
/// salts must equal `pos`'s), stopping at the first frame that is not valid, after about
/// `max_bytes` of pages (never inside a transaction), or at end of file. Returns them and the
/// position after the last one. A transaction writing more than `hold_bytes` of pages is
/// returned without them (see [`Txn::large_from`]), so memory stays bounded.
pub fn read_committed(
    file: &File,
    h: &WalHeader,
    pos: WalPos,
    max_bytes: usize,
    hold_bytes: usize,
) -> io::Result<(Vec<Txn>, WalPos)> {
    debug_assert_eq!(h.salt, pos.salt);
    let flen = h.frame_len() as usize;
    let psize = h.page_size as usize;
    let mut out = Vec::new();
    let mut committed = pos;
    let mut cur = Txn::default();
    let mut cksum = pos.cksum;
    let mut n = pos.frame + 1;
    let mut bytes = 0usize;
    let mut cur_from = n;
    let mut buf = vec![0u8; flen * READ_FRAMES as usize];
    'read: loop {
        let got = read_at_most(file, &mut buf, h.frame_offset(n))?;
        let frames = got / flen;
        if frames == 0 {
            break;
        }
        for f in buf[..frames * flen].chunks_exact(flen) {
            let (fh, page) = f.split_at(FRAME_HEADER_LEN);
            if [be32(fh, 8), be32(fh, 12)] != h.salt {
                break 'read;
            }
            let c = checksum(h.big_endian, page, checksum(h.big_endian, &fh[..8], cksum));
            if c != [be32(fh, 16), be32(fh, 20)] {
                break 'read;
            }
            cksum = c;
            let pgno = be32(fh, 0);
            if pgno == 0 {
                break 'read;
            }
            if cur.large_from.is_none() {
                if cur.pages.is_empty() {
                    cur_from = n;
                }
                cur.pages.insert(pgno, page[..psize].to_vec());
                if cur.pages.len() * (psize + 8) > hold_bytes {
                    cur.pages.clear();
                    cur.large_from = Some(cur_from);
                }
            }
            let commit = be32(fh, 4);
            if commit != 0 {
                cur.frame = n;
                cur.db_pages = commit;
                cur.cksum = cksum;
                bytes += cur.bytes();
                out.push(std::mem::take(&mut cur));
                committed = WalPos { frame: n, cksum, ..pos };
                if bytes >= max_bytes {
                    break 'read;
                }
            }
            n += 1;
        }
        if frames < READ_FRAMES as usize {
            break;
        }
    }
    Ok((out, committed))
}

/// The pages of up to `count` frames from frame `from` on, as (page number, page), stopping
/// early at the end of the file or at a frame of another generation. For re-reading frames
/// [`read_committed`] already validated (a large transaction's): while the log is pinned,
/// committed frames do not change.
pub fn read_frames(file: &File, h: &WalHeader, from: u32, count: u32) -> io::Result<Vec<(u32, Vec<u8>)>> {
    let flen = h.frame_len() as usize;
    let mut buf = vec![0u8; flen * count as usize];
    let got = read_at_most(file, &mut buf, h.frame_offset(from))?;
    let mut out = Vec::with_capacity(got / flen);
    for f in buf[..got / flen * flen].chunks_exact(flen) {
        let (fh, page) = f.split_at(FRAME_HEADER_LEN);
        if [be32(fh, 8), be32(fh, 12)] != h.salt {
            break;
        }
        out.push((be32(fh, 0), page[..h.page_size as usize].to_vec()));
    }
    Ok(out)
}

/// Whether a valid frame continuing `pos`'s chain follows it (a transaction being written,
/// or left behind by a rollback), without reading further.
pub fn frame_follows(file: &File, h: &WalHeader, pos: WalPos) -> io::Result<bool> {
    if h.salt != pos.salt {
        return Ok(false);
    }
    let mut f = vec![0u8; h.frame_len() as usize];
    if read_at_most(file, &mut f, h.frame_offset(pos.frame + 1))? < f.len() {
        return Ok(false);
    }
    let (fh, page) = f.split_at(FRAME_HEADER_LEN);
    let c = checksum(h.big_endian, page, checksum(h.big_endian, &fh[..8], pos.cksum));
    Ok([be32(fh, 8), be32(fh, 12)] == h.salt && c == [be32(fh, 16), be32(fh, 20)])
}

fn read_at_most(file: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], off) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn wal_db(dir: &std::path::Path) -> (Connection, std::path::PathBuf) {
        let path = dir.join("t.db");
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").unwrap();
        (c, path)
    }

    fn wal(path: &std::path::Path) -> File {
        File::open(path.with_extension("db-wal")).unwrap()
    }

    #[test]
    fn reads_committed_transactions_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (c, path) = wal_db(dir.path());
        for i in 0..5 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")]).unwrap();
        }
        let f = wal(&path);
        let h = read_header(&f).unwrap().expect("header");
        let (txns, end) = read_committed(&f, &h, WalPos::start(&h), usize::MAX, usize::MAX).unwrap();
        // CREATE TABLE plus five inserts, each committed on its own.
        assert_eq!(txns.len(), 6);
        assert!(txns.windows(2).all(|w| w[0].frame < w[1].frame));
        assert_eq!(end.frame, txns.last().unwrap().frame);
        // Nothing more until the next commit; then exactly it.
        let (none, same) = read_committed(&f, &h, end, usize::MAX, usize::MAX).unwrap();
        assert!(none.is_empty());
        assert_eq!(same, end);
        c.execute("INSERT INTO t(v) VALUES ('x')", []).unwrap();
        let (more, end2) = read_committed(&f, &h, end, usize::MAX, usize::MAX).unwrap();
        assert_eq!(more.len(), 1);
        assert!(end2.frame > end.frame);
        // A budget stops between transactions, never inside one.
        let (first, mid) = read_committed(&f, &h, WalPos::start(&h), 1, usize::MAX).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(mid.frame, txns[0].frame);
    }

    #[test]
    fn uncommitted_and_reset_frames_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let (c, path) = wal_db(dir.path());
        c.execute("INSERT INTO t(v) VALUES ('a')", []).unwrap();
        let f = wal(&path);
        let h = read_header(&f).unwrap().unwrap();
        let (_, end) = read_committed(&f, &h, WalPos::start(&h), usize::MAX, usize::MAX).unwrap();
        // A large transaction spills frames before it commits; they are not returned.
        c.pragma_update(None, "cache_size", 2).unwrap();
        c.execute_batch("BEGIN").unwrap();
        for i in 0..2000 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("{i:0>200}")]).unwrap();
        }
        assert!(frame_follows(&f, &h, end).unwrap(), "spilled frames are on disk");
        let (none, _) = read_committed(&f, &h, end, usize::MAX, usize::MAX).unwrap();
        assert!(none.is_empty(), "no commit frame yet");
        c.execute_batch("ROLLBACK").unwrap();
        // Reset the log: stale frames of the old generation fail the salt test.
        c.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())).unwrap();
        c.execute("INSERT INTO t(v) VALUES ('b')", []).unwrap();
        let h2 = read_header(&f).unwrap().unwrap();
        assert_eq!(h2.ckpt_seq, h.ckpt_seq.wrapping_add(1));
        assert_eq!(h2.salt[0], h.salt[0].wrapping_add(1));
        let (stale, _) = read_committed(&f, &h, end, usize::MAX, usize::MAX).unwrap();
        assert!(stale.is_empty());
        let (fresh, _) = read_committed(&f, &h2, WalPos::start(&h2), usize::MAX, usize::MAX).unwrap();
        assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn large_transactions_are_not_held_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (c, path) = wal_db(dir.path());
        c.execute("INSERT INTO t(v) VALUES ('a')", []).unwrap();
        // Spills while it runs (tiny cache), so some pages are written more than once.
        c.pragma_update(None, "cache_size", 5).unwrap();
        c.execute_batch("BEGIN").unwrap();
        for i in 0..3000 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("{i:0>300}")]).unwrap();
            if i % 500 == 0 {
                c.execute("UPDATE t SET v = v || 'x' WHERE id = 1", []).unwrap();
            }
        }
        c.execute_batch("COMMIT").unwrap();
        c.execute("INSERT INTO t(v) VALUES ('after')", []).unwrap();
        let f = wal(&path);
        let h = read_header(&f).unwrap().unwrap();
        let (held, end) = read_committed(&f, &h, WalPos::start(&h), usize::MAX, usize::MAX).unwrap();
        let (light, end2) = read_committed(&f, &h, WalPos::start(&h), usize::MAX, 64 << 10).unwrap();
        assert_eq!(end, end2);
        assert_eq!(held.len(), light.len());
        let big = held.iter().position(|t| t.bytes() > 64 << 10).expect("a large transaction");
        assert!(light[big].pages.is_empty());
        let from = light[big].large_from.expect("marked large");
        assert_eq!(light[big].frame, held[big].frame);
        assert_eq!(from, held[big - 1].frame + 1);
        // Small transactions around it are held as usual.
        assert_eq!(light[big + 1].pages, held[big + 1].pages);
        assert!(light[big + 1].large_from.is_none());
        // Its frames read back in order give the same last version of every page.
        let mut pages = BTreeMap::new();
        let mut n = from;
        while n <= light[big].frame {
            let got = read_frames(&f, &h, n, (light[big].frame - n + 1).min(100)).unwrap();
            assert!(!got.is_empty());
            n += got.len() as u32;
            pages.extend(got);
        }
        assert_eq!(pages, held[big].pages);
    }

    #[test]
    fn corrupt_headers_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (_c, path) = wal_db(dir.path());
        let mut b = std::fs::read(path.with_extension("db-wal")).unwrap();
        assert!(WalHeader::parse(&b).is_some());
        for i in 0..HEADER_LEN {
            let mut x = b.clone();
            x[i] ^= 0x40;
            assert!(WalHeader::parse(&x).is_none(), "flipped byte {i}");
        }
        b.truncate(20);
        assert!(WalHeader::parse(&b).is_none());
        let p = WalPos { ckpt_seq: 7, salt: [1, 2], frame: 9, cksum: [3, 4] };
        assert_eq!(WalPos::decode(&p.encode()), Some(p));
    }
}
