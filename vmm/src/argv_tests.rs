use super::*;
use crate::spec::*;
use std::path::PathBuf;

pub(crate) fn sample() -> VmSpec {
    VmSpec::from_json(
        r#"{
        "name": "web-1",
        "uuid": "421a5b3c-0000-4000-8000-000000000001",
        "serial": "VMware-42 1a 5b 3c",
        "cpu": {"sockets": 2, "cores": 2},
        "memory_mib": 512,
        "disks": [
          {"name": "d0", "path": "/d/boot.qcow2", "controller": "pvscsi", "bus": 0, "unit": 0, "boot_order": 1},
          {"name": "d1", "path": "/d/data,1.vmdk", "format": "vmdk", "controller": "pvscsi", "bus": 0, "unit": 3, "readonly": true}
        ],
        "nics": [
          {"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:AA:BB:01", "backend": {"tap": {"name": "hvt0123456789ab"}}},
          {"name": "ethernet1", "model": "e1000", "mac": "00:50:56:aa:bb:02", "pci_slot": 20, "backend": {"user": {}}}
        ],
        "run_dir": "/run/hvx/web-1"
    }"#,
    )
    .expect("sample spec parses")
}

fn argv(spec: &VmSpec) -> Vec<String> {
    build_argv(spec, Accel::Tcg, &RunPaths::new(&spec.run_dir))
}

/// The value following `flag`, for every occurrence.
fn values<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
    a.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

#[test]
fn golden_command_line() {
    let a = argv(&sample());
    let expected = [
        "-name",
        "guest=web-1,debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-msg",
        "timestamp=on",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-machine",
        "pc,vmport=on",
        "-accel",
        "tcg,thread=multi,tb-size=64",
        "-cpu",
        "qemu64",
        "-smp",
        "4,sockets=2,cores=2,threads=1",
        "-m",
        "512M",
        "-uuid",
        "421a5b3c-0000-4000-8000-000000000001",
        "-smbios",
        "type=0,vendor=Phoenix Technologies LTD,version=6.00",
        "-smbios",
        "type=1,manufacturer=VMware,, Inc.,product=VMware Virtual Platform,version=None,serial=VMware-42 1a 5b 3c,uuid=421a5b3c-0000-4000-8000-000000000001",
        "-rtc",
        "base=utc",
        "-boot",
        "strict=on",
        "-device",
        "vmware-svga,id=video0,bus=pci.0,addr=0xf",
        "-device",
        "pvscsi,id=pvscsi0,bus=pci.0,addr=0x10",
        "-blockdev",
        r#"{"discard":"unmap","driver":"qcow2","file":{"driver":"file","filename":"/d/boot.qcow2","read-only":false},"node-name":"disk-d0","read-only":false}"#,
        "-device",
        "scsi-hd,bus=pvscsi0.0,channel=0,scsi-id=0,lun=0,drive=disk-d0,id=dev-d0,bootindex=1",
        "-blockdev",
        r#"{"discard":"unmap","driver":"vmdk","file":{"driver":"file","filename":"/d/data,1.vmdk","read-only":true},"node-name":"disk-d1","read-only":true}"#,
        "-device",
        "scsi-hd,bus=pvscsi0.0,channel=0,scsi-id=3,lun=0,drive=disk-d1,id=dev-d1",
        "-netdev",
        "tap,id=net-ethernet0,ifname=hvt0123456789ab,script=no,downscript=no,vhost=off",
        "-device",
        "vmxnet3,id=nic-ethernet0,netdev=net-ethernet0,mac=00:50:56:aa:bb:01,bus=pci.0,addr=0x11",
        "-netdev",
        "user,id=net-ethernet1",
        "-device",
        "e1000,id=nic-ethernet1,netdev=net-ethernet1,mac=00:50:56:aa:bb:02,bus=pci.0,addr=0x14",
        "-chardev",
        "socket,id=serial0,path=/run/hvx/web-1/serial.sock,server=on,wait=off,logfile=/run/hvx/web-1/serial.log,logappend=on",
        "-serial",
        "chardev:serial0",
        "-chardev",
        "socket,id=qmp,path=/run/hvx/web-1/qmp.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        "socket,id=qmp-probe,path=/run/hvx/web-1/qmp-probe.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp-probe,mode=control",
        "-chardev",
        "socket,id=qmp-agent,path=/run/hvx/web-1/qmp-agent.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp-agent,mode=control",
        "-display",
        "none",
        "-pidfile",
        "/run/hvx/web-1/qemu.pid",
    ];
    assert_eq!(a, expected);
}

#[test]
fn kvm_uses_host_cpu() {
    let a = build_argv(&sample(), Accel::Kvm, &RunPaths::new(&PathBuf::from("/r")));
    assert_eq!(values(&a, "-accel"), ["kvm"]);
    assert_eq!(values(&a, "-cpu"), ["host"]);
}

#[test]
fn controllers_map_to_vmware_models_and_addresses() {
    let mut s = sample();
    s.disks = vec![
        disk("a", ControllerKind::Lsisas, 0, 2),
        disk("b", ControllerKind::Sata, 0, 1),
        disk("c", ControllerKind::Ide, 1, 0),
        disk("d", ControllerKind::Lsilogic, 1, 0),
    ];
    let a = argv(&s);
    let devs = values(&a, "-device");
    assert!(
        devs.contains(&"mptsas1068,id=lsisas0,bus=pci.0,addr=0x10"),
        "{devs:?}"
    );
    assert!(
        devs.contains(&"ahci,id=sata0,bus=pci.0,addr=0x11"),
        "{devs:?}"
    );
    assert!(
        devs.contains(&"mptsas1068,id=lsilogic1,bus=pci.0,addr=0x12"),
        "{devs:?}"
    );
    assert!(
        devs.contains(&"scsi-hd,bus=lsisas0.0,channel=0,scsi-id=2,lun=0,drive=disk-a,id=dev-a")
    );
    assert!(devs.contains(&"ide-hd,bus=sata0.1,drive=disk-b,id=dev-b"));
    assert!(devs.contains(&"ide-hd,bus=ide.1,unit=0,drive=disk-c,id=dev-c"));
    // NICs follow the controllers; the declared slot 20 is kept.
    assert!(
        devs.iter()
            .any(|d| d.starts_with("vmxnet3,") && d.ends_with("addr=0x13")),
        "{devs:?}"
    );
    assert!(
        devs.iter()
            .any(|d| d.starts_with("e1000,") && d.ends_with("addr=0x14")),
        "{devs:?}"
    );
}

fn disk(name: &str, controller: ControllerKind, bus: u8, unit: u8) -> Disk {
    Disk {
        name: name.into(),
        path: PathBuf::from(format!("/d/{name}.qcow2")),
        format: DiskFormat::Qcow2,
        controller,
        bus,
        unit,
        readonly: false,
        cdrom: false,
        boot_order: None,
    }
}

#[test]
fn cdroms_are_cd_devices_on_their_controller_and_read_only() {
    let mut s = sample();
    let cd = |name: &str, controller, bus, unit| Disk {
        readonly: true,
        cdrom: true,
        format: DiskFormat::Raw,
        ..disk(name, controller, bus, unit)
    };
    s.disks = vec![
        disk("boot", ControllerKind::Pvscsi, 0, 0),
        cd("iso1", ControllerKind::Ide, 1, 0),
        cd("iso2", ControllerKind::Sata, 0, 1),
        cd("iso3", ControllerKind::Pvscsi, 0, 2),
    ];
    crate::validate::validate(&s).expect("valid");
    let a = argv(&s);
    let devs = values(&a, "-device");
    for want in [
        "scsi-hd,bus=pvscsi0.0,channel=0,scsi-id=0,lun=0,drive=disk-boot,id=dev-boot",
        "ide-cd,bus=ide.1,unit=0,drive=disk-iso1,id=dev-iso1",
        "ide-cd,bus=sata0.1,drive=disk-iso2,id=dev-iso2",
        "scsi-cd,bus=pvscsi0.0,channel=0,scsi-id=2,lun=0,drive=disk-iso3,id=dev-iso3",
    ] {
        assert!(devs.contains(&want), "{want} not in {devs:#?}");
    }
    let blockdevs = values(&a, "-blockdev");
    assert!(
        blockdevs
            .iter()
            .any(|b| b.contains(r#""node-name":"disk-iso1","read-only":true"#)),
        "{blockdevs:#?}"
    );
    // A writable CD-ROM is refused.
    s.disks[1].readonly = false;
    let err = crate::validate::validate(&s).expect_err("writable cdrom");
    assert!(
        err.to_string().contains("disk iso1: a CD-ROM is read-only"),
        "{err}"
    );
}

#[test]
fn declared_controller_slot_is_kept_and_adding_a_nic_moves_nothing() {
    let mut s = sample();
    s.controllers = vec![Controller {
        kind: ControllerKind::Pvscsi,
        bus: 0,
        pci_slot: Some(5),
        slot_number: None,
    }];
    let before = pci_layout(&s);
    assert_eq!(before.controllers[0].slot, Some(5));
    assert_eq!(before.nic_slots, [16, 20]);
    s.balloon = true;
    let after = pci_layout(&s);
    assert_eq!(after.nic_slots, before.nic_slots);
    assert_eq!(after.balloon_slot, Some(17));
}

#[test]
fn slot_numbers_put_devices_behind_root_ports_announcing_them() {
    let mut s = sample();
    s.machine = MachineType::Q35;
    s.nics[0].slot_number = Some(160);
    s.nics[1].slot_number = Some(192);
    s.controllers = vec![Controller {
        kind: ControllerKind::Pvscsi,
        bus: 0,
        pci_slot: None,
        slot_number: Some(224),
    }];
    crate::validate::validate(&s).expect("valid");
    let a = argv(&s);
    assert_eq!(
        values(&a, "-global"),
        ["ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    );
    let devices = values(&a, "-device");
    let expected = [
        "pcie-root-port,id=slot224,bus=pcie.0,addr=0x10,chassis=1,slot=224",
        "pvscsi,id=pvscsi0,bus=slot224",
        "pcie-root-port,id=slot160,bus=pcie.0,addr=0x11,chassis=1,slot=160",
        "vmxnet3,id=nic-ethernet0,netdev=net-ethernet0,mac=00:50:56:aa:bb:01,bus=slot160",
        "pcie-root-port,id=slot192,bus=pcie.0,addr=0x14,chassis=1,slot=192",
        "e1000,id=nic-ethernet1,netdev=net-ethernet1,mac=00:50:56:aa:bb:02,bus=slot192",
    ];
    for e in expected {
        assert!(devices.contains(&e), "{e} not in {devices:#?}");
    }
    // Each root port comes right before the device behind it.
    let at = |x: &str| devices.iter().position(|d| *d == x).expect("present");
    assert_eq!(at(expected[0]) + 1, at(expected[1]));
    assert_eq!(at(expected[4]) + 1, at(expected[5]));

    // Without slot numbers, q35 keeps ACPI hotplug and bus-0 placement.
    s.nics.iter_mut().for_each(|n| n.slot_number = None);
    s.controllers[0].slot_number = None;
    let a = argv(&s);
    assert!(values(&a, "-global").is_empty());
    assert!(!a.iter().any(|x| x.contains("pcie-root-port")), "{a:?}");
    assert!(
        values(&a, "-device").contains(&"pvscsi,id=pvscsi0,bus=pcie.0,addr=0x10"),
        "{a:?}"
    );
}

#[test]
fn efi_vnc_fwcfg_and_odd_paths_are_escaped() {
    let mut s = sample();
    s.firmware = Firmware::Efi;
    s.vnc = true;
    s.svga = false;
    s.vmport = false;
    s.run_dir = PathBuf::from("/run/a,b");
    s.fw_cfg.insert(
        "opt/hvx/config".into(),
        "ip.eth0=10.0.0.5/24\nhostname=a,b\n".into(),
    );
    let a = argv(&s);
    assert_eq!(values(&a, "-machine"), ["pc,vmport=off"]);
    assert!(
        values(&a, "-drive").contains(&"if=pflash,format=raw,unit=1,file=/run/a,,b/efi-vars.fd")
    );
    assert_eq!(values(&a, "-vnc"), ["unix:/run/a,,b/vnc.sock"]);
    assert_eq!(
        values(&a, "-fw_cfg"),
        ["name=opt/hvx/config,string=ip.eth0=10.0.0.5/24\nhostname=a,,b\n"]
    );
    assert!(!a.iter().any(|x| x.contains("vmware-svga")));
    assert!(values(&a, "-display").is_empty());
}

#[test]
fn socket_backend_and_virtio() {
    let mut s = sample();
    s.nics.truncate(1);
    s.nics[0].model = NicModel::Virtio;
    s.nics[0].backend = NicBackend::Socket {
        listen: None,
        connect: Some("127.0.0.1:5000".into()),
    };
    let a = argv(&s);
    assert_eq!(
        values(&a, "-netdev"),
        ["socket,id=net-ethernet0,connect=127.0.0.1:5000"]
    );
    assert!(
        values(&a, "-device")
            .iter()
            .any(|d| d.starts_with("virtio-net-pci,id=nic-ethernet0"))
    );
}

#[test]
fn a_passed_tap_fd_replaces_the_name() {
    let mut s = sample();
    s.nics.truncate(1);
    s.nics[0].backend = NicBackend::Tap {
        name: "hvt0123456789ab".into(),
        fd: Some(7),
    };
    let a = argv(&s);
    assert_eq!(
        values(&a, "-netdev"),
        ["tap,id=net-ethernet0,fd=7,vhost=off"]
    );
    assert!(!a.iter().any(|x| x.contains("ifname=")));
    // The fd never comes from a spec file.
    let json = serde_json::to_string(&s).expect("json");
    let back: VmSpec = serde_json::from_str(&json).expect("parse");
    assert_eq!(
        back.nics[0].backend,
        NicBackend::Tap {
            name: "hvt0123456789ab".into(),
            fd: None
        }
    );
}
