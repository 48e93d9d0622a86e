//! hvx node agent (`hvx-node-agent`) and VM launcher (`hvx-launcher`).
#![forbid(unsafe_code)]
pub mod agent;
pub mod launcher;
pub mod sealcheck;
