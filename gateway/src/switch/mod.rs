//! The hub's VXLAN switch, as pure logic: given where a frame came from (an agent's tunnel or a
//! cloud/Express Connect VTEP over UDP) and the frame, decide where it goes or why it is dropped.
//! The I/O lives in `hub::dataplane`; this module only reads the inventory-derived table, so every
//! rule is unit-tested without sockets.
//!
//! Authority comes from the inventory, never from the sender: a frame from agent N must carry N's
//! VtepMAC as inner source and an inner IPv4/IPv6 source inside N's pod CIDRs; a frame from a VTEP
//! must come from the underlay address of a cloud or Express Connect node and carry that node's
//! VtepMAC. Destinations must exist, and only paths that need the hub are switched: a frame
//! between two nodes of the same site, or between two cloud/Express Connect nodes, is dropped
//! (those keep Flannel's direct VXLAN and are never hairpinned).

pub mod icmp;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use petrel_proto::datagram::{ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use petrel_proto::{MacAddr, VxlanFrame};

use crate::inventory::{Inventory, SiteKind};

/// Why a frame was dropped. `label()` is the metric/status label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    Malformed(&'static str),
    WrongVni,
    UnsupportedEthertype,
    SpoofedSource,
    UnknownSender,
    UnknownDestination,
    /// Same site, or cloud to cloud: Flannel's direct path, not ours.
    NotViaHub,
    /// Destination is the sender itself.
    Loop,
    /// The destination agent is not connected to this hub.
    AgentNotConnected,
    /// Larger than the destination tunnel's datagram size (ICMP frag-needed was sent back).
    Oversize,
    /// The hub could not hand the frame on (socket or tunnel error).
    SendFailed,
}

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed(r) => r,
            DropReason::WrongVni => "wrong_vni",
            DropReason::UnsupportedEthertype => "unsupported_ethertype",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::UnknownDestination => "unknown_destination",
            DropReason::NotViaHub => "not_via_hub",
            DropReason::Loop => "loop",
            DropReason::AgentNotConnected => "agent_not_connected",
            DropReason::Oversize => "oversize",
            DropReason::SendFailed => "send_failed",
        }
    }
}

/// Where a frame entered the hub.
#[derive(Debug, Clone, Copy)]
pub enum Ingress<'a> {
    /// An agent's tunnel, identified by its certificate's node name.
    Agent(&'a str),
    /// UDP on the relay port, from this underlay address.
    Vtep(IpAddr),
}

/// Where a frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'t> {
    ToAgent(&'t str),
    ToVtep(SocketAddr),
    Drop(DropReason),
}

#[derive(Debug, Clone)]
struct Endpoint {
    node: String,
    site: String,
    kind: SiteKind,
    pod_cidrs: Vec<IpNet>,
    /// Flannel's public-ip: where this node's flannel.1 listens.
    underlay: Option<IpAddr>,
}

/// The switching table, rebuilt whenever the inventory changes.
#[derive(Debug, Clone, Default)]
pub struct SwitchTable {
    by_mac: HashMap<MacAddr, Endpoint>,
    mac_by_node: HashMap<String, MacAddr>,
    /// Underlay address → VtepMAC of cloud and Express Connect nodes.
    vtep_by_underlay: HashMap<IpAddr, MacAddr>,
    /// The node the hub runs on: frames its own kernel sends arrive from loopback.
    local_node: Option<MacAddr>,
    vni: u32,
    flannel_port: u16,
    generation: u64,
}

impl SwitchTable {
    pub fn from_inventory(
        inv: &Inventory,
        local_node: Option<&str>,
        vni: u32,
        flannel_port: u16,
    ) -> Self {
        let mut t = SwitchTable {
            vni,
            flannel_port,
            generation: inv.generation(),
            ..Default::default()
        };
        for node in inv.nodes() {
            let (Some(mac), Some(kind)) = (node.vtep_mac, inv.site_kind_of(node)) else {
                continue;
            };
            let underlay = node.public_ip.or_else(|| node.addresses.first().copied());
            t.by_mac.insert(
                mac,
                Endpoint {
                    node: node.name.clone(),
                    site: node.site.clone(),
                    kind,
                    pod_cidrs: node.pod_cidrs.clone(),
                    underlay,
                },
            );
            t.mac_by_node.insert(node.name.clone(), mac);
            if kind != SiteKind::Public {
                if let Some(u) = underlay {
                    t.vtep_by_underlay.insert(u, mac);
                }
            }
        }
        t.local_node = local_node.and_then(|n| t.mac_by_node.get(n).copied());
        t
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `addr` may speak on the relay port: a known VTEP's underlay address, or
    /// loopback on a hub that knows its own node (its kernel sends from 127.0.0.1). The relay's
    /// liveness probes are answered only for these.
    pub fn is_vtep(&self, addr: std::net::IpAddr) -> bool {
        self.vtep_by_underlay.contains_key(&addr)
            || (self.local_node.is_some()
                && addr == std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    }

    /// The VtepMAC of a node.
    pub fn mac_of(&self, node: &str) -> Option<MacAddr> {
        self.mac_by_node.get(node).copied()
    }

    /// Decides what happens to `frame`, which entered at `ingress`. `connected` answers whether
    /// an agent currently holds a tunnel here.
    pub fn decide<'t>(
        &'t self,
        ingress: Ingress<'_>,
        frame: &VxlanFrame<'_>,
        connected: impl Fn(&str) -> bool,
    ) -> Verdict<'t> {
        if frame.vni() != self.vni {
            return Verdict::Drop(DropReason::WrongVni);
        }
        let (src_ip, dst_ip) = match frame.ethertype() {
            ETHERTYPE_IPV4 => (
                frame.inner_ipv4_src().map(IpAddr::V4),
                frame.inner_ipv4_dst().map(IpAddr::V4),
            ),
            ETHERTYPE_IPV6 => (
                frame.inner_ipv6_src().map(IpAddr::V6),
                frame.inner_ipv6_dst().map(IpAddr::V6),
            ),
            _ => return Verdict::Drop(DropReason::UnsupportedEthertype),
        };
        let (Some(src_ip), Some(dst_ip)) = (src_ip, dst_ip) else {
            return Verdict::Drop(DropReason::Malformed("truncated_ip_header"));
        };
        // Who sent it, according to the inventory.
        let sender_mac = match ingress {
            Ingress::Agent(node) => match self.mac_by_node.get(node) {
                Some(m) => *m,
                None => return Verdict::Drop(DropReason::UnknownSender),
            },
            Ingress::Vtep(addr) => match (self.vtep_by_underlay.get(&addr), self.local_node) {
                (Some(m), _) => *m,
                // The hub node's own kernel sends to the relay over loopback, from 127.0.0.1
                // (its FDB entry's destination); no other loopback address speaks for it.
                (None, Some(m)) if addr == std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST) => m,
                _ => return Verdict::Drop(DropReason::UnknownSender),
            },
        };
        let Some(sender) = self.by_mac.get(&sender_mac) else {
            return Verdict::Drop(DropReason::UnknownSender);
        };
        if frame.src_mac() != sender_mac || !sender.pod_cidrs.iter().any(|c| c.contains(&src_ip)) {
            return Verdict::Drop(DropReason::SpoofedSource);
        }
        let Some(dest) = self.by_mac.get(&frame.dst_mac()) else {
            return Verdict::Drop(DropReason::UnknownDestination);
        };
        if !dest.pod_cidrs.iter().any(|c| c.contains(&dst_ip)) {
            return Verdict::Drop(DropReason::UnknownDestination);
        }
        if dest.node == sender.node {
            return Verdict::Drop(DropReason::Loop);
        }
        let sender_public = sender.kind == SiteKind::Public;
        let dest_public = dest.kind == SiteKind::Public;
        if dest.site == sender.site || (!sender_public && !dest_public) {
            return Verdict::Drop(DropReason::NotViaHub);
        }
        if dest_public {
            if !connected(&dest.node) {
                return Verdict::Drop(DropReason::AgentNotConnected);
            }
            return Verdict::ToAgent(&dest.node);
        }
        match dest.underlay {
            Some(ip) => Verdict::ToVtep(SocketAddr::new(ip, self.flannel_port)),
            None => Verdict::Drop(DropReason::UnknownDestination),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::Ipv4Addr;

    /// A VXLAN payload carrying an IPv4/UDP packet.
    pub(crate) fn frame(
        vni: u32,
        src_mac: &str,
        dst_mac: &str,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Vec<u8> {
        let mut f = petrel_proto::encode_vxlan_header(vni).to_vec();
        f.extend_from_slice(&dst_mac.parse::<MacAddr>().unwrap().0);
        f.extend_from_slice(&src_mac.parse::<MacAddr>().unwrap().0);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        f.extend_from_slice(&ip);
        f
    }

    const CLOUD1: &str = "02:fa:00:00:00:01";
    const GW1: &str = "02:fa:00:00:00:02";
    const A1: &str = "02:fa:00:00:00:03";
    const A2: &str = "02:fa:00:00:00:04";
    const B1: &str = "02:fa:00:00:00:05";
    const X1: &str = "02:fa:00:00:00:06";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn table() -> SwitchTable {
        SwitchTable::from_inventory(
            &Inventory::embedded_default().unwrap(),
            Some("gw-1"),
            1,
            8472,
        )
    }

    fn decide(t: &SwitchTable, ingress: Ingress<'_>, bytes: &[u8]) -> Verdict<'static> {
        let f = VxlanFrame::from_vxlan_payload(bytes).unwrap();
        match t.decide(ingress, &f, |n| n != "edge-a2") {
            Verdict::ToAgent(n) => Verdict::ToAgent(Box::leak(n.to_string().into_boxed_str())),
            Verdict::ToVtep(a) => Verdict::ToVtep(a),
            Verdict::Drop(r) => Verdict::Drop(r),
        }
    }

    #[test]
    fn only_known_vteps_and_the_hubs_own_loopback_are_vteps() {
        let t = table();
        assert!(t.is_vtep("192.168.0.11".parse().unwrap()));
        assert!(t.is_vtep("192.168.10.2".parse().unwrap()));
        assert!(t.is_vtep("127.0.0.1".parse().unwrap()));
        assert!(!t.is_vtep("127.0.0.2".parse().unwrap()));
        assert!(!t.is_vtep("203.0.113.9".parse().unwrap()));
        let no_local =
            SwitchTable::from_inventory(&Inventory::embedded_default().unwrap(), None, 1, 8472);
        assert!(!no_local.is_vtep("127.0.0.1".parse().unwrap()));
        assert!(no_local.is_vtep("192.168.0.11".parse().unwrap()));
    }

    #[test]
    fn switches_the_paths_that_need_the_hub() {
        let t = table();
        // cloud-1 pod -> edge-a1 pod, arriving over UDP from cloud-1's underlay.
        let f = frame(1, CLOUD1, A1, ip("10.244.1.2"), ip("10.244.3.2"));
        assert_eq!(
            decide(&t, Ingress::Vtep("192.168.0.11".parse().unwrap()), &f),
            Verdict::ToAgent("edge-a1")
        );
        // edge-a1 pod -> cloud-1 pod: to cloud-1's flannel.1.
        let f = frame(1, A1, CLOUD1, ip("10.244.3.2"), ip("10.244.1.2"));
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::ToVtep("192.168.0.11:8472".parse().unwrap())
        );
        // edge-a1 -> edge-b1 through the hub.
        let f = frame(1, A1, B1, ip("10.244.3.2"), ip("10.244.5.2"));
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::ToAgent("edge-b1")
        );
        // x1 (express connect) -> edge-b1.
        let f = frame(1, X1, B1, ip("10.244.6.2"), ip("10.244.5.9"));
        assert_eq!(
            decide(&t, Ingress::Vtep("192.168.10.2".parse().unwrap()), &f),
            Verdict::ToAgent("edge-b1")
        );
        // The hub node's own pods arrive from loopback.
        let f = frame(1, GW1, B1, ip("10.244.2.2"), ip("10.244.5.2"));
        assert_eq!(
            decide(&t, Ingress::Vtep("127.0.0.1".parse().unwrap()), &f),
            Verdict::ToAgent("edge-b1")
        );
    }

    #[test]
    fn refuses_spoofing_unknowns_and_paths_that_must_stay_direct() {
        let t = table();
        // edge-a1's agent sends with edge-b1's source MAC.
        let f = frame(1, B1, CLOUD1, ip("10.244.5.2"), ip("10.244.1.2"));
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::Drop(DropReason::SpoofedSource)
        );
        // Right MAC, source IP outside its pod CIDR.
        let f = frame(1, A1, CLOUD1, ip("10.244.5.2"), ip("10.244.1.2"));
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::Drop(DropReason::SpoofedSource)
        );
        // Unknown destination MAC, and a known MAC with an IP outside its CIDR.
        let f = frame(
            1,
            A1,
            "02:00:00:00:00:99",
            ip("10.244.3.2"),
            ip("10.244.1.2"),
        );
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::Drop(DropReason::UnknownDestination)
        );
        let f = frame(1, A1, CLOUD1, ip("10.244.3.2"), ip("10.99.0.1"));
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::Drop(DropReason::UnknownDestination)
        );
        // Same site and cloud to cloud stay on Flannel's direct path.
        let f = frame(1, A1, A2, ip("10.244.3.2"), ip("10.244.4.2"));
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::Drop(DropReason::NotViaHub)
        );
        let f = frame(1, CLOUD1, X1, ip("10.244.1.2"), ip("10.244.6.2"));
        assert_eq!(
            decide(&t, Ingress::Vtep("192.168.0.11".parse().unwrap()), &f),
            Verdict::Drop(DropReason::NotViaHub)
        );
        // A UDP sender that is no cloud node, a public node's address, wrong VNI, not connected.
        let f = frame(1, CLOUD1, A1, ip("10.244.1.2"), ip("10.244.3.2"));
        assert_eq!(
            decide(&t, Ingress::Vtep("203.0.113.7".parse().unwrap()), &f),
            Verdict::Drop(DropReason::UnknownSender)
        );
        assert_eq!(
            decide(&t, Ingress::Vtep("10.0.1.2".parse().unwrap()), &f),
            Verdict::Drop(DropReason::UnknownSender)
        );
        let f = frame(7, CLOUD1, A1, ip("10.244.1.2"), ip("10.244.3.2"));
        assert_eq!(
            decide(&t, Ingress::Vtep("192.168.0.11".parse().unwrap()), &f),
            Verdict::Drop(DropReason::WrongVni)
        );
        let f = frame(1, CLOUD1, A2, ip("10.244.1.2"), ip("10.244.4.2"));
        assert_eq!(
            decide(&t, Ingress::Vtep("192.168.0.11".parse().unwrap()), &f),
            Verdict::Drop(DropReason::AgentNotConnected)
        );
        // An agent sending to itself.
        let f = frame(1, A1, A1, ip("10.244.3.2"), ip("10.244.3.3"));
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::Drop(DropReason::Loop)
        );
        // ARP and other ethertypes are not switched (Flannel uses static neighbours).
        let mut f = frame(1, A1, CLOUD1, ip("10.244.3.2"), ip("10.244.1.2"));
        f[8 + 12] = 0x08;
        f[8 + 13] = 0x06;
        assert_eq!(
            decide(&t, Ingress::Agent("edge-a1"), &f),
            Verdict::Drop(DropReason::UnsupportedEthertype)
        );
    }
}

#[cfg(test)]
#[path = "switch_tests.rs"]
mod mutant_tests;
