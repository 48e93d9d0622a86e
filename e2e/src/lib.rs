//! End-to-end test support: a client for the cluster `$KUBECONFIG` names, wait
//! helpers, and small pure helpers over Kubernetes objects. Works against any
//! cluster (the local harness of `make cluster-up`, or kind).
#![forbid(unsafe_code)]

pub mod error;
pub mod kubeconfig;
pub mod objects;
pub mod tools;
pub mod wait;

pub use error::E2eError;
