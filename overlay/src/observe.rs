//! Reading what the kernel has, from the JSON of `ip`, `bridge` and `nft`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::addr::{Ipv4Net, Mac};
use crate::error::Result;
use crate::host::{Host, run_json};
use crate::plan::{BridgeFdb, VxlanFdb};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanParams {
    pub id: u32,
    pub local: Option<Ipv4Addr>,
    pub port: u16,
    pub learning: bool,
    /// Default destination (`remote`), set only on the external VTEP's device.
    pub remote: Option<Ipv4Addr>,
}

#[derive(Debug, Clone)]
pub struct LinkState {
    pub name: String,
    pub kind: Option<String>,
    pub mtu: u32,
    pub mac: Option<String>,
    pub master: Option<String>,
    pub up: bool,
    /// IPv6 link-local generation turned off (`addrgenmode none`).
    pub addrgen_none: bool,
    pub vxlan: Option<VxlanParams>,
    /// A VLAN sub-interface's tag.
    pub vlan_id: Option<u32>,
    /// The lower device of a stacked link (a VLAN's parent).
    pub parent: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JLink {
    ifname: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    linkinfo: Option<JLinkInfo>,
    #[serde(default)]
    inet6_addr_gen_mode: Option<String>,
    #[serde(default)]
    link: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JLinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
    #[serde(default)]
    info_data: Option<JVxlan>,
}

#[derive(Debug, Deserialize)]
struct JVxlan {
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    local: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    learning: Option<bool>,
    #[serde(default)]
    remote: Option<String>,
}

pub fn links(host: &Host) -> Result<Vec<LinkState>> {
    let raw: Vec<JLink> = run_json(&host.ip_argv(&["-j", "-d", "link", "show"]))?;
    Ok(raw.into_iter().map(link_state).collect())
}

fn link_state(l: JLink) -> LinkState {
    let kind = l.linkinfo.as_ref().and_then(|i| i.info_kind.clone());
    let mut vlan_id = None;
    let vxlan = match (&kind, l.linkinfo.and_then(|i| i.info_data)) {
        (Some(k), Some(d)) if k == "vxlan" => Some(VxlanParams {
            id: d.id.unwrap_or(0),
            local: d.local.and_then(|s| s.parse().ok()),
            port: d.port.unwrap_or(0),
            learning: d.learning.unwrap_or(true),
            remote: d.remote.and_then(|s| s.parse().ok()),
        }),
        (Some(k), Some(d)) if k == "vlan" => {
            vlan_id = d.id;
            None
        }
        _ => None,
    };
    LinkState {
        up: l.flags.iter().any(|f| f == "UP"),
        addrgen_none: l.inet6_addr_gen_mode.as_deref() == Some("none"),
        name: l.ifname,
        kind,
        mtu: l.mtu,
        mac: l.address,
        master: l.master,
        vxlan,
        vlan_id,
        parent: l.link,
    }
}

#[derive(Debug, Deserialize)]
struct JFdb {
    mac: String,
    #[serde(default)]
    ifname: Option<String>,
    #[serde(default)]
    dst: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    state: Option<String>,
}

/// The VXLAN device's FDB and the bridge's static entries.
#[derive(Debug, Default, Clone)]
pub struct FdbState {
    pub vxlan: BTreeSet<VxlanFdb>,
    pub bridge_static: BTreeSet<BridgeFdb>,
}

pub fn fdb(host: &Host, bridge: &str, vxlan: &str) -> Result<FdbState> {
    let raw: Vec<JFdb> = run_json(&host.bridge_argv(&["-j", "fdb", "show", "br", bridge]))?;
    Ok(parse_fdb(raw, bridge, vxlan))
}

fn parse_fdb(raw: Vec<JFdb>, bridge: &str, vxlan: &str) -> FdbState {
    let mut st = FdbState::default();
    for e in raw {
        let Ok(mac) = e.mac.parse::<Mac>() else {
            continue;
        };
        let port = e.ifname.unwrap_or_default();
        if port == vxlan && e.flags.iter().any(|f| f == "self") {
            if let Some(dst) = e.dst.and_then(|d| d.parse().ok()) {
                st.vxlan.insert(VxlanFdb { mac, dst });
            }
        } else if e.master.as_deref() == Some(bridge) && e.state.as_deref() == Some("static") {
            st.bridge_static.insert(BridgeFdb { mac, port });
        }
    }
    st
}

#[derive(Debug, Deserialize)]
struct JNeigh {
    dst: String,
    #[serde(default)]
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

/// Permanent (control-plane) neighbour entries on the bridge.
pub fn neighbours(host: &Host, bridge: &str) -> Result<BTreeSet<(Ipv4Addr, Mac)>> {
    let raw: Vec<JNeigh> = run_json(&host.ip_argv(&["-j", "-4", "neigh", "show", "dev", bridge]))?;
    Ok(raw
        .into_iter()
        .filter(|n| n.state.iter().any(|s| s == "PERMANENT"))
        .filter_map(|n| Some((n.dst.parse().ok()?, n.lladdr?.parse().ok()?)))
        .collect())
}

#[derive(Debug, Deserialize)]
struct JAddrLink {
    #[serde(default)]
    addr_info: Vec<JAddr>,
}

#[derive(Debug, Deserialize)]
struct JAddr {
    #[serde(default)]
    family: String,
    #[serde(default)]
    local: String,
    #[serde(default)]
    prefixlen: u8,
}

pub fn addresses(host: &Host, dev: &str) -> Result<BTreeSet<Ipv4Net>> {
    let raw: Vec<JAddrLink> = run_json(&host.ip_argv(&["-j", "-4", "addr", "show", "dev", dev]))?;
    Ok(raw
        .into_iter()
        .flat_map(|l| l.addr_info)
        .filter(|a| a.family == "inet")
        .filter_map(|a| {
            Some(Ipv4Net {
                addr: a.local.parse().ok()?,
                prefix: a.prefixlen,
            })
        })
        .collect())
}

#[derive(Debug, Deserialize)]
struct JAddrNamed {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<JAddr>,
}

/// Every link's IPv4 addresses, by link name.
pub fn all_addresses(host: &Host) -> Result<BTreeMap<String, BTreeSet<Ipv4Net>>> {
    let raw: Vec<JAddrNamed> = run_json(&host.ip_argv(&["-j", "-4", "addr", "show"]))?;
    Ok(raw
        .into_iter()
        .map(|l| {
            let nets = l
                .addr_info
                .into_iter()
                .filter(|a| a.family == "inet")
                .filter_map(|a| {
                    Some(Ipv4Net {
                        addr: a.local.parse().ok()?,
                        prefix: a.prefixlen,
                    })
                })
                .collect();
            (l.ifname, nets)
        })
        .collect())
}

/// An IPv4 route of the main table as `ip -j route` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Route {
    /// `default` or a prefix.
    pub dst: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dev: Option<String>,
}

pub fn routes(host: &Host) -> Result<Vec<Route>> {
    run_json(&host.ip_argv(&["-j", "-4", "route", "show"]))
}

#[derive(Debug, Default, Deserialize)]
struct JNft {
    #[serde(default)]
    nftables: Vec<serde_json::Value>,
}

/// A chain as `(family, table, chain)`.
pub type ChainId = (String, String, String);

/// Every chain on the host, used to find our tables and their hash markers.
pub fn nft_chains(host: &Host) -> Result<Vec<ChainId>> {
    let raw: JNft = run_json(&host.exec_argv("nft", &["-j", "list", "chains"]))?;
    Ok(raw
        .nftables
        .iter()
        .filter_map(|v| v.get("chain"))
        .filter_map(|c| {
            Some((
                c.get("family")?.as_str()?.to_string(),
                c.get("table")?.as_str()?.to_string(),
                c.get("name")?.as_str()?.to_string(),
            ))
        })
        .collect())
}

/// Every table on the host as `(family, name)` (tables may have no chains).
pub fn nft_tables(host: &Host) -> Result<Vec<(String, String)>> {
    let raw: JNft = run_json(&host.exec_argv("nft", &["-j", "list", "tables"]))?;
    Ok(raw
        .nftables
        .iter()
        .filter_map(|v| v.get("table"))
        .filter_map(|t| {
            Some((
                t.get("family")?.as_str()?.to_string(),
                t.get("name")?.as_str()?.to_string(),
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bridge_fdb_json() {
        let json = r#"[{"mac":"33:33:00:00:00:01","ifname":"hvb5","flags":["self"],"state":"permanent"},
        {"mac":"02:00:00:00:00:09","ifname":"hvv5","flags":[],"master":"hvb5","state":"static"},
        {"mac":"7e:e1:fb:83:e4:5d","ifname":"hvv5","flags":[],"master":"hvb5","state":"permanent"},
        {"mac":"02:00:00:00:00:09","ifname":"hvv5","dst":"10.9.9.3","flags":["self"],"state":"permanent"},
        {"mac":"00:00:00:00:00:00","ifname":"hvv5","dst":"10.9.9.2","flags":["self"],"state":"permanent"},
        {"mac":"02:00:00:00:00:0a","ifname":"p1","flags":[],"master":"hvb5","state":"static"},
        {"mac":"02:00:00:00:00:0b","ifname":"p1","flags":[],"master":"hvb5"}]"#;
        let raw: Vec<JFdb> = serde_json::from_str(json).unwrap();
        let st = parse_fdb(raw, "hvb5", "hvv5");
        assert_eq!(st.vxlan.len(), 2);
        assert_eq!(
            st.bridge_static.len(),
            2,
            "learned and permanent entries are not ours"
        );
        assert!(st.bridge_static.contains(&BridgeFdb {
            mac: "02:00:00:00:00:0a".parse().unwrap(),
            port: "p1".into()
        }));
    }

    #[test]
    fn parses_routes_json() {
        let json = r#"[{"dst":"default","gateway":"169.254.64.0","dev":"up0","flags":["onlink"]},
          {"dst":"169.254.64.0/31","dev":"up0","protocol":"kernel","scope":"link","prefsrc":"169.254.64.1","flags":[]}]"#;
        let r: Vec<Route> = serde_json::from_str(json).unwrap();
        assert_eq!(r[0].gateway.as_deref(), Some("169.254.64.0"));
        assert_eq!(r[1].dst, "169.254.64.0/31");
    }

    #[test]
    fn parses_vxlan_link_json() {
        let json = r#"{"ifname":"hvv5","flags":["BROADCAST","UP"],"mtu":1500,"master":"hvb5",
          "address":"ba:38:3b:a8:c5:64","inet6_addr_gen_mode":"none",
          "linkinfo":{"info_kind":"vxlan","info_data":{"id":5,"local":"10.9.9.1","port":4789,"learning":false}}}"#;
        let l = link_state(serde_json::from_str(json).unwrap());
        assert!(l.up && l.addrgen_none);
        assert_eq!(
            l.vxlan,
            Some(VxlanParams {
                id: 5,
                local: Some("10.9.9.1".parse().unwrap()),
                port: 4789,
                learning: false,
                remote: None,
            })
        );
    }
}
