//! VmMigration controller: moves one running VM to another node.
//!
//! Phases are the state machine, kept in status so a restarted operator resumes:
//! Pending (a slot and a target node) -> Scheduling (bases imported on the target,
//! target prepared by its agent, target launcher pod created, waiting until it
//! listens) -> TargetReady -> MirroringDisks/PreCopy/Switchover (the source agent
//! drives QEMU; its progress lands here) -> Completed (target pod promoted, source pod
//! and overlays removed, every node's FDB re-pointed). Any failure before the
//! switchover leaves the VM running on the source: Failed, target removed.
//!
//! The TLS key of a migration lives only in this process's memory and on the two
//! nodes: an operator that restarts before the transfer makes a new one (the target
//! re-reads its key file at each handshake).

use crate::build;
use crate::context::Context;
use crate::context::FollowedMigration;
use crate::error::Error;
use crate::finalize::Cleanup;
use crate::hostprep::{self, BasesState};
use crate::migplan::{self, LABEL_MIGRATION_TARGET, NodeInfo};
use hvx_api::launch::IncomingMigration;
use hvx_api::migration::{MigrationPhase, PhaseTimestamp, VmMigration, VmMigrationStatus};
use hvx_api::{VmApplication, condition, new_condition, set_condition};
use hvx_proto::v1 as pb;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Reconciles one VmMigration.
pub async fn reconcile(mig: Arc<VmMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = mig.namespace().unwrap_or_default();
    let api: Api<VmMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let ctx = &ctx;
    crate::finalize::reconcile(
        &api,
        mig,
        crate::finalize::FirstApply::AfterFinalizer,
        |m| async move { apply(&m, ctx).await },
        |m| async move {
            {
                let phase = m.status.as_ref().and_then(|s| s.phase);
                if phase != Some(MigrationPhase::Completed) {
                    // Deleting a migration in flight cancels it: the VM stays put,
                    // unless QEMU completed it first (then the target is the VM).
                    match end_early(&m, ctx).await? {
                        migplan::Resolution::SourceWins => {}
                        migplan::Resolution::TargetWins => {
                            let t = Target {
                                mig: &m,
                                ns: m.namespace().unwrap_or_default(),
                                status: m.status.clone().unwrap_or_default(),
                            };
                            if !finish(&t, ctx).await? {
                                return Ok(Cleanup::Waiting {
                                    reason: "the migration completed before the cancel: promoting the target".into(),
                                    retry: Duration::from_secs(3),
                                });
                            }
                        }
                        migplan::Resolution::Wait => {
                            return Ok(Cleanup::Waiting {
                                reason: "the source agent cannot say whether the migration completed".into(),
                                retry: Duration::from_secs(5),
                            });
                        }
                    }
                } else if let Some(node) = m.status.as_ref().and_then(|s| s.target_node.clone()) {
                    // Deleted right after completing, before `finish` got to it.
                    let cluster = hostprep::cluster(ctx).await?;
                    drop_target_record(ctx, &cluster, &node, &m.uid().unwrap_or_default()).await;
                }
                Ok(Cleanup::Done)
            }
        },
    )
    .await
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

struct Target<'a> {
    mig: &'a VmMigration,
    ns: String,
    status: VmMigrationStatus,
}

impl Target<'_> {
    fn name(&self) -> String {
        self.mig.name_any()
    }
    fn uid(&self) -> String {
        self.mig.uid().unwrap_or_default()
    }
}

async fn apply(mig: &VmMigration, ctx: &Arc<Context>) -> Result<Action, Error> {
    let t = Target {
        mig,
        ns: mig.namespace().unwrap_or_default(),
        status: mig.status.clone().unwrap_or_default(),
    };
    match t.status.phase {
        None | Some(MigrationPhase::Pending) => pending(t, ctx).await,
        Some(MigrationPhase::Scheduling) => scheduling(t, ctx).await,
        Some(
            MigrationPhase::TargetReady
            | MigrationPhase::MirroringDisks
            | MigrationPhase::PreCopy
            | MigrationPhase::PostCopy
            | MigrationPhase::Switchover,
        ) => transfer(t, ctx).await,
        Some(MigrationPhase::Completed) => Ok(if finish(&t, ctx).await? {
            Action::await_change()
        } else {
            Action::requeue(Duration::from_secs(3))
        }),
        Some(MigrationPhase::Failed | MigrationPhase::Cancelled) => {
            Ok(match end_early(mig, ctx).await? {
                migplan::Resolution::SourceWins => Action::await_change(),
                // Only a status an older operator wrote can get here; the target is
                // the VM and stays (logged by `end_early`).
                migplan::Resolution::TargetWins | migplan::Resolution::Wait => {
                    Action::requeue(Duration::from_secs(30))
                }
            })
        }
    }
}

async fn app_and_pods(
    ctx: &Context,
    ns: &str,
    app: &str,
) -> Result<Option<(VmApplication, Vec<Pod>)>, Error> {
    let Some(app_obj) = ctx.stores.app(ns, app) else {
        return Ok(None);
    };
    let list = ctx
        .stores
        .pods_of_app(ns, app)
        .into_iter()
        .map(|p| (*p).clone())
        .collect();
    Ok(Some(((*app_obj).clone(), list)))
}

/// Writes status (merge patch: only the fields given change).
async fn patch_status(
    ctx: &Context,
    t: &Target<'_>,
    status: &VmMigrationStatus,
) -> Result<(), Error> {
    let api: Api<VmMigration> = Api::namespaced(ctx.client.clone(), &t.ns);
    api.patch_status(
        &t.name(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": status})),
    )
    .await?;
    Ok(())
}

/// Moves the status to `phase` if the state machine allows it (`hvx_api::migration`);
/// an illegal move is refused and logged, and the status keeps its phase. Returns
/// whether the status is in `phase` now.
fn enter(status: &mut VmMigrationStatus, phase: MigrationPhase, generation: Option<i64>) -> bool {
    if let Err(e) = hvx_api::migration::migration_transition(status.phase, phase) {
        tracing::warn!(error = %e, "migration phase change refused");
        return false;
    }
    if status.phase != Some(phase) {
        status.phase = Some(phase);
        status
            .phase_timestamps
            .push(PhaseTimestamp { phase, time: now() });
    }
    status.observed_generation = generation;
    let (ok, reason) = match phase {
        MigrationPhase::Completed => (true, "Completed"),
        MigrationPhase::Failed => (false, "Failed"),
        MigrationPhase::Cancelled => (false, "Cancelled"),
        _ => (false, "InProgress"),
    };
    set_condition(
        &mut status.conditions,
        new_condition(
            condition::READY,
            ok,
            reason,
            status.failure_reason.clone().unwrap_or_default(),
            generation,
            now(),
        ),
    );
    true
}

async fn publish(ctx: &Context, mig: &VmMigration, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Migrate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder().publish(&event, &mig.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing event");
    }
}

async fn fail(ctx: &Arc<Context>, t: &Target<'_>, reason: String) -> Result<Action, Error> {
    let mut status = t.status.clone();
    status.failure_reason = Some(reason.clone());
    if migplan::is_final(status.phase) {
        // Completed (or already ended): nothing to roll back; a rollback now would
        // resume the source beside the running target.
        tracing::warn!(migration = %t.name(), %reason, "not failing a migration that already ended");
        return Ok(Action::await_change());
    }
    // Bytes may have moved: the source agent rolls back first, and says whether QEMU
    // completed the migration before that (then the target is the VM).
    match end_early(t.mig, ctx).await? {
        migplan::Resolution::SourceWins => {}
        migplan::Resolution::TargetWins => return complete_anyway(ctx, t, &reason).await,
        migplan::Resolution::Wait => {
            tracing::info!(migration = %t.name(), %reason, "not failing yet: the source agent cannot say whether the migration completed");
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    }
    if !enter(&mut status, MigrationPhase::Failed, t.mig.meta().generation) {
        return Ok(Action::requeue(REFUSED_RETRY));
    }
    patch_status(ctx, t, &status).await?;
    publish(ctx, t.mig, EventType::Warning, "MigrationFailed", &reason).await;
    Ok(Action::await_change())
}

/// A failure (or cancel) that lost the race with QEMU's completion: the migration is
/// Completed and finished like any other.
async fn complete_anyway(ctx: &Arc<Context>, t: &Target<'_>, why: &str) -> Result<Action, Error> {
    let mut status = t.status.clone();
    if !enter(
        &mut status,
        MigrationPhase::Completed,
        t.mig.meta().generation,
    ) {
        return Ok(Action::requeue(REFUSED_RETRY));
    }
    patch_status(ctx, t, &status).await?;
    publish(
        ctx,
        t.mig,
        EventType::Normal,
        "Migrated",
        &format!(
            "VM {} runs on {}: QEMU completed the migration before it could be stopped ({why})",
            t.mig.spec.vm,
            status.target_node.clone().unwrap_or_default()
        ),
    )
    .await;
    forget(ctx, &t.uid());
    let done = Target {
        mig: t.mig,
        ns: t.ns.clone(),
        status,
    };
    Ok(if finish(&done, ctx).await? {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(3))
    })
}

async fn node_infos(ctx: &Context) -> Result<Vec<NodeInfo>, Error> {
    let cluster = hostprep::cluster(ctx).await?;
    let launchers = ctx.stores.launcher_pods(None);
    let mut out = Vec::new();
    for n in ctx.stores.nodes.state() {
        let name = n.name_any();
        if !cluster.node_ips.contains_key(&name) {
            continue;
        }
        out.push(NodeInfo {
            unschedulable: n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            accelerator: n.labels().get(build::NODE_LABEL_ACCELERATOR).cloned(),
            vm_pods: launchers
                .iter()
                .filter(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                })
                .count(),
            name,
        });
    }
    Ok(out)
}

async fn pending(t: Target<'_>, ctx: &Arc<Context>) -> Result<Action, Error> {
    let spec = &t.mig.spec;
    let Some((app, pods)) = app_and_pods(ctx, &t.ns, &spec.application).await? else {
        return fail(
            ctx,
            &t,
            format!("VmApplication {} does not exist", spec.application),
        )
        .await;
    };
    if !app.spec.vms.iter().any(|v| v.name == spec.vm) {
        return fail(
            ctx,
            &t,
            format!("VmApplication {} has no VM {}", spec.application, spec.vm),
        )
        .await;
    }
    let vm_pods = migplan::vm_pods(&pods, &spec.vm);
    if let Some(other) = vm_pods.target.and_then(migplan::target_of)
        && other != t.name()
    {
        return wait(
            ctx,
            t,
            format!("VM {} is being migrated by {other}", spec.vm),
        )
        .await;
    }
    let Some(source_pod) = vm_pods
        .active
        .filter(|p| crate::status::vm_phase(Some(p)).0 == hvx_api::VmPhase::Running)
    else {
        return fail(ctx, &t, format!("VM {} is not running", spec.vm)).await;
    };
    let source = source_pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    // Parallel limits.
    let running: Vec<String> = ctx
        .stores
        .migrations
        .state()
        .iter()
        .filter(|m| m.uid() != t.mig.uid())
        .filter_map(|m| m.status.as_ref())
        .filter(|s| migplan::is_active(s.phase))
        .filter_map(|s| s.source_node.clone())
        .collect();
    let limits = &ctx.config.migrations;
    if !migplan::slot_free(&source, &running, limits.per_node, limits.total) {
        return wait(
            ctx,
            t,
            format!(
                "waiting for a migration slot ({} running; limits {} per node, {} in the cluster)",
                running.len(),
                limits.per_node,
                limits.total
            ),
        )
        .await;
    }
    let nodes = node_infos(ctx).await?;
    let source_info = nodes
        .iter()
        .find(|n| n.name == source)
        .cloned()
        .unwrap_or(NodeInfo {
            name: source.clone(),
            unschedulable: false,
            accelerator: None,
            vm_pods: 0,
        });
    let target = match &spec.target_node {
        Some(n) if *n == source => {
            return fail(ctx, &t, format!("VM {} already runs on {n}", spec.vm)).await;
        }
        Some(n) => {
            let ok = nodes.iter().any(|i| {
                i.name == *n && !i.unschedulable && i.accelerator == source_info.accelerator
            });
            if !ok {
                return fail(ctx, &t, format!(
                    "node {n} cannot take VM {}: no ready agent, cordoned, or another accelerator", spec.vm
                ))
                .await;
            }
            n.clone()
        }
        None => match migplan::choose_target(&source_info, &nodes) {
            Some(n) => n,
            None => {
                return wait(
                    ctx,
                    t,
                    "no other schedulable node with a ready agent and the same accelerator".into(),
                )
                .await;
            }
        },
    };
    let mut status = t.status.clone();
    status.source_node = Some(source.clone());
    status.target_node = Some(target.clone());
    status.failure_reason = None;
    if !enter(
        &mut status,
        MigrationPhase::Scheduling,
        t.mig.meta().generation,
    ) {
        // A bug, not a state to poll in a tight loop: logged by `enter`.
        return Ok(Action::requeue(REFUSED_RETRY));
    }
    patch_status(ctx, &t, &status).await?;
    publish(
        ctx,
        t.mig,
        EventType::Normal,
        "MigrationScheduled",
        &format!("VM {} from {source} to {target}", spec.vm),
    )
    .await;
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// Stays in the current phase with a reason in the Ready condition.
async fn wait(ctx: &Context, t: Target<'_>, why: String) -> Result<Action, Error> {
    let mut status = t.status.clone();
    let phase = status.phase.unwrap_or(MigrationPhase::Pending);
    enter(&mut status, phase, t.mig.meta().generation);
    set_condition(
        &mut status.conditions,
        new_condition(
            condition::READY,
            false,
            "Waiting",
            why,
            t.mig.meta().generation,
            now(),
        ),
    );
    if status != t.status {
        patch_status(ctx, &t, &status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(5)))
}

fn psk_for(ctx: &Context, uid: &str) -> Result<Vec<u8>, Error> {
    let mut keys = ctx.migration_keys.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(key) = keys.get(uid) {
        return Ok(key.clone());
    }
    let key = random_key()?;
    keys.insert(uid.to_string(), key.clone());
    Ok(key)
}

/// 32 bytes from the kernel's CSPRNG. A failed read is an error, never a key of
/// zeros (which anyone could guess).
fn random_key() -> Result<Vec<u8>, Error> {
    read_key_from(std::path::Path::new("/dev/urandom"))
}

fn read_key_from(source: &std::path::Path) -> Result<Vec<u8>, Error> {
    let mut key = vec![0u8; 32];
    std::fs::File::open(source)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .map_err(|e| Error::Random {
            source_path: source.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(key)
}

async fn scheduling(t: Target<'_>, ctx: &Arc<Context>) -> Result<Action, Error> {
    let spec = &t.mig.spec;
    let started = t
        .status
        .phase_timestamps
        .iter()
        .rev()
        .find(|p| p.phase == MigrationPhase::Scheduling)
        .map(|p| p.time.0);
    if let Some(at) = started
        && k8s_openapi::jiff::Timestamp::now()
            .duration_since(at)
            .as_secs()
            > ctx.config.timings.migration_scheduling_timeout_seconds as i64
    {
        return fail(
            ctx,
            &t,
            format!(
                "the target did not get ready within {}s",
                ctx.config.timings.migration_scheduling_timeout_seconds
            ),
        )
        .await;
    }
    let Some((app, pods)) = app_and_pods(ctx, &t.ns, &spec.application).await? else {
        return fail(
            ctx,
            &t,
            format!("VmApplication {} is gone", spec.application),
        )
        .await;
    };
    let vm_pods = migplan::vm_pods(&pods, &spec.vm);
    let Some(source_pod) = vm_pods
        .active
        .filter(|p| crate::status::vm_phase(Some(p)).0 == hvx_api::VmPhase::Running)
    else {
        return fail(ctx, &t, format!("VM {} stopped running", spec.vm)).await;
    };
    let Some(ls) = crate::hostplan::pod_launch_spec(source_pod) else {
        return fail(ctx, &t, "the VM's pod has no launch spec".into()).await;
    };
    let target = t.status.target_node.clone().unwrap_or_default();
    let cluster = hostprep::cluster(ctx).await?;
    // The bases come from the OverlayDisk's source (same content, same digest).
    let bases = match hostprep::ensure_vm_bases(ctx, &cluster, &target, &ls).await? {
        BasesState::Ready(b) => b,
        BasesState::Waiting(why) => return wait(ctx, t, why).await,
    };
    let client = hostprep::client_for(ctx, &cluster, &target)?;
    let vm_ref = pb::VmRef {
        vm_uid: ls.vm_id.clone(),
        name: spec.vm.clone(),
    };
    if vm_pods.target.is_none() {
        let req = pb::PrepareMigrationTargetRequest {
            migration_uid: t.uid(),
            vm: Some(vm_ref.clone()),
            disks: bases
                .iter()
                .map(|b| pb::MigrationDisk {
                    disk_name: b.disk_name.clone(),
                    base_digest: b.digest.clone(),
                    virtual_bytes: b.virtual_bytes,
                    disk_uid: b.disk_uid.clone(),
                })
                .collect(),
            tls_psk: psk_for(ctx, &t.uid())?,
        };
        let ep = client.prepare_migration_target(req.clone()).await?;
        let port = |p: u32| u16::try_from(p).unwrap_or(0);
        let source = source_pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let post_copy = spec.allow_post_copy && {
            let label = |n: Option<Arc<Node>>| {
                n.and_then(|n| n.labels().get(build::NODE_LABEL_POST_COPY).cloned())
            };
            let (s, d) = (
                label(ctx.stores.node(&source)),
                label(ctx.stores.node(&target)),
            );
            migplan::post_copy_usable(s.as_deref(), d.as_deref())
        };
        let mut incoming_ls = ls.clone();
        incoming_ls.incoming = Some(IncomingMigration {
            migration: t.name(),
            host: ep.host.clone(),
            migration_port: port(ep.migration_port),
            nbd_port: port(ep.nbd_port),
            post_copy,
        });
        let mut pod = build::launcher_pod(&app, &incoming_ls, &ctx.config, Some(&target)).map_err(
            |source| Error::Serialize {
                what: "target pod",
                source,
            },
        )?;
        let name = migplan::target_pod_name(&spec.application, &spec.vm, &t.uid());
        pod.metadata.name = Some(name.clone());
        pod.labels_mut()
            .insert(LABEL_MIGRATION_TARGET.into(), t.name());
        match crate::trust::create_pod(ctx, &app.uid().unwrap_or_default(), pod).await {
            Ok(()) => {}
            // Admission said no (Pod Security, a quota, a policy): retrying cannot
            // help until the namespace changes, so the migration fails with the API
            // server's words (the VM stays on its source; the target the agent
            // prepared is removed like any failed migration's).
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 403 => {
                let why = crate::vmapp::refused_pod_reason(&name, &e.message);
                return fail(ctx, &t, format!("migration target: {why}")).await;
            }
            Err(e) => return Err(e),
        }
        // The target's tap must be on the overlay before its launcher starts QEMU.
        let nets: Vec<String> = ls.vm.nics.iter().map(|n| n.network.name.clone()).collect();
        if let Err(e) = hostprep::sync_networks(ctx, &t.ns, nets, &cluster).await {
            tracing::warn!(error = %e, "network sync for the migration target");
        }
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if vm_pods.target.is_some_and(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Failed" || ph == "Succeeded")
    }) {
        return fail(
            ctx,
            &t,
            "the target launcher pod ended before the migration".into(),
        )
        .await;
    }
    // Listening yet?
    let state = client.get_vm(vm_ref.clone()).await;
    let listening = state.is_ok_and(|s| s.phase == pb::vm_state::Phase::Migrating as i32);
    if !listening {
        return wait(ctx, t, format!("target launcher on {target} starting")).await;
    }
    let mut status = t.status.clone();
    if !enter(
        &mut status,
        MigrationPhase::TargetReady,
        t.mig.meta().generation,
    ) {
        // A bug, not a state to poll in a tight loop: logged by `enter`.
        return Ok(Action::requeue(REFUSED_RETRY));
    }
    patch_status(ctx, &t, &status).await?;
    Ok(Action::requeue(Duration::from_millis(100)))
}

async fn transfer(t: Target<'_>, ctx: &Arc<Context>) -> Result<Action, Error> {
    let uid = t.uid();
    let followed = ctx
        .migrations_followed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .cloned();
    if let Some(f) = followed {
        return report(t, ctx, f).await;
    }
    let spec = &t.mig.spec;
    let source = t.status.source_node.clone().unwrap_or_default();
    let target = t.status.target_node.clone().unwrap_or_default();
    let Some((_, pods)) = app_and_pods(ctx, &t.ns, &spec.application).await? else {
        forget(ctx, &uid);
        return fail(
            ctx,
            &t,
            format!("VmApplication {} is gone", spec.application),
        )
        .await;
    };
    let vm_pods = migplan::vm_pods(&pods, &spec.vm);
    let (Some(target_pod), Some(source_pod)) = (vm_pods.target, vm_pods.active) else {
        forget(ctx, &uid);
        if vm_pods.target.is_none() {
            // Promoted already by an earlier run of this step: done.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        return fail(ctx, &t, "the VM's source pod is gone".into()).await;
    };
    let Some(target_ls) = crate::hostplan::pod_launch_spec(target_pod) else {
        forget(ctx, &uid);
        return fail(ctx, &t, "the target pod has no launch spec".into()).await;
    };
    let Some(inc) = target_ls.incoming.clone() else {
        forget(ctx, &uid);
        return fail(ctx, &t, "the target pod is not a migration target".into()).await;
    };
    let _ = source_pod;
    // The target's QEMU listens in its pod's network namespace: the source connects
    // to the pod's IP, whatever host the target's agent reported.
    let Some(target_host) = migplan::target_address(target_pod) else {
        return wait(ctx, t, "the target launcher pod has no IP yet".into()).await;
    };
    let cluster = hostprep::cluster(ctx).await?;
    let src_client = hostprep::client_for(ctx, &cluster, &source)?;
    let dst_client = hostprep::client_for(ctx, &cluster, &target)?;
    // A key made again after an operator restart must reach the target first.
    if !ctx
        .migration_keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&uid)
        && t.status.phase == Some(MigrationPhase::TargetReady)
    {
        let req = pb::PrepareMigrationTargetRequest {
            migration_uid: uid.clone(),
            vm: Some(pb::VmRef {
                vm_uid: target_ls.vm_id.clone(),
                name: spec.vm.clone(),
            }),
            disks: Vec::new(),
            tls_psk: psk_for(ctx, &uid)?,
        };
        let c = dst_client.clone();
        if let Err(e) = c.prepare_migration_target(req).await {
            forget(ctx, &uid);
            return fail(ctx, &t, format!("re-keying the target: {}", e.message())).await;
        }
    }
    let req = pb::StartMigrationRequest {
        migration_uid: uid.clone(),
        vm: Some(pb::VmRef {
            vm_uid: target_ls.vm_id.clone(),
            name: spec.vm.clone(),
        }),
        target: Some(pb::MigrationEndpoint {
            host: target_host,
            migration_port: u32::from(inc.migration_port),
            nbd_port: u32::from(inc.nbd_port),
        }),
        max_downtime_ms: spec.max_downtime_ms,
        // The target pod says whether its QEMU was readied for post-copy.
        allow_post_copy: inc.post_copy,
        bandwidth_bytes_per_second: u64::from(spec.bandwidth_mib_per_second) << 20,
        tls_psk: psk_for(ctx, &uid)?,
        disk_names: target_ls.disks.iter().map(|d| d.name.clone()).collect(),
    };
    ctx.migrations_followed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uid, FollowedMigration::default());
    let mig = t.mig.clone();
    let ctx2 = ctx.clone();
    tokio::spawn(async move {
        follow(ctx2, mig, src_client, dst_client, req, source).await;
    });
    Ok(Action::requeue(REPORT_EVERY))
}

/// When a pass whose phase change the state machine refused looks again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// How often a migration in flight has its progress written.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Writes what the progress task heard into the status (this reconcile is the status'
/// one writer); once the migration ended, its event and metrics, and for a completed
/// one the switchover's cleanup right away (every node's FDB must point at the target
/// as soon as possible).
async fn report(t: Target<'_>, ctx: &Arc<Context>, f: FollowedMigration) -> Result<Action, Error> {
    let uid = t.uid();
    let generation = t.mig.meta().generation;
    let base = f.written.clone().unwrap_or_else(|| t.status.clone());
    let mut status = base.clone();
    if let Some(ph) = f.phase {
        enter(&mut status, ph, generation);
    }
    status.memory_bytes = Some(f.memory_bytes);
    status.disk_bytes = Some(f.disk_bytes);
    if f.ended {
        status.downtime_ms = Some(f.downtime_ms);
        status.total_ms = Some(f.total_ms);
        if status.phase == Some(MigrationPhase::Completed) {
            status.post_copy = Some(f.post_copy);
        }
        if status.phase == Some(MigrationPhase::Failed) {
            status.failure_reason = f.failure.clone();
        }
    }
    // A new phase or the end is written at once; byte counters at most every second.
    let due = f.ended
        || status.phase != base.phase
        || f.written_at.is_none_or(|at| at.elapsed() >= REPORT_EVERY);
    if due && (status != base || f.written.is_none()) {
        patch_status(ctx, &t, &status).await?;
        if let Some(entry) = ctx
            .migrations_followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&uid)
        {
            entry.written = Some(status.clone());
            entry.written_at = Some(std::time::Instant::now());
        }
    }
    if !f.ended {
        return Ok(Action::requeue(REPORT_EVERY));
    }
    forget(ctx, &uid);
    let mig = t.mig;
    let (source, target) = (
        status.source_node.clone().unwrap_or_default(),
        status.target_node.clone().unwrap_or_default(),
    );
    match status.phase {
        Some(MigrationPhase::Completed) => {
            ctx.metrics.migration(true, f.downtime_ms, f.total_ms);
            publish(ctx, mig, EventType::Normal, "Migrated", &format!(
                "VM {} now runs on {target}: {} ms total, {} ms downtime, {} MiB memory, {} KiB disk{}",
                mig.spec.vm, f.total_ms, f.downtime_ms, f.memory_bytes >> 20, f.disk_bytes >> 10,
                if f.post_copy { ", ended in post-copy" } else { "" }
            ))
            .await;
            let done = Target {
                mig,
                ns: t.ns.clone(),
                status,
            };
            if let Err(e) = finish(&done, ctx).await {
                tracing::warn!(error = %e, "finishing migration; the next reconcile retries");
            }
        }
        Some(MigrationPhase::Failed) => {
            ctx.metrics.migration(false, 0, 0);
            publish(
                ctx,
                mig,
                EventType::Warning,
                "MigrationFailed",
                &format!(
                    "VM {} stays on {source}: {}",
                    mig.spec.vm,
                    status.failure_reason.clone().unwrap_or_default()
                ),
            )
            .await;
            // The source rolled back (its record says so); the target goes.
            end_early(mig, ctx).await?;
        }
        _ => {}
    }
    Ok(Action::requeue(REPORT_EVERY))
}

fn forget(ctx: &Context, uid: &str) {
    ctx.migrations_followed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(uid);
}

/// Follows the source agent's progress stream to its end, recording what it hears in
/// `ctx.migrations_followed` and waking the reconcile, which writes the status. A
/// stream that breaks drops the record, so the next reconcile attaches again.
async fn follow(
    ctx: Arc<Context>,
    mig: VmMigration,
    src: crate::agents::AgentClient,
    dst: crate::agents::AgentClient,
    req: pb::StartMigrationRequest,
    source: String,
) {
    let uid = mig.uid().unwrap_or_default();
    let me = ObjectRef::from_obj(&mig);
    let record = |f: &dyn Fn(&mut FollowedMigration)| {
        if let Some(entry) = ctx
            .migrations_followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&uid)
        {
            f(entry);
        }
        let _ = ctx.migration_wakeups.send(me.clone());
    };
    let vm_ref = req.vm.clone().unwrap_or_default();
    match src.start_migration(req).await {
        Ok(mut s) => loop {
            match s.message().await {
                Ok(Some(p)) => {
                    let phase = pb::migration_progress::Phase::try_from(p.phase)
                        .ok()
                        .and_then(migplan::phase_of);
                    let done = migplan::is_final(phase);
                    record(&|e: &mut FollowedMigration| {
                        if phase.is_some() {
                            e.phase = phase;
                        }
                        e.memory_bytes = p.memory_bytes;
                        e.disk_bytes = p.disk_bytes;
                        if done {
                            e.downtime_ms = p.downtime_ms;
                            e.total_ms = p.total_ms;
                            e.post_copy = p.post_copy;
                            if phase == Some(MigrationPhase::Failed) {
                                e.failure = Some(p.message.clone());
                            }
                            e.ended = true;
                        }
                    });
                    if done {
                        return;
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("migration progress stream ended early; will re-attach");
                    forget(&ctx, &uid);
                    let _ = ctx.migration_wakeups.send(me.clone());
                    return;
                }
            }
        },
        Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => {
            // The source no longer runs the VM: either it completed (and the source
            // agent restarted, forgetting the result) or it is really gone.
            let there = dst.get_vm(vm_ref.clone()).await.ok().map(|r| r.phase);
            let completed = there == Some(pb::vm_state::Phase::Running as i32);
            let message = format!("source on {source}: {}", e.message());
            record(&|f: &mut FollowedMigration| {
                if completed {
                    f.phase = Some(MigrationPhase::Completed);
                } else {
                    f.phase = Some(MigrationPhase::Failed);
                    f.failure = Some(message.clone());
                }
                f.ended = true;
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "StartMigration on {source}; will retry");
            forget(&ctx, &uid);
            let _ = ctx.migration_wakeups.send(me);
        }
    }
}

/// After the switchover: the target pod becomes the VM's pod, every node learns where
/// the VM's MACs are now, and the source pod and overlays go. True once all is done.
async fn finish(t: &Target<'_>, ctx: &Arc<Context>) -> Result<bool, Error> {
    let spec = &t.mig.spec;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &t.ns);
    let mut pods = pods_api
        .list(&ListParams::default().labels(&migplan::vm_selector(&spec.application, &spec.vm)))
        .await?
        .items;
    pods.retain(|p| ctx.stores.pod_trust(p).is_ok());
    let target_node = t.status.target_node.clone().unwrap_or_default();
    let source_node = t.status.source_node.clone().unwrap_or_default();
    let mut vm_id = None;
    let mut disks = Vec::new();
    let mut nets = Vec::new();
    let mut done = true;
    for p in &pods {
        if migplan::target_of(p) == Some(t.name().as_str()) {
            crate::trust::patch_sealed(ctx, p, &[(hvx_api::seal::Sealed::MigrationTarget, None)])
                .await?;
        }
    }
    for p in &pods {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if let Some(ls) = crate::hostplan::pod_launch_spec(p) {
            vm_id = Some(ls.vm_id.clone());
            disks = ls.disks.iter().map(|d| d.name.clone()).collect();
            nets = ls
                .vm
                .nics
                .iter()
                .map(|n| n.network.name.clone())
                .collect::<Vec<_>>();
        }
        if node == source_node && migplan::target_of(p).is_none() && node != target_node {
            let _ = pods_api
                .delete(&p.name_any(), &DeleteParams::default())
                .await;
        }
    }
    let cluster = hostprep::cluster(ctx).await?;
    done &= drop_target_record(ctx, &cluster, &target_node, &t.uid()).await;
    hostprep::sync_networks(ctx, &t.ns, nets, &cluster).await?;
    if let (Some(vm_id), Ok(client)) = (vm_id, hostprep::client_for(ctx, &cluster, &source_node)) {
        for d in disks {
            let req = pb::DeleteOverlayRequest {
                vm_uid: vm_id.clone(),
                disk_name: d,
            };
            let c = client.clone();
            // Refused while the source QEMU is still exiting: the next pass retries.
            if let Err(e) = c.delete_overlay(req).await {
                tracing::info!(error = %e.message(), "source overlay stays for now");
                done = false;
            }
        }
    }
    ctx.migration_keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&t.uid());
    Ok(done)
}

/// The target agent's record of a completed migration (its ports, for a retried
/// prepare) has served: CancelMigration without a VM drops just that on a node that
/// runs the VM. False when the agent could not be told (the caller tries again).
async fn drop_target_record(
    ctx: &Context,
    cluster: &crate::hostplan::Cluster,
    node: &str,
    uid: &str,
) -> bool {
    let Ok(client) = hostprep::client_for(ctx, cluster, node) else {
        return false;
    };
    let req = pb::CancelMigrationRequest {
        migration_uid: uid.to_string(),
        vm: None,
    };
    let answer = client.cancel_migration(req.clone()).await;
    if let Err(e) = &answer {
        tracing::info!(node, error = %e, "target's migration record stays for now");
    }
    answer.is_ok()
}

/// Ends a migration that did not complete: the source agent is asked to roll back
/// (CancelMigration), and its answer, the phase and whether the target runs the VM
/// decide who keeps it (`migplan::resolve`). Only on `SourceWins` is the target
/// removed (pod, overlays, key); the caller acts on the other two.
async fn end_early(mig: &VmMigration, ctx: &Context) -> Result<migplan::Resolution, Error> {
    let ns = mig.namespace().unwrap_or_default();
    let uid = mig.uid().unwrap_or_default();
    let status = mig.status.clone().unwrap_or_default();
    let cluster = hostprep::cluster(ctx).await?;
    let vm_id_hint = ctx
        .stores
        .pods_of_app(&ns, &mig.spec.application)
        .iter()
        .filter(|p| p.labels().get(build::LABEL_VM) == Some(&mig.spec.vm))
        .find_map(|p| crate::hostplan::pod_launch_spec(p))
        .map(|ls| ls.vm_id);
    let vm_ref = vm_id_hint.clone().map(|v| pb::VmRef {
        vm_uid: v,
        name: mig.spec.vm.clone(),
    });
    let answer = match status.source_node.as_deref() {
        Some(node) => match hostprep::client_for(ctx, &cluster, node) {
            Ok(c) => {
                let req = pb::CancelMigrationRequest {
                    migration_uid: uid.clone(),
                    vm: vm_ref.clone(),
                };
                match c.cancel_migration(req).await {
                    Ok(r) => migplan::SourceAnswer::of(Some(r.outcome())),
                    Err(e) => {
                        tracing::info!(node, error = %e, "CancelMigration on the source");
                        migplan::SourceAnswer::Unreachable
                    }
                }
            }
            Err(_) => migplan::SourceAnswer::Unreachable,
        },
        None => migplan::SourceAnswer::NotStarted,
    };
    let target_runs_vm = match (answer, status.target_node.as_deref(), vm_ref.clone()) {
        (migplan::SourceAnswer::NotStarted, Some(node), Some(vm)) => {
            match hostprep::client_for(ctx, &cluster, node) {
                Ok(c) => c
                    .get_vm(vm)
                    .await
                    .is_ok_and(|s| s.phase == pb::vm_state::Phase::Running as i32),
                Err(_) => false,
            }
        }
        _ => false,
    };
    let decision = migplan::resolve(status.phase, answer, target_runs_vm);
    tracing::info!(migration = %mig.name_any(), phase = ?status.phase, ?answer, target_runs_vm, ?decision, "migration ends early");
    if decision != migplan::Resolution::SourceWins {
        if migplan::is_final(status.phase) && status.phase != Some(MigrationPhase::Completed) {
            tracing::error!(migration = %mig.name_any(), ?answer, "a migration marked ended did complete: the target is the VM and is kept");
        }
        return Ok(decision);
    }
    remove_target(mig, ctx, &cluster).await?;
    Ok(decision)
}

/// Undoes the target side of a migration the source kept: the target pod, its
/// overlays and key go.
async fn remove_target(
    mig: &VmMigration,
    ctx: &Context,
    cluster: &crate::hostplan::Cluster,
) -> Result<(), Error> {
    let ns = mig.namespace().unwrap_or_default();
    let uid = mig.uid().unwrap_or_default();
    let status = mig.status.clone().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut targets = pods_api
        .list(
            &ListParams::default().labels(&format!("{LABEL_MIGRATION_TARGET}={}", mig.name_any())),
        )
        .await?
        .items;
    targets.retain(|p| ctx.stores.pod_trust(p).is_ok());
    let vm_id = targets
        .iter()
        .find_map(crate::hostplan::pod_launch_spec)
        .map(|ls| ls.vm_id);
    if let Some(node) = status.target_node.clone()
        && let Ok(c) = hostprep::client_for(ctx, cluster, &node)
    {
        let req = pb::CancelMigrationRequest {
            migration_uid: uid.clone(),
            vm: vm_id.clone().map(|v| pb::VmRef {
                vm_uid: v,
                name: mig.spec.vm.clone(),
            }),
        };
        if let Err(e) = c.cancel_migration(req).await {
            tracing::info!(node, error = %e.message(), "CancelMigration");
        }
    }
    for p in &targets {
        let _ = pods_api
            .delete(&p.name_any(), &DeleteParams::default())
            .await;
    }
    // The target's fresh overlays hold nothing of value (the VM stayed on the source).
    // Only when this pass removed the target pod: an old failed migration must never
    // touch a node the VM may have moved to since.
    if let (Some(vm_id), Some(node), Some(ls)) = (
        vm_id,
        status.target_node.clone(),
        targets.iter().find_map(crate::hostplan::pod_launch_spec),
    ) && let Ok(client) = hostprep::client_for(ctx, cluster, &node)
    {
        tokio::spawn(async move {
            for attempt in 0..20 {
                let mut left = 0;
                for d in &ls.disks {
                    let req = pb::DeleteOverlayRequest {
                        vm_uid: vm_id.clone(),
                        disk_name: d.name.clone(),
                    };
                    let c = client.clone();
                    if c.delete_overlay(req).await.is_err() {
                        left += 1;
                    }
                }
                if left == 0 {
                    return;
                }
                // The target QEMU is still exiting.
                tokio::time::sleep(Duration::from_secs(2 + attempt)).await;
            }
        });
    }
    ctx.migration_keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&uid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_random_or_an_error_never_zeros() {
        let key = random_key().expect("the kernel's random source");
        assert_eq!(key.len(), 32);
        assert!(key.iter().any(|&b| b != 0));
        // A short read (empty file) and a missing device are errors.
        for source in ["/dev/null", "/nonexistent/hvx-urandom"] {
            let err = read_key_from(std::path::Path::new(source)).expect_err(source);
            assert!(matches!(err, Error::Random { .. }), "{err}");
            assert!(err.to_string().contains(source), "{err}");
        }
    }
}
