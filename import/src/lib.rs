//! OVF, OVA and VMX parsers that turn VMware exports into hvx applications.
//!
//! Pure parsers ([`ovf::parse`], [`vmx::parse`] + [`vmx_vm::application`]) produce a
//! neutral [`ImportedApplication`]; [`load`] reads an export from disk (an OVA in place,
//! never extracted) and locates its disks. No Kubernetes types here: `kubectl-hvx`
//! maps the model to the hvx.dev resources.
#![forbid(unsafe_code)]

pub mod devices;
pub mod error;
pub mod limits;
pub mod load;
pub mod model;
pub mod ova;
pub mod ovf;
mod ovf_extras;
mod ovf_sections;
mod ovf_storage;
mod ovf_vcloud;
mod ovf_vm;
pub mod vm;
pub mod vmdk;
pub mod vmx;
pub mod vmx_vm;

pub use error::{ImportError, Result};
pub use load::{DiskLocation, LoadOptions, Loaded, SourceKind, load};
pub use model::*;
