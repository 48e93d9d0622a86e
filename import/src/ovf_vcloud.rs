//! vCloud Director's sections in an OVF: the vApp networks' IP settings
//! (`NetworkConfigSection`) and each VM's NIC connections
//! (`NetworkConnectionSection`, with static addresses). Matched by local name like
//! the rest of the parser, so the vCloud namespace version does not matter.

use crate::model::NetworkConfig;
use crate::ovf::{attr, child, child_text, children};
use roxmltree::Node;
use std::net::Ipv4Addr;

/// Every `NetworkConfigSection/NetworkConfig` of the envelope, first one per name.
pub(crate) fn network_configs(root: Node, warnings: &mut Vec<String>) -> Vec<NetworkConfig> {
    let mut out: Vec<NetworkConfig> = Vec::new();
    for section in root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "NetworkConfigSection")
    {
        for config in children(section, "NetworkConfig") {
            let Some(name) = attr(config, "networkName").map(str::trim) else {
                continue;
            };
            if name.is_empty() || out.iter().any(|c| c.name == name) {
                continue;
            }
            out.push(network_config(name, config, warnings));
        }
    }
    out
}

fn network_config(name: &str, config: Node, warnings: &mut Vec<String>) -> NetworkConfig {
    let mut nc = NetworkConfig {
        name: name.to_owned(),
        ..NetworkConfig::default()
    };
    let Some(conf) = child(config, "Configuration") else {
        return nc;
    };
    let scope = child(conf, "IpScopes")
        .and_then(|s| child(s, "IpScope"))
        .or_else(|| child(conf, "IpScope"));
    if let Some(scope) = scope {
        let gateway = ip_text(scope, "Gateway");
        let prefix = child_text(scope, "SubnetPrefixLength")
            .and_then(|p| p.parse::<u32>().ok())
            .or_else(|| ip_text(scope, "Netmask").and_then(prefix_of));
        if let (Some(gw), Some(prefix)) = (gateway, prefix)
            && (1..=32).contains(&prefix)
        {
            let mask = u32::MAX << (32 - prefix);
            nc.cidr = Some(format!("{}/{prefix}", Ipv4Addr::from(u32::from(gw) & mask)));
        } else if gateway.is_some() || prefix.is_some() {
            warnings.push(format!(
                "network {name:?}: its IP scope has no usable gateway and netmask; the subnet is not taken from it"
            ));
        }
        nc.gateway = gateway.map(|g| g.to_string());
        nc.dns_suffix = child_text(scope, "DnsSuffix")
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        nc.dns_servers = ["Dns1", "Dns2"]
            .iter()
            .filter_map(|k| ip_text(scope, k))
            .map(|i| i.to_string())
            .collect();
        if let Some(ranges) = child(scope, "IpRanges") {
            nc.static_ranges = children(ranges, "IpRange").filter_map(range).collect();
        }
    }
    let fence = child_text(conf, "FenceMode").unwrap_or("isolated");
    if !fence.eq_ignore_ascii_case("isolated") {
        warnings.push(format!(
            "network {name:?}: vCloud fence mode {fence} (connected to an outside network) is not carried; the VirtualNetwork is isolated (set external.egressNat for outbound access)"
        ));
    }
    if let Some(features) = child(conf, "Features") {
        for feature in features.children().filter(Node::is_element) {
            let enabled = child_text(feature, "IsEnabled").is_none_or(|e| e == "true");
            match feature.tag_name().name() {
                "DhcpService" if enabled => {
                    nc.dhcp_range = range(feature)
                        .or_else(|| child(feature, "IpRange").and_then(range));
                    nc.dhcp_lease_seconds = child_text(feature, "DefaultLeaseTime")
                        .and_then(|t| t.parse().ok());
                }
                "DhcpService" => {}
                other if enabled => warnings.push(format!(
                    "network {name:?}: vCloud {other} is not carried; configure the VirtualNetwork's firewall/external settings by hand"
                )),
                _ => {}
            }
        }
    }
    nc
}

fn ip_text(node: Node, name: &str) -> Option<Ipv4Addr> {
    child_text(node, name).and_then(|t| t.parse().ok())
}

fn range(node: Node) -> Option<(String, String)> {
    let start = ip_text(node, "StartAddress")?;
    let end = ip_text(node, "EndAddress")?;
    Some((start.to_string(), end.to_string()))
}

fn prefix_of(mask: Ipv4Addr) -> Option<u32> {
    let m = u32::from(mask);
    (m.leading_ones() + m.trailing_zeros() == 32).then(|| m.leading_ones())
}

/// One `NetworkConnectionSection/NetworkConnection` of a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Connection {
    /// `NetworkConnectionIndex`: the NIC's adapter number (its `AddressOnParent`).
    pub(crate) index: u32,
    /// Network name.
    pub(crate) network: String,
    /// Static address (MANUAL or POOL allocation).
    pub(crate) ip: Option<String>,
    /// Allocation mode (`DHCP`, `POOL`, `MANUAL`, `NONE`).
    pub(crate) mode: String,
}

/// A VM's vCloud NIC connections, by adapter number.
pub(crate) fn connections(system: Node) -> Vec<Connection> {
    let Some(section) = child(system, "NetworkConnectionSection") else {
        return Vec::new();
    };
    children(section, "NetworkConnection")
        .filter_map(|c| {
            let index = child_text(c, "NetworkConnectionIndex")?.parse().ok()?;
            let mode = child_text(c, "IpAddressAllocationMode")
                .unwrap_or("DHCP")
                .to_ascii_uppercase();
            let ip = ip_text(c, "IpAddress")
                .map(|i| i.to_string())
                .filter(|_| mode == "MANUAL" || mode == "POOL");
            Some(Connection {
                index,
                network: attr(c, "network").unwrap_or_default().trim().to_owned(),
                ip,
                mode,
            })
        })
        .collect()
}

/// The static address vCloud writes on a NIC item's `rasd:Connection`
/// (`vcloud:ipAddressingMode`, `vcloud:ipAddress`), for exports without a
/// NetworkConnectionSection.
pub(crate) fn connection_attr_ip(item: Node) -> Option<String> {
    let connection = child(item, "Connection")?;
    let mode = attr(connection, "ipAddressingMode")?
        .trim()
        .to_ascii_uppercase();
    if mode != "MANUAL" && mode != "POOL" {
        return None;
    }
    let ip: Ipv4Addr = attr(connection, "ipAddress")?.trim().parse().ok()?;
    Some(ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_addresses_on_the_connection_element() {
        let xml = r#"<Item xmlns:v="v"><Connection v:ipAddressingMode="POOL" v:ipAddress="10.0.0.7">n</Connection></Item>"#;
        let doc = roxmltree::Document::parse(xml).expect("xml");
        assert_eq!(
            connection_attr_ip(doc.root_element()).as_deref(),
            Some("10.0.0.7")
        );
        let dhcp = r#"<Item xmlns:v="v"><Connection v:ipAddressingMode="DHCP" v:ipAddress="10.0.0.7">n</Connection></Item>"#;
        let doc = roxmltree::Document::parse(dhcp).expect("xml");
        assert_eq!(connection_attr_ip(doc.root_element()), None);
        let junk = r#"<Item xmlns:v="v"><Connection v:ipAddressingMode="MANUAL" v:ipAddress="10.0.0">n</Connection></Item>"#;
        let doc = roxmltree::Document::parse(junk).expect("xml");
        assert_eq!(connection_attr_ip(doc.root_element()), None);
    }

    #[test]
    fn netmasks_become_prefixes() {
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 252, 0)), Some(22));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
