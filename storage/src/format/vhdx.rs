//! VHDX ('vhdxfile'): reads the region table and the metadata region for the virtual
//! size and the HasParent flag; differencing disks are refused. Checksums are left to
//! qemu, which verifies them on open.
use super::bytes::{le16, le32, le64};
use super::{DiskFormat, DiskInfo, ImportLimits, ReadAt, check_size};
use crate::error::{Result, StorageError};

const FORMAT: &str = "VHDX";
const REGION_TABLE_OFFSET: u64 = 192 << 10;
/// GUIDs as stored on disk (first three fields little-endian).
const METADATA_REGION: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
const HAS_PARENT: u32 = 1 << 1;

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

pub(crate) fn inspect(src: &dyn ReadAt, limits: &ImportLimits) -> Result<DiskInfo> {
    let path = src.path().to_path_buf();
    let corrupt = |reason: String| StorageError::CorruptHeader {
        path: path.clone(),
        format: FORMAT,
        reason,
    };
    let regions = src.read_exact(REGION_TABLE_OFFSET, 64 << 10, FORMAT, "region table")?;
    if !regions.starts_with(b"regi") {
        return Err(corrupt("region table signature missing".into()));
    }
    let count = le32(&regions, 8) as usize;
    if count > 2047 {
        return Err(corrupt(format!("{count} region table entries")));
    }
    let mut metadata = None;
    for i in 0..count {
        let e = &regions[16 + i * 32..16 + (i + 1) * 32];
        if e[..16] == METADATA_REGION {
            metadata = Some((le64(e, 16), u64::from(le32(e, 24))));
        }
    }
    let (meta_off, meta_len) = metadata.ok_or_else(|| corrupt("no metadata region".into()))?;
    if !(64 << 10..=1 << 20).contains(&meta_len) {
        return Err(corrupt(format!("metadata region of {meta_len} bytes")));
    }
    let meta = src.read_exact(meta_off, meta_len as usize, FORMAT, "metadata region")?;
    if !meta.starts_with(b"metadata") {
        return Err(corrupt("metadata table signature missing".into()));
    }
    let entries = usize::from(le16(&meta, 10));
    if entries > 2047 {
        return Err(corrupt(format!("{entries} metadata entries")));
    }
    let item = |id: &[u8; 16], len: usize| -> Result<Option<Vec<u8>>> {
        for i in 0..entries {
            let e = &meta[32 + i * 32..32 + (i + 1) * 32];
            if e[..16] == *id {
                let off = le32(e, 16) as usize;
                let item_len = le32(e, 20) as usize;
                if item_len < len || off.saturating_add(len) > meta.len() {
                    return Err(corrupt("metadata item out of bounds".into()));
                }
                return Ok(Some(meta[off..off + len].to_vec()));
            }
        }
        Ok(None)
    };
    let params = item(&FILE_PARAMETERS, 8)?.ok_or_else(|| corrupt("no file parameters".into()))?;
    let size =
        item(&VIRTUAL_DISK_SIZE, 8)?.ok_or_else(|| corrupt("no virtual disk size".into()))?;
    if le32(&params, 4) & HAS_PARENT != 0 || item(&PARENT_LOCATOR, 1)?.is_some() {
        return Err(StorageError::Refused {
            path,
            reason: "VHDX is a differencing disk with a parent; import a merged disk instead"
                .into(),
        });
    }
    let block = u64::from(le32(&params, 0));
    if !block.is_power_of_two() || !(1 << 20..=256 << 20).contains(&block) {
        return Err(corrupt(format!("block size {block}")));
    }
    let virtual_size = le64(&size, 0);
    check_size(&path, "VHDX virtual size", virtual_size, limits)?;
    Ok(DiskInfo {
        format: DiskFormat::Vhdx,
        subformat: "vhdx".into(),
        virtual_size,
        files: vec![path],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn guid_layout_matches_spec() {
        // 8B7CA206-4790-4B9A-B8FE-575F050F886E as on disk.
        assert_eq!(
            METADATA_REGION,
            [
                0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B, 0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F,
                0x88, 0x6E
            ]
        );
    }
}
