//! The HVX VMM profile: VMware-compatible QEMU machines, QMP client, accelerator probe.
//!
//! Pure parts (spec, validation, QEMU argv) are separate from the parts that run things
//! (QMP client, accelerator probe, VM supervisor, serial console).
#![forbid(unsafe_code)]

pub mod accel;
pub mod argv;
pub mod console;
mod error;
pub mod migration;
pub mod postcopy;
pub mod qmp;
pub mod replication;
pub mod spec;
pub mod validate;
pub mod vm;

pub use accel::{AcceleratorReport, probe_accelerator};
pub use argv::{Accel, RunPaths, build_argv};
pub use error::{Result, VmmError};
pub use spec::VmSpec;
pub use validate::validate;
