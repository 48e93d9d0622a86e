//! `startDelaySeconds`: a VM whose dependencies run waits that long after the last of
//! them started (a VMware vApp's start delay). Pure, so it is tested without a cluster.

use hvx_api::{VirtualMachine, VmApplicationStatus, VmPhase};
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;

/// Seconds `vm` must still wait although its dependencies run; `None` when it may
/// start. A dependency's start is its status's last transition while it was Running
/// in the previous pass; one that turned Running in this pass started `now`.
pub fn wait_left(
    vm: &VirtualMachine,
    phases: &BTreeMap<String, VmPhase>,
    previous: &VmApplicationStatus,
    now: Timestamp,
) -> Option<u64> {
    let delay = i64::from(vm.start_delay_seconds.filter(|d| *d > 0)?);
    let mut latest = None;
    for dep in vm.depends_on.iter().flatten() {
        if phases.get(dep) != Some(&VmPhase::Running) {
            return None;
        }
        let since = previous
            .vms
            .iter()
            .find(|v| &v.name == dep && v.phase == VmPhase::Running)
            .and_then(|v| v.last_transition_time.as_ref())
            .map_or(now, |t| t.0);
        latest = Some(latest.map_or(since, |l: Timestamp| l.max(since)));
    }
    let elapsed = now.as_second() - latest?.as_second();
    u64::try_from(delay - elapsed).ok().filter(|left| *left > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvx_api::VmStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn vm(delay: Option<u32>) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "name": "web", "cpu": {"sockets": 1, "coresPerSocket": 1}, "memoryMib": 64,
            "dependsOn": ["db"], "startDelaySeconds": delay,
        }))
        .expect("vm")
    }

    fn status(phase: VmPhase, since: Option<Timestamp>) -> VmApplicationStatus {
        let mut db: VmStatus =
            serde_json::from_value(serde_json::json!({"name": "db", "phase": "Running"}))
                .expect("status");
        db.phase = phase;
        db.last_transition_time = since.map(Time);
        VmApplicationStatus {
            vms: vec![db],
            ..VmApplicationStatus::default()
        }
    }

    #[test]
    fn waits_the_delay_after_the_dependency_started() {
        let now = Timestamp::from_second(10_000).expect("ts");
        let running = BTreeMap::from([("db".to_string(), VmPhase::Running)]);
        let started = |ago: i64| Some(Timestamp::from_second(10_000 - ago).expect("ts"));
        let prev = status(VmPhase::Running, started(30));
        assert_eq!(wait_left(&vm(Some(120)), &running, &prev, now), Some(90));
        let prev = status(VmPhase::Running, started(200));
        assert_eq!(wait_left(&vm(Some(120)), &running, &prev, now), None);
        // Turned Running in this pass: the whole delay is left.
        let prev = status(VmPhase::Starting, started(500));
        assert_eq!(wait_left(&vm(Some(120)), &running, &prev, now), Some(120));
        // No delay, or dependencies not running: nothing to wait for here.
        assert_eq!(wait_left(&vm(None), &running, &prev, now), None);
        let starting = BTreeMap::from([("db".to_string(), VmPhase::Starting)]);
        assert_eq!(wait_left(&vm(Some(120)), &starting, &prev, now), None);
    }
}
