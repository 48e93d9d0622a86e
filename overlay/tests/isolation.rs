//! Tenant isolation with real namespaces and real nftables: a guest reaches only
//! DHCP, DNS and ping on its node; spoofed frames reach nobody; VXLAN is accepted
//! only from peer VTEPs; egress NAT never reaches metadata or cluster ranges.
//! Each check is paired with a legitimate one over the same path, so a pass means
//! the filter (not a broken path) stopped the traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hvx_overlay::DhcpRange;
use hvx_overlay::lab::{Lab, wait_until};

/// Sends `hvx-echo` over TCP from namespace `ns`; true when it comes back.
fn tcp_echo_from(lab: &Lab, ns: &str, addr: &str) -> bool {
    let cmd = format!("echo hvx-echo | socat -T 3 - TCP:{addr},connect-timeout=3");
    lab.exec(ns, &["sh", "-c", &cmd])
        .map(|o| o.contains("hvx-echo"))
        .unwrap_or(false)
}

fn tcp_echo(lab: &Lab, vm: &str, addr: &str) -> bool {
    let ns = lab.vm(vm).ns.clone();
    tcp_echo_from(lab, &ns, addr)
}

/// An echo server on `port` (every address) in namespace `ns`, up when this returns.
fn echo_server(lab: &Lab, ns: &str, listen: &str, port: u16) -> std::process::Child {
    let child = lab
        .spawn(
            ns,
            &[
                "socat",
                &format!("{listen}:{port},fork,reuseaddr"),
                "EXEC:cat",
            ],
        )
        .unwrap();
    let needle = format!(":{port} ");
    assert!(
        wait_until(Duration::from_secs(10), || {
            lab.exec(ns, &["ss", "-ltn"])
                .is_ok_and(|o| o.contains(&needle))
        }),
        "echo server on {port} in {ns} did not start"
    );
    child
}

fn stop(children: Vec<std::process::Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn with_default_route(lab: &Lab, vm: &str, ip: &str) {
    set_ip(lab, vm, ip.parse().unwrap());
    let ns = lab.vm(vm).ns.clone();
    lab.exec(&ns, &["ip", "route", "add", "default", "via", "10.77.0.1"])
        .unwrap();
}

/// Runs busybox udhcpc once; returns what it printed.
fn dhcp(lab: &Lab, vm: &str) -> String {
    let ns = lab.vm(vm).ns.clone();
    lab.exec(
        &ns,
        &[
            "sh",
            "-c",
            "busybox udhcpc -i eth0 -n -q -f -t 10 -T 2 -s /bin/true 2>&1",
        ],
    )
    .unwrap_or_else(|e| e.to_string())
}

#[test]
#[ignore = "privileged: make test-integration"]
fn guests_reach_only_dhcp_dns_and_ping_on_the_node() {
    if !root_or_skip("guests_reach_only_dhcp_dns_and_ping_on_the_node") {
        return;
    }
    let mut lab = Lab::new(1, 1600).unwrap();
    lab.add_vm("a", 0, mac("00:50:56:00:0a:01")).unwrap();
    lab.add_vm("e", 0, mac("00:50:56:00:0a:02")).unwrap();
    let mut net = Net::new();
    net.ips.insert("a".into(), "10.77.0.11".parse().unwrap());
    net.ips.insert("e".into(), "10.77.0.50".parse().unwrap());
    with_default_route(&lab, "a", "10.77.0.11");
    net.apply_all(&lab);

    // Stand-ins for the agent's gRPC port and kubelet, on every node address.
    let node_ns = lab.nodes[0].ns.clone();
    let servers = vec![
        echo_server(&lab, &node_ns, "TCP-LISTEN", 9443),
        echo_server(&lab, &node_ns, "TCP-LISTEN", 10250),
        echo_server(&lab, &node_ns, "TCP6-LISTEN", 9445),
    ];
    assert!(
        tcp_echo_from(&lab, &node_ns, "127.0.0.1:9443"),
        "the listener itself works"
    );
    for addr in ["10.77.0.1:9443", "10.77.0.1:10250", "192.168.77.1:9443"] {
        assert!(
            !tcp_echo(&lab, "a", addr),
            "guest reached node listener {addr}"
        );
    }
    // The bridge's IPv6 link-local address, when the kernel gave it one.
    let mut link_local = None;
    wait_until(Duration::from_secs(5), || {
        let out = lab
            .exec(
                &node_ns,
                &["ip", "-6", "-o", "addr", "show", "dev", "hvb100"],
            )
            .unwrap_or_default();
        link_local = out
            .split_whitespace()
            .find(|w| w.starts_with("fe80::"))
            .and_then(|w| w.split('/').next())
            .map(str::to_string);
        link_local.is_some() && !out.contains("tentative")
    });
    if let Some(ll) = &link_local {
        assert!(
            !tcp_echo(&lab, "a", &format!("[{ll}%eth0]:9445")),
            "guest reached a node listener over IPv6 link-local {ll}"
        );
    }

    // What guests are meant to use still works.
    assert!(
        ping(&lab, "a", "10.77.0.1".parse().unwrap()),
        "ping gateway"
    );
    let a_ns = lab.vm("a").ns.clone();
    let out = lab
        .exec(
            &a_ns,
            &[
                "sh",
                "-c",
                "busybox nslookup e.app.internal 10.77.0.1 2>&1; true",
            ],
        )
        .unwrap();
    assert!(out.contains("10.77.0.50"), "DNS over UDP: {out}");
    let tcp53 = lab.exec(
        &a_ns,
        &[
            "socat",
            "-T",
            "1",
            "/dev/null",
            "TCP:10.77.0.1:53,connect-timeout=3",
        ],
    );
    assert!(tcp53.is_ok(), "DNS over TCP: {tcp53:?}");
    let out = dhcp(&lab, "e");
    assert!(
        out.contains("lease of 10.77.0.50 obtained from 10.77.0.1"),
        "DHCP: {out}"
    );
    stop(servers);
}

#[test]
#[ignore = "privileged: make test-integration"]
fn spoofed_frames_reach_nobody() {
    if !root_or_skip("spoofed_frames_reach_nobody") {
        return;
    }
    let mut lab = Lab::new(2, 1600).unwrap();
    let mut net = Net::new();
    for (i, (name, node)) in [("a", 0), ("b", 0), ("c", 1)].into_iter().enumerate() {
        lab.add_vm(name, node, mac(&format!("00:50:56:00:0b:0{}", i + 1)))
            .unwrap();
        let ip = format!("10.77.0.{}", 11 + i).parse().unwrap();
        net.ips.insert(name.into(), ip);
        set_ip(&lab, name, ip);
    }
    // `d` has no known address: it leases one from node 1's dynamic range.
    lab.add_vm("d", 0, mac("00:50:56:00:0b:04")).unwrap();
    net.subnet.dhcp = Some(DhcpRange {
        start: "10.77.0.100".parse().unwrap(),
        end: "10.77.0.150".parse().unwrap(),
        lease_secs: 600,
    });
    net.apply_all(&lab);
    assert!(ping(&lab, "a", net.ips["b"]) && ping(&lab, "a", net.ips["c"]));
    let script = l2frame();
    let a_ns = lab.vm("a").ns.clone();
    let b_mac = lab.vm("b").mac.to_string();

    // Ethernet source: another port's MAC reaches nobody, the own MAC everybody.
    let spoofed = capture(&lab, &["b", "c"], "hvx-macspoof", || {
        let src = format!("HVX_SRC_MAC={b_mac}");
        let argv = [
            "env",
            &src,
            "python3",
            &script,
            "send",
            "eth0",
            "ff:ff:ff:ff:ff:ff",
            "88b5",
            "hvx-macspoof",
        ];
        lab.exec(&a_ns, &argv).unwrap();
    });
    let honest = capture(&lab, &["b", "c"], "hvx-macown", || {
        send_frame(&lab, "a", "ff:ff:ff:ff:ff:ff", "88b5", "hvx-macown", None)
    });
    for vm in ["b", "c"] {
        assert!(
            spoofed[vm].is_empty(),
            "MAC spoof reached {vm}: {spoofed:?}"
        );
        assert_eq!(honest[vm].len(), 1, "honest frame at {vm}: {honest:?}");
    }

    // IPv4 source: a uses b's address toward c (c's MAC pre-seeded, so no ARP is
    // needed); the pattern marks the packets.
    let c_mac = lab.vm("c").mac.to_string();
    lab.exec(
        &a_ns,
        &[
            "ip",
            "neigh",
            "replace",
            "10.77.0.13",
            "lladdr",
            &c_mac,
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    lab.exec(
        &a_ns,
        &["ip", "addr", "add", "10.77.0.12/32", "dev", "eth0"],
    )
    .unwrap();
    let marker = "hvx-ipspoof";
    let pattern: String = marker.bytes().map(|b| format!("{b:02x}")).collect();
    let ping_from = |src: &str| {
        let _ = lab.exec(
            &a_ns,
            &[
                "ping",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                src,
                "-p",
                &pattern,
                "10.77.0.13",
            ],
        );
    };
    let spoofed = capture(&lab, &["c"], marker, || ping_from("10.77.0.12"));
    let honest = capture(&lab, &["c"], marker, || ping_from("10.77.0.11"));
    assert!(spoofed["c"].is_empty(), "IP spoof reached c: {spoofed:?}");
    assert!(!honest["c"].is_empty(), "honest ping at c: {honest:?}");
    lab.exec(
        &a_ns,
        &["ip", "addr", "del", "10.77.0.12/32", "dev", "eth0"],
    )
    .unwrap();

    // ARP: a claims the gateway's address (a man-in-the-middle of its neighbours);
    // its own address is fine.
    let arp = |claim: &str, marker: &str| {
        lab.exec(
            &a_ns,
            &["python3", &script, "arp", "eth0", claim, claim, marker],
        )
        .unwrap();
    };
    let spoofed = capture(&lab, &["b"], "hvx-arpgw", || arp("10.77.0.1", "hvx-arpgw"));
    let honest = capture(&lab, &["b"], "hvx-arpown", || {
        arp("10.77.0.11", "hvx-arpown")
    });
    assert!(spoofed["b"].is_empty(), "ARP spoof reached b: {spoofed:?}");
    assert_eq!(honest["b"].len(), 1, "honest ARP at b: {honest:?}");
    assert!(ping(&lab, "b", net.ips["a"]), "traffic still flows");

    // The dynamic guest: its lease works, but it can impersonate neither the
    // gateway nor a VM with a known address.
    let out = dhcp(&lab, "d");
    let leased = out
        .split("lease of ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no DHCP lease for d: {out}"))
        .to_string();
    let d_ns = lab.vm("d").ns.clone();
    lab.exec(
        &d_ns,
        &["ip", "addr", "add", &format!("{leased}/24"), "dev", "eth0"],
    )
    .unwrap();
    assert!(
        ping(&lab, "d", net.ips["c"]),
        "d reaches c from its lease {leased}"
    );
    let d_arp = |claim: &str, marker: &str| {
        lab.exec(
            &d_ns,
            &["python3", &script, "arp", "eth0", claim, claim, marker],
        )
        .unwrap();
    };
    for claim in ["10.77.0.1", "10.77.0.11"] {
        let spoofed = capture(&lab, &["b"], "hvx-darp", || d_arp(claim, "hvx-darp"));
        assert!(
            spoofed["b"].is_empty(),
            "d claiming {claim} reached b: {spoofed:?}"
        );
    }
    let honest = capture(&lab, &["b"], "hvx-darpown", || {
        d_arp(&leased, "hvx-darpown")
    });
    assert_eq!(honest["b"].len(), 1, "d announcing its lease: {honest:?}");
}

#[test]
#[ignore = "privileged: make test-integration"]
fn vxlan_only_from_peer_vteps() {
    if !root_or_skip("vxlan_only_from_peer_vteps") {
        return;
    }
    let mut lab = Lab::new(2, 1600).unwrap();
    lab.add_vm("a", 0, mac("00:50:56:00:0c:01")).unwrap();
    lab.add_vm("c", 1, mac("00:50:56:00:0c:02")).unwrap();
    let net = Net::new();
    net.apply_all(&lab);

    // A host on the underlay that is no node of this network, speaking VXLAN with
    // the network's VNI straight at node 1.
    let rogue = lab.add_namespace("rogue").unwrap();
    let ul = lab.underlay_ns.clone();
    for argv in [
        vec![
            "ip", "link", "add", "ur", "type", "veth", "peer", "name", "ul0", "netns", &rogue,
        ],
        vec!["ip", "link", "set", "ur", "master", "ul", "up"],
    ] {
        lab.exec(&ul, &argv).unwrap();
    }
    for argv in [
        vec!["ip", "addr", "add", "192.168.77.9/24", "dev", "ul0"],
        vec!["ip", "link", "set", "ul0", "up"],
        vec![
            "ip",
            "link",
            "add",
            "vx",
            "type",
            "vxlan",
            "id",
            "100",
            "local",
            "192.168.77.9",
            "remote",
            "192.168.77.1",
            "dstport",
            "4789",
            "nolearning",
        ],
        vec!["ip", "link", "set", "vx", "up"],
    ] {
        lab.exec(&rogue, &argv).unwrap();
    }
    let script = l2frame();
    let injected = capture(&lab, &["a"], "hvx-rogue", || {
        lab.exec(
            &rogue,
            &[
                "python3",
                &script,
                "send",
                "vx",
                "ff:ff:ff:ff:ff:ff",
                "88b5",
                "hvx-rogue",
            ],
        )
        .unwrap();
    });
    let from_peer = capture(&lab, &["a"], "hvx-peer", || {
        send_frame(&lab, "c", "ff:ff:ff:ff:ff:ff", "88b5", "hvx-peer", None)
    });
    assert!(
        injected["a"].is_empty(),
        "VXLAN from a non-peer reached a: {injected:?}"
    );
    assert_eq!(from_peer["a"].len(), 1, "peer traffic: {from_peer:?}");
}

#[test]
#[ignore = "privileged: make test-integration"]
fn egress_nat_never_reaches_metadata_or_cluster_ranges() {
    if !root_or_skip("egress_nat_never_reaches_metadata_or_cluster_ranges") {
        return;
    }
    let mut lab = Lab::new(1, 1600).unwrap();
    lab.add_vm("a", 0, mac("00:50:56:00:0d:01")).unwrap();
    let mut net = Net::new();
    net.ips.insert("a".into(), "10.77.0.11".parse().unwrap());
    net.egress_nat = true;
    // The "pod CIDR" is denied, one address in it explicitly allowed.
    net.egress_denied = vec!["10.244.0.0/16".parse().unwrap()];
    net.egress_allowed = vec!["10.244.1.6/32".parse().unwrap()];
    with_default_route(&lab, "a", "10.77.0.11");
    net.apply_all(&lab);

    // The world beyond the node: one namespace on the underlay holding a "metadata
    // service" and two "pods"; the node routes to them through it.
    let world = lab.add_namespace("world").unwrap();
    let ul = lab.underlay_ns.clone();
    lab.exec(
        &ul,
        &[
            "ip", "link", "add", "uw", "type", "veth", "peer", "name", "eth0", "netns", &world,
        ],
    )
    .unwrap();
    lab.exec(&ul, &["ip", "link", "set", "uw", "master", "ul", "up"])
        .unwrap();
    for addr in [
        "192.168.77.50/24",
        "169.254.169.254/32",
        "10.244.1.5/32",
        "10.244.1.6/32",
    ] {
        lab.exec(&world, &["ip", "addr", "add", addr, "dev", "eth0"])
            .unwrap();
    }
    lab.exec(&world, &["ip", "link", "set", "eth0", "up"])
        .unwrap();
    lab.exec(&world, &["ip", "link", "set", "lo", "up"])
        .unwrap();
    let node_ns = lab.nodes[0].ns.clone();
    for dst in ["169.254.169.254/32", "10.244.1.0/24"] {
        lab.exec(
            &node_ns,
            &["ip", "route", "add", dst, "via", "192.168.77.50"],
        )
        .unwrap();
    }
    let servers = vec![echo_server(&lab, &world, "TCP-LISTEN", 80)];
    assert!(
        tcp_echo_from(&lab, &node_ns, "169.254.169.254:80"),
        "the node itself reaches the metadata stand-in"
    );

    assert!(
        tcp_echo(&lab, "a", "10.244.1.6:80"),
        "an allowed address is reached through egress NAT"
    );
    assert!(
        !tcp_echo(&lab, "a", "169.254.169.254:80"),
        "guest reached the metadata address"
    );
    assert!(
        !tcp_echo(&lab, "a", "10.244.1.5:80"),
        "guest reached the pod CIDR"
    );
    stop(servers);
}
