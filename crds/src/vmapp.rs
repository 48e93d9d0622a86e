//! `VmApplication`: a multi-VM application with the virtual hardware it had on ESX.

use crate::common::LocalRef;
use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A MAC address in the colon form VMware writes (`00:50:56:aa:bb:cc`).
/// Lower-case only, unicast only (the low bit of the first octet clear): the import CLI
/// normalises what VMware wrote.
pub const MAC_PATTERN: &str = "^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$";
/// Lowest VMware `pciSlotNumber` the API takes: smaller numbers are bus-0 slots (`pciSlot`).
pub const PCI_SLOT_NUMBER_MIN: u16 = 32;
/// Highest: the PCIe Physical Slot Number has 13 bits.
pub const PCI_SLOT_NUMBER_MAX: u16 = 8191;
/// A PCI slot on bus 0 in QEMU's `addr=` form (`0x10` or `16`, 1..31; slot 0 is the host bridge).
pub const PCI_SLOT_MAX: u8 = 31;
/// DNS-1123 label: VM, NIC and disk names become pod names, hostnames and DNS records.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A multi-VM application, lifted and shifted from VMware unchanged.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "hvx.dev",
    version = "v1alpha1",
    kind = "VmApplication",
    namespaced,
    status = "VmApplicationStatus",
    shortname = "vmapp",
    shortname = "vmapps",
    category = "hvx",
    printcolumn = r#"{"name":"VMs","type":"integer","jsonPath":".status.vmCount"}"#,
    printcolumn = r#"{"name":"Running","type":"integer","jsonPath":".status.runningCount"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.vms.all(v, !has(v.dependsOn) || !(v.name in v.dependsOn))",
     "message": "a VM cannot depend on itself (dependsOn naming unknown VMs and cycles are reported by the operator)"}
]))]
pub struct VmApplicationSpec {
    /// The application's VMs. Names are unique (list keyed by name).
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub vms: Vec<VirtualMachine>,
}

/// One VM, with the hardware it had on ESX.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.nics.all(n, !has(n.pciSlot) || self.nics.exists_one(m, has(m.pciSlot) && m.pciSlot == n.pciSlot)) && (!has(self.controllers) || self.controllers.all(c, !has(c.pciSlot) || (!self.nics.exists(n, has(n.pciSlot) && n.pciSlot == c.pciSlot) && self.controllers.exists_one(d, has(d.pciSlot) && d.pciSlot == c.pciSlot))))",
     "message": "PCI slots must be unique across NICs and controllers"},
    {"rule": "self.nics.all(n, !has(n.pciSlotNumber) || self.nics.exists_one(m, has(m.pciSlotNumber) && m.pciSlotNumber == n.pciSlotNumber)) && (!has(self.controllers) || self.controllers.all(c, !has(c.pciSlotNumber) || (!self.nics.exists(n, has(n.pciSlotNumber) && n.pciSlotNumber == c.pciSlotNumber) && self.controllers.exists_one(d, has(d.pciSlotNumber) && d.pciSlotNumber == c.pciSlotNumber))))",
     "message": "PCI slot numbers must be unique across NICs and controllers"},
    {"rule": "!(self.nics.exists(n, has(n.pciSlotNumber)) || (has(self.controllers) && self.controllers.exists(c, has(c.pciSlotNumber)))) || !self.disks.exists(d, d.controller == 'ide')",
     "message": "pciSlotNumber needs the q35 chipset, which has no IDE controller: move the IDE disks to sata or drop pciSlotNumber"},
    {"rule": "self.nics.all(n, self.nics.exists_one(m, m.macAddress == n.macAddress))",
     "message": "MAC addresses must be unique (across VMs too: checked by the operator)"},
    {"rule": "self.disks.all(d, self.disks.exists_one(e, e.controller == d.controller && e.bus == d.bus && e.unit == d.unit))",
     "message": "each disk needs its own controller/bus/unit address"},
    {"rule": "self.disks.all(d, !(d.controller in ['ide']) || (d.bus <= 1 && d.unit <= 1))",
     "message": "IDE disks use bus 0-1 and unit 0-1"},
    {"rule": "self.disks.all(d, d.controller != 'sata' || d.unit <= 29)",
     "message": "SATA disks use unit 0-29"},
    {"rule": "self.disks.all(d, !(d.controller in ['pvscsi', 'lsilogic', 'lsisas']) || (d.unit <= 63 && d.unit != 7))",
     "message": "SCSI disks use unit 0-63 except 7 (the controller's own ID)"},
    {"rule": "!has(self.startDelaySeconds) || (has(self.dependsOn) && size(self.dependsOn) > 0)",
     "message": "startDelaySeconds counts from the start of the VMs in dependsOn: set dependsOn"}
]))]
pub struct VirtualMachine {
    /// VM name: a DNS label, used as hostname, DNS record and pod name suffix.
    #[schemars(
        length(min = 1, max = 50),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Virtual CPU topology.
    #[serde(default)]
    pub cpu: CpuTopology,
    /// Guest memory in MiB (VMware's `memsize`).
    #[schemars(range(min = 16, max = 4194304))]
    pub memory_mib: u32,
    /// Firmware the guest was installed with.
    #[serde(default)]
    pub firmware: Firmware,
    /// SMBIOS identity, so licensing and agents inside the guest see the same machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SmbiosIdentity>,
    /// Disk controllers with explicit PCI slots. Controllers referenced by disks and not
    /// listed here get the slot VMware would give them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub controllers: Option<Vec<DiskController>>,
    /// Disks, each at its original controller address.
    #[serde(default)]
    #[schemars(length(max = 60))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<VmDisk>,
    /// NICs, each with its original model, MAC and PCI slot.
    #[serde(default)]
    #[schemars(length(max = 10))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub nics: Vec<VmNic>,
    /// Other VMs of this application that must be running (their QEMU started; the
    /// operator does not wait for the guest to boot) before this one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub depends_on: Option<Vec<String>>,
    /// Seconds to wait, once every VM in `dependsOn` is running, before starting this
    /// one (a VMware vApp's start delay: time for the earlier VMs' services to come up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub start_delay_seconds: Option<u32>,
    /// How and when hvx keeps the VM running.
    #[serde(default)]
    pub run_strategy: RunStrategy,
    /// What a node drain does to this VM.
    #[serde(default)]
    pub eviction_strategy: EvictionStrategy,
    /// Hardware virtualization or binary translation.
    #[serde(default)]
    pub accelerator: Accelerator,
    /// Where the VM may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Optional devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<OptionalDevices>,
    /// Seconds an ACPI shutdown may take before the VM is powered off.
    #[serde(default = "default_shutdown_grace")]
    #[schemars(range(min = 0, max = 3600))]
    pub shutdown_grace_seconds: u32,
}

fn default_shutdown_grace() -> u32 {
    120
}

/// CPU topology as VMware declares it (`numvcpus`, `cpuid.coresPerSocket`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuTopology {
    /// Sockets.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 16))]
    pub sockets: u32,
    /// Cores per socket.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 128))]
    pub cores_per_socket: u32,
    /// Threads per core.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 2))]
    pub threads_per_core: u32,
    /// Guest-visible CPU model (`host` only with KVM; default `max` under TCG and
    /// the node's model under KVM). Changing it restarts the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

fn one() -> u32 {
    1
}

impl Default for CpuTopology {
    fn default() -> Self {
        Self {
            sockets: 1,
            cores_per_socket: 1,
            threads_per_core: 1,
            model: None,
        }
    }
}

impl CpuTopology {
    /// Total vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.sockets
            .saturating_mul(self.cores_per_socket)
            .saturating_mul(self.threads_per_core)
    }
}

/// Firmware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS), VMware's default for older guests.
    #[default]
    Bios,
    /// UEFI (OVMF).
    Efi,
}

/// SMBIOS type 1 identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SmbiosIdentity {
    /// `uuid.bios` of the source VM. Immutable: guests bind licences and machine IDs to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 36))]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "identity.uuid is immutable"}]))]
    pub uuid: Option<String>,
    /// Serial number (`VMware-42 1a ...` on ESX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub serial_number: Option<String>,
    /// Manufacturer. Defaults to `VMware, Inc.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub manufacturer: Option<String>,
    /// Product name. Defaults to `VMware Virtual Platform`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub product: Option<String>,
}

/// Disk controller types VMware offers.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ControllerType {
    /// VMware Paravirtual SCSI.
    Pvscsi,
    /// LSI Logic Parallel (emulated as LSI SAS 1068, which Windows and Linux drive the same way).
    Lsilogic,
    /// LSI Logic SAS.
    Lsisas,
    /// SATA (AHCI).
    Sata,
    /// IDE (PIIX).
    Ide,
}

/// A disk controller with an explicit PCI slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'ide' || !has(self.pciSlotNumber)",
     "message": "the IDE controller is part of the chipset and takes no pciSlotNumber"}
]))]
pub struct DiskController {
    /// Controller type.
    #[serde(rename = "type")]
    pub type_: ControllerType,
    /// Bus number (`scsi0` is bus 0).
    #[schemars(range(min = 0, max = 3))]
    pub bus: u8,
    /// PCI slot on bus 0 (with `pciSlotNumber`: of the controller's root port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31))]
    pub pci_slot: Option<u8>,
    /// VMware's `pciSlotNumber` (160, 192, ...), reproduced as the physical slot number
    /// of a PCIe root port the controller sits behind. The VM then runs on the q35
    /// chipset (QEMU's i440fx cannot show slot numbers), so no IDE disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 32, max = 8191))]
    pub pci_slot_number: Option<u16>,
}

/// A VM disk at its controller address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.cdrom) || !self.cdrom || (has(self.readOnly) && self.readOnly)",
     "message": "a CD-ROM is read-only: set readOnly"}
]))]
pub struct VmDisk {
    /// Disk name (unique in the VM).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The OverlayDisk holding the image this VM disk is a copy-on-write overlay of.
    pub overlay_disk: LocalRef,
    /// Controller type.
    pub controller: ControllerType,
    /// Controller bus (`scsi1:3` is bus 1, unit 3).
    #[serde(default)]
    #[schemars(range(min = 0, max = 3))]
    pub bus: u8,
    /// Unit (SCSI target, SATA port, IDE master/slave).
    #[schemars(range(min = 0, max = 63))]
    pub unit: u8,
    /// Boot priority; lowest boots first. Disks without one are not bootable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub boot_order: Option<u32>,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// A CD/DVD drive holding the image (an ISO the export shipped) instead of a hard
    /// disk; needs `readOnly`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cdrom: bool,
    /// Per-disk I/O limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<IoThrottle>,
}

/// I/O limits applied by the VMM (QEMU throttle groups); changed live.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IoThrottle {
    /// Total read+write IOPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub iops: Option<u64>,
    /// Total read+write bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bytes_per_second: Option<u64>,
}

/// NIC models VMware offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// VMXNET3, the paravirtual NIC most VMware guests use.
    #[default]
    Vmxnet3,
    /// Intel E1000.
    E1000,
    /// Intel E1000e.
    E1000e,
    /// virtio-net, for guests already converted.
    Virtio,
}

/// A VM NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmNic {
    /// NIC name (unique in the VM), e.g. `ethernet0`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The VirtualNetwork this NIC is plugged into.
    pub network: LocalRef,
    /// Device model.
    #[serde(default)]
    pub model: NicModel,
    /// The NIC's MAC, unchanged from VMware. Immutable: guests bind configuration to it.
    #[schemars(
        length(max = 17),
        regex(pattern = r"^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$")
    )]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "macAddress is immutable"}]))]
    pub mac_address: String,
    /// A fixed IPv4 address: reserved in the network's DHCP and used for DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isIP(self) && ip(self).family() == 4", "message": "ipAddress must be an IPv4 address"}]))]
    pub ip_address: Option<String>,
    /// PCI slot on bus 0 (VMware puts the first NIC at slot 0x10/160 on its bridge; hvx
    /// keeps the order and the relative position on QEMU's bus 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31))]
    pub pci_slot: Option<u8>,
    /// VMware's `pciSlotNumber` (160, 192, ...): Linux names the NIC `ens<N>` after it
    /// and guests' network configuration names that. Reproduced as the physical slot
    /// number of a PCIe root port the NIC sits behind (`pciSlot` is then the port's
    /// slot). The VM then runs on the q35 chipset (QEMU's i440fx cannot show slot
    /// numbers), so no IDE disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 32, max = 8191))]
    pub pci_slot_number: Option<u16>,
    /// Plugged at boot (VMware's `startConnected`).
    #[serde(default = "yes")]
    pub connected: bool,
}

fn yes() -> bool {
    true
}

/// How hvx keeps a VM running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RunStrategy {
    /// Always running; restarted after a crash or a guest power-off.
    #[default]
    Always,
    /// Restarted after a crash, not after a clean guest power-off.
    RerunOnFailure,
    /// Started once; the user starts and stops it.
    Manual,
    /// Stopped.
    Halted,
}

/// What a node drain does to a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EvictionStrategy {
    /// Live-migrate to another node; the drain waits for it.
    #[default]
    LiveMigrate,
    /// Shut the guest down cleanly and start it on another node: its disks (every
    /// overlay layer) move there first, so what it wrote is kept.
    Shutdown,
    /// Do nothing: the VM blocks the drain until a human acts.
    None,
}

/// Accelerator choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Accelerator {
    /// KVM where the node's probe booted a guest with it, otherwise TCG.
    #[default]
    Auto,
    /// Hardware virtualization only (the VM waits for a node that has it).
    Kvm,
    /// Binary translation (TCG), on any node.
    Tcg,
}

/// Placement constraints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Node labels the VM's node must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the VM tolerates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Keep this VM off nodes running the named VMs of the same application
    /// (VMware DRS anti-affinity rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<Vec<String>>,
}

/// Optional virtual devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptionalDevices {
    /// VNC console on the VMware SVGA adapter.
    #[serde(default)]
    pub vnc: bool,
    /// virtio-balloon, so the node can reclaim memory the guest does not use.
    #[serde(default)]
    pub balloon: bool,
    /// VMware backdoor port (vmport), which VMware Tools use. On by default.
    #[serde(default = "yes")]
    pub vmport: bool,
}

/// Observed state of an application.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmApplicationStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary phase of the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ApplicationPhase>,
    /// Number of VMs in the spec.
    #[serde(default)]
    pub vm_count: u32,
    /// Number of VMs whose phase is Running.
    #[serde(default)]
    pub running_count: u32,
    /// Per-VM state.
    #[serde(default)]
    pub vms: Vec<VmStatus>,
    /// Ready, Valid, Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Summary phase of an application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApplicationPhase {
    /// Waiting for disks, networks or dependencies.
    Pending,
    /// Some VMs are starting.
    Starting,
    /// Every VM that should run is running.
    Running,
    /// Some VMs are migrating.
    Migrating,
    /// Every VM is stopped as requested.
    Stopped,
    /// The spec cannot be run as written, or a VM failed: see conditions.
    Failed,
}

/// Lifecycle phase of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VmPhase {
    /// Waiting for its disks, networks or dependencies.
    Pending,
    /// Its pod is being scheduled.
    Scheduling,
    /// QEMU is starting.
    Starting,
    /// QEMU reports the guest running.
    Running,
    /// Live-migrating to another node.
    Migrating,
    /// Paused by the user or suspended to a file.
    Paused,
    /// Shutting down.
    Stopping,
    /// Not running, as requested.
    Stopped,
    /// Crashed or cannot start: see the reason.
    Failed,
}

/// Observed state of one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// Phase.
    pub phase: VmPhase,
    /// Node it runs on; while it does not run (or its disks are being moved to the
    /// node its new pod got), the node holding its disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Launcher pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Accelerator in use (`kvm` or `tcg`) and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// Guest IPv4 addresses per NIC, learned from DHCP leases and ARP.
    #[serde(default)]
    pub interfaces: Vec<InterfaceStatus>,
    /// The migration in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// Restarts after crashes.
    #[serde(default)]
    pub restarts: u32,
    /// Whether the last spec change was applied live, or needs/caused a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_change: Option<String>,
    /// Human-readable reason for the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the phase last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// One guest interface as observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// NIC name.
    pub name: String,
    /// MAC.
    pub mac_address: String,
    /// IPv4 address, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
}
