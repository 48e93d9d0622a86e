//! kubectl-hvx.
#![forbid(unsafe_code)]
fn main() {}
