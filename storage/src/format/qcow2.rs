//! qcow2 ('QFI\xfb'): refuses backing files, external data files, encryption and
//! unknown incompatible features; bounds sizes and table offsets.
use std::path::Path;

use super::bytes::{be32, be64};
use super::{DiskFormat, DiskInfo, ImportLimits, ReadAt, check_size};
use crate::error::{Result, StorageError};

const FORMAT: &str = "qcow2";
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
/// Incompatible feature bits qemu 10 knows: dirty, corrupt, external data file,
/// compression type, extended L2 entries.
const INCOMPAT_KNOWN: u64 = 0b1_1111;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// The header fields hvx checks (and the store reads back for GC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub encrypted: bool,
    pub incompatible_features: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
}

/// Parses a qcow2 header and its extensions from the image's first cluster.
pub fn parse_header(src: &dyn ReadAt) -> Result<Qcow2Header> {
    let path = src.path().to_path_buf();
    let corrupt = |reason: String| StorageError::CorruptHeader {
        path: path.clone(),
        format: FORMAT,
        reason,
    };
    let b = src.read_exact(0, 72, FORMAT, "header")?;
    if !b.starts_with(b"QFI\xfb") {
        return Err(corrupt("missing QFI\\xfb magic".into()));
    }
    let version = be32(&b, 4);
    let cluster_bits = be32(&b, 20);
    if !(2..=3).contains(&version) {
        return Err(corrupt(format!("unsupported version {version}")));
    }
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "cluster_bits {cluster_bits} outside 9..=21"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    let (incompatible, header_length) = if version == 3 {
        let v3 = src.read_exact(0, 104, FORMAT, "version 3 header")?;
        let header_length = be32(&v3, 100);
        if !(104..=u32::try_from(cluster_size).unwrap_or(u32::MAX)).contains(&header_length)
            || !header_length.is_multiple_of(8)
        {
            return Err(corrupt(format!("header_length {header_length} is invalid")));
        }
        (be64(&v3, 72), u64::from(header_length))
    } else {
        (0, 72)
    };
    let backing_offset = be64(&b, 8);
    let backing_size = be32(&b, 16);
    let mut header = Qcow2Header {
        version,
        cluster_bits,
        size: be64(&b, 24),
        backing_file: None,
        backing_format: None,
        data_file: None,
        encrypted: be32(&b, 32) != 0,
        incompatible_features: incompatible,
        l1_size: be32(&b, 36),
        l1_table_offset: be64(&b, 40),
        refcount_table_offset: be64(&b, 48),
        refcount_table_clusters: be32(&b, 56),
    };
    if backing_offset != 0 {
        if backing_size == 0 || backing_size > 1023 {
            return Err(corrupt(format!("backing file name length {backing_size}")));
        }
        let name = src.read_exact(
            backing_offset,
            backing_size as usize,
            FORMAT,
            "backing file name",
        )?;
        header.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
    }
    // Header extensions live between the header and the end of the first cluster.
    let mut off = header_length;
    loop {
        if off + 8 > cluster_size {
            return Err(corrupt(
                "header extensions run past the first cluster".into(),
            ));
        }
        let ext = src.read_exact(off, 8, FORMAT, "header extension")?;
        let (kind, len) = (be32(&ext, 0), u64::from(be32(&ext, 4)));
        if kind == EXT_END {
            break;
        }
        let data_end = off + 8 + len;
        if data_end > cluster_size {
            return Err(corrupt(format!(
                "header extension {kind:#x} runs past the first cluster"
            )));
        }
        let data = src.read_exact(off + 8, len as usize, FORMAT, "header extension data")?;
        match kind {
            EXT_BACKING_FORMAT => {
                header.backing_format = Some(String::from_utf8_lossy(&data).into_owned())
            }
            EXT_EXTERNAL_DATA_FILE => {
                header.data_file = Some(String::from_utf8_lossy(&data).into_owned())
            }
            EXT_ENCRYPTION => header.encrypted = true,
            _ => {}
        }
        off = data_end.next_multiple_of(8);
    }
    Ok(header)
}

/// Validates a qcow2 image for import.
pub(crate) fn inspect(src: &dyn ReadAt, limits: &ImportLimits) -> Result<DiskInfo> {
    let path = src.path().to_path_buf();
    let h = parse_header(src)?;
    check_for_import(&h, &path, src.len(), limits)?;
    Ok(DiskInfo {
        format: DiskFormat::Qcow2,
        subformat: format!("qcow2 v{}", h.version),
        virtual_size: h.size,
        files: vec![path],
    })
}

fn check_for_import(h: &Qcow2Header, path: &Path, len: u64, limits: &ImportLimits) -> Result<()> {
    if let Some(backing) = &h.backing_file {
        return Err(StorageError::Refused {
            path: path.to_path_buf(),
            reason: format!(
                "qcow2 has a backing file {backing:?}; import a flattened image (qemu-img convert) instead"
            ),
        });
    }
    check_contained(h, path, len, limits)
}

/// Validates a layer of a moved disk chain: like an import, but its backing file is
/// expected (the mover rewrites it to this node's parent layer or base).
pub(crate) fn check_layer(
    h: &Qcow2Header,
    path: &Path,
    len: u64,
    limits: &ImportLimits,
) -> Result<()> {
    check_contained(h, path, len, limits)
}

/// Everything but the backing file: no external data file, encryption, unknown or
/// corrupt features; sizes and tables within bounds.
fn check_contained(h: &Qcow2Header, path: &Path, len: u64, limits: &ImportLimits) -> Result<()> {
    let refuse = |reason: String| {
        Err(StorageError::Refused {
            path: path.to_path_buf(),
            reason,
        })
    };
    let corrupt = |reason: String| {
        Err(StorageError::CorruptHeader {
            path: path.to_path_buf(),
            format: FORMAT,
            reason,
        })
    };
    if h.data_file.is_some() || h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        return refuse(format!(
            "qcow2 uses an external data file {:?}",
            h.data_file.as_deref().unwrap_or("(unnamed)")
        ));
    }
    if h.encrypted {
        return refuse("qcow2 is encrypted".into());
    }
    if h.incompatible_features & !INCOMPAT_KNOWN != 0 {
        return refuse(format!(
            "qcow2 has unknown incompatible features {:#x}",
            h.incompatible_features & !INCOMPAT_KNOWN
        ));
    }
    if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return corrupt("the image is marked corrupt".into());
    }
    check_size(path, "qcow2 virtual size", h.size, limits)?;
    let cluster = 1u64 << h.cluster_bits;
    // Each L1 entry maps one L2 table of cluster/8 entries (16-byte entries with
    // extended L2), each of one cluster.
    let entry_bytes = if h.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
        16
    } else {
        8
    };
    let l2_entries = cluster / entry_bytes;
    let needed_l1 = h.size.div_ceil(cluster.saturating_mul(l2_entries));
    if u64::from(h.l1_size) < needed_l1 {
        return corrupt(format!(
            "L1 table of {} entries cannot map {} bytes",
            h.l1_size, h.size
        ));
    }
    if u64::from(h.l1_size) > (32 << 20) / 8 {
        return corrupt(format!("L1 table of {} entries is absurd", h.l1_size));
    }
    let l1_end = h.l1_table_offset.saturating_add(u64::from(h.l1_size) * 8);
    if h.l1_size > 0 && (!h.l1_table_offset.is_multiple_of(cluster) || l1_end > len) {
        return corrupt(format!(
            "L1 table at {} is unaligned or past the end of the {len} byte file",
            h.l1_table_offset
        ));
    }
    let rt_end = h
        .refcount_table_offset
        .saturating_add(u64::from(h.refcount_table_clusters).saturating_mul(cluster));
    if h.refcount_table_offset == 0
        || !h.refcount_table_offset.is_multiple_of(cluster)
        || rt_end > len
    {
        return corrupt(format!(
            "refcount table at {} is unaligned or past the end of the {len} byte file",
            h.refcount_table_offset
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::bytes::SliceAt;
    use super::*;

    /// A minimal valid-looking v3 header in a 3-cluster (64 KiB) image.
    fn image(size: u64) -> Vec<u8> {
        let cluster = 65536usize;
        let mut b = vec![0u8; cluster * 4];
        b[..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3 * cluster as u64).to_be_bytes());
        b[48..56].copy_from_slice(&(cluster as u64).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    fn inspect_bytes(b: &[u8]) -> Result<DiskInfo> {
        inspect(
            &SliceAt {
                data: b,
                path: "t.qcow2".into(),
            },
            &ImportLimits::default(),
        )
    }

    fn add_ext(b: &mut [u8], at: usize, kind: u32, data: &[u8]) {
        b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
        b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        b[at + 8..at + 8 + data.len()].copy_from_slice(data);
    }

    #[test]
    fn accepts_plain_image() {
        let info = inspect_bytes(&image(1 << 30)).unwrap();
        assert_eq!(info.virtual_size, 1 << 30);
    }

    #[test]
    fn refuses_backing_file() {
        let mut b = image(1 << 30);
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&11u32.to_be_bytes());
        b[200..211].copy_from_slice(b"/etc/shadow");
        let err = inspect_bytes(&b).unwrap_err();
        assert!(err.to_string().contains("/etc/shadow"), "{err}");
        assert!(matches!(err, StorageError::Refused { .. }));
    }

    #[test]
    fn refuses_external_data_file() {
        let mut b = image(1 << 30);
        add_ext(&mut b, 104, EXT_EXTERNAL_DATA_FILE, b"/dev/sda");
        assert!(matches!(
            inspect_bytes(&b),
            Err(StorageError::Refused { .. })
        ));
        let mut b = image(1 << 30);
        b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        assert!(matches!(
            inspect_bytes(&b),
            Err(StorageError::Refused { .. })
        ));
    }

    #[test]
    fn refuses_absurd_sizes_and_corrupt_headers() {
        assert!(matches!(
            inspect_bytes(&image(1 << 60)),
            Err(StorageError::TooLarge { .. })
        ));
        // L1 too small for the size.
        assert!(matches!(
            inspect_bytes(&image(1 << 40)),
            Err(StorageError::CorruptHeader { .. })
        ));
        let mut b = image(1 << 30);
        b[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(matches!(
            inspect_bytes(&b),
            Err(StorageError::CorruptHeader { .. })
        ));
        assert!(matches!(
            inspect_bytes(&image(1 << 30)[..50]),
            Err(StorageError::Truncated { .. })
        ));
        let mut b = image(1 << 30);
        add_ext(&mut b, 104, 0x1234, &[0u8; 8]);
        b[108..112].copy_from_slice(&0x7fff_0000u32.to_be_bytes());
        assert!(inspect_bytes(&b).is_err());
    }
}
