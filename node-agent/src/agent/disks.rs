//! PrepareDisk, EnsureOverlay, DeleteOverlay, ReleaseDisk: the disk store behind the
//! contract. One import task per OverlayDisk UID; later callers attach to its
//! progress; a finished import is remembered by UID so repeated calls answer READY
//! at once.

use super::convert::import_source;
use super::error::AgentError;
use super::{Agent, remove_file, vms, write_atomic};
use hvx_proto::v1 as pb;
use hvx_storage::ImportPhase;
use pb::disk_progress::Phase;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the agent remembers of an imported OverlayDisk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskRecord {
    /// Hex sha256 of the base.
    pub digest: String,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Detected source format.
    pub format: String,
    /// Bytes fetched.
    pub source_bytes: u64,
}

pub(crate) fn check_uid(uid: &str) -> Result<(), AgentError> {
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "disk UID {uid:?} is not a Kubernetes UID"
        )))
    }
}

pub(crate) fn record_path(agent: &Agent, uid: &str) -> PathBuf {
    agent
        .paths
        .agent_state()
        .join("disks")
        .join(format!("{uid}.json"))
}

fn load_record(agent: &Agent, uid: &str) -> Option<DiskRecord> {
    let text = std::fs::read(record_path(agent, uid)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The READY message of a recorded import.
pub fn ready_message(r: &DiskRecord) -> pb::DiskProgress {
    pb::DiskProgress {
        phase: Phase::Ready as i32,
        bytes_done: r.source_bytes,
        bytes_total: r.source_bytes,
        detected_format: r.format.clone(),
        virtual_bytes: r.virtual_size,
        actual_bytes: 0,
        digest: format!("sha256:{}", r.digest),
        message: String::new(),
    }
}

/// Starts (or joins) the import of `req`; returns the progress channel.
pub fn prepare(
    agent: &Arc<Agent>,
    req: pb::PrepareDiskRequest,
) -> Result<watch::Receiver<pb::DiskProgress>, AgentError> {
    check_uid(&req.disk_uid)?;
    if let Some(r) = load_record(agent, &req.disk_uid)
        && agent.store.base(&r.digest).is_ok()
    {
        let (_tx, rx) = watch::channel(ready_message(&r));
        return Ok(rx);
    }
    let source = req.source.clone().unwrap_or_default();
    // An upload is imported from the completed copy this node's store holds (PutUpload);
    // nodes without one get the base from a node that has it (ImportBase).
    let uploaded = match &source.kind {
        Some(pb::disk_source::Kind::Upload(uid)) if *uid != req.disk_uid => {
            return Err(AgentError::Invalid(format!(
                "an upload source names its own disk ({}), not {uid}",
                req.disk_uid
            )));
        }
        Some(pb::disk_source::Kind::Upload(_)) => {
            let path = super::uploads::complete_path(agent, &req.disk_uid);
            if !path.is_file() {
                return Err(AgentError::Precondition(format!(
                    "this node holds no completed upload of disk {}: it gets the base from a node that imported it",
                    req.disk_uid
                )));
            }
            Some(hvx_storage::ImportSource::Uploaded { path })
        }
        _ => None,
    };
    // A blank disk has nothing to fetch: its base is the store's empty one and its
    // size is the declared capacity (see `hvx_storage::blank`).
    let blank = match source.kind {
        Some(pb::disk_source::Kind::BlankBytes(0)) => {
            return Err(AgentError::Invalid(
                "a blank disk needs spec.capacity (its size)".into(),
            ));
        }
        Some(pb::disk_source::Kind::BlankBytes(n)) => Some(n),
        _ => None,
    };
    let import = match (blank, uploaded) {
        (Some(_), _) => None,
        (None, Some(u)) => Some(u),
        (None, None) => Some(import_source(&source)?),
    };
    let mut imports = agent.imports.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rx) = imports.get(&req.disk_uid) {
        return Ok(rx.clone());
    }
    let (tx, rx) = watch::channel(pb::DiskProgress {
        phase: Phase::Downloading as i32,
        ..Default::default()
    });
    imports.insert(req.disk_uid.clone(), rx.clone());
    drop(imports);
    let agent = agent.clone();
    tokio::spawn(async move {
        let tx = Arc::new(tx);
        let last = Arc::new(std::sync::Mutex::new((Instant::now(), None::<ImportPhase>)));
        let progress: hvx_storage::ProgressFn = {
            let tx = tx.clone();
            Arc::new(move |phase, done, total| {
                let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                // At most ~3 updates a second, plus every phase change.
                if l.1 == Some(phase) && l.0.elapsed() < Duration::from_millis(300) {
                    return;
                }
                *l = (Instant::now(), Some(phase));
                let _ = tx.send(pb::DiskProgress {
                    phase: match phase {
                        ImportPhase::Fetching => Phase::Downloading,
                        ImportPhase::Converting => Phase::Converting,
                    } as i32,
                    bytes_done: done,
                    bytes_total: total,
                    ..Default::default()
                });
            })
        };
        let checksum =
            (!req.expected_checksum.is_empty()).then_some(req.expected_checksum.as_str());
        let started = Instant::now();
        let result = match (&import, blank) {
            (Some(import), _) => agent.store.import(import, checksum, Some(progress)).await,
            (None, _) => agent.store.blank_base().await,
        };
        let msg = match result {
            Ok(base) => {
                let rec = DiskRecord {
                    digest: base.digest.clone(),
                    // The empty base has size 0; the overlay gets the declared size.
                    virtual_size: blank.unwrap_or(base.virtual_size),
                    format: format!("{:?}/{}", base.source_format, base.source_subformat)
                        .to_ascii_lowercase(),
                    source_bytes: base.source_bytes,
                };
                match serde_json::to_vec_pretty(&rec)
                    .map_err(|e| AgentError::Invalid(e.to_string()))
                    .and_then(|b| write_atomic(&record_path(&agent, &req.disk_uid), &b))
                {
                    Ok(()) => {
                        tracing::info!(disk = %req.name, uid = %req.disk_uid, digest = %rec.digest,
                            secs = started.elapsed().as_secs(), "disk imported");
                        ready_message(&rec)
                    }
                    Err(e) => failed(&e.to_string()),
                }
            }
            Err(e) => {
                let e = AgentError::from(e);
                tracing::warn!(disk = %req.name, uid = %req.disk_uid, error = %e, "import failed");
                failed(&e.to_string())
            }
        };
        let _ = tx.send(msg);
        agent
            .imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.disk_uid);
    });
    Ok(rx)
}

fn failed(message: &str) -> pb::DiskProgress {
    pb::DiskProgress {
        phase: Phase::Failed as i32,
        message: message.to_string(),
        ..Default::default()
    }
}

/// Whether a progress message ends the stream.
pub fn is_final(p: &pb::DiskProgress) -> bool {
    p.phase == Phase::Ready as i32
        || p.phase == Phase::Failed as i32
        || p.phase == Phase::WaitingForUpload as i32
}

fn strip_digest(d: &str) -> String {
    d.trim()
        .strip_prefix("sha256:")
        .unwrap_or(d.trim())
        .to_ascii_lowercase()
}

/// The OverlayInfo of a disk.
pub fn overlay_info(view: &hvx_storage::disks::DiskView) -> pb::OverlayInfo {
    pb::OverlayInfo {
        path: view.active_path.display().to_string(),
        chain: view.chain.iter().map(|p| p.display().to_string()).collect(),
        virtual_bytes: view.virtual_size,
        actual_bytes: view.allocated_bytes,
        l2_cache_bytes: view.l2_cache_size,
    }
}

/// Creates (or finds) a VM disk's overlay.
pub async fn ensure_overlay(
    agent: &Agent,
    req: &pb::EnsureOverlayRequest,
) -> Result<pb::OverlayInfo, AgentError> {
    let (ns, name) = hvx_api::node::vm_overlay_ref(&req.vm_uid, &req.disk_name);
    let _guard = agent.lock(&format!("overlay/{ns}/{name}")).await;
    if let Ok(meta) = agent.store.load_disk(&ns, &name) {
        return Ok(overlay_info(&agent.store.disk_view(&meta)?));
    }
    let digest = strip_digest(&req.base_digest);
    if agent.store.base(&digest).is_err() {
        return Err(AgentError::Precondition(format!(
            "base {} is not on this node: PrepareDisk first",
            req.base_digest
        )));
    }
    let size = (req.virtual_bytes > 0).then_some(req.virtual_bytes);
    let view = agent.store.create_disk(&ns, &name, &digest, size).await?;
    tracing::info!(vm = %req.vm_uid, disk = %req.disk_name, path = %view.active_path.display(), "overlay created");
    Ok(overlay_info(&view))
}

/// Deletes a VM disk's overlay (refused while the VM's QEMU runs).
pub async fn delete_overlay(
    agent: &Agent,
    req: &pb::DeleteOverlayRequest,
) -> Result<(), AgentError> {
    let (ns, name) = hvx_api::node::vm_overlay_ref(&req.vm_uid, &req.disk_name);
    // A replica of this disk served here goes first (before the overlay's lock:
    // PrepareReplica takes the replica's lock, then the overlay's).
    if super::replica::check_disk_name(&req.disk_name).is_ok() {
        super::replica::forget(agent, &req.vm_uid, &req.disk_name).await?;
    }
    let _guard = agent.lock(&format!("overlay/{ns}/{name}")).await;
    let run_dir = agent.paths.vm_run_dir(&req.vm_uid);
    if let Some(pid) = vms::live_qemu(&run_dir) {
        return Err(AgentError::Precondition(format!(
            "VM {} is running here (QEMU pid {pid}): stop it first",
            req.vm_uid
        )));
    }
    agent.store.delete_disk(&ns, &name)?;
    let ns_dir = agent.store.root().join("disks").join(&ns);
    // Last disk of the VM: its namespace dir and leftover run dir (a crashed VM's
    // serial log) go too.
    if std::fs::remove_dir(&ns_dir).is_ok() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(())
}

/// Forgets an OverlayDisk and removes its base when nothing else uses it.
pub async fn release(agent: &Agent, uid: &str) -> Result<bool, AgentError> {
    check_uid(uid)?;
    // What the node holds of the disk's upload goes with it.
    {
        let _upload = agent.lock(&format!("upload/{uid}")).await;
        super::uploads::remove(agent, uid)?;
    }
    let _guard = agent.lock(&format!("disk/{uid}")).await;
    let Some(rec) = load_record(agent, uid) else {
        return Ok(false);
    };
    remove_file(&record_path(agent, uid))?;
    // Another OverlayDisk with the same content keeps the base.
    let dir = agent.paths.agent_state().join("disks");
    let shared = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read(e.path())
                    .ok()
                    .and_then(|t| serde_json::from_slice::<DiskRecord>(&t).ok())
                    .is_some_and(|r| r.digest == rec.digest)
            })
        })
        .unwrap_or(false);
    if shared {
        return Ok(false);
    }
    Ok(agent.store.remove_base_if_unused(&rec.digest)?)
}

/// Removes bases no overlay uses and no OverlayDisk record names, older than
/// `grace` (a safety net behind ReleaseDisk: a base released while a VM still
/// used it goes once that VM's overlay is deleted).
pub async fn gc_orphans(agent: &Agent, grace: Duration) -> Result<Vec<String>, AgentError> {
    let dir = agent.paths.agent_state().join("disks");
    let recorded: std::collections::BTreeSet<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|t| serde_json::from_slice::<DiskRecord>(&t).ok())
                .map(|r| r.digest)
                .collect()
        })
        .unwrap_or_default();
    let mut removed = Vec::new();
    for base in agent.store.bases()? {
        let old = std::fs::metadata(&base.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= grace);
        if old
            && !recorded.contains(&base.digest)
            && agent.store.remove_base_if_unused(&base.digest)?
        {
            removed.push(base.digest);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_and_digests_are_checked() {
        assert!(check_uid("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0").is_ok());
        for bad in ["", "../x", "a/b", &"x".repeat(65)] {
            assert!(check_uid(bad).is_err(), "{bad}");
        }
        assert_eq!(strip_digest("sha256:ABC"), "abc");
        assert_eq!(strip_digest("abc"), "abc");
        let r = DiskRecord {
            digest: "ab".into(),
            virtual_size: 1,
            format: "vmdk/streamoptimized".into(),
            source_bytes: 2,
        };
        let m = ready_message(&r);
        assert_eq!(m.digest, "sha256:ab");
        assert!(is_final(&m));
        assert!(!is_final(&pb::DiskProgress::default()));
    }
}
