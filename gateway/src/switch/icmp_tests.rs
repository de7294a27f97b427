//! Frag-needed answers checked byte for byte against values computed outside this code: the
//! RFC 1071 example checksum and replies computed with an independent implementation of the
//! Internet checksum (Python, `sum of 16-bit words, folded, complemented`), never with
//! [`super::checksum`] itself.

#![allow(clippy::unwrap_used)]

use super::*;

const VTEP_A: [u8; 6] = [0x02, 0xfa, 0, 0, 0, 0x03];
const VTEP_B: [u8; 6] = [0x02, 0xfa, 0, 0, 0, 0x01];

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// VXLAN (VNI 1) + Ethernet from VTEP_B to VTEP_A + `l3`.
fn vxlan(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    f.extend_from_slice(&VTEP_A);
    f.extend_from_slice(&VTEP_B);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// 10.244.1.2 -> 10.244.3.2, DF, UDP 1 -> 2, then 20 bytes of 0xab: 56 bytes of IPv4.
fn udp_df() -> Vec<u8> {
    let mut ip = hex("4500003c00004000401100000af401020af40302");
    ip.extend_from_slice(&hex("0001000200080000"));
    ip.extend_from_slice(&[0xab; 20]);
    ip
}

fn answer(l3: &[u8], mtu: u16) -> Option<Vec<u8>> {
    let f = vxlan(0x0800, l3);
    frag_needed(&VxlanFrame::from_vxlan_payload(&f).unwrap(), mtu)
}

#[test]
fn internet_checksum_matches_rfc_1071() {
    // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2, checksum 0x220d.
    assert_eq!(checksum(&hex("0001f203f4f5f6f7")), 0x220d);
    // Odd length: the last byte is padded with a zero on the right.
    assert_eq!(checksum(&[0x01]), !0x0100);
    assert_eq!(checksum(&[0x00, 0x01, 0x02]), !0x0201);
    assert_eq!(checksum(&[]), 0xffff);
    // Carries are folded back in: 0xffff + 0x0002 = 0x1_0001 -> 0x0002, complemented 0xfffd.
    assert_eq!(checksum(&[0xff, 0xff, 0x00, 0x02]), 0xfffd);
}

#[test]
fn reply_is_the_independently_computed_packet() {
    let out = answer(&udp_df(), 1380).unwrap();
    let mut want = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    want.extend_from_slice(&VTEP_B); // back to the sender's VTEP
    want.extend_from_slice(&VTEP_A);
    want.extend_from_slice(&[0x08, 0x00]);
    // IPv4: total length 56, TTL 64, ICMP, checksum 0x60da, 10.244.3.2 -> 10.244.1.2.
    want.extend_from_slice(&hex("4500003800000000400160da0af403020af40102"));
    // ICMP 3/4, checksum 0x1853, MTU 1380, then the IP header and 8 bytes of the original.
    want.extend_from_slice(&hex(
        "03041853000005644500003c00004000401100000af401020af403020001000200080000",
    ));
    assert_eq!(out, want);
}

#[test]
fn odd_length_quote_and_total_length() {
    // A 25-byte packet: the quote is all of it (shorter than header + 8), an odd length.
    let mut ip = hex("4500001900004000400600000af401020af40302");
    ip.extend_from_slice(&[1, 2, 3, 4, 5]);
    let out = answer(&ip, 576).unwrap();
    let l3 = &out[8 + 14..];
    assert_eq!(
        &l3[..20],
        &hex("4500003500000000400160dd0af403020af40102")[..]
    );
    assert_eq!(
        &l3[20..],
        &hex("030412aa000002404500001900004000400600000af401020af403020102030405")[..]
    );
    assert_eq!(l3.len(), 0x35);
}

#[test]
fn quote_follows_the_header_length() {
    // IHL 6: a 24-byte header with one option word; the quote is 24 + 8 bytes.
    let mut ip = hex("4600004000004000401100000af401020af4030201010101");
    ip.extend_from_slice(&hex("0001000200080000"));
    ip.extend_from_slice(&[0xcd; 30]);
    let out = answer(&ip, 1400).unwrap();
    let l3 = &out[8 + 14..];
    assert_eq!(&l3[28..], &ip[..32]);
    assert_eq!(u16::from_be_bytes([l3[2], l3[3]]), 20 + 8 + 32);
    assert_eq!(&l3[12..16], &[10, 244, 3, 2]);
    assert_eq!(&l3[16..20], &[10, 244, 1, 2]);
}

#[test]
fn never_answers_icmp_errors_and_needs_df_and_ipv4() {
    let icmp = |ty: u8| {
        let mut ip = hex("4500002400004000400100000af401020af40302");
        ip.extend_from_slice(&[ty, 0, 0, 0, 0, 0, 0, 0]);
        ip.extend_from_slice(&[0; 8]);
        ip
    };
    // Destination unreachable, source quench, redirect, time exceeded, parameter problem.
    for ty in [3u8, 4, 5, 11, 12] {
        assert_eq!(answer(&icmp(ty), 1380), None, "ICMP type {ty}");
    }
    // Echo request and reply are not errors.
    for ty in [0u8, 8] {
        let out = answer(&icmp(ty), 1380).unwrap();
        assert_eq!(&out[8 + 14 + 20..8 + 14 + 22], &[3, 4]);
    }
    // The same type bytes under UDP are payload, not ICMP.
    let mut udp = icmp(3);
    udp[9] = 17;
    assert!(answer(&udp, 1380).is_some());
    // Without DF nothing is due; other flag bits do not count as DF.
    let mut no_df = udp_df();
    no_df[6] = 0x20; // MF only
    assert_eq!(answer(&no_df, 1380), None);
    no_df[6] = 0x80; // reserved bit
    assert_eq!(answer(&no_df, 1380), None);
    let mut df_and_offset = udp_df();
    df_and_offset[6] = 0x5f;
    assert!(answer(&df_and_offset, 1380).is_some());
    // Not IPv4: IPv6 and ARP frames get no answer.
    let f = vxlan(0x86dd, &udp_df());
    assert_eq!(
        frag_needed(&VxlanFrame::from_vxlan_payload(&f).unwrap(), 1380),
        None
    );
    let f = vxlan(0x0806, &udp_df());
    assert_eq!(
        frag_needed(&VxlanFrame::from_vxlan_payload(&f).unwrap(), 1380),
        None
    );
}

#[test]
fn malformed_headers_get_no_answer() {
    // IHL 4 (16 bytes) is not a header; IHL 15 (60 bytes) is longer than the packet.
    let mut ihl4 = udp_df();
    ihl4[0] = 0x44;
    assert_eq!(answer(&ihl4, 1380), None);
    let mut ihl15 = udp_df();
    ihl15[0] = 0x4f;
    assert_eq!(answer(&ihl15, 1380), None);
    // Exactly as long as the header: answered, the quote is the header alone.
    let out = answer(&udp_df()[..20], 1380).unwrap();
    assert_eq!(out.len(), 8 + 14 + 20 + 8 + 20);
    // One byte short of a header: nothing.
    assert_eq!(answer(&udp_df()[..19], 1380), None);
    assert_eq!(answer(&[], 1380), None);
}
