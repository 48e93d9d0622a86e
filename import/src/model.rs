//! The neutral model: what a VMware export describes, independent of both the OVF/VMX
//! syntax it came from and the Kubernetes resources it becomes.

use serde::{Deserialize, Serialize};

/// An application: one VM (a VMX, a single-VM OVF) or several (a VirtualSystemCollection).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedApplication {
    /// Name of the collection, of the single VM, or of the file.
    pub name: String,
    /// The VMs, in descriptor order.
    pub vms: Vec<ImportedVm>,
    /// Network names, in first-use order (NetworkSection first, then NIC connections).
    pub networks: Vec<String>,
    /// Disk files the VMs' disks are images of.
    pub disk_files: Vec<DiskFile>,
    /// Hardware without an hvx equivalent and what was chosen instead, plus other
    /// lossy decisions. One sentence each.
    pub warnings: Vec<String>,
    /// Network settings the export carries (vCloud Director's `NetworkConfigSection`),
    /// by network name.
    #[serde(default)]
    pub network_configs: Vec<NetworkConfig>,
    /// The deployment option (OVF `DeploymentOptionSection`) the VMs were sized for.
    #[serde(default)]
    pub deployment_option: Option<String>,
}

/// A network's IP settings as vCloud Director exports them (`NetworkConfig/IpScope`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Network name (as the NICs' `Connection` names it).
    pub name: String,
    /// Subnet in CIDR form (`192.168.10.0/24`), from gateway and netmask.
    pub cidr: Option<String>,
    /// Default gateway.
    pub gateway: Option<String>,
    /// DNS suffix (domain).
    pub dns_suffix: Option<String>,
    /// DNS servers.
    pub dns_servers: Vec<String>,
    /// The DHCP service's range, when vCloud served DHCP on the network.
    pub dhcp_range: Option<(String, String)>,
    /// DHCP lease time in seconds.
    pub dhcp_lease_seconds: Option<u32>,
    /// Static IP pools (vCloud `IpRanges`, used for POOL allocation).
    pub static_ranges: Vec<(String, String)>,
}

/// One VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedVm {
    /// VM name as VMware had it (display name).
    pub name: String,
    /// BIOS UUID (`uuid.bios`), canonical `8-4-4-4-12` lower-case form.
    pub uuid: Option<String>,
    /// SMBIOS serial number.
    pub serial: Option<String>,
    /// Total vCPUs.
    pub cpus: u32,
    /// Sockets (`cpus / cores_per_socket`).
    pub sockets: u32,
    /// Cores per socket.
    pub cores_per_socket: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Firmware.
    pub firmware: Firmware,
    /// VMware guest OS identifier (`otherLinux64Guest`, `windows9Server64Guest`).
    pub guest_os: Option<String>,
    /// NICs, in VMware's order (`ethernet0` first).
    pub nics: Vec<ImportedNic>,
    /// Disk controllers.
    pub controllers: Vec<ImportedController>,
    /// Disks.
    pub disks: Vec<ImportedDisk>,
    /// Boot devices in priority order, by disk or NIC name.
    pub boot_order: Vec<String>,
    /// VMs of the application that start before this one (vApp start order).
    pub depends_on: Vec<String>,
    /// The vApp does not power it on (`startAction="none"`): the user starts it.
    #[serde(default)]
    pub stays_off: bool,
    /// Seconds vSphere waited, after starting the previous start group, before
    /// starting this VM (the previous group's `ovf:startDelay`).
    #[serde(default)]
    pub start_delay_seconds: Option<u32>,
    /// The VMware serial port that becomes the VM's console (COM1 / ttyS0: the hvx
    /// console socket and serial log), by its name. Further ports have no equivalent.
    #[serde(default)]
    pub console_serial_port: Option<String>,
}

/// What a blank disk's [`ImportedDisk::file`] starts with (then its OVF `diskId`);
/// blank disks are told apart by [`ImportedDisk::blank`], not by this prefix.
pub const BLANK_PREFIX: &str = "blank:";

/// Firmware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Firmware {
    /// Legacy BIOS.
    #[default]
    Bios,
    /// UEFI.
    Efi,
}

/// NIC models hvx emulates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NicModel {
    /// VMXNET3.
    #[default]
    Vmxnet3,
    /// Intel E1000.
    E1000,
    /// Intel E1000e.
    E1000e,
}

/// One NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedNic {
    /// Name (`ethernet0`).
    pub name: String,
    /// Device model (after substitution of models hvx lacks).
    pub model: NicModel,
    /// MAC, lower-case colon form. Generated deterministically when VMware gave none.
    pub mac: String,
    /// Network (port group) name.
    pub network: String,
    /// VMware's `pciSlotNumber` (160, 192, ...), when known.
    pub pci_slot_number: Option<u32>,
    /// Connected at power-on.
    pub connected: bool,
    /// The static address the guest had (vCloud `NetworkConnection/IpAddress` for
    /// MANUAL and POOL allocation).
    #[serde(default)]
    pub ip_address: Option<String>,
}

/// Disk controller kinds hvx emulates.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum ControllerKind {
    /// VMware Paravirtual SCSI.
    #[default]
    Pvscsi,
    /// LSI Logic Parallel.
    Lsilogic,
    /// LSI Logic SAS.
    Lsisas,
    /// SATA AHCI.
    Sata,
    /// IDE.
    Ide,
}

/// One disk controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedController {
    /// Kind (after substitution).
    pub kind: ControllerKind,
    /// Bus number (`scsi1` is bus 1).
    pub bus: u8,
    /// VMware's `pciSlotNumber`, when known.
    pub pci_slot_number: Option<u32>,
}

/// One disk, at its controller address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedDisk {
    /// Name (`scsi0:1` for VMX, the ElementName for OVF).
    pub name: String,
    /// The disk file, by its name in [`ImportedApplication::disk_files`].
    pub file: String,
    /// Virtual capacity in bytes, when the descriptor says.
    pub capacity_bytes: Option<u64>,
    /// Controller kind.
    pub controller: ControllerKind,
    /// Controller bus.
    pub bus: u8,
    /// Unit on the bus.
    pub unit: u8,
    /// Boot priority (1 first), when bootable.
    pub boot_order: Option<u32>,
    /// An empty disk of `capacity_bytes` (an OVF `Disk` without a file); `file` is
    /// then `blank:<diskId>`.
    #[serde(default)]
    pub blank: bool,
    /// A CD/DVD drive holding `file`, an ISO image the export ships: attached
    /// read-only as a CD-ROM at the drive's address.
    #[serde(default)]
    pub cdrom: bool,
}

/// A disk image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFile {
    /// Plain relative name (OVF `ovf:href`, OVA member, VMX `fileName`; for an ESX
    /// descriptor, its flat extent).
    pub name: String,
    /// Size in bytes, when known.
    pub size_bytes: Option<u64>,
    /// Image format, once the file's head was looked at.
    #[serde(default)]
    pub format: ImageFormat,
}

/// Image format of a disk file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    /// Not looked at, or not a VMDK: the cluster detects it from the content.
    #[default]
    Detect,
    /// A self-contained VMDK (monolithicSparse, streamOptimized).
    Vmdk,
    /// Raw bytes (the flat extent of an ESX disk).
    Raw,
}
