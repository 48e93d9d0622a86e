//! What the privileged node-agent tests share: the test guest and the root check.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory of the small BIOS-bootable test guest (`hack/build-guest.sh` builds
/// it once and prints it; later calls hit its cache).
pub fn guest_dir() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/build-guest.sh");
    let out = Command::new(&script)
        .output()
        .expect("run hack/build-guest.sh");
    assert!(
        out.status.success(),
        "build-guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("guest dir")
            .trim(),
    )
}

/// Whether the tests run as root (they need netns, taps, QEMU, mounts).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
