//! hvx node agent.
#![forbid(unsafe_code)]
pub mod launcher;
