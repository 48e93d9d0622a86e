//! Disk controllers and disks of one OVF VirtualSystem: buses, units, and the
//! substitutions for controllers hvx does not emulate.

use crate::devices;
use crate::error::{ImportError, Result};
use crate::limits::MAX_DISKS;
use crate::model::{BLANK_PREFIX, ControllerKind, ImportedController, ImportedDisk, ImportedVm};
use crate::ovf::Envelope;
use crate::ovf_vm::{Item, rt};
use std::collections::BTreeMap;

/// Controller items by InstanceID. Buses come from `rasd:Address`, else are numbered
/// per kind in document order, as vSphere does.
pub(crate) fn controllers(
    items: &[Item],
    vm: &mut ImportedVm,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, (ControllerKind, u8)>> {
    let mut by_id = BTreeMap::new();
    let mut next_bus: BTreeMap<ControllerKind, u8> = BTreeMap::new();
    let mut nvme_buses = Vec::new();
    for item in items {
        let who = format!("{}: {}", vm.name, item.name);
        let subtype = item.text("ResourceSubType").unwrap_or_default();
        let kind = match item.resource_type {
            rt::IDE => ControllerKind::Ide,
            rt::SCSI => {
                let (k, w) = devices::scsi_kind(
                    if subtype.is_empty() {
                        "lsilogic"
                    } else {
                        subtype
                    },
                    &who,
                );
                warnings.extend(w);
                k
            }
            rt::OTHER_STORAGE
                if subtype.eq_ignore_ascii_case("vmware.sata.ahci")
                    || subtype.to_ascii_lowercase().contains("ahci") =>
            {
                ControllerKind::Sata
            }
            rt::OTHER_STORAGE if subtype.to_ascii_lowercase().contains("nvme") => {
                nvme_buses.push(item);
                continue;
            }
            rt::OTHER_STORAGE => {
                warnings.push(format!(
                    "{who}: storage controller {subtype:?} has no equivalent; using sata"
                ));
                ControllerKind::Sata
            }
            _ => continue,
        };
        let bus = bus_of(item, kind, &mut next_bus, &vm.name)?;
        add_controller(vm, &mut by_id, item, kind, bus);
    }
    // NVMe goes after the real SATA controllers so their bus numbers stay as they were.
    for item in nvme_buses {
        let bus = next_bus.get(&ControllerKind::Sata).copied().unwrap_or(0);
        next_bus.insert(ControllerKind::Sata, bus.saturating_add(1));
        warnings.push(format!(
            "{}: {}: NVMe controller has no equivalent; using SATA bus {bus}",
            vm.name, item.name
        ));
        add_controller(vm, &mut by_id, item, ControllerKind::Sata, bus);
    }
    Ok(by_id)
}

fn bus_of(
    item: &Item,
    kind: ControllerKind,
    next_bus: &mut BTreeMap<ControllerKind, u8>,
    vm: &str,
) -> Result<u8> {
    let next = next_bus.entry(kind).or_insert(0);
    let bus = match item.text("Address") {
        Some(a) => a.parse::<u8>().map_err(|_| {
            ImportError::Ovf(format!(
                "{vm}: {}: bus address {a:?} is not a number",
                item.name
            ))
        })?,
        None => *next,
    };
    *next = (*next).max(bus.saturating_add(1));
    Ok(bus)
}

fn add_controller(
    vm: &mut ImportedVm,
    by_id: &mut BTreeMap<String, (ControllerKind, u8)>,
    item: &Item,
    kind: ControllerKind,
    bus: u8,
) {
    by_id.insert(item.instance_id.clone(), (kind, bus));
    vm.controllers.push(ImportedController {
        kind,
        bus,
        pci_slot_number: item
            .config("slotInfo.pciSlotNumber")
            .and_then(|s| s.trim().parse().ok()),
    });
}

pub(crate) fn disks(
    items: &[Item],
    controllers: &BTreeMap<String, (ControllerKind, u8)>,
    envelope: &Envelope,
    vm: &mut ImportedVm,
    warnings: &mut Vec<String>,
    problems: &mut Vec<ImportError>,
) {
    for item in items.iter().filter(|i| i.resource_type == rt::DISK) {
        if vm.disks.len() >= MAX_DISKS {
            problems.push(ImportError::TooMany {
                what: "disks in one VM",
                count: vm.disks.len() + 1,
                limit: MAX_DISKS,
            });
            return;
        }
        match disk(item, controllers, envelope, vm, warnings) {
            Ok(d) => vm.disks.push(d),
            Err(e) => problems.push(e),
        }
    }
}

fn disk(
    item: &Item,
    controllers: &BTreeMap<String, (ControllerKind, u8)>,
    envelope: &Envelope,
    vm: &ImportedVm,
    warnings: &mut Vec<String>,
) -> Result<ImportedDisk> {
    let who = format!("{}: {}", vm.name, item.name);
    let host = item
        .text("HostResource")
        .ok_or_else(|| ImportError::Ovf(format!("{who}: disk without HostResource")))?;
    let disk_id = host
        .strip_prefix("ovf:")
        .unwrap_or(host)
        .strip_prefix("/disk/")
        .ok_or_else(|| {
            ImportError::Ovf(format!(
                "{who}: HostResource {host:?} is not ovf:/disk/<id>"
            ))
        })?;
    let disk = envelope.disks.get(disk_id).ok_or_else(|| {
        ImportError::Ovf(format!(
            "{who}: HostResource names unknown disk {disk_id:?}"
        ))
    })?;
    let (controller, bus, unit) = address(item, &who, controllers, vm, warnings)?;
    let name = unique_name(item, vm);
    Ok(ImportedDisk {
        name,
        file: disk
            .file
            .clone()
            .unwrap_or_else(|| format!("{BLANK_PREFIX}{disk_id}")),
        capacity_bytes: disk.capacity_bytes,
        controller,
        bus,
        unit,
        boot_order: None,
        blank: disk.file.is_none(),
        cdrom: false,
    })
}

/// The controller, bus and unit a disk or CD/DVD item sits at.
fn address(
    item: &Item,
    who: &str,
    controllers: &BTreeMap<String, (ControllerKind, u8)>,
    vm: &ImportedVm,
    warnings: &mut Vec<String>,
) -> Result<(ControllerKind, u8, u8)> {
    let parent = item.text("Parent").unwrap_or_default();
    let &(controller, bus) = controllers.get(parent).ok_or_else(|| {
        ImportError::Ovf(format!("{who}: Parent {parent:?} is not a disk controller"))
    })?;
    let unit = match item.text("AddressOnParent") {
        Some(u) => u.parse::<u8>().map_err(|_| {
            ImportError::Ovf(format!("{who}: AddressOnParent {u:?} is not a unit number"))
        })?,
        None => {
            let used = vm
                .disks
                .iter()
                .filter(|d| d.controller == controller && d.bus == bus)
                .count();
            let unit = u8::try_from(used).unwrap_or(u8::MAX);
            warnings.push(format!("{who}: no AddressOnParent; using unit {unit}"));
            unit
        }
    };
    Ok((controller, bus, unit))
}

fn unique_name(item: &Item, vm: &ImportedVm) -> String {
    if vm.disks.iter().any(|d| d.name == item.name) {
        format!("{} {}", item.name, vm.disks.len())
    } else {
        item.name.clone()
    }
}

/// The ISO image file a CD/DVD item holds (`HostResource` `ovf:/file/<id>` naming a
/// `.iso` of the export), if any.
pub(crate) fn iso_of<'e>(item: &Item, envelope: &'e Envelope) -> Option<&'e str> {
    item.text("HostResource")
        .and_then(|h| h.strip_prefix("ovf:").unwrap_or(h).strip_prefix("/file/"))
        .and_then(|id| envelope.files.get(id))
        .map(|f| f.name.as_str())
        .filter(|name| name.to_ascii_lowercase().ends_with(".iso"))
}

/// CD/DVD drives holding an ISO image of the export become read-only CD-ROMs at the
/// drive's address; empty drives and host or client devices are left to
/// `ovf_extras::other_devices`, which names them in a warning.
pub(crate) fn cdroms(
    items: &[Item],
    controllers: &BTreeMap<String, (ControllerKind, u8)>,
    envelope: &Envelope,
    vm: &mut ImportedVm,
    warnings: &mut Vec<String>,
    problems: &mut Vec<ImportError>,
) {
    let drives = items
        .iter()
        .filter(|i| matches!(i.resource_type, rt::CD | rt::DVD));
    for item in drives {
        let Some(iso) = iso_of(item, envelope) else {
            continue;
        };
        if vm.disks.len() >= MAX_DISKS {
            problems.push(ImportError::TooMany {
                what: "disks in one VM",
                count: vm.disks.len() + 1,
                limit: MAX_DISKS,
            });
            return;
        }
        let who = format!("{}: {}", vm.name, item.name);
        match address(item, &who, controllers, vm, warnings) {
            Ok((controller, bus, unit)) => {
                let name = unique_name(item, vm);
                vm.disks.push(ImportedDisk {
                    name,
                    file: iso.to_owned(),
                    capacity_bytes: None,
                    controller,
                    bus,
                    unit,
                    boot_order: None,
                    blank: false,
                    cdrom: true,
                });
            }
            Err(e) => problems.push(e),
        }
    }
}
