//! ICMP "fragmentation needed" for frames too large for a tunnel: the hub answers like a router
//! on the path, so the sending pod's kernel lowers its path MTU and TCP adapts, instead of the
//! frame vanishing. The answer is a whole VXLAN payload addressed back to the sender's VTEP.

use std::net::Ipv4Addr;

use petrel_proto::datagram::{ETHERNET_HEADER_LEN, ETHERTYPE_IPV4};
use petrel_proto::VxlanFrame;

const IPPROTO_ICMP: u8 = 1;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds the VXLAN payload of an ICMP type 3 code 4 for `frame` with next-hop MTU `mtu`, or
/// `None` when none is due: not IPv4, DF not set, or itself an ICMP error (never answer those).
pub fn frag_needed(frame: &VxlanFrame<'_>, mtu: u16) -> Option<Vec<u8>> {
    if frame.ethertype() != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.l3();
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ihl < 20 || ip.len() < ihl {
        return None;
    }
    let df = ip.get(6)? & 0x40 != 0;
    if !df {
        return None;
    }
    if ip[9] == IPPROTO_ICMP
        && ip
            .get(ihl)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
    {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let quoted = &ip[..ip.len().min(ihl + 8)];

    let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    let total = u16::try_from(20 + icmp.len()).ok()?;
    let mut ip_hdr = vec![0x45, 0];
    ip_hdr.extend_from_slice(&total.to_be_bytes());
    ip_hdr.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    // As if the destination's path answered: source is the original destination.
    ip_hdr.extend_from_slice(&dst.octets());
    ip_hdr.extend_from_slice(&src.octets());
    let c = checksum(&ip_hdr);
    ip_hdr[10..12].copy_from_slice(&c.to_be_bytes());

    let mut out = Vec::with_capacity(8 + ETHERNET_HEADER_LEN + ip_hdr.len() + icmp.len());
    out.extend_from_slice(&petrel_proto::encode_vxlan_header(frame.vni()));
    out.extend_from_slice(&frame.src_mac().0);
    out.extend_from_slice(&frame.dst_mac().0);
    out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    out.extend_from_slice(&ip_hdr);
    out.extend_from_slice(&icmp);
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn answers_df_ipv4_with_a_valid_icmp_addressed_back() {
        let mut f = super::super::tests::frame(
            1,
            "02:fa:00:00:00:01",
            "02:fa:00:00:00:03",
            "10.244.1.2".parse().unwrap(),
            "10.244.3.2".parse().unwrap(),
        );
        let vx = VxlanFrame::from_vxlan_payload(&f).unwrap();
        let out = frag_needed(&vx, 1380).unwrap();
        let reply = VxlanFrame::from_vxlan_payload(&out).unwrap();
        assert_eq!(reply.src_mac(), vx.dst_mac());
        assert_eq!(reply.dst_mac(), vx.src_mac());
        assert_eq!(reply.inner_ipv4_src(), vx.inner_ipv4_dst());
        assert_eq!(reply.inner_ipv4_dst(), vx.inner_ipv4_src());
        let l3 = reply.l3();
        assert_eq!(checksum(&l3[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&l3[20..]), 0, "ICMP checksum");
        assert_eq!(&l3[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([l3[26], l3[27]]), 1380);
        // Without DF there is nothing to say.
        f[8 + 14 + 6] = 0;
        assert!(frag_needed(&VxlanFrame::from_vxlan_payload(&f).unwrap(), 1380).is_none());
    }
}

#[cfg(test)]
#[path = "icmp_tests.rs"]
mod mutant_tests;
