//! hvx overlay switch: real L2 between VMs on any cloud that routes unicast IP.
//!
//! Per VirtualNetwork and node: a Linux bridge `hvb<vni>` with the VM ports, and a
//! VXLAN device `hvv<vni>` (no multicast group, `nolearning`). Broadcast, multicast
//! and unknown unicast are head-end replicated: one all-zero-MAC FDB entry per remote
//! VTEP. Known VM MACs get a unicast VXLAN FDB entry (MAC -> VTEP) and a static bridge
//! FDB entry (MAC -> port), so known unicast never floods; a MAC move (migration)
//! is one `bridge fdb replace` per node, batched in one process.
//!
//! The module split follows "pure plan, thin applier":
//! [`spec`] (input) -> [`plan`] (desired state, [`nft`] and [`dnsmasq`] text; pure)
//! -> [`apply`] (diff against [`observe`]d kernel state, run only the difference via
//! [`host`]) and [`daemon`] (dnsmasq lifecycle).
//!
//! VLANs without 8021q or bridge `vlan_filtering` (this kernel has neither): the
//! bridge never looks at tags when filtering is off, so frames a guest tags itself
//! pass through unchanged, across the tunnel too (VXLAN carries the whole inner
//! frame). Access VLANs (a vSphere port group with a VLAN ID) are mapped by the
//! operator to their own VirtualNetwork, hence their own VNI and bridge: isolation
//! by construction instead of by tag. Anti-spoofing and TCP/UDP/ICMP rules read the
//! IPv4 inside a guest's tag (the kernel moves the tag to packet metadata first); a
//! deny default drops tagged IP as well; protocol-`any` rules match untagged IPv4.
//!
//! External L2 ([`ExternalL2`]): on the one node the control plane picks, a node
//! uplink (or a VLAN sub-interface of it) or a VXLAN device towards an external
//! VTEP joins the bridge as an outward port like the tunnel: in the segment's
//! firewall, kept from the distributed gateway, no anti-spoofing.
//!
//! MTU: VXLAN over IPv4 adds 50 bytes. With an underlay MTU >= 1550 the overlay keeps
//! 1500 and guests need nothing ([`plan::MtuMode::Transparent`]); otherwise links
//! get `underlay - 50`, DHCP option 26 announces it and TCP SYNs crossing the switch
//! get their MSS clamped, for guests that ignore option 26 ([`plan::MtuMode::Reduced`]).
//!
//! Distributed gateway: on every node the network's gateway namespace (`hvx-n-<vni>`)
//! carries the same gateway IPs and MAC ([`names::gateway_mac`]) on a veth into the
//! bridge, runs its own dnsmasq for its local VMs and routes; nftables keeps gateway
//! ARP and DHCP from crossing the tunnel, and the control plane installs static
//! neighbour entries for VMs with known addresses. The node namespace carries the
//! network as L2 only (no address of its subnets), so networks may share subnets;
//! egress and published ports pass a per-network transit /31 ([`transit`]).
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod addr;
pub mod apply;
pub mod daemon;
pub mod dnsmasq;
pub mod error;
pub mod host;
pub mod lab;
pub mod names;
pub mod nft;
pub mod observe;
pub mod pin;
pub mod plan;
pub mod port;
pub mod spec;
pub mod transit;

pub use addr::{Ipv4Net, Mac};
pub use apply::{ApplyReport, Switch};
pub use error::{OverlayError, Result};
pub use host::Host;
pub use plan::{NetworkPlan, build_plan};
pub use spec::*;
