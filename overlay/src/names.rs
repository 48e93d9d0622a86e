//! Deterministic names of every kernel object the switch owns. Restart recovery and
//! cleanup find state by these names alone, so they must never change meaning.

use crate::addr::Mac;

/// Every link the switch creates starts with this and a kind letter.
pub const OWNED_PREFIX: &str = "hv";
/// UDP port of the VXLAN tunnels (IANA).
pub const VXLAN_PORT: u16 = 4789;

/// Per-network bridge, e.g. `hvb4242` (at most 11 bytes for a 24-bit VNI).
pub fn bridge(vni: u32) -> String {
    format!("hvb{vni}")
}

/// Per-network VXLAN device, enslaved to the bridge.
pub fn vxlan(vni: u32) -> String {
    format!("hvv{vni}")
}

/// The node side of the veth pair joining the network's gateway namespace to its
/// bridge (a bridge port like a VM's).
pub fn gateway_veth(vni: u32) -> String {
    format!("hvg{vni}")
}

/// The node side of the transit veth pair: egress and published ports leave and
/// enter the gateway namespace through it.
pub fn transit_veth(vni: u32) -> String {
    format!("hvu{vni}")
}

/// The 802.1Q sub-interface of a network's uplink (`ExternalL2::Uplink` with a VLAN),
/// created and deleted by the switch.
pub fn vlan_uplink(vni: u32) -> String {
    format!("hvl{vni}")
}

/// The VXLAN device towards an external VTEP (`ExternalL2::Vtep`).
pub fn external_vxlan(vni: u32) -> String {
    format!("hve{vni}")
}

/// Inside the gateway namespace: the gateway's interface on the network (peer of
/// [`gateway_veth`]), holding the gateway addresses and the anycast gateway MAC.
pub const NS_GATEWAY_IF: &str = "gw0";
/// Inside the gateway namespace: the transit interface (peer of [`transit_veth`]).
pub const NS_UPLINK_IF: &str = "up0";

/// Inside the gateway namespace: the veth to a routed peer network's namespace.
pub fn peer_link(peer_vni: u32) -> String {
    format!("rp{peer_vni}")
}

/// Names of the per-network gateway namespaces on a node: `hvx-n-<vni>`.
pub const GATEWAY_NETNS_PREFIX: &str = "hvx-n-";

/// The gateway namespace of network `vni`; `prefix` is [`GATEWAY_NETNS_PREFIX`] on a
/// real node (tests running several "nodes" on one machine use one per node).
pub fn gateway_netns(prefix: &str, vni: u32) -> String {
    format!("{prefix}{vni}")
}

/// The VNI of a gateway namespace name made by [`gateway_netns`] with `prefix`.
pub fn parse_gateway_netns(prefix: &str, name: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

/// nftables `ip` table inside the gateway namespace: the gateway's input filter,
/// the router, egress NAT and the inner half of published ports.
pub fn gw_table(vni: u32) -> String {
    format!("hvx_gw_{vni}")
}

/// nftables `bridge` table holding gateway isolation, MSS clamp and micro-segmentation.
pub fn fw_table(vni: u32) -> String {
    format!("hvx_fw_{vni}")
}

/// nftables `ip` table holding the router's forward policy, egress NAT and port DNAT.
pub fn rt_table(vni: u32) -> String {
    format!("hvx_rt_{vni}")
}

/// The bridge's own MAC, fixed so it never follows its ports, and never the gateway
/// MAC: the bridge must forward frames for the gateway to its veth instead of taking
/// them itself. Locally administered `02:68:62` + the 24-bit VNI.
pub fn bridge_mac(vni: u32) -> Mac {
    let b = vni.to_be_bytes();
    Mac([0x02, 0x68, 0x62, b[1], b[2], b[3]])
}

/// The conntrack zone of the network's bridged frames in the node namespace. With
/// br_netfilter (a kubeadm prerequisite) bridged IPv4 passes the node's conntrack;
/// networks sharing a subnet would otherwise share entries for twin flows (same
/// addresses and ports). 16 bits: two networks of one node collide only when their
/// VNIs are equal modulo 65535.
pub fn conntrack_zone(vni: u32) -> u16 {
    // Zone 0 is the node's own; 1..=65535.
    (vni % 65535 + 1) as u16
}

/// The distributed gateway's MAC: the same on every node (anycast gateway), so a VM
/// keeps a valid ARP entry for its gateway across live migration. Locally
/// administered unicast `02:68:76` ("hv") + the 24-bit VNI.
pub fn gateway_mac(vni: u32) -> Mac {
    let b = vni.to_be_bytes();
    Mac([0x02, 0x68, 0x76, b[1], b[2], b[3]])
}

/// Which owned object a link name denotes, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnedLink {
    Bridge(u32),
    Vxlan(u32),
    GatewayVeth(u32),
    TransitVeth(u32),
    VlanUplink(u32),
    ExternalVxlan(u32),
}

/// Parses `hvb<vni>` / `hvv<vni>` / `hvg<vni>` / `hvu<vni>`; anything else (including VM ports) is not ours.
pub fn parse_owned_link(name: &str) -> Option<OwnedLink> {
    let (kind, digits) = (name.get(..3)?, name.get(3..)?);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    let vni: u32 = digits.parse().ok()?;
    match kind {
        "hvb" => Some(OwnedLink::Bridge(vni)),
        "hvv" => Some(OwnedLink::Vxlan(vni)),
        "hvg" => Some(OwnedLink::GatewayVeth(vni)),
        "hvu" => Some(OwnedLink::TransitVeth(vni)),
        "hvl" => Some(OwnedLink::VlanUplink(vni)),
        "hve" => Some(OwnedLink::ExternalVxlan(vni)),
        _ => None,
    }
}

/// Parses `hvx_fw_<vni>` / `hvx_rt_<vni>` (node tables) into the VNI.
pub fn parse_owned_table(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("hvx_fw_")
        .or_else(|| name.strip_prefix("hvx_rt_"))?;
    rest.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_round_trip() {
        let vni = crate::spec::MAX_VNI;
        for name in [
            bridge(vni),
            vxlan(vni),
            gateway_veth(vni),
            transit_veth(vni),
            vlan_uplink(vni),
            external_vxlan(vni),
        ] {
            assert!(name.len() <= 15, "{name}");
        }
        assert_eq!(
            parse_owned_link(&vlan_uplink(5)),
            Some(OwnedLink::VlanUplink(5))
        );
        assert_eq!(
            parse_owned_link(&external_vxlan(5)),
            Some(OwnedLink::ExternalVxlan(5))
        );
        assert!(peer_link(vni).len() <= 15);
        assert_eq!(
            parse_owned_link(&gateway_veth(5)),
            Some(OwnedLink::GatewayVeth(5))
        );
        assert_eq!(
            parse_owned_link(&transit_veth(5)),
            Some(OwnedLink::TransitVeth(5))
        );
        // VM taps (`hvt` + 12 hex) are never taken for the switch's own links.
        assert_eq!(parse_owned_link("hvt0123456789ab"), None);
        assert_eq!(gateway_netns(GATEWAY_NETNS_PREFIX, 42), "hvx-n-42");
        assert_eq!(
            parse_gateway_netns(GATEWAY_NETNS_PREFIX, "hvx-n-42"),
            Some(42)
        );
        for other in [
            "hvx-n-",
            "hvx-n-042",
            "hvx-n-4x",
            "hvx-node-1",
            "hvx-n-42-x",
        ] {
            assert_eq!(
                parse_gateway_netns(GATEWAY_NETNS_PREFIX, other),
                None,
                "{other}"
            );
        }
        assert_ne!(bridge_mac(7), gateway_mac(7));
        assert_eq!(conntrack_zone(65534), 65535);
        assert_eq!(conntrack_zone(65535), 1, "never zone 0");
        assert_ne!(conntrack_zone(4096), conntrack_zone(4097));
        assert_eq!(parse_owned_link(&bridge(42)), Some(OwnedLink::Bridge(42)));
        assert_eq!(parse_owned_link(&vxlan(7)), Some(OwnedLink::Vxlan(7)));
        for other in ["hvb", "hvbx1", "hvb01", "eth0", "hvp1", "h"] {
            assert_eq!(parse_owned_link(other), None, "{other}");
        }
        assert_eq!(parse_owned_table(&fw_table(9)), Some(9));
        assert_eq!(parse_owned_table("filter"), None);
        assert_eq!(gateway_mac(0x010203).to_string(), "02:68:76:01:02:03");
    }
}
