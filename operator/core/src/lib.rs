//! The operator's core: what every controller uses and nothing that is one controller's
//! business. The shared caches ([`stores`]), the typed node agent client ([`agents`]),
//! the error type ([`error`]), settings and shared state ([`context`]), the cleanup
//! finalizer ([`finalize`]), events, metrics and leader election.
//!
//! Dependencies run one way: `hvx-operator` (controllers) -> `hvx-operator-plan` (pure
//! planning) -> this crate. Cargo enforces it: nothing here can name a controller.
#![forbid(unsafe_code)]

pub mod agents;
pub mod context;
pub mod defaults;
pub mod error;
pub mod events;
pub mod finalize;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod owed;
pub mod stores;

pub use context::{Context, OperatorConfig};
pub use error::Error;

/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "hvx-operator";
/// Finalizer guarding node-side cleanup.
pub const FINALIZER: &str = "hvx.dev/cleanup";
