//! The crate's one error type: one variant per failing step.

use std::path::PathBuf;

/// Everything that can go wrong while validating, planning or applying a network.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("invalid network spec for {network:?}: {reason}")]
    InvalidSpec { network: String, reason: String },
    #[error("network {network:?} cannot join its external segment on this node: {reason}")]
    External { network: String, reason: String },
    #[error("invalid MAC address {0:?}: expected six hex octets separated by ':'")]
    InvalidMac(String),
    #[error("invalid IPv4 CIDR {0:?}: expected A.B.C.D/N with N <= 32")]
    InvalidCidr(String),
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed (exit {status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not parse the JSON printed by `{command}`: {source}")]
    ParseOutput {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dnsmasq for network {network:?} did not write its pid file {pid_file} in time")]
    DnsmasqStart { network: String, pid_file: PathBuf },
    #[error("teardown of {what} left {count} error(s): {messages}")]
    Teardown {
        what: String,
        count: usize,
        messages: String,
    },
}

pub type Result<T> = std::result::Result<T, OverlayError>;
