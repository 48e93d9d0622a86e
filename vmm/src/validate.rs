//! Validation of a `VmSpec`: a pure function listing every problem at once, so a user
//! fixes their manifest in one round.

use crate::spec::{ControllerKind, MachineType, NicBackend, VmSpec};
use crate::{Result, VmmError};
use std::collections::{BTreeMap, BTreeSet};

/// PCI slots the chipset occupies (host bridge, PIIX3 / ICH9 functions).
pub fn reserved_slots(machine: MachineType) -> &'static [u8] {
    match machine {
        MachineType::Pc => &[0, 1],
        MachineType::Q35 => &[0, 31],
    }
}

/// Slot of the vmware-svga adapter: 00:0f.0, where VMware puts its SVGA II.
pub const SVGA_SLOT: u8 = 15;

/// Highest SCSI target / port / unit per controller model.
pub fn max_unit(kind: ControllerKind) -> u8 {
    match kind {
        // QEMU's pvscsi serves targets 0..63 (VMware allows 0..64 minus the HBA's 7).
        ControllerKind::Pvscsi => 63,
        // The SAS1068 has 8 phys.
        ControllerKind::Lsilogic | ControllerKind::Lsisas => 7,
        // ich9-ahci: 6 ports.
        ControllerKind::Sata => 5,
        // master / slave.
        ControllerKind::Ide => 1,
        ControllerKind::Virtio => 255,
    }
}

/// Checks a spec; `Ok` means `build_argv` will produce a sensible QEMU command line.
pub fn validate(spec: &VmSpec) -> Result<()> {
    let mut errs = Vec::new();
    check_name("VM name", &spec.name, &mut errs);
    if let Some(uuid) = &spec.uuid
        && !is_uuid(uuid)
    {
        errs.push(format!(
            "uuid {uuid:?} is not of the form 8-4-4-4-12 hex digits"
        ));
    }
    if let Some(serial) = &spec.serial
        && (serial.len() > 64 || serial.chars().any(char::is_control))
    {
        errs.push("serial must be at most 64 printable characters".to_string());
    }
    let c = spec.cpu;
    if c.sockets == 0 || c.cores == 0 || c.threads == 0 {
        errs.push("cpu sockets, cores and threads must each be at least 1".to_string());
    } else if c.vcpus() > 255 {
        errs.push(format!(
            "{} vCPUs is more than the 255 supported",
            c.vcpus()
        ));
    }
    if spec.memory_mib < 16 {
        errs.push(format!(
            "memory_mib {} is below the 16 MiB minimum",
            spec.memory_mib
        ));
    }
    if !spec.run_dir.is_absolute() {
        errs.push(format!(
            "run_dir {} must be an absolute path",
            spec.run_dir.display()
        ));
    }
    for name in spec.fw_cfg.keys() {
        if !name.starts_with("opt/") || name.len() > 55 || name.contains(',') {
            errs.push(format!(
                "fw_cfg name {name:?} must start with opt/, be under 56 chars, no commas"
            ));
        }
    }
    check_disks(spec, &mut errs);
    check_nics(spec, &mut errs);
    check_pci_slots(spec, &mut errs);
    check_slot_numbers(spec, &mut errs);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(VmmError::SpecInvalid(errs))
    }
}

fn check_name(what: &str, name: &str, errs: &mut Vec<String>) {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.');
    if !ok {
        errs.push(format!(
            "{what} {name:?} must be 1-63 characters of [A-Za-z0-9._-]"
        ));
    }
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.chars().all(|ch| ch.is_ascii_hexdigit()))
}

fn check_disks(spec: &VmSpec, errs: &mut Vec<String>) {
    let mut names = BTreeSet::new();
    let mut addrs: BTreeMap<(ControllerKind, u8, u8), &str> = BTreeMap::new();
    let mut boot: BTreeMap<u32, &str> = BTreeMap::new();
    for d in &spec.disks {
        check_name("disk name", &d.name, errs);
        if !names.insert(d.name.as_str()) {
            errs.push(format!("disk name {:?} is used twice", d.name));
        }
        if !d.path.is_absolute() {
            errs.push(format!(
                "disk {}: path {} must be absolute",
                d.name,
                d.path.display()
            ));
        }
        if d.cdrom && !d.readonly {
            errs.push(format!(
                "disk {}: a CD-ROM is read-only: set readonly",
                d.name
            ));
        }
        let kind = d.controller;
        if kind == ControllerKind::Ide && spec.machine == MachineType::Q35 {
            errs.push(format!(
                "disk {}: the q35 machine has no IDE controller",
                d.name
            ));
        }
        if kind == ControllerKind::Ide && d.bus > 1 {
            errs.push(format!(
                "disk {}: IDE channel {} does not exist (0 or 1)",
                d.name, d.bus
            ));
        }
        if d.unit > max_unit(kind) {
            errs.push(format!(
                "disk {}: unit {} is beyond the {} controller's last unit {}",
                d.name,
                d.unit,
                kind.as_str(),
                max_unit(kind)
            ));
        }
        if let Some(other) = addrs.insert((kind, d.bus, d.unit), &d.name) {
            errs.push(format!(
                "disks {other} and {} share the address {}{}:{}",
                d.name,
                kind.as_str(),
                d.bus,
                d.unit
            ));
        }
        if let Some(order) = d.boot_order
            && let Some(other) = boot.insert(order, &d.name)
        {
            errs.push(format!(
                "disks {other} and {} have the same boot_order {order}",
                d.name
            ));
        }
    }
    let mut ctrls = BTreeSet::new();
    for c in &spec.controllers {
        if !ctrls.insert((c.kind, c.bus)) {
            errs.push(format!(
                "controller {}{} is declared twice",
                c.kind.as_str(),
                c.bus
            ));
        }
        if c.kind == ControllerKind::Ide && c.pci_slot.is_some() {
            errs.push(
                "the IDE controller is part of the chipset and takes no pci_slot".to_string(),
            );
        }
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` (either case) into bytes.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

fn check_nics(spec: &VmSpec, errs: &mut Vec<String>) {
    let mut names = BTreeSet::new();
    let mut macs: BTreeMap<[u8; 6], &str> = BTreeMap::new();
    for n in &spec.nics {
        check_name("NIC name", &n.name, errs);
        if !names.insert(n.name.as_str()) {
            errs.push(format!("NIC name {:?} is used twice", n.name));
        }
        match parse_mac(&n.mac) {
            None => errs.push(format!(
                "NIC {}: MAC {:?} is not xx:xx:xx:xx:xx:xx",
                n.name, n.mac
            )),
            Some(m) if m[0] & 1 == 1 => {
                errs.push(format!(
                    "NIC {}: MAC {} is a multicast address",
                    n.name, n.mac
                ));
            }
            Some(m) => {
                if let Some(other) = macs.insert(m, &n.name) {
                    errs.push(format!(
                        "NICs {other} and {} have the same MAC {}",
                        n.name, n.mac
                    ));
                }
            }
        }
        match &n.backend {
            NicBackend::Tap { name, fd } => {
                if fd.is_some_and(|fd| fd < 3) {
                    errs.push(format!("NIC {}: tap fd {fd:?} is not a passed fd", n.name));
                }
                if name.is_empty() || name.len() > 15 || name.contains(['/', ',', ' ']) {
                    errs.push(format!(
                        "NIC {}: tap name {name:?} is not a valid interface name",
                        n.name
                    ));
                }
            }
            NicBackend::Socket { listen, connect } => {
                if listen.is_some() == connect.is_some() {
                    errs.push(format!(
                        "NIC {}: socket backend needs exactly one of listen, connect",
                        n.name
                    ));
                }
                for a in [listen, connect].into_iter().flatten() {
                    if a.contains(',') || !a.contains(':') {
                        errs.push(format!(
                            "NIC {}: socket address {a:?} must be host:port",
                            n.name
                        ));
                    }
                }
            }
            NicBackend::User {} => {}
        }
    }
}

/// Lowest physical slot number a device may announce: below it are bus-0 slots, which
/// `pci_slot` places directly.
pub const SLOT_NUMBER_MIN: u16 = 32;
/// Highest: the PCIe Slot Capabilities' Physical Slot Number field has 13 bits.
pub const SLOT_NUMBER_MAX: u16 = 8191;

fn check_slot_numbers(spec: &VmSpec, errs: &mut Vec<String>) {
    let mut used: BTreeMap<u16, String> = BTreeMap::new();
    let declared = spec
        .controllers
        .iter()
        .filter_map(|c| {
            c.slot_number
                .map(|n| (n, format!("controller {}{}", c.kind.as_str(), c.bus)))
        })
        .chain(
            spec.nics
                .iter()
                .filter_map(|n| n.slot_number.map(|s| (s, format!("NIC {}", n.name)))),
        );
    for (number, who) in declared {
        if spec.machine != MachineType::Q35 {
            errs.push(format!(
                "{who}: slot_number {number} needs the q35 machine (on pc, Linux names slots after the device number)"
            ));
        }
        if !(SLOT_NUMBER_MIN..=SLOT_NUMBER_MAX).contains(&number) {
            errs.push(format!(
                "{who}: slot_number {number} is out of range {SLOT_NUMBER_MIN}-{SLOT_NUMBER_MAX}"
            ));
        } else if let Some(other) = used.get(&number) {
            errs.push(format!("{who} and {other} both claim slot_number {number}"));
        } else {
            used.insert(number, who);
        }
    }
    for c in &spec.controllers {
        if c.kind == ControllerKind::Ide && c.slot_number.is_some() {
            errs.push("the IDE controller is part of the chipset and takes no slot_number".into());
        }
    }
}

fn check_pci_slots(spec: &VmSpec, errs: &mut Vec<String>) {
    let reserved = reserved_slots(spec.machine);
    let mut used: BTreeMap<u8, String> = BTreeMap::new();
    if spec.svga {
        used.insert(SVGA_SLOT, "the vmware-svga adapter".to_string());
    }
    let declared = spec
        .controllers
        .iter()
        .filter_map(|c| {
            c.pci_slot
                .map(|s| (s, format!("controller {}{}", c.kind.as_str(), c.bus)))
        })
        .chain(
            spec.nics
                .iter()
                .filter_map(|n| n.pci_slot.map(|s| (s, format!("NIC {}", n.name)))),
        );
    for (slot, who) in declared {
        if slot > 31 {
            errs.push(format!("{who}: PCI slot {slot} does not exist (0-31)"));
        } else if reserved.contains(&slot) {
            errs.push(format!("{who}: PCI slot {slot} is taken by the chipset"));
        } else if let Some(other) = used.get(&slot) {
            errs.push(format!("{who} and {other} both claim PCI slot {slot}"));
        } else {
            used.insert(slot, who);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Controller, NicBackend};

    fn sample() -> VmSpec {
        crate::argv::tests::sample()
    }

    fn errors(s: &VmSpec) -> Vec<String> {
        match validate(s) {
            Ok(()) => Vec::new(),
            Err(VmmError::SpecInvalid(e)) => e,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn sample_is_valid() {
        assert_eq!(errors(&sample()), Vec::<String>::new());
    }

    #[test]
    fn duplicate_mac_is_reported_case_insensitively() {
        let mut s = sample();
        s.nics[1].mac = "00:50:56:aa:bb:01".into();
        let e = errors(&s);
        assert!(e.iter().any(|m| m.contains("same MAC")), "{e:?}");
    }

    #[test]
    fn bad_and_multicast_macs() {
        let mut s = sample();
        s.nics[0].mac = "00:50:56:zz:00:01".into();
        s.nics[1].mac = "01:00:5e:00:00:01".into();
        let e = errors(&s);
        assert!(e.iter().any(|m| m.contains("is not xx:xx")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("multicast")), "{e:?}");
    }

    #[test]
    fn pci_slot_clashes() {
        let mut s = sample();
        s.nics[0].pci_slot = Some(20); // nics[1] also has 20
        s.controllers = vec![Controller {
            kind: ControllerKind::Pvscsi,
            bus: 0,
            pci_slot: Some(15),
            slot_number: None,
        }];
        let e = errors(&s);
        assert!(
            e.iter().any(|m| m.contains("both claim PCI slot 20")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.contains("vmware-svga")), "{e:?}");
        s.controllers[0].pci_slot = Some(1);
        assert!(
            errors(&s)
                .iter()
                .any(|m| m.contains("taken by the chipset"))
        );
        s.controllers[0].pci_slot = Some(40);
        assert!(errors(&s).iter().any(|m| m.contains("does not exist")));
    }

    #[test]
    fn slot_numbers_need_q35_a_range_and_no_clash() {
        let mut s = sample();
        s.nics[0].slot_number = Some(160);
        s.nics[1].slot_number = Some(160);
        let e = errors(&s);
        assert!(
            e.iter()
                .any(|m| m == "NIC ethernet0: slot_number 160 needs the q35 machine (on pc, Linux names slots after the device number)"),
            "{e:?}"
        );
        s.machine = MachineType::Q35;
        assert_eq!(
            errors(&s),
            ["NIC ethernet1 and NIC ethernet0 both claim slot_number 160"]
        );
        s.nics[1].slot_number = Some(31);
        s.controllers = vec![Controller {
            kind: ControllerKind::Pvscsi,
            bus: 0,
            pci_slot: None,
            slot_number: Some(8192),
        }];
        assert_eq!(
            errors(&s),
            [
                "controller pvscsi0: slot_number 8192 is out of range 32-8191",
                "NIC ethernet1: slot_number 31 is out of range 32-8191",
            ]
        );
        s.nics[1].slot_number = Some(192);
        s.controllers[0].slot_number = Some(224);
        assert!(errors(&s).is_empty(), "{:?}", errors(&s));
    }

    #[test]
    fn scsi_address_clash_and_unit_limits() {
        let mut s = sample();
        s.disks[1].unit = 0;
        let e = errors(&s);
        assert!(
            e.iter().any(|m| m.contains("share the address pvscsi0:0")),
            "{e:?}"
        );
        s.disks[1].unit = 1;
        s.disks[1].controller = ControllerKind::Ide;
        s.disks[1].unit = 2;
        assert!(
            errors(&s)
                .iter()
                .any(|m| m.contains("beyond the ide controller's last unit 1"))
        );
        s.machine = MachineType::Q35;
        assert!(
            errors(&s)
                .iter()
                .any(|m| m.contains("q35 machine has no IDE"))
        );
    }

    #[test]
    fn unknown_controller_is_a_parse_error_naming_the_choices() {
        let text = serde_json::to_string(&sample())
            .expect("serializes")
            .replace("\"pvscsi\"", "\"buslogic\"");
        let err = VmSpec::from_json(&text).expect_err("buslogic is not supported");
        let msg = err.to_string();
        assert!(
            msg.contains("unknown variant `buslogic`") && msg.contains("pvscsi"),
            "{msg}"
        );
    }

    #[test]
    fn everything_else_is_listed_at_once() {
        let mut s = sample();
        s.name = "bad name".into();
        s.uuid = Some("nope".into());
        s.cpu.sockets = 0;
        s.memory_mib = 1;
        s.run_dir = "relative".into();
        s.disks[0].path = "rel.qcow2".into();
        s.disks[1].boot_order = Some(1);
        s.nics[0].backend = NicBackend::Tap {
            name: "this-name-is-too-long".into(),
            fd: None,
        };
        s.nics[1].name = "ethernet0".into();
        s.fw_cfg.insert("hvx/config".into(), String::new());
        let e = errors(&s);
        assert_eq!(e.len(), 10, "{e:#?}");
    }
}
