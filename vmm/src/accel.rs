//! Accelerator probe: KVM is used only if it really boots a guest. On some hosts
//! `/dev/kvm` opens fine and a real-mode boot sector runs, yet a Linux kernel hangs in
//! its decompressor (and real guests die in their boot loader with "emulation
//! failure"); so the probe boots a kernel, and without one to boot it does not trust
//! KVM: multi-threaded TCG (binary translation), with the reason recorded. The agent
//! and launcher images carry a probe kernel (`HVX_PROBE_KERNEL`).

use crate::argv::{Accel, QEMU_BINARY};
use crate::{Result, VmmError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceleratorReport {
    /// The accelerator VMs get on this node.
    pub accel: Accel,
    /// Why (e.g. "kvm: probe guest produced no output within 10s").
    pub reason: String,
    /// The `-cpu` model VMs get with that accelerator.
    pub cpu_model: String,
}

/// Probe settings.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// QEMU binary.
    pub qemu: String,
    /// A Linux kernel to boot; `None` searches (see `find_probe_kernel`) and else uses a
    /// boot sector (weaker: it does not exercise paging or long mode).
    pub kernel: Option<PathBuf>,
    /// How long the probe guest may take to print its first line.
    pub timeout: Duration,
    /// The KVM device.
    pub kvm_device: PathBuf,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            qemu: QEMU_BINARY.to_string(),
            kernel: None,
            timeout: Duration::from_secs(10),
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }
}

/// The marker the boot-sector probe prints.
const SECTOR_MARK: &str = "HVX-PROBE-OK";
/// The marker a kernel prints first on its console.
const KERNEL_MARK: &str = "Linux version";

/// A 512-byte boot sector that prints `HVX-PROBE-OK` on COM1 and halts.
pub fn probe_boot_sector() -> Vec<u8> {
    let mut b = vec![
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xFC, // cld
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xBE, 0x17, 0x7C, // mov si, msg (0x7c17)
        0xAC, // lodsb
        0x08, 0xC0, // or al, al
        0x74, 0x03, // jz done
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp lodsb
        0xFA, // done: cli
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
    ];
    b.extend_from_slice(SECTOR_MARK.as_bytes());
    b.extend_from_slice(b"\n\0");
    b.resize(510, 0);
    b.extend_from_slice(&[0x55, 0xAA]);
    b
}

/// A kernel to probe with: `$HVX_PROBE_KERNEL`, else the cached test guest's kernel,
/// else the host's newest `/boot/vmlinuz-*`.
pub fn find_probe_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("HVX_PROBE_KERNEL") {
        return Some(PathBuf::from(k));
    }
    let cache = std::env::var_os("HVX_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/hvx"), PathBuf::from);
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache.join("guest"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("vmlinuz"))
        .filter(|p| p.is_file())
        .collect();
    found.extend(
        std::fs::read_dir("/boot")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            }),
    );
    found.sort();
    found.pop()
}

/// Decides the accelerator for VMs on this host.
pub async fn probe_accelerator(opts: &ProbeOptions) -> AcceleratorReport {
    let tcg = |reason: String| AcceleratorReport {
        accel: Accel::Tcg,
        reason,
        cpu_model: Accel::Tcg.cpu_model().to_string(),
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&opts.kvm_device)
    {
        return tcg(format!(
            "kvm: cannot open {}: {e}",
            opts.kvm_device.display()
        ));
    }
    let Some(kernel) = opts.kernel.clone().or_else(find_probe_kernel) else {
        return tcg(
            "kvm: no probe kernel to verify it with ($HVX_PROBE_KERNEL, the guest cache or \
             /boot/vmlinuz-*; a boot sector alone passes where real guests fail); using tcg"
                .to_string(),
        );
    };
    match boot_probe(opts, Accel::Kvm, Some(&kernel)).await {
        Ok(()) => AcceleratorReport {
            accel: Accel::Kvm,
            reason: format!("kvm: probe kernel {} booted", kernel.display()),
            cpu_model: Accel::Kvm.cpu_model().to_string(),
        },
        Err(why) => tcg(format!(
            "kvm: {why}; using tcg (binary translation, multi-threaded)"
        )),
    }
}

/// Checks that a forced accelerator works; used when a VM says `kvm` explicitly.
pub async fn check_accelerator(opts: &ProbeOptions, accel: Accel) -> Result<()> {
    let kernel = opts.kernel.clone().or_else(find_probe_kernel);
    boot_probe(opts, accel, kernel.as_deref())
        .await
        .map_err(|reason| VmmError::Accelerator {
            accel: accel.as_str().to_string(),
            reason,
        })
}

/// Boots the probe guest; `Err` carries a human-readable reason.
async fn boot_probe(
    opts: &ProbeOptions,
    accel: Accel,
    kernel: Option<&Path>,
) -> std::result::Result<(), String> {
    // Only the boot-sector probe needs a file; a directory made for every probe was
    // left in /tmp each time the agent was killed mid-probe.
    let mut _dir = None;
    let mut cmd = Command::new(&opts.qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "pc",
        "-m",
        "128",
        "-display",
        "none",
    ])
    .args([
        "-accel",
        accel.as_str(),
        "-cpu",
        accel.cpu_model(),
        "-no-reboot",
    ])
    .args(["-serial", "stdio"]);
    let mark = match kernel {
        Some(k) => {
            cmd.arg("-kernel")
                .arg(k)
                .args(["-append", "console=ttyS0 panic=-1"]);
            KERNEL_MARK
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("hvx-probe-")
                .tempdir()
                .map_err(|e| format!("cannot create a probe directory: {e}"))?;
            let img = dir.path().join("probe.img");
            std::fs::write(&img, probe_boot_sector())
                .map_err(|e| format!("cannot write probe image: {e}"))?;
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=ide", img.display()));
            _dir = Some(dir);
            SECTOR_MARK
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Dies with its starter: an agent killed mid-probe must not leave a spinning QEMU.
    let mut child = hvx_child::spawn_tokio(cmd)
        .await
        .map_err(|e| format!("cannot run {}: {e}", opts.qemu))?;
    let _record = hvx_child::Tracker::track_global(child.id(), "accelerator probe");
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let seen = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stdout.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if String::from_utf8_lossy(&buf).contains(mark) {
                return true;
            }
        }
    };
    let outcome = tokio::time::timeout(opts.timeout, seen).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err).await;
    let first_err = err
        .lines()
        .find(|l| !l.contains("warning") && !l.contains("terminating on signal"))
        .unwrap_or("")
        .trim()
        .to_string();
    let what = if kernel.is_some() {
        "probe kernel"
    } else {
        "probe boot sector"
    };
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) if !first_err.is_empty() => {
            Err(format!("QEMU failed to run the {what}: {first_err}"))
        }
        Ok(false) => Err(format!("QEMU exited before the {what} printed anything")),
        Err(_) => Err(format!(
            "{what} produced no output within {}s",
            opts.timeout.as_secs()
        )),
    }
}
