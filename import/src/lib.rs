//! OVF, OVA and VMX parsers that turn VMware exports into hvx applications
#![forbid(unsafe_code)]
