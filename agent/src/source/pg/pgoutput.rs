//! Decoder for `pgoutput`, PostgreSQL's built-in logical decoding output plugin.
//!
//! A logical replication slot created with the `pgoutput` plugin turns the write-ahead log into
//! a stream of row-level change messages: a transaction arrives as `Begin`, then `Relation` /
//! `Type` descriptions (sent before the first change to a table or type in the session, and
//! again whenever its schema changes), `Insert` / `Update` / `Delete` / `Truncate` changes and
//! logical decoding `Message`s, and finally `Commit`. On a walsender connection each message is
//! the payload of one `XLogData` (`'w'`) message of the streaming replication protocol; this
//! module decodes that payload, nothing around it. The formats are described in the
//! PostgreSQL manual, "Logical Replication Message Formats".
//!
//! Scope:
//! - protocol version 1 (`proto_version '1'`), which every PostgreSQL from 10 on speaks;
//! - no streaming of in-progress transactions (protocol 2: `Stream Start/Stop/Commit/Abort`,
//!   and the extra xid field it inserts into other messages) and no two-phase commit
//!   (protocol 3: `Begin Prepare`, `Prepare`, `Commit Prepared`, ...): those tags are
//!   recognised and refused with [`DecodeError::Unsupported`], so a slot opened with the wrong
//!   options fails loudly instead of being misparsed.
//!
//! The decoder is strict, because its input crosses a trust boundary and a misparse would
//! silently corrupt replicated data: a message must be exactly one well-formed message (no
//! trailing bytes), every marker byte must be one the protocol defines, lengths must be
//! non-negative and fit in what is left, and names must be UTF-8 (PostgreSQL sends them in the
//! connection's client encoding, which a replication client sets to UTF-8). It never panics
//! and never allocates more than the input could justify: a count is checked against the bytes
//! remaining before anything is reserved for it. Flag fields keep only the bits protocol 1
//! defines (reserved bits are ignored), except `Commit`'s, which is passed through as given.
//!
//! It is also zero-copy where it matters: column values and message contents are
//! [`Bytes::slice`]s of the input buffer. Tuple widths are not checked against the relation:
//! the caller, which keeps the `Relation` messages, is the one that knows the expected width.
//!
//! [`copy_line`] renders a decoded row in the text format of `COPY ... FROM STDIN`, and
//! [`pg_time_to_unix_us`] converts PostgreSQL timestamps to the Unix epoch.

use std::fmt;

use bytes::Bytes;

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL (`'n'`).
    Null,
    /// An unchanged TOASTed value (`'u'`): the update did not touch it and the server did not
    /// send it; the receiver keeps the value it already has.
    Unchanged,
    /// The value in the type's text output format (`'t'`), in the client encoding.
    Text(Bytes),
    /// The value in the type's binary send format (`'b'`), only with the `binary` option.
    Binary(Bytes),
}

/// The columns of one row (TupleData), in relation column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

/// Which form of the old row an `Update` or `Delete` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `'K'`: only the replica identity key columns are set, the others are NULL.
    Key,
    /// `'O'`: the whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// Whether the column is part of the replica identity key.
    pub key: bool,
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// The column's type modifier (`atttypmod`, -1 for none).
    pub type_mod: i32,
}

/// A table description, sent before the first change to it and after each schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// OID of the relation; the `rel` field of changes refers to it.
    pub id: u32,
    /// Schema name as sent (the protocol sends an empty string for `pg_catalog`).
    pub namespace: String,
    pub name: String,
    /// `relreplident`: `b'd'` default (primary key), `b'n'` nothing, `b'f'` full, `b'i'` index.
    pub replica_identity: u8,
    /// The published columns (generated and dropped columns are never sent).
    pub columns: Vec<RelColumn>,
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    /// `'B'`: a transaction starts. Times are microseconds since 2000-01-01 UTC
    /// (see [`pg_time_to_unix_us`]).
    Begin { final_lsn: u64, commit_time: i64, xid: u32 },
    /// `'C'`: the transaction begun by the last `Begin` commits. `flags` is currently always 0.
    Commit { flags: u8, commit_lsn: u64, end_lsn: u64, commit_time: i64 },
    /// `'O'`: the transaction was replicated from another node (replication origin).
    Origin { lsn: u64, name: String },
    /// `'R'`: a table description.
    Relation(Relation),
    /// `'Y'`: a non-builtin data type used by a following relation.
    Type { id: u32, namespace: String, name: String },
    /// `'I'`: a row was inserted.
    Insert { rel: u32, new: Tuple },
    /// `'U'`: a row was updated; `old` is present when the key changed or the table has
    /// `REPLICA IDENTITY FULL`.
    Update { rel: u32, old: Option<(OldKind, Tuple)>, new: Tuple },
    /// `'D'`: a row was deleted.
    Delete { rel: u32, old: (OldKind, Tuple) },
    /// `'T'`: tables were truncated together.
    Truncate { rels: Vec<u32>, cascade: bool, restart_identity: bool },
    /// `'M'`: a logical decoding message (`pg_logical_emit_message`).
    Message { transactional: bool, lsn: u64, prefix: String, content: Bytes },
}

/// Why a message could not be decoded (or a tuple rendered). Offsets count from the start of
/// the message, whose first byte (offset 0) is the tag.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput: empty message")]
    Empty,
    #[error("pgoutput: unknown message tag {}", ByteChar(*.tag))]
    UnknownTag { tag: u8 },
    #[error("pgoutput: message tag {} ({what}) is not supported by this protocol version 1 decoder", ByteChar(*.tag))]
    Unsupported { tag: u8, what: &'static str },
    #[error("pgoutput {} message: {what} at byte {offset}: needs {needed} bytes, only {remaining} left", ByteChar(*.tag))]
    Truncated { tag: u8, offset: usize, what: &'static str, needed: usize, remaining: usize },
    #[error("pgoutput {} message: {what} at byte {offset}: string has no NUL terminator", ByteChar(*.tag))]
    Unterminated { tag: u8, offset: usize, what: &'static str },
    #[error("pgoutput {} message: {what}: invalid UTF-8 at byte {offset}", ByteChar(*.tag))]
    NotUtf8 { tag: u8, offset: usize, what: &'static str },
    #[error("pgoutput {} message: {what} at byte {offset}: unexpected byte {}", ByteChar(*.tag), ByteChar(*.found))]
    UnexpectedByte { tag: u8, offset: usize, what: &'static str, found: u8 },
    #[error("pgoutput {} message: {what} at byte {offset} is negative ({value})", ByteChar(*.tag))]
    NegativeLength { tag: u8, offset: usize, what: &'static str, value: i32 },
    #[error("pgoutput {} message: {what} at byte {offset} is {count}, more than the {remaining} bytes left can hold", ByteChar(*.tag))]
    CountTooLarge { tag: u8, offset: usize, what: &'static str, count: usize, remaining: usize },
    #[error("pgoutput {} message: {extra} trailing bytes after the message ends at byte {offset}", ByteChar(*.tag))]
    TrailingBytes { tag: u8, offset: usize, extra: usize },
    #[error("COPY text: column {column} is {what}, which has no COPY text form")]
    NotCopyText { column: usize, what: &'static str },
}

/// Shows a protocol byte as `'X'` when it is printable ASCII, else as `0xNN`.
struct ByteChar(u8);

impl fmt::Display for ByteChar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() || self.0 == b' ' {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Microseconds from the Unix epoch (1970-01-01) to the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Postgres epoch (2000-01-01) microseconds -> Unix epoch microseconds.
///
/// PostgreSQL's `-infinity` / `infinity` (`i64::MIN` / `i64::MAX`) are kept as they are, and
/// other values saturate rather than overflow.
pub fn pg_time_to_unix_us(t: i64) -> i64 {
    match t {
        i64::MIN | i64::MAX => t,
        _ => t.saturating_add(PG_EPOCH_OFFSET_US),
    }
}

/// Minimum encoded size of one TupleData column (its kind byte).
const MIN_TUPLE_COLUMN: usize = 1;
/// Minimum encoded size of one Relation column: flags, an empty name's NUL, type OID, typmod.
const MIN_REL_COLUMN: usize = 1 + 1 + 4 + 4;
/// Encoded size of one relation OID in a Truncate message.
const REL_OID: usize = 4;

/// Decodes one pgoutput message (the payload of one XLogData). Text and binary values and
/// message content are zero-copy slices of `buf` ([`Bytes::slice`]).
///
/// Never panics, whatever the input. Refuses, naming the tag, the field and its byte offset:
/// trailing bytes, unknown tags (and those of later protocol versions), markers, column kinds
/// and replica identities the protocol does not define, negative lengths and counts, lengths
/// longer than the rest of the message, strings that are unterminated or not UTF-8, and tuples
/// whose column count does not match the data that follows. Every count is checked against the
/// bytes remaining before anything is allocated for it, so memory use stays proportional to
/// the input.
pub fn decode(buf: &Bytes) -> Result<PgOutput, DecodeError> {
    let &tag = buf.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { buf, pos: 1, tag };
    let msg = match tag {
        b'B' => PgOutput::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        },
        b'C' => PgOutput::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_time: r.i64("commit timestamp")?,
        },
        b'O' => PgOutput::Origin { lsn: r.u64("origin LSN")?, name: r.string("origin name")? },
        b'R' => PgOutput::Relation(r.relation()?),
        b'Y' => PgOutput::Type {
            id: r.u32("type OID")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let rel = r.u32("relation OID")?;
            r.expect(b'N', "new tuple marker ('N')")?;
            PgOutput::Insert { rel, new: r.tuple()? }
        }
        b'U' => {
            let rel = r.u32("relation OID")?;
            let at = r.pos;
            let old = match r.u8("tuple marker ('K', 'O' or 'N')")? {
                b'N' => None,
                marker => {
                    let kind =
                        old_kind(marker).ok_or_else(|| r.unexpected(at, "tuple marker ('K', 'O' or 'N')", marker))?;
                    let old = r.tuple()?;
                    r.expect(b'N', "new tuple marker ('N')")?;
                    Some((kind, old))
                }
            };
            PgOutput::Update { rel, old, new: r.tuple()? }
        }
        b'D' => {
            let rel = r.u32("relation OID")?;
            let at = r.pos;
            let marker = r.u8("old tuple marker ('K' or 'O')")?;
            let kind = old_kind(marker).ok_or_else(|| r.unexpected(at, "old tuple marker ('K' or 'O')", marker))?;
            PgOutput::Delete { rel, old: (kind, r.tuple()?) }
        }
        b'T' => {
            let at = r.pos;
            let count = r.len32("relation count")?;
            let options = r.u8("truncate options")?;
            r.ensure_fits(at, count, REL_OID, "relation count")?;
            let mut rels = Vec::with_capacity(count);
            for _ in 0..count {
                rels.push(r.u32("relation OID")?);
            }
            PgOutput::Truncate { rels, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.u64("message LSN")?;
            let prefix = r.string("message prefix")?;
            let len = r.len32("content length")?;
            let content = r.bytes(len, "message content")?;
            PgOutput::Message { transactional: flags & 1 != 0, lsn, prefix, content }
        }
        _ => {
            return Err(match unsupported(tag) {
                Some(what) => DecodeError::Unsupported { tag, what },
                None => DecodeError::UnknownTag { tag },
            })
        }
    };
    r.finish()?;
    Ok(msg)
}

/// The old-row marker of an `Update` or `Delete`.
fn old_kind(marker: u8) -> Option<OldKind> {
    match marker {
        b'K' => Some(OldKind::Key),
        b'O' => Some(OldKind::Full),
        _ => None,
    }
}

/// Tags of later protocol versions, which this decoder refuses by name.
fn unsupported(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'S' => "Stream Start, protocol 2",
        b'E' => "Stream Stop, protocol 2",
        b'c' => "Stream Commit, protocol 2",
        b'A' => "Stream Abort, protocol 2",
        b'b' => "Begin Prepare, protocol 3",
        b'P' => "Prepare, protocol 3",
        b'K' => "Commit Prepared, protocol 3",
        b'r' => "Rollback Prepared, protocol 3",
        b'p' => "Stream Prepare, protocol 3",
        _ => return None,
    })
}

/// A cursor over one message. Every read checks the remaining length first, so no read can
/// go out of bounds; errors carry the message tag and the offset of the offending field.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: u8,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated { tag: self.tag, offset: self.pos, what, needed, remaining: self.remaining() }
    }

    fn unexpected(&self, offset: usize, what: &'static str, found: u8) -> DecodeError {
        DecodeError::UnexpectedByte { tag: self.tag, offset, what, found }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.buf.get(self.pos..self.pos + N).ok_or_else(|| self.truncated(what, N))?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Reads one byte that must be `want`.
    fn expect(&mut self, want: u8, what: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        match self.u8(what)? {
            got if got == want => Ok(()),
            got => Err(self.unexpected(at, what, got)),
        }
    }

    /// An Int32 length or count, which must not be negative.
    fn len32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength { tag: self.tag, offset: at, what, value })
    }

    /// An Int16 count, which must not be negative.
    fn len16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let value = self.i16(what)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
            tag: self.tag,
            offset: at,
            what,
            value: value.into(),
        })
    }

    /// Refuses `count` items of at least `min_each` bytes each when the rest of the message is
    /// too short to hold them, before the caller reserves memory for them.
    fn ensure_fits(&self, offset: usize, count: usize, min_each: usize, what: &'static str) -> Result<(), DecodeError> {
        if count.saturating_mul(min_each) > self.remaining() {
            return Err(DecodeError::CountTooLarge { tag: self.tag, offset, what, count, remaining: self.remaining() });
        }
        Ok(())
    }

    /// `len` raw bytes, as a zero-copy slice of the message.
    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(what, len));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Unterminated { tag: self.tag, offset: start, what });
        };
        let s = std::str::from_utf8(&rest[..nul]).map_err(|e| DecodeError::NotUtf8 {
            tag: self.tag,
            offset: start + e.valid_up_to(),
            what,
        })?;
        self.pos = start + nul + 1;
        Ok(s.to_owned())
    }

    /// TupleData: Int16 column count, then per column a kind byte and, for `'t'` and `'b'`,
    /// an Int32 length and that many bytes.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let at = self.pos;
        let count = self.len16("tuple column count")?;
        self.ensure_fits(at, count, MIN_TUPLE_COLUMN, "tuple column count")?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let at = self.pos;
            let value = match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.len32("text value length")?;
                    Value::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.len32("binary value length")?;
                    Value::Binary(self.bytes(len, "binary value")?)
                }
                other => return Err(self.unexpected(at, "column kind ('n', 'u', 't' or 'b')", other)),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    /// The body of a Relation message.
    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32("relation OID")?;
        let namespace = self.string("relation namespace")?;
        let name = self.string("relation name")?;
        let at = self.pos;
        let replica_identity = self.u8("replica identity")?;
        if !matches!(replica_identity, b'd' | b'n' | b'f' | b'i') {
            return Err(self.unexpected(at, "replica identity ('d', 'n', 'f' or 'i')", replica_identity));
        }
        let at = self.pos;
        let count = self.len16("relation column count")?;
        self.ensure_fits(at, count, MIN_REL_COLUMN, "relation column count")?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            columns.push(RelColumn {
                key: self.u8("column flags")? & 1 != 0,
                name: self.string("column name")?,
                type_oid: self.u32("column type OID")?,
                type_mod: self.i32("column type modifier")?,
            });
        }
        Ok(Relation { id, namespace, name, replica_identity, columns })
    }

    /// Succeeds only when the whole message was consumed.
    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { tag: self.tag, offset: self.pos, extra }),
        }
    }
}

/// Appends `tuple` as one line of PostgreSQL COPY text format to `out`: values separated by
/// '\t', NULL as `\N`, the line ended by '\n'; within text values backslash, newline, carriage
/// return and tab are escaped as `\\`, `\n`, `\r`, `\t`. Errors on Unchanged or Binary values
/// (callers only use it for inserts received in text mode).
///
/// On error `out` is left as it was.
pub fn copy_line(tuple: &Tuple, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    for (column, value) in tuple.0.iter().enumerate() {
        match value {
            Value::Unchanged => return Err(DecodeError::NotCopyText { column, what: "an unchanged TOAST value" }),
            Value::Binary(_) => return Err(DecodeError::NotCopyText { column, what: "a binary value" }),
            Value::Null | Value::Text(_) => {}
        }
    }
    for (column, value) in tuple.0.iter().enumerate() {
        if column > 0 {
            out.push(b'\t');
        }
        match value {
            Value::Text(text) => escape_copy_text(text, out),
            // Unchanged and Binary were refused above.
            _ => out.extend_from_slice(b"\\N"),
        }
    }
    out.push(b'\n');
    Ok(())
}

/// Appends `text` with COPY text format's escapes for the bytes that would otherwise end a
/// value, a line or start an escape. Every other byte (including non-ASCII) stands for itself.
fn escape_copy_text(text: &[u8], out: &mut Vec<u8>) {
    out.reserve(text.len());
    let mut plain_from = 0;
    for (i, &b) in text.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&text[plain_from..i]);
        out.extend_from_slice(escaped);
        plain_from = i + 1;
    }
    out.extend_from_slice(&text[plain_from..]);
}

/// Encodes a message the way pgoutput (protocol version 1) does; for tests only.
///
/// Panics on messages that protocol cannot carry (more than `i16::MAX` columns, values over
/// `i32::MAX` bytes, names containing NUL).
#[cfg(test)]
fn encode(msg: &PgOutput) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        assert!(!s.contains('\0'), "strings cannot contain NUL");
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    fn len32(out: &mut Vec<u8>, len: usize) {
        out.extend_from_slice(&i32::try_from(len).expect("length fits Int32").to_be_bytes());
    }
    fn tuple(out: &mut Vec<u8>, tuple: &Tuple) {
        out.extend_from_slice(&i16::try_from(tuple.0.len()).expect("column count fits Int16").to_be_bytes());
        for value in &tuple.0 {
            match value {
                Value::Null => out.push(b'n'),
                Value::Unchanged => out.push(b'u'),
                Value::Text(b) | Value::Binary(b) => {
                    out.push(if matches!(value, Value::Text(_)) { b't' } else { b'b' });
                    len32(out, b.len());
                    out.extend_from_slice(b);
                }
            }
        }
    }
    fn old_marker(kind: OldKind) -> u8 {
        match kind {
            OldKind::Key => b'K',
            OldKind::Full => b'O',
        }
    }

    let mut out = Vec::new();
    match msg {
        PgOutput::Begin { final_lsn, commit_time, xid } => {
            out.push(b'B');
            out.extend_from_slice(&final_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
        }
        PgOutput::Commit { flags, commit_lsn, end_lsn, commit_time } => {
            out.push(b'C');
            out.push(*flags);
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
        }
        PgOutput::Origin { lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&lsn.to_be_bytes());
            string(&mut out, name);
        }
        PgOutput::Relation(rel) => {
            out.push(b'R');
            out.extend_from_slice(&rel.id.to_be_bytes());
            string(&mut out, &rel.namespace);
            string(&mut out, &rel.name);
            out.push(rel.replica_identity);
            out.extend_from_slice(&i16::try_from(rel.columns.len()).expect("column count fits Int16").to_be_bytes());
            for col in &rel.columns {
                out.push(u8::from(col.key));
                string(&mut out, &col.name);
                out.extend_from_slice(&col.type_oid.to_be_bytes());
                out.extend_from_slice(&col.type_mod.to_be_bytes());
            }
        }
        PgOutput::Type { id, namespace, name } => {
            out.push(b'Y');
            out.extend_from_slice(&id.to_be_bytes());
            string(&mut out, namespace);
            string(&mut out, name);
        }
        PgOutput::Insert { rel, new } => {
            out.push(b'I');
            out.extend_from_slice(&rel.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, new);
        }
        PgOutput::Update { rel, old, new } => {
            out.push(b'U');
            out.extend_from_slice(&rel.to_be_bytes());
            if let Some((kind, old)) = old {
                out.push(old_marker(*kind));
                tuple(&mut out, old);
            }
            out.push(b'N');
            tuple(&mut out, new);
        }
        PgOutput::Delete { rel, old: (kind, old) } => {
            out.push(b'D');
            out.extend_from_slice(&rel.to_be_bytes());
            out.push(old_marker(*kind));
            tuple(&mut out, old);
        }
        PgOutput::Truncate { rels, cascade, restart_identity } => {
            out.push(b'T');
            len32(&mut out, rels.len());
            out.push(u8::from(*cascade) | (u8::from(*restart_identity) << 1));
            for rel in rels {
                out.extend_from_slice(&rel.to_be_bytes());
            }
        }
        PgOutput::Message { transactional, lsn, prefix, content } => {
            out.push(b'M');
            out.push(u8::from(*transactional));
            out.extend_from_slice(&lsn.to_be_bytes());
            string(&mut out, prefix);
            len32(&mut out, content.len());
            out.extend_from_slice(content);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn binary(b: &[u8]) -> Value {
        Value::Binary(Bytes::copy_from_slice(b))
    }

    fn col(key: bool, name: &str, type_oid: u32, type_mod: i32) -> RelColumn {
        RelColumn { key, name: name.into(), type_oid, type_mod }
    }

    /// A tuple with one value of every kind, including the awkward texts.
    fn mixed_tuple() -> Tuple {
        Tuple(vec![
            text("42"),
            Value::Null,
            Value::Unchanged,
            text(""),
            text("tab\there\nnewline\r\\backslash"),
            text("données — 日本語 🐘"),
            binary(&[0, 1, 2, 0xff, 0]),
            binary(&[]),
            text("\\N"),
        ])
    }

    fn wide_tuple(n: usize) -> Tuple {
        Tuple((0..n).map(|i| if i % 7 == 3 { Value::Null } else { text(&i.to_string()) }).collect())
    }

    fn wide_relation(n: usize) -> Relation {
        Relation {
            id: 99_999,
            namespace: "wide".into(),
            name: "t1600".into(),
            replica_identity: b'd',
            columns: (0..n).map(|i| col(i == 0, &format!("c{i}"), 23, -1)).collect(),
        }
    }

    /// Small hand-written messages of every kind (each under 1 KiB encoded).
    fn small_samples() -> Vec<PgOutput> {
        let users = Relation {
            id: 16_384,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![col(true, "id", 23, -1), col(false, "name", 1043, 68), col(false, "ünïcødé", 25, -1)],
        };
        vec![
            PgOutput::Begin { final_lsn: 0x0000_0001_6B37_4D48, commit_time: 744_000_000_123_456, xid: 742 },
            PgOutput::Begin { final_lsn: u64::MAX, commit_time: i64::MIN, xid: u32::MAX },
            PgOutput::Commit {
                flags: 0,
                commit_lsn: 0x16B3_7480,
                end_lsn: 0x16B3_74B0,
                commit_time: 744_000_000_123_999,
            },
            PgOutput::Commit { flags: 0xff, commit_lsn: 0, end_lsn: u64::MAX, commit_time: -1 },
            PgOutput::Origin { lsn: 12_345, name: "node_a".into() },
            PgOutput::Origin { lsn: 0, name: String::new() },
            PgOutput::Relation(users.clone()),
            PgOutput::Relation(Relation {
                id: 1,
                namespace: String::new(),
                name: "empty".into(),
                replica_identity: b'n',
                columns: vec![],
            }),
            PgOutput::Relation(Relation { replica_identity: b'f', ..users.clone() }),
            PgOutput::Relation(Relation {
                replica_identity: b'i',
                columns: vec![col(false, "", 0, i32::MIN), col(true, "k", u32::MAX, i32::MAX)],
                ..users
            }),
            PgOutput::Type { id: 70_000, namespace: "public".into(), name: "mood".into() },
            PgOutput::Type { id: 0, namespace: String::new(), name: String::new() },
            PgOutput::Insert { rel: 16_384, new: mixed_tuple() },
            PgOutput::Insert { rel: 16_384, new: Tuple(vec![text("1"), text("alice")]) },
            PgOutput::Insert { rel: 7, new: Tuple::default() },
            PgOutput::Update { rel: 16_384, old: None, new: mixed_tuple() },
            PgOutput::Update {
                rel: 16_384,
                old: Some((OldKind::Key, Tuple(vec![text("1"), Value::Null, Value::Null]))),
                new: Tuple(vec![text("2"), text("bob"), Value::Unchanged]),
            },
            PgOutput::Update { rel: u32::MAX, old: Some((OldKind::Full, mixed_tuple())), new: mixed_tuple() },
            PgOutput::Delete { rel: 16_384, old: (OldKind::Key, Tuple(vec![text("1"), Value::Null])) },
            PgOutput::Delete { rel: 16_384, old: (OldKind::Full, mixed_tuple()) },
            PgOutput::Truncate { rels: vec![16_384], cascade: false, restart_identity: false },
            PgOutput::Truncate { rels: vec![1, 2, 3], cascade: true, restart_identity: false },
            PgOutput::Truncate { rels: vec![4, u32::MAX], cascade: false, restart_identity: true },
            PgOutput::Truncate { rels: vec![], cascade: true, restart_identity: true },
            PgOutput::Message {
                transactional: true,
                lsn: 0x16B3_7400,
                prefix: "lockstep".into(),
                content: Bytes::from_static(b"hello\0world\xff"),
            },
            PgOutput::Message { transactional: false, lsn: 1, prefix: String::new(), content: Bytes::new() },
        ]
    }

    /// The 1600-column messages (PostgreSQL's column limit for a table).
    fn wide_samples() -> Vec<PgOutput> {
        vec![
            PgOutput::Relation(wide_relation(1600)),
            PgOutput::Insert { rel: 99_999, new: wide_tuple(1600) },
            PgOutput::Update {
                rel: 99_999,
                old: Some((OldKind::Full, wide_tuple(1600))),
                new: Tuple(vec![Value::Unchanged; 1600]),
            },
        ]
    }

    fn all_samples() -> Vec<PgOutput> {
        let mut all = small_samples();
        all.extend(wide_samples());
        all
    }

    /// Decodes without letting a panic escape, so a failure names the input that caused it.
    fn decode_no_panic(input: &[u8]) -> Result<PgOutput, DecodeError> {
        let buf = Bytes::copy_from_slice(input);
        match catch_unwind(AssertUnwindSafe(|| decode(&buf))) {
            Ok(result) => result,
            Err(_) => panic!("decode panicked on input {input:02x?}"),
        }
    }

    #[test]
    fn round_trips_every_message_kind() {
        let samples = all_samples();
        let mut kinds = std::collections::BTreeSet::new();
        for msg in &samples {
            let encoded = encode(msg);
            kinds.insert(encoded[0]);
            let decoded = decode(&Bytes::from(encoded)).unwrap_or_else(|e| panic!("{msg:?}: {e}"));
            assert_eq!(&decoded, msg);
        }
        assert_eq!(kinds.len(), 10, "every message kind is covered");
    }

    #[test]
    fn insert_known_bytes() {
        #[rustfmt::skip]
        let bytes: &[u8] = &[
            b'I',
            0x00, 0x00, 0x40, 0x00, // relation OID 16384
            b'N',
            0x00, 0x05, // 5 columns
            b't', 0x00, 0x00, 0x00, 0x02, b'4', b'2',
            b'n',
            b'u',
            b'b', 0x00, 0x00, 0x00, 0x03, 0x00, 0xde, 0xad,
            b't', 0x00, 0x00, 0x00, 0x00,
        ];
        let buf = Bytes::from_static(bytes);
        let expected = PgOutput::Insert {
            rel: 16_384,
            new: Tuple(vec![text("42"), Value::Null, Value::Unchanged, binary(&[0, 0xde, 0xad]), text("")]),
        };
        let decoded = decode(&buf).unwrap();
        assert_eq!(decoded, expected);
        assert_eq!(encode(&expected), bytes);

        // Values are slices of the input, not copies.
        let PgOutput::Insert { new, .. } = decoded else { unreachable!() };
        let Value::Text(v) = &new.0[0] else { unreachable!() };
        assert_eq!(v.as_ptr(), buf[13..].as_ptr());
    }

    #[test]
    fn relation_known_bytes() {
        #[rustfmt::skip]
        let bytes: &[u8] = &[
            b'R',
            0x00, 0x00, 0x40, 0x01, // relation OID 16385
            b'p', b'u', b'b', b'l', b'i', b'c', 0, // namespace
            b'u', b's', b'e', b'r', b's', 0, // name
            b'd', // replica identity default
            0x00, 0x02, // 2 columns
            0x01, b'i', b'd', 0, 0x00, 0x00, 0x00, 0x17, 0xff, 0xff, 0xff, 0xff, // key, int4, -1
            0x00, b'n', b'a', b'm', b'e', 0, 0x00, 0x00, 0x04, 0x13, 0x00, 0x00, 0x00, 0x44, // varchar(64)
        ];
        let expected = PgOutput::Relation(Relation {
            id: 16_385,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![col(true, "id", 23, -1), col(false, "name", 1043, 68)],
        });
        assert_eq!(decode(&Bytes::from_static(bytes)).unwrap(), expected);
        assert_eq!(encode(&expected), bytes);
    }

    #[test]
    fn begin_known_bytes_and_time() {
        let mut bytes = vec![b'B'];
        bytes.extend_from_slice(&0x0000_0001_0000_0002u64.to_be_bytes());
        bytes.extend_from_slice(&1_000_000i64.to_be_bytes());
        bytes.extend_from_slice(&7u32.to_be_bytes());
        let msg = decode(&Bytes::from(bytes)).unwrap();
        assert_eq!(msg, PgOutput::Begin { final_lsn: 0x0000_0001_0000_0002, commit_time: 1_000_000, xid: 7 });

        assert_eq!(pg_time_to_unix_us(0), 946_684_800_000_000);
        // 2000-01-01T00:00:01Z
        assert_eq!(pg_time_to_unix_us(1_000_000), 946_684_801_000_000);
        assert_eq!(pg_time_to_unix_us(-PG_EPOCH_OFFSET_US), 0);
        assert_eq!(pg_time_to_unix_us(i64::MAX), i64::MAX);
        assert_eq!(pg_time_to_unix_us(i64::MIN), i64::MIN);
        assert_eq!(pg_time_to_unix_us(i64::MAX - 1), i64::MAX);
    }

    #[test]
    fn every_truncation_is_an_error() {
        for msg in all_samples() {
            let encoded = encode(&msg);
            for len in 0..encoded.len() {
                let result = decode_no_panic(&encoded[..len]);
                assert!(result.is_err(), "{msg:?} truncated to {len} bytes decoded as {result:?}");
            }
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        for msg in all_samples() {
            let mut encoded = encode(&msg);
            let end = encoded.len();
            encoded.push(0);
            match decode_no_panic(&encoded) {
                Err(DecodeError::TrailingBytes { offset, extra: 1, .. }) => assert_eq!(offset, end),
                other => panic!("{msg:?} with a trailing byte: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_bad_tags_and_markers() {
        assert!(matches!(decode_no_panic(b""), Err(DecodeError::Empty)));
        assert!(matches!(decode_no_panic(b"Z"), Err(DecodeError::UnknownTag { tag: b'Z' })));
        assert!(matches!(decode_no_panic(b"\0"), Err(DecodeError::UnknownTag { tag: 0 })));
        for tag in *b"SEcAbPKrp" {
            assert!(matches!(decode_no_panic(&[tag, 0, 0]), Err(DecodeError::Unsupported { .. })), "{tag}");
        }

        // Insert without the 'N' marker.
        let bad = [b'I', 0, 0, 0, 1, b'K', 0, 0];
        assert!(matches!(
            decode_no_panic(&bad),
            Err(DecodeError::UnexpectedByte { tag: b'I', offset: 5, found: b'K', .. })
        ));
        // Update with an unknown old-row marker, and with 'K' not followed by 'N'.
        let bad = [b'U', 0, 0, 0, 1, b'X', 0, 0];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::UnexpectedByte { offset: 5, found: b'X', .. })));
        let bad = [b'U', 0, 0, 0, 1, b'K', 0, 0, b'K', 0, 0];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::UnexpectedByte { offset: 8, found: b'K', .. })));
        // Delete needs 'K' or 'O'; 'N' is not allowed.
        let bad = [b'D', 0, 0, 0, 1, b'N', 0, 0];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::UnexpectedByte { offset: 5, found: b'N', .. })));
        // Unknown column kind.
        let bad = [b'I', 0, 0, 0, 1, b'N', 0, 1, b'x'];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::UnexpectedByte { offset: 8, found: b'x', .. })));
        // Unknown replica identity.
        let bad = [b'R', 0, 0, 0, 1, 0, b'a', 0, b'z', 0, 0];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::UnexpectedByte { offset: 8, found: b'z', .. })));
    }

    #[test]
    fn rejects_column_counts_that_do_not_match_the_data() {
        // Declares 3 columns, carries 2.
        let short = [b'I', 0, 0, 0, 1, b'N', 0, 3, b't', 0, 0, 0, 1, b'a', b'n'];
        assert!(matches!(decode_no_panic(&short), Err(DecodeError::Truncated { offset: 15, .. })));
        // Declares 1 column, carries 2.
        let long = [b'I', 0, 0, 0, 1, b'N', 0, 1, b'n', b'n'];
        assert!(matches!(decode_no_panic(&long), Err(DecodeError::TrailingBytes { offset: 9, extra: 1, .. })));
        // Negative column count.
        let negative = [b'I', 0, 0, 0, 1, b'N', 0xff, 0xff];
        assert!(matches!(decode_no_panic(&negative), Err(DecodeError::NegativeLength { offset: 6, value: -1, .. })));
    }

    #[test]
    fn refuses_huge_counts_and_lengths_before_allocating() {
        // Text value claiming 0x7fffffff bytes with 2 present.
        let bad = [b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0x7f, 0xff, 0xff, 0xff, b'a', b'b'];
        assert!(matches!(
            decode_no_panic(&bad),
            Err(DecodeError::Truncated { offset: 13, needed: 0x7fff_ffff, remaining: 2, .. })
        ));
        // Negative value length.
        let bad = [b'I', 0, 0, 0, 1, b'N', 0, 1, b'b', 0xff, 0xff, 0xff, 0xfe];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::NegativeLength { offset: 9, value: -2, .. })));
        // 32767 tuple columns in 3 bytes.
        let bad = [b'I', 0, 0, 0, 1, b'N', 0x7f, 0xff, b'n', b'n', b'n'];
        assert!(matches!(
            decode_no_panic(&bad),
            Err(DecodeError::CountTooLarge { offset: 6, count: 0x7fff, remaining: 3, .. })
        ));
        // 32767 relation columns, each needing at least 10 bytes, in 20 bytes.
        let mut bad = vec![b'R', 0, 0, 0, 1, 0, b'a', 0, b'd', 0x7f, 0xff];
        bad.extend_from_slice(&[0; 20]);
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::CountTooLarge { offset: 9, count: 0x7fff, .. })));
        // 0x7fffffff truncated relations in 8 bytes; and a negative count.
        let bad = [b'T', 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1, 0, 0, 0, 2];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::CountTooLarge { offset: 1, remaining: 8, .. })));
        let bad = [b'T', 0x80, 0, 0, 0, 0];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::NegativeLength { offset: 1, value: i32::MIN, .. })));
        // Logical message content claiming 0x7fffffff bytes.
        let mut bad = vec![b'M', 1, 0, 0, 0, 0, 0, 0, 0, 1, b'p', 0, 0x7f, 0xff, 0xff, 0xff];
        bad.extend_from_slice(b"abc");
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::Truncated { offset: 16, remaining: 3, .. })));
    }

    #[test]
    fn rejects_bad_strings() {
        // Origin name that is not UTF-8.
        let bad = [b'O', 0, 0, 0, 0, 0, 0, 0, 1, b'o', 0xff, 0];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::NotUtf8 { tag: b'O', offset: 10, .. })));
        // Type name without its NUL terminator.
        let bad = [b'Y', 0, 0, 0, 1, 0, b'm', b'o'];
        assert!(matches!(decode_no_panic(&bad), Err(DecodeError::Unterminated { tag: b'Y', offset: 6, .. })));
    }

    #[test]
    fn errors_name_tag_field_and_offset() {
        let bad = [b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0x7f, 0xff, 0xff, 0xff];
        let message = decode_no_panic(&bad).unwrap_err().to_string();
        assert_eq!(message, "pgoutput 'I' message: text value at byte 13: needs 2147483647 bytes, only 0 left");
        let message = decode_no_panic(b"\x01").unwrap_err().to_string();
        assert_eq!(message, "pgoutput: unknown message tag 0x01");
        let bad = [b'D', 0, 0, 0, 1, b'N', 0, 0];
        let message = decode_no_panic(&bad).unwrap_err().to_string();
        assert_eq!(message, "pgoutput 'D' message: old tuple marker ('K' or 'O') at byte 5: unexpected byte 'N'");
    }

    #[test]
    fn copy_line_escapes() {
        let mut out = Vec::new();
        copy_line(&Tuple(vec![text("1"), Value::Null, text("\\N"), text("")]), &mut out).unwrap();
        assert_eq!(out, b"1\t\\N\t\\\\N\t\n");

        out.clear();
        copy_line(&Tuple(vec![text("a\tb\nc\rd\\e"), text("données\u{1F418}")]), &mut out).unwrap();
        assert_eq!(out, "a\\tb\\nc\\rd\\\\e\tdonnées\u{1F418}\n".as_bytes());

        // Appends; an empty tuple is an empty line; a lone NULL is `\N`.
        copy_line(&Tuple::default(), &mut out).unwrap();
        copy_line(&Tuple(vec![Value::Null]), &mut out).unwrap();
        assert!(out.ends_with(b"\n\n\\N\n"));

        // Backslashes and control characters in a row, and at the edges.
        out.clear();
        copy_line(&Tuple(vec![text("\\\\\t\t\n"), text("\r")]), &mut out).unwrap();
        assert_eq!(out, b"\\\\\\\\\\t\\t\\n\t\\r\n");
    }

    #[test]
    fn copy_line_refuses_unchanged_and_binary() {
        let mut out = b"kept".to_vec();
        let err = copy_line(&Tuple(vec![text("a"), Value::Unchanged]), &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::NotCopyText { column: 1, .. }));
        let err = copy_line(&Tuple(vec![binary(b"x")]), &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::NotCopyText { column: 0, .. }));
        assert_eq!(out, b"kept", "nothing is written on error");
    }

    #[test]
    fn copy_line_of_wide_insert() {
        let tuple = wide_tuple(1600);
        let mut out = Vec::new();
        copy_line(&tuple, &mut out).unwrap();
        let line = std::str::from_utf8(&out).unwrap();
        let fields: Vec<&str> = line.strip_suffix('\n').unwrap().split('\t').collect();
        assert_eq!(fields.len(), 1600);
        assert_eq!(fields[3], "\\N");
        assert_eq!(fields[1598], "1598");
        assert_eq!(fields[1599], "\\N");
    }

    /// xorshift64*: a tiny deterministic PRNG, good enough to drive mutations.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform-ish in `0..n` (`n > 0`).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Values that make length and count fields interesting.
    const EDGE_I32: [u32; 8] = [0, 1, 0x7f, 0xff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x0001_0000];
    const EDGE_I16: [u16; 6] = [0, 1, 0x7fff, 0x8000, 0xffff, 1600];
    const PROTOCOL_BYTES: &[u8] = b"BCORYIUDTMNKOnutbdfi\0\xff";

    /// Applies one random mutation to `data`.
    fn mutate(rng: &mut XorShift, data: &mut Vec<u8>) {
        let len = data.len();
        match rng.below(9) {
            // Flip one bit.
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            // Truncate.
            1 => data.truncate(rng.below(len + 1)),
            // Insert random bytes.
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            // Delete a range.
            3 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(8)).min(len);
                data.drain(at..end);
            }
            // Overwrite an Int32 with an edge value or a random length.
            4 if len >= 4 => {
                let at = rng.below(len - 3);
                let value = if rng.below(2) == 0 { EDGE_I32[rng.below(EDGE_I32.len())] } else { rng.next() as u32 };
                data[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            // Overwrite an Int16 with an edge value or a random count.
            5 if len >= 2 => {
                let at = rng.below(len - 1);
                let value = if rng.below(2) == 0 { EDGE_I16[rng.below(EDGE_I16.len())] } else { rng.next() as u16 };
                data[at..at + 2].copy_from_slice(&value.to_be_bytes());
            }
            // Replace a byte with one the protocol gives meaning to (tags, markers, kinds, NUL).
            6 if len > 0 => {
                let i = rng.below(len);
                data[i] = PROTOCOL_BYTES[rng.below(PROTOCOL_BYTES.len())];
            }
            // Duplicate a slice in place (repeats columns, strings, markers).
            7 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(16)).min(len);
                let copy = data[at..end].to_vec();
                data.splice(end..end, copy);
            }
            // Replace everything after the tag with random bytes.
            _ => {
                let n = rng.below(64);
                data.truncate(1.min(len));
                data.extend((0..n).map(|_| rng.next() as u8));
            }
        }
    }

    /// Checks that a successful decode is consistent: it re-encodes to something that decodes
    /// the same, and nothing it holds is larger than the input could carry.
    fn check_decoded(input: &[u8], msg: &PgOutput) {
        let sizes: Vec<usize> = match msg {
            PgOutput::Relation(rel) => vec![rel.columns.capacity()],
            PgOutput::Insert { new, .. } => vec![new.0.capacity()],
            PgOutput::Update { old, new, .. } => {
                vec![old.as_ref().map_or(0, |(_, t)| t.0.capacity()), new.0.capacity()]
            }
            PgOutput::Delete { old, .. } => vec![old.1 .0.capacity()],
            PgOutput::Truncate { rels, .. } => vec![rels.capacity() * 4],
            _ => vec![],
        };
        for size in sizes {
            assert!(size <= input.len(), "decoded {size} items from {} bytes: {input:02x?}", input.len());
        }
        let again = decode(&Bytes::from(encode(msg))).expect("re-encoded message decodes");
        assert_eq!(&again, msg, "re-encoding changed {input:02x?}");
    }

    #[test]
    fn fuzz_mutations_never_panic() {
        const ITERATIONS: usize = 200_000;
        let small: Vec<Vec<u8>> = small_samples().iter().map(encode).collect();
        let wide: Vec<Vec<u8>> = wide_samples().iter().map(encode).collect();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let (mut ok, mut err) = (0usize, 0usize);
        for _ in 0..ITERATIONS {
            // The 1600-column messages are large; mutate them now and then only.
            let seed = if rng.below(64) == 0 { &wide[rng.below(wide.len())] } else { &small[rng.below(small.len())] };
            let mut data = seed.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut rng, &mut data);
            }
            match decode_no_panic(&data) {
                Ok(msg) => {
                    check_decoded(&data, &msg);
                    ok += 1;
                }
                Err(e) => {
                    // Rendering the error must not panic either.
                    assert!(!e.to_string().is_empty());
                    err += 1;
                }
            }
        }
        // The mutations must exercise both outcomes to be worth anything.
        assert!(ok > ITERATIONS / 50, "only {ok} mutated messages decoded");
        assert!(err > ITERATIONS / 2, "only {err} mutated messages were refused");
    }

    #[test]
    fn fuzz_random_bytes_never_panic() {
        let mut rng = XorShift(42);
        for _ in 0..20_000 {
            let len = rng.below(48);
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(first) = data.first_mut() {
                // Mostly valid tags, so the bodies get exercised.
                *first = PROTOCOL_BYTES[rng.below(10)];
            }
            if let Ok(msg) = decode_no_panic(&data) {
                check_decoded(&data, &msg);
            }
        }
    }
}
