//! The switch's rules that only a mutation run showed to be untested: IPv6 frames (source
//! authority and destination checks on the IPv6 arm), a wrong source MAC with an in-range source
//! IP, loopback (127.0.0.1 only) only with a local node, a destination without an underlay, and the labels.

#![allow(clippy::unwrap_used)]

use super::*;
use std::net::Ipv6Addr;

const INVENTORY: &str = r#"
[[sites]]
name = "vpc"
kind = "cloud"
[[sites]]
name = "site-a"
kind = "public"
[[sites]]
name = "site-b"
kind = "public"

[[nodes]]
name = "cloud-1"
site = "vpc"
addresses = ["192.168.0.11"]
pod_cidrs = ["10.244.1.0/24", "fd00:10:244:1::/64"]
vtep_mac = "02:fa:00:00:00:01"

[[nodes]]
name = "cloud-2"
site = "vpc"
pod_cidrs = ["10.244.2.0/24"]
vtep_mac = "02:fa:00:00:00:02"

[[nodes]]
name = "edge-a1"
site = "site-a"
addresses = ["10.0.1.2"]
pod_cidrs = ["10.244.3.0/24", "fd00:10:244:3::/64"]
vtep_mac = "02:fa:00:00:00:03"
public_ip = "10.0.1.2"

[[nodes]]
name = "edge-b1"
site = "site-b"
addresses = ["10.0.2.2"]
pod_cidrs = ["10.244.5.0/24", "fd00:10:244:5::/64"]
vtep_mac = "02:fa:00:00:00:05"
"#;

const CLOUD1: [u8; 6] = [2, 0xfa, 0, 0, 0, 1];
const CLOUD2: [u8; 6] = [2, 0xfa, 0, 0, 0, 2];
const A1: [u8; 6] = [2, 0xfa, 0, 0, 0, 3];
const B1: [u8; 6] = [2, 0xfa, 0, 0, 0, 5];

fn inventory() -> Inventory {
    Inventory::from_toml(INVENTORY, "test").unwrap()
}

fn table(local: Option<&str>) -> SwitchTable {
    SwitchTable::from_inventory(&inventory(), local, 1, 8472)
}

/// VXLAN VNI 1 + Ethernet + an IPv6 header (UDP, no payload) written by hand.
fn v6_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: &str, dst: &str) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 17, 64]);
    f.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
    f
}

fn v4_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f
}

fn decide(t: &SwitchTable, ingress: Ingress<'_>, bytes: &[u8]) -> Verdict<'static> {
    let f = VxlanFrame::from_vxlan_payload(bytes).unwrap();
    match t.decide(ingress, &f, |_| true) {
        Verdict::ToAgent(n) => Verdict::ToAgent(Box::leak(n.to_string().into_boxed_str())),
        Verdict::ToVtep(a) => Verdict::ToVtep(a),
        Verdict::Drop(r) => Verdict::Drop(r),
    }
}

fn vtep(s: &str) -> Ingress<'static> {
    Ingress::Vtep(s.parse().unwrap())
}

#[test]
fn ipv6_frames_are_switched_with_source_authority() {
    let t = table(None);
    // edge-a1 pod -> cloud-1 pod over IPv6: to cloud-1's flannel.1 (its first address).
    let f = v6_frame(A1, CLOUD1, "fd00:10:244:3::2", "fd00:10:244:1::9");
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::ToVtep("192.168.0.11:8472".parse().unwrap())
    );
    // cloud-1 -> edge-b1 over IPv6, arriving over UDP from cloud-1's underlay.
    let f = v6_frame(CLOUD1, B1, "fd00:10:244:1::2", "fd00:10:244:5::7");
    assert_eq!(
        decide(&t, vtep("192.168.0.11"), &f),
        Verdict::ToAgent("edge-b1")
    );
    // edge-a1 -> edge-b1 through the hub.
    let f = v6_frame(A1, B1, "fd00:10:244:3::2", "fd00:10:244:5::2");
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::ToAgent("edge-b1")
    );
}

#[test]
fn ipv6_spoofing_and_unknown_destinations_are_dropped() {
    let t = table(None);
    // Right MAC, IPv6 source in edge-b1's pod CIDR, not edge-a1's.
    let f = v6_frame(A1, CLOUD1, "fd00:10:244:5::2", "fd00:10:244:1::9");
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    // An IPv6 source that is the IPv4-mapped form of an address inside the IPv4 pod CIDR.
    let f = v6_frame(A1, CLOUD1, "::ffff:10.244.3.2", "fd00:10:244:1::9");
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    // Destination MAC known, destination IP outside its CIDRs.
    let f = v6_frame(A1, CLOUD1, "fd00:10:244:3::2", "fd00:10:244:5::9");
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::UnknownDestination)
    );
    // A truncated IPv6 header: 39 bytes.
    let mut f = v6_frame(A1, CLOUD1, "fd00:10:244:3::2", "fd00:10:244:1::9");
    f.pop();
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::Malformed("truncated_ip_header"))
    );
    // An IPv6 ethertype carrying an IPv4 header.
    let mut f = v4_frame(A1, CLOUD1, [10, 244, 3, 2], [10, 244, 1, 9]);
    f[8 + 12] = 0x86;
    f[8 + 13] = 0xdd;
    f.extend_from_slice(&[0; 20]);
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::Malformed("truncated_ip_header"))
    );
    // And a truncated IPv4 header under the IPv4 ethertype.
    let mut f = v4_frame(A1, CLOUD1, [10, 244, 3, 2], [10, 244, 1, 9]);
    f.pop();
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::Malformed("truncated_ip_header"))
    );
}

#[test]
fn wrong_source_mac_with_an_in_range_source_ip_is_spoofed() {
    let t = table(None);
    // edge-a1's agent, edge-a1's pod IP, edge-b1's MAC.
    let f = v4_frame(B1, CLOUD1, [10, 244, 3, 2], [10, 244, 1, 9]);
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    let f = v6_frame(B1, CLOUD1, "fd00:10:244:3::2", "fd00:10:244:1::9");
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    // From a VTEP: cloud-1's underlay, cloud-1's pod IP, another MAC.
    let f = v4_frame(CLOUD2, A1, [10, 244, 1, 2], [10, 244, 3, 2]);
    assert_eq!(
        decide(&t, vtep("192.168.0.11"), &f),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    // An agent the inventory does not know.
    let f = v4_frame(A1, CLOUD1, [10, 244, 3, 2], [10, 244, 1, 9]);
    assert_eq!(
        decide(&t, Ingress::Agent("edge-zz"), &f),
        Verdict::Drop(DropReason::UnknownSender)
    );
}

#[test]
fn loopback_is_the_local_node_only_when_there_is_one() {
    let f = v4_frame(CLOUD1, A1, [10, 244, 1, 2], [10, 244, 3, 2]);
    // No local node: loopback is nobody.
    let t = table(None);
    assert_eq!(
        decide(&t, vtep("127.0.0.1"), &f),
        Verdict::Drop(DropReason::UnknownSender)
    );
    // cloud-1 local: its own frames arrive from 127.0.0.1 (where its FDB entry points), and
    // from no other loopback address.
    let t = table(Some("cloud-1"));
    assert_eq!(
        decide(&t, vtep("127.0.0.1"), &f),
        Verdict::ToAgent("edge-a1")
    );
    for other in ["127.0.0.2", "127.1.2.3", "::1"] {
        assert_eq!(
            decide(&t, vtep(other), &f),
            Verdict::Drop(DropReason::UnknownSender),
            "{other}"
        );
    }
    // A non-loopback stranger is still unknown with a local node.
    assert_eq!(
        decide(&t, vtep("192.0.2.1"), &f),
        Verdict::Drop(DropReason::UnknownSender)
    );
    // A local node name that is not in the inventory gives no local node.
    let t = table(Some("ghost"));
    assert_eq!(
        decide(&t, vtep("127.0.0.1"), &f),
        Verdict::Drop(DropReason::UnknownSender)
    );
}

#[test]
fn destination_without_an_underlay_is_unknown() {
    // cloud-2 has a VTEP and a pod CIDR but no address: nowhere to send its VXLAN.
    let t = table(None);
    let f = v4_frame(A1, CLOUD2, [10, 244, 3, 2], [10, 244, 2, 9]);
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::UnknownDestination)
    );
    // And it cannot send: no underlay means no VTEP ingress matches it.
    let f = v4_frame(CLOUD2, A1, [10, 244, 2, 9], [10, 244, 3, 2]);
    assert_eq!(
        decide(&t, vtep("0.0.0.0"), &f),
        Verdict::Drop(DropReason::UnknownSender)
    );
}

#[test]
fn table_metadata() {
    let mut inv = inventory();
    inv.apply_site(crate::inventory::Site {
        name: "site-z".into(),
        kind: SiteKind::Public,
        mtu: None,
    });
    let t = SwitchTable::from_inventory(&inv, None, 7, 4789);
    assert_eq!(t.generation(), inv.generation());
    assert!(t.generation() > 1);
    assert_eq!(t.mac_of("edge-a1"), Some(MacAddr(A1)));
    assert_eq!(t.mac_of("cloud-2"), Some(MacAddr(CLOUD2)));
    assert_eq!(t.mac_of("nope"), None);
    // VNI 7 and port 4789 are used as given.
    let mut f = v4_frame(A1, CLOUD1, [10, 244, 3, 2], [10, 244, 1, 9]);
    f[6] = 7;
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::ToVtep("192.168.0.11:4789".parse().unwrap())
    );
    f[6] = 1;
    assert_eq!(
        decide(&t, Ingress::Agent("edge-a1"), &f),
        Verdict::Drop(DropReason::WrongVni)
    );
}

#[test]
fn drop_labels_are_stable() {
    let labels = [
        (
            DropReason::Malformed("truncated_ip_header"),
            "truncated_ip_header",
        ),
        (DropReason::WrongVni, "wrong_vni"),
        (DropReason::UnsupportedEthertype, "unsupported_ethertype"),
        (DropReason::SpoofedSource, "spoofed_source"),
        (DropReason::UnknownSender, "unknown_sender"),
        (DropReason::UnknownDestination, "unknown_destination"),
        (DropReason::NotViaHub, "not_via_hub"),
        (DropReason::Loop, "loop"),
        (DropReason::AgentNotConnected, "agent_not_connected"),
        (DropReason::Oversize, "oversize"),
        (DropReason::SendFailed, "send_failed"),
    ];
    for (r, l) in labels {
        assert_eq!(r.label(), l);
    }
}
