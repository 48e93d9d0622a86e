//! Shared helpers of the privileged tests: the cached test guest, specs, guards.
#![allow(dead_code)]

use hvx_vmm::VmSpec;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds (or finds cached) the test guest; returns its directory.
pub fn guest_dir() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/build-guest.sh");
    let out = Command::new(&script)
        .output()
        .expect("run hack/build-guest.sh");
    assert!(
        out.status.success(),
        "build-guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build-guest prints its directory")
            .trim(),
    )
}

/// A qcow2 overlay over the guest's streamOptimized VMDK (boots, but QEMU's vmdk driver
/// blocks migration and suspend-to-file: imported disks must become qcow2 bases).
pub fn overlay_on_vmdk(guest: &Path, dir: &Path) -> PathBuf {
    let overlay = dir.join("boot.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "vmdk", "-b"])
        .arg(guest.join("disk-stream.vmdk"))
        .arg(&overlay)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create failed");
    overlay
}

/// The VMware-like test VM: pvscsi disk at SCSI target 3, vmxnet3 with a VMware MAC.
pub fn vm_spec(name: &str, disk: &Path, run_dir: &Path) -> VmSpec {
    let v = serde_json::json!({
        "name": name,
        "uuid": "421a5b3c-1111-4222-8333-444455556666",
        "serial": "VMware-42 1a 5b 3c 11 11 42 22-83 33 44 44 55 55 66 66",
        "cpu": {"sockets": 1, "cores": 2},
        "memory_mib": 256,
        "accelerator": "tcg",
        "controllers": [{"type": "pvscsi", "bus": 0, "pci_slot": 16}],
        "disks": [{"name": "boot", "path": disk, "format": "qcow2", "controller": "pvscsi",
                   "bus": 0, "unit": 3, "boot_order": 1}],
        "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:12:34:56",
                  "pci_slot": 17, "backend": {"user": {}}}],
        "run_dir": run_dir,
        "balloon": true,
        "restart_policy": {"policy": "never"},
        "shutdown_timeout_s": 60
    });
    serde_json::from_value(v).expect("test spec parses")
}

/// Must run as root (QEMU with real files in /tmp is fine, but the tier is privileged).
pub fn require_root() -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if uid.unwrap_or(false) {
        true
    } else {
        eprintln!("SKIP: privileged test needs root");
        false
    }
}

/// True if no process has `needle` in its command line (checks nothing is left running).
pub fn no_process_mentions(needle: &str) -> bool {
    let out = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("run ps");
    !String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(needle) && !l.starts_with("ps "))
}

/// A qcow2 overlay over a qcow2 base converted from the guest's VMDK (what the disk
/// store's import produces); supports suspend and migration.
pub fn overlay_on_qcow2_base(guest: &Path, dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "vmdk", "-O", "qcow2"])
        .arg(guest.join("disk-stream.vmdk"))
        .arg(&base)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img convert failed");
    let overlay = dir.join("boot.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create failed");
    overlay
}
