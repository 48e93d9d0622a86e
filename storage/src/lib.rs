//! Copy-on-write disk store: safe import of VMware disk formats, overlays, snapshots
#![forbid(unsafe_code)]

pub mod blank;
pub mod chain;
pub mod disks;
pub mod egress;
pub mod error;
pub mod format;
pub mod gc;
pub mod http;
pub mod moves;
pub mod names;
pub mod ova;
pub mod qemu_img;
pub mod qmp;
pub mod relay;
pub mod sources;
pub mod status;
pub mod store;
pub mod tar;
pub mod writeback;

pub use error::{Result, StorageError};
pub use sources::ImportSource;
pub use store::{BaseImage, DiskStore, ImportPhase, ProgressFn, StoreConfig};
