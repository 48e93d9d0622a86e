//! Round trip with the storage engineer's exporter: an application exported as an OVA
//! by `hvx_storage::ova` and imported by `kubectl-hvx import` is the same application.

use hvx_api::{ControllerType, NicModel, OverlayDisk, VirtualNetwork, VmApplication};
use hvx_storage::ova::{OvfApp, OvfDisk, OvfNic, OvfVm, render_ovf, write_ova};
use serde::Deserialize;
use std::process::Command;

fn exported_app(dir: &std::path::Path) -> (OvfApp, Vec<(String, std::path::PathBuf)>) {
    let mut files = Vec::new();
    let mut disk = |name: &str, bytes: usize| {
        let path = dir.join(name);
        std::fs::write(&path, vec![0x4b_u8; bytes]).expect("disk");
        files.push((name.to_owned(), path));
        OvfDisk {
            file_name: name.to_owned(),
            file_size: bytes as u64,
            capacity_bytes: 2 << 30,
            controller: String::new(),
        }
    };
    let db_disks = vec![
        OvfDisk {
            controller: "lsilogicsas".into(),
            ..disk("shop-db-0.vmdk", 3000)
        },
        OvfDisk {
            controller: "lsilogicsas".into(),
            ..disk("shop-db-1.vmdk", 2000)
        },
    ];
    let web_disks = vec![OvfDisk {
        controller: "VirtualSCSI".into(),
        ..disk("shop-web-0.vmdk", 1000)
    }];
    let app = OvfApp {
        name: "shop".into(),
        networks: vec!["Frontend".into(), "Backend".into()],
        vms: vec![
            OvfVm {
                name: "db".into(),
                cpus: 4,
                memory_mib: 4096,
                disks: db_disks,
                nics: vec![OvfNic {
                    network: "Backend".into(),
                    model: "E1000".into(),
                    mac: "00:50:56:00:00:0a".into(),
                }],
            },
            OvfVm {
                name: "web".into(),
                cpus: 2,
                memory_mib: 1024,
                disks: web_disks,
                nics: vec![
                    OvfNic {
                        network: "Frontend".into(),
                        model: "VmxNet3".into(),
                        mac: "00:50:56:00:00:14".into(),
                    },
                    OvfNic {
                        network: "Backend".into(),
                        model: "E1000e".into(),
                        mac: "00:50:56:00:00:15".into(),
                    },
                ],
            },
        ],
    };
    (app, files)
}

#[test]
fn storage_export_imports_as_the_same_application() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (exported, files) = exported_app(dir.path());
    let ova = dir.path().join("shop.ova");
    write_ova(&ova, "shop", &render_ovf(&exported), &files).expect("export");

    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-hvx"))
        .args(["import", ova.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("utf8");
    let (mut nets, mut disks, mut apps) = (Vec::new(), Vec::new(), Vec::new());
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let v = serde_yaml::Value::deserialize(doc).expect("doc");
        match v["kind"].as_str() {
            Some("VirtualNetwork") => {
                nets.push(serde_yaml::from_value::<VirtualNetwork>(v).expect("net"))
            }
            Some("OverlayDisk") => {
                disks.push(serde_yaml::from_value::<OverlayDisk>(v).expect("disk"))
            }
            Some("VmApplication") => {
                apps.push(serde_yaml::from_value::<VmApplication>(v).expect("app"))
            }
            other => panic!("{other:?}"),
        }
    }
    let [app] = apps.as_slice() else {
        panic!("one application")
    };
    assert_eq!(app.metadata.name.as_deref(), Some("shop"));
    let net_names: Vec<_> = nets
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(net_names, ["frontend", "backend"]);
    assert_eq!(disks.len(), 3);
    // Every disk carries the exporter's manifest digest and its capacity.
    for d in &disks {
        assert!(
            d.spec
                .checksum
                .as_deref()
                .is_some_and(|c| c.starts_with("sha256:"))
        );
        assert_eq!(d.spec.capacity.as_ref().map(|q| q.0.as_str()), Some("2Gi"));
    }

    assert_eq!(app.spec.vms.len(), exported.vms.len());
    for (vm, src) in app.spec.vms.iter().zip(&exported.vms) {
        assert_eq!(vm.name, src.name);
        assert_eq!(vm.cpu.vcpus(), src.cpus);
        assert_eq!(u64::from(vm.memory_mib), src.memory_mib);
        assert_eq!(vm.disks.len(), src.disks.len());
        for (d, sd) in vm.disks.iter().zip(&src.disks) {
            let want = match sd.controller.as_str() {
                "VirtualSCSI" => ControllerType::Pvscsi,
                "lsilogicsas" => ControllerType::Lsisas,
                other => panic!("{other}"),
            };
            assert_eq!(d.controller, want);
            let od = disks
                .iter()
                .find(|o| o.metadata.name.as_deref() == Some(d.overlay_disk.name.as_str()))
                .expect("referenced OverlayDisk exists");
            assert_eq!(
                od.spec.source.upload.as_ref().and_then(|u| u.size_bytes),
                Some(sd.file_size)
            );
        }
        assert_eq!(vm.nics.len(), src.nics.len());
        for (n, sn) in vm.nics.iter().zip(&src.nics) {
            assert_eq!(n.mac_address, sn.mac);
            assert_eq!(n.network.name, sn.network.to_ascii_lowercase());
            let want = match sn.model.as_str() {
                "VmxNet3" => NicModel::Vmxnet3,
                "E1000" => NicModel::E1000,
                "E1000e" => NicModel::E1000e,
                other => panic!("{other}"),
            };
            assert_eq!(n.model, want);
        }
    }
}
