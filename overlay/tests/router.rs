//! The distributed virtual router across two namespace "nodes": routing between two
//! overlay networks only when peered, egress NAT to the underlay world, and a VM
//! port published on its node (DNAT).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hvx_overlay::lab::{Lab, wait_until};
use hvx_overlay::*;

fn with_gateway(lab: &Lab, vm: &str, cidr: &str, gw: &str) {
    let ns = lab.vm(vm).ns.clone();
    lab.exec(&ns, &["ip", "addr", "add", cidr, "dev", "eth0"])
        .unwrap();
    lab.exec(&ns, &["ip", "route", "add", "default", "via", gw])
        .unwrap();
}

fn apply_both(lab: &Lab, nets: &[&Net]) {
    for net in nets {
        net.apply_all(lab);
    }
}

#[test]
#[ignore = "privileged: make test-integration"]
fn routing_nat_and_published_ports() {
    if !root_or_skip("routing_nat_and_published_ports") {
        return;
    }
    let mut lab = Lab::new(2, 1600).unwrap();
    lab.add_vm("a", 0, mac("00:50:56:00:07:01")).unwrap();
    lab.add_vm("x", 1, mac("00:50:56:00:07:02")).unwrap();
    with_gateway(&lab, "a", "10.77.0.11/24", "10.77.0.1");
    with_gateway(&lab, "x", "10.78.0.21/24", "10.78.0.1");

    let mut blue = Net::new();
    blue.only = Some(vec!["a".into()]);
    blue.ips.insert("a".into(), "10.77.0.11".parse().unwrap());
    blue.egress_nat = true;
    blue.exposed = vec![ExposedPort {
        vm: "a".into(),
        protocol: Protocol::Tcp,
        port: 7,
        node_port: 30007,
    }];
    let mut green = Net::new();
    green.vni = 101;
    green.only = Some(vec!["x".into()]);
    green.ips.insert("x".into(), "10.78.0.21".parse().unwrap());
    green.subnet.cidr = "10.78.0.0/24".parse().unwrap();
    green.subnet.gateway = "10.78.0.1".parse().unwrap();

    // Not peered: the router keeps the networks apart.
    apply_both(&lab, &[&blue, &green]);
    assert!(
        !ping(&lab, "a", "10.78.0.21".parse().unwrap()),
        "unpeered networks route"
    );

    blue.routed_peers = vec![RoutedPeer {
        vni: 101,
        subnets: vec![green.subnet.cidr],
    }];
    green.routed_peers = vec![RoutedPeer {
        vni: 100,
        subnets: vec![blue.subnet.cidr],
    }];
    apply_both(&lab, &[&blue, &green]);
    assert!(
        ping(&lab, "a", "10.78.0.21".parse().unwrap()),
        "a (blue, node 1) -> x (green, node 2)"
    );
    assert!(ping(&lab, "x", "10.77.0.11".parse().unwrap()), "x -> a");

    // Egress: blue is masqueraded out of its node; green has no NAT and stays inside.
    assert!(
        ping(&lab, "a", "192.168.77.2".parse().unwrap()),
        "blue egress NAT"
    );
    assert!(
        !ping(&lab, "x", "192.168.77.1".parse().unwrap()),
        "green has no egress"
    );

    // a's echo service published as node 1 port 30007, reached from node 2.
    let a_ns = lab.vm("a").ns.clone();
    let mut server = lab
        .spawn(&a_ns, &["socat", "TCP-LISTEN:7,fork,reuseaddr", "EXEC:cat"])
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        lab.exec(&a_ns, &["ss", "-ltn"])
            .is_ok_and(|o| o.contains(":7 "))
    }));
    let n2 = lab.nodes[1].ns.clone();
    let cmd = "echo hvx-published | socat -T 3 - TCP:192.168.77.1:30007,connect-timeout=3";
    let out = lab.exec(&n2, &["sh", "-c", cmd]).unwrap_or_default();
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.contains("hvx-published"), "published port: {out:?}");
}
