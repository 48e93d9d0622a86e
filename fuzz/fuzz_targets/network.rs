//! The dnsmasq and nftables renderers over any network spec the validator accepts
//! (JSON, as the agent receives it): rendering never panics, and no name in the
//! spec can add a directive or an entry of its own to a generated file.
#![no_main]

use hvx_overlay::NetworkSpec;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use std::path::Path;

/// Every directive `dnsmasq::render` writes; anything else came from the input.
const DIRECTIVES: &[&str] = &[
    "interface",
    "bind-interfaces",
    "except-interface",
    "no-resolv",
    "no-hosts",
    "no-poll",
    "dhcp-authoritative",
    "pid-file",
    "dhcp-leasefile",
    "dhcp-hostsfile",
    "addn-hosts",
    "log-facility",
    "domain",
    "local",
    "expand-hosts",
    "server",
    "dhcp-range",
    "dhcp-option",
    "dhcp-option-force",
];

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<NetworkSpec>(data) else {
        return;
    };
    if spec.validate().is_err() {
        return;
    }
    let mtu = hvx_overlay::plan::plan_mtu(spec.underlay_mtu);
    let d = hvx_overlay::dnsmasq::render(&spec, "gw0", &mtu, Path::new("/run/hvx/1"));
    for line in d.main.lines().filter(|l| !l.starts_with('#')) {
        let key = line.split('=').next().unwrap_or_default();
        assert!(
            DIRECTIVES.contains(&key),
            "unexpected dnsmasq directive in {line:?}"
        );
    }
    let reservations = spec.members.iter().filter(|m| m.ip.is_some()).count()
        + spec
            .subnets
            .iter()
            .map(|s| s.reservations.len())
            .sum::<usize>();
    assert_eq!(
        d.dhcp_hosts.lines().count(),
        reservations,
        "dhcp-hosts: {:?}",
        d.dhcp_hosts
    );
    for line in d.dhcp_hosts.lines() {
        assert!(line.split(',').count() <= 3, "dhcp-hosts entry {line:?}");
    }
    for line in d.hosts.lines() {
        assert_eq!(line.split_whitespace().count(), 2, "hosts entry {line:?}");
    }

    let ports: BTreeSet<String> = BTreeSet::new();
    // With and without the transit pair (egress, upstream DNS, published ports).
    let transit = hvx_overlay::transit::TransitPair::of_slot(spec.vni);
    for t in [None, Some(&transit)] {
        let nft = hvx_overlay::nft::render(&spec, &ports, &mtu, t);
        for script in [&nft.script, &nft.ns_script] {
            let opens = script.matches('{').count();
            let closes = script.matches('}').count();
            assert_eq!(opens, closes, "unbalanced nft script:\n{script}");
            assert!(
                !script
                    .lines()
                    .any(|l| l.trim_start().starts_with("include"))
            );
        }
    }
});
