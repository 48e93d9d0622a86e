//! `VmSpec`: the launcher's input, one VMware-like VM as QEMU should run it.
//!
//! JSON form (all paths absolute; optional fields may be omitted):
//!
//! ```json
//! {
//!   "name": "web-1",
//!   "uuid": "421a5b3c-0000-4000-8000-000000000001",    // SMBIOS type 1 UUID (optional)
//!   "serial": "VMware-42 1a 5b 3c ...",                 // SMBIOS serial (optional)
//!   "firmware": "bios",                                 // bios | efi
//!   "cpu": {"sockets": 1, "cores": 2, "threads": 1},
//!   "memory_mib": 512,
//!   "accelerator": "auto",                              // auto | kvm | tcg
//!   "machine": "pc",                                    // pc (i440fx, VMware's chipset) | q35
//!   "controllers": [{"type": "pvscsi", "bus": 0, "pci_slot": 16}],
//!   "disks": [{"name": "disk0", "path": "/var/lib/hvx/d0.qcow2", "format": "qcow2",
//!              "controller": "pvscsi", "bus": 0, "unit": 0,
//!              "readonly": false, "boot_order": 1}],     // "cdrom": true: a CD-ROM drive
//!   "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:01:02:03",
//!             "pci_slot": 17, "slot_number": 192,                // slot_number: q35 only
//!             "backend": {"tap": {"name": "hvt0123456789ab"}}}],
//!   "run_dir": "/run/hvx/web-1",                        // QMP, serial, VNC sockets, logs
//!   "vnc": true, "balloon": false, "vmport": true, "svga": true,
//!   "fw_cfg": {"opt/hvx/config": "ip.eth0=10.1.0.5/24\n"},
//!   "restart_policy": {"policy": "on_failure", "max_restarts": 3},
//!   "shutdown_timeout_s": 60
//! }
//! ```
//!
//! NIC backends: `{"tap": {"name": ".."}}` (production: the agent's tap on the overlay
//! switch), `{"socket": {"listen"|"connect": "host:port"}}` (QEMU socket netdev, tests),
//! `{"user": {}}` (slirp user-mode networking: tests only).
//! Disk controllers: `pvscsi`, `lsilogic` and `lsisas` (both mptsas1068: QEMU has no LSI
//! Logic parallel model VMware guests still bind), `sata` (ahci), `ide` (piix), `virtio`.
//! Controllers not listed in `controllers` are created on demand with default slots.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One VM, as the launcher runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// VM name (QEMU `-name`, file names in the run dir).
    pub name: String,
    /// SMBIOS system UUID (the source VM's BIOS UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// SMBIOS system serial number (the source VM's `VMware-42 ..` serial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// CPU topology.
    #[serde(default)]
    pub cpu: CpuTopology,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Accelerator choice; `auto` probes KVM and falls back to TCG.
    #[serde(default)]
    pub accelerator: AcceleratorChoice,
    /// QEMU machine type.
    #[serde(default)]
    pub machine: MachineType,
    /// Disk controllers with declared PCI slots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<Controller>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// NICs.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Directory for QMP/serial/VNC sockets, the serial log and the pid file.
    pub run_dir: PathBuf,
    /// VNC server on a unix socket in the run dir.
    #[serde(default)]
    pub vnc: bool,
    /// virtio-balloon device.
    #[serde(default)]
    pub balloon: bool,
    /// VMware backdoor I/O port (VMware Tools talk to it).
    #[serde(default = "yes")]
    pub vmport: bool,
    /// vmware-svga display adapter (else no display device).
    #[serde(default = "yes")]
    pub svga: bool,
    /// Extra fw_cfg blobs, name -> content (`opt/...` names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fw_cfg: BTreeMap<String, String>,
    /// What to do when QEMU exits on its own.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// ACPI shutdown grace before power-off.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_s: u32,
}

fn yes() -> bool {
    true
}
fn default_shutdown_timeout() -> u32 {
    60
}

/// Firmware type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS.
    #[default]
    Bios,
    /// OVMF (UEFI).
    Efi,
}

/// vCPU topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    #[serde(default = "one")]
    pub threads: u32,
}

fn one() -> u32 {
    1
}

impl Default for CpuTopology {
    fn default() -> Self {
        Self {
            sockets: 1,
            cores: 1,
            threads: 1,
        }
    }
}

impl CpuTopology {
    /// Total vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.sockets
            .saturating_mul(self.cores)
            .saturating_mul(self.threads)
    }
}

/// Accelerator requested for a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    /// Probe KVM, fall back to TCG.
    #[default]
    Auto,
    /// Force hardware virtualization.
    Kvm,
    /// Force binary translation.
    Tcg,
}

/// QEMU machine type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// i440fx + PIIX: the chipset VMware's virtual hardware emulates.
    #[default]
    Pc,
    /// Q35 + ICH9.
    Q35,
}

/// Disk controller model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerKind {
    /// VMware Paravirtual SCSI.
    Pvscsi,
    /// LSI Logic; emulated by the SAS1068 (QEMU lacks the LSI53C1030 VMware uses).
    Lsilogic,
    /// LSI Logic SAS (SAS1068).
    Lsisas,
    /// SATA (AHCI).
    Sata,
    /// IDE (PIIX, the machine's built-in controller).
    Ide,
    /// virtio-scsi (not VMware; for converted VMs).
    Virtio,
}

impl ControllerKind {
    /// Name used in device ids and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pvscsi => "pvscsi",
            Self::Lsilogic => "lsilogic",
            Self::Lsisas => "lsisas",
            Self::Sata => "sata",
            Self::Ide => "ide",
            Self::Virtio => "virtio",
        }
    }
}

/// A disk controller instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// Model.
    #[serde(rename = "type")]
    pub kind: ControllerKind,
    /// Bus number within its kind (scsi0, scsi1 ...).
    #[serde(default)]
    pub bus: u8,
    /// PCI slot on bus 0 (ignored for IDE, which is part of the chipset). With
    /// `slot_number`, the slot of the root port the controller sits behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
    /// Guest-visible physical slot number (VMware's `pciSlotNumber`, 32 and up): the
    /// controller sits behind its own PCIe root port announcing this number (q35 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_number: Option<u16>,
}

/// Disk image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2 (the agent's overlays).
    #[default]
    Qcow2,
    /// raw.
    Raw,
    /// VMDK (any subformat QEMU reads).
    Vmdk,
}

impl DiskFormat {
    /// QEMU's format name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
            Self::Vmdk => "vmdk",
        }
    }
}

/// A disk at its original address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Disk name (QEMU node and device id suffix).
    pub name: String,
    /// Image path on the node.
    pub path: PathBuf,
    /// Image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Controller model.
    pub controller: ControllerKind,
    /// Controller bus (scsi0 = 0); for IDE: channel (0 primary, 1 secondary).
    #[serde(default)]
    pub bus: u8,
    /// SCSI target / SATA port / IDE unit (master 0, slave 1).
    #[serde(default)]
    pub unit: u8,
    /// Read-only disk.
    #[serde(default)]
    pub readonly: bool,
    /// A CD/DVD drive holding the image (an ISO), not a hard disk: `scsi-cd` / `ide-cd`.
    /// Must be read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cdrom: bool,
    /// Boot priority (1 first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
}

/// NIC model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// VMware vmxnet3.
    Vmxnet3,
    /// Intel 82545EM.
    E1000,
    /// Intel 82574L.
    E1000e,
    /// virtio-net.
    Virtio,
}

impl NicModel {
    /// QEMU device name.
    pub fn device(self) -> &'static str {
        match self {
            Self::Vmxnet3 => "vmxnet3",
            Self::E1000 => "e1000",
            Self::E1000e => "e1000e",
            Self::Virtio => "virtio-net-pci",
        }
    }
}

/// Host side of a NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicBackend {
    /// Existing tap device (created by the node agent).
    Tap {
        /// Interface name.
        name: String,
        /// An open fd of the tap the node agent passed to the launcher (QEMU gets
        /// `fd=`, inherits it, and needs no access to the node's network namespace).
        /// Never read from a spec file: only the launcher sets it, per QEMU start.
        #[serde(skip)]
        fd: Option<i32>,
    },
    /// QEMU socket netdev (point-to-point L2 over TCP; tests and labs).
    Socket {
        /// `host:port` to listen on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
        /// `host:port` to connect to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connect: Option<String>,
    },
    /// Slirp user-mode networking (tests only).
    User {},
}

/// A NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// NIC name (device id suffix).
    pub name: String,
    /// Model.
    pub model: NicModel,
    /// MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// PCI slot on bus 0. With `slot_number`, the slot of the NIC's root port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
    /// Guest-visible physical slot number (VMware's `pciSlotNumber`, 32 and up; Linux
    /// names the NIC `ens<N>` after it): the NIC sits behind its own PCIe root port
    /// announcing this number (q35 only; see `argv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_number: Option<u16>,
    /// Host backend.
    pub backend: NicBackend,
}

/// What happens when QEMU exits without being asked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Policy.
    pub policy: RestartKind,
    /// Restarts allowed before giving up.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
}

fn default_max_restarts() -> u32 {
    3
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            policy: RestartKind::OnFailure,
            max_restarts: default_max_restarts(),
        }
    }
}

/// Restart kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartKind {
    /// Never restart; the launcher exits with QEMU's status.
    Never,
    /// Restart after a crash (not after a guest power-off).
    OnFailure,
    /// Restart after any exit, including guest power-off.
    Always,
}

impl VmSpec {
    /// Parses a spec from JSON.
    pub fn from_json(text: &str) -> Result<Self, crate::VmmError> {
        serde_json::from_str(text).map_err(|e| crate::VmmError::SpecParse(e.to_string()))
    }
}
