//! OverlayDisk controller: reports what the disk waits for. Bytes move on the nodes:
//! the agent of each node that runs a VM using the disk imports it (PrepareDisk) and
//! reports progress, which the operator copies here.

use crate::context::{Context, ImportDone, ImportState, UploadProgress};
use crate::error::Error;
use crate::finalize::Cleanup;
use crate::hostplan::CloneBlocked;
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
        crate::finalize::FirstApply::AfterFinalizer,
        |disk| async move { apply(&disk, disks, ctx).await },
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
                // A clone is imported as this disk: it needs it while it exists.
                let clones = clones_of(&ctx.stores.disks.state(), ns, &disk.name_any());
                if !clones.is_empty() {
                    return Ok(Cleanup::waiting(format!(
                        "cloned by OverlayDisk {}; deleting after it",
                        clones.join(", ")
                    )));
                }
                // Bases shared with other disks (same content) stay: the agent only
                // removes a base nothing references any more.
                // Lost nodes owe the release (recorded), Suspect ones make it wait.
                if let Cleanup::Waiting { reason, retry } =
                    hostprep::release_disk_everywhere(ctx, &disk).await?
                {
                    return Ok(Cleanup::Waiting { reason, retry });
                }
                // ReleaseDisk removed the upload's copies from every node (lost nodes
                // owe it); this process forgets its progress.
                if let Some(up) = &ctx.config.upload {
                    up.book.forget(&disk.uid().unwrap_or_default());
                }
                Ok(Cleanup::Done)
            }
        },
    )
    .await
}

/// The OverlayDisks of `ns` that clone `name` and are not being deleted (pure): a
/// clone being deleted no longer needs its origin, so deleting a clone cycle at once
/// never waits on itself.
pub fn clones_of(disks: &[Arc<OverlayDisk>], ns: &str, name: &str) -> Vec<String> {
    let mut v: Vec<String> = disks
        .iter()
        .filter(|d| d.metadata.namespace.as_deref() == Some(ns))
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .filter(|d| {
            d.spec
                .source
                .clone
                .as_ref()
                .is_some_and(|c| c.overlay_disk == name)
        })
        .map(|d| d.name_any())
        .collect();
    v.sort();
    v
}

/// What this process knows of the imports of one disk: (node, state), by node.
fn imports_of(ctx: &Context, uid: &str) -> Vec<(String, ImportState)> {
    let mut found: Vec<(String, ImportState)> = ctx
        .imports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|((_, u), _)| u == uid)
        .map(|((node, _), state)| (node.clone(), state.clone()))
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The status fields the disk's imports decide (phase, progress, bytes, format,
/// digest, sizes, nodes), from its spec and the imports this process follows (pure).
/// Empty when nothing is known: an operator that just started follows no import, and
/// what the last one wrote stays. A spec the agents would refuse is Failed with the
/// reason; then a running import, a failed one, a finished one, in that order.
pub fn import_fields(
    disk: &OverlayDisk,
    imports: &[(String, ImportState)],
) -> serde_json::Map<String, serde_json::Value> {
    let fields = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    // A clone's imports are its origin's (`clone_fields`), whose spec is checked there.
    if disk.spec.source.clone.is_none()
        && let Err(reason) = crate::hostplan::prepare_disk_request(disk)
    {
        return fields(json!({"phase": DiskPhase::Failed, "progress": reason}));
    }
    if let Some((node, p)) = imports.iter().find_map(|(n, s)| match s {
        ImportState::Running(p) => Some((n, p)),
        _ => None,
    }) {
        let phase = if p.waiting_for_upload {
            DiskPhase::WaitingForUpload
        } else {
            DiskPhase::Importing
        };
        return fields(json!({
            "phase": phase, "progress": format!("{node}: {}", p.text),
            "bytesDone": p.bytes_done, "bytesTotal": p.bytes_total,
        }));
    }
    if let Some((node, message)) = imports.iter().find_map(|(n, s)| match s {
        ImportState::Failed { message, .. } => Some((n, message)),
        _ => None,
    }) {
        return fields(
            json!({"phase": DiskPhase::Failed, "progress": format!("{node}: {message}")}),
        );
    }
    let ready: Vec<(&String, &ImportDone)> = imports
        .iter()
        .filter_map(|(n, s)| match s {
            ImportState::Ready(d) => Some((n, d)),
            _ => None,
        })
        .collect();
    let Some((node, done)) = ready.last() else {
        return serde_json::Map::new();
    };
    let mut nodes: BTreeSet<String> = disk
        .status
        .as_ref()
        .map(|s| s.nodes.iter().cloned().collect())
        .unwrap_or_default();
    nodes.extend(ready.iter().map(|(n, _)| (*n).clone()));
    fields(json!({
        "phase": DiskPhase::Ready,
        "progress": format!("imported on {node} in {}s", done.seconds),
        "bytesDone": done.bytes_total, "bytesTotal": done.bytes_total,
        "format": done.format, "digest": done.digest,
        "virtualSize": done.virtual_bytes.to_string(), "actualSize": done.actual_bytes.to_string(),
        "nodes": nodes,
    }))
}

/// The status fields an upload decides before any import (pure): while bytes arrive,
/// `WaitingForUpload` with the bytes every copy holds; once complete, `Pending` (a
/// node imports it when a VM using it is scheduled). Only over the phases before an
/// import: an imported disk stays as its import left it.
pub fn upload_fields(
    disk: &OverlayDisk,
    progress: Option<&UploadProgress>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    let before_import = matches!(
        disk.status.as_ref().and_then(|s| s.phase),
        None | Some(DiskPhase::WaitingForUpload) | Some(DiskPhase::Pending)
    );
    let Some(p) = progress.filter(|_| disk.spec.source.upload.is_some() && before_import) else {
        return m;
    };
    let mib = |b: u64| b >> 20;
    let nodes = p.nodes.join(", ");
    let (phase, text) = if p.complete {
        (
            DiskPhase::Pending,
            format!(
                "uploaded {} MiB (kept on {nodes}); imported on the node of each VM using it",
                mib(p.bytes_total)
            ),
        )
    } else {
        let pct = p
            .bytes_done
            .saturating_mul(100)
            .checked_div(p.bytes_total)
            .unwrap_or(0);
        (
            DiskPhase::WaitingForUpload,
            format!(
                "uploading: {pct}% ({}/{} MiB, kept on {nodes})",
                mib(p.bytes_done),
                mib(p.bytes_total)
            ),
        )
    };
    m.insert("phase".into(), json!(phase));
    m.insert("progress".into(), json!(text));
    m.insert("bytesDone".into(), json!(p.bytes_done));
    m.insert("bytesTotal".into(), json!(p.bytes_total));
    m
}

/// The UID whose imports give the disk's status: its own, or for a clone its
/// origin's (a clone is imported as the disk it clones: `hostplan::clone_origin`).
fn clone_origin_uid(ctx: &Context, disk: &OverlayDisk) -> Result<String, CloneBlocked> {
    if disk.spec.source.clone.is_none() {
        return Ok(disk.uid().unwrap_or_default());
    }
    let ns = disk.namespace().unwrap_or_default();
    let origin =
        crate::hostplan::clone_origin(Arc::new(disk.clone()), |name| ctx.stores.disk(&ns, name))?;
    Ok(origin.uid().unwrap_or_default())
}

/// A clone that cannot be imported says why: Pending while the disk it names is
/// missing (it may be created), Failed for a chain that can never end (pure).
pub fn clone_blocked_fields(blocked: &CloneBlocked) -> serde_json::Map<String, serde_json::Value> {
    let phase = match blocked {
        CloneBlocked::Missing(_) => DiskPhase::Pending,
        CloneBlocked::Invalid(_) => DiskPhase::Failed,
    };
    let mut m = serde_json::Map::new();
    m.insert("phase".into(), json!(phase));
    m.insert("progress".into(), json!(blocked.to_string()));
    m
}

/// Writes the disk's status: the import fields (`import_fields`), before any import
/// the upload's (`upload_fields`: what the upload endpoint recorded, or after a
/// restart what the agents hold), the initial phase of a new disk, and the
/// conditions. This controller is the only writer of the status; a merge patch of
/// only what changed, so fields nobody decided keep the last written values.
async fn apply(disk: &OverlayDisk, api: &Api<OverlayDisk>, ctx: &Context) -> Result<Action, Error> {
    let status = disk.status.clone().unwrap_or_default();
    let generation = disk.meta().generation;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut conditions = status.conditions.clone();
    let current = serde_json::to_value(&status).unwrap_or_default();
    let mut patch = match clone_origin_uid(ctx, disk) {
        Ok(uid) => import_fields(disk, &imports_of(ctx, &uid)),
        Err(blocked) => clone_blocked_fields(&blocked),
    };
    if patch.is_empty() && disk.spec.source.upload.is_some() {
        let uid = disk.uid().unwrap_or_default();
        let recorded = ctx.config.upload.as_ref().and_then(|u| u.book.get(&uid));
        let progress = match recorded {
            Some(p) => Some(p),
            None => crate::upload::progress(ctx, &uid).await,
        };
        patch = upload_fields(disk, progress.as_ref());
    }
    patch.retain(|k, v| current.get(k) != Some(v));
    if status.phase.is_none() && !patch.contains_key("phase") {
        let (phase, message) = initial_phase(disk);
        patch.insert("phase".into(), json!(phase));
        patch.insert("progress".into(), json!(message));
    }
    let phase = patch
        .get("phase")
        .and_then(|p| serde_json::from_value(p.clone()).ok())
        .or(status.phase)
        .unwrap_or(DiskPhase::Pending);
    let progress = patch
        .get("progress")
        .and_then(|p| p.as_str().map(str::to_string))
        .or(status.progress.clone())
        .unwrap_or_else(|| initial_phase(disk).1.to_string());
    let ready = phase == DiskPhase::Ready;
    set_condition(
        &mut conditions,
        new_condition(
            condition::READY,
            ready,
            &format!("{phase:?}"),
            &progress,
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

    fn http_disk(nodes: &[&str]) -> OverlayDisk {
        serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
            "metadata": {"name": "web-root", "namespace": "shop", "uid": "d-1"},
            "spec": {"source": {"http": {"url": "http://disks.example/web.vmdk"}}},
            "status": {"phase": "Ready", "nodes": nodes},
        }))
        .expect("disk")
    }

    fn running(text: &str) -> ImportState {
        ImportState::Running(crate::context::ImportProgress {
            waiting_for_upload: false,
            text: text.into(),
            bytes_done: 10,
            bytes_total: 100,
        })
    }

    fn ready(digest: &str) -> ImportState {
        ImportState::Ready(ImportDone {
            digest: digest.into(),
            virtual_bytes: 1 << 30,
            actual_bytes: 1 << 20,
            bytes_total: 100,
            format: "vmdk".into(),
            seconds: 3,
        })
    }

    /// A clone's status is its origin's imports (ready with the origin's digest), or
    /// why it waits: Pending for a missing origin, Failed for a cycle.
    #[test]
    fn a_clone_reports_its_origins_import_or_what_blocks_it() {
        let clone: OverlayDisk = serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
            "metadata": {"name": "web-copy", "namespace": "shop", "uid": "d-2"},
            "spec": {"source": {"clone": {"overlayDisk": "web-root"}}},
        }))
        .expect("disk");
        let f = import_fields(&clone, &[("n1".into(), ready("sha256:aa"))]);
        assert_eq!(f["phase"], json!("Ready"));
        assert_eq!(f["digest"], json!("sha256:aa"));
        let f = clone_blocked_fields(&CloneBlocked::Missing("waiting for OverlayDisk x".into()));
        assert_eq!(f["phase"], json!("Pending"));
        assert_eq!(f["progress"], json!("waiting for OverlayDisk x"));
        let f = clone_blocked_fields(&CloneBlocked::Invalid("clone cycle: a -> a".into()));
        assert_eq!(f["phase"], json!("Failed"));
    }

    #[test]
    fn an_origin_waits_for_its_live_clones_only() {
        let disk = |name: &str, ns: &str, of: Option<&str>, deleting: bool| {
            let source = match of {
                Some(o) => json!({"clone": {"overlayDisk": o}}),
                None => json!({"blank": {}}),
            };
            let mut meta = json!({"name": name, "namespace": ns});
            if deleting {
                meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            Arc::new(
                serde_json::from_value::<OverlayDisk>(json!({
                    "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
                    "metadata": meta, "spec": {"source": source},
                }))
                .expect("disk"),
            )
        };
        let disks = [
            disk("base", "a", None, false),
            disk("c2", "a", Some("base"), false),
            disk("c1", "a", Some("base"), false),
            disk("gone", "a", Some("base"), true),
            disk("other-ns", "b", Some("base"), false),
            disk("grandchild", "a", Some("c1"), false),
        ];
        assert_eq!(clones_of(&disks, "a", "base"), ["c1", "c2"]);
        assert_eq!(clones_of(&disks, "a", "c1"), ["grandchild"]);
        assert!(clones_of(&disks, "a", "grandchild").is_empty());
    }

    #[test]
    fn an_operator_that_follows_no_import_decides_no_import_field() {
        assert!(import_fields(&http_disk(&["n1"]), &[]).is_empty());
    }

    #[test]
    fn a_running_import_wins_over_a_finished_one_and_names_its_node() {
        let f = import_fields(
            &http_disk(&[]),
            &[
                ("n1".into(), ready("sha256:aa")),
                ("n2".into(), running("downloading 10%")),
            ],
        );
        assert_eq!(f["phase"], "Importing");
        assert_eq!(f["progress"], "n2: downloading 10%");
        assert_eq!(f["bytesTotal"], 100);
    }

    #[test]
    fn a_finished_import_adds_its_node_to_those_already_recorded() {
        let f = import_fields(&http_disk(&["n0"]), &[("n2".into(), ready("sha256:aa"))]);
        assert_eq!(f["phase"], "Ready");
        assert_eq!(f["digest"], "sha256:aa");
        assert_eq!(f["nodes"], json!(["n0", "n2"]));
        assert_eq!(f["virtualSize"], (1u64 << 30).to_string());
    }

    #[test]
    fn a_failure_is_reported_with_its_node_and_a_spec_the_agents_refuse_without_one() {
        let failed = ImportState::Failed {
            message: "not a VMDK".into(),
            at: std::time::Instant::now(),
        };
        let f = import_fields(
            &http_disk(&[]),
            &[("n1".into(), failed), ("n2".into(), ready("x"))],
        );
        assert_eq!(f["phase"], "Failed");
        assert_eq!(f["progress"], "n1: not a VMDK");
        let mut blank = http_disk(&[]);
        blank.spec.source = serde_json::from_value(json!({"blank": {}})).expect("source");
        let f = import_fields(&blank, &[("n1".into(), running("x"))]);
        assert_eq!(f["phase"], "Failed");
        assert!(
            f["progress"]
                .as_str()
                .unwrap_or_default()
                .contains("capacity"),
            "{f:?}"
        );
    }

    #[test]
    fn upload_progress_becomes_the_status_until_an_import_runs() {
        let mut disk: OverlayDisk = serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
            "metadata": {"name": "web-root", "namespace": "shop", "uid": "d-1"},
            "spec": {"source": {"upload": {}}},
            "status": {"phase": "WaitingForUpload"},
        }))
        .expect("disk");
        assert!(upload_fields(&disk, None).is_empty());
        let going = UploadProgress {
            bytes_done: 30 << 20,
            bytes_total: 120 << 20,
            complete: false,
            nodes: vec!["n1".into(), "n3".into()],
            sha256: String::new(),
        };
        let f = upload_fields(&disk, Some(&going));
        assert_eq!(f["phase"], "WaitingForUpload");
        assert_eq!(f["bytesDone"], json!(30u64 << 20));
        assert_eq!(f["bytesTotal"], json!(120u64 << 20));
        let text = f["progress"].as_str().unwrap_or_default();
        assert!(text.contains("25%") && text.contains("n1, n3"), "{text}");
        let done = UploadProgress {
            bytes_done: 120 << 20,
            complete: true,
            ..going.clone()
        };
        let f = upload_fields(&disk, Some(&done));
        assert_eq!(f["phase"], "Pending");
        assert_eq!(f["bytesDone"], json!(120u64 << 20));
        // An imported disk keeps what its import wrote.
        disk.status = serde_json::from_value(json!({"phase": "Ready"})).ok();
        assert!(upload_fields(&disk, Some(&done)).is_empty());
        // Other sources never take upload fields.
        let http = http_disk(&[]);
        assert!(upload_fields(&http, Some(&done)).is_empty());
    }

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
