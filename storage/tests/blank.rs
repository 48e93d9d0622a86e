//! Blank disks: an overlay of the declared size on the store's empty base, which a VM
//! sees at exactly that size and reading zeros.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::*;
use hvx_storage::blank::BLANK_DIGEST;
use hvx_storage::qmp::QmpExecutor;
use serde_json::json;

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn blank_disk_has_the_declared_size_and_reads_zeros_in_a_vm() {
    let t = store();
    let base = t.store.blank_base().await.unwrap();
    assert_eq!(base.digest, BLANK_DIGEST);
    assert_eq!(base.virtual_size, 0);
    // Idempotent: a second blank disk reuses the same base.
    assert_eq!(t.store.blank_base().await.unwrap(), base);
    // An odd size that is still a whole number of sectors (OVF capacities are bytes).
    let size: u64 = (3 << 30) + (5 << 20);
    let view = t
        .store
        .create_disk("ns", "blank", &base.digest, Some(size))
        .await
        .unwrap();
    assert_eq!(view.virtual_size, size);
    let meta = t.store.load_disk("ns", "blank").unwrap();
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
    let blocks = q.execute("query-block", json!({})).await.unwrap();
    let seen = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"].as_str().is_some_and(|d| d.contains("disk0")))
        .map(|b| b["inserted"]["image"]["virtual-size"].as_u64().unwrap())
        .expect("disk0 in query-block");
    assert_eq!(seen, size, "the VM sees the declared size");
    let io = |cmd: &str| format!("qemu-io -d /machine/peripheral/disk0/virtio-backend \"{cmd}\"");
    for (off, len) in [
        (0u64, 1u64 << 20),
        (size / 2, 64 << 10),
        (size - (1 << 20), 1 << 20),
    ] {
        let out = vm.qmp.hmp(&io(&format!("read -P 0 {off} {len}"))).await;
        assert!(!out.contains("verification failed"), "{off}: {out}");
    }
    // Reading past the declared end fails: the disk is no bigger than declared.
    let out = vm
        .qmp
        .execute(
            "human-monitor-command",
            json!({"command-line": io(&format!("read {size} 512"))}),
        )
        .await
        .unwrap();
    assert!(
        out.as_str().is_some_and(|s| !s.contains("read 512/512")),
        "{out}"
    );
    // The guest's writes land in the overlay, not in the shared empty base.
    vm.qmp.hmp(&io("write -P 0x5a 1M 64k")).await;
    vm.qmp.hmp(&io("read -P 0x5a 1M 64k")).await;
    drop(vm);
    assert!(
        qemu_img(&["info", "--output=json", base.path.to_str().unwrap()])
            .contains("\"virtual-size\": 0")
    );
}
