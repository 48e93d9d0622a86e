//! Pod NIC plumbing (tap in the VM's pod, bridged to a veth whose peer is the switch
//! port): frames written by the "guest" into the tap reach a VM on another node
//! and the answer comes back into the tap; detach removes every link.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};

use common::*;
use hvx_overlay::lab::{Lab, LabVm};
use hvx_overlay::port::{PodNic, attach_pod_nic, detach_pod_nic};

#[test]
#[ignore = "privileged: make test-integration"]
fn pod_tap_reaches_other_nodes() {
    if !root_or_skip("pod_tap_reaches_other_nodes") {
        return;
    }
    let mut lab = Lab::new(2, 1600).unwrap();
    let net = Net::new();
    lab.add_vm("remote", 1, mac("00:50:56:00:08:02")).unwrap();
    let pod_ns = lab.add_namespace("pod").unwrap();
    let nic = PodNic::new("default/vm-a", 0, 1500);
    let node = lab.nodes[0].switch.host.clone();
    attach_pod_nic(&node, &pod_ns, &nic).unwrap();
    attach_pod_nic(&node, &pod_ns, &nic).unwrap();
    let guest_mac = mac("00:50:56:00:08:01");
    lab.vms.push(LabVm {
        name: "guest".into(),
        ns: pod_ns.clone(),
        mac: guest_mac,
        port: nic.host_if.clone(),
        node: 0,
    });
    let reports = net.apply_all(&lab);
    assert!(reports[0].missing_ports.is_empty(), "{reports:?}");

    // The "guest" behind the tap broadcasts; the remote VM hears it and answers
    // by unicast to the guest's MAC, which must come back out of the tap.
    let script = l2frame();
    let mut guest = lab
        .spawn_piped(
            &pod_ns,
            &[
                "python3",
                &script,
                "tap",
                &nic.tap,
                &guest_mac.to_string(),
                "ff:ff:ff:ff:ff:ff",
                "hvx-from-tap",
                "hvx-to-tap",
                "8",
            ],
        )
        .unwrap();
    let mut out = BufReader::new(guest.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "ready");
    let mut trigger = guest.stdin.take().unwrap();
    let seen = capture(&lab, &["remote"], "hvx-from-tap", || {
        trigger.write_all(b"go\n").unwrap();
        trigger.flush().unwrap();
    });
    assert_eq!(seen["remote"].len(), 1, "broadcast from the tap: {seen:?}");
    send_frame(
        &lab,
        "remote",
        &guest_mac.to_string(),
        "88b5",
        "hvx-to-tap",
        None,
    );
    let lines: Vec<String> = out.lines().map_while(Result::ok).collect();
    guest.wait().unwrap();
    assert_eq!(
        lines,
        [format!("got dst={guest_mac}")],
        "unicast into the tap"
    );

    detach_pod_nic(&node, &pod_ns, &nic).unwrap();
    detach_pod_nic(&node, &pod_ns, &nic).unwrap();
    let node_links = lab.exec(&lab.nodes[0].ns, &["ip", "-o", "link"]).unwrap();
    let pod_links = lab.exec(&pod_ns, &["ip", "-o", "link"]).unwrap();
    assert!(!node_links.contains(&nic.host_if), "{node_links}");
    assert!(!pod_links.contains("hvk0"), "{pod_links}");
}
