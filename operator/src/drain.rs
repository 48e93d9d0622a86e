//! Node drain -> live migration. `kubectl drain` cordons the node, then evicts its
//! pods; a VM's launcher pod is covered by a PodDisruptionBudget that allows no
//! eviction (see `build::disruption_budget`), so the drain retries while this
//! controller, seeing the node cordoned, creates one VmMigration per VM there
//! (evictionStrategy LiveMigrate). When a migration completes the source pod is
//! deleted, and the drain finishes by itself. Uncordoning cancels the migrations that
//! have not started moving bytes.

use crate::context::Context;
use crate::error::Error;
use crate::migplan;
use hvx_api::EvictionStrategy;
use hvx_api::migration::{MigrationPhase, MigrationReason, VmMigration, VmMigrationSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use std::sync::Arc;
use std::time::Duration;

/// What to do for one VM pod on a cordoned node (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum DrainAction {
    /// Create a VmMigration for it.
    Migrate,
    /// A migration for it exists already.
    InProgress,
    /// Its evictionStrategy is not LiveMigrate: the drain acts on the pod itself.
    Leave,
}

/// Decides for one VM (pure).
pub fn drain_action(strategy: EvictionStrategy, has_open_migration: bool) -> DrainAction {
    match (strategy, has_open_migration) {
        (EvictionStrategy::LiveMigrate, true) => DrainAction::InProgress,
        (EvictionStrategy::LiveMigrate, false) => DrainAction::Migrate,
        _ => DrainAction::Leave,
    }
}

/// Whether uncordoning cancels this migration: a drain migration off `node` that has
/// not started copying.
pub fn cancelled_by_uncordon(m: &VmMigration, node: &str) -> bool {
    let st = m.status.clone().unwrap_or_default();
    m.spec.reason == MigrationReason::Drain
        && st.source_node.as_deref().is_none_or(|s| s == node)
        && m.labels().get("hvx.dev/drained-node").map(String::as_str) == Some(node)
        && matches!(
            st.phase,
            None | Some(
                MigrationPhase::Pending | MigrationPhase::Scheduling | MigrationPhase::TargetReady
            )
        )
}

/// Reconciles one Node.
pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = node.name_any();
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if !cordoned {
        let all_migs = ctx.stores.migrations.state();
        for m in all_migs.iter().filter(|m| cancelled_by_uncordon(m, &name)) {
            let api: Api<VmMigration> =
                Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
            tracing::info!(node = %name, migration = %m.name_any(), "node uncordoned: cancelling");
            let _ = api.delete(&m.name_any(), &DeleteParams::default()).await;
        }
        return Ok(Action::await_change());
    }
    // Whether a VM already has a migration decides whether one is created: read fresh
    // (a cache a moment behind the last pass's creation would make a second one). Only
    // cordoned nodes get here.
    let migs: Api<VmMigration> = Api::all(ctx.client.clone());
    let all_migs = migs.list(&ListParams::default()).await?.items;
    let here: Vec<Arc<Pod>> = ctx
        .stores
        .launcher_pods(None)
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str()))
        .collect();
    let mut left = 0;
    for p in here.iter().filter(|p| {
        crate::hostplan::pod_is_live(p)
            && migplan::target_of(p).is_none()
            && p.metadata.deletion_timestamp.is_none()
    }) {
        let Some(ls) = crate::hostplan::pod_launch_spec(p) else {
            continue;
        };
        let ns = p.namespace().unwrap_or_default();
        left += 1;
        let open = all_migs.iter().any(|m| {
            m.namespace().as_deref() == Some(ns.as_str())
                && m.spec.application == ls.application
                && m.spec.vm == ls.vm.name
                && !migplan::is_final(m.status.as_ref().and_then(|s| s.phase))
        });
        // After a failed attempt, wait a minute before the next (not a hot loop).
        let failed_recently = all_migs.iter().any(|m| {
            m.namespace().as_deref() == Some(ns.as_str())
                && m.spec.application == ls.application
                && m.spec.vm == ls.vm.name
                && m.status.as_ref().and_then(|s| s.phase) == Some(MigrationPhase::Failed)
                && m.creation_timestamp().is_some_and(|t| {
                    k8s_openapi::jiff::Timestamp::now()
                        .duration_since(t.0)
                        .as_secs()
                        < 60
                })
        });
        if failed_recently || drain_action(ls.vm.eviction_strategy, open) != DrainAction::Migrate {
            continue;
        }
        let mut mig = VmMigration::new(
            "",
            VmMigrationSpec {
                application: ls.application.clone(),
                vm: ls.vm.name.clone(),
                target_node: None,
                reason: MigrationReason::Drain,
                max_downtime_ms: 300,
                // Pre-copy with auto-converge: a node failure mid-drain never costs a VM.
                allow_post_copy: false,
                bandwidth_mib_per_second: 0,
            },
        );
        mig.metadata.name = None;
        mig.metadata.generate_name = Some(format!(
            "{}-",
            migplan::target_pod_name(&ls.application, &ls.vm.name, "drain")
        ));
        mig.metadata.labels = Some(
            [("hvx.dev/drained-node".to_string(), name.clone())]
                .into_iter()
                .collect(),
        );
        let api: Api<VmMigration> = Api::namespaced(ctx.client.clone(), &ns);
        match api.create(&PostParams::default(), &mig).await {
            Ok(m) => {
                tracing::info!(node = %name, migration = %m.name_any(), vm = %ls.vm.name, "node drained: migrating")
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "creating drain migration"),
        }
    }
    Ok(if left > 0 {
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_migrate_vms_get_a_migration_once() {
        assert_eq!(
            drain_action(EvictionStrategy::LiveMigrate, false),
            DrainAction::Migrate
        );
        assert_eq!(
            drain_action(EvictionStrategy::LiveMigrate, true),
            DrainAction::InProgress
        );
        assert_eq!(
            drain_action(EvictionStrategy::Shutdown, false),
            DrainAction::Leave
        );
        assert_eq!(
            drain_action(EvictionStrategy::None, false),
            DrainAction::Leave
        );
    }

    #[test]
    fn uncordon_cancels_only_unstarted_drain_migrations_off_that_node() {
        let mk = |reason: MigrationReason, node: &str, phase: Option<MigrationPhase>| {
            let mut m: VmMigration = serde_json::from_value(serde_json::json!({
                "apiVersion": "hvx.dev/v1alpha1", "kind": "VmMigration",
                "metadata": {"name": "m", "labels": {"hvx.dev/drained-node": node}},
                "spec": {"application": "shop", "vm": "web", "reason": reason},
            }))
            .expect("migration");
            m.status = Some(hvx_api::migration::VmMigrationStatus {
                phase,
                source_node: Some(node.into()),
                ..Default::default()
            });
            m
        };
        assert!(cancelled_by_uncordon(
            &mk(MigrationReason::Drain, "n1", None),
            "n1"
        ));
        assert!(cancelled_by_uncordon(
            &mk(
                MigrationReason::Drain,
                "n1",
                Some(MigrationPhase::Scheduling)
            ),
            "n1"
        ));
        assert!(!cancelled_by_uncordon(
            &mk(MigrationReason::Drain, "n1", Some(MigrationPhase::PreCopy)),
            "n1"
        ));
        assert!(!cancelled_by_uncordon(
            &mk(MigrationReason::Drain, "n2", None),
            "n1"
        ));
        assert!(!cancelled_by_uncordon(
            &mk(MigrationReason::User, "n1", None),
            "n1"
        ));
    }
}
