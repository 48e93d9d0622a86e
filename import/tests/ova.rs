//! OVAs built with the tar crate, read in place: valid archives, hostile member names,
//! links, bad manifests, missing disks.

use hvx_import::ova::hex_digest;
use hvx_import::{DiskLocation, ImportError, LoadOptions, SourceKind, load};
use sha2::Sha256;
use std::io::Read;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Appends a regular member whose name is written raw into the header, so tests can
/// build the hostile names the tar crate's safe setters refuse.
fn raw_member(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], kind: tar::EntryType) {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    h.set_cksum();
    b.append(&h, data).expect("append");
}

fn ova(dir: &Path, members: &[(&str, Vec<u8>)]) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        raw_member(&mut b, name, data, tar::EntryType::Regular);
    }
    let bytes = b.into_inner().expect("tar");
    let path = dir.join("app.ova");
    std::fs::write(&path, bytes).expect("write ova");
    path
}

fn sha256(data: &[u8]) -> String {
    hex_digest::<Sha256>(data).expect("digest")
}

fn single_vm_members() -> Vec<(&'static str, Vec<u8>)> {
    let ovf = fixture("single-vm.ovf");
    let disk = vec![0x5a_u8; 70_000];
    let mf = format!(
        "SHA256(web-01.ovf)= {}\nSHA256(web-01-disk1.vmdk)= {}\n",
        sha256(&ovf),
        sha256(&disk)
    );
    vec![
        ("web-01.ovf", ovf),
        ("web-01.mf", mf.into_bytes()),
        ("web-01-disk1.vmdk", disk),
    ]
}

#[test]
fn valid_ova_is_read_in_place_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = ova(dir.path(), &single_vm_members());
    let loaded = load(&path, LoadOptions::default()).expect("valid OVA");
    assert_eq!(loaded.kind, SourceKind::Ova);
    let verified: Vec<&str> = loaded.verified.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(verified, ["web-01.ovf", "web-01-disk1.vmdk"]);
    let digest = loaded.sha256_of("web-01-disk1.vmdk").expect("digest");
    assert_eq!(digest, format!("sha256:{}", sha256(&[0x5a_u8; 70_000])));
    assert_eq!(loaded.app.vms[0].name, "web-01");
    assert_eq!(loaded.app.disk_files[0].size_bytes, Some(70_000));
    let loc = &loaded.disks["web-01-disk1.vmdk"];
    assert!(matches!(loc, DiskLocation::OvaMember { size: 70_000, .. }));
    // Reading from an offset (resumed upload) yields exactly the member's tail.
    let mut tail = Vec::new();
    loc.open_at(69_990)
        .expect("open")
        .read_to_end(&mut tail)
        .expect("read");
    assert_eq!(tail, vec![0x5a_u8; 10]);
    // Nothing was extracted next to the archive.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["app.ova"]);
}

#[test]
fn traversal_and_absolute_member_names_are_refused() {
    for bad in ["../evil.vmdk", "/etc/cron.d/evil", "dir/web-01.ovf", ".."] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut members = single_vm_members();
        members.push((bad, b"x".to_vec()));
        let path = ova(dir.path(), &members);
        let err = load(&path, LoadOptions::default()).expect_err(bad);
        assert!(
            matches!(err, ImportError::Ova { .. })
                && err.to_string().contains("not a plain file name"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn links_and_devices_are_refused() {
    for kind in [
        tar::EntryType::Symlink,
        tar::EntryType::Link,
        tar::EntryType::Char,
        tar::EntryType::Directory,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in single_vm_members() {
            raw_member(&mut b, name, &data, tar::EntryType::Regular);
        }
        raw_member(&mut b, "sneaky", b"", kind);
        let path = dir.path().join("app.ova");
        std::fs::write(&path, b.into_inner().expect("tar")).expect("write");
        let err = load(&path, LoadOptions::default()).expect_err("link");
        assert!(
            err.to_string().contains("not a regular file"),
            "{kind:?}: {err}"
        );
    }
}

#[test]
fn manifest_mismatch_is_refused_unless_verification_is_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut members = single_vm_members();
    members[2].1[5] ^= 1;
    let path = ova(dir.path(), &members);
    let err = load(&path, LoadOptions::default()).expect_err("tampered");
    assert!(
        matches!(&err, ImportError::Checksum { member, .. } if member == "web-01-disk1.vmdk"),
        "{err}"
    );
    let loaded = load(
        &path,
        LoadOptions {
            verify_manifest: false,
            ..LoadOptions::default()
        },
    )
    .expect("unverified");
    assert!(loaded.verified.is_empty());
}

#[test]
fn missing_disk_member_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members: Vec<_> = single_vm_members()
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".mf") && !n.ends_with(".vmdk"))
        .collect();
    let path = ova(dir.path(), &members);
    let err = load(&path, LoadOptions::default()).expect_err("no disk");
    assert!(matches!(err, ImportError::MissingDisk { .. }), "{err}");
}

#[test]
fn every_missing_member_is_listed_in_one_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A three-disk vApp whose OVA lost its disks, and a manifest naming one more file.
    let mf = "SHA256(shop-db-1.vmdk)= 00\nSHA256(notes.txt)= 00\n";
    let path = ova(
        dir.path(),
        &[
            ("shop.ovf", fixture("vapp-collection.ovf")),
            ("shop.mf", mf.as_bytes().to_vec()),
        ],
    );
    let err = load(&path, LoadOptions::default()).expect_err("members missing");
    let ImportError::Problems(problems) = &err else {
        panic!("one error per member instead of a list: {err}");
    };
    assert_eq!(problems.len(), 4, "{problems:#?}");
    for disk in ["shop-db-1.vmdk", "shop-db-2.vmdk", "shop-web-1.vmdk"] {
        assert!(
            problems.iter().filter(|p| p.contains(disk)).count() == 1,
            "{disk} once: {problems:#?}"
        );
    }
    assert!(
        problems[3].contains(r#"manifest lists "notes.txt", which is not in the archive"#),
        "{problems:#?}"
    );
}

#[test]
fn oversize_descriptor_is_refused_before_parsing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = vec![b' '; (hvx_import::limits::MAX_DESCRIPTOR_BYTES + 1) as usize];
    let path = ova(dir.path(), &[("big.ovf", big)]);
    let err = load(&path, LoadOptions::default()).expect_err("too big");
    assert!(matches!(err, ImportError::TooLarge { .. }), "{err}");
}

#[test]
fn garbage_and_empty_archives_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("junk.ova");
    std::fs::write(&path, vec![0xff_u8; 3000]).expect("write");
    assert!(load(&path, LoadOptions::default()).is_err());
    std::fs::write(&path, vec![0_u8; 1024]).expect("write");
    let err = load(&path, LoadOptions::default()).expect_err("empty");
    assert!(err.to_string().contains("empty archive"), "{err}");
}

#[test]
fn ovf_with_disks_beside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ovf = dir.path().join("shop.ovf");
    std::fs::write(&ovf, fixture("vapp-collection.ovf")).expect("write");
    let err = load(&ovf, LoadOptions::default()).expect_err("disks missing");
    assert!(err.to_string().contains("shop-db-1.vmdk"), "{err}");
    for f in ["shop-db-1.vmdk", "shop-db-2.vmdk", "shop-web-1.vmdk"] {
        std::fs::write(dir.path().join(f), b"KDMV").expect("write disk");
    }
    let loaded = load(&ovf, LoadOptions::default()).expect("complete");
    assert_eq!(loaded.kind, SourceKind::Ovf);
    assert_eq!(loaded.disks.len(), 3);
    assert_eq!(loaded.app.disk_files[0].size_bytes, Some(4));
}

#[test]
fn huge_extension_headers_are_refused_before_being_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = tar::Builder::new(Vec::new());
    // A GNU long-name entry of 1 MiB: the tar reader would buffer it whole.
    raw_member(
        &mut b,
        "././@LongLink",
        &vec![b'a'; 1 << 20],
        tar::EntryType::GNULongName,
    );
    for (name, data) in single_vm_members() {
        raw_member(&mut b, name, &data, tar::EntryType::Regular);
    }
    let path = dir.path().join("app.ova");
    std::fs::write(&path, b.into_inner().expect("tar")).expect("write");
    let err = load(&path, LoadOptions::default()).expect_err("huge long name");
    assert!(err.to_string().contains("extension header"), "{err}");
}

#[test]
fn long_names_within_limits_still_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = tar::Builder::new(Vec::new());
    let mut members = single_vm_members();
    // Rename the disk to a 120-character name (needs a GNU long-name header) and
    // reference it from the descriptor.
    let long = format!("{}.vmdk", "d".repeat(115));
    let ovf = String::from_utf8(members[0].1.clone())
        .expect("utf8")
        .replace("web-01-disk1.vmdk", &long);
    members[0].1 = ovf.into_bytes();
    for (name, data) in &members {
        if name.ends_with(".vmdk") {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, &long, data.as_slice())
                .expect("append long");
        } else if !name.ends_with(".mf") {
            raw_member(&mut b, name, data, tar::EntryType::Regular);
        }
    }
    let path = dir.path().join("app.ova");
    std::fs::write(&path, b.into_inner().expect("tar")).expect("write");
    let loaded = load(&path, LoadOptions::default()).expect("long name OVA");
    assert_eq!(loaded.app.disk_files[0].name, long);
}

#[test]
fn truncated_archives_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = ova(dir.path(), &single_vm_members());
    let bytes = std::fs::read(&path).expect("read");
    // Cut in the middle of the disk member.
    std::fs::write(&path, &bytes[..bytes.len() - 1024 - 30_000]).expect("truncate");
    let err = load(&path, LoadOptions::default()).expect_err("truncated");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn windows_1252_vmx_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vmx = dir.path().join("w.vmx");
    // "Serveur Société" in windows-1252: 0xE9 is not valid UTF-8 on its own.
    let mut bytes = b".encoding = \"windows-1252\"\ndisplayName = \"Serveur Soci".to_vec();
    bytes.extend_from_slice(&[0xe9]);
    bytes.extend_from_slice(b"t\xe9\"\nmemsize = \"512\"\n");
    std::fs::write(&vmx, bytes).expect("write");
    let loaded = load(&vmx, LoadOptions::default()).expect("cp1252 VMX");
    assert_eq!(loaded.app.vms[0].name, "Serveur Société");
}
