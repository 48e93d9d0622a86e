//! Just enough VMDK to know what a disk file is: a sparse/streamOptimized image (sent
//! as is), or a text descriptor whose data lives in extent files (ESX's `x.vmdk` +
//! `x-flat.vmdk`), plus the virtual capacity either way.

use crate::devices::is_plain_name;

/// Bytes of a file's head looked at.
pub const HEAD_BYTES: usize = 64 * 1024;
const SECTOR: u64 = 512;

/// One extent line of a descriptor: `RW 41943040 FLAT "x-flat.vmdk" 0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// `FLAT`, `VMFS`, `SPARSE`, `VMFSSPARSE`, `SESPARSE`, `ZERO`...
    pub kind: String,
    /// Extent file name as written (checked by the caller).
    pub file: Option<String>,
    /// Offset in sectors into the extent file (FLAT only).
    pub offset: u64,
}

/// What a VMDK file is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmdkKind {
    /// Hosted sparse or streamOptimized: self-contained.
    Sparse {
        /// Virtual capacity in bytes.
        capacity_bytes: u64,
    },
    /// A text descriptor pointing at extent files.
    Descriptor {
        /// `createType`.
        create_type: String,
        /// `parentFileNameHint`: a snapshot delta, useless without its parent.
        parent: Option<String>,
        /// Extents in order.
        extents: Vec<Extent>,
    },
    /// Not a VMDK (raw, qcow2, VHD...): sent as is, format detected by the cluster.
    Other,
}

impl VmdkKind {
    /// Virtual capacity, when known.
    pub fn capacity_bytes(&self) -> Option<u64> {
        match self {
            Self::Sparse { capacity_bytes } => Some(*capacity_bytes),
            Self::Descriptor { extents, .. } => extents.iter().try_fold(0u64, |acc, e| {
                acc.checked_add(e.sectors.checked_mul(SECTOR)?)
            }),
            Self::Other => None,
        }
    }
}

/// Inspects the first bytes of a disk file.
pub fn inspect(head: &[u8]) -> VmdkKind {
    if head.len() >= 20 && &head[..4] == b"KDMV" {
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&head[12..20]);
        return VmdkKind::Sparse {
            capacity_bytes: u64::from_le_bytes(cap).saturating_mul(SECTOR),
        };
    }
    let text = String::from_utf8_lossy(head);
    if !text.trim_start().starts_with("# Disk DescriptorFile") {
        return VmdkKind::Other;
    }
    let mut create_type = String::new();
    let mut parent = None;
    let mut extents = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("createType=") {
            create_type = v.trim_matches('"').to_owned();
        } else if let Some(v) = line.strip_prefix("parentFileNameHint=") {
            parent = Some(v.trim_matches('"').to_owned());
        } else if let Some(extent) = parse_extent(line) {
            extents.push(extent);
        }
    }
    VmdkKind::Descriptor {
        create_type,
        parent,
        extents,
    }
}

fn parse_extent(line: &str) -> Option<Extent> {
    let (access, rest) = line.split_once(' ')?;
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return None;
    }
    let (sectors, rest) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
    let sectors = sectors.parse().ok()?;
    let (kind, rest) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
    let rest = rest.trim();
    let (file, offset) = match rest.strip_prefix('"').and_then(|r| r.split_once('"')) {
        Some((file, tail)) => (Some(file.to_owned()), tail.trim().parse().unwrap_or(0)),
        None => (None, 0),
    };
    Some(Extent {
        access: access.to_owned(),
        sectors,
        kind: kind.to_owned(),
        file,
        offset,
    })
}

/// The single flat extent file a descriptor's data is in, when it is that simple
/// (`monolithicFlat`, ESX `vmfs`): that file is the raw disk image.
pub fn single_flat_extent(kind: &VmdkKind) -> Result<String, String> {
    let VmdkKind::Descriptor {
        create_type,
        parent,
        extents,
    } = kind
    else {
        return Err("not a descriptor".into());
    };
    if let Some(p) = parent
        .as_deref()
        .filter(|p| !p.is_empty() && *p != "ffffffff")
    {
        return Err(format!(
            "it is a snapshot delta of {p:?}; consolidate the snapshots (or qemu-img convert) first"
        ));
    }
    match extents.as_slice() {
        [e] if matches!(e.kind.as_str(), "FLAT" | "VMFS") && e.offset == 0 => {
            let file = e.file.clone().unwrap_or_default();
            if is_plain_name(&file) {
                Ok(file)
            } else {
                Err(format!("its extent file {file:?} is not a plain file name"))
            }
        }
        _ => Err(format!(
            "it is a {create_type:?} descriptor with {} extent(s); convert it to one file first: qemu-img convert -O vmdk -o subformat=streamOptimized <in>.vmdk <out>.vmdk",
            extents.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESX: &str = "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 83886080 VMFS \"app-01-flat.vmdk\"\n\n# The Disk Data Base\nddb.adapterType = \"lsilogic\"\n";

    #[test]
    fn esx_descriptor_has_one_flat_extent() {
        let kind = inspect(ESX.as_bytes());
        assert_eq!(kind.capacity_bytes(), Some(40 << 30));
        assert_eq!(single_flat_extent(&kind).as_deref(), Ok("app-01-flat.vmdk"));
    }

    #[test]
    fn split_and_delta_descriptors_need_conversion() {
        let split = "# Disk DescriptorFile\ncreateType=\"twoGbMaxExtentSparse\"\nRW 4192256 SPARSE \"a-s001.vmdk\"\nRW 4192256 SPARSE \"a-s002.vmdk\"\n";
        let err = single_flat_extent(&inspect(split.as_bytes())).expect_err("split");
        assert!(err.contains("qemu-img convert"), "{err}");
        let delta = "# Disk DescriptorFile\ncreateType=\"vmfsSparse\"\nparentFileNameHint=\"app-01.vmdk\"\nRW 100 VMFSSPARSE \"app-01-000001-delta.vmdk\"\n";
        let err = single_flat_extent(&inspect(delta.as_bytes())).expect_err("delta");
        assert!(err.contains("snapshot delta"), "{err}");
        let evil = "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"../../etc/shadow\" 0\n";
        let err = single_flat_extent(&inspect(evil.as_bytes())).expect_err("traversal");
        assert!(err.contains("not a plain file name"), "{err}");
    }

    #[test]
    fn sparse_header_gives_capacity() {
        let mut head = vec![0u8; 512];
        head[..4].copy_from_slice(b"KDMV");
        head[12..20].copy_from_slice(&(2u64 * 1024 * 1024 * 2).to_le_bytes());
        assert_eq!(inspect(&head).capacity_bytes(), Some(2 << 30));
        assert_eq!(inspect(b"QFI\xfb"), VmdkKind::Other);
    }
}
