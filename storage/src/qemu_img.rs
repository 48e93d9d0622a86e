//! qemu-img command lines (pure builders) and a runner that confines qemu-img with
//! `prlimit` (address space, CPU time). Images are always named with `json:` filenames
//! that give the driver explicitly, so qemu-img never probes a format, and qcow2 sources
//! carry `"backing": null` so it never follows a backing file.
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::error::{Result, StorageError};
use crate::format::DiskFormat;

/// Resource limits applied to every qemu-img process (lowering limits needs no privilege).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// RLIMIT_AS in bytes: a hostile image cannot make qemu-img allocate more.
    pub address_space: u64,
    /// RLIMIT_CPU in seconds.
    pub cpu_seconds: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            address_space: 2 << 30,
            cpu_seconds: 3600,
        }
    }
}

/// qcow2 creation options chosen for a disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Qcow2Options {
    pub cluster_size: u64,
    pub extended_l2: bool,
}

impl Qcow2Options {
    /// Options for a VM's writable overlay: extended L2 entries split clusters into 32
    /// subclusters, so a 4 KiB guest write copies 4 KiB (not a whole cluster) from the
    /// base; bigger clusters on very big disks keep the L2 metadata small.
    pub fn for_overlay(virtual_size: u64) -> Self {
        let cluster_size = if virtual_size <= 1 << 40 {
            128 << 10
        } else if virtual_size <= 4 << 40 {
            512 << 10
        } else {
            2 << 20
        };
        Self {
            cluster_size,
            extended_l2: true,
        }
    }

    /// Options for a shared read-only base: plain 64 KiB clusters (qemu's default).
    pub fn for_base() -> Self {
        Self {
            cluster_size: 64 << 10,
            extended_l2: false,
        }
    }

    /// `-o` value for qemu-img create/convert.
    pub fn to_opt_string(self) -> String {
        format!(
            "cluster_size={},extended_l2={}",
            self.cluster_size,
            if self.extended_l2 { "on" } else { "off" }
        )
    }

    /// The L2 cache that maps the whole disk (so no random read misses the cache),
    /// capped at 32 MiB per image; passed to the VMM as blockdev `l2-cache-size`.
    pub fn l2_cache_size(self, virtual_size: u64) -> u64 {
        let entry = if self.extended_l2 { 16 } else { 8 };
        let needed = virtual_size
            .div_ceil(self.cluster_size)
            .saturating_mul(entry);
        needed
            .next_multiple_of(self.cluster_size)
            .clamp(self.cluster_size, 32 << 20)
    }
}

/// A `json:` filename opening `path` with `format`'s driver and nothing else.
pub fn image_json(format: DiskFormat, path: &Path) -> String {
    let mut v = serde_json::json!({
        "driver": format.qemu_driver(),
        "file": {"driver": "file", "filename": path.to_string_lossy()},
    });
    if format == DiskFormat::Qcow2 {
        v["backing"] = serde_json::Value::Null;
    }
    format!("json:{v}")
}

/// `prlimit` wrapper: (program, args).
pub fn confined(program: &str, args: &[String], limits: &ResourceLimits) -> (String, Vec<String>) {
    let mut all = vec![
        format!("--as={}", limits.address_space),
        format!("--cpu={}", limits.cpu_seconds),
        "--".to_string(),
        program.to_string(),
    ];
    all.extend(args.iter().cloned());
    ("prlimit".to_string(), all)
}

/// Converts an import (validated) into a qcow2 base.
pub fn convert_to_qcow2_args(
    format: DiskFormat,
    src: &Path,
    dst: &Path,
    opts: Qcow2Options,
) -> Vec<String> {
    vec![
        "convert".into(),
        "-p".into(),
        "-O".into(),
        "qcow2".into(),
        "-o".into(),
        opts.to_opt_string(),
        image_json(format, src),
        dst.to_string_lossy().into_owned(),
    ]
}

/// Creates a qcow2 overlay of `backing` (a qcow2 in the store).
pub fn create_overlay_args(
    backing: &Path,
    path: &Path,
    opts: Qcow2Options,
    size: Option<u64>,
) -> Vec<String> {
    let mut args = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-b".into(),
        backing.to_string_lossy().into_owned(),
        "-F".into(),
        "qcow2".into(),
        "-o".into(),
        opts.to_opt_string(),
        path.to_string_lossy().into_owned(),
    ];
    if let Some(size) = size {
        args.push(size.to_string());
    }
    args
}

/// Points qcow2 `image` at `backing` (qcow2). Safe mode copies into `image` what
/// differs between its old and new backing; `header_only` (`-u`) rewrites just the
/// name, for a backing with the same content under another path.
pub fn rebase_args(image: &Path, backing: &Path, header_only: bool) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "rebase".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        "qcow2".into(),
        "-b".into(),
        backing.to_string_lossy().into_owned(),
        image.to_string_lossy().into_owned(),
    ];
    if header_only {
        args.insert(1, "-u".into());
    }
    args
}

/// Exports any qcow2 chain as one streamOptimized VMDK (what vSphere imports).
pub fn export_vmdk_args(src: &Path, dst: &Path) -> Vec<String> {
    vec![
        "convert".into(),
        "-f".into(),
        "qcow2".into(),
        "-O".into(),
        "vmdk".into(),
        "-o".into(),
        "subformat=streamOptimized,adapter_type=lsilogic,hwversion=6".into(),
        src.to_string_lossy().into_owned(),
        dst.to_string_lossy().into_owned(),
    ]
}

/// Runs qemu-img under `prlimit`.
#[derive(Debug, Clone)]
pub struct QemuImg {
    pub program: PathBuf,
    pub limits: ResourceLimits,
}

impl Default for QemuImg {
    fn default() -> Self {
        Self {
            program: PathBuf::from("qemu-img"),
            limits: ResourceLimits::default(),
        }
    }
}

/// Parses `-p` progress output ("    (42.00/100%)\r") into the last percentage seen.
pub fn parse_progress(chunk: &str) -> Option<f64> {
    chunk.rsplit('(').find_map(|part| {
        part.split('/')
            .next()
            .and_then(|p| p.trim().parse::<f64>().ok())
    })
}

impl QemuImg {
    /// Runs qemu-img with `args`; `progress` gets percentages from `-p` output.
    pub async fn run(
        &self,
        args: &[String],
        progress: Option<&(dyn Fn(f64) + Send + Sync)>,
    ) -> Result<String> {
        let (program, all) = confined(&self.program.to_string_lossy(), args, &self.limits);
        let command = format!("qemu-img {}", args.join(" "));
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Dies with its starter (a conversion must not outlive a killed agent) and is
        // recorded for the agent's next start.
        let mut child =
            hvx_child::spawn_tokio(cmd)
                .await
                .map_err(|source| StorageError::Spawn {
                    program: program.clone(),
                    source,
                })?;
        let _record = hvx_child::Tracker::track_global(
            child.id(),
            &format!("qemu-img {}", args.first().map_or("", String::as_str)),
        );
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| StorageError::Join("no stdout".into()))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| StorageError::Join("no stderr".into()))?;
        let err_task = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .map_err(|source| StorageError::Io {
                    path: PathBuf::from("<qemu-img stdout>"),
                    source,
                })?;
            if n == 0 {
                break;
            }
            if let Some(cb) = progress
                && let Some(pct) = parse_progress(&String::from_utf8_lossy(&buf[..n]))
            {
                cb(pct);
            }
            out.extend_from_slice(&buf[..n]);
        }
        let status = child.wait().await.map_err(|source| StorageError::Spawn {
            program: program.clone(),
            source,
        })?;
        let stderr = err_task.await.unwrap_or_default();
        if !status.success() {
            return Err(StorageError::Command {
                command,
                status: status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// `qemu-img info` of a qcow2 (backing not followed).
    pub async fn info(&self, format: DiskFormat, path: &Path) -> Result<ImageInfo> {
        let args = vec![
            "info".into(),
            "--output=json".into(),
            image_json(format, path),
        ];
        let out = self.run(&args, None).await?;
        serde_json::from_str(&out).map_err(|e| StorageError::CommandOutput {
            command: "qemu-img info".into(),
            reason: e.to_string(),
        })
    }

    /// Bytes a conversion of `path` to qcow2 with `opts` needs (`qemu-img measure`).
    pub async fn measure(
        &self,
        format: DiskFormat,
        path: &Path,
        opts: Qcow2Options,
    ) -> Result<u64> {
        let args = vec![
            "measure".into(),
            "--output=json".into(),
            "-O".into(),
            "qcow2".into(),
            "-o".into(),
            opts.to_opt_string(),
            image_json(format, path),
        ];
        let out = self.run(&args, None).await?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| StorageError::CommandOutput {
                command: "qemu-img measure".into(),
                reason: e.to_string(),
            })?;
        v["required"]
            .as_u64()
            .ok_or_else(|| StorageError::CommandOutput {
                command: "qemu-img measure".into(),
                reason: format!("no \"required\" in {out}"),
            })
    }

    /// `qemu-img check` of a qcow2 or vmdk; errors when qemu-img reports problems.
    pub async fn check(&self, format: DiskFormat, path: &Path) -> Result<()> {
        let args = vec![
            "check".into(),
            "-f".into(),
            format.qemu_driver().into(),
            path.to_string_lossy().into_owned(),
        ];
        self.run(&args, None).await.map(|_| ())
    }

    /// `qemu-img check` of one qcow2 file without its backing chain (a layer whose
    /// backing file is not in place yet).
    pub async fn check_alone(&self, format: DiskFormat, path: &Path) -> Result<()> {
        let args = vec!["check".into(), image_json(format, path)];
        self.run(&args, None).await.map(|_| ())
    }

    /// `qemu-img compare` (content, not format); Ok(true) when identical.
    pub async fn compare(&self, a: (DiskFormat, &Path), b: (DiskFormat, &Path)) -> Result<bool> {
        let args = vec![
            "compare".into(),
            "-q".into(),
            "-f".into(),
            a.0.qemu_driver().into(),
            "-F".into(),
            b.0.qemu_driver().into(),
            a.1.to_string_lossy().into_owned(),
            b.1.to_string_lossy().into_owned(),
        ];
        match self.run(&args, None).await {
            Ok(_) => Ok(true),
            Err(StorageError::Command { status, .. }) if status.contains("exit status: 1") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The parts of `qemu-img info --output=json` hvx reads.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ImageInfo {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    pub format: String,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn json_filename_pins_driver_and_disables_backing() {
        let j = image_json(DiskFormat::Qcow2, Path::new("/s/a \"b\".qcow2"));
        let v: serde_json::Value = serde_json::from_str(j.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(v["driver"], "qcow2");
        assert!(v["backing"].is_null() && v.get("backing").is_some());
        assert_eq!(v["file"]["filename"], "/s/a \"b\".qcow2");
        let j = image_json(DiskFormat::Vmdk, Path::new("/s/d.vmdk"));
        assert!(!j.contains("backing"));
    }

    #[test]
    fn rebase_is_safe_unless_only_the_header_changes() {
        let (img, base) = (Path::new("/s/l2.qcow2"), Path::new("/s/l1.qcow2"));
        let safe = rebase_args(img, base, false);
        assert_eq!(
            safe,
            [
                "rebase",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "/s/l1.qcow2",
                "/s/l2.qcow2"
            ]
        );
        let header = rebase_args(img, base, true);
        assert_eq!(header[..2], ["rebase", "-u"]);
        assert_eq!(header[2..], safe[1..]);
    }

    #[test]
    fn confined_wraps_with_prlimit() {
        let (p, a) = confined(
            "qemu-img",
            &["info".into()],
            &ResourceLimits {
                address_space: 100,
                cpu_seconds: 5,
            },
        );
        assert_eq!(p, "prlimit");
        assert_eq!(a, ["--as=100", "--cpu=5", "--", "qemu-img", "info"]);
    }

    #[test]
    fn overlay_options_by_size() {
        let small = Qcow2Options::for_overlay(10 << 30);
        assert_eq!(small.cluster_size, 128 << 10);
        assert!(small.extended_l2);
        assert_eq!(Qcow2Options::for_overlay(8 << 40).cluster_size, 2 << 20);
        // 10 GiB / 128 KiB = 81920 entries * 16 bytes = 1.25 MiB.
        assert_eq!(small.l2_cache_size(10 << 30), 1_310_720);
        assert_eq!(small.l2_cache_size(16 << 40), 32 << 20);
        assert_eq!(small.l2_cache_size(1), 128 << 10);
    }

    #[test]
    fn progress_parsing() {
        assert_eq!(
            parse_progress("    (0.00/100%)\r    (42.50/100%)\r"),
            Some(42.5)
        );
        assert_eq!(parse_progress("nothing"), None);
    }
}
