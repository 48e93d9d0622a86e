//! One imported VM as a `VirtualMachine` of the VmApplication spec.

use crate::error::{CliError, Result};
use crate::names::{dns_label, unique};
use crate::slots::assign_pci_slots;
use hvx_api::{
    ControllerType, CpuTopology, DiskController, Firmware, LocalRef, NicModel, RunStrategy,
    SmbiosIdentity, VirtualMachine, VmDisk, VmNic,
};
use hvx_import::{ControllerKind, ImportedVm};
use std::collections::BTreeMap;

/// Smallest memory the API accepts.
const MIN_MEMORY_MIB: u32 = 16;
/// Most sockets the API accepts (QEMU's practical limit for the machine types hvx uses).
const MAX_SOCKETS: u32 = 16;
/// Most `dependsOn` entries the API accepts.
const MAX_DEPENDS_ON: usize = 16;
/// Most cores per socket the API accepts.
const MAX_CORES: u32 = 128;

/// VMware allows more sockets than hvx (e.g. 32 sockets of 1 core): keep the vCPU count
/// and move the excess into cores, with the fewest cores per socket that fit.
pub fn fit_topology(sockets: u32, cores: u32, vm: &str, warnings: &mut Vec<String>) -> (u32, u32) {
    if sockets <= MAX_SOCKETS && cores <= MAX_CORES {
        return (sockets, cores);
    }
    let vcpus = sockets.saturating_mul(cores);
    let fit = (1..=MAX_CORES)
        .filter(|c| vcpus.is_multiple_of(*c) && vcpus / c <= MAX_SOCKETS)
        .map(|c| (vcpus / c, c))
        .next();
    match fit {
        Some((s, c)) => {
            warnings.push(format!(
                "{vm}: {sockets} sockets x {cores} cores is beyond {MAX_SOCKETS} sockets / {MAX_CORES} cores; using {s} x {c} (same {vcpus} vCPUs; check per-socket licences)"
            ));
            (s, c)
        }
        // No exact split (a large prime count): the API rejects it, with its reason.
        None => (sockets, cores),
    }
}

fn controller_type(kind: ControllerKind) -> ControllerType {
    match kind {
        ControllerKind::Pvscsi => ControllerType::Pvscsi,
        ControllerKind::Lsilogic => ControllerType::Lsilogic,
        ControllerKind::Lsisas => ControllerType::Lsisas,
        ControllerKind::Sata => ControllerType::Sata,
        ControllerKind::Ide => ControllerType::Ide,
    }
}

pub(crate) fn virtual_machine(
    vm: &ImportedVm,
    name: &str,
    net_names: &BTreeMap<String, String>,
    disk_names: &BTreeMap<String, String>,
    renamed: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> Result<VirtualMachine> {
    let memory_mib = u32::try_from(vm.memory_mib).map_err(|_| {
        CliError::Invalid(vec![format!(
            "{name}: {} MiB of memory is out of range",
            vm.memory_mib
        )])
    })?;
    let mut problems = Vec::new();
    if memory_mib < MIN_MEMORY_MIB {
        problems.push(format!(
            "{name}: {memory_mib} MiB of memory is below the minimum of {MIN_MEMORY_MIB} MiB"
        ));
    }
    let (sockets, cores_per_socket) = fit_topology(vm.sockets, vm.cores_per_socket, name, warnings);
    let slots = assign_pci_slots(vm, name, warnings);
    let controllers: Vec<DiskController> = vm
        .controllers
        .iter()
        .enumerate()
        .map(|(i, c)| DiskController {
            type_: controller_type(c.kind),
            bus: c.bus,
            pci_slot: slots.controllers.get(i).copied().flatten(),
            pci_slot_number: slots.controller_numbers.get(i).copied().flatten(),
        })
        .collect();
    let mut used_disk_names: Vec<String> = Vec::new();
    let mut disks = Vec::new();
    for d in &vm.disks {
        let disk_name = unique(dns_label(&d.name, 63, "disk"), &used_disk_names);
        used_disk_names.push(disk_name.clone());
        let overlay = disk_names
            .get(&crate::manifests::disk_key(d))
            .cloned()
            .unwrap_or_default();
        disks.push(VmDisk {
            name: disk_name,
            overlay_disk: LocalRef { name: overlay },
            controller: controller_type(d.controller),
            bus: d.bus,
            unit: d.unit,
            boot_order: d.boot_order.map(|b| b.min(64)),
            // An ISO in a CD/DVD drive: a read-only CD-ROM, as on VMware.
            read_only: d.cdrom,
            cdrom: d.cdrom,
            throttle: None,
        });
    }
    let nics = vm
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| VmNic {
            name: dns_label(&n.name, 63, "nic"),
            network: LocalRef {
                name: net_names.get(&n.network).cloned().unwrap_or_default(),
            },
            model: match n.model {
                hvx_import::NicModel::Vmxnet3 => NicModel::Vmxnet3,
                hvx_import::NicModel::E1000 => NicModel::E1000,
                hvx_import::NicModel::E1000e => NicModel::E1000e,
            },
            mac_address: n.mac.clone(),
            ip_address: n.ip_address.clone(),
            pci_slot: slots.nics.get(i).copied().flatten(),
            pci_slot_number: slots.nic_numbers.get(i).copied().flatten(),
            connected: n.connected,
        })
        .collect();
    let identity = (vm.uuid.is_some() || vm.serial.is_some()).then(|| SmbiosIdentity {
        uuid: vm.uuid.clone(),
        serial_number: vm.serial.clone(),
        manufacturer: None,
        product: None,
    });
    let mut depends_on: Vec<String> = vm
        .depends_on
        .iter()
        .filter_map(|d| renamed.get(d).cloned())
        .collect();
    if depends_on.len() > MAX_DEPENDS_ON {
        // The API keeps dependsOn short; the first ones still order most of the start.
        let dropped = depends_on.split_off(MAX_DEPENDS_ON);
        warnings.push(format!(
            "{name}: the vApp starts it after {} VMs, more than the {MAX_DEPENDS_ON} dependsOn allows; it no longer waits for {}",
            MAX_DEPENDS_ON + dropped.len(),
            dropped.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(CliError::Invalid(problems));
    }
    Ok(VirtualMachine {
        name: name.to_owned(),
        cpu: CpuTopology {
            sockets,
            cores_per_socket,
            threads_per_core: 1,
            model: None,
        },
        memory_mib,
        firmware: match vm.firmware {
            hvx_import::Firmware::Bios => Firmware::Bios,
            hvx_import::Firmware::Efi => Firmware::Efi,
        },
        identity,
        controllers: (!controllers.is_empty()).then_some(controllers),
        disks,
        nics,
        start_delay_seconds: vm
            .start_delay_seconds
            .filter(|d| *d > 0 && !depends_on.is_empty()),
        depends_on: (!depends_on.is_empty()).then_some(depends_on),
        // A VM the vApp did not power on stays off until the user starts it.
        run_strategy: if vm.stays_off {
            RunStrategy::Halted
        } else {
            RunStrategy::default()
        },
        eviction_strategy: Default::default(),
        accelerator: Default::default(),
        placement: None,
        devices: None,
        shutdown_grace_seconds: 120,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_start_groups_are_cut_to_the_api_limit_with_a_warning() {
        let others: Vec<String> = (0..20).map(|i| format!("web{i:02}")).collect();
        let vm = ImportedVm {
            name: "lb".into(),
            cpus: 1,
            sockets: 1,
            cores_per_socket: 1,
            memory_mib: 512,
            depends_on: others.clone(),
            ..ImportedVm::default()
        };
        let renamed: BTreeMap<String, String> =
            others.iter().map(|o| (o.clone(), o.clone())).collect();
        let mut w = Vec::new();
        let spec = virtual_machine(
            &vm,
            "lb",
            &BTreeMap::new(),
            &BTreeMap::new(),
            &renamed,
            &mut w,
        )
        .expect("maps");
        assert_eq!(spec.depends_on.map(|d| d.len()), Some(16));
        assert!(
            w.iter()
                .any(|w| w.contains("after 20 VMs") && w.contains("web16, web17, web18, web19")),
            "{w:?}"
        );
    }

    #[test]
    fn topology_beyond_the_api_limits_is_refolded() {
        let mut w = Vec::new();
        assert_eq!(fit_topology(2, 4, "vm", &mut w), (2, 4));
        assert!(w.is_empty());
        assert_eq!(fit_topology(32, 1, "vm", &mut w), (16, 2));
        assert_eq!(fit_topology(24, 1, "vm", &mut w), (12, 2));
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("32 sockets x 1 cores"));
    }
}
