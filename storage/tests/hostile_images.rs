//! Hostile images: each is refused with a clear error before qemu-img opens it, and
//! nothing outside the import is read. The "host file" targets are FIFOs: opening one
//! for reading would block, so any read attempt shows up as a hang (test timeout).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use hvx_storage::format::ImportLimits;
use hvx_storage::{ImportSource, StorageError};

fn fifo(path: &Path) {
    run("mkfifo", &[path.to_str().unwrap()]);
}

async fn import_local(t: &TestStore, dir: &Path, entry: &str) -> StorageError {
    let src = ImportSource::Local {
        dir: dir.to_path_buf(),
        entry: entry.into(),
    };
    let fut = t.store.import(&src, None, None);
    let err = tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("import hung: it opened a file outside the import")
        .expect_err("hostile image was accepted");
    // Nothing was converted or left behind.
    assert!(t.store.bases().unwrap().is_empty());
    assert!(file_list(&t.store.root().join("tmp")).is_empty());
    assert!(file_list(&t.store.root().join("bases")).is_empty());
    err
}

fn split_descriptor(dir: &Path) -> (PathBuf, String) {
    let raw = dir.join("orig.raw");
    pattern_raw(&raw, 8);
    let d = dir.join("split.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        raw.to_str().unwrap(),
        d.to_str().unwrap(),
    ]);
    std::fs::remove_file(&raw).unwrap();
    let text = std::fs::read_to_string(&d).unwrap();
    (d, text)
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn vmdk_descriptor_naming_host_files_is_refused() {
    let t = store();
    let outside = t.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret");
    fifo(&secret);
    let imp = t.dir.path().join("import");
    std::fs::create_dir(&imp).unwrap();
    let (desc, text) = split_descriptor(&imp);
    // 1. absolute path, 2. ../ traversal, 3. a symlink inside the import to a host file,
    // 4. a raw device mapping extent.
    let cases = [
        text.replace("\"split-s001.vmdk\"", &format!("\"{}\"", secret.display())),
        text.replace("\"split-s001.vmdk\"", "\"../outside/secret\""),
        text.replace("\"split-s001.vmdk\"", "\"link.vmdk\""),
        text.replace(
            "RW 16384 SPARSE \"split-s001.vmdk\"",
            "RW 16384 VMFSRDM \"/dev/sda\"",
        ),
    ];
    std::os::unix::fs::symlink(&secret, imp.join("link.vmdk")).unwrap();
    for (i, case) in cases.iter().enumerate() {
        assert_ne!(case, &text, "case {i} did not change the descriptor");
        std::fs::write(&desc, case).unwrap();
        let err = import_local(&t, &imp, "split.vmdk").await;
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                StorageError::Refused { .. } | StorageError::CorruptHeader { .. }
            ),
            "case {i}: {msg}"
        );
        println!("case {i}: {msg}");
    }
    // The entry itself may not be a symlink nor a path.
    std::os::unix::fs::symlink(&secret, imp.join("entry.vmdk")).unwrap();
    assert!(matches!(
        import_local(&t, &imp, "entry.vmdk").await,
        StorageError::Refused { .. }
    ));
    assert!(matches!(
        import_local(&t, &imp, "../outside/secret").await,
        StorageError::InvalidName { .. }
    ));
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn qcow2_backing_and_external_data_files_are_refused() {
    let t = store();
    let outside = t.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let host = outside.join("host.raw");
    qemu_img(&["create", "-q", "-f", "raw", host.to_str().unwrap(), "8M"]);
    let imp = t.dir.path().join("import");
    std::fs::create_dir(&imp).unwrap();
    let q = imp.join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        host.to_str().unwrap(),
        "-F",
        "raw",
        q.to_str().unwrap(),
    ]);
    // Swap the backing file for a FIFO so any attempt to open it would hang.
    std::fs::remove_file(&host).unwrap();
    fifo(&host);
    let err = import_local(&t, &imp, "b.qcow2").await;
    assert!(
        matches!(&err, StorageError::Refused { reason, .. } if reason.contains("backing file")),
        "{err}"
    );
    let d = imp.join("d.qcow2");
    let data = outside.join("data.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        d.to_str().unwrap(),
        "8M",
    ]);
    std::fs::remove_file(&data).unwrap();
    fifo(&data);
    let err = import_local(&t, &imp, "d.qcow2").await;
    assert!(
        matches!(&err, StorageError::Refused { reason, .. } if reason.contains("external data file")),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn truncated_and_corrupt_headers_are_clear_errors() {
    let t = store();
    let imp = t.dir.path().join("import");
    std::fs::create_dir(&imp).unwrap();
    let raw = t.dir.path().join("orig.raw");
    pattern_raw(&raw, 8);
    let mk = |name: &str, fmt: &str, opts: &str| {
        let p = imp.join(name);
        let mut a = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        let (r, o) = (
            raw.to_str().unwrap().to_string(),
            p.to_str().unwrap().to_string(),
        );
        a.push(&r);
        a.push(&o);
        qemu_img(&a);
        p
    };
    let truncate = |p: &Path, len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len)
            .unwrap()
    };
    let patch = |p: &Path, off: usize, bytes: &[u8]| {
        let mut b = std::fs::read(p).unwrap();
        b[off..off + bytes.len()].copy_from_slice(bytes);
        std::fs::write(p, b).unwrap();
    };
    // qcow2 cut inside its header; qcow2 with absurd cluster bits; with its L1 table past EOF.
    let q = mk("t.qcow2", "qcow2", "");
    truncate(&q, 40);
    assert!(matches!(
        import_local(&t, &imp, "t.qcow2").await,
        StorageError::Truncated { .. }
    ));
    let q = mk("c.qcow2", "qcow2", "");
    patch(&q, 20, &99u32.to_be_bytes());
    assert!(matches!(
        import_local(&t, &imp, "c.qcow2").await,
        StorageError::CorruptHeader { .. }
    ));
    let q = mk("l1.qcow2", "qcow2", "");
    patch(&q, 40, &(1u64 << 40).to_be_bytes());
    assert!(matches!(
        import_local(&t, &imp, "l1.qcow2").await,
        StorageError::CorruptHeader { .. }
    ));
    // streamOptimized VMDK cut in half (footer gone); sparse VMDK with a bad grain size.
    let v = mk("s.vmdk", "vmdk", "subformat=streamOptimized");
    let len = std::fs::metadata(&v).unwrap().len();
    truncate(&v, len / 2);
    let err = import_local(&t, &imp, "s.vmdk").await;
    assert!(
        matches!(
            err,
            StorageError::Truncated { .. } | StorageError::CorruptHeader { .. }
        ),
        "{err}"
    );
    let v = mk("g.vmdk", "vmdk", "subformat=monolithicSparse");
    patch(&v, 20, &100u64.to_le_bytes());
    assert!(matches!(
        import_local(&t, &imp, "g.vmdk").await,
        StorageError::CorruptHeader { .. }
    ));
    // VHD with its footer cut off; VHD with a damaged footer checksum.
    let h = mk("t.vhd", "vpc", "subformat=dynamic");
    let len = std::fs::metadata(&h).unwrap().len();
    truncate(&h, len - 512);
    assert!(matches!(
        import_local(&t, &imp, "t.vhd").await,
        StorageError::Truncated { .. }
    ));
    let h = mk("c.vhd", "vpc", "subformat=dynamic");
    let len = std::fs::metadata(&h).unwrap().len() as usize;
    patch(&h, len - 512 + 50, &[0xff, 0xff]);
    assert!(matches!(
        import_local(&t, &imp, "c.vhd").await,
        StorageError::CorruptHeader { .. }
    ));
    // VHDX with its region table wiped.
    let x = mk("c.vhdx", "vhdx", "");
    patch(&x, 192 << 10, b"xxxx");
    assert!(matches!(
        import_local(&t, &imp, "c.vhdx").await,
        StorageError::CorruptHeader { .. }
    ));
    // A split VMDK whose extent is shorter than its descriptor says.
    let (desc, _) = split_descriptor(&imp);
    let ext = desc.with_file_name("split-s001.vmdk");
    truncate(&ext, 100);
    let err = import_local(&t, &imp, "split.vmdk").await;
    assert!(
        matches!(
            err,
            StorageError::Truncated { .. } | StorageError::CorruptHeader { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn sizes_past_limits_are_refused() {
    let t = store_with(|c| {
        c.limits = ImportLimits {
            max_virtual_size: 1 << 30,
            ..ImportLimits::default()
        };
    });
    let imp = t.dir.path().join("import");
    std::fs::create_dir(&imp).unwrap();
    for (name, fmt, opts) in [
        ("big.qcow2", "qcow2", ""),
        ("big.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("big.vhdx", "vhdx", ""),
        ("big.vhd", "vpc", "subformat=dynamic"),
        ("big.img", "raw", ""),
    ] {
        let p = imp.join(name);
        let mut a = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        let ps = p.to_str().unwrap().to_string();
        a.push(&ps);
        a.push("2G");
        qemu_img(&a);
        let err = import_local(&t, &imp, name).await;
        assert!(
            matches!(err, StorageError::TooLarge { .. }),
            "{name}: {err}"
        );
    }
    // The 16 TiB default refuses a 20 TiB sparse qcow2.
    let t = store();
    let p = imp.join("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "20T"]);
    assert!(matches!(
        import_local(&t, &imp, "huge.qcow2").await,
        StorageError::TooLarge { .. }
    ));
    // qemu-img itself runs confined: an address-space limit too small for it fails cleanly.
    let t = store_with(|c| c.qemu_img.limits.address_space = 16 << 20);
    let ok = imp.join("ok.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", ok.to_str().unwrap(), "8M"]);
    let err = import_local(&t, &imp, "ok.qcow2").await;
    assert!(matches!(err, StorageError::Command { .. }), "{err}");
}
