//! nftables rendering. Two tables per network, both replaced atomically in one
//! `nft -f` transaction (add+delete+define), so a change never opens a window
//! without rules:
//!
//! - `bridge hvx_fw_<vni>`: distributed-gateway isolation (each node's gateway answers
//!   only its local VMs: ARP for gateway addresses and DHCP never cross the tunnel),
//!   MSS clamping in Reduced-MTU mode, then the micro-segmentation rules.
//!   This kernel has no bridge conntrack (`nf_conntrack_bridge`), so rules are
//!   stateless: an `allow` also installs its reflexive reply rule (TCP replies must
//!   not be a bare SYN, so the server side cannot open connections through it).
//! - `ip hvx_rt_<vni>`: the virtual router (which overlay bridges may route to which),
//!   egress NAT (masquerade) and published ports (DNAT, only for VMs on this node,
//!   because replies leave through the VM's local gateway and must meet the same
//!   conntrack entry).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::names;
use crate::plan::MtuPlan;
use crate::spec::{Action, FirewallRule, LINK_LOCAL, Location, NetworkSpec, Peers, Protocol};

#[derive(Debug, Clone)]
pub struct Rendered {
    pub script: String,
    pub hash: String,
    pub has_rt_table: bool,
}

/// An empty chain named after the ruleset hash marks each table's version:
/// `nft -j list chains` shows it (nft 1.0.6 omits table comments from JSON).
pub fn marker_chain(hash: &str) -> String {
    format!("hash_{hash}")
}

pub fn render(spec: &NetworkSpec, ports: &BTreeSet<String>, mtu: &MtuPlan) -> Rendered {
    let fw = render_fw_body(spec, ports, mtu);
    let rt = render_rt_body(spec, mtu);
    let mut hasher = Sha256::new();
    hasher.update(fw.as_bytes());
    if let Some(rt) = &rt {
        hasher.update(rt.as_bytes());
    }
    let digest = hasher.finalize();
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
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
    if let Some(rt) = &rt {
        let _ = writeln!(
            s,
            "table ip {rt_name} {{\n  chain {marker} {{\n  }}\n{rt}}}"
        );
    }
    Rendered {
        script: s,
        hash,
        has_rt_table: rt.is_some(),
    }
}

fn quoted_set<I: IntoIterator<Item = String>>(items: I) -> String {
    let v: Vec<String> = items.into_iter().collect();
    format!("{{ {} }}", v.join(", "))
}

fn render_fw_body(spec: &NetworkSpec, ports: &BTreeSet<String>, mtu: &MtuPlan) -> String {
    let vx = names::vxlan(spec.vni);
    let mut members: Vec<String> = vec![format!("\"{vx}\"")];
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
    if !gateways.is_empty() {
        let g = quoted_set(gateways);
        let _ = writeln!(
            b,
            "    oifname \"{vx}\" arp operation request arp daddr ip {g} drop"
        );
        let _ = writeln!(b, "    iifname \"{vx}\" arp daddr ip {g} drop");
        let _ = writeln!(b, "    oifname \"{vx}\" udp dport {{ 67, 68 }} drop");
        let _ = writeln!(b, "    iifname \"{vx}\" udp dport {{ 67, 68 }} drop");
    }
    if let Some(mss) = mtu.mss_clamp {
        let _ = writeln!(
            b,
            "    tcp flags syn tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
        );
    }
    let _ = writeln!(b, "    jump segment\n  }}");
    // Frames from the node's own stack (gateway, routed traffic) toward the ports.
    let _ = writeln!(
        b,
        "  chain output {{\n    type filter hook output priority -10; policy accept;"
    );
    if let Some(mss) = mtu.mss_clamp {
        let _ = writeln!(
            b,
            "    oifname @ports tcp flags syn tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
        );
    }
    let _ = writeln!(b, "  }}");
    render_anti_spoofing(&mut b, spec);
    // Frames the bridge delivers to the node itself. IPv4 is judged by the `ip`
    // table's input chain (it knows the gateway addresses and conntrack); the
    // overlay carries no IPv6 for the node, so guests get no IPv6 path to its
    // listeners (link-local addresses of the bridge included). A network without
    // subnets has no gateway at all: nothing from its ports is for the node.
    let _ = writeln!(
        b,
        "  chain input {{\n    type filter hook input priority -200; policy accept;"
    );
    let _ = writeln!(b, "    iifname != @ports accept");
    if spec.subnets.is_empty() {
        let _ = writeln!(b, "    drop");
    } else {
        let _ = writeln!(b, "    ether type ip6 drop");
    }
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

/// The node's own listeners seen from the overlay (IPv4; IPv6 is dropped in the
/// bridge table). Guests reach the gateway for DHCP (udp 67, any destination: a
/// DISCOVER is a broadcast), DNS (udp/tcp 53) and ICMP echo (guests and operators
/// ping their default gateway to check the path; an echo reply discloses nothing a
/// DHCP answer does not). Everything else addressed to the node from a guest port
/// is dropped: the agent's gRPC and metrics ports, kubelet, sshd, and the node's
/// other addresses (which the weak host model would otherwise answer on any
/// interface). Replies to connections the node opened itself still pass.
///
/// VXLAN: frames of this VNI are accepted only from the network's peer VTEPs, so a
/// host elsewhere on the underlay cannot inject frames into the overlay. The VNI
/// sits in bits 32..56 of the VXLAN header, after the 8-byte UDP header.
fn render_input(b: &mut String, spec: &NetworkSpec, br: &str) {
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
    let _ = writeln!(b, "    iifname != \"{br}\" accept");
    let _ = writeln!(b, "    ct state established,related accept");
    if !spec.subnets.is_empty() {
        let gws = quoted_set(spec.subnets.iter().map(|s| s.gateway.to_string()));
        let _ = writeln!(b, "    udp dport 67 accept");
        let _ = writeln!(b, "    ip daddr {gws} udp dport 53 accept");
        let _ = writeln!(b, "    ip daddr {gws} tcp dport 53 accept");
        let _ = writeln!(b, "    ip daddr {gws} icmp type echo-request accept");
    }
    let _ = writeln!(b, "    drop\n  }}");
}

fn render_rt_body(spec: &NetworkSpec, mtu: &MtuPlan) -> Option<String> {
    let br = names::bridge(spec.vni);
    let mut b = String::new();
    render_input(&mut b, spec, &br);
    if spec.subnets.is_empty() {
        return Some(b);
    }
    let _ = writeln!(
        b,
        "  chain forward {{\n    type filter hook forward priority 0; policy accept;"
    );
    if mtu.mss_clamp.is_some() {
        let _ = writeln!(
            b,
            "    iifname \"{br}\" tcp flags syn tcp option maxseg size set rt mtu"
        );
        let _ = writeln!(
            b,
            "    oifname \"{br}\" tcp flags syn tcp option maxseg size set rt mtu"
        );
    }
    let _ = writeln!(b, "    iifname \"{br}\" oifname \"{br}\" accept");
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
            "    iifname \"{br}\" oifname \"{}\"{daddr} accept",
            names::bridge(p.vni)
        );
    }
    let _ = writeln!(b, "    iifname \"{br}\" oifname \"hvb*\" drop");
    if spec.egress_nat {
        // Egress never reaches cloud metadata or the cluster's own ranges (a guest
        // is a tenant, not a pod); explicit exceptions first. Matching after DNAT
        // also stops Service addresses: kube-proxy rewrites them to pod addresses.
        if !spec.egress_allowed.is_empty() {
            let allowed = quoted_set(spec.egress_allowed.iter().map(|n| n.network().to_string()));
            let _ = writeln!(b, "    iifname \"{br}\" ip daddr {allowed} accept");
        }
        let mut denied: BTreeSet<String> = [LINK_LOCAL.to_string()].into();
        denied.extend(spec.egress_denied.iter().map(|n| n.network().to_string()));
        let _ = writeln!(
            b,
            "    iifname \"{br}\" ip daddr {} drop",
            quoted_set(denied)
        );
    }
    let _ = writeln!(
        b,
        "    iifname \"{br}\" {}",
        if spec.egress_nat { "accept" } else { "drop" }
    );
    let _ = writeln!(
        b,
        "    oifname \"{br}\" ct state established,related accept"
    );
    let _ = writeln!(b, "    oifname \"{br}\" ct status dnat accept");
    let _ = writeln!(b, "    oifname \"{br}\" iifname != \"hvb*\" drop\n  }}");

    let _ = writeln!(
        b,
        "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;"
    );
    if spec.egress_nat {
        let _ = writeln!(b, "    iifname \"{br}\" oifname != \"hvb*\" masquerade");
    }
    let _ = writeln!(b, "  }}");
    let _ = writeln!(
        b,
        "  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;"
    );
    for e in &spec.exposed {
        let local_ip = spec.members.iter().find_map(|m| match (&m.location, m.ip) {
            (Location::Local { .. }, Some(ip)) if m.vm == e.vm => Some(ip),
            _ => None,
        });
        if let Some(ip) = local_ip {
            let l4 = if e.protocol == Protocol::Udp {
                "udp"
            } else {
                "tcp"
            };
            let _ = writeln!(
                b,
                "    iifname != \"hvb*\" {l4} dport {} dnat to {ip}:{}",
                e.node_port, e.port
            );
        }
    }
    let _ = writeln!(b, "  }}");
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Mac;
    use crate::plan::plan_mtu;
    use crate::plan::tests::sample;
    use crate::spec::*;

    fn ports() -> BTreeSet<String> {
        ["hvp1".to_string()].into()
    }

    #[test]
    fn replaces_tables_atomically_and_isolates_the_gateway() {
        let r = render(&sample(), &ports(), &plan_mtu(1600));
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
            s.contains("iifname \"hvb4242\" drop"),
            "no egress without NAT"
        );
    }

    #[test]
    fn reduced_mtu_clamps_mss() {
        let r = render(&sample(), &ports(), &plan_mtu(1500));
        assert!(r.script.contains("tcp option maxseg size set 1410"));
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
        let s = render(&spec, &ports(), &plan_mtu(1600)).script;
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
        let s = render(&spec, &ports(), &plan_mtu(1600)).script;
        assert!(s.contains("iifname \"hvb4242\" oifname != \"hvb*\" masquerade"));
        let mut spec = spec.clone();
        spec.routed_peers = vec![RoutedPeer {
            vni: 7,
            subnets: vec!["10.9.0.0/16".parse().unwrap()],
        }];
        let routed = render(&spec, &ports(), &plan_mtu(1600)).script;
        assert!(
            routed.contains("iifname \"hvb4242\" oifname \"hvb7\" ip daddr { 10.9.0.0/16 } accept")
        );
        assert!(s.contains("tcp dport 30080 dnat to 10.50.0.11:80"));
        assert!(
            !s.contains("30432"),
            "remote VMs are published by their own node"
        );
    }

    #[test]
    fn guests_reach_only_dhcp_dns_and_ping_on_the_node() {
        let s = render(&sample(), &ports(), &plan_mtu(1600)).script;
        let input = s.split("chain input {").nth(2).expect("ip input chain");
        let input = input.split("  }").next().unwrap();
        for want in [
            "iifname != \"hvb4242\" accept",
            "ct state established,related accept",
            "udp dport 67 accept",
            "ip daddr { 10.50.0.1 } udp dport 53 accept",
            "ip daddr { 10.50.0.1 } tcp dport 53 accept",
            "ip daddr { 10.50.0.1 } icmp type echo-request accept",
        ] {
            assert!(input.contains(want), "{want} in {input}");
        }
        assert!(input.trim_end().ends_with("drop"), "{input}");
        // IPv6 from the ports never reaches the node.
        let bridge_input = s.split("chain input {").nth(1).unwrap();
        assert!(bridge_input.contains("iifname != @ports accept\n    ether type ip6 drop"));
    }

    #[test]
    fn vxlan_of_this_vni_only_from_peer_vteps() {
        let s = render(&sample(), &ports(), &plan_mtu(1600)).script;
        assert!(s.contains(
            "udp dport 4789 @th,96,24 4242 ip saddr != { 192.168.77.2, 192.168.77.3 } drop"
        ));
        let mut alone = sample();
        alone.remote_vteps.clear();
        alone
            .members
            .retain(|m| matches!(m.location, Location::Local { .. }));
        let s = render(&alone, &ports(), &plan_mtu(1600)).script;
        assert!(s.contains("udp dport 4789 @th,96,24 4242 drop"));
    }

    #[test]
    fn l2_only_networks_still_get_input_isolation() {
        let mut spec = sample();
        spec.subnets.clear();
        for m in &mut spec.members {
            m.ip = None;
        }
        let r = render(&spec, &ports(), &plan_mtu(1600));
        assert!(r.has_rt_table);
        assert!(r.script.contains("iifname != @ports accept\n    drop"));
        assert!(!r.script.contains("udp dport 67 accept"));
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
        let s = render(&spec, &ports, &plan_mtu(1600)).script;
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
        let s = render(&spec, &ports(), &plan_mtu(1600)).script;
        let deny = "iifname \"hvb4242\" ip daddr { 169.254.0.0/16 } drop";
        let accept = "    iifname \"hvb4242\" accept";
        assert!(s.find(deny).unwrap() < s.find(accept).unwrap(), "{s}");
        spec.egress_denied = vec![
            "10.96.0.0/12".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ];
        spec.egress_allowed = vec!["10.96.0.10/32".parse().unwrap()];
        let s = render(&spec, &ports(), &plan_mtu(1600)).script;
        let allow = "iifname \"hvb4242\" ip daddr { 10.96.0.10/32 } accept";
        let deny =
            "iifname \"hvb4242\" ip daddr { 10.244.0.0/16, 10.96.0.0/12, 169.254.0.0/16 } drop";
        assert!(s.find(allow).unwrap() < s.find(deny).unwrap(), "{s}");
    }

    #[test]
    fn hash_changes_with_rules_only() {
        let a = render(&sample(), &ports(), &plan_mtu(1600));
        let b = render(&sample(), &ports(), &plan_mtu(1600));
        assert_eq!(a.hash, b.hash);
        let mut spec = sample();
        spec.egress_nat = true;
        assert_ne!(render(&spec, &ports(), &plan_mtu(1600)).hash, a.hash);
    }
}
