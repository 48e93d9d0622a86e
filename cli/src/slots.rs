//! PCI slots: VMware numbers its slots 16-31 on bus 0 and 32+ behind its bridges
//! (`ens160`, `ens192`); QEMU's bus 0 only has 1-31. Devices keep their relative
//! order (what guests without predictable names enumerate by) from slot 0x10 on.
//! Numbers from 32 up are kept as `pciSlotNumber` (each device then sits behind a root
//! port announcing it, so Linux names stay) unless the VM has IDE disks: that needs
//! the q35 chipset, which has no IDE.

use hvx_import::ImportedVm;

/// First QEMU slot given to imported devices; below it sit the chipset and the VMM's
/// own devices.
pub const FIRST_SLOT: u8 = 0x10;
/// Last usable slot on bus 0.
pub const LAST_SLOT: u8 = 31;

/// QEMU slots for a VM's controllers and NICs, index-aligned with `vm.controllers`
/// and `vm.nics`; `None` where VMware gave no slot or none is left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    /// Per controller.
    pub controllers: Vec<Option<u8>>,
    /// Per NIC.
    pub nics: Vec<Option<u8>>,
    /// VMware slot numbers kept as `pciSlotNumber`, per controller.
    pub controller_numbers: Vec<Option<u16>>,
    /// VMware slot numbers kept as `pciSlotNumber`, per NIC.
    pub nic_numbers: Vec<Option<u16>>,
}

/// The VMware slot number as the API's `pciSlotNumber`, when reproducible.
fn kept_number(vmware: Option<u32>) -> Option<u16> {
    let n = u16::try_from(vmware?).ok()?;
    (hvx_api::PCI_SLOT_NUMBER_MIN..=hvx_api::PCI_SLOT_NUMBER_MAX)
        .contains(&n)
        .then_some(n)
}

/// Assigns slots in VMware slot order; warns where a NIC's guest-visible slot number
/// (and so its predictable interface name) changes.
pub fn assign_pci_slots(vm: &ImportedVm, name: &str, warnings: &mut Vec<String>) -> Slots {
    // (vmware slot, is_nic, index)
    let mut devices: Vec<(u32, bool, usize)> = Vec::new();
    for (i, c) in vm.controllers.iter().enumerate() {
        if let Some(s) = c.pci_slot_number {
            devices.push((s, false, i));
        }
    }
    for (i, n) in vm.nics.iter().enumerate() {
        if let Some(s) = n.pci_slot_number {
            devices.push((s, true, i));
        }
    }
    devices.sort_unstable();
    let ide = vm
        .disks
        .iter()
        .any(|d| d.controller == hvx_import::ControllerKind::Ide);
    let keep = |vmware: Option<u32>| if ide { None } else { kept_number(vmware) };
    let mut slots = Slots {
        controllers: vec![None; vm.controllers.len()],
        nics: vec![None; vm.nics.len()],
        controller_numbers: vm
            .controllers
            .iter()
            .map(|c| keep(c.pci_slot_number))
            .collect(),
        nic_numbers: vm.nics.iter().map(|n| keep(n.pci_slot_number)).collect(),
    };
    if ide
        && vm
            .nics
            .iter()
            .any(|n| kept_number(n.pci_slot_number).is_some())
    {
        warnings.push(format!(
            "{name}: VMware PCI slot numbers are not kept: they need the q35 chipset, which has no IDE, and the VM has IDE disks (move them to SATA to keep the NICs' names)"
        ));
    }
    let mut next = FIRST_SLOT;
    let mut moved: Vec<(u32, Option<u8>)> = Vec::new();
    for (vmware, is_nic, i) in devices {
        let slot = (next <= LAST_SLOT).then_some(next);
        next = next.saturating_add(1);
        if is_nic {
            slots.nics[i] = slot;
            let nic = &vm.nics[i].name;
            match slot {
                _ if slots.nic_numbers[i].is_some() => {}
                Some(s) if u32::from(s) != vmware => warnings.push(format!(
                    "{name}: {nic} was in VMware PCI slot {vmware} (Linux name ens{vmware}); it is in slot {s} here (ens{s}): configuration keyed on the MAC is unaffected"
                )),
                None => warnings.push(format!(
                    "{name}: {nic}: no PCI slot left on bus 0; the VMM places it"
                )),
                _ => {}
            }
        } else {
            slots.controllers[i] = slot;
            if slot.is_none_or(|s| u32::from(s) != vmware) {
                moved.push((vmware, slot));
            }
        }
    }
    if !moved.is_empty() {
        let list: Vec<String> = moved
            .iter()
            .map(|(v, s)| match s {
                Some(s) => format!("{v} -> {s}"),
                None => format!("{v} -> placed by the VMM"),
            })
            .collect();
        warnings.push(format!(
            "{name}: disk controllers change PCI slot ({}): names under /dev/disk/by-path change; by-uuid, by-label and LVM do not",
            list.join(", ")
        ));
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvx_import::{ControllerKind, ImportedController, ImportedNic};

    #[test]
    fn relative_order_is_kept_and_renames_are_reported() {
        let vm = ImportedVm {
            controllers: vec![
                ImportedController {
                    kind: ControllerKind::Pvscsi,
                    bus: 0,
                    pci_slot_number: Some(160),
                },
                ImportedController {
                    kind: ControllerKind::Ide,
                    bus: 0,
                    pci_slot_number: None,
                },
            ],
            nics: vec![
                ImportedNic {
                    name: "ethernet0".into(),
                    pci_slot_number: Some(192),
                    ..ImportedNic::default()
                },
                ImportedNic {
                    name: "ethernet1".into(),
                    pci_slot_number: Some(32),
                    ..ImportedNic::default()
                },
                ImportedNic {
                    name: "ethernet2".into(),
                    ..ImportedNic::default()
                },
            ],
            ..ImportedVm::default()
        };
        let mut warnings = Vec::new();
        let slots = assign_pci_slots(&vm, "vm", &mut warnings);
        assert_eq!(slots.nics, [Some(18), Some(16), None]);
        assert_eq!(slots.controllers, [Some(17), None]);
        assert_eq!(slots.nic_numbers, [Some(192), Some(32), None]);
        assert_eq!(slots.controller_numbers, [Some(160), None]);
        // The NICs keep their numbers (and names); the controller's address changes.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("disk controllers change PCI slot (160 -> 17)"),
            "{warnings:?}"
        );

        // With an IDE disk the VM stays on i440fx: numbers are dropped, renames reported.
        let mut vm = vm;
        vm.disks.push(hvx_import::ImportedDisk {
            name: "ide0:0".into(),
            file: "a.vmdk".into(),
            capacity_bytes: None,
            controller: ControllerKind::Ide,
            bus: 0,
            unit: 0,
            boot_order: None,
            blank: false,
            cdrom: false,
        });
        let mut warnings = Vec::new();
        let slots = assign_pci_slots(&vm, "vm", &mut warnings);
        assert_eq!(slots.nics, [Some(18), Some(16), None]);
        assert_eq!(slots.nic_numbers, [None, None, None]);
        assert_eq!(slots.controller_numbers, [None, None]);
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert!(warnings[0].contains("VMware PCI slot numbers are not kept"));
        assert!(warnings[1].contains("ethernet1 was in VMware PCI slot 32"));
    }
}
