//! Imports every supported format (made here with qemu-img) from every kind of source,
//! and checks the disk built over the base holds the same data as the original.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use hvx_storage::format::DiskFormat;
use hvx_storage::{ImportPhase, ImportSource};

/// (file name, qemu-img -O format, -o options, expected format, subformat)
const FORMATS: &[(&str, &str, &str, DiskFormat, &str)] = &[
    (
        "mono.vmdk",
        "vmdk",
        "subformat=monolithicSparse",
        DiskFormat::Vmdk,
        "monolithicSparse",
    ),
    (
        "stream.vmdk",
        "vmdk",
        "subformat=streamOptimized",
        DiskFormat::Vmdk,
        "streamOptimized",
    ),
    (
        "split.vmdk",
        "vmdk",
        "subformat=twoGbMaxExtentSparse",
        DiskFormat::Vmdk,
        "twoGbMaxExtentSparse",
    ),
    (
        "splitflat.vmdk",
        "vmdk",
        "subformat=twoGbMaxExtentFlat",
        DiskFormat::Vmdk,
        "twoGbMaxExtentFlat",
    ),
    (
        "flat.vmdk",
        "vmdk",
        "subformat=monolithicFlat",
        DiskFormat::Vmdk,
        "monolithicFlat",
    ),
    (
        "dyn.vhd",
        "vpc",
        "subformat=dynamic",
        DiskFormat::Vhd,
        "dynamic",
    ),
    (
        "fixed.vhd",
        "vpc",
        "subformat=fixed,force_size=on",
        DiskFormat::Vhd,
        "fixed",
    ),
    ("disk.vhdx", "vhdx", "", DiskFormat::Vhdx, "vhdx"),
    ("disk.qcow2", "qcow2", "", DiskFormat::Qcow2, "qcow2 v3"),
    (
        "ext.qcow2",
        "qcow2",
        "extended_l2=on,cluster_size=131072",
        DiskFormat::Qcow2,
        "qcow2 v3",
    ),
    (
        "v2.qcow2",
        "qcow2",
        "compat=0.10",
        DiskFormat::Qcow2,
        "qcow2 v2",
    ),
    ("disk.img", "raw", "", DiskFormat::Raw, "raw"),
];

fn make(dir: &Path, src: &Path, name: &str, fmt: &str, opts: &str) {
    let out = dir.join(name);
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let (s, o) = (
        src.to_str().unwrap().to_string(),
        out.to_str().unwrap().to_string(),
    );
    args.push(&s);
    args.push(&o);
    qemu_img(&args);
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn imports_every_format_from_a_local_directory() {
    let t = store();
    let src_dir = t.dir.path().join("src");
    std::fs::create_dir(&src_dir).unwrap();
    let raw = t.dir.path().join("orig.raw");
    pattern_raw(&raw, 64);
    for (i, (name, fmt, opts, want_fmt, want_sub)) in FORMATS.iter().enumerate() {
        let dir = src_dir.join(format!("f{i}"));
        std::fs::create_dir(&dir).unwrap();
        make(&dir, &raw, name, fmt, opts);
        let info = hvx_storage::format::inspect(&dir, name, t.store.limits()).unwrap();
        assert_eq!(
            (info.format, info.subformat.as_str()),
            (*want_fmt, *want_sub),
            "{name}"
        );
        let progress: Arc<Mutex<Vec<(ImportPhase, u64, u64)>>> = Arc::default();
        let p = progress.clone();
        let base = t
            .store
            .import(
                &ImportSource::Local {
                    dir: dir.clone(),
                    entry: name.to_string(),
                },
                None,
                Some(Arc::new(move |ph, d, tot| {
                    p.lock().unwrap().push((ph, d, tot))
                })),
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(base.source_format, *want_fmt);
        assert!(
            base.virtual_size >= 64 << 20,
            "{name}: {}",
            base.virtual_size
        );
        let seen = progress.lock().unwrap().clone();
        let last_fetch = seen
            .iter()
            .rev()
            .find(|(ph, _, _)| *ph == ImportPhase::Fetching)
            .unwrap();
        assert_eq!(
            last_fetch.1, last_fetch.2,
            "{name}: fetch progress ends at total"
        );
        assert!(
            seen.iter().any(|(ph, _, _)| *ph == ImportPhase::Converting),
            "{name}"
        );
        let disk = t
            .store
            .create_disk("ns", &format!("d{i}"), &base.digest, None)
            .await
            .unwrap();
        assert!(
            same_content(&disk.active_path, "qcow2", &raw, "raw"),
            "{name}: content differs"
        );
        qemu_img(&["check", "-q", disk.active_path.to_str().unwrap()]);
    }
    // Nothing left in staging.
    assert!(file_list(&t.store.root().join("tmp")).is_empty());
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn same_image_twice_is_one_base_and_gc_frees_it() {
    let t = store();
    let dir = t.dir.path().join("src");
    std::fs::create_dir(&dir).unwrap();
    let raw = t.dir.path().join("orig.raw");
    pattern_raw(&raw, 16);
    make(&dir, &raw, "a.vmdk", "vmdk", "subformat=streamOptimized");
    let src = ImportSource::Local {
        dir: dir.clone(),
        entry: "a.vmdk".into(),
    };
    let sha = run("sha256sum", &[dir.join("a.vmdk").to_str().unwrap()]);
    let sha = sha.split_whitespace().next().unwrap();
    let (a, b) = tokio::join!(
        t.store.import(&src, Some(sha), None),
        t.store.import(&src, None, None)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.digest, sha);
    assert_eq!(a.digest, b.digest);
    assert_eq!(t.store.bases().unwrap().len(), 1);
    // A wrong checksum is refused.
    let err = t
        .store
        .import(&src, Some(&"0".repeat(64)), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, hvx_storage::StorageError::Checksum { .. }),
        "{err}"
    );
    // Two disks share the base; GC keeps it while one remains.
    t.store
        .create_disk("ns", "one", &a.digest, None)
        .await
        .unwrap();
    t.store
        .create_disk("ns", "two", &a.digest, Some(32 << 20))
        .await
        .unwrap();
    let space = t.store.space().await.unwrap();
    assert_eq!((space.bases, space.disks), (1, 2));
    assert!(space.bases_bytes > 0 && space.filesystem_size > 0);
    t.store.delete_disk("ns", "one").unwrap();
    let r = t.store.gc(std::time::Duration::ZERO).await.unwrap();
    assert!(r.removed.is_empty() && r.kept == [a.digest.clone()]);
    t.store.delete_disk("ns", "two").unwrap();
    let r = t.store.gc(std::time::Duration::ZERO).await.unwrap();
    assert_eq!(r.removed, std::slice::from_ref(&a.digest));
    assert!(r.freed_bytes > 0);
    assert!(t.store.bases().unwrap().is_empty());
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn imports_from_upload_stream_and_ova_member() {
    let t = store();
    let raw = t.dir.path().join("orig.raw");
    pattern_raw(&raw, 16);
    let work = t.dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    make(
        &work,
        &raw,
        "disk1.vmdk",
        "vmdk",
        "subformat=streamOptimized",
    );
    make(
        &work,
        &raw,
        "split.vmdk",
        "vmdk",
        "subformat=twoGbMaxExtentSparse",
    );
    // Upload.
    let f = tokio::fs::File::open(work.join("disk1.vmdk"))
        .await
        .unwrap();
    let len = f.metadata().await.unwrap().len();
    let staged = t
        .store
        .stage_upload(f, "up.vmdk", Some(len), None)
        .await
        .unwrap();
    let base = t.store.import_staged(staged, None, None).await.unwrap();
    let d = t
        .store
        .create_disk("ns", "up", &base.digest, None)
        .await
        .unwrap();
    assert!(same_content(&d.active_path, "qcow2", &raw, "raw"));
    // An upload cut short is refused.
    let short = &std::fs::read(work.join("disk1.vmdk")).unwrap()[..1000];
    let err = t
        .store
        .stage_upload(short, "x.vmdk", Some(len), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, hvx_storage::StorageError::Truncated { .. }),
        "{err}"
    );
    // OVA with a streamOptimized member and a split (descriptor + extent) member, plus a
    // traversal-named member that must never be selectable.
    let ova = t.dir.path().join("app.ova");
    let ovf = hvx_storage::ova::render_ovf(&hvx_storage::ova::OvfApp {
        name: "a".into(),
        networks: vec![],
        vms: vec![],
    });
    hvx_storage::ova::write_ova(
        &ova,
        "app",
        &ovf,
        &[
            ("disk1.vmdk".into(), work.join("disk1.vmdk")),
            ("split.vmdk".into(), work.join("split.vmdk")),
            ("split-s001.vmdk".into(), work.join("split-s001.vmdk")),
        ],
    )
    .unwrap();
    for (i, member) in ["disk1.vmdk", "split.vmdk"].into_iter().enumerate() {
        let base = t
            .store
            .import(
                &ImportSource::OvaMember {
                    ova: ova.clone(),
                    member: member.into(),
                },
                None,
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{member}: {e}"));
        let d = t
            .store
            .create_disk("ns", &format!("ova-{i}"), &base.digest, None)
            .await
            .unwrap();
        assert!(
            same_content(&d.active_path, "qcow2", &raw, "raw"),
            "{member}"
        );
    }
    for bad in ["../etc/passwd", "missing.vmdk", "/etc/passwd"] {
        let err = t
            .store
            .import(
                &ImportSource::OvaMember {
                    ova: ova.clone(),
                    member: bad.into(),
                },
                None,
                None,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                hvx_storage::StorageError::InvalidName { .. }
                    | hvx_storage::StorageError::Ova { .. }
            ),
            "{bad}: {err}"
        );
    }
}
