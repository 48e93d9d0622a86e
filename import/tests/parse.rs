//! The parsers on descriptors shaped the way ovftool, vSphere and Workstation write them.

use hvx_import::model::{ControllerKind, Firmware, ImportedApplication, ImportedVm, NicModel};
use hvx_import::{ovf, vmx, vmx_vm};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ovf_app(name: &str) -> ImportedApplication {
    ovf::parse(&fixture(name), "fallback").unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn vmx_app(name: &str) -> ImportedApplication {
    let vmx = vmx::parse(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    vmx_vm::application(&vmx, "fallback").unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A disk as `(name, file, controller, bus, unit, boot order)`.
type DiskRow<'a> = (&'a str, &'a str, ControllerKind, u8, u8, Option<u32>);
/// A NIC as `(name, model, mac, network, slot, connected)`.
type NicRow<'a> = (&'a str, NicModel, &'a str, &'a str, Option<u32>, bool);

fn disks(vm: &ImportedVm) -> Vec<DiskRow<'_>> {
    vm.disks
        .iter()
        .map(|d| {
            (
                d.name.as_str(),
                d.file.as_str(),
                d.controller,
                d.bus,
                d.unit,
                d.boot_order,
            )
        })
        .collect()
}

fn nics(vm: &ImportedVm) -> Vec<NicRow<'_>> {
    vm.nics
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.model,
                n.mac.as_str(),
                n.network.as_str(),
                n.pci_slot_number,
                n.connected,
            )
        })
        .collect()
}

fn has_warning(app: &ImportedApplication, needle: &str) -> bool {
    app.warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn single_vm_ovf_from_vsphere() {
    let app = ovf_app("single-vm.ovf");
    assert_eq!(app.name, "web-01");
    assert_eq!(app.networks, ["VM Network"]);
    let [vm] = app.vms.as_slice() else {
        panic!("one VM expected: {:?}", app.vms)
    };
    assert_eq!(vm.name, "web-01");
    assert_eq!((vm.cpus, vm.sockets, vm.cores_per_socket), (4, 2, 2));
    assert_eq!(vm.memory_mib, 4096);
    assert_eq!(vm.firmware, Firmware::Bios);
    assert_eq!(vm.guest_os.as_deref(), Some("debian11_64Guest"));
    assert_eq!(
        vm.uuid.as_deref(),
        Some("421a6c3e-0b7d-5f21-9a0c-44d1e2f3a4b5")
    );
    assert_eq!(
        vm.serial.as_deref(),
        Some("VMware-42 1a 6c 3e 0b 7d 5f 21-9a 0c 44 d1 e2 f3 a4 b5")
    );
    assert_eq!(
        disks(vm),
        [(
            "Hard disk 1",
            "web-01-disk1.vmdk",
            ControllerKind::Pvscsi,
            0,
            0,
            Some(1)
        )]
    );
    assert_eq!(vm.disks[0].capacity_bytes, Some(16 << 30));
    assert_eq!(
        nics(vm),
        [(
            "ethernet0",
            NicModel::Vmxnet3,
            "00:50:56:8a:1b:2c",
            "VM Network",
            Some(192),
            true
        )]
    );
    let scsi: Vec<_> = vm
        .controllers
        .iter()
        .filter(|c| c.kind == ControllerKind::Pvscsi)
        .collect();
    assert_eq!(scsi.len(), 1);
    assert_eq!(scsi[0].pci_slot_number, Some(160));
    assert_eq!(app.disk_files.len(), 1);
    assert_eq!(app.disk_files[0].size_bytes, Some(1_073_152));
    assert!(has_warning(
        &app,
        "CD/DVD drive 1 (CD/DVD drive) has no equivalent"
    ));
    // VMCI and the video card are recreated silently.
    assert_eq!(app.warnings.len(), 1, "{:?}", app.warnings);
}

#[test]
fn vapp_collection_is_one_application_with_start_order() {
    let app = ovf_app("vapp-collection.ovf");
    assert_eq!(app.name, "shop");
    assert_eq!(app.networks, ["Frontend", "Backend"]);
    let names: Vec<&str> = app.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["shop-db", "shop-web"]);
    let (db, web) = (&app.vms[0], &app.vms[1]);
    assert!(db.depends_on.is_empty());
    assert_eq!(web.depends_on, ["shop-db"]);
    assert_eq!((db.cpus, db.memory_mib), (2, 8192));
    assert_eq!(
        disks(db),
        [
            (
                "Hard disk 1",
                "shop-db-1.vmdk",
                ControllerKind::Lsilogic,
                0,
                0,
                Some(1)
            ),
            (
                "Hard disk 2",
                "shop-db-2.vmdk",
                ControllerKind::Lsilogic,
                0,
                1,
                Some(2)
            ),
        ]
    );
    assert_eq!(db.disks[1].capacity_bytes, Some(100 << 30));
    assert_eq!(web.disks[0].controller, ControllerKind::Lsisas);
    assert_eq!(web.disks[0].capacity_bytes, Some(20 << 30));
    assert_eq!(
        nics(web),
        [
            (
                "ethernet0",
                NicModel::E1000e,
                "00:50:56:01:00:14",
                "Frontend",
                None,
                true
            ),
            (
                "ethernet1",
                NicModel::Vmxnet3,
                "00:50:56:01:00:15",
                "Backend",
                None,
                false
            ),
        ]
    );
    assert_eq!(nics(db)[0].1, NicModel::E1000);
    assert_eq!(app.disk_files.len(), 3);
    // vSphere's 120 s between the groups is carried.
    assert!(app.warnings.is_empty(), "{:?}", app.warnings);
    assert_eq!(web.start_delay_seconds, Some(120));
    assert_eq!(db.start_delay_seconds, None);
}

#[test]
fn many_nics_and_disks_on_different_controllers() {
    let app = ovf_app("many-devices.ovf");
    let vm = &app.vms[0];
    assert_eq!(vm.name, "Edge Gateway 01");
    assert_eq!(
        disks(vm),
        [
            (
                "Hard disk 1",
                "gw-disk1.vmdk",
                ControllerKind::Pvscsi,
                0,
                0,
                Some(2)
            ),
            (
                "Hard disk 2",
                "gw-disk2.vmdk",
                ControllerKind::Lsisas,
                1,
                3,
                Some(3)
            ),
            (
                "Hard disk 3",
                "gw-disk3.vmdk",
                ControllerKind::Sata,
                0,
                2,
                Some(1)
            ),
            (
                "Hard disk 4",
                "gw-disk4.vmdk",
                ControllerKind::Ide,
                0,
                1,
                Some(4)
            ),
        ]
    );
    assert_eq!(vm.disks[1].capacity_bytes, Some(512 << 20));
    // vmw:BootOrderSection: disk item 9 (Hard disk 3), then NIC item 16.
    assert_eq!(
        vm.boot_order,
        [
            "Hard disk 3",
            "ethernet0",
            "Hard disk 1",
            "Hard disk 2",
            "Hard disk 4"
        ]
    );
    let got = nics(vm);
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[0],
        (
            "ethernet0",
            NicModel::Vmxnet3,
            "00:50:56:aa:00:01",
            "DMZ",
            Some(192),
            true
        )
    );
    assert_eq!(
        got[1],
        (
            "ethernet1",
            NicModel::E1000,
            "00:0c:29:3b:4c:5d",
            "LAN",
            Some(32),
            true
        )
    );
    assert_eq!(got[2].1, NicModel::E1000e);
    assert_eq!(got[2].3, "Mgmt");
    // PCNet32 (vlance) becomes e1000, and the missing MAC is generated stably.
    assert_eq!(got[3].1, NicModel::E1000);
    assert!(got[3].2.starts_with("00:50:56:"));
    assert_eq!(got[3].2, ovf_app("many-devices.ovf").vms[0].nics[3].mac);
    for needle in [
        "\"pcnet32\" has no equivalent; using e1000",
        "no MAC in the descriptor; assigned 00:50:56:",
        "Floppy drive 1 (floppy drive) has no equivalent",
        "USB controller (USB controller) has no equivalent",
        "Sound card (sound card) has no equivalent",
        "Serial port 1 is the VM's console: COM1 (ttyS0) goes to the hvx console",
        "CD/DVD drive 1 (CD/DVD drive)",
    ] {
        assert!(has_warning(&app, needle), "{needle}: {:?}", app.warnings);
    }
}

#[test]
fn efi_windows_with_nvme_and_explicit_identity() {
    let app = ovf_app("efi-windows.ovf");
    let vm = &app.vms[0];
    assert_eq!(vm.firmware, Firmware::Efi);
    assert_eq!((vm.cpus, vm.sockets, vm.cores_per_socket), (8, 2, 4));
    assert_eq!(vm.memory_mib, 16384);
    assert_eq!(
        vm.uuid.as_deref(),
        Some("564d8e2a-31f4-7c10-9b2e-1f0a55c3d7e9")
    );
    assert_eq!(
        vm.serial.as_deref(),
        Some("VMware-56 4d 8e 2a 31 f4 7c 10-9b 2e 1f 0a 55 c3 d7 e9")
    );
    // NVMe lands on the SATA bus after the real SATA controller.
    assert_eq!(
        disks(vm),
        [
            (
                "Hard disk 1",
                "win2022-disk1.vmdk",
                ControllerKind::Sata,
                1,
                0,
                Some(1)
            ),
            (
                "Hard disk 2",
                "win2022-disk2.vmdk",
                ControllerKind::Sata,
                1,
                1,
                Some(2)
            ),
        ]
    );
    assert!(has_warning(
        &app,
        "NVMe controller has no equivalent; using SATA bus 1"
    ));
    assert!(has_warning(&app, "secure boot"));
}

#[test]
fn esx_vmx() {
    let app = vmx_app("esx-linux.vmx");
    assert_eq!(app.name, "app-01");
    let vm = &app.vms[0];
    assert_eq!((vm.cpus, vm.sockets, vm.cores_per_socket), (4, 2, 2));
    assert_eq!(vm.memory_mib, 8192);
    assert_eq!(vm.guest_os.as_deref(), Some("rhel9-64"));
    assert_eq!(
        vm.uuid.as_deref(),
        Some("421a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8")
    );
    assert_eq!(
        vm.serial.as_deref(),
        Some("VMware-42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8")
    );
    assert_eq!(
        disks(vm),
        [
            (
                "scsi0-0",
                "app-01.vmdk",
                ControllerKind::Pvscsi,
                0,
                0,
                Some(1)
            ),
            (
                "scsi0-1",
                "app-01_1.vmdk",
                ControllerKind::Pvscsi,
                0,
                1,
                Some(2)
            ),
            (
                "scsi1-2",
                "app-01_2.vmdk",
                ControllerKind::Lsilogic,
                1,
                2,
                Some(3)
            ),
        ]
    );
    let slots: Vec<_> = vm
        .controllers
        .iter()
        .map(|c| (c.kind, c.bus, c.pci_slot_number))
        .collect();
    assert_eq!(
        slots,
        [
            (ControllerKind::Pvscsi, 0, Some(160)),
            (ControllerKind::Lsilogic, 1, Some(224))
        ]
    );
    assert_eq!(
        nics(vm),
        [
            (
                "ethernet0",
                NicModel::Vmxnet3,
                "00:50:56:9a:3c:01",
                "App-PG",
                Some(192),
                true
            ),
            (
                "ethernet1",
                NicModel::Vmxnet3,
                "00:50:56:3f:00:10",
                "Storage-PG",
                Some(1184),
                false
            ),
        ]
    );
    assert_eq!(app.networks, ["App-PG", "Storage-PG"]);
    assert!(has_warning(
        &app,
        "looked for beside the VMX as \"app-01_1.vmdk\""
    ));
    // A host CD drive is not part of the VM.
    assert!(has_warning(
        &app,
        "ide1:0: CD-ROM drive not imported: it holds no image file"
    ));
    assert!(app.vms[0].disks.iter().all(|d| !d.cdrom));
    assert!(has_warning(&app, "scsi1:2: independent-nonpersistent mode"));
}

#[test]
fn workstation_efi_vmx() {
    let app = vmx_app("workstation-efi.vmx");
    let vm = &app.vms[0];
    assert_eq!(vm.console_serial_port.as_deref(), Some("serial0"));
    assert_eq!(vm.name, "Windows Server 2019");
    assert_eq!(vm.firmware, Firmware::Efi);
    assert_eq!((vm.cpus, vm.sockets, vm.cores_per_socket), (6, 2, 3));
    assert_eq!(
        vm.serial.as_deref(),
        Some("VMware-56 4d 77 a8 12 34 56 78-9a bc de f0 01 23 45 67")
    );
    // bios.hddOrder puts sata0:2 first; nvme0 becomes SATA bus 1.
    assert_eq!(
        disks(vm),
        [
            ("sata0-2", "data.vmdk", ControllerKind::Sata, 0, 2, Some(1)),
            (
                "nvme0-0",
                "Windows Server 2019.vmdk",
                ControllerKind::Sata,
                1,
                0,
                Some(2)
            ),
        ]
    );
    let got = nics(vm);
    assert_eq!(
        got[0],
        (
            "ethernet0",
            NicModel::E1000e,
            "00:0c:29:ab:cd:ef",
            "nat",
            None,
            true
        )
    );
    assert_eq!(
        got[1],
        (
            "ethernet1",
            NicModel::E1000,
            "00:0c:29:ab:cd:f9",
            "VMnet2",
            None,
            true
        )
    );
    for needle in [
        "\"vlance\" has no equivalent; using e1000",
        "nvme0: NVMe controller has no equivalent; using SATA bus 1",
        // The ISO lives on the host's C: drive, not beside the VMX.
        "sata0:1: CD-ROM drive not imported: its image \"C:",
        "en_windows_server_2019.iso\" is not an ISO beside the VMX",
        "sound card (sound) has no equivalent",
        "serial0 is the VM's console: COM1 (ttyS0) goes to the hvx console and serial log (VMware sent it to \"thinprint\")",
        "USB controller (usb)",
    ] {
        assert!(has_warning(&app, needle), "{needle}: {:?}", app.warnings);
    }
}

#[test]
fn minimal_valid_ovf_is_accepted() {
    let text = r#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <VirtualSystem ovf:id="tiny">
    <VirtualHardwareSection>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>256</rasd:VirtualQuantity></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;
    let app = ovf::parse(text, "fallback").expect("minimal OVF");
    assert_eq!(app.name, "tiny");
    assert_eq!(app.vms[0].memory_mib, 256);
    assert!(app.vms[0].disks.is_empty());
}

#[test]
fn broken_descriptors_give_clear_errors() {
    let cases = [
        ("<Envelope><VirtualSystem>", "not valid XML"),
        (
            r#"<Envelope><VirtualSystem ovf:id="a" xmlns:ovf="o"><VirtualHardwareSection/></VirtualSystem></Envelope>"#,
            "no CPU item",
        ),
        (
            r#"<Envelope xmlns:ovf="o" xmlns:rasd="r"><VirtualSystem ovf:id="a"><VirtualHardwareSection>
            <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
            <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>256</rasd:VirtualQuantity></Item>
            <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>ovf:/disk/nope</rasd:HostResource></Item>
            </VirtualHardwareSection></VirtualSystem></Envelope>"#,
            "unknown disk \"nope\"",
        ),
        (
            r#"<Envelope xmlns:ovf="o" xmlns:rasd="r"><VirtualSystem ovf:id="a"><VirtualHardwareSection>
            <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>many</rasd:VirtualQuantity></Item>
            </VirtualHardwareSection></VirtualSystem></Envelope>"#,
            "not a number",
        ),
    ];
    for (text, needle) in cases {
        let err = ovf::parse(text, "x").expect_err(needle).to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn broken_vmx_gives_clear_errors() {
    let no_mem = vmx::parse("numvcpus = \"2\"\n").expect("syntax ok");
    let err = vmx_vm::application(&no_mem, "x").expect_err("no memsize");
    assert!(err.to_string().contains("memsize is missing"), "{err}");
    let bad_mac = vmx::parse(
        "memsize = \"512\"\nethernet0.present = \"TRUE\"\nethernet0.address = \"01:00:5e:00:00:01\"\n",
    )
    .expect("syntax ok");
    let err = vmx_vm::application(&bad_mac, "x").expect_err("multicast MAC");
    assert!(err.to_string().contains("not a unicast MAC"), "{err}");
    let traversal = vmx::parse(
        "memsize = \"512\"\nscsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"../../etc/shadow\"\n",
    )
    .expect("syntax ok");
    let err = vmx_vm::application(&traversal, "x").expect_err("traversal");
    assert!(err.to_string().contains("unsafe file name"), "{err}");
}

#[test]
fn ovf2_port_and_storage_items_are_read() {
    let text = r#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData" xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData">
  <References><File ovf:id="f1" ovf:href="root.vmdk"/></References>
  <DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="4" ovf:capacityAllocationUnits="byte * 2^30"/></DiskSection>
  <VirtualSystem ovf:id="v2">
    <VirtualHardwareSection>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType></Item>
      <StorageItem><sasd:ElementName>root</sasd:ElementName><sasd:HostResource>ovf:/disk/d1</sasd:HostResource><sasd:InstanceID>4</sasd:InstanceID><sasd:Parent>3</sasd:Parent><sasd:AddressOnParent>0</sasd:AddressOnParent><sasd:ResourceType>17</sasd:ResourceType></StorageItem>
      <EthernetPortItem><epasd:Address>00:50:56:12:34:56</epasd:Address><epasd:Connection>lan</epasd:Connection><epasd:ElementName>eth</epasd:ElementName><epasd:InstanceID>5</epasd:InstanceID><epasd:ResourceSubType>VmxNet3</epasd:ResourceSubType><epasd:ResourceType>10</epasd:ResourceType></EthernetPortItem>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;
    let app = ovf::parse(text, "x").expect("OVF 2.0");
    let vm = &app.vms[0];
    assert_eq!(vm.memory_mib, 2048);
    assert_eq!(
        disks(vm),
        [("root", "root.vmdk", ControllerKind::Lsilogic, 0, 0, Some(1))]
    );
    assert_eq!(nics(vm)[0].2, "00:50:56:12:34:56");
    assert_eq!(app.networks, ["lan"]);
}

#[test]
fn vmx_iso_beside_the_vmx_is_a_read_only_cdrom_after_the_disks() {
    let text = r#"
displayName = "cd"
memSize = "512"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "cd.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "install.ISO"
ide0:0.present = "TRUE"
ide0:0.deviceType = "atapi-cdrom"
ide0:0.fileName = "auto detect"
"#;
    let vmx = vmx::parse(text).expect("vmx");
    let app = vmx_vm::application(&vmx, "fallback").expect("app");
    let vm = &app.vms[0];
    assert_eq!(
        disks(vm),
        [
            ("scsi0-0", "cd.vmdk", ControllerKind::Pvscsi, 0, 0, Some(1)),
            ("ide1-0", "install.ISO", ControllerKind::Ide, 1, 0, Some(2)),
        ]
    );
    let cdrom: Vec<bool> = vm.disks.iter().map(|d| d.cdrom).collect();
    assert_eq!(cdrom, [false, true]);
    let mut files: Vec<&str> = app.disk_files.iter().map(|f| f.name.as_str()).collect();
    files.sort_unstable();
    assert_eq!(files, ["cd.vmdk", "install.ISO"]);
    assert!(has_warning(
        &app,
        "ide0:0: CD-ROM drive not imported: it holds no image file"
    ));
}
