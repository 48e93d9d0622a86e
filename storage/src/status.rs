//! OverlayDisk status as the agent reports it (the operator copies it into the CRD
//! status): phase, progress, sizes, chain and conditions. Pure builders.
use serde::{Deserialize, Serialize};

use crate::disks::DiskView;
use crate::error::StorageError;
use crate::store::{BaseImage, ImportPhase};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskPhase {
    Pending,
    Importing,
    Converting,
    Ready,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskCondition {
    /// "Imported", "Ready", "Failed".
    pub r#type: String,
    /// "True" / "False".
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayDiskStatus {
    pub phase: DiskPhase,
    /// "bytes done/bytes total" style percentage, 0-100.
    pub progress_percent: u8,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub virtual_size: Option<u64>,
    pub allocated_bytes: Option<u64>,
    pub source_format: Option<String>,
    pub base_digest: Option<String>,
    pub chain: Vec<String>,
    pub snapshots: Vec<String>,
    pub conditions: Vec<DiskCondition>,
}

fn cond(t: &str, ok: bool, reason: &str, message: String) -> DiskCondition {
    DiskCondition {
        r#type: t.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
    }
}

fn percent(done: u64, total: u64) -> u8 {
    if total == 0 {
        0
    } else {
        u8::try_from((done.min(total) as u128 * 100 / total as u128).min(100)).unwrap_or(100)
    }
}

impl OverlayDiskStatus {
    /// While an import runs.
    pub fn importing(phase: ImportPhase, done: u64, total: u64) -> Self {
        Self {
            phase: match phase {
                ImportPhase::Fetching => DiskPhase::Importing,
                ImportPhase::Converting => DiskPhase::Converting,
            },
            progress_percent: percent(done, total),
            bytes_done: done,
            bytes_total: total,
            virtual_size: None,
            allocated_bytes: None,
            source_format: None,
            base_digest: None,
            chain: Vec::new(),
            snapshots: Vec::new(),
            conditions: vec![cond(
                "Ready",
                false,
                "Importing",
                format!("{done} of {total} bytes"),
            )],
        }
    }

    /// A disk ready to attach.
    pub fn ready(base: &BaseImage, view: &DiskView) -> Self {
        Self {
            phase: DiskPhase::Ready,
            progress_percent: 100,
            bytes_done: base.source_bytes,
            bytes_total: base.source_bytes,
            virtual_size: Some(view.virtual_size),
            allocated_bytes: Some(view.allocated_bytes),
            source_format: Some(format!(
                "{:?}/{}",
                base.source_format, base.source_subformat
            )),
            base_digest: Some(base.digest.clone()),
            chain: view
                .chain
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
            snapshots: view.snapshots.iter().map(|s| s.name.clone()).collect(),
            conditions: vec![
                cond(
                    "Imported",
                    true,
                    "Verified",
                    format!("sha256:{}", base.digest),
                ),
                cond(
                    "Ready",
                    true,
                    "OverlayCreated",
                    format!("{} layers", view.chain.len()),
                ),
            ],
        }
    }

    /// A failed import or operation; the reason is the error's kind.
    pub fn failed(err: &StorageError) -> Self {
        let reason = match err {
            StorageError::Refused { .. } => "Refused",
            StorageError::Truncated { .. } => "Truncated",
            StorageError::CorruptHeader { .. } => "CorruptImage",
            StorageError::TooLarge { .. } => "TooLarge",
            StorageError::Checksum { .. } | StorageError::BadChecksum(_) => "ChecksumMismatch",
            StorageError::Download { .. } => "DownloadFailed",
            StorageError::NoSpace { .. } => "NoSpace",
            StorageError::Command { .. } | StorageError::CommandOutput { .. } => "QemuImgFailed",
            _ => "Failed",
        };
        Self {
            phase: DiskPhase::Failed,
            progress_percent: 0,
            bytes_done: 0,
            bytes_total: 0,
            virtual_size: None,
            allocated_bytes: None,
            source_format: None,
            base_digest: None,
            chain: Vec::new(),
            snapshots: Vec::new(),
            conditions: vec![cond("Ready", false, reason, err.to_string())],
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_failure() {
        let s = OverlayDiskStatus::importing(ImportPhase::Fetching, 50, 200);
        assert_eq!((s.phase, s.progress_percent), (DiskPhase::Importing, 25));
        assert_eq!(
            OverlayDiskStatus::importing(ImportPhase::Converting, 5, 0).progress_percent,
            0
        );
        let f = OverlayDiskStatus::failed(&StorageError::Refused {
            path: "x".into(),
            reason: "backing file".into(),
        });
        assert_eq!(f.conditions[0].reason, "Refused");
        assert!(f.conditions[0].message.contains("backing file"));
    }
}
