//! The operator's error type: one variant per failing step, so the metric label and
//! the log say where a reconcile failed.

use thiserror::Error;

/// Everything a reconcile can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// Reading or writing the Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object cannot be turned into desired state (a bug or an unexpected shape:
    /// user errors become a `Valid=False` condition instead).
    #[error("building desired state for {object}: {reason}")]
    Build {
        /// The object.
        object: String,
        /// What was wrong.
        reason: String,
    },
    /// Serializing an object failed.
    #[error("serializing {what}: {source}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The cause.
        source: serde_json::Error,
    },
    /// A node agent refused or failed a call (after retries for transient codes).
    #[error("node agent on {node}: {message}")]
    Agent {
        /// The node.
        node: String,
        /// Call, gRPC code and the agent's message.
        message: String,
    },
    /// No free VXLAN network identifier is left.
    #[error("no free VNI in {min}..={max}")]
    VniExhausted {
        /// Lowest VNI hvx allocates.
        min: u32,
        /// Highest VNI hvx allocates.
        max: u32,
    },
}

impl Error {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Build { .. } => "build",
            Error::Serialize { .. } => "serialize",
            Error::VniExhausted { .. } => "vni_exhausted",
            Error::Agent { .. } => "agent",
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}
