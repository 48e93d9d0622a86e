//! The one error type of hvx-storage: one variant per failing step.
use std::path::PathBuf;

/// Everything that can go wrong in the disk store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("reading or writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: truncated {format} image: {what}")]
    Truncated {
        path: PathBuf,
        format: &'static str,
        what: String,
    },
    #[error("{path}: corrupt {format} header: {reason}")]
    CorruptHeader {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// The image is well formed but refers to something outside the import (a host file,
    /// a backing file, an external data file, a raw device): refused before qemu-img opens it.
    #[error("{path}: refused: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("{path}: {what} is {value} bytes, over the limit of {limit} bytes")]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("parsing output of `{command}`: {reason}")]
    CommandOutput { command: String, reason: String },
    #[error("downloading {url}: {reason}")]
    Download { url: String, reason: String },
    #[error("checksum mismatch for {what}: expected sha256 {expected}, got {actual}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("invalid checksum {0:?}: expected 64 hex digits of sha256")]
    BadChecksum(String),
    #[error("OVA {path}: {reason}")]
    Ova { path: PathBuf, reason: String },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("disk {disk}: {reason}")]
    Snapshot { disk: String, reason: String },
    #[error("QMP command {command} failed: {reason}")]
    Qmp { command: String, reason: String },
    #[error("metadata {path}: {source}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("base image {0} not found in the store")]
    BaseNotFound(String),
    #[error("disk {0} not found in the store")]
    DiskNotFound(String),
    #[error("disk {0} already exists")]
    DiskExists(String),
    #[error("not enough space in {path}: {needed} bytes needed, {available} available")]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("background task failed: {0}")]
    Join(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Adds the path to an io::Error (the error alone never says which file).
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.into();
    move |source| StorageError::Io { path, source }
}
