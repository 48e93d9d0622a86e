//! The built `kubectl-hvx` binary on fixture exports: YAML content, files, exit codes.

use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication, VmMigration};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-hvx");

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../import/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("HVX_UPLOAD_URL")
        .output()
        .expect("run kubectl-hvx")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The YAML stream split into typed objects (deny_unknown_fields makes this strict).
#[derive(Default)]
struct Objects {
    networks: Vec<VirtualNetwork>,
    disks: Vec<OverlayDisk>,
    apps: Vec<VmApplication>,
}

fn objects(yaml: &str) -> Objects {
    let mut out = Objects::default();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc).expect("yaml doc");
        match value["kind"].as_str() {
            Some("VirtualNetwork") => out
                .networks
                .push(serde_yaml::from_value(value).expect("VirtualNetwork")),
            Some("OverlayDisk") => out
                .disks
                .push(serde_yaml::from_value(value).expect("OverlayDisk")),
            Some("VmApplication") => out
                .apps
                .push(serde_yaml::from_value(value).expect("VmApplication")),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    out
}

fn member(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, data).expect("append");
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OVA of the single-VM fixture as ovftool lays it out: ovf, mf, disk.
fn single_vm_ova(dir: &Path, extra: Option<(&str, &[u8])>) -> (PathBuf, String) {
    let ovf = fixture("single-vm.ovf");
    let disk = vec![7u8; 10_000];
    let mf = format!(
        "SHA256(web-01.ovf)= {}\nSHA256(web-01-disk1.vmdk)= {}\n",
        hex(&ovf),
        hex(&disk)
    );
    let mut b = tar::Builder::new(Vec::new());
    member(&mut b, "web-01.ovf", &ovf);
    member(&mut b, "web-01.mf", mf.as_bytes());
    member(&mut b, "web-01-disk1.vmdk", &disk);
    if let Some((name, data)) = extra {
        member(&mut b, name, data);
    }
    let path = dir.join("web-01.ova");
    std::fs::write(&path, b.into_inner().expect("tar")).expect("write");
    (path, hex(&disk))
}

#[test]
fn ova_to_yaml_on_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, digest) = single_vm_ova(dir.path(), None);
    let out = run(&["import", ova.to_str().expect("utf8"), "-n", "lift"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(yaml.starts_with("---\n"));
    let o = objects(&yaml);
    assert_eq!(o.networks.len(), 1);
    assert_eq!(o.networks[0].metadata.name.as_deref(), Some("vm-network"));
    assert_eq!(o.networks[0].metadata.namespace.as_deref(), Some("lift"));
    let dhcp = o.networks[0].spec.subnets[0].dhcp.as_ref().expect("dhcp");
    assert!(dhcp.enabled);
    let [disk] = o.disks.as_slice() else {
        panic!("one disk")
    };
    assert_eq!(disk.metadata.name.as_deref(), Some("web-01-disk1"));
    assert_eq!(disk.spec.checksum, Some(format!("sha256:{digest}")));
    assert_eq!(
        disk.spec.capacity.as_ref().map(|q| q.0.as_str()),
        Some("16Gi")
    );
    assert_eq!(
        disk.spec.source.upload.as_ref().and_then(|u| u.size_bytes),
        Some(10_000)
    );
    let vm = &o.apps[0].spec.vms[0];
    assert_eq!(vm.name, "web-01");
    assert_eq!((vm.cpu.sockets, vm.cpu.cores_per_socket), (2, 2));
    assert_eq!(vm.memory_mib, 4096);
    let id = vm.identity.as_ref().expect("identity");
    assert_eq!(
        id.uuid.as_deref(),
        Some("421a6c3e-0b7d-5f21-9a0c-44d1e2f3a4b5")
    );
    assert_eq!(vm.nics[0].mac_address, "00:50:56:8a:1b:2c");
    assert_eq!(vm.nics[0].network.name, "vm-network");
    assert_eq!(vm.disks[0].overlay_disk.name, "web-01-disk1");
    assert_eq!(vm.disks[0].controller, hvx_api::ControllerType::Pvscsi);
    // The CD-ROM has no equivalent: reported on stderr and in the manifest.
    assert!(text(&out.stderr).contains("CD/DVD drive 1 (CD/DVD drive) has no equivalent"));
    assert!(yaml.contains("# warning: web-01: CD/DVD drive 1"));
}

#[test]
fn output_dir_gets_one_file_per_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, _) = single_vm_ova(dir.path(), None);
    let out_dir = dir.path().join("out");
    let out = run(&[
        "import",
        ova.to_str().expect("utf8"),
        "-o",
        out_dir.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "overlaydisk-web-01-disk1.yaml",
            "virtualnetwork-vm-network.yaml",
            "vmapplication-web-01.yaml"
        ]
    );
    let app = std::fs::read_to_string(out_dir.join("vmapplication-web-01.yaml")).expect("read");
    let app: VmApplication = serde_yaml::from_str(&app).expect("typed");
    assert_eq!(app.spec.vms.len(), 1);
}

#[test]
fn multi_vm_ovf_with_disks_beside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ovf = dir.path().join("shop.ovf");
    std::fs::write(&ovf, fixture("vapp-collection.ovf")).expect("write");
    for f in ["shop-db-1.vmdk", "shop-db-2.vmdk", "shop-web-1.vmdk"] {
        std::fs::write(dir.path().join(f), b"KDMV....").expect("write");
    }
    let out = run(&[
        "import",
        ovf.to_str().expect("utf8"),
        "--subnet",
        "Backend=10.20.0.0/24",
        "--source-url",
        "https://files.example/shop",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = objects(&text(&out.stdout));
    assert_eq!(o.apps.len(), 1, "a collection is one application");
    let app = &o.apps[0];
    assert_eq!(app.metadata.name.as_deref(), Some("shop"));
    let names: Vec<&str> = app.spec.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["shop-db", "shop-web"]);
    assert_eq!(app.spec.vms[1].depends_on, Some(vec!["shop-db".to_owned()]));
    let backend = o
        .networks
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("backend"))
        .expect("backend");
    assert_eq!(backend.spec.subnets[0].cidr, "10.20.0.0/24");
    let urls: Vec<&str> = o
        .disks
        .iter()
        .filter_map(|d| d.spec.source.http.as_ref().map(|h| h.url.as_str()))
        .collect();
    assert_eq!(
        urls,
        [
            "https://files.example/shop/shop-db-1.vmdk",
            "https://files.example/shop/shop-db-2.vmdk",
            "https://files.example/shop/shop-web-1.vmdk"
        ]
    );
}

#[test]
fn vmx_with_disks_beside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vmx = dir.path().join("app-01.vmx");
    std::fs::write(&vmx, fixture("esx-linux.vmx")).expect("write");
    // ESX layout for the boot disk: a descriptor plus its flat extent.
    let descriptor = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 20971520 VMFS \"app-01-flat.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n";
    std::fs::write(dir.path().join("app-01.vmdk"), descriptor).expect("write");
    std::fs::write(dir.path().join("app-01-flat.vmdk"), vec![0u8; 8192]).expect("write");
    // Workstation layout for the others: hosted sparse with the capacity in the header.
    let mut sparse = vec![0u8; 1024];
    sparse[..4].copy_from_slice(b"KDMV");
    sparse[12..20].copy_from_slice(&(4u64 << 21).to_le_bytes());
    for f in ["app-01_1.vmdk", "app-01_2.vmdk"] {
        std::fs::write(dir.path().join(f), &sparse).expect("write");
    }
    let out = run(&["import", vmx.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = objects(&text(&out.stdout));
    let boot = &o.disks[0];
    assert_eq!(boot.metadata.name.as_deref(), Some("app-01-flat"));
    assert_eq!(boot.spec.format, hvx_api::DiskFormat::Raw);
    assert_eq!(
        boot.spec.capacity.as_ref().map(|q| q.0.as_str()),
        Some("10Gi")
    );
    assert_eq!(o.disks[1].spec.format, hvx_api::DiskFormat::Vmdk);
    assert_eq!(
        o.disks[1].spec.capacity.as_ref().map(|q| q.0.as_str()),
        Some("4Gi")
    );
    assert!(text(&out.stderr).contains("app-01.vmdk is a VMDK descriptor; its flat extent app-01-flat.vmdk is imported as a raw image"));
    let vm = &o.apps[0].spec.vms[0];
    assert_eq!(vm.name, "app-01");
    assert_eq!(vm.disks[0].overlay_disk.name, "app-01-flat");
    assert_eq!(vm.disks.len(), 3);
    assert_eq!(vm.disks[2].controller, hvx_api::ControllerType::Lsilogic);
    assert_eq!((vm.disks[2].bus, vm.disks[2].unit), (1, 2));
    assert_eq!(vm.nics[1].mac_address, "00:50:56:3f:00:10");
    assert!(!vm.nics[1].connected);
    // VMware slots 160 (scsi0) < 192 (ethernet0) < 224 (scsi1) < 1184 (ethernet1).
    let controllers = vm.controllers.as_ref().expect("controllers");
    assert_eq!(controllers[0].pci_slot, Some(16));
    assert_eq!(vm.nics[0].pci_slot, Some(17));
    assert_eq!(controllers[1].pci_slot, Some(18));
    assert_eq!(vm.nics[1].pci_slot, Some(19));
    // The slot numbers themselves are kept: Linux in the guest names the NICs
    // ens192 and ens1184 as on VMware.
    assert_eq!(controllers[0].pci_slot_number, Some(160));
    assert_eq!(vm.nics[0].pci_slot_number, Some(192));
    assert_eq!(controllers[1].pci_slot_number, Some(224));
    assert_eq!(vm.nics[1].pci_slot_number, Some(1184));
    assert!(
        !text(&out.stderr).contains("was in VMware PCI slot"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn efi_and_nvme_map_with_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ovf = dir.path().join("win.ovf");
    std::fs::write(&ovf, fixture("efi-windows.ovf")).expect("write");
    for f in ["win2022-disk1.vmdk", "win2022-disk2.vmdk"] {
        std::fs::write(dir.path().join(f), b"KDMV").expect("write");
    }
    let out = run(&["import", ovf.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = objects(&text(&out.stdout));
    let vm = &o.apps[0].spec.vms[0];
    assert_eq!(vm.name, "win2022-ad01");
    assert_eq!(vm.firmware, hvx_api::Firmware::Efi);
    assert_eq!(vm.disks[0].controller, hvx_api::ControllerType::Sata);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("NVMe controller has no equivalent; using SATA bus 1"));
    assert!(stderr.contains("VM \"WIN2022-AD01\" is named win2022-ad01"));
}

#[test]
fn dry_run_prints_the_plan_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, _) = single_vm_ova(dir.path(), None);
    let out = run(&[
        "import",
        ova.to_str().expect("utf8"),
        "--dry-run",
        "--upload",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    assert!(plan.contains("VM web-01: 4 vCPU (2 sockets x 2 cores), 4096 MiB, Bios"));
    assert!(plan.contains(
        "OverlayDisk web-01-disk1: web-01-disk1.vmdk (9.8 KiB, capacity 16Gi), uploaded"
    ));
    assert!(plan.contains("Manifest: 2 member(s) verified"));
    assert!(plan.contains("warning: web-01: CD/DVD drive 1"));
    assert!(!plan.contains("apiVersion"));
}

fn assert_fails(args: &[&str], needle: &str) {
    let out = run(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    assert!(out.stdout.is_empty(), "nothing on stdout when failing");
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();

    std::fs::write(p("broken.ovf"), b"<Envelope><VirtualSystem>").expect("write");
    assert_fails(&["import", &p("broken.ovf")], "not valid XML");

    let (evil, _) = single_vm_ova(dir.path(), Some(("../../etc/evil", b"x")));
    assert_fails(
        &["import", evil.to_str().expect("utf8")],
        "not a plain file name",
    );

    std::fs::write(p("big.ovf"), vec![b' '; 16 * 1024 * 1024 + 1]).expect("write");
    assert_fails(&["import", &p("big.ovf")], "more than the limit");

    std::fs::write(p("lonely.ovf"), fixture("single-vm.ovf")).expect("write");
    assert_fails(
        &["import", &p("lonely.ovf")],
        "disk file \"web-01-disk1.vmdk\"",
    );

    std::fs::write(p("notes.txt"), b"hello").expect("write");
    assert_fails(&["import", &p("notes.txt")], "not an OVA, OVF or VMX");

    assert_fails(&["import", &p("absent.ova")], "cannot read");

    std::fs::write(p("x.vmx"), b"memsize = \"512\"\nthis is not vmx\n").expect("write");
    assert_fails(&["import", &p("x.vmx")], "VMX line 2");

    // A descriptor whose extent escapes the directory is refused, not followed.
    std::fs::write(
        p("esc.vmx"),
        b"memsize = \"512\"\nscsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"esc.vmdk\"\n",
    )
    .expect("write");
    std::fs::write(
        p("esc.vmdk"),
        b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"../../etc/shadow\" 0\n",
    )
    .expect("write");
    assert_fails(&["import", &p("esc.vmx")], "is not a plain file name");
}

#[test]
fn upload_without_a_cluster_fails_cleanly() {
    // Without --upload-url the disks go through the API server: no kubeconfig, a
    // clear error and exit 1, before anything is created.
    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, _) = single_vm_ova(dir.path(), None);
    let out = Command::new(BIN)
        .args(["import", ova.to_str().expect("utf8"), "--upload"])
        .env_remove("HVX_UPLOAD_URL")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env("HOME", dir.path())
        .output()
        .expect("run kubectl-hvx");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("kubeconfig"), "{stderr}");
}

#[test]
fn upload_with_a_client_certificate_kubeconfig_says_what_is_needed() {
    // The endpoint authenticates a bearer token; a certificate cannot be forwarded.
    // The error comes before anything is applied (the server is unreachable anyway).
    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, _) = single_vm_ova(dir.path(), None);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:9\"}}]\n\
         users: [{name: cert-user, user: {client-certificate-data: eA==, client-key-data: eA==}}]\n\
         contexts: [{name: c, context: {cluster: c, user: cert-user}}]\ncurrent-context: c\n",
    )
    .expect("kubeconfig");
    let out = Command::new(BIN)
        .args(["import", ova.to_str().expect("utf8"), "--upload"])
        .env_remove("HVX_UPLOAD_URL")
        .env_remove("HVX_UPLOAD_TOKEN")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path())
        .output()
        .expect("run kubectl-hvx");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("client certificate"), "{stderr}");
    assert!(stderr.contains("\"cert-user\""), "{stderr}");
    assert!(stderr.contains("--upload-token"), "{stderr}");
}

#[test]
fn migrate_print_renders_a_vm_migration() {
    let out = run(&[
        "migrate", "shop-db", "--app", "shop", "--to", "node-b", "--print", "-n", "prod",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m: VmMigration = serde_yaml::from_str(&text(&out.stdout)).expect("typed");
    assert_eq!(m.spec.application, "shop");
    assert_eq!(m.spec.vm, "shop-db");
    assert_eq!(m.spec.target_node.as_deref(), Some("node-b"));
    assert_eq!(m.metadata.generate_name.as_deref(), Some("shop-shop-db-"));
}

fn corpus(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../import/tests/corpus/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A corpus OVF in a fresh directory with (fake) disk files beside it.
fn corpus_dir(name: &str, disks: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ovf = dir.path().join(name);
    std::fs::write(&ovf, corpus(name)).expect("write");
    for f in disks {
        std::fs::write(dir.path().join(f), b"KDMV....").expect("write");
    }
    (dir, ovf)
}

#[test]
fn appliance_blank_disks_become_blank_overlay_disks_sized_by_the_option() {
    let (_dir, ovf) = corpus_dir(
        "appliance-options.ovf",
        &["appliance-system.vmdk", "appliance-tools.iso"],
    );
    let ovf = ovf.to_str().expect("utf8");
    let out = run(&["import", ovf, "--deployment-option", "large"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = objects(&text(&out.stdout));
    let vm = &o.apps[0].spec.vms[0];
    assert_eq!((vm.cpu.sockets, vm.cpu.cores_per_socket), (2, 8));
    assert_eq!(vm.memory_mib, 37 << 10);
    let blank: Vec<(&str, &str)> = o
        .disks
        .iter()
        .filter(|d| d.spec.source.blank.is_some())
        .map(|d| {
            (
                d.metadata.name.as_deref().unwrap_or(""),
                d.spec.capacity.as_ref().map_or("", |q| q.0.as_str()),
            )
        })
        .collect();
    assert_eq!(
        blank,
        [
            ("mgmt-appliance-data", "100Gi"),
            ("mgmt-appliance-logs", "10Gi")
        ]
    );
    assert!(
        o.disks
            .iter()
            .all(|d| d.spec.checksum.is_none() || d.spec.source.blank.is_none())
    );
    let refs: Vec<&str> = vm
        .disks
        .iter()
        .map(|d| d.overlay_disk.name.as_str())
        .collect();
    assert_eq!(
        refs,
        [
            "mgmt-appliance-appliance-system",
            "mgmt-appliance-data",
            "mgmt-appliance-logs",
            "mgmt-appliance-appliance-tools"
        ]
    );
    // The shipped ISO is a read-only CD-ROM at the drive's SATA address.
    let cd = &vm.disks[3];
    assert!(cd.cdrom && cd.read_only, "{cd:?}");
    assert_eq!(
        (cd.controller, cd.bus, cd.unit),
        (hvx_api::ControllerType::Sata, 0, 0)
    );
    assert!(vm.disks[..3].iter().all(|d| !d.cdrom && !d.read_only));
    // No IDE disks: VMware's slot numbers are kept, so the NICs keep their names.
    let numbers: Vec<Option<u16>> = vm.nics.iter().map(|n| n.pci_slot_number).collect();
    assert_eq!(numbers, [Some(192), Some(224)]);
    // The default option without the flag.
    let out = run(&["import", ovf]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        objects(&text(&out.stdout)).apps[0].spec.vms[0].memory_mib,
        19 << 10
    );
    assert!(text(&out.stderr).contains("deployment option \"small\" (the export's default)"));
    assert_fails(
        &["import", ovf, "--deployment-option", "huge"],
        "deployment option \"huge\" is not in the export (it has: tiny, small, large)",
    );
}

#[test]
fn vcloud_vapp_networks_static_ips_and_start_order() {
    let (_dir, ovf) = corpus_dir(
        "vcd-vapp.ovf",
        &[
            "vm-db-disk1.vmdk",
            "vm-app1-disk1.vmdk",
            "vm-app2-disk1.vmdk",
        ],
    );
    let out = run(&["import", ovf.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("subnet is not in the export"), "{stderr}");
    let o = objects(&text(&out.stdout));
    let names: Vec<&str> = o
        .networks
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    assert_eq!(
        names,
        ["web-net", "db-net"],
        "no VirtualNetwork for spare-net"
    );
    let web = &o.networks[0].spec;
    let subnet = &web.subnets[0];
    assert_eq!(subnet.cidr, "172.16.10.0/24");
    assert_eq!(subnet.gateway.as_deref(), Some("172.16.10.1"));
    let dhcp = subnet.dhcp.as_ref().expect("dhcp");
    assert!(dhcp.enabled);
    assert_eq!(dhcp.range_start.as_deref(), Some("172.16.10.100"));
    assert_eq!(dhcp.range_end.as_deref(), Some("172.16.10.199"));
    assert_eq!(dhcp.lease_seconds, 7200);
    let dns = web.dns.as_ref().expect("dns");
    assert_eq!(dns.domain.as_deref(), Some("shop.example"));
    assert_eq!(dns.upstreams, Some(vec!["10.0.0.53".to_owned()]));
    let db_net = &o.networks[1].spec.subnets[0];
    assert_eq!(db_net.cidr, "10.44.0.0/22");
    assert!(!db_net.dhcp.as_ref().is_some_and(|d| d.enabled));

    let app = &o.apps[0];
    let vm = |n: &str| {
        app.spec
            .vms
            .iter()
            .find(|v| v.name == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    let ips: Vec<(&str, &str, Option<&str>)> = vm("db")
        .nics
        .iter()
        .map(|n| {
            (
                n.mac_address.as_str(),
                n.network.name.as_str(),
                n.ip_address.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        ips,
        [
            ("00:50:56:01:01:01", "web-net", Some("172.16.10.5")),
            ("00:50:56:01:01:02", "db-net", Some("10.44.0.10")),
        ]
    );
    assert_eq!(vm("app1").depends_on, Some(vec!["db".to_owned()]));
    assert_eq!(vm("app2").depends_on, Some(vec!["app1".to_owned()]));
    assert_eq!(vm("app2").start_delay_seconds, Some(30));
    assert_eq!(vm("app1").start_delay_seconds, None);
    assert_eq!(vm("app2").run_strategy, hvx_api::RunStrategy::Halted);
    assert_eq!(vm("db").run_strategy, hvx_api::RunStrategy::Always);
}

#[test]
fn all_problems_are_reported_in_one_error() {
    // Memory below the minimum, in two VMs: both named.
    let (_dir, ovf) = corpus_dir("small-vms.ovf", &[]);
    let out = run(&["import", ovf.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("t1: 8 MiB of memory is below the minimum"),
        "{err}"
    );
    assert!(
        err.contains("t2: 4 MiB of memory is below the minimum"),
        "{err}"
    );
    // Descriptor problems, all of them.
    let (_dir, ovf) = corpus_dir("problems.ovf", &[]);
    let out = run(&["import", ovf.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("the export has 6 problems"),
        "{}",
        text(&out.stderr)
    );
    // Every missing disk file, not just the first.
    let (_dir, ovf) = corpus_dir("vcd-vapp.ovf", &["vm-app1-disk1.vmdk"]);
    let out = run(&["import", ovf.to_str().expect("utf8")]);
    let err = text(&out.stderr);
    assert!(err.contains("the export has 2 problems"), "{err}");
    assert!(
        err.contains("\"vm-db-disk1.vmdk\"") && err.contains("\"vm-app2-disk1.vmdk\""),
        "{err}"
    );
}

#[test]
fn appliance_ova_uploads_its_disk_and_iso_but_no_blank_disk() {
    // A VMware appliance OVA: descriptor, manifest, system disk, NVRAM and ISO.
    let dir = tempfile::tempdir().expect("tempdir");
    let ovf = corpus("appliance-options.ovf");
    let disk = vec![9u8; 4096];
    let mf = format!(
        "SHA256(appliance.ovf)= {}\nSHA256(appliance-system.vmdk)= {}\n",
        hex(&ovf),
        hex(&disk)
    );
    let mut b = tar::Builder::new(Vec::new());
    member(&mut b, "appliance.ovf", &ovf);
    member(&mut b, "appliance.mf", mf.as_bytes());
    member(&mut b, "appliance-system.vmdk", &disk);
    member(&mut b, "appliance.nvram", b"nvram");
    member(&mut b, "appliance-tools.iso", b"iso");
    let ova = dir.path().join("appliance.ova");
    std::fs::write(&ova, b.into_inner().expect("tar")).expect("write");
    let out = run(&[
        "import",
        ova.to_str().expect("utf8"),
        "--dry-run",
        "--upload",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    assert!(plan.contains("Deployment option: small"), "{plan}");
    assert!(
        plan.contains("OverlayDisk mgmt-appliance-data: blank, capacity 100Gi"),
        "{plan}"
    );
    assert!(plan.contains("Upload: 4.0 KiB in 2 disk(s)"), "{plan}");
    assert!(
        plan.contains(
            "disk cd-dvd-drive-1: Sata 0:0 boot=4 -> OverlayDisk mgmt-appliance-appliance-tools"
        ),
        "{plan}"
    );
    let out = run(&["import", ova.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = objects(&text(&out.stdout));
    let sources: Vec<(bool, bool)> = o
        .disks
        .iter()
        .map(|d| {
            (
                d.spec.source.upload.is_some(),
                d.spec.source.blank.is_some(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [(true, false), (true, false), (false, true), (false, true)]
    );
    assert_eq!(
        o.disks[1].metadata.name.as_deref(),
        Some("mgmt-appliance-appliance-system")
    );
    assert_eq!(
        o.disks[1].spec.checksum,
        Some(format!("sha256:{}", hex(&disk)))
    );
}

/// `--source-url` with an OVA: each disk is an `ova` source naming the archive's URL
/// and the disk's member, as the node agent imports it (a plain member name, an http
/// URL: what the CRD's CEL rules require), with the member's digest as checksum.
#[test]
fn ova_served_by_url_becomes_ova_sources_the_crd_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, digest) = single_vm_ova(dir.path(), None);
    let url = "https://files.example/exports/web-01.ova";
    let out = run(&[
        "import",
        ova.to_str().expect("utf8"),
        "-n",
        "lift",
        "--source-url",
        url,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = objects(&text(&out.stdout));
    let [disk] = o.disks.as_slice() else {
        panic!("one disk")
    };
    let src = &disk.spec.source;
    let ova_src = src.ova.as_ref().expect("an ova source");
    assert_eq!(ova_src.url.as_deref(), Some(url));
    assert_eq!(ova_src.member, "web-01-disk1.vmdk");
    assert!(
        src.http.is_none() && src.pvc.is_none() && src.upload.is_none() && src.clone.is_none(),
        "exactly one source: {src:?}"
    );
    assert_eq!(disk.spec.checksum, Some(format!("sha256:{digest}")));
}
