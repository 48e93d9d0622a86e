//! Reduced-MTU mode: on a 1500-byte underlay the overlay runs at 1450, DHCP
//! announces it (option 26), and guests that keep 1500 still get full TCP
//! throughput because SYNs are MSS-clamped on the switch (without the clamp, TCP
//! stalls on dropped full-size segments).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hvx_overlay::lab::{Lab, wait_until};
use hvx_overlay::*;

#[test]
#[ignore = "privileged: make test-integration"]
fn small_underlay_pushes_mtu_and_clamps_mss() {
    if !root_or_skip("small_underlay_pushes_mtu_and_clamps_mss") {
        return;
    }
    let mut lab = Lab::new(2, 1500).unwrap();
    let mut net = Net::new();
    net.subnet.dhcp = Some(DhcpRange {
        start: "10.77.0.100".parse().unwrap(),
        end: "10.77.0.110".parse().unwrap(),
        lease_secs: 600,
    });
    for (i, (name, node)) in [("a", 0), ("b", 1), ("d", 1)].into_iter().enumerate() {
        lab.add_vm(name, node, mac(&format!("00:50:56:00:06:0{}", i + 1)))
            .unwrap();
    }
    for (name, ip) in [("a", "10.77.0.11"), ("b", "10.77.0.12")] {
        net.ips.insert(name.into(), ip.parse().unwrap());
        set_ip(&lab, name, ip.parse().unwrap());
    }
    net.apply_all(&lab);
    let bridge = lab
        .exec(&lab.nodes[0].ns, &["ip", "link", "show", "hvb100"])
        .unwrap();
    assert!(bridge.contains("mtu 1450"), "{bridge}");

    // DHCP option 26 reaches the guest (udhcpc exports it as $mtu to its script).
    let out = udhcpc(
        &lab,
        "d",
        "udhcpc-mtu.sh",
        "#!/bin/sh\necho \"hvx-mtu=$mtu\"\n",
    );
    assert!(
        out.contains("hvx-mtu=1450"),
        "DHCP did not announce MTU 1450: {out}"
    );

    // a and b keep MTU 1500 (they ignore option 26) and still move bulk TCP.
    let b_ns = lab.vm("b").ns.clone();
    let mut server = lab
        .spawn(&b_ns, &["iperf3", "-s", "-1", "-B", "10.77.0.12"])
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        lab.exec(&b_ns, &["ss", "-ltn"])
            .is_ok_and(|o| o.contains(":5201 "))
    }));
    let out = lab
        .exec(
            &lab.vm("a").ns,
            &["iperf3", "-J", "-t", "2", "-c", "10.77.0.12"],
        )
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mbps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e6;
    let mss = v["start"]["tcp_mss_default"].as_u64().unwrap_or(0);
    eprintln!("TCP over a 1500-byte underlay with guests at MTU 1500: {mbps:.0} Mbit/s, MSS {mss}");
    assert!(
        mss > 0 && mss <= 1410,
        "the SYN's MSS was not clamped: {mss}"
    );
    assert!(
        mbps > 100.0,
        "TCP stalls without working MSS clamping: {mbps} Mbit/s"
    );
}
