//! dnsmasq's log in the state directory (tmpfs in production) is capped: past
//! [`DNSMASQ_LOG_MAX_BYTES`] it moves to `dnsmasq.log.1`, and the running dnsmasq
//! keeps logging into the emptied file (it appends and never reopens it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;

use common::*;
use hvx_overlay::daemon::DNSMASQ_LOG_MAX_BYTES;
use hvx_overlay::dnsmasq::DnsmasqPaths;
use hvx_overlay::lab::Lab;

#[test]
#[ignore = "privileged: make test-integration"]
fn dnsmasq_log_is_rotated_and_dnsmasq_keeps_logging() {
    if !root_or_skip("dnsmasq_log_is_rotated_and_dnsmasq_keeps_logging") {
        return;
    }
    let mut lab = Lab::new(1, 1600).unwrap();
    lab.add_vm("e", 0, mac("00:50:56:00:0e:01")).unwrap();
    let mut net = Net::new();
    net.ips.insert("e".into(), "10.77.0.50".parse().unwrap());
    net.apply_all(&lab);
    let switch = &lab.nodes[0].switch;
    let paths = DnsmasqPaths::new(&switch.host.state_dir(VNI));

    // A log that grew past the cap (as weeks of DHCP traffic would).
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .unwrap();
    let line = b"old dnsmasq line\n";
    let lines = (DNSMASQ_LOG_MAX_BYTES as usize / line.len()) + 1;
    for _ in 0..lines {
        f.write_all(line).unwrap();
    }
    drop(f);
    switch.cap_logs();
    let rotated = hvx_child::rotated_log(&paths.log);
    assert!(std::fs::metadata(&rotated).unwrap().len() > DNSMASQ_LOG_MAX_BYTES);
    assert_eq!(std::fs::metadata(&paths.log).unwrap().len(), 0);

    // dnsmasq logs the next DHCP exchange into the emptied file.
    let ns = lab.vm("e").ns.clone();
    let out = lab
        .exec(
            &ns,
            &[
                "sh",
                "-c",
                "busybox udhcpc -i eth0 -n -q -f -t 10 -T 2 -s /bin/true 2>&1",
            ],
        )
        .unwrap_or_else(|e| e.to_string());
    assert!(out.contains("lease of 10.77.0.50"), "DHCP: {out}");
    let log = std::fs::read_to_string(&paths.log).unwrap();
    assert!(log.contains("DHCPACK"), "dnsmasq stopped logging: {log:?}");
    assert!(!log.contains("old dnsmasq line"), "{log:?}");
    assert!(
        !log.starts_with('\0'),
        "the writer kept its old offset (no O_APPEND)"
    );
}
