//! One OVF VirtualSystem turned into the neutral model.

use crate::devices;
use crate::error::{ImportError, Result};
use crate::limits::{MAX_ITEMS, MAX_NICS};
use crate::model::{Firmware, ImportedNic, ImportedVm};
use crate::ovf::{Envelope, attr, child, child_text, children, scaled};
use crate::ovf_storage::{controllers, disks};
use crate::vm::{number_boot_order, topology, vmware_serial};
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

fn config_value<'a>(node: Node<'a, '_>, key: &str) -> Option<&'a str> {
    node.children()
        .filter(|c| c.is_element() && matches!(c.tag_name().name(), "Config" | "ExtraConfig"))
        .find(|c| attr(*c, "key").is_some_and(|k| k.eq_ignore_ascii_case(key)))
        .and_then(|c| attr(c, "value"))
}

/// Builds one VM from its VirtualSystem element.
pub fn virtual_system(
    system: Node,
    envelope: &Envelope,
    warnings: &mut Vec<String>,
) -> Result<ImportedVm> {
    let name = child_text(system, "Name")
        .or_else(|| attr(system, "id"))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ImportError::Ovf("VirtualSystem without a name or ovf:id".into()))?
        .to_owned();
    let hw = child(system, "VirtualHardwareSection")
        .ok_or_else(|| ImportError::Ovf(format!("{name}: no VirtualHardwareSection")))?;
    let items = items(hw, &name)?;
    let mut vm = ImportedVm {
        name: name.clone(),
        guest_os: child(system, "OperatingSystemSection")
            .and_then(|os| attr(os, "osType"))
            .map(str::to_owned),
        ..ImportedVm::default()
    };
    identity(hw, &mut vm, warnings)?;
    cpu_and_memory(&items, hw, &mut vm, warnings)?;
    let controllers = controllers(&items, &mut vm, warnings)?;
    disks(&items, &controllers, envelope, &mut vm, warnings)?;
    nics(&items, envelope, &mut vm, warnings)?;
    other_devices(&items, &name, warnings);
    vm.boot_order = boot_order(system, hw, &items, &vm);
    number_boot_order(&mut vm);
    Ok(vm)
}

fn items<'a, 'i>(hw: Node<'a, 'i>, vm: &str) -> Result<Vec<Item<'a, 'i>>> {
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
    nodes
        .into_iter()
        .map(|node| {
            let instance_id = child_text(node, "InstanceID")
                .unwrap_or_default()
                .to_owned();
            let raw_type = child_text(node, "ResourceType").unwrap_or_default();
            let resource_type = raw_type.parse().map_err(|_| {
                ImportError::Ovf(format!(
                    "{vm}: item {instance_id:?} has ResourceType {raw_type:?}, not a number"
                ))
            })?;
            let name = child_text(node, "ElementName")
                .unwrap_or(&instance_id)
                .to_owned();
            Ok(Item {
                node,
                instance_id,
                resource_type,
                name,
            })
        })
        .collect()
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

fn nics(
    items: &[Item],
    envelope: &Envelope,
    vm: &mut ImportedVm,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for item in items.iter().filter(|i| i.resource_type == rt::ETHERNET) {
        if vm.nics.len() >= MAX_NICS {
            return Err(ImportError::TooMany {
                what: "NICs in one VM",
                count: vm.nics.len() + 1,
                limit: MAX_NICS,
            });
        }
        let index = vm.nics.len();
        let nic_name = format!("ethernet{index}");
        let who = format!("{}: {}", vm.name, item.name);
        let (model, w) = devices::nic_model(item.text("ResourceSubType").unwrap_or("E1000"), &who);
        warnings.extend(w);
        let mac = match item.text("Address") {
            Some(raw) => devices::normalize_mac(raw).ok_or_else(|| {
                ImportError::Ovf(format!("{who}: MAC {raw:?} is not a unicast MAC address"))
            })?,
            None => {
                let mac = devices::generated_mac(&format!("{}/{nic_name}", vm.name));
                warnings.push(format!("{who}: no MAC in the descriptor; assigned {mac}"));
                mac
            }
        };
        let network = match item.text("Connection") {
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
        });
    }
    Ok(())
}

fn other_devices(items: &[Item], vm: &str, warnings: &mut Vec<String>) {
    for item in items {
        let subtype = item
            .text("ResourceSubType")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let what = match item.resource_type {
            rt::FLOPPY => "floppy drive",
            rt::CD | rt::DVD => "CD/DVD drive",
            rt::SERIAL => "serial port",
            rt::PARALLEL => "parallel port",
            rt::USB => "USB controller",
            rt::SOUND => "sound card",
            rt::OTHER if subtype.contains("soundcard") => "sound card",
            // VMCI, video and the rest are either recreated by the VMM or invisible to
            // the guest's configuration.
            _ => continue,
        };
        warnings.push(format!(
            "{vm}: {} ({what}) has no equivalent; not imported",
            item.name
        ));
    }
}

/// `vmw:BootOrderSection` entries in order (each names an item InstanceID), else the
/// `bios.bootOrder`/`bios.hddOrder` ExtraConfig keys as in a VMX.
fn boot_order(system: Node, hw: Node, items: &[Item], vm: &ImportedVm) -> Vec<String> {
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
                let pos = items
                    .iter()
                    .filter(|i| i.resource_type == rt::ETHERNET)
                    .position(|i| i.instance_id == id);
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
