//! Overlay chains on real qcow2 files: offline snapshots, revert, delete, clone, resize,
//! export; and the same operations on a running QEMU through QMP.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::*;
use hvx_storage::ImportSource;
use hvx_storage::ova::{
    OvfApp, OvfDisk, OvfNic, OvfVm, render_ovf, verify_ova_manifest, write_ova,
};
use hvx_storage::qmp::{IoThrottle, QmpExecutor, set_io_throttle};
use serde_json::json;

async fn disk_from_raw(t: &TestStore, size_mib: u64, name: &str) -> (String, std::path::PathBuf) {
    let imp = t.dir.path().join(format!("imp-{name}"));
    std::fs::create_dir(&imp).unwrap();
    pattern_raw(&imp.join("d.img"), size_mib);
    let base = t
        .store
        .import(
            &ImportSource::Local {
                dir: imp.clone(),
                entry: "d.img".into(),
            },
            None,
            None,
        )
        .await
        .unwrap();
    t.store
        .create_disk("ns", name, &base.digest, None)
        .await
        .unwrap();
    (base.digest, imp.join("d.img"))
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn offline_snapshot_revert_delete_keep_content_and_short_chains() {
    let t = store();
    let (_, raw) = disk_from_raw(&t, 32, "d").await;
    let active = |t: &TestStore| {
        t.store
            .disk_view(&t.store.load_disk("ns", "d").unwrap())
            .unwrap()
            .active_path
    };
    write_pattern(&active(&t), "0", "64k", 0x11);
    t.store.snapshot_offline("ns", "d", "s1").await.unwrap();
    write_pattern(&active(&t), "0", "64k", 0x22);
    t.store.snapshot_offline("ns", "d", "s2").await.unwrap();
    write_pattern(&active(&t), "0", "64k", 0x33);
    assert!(expect_pattern(&active(&t), "qcow2", "0", "64k", 0x33));
    // Revert to s1: s1's data is back, later data is gone; base data intact.
    let v = t.store.revert("ns", "d", "s1").await.unwrap();
    assert!(expect_pattern(&v.active_path, "qcow2", "0", "64k", 0x11));
    assert!(expect_pattern(&v.active_path, "qcow2", "1M", "64k", 0x42));
    // Revert to s2 (another branch of the tree), then delete s1 (its layer is s2's parent).
    t.store.revert("ns", "d", "s2").await.unwrap();
    let v = t
        .store
        .delete_snapshot_offline("ns", "d", "s1")
        .await
        .unwrap();
    assert!(expect_pattern(&v.active_path, "qcow2", "0", "64k", 0x22));
    assert_eq!(v.snapshots.len(), 1);
    // Many snapshots: the chain never exceeds 5 files, data survives flattening.
    for i in 0..8u8 {
        write_pattern(&active(&t), &format!("{}M", 2 + i), "64k", 0x50 + i);
        let v = t
            .store
            .snapshot_offline("ns", "d", &format!("n{i}"))
            .await
            .unwrap();
        assert!(v.chain.len() <= 5, "chain of {} files", v.chain.len());
    }
    let v = t
        .store
        .disk_view(&t.store.load_disk("ns", "d").unwrap())
        .unwrap();
    for i in 0..8u8 {
        assert!(expect_pattern(
            &v.active_path,
            "qcow2",
            &format!("{}M", 2 + i),
            "64k",
            0x50 + i
        ));
    }
    // Revert to an old snapshot after flattening still works.
    let v = t.store.revert("ns", "d", "n2").await.unwrap();
    assert!(expect_pattern(&v.active_path, "qcow2", "4M", "64k", 0x52));
    assert!(expect_pattern(&v.active_path, "qcow2", "5M", "64k", 0));
    // Deleting the newest snapshot under the active layer commits into it.
    let before = std::fs::read_dir(t.store.disk_dir("ns", "d").unwrap())
        .unwrap()
        .count();
    let v = t
        .store
        .delete_snapshot_offline("ns", "d", "n2")
        .await
        .unwrap();
    assert!(expect_pattern(&v.active_path, "qcow2", "4M", "64k", 0x52));
    assert!(
        std::fs::read_dir(t.store.disk_dir("ns", "d").unwrap())
            .unwrap()
            .count()
            <= before
    );
    // Clone, resize and export.
    let c = t
        .store
        .clone_disk(("ns", "d"), ("ns", "copy"))
        .await
        .unwrap();
    assert!(same_content(
        &c.active_path,
        "qcow2",
        &v.active_path,
        "qcow2"
    ));
    assert_eq!(c.chain.len(), 2, "clone is one layer over the shared base");
    let r = t
        .store
        .resize_offline("ns", "copy", 48 << 20)
        .await
        .unwrap();
    assert_eq!(r.virtual_size, 48 << 20);
    assert!(t.store.resize_offline("ns", "copy", 1 << 20).await.is_err());
    let out = t.dir.path().join("export.vmdk");
    t.store.export_vmdk("ns", "d", &out).await.unwrap();
    qemu_img(&["check", "-q", "-f", "vmdk", out.to_str().unwrap()]);
    let info = qemu_img(&["info", "-f", "vmdk", out.to_str().unwrap()]);
    assert!(info.contains("create type: streamOptimized"), "{info}");
    assert!(same_content(&out, "vmdk", &v.active_path, "qcow2"));
    // The export is importable again and is the same disk.
    let again = t
        .store
        .import(
            &ImportSource::Local {
                dir: t.dir.path().to_path_buf(),
                entry: "export.vmdk".into(),
            },
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(again.source_subformat, "streamOptimized");
    assert!(same_content(&again.path, "qcow2", &v.active_path, "qcow2"));
    // Application export: an OVA (ovf, manifest, disk) whose disk member re-imports equal.
    let app = OvfApp {
        name: "shop".into(),
        networks: vec!["VM Network".into()],
        vms: vec![OvfVm {
            name: "web".into(),
            cpus: 1,
            memory_mib: 512,
            disks: vec![OvfDisk {
                file_name: "web-disk0.vmdk".into(),
                file_size: std::fs::metadata(&out).unwrap().len(),
                capacity_bytes: v.virtual_size,
                controller: "VirtualSCSI".into(),
            }],
            nics: vec![OvfNic {
                network: "VM Network".into(),
                model: "VmxNet3".into(),
                mac: "00:50:56:00:00:01".into(),
            }],
        }],
    };
    let ova = t.dir.path().join("shop.ova");
    write_ova(
        &ova,
        "shop",
        &render_ovf(&app),
        &[("web-disk0.vmdk".into(), out.clone())],
    )
    .unwrap();
    assert_eq!(
        verify_ova_manifest(&ova).unwrap(),
        ["shop.ovf", "web-disk0.vmdk"]
    );
    let listing = run("tar", &["tf", ova.to_str().unwrap()]);
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        ["shop.ovf", "shop.mf", "web-disk0.vmdk"]
    );
    let from_ova = t
        .store
        .import(
            &ImportSource::OvaMember {
                ova,
                member: "web-disk0.vmdk".into(),
            },
            None,
            None,
        )
        .await
        .unwrap();
    assert!(same_content(
        &from_ova.path,
        "qcow2",
        &v.active_path,
        "qcow2"
    ));
    let _ = raw;
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn online_snapshot_commit_stream_resize_throttle_and_incremental_backup() {
    let t = store();
    disk_from_raw(&t, 32, "vm").await;
    let meta = t.store.load_disk("ns", "vm").unwrap();
    let view = t.store.disk_view(&meta).unwrap();
    let top = meta.node_name(Some(&meta.active));
    let vm = Qemu::start(&[
        "-blockdev".into(),
        view.blockdev.to_string(),
        "-device".into(),
        format!("virtio-blk-pci,drive={top},id=disk0"),
        "-S".into(),
    ])
    .await;
    let q: &dyn QmpExecutor = &vm.qmp;
    let io = |cmd: &str| format!("qemu-io -d /machine/peripheral/disk0/virtio-backend \"{cmd}\"");
    vm.qmp.hmp(&io("write -P 0x61 0 64k")).await;
    // Persistent dirty bitmap, then a full backup.
    t.store.start_dirty_tracking(q, &meta, "bk").await.unwrap();
    let full = t.dir.path().join("full.qcow2");
    t.store
        .backup_online(q, &meta, "bk", &full, None)
        .await
        .unwrap();
    // Snapshot while running; guest writes go to the new layer.
    let v = t.store.snapshot_online(q, "ns", "vm", "s1").await.unwrap();
    assert_eq!(v.chain.len(), 3);
    vm.qmp.hmp(&io("write -P 0x62 64k 64k")).await;
    // Several more snapshots: chain flattened by block-stream, stays <= 5.
    for i in 0..5 {
        vm.qmp
            .hmp(&io(&format!("write -P {} {}M 64k", 0x70 + i, 2 + i)))
            .await;
        let v = t
            .store
            .snapshot_online(q, "ns", "vm", &format!("x{i}"))
            .await
            .unwrap();
        assert!(v.chain.len() <= 5, "chain of {}", v.chain.len());
    }
    // Delete the newest snapshot (block-commit of the active layer into it).
    let v = t
        .store
        .delete_snapshot_online(q, "ns", "vm", "x4")
        .await
        .unwrap();
    assert!(v.snapshots.iter().all(|s| s.name != "x4"));
    // Delete an older one in the chain (block-stream into its child).
    let meta_now = t.store.load_disk("ns", "vm").unwrap();
    let chain = meta_now.chain_of(&meta_now.active);
    let in_chain = meta_now
        .snapshots
        .iter()
        .find(|s| chain.contains(&s.layer))
        .map(|s| s.name.clone());
    if let Some(name) = in_chain {
        t.store
            .delete_snapshot_online(q, "ns", "vm", &name)
            .await
            .unwrap();
    }
    // The live chain matches QEMU's view.
    let meta_now = t.store.load_disk("ns", "vm").unwrap();
    let blocks = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let nodes: Vec<String> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str().map(String::from))
        .collect();
    for id in meta_now.chain_of(&meta_now.active) {
        assert!(
            nodes.contains(&meta_now.node_name(Some(&id))),
            "{id} not open in QEMU: {nodes:?}"
        );
    }
    // Online resize and throttling.
    let v = t
        .store
        .resize_online(q, "ns", "vm", 64 << 20)
        .await
        .unwrap();
    assert_eq!(v.virtual_size, 64 << 20);
    set_io_throttle(
        q,
        "/machine/peripheral/disk0/virtio-backend",
        &IoThrottle {
            iops: 200,
            bps: 10 << 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let info = q.execute("query-block", json!({})).await.unwrap();
    let dev = info
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["qdev"].as_str().is_some_and(|s| s.contains("disk0")))
        .unwrap();
    assert_eq!(dev["inserted"]["iops"], 200);
    assert_eq!(dev["inserted"]["image"]["virtual-size"], 64 << 20);
    // Incremental backup over the full one holds exactly the disk's content. The bitmap
    // lived on the first active layer; after snapshots take a new full backup.
    let meta_now = t.store.load_disk("ns", "vm").unwrap();
    t.store
        .start_dirty_tracking(q, &meta_now, "bk2")
        .await
        .unwrap();
    let full2 = t.dir.path().join("full2.qcow2");
    t.store
        .backup_online(q, &meta_now, "bk2", &full2, None)
        .await
        .unwrap();
    vm.qmp.hmp(&io("write -P 0x99 8M 128k")).await;
    let inc = t.dir.path().join("inc.qcow2");
    t.store
        .backup_online(q, &meta_now, "bk2", &inc, Some(&full2))
        .await
        .unwrap();
    let inc_size = std::fs::metadata(&inc).unwrap().len();
    let full_size = std::fs::metadata(&full2).unwrap().len();
    assert!(
        inc_size < full_size,
        "incremental {inc_size} >= full {full_size}"
    );
    q.execute("quit", json!({})).await.ok();
    drop(vm);
    let view = t
        .store
        .disk_view(&t.store.load_disk("ns", "vm").unwrap())
        .unwrap();
    assert!(
        same_content(&inc, "qcow2", &view.active_path, "qcow2"),
        "incremental backup differs"
    );
    assert!(expect_pattern(&view.active_path, "qcow2", "0", "64k", 0x61));
    assert!(expect_pattern(
        &view.active_path,
        "qcow2",
        "64k",
        "64k",
        0x62
    ));
    assert!(expect_pattern(
        &view.active_path,
        "qcow2",
        "8M",
        "128k",
        0x99
    ));
    for i in 0..5u8 {
        assert!(
            expect_pattern(
                &view.active_path,
                "qcow2",
                &format!("{}M", 2 + i),
                "64k",
                0x70 + i
            ),
            "x{i}"
        );
    }
    // The persistent bitmap was stored in the qcow2.
    let info = qemu_img(&["info", "-U", view.active_path.to_str().unwrap()]);
    assert!(info.contains("bk2"), "{info}");
    // Offline revert to s1 after all that: only the first write is there.
    let v = t.store.revert("ns", "vm", "s1").await.unwrap();
    assert!(expect_pattern(&v.active_path, "qcow2", "0", "64k", 0x61));
    assert!(expect_pattern(&v.active_path, "qcow2", "64k", "64k", 0));
}
