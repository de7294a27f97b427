//! Datagram parsing: every accessor on a parsed frame must be panic-free, the header must be
//! exactly what `encode_vxlan_header` writes for its VNI, and re-writing gives the input back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_proto::datagram::{
    encode_vxlan_header, parse_datagram, VxlanFrame, ETHERNET_HEADER_LEN, VXLAN_HEADER_LEN,
};

fn check(f: &VxlanFrame<'_>) {
    let bytes = f.vxlan_bytes();
    assert!(f.vni() <= 0x00ff_ffff);
    assert_eq!(
        &bytes[..VXLAN_HEADER_LEN],
        &encode_vxlan_header(f.vni())[..]
    );
    assert_eq!(f.inner(), &bytes[VXLAN_HEADER_LEN..]);
    assert!(f.inner().len() >= ETHERNET_HEADER_LEN);
    assert_eq!(&f.dst_mac().0[..], &f.inner()[..6]);
    assert_eq!(&f.src_mac().0[..], &f.inner()[6..12]);
    let _ = (f.ethertype(), f.l3(), f.arp_ipv4());
    let _ = (
        f.inner_ipv4_src(),
        f.inner_ipv4_dst(),
        f.inner_ipv6_src(),
        f.inner_ipv6_dst(),
    );
    let _ = (f.inner_ip_src(), f.inner_ip_dst());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = parse_datagram(data) {
        check(&f);
        let mut again = Vec::new();
        f.write_datagram(&mut again);
        assert_eq!(again, data);
    }
    if let Ok(f) = VxlanFrame::from_vxlan_payload(data) {
        check(&f);
        assert_eq!(f.vxlan_bytes(), data);
        let reparsed = VxlanFrame::from_vxlan_payload(f.vxlan_bytes()).expect("reparse");
        assert_eq!(reparsed, f);
    }
});
