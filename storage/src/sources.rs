//! Import sources: a local path (PVC mount), an upload stream, an HTTP(S) URL (resumable
//! download) and an OVA member. Each copies its bytes into a private staging directory
//! of the store while hashing them; validation then runs on the staged copy, so the
//! files qemu-img reads are exactly the ones that were checked.
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{Result, StorageError, io_err};
use crate::format;
use crate::names::hex;
use crate::store::{DiskStore, ImportPhase, ProgressFn, Staged, blocking};
use crate::tar;

const CHUNK: usize = 1 << 20;

/// Where an OverlayDisk's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportSource {
    /// `dir/entry` on a mounted volume; VMDK extents named by a descriptor are taken
    /// from the same directory.
    Local { dir: PathBuf, entry: String },
    /// An HTTP(S) URL; `entry` names the staged file (for format messages);
    /// `ca_pem` adds trusted CA certificates (PEM) to the public roots, for servers
    /// with a private CA.
    Http {
        url: String,
        entry: String,
        ca_pem: Option<Vec<u8>>,
    },
    /// A member of an OVA (tar), read by name without extracting other members.
    OvaMember { ova: PathBuf, member: String },
    /// A completed upload held in the store (`uploads/<uid>.complete`): staged as one
    /// file, so a VMDK descriptor in it can name no other file (no extents, no other
    /// upload), then validated like any source.
    Uploaded { path: PathBuf },
    /// A member of an OVA served over HTTP(S): the archive is downloaded like an
    /// `Http` source (same egress policy, redirect checks, size limit, resume), then
    /// the member is staged from it as for `OvaMember` and the archive deleted.
    HttpOvaMember {
        url: String,
        member: String,
        ca_pem: Option<Vec<u8>>,
    },
}

/// Writes `data` at the current position, seeking over all-zero chunks so raw images
/// stay sparse in staging.
fn write_sparse(f: &mut std::fs::File, data: &[u8], path: &Path) -> Result<()> {
    if data.iter().all(|&b| b == 0) {
        f.seek(SeekFrom::Current(data.len() as i64))
            .map_err(io_err(path))?;
        Ok(())
    } else {
        f.write_all(data).map_err(io_err(path))
    }
}

/// Sets the final length (a trailing zero hole is not written by `write_sparse`).
/// Staged files are not synced: they are read once by the conversion through the page
/// cache and thrown away, and a crash empties tmp/ at the next `DiskStore::open`.
fn finish_file(f: &std::fs::File, len: u64, path: &Path) -> Result<()> {
    f.set_len(len).map_err(io_err(path))
}

fn create_new(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))
}

/// Opens a file refusing symlinks at the last component (O_NOFOLLOW) and anything that
/// is not a regular file.
fn open_regular(path: &Path) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| StorageError::Refused {
            path: path.to_path_buf(),
            reason: format!("cannot open as a regular file: {source}"),
        })?;
    let meta = f.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(StorageError::Refused {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    Ok(f)
}

/// Bytes per staging read and write: large enough that syscalls and channel hand-offs
/// cost nothing next to the copy, small enough that the buffers of many imports at once
/// (4 MiB each) stay far under the agent's memory limit.
const STAGE_CHUNK: usize = 1 << 20;
/// Chunks in flight between the reading-and-hashing thread and the writing one.
const STAGE_DEPTH: usize = 3;

/// Copies `src` (read from its current position, `len` bytes) into a new file `dst`,
/// returning its sha256. One pass over the data: this thread reads and hashes each
/// chunk while a second one writes the previous chunks (two cores busy instead of one
/// doing everything in turn); buffers go round between the two, so memory is bounded.
fn copy_hashing(
    src: &mut dyn Read,
    len: u64,
    dst: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<String> {
    let mut out = create_new(dst)?;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(STAGE_DEPTH);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(STAGE_DEPTH + 1);
    for _ in 0..=STAGE_DEPTH {
        // The channel holds them all: this send cannot block or fail.
        let _ = free_tx.send(vec![0u8; STAGE_CHUNK]);
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            for (buf, n) in full_rx {
                write_sparse(&mut out, &buf[..n], dst)?;
                // The reader may have stopped (an error): nobody needs the buffer then.
                let _ = free_tx.send(buf);
            }
            finish_file(&out, len, dst)
        });
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let read = loop {
            if done >= len {
                break Ok(());
            }
            // The writer failed and went away: its error is reported below.
            let Ok(mut buf) = free_rx.recv() else {
                break Ok(());
            };
            let want = usize::try_from((len - done).min(STAGE_CHUNK as u64)).unwrap_or(STAGE_CHUNK);
            if let Err(source) = src.read_exact(&mut buf[..want]) {
                break Err(StorageError::Io {
                    path: dst.to_path_buf(),
                    source,
                });
            }
            hasher.update(&buf[..want]);
            if full_tx.send((buf, want)).is_err() {
                break Ok(());
            }
            done += want as u64;
            progress(done);
        };
        // Ends the writer's loop once it has written what was sent.
        drop(full_tx);
        let written = writer
            .join()
            .map_err(|_| StorageError::Join("the staging writer panicked".into()))?;
        read?;
        written?;
        if done != len {
            return Err(StorageError::Io {
                path: dst.to_path_buf(),
                source: std::io::Error::other(format!("staged {done} of {len} bytes")),
            });
        }
        Ok(hex(&hasher.finalize()))
    })
}

/// The digest of a multi-file image: sha256 over "name sha256\n" lines in file order.
fn combined_digest(parts: &[(String, String)]) -> String {
    if let [(_, only)] = parts {
        return only.clone();
    }
    let mut h = Sha256::new();
    for (name, digest) in parts {
        h.update(format!("{name} {digest}\n"));
    }
    hex(&h.finalize())
}

impl DiskStore {
    /// Stages, validates and converts `source` into a base image.
    pub async fn import(
        &self,
        source: &ImportSource,
        expected_sha256: Option<&str>,
        progress: Option<ProgressFn>,
    ) -> Result<crate::store::BaseImage> {
        let staged = match source {
            ImportSource::Local { dir, entry } => {
                self.stage_local(dir, entry, progress.clone()).await?
            }
            ImportSource::Http { url, entry, ca_pem } => {
                self.stage_http(url, entry, ca_pem.as_deref(), progress.clone())
                    .await?
            }
            ImportSource::OvaMember { ova, member } => {
                self.stage_ova_member(ova, member, progress.clone()).await?
            }
            ImportSource::Uploaded { path } => self.stage_uploaded(path, progress.clone()).await?,
            ImportSource::HttpOvaMember {
                url,
                member,
                ca_pem,
            } => {
                self.stage_http_ova_member(url, member, ca_pem.as_deref(), progress.clone())
                    .await?
            }
        };
        self.import_staged(staged, expected_sha256, progress).await
    }

    /// Stages `dir/entry` and, for a VMDK descriptor, its extents.
    pub async fn stage_local(
        &self,
        dir: &Path,
        entry: &str,
        progress: Option<ProgressFn>,
    ) -> Result<Staged> {
        let staging = self.new_staging_dir(entry)?;
        let (dir, entry_s, limits) = (dir.to_path_buf(), entry.to_string(), *self.limits());
        let staging_c = staging.clone();
        let result = blocking(move || {
            // Validating the source tells which files belong to the image (and refuses
            // hostile references before anything is copied).
            let info = format::inspect(&dir, &entry_s, &limits)?;
            let mut total = 0u64;
            for f in &info.files {
                total += std::fs::symlink_metadata(f).map_err(io_err(f))?.len();
            }
            let mut parts = Vec::new();
            let mut done_before = 0u64;
            for f in &info.files {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut src = open_regular(f)?;
                let len = src.metadata().map_err(io_err(f))?.len();
                let digest = copy_hashing(&mut src, len, &staging_c.join(&name), &mut |d| {
                    if let Some(p) = &progress {
                        p(ImportPhase::Fetching, done_before + d, total);
                    }
                })?;
                done_before += len;
                parts.push((name, digest));
            }
            Ok((combined_digest(&parts), total))
        })
        .await;
        staged_or_cleanup(staging, entry, result)
    }

    /// Stages a completed upload as the single file `upload` (symlinks and anything
    /// not a regular file refused).
    pub async fn stage_uploaded(
        &self,
        path: &Path,
        progress: Option<ProgressFn>,
    ) -> Result<Staged> {
        const ENTRY: &str = "upload";
        let staging = self.new_staging_dir(ENTRY)?;
        let (path, dst) = (path.to_path_buf(), staging.join(ENTRY));
        let result = blocking(move || {
            let mut src = open_regular(&path)?;
            let len = src.metadata().map_err(io_err(&path))?.len();
            let digest = copy_hashing(&mut src, len, &dst, &mut |d| {
                if let Some(p) = &progress {
                    p(ImportPhase::Fetching, d, len);
                }
            })?;
            Ok((digest, len))
        })
        .await;
        staged_or_cleanup(staging, ENTRY, result)
    }

    /// Stages an upload stream as the single file `entry`.
    pub async fn stage_upload<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        entry: &str,
        total: Option<u64>,
        progress: Option<ProgressFn>,
    ) -> Result<Staged> {
        let staging = self.new_staging_dir(entry)?;
        let path = staging.join(entry);
        let limit = self.limits().max_virtual_size.saturating_add(1 << 30);
        let result = async {
            let mut out = create_new(&path)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut done = 0u64;
            loop {
                let n = reader.read(&mut buf).await.map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                done += n as u64;
                if done > limit {
                    return Err(StorageError::TooLarge {
                        path: path.clone(),
                        what: "upload",
                        value: done,
                        limit,
                    });
                }
                hasher.update(&buf[..n]);
                write_sparse(&mut out, &buf[..n], &path)?;
                if let Some(p) = &progress {
                    p(ImportPhase::Fetching, done, total.unwrap_or(done));
                }
            }
            if let Some(expected) = total
                && expected != done
            {
                return Err(StorageError::Truncated {
                    path: path.clone(),
                    format: "upload",
                    what: format!("received {done} of {expected} bytes"),
                });
            }
            finish_file(&out, done, &path)?;
            Ok((hex(&hasher.finalize()), done))
        }
        .await;
        staged_or_cleanup(staging, entry, result)
    }

    /// Downloads `url` (resuming a partial download with a Range request) and stages it.
    pub async fn stage_http(
        &self,
        url: &str,
        entry: &str,
        ca_pem: Option<&[u8]>,
        progress: Option<ProgressFn>,
    ) -> Result<Staged> {
        let part = self.download(url, ca_pem, progress.as_ref()).await?;
        let staging = self.new_staging_dir(entry)?;
        let staged_file = staging.join(entry);
        let part_c = part.clone();
        let result = blocking(move || {
            // Hash after the download completes: a resumed download's hash covers both runs.
            let mut f = open_regular(&part_c)?;
            let len = f.metadata().map_err(io_err(&part_c))?.len();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = f.read(&mut buf).map_err(io_err(&part_c))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            std::fs::rename(&part_c, &staged_file).map_err(io_err(&staged_file))?;
            Ok((hex(&h.finalize()), len))
        })
        .await;
        staged_or_cleanup(staging, entry, result)
    }

    /// Downloads `url` (resuming a partial download of the same URL) under the store's
    /// http policy and size limit; returns the downloaded file.
    async fn download(
        &self,
        url: &str,
        ca_pem: Option<&[u8]>,
        progress: Option<&ProgressFn>,
    ) -> Result<PathBuf> {
        let downloads = self.root().join("downloads");
        std::fs::create_dir_all(&downloads).map_err(io_err(&downloads))?;
        let part = downloads.join(format!("{}.part", hex(&Sha256::digest(url.as_bytes()))));
        let limit = self.limits().max_virtual_size.saturating_add(1 << 30);
        crate::http::download_resumable(
            url,
            &part,
            limit,
            5,
            ca_pem,
            &self.cfg.http_policy,
            progress,
        )
        .await?;
        Ok(part)
    }

    /// Downloads the OVA at `url` and stages its member `member` (see
    /// `ImportSource::HttpOvaMember`). The downloaded archive is removed once the
    /// member is staged or refused; an interrupted download is resumed by the next try.
    pub async fn stage_http_ova_member(
        &self,
        url: &str,
        member: &str,
        ca_pem: Option<&[u8]>,
        progress: Option<ProgressFn>,
    ) -> Result<Staged> {
        format::check_plain_name(member)?;
        let part = self.download(url, ca_pem, progress.as_ref()).await?;
        let staged = self.stage_ova_member(&part, member, progress).await;
        // A refused archive (missing member, bad manifest, hostile header) would be
        // refused again: keeping it only costs space.
        let _ = std::fs::remove_file(&part);
        // Name the archive by its URL, not by the download's private file name.
        staged.map_err(|e| match e {
            StorageError::Ova { reason, .. } => StorageError::Ova {
                path: PathBuf::from(url),
                reason,
            },
            other => other,
        })
    }

    /// Stages one member of an OVA (and the extents a VMDK descriptor member names),
    /// checking each staged member against the OVA's manifest (`.mf`) when it lists it.
    pub async fn stage_ova_member(
        &self,
        ova: &Path,
        member: &str,
        progress: Option<ProgressFn>,
    ) -> Result<Staged> {
        let staging = self.new_staging_dir(member)?;
        let (ova, member_s, limits) = (ova.to_path_buf(), member.to_string(), *self.limits());
        let staging_c = staging.clone();
        let result = blocking(move || {
            let mut file = open_regular(&ova)?;
            let index = tar::index(&mut file, &ova)?;
            let find = |name: &str| {
                index
                    .iter()
                    .find(|m| m.name == name)
                    .cloned()
                    .ok_or_else(|| StorageError::Ova {
                        path: ova.clone(),
                        reason: format!("no regular file member {name:?}"),
                    })
            };
            let entry = find(&member_s)?;
            let mut wanted = vec![entry.clone()];
            if entry.size <= limits.max_descriptor_bytes {
                file.seek(SeekFrom::Start(entry.offset))
                    .map_err(io_err(&ova))?;
                let mut head = vec![0u8; usize::try_from(entry.size).unwrap_or(0)];
                file.read_exact(&mut head).map_err(io_err(&ova))?;
                if crate::format::vmdk::looks_like_descriptor(&head) {
                    let desc = crate::format::vmdk::parse_descriptor(
                        &String::from_utf8_lossy(&head),
                        Path::new(&member_s),
                    )?;
                    for ext in desc.extents.iter().filter_map(|e| e.file.as_deref()) {
                        format::check_plain_name(ext)?;
                        if !wanted.iter().any(|m| m.name == ext) {
                            wanted.push(find(ext)?);
                        }
                    }
                }
            }
            let manifest = match index.iter().find(|m| m.name.ends_with(".mf")) {
                Some(mf) if mf.size <= MAX_MANIFEST_BYTES => {
                    file.seek(SeekFrom::Start(mf.offset))
                        .map_err(io_err(&ova))?;
                    let mut text = vec![0u8; usize::try_from(mf.size).unwrap_or(0)];
                    file.read_exact(&mut text).map_err(io_err(&ova))?;
                    String::from_utf8_lossy(&text).into_owned()
                }
                Some(mf) => {
                    return Err(StorageError::Ova {
                        path: ova.clone(),
                        reason: format!(
                            "manifest {:?} is {} bytes (at most {MAX_MANIFEST_BYTES})",
                            mf.name, mf.size
                        ),
                    });
                }
                None => String::new(),
            };
            let total: u64 = wanted.iter().map(|m| m.size).sum();
            let mut parts = Vec::new();
            let mut done_before = 0u64;
            for m in &wanted {
                file.seek(SeekFrom::Start(m.offset)).map_err(io_err(&ova))?;
                let digest = copy_hashing(&mut file, m.size, &staging_c.join(&m.name), &mut |d| {
                    if let Some(p) = &progress {
                        p(ImportPhase::Fetching, done_before + d, total);
                    }
                })?;
                done_before += m.size;
                check_manifest(&manifest, &m.name, &digest, &staging_c.join(&m.name))?;
                parts.push((m.name.clone(), digest));
            }
            Ok((combined_digest(&parts), total))
        })
        .await;
        staged_or_cleanup(staging, member, result)
    }
}

/// Larger `.mf` members are refused rather than read into memory: a real manifest
/// has one short line per file.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// A digest an OVA manifest lists for a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestDigest {
    Sha256(String),
    Sha1(String),
}

/// The digest `manifest` (`ALGO(name)= hex` lines, as ovftool writes them) lists for
/// `member`, if any. Unknown algorithms and malformed lines are skipped: they say
/// nothing about this member.
pub fn manifest_digest(manifest: &str, member: &str) -> Option<ManifestDigest> {
    manifest.lines().find_map(|line| {
        let (lhs, digest) = line.split_once('=')?;
        let (algo, rest) = lhs.trim().split_once('(')?;
        let name = rest.strip_suffix(')')?;
        if name != member {
            return None;
        }
        let digest = digest.trim().to_ascii_lowercase();
        match algo.trim().to_ascii_uppercase().as_str() {
            "SHA256" => Some(ManifestDigest::Sha256(digest)),
            "SHA1" => Some(ManifestDigest::Sha1(digest)),
            _ => None,
        }
    })
}

/// Compares a staged member with what the manifest lists for it (nothing to check
/// when it lists nothing). `sha256` was computed while staging; SHA1 re-reads `staged`.
fn check_manifest(manifest: &str, name: &str, sha256: &str, staged: &Path) -> Result<()> {
    let (expected, actual) = match manifest_digest(manifest, name) {
        None => return Ok(()),
        Some(ManifestDigest::Sha256(expected)) => (expected, sha256.to_string()),
        Some(ManifestDigest::Sha1(expected)) => {
            use sha1::Digest as _;
            let mut f = open_regular(staged)?;
            let mut h = sha1::Sha1::new();
            std::io::copy(&mut f, &mut h).map_err(io_err(staged))?;
            (expected, hex(&h.finalize()))
        }
    };
    if expected == actual {
        Ok(())
    } else {
        Err(StorageError::Checksum {
            what: format!("OVA member {name} (against the OVA's manifest)"),
            expected,
            actual,
        })
    }
}

fn staged_or_cleanup(dir: PathBuf, entry: &str, result: Result<(String, u64)>) -> Result<Staged> {
    match result {
        Ok((digest, bytes)) => Ok(Staged {
            dir,
            entry: entry.to_string(),
            digest,
            bytes,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Deterministic bytes with all-zero stretches (kept sparse) between data.
    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                if (i / STAGE_CHUNK) % 3 == 1 {
                    0
                } else {
                    (i % 251) as u8
                }
            })
            .collect()
    }

    #[test]
    fn staging_copies_and_hashes_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        // Not a multiple of the chunk: the last chunk is short.
        let data = sample(3 * STAGE_CHUNK + 12345);
        let dst = dir.path().join("staged");
        let mut seen = Vec::new();
        let digest = copy_hashing(
            &mut std::io::Cursor::new(&data),
            data.len() as u64,
            &dst,
            &mut |d| seen.push(d),
        )
        .unwrap();
        assert_eq!(digest, hex(&Sha256::digest(&data)));
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert_eq!(seen.last().copied(), Some(data.len() as u64));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    #[test]
    fn staging_keeps_a_trailing_zero_stretch_and_copies_only_len() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![1u8; 1000];
        data.extend(vec![0u8; 2 * STAGE_CHUNK]);
        let dst = dir.path().join("staged");
        // The reader holds more than `len`: only `len` bytes are staged and hashed.
        let mut longer = data.clone();
        longer.extend_from_slice(b"not part of the file");
        let digest = copy_hashing(
            &mut std::io::Cursor::new(&longer),
            data.len() as u64,
            &dst,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(digest, hex(&Sha256::digest(&data)));
        assert_eq!(std::fs::read(&dst).unwrap(), data);
    }

    #[test]
    fn a_source_shorter_than_announced_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample(STAGE_CHUNK + 10);
        let err = copy_hashing(
            &mut std::io::Cursor::new(&data),
            data.len() as u64 + STAGE_CHUNK as u64,
            &dir.path().join("staged"),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::Io { .. }), "{err}");
    }

    #[test]
    fn a_write_error_stops_the_copy_with_that_error() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample(4 * STAGE_CHUNK);
        // The destination exists already: the writer's file cannot be created.
        let dst = dir.path().join("staged");
        std::fs::write(&dst, b"x").unwrap();
        let err = copy_hashing(
            &mut std::io::Cursor::new(&data),
            data.len() as u64,
            &dst,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::Io { .. }), "{err}");
    }

    /// A digest that does not match, found by the hash of the staging pass, leaves no
    /// staged file and no base behind.
    #[tokio::test]
    async fn a_checksum_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("disk.raw"), sample(STAGE_CHUNK + 4096)).unwrap();
        let store =
            DiskStore::open(crate::store::StoreConfig::new(dir.path().join("store"))).unwrap();
        let source = ImportSource::Local {
            dir: src.clone(),
            entry: "disk.raw".into(),
        };
        let err = store
            .import(&source, Some(&"0".repeat(64)), None)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Checksum { .. }), "{err}");
        let left = |sub: &str| {
            std::fs::read_dir(dir.path().join("store").join(sub))
                .unwrap()
                .count()
        };
        assert_eq!(left("tmp"), 0, "staging removed");
        assert_eq!(left("bases"), 0, "no base");
    }

    #[test]
    fn manifest_lines_by_member_and_algorithm() {
        let mf = "SHA256(app.ovf)= AA\nSHA1(disk1.vmdk)=bb\ngarbage\nMD5(disk2.vmdk)= cc\nSHA256(disk2.vmdk) = dd\n";
        assert_eq!(
            manifest_digest(mf, "app.ovf"),
            Some(ManifestDigest::Sha256("aa".into()))
        );
        assert_eq!(
            manifest_digest(mf, "disk1.vmdk"),
            Some(ManifestDigest::Sha1("bb".into()))
        );
        // The unknown MD5 line is skipped, the SHA256 line for the same member used.
        assert_eq!(
            manifest_digest(mf, "disk2.vmdk"),
            Some(ManifestDigest::Sha256("dd".into()))
        );
        assert_eq!(manifest_digest(mf, "disk3.vmdk"), None);
        assert_eq!(manifest_digest(mf, "disk1"), None, "names match exactly");
    }

    #[test]
    fn staged_members_are_checked_against_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let staged = dir.path().join("d.vmdk");
        std::fs::write(&staged, b"abc").unwrap();
        let sha256 = hex(&Sha256::digest(b"abc"));
        // Well-known SHA1 of "abc".
        let sha1 = "a9993e364706816aba3e25717850c26c9cd0d89d";
        check_manifest("", "d.vmdk", &sha256, &staged).unwrap();
        check_manifest(
            &format!("SHA256(d.vmdk)= {sha256}\n"),
            "d.vmdk",
            &sha256,
            &staged,
        )
        .unwrap();
        check_manifest(
            &format!("SHA1(d.vmdk)= {sha1}\n"),
            "d.vmdk",
            &sha256,
            &staged,
        )
        .unwrap();
        let err = check_manifest("SHA256(d.vmdk)= 00\n", "d.vmdk", &sha256, &staged).unwrap_err();
        assert!(matches!(err, StorageError::Checksum { .. }), "{err}");
        let err = check_manifest("SHA1(d.vmdk)= 00\n", "d.vmdk", &sha256, &staged).unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");
    }
}
