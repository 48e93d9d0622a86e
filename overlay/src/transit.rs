//! Transit addresses: the point-to-point /31 between the node and one network's
//! gateway namespace, through which egress NAT, upstream DNS and published ports
//! pass. Networks may share subnets, so the node cannot route to them; it routes
//! to the namespace's transit address instead, which is unique per node.
//!
//! The pairs come from [`TRANSIT_RANGE`] (inside 169.254.0.0/16, which egress NAT
//! never reaches, and away from 169.254.169.254, the clouds' metadata address).
//! A network prefers the slot `vni % TRANSIT_SLOTS` and takes the next free one
//! when another network holds it; the slot in use is read back from the node side
//! of the pair (`hvu<vni>`), so a restarted agent keeps every pair as it was.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::addr::Ipv4Net;

/// 169.254.64.0/18: 8192 /31 pairs per node.
pub const TRANSIT_RANGE: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(169, 254, 64, 0),
    prefix: 18,
};
/// How many /31 pairs [`TRANSIT_RANGE`] holds.
pub const TRANSIT_SLOTS: u32 = 1 << (32 - 18 - 1);

/// One network's transit pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TransitPair {
    pub slot: u32,
    /// On `hvu<vni>` in the node namespace: the namespace's default gateway.
    pub node: Ipv4Addr,
    /// On `up0` in the gateway namespace: what the node routes and DNATs to.
    pub gateway: Ipv4Addr,
}

impl TransitPair {
    /// The pair of `slot` (taken modulo [`TRANSIT_SLOTS`]).
    pub fn of_slot(slot: u32) -> TransitPair {
        let slot = slot % TRANSIT_SLOTS;
        let base = u32::from(TRANSIT_RANGE.addr) + 2 * slot;
        TransitPair {
            slot,
            node: Ipv4Addr::from(base),
            gateway: Ipv4Addr::from(base + 1),
        }
    }

    pub fn node_net(&self) -> Ipv4Net {
        Ipv4Net {
            addr: self.node,
            prefix: 31,
        }
    }

    pub fn gateway_net(&self) -> Ipv4Net {
        Ipv4Net {
            addr: self.gateway,
            prefix: 31,
        }
    }
}

/// The slot whose node-side address is `addr`, if it is one.
pub fn slot_of_node_address(addr: Ipv4Addr) -> Option<u32> {
    if !TRANSIT_RANGE.contains(addr) {
        return None;
    }
    let offset = u32::from(addr) - u32::from(TRANSIT_RANGE.addr);
    (offset % 2 == 0).then_some(offset / 2)
}

/// Picks network `vni`'s slot: the one it holds (`current`) if no other network
/// holds it too, else the first free slot from `vni % TRANSIT_SLOTS` on. `taken` are
/// the slots of the node's other networks. None when every slot is taken.
pub fn allocate(vni: u32, current: Option<u32>, taken: &BTreeSet<u32>) -> Option<u32> {
    if let Some(c) = current.filter(|c| *c < TRANSIT_SLOTS && !taken.contains(c)) {
        return Some(c);
    }
    let preferred = vni % TRANSIT_SLOTS;
    (0..TRANSIT_SLOTS)
        .map(|i| (preferred + i) % TRANSIT_SLOTS)
        .find(|s| !taken.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{LINK_LOCAL, MAX_VNI};

    #[test]
    fn pairs_are_distinct_31s_inside_link_local_and_away_from_metadata() {
        let metadata: Ipv4Addr = "169.254.169.254".parse().unwrap();
        for slot in [0, 1, 4095, TRANSIT_SLOTS - 1] {
            let p = TransitPair::of_slot(slot);
            assert!(LINK_LOCAL.contains(p.node) && LINK_LOCAL.contains(p.gateway));
            assert!(p.node_net().contains(p.gateway), "one /31: {p:?}");
            assert_ne!(p.node, metadata);
            assert_ne!(p.gateway, metadata);
            assert_eq!(slot_of_node_address(p.node), Some(slot));
            assert_eq!(slot_of_node_address(p.gateway), None);
        }
        assert_eq!(
            TransitPair::of_slot(0).node.to_string(),
            "169.254.64.0",
            "first pair"
        );
        assert_eq!(
            TransitPair::of_slot(TRANSIT_SLOTS - 1).gateway.to_string(),
            "169.254.127.255"
        );
        assert_eq!(slot_of_node_address(metadata), None);
    }

    #[test]
    fn many_vnis_on_one_node_never_share_a_pair() {
        // VNIs that all prefer the same few slots, plus a spread of ordinary ones.
        let mut vnis: Vec<u32> = (0..2000).map(|i| 7 + i * TRANSIT_SLOTS).collect();
        vnis.extend((1..=3000).map(|i| i * 5581 % MAX_VNI + 1));
        vnis.sort_unstable();
        vnis.dedup();
        let mut taken = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for vni in &vnis {
            let slot = allocate(*vni, None, &taken).expect("a free slot");
            assert!(taken.insert(slot), "slot {slot} given twice");
            let p = TransitPair::of_slot(slot);
            assert!(addrs.insert(p.node) && addrs.insert(p.gateway));
        }
        assert_eq!(taken.len(), vnis.len());
    }

    #[test]
    fn a_held_slot_is_kept_and_a_full_node_is_refused() {
        let taken: BTreeSet<u32> = [5, 6].into();
        // A restarted agent reads slot 9 back from hvu<vni>: it stays.
        assert_eq!(allocate(5, Some(9), &taken), Some(9));
        // Preferred slot 5 is taken: the next free one.
        assert_eq!(allocate(5, None, &taken), Some(7));
        // Held slot claimed by another network too (a broken node): moves on.
        assert_eq!(allocate(5, Some(6), &taken), Some(7));
        let full: BTreeSet<u32> = (0..TRANSIT_SLOTS).collect();
        assert_eq!(allocate(1, None, &full), None);
    }
}
