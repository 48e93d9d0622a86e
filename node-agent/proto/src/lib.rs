//! gRPC contract between operator and node agents.
#![forbid(unsafe_code)]
