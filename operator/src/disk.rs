//! OverlayDisk controller: reports what the disk waits for. Bytes move on the nodes:
//! the agent of each node that runs a VM using the disk imports it (PrepareDisk) and
//! reports progress, which the operator copies here.

use crate::context::Context;
use crate::error::Error;
use hvx_api::{DiskPhase, OverlayDisk, condition, new_condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Phase and message for a disk nobody has imported yet.
pub fn initial_phase(disk: &OverlayDisk) -> (DiskPhase, &'static str) {
    if disk.spec.source.upload.is_some() {
        (
            DiskPhase::WaitingForUpload,
            "waiting for `kubectl hvx import --upload`",
        )
    } else {
        (
            DiskPhase::Pending,
            "imported by a node agent when a VM using it is scheduled",
        )
    }
}

/// Reconciles one OverlayDisk.
pub async fn reconcile(disk: Arc<OverlayDisk>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = disk.namespace().unwrap_or_default();
    let api: Api<OverlayDisk> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = disk.status.clone().unwrap_or_default();
    let generation = disk.meta().generation;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    if status.phase.is_none() || status.phase == Some(DiskPhase::Pending) {
        let (phase, message) = initial_phase(&disk);
        status.phase = Some(phase);
        set_condition(
            &mut status.conditions,
            new_condition(
                condition::READY,
                false,
                &format!("{phase:?}"),
                message,
                generation,
                now.clone(),
            ),
        );
    }
    set_condition(
        &mut status.conditions,
        new_condition(condition::VALID, true, "Valid", "", generation, now),
    );
    status.observed_generation = generation;
    let patch = json!({"apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk", "status": status});
    api.patch_status(
        &disk.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}
