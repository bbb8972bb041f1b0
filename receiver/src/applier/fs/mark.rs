//! The applied mark: how far the fs applier really got, recorded after every change it applies.
//!
//! A commit flushes the whole filesystem (`syncfs`) and is therefore made once per round, not
//! per change; the changes applied after it are in the tree but not covered by the durable
//! position. Re-applying them after a crash is not safe in general: a replayed write recreates
//! a directory that a later rename moved away, and the replayed rename then replaces the newer
//! directory with it. So the applier never replays what it already applied. After each change
//! it overwrites this small file (`pwrite`, no fsync) with the change's position and the repairs
//! found since the last commit, stamped with the kernel's boot id:
//!
//! - After the receiver process dies (kill -9, OOM, panic), the page cache still holds exactly
//!   what it did: the tree is the committed state plus every change up to the mark, and at most
//!   the change after the mark half-done (each operation is safe to redo over its own partial
//!   result). The applier flushes the tree and commits the mark's position, and re-requests the
//!   repairs the dead process may not have sent.
//! - After the machine restarts (another boot id), the tree may hold any subset of the changes
//!   after the durable position, so nothing can be trusted: the target is resynced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use lockstep_common::frame;
use lockstep_common::relpath::RelPath;
use tracing::warn;

use super::tree::io_err;
use crate::applier::{ApplyError, Position, POSITION_LEN};

/// Where the running kernel publishes its boot id (a UUID, new at every boot).
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The mark file and the mark last written to (or read from) it.
pub(super) struct AppliedMark {
    path: PathBuf,
    /// Opened on the first write.
    file: Option<File>,
    /// This boot's id; `None` where the kernel does not publish one (marks of an earlier
    /// process can then never be trusted).
    boot: Option<[u8; 16]>,
    /// The last change applied, by this process or (as read at open) an earlier one.
    pub(super) pos: Option<Position>,
    /// Whether `pos` is known to have been written in this boot: by this process, or by an
    /// earlier one whose page cache this kernel still holds.
    pub(super) this_boot: bool,
    /// Repairs found since the last commit; they may not have reached the agent yet.
    pub(super) repairs: Vec<(RelPath, String)>,
}

impl AppliedMark {
    /// Reads the mark file if present. An unreadable or torn one is ignored with a warning (it
    /// can only be torn by a machine crash, after which it would not be trusted anyway).
    pub(super) fn open(path: PathBuf) -> Result<AppliedMark, ApplyError> {
        let boot = boot_id();
        let mut mark = AppliedMark { path, file: None, boot, pos: None, this_boot: false, repairs: Vec::new() };
        let rec = match std::fs::read(&mark.path) {
            Ok(rec) => rec,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(mark),
            Err(e) => return Err(io_err(format!("read applied mark {}", mark.path.display()))(e)),
        };
        match decode(&rec) {
            Some((rec_boot, pos, repairs)) => {
                mark.this_boot = boot.is_some() && boot == Some(rec_boot);
                mark.pos = Some(pos);
                mark.repairs = repairs;
            }
            None => warn!(path = %mark.path.display(), "applied mark unreadable; ignoring it"),
        }
        Ok(mark)
    }

    /// Records that the change at `pos` has been applied (with whatever repairs it and the
    /// changes since the last commit asked for).
    pub(super) fn record(&mut self, pos: Position) -> Result<(), ApplyError> {
        self.pos = Some(pos);
        self.this_boot = true;
        self.write()
    }

    /// Overwrites the file with the current mark. Not synced: it must survive the process, not
    /// the machine.
    fn write(&mut self) -> Result<(), ApplyError> {
        let Some(pos) = self.pos else { return Ok(()) };
        let ctx = || format!("write applied mark {}", self.path.display());
        if self.file.is_none() {
            let f =
                OpenOptions::new().create(true).truncate(false).write(true).open(&self.path).map_err(io_err(ctx()))?;
            self.file = Some(f);
        }
        let rec = encode(self.boot.unwrap_or_default(), pos, &self.repairs);
        let file = self.file.as_ref().expect("opened above");
        // One write(2): a killed process leaves the old or the new record, never a mix.
        file.write_all_at(&rec, 0).map_err(io_err(ctx()))
    }
}

/// `[u32 LE length][frame]`, the frame's body being boot id, position, then the repairs as
/// `[u32 path len][path][u32 reason len][reason]`. The length prefix lets a shorter record
/// overwrite a longer one in place.
fn encode(boot: [u8; 16], pos: Position, repairs: &[(RelPath, String)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + POSITION_LEN);
    body.extend_from_slice(&boot);
    body.extend_from_slice(&pos.to_bytes());
    for (path, reason) in repairs {
        for part in [path.as_bytes(), reason.as_bytes()] {
            body.extend_from_slice(&(part.len() as u32).to_le_bytes());
            body.extend_from_slice(part);
        }
    }
    let framed = frame::encode(&body);
    let mut rec = (framed.len() as u32).to_le_bytes().to_vec();
    rec.extend_from_slice(&framed);
    rec
}

type Decoded = ([u8; 16], Position, Vec<(RelPath, String)>);

fn decode(rec: &[u8]) -> Option<Decoded> {
    let len = u32::from_le_bytes(rec.get(..4)?.try_into().ok()?) as usize;
    let body = frame::decode(rec.get(4..4 + len)?).ok()?;
    let boot: [u8; 16] = body.get(..16)?.try_into().ok()?;
    let pos = Position::from_bytes(body.get(16..16 + POSITION_LEN)?);
    let mut rest = &body[16 + POSITION_LEN..];
    let mut take = || -> Option<&[u8]> {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let part = rest.get(4..4 + n)?;
        rest = &rest[4 + n..];
        Some(part)
    };
    let mut repairs = Vec::new();
    while let Some(path) = take() {
        let path = RelPath::new(path.to_vec()).ok()?;
        let reason = String::from_utf8_lossy(take()?).into_owned();
        repairs.push((path, reason));
    }
    Some((boot, pos, repairs))
}

/// This boot's id, from the kernel.
fn boot_id() -> Option<[u8; 16]> {
    let text = std::fs::read_to_string(BOOT_ID_PATH).ok()?;
    let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
pub(super) mod tests {
    use lockstep_common::event::{JournalId, Seq};

    use super::*;

    /// Rewrites the mark file as if an earlier boot had written it.
    pub(in crate::applier::fs) fn age_to_previous_boot(path: &std::path::Path) {
        let rec = std::fs::read(path).unwrap();
        let (_, pos, repairs) = decode(&rec).unwrap();
        std::fs::write(path, encode([0xee; 16], pos, &repairs)).unwrap();
    }

    #[test]
    fn round_trips_and_shrinks_in_place() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("m");
        let pos = |s| Position { journal_id: JournalId([7; 16]), seq: Seq(s) };
        let mut m = AppliedMark::open(path.clone()).unwrap();
        assert_eq!(m.pos, None);
        m.repairs.push((RelPath::new(b"a/b".to_vec()).unwrap(), "why".into()));
        m.record(pos(5)).unwrap();
        m.repairs.clear();
        m.record(pos(6)).unwrap();
        let m = AppliedMark::open(path.clone()).unwrap();
        assert_eq!(m.pos, Some(pos(6)));
        assert!(m.repairs.is_empty());
        assert_eq!(m.this_boot, boot_id().is_some());
        age_to_previous_boot(&path);
        assert!(!AppliedMark::open(path.clone()).unwrap().this_boot);
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(AppliedMark::open(path).unwrap().pos, None);
    }
}
