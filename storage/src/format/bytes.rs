//! Positional reads over a file or a byte slice, with integer helpers.
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};

/// A random-access byte source of known length (a file, or a slice in unit tests).
pub trait ReadAt {
    fn len(&self) -> u64;
    fn path(&self) -> &Path;
    /// Reads up to `n` bytes at `offset`; fewer only at the end of the source.
    fn read_up_to(&self, offset: u64, n: usize) -> Result<Vec<u8>>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads exactly `n` bytes at `offset` or fails as a truncated `format` image.
    fn read_exact(
        &self,
        offset: u64,
        n: usize,
        format: &'static str,
        what: &str,
    ) -> Result<Vec<u8>> {
        let end = offset.checked_add(n as u64);
        if end.is_none_or(|end| end > self.len()) {
            return Err(StorageError::Truncated {
                path: self.path().to_path_buf(),
                format,
                what: format!(
                    "{what} ({n} bytes at offset {offset}) is past the end of the {} byte file",
                    self.len()
                ),
            });
        }
        self.read_up_to(offset, n)
    }
}

pub(crate) struct FileAt<'a> {
    file: &'a std::fs::File,
    path: PathBuf,
    len: u64,
}

impl<'a> FileAt<'a> {
    pub(crate) fn new(file: &'a std::fs::File, path: &Path, len: u64) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            len,
        }
    }
}

impl ReadAt for FileAt<'_> {
    fn len(&self) -> u64 {
        self.len
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_up_to(&self, offset: u64, n: usize) -> Result<Vec<u8>> {
        let avail = self.len.saturating_sub(offset);
        let n = n.min(usize::try_from(avail).unwrap_or(usize::MAX));
        let mut buf = vec![0u8; n];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| StorageError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }
}

/// A byte slice as a source (unit tests of the parsers).
#[cfg(test)]
#[derive(Debug)]
pub struct SliceAt<'a> {
    pub data: &'a [u8],
    pub path: PathBuf,
}

#[cfg(test)]
impl ReadAt for SliceAt<'_> {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_up_to(&self, offset: u64, n: usize) -> Result<Vec<u8>> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        Ok(self.data[start..end].to_vec())
    }
}

// Fixed-width integer readers; callers have already checked the buffer length, and a
// short buffer reads as zero rather than panicking.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}
