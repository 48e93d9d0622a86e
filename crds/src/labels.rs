//! Labels and annotations hvx puts on the objects it creates (launcher pods, their
//! PodDisruptionBudgets) and on nodes. One definition shared by the operator, the
//! agent and the CLI, so a selector one of them writes matches what another set
//! (`kubectl hvx console` once selected a label no pod carried).

/// The application name, on every pod and PDB hvx creates for a VM.
pub const LABEL_APP: &str = "hvx.dev/app";
/// The VM name.
pub const LABEL_VM: &str = "hvx.dev/vm";
/// What the pod is ([`ROLE_LAUNCHER`]).
pub const LABEL_ROLE: &str = "hvx.dev/role";
/// The value of [`LABEL_ROLE`] on launcher pods (one per running VM).
pub const ROLE_LAUNCHER: &str = "launcher";
/// On a live migration's target pod until the migration completes: the VmMigration.
pub const LABEL_MIGRATION_TARGET: &str = "hvx.dev/migration-target";
/// The launch spec JSON (read by the launcher through the downward API).
pub const ANNOTATION_LAUNCH_SPEC: &str = "hvx.dev/launch-spec";
/// Node label the agent sets once it serves.
pub const NODE_LABEL_AGENT: &str = "hvx.dev/agent";
/// Node label with the accelerator the agent's probe found.
pub const NODE_LABEL_ACCELERATOR: &str = "hvx.dev/accelerator";
/// Node label: `true` where the agent's probe found that QEMU takes post-copy
/// migrations (userfaultfd works).
pub const NODE_LABEL_POST_COPY: &str = "hvx.dev/post-copy";

/// The label selector of the pod running `vm` now: its launcher pod, not a live
/// migration's target (which is not the VM until the migration completes).
pub fn vm_pod_selector(app: &str, vm: &str) -> String {
    format!(
        "{LABEL_ROLE}={ROLE_LAUNCHER},{LABEL_APP}={app},{LABEL_VM}={vm},!{LABEL_MIGRATION_TARGET}"
    )
}

/// Like [`vm_pod_selector`] for a VM whose application is not known (any application).
pub fn any_vm_pod_selector(vm: &str) -> String {
    format!("{LABEL_ROLE}={ROLE_LAUNCHER},{LABEL_VM}={vm},!{LABEL_MIGRATION_TARGET}")
}
