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
    #[error("node agent on {node}: {call}: {code:?}: {message}")]
    Agent {
        /// The node.
        node: String,
        /// The RPC (`connect` when no call could be made).
        call: &'static str,
        /// The gRPC code the agent (or the transport) answered.
        code: tonic::Code,
        /// The agent's message.
        message: String,
    },
    /// The kernel's random source could not be read (a key is never made without it).
    #[error("random source {source_path}: {reason}")]
    Random {
        /// The device read.
        source_path: String,
        /// Why it failed.
        reason: String,
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
    /// The gRPC code of an agent's answer (`None` for other errors).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// What went wrong, without the node and call (an agent's own message), for texts
    /// that name them already.
    pub fn message(&self) -> String {
        match self {
            Error::Agent { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Build { .. } => "build",
            Error::Serialize { .. } => "serialize",
            Error::VniExhausted { .. } => "vni_exhausted",
            Error::Random { .. } => "random",
            Error::Agent { .. } => "agent",
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}
