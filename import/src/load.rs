//! Reading an export from disk: picks the parser by file kind and locates every disk
//! file the descriptor references (beside the OVF/VMX, or inside the OVA).

use crate::error::{ImportError, Result};
use crate::limits::{MAX_DESCRIPTOR_BYTES, MAX_VMX_BYTES};
use crate::model::{ImageFormat, ImportedApplication};
use crate::ova::{self, ManifestEntry, OvaIndex};
use crate::vmdk::{self, VmdkKind};
use crate::{ovf, vmx, vmx_vm};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The kind of export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A tar archive with descriptor, manifest and disks.
    Ova,
    /// A descriptor with disks beside it.
    Ovf,
    /// A VMX with disks beside it.
    Vmx,
}

/// Where a disk file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskLocation {
    /// A file on the local filesystem.
    File {
        /// Its path.
        path: PathBuf,
        /// Its length.
        size: u64,
    },
    /// A member of an OVA.
    OvaMember {
        /// The archive.
        ova: PathBuf,
        /// Offset of the member's content.
        offset: u64,
        /// Member length.
        size: u64,
    },
}

impl DiskLocation {
    /// Length in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Self::File { size, .. } | Self::OvaMember { size, .. } => *size,
        }
    }

    /// A reader over the bytes from `from` on (for resumed uploads).
    pub fn open_at(&self, from: u64) -> Result<Box<dyn Read + Send>> {
        let (path, start, size) = match self {
            Self::File { path, size } => (path, 0, *size),
            Self::OvaMember { ova, offset, size } => (ova, *offset, *size),
        };
        let read_err = |source| ImportError::Read {
            path: path.clone(),
            source,
        };
        let mut f = File::open(path).map_err(read_err)?;
        f.seek(SeekFrom::Start(start.saturating_add(from.min(size))))
            .map_err(read_err)?;
        Ok(Box::new(f.take(size.saturating_sub(from))))
    }
}

/// A loaded export: the application plus where each disk file is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Kind of the input.
    pub kind: SourceKind,
    /// The application.
    pub app: ImportedApplication,
    /// Disk file name to its bytes.
    pub disks: BTreeMap<String, DiskLocation>,
    /// Members checked against the OVA manifest, with their digests.
    pub verified: Vec<ManifestEntry>,
}

/// Options for [`load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Verify OVA manifest checksums (reads every disk once).
    pub verify_manifest: bool,
    /// OVF deployment option to deploy (default: the export's default).
    pub deployment_option: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            verify_manifest: true,
            deployment_option: None,
        }
    }
}

impl LoadOptions {
    fn ovf(&self) -> ovf::OvfOptions {
        ovf::OvfOptions {
            deployment_option: self.deployment_option.clone(),
        }
    }
}

impl Loaded {
    /// The verified SHA-256 of a disk file, as `sha256:<hex>`.
    pub fn sha256_of(&self, file: &str) -> Option<String> {
        self.verified
            .iter()
            .find(|e| e.name == file && e.algorithm == "SHA256")
            .map(|e| format!("sha256:{}", e.digest))
    }
}

/// Tells the kind from the extension, else from the first bytes.
pub fn kind_of(path: &Path) -> Result<SourceKind> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("ova") => return Ok(SourceKind::Ova),
        Some("ovf") => return Ok(SourceKind::Ovf),
        Some("vmx") => return Ok(SourceKind::Vmx),
        _ => {}
    }
    let mut head = [0u8; 512];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let head = &head[..n];
    if n >= 262 && &head[257..262] == b"ustar" {
        Ok(SourceKind::Ova)
    } else if String::from_utf8_lossy(head).contains("Envelope") {
        Ok(SourceKind::Ovf)
    } else {
        Err(ImportError::UnknownKind {
            path: path.to_path_buf(),
        })
    }
}

/// Loads the export at `path`.
pub fn load(path: &Path, options: LoadOptions) -> Result<Loaded> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("imported")
        .to_owned();
    match kind_of(path)? {
        SourceKind::Ova => load_ova(path, &stem, options),
        SourceKind::Ovf => {
            let bytes = read_bounded(path, MAX_DESCRIPTOR_BYTES, "OVF descriptor")?;
            let text = String::from_utf8(bytes)
                .map_err(|_| ImportError::Ovf(format!("{} is not UTF-8", path.display())))?;
            let app = ovf::parse_with(&text, &stem, &options.ovf())?;
            beside(path, SourceKind::Ovf, app)
        }
        SourceKind::Vmx => {
            let bytes = read_bounded(path, MAX_VMX_BYTES, "VMX file")?;
            // Workstation writes `.encoding = "windows-1252"` files: when the bytes are
            // not UTF-8, read them as Latin-1, which keeps every byte as one character.
            let text = String::from_utf8(bytes)
                .unwrap_or_else(|e| e.into_bytes().iter().map(|&b| char::from(b)).collect());
            if let Some(option) = &options.deployment_option {
                return Err(ImportError::Vmx {
                    line: 0,
                    reason: format!(
                        "deployment option {option:?}: a VMX has no deployment options (they are an OVF feature)"
                    ),
                });
            }
            let app = vmx_vm::application(&vmx::parse(&text)?, &stem)?;
            beside(path, SourceKind::Vmx, app)
        }
    }
}

fn load_ova(path: &Path, stem: &str, options: LoadOptions) -> Result<Loaded> {
    let index: OvaIndex = ova::index(path)?;
    let mut app = ovf::parse_with(&ova::descriptor_text(&index)?, stem, &options.ovf())?;
    // Every member the descriptor or the manifest names and the archive lacks, in one
    // error: a partial download or a hand-built OVA usually misses several.
    let mut missing: Vec<ImportError> = Vec::new();
    let mut missing_names: Vec<&str> = Vec::new();
    for file in &app.disk_files {
        if index.member(&file.name).is_none() && !missing_names.contains(&file.name.as_str()) {
            missing_names.push(&file.name);
            missing.push(ImportError::MissingDisk {
                name: file.name.clone(),
                looked_in: format!("members of {}", path.display()),
            });
        }
    }
    let listed = if options.verify_manifest {
        ova::manifest_entries(&index)?
    } else {
        Vec::new()
    };
    for entry in &listed {
        if index.member(&entry.name).is_none() && !missing_names.contains(&entry.name.as_str()) {
            missing_names.push(&entry.name);
            missing.push(ova::not_in_archive(&index, &entry.name));
        }
    }
    ImportError::collect(missing)?;
    let verified = if options.verify_manifest {
        ova::verify_manifest(&index)?
    } else {
        Vec::new()
    };
    let mut disks = BTreeMap::new();
    let mut capacities = Vec::new();
    for file in &mut app.disk_files {
        let member = index
            .member(&file.name)
            .ok_or_else(|| ImportError::MissingDisk {
                name: file.name.clone(),
                looked_in: format!("members of {}", path.display()),
            })?;
        file.size_bytes = Some(member.size);
        let location = DiskLocation::OvaMember {
            ova: path.to_path_buf(),
            offset: member.offset,
            size: member.size,
        };
        let kind = vmdk::inspect(&head(&location)?);
        if matches!(kind, VmdkKind::Descriptor { .. }) {
            return Err(ImportError::UnsupportedDisk {
                name: file.name.clone(),
                reason: "it is a VMDK descriptor without its data; export the OVA with streamOptimized disks".into(),
            });
        }
        file.format = format_of(&kind);
        capacities.push((file.name.clone(), kind.capacity_bytes()));
        disks.insert(file.name.clone(), location);
    }
    fill_capacities(&mut app, &capacities);
    Ok(Loaded {
        kind: SourceKind::Ova,
        app,
        disks,
        verified,
    })
}

/// Disk files of an OVF or VMX: regular files in the descriptor's own directory.
fn beside(descriptor: &Path, kind: SourceKind, mut app: ImportedApplication) -> Result<Loaded> {
    let dir = descriptor.parent().unwrap_or(Path::new("."));
    let mut disks = BTreeMap::new();
    let mut capacities = Vec::new();
    let mut renames = Vec::new();
    let mut problems = Vec::new();
    for file in &mut app.disk_files {
        // Every missing or unreadable disk is reported, not just the first.
        let found = regular_file(dir, &file.name).and_then(|l| Ok((head(&l)?, l)));
        let (head, mut location) = match found {
            Ok(found) => found,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let kind = vmdk::inspect(&head);
        file.format = format_of(&kind);
        capacities.push((file.name.clone(), kind.capacity_bytes()));
        if matches!(kind, VmdkKind::Descriptor { .. }) {
            // ESX keeps the data in `<name>-flat.vmdk`: that file is the raw image.
            let flat = vmdk::single_flat_extent(&kind)
                .map_err(|reason| ImportError::UnsupportedDisk {
                    name: file.name.clone(),
                    reason,
                })
                .and_then(|flat| Ok((regular_file(dir, &flat)?, flat)));
            let flat = match flat {
                Ok((flat_location, flat)) => {
                    location = flat_location;
                    flat
                }
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            app.warnings.push(format!(
                "{} is a VMDK descriptor; its flat extent {flat} is imported as a raw image",
                file.name
            ));
            capacities.push((flat.clone(), kind.capacity_bytes()));
            renames.push((file.name.clone(), flat.clone()));
            file.name = flat;
            file.format = ImageFormat::Raw;
        }
        file.size_bytes = Some(location.size());
        disks.insert(file.name.clone(), location);
    }
    ImportError::collect(problems)?;
    for vm in &mut app.vms {
        for disk in &mut vm.disks {
            if let Some((_, flat)) = renames.iter().find(|(from, _)| *from == disk.file) {
                disk.file = flat.clone();
            }
        }
    }
    fill_capacities(&mut app, &capacities);
    Ok(Loaded {
        kind,
        app,
        disks,
        verified: Vec::new(),
    })
}

/// A regular file named `name` in `dir`. Names were checked to be plain, so the join
/// stays in `dir`.
fn regular_file(dir: &Path, name: &str) -> Result<DiskLocation> {
    let path = dir.join(name);
    let meta = std::fs::metadata(&path)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .ok_or_else(|| ImportError::MissingDisk {
            name: name.to_owned(),
            looked_in: dir.display().to_string(),
        })?;
    Ok(DiskLocation::File {
        path,
        size: meta.len(),
    })
}

/// The first bytes of a disk, to tell its format.
fn head(location: &DiskLocation) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let path = match location {
        DiskLocation::File { path, .. } | DiskLocation::OvaMember { ova: path, .. } => path,
    };
    location
        .open_at(0)?
        .take(vmdk::HEAD_BYTES as u64)
        .read_to_end(&mut buf)
        .map_err(|source| ImportError::Read {
            path: path.clone(),
            source,
        })?;
    Ok(buf)
}

fn format_of(kind: &VmdkKind) -> ImageFormat {
    match kind {
        VmdkKind::Sparse { .. } => ImageFormat::Vmdk,
        VmdkKind::Descriptor { .. } => ImageFormat::Raw,
        VmdkKind::Other => ImageFormat::Detect,
    }
}

/// Disks whose descriptor gave no capacity take the one in the image header.
fn fill_capacities(app: &mut ImportedApplication, capacities: &[(String, Option<u64>)]) {
    for vm in &mut app.vms {
        for disk in &mut vm.disks {
            if disk.capacity_bytes.is_none() {
                disk.capacity_bytes = capacities
                    .iter()
                    .find(|(f, _)| *f == disk.file)
                    .and_then(|(_, c)| *c);
            }
        }
    }
}

fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let read_err = |source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    if size > limit {
        return Err(ImportError::TooLarge {
            what: format!("{what} {}", path.display()),
            size,
            limit,
        });
    }
    let mut bytes = Vec::new();
    // `take` guards against files that grow while being read.
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(ImportError::TooLarge {
            what: format!("{what} {}", path.display()),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}
