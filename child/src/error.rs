//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong tracking or reaping processes.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The record directory or a record file could not be written or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record is not valid JSON.
    #[error("record {path} is not valid: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A recorded process did not die after SIGKILL.
    #[error("process {pid} ({what}) is still alive after SIGKILL")]
    Unkillable {
        /// Its pid.
        pid: u32,
        /// What it was.
        what: String,
    },
}
