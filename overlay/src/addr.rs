//! Small address types: MAC addresses and IPv4 prefixes, parsed strictly.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::OverlayError;

/// An Ethernet MAC address, always printed lower-case `aa:bb:cc:dd:ee:ff` (the form
/// `bridge -j fdb` prints, so kernel state compares by string equality).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zero MAC: the VXLAN FDB key meaning "broadcast, multicast and unknown
    /// unicast go here" (one entry per remote VTEP = head-end replication).
    pub const ZERO: Mac = Mac([0; 6]);

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for Mac {
    type Err = OverlayError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || OverlayError::InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl TryFrom<String> for Mac {
    type Error = OverlayError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

/// An IPv4 prefix `addr/len`. The address keeps its host bits (a gateway can be
/// written `10.0.0.1/24`); [`Ipv4Net::network`] gives the masked form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }
    pub fn network(&self) -> Ipv4Net {
        Ipv4Net {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
    /// Whether the two prefixes share an address (one contains the other's network).
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        let shorter = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        let longer = if self.prefix <= other.prefix {
            other
        } else {
            self
        };
        shorter.contains(longer.addr)
    }
}

impl FromStr for Ipv4Net {
    type Err = OverlayError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || OverlayError::InvalidCidr(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = OverlayError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Net> for String {
    fn from(n: Ipv4Net) -> String {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap_when_one_holds_the_others_network() {
        let n = |s: &str| s.parse::<Ipv4Net>().unwrap();
        assert!(n("10.77.0.0/24").overlaps(&n("10.77.0.128/25")));
        assert!(n("10.77.0.128/25").overlaps(&n("10.77.0.0/16")));
        assert!(n("10.77.0.1/24").overlaps(&n("10.77.0.0/24")));
        assert!(!n("10.77.0.0/24").overlaps(&n("10.77.1.0/24")));
        assert!(!n("10.77.0.0/25").overlaps(&n("10.77.0.128/25")));
    }

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let m: Mac = "00:50:56:AB:cd:0F".parse().unwrap();
        assert_eq!(m.to_string(), "00:50:56:ab:cd:0f");
        for bad in [
            "",
            "00:50:56",
            "00:50:56:ab:cd:0f:11",
            "zz:50:56:ab:cd:0f",
            "0:50:56:ab:cd:0f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!("01:00:5e:00:00:01".parse::<Mac>().unwrap().is_multicast());
    }

    #[test]
    fn cidr_parses_and_contains() {
        let n: Ipv4Net = "10.1.2.1/24".parse().unwrap();
        assert_eq!(n.network().to_string(), "10.1.2.0/24");
        assert_eq!(n.netmask().to_string(), "255.255.255.0");
        assert!(n.contains("10.1.2.200".parse().unwrap()));
        assert!(!n.contains("10.1.3.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0".parse::<Ipv4Net>().is_err());
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }
}
