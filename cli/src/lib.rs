//! kubectl-hvx: import VMware OVA/OVF/VMX exports as hvx.dev resources, upload their
//! disks, and operate VMs (console, migrate, snapshot).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod console;
pub mod credentials;
pub mod doctor;
pub mod error;
pub mod manifests;
pub mod names;
pub mod objects;
pub mod plan;
pub mod render;
pub mod slots;
pub mod status;
pub mod table;
pub mod upload;
pub mod vm_spec;

pub use error::{CliError, Result};
