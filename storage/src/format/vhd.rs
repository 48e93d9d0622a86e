//! VHD ('conectix' footer): fixed and dynamic disks; differencing disks (a parent on the
//! host) are refused.
use super::bytes::{be32, be64};
use super::{DiskFormat, DiskInfo, ImportLimits, ReadAt, check_size};
use crate::error::{Result, StorageError};

const FORMAT: &str = "VHD";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;

/// The footer checksum: one's complement of the byte sum without the checksum field.
pub fn footer_checksum(footer: &[u8]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

pub(crate) fn inspect(src: &dyn ReadAt, limits: &ImportLimits) -> Result<DiskInfo> {
    let path = src.path().to_path_buf();
    let corrupt = |reason: String| StorageError::CorruptHeader {
        path: path.clone(),
        format: FORMAT,
        reason,
    };
    if src.len() < 512 {
        return Err(StorageError::Truncated {
            path,
            format: FORMAT,
            what: "shorter than a footer".into(),
        });
    }
    // The footer at the end is authoritative; dynamic disks keep a copy at offset 0,
    // used when the end was cut off (truncated download).
    let tail = src.read_exact(src.len() - 512, 512, FORMAT, "footer")?;
    let footer = if tail.starts_with(b"conectix") {
        tail
    } else {
        let head = src.read_exact(0, 512, FORMAT, "footer copy")?;
        if !head.starts_with(b"conectix") {
            return Err(corrupt("no conectix footer".into()));
        }
        return Err(StorageError::Truncated {
            path,
            format: FORMAT,
            what: "the footer at the end of the file is missing (cut-off download?)".into(),
        });
    };
    let stored = be32(&footer, 64);
    if stored != footer_checksum(&footer) {
        return Err(corrupt(format!(
            "footer checksum {stored:#x} does not match"
        )));
    }
    let disk_type = be32(&footer, 60);
    let current_size = be64(&footer, 48);
    check_size(&path, "VHD size", current_size, limits)?;
    let subformat = match disk_type {
        TYPE_FIXED => {
            if src.len() - 512 < current_size {
                return Err(StorageError::Truncated {
                    path,
                    format: FORMAT,
                    what: format!(
                        "fixed disk holds {} of {current_size} bytes",
                        src.len() - 512
                    ),
                });
            }
            "fixed"
        }
        TYPE_DYNAMIC => {
            check_dynamic_header(src, be64(&footer, 16), current_size)?;
            "dynamic"
        }
        TYPE_DIFFERENCING => {
            return Err(StorageError::Refused {
                path,
                reason: "VHD is a differencing disk with a parent; import a merged disk instead"
                    .into(),
            });
        }
        other => return Err(corrupt(format!("unknown disk type {other}"))),
    };
    Ok(DiskInfo {
        format: DiskFormat::Vhd,
        subformat: subformat.into(),
        virtual_size: current_size,
        files: vec![path],
    })
}

fn check_dynamic_header(src: &dyn ReadAt, offset: u64, size: u64) -> Result<()> {
    let path = src.path().to_path_buf();
    let corrupt = |reason: String| StorageError::CorruptHeader {
        path: path.clone(),
        format: FORMAT,
        reason,
    };
    let h = src.read_exact(offset, 1024, FORMAT, "dynamic disk header")?;
    if !h.starts_with(b"cxsparse") {
        return Err(corrupt("dynamic disk header has no cxsparse cookie".into()));
    }
    let table_offset = be64(&h, 16);
    let entries = u64::from(be32(&h, 28));
    let block = u64::from(be32(&h, 32));
    if !block.is_power_of_two() || !(512..=(256 << 20)).contains(&block) {
        return Err(corrupt(format!("block size {block}")));
    }
    if entries.saturating_mul(block) < size {
        return Err(corrupt(format!(
            "{entries} blocks of {block} bytes cannot hold {size} bytes"
        )));
    }
    if table_offset.saturating_add(entries * 4) > src.len() {
        return Err(StorageError::Truncated {
            path,
            format: FORMAT,
            what: "block allocation table is past the end of the file".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::bytes::SliceAt;
    use super::*;

    fn fixed(size: u64, disk_type: u32) -> Vec<u8> {
        let mut img = vec![0u8; size as usize + 512];
        let f = &mut img[size as usize..];
        f[..8].copy_from_slice(b"conectix");
        f[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&disk_type.to_be_bytes());
        let sum = footer_checksum(f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        img
    }

    fn inspect_bytes(b: &[u8]) -> Result<DiskInfo> {
        inspect(
            &SliceAt {
                data: b,
                path: "t.vhd".into(),
            },
            &ImportLimits::default(),
        )
    }

    #[test]
    fn fixed_disk() {
        assert_eq!(
            inspect_bytes(&fixed(4096, TYPE_FIXED))
                .unwrap()
                .virtual_size,
            4096
        );
    }

    #[test]
    fn refuses_differencing_and_bad_checksum() {
        assert!(matches!(
            inspect_bytes(&fixed(4096, TYPE_DIFFERENCING)),
            Err(StorageError::Refused { .. })
        ));
        let mut b = fixed(4096, TYPE_FIXED);
        b[4096 + 50] ^= 1;
        assert!(matches!(
            inspect_bytes(&b),
            Err(StorageError::CorruptHeader { .. })
        ));
    }
}
