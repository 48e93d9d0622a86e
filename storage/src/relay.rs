//! Bases between nodes by digest: a node that needs a base another node holds gets
//! the other node's converted qcow2 (relayed by the operator) instead of fetching and
//! converting the original source again. Bases are immutable and named by the sha256
//! of the source bytes they were imported from; that digest cannot be recomputed from
//! the qcow2, so the receiver checks what it can: the file's own sha256 (sent after
//! the bytes), its size, and the image itself (a qcow2 header without external
//! references, `qemu-img check`, the recorded virtual size, no backing file) before
//! one rename installs it under the digest lock. The sender is another node's agent,
//! reached only through the operator (mTLS), so the digest's name is trusted as much
//! as that node's store is.
use std::io::Write;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::error::{Result, StorageError, io_err};
use crate::format::{self, DiskFormat, qcow2};
use crate::names::{check_sha256, hex};
use crate::store::{BaseImage, DiskStore, sync_file, unique_suffix, write_synced};

/// A base being received: bytes go to a private temp file in `bases/` (same
/// filesystem: the install is a rename), removed on drop unless installed.
#[derive(Debug)]
pub struct IncomingBase {
    base: BaseImage,
    size: u64,
    written: u64,
    hash: Sha256,
    tmp: PathBuf,
    file: Option<std::fs::File>,
}

impl Drop for IncomingBase {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl IncomingBase {
    /// The base being received (its digest and recorded sizes).
    pub fn base(&self) -> &BaseImage {
        &self.base
    }

    fn refused(&self, reason: String) -> StorageError {
        StorageError::Refused {
            path: self.tmp.clone(),
            reason,
        }
    }

    /// Appends `bytes` at `offset`: chunks come in order, never past the announced size.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        if offset != self.written {
            return Err(self.refused(format!(
                "base bytes at offset {offset}, expected {}",
                self.written
            )));
        }
        let end = offset.saturating_add(bytes.len() as u64);
        if end > self.size {
            return Err(self.refused(format!(
                "base bytes up to {end} past the announced size {}",
                self.size
            )));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io_err(&self.tmp)(std::io::Error::other("already installed")))?;
        file.write_all(bytes).map_err(io_err(&self.tmp))?;
        self.hash.update(bytes);
        self.written = end;
        Ok(())
    }
}

impl DiskStore {
    /// Starts receiving the base `base.digest` of `size` bytes (the file). Refused
    /// before anything is written when it does not fit.
    pub async fn receive_base(&self, mut base: BaseImage, size: u64) -> Result<IncomingBase> {
        base.digest = check_sha256(&base.digest)?;
        let limit = self.limits().max_virtual_size.saturating_add(1 << 30);
        if size > limit {
            return Err(StorageError::TooLarge {
                path: self.base_path(&base.digest),
                what: "relayed base",
                value: size,
                limit,
            });
        }
        let available = self.filesystem_available().await?;
        if available > 0 && size > available {
            return Err(StorageError::NoSpace {
                path: self.root().to_path_buf(),
                needed: size,
                available,
            });
        }
        // `.tmp-` names are cleared by the next `DiskStore::open` after a crash.
        let tmp = self.root().join("bases").join(format!(
            ".tmp-{}-recv-{}.qcow2",
            base.digest,
            unique_suffix()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        base.path = self.base_path(&base.digest);
        Ok(IncomingBase {
            base,
            size,
            written: 0,
            hash: Sha256::new(),
            tmp,
            file: Some(file),
        })
    }

    /// Checks a completely received base (`sha256`: the file's, as the sender hashed
    /// it) and installs it atomically; a base of that digest already here wins.
    pub async fn install_base(
        &self,
        mut incoming: IncomingBase,
        sha256: &str,
    ) -> Result<BaseImage> {
        if incoming.written != incoming.size {
            return Err(incoming.refused(format!(
                "received {} of {} bytes",
                incoming.written, incoming.size
            )));
        }
        let got = hex(&std::mem::take(&mut incoming.hash).finalize());
        let sent = check_sha256(sha256)?;
        if got != sent {
            return Err(StorageError::Checksum {
                what: format!("relayed base {}", incoming.base.digest),
                expected: sent,
                actual: got,
            });
        }
        let tmp = incoming.tmp.clone();
        if let Some(f) = &incoming.file {
            f.sync_all().map_err(io_err(&tmp))?;
        }
        let file = format::open_nofollow(&tmp)?;
        let header = qcow2::parse_header(&format::bytes_file(&file, &tmp, incoming.size))?;
        qcow2::check_layer(&header, &tmp, incoming.size, self.limits())?;
        self.qemu_img().check_alone(DiskFormat::Qcow2, &tmp).await?;
        let info = self.qemu_img().info(DiskFormat::Qcow2, &tmp).await?;
        // qemu's vpc driver may round VHD sizes down to the CHS geometry (as at import).
        let size_ok = info.virtual_size == incoming.base.virtual_size
            || (incoming.base.source_format == DiskFormat::Vhd
                && info.virtual_size <= incoming.base.virtual_size);
        if !size_ok || info.backing_filename.is_some() {
            return Err(incoming.refused(format!(
                "the relayed base has size {} (recorded {}) and backing {:?}",
                info.virtual_size, incoming.base.virtual_size, info.backing_filename
            )));
        }
        let digest = incoming.base.digest.clone();
        let lock = self.lock_digest(&digest).await?;
        if let Ok(existing) = self.base(&digest)
            && existing.path.exists()
        {
            drop(lock);
            return Ok(existing);
        }
        let meta_path = self.base_meta_path(&digest);
        let meta_tmp = meta_path.with_extension("json.tmp");
        let json =
            serde_json::to_vec_pretty(&incoming.base).map_err(|source| StorageError::Metadata {
                path: meta_path.clone(),
                source,
            })?;
        write_synced(&meta_tmp, &json)?;
        sync_file(&tmp)?;
        let final_path = incoming.base.path.clone();
        std::fs::rename(&tmp, &final_path).map_err(io_err(&final_path))?;
        // Installed: the temp name is gone, nothing for Drop to remove.
        incoming.file = None;
        std::fs::rename(&meta_tmp, &meta_path).map_err(io_err(&meta_path))?;
        drop(lock);
        Ok(incoming.base.clone())
    }
}
