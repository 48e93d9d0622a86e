//! The hvx operator: one controller per hvx.dev kind, each a pipeline of
//! fetch -> validate (pure) -> build desired objects (pure) -> server-side apply ->
//! status. Level-triggered: a restart mid-operation recomputes everything from the
//! cluster's state, and one malformed object only ever fails its own reconcile.
#![forbid(unsafe_code)]

pub mod agents;
pub mod build;
pub mod context;
pub mod disk;
pub mod diskmove;
pub mod drain;
pub mod error;
pub mod finalize;
pub mod hostplan;
pub mod hostprep;
pub mod leader;
pub mod metrics;
pub mod migplan;
pub mod migration;
pub mod network;
pub mod run;
pub mod startdelay;
pub mod status;
pub mod stores;
pub mod sweep;
pub mod uninstall;
pub mod upload;
pub mod vmapp;

pub use context::{Context, OperatorConfig};
pub use error::Error;

/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "hvx-operator";
/// Finalizer guarding node-side cleanup.
pub const FINALIZER: &str = "hvx.dev/cleanup";
