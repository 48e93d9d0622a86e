//! Cold disk moves: a stopped VM whose disks are on a node it cannot run on any more
//! (cordoned: a drain with evictionStrategy Shutdown, or a VM started while its node
//! is drained) restarts elsewhere with its disks.
//!
//! The launcher pod is created without the usual pin to the disks' node and carries
//! [`ANNOTATION_DISKS_ON`]; the scheduler picks a node with every constraint of the pod
//! (resources, selectors, anti-affinity, taints), and the launcher there waits for its
//! overlays as it always does. This module then imports the bases there (by digest,
//! as for any start), relays each disk's overlay chain from the old node's agent
//! (ExportOverlay) to the new node's (ImportOverlay), and the pod's annotation turns
//! into [`ANNOTATION_DISKS_MOVED_FROM`]. Once the VM runs there the old copy is deleted.
//!
//! Why the operator relays rather than agents talking to each other: agents trust only
//! the operator's client certificate, so a move needs no new credentials, and the
//! overlay of a stopped VM holds only what it wrote (usually far less than its base).
//!
//! Nothing is lost on the way: the old copy stays until the VM runs on the new node,
//! the new node installs a disk only once all its bytes and digests are checked, and the
//! annotation on the pod (not this process's memory) says where the disks are, so a
//! restarted operator simply moves again (ImportOverlay is idempotent by move id).

use crate::agents::AgentClient;
use crate::context::{Context, Timings};
use crate::error::Error;
use crate::hostplan::Cluster;
use crate::hostprep::{self, BasesState, DisksState};
use hvx_api::VmApplication;
use hvx_api::launch::LaunchSpec;
use hvx_proto::v1 as pb;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use kube::runtime::events::EventType;
use pb::overlay_chunk::Part;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvx_api::seal::Sealed;
/// Both annotations are sealed (`hvx_api::seal`): pods reach this module only once
/// their seals are checked (`stores`), and every change here writes the seal with it.
pub use hvx_api::seal::{ANNOTATION_DISKS_MOVED_FROM, ANNOTATION_DISKS_ON};

pub use hvx_operator_core::context::MoveState;

/// What a pass should do about a pod's disks (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum DiskPlacement<'a> {
    /// The disks are (or will be created) where the pod is.
    Here,
    /// They are on another node: move them first.
    MoveFrom(&'a str),
}

/// Where a bound pod's disks are, from its annotation (pure).
pub fn placement<'a>(disks_on: Option<&'a str>, pod_node: &str) -> DiskPlacement<'a> {
    match disks_on {
        Some(from) if from != pod_node => DiskPlacement::MoveFrom(from),
        _ => DiskPlacement::Here,
    }
}

/// Whether `pod` is bound to another node than the one its `disks-on` names: a move
/// it has not recorded yet (pure).
pub fn move_unrecorded(pod: &Pod) -> bool {
    let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    match (pod.annotations().get(ANNOTATION_DISKS_ON), bound) {
        (Some(from), Some(node)) => placement(Some(from), node) != DiskPlacement::Here,
        _ => false,
    }
}

fn state(ctx: &Context, id: &str) -> Option<MoveState> {
    ctx.disk_moves
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .cloned()
}

fn set(ctx: &Context, id: &str, s: MoveState) {
    ctx.disk_moves
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.to_string(), s);
}

/// Forgets a finished move (its pod has recorded the outcome).
pub fn forget(ctx: &Context, id: &str) {
    ctx.disk_moves
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id);
}

/// Moves the disks of `ls` from `from` to `to` (in the background); `Ready` once all
/// are installed on `to`.
pub async fn ensure_moved(
    ctx: &Arc<Context>,
    cluster: &Cluster,
    from: &str,
    to: &str,
    ls: &LaunchSpec,
    move_id: &str,
) -> Result<DisksState, Error> {
    match state(ctx, move_id) {
        Some(MoveState::Done) => return Ok(DisksState::Ready),
        Some(MoveState::Running(p)) => return Ok(DisksState::Waiting(p)),
        Some(MoveState::Failed { message, at })
            if at.elapsed() < Timings::secs(ctx.config.timings.disk_move_retry_seconds) =>
        {
            return Ok(DisksState::Waiting(format!(
                "moving disks from {from} to {to} failed: {message}; retrying"
            )));
        }
        _ => {}
    }
    let bases = match hostprep::ensure_vm_bases(ctx, cluster, to, ls).await? {
        BasesState::Ready(b) => b,
        BasesState::Waiting(why) => {
            return Ok(DisksState::Waiting(format!(
                "before moving disks from {from}: {why}"
            )));
        }
    };
    let Ok(source) = hostprep::client_for(ctx, cluster, from) else {
        return Ok(DisksState::Waiting(format!(
            "the VM's disks are on {from}, whose agent is not ready: they move once it is"
        )));
    };
    let target = hostprep::client_for(ctx, cluster, to)?;
    set(
        ctx,
        move_id,
        MoveState::Running(format!("moving disks from {from} to {to}")),
    );
    let disks: Vec<String> = bases.into_iter().map(|b| b.disk_name).collect();
    tokio::spawn(run(
        ctx.clone(),
        source,
        target,
        Route {
            from: from.to_string(),
            to: to.to_string(),
            vm_uid: ls.vm_id.clone(),
            vm: ls.vm.name.clone(),
            move_id: move_id.to_string(),
            idle: Timings::secs(ctx.config.timings.disk_move_idle_seconds),
        },
        disks,
    ));
    Ok(DisksState::Waiting(format!(
        "moving disks from {from} to {to}"
    )))
}

/// One move's endpoints and names.
#[derive(Clone, Debug)]
struct Route {
    from: String,
    to: String,
    vm_uid: String,
    vm: String,
    move_id: String,
    /// Longest wait for the next message of the export.
    idle: Duration,
}

async fn run(
    ctx: Arc<Context>,
    source: AgentClient,
    target: AgentClient,
    route: Route,
    disks: Vec<String>,
) {
    let started = Instant::now();
    let mut total = 0u64;
    let mut outcome = Ok(());
    for (i, disk) in disks.iter().enumerate() {
        let label = format!("disk {disk} ({}/{})", i + 1, disks.len());
        let progress = |done: u64, of: u64| {
            let pct = done.saturating_mul(100).checked_div(of).unwrap_or(100);
            set(
                &ctx,
                &route.move_id,
                MoveState::Running(format!(
                    "moving {label} from {} to {}: {pct}% ({}/{} MiB)",
                    route.from,
                    route.to,
                    done >> 20,
                    of >> 20
                )),
            );
        };
        match relay(source.clone(), target.clone(), &route, disk, progress).await {
            Ok(bytes) => total += bytes,
            Err(message) => {
                outcome = Err(format!("{label}: {message}"));
                break;
            }
        }
    }
    ctx.metrics.disk_move(outcome.is_ok(), total);
    match outcome {
        Ok(()) => {
            tracing::info!(vm = %route.vm, from = %route.from, to = %route.to, bytes = total, ms = started.elapsed().as_millis() as u64, "VM disks moved");
            set(&ctx, &route.move_id, MoveState::Done);
        }
        Err(message) => {
            tracing::warn!(vm = %route.vm, from = %route.from, to = %route.to, %message, "VM disk move failed; the disks stay where they were");
            set(
                &ctx,
                &route.move_id,
                MoveState::Failed {
                    message,
                    at: Instant::now(),
                },
            );
        }
    }
}

async fn next_chunk(
    export: &mut tonic::Streaming<pb::OverlayChunk>,
    idle: Duration,
) -> Result<Option<pb::OverlayChunk>, String> {
    match tokio::time::timeout(idle, export.message()).await {
        Err(_) => Err(format!("no data from the source for {}s", idle.as_secs())),
        Ok(r) => r.map_err(|s| status_text(&s)),
    }
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn agent_text(e: &Error) -> String {
    match e.code() {
        Some(code) => format!("{code:?}: {}", e.message()),
        None => e.to_string(),
    }
}

/// Relays one disk: the export's header (stamped with the move id), data and trailer
/// go to the import unchanged. An export that breaks ends the import's stream without
/// a trailer, so the target installs nothing. Returns the bytes moved.
async fn relay(
    source: AgentClient,
    target: AgentClient,
    route: &Route,
    disk: &str,
    mut progress: impl FnMut(u64, u64) + Send,
) -> Result<u64, String> {
    let mut export = source
        .export_overlay(pb::ExportOverlayRequest {
            vm_uid: route.vm_uid.clone(),
            disk_name: disk.to_string(),
        })
        .await
        .map_err(|e| format!("ExportOverlay on {}: {}", route.from, agent_text(&e)))?;
    let mut header = match next_chunk(&mut export, route.idle).await? {
        Some(pb::OverlayChunk {
            part: Some(Part::Header(h)),
        }) => h,
        other => return Err(format!("the export did not start with a header: {other:?}")),
    };
    header.move_id = route.move_id.clone();
    let of: u64 = header.files.iter().map(|f| f.size).sum();
    progress(0, of);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::OverlayChunk>(4);
    let _ = tx
        .send(pb::OverlayChunk {
            part: Some(Part::Header(header)),
        })
        .await;
    // The import runs while the chunks are forwarded into it.
    let import = tokio::spawn(async move {
        target
            .import_overlay(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut done = 0u64;
    let mut last_report = Instant::now();
    let forwarded: Result<(), String> = loop {
        match next_chunk(&mut export, route.idle).await {
            Ok(Some(chunk)) => {
                if let Some(Part::Data(d)) = &chunk.part {
                    done += d.bytes.len() as u64;
                    if last_report.elapsed() >= Duration::from_secs(1) {
                        last_report = Instant::now();
                        progress(done, of);
                    }
                }
                if tx.send(chunk).await.is_err() {
                    // The import ended early: its answer says why.
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    let imported = import
        .await
        .map_err(|e| format!("import task: {e}"))?
        .map_err(|e| format!("ImportOverlay on {}: {}", route.to, agent_text(&e)));
    // A broken export explains a failed import better than the import does.
    forwarded.map_err(|e| format!("ExportOverlay on {}: {e}", route.from))?;
    imported?;
    progress(of, of);
    Ok(done)
}

/// The node a new launcher pod of a stopped VM is pinned to, and the annotation it
/// carries instead when its disks' node `home` is cordoned: then the scheduler picks
/// the node and the disks follow.
pub async fn pin_or_move(
    ctx: &Context,
    home: Option<&str>,
) -> Result<(Option<String>, Option<String>), Error> {
    let Some(home) = home else {
        return Ok((None, None));
    };
    let cordoned = ctx
        .stores
        .node(home)
        .and_then(|n| n.spec.as_ref()?.unschedulable)
        .unwrap_or(false);
    Ok(if cordoned {
        (None, Some(home.to_string()))
    } else {
        (Some(home.to_string()), None)
    })
}

async fn annotate(
    ctx: &Context,
    pod: &Pod,
    changes: &[(Sealed, Option<&str>)],
) -> Result<(), Error> {
    crate::trust::patch_sealed(ctx, pod, changes).await
}

/// Gets the disks of the VM of `pod` (bound to `node`) ready there: moved from the
/// node its annotation names, or imported and overlaid as for any start.
pub async fn prepare_disks(
    ctx: &Arc<Context>,
    app: &VmApplication,
    cluster: &Cluster,
    pod: &Pod,
    node: &str,
    ls: &LaunchSpec,
) -> Result<DisksState, Error> {
    let disks_on = pod
        .annotations()
        .get(ANNOTATION_DISKS_ON)
        .map(String::as_str);
    if let DiskPlacement::MoveFrom(from) = placement(disks_on, node) {
        let move_id = pod.uid().unwrap_or_default();
        let was_running = matches!(state(ctx, &move_id), Some(MoveState::Running(_)));
        let result = ensure_moved(ctx, cluster, from, node, ls, &move_id).await?;
        if !was_running && matches!(state(ctx, &move_id), Some(MoveState::Running(_))) {
            // Once per attempt: the relay started in this pass.
            hvx_operator_core::events::publish(
                ctx,
                app,
                EventType::Normal,
                "VmDisksMoving",
                &format!(
                    "VM {}: its disks are on {from}, which is cordoned; moving them to {node}, where it restarts",
                    ls.vm.name
                ),
            )
            .await;
        }
        match result {
            DisksState::Ready => {
                annotate(
                    ctx,
                    pod,
                    &[
                        (Sealed::DisksOn, None),
                        (Sealed::DisksMovedFrom, Some(from)),
                    ],
                )
                .await?;
                forget(ctx, &move_id);
                hvx_operator_core::events::publish(
                    ctx,
                    app,
                    EventType::Normal,
                    "VmDisksMoved",
                    &format!("VM {}: disks moved from {from} to {node}", ls.vm.name),
                )
                .await;
            }
            waiting => return Ok(waiting),
        }
    }
    hostprep::ensure_vm_disks(ctx, cluster, node, ls).await
}

/// Once a moved VM runs, deletes the copy of its disks left on the old node.
pub async fn clean_old_copy(
    ctx: &Context,
    cluster: &Cluster,
    pod: &Pod,
    ls: &LaunchSpec,
) -> Result<(), Error> {
    let Some(from) = pod.annotations().get(ANNOTATION_DISKS_MOVED_FROM).cloned() else {
        return Ok(());
    };
    let here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if here == Some(from.as_str()) {
        // Never the VM's own disks (a pod is bound once, so this is a bad annotation).
        tracing::warn!(vm = %ls.vm.name, node = %from, "moved-from names the VM's own node; not deleting");
        return annotate(ctx, pod, &[(Sealed::DisksMovedFrom, None)]).await;
    }
    if ctx.stores.node(&from).is_some() {
        let disks: Vec<String> = ls.disks.iter().map(|d| d.name.clone()).collect();
        let client = hostprep::client_for(ctx, cluster, &from)?;
        hostprep::delete_vm_overlays_on(&client, &ls.vm_id, &disks).await?;
        tracing::info!(vm = %ls.vm.name, node = %from, "old copy of moved disks deleted");
    }
    annotate(ctx, pod, &[(Sealed::DisksMovedFrom, None)]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_is_unrecorded_while_disks_on_names_another_node() {
        let pod = |disks_on: Option<&str>, node: Option<&str>| -> Pod {
            let mut p = Pod::default();
            if let Some(d) = disks_on {
                p.annotations_mut()
                    .insert(ANNOTATION_DISKS_ON.into(), d.into());
            }
            p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: node.map(str::to_string),
                ..Default::default()
            });
            p
        };
        assert!(move_unrecorded(&pod(Some("n1"), Some("n2"))));
        assert!(!move_unrecorded(&pod(Some("n2"), Some("n2"))));
        assert!(!move_unrecorded(&pod(None, Some("n2"))));
        assert!(
            !move_unrecorded(&pod(Some("n1"), None)),
            "not bound: nothing moved yet"
        );
    }

    #[test]
    fn disks_move_only_when_the_pod_is_bound_elsewhere() {
        assert_eq!(placement(None, "n2"), DiskPlacement::Here);
        assert_eq!(placement(Some("n2"), "n2"), DiskPlacement::Here);
        assert_eq!(placement(Some("n1"), "n2"), DiskPlacement::MoveFrom("n1"));
    }
}
