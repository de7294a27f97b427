//! Small value types shared by several messages: [`MacAddr`] (a VTEP or inner Ethernet
//! address) and [`IpCidr`] (a pod or site CIDR). They live apart from the codec so the
//! gateway and agent can use them for configuration and indexing without touching the wire.
//!
//! `IpCidr` is canonical by construction: [`IpCidr::new`] and `FromStr` reject a prefix that
//! is too long for the family *and* an address with host bits set ("10.244.1.5/24"), because
//! such input almost always means a typo in an inventory file and silently masking it would
//! route the wrong thing. [`IpCidr::new_truncating`] exists for callers that want masking.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A 48-bit Ethernet address, shown as `02:fa:00:00:00:01`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// The six octets, most significant first.
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// True for the all-ones address.
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// True when the I/G bit is set (multicast, including broadcast).
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

// Debug shows the familiar notation so log lines and test failures are readable.
impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid MAC address {input:?}: expected six colon-separated hex pairs like 02:fa:00:00:00:01"
)]
pub struct ParseMacError {
    /// The rejected input, truncated to 64 characters so a hostile string cannot flood a log.
    pub input: String,
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError {
            input: s.chars().take(64).collect(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for slot in &mut out {
            let part = parts.next().ok_or_else(err)?;
            // from_str_radix alone would accept "+f" or a single digit.
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// An IPv4 or IPv6 network in canonical form (no host bits set).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpCidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why an address/prefix pair is not a valid [`IpCidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("prefix length /{prefix} is longer than {max} bits for this address family")]
    PrefixTooLong { prefix: u8, max: u8 },
    #[error("{addr}/{prefix} has host bits set (did you mean {network}/{prefix}?)")]
    HostBitsSet {
        addr: IpAddr,
        prefix: u8,
        network: IpAddr,
    },
    #[error("invalid CIDR {input:?}: expected ADDRESS/PREFIX like 10.244.1.0/24")]
    Syntax { input: String },
}

impl IpCidr {
    /// Builds a canonical CIDR, rejecting an over-long prefix and set host bits.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(CidrError::PrefixTooLong { prefix, max });
        }
        let network = mask(addr, prefix);
        if network != addr {
            return Err(CidrError::HostBitsSet {
                addr,
                prefix,
                network,
            });
        }
        Ok(IpCidr { addr, prefix })
    }

    /// Builds a CIDR, clearing any host bits ("10.244.1.5/24" becomes "10.244.1.0/24").
    pub fn new_truncating(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(CidrError::PrefixTooLong { prefix, max });
        }
        Ok(IpCidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// The network address.
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub const fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True for an IPv4 network.
    pub const fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// True when `ip` is inside this network; addresses of the other family never are.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }

    /// Whether `ip` is this node pod CIDR's network address or first host, which a Flannel
    /// node gives its own interfaces (flannel.1 `.0`, cni0 `.1`). Only for CIDRs with room for
    /// pods besides them (IPv4 /30 or wider, IPv6 /126 or wider).
    pub fn node_host_address(&self, ip: IpAddr) -> bool {
        if self.prefix + 2 > max_prefix(self.addr) || !self.contains(ip) {
            return false;
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) - u32::from(net) <= 1,
            (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(ip) - u128::from(net) <= 1,
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IpCidr({self})")
    }
}

impl FromStr for IpCidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax {
            input: s.chars().take(64).collect(),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        IpCidr::new(addr, prefix)
    }
}

/// A route to one node's pod CIDR, as views carry it (the route table derives the same).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub node_name: String,
    pub site: String,
    pub pod_cidr: IpCidr,
    pub vtep_mac: MacAddr,
    pub underlay: IpAddr,
    pub path: RoutePath,
}

/// How traffic to a route's pod CIDR travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoutePath {
    /// Wire code 0: through the hub over the tunnel.
    ViaHub,
    /// Wire code 1: Flannel's own UDP 8472 VXLAN (same site or Express Connect).
    Direct,
}

#[cfg(test)]
mod node_host_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn network_and_first_host_are_the_node() {
        let c = IpCidr::new("10.244.3.0".parse().unwrap(), 24).unwrap();
        assert!(c.node_host_address("10.244.3.0".parse().unwrap()));
        assert!(c.node_host_address("10.244.3.1".parse().unwrap()));
        assert!(!c.node_host_address("10.244.3.2".parse().unwrap()));
        assert!(!c.node_host_address("10.244.4.1".parse().unwrap()));
        let c = IpCidr::new("10.244.3.4".parse().unwrap(), 31).unwrap();
        assert!(!c.node_host_address("10.244.3.4".parse().unwrap()));
        let c6 = IpCidr::new("fd00:1::".parse().unwrap(), 64).unwrap();
        assert!(c6.node_host_address("fd00:1::1".parse().unwrap()));
        assert!(!c6.node_host_address("fd00:1::2".parse().unwrap()));
        assert!(!c6.node_host_address("10.244.3.1".parse().unwrap()));
    }

    /// The smallest CIDRs that still have pods besides the node's two addresses: IPv4 /30 and
    /// IPv6 /126 (the node is .0/.1 there); one bit longer, nothing is the node.
    #[test]
    fn the_node_addresses_exist_down_to_a_slash_30_and_a_slash_126() {
        let c = IpCidr::new("10.244.3.4".parse().unwrap(), 30).unwrap();
        assert!(c.node_host_address("10.244.3.4".parse().unwrap()));
        assert!(c.node_host_address("10.244.3.5".parse().unwrap()));
        assert!(!c.node_host_address("10.244.3.6".parse().unwrap()));
        let c = IpCidr::new("10.244.3.4".parse().unwrap(), 31).unwrap();
        assert!(!c.node_host_address("10.244.3.5".parse().unwrap()));
        let c6 = IpCidr::new("fd00:1::4".parse().unwrap(), 126).unwrap();
        assert!(c6.node_host_address("fd00:1::4".parse().unwrap()));
        assert!(c6.node_host_address("fd00:1::5".parse().unwrap()));
        let c6 = IpCidr::new("fd00:1::4".parse().unwrap(), 127).unwrap();
        assert!(!c6.node_host_address("fd00:1::5".parse().unwrap()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn mac_display_and_parse() {
        let mac = MacAddr([0x02, 0xfa, 0, 0, 0, 0x01]);
        assert_eq!(mac.to_string(), "02:fa:00:00:00:01");
        assert_eq!("02:FA:00:00:00:01".parse::<MacAddr>().unwrap(), mac);
        assert_eq!(format!("{mac:?}"), "MacAddr(02:fa:00:00:00:01)");
        for bad in [
            "",
            "02:fa:00:00:00",
            "02:fa:00:00:00:01:02",
            "2:fa:00:00:00:01",
            "+2:fa:00:00:00:01",
            "02-fa-00-00-00-01",
            "zz:fa:00:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(!mac.is_multicast());
    }

    #[test]
    fn cidr_validation() {
        let c: IpCidr = "10.244.1.0/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert!(c.contains("10.244.1.77".parse().unwrap()));
        assert!(!c.contains("10.244.2.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert!(matches!(
            "10.244.1.5/24".parse::<IpCidr>(),
            Err(CidrError::HostBitsSet { .. })
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<IpCidr>(),
            Err(CidrError::PrefixTooLong {
                prefix: 33,
                max: 32
            })
        ));
        assert!(matches!(
            "10.0.0.0".parse::<IpCidr>(),
            Err(CidrError::Syntax { .. })
        ));
        assert!(matches!(
            "10.0.0.0/+8".parse::<IpCidr>(),
            Err(CidrError::Syntax { .. })
        ));
        let t = IpCidr::new_truncating("10.244.1.5".parse().unwrap(), 24).unwrap();
        assert_eq!(t.to_string(), "10.244.1.0/24");
        let all: IpCidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: IpCidr = "fd00:10:244::/64".parse().unwrap();
        assert!(v6.contains("fd00:10:244::5".parse().unwrap()));
        assert!("fd00::/129".parse::<IpCidr>().is_err());
        let host: IpCidr = "fd00::1/128".parse().unwrap();
        assert!(host.contains("fd00::1".parse().unwrap()));
    }
}
