//! Guest-tagged (802.1Q) frames across nodes: they pass with their tag, and a
//! network whose firewall denies by default also drops IP carried inside a tag
//! (otherwise tagging would be a way around every rule); tagged non-IP still passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use hvx_overlay::lab::Lab;
use hvx_overlay::{Action, FirewallSpec};

#[test]
#[ignore = "privileged: make test-integration"]
fn tagged_frames_cross_nodes_and_a_deny_default_covers_tagged_ip() {
    if !root_or_skip("tagged frames") {
        return;
    }
    let mut lab = Lab::new(2, 1600).unwrap();
    let mut net = Net::new();
    for (i, (name, node)) in [("a", 0), ("b", 1)].into_iter().enumerate() {
        lab.add_vm(name, node, mac(&format!("00:50:56:00:08:0{}", i + 1)))
            .unwrap();
        let ip = format!("10.77.0.{}", 11 + i).parse().unwrap();
        net.ips.insert(name.into(), ip);
        set_ip(&lab, name, ip);
    }
    net.apply_all(&lab);
    let b_mac = lab.vm("b").mac.to_string();
    let ips = (net.ips["a"], net.ips["b"]);
    let send = |marker: &str, ethertype: &str| {
        capture(&lab, &["b"], marker, || {
            if ethertype == "0800" {
                send_ipv4(&lab, "a", ips, &b_mac, marker, Some(42))
            } else {
                send_frame(&lab, "a", &b_mac, ethertype, marker, Some(42))
            }
        })
    };
    // Default allow: tagged IPv4 arrives, tag intact.
    let seen = send("hvx-t-ip-allow", "0800");
    assert_eq!(seen["b"].len(), 1, "{seen:?}");
    assert!(seen["b"][0].contains("vlan=42"), "{seen:?}");
    // Anti-spoofing reads the address inside the tag too.
    let spoofed = capture(&lab, &["b"], "hvx-t-spoof", || {
        send_ipv4(
            &lab,
            "a",
            ("10.77.0.99".parse().unwrap(), ips.1),
            &b_mac,
            "hvx-t-spoof",
            Some(42),
        )
    });
    assert!(
        spoofed["b"].is_empty(),
        "tagged spoofed source passed: {spoofed:?}"
    );

    net.firewall = FirewallSpec {
        default_action: Action::Deny,
        rules: vec![],
    };
    net.apply_all(&lab);
    assert!(
        !ping(&lab, "a", net.ips["b"]),
        "untagged IP passes a deny default"
    );
    let seen = send("hvx-t-ip-deny", "0800");
    assert!(
        seen["b"].is_empty(),
        "tagged IPv4 passed a deny default: {seen:?}"
    );
    let seen = send("hvx-t-other", "88b5");
    assert_eq!(
        seen["b"].len(),
        1,
        "tagged non-IP is not the firewall's: {seen:?}"
    );
    assert!(seen["b"][0].contains("vlan=42"), "{seen:?}");
}
