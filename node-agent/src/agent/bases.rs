//! ExportBase and ImportBase: bases travel between nodes by digest (relayed by the
//! operator, like overlays in `moves`), so a node never fetches an original source
//! again once any node imported it, and an upload reaches nodes that hold no copy.
//! The checks and the atomic install live in `hvx_storage::relay`.

use super::disks::{self, DiskRecord};
use super::error::AgentError;
use super::{Agent, write_atomic};
use futures::{Stream, StreamExt};
use hvx_proto::v1 as pb;
use pb::base_chunk::Part;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Bytes per data message (well under gRPC's 4 MiB message limit).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Longest pause between two messages of an import before it is given up.
const IDLE: Duration = Duration::from_secs(120);

fn digest_of(d: &str) -> Result<String, AgentError> {
    hvx_storage::names::check_sha256(d)
        .map_err(|_| AgentError::Invalid(format!("{d:?} is not a sha256 digest")))
}

fn format_name(f: hvx_storage::format::DiskFormat) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// ExportBase: streams the base `digest` from a task.
pub async fn export(
    agent: Arc<Agent>,
    req: pb::ExportBaseRequest,
    tx: mpsc::Sender<Result<pb::BaseChunk, tonic::Status>>,
) -> Result<(), AgentError> {
    let digest = digest_of(&req.digest)?;
    let base = agent.store.base(&digest).map_err(|_| {
        AgentError::Precondition(format!("base sha256:{digest} is not on this node"))
    })?;
    // Opened before answering: a base removed meanwhile stays readable through it.
    let mut file = tokio::fs::File::open(&base.path).await.map_err(|e| {
        AgentError::Precondition(format!("base sha256:{digest} is not on this node: {e}"))
    })?;
    let size = file
        .metadata()
        .await
        .map_err(AgentError::io(format!("reading {}", base.path.display())))?
        .len();
    let header = pb::BaseHeader {
        digest: format!("sha256:{digest}"),
        size,
        virtual_bytes: base.virtual_size,
        source_format: format_name(base.source_format),
        source_subformat: base.source_subformat.clone(),
        source_bytes: base.source_bytes,
        disk_uid: String::new(),
        detected_format: String::new(),
    };
    tracing::info!(%digest, bytes = size, "exporting base");
    tokio::spawn(async move {
        let send = |part: Part| pb::BaseChunk { part: Some(part) };
        if tx.send(Ok(send(Part::Header(header)))).await.is_err() {
            return;
        }
        let mut hash = Sha256::new();
        let mut offset = 0u64;
        while offset < size {
            let want = usize::try_from(size - offset)
                .unwrap_or(CHUNK_BYTES)
                .min(CHUNK_BYTES);
            let mut bytes = vec![0u8; want];
            if let Err(e) = file.read_exact(&mut bytes).await {
                let _ = tx
                    .send(Err(tonic::Status::internal(format!(
                        "reading base sha256:{digest}: {e}"
                    ))))
                    .await;
                return;
            }
            hash.update(&bytes);
            let data = pb::BaseData { offset, bytes };
            if tx.send(Ok(send(Part::Data(data)))).await.is_err() {
                return;
            }
            offset += want as u64;
        }
        let sum = hvx_storage::names::hex(&hash.finalize());
        let _ = tx.send(Ok(send(Part::Sha256(sum)))).await;
    });
    Ok(())
}

async fn next<S>(stream: &mut S) -> Result<Option<Part>, AgentError>
where
    S: Stream<Item = Result<pb::BaseChunk, tonic::Status>> + Unpin,
{
    match tokio::time::timeout(IDLE, stream.next()).await {
        Err(_) => Err(AgentError::Precondition(format!(
            "no base data for {}s: the relay was given up",
            IDLE.as_secs()
        ))),
        Ok(None) => Ok(None),
        Ok(Some(Err(s))) => Err(AgentError::Precondition(format!(
            "the base stream broke: {}",
            s.message()
        ))),
        Ok(Some(Ok(c))) => c
            .part
            .map(Some)
            .ok_or_else(|| AgentError::Invalid("a base chunk without content".into())),
    }
}

/// ImportBase: receives, checks and installs one base, and records the OverlayDisk
/// the header names as imported with it.
pub async fn import<S>(agent: &Agent, mut stream: S) -> Result<pb::DiskProgress, AgentError>
where
    S: Stream<Item = Result<pb::BaseChunk, tonic::Status>> + Unpin,
{
    let Some(Part::Header(h)) = next(&mut stream).await? else {
        return Err(AgentError::Invalid(
            "a base import starts with its header".into(),
        ));
    };
    let digest = digest_of(&h.digest)?;
    if !h.disk_uid.is_empty() {
        disks::check_uid(&h.disk_uid)?;
    }
    let source_format = serde_json::from_value(serde_json::Value::String(h.source_format.clone()))
        .map_err(|_| AgentError::Invalid(format!("unknown source format {:?}", h.source_format)))?;
    let started = std::time::Instant::now();
    let base = match agent.store.base(&digest) {
        // Already here (a relay repeated by a restarted operator): nothing to receive.
        Ok(b) if b.path.exists() => b,
        _ => {
            let template = hvx_storage::BaseImage {
                digest: digest.clone(),
                path: std::path::PathBuf::new(),
                virtual_size: h.virtual_bytes,
                source_format,
                source_subformat: h.source_subformat.clone(),
                source_bytes: h.source_bytes,
            };
            let mut incoming = agent.store.receive_base(template, h.size).await?;
            let sha256 = loop {
                match next(&mut stream).await? {
                    Some(Part::Data(d)) => incoming.write(d.offset, &d.bytes)?,
                    Some(Part::Sha256(s)) => break s,
                    Some(Part::Header(_)) => {
                        return Err(AgentError::Invalid("a second base header".into()));
                    }
                    None => {
                        return Err(AgentError::Precondition(
                            "the base stream ended before its checksum: nothing installed".into(),
                        ));
                    }
                }
            };
            let base = agent.store.install_base(incoming, &sha256).await?;
            tracing::info!(%digest, bytes = h.size, ms = started.elapsed().as_millis() as u64, "base received from another node");
            base
        }
    };
    let rec = DiskRecord {
        digest: base.digest.clone(),
        virtual_size: base.virtual_size,
        format: h.detected_format.clone(),
        source_bytes: base.source_bytes,
    };
    if !h.disk_uid.is_empty() {
        let bytes =
            serde_json::to_vec_pretty(&rec).map_err(|e| AgentError::Invalid(e.to_string()))?;
        write_atomic(&disks::record_path(agent, &h.disk_uid), &bytes)?;
    }
    Ok(disks::ready_message(&rec))
}
