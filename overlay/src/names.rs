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

/// nftables `bridge` table holding gateway isolation, MSS clamp and micro-segmentation.
pub fn fw_table(vni: u32) -> String {
    format!("hvx_fw_{vni}")
}

/// nftables `ip` table holding the router's forward policy, egress NAT and port DNAT.
pub fn rt_table(vni: u32) -> String {
    format!("hvx_rt_{vni}")
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
}

/// Parses `hvb<vni>` / `hvv<vni>`; anything else (including VM ports) is not ours.
pub fn parse_owned_link(name: &str) -> Option<OwnedLink> {
    let (kind, digits) = (name.get(..3)?, name.get(3..)?);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    let vni: u32 = digits.parse().ok()?;
    match kind {
        "hvb" => Some(OwnedLink::Bridge(vni)),
        "hvv" => Some(OwnedLink::Vxlan(vni)),
        _ => None,
    }
}

/// Parses `hvx_fw_<vni>` / `hvx_rt_<vni>` into the VNI.
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
        assert!(bridge(vni).len() <= 15 && vxlan(vni).len() <= 15);
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
