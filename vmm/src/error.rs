//! The crate's error type: one variant per failing step.

use std::path::PathBuf;

/// Everything that can go wrong in hvx-vmm.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The spec is not valid JSON for `VmSpec`.
    #[error("VM spec is not valid: {0}")]
    SpecParse(String),
    /// The spec parsed but describes an impossible machine.
    #[error("VM spec is invalid: {}", .0.join("; "))]
    SpecInvalid(Vec<String>),
    /// Filesystem work in the run dir failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before it was ready.
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    EarlyExit {
        /// Exit status.
        status: String,
        /// Its last stderr lines.
        stderr: String,
    },
    /// Connecting to a QEMU socket failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The QMP connection broke or spoke something else.
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
    /// QEMU answered a QMP command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    QmpCommand {
        /// The command.
        command: String,
        /// QMP error class (GenericError, CommandNotFound, DeviceNotFound ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Waiting for something took too long.
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: f64,
    },
    /// The VM is not in a state that allows the operation.
    #[error("cannot {op}: VM is {state}")]
    BadState {
        /// The operation.
        op: &'static str,
        /// Its current state.
        state: String,
    },
    /// A forced accelerator is unusable.
    #[error("accelerator {accel} unusable: {reason}")]
    Accelerator {
        /// The accelerator.
        accel: String,
        /// Why.
        reason: String,
    },
    /// Migration / suspend to file failed.
    #[error("{op} failed: {reason}")]
    Migration {
        /// suspend / resume.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// Disk replication to another node's NBD export failed.
    #[error("replication of disk {disk}: {reason}")]
    Replication {
        /// The VM disk.
        disk: String,
        /// Why.
        reason: String,
    },
}

/// Crate result alias.
pub type Result<T, E = VmmError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> VmmError {
    let path = path.into();
    move |source| VmmError::Io { what, path, source }
}
