//! The QEMU command line for a `VmSpec`: a pure function, unit-tested against golden
//! expectations. Everything VMware-specific about the machine is decided here.
//!
//! # PCI slot numbers (`ens160`, `ens192`)
//!
//! Linux names a NIC after the *physical slot number* of the PCI slot it sits in
//! (systemd-udev's `ID_NET_NAME_SLOT`: `ens<N>` when `/sys/bus/pci/slots/<N>/address`
//! is the NIC's address), and guests' network configuration names the interface.
//! VMware puts NICs behind PCIe root ports whose slots it numbers 160, 192, 224, 256,
//! ... (`ethernetN.pciSlotNumber`). A device without a `slot_number` sits on bus 0 at
//! its `pci_slot`; on the `pc` machine QEMU's ACPI tables give that slot `_SUN` = the
//! device number, so Linux sees slot 16..31 there (`ens17`).
//!
//! A device with a `slot_number` gets its own `pcie-root-port` (at the device's bus-0
//! `pci_slot`, `slot=<N>`), the device behind it. Checked with the test guest booted
//! on both machines (`/sys/bus/pci/slots`):
//!
//! - `q35` + root port + `ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off`: the
//!   kernel's pciehp drives the port natively and creates slot `160` with the address
//!   of the device behind it: `ens160`, as on VMware. (With ACPI hotplug of bridges on,
//!   QEMU's default since 6.1, acpiphp names the port's slot `0` instead.)
//! - `pc` (i440fx) + root port: the i440fx host bridge is conventional PCI, so the
//!   kernel is never granted native PCIe hotplug (no `_OSC`) and pciehp leaves the
//!   port alone; acpiphp names bridge slots after the device number (`0`), and QEMU
//!   offers no way to set `_SUN`. No slot `160` appears whatever the options.
//!
//! So slot numbers need the `q35` machine (validation refuses them on `pc`); VMs
//! without them keep the i440fx `pc` machine and the bus-0 layout unchanged.

use crate::spec::{ControllerKind, Disk, Firmware, MachineType, NicBackend, VmSpec};
use crate::validate::{SVGA_SLOT, reserved_slots};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The QEMU binary the launcher runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// OVMF code and variable templates (Debian `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF variable store template, copied per VM.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// TCG translation cache size in MiB (`-accel tcg,tb-size=`).
pub const TCG_TB_MIB: u32 = 64;

/// The accelerator a VM actually runs with (after probing / forcing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Multi-threaded binary translation.
    Tcg,
}

impl Accel {
    /// Name as in `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// The CPU model QEMU is given: the host's under KVM; under TCG a fixed baseline so
    /// that VMs migrate between any two TCG nodes.
    pub fn cpu_model(self) -> &'static str {
        match self {
            Self::Kvm => "host",
            Self::Tcg => "qemu64",
        }
    }
}

/// Files of one VM in its run dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPaths {
    /// QMP socket (held by the launcher).
    pub qmp: PathBuf,
    /// Second QMP socket for short-lived clients (readiness probe, CLI).
    pub qmp_probe: PathBuf,
    /// QMP monitor of the node agent (live migration drives the source through it).
    pub qmp_agent: PathBuf,
    /// Serial console socket (ttyS0).
    pub serial: PathBuf,
    /// Serial log (everything the guest wrote on ttyS0).
    pub serial_log: PathBuf,
    /// VNC socket.
    pub vnc: PathBuf,
    /// QEMU's pid file.
    pub pidfile: PathBuf,
    /// Per-VM copy of the OVMF variable store.
    pub efi_vars: PathBuf,
}

impl RunPaths {
    /// The standard layout under `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        Self {
            qmp: run_dir.join("qmp.sock"),
            qmp_probe: run_dir.join("qmp-probe.sock"),
            qmp_agent: run_dir.join("qmp-agent.sock"),
            serial: run_dir.join("serial.sock"),
            serial_log: run_dir.join("serial.log"),
            vnc: run_dir.join("vnc.sock"),
            pidfile: run_dir.join("qemu.pid"),
            efi_vars: run_dir.join("efi-vars.fd"),
        }
    }

    /// Every file QEMU or the launcher may create (removed after stop).
    pub fn all(&self) -> [&Path; 8] {
        [
            &self.qmp,
            &self.qmp_probe,
            &self.qmp_agent,
            &self.serial,
            &self.serial_log,
            &self.vnc,
            &self.pidfile,
            &self.efi_vars,
        ]
    }
}

/// A controller instance after defaults: kind, bus, PCI slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedController {
    /// Model.
    pub kind: ControllerKind,
    /// Bus number within its kind.
    pub bus: u8,
    /// PCI slot (None for IDE: chipset function); the root port's with `slot_number`.
    pub slot: Option<u8>,
    /// Physical slot number of the controller's own root port.
    pub slot_number: Option<u16>,
}

impl PlacedController {
    /// QEMU device id, e.g. `pvscsi0`.
    pub fn id(&self) -> String {
        format!("{}{}", self.kind.as_str(), self.bus)
    }
}

/// Stable PCI layout: declared slots kept, the rest filled in spec order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciLayout {
    /// Controllers in declaration order, then implicit ones in disk order.
    pub controllers: Vec<PlacedController>,
    /// NIC slots, in `spec.nics` order.
    pub nic_slots: Vec<u8>,
    /// Balloon slot, if enabled.
    pub balloon_slot: Option<u8>,
}

/// Assigns PCI slots. Free slots are taken from 16 (0x10, where VMware starts its
/// PCI devices) upwards, then from 3 upwards, so adding a device never moves another.
pub fn pci_layout(spec: &VmSpec) -> PciLayout {
    let mut used: BTreeSet<u8> = reserved_slots(spec.machine).iter().copied().collect();
    if spec.svga {
        used.insert(SVGA_SLOT);
    }
    used.extend(spec.controllers.iter().filter_map(|c| c.pci_slot));
    used.extend(spec.nics.iter().filter_map(|n| n.pci_slot));
    let mut free = (16u8..=31)
        .chain(3..16)
        .filter(|s| !used.contains(s))
        .collect::<Vec<_>>()
        .into_iter();
    let mut next = move || free.next();

    let mut controllers: Vec<PlacedController> = Vec::new();
    let declared: Vec<(ControllerKind, u8, Option<u8>, Option<u16>)> = spec
        .controllers
        .iter()
        .map(|c| (c.kind, c.bus, c.pci_slot, c.slot_number))
        .collect();
    let implicit = spec.disks.iter().map(|d| (d.controller, d.bus, None, None));
    for (kind, bus, slot, slot_number) in declared.into_iter().chain(implicit) {
        if controllers.iter().any(|c| c.kind == kind && c.bus == bus) {
            continue;
        }
        let (slot, slot_number) = match kind {
            ControllerKind::Ide => (None, None),
            _ => (slot.or_else(&mut next), slot_number),
        };
        controllers.push(PlacedController {
            kind,
            bus,
            slot,
            slot_number,
        });
    }
    let nic_slots = spec
        .nics
        .iter()
        .map(|n| n.pci_slot.or_else(&mut next).unwrap_or(0))
        .collect();
    let balloon_slot = if spec.balloon { next() } else { None };
    PciLayout {
        controllers,
        nic_slots,
        balloon_slot,
    }
}

/// The machine's root bus: conventional PCI on i440fx, PCI Express on q35.
pub fn root_bus(machine: MachineType) -> &'static str {
    match machine {
        MachineType::Pc => "pci.0",
        MachineType::Q35 => "pcie.0",
    }
}

/// True if any device announces a physical slot number (and so has a root port).
pub fn uses_slot_numbers(spec: &VmSpec) -> bool {
    spec.controllers.iter().any(|c| c.slot_number.is_some())
        || spec.nics.iter().any(|n| n.slot_number.is_some())
}

/// Where a device goes: bus 0 at `slot`, or, with a physical slot number, behind a
/// `pcie-root-port` at `slot` announcing it (pushed onto `a` first). Returns the
/// device's `bus=...` option.
fn place(a: &mut Vec<String>, root: &str, slot: u8, slot_number: Option<u16>) -> String {
    match slot_number {
        None => format!("bus={root},addr={slot:#x}"),
        Some(n) => {
            // The (chassis, slot) pair must be unique; slot numbers are.
            a.extend([
                "-device".to_string(),
                format!("pcie-root-port,id=slot{n},bus={root},addr={slot:#x},chassis=1,slot={n}"),
            ]);
            format!("bus=slot{n}")
        }
    }
}

/// QEMU option values separate by commas; a literal comma is written twice.
pub fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn p(path: &Path) -> String {
    esc(&path.to_string_lossy())
}

/// Builds QEMU's argv (without the binary) for a validated spec.
pub fn build_argv(spec: &VmSpec, accel: Accel, paths: &RunPaths) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let push = |a: &mut Vec<String>, args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    let machine = match spec.machine {
        MachineType::Pc => "pc",
        MachineType::Q35 => "q35",
    };
    let root = root_bus(spec.machine);
    let vmport = if spec.vmport { "on" } else { "off" };
    let accel_opt = match accel {
        Accel::Kvm => "kvm".to_string(),
        // The translation cache defaults to 1 GiB: far beyond what a VM pod's memory
        // limit leaves for it. 64 MiB holds a typical guest's hot code (the operator
        // counts it in the pod's memory overhead).
        Accel::Tcg => format!("tcg,thread=multi,tb-size={TCG_TB_MIB}"),
    };
    let c = spec.cpu;
    push(
        &mut a,
        &[
            "-name",
            &format!("guest={},debug-threads=on", esc(&spec.name)),
        ],
    );
    push(
        &mut a,
        &["-nodefaults", "-no-user-config", "-msg", "timestamp=on"],
    );
    // seccomp: a guest that breaks out of QEMU's device emulation cannot use obsolete
    // syscalls, setuid/setgid, fork/exec or scheduler/resource controls. QEMU needs
    // none of them after start-up here: taps are opened by name (no helper scripts),
    // and live and post-copy migration run inside QEMU (privileged tests boot with it).
    push(
        &mut a,
        &[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ],
    );
    push(&mut a, &["-machine", &format!("{machine},vmport={vmport}")]);
    if spec.machine == MachineType::Q35 && uses_slot_numbers(spec) {
        // Native PCIe hotplug on the root ports, so the guest's pciehp names their slots
        // by the physical slot number (module doc).
        push(
            &mut a,
            &[
                "-global",
                "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            ],
        );
    }
    push(&mut a, &["-accel", &accel_opt]);
    push(&mut a, &["-cpu", accel.cpu_model()]);
    push(
        &mut a,
        &[
            "-smp",
            &format!(
                "{},sockets={},cores={},threads={}",
                c.vcpus(),
                c.sockets,
                c.cores,
                c.threads
            ),
        ],
    );
    push(&mut a, &["-m", &format!("{}M", spec.memory_mib)]);
    if spec.firmware == Firmware::Efi {
        push(
            &mut a,
            &[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    esc(OVMF_CODE)
                ),
            ],
        );
        push(
            &mut a,
            &[
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", p(&paths.efi_vars)),
            ],
        );
    }
    // SMBIOS as VMware writes it: guests and licence checks look for these strings.
    let mut smbios1 =
        "type=1,manufacturer=VMware,, Inc.,product=VMware Virtual Platform,version=None"
            .to_string();
    if let Some(serial) = &spec.serial {
        smbios1.push_str(&format!(",serial={}", esc(serial)));
    }
    if let Some(uuid) = &spec.uuid {
        push(&mut a, &["-uuid", uuid]);
        smbios1.push_str(&format!(",uuid={uuid}"));
    }
    push(
        &mut a,
        &[
            "-smbios",
            "type=0,vendor=Phoenix Technologies LTD,version=6.00",
        ],
    );
    push(&mut a, &["-smbios", &smbios1]);
    push(&mut a, &["-rtc", "base=utc", "-boot", "strict=on"]);

    let layout = pci_layout(spec);
    if spec.svga {
        push(
            &mut a,
            &[
                "-device",
                &format!("vmware-svga,id=video0,bus={root},addr={SVGA_SLOT:#x}"),
            ],
        );
    }
    for ctl in &layout.controllers {
        let model = match ctl.kind {
            ControllerKind::Pvscsi => "pvscsi",
            ControllerKind::Lsilogic | ControllerKind::Lsisas => "mptsas1068",
            ControllerKind::Sata => "ahci",
            ControllerKind::Virtio => "virtio-scsi-pci",
            ControllerKind::Ide => continue,
        };
        let slot = ctl.slot.unwrap_or(0);
        let at = place(&mut a, root, slot, ctl.slot_number);
        a.extend([
            "-device".to_string(),
            format!("{model},id={},{at}", ctl.id()),
        ]);
    }
    for d in &spec.disks {
        push(&mut a, &["-blockdev", &blockdev_json(d)]);
        push(&mut a, &["-device", &disk_device(d)]);
    }
    for (n, slot) in spec.nics.iter().zip(&layout.nic_slots) {
        let id = format!("net-{}", n.name);
        let netdev = match &n.backend {
            NicBackend::Tap { fd: Some(fd), .. } => format!("tap,id={id},fd={fd},vhost=off"),
            NicBackend::Tap { name, fd: None } => {
                format!("tap,id={id},ifname={name},script=no,downscript=no,vhost=off")
            }
            NicBackend::Socket {
                listen: Some(l), ..
            } => format!("socket,id={id},listen={l}"),
            NicBackend::Socket { connect, .. } => {
                format!(
                    "socket,id={id},connect={}",
                    connect.as_deref().unwrap_or_default()
                )
            }
            NicBackend::User {} => format!("user,id={id}"),
        };
        a.extend(["-netdev".to_string(), netdev]);
        let at = place(&mut a, root, *slot, n.slot_number);
        a.extend([
            "-device".to_string(),
            format!(
                "{},id=nic-{},netdev={id},mac={},{at}",
                n.model.device(),
                n.name,
                n.mac.to_ascii_lowercase()
            ),
        ]);
    }
    if let Some(slot) = layout.balloon_slot {
        push(
            &mut a,
            &[
                "-device",
                &format!("virtio-balloon-pci,id=balloon0,bus={root},addr={slot:#x}"),
            ],
        );
    }
    for (name, content) in &spec.fw_cfg {
        push(
            &mut a,
            &["-fw_cfg", &format!("name={name},string={}", esc(content))],
        );
    }
    push(
        &mut a,
        &[
            "-chardev",
            &format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
                p(&paths.serial),
                p(&paths.serial_log)
            ),
        ],
    );
    push(&mut a, &["-serial", "chardev:serial0"]);
    push(
        &mut a,
        &[
            "-chardev",
            &format!("socket,id=qmp,path={},server=on,wait=off", p(&paths.qmp)),
        ],
    );
    push(&mut a, &["-mon", "chardev=qmp,mode=control"]);
    push(
        &mut a,
        &[
            "-chardev",
            &format!(
                "socket,id=qmp-probe,path={},server=on,wait=off",
                p(&paths.qmp_probe)
            ),
        ],
    );
    push(&mut a, &["-mon", "chardev=qmp-probe,mode=control"]);
    push(
        &mut a,
        &[
            "-chardev",
            &format!(
                "socket,id=qmp-agent,path={},server=on,wait=off",
                p(&paths.qmp_agent)
            ),
        ],
    );
    push(&mut a, &["-mon", "chardev=qmp-agent,mode=control"]);
    if spec.vnc {
        push(&mut a, &["-vnc", &format!("unix:{}", p(&paths.vnc))]);
    } else {
        push(&mut a, &["-display", "none"]);
    }
    push(&mut a, &["-pidfile", &paths.pidfile.to_string_lossy()]);
    a
}

/// `-blockdev` in JSON form: no escaping rules to get wrong for odd paths.
fn blockdev_json(d: &Disk) -> String {
    serde_json::json!({
        "driver": d.format.as_str(),
        "node-name": format!("disk-{}", d.name),
        "read-only": d.readonly,
        "discard": "unmap",
        "file": {"driver": "file", "filename": d.path.to_string_lossy(), "read-only": d.readonly},
    })
    .to_string()
}

/// The guest-visible disk at its original controller address.
fn disk_device(d: &Disk) -> String {
    let node = format!("disk-{}", d.name);
    let ctl = format!("{}{}", d.controller.as_str(), d.bus);
    let (scsi, ata) = if d.cdrom {
        ("scsi-cd", "ide-cd")
    } else {
        ("scsi-hd", "ide-hd")
    };
    let mut dev = match d.controller {
        ControllerKind::Pvscsi
        | ControllerKind::Lsilogic
        | ControllerKind::Lsisas
        | ControllerKind::Virtio => {
            format!("{scsi},bus={ctl}.0,channel=0,scsi-id={},lun=0", d.unit)
        }
        ControllerKind::Sata => format!("{ata},bus={ctl}.{}", d.unit),
        ControllerKind::Ide => {
            // The chipset's IDE: ide.0 primary, ide.1 secondary (pc machine only).
            format!("{ata},bus=ide.{},unit={}", d.bus, d.unit)
        }
    };
    dev.push_str(&format!(",drive={node},id=dev-{}", d.name));
    if let Some(order) = d.boot_order {
        dev.push_str(&format!(",bootindex={order}"));
    }
    dev
}

/// Controllers in use, by id, for reporting.
pub fn controller_ids(spec: &VmSpec) -> BTreeMap<String, Option<u8>> {
    pci_layout(spec)
        .controllers
        .iter()
        .map(|c| (c.id(), c.slot))
        .collect()
}

#[cfg(test)]
#[path = "argv_tests.rs"]
pub(crate) mod tests;
