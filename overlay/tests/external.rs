//! External L2: a network joined to a segment outside the cluster. A namespace
//! plays the old datacenter, a host on the network's subnet that never moved; a
//! "VM" on another node reaches it through the overlay on its original address,
//! once through a node uplink (a veth into the datacenter) and once through a
//! VXLAN tunnel to an external VTEP (a kernel VXLAN device in the datacenter
//! namespace, with its own VNI and UDP port). With hvx's gateway and DHCP off, the
//! datacenter's router and DHCP server serve the VMs on other nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use hvx_overlay::lab::Lab;
use hvx_overlay::{ExternalL2, OverlayError};
use std::net::Ipv4Addr;

const DC_HOST: &str = "10.77.0.200";

/// The VM on node 1 (B) with a static address; the external segment is carried
/// by node 0 (A), which hosts no VM.
fn lab_with_vm_on_b() -> (Lab, Net) {
    let mut lab = Lab::new(2, 1600).unwrap();
    let mut net = Net::new();
    lab.add_vm("b", 1, mac("00:50:56:00:05:02")).unwrap();
    let ip: Ipv4Addr = "10.77.0.12".parse().unwrap();
    net.ips.insert("b".into(), ip);
    set_ip(&lab, "b", ip);
    (lab, net)
}

fn ping_from(lab: &Lab, ns: &str, ip: &str) -> bool {
    lab.exec(ns, &["ping", "-c", "1", "-W", "2", ip]).is_ok()
}

#[test]
#[ignore = "privileged: make test-integration"]
fn a_datacenter_host_behind_a_node_uplink_and_a_vm_on_another_node_ping_each_other() {
    if !root_or_skip("external uplink") {
        return;
    }
    let (mut lab, mut net) = lab_with_vm_on_b();
    let dc = lab.add_namespace("dc").unwrap();
    let node_a = lab.nodes[0].ns.clone();
    // Node A's uplink `dcup` is a veth whose far end is the datacenter host's NIC.
    lab.exec(
        &node_a,
        &[
            "ip", "link", "add", "dcup", "type", "veth", "peer", "name", "eth0", "netns", &dc,
        ],
    )
    .unwrap();
    lab.exec(
        &dc,
        &["ip", "addr", "add", &format!("{DC_HOST}/24"), "dev", "eth0"],
    )
    .unwrap();
    lab.exec(&dc, &["ip", "link", "set", "eth0", "up"]).unwrap();

    // A node without the interface refuses with the reason (what reaches the
    // VirtualNetwork's status through the agent).
    net.external = Some((
        1,
        ExternalL2::Uplink {
            interface: "dcup".into(),
            vlan: None,
        },
    ));
    let err = lab.nodes[1]
        .switch
        .apply(&net.spec_for(&lab, 1))
        .expect_err("node B has no interface dcup");
    assert!(
        matches!(&err, OverlayError::External { reason, .. } if reason.contains("\"dcup\" does not exist")),
        "{err}"
    );

    net.external = Some((
        0,
        ExternalL2::Uplink {
            interface: "dcup".into(),
            vlan: None,
        },
    ));
    net.apply_all(&lab);
    let again = net.apply_all(&lab);
    assert!(
        again.iter().all(|r| r.changes.is_empty()),
        "apply is not idempotent: {again:?}"
    );
    let b_ns = lab.vm("b").ns.clone();
    assert!(
        ping_from(&lab, &b_ns, DC_HOST),
        "VM on B cannot reach the datacenter host"
    );
    assert!(
        ping_from(&lab, &dc, "10.77.0.12"),
        "the datacenter host cannot reach the VM"
    );
    // The hvx gateway stays local: the datacenter does not see it answer ARP.
    assert!(
        !ping_from(&lab, &dc, "10.77.0.1"),
        "the distributed gateway answered on the uplink"
    );

    // The old datacenter keeps its router and DHCP server: hvx's gateway and DHCP
    // off, the datacenter host takes the router address, and a VM on B without an
    // address gets a lease from the datacenter's server across the overlay.
    lab.add_vm("c", 1, mac("00:50:56:00:05:03")).unwrap();
    net.gateway = false;
    net.subnet.dhcp = None;
    net.apply_all(&lab);
    let conf = lab.state_root.join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.77.0.150\nend 10.77.0.160\ninterface eth0\nlease_file {}\noption router 10.77.0.1\noption subnet 255.255.255.0\n",
            lab.state_root.join("udhcpd.leases").display()
        ),
    )
    .unwrap();
    lab.exec(&dc, &["ip", "addr", "add", "10.77.0.1/24", "dev", "eth0"])
        .unwrap();
    let mut server = lab
        .spawn(
            &dc,
            &["busybox", "udhcpd", "-f", &conf.display().to_string()],
        )
        .unwrap();
    assert!(
        ping_from(&lab, &b_ns, "10.77.0.1"),
        "VM on B cannot reach the outside router"
    );
    let body =
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"hvx-lease ip=$ip router=$router\"\nexit 0\n";
    let got = udhcpc(&lab, "c", "udhcpc-ext.sh", body);
    assert!(
        got.contains("hvx-lease ip=10.77.0.15") && got.contains("router=10.77.0.1"),
        "no lease from the datacenter's DHCP server: {got}"
    );
    server.kill().unwrap();
    server.wait().unwrap();

    // The uplink is the node's: teardown releases it, never deletes it.
    lab.nodes[0].switch.teardown(net.vni).unwrap();
    let link = lab
        .exec(&node_a, &["ip", "-o", "link", "show", "dcup"])
        .unwrap();
    assert!(!link.contains("master"), "{link}");
}

#[test]
#[ignore = "privileged: make test-integration"]
fn a_datacenter_host_behind_an_external_vtep_and_a_vm_on_another_node_ping_each_other() {
    if !root_or_skip("external vtep") {
        return;
    }
    let (mut lab, mut net) = lab_with_vm_on_b();
    let dc = lab.add_namespace("vtep").unwrap();
    let ul = lab.underlay_ns.clone();
    // The external VTEP sits on the underlay like a node, outside the cluster.
    lab.exec(
        &dc,
        &[
            "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "uvt", "netns", &ul,
        ],
    )
    .unwrap();
    lab.exec(&ul, &["ip", "link", "set", "uvt", "master", "ul", "up"])
        .unwrap();
    for cmd in [
        "ip addr add 192.168.77.50/24 dev ul0",
        "ip link set ul0 up",
        // VNI 5000 on UDP 4790: nothing like the cluster's own tunnel.
        "ip link add vx0 type vxlan id 5000 local 192.168.77.50 remote 192.168.77.1 dstport 4790 nolearning",
        "ip addr add 10.77.0.200/24 dev vx0",
        "ip link set vx0 up",
    ] {
        let argv: Vec<&str> = cmd.split(' ').collect();
        lab.exec(&dc, &argv).unwrap();
    }
    net.external = Some((
        0,
        ExternalL2::Vtep {
            address: "192.168.77.50".parse().unwrap(),
            port: 4790,
            vni: 5000,
        },
    ));
    net.apply_all(&lab);
    let again = net.apply_all(&lab);
    assert!(
        again.iter().all(|r| r.changes.is_empty()),
        "apply is not idempotent: {again:?}"
    );
    let b_ns = lab.vm("b").ns.clone();
    assert!(
        ping_from(&lab, &b_ns, DC_HOST),
        "VM on B cannot reach the datacenter host"
    );
    assert!(
        ping_from(&lab, &dc, "10.77.0.12"),
        "the datacenter host cannot reach the VM"
    );

    // Another host of the underlay cannot inject into the external VNI: node B
    // sends VXLAN with VNI 5000 to node A and the frame is dropped at A's input.
    let node_a = lab.nodes[0].ns.clone();
    let counters = || {
        lab.exec(
            &node_a,
            &["nft", "list", "table", "ip", &format!("hvx_rt_{}", net.vni)],
        )
        .unwrap()
    };
    let rules = counters();
    assert!(
        rules.contains("4790") && rules.contains("0x1388") && rules.contains("192.168.77.50"),
        "{rules}"
    );

    // Switching the network back to a plain overlay removes the external device.
    net.external = None;
    net.apply_all(&lab);
    let links = lab.exec(&node_a, &["ip", "-o", "link", "show"]).unwrap();
    assert!(!links.contains(&format!("hve{}", net.vni)), "{links}");
}
