//! The event model: positions (`Seq`, `JournalId`), source kinds, and the domain form of a
//! filesystem change (`FsOp`). Wire messages from `proto` become these with `TryFrom`, which is
//! where a malformed or hostile peer's input turns into a typed `EventError`.

use std::fmt;

use prost::Message;

use crate::proto;
use crate::relpath::{PathError, RelPath};

/// A journal sequence number: dense and increasing across one agent's journal. 0 means
/// "nothing yet" (or, on the wire, a resync snapshot entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);

    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }

    pub fn prev(self) -> Seq {
        Seq(self.0.saturating_sub(1))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identity of one journal incarnation (16 random bytes, created with the journal).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct JournalId(pub [u8; 16]);

impl JournalId {
    pub fn random() -> Self {
        JournalId(rand::random())
    }

    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(JournalId(b.try_into().ok()?))
    }
}

impl fmt::Display for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What kind of data a source or target holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Fs,
    Postgres,
    Sqlite,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Fs => "fs",
            SourceKind::Postgres => "postgres",
            SourceKind::Sqlite => "sqlite",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<SourceKind> for proto::SourceKind {
    fn from(k: SourceKind) -> Self {
        match k {
            SourceKind::Fs => proto::SourceKind::Fs,
            SourceKind::Postgres => proto::SourceKind::Postgres,
            SourceKind::Sqlite => proto::SourceKind::Sqlite,
        }
    }
}

impl TryFrom<proto::SourceKind> for SourceKind {
    type Error = EventError;
    fn try_from(k: proto::SourceKind) -> Result<Self, EventError> {
        match k {
            proto::SourceKind::Fs => Ok(SourceKind::Fs),
            proto::SourceKind::Postgres => Ok(SourceKind::Postgres),
            proto::SourceKind::Sqlite => Ok(SourceKind::Sqlite),
            proto::SourceKind::Unspecified => Err(EventError::Malformed("source kind unspecified".into())),
        }
    }
}

/// Why an event from a peer was refused. None of these are retried as-is: the sender has a bug
/// or is hostile, or the record was corrupted (then the stream is restarted and it is re-sent).
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("checksum mismatch on seq {seq}: record says {expected:08x}, payload has {actual:08x}")]
    Checksum { seq: u64, expected: u32, actual: u32 },
    #[error("undecodable payload: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("malformed event: {0}")]
    Malformed(String),
    #[error("bad path: {0}")]
    Path(#[from] PathError),
}

/// Largest block a `FileWrite` carries, and the unit of block-level deltas.
pub const BLOCK_SIZE: usize = 64 * 1024;

/// Most payload bytes one `FileWrite` event carries; bigger files span several events.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// One block of new file content at `offset`. The bytes are shared, not copied, between the
/// decoded event and the buffer it arrived in.
#[derive(Clone, PartialEq, Eq)]
pub struct Block {
    pub offset: u64,
    pub data: bytes::Bytes,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log file contents.
        write!(f, "Block {{ offset: {}, len: {} }}", self.offset, self.data.len())
    }
}

/// One extended attribute (POSIX ACLs are the `system.posix_acl_*` ones).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

impl fmt::Debug for Xattr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be anything a user stored: never logged.
        write!(f, "Xattr {{ name: {:?}, len: {} }}", String::from_utf8_lossy(&self.name), self.value.len())
    }
}

/// Owner, group and extended attributes of a path, as the source has them; see `proto::Meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// The source's names for `uid` and `gid`, when it has them.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Every extended attribute, sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// Most extended attributes one path may carry, and their limits (Linux's own: names up to
/// 255 bytes, values up to 64 KiB).
pub const MAX_XATTRS: usize = 1024;
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

/// What kind of special file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpecialKind {
    Fifo,
    CharDevice,
    BlockDevice,
}

/// A part (or all) of a file's new content; see `proto::FileWrite`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWrite {
    pub path: RelPath,
    pub first: bool,
    pub last: bool,
    pub delta: bool,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub blocks: Vec<Block>,
    pub content_hash: Option<[u8; 32]>,
    /// On the last chunk (from agents of 0.4.0 on).
    pub meta: Option<Meta>,
}

/// One filesystem change, validated. `meta: None` (from agents before 0.4.0): owner and
/// extended attributes are left as the standby has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsOp {
    Write(FileWrite),
    Mkdir {
        path: RelPath,
        mode: u32,
        meta: Option<Meta>,
    },
    Remove {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
    },
    /// Mode, owner and extended attributes of an existing path (the wire's `Chmod` too).
    SetAttr {
        path: RelPath,
        mode: u32,
        meta: Option<Meta>,
    },
    Symlink {
        path: RelPath,
        target: Vec<u8>,
        meta: Option<Meta>,
    },
    /// `path` becomes another name of the regular file at `target`.
    Link {
        path: RelPath,
        target: RelPath,
    },
    Special {
        path: RelPath,
        kind: SpecialKind,
        mode: u32,
        rdev: u64,
        meta: Option<Meta>,
    },
}

impl Meta {
    fn approx_bytes(&self) -> usize {
        16 + self.xattrs.iter().map(|x| x.name.len() + x.value.len() + 8).sum::<usize>()
    }
}

impl TryFrom<proto::Meta> for Meta {
    type Error = EventError;
    fn try_from(m: proto::Meta) -> Result<Self, EventError> {
        let name = |s: String, what: &str| -> Result<Option<String>, EventError> {
            if s.len() > 256 || s.contains('\0') {
                return Err(EventError::Malformed(format!("{what} name too long or with NUL")));
            }
            Ok(Some(s).filter(|s| !s.is_empty()))
        };
        if m.xattrs.len() > MAX_XATTRS {
            return Err(EventError::Malformed(format!("{} extended attributes", m.xattrs.len())));
        }
        let mut xattrs = Vec::with_capacity(m.xattrs.len());
        for x in m.xattrs {
            if x.name.is_empty() || x.name.len() > MAX_XATTR_NAME || x.name.contains(&0) || !x.name.contains(&b'.') {
                return Err(EventError::Malformed(
                    "extended attribute name empty, too long, without a namespace or with NUL".into(),
                ));
            }
            if x.value.len() > MAX_XATTR_VALUE {
                return Err(EventError::Malformed(format!("extended attribute value of {} bytes", x.value.len())));
            }
            xattrs.push(Xattr { name: x.name.to_vec(), value: x.value.to_vec() });
        }
        xattrs.sort();
        if xattrs.windows(2).any(|w| w[0].name == w[1].name) {
            return Err(EventError::Malformed("an extended attribute named twice".into()));
        }
        Ok(Meta { uid: m.uid, gid: m.gid, user: name(m.user, "user")?, group: name(m.group, "group")?, xattrs })
    }
}

impl From<Meta> for proto::Meta {
    fn from(m: Meta) -> Self {
        proto::Meta {
            uid: m.uid,
            gid: m.gid,
            user: m.user.unwrap_or_default(),
            group: m.group.unwrap_or_default(),
            xattrs: m.xattrs.into_iter().map(|x| proto::Xattr { name: x.name.into(), value: x.value.into() }).collect(),
        }
    }
}

impl FsOp {
    /// The path this change is about (the destination for a rename).
    pub fn path(&self) -> &RelPath {
        match self {
            FsOp::Write(w) => &w.path,
            FsOp::Mkdir { path, .. }
            | FsOp::Remove { path }
            | FsOp::SetAttr { path, .. }
            | FsOp::Symlink { path, .. }
            | FsOp::Link { path, .. }
            | FsOp::Special { path, .. } => path,
            FsOp::Rename { to, .. } => to,
        }
    }

    /// Approximate size in memory and on the wire, for flow control.
    pub fn approx_bytes(&self) -> usize {
        match self {
            FsOp::Write(w) => {
                64 + w.path.as_bytes().len()
                    + w.blocks.iter().map(|b| b.data.len() + 16).sum::<usize>()
                    + w.meta.as_ref().map_or(0, Meta::approx_bytes)
            }
            FsOp::Mkdir { meta, .. } | FsOp::SetAttr { meta, .. } | FsOp::Special { meta, .. } => {
                64 + self.path().as_bytes().len() + meta.as_ref().map_or(0, Meta::approx_bytes)
            }
            _ => 64 + self.path().as_bytes().len(),
        }
    }
}

/// One line naming the change, without its data (for logs).
impl std::fmt::Display for FsOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsOp::Write(w) => write!(
                f,
                "write {}{}{}{} size {}",
                w.path,
                if w.delta { " (delta)" } else { "" },
                if w.first { " first" } else { "" },
                if w.last { " last" } else { "" },
                w.size
            ),
            FsOp::Mkdir { path, mode, .. } => write!(f, "mkdir {path} {mode:o}"),
            FsOp::Remove { path } => write!(f, "remove {path}"),
            FsOp::Rename { from, to } => write!(f, "rename {from} -> {to}"),
            FsOp::SetAttr { path, mode, .. } => write!(f, "setattr {path} {mode:o}"),
            FsOp::Symlink { path, .. } => write!(f, "symlink {path}"),
            FsOp::Link { path, target } => write!(f, "link {path} = {target}"),
            FsOp::Special { path, kind, .. } => write!(f, "special {path} {kind:?}"),
        }
    }
}

/// A change event in domain form.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Fs(FsOp),
    /// Opaque payloads of other source kinds, passed through untouched.
    Other(proto::change_event::Change),
}

const MODE_MASK: u32 = 0o7777;

impl TryFrom<proto::FsChange> for FsOp {
    type Error = EventError;
    fn try_from(c: proto::FsChange) -> Result<Self, EventError> {
        use proto::fs_change::Op;
        let path = |b: bytes::Bytes| RelPath::new(b.to_vec());
        let meta = |m: Option<proto::Meta>| m.map(Meta::try_from).transpose();
        let op = c.op.ok_or_else(|| EventError::Malformed("fs change without op".into()))?;
        Ok(match op {
            Op::Write(w) => {
                let mut blocks = Vec::with_capacity(w.blocks.len());
                for b in w.blocks {
                    if b.data.len() > CHUNK_BYTES {
                        return Err(EventError::Malformed(format!("block of {} bytes", b.data.len())));
                    }
                    let end = b.offset.checked_add(b.data.len() as u64);
                    if end.is_none_or(|e| e > w.size) {
                        return Err(EventError::Malformed(format!(
                            "block at {} len {} beyond file size {}",
                            b.offset,
                            b.data.len(),
                            w.size
                        )));
                    }
                    blocks.push(Block { offset: b.offset, data: b.data });
                }
                let content_hash = if w.content_hash.is_empty() {
                    None
                } else {
                    Some(
                        <[u8; 32]>::try_from(&w.content_hash[..])
                            .map_err(|_| EventError::Malformed("content hash is not 32 bytes".into()))?,
                    )
                };
                if w.last && content_hash.is_none() {
                    return Err(EventError::Malformed("last file chunk without content hash".into()));
                }
                FsOp::Write(FileWrite {
                    path: path(w.path)?,
                    first: w.first,
                    last: w.last,
                    delta: w.delta,
                    size: w.size,
                    mode: w.mode & MODE_MASK,
                    mtime_ns: w.mtime_ns,
                    blocks,
                    content_hash,
                    meta: meta(w.meta)?,
                })
            }
            Op::Mkdir(m) => FsOp::Mkdir { path: path(m.path)?, mode: m.mode & MODE_MASK, meta: meta(m.meta)? },
            Op::Remove(r) => FsOp::Remove { path: path(r.path)? },
            Op::Rename(r) => {
                let from = path(r.from)?;
                let to = path(r.to)?;
                if to.starts_with(&from) && to != from {
                    return Err(EventError::Malformed(format!("rename of {from} into itself ({to})")));
                }
                FsOp::Rename { from, to }
            }
            Op::Chmod(c) => FsOp::SetAttr { path: path(c.path)?, mode: c.mode & MODE_MASK, meta: None },
            Op::SetAttr(c) => FsOp::SetAttr { path: path(c.path)?, mode: c.mode & MODE_MASK, meta: meta(c.meta)? },
            Op::Symlink(s) => {
                if s.target.is_empty() || s.target.contains(&0) || s.target.len() > crate::relpath::MAX_PATH_BYTES {
                    return Err(EventError::Malformed("symlink target empty, too long or with NUL".into()));
                }
                FsOp::Symlink { path: path(s.path)?, target: s.target.to_vec(), meta: meta(s.meta)? }
            }
            Op::Link(l) => {
                let (p, target) = (path(l.path)?, path(l.target)?);
                if p == target {
                    return Err(EventError::Malformed(format!("hard link {p} to itself")));
                }
                FsOp::Link { path: p, target }
            }
            Op::Special(sp) => {
                let kind = match proto::SpecialKind::try_from(sp.kind) {
                    Ok(proto::SpecialKind::Fifo) => SpecialKind::Fifo,
                    Ok(proto::SpecialKind::CharDevice) => SpecialKind::CharDevice,
                    Ok(proto::SpecialKind::BlockDevice) => SpecialKind::BlockDevice,
                    _ => return Err(EventError::Malformed(format!("special file of unknown kind {}", sp.kind))),
                };
                FsOp::Special {
                    path: path(sp.path)?,
                    kind,
                    mode: sp.mode & MODE_MASK,
                    rdev: sp.rdev,
                    meta: meta(sp.meta)?,
                }
            }
        })
    }
}

impl From<FsOp> for proto::FsChange {
    fn from(op: FsOp) -> Self {
        use proto::fs_change::Op;
        let b = |p: RelPath| bytes::Bytes::from(p.into_bytes());
        let op = match op {
            FsOp::Write(w) => Op::Write(proto::FileWrite {
                path: b(w.path),
                first: w.first,
                last: w.last,
                delta: w.delta,
                size: w.size,
                mode: w.mode,
                mtime_ns: w.mtime_ns,
                blocks: w.blocks.into_iter().map(|bl| proto::Block { offset: bl.offset, data: bl.data }).collect(),
                content_hash: w.content_hash.map(|h| h.to_vec().into()).unwrap_or_default(),
                meta: w.meta.map(Into::into),
            }),
            FsOp::Mkdir { path, mode, meta } => {
                Op::Mkdir(proto::Mkdir { path: b(path), mode, meta: meta.map(Into::into) })
            }
            FsOp::Remove { path } => Op::Remove(proto::Remove { path: b(path) }),
            FsOp::Rename { from, to } => Op::Rename(proto::Rename { from: b(from), to: b(to) }),
            // Without metadata, the form every receiver understands.
            FsOp::SetAttr { path, mode, meta: None } => Op::Chmod(proto::Chmod { path: b(path), mode }),
            FsOp::SetAttr { path, mode, meta: Some(m) } => {
                Op::SetAttr(proto::SetAttr { path: b(path), mode, meta: Some(m.into()) })
            }
            FsOp::Symlink { path, target, meta } => {
                Op::Symlink(proto::Symlink { path: b(path), target: target.into(), meta: meta.map(Into::into) })
            }
            FsOp::Link { path, target } => Op::Link(proto::Link { path: b(path), target: b(target) }),
            FsOp::Special { path, kind, mode, rdev, meta } => Op::Special(proto::Special {
                path: b(path),
                kind: match kind {
                    SpecialKind::Fifo => proto::SpecialKind::Fifo,
                    SpecialKind::CharDevice => proto::SpecialKind::CharDevice,
                    SpecialKind::BlockDevice => proto::SpecialKind::BlockDevice,
                } as i32,
                mode,
                rdev,
                meta: meta.map(Into::into),
            }),
        };
        proto::FsChange { op: Some(op) }
    }
}

impl Change {
    /// Encodes into `ChangeEvent` payload bytes.
    pub fn encode(self) -> Vec<u8> {
        let change = match self {
            Change::Fs(op) => proto::change_event::Change::Fs(op.into()),
            Change::Other(c) => c,
        };
        proto::ChangeEvent { change: Some(change) }.encode_to_vec()
    }

    /// Decodes and validates `ChangeEvent` payload bytes.
    pub fn decode(payload: &[u8]) -> Result<Change, EventError> {
        Self::from_proto(proto::ChangeEvent::decode(payload)?)
    }

    /// Like [`Change::decode`], but byte fields share `payload`'s buffer instead of copying it.
    pub fn decode_bytes(payload: bytes::Bytes) -> Result<Change, EventError> {
        Self::from_proto(proto::ChangeEvent::decode(payload)?)
    }

    fn from_proto(ev: proto::ChangeEvent) -> Result<Change, EventError> {
        match ev.change.ok_or_else(|| EventError::Malformed("empty change event".into()))? {
            proto::change_event::Change::Fs(fs) => Ok(Change::Fs(fs.try_into()?)),
            other => Ok(Change::Other(other)),
        }
    }
}

/// crc32 of payload bytes as carried in `proto::Event::crc32`.
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// Builds a wire/journal event around an encoded change.
pub fn make_event(seq: Seq, source: &str, captured_at_us: i64, payload: Vec<u8>) -> proto::Event {
    proto::Event {
        seq: seq.0,
        source: source.to_string(),
        captured_at_us,
        crc32: payload_crc(&payload),
        codec: proto::Codec::None as i32,
        payload: payload.into(),
    }
}

/// Checks an event's checksum and decodes its change.
pub fn open_event(ev: &proto::Event) -> Result<Change, EventError> {
    let actual = payload_crc(&ev.payload);
    if actual != ev.crc32 {
        return Err(EventError::Checksum { seq: ev.seq, expected: ev.crc32, actual });
    }
    match proto::Codec::try_from(ev.codec) {
        Ok(proto::Codec::None) => Change::decode_bytes(ev.payload.clone()),
        _ => Err(EventError::Malformed(format!("unsupported codec {}", ev.codec))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn roundtrip_and_crc() {
        let op = FsOp::Write(FileWrite {
            path: rp("a/b"),
            first: true,
            last: true,
            delta: false,
            size: 3,
            mode: 0o644,
            mtime_ns: 5,
            blocks: vec![Block { offset: 0, data: bytes::Bytes::from_static(b"abc") }],
            content_hash: Some(*blake3::hash(b"abc").as_bytes()),
            meta: Some(Meta {
                uid: 65534,
                gid: 65534,
                user: Some("nobody".into()),
                group: None,
                xattrs: vec![Xattr { name: b"user.a".to_vec(), value: b"1".to_vec() }],
            }),
        });
        let ev = make_event(Seq(7), "www", 1, Change::Fs(op.clone()).encode());
        assert_eq!(open_event(&ev).unwrap(), Change::Fs(op));
        let mut bad = ev.clone();
        let mut p = bad.payload.to_vec();
        p[3] ^= 1;
        bad.payload = p.into();
        assert!(matches!(open_event(&bad), Err(EventError::Checksum { .. })));
    }

    #[test]
    fn refuses_hostile_paths_and_blocks() {
        let bad =
            proto::FsChange { op: Some(proto::fs_change::Op::Remove(proto::Remove { path: b"../x".to_vec().into() })) };
        assert!(FsOp::try_from(bad).is_err());
        let beyond = proto::FsChange {
            op: Some(proto::fs_change::Op::Write(proto::FileWrite {
                path: b"x".to_vec().into(),
                size: 2,
                blocks: vec![proto::Block { offset: u64::MAX, data: b"zz".to_vec().into() }],
                ..Default::default()
            })),
        };
        assert!(FsOp::try_from(beyond).is_err());
        let into_self = proto::FsChange {
            op: Some(proto::fs_change::Op::Rename(proto::Rename {
                from: b"a".to_vec().into(),
                to: b"a/b".to_vec().into(),
            })),
        };
        assert!(FsOp::try_from(into_self).is_err());
        let link_out = proto::FsChange {
            op: Some(proto::fs_change::Op::Link(proto::Link {
                path: b"a".to_vec().into(),
                target: b"/etc/passwd".to_vec().into(),
            })),
        };
        assert!(FsOp::try_from(link_out).is_err());
        let bad_xattr = |name: &[u8]| proto::FsChange {
            op: Some(proto::fs_change::Op::SetAttr(proto::SetAttr {
                path: b"a".to_vec().into(),
                mode: 0o644,
                meta: Some(proto::Meta {
                    xattrs: vec![proto::Xattr { name: name.to_vec().into(), value: Default::default() }],
                    ..Default::default()
                }),
            })),
        };
        assert!(FsOp::try_from(bad_xattr(b"")).is_err());
        assert!(FsOp::try_from(bad_xattr(b"user.a\0b")).is_err());
        assert!(FsOp::try_from(bad_xattr(b"noNamespace")).is_err());
        assert!(FsOp::try_from(bad_xattr(b"user.ok")).is_ok());
    }

    #[test]
    fn every_op_roundtrips() {
        let meta = Some(Meta { uid: 1, gid: 2, user: None, group: Some("g".into()), xattrs: vec![] });
        let ops = vec![
            FsOp::Mkdir { path: rp("d"), mode: 0o755, meta: meta.clone() },
            FsOp::SetAttr { path: rp("d"), mode: 0o700, meta: meta.clone() },
            FsOp::SetAttr { path: rp("d"), mode: 0o700, meta: None },
            FsOp::Symlink { path: rp("l"), target: b"../x".to_vec(), meta: meta.clone() },
            FsOp::Link { path: rp("h"), target: rp("d/f") },
            FsOp::Special { path: rp("p"), kind: SpecialKind::Fifo, mode: 0o600, rdev: 0, meta: meta.clone() },
            FsOp::Special { path: rp("c"), kind: SpecialKind::CharDevice, mode: 0o666, rdev: 0x103, meta },
        ];
        for op in ops {
            let ev = make_event(Seq(1), "www", 1, Change::Fs(op.clone()).encode());
            assert_eq!(open_event(&ev).unwrap(), Change::Fs(op));
        }
    }
}
