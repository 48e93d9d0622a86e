//! nftables rendering. Per network, two tables in the node namespace and one in
//! the network's gateway namespace, each script replaced atomically in one `nft -f`
//! transaction (add+delete+define), so a change never opens a window without rules:
//!
//! - node, `bridge hvx_fw_<vni>`: distributed-gateway isolation (each node's gateway
//!   answers only its local VMs: ARP for gateway addresses and DHCP never cross the
//!   tunnel), anti-spoofing per VM port, MSS clamping in Reduced-MTU mode, then the
//!   micro-segmentation rules. This kernel has no bridge conntrack
//!   (`nf_conntrack_bridge`), so rules are stateless: an `allow` also installs its
//!   reflexive reply rule (TCP replies must not be a bare SYN, so the server side
//!   cannot open connections through it). Nothing on the bridge is for the node.
//! - node, `ip hvx_rt_<vni>`: VXLAN of this VNI only from peer VTEPs, and the outer
//!   half of egress and published ports: what may leave through the transit veth
//!   `hvu<vni>` (the same deny list again, after kube-proxy's DNAT), masquerade to
//!   the node's address, DNAT of a published node port to the namespace's transit
//!   address.
//! - gateway namespace, `ip hvx_gw_<vni>`: what guests may reach on the gateway
//!   (DHCP, DNS, ping), the virtual router (peered networks), egress NAT to the
//!   transit address, and DNAT of published ports to the VM (only VMs on this node,
//!   because replies leave through the VM's local gateway and must meet the same
//!   conntrack entry).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::names;
use crate::plan::MtuPlan;
use crate::spec::{Action, FirewallRule, LINK_LOCAL, Location, NetworkSpec, Peers, Protocol};
use crate::transit::TransitPair;

#[derive(Debug, Clone)]
pub struct Rendered {
    /// The node namespace's tables.
    pub script: String,
    /// The gateway namespace's table.
    pub ns_script: String,
    /// Over the node tables; their marker chain.
    pub hash: String,
    /// Over the gateway namespace's table; its marker chain (a port joining the
    /// bridge changes the node tables only).
    pub ns_hash: String,
    pub has_rt_table: bool,
}

/// An empty chain named after the ruleset hash marks each table's version:
/// `nft -j list chains` shows it (nft 1.0.6 omits table comments from JSON).
pub fn marker_chain(hash: &str) -> String {
    format!("hash_{hash}")
}

pub fn render(
    spec: &NetworkSpec,
    ports: &BTreeSet<String>,
    mtu: &MtuPlan,
    transit: Option<&TransitPair>,
) -> Rendered {
    let fw = render_fw_body(spec, ports, mtu);
    let rt = render_rt_body(spec, transit);
    let gw = render_gw_body(spec, mtu, transit);
    let hash = short_hash(&[&fw, &rt]);
    let ns_hash = short_hash(&[&gw]);
    let marker = marker_chain(&hash);

    let fw_name = names::fw_table(spec.vni);
    let rt_name = names::rt_table(spec.vni);
    let mut s = String::new();
    // `add` then `delete` makes the delete succeed whether or not the table existed.
    let _ = writeln!(
        s,
        "add table bridge {fw_name}\ndelete table bridge {fw_name}"
    );
    let _ = writeln!(s, "add table ip {rt_name}\ndelete table ip {rt_name}");
    let _ = writeln!(
        s,
        "table bridge {fw_name} {{\n  chain {marker} {{\n  }}\n{fw}}}"
    );
    let _ = writeln!(
        s,
        "table ip {rt_name} {{\n  chain {marker} {{\n  }}\n{rt}}}"
    );
    let gw_name = names::gw_table(spec.vni);
    let ns_marker = marker_chain(&ns_hash);
    let ns_script = format!(
        "add table ip {gw_name}\ndelete table ip {gw_name}\ntable ip {gw_name} {{\n  chain {ns_marker} {{\n  }}\n{gw}}}\n"
    );
    Rendered {
        script: s,
        ns_script,
        hash,
        ns_hash,
        has_rt_table: true,
    }
}

fn short_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn quoted_set<I: IntoIterator<Item = String>>(items: I) -> String {
    let v: Vec<String> = items.into_iter().collect();
    format!("{{ {} }}", v.join(", "))
}

fn render_fw_body(spec: &NetworkSpec, ports: &BTreeSet<String>, mtu: &MtuPlan) -> String {
    let vx = names::vxlan(spec.vni);
    // Ports leading off this node: the tunnel, and the outside segment when this
    // node carries it. The gateway stays local on all of them.
    let mut outward = vec![vx.clone()];
    outward.extend(spec.external.as_ref().map(|e| e.port(spec.vni)));
    let mut members: Vec<String> = outward.iter().map(|p| format!("\"{p}\"")).collect();
    members.extend(ports.iter().map(|p| format!("\"{p}\"")));
    let mut b = String::new();
    let _ = writeln!(
        b,
        "  set ports {{\n    type ifname\n    elements = {}\n  }}",
        quoted_set(members)
    );
    let _ = writeln!(
        b,
        "  chain forward {{\n    type filter hook forward priority -10; policy accept;"
    );
    // Other networks' frames are not ours to judge.
    let _ = writeln!(b, "    iifname != @ports accept");
    let gateways: Vec<String> = spec.subnets.iter().map(|s| s.gateway.to_string()).collect();
    // Without the hvx gateway, the outside router's ARP and the outside DHCP
    // server must cross the tunnel and the uplink.
    if !gateways.is_empty() && spec.gateway {
        let g = quoted_set(gateways);
        for out in &outward {
            let _ = writeln!(
                b,
                "    oifname \"{out}\" arp operation request arp daddr ip {g} drop"
            );
            let _ = writeln!(b, "    iifname \"{out}\" arp daddr ip {g} drop");
            let _ = writeln!(b, "    oifname \"{out}\" udp dport {{ 67, 68 }} drop");
            let _ = writeln!(b, "    iifname \"{out}\" udp dport {{ 67, 68 }} drop");
        }
    }
    // The overlay carries no IPv6 for the gateway: guests get no IPv6 path to it.
    let _ = writeln!(
        b,
        "    oifname \"{}\" ether type ip6 drop",
        names::gateway_veth(spec.vni)
    );
    if let Some(mss) = mtu.mss_clamp {
        let _ = writeln!(
            b,
            "    tcp flags syn tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
        );
    }
    // Guest to gateway is judged in the gateway namespace (DHCP, DNS, ping, and
    // the router's rules), as it was when the gateway was the node itself;
    // micro-segmentation is between VMs.
    let _ = writeln!(
        b,
        "    oifname \"{}\" accept",
        names::gateway_veth(spec.vni)
    );
    let _ = writeln!(b, "    jump segment\n  }}");
    render_anti_spoofing(&mut b, spec);
    // Frames the bridge delivers to the node itself: the bridge has no address,
    // the gateway lives in its own namespace; nothing from the network is for the
    // node (broadcasts still reach the other ports: this hook sees only the copy
    // for the node).
    let gw_veth = names::gateway_veth(spec.vni);
    let _ = writeln!(
        b,
        "  chain input {{\n    type filter hook input priority -200; policy accept;"
    );
    let _ = writeln!(b, "    iifname @ports drop");
    let _ = writeln!(b, "    iifname \"{gw_veth}\" drop");
    let _ = writeln!(b, "  }}");
    let _ = writeln!(b, "  chain segment {{");
    for rule in &spec.firewall.rules {
        for line in render_rule(rule) {
            let _ = writeln!(b, "    {line}");
        }
    }
    if spec.firewall.default_action == Action::Deny {
        // ARP and non-IP ethertypes (legacy L2 protocols, tagged frames) are left
        // alone; the default covers IP between VMs.
        let _ = writeln!(b, "    ether type {{ ip, ip6 }} drop");
        // IP inside a guest-set 802.1Q tag would otherwise slip past every rule:
        // with a deny default it is dropped too (tagged non-IP still passes).
        let _ = writeln!(b, "    vlan type {{ ip, ip6 }} drop");
    }
    let _ = writeln!(b, "  }}");
    b
}

/// Per-port anti-spoofing, before the bridge forwards or delivers anything: a local
/// VM port sends only from its member's MAC (Ethernet source and ARP sender), and
/// IPv4 (IP source and ARP sender address) only from addresses it may hold:
///
/// - a member with a known address (declared `ip` or a reservation for its MAC):
///   that address, plus 0.0.0.0 (DHCP discovery, ARP probes);
/// - a member without one (dynamic DHCP, or a static address configured only inside
///   the guest): any address of the network's subnets except the gateways and the
///   addresses known to belong to other members. Pinning such a guest to its current
///   DHCP lease would break guests whose address the control plane does not know and
///   would need a rules update on every lease; this way the gateway and every VM
///   with a known address cannot be impersonated, while dynamic guests of one
///   network can still take each other's addresses (documented tradeoff).
///
/// Networks without subnets are pure L2: only the MAC is checked. Frames with a VLAN
/// tag are checked by MAC only (the IP and ARP matches need an untagged ethertype).
fn render_anti_spoofing(b: &mut String, spec: &NetworkSpec) {
    let _ = writeln!(
        b,
        "  chain prerouting {{\n    type filter hook prerouting priority -200; policy accept;"
    );
    let known_ip = |mac: crate::addr::Mac| -> Option<std::net::Ipv4Addr> {
        spec.members
            .iter()
            .find(|m| m.mac == mac)
            .and_then(|m| m.ip)
            .or_else(|| {
                spec.subnets
                    .iter()
                    .flat_map(|s| &s.reservations)
                    .find(|r| r.mac == mac)
                    .map(|r| r.ip)
            })
    };
    for m in &spec.members {
        let Location::Local { port } = &m.location else {
            continue;
        };
        let mac = m.mac;
        if spec.broadcast_limit_pps > 0 {
            // One limit per port (each rule keeps its own bucket): a storming guest
            // loses its excess broadcasts, the others keep theirs.
            let n = spec.broadcast_limit_pps;
            let _ = writeln!(
                b,
                "    iifname \"{port}\" ether daddr ff:ff:ff:ff:ff:ff limit rate over {n}/second burst {n} packets drop"
            );
        }
        let _ = writeln!(b, "    iifname \"{port}\" ether saddr != {mac} drop");
        let _ = writeln!(b, "    iifname \"{port}\" arp saddr ether != {mac} drop");
        if spec.subnets.is_empty() {
            continue;
        }
        match known_ip(mac) {
            Some(ip) => {
                let own = format!("{{ 0.0.0.0, {ip} }}");
                let _ = writeln!(b, "    iifname \"{port}\" ip saddr != {own} drop");
                let _ = writeln!(b, "    iifname \"{port}\" arp saddr ip != {own} drop");
            }
            None => {
                let mut subnets: Vec<String> = vec!["0.0.0.0".into()];
                subnets.extend(spec.subnets.iter().map(|s| s.cidr.network().to_string()));
                let subnets = quoted_set(subnets);
                let mut taken: BTreeSet<std::net::Ipv4Addr> =
                    spec.subnets.iter().map(|s| s.gateway).collect();
                taken.extend(
                    spec.members
                        .iter()
                        .filter(|o| o.mac != mac)
                        .filter_map(|o| known_ip(o.mac)),
                );
                taken.extend(
                    spec.subnets
                        .iter()
                        .flat_map(|s| &s.reservations)
                        .filter(|r| r.mac != mac)
                        .map(|r| r.ip),
                );
                let taken = quoted_set(taken.iter().map(|ip| ip.to_string()));
                for field in ["ip saddr", "arp saddr ip"] {
                    let _ = writeln!(b, "    iifname \"{port}\" {field} != {subnets} drop");
                    let _ = writeln!(b, "    iifname \"{port}\" {field} {taken} drop");
                }
            }
        }
    }
    let _ = writeln!(b, "  }}");
}

fn peers_match(p: &Peers, src: bool) -> Option<String> {
    let dir = if src { "saddr" } else { "daddr" };
    match p {
        Peers::Any => None,
        Peers::Macs(m) => Some(format!(
            "ether {dir} {}",
            quoted_set(m.iter().map(|m| m.to_string()))
        )),
        Peers::Cidrs(c) => Some(format!(
            "ip {dir} {}",
            quoted_set(c.iter().map(|c| c.network().to_string()))
        )),
    }
}

fn verdict(a: Action) -> &'static str {
    match a {
        Action::Allow => "accept",
        Action::Deny => "drop",
    }
}

/// One rule, plus its reflexive reply rule for `allow`.
pub(crate) fn render_rule(rule: &FirewallRule) -> Vec<String> {
    let ports = if rule.ports.is_empty() {
        None
    } else {
        Some(quoted_set(rule.ports.iter().map(|p| p.to_string())))
    };
    let proto = match rule.protocol {
        Protocol::Any => "ether type ip".to_string(),
        Protocol::Tcp => "meta l4proto tcp".to_string(),
        Protocol::Udp => "meta l4proto udp".to_string(),
        Protocol::Icmp => "meta l4proto icmp".to_string(),
    };
    let l4 = match rule.protocol {
        Protocol::Tcp => "tcp",
        _ => "udp",
    };
    let build = |from: Option<String>, to: Option<String>, tail: Option<String>, v: &str| {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(from);
        parts.extend(to);
        parts.push(proto.clone());
        parts.extend(tail);
        parts.push(v.to_string());
        parts.join(" ")
    };
    let fwd_tail = ports.as_ref().map(|p| format!("{l4} dport {p}"));
    let mut out = vec![build(
        peers_match(&rule.from, true),
        peers_match(&rule.to, false),
        fwd_tail,
        verdict(rule.action),
    )];
    if rule.action == Action::Allow {
        let mut tail: Vec<String> = Vec::new();
        if let Some(p) = &ports {
            tail.push(format!("{l4} sport {p}"));
        }
        if rule.protocol == Protocol::Tcp {
            tail.push("tcp flags & (syn | ack) != syn".into());
        }
        let tail = if tail.is_empty() {
            None
        } else {
            Some(tail.join(" "))
        };
        out.push(build(
            peers_match(&rule.to, true),
            peers_match(&rule.from, false),
            tail,
            "accept",
        ));
    }
    out
}

/// Node namespace, IPv4 to the node itself. VXLAN: frames of this VNI are accepted
/// only from the network's peer VTEPs, so a host elsewhere on the underlay cannot
/// inject frames into the overlay (the VNI sits in bits 32..56 of the VXLAN header,
/// after the 8-byte UDP header). The bridge has no address and the transit veth
/// carries only the namespace's own traffic: nothing arriving on them is for the
/// node (its gRPC and metrics ports, kubelet, sshd), except replies and the
/// network's upstream DNS when that is a node address.
fn render_node_input(b: &mut String, spec: &NetworkSpec) {
    let br = names::bridge(spec.vni);
    let up = names::transit_veth(spec.vni);
    let _ = writeln!(
        b,
        "  chain input {{\n    type filter hook input priority 0; policy accept;"
    );
    let vni_match = format!("udp dport {} @th,96,24 {}", names::VXLAN_PORT, spec.vni);
    if spec.remote_vteps.is_empty() {
        let _ = writeln!(b, "    {vni_match} drop");
    } else {
        let peers = quoted_set(spec.remote_vteps.iter().map(|v| v.to_string()));
        let _ = writeln!(b, "    {vni_match} ip saddr != {peers} drop");
    }
    if let Some(crate::spec::ExternalL2::Vtep { address, port, vni }) = &spec.external {
        // The external VTEP's tunnel only from that VTEP.
        let _ = writeln!(
            b,
            "    udp dport {port} @th,96,24 {vni} ip saddr != {address} drop"
        );
    }
    let _ = writeln!(b, "    iifname \"{br}\" drop");
    let _ = writeln!(
        b,
        "    iifname \"{up}\" ct state established,related accept"
    );
    if !spec.dns.upstream.is_empty() {
        let _ = writeln!(
            b,
            "    iifname \"{up}\" ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 accept",
            upstream_set(spec)
        );
    }
    let _ = writeln!(b, "    iifname \"{up}\" drop\n  }}");
    // Before conntrack (raw priority): the bridge's frames, seen here only through
    // br_netfilter, get the network's own zone.
    let _ = writeln!(
        b,
        "  chain zone {{\n    type filter hook prerouting priority -300; policy accept;\n    iifname \"{br}\" ct zone set {}\n  }}",
        names::conntrack_zone(spec.vni)
    );
}

fn upstream_set(spec: &NetworkSpec) -> String {
    quoted_set(spec.dns.upstream.iter().map(|u| u.to_string()))
}

/// Egress never reaches cloud metadata or the cluster's own ranges (a guest is a
/// tenant, not a pod); explicit exceptions first. `iif` is where egress enters.
fn render_egress_filter(b: &mut String, spec: &NetworkSpec, iif: &str) {
    if !spec.egress_allowed.is_empty() {
        let allowed = quoted_set(spec.egress_allowed.iter().map(|n| n.network().to_string()));
        let _ = writeln!(b, "    iifname \"{iif}\" ip daddr {allowed} accept");
    }
    let mut denied: BTreeSet<String> = [LINK_LOCAL.to_string()].into();
    denied.extend(spec.egress_denied.iter().map(|n| n.network().to_string()));
    let _ = writeln!(
        b,
        "    iifname \"{iif}\" ip daddr {} drop",
        quoted_set(denied)
    );
}

/// The node namespace's `ip` table: input, and what passes the transit veth.
fn render_rt_body(spec: &NetworkSpec, transit: Option<&TransitPair>) -> String {
    let mut b = String::new();
    render_node_input(&mut b, spec);
    let Some(t) = transit else {
        return b;
    };
    let up = names::transit_veth(spec.vni);
    let _ = writeln!(
        b,
        "  chain forward {{\n    type filter hook forward priority 0; policy accept;"
    );
    if spec.egress_nat {
        // Matching after DNAT also stops Service addresses: kube-proxy rewrites
        // them to pod addresses before this hook.
        render_egress_filter(&mut b, spec, &up);
        let _ = writeln!(b, "    iifname \"{up}\" accept");
    } else if !spec.dns.upstream.is_empty() {
        let _ = writeln!(
            b,
            "    iifname \"{up}\" ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 accept",
            upstream_set(spec)
        );
    }
    let _ = writeln!(b, "    iifname \"{up}\" drop");
    let _ = writeln!(
        b,
        "    oifname \"{up}\" ct state established,related accept"
    );
    let _ = writeln!(b, "    oifname \"{up}\" ct status dnat accept");
    let _ = writeln!(b, "    oifname \"{up}\" drop\n  }}");
    let _ = writeln!(
        b,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;"
    );
    let _ = writeln!(b, "    iifname \"{up}\" oifname != \"hvu*\" masquerade");
    let _ = writeln!(b, "  }}");
    let _ = writeln!(
        b,
        "  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;"
    );
    for (l4, node_port, _, _) in local_published(spec) {
        let _ = writeln!(
            b,
            "    iifname != \"hvu*\" iifname != \"hvb*\" {l4} dport {node_port} dnat to {}:{node_port}",
            t.gateway
        );
    }
    let _ = writeln!(b, "  }}");
    b
}

/// Published ports of VMs on this node: (l4, node port, VM address, VM port).
fn local_published(spec: &NetworkSpec) -> Vec<(&'static str, u16, std::net::Ipv4Addr, u16)> {
    spec.exposed
        .iter()
        .filter_map(|e| {
            let ip = spec
                .members
                .iter()
                .find_map(|m| match (&m.location, m.ip) {
                    (Location::Local { .. }, Some(ip)) if m.vm == e.vm => Some(ip),
                    _ => None,
                })?;
            let l4 = if e.protocol == Protocol::Udp {
                "udp"
            } else {
                "tcp"
            };
            Some((l4, e.node_port, ip, e.port))
        })
        .collect()
}

/// The gateway namespace's table. Guests reach the gateway for DHCP (udp 67, any
/// destination: a DISCOVER is a broadcast), DNS (udp/tcp 53) and ICMP echo (guests
/// and operators ping their default gateway to check the path; an echo reply
/// discloses nothing a DHCP answer does not); nothing else in the namespace is
/// theirs to reach, its transit address included.
fn render_gw_body(spec: &NetworkSpec, mtu: &MtuPlan, transit: Option<&TransitPair>) -> String {
    let gw = names::NS_GATEWAY_IF;
    let up = names::NS_UPLINK_IF;
    let mut b = String::new();
    let _ = writeln!(
        b,
        "  chain input {{\n    type filter hook input priority 0; policy accept;"
    );
    let _ = writeln!(b, "    iifname \"lo\" accept");
    let _ = writeln!(b, "    ct state established,related accept");
    if !spec.subnets.is_empty() {
        let gws = quoted_set(spec.subnets.iter().map(|s| s.gateway.to_string()));
        let _ = writeln!(b, "    iifname \"{gw}\" udp dport 67 accept");
        let _ = writeln!(b, "    iifname \"{gw}\" ip daddr {gws} udp dport 53 accept");
        let _ = writeln!(b, "    iifname \"{gw}\" ip daddr {gws} tcp dport 53 accept");
        let _ = writeln!(
            b,
            "    iifname \"{gw}\" ip daddr {gws} icmp type echo-request accept"
        );
    }
    let _ = writeln!(b, "    drop\n  }}");

    let _ = writeln!(
        b,
        "  chain forward {{\n    type filter hook forward priority 0; policy drop;"
    );
    if mtu.mss_clamp.is_some() {
        let _ = writeln!(
            b,
            "    iifname \"{gw}\" tcp flags syn tcp option maxseg size set rt mtu"
        );
        let _ = writeln!(
            b,
            "    oifname \"{gw}\" tcp flags syn tcp option maxseg size set rt mtu"
        );
    }
    // Between the network's own subnets.
    let _ = writeln!(b, "    iifname \"{gw}\" oifname \"{gw}\" accept");
    for p in &spec.routed_peers {
        // Only toward the peer's declared subnets (all of it when none are listed).
        let daddr = if p.subnets.is_empty() {
            String::new()
        } else {
            let nets = quoted_set(p.subnets.iter().map(|n| n.network().to_string()));
            format!(" ip daddr {nets}")
        };
        let _ = writeln!(
            b,
            "    iifname \"{gw}\" oifname \"{}\"{daddr} accept",
            names::peer_link(p.vni)
        );
    }
    if spec.egress_nat && transit.is_some() {
        render_egress_filter(&mut b, spec, gw);
        let _ = writeln!(b, "    iifname \"{gw}\" oifname \"{up}\" accept");
    }
    let _ = writeln!(
        b,
        "    oifname \"{gw}\" ct state established,related accept"
    );
    let _ = writeln!(b, "    oifname \"{gw}\" ct status dnat accept");
    // A peer routes here only what its own rules let through.
    let _ = writeln!(b, "    iifname \"rp*\" oifname \"{gw}\" accept");
    let _ = writeln!(b, "  }}");

    let _ = writeln!(
        b,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;"
    );
    if spec.egress_nat && transit.is_some() {
        let _ = writeln!(b, "    iifname \"{gw}\" oifname \"{up}\" masquerade");
    }
    let _ = writeln!(b, "  }}");
    let _ = writeln!(
        b,
        "  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;"
    );
    if transit.is_some() {
        for (l4, node_port, ip, port) in local_published(spec) {
            let _ = writeln!(
                b,
                "    iifname \"{up}\" {l4} dport {node_port} dnat to {ip}:{port}"
            );
        }
    }
    let _ = writeln!(b, "  }}");
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Mac;
    use crate::plan::plan_mtu;
    use crate::plan::tests::sample;
    use crate::spec::*;
    use crate::transit::TransitPair;

    fn transit() -> TransitPair {
        TransitPair::of_slot(3)
    }

    fn ports() -> BTreeSet<String> {
        ["hvp1".to_string()].into()
    }

    #[test]
    fn the_outside_segment_is_an_outward_port_and_guests_are_rate_limited() {
        use crate::spec::ExternalL2;
        let mut spec = crate::plan::tests::sample();
        spec.broadcast_limit_pps = 200;
        spec.external = Some(ExternalL2::Uplink {
            interface: "eth1".into(),
            vlan: None,
        });
        let ports: BTreeSet<String> = ["hvp1".to_string()].into();
        let mtu = crate::plan::plan_mtu(1600);
        let r = render(&spec, &ports, &mtu, None);
        // The uplink is judged by the segment rules and keeps the gateway local...
        assert!(
            r.script
                .contains("elements = { \"hvv4242\", \"eth1\", \"hvp1\" }"),
            "{}",
            r.script
        );
        assert!(
            r.script
                .contains("oifname \"eth1\" udp dport { 67, 68 } drop")
        );
        assert!(
            r.script
                .contains("iifname \"eth1\" arp daddr ip { 10.50.0.1 } drop")
        );
        // ...but is no guest port: no anti-spoofing, no broadcast limit.
        assert!(!r.script.contains("iifname \"eth1\" ether saddr"));
        assert!(r.script.contains(
            "iifname \"hvp1\" ether daddr ff:ff:ff:ff:ff:ff limit rate over 200/second burst 200 packets drop"
        ));
        assert_eq!(
            r.script.matches("limit rate over").count(),
            1,
            "one guest port"
        );

        // The outside router and DHCP server must reach guests across the tunnel.
        spec.gateway = false;
        spec.subnets[0].dhcp = None;
        let r = render(&spec, &ports, &mtu, None);
        assert!(
            !r.script.contains("udp dport { 67, 68 } drop"),
            "{}",
            r.script
        );
        assert!(!r.script.contains("arp daddr ip"));

        spec.external = Some(ExternalL2::Vtep {
            address: "192.0.2.9".parse().unwrap(),
            port: 4790,
            vni: 5000,
        });
        let r = render(&spec, &ports, &mtu, None);
        assert!(
            r.script
                .contains("udp dport 4790 @th,96,24 5000 ip saddr != 192.0.2.9 drop")
        );
    }

    #[test]
    fn a_deny_default_also_drops_ip_inside_guest_vlan_tags() {
        let mut spec = crate::plan::tests::sample();
        let ports: BTreeSet<String> = ["hvp1".to_string()].into();
        let mtu = crate::plan::plan_mtu(1600);
        assert!(
            !render(&spec, &ports, &mtu, None)
                .script
                .contains("vlan type")
        );
        spec.firewall.default_action = Action::Deny;
        assert!(
            render(&spec, &ports, &mtu, None)
                .script
                .contains("vlan type { ip, ip6 } drop")
        );
    }

    #[test]
    fn replaces_tables_atomically_and_isolates_the_gateway() {
        let r = render(&sample(), &ports(), &plan_mtu(1600), Some(&transit()));
        let s = &r.script;
        assert!(s.starts_with("add table bridge hvx_fw_4242\ndelete table bridge hvx_fw_4242\n"));
        assert!(s.contains("elements = { \"hvv4242\", \"hvp1\" }"));
        assert!(
            s.contains("oifname \"hvv4242\" arp operation request arp daddr ip { 10.50.0.1 } drop")
        );
        assert!(s.contains(&format!("chain hash_{} {{", r.hash)));
        assert!(!s.contains("maxseg"), "no clamp with a jumbo underlay");
        assert!(r.has_rt_table);
        assert!(
            s.contains("iifname \"hvu4242\" drop"),
            "no egress without NAT"
        );
        assert!(
            !r.ns_script.contains("oifname \"up0\" accept"),
            "no egress without NAT"
        );
        assert!(
            r.ns_script
                .starts_with("add table ip hvx_gw_4242\ndelete table ip hvx_gw_4242\n")
        );
        assert!(
            r.ns_script
                .contains(&format!("chain hash_{} {{", r.ns_hash))
        );
    }

    #[test]
    fn reduced_mtu_clamps_mss() {
        let r = render(&sample(), &ports(), &plan_mtu(1500), Some(&transit()));
        assert!(r.script.contains("tcp option maxseg size set 1410"));
        assert!(
            r.ns_script
                .contains("oifname \"gw0\" tcp flags syn tcp option maxseg size set rt mtu")
        );
    }

    #[test]
    fn allow_rules_get_a_reflexive_reply_and_deny_default_drops_ip() {
        let mut spec = sample();
        let web: Mac = "00:50:56:00:00:01".parse().unwrap();
        let db: Mac = "00:50:56:00:00:02".parse().unwrap();
        spec.firewall = FirewallSpec {
            default_action: Action::Deny,
            rules: vec![FirewallRule {
                from: Peers::Macs(vec![web]),
                to: Peers::Macs(vec![db]),
                protocol: Protocol::Tcp,
                ports: vec![5432],
                action: Action::Allow,
            }],
        };
        let s = render(&spec, &ports(), &plan_mtu(1600), Some(&transit())).script;
        assert!(s.contains(
            "ether saddr { 00:50:56:00:00:01 } ether daddr { 00:50:56:00:00:02 } meta l4proto tcp tcp dport { 5432 } accept"
        ));
        assert!(s.contains(
            "ether saddr { 00:50:56:00:00:02 } ether daddr { 00:50:56:00:00:01 } meta l4proto tcp tcp sport { 5432 } tcp flags & (syn | ack) != syn accept"
        ));
        assert!(s.contains("ether type { ip, ip6 } drop"));
    }

    #[test]
    fn nat_and_published_ports() {
        let mut spec = sample();
        spec.egress_nat = true;
        spec.exposed = vec![
            ExposedPort {
                vm: "web".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: 30080,
            },
            ExposedPort {
                vm: "db".into(),
                protocol: Protocol::Tcp,
                port: 5432,
                node_port: 30432,
            },
        ];
        let r = render(&spec, &ports(), &plan_mtu(1600), Some(&transit()));
        let (s, ns) = (r.script, r.ns_script);
        // Twice: to the transit address in the namespace, to the node's outside.
        assert!(ns.contains("iifname \"gw0\" oifname \"up0\" masquerade"));
        assert!(s.contains("iifname \"hvu4242\" oifname != \"hvu*\" masquerade"));
        let mut spec = spec.clone();
        spec.routed_peers = vec![RoutedPeer {
            vni: 7,
            subnets: vec!["10.9.0.0/16".parse().unwrap()],
        }];
        let routed = render(&spec, &ports(), &plan_mtu(1600), Some(&transit())).ns_script;
        assert!(routed.contains("iifname \"gw0\" oifname \"rp7\" ip daddr { 10.9.0.0/16 } accept"));
        // Published: node port -> the namespace's transit address -> the VM.
        assert!(s.contains(
            "iifname != \"hvu*\" iifname != \"hvb*\" tcp dport 30080 dnat to 169.254.64.7:30080"
        ));
        assert!(ns.contains("iifname \"up0\" tcp dport 30080 dnat to 10.50.0.11:80"));
        assert!(
            !s.contains("30432") && !ns.contains("30432"),
            "remote VMs are published by their own node"
        );
    }

    #[test]
    fn guests_reach_only_dhcp_dns_and_ping_on_the_gateway() {
        let r = render(&sample(), &ports(), &plan_mtu(1600), Some(&transit()));
        let input = r
            .ns_script
            .split("chain input {")
            .nth(1)
            .expect("ns input chain");
        let input = input.split("  }").next().unwrap();
        for want in [
            "ct state established,related accept",
            "iifname \"gw0\" udp dport 67 accept",
            "iifname \"gw0\" ip daddr { 10.50.0.1 } udp dport 53 accept",
            "iifname \"gw0\" ip daddr { 10.50.0.1 } tcp dport 53 accept",
            "iifname \"gw0\" ip daddr { 10.50.0.1 } icmp type echo-request accept",
        ] {
            assert!(input.contains(want), "{want} in {input}");
        }
        assert!(input.trim_end().ends_with("drop"), "{input}");
        // Nothing from the network or the transit veth reaches the node itself.
        let node_input = r.script.split("chain input {").nth(2).expect("ip input");
        let node_input = node_input.split("  }").next().unwrap();
        assert!(node_input.contains("iifname \"hvb4242\" drop"));
        assert!(node_input.trim_end().ends_with("iifname \"hvu4242\" drop"));
        assert!(r.script.contains(
            "type filter hook prerouting priority -300; policy accept;\n    iifname \"hvb4242\" ct zone set 4243"
        ));
        let bridge_input = r.script.split("chain input {").nth(1).unwrap();
        assert!(bridge_input.contains("iifname @ports drop\n    iifname \"hvg4242\" drop"));
        // IPv6 never reaches the gateway; IPv4 to it is judged in its namespace,
        // not by micro-segmentation between VMs.
        let v6 = r
            .script
            .find("oifname \"hvg4242\" ether type ip6 drop")
            .unwrap();
        let to_gw = r.script.find("oifname \"hvg4242\" accept").unwrap();
        assert!(v6 < to_gw && to_gw < r.script.find("jump segment").unwrap());
    }

    #[test]
    fn vxlan_of_this_vni_only_from_peer_vteps() {
        let s = render(&sample(), &ports(), &plan_mtu(1600), Some(&transit())).script;
        assert!(s.contains(
            "udp dport 4789 @th,96,24 4242 ip saddr != { 192.168.77.2, 192.168.77.3 } drop"
        ));
        let mut alone = sample();
        alone.remote_vteps.clear();
        alone
            .members
            .retain(|m| matches!(m.location, Location::Local { .. }));
        let s = render(&alone, &ports(), &plan_mtu(1600), Some(&transit())).script;
        assert!(s.contains("udp dport 4789 @th,96,24 4242 drop"));
    }

    #[test]
    fn l2_only_networks_still_get_input_isolation() {
        let mut spec = sample();
        spec.subnets.clear();
        for m in &mut spec.members {
            m.ip = None;
        }
        let r = render(&spec, &ports(), &plan_mtu(1600), Some(&transit()));
        assert!(r.has_rt_table);
        assert!(r.script.contains("iifname @ports drop"));
        assert!(!r.ns_script.contains("udp dport 67 accept"));
        assert!(!r.script.contains("hvp1\" ip saddr"), "no addresses to pin");
        assert!(
            r.script
                .contains("iifname \"hvp1\" ether saddr != 00:50:56:00:00:01 drop")
        );
    }

    #[test]
    fn ports_send_only_from_their_own_mac_and_addresses() {
        let mut spec = sample();
        spec.members.push(Member {
            vm: "dyn".into(),
            mac: "00:50:56:00:00:09".parse().unwrap(),
            ip: None,
            location: Location::Local {
                port: "hvp9".into(),
            },
        });
        spec.subnets[0].reservations.push(Reservation {
            mac: "00:50:56:00:00:0a".parse().unwrap(),
            ip: "10.50.0.60".parse().unwrap(),
            hostname: None,
        });
        let ports = ["hvp1".to_string(), "hvp9".to_string()].into();
        let s = render(&spec, &ports, &plan_mtu(1600), Some(&transit())).script;
        for want in [
            // Known address: exactly it (and 0.0.0.0 for DHCP).
            "iifname \"hvp1\" ether saddr != 00:50:56:00:00:01 drop",
            "iifname \"hvp1\" arp saddr ether != 00:50:56:00:00:01 drop",
            "iifname \"hvp1\" ip saddr != { 0.0.0.0, 10.50.0.11 } drop",
            "iifname \"hvp1\" arp saddr ip != { 0.0.0.0, 10.50.0.11 } drop",
            // Unknown address: the subnet minus gateway and everyone else's.
            "iifname \"hvp9\" ip saddr != { 0.0.0.0, 10.50.0.0/24 } drop",
            "iifname \"hvp9\" ip saddr { 10.50.0.1, 10.50.0.11, 10.50.0.12, 10.50.0.60 } drop",
            "iifname \"hvp9\" arp saddr ip { 10.50.0.1, 10.50.0.11, 10.50.0.12, 10.50.0.60 } drop",
        ] {
            assert!(s.contains(want), "missing {want}:\n{s}");
        }
        assert!(
            !s.contains("00:50:56:00:00:02 drop"),
            "remote members are their node's job"
        );
    }

    #[test]
    fn egress_nat_never_reaches_metadata_or_cluster_ranges_unless_allowed() {
        let mut spec = sample();
        spec.egress_nat = true;
        let r = render(&spec, &ports(), &plan_mtu(1600), Some(&transit()));
        // Both in the namespace and again on the node (after kube-proxy's DNAT).
        for (s, iif) in [(&r.ns_script, "gw0"), (&r.script, "hvu4242")] {
            let deny = format!("iifname \"{iif}\" ip daddr {{ 169.254.0.0/16 }} drop");
            let accept = format!(
                "iifname \"{iif}\" {}accept",
                if iif == "gw0" { "oifname \"up0\" " } else { "" }
            );
            assert!(s.find(&deny).unwrap() < s.find(&accept).unwrap(), "{s}");
        }
        spec.egress_denied = vec![
            "10.96.0.0/12".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ];
        spec.egress_allowed = vec!["10.96.0.10/32".parse().unwrap()];
        let r = render(&spec, &ports(), &plan_mtu(1600), Some(&transit()));
        for (s, iif) in [(&r.ns_script, "gw0"), (&r.script, "hvu4242")] {
            let allow = format!("iifname \"{iif}\" ip daddr {{ 10.96.0.10/32 }} accept");
            let deny = format!(
                "iifname \"{iif}\" ip daddr {{ 10.244.0.0/16, 10.96.0.0/12, 169.254.0.0/16 }} drop"
            );
            assert!(s.find(&allow).unwrap() < s.find(&deny).unwrap(), "{s}");
        }
    }

    #[test]
    fn upstream_dns_without_egress_passes_only_to_the_resolvers() {
        let mut spec = sample();
        spec.dns.upstream = vec!["10.0.0.53".parse().unwrap()];
        let r = render(&spec, &ports(), &plan_mtu(1600), Some(&transit()));
        let rule = "iifname \"hvu4242\" ip daddr { 10.0.0.53 } meta l4proto { tcp, udp } th dport 53 accept";
        let fwd = r
            .script
            .split("chain forward {")
            .nth(2)
            .expect("ip forward");
        assert!(fwd.find(rule).unwrap() < fwd.find("iifname \"hvu4242\" drop").unwrap());
        assert!(
            !r.ns_script.contains("oifname \"up0\" accept"),
            "guests still stay in"
        );
    }

    #[test]
    fn hash_changes_with_rules_only() {
        let a = render(&sample(), &ports(), &plan_mtu(1600), Some(&transit()));
        let b = render(&sample(), &ports(), &plan_mtu(1600), Some(&transit()));
        assert_eq!(a.hash, b.hash);
        let mut spec = sample();
        spec.egress_nat = true;
        assert_ne!(
            render(&spec, &ports(), &plan_mtu(1600), Some(&transit())).hash,
            a.hash
        );
    }
}
