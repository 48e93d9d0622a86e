//! Blank disks (OverlayDisk source `blank`, what OVF `Disk`s without a `fileRef`
//! declare): an empty overlay of the declared size.
//!
//! Why an empty *base* rather than an overlay without a backing file: every disk in
//! the store is a chain on a content-addressed base (`DiskMeta::base`), and migrations,
//! cold moves, clones and GC all rely on that. A blank disk's content is zero bytes of
//! data, so its base is a qcow2 of virtual size 0 whose digest is the sha256 of the
//! empty string: the true content digest, shared by every blank disk of any size.
//! The disk's own overlay carries the declared size; reads past the end of a backing
//! file return zeros in qcow2, so the guest sees a zeroed disk of exactly that size.

use crate::error::{Result, StorageError, io_err};
use crate::format::DiskFormat;
use crate::qemu_img::Qcow2Options;
use crate::store::{BaseImage, DiskStore, sync_file, write_synced};

/// sha256 of zero bytes: the digest of the empty base.
pub const BLANK_DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// `source_subformat` recorded for the empty base.
pub const BLANK_SUBFORMAT: &str = "blank";

/// `qemu-img create` arguments of the empty base.
pub fn create_empty_base_args(path: &std::path::Path) -> Vec<String> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        Qcow2Options::for_base().to_opt_string(),
        path.to_string_lossy().into_owned(),
        "0".into(),
    ]
}

impl DiskStore {
    /// The empty base blank disks sit on, created once per store.
    pub async fn blank_base(&self) -> Result<BaseImage> {
        let lock = self.lock_digest(BLANK_DIGEST).await?;
        let result = self.blank_base_locked().await;
        drop(lock);
        result
    }

    async fn blank_base_locked(&self) -> Result<BaseImage> {
        if let Ok(base) = self.base(BLANK_DIGEST)
            && base.path.exists()
        {
            return Ok(base);
        }
        let final_path = self.base_path(BLANK_DIGEST);
        let tmp_path = self
            .root()
            .join("bases")
            .join(format!(".tmp-{BLANK_DIGEST}-{}.qcow2", std::process::id()));
        let _ = std::fs::remove_file(&tmp_path);
        let made = self
            .qemu_img()
            .run(&create_empty_base_args(&tmp_path), None)
            .await;
        let checked = match made {
            Ok(_) => self.qemu_img().info(DiskFormat::Qcow2, &tmp_path).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(info) if info.virtual_size == 0 && info.backing_filename.is_none() => {}
            Ok(info) => {
                let _ = std::fs::remove_file(&tmp_path);
                return Err(StorageError::CommandOutput {
                    command: "qemu-img info".into(),
                    reason: format!(
                        "empty base has size {} backing {:?}",
                        info.virtual_size, info.backing_filename
                    ),
                });
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                return Err(e);
            }
        }
        let base = BaseImage {
            digest: BLANK_DIGEST.to_string(),
            path: final_path.clone(),
            virtual_size: 0,
            source_format: DiskFormat::Raw,
            source_subformat: BLANK_SUBFORMAT.to_string(),
            source_bytes: 0,
        };
        let meta_path = self.base_meta_path(BLANK_DIGEST);
        let meta_tmp = meta_path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&base).map_err(|source| StorageError::Metadata {
            path: meta_path.clone(),
            source,
        })?;
        write_synced(&meta_tmp, &json)?;
        sync_file(&tmp_path)?;
        std::fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
        std::fs::rename(&meta_tmp, &meta_path).map_err(io_err(&meta_path))?;
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn blank_digest_is_the_digest_of_nothing() {
        assert_eq!(crate::names::hex(&Sha256::digest(b"")), BLANK_DIGEST);
    }

    #[test]
    fn empty_base_is_a_zero_sized_qcow2_without_backing() {
        let args = create_empty_base_args(std::path::Path::new("/s/b.qcow2"));
        assert_eq!(args.last().map(String::as_str), Some("0"));
        assert!(!args.iter().any(|a| a == "-b"));
    }
}
