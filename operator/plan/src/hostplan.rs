//! Pure planning of what each node agent is told: where every VM NIC is (from the
//! launcher pods), the complete per-node state of a VirtualNetwork (EnsureNetwork is
//! declarative: anything left out is removed), and the import request of an
//! OverlayDisk. No I/O here.

use hvx_api::{Endpoints, FirewallAction, OverlayDisk, VirtualNetwork};
use hvx_proto::v1 as pb;
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// One VM NIC placed on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedNic {
    /// Application name.
    pub app: String,
    /// VM name.
    pub vm: String,
    /// NIC name.
    pub nic: String,
    /// MAC address (lowercase).
    pub mac: String,
    /// Host tap.
    pub tap: String,
    /// Static address without prefix, if declared.
    pub ip: Option<String>,
    /// Node the VM runs on.
    pub node: String,
    /// VirtualNetwork UID.
    pub network_uid: String,
    /// False on a live migration's target pod: its tap exists, but the MAC is still
    /// reached at the source until the switchover.
    pub active: bool,
}

pub use crate::pods::{pod_is_live, pod_launch_spec};

/// Every NIC of the live launcher pods, with the node it is on.
pub fn placed_nics(pods: &[Pod]) -> Vec<PlacedNic> {
    let mut out = Vec::new();
    for pod in pods.iter().filter(|p| pod_is_live(p)) {
        let Some(ls) = pod_launch_spec(pod) else {
            continue;
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        for n in &ls.nics {
            let Some(declared) = ls.vm.nics.iter().find(|d| d.name == n.name) else {
                continue;
            };
            out.push(PlacedNic {
                app: ls.application.clone(),
                vm: ls.vm.name.clone(),
                nic: n.name.clone(),
                mac: declared.mac_address.to_ascii_lowercase(),
                tap: n.tap.clone(),
                ip: declared
                    .ip_address
                    .as_deref()
                    .map(|a| a.split('/').next().unwrap_or(a).to_string()),
                node: node.clone(),
                network_uid: n.network_uid.clone(),
                active: crate::pods::target_of(pod).is_none(),
            });
        }
    }
    out.sort_by(|a, b| (&a.node, &a.mac).cmp(&(&b.node, &b.mac)));
    out
}

fn parse_cidr(cidr: &str) -> Option<(u32, u8)> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((u32::from(ip) & mask, len))
}

/// The slice `index` of `count` of a dynamic range. Each node's dnsmasq has its own
/// lease database, so nodes must never hand out the same address; slices are
/// contiguous, disjoint and cover the range. `None` if the range is too small.
pub fn split_range(
    start: Ipv4Addr,
    end: Ipv4Addr,
    index: usize,
    count: usize,
) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (s, e) = (u64::from(u32::from(start)), u64::from(u32::from(end)));
    if e < s || count == 0 || index >= count {
        return None;
    }
    let size = e - s + 1;
    let (count, index) = (count as u64, index as u64);
    if size < count {
        return None;
    }
    let lo = s + size * index / count;
    let hi = s + size * (index + 1) / count - 1;
    Some((
        Ipv4Addr::from(u32::try_from(lo).ok()?),
        Ipv4Addr::from(u32::try_from(hi).ok()?),
    ))
}

/// Everything about the cluster the network request needs.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Node name -> VTEP (InternalIP) of every node whose agent is ready.
    pub node_ips: BTreeMap<String, String>,
    /// Node name -> labels, for the nodes in `node_ips` (the external segment's
    /// node selector).
    pub node_labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl Cluster {
    /// Position of `node` among the agent nodes (stable while the set is): its DHCP slice.
    pub fn slot(&self, node: &str) -> (usize, usize) {
        let index = self.node_ips.keys().position(|n| n == node).unwrap_or(0);
        (index, self.node_ips.len().max(1))
    }
}

/// The node carrying the network's outside segment (uplink or external VTEP): the
/// first ready agent node by name that matches `external.nodeSelector`. One node
/// only, so the outside segment and the overlay never form a loop; when it goes,
/// the next matching node takes over.
pub fn external_carrier<'a>(net: &VirtualNetwork, cluster: &'a Cluster) -> Option<&'a str> {
    let ext = net.spec.external.as_ref()?;
    if ext.uplink.is_none() && ext.vtep.is_none() {
        return None;
    }
    let none = BTreeMap::new();
    cluster
        .node_ips
        .keys()
        .find(|node| {
            let labels = cluster.node_labels.get(*node).unwrap_or(&none);
            ext.node_selector
                .iter()
                .flatten()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(String::as_str)
}

/// The nodes that must carry the network: those hosting its VMs, and the carrier of
/// its outside segment.
pub fn network_nodes(
    net: &VirtualNetwork,
    nics: &[PlacedNic],
    cluster: &Cluster,
) -> BTreeSet<String> {
    let uid = net.metadata.uid.clone().unwrap_or_default();
    let mut nodes: BTreeSet<String> = nics
        .iter()
        .filter(|n| n.network_uid == uid)
        .map(|n| n.node.clone())
        .collect();
    nodes.extend(external_carrier(net, cluster).map(String::from));
    nodes
}

/// The complete EnsureNetwork request for `node`. `nics` are the NICs of every VM in
/// the network's namespace (others are filtered out here).
pub fn network_request(
    net: &VirtualNetwork,
    vni: u32,
    node: &str,
    nics: &[PlacedNic],
    cluster: &Cluster,
) -> pb::EnsureNetworkRequest {
    let uid = net.metadata.uid.clone().unwrap_or_default();
    let mine: Vec<&PlacedNic> = nics.iter().filter(|n| n.network_uid == uid).collect();
    let (slot, slots) = cluster.slot(node);
    let mut reservations = Vec::new();
    let subnets = net
        .spec
        .subnets
        .iter()
        .filter_map(|s| {
            let (base, len) = parse_cidr(&s.cidr)?;
            let host = |i: u32| Ipv4Addr::from(base.wrapping_add(i)).to_string();
            let last = if len >= 31 {
                0
            } else {
                (1u32 << (32 - len)) - 2
            };
            let gateway = s.gateway.clone().unwrap_or_else(|| host(1));
            // `external.dhcp: false`: the outside segment's server answers instead.
            let hvx_dhcp = net
                .spec
                .external
                .as_ref()
                .is_none_or(|e| e.dhcp != Some(false) && e.gateway != Some(false));
            let dhcp = s.dhcp.as_ref().filter(|d| d.enabled && hvx_dhcp);
            let (mut start, mut end) = (String::new(), String::new());
            if let Some(d) = dhcp {
                for r in d.reservations.iter().flatten() {
                    reservations.push(pb::DhcpReservation {
                        mac: r.mac_address.to_ascii_lowercase(),
                        ip: r.ip_address.clone(),
                        hostname: r.hostname.clone().unwrap_or_default(),
                    });
                }
                let from: Option<Ipv4Addr> = d
                    .range_start
                    .as_deref()
                    .map_or_else(|| host(10.min(last)).parse().ok(), |a| a.parse().ok());
                let to: Option<Ipv4Addr> = d
                    .range_end
                    .as_deref()
                    .map_or_else(|| host(last).parse().ok(), |a| a.parse().ok());
                if let (Some(from), Some(to)) = (from, to)
                    && let Some((a, b)) = split_range(from, to, slot, slots)
                {
                    (start, end) = (a.to_string(), b.to_string());
                }
            }
            Some(pb::Subnet {
                cidr: s.cidr.clone(),
                gateway,
                dhcp: dhcp.is_some(),
                range_start: start,
                range_end: end,
                lease_seconds: dhcp.map_or(0, |d| d.lease_seconds),
            })
        })
        .collect();
    // VMs with a declared address get a reservation too, unless the user made one.
    for n in &mine {
        if let Some(ip) = &n.ip
            && !reservations.iter().any(|r| r.mac == n.mac)
        {
            reservations.push(pb::DhcpReservation {
                mac: n.mac.clone(),
                ip: ip.clone(),
                hostname: n.vm.clone(),
            });
        }
    }
    let carrier = external_carrier(net, cluster);
    let mut hosting: BTreeSet<&str> = mine.iter().map(|n| n.node.as_str()).collect();
    hosting.extend(carrier);
    let remote_vteps = hosting
        .iter()
        .filter(|n| **n != node)
        .filter_map(|n| cluster.node_ips.get(*n).cloned())
        .collect();
    // A migration target here owns its MAC locally (its tap must exist before QEMU
    // starts); until the switchover, VMs on this node reach the migrating VM's paused
    // target, others reach the source.
    let local_macs: BTreeSet<&str> = mine
        .iter()
        .filter(|n| n.node == node)
        .map(|n| n.mac.as_str())
        .collect();
    let remote_macs = mine
        .iter()
        .filter(|n| n.node != node && n.active && !local_macs.contains(n.mac.as_str()))
        .filter_map(|n| {
            Some(pb::RemoteMac {
                mac: n.mac.clone(),
                vtep_ip: cluster.node_ips.get(&n.node)?.clone(),
                vm: n.vm.clone(),
                ip: n.ip.clone().unwrap_or_default(),
            })
        })
        .collect();
    let local_ports = mine
        .iter()
        .filter(|n| n.node == node)
        .map(|n| pb::LocalPort {
            vm: n.vm.clone(),
            nic: n.nic.clone(),
            mac: n.mac.clone(),
            tap: n.tap.clone(),
            ip: n.ip.clone().unwrap_or_default(),
        })
        .collect();
    let macs_of = |e: &Option<Endpoints>| -> Vec<String> {
        let vms: Vec<&String> = e.iter().flat_map(|e| e.vms.iter().flatten()).collect();
        mine.iter()
            .filter(|n| {
                vms.iter()
                    .any(|v| **v == n.vm || **v == format!("{}/{}", n.app, n.vm))
            })
            .map(|n| n.mac.clone())
            .collect()
    };
    let cidrs_of = |e: &Option<Endpoints>| -> Vec<String> {
        e.iter().filter_map(|e| e.cidr.clone()).collect()
    };
    let firewall = net.spec.firewall.clone().unwrap_or_default();
    let firewall_rules = firewall
        .rules
        .iter()
        .map(|r| pb::FirewallRule {
            name: r.name.clone(),
            allow: r.action == FirewallAction::Allow,
            from_macs: macs_of(&r.from),
            from_cidrs: cidrs_of(&r.from),
            to_macs: macs_of(&r.to),
            to_cidrs: cidrs_of(&r.to),
            protocol: format!("{:?}", r.protocol).to_ascii_lowercase(),
            ports: r.ports.iter().flatten().map(|p| u32::from(*p)).collect(),
        })
        .collect();
    let dns = net.spec.dns.clone().unwrap_or_default();
    let ext = net.spec.external.clone().unwrap_or_default();
    let carries = carrier == Some(node);
    let uplink = ext.uplink.as_ref().filter(|_| carries);
    let vtep = ext.vtep.as_ref().filter(|_| carries);
    pb::EnsureNetworkRequest {
        network_uid: uid,
        namespace: net.metadata.namespace.clone().unwrap_or_default(),
        name: net.metadata.name.clone().unwrap_or_default(),
        vni,
        mtu: net.spec.mtu.map_or(0, u32::from),
        subnets,
        reservations,
        dns_domain: dns.domain.unwrap_or_default(),
        dns_records: dns
            .records
            .iter()
            .flatten()
            .map(|r| pb::DnsRecord {
                name: r.name.clone(),
                r#type: format!("{:?}", r.type_).to_ascii_uppercase(),
                value: r.value.clone(),
            })
            .collect(),
        dns_upstreams: dns.upstreams.unwrap_or_default(),
        firewall_default_allow: firewall.default_action == FirewallAction::Allow,
        firewall_rules,
        egress_nat: net.spec.external.as_ref().is_some_and(|e| e.egress_nat),
        remote_vteps,
        remote_macs,
        local_ports,
        uplink_interface: uplink.map(|u| u.interface.clone()).unwrap_or_default(),
        uplink_vlan: uplink.and_then(|u| u.vlan).map_or(0, u32::from),
        external_vtep: vtep.map(|v| v.address.clone()).unwrap_or_default(),
        external_vtep_port: vtep.and_then(|v| v.port).map_or(0, u32::from),
        external_vni: vtep.map_or(0, |v| v.vni),
        gateway_off: ext.gateway == Some(false),
        broadcast_limit_pps: net
            .spec
            .broadcast_limit_pps
            .unwrap_or(hvx_api::network::DEFAULT_BROADCAST_LIMIT_PPS),
    }
}

/// Bytes of a binary or plain Kubernetes quantity (`10Gi`, `512Mi`, `1048576`).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let (num, mult) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ]
    .iter()
    .find_map(|(sfx, m)| q.strip_suffix(sfx).map(|n| (n, *m)))
    .unwrap_or((q, 1));
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// How many clones of clones are followed before giving up.
pub const MAX_CLONE_DEPTH: usize = 8;

/// Why a clone has no origin (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloneBlocked {
    /// A disk the chain names does not exist (yet): the clone waits for it.
    Missing(String),
    /// The chain can never end (a cycle, too deep, or a snapshot to clone from).
    Invalid(String),
}

impl std::fmt::Display for CloneBlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloneBlocked::Missing(m) | CloneBlocked::Invalid(m) => f.write_str(m),
        }
    }
}

/// The disk whose bytes `disk` has: itself unless it is a clone, else the first disk
/// of its clone chain that is not a clone (looked up by name in its namespace). A
/// clone is imported as that disk: the same request, the same content-addressed base,
/// so a node holding the origin's base imports nothing again.
pub fn clone_origin<D>(disk: D, lookup: impl Fn(&str) -> Option<D>) -> Result<D, CloneBlocked>
where
    D: std::ops::Deref<Target = OverlayDisk>,
{
    let mut chain = vec![disk.metadata.name.clone().unwrap_or_default()];
    let mut cur = disk;
    loop {
        let Some(c) = cur.spec.source.clone.clone() else {
            return Ok(cur);
        };
        let name = chain.last().cloned().unwrap_or_default();
        if c.snapshot.is_some() {
            return Err(CloneBlocked::Invalid(format!(
                "OverlayDisk {name} clones a snapshot of {}: not supported by this hvx version",
                c.overlay_disk
            )));
        }
        if chain.contains(&c.overlay_disk) {
            chain.push(c.overlay_disk);
            return Err(CloneBlocked::Invalid(format!(
                "clone cycle: {}",
                chain.join(" -> ")
            )));
        }
        if chain.len() > MAX_CLONE_DEPTH {
            return Err(CloneBlocked::Invalid(format!(
                "clone chain longer than {MAX_CLONE_DEPTH}: {} -> ...",
                chain.join(" -> ")
            )));
        }
        cur = lookup(&c.overlay_disk).ok_or_else(|| {
            CloneBlocked::Missing(format!(
                "waiting for OverlayDisk {} (cloned by {name}), which does not exist",
                c.overlay_disk
            ))
        })?;
        chain.push(c.overlay_disk);
    }
}

/// The agent's import request for an OverlayDisk, or why it cannot be made.
pub fn prepare_disk_request(disk: &OverlayDisk) -> Result<pb::PrepareDiskRequest, String> {
    use pb::disk_source::Kind;
    let src = &disk.spec.source;
    let kind = if let Some(h) = &src.http {
        Kind::HttpUrl(h.url.clone())
    } else if let Some(p) = &src.pvc {
        Kind::Pvc(pb::PvcPath {
            mount: p.claim_name.clone(),
            path: p.path.clone(),
        })
    } else if src.upload.is_some() {
        Kind::Upload(disk.metadata.uid.clone().unwrap_or_default())
    } else if let Some(o) = &src.ova {
        Kind::Ova(pb::OvaMember {
            url: o.url.clone().unwrap_or_default(),
            member: o.member.clone(),
        })
    } else if let Some(c) = &src.clone {
        // Callers import a clone as its origin (`clone_origin`); the agent has no
        // way to resolve names.
        return Err(format!(
            "a clone of {} is imported as the disk it clones: resolve it with clone_origin",
            c.overlay_disk
        ));
    } else if src.blank.is_some() {
        // CEL requires a capacity; one this parser cannot read (decimal units) is a
        // build error the user sees, never an import the agent refuses every 30 s.
        let capacity = disk.spec.capacity.as_ref().map(|q| q.0.as_str());
        match capacity.and_then(quantity_bytes).filter(|b| *b > 0) {
            Some(bytes) => Kind::BlankBytes(bytes),
            None => {
                return Err(format!(
                    "a blank disk needs a capacity in bytes or binary units (Ki, Mi, Gi, Ti), not {capacity:?}"
                ));
            }
        }
    } else {
        return Err("the OverlayDisk has no source".into());
    };
    Ok(pb::PrepareDiskRequest {
        disk_uid: disk.metadata.uid.clone().unwrap_or_default(),
        namespace: disk.metadata.namespace.clone().unwrap_or_default(),
        name: disk.metadata.name.clone().unwrap_or_default(),
        source: Some(pb::DiskSource { kind: Some(kind) }),
        format: format!("{:?}", disk.spec.format).to_ascii_lowercase(),
        expected_checksum: disk.spec.checksum.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn net() -> VirtualNetwork {
        serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork",
            "metadata": {"name": "app-net", "namespace": "ns", "uid": "net-1"},
            "spec": {
                "subnets": [{"name": "main", "cidr": "10.77.0.0/24", "gateway": "10.77.0.1",
                    "dhcp": {"rangeStart": "10.77.0.100", "rangeEnd": "10.77.0.199",
                        "reservations": [{"macAddress": "00:50:56:A1:00:02", "ipAddress": "10.77.0.20"}]}}],
                "firewall": {"defaultAction": "Allow", "rules": [{"name": "r", "action": "Deny",
                    "to": {"vms": ["db"]}, "protocol": "TCP", "ports": [5432]}]}
            }
        }))
        .expect("network fixture")
    }

    fn nic(vm: &str, mac: &str, node: &str) -> PlacedNic {
        PlacedNic {
            app: "shop".into(),
            vm: vm.into(),
            nic: "ethernet0".into(),
            mac: mac.into(),
            tap: format!("hvt-{vm}"),
            ip: None,
            node: node.into(),
            network_uid: "net-1".into(),
            active: true,
        }
    }

    fn cluster() -> Cluster {
        Cluster {
            node_ips: [
                ("n1", "172.31.250.11"),
                ("n2", "172.31.250.12"),
                ("n3", "172.31.250.13"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
            node_labels: BTreeMap::new(),
        }
    }

    #[test]
    fn one_selected_node_carries_the_outside_segment_for_the_others() {
        let mut n = net();
        n.spec.external = serde_json::from_value(json!({
            "uplink": {"interface": "eth1", "vlan": 30},
            "nodeSelector": {"hvx.dev/uplink": "dc1"},
            "dhcp": false
        }))
        .expect("external");
        let mut c = cluster();
        for node in ["n2", "n3"] {
            c.node_labels.insert(
                node.into(),
                [("hvx.dev/uplink".to_string(), "dc1".to_string())].into(),
            );
        }
        // The first matching node by name; n1 does not match.
        assert_eq!(external_carrier(&n, &c), Some("n2"));
        let nics = vec![nic("web", "00:50:56:a1:00:01", "n1")];
        assert_eq!(
            network_nodes(&n, &nics, &c),
            ["n1".to_string(), "n2".to_string()].into()
        );
        let on_n2 = network_request(&n, 4097, "n2", &nics, &c);
        assert_eq!(
            (on_n2.uplink_interface.as_str(), on_n2.uplink_vlan),
            ("eth1", 30)
        );
        assert_eq!(on_n2.remote_vteps, vec!["172.31.250.11".to_string()]);
        let on_n1 = network_request(&n, 4097, "n1", &nics, &c);
        assert!(
            on_n1.uplink_interface.is_empty(),
            "only the carrier has the uplink"
        );
        assert_eq!(on_n1.remote_vteps, vec!["172.31.250.12".to_string()]);
        // The outside DHCP server answers; the default storm limit applies.
        assert!(!on_n1.subnets[0].dhcp && !on_n1.gateway_off);
        assert_eq!(on_n1.broadcast_limit_pps, 1000);

        // The carrier goes away: the next matching node takes over.
        c.node_ips.remove("n2");
        assert_eq!(external_carrier(&n, &c), Some("n3"));
        // No selector: any node; a VTEP instead of an uplink.
        n.spec.external = serde_json::from_value(json!({
            "vtep": {"address": "192.0.2.9", "vni": 5000},
            "gateway": false, "dhcp": false
        }))
        .expect("external");
        assert_eq!(external_carrier(&n, &c), Some("n1"));
        let r = network_request(&n, 4097, "n1", &nics, &c);
        assert_eq!(
            (
                r.external_vtep.as_str(),
                r.external_vtep_port,
                r.external_vni,
                r.gateway_off
            ),
            ("192.0.2.9", 0, 5000, true)
        );
        // Without an uplink or VTEP nothing extra is carried.
        n.spec.external = None;
        assert_eq!(external_carrier(&n, &c), None);
    }

    #[test]
    fn ranges_split_disjoint_and_complete() {
        let s: Ipv4Addr = "10.0.0.100".parse().expect("ip");
        let e: Ipv4Addr = "10.0.0.199".parse().expect("ip");
        let parts: Vec<_> = (0..3)
            .map(|i| split_range(s, e, i, 3).expect("slice"))
            .collect();
        assert_eq!(parts[0].0, s);
        assert_eq!(parts[2].1, e);
        for w in parts.windows(2) {
            assert_eq!(u32::from(w[0].1) + 1, u32::from(w[1].0), "{parts:?}");
        }
        assert_eq!(
            split_range(s, s, 0, 2),
            None,
            "one address cannot serve two nodes"
        );
        assert_eq!(split_range(e, s, 0, 1), None);
    }

    #[test]
    fn request_has_local_ports_remote_macs_and_this_nodes_slice() {
        let nics = vec![
            nic("db", "00:50:56:a1:00:02", "n1"),
            nic("web", "00:50:56:a1:00:01", "n2"),
            PlacedNic {
                network_uid: "other".into(),
                ..nic("x", "00:50:56:ff:00:01", "n3")
            },
            // web's migration target on n3: not where web's MAC is reached yet.
            PlacedNic {
                active: false,
                ..nic("web", "00:50:56:a1:00:01", "n3")
            },
        ];
        let r = network_request(&net(), 4097, "n1", &nics, &cluster());
        assert_eq!(r.vni, 4097);
        assert_eq!(r.local_ports.len(), 1);
        assert_eq!(r.local_ports[0].tap, "hvt-db");
        assert_eq!(
            r.remote_macs,
            vec![pb::RemoteMac {
                mac: "00:50:56:a1:00:01".into(),
                vtep_ip: "172.31.250.12".into(),
                vm: "web".into(),
                ip: String::new(),
            }]
        );
        assert_eq!(
            r.remote_vteps,
            vec!["172.31.250.12".to_string(), "172.31.250.13".to_string()],
            "n3 hosts web's migration target (its other NIC is on another network)"
        );
        assert_eq!(r.subnets[0].range_start, "10.77.0.100");
        assert_eq!(r.subnets[0].range_end, "10.77.0.132");
        let r3 = network_request(&net(), 4097, "n3", &nics, &cluster());
        assert!(
            r3.local_ports.iter().any(|p| p.mac == "00:50:56:a1:00:01")
                && r3.remote_macs.iter().all(|m| m.mac != "00:50:56:a1:00:01"),
            "the target's node has web's MAC locally only: {r3:?}"
        );
        let r2 = network_request(&net(), 4097, "n2", &nics, &cluster());
        assert_eq!(r2.subnets[0].range_start, "10.77.0.133");
        assert_eq!(
            r.reservations[0].mac, "00:50:56:a1:00:02",
            "MACs are lowercased"
        );
        assert_eq!(
            r.firewall_rules[0].to_macs,
            vec!["00:50:56:a1:00:02".to_string()]
        );
        assert!(!r.firewall_rules[0].allow);
        assert_eq!(r.firewall_rules[0].protocol, "tcp");
        assert!(r.firewall_default_allow);
    }

    fn named(name: &str, source: serde_json::Value) -> OverlayDisk {
        serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {"source": source},
        }))
        .expect("disk")
    }

    fn clone_of(name: &str, of: &str) -> OverlayDisk {
        named(name, json!({"clone": {"overlayDisk": of}}))
    }

    fn origin_in(disks: &[OverlayDisk], name: &str) -> Result<String, CloneBlocked> {
        let find = |n: &str| disks.iter().find(|d| d.metadata.name.as_deref() == Some(n));
        clone_origin(find(name).expect("start"), find)
            .map(|d| d.metadata.name.clone().unwrap_or_default())
    }

    #[test]
    fn clones_resolve_to_their_origin_through_chains() {
        let disks = [
            named("base", json!({"http": {"url": "http://h/d.vmdk"}})),
            clone_of("a", "base"),
            clone_of("b", "a"),
        ];
        assert_eq!(origin_in(&disks, "base"), Ok("base".into()));
        assert_eq!(origin_in(&disks, "a"), Ok("base".into()));
        assert_eq!(origin_in(&disks, "b"), Ok("base".into()));
        // The origin's request is what a clone sends: its source, its checksum.
        let find = |n: &str| disks.iter().find(|d| d.metadata.name.as_deref() == Some(n));
        let origin = clone_origin(find("b").expect("b"), find).expect("origin");
        let req = prepare_disk_request(origin).expect("request");
        assert_eq!(
            req.source.and_then(|s| s.kind),
            Some(pb::disk_source::Kind::HttpUrl("http://h/d.vmdk".into()))
        );
        assert_eq!(req.disk_uid, "uid-base");
        // Never sent as such.
        assert!(prepare_disk_request(&disks[1]).is_err());
    }

    #[test]
    fn clone_chains_that_cannot_end_say_why() {
        let disks = [clone_of("a", "b"), clone_of("b", "c"), clone_of("c", "a")];
        let Err(CloneBlocked::Invalid(m)) = origin_in(&disks, "a") else {
            panic!("a cycle")
        };
        assert_eq!(m, "clone cycle: a -> b -> c -> a");
        let disks = [clone_of("self", "self")];
        assert!(matches!(
            origin_in(&disks, "self"),
            Err(CloneBlocked::Invalid(_))
        ));

        let disks = [clone_of("a", "gone")];
        assert_eq!(
            origin_in(&disks, "a"),
            Err(CloneBlocked::Missing(
                "waiting for OverlayDisk gone (cloned by a), which does not exist".into()
            ))
        );

        // A chain of MAX_CLONE_DEPTH clones resolves; one more is refused.
        let mut disks = vec![named("d0", json!({"blank": {}}))];
        for i in 1..=MAX_CLONE_DEPTH + 1 {
            disks.push(clone_of(&format!("d{i}"), &format!("d{}", i - 1)));
        }
        assert_eq!(
            origin_in(&disks, &format!("d{MAX_CLONE_DEPTH}")),
            Ok("d0".into())
        );
        let Err(CloneBlocked::Invalid(m)) = origin_in(&disks, &format!("d{}", MAX_CLONE_DEPTH + 1))
        else {
            panic!("too deep")
        };
        assert!(m.contains("longer than"), "{m}");

        let disks = [named(
            "s",
            json!({"clone": {"overlayDisk": "x", "snapshot": "before"}}),
        )];
        assert!(matches!(
            origin_in(&disks, "s"),
            Err(CloneBlocked::Invalid(_))
        ));
    }

    #[test]
    fn blank_disks_ask_for_their_capacity_or_are_refused() {
        let disk = |capacity: Option<&str>| -> OverlayDisk {
            let mut spec = json!({"source": {"blank": {}}});
            if let Some(c) = capacity {
                spec["capacity"] = json!(c);
            }
            serde_json::from_value(json!({
                "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
                "metadata": {"name": "d", "namespace": "ns", "uid": "u-1"},
                "spec": spec,
            }))
            .expect("disk")
        };
        let req = prepare_disk_request(&disk(Some("20Gi"))).expect("request");
        assert_eq!(
            req.source.and_then(|s| s.kind),
            Some(pb::disk_source::Kind::BlankBytes(20 << 30))
        );
        for bad in [None, Some("0"), Some("20G")] {
            let e = prepare_disk_request(&disk(bad)).expect_err("refused");
            assert!(e.contains("capacity"), "{e}");
        }
    }
}
