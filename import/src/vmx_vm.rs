//! A parsed VMX turned into the neutral model.

use crate::devices::{self, VMX_DEFAULT_NIC, VMX_DEFAULT_SCSI};
use crate::error::{ImportError, Result};
use crate::limits::{MAX_DISKS, MAX_NICS};
use crate::model::{
    ControllerKind, DiskFile, Firmware, ImportedApplication, ImportedController, ImportedDisk,
    ImportedNic, ImportedVm,
};
use crate::vm::{number_boot_order, topology, vmware_serial};
use crate::vmx::Vmx;

/// Builds the one-VM application a VMX describes. `fallback_name` (the file stem) is
/// used when the VMX has no `displayName`.
pub fn application(vmx: &Vmx, fallback_name: &str) -> Result<ImportedApplication> {
    let mut warnings = Vec::new();
    let name = vmx
        .get("displayName")
        .filter(|n| !n.trim().is_empty())
        .unwrap_or(fallback_name)
        .to_owned();
    let cpus = u32_of(vmx, "numvcpus")?.unwrap_or(1).max(1);
    let cores = u32_of(vmx, "cpuid.coresPerSocket")?.unwrap_or(1);
    let (sockets, cores_per_socket, w) = topology(cpus, cores, &name);
    warnings.extend(w);
    let memory_mib = vmx.number("memsize")?.ok_or_else(|| ImportError::Vmx {
        line: 0,
        reason: "memsize is missing".into(),
    })?;
    let firmware = match vmx.get("firmware").map(str::to_ascii_lowercase).as_deref() {
        Some("efi") => Firmware::Efi,
        Some("bios") | None => Firmware::Bios,
        Some(other) => {
            warnings.push(format!("{name}: firmware {other:?} is unknown; using bios"));
            Firmware::Bios
        }
    };
    if vmx.flag("uefi.secureBoot.enabled") == Some(true) {
        warnings.push(format!(
            "{name}: UEFI secure boot has no equivalent; the VM boots with OVMF without enrolled keys"
        ));
    }
    if vmx.flag("vhv.enable") == Some(true) {
        warnings.push(format!(
            "{name}: nested hardware virtualisation (vhv.enable) is not exposed; hypervisors inside the guest will not start"
        ));
    }
    if firmware == Firmware::Efi
        && let Some(nvram) = vmx.get("nvram")
    {
        warnings.push(format!(
            "{name}: the EFI NVRAM {nvram:?} (boot entries, secure boot keys) is not imported; OVMF starts with default variables and boots the disk's default loader"
        ));
    }
    let uuid = match vmx.get("uuid.bios") {
        None => None,
        Some(raw) => Some(
            devices::normalize_uuid(raw).ok_or_else(|| ImportError::Vmx {
                line: 0,
                reason: format!("uuid.bios = {raw:?} is not a UUID"),
            })?,
        ),
    };
    let serial = vmx
        .get("serialNumber")
        .map(str::to_owned)
        .or_else(|| uuid.as_deref().map(vmware_serial));

    let mut vm = ImportedVm {
        name: name.clone(),
        uuid,
        serial,
        cpus,
        sockets,
        cores_per_socket,
        memory_mib,
        firmware,
        guest_os: vmx.get("guestOS").map(str::to_owned),
        ..ImportedVm::default()
    };
    let mut disk_files = Vec::new();
    controllers(vmx, &mut vm, &mut warnings)?;
    disks(vmx, &mut vm, &mut disk_files, &mut warnings)?;
    nics(vmx, &mut vm, &mut warnings)?;
    other_devices(vmx, &mut vm, &mut warnings);
    vm.boot_order = boot_order(vmx, &vm);
    number_boot_order(&mut vm);

    let mut networks: Vec<String> = Vec::new();
    for nic in &vm.nics {
        if !networks.contains(&nic.network) {
            networks.push(nic.network.clone());
        }
    }
    Ok(ImportedApplication {
        name,
        vms: vec![vm],
        networks,
        disk_files,
        warnings,
        ..ImportedApplication::default()
    })
}

fn u32_of(vmx: &Vmx, key: &str) -> Result<Option<u32>> {
    vmx.number(key)?
        .map(|n| {
            u32::try_from(n).map_err(|_| ImportError::Vmx {
                line: 0,
                reason: format!("{key} = {n} is out of range"),
            })
        })
        .transpose()
}

/// `scsi0`, `sata1`, `nvme0`: the controller prefix and its bus number.
fn controller_of(prefix: &str) -> Option<(&str, u8)> {
    let digits = prefix.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let kind = &prefix[..prefix.len() - digits.len()];
    let bus = digits.parse().ok()?;
    matches!(kind, "scsi" | "sata" | "nvme" | "ide").then_some((kind, bus))
}

/// Controllers with `present = TRUE`. NVMe has no equivalent: it becomes SATA on the
/// next free SATA bus (every guest that boots from NVMe has an AHCI driver).
fn controllers(vmx: &Vmx, vm: &mut ImportedVm, warnings: &mut Vec<String>) -> Result<()> {
    let present: Vec<(String, u8)> = vmx
        .keys()
        .filter_map(|k| k.strip_suffix(".present"))
        .filter(|k| !k.contains(':'))
        .filter_map(controller_of)
        .filter(|(kind, bus)| vmx.flag(&format!("{kind}{bus}.present")) == Some(true))
        .map(|(kind, bus)| (kind.to_owned(), bus))
        .collect();
    let sata_count = present.iter().filter(|(k, _)| k == "sata").count();
    for (kind, bus) in &present {
        let who = format!("{kind}{bus}");
        let slot = vmx
            .number(&format!("{who}.pciSlotNumber"))?
            .and_then(|n| u32::try_from(n).ok());
        let (kind, bus) = match kind.as_str() {
            "scsi" => {
                let dev = vmx
                    .get(&format!("{who}.virtualDev"))
                    .unwrap_or(VMX_DEFAULT_SCSI);
                let (k, w) = devices::scsi_kind(dev, &who);
                warnings.extend(w);
                (k, *bus)
            }
            "sata" => (ControllerKind::Sata, *bus),
            "nvme" => {
                let sata_bus = u8::try_from(sata_count)
                    .unwrap_or(u8::MAX)
                    .saturating_add(*bus);
                warnings.push(format!(
                    "{who}: NVMe controller has no equivalent; using SATA bus {sata_bus}"
                ));
                (ControllerKind::Sata, sata_bus)
            }
            // IDE controllers are always present on VMware and are added on use.
            _ => continue,
        };
        vm.controllers.push(ImportedController {
            kind,
            bus,
            pci_slot_number: slot,
        });
    }
    Ok(())
}

/// The controller kind and bus a VMX device prefix (`scsi0`, `nvme0`) lands on.
fn placed(vm: &ImportedVm, vmx: &Vmx, kind: &str, bus: u8) -> Option<(ControllerKind, u8)> {
    match kind {
        "ide" => Some((ControllerKind::Ide, bus)),
        "scsi" => vm
            .controllers
            .iter()
            .find(|c| {
                c.bus == bus && c.kind != ControllerKind::Sata && c.kind != ControllerKind::Ide
            })
            .map(|c| (c.kind, bus)),
        "sata" => Some((ControllerKind::Sata, bus)),
        "nvme" => {
            let sata_count = vmx
                .keys()
                .filter(|k| k.starts_with("sata") && k.ends_with(".present") && !k.contains(':'))
                .filter(|k| vmx.flag(k) == Some(true))
                .count();
            Some((
                ControllerKind::Sata,
                u8::try_from(sata_count)
                    .unwrap_or(u8::MAX)
                    .saturating_add(bus),
            ))
        }
        _ => None,
    }
}

fn disks(
    vmx: &Vmx,
    vm: &mut ImportedVm,
    files: &mut Vec<DiskFile>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let devices: Vec<String> = vmx
        .keys()
        .filter_map(|k| k.strip_suffix(".present"))
        .filter(|k| k.contains(':'))
        .map(str::to_owned)
        .collect();
    for dev in devices {
        if vmx.flag(&format!("{dev}.present")) != Some(true) {
            continue;
        }
        let Some((prefix, unit)) = dev.split_once(':') else {
            continue;
        };
        let (Some((kind, bus)), Ok(unit)) = (controller_of(prefix), unit.parse::<u8>()) else {
            warnings.push(format!("{dev}: unknown device address; skipped"));
            continue;
        };
        let device_type = vmx
            .get(&format!("{dev}.deviceType"))
            .unwrap_or("disk")
            .to_ascii_lowercase();
        // A drive holding an ISO beside the VMX is a read-only CD-ROM; ISOs elsewhere
        // (a datastore's ISO library) and host or client drives are not part of the VM.
        let iso = vmx
            .get(&format!("{dev}.fileName"))
            .filter(|f| devices::is_plain_name(f) && f.to_ascii_lowercase().ends_with(".iso"));
        let cdrom = device_type.contains("cdrom");
        if cdrom && (device_type != "cdrom-image" || iso.is_none()) {
            let what = match vmx.get(&format!("{dev}.fileName")) {
                Some(f) if device_type == "cdrom-image" => {
                    format!("its image {f:?} is not an ISO beside the VMX")
                }
                _ => "it holds no image file".to_string(),
            };
            warnings.push(format!("{dev}: CD-ROM drive not imported: {what}"));
            continue;
        }
        if !cdrom
            && !matches!(
                device_type.as_str(),
                "disk" | "scsi-harddisk" | "ata-harddisk" | "plaindisk" | "sparse2gb"
            )
        {
            warnings.push(format!(
                "{dev}: device type {device_type:?} has no equivalent; not imported"
            ));
            continue;
        }
        if vmx
            .get(&format!("{dev}.mode"))
            .is_some_and(|m| m.to_ascii_lowercase().contains("nonpersistent"))
        {
            warnings.push(format!(
                "{dev}: independent-nonpersistent mode (changes discarded at power-off) has no equivalent; the disk keeps changes (use an OverlayDisk snapshot to roll back)"
            ));
        }
        let Some(raw_file) = vmx.get(&format!("{dev}.fileName")) else {
            warnings.push(format!("{dev}: disk without fileName; not imported"));
            continue;
        };
        let file = disk_file_name(raw_file, &dev, warnings)?;
        let Some((controller, bus)) = placed(vm, vmx, kind, bus) else {
            return Err(ImportError::Vmx {
                line: 0,
                reason: format!("{dev} is on {prefix}, which is not present"),
            });
        };
        if controller == ControllerKind::Ide
            && !vm
                .controllers
                .iter()
                .any(|c| c.kind == ControllerKind::Ide && c.bus == bus)
        {
            vm.controllers.push(ImportedController {
                kind: ControllerKind::Ide,
                bus,
                pci_slot_number: None,
            });
        }
        if vm.disks.len() >= MAX_DISKS {
            return Err(ImportError::TooMany {
                what: "disks in one VM",
                count: vm.disks.len() + 1,
                limit: MAX_DISKS,
            });
        }
        if !files.iter().any(|f: &DiskFile| f.name == file) {
            files.push(DiskFile {
                name: file.clone(),
                size_bytes: None,
                format: crate::model::ImageFormat::Detect,
            });
        }
        vm.disks.push(ImportedDisk {
            name: dev.replace(':', "-"),
            file,
            capacity_bytes: None,
            controller,
            bus,
            unit,
            boot_order: None,
            blank: false,
            cdrom,
        });
    }
    Ok(())
}

/// Disk files are looked for beside the VMX only. An absolute ESX path
/// (`/vmfs/volumes/ds2/vm/vm_1.vmdk`) keeps its file name, with a warning; `..` is
/// refused outright.
fn disk_file_name(raw: &str, dev: &str, warnings: &mut Vec<String>) -> Result<String> {
    if devices::is_plain_name(raw) {
        return Ok(raw.to_owned());
    }
    let parts: Vec<&str> = raw.split(['/', '\\']).collect();
    if parts.contains(&"..") {
        return Err(ImportError::UnsafeName(raw.to_owned()));
    }
    match parts.last() {
        Some(base) if devices::is_plain_name(base) => {
            warnings.push(format!(
                "{dev}: disk file {raw:?} is looked for beside the VMX as {base:?}"
            ));
            Ok((*base).to_owned())
        }
        _ => Err(ImportError::UnsafeName(raw.to_owned())),
    }
}

fn nics(vmx: &Vmx, vm: &mut ImportedVm, warnings: &mut Vec<String>) -> Result<()> {
    let mut indexes: Vec<u32> = vmx
        .keys()
        .filter_map(|k| k.strip_prefix("ethernet"))
        .filter_map(|k| k.strip_suffix(".present"))
        .filter_map(|n| n.parse().ok())
        .collect();
    indexes.sort_unstable();
    for i in indexes {
        let who = format!("ethernet{i}");
        if vmx.flag(&format!("{who}.present")) != Some(true) {
            continue;
        }
        if vm.nics.len() >= MAX_NICS {
            return Err(ImportError::TooMany {
                what: "NICs in one VM",
                count: vm.nics.len() + 1,
                limit: MAX_NICS,
            });
        }
        let dev = vmx
            .get(&format!("{who}.virtualDev"))
            .unwrap_or(VMX_DEFAULT_NIC);
        let (model, w) = devices::nic_model(dev, &who);
        warnings.extend(w);
        // `static` MACs live in `address`; generated ones (`generated`, `vpx`) in
        // `generatedAddress`. Either is what the guest has seen: keep it.
        let raw_mac = vmx
            .get(&format!("{who}.address"))
            .or_else(|| vmx.get(&format!("{who}.generatedAddress")));
        let mac = match raw_mac {
            Some(raw) => devices::normalize_mac(raw).ok_or_else(|| ImportError::Vmx {
                line: 0,
                reason: format!("{who} MAC {raw:?} is not a unicast MAC address"),
            })?,
            None => {
                let mac = devices::generated_mac(&format!("{}/{who}", vm.name));
                warnings.push(format!("{who}: no MAC in the VMX; assigned {mac}"));
                mac
            }
        };
        // ESX names the port group; Workstation/Fusion name a connection type or vnet.
        let network = vmx
            .get(&format!("{who}.networkName"))
            .or_else(|| vmx.get(&format!("{who}.vnet")))
            .or_else(|| vmx.get(&format!("{who}.connectionType")))
            .unwrap_or("VM Network")
            .to_owned();
        vm.nics.push(ImportedNic {
            name: who.clone(),
            model,
            mac,
            network,
            pci_slot_number: vmx
                .number(&format!("{who}.pciSlotNumber"))?
                .and_then(|n| u32::try_from(n).ok()),
            connected: vmx.flag(&format!("{who}.startConnected")).unwrap_or(true),
            ip_address: None,
        });
    }
    Ok(())
}

/// Devices without an equivalent, named in warnings; `serial0` becomes the console.
fn other_devices(vmx: &Vmx, vm: &mut ImportedVm, warnings: &mut Vec<String>) {
    let name = vm.name.as_str();
    if vmx.flag("serial0.present") == Some(true) {
        // COM1 (ttyS0) is the hvx console; where VMware sent it is not kept.
        let was = vmx
            .get("serial0.fileName")
            .map_or(String::new(), |f| format!(" (VMware sent it to {f:?})"));
        warnings.push(format!(
            "{name}: serial0 is the VM's console: COM1 (ttyS0) goes to the hvx console and serial log{was}"
        ));
        vm.console_serial_port = Some("serial0".into());
    }
    for (prefix, what) in [
        ("floppy0", "floppy drive"),
        ("serial1", "serial port (hvx gives a VM one, its console)"),
        ("serial2", "serial port (hvx gives a VM one, its console)"),
        ("serial3", "serial port (hvx gives a VM one, its console)"),
        ("parallel0", "parallel port"),
        ("sound", "sound card"),
        ("usb", "USB controller"),
        ("usb_xhci", "USB 3 controller"),
    ] {
        if vmx.flag(&format!("{prefix}.present")) == Some(true) {
            warnings.push(format!(
                "{name}: {what} ({prefix}) has no equivalent; not imported"
            ));
        }
    }
}

/// `bios.bootOrder = "hdd,cdrom,ethernet0"` with `bios.hddOrder = "scsi0:1"`, as
/// device names of this VM.
fn boot_order(vmx: &Vmx, vm: &ImportedVm) -> Vec<String> {
    let hdd_order: Vec<String> = vmx
        .get("bios.hddOrder")
        .map(|s| {
            s.split(',')
                .map(|d| d.trim().to_ascii_lowercase().replace(':', "-"))
                .collect()
        })
        .unwrap_or_default();
    let mut order = Vec::new();
    for item in vmx.get("bios.bootOrder").unwrap_or("hdd").split(',') {
        let item = item.trim().to_ascii_lowercase();
        if item == "hdd" {
            order.extend(hdd_order.iter().cloned());
            order.extend(vm.disks.iter().filter(|d| !d.cdrom).map(|d| d.name.clone()));
        } else if item == "cdrom" {
            order.extend(vm.disks.iter().filter(|d| d.cdrom).map(|d| d.name.clone()));
        } else if vm.nics.iter().any(|n| n.name == item) {
            order.push(item);
        }
    }
    order
}
