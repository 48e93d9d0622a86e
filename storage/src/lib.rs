//! Copy-on-write disk store: safe import of VMware disk formats, overlays, snapshots
#![forbid(unsafe_code)]
