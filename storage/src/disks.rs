//! Per-disk overlays on the shared bases, with offline (VM stopped) operations through
//! qemu-img: create, clone, snapshot, revert, delete snapshot, resize, export, delete.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::{DiskMeta, Snapshot};
use crate::error::{Result, StorageError, io_err};
use crate::format::DiskFormat;
use crate::names::check_object_name;
use crate::qemu_img::{self, Qcow2Options};
use crate::store::{DiskStore, write_synced};

/// What the VMM needs to open a disk and what OverlayDisk status shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskView {
    pub active_path: PathBuf,
    /// Chain files from the active layer down to the base.
    pub chain: Vec<PathBuf>,
    pub virtual_size: u64,
    /// Bytes allocated by this disk's own layers (the base is shared, counted apart).
    pub allocated_bytes: u64,
    pub l2_cache_size: u64,
    /// A nested -blockdev JSON for the whole chain (node names fixed per layer).
    pub blockdev: serde_json::Value,
    pub snapshots: Vec<Snapshot>,
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Builds the nested blockdev options of a chain (pure).
pub fn blockdev_json(meta: &DiskMeta, dir: &Path, base: &Path) -> serde_json::Value {
    let l2 = meta.options.l2_cache_size(meta.virtual_size);
    let mut node = serde_json::json!({
        "driver": "qcow2",
        "node-name": meta.node_name(None),
        "read-only": true,
        "file": {"driver": "file", "filename": base.to_string_lossy(), "aio": "threads"},
    });
    let mut chain = meta.chain_of(&meta.active);
    chain.reverse();
    for id in chain {
        node = serde_json::json!({
            "driver": "qcow2",
            "node-name": meta.node_name(Some(&id)),
            "l2-cache-size": l2,
            "file": {"driver": "file", "filename": dir.join(format!("{id}.qcow2")).to_string_lossy()},
            "backing": node,
        });
    }
    node
}

impl DiskStore {
    pub fn disk_dir(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        check_object_name(namespace)?;
        check_object_name(name)?;
        Ok(self.root().join("disks").join(namespace).join(name))
    }

    pub(crate) fn layer_path(&self, meta: &DiskMeta, id: &str) -> Result<PathBuf> {
        Ok(self
            .disk_dir(&meta.namespace, &meta.name)?
            .join(format!("{id}.qcow2")))
    }

    /// Path of a layer's backing file: the parent layer or the base.
    pub(crate) fn parent_path(&self, meta: &DiskMeta, parent: Option<&str>) -> Result<PathBuf> {
        match parent {
            Some(p) => self.layer_path(meta, p),
            None => Ok(self.base_path(&meta.base)),
        }
    }

    pub fn load_disk(&self, namespace: &str, name: &str) -> Result<DiskMeta> {
        let path = self.disk_dir(namespace, name)?.join("disk.json");
        let text = std::fs::read(&path)
            .map_err(|_| StorageError::DiskNotFound(format!("{namespace}/{name}")))?;
        serde_json::from_slice(&text).map_err(|source| StorageError::Metadata { path, source })
    }

    pub(crate) fn save_disk(&self, meta: &DiskMeta) -> Result<()> {
        let dir = self.disk_dir(&meta.namespace, &meta.name)?;
        let path = dir.join("disk.json");
        let tmp = dir.join("disk.json.tmp");
        let json = serde_json::to_vec_pretty(meta).map_err(|source| StorageError::Metadata {
            path: path.clone(),
            source,
        })?;
        write_synced(&tmp, &json)?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Creates a qcow2 layer file on top of `backing`.
    pub(crate) async fn create_layer(
        &self,
        meta: &DiskMeta,
        id: &str,
        backing: &Path,
    ) -> Result<PathBuf> {
        let path = self.layer_path(meta, id)?;
        let args =
            qemu_img::create_overlay_args(backing, &path, meta.options, Some(meta.virtual_size));
        // -u: the backing may be open by a running QEMU; the size is given explicitly.
        let mut args = args;
        args.insert(2, "-u".into());
        self.qemu_img().run(&args, None).await?;
        Ok(path)
    }

    /// Creates disk `namespace/name` as an overlay of base `digest`, optionally bigger.
    pub async fn create_disk(
        &self,
        namespace: &str,
        name: &str,
        digest: &str,
        size: Option<u64>,
    ) -> Result<DiskView> {
        let base = self.base(digest)?;
        let dir = self.disk_dir(namespace, name)?;
        if dir.join("disk.json").exists() {
            return Err(StorageError::DiskExists(format!("{namespace}/{name}")));
        }
        let virtual_size = size.unwrap_or(base.virtual_size).max(base.virtual_size);
        crate::format::check_size(&dir, "disk size", virtual_size, self.limits())?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let meta = DiskMeta::new(namespace, name, digest, virtual_size);
        let result = async {
            self.create_layer(&meta, &meta.active, &base.path).await?;
            self.save_disk(&meta)
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.disk_view(&meta)
    }

    /// Clones a (stopped) disk: the clone shares the base and gets a copy of the
    /// source's own data only (`qemu-img convert -B base`), not of the base.
    pub async fn clone_disk(&self, src: (&str, &str), dst: (&str, &str)) -> Result<DiskView> {
        let source = self.load_disk(src.0, src.1)?;
        let dir = self.disk_dir(dst.0, dst.1)?;
        if dir.join("disk.json").exists() {
            return Err(StorageError::DiskExists(format!("{}/{}", dst.0, dst.1)));
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut meta = DiskMeta::new(dst.0, dst.1, &source.base, source.virtual_size);
        meta.options = source.options;
        let base = self.base_path(&source.base);
        let out = self.layer_path(&meta, &meta.active)?;
        let args = vec![
            "convert".into(),
            "-f".into(),
            "qcow2".into(),
            "-O".into(),
            "qcow2".into(),
            "-o".into(),
            meta.options.to_opt_string(),
            "-B".into(),
            base.to_string_lossy().into_owned(),
            "-F".into(),
            "qcow2".into(),
            self.layer_path(&source, &source.active)?
                .to_string_lossy()
                .into_owned(),
            out.to_string_lossy().into_owned(),
        ];
        let result = async {
            self.qemu_img().run(&args, None).await?;
            self.save_disk(&meta)
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.disk_view(&meta)
    }

    pub fn disk_view(&self, meta: &DiskMeta) -> Result<DiskView> {
        let dir = self.disk_dir(&meta.namespace, &meta.name)?;
        let base = self.base_path(&meta.base);
        let mut chain: Vec<PathBuf> = meta
            .chain_of(&meta.active)
            .iter()
            .map(|id| dir.join(format!("{id}.qcow2")))
            .collect();
        chain.push(base.clone());
        let allocated_bytes = meta
            .layers
            .iter()
            .map(|l| allocated(&dir.join(l.file_name())))
            .sum();
        Ok(DiskView {
            active_path: dir.join(format!("{}.qcow2", meta.active)),
            chain,
            virtual_size: meta.virtual_size,
            allocated_bytes,
            l2_cache_size: meta.options.l2_cache_size(meta.virtual_size),
            blockdev: blockdev_json(meta, &dir, &base),
            snapshots: meta.snapshots.clone(),
        })
    }

    /// Offline snapshot: freezes the active layer under `snapshot`'s name.
    pub async fn snapshot_offline(
        &self,
        namespace: &str,
        name: &str,
        snapshot: &str,
    ) -> Result<DiskView> {
        check_object_name(snapshot)?;
        let mut meta = self.load_disk(namespace, name)?;
        if meta.snapshot(snapshot).is_some() {
            return Err(snap_err(
                &meta,
                format!("snapshot {snapshot} already exists"),
            ));
        }
        let frozen = meta.active.clone();
        let id = meta.add_layer(Some(frozen.clone()));
        self.create_layer(&meta, &id, &self.layer_path(&meta, &frozen)?)
            .await?;
        meta.snapshots.push(Snapshot {
            name: snapshot.into(),
            layer: frozen,
            created_unix: now_unix(),
        });
        meta.active = id;
        self.flatten_if_deep_offline(&mut meta).await?;
        self.save_disk(&meta)?;
        self.disk_view(&meta)
    }

    /// Keeps the active chain at `max_chain_depth` files: the active layer absorbs every
    /// layer between it and the base (snapshot layers stay, as files, for reverts).
    async fn flatten_if_deep_offline(&self, meta: &mut DiskMeta) -> Result<()> {
        if meta.depth() <= self.cfg.max_chain_depth {
            return Ok(());
        }
        let active = self.layer_path(meta, &meta.active)?;
        let base = self.base_path(&meta.base);
        let args = qemu_img::rebase_args(&active, &base, false);
        self.qemu_img().run(&args, None).await?;
        let active_id = meta.active.clone();
        if let Some(l) = meta.layers.iter_mut().find(|l| l.id == active_id) {
            l.parent = None;
        }
        self.remove_pruned(meta)
    }

    pub(crate) fn remove_pruned(&self, meta: &mut DiskMeta) -> Result<()> {
        for layer in meta.prune() {
            let path = self.layer_path(meta, &layer.id)?;
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Reverts a stopped disk to `snapshot`: a new empty active layer on the snapshot;
    /// the old active state is discarded.
    pub async fn revert(&self, namespace: &str, name: &str, snapshot: &str) -> Result<DiskView> {
        let mut meta = self.load_disk(namespace, name)?;
        let snap = meta
            .snapshot(snapshot)
            .cloned()
            .ok_or_else(|| snap_err(&meta, format!("no snapshot {snapshot}")))?;
        let id = meta.add_layer(Some(snap.layer.clone()));
        self.create_layer(&meta, &id, &self.layer_path(&meta, &snap.layer)?)
            .await?;
        meta.active = id;
        self.flatten_if_deep_offline(&mut meta).await?;
        self.remove_pruned(&mut meta)?;
        self.save_disk(&meta)?;
        self.disk_view(&meta)
    }

    /// Deletes a snapshot of a stopped disk. Its layer's data moves into its children
    /// (`qemu-img rebase` in safe mode copies what they need), or, when the only child is
    /// the active layer, the active layer is committed into it (cheaper: active is small).
    pub async fn delete_snapshot_offline(
        &self,
        namespace: &str,
        name: &str,
        snapshot: &str,
    ) -> Result<DiskView> {
        let mut meta = self.load_disk(namespace, name)?;
        let snap = meta
            .snapshot(snapshot)
            .cloned()
            .ok_or_else(|| snap_err(&meta, format!("no snapshot {snapshot}")))?;
        let layer = meta
            .layer(&snap.layer)
            .cloned()
            .ok_or_else(|| snap_err(&meta, "snapshot layer missing".into()))?;
        let children = meta.children(&layer.id);
        meta.snapshots.retain(|s| s.name != snapshot);
        if children == [meta.active.clone()] {
            let active = self.layer_path(&meta, &meta.active)?;
            let args = vec![
                "commit".into(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                "-d".into(),
                active.to_string_lossy().into_owned(),
            ];
            self.qemu_img().run(&args, None).await?;
            meta.active = layer.id.clone();
        } else {
            let new_parent = self.parent_path(&meta, layer.parent.as_deref())?;
            for child in &children {
                let path = self.layer_path(&meta, child)?;
                let args = qemu_img::rebase_args(&path, &new_parent, false);
                self.qemu_img().run(&args, None).await?;
                if let Some(l) = meta.layers.iter_mut().find(|l| &l.id == child) {
                    l.parent = layer.parent.clone();
                }
            }
        }
        self.remove_pruned(&mut meta)?;
        self.save_disk(&meta)?;
        self.disk_view(&meta)
    }

    /// Grows a stopped disk.
    pub async fn resize_offline(
        &self,
        namespace: &str,
        name: &str,
        new_size: u64,
    ) -> Result<DiskView> {
        let mut meta = self.load_disk(namespace, name)?;
        if new_size < meta.virtual_size {
            return Err(snap_err(
                &meta,
                format!(
                    "shrinking from {} to {new_size} bytes would lose data",
                    meta.virtual_size
                ),
            ));
        }
        crate::format::check_size(Path::new(name), "disk size", new_size, self.limits())?;
        let active = self.layer_path(&meta, &meta.active)?;
        let args = vec![
            "resize".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            active.to_string_lossy().into_owned(),
            new_size.to_string(),
        ];
        self.qemu_img().run(&args, None).await?;
        meta.virtual_size = new_size;
        self.save_disk(&meta)?;
        self.disk_view(&meta)
    }

    /// Exports a stopped disk (the whole chain) as one streamOptimized VMDK and checks it.
    pub async fn export_vmdk(&self, namespace: &str, name: &str, out: &Path) -> Result<u64> {
        let meta = self.load_disk(namespace, name)?;
        let active = self.layer_path(&meta, &meta.active)?;
        let tmp = out.with_extension("vmdk.tmp");
        let result = async {
            self.qemu_img()
                .run(&qemu_img::export_vmdk_args(&active, &tmp), None)
                .await?;
            self.qemu_img().check(DiskFormat::Vmdk, &tmp).await
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, out).map_err(io_err(out))?;
        Ok(std::fs::metadata(out).map_err(io_err(out))?.len())
    }

    /// Deletes a disk and all its layers (the base stays until GC).
    pub fn delete_disk(&self, namespace: &str, name: &str) -> Result<()> {
        let dir = self.disk_dir(namespace, name)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// Every disk's metadata.
    pub fn disks(&self) -> Result<Vec<DiskMeta>> {
        let root = self.root().join("disks");
        let mut out = Vec::new();
        for ns in std::fs::read_dir(&root).map_err(io_err(&root))?.flatten() {
            for d in std::fs::read_dir(ns.path())
                .map_err(io_err(ns.path()))?
                .flatten()
            {
                let (n, name) = (ns.file_name(), d.file_name());
                if let Ok(meta) = self.load_disk(&n.to_string_lossy(), &name.to_string_lossy()) {
                    out.push(meta);
                }
            }
        }
        Ok(out)
    }

    pub fn default_overlay_options(virtual_size: u64) -> Qcow2Options {
        Qcow2Options::for_overlay(virtual_size)
    }
}

pub(crate) fn snap_err(meta: &DiskMeta, reason: String) -> StorageError {
    StorageError::Snapshot {
        disk: format!("{}/{}", meta.namespace, meta.name),
        reason,
    }
}

/// Bytes allocated on the filesystem (sparse files count what they use).
pub(crate) fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn blockdev_nests_the_active_chain_down_to_a_read_only_base() {
        let mut meta = DiskMeta::new("ns", "web", "abc", 10 << 30);
        let l2 = meta.add_layer(Some("l1".into()));
        meta.active = l2;
        let v = blockdev_json(
            &meta,
            Path::new("/s/disks/ns/web"),
            Path::new("/s/bases/b.qcow2"),
        );
        assert_eq!(v["node-name"], meta.node_name(Some("l2")));
        assert_eq!(v["file"]["filename"], "/s/disks/ns/web/l2.qcow2");
        assert_eq!(v["l2-cache-size"], 1_310_720);
        let l1 = &v["backing"];
        assert_eq!(l1["node-name"], meta.node_name(Some("l1")));
        let base = &l1["backing"];
        assert_eq!(base["read-only"], true);
        assert_eq!(base["file"]["filename"], "/s/bases/b.qcow2");
        assert!(base.get("backing").is_none());
    }
}
