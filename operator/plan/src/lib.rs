//! Pure planning for the operator's controllers: from objects (and what they reference)
//! to the launcher pods, launch specs, agent requests and statuses that should be.
//! No I/O here, so every rule is unit-tested; controllers do the I/O.
//!
//! Depends only on `hvx-operator-core` (settings) and the API types; the controllers in
//! `hvx-operator` depend on it, never the other way.
#![forbid(unsafe_code)]

pub mod build;
pub mod hostplan;
pub mod migplan;
pub mod pods;
pub mod startdelay;
pub mod status;

// The paths the planning modules use for the core's settings.
pub use hvx_operator_core::context;
