//! VMDK: hosted sparse extents ('KDMV' header, maybe with an embedded descriptor) and
//! text descriptors listing extents (`RW 2048 SPARSE "disk-s001.vmdk"`).
use std::path::Path;

use super::bytes::{le16, le32, le64};
use super::{DiskFormat, DiskInfo, ImportLimits, ReadAt, check_size, plain_file_in};
use crate::error::{Result, StorageError, io_err};

const FORMAT: &str = "VMDK";
const SECTOR: u64 = 512;
/// streamOptimized writers put the grain directory at the end and the real header in a
/// footer; the first header then carries this marker.
const GD_AT_END: u64 = u64::MAX;
/// Header flag: grains are deflate-compressed (streamOptimized).
const FLAG_COMPRESSED: u32 = 1 << 16;

/// The createType values hvx imports: what VMware Workstation/ESXi exports and qemu reads.
const ALLOWED_CREATE_TYPES: &[&str] = &[
    "monolithicSparse",
    "streamOptimized",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "monolithicFlat",
    "vmfs",
];

/// One extent line of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub access: String,
    pub sectors: u64,
    pub kind: ExtentKind,
    pub file: Option<String>,
    pub offset_sectors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    Sparse,
    Flat,
    Zero,
}

/// A parsed text descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub create_type: String,
    pub parent_cid: Option<String>,
    pub parent_file_name_hint: Option<String>,
    pub extents: Vec<Extent>,
}

/// The fields of a SparseExtentHeader hvx checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity_sectors: u64,
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_sectors: u64,
    pub gtes_per_gt: u32,
    pub gd_offset: u64,
    pub compress_algorithm: u16,
}

pub(crate) fn looks_like_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let trimmed = text.trim_start();
    trimmed.starts_with("# Disk DescriptorFile") || text.contains("createType")
}

/// Parses a descriptor's text. Unknown keys (ddb.*, CID, ...) are ignored; malformed
/// extent lines and unknown extent types are errors.
pub fn parse_descriptor(text: &str, path: &Path) -> Result<Descriptor> {
    let corrupt = |reason: String| StorageError::CorruptHeader {
        path: path.to_path_buf(),
        format: FORMAT,
        reason,
    };
    let mut desc = Descriptor::default();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or_default();
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            let extent = parse_extent_line(line, path)
                .map_err(|reason| corrupt(format!("line {}: {reason}", n + 1)))?;
            desc.extents.push(extent);
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().trim_matches('"').to_string();
            match key.trim() {
                "createType" => desc.create_type = value,
                "parentCID" => desc.parent_cid = Some(value),
                "parentFileNameHint" => desc.parent_file_name_hint = Some(value),
                _ => {}
            }
        }
    }
    Ok(desc)
}

fn parse_extent_line(line: &str, path: &Path) -> std::result::Result<Extent, String> {
    let _ = path;
    let (before_quote, file, after) = match line.find('"') {
        Some(open) => {
            let rest = &line[open + 1..];
            let close = rest
                .find('"')
                .ok_or_else(|| "unterminated quoted file name".to_string())?;
            (
                &line[..open],
                Some(rest[..close].to_string()),
                &rest[close + 1..],
            )
        }
        None => (line, None, ""),
    };
    let mut words = before_quote.split_whitespace();
    let access = words.next().unwrap_or_default().to_string();
    let sectors: u64 = words
        .next()
        .ok_or("missing extent size")?
        .parse()
        .map_err(|_| "extent size is not a number".to_string())?;
    let kind_word = words.next().ok_or("missing extent type")?;
    if words.next().is_some() {
        return Err("unexpected words before the file name".into());
    }
    let kind = match kind_word {
        "SPARSE" => ExtentKind::Sparse,
        "FLAT" | "VMFS" => ExtentKind::Flat,
        "ZERO" => ExtentKind::Zero,
        // VMFSRDM/VMFSRAW name raw host devices; SESPARSE/VMFSSPARSE are deltas of a parent.
        other => return Err(format!("extent type {other} is not allowed")),
    };
    let offset_sectors = match after.split_whitespace().next() {
        Some(word) => word
            .parse()
            .map_err(|_| "extent offset is not a number".to_string())?,
        None => 0,
    };
    match (kind, &file) {
        (ExtentKind::Zero, _) => {}
        (_, None) => return Err(format!("{kind_word} extent without a file name")),
        _ => {}
    }
    Ok(Extent {
        access,
        sectors,
        kind,
        file,
        offset_sectors,
    })
}

/// Rejects descriptors of delta disks or of types hvx does not import.
fn check_descriptor_kind(desc: &Descriptor, path: &Path) -> Result<()> {
    let refuse = |reason: String| {
        Err(StorageError::Refused {
            path: path.to_path_buf(),
            reason,
        })
    };
    if !ALLOWED_CREATE_TYPES.contains(&desc.create_type.as_str()) {
        return refuse(format!(
            "VMDK createType {:?} is not one of {ALLOWED_CREATE_TYPES:?}",
            desc.create_type
        ));
    }
    if let Some(hint) = &desc.parent_file_name_hint {
        return refuse(format!(
            "VMDK is a delta disk with parent {hint:?}; import the flattened disk instead"
        ));
    }
    if desc
        .parent_cid
        .as_deref()
        .is_some_and(|cid| !cid.eq_ignore_ascii_case("ffffffff"))
    {
        return refuse(
            "VMDK is a delta disk (parentCID is set); import the flattened disk instead".into(),
        );
    }
    Ok(())
}

/// Parses and sanity-checks a SparseExtentHeader.
pub fn parse_sparse_header(buf: &[u8], path: &Path) -> Result<SparseHeader> {
    let corrupt = |reason: String| StorageError::CorruptHeader {
        path: path.to_path_buf(),
        format: FORMAT,
        reason,
    };
    if buf.len() < 512 || !buf.starts_with(b"KDMV") {
        return Err(corrupt("missing KDMV magic".into()));
    }
    let h = SparseHeader {
        version: le32(buf, 4),
        flags: le32(buf, 8),
        capacity_sectors: le64(buf, 12),
        grain_sectors: le64(buf, 20),
        descriptor_offset: le64(buf, 28),
        descriptor_sectors: le64(buf, 36),
        gtes_per_gt: le32(buf, 44),
        gd_offset: le64(buf, 56),
        compress_algorithm: le16(buf, 77),
    };
    if !(1..=3).contains(&h.version) {
        return Err(corrupt(format!("unsupported version {}", h.version)));
    }
    if !h.grain_sectors.is_power_of_two() || h.grain_sectors > 2048 {
        return Err(corrupt(format!(
            "grain size {} sectors is not a power of two up to 2048",
            h.grain_sectors
        )));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > 512 {
        return Err(corrupt(format!(
            "{} grain table entries per table (1 to 512 allowed)",
            h.gtes_per_gt
        )));
    }
    if h.compress_algorithm > 1 {
        return Err(corrupt(format!(
            "unknown compression algorithm {}",
            h.compress_algorithm
        )));
    }
    Ok(h)
}

/// Validates a sparse extent file's header (and its streamOptimized footer); returns the
/// header that describes the data and the embedded descriptor text, if any.
fn check_sparse_file(
    src: &dyn ReadAt,
    limits: &ImportLimits,
) -> Result<(SparseHeader, Option<String>)> {
    let path = src.path().to_path_buf();
    let head = src.read_exact(0, 512, FORMAT, "sparse extent header")?;
    let mut header = parse_sparse_header(&head, &path)?;
    if header.gd_offset == GD_AT_END {
        // streamOptimized: footer = the header again, 1024 bytes before the end.
        let len = src.len();
        if len < 512 * 3 {
            return Err(StorageError::Truncated {
                path,
                format: FORMAT,
                what: "streamOptimized image has no footer".into(),
            });
        }
        let footer = src.read_exact(len - 1024, 512, FORMAT, "streamOptimized footer")?;
        let foot = parse_sparse_header(&footer, &path).map_err(|_| StorageError::Truncated {
            path: path.clone(),
            format: FORMAT,
            what: "streamOptimized footer is missing or damaged".into(),
        })?;
        if foot.gd_offset == GD_AT_END || foot.gd_offset.saturating_mul(SECTOR) >= len {
            return Err(StorageError::CorruptHeader {
                path,
                format: FORMAT,
                reason: "streamOptimized footer has no valid grain directory".into(),
            });
        }
        header = SparseHeader {
            descriptor_offset: header.descriptor_offset,
            descriptor_sectors: header.descriptor_sectors,
            ..foot
        };
    } else if header.gd_offset.saturating_mul(SECTOR) >= src.len() {
        return Err(StorageError::Truncated {
            path,
            format: FORMAT,
            what: format!(
                "grain directory at sector {} is past the end of the file",
                header.gd_offset
            ),
        });
    }
    let capacity =
        header
            .capacity_sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| StorageError::CorruptHeader {
                path: path.clone(),
                format: FORMAT,
                reason: "capacity overflows".into(),
            })?;
    check_size(&path, "VMDK capacity", capacity, limits)?;
    check_grain_directory(src, &header)?;
    let descriptor = if header.descriptor_offset != 0 && header.descriptor_sectors != 0 {
        let bytes = header.descriptor_sectors.saturating_mul(SECTOR);
        if bytes > limits.max_descriptor_bytes {
            return Err(StorageError::TooLarge {
                path,
                what: "embedded VMDK descriptor",
                value: bytes,
                limit: limits.max_descriptor_bytes,
            });
        }
        let raw = src.read_exact(
            header.descriptor_offset.saturating_mul(SECTOR),
            usize::try_from(bytes).unwrap_or(usize::MAX),
            FORMAT,
            "embedded descriptor",
        )?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Some(String::from_utf8_lossy(&raw[..end]).into_owned())
    } else {
        None
    };
    Ok((header, descriptor))
}

/// Every grain table the grain directory points at must lie inside the file (a cut-off
/// download loses the directory or tables at the end first).
fn check_grain_directory(src: &dyn ReadAt, h: &SparseHeader) -> Result<()> {
    let path = src.path().to_path_buf();
    let per_table = h.grain_sectors.saturating_mul(u64::from(h.gtes_per_gt));
    let tables = h.capacity_sectors.div_ceil(per_table.max(1));
    if tables.saturating_mul(4) > 64 << 20 {
        return Err(StorageError::CorruptHeader {
            path,
            format: FORMAT,
            reason: format!("{tables} grain tables is absurd"),
        });
    }
    let gd = src.read_exact(
        h.gd_offset.saturating_mul(SECTOR),
        usize::try_from(tables * 4).unwrap_or(usize::MAX),
        FORMAT,
        "grain directory",
    )?;
    let table_bytes = u64::from(h.gtes_per_gt) * 4;
    let compressed = h.flags & FLAG_COMPRESSED != 0;
    // An uncompressed grain must fit whole; a compressed one at least its marker.
    let grain_bytes = if compressed {
        12
    } else {
        h.grain_sectors * SECTOR
    };
    let mut seen = std::collections::HashSet::new();
    for (i, entry) in gd.chunks_exact(4).enumerate() {
        let sector = u64::from(le32(entry, 0));
        if sector == 0 || !seen.insert(sector) {
            continue;
        }
        let table = src.read_exact(
            sector.saturating_mul(SECTOR),
            usize::try_from(table_bytes).unwrap_or(usize::MAX),
            FORMAT,
            &format!("grain table {i}"),
        )?;
        for grain in table.chunks_exact(4).map(|g| u64::from(le32(g, 0))) {
            // 1 marks a zeroed grain in some writers; 0 is unallocated.
            if grain > 1 && grain.saturating_mul(SECTOR).saturating_add(grain_bytes) > src.len() {
                return Err(StorageError::Truncated {
                    path,
                    format: FORMAT,
                    what: format!(
                        "grain at sector {grain} (table {i}) is past the end of the file"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// A single-file sparse VMDK (monolithicSparse or streamOptimized).
pub(crate) fn inspect_sparse(
    src: &dyn ReadAt,
    _dir: &Path,
    _entry: &str,
    limits: &ImportLimits,
) -> Result<DiskInfo> {
    let path = src.path().to_path_buf();
    let (header, descriptor) = check_sparse_file(src, limits)?;
    let mut subformat = "monolithicSparse".to_string();
    if let Some(text) = descriptor {
        let desc = parse_descriptor(&text, &path)?;
        check_descriptor_kind(&desc, &path)?;
        if !matches!(
            desc.create_type.as_str(),
            "monolithicSparse" | "streamOptimized"
        ) {
            return Err(StorageError::Refused {
                path,
                reason: format!(
                    "a sparse extent with an embedded descriptor of type {:?} (extent of a split disk?): import its descriptor file instead",
                    desc.create_type
                ),
            });
        }
        for extent in &desc.extents {
            if let Some(file) = &extent.file {
                super::check_plain_name(file)?;
            }
        }
        subformat = desc.create_type;
    }
    Ok(DiskInfo {
        format: DiskFormat::Vmdk,
        subformat,
        virtual_size: header.capacity_sectors * SECTOR,
        files: vec![path],
    })
}

/// A text descriptor with separate extent files.
pub(crate) fn inspect_descriptor(
    src: &dyn ReadAt,
    dir: &Path,
    _entry: &str,
    limits: &ImportLimits,
) -> Result<DiskInfo> {
    let path = src.path().to_path_buf();
    let raw = src.read_up_to(0, usize::try_from(src.len()).unwrap_or(usize::MAX))?;
    let text = std::str::from_utf8(&raw).map_err(|_| StorageError::CorruptHeader {
        path: path.clone(),
        format: FORMAT,
        reason: "descriptor is not UTF-8 text".into(),
    })?;
    let desc = parse_descriptor(text, &path)?;
    check_descriptor_kind(&desc, &path)?;
    if desc.extents.is_empty() {
        return Err(StorageError::CorruptHeader {
            path,
            format: FORMAT,
            reason: "descriptor lists no extents".into(),
        });
    }
    if desc.extents.len() > limits.max_extents {
        return Err(StorageError::Refused {
            path,
            reason: format!(
                "descriptor lists {} extents (at most {})",
                desc.extents.len(),
                limits.max_extents
            ),
        });
    }
    let mut files = vec![path.clone()];
    let mut total_sectors: u64 = 0;
    for extent in &desc.extents {
        total_sectors = total_sectors.checked_add(extent.sectors).ok_or_else(|| {
            StorageError::CorruptHeader {
                path: path.clone(),
                format: FORMAT,
                reason: "extent sizes overflow".into(),
            }
        })?;
        check_size(
            &path,
            "VMDK size",
            total_sectors.saturating_mul(SECTOR),
            limits,
        )?;
        let Some(name) = &extent.file else { continue };
        // The security boundary: an extent must be a plain name of a regular file that
        // is part of the import; a host path is refused without ever being opened.
        let extent_path = plain_file_in(dir, name).map_err(|e| StorageError::Refused {
            path: path.clone(),
            reason: format!("extent {name:?}: {e}"),
        })?;
        if extent_path == path {
            return Err(StorageError::Refused {
                path,
                reason: "a text descriptor names itself as an extent".into(),
            });
        }
        let file = super::open_nofollow(&extent_path)?;
        let len = file.metadata().map_err(io_err(&extent_path))?.len();
        let ext_src = super::bytes::FileAt::new(&file, &extent_path, len);
        match extent.kind {
            ExtentKind::Sparse => {
                let (header, _) = check_sparse_file(&ext_src, limits)?;
                if header.capacity_sectors < extent.sectors {
                    return Err(StorageError::CorruptHeader {
                        path: extent_path,
                        format: FORMAT,
                        reason: format!(
                            "sparse extent holds {} sectors, the descriptor says {}",
                            header.capacity_sectors, extent.sectors
                        ),
                    });
                }
            }
            ExtentKind::Flat => {
                let need = extent
                    .offset_sectors
                    .saturating_add(extent.sectors)
                    .saturating_mul(SECTOR);
                if len < need {
                    return Err(StorageError::Truncated {
                        path: extent_path,
                        format: FORMAT,
                        what: format!("flat extent is {len} bytes, the descriptor needs {need}"),
                    });
                }
            }
            ExtentKind::Zero => {}
        }
        if !files.contains(&extent_path) {
            files.push(extent_path);
        }
    }
    Ok(DiskInfo {
        format: DiskFormat::Vmdk,
        subformat: desc.create_type,
        virtual_size: total_sectors * SECTOR,
        files,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const DESC: &str = r#"# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="twoGbMaxExtentSparse"

# Extent description
RW 4192256 SPARSE "disk-s001.vmdk"
RW 2048 SPARSE "disk-s002.vmdk"
RW 100 FLAT "flat.vmdk" 10
RW 10 ZERO

ddb.virtualHWVersion = "4"
"#;

    #[test]
    fn parses_extents() {
        let d = parse_descriptor(DESC, Path::new("d")).unwrap();
        assert_eq!(d.create_type, "twoGbMaxExtentSparse");
        assert_eq!(d.extents.len(), 4);
        assert_eq!(d.extents[0].sectors, 4192256);
        assert_eq!(d.extents[1].file.as_deref(), Some("disk-s002.vmdk"));
        assert_eq!(d.extents[2].kind, ExtentKind::Flat);
        assert_eq!(d.extents[2].offset_sectors, 10);
        assert_eq!(d.extents[3].kind, ExtentKind::Zero);
        assert!(check_descriptor_kind(&d, Path::new("d")).is_ok());
    }

    #[test]
    fn refuses_raw_device_and_delta() {
        let rdm = "createType=\"vmfsRawDeviceMap\"\nRW 10 VMFSRDM \"/dev/sda\"\n";
        assert!(parse_descriptor(rdm, Path::new("d")).is_err());
        let delta = "createType=\"monolithicSparse\"\nparentCID=abcdef01\nparentFileNameHint=\"/vmfs/base.vmdk\"\n";
        let d = parse_descriptor(delta, Path::new("d")).unwrap();
        assert!(matches!(
            check_descriptor_kind(&d, Path::new("d")),
            Err(StorageError::Refused { .. })
        ));
        let custom = parse_descriptor("createType=\"custom\"\n", Path::new("d")).unwrap();
        assert!(check_descriptor_kind(&custom, Path::new("d")).is_err());
    }

    #[test]
    fn malformed_extent_lines() {
        for line in [
            "RW abc SPARSE \"x\"",
            "RW 10 SPARSE",
            "RW 10 SPARSE \"x",
            "RW 10 FLAT \"x\" notanumber",
            "RW",
        ] {
            assert!(parse_extent_line(line, Path::new("d")).is_err(), "{line}");
        }
    }

    fn header(capacity: u64, grain: u64, gtes: u32) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..4].copy_from_slice(b"KDMV");
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[12..20].copy_from_slice(&capacity.to_le_bytes());
        b[20..28].copy_from_slice(&grain.to_le_bytes());
        b[44..48].copy_from_slice(&gtes.to_le_bytes());
        b[56..64].copy_from_slice(&1u64.to_le_bytes());
        b
    }

    #[test]
    fn sparse_header_sanity() {
        let p = Path::new("x");
        assert!(parse_sparse_header(&header(2048, 128, 512), p).is_ok());
        assert!(parse_sparse_header(&header(2048, 100, 512), p).is_err());
        assert!(parse_sparse_header(&header(2048, 128, 4096), p).is_err());
        assert!(parse_sparse_header(&header(2048, 128, 512)[..100], p).is_err());
    }

    #[test]
    fn sparse_capacity_limit() {
        let mut img = header(u64::MAX / 512, 128, 512);
        img.resize(4096, 0);
        let src = super::super::bytes::SliceAt {
            data: &img,
            path: "x".into(),
        };
        let err = check_sparse_file(&src, &ImportLimits::default()).unwrap_err();
        assert!(matches!(err, StorageError::TooLarge { .. }), "{err}");
    }
}
