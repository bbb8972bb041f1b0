//! On-disk record framing: `[version u8][crc32 u32 LE][body]`, the crc covering the body.
//! Journal records and receiver state files use it; reading verifies the checksum and the
//! version, so a torn or corrupted record is reported, never silently used.

/// Current record format version.
pub const FRAME_VERSION: u8 = 1;

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("record too short ({0} bytes)")]
    Short(usize),
    #[error("record version {0} is not supported by this build (max {FRAME_VERSION})")]
    Version(u8),
    #[error("record checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
}

/// Frames `body`.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(FRAME_VERSION);
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Verifies a framed record and returns its body.
pub fn decode(rec: &[u8]) -> Result<&[u8], FrameError> {
    if rec.len() < 5 {
        return Err(FrameError::Short(rec.len()));
    }
    if rec[0] != FRAME_VERSION {
        return Err(FrameError::Version(rec[0]));
    }
    let stored = u32::from_le_bytes(rec[1..5].try_into().expect("4 bytes"));
    let body = &rec[5..];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok(body)
}

/// Writes `contents` to `path` atomically and durably: temp file, fsync, rename, fsync of the
/// directory. Readers see the old or the new file, never a mix.
pub fn write_atomic(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_corruption() {
        let f = encode(b"hello");
        assert_eq!(decode(&f).unwrap(), b"hello");
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x40;
            assert!(decode(&g).is_err(), "flip at {i} undetected");
        }
        assert_eq!(decode(&f[..3]), Err(FrameError::Short(3)));
    }
}
