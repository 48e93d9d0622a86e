//! Disk image format detection and validation in pure Rust.
//!
//! This is the security boundary of the import: every header is parsed here and every
//! reference to another file (VMDK extents, qcow2 backing and data files, VHD/VHDX
//! parents) is judged BEFORE qemu-img ever opens the image. qemu-img is then always run
//! with an explicit format, so it never probes.
mod bytes;
pub mod qcow2;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use bytes::ReadAt;

use crate::error::{Result, StorageError, io_err};

/// Bounds applied to every imported image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportLimits {
    /// Largest virtual disk size accepted (bytes).
    pub max_virtual_size: u64,
    /// Largest VMDK text descriptor (bytes); real ones are a few hundred bytes.
    pub max_descriptor_bytes: u64,
    /// Most extents a VMDK descriptor may list.
    pub max_extents: usize,
}

impl Default for ImportLimits {
    fn default() -> Self {
        Self {
            max_virtual_size: 16 << 40,
            max_descriptor_bytes: 64 << 10,
            max_extents: 1024,
        }
    }
}

/// The disk formats hvx imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DiskFormat {
    Vmdk,
    Vhd,
    Vhdx,
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The qemu block driver name, passed with `-f` so qemu-img never probes.
    pub fn qemu_driver(self) -> &'static str {
        match self {
            Self::Vmdk => "vmdk",
            Self::Vhd => "vpc",
            Self::Vhdx => "vhdx",
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// What validation found out about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskInfo {
    pub format: DiskFormat,
    /// VMDK createType (monolithicSparse, streamOptimized, ...), VHD fixed/dynamic.
    pub subformat: String,
    pub virtual_size: u64,
    /// Every file the image consists of, the entry file first; all inside the import dir.
    pub files: Vec<PathBuf>,
}

/// First bytes that identify a format, checked before anything else.
fn sniff(head: &[u8], tail: &[u8], len: u64, limits: &ImportLimits) -> Sniffed {
    if head.starts_with(b"KDMV") {
        Sniffed::VmdkSparse
    } else if head.starts_with(b"COWD") {
        Sniffed::Unsupported("VMDK version 3 (COWD, ESX 2.x) sparse extent")
    } else if head.starts_with(b"QFI\xfb") {
        Sniffed::Qcow2
    } else if head.starts_with(b"vhdxfile") {
        Sniffed::Vhdx
    } else if head.starts_with(b"conectix") || tail.starts_with(b"conectix") {
        Sniffed::Vhd
    } else if len <= limits.max_descriptor_bytes && vmdk::looks_like_descriptor(head) {
        Sniffed::VmdkDescriptor
    } else {
        Sniffed::Raw
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    VmdkSparse,
    VmdkDescriptor,
    Qcow2,
    Vhd,
    Vhdx,
    Raw,
    Unsupported(&'static str),
}

/// Detects and validates the image whose entry file is `dir/entry`. `entry` must be a
/// plain file name; every other file the image names must be one too, inside `dir`.
pub fn inspect(dir: &Path, entry: &str, limits: &ImportLimits) -> Result<DiskInfo> {
    let path = plain_file_in(dir, entry)?;
    let file = open_nofollow(&path)?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    if len == 0 {
        return Err(StorageError::Truncated {
            path,
            format: "disk",
            what: "the file is empty".into(),
        });
    }
    let src = bytes::FileAt::new(&file, &path, len);
    let head = src.read_up_to(0, 4096)?;
    let tail = if len >= 512 {
        src.read_up_to(len - 512, 512)?
    } else {
        Vec::new()
    };
    let info = match sniff(&head, &tail, len, limits) {
        Sniffed::VmdkSparse => vmdk::inspect_sparse(&src, dir, entry, limits)?,
        Sniffed::VmdkDescriptor => vmdk::inspect_descriptor(&src, dir, entry, limits)?,
        Sniffed::Qcow2 => qcow2::inspect(&src, limits)?,
        Sniffed::Vhd => vhd::inspect(&src, limits)?,
        Sniffed::Vhdx => vhdx::inspect(&src, limits)?,
        Sniffed::Raw => raw_info(&path, len, limits)?,
        Sniffed::Unsupported(what) => {
            return Err(StorageError::Refused {
                path,
                reason: format!("unsupported format: {what}"),
            });
        }
    };
    let mut info = info;
    if info.files.is_empty() {
        info.files.push(path);
    }
    Ok(info)
}

fn raw_info(path: &Path, len: u64, limits: &ImportLimits) -> Result<DiskInfo> {
    check_size(path, "raw image size", len, limits)?;
    Ok(DiskInfo {
        format: DiskFormat::Raw,
        subformat: "raw".into(),
        virtual_size: len,
        files: vec![path.to_path_buf()],
    })
}

/// Refuses a virtual size over the configured limit.
pub(crate) fn check_size(
    path: &Path,
    what: &'static str,
    value: u64,
    limits: &ImportLimits,
) -> Result<()> {
    if value > limits.max_virtual_size {
        return Err(StorageError::TooLarge {
            path: path.to_path_buf(),
            what,
            value,
            limit: limits.max_virtual_size,
        });
    }
    Ok(())
}

/// Checks that `name` is a plain file name (no '/', no '..', no NUL, not hidden tricks)
/// and that `dir/name` is a regular file, not a symlink, device or directory.
pub fn plain_file_in(dir: &Path, name: &str) -> Result<PathBuf> {
    check_plain_name(name)?;
    let path = dir.join(name);
    let meta = std::fs::symlink_metadata(&path).map_err(|source| StorageError::Refused {
        path: path.clone(),
        reason: format!("file {name:?} is not in the import: {source}"),
    })?;
    if !meta.file_type().is_file() {
        return Err(StorageError::Refused {
            path,
            reason: format!("{name:?} is not a regular file (symlink, device or directory)"),
        });
    }
    Ok(path)
}

/// Opens a file for reading without following a symlink in its last component, so a
/// file swapped for a symlink after `plain_file_in` checked it is refused, not read.
pub(crate) fn open_nofollow(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| StorageError::Refused {
            path: path.to_path_buf(),
            reason: format!("cannot open as a regular file: {source}"),
        })
}

/// A plain relative file name: what VMware writes for extents and OVA members.
pub fn check_plain_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(StorageError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > 255 {
        return bad("must be 1 to 255 bytes long");
    }
    if name == "." || name == ".." {
        return bad("must not be . or ..");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("must be a plain file name without directories");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("must not contain control characters");
    }
    if name.contains(':') {
        // qemu would read "json:" or "protocol:" prefixes as options, not a file name.
        return bad("must not contain ':'");
    }
    Ok(())
}

/// A positional reader over an open file (for callers outside this module).
pub fn bytes_file<'a>(file: &'a std::fs::File, path: &Path, len: u64) -> impl ReadAt + 'a {
    bytes::FileAt::new(file, path, len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn plain_names() {
        assert!(check_plain_name("disk-s001.vmdk").is_ok());
        for bad in [
            "",
            "..",
            ".",
            "/etc/passwd",
            "../x",
            "a/b",
            "a\\b",
            "json:{}",
            "a\nb",
        ] {
            assert!(check_plain_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sniffs_magic() {
        let l = ImportLimits::default();
        assert_eq!(sniff(b"KDMV....", b"", 1 << 20, &l), Sniffed::VmdkSparse);
        assert_eq!(sniff(b"QFI\xfb....", b"", 1 << 20, &l), Sniffed::Qcow2);
        assert_eq!(sniff(b"vhdxfile", b"", 1 << 20, &l), Sniffed::Vhdx);
        assert_eq!(sniff(b"\0\0\0\0", b"conectix", 1 << 20, &l), Sniffed::Vhd);
        assert_eq!(
            sniff(b"# Disk DescriptorFile\nversion=1\n", b"", 100, &l),
            Sniffed::VmdkDescriptor
        );
        assert_eq!(sniff(b"\0\0\0\0", b"\0\0", 1 << 20, &l), Sniffed::Raw);
        // A big file that merely starts like a descriptor is raw data, not a descriptor.
        assert_eq!(
            sniff(b"# Disk DescriptorFile\n", b"", 1 << 30, &l),
            Sniffed::Raw
        );
    }
}
