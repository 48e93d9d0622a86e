//! Across three namespace "nodes": a UDP multicast stream from a guest on one node
//! reaches joined guests on the two others, a broadcast storm from one guest port is
//! capped by the per-port limit while unicast and ping keep passing, and a moved
//! (live-migrated) guest's gratuitous ARP reaches every other member once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use hvx_overlay::lab::Lab;
use std::io::{BufRead, BufReader};

const GROUP: &str = "239.1.2.3";

fn mcast_py() -> String {
    format!("{}/tests/mcast.py", env!("CARGO_MANIFEST_DIR"))
}

/// a on node 0, b on node 1, c on node 2, d on node 0.
fn three_nodes(limit_pps: u32) -> (Lab, Net) {
    let mut lab = Lab::new(3, 1600).unwrap();
    let mut net = Net::new();
    net.broadcast_limit_pps = limit_pps;
    for (i, (name, node)) in [("a", 0), ("b", 1), ("c", 2), ("d", 0)]
        .into_iter()
        .enumerate()
    {
        lab.add_vm(name, node, mac(&format!("00:50:56:00:07:0{}", i + 1)))
            .unwrap();
        let ip = format!("10.77.0.{}", 11 + i).parse().unwrap();
        net.ips.insert(name.into(), ip);
        set_ip(&lab, name, ip);
    }
    net.apply_all(&lab);
    (lab, net)
}

#[test]
#[ignore = "privileged: make test-integration"]
fn a_udp_multicast_stream_reaches_receivers_on_two_other_nodes() {
    if !root_or_skip("multicast stream") {
        return;
    }
    let (lab, net) = three_nodes(0);
    let script = mcast_py();
    let mut receivers = Vec::new();
    for name in ["b", "c"] {
        let ns = lab.vm(name).ns.clone();
        let ip = net.ips[name].to_string();
        let mut child = lab
            .spawn_piped(&ns, &["python3", &script, "recv", GROUP, "5007", &ip, "6"])
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "ready", "receiver in {name}");
        receivers.push((name, child, out));
    }
    let a_ns = lab.vm("a").ns.clone();
    let a_ip = net.ips["a"].to_string();
    lab.exec(
        &a_ns,
        &["python3", &script, "send", GROUP, "5007", &a_ip, "100"],
    )
    .unwrap();
    for (name, mut child, mut out) in receivers {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        child.wait().unwrap();
        // Every datagram, each once (duplicates would collapse in the set, so the
        // count is the stream's completeness).
        assert_eq!(line.trim(), "received 100", "at {name}");
    }
}

#[test]
#[ignore = "privileged: make test-integration"]
fn a_broadcast_storm_is_capped_per_port_while_unicast_and_ping_pass() {
    if !root_or_skip("broadcast storm") {
        return;
    }
    let (lab, net) = three_nodes(100);
    let a_ns = lab.vm("a").ns.clone();
    let script = l2frame();
    let storm = capture(&lab, &["b", "d"], "hvx-storm", || {
        let out = lab
            .exec(
                &a_ns,
                &[
                    "python3",
                    &script,
                    "flood",
                    "eth0",
                    "ff:ff:ff:ff:ff:ff",
                    "88b5",
                    "hvx-storm",
                    "3000",
                ],
            )
            .unwrap();
        eprintln!("storm: {}", out.trim());
    });
    // 3000 frames in well under a second; the limit lets the burst (100) and
    // 100 per second through. Generous bound for a slow sender.
    for vm in ["b", "d"] {
        let n = storm[vm].len();
        assert!((50..=400).contains(&n), "{vm} saw {n} of 3000 broadcasts");
    }
    // Unicast is not limited: far more than the broadcast cap arrives (some frames
    // of a back-to-back burst are lost in the veth and socket queues either way).
    let b_mac = lab.vm("b").mac.to_string();
    let uni = capture(&lab, &["b"], "hvx-uni", || {
        lab.exec(
            &a_ns,
            &[
                "python3", &script, "flood", "eth0", &b_mac, "88b5", "hvx-uni", "1000",
            ],
        )
        .unwrap();
    });
    assert!(uni["b"].len() >= 600, "unicast capped: {}", uni["b"].len());
    // Another guest's broadcasts have their own bucket, and ARP + ping pass.
    let c_ns = lab.vm("c").ns.clone();
    lab.exec(&c_ns, &["ip", "neigh", "flush", "dev", "eth0"])
        .unwrap();
    assert!(ping(&lab, "c", net.ips["a"]), "ping after the storm");
}

#[test]
#[ignore = "privileged: make test-integration"]
fn a_moved_guest_announces_itself_with_a_gratuitous_arp_every_member_sees_once() {
    if !root_or_skip("gratuitous ARP after a move") {
        return;
    }
    let (mut lab, net) = three_nodes(100);
    // Live migration of b from node 1 to node 2: the port moves, the control plane
    // re-applies everywhere, then the guest (QEMU's announce) sends a GARP.
    lab.move_vm("b", 2).unwrap();
    net.apply_all(&lab);
    let b_ip = net.ips["b"].to_string();
    let b_ns = lab.vm("b").ns.clone();
    let script = l2frame();
    let seen = capture(&lab, &["a", "c", "d"], "hvx-garp", || {
        lab.exec(
            &b_ns,
            &["python3", &script, "arp", "eth0", &b_ip, &b_ip, "hvx-garp"],
        )
        .unwrap();
    });
    for vm in ["a", "c", "d"] {
        assert_eq!(seen[vm].len(), 1, "GARP at {vm}: {seen:?}");
        assert!(seen[vm][0].contains("type=0806"), "{seen:?}");
    }
    // And traffic follows the move, from the old node's side and the new one's.
    assert!(
        ping(&lab, "a", net.ips["b"]),
        "a cannot reach b after the move"
    );
    assert!(
        ping(&lab, "c", net.ips["b"]),
        "c cannot reach b after the move"
    );
}
