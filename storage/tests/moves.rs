//! Cold moves of a disk chain between two stores (two nodes): the received chain reads
//! the same as the sent one, points at the receiver's own paths, and bad transfers
//! (short, corrupted, hostile) leave nothing behind and the receiver's disk untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::*;
use hvx_storage::ImportSource;
use hvx_storage::moves::{ExportedDisk, IncomingDisk};
use sha2::{Digest, Sha256};

/// The same base imported into both stores, and a disk with two snapshots on `src`.
async fn two_nodes() -> (TestStore, TestStore, String) {
    let (src, dst) = (store(), store());
    let imp = src.dir.path().join("imp");
    std::fs::create_dir(&imp).unwrap();
    pattern_raw(&imp.join("d.img"), 16);
    let source = ImportSource::Local {
        dir: imp.clone(),
        entry: "d.img".into(),
    };
    let base = src.store.import(&source, None, None).await.unwrap();
    let base2 = dst.store.import(&source, None, None).await.unwrap();
    assert_eq!(base.digest, base2.digest);
    src.store
        .create_disk("vm-a", "root", &base.digest, None)
        .await
        .unwrap();
    let active = |s: &TestStore| {
        s.store
            .disk_view(&s.store.load_disk("vm-a", "root").unwrap())
            .unwrap()
            .active_path
    };
    write_pattern(&active(&src), "0", "64k", 0x11);
    src.store
        .snapshot_offline("vm-a", "root", "s1")
        .await
        .unwrap();
    write_pattern(&active(&src), "2M", "64k", 0x22);
    src.store
        .snapshot_offline("vm-a", "root", "s2")
        .await
        .unwrap();
    write_pattern(&active(&src), "4M", "1M", 0x33);
    (src, dst, base.digest)
}

fn sha256_file(path: &std::path::Path) -> String {
    hvx_storage::names::hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

/// Sends `e` to `dst` in 64 KiB chunks, as the agent relays it; `tamper` may change
/// a chunk before it is written.
async fn send(
    dst: &TestStore,
    e: &ExportedDisk,
    mut tamper: impl FnMut(usize, &mut Vec<u8>),
) -> hvx_storage::Result<IncomingDisk> {
    let files: Vec<(String, u64)> = e.files.iter().map(|f| (f.name.clone(), f.size)).collect();
    let mut inc = dst
        .store
        .receive_disk("vm-a", "root", &e.chain_json, &files)
        .await?;
    let mut digests = Vec::new();
    for (i, f) in e.files.iter().enumerate() {
        let bytes = std::fs::read(&f.path).unwrap();
        digests.push(sha256_file(&f.path));
        for (n, chunk) in bytes.chunks(64 << 10).enumerate() {
            let mut c = chunk.to_vec();
            tamper(i, &mut c);
            inc.write(i, (n * (64 << 10)) as u64, &c)?;
        }
    }
    inc.finish(&digests)?;
    Ok(inc)
}

fn staging_is_empty(t: &TestStore) -> bool {
    std::fs::read_dir(t.store.root().join("tmp"))
        .unwrap()
        .next()
        .is_none()
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn a_moved_chain_reads_the_same_and_points_at_the_receivers_paths() {
    let (src, dst, digest) = two_nodes().await;
    let e = src.store.exported_disk("vm-a", "root").unwrap();
    assert_eq!(e.files.len(), 3, "two snapshots and the active layer");
    let inc = send(&dst, &e, |_, _| {}).await.unwrap();
    let view = dst.store.install_received(inc, "move-1").await.unwrap();
    assert_eq!(
        dst.store.moved_in("vm-a", "root").as_deref(),
        Some("move-1")
    );
    assert!(staging_is_empty(&dst));
    // Same guest-visible bytes through the whole chain.
    let sent = src
        .store
        .disk_view(&src.store.load_disk("vm-a", "root").unwrap())
        .unwrap();
    let same = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        sent.active_path.to_str().unwrap(),
        view.active_path.to_str().unwrap(),
    ]);
    assert!(same.contains("identical"), "{same}");
    assert!(expect_pattern(&view.active_path, "qcow2", "4M", "1M", 0x33));
    // Every backing file is on the receiver: the source store can go away.
    let info = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        view.active_path.to_str().unwrap(),
    ]);
    let src_root = src.store.root().to_string_lossy().into_owned();
    assert!(
        !info.contains(&src_root),
        "chain still refers to the source: {info}"
    );
    assert!(info.contains(&format!("sha256-{digest}.qcow2")), "{info}");
    // The snapshot tree came along: reverting to s1 on the receiver works.
    let v = dst.store.revert("vm-a", "root", "s1").await.unwrap();
    assert!(expect_pattern(&v.active_path, "qcow2", "0", "64k", 0x11));
    assert!(!expect_pattern(&v.active_path, "qcow2", "2M", "64k", 0x22));

    // Moving again replaces the receiver's copy (the source is authoritative).
    let inc = send(&dst, &e, |_, _| {}).await.unwrap();
    let view = dst.store.install_received(inc, "move-2").await.unwrap();
    assert!(expect_pattern(
        &view.active_path,
        "qcow2",
        "2M",
        "64k",
        0x22
    ));
    assert_eq!(
        dst.store.moved_in("vm-a", "root").as_deref(),
        Some("move-2")
    );
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn short_corrupt_or_hostile_transfers_leave_nothing_and_keep_the_old_disk() {
    let (src, dst, digest) = two_nodes().await;
    dst.store
        .create_disk("vm-a", "root", &digest, None)
        .await
        .unwrap();
    let before = dst.store.load_disk("vm-a", "root").unwrap();
    let e = src.store.exported_disk("vm-a", "root").unwrap();

    // A flipped byte: the digest check fails.
    let err = send(&dst, &e, |i, c| {
        if i == 1 {
            c[100] ^= 1;
        }
    })
    .await
    .expect_err("digest mismatch");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(staging_is_empty(&dst));

    // A stream that stops early.
    let files: Vec<(String, u64)> = e.files.iter().map(|f| (f.name.clone(), f.size)).collect();
    let mut inc = dst
        .store
        .receive_disk("vm-a", "root", &e.chain_json, &files)
        .await
        .unwrap();
    let first = std::fs::read(&e.files[0].path).unwrap();
    inc.write(0, 0, &first[..4096]).unwrap();
    let err = inc.finish(&[]).expect_err("short");
    assert!(err.to_string().contains("ended at 4096 bytes"), "{err}");
    // More bytes than announced, and data out of order.
    assert!(inc.write(0, 4096, &vec![0; first.len()]).is_err());
    drop(inc);
    assert!(staging_is_empty(&dst));

    // A layer whose header names an external data file is refused before qemu-img
    // opens it.
    let hostile = dst.dir.path().join("hostile.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", dst.dir.path().join("host-file").display()),
        hostile.to_str().unwrap(),
        "1M",
    ]);
    let mut e2 = e.clone();
    let last = e2.files.len() - 1;
    e2.files[last].path = hostile.clone();
    e2.files[last].size = std::fs::metadata(&hostile).unwrap().len();
    let inc = send(&dst, &e2, |_, _| {}).await.unwrap();
    let err = dst
        .store
        .install_received(inc, "move-x")
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("external data file"), "{err}");
    assert!(staging_is_empty(&dst));

    // Metadata of another disk, or files that are not the chain's layers.
    let files: Vec<(String, u64)> = e.files.iter().map(|f| (f.name.clone(), f.size)).collect();
    assert!(
        dst.store
            .receive_disk("vm-b", "root", &e.chain_json, &files)
            .await
            .is_err()
    );
    let mut odd = files.clone();
    odd[0].0 = "../../etc/passwd".into();
    assert!(
        dst.store
            .receive_disk("vm-a", "root", &e.chain_json, &odd)
            .await
            .is_err()
    );
    // No base here: a precondition, not a corrupt disk.
    let bare = store();
    let err = bare
        .store
        .receive_disk("vm-a", "root", &e.chain_json, &files)
        .await
        .expect_err("no base");
    assert!(err.to_string().contains("not found"), "{err}");

    // After all that the receiver's own disk is as it was.
    assert_eq!(dst.store.load_disk("vm-a", "root").unwrap(), before);
    assert!(dst.store.moved_in("vm-a", "root").is_none());
}
