//! The hvx operator: one controller per hvx.dev kind, each a pipeline of
//! fetch -> validate (pure) -> build desired objects (pure) -> server-side apply ->
//! status. Level-triggered: a restart mid-operation recomputes everything from the
//! cluster's state, and one malformed object only ever fails its own reconcile.
//!
//! Layout (docs/architecture.md): this crate holds the controllers and their node-side
//! steps; `hvx-operator-plan` the pure planning; `hvx-operator-core` what they share.
#![forbid(unsafe_code)]

pub mod disk;
pub mod diskmove;
pub mod drain;
pub mod hostprep;
pub mod migration;
pub mod network;
pub mod replay;
pub mod run;
pub mod sweep;
pub mod trust;
pub mod uninstall;
pub mod upload;
pub mod vmapp;

// The core and the planning crates, under the paths the controllers use.
pub use hvx_operator_core::{
    FIELD_MANAGER, FINALIZER, agents, context, error, events, finalize, leader, liveness, metrics,
    owed, stores,
};
pub use hvx_operator_plan::{build, hostplan, migplan, startdelay, status};

pub use context::{Context, OperatorConfig};
pub use error::Error;
