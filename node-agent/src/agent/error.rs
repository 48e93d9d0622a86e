//! The agent's one error type, and how each maps to the gRPC codes agent.proto
//! documents (INVALID_ARGUMENT: never succeeds as asked; FAILED_PRECONDITION: missing
//! here; RESOURCE_EXHAUSTED: node full; INTERNAL: a host tool failed).

use hvx_storage::StorageError;
use tonic::{Code, Status};

/// Everything an agent call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request can never succeed as written.
    #[error("{0}")]
    Invalid(String),
    /// Something the call needs is not on this node (yet).
    #[error("{0}")]
    Precondition(String),
    /// The disk store refused or failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The overlay switch failed.
    #[error(transparent)]
    Overlay(#[from] hvx_overlay::OverlayError),
    /// A VMM (QMP) operation failed.
    #[error(transparent)]
    Vmm(#[from] hvx_vmm::VmmError),
    /// Local file I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The call is not implemented by this agent.
    #[error("{0}")]
    Unimplemented(String),
    /// The caller may not have this (a volume for a pod hvx did not make):
    /// PERMISSION_DENIED.
    #[error("{0}")]
    Refused(String),
    /// A host tool (mount) failed.
    #[error("{0}")]
    Host(String),
    /// The node has no room for it: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Full(String),
    /// Not decidable right now (a QEMU that does not answer, a rollback still
    /// settling): the caller asks again (ABORTED, which clients retry).
    #[error("{0}")]
    Retry(String),
}

impl AgentError {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            AgentError::Invalid(_) => Code::InvalidArgument,
            AgentError::Precondition(_) => Code::FailedPrecondition,
            AgentError::Unimplemented(_) => Code::Unimplemented,
            AgentError::Retry(_) => Code::Aborted,
            AgentError::Full(_) => Code::ResourceExhausted,
            AgentError::Refused(_) => Code::PermissionDenied,
            AgentError::Host(_) => Code::Internal,
            AgentError::Storage(e) => match e {
                StorageError::Refused { .. }
                | StorageError::TooLarge { .. }
                | StorageError::CorruptHeader { .. }
                | StorageError::Truncated { .. }
                | StorageError::Checksum { .. }
                | StorageError::BadChecksum(_)
                | StorageError::Ova { .. }
                | StorageError::InvalidName { .. } => Code::InvalidArgument,
                StorageError::NoSpace { .. } => Code::ResourceExhausted,
                StorageError::BaseNotFound(_) | StorageError::DiskNotFound(_) => {
                    Code::FailedPrecondition
                }
                StorageError::Download { .. } => Code::Unavailable,
                _ => Code::Internal,
            },
            AgentError::Overlay(e) => match e {
                hvx_overlay::OverlayError::InvalidSpec { .. }
                | hvx_overlay::OverlayError::InvalidMac(_)
                | hvx_overlay::OverlayError::InvalidCidr(_) => Code::InvalidArgument,
                // The node lacks what the network asks of it (its uplink).
                hvx_overlay::OverlayError::External { .. } => Code::FailedPrecondition,
                _ => Code::Internal,
            },
            AgentError::Vmm(_) | AgentError::Io { .. } => Code::Internal,
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn codes_follow_the_contract() {
        let refused = AgentError::Storage(StorageError::Refused {
            path: PathBuf::from("x.vmdk"),
            reason: "names a host file".into(),
        });
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert_eq!(
            AgentError::Storage(StorageError::BaseNotFound("sha256:ab".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            AgentError::Precondition("VM running".into()).code(),
            Code::FailedPrecondition
        );
        assert_eq!(AgentError::Retry("QEMU busy".into()).code(), Code::Aborted);
        let s: Status = AgentError::Invalid("bad MAC".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "bad MAC");
    }
}
