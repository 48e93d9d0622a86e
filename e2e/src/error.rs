//! The one error type of the e2e support crate.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error(
        "KUBECONFIG is not set: run `make cluster-up` and use KUBECONFIG=_out/kubeconfig, or point it at any cluster"
    )]
    KubeconfigUnset,
    #[error("reading kubeconfig {path}: {source}")]
    KubeconfigRead {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("building a client from kubeconfig {path}: {source}")]
    ClientConfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("timed out after {waited:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "no kubectl found: set KUBECTL, run `make cluster-up` (builds one) or put kubectl on PATH"
    )]
    NoKubectl,
    #[error("check failed: {0}")]
    Check(String),
}

impl E2eError {
    /// Wraps a kube API error with what the test was doing.
    pub fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| Self::Api { what, source }
    }
}
