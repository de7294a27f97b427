//! QUIC datagrams on the tunnel connection. Each datagram is `[kind: u8][payload]`; kind
//! [`DATAGRAM_KIND_VXLAN`] carries a VXLAN packet exactly as flannel.1 sends and accepts it on
//! UDP 8472 (RFC 7348 8-byte header + inner Ethernet frame), so the hub can forward it to any
//! VTEP unchanged and switch on the inner destination MAC.
//!
//! [`VxlanFrame`] is a zero-copy, validated view: once parsed, every accessor is infallible
//! or returns `None`, and none of them can panic whatever bytes arrived.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::types::MacAddr;

/// Datagram kind: a VXLAN packet (header + inner Ethernet frame).
pub const DATAGRAM_KIND_VXLAN: u8 = 0x01;
/// RFC 7348 header length.
pub const VXLAN_HEADER_LEN: usize = 8;
/// The only flags byte Linux accepts without extensions: the I (valid VNI) bit.
pub const VXLAN_FLAGS: u8 = 0x08;
/// VNIs are 24 bits.
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// Destination MAC, source MAC, ethertype.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Bytes a datagram adds in front of the VXLAN packet.
pub const DATAGRAM_OVERHEAD: usize = 1;
/// What a VXLAN packet adds to the inner IP packet: the VXLAN header and the inner Ethernet
/// header (22 bytes).
pub const VXLAN_OVERHEAD: usize = VXLAN_HEADER_LEN + ETHERNET_HEADER_LEN;
/// What a tunnel datagram adds to the inner IP packet (23 bytes): a 1450-byte pod packet is a
/// 1473-byte datagram, and a path whose QUIC datagrams hold `n` bytes carries inner packets of
/// `n - DATAGRAM_IP_OVERHEAD`.
pub const DATAGRAM_IP_OVERHEAD: usize = DATAGRAM_OVERHEAD + VXLAN_OVERHEAD;

/// The largest inner IP packet a tunnel whose QUIC datagrams hold at most `max_datagram` bytes
/// carries (`max_datagram - DATAGRAM_IP_OVERHEAD`), never below the IPv4 minimum of
/// [`crate::control::MIN_SITE_MTU`]: what the agent routes its own site at, what the hub answers
/// an oversize frame with, and what it learns a site's MTU from.
pub fn inner_mtu(max_datagram: usize) -> u16 {
    u16::try_from(max_datagram.saturating_sub(DATAGRAM_IP_OVERHEAD))
        .unwrap_or(u16::MAX)
        .max(crate::control::MIN_SITE_MTU)
}

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

/// Why a datagram was dropped; operators see these as drop reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DatagramError {
    #[error("empty datagram")]
    Empty,
    #[error("unknown datagram kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("datagram shorter than the 8-byte VXLAN header")]
    Truncated,
    #[error("VXLAN flags byte is 0x{0:02x}, expected 0x08 (extensions are not supported)")]
    BadVxlanFlags(u8),
    #[error("VXLAN reserved bits are set")]
    ReservedBitsSet,
    #[error("inner Ethernet frame is {0} bytes, shorter than its 14-byte header")]
    FrameTooShort(usize),
}

impl DatagramError {
    /// A stable, low-cardinality label for a drop-reason metric.
    pub fn reason(&self) -> &'static str {
        match self {
            DatagramError::Empty => "empty",
            DatagramError::UnknownKind(_) => "unknown_kind",
            DatagramError::Truncated => "truncated",
            DatagramError::BadVxlanFlags(_) => "bad_vxlan_flags",
            DatagramError::ReservedBitsSet => "vxlan_reserved_bits",
            DatagramError::FrameTooShort(_) => "frame_too_short",
        }
    }
}

/// A validated VXLAN packet: header with only the I flag, zero reserved bits, and an inner
/// frame at least as long as an Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanFrame<'a> {
    bytes: &'a [u8],
}

/// Parses a tunnel datagram.
pub fn parse_datagram(datagram: &[u8]) -> Result<VxlanFrame<'_>, DatagramError> {
    match datagram.split_first() {
        None => Err(DatagramError::Empty),
        Some((&DATAGRAM_KIND_VXLAN, payload)) => VxlanFrame::from_vxlan_payload(payload),
        Some((&kind, _)) => Err(DatagramError::UnknownKind(kind)),
    }
}

/// Appends a tunnel datagram carrying `vxlan_payload` (a UDP 8472 payload).
pub fn write_vxlan_datagram(vxlan_payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(DATAGRAM_OVERHEAD + vxlan_payload.len());
    out.push(DATAGRAM_KIND_VXLAN);
    out.extend_from_slice(vxlan_payload);
}

/// The RFC 7348 header for `vni`, byte-compatible with Linux vxlan. Only the low 24 bits of
/// `vni` fit; higher bits are dropped, so callers should keep VNIs within [`MAX_VNI`].
pub fn encode_vxlan_header(vni: u32) -> [u8; 8] {
    let [_, a, b, c] = (vni & MAX_VNI).to_be_bytes();
    [VXLAN_FLAGS, 0, 0, 0, a, b, c, 0]
}

/// The VNI of a UDP 8472 payload whose flags byte has the I bit, whatever its other bits: the
/// quick check the kernel-facing paths (capture, injection) make before handing a payload on.
/// [`VxlanFrame::from_vxlan_payload`] is the full validation the hub's switch makes.
pub fn vxlan_vni(payload: &[u8]) -> Option<u32> {
    match payload.get(..VXLAN_HEADER_LEN)? {
        &[flags, _, _, _, a, b, c, _] if flags & VXLAN_FLAGS != 0 => {
            Some(u32::from_be_bytes([0, a, b, c]))
        }
        _ => None,
    }
}

/// The inner destination MAC of a VXLAN payload (the peer's VtepMAC, the first six bytes after
/// the 8-byte header), unchecked otherwise: the quick lookup key of the paths that pick a relay
/// or a hub per frame.
pub fn inner_dst_mac(payload: &[u8]) -> Option<[u8; 6]> {
    payload
        .get(VXLAN_HEADER_LEN..VXLAN_HEADER_LEN + 6)?
        .try_into()
        .ok()
}

impl<'a> VxlanFrame<'a> {
    /// Parses a VXLAN packet as received on UDP 8472 (no kind byte).
    pub fn from_vxlan_payload(bytes: &'a [u8]) -> Result<Self, DatagramError> {
        let Some((header, inner)) = bytes.split_first_chunk::<VXLAN_HEADER_LEN>() else {
            return Err(DatagramError::Truncated);
        };
        let [flags, r1, r2, r3, _, _, _, r4] = *header;
        if flags != VXLAN_FLAGS {
            return Err(DatagramError::BadVxlanFlags(flags));
        }
        // Linux drops packets with reserved bits set unless an extension claims them.
        if r1 | r2 | r3 | r4 != 0 {
            return Err(DatagramError::ReservedBitsSet);
        }
        if inner.len() < ETHERNET_HEADER_LEN {
            return Err(DatagramError::FrameTooShort(inner.len()));
        }
        Ok(VxlanFrame { bytes })
    }

    /// The 24-bit VNI.
    pub fn vni(&self) -> u32 {
        match self.bytes.get(4..7) {
            Some(&[a, b, c]) => u32::from_be_bytes([0, a, b, c]),
            _ => 0,
        }
    }

    /// VXLAN header + inner frame: exactly the UDP 8472 payload.
    pub fn vxlan_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The inner Ethernet frame.
    pub fn inner(&self) -> &'a [u8] {
        self.bytes.get(VXLAN_HEADER_LEN..).unwrap_or_default()
    }

    /// Appends this packet as a tunnel datagram.
    pub fn write_datagram(&self, out: &mut Vec<u8>) {
        write_vxlan_datagram(self.bytes, out);
    }

    fn inner_array<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        let slice = self.inner().get(at..at.checked_add(N)?)?;
        <[u8; N]>::try_from(slice).ok()
    }

    pub fn dst_mac(&self) -> MacAddr {
        MacAddr(self.inner_array(0).unwrap_or_default())
    }

    pub fn src_mac(&self) -> MacAddr {
        MacAddr(self.inner_array(6).unwrap_or_default())
    }

    /// The Ethernet type of the inner frame (no VLAN parsing: flannel does not tag).
    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes(self.inner_array(12).unwrap_or_default())
    }

    /// The inner L3 payload after the Ethernet header.
    pub fn l3(&self) -> &'a [u8] {
        self.inner().get(ETHERNET_HEADER_LEN..).unwrap_or_default()
    }

    fn l3_array<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.inner_array(ETHERNET_HEADER_LEN.checked_add(at)?)
    }

    fn ipv4_header_ok(&self) -> bool {
        self.ethertype() == ETHERTYPE_IPV4
            && self
                .l3()
                .first()
                .is_some_and(|&b| b >> 4 == 4 && usize::from(b & 0x0f) * 4 >= 20)
            && self.l3().len() >= 20
    }

    /// For ARP over Ethernet/IPv4: (sender IP, target IP).
    pub fn arp_ipv4(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        if self.ethertype() != ETHERTYPE_ARP {
            return None;
        }
        // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4.
        if self.l3_array::<6>(0)? != [0, 1, 0x08, 0x00, 6, 4] {
            return None;
        }
        let sender = self.l3_array::<4>(14)?;
        let target = self.l3_array::<4>(24)?;
        Some((Ipv4Addr::from(sender), Ipv4Addr::from(target)))
    }

    /// The inner IPv4 source, or the ARP sender protocol address for an ARP frame.
    pub fn inner_ipv4_src(&self) -> Option<Ipv4Addr> {
        if self.ipv4_header_ok() {
            return self.l3_array::<4>(12).map(Ipv4Addr::from);
        }
        self.arp_ipv4().map(|(sender, _)| sender)
    }

    /// The inner IPv4 destination, or the ARP target protocol address for an ARP frame.
    pub fn inner_ipv4_dst(&self) -> Option<Ipv4Addr> {
        if self.ipv4_header_ok() {
            return self.l3_array::<4>(16).map(Ipv4Addr::from);
        }
        self.arp_ipv4().map(|(_, target)| target)
    }

    fn ipv6_header_ok(&self) -> bool {
        self.ethertype() == ETHERTYPE_IPV6
            && self.l3().first().is_some_and(|&b| b >> 4 == 6)
            && self.l3().len() >= 40
    }

    pub fn inner_ipv6_src(&self) -> Option<Ipv6Addr> {
        if !self.ipv6_header_ok() {
            return None;
        }
        self.l3_array::<16>(8).map(Ipv6Addr::from)
    }

    pub fn inner_ipv6_dst(&self) -> Option<Ipv6Addr> {
        if !self.ipv6_header_ok() {
            return None;
        }
        self.l3_array::<16>(24).map(Ipv6Addr::from)
    }

    /// Inner source address of either family (ARP sender included).
    pub fn inner_ip_src(&self) -> Option<IpAddr> {
        self.inner_ipv4_src()
            .map(IpAddr::V4)
            .or_else(|| self.inner_ipv6_src().map(IpAddr::V6))
    }

    /// Inner destination address of either family (ARP target included).
    pub fn inner_ip_dst(&self) -> Option<IpAddr> {
        self.inner_ipv4_dst()
            .map(IpAddr::V4)
            .or_else(|| self.inner_ipv6_dst().map(IpAddr::V6))
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    #[test]
    fn overheads() {
        assert_eq!(VXLAN_OVERHEAD, 22);
        assert_eq!(DATAGRAM_IP_OVERHEAD, 23);
    }

    #[test]
    fn inner_mtu_is_the_datagram_minus_the_overhead_never_below_576() {
        assert_eq!(inner_mtu(1403), 1380);
        assert_eq!(inner_mtu(1323), 1300);
        assert_eq!(inner_mtu(23 + 577), 577);
        assert_eq!(inner_mtu(23 + 576), 576);
        assert_eq!(inner_mtu(23 + 575), 576);
        assert_eq!(inner_mtu(0), 576);
        assert_eq!(inner_mtu(23 + 65_535), 65_535);
        assert_eq!(inner_mtu(23 + 65_536), u16::MAX);
        assert_eq!(inner_mtu(usize::MAX), u16::MAX);
    }

    #[test]
    fn vxlan_header_roundtrip_and_quick_vni() {
        let b = encode_vxlan_header(0x00ab_cdef);
        assert_eq!(b, [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(vxlan_vni(&b), Some(0x00ab_cdef));
        assert_eq!(encode_vxlan_header(1), [0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(vxlan_vni(&encode_vxlan_header(1)), Some(1));
        // Longer payloads: only the header counts.
        let mut long = encode_vxlan_header(0x0001_0203).to_vec();
        long.extend_from_slice(&[0xff; 14]);
        assert_eq!(vxlan_vni(&long), Some(0x0001_0203));
        // The I bit is what counts; other flag bits and reserved bytes do not.
        assert_eq!(vxlan_vni(&[0x0c, 1, 1, 1, 0, 0, 7, 1]), Some(7));
        assert_eq!(
            vxlan_vni(&[0x08, 0, 0, 0, 0xff, 0xff, 0xff, 0]),
            Some(MAX_VNI)
        );
        for no_i in [0x00, 0x04, 0xf7] {
            assert_eq!(vxlan_vni(&[no_i, 0, 0, 0, 0, 0, 1, 0]), None, "{no_i:#x}");
        }
        // Shorter than the header.
        assert_eq!(vxlan_vni(&[0x08, 0, 0, 0, 0, 0, 1]), None);
        assert_eq!(vxlan_vni(&[]), None);
        assert_eq!(vxlan_vni(&[0u8; 8]), None);
    }
}

#[cfg(test)]
mod inner_dst_mac_tests {
    use super::*;

    #[test]
    fn the_inner_destination_mac_follows_the_header() {
        let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0, 2, 0xfa, 0, 0, 0, 5];
        assert_eq!(inner_dst_mac(&p), Some([2, 0xfa, 0, 0, 0, 5]));
        p.extend_from_slice(&[9; 20]);
        assert_eq!(inner_dst_mac(&p), Some([2, 0xfa, 0, 0, 0, 5]));
        assert_eq!(inner_dst_mac(&p[..13]), None);
        assert_eq!(inner_dst_mac(&[]), None);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const DST: [u8; 6] = [0x02, 0xfa, 0, 0, 0, 0x01];
    const SRC: [u8; 6] = [0x02, 0xfa, 0, 0, 0, 0x02];

    fn ether(ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&DST);
        f.extend_from_slice(&SRC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    fn ipv4_packet() -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[10, 244, 1, 5]);
        ip.extend_from_slice(&[10, 244, 7, 9]);
        ip
    }

    #[test]
    fn vxlan_header_matches_linux() {
        assert_eq!(encode_vxlan_header(1), [0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(
            encode_vxlan_header(0x00ab_cdef),
            [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]
        );
        assert_eq!(encode_vxlan_header(0x0100_0001), encode_vxlan_header(1));
    }

    #[test]
    fn hand_built_ipv4_frame() {
        let mut pkt = encode_vxlan_header(1).to_vec();
        pkt.extend_from_slice(&ether(ETHERTYPE_IPV4, &ipv4_packet()));
        let mut dg = Vec::new();
        write_vxlan_datagram(&pkt, &mut dg);
        assert_eq!(dg[0], DATAGRAM_KIND_VXLAN);
        let f = parse_datagram(&dg).unwrap();
        assert_eq!(f.vni(), 1);
        assert_eq!(f.vxlan_bytes(), &pkt[..]);
        assert_eq!(f.inner(), &pkt[8..]);
        assert_eq!(f.dst_mac().to_string(), "02:fa:00:00:00:01");
        assert_eq!(f.src_mac(), MacAddr(SRC));
        assert_eq!(f.ethertype(), 0x0800);
        assert_eq!(f.inner_ipv4_src(), Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(f.inner_ipv4_dst(), Some(Ipv4Addr::new(10, 244, 7, 9)));
        assert_eq!(
            f.inner_ip_dst(),
            Some(IpAddr::V4(Ipv4Addr::new(10, 244, 7, 9)))
        );
        assert_eq!(f.inner_ipv6_src(), None);
        let mut again = Vec::new();
        f.write_datagram(&mut again);
        assert_eq!(again, dg);
    }

    #[test]
    fn short_or_non_ipv4_inner_has_no_ip() {
        let mut pkt = encode_vxlan_header(1).to_vec();
        pkt.extend_from_slice(&ether(ETHERTYPE_IPV4, &ipv4_packet()[..19]));
        let f = VxlanFrame::from_vxlan_payload(&pkt).unwrap();
        assert_eq!(f.inner_ipv4_src(), None);
        let mut pkt = encode_vxlan_header(1).to_vec();
        let mut v6_in_v4 = ipv4_packet();
        v6_in_v4[0] = 0x65;
        pkt.extend_from_slice(&ether(ETHERTYPE_IPV4, &v6_in_v4));
        assert_eq!(
            VxlanFrame::from_vxlan_payload(&pkt)
                .unwrap()
                .inner_ipv4_dst(),
            None
        );
    }

    #[test]
    fn arp_frame() {
        let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
        arp.extend_from_slice(&SRC);
        arp.extend_from_slice(&[10, 244, 1, 0]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 244, 7, 0]);
        let mut pkt = encode_vxlan_header(1).to_vec();
        pkt.extend_from_slice(&ether(ETHERTYPE_ARP, &arp));
        let f = VxlanFrame::from_vxlan_payload(&pkt).unwrap();
        assert_eq!(f.inner_ipv4_src(), Some(Ipv4Addr::new(10, 244, 1, 0)));
        assert_eq!(f.inner_ipv4_dst(), Some(Ipv4Addr::new(10, 244, 7, 0)));
        let mut short = pkt.clone();
        short.truncate(pkt.len() - 1);
        let f = VxlanFrame::from_vxlan_payload(&short).unwrap();
        assert_eq!(f.inner_ipv4_dst(), None);
    }

    #[test]
    fn ipv6_frame() {
        let mut ip = vec![0x60, 0, 0, 0, 0, 0, 59, 64];
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let mut pkt = encode_vxlan_header(2).to_vec();
        pkt.extend_from_slice(&ether(ETHERTYPE_IPV6, &ip));
        let f = VxlanFrame::from_vxlan_payload(&pkt).unwrap();
        assert_eq!(f.inner_ip_src(), Some(IpAddr::V6(src)));
        assert_eq!(f.inner_ipv6_dst(), Some(dst));
        assert_eq!(f.inner_ipv4_src(), None);
    }

    #[test]
    fn rejects() {
        assert_eq!(parse_datagram(&[]), Err(DatagramError::Empty));
        assert_eq!(parse_datagram(&[7, 0]), Err(DatagramError::UnknownKind(7)));
        assert_eq!(parse_datagram(&[1, 8, 0, 0]), Err(DatagramError::Truncated));
        let mut pkt = encode_vxlan_header(1).to_vec();
        pkt.extend_from_slice(&[0; 14]);
        let mut bad = pkt.clone();
        bad[0] = 0x88;
        assert_eq!(
            VxlanFrame::from_vxlan_payload(&bad),
            Err(DatagramError::BadVxlanFlags(0x88))
        );
        let mut bad = pkt.clone();
        bad[7] = 1;
        assert_eq!(
            VxlanFrame::from_vxlan_payload(&bad),
            Err(DatagramError::ReservedBitsSet)
        );
        assert_eq!(
            VxlanFrame::from_vxlan_payload(&pkt[..21]),
            Err(DatagramError::FrameTooShort(13))
        );
        assert!(VxlanFrame::from_vxlan_payload(&pkt).is_ok());
        assert_eq!(DatagramError::Truncated.reason(), "truncated");
    }
}
