//! Rules shared by the OVF and VMX parsers when completing a VM.

use crate::model::ImportedVm;

/// Splits `cpus` into sockets x cores as VMware declared it. A cores-per-socket value
/// that does not divide the vCPU count (hand-edited files) falls back to one core per
/// socket, with a warning.
pub fn topology(cpus: u32, cores_per_socket: u32, who: &str) -> (u32, u32, Option<String>) {
    let cores = cores_per_socket.max(1);
    if cpus.is_multiple_of(cores) {
        (cpus / cores, cores, None)
    } else {
        (
            cpus,
            1,
            Some(format!(
                "{who}: {cores} cores per socket does not divide {cpus} vCPUs; using {cpus} sockets of 1 core"
            )),
        )
    }
}

/// The SMBIOS serial ESX derives from the BIOS UUID when none is set explicitly
/// (`VMware-56 4d 12 ... 9a bc-de f0 ...`). Guests and licence managers see this
/// string, so it is preserved.
pub fn vmware_serial(uuid: &str) -> String {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    let pairs: Vec<&str> = (0..hex.len() / 2)
        .filter_map(|i| hex.get(i * 2..i * 2 + 2))
        .collect();
    if pairs.len() != 16 {
        return format!("VMware-{uuid}");
    }
    format!("VMware-{}-{}", pairs[..8].join(" "), pairs[8..].join(" "))
}

/// Numbers the disks' boot priorities from `vm.boot_order` (names of disks and NICs);
/// disks not named follow in address order, so every disk stays bootable as it was on
/// VMware (whose BIOS tries all disks) while the named ones keep priority. CD-ROMs not
/// named come after the hard disks, as in VMware's default BIOS order (hard drive,
/// then CD-ROM): an installer ISO left in the drive does not take over the boot.
pub fn number_boot_order(vm: &mut ImportedVm) {
    vm.disks.sort_by_key(|d| (d.controller, d.bus, d.unit));
    let mut order = Vec::new();
    for name in &vm.boot_order {
        if vm.disks.iter().any(|d| &d.name == name) && !order.contains(name) {
            order.push(name.clone());
        }
    }
    for cdroms in [false, true] {
        for d in vm.disks.iter().filter(|d| d.cdrom == cdroms) {
            if !order.contains(&d.name) {
                order.push(d.name.clone());
            }
        }
    }
    for d in &mut vm.disks {
        d.boot_order = order
            .iter()
            .position(|n| n == &d.name)
            .and_then(|p| u32::try_from(p + 1).ok());
    }
    let nics: Vec<String> = vm
        .boot_order
        .iter()
        .filter(|n| vm.nics.iter().any(|nic| &nic.name == *n))
        .cloned()
        .collect();
    // Keep explicit NIC entries (PXE) at their place relative to the disks.
    let mut full = Vec::new();
    for name in &vm.boot_order {
        if nics.contains(name) || order.contains(name) {
            full.push(name.clone());
        }
    }
    for name in order {
        if !full.contains(&name) {
            full.push(name);
        }
    }
    vm.boot_order = full;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ControllerKind, ImportedDisk, ImportedNic};

    #[test]
    fn topology_divides_or_falls_back() {
        assert_eq!(topology(8, 4, "vm"), (2, 4, None));
        assert_eq!(topology(4, 0, "vm"), (4, 1, None));
        let (s, c, w) = topology(6, 4, "vm");
        assert_eq!((s, c), (6, 1));
        assert!(w.is_some());
    }

    #[test]
    fn serial_is_derived_like_esx() {
        assert_eq!(
            vmware_serial("564d1234-5678-9abc-def0-123456789abc"),
            "VMware-56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc"
        );
    }

    fn disk(name: &str, controller: ControllerKind, bus: u8, unit: u8) -> ImportedDisk {
        ImportedDisk {
            name: name.into(),
            file: format!("{name}.vmdk"),
            capacity_bytes: None,
            controller,
            bus,
            unit,
            boot_order: None,
            blank: false,
            cdrom: false,
        }
    }

    #[test]
    fn boot_order_puts_named_devices_first() {
        let mut vm = ImportedVm {
            disks: vec![
                disk("data", ControllerKind::Pvscsi, 0, 1),
                disk("os", ControllerKind::Sata, 0, 0),
                disk("boot", ControllerKind::Pvscsi, 0, 0),
            ],
            nics: vec![ImportedNic {
                name: "ethernet0".into(),
                ..ImportedNic::default()
            }],
            boot_order: vec!["ethernet0".into(), "os".into(), "cdrom".into()],
            ..ImportedVm::default()
        };
        number_boot_order(&mut vm);
        let got: Vec<(&str, Option<u32>)> = vm
            .disks
            .iter()
            .map(|d| (d.name.as_str(), d.boot_order))
            .collect();
        assert_eq!(got, [("boot", Some(2)), ("data", Some(3)), ("os", Some(1))]);
        assert_eq!(vm.boot_order, ["ethernet0", "os", "boot", "data"]);
    }
}
