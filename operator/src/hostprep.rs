//! The node side of running a VM, driven through the node agents: import its disks on
//! the node its pod was bound to (following the agent's progress stream into the
//! OverlayDisk status), create its overlays, and keep every node's copy of each
//! VirtualNetwork complete (local taps, remote MACs, VTEPs, DHCP slice). Cleanup
//! mirrors it. Every call is idempotent, so a restarted operator just does it again.

use crate::agents::AgentClient;
use crate::context::{Context, ImportDone, ImportProgress, ImportState, Timings};
use crate::error::Error;
use crate::finalize::Cleanup;
use crate::hostplan::{self, Cluster, PlacedNic};
use crate::liveness::{self, Liveness};
use crate::owed::{self, OwedCall, OwedEntry};
use hvx_api::launch::LaunchSpec;
use hvx_api::{OverlayDisk, VirtualNetwork};
use hvx_proto::v1 as pb;
use k8s_openapi::api::core::v1::Pod;
use kube::Resource;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether a VM's disks are ready on its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisksState {
    /// Every overlay exists.
    Ready,
    /// Not yet: what is happening.
    Waiting(String),
}

/// The agent client of a node with a ready agent.
pub fn client_for(ctx: &Context, cluster: &Cluster, node: &str) -> Result<AgentClient, Error> {
    let ip = cluster.node_ips.get(node).ok_or_else(|| Error::Agent {
        node: node.to_string(),
        call: "connect",
        code: tonic::Code::Unavailable,
        message: "no ready agent on this node (label hvx.dev/agent=ready missing)".into(),
    })?;
    ctx.agents.client(node, ip, &ctx.metrics)
}

/// The agent nodes of the cluster now (from the node cache).
pub async fn cluster(ctx: &Context) -> Result<Cluster, Error> {
    Ok(Cluster {
        node_ips: ctx.stores.agent_nodes(),
        node_labels: ctx.stores.agent_node_labels(),
    })
}

/// Imports (in the background) and overlays the disks of one VM on `node`.
pub async fn ensure_vm_disks(
    ctx: &Arc<Context>,
    cluster: &Cluster,
    node: &str,
    ls: &LaunchSpec,
) -> Result<DisksState, Error> {
    let bases = match ensure_vm_bases(ctx, cluster, node, ls).await? {
        BasesState::Ready(b) => b,
        BasesState::Waiting(why) => return Ok(DisksState::Waiting(why)),
    };
    let client = client_for(ctx, cluster, node)?;
    for b in bases {
        let req = pb::EnsureOverlayRequest {
            vm_uid: ls.vm_id.clone(),
            disk_name: b.disk_name,
            base_digest: b.digest,
            virtual_bytes: b.virtual_bytes,
        };
        client.ensure_overlay(req.clone()).await?;
    }
    Ok(DisksState::Ready)
}

/// A VM disk's base, imported on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyBase {
    /// VM disk name.
    pub disk_name: String,
    /// OverlayDisk UID.
    pub disk_uid: String,
    /// "sha256:<hex>".
    pub digest: String,
    /// Guest-visible size.
    pub virtual_bytes: u64,
}

/// Whether a VM's bases are on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BasesState {
    /// All there.
    Ready(Vec<ReadyBase>),
    /// Imports running or blocked: why.
    Waiting(String),
}

/// Makes sure every base a VM needs is imported on `node` (starting imports that are
/// not running), without touching overlays.
pub async fn ensure_vm_bases(
    ctx: &Arc<Context>,
    cluster: &Cluster,
    node: &str,
    ls: &LaunchSpec,
) -> Result<BasesState, Error> {
    let mut waiting = Vec::new();
    let mut ready = Vec::new();
    for vd in &ls.vm.disks {
        let Some(obj) = ctx.stores.disk(&ls.namespace, &vd.overlay_disk.name) else {
            waiting.push(format!(
                "OverlayDisk {} does not exist",
                vd.overlay_disk.name
            ));
            continue;
        };
        // A clone is imported as the disk it clones: one import per node for both,
        // one content-addressed base; a missing origin or a cycle waits here, never
        // reaching the agent.
        if obj.spec.source.clone.is_some() {
            // Its status follows the origin's import (`disk::clone_origin_uid`).
            let _ = ctx.disk_wakeups.send(ObjectRef::from_obj(&*obj));
        }
        let obj = match hostplan::clone_origin(obj, |name| ctx.stores.disk(&ls.namespace, name)) {
            Ok(origin) => origin,
            Err(blocked) => {
                waiting.push(format!("OverlayDisk {}: {blocked}", vd.overlay_disk.name));
                continue;
            }
        };
        let uid = obj.uid().unwrap_or_default();
        let key = (node.to_string(), uid.clone());
        let state = ctx
            .imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        match state {
            Some(ImportState::Ready(done)) => ready.push(ReadyBase {
                disk_name: vd.name.clone(),
                disk_uid: uid.clone(),
                digest: done.digest,
                virtual_bytes: done.virtual_bytes,
            }),
            Some(ImportState::Running(progress)) => waiting.push(format!(
                "importing {} on {node}: {}",
                vd.overlay_disk.name, progress.text
            )),
            Some(ImportState::Failed { message, at })
                if at.elapsed() < Timings::secs(ctx.config.timings.import_retry_seconds) =>
            {
                waiting.push(format!(
                    "import of {} on {node} failed: {message}",
                    vd.overlay_disk.name
                ));
            }
            _ => {
                let req = match hostplan::prepare_disk_request(&obj) {
                    Ok(req) => req,
                    Err(reason) => {
                        // The spec itself is wrong: the OverlayDisk controller says so
                        // in the disk's status (`disk::status_fields`); nothing is sent
                        // to the agent until it changes.
                        waiting.push(format!("OverlayDisk {}: {reason}", obj.name_any()));
                        continue;
                    }
                };
                let upload = obj.spec.source.upload.is_some();
                // A base another node holds comes from there by digest, never again
                // from the original source (which may be gone: an expired URL, an
                // upload kept on two other nodes); the source is the fallback.
                if obj.spec.source.blank.is_none()
                    && let Some((from, done)) = base_elsewhere(ctx, cluster, node, &obj)
                {
                    let source = client_for(ctx, cluster, &from)?;
                    let target = client_for(ctx, cluster, node)?;
                    start_running(ctx, &key, &obj, &format!("copying the base from {from}"));
                    let fallback = (!upload).then(|| req.clone());
                    tokio::spawn(follow_relay(
                        ctx.clone(),
                        Relay {
                            from,
                            source,
                            target,
                            key,
                            disk: (*obj).clone(),
                            done,
                        },
                        fallback,
                    ));
                    waiting.push(format!(
                        "copying the base of {} to {node}",
                        vd.overlay_disk.name
                    ));
                    continue;
                }
                if upload {
                    // The upload is kept on (usually two) nodes: one of them imports
                    // it from its own copy, and the others get the base from there.
                    let progress = crate::upload::progress(ctx, &uid).await;
                    let holder = progress.as_ref().filter(|p| p.complete).and_then(|p| {
                        if p.nodes.iter().any(|n| n == node) {
                            Some(node.to_string())
                        } else {
                            p.nodes
                                .iter()
                                .find(|n| cluster.node_ips.contains_key(*n))
                                .cloned()
                        }
                    });
                    let Some(holder) = holder else {
                        waiting.push(format!(
                            "waiting for `kubectl hvx import --upload` of {}",
                            vd.overlay_disk.name
                        ));
                        continue;
                    };
                    if holder != node {
                        let at_holder = (holder.clone(), uid.clone());
                        let there = ctx
                            .imports
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&at_holder)
                            .cloned();
                        match there {
                            Some(ImportState::Running(_)) => {}
                            Some(ImportState::Failed { message, at })
                                if at.elapsed()
                                    < Timings::secs(ctx.config.timings.import_retry_seconds) =>
                            {
                                waiting.push(format!(
                                    "import of {} on {holder} (which holds its upload) failed: {message}",
                                    vd.overlay_disk.name
                                ));
                                continue;
                            }
                            _ => {
                                let client = client_for(ctx, cluster, &holder)?;
                                start_running(ctx, &at_holder, &obj, "starting");
                                tokio::spawn(follow_import(
                                    ctx.clone(),
                                    client,
                                    at_holder,
                                    (*obj).clone(),
                                    req,
                                ));
                            }
                        }
                        waiting.push(format!(
                            "importing {} on {holder} (which holds its upload), then copying it to {node}",
                            vd.overlay_disk.name
                        ));
                        continue;
                    }
                }
                let client = client_for(ctx, cluster, node)?;
                ctx.imports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        key.clone(),
                        ImportState::Running(ImportProgress {
                            text: "starting".into(),
                            ..Default::default()
                        }),
                    );
                let _ = ctx.disk_wakeups.send(ObjectRef::from_obj(&*obj));
                tokio::spawn(follow_import(ctx.clone(), client, key, (*obj).clone(), req));
                waiting.push(format!("importing {} on {node}", vd.overlay_disk.name));
            }
        }
    }
    Ok(if waiting.is_empty() {
        BasesState::Ready(ready)
    } else {
        BasesState::Waiting(waiting.join("; "))
    })
}

/// Records an import (or a relay) of `key` as started and wakes the disk.
fn start_running(ctx: &Context, key: &(String, String), obj: &OverlayDisk, text: &str) {
    ctx.imports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            key.clone(),
            ImportState::Running(ImportProgress {
                text: text.into(),
                ..Default::default()
            }),
        );
    let _ = ctx.disk_wakeups.send(ObjectRef::from_obj(obj));
}

/// A ready node other than `node` that holds the disk's base, and what it was
/// imported as: from the imports this process followed, else from the disk's status
/// (digest and nodes survive an operator restart). The relay checks it really is
/// there (ExportBase refuses otherwise).
fn base_elsewhere(
    ctx: &Context,
    cluster: &Cluster,
    node: &str,
    obj: &OverlayDisk,
) -> Option<(String, ImportDone)> {
    let uid = obj.uid().unwrap_or_default();
    let followed = ctx
        .imports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|((n, u), _)| *u == uid && n != node && cluster.node_ips.contains_key(n))
        .find_map(|((n, _), s)| match s {
            ImportState::Ready(done) => Some((n.clone(), done.clone())),
            _ => None,
        });
    followed.or_else(|| base_in_status(obj, node, cluster))
}

/// The base the disk's status names (digest, a node holding it other than `node`),
/// pure.
pub fn base_in_status(
    obj: &OverlayDisk,
    node: &str,
    cluster: &Cluster,
) -> Option<(String, ImportDone)> {
    let status = obj.status.as_ref()?;
    let digest = status.digest.clone().filter(|d| !d.is_empty())?;
    let from = status
        .nodes
        .iter()
        .find(|n| *n != node && cluster.node_ips.contains_key(*n))?;
    Some((
        from.clone(),
        ImportDone {
            digest,
            format: status.format.clone().unwrap_or_default(),
            ..Default::default()
        },
    ))
}

/// A base relay: from which node's agent to which, for which import.
struct Relay {
    from: String,
    source: AgentClient,
    target: AgentClient,
    key: (String, String),
    disk: OverlayDisk,
    done: ImportDone,
}

/// Copies a base from another node (ExportBase into ImportBase), recording it like
/// an import; when that fails, imports from the original source (`fallback`), or
/// fails (an upload: no other source).
async fn follow_relay(ctx: Arc<Context>, relay: Relay, fallback: Option<pb::PrepareDiskRequest>) {
    let Relay {
        from,
        source,
        target,
        key,
        disk,
        done,
    } = relay;
    let me = ObjectRef::from_obj(&disk);
    let node = key.0.clone();
    let started = Instant::now();
    let progress = |text: String| {
        ctx.imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key.clone(),
                ImportState::Running(ImportProgress {
                    text,
                    ..Default::default()
                }),
            );
        let _ = ctx.disk_wakeups.send(me.clone());
    };
    let outcome = relay_base(&source, &target, &key.1, &done, |d, of| {
        let pct = d.saturating_mul(100).checked_div(of).unwrap_or(100);
        progress(format!(
            "copying the base from {from}: {pct}% ({}/{} MiB)",
            d >> 20,
            of >> 20
        ));
    })
    .await;
    match outcome {
        Ok(p) => {
            tracing::info!(disk = %disk.name_any(), %from, to = %node, digest = %p.digest, secs = started.elapsed().as_secs(), "base copied between nodes");
            ctx.imports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    key.clone(),
                    ImportState::Ready(ImportDone {
                        digest: p.digest.clone(),
                        virtual_bytes: p.virtual_bytes,
                        actual_bytes: p.actual_bytes,
                        bytes_total: p.bytes_total.max(p.bytes_done),
                        format: done.format.clone(),
                        seconds: started.elapsed().as_secs(),
                    }),
                );
            let _ = ctx.disk_wakeups.send(me);
        }
        Err(message) => match fallback {
            Some(req) => {
                tracing::warn!(disk = %disk.name_any(), %from, to = %node, %message, "copying the base between nodes failed; importing from the source");
                follow_import(ctx, target, key, disk, req).await;
            }
            None => {
                tracing::warn!(disk = %disk.name_any(), %from, to = %node, %message, "copying the base between nodes failed");
                ctx.imports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        key,
                        ImportState::Failed {
                            message: format!("copying the base from {from}: {message}"),
                            at: Instant::now(),
                        },
                    );
                let _ = ctx.disk_wakeups.send(me);
            }
        },
    }
}

/// Longest pause in a base relay before it is given up.
const RELAY_IDLE: Duration = Duration::from_secs(120);

async fn next(s: &mut tonic::Streaming<pb::BaseChunk>) -> Result<Option<pb::BaseChunk>, String> {
    match tokio::time::timeout(RELAY_IDLE, s.message()).await {
        Err(_) => Err(format!(
            "no data from the source for {}s",
            RELAY_IDLE.as_secs()
        )),
        Ok(r) => r.map_err(|s| format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Relays one base: ExportBase on `source` into ImportBase on `target`, the header
/// stamped with the disk to record there. Returns the target's Ready answer.
pub async fn relay_base(
    source: &AgentClient,
    target: &AgentClient,
    disk_uid: &str,
    done: &ImportDone,
    mut progress: impl FnMut(u64, u64) + Send,
) -> Result<pb::DiskProgress, String> {
    use pb::base_chunk::Part;
    let text = |e: &Error| match e.code() {
        Some(code) => format!("{code:?}: {}", e.message()),
        None => e.to_string(),
    };
    let mut export = source
        .export_base(pb::ExportBaseRequest {
            digest: done.digest.clone(),
        })
        .await
        .map_err(|e| format!("ExportBase on {}: {}", source.node(), text(&e)))?;
    let mut header = match next(&mut export).await? {
        Some(pb::BaseChunk {
            part: Some(Part::Header(h)),
        }) => h,
        other => return Err(format!("the export did not start with a header: {other:?}")),
    };
    header.disk_uid = disk_uid.to_string();
    header.detected_format = done.format.clone();
    let of = header.size;
    progress(0, of);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::BaseChunk>(4);
    let _ = tx
        .send(pb::BaseChunk {
            part: Some(Part::Header(header)),
        })
        .await;
    let target_c = target.clone();
    let import = tokio::spawn(async move {
        target_c
            .import_base(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut sent = 0u64;
    let mut last_report = Instant::now();
    let forwarded: Result<(), String> = loop {
        match next(&mut export).await {
            Ok(Some(chunk)) => {
                if let Some(Part::Data(d)) = &chunk.part {
                    sent += d.bytes.len() as u64;
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        last_report = Instant::now();
                        progress(sent, of);
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
        .map_err(|e| format!("ImportBase on {}: {}", target.node(), text(&e)));
    // A broken export explains a failed import better than the import does.
    forwarded.map_err(|e| format!("ExportBase on {}: {e}", source.node()))?;
    let p = imported?;
    progress(of, of);
    Ok(p)
}

fn phase_name(p: i32) -> &'static str {
    use pb::disk_progress::Phase;
    match Phase::try_from(p).unwrap_or(Phase::Unspecified) {
        Phase::Downloading => "downloading",
        Phase::Validating => "validating",
        Phase::Converting => "converting",
        Phase::Ready => "ready",
        Phase::Failed => "failed",
        Phase::WaitingForUpload => "waiting for upload",
        Phase::Unspecified => "starting",
    }
}

fn progress_text(p: &pb::DiskProgress) -> String {
    let mib = |b: u64| b / (1 << 20);
    if let Some(pct) = p.bytes_done.saturating_mul(100).checked_div(p.bytes_total) {
        format!(
            "{} {pct}% ({}/{} MiB)",
            phase_name(p.phase),
            mib(p.bytes_done),
            mib(p.bytes_total)
        )
    } else {
        format!("{} ({} MiB)", phase_name(p.phase), mib(p.bytes_done))
    }
}

/// Follows one PrepareDisk stream to its end, recording it in `ctx.imports` and waking
/// the OverlayDisk controller, which writes the disk's status from it: at most every
/// 2 s while it runs, and at the end.
async fn follow_import(
    ctx: Arc<Context>,
    client: AgentClient,
    key: (String, String),
    disk: OverlayDisk,
    req: pb::PrepareDiskRequest,
) {
    use pb::disk_progress::Phase;
    let node = key.0.clone();
    let name = disk.name_any();
    let me = ObjectRef::from_obj(&disk);
    let set = |s: ImportState| {
        ctx.imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), s);
    };
    let started = Instant::now();
    let outcome: Result<pb::DiskProgress, String> = async {
        let mut stream = client
            .prepare_disk(req.clone())
            .await
            .map_err(|e| e.to_string())?;
        let mut last_wake = Instant::now() - PROGRESS_EVERY;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        {
            match Phase::try_from(msg.phase).unwrap_or(Phase::Unspecified) {
                Phase::Ready => return Ok(msg),
                Phase::Failed => return Err(msg.message),
                _ => {}
            }
            set(ImportState::Running(ImportProgress {
                waiting_for_upload: msg.phase == Phase::WaitingForUpload as i32,
                text: progress_text(&msg),
                bytes_done: msg.bytes_done,
                bytes_total: msg.bytes_total,
            }));
            if last_wake.elapsed() >= PROGRESS_EVERY {
                last_wake = Instant::now();
                let _ = ctx.disk_wakeups.send(me.clone());
            }
        }
        Err("the agent ended the import stream without a result".into())
    }
    .await;
    match outcome {
        Ok(done) => {
            tracing::info!(disk = %name, %node, digest = %done.digest, secs = started.elapsed().as_secs(), "disk imported");
            set(ImportState::Ready(ImportDone {
                digest: done.digest.clone(),
                virtual_bytes: done.virtual_bytes,
                actual_bytes: done.actual_bytes,
                bytes_total: done.bytes_total.max(done.bytes_done),
                format: done.detected_format.clone(),
                seconds: started.elapsed().as_secs(),
            }));
        }
        Err(message) => {
            tracing::warn!(disk = %name, %node, %message, "disk import failed");
            set(ImportState::Failed {
                message,
                at: Instant::now(),
            });
        }
    }
    let _ = ctx.disk_wakeups.send(me);
}

/// How often a running import's progress reaches the OverlayDisk's status.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Launcher pods of a namespace (from the pod cache).
pub async fn launcher_pods(ctx: &Context, ns: &str) -> Result<Vec<Pod>, Error> {
    Ok(ctx
        .stores
        .launcher_pods(Some(ns))
        .into_iter()
        .map(|p| (*p).clone())
        .collect())
}

/// What one sync of a network found, per node.
#[derive(Clone, Debug, Default)]
pub struct NetworkSync {
    /// Node -> tap names attached there.
    pub ports: BTreeMap<String, Vec<String>>,
    /// Node -> VTEP.
    pub vteps: BTreeMap<String, String>,
}

/// Makes every agent node's copy of `net` complete: nodes hosting its VMs get the
/// full state (EnsureNetwork), the others lose it (DeleteNetwork). Leases the nodes
/// report are recorded for VM status. Tries every node; returns the first error.
pub async fn sync_network(
    ctx: &Context,
    net: &VirtualNetwork,
    nics: &[PlacedNic],
    cluster: &Cluster,
) -> Result<NetworkSync, Error> {
    sync_network_except(ctx, net, nics, cluster, &BTreeSet::new()).await
}

/// [`sync_network`] leaving the nodes in `skip` alone (lost nodes during a cleanup:
/// they keep their DHCP slot in `cluster`, and the network's own periodic sync
/// reaches them once their agent is back).
pub async fn sync_network_except(
    ctx: &Context,
    net: &VirtualNetwork,
    nics: &[PlacedNic],
    cluster: &Cluster,
    skip: &BTreeSet<String>,
) -> Result<NetworkSync, Error> {
    let Some(vni) = net.status.as_ref().and_then(|s| s.vni) else {
        return Ok(NetworkSync::default());
    };
    let uid = net.uid().unwrap_or_default();
    let mut out = NetworkSync::default();
    let mut first_err = None;
    let carrying = hostplan::network_nodes(net, nics, cluster);
    for (node, ip) in cluster.node_ips.iter().filter(|(n, _)| !skip.contains(*n)) {
        let hosts = carrying.contains(node);
        let client = match ctx.agents.client(node, ip, &ctx.metrics) {
            Ok(c) => c,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        let result = if hosts {
            let req = hostplan::network_request(net, vni, node, nics, cluster);
            let taps: Vec<String> = req.local_ports.iter().map(|p| p.tap.clone()).collect();
            client.ensure_network(req.clone()).await.map(|state| {
                let mut leases = ctx.leases.lock().unwrap_or_else(|p| p.into_inner());
                leases.retain(|(net, n, _), _| !(net == &uid && n == node));
                for l in state.leases {
                    leases.insert(
                        (uid.clone(), node.clone(), l.mac.to_ascii_lowercase()),
                        l.ip,
                    );
                }
                out.ports.insert(node.clone(), taps);
                out.vteps.insert(node.clone(), ip.clone());
            })
        } else {
            let req = pb::DeleteNetworkRequest {
                network_uid: uid.clone(),
                vni,
                force: false,
            };
            client.delete_network(req.clone()).await.map(|_| ())
        };
        if let Err(e) = result {
            tracing::warn!(network = %net.name_any(), %node, error = %e, "network sync");
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Syncs the named networks of a namespace (the ones an application uses).
pub async fn sync_networks(
    ctx: &Context,
    ns: &str,
    names: impl IntoIterator<Item = String>,
    cluster: &Cluster,
) -> Result<(), Error> {
    sync_networks_except(ctx, ns, names, cluster, &BTreeSet::new()).await
}

/// [`sync_networks`] leaving the nodes in `skip` alone.
pub async fn sync_networks_except(
    ctx: &Context,
    ns: &str,
    names: impl IntoIterator<Item = String>,
    cluster: &Cluster,
    skip: &BTreeSet<String>,
) -> Result<(), Error> {
    let pods = launcher_pods(ctx, ns).await?;
    let nics = hostplan::placed_nics(&pods);
    let mut first_err = None;
    for name in names {
        if let Some(net) = ctx.stores.network(ns, &name)
            && let Err(e) = sync_network_except(ctx, &net, &nics, cluster, skip).await
        {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The agent nodes a finalizer's cleanup acts on now, by liveness.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupNodes {
    /// Node -> address of the nodes whose agent is there: called now.
    pub alive: BTreeMap<String, String>,
    /// Node -> why it is Lost: what it owes is recorded, not waited for.
    pub lost: BTreeMap<String, String>,
}

/// Retry of a cleanup waiting for a Suspect node.
const SUSPECT_RETRY: Duration = Duration::from_secs(5);

/// Sorts the agent nodes for a cleanup: a Suspect node makes it wait (a requeue, not
/// an error, and nothing is deferred: its agent may be back in seconds).
pub fn cleanup_nodes(ctx: &Context) -> Result<CleanupNodes, Cleanup> {
    let mut out = CleanupNodes::default();
    let mut suspect = Vec::new();
    for (node, ip) in ctx.stores.agent_nodes() {
        match liveness::of_node(ctx, &node) {
            Liveness::Alive => {
                out.alive.insert(node, ip);
            }
            Liveness::Lost(why) => {
                out.lost.insert(node, why);
            }
            Liveness::Suspect(why) => suspect.push(format!("{node} ({why})")),
        }
    }
    if suspect.is_empty() {
        Ok(out)
    } else {
        Err(Cleanup::Waiting {
            reason: format!(
                "waiting for node {}: not lost, so its cleanup is not deferred",
                suspect.join(", ")
            ),
            retry: SUSPECT_RETRY,
        })
    }
}

/// Records `calls` as owed by every lost node of `nodes` and says so: NodeLost on the
/// Node (once per loss), CleanupDeferred on `obj` (the object being deleted).
pub async fn defer_to_lost<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    nodes: &CleanupNodes,
    obj: &K,
    calls: &[OwedCall],
) -> Result<(), Error> {
    if calls.is_empty() {
        return Ok(());
    }
    let meta = obj.meta();
    let object = format!(
        "{} {}/{}",
        K::kind(&()),
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    );
    let recorded_at = k8s_openapi::jiff::Timestamp::now().to_string();
    let entries: Vec<OwedEntry> = calls
        .iter()
        .map(|call| OwedEntry {
            call: call.clone(),
            object: object.clone(),
            object_uid: meta.uid.clone().unwrap_or_default(),
            recorded_at: recorded_at.clone(),
        })
        .collect();
    for (node, why) in &nodes.lost {
        owed::record(ctx, node, &entries).await?;
        announce_lost(ctx, node, why).await;
        tracing::warn!(%object, %node, %why, calls = calls.len(), "cleanup deferred to a lost node");
        crate::events::publish(
            ctx,
            obj,
            EventType::Warning,
            "CleanupDeferred",
            &format!(
                "node {node} is lost ({why}): {} cleanup call(s) recorded in ConfigMap {}/{}, done when its agent is back, dropped if the Node is deleted",
                calls.len(),
                ctx.config.namespace,
                owed::record_name(node)
            ),
        )
        .await;
    }
    Ok(())
}

/// Publishes NodeLost on the Node, once per loss.
pub async fn announce_lost(ctx: &Context, node: &str, why: &str) {
    if !liveness::first_announcement(ctx, node) {
        return;
    }
    if let Some(obj) = ctx.stores.node(node) {
        crate::events::publish(
            ctx,
            &*obj,
            EventType::Warning,
            "NodeLost",
            &format!("hvx treats node {node} as lost: {why}; cleanup owed to it is recorded"),
        )
        .await;
    }
}

/// Removes a network from every agent node (VirtualNetwork deleted); lost nodes owe it.
pub async fn delete_network_everywhere(
    ctx: &Context,
    net: &VirtualNetwork,
    vni: u32,
) -> Result<Cleanup, Error> {
    let nodes = match cleanup_nodes(ctx) {
        Ok(n) => n,
        Err(waiting) => return Ok(waiting),
    };
    let uid = net.uid().unwrap_or_default();
    for (node, ip) in &nodes.alive {
        let client = ctx.agents.client(node, ip, &ctx.metrics)?;
        let req = pb::DeleteNetworkRequest {
            network_uid: uid.clone(),
            vni,
            force: true,
        };
        client.delete_network(req.clone()).await?;
    }
    let owed = [OwedCall::DeleteNetwork {
        network_uid: uid,
        vni,
    }];
    defer_to_lost(ctx, &nodes, net, &owed).await?;
    Ok(Cleanup::Done)
}

/// Deletes the overlays of VMs (id, disk names) on every agent node (their pods are
/// gone); lost nodes owe it.
pub async fn delete_vm_overlays<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    nodes: &CleanupNodes,
    owner: &K,
    vms: &[(String, Vec<String>)],
) -> Result<(), Error> {
    for (node, ip) in &nodes.alive {
        let client = ctx.agents.client(node, ip, &ctx.metrics)?;
        for (vm_id, disks) in vms {
            delete_vm_overlays_on(&client, vm_id, disks).await?;
        }
    }
    let owed: Vec<OwedCall> = vms
        .iter()
        .flat_map(|(vm_id, disks)| {
            disks.iter().map(|d| OwedCall::DeleteOverlay {
                vm_uid: vm_id.clone(),
                disk_name: d.clone(),
            })
        })
        .collect();
    defer_to_lost(ctx, nodes, owner, &owed).await
}

/// Deletes a VM's overlays on one node (already gone: OK).
pub async fn delete_vm_overlays_on(
    client: &AgentClient,
    vm_id: &str,
    disks: &[String],
) -> Result<(), Error> {
    for d in disks {
        let req = pb::DeleteOverlayRequest {
            vm_uid: vm_id.to_string(),
            disk_name: d.clone(),
        };
        client.delete_overlay(req.clone()).await?;
    }
    Ok(())
}

/// Releases an OverlayDisk's base on every agent node (OverlayDisk deleted); lost
/// nodes owe it.
pub async fn release_disk_everywhere(ctx: &Context, disk: &OverlayDisk) -> Result<Cleanup, Error> {
    let nodes = match cleanup_nodes(ctx) {
        Ok(n) => n,
        Err(waiting) => return Ok(waiting),
    };
    let uid = disk.uid().unwrap_or_default();
    for (node, ip) in &nodes.alive {
        let client = ctx.agents.client(node, ip, &ctx.metrics)?;
        let req = pb::ReleaseDiskRequest {
            disk_uid: uid.clone(),
        };
        client.release_disk(req.clone()).await?;
        ctx.imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(node.clone(), uid.clone()));
    }
    for node in nodes.lost.keys() {
        ctx.imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(node.clone(), uid.clone()));
    }
    let owed = [OwedCall::ReleaseDisk { disk_uid: uid }];
    defer_to_lost(ctx, &nodes, disk, &owed).await?;
    Ok(Cleanup::Done)
}
