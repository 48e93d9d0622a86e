//! PutUpload and GetUpload: the bytes of `kubectl hvx import --upload`, kept in this
//! node's store as they arrive (the operator's upload endpoint streams every chunk to
//! two nodes and acknowledges it to the user only once both hold it durably), so no
//! upload depends on the operator pod.
//!
//! Layout under the store root:
//!   uploads/<disk uid>.part       bytes so far (appended in order, fsynced per stream)
//!   uploads/<disk uid>.json       the declared total, fixed by the first write; the
//!                                 sha256 once complete
//!   uploads/<disk uid>.complete   the whole upload (renamed from .part: atomic)
//!
//! Durability: one fsync per PutUpload stream, i.e. per chunk the user PUT (8 MiB
//! from `kubectl hvx`, at most 64 MiB): the operator answers the user after both
//! nodes answered, so an fsync per stream is exactly what an acknowledgement needs;
//! syncing more often would only slow the copy. A stream that breaks is cut back to
//! its start, so what a node holds is always a prefix the user sent in whole chunks.

use super::error::AgentError;
use super::{Agent, remove_file, write_atomic};
use futures::{Stream, StreamExt};
use hvx_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Longest pause between two chunks of one stream before it is given up (and cut
/// back to its start).
const IDLE: Duration = Duration::from_secs(120);

/// What `uploads/<uid>.json` records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadMeta {
    /// Declared total, fixed by the first write.
    pub total: u64,
    /// Hex sha256 of the whole upload, once complete.
    #[serde(default)]
    pub sha256: String,
}

/// The store directory uploads live in.
pub fn dir(agent: &Agent) -> PathBuf {
    agent.store.root().join("uploads")
}

fn path(agent: &Agent, uid: &str, ext: &str) -> PathBuf {
    dir(agent).join(format!("{uid}.{ext}"))
}

/// The completed upload of `uid` (whether or not it exists).
pub fn complete_path(agent: &Agent, uid: &str) -> PathBuf {
    path(agent, uid, "complete")
}

fn size(p: &std::path::Path) -> Option<u64> {
    std::fs::symlink_metadata(p)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

fn load_meta(agent: &Agent, uid: &str) -> Option<UploadMeta> {
    let text = std::fs::read(path(agent, uid, "json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Whether a chunk of `len` bytes at `offset` of an upload declaring `total` may be
/// written when this node holds `held` bytes and the upload was started with
/// `fixed_total` (pure).
pub fn check_write(
    held: u64,
    fixed_total: Option<u64>,
    offset: u64,
    total: u64,
    len: u64,
) -> Result<(), AgentError> {
    if total == 0 {
        return Err(AgentError::Invalid(
            "an upload declares its total size (bytes), which is not 0".into(),
        ));
    }
    if let Some(fixed) = fixed_total
        && fixed != total
    {
        return Err(AgentError::Invalid(format!(
            "this upload was started with a total of {fixed} bytes, not {total}: the total never changes"
        )));
    }
    if offset != held {
        return Err(AgentError::Precondition(format!(
            "this node holds {held} bytes of the upload: the next chunk starts at offset {held}, not {offset}"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= total => {}
        end => {
            return Err(AgentError::Invalid(format!(
                "bytes up to {} go past the declared total of {total}",
                end.map_or_else(|| "beyond 2^64".to_string(), |e| e.to_string())
            )));
        }
    }
    Ok(())
}

/// An upload held here: (bytes held, declared total, complete).
pub type Held = (u64, u64, bool);

/// Bytes a new upload may still take here (pure): the filesystem's free bytes less
/// what the uploads in progress (`others`) will still write, and within `capacity`
/// (all uploads together, each counted at its declared total) when one is set.
pub fn room(fs_free: u64, capacity: Option<u64>, others: &[Held]) -> u64 {
    let pending: u64 = others
        .iter()
        .filter(|(_, _, complete)| !complete)
        .map(|(held, total, _)| total.saturating_sub(*held))
        .fold(0, u64::saturating_add);
    let committed: u64 = others
        .iter()
        .map(|(held, total, _)| (*held).max(*total))
        .fold(0, u64::saturating_add);
    let free = fs_free.saturating_sub(pending);
    match capacity {
        Some(c) => free.min(c.saturating_sub(committed)),
        None => free,
    }
}

/// Every upload held here except `except`'s.
fn others(agent: &Agent, except: &str) -> Vec<Held> {
    let Ok(entries) = std::fs::read_dir(dir(agent)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (uid, complete) = match name.rsplit_once('.') {
                Some((uid, "part")) => (uid.to_string(), false),
                Some((uid, "complete")) => (uid.to_string(), true),
                _ => return None,
            };
            if uid == except {
                return None;
            }
            let held = e.metadata().ok()?.len();
            let total = load_meta(agent, &uid).map_or(held, |m| m.total);
            Some((held, total, complete))
        })
        .collect()
}

async fn room_for(agent: &Agent, uid: &str) -> Result<u64, AgentError> {
    let free = agent.store.filesystem_available().await?;
    Ok(room(
        free,
        agent.config.upload_capacity_bytes,
        &others(agent, uid),
    ))
}

/// What this node holds of `uid`'s upload (GetUpload).
pub async fn get(agent: &Agent, uid: &str) -> Result<pb::UploadState, AgentError> {
    super::disks::check_uid(uid)?;
    let mut state = held(agent, uid);
    state.room_bytes = room_for(agent, uid).await?;
    Ok(state)
}

fn held(agent: &Agent, uid: &str) -> pb::UploadState {
    let meta = load_meta(agent, uid).unwrap_or_default();
    if let Some(n) = size(&complete_path(agent, uid)) {
        return pb::UploadState {
            offset: n,
            total: meta.total,
            complete: true,
            sha256: meta.sha256,
            room_bytes: 0,
        };
    }
    match size(&path(agent, uid, "part")).filter(|n| *n > 0) {
        Some(n) => pb::UploadState {
            offset: n,
            total: meta.total,
            ..Default::default()
        },
        None => pb::UploadState::default(),
    }
}

async fn next<S>(stream: &mut S) -> Result<Option<pb::UploadChunk>, AgentError>
where
    S: Stream<Item = Result<pb::UploadChunk, tonic::Status>> + Unpin,
{
    match tokio::time::timeout(IDLE, stream.next()).await {
        Err(_) => Err(AgentError::Precondition(format!(
            "no upload bytes for {}s: the chunk was given up",
            IDLE.as_secs()
        ))),
        Ok(None) => Ok(None),
        Ok(Some(Err(s))) => Err(AgentError::Precondition(format!(
            "the upload stream broke: {}",
            s.message()
        ))),
        Ok(Some(Ok(c))) => Ok(Some(c)),
    }
}

/// Stores one PutUpload stream (see agent.proto).
pub async fn put<S>(agent: &Agent, mut stream: S) -> Result<pb::UploadState, AgentError>
where
    S: Stream<Item = Result<pb::UploadChunk, tonic::Status>> + Unpin,
{
    let Some(first) = next(&mut stream).await? else {
        return Err(AgentError::Invalid(
            "an upload stream starts with a chunk naming its disk".into(),
        ));
    };
    let uid = first.disk_uid.clone();
    super::disks::check_uid(&uid)?;
    let total = first.total;
    let _guard = agent.lock(&format!("upload/{uid}")).await;
    std::fs::create_dir_all(dir(agent))
        .map_err(AgentError::io(format!("creating {}", dir(agent).display())))?;
    let now = held(agent, &uid);
    if now.complete {
        return if now.total == total || now.offset == total {
            Ok(pb::UploadState {
                room_bytes: room_for(agent, &uid).await?,
                ..now
            })
        } else {
            Err(AgentError::Invalid(format!(
                "a different upload of disk {uid} is complete here ({} bytes, not {total})",
                now.offset
            )))
        };
    }
    let part = path(agent, &uid, "part");
    // An empty part (a first stream that broke) fixes nothing yet.
    let fixed = size(&part)
        .filter(|n| *n > 0)
        .and(load_meta(agent, &uid))
        .map(|m| m.total);
    let start = now.offset;
    check_write(start, fixed, first.offset, total, first.data.len() as u64)?;
    let needed = total - start;
    let room = room_for(agent, &uid).await?;
    if needed > room {
        return Err(AgentError::Full(format!(
            "the upload of disk {uid} needs {needed} more bytes; this node has room for {room}"
        )));
    }
    if fixed.is_none() {
        let meta = serde_json::to_vec(&UploadMeta {
            total,
            sha256: String::new(),
        })
        .map_err(|e| AgentError::Invalid(e.to_string()))?;
        write_atomic(&path(agent, &uid, "json"), &meta)?;
    }
    let io = |what: &'static str| {
        let p = part.display().to_string();
        move |e: std::io::Error| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                AgentError::Full(format!("{what} {p}: {e}"))
            } else {
                AgentError::Io {
                    what: format!("{what} {p}"),
                    source: e,
                }
            }
        }
    };
    let std_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .map_err(io("opening"))?;
    // A call dropped half way (the operator cancelled it: a bad body, a copy that
    // failed) is cut back too: the guard runs on drop.
    let guard = CutBack {
        file: Some(std_file.try_clone().map_err(io("opening"))?),
        to: start,
    };
    let mut file = tokio::fs::File::from_std(std_file);
    let written: Result<u64, AgentError> = async {
        let mut at = start;
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            if !c.disk_uid.is_empty() && c.disk_uid != uid {
                return Err(AgentError::Invalid(format!(
                    "one upload stream names disk {uid} and then {}",
                    c.disk_uid
                )));
            }
            let declared = if c.total == 0 { total } else { c.total };
            check_write(at, Some(total), c.offset, declared, c.data.len() as u64)?;
            file.write_all(&c.data).await.map_err(io("writing"))?;
            at += c.data.len() as u64;
            chunk = next(&mut stream).await?;
        }
        file.flush().await.map_err(io("writing"))?;
        file.sync_data().await.map_err(io("syncing"))?;
        Ok(at)
    }
    .await;
    // All or nothing: what this node holds stays a prefix of whole streams (an error
    // drops the guard, which cuts back).
    let at = match written {
        Ok(at) => at,
        Err(e) => {
            // tokio's File writes on a blocking thread: a write still in flight would
            // land after the cut and extend the file again (append mode), so wait for
            // it first. Its own error does not matter: the cut follows either way.
            let _ = file.flush().await;
            drop(file);
            drop(guard);
            return Err(e);
        }
    };
    guard.disarm();
    drop(file);
    if at == total {
        finish(agent, &uid, total).await?;
        tracing::info!(disk = %uid, bytes = total, "upload complete");
    }
    let mut state = held(agent, &uid);
    state.room_bytes = room_for(agent, &uid).await?;
    Ok(state)
}

/// Cuts an upload file back to where a stream started unless disarmed.
struct CutBack {
    file: Option<std::fs::File>,
    to: u64,
}

impl CutBack {
    fn disarm(mut self) {
        self.file = None;
    }
}

impl Drop for CutBack {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            let _ = f.set_len(self.to);
            let _ = f.sync_data();
        }
    }
}

/// Hashes the whole upload, records the digest, then renames it complete.
async fn finish(agent: &Agent, uid: &str, total: u64) -> Result<(), AgentError> {
    let part = path(agent, uid, "part");
    let p = part.clone();
    let sha256 = super::blocking(move || {
        let mut f =
            std::fs::File::open(&p).map_err(AgentError::io(format!("reading {}", p.display())))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)
            .map_err(AgentError::io(format!("reading {}", p.display())))?;
        Ok(hvx_storage::names::hex(&h.finalize()))
    })
    .await?;
    let meta = serde_json::to_vec(&UploadMeta { total, sha256 })
        .map_err(|e| AgentError::Invalid(e.to_string()))?;
    write_atomic(&path(agent, uid, "json"), &meta)?;
    let done = complete_path(agent, uid);
    std::fs::rename(&part, &done).map_err(AgentError::io(format!("renaming to {}", done.display())))
}

/// Removes what this node holds of `uid`'s upload (the OverlayDisk was deleted).
pub fn remove(agent: &Agent, uid: &str) -> Result<(), AgentError> {
    super::disks::check_uid(uid)?;
    for ext in ["part", "complete", "json"] {
        remove_file(&path(agent, uid, ext))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_must_continue_at_the_held_offset_within_a_fixed_total() {
        assert!(check_write(0, None, 0, 100, 10).is_ok());
        assert!(check_write(10, Some(100), 10, 100, 90).is_ok());
        let e = check_write(10, Some(100), 0, 100, 10).expect_err("rewind");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("offset 10"), "{e}");
        let e = check_write(10, Some(100), 20, 100, 10).expect_err("gap");
        assert!(e.to_string().contains("offset 10"), "{e}");
        let e = check_write(10, Some(100), 10, 200, 10).expect_err("total changed");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("100"), "{e}");
        let e = check_write(90, Some(100), 90, 100, 11).expect_err("past the total");
        assert!(e.to_string().contains("101"), "{e}");
        assert!(check_write(0, None, 0, 0, 0).is_err(), "no total");
        assert!(check_write(u64::MAX - 1, None, u64::MAX - 1, u64::MAX, 5).is_err());
    }

    #[test]
    fn room_counts_uploads_in_progress_at_what_they_will_still_write() {
        // 1000 free; one upload holds 100 of 400 (300 to come), one complete of 50.
        let others = [(100, 400, false), (50, 50, true)];
        assert_eq!(room(1000, None, &others), 700);
        // Capacity counts each at its declared total: 500 - 400 - 50.
        assert_eq!(room(1000, Some(500), &others), 50);
        assert_eq!(room(200, Some(5000), &others), 0);
        assert_eq!(room(1000, Some(10), &[]), 10);
    }
}
