//! What a launcher pod says about its VM: its launch spec, whether it holds host
//! resources, whether it is a migration's target. Used by every other planning module.

use hvx_api::labels::{ANNOTATION_LAUNCH_SPEC, LABEL_MIGRATION_TARGET};
use hvx_api::launch::LaunchSpec;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The launch spec a launcher pod carries, if it has a readable one.
pub fn pod_launch_spec(pod: &Pod) -> Option<LaunchSpec> {
    let text = pod
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_LAUNCH_SPEC)?;
    serde_json::from_str(text).ok()
}

/// Whether a pod's VM may hold host resources (bound, not finished). A terminating
/// pod still does: QEMU may be shutting down and still own its taps and overlays.
pub fn pod_is_live(pod: &Pod) -> bool {
    let bound = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    bound && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The migration a pod is the target of.
pub fn target_of(pod: &Pod) -> Option<&str> {
    pod.labels().get(LABEL_MIGRATION_TARGET).map(String::as_str)
}
