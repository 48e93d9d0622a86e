//! Garbage collection of unused bases and per-node space accounting.
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::disks::allocated;
use crate::error::{Result, io_err};
use crate::store::DiskStore;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub removed: Vec<String>,
    pub kept: Vec<String>,
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpaceReport {
    pub bases_bytes: u64,
    pub bases: usize,
    pub disks_bytes: u64,
    pub disks: usize,
    pub staging_bytes: u64,
    pub filesystem_size: u64,
    pub filesystem_available: u64,
}

fn dir_allocated(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_allocated(&e.path()),
            Ok(t) if t.is_file() => allocated(&e.path()),
            _ => 0,
        })
        .sum()
}

/// Parses `df -B1 --output=size,avail` output.
pub fn parse_df(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().nth(1)?;
    let mut it = line.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

impl DiskStore {
    /// Digests of bases some disk still uses: from disk.json, and from the backing file
    /// named in every layer's qcow2 header (so a stale or lost disk.json never frees a
    /// base a layer file still needs).
    pub fn referenced_bases(&self) -> Result<BTreeSet<String>> {
        let mut used = BTreeSet::new();
        let bases_dir = self.root().join("bases");
        for meta in self.disks()? {
            used.insert(meta.base.clone());
            let dir = self.disk_dir(&meta.namespace, &meta.name)?;
            for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "qcow2") {
                    continue;
                }
                let Ok(file) = std::fs::File::open(&path) else {
                    continue;
                };
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                let src = crate::format::bytes_file(&file, &path, len);
                if let Ok(h) = crate::format::qcow2::parse_header(&src)
                    && let Some(backing) = h.backing_file
                    && let Some(digest) = Path::new(&backing)
                        .strip_prefix(&bases_dir)
                        .ok()
                        .and_then(|p| p.to_str())
                        .and_then(|p| p.strip_prefix("sha256-"))
                        .and_then(|p| p.strip_suffix(".qcow2"))
                {
                    used.insert(digest.to_string());
                }
            }
        }
        Ok(used)
    }

    /// Removes bases no disk uses and that are older than `grace` (an import that just
    /// finished has a grace period for its disk to be created).
    pub async fn gc(&self, grace: Duration) -> Result<GcReport> {
        let used = self.referenced_bases()?;
        let mut report = GcReport::default();
        for base in self.bases()? {
            if used.contains(&base.digest) {
                report.kept.push(base.digest);
                continue;
            }
            let age = std::fs::metadata(&base.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if age < grace {
                report.kept.push(base.digest);
                continue;
            }
            // Holding the digest lock means no import of the same image is converting.
            let lock = self.try_lock_digest(&base.digest)?;
            let Some(_lock) = lock else {
                report.kept.push(base.digest);
                continue;
            };
            report.freed_bytes += allocated(&base.path);
            let meta = base.path.with_extension("json");
            std::fs::remove_file(&meta).map_err(io_err(&meta))?;
            std::fs::remove_file(&base.path).map_err(io_err(&base.path))?;
            report.removed.push(base.digest);
        }
        // Partial downloads nobody resumed within the grace period.
        let downloads = self.root().join("downloads");
        if let Ok(entries) = std::fs::read_dir(&downloads) {
            for entry in entries.flatten() {
                let idle = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                if idle >= grace {
                    report.freed_bytes += allocated(&entry.path());
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(report)
    }

    /// Removes one base (and its lock file) unless a disk still uses it or an import
    /// of it is converting. `Ok(false)`: kept. Already gone: `Ok(true)`.
    pub fn remove_base_if_unused(&self, digest: &str) -> Result<bool> {
        let digest = crate::names::check_sha256(digest)?;
        if self.referenced_bases()?.contains(&digest) {
            return Ok(false);
        }
        let Some(_lock) = self.try_lock_digest(&digest)? else {
            return Ok(false);
        };
        let path = self.base_path(&digest);
        let lock = self
            .root()
            .join("locks")
            .join(format!("sha256-{digest}.lock"));
        for p in [path.with_extension("json"), path, lock] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(true)
    }

    fn try_lock_digest(&self, digest: &str) -> Result<Option<std::fs::File>> {
        let path = self
            .root()
            .join("locks")
            .join(format!("sha256-{digest}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// Size and free bytes of the store's filesystem (`df`; zeros when it cannot say).
    async fn filesystem(&self) -> Result<(u64, u64)> {
        let mut df = tokio::process::Command::new("df");
        df.args(["-B1", "--output=size,avail"]).arg(self.root());
        let out =
            hvx_child::output_tokio(df)
                .await
                .map_err(|source| crate::StorageError::Spawn {
                    program: "df".into(),
                    source,
                })?;
        Ok(parse_df(&String::from_utf8_lossy(&out.stdout)).unwrap_or_default())
    }

    /// Free bytes on the store's filesystem, without walking the store (what a check
    /// before a big write needs; 0 when `df` cannot say).
    pub async fn filesystem_available(&self) -> Result<u64> {
        Ok(self.filesystem().await?.1)
    }

    /// Space used by the store and left on its filesystem.
    pub async fn space(&self) -> Result<SpaceReport> {
        let root = self.root().to_path_buf();
        let (size, avail) = self.filesystem().await?;
        Ok(SpaceReport {
            bases_bytes: dir_allocated(&root.join("bases")),
            bases: self.bases()?.len(),
            disks_bytes: dir_allocated(&root.join("disks")),
            disks: self.disks()?.len(),
            staging_bytes: dir_allocated(&root.join("tmp"))
                + dir_allocated(&root.join("downloads")),
            filesystem_size: size,
            filesystem_available: avail,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn df_output() {
        assert_eq!(
            parse_df("  1B-blocks     Avail\n 1000 400\n"),
            Some((1000, 400))
        );
        assert_eq!(parse_df("garbage"), None);
    }
}
