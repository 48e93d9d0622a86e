//! gRPC contract between the hvx operator and its node agents. The contract itself,
//! with each call's legality, idempotence and errors, is documented in `agent.proto`;
//! `src/gen/` is generated from it by `make generate` and checked for drift.
#![forbid(unsafe_code)]

/// `hvx.agent.v1`: generated messages, client and server.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod v1 {
    include!("gen/hvx.agent.v1.rs");
}

/// Default TCP port of the agent's gRPC server (hostNetwork).
pub const AGENT_PORT: u16 = 9443;
