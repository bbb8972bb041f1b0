//! A small state record kept durably *in place*: a file of two fixed 512-byte slots written
//! alternately, each holding a [`frame`]d body with a write counter. A write is one `pwrite`
//! and one `fdatasync` — no temp file, rename or directory sync on the path of every commit —
//! and a write torn by a crash leaves the other slot, the previous record, intact. Reading
//! takes the valid slot with the higher counter.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lockstep_common::frame;

use super::ApplyError;

const SLOT: usize = 512;

pub(crate) struct SlotFile {
    path: PathBuf,
    file: Option<File>,
    counter: u64,
}

impl SlotFile {
    /// Opens the record at `path` and returns its body, if any (`len` bytes). A file whose
    /// slots are both unreadable is an error naming the file and the fix.
    pub(crate) fn open(path: &Path, len: usize) -> Result<(SlotFile, Option<Vec<u8>>), ApplyError> {
        let ctx = || format!("read position file {}", path.display());
        let mut sf = SlotFile { path: path.to_path_buf(), file: None, counter: 0 };
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((sf, None)),
            Err(error) => return Err(ApplyError::Io { context: ctx(), error }),
        };
        if data.iter().all(|&b| b == 0) {
            // Created, never written (a crash right after creating it).
            return Ok((sf, None));
        }
        let mut best: Option<(u64, Vec<u8>)> = None;
        for slot in data.chunks(SLOT).take(2) {
            if let Some((counter, body)) = decode_slot(slot, len) {
                if best.as_ref().is_none_or(|(c, _)| counter > *c) {
                    best = Some((counter, body));
                }
            }
        }
        match best {
            Some((counter, body)) => {
                sf.counter = counter;
                Ok((sf, Some(body)))
            }
            None => Err(ApplyError::Io {
                context: ctx(),
                error: io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no readable record in it; restore the file or remove it to resync this target",
                ),
            }),
        }
    }

    /// Durably replaces the record with `body`.
    pub(crate) fn write(&mut self, body: &[u8]) -> Result<(), ApplyError> {
        let err = |error| ApplyError::Io { context: format!("write position file {}", self.path.display()), error };
        let created = self.file.is_none();
        if created {
            let f =
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.path).map_err(err)?;
            self.file = Some(f);
        }
        let counter = self.counter + 1;
        let mut framed = counter.to_le_bytes().to_vec();
        framed.extend_from_slice(body);
        let framed = frame::encode(&framed);
        assert!(framed.len() + 2 <= SLOT, "slot record too large");
        let mut slot = vec![0u8; SLOT];
        slot[..2].copy_from_slice(&(framed.len() as u16).to_le_bytes());
        slot[2..2 + framed.len()].copy_from_slice(&framed);
        let f = self.file.as_ref().expect("opened above");
        let off = (counter % 2) * SLOT as u64;
        f.write_all_at(&slot, off).and_then(|()| f.sync_data()).map_err(err)?;
        if created {
            let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        self.counter = counter;
        Ok(())
    }
}

fn decode_slot(slot: &[u8], len: usize) -> Option<(u64, Vec<u8>)> {
    let n = usize::from(u16::from_le_bytes(slot.get(..2)?.try_into().ok()?));
    let body = frame::decode(slot.get(2..2 + n)?).ok()?;
    if body.len() != 8 + len {
        return None;
    }
    Some((u64::from_le_bytes(body[..8].try_into().ok()?), body[8..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_readable_slot_wins_and_torn_writes_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pos");
        let (mut f, none) = SlotFile::open(&p, 4).unwrap();
        assert!(none.is_none());
        for i in 0u32..5 {
            f.write(&i.to_le_bytes()).unwrap();
            let (_, got) = SlotFile::open(&p, 4).unwrap();
            assert_eq!(got.unwrap(), i.to_le_bytes());
        }
        // Tear the newest slot (counter 5 lives in slot 1): the previous record comes back.
        let mut data = std::fs::read(&p).unwrap();
        data[SLOT + 10] ^= 0xff;
        std::fs::write(&p, &data).unwrap();
        let (mut f, got) = SlotFile::open(&p, 4).unwrap();
        assert_eq!(got.unwrap(), 3u32.to_le_bytes());
        // Writing goes on from there, over the torn slot.
        f.write(&9u32.to_le_bytes()).unwrap();
        assert_eq!(SlotFile::open(&p, 4).unwrap().1.unwrap(), 9u32.to_le_bytes());
        // Both slots unreadable: an error that names the fix.
        std::fs::write(&p, vec![7u8; 2 * SLOT]).unwrap();
        let e = SlotFile::open(&p, 4).err().unwrap().to_string();
        assert!(e.contains("remove it to resync"), "{e}");
    }
}
