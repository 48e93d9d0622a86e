//! The input of the planner: everything the control plane knows about one
//! VirtualNetwork as seen from one node. The caller (node agent) resolves Kubernetes
//! objects and selectors into these plain values; nothing here talks to the cluster.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::addr::{Ipv4Net, Mac};
use crate::error::{OverlayError, Result};

/// Largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// One VirtualNetwork on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// VirtualNetwork name (used for DNS and logs, not for kernel object names).
    pub name: String,
    /// VXLAN network identifier allocated by the operator (1..=16777215).
    pub vni: u32,
    /// This node's tunnel endpoint address (an address of the underlay interface).
    pub local_vtep: Ipv4Addr,
    /// MTU of the underlay path between nodes; decides the MTU strategy.
    pub underlay_mtu: u32,
    /// Every other node hosting this network (the head-end replication list).
    pub remote_vteps: Vec<Ipv4Addr>,
    pub subnets: Vec<SubnetSpec>,
    /// Every VM NIC on the network, local or remote.
    pub members: Vec<Member>,
    #[serde(default)]
    pub dns: DnsSpec,
    #[serde(default)]
    pub firewall: FirewallSpec,
    /// Masquerade traffic leaving the overlay through this node's uplinks.
    #[serde(default)]
    pub egress_nat: bool,
    /// Other networks this network routes to (the virtual router). Both sides must
    /// list each other, and a routed peer must also be materialised on this node.
    #[serde(default)]
    pub routed_peers: Vec<RoutedPeer>,
    /// VM ports published on the node (the operator points a Service at them).
    #[serde(default)]
    pub exposed: Vec<ExposedPort>,
    /// Destinations egress NAT never reaches, besides the always-denied link-local
    /// range [`LINK_LOCAL`] (cloud metadata): the node agent puts the cluster's pod
    /// and service CIDRs here. The node's own addresses need no entry: traffic to
    /// them is input, not forwarding, and the input chain drops it.
    #[serde(default)]
    pub egress_denied: Vec<Ipv4Net>,
    /// Exceptions to `egress_denied` and [`LINK_LOCAL`] (e.g. one service address
    /// guests are meant to use); checked first.
    #[serde(default)]
    pub egress_allowed: Vec<Ipv4Net>,
    /// The segment outside the cluster this network joins, when this node is the
    /// one carrying it (the control plane picks one carrier per network, so the
    /// outside segment and the overlay never form a loop).
    #[serde(default)]
    pub external: Option<ExternalL2>,
    /// Whether hvx serves the gateway addresses (and DHCP/DNS from them). Off when
    /// the outside segment has its own router: then the subnets' `gateway` is that
    /// router's address, guarded against spoofing but never answered here.
    #[serde(default = "yes")]
    pub gateway: bool,
    /// Broadcast frames per second one guest port may send (a storm from one guest,
    /// e.g. a looping bridge inside it, is capped at the port); 0 = unlimited.
    #[serde(default)]
    pub broadcast_limit_pps: u32,
}

fn yes() -> bool {
    true
}

/// How a network reaches an L2 segment outside the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExternalL2 {
    /// A node interface enslaved to the network's bridge; with `vlan`, an 802.1Q
    /// sub-interface of it that the switch creates ([`crate::names::vlan_uplink`]).
    Uplink {
        interface: String,
        vlan: Option<u16>,
    },
    /// A VXLAN tunnel to a VTEP outside the cluster (a switch or a host of the old
    /// datacenter), with its own VNI and UDP port.
    Vtep {
        address: Ipv4Addr,
        port: u16,
        vni: u32,
    },
}

impl ExternalL2 {
    /// The bridge port that leads outside.
    pub fn port(&self, vni: u32) -> String {
        match self {
            ExternalL2::Uplink {
                interface,
                vlan: None,
            } => interface.clone(),
            ExternalL2::Uplink { vlan: Some(_), .. } => crate::names::vlan_uplink(vni),
            ExternalL2::Vtep { .. } => crate::names::external_vxlan(vni),
        }
    }
}

/// 169.254.0.0/16: cloud metadata services (169.254.169.254) and other link-local
/// endpoints of the node; guests never reach it through egress NAT unless a
/// prefix of `egress_allowed` covers it.
pub const LINK_LOCAL: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetSpec {
    /// The subnet prefix, e.g. `10.1.0.0/24`.
    pub cidr: Ipv4Net,
    /// The distributed gateway address (same on every node).
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub dhcp: Option<DhcpRange>,
    /// Extra fixed MAC -> IP bindings (members with an IP are reserved automatically).
    #[serde(default)]
    pub reservations: Vec<Reservation>,
}

/// A dynamic range. Ranges are per node: the operator hands each node hosting the
/// network a disjoint slice, because dnsmasq instances on different nodes do not
/// share a lease database. Reserved addresses need no slicing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub hostname: Option<String>,
}

/// A VM NIC attached to the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// VM name: becomes the DNS name and the DHCP hostname.
    pub vm: String,
    pub mac: Mac,
    /// The VM's address when known (static or reserved); enables a DHCP reservation,
    /// a DNS record and a static neighbour entry on the gateway.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    /// The NIC is on this node: `port` is the host-side interface (veth peer of the
    /// VM pod's link) that the switch attaches to the bridge.
    Local { port: String },
    /// The NIC is on another node, reached through that node's VTEP.
    Remote { vtep: Ipv4Addr },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSpec {
    /// Search domain handed out by DHCP; VM names resolve as `<vm>` and `<vm>.<domain>`.
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub records: Vec<DnsRecord>,
    /// Resolvers for names outside the network; none = only local names answer.
    #[serde(default)]
    pub upstream: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallSpec {
    /// What happens to IPv4 traffic between VMs that no rule matches.
    #[serde(default)]
    pub default_action: Action,
    #[serde(default)]
    pub rules: Vec<FirewallRule>,
}

/// One micro-segmentation rule, first match wins. Selectors are resolved by the
/// caller into MACs (VM selectors) or prefixes (subnet selectors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallRule {
    pub from: Peers,
    pub to: Peers,
    pub protocol: Protocol,
    /// Destination ports (TCP/UDP only); empty = every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Peers {
    Any,
    Macs(Vec<Mac>),
    Cidrs(Vec<Ipv4Net>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedPeer {
    pub vni: u32,
    pub subnets: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedPort {
    pub vm: String,
    pub protocol: Protocol,
    /// Port inside the VM.
    pub port: u16,
    /// Port on the node that forwards to it.
    pub node_port: u16,
}

impl NetworkSpec {
    /// Rejects what would otherwise produce a broken or ambiguous kernel state.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| OverlayError::InvalidSpec {
            network: self.name.clone(),
            reason,
        };
        if self.vni == 0 || self.vni > MAX_VNI {
            return Err(bad(format!("VNI {} is outside 1..={MAX_VNI}", self.vni)));
        }
        if !(576..=65535).contains(&self.underlay_mtu) {
            return Err(bad(format!(
                "underlay MTU {} is outside 576..=65535",
                self.underlay_mtu
            )));
        }
        if self.remote_vteps.contains(&self.local_vtep) {
            return Err(bad(format!(
                "local VTEP {} is also listed as remote",
                self.local_vtep
            )));
        }
        let mut vteps = BTreeSet::new();
        for v in &self.remote_vteps {
            if !vteps.insert(v) {
                return Err(bad(format!("remote VTEP {v} is listed twice")));
            }
        }
        for s in &self.subnets {
            if !s.cidr.contains(s.gateway) {
                return Err(bad(format!(
                    "gateway {} is outside subnet {}",
                    s.gateway, s.cidr
                )));
            }
            if s.cidr.prefix > 30 {
                return Err(bad(format!(
                    "subnet {} is too small for a gateway and hosts",
                    s.cidr
                )));
            }
            if let Some(r) = &s.dhcp {
                if !s.cidr.contains(r.start) || !s.cidr.contains(r.end) || r.start > r.end {
                    return Err(bad(format!(
                        "DHCP range {}-{} is not an ordered range inside {}",
                        r.start, r.end, s.cidr
                    )));
                }
                if r.lease_secs < 120 {
                    return Err(bad("DHCP lease time must be at least 120 s".into()));
                }
            }
            for r in &s.reservations {
                if !s.cidr.contains(r.ip) {
                    return Err(bad(format!(
                        "reservation {} -> {} is outside {}",
                        r.mac, r.ip, s.cidr
                    )));
                }
                // The name ends up in dnsmasq's dhcp-hosts and hosts files, one
                // entry per line: a ',' or newline would forge other entries.
                if let Some(h) = &r.hostname {
                    check_dns_label(h).map_err(|e| {
                        bad(format!(
                            "reservation {} hostname {h:?} is not an RFC 1123 label: {e}",
                            r.mac
                        ))
                    })?;
                }
            }
        }
        let mut macs = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for m in &self.members {
            check_dns_label(&m.vm).map_err(|r| bad(format!("VM name {:?}: {r}", m.vm)))?;
            if m.mac.is_multicast() || m.mac == Mac::ZERO {
                return Err(bad(format!("VM {} has a non-unicast MAC {}", m.vm, m.mac)));
            }
            if !macs.insert(m.mac) {
                return Err(bad(format!("MAC {} is used by two members", m.mac)));
            }
            if let Some(ip) = m.ip
                && !self.subnets.iter().any(|s| s.cidr.contains(ip))
            {
                return Err(bad(format!("VM {} address {ip} is in no subnet", m.vm)));
            }
            match &m.location {
                Location::Local { port } => {
                    check_ifname(port).map_err(|r| bad(format!("port {port:?}: {r}")))?;
                    if crate::names::parse_owned_link(port).is_some() {
                        return Err(bad(format!(
                            "port {port:?} collides with the switch's own link names"
                        )));
                    }
                    if !ports.insert(port.clone()) {
                        return Err(bad(format!("port {port} is used by two members")));
                    }
                }
                Location::Remote { vtep } => {
                    if !self.remote_vteps.contains(vtep) {
                        return Err(bad(format!(
                            "VM {} is on VTEP {vtep}, which is not in remote_vteps",
                            m.vm
                        )));
                    }
                }
            }
        }
        self.validate_external(&ports).map_err(bad)?;
        if let Some(d) = &self.dns.domain {
            for label in d.split('.') {
                check_dns_label(label).map_err(|r| bad(format!("domain {d:?}: {r}")))?;
            }
        }
        for r in &self.dns.records {
            for label in r.name.split('.') {
                check_dns_label(label).map_err(|e| bad(format!("record {:?}: {e}", r.name)))?;
            }
        }
        for rule in &self.firewall.rules {
            if !rule.ports.is_empty() && !matches!(rule.protocol, Protocol::Tcp | Protocol::Udp) {
                return Err(bad("firewall ports need protocol tcp or udp".into()));
            }
            for p in [&rule.from, &rule.to] {
                if matches!(p, Peers::Macs(v) if v.is_empty())
                    || matches!(p, Peers::Cidrs(v) if v.is_empty())
                {
                    return Err(bad(
                        "a firewall selector resolved to nothing; use `any` or drop the rule"
                            .into(),
                    ));
                }
            }
        }
        for p in &self.routed_peers {
            if p.vni == self.vni || p.vni == 0 || p.vni > MAX_VNI {
                return Err(bad(format!("routed peer VNI {} is invalid", p.vni)));
            }
        }
        for e in &self.exposed {
            if !matches!(e.protocol, Protocol::Tcp | Protocol::Udp) {
                return Err(bad(format!("exposed port of {} must be tcp or udp", e.vm)));
            }
            if !self.members.iter().any(|m| m.vm == e.vm && m.ip.is_some()) {
                return Err(bad(format!(
                    "exposed VM {} is not a member with a known IP",
                    e.vm
                )));
            }
        }
        Ok(())
    }
}

/// A DNS label (also used for VM names): what dnsmasq and guests accept.
fn check_dns_label(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1..=63 characters".into());
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || s.starts_with('-')
        || s.ends_with('-')
    {
        return Err("may hold only letters, digits and '-' (not first or last)".into());
    }
    Ok(())
}

/// A Linux interface name: at most 15 bytes, no '/', whitespace or ':'.
pub(crate) fn check_ifname(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s.len() > 15 {
        return Err("interface names have 1..=15 characters".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("interface names may hold only letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

impl NetworkSpec {
    /// The outside segment and the gateway switch; `ports` are the local VM ports.
    fn validate_external(&self, ports: &BTreeSet<String>) -> std::result::Result<(), String> {
        if !self.gateway && self.subnets.iter().any(|s| s.dhcp.is_some()) {
            // dnsmasq answers from the gateway address; without it there is no
            // server address to hand out leases from.
            return Err("DHCP needs the hvx gateway: turn DHCP off too when the outside network provides the gateway".into());
        }
        if !self.gateway
            && (self.egress_nat || !self.routed_peers.is_empty() || !self.exposed.is_empty())
        {
            return Err(
                "egress NAT, routed networks and exposed ports need the hvx gateway".into(),
            );
        }
        match &self.external {
            None => Ok(()),
            Some(ExternalL2::Uplink { interface, vlan }) => {
                check_ifname(interface).map_err(|r| format!("uplink {interface:?}: {r}"))?;
                if crate::names::parse_owned_link(interface).is_some() {
                    return Err(format!(
                        "uplink {interface:?} is one of the switch's own links"
                    ));
                }
                if ports.contains(interface) {
                    return Err(format!("uplink {interface:?} is also a VM port"));
                }
                if let Some(v) = vlan
                    && !(1..=4094).contains(v)
                {
                    return Err(format!("uplink VLAN {v} is outside 1..=4094"));
                }
                Ok(())
            }
            Some(ExternalL2::Vtep { address, port, vni }) => {
                if *vni == 0 || *vni > MAX_VNI {
                    return Err(format!("external VNI {vni} is outside 1..={MAX_VNI}"));
                }
                if *port == 0 {
                    return Err("external VTEP port must not be 0".into());
                }
                if *address == self.local_vtep || self.remote_vteps.contains(address) {
                    return Err(format!("external VTEP {address} is a node of the cluster"));
                }
                if address.is_unspecified() || address.is_multicast() || address.is_broadcast() {
                    return Err(format!("external VTEP {address} is not a unicast address"));
                }
                if *vni == self.vni && *port == crate::names::VXLAN_PORT {
                    return Err(format!(
                        "external VNI {vni} on port {port} is the network's own tunnel"
                    ));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The network fuzz target only renders specs the validator accepts: its seed
    /// must be one, or the fuzzer never reaches the renderers.
    #[test]
    fn the_network_fuzz_seed_is_a_valid_spec() {
        let seed = include_str!("../../fuzz/seeds/network/sample.json");
        let spec: NetworkSpec = serde_json::from_str(seed).expect("seed parses");
        spec.validate().expect("seed validates");
        assert!(!spec.firewall.rules.is_empty() && !spec.exposed.is_empty());
    }
}
