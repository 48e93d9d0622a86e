//! Disk files as the real qemu-img writes the VMDK subformats VMware uses: the
//! importer must tell them apart and read the same virtual size qemu-img reports.

use hvx_import::{ImageFormat, ImportError, LoadOptions, load};
use std::path::Path;
use std::process::Command;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed by hack/install-deps.sh");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn virtual_size(path: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    info["virtual-size"].as_u64().expect("virtual-size")
}

fn vmx_for(dir: &Path, disk: &str) -> std::path::PathBuf {
    let vmx = dir.join("vm.vmx");
    std::fs::write(
        &vmx,
        format!(
            "memsize = \"256\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"{disk}\"\n"
        ),
    )
    .expect("write vmx");
    vmx
}

#[test]
#[ignore = "privileged: make test-integration"]
fn vmdk_subformats_written_by_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    qemu_img(&["create", "-f", "raw", &d("src.raw"), "96M"]);
    // Some non-zero data so sparse formats have grains to write.
    std::fs::write(d("src.raw"), {
        let mut v = vec![0u8; 96 << 20];
        v[..4096].fill(0xab);
        v
    })
    .expect("fill");

    for (subformat, want) in [
        ("streamOptimized", ImageFormat::Vmdk),
        ("monolithicSparse", ImageFormat::Vmdk),
        ("monolithicFlat", ImageFormat::Raw),
    ] {
        let name = format!("{subformat}.vmdk");
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            &d("src.raw"),
            &d(&name),
        ]);
        let expected_size = virtual_size(&dir.path().join(&name));
        let loaded = load(&vmx_for(dir.path(), &name), LoadOptions::default())
            .unwrap_or_else(|e| panic!("{subformat}: {e}"));
        let file = &loaded.app.disk_files[0];
        assert_eq!(file.format, want, "{subformat}");
        assert_eq!(
            loaded.app.vms[0].disks[0].capacity_bytes,
            Some(expected_size),
            "{subformat}"
        );
        if want == ImageFormat::Raw {
            // The flat extent is the image: its length is the virtual size.
            assert_eq!(file.name, format!("{subformat}-flat.vmdk"));
            assert_eq!(file.size_bytes, Some(expected_size));
        }
    }

    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        &d("src.raw"),
        &d("split.vmdk"),
    ]);
    let err = load(&vmx_for(dir.path(), "split.vmdk"), LoadOptions::default()).expect_err("split");
    assert!(
        matches!(&err, ImportError::UnsupportedDisk { reason, .. } if reason.contains("qemu-img convert")),
        "{err}"
    );
}
