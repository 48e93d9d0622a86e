//! Cold moves of a stopped VM's disk between nodes: the source lists the files of the
//! disk's overlay chain (every layer and the chain metadata; the base stays behind, the
//! target has it by digest), the target receives them into a private staging dir,
//! verifies sizes and digests, points each layer at its own paths (`qemu-img rebase
//! -u`: the layers are byte-identical, only the backing names change), checks every
//! layer, and swaps the disk in with one rename, so a reader (the launcher waiting for
//! `disk.json`) sees either no disk or the whole moved one.
//!
//! The files come from another node's agent through the operator, both trusted, but
//! they are checked as strictly as an import: a layer's qcow2 header may not name an
//! external data file or encryption, names are plain, and sizes are bounded by the
//! header announced up front and by the free space here.
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::chain::DiskMeta;
use crate::disks::DiskView;
use crate::error::{Result, StorageError, io_err};
use crate::format::{self, DiskFormat, qcow2};
use crate::names::{check_object_name, hex};
use crate::store::{DiskStore, unique_suffix, write_synced};

/// File in a moved disk's directory naming the move that installed it.
const MOVED_IN: &str = "moved-in";
/// Most layer files one disk may have (a snapshot tree far deeper than any real one).
pub const MAX_LAYERS: usize = 256;

/// One file of a disk's chain, as the source sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFile {
    /// "l3.qcow2".
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

/// What the source sends of one disk.
#[derive(Debug, Clone)]
pub struct ExportedDisk {
    pub meta: DiskMeta,
    /// disk.json as stored.
    pub chain_json: Vec<u8>,
    pub files: Vec<ChainFile>,
}

/// A layer id as the chain makes them: "l" and a number.
fn check_layer_id(id: &str) -> Result<()> {
    let ok = id.len() <= 12
        && id
            .strip_prefix('l')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidName {
            name: id.into(),
            reason: "a layer id is \"l\" and a number".into(),
        })
    }
}

/// Checks a chain's metadata for a move into `namespace/name` (pure): the names, every
/// parent and snapshot layer exists, the active layer exists, no cycles.
pub fn check_moved_meta(meta: &DiskMeta, namespace: &str, name: &str) -> Result<()> {
    let bad = |reason: String| StorageError::Snapshot {
        disk: format!("{namespace}/{name}"),
        reason,
    };
    if meta.namespace != namespace || meta.name != name {
        return Err(bad(format!(
            "the chain metadata is of disk {}/{}",
            meta.namespace, meta.name
        )));
    }
    crate::names::check_sha256(&meta.base)?;
    if meta.layers.is_empty() || meta.layers.len() > MAX_LAYERS {
        return Err(bad(format!(
            "{} layers (1 to {MAX_LAYERS} allowed)",
            meta.layers.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for l in &meta.layers {
        check_layer_id(&l.id)?;
        if !seen.insert(l.id.as_str()) {
            return Err(bad(format!("layer {} appears twice", l.id)));
        }
    }
    for l in &meta.layers {
        if let Some(p) = &l.parent
            && meta.layer(p).is_none()
        {
            return Err(bad(format!("layer {} has a missing parent {p}", l.id)));
        }
        // Each layer's chain must end at the base: a cycle never does.
        let chain = meta.chain_of(&l.id);
        let bottom = chain.last().and_then(|b| meta.layer(b));
        if bottom.is_none_or(|b| b.parent.is_some()) {
            return Err(bad(format!("layer {} is in a cycle", l.id)));
        }
    }
    if meta.layer(&meta.active).is_none() {
        return Err(bad(format!("active layer {} is missing", meta.active)));
    }
    if let Some(s) = meta
        .snapshots
        .iter()
        .find(|s| meta.layer(&s.layer).is_none())
    {
        return Err(bad(format!(
            "snapshot {} names a missing layer {}",
            s.name, s.layer
        )));
    }
    Ok(())
}

/// Files being received for a move: a private directory under tmp/, removed on drop
/// unless installed. Files arrive one after the other, each from offset 0 to its
/// announced size.
#[derive(Debug)]
pub struct IncomingDisk {
    dir: PathBuf,
    meta: DiskMeta,
    files: Vec<(String, u64)>,
    /// Index of the file being written, its bytes so far, their digest.
    current: usize,
    file: Option<std::fs::File>,
    /// Writes the current file back to disk while it arrives, so closing it (its
    /// `fsync`) waits for little.
    writeback: Option<crate::writeback::Writeback>,
    written: u64,
    hash: Sha256,
    /// Digests of the completed files.
    digests: Vec<String>,
    installed: bool,
}

impl Drop for IncomingDisk {
    fn drop(&mut self) {
        if !self.installed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl IncomingDisk {
    /// Next bytes of file `file` at `offset` (in order, no gaps, within the size the
    /// header announced).
    pub fn write(&mut self, file: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.advance_to(file)?;
        let (name, size) = self.files[file].clone();
        if offset != self.written {
            return Err(self.protocol(format!(
                "data for {name} at offset {offset}, expected offset {}",
                self.written
            )));
        }
        let end = offset.saturating_add(bytes.len() as u64);
        if end > size {
            return Err(StorageError::TooLarge {
                path: self.dir.join(&name),
                what: "moved layer",
                value: end,
                limit: size,
            });
        }
        let path = self.dir.join(&name);
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io_err(&path)(std::io::Error::other("file not open")))?;
        f.write_all(bytes).map_err(io_err(&path))?;
        self.written = end;
        self.hash.update(bytes);
        Ok(())
    }

    /// Completes the files before `file` and starts that one.
    fn advance_to(&mut self, file: usize) -> Result<()> {
        if file >= self.files.len() {
            return Err(self.protocol(format!("data for file #{file}, not in the header")));
        }
        if file < self.current {
            return Err(self.protocol(format!(
                "data for file #{file} after file #{} began",
                self.current
            )));
        }
        while self.current < file {
            self.close_current()?;
            self.current += 1;
            self.open_current()?;
        }
        Ok(())
    }

    fn open_current(&mut self) -> Result<()> {
        let path = self.dir.join(&self.files[self.current].0);
        let file = std::fs::File::create_new(&path).map_err(io_err(&path))?;
        self.writeback = Some(crate::writeback::Writeback::of_file(
            &file,
            &path,
            crate::writeback::INTERVAL,
        )?);
        self.file = Some(file);
        self.written = 0;
        self.hash = Sha256::new();
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        let (name, size) = self.files[self.current].clone();
        if self.written != size {
            return Err(self.protocol(format!("{name} ended at {} bytes of {size}", self.written)));
        }
        let path = self.dir.join(&name);
        if let Some(wb) = self.writeback.take() {
            wb.finish()?;
        }
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(io_err(&path))?;
        }
        let hash = std::mem::take(&mut self.hash);
        self.digests.push(hex(&hash.finalize()));
        Ok(())
    }

    /// All bytes are in: every file must be complete and match `sha256` (hex, header
    /// order).
    pub fn finish(&mut self, sha256: &[String]) -> Result<()> {
        // Trailing empty files get no data messages.
        self.advance_to(self.files.len() - 1)?;
        self.close_current()?;
        if sha256.len() != self.files.len() {
            return Err(self.protocol(format!(
                "{} digests for {} files",
                sha256.len(),
                self.files.len()
            )));
        }
        for ((name, _), (got, want)) in self.files.iter().zip(self.digests.iter().zip(sha256)) {
            if !got.eq_ignore_ascii_case(want) {
                return Err(StorageError::Checksum {
                    what: format!("moved layer {name}"),
                    expected: want.clone(),
                    actual: got.clone(),
                });
            }
        }
        Ok(())
    }

    fn protocol(&self, reason: String) -> StorageError {
        StorageError::Snapshot {
            disk: format!("{}/{} (move)", self.meta.namespace, self.meta.name),
            reason,
        }
    }

    /// The disk being received.
    pub fn meta(&self) -> &DiskMeta {
        &self.meta
    }
}

impl DiskStore {
    /// The files a move of disk `namespace/name` sends: every layer of its chain (the
    /// snapshot tree too), with sizes.
    pub fn exported_disk(&self, namespace: &str, name: &str) -> Result<ExportedDisk> {
        let meta = self.load_disk(namespace, name)?;
        let dir = self.disk_dir(namespace, name)?;
        let chain_json = std::fs::read(dir.join("disk.json")).map_err(io_err(&dir))?;
        let mut files = Vec::new();
        for l in &meta.layers {
            let path = self.layer_path(&meta, &l.id)?;
            let size = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            files.push(ChainFile {
                name: l.file_name(),
                path,
                size,
            });
        }
        Ok(ExportedDisk {
            meta,
            chain_json,
            files,
        })
    }

    /// The move that installed disk `namespace/name` here, if one did.
    pub fn moved_in(&self, namespace: &str, name: &str) -> Option<String> {
        let dir = self.disk_dir(namespace, name).ok()?;
        self.load_disk(namespace, name).ok()?;
        std::fs::read_to_string(dir.join(MOVED_IN)).ok()
    }

    /// Starts receiving disk `namespace/name`: checks the chain metadata and the file
    /// list against each other, the base is here, and the files fit.
    pub async fn receive_disk(
        &self,
        namespace: &str,
        name: &str,
        chain_json: &[u8],
        files: &[(String, u64)],
    ) -> Result<IncomingDisk> {
        check_object_name(namespace)?;
        check_object_name(name)?;
        let meta: DiskMeta =
            serde_json::from_slice(chain_json).map_err(|source| StorageError::Metadata {
                path: PathBuf::from(format!("{namespace}/{name}/disk.json (moved)")),
                source,
            })?;
        check_moved_meta(&meta, namespace, name)?;
        let mut expected: Vec<String> = meta.layers.iter().map(|l| l.file_name()).collect();
        let mut got: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
        expected.sort();
        got.sort();
        if expected != got {
            return Err(StorageError::Snapshot {
                disk: format!("{namespace}/{name}"),
                reason: format!(
                    "the files sent ({}) are not the chain's layers ({})",
                    got.join(", "),
                    expected.join(", ")
                ),
            });
        }
        self.base(&meta.base)?;
        let needed: u64 = files.iter().map(|(_, s)| *s).sum();
        let available = self.filesystem_available().await?;
        // Keep a margin: a full store fails every VM on the node, not just this one.
        let margin = 256 << 20;
        if needed.saturating_add(margin) > available {
            return Err(StorageError::NoSpace {
                path: self.root().to_path_buf(),
                needed: needed.saturating_add(margin),
                available,
            });
        }
        let dir = self.new_staging_dir("move")?;
        let mut incoming = IncomingDisk {
            dir,
            meta,
            files: files.to_vec(),
            current: 0,
            file: None,
            writeback: None,
            written: 0,
            hash: Sha256::new(),
            digests: Vec::new(),
            installed: false,
        };
        incoming.open_current()?;
        Ok(incoming)
    }

    /// Installs a completely received disk: every layer is checked as a qcow2 without
    /// external references, pointed at this node's paths and checked by qemu-img; then
    /// the disk replaces any copy of it here in one rename.
    pub async fn install_received(
        &self,
        mut incoming: IncomingDisk,
        move_id: &str,
    ) -> Result<DiskView> {
        if incoming.digests.len() != incoming.files.len() {
            return Err(incoming.protocol("installed before all files arrived".into()));
        }
        let meta = incoming.meta.clone();
        let final_dir = self.disk_dir(&meta.namespace, &meta.name)?;
        for l in &meta.layers {
            let staged = incoming.dir.join(l.file_name());
            let file = format::open_nofollow(&staged)?;
            let len = file.metadata().map_err(io_err(&staged))?.len();
            let header = qcow2::parse_header(&format::bytes_file(&file, &staged, len))?;
            qcow2::check_layer(&header, &staged, len, self.limits())?;
            let parent = self.parent_path(&meta, l.parent.as_deref())?;
            let args = crate::qemu_img::rebase_args(&staged, &parent, true);
            self.qemu_img().run(&args, None).await?;
            self.qemu_img()
                .check_alone(DiskFormat::Qcow2, &staged)
                .await?;
        }
        write_synced(&incoming.dir.join(MOVED_IN), move_id.as_bytes())?;
        let json = serde_json::to_vec_pretty(&meta).map_err(|source| StorageError::Metadata {
            path: final_dir.join("disk.json"),
            source,
        })?;
        write_synced(&incoming.dir.join("disk.json"), &json)?;
        let parent = final_dir
            .parent()
            .ok_or_else(|| io_err(&final_dir)(std::io::Error::other("no parent directory")))?;
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        // An older copy (an earlier stay of this VM here) goes aside first, then away.
        let old = self
            .root()
            .join("tmp")
            .join(format!("replaced-{}", unique_suffix()));
        let had_old = match std::fs::rename(&final_dir, &old) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&final_dir)(e)),
        };
        if let Err(e) = std::fs::rename(&incoming.dir, &final_dir) {
            if had_old {
                let _ = std::fs::rename(&old, &final_dir);
            }
            return Err(io_err(&final_dir)(e));
        }
        // The staging dir is the disk now: nothing for the drop to remove.
        incoming.installed = true;
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        self.disk_view(&meta)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn meta() -> DiskMeta {
        let mut m = DiskMeta::new("vm-a", "root", &"ab".repeat(32), 1 << 20);
        let l2 = m.add_layer(Some("l1".into()));
        m.active = l2;
        m
    }

    #[test]
    fn moved_metadata_must_name_the_disk_and_be_a_tree_over_the_base() {
        assert!(check_moved_meta(&meta(), "vm-a", "root").is_ok());
        assert!(check_moved_meta(&meta(), "vm-b", "root").is_err());
        let mut m = meta();
        m.layers[0].parent = Some("l2".into());
        let e = check_moved_meta(&m, "vm-a", "root").expect_err("cycle");
        assert!(e.to_string().contains("cycle"), "{e}");
        let mut m = meta();
        m.layers[1].id = "../x".into();
        m.active = "../x".into();
        assert!(check_moved_meta(&m, "vm-a", "root").is_err());
        let mut m = meta();
        m.active = "l9".into();
        assert!(check_moved_meta(&m, "vm-a", "root").is_err());
        let mut m = meta();
        m.base = "not-a-digest".into();
        assert!(check_moved_meta(&m, "vm-a", "root").is_err());
        let mut m = meta();
        m.layers.push(m.layers[0].clone());
        assert!(check_moved_meta(&m, "vm-a", "root").is_err());
    }
}
