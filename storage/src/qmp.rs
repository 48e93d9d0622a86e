//! Operations on the disks of a RUNNING VM through QMP: external snapshots, chain
//! flattening and snapshot deletion with block-stream/block-commit, online resize, I/O
//! throttling, persistent dirty bitmaps and incremental backup.
//!
//! The QMP transport is abstracted by [`QmpExecutor`] (hvx-vmm's client implements it);
//! jobs are followed by polling `query-jobs`, so no event stream is needed.
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::chain::{DiskMeta, Snapshot};
use crate::disks::{DiskView, now_unix, snap_err};
use crate::error::{Result, StorageError};
use crate::names::check_object_name;
use crate::store::DiskStore;

/// Sends one QMP command and returns its `return` value (or a [`StorageError::Qmp`]).
#[async_trait::async_trait]
pub trait QmpExecutor: Send + Sync {
    async fn execute(&self, command: &str, args: Value) -> Result<Value>;
}

/// Per-disk I/O limits (0 = unlimited), as block_set_io_throttle takes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IoThrottle {
    pub bps: u64,
    pub bps_rd: u64,
    pub bps_wr: u64,
    pub iops: u64,
    pub iops_rd: u64,
    pub iops_wr: u64,
}

/// block_set_io_throttle arguments for the guest device with qdev id `device_id`.
pub fn throttle_args(device_id: &str, t: &IoThrottle) -> Value {
    json!({
        "id": device_id,
        "bps": t.bps, "bps_rd": t.bps_rd, "bps_wr": t.bps_wr,
        "iops": t.iops, "iops_rd": t.iops_rd, "iops_wr": t.iops_wr,
    })
}

/// blockdev-add arguments for a fresh qcow2 file with no backing opened yet.
pub fn blockdev_add_args(node: &str, path: &Path, l2_cache: u64) -> Value {
    json!({
        "driver": "qcow2",
        "node-name": node,
        "l2-cache-size": l2_cache,
        "file": {"driver": "file", "filename": path.to_string_lossy()},
        "backing": null,
    })
}

/// Waits for job `id` to conclude, completing it when it reaches `ready` (active commit).
pub async fn wait_job(qmp: &dyn QmpExecutor, id: &str, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let jobs = qmp.execute("query-jobs", json!({})).await?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == id))
            .cloned()
            .ok_or_else(|| StorageError::Qmp {
                command: "query-jobs".into(),
                reason: format!("job {id} disappeared"),
            })?;
        match job["status"].as_str().unwrap_or_default() {
            "ready" => {
                qmp.execute("job-complete", json!({"id": id})).await?;
            }
            "concluded" => {
                qmp.execute("job-dismiss", json!({"id": id})).await?;
                if let Some(err) = job.get("error").and_then(Value::as_str) {
                    return Err(StorageError::Qmp {
                        command: format!("job {id}"),
                        reason: err.to_string(),
                    });
                }
                return Ok(());
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            let _ = qmp.execute("job-cancel", json!({"id": id})).await;
            return Err(StorageError::Qmp {
                command: format!("job {id}"),
                reason: format!("did not finish within {timeout:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const JOB_TIMEOUT: Duration = Duration::from_secs(3600);

impl DiskStore {
    /// External snapshot of a running disk: a new qcow2 (our options) is created,
    /// opened with blockdev-add and made the active layer with blockdev-snapshot.
    pub async fn snapshot_online(
        &self,
        qmp: &dyn QmpExecutor,
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
        let path = self
            .create_layer(&meta, &id, &self.layer_path(&meta, &frozen)?)
            .await?;
        let node = meta.node_name(Some(&id));
        let l2 = meta.options.l2_cache_size(meta.virtual_size);
        let opened = async {
            qmp.execute("blockdev-add", blockdev_add_args(&node, &path, l2))
                .await?;
            qmp.execute(
                "blockdev-snapshot",
                json!({"node": meta.node_name(Some(&frozen)), "overlay": node}),
            )
            .await
        }
        .await;
        if let Err(e) = opened {
            let _ = qmp
                .execute("blockdev-del", json!({"node-name": node}))
                .await;
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        meta.snapshots.push(Snapshot {
            name: snapshot.into(),
            layer: frozen,
            created_unix: now_unix(),
        });
        meta.active = id;
        self.save_disk(&meta)?;
        self.flatten_if_deep_online(qmp, &mut meta).await?;
        self.save_disk(&meta)?;
        self.disk_view(&meta)
    }

    /// block-stream of everything between the base and the active layer into it, when
    /// the chain is deeper than allowed.
    async fn flatten_if_deep_online(
        &self,
        qmp: &dyn QmpExecutor,
        meta: &mut DiskMeta,
    ) -> Result<()> {
        if meta.depth() <= self.cfg.max_chain_depth {
            return Ok(());
        }
        let before = meta.chain_of(&meta.active);
        let job = format!("{}-flatten", meta.node_prefix());
        qmp.execute(
            "block-stream",
            json!({
                "job-id": job,
                "device": meta.node_name(Some(&meta.active)),
                "base-node": meta.node_name(None),
                "auto-dismiss": false,
            }),
        )
        .await?;
        wait_job(qmp, &job, JOB_TIMEOUT).await?;
        let active = meta.active.clone();
        if let Some(l) = meta.layers.iter_mut().find(|l| l.id == active) {
            l.parent = None;
        }
        close_dropped(qmp, meta, &before).await;
        self.remove_pruned(meta)
    }

    /// Deletes a snapshot of a running disk. When its layer's only child is the active
    /// layer, the active layer is committed into it (block-commit, then it becomes the
    /// active layer); when the layer is elsewhere in the active chain, its data is
    /// streamed into its child in the chain; children outside the running chain are
    /// rebased offline (qemu has them closed).
    pub async fn delete_snapshot_online(
        &self,
        qmp: &dyn QmpExecutor,
        namespace: &str,
        name: &str,
        snapshot: &str,
    ) -> Result<DiskView> {
        let mut meta = self.load_disk(namespace, name)?;
        let snap = meta
            .snapshot(snapshot)
            .cloned()
            .ok_or_else(|| snap_err(&meta, format!("no snapshot {snapshot}")))?;
        let chain = meta.chain_of(&meta.active);
        let Some(pos) = chain.iter().position(|l| *l == snap.layer) else {
            // Not open in QEMU: the offline path is safe.
            return self
                .delete_snapshot_offline(namespace, name, snapshot)
                .await;
        };
        let layer = meta
            .layer(&snap.layer)
            .cloned()
            .ok_or_else(|| snap_err(&meta, "snapshot layer missing".into()))?;
        let children = meta.children(&layer.id);
        let chain_child = chain[pos - 1].clone(); // pos > 0: the active layer is never a snapshot
        let job = format!("{}-del", meta.node_prefix());
        let before = chain.clone();
        meta.snapshots.retain(|s| s.name != snapshot);
        if children.len() == 1 && chain_child == meta.active {
            qmp.execute(
                "block-commit",
                json!({
                    "job-id": job,
                    "device": meta.node_name(Some(&meta.active)),
                    "top-node": meta.node_name(Some(&meta.active)),
                    "base-node": meta.node_name(Some(&layer.id)),
                    "auto-dismiss": false,
                }),
            )
            .await?;
            wait_job(qmp, &job, JOB_TIMEOUT).await?;
            meta.active = layer.id.clone();
        } else {
            qmp.execute(
                "block-stream",
                json!({
                    "job-id": job,
                    "device": meta.node_name(Some(&chain_child)),
                    "base-node": meta.node_name(layer.parent.as_deref()),
                    "auto-dismiss": false,
                }),
            )
            .await?;
            wait_job(qmp, &job, JOB_TIMEOUT).await?;
            if let Some(l) = meta.layers.iter_mut().find(|l| l.id == chain_child) {
                l.parent = layer.parent.clone();
            }
            // Other children are closed in QEMU: rebase them offline onto the new parent.
            let new_parent = self.parent_path(&meta, layer.parent.as_deref())?;
            for child in children.iter().filter(|c| **c != chain_child) {
                let path = self.layer_path(&meta, child)?;
                let args = crate::qemu_img::rebase_args(&path, &new_parent, false);
                self.qemu_img().run(&args, None).await?;
                if let Some(l) = meta.layers.iter_mut().find(|l| &l.id == child) {
                    l.parent = layer.parent.clone();
                }
            }
        }
        close_dropped(qmp, &meta, &before).await;
        self.remove_pruned(&mut meta)?;
        self.save_disk(&meta)?;
        self.disk_view(&meta)
    }

    /// Grows a running disk (block_resize on the active layer).
    pub async fn resize_online(
        &self,
        qmp: &dyn QmpExecutor,
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
        qmp.execute(
            "block_resize",
            json!({"node-name": meta.node_name(Some(&meta.active)), "size": new_size}),
        )
        .await?;
        meta.virtual_size = new_size;
        self.save_disk(&meta)?;
        self.disk_view(&meta)
    }

    /// Starts tracking writes in a persistent dirty bitmap (stored in the active qcow2,
    /// so it survives a VM restart). A snapshot changes the active layer: take a full
    /// backup after one.
    pub async fn start_dirty_tracking(
        &self,
        qmp: &dyn QmpExecutor,
        meta: &DiskMeta,
        bitmap: &str,
    ) -> Result<()> {
        check_object_name(bitmap)?;
        qmp.execute(
            "block-dirty-bitmap-add",
            json!({"node": meta.node_name(Some(&meta.active)), "name": bitmap, "persistent": true}),
        )
        .await
        .map(|_| ())
    }

    /// Backs a running disk up into `target` (a new qcow2 file): a full backup that
    /// also resets `bitmap` atomically, or an incremental one of what `bitmap` marks,
    /// written over `previous` (the last backup of the chain) as backing file.
    pub async fn backup_online(
        &self,
        qmp: &dyn QmpExecutor,
        meta: &DiskMeta,
        bitmap: &str,
        target: &Path,
        previous: Option<&Path>,
    ) -> Result<()> {
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        if let Some(prev) = previous {
            args.extend([
                "-b".into(),
                prev.to_string_lossy().into_owned(),
                "-F".into(),
                "qcow2".into(),
            ]);
        }
        args.extend([
            target.to_string_lossy().into_owned(),
            meta.virtual_size.to_string(),
        ]);
        self.qemu_img().run(&args, None).await?;
        let node = format!("{}-bk", meta.node_prefix());
        let job = format!("{}-backup", meta.node_prefix());
        let device = meta.node_name(Some(&meta.active));
        let result = async {
            qmp.execute("blockdev-add", blockdev_add_args(&node, target, 1 << 20)).await?;
            match previous {
                None => {
                    qmp.execute(
                        "transaction",
                        json!({"actions": [
                            {"type": "block-dirty-bitmap-clear", "data": {"node": device, "name": bitmap}},
                            {"type": "blockdev-backup", "data": {"job-id": job, "device": device, "target": node, "sync": "full", "auto-dismiss": false}},
                        ]}),
                    )
                    .await?;
                }
                Some(_) => {
                    qmp.execute(
                        "blockdev-backup",
                        json!({"job-id": job, "device": device, "target": node, "sync": "incremental", "bitmap": bitmap, "auto-dismiss": false}),
                    )
                    .await?;
                }
            }
            wait_job(qmp, &job, JOB_TIMEOUT).await
        }
        .await;
        let _ = qmp
            .execute("blockdev-del", json!({"node-name": node}))
            .await;
        if result.is_err() {
            let _ = std::fs::remove_file(target);
        }
        result
    }
}

/// Closes in QEMU the layer nodes a job took out of the active chain (top first: each
/// still holds its backing link, which would keep the node below from being a root
/// node for later jobs). Best effort: a node QEMU already dropped is fine.
async fn close_dropped(qmp: &dyn QmpExecutor, meta: &DiskMeta, before: &[String]) {
    let after = meta.chain_of(&meta.active);
    for id in before.iter().filter(|id| !after.contains(id)) {
        if let Err(e) = qmp
            .execute(
                "blockdev-del",
                json!({"node-name": meta.node_name(Some(id))}),
            )
            .await
        {
            tracing::debug!(layer = %id, error = %e, "closing dropped layer");
        }
    }
}

/// Applies I/O limits to a guest disk of a running VM (BlockBackend throttling: it
/// stays on the device across snapshots and commits, unlike a throttle filter node,
/// which would stop the layer below from being a root node for block-commit). To limit
/// from the first I/O, start QEMU with -S, call this, then `cont`. `device_id` is the qdev id of a
/// device that owns the block backend (a scsi-hd id, or for virtio-blk-pci the QOM path
/// `/machine/peripheral/<id>/virtio-backend`).
pub async fn set_io_throttle(
    qmp: &dyn QmpExecutor,
    device_id: &str,
    limits: &IoThrottle,
) -> Result<()> {
    qmp.execute("block_set_io_throttle", throttle_args(device_id, limits))
        .await
        .map(|_| ())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn throttle_arguments() {
        let v = throttle_args(
            "disk0",
            &IoThrottle {
                iops: 100,
                bps_wr: 5,
                ..Default::default()
            },
        );
        assert_eq!(v["id"], "disk0");
        assert_eq!(v["iops"], 100);
        assert_eq!(v["bps_wr"], 5);
        assert_eq!(v["bps"], 0);
    }

    #[test]
    fn blockdev_add_has_no_backing() {
        let v = blockdev_add_args("n1", Path::new("/x.qcow2"), 65536);
        assert!(v["backing"].is_null());
        assert_eq!(v["file"]["filename"], "/x.qcow2");
    }
}
