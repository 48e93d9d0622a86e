//! OverlayDisk controller: reports what the disk waits for. Bytes move on the nodes:
//! the agent of each node that runs a VM using the disk imports it (PrepareDisk) and
//! reports progress, which the operator copies here.

use crate::context::Context;
use crate::error::Error;
use crate::finalize::Cleanup;
use crate::hostprep;
use hvx_api::{DiskPhase, OverlayDisk, VmApplication, condition, new_condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Phase and message for a disk nobody has imported yet.
pub fn initial_phase(disk: &OverlayDisk) -> (DiskPhase, &'static str) {
    if disk.spec.source.upload.is_some() {
        (
            DiskPhase::WaitingForUpload,
            "waiting for `kubectl hvx import --upload`",
        )
    } else if disk.spec.source.blank.is_some() {
        (
            DiskPhase::Pending,
            "made empty on the node of each VM using it, when that VM is scheduled",
        )
    } else {
        (
            DiskPhase::Pending,
            "imported by a node agent when a VM using it is scheduled",
        )
    }
}

/// The Degraded condition for requested snapshots (pure): the store takes snapshots
/// (`hvx_storage` offline and through QMP), but the cluster path does not drive them
/// for VM overlays yet, and a request must not look as if it had been honoured.
pub fn snapshots_condition(disk: &OverlayDisk) -> (bool, &'static str, String) {
    let requested: Vec<&str> = disk
        .spec
        .snapshots
        .iter()
        .flatten()
        .map(|s| s.name.as_str())
        .collect();
    if requested.is_empty() {
        (false, "AsDeclared", String::new())
    } else {
        (
            true,
            "SnapshotsNotTaken",
            format!(
                "snapshots {} are recorded but not taken: this hvx version does not snapshot VM overlays on the cluster yet",
                requested.join(", ")
            ),
        )
    }
}

/// Whether an application (deleting or not: its VMs may still run) has a VM disk on
/// this OverlayDisk.
pub fn uses_disk(app: &VmApplication, disk: &str) -> bool {
    disk_names(app).contains(disk)
}

/// The OverlayDisks an application's VMs use.
pub fn disk_names(app: &VmApplication) -> BTreeSet<String> {
    app.spec
        .vms
        .iter()
        .flat_map(|vm| vm.disks.iter().map(|d| d.overlay_disk.name.clone()))
        .collect()
}

/// Reconciles one OverlayDisk.
pub async fn reconcile(disk: Arc<OverlayDisk>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = disk.namespace().unwrap_or_default();
    let api: Api<OverlayDisk> = Api::namespaced(ctx.client.clone(), &ns);
    let (ctx, ns, disks) = (&ctx, &ns, &api);
    crate::finalize::reconcile(
        &api,
        disk,
        |disk| async move { apply(&disk, disks).await },
        |disk| async move {
            {
                // A disk a VM still uses stays until that VM is gone (deleting a
                // whole manifest deletes disks and applications at once).
                let users: Vec<String> = ctx
                    .stores
                    .apps_using_in(ns)
                    .iter()
                    .filter(|a| uses_disk(a, &disk.name_any()))
                    .map(|a| a.name_any())
                    .collect();
                if let Some(waiting) = Cleanup::wait_for_users(&users) {
                    return Ok(waiting);
                }
                // Bases shared with other disks (same content) stay: the agent only
                // removes a base nothing references any more.
                hostprep::release_disk_everywhere(ctx, &disk.uid().unwrap_or_default()).await?;
                if let Some(up) = &ctx.config.upload {
                    crate::upload::forget(up, &disk.uid().unwrap_or_default());
                }
                Ok(Cleanup::Done)
            }
        },
    )
    .await
}

/// Sets the initial phase and the conditions. A merge patch of only these fields:
/// phase, progress, digest and nodes are written by the import followers
/// (`hostprep`) while a node imports, and must not be overwritten with a stale copy.
async fn apply(disk: &OverlayDisk, api: &Api<OverlayDisk>) -> Result<Action, Error> {
    let status = disk.status.clone().unwrap_or_default();
    let generation = disk.meta().generation;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut conditions = status.conditions.clone();
    let mut patch = serde_json::Map::new();
    let phase = match status.phase {
        None => {
            let (phase, message) = initial_phase(disk);
            patch.insert("phase".into(), json!(phase));
            patch.insert("progress".into(), json!(message));
            phase
        }
        Some(p) => p,
    };
    let ready = phase == DiskPhase::Ready;
    set_condition(
        &mut conditions,
        new_condition(
            condition::READY,
            ready,
            &format!("{phase:?}"),
            status.progress.as_deref().unwrap_or(initial_phase(disk).1),
            generation,
            now.clone(),
        ),
    );
    set_condition(
        &mut conditions,
        new_condition(condition::VALID, true, "Valid", "", generation, now.clone()),
    );
    let (degraded, reason, message) = snapshots_condition(disk);
    set_condition(
        &mut conditions,
        new_condition(
            condition::DEGRADED,
            degraded,
            reason,
            message,
            generation,
            now,
        ),
    );
    if conditions != status.conditions
        || status.observed_generation != generation
        || !patch.is_empty()
    {
        patch.insert("conditions".into(), json!(conditions));
        patch.insert("observedGeneration".into(), json!(generation));
        api.patch_status(
            &disk.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": patch })),
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(if ready {
        300
    } else {
        10
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_snapshots_are_reported_as_not_taken() {
        let mut disk: OverlayDisk = serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
            "metadata": {"name": "web-root"},
            "spec": {"source": {"blank": {}}},
        }))
        .expect("disk");
        assert!(!snapshots_condition(&disk).0);
        disk.spec.snapshots = Some(vec![hvx_api::SnapshotRequest {
            name: "before-upgrade".into(),
        }]);
        let (degraded, reason, message) = snapshots_condition(&disk);
        assert!(degraded);
        assert_eq!(reason, "SnapshotsNotTaken");
        assert!(message.contains("before-upgrade"), "{message}");
    }
}
