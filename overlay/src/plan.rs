//! Pure planning: [`NetworkSpec`] in, the complete desired kernel state of one node
//! out. No I/O here, so every decision is unit-tested.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::addr::{Ipv4Net, Mac};
use crate::dnsmasq::{self, DnsmasqConfig};
use crate::error::Result;
use crate::host::Host;
use crate::names;
use crate::nft;
use crate::spec::{ExternalL2, Location, NetworkSpec};
use crate::transit::{TRANSIT_SLOTS, TransitPair};

/// Frame size guests assume (VMware vSwitch default).
pub const GUEST_MTU: u32 = 1500;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// How the 50 bytes of VXLAN overhead are absorbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtuMode {
    /// Underlay carries >= 1550: guests keep 1500 untouched.
    Transparent,
    /// Underlay is smaller: the overlay MTU shrinks, DHCP option 26 tells guests, and
    /// TCP SYNs get their MSS clamped for guests that ignore option 26.
    Reduced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtuPlan {
    pub mode: MtuMode,
    /// MTU of the bridge, the VXLAN device and every attached port.
    pub link_mtu: u32,
    /// MSS written into TCP SYNs crossing the switch (Reduced mode only).
    pub mss_clamp: Option<u32>,
}

/// Picks the MTU strategy from the underlay MTU.
pub fn plan_mtu(underlay_mtu: u32) -> MtuPlan {
    if underlay_mtu >= GUEST_MTU + VXLAN_OVERHEAD {
        MtuPlan {
            mode: MtuMode::Transparent,
            link_mtu: GUEST_MTU,
            mss_clamp: None,
        }
    } else {
        let link_mtu = underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
        MtuPlan {
            mode: MtuMode::Reduced,
            link_mtu,
            mss_clamp: Some(link_mtu.saturating_sub(40)),
        }
    }
}

/// A unicast or flood entry of the VXLAN device's own FDB (`bridge fdb ... self`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VxlanFdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// A static entry of the bridge FDB (`bridge fdb ... master static`): which bridge
/// port a MAC lives behind. Static entries make known unicast never flood.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BridgeFdb {
    pub mac: Mac,
    pub port: String,
}

/// Everything one node must have for one network: L2 in the node namespace
/// (bridge, VXLAN, VM ports, the gateway veth), L3 in the network's own gateway
/// namespace (gateway addresses, dnsmasq, router, NAT), so networks with the same
/// subnet share a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    pub name: String,
    pub vni: u32,
    pub bridge: String,
    /// The bridge's own MAC (never the gateway's).
    pub bridge_mac: Mac,
    pub vxlan: String,
    /// Node side of the gateway veth (a bridge port).
    pub gateway_veth: String,
    /// The network's gateway namespace.
    pub netns: String,
    /// The transit pair, when anything leaves or enters the namespace other than
    /// through the bridge (egress NAT, upstream DNS, published ports).
    pub transit: Option<TransitPair>,
    /// Node side of the transit veth.
    pub transit_veth: String,
    pub gateway_mac: Mac,
    pub local_vtep: Ipv4Addr,
    pub mtu: MtuPlan,
    /// Gateway addresses on the namespace's gateway interface (`gw/prefix`).
    pub addresses: BTreeSet<Ipv4Net>,
    /// Routes in the namespace to peered networks: (peer VNI, its subnets).
    pub peer_routes: Vec<(u32, Vec<Ipv4Net>)>,
    /// Local VM ports to enslave to the bridge.
    pub ports: BTreeSet<String>,
    /// The segment outside the cluster, when this node carries it, and the bridge
    /// port leading there (the uplink, its VLAN sub-interface or the external
    /// VXLAN device). Not a guest port: no anti-spoofing, no broadcast limit.
    pub external: Option<(ExternalL2, String)>,
    pub vxlan_fdb: BTreeSet<VxlanFdb>,
    pub bridge_fdb: BTreeSet<BridgeFdb>,
    /// Static ARP entries on the gateway interface: with one gateway MAC on every node an ARP
    /// reply would reach the wrong node, so the control plane supplies them.
    pub neighbours: BTreeSet<(Ipv4Addr, Mac)>,
    /// nftables script replacing this network's node tables atomically.
    pub nft_script: String,
    /// nftables script replacing the gateway namespace's table.
    pub ns_nft_script: String,
    pub ns_nft_hash: String,
    /// Hash of the script, stored as the table comment to detect drift cheaply.
    pub nft_hash: String,
    /// Whether an `ip` table (router/NAT) is part of the script.
    pub has_rt_table: bool,
    /// Router, NAT, published ports or several subnets need IPv4 forwarding in
    /// the gateway namespace.
    pub needs_forwarding: bool,
    /// Transit traffic needs IPv4 forwarding on the node.
    pub node_forwarding: bool,
    /// DHCP/DNS server, when the network has subnets.
    pub dnsmasq: Option<DnsmasqConfig>,
    pub state_dir: PathBuf,
}

/// Whether the network needs the transit pair: anything that leaves or enters its
/// gateway namespace other than through the bridge.
pub fn needs_transit(spec: &NetworkSpec) -> bool {
    spec.egress_nat || !spec.exposed.is_empty() || !spec.dns.upstream.is_empty()
}

/// Builds the plan for `host` (its state root holds per-network files, its prefix
/// names the gateway namespace). `transit_slot` is the slot the node allocated
/// ([`crate::transit::allocate`]); without one, the preferred slot.
pub fn build_plan(
    spec: &NetworkSpec,
    host: &Host,
    transit_slot: Option<u32>,
) -> Result<NetworkPlan> {
    spec.validate()?;
    let vni = spec.vni;
    let bridge = names::bridge(vni);
    let vxlan = names::vxlan(vni);
    let gateway_veth = names::gateway_veth(vni);
    let mtu = plan_mtu(spec.underlay_mtu);
    let transit = needs_transit(spec)
        .then(|| TransitPair::of_slot(transit_slot.unwrap_or(vni % TRANSIT_SLOTS)));

    // Without the hvx gateway the namespace holds no address of the network: the
    // outside router answers for the gateway address.
    let addresses = spec
        .subnets
        .iter()
        .filter(|_| spec.gateway)
        .map(|s| Ipv4Net {
            addr: s.gateway,
            prefix: s.cidr.prefix,
        })
        .collect();

    let mut ports = BTreeSet::new();
    let mut vxlan_fdb: BTreeSet<VxlanFdb> = spec
        .remote_vteps
        .iter()
        .map(|&dst| VxlanFdb {
            mac: Mac::ZERO,
            dst,
        })
        .collect();
    // The gateway MAC sits behind the gateway veth, sticky: routed frames of other
    // nodes' gateways (same anycast MAC) arriving through the tunnel must not move it.
    let mut bridge_fdb: BTreeSet<BridgeFdb> = [BridgeFdb {
        mac: names::gateway_mac(vni),
        port: gateway_veth.clone(),
    }]
    .into();
    let mut neighbours = BTreeSet::new();
    for m in &spec.members {
        match &m.location {
            Location::Local { port } => {
                ports.insert(port.clone());
                bridge_fdb.insert(BridgeFdb {
                    mac: m.mac,
                    port: port.clone(),
                });
            }
            Location::Remote { vtep } => {
                vxlan_fdb.insert(VxlanFdb {
                    mac: m.mac,
                    dst: *vtep,
                });
                bridge_fdb.insert(BridgeFdb {
                    mac: m.mac,
                    port: vxlan.clone(),
                });
            }
        }
        if let Some(ip) = m.ip {
            neighbours.insert((ip, m.mac));
        }
    }

    let rendered = nft::render(spec, &ports, &mtu, transit.as_ref());
    let state_dir = host.state_dir(vni);
    let dnsmasq = if spec.subnets.is_empty() || !spec.gateway {
        None
    } else {
        Some(dnsmasq::render(
            spec,
            names::NS_GATEWAY_IF,
            &mtu,
            &state_dir,
        ))
    };
    let needs_forwarding = spec.egress_nat
        || !spec.routed_peers.is_empty()
        || !spec.exposed.is_empty()
        || spec.subnets.len() > 1;

    Ok(NetworkPlan {
        name: spec.name.clone(),
        vni,
        bridge,
        bridge_mac: names::bridge_mac(vni),
        vxlan,
        gateway_veth,
        netns: host.gateway_netns(vni),
        node_forwarding: transit.is_some(),
        transit,
        transit_veth: names::transit_veth(vni),
        peer_routes: spec
            .routed_peers
            .iter()
            .map(|p| (p.vni, p.subnets.clone()))
            .collect(),
        gateway_mac: names::gateway_mac(vni),
        local_vtep: spec.local_vtep,
        mtu,
        addresses,
        ports,
        external: spec.external.clone().map(|e| {
            let port = e.port(vni);
            (e, port)
        }),
        vxlan_fdb,
        bridge_fdb,
        neighbours,
        nft_hash: rendered.hash,
        nft_script: rendered.script,
        ns_nft_script: rendered.ns_script,
        ns_nft_hash: rendered.ns_hash,
        has_rt_table: rendered.has_rt_table,
        needs_forwarding,
        dnsmasq,
        state_dir,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::*;

    pub(crate) fn sample() -> NetworkSpec {
        NetworkSpec {
            name: "app".into(),
            vni: 4242,
            local_vtep: "192.168.77.1".parse().unwrap(),
            underlay_mtu: 1600,
            remote_vteps: vec![
                "192.168.77.2".parse().unwrap(),
                "192.168.77.3".parse().unwrap(),
            ],
            subnets: vec![SubnetSpec {
                cidr: "10.50.0.0/24".parse().unwrap(),
                gateway: "10.50.0.1".parse().unwrap(),
                dhcp: Some(DhcpRange {
                    start: "10.50.0.100".parse().unwrap(),
                    end: "10.50.0.150".parse().unwrap(),
                    lease_secs: 3600,
                }),
                reservations: vec![],
            }],
            members: vec![
                Member {
                    vm: "web".into(),
                    mac: "00:50:56:00:00:01".parse().unwrap(),
                    ip: Some("10.50.0.11".parse().unwrap()),
                    location: Location::Local {
                        port: "hvp1".into(),
                    },
                },
                Member {
                    vm: "db".into(),
                    mac: "00:50:56:00:00:02".parse().unwrap(),
                    ip: Some("10.50.0.12".parse().unwrap()),
                    location: Location::Remote {
                        vtep: "192.168.77.2".parse().unwrap(),
                    },
                },
            ],
            dns: DnsSpec {
                domain: Some("app.internal".into()),
                records: vec![DnsRecord {
                    name: "api".into(),
                    ip: "10.50.0.11".parse().unwrap(),
                }],
                upstream: vec![],
            },
            firewall: FirewallSpec::default(),
            egress_nat: false,
            routed_peers: vec![],
            exposed: vec![],
            egress_denied: vec![],
            egress_allowed: vec![],
            external: None,
            gateway: true,
            broadcast_limit_pps: 0,
        }
    }

    #[test]
    fn mtu_strategy_follows_the_underlay() {
        assert_eq!(plan_mtu(1550).mode, MtuMode::Transparent);
        assert_eq!(plan_mtu(9000).link_mtu, 1500);
        let small = plan_mtu(1500);
        assert_eq!(
            (small.mode, small.link_mtu, small.mss_clamp),
            (MtuMode::Reduced, 1450, Some(1410))
        );
    }

    #[test]
    fn head_end_replication_and_static_fdb() {
        let p = build_plan(&sample(), &Host::new("/run/hvx"), None).unwrap();
        assert_eq!(p.bridge, "hvb4242");
        let zero: Vec<_> = p.vxlan_fdb.iter().filter(|e| e.mac == Mac::ZERO).collect();
        assert_eq!(zero.len(), 2, "one flood entry per remote VTEP");
        assert!(p.vxlan_fdb.contains(&VxlanFdb {
            mac: "00:50:56:00:00:02".parse().unwrap(),
            dst: "192.168.77.2".parse().unwrap()
        }));
        assert!(p.bridge_fdb.contains(&BridgeFdb {
            mac: "00:50:56:00:00:01".parse().unwrap(),
            port: "hvp1".into()
        }));
        assert!(p.bridge_fdb.contains(&BridgeFdb {
            mac: "00:50:56:00:00:02".parse().unwrap(),
            port: "hvv4242".into()
        }));
        assert!(p.bridge_fdb.contains(&BridgeFdb {
            mac: names::gateway_mac(4242),
            port: "hvg4242".into()
        }));
        assert_eq!(p.neighbours.len(), 2);
        assert_eq!(
            p.addresses.iter().next().unwrap().to_string(),
            "10.50.0.1/24"
        );
        assert!(!p.needs_forwarding);
        assert_eq!(p.state_dir, std::path::Path::new("/run/hvx/4242"));
        assert_eq!(p.netns, "hvx-n-4242");
        assert_eq!(p.transit, None, "nothing leaves this network");
        let d = p.dnsmasq.unwrap();
        assert!(d.main.contains("interface=gw0\n"), "{}", d.main);
    }

    #[test]
    fn egress_upstream_dns_and_published_ports_need_the_transit_pair() {
        let host = Host::new("/run/hvx");
        for change in [
            (|s: &mut NetworkSpec| s.egress_nat = true) as fn(&mut NetworkSpec),
            |s| s.dns.upstream = vec!["10.0.0.53".parse().unwrap()],
            |s| {
                s.exposed = vec![ExposedPort {
                    vm: "web".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: 30080,
                }]
            },
        ] {
            let mut spec = sample();
            change(&mut spec);
            let p = build_plan(&spec, &host, Some(9)).unwrap();
            assert_eq!(p.transit, Some(crate::transit::TransitPair::of_slot(9)));
            assert!(p.node_forwarding);
        }
        // Without an allocated slot: the preferred one.
        let mut spec = sample();
        spec.egress_nat = true;
        let p = build_plan(&spec, &host, None).unwrap();
        assert_eq!(
            p.transit.unwrap().slot,
            4242 % crate::transit::TRANSIT_SLOTS
        );
    }

    #[test]
    fn two_networks_with_one_subnet_get_apart_kernel_objects() {
        let host = Host::new("/run/hvx");
        let a = build_plan(&sample(), &host, Some(1)).unwrap();
        let mut other = sample();
        other.vni = 4243;
        other.name = "clone".into();
        let b = build_plan(&other, &host, Some(2)).unwrap();
        assert_eq!(a.addresses, b.addresses, "same gateway address");
        for (x, y) in [
            (&a.bridge, &b.bridge),
            (&a.vxlan, &b.vxlan),
            (&a.gateway_veth, &b.gateway_veth),
            (&a.transit_veth, &b.transit_veth),
            (&a.netns, &b.netns),
        ] {
            assert_ne!(x, y);
        }
        assert_ne!(a.state_dir, b.state_dir);
        assert_ne!(a.gateway_mac, b.gateway_mac);
    }

    #[test]
    fn a_mac_move_changes_only_that_mac() {
        let before = build_plan(&sample(), &Host::new("/x"), None).unwrap();
        let mut moved = sample();
        moved.members[1].location = Location::Remote {
            vtep: "192.168.77.3".parse().unwrap(),
        };
        let after = build_plan(&moved, &Host::new("/x"), None).unwrap();
        let diff: Vec<_> = after
            .vxlan_fdb
            .symmetric_difference(&before.vxlan_fdb)
            .collect();
        assert_eq!(diff.len(), 2, "one entry replaced: {diff:?}");
        assert_eq!(after.bridge_fdb, before.bridge_fdb);
        assert_eq!(after.nft_hash, before.nft_hash);
    }

    #[test]
    fn the_external_port_follows_the_mode_and_the_gateway_can_be_off() {
        let mut s = sample();
        assert_eq!(
            build_plan(&s, &Host::new("/x"), None).unwrap().external,
            None
        );
        s.external = Some(ExternalL2::Uplink {
            interface: "eth1".into(),
            vlan: None,
        });
        let p = build_plan(&s, &Host::new("/x"), None).unwrap();
        assert_eq!(
            p.external.as_ref().map(|(_, port)| port.as_str()),
            Some("eth1")
        );
        assert!(!p.ports.contains("eth1"), "the uplink is not a VM port");
        s.external = Some(ExternalL2::Uplink {
            interface: "eth1".into(),
            vlan: Some(30),
        });
        let p = build_plan(&s, &Host::new("/x"), None).unwrap();
        assert_eq!(p.external.map(|(_, port)| port), Some("hvl4242".into()));
        s.external = Some(ExternalL2::Vtep {
            address: "192.0.2.9".parse().unwrap(),
            port: 4790,
            vni: 5000,
        });
        let p = build_plan(&s, &Host::new("/x"), None).unwrap();
        assert_eq!(p.external.map(|(_, port)| port), Some("hve4242".into()));

        // The outside router and DHCP server: no gateway address, no dnsmasq.
        s.gateway = false;
        s.subnets[0].dhcp = None;
        let p = build_plan(&s, &Host::new("/x"), None).unwrap();
        assert!(p.addresses.is_empty() && p.dnsmasq.is_none(), "{p:?}");
    }

    #[test]
    fn bad_specs_are_rejected_with_reasons() {
        type Case = (fn(&mut NetworkSpec), &'static str);
        let cases: Vec<Case> = vec![
            (|s| s.vni = 0, "VNI"),
            (|s| s.vni = 1 << 24, "VNI"),
            (|s| s.remote_vteps.push(s.local_vtep), "also listed"),
            (
                |s| s.subnets[0].gateway = "10.9.9.1".parse().unwrap(),
                "outside subnet",
            ),
            (|s| s.members[1].mac = s.members[0].mac, "two members"),
            (
                |s| {
                    s.members[0].location = Location::Local {
                        port: "hvb12".into(),
                    }
                },
                "collides",
            ),
            (
                |s| {
                    s.members[0].location = Location::Local {
                        port: "a-very-long-port-name".into(),
                    }
                },
                "1..=15",
            ),
            (|s| s.members[0].vm = "bad name".into(), "VM name"),
            (
                |s| s.members[0].ip = Some("10.60.0.1".parse().unwrap()),
                "no subnet",
            ),
            (
                |s| {
                    s.members[1].location = Location::Remote {
                        vtep: "1.1.1.1".parse().unwrap(),
                    }
                },
                "not in remote_vteps",
            ),
            (|s| s.underlay_mtu = 100, "MTU"),
            (
                |s| {
                    s.subnets[0].reservations.push(Reservation {
                        mac: "00:50:56:00:00:33".parse().unwrap(),
                        ip: "10.50.0.33".parse().unwrap(),
                        hostname: Some("x\n00:50:56:00:00:01,10.50.0.99,evil".into()),
                    })
                },
                "not an RFC 1123 label",
            ),
            (
                |s| {
                    s.subnets[0].reservations.push(Reservation {
                        mac: "00:50:56:00:00:33".parse().unwrap(),
                        ip: "10.50.0.33".parse().unwrap(),
                        hostname: Some("trailing-".into()),
                    })
                },
                "not an RFC 1123 label",
            ),
            (
                |s| s.members[0].mac = "01:00:5e:00:00:01".parse().unwrap(),
                "non-unicast",
            ),
            (
                |s| {
                    s.external = Some(ExternalL2::Uplink {
                        interface: "eth1;rm".into(),
                        vlan: None,
                    })
                },
                "uplink \"eth1;rm\"",
            ),
            (
                |s| {
                    s.external = Some(ExternalL2::Uplink {
                        interface: "eth1".into(),
                        vlan: Some(4095),
                    })
                },
                "VLAN 4095 is outside 1..=4094",
            ),
            (
                |s| {
                    s.external = Some(ExternalL2::Uplink {
                        interface: "hvp1".into(),
                        vlan: None,
                    })
                },
                "also a VM port",
            ),
            (
                |s| {
                    s.external = Some(ExternalL2::Uplink {
                        interface: "hvb7".into(),
                        vlan: None,
                    })
                },
                "switch's own links",
            ),
            (
                |s| {
                    s.external = Some(ExternalL2::Vtep {
                        address: "192.168.77.2".parse().unwrap(),
                        port: 4789,
                        vni: 9,
                    })
                },
                "is a node of the cluster",
            ),
            (
                |s| {
                    s.external = Some(ExternalL2::Vtep {
                        address: "192.0.2.9".parse().unwrap(),
                        port: 4789,
                        vni: 4242,
                    })
                },
                "the network's own tunnel",
            ),
            (
                |s| {
                    s.external = Some(ExternalL2::Vtep {
                        address: "192.0.2.9".parse().unwrap(),
                        port: 4789,
                        vni: 0,
                    })
                },
                "external VNI 0",
            ),
            (|s| s.gateway = false, "DHCP needs the hvx gateway"),
            (
                |s| {
                    s.gateway = false;
                    s.subnets[0].dhcp = None;
                    s.egress_nat = true;
                },
                "need the hvx gateway",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = sample();
            mutate(&mut s);
            let err = build_plan(&s, &Host::new("/x"), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
