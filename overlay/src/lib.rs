//! Overlay switch: per-network bridge + VXLAN with head-end replication, DHCP/DNS, NAT, firewall
#![forbid(unsafe_code)]
