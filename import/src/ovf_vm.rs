//! One OVF VirtualSystem turned into the neutral model.

use crate::devices;
use crate::error::{ImportError, Result};
use crate::limits::{MAX_ITEMS, MAX_NICS};
use crate::model::{Firmware, ImportedNic, ImportedVm};
use crate::ovf::{Envelope, attr, child, child_text, children, scaled};
use crate::ovf_storage::{cdroms, controllers, disks};
use crate::vm::{number_boot_order, topology, vmware_serial};
use crate::{ovf_extras, ovf_sections, ovf_vcloud};
use roxmltree::Node;

/// CIM ResourceType numbers VMware uses.
pub(crate) mod rt {
    pub const OTHER: u32 = 1;
    pub const CPU: u32 = 3;
    pub const MEMORY: u32 = 4;
    pub const IDE: u32 = 5;
    pub const SCSI: u32 = 6;
    pub const ETHERNET: u32 = 10;
    pub const FLOPPY: u32 = 14;
    pub const CD: u32 = 15;
    pub const DVD: u32 = 16;
    pub const DISK: u32 = 17;
    pub const OTHER_STORAGE: u32 = 20;
    pub const SERIAL: u32 = 21;
    pub const PARALLEL: u32 = 22;
    pub const USB: u32 = 23;
    pub const SOUND: u32 = 35;
}

/// One hardware Item (or OVF 2.0 EthernetPortItem / StorageItem) with its fields.
pub(crate) struct Item<'a, 'i> {
    pub(crate) node: Node<'a, 'i>,
    pub(crate) instance_id: String,
    pub(crate) resource_type: u32,
    pub(crate) name: String,
}

impl<'a, 'i> Item<'a, 'i> {
    pub(crate) fn text(&self, field: &str) -> Option<&'a str> {
        child_text(self.node, field).filter(|t| !t.is_empty())
    }

    /// `<vmw:Config vmw:key=.. vmw:value=..>` inside the item.
    pub(crate) fn config(&self, key: &str) -> Option<&'a str> {
        config_value(self.node, key)
    }
}

pub(crate) fn config_value<'a>(node: Node<'a, '_>, key: &str) -> Option<&'a str> {
    node.children()
        .filter(|c| c.is_element() && matches!(c.tag_name().name(), "Config" | "ExtraConfig"))
        .find(|c| attr(*c, "key").is_some_and(|k| k.eq_ignore_ascii_case(key)))
        .and_then(|c| attr(c, "value"))
}

/// Builds one VM from its VirtualSystem element. Problems go to `problems` (the VM
/// is still built as far as it can be, so one run reports them all); files the VM
/// uses other than disks (ISO images, NVRAM) go to `used_files`.
pub fn virtual_system(
    system: Node,
    envelope: &Envelope,
    warnings: &mut Vec<String>,
    problems: &mut Vec<ImportError>,
    used_files: &mut Vec<String>,
) -> Option<ImportedVm> {
    let Some(name) = child_text(system, "Name")
        .or_else(|| attr(system, "id"))
        .filter(|n| !n.is_empty())
    else {
        problems.push(ImportError::Ovf(
            "VirtualSystem without a name or ovf:id".into(),
        ));
        return None;
    };
    let name = name.to_owned();
    let Some(hw) = child(system, "VirtualHardwareSection") else {
        problems.push(ImportError::Ovf(format!(
            "{name}: no VirtualHardwareSection"
        )));
        return None;
    };
    let items = match items(hw, &name, envelope.configuration.as_deref(), problems) {
        Ok(items) => items,
        Err(e) => {
            problems.push(e);
            return None;
        }
    };
    let mut vm = ImportedVm {
        name: name.clone(),
        guest_os: child(system, "OperatingSystemSection")
            .and_then(|os| attr(os, "osType"))
            .map(str::to_owned),
        ..ImportedVm::default()
    };
    let mut step = |r: Result<()>| {
        if let Err(e) = r {
            problems.push(e);
        }
    };
    step(identity(hw, &mut vm, warnings));
    step(cpu_and_memory(&items, hw, &mut vm, warnings));
    match controllers(&items, &mut vm, warnings) {
        Ok(controllers) => {
            disks(&items, &controllers, envelope, &mut vm, warnings, problems);
            cdroms(&items, &controllers, envelope, &mut vm, warnings, problems);
        }
        Err(e) => problems.push(e),
    }
    let nic_ids = nics(system, &items, envelope, &mut vm, warnings, problems);
    ovf_extras::other_devices(&items, &mut vm, envelope, warnings, used_files);
    let firmware = vm.firmware;
    ovf_extras::vmware_extras(
        system,
        hw,
        &items,
        envelope,
        (&vm.name, firmware),
        warnings,
        used_files,
    );
    vm.boot_order = boot_order(system, hw, &items, &vm, &nic_ids);
    number_boot_order(&mut vm);
    Some(vm)
}

fn items<'a, 'i>(
    hw: Node<'a, 'i>,
    vm: &str,
    configuration: Option<&str>,
    problems: &mut Vec<ImportError>,
) -> Result<Vec<Item<'a, 'i>>> {
    let nodes: Vec<Node> = hw
        .children()
        .filter(|c| {
            c.is_element()
                && matches!(
                    c.tag_name().name(),
                    "Item" | "EthernetPortItem" | "StorageItem"
                )
        })
        .collect();
    if nodes.len() > MAX_ITEMS {
        return Err(ImportError::TooMany {
            what: "hardware items in one VirtualSystem",
            count: nodes.len(),
            limit: MAX_ITEMS,
        });
    }
    let mut out = Vec::new();
    // Items of other deployment options are not part of this VM at all.
    for node in nodes
        .into_iter()
        .filter(|n| ovf_sections::applies(*n, configuration))
    {
        let instance_id = child_text(node, "InstanceID")
            .unwrap_or_default()
            .to_owned();
        let raw_type = child_text(node, "ResourceType").unwrap_or_default();
        let Ok(resource_type) = raw_type.parse() else {
            problems.push(ImportError::Ovf(format!(
                "{vm}: item {instance_id:?} has ResourceType {raw_type:?}, not a number"
            )));
            continue;
        };
        let name = child_text(node, "ElementName")
            .unwrap_or(&instance_id)
            .to_owned();
        out.push(Item {
            node,
            instance_id,
            resource_type,
            name,
        });
    }
    Ok(out)
}

fn identity(hw: Node, vm: &mut ImportedVm, warnings: &mut Vec<String>) -> Result<()> {
    vm.firmware = match config_value(hw, "firmware")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("efi") => Firmware::Efi,
        Some("bios") | None => Firmware::Bios,
        Some(other) => {
            warnings.push(format!(
                "{}: firmware {other:?} is unknown; using bios",
                vm.name
            ));
            Firmware::Bios
        }
    };
    let raw_uuid = config_value(hw, "uuid.bios").or_else(|| config_value(hw, "uuid"));
    vm.uuid =
        match raw_uuid {
            None => child(hw, "System")
                .and_then(|s| child_text(s, "VirtualSystemIdentifier"))
                .and_then(devices::normalize_uuid),
            Some(raw) => Some(devices::normalize_uuid(raw).ok_or_else(|| {
                ImportError::Ovf(format!("{}: uuid {raw:?} is not a UUID", vm.name))
            })?),
        };
    if config_value(hw, "bootOptions.efiSecureBootEnabled")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        warnings.push(format!(
            "{}: UEFI secure boot has no equivalent; the VM boots with OVMF without enrolled keys",
            vm.name
        ));
    }
    vm.serial = config_value(hw, "serialNumber")
        .map(str::to_owned)
        .or_else(|| vm.uuid.as_deref().map(vmware_serial));
    Ok(())
}

fn cpu_and_memory(
    items: &[Item],
    hw: Node,
    vm: &mut ImportedVm,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let cpu = items
        .iter()
        .find(|i| i.resource_type == rt::CPU)
        .ok_or_else(|| ImportError::Ovf(format!("{}: no CPU item (ResourceType 3)", vm.name)))?;
    let raw = cpu.text("VirtualQuantity").unwrap_or("1");
    vm.cpus = raw
        .parse::<u32>()
        .map_err(|_| ImportError::Ovf(format!("{}: vCPU count {raw:?} is not a number", vm.name)))?
        .max(1);
    let cores = child_text(cpu.node, "CoresPerSocket")
        .or_else(|| config_value(hw, "cpuid.coresPerSocket"))
        .map(|c| {
            c.parse::<u32>().map_err(|_| {
                ImportError::Ovf(format!(
                    "{}: cores per socket {c:?} is not a number",
                    vm.name
                ))
            })
        })
        .transpose()?
        .unwrap_or(1);
    let (sockets, cores, w) = topology(vm.cpus, cores, &vm.name);
    vm.sockets = sockets;
    vm.cores_per_socket = cores;
    warnings.extend(w);

    let mem = items
        .iter()
        .find(|i| i.resource_type == rt::MEMORY)
        .ok_or_else(|| ImportError::Ovf(format!("{}: no memory item (ResourceType 4)", vm.name)))?;
    let quantity = mem.text("VirtualQuantity").unwrap_or_default();
    let units = mem.text("AllocationUnits").unwrap_or("byte * 2^20");
    let bytes = scaled(quantity, units).ok_or_else(|| {
        ImportError::Ovf(format!(
            "{}: memory {quantity:?} in {units:?} is not a size",
            vm.name
        ))
    })?;
    vm.memory_mib = bytes >> 20;
    Ok(())
}

/// NICs in adapter order: VMware numbers them by `AddressOnParent` (vCloud's
/// `NetworkConnectionIndex`, vSphere's unit on the PCI bus), not by file order.
/// Returns the items' InstanceIDs in NIC order.
fn nics(
    system: Node,
    items: &[Item],
    envelope: &Envelope,
    vm: &mut ImportedVm,
    warnings: &mut Vec<String>,
    problems: &mut Vec<ImportError>,
) -> Vec<String> {
    let mut ethernet: Vec<&Item> = items
        .iter()
        .filter(|i| i.resource_type == rt::ETHERNET)
        .collect();
    if ethernet.len() > MAX_NICS {
        problems.push(ImportError::TooMany {
            what: "NICs in one VM",
            count: ethernet.len(),
            limit: MAX_NICS,
        });
        return Vec::new();
    }
    let adapter = |i: &Item| {
        i.text("AddressOnParent")
            .and_then(|a| a.parse::<u32>().ok())
    };
    let numbered = |i: &Item| {
        i.name
            .strip_prefix("Network adapter ")
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    if ethernet.iter().all(|i| adapter(i).is_some()) {
        ethernet.sort_by_key(|i| adapter(i));
    } else if ethernet.iter().all(|i| numbered(i).is_some()) {
        ethernet.sort_by_key(|i| numbered(i));
    }
    let connections = ovf_vcloud::connections(system);
    let mut ids = Vec::new();
    for item in ethernet {
        let index = vm.nics.len();
        let nic_name = format!("ethernet{index}");
        let who = format!("{}: {}", vm.name, item.name);
        let (model, w) = devices::nic_model(item.text("ResourceSubType").unwrap_or("E1000"), &who);
        warnings.extend(w);
        let connection = adapter(item).and_then(|a| connections.iter().find(|c| c.index == a));
        let raw_mac = item.text("Address");
        let mac = match raw_mac.map(|raw| (raw, devices::normalize_mac(raw))) {
            Some((_, Some(mac))) => mac,
            Some((raw, None)) => {
                problems.push(ImportError::Ovf(format!(
                    "{who}: MAC {raw:?} is not a unicast MAC address"
                )));
                continue;
            }
            None => {
                let mac = devices::generated_mac(&format!("{}/{nic_name}", vm.name));
                warnings.push(format!("{who}: no MAC in the descriptor; assigned {mac}"));
                mac
            }
        };
        let network = match item.text("Connection").or(connection
            .map(|c| c.network.as_str())
            .filter(|n| !n.is_empty()))
        {
            Some(n) => n.to_owned(),
            None => {
                let n = envelope
                    .networks
                    .first()
                    .map_or("VM Network", String::as_str)
                    .to_owned();
                warnings.push(format!("{who}: no Connection; plugged into {n:?}"));
                n
            }
        };
        ids.push(item.instance_id.clone());
        vm.nics.push(ImportedNic {
            name: nic_name,
            model,
            mac,
            network,
            pci_slot_number: item
                .config("slotInfo.pciSlotNumber")
                .and_then(|s| s.trim().parse().ok()),
            connected: item
                .text("AutomaticAllocation")
                .is_none_or(|a| a.eq_ignore_ascii_case("true")),
            ip_address: connection
                .and_then(|c| c.ip.clone())
                .or_else(|| ovf_vcloud::connection_attr_ip(item.node)),
        });
    }
    ids
}

/// `vmw:BootOrderSection` entries in order (each names an item InstanceID), else the
/// `bios.bootOrder`/`bios.hddOrder` ExtraConfig keys as in a VMX.
fn boot_order(
    system: Node,
    hw: Node,
    items: &[Item],
    vm: &ImportedVm,
    nic_ids: &[String],
) -> Vec<String> {
    let mut order = Vec::new();
    for section in children(system, "BootOrderSection") {
        let Some(id) = attr(section, "instanceId") else {
            continue;
        };
        let Some(item) = items.iter().find(|i| i.instance_id == id) else {
            continue;
        };
        match item.resource_type {
            rt::DISK => {
                if let Some(d) = vm.disks.iter().find(|d| d.name == item.name) {
                    order.push(d.name.clone());
                }
            }
            rt::ETHERNET => {
                let pos = nic_ids.iter().position(|i| i == id);
                if let Some(nic) = pos.and_then(|p| vm.nics.get(p)) {
                    order.push(nic.name.clone());
                }
            }
            _ => {}
        }
    }
    if order.is_empty()
        && let Some(boot) = config_value(hw, "bios.bootOrder")
    {
        for entry in boot.split(',').map(|e| e.trim().to_ascii_lowercase()) {
            if entry == "hdd" {
                order.extend(vm.disks.iter().map(|d| d.name.clone()));
            } else if vm.nics.iter().any(|n| n.name == entry) {
                order.push(entry);
            }
        }
    }
    order
}
