//! Real L2 across three namespace "nodes": ARP, broadcast, multicast, non-IP and
//! VLAN-tagged frames reach every member exactly once; known unicast does not flood.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use hvx_overlay::lab::Lab;

#[test]
#[ignore = "privileged: make test-integration"]
fn l2_semantics_across_three_nodes() {
    if !root_or_skip("l2_semantics_across_three_nodes") {
        return;
    }
    let mut lab = Lab::new(3, 1600).unwrap();
    let mut net = Net::new();
    for (i, (name, node)) in [("a", 0), ("b", 1), ("c", 2), ("d", 0)]
        .into_iter()
        .enumerate()
    {
        lab.add_vm(name, node, mac(&format!("00:50:56:00:01:0{}", i + 1)))
            .unwrap();
        let ip = format!("10.77.0.{}", 11 + i).parse().unwrap();
        net.ips.insert(name.into(), ip);
        set_ip(&lab, name, ip);
    }
    let first = net.apply_all(&lab);
    assert!(
        first
            .iter()
            .all(|r| !r.changes.is_empty() && r.missing_ports.is_empty()),
        "{first:?}"
    );
    let second = net.apply_all(&lab);
    assert!(
        second.iter().all(|r| r.changes.is_empty()),
        "apply is not idempotent: {second:?}"
    );

    // ARP across nodes (the guests resolve each other; nothing is pre-seeded in them).
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("a", "d")] {
        assert!(ping(&lab, from, net.ips[to]), "{from} cannot reach {to}");
    }

    // Full-size guest frames cross the tunnel unfragmented (underlay MTU 1600).
    let a_ns = lab.vm("a").ns.clone();
    let big = lab.exec(
        &a_ns,
        &[
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1472",
            "10.77.0.13",
        ],
    );
    assert!(big.is_ok(), "1500-byte packet across the overlay: {big:?}");

    let all_but_a = ["b", "c", "d"];
    // Broadcast with a non-IP ethertype: each member exactly once (no duplicates
    // from head-end replication).
    let seen = capture(&lab, &all_but_a, "hvx-bcast", || {
        send_frame(&lab, "a", "ff:ff:ff:ff:ff:ff", "88b5", "hvx-bcast", None)
    });
    for vm in all_but_a {
        assert_eq!(seen[vm].len(), 1, "broadcast at {vm}: {seen:?}");
    }

    let seen = capture(&lab, &["a", "b", "d"], "hvx-mcast", || {
        send_frame(&lab, "c", "01:00:5e:01:02:03", "88b5", "hvx-mcast", None)
    });
    for vm in ["a", "b", "d"] {
        assert_eq!(seen[vm].len(), 1, "multicast at {vm}: {seen:?}");
    }

    // A guest-tagged frame (VLAN 42) crosses the bridge and the tunnel with its tag.
    let seen = capture(&lab, &["c"], "hvx-vlan", || {
        send_frame(&lab, "a", "ff:ff:ff:ff:ff:ff", "88b5", "hvx-vlan", Some(42))
    });
    assert_eq!(seen["c"].len(), 1, "{seen:?}");
    assert!(
        seen["c"][0].contains("vlan=42") && seen["c"][0].contains("type=88b5"),
        "{seen:?}"
    );

    // Known unicast goes to its owner only; an unknown MAC floods (proves the
    // capture would have seen flooding).
    let b_mac = lab.vm("b").mac.to_string();
    let seen = capture(&lab, &["b", "c", "d"], "hvx-ucast", || {
        send_frame(&lab, "a", &b_mac, "88b5", "hvx-ucast", None)
    });
    assert_eq!(seen["b"].len(), 1, "{seen:?}");
    assert!(
        seen["c"].is_empty() && seen["d"].is_empty(),
        "known unicast flooded: {seen:?}"
    );
    let seen = capture(&lab, &["b", "c", "d"], "hvx-unknown", || {
        send_frame(&lab, "a", "00:50:56:99:99:99", "88b5", "hvx-unknown", None)
    });
    for vm in ["b", "c", "d"] {
        assert_eq!(seen[vm].len(), 1, "unknown unicast at {vm}: {seen:?}");
    }
}
