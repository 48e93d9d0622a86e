//! Pure decisions of live migration: which pod is a VM's, where it may go, whether a
//! slot is free, and how agent progress maps to VmMigration phases.

use crate::build::{LABEL_APP, LABEL_VM};
use crate::pods::pod_is_live;
use hvx_api::migration::MigrationPhase;
use hvx_proto::v1::migration_progress::Phase;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Label on the launcher pod a migration is moving a VM into (value: the VmMigration
/// name). The VmApplication controller leaves such pods alone; the migration removes
/// the label when the VM runs there.
pub use hvx_api::labels::LABEL_MIGRATION_TARGET;

/// Is a migration in this phase moving bytes or holding a target?
pub fn is_active(phase: Option<MigrationPhase>) -> bool {
    matches!(
        phase,
        Some(
            MigrationPhase::Scheduling
                | MigrationPhase::TargetReady
                | MigrationPhase::MirroringDisks
                | MigrationPhase::PreCopy
                | MigrationPhase::PostCopy
                | MigrationPhase::Switchover
        )
    )
}

/// Is this phase final?
pub fn is_final(phase: Option<MigrationPhase>) -> bool {
    matches!(
        phase,
        Some(MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled)
    )
}

pub use crate::pods::target_of;

/// A VM's pods, split.
#[derive(Debug, Default)]
pub struct VmPods<'a> {
    /// The pod that runs (or last ran) the VM.
    pub active: Option<&'a Pod>,
    /// A migration target pod, while a migration runs.
    pub target: Option<&'a Pod>,
}

/// Picks a VM's active and target pods from all pods of its application. Of several
/// non-target pods (a migrated source not yet deleted, say) the live one wins, then the
/// newest.
pub fn vm_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>, vm: &str) -> VmPods<'a> {
    let mut out = VmPods::default();
    for p in pods {
        if p.labels().get(LABEL_VM).map(String::as_str) != Some(vm) {
            continue;
        }
        if target_of(p).is_some() {
            out.target = Some(p);
            continue;
        }
        let better = match out.active {
            None => true,
            Some(cur) => {
                (pod_is_live(p), p.creation_timestamp())
                    > (pod_is_live(cur), cur.creation_timestamp())
            }
        };
        if better {
            out.active = Some(p);
        }
    }
    out
}

/// Groups pods by VM name.
pub fn by_vm(pods: &[Pod]) -> BTreeMap<String, Vec<&Pod>> {
    let mut m: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for p in pods {
        if let Some(vm) = p.labels().get(LABEL_VM) {
            m.entry(vm.clone()).or_default().push(p);
        }
    }
    m
}

/// A candidate target node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// Cordoned (spec.unschedulable).
    pub unschedulable: bool,
    /// `hvx.dev/accelerator` label.
    pub accelerator: Option<String>,
    /// Launcher pods bound there.
    pub vm_pods: usize,
}

/// Where a VM on `source` may go: another node with a ready agent (every node given
/// has one), schedulable, with the same accelerator (guest CPU model and state must
/// match); the least loaded first, ties by name.
pub fn choose_target(source: &NodeInfo, nodes: &[NodeInfo]) -> Option<String> {
    nodes
        .iter()
        .filter(|n| n.name != source.name && !n.unschedulable)
        .filter(|n| n.accelerator == source.accelerator)
        .min_by(|a, b| (a.vm_pods, &a.name).cmp(&(b.vm_pods, &b.name)))
        .map(|n| n.name.clone())
}

/// Where the source sends the VM: the target launcher pod's own IP, as its QEMU
/// listens in the pod's network namespace (not the node's). None until the kubelet
/// reported it.
pub fn target_address(target: &Pod) -> Option<String> {
    target
        .status
        .as_ref()?
        .pod_ip
        .clone()
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
}

/// Whether a migration that allows post-copy may use it, given the two nodes'
/// `hvx.dev/post-copy` labels: only between nodes whose agents found that their QEMU
/// takes it (a target that cannot would fail the switch after the guest left the
/// source).
pub fn post_copy_usable(source_label: Option<&str>, target_label: Option<&str>) -> bool {
    source_label == Some("true") && target_label == Some("true")
}

/// Whether one more migration from `source` fits the limits, given the sources of the
/// migrations running now.
pub fn slot_free(source: &str, running_sources: &[String], per_node: usize, total: usize) -> bool {
    running_sources.len() < total
        && running_sources.iter().filter(|s| *s == source).count() < per_node
}

/// The VmMigration phase for an agent progress phase.
pub fn phase_of(p: Phase) -> Option<MigrationPhase> {
    Some(match p {
        Phase::MirroringDisks => MigrationPhase::MirroringDisks,
        Phase::PreCopy => MigrationPhase::PreCopy,
        Phase::PostCopy => MigrationPhase::PostCopy,
        Phase::Switchover => MigrationPhase::Switchover,
        Phase::Completed => MigrationPhase::Completed,
        Phase::Failed => MigrationPhase::Failed,
        Phase::Unspecified => return None,
    })
}

pub use hvx_api::launch::target_pod_name;

/// What the source agent answered when asked to stop a migration (CancelMigration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceAnswer {
    /// Stopped before completing: the VM runs on the source.
    RolledBack,
    /// QEMU had reported it completed: the source copy stays paused for good.
    Completed,
    /// In post-copy: the guest runs on the target; it finishes on its own.
    PostCopy,
    /// The agent has no source record of it (never started there, or an agent
    /// without records).
    NotStarted,
    /// No answer (agent down, QEMU not answering): nothing is known.
    Unreachable,
}

impl SourceAnswer {
    /// From the CancelMigration response (or its failure).
    pub fn of(answer: Option<hvx_proto::v1::cancel_migration_response::Outcome>) -> Self {
        use hvx_proto::v1::cancel_migration_response::Outcome;
        match answer {
            Some(Outcome::RolledBack) => Self::RolledBack,
            Some(Outcome::Completed) => Self::Completed,
            Some(Outcome::PostCopy) => Self::PostCopy,
            Some(Outcome::Unspecified) => Self::NotStarted,
            None => Self::Unreachable,
        }
    }
}

/// Which copy is the VM once a migration must end early (a failure, a deletion, a
/// restart of an agent or of the operator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The target runs the VM: finish the migration (promote the target pod, remove
    /// the source's), never roll back.
    TargetWins,
    /// The source runs the VM: remove the target.
    SourceWins,
    /// Not decidable yet: touch neither copy, ask again.
    Wait,
}

/// The decision table (docs/architecture.md, "Live migration: who keeps the VM"):
/// once completion was reported, by the status or by the source, the source is
/// never resumed; while the source cannot be asked about a migration that may have
/// moved bytes, neither copy is touched.
pub fn resolve(
    phase: Option<MigrationPhase>,
    source: SourceAnswer,
    target_runs_vm: bool,
) -> Resolution {
    use MigrationPhase as P;
    match (phase, source) {
        (Some(P::Completed), _) | (_, SourceAnswer::Completed) => Resolution::TargetWins,
        (_, SourceAnswer::PostCopy) => Resolution::Wait,
        (_, SourceAnswer::RolledBack) => Resolution::SourceWins,
        // StartMigration is sent only after TargetReady is written: nothing moved.
        (None | Some(P::Pending | P::Scheduling), _) => Resolution::SourceWins,
        // Ended already (decided when it entered the phase): only the target is left
        // to clean up.
        (Some(P::Failed | P::Cancelled), _) => Resolution::SourceWins,
        // The source has no record: it never started there (TargetReady, the operator
        // died before StartMigration), or its node lost /run (rebooted: its QEMU is
        // gone too). Whatever runs is the VM.
        (_, SourceAnswer::NotStarted) if target_runs_vm => Resolution::TargetWins,
        (_, SourceAnswer::NotStarted) => Resolution::SourceWins,
        (_, SourceAnswer::Unreachable) => Resolution::Wait,
    }
}

/// Label selector of one VM's pods.
pub fn vm_selector(app: &str, vm: &str) -> String {
    format!("{LABEL_APP}={app},{LABEL_VM}={vm}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_sends_to_the_target_pods_ip() {
        let mut pod = Pod::default();
        assert_eq!(target_address(&pod), None);
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some(String::new()),
            ..Default::default()
        });
        assert_eq!(target_address(&pod), None, "not set yet");
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.244.1.7".into()),
            ..Default::default()
        });
        assert_eq!(target_address(&pod).as_deref(), Some("10.244.1.7"));
    }
    use serde_json::json;

    #[test]
    fn a_migration_qemu_completed_is_never_rolled_back() {
        use MigrationPhase as P;
        use SourceAnswer as A;
        let all = [
            None,
            Some(P::Pending),
            Some(P::Scheduling),
            Some(P::TargetReady),
            Some(P::MirroringDisks),
            Some(P::PreCopy),
            Some(P::Switchover),
            Some(P::PostCopy),
            Some(P::Completed),
            Some(P::Failed),
            Some(P::Cancelled),
        ];
        for phase in all {
            for runs in [false, true] {
                // The source saw completion: whatever the status says, the target wins.
                assert_eq!(resolve(phase, A::Completed, runs), Resolution::TargetWins);
                // Post-copy finishes on its own.
                let post = resolve(phase, A::PostCopy, runs);
                if phase == Some(P::Completed) {
                    assert_eq!(post, Resolution::TargetWins);
                } else {
                    assert_eq!(post, Resolution::Wait, "{phase:?}");
                }
            }
            // A completed status never rolls back, whatever the source answers.
            if phase == Some(P::Completed) {
                for a in [A::RolledBack, A::NotStarted, A::Unreachable] {
                    assert_eq!(resolve(phase, a, false), Resolution::TargetWins);
                }
            }
        }
        // Rolled back: the source keeps it.
        assert_eq!(
            resolve(Some(P::Switchover), A::RolledBack, false),
            Resolution::SourceWins
        );
        // The source agent is down mid-transfer: neither copy is touched.
        for phase in [
            P::TargetReady,
            P::MirroringDisks,
            P::PreCopy,
            P::Switchover,
            P::PostCopy,
        ] {
            assert_eq!(resolve(Some(phase), A::Unreachable, true), Resolution::Wait);
            assert_eq!(
                resolve(Some(phase), A::Unreachable, false),
                Resolution::Wait
            );
            assert_eq!(
                resolve(Some(phase), A::NotStarted, true),
                Resolution::TargetWins
            );
            assert_eq!(
                resolve(Some(phase), A::NotStarted, false),
                Resolution::SourceWins
            );
        }
        // Before StartMigration nothing moved.
        assert_eq!(
            resolve(Some(P::Scheduling), A::Unreachable, false),
            Resolution::SourceWins
        );
        assert_eq!(
            resolve(Some(P::Failed), A::Unreachable, false),
            Resolution::SourceWins
        );
    }

    #[test]
    fn cancel_answers_map_to_source_answers() {
        use hvx_proto::v1::cancel_migration_response::Outcome;
        assert_eq!(
            SourceAnswer::of(Some(Outcome::Completed)),
            SourceAnswer::Completed
        );
        assert_eq!(
            SourceAnswer::of(Some(Outcome::RolledBack)),
            SourceAnswer::RolledBack
        );
        assert_eq!(
            SourceAnswer::of(Some(Outcome::PostCopy)),
            SourceAnswer::PostCopy
        );
        assert_eq!(
            SourceAnswer::of(Some(Outcome::Unspecified)),
            SourceAnswer::NotStarted
        );
        assert_eq!(SourceAnswer::of(None), SourceAnswer::Unreachable);
    }

    #[test]
    fn post_copy_needs_both_nodes_labelled() {
        assert!(post_copy_usable(Some("true"), Some("true")));
        assert!(!post_copy_usable(Some("true"), Some("false")));
        assert!(!post_copy_usable(None, Some("true")));
        assert!(!post_copy_usable(Some("yes"), Some("true")));
    }

    fn pod(name: &str, vm: &str, target: Option<&str>, phase: &str, created: &str) -> Pod {
        let mut labels = json!({LABEL_VM: vm});
        if let Some(t) = target {
            labels[LABEL_MIGRATION_TARGET] = json!(t);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels, "creationTimestamp": created},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": phase}
        }))
        .expect("pod")
    }

    #[test]
    fn active_pod_prefers_live_then_newest_and_targets_are_apart() {
        let old_done = pod("a", "web", None, "Succeeded", "2026-01-01T00:00:00Z");
        let live = pod("b", "web", None, "Running", "2025-01-01T00:00:00Z");
        let target = pod("c", "web", Some("m1"), "Running", "2026-02-01T00:00:00Z");
        let other = pod("d", "db", None, "Running", "2026-03-01T00:00:00Z");
        let pods = [old_done, live, target, other];
        let p = vm_pods(&pods, "web");
        assert_eq!(p.active.map(|p| p.name_any()), Some("b".into()));
        assert_eq!(p.target.map(|p| p.name_any()), Some("c".into()));
        assert!(vm_pods(&pods, "cache").active.is_none());
    }

    fn node(name: &str, cordoned: bool, accel: &str, pods: usize) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            unschedulable: cordoned,
            accelerator: Some(accel.into()),
            vm_pods: pods,
        }
    }

    #[test]
    fn target_is_another_schedulable_node_with_the_same_accelerator() {
        let src = node("n1", true, "tcg", 2);
        let nodes = [
            src.clone(),
            node("n2", false, "kvm", 0),
            node("n3", true, "tcg", 0),
            node("n4", false, "tcg", 3),
            node("n5", false, "tcg", 1),
        ];
        assert_eq!(choose_target(&src, &nodes), Some("n5".into()));
        assert_eq!(choose_target(&src, &nodes[..3]), None);
    }

    #[test]
    fn limits_per_node_and_cluster() {
        let running = vec!["n1".to_string(), "n2".to_string()];
        assert!(!slot_free("n1", &running, 1, 4));
        assert!(slot_free("n3", &running, 1, 4));
        assert!(!slot_free("n3", &running, 1, 2));
    }

    #[test]
    fn target_pod_names_are_valid_and_distinct() {
        let a = target_pod_name("shop", "web", "1234abcd-0000");
        assert_eq!(a, "shop-web-1234ab");
        let long = target_pod_name(&"x".repeat(60), "web", "99887766");
        assert!(long.len() <= 63 && long.ends_with("-998877"), "{long}");
        assert_eq!(phase_of(Phase::Completed), Some(MigrationPhase::Completed));
        assert!(is_active(Some(MigrationPhase::PreCopy)) && !is_active(None));
        assert!(is_final(Some(MigrationPhase::Cancelled)));
    }
}
