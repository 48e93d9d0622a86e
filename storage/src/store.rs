//! The node's disk store: a content-addressed cache of read-only qcow2 bases shared by
//! many VMs, and per-disk qcow2 overlay chains.
//!
//! Layout under the root:
//!   bases/sha256-<digest>.qcow2   converted base images (immutable once renamed in)
//!   bases/sha256-<digest>.json    what the base was imported from
//!   locks/sha256-<digest>.lock    one file lock per digest (imports of the same image wait)
//!   tmp/                          staging of imports (same filesystem: renames are atomic)
//!   disks/<ns>/<name>/            overlay layers + disk.json (chain and snapshot tree)
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError, io_err};
use crate::format::{self, DiskFormat, DiskInfo, ImportLimits};
use crate::qemu_img::{self, ImageInfo, Qcow2Options, QemuImg};

/// Progress of an import, reported as bytes done of bytes total for the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImportPhase {
    Fetching,
    Converting,
}

/// Callback receiving (phase, bytes_done, bytes_total).
pub type ProgressFn = Arc<dyn Fn(ImportPhase, u64, u64) + Send + Sync>;

/// Store configuration.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    pub limits: ImportLimits,
    /// Where `http` sources may be fetched from (`crate::egress`).
    pub http_policy: crate::egress::HttpPolicy,
    pub qemu_img: QemuImg,
    /// Longest overlay chain (base included) before the active layer is flattened.
    pub max_chain_depth: usize,
}

impl StoreConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            limits: ImportLimits::default(),
            http_policy: crate::egress::HttpPolicy::default(),
            qemu_img: QemuImg::default(),
            max_chain_depth: 5,
        }
    }
}

/// A base image in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImage {
    pub digest: String,
    pub path: PathBuf,
    pub virtual_size: u64,
    pub source_format: DiskFormat,
    pub source_subformat: String,
    /// Bytes of the source as fetched (entry file plus extents).
    pub source_bytes: u64,
}

/// Files staged for import: a private directory under tmp/ removed on drop.
#[derive(Debug)]
pub struct Staged {
    pub dir: PathBuf,
    pub entry: String,
    /// sha256 over the staged files (the entry file's own digest when it is alone).
    pub digest: String,
    pub bytes: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Best effort: a leftover staging dir is removed by the next `DiskStore::open`.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The disk store.
#[derive(Debug, Clone)]
pub struct DiskStore {
    pub(crate) cfg: StoreConfig,
}

impl DiskStore {
    /// Opens (creating) the store and clears staging leftovers of a previous run.
    pub fn open(cfg: StoreConfig) -> Result<Self> {
        for sub in ["bases", "locks", "tmp", "disks"] {
            let dir = cfg.root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let tmp = cfg.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
        for entry in std::fs::read_dir(cfg.root.join("bases"))
            .map_err(io_err(&tmp))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { cfg })
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    pub fn qemu_img(&self) -> &QemuImg {
        &self.cfg.qemu_img
    }

    pub fn limits(&self) -> &ImportLimits {
        &self.cfg.limits
    }

    pub fn base_path(&self, digest: &str) -> PathBuf {
        self.cfg
            .root
            .join("bases")
            .join(format!("sha256-{digest}.qcow2"))
    }

    pub(crate) fn base_meta_path(&self, digest: &str) -> PathBuf {
        self.cfg
            .root
            .join("bases")
            .join(format!("sha256-{digest}.json"))
    }

    /// A fresh private staging directory.
    pub fn new_staging_dir(&self, entry: &str) -> Result<PathBuf> {
        format::check_plain_name(entry)?;
        let tmp = self.cfg.root.join("tmp");
        for attempt in 0..100u32 {
            let dir = tmp.join(format!(
                "import-{}-{}-{attempt}",
                std::process::id(),
                unique_suffix()
            ));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            }
        }
        Err(StorageError::Io {
            path: tmp,
            source: std::io::Error::other("no free staging directory name"),
        })
    }

    /// Looks a base up by digest.
    pub fn base(&self, digest: &str) -> Result<BaseImage> {
        let meta = self.base_meta_path(digest);
        let text =
            std::fs::read(&meta).map_err(|_| StorageError::BaseNotFound(digest.to_string()))?;
        serde_json::from_slice(&text)
            .map_err(|source| StorageError::Metadata { path: meta, source })
    }

    /// Every base in the cache.
    pub fn bases(&self) -> Result<Vec<BaseImage>> {
        let dir = self.cfg.root.join("bases");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(digest) = name
                .strip_prefix("sha256-")
                .and_then(|n| n.strip_suffix(".json"))
            {
                out.push(self.base(digest)?);
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Validates staged files and turns them into a base (or finds the cached one).
    pub async fn import_staged(
        &self,
        staged: Staged,
        expected_sha256: Option<&str>,
        progress: Option<ProgressFn>,
    ) -> Result<BaseImage> {
        if let Some(expected) = expected_sha256 {
            let expected = crate::names::check_sha256(expected)?;
            if expected != staged.digest {
                return Err(StorageError::Checksum {
                    what: staged.entry.clone(),
                    expected,
                    actual: staged.digest.clone(),
                });
            }
        }
        let (dir, entry, limits) = (staged.dir.clone(), staged.entry.clone(), self.cfg.limits);
        let info = blocking(move || format::inspect(&dir, &entry, &limits)).await?;
        let lock = self.lock_digest(&staged.digest).await?;
        let result = self.convert_locked(&staged, &info, progress).await;
        drop(lock);
        result
    }

    async fn convert_locked(
        &self,
        staged: &Staged,
        info: &DiskInfo,
        progress: Option<ProgressFn>,
    ) -> Result<BaseImage> {
        if let Ok(base) = self.base(&staged.digest)
            && base.path.exists()
        {
            tracing::info!(digest = %base.digest, "base already cached");
            return Ok(base);
        }
        let final_path = self.base_path(&staged.digest);
        let tmp_path = self.cfg.root.join("bases").join(format!(
            ".tmp-{}-{}.qcow2",
            staged.digest,
            std::process::id()
        ));
        let entry_path = staged.dir.join(&staged.entry);
        // Refuse up front rather than fill the node's disk half way through.
        let needed = self
            .cfg
            .qemu_img
            .measure(info.format, &entry_path, Qcow2Options::for_base())
            .await?;
        let available = self.filesystem_available().await?;
        if available > 0 && needed > available {
            return Err(StorageError::NoSpace {
                path: self.cfg.root.clone(),
                needed,
                available,
            });
        }
        let args = qemu_img::convert_to_qcow2_args(
            info.format,
            &entry_path,
            &tmp_path,
            Qcow2Options::for_base(),
        );
        let size = info.virtual_size;
        let cb = progress.clone().map(|p| {
            move |pct: f64| {
                p(
                    ImportPhase::Converting,
                    ((pct / 100.0) * size as f64) as u64,
                    size,
                )
            }
        });
        // The output is written back while qemu-img still converts (it writes through
        // the page cache and never syncs), so the sync before the rename is short.
        let writeback =
            crate::writeback::Writeback::of_path(&tmp_path, crate::writeback::INTERVAL)?;
        let converted = self
            .cfg
            .qemu_img
            .run(
                &args,
                cb.as_ref().map(|c| c as &(dyn Fn(f64) + Send + Sync)),
            )
            .await;
        let written_back = writeback.finish();
        let checked = match (converted, written_back) {
            (Ok(_), Ok(())) => self.verify_converted(&tmp_path, info).await,
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        };
        if let Err(e) = checked {
            let _ = std::fs::remove_file(&tmp_path);
            return Err(e);
        }
        let base = BaseImage {
            digest: staged.digest.clone(),
            path: final_path.clone(),
            virtual_size: info.virtual_size,
            source_format: info.format,
            source_subformat: info.subformat.clone(),
            source_bytes: staged.bytes,
        };
        let meta_path = self.base_meta_path(&staged.digest);
        let meta_tmp = meta_path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&base).map_err(|source| StorageError::Metadata {
            path: meta_path.clone(),
            source,
        })?;
        write_synced(&meta_tmp, &json)?;
        sync_file(&tmp_path)?;
        std::fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
        std::fs::rename(&meta_tmp, &meta_path).map_err(io_err(&meta_path))?;
        if let Some(p) = progress {
            p(ImportPhase::Converting, size, size);
        }
        Ok(base)
    }

    /// The converted image must be a self-contained qcow2 of the validated size.
    async fn verify_converted(&self, path: &Path, info: &DiskInfo) -> Result<()> {
        let got: ImageInfo = self.cfg.qemu_img.info(DiskFormat::Qcow2, path).await?;
        // qemu's vpc driver may round VHD sizes to the CHS geometry.
        let size_ok = got.virtual_size == info.virtual_size
            || (info.format == DiskFormat::Vhd && got.virtual_size <= info.virtual_size);
        if !size_ok || got.backing_filename.is_some() {
            return Err(StorageError::CommandOutput {
                command: "qemu-img info".into(),
                reason: format!(
                    "converted image has size {} (expected {}) backing {:?}",
                    got.virtual_size, info.virtual_size, got.backing_filename
                ),
            });
        }
        Ok(())
    }

    /// Takes the per-digest file lock (blocks while another import of it converts).
    pub(crate) async fn lock_digest(&self, digest: &str) -> Result<std::fs::File> {
        let path = self
            .cfg
            .root
            .join("locks")
            .join(format!("sha256-{digest}.lock"));
        blocking(move || {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.lock().map_err(io_err(&path))?;
            Ok(f)
        })
        .await
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Join(e.to_string()))?
}

pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

pub(crate) fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// A short unique-enough suffix for temp names (time + counter; names are also
/// created exclusively, so a collision only costs a retry).
pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{nanos:x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}
