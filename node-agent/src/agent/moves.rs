//! ExportOverlay and ImportOverlay: the two ends of a cold disk move (a stopped VM
//! restarting on another node). The byte handling and every check live in
//! `hvx_storage::moves`; this module holds the overlay lock for the whole transfer,
//! refuses while the VM's QEMU runs, and speaks the chunked stream.

use super::error::AgentError;
use super::{Agent, disks, vms};
use hvx_proto::v1 as pb;
use pb::overlay_chunk::Part;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Bytes per data message (well under gRPC's 4 MiB message limit).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Longest pause between two messages of an import before it is given up.
const IDLE: Duration = Duration::from_secs(120);

fn refuse_if_running(agent: &Agent, vm_uid: &str) -> Result<(), AgentError> {
    if let Some(pid) = vms::live_qemu(&agent.paths.vm_run_dir(vm_uid)) {
        return Err(AgentError::Precondition(format!(
            "VM {vm_uid} is running on this node (QEMU pid {pid})"
        )));
    }
    Ok(())
}

/// ExportOverlay: checks, then streams the chain from a task holding the overlay lock.
pub async fn export(
    agent: Arc<Agent>,
    req: pb::ExportOverlayRequest,
    tx: mpsc::Sender<Result<pb::OverlayChunk, tonic::Status>>,
) -> Result<(), AgentError> {
    vms::check_vm_uid(&req.vm_uid)?;
    let (ns, name) = hvx_api::node::vm_overlay_ref(&req.vm_uid, &req.disk_name);
    let guard = agent.lock(&format!("overlay/{ns}/{name}")).await;
    refuse_if_running(&agent, &req.vm_uid)?;
    let exported = agent.store.exported_disk(&ns, &name).map_err(|e| match e {
        hvx_storage::StorageError::DiskNotFound(_) => AgentError::Precondition(format!(
            "no overlay of disk {} of VM {} on this node",
            req.disk_name, req.vm_uid
        )),
        e => e.into(),
    })?;
    let header = pb::OverlayHeader {
        vm_uid: req.vm_uid.clone(),
        disk_name: req.disk_name.clone(),
        base_digest: format!("sha256:{}", exported.meta.base),
        chain_json: exported.chain_json.clone(),
        files: exported
            .files
            .iter()
            .map(|f| pb::OverlayFile {
                name: f.name.clone(),
                size: f.size,
            })
            .collect(),
        move_id: String::new(),
    };
    let total: u64 = exported.files.iter().map(|f| f.size).sum();
    tracing::info!(vm = %req.vm_uid, disk = %req.disk_name, files = exported.files.len(), bytes = total, "exporting overlay");
    tokio::spawn(async move {
        let _guard = guard;
        let send = |part: Part| pb::OverlayChunk { part: Some(part) };
        if tx.send(Ok(send(Part::Header(header)))).await.is_err() {
            return;
        }
        let mut digests = Vec::new();
        for (i, f) in exported.files.iter().enumerate() {
            let result = async {
                let mut file = tokio::fs::File::open(&f.path).await?;
                let mut hash = Sha256::new();
                let mut offset = 0u64;
                // Exactly the size announced: a file that grew would break the header.
                while offset < f.size {
                    let want = usize::try_from(f.size - offset)
                        .unwrap_or(CHUNK_BYTES)
                        .min(CHUNK_BYTES);
                    // Read straight into the message's own buffer (no second copy).
                    let mut bytes = vec![0u8; want];
                    file.read_exact(&mut bytes).await?;
                    hash.update(&bytes);
                    let data = pb::OverlayData {
                        file: i as u32,
                        offset,
                        bytes,
                    };
                    if tx.send(Ok(send(Part::Data(data)))).await.is_err() {
                        return Err(std::io::Error::other("the receiver went away"));
                    }
                    offset += want as u64;
                }
                Ok(hvx_storage::names::hex(&hash.finalize()))
            }
            .await;
            match result {
                Ok(d) => digests.push(d),
                Err(e) => {
                    tracing::warn!(path = %f.path.display(), error = %e, "overlay export stopped");
                    let _ = tx
                        .send(Err(tonic::Status::internal(format!(
                            "reading {}: {e}",
                            f.path.display()
                        ))))
                        .await;
                    return;
                }
            }
        }
        let _ = tx
            .send(Ok(send(Part::Trailer(pb::OverlayTrailer {
                sha256: digests,
            }))))
            .await;
    });
    Ok(())
}

async fn next(stream: &mut tonic::Streaming<pb::OverlayChunk>) -> Result<Option<Part>, AgentError> {
    match tokio::time::timeout(IDLE, stream.message()).await {
        Err(_) => Err(AgentError::Precondition(format!(
            "no overlay data for {}s: the move was given up",
            IDLE.as_secs()
        ))),
        Ok(Err(s)) => Err(AgentError::Precondition(format!(
            "the overlay stream broke: {}",
            s.message()
        ))),
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(c))) => c
            .part
            .map(Some)
            .ok_or_else(|| AgentError::Invalid("an overlay chunk without content".into())),
    }
}

/// ImportOverlay: receives, verifies and installs one disk.
pub async fn import(
    agent: &Agent,
    mut stream: tonic::Streaming<pb::OverlayChunk>,
) -> Result<pb::OverlayInfo, AgentError> {
    let Some(Part::Header(h)) = next(&mut stream).await? else {
        return Err(AgentError::Invalid(
            "an overlay import starts with its header".into(),
        ));
    };
    vms::check_vm_uid(&h.vm_uid)?;
    if h.move_id.is_empty() || h.move_id.len() > 64 {
        return Err(AgentError::Invalid(
            "an overlay import needs a move id".into(),
        ));
    }
    if h.files.len() > hvx_storage::moves::MAX_LAYERS {
        return Err(AgentError::Invalid(format!(
            "{} files in one overlay",
            h.files.len()
        )));
    }
    let (ns, name) = hvx_api::node::vm_overlay_ref(&h.vm_uid, &h.disk_name);
    let _guard = agent.lock(&format!("overlay/{ns}/{name}")).await;
    if agent.store.moved_in(&ns, &name).as_deref() == Some(h.move_id.as_str()) {
        // Installed by this move already (an operator that restarted sends it again);
        // the VM may be using it by now, so it is left as it is.
        let meta = agent.store.load_disk(&ns, &name)?;
        return Ok(disks::overlay_info(&agent.store.disk_view(&meta)?));
    }
    refuse_if_running(agent, &h.vm_uid)?;
    let files: Vec<(String, u64)> = h.files.iter().map(|f| (f.name.clone(), f.size)).collect();
    let mut incoming = agent
        .store
        .receive_disk(&ns, &name, &h.chain_json, &files)
        .await
        .map_err(|e| match e {
            hvx_storage::StorageError::BaseNotFound(_) => AgentError::Precondition(format!(
                "base {} of disk {} is not on this node: PrepareDisk first",
                h.base_digest, h.disk_name
            )),
            e => e.into(),
        })?;
    let started = std::time::Instant::now();
    let mut bytes = 0u64;
    loop {
        match next(&mut stream).await? {
            Some(Part::Data(d)) => {
                bytes += d.bytes.len() as u64;
                incoming.write(d.file as usize, d.offset, &d.bytes)?;
            }
            Some(Part::Trailer(t)) => {
                incoming.finish(&t.sha256)?;
                break;
            }
            Some(Part::Header(_)) => {
                return Err(AgentError::Invalid("a second overlay header".into()));
            }
            None => {
                return Err(AgentError::Precondition(
                    "the overlay stream ended before its trailer: nothing installed".into(),
                ));
            }
        }
    }
    let view = agent.store.install_received(incoming, &h.move_id).await?;
    tracing::info!(vm = %h.vm_uid, disk = %h.disk_name, move_id = %h.move_id, bytes, ms = started.elapsed().as_millis() as u64, "overlay moved in");
    Ok(disks::overlay_info(&view))
}
