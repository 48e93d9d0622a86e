//! Pure translations between the wire contract and the domain crates: an
//! EnsureNetworkRequest becomes the overlay switch's `NetworkSpec`, a `DiskSource`
//! becomes a store `ImportSource`, dnsmasq's lease file becomes `Lease`s.

use super::error::AgentError;
use hvx_overlay::{
    Action, DhcpRange, DnsRecord, DnsSpec, ExternalL2, FirewallRule, FirewallSpec, Ipv4Net,
    Location, Mac, Member, NetworkSpec, Peers, Protocol, Reservation, SubnetSpec,
};
use hvx_proto::v1 as pb;
use hvx_storage::ImportSource;
use std::net::Ipv4Addr;

fn invalid(what: &str, value: &str) -> AgentError {
    AgentError::Invalid(format!("{what}: {value:?} is not valid"))
}

fn ip(what: &str, s: &str) -> Result<Ipv4Addr, AgentError> {
    s.parse().map_err(|_| invalid(what, s))
}

fn opt_ip(what: &str, s: &str) -> Result<Option<Ipv4Addr>, AgentError> {
    if s.is_empty() {
        Ok(None)
    } else {
        // A NIC address may come with its prefix ("10.1.0.5/24").
        ip(what, s.split('/').next().unwrap_or(s)).map(Some)
    }
}

fn mac(s: &str) -> Result<Mac, AgentError> {
    s.parse().map_err(|_| invalid("MAC", s))
}

fn protocol(s: &str) -> Result<Protocol, AgentError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "" | "any" => Protocol::Any,
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        other => return Err(invalid("firewall protocol", other)),
    })
}

fn peers(macs: &[String], cidrs: &[String]) -> Result<Peers, AgentError> {
    if !macs.is_empty() {
        Ok(Peers::Macs(
            macs.iter().map(|m| mac(m)).collect::<Result<_, _>>()?,
        ))
    } else if !cidrs.is_empty() {
        Ok(Peers::Cidrs(
            cidrs
                .iter()
                .map(|c| c.parse::<Ipv4Net>().map_err(|_| invalid("CIDR", c)))
                .collect::<Result<_, _>>()?,
        ))
    } else {
        Ok(Peers::Any)
    }
}

/// The outside segment this node carries, if any (uplink and VTEP are exclusive).
fn external_l2(req: &pb::EnsureNetworkRequest) -> Result<Option<ExternalL2>, AgentError> {
    match (
        req.uplink_interface.is_empty(),
        req.external_vtep.is_empty(),
    ) {
        (true, true) => Ok(None),
        (false, false) => Err(AgentError::Invalid(
            "a network joins the outside through an uplink or a VTEP, not both".into(),
        )),
        (false, true) => {
            let vlan = match req.uplink_vlan {
                0 => None,
                v => Some(
                    u16::try_from(v)
                        .ok()
                        .filter(|v| (1..=4094).contains(v))
                        .ok_or_else(|| invalid("uplink VLAN", &v.to_string()))?,
                ),
            };
            Ok(Some(ExternalL2::Uplink {
                interface: req.uplink_interface.clone(),
                vlan,
            }))
        }
        (true, false) => Ok(Some(ExternalL2::Vtep {
            address: ip("external VTEP", &req.external_vtep)?,
            port: match req.external_vtep_port {
                0 => hvx_overlay::names::VXLAN_PORT,
                p => u16::try_from(p).map_err(|_| invalid("external VTEP port", &p.to_string()))?,
            },
            vni: req.external_vni,
        })),
    }
}

/// The overlay switch's view of one network on this node.
pub fn network_spec(
    req: &pb::EnsureNetworkRequest,
    local_vtep: Ipv4Addr,
    underlay_mtu: u32,
) -> Result<NetworkSpec, AgentError> {
    let subnets = req
        .subnets
        .iter()
        .map(|s| {
            let cidr: Ipv4Net = s
                .cidr
                .parse()
                .map_err(|_| invalid("subnet CIDR", &s.cidr))?;
            let dhcp = if s.dhcp && !s.range_start.is_empty() && !s.range_end.is_empty() {
                Some(DhcpRange {
                    start: ip("DHCP range start", &s.range_start)?,
                    end: ip("DHCP range end", &s.range_end)?,
                    lease_secs: if s.lease_seconds == 0 {
                        3600
                    } else {
                        s.lease_seconds
                    },
                })
            } else {
                None
            };
            let reservations = req
                .reservations
                .iter()
                .map(|r| {
                    Ok(Reservation {
                        mac: mac(&r.mac)?,
                        ip: ip("reserved address", &r.ip)?,
                        hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
                    })
                })
                .collect::<Result<Vec<_>, AgentError>>()?
                .into_iter()
                .filter(|r| cidr.contains(r.ip))
                .collect();
            Ok(SubnetSpec {
                cidr,
                gateway: ip("gateway", &s.gateway)?,
                dhcp,
                reservations,
            })
        })
        .collect::<Result<Vec<_>, AgentError>>()?;
    let mut members = Vec::new();
    for p in &req.local_ports {
        members.push(Member {
            vm: p.vm.clone(),
            mac: mac(&p.mac)?,
            ip: opt_ip("port address", &p.ip)?,
            location: Location::Local {
                port: p.tap.clone(),
            },
        });
    }
    for r in &req.remote_macs {
        let m = mac(&r.mac)?;
        members.push(Member {
            vm: if r.vm.is_empty() {
                format!("vm-{}", r.mac.replace(':', ""))
            } else {
                r.vm.clone()
            },
            mac: m,
            ip: opt_ip("remote VM address", &r.ip)?,
            location: Location::Remote {
                vtep: ip("remote VTEP", &r.vtep_ip)?,
            },
        });
    }
    let records = req
        .dns_records
        .iter()
        .filter(|r| r.r#type.eq_ignore_ascii_case("A"))
        .map(|r| {
            Ok(DnsRecord {
                name: r.name.clone(),
                ip: ip("DNS A record", &r.value)?,
            })
        })
        .collect::<Result<Vec<_>, AgentError>>()?;
    let rules = req
        .firewall_rules
        .iter()
        .map(|r| {
            Ok(FirewallRule {
                from: peers(&r.from_macs, &r.from_cidrs)?,
                to: peers(&r.to_macs, &r.to_cidrs)?,
                protocol: protocol(&r.protocol)?,
                ports: r
                    .ports
                    .iter()
                    .map(|p| u16::try_from(*p).map_err(|_| invalid("port", &p.to_string())))
                    .collect::<Result<_, _>>()?,
                action: if r.allow { Action::Allow } else { Action::Deny },
            })
        })
        .collect::<Result<Vec<_>, AgentError>>()?;
    let spec = NetworkSpec {
        name: req.name.clone(),
        vni: req.vni,
        local_vtep,
        underlay_mtu,
        remote_vteps: req
            .remote_vteps
            .iter()
            .map(|v| ip("remote VTEP", v))
            .collect::<Result<_, _>>()?,
        subnets,
        members,
        dns: DnsSpec {
            domain: (!req.dns_domain.is_empty()).then(|| req.dns_domain.clone()),
            records,
            upstream: req
                .dns_upstreams
                .iter()
                .map(|u| ip("DNS upstream", u))
                .collect::<Result<_, _>>()?,
        },
        firewall: FirewallSpec {
            default_action: if req.firewall_default_allow {
                Action::Allow
            } else {
                Action::Deny
            },
            rules,
        },
        egress_nat: req.egress_nat,
        routed_peers: Vec::new(),
        exposed: Vec::new(),
        // The node's policy, not the request's: see AgentConfig::with_egress_policy.
        egress_denied: Vec::new(),
        egress_allowed: Vec::new(),
        external: external_l2(req)?,
        gateway: !req.gateway_off,
        broadcast_limit_pps: req.broadcast_limit_pps,
    };
    spec.validate().map_err(AgentError::from)?;
    Ok(spec)
}

/// A store import source, or why this agent cannot import from it.
pub fn import_source(src: &pb::DiskSource) -> Result<ImportSource, AgentError> {
    use pb::disk_source::Kind;
    match &src.kind {
        Some(Kind::HttpUrl(url)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid("disk URL (http or https)", url));
            }
            // The staged file's name only labels messages; keep it tame.
            let last = url
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .rsplit('/')
                .next()
                .unwrap_or_default();
            let entry: String = last
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                .take(100)
                .collect();
            let entry = if entry.is_empty() || entry.starts_with('.') {
                "disk".to_string()
            } else {
                entry
            };
            Ok(ImportSource::Http {
                url: url.clone(),
                entry,
                ca_pem: None,
            })
        }
        // The CRD refuses pvc sources (no importer mounts claims); an old object
        // created before that rule is a permanent error, not a retry.
        Some(Kind::Pvc(_)) => Err(AgentError::Invalid(
            "pvc sources are not supported by this hvx version: use http, ova, upload or clone"
                .into(),
        )),
        Some(Kind::Ova(o)) => {
            if !(o.url.starts_with("http://") || o.url.starts_with("https://")) {
                return Err(AgentError::Invalid(format!(
                    "an ova source needs an http or https url, not {:?} (an OVA on your machine is imported with `kubectl hvx import --upload`)",
                    o.url
                )));
            }
            // A plain name, as the OVF's References list it: "../x" or "a/b" can
            // never select a member.
            hvx_storage::format::check_plain_name(&o.member)
                .map_err(|e| AgentError::Invalid(format!("OVA member: {e}")))?;
            Ok(ImportSource::HttpOvaMember {
                url: o.url.clone(),
                member: o.member.clone(),
                ca_pem: None,
            })
        }
        // The operator imports a clone as the disk it clones (same source, same base):
        // a clone request never reaches an agent from it.
        Some(Kind::CloneOf(d)) => Err(AgentError::Invalid(format!(
            "clone of {d}: the operator imports clones as the disk they clone"
        ))),
        // Blank disks have no bytes to import: `disks::prepare` makes them from the
        // store's empty base without calling this.
        Some(Kind::BlankBytes(_)) => Err(AgentError::Invalid(
            "a blank disk has no import source".into(),
        )),
        // Uploads are imported from the node's own upload store (`disks::prepare`).
        Some(Kind::Upload(_)) => Err(AgentError::Invalid(
            "an upload is imported from the node's upload store, not through this translation"
                .into(),
        )),
        None => Err(AgentError::Invalid("the disk has no source".into())),
    }
}

/// dnsmasq's lease file: `<expiry> <mac> <ip> <hostname|*> <client-id|*>` per line.
pub fn parse_leases(text: &str) -> Vec<pb::Lease> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let expires: i64 = f.next()?.parse().ok()?;
            let mac = f.next()?.to_ascii_lowercase();
            let ip = f.next()?.parse::<Ipv4Addr>().ok()?.to_string();
            let host = f.next().filter(|h| *h != "*").unwrap_or_default();
            Some(pb::Lease {
                mac,
                ip,
                hostname: host.to_string(),
                expires_unix: expires,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> pb::EnsureNetworkRequest {
        pb::EnsureNetworkRequest {
            network_uid: "n-1".into(),
            namespace: "ns".into(),
            name: "app-net".into(),
            vni: 4097,
            subnets: vec![pb::Subnet {
                cidr: "10.77.0.0/24".into(),
                gateway: "10.77.0.1".into(),
                dhcp: true,
                range_start: "10.77.0.100".into(),
                range_end: "10.77.0.132".into(),
                lease_seconds: 0,
            }],
            reservations: vec![pb::DhcpReservation {
                mac: "00:50:56:a1:00:02".into(),
                ip: "10.77.0.20".into(),
                hostname: "db".into(),
            }],
            firewall_default_allow: true,
            firewall_rules: vec![pb::FirewallRule {
                name: "r".into(),
                allow: false,
                to_macs: vec!["00:50:56:a1:00:02".into()],
                from_cidrs: vec!["10.77.0.128/25".into()],
                protocol: "tcp".into(),
                ports: vec![5432],
                ..Default::default()
            }],
            remote_vteps: vec!["172.31.250.12".into()],
            remote_macs: vec![pb::RemoteMac {
                mac: "00:50:56:a1:00:01".into(),
                vtep_ip: "172.31.250.12".into(),
                vm: "web".into(),
                ip: String::new(),
            }],
            local_ports: vec![pb::LocalPort {
                vm: "db".into(),
                nic: "ethernet0".into(),
                mac: "00:50:56:a1:00:02".into(),
                tap: "hvt0123456789ab".into(),
                ip: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn network_request_becomes_a_switch_spec() {
        let spec = network_spec(&req(), "172.31.250.11".parse().expect("ip"), 1500).expect("valid");
        assert_eq!(spec.vni, 4097);
        assert_eq!(spec.members.len(), 2);
        assert_eq!(
            spec.members[0].location,
            Location::Local {
                port: "hvt0123456789ab".into()
            }
        );
        assert_eq!(spec.members[1].vm, "web");
        let dhcp = spec.subnets[0].dhcp.as_ref().expect("dhcp");
        assert_eq!(dhcp.lease_secs, 3600, "0 means the default lease");
        assert_eq!(spec.subnets[0].reservations.len(), 1);
        assert!(matches!(spec.firewall.rules[0].to, Peers::Macs(ref m) if m.len() == 1));
        assert!(matches!(spec.firewall.rules[0].from, Peers::Cidrs(_)));
        assert_eq!(spec.firewall.rules[0].action, Action::Deny);
    }

    #[test]
    fn the_outside_segment_and_the_gateway_switch_reach_the_spec() {
        let ip = "172.31.250.11".parse().expect("ip");
        let spec = network_spec(&req(), ip, 1500).expect("valid");
        assert_eq!((spec.external, spec.gateway), (None, true));
        let mut r = req();
        r.uplink_interface = "eth1".into();
        r.uplink_vlan = 30;
        r.broadcast_limit_pps = 500;
        let spec = network_spec(&r, ip, 1500).expect("valid");
        assert_eq!(
            spec.external,
            Some(ExternalL2::Uplink {
                interface: "eth1".into(),
                vlan: Some(30)
            })
        );
        assert_eq!(spec.broadcast_limit_pps, 500);
        let mut r = req();
        r.external_vtep = "192.0.2.9".into();
        r.external_vni = 5000;
        let spec = network_spec(&r, ip, 1500).expect("valid");
        assert_eq!(
            spec.external,
            Some(ExternalL2::Vtep {
                address: "192.0.2.9".parse().expect("ip"),
                port: 4789,
                vni: 5000
            })
        );
        r.uplink_interface = "eth1".into();
        let e = network_spec(&r, ip, 1500).expect_err("both");
        assert!(e.to_string().contains("not both"), "{e}");
        let mut r = req();
        r.uplink_interface = "eth1".into();
        r.uplink_vlan = 4095;
        assert!(network_spec(&r, ip, 1500).is_err());
        // hvx DHCP without the hvx gateway is refused with the reason.
        let mut r = req();
        r.gateway_off = true;
        let e = network_spec(&r, ip, 1500).expect_err("dhcp without gateway");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        r.subnets[0].dhcp = false;
        let spec = network_spec(&r, ip, 1500).expect("valid");
        assert!(!spec.gateway && spec.subnets[0].dhcp.is_none());
    }

    #[test]
    fn bad_values_are_invalid_argument() {
        let mut r = req();
        r.local_ports[0].mac = "not-a-mac".into();
        let e = network_spec(&r, "172.31.250.11".parse().expect("ip"), 1500).expect_err("bad");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let mut r = req();
        r.firewall_rules[0].ports = vec![70000];
        assert!(network_spec(&r, "172.31.250.11".parse().expect("ip"), 1500).is_err());
    }

    #[test]
    fn sources_map_or_say_why_not() {
        use pb::disk_source::Kind;
        let src = |k| pb::DiskSource { kind: Some(k) };
        match import_source(&src(Kind::HttpUrl(
            "http://h:8080/a/sample-guest-stream.vmdk?x=1".into(),
        )))
        .expect("http")
        {
            ImportSource::Http { entry, .. } => assert_eq!(entry, "sample-guest-stream.vmdk"),
            other => panic!("{other:?}"),
        }
        match import_source(&src(Kind::HttpUrl("http://h/../..".into()))).expect("http") {
            ImportSource::Http { entry, .. } => assert_eq!(entry, "disk", "no dot names"),
            other => panic!("{other:?}"),
        }
        let e = import_source(&src(Kind::HttpUrl("file:///etc/shadow".into()))).expect_err("no");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        // Blank disks never reach the import path (`disks::prepare` makes them).
        let e = import_source(&src(Kind::BlankBytes(1))).expect_err("no source");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let ova = |url: &str, member: &str| {
            import_source(&src(Kind::Ova(pb::OvaMember {
                url: url.into(),
                member: member.into(),
            })))
        };
        assert_eq!(
            ova("http://h/app.ova", "disk1.vmdk").expect("ova"),
            ImportSource::HttpOvaMember {
                url: "http://h/app.ova".into(),
                member: "disk1.vmdk".into(),
                ca_pem: None
            }
        );
        for (url, member) in [
            ("", "disk1.vmdk"),
            ("file:///x.ova", "disk1.vmdk"),
            ("http://h/app.ova", "../disk1.vmdk"),
            ("http://h/app.ova", "a/disk1.vmdk"),
            ("http://h/app.ova", ".."),
        ] {
            let e = ova(url, member).expect_err("refused");
            assert_eq!(
                e.code(),
                tonic::Code::InvalidArgument,
                "{url} {member}: {e}"
            );
        }
        let e = import_source(&src(Kind::Pvc(pb::PvcPath {
            mount: "c".into(),
            path: "d.vmdk".into(),
        })))
        .expect_err("pvc");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn leases_parse_and_skip_garbage() {
        let l = parse_leases(
            "1700000000 00:50:56:A1:00:01 10.77.0.101 web 01:00:50:56:a1:00:01\ngarbage\n1700000001 00:50:56:a1:00:02 10.77.0.20 * *\n",
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].mac, "00:50:56:a1:00:01");
        assert_eq!(l[0].hostname, "web");
        assert_eq!(l[1].hostname, "");
    }
}
