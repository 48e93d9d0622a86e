//! hvx node agent (`hvx-node-agent`) and VM launcher (`hvx-launcher`).
// `deny`, not `forbid`: `fdpass` alone allows it (fd passing and TUNSETIFF).
#![deny(unsafe_code)]
pub mod agent;
pub mod fdpass;
pub mod launcher;
pub mod sealcheck;
pub mod tapfd;
