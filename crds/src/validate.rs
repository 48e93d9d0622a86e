//! Client-side validation: the cross-object rules CEL cannot afford to check (MACs
//! unique across the whole application, dependency cycles), plus the per-VM rules the
//! CRD's CEL also enforces, so the operator and the import CLI give the same answers
//! without an apiserver. Pure functions; every problem is reported, not just the first.

use crate::vmapp::{ControllerType, VmApplicationSpec};
use std::collections::{BTreeMap, BTreeSet};

/// One problem found in a spec, with the field path it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// JSON-path-like location, e.g. `spec.vms[web].nics[eth0].macAddress`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Validates an application spec; an empty list means valid.
pub fn application(spec: &VmApplicationSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut push = |path: String, message: String| problems.push(Problem { path, message });

    let mut names = BTreeSet::new();
    let mut macs: BTreeMap<String, String> = BTreeMap::new();
    for vm in &spec.vms {
        let at = format!("spec.vms[{}]", vm.name);
        if !names.insert(vm.name.as_str()) {
            push(at.clone(), "duplicate VM name".into());
        }
        if let Some(delay) = vm.start_delay_seconds {
            if vm.depends_on.as_ref().is_none_or(Vec::is_empty) {
                push(
                    format!("{at}.startDelaySeconds"),
                    "startDelaySeconds counts from the start of the VMs in dependsOn: set dependsOn"
                        .into(),
                );
            }
            if !(1..=3600).contains(&delay) {
                push(
                    format!("{at}.startDelaySeconds"),
                    format!("{delay} is out of range 1-3600"),
                );
            }
        }
        if vm.cpu.vcpus() == 0 || vm.cpu.vcpus() > 512 {
            push(
                format!("{at}.cpu"),
                format!("{} vCPUs is out of range 1-512", vm.cpu.vcpus()),
            );
        }
        let mut slots: BTreeMap<u8, String> = BTreeMap::new();
        let mut claim_slot =
            |slot: Option<u8>, who: String, push: &mut dyn FnMut(String, String)| {
                if let Some(slot) = slot {
                    if !(1..=crate::vmapp::PCI_SLOT_MAX).contains(&slot) {
                        push(who.clone(), format!("PCI slot {slot} is out of range 1-31"));
                    } else if let Some(other) = slots.insert(slot, who.clone()) {
                        push(who, format!("PCI slot {slot} is already used by {other}"));
                    }
                }
            };
        let mut nic_names = BTreeSet::new();
        for nic in &vm.nics {
            let nat = format!("{at}.nics[{}]", nic.name);
            if !nic_names.insert(nic.name.as_str()) {
                push(nat.clone(), "duplicate NIC name".into());
            }
            let mac = nic.mac_address.to_ascii_lowercase();
            if !is_unicast_mac(&mac) {
                push(
                    format!("{nat}.macAddress"),
                    format!("{:?} is not a unicast MAC", nic.mac_address),
                );
            } else if let Some(other) = macs.insert(mac, nat.clone()) {
                push(
                    format!("{nat}.macAddress"),
                    format!("MAC {} is already used by {other}", nic.mac_address),
                );
            }
            if let Some(ip) = &nic.ip_address
                && ip.parse::<std::net::Ipv4Addr>().is_err()
            {
                push(
                    format!("{nat}.ipAddress"),
                    format!("{ip:?} is not an IPv4 address"),
                );
            }
            claim_slot(nic.pci_slot, nat, &mut push);
        }
        for c in vm.controllers.iter().flatten() {
            claim_slot(
                c.pci_slot,
                format!("{at}.controllers[{:?}{}]", c.type_, c.bus),
                &mut push,
            );
        }
        slot_number_problems(vm, &at, &mut push);
        let mut addrs: BTreeMap<(ControllerType, u8, u8), &str> = BTreeMap::new();
        let mut disk_names = BTreeSet::new();
        for d in &vm.disks {
            let dat = format!("{at}.disks[{}]", d.name);
            if !disk_names.insert(d.name.as_str()) {
                push(dat.clone(), "duplicate disk name".into());
            }
            if d.cdrom && !d.read_only {
                push(
                    format!("{dat}.readOnly"),
                    "a CD-ROM is read-only: set readOnly".into(),
                );
            }
            if let Some(msg) = address_problem(d.controller, d.bus, d.unit) {
                push(dat.clone(), msg);
            }
            if let Some(other) = addrs.insert((d.controller, d.bus, d.unit), &d.name) {
                push(
                    dat,
                    format!(
                        "{:?} {}:{} is already used by disk {other}",
                        d.controller, d.bus, d.unit
                    ),
                );
            }
        }
        for dep in vm.depends_on.iter().flatten() {
            if dep == &vm.name {
                push(
                    format!("{at}.dependsOn"),
                    "a VM cannot depend on itself".into(),
                );
            } else if !spec.vms.iter().any(|v| &v.name == dep) {
                push(
                    format!("{at}.dependsOn"),
                    format!("no VM named {dep:?} in this application"),
                );
            }
        }
    }
    if let Some(cycle) = dependency_cycle(spec) {
        push(
            "spec.vms".into(),
            format!("dependsOn has a cycle: {}", cycle.join(" -> ")),
        );
    }
    problems
}

/// VMware slot numbers: in range, unique, and not on a VM with IDE disks or an IDE
/// controller (they need the q35 chipset, which has no IDE).
fn slot_number_problems(
    vm: &crate::vmapp::VirtualMachine,
    at: &str,
    push: &mut dyn FnMut(String, String),
) {
    use crate::vmapp::{PCI_SLOT_NUMBER_MAX, PCI_SLOT_NUMBER_MIN};
    let nics = vm
        .nics
        .iter()
        .map(|n| (n.pci_slot_number, format!("{at}.nics[{}]", n.name)));
    let controllers = vm.controllers.iter().flatten().map(|c| {
        (
            c.pci_slot_number,
            format!("{at}.controllers[{:?}{}]", c.type_, c.bus),
        )
    });
    let mut numbers: BTreeMap<u16, String> = BTreeMap::new();
    for (number, who) in nics.chain(controllers) {
        let Some(number) = number else { continue };
        if !(PCI_SLOT_NUMBER_MIN..=PCI_SLOT_NUMBER_MAX).contains(&number) {
            push(
                format!("{who}.pciSlotNumber"),
                format!("{number} is out of range {PCI_SLOT_NUMBER_MIN}-{PCI_SLOT_NUMBER_MAX}"),
            );
        } else if let Some(other) = numbers.insert(number, who.clone()) {
            push(
                format!("{who}.pciSlotNumber"),
                format!("PCI slot number {number} is already used by {other}"),
            );
        }
    }
    let ide = vm.disks.iter().any(|d| d.controller == ControllerType::Ide)
        || vm
            .controllers
            .iter()
            .flatten()
            .any(|c| c.type_ == ControllerType::Ide && c.pci_slot_number.is_some());
    if !numbers.is_empty() && ide {
        push(
            at.to_string(),
            "pciSlotNumber needs the q35 chipset, which has no IDE controller: move the IDE disks to sata or drop pciSlotNumber".into(),
        );
    }
}

/// Whether a controller can address `bus:unit`.
pub fn address_problem(controller: ControllerType, bus: u8, unit: u8) -> Option<String> {
    match controller {
        ControllerType::Ide if bus > 1 || unit > 1 => {
            Some(format!("IDE has buses 0-1 and units 0-1, not {bus}:{unit}"))
        }
        ControllerType::Sata if unit > 29 => Some(format!("SATA has units 0-29, not {unit}")),
        ControllerType::Pvscsi | ControllerType::Lsilogic | ControllerType::Lsisas
            if unit == 7 || unit > 63 =>
        {
            Some(format!(
                "SCSI unit {unit} is not usable (0-63, 7 is the controller)"
            ))
        }
        _ if bus > 3 => Some(format!("bus {bus} is out of range 0-3")),
        _ => None,
    }
}

fn is_unicast_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// Start order honouring `dependsOn`: VMs with no dependencies first, ties by spec order.
/// Returns `None` when dependencies form a cycle.
pub fn start_order(spec: &VmApplicationSpec) -> Option<Vec<String>> {
    let mut done: Vec<String> = Vec::new();
    while done.len() < spec.vms.len() {
        let next = spec.vms.iter().find(|vm| {
            !done.contains(&vm.name)
                && vm
                    .depends_on
                    .iter()
                    .flatten()
                    .all(|d| done.contains(d) || !spec.vms.iter().any(|v| &v.name == d))
        })?;
        done.push(next.name.clone());
    }
    Some(done)
}

fn dependency_cycle(spec: &VmApplicationSpec) -> Option<Vec<String>> {
    if start_order(spec).is_some() {
        return None;
    }
    // Walk dependencies from any VM not yet orderable until a name repeats.
    let deps = |name: &str| -> Vec<String> {
        spec.vms
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.depends_on.clone())
            .unwrap_or_default()
    };
    for start in &spec.vms {
        let mut path = vec![start.name.clone()];
        let mut current = start.name.clone();
        while let Some(next) = deps(&current)
            .into_iter()
            .find(|d| spec.vms.iter().any(|v| &v.name == d))
        {
            if let Some(pos) = path.iter().position(|p| p == &next) {
                let mut cycle = path[pos..].to_vec();
                cycle.push(next);
                return Some(cycle);
            }
            path.push(next.clone());
            current = next;
        }
    }
    Some(vec!["(unresolved)".into()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmapp::*;

    fn vm(name: &str) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({"name": name, "memoryMib": 256})).expect("vm")
    }

    fn nic(name: &str, mac: &str, slot: Option<u8>) -> VmNic {
        VmNic {
            name: name.into(),
            network: crate::LocalRef { name: "net".into() },
            model: NicModel::Vmxnet3,
            mac_address: mac.into(),
            ip_address: None,
            pci_slot: slot,
            pci_slot_number: None,
            connected: true,
        }
    }

    fn disk(name: &str, controller: ControllerType, bus: u8, unit: u8) -> VmDisk {
        VmDisk {
            name: name.into(),
            overlay_disk: crate::LocalRef { name: name.into() },
            controller,
            bus,
            unit,
            boot_order: None,
            read_only: false,
            cdrom: false,
            throttle: None,
        }
    }

    #[test]
    fn valid_application_has_no_problems_and_orders_dependencies() {
        let mut db = vm("db");
        db.nics.push(nic("eth0", "00:50:56:00:00:02", Some(17)));
        db.disks.push(disk("root", ControllerType::Pvscsi, 0, 0));
        let mut web = vm("web");
        web.nics.push(nic("eth0", "00:50:56:00:00:01", Some(16)));
        web.depends_on = Some(vec!["db".into()]);
        let spec = VmApplicationSpec { vms: vec![web, db] };
        assert_eq!(application(&spec), vec![]);
        assert_eq!(
            start_order(&spec),
            Some(vec!["db".to_string(), "web".to_string()])
        );
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let mut a = vm("a");
        a.nics.push(nic("eth0", "00:50:56:00:00:01", Some(16)));
        a.nics.push(nic("eth1", "01:50:56:00:00:01", Some(16)));
        a.disks.push(disk("d0", ControllerType::Pvscsi, 0, 7));
        a.disks.push(disk("d1", ControllerType::Ide, 2, 0));
        a.disks.push(disk("d2", ControllerType::Ide, 2, 0));
        a.depends_on = Some(vec!["b".into()]);
        let mut b = vm("b");
        b.nics.push(nic("eth0", "00:50:56:00:00:01", None));
        b.depends_on = Some(vec!["a".into(), "zz".into()]);
        b.start_delay_seconds = Some(7200);
        let mut c = vm("c");
        c.start_delay_seconds = Some(30);
        let problems = application(&VmApplicationSpec { vms: vec![a, b, c] });
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let has = |s: &str| text.iter().any(|t| t.contains(s));
        assert!(
            has("spec.vms[a].nics[eth1].macAddress: \"01:50:56:00:00:01\" is not a unicast MAC"),
            "{text:#?}"
        );
        assert!(
            has("spec.vms[a].nics[eth1]: PCI slot 16 is already used by spec.vms[a].nics[eth0]"),
            "{text:#?}"
        );
        assert!(
            has("spec.vms[a].disks[d0]: SCSI unit 7 is not usable"),
            "{text:#?}"
        );
        assert!(
            has("spec.vms[b].startDelaySeconds: 7200 is out of range 1-3600"),
            "{text:#?}"
        );
        assert!(
            has("spec.vms[c].startDelaySeconds: startDelaySeconds counts from the start"),
            "{text:#?}"
        );
        assert!(
            has("spec.vms[a].disks[d2]: Ide 2:0 is already used by disk d1"),
            "{text:#?}"
        );
        assert!(
            has(
                "spec.vms[b].nics[eth0].macAddress: MAC 00:50:56:00:00:01 is already used by spec.vms[a].nics[eth0]"
            ),
            "{text:#?}"
        );
        assert!(
            has("spec.vms[b].dependsOn: no VM named \"zz\""),
            "{text:#?}"
        );
        assert!(has("dependsOn has a cycle: a -> b -> a"), "{text:#?}");
    }

    #[test]
    fn pci_slot_numbers_are_unique_in_range_and_exclude_ide() {
        let mut a = vm("a");
        a.nics.push(nic("eth0", "00:50:56:00:00:01", Some(16)));
        a.nics.push(nic("eth1", "00:50:56:00:00:02", Some(17)));
        a.nics[0].pci_slot_number = Some(160);
        a.nics[1].pci_slot_number = Some(192);
        a.disks.push(disk("d0", ControllerType::Pvscsi, 0, 0));
        let ok = VmApplicationSpec {
            vms: vec![a.clone()],
        };
        assert_eq!(application(&ok), vec![]);

        a.nics[1].pci_slot_number = Some(160);
        a.controllers = Some(vec![DiskController {
            type_: ControllerType::Pvscsi,
            bus: 0,
            pci_slot: None,
            pci_slot_number: Some(9000),
        }]);
        a.disks.push(disk("cd", ControllerType::Ide, 1, 0));
        a.disks[1].cdrom = true;
        let text: Vec<String> = application(&VmApplicationSpec { vms: vec![a] })
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "spec.vms[a].nics[eth1].pciSlotNumber: PCI slot number 160 is already used by spec.vms[a].nics[eth0]",
                "spec.vms[a].controllers[Pvscsi0].pciSlotNumber: 9000 is out of range 32-8191",
                "spec.vms[a]: pciSlotNumber needs the q35 chipset, which has no IDE controller: move the IDE disks to sata or drop pciSlotNumber",
                "spec.vms[a].disks[cd].readOnly: a CD-ROM is read-only: set readOnly",
            ]
        );
    }
}
