//! Live migration on a node: the target gets fresh overlays, a key and two ports; the
//! source drives its QEMU (through the agent's own QMP monitor) with
//! `hvx_vmm::migration`. Both calls are idempotent by migration UID: a second
//! StartMigration (an operator that restarted) attaches to the running one.
//!
//! The source persists each migration's state in the VM's run dir
//! (`migration-source.json`, written atomically at every transition: started,
//! completed, failed, cancelled). QEMU does the transfer on its own, so an agent that
//! restarts mid-migration finds QEMU somewhere in it; the record and QEMU's own state
//! (`query-migrate`, `query-status`) decide what happens then ([`recovery`]): once
//! QEMU reported completion the source copy is never resumed, whatever asks.

use super::error::AgentError;
use super::{Agent, vms, write_atomic};
use hvx_proto::v1 as pb;
use hvx_proto::v1::cancel_migration_response::Outcome;
use hvx_proto::v1::migration_progress::Phase;
use hvx_vmm::migration::{self, MIGRATED_MARKER, Progress, Rollback, TargetEndpoint, Tuning};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
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
    /// The task driving QEMU (None once there is none: a recorded end).
    pub task: Option<tokio::task::AbortHandle>,
}

/// File in a VM's run dir with the source side's state of its latest migration.
pub const SOURCE_RECORD: &str = "migration-source.json";

/// Where a source-side migration is, as persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceState {
    /// `migrate` may have been issued: QEMU may be anywhere in the migration.
    Started,
    /// QEMU reported the migration completed: the target owns the VM.
    Completed,
    /// It failed before completing; the VM runs here.
    Failed,
    /// Cancelled before completing; the VM runs here.
    Cancelled,
}

/// The source side's persisted state of one migration (`<run dir>/migration-source.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRecord {
    /// The VmMigration's UID.
    pub migration_uid: String,
    /// Where it is.
    pub state: SourceState,
    /// The VM's disks (their mirror jobs, for a rollback after a restart).
    #[serde(default)]
    pub disks: Vec<String>,
    /// Why it failed, or how it ended.
    #[serde(default)]
    pub message: String,
    /// Guest pause at switchover (completed).
    #[serde(default)]
    pub downtime_ms: u64,
    /// Whole migration (completed).
    #[serde(default)]
    pub total_ms: u64,
    /// Memory bytes sent (completed).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Disk bytes mirrored (completed).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Ended in post-copy (completed).
    #[serde(default)]
    pub post_copy: bool,
}

impl SourceRecord {
    /// A migration just handed to QEMU: nothing measured yet.
    pub fn started(migration_uid: String, disks: Vec<String>) -> Self {
        Self {
            migration_uid,
            state: SourceState::Started,
            disks,
            message: String::new(),
            downtime_ms: 0,
            total_ms: 0,
            memory_bytes: 0,
            disk_bytes: 0,
            post_copy: false,
        }
    }
}

/// What the agent sees of a source QEMU when it has no task for its migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuSeen {
    /// No QEMU of the VM runs here.
    Gone,
    /// QEMU runs and says who owns the guest (`None`: still this copy).
    Verdict(Option<Rollback>),
    /// QEMU runs but did not answer.
    Unreadable,
}

/// What a source agent does about a migration it has no task for (it restarted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to do: report this recorded end.
    Report(SourceState),
    /// QEMU completed it: record that, stop the stale source QEMU (it is never
    /// resumed), report Completed.
    Finish,
    /// Post-copy is in flight: QEMU completes it on its own; wait, then Finish.
    AwaitPostCopy,
    /// It never completed: roll back (the guest resumes here), record Failed.
    RollBack,
    /// QEMU did not answer: decide nothing (a guess could run the VM twice); the
    /// caller gets an error and asks again.
    AskAgain,
}

/// The recovery table: persisted state x QEMU's state -> what to do. QEMU's word
/// beats the record: a record says `Started` when the agent died between QEMU's
/// completion and writing it down.
pub fn recovery(record: SourceState, qemu: QemuSeen) -> Recovery {
    match (record, qemu) {
        (SourceState::Failed | SourceState::Cancelled, _) => Recovery::Report(record),
        // Recorded, but the stale copy still exists (the agent died before `quit`).
        (SourceState::Completed, QemuSeen::Verdict(Some(Rollback::Completed))) => Recovery::Finish,
        // Gone, or a QEMU that is not the migrated one (the VM started here again
        // since): never touched for an old migration.
        (SourceState::Completed, _) => Recovery::Report(SourceState::Completed),
        (SourceState::Started, QemuSeen::Verdict(Some(Rollback::Completed))) => Recovery::Finish,
        (SourceState::Started, QemuSeen::Verdict(Some(Rollback::PostCopy))) => {
            Recovery::AwaitPostCopy
        }
        (SourceState::Started, QemuSeen::Verdict(None | Some(Rollback::RolledBack))) => {
            Recovery::RollBack
        }
        // The VM stopped or crashed here; the operator asks the target whether it runs.
        (SourceState::Started, QemuSeen::Gone) => Recovery::Report(SourceState::Failed),
        (
            SourceState::Started,
            QemuSeen::Unreadable | QemuSeen::Verdict(Some(Rollback::Unknown)),
        ) => Recovery::AskAgain,
    }
}

/// The outcome a CancelMigration reports for a source migration's state.
pub fn cancel_outcome(state: SourceState) -> Outcome {
    match state {
        SourceState::Completed => Outcome::Completed,
        SourceState::Failed | SourceState::Cancelled => Outcome::RolledBack,
        // Still in flight: only post-copy goes on after a cancel.
        SourceState::Started => Outcome::PostCopy,
    }
}

/// Reads a VM's source record.
pub fn read_record(run_dir: &Path) -> Option<SourceRecord> {
    serde_json::from_slice(&std::fs::read(run_dir.join(SOURCE_RECORD)).ok()?).ok()
}

fn write_record(run_dir: &Path, rec: &SourceRecord) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(rec).map_err(|e| AgentError::Io {
        what: "encoding the migration record".into(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&run_dir.join(SOURCE_RECORD), &bytes)?;
    // The rename is durable only once the directory is synced too.
    std::fs::File::open(run_dir)
        .and_then(|d| d.sync_all())
        .map_err(AgentError::io(format!("syncing {}", run_dir.display())))
}

/// The run dir holding the source record of migration `uid`, if any: the VM's when
/// given, else found by scanning (a CancelMigration without a VM).
fn find_record(agent: &Agent, uid: &str, vm: Option<&str>) -> Option<(PathBuf, SourceRecord)> {
    let dirs: Vec<PathBuf> = match vm {
        Some(vm) => vec![agent.paths.vm_run_dir(vm)],
        None => std::fs::read_dir(agent.paths.vms_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect(),
    };
    dirs.into_iter().find_map(|d| {
        read_record(&d)
            .filter(|r| r.migration_uid == uid)
            .map(|r| (d, r))
    })
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

/// The last progress of a recorded end.
fn final_progress(rec: &SourceRecord) -> pb::MigrationProgress {
    match rec.state {
        SourceState::Completed => pb::MigrationProgress {
            phase: Phase::Completed as i32,
            memory_bytes: rec.memory_bytes,
            disk_bytes: rec.disk_bytes,
            downtime_ms: rec.downtime_ms,
            total_ms: rec.total_ms,
            post_copy: rec.post_copy,
            message: rec.message.clone(),
            ..Default::default()
        },
        SourceState::Failed | SourceState::Cancelled | SourceState::Started => {
            pb::MigrationProgress {
                phase: Phase::Failed as i32,
                message: rec.message.clone(),
                ..Default::default()
            }
        }
    }
}

fn lock_key(uid: &str) -> String {
    format!("migration/{uid}")
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
    let _guard = agent.lock(&lock_key(&req.migration_uid)).await;
    if let Some(r) = agent
        .migrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&req.migration_uid)
    {
        return Ok(r.progress.clone());
    }
    let run_dir = agent.paths.vm_run_dir(&vm);
    // Started before this agent (re)started: the record and QEMU say how it ended.
    if let Some(rec) = read_record(&run_dir).filter(|r| r.migration_uid == req.migration_uid) {
        return attach_recorded(&agent, &run_dir, rec).await;
    }
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
    // On disk before QEMU hears of the migration: an agent that dies from here on finds
    // it again.
    write_record(
        &run_dir,
        &SourceRecord::started(req.migration_uid.clone(), req.disk_names.clone()),
    )?;
    let (tx, rx) = watch::channel(progress_message(
        Phase::MirroringDisks,
        &Progress::default(),
        "starting".into(),
    ));
    let cancel = Arc::new(Notify::new());
    let tuning = Tuning {
        max_downtime_ms: req.max_downtime_ms.max(10),
        bandwidth_mib_per_second: u32::try_from(req.bandwidth_bytes_per_second >> 20)
            .unwrap_or(u32::MAX),
        auto_converge: true,
        post_copy_after_passes: req.allow_post_copy.then_some(POST_COPY_AFTER_PASSES),
    };
    let task = tokio::spawn(run_source(
        agent.clone(),
        run_dir,
        endpoint,
        req.disk_names.clone(),
        req.tls_psk.clone(),
        tuning,
        tx,
        cancel.clone(),
        req.migration_uid.clone(),
    ));
    agent
        .migrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            req.migration_uid.clone(),
            Running {
                progress: rx.clone(),
                cancel,
                task: Some(task.abort_handle()),
            },
        );
    Ok(rx)
}

/// A migration this agent has a record of but no task for (it restarted): settles it
/// and answers with its end, or follows a post-copy QEMU finishes on its own.
async fn attach_recorded(
    agent: &Arc<Agent>,
    run_dir: &Path,
    rec: SourceRecord,
) -> Result<watch::Receiver<pb::MigrationProgress>, AgentError> {
    let uid = rec.migration_uid.clone();
    let (rec, step) = settle(run_dir, rec).await?;
    let (tx, rx) = watch::channel(final_progress(&rec));
    let mut running = Running {
        progress: rx.clone(),
        cancel: Arc::new(Notify::new()),
        task: None,
    };
    if step == Recovery::AwaitPostCopy {
        tx.send_replace(progress_message(
            Phase::PostCopy,
            &Progress::default(),
            "post-copy in flight since before the agent restarted".into(),
        ));
        let task = tokio::spawn(await_post_copy(run_dir.to_path_buf(), rec, tx));
        running.task = Some(task.abort_handle());
    }
    agent
        .migrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uid, running);
    Ok(rx)
}

async fn agent_qmp(run_dir: &Path) -> Result<hvx_vmm::qmp::QmpClient, AgentError> {
    let paths = hvx_vmm::RunPaths::new(run_dir);
    Ok(hvx_vmm::qmp::QmpClient::connect(&paths.qmp_agent, Duration::from_secs(10)).await?)
}

/// What the agent sees of the VM's QEMU, and a QMP connection when it answered.
async fn look(run_dir: &Path) -> (QemuSeen, Option<hvx_vmm::qmp::QmpClient>) {
    if vms::live_qemu(run_dir).is_none() {
        return (QemuSeen::Gone, None);
    }
    let Ok(qmp) = agent_qmp(run_dir).await else {
        return (QemuSeen::Unreadable, None);
    };
    match migration::source_state(&qmp).await {
        Ok((status, state)) => (
            QemuSeen::Verdict(migration::source_verdict(&status, &state)),
            Some(qmp),
        ),
        Err(_) => (QemuSeen::Unreadable, None),
    }
}

/// Settles a migration this agent has no task for, from its record and QEMU's own
/// state (the [`recovery`] table). Returns the record as it is now and the step
/// taken; `AwaitPostCopy` is left to the caller.
async fn settle(
    run_dir: &Path,
    mut rec: SourceRecord,
) -> Result<(SourceRecord, Recovery), AgentError> {
    let (seen, qmp) = look(run_dir).await;
    let step = recovery(rec.state, seen);
    tracing::info!(migration = %rec.migration_uid, state = ?rec.state, ?seen, ?step, "settling a migration after an agent restart");
    match (step, qmp) {
        (Recovery::Report(state), _) => {
            if state != rec.state {
                rec.state = state;
                rec.message = "the VM no longer runs on the source node".into();
                write_record(run_dir, &rec)?;
            }
        }
        (Recovery::Finish, Some(qmp)) => {
            if rec.state != SourceState::Completed {
                rec.state = SourceState::Completed;
                rec.message = "completed while the source agent was down".into();
                write_record(run_dir, &rec)?;
            }
            stop_migrated(run_dir, &qmp, &rec.migration_uid).await?;
        }
        (Recovery::RollBack, Some(qmp)) => match migration::rollback(&qmp, &rec.disks).await {
            Rollback::RolledBack => {
                rec.state = SourceState::Failed;
                rec.message = "the source agent restarted mid-migration; rolled back, the VM keeps running here".into();
                write_record(run_dir, &rec)?;
            }
            // QEMU moved on between the two looks: decide again from scratch.
            Rollback::Completed | Rollback::PostCopy => {
                return Box::pin(settle(run_dir, rec)).await;
            }
            Rollback::Unknown => {
                return Err(AgentError::Retry(format!(
                    "migration {}: the source QEMU stopped answering during the rollback; ask again",
                    rec.migration_uid
                )));
            }
        },
        (Recovery::AwaitPostCopy, _) => {}
        (Recovery::Finish | Recovery::RollBack | Recovery::AskAgain, _) => {
            return Err(AgentError::Retry(format!(
                "migration {}: the source QEMU does not answer; its state decides what happens, ask again",
                rec.migration_uid
            )));
        }
    }
    Ok((rec, step))
}

/// A source QEMU that migrated away: the marker tells its launcher it migrated (not
/// crashed), then it quits. Never resumed.
async fn stop_migrated(
    run_dir: &Path,
    qmp: &hvx_vmm::qmp::QmpClient,
    uid: &str,
) -> Result<(), AgentError> {
    // The launcher reads the marker when its QEMU exits: migrated, not crashed.
    std::fs::write(run_dir.join(MIGRATED_MARKER), uid.as_bytes())
        .map_err(AgentError::io("writing the migrated marker"))?;
    let _ = qmp
        .execute_timeout("quit", None, Duration::from_secs(5))
        .await;
    Ok(())
}

/// Follows a post-copy that was in flight when the agent restarted, to its end.
async fn await_post_copy(
    run_dir: PathBuf,
    mut rec: SourceRecord,
    tx: watch::Sender<pb::MigrationProgress>,
) {
    let ended = async {
        let qmp = agent_qmp(&run_dir).await?;
        loop {
            let (status, state) = migration::source_state(&qmp).await?;
            match migration::source_verdict(&status, &state) {
                Some(Rollback::Completed) => {
                    rec.state = SourceState::Completed;
                    write_record(&run_dir, &rec)?;
                    stop_migrated(&run_dir, &qmp, &rec.migration_uid).await?;
                    return Ok::<_, AgentError>(());
                }
                Some(Rollback::PostCopy) if status != "postcopy-paused" => {}
                _ => {
                    return Err(AgentError::Precondition(format!(
                        "post-copy ended in {status}; the source QEMU stays paused"
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    if let Err(e) = ended {
        rec.message = e.to_string();
        tracing::warn!(migration = %rec.migration_uid, error = %e, "post-copy after an agent restart");
        tx.send_replace(pb::MigrationProgress {
            phase: Phase::Failed as i32,
            message: rec.message.clone(),
            ..Default::default()
        });
        return;
    }
    tx.send_replace(final_progress(&rec));
}

#[allow(clippy::too_many_arguments)]
async fn run_source(
    agent: Arc<Agent>,
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
    let mut qmp_kept = None;
    let outcome = async {
        migration::write_psk(&tls_dir, &psk)
            .map_err(|e| (SourceState::Failed, AgentError::from(e)))?;
        let qmp = agent_qmp(&run_dir)
            .await
            .map_err(|e| (SourceState::Failed, e))?;
        let mut report = |p: &Progress| {
            let phase = match p.stage {
                "mirroring" => Phase::MirroringDisks,
                "switchover" => Phase::Switchover,
                "postcopy" => Phase::PostCopy,
                _ => Phase::PreCopy,
            };
            tx.send_replace(progress_message(phase, p, String::new()));
        };
        let migrated = {
            let migrating = migration::migrate_to(
                &qmp,
                &endpoint,
                &disks,
                Some(&tls_dir),
                &tuning,
                MIGRATION_TIMEOUT,
                &mut report,
            );
            tokio::pin!(migrating);
            loop {
                tokio::select! {
                    r = &mut migrating => break r,
                    () = cancel.notified() => match migration::rollback(&qmp, &disks).await {
                        Rollback::RolledBack => return Err((
                            SourceState::Cancelled,
                            AgentError::Precondition("cancelled; the VM keeps running here".into()),
                        )),
                        // The cancel lost the race (or post-copy runs the guest on the
                        // target): the migration finishes instead.
                        refused => tracing::warn!(migration = %uid, ?refused, "cancel refused: the target owns the VM"),
                    },
                }
            }
        }
        .map_err(|e| (SourceState::Failed, AgentError::from(e)))?;
        qmp_kept = Some(qmp);
        Ok::<_, (SourceState, AgentError)>(migrated)
    }
    .await;
    let _ = std::fs::remove_dir_all(&tls_dir);
    // Record writes are serialised with StartMigration and CancelMigration.
    let _guard = agent.lock(&lock_key(&uid)).await;
    let mut rec = read_record(&run_dir)
        .filter(|r| r.migration_uid == uid)
        .unwrap_or_else(|| SourceRecord::started(uid.clone(), disks.clone()));
    match &outcome {
        Ok(r) => {
            rec.state = SourceState::Completed;
            rec.downtime_ms = r.downtime_ms;
            rec.total_ms = r.total_ms;
            rec.memory_bytes = r.ram_bytes;
            rec.disk_bytes = r.disk_bytes;
            rec.post_copy = r.post_copy;
        }
        Err((state, e)) => {
            rec.state = *state;
            rec.message = e.to_string();
        }
    }
    // Persisted before the source QEMU goes: a restart after this finds the end here.
    if let Err(e) = write_record(&run_dir, &rec) {
        tracing::error!(migration = %uid, error = %e, "recording the migration's end");
    }
    let last = final_progress(&rec);
    match (&outcome, &qmp_kept) {
        (Ok(r), Some(qmp)) => {
            tracing::info!(migration = %uid, total_ms = r.total_ms, downtime_ms = r.downtime_ms, ram = r.ram_bytes, disk = r.disk_bytes, "migration completed");
            if let Err(e) = stop_migrated(&run_dir, qmp, &uid).await {
                tracing::warn!(migration = %uid, error = %e, "stopping the migrated source");
            }
        }
        (Err((_, e)), _) => {
            tracing::warn!(migration = %uid, error = %e, "migration failed; VM stays here");
        }
        (Ok(_), None) => {}
    }
    tx.send_replace(last);
}

/// Longest a CancelMigration waits for the source to settle (a rollback waits up to
/// 30 s for QEMU and for the mirrors each); the operator's call timeout is 60 s.
const CANCEL_WAIT: Duration = Duration::from_secs(45);

/// CancelMigration: rolls a running source side back, unless QEMU completed it first
/// (then the answer says the target owns the VM); on a target that never received the
/// VM, drops the migration's record and key (the operator deletes the pod).
pub async fn cancel(
    agent: &Agent,
    req: &pb::CancelMigrationRequest,
) -> Result<Outcome, AgentError> {
    check_migration_uid(&req.migration_uid)?;
    let vm = req
        .vm
        .as_ref()
        .map(|v| v.vm_uid.as_str())
        .filter(|v| !v.is_empty());
    if let Some(vm) = vm {
        vms::check_vm_uid(vm)?;
    }
    let running = agent
        .migrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&req.migration_uid)
        .cloned();
    let outcome = if let Some(r) = running {
        let mut progress = r.progress.clone();
        let now = progress.borrow().clone();
        if now.post_copy && !is_final(&now) {
            Outcome::PostCopy
        } else {
            if !is_final(&now) {
                r.cancel.notify_one();
            }
            let last = tokio::time::timeout(CANCEL_WAIT, progress.wait_for(is_final))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|p| p.clone());
            match last {
                Some(p) if p.phase == Phase::Completed as i32 => Outcome::Completed,
                Some(_) => Outcome::RolledBack,
                None if progress.borrow().post_copy => Outcome::PostCopy,
                None => {
                    return Err(AgentError::Retry(format!(
                        "migration {} has not settled within {}s; ask again",
                        req.migration_uid,
                        CANCEL_WAIT.as_secs()
                    )));
                }
            }
        }
    } else {
        let _guard = agent.lock(&lock_key(&req.migration_uid)).await;
        match find_record(agent, &req.migration_uid, vm) {
            Some((run_dir, rec)) => {
                let (rec, _) = settle(&run_dir, rec).await?;
                cancel_outcome(rec.state)
            }
            None => Outcome::Unspecified,
        }
    };
    let _ = std::fs::remove_file(record_path(agent, &req.migration_uid));
    if let Some(vm) = vm {
        let run_dir = agent.paths.vm_run_dir(vm);
        if vms::live_qemu(&run_dir).is_none() {
            let _ = std::fs::remove_dir_all(run_dir.join(hvx_api::node::MIGRATION_TLS_DIR));
        }
    }
    Ok(outcome)
}

impl Agent {
    /// Ends every migration task of this agent, as a killed agent process would: QEMU
    /// goes on with whatever it was doing and the persisted records stay; the next
    /// agent on this node settles them.
    pub fn abort_migrations(&self) {
        for r in self
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
        {
            if let Some(t) = r.task {
                t.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_source_never_resumes_a_copy_qemu_completed() {
        use QemuSeen::*;
        use SourceState::*;
        let done = Verdict(Some(Rollback::Completed));
        let post = Verdict(Some(Rollback::PostCopy));
        let ours = Verdict(None);
        // Died right after QEMU completed, before recording it.
        assert_eq!(recovery(Started, done), Recovery::Finish);
        // Died after recording it, before `quit`.
        assert_eq!(recovery(Completed, done), Recovery::Finish);
        assert_eq!(recovery(Completed, Gone), Recovery::Report(Completed));
        // A QEMU that is not the migrated one (the VM came back): left alone.
        assert_eq!(recovery(Completed, ours), Recovery::Report(Completed));
        assert_eq!(recovery(Completed, Unreadable), Recovery::Report(Completed));
        // Died mid-transfer: QEMU waits at pre-switchover (or still copies); rolled back.
        assert_eq!(recovery(Started, ours), Recovery::RollBack);
        assert_eq!(recovery(Started, post), Recovery::AwaitPostCopy);
        // No answer: nothing decided on a guess.
        assert_eq!(recovery(Started, Unreadable), Recovery::AskAgain);
        assert_eq!(recovery(Started, Gone), Recovery::Report(Failed));
        for end in [Failed, Cancelled] {
            for seen in [Gone, done, post, ours, Unreadable] {
                assert_eq!(
                    recovery(end, seen),
                    Recovery::Report(end),
                    "{end:?} {seen:?}"
                );
            }
        }
    }

    #[test]
    fn cancel_outcomes_name_who_owns_the_vm() {
        assert_eq!(cancel_outcome(SourceState::Completed), Outcome::Completed);
        assert_eq!(cancel_outcome(SourceState::Failed), Outcome::RolledBack);
        assert_eq!(cancel_outcome(SourceState::Cancelled), Outcome::RolledBack);
        assert_eq!(cancel_outcome(SourceState::Started), Outcome::PostCopy);
    }

    #[test]
    fn records_round_trip_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_record(dir.path()), None);
        let rec = SourceRecord {
            migration_uid: "m-1".into(),
            state: SourceState::Completed,
            disks: vec!["root".into()],
            message: String::new(),
            downtime_ms: 12,
            total_ms: 3400,
            memory_bytes: 1 << 20,
            disk_bytes: 4096,
            post_copy: false,
        };
        write_record(dir.path(), &rec).expect("write");
        assert_eq!(read_record(dir.path()), Some(rec.clone()));
        assert!(!dir.path().join("migration-source.tmp").exists());
        assert_eq!(final_progress(&rec).phase, Phase::Completed as i32);
        assert_eq!(final_progress(&rec).downtime_ms, 12);
        let failed = SourceRecord {
            state: SourceState::Failed,
            message: "target gone".into(),
            ..rec
        };
        assert_eq!(final_progress(&failed).phase, Phase::Failed as i32);
        assert_eq!(final_progress(&failed).message, "target gone");
    }
}
