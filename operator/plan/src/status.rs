//! Pure status derivation: pods and references in, VM and application status out.

use hvx_api::{
    ApplicationPhase, RunStrategy, VirtualMachine, VmApplicationSpec, VmPhase, VmStatus,
};
use k8s_openapi::api::core::v1::Pod;
use std::time::Duration;

/// What the operator should do about one VM after looking at its pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodAction {
    /// Nothing: the pod is as it should be.
    Keep,
    /// Create the pod (none exists and the VM should run).
    Create,
    /// Delete the pod: it ended and the run strategy says restart (a new one follows),
    /// or the VM should not run.
    Delete,
}

/// Phase of a VM from its launcher pod.
pub fn vm_phase(pod: Option<&Pod>) -> (VmPhase, Option<String>) {
    let Some(pod) = pod else {
        return (VmPhase::Pending, None);
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return (VmPhase::Stopping, Some("launcher pod terminating".into()));
    }
    let status = pod.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let waiting_reason = status
        .container_statuses
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| {
            c.state
                .and_then(|s| s.waiting)
                .and_then(|w| w.reason.map(|r| (r, w.message)))
        });
    match status.phase.as_deref() {
        Some("Running") if ready => (VmPhase::Running, None),
        Some("Running") => (VmPhase::Starting, Some("QEMU starting".into())),
        Some("Succeeded") => (VmPhase::Stopped, Some("guest powered off".into())),
        Some("Failed") => (
            VmPhase::Failed,
            Some(status.message.unwrap_or_else(|| "launcher failed".into())),
        ),
        _ if pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_none() =>
        {
            let why = status
                .conditions
                .clone()
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .and_then(|c| c.message);
            (VmPhase::Scheduling, why)
        }
        _ => match waiting_reason {
            Some((reason, msg)) if reason != "ContainerCreating" => (
                VmPhase::Starting,
                Some(format!("{reason}: {}", msg.unwrap_or_default())),
            ),
            _ => (
                VmPhase::Starting,
                Some("launcher container starting".into()),
            ),
        },
    }
}

/// What to do with a VM's pod given its phase and run strategy.
pub fn pod_action(
    vm: &VirtualMachine,
    pod_exists: bool,
    phase: VmPhase,
    deps_running: bool,
) -> PodAction {
    match (vm.run_strategy, pod_exists, phase) {
        (RunStrategy::Halted, true, _) => PodAction::Delete,
        (RunStrategy::Halted, false, _) => PodAction::Keep,
        (_, false, _) if deps_running => PodAction::Create,
        (_, false, _) => PodAction::Keep,
        (RunStrategy::Always, true, VmPhase::Failed | VmPhase::Stopped) => PodAction::Delete,
        (RunStrategy::RerunOnFailure, true, VmPhase::Failed) => PodAction::Delete,
        _ => PodAction::Keep,
    }
}

/// How soon an application is looked at again when no watch event comes first.
/// Every change of its pods, OverlayDisks and VirtualNetworks wakes it anyway; the
/// timer covers what no watch sees: agent-side work (imports, overlays, DHCP leases)
/// while a VM is on its way, and a periodic re-sync of its networks once it settled.
/// Requeueing every application every 5 s whatever its state made 1000 applications
/// cost the API server 200 passes a second.
pub fn resync_after(spec: &VmApplicationSpec, vms: &[VmStatus]) -> Duration {
    let settled = |v: &VmStatus| match v.phase {
        VmPhase::Running => v.interfaces.iter().all(|i| i.ip_address.is_some()),
        VmPhase::Stopped => spec
            .vms
            .iter()
            .find(|s| s.name == v.name)
            .is_some_and(|s| s.run_strategy == RunStrategy::Halted),
        _ => false,
    };
    if !vms.iter().all(settled) {
        return RESYNC_BUSY;
    }
    if vms.iter().any(|v| v.phase == VmPhase::Running) {
        RESYNC_RUNNING
    } else {
        RESYNC_IDLE
    }
}

/// A VM on its way (starting, stopping, waiting for an agent).
pub const RESYNC_BUSY: Duration = Duration::from_secs(5);
/// Running VMs: their networks re-synced and leases refreshed this often.
pub const RESYNC_RUNNING: Duration = Duration::from_secs(60);
/// Nothing runs and nothing should.
pub const RESYNC_IDLE: Duration = Duration::from_secs(300);

/// Summary phase of the application.
pub fn app_phase(vms: &[VmStatus], valid: bool) -> ApplicationPhase {
    if !valid || vms.iter().any(|v| v.phase == VmPhase::Failed) {
        return ApplicationPhase::Failed;
    }
    if vms.iter().any(|v| v.phase == VmPhase::Migrating) {
        return ApplicationPhase::Migrating;
    }
    if vms.iter().all(|v| v.phase == VmPhase::Stopped) {
        return ApplicationPhase::Stopped;
    }
    if vms
        .iter()
        .all(|v| matches!(v.phase, VmPhase::Running | VmPhase::Stopped))
    {
        return ApplicationPhase::Running;
    }
    if vms.iter().any(|v| {
        matches!(
            v.phase,
            VmPhase::Starting | VmPhase::Scheduling | VmPhase::Running
        )
    }) {
        return ApplicationPhase::Starting;
    }
    ApplicationPhase::Pending
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm_status(name: &str, phase: VmPhase, ip: Option<&str>) -> VmStatus {
        serde_json::from_value(json!({
            "name": name, "phase": phase,
            "interfaces": [{"name": "ethernet0", "macAddress": "00:50:56:00:00:01", "ipAddress": ip}],
        }))
        .expect("vm status")
    }

    #[test]
    fn only_applications_on_their_way_are_polled_often() {
        let spec: VmApplicationSpec = serde_json::from_value(json!({"vms": [
            {"name": "a", "memoryMib": 64, "runStrategy": "Halted"},
            {"name": "b", "memoryMib": 64},
        ]}))
        .expect("spec");
        let halted = vm_status("a", VmPhase::Stopped, None);
        // Halted and stopped, running with an address: settled.
        assert_eq!(
            resync_after(
                &spec,
                &[
                    halted.clone(),
                    vm_status("b", VmPhase::Running, Some("10.0.0.5"))
                ]
            ),
            RESYNC_RUNNING
        );
        assert_eq!(
            resync_after(&spec, std::slice::from_ref(&halted)),
            RESYNC_IDLE
        );
        // Waiting for a DHCP lease, starting, or stopped though it should run: busy.
        for b in [
            vm_status("b", VmPhase::Running, None),
            vm_status("b", VmPhase::Starting, None),
            vm_status("b", VmPhase::Stopped, None),
            vm_status("b", VmPhase::Pending, None),
        ] {
            assert_eq!(
                resync_after(&spec, &[halted.clone(), b.clone()]),
                RESYNC_BUSY,
                "{b:?}"
            );
        }
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    fn vm(strategy: &str) -> VirtualMachine {
        serde_json::from_value(json!({"name": "a", "memoryMib": 64, "runStrategy": strategy}))
            .expect("vm")
    }

    #[test]
    fn phases_follow_the_pod() {
        assert_eq!(vm_phase(None).0, VmPhase::Pending);
        let unscheduled = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": []}, "status": {"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available"}]}}),
        );
        assert_eq!(
            vm_phase(Some(&unscheduled)),
            (VmPhase::Scheduling, Some("0/3 nodes are available".into()))
        );
        let running = pod(
            json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        assert_eq!(vm_phase(Some(&running)).0, VmPhase::Running);
        let pulling = pod(
            json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "launcher", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}}]}}),
        );
        assert_eq!(
            vm_phase(Some(&pulling)),
            (
                VmPhase::Starting,
                Some("ErrImageNeverPull: image not present".into())
            )
        );
        let failed = pod(
            json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Failed", "message": "qemu exited with signal 9"}}),
        );
        assert_eq!(
            vm_phase(Some(&failed)),
            (VmPhase::Failed, Some("qemu exited with signal 9".into()))
        );
    }

    #[test]
    fn run_strategies_decide_restarts() {
        assert_eq!(
            pod_action(&vm("Always"), false, VmPhase::Pending, true),
            PodAction::Create
        );
        assert_eq!(
            pod_action(&vm("Always"), false, VmPhase::Pending, false),
            PodAction::Keep,
            "deps first"
        );
        assert_eq!(
            pod_action(&vm("Always"), true, VmPhase::Stopped, true),
            PodAction::Delete
        );
        assert_eq!(
            pod_action(&vm("RerunOnFailure"), true, VmPhase::Stopped, true),
            PodAction::Keep
        );
        assert_eq!(
            pod_action(&vm("RerunOnFailure"), true, VmPhase::Failed, true),
            PodAction::Delete
        );
        assert_eq!(
            pod_action(&vm("Manual"), true, VmPhase::Failed, true),
            PodAction::Keep
        );
        assert_eq!(
            pod_action(&vm("Halted"), true, VmPhase::Running, true),
            PodAction::Delete
        );
        assert_eq!(
            pod_action(&vm("Halted"), false, VmPhase::Pending, true),
            PodAction::Keep
        );
    }

    #[test]
    fn application_phase_summarises_vms() {
        let st = |p| VmStatus {
            name: "x".into(),
            phase: p,
            node: None,
            pod: None,
            accelerator: None,
            interfaces: vec![],
            migration: None,
            restarts: 0,
            pending_change: None,
            reason: None,
            last_transition_time: None,
        };
        assert_eq!(
            app_phase(&[st(VmPhase::Running), st(VmPhase::Running)], true),
            ApplicationPhase::Running
        );
        assert_eq!(
            app_phase(&[st(VmPhase::Running), st(VmPhase::Pending)], true),
            ApplicationPhase::Starting
        );
        assert_eq!(
            app_phase(&[st(VmPhase::Pending)], true),
            ApplicationPhase::Pending
        );
        assert_eq!(
            app_phase(&[st(VmPhase::Running)], false),
            ApplicationPhase::Failed
        );
        assert_eq!(
            app_phase(&[st(VmPhase::Migrating), st(VmPhase::Running)], true),
            ApplicationPhase::Migrating
        );
    }
}

/// Fields of a VM that a running VM takes without a restart (they steer the operator
/// and the scheduler, not QEMU).
const LIVE_FIELDS: [&str; 6] = [
    "dependsOn",
    // Only read before a start.
    "startDelaySeconds",
    "runStrategy",
    "evictionStrategy",
    "placement",
    "shutdownGraceSeconds",
];

/// How a running VM takes a change of its declared spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecChange {
    /// Same as running.
    None,
    /// Applied without touching the guest: these fields.
    Live(Vec<String>),
    /// Needs a new QEMU (graceful restart): these fields.
    Restart(Vec<String>),
}

/// Compares the VM a pod runs with the VM now declared (pure).
pub fn classify_change(
    running: &hvx_api::VirtualMachine,
    desired: &hvx_api::VirtualMachine,
) -> SpecChange {
    let (a, b) = (
        serde_json::to_value(running).unwrap_or_default(),
        serde_json::to_value(desired).unwrap_or_default(),
    );
    let empty = serde_json::Map::new();
    let (a, b) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    if changed.is_empty() {
        return SpecChange::None;
    }
    let restart: Vec<String> = changed
        .iter()
        .filter(|k| !LIVE_FIELDS.contains(&k.as_str()))
        .cloned()
        .collect();
    if restart.is_empty() {
        SpecChange::Live(changed)
    } else {
        SpecChange::Restart(restart)
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;

    fn vm() -> hvx_api::VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "name": "web", "cpu": {"sockets": 1, "coresPerSocket": 2}, "memoryMib": 512,
            "disks": [], "nics": []
        }))
        .expect("vm")
    }

    #[test]
    fn machine_changes_restart_and_steering_changes_apply_live() {
        assert_eq!(classify_change(&vm(), &vm()), SpecChange::None);
        let mut more = vm();
        more.memory_mib = 1024;
        more.depends_on = Some(vec!["db".into()]);
        assert_eq!(
            classify_change(&vm(), &more),
            SpecChange::Restart(vec!["memoryMib".into()])
        );
        let mut steer = vm();
        steer.depends_on = Some(vec!["db".into()]);
        steer.shutdown_grace_seconds = 5;
        steer.start_delay_seconds = Some(30);
        assert_eq!(
            classify_change(&vm(), &steer),
            SpecChange::Live(vec![
                "dependsOn".into(),
                "shutdownGraceSeconds".into(),
                "startDelaySeconds".into()
            ])
        );
    }
}
