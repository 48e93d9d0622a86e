//! Hard limits that keep hostile or broken inputs from exhausting memory or time.
//! They are far above what any real VMware export holds.

/// Largest OVF descriptor read (vSphere descriptors are a few hundred KiB at most).
pub const MAX_DESCRIPTOR_BYTES: u64 = 16 << 20;
/// Largest VMX file read.
pub const MAX_VMX_BYTES: u64 = 4 << 20;
/// Largest `.mf` manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Most XML nodes in one descriptor.
pub const MAX_XML_NODES: u32 = 500_000;
/// Deepest XML element nesting.
pub const MAX_XML_DEPTH: usize = 64;
/// Most VMs in one application.
pub const MAX_VMS: usize = 64;
/// Most NICs in one VM.
pub const MAX_NICS: usize = 10;
/// Most disks in one VM.
pub const MAX_DISKS: usize = 60;
/// Most hardware items in one VM's VirtualHardwareSection.
pub const MAX_ITEMS: usize = 1024;
/// Most members in one OVA archive.
pub const MAX_OVA_MEMBERS: usize = 4096;
/// Most lines in one VMX file.
pub const MAX_VMX_LINES: usize = 50_000;
/// Longest member or file name accepted.
pub const MAX_NAME_LEN: usize = 255;
