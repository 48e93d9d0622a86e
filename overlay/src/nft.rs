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
use crate::spec::{Action, FirewallRule, Location, NetworkSpec, Peers, Protocol};

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

fn render_rt_body(spec: &NetworkSpec, mtu: &MtuPlan) -> Option<String> {
    if spec.subnets.is_empty() {
        return None;
    }
    let br = names::bridge(spec.vni);
    let mut b = String::new();
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
    fn hash_changes_with_rules_only() {
        let a = render(&sample(), &ports(), &plan_mtu(1600));
        let b = render(&sample(), &ports(), &plan_mtu(1600));
        assert_eq!(a.hash, b.hash);
        let mut spec = sample();
        spec.egress_nat = true;
        assert_ne!(render(&spec, &ports(), &plan_mtu(1600)).hash, a.hash);
    }
}
