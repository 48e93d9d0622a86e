//! Network services across three namespace "nodes": DHCP hands out reserved and
//! dynamic addresses, DNS resolves VM names and custom records on every node, and
//! the nftables micro-segmentation blocks and permits exactly as declared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hvx_overlay::lab::{Lab, wait_until};
use hvx_overlay::*;

/// Runs busybox udhcpc once; its script prints the options the server sent.
fn dhcp(lab: &Lab, vm: &str) -> String {
    let body = "#!/bin/sh\n[ \"$1\" = bound ] && echo \"hvx-opts router=$router dns=$dns domain=$domain\"\nexit 0\n";
    udhcpc(lab, vm, "udhcpc-opts.sh", body)
}

fn lookup(lab: &Lab, vm: &str, name: &str) -> String {
    let ns = lab.vm(vm).ns.clone();
    // Exit status ignored: busybox also asks AAAA, which has no answer here.
    let cmd = format!("busybox nslookup {name} 10.77.0.1 2>&1; true");
    lab.exec(&ns, &["sh", "-c", &cmd])
        .unwrap_or_else(|e| e.to_string())
}

/// Everything nslookup printed after the server's own lines.
fn answers(out: &str) -> String {
    out.split_once("Name:")
        .map(|(_, a)| a.to_string())
        .unwrap_or_default()
}

fn tcp_echo(lab: &Lab, from: &str, ip: &str, port: u16) -> bool {
    let ns = lab.vm(from).ns.clone();
    let cmd = format!("echo hvx-echo | socat -T 3 - TCP:{ip}:{port},connect-timeout=3");
    lab.exec(&ns, &["sh", "-c", &cmd])
        .map(|o| o.contains("hvx-echo"))
        .unwrap_or(false)
}

#[test]
#[ignore = "privileged: make test-integration"]
fn dhcp_dns_and_firewall() {
    if !root_or_skip("dhcp_dns_and_firewall") {
        return;
    }
    let mut lab = Lab::new(3, 1600).unwrap();
    let mut net = Net::new();
    net.subnet.dhcp = Some(DhcpRange {
        start: "10.77.0.100".parse().unwrap(),
        end: "10.77.0.150".parse().unwrap(),
        lease_secs: 600,
    });
    // Upstream resolver: a dnsmasq on node 3's underlay address, outside the overlay.
    net.dns.upstream = vec!["192.168.77.3".parse().unwrap()];
    net.dns.records.push(DnsRecord {
        name: "api".into(),
        ip: "10.77.0.11".parse().unwrap(),
    });
    for (i, (name, node)) in [("a", 0), ("b", 1), ("c", 2), ("e", 2), ("f", 1)]
        .into_iter()
        .enumerate()
    {
        lab.add_vm(name, node, mac(&format!("00:50:56:00:02:0{}", i + 1)))
            .unwrap();
    }
    for (name, ip) in [
        ("a", "10.77.0.11"),
        ("b", "10.77.0.12"),
        ("c", "10.77.0.13"),
    ] {
        net.ips.insert(name.into(), ip.parse().unwrap());
        set_ip(&lab, name, ip.parse().unwrap());
    }
    // `e` has a reservation but configures nothing itself: DHCP must give it .50.
    net.ips.insert("e".into(), "10.77.0.50".parse().unwrap());
    let (a, b) = (lab.vm("a").mac, lab.vm("b").mac);
    net.firewall = FirewallSpec {
        default_action: Action::Deny,
        rules: vec![FirewallRule {
            from: Peers::Macs(vec![a]),
            to: Peers::Macs(vec![b]),
            protocol: Protocol::Tcp,
            ports: vec![7],
            action: Action::Allow,
        }],
    };
    net.apply_all(&lab);

    // DHCP and DNS talk to the local gateway, so they work under default-deny.
    let out = dhcp(&lab, "e");
    assert!(
        out.contains("lease of 10.77.0.50 obtained from 10.77.0.1"),
        "reserved lease: {out}"
    );
    assert!(
        out.contains("hvx-opts router=10.77.0.1 dns=10.77.0.1 domain=app.internal"),
        "DHCP options: {out}"
    );
    let out = dhcp(&lab, "f");
    let dynamic_ok = (100..=150).any(|h| out.contains(&format!("lease of 10.77.0.{h} obtained")));
    assert!(dynamic_ok, "dynamic lease from the range: {out}");

    for (from, name, want) in [
        ("a", "b.app.internal", "10.77.0.12"),
        ("c", "a.app.internal", "10.77.0.11"),
        ("b", "e", "10.77.0.50"),
        ("a", "api.app.internal", "10.77.0.11"),
    ] {
        let out = lookup(&lab, from, name);
        assert!(
            answers(&out).contains(want),
            "{from} resolving {name}: {out}"
        );
    }
    let n3 = lab.nodes[2].ns.clone();
    let mut upstream = lab
        .spawn(
            &n3,
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=192.168.77.3",
                "--bind-interfaces",
                "--address=/upstream.test/10.99.0.7",
                "--pid-file=",
            ],
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        lab.exec(&n3, &["ss", "-lun"])
            .is_ok_and(|o| o.contains("192.168.77.3:53"))
    }));
    let out = lookup(&lab, "b", "www.upstream.test");
    let _ = upstream.kill();
    let _ = upstream.wait();
    assert!(
        answers(&out).contains("10.99.0.7"),
        "upstream forwarding: {out}"
    );

    let out = lookup(&lab, "a", "nope.app.internal");
    assert!(
        !answers(&out).contains("10.77.0."),
        "unknown name resolved: {out}"
    );

    // Echo servers on b, ports 7 (allowed from a) and 8 (not allowed).
    let b_ns = lab.vm("b").ns.clone();
    let mut servers = Vec::new();
    for port in [7, 8] {
        let listen = format!("TCP-LISTEN:{port},fork,reuseaddr");
        servers.push(lab.spawn(&b_ns, &["socat", &listen, "EXEC:cat"]).unwrap());
    }
    assert!(wait_until(Duration::from_secs(10), || {
        let ss = lab.exec(&b_ns, &["ss", "-ltn"]).unwrap_or_default();
        ss.contains(":7 ") && ss.contains(":8 ")
    }));
    assert!(tcp_echo(&lab, "a", "10.77.0.12", 7), "a -> b:7 is allowed");
    assert!(
        !tcp_echo(&lab, "a", "10.77.0.12", 8),
        "a -> b:8 is not allowed"
    );
    assert!(
        !tcp_echo(&lab, "c", "10.77.0.12", 7),
        "c -> b:7 is not allowed"
    );
    assert!(
        !ping(&lab, "a", "10.77.0.12".parse().unwrap()),
        "ICMP is denied by default"
    );

    // Open up: the changed rules replace the tables atomically on every node.
    net.firewall.default_action = Action::Allow;
    let reports = net.apply_all(&lab);
    assert!(
        reports
            .iter()
            .all(|r| r.changes.iter().any(|c| c.starts_with("nft replace"))),
        "{reports:?}"
    );
    assert!(ping(&lab, "a", "10.77.0.12".parse().unwrap()));
    assert!(tcp_echo(&lab, "c", "10.77.0.12", 8));
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}
