//! The VM launcher: the container of each VM's pod. A thin layer over `hvx-vmm`:
//! read the spec (VmSpec JSON from tests or the operator's `LaunchSpec`), map and
//! resolve it, pick the accelerator, run and supervise QEMU.

pub mod host;
pub mod map;
pub mod supervise;

use std::path::PathBuf;

/// Launcher errors.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// Reading the spec file failed.
    #[error("cannot read spec {path}: {source}")]
    ReadSpec {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The text is neither a VmSpec nor a LaunchSpec.
    #[error("spec is neither a VmSpec ({vm}) nor a LaunchSpec ({launch})")]
    ParseSpec {
        /// Why it is not a VmSpec.
        vm: String,
        /// Why it is not a LaunchSpec.
        launch: String,
    },
    /// The LaunchSpec cannot be mapped (missing resolution, unknown disk/NIC).
    #[error("cannot map the launch spec: {0}")]
    Map(String),
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] hvx_vmm::VmmError),
    /// A migration target has no TLS pre-shared key: it refuses to listen in
    /// plaintext.
    #[error(
        "migration target: no TLS pre-shared key at {key}; refusing to listen for the VM in plaintext"
    )]
    NoMigrationKey {
        /// The key file the agent should have written.
        key: PathBuf,
    },
    /// The status file could not be written.
    #[error("cannot write status {path}: {source}")]
    Status {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
