//! `VmMigration`: one live migration of one VM.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Moves one running VM to another node without stopping it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "hvx.dev",
    version = "v1alpha1",
    kind = "VmMigration",
    namespaced,
    status = "VmMigrationStatus",
    shortname = "vmmig",
    category = "hvx",
    printcolumn = r#"{"name":"App","type":"string","jsonPath":".spec.application"}"#,
    printcolumn = r#"{"name":"VM","type":"string","jsonPath":".spec.vm"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.sourceNode"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetNode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Downtime(ms)","type":"integer","jsonPath":".status.downtimeMs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a VmMigration's spec is immutable; create a new one"}
]))]
pub struct VmMigrationSpec {
    /// The VmApplication.
    #[schemars(length(min = 1, max = 253))]
    pub application: String,
    /// The VM in it.
    #[schemars(length(min = 1, max = 50))]
    pub vm: String,
    /// Target node; omitted, the operator picks a capable node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Why: `Drain` (created by the operator for an eviction) or `User`.
    #[serde(default)]
    pub reason: MigrationReason,
    /// Longest acceptable pause at switchover, in milliseconds.
    #[serde(default = "default_downtime")]
    #[schemars(range(min = 10, max = 60000))]
    pub max_downtime_ms: u32,
    /// Allow post-copy when pre-copy has not converged after a few passes (guests
    /// dirtying memory faster than the link): the migration then ends in bounded time,
    /// but while the last pages move the guest needs both nodes, and losing either
    /// loses the VM. Used only between nodes labelled `hvx.dev/post-copy=true`.
    /// Off by default (drains too): pre-copy with auto-converge always ends, by
    /// throttling the guest.
    #[serde(default)]
    pub allow_post_copy: bool,
    /// Bandwidth cap in MiB/s (0: unlimited).
    #[serde(default)]
    pub bandwidth_mib_per_second: u32,
}

fn default_downtime() -> u32 {
    300
}

/// Why a migration was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationReason {
    /// Requested by a user.
    #[default]
    User,
    /// Created because the source node is being drained.
    Drain,
}

/// Migration phases, in order; `Failed` and `Cancelled` can follow any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationPhase {
    /// Accepted, waiting for a slot (parallel migration limits).
    Pending,
    /// Target pod being scheduled and started.
    Scheduling,
    /// Target VMM listening.
    TargetReady,
    /// Copying the top disk overlay to the target.
    MirroringDisks,
    /// Copying memory while the guest runs.
    PreCopy,
    /// Guest running on the target, memory pulled on demand.
    PostCopy,
    /// Guest paused, last state moving, network re-pointed.
    Switchover,
    /// Running on the target; source cleaned.
    Completed,
    /// Rolled back: the VM still runs on the source.
    Failed,
    /// Cancelled (uncordon or deletion): the VM still runs on the source.
    Cancelled,
}

impl MigrationPhase {
    /// Whether nothing follows this phase.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }

    /// Whether a migration in `self` may go to `next` (staying is always allowed).
    /// Phases only move forward; a final phase is final; once the guest runs on the
    /// target with its memory pulled on demand (post-copy), nothing can cancel it
    /// any more (the source no longer has the whole guest).
    pub fn can_go_to(self, next: MigrationPhase) -> bool {
        use MigrationPhase::*;
        if self == next {
            return true;
        }
        match self {
            Completed | Failed | Cancelled => false,
            Pending => matches!(next, Scheduling | Failed | Cancelled),
            Scheduling => matches!(next, TargetReady | Failed | Cancelled),
            TargetReady => matches!(
                next,
                MirroringDisks | PreCopy | Switchover | Completed | Failed | Cancelled
            ),
            MirroringDisks => matches!(next, PreCopy | Switchover | Completed | Failed | Cancelled),
            // The source agent reports mirroring and pre-copy as it polls them; the
            // disk mirror and the first memory pass overlap, so either may come first.
            PreCopy => matches!(
                next,
                MirroringDisks | PostCopy | Switchover | Completed | Failed | Cancelled
            ),
            // QEMU may report the switchover before or after post-copy starts.
            Switchover => matches!(next, PostCopy | Completed | Failed | Cancelled),
            PostCopy => matches!(next, Switchover | Completed | Failed),
        }
    }
}

/// Checks a migration's move from `from` (`None`: no phase yet) to `to`.
pub fn migration_transition(
    from: Option<MigrationPhase>,
    to: MigrationPhase,
) -> Result<(), IllegalTransition> {
    let legal = match from {
        // A new migration that finds a free slot right away goes straight to Scheduling.
        None => matches!(
            to,
            MigrationPhase::Pending
                | MigrationPhase::Scheduling
                | MigrationPhase::Failed
                | MigrationPhase::Cancelled
        ),
        Some(from) => from.can_go_to(to),
    };
    if legal {
        Ok(())
    } else {
        Err(IllegalTransition {
            from: from.map_or_else(|| "none".to_string(), |p| format!("{p:?}")),
            to: format!("{to:?}"),
        })
    }
}

/// A phase change the state machine refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("illegal phase change {from} -> {to}")]
pub struct IllegalTransition {
    /// The phase it was in.
    pub from: String,
    /// The phase asked for.
    pub to: String,
}

/// Observed state of a migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmMigrationStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Node the VM left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// Node the VM goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// When each phase started.
    #[serde(default)]
    pub phase_timestamps: Vec<PhaseTimestamp>,
    /// Guest pause at switchover, measured by the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Total duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// Memory bytes sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Disk bytes sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Guest dirty rate at the last sample, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate: Option<u64>,
    /// Whether it ended in post-copy (the guest ran on the target while the last
    /// memory pages followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy: Option<bool>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Ready (completed), Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// When a phase started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTimestamp {
    /// Phase.
    pub phase: MigrationPhase,
    /// Start time.
    pub time: Time,
}

#[cfg(test)]
mod tests {
    use super::MigrationPhase::*;
    use super::*;

    const ALL: [MigrationPhase; 10] = [
        Pending,
        Scheduling,
        TargetReady,
        MirroringDisks,
        PreCopy,
        PostCopy,
        Switchover,
        Completed,
        Failed,
        Cancelled,
    ];

    #[test]
    fn the_path_a_migration_takes_is_legal() {
        let path = [
            Pending,
            Scheduling,
            TargetReady,
            MirroringDisks,
            PreCopy,
            Switchover,
            Completed,
        ];
        assert!(migration_transition(None, Pending).is_ok());
        // A free slot at the first pass (the drain e2e's path).
        assert!(migration_transition(None, Scheduling).is_ok());
        assert!(
            PreCopy.can_go_to(MirroringDisks),
            "mirror and pre-copy overlap"
        );
        for w in path.windows(2) {
            assert!(migration_transition(Some(w[0]), w[1]).is_ok(), "{w:?}");
        }
        for p in [PreCopy, Switchover] {
            assert!(p.can_go_to(PostCopy), "{p:?} -> PostCopy");
        }
    }

    #[test]
    fn final_phases_stay_and_nothing_goes_back() {
        for from in [Completed, Failed, Cancelled] {
            for to in ALL.iter().copied().filter(|t| *t != from) {
                let err = migration_transition(Some(from), to).expect_err("final");
                assert_eq!(err.from, format!("{from:?}"));
            }
        }
        // Backwards.
        assert!(!PreCopy.can_go_to(Scheduling));
        assert!(!TargetReady.can_go_to(Pending));
        assert!(!Switchover.can_go_to(PreCopy));
        // Completion needs a running target; a new migration starts Pending.
        assert!(!Pending.can_go_to(Completed));
        assert!(migration_transition(None, PreCopy).is_err());
        // No way back to the source once its memory is on the target.
        assert!(!PostCopy.can_go_to(Cancelled));
        // Any live phase may fail.
        for from in ALL.iter().copied().filter(|p| !p.is_final()) {
            assert!(from.can_go_to(Failed), "{from:?} -> Failed");
        }
    }
}
