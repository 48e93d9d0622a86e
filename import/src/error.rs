//! The one error type of hvx-import: one variant per failing step.

use std::path::PathBuf;

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The input is larger than hvx accepts for that kind of file.
    #[error("{what} is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The file kind could not be told from its name or content.
    #[error("{path}: not an OVA, OVF or VMX file (expected a .ova, .ovf or .vmx name)")]
    UnknownKind {
        /// The file.
        path: PathBuf,
    },
    /// The OVF descriptor is not well-formed XML (or uses a DTD, which is refused).
    #[error("OVF descriptor is not valid XML: {0}")]
    Xml(String),
    /// The OVF descriptor is XML but not a usable OVF envelope.
    #[error("OVF descriptor: {0}")]
    Ovf(String),
    /// A VMX file line or value is malformed.
    #[error("VMX line {line}: {reason}")]
    Vmx {
        /// 1-based line number (0 when the problem is not on one line).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Some element, member or device count exceeds a hard limit.
    #[error("too many {what}: {count} (limit {limit})")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// How many were found.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The OVA archive is malformed or holds a member hvx refuses.
    #[error("OVA {path}: {reason}")]
    Ova {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A member's content does not match the `.mf` manifest.
    #[error("checksum mismatch for {member}: manifest says {expected}, content is {actual}")]
    Checksum {
        /// The member checked.
        member: String,
        /// Digest in the manifest.
        expected: String,
        /// Digest of the content.
        actual: String,
    },
    /// The descriptor references a disk file that is not there.
    #[error("disk file {name:?} referenced by the descriptor is missing ({looked_in})")]
    MissingDisk {
        /// File name as the descriptor wrote it.
        name: String,
        /// Where it was looked for.
        looked_in: String,
    },
    /// A disk file hvx cannot take as it is.
    #[error("disk file {name:?} cannot be imported: {reason}")]
    UnsupportedDisk {
        /// File name.
        name: String,
        /// Why, and what to do.
        reason: String,
    },
    /// Several problems in one export, all reported at once.
    #[error("the export has {} problems:\n  - {}", .0.len(), .0.join("\n  - "))]
    Problems(Vec<String>),
    /// A file name in the descriptor is not a plain relative name.
    #[error("unsafe file name {0:?} in the descriptor: only plain relative names are accepted")]
    UnsafeName(String),
}

impl ImportError {
    /// One error for all of `problems`: none is `Ok`, one is itself, more are
    /// [`ImportError::Problems`].
    pub fn collect(mut problems: Vec<ImportError>) -> Result<()> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            // The list says "the export has N problems"; each line needs no prefix.
            _ => Err(ImportError::Problems(
                problems
                    .into_iter()
                    .map(|p| match p {
                        ImportError::Ovf(m) => m,
                        other => other.to_string(),
                    })
                    .collect(),
            )),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ImportError>;
