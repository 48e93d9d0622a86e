//! Replicated VM disks: QEMU keeps a copy of a disk's top overlay on another node.
//!
//! The replica node serves an empty overlay over the same content-addressed base as
//! an NBD export (TLS-PSK, `qemu-storage-daemon` run by its agent). Here, on the VM's
//! node, QEMU runs `blockdev-mirror sync=top` of the disk's top overlay into that
//! export and the job is left running in the ready state, never completed:
//! - `Synchronous` (`copy-mode: write-blocking`): once ready, a guest write completes
//!   only when the replica has it too, so no acknowledged write is lost with the node;
//! - `Asynchronous` (`copy-mode: background`): guest writes complete on the local
//!   overlay and are copied after; the lag (`len - offset`) is what a node loss loses.
//!
//! Errors: `on-target-error: report`. A failed write to the replica never fails or
//! stalls the guest's write (the mirror marks the range dirty and the job ends with
//! the error); `stop` would pause the job (not the guest) and leave a write-blocking
//! mirror waiting for someone to resume it, `ignore` would retry forever against a
//! replica that is gone. A lost connection is retried for [`RECONNECT_DELAY_S`]
//! (guest writes wait that long at most in Synchronous mode), so a replica agent that
//! restarts within that keeps the mirror; after it the job fails and the replication
//! is Broken: the VM runs on, unreplicated, until a new replica is built.
//!
//! The TLS credential and key file work as for live migration (`migration::write_psk`);
//! the key is made by the operator per replica and reaches both agents only over
//! their mTLS channel.

use crate::migration::{self, MirrorJob};
use crate::qmp::QmpClient;
use crate::{Result, VmmError};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the NBD client waits for a lost replica connection to come back before
/// failing the writes in flight (and with them the mirror job).
pub const RECONNECT_DELAY_S: u64 = 5;

/// How writes reach the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A guest write completes once the replica has it (`write-blocking`).
    Synchronous,
    /// Guest writes complete locally and are copied in the background.
    Asynchronous,
}

impl Mode {
    /// The mirror's `copy-mode`.
    pub fn copy_mode(self) -> &'static str {
        match self {
            Mode::Synchronous => "write-blocking",
            Mode::Asynchronous => "background",
        }
    }
}

/// Where a disk's replica is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaEndpoint {
    /// The replica node's address.
    pub host: String,
    /// Its NBD port.
    pub port: u16,
    /// The export's name.
    pub export: String,
}

/// Where a replication is, from its mirror job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// First copy of the top overlay in progress.
    Syncing,
    /// The job is ready: Synchronous, every acknowledged write is on the replica;
    /// Asynchronous, `lag` bytes are still to copy.
    InSync,
    /// The job is gone or failed: the VM runs unreplicated.
    Broken(String),
}

/// A replication as the VM's QEMU sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Its state.
    pub state: State,
    /// Bytes copied.
    pub offset: u64,
    /// Bytes to copy in all.
    pub len: u64,
    /// Bytes written locally and not yet on the replica (`len - offset`).
    pub lag: u64,
}

/// The mirror job of a disk's replication (also the NBD client's node name).
pub fn job_id(disk: &str) -> String {
    format!("rep-{disk}")
}

/// The QOM id of a disk's replication TLS credential.
pub fn tls_id(disk: &str) -> String {
    format!("hvx-rep-tls-{disk}")
}

/// The NBD export name a replica of `disk` is served under.
pub fn export_name(disk: &str) -> String {
    format!("disk-{disk}")
}

/// `blockdev-add` arguments of the NBD client to the replica (pure).
pub fn target_args(disk: &str, ep: &ReplicaEndpoint) -> Value {
    json!({
        "driver": "nbd",
        "node-name": job_id(disk),
        "server": {"type": "inet", "host": ep.host, "port": ep.port.to_string()},
        "export": ep.export,
        "tls-creds": tls_id(disk),
        "reconnect-delay": RECONNECT_DELAY_S,
    })
}

/// `blockdev-mirror` arguments (pure): the top overlay only (the replica has the
/// base), never auto-dismissed so a failure stays readable, errors reported.
pub fn mirror_args(disk: &str, mode: Mode) -> Value {
    json!({
        "job-id": job_id(disk),
        "device": migration::disk_node(disk),
        "target": job_id(disk),
        "sync": "top",
        "copy-mode": mode.copy_mode(),
        "on-source-error": "report",
        "on-target-error": "report",
        "auto-dismiss": false,
    })
}

/// The state of a replication from its job (pure). `None`: QEMU has no such job.
pub fn status_of(job: Option<&MirrorJob>) -> Status {
    let Some(j) = job else {
        return Status {
            state: State::Broken("QEMU has no replication job for this disk".into()),
            offset: 0,
            len: 0,
            lag: 0,
        };
    };
    let lag = j.len.saturating_sub(j.offset);
    let state = if let Some(e) = &j.error {
        State::Broken(e.clone())
    } else if matches!(
        j.status.as_str(),
        "concluded" | "aborting" | "null" | "undefined"
    ) {
        State::Broken(format!("the mirror job ended ({})", j.status))
    } else if j.ready {
        State::InSync
    } else {
        State::Syncing
    };
    Status {
        state,
        offset: j.offset,
        len: j.len,
        lag,
    }
}

/// Starts replicating `disk` to `ep` (the key already in `<tls_dir>/keys.psk`).
/// Idempotent: a job of this disk that still runs is kept; a failed one is cleared
/// first.
pub async fn start(
    qmp: &QmpClient,
    disk: &str,
    ep: &ReplicaEndpoint,
    tls_dir: &Path,
    mode: Mode,
) -> Result<Status> {
    if let Some(job) = job(qmp, disk).await? {
        let s = status_of(Some(&job));
        if !matches!(s.state, State::Broken(_)) {
            return Ok(s);
        }
        clear(qmp, disk).await;
    }
    migration::add_tls_object(qmp, &tls_id(disk), tls_dir, "client").await?;
    let _ = qmp
        .execute("blockdev-del", Some(json!({"node-name": job_id(disk)})))
        .await;
    let started = async {
        qmp.execute("blockdev-add", Some(target_args(disk, ep)))
            .await?;
        qmp.execute("blockdev-mirror", Some(mirror_args(disk, mode)))
            .await
    }
    .await;
    if let Err(e) = started {
        clear(qmp, disk).await;
        return Err(VmmError::Replication {
            disk: disk.to_string(),
            reason: e.to_string(),
        });
    }
    status(qmp, disk).await
}

/// The job of `disk`'s replication, if QEMU has one.
pub async fn job(qmp: &QmpClient, disk: &str) -> Result<Option<MirrorJob>> {
    Ok(migration::block_jobs(qmp, &[job_id(disk)])
        .await?
        .into_iter()
        .next())
}

/// Where `disk`'s replication is.
pub async fn status(qmp: &QmpClient, disk: &str) -> Result<Status> {
    Ok(status_of(job(qmp, disk).await?.as_ref()))
}

/// Waits until the replication is in sync (or broken: an error).
pub async fn wait_in_sync(qmp: &QmpClient, disk: &str, timeout: Duration) -> Result<Status> {
    let until = Instant::now() + timeout;
    loop {
        let s = status(qmp, disk).await?;
        match &s.state {
            State::InSync => return Ok(s),
            State::Broken(why) => {
                return Err(VmmError::Replication {
                    disk: disk.to_string(),
                    reason: why.clone(),
                });
            }
            State::Syncing => {}
        }
        if Instant::now() >= until {
            return Err(VmmError::Timeout {
                what: format!("replication of disk {disk} to be in sync"),
                secs: timeout.as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops replicating `disk` (the replica keeps what it had; it is no longer
/// updated) and removes the job, the NBD client and the credential. Already
/// stopped: nothing to do.
pub async fn stop(qmp: &QmpClient, disk: &str) -> Result<()> {
    if job(qmp, disk).await?.is_some() {
        // force: a ready mirror cancelled without it would first wait to complete.
        let _ = qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": job_id(disk), "force": true})),
            )
            .await;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match job(qmp, disk).await? {
                Some(j) if j.status != "concluded" => {}
                _ => break,
            }
            if Instant::now() >= until {
                return Err(VmmError::Timeout {
                    what: format!("the replication job of disk {disk} to end"),
                    secs: 30.0,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    clear(qmp, disk).await;
    Ok(())
}

/// Drops an ended job, the NBD client node and the credential (each may be gone).
async fn clear(qmp: &QmpClient, disk: &str) {
    let id = job_id(disk);
    let _ = qmp.execute("job-dismiss", Some(json!({"id": id}))).await;
    let _ = qmp
        .execute("blockdev-del", Some(json!({"node-name": id})))
        .await;
    let _ = qmp
        .execute("object-del", Some(json!({"id": tls_id(disk)})))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: &str, ready: bool, offset: u64, len: u64, error: Option<&str>) -> MirrorJob {
        MirrorJob {
            id: job_id("boot"),
            ready,
            offset,
            len,
            status: status.into(),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn synchronous_mirrors_block_writes_and_never_stop_the_guest() {
        let a = mirror_args("boot", Mode::Synchronous);
        assert_eq!(a["copy-mode"], "write-blocking");
        assert_eq!(a["sync"], "top");
        assert_eq!(a["device"], "disk-boot");
        assert_eq!(a["target"], "rep-boot");
        assert_eq!(a["on-target-error"], "report");
        assert_eq!(a["auto-dismiss"], false);
        assert_eq!(
            mirror_args("boot", Mode::Asynchronous)["copy-mode"],
            "background"
        );
    }

    #[test]
    fn the_nbd_client_always_uses_tls_and_a_bounded_reconnect() {
        let ep = ReplicaEndpoint {
            host: "10.0.0.2".into(),
            port: 10809,
            export: export_name("boot"),
        };
        let t = target_args("boot", &ep);
        assert_eq!(t["tls-creds"], "hvx-rep-tls-boot");
        assert_eq!(t["server"]["port"], "10809");
        assert_eq!(t["export"], "disk-boot");
        assert_eq!(t["reconnect-delay"], RECONNECT_DELAY_S);
    }

    #[test]
    fn states_follow_the_job() {
        assert_eq!(
            status_of(Some(&job("running", false, 10, 100, None))).state,
            State::Syncing
        );
        let s = status_of(Some(&job("ready", true, 90, 100, None)));
        assert_eq!((s.state, s.lag), (State::InSync, 10));
        assert_eq!(
            status_of(Some(&job(
                "concluded",
                false,
                10,
                100,
                Some("Input/output error")
            )))
            .state,
            State::Broken("Input/output error".into())
        );
        assert!(matches!(
            status_of(Some(&job("concluded", true, 100, 100, None))).state,
            State::Broken(_)
        ));
        assert!(matches!(status_of(None).state, State::Broken(_)));
        // A job whose len lags its offset (QEMU's counters race) never underflows.
        assert_eq!(status_of(Some(&job("ready", true, 100, 90, None))).lag, 0);
    }
}
