//! Disk image inspection (VMDK sparse and descriptor, qcow2, VHD, VHDX, raw): a
//! hostile image must end in Ok or Err, never panic, hang or allocate without bound.
//! The input is the entry file; a second file after a `\0--extent--\0` marker becomes
//! `disk-flat.vmdk`, so descriptors can name a real extent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const MARKER: &[u8] = b"\0--extent--\0";

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"))
}

fuzz_target!(|data: &[u8]| {
    let (entry, extent) = match data.windows(MARKER.len()).position(|w| w == MARKER) {
        Some(at) => (&data[..at], Some(&data[at + MARKER.len()..])),
        None => (data, None),
    };
    let dir = dir().path();
    std::fs::write(dir.join("disk.vmdk"), entry).expect("write entry");
    let flat = dir.join("disk-flat.vmdk");
    match extent {
        Some(bytes) => std::fs::write(&flat, bytes).expect("write extent"),
        None => {
            let _ = std::fs::remove_file(&flat);
        }
    }
    let limits = hvx_storage::format::ImportLimits::default();
    let _ = hvx_storage::format::inspect(dir, "disk.vmdk", &limits);
});
