//! The one error type of kubectl-hvx's library: one variant per failing step.

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Reading or parsing the export failed.
    #[error(transparent)]
    Import(#[from] hvx_import::ImportError),
    /// The export maps to resources the API would reject.
    #[error("the imported application is not valid for hvx:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    /// A command-line value is malformed.
    #[error("{0}")]
    Usage(String),
    /// Serialising a manifest failed.
    #[error("cannot render {what} as YAML: {source}")]
    Render {
        /// The object.
        what: String,
        /// The serde error.
        source: serde_yaml::Error,
    },
    /// Writing output files failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The upload endpoint refused or failed.
    #[error("upload of {disk} failed: {reason}")]
    Upload {
        /// The OverlayDisk.
        disk: String,
        /// What went wrong.
        reason: String,
    },
    /// The upload endpoint refused for a reason retrying cannot fix (credentials,
    /// rights, size).
    #[error("upload of {disk} refused: {reason}")]
    UploadRefused {
        /// The OverlayDisk.
        disk: String,
        /// The endpoint's answer.
        reason: String,
    },
    /// Talking to the Kubernetes API failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client error.
        source: kube::Error,
    },
    /// The cluster holds nothing matching the request.
    #[error("{0}")]
    NotFound(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CliError>;
