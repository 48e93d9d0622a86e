//! Live migration between two QEMUs without shared storage, over TLS.
//!
//! The flow is libvirt's, which is the one QEMU's block layer is built for:
//! 1. target: QEMU started with `-incoming defer -S`; a TLS-PSK credential; an NBD
//!    server exporting each disk's (empty) top overlay, writable; `migrate-incoming`.
//! 2. source: `blockdev-mirror sync=top` of each disk's top overlay into the target's
//!    NBD export (the bases are identical on both nodes: same content digest), and
//!    wait until every mirror is in sync (`ready`);
//! 3. source: `migrate` with `pause-before-switchover`: memory is pre-copied while the
//!    guest runs; when QEMU stops the vCPUs for the last pass it waits in
//!    `pre-switchover`, we complete the mirrors (`block-job-cancel` of a ready mirror
//!    finishes it with the target consistent) and let QEMU send the final state;
//! 4. target: when its migration completes, stop the NBD server and `cont`.
//!
//! Where the migration allows it, a pre-copy that has not ended after
//! `Tuning::post_copy_after_passes` passes switches to post-copy (see `postcopy`): the
//! same pause-before-switchover completes the mirrors, then the target runs the guest
//! while the rest of its memory follows.
//!
//! Any failure before the final state leaves the source VM running (`migrate_cancel`,
//! mirrors dropped, `cont` if it was paused). Why TLS-PSK and not X.509: the key is
//! made per migration by the operator and handed to both agents over their mTLS
//! channel, so no certificate has to reach the launcher pods and a key is useless
//! after its migration.

use crate::error::io_err;
use crate::postcopy;
use crate::qmp::QmpClient;
use crate::{Result, VmmError};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The QOM id of the TLS credential object on both sides.
pub const TLS_CREDS_ID: &str = "hvx-mig-tls";
/// File the node agent creates in a VM's run dir after the VM migrated away, before it
/// stops the source QEMU: the launcher then reports `Migrated`, not a crash.
pub const MIGRATED_MARKER: &str = "migrated";
/// The PSK identity both sides use.
pub const PSK_USERNAME: &str = "hvx-migration";

/// Where the target listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetEndpoint {
    /// Address the source connects to (the target node's IP; launchers use the host
    /// network).
    pub host: String,
    /// Memory stream port.
    pub migration_port: u16,
    /// NBD port for the disk mirrors.
    pub nbd_port: u16,
}

/// Tuning of one migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Longest acceptable pause at switchover (QEMU `downtime-limit`).
    pub max_downtime_ms: u32,
    /// Bandwidth cap in MiB/s; 0 is unlimited.
    pub bandwidth_mib_per_second: u32,
    /// Throttle vCPUs when pre-copy does not converge.
    pub auto_converge: bool,
    /// Switch to post-copy after this many pre-copy passes (`None`: pre-copy only).
    /// The target must have been started with `listen_incoming(.., post_copy: true)`.
    pub post_copy_after_passes: Option<u64>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_downtime_ms: 300,
            bandwidth_mib_per_second: 0,
            auto_converge: true,
            post_copy_after_passes: None,
        }
    }
}

/// What a source has done so far; sent to the progress callback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// `mirroring`, `precopy`, `switchover`, `postcopy`.
    pub stage: &'static str,
    /// Disk bytes copied / to copy (all mirrors).
    pub disk_done: u64,
    /// Disk bytes total.
    pub disk_total: u64,
    /// Memory bytes sent so far.
    pub ram_transferred: u64,
    /// Memory bytes still to send.
    pub ram_remaining: u64,
    /// Pre-copy passes.
    pub iterations: u64,
}

/// The outcome on the source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Whole migration, mirrors included.
    pub total_ms: u64,
    /// Guest pause on the source as QEMU measured it (vCPU stop to final state sent).
    pub downtime_ms: u64,
    /// Memory bytes sent.
    pub ram_bytes: u64,
    /// Disk bytes mirrored.
    pub disk_bytes: u64,
    /// Whether the migration ended in post-copy.
    pub post_copy: bool,
}

/// Writes the PSK file QEMU's `tls-creds-psk` reads (`<dir>/keys.psk`, mode 0600).
pub fn write_psk(dir: &Path, key: &[u8]) -> Result<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if key.len() < 16 {
        return Err(VmmError::Migration {
            op: "tls",
            reason: format!("PSK of {} bytes is too short (16 at least)", key.len()),
        });
    }
    std::fs::create_dir_all(dir).map_err(io_err("creating TLS dir", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("restricting TLS dir", dir))?;
    let file = dir.join("keys.psk");
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)
        .map_err(io_err("writing PSK", &file))?;
    std::io::Write::write_all(&mut f, format!("{PSK_USERNAME}:{hex}\n").as_bytes())
        .map_err(io_err("writing PSK", &file))?;
    Ok(file)
}

async fn add_tls(qmp: &QmpClient, dir: &Path, endpoint: &str) -> Result<()> {
    add_tls_object(qmp, TLS_CREDS_ID, dir, endpoint).await
}

/// Adds (or replaces) the `tls-creds-psk` object `id` reading `<dir>/keys.psk`, as
/// `endpoint` (`client` or `server`). Shared with disk replication, whose mirrors
/// take the same kind of key.
pub(crate) async fn add_tls_object(
    qmp: &QmpClient,
    id: &str,
    dir: &Path,
    endpoint: &str,
) -> Result<()> {
    // Idempotent: a retried call finds the object already there.
    let _ = qmp.execute("object-del", Some(json!({"id": id}))).await;
    let mut args = json!({"qom-type": "tls-creds-psk", "id": id,
                          "dir": dir, "endpoint": endpoint});
    if endpoint == "client" {
        // The server looks the identity up in its keys.psk.
        args["username"] = json!(PSK_USERNAME);
    }
    qmp.execute("object-add", Some(args)).await.map(drop)
}

fn mirror_job(disk: &str) -> String {
    format!("mig-{disk}")
}

pub(crate) fn disk_node(disk: &str) -> String {
    format!("disk-{disk}")
}

/// `postcopy-ram` is set as asked on both sides: a capability left on from an earlier
/// attempt must not outlive the migration that allowed it.
async fn set_capabilities(qmp: &QmpClient, source: Option<&Tuning>, post_copy: bool) -> Result<()> {
    let mut caps = vec![
        json!({"capability": "events", "state": true}),
        json!({"capability": "postcopy-ram", "state": post_copy}),
    ];
    if let Some(tuning) = source {
        caps.push(json!({"capability": "pause-before-switchover", "state": true}));
        caps.push(json!({"capability": "auto-converge", "state": tuning.auto_converge}));
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": caps})),
    )
    .await
    .map(drop)
}

/// Target, step 1: TLS credential, writable NBD exports of `disks` (their top
/// overlays), and the incoming memory listener. QEMU must run with
/// `-incoming defer -S`. `post_copy` lets the source switch to post-copy; QEMU refuses
/// it (an error here) where userfaultfd does not work.
pub async fn listen_incoming(
    qmp: &QmpClient,
    endpoint: &TargetEndpoint,
    disks: &[String],
    tls_dir: Option<&Path>,
    post_copy: bool,
) -> Result<()> {
    let tls = tls_dir.is_some();
    if let Some(dir) = tls_dir {
        add_tls(qmp, dir, "server").await?;
    }
    set_capabilities(qmp, None, post_copy)
        .await
        .map_err(|e| match e {
            VmmError::QmpCommand { desc, .. } if post_copy => VmmError::Migration {
                op: "post-copy on the target",
                reason: desc,
            },
            e => e,
        })?;
    if tls {
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({"tls-creds": TLS_CREDS_ID})),
        )
        .await?;
    }
    if !disks.is_empty() {
        // nbd-server-start takes the legacy (nested `data`) socket address.
        let mut args = json!({"addr": {"type": "inet", "data": {"host": endpoint.host,
                                       "port": endpoint.nbd_port.to_string()}}});
        if tls {
            args["tls-creds"] = json!(TLS_CREDS_ID);
        }
        qmp.execute("nbd-server-start", Some(args)).await?;
        for d in disks {
            // Exporting activates the (not yet migrated) overlay so it takes the
            // mirror's writes: this is QEMU's non-shared-storage migration path.
            qmp.execute(
                "block-export-add",
                Some(
                    json!({"type": "nbd", "id": mirror_job(d), "node-name": disk_node(d),
                            "name": disk_node(d), "writable": true}),
                ),
            )
            .await?;
        }
    }
    let uri = format!("tcp:{}:{}", endpoint.host, endpoint.migration_port);
    qmp.execute("migrate-incoming", Some(json!({"uri": uri})))
        .await
        .map(drop)
}

/// Target, step 4: waits for the incoming migration to complete, stops the NBD server
/// and resumes the guest. Returns the time from completion to running, in ms.
pub async fn finish_incoming(qmp: &QmpClient, timeout: Duration) -> Result<u64> {
    let deadline = Deadline::after(timeout);
    let mut events = qmp.subscribe();
    loop {
        let v = qmp.execute("query-migrate", None).await?;
        match status_of(&v) {
            "completed" => break,
            "failed" | "cancelled" => return Err(failed("incoming migration", &v)),
            _ => {}
        }
        if qmp.run_state().await? == "paused" {
            // -S: paused after the final state arrived (some QEMUs report no status).
            break;
        }
        deadline.check("the incoming migration")?;
        nap(&mut events, Duration::from_millis(100)).await;
    }
    let done = Instant::now();
    let _ = qmp.execute("nbd-server-stop", None).await;
    qmp.execute("cont", None).await?;
    Ok(u64::try_from(done.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// Source: mirrors `disks` to the target, pre-copies memory, switches over. On error
/// the VM keeps running here.
pub async fn migrate_to(
    qmp: &QmpClient,
    endpoint: &TargetEndpoint,
    disks: &[String],
    tls_dir: Option<&Path>,
    tuning: &Tuning,
    timeout: Duration,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Report> {
    let started = Instant::now();
    let deadline = Deadline::after(timeout);
    let result = async {
        if let Some(dir) = tls_dir {
            add_tls(qmp, dir, "client").await?;
        }
        let disk_bytes =
            mirror_disks(qmp, endpoint, disks, tls_dir.is_some(), deadline, progress).await?;
        set_capabilities(qmp, Some(tuning), tuning.post_copy_after_passes.is_some()).await?;
        let mut params = json!({
            "downtime-limit": tuning.max_downtime_ms,
            "max-bandwidth": u64::from(tuning.bandwidth_mib_per_second) << 20,
        });
        if tuning.bandwidth_mib_per_second == 0 {
            // QEMU's default cap is 128 MiB/s; "unlimited" is a large number.
            params["max-bandwidth"] = json!(u64::MAX >> 2);
        }
        if tls_dir.is_some() {
            params["tls-creds"] = json!(TLS_CREDS_ID);
        }
        qmp.execute("migrate-set-parameters", Some(params)).await?;
        let uri = format!("tcp:{}:{}", endpoint.host, endpoint.migration_port);
        qmp.execute("migrate", Some(json!({"uri": uri}))).await?;
        let mut report = precopy_and_switch(qmp, disks, tuning, deadline, progress).await?;
        report.disk_bytes = disk_bytes;
        Ok(report)
    }
    .await;
    match result {
        Ok(mut report) => {
            report.total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            drop_mirror_nodes(qmp, disks).await;
            Ok(report)
        }
        Err(e) => match rollback(qmp, disks).await {
            // Unknown: QEMU is gone or silent; its launcher sees that.
            Rollback::RolledBack | Rollback::Unknown => Err(e),
            // The error came after QEMU had sent the final state (a QMP reply lost, a
            // deadline hit at the last moment): the target has the guest.
            Rollback::Completed => {
                tracing::warn!(error = %e, "migration error after QEMU completed it; the target owns the VM");
                drop_mirror_nodes(qmp, disks).await;
                Ok(Report {
                    total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    ..Report::default()
                })
            }
            Rollback::PostCopy => Err(VmmError::Migration {
                op: "post-copy",
                reason: format!(
                    "{e}; the guest already runs on the target and this node holds part of its \
                     memory: the source QEMU stays paused (QEMU can resume the post-copy)"
                ),
            }),
        },
    }
}

async fn mirror_disks(
    qmp: &QmpClient,
    endpoint: &TargetEndpoint,
    disks: &[String],
    tls: bool,
    deadline: Deadline,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<u64> {
    for d in disks {
        let mut server = json!({"driver": "nbd", "node-name": mirror_job(d),
            "server": {"type": "inet", "host": endpoint.host, "port": endpoint.nbd_port.to_string()},
            "export": disk_node(d)});
        if tls {
            server["tls-creds"] = json!(TLS_CREDS_ID);
        }
        qmp.execute("blockdev-add", Some(server)).await?;
        // write-blocking: once in sync, guest writes complete only when the target has
        // them too, so the mirrors cannot fall behind a busy guest.
        qmp.execute(
            "blockdev-mirror",
            Some(json!({"job-id": mirror_job(d), "device": disk_node(d),
                        "target": mirror_job(d), "sync": "top",
                        "copy-mode": "write-blocking", "auto-dismiss": false})),
        )
        .await?;
    }
    loop {
        let jobs = mirror_jobs(qmp, disks).await?;
        if let Some(err) = jobs.iter().find_map(|j| j.error.clone()) {
            return Err(VmmError::Migration {
                op: "disk mirror",
                reason: err,
            });
        }
        let (done, total) = jobs
            .iter()
            .fold((0, 0), |(d, t), j| (d + j.offset, t + j.len));
        progress(&Progress {
            stage: "mirroring",
            disk_done: done,
            disk_total: total,
            ..Progress::default()
        });
        if jobs.len() == disks.len() && jobs.iter().all(|j| j.ready) {
            return Ok(total);
        }
        deadline.check("the disk mirrors to be in sync")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One block job as `query-block-jobs` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorJob {
    /// Job id.
    pub id: String,
    /// In sync (a mirror's `BLOCK_JOB_READY`).
    pub ready: bool,
    /// Bytes copied so far.
    pub offset: u64,
    /// Bytes to copy in all (grows with guest writes not yet copied).
    pub len: u64,
    /// `running`, `ready`, `concluded`, ...
    pub status: String,
    /// Why it failed, once it did.
    pub error: Option<String>,
}

async fn mirror_jobs(qmp: &QmpClient, disks: &[String]) -> Result<Vec<MirrorJob>> {
    let ours: Vec<String> = disks.iter().map(|d| mirror_job(d)).collect();
    block_jobs(qmp, &ours).await
}

/// The block jobs among `ours` that QEMU has.
pub(crate) async fn block_jobs(qmp: &QmpClient, ours: &[String]) -> Result<Vec<MirrorJob>> {
    let v = qmp.execute("query-block-jobs", None).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| {
            let id = j.get("device")?.as_str()?.to_string();
            ours.contains(&id).then(|| MirrorJob {
                ready: j.get("ready").and_then(Value::as_bool).unwrap_or(false),
                offset: j.get("offset").and_then(Value::as_u64).unwrap_or(0),
                len: j.get("len").and_then(Value::as_u64).unwrap_or(0),
                status: j
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                error: j.get("error").and_then(Value::as_str).map(str::to_string),
                id,
            })
        })
        .collect())
}

async fn precopy_and_switch(
    qmp: &QmpClient,
    disks: &[String],
    tuning: &Tuning,
    deadline: Deadline,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Report> {
    let mut switched = false;
    // Asked for, and seen: QEMU's MIGRATION event says when it really switched (the
    // post-copy phase can be too short for a status poll to catch).
    let mut post_copy_asked = false;
    let mut post_copy = false;
    let mut events = qmp.subscribe();
    loop {
        let v = qmp.execute("query-migrate", None).await?;
        let ram = v.get("ram");
        let num = |k: &str| {
            ram.and_then(|r| r.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let status = status_of(&v);
        progress(&Progress {
            stage: if post_copy || postcopy::is_postcopy_status(status) {
                "postcopy"
            } else if switched || status == "pre-switchover" {
                "switchover"
            } else {
                "precopy"
            },
            ram_transferred: num("transferred"),
            ram_remaining: num("remaining"),
            iterations: num("dirty-sync-count"),
            ..Progress::default()
        });
        match status {
            "completed" => {
                while let Ok(e) = events.try_recv() {
                    post_copy |= postcopy::is_postcopy_event(&e);
                }
                return Ok(Report {
                    downtime_ms: v.get("downtime").and_then(Value::as_u64).unwrap_or(0),
                    ram_bytes: num("transferred"),
                    post_copy,
                    ..Report::default()
                });
            }
            "failed" | "cancelled" => return Err(failed("migration", &v)),
            "postcopy-paused" => {
                return Err(VmmError::Migration {
                    op: "post-copy",
                    reason: "the link to the target broke".into(),
                });
            }
            s if postcopy::should_switch(
                s,
                num("dirty-sync-count"),
                tuning.post_copy_after_passes,
                post_copy_asked,
            ) =>
            {
                // QEMU switches at the end of the current pass, through pre-switchover.
                qmp.execute("migrate-start-postcopy", None).await?;
                post_copy_asked = true;
            }
            "pre-switchover" if !switched => {
                // vCPUs are stopped: finish the mirrors, then let QEMU send the rest.
                complete_mirrors(qmp, disks, deadline).await?;
                qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
                    .await?;
                switched = true;
            }
            _ => {}
        }
        // Past the switch to post-copy the guest runs on the target, which needs the
        // rest of its memory from here: giving up then would lose the VM.
        if !post_copy && !postcopy::is_postcopy_status(status) {
            deadline.check("the migration to complete")?;
        }
        if let Some(e) = nap(&mut events, Duration::from_millis(100)).await {
            post_copy |= postcopy::is_postcopy_event(&e);
        }
    }
}

async fn complete_mirrors(qmp: &QmpClient, disks: &[String], deadline: Deadline) -> Result<()> {
    for d in disks {
        // Cancelling a ready mirror completes it: the target holds every write.
        qmp.execute("block-job-cancel", Some(json!({"device": mirror_job(d)})))
            .await?;
    }
    let mut events = qmp.subscribe();
    loop {
        let jobs = mirror_jobs(qmp, disks).await?;
        if let Some(j) = jobs.iter().find(|j| j.error.is_some()) {
            return Err(VmmError::Migration {
                op: "disk mirror",
                reason: format!("{}: {}", j.id, j.error.clone().unwrap_or_default()),
            });
        }
        if jobs.iter().all(|j| j.status == "concluded") {
            for j in &jobs {
                qmp.execute("job-dismiss", Some(json!({"id": j.id})))
                    .await?;
            }
            return Ok(());
        }
        deadline.check("the disk mirrors to complete")?;
        nap(&mut events, Duration::from_millis(50)).await;
    }
}

async fn drop_mirror_nodes(qmp: &QmpClient, disks: &[String]) {
    for d in disks {
        let _ = qmp
            .execute("blockdev-del", Some(json!({"node-name": mirror_job(d)})))
            .await;
    }
}

/// What a source's rollback found, from its own QEMU's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rollback {
    /// The migration stopped before completing; the guest runs here again (or never
    /// stopped).
    RolledBack,
    /// QEMU had reported the migration completed: the target holds the guest, this
    /// copy is stale and stays paused (`postmigrate`). Nothing was touched.
    Completed,
    /// The migration is in post-copy: the guest runs on the target, which still needs
    /// pages from here. Nothing was touched.
    PostCopy,
    /// QEMU did not answer (gone, or its monitor broke): nothing was resumed on a
    /// guess.
    Unknown,
}

/// Who owns the guest, given the source QEMU's `query-migrate` status and
/// `query-status` run state: `None` while the source may still resume it.
/// `postmigrate` alone counts as completed (QEMU enters it only when a migration
/// ended with the guest sent, and a status read after a QEMU restart says `none`).
pub fn source_verdict(migrate_status: &str, run_state: &str) -> Option<Rollback> {
    if postcopy::is_postcopy_status(migrate_status) {
        Some(Rollback::PostCopy)
    } else if migrate_status == "completed" || run_state == "postmigrate" {
        Some(Rollback::Completed)
    } else {
        None
    }
}

/// `query-migrate` statuses in which the migration has not ended yet.
fn migration_in_flight(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug"
    ) || postcopy::is_postcopy_status(status)
}

/// Reads who owns the guest now; an unreadable state is an error (the caller must
/// not guess: resuming on a guess could run the guest twice).
pub async fn source_state(qmp: &QmpClient) -> Result<(String, String)> {
    let v = qmp.execute("query-migrate", None).await?;
    let run_state = qmp.run_state().await?;
    Ok((status_of(&v).to_string(), run_state))
}

/// Undoes a failed or cancelled source side: the VM keeps running here. Refuses,
/// touching nothing, once QEMU reported the migration completed or in post-copy:
/// the target runs the guest then, and resuming this (stale) copy would run it twice.
/// A cancel that races the completion waits for QEMU to settle and loses if the
/// completion came first. An unreadable QEMU state resumes nothing (`Unknown`).
pub async fn rollback(qmp: &QmpClient, disks: &[String]) -> Rollback {
    let Ok((status, run_state)) = source_state(qmp).await else {
        return Rollback::Unknown;
    };
    if let Some(v) = source_verdict(&status, &run_state) {
        return v;
    }
    let _ = qmp.execute("migrate_cancel", None).await;
    // The migration thread may be sending the final state right now: the cancel then
    // comes too late and QEMU reports `completed`. Wait until it says which.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let Ok((status, run_state)) = source_state(qmp).await else {
            return Rollback::Unknown;
        };
        if let Some(v) = source_verdict(&status, &run_state) {
            return v;
        }
        if !migration_in_flight(&status) || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in disks {
        let _ = qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": mirror_job(d), "force": true})),
            )
            .await;
    }
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        match mirror_jobs(qmp, disks).await {
            Ok(jobs) if jobs.iter().all(|j| j.status == "concluded") => {
                for j in &jobs {
                    let _ = qmp.execute("job-dismiss", Some(json!({"id": j.id}))).await;
                }
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => break,
        }
    }
    drop_mirror_nodes(qmp, disks).await;
    // A failure after the vCPUs stopped (pre-switchover) leaves the guest paused. Read
    // again right before `cont`: never resume a copy QEMU calls migrated.
    if let Ok((status, state)) = source_state(qmp).await {
        if let Some(v) = source_verdict(&status, &state) {
            return v;
        }
        if matches!(state.as_str(), "paused" | "finish-migrate") {
            let _ = qmp.execute("cont", None).await;
        }
    }
    Rollback::RolledBack
}

/// Whether the source's migration has switched to post-copy (the guest runs on the
/// target). An unreadable status counts as not: nothing moved then.
pub async fn in_post_copy(qmp: &QmpClient) -> bool {
    match qmp.execute("query-migrate", None).await {
        Ok(v) => postcopy::is_postcopy_status(status_of(&v)),
        Err(_) => false,
    }
}

/// Waits up to `max`, waking at once on any QMP event: migration and job state
/// changes arrive as events, and every millisecond here is guest pause at switchover.
async fn nap(
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>,
    max: Duration,
) -> Option<crate::qmp::QmpEvent> {
    tokio::time::timeout(max, events.recv()).await.ok()?.ok()
}

fn status_of(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("none")
}

fn failed(op: &'static str, v: &Value) -> VmmError {
    VmmError::Migration {
        op,
        reason: v
            .get("error-desc")
            .and_then(Value::as_str)
            .unwrap_or(status_of(v))
            .to_string(),
    }
}

/// The end of a bounded wait, and its length for the error message.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    at: Instant,
    total: Duration,
}

impl Deadline {
    fn after(total: Duration) -> Self {
        Self {
            at: Instant::now() + total,
            total,
        }
    }

    fn check(self, what: &str) -> Result<()> {
        if Instant::now() >= self.at {
            return Err(VmmError::Timeout {
                what: what.to_string(),
                secs: self.total.as_secs_f64(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_never_resumed_once_qemu_completed_or_switched_to_post_copy() {
        // Still ours: running, paused at pre-switchover, a migration that failed.
        for (status, state) in [
            ("active", "running"),
            ("pre-switchover", "finish-migrate"),
            ("device", "finish-migrate"),
            ("cancelled", "running"),
            ("failed", "paused"),
            ("none", "running"),
        ] {
            assert_eq!(source_verdict(status, state), None, "{status}/{state}");
        }
        assert_eq!(
            source_verdict("completed", "postmigrate"),
            Some(Rollback::Completed)
        );
        // Completed a moment ago, cleanup not done yet.
        assert_eq!(
            source_verdict("completed", "finish-migrate"),
            Some(Rollback::Completed)
        );
        // A status lost (a new QMP view) but the run state says migrated.
        assert_eq!(
            source_verdict("none", "postmigrate"),
            Some(Rollback::Completed)
        );
        for status in ["postcopy-active", "postcopy-paused", "postcopy-recover"] {
            assert_eq!(
                source_verdict(status, "finish-migrate"),
                Some(Rollback::PostCopy)
            );
        }
    }

    #[test]
    fn a_cancel_waits_while_qemu_may_still_complete() {
        for s in [
            "setup",
            "active",
            "pre-switchover",
            "device",
            "cancelling",
            "postcopy-active",
        ] {
            assert!(migration_in_flight(s), "{s}");
        }
        for s in ["none", "completed", "failed", "cancelled"] {
            assert!(!migration_in_flight(s), "{s}");
        }
    }
}
