//! Property tests over the whole wire format: every message type round-trips, any truncation is
//! reported as incomplete (never as a different message), appended fields are ignored, chunked
//! streams decode identically, and arbitrary bytes never panic a decoder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use petrel_proto::codec::FRAME_HEADER_LEN;
use petrel_proto::control::{decode_frame, encode, encode_to_vec, FrameDecoder};
use petrel_proto::enrol::{decode_enrol_frame, encode_enrol, EnrolDecoder};
use petrel_proto::stream::{
    decode_stream_open, decode_stream_result, encode_stream_open, encode_stream_result,
};
use petrel_proto::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn node_name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}"
}

fn site() -> impl Strategy<Value = String> {
    "([A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?)?"
}

fn text(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("\\PC{{0,{max_chars}}}")).unwrap()
}

fn host() -> impl Strategy<Value = String> {
    "[!-~]{1,60}"
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<Ipv4Addr>().prop_map(IpAddr::V4),
        any::<Ipv6Addr>().prop_map(IpAddr::V6),
    ]
}

fn cidr() -> impl Strategy<Value = IpCidr> {
    (ip(), any::<u8>()).prop_map(|(ip, p)| {
        let max = if ip.is_ipv4() { 33 } else { 129 };
        IpCidr::new_truncating(ip, p % max).unwrap()
    })
}

fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..300)
}

fn self_view() -> impl Strategy<Value = AgentSelfView> {
    (
        vec(cidr(), 0..=16),
        proptest::option::of(mac()),
        vec(ip(), 0..=16),
        text(8),
        any::<u64>(),
    )
        .prop_map(
            |(pod_cidrs, vtep_mac, underlay_addrs, datapath, capabilities)| AgentSelfView {
                pod_cidrs,
                vtep_mac,
                underlay_addrs,
                datapath,
                capabilities,
            },
        )
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        text(8),
        node_name(),
        text(32),
        self_view(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(protocol_version, alpn, node_name, agent_version, self_view, routes_digest)| Hello {
                protocol_version,
                alpn,
                node_name,
                agent_version,
                self_view,
                routes_digest,
            },
        )
}

fn route() -> impl Strategy<Value = Route> {
    (node_name(), site(), cidr(), mac(), ip(), any::<bool>()).prop_map(
        |(node_name, site, pod_cidr, vtep_mac, underlay, direct)| Route {
            node_name,
            site,
            pod_cidr,
            vtep_mac,
            underlay,
            path: if direct {
                RoutePath::Direct
            } else {
                RoutePath::ViaHub
            },
        },
    )
}

fn route_entry() -> impl Strategy<Value = RouteEntry> {
    (
        node_name(),
        site(),
        vec(cidr(), 0..4),
        mac(),
        ip(),
        any::<u16>(),
    )
        .prop_map(
            |(node_name, site, pod_cidrs, vtep_mac, underlay, mtu)| RouteEntry {
                node_name,
                site,
                pod_cidrs,
                vtep_mac,
                underlay,
                mtu,
            },
        )
}

fn route_sync() -> impl Strategy<Value = RouteSync> {
    (
        any::<bool>(),
        vec(route_entry(), 0..12),
        vec(node_name(), 0..6),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(reset, upserts, removals, digest)| RouteSync {
            reset,
            upserts,
            removals,
            digest,
        })
}

fn gateway() -> impl Strategy<Value = GatewayEndpoint> {
    (text(40), host(), 1..=u16::MAX, any::<bool>()).prop_map(|(name, host, port, active)| {
        GatewayEndpoint {
            name,
            host,
            port,
            active,
        }
    })
}

fn egress_policy() -> impl Strategy<Value = petrel_proto::control::EgressPolicy> {
    (
        vec(ip(), 0..8),
        vec(cidr(), 0..8),
        vec(1..=u16::MAX, 0..4),
        proptest::option::of(vec(1..=u16::MAX, 0..4)),
    )
        .prop_map(|(node_addresses, pod_cidrs, node_ports, pod_ports)| {
            petrel_proto::control::EgressPolicy {
                node_addresses,
                pod_cidrs,
                node_ports,
                pod_ports,
            }
        })
}

/// The trailing fields of a view, in wire order: a hub from before one sends none of it or of
/// those after it.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Trailing {
    EgressPolicy,
    SiteMtus,
    RoutedSites,
    ReconnectSpread,
}

const TRAILING: [Trailing; 4] = [
    Trailing::EgressPolicy,
    Trailing::SiteMtus,
    Trailing::RoutedSites,
    Trailing::ReconnectSpread,
];

/// `msg` as a hub from before trailing field `first_missing` would have sent it (and, for the
/// egress policy, a hello as an agent from before its trailing route digest).
fn from_before(msg: &ControlMessage, first_missing: Trailing) -> ControlMessage {
    let cut = |v: &mut HubView| {
        if first_missing <= Trailing::EgressPolicy {
            v.egress = Default::default();
        }
        if first_missing <= Trailing::SiteMtus {
            v.site_mtus.clear();
        }
        if first_missing <= Trailing::RoutedSites {
            v.routed_sites.clear();
        }
        v.reconnect_spread_ms = 0;
    };
    let mut m = msg.clone();
    match &mut m {
        ControlMessage::Update(v) => cut(v),
        ControlMessage::Welcome(w) => cut(&mut w.view),
        ControlMessage::Hello(h) if first_missing == Trailing::EgressPolicy => {
            h.routes_digest = None
        }
        _ => {}
    }
    m
}

fn view() -> impl Strategy<Value = HubView> {
    (
        vec(gateway(), 0..6),
        vec(route(), 0..24),
        576..=u16::MAX,
        egress_policy(),
        vec((site(), 576..=u16::MAX), 0..4),
        vec(site(), 0..3),
        any::<u32>(),
    )
        .prop_map(
            |(gateways, routes, site_mtu, egress, mtus, routed_sites, reconnect_spread_ms)| {
                HubView {
                    gateways,
                    routes,
                    site_mtu,
                    egress,
                    site_mtus: mtus
                        .into_iter()
                        .map(|(site, mtu)| petrel_proto::control::SiteMtu { site, mtu })
                        .collect(),
                    routed_sites,
                    reconnect_spread_ms,
                }
            },
        )
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (
        any::<u16>(),
        text(40),
        node_name(),
        site(),
        1..=u32::MAX,
        view(),
    )
        .prop_map(
            |(protocol_version, hub_id, node_name, site, keepalive_interval_ms, view)| Welcome {
                protocol_version,
                hub_id,
                node_name,
                site,
                keepalive_interval_ms,
                view,
            },
        )
}

fn bundle() -> impl Strategy<Value = CertBundle> {
    (blob(), blob()).prop_map(|(cert_der, ca_der)| CertBundle { cert_der, ca_der })
}

fn control_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        hello().prop_map(ControlMessage::Hello),
        welcome().prop_map(ControlMessage::Welcome),
        view().prop_map(ControlMessage::Update),
        (any::<u64>(), any::<u64>()).prop_map(|(nonce, sent_at_micros)| {
            ControlMessage::Ping(Ping {
                nonce,
                sent_at_micros,
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(nonce, echo_sent_at_micros)| {
            ControlMessage::Pong(Pong {
                nonce,
                echo_sent_at_micros,
            })
        }),
        (any::<u16>(), any::<u32>(), text(100)).prop_map(|(code, retry_after_ms, message)| {
            ControlMessage::GoingAway(GoingAway {
                reason: GoingAwayReason::from_code(code),
                retry_after_ms,
                message,
            })
        }),
        blob().prop_map(|csr_der| ControlMessage::RenewRequest(RenewRequest { csr_der })),
        prop_oneof![
            bundle().prop_map(Ok),
            (any::<u16>(), text(100)).prop_map(|(code, message)| Err(ErrorInfo { code, message })),
        ]
        .prop_map(|result| ControlMessage::RenewResponse(RenewResponse { result })),
        route_sync().prop_map(ControlMessage::Routes),
        (node_name(), ip(), any::<u16>()).prop_map(|(node, addr, port)| ControlMessage::PeerOffer(
            PeerOffer { node, addr, port }
        )),
        (0x80u8..=0xff)
            .prop_filter("a known optional type", |t| *t
                != control::msg_type::PEER_OFFER)
            .prop_map(|msg_type| ControlMessage::Unknown { msg_type }),
    ]
}

fn enrol_message() -> impl Strategy<Value = EnrolMessage> {
    prop_oneof![
        (any::<u16>(), text(100), node_name(), blob()).prop_map(
            |(protocol_version, token, node_name, csr_der)| EnrolMessage::Request(EnrolRequest {
                protocol_version,
                token,
                node_name,
                csr_der,
            })
        ),
        prop_oneof![
            bundle().prop_map(Ok),
            (any::<u16>(), text(100)).prop_map(|(code, message)| Err(EnrolError {
                code: EnrolErrorCode::from_code(code),
                message,
            })),
        ]
        .prop_map(|result| EnrolMessage::Response(EnrolResponse { result })),
        (0x80u8..=0xff).prop_map(|msg_type| EnrolMessage::Unknown { msg_type }),
    ]
}

fn stream_open() -> impl Strategy<Value = StreamOpen> {
    (ip(), 1..=u16::MAX, text(100), any::<u32>()).prop_map(
        |(ip, port, display, connect_timeout_ms)| StreamOpen {
            target: StreamTarget { ip, port, display },
            connect_timeout_ms,
        },
    )
}

fn stream_result() -> impl Strategy<Value = StreamResult> {
    prop_oneof![
        Just(StreamResult { result: Ok(()) }),
        (any::<u16>(), text(100)).prop_map(|(code, message)| StreamResult {
            result: Err(DialError {
                code: DialErrorCode::from_code(code),
                message,
            }),
        }),
    ]
}

/// Re-frames `body` with a correct length header.
fn reframe(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![msg_type];
    v.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Splits `data` into chunks whose sizes cycle through `sizes`.
fn chunks<'a>(data: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
        i += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn control_round_trip(msg in control_message()) {
        let bytes = encode_to_vec(&msg).unwrap();
        prop_assert_eq!(decode_frame(&bytes).unwrap(), Some((msg.clone(), bytes.len())));
        // Canonical: re-encoding the decoded value gives the same bytes.
        let (again, _) = decode_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(encode_to_vec(&again).unwrap(), bytes);
    }

    #[test]
    fn control_truncation_is_incomplete_never_wrong(msg in control_message()) {
        let bytes = encode_to_vec(&msg).unwrap();
        for cut in 0..bytes.len() {
            prop_assert_eq!(decode_frame(&bytes[..cut]).unwrap(), None);
        }
        // A frame whose length field agrees with a shortened body must be a Truncated error.
        let body = &bytes[FRAME_HEADER_LEN..];
        if !matches!(msg, ControlMessage::Unknown { .. }) {
            for cut in 0..body.len() {
                let framed = reframe(bytes[0], &body[..cut]);
                let got = decode_frame(&framed);
                // A view's trailing egress policy is optional: a body cut exactly before it is
                // what an older hub sends, and decodes with the empty policy (which is the
                // message itself when its policy was empty already).
                // Likewise a body cut exactly before the site MTUs, the routed sites or the
                // reconnect spread (hubs from before them).
                let older = matches!(&got, Ok(Some((m, _))) if TRAILING.iter().any(|t| *m == from_before(&msg, *t)));
                prop_assert!(
                    matches!(got, Err(DecodeError::Truncated { .. })) || older,
                    "cut {} of {}: {:?}", cut, body.len(), got
                );
            }
        }
    }

    #[test]
    fn control_trailing_fields_ignored(msg in control_message(), extra in vec(any::<u8>(), 1..64)) {
        let bytes = encode_to_vec(&msg).unwrap();
        let mut body = bytes[FRAME_HEADER_LEN..].to_vec();
        body.extend_from_slice(&extra);
        let framed = reframe(bytes[0], &body);
        // A hello without a route digest reads the next 8 bytes as one: that is what a newer
        // agent's appended field is.
        let mut expected = msg;
        if let ControlMessage::Hello(h) = &mut expected {
            if h.routes_digest.is_none() && extra.len() >= 8 {
                h.routes_digest = Some(u64::from_be_bytes(extra[..8].try_into().unwrap()));
            }
        }
        prop_assert_eq!(decode_frame(&framed).unwrap(), Some((expected, framed.len())));
    }

    #[test]
    fn frame_decoder_any_chunking(
        msgs in vec(control_message(), 1..8),
        sizes in vec(1usize..200, 1..10),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode(m, &mut stream).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in chunks(&stream, &sizes) {
            dec.push(chunk).unwrap();
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn control_arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..600)) {
        let _ = decode_frame(&data);
        let mut dec = FrameDecoder::new();
        if dec.push(&data).is_ok() {
            while let Ok(Some(_)) = dec.next_message() {}
        }
    }

    #[test]
    fn control_typed_garbage_never_panics(t in 0u8..=0x0a, body in vec(any::<u8>(), 0..600)) {
        // Known type numbers with random bodies reach the field decoders.
        if let Ok(Some((msg, _))) = decode_frame(&reframe(t, &body)) {
            let re = encode_to_vec(&msg).unwrap();
            prop_assert_eq!(decode_frame(&re).unwrap(), Some((msg, re.len())));
        }
    }

    #[test]
    fn enrol_round_trip_and_truncation(msg in enrol_message(), extra in vec(any::<u8>(), 0..16)) {
        let mut bytes = Vec::new();
        encode_enrol(&msg, &mut bytes).unwrap();
        prop_assert_eq!(decode_enrol_frame(&bytes).unwrap(), Some((msg.clone(), bytes.len())));
        for cut in 0..bytes.len() {
            prop_assert_eq!(decode_enrol_frame(&bytes[..cut]).unwrap(), None);
        }
        if !matches!(msg, EnrolMessage::Unknown { .. }) {
            let body = &bytes[FRAME_HEADER_LEN..];
            for cut in 0..body.len() {
                let got = decode_enrol_frame(&reframe(bytes[0], &body[..cut]));
                prop_assert!(matches!(got, Err(DecodeError::Truncated { .. })), "{:?}", got);
            }
            let mut longer = body.to_vec();
            longer.extend_from_slice(&extra);
            let framed = reframe(bytes[0], &longer);
            prop_assert_eq!(decode_enrol_frame(&framed).unwrap(), Some((msg.clone(), framed.len())));
        }
        match &msg {
            EnrolMessage::Request(r) => {
                prop_assert_eq!(decode_enrol_request(&bytes).unwrap(), Some((r.clone(), bytes.len())));
            }
            EnrolMessage::Response(r) => {
                prop_assert_eq!(decode_enrol_response(&bytes).unwrap(), Some((r.clone(), bytes.len())));
            }
            EnrolMessage::Unknown { .. } => {
                prop_assert_eq!(decode_enrol_request(&bytes).unwrap(), None);
            }
        }
    }

    #[test]
    fn enrol_decoder_chunking(msgs in vec(enrol_message(), 1..4), sizes in vec(1usize..100, 1..6)) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_enrol(m, &mut stream).unwrap();
        }
        let mut dec = EnrolDecoder::new();
        let mut got = Vec::new();
        for chunk in chunks(&stream, &sizes) {
            dec.push(chunk).unwrap();
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn enrol_arbitrary_bytes_never_panic(t in 0x0eu8..=0x13, body in vec(any::<u8>(), 0..400), raw in vec(any::<u8>(), 0..64)) {
        let _ = decode_enrol_frame(&raw);
        let _ = decode_enrol_request(&raw);
        let _ = decode_enrol_response(&raw);
        if let Ok(Some((msg, _))) = decode_enrol_frame(&reframe(t, &body)) {
            let mut re = Vec::new();
            encode_enrol(&msg, &mut re).unwrap();
            prop_assert_eq!(decode_enrol_frame(&re).unwrap(), Some((msg, re.len())));
        }
    }

    #[test]
    fn stream_headers_round_trip(
        open in stream_open(),
        result in stream_result(),
        payload in vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = Vec::new();
        encode_stream_open(&open, &mut bytes).unwrap();
        let header = bytes.len();
        for cut in 0..header {
            prop_assert_eq!(decode_stream_open(&bytes[..cut]).unwrap(), None);
        }
        bytes.extend_from_slice(&payload);
        let (got, used) = decode_stream_open(&bytes).unwrap().unwrap();
        prop_assert_eq!(&got, &open);
        prop_assert_eq!(&bytes[used..], &payload[..]);

        let mut bytes = Vec::new();
        encode_stream_result(&result, &mut bytes).unwrap();
        let header = bytes.len();
        for cut in 0..header {
            prop_assert_eq!(decode_stream_result(&bytes[..cut]).unwrap(), None);
        }
        let body = bytes[FRAME_HEADER_LEN..].to_vec();
        for cut in 0..body.len() {
            let got = decode_stream_result(&reframe(bytes[0], &body[..cut]));
            prop_assert!(matches!(got, Err(DecodeError::Truncated { .. })), "{:?}", got);
        }
        bytes.extend_from_slice(&payload);
        let (got, used) = decode_stream_result(&bytes).unwrap().unwrap();
        prop_assert_eq!(got, result);
        prop_assert_eq!(&bytes[used..], &payload[..]);
    }

    #[test]
    fn stream_arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..300), body in vec(any::<u8>(), 0..120)) {
        let _ = decode_stream_open(&data);
        let _ = decode_stream_result(&data);
        if let Ok(Some((open, _))) = decode_stream_open(&reframe(0x20, &body)) {
            let mut re = Vec::new();
            encode_stream_open(&open, &mut re).unwrap();
            prop_assert_eq!(decode_stream_open(&re).unwrap(), Some((open, re.len())));
        }
        if let Ok(Some((res, _))) = decode_stream_result(&reframe(0x21, &body)) {
            let mut re = Vec::new();
            encode_stream_result(&res, &mut re).unwrap();
            prop_assert_eq!(decode_stream_result(&re).unwrap(), Some((res, re.len())));
        }
    }

    #[test]
    fn datagram_round_trip(vni in 0u32..=0x00ff_ffff, inner in vec(any::<u8>(), 14..200)) {
        let mut vxlan = encode_vxlan_header(vni).to_vec();
        vxlan.extend_from_slice(&inner);
        let mut dg = Vec::new();
        write_vxlan_datagram(&vxlan, &mut dg);
        let f = parse_datagram(&dg).unwrap();
        prop_assert_eq!(f.vni(), vni);
        prop_assert_eq!(f.vxlan_bytes(), &vxlan[..]);
        prop_assert_eq!(f.inner(), &inner[..]);
        prop_assert_eq!(f.dst_mac().0, <[u8; 6]>::try_from(&inner[..6]).unwrap());
        prop_assert_eq!(f.src_mac().0, <[u8; 6]>::try_from(&inner[6..12]).unwrap());
        prop_assert_eq!(f.ethertype(), u16::from_be_bytes([inner[12], inner[13]]));
        for cut in 0..dg.len() {
            prop_assert!(parse_datagram(&dg[..cut]).is_err() || cut >= 1 + 8 + 14);
        }
    }

    #[test]
    fn datagram_arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..120)) {
        if let Ok(f) = parse_datagram(&data) {
            let _ = (f.vni(), f.dst_mac(), f.src_mac(), f.ethertype(), f.l3());
            let _ = (f.inner_ipv4_src(), f.inner_ipv4_dst(), f.inner_ip_src(), f.inner_ip_dst());
            let _ = (f.inner_ipv6_src(), f.inner_ipv6_dst(), f.arp_ipv4());
            let mut again = Vec::new();
            f.write_datagram(&mut again);
            prop_assert_eq!(&again[..], &data[..]);
        }
    }

    #[test]
    fn datagram_typed_garbage(vni in any::<u32>(), l3 in vec(any::<u8>(), 0..60), et in prop_oneof![Just(0x0800u16), Just(0x0806), Just(0x86dd), any::<u16>()]) {
        let mut vxlan = encode_vxlan_header(vni).to_vec();
        vxlan.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
        vxlan.extend_from_slice(&et.to_be_bytes());
        vxlan.extend_from_slice(&l3);
        let f = VxlanFrame::from_vxlan_payload(&vxlan).unwrap();
        prop_assert_eq!(f.vni(), vni & 0x00ff_ffff);
        let _ = (f.inner_ip_src(), f.inner_ip_dst(), f.arp_ipv4());
        if et == 0x0800 && l3.len() >= 20 && l3[0] >> 4 == 4 && l3[0] & 0x0f >= 5 {
            prop_assert_eq!(f.inner_ipv4_src().unwrap().octets(), <[u8; 4]>::try_from(&l3[12..16]).unwrap());
        }
    }

    #[test]
    fn text_types_round_trip(m in mac(), c in cidr()) {
        prop_assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        prop_assert_eq!(c.to_string().parse::<IpCidr>().unwrap(), c);
        prop_assert!(c.contains(c.addr()));
    }
}
