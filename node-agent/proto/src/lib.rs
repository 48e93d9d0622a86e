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

/// The kubelet-facing APIs the agent serves on its node (`vm.hvx.dev` CSI driver):
/// hand-written subsets of the upstream protos, in `csi.proto` and
/// `pluginregistration.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod csi {
    include!("gen/csi.v1.rs");
}

/// The kubelet's plugin registration API (`pluginregistration.proto`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pluginregistration {
    include!("gen/pluginregistration.rs");
}

/// The kubelet's device plugin API, v1beta1 (`deviceplugin.proto`): the agent's
/// `devices.hvx.dev/kvm` resource.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod deviceplugin {
    include!("gen/v1beta1.rs");
}

/// The `.proto` files `src/gen/` is generated from (`make generate`).
pub const PROTO_FILES: [&str; 4] = [
    "agent.proto",
    "csi.proto",
    "pluginregistration.proto",
    "deviceplugin.proto",
];

/// Default TCP port of the agent's gRPC server (hostNetwork).
pub const AGENT_PORT: u16 = 9443;
