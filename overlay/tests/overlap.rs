//! Two networks with the same subnet on one node (clones of one application):
//! each has its own gateway namespace, dnsmasq, NAT and transit pair, so guests
//! with the same address on either get their own network's lease, gateway, names
//! and egress, and never reach the other's; deleting one leaves the other working
//! and nothing of the deleted one behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use hvx_overlay::dnsmasq::DnsmasqPaths;
use hvx_overlay::lab::{Lab, wait_until};
use hvx_overlay::*;

const BLUE: u32 = 100;
const CLONE: u32 = 200;

/// busybox udhcpc once; its script configures the lease like a guest would.
fn dhcp(lab: &Lab, vm: &str) -> String {
    let body = "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nip addr add \"$ip/$mask\" dev \"$interface\"\nip route add default via \"$router\"\necho \"hvx-lease ip=$ip router=$router dns=$dns\"\n";
    udhcpc(lab, vm, "udhcpc-configure.sh", body)
}

fn neighbour_mac(lab: &Lab, vm: &str, ip: &str) -> String {
    let ns = lab.vm(vm).ns.clone();
    lab.exec(&ns, &["ip", "neigh", "show", ip, "dev", "eth0"])
        .unwrap_or_default()
}

fn tcp_echo(lab: &Lab, from: &str, ip: &str, port: u16) -> bool {
    let ns = lab.vm(from).ns.clone();
    let cmd = format!("echo hvx-echo | socat -T 3 - TCP:{ip}:{port},connect-timeout=3");
    lab.exec(&ns, &["sh", "-c", &cmd])
        .map(|o| o.contains("hvx-echo"))
        .unwrap_or(false)
}

fn lookup(lab: &Lab, vm: &str, name: &str) -> String {
    let ns = lab.vm(vm).ns.clone();
    // Exit status ignored: busybox also asks AAAA, which has no answer here.
    let cmd = format!("busybox nslookup {name} 10.77.0.1 2>&1; true");
    let out = lab
        .exec(&ns, &["sh", "-c", &cmd])
        .unwrap_or_else(|e| e.to_string());
    out.split_once("Name:")
        .map(|(_, a)| a.to_string())
        .unwrap_or_default()
}

fn network(vni: u32, vms: [&str; 2]) -> Net {
    let mut net = Net::new();
    net.vni = vni;
    net.only = Some(vms.iter().map(|s| s.to_string()).collect());
    // One dynamic address only: both guests get the same one, each from its own
    // network's dnsmasq.
    net.subnet.dhcp = Some(DhcpRange {
        start: "10.77.0.100".parse().unwrap(),
        end: "10.77.0.100".parse().unwrap(),
        lease_secs: 3600,
    });
    net.ips.insert(vms[1].into(), "10.77.0.50".parse().unwrap());
    net.egress_nat = true;
    net
}

fn apply(lab: &Lab, net: &Net) {
    lab.nodes[0]
        .switch
        .apply(&net.spec_for(lab, 0))
        .unwrap_or_else(|e| panic!("apply vni {}: {e}", net.vni));
}

fn links(lab: &Lab) -> String {
    lab.exec(&lab.nodes[0].ns, &["ip", "-o", "link", "show"])
        .unwrap()
}

#[test]
#[ignore = "privileged: make test-integration"]
fn same_subnet_twice_on_one_node() {
    if !root_or_skip("same_subnet_twice_on_one_node") {
        return;
    }
    // Node 2 only plays "the outside world" for egress.
    let mut lab = Lab::new(2, 1600).unwrap();
    lab.add_vm("a", 0, mac("00:50:56:00:0a:01")).unwrap();
    lab.add_vm("a2", 0, mac("00:50:56:00:0a:02")).unwrap();
    lab.add_vm("b", 0, mac("00:50:56:00:0b:01")).unwrap();
    lab.add_vm("b2", 0, mac("00:50:56:00:0b:02")).unwrap();
    let blue = network(BLUE, ["a", "a2"]);
    let clone = network(CLONE, ["b", "b2"]);
    apply(&lab, &blue);
    apply(&lab, &clone);
    set_ip(&lab, "a2", "10.77.0.50".parse().unwrap());
    set_ip(&lab, "b2", "10.77.0.50".parse().unwrap());

    // Each guest gets the same address from its own network's dnsmasq.
    for vm in ["a", "b"] {
        let out = dhcp(&lab, vm);
        assert!(
            out.contains("hvx-lease ip=10.77.0.100 router=10.77.0.1 dns=10.77.0.1"),
            "{vm}: {out}"
        );
    }
    let host = &lab.nodes[0].switch.host;
    let leases =
        |vni: u32| std::fs::read_to_string(host.state_dir(vni).join("leases")).unwrap_or_default();
    assert!(leases(BLUE).contains("00:50:56:00:0a:01") && !leases(BLUE).contains("0b:01"));
    assert!(leases(CLONE).contains("00:50:56:00:0b:01") && !leases(CLONE).contains("0a:01"));

    // Own gateway, own neighbour with the shared address, own names.
    let gw: Ipv4Addr = "10.77.0.1".parse().unwrap();
    let twin: Ipv4Addr = "10.77.0.50".parse().unwrap();
    for (vm, peer) in [("a", "a2"), ("b", "b2")] {
        assert!(ping(&lab, vm, gw), "{vm} -> its gateway");
        assert!(ping(&lab, vm, twin), "{vm} -> {peer}");
        let seen = neighbour_mac(&lab, vm, "10.77.0.50");
        assert!(
            seen.contains(&lab.vm(peer).mac.to_string()),
            "{vm} reached {seen:?}, not {peer}"
        );
    }
    assert!(lookup(&lab, "a", "a2").contains("10.77.0.50"));
    assert_eq!(
        lookup(&lab, "a", "b2"),
        "",
        "blue's DNS knows no clone names"
    );
    assert!(lookup(&lab, "b", "b2").contains("10.77.0.50"));

    // A service on b2 only: b reaches it, a (same address, other network) does not.
    let b2_ns = lab.vm("b2").ns.clone();
    let mut server = lab
        .spawn(
            &b2_ns,
            &["socat", "TCP-LISTEN:7,fork,reuseaddr", "EXEC:cat"],
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        lab.exec(&b2_ns, &["ss", "-ltn"])
            .is_ok_and(|o| o.contains(":7 "))
    }));
    assert!(tcp_echo(&lab, "b", "10.77.0.50", 7), "b -> b2");
    assert!(
        !tcp_echo(&lab, "a", "10.77.0.50", 7),
        "a reached the clone's b2"
    );

    // Twin flows: the same addresses and ports on both networks at once. With
    // br_netfilter (a kubeadm prerequisite, on here) bridged frames pass the node's
    // conntrack, and kube-proxy drops what it finds INVALID there: each network's
    // frames need a conntrack zone of their own.
    let n0 = lab.nodes[0].ns.clone();
    lab.exec(
        &n0,
        &[
            "nft",
            "add table ip kubeproxy; add chain ip kubeproxy forward { type filter hook forward priority 0; }; add rule ip kubeproxy forward ct state invalid drop",
        ],
    )
    .unwrap();
    let a2_ns = lab.vm("a2").ns.clone();
    let mut twin_server = lab
        .spawn(
            &a2_ns,
            &["socat", "TCP-LISTEN:7,fork,reuseaddr", "EXEC:cat"],
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        lab.exec(&a2_ns, &["ss", "-ltn"])
            .is_ok_and(|o| o.contains(":7 "))
    }));
    let a_ns = lab.vm("a").ns.clone();
    let mut held = lab
        .spawn(
            &a_ns,
            &[
                "sh",
                "-c",
                "sleep 4 | socat - TCP:10.77.0.50:7,sourceport=40007,reuseaddr",
            ],
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        lab.exec(&a_ns, &["ss", "-tn", "state", "established"])
            .is_ok_and(|o| o.contains(":40007"))
    }));
    let b_ns = lab.vm("b").ns.clone();
    let twin_flow = lab.exec(
        &b_ns,
        &[
            "sh",
            "-c",
            "echo hvx-twin | socat -T 3 - TCP:10.77.0.50:7,sourceport=40007,reuseaddr,connect-timeout=3",
        ],
    );
    // Two entries for the twin tuple in the node's conntrack, one per network zone.
    let entries = lab
        .exec(
            &n0,
            &[
                "conntrack",
                "-L",
                "-p",
                "tcp",
                "--sport",
                "40007",
                "--dport",
                "7",
            ],
        )
        .unwrap_or_default();
    let zones: std::collections::BTreeSet<&str> = entries
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("zone=")))
        .collect();
    let _ = held.kill();
    let _ = held.wait();
    let _ = twin_server.kill();
    let _ = twin_server.wait();
    assert!(
        twin_flow.as_deref().is_ok_and(|o| o.contains("hvx-twin")),
        "the clone's twin flow: {twin_flow:?}"
    );
    let want: std::collections::BTreeSet<String> = [BLUE, CLONE]
        .iter()
        .map(|v| format!("zone={}", hvx_overlay::names::conntrack_zone(*v)))
        .collect();
    let want: std::collections::BTreeSet<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(zones, want, "conntrack entries:\n{entries}");

    // Egress NAT from both (the same guest address, two transit pairs).
    let outside: Ipv4Addr = "192.168.77.2".parse().unwrap();
    assert!(ping(&lab, "a", outside), "blue egress");
    assert!(ping(&lab, "b", outside), "clone egress");
    let transit = |vni: u32| {
        lab.exec(
            &n0,
            &[
                "ip",
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                &format!("hvu{vni}"),
            ],
        )
        .unwrap()
    };
    assert_ne!(transit(BLUE), transit(CLONE));
    assert!(transit(BLUE).contains("169.254."), "{}", transit(BLUE));
    // The node namespace holds no address of the shared subnet.
    let node_addrs = lab.exec(&n0, &["ip", "-4", "-o", "addr", "show"]).unwrap();
    assert!(!node_addrs.contains("10.77.0."), "{node_addrs}");

    // A restarted agent adopts both namespaces: nothing changes, nothing doubles.
    let before = lab.gateway_namespaces();
    assert_eq!(before.len(), 2, "{before:?}");
    let restarted = Switch::new(host.clone());
    let (reports, errors) =
        restarted.reconcile_all(&[blue.spec_for(&lab, 0), clone.spec_for(&lab, 0)]);
    assert!(errors.is_empty(), "{errors:?}");
    for r in &reports {
        assert!(r.changes.is_empty(), "restart changed {:?}", r.changes);
    }
    assert_eq!(lab.gateway_namespaces(), before);

    // The agent's mount namespace died (a container, `ip netns exec`) while the
    // network lived on: its name is an empty file now. The next agent binds it to
    // the namespace its dnsmasq still serves: same namespace, same dnsmasq.
    let blue_ns = host.gateway_netns(BLUE);
    let blue_dnsmasq = hvx_overlay::daemon::running_pid(&DnsmasqPaths::new(&host.state_dir(BLUE)))
        .expect("blue's dnsmasq runs");
    let path = format!("/run/netns/{blue_ns}");
    let status = std::process::Command::new("umount")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!hvx_overlay::apply::is_netns_mount(std::path::Path::new(
        &path
    )));
    let again = Switch::new(host.clone());
    let report = again.apply(&blue.spec_for(&lab, 0)).unwrap();
    assert!(
        report.changes.iter().any(|c| c.starts_with("re-attached")),
        "{:?}",
        report.changes
    );
    assert!(
        !report
            .changes
            .iter()
            .any(|c| c.contains("dnsmasq") && !c.starts_with("re-attached")),
        "dnsmasq replaced: {:?}",
        report.changes
    );
    assert_eq!(
        hvx_overlay::daemon::running_pid(&DnsmasqPaths::new(&host.state_dir(BLUE))),
        Some(blue_dnsmasq)
    );
    assert!(ping(&lab, "a", gw) && ping(&lab, "a", outside));
    assert_eq!(lab.gateway_namespaces(), before);

    // The agent's container ended: its mount namespace took the name and its dnsmasq
    // died too. The pin (a mount in the host's mount namespace) kept the namespace:
    // the next agent binds the name to it again, with its gateway, firewall and NAT
    // state, rather than making an empty one.
    let ino = |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let blue_ino = ino(&path);
    let pin = hvx_overlay::pin::pin_path(&host.state_dir(BLUE));
    assert!(
        hvx_overlay::pin::pinned(host.pin_host_pid, &pin, std::path::Path::new(&path)),
        "the gateway namespace is pinned at {}",
        pin.display()
    );
    let blue_dnsmasq = hvx_overlay::daemon::running_pid(&DnsmasqPaths::new(&host.state_dir(BLUE)))
        .expect("blue's dnsmasq runs");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &blue_dnsmasq.to_string()])
        .status();
    let status = std::process::Command::new("umount")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let again = Switch::new(host.clone());
    let report = again.apply(&blue.spec_for(&lab, 0)).unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.starts_with("re-attached") && c.ends_with("from its pin")),
        "{:?}",
        report.changes
    );
    assert!(
        !report.changes.iter().any(|c| c.starts_with("ip netns add")),
        "a new namespace was made: {:?}",
        report.changes
    );
    assert_eq!(ino(&path), blue_ino, "the same namespace");
    assert!(ping(&lab, "a", gw) && ping(&lab, "a", outside));
    assert_eq!(lab.gateway_namespaces(), before);

    // Delete the clone: blue keeps working, nothing of the clone is left.
    let clone_dnsmasq =
        hvx_overlay::daemon::running_pid(&DnsmasqPaths::new(&host.state_dir(CLONE)))
            .expect("the clone's dnsmasq runs");
    let (_, errors) = restarted.reconcile_all(&[blue.spec_for(&lab, 0)]);
    assert!(errors.is_empty(), "{errors:?}");
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(lab.gateway_namespaces(), [host.gateway_netns(BLUE)]);
    let left = links(&lab);
    for name in ["hvb200", "hvv200", "hvg200", "hvu200"] {
        assert!(!left.contains(name), "{name} left: {left}");
    }
    let tables = lab.exec(&n0, &["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("_200"), "{tables}");
    // Gone, or a zombie this test process (a subreaper) has not reaped yet.
    let stat = std::fs::read_to_string(format!("/proc/{clone_dnsmasq}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        "the clone's dnsmasq still runs: {stat}"
    );
    assert!(!host.state_dir(CLONE).exists());
    assert!(ping(&lab, "a", gw) && ping(&lab, "a", twin) && ping(&lab, "a", outside));

    // And the last one: the node is back to what it was.
    let (_, errors) = restarted.reconcile_all(&[]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(lab.gateway_namespaces().is_empty());
    assert!(!links(&lab).contains("hvg100") && !links(&lab).contains("hvu100"));
    let tables = lab.exec(&n0, &["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("hvx_"), "{tables}");
}
