//! The QEMU command line for a `VmSpec`: a pure function, unit-tested against golden
//! expectations. Everything VMware-specific about the machine is decided here.

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
    /// PCI slot (None for IDE: chipset function).
    pub slot: Option<u8>,
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
    let declared: Vec<(ControllerKind, u8, Option<u8>)> = spec
        .controllers
        .iter()
        .map(|c| (c.kind, c.bus, c.pci_slot))
        .collect();
    let implicit = spec.disks.iter().map(|d| (d.controller, d.bus, None));
    for (kind, bus, slot) in declared.into_iter().chain(implicit) {
        if controllers.iter().any(|c| c.kind == kind && c.bus == bus) {
            continue;
        }
        let slot = match kind {
            ControllerKind::Ide => None,
            _ => slot.or_else(&mut next),
        };
        controllers.push(PlacedController { kind, bus, slot });
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
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    let machine = match spec.machine {
        MachineType::Pc => "pc",
        MachineType::Q35 => "q35",
    };
    let vmport = if spec.vmport { "on" } else { "off" };
    let accel_opt = match accel {
        Accel::Kvm => "kvm".to_string(),
        // The translation cache defaults to 1 GiB: far beyond what a VM pod's memory
        // limit leaves for it. 64 MiB holds a typical guest's hot code (the operator
        // counts it in the pod's memory overhead).
        Accel::Tcg => format!("tcg,thread=multi,tb-size={TCG_TB_MIB}"),
    };
    let c = spec.cpu;
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", esc(&spec.name)),
    ]);
    push(&["-nodefaults", "-no-user-config", "-msg", "timestamp=on"]);
    // seccomp: a guest that breaks out of QEMU's device emulation cannot use obsolete
    // syscalls, setuid/setgid, fork/exec or scheduler/resource controls. QEMU needs
    // none of them after start-up here: taps are opened by name (no helper scripts),
    // and live and post-copy migration run inside QEMU (privileged tests boot with it).
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    push(&["-machine", &format!("{machine},vmport={vmport}")]);
    push(&["-accel", &accel_opt]);
    push(&["-cpu", accel.cpu_model()]);
    push(&[
        "-smp",
        &format!(
            "{},sockets={},cores={},threads={}",
            c.vcpus(),
            c.sockets,
            c.cores,
            c.threads
        ),
    ]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    if spec.firmware == Firmware::Efi {
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                esc(OVMF_CODE)
            ),
        ]);
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", p(&paths.efi_vars)),
        ]);
    }
    // SMBIOS as VMware writes it: guests and licence checks look for these strings.
    let mut smbios1 =
        "type=1,manufacturer=VMware,, Inc.,product=VMware Virtual Platform,version=None"
            .to_string();
    if let Some(serial) = &spec.serial {
        smbios1.push_str(&format!(",serial={}", esc(serial)));
    }
    if let Some(uuid) = &spec.uuid {
        push(&["-uuid", uuid]);
        smbios1.push_str(&format!(",uuid={uuid}"));
    }
    push(&[
        "-smbios",
        "type=0,vendor=Phoenix Technologies LTD,version=6.00",
    ]);
    push(&["-smbios", &smbios1]);
    push(&["-rtc", "base=utc", "-boot", "strict=on"]);

    let layout = pci_layout(spec);
    if spec.svga {
        push(&[
            "-device",
            &format!("vmware-svga,id=video0,bus=pci.0,addr={SVGA_SLOT:#x}"),
        ]);
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
        push(&[
            "-device",
            &format!("{model},id={},bus=pci.0,addr={slot:#x}", ctl.id()),
        ]);
    }
    for d in &spec.disks {
        push(&["-blockdev", &blockdev_json(d)]);
        push(&["-device", &disk_device(d)]);
    }
    for (n, slot) in spec.nics.iter().zip(&layout.nic_slots) {
        let id = format!("net-{}", n.name);
        let netdev = match &n.backend {
            NicBackend::Tap { name } => {
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
        push(&["-netdev", &netdev]);
        push(&[
            "-device",
            &format!(
                "{},id=nic-{},netdev={id},mac={},bus=pci.0,addr={slot:#x}",
                n.model.device(),
                n.name,
                n.mac.to_ascii_lowercase()
            ),
        ]);
    }
    if let Some(slot) = layout.balloon_slot {
        push(&[
            "-device",
            &format!("virtio-balloon-pci,id=balloon0,bus=pci.0,addr={slot:#x}"),
        ]);
    }
    for (name, content) in &spec.fw_cfg {
        push(&["-fw_cfg", &format!("name={name},string={}", esc(content))]);
    }
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            p(&paths.serial),
            p(&paths.serial_log)
        ),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp,path={},server=on,wait=off", p(&paths.qmp)),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp-probe,path={},server=on,wait=off",
            p(&paths.qmp_probe)
        ),
    ]);
    push(&["-mon", "chardev=qmp-probe,mode=control"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp-agent,path={},server=on,wait=off",
            p(&paths.qmp_agent)
        ),
    ]);
    push(&["-mon", "chardev=qmp-agent,mode=control"]);
    if spec.vnc {
        push(&["-vnc", &format!("unix:{}", p(&paths.vnc))]);
    } else {
        push(&["-display", "none"]);
    }
    push(&["-pidfile", &paths.pidfile.to_string_lossy()]);
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
    let mut dev = match d.controller {
        ControllerKind::Pvscsi
        | ControllerKind::Lsilogic
        | ControllerKind::Lsisas
        | ControllerKind::Virtio => {
            format!("scsi-hd,bus={ctl}.0,channel=0,scsi-id={},lun=0", d.unit)
        }
        ControllerKind::Sata => format!("ide-hd,bus={ctl}.{}", d.unit),
        ControllerKind::Ide => {
            // The chipset's IDE: ide.0 primary, ide.1 secondary (pc machine only).
            format!("ide-hd,bus=ide.{},unit={}", d.bus, d.unit)
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
