//! The fidelity corpus (`tests/corpus/`, written from DSP0243 and VMware's documented
//! extensions): each case maps as VMware would deploy it, and every export either
//! imports or fails with one error naming all of its problems.

use hvx_import::model::{ControllerKind, Firmware, ImportedApplication, ImportedVm, NicModel};
use hvx_import::ovf::{self, OvfOptions};
use hvx_import::{BLANK_PREFIX, ImportError};

fn corpus(name: &str) -> String {
    let path = format!("{}/tests/corpus/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse(name: &str, option: Option<&str>) -> Result<ImportedApplication, ImportError> {
    let options = OvfOptions {
        deployment_option: option.map(str::to_owned),
    };
    ovf::parse_with(&corpus(name), "fallback", &options)
}

fn app(name: &str) -> ImportedApplication {
    parse(name, None).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn vm<'a>(app: &'a ImportedApplication, name: &str) -> &'a ImportedVm {
    app.vms
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no VM {name} in {:?}", app.vms))
}

fn warned(app: &ImportedApplication, needle: &str) -> bool {
    app.warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn appliance_gets_its_default_deployment_option() {
    let app = app("appliance-options.ovf");
    assert_eq!(app.deployment_option.as_deref(), Some("small"));
    let vm = vm(&app, "mgmt-appliance");
    // The "small" items, not the first ones in the file ("tiny").
    assert_eq!((vm.cpus, vm.sockets, vm.cores_per_socket), (4, 2, 2));
    assert_eq!(vm.memory_mib, 19 << 10);
    assert!(warned(
        &app,
        "deployment option \"small\" (the export's default) sizes the VMs; the export also offers tiny, large"
    ));
}

#[test]
fn appliance_deployment_option_can_be_chosen() {
    let large = parse("appliance-options.ovf", Some("large")).expect("large");
    let vm = &large.vms[0];
    assert_eq!((vm.cpus, vm.sockets, vm.cores_per_socket), (16, 2, 8));
    assert_eq!(vm.memory_mib, 37 << 10);
    // An item may name several options: the second NIC is in small and large only.
    assert_eq!(vm.nics.len(), 2);
    assert_eq!(vm.nics[1].mac, "00:50:56:aa:00:02");
    let tiny = parse("appliance-options.ovf", Some("tiny")).expect("tiny");
    assert_eq!((tiny.vms[0].cpus, tiny.vms[0].memory_mib), (2, 12288));
    assert_eq!(tiny.vms[0].nics.len(), 1);
    assert!(warned(&tiny, "deployment option \"tiny\" (as asked)"));
    let e = parse("appliance-options.ovf", Some("huge")).expect_err("unknown option");
    assert_eq!(
        e.to_string(),
        "OVF descriptor: deployment option \"huge\" is not in the export (it has: tiny, small, large)"
    );
    let e = parse("nic-order.ovf", Some("small")).expect_err("no options");
    assert!(e.to_string().contains("declares none"), "{e}");
}

#[test]
fn appliance_blank_disks_have_their_declared_capacity() {
    let app = app("appliance-options.ovf");
    let vm = &app.vms[0];
    let rows: Vec<(&str, &str, bool, Option<u64>, u8)> = vm
        .disks
        .iter()
        .map(|d| {
            (
                d.name.as_str(),
                d.file.as_str(),
                d.blank,
                d.capacity_bytes,
                d.unit,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "Hard disk 1",
                "appliance-system.vmdk",
                false,
                Some(48 << 30),
                0
            ),
            ("Hard disk 2", "blank:data", true, Some(100 << 30), 1),
            ("Hard disk 3", "blank:logs", true, Some(10 << 30), 2),
            // The shipped ISO in the SATA CD/DVD drive is a read-only CD-ROM.
            ("CD/DVD drive 1", "appliance-tools.iso", false, None, 0),
        ]
    );
    let cd = &vm.disks[3];
    assert!(cd.cdrom && !vm.disks[..3].iter().any(|d| d.cdrom));
    assert_eq!((cd.controller, cd.bus), (ControllerKind::Sata, 0));
    assert!(vm.disks[1].file.starts_with(BLANK_PREFIX));
    assert!(
        vm.disks[..3]
            .iter()
            .all(|d| d.controller == ControllerKind::Pvscsi)
    );
    // Only the real image and the ISO are files to upload.
    let mut files: Vec<&str> = app.disk_files.iter().map(|f| f.name.as_str()).collect();
    files.sort_unstable();
    assert_eq!(files, ["appliance-system.vmdk", "appliance-tools.iso"]);
}

#[test]
fn appliance_losses_are_all_reported() {
    let app = app("appliance-options.ovf");
    let vm = &app.vms[0];
    assert_eq!(vm.firmware, Firmware::Efi);
    assert_eq!(vm.nics.len(), 2);
    assert_eq!(vm.nics[0].pci_slot_number, Some(192));
    assert_eq!(vm.nics[1].pci_slot_number, Some(224));
    for needle in [
        "mgmt-appliance: nested hardware virtualisation (nestedHVEnabled) is not exposed",
        "mgmt-appliance: the EFI NVRAM \"appliance.nvram\"",
        "mgmt-appliance: 2 vApp properties (ProductSection) are not delivered",
        "mgmt-appliance: ExtraConfig guestinfo.cis.appliance.net.mode, disk.EnableUUID are not carried",
    ] {
        assert!(warned(&app, needle), "{needle}: {:?}", app.warnings);
    }
    // The NVRAM and ISO files are named above, so no "file used by no VM" for them;
    // display tuning (svga.autodetect) is not worth a warning.
    assert!(!warned(&app, "used by no VM disk"), "{:?}", app.warnings);
    assert!(!warned(&app, "svga"), "{:?}", app.warnings);
    assert!(!warned(&app, "appliance-tools.iso"), "{:?}", app.warnings);
}

#[test]
fn iso_media_become_cdroms_and_the_first_serial_port_the_console() {
    let app = app("media-serial.ovf");
    let vm = vm(&app, "build-01");
    let rows: Vec<(&str, &str, bool, ControllerKind, u8, u8)> = vm
        .disks
        .iter()
        .map(|d| {
            (
                d.name.as_str(),
                d.file.as_str(),
                d.cdrom,
                d.controller,
                d.bus,
                d.unit,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "Hard disk 1",
                "build-01-disk1.vmdk",
                false,
                ControllerKind::Pvscsi,
                0,
                0
            ),
            // At VMware's address (disks are listed by address): SATA port 1 (".ISO"
            // counts), IDE secondary master.
            (
                "CD/DVD drive 2",
                "VMware-tools-windows.ISO",
                true,
                ControllerKind::Sata,
                0,
                1
            ),
            (
                "CD/DVD drive 1",
                "build-01-file1.iso",
                true,
                ControllerKind::Ide,
                1,
                0
            ),
        ]
    );
    // Hard disk first, CD-ROMs after it (VMware's default BIOS order).
    let boot: Vec<Option<u32>> = vm.disks.iter().map(|d| d.boot_order).collect();
    assert_eq!(boot, [Some(1), Some(2), Some(3)]);
    assert_eq!(
        vm.boot_order,
        ["Hard disk 1", "CD/DVD drive 2", "CD/DVD drive 1"]
    );
    let mut files: Vec<&str> = app.disk_files.iter().map(|f| f.name.as_str()).collect();
    files.sort_unstable();
    assert_eq!(
        files,
        [
            "VMware-tools-windows.ISO",
            "build-01-disk1.vmdk",
            "build-01-file1.iso"
        ]
    );
    assert_eq!(vm.console_serial_port.as_deref(), Some("Serial port 1"));
    for needle in [
        // An empty drive and a drive with a floppy-style image are not CD-ROMs.
        "build-01: CD/DVD drive 3 (CD/DVD drive) has no equivalent; not imported",
        "build-01: CD/DVD drive 4 (CD/DVD drive) with image \"build-01-file2.img\" shipped in the export has no equivalent",
        "build-01: Serial port 1 is the VM's console: COM1 (ttyS0) goes to the hvx console and serial log (VMware sent it to \"telnet://:7001\")",
        "build-01: Serial port 2 (serial port (hvx gives a VM one, its console)) has no equivalent; not imported",
    ] {
        assert!(warned(&app, needle), "{needle}: {:#?}", app.warnings);
    }
    assert!(!warned(&app, "CD/DVD drive 1"), "{:#?}", app.warnings);
}

#[test]
fn vcloud_networks_carry_subnets_gateways_dhcp_and_static_ips() {
    let app = app("vcd-vapp.ovf");
    assert_eq!(app.name, "shop");
    // spare-net has a config but no VM: no network, and a warning.
    assert_eq!(app.networks, ["web-net", "db-net"]);
    assert!(warned(
        &app,
        "network \"spare-net\" is declared but no VM is connected"
    ));
    let web = app
        .network_configs
        .iter()
        .find(|c| c.name == "web-net")
        .expect("web-net");
    assert_eq!(web.cidr.as_deref(), Some("172.16.10.0/24"));
    assert_eq!(web.gateway.as_deref(), Some("172.16.10.1"));
    assert_eq!(web.dns_suffix.as_deref(), Some("shop.example"));
    assert_eq!(web.dns_servers, ["172.16.10.1", "10.0.0.53"]);
    assert_eq!(
        web.dhcp_range,
        Some(("172.16.10.100".into(), "172.16.10.199".into()))
    );
    assert_eq!(web.dhcp_lease_seconds, Some(7200));
    assert_eq!(
        web.static_ranges,
        [("172.16.10.20".to_string(), "172.16.10.49".to_string())]
    );
    let db_net = app
        .network_configs
        .iter()
        .find(|c| c.name == "db-net")
        .expect("db-net");
    assert_eq!(db_net.cidr.as_deref(), Some("10.44.0.0/22"));
    assert_eq!(db_net.dhcp_range, None);

    // NICs in adapter order (the file lists adapter 1 first), with their static IPs.
    let db = vm(&app, "db");
    let nics: Vec<(&str, &str, &str, Option<&str>)> = db
        .nics
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.mac.as_str(),
                n.network.as_str(),
                n.ip_address.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        nics,
        [
            (
                "ethernet0",
                "00:50:56:01:01:01",
                "web-net",
                Some("172.16.10.5")
            ),
            (
                "ethernet1",
                "00:50:56:01:01:02",
                "db-net",
                Some("10.44.0.10")
            ),
        ]
    );
    assert_eq!(db.nics[0].model, NicModel::Vmxnet3);
    // DHCP allocation: no fixed address; POOL: the address vCloud gave it.
    assert_eq!(vm(&app, "app1").nics[0].ip_address, None);
    assert_eq!(
        vm(&app, "app2").nics[0].ip_address.as_deref(),
        Some("172.16.10.21")
    );
    assert!(warned(&app, "db: vCloud guest customization is not run"));
}

#[test]
fn vcloud_nested_start_order_and_start_actions() {
    let app = app("vcd-vapp.ovf");
    let deps = |n: &str| vm(&app, n).depends_on.clone();
    assert!(deps("db").is_empty());
    // The child vApp starts after db; inside it app1 (order 0) precedes app2.
    assert_eq!(deps("app1"), ["db"]);
    assert_eq!(deps("app2"), ["app1"]);
    assert!(vm(&app, "app2").stays_off, "startAction none");
    assert!(!vm(&app, "app1").stays_off);
    assert!(warned(&app, "app2: the vApp does not power it on"));
    assert!(warned(
        &app,
        "db: vSphere waited for its guest (VMware Tools)"
    ));
    assert_eq!(vm(&app, "app2").start_delay_seconds, Some(30));
    assert_eq!(
        vm(&app, "app1").start_delay_seconds,
        None,
        "db's delay is 0"
    );
}

#[test]
fn vcenter_nested_start_order_with_delays() {
    let app = app("nested-start.ovf");
    assert_eq!(app.name, "store");
    let deps = |n: &str| vm(&app, n).depends_on.clone();
    assert!(deps("db").is_empty());
    assert_eq!(deps("app1"), ["db"]);
    assert_eq!(deps("app2"), ["app1"]);
    // lb waits for the whole app tier: for its last group, which waits for the rest.
    assert_eq!(deps("lb"), ["app2"]);
    // Each VM waits its previous group's start delay: app1 the 120 s after db, app2
    // the 10 s after app1, lb the app tier's 60 s; db waits for nothing.
    let delay = |n: &str| vm(&app, n).start_delay_seconds;
    assert_eq!(
        [delay("db"), delay("app1"), delay("app2"), delay("lb")],
        [None, Some(120), Some(10), Some(60)]
    );
    assert!(
        warned(
            &app,
            "db: vSphere started the next start group once its guest (VMware Tools) was ready, at most 120 s; hvx waits the full 120 s"
        ),
        "{:?}",
        app.warnings
    );
    assert!(
        warned(
            &app,
            "start order: \"decommissioned\" is not a VM or vApp of \"store\"; its entry is ignored"
        ),
        "{:?}",
        app.warnings
    );
    assert!(
        !warned(&app, "s after starting it"),
        "delays are carried: {:?}",
        app.warnings
    );
}

#[test]
fn nics_are_numbered_by_adapter_not_file_order() {
    let app = app("nic-order.ovf");
    let gw = vm(&app, "gw");
    let nics: Vec<(&str, &str, &str)> = gw
        .nics
        .iter()
        .map(|n| (n.name.as_str(), n.mac.as_str(), n.network.as_str()))
        .collect();
    assert_eq!(
        nics,
        [
            ("ethernet0", "00:50:56:03:00:01", "Front"),
            ("ethernet1", "00:50:56:03:00:02", "Back"),
            ("ethernet2", "00:50:56:03:00:03", "Mgmt"),
        ]
    );
    assert_eq!(app.networks, ["Front", "Back", "Mgmt"]);
}

#[test]
fn every_problem_of_an_export_is_reported_at_once() {
    let e = parse("problems.ovf", None).expect_err("broken");
    let ImportError::Problems(list) = &e else {
        panic!("one error listing all problems expected: {e}");
    };
    let text = e.to_string();
    for needle in [
        "File a-disk1.vmdk: size \"12x\" is not a number",
        "Disk d2 references unknown File missing",
        "Disk d3 is blank (no ovf:fileRef) and declares no capacity",
        "a: Network adapter: MAC \"01:00:5e:00:00:01\" is not a unicast MAC address",
        "b: Hard disk 1: HostResource names unknown disk \"nope\"",
        "b: item \"6\" has ResourceType \"ten\", not a number",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert_eq!(list.len(), 6, "{text}");
    assert!(text.starts_with("the export has 6 problems:"), "{text}");
}

#[test]
fn every_corpus_export_imports_or_fails_with_one_error() {
    let dir = format!("{}/tests/corpus", env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("ovf") {
            continue;
        }
        seen += 1;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match parse(name, None) {
            Ok(app) => assert!(!app.vms.is_empty(), "{name}"),
            Err(e) => assert_eq!(name, "problems.ovf", "{name}: {e}"),
        }
    }
    assert_eq!(seen, 7);
}
