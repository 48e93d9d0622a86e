//! Live migration on a node: the target gets fresh overlays, a key and two ports; the
//! source drives its QEMU (through the agent's own QMP monitor) with
//! `hvx_vmm::migration`. Both calls are idempotent by migration UID: a second
//! StartMigration (an operator that restarted) attaches to the running one.

use super::error::AgentError;
use super::{Agent, vms, write_atomic};
use hvx_proto::v1 as pb;
use hvx_proto::v1::migration_progress::Phase;
use hvx_vmm::migration::{self, MIGRATED_MARKER, Progress, TargetEndpoint, Tuning};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// A source-side migration in progress (or finished: its last progress stays).
#[derive(Debug, Clone)]
pub struct Running {
    /// Latest progress.
    pub progress: watch::Receiver<pb::MigrationProgress>,
    /// Wakes the task to roll back.
    pub cancel: Arc<Notify>,
}

/// Longest a source migration may take, mirrors included.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(1800);
/// Pre-copy passes before a migration that allows post-copy switches to it: an idle
/// guest converges in two or three, so this many means the guest dirties memory faster
/// than the link sends it (and auto-converge has begun throttling it).
const POST_COPY_AFTER_PASSES: u64 = 6;

fn vm_uid(vm: Option<&pb::VmRef>) -> Result<String, AgentError> {
    let uid = vm.map(|v| v.vm_uid.clone()).unwrap_or_default();
    vms::check_vm_uid(&uid)?;
    Ok(uid)
}

fn check_migration_uid(uid: &str) -> Result<(), AgentError> {
    if uid.is_empty()
        || uid.len() > 64
        || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(AgentError::Invalid(format!("bad migration UID {uid:?}")));
    }
    Ok(())
}

fn check_psk(psk: &[u8]) -> Result<(), AgentError> {
    if psk.len() < 16 {
        return Err(AgentError::Invalid(
            "a migration needs a TLS pre-shared key of 16 bytes at least".into(),
        ));
    }
    Ok(())
}

fn record_path(agent: &Agent, uid: &str) -> PathBuf {
    agent
        .paths
        .agent_state()
        .join("migrations")
        .join(format!("{uid}.json"))
}

fn free_port(ip: std::net::Ipv4Addr) -> Result<u16, AgentError> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(AgentError::io(format!("finding a free port on {ip}")))
}

/// PrepareMigrationTarget: fresh (empty) overlays over bases already on this node,
/// the key in the VM's run dir, and two free ports. The target launcher pod, started
/// next by the operator, listens there.
pub async fn prepare_target(
    agent: &Agent,
    req: &pb::PrepareMigrationTargetRequest,
) -> Result<pb::MigrationEndpoint, AgentError> {
    check_migration_uid(&req.migration_uid)?;
    let vm = vm_uid(req.vm.as_ref())?;
    check_psk(&req.tls_psk)?;
    let _guard = agent
        .lock(&format!("migration/{}", req.migration_uid))
        .await;
    let record = record_path(agent, &req.migration_uid);
    let run_dir = agent.paths.vm_run_dir(&vm);
    if let Some(ep) = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice::<(String, u32, u32)>(&b).ok())
    {
        // Again (an operator that restarted made a new key): QEMU reads the key file
        // at each TLS handshake, so the listening target takes the new one.
        migration::write_psk(
            &run_dir.join(hvx_api::node::MIGRATION_TLS_DIR),
            &req.tls_psk,
        )?;
        return Ok(pb::MigrationEndpoint {
            host: ep.0,
            migration_port: ep.1,
            nbd_port: ep.2,
        });
    }
    if let Some(pid) = vms::live_qemu(&run_dir) {
        return Err(AgentError::Precondition(format!(
            "VM {vm} already runs on this node (QEMU pid {pid})"
        )));
    }
    for d in &req.disks {
        let (ns, name) = hvx_api::node::vm_overlay_ref(&vm, &d.disk_name);
        let _disk = agent.lock(&format!("overlay/{ns}/{name}")).await;
        let digest = d
            .base_digest
            .trim()
            .trim_start_matches("sha256:")
            .to_ascii_lowercase();
        if agent.store.base(&digest).is_err() {
            return Err(AgentError::Precondition(format!(
                "base {} of disk {} is not on this node: PrepareDisk first",
                d.base_digest, d.disk_name
            )));
        }
        // The mirror copies only what the source's top overlay holds: anything left
        // from an earlier stay of this VM here would corrupt the disk.
        agent.store.delete_disk(&ns, &name)?;
        let size = (d.virtual_bytes > 0).then_some(d.virtual_bytes);
        agent.store.create_disk(&ns, &name, &digest, size).await?;
    }
    migration::write_psk(
        &run_dir.join(hvx_api::node::MIGRATION_TLS_DIR),
        &req.tls_psk,
    )?;
    let ip = agent.config.node_ip;
    let ep = (
        ip.to_string(),
        u32::from(free_port(ip)?),
        u32::from(free_port(ip)?),
    );
    if let Some(dir) = record.parent() {
        std::fs::create_dir_all(dir)
            .map_err(AgentError::io(format!("creating {}", dir.display())))?;
    }
    write_atomic(&record, &serde_json::to_vec(&ep).unwrap_or_default())?;
    tracing::info!(migration = %req.migration_uid, %vm, host = %ep.0, ports = ?(ep.1, ep.2), "migration target prepared");
    Ok(pb::MigrationEndpoint {
        host: ep.0,
        migration_port: ep.1,
        nbd_port: ep.2,
    })
}

fn progress_message(phase: Phase, p: &Progress, message: String) -> pb::MigrationProgress {
    pb::MigrationProgress {
        phase: phase as i32,
        memory_bytes: p.ram_transferred,
        memory_remaining: p.ram_remaining,
        disk_bytes: p.disk_done,
        message,
        post_copy: phase == Phase::PostCopy,
        ..Default::default()
    }
}

/// Is this progress the last one?
pub fn is_final(p: &pb::MigrationProgress) -> bool {
    matches!(
        Phase::try_from(p.phase).unwrap_or(Phase::Unspecified),
        Phase::Completed | Phase::Failed
    )
}

/// StartMigration: starts (or attaches to) the source side.
pub async fn start(
    agent: Arc<Agent>,
    req: pb::StartMigrationRequest,
) -> Result<watch::Receiver<pb::MigrationProgress>, AgentError> {
    check_migration_uid(&req.migration_uid)?;
    let vm = vm_uid(req.vm.as_ref())?;
    check_psk(&req.tls_psk)?;
    let target = req
        .target
        .clone()
        .ok_or_else(|| AgentError::Invalid("no target endpoint".into()))?;
    let port = |p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| AgentError::Invalid(format!("bad target port {p}")))
    };
    let endpoint = TargetEndpoint {
        host: target.host.clone(),
        migration_port: port(target.migration_port)?,
        nbd_port: port(target.nbd_port)?,
    };
    if endpoint.host.parse::<std::net::IpAddr>().is_err() {
        return Err(AgentError::Invalid(format!(
            "target host {:?} is not an IP address",
            endpoint.host
        )));
    }
    let mut running = agent.migrations.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = running.get(&req.migration_uid) {
        return Ok(r.progress.clone());
    }
    let run_dir = agent.paths.vm_run_dir(&vm);
    if vms::live_qemu(&run_dir).is_none() {
        return Err(AgentError::Precondition(format!(
            "VM {vm} is not running on this node"
        )));
    }
    // The mirror copies the active layer onto a fresh overlay of the base: a chain with
    // more layers (snapshots) would lose what the lower ones hold.
    for d in &req.disk_names {
        let (ns, name) = hvx_api::node::vm_overlay_ref(&vm, d);
        let layers = agent
            .store
            .load_disk(&ns, &name)
            .map_or(0, |meta| meta.chain_of(&meta.active).len());
        if layers > 1 {
            return Err(AgentError::Precondition(format!(
                "disk {d} has {layers} layers (snapshots): live migration moves one layer; shut the VM down to move it (evictionStrategy Shutdown moves every layer)"
            )));
        }
    }
    let (tx, rx) = watch::channel(progress_message(
        Phase::MirroringDisks,
        &Progress::default(),
        "starting".into(),
    ));
    let cancel = Arc::new(Notify::new());
    running.insert(
        req.migration_uid.clone(),
        Running {
            progress: rx.clone(),
            cancel: cancel.clone(),
        },
    );
    drop(running);
    let tuning = Tuning {
        max_downtime_ms: req.max_downtime_ms.max(10),
        bandwidth_mib_per_second: u32::try_from(req.bandwidth_bytes_per_second >> 20)
            .unwrap_or(u32::MAX),
        auto_converge: true,
        post_copy_after_passes: req.allow_post_copy.then_some(POST_COPY_AFTER_PASSES),
    };
    tokio::spawn(run_source(
        run_dir,
        endpoint,
        req.disk_names.clone(),
        req.tls_psk.clone(),
        tuning,
        tx,
        cancel,
        req.migration_uid.clone(),
    ));
    Ok(rx)
}

#[allow(clippy::too_many_arguments)]
async fn run_source(
    run_dir: PathBuf,
    endpoint: TargetEndpoint,
    disks: Vec<String>,
    psk: Vec<u8>,
    tuning: Tuning,
    tx: watch::Sender<pb::MigrationProgress>,
    cancel: Arc<Notify>,
    uid: String,
) {
    let tls_dir = run_dir.join(hvx_api::node::MIGRATION_TLS_DIR);
    let outcome = async {
        migration::write_psk(&tls_dir, &psk)?;
        let paths = hvx_vmm::RunPaths::new(&run_dir);
        let qmp =
            hvx_vmm::qmp::QmpClient::connect(&paths.qmp_agent, Duration::from_secs(10)).await?;
        let mut report = |p: &Progress| {
            let phase = match p.stage {
                "mirroring" => Phase::MirroringDisks,
                "switchover" => Phase::Switchover,
                "postcopy" => Phase::PostCopy,
                _ => Phase::PreCopy,
            };
            tx.send_replace(progress_message(phase, p, String::new()));
        };
        let migrating = migration::migrate_to(&qmp, &endpoint, &disks, Some(&tls_dir), &tuning,
                                              MIGRATION_TIMEOUT, &mut report);
        tokio::pin!(migrating);
        let migrated = loop {
            tokio::select! {
                r = &mut migrating => break r,
                () = cancel.notified() => {
                    // In post-copy the guest already runs on the target: finish instead.
                    if migration::rollback(&qmp, &disks).await {
                        return Err(AgentError::Precondition("cancelled; the VM keeps running here".into()));
                    }
                    tracing::warn!(migration = %uid, "cancel refused: the migration is in post-copy");
                }
            }
        }?;
        // The launcher reads the marker when its QEMU exits: migrated, not crashed.
        std::fs::write(run_dir.join(MIGRATED_MARKER), uid.as_bytes())
            .map_err(AgentError::io("writing the migrated marker"))?;
        let _ = qmp
            .execute_timeout("quit", None, Duration::from_secs(5))
            .await;
        Ok::<_, AgentError>(migrated)
    }
    .await;
    let _ = std::fs::remove_dir_all(&tls_dir);
    let last = match outcome {
        Ok(r) => {
            tracing::info!(migration = %uid, total_ms = r.total_ms, downtime_ms = r.downtime_ms, ram = r.ram_bytes, disk = r.disk_bytes, "migration completed");
            pb::MigrationProgress {
                phase: Phase::Completed as i32,
                memory_bytes: r.ram_bytes,
                disk_bytes: r.disk_bytes,
                downtime_ms: r.downtime_ms,
                total_ms: r.total_ms,
                post_copy: r.post_copy,
                ..Default::default()
            }
        }
        Err(e) => {
            tracing::warn!(migration = %uid, error = %e, "migration failed; VM stays here");
            pb::MigrationProgress {
                phase: Phase::Failed as i32,
                message: e.to_string(),
                ..Default::default()
            }
        }
    };
    tx.send_replace(last);
}

/// CancelMigration: rolls a running source side back; on a target that never received
/// the VM, drops the migration's record and key (the operator deletes the pod).
pub async fn cancel(agent: &Agent, req: &pb::CancelMigrationRequest) -> Result<(), AgentError> {
    check_migration_uid(&req.migration_uid)?;
    let running = agent
        .migrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&req.migration_uid)
        .cloned();
    if let Some(r) = running
        && !is_final(&r.progress.borrow())
    {
        r.cancel.notify_one();
    }
    let _ = std::fs::remove_file(record_path(agent, &req.migration_uid));
    if let Some(vm) = req.vm.as_ref().filter(|v| !v.vm_uid.is_empty()) {
        let run_dir = agent.paths.vm_run_dir(&vm.vm_uid);
        if vms::live_qemu(&run_dir).is_none() {
            let _ = std::fs::remove_dir_all(run_dir.join(hvx_api::node::MIGRATION_TLS_DIR));
        }
    }
    Ok(())
}
