//! OVA archives (tar) read in place: members are indexed and read at their offsets,
//! never extracted, so no name inside the archive can choose a host path. Only plain
//! regular-file members are accepted; the `.mf` manifest is verified when present.

use crate::devices::is_plain_name;
use crate::error::{ImportError, Result};
use crate::limits::{MAX_DESCRIPTOR_BYTES, MAX_MANIFEST_BYTES, MAX_OVA_MEMBERS};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One regular file inside the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvaMember {
    /// Plain name.
    pub name: String,
    /// Byte offset of the content in the archive.
    pub offset: u64,
    /// Content length.
    pub size: u64,
}

/// The archive's members, in archive order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvaIndex {
    /// The archive.
    pub path: PathBuf,
    /// Its members.
    pub members: Vec<OvaMember>,
}

impl OvaIndex {
    /// The member with this name.
    pub fn member(&self, name: &str) -> Option<&OvaMember> {
        self.members.iter().find(|m| m.name == name)
    }

    /// The single `.ovf` descriptor member.
    pub fn descriptor(&self) -> Result<&OvaMember> {
        let mut ovfs = self
            .members
            .iter()
            .filter(|m| m.name.to_ascii_lowercase().ends_with(".ovf"));
        let first = ovfs
            .next()
            .ok_or_else(|| self.bad("no .ovf descriptor inside"))?;
        if ovfs.next().is_some() {
            return Err(self.bad("more than one .ovf descriptor inside"));
        }
        Ok(first)
    }

    /// The `.mf` manifest member, if any.
    pub fn manifest(&self) -> Option<&OvaMember> {
        self.members
            .iter()
            .find(|m| m.name.to_ascii_lowercase().ends_with(".mf"))
    }

    fn bad(&self, reason: &str) -> ImportError {
        ImportError::Ova {
            path: self.path.clone(),
            reason: reason.to_owned(),
        }
    }

    /// Reads a whole member into memory, refusing members over `limit` bytes.
    pub fn read_small(&self, member: &OvaMember, limit: u64) -> Result<Vec<u8>> {
        if member.size > limit {
            return Err(ImportError::TooLarge {
                what: format!("OVA member {}", member.name),
                size: member.size,
                limit,
            });
        }
        let mut buf = Vec::new();
        self.open(member, 0)?
            .read_to_end(&mut buf)
            .map_err(|source| self.read_err(source))?;
        Ok(buf)
    }

    /// A reader over a member's content from byte `from` on.
    pub fn open(&self, member: &OvaMember, from: u64) -> Result<impl Read + use<>> {
        let mut f = File::open(&self.path).map_err(|source| self.read_err(source))?;
        f.seek(SeekFrom::Start(
            member.offset.saturating_add(from.min(member.size)),
        ))
        .map_err(|source| self.read_err(source))?;
        Ok(f.take(member.size.saturating_sub(from)))
    }

    fn read_err(&self, source: std::io::Error) -> ImportError {
        ImportError::Read {
            path: self.path.clone(),
            source,
        }
    }
}

/// Largest GNU long-name or pax extension header accepted: the tar crate reads those
/// into memory whole, so an archive must not be able to make them huge.
pub const MAX_EXTENSION_HEADER_BYTES: u64 = 64 * 1024;

/// Walks the raw 512-byte headers before the tar crate does, refusing oversized
/// extension headers and absurd header counts.
fn prescan(path: &Path) -> Result<()> {
    let bad = |reason: String| ImportError::Ova {
        path: path.to_path_buf(),
        reason,
    };
    let read_err = |source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    let mut offset = 0u64;
    let mut block = [0u8; 512];
    for _ in 0..MAX_OVA_MEMBERS * 4 {
        if offset.saturating_add(512) > len {
            return Ok(()); // truncated archives are reported by the tar reader
        }
        f.seek(SeekFrom::Start(offset)).map_err(read_err)?;
        f.read_exact(&mut block).map_err(read_err)?;
        if block.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&block);
        let size = header
            .entry_size()
            .map_err(|e| bad(format!("bad header at byte {offset}: {e}")))?;
        let kind = header.entry_type();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        if extension && size > MAX_EXTENSION_HEADER_BYTES {
            return Err(bad(format!(
                "extension header at byte {offset} is {size} bytes (limit {MAX_EXTENSION_HEADER_BYTES})"
            )));
        }
        offset = offset
            .saturating_add(512)
            .saturating_add(size.div_ceil(512).saturating_mul(512));
    }
    Err(ImportError::TooMany {
        what: "tar headers",
        count: MAX_OVA_MEMBERS * 4,
        limit: MAX_OVA_MEMBERS * 4,
    })
}

/// Indexes the archive at `path`.
pub fn index(path: &Path) -> Result<OvaIndex> {
    let bad = |reason: String| ImportError::Ova {
        path: path.to_path_buf(),
        reason,
    };
    prescan(path)?;
    let file = File::open(path).map_err(|source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let archive_len = file
        .metadata()
        .map_err(|source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let mut members: Vec<OvaMember> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| bad(format!("corrupt tar archive: {e}")))?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(bad(format!(
                "member {raw_name:?} is not a regular file ({kind:?}); OVAs hold only files"
            )));
        }
        // ovftool writes plain names; `./name` is tolerated, everything else refused.
        let name = raw_name.strip_prefix("./").unwrap_or(&raw_name);
        if !is_plain_name(name) {
            return Err(bad(format!(
                "member name {raw_name:?} is not a plain file name (no directories, '..' or absolute paths)"
            )));
        }
        if members.iter().any(|m| m.name == name) {
            return Err(bad(format!("member {name:?} appears twice")));
        }
        if members.len() >= MAX_OVA_MEMBERS {
            return Err(ImportError::TooMany {
                what: "OVA members",
                count: members.len() + 1,
                limit: MAX_OVA_MEMBERS,
            });
        }
        if entry.raw_file_position().saturating_add(entry.size()) > archive_len {
            return Err(bad(format!(
                "member {name:?} claims {} bytes but the archive ends first (truncated download?)",
                entry.size()
            )));
        }
        members.push(OvaMember {
            name: name.to_owned(),
            offset: entry.raw_file_position(),
            size: entry.size(),
        });
    }
    if members.is_empty() {
        return Err(bad("empty archive".into()));
    }
    Ok(OvaIndex {
        path: path.to_path_buf(),
        members,
    })
}

/// The descriptor text of an indexed OVA.
pub fn descriptor_text(index: &OvaIndex) -> Result<String> {
    let member = index.descriptor()?;
    let bytes = index.read_small(member, MAX_DESCRIPTOR_BYTES)?;
    String::from_utf8(bytes).map_err(|_| ImportError::Ovf("descriptor is not UTF-8".into()))
}

/// One `.mf` line: `SHA256(name)= hex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Algorithm (`SHA1`, `SHA256`, `SHA512`).
    pub algorithm: String,
    /// Member name.
    pub name: String,
    /// Lower-case hex digest.
    pub digest: String,
}

/// Parses a manifest as ovftool writes it.
pub fn parse_manifest(text: &str) -> Result<Vec<ManifestEntry>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let bad = || ImportError::Ovf(format!("bad manifest line {line:?}"));
            let (lhs, digest) = line.split_once('=').ok_or_else(bad)?;
            let (algorithm, name) = lhs.trim().split_once('(').ok_or_else(bad)?;
            let name = name.strip_suffix(')').ok_or_else(bad)?;
            Ok(ManifestEntry {
                algorithm: algorithm.trim().to_ascii_uppercase(),
                name: name.to_owned(),
                digest: digest.trim().to_ascii_lowercase(),
            })
        })
        .collect()
}

/// The archive's manifest entries (none without a `.mf` member).
pub fn manifest_entries(index: &OvaIndex) -> Result<Vec<ManifestEntry>> {
    let Some(mf) = index.manifest() else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8(index.read_small(mf, MAX_MANIFEST_BYTES)?)
        .map_err(|_| ImportError::Ovf("manifest is not UTF-8".into()))?;
    parse_manifest(&text)
}

/// The error for a manifest entry naming a file the archive lacks.
pub fn not_in_archive(index: &OvaIndex, name: &str) -> ImportError {
    ImportError::Ova {
        path: index.path.clone(),
        reason: format!("manifest lists {name:?}, which is not in the archive"),
    }
}

/// Verifies every manifest entry against the archive. Returns the entries checked.
/// Entries naming absent members are all reported in one error.
pub fn verify_manifest(index: &OvaIndex) -> Result<Vec<ManifestEntry>> {
    let entries = manifest_entries(index)?;
    ImportError::collect(
        entries
            .iter()
            .filter(|e| index.member(&e.name).is_none())
            .map(|e| not_in_archive(index, &e.name))
            .collect(),
    )?;
    let mut checked = Vec::new();
    for entry in entries {
        let member = index
            .member(&entry.name)
            .ok_or_else(|| not_in_archive(index, &entry.name))?;
        let reader = index.open(member, 0)?;
        let actual = match entry.algorithm.as_str() {
            "SHA1" => hex_digest::<Sha1>(reader),
            "SHA256" => hex_digest::<Sha256>(reader),
            "SHA512" => hex_digest::<Sha512>(reader),
            other => {
                return Err(ImportError::Ovf(format!(
                    "manifest algorithm {other} is not supported"
                )));
            }
        }
        .map_err(|source| ImportError::Read {
            path: index.path.clone(),
            source,
        })?;
        if actual != entry.digest {
            return Err(ImportError::Checksum {
                member: entry.name,
                expected: entry.digest,
                actual,
            });
        }
        checked.push(entry);
    }
    Ok(checked)
}

/// Streams `reader` through digest `D` and returns lower-case hex.
pub fn hex_digest<D: Digest>(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lines_parse_in_both_spacings() {
        let m = parse_manifest("SHA256(a.ovf)= AB12\nSHA1(disk.vmdk) = cd34\n\n").expect("valid");
        assert_eq!(m[0].algorithm, "SHA256");
        assert_eq!(m[0].name, "a.ovf");
        assert_eq!(m[0].digest, "ab12");
        assert_eq!(m[1].algorithm, "SHA1");
        assert_eq!(m[1].digest, "cd34");
        assert!(parse_manifest("garbage").is_err());
    }
}
