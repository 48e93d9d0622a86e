//! VmApplication controller: fetch -> validate -> resolve references -> build launcher
//! pods in dependency order -> server-side apply -> status.

use crate::build::{self, LABEL_APP, Resolved};
use crate::context::Context;
use crate::diskmove;
use crate::error::Error;
use crate::finalize::Cleanup;
use crate::hostplan;
use crate::hostprep::{self, DisksState};
use crate::status::{PodAction, SpecChange, app_phase, pod_action, vm_phase};
use hvx_api::{
    InterfaceStatus, VmApplication, VmApplicationStatus, VmPhase, VmStatus, condition,
    new_condition, set_condition,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Event reason of a launcher pod the API server's admission refused.
pub const REASON_POD_REFUSED: &str = "LauncherPodRefused";

/// The VM's reason when admission refused its launcher pod: the API server's words,
/// and what hvx needs where it is Pod Security.
pub fn refused_pod_reason(pod_name: &str, api_message: &str) -> String {
    let hint = if api_message.contains("PodSecurity") {
        " (launcher pods need the namespace's Pod Security level to be at most `baseline`: label it pod-security.kubernetes.io/enforce=baseline)"
    } else {
        ""
    };
    format!("the API server refused launcher pod {pod_name}: {api_message}{hint}")
}

/// Entry point for the controller runtime.
pub async fn reconcile(app: Arc<VmApplication>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = app.namespace().unwrap_or_default();
    let api: Api<VmApplication> = Api::namespaced(ctx.client.clone(), &ns);
    let ctx = &ctx;
    // A new application's first pass creates only owned objects (launcher pods,
    // disruption budgets) and its status: it need not wait for the finalizer. Disks
    // are prepared on nodes only for bound pods, which a new application has none of.
    let first = if app.status.is_none() {
        crate::finalize::FirstApply::WithFinalizer
    } else {
        crate::finalize::FirstApply::AfterFinalizer
    };
    crate::finalize::reconcile(
        &api,
        app,
        first,
        |app| async move { apply(&app, ctx).await },
        |app| async move { cleanup(&app, ctx).await },
    )
    .await
}

async fn apply(app: &VmApplication, ctx: &Arc<Context>) -> Result<Action, Error> {
    let ns = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let generation = app.meta().generation;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    // The status this pass builds on: what this process last wrote, else the cached
    // object's. The cache can still hold the object from before the last pass's write,
    // and what that pass recorded (restarts, pending changes, the home node) would be
    // lost; this controller is the status' only writer and only one replica leads, so
    // its own last write is the newest (a new leader starts from a fresh list).
    let uid = app.uid().unwrap_or_default();
    let previous = ctx
        .app_status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .cloned()
        .or_else(|| app.status.clone())
        .unwrap_or_default();
    let mut status = VmApplicationStatus {
        conditions: previous.conditions.clone(),
        ..Default::default()
    };

    // Validate: problems the schema cannot see stop the application here, visibly.
    let problems = hvx_api::validate::application(&app.spec);
    let order = hvx_api::validate::start_order(&app.spec);
    if !problems.is_empty() || order.is_none() {
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        set_condition(
            &mut status.conditions,
            new_condition(
                condition::VALID,
                false,
                "Invalid",
                &message,
                generation,
                now.clone(),
            ),
        );
        set_condition(
            &mut status.conditions,
            new_condition(
                condition::READY,
                false,
                "Invalid",
                &message,
                generation,
                now,
            ),
        );
        status.phase = Some(hvx_api::ApplicationPhase::Failed);
        status.vm_count = app.spec.vms.len() as u32;
        status.observed_generation = generation;
        if previous.observed_generation != generation {
            publish(ctx, app, EventType::Warning, "InvalidSpec", &message).await;
        }
        if status != previous {
            write_status(ctx, &ns, &name, &uid, &status).await?;
        }
        return Ok(Action::await_change());
    }
    set_condition(
        &mut status.conditions,
        new_condition(condition::VALID, true, "Valid", "", generation, now.clone()),
    );

    let resolved = resolve(ctx, &ns, app);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let all_pods: Vec<Pod> = ctx
        .stores
        .pods_of_app(&ns, &name)
        .into_iter()
        .map(|p| (*p).clone())
        .collect();
    // A VM's pod: the live one; a live migration's target pod is the migration's
    // business until it completes.
    let mut existing: BTreeMap<String, Pod> = BTreeMap::new();
    let mut migrating: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    for (vm, group) in crate::migplan::by_vm(&all_pods) {
        let split = crate::migplan::vm_pods(group.iter().copied(), &vm);
        if let Some(t) = split.target {
            migrating.insert(
                vm.clone(),
                (
                    crate::migplan::target_of(t).unwrap_or_default().to_string(),
                    t.spec.as_ref().and_then(|s| s.node_name.clone()),
                ),
            );
        }
        if let Some(a) = split.active {
            existing.insert(vm, a.clone());
        }
    }

    let cluster = hostprep::cluster(ctx).await?;
    // Networks first: a VM's taps must be on the switch before it boots, and every
    // other node must learn where its MACs are.
    let net_names = network_names(app);
    let network_problem =
        match hostprep::sync_networks(ctx, &ns, net_names.iter().cloned(), &cluster).await {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };

    let mut phases: BTreeMap<String, VmPhase> = BTreeMap::new();
    for vm_name in order.unwrap_or_default() {
        let Some(vm) = app.spec.vms.iter().find(|v| v.name == vm_name) else {
            continue;
        };
        let pod = existing.get(&vm.name);
        let (mut phase, mut reason) = vm_phase(pod);
        let deps_running = vm
            .depends_on
            .iter()
            .flatten()
            .all(|d| phases.get(d) == Some(&VmPhase::Running));
        // A vApp start delay: the dependencies run, the VM waits a little longer.
        let delay_left = crate::startdelay::wait_left(vm, &phases, &previous, now.0);
        let deps_running = deps_running && delay_left.is_none();
        let prev = previous.vms.iter().find(|v| v.name == vm.name);
        let mut restarts = prev.map(|v| v.restarts).unwrap_or(0);
        // The node that holds the VM's disk overlays: a restarted VM comes back there,
        // or (that node cordoned) its disks follow it elsewhere (`diskmove`).
        let home = pod
            .and_then(|p| p.annotations().get(diskmove::ANNOTATION_DISKS_ON).cloned())
            .or_else(|| pod.and_then(|p| p.spec.as_ref()?.node_name.clone()))
            .or_else(|| prev.and_then(|p| p.node.clone()));
        // Only pods that moved disks: the launch spec is not parsed for every running VM
        // at every pass.
        if phase == VmPhase::Running
            && let Some(pod) = pod
            && pod
                .annotations()
                .contains_key(diskmove::ANNOTATION_DISKS_MOVED_FROM)
            && let Some(ls) = hostplan::pod_launch_spec(pod)
            && let Err(e) = diskmove::clean_old_copy(ctx, &cluster, pod, &ls).await
        {
            tracing::warn!(vm = %vm.name, error = %e, "deleting the old copy of moved disks");
        }
        // A move the pod does not record yet is finished here even when the VM runs:
        // its launcher starts QEMU as soon as the moved overlay lands, which can be
        // before this pass records the move (`disks-on` would then name the old node
        // forever, in status too, and the old copy would never go).
        let unrecorded_move = pod.is_some_and(diskmove::move_unrecorded);
        if (phase == VmPhase::Starting || (phase == VmPhase::Running && unrecorded_move))
            && let Some(pod) = pod
            && let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone())
            && let Some(ls) = hostplan::pod_launch_spec(pod)
        {
            let prepared = diskmove::prepare_disks(ctx, app, &cluster, pod, &node, &ls).await;
            match prepared {
                _ if phase == VmPhase::Running => {
                    if let Err(e) = prepared {
                        tracing::warn!(vm = %vm.name, error = %e, "recording the disk move of a running VM");
                    }
                }
                Ok(DisksState::Ready) => {
                    if let Some(problem) = &network_problem {
                        reason = Some(format!("network: {problem}"));
                    }
                }
                Ok(DisksState::Waiting(why)) => reason = Some(why),
                Err(e) => reason = Some(e.to_string()),
            }
        }
        let action = if let Some((mig, to)) = migrating.get(&vm.name) {
            phase = VmPhase::Migrating;
            reason = Some(format!(
                "VmMigration {mig}: to {}",
                to.clone().unwrap_or_else(|| "a node being chosen".into())
            ));
            PodAction::Keep
        } else {
            pod_action(vm, pod.is_some(), phase, deps_running)
        };
        let squatter = match action {
            PodAction::Create => {
                crate::trust::replace_squatter(ctx, app, &build::pod_name(&name, &vm.name)).await?
            }
            _ => None,
        };
        match action {
            PodAction::Create => match build::launch_spec(app, vm, &resolved) {
                // The VM's pod name taken by a pod hvx did not make (or one edited
                // since it was made): that pod goes first.
                Ok(_) if squatter.is_some() => {
                    (phase, reason) = (VmPhase::Pending, squatter.clone());
                }
                Ok(spec) => {
                    let (pin, disks_on) = diskmove::pin_or_move(ctx, home.as_deref()).await?;
                    let mut pod = build::launcher_pod(app, &spec, &ctx.config, pin.as_deref())
                        .map_err(|source| Error::Serialize {
                            what: "launcher pod",
                            source,
                        })?;
                    if let Some(from) = &disks_on {
                        pod.annotations_mut()
                            .insert(diskmove::ANNOTATION_DISKS_ON.into(), from.clone());
                    }
                    let pod_name = pod.name_any();
                    ensure_disruption_budget(ctx, app, vm).await?;
                    match crate::trust::create_pod(ctx, &uid, pod).await {
                        Ok(()) => {
                            publish(
                                ctx,
                                app,
                                EventType::Normal,
                                "VmStarting",
                                &match &disks_on {
                                    Some(from) => format!(
                                        "created launcher pod {pod_name} for VM {}: {from}, holding its disks, is cordoned, so it starts on another node and its disks move there",
                                        vm.name
                                    ),
                                    None => format!("created launcher pod {pod_name} for VM {}", vm.name),
                                },
                            )
                            .await;
                            (phase, reason) =
                                (VmPhase::Scheduling, Some("launcher pod created".into()));
                        }
                        // Admission said no (Pod Security stricter than `baseline`, a
                        // quota, a policy): the user's to fix, so it goes in the VM's
                        // reason and an event, not only the operator's log; retried at
                        // the busy resync, as the namespace may change.
                        Err(Error::Kube(kube::Error::Api(e))) if e.code == 403 => {
                            let why = refused_pod_reason(&pod_name, &e.message);
                            publish(ctx, app, EventType::Warning, REASON_POD_REFUSED, &why).await;
                            (phase, reason) = (VmPhase::Pending, Some(why));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(waiting) => (phase, reason) = (VmPhase::Pending, Some(waiting.to_string())),
            },
            PodAction::Delete => {
                if let Some(p) = pod {
                    delete_pod(&pods, &p.name_any()).await?;
                    if phase == VmPhase::Failed {
                        restarts += 1;
                        publish(
                            ctx,
                            app,
                            EventType::Warning,
                            "VmRestarting",
                            &format!(
                                "VM {} failed ({}); restarting",
                                vm.name,
                                reason.clone().unwrap_or_default()
                            ),
                        )
                        .await;
                    }
                }
            }
            PodAction::Keep
                if pod.is_none()
                    && !deps_running
                    && vm.run_strategy != hvx_api::RunStrategy::Halted =>
            {
                let waiting: Vec<&str> =
                    vm.depends_on.iter().flatten().map(String::as_str).collect();
                reason = Some(match delay_left {
                    Some(left) => format!(
                        "starting in {left} s (start delay after {})",
                        waiting.join(", ")
                    ),
                    None => format!("waiting for {} to be running", waiting.join(", ")),
                });
            }
            PodAction::Keep if pod.is_none() => {
                (phase, reason) = (VmPhase::Stopped, Some("runStrategy Halted".into()))
            }
            PodAction::Keep => {}
        }
        // Spec changes of a running VM: live where QEMU is not involved, else a
        // graceful restart; status says which.
        let mut pending_change = prev.and_then(|p| p.pending_change.clone());
        if let Some(p) = pod
            && !migrating.contains_key(&vm.name)
            && p.metadata.deletion_timestamp.is_none()
            && matches!(phase, VmPhase::Running | VmPhase::Starting)
            && let Some(running) = hostplan::pod_launch_spec(p)
        {
            match crate::status::classify_change(&running.vm, vm) {
                SpecChange::None => {
                    if phase == VmPhase::Running
                        && let Some(m) = &pending_change
                        && let Some(rest) = m.strip_prefix("restarting to apply ")
                    {
                        pending_change = Some(format!("applied by a restart: {rest}"));
                    }
                }
                SpecChange::Live(fields) => {
                    if let Ok(spec) = build::launch_spec(app, vm, &resolved) {
                        let text =
                            serde_json::to_string(&spec).map_err(|source| Error::Serialize {
                                what: "launch spec",
                                source,
                            })?;
                        crate::trust::patch_sealed(
                            ctx,
                            p,
                            &[(hvx_api::seal::Sealed::LaunchSpec, Some(&text))],
                        )
                        .await?;
                        ensure_disruption_budget(ctx, app, vm).await?;
                        let note = format!("applied live: {}", fields.join(", "));
                        publish(
                            ctx,
                            app,
                            EventType::Normal,
                            "VmUpdated",
                            &format!("VM {}: {note}", vm.name),
                        )
                        .await;
                        pending_change = Some(note);
                    }
                }
                SpecChange::Restart(fields) => {
                    let note = format!("restarting to apply {}", fields.join(", "));
                    publish(
                        ctx,
                        app,
                        EventType::Normal,
                        "VmRestarting",
                        &format!("VM {}: {note}", vm.name),
                    )
                    .await;
                    delete_pod(&pods, &p.name_any()).await?;
                    (phase, reason) = (VmPhase::Stopping, Some(note.clone()));
                    pending_change = Some(note);
                }
            }
        }
        phases.insert(vm.name.clone(), phase);
        let changed = prev.is_none_or(|p| p.phase != phase);
        let running_on = pod.and_then(|p| p.spec.as_ref()?.node_name.clone());
        let interfaces = {
            let leases = ctx.leases.lock().unwrap_or_else(|p| p.into_inner());
            vm.nics
                .iter()
                .map(|n| {
                    let mac = n.mac_address.to_ascii_lowercase();
                    let leased = running_on.as_ref().and_then(|node| {
                        let (uid, _) = resolved.networks.get(&n.network.name)?;
                        leases
                            .get(&(uid.clone(), node.clone(), mac.clone()))
                            .cloned()
                    });
                    InterfaceStatus {
                        name: n.name.clone(),
                        mac_address: mac,
                        ip_address: leased.or_else(|| {
                            n.ip_address
                                .as_deref()
                                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                        }),
                    }
                })
                .collect()
        };
        status.vms.push(VmStatus {
            name: vm.name.clone(),
            phase,
            node: home,
            pod: pod.map(|p| p.name_any()),
            accelerator: prev.and_then(|p| p.accelerator.clone()),
            interfaces,
            migration: migrating.get(&vm.name).map(|(m, _)| m.clone()),
            restarts,
            pending_change,
            reason,
            last_transition_time: if changed {
                Some(now.clone())
            } else {
                prev.and_then(|p| p.last_transition_time.clone())
            },
        });
    }

    // Pods of VMs removed from the spec.
    for pod in &all_pods {
        let vm = pod.labels().get(build::LABEL_VM);
        if vm.is_some_and(|vm| !app.spec.vms.iter().any(|v| &v.name == vm)) {
            delete_pod(&pods, &pod.name_any()).await?;
        }
    }

    // Keep the spec's order in status, as users wrote it.
    status
        .vms
        .sort_by_key(|s| app.spec.vms.iter().position(|v| v.name == s.name));
    status.vm_count = app.spec.vms.len() as u32;
    status.running_count = status
        .vms
        .iter()
        .filter(|v| v.phase == VmPhase::Running)
        .count() as u32;
    let phase = app_phase(&status.vms, true);
    status.phase = Some(phase);
    let all_running = phase == hvx_api::ApplicationPhase::Running;
    let waiting: Vec<String> = status
        .vms
        .iter()
        .filter(|v| v.phase != VmPhase::Running)
        .map(|v| {
            format!(
                "{}: {:?} ({})",
                v.name,
                v.phase,
                v.reason.clone().unwrap_or_default()
            )
        })
        .collect();
    set_condition(
        &mut status.conditions,
        new_condition(
            condition::READY,
            all_running,
            if all_running {
                "AllVmsRunning"
            } else {
                "VmsNotRunning"
            },
            waiting.join("; "),
            generation,
            now,
        ),
    );
    status.observed_generation = generation;
    // An unchanged status is not written: the write would cost a request and, were
    // anything in it to differ by accident, wake this controller again.
    if status != previous {
        write_status(ctx, &ns, &name, &uid, &status).await?;
    }
    Ok(Action::requeue(crate::status::resync_after(
        &app.spec,
        &status.vms,
    )))
}

/// Finds the OverlayDisks and VirtualNetworks the application references (caches).
fn resolve(ctx: &Context, ns: &str, app: &VmApplication) -> Resolved {
    let mut resolved = Resolved::default();
    for vm in &app.spec.vms {
        for d in &vm.disks {
            let n = &d.overlay_disk.name;
            if resolved.disks.contains_key(n) {
                continue;
            }
            if let Some(disk) = ctx.stores.disk(ns, n) {
                let digest = disk.status.as_ref().and_then(|s| s.digest.clone());
                resolved
                    .disks
                    .insert(n.clone(), (disk.uid().unwrap_or_default(), digest));
            }
        }
        for nic in &vm.nics {
            let n = &nic.network.name;
            if resolved.networks.contains_key(n) {
                continue;
            }
            if let Some(net) = ctx.stores.network(ns, n)
                && let Some(vni) = net.status.as_ref().and_then(|s| s.vni)
            {
                resolved
                    .networks
                    .insert(n.clone(), (net.uid().unwrap_or_default(), vni));
            }
        }
    }
    resolved
}

/// Deletes every launcher pod of the application; the finalizer stays until they are
/// gone, so QEMU has shut down and released its disks before the object disappears.
async fn cleanup(app: &VmApplication, ctx: &Context) -> Result<Cleanup, Error> {
    let ns = app.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    // Newest state, not the cache: the finalizer goes only once none is left. Pods
    // hvx did not make are not waited for (nor deleted).
    let mut list = pods
        .list(&ListParams::default().labels(&format!("{LABEL_APP}={}", app.name_any())))
        .await?;
    list.items.retain(|p| ctx.stores.pod_trust(p).is_ok());
    if list.items.is_empty() {
        // Lost nodes owe the overlays (recorded); a Suspect node makes this wait.
        let nodes = match hostprep::cleanup_nodes(ctx) {
            Ok(n) => n,
            Err(waiting) => return Ok(waiting),
        };
        // QEMU is gone everywhere: remove the overlays and take the VMs' ports off
        // the networks (nodes left without a VM of a network drop it).
        let vms: Vec<(String, Vec<String>)> = app
            .spec
            .vms
            .iter()
            .map(|vm| {
                let disks = vm.disks.iter().map(|d| d.name.clone()).collect();
                (build::vm_id(app, vm), disks)
            })
            .collect();
        hostprep::delete_vm_overlays(ctx, &nodes, app, &vms).await?;
        let cluster = hostprep::cluster(ctx).await?;
        let nets = network_names(app);
        // A lost node's copy of the networks is the networks' own business: their
        // periodic sync reaches it once its agent is back, their finalizer records
        // what it owes if they are deleted meanwhile.
        let skip: BTreeSet<String> = nodes.lost.keys().cloned().collect();
        hostprep::sync_networks_except(ctx, &ns, nets, &cluster, &skip).await?;
        publish(
            ctx,
            app,
            EventType::Normal,
            "Deleted",
            "all VMs stopped and removed",
        )
        .await;
        ctx.app_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&app.uid().unwrap_or_default());
        return Ok(Cleanup::Done);
    }
    for pod in &list.items {
        // A pod on a lost node never finishes terminating (no kubelet confirms it):
        // it is removed at once. Its QEMU, if the node still runs it, is stopped by
        // the returning kubelet, which finds the pod gone; the overlays wait for that
        // (the agent refuses to delete an overlay its QEMU uses).
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let lost = node.is_some_and(|n| {
            matches!(
                crate::liveness::of_node(ctx, n),
                crate::liveness::Liveness::Lost(_)
            )
        });
        if lost && pod.metadata.deletion_timestamp.is_some() {
            force_delete_pod(&pods, &pod.name_any()).await?;
        } else {
            delete_pod(&pods, &pod.name_any()).await?;
        }
    }
    Ok(Cleanup::waiting(format!(
        "waiting for {} launcher pod(s) to terminate",
        list.items.len()
    )))
}

/// The VirtualNetworks the application's NICs use.
pub(crate) fn network_names(app: &VmApplication) -> BTreeSet<String> {
    app.spec
        .vms
        .iter()
        .flat_map(|v| v.nics.iter().map(|n| n.network.name.clone()))
        .collect()
}

/// A VM whose drain must wait for a live migration (or for a human, evictionStrategy
/// None) gets a PodDisruptionBudget that allows no eviction of its launcher pod; with
/// Shutdown the eviction goes through and the launcher shuts the guest down.
async fn ensure_disruption_budget(
    ctx: &Context,
    app: &VmApplication,
    vm: &hvx_api::VirtualMachine,
) -> Result<(), Error> {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let ns = app.namespace().unwrap_or_default();
    let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    let name = build::pod_name(&app.name_any(), &vm.name);
    match build::disruption_budget(app, vm) {
        Some(pdb) => {
            api.patch(
                &name,
                &PatchParams::apply(crate::FIELD_MANAGER).force(),
                &Patch::Apply(&pdb),
            )
            .await?;
        }
        None => match api.delete(&name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}

/// Deletes a pod without waiting for its kubelet (grace period 0).
async fn force_delete_pod(pods: &Api<Pod>, name: &str) -> Result<(), Error> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_pod(pods: &Api<Pod>, name: &str) -> Result<(), Error> {
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the status and remembers it as this process' last write (`apply`).
async fn write_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    uid: &str,
    status: &VmApplicationStatus,
) -> Result<(), Error> {
    let api: Api<VmApplication> = Api::namespaced(ctx.client.clone(), ns);
    let patch =
        json!({"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication", "status": status});
    api.patch_status(
        name,
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.app_status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uid.to_string(), status.clone());
    Ok(())
}

/// Publishes an event about the application.
pub(crate) async fn publish(
    ctx: &Context,
    app: &VmApplication,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    hvx_operator_core::events::publish(ctx, app, type_, reason, note).await;
}
