//! The HVX VMM profile: VMware-compatible QEMU machines, QMP client, accelerator probe
#![forbid(unsafe_code)]
