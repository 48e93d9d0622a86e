//! Who may talk to whom between the operator and the node agents.
//!
//! - The operator holds the CA ([`ca::Ca`]). It mints its own client certificate
//!   (client-auth only, named [`OPERATOR_NAME`]) and signs each agent's CSR with a
//!   short-lived server-auth-only certificate naming the agent's node
//!   ([`agent_server_name`]), after a TokenReview proved the request came from the agent
//!   ServiceAccount of a pod on that node ([`review`]; served by [`issuer`]).
//! - An agent keeps its key on its node, asks for a certificate at start and at half
//!   life ([`enroll`]) and serves gRPC only to clients presenting the operator's
//!   identity ([`verify::OperatorClientVerifier`]); its certificate and trust roots are
//!   re-read when their files change ([`reload`]), so renewal needs no restart.
//! - The operator dials each agent with the server name of the node it means to reach,
//!   so one node's certificate cannot answer for another.
#![forbid(unsafe_code)]

pub mod ca;
pub mod enroll;
pub mod issuer;
pub mod pem;
pub mod reload;
pub mod review;
pub mod verify;

use std::time::Duration;

/// The name (SAN dNSName and CN) of the operator's client certificate; agents serve
/// only clients presenting it.
pub const OPERATOR_NAME: &str = "hvx-operator";
/// Audience of the ServiceAccount token an agent presents when asking for a certificate.
pub const TOKEN_AUDIENCE: &str = "hvx-operator";
/// The ServiceAccount (in the operator's namespace) agents run as.
pub const AGENT_SERVICE_ACCOUNT: &str = "hvx-agent";
/// TokenReview `user.extra` key naming the node of the pod a token is bound to
/// (set by Kubernetes for pod-bound tokens since 1.30, GA in 1.32).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The Service in front of the operator's certificate endpoint.
pub const ISSUER_SERVICE: &str = "hvx-identity";
/// Default port of the operator's certificate endpoint.
pub const ISSUER_PORT: u16 = 9445;
/// Path of the certificate request on the operator's endpoint.
pub const ISSUE_PATH: &str = "/v1/agent-certificate";
/// ConfigMap (operator's namespace) holding the CA bundle agents trust.
pub const CA_CONFIGMAP: &str = "hvx-agent-ca";
/// Lifetime of agent and operator leaf certificates; both renew at half life.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Server name of the agent of `node`: SAN of its certificate, and the name the
/// operator verifies when it dials that node.
pub fn agent_server_name(node: &str) -> String {
    format!("{node}.agent.hvx")
}

/// Server name of the operator's certificate endpoint in `namespace`.
pub fn issuer_server_name(namespace: &str) -> String {
    format!("{ISSUER_SERVICE}.{namespace}.svc")
}

/// Whether `name` is a valid Kubernetes node name (a DNS-1123 subdomain), so that
/// `<name>.agent.hvx` is a valid DNS name.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// What can go wrong with identities.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// PEM or DER that does not hold what it should.
    #[error("{what}: {reason}")]
    BadPem {
        /// What was read.
        what: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Making or signing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A certificate request asks for something the requester may not have.
    #[error("certificate request refused: {0}")]
    CsrRefused(String),
    /// The token does not prove an agent identity (unauthenticated, wrong audience,
    /// wrong ServiceAccount, no node).
    #[error("token refused: {0}")]
    TokenRefused(String),
    /// A TLS peer is not who it must be.
    #[error("peer refused: {0}")]
    PeerRefused(String),
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(String),
    /// The operator's certificate endpoint answered with an error.
    #[error("certificate endpoint {url}: HTTP {status}: {body}")]
    Issuer {
        /// Where the request went.
        url: String,
        /// HTTP status.
        status: u16,
        /// The answer's text.
        body: String,
    },
    /// The operator's certificate endpoint could not be reached.
    #[error("certificate endpoint {url}: {reason}")]
    Unreachable {
        /// Where the request went.
        url: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Installs ring as rustls's process-wide crypto provider (tonic and kube use the same);
/// a second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(valid_node_name("worker-1"));
        assert!(valid_node_name("ip-10-0-0-1.ec2.internal"));
        for bad in [
            "",
            "Worker",
            "a..b",
            "-a",
            "a-",
            "a_b",
            "a/b",
            &"x".repeat(64),
        ] {
            assert!(!valid_node_name(bad), "{bad}");
        }
        assert_eq!(agent_server_name("n1"), "n1.agent.hvx");
    }
}
