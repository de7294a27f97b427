//! Tests that pin what a mutation run showed nothing else pins: every cap exactly at its value
//! and one past it, the cap constants against the numbers the crate docs promise, the checks
//! that are only reached by a hand-built body (site MTU, gateway hosts, reserved VXLAN bytes,
//! IPv4 IHL, IPv6 headers), the stream and enrolment preambles exactly at their limit, a
//! `FrameBuffer` filled by two pushes, and the redaction of join tokens in `Debug` output.
//!
//! Expected values come from the wire specification in `src/lib.rs` and from the frames built
//! by hand here, never from the encoder under test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use petrel_proto::codec::{
    self, check_host, check_node_name, check_protocol_version, check_site_name, is_critical,
    split_frame, FrameBuffer, FIRST_OPTIONAL_TYPE, MAX_ALPN_LEN, MAX_CERT_LEN, MAX_CSR_LEN,
    MAX_DATAPATH_LEN, MAX_DISPLAY_LEN, MAX_GATEWAYS, MAX_HOST_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN,
    MAX_NODE_NAME_LEN, MAX_POD_CIDRS, MAX_ROUTES, MAX_SITE_LEN, MAX_TOKEN_LEN, MAX_UNDERLAY_ADDRS,
    MAX_VERSION_STRING_LEN,
};
use petrel_proto::control::{
    decode_frame, encode_to_vec, msg_type, EgressPolicy, SiteMtu, MAX_EGRESS_PORTS,
    MAX_EGRESS_TARGETS, MIN_SITE_MTU,
};
use petrel_proto::datagram::{ETHERNET_HEADER_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, MAX_VNI};
use petrel_proto::enrol::{decode_enrol_frame, encode_enrol, EnrolDecoder, MAX_ENROL_PREAMBLE};
use petrel_proto::stream::{MAX_STREAM_HEADER, MAX_STREAM_PREAMBLE};
use petrel_proto::*;

/// `[type][len u32 BE][body]`, built by hand.
fn frame(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// u16 length + bytes.
fn wire_string(s: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Constants: the numbers of the wire specification (crate docs), not the names.

#[test]
fn cap_constants_match_the_specification() {
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(ALPN_TUNNEL, b"petrel/1");
    assert_eq!(ALPN_ENROL, b"petrel-enrol/1");
    assert_eq!(MAX_CONTROL_FRAME, 65_536);
    assert_eq!(FRAME_HEADER_LEN, 5);
    assert_eq!(FIRST_OPTIONAL_TYPE, 0x80);
    assert_eq!(MAX_NODE_NAME_LEN, 253);
    assert_eq!(MAX_NAME_LEN, 253);
    assert_eq!(MAX_HOST_LEN, 253);
    assert_eq!(MAX_SITE_LEN, 63);
    assert_eq!(MAX_ALPN_LEN, 32);
    assert_eq!(MAX_VERSION_STRING_LEN, 128);
    assert_eq!(MAX_DATAPATH_LEN, 32);
    assert_eq!(MAX_MESSAGE_LEN, 1024);
    assert_eq!(MAX_TOKEN_LEN, 1024);
    assert_eq!(MAX_DISPLAY_LEN, 512);
    assert_eq!(MAX_CSR_LEN, 4_096);
    assert_eq!(MAX_CERT_LEN, 16_384);
    assert_eq!(MAX_POD_CIDRS, 16);
    assert_eq!(MAX_UNDERLAY_ADDRS, 16);
    assert_eq!(MAX_GATEWAYS, 64);
    assert_eq!(MAX_ROUTES, 65_535);
    assert_eq!(MIN_SITE_MTU, 576);
    assert_eq!(MAX_EGRESS_TARGETS, 4096);
    assert_eq!(MAX_EGRESS_PORTS, 64);
    assert_eq!(MAX_STREAM_HEADER, 4096);
    assert_eq!(MAX_STREAM_PREAMBLE, 16_384);
    assert_eq!(MAX_ENROL_PREAMBLE, 2 * (65_536 + 5));
    assert_eq!(VXLAN_HEADER_LEN, 8);
    assert_eq!(DATAGRAM_OVERHEAD, 1);
    assert_eq!(DATAGRAM_KIND_VXLAN, 1);
    assert_eq!(ETHERNET_HEADER_LEN, 14);
    assert_eq!(MAX_VNI, 0xff_ffff);
    // Type numbers of the table in the crate docs.
    use petrel_proto::enrol::msg_type as enrol_type;
    use petrel_proto::stream::msg_type as stream_type;
    assert_eq!(
        [
            msg_type::HELLO,
            msg_type::WELCOME,
            msg_type::UPDATE,
            msg_type::PING,
            msg_type::PONG,
            msg_type::GOING_AWAY,
            msg_type::RENEW_REQUEST,
            msg_type::RENEW_RESPONSE,
            enrol_type::ENROL_REQUEST,
            enrol_type::ENROL_RESPONSE,
            stream_type::STREAM_OPEN,
            stream_type::STREAM_RESULT,
        ],
        [1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x11, 0x20, 0x21]
    );
}

#[test]
fn protocol_version_check_and_critical_range() {
    assert_eq!(check_protocol_version(1), Ok(()));
    for bad in [0, 2, 0xffff] {
        assert_eq!(
            check_protocol_version(bad),
            Err(DecodeError::UnsupportedVersion {
                got: bad,
                supported: 1
            })
        );
    }
    assert!(is_critical(0x00));
    assert!(is_critical(0x7f));
    assert!(!is_critical(0x80));
    assert!(!is_critical(0xff));
    // Through the decoder: 0x7f closes, 0x80 is skipped.
    assert_eq!(
        decode_frame(&frame(0x7f, &[])),
        Err(DecodeError::UnknownCriticalType(0x7f))
    );
    assert_eq!(
        decode_frame(&frame(0x80, &[])),
        Ok(Some((ControlMessage::Unknown { msg_type: 0x80 }, 5)))
    );
}

#[test]
fn message_names_and_types() {
    let ping = Ping {
        nonce: 5,
        sent_at_micros: 6,
    };
    let cases: Vec<(ControlMessage, u8, &str)> = vec![
        (ControlMessage::Hello(hello()), 1, "hello"),
        (ControlMessage::Welcome(welcome()), 2, "welcome"),
        (ControlMessage::Update(view()), 3, "update"),
        (ControlMessage::Ping(ping), 4, "ping"),
        (ControlMessage::Pong(ping.pong()), 5, "pong"),
        (
            ControlMessage::GoingAway(GoingAway {
                reason: GoingAwayReason::Restart,
                retry_after_ms: 1,
                message: String::new(),
            }),
            6,
            "going_away",
        ),
        (
            ControlMessage::RenewRequest(RenewRequest { csr_der: vec![1] }),
            7,
            "renew_request",
        ),
        (
            ControlMessage::RenewResponse(RenewResponse {
                result: Err(ErrorInfo {
                    code: 3,
                    message: "no".into(),
                }),
            }),
            8,
            "renew_response",
        ),
        (ControlMessage::Unknown { msg_type: 0x9a }, 0x9a, "unknown"),
    ];
    for (msg, t, name) in cases {
        assert_eq!(msg.msg_type(), t, "{name}");
        assert_eq!(msg.name(), name);
        let bytes = encode_to_vec(&msg).unwrap();
        assert_eq!(bytes[0], t);
        assert_eq!(decode_frame(&bytes).unwrap(), Some((msg, bytes.len())));
    }
    assert_eq!(
        ping.pong(),
        Pong {
            nonce: 5,
            echo_sent_at_micros: 6
        }
    );
}

#[test]
fn reason_and_error_codes_are_the_documented_numbers() {
    use GoingAwayReason as G;
    for (r, c) in [
        (G::Shutdown, 1),
        (G::Restart, 2),
        (G::Replaced, 3),
        (G::Unauthorized, 4),
        (G::NodeRemoved, 5),
        (G::ProtocolError, 6),
        (G::Other(0), 0),
        (G::Other(7), 7),
        (G::Other(999), 999),
    ] {
        assert_eq!(r.code(), c);
        assert_eq!(G::from_code(c), r);
    }
    use DialErrorCode as D;
    for (r, c) in [
        (D::Refused, 1),
        (D::Timeout, 2),
        (D::Unreachable, 3),
        (D::NotAllowed, 4),
        (D::TooManyPending, 5),
        (D::Internal, 6),
        (D::Other(0), 0),
        (D::Other(7), 7),
    ] {
        assert_eq!(r.code(), c);
        assert_eq!(D::from_code(c), r);
    }
    use EnrolErrorCode as E;
    for (r, c) in [
        (E::InvalidToken, 1),
        (E::ExpiredToken, 2),
        (E::TokenAlreadyUsed, 3),
        (E::WrongNode, 4),
        (E::UnknownNode, 5),
        (E::BadCsr, 6),
        (E::UnsupportedVersion, 7),
        (E::Internal, 8),
        (E::Other(0), 0),
        (E::Other(9), 9),
    ] {
        assert_eq!(r.code(), c);
        assert_eq!(E::from_code(c), r);
    }
    // A GoingAway body by hand: reason 5, retry 0x01020304, message "bye".
    let mut body = vec![0, 5, 1, 2, 3, 4];
    body.extend_from_slice(&wire_string(b"bye"));
    assert_eq!(
        decode_frame(&frame(msg_type::GOING_AWAY, &body)).unwrap(),
        Some((
            ControlMessage::GoingAway(GoingAway {
                reason: GoingAwayReason::NodeRemoved,
                retry_after_ms: 0x0102_0304,
                message: "bye".into(),
            }),
            5 + body.len()
        ))
    );
}

// ---------------------------------------------------------------------------------------------
// Validators.

#[test]
fn validators_at_their_limits() {
    assert_eq!(check_node_name(&"a".repeat(253)), Ok(()));
    assert!(check_node_name(&"a".repeat(254)).is_err());
    assert!(check_node_name("").is_err());
    assert!(check_node_name("a.-b").is_err());
    assert!(check_node_name("a.b-").is_err());
    assert_eq!(check_node_name("a-b.c0"), Ok(()));
    assert!(codec::is_valid_node_name("edge-1"));
    assert!(!codec::is_valid_node_name("Edge-1"));
    assert_eq!(check_site_name(""), Ok(()));
    assert_eq!(check_site_name(&"s".repeat(63)), Ok(()));
    assert!(check_site_name(&"s".repeat(64)).is_err());
    assert!(check_site_name("a/b").is_err());
    assert!(check_site_name(".a").is_err());
    assert!(check_site_name("a_").is_err());
    assert_eq!(check_site_name("a"), Ok(()));
    // Hosts: non-empty printable ASCII without spaces.
    assert_eq!(check_host("203.0.113.7"), Ok(()));
    assert_eq!(check_host("[fd00::1]"), Ok(()));
    assert_eq!(check_host("!"), Ok(()));
    assert_eq!(check_host("~"), Ok(()));
    for bad in ["", " ", "a b", "a\tb", "a\u{7f}", "h\u{e9}te", "a\n"] {
        assert!(check_host(bad).is_err(), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Control messages: caps exactly at and one past.

fn view() -> HubView {
    HubView {
        gateways: vec![GatewayEndpoint {
            name: "gw".into(),
            host: "h".into(),
            port: 7443,
            active: true,
        }],
        routes: vec![],
        site_mtu: 1400,
        egress: EgressPolicy::default(),
        site_mtus: vec![],
        routed_sites: vec![],
        reconnect_spread_ms: 0,
    }
}

fn hello() -> Hello {
    Hello {
        protocol_version: 1,
        alpn: "petrel/1".into(),
        node_name: "edge-1".into(),
        agent_version: "0.1.0".into(),
        self_view: AgentSelfView::default(),
        routes_digest: None,
    }
}

fn welcome() -> Welcome {
    Welcome {
        protocol_version: 1,
        hub_id: "hub".into(),
        node_name: "edge-1".into(),
        site: "site-a".into(),
        keepalive_interval_ms: 1000,
        view: view(),
    }
}

fn round_trips(msg: &ControlMessage) {
    let bytes = encode_to_vec(msg).unwrap();
    assert_eq!(
        decode_frame(&bytes).unwrap(),
        Some((msg.clone(), bytes.len()))
    );
}

/// A body of `mtu` for an Update with no gateways, no routes and no egress field.
fn update_body_with_mtu(mtu: u16) -> Vec<u8> {
    let mut body = vec![0, 0, 0, 0];
    body.extend_from_slice(&mtu.to_be_bytes());
    body
}

#[test]
fn site_mtu_minimum_is_576_both_ways() {
    let ok = HubView {
        site_mtu: 576,
        ..view()
    };
    round_trips(&ControlMessage::Update(ok));
    let low = HubView {
        site_mtu: 575,
        ..view()
    };
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(low)),
        Err(EncodeError::InvalidValue {
            field: "HubView.site_mtu",
            ..
        })
    ));
    let m = decode_frame(&frame(msg_type::UPDATE, &update_body_with_mtu(576)))
        .unwrap()
        .unwrap();
    assert!(matches!(
        m.0,
        ControlMessage::Update(HubView { site_mtu: 576, .. })
    ));
    assert!(matches!(
        decode_frame(&frame(msg_type::UPDATE, &update_body_with_mtu(575))),
        Err(DecodeError::InvalidValue {
            field: "HubView.site_mtu",
            ..
        })
    ));
    assert!(decode_frame(&frame(msg_type::UPDATE, &update_body_with_mtu(0))).is_err());
}

/// An Update body with site MTU 1400, the empty egress policy and one site MTU entry.
fn update_body_with_site_entry(site: &[u8], mtu: u16) -> Vec<u8> {
    let mut body = update_body_with_mtu(1400);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1]);
    body.extend_from_slice(&wire_string(site));
    body.extend_from_slice(&mtu.to_be_bytes());
    body
}

#[test]
fn per_site_mtu_minimum_is_576_both_ways() {
    let entry = |mtu| HubView {
        site_mtus: vec![SiteMtu {
            site: "site-small".into(),
            mtu,
        }],
        ..view()
    };
    round_trips(&ControlMessage::Update(entry(576)));
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(entry(575))),
        Err(EncodeError::InvalidValue {
            field: "SiteMtu.mtu",
            ..
        })
    ));
    let (m, _) = decode_frame(&frame(
        msg_type::UPDATE,
        &update_body_with_site_entry(b"site-small", 576),
    ))
    .unwrap()
    .unwrap();
    let ControlMessage::Update(v) = m else {
        panic!("{m:?}")
    };
    assert_eq!(
        v.site_mtus,
        vec![SiteMtu {
            site: "site-small".into(),
            mtu: 576
        }]
    );
    assert!(matches!(
        decode_frame(&frame(
            msg_type::UPDATE,
            &update_body_with_site_entry(b"site-small", 575)
        )),
        Err(DecodeError::InvalidValue {
            field: "SiteMtu.mtu",
            ..
        })
    ));
}

/// An Update body with one gateway, written by hand.
fn gateway_body(name: &[u8], host: &[u8], port: u16, active: u8) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&wire_string(name));
    body.extend_from_slice(&wire_string(host));
    body.extend_from_slice(&port.to_be_bytes());
    body.push(active);
    body.extend_from_slice(&[0, 0]); // no routes
    body.extend_from_slice(&1400u16.to_be_bytes());
    body
}

#[test]
fn gateway_hosts_ports_and_names_are_validated_both_ways() {
    let good = decode_frame(&frame(
        msg_type::UPDATE,
        &gateway_body(b"gw", b"hub.example", 443, 0),
    ))
    .unwrap()
    .unwrap()
    .0;
    assert_eq!(
        good,
        ControlMessage::Update(HubView {
            gateways: vec![GatewayEndpoint {
                name: "gw".into(),
                host: "hub.example".into(),
                port: 443,
                active: false,
            }],
            routes: vec![],
            site_mtu: 1400,
            egress: EgressPolicy::default(),
            site_mtus: vec![],
            routed_sites: vec![],
            reconnect_spread_ms: 0,
        })
    );
    for bad_host in [&b""[..], b"a b", b"a\x01b", b"tab\there"] {
        assert!(
            matches!(
                decode_frame(&frame(
                    msg_type::UPDATE,
                    &gateway_body(b"gw", bad_host, 443, 1)
                )),
                Err(DecodeError::InvalidValue {
                    field: "GatewayEndpoint.host",
                    ..
                })
            ),
            "{bad_host:?}"
        );
        let mut v = view();
        v.gateways[0].host = String::from_utf8(bad_host.to_vec()).unwrap();
        assert!(matches!(
            encode_to_vec(&ControlMessage::Update(v)),
            Err(EncodeError::InvalidValue {
                field: "GatewayEndpoint.host",
                ..
            })
        ));
    }
    assert!(matches!(
        decode_frame(&frame(msg_type::UPDATE, &gateway_body(b"gw", b"h", 0, 1))),
        Err(DecodeError::InvalidValue {
            field: "GatewayEndpoint.port",
            ..
        })
    ));
    let mut v = view();
    v.gateways[0].port = 0;
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(v)),
        Err(EncodeError::InvalidValue {
            field: "GatewayEndpoint.port",
            ..
        })
    ));
    assert!(matches!(
        decode_frame(&frame(msg_type::UPDATE, &gateway_body(b"gw", b"h", 1, 2))),
        Err(DecodeError::InvalidValue {
            field: "GatewayEndpoint.active",
            ..
        })
    ));
    // Host and name exactly at 253 pass; 254 is refused both ways.
    let mut v = view();
    v.gateways[0].host = "h".repeat(253);
    v.gateways[0].name = "n".repeat(253);
    round_trips(&ControlMessage::Update(v.clone()));
    let mut long_host = v.clone();
    long_host.gateways[0].host.push('h');
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(long_host)),
        Err(EncodeError::TooLong {
            field: "GatewayEndpoint.host",
            len: 254,
            max: 253
        })
    ));
    let mut long_name = v;
    long_name.gateways[0].name.push('n');
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(long_name)),
        Err(EncodeError::TooLong {
            field: "GatewayEndpoint.name",
            ..
        })
    ));
    assert!(matches!(
        decode_frame(&frame(
            msg_type::UPDATE,
            &gateway_body(b"gw", &[b'h'; 254], 1, 1)
        )),
        Err(DecodeError::TooLong {
            field: "GatewayEndpoint.host",
            len: 254,
            max: 253
        })
    ));
}

#[test]
fn gateway_count_at_and_past_its_cap() {
    let mut v = view();
    v.gateways = vec![v.gateways[0].clone(); MAX_GATEWAYS];
    round_trips(&ControlMessage::Update(v.clone()));
    v.gateways.push(v.gateways[0].clone());
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(v)),
        Err(EncodeError::TooLong {
            field: "HubView.gateways",
            len: 65,
            max: 64
        })
    ));
}

#[test]
fn welcome_keepalive_zero_and_site_refused_on_decode() {
    round_trips(&ControlMessage::Welcome(welcome()));
    let zero = Welcome {
        keepalive_interval_ms: 0,
        ..welcome()
    };
    assert!(matches!(
        encode_to_vec(&ControlMessage::Welcome(zero)),
        Err(EncodeError::InvalidValue {
            field: "Welcome.keepalive_interval_ms",
            ..
        })
    ));
    let welcome_body = |site: &[u8], keepalive: u32| {
        let mut body = vec![0, 1];
        body.extend_from_slice(&wire_string(b"hub"));
        body.extend_from_slice(&wire_string(b"edge-1"));
        body.extend_from_slice(&wire_string(site));
        body.extend_from_slice(&keepalive.to_be_bytes());
        body.extend_from_slice(&update_body_with_mtu(1400));
        body
    };
    let (m, _) = decode_frame(&frame(msg_type::WELCOME, &welcome_body(b"s", 1)))
        .unwrap()
        .unwrap();
    assert!(matches!(
        m,
        ControlMessage::Welcome(Welcome {
            keepalive_interval_ms: 1,
            ..
        })
    ));
    assert!(matches!(
        decode_frame(&frame(msg_type::WELCOME, &welcome_body(b"s", 0))),
        Err(DecodeError::InvalidValue {
            field: "Welcome.keepalive_interval_ms",
            ..
        })
    ));
    assert!(matches!(
        decode_frame(&frame(msg_type::WELCOME, &welcome_body(b"-s", 1))),
        Err(DecodeError::InvalidValue {
            field: "Welcome.site",
            ..
        })
    ));
    // A site exactly at 63 round-trips; 64 is refused on encode.
    let site63 = Welcome {
        site: "s".repeat(63),
        ..welcome()
    };
    round_trips(&ControlMessage::Welcome(site63));
    let site64 = Welcome {
        site: "s".repeat(64),
        ..welcome()
    };
    assert!(matches!(
        encode_to_vec(&ControlMessage::Welcome(site64)),
        Err(EncodeError::TooLong {
            field: "Welcome.site",
            len: 64,
            max: 63
        })
    ));
}

#[test]
fn hello_string_and_list_caps_at_and_past() {
    let cidr = |i: u8| IpCidr::new(IpAddr::V4(Ipv4Addr::new(10, i, 0, 0)), 16).unwrap();
    let full = Hello {
        alpn: "a".repeat(MAX_ALPN_LEN),
        node_name: "n".repeat(MAX_NODE_NAME_LEN),
        agent_version: "v".repeat(MAX_VERSION_STRING_LEN),
        self_view: AgentSelfView {
            pod_cidrs: (0..16).map(cidr).collect(),
            vtep_mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
            underlay_addrs: (0..16)
                .map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)))
                .collect(),
            datapath: "d".repeat(MAX_DATAPATH_LEN),
            capabilities: u64::MAX,
        },
        ..hello()
    };
    round_trips(&ControlMessage::Hello(full.clone()));
    type Bump = fn(&mut Hello);
    let over: [(&str, Bump); 6] = [
        ("Hello.alpn", |h| h.alpn.push('a')),
        ("Hello.node_name", |h| h.node_name.push('n')),
        ("Hello.agent_version", |h| h.agent_version.push('v')),
        ("AgentSelfView.datapath", |h| h.self_view.datapath.push('d')),
        ("AgentSelfView.pod_cidrs", |h| {
            h.self_view
                .pod_cidrs
                .push(IpCidr::new(ip("10.99.0.0"), 16).unwrap())
        }),
        ("AgentSelfView.underlay_addrs", |h| {
            h.self_view.underlay_addrs.push(ip("10.0.0.1"))
        }),
    ];
    for (field, bump) in over {
        let mut h = full.clone();
        bump(&mut h);
        match encode_to_vec(&ControlMessage::Hello(h)) {
            Err(EncodeError::TooLong { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    // The same caps on the decode side, for a string and a list: alpn of 33 bytes.
    let mut body = vec![0, 1];
    body.extend_from_slice(&wire_string(&[b'a'; 33]));
    assert_eq!(
        decode_frame(&frame(msg_type::HELLO, &body)),
        Err(DecodeError::TooLong {
            field: "Hello.alpn",
            len: 33,
            max: 32
        })
    );
    // 17 pod CIDRs declared.
    let mut body = vec![0, 1];
    body.extend_from_slice(&wire_string(b"petrel/1"));
    body.extend_from_slice(&wire_string(b"edge-1"));
    body.extend_from_slice(&wire_string(b"0.1"));
    body.extend_from_slice(&[0, 17]);
    body.extend_from_slice(&[0; 17 * 6]);
    assert_eq!(
        decode_frame(&frame(msg_type::HELLO, &body)),
        Err(DecodeError::TooLong {
            field: "AgentSelfView.pod_cidrs",
            len: 17,
            max: 16
        })
    );
}

#[test]
fn going_away_and_renew_caps_at_and_past() {
    let msg = |n: usize| {
        ControlMessage::GoingAway(GoingAway {
            reason: GoingAwayReason::Shutdown,
            retry_after_ms: 0,
            message: "m".repeat(n),
        })
    };
    round_trips(&msg(MAX_MESSAGE_LEN));
    assert!(matches!(
        encode_to_vec(&msg(MAX_MESSAGE_LEN + 1)),
        Err(EncodeError::TooLong {
            len: 1025,
            max: 1024,
            ..
        })
    ));
    let mut body = vec![0, 1, 0, 0, 0, 0];
    body.extend_from_slice(&wire_string(&[b'm'; 1025]));
    assert_eq!(
        decode_frame(&frame(msg_type::GOING_AWAY, &body)),
        Err(DecodeError::TooLong {
            field: "GoingAway.message",
            len: 1025,
            max: 1024
        })
    );
    let bundle = |n: usize| {
        ControlMessage::RenewResponse(RenewResponse {
            result: Ok(CertBundle {
                cert_der: vec![1; n],
                ca_der: vec![2; MAX_CERT_LEN],
            }),
        })
    };
    round_trips(&bundle(MAX_CERT_LEN));
    assert!(matches!(
        encode_to_vec(&bundle(MAX_CERT_LEN + 1)),
        Err(EncodeError::TooLong {
            field: "CertBundle.cert_der",
            ..
        })
    ));
    let renew = |n: usize| {
        ControlMessage::RenewRequest(RenewRequest {
            csr_der: vec![3; n],
        })
    };
    round_trips(&renew(MAX_CSR_LEN));
    assert!(encode_to_vec(&renew(MAX_CSR_LEN + 1)).is_err());
    // A RenewResponse error by hand: tag 1, code 0x0203, message "x".
    let mut body = vec![1, 2, 3];
    body.extend_from_slice(&wire_string(b"x"));
    assert_eq!(
        decode_frame(&frame(msg_type::RENEW_RESPONSE, &body)).unwrap(),
        Some((
            ControlMessage::RenewResponse(RenewResponse {
                result: Err(ErrorInfo {
                    code: 0x0203,
                    message: "x".into()
                })
            }),
            5 + body.len()
        ))
    );
}

/// An Update whose body is exactly `body_len` bytes: routes with long node names.
fn update_of_body_len(body_len: usize) -> HubView {
    // gateways 2 + routes count 2 + site_mtu 2 + empty egress (2 + 2 + 2 + 1) + empty site MTU
    // list 2 + empty routed-site list 2 + reconnect spread 4 = 21; each route with an IPv4 CIDR
    // and underlay, an empty site and a name of L bytes is 22 + L.
    let mut left = body_len - 21;
    let mut routes = Vec::new();
    let mut i = 0u32;
    while left > 0 {
        // The last route gets whatever is left; keep it at least 32 bytes long.
        let l = if left >= 22 + 253 + 32 {
            253
        } else if left <= 22 + 253 {
            left - 22
        } else {
            left - 22 - 32
        };
        let mut name = format!("r{i}");
        while name.len() < l {
            name.push('x');
        }
        assert_eq!(name.len(), l);
        routes.push(Route {
            node_name: name,
            site: String::new(),
            pod_cidr: IpCidr::new(ip("10.0.0.0"), 8).unwrap(),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            underlay: ip("192.0.2.1"),
            path: RoutePath::Direct,
        });
        left -= 22 + l;
        i += 1;
    }
    HubView {
        gateways: vec![],
        routes,
        site_mtu: 1500,
        egress: EgressPolicy::default(),
        site_mtus: vec![],
        routed_sites: vec![],
        reconnect_spread_ms: 0,
    }
}

#[test]
fn control_frame_exactly_at_the_64k_cap() {
    let at = ControlMessage::Update(update_of_body_len(MAX_CONTROL_FRAME));
    let bytes = encode_to_vec(&at).unwrap();
    assert_eq!(bytes.len(), 5 + 65_536);
    assert_eq!(&bytes[1..5], &[0, 1, 0, 0]);
    assert_eq!(
        decode_frame(&bytes).unwrap(),
        Some((at.clone(), bytes.len()))
    );
    let mut dec = FrameDecoder::new();
    dec.push(&bytes).unwrap();
    assert_eq!(dec.next_message().unwrap(), Some(at));
    assert_eq!(dec.buffered(), 0);
    let past = ControlMessage::Update(update_of_body_len(MAX_CONTROL_FRAME + 1));
    let mut out = vec![0xee];
    assert_eq!(
        encode(&past, &mut out),
        Err(EncodeError::TooLong {
            field: "frame body",
            len: 65_537,
            max: 65_536
        })
    );
    assert_eq!(out, vec![0xee]);
    // A header declaring 65,537 is refused before its body.
    assert!(matches!(
        decode_frame(&[3, 0, 1, 0, 1]),
        Err(DecodeError::TooLong {
            len: 65_537,
            max: 65_536,
            ..
        })
    ));
    assert_eq!(decode_frame(&[3, 0, 1, 0, 0]), Ok(None));
}

#[test]
fn split_frame_reports_its_length() {
    assert_eq!(split_frame(&[], 10), Ok(None));
    assert_eq!(split_frame(&[9, 0, 0, 0], 10), Ok(None));
    let (f, used) = split_frame(&[9, 0, 0, 0, 2, 7, 8, 0xaa], 2)
        .unwrap()
        .unwrap();
    assert_eq!((f.msg_type, f.body, used), (9, &[7u8, 8][..], 7));
    let (f, used) = split_frame(&[9, 0, 0, 0, 0, 1], 0).unwrap().unwrap();
    assert_eq!((f.body.len(), used), (0, 5));
}

#[test]
fn egress_policy_lists_at_and_past_their_caps() {
    let mut v = view();
    v.egress = EgressPolicy {
        node_addresses: vec![],
        pod_cidrs: vec![],
        node_ports: (1..=64).collect(),
        pod_ports: Some((1000..1064).collect()),
    };
    round_trips(&ControlMessage::Update(v.clone()));
    let mut pod65 = v.clone();
    pod65.egress.pod_ports.as_mut().unwrap().push(2000);
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(pod65)),
        Err(EncodeError::TooLong {
            field: "EgressPolicy.pod_ports",
            len: 65,
            max: 64
        })
    ));
    let mut zero = v.clone();
    zero.egress.pod_ports = Some(vec![0]);
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(zero)),
        Err(EncodeError::InvalidValue {
            field: "EgressPolicy.pod_ports",
            ..
        })
    ));
    let mut targets = v.clone();
    targets.egress.node_addresses = (0..4096u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    round_trips(&ControlMessage::Update(targets.clone()));
    targets.egress.node_addresses.push(ip("10.1.0.0"));
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(targets)),
        Err(EncodeError::TooLong {
            field: "EgressPolicy.node_addresses",
            len: 4097,
            max: 4096
        })
    ));
    let mut cidrs = v;
    cidrs.egress.pod_cidrs = (0..4096u32)
        .map(|i| IpCidr::new(IpAddr::V4(Ipv4Addr::from(i << 8)), 24).unwrap())
        .collect();
    round_trips(&ControlMessage::Update(cidrs.clone()));
    cidrs
        .egress
        .pod_cidrs
        .push(IpCidr::new(ip("10.0.0.0"), 8).unwrap());
    assert!(matches!(
        encode_to_vec(&ControlMessage::Update(cidrs)),
        Err(EncodeError::TooLong {
            field: "EgressPolicy.pod_cidrs",
            ..
        })
    ));
    // On the wire: a pod port 0 and a pod port count of 65.
    let mut body = update_body_with_mtu(1400);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0]);
    assert!(matches!(
        decode_frame(&frame(msg_type::UPDATE, &body)),
        Err(DecodeError::InvalidValue {
            field: "EgressPolicy.pod_ports",
            ..
        })
    ));
    let mut body = update_body_with_mtu(1400);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 0, 65]);
    body.extend_from_slice(&[0, 1].repeat(65));
    assert!(matches!(
        decode_frame(&frame(msg_type::UPDATE, &body)),
        Err(DecodeError::TooLong {
            field: "EgressPolicy.pod_ports",
            len: 65,
            max: 64
        })
    ));
    // Node address count 4097 on the wire.
    let mut body = update_body_with_mtu(1400);
    body.extend_from_slice(&[0x10, 0x01]);
    body.extend_from_slice(&[4, 10, 0, 0, 1].repeat(4097));
    assert!(matches!(
        decode_frame(&frame(msg_type::UPDATE, &body)),
        Err(DecodeError::TooLong {
            field: "EgressPolicy.node_addresses",
            len: 4097,
            max: 4096
        })
    ));
    // A pod port list by hand decodes to those ports.
    let mut body = update_body_with_mtu(1400);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0x28, 0x0a, 1, 0, 1, 0x1f, 0x90]);
    let (m, _) = decode_frame(&frame(msg_type::UPDATE, &body))
        .unwrap()
        .unwrap();
    let ControlMessage::Update(v) = m else {
        panic!("{m:?}")
    };
    assert_eq!(v.egress.node_ports, vec![10250]);
    assert_eq!(v.egress.pod_ports, Some(vec![8080]));
}

#[test]
fn egress_policy_fails_closed() {
    let p = EgressPolicy {
        node_addresses: vec![ip("192.168.1.5")],
        pod_cidrs: vec![IpCidr::new(ip("10.244.5.0"), 24).unwrap()],
        node_ports: vec![10250],
        pod_ports: Some(vec![8080]),
    };
    assert!(p.allows(ip("192.168.1.5"), 10250));
    assert!(!p.allows(ip("192.168.1.5"), 8080));
    assert!(!p.allows(ip("192.168.1.6"), 10250));
    assert!(p.allows(ip("10.244.5.7"), 8080));
    assert!(!p.allows(ip("10.244.5.7"), 10250));
    assert!(!p.allows(ip("10.244.6.7"), 8080));
    // The CIDR's .0 and .1 are the node's own interfaces: node ports only.
    assert!(!p.allows(ip("10.244.5.1"), 8080));
    assert!(p.allows(ip("10.244.5.1"), 10250));
    assert!(!p.allows(ip("10.244.5.0"), 8080));
    // A node address inside the pod CIDR with a node port: allowed through either rule.
    let q = EgressPolicy {
        node_addresses: vec![ip("10.244.5.1")],
        ..p.clone()
    };
    assert!(q.allows(ip("10.244.5.1"), 10250));
    assert!(!q.allows(ip("10.244.5.1"), 0));
    // No pod port list: any pod port, never port 0.
    let any = EgressPolicy {
        pod_ports: None,
        ..p
    };
    assert!(any.allows(ip("10.244.5.7"), 1));
    assert!(!any.allows(ip("10.244.5.7"), 0));
    assert!(!any.allows(ip("192.168.1.5"), 0));
}

// ---------------------------------------------------------------------------------------------
// FrameBuffer across pushes.

#[test]
fn frame_buffer_capacity_across_two_pushes() {
    let mut fb = FrameBuffer::new(10);
    assert_eq!(fb.capacity(), 30);
    let f10 = frame(1, &[7; 10]);
    assert_eq!(f10.len(), 15);
    fb.push(&f10).unwrap();
    assert_eq!(fb.buffered(), 15);
    fb.push(&f10).unwrap();
    assert_eq!(fb.buffered(), 30);
    assert_eq!(
        fb.push(&[1]),
        Err(DecodeError::BufferFull {
            len: 31,
            capacity: 30
        })
    );
    assert_eq!(fb.next_with(|f| Ok(f.body.len())), Ok(Some(10)));
    assert_eq!(fb.buffered(), 15);
    // The consumed frame no longer counts: 15 more fit, 16 do not.
    assert_eq!(
        fb.push(&[0; 16]),
        Err(DecodeError::BufferFull {
            len: 31,
            capacity: 30
        })
    );
    fb.push(&frame(2, &[8; 10])).unwrap();
    assert_eq!(fb.buffered(), 30);
    assert_eq!(fb.next_with(|f| Ok(f.msg_type)), Ok(Some(1)));
    assert_eq!(
        fb.next_with(|f| Ok((f.msg_type, f.body[0]))),
        Ok(Some((2, 8)))
    );
    assert_eq!(fb.buffered(), 0);
    assert_eq!(fb.next_with(|f| Ok(f.msg_type)), Ok(None));
    // A decode error is sticky: the frame stays.
    fb.push(&frame(3, &[])).unwrap();
    let err = DecodeError::UnknownCriticalType(3);
    assert_eq!(
        fb.next_with(|_| Err::<(), _>(err.clone())),
        Err(err.clone())
    );
    assert_eq!(fb.buffered(), 5);
    // A single push exactly at capacity is accepted.
    let mut fb = FrameBuffer::new(10);
    let mut two = f10.clone();
    two.extend_from_slice(&f10);
    fb.push(&two).unwrap();
    assert_eq!(fb.buffered(), 30);
    // Capacity saturates instead of overflowing.
    assert_eq!(FrameBuffer::new(usize::MAX).capacity(), usize::MAX);
}

#[test]
fn control_decoder_capacity_is_two_max_frames() {
    let mut dec = FrameDecoder::new();
    let cap = 2 * (MAX_CONTROL_FRAME + 5);
    // Pings are 21 bytes; push optional-frame bytes up to exactly the capacity.
    let big = frame(0x90, &vec![0; MAX_CONTROL_FRAME]);
    dec.push(&big).unwrap();
    dec.push(&big).unwrap();
    assert_eq!(dec.buffered(), cap);
    assert!(matches!(
        dec.push(&[0]),
        Err(DecodeError::BufferFull { len, capacity }) if len == cap + 1 && capacity == cap
    ));
    let mut enrol = EnrolDecoder::new();
    enrol.push(&big).unwrap();
    enrol.push(&big).unwrap();
    assert!(enrol.push(&[0]).is_err());
    assert_eq!(
        enrol.next_message().unwrap(),
        Some(EnrolMessage::Unknown { msg_type: 0x90 })
    );
}

// ---------------------------------------------------------------------------------------------
// Stream headers: the 4 KiB header cap and the 16 KiB preamble.

fn small_open() -> StreamOpen {
    StreamOpen {
        target: StreamTarget {
            ip: ip("10.0.0.1"),
            port: 10250,
            display: String::new(),
        },
        connect_timeout_ms: 7,
    }
}

/// Optional frames of `total` bytes in all (each at most the stream header cap).
fn optional_frames(total: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let frame_len = left.min(5 + MAX_STREAM_HEADER);
        let frame_len = if left - frame_len > 0 && left - frame_len < 5 {
            frame_len - 5
        } else {
            frame_len
        };
        out.extend_from_slice(&frame(0xa5, &vec![0; frame_len - 5]));
        left -= frame_len;
    }
    assert_eq!(out.len(), total);
    out
}

#[test]
fn stream_header_after_optional_frames_exactly_at_the_preamble_cap() {
    let mut open = Vec::new();
    encode_stream_open(&small_open(), &mut open).unwrap();
    // kind 4, 10.0.0.1, port, empty display, timeout: by hand.
    assert_eq!(
        open,
        [0x20, 0, 0, 0, 13, 4, 10, 0, 0, 1, 0x28, 0x0a, 0, 0, 0, 0, 0, 7]
    );
    let mut buf = optional_frames(MAX_STREAM_PREAMBLE - open.len());
    buf.extend_from_slice(&open);
    assert_eq!(buf.len(), 16_384);
    buf.extend_from_slice(b"tcp bytes");
    assert_eq!(
        decode_stream_open(&buf).unwrap(),
        Some((small_open(), 16_384))
    );
    // One byte more of optional frames: refused.
    let mut buf = optional_frames(MAX_STREAM_PREAMBLE - open.len() + 1);
    buf.extend_from_slice(&open);
    assert!(matches!(
        decode_stream_open(&buf),
        Err(DecodeError::TooLong {
            len: 16_385,
            max: 16_384,
            ..
        })
    ));
    // Incomplete: exactly 16 KiB buffered waits, one more byte is refused.
    let mut partial = optional_frames(MAX_STREAM_PREAMBLE - 3);
    partial.extend_from_slice(&open[..3]);
    assert_eq!(partial.len(), 16_384);
    assert_eq!(decode_stream_open(&partial), Ok(None));
    partial.push(open[3]);
    assert!(matches!(
        decode_stream_open(&partial),
        Err(DecodeError::TooLong {
            len: 16_385,
            max: 16_384,
            ..
        })
    ));
    // After 20 KiB of optional frames a header is never reached.
    let mut buf = optional_frames(20 * 1024);
    buf.extend_from_slice(&open);
    assert!(decode_stream_open(&buf).is_err());
}

#[test]
fn stream_header_caps_and_results() {
    // The display string exactly at 512 round-trips; 513 is refused on encode and decode.
    let mut open = small_open();
    open.target.display = "d".repeat(MAX_DISPLAY_LEN);
    let mut buf = Vec::new();
    encode_stream_open(&open, &mut buf).unwrap();
    assert_eq!(
        decode_stream_open(&buf).unwrap(),
        Some((open.clone(), buf.len()))
    );
    open.target.display.push('d');
    assert!(encode_stream_open(&open, &mut Vec::new()).is_err());
    let mut body = vec![4, 10, 0, 0, 1, 0, 80];
    body.extend_from_slice(&wire_string(&[b'd'; 513]));
    body.extend_from_slice(&[0, 0, 0, 1]);
    assert_eq!(
        decode_stream_open(&frame(0x20, &body)),
        Err(DecodeError::TooLong {
            field: "StreamTarget.display",
            len: 513,
            max: 512
        })
    );
    // Port 0 both ways; an IPv6 target by hand.
    let mut zero = small_open();
    zero.target.port = 0;
    assert!(encode_stream_open(&zero, &mut Vec::new()).is_err());
    let mut body = vec![6];
    body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    assert!(matches!(
        decode_stream_open(&frame(0x20, &body)),
        Err(DecodeError::InvalidValue {
            field: "StreamTarget.port",
            ..
        })
    ));
    body[17] = 0x01;
    body[18] = 0xbb;
    assert_eq!(
        decode_stream_open(&frame(0x20, &body)).unwrap(),
        Some((
            StreamOpen {
                target: StreamTarget {
                    ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
                    port: 443,
                    display: String::new(),
                },
                connect_timeout_ms: 0,
            },
            5 + body.len()
        ))
    );
    // Results: success is one zero byte; an error by hand; the wrong direction is refused.
    let mut ok = Vec::new();
    encode_stream_result(&StreamResult { result: Ok(()) }, &mut ok).unwrap();
    assert_eq!(ok, [0x21, 0, 0, 0, 1, 0]);
    let mut body = vec![1, 0, 4];
    body.extend_from_slice(&wire_string(b"no"));
    assert_eq!(
        decode_stream_result(&frame(0x21, &body)).unwrap(),
        Some((
            StreamResult {
                result: Err(DialError {
                    code: DialErrorCode::NotAllowed,
                    message: "no".into()
                })
            },
            5 + body.len()
        ))
    );
    let mut body = vec![1, 0, 4];
    body.extend_from_slice(&wire_string(&[b'm'; 1025]));
    assert!(matches!(
        decode_stream_result(&frame(0x21, &body)),
        Err(DecodeError::TooLong {
            field: "DialError.message",
            ..
        })
    ));
    assert_eq!(
        decode_stream_result(&frame(0x20, &[])),
        Err(DecodeError::UnexpectedType {
            context: "this side of a proxied stream",
            msg_type: 0x20
        })
    );
    assert_eq!(
        decode_stream_open(&frame(0x21, &[0])),
        Err(DecodeError::UnexpectedType {
            context: "this side of a proxied stream",
            msg_type: 0x21
        })
    );
    assert_eq!(
        decode_stream_open(&frame(0x22, &[])),
        Err(DecodeError::UnknownCriticalType(0x22))
    );
    // A header declaring 4097 is refused at once; 4096 waits for its body.
    assert!(matches!(
        decode_stream_open(&[0x20, 0, 0, 0x10, 0x01]),
        Err(DecodeError::TooLong {
            len: 4097,
            max: 4096,
            ..
        })
    ));
    assert_eq!(decode_stream_open(&[0x20, 0, 0, 0x10, 0x00]), Ok(None));
}

// ---------------------------------------------------------------------------------------------
// Enrolment: preamble cap, token cap, redaction.

fn enrol_req() -> EnrolRequest {
    EnrolRequest {
        protocol_version: 1,
        token: "abcdef.0123456789abcdef".into(),
        node_name: "edge-a1".into(),
        csr_der: vec![0x30, 0x03, 1, 2, 3],
    }
}

#[test]
fn enrolment_preamble_exactly_at_its_cap() {
    let mut req = Vec::new();
    encode_enrol_request(&enrol_req(), &mut req).unwrap();
    // Two optional frames that, with the request, fill the preamble exactly.
    let first = frame(0xc1, &vec![0; MAX_CONTROL_FRAME]);
    let second = frame(
        0xc2,
        &vec![0; MAX_ENROL_PREAMBLE - first.len() - req.len() - 5],
    );
    let mut buf = first.clone();
    buf.extend_from_slice(&second);
    buf.extend_from_slice(&req);
    assert_eq!(buf.len(), MAX_ENROL_PREAMBLE);
    assert_eq!(
        decode_enrol_request(&buf).unwrap(),
        Some((enrol_req(), MAX_ENROL_PREAMBLE))
    );
    // One byte more in the second optional frame: refused.
    let mut buf = first.clone();
    buf.extend_from_slice(&frame(
        0xc2,
        &vec![0; MAX_ENROL_PREAMBLE - first.len() - req.len() - 4],
    ));
    buf.extend_from_slice(&req);
    assert!(matches!(
        decode_enrol_request(&buf),
        Err(DecodeError::TooLong {
            len,
            max: MAX_ENROL_PREAMBLE,
            ..
        }) if len == MAX_ENROL_PREAMBLE + 1
    ));
    // Two complete optional frames fill the cap exactly: wait for more. One byte of a next
    // frame goes past it: refused.
    let mut partial = first;
    partial.extend_from_slice(&frame(0xc2, &vec![0; MAX_CONTROL_FRAME]));
    assert_eq!(partial.len(), MAX_ENROL_PREAMBLE);
    assert_eq!(decode_enrol_request(&partial), Ok(None));
    partial.push(0x10);
    assert!(matches!(
        decode_enrol_response(&partial),
        Err(DecodeError::TooLong { len, .. }) if len == MAX_ENROL_PREAMBLE + 1
    ));
}

#[test]
fn enrolment_caps_and_unknown_frames() {
    let token = |n: usize| EnrolRequest {
        token: "t".repeat(n),
        ..enrol_req()
    };
    let mut out = Vec::new();
    encode_enrol_request(&token(MAX_TOKEN_LEN), &mut out).unwrap();
    assert_eq!(
        decode_enrol_request(&out).unwrap(),
        Some((token(MAX_TOKEN_LEN), out.len()))
    );
    assert!(encode_enrol_request(&token(MAX_TOKEN_LEN + 1), &mut Vec::new()).is_err());
    let csr = |n: usize| EnrolRequest {
        csr_der: vec![9; n],
        ..enrol_req()
    };
    let mut out = Vec::new();
    encode_enrol_request(&csr(MAX_CSR_LEN), &mut out).unwrap();
    assert_eq!(
        decode_enrol_request(&out).unwrap().unwrap().0,
        csr(MAX_CSR_LEN)
    );
    assert!(matches!(
        encode_enrol_request(&csr(MAX_CSR_LEN + 1), &mut Vec::new()),
        Err(EncodeError::TooLong {
            field: "EnrolRequest.csr_der",
            ..
        })
    ));
    let bad_name = EnrolRequest {
        node_name: "Edge".into(),
        ..enrol_req()
    };
    assert!(encode_enrol_request(&bad_name, &mut Vec::new()).is_err());
    // Unknown enrolment frames: optional ones encode and decode as Unknown, critical ones not.
    let mut out = Vec::new();
    encode_enrol(&EnrolMessage::Unknown { msg_type: 0x80 }, &mut out).unwrap();
    assert_eq!(out, [0x80, 0, 0, 0, 0]);
    assert_eq!(
        decode_enrol_frame(&out),
        Ok(Some((EnrolMessage::Unknown { msg_type: 0x80 }, 5)))
    );
    assert!(encode_enrol(&EnrolMessage::Unknown { msg_type: 0x7f }, &mut Vec::new()).is_err());
    let mut out = Vec::new();
    encode_enrol(&EnrolMessage::Request(enrol_req()), &mut out).unwrap();
    assert_eq!(out[0], 0x10);
    let resp = EnrolResponse {
        result: Ok(CertBundle {
            cert_der: vec![1, 2],
            ca_der: vec![3],
        }),
    };
    let mut out = Vec::new();
    encode_enrol(&EnrolMessage::Response(resp.clone()), &mut out).unwrap();
    // tag 0, cert (u32 2, 1 2), ca (u32 1, 3): by hand.
    assert_eq!(out, [0x11, 0, 0, 0, 12, 0, 0, 0, 0, 2, 1, 2, 0, 0, 0, 1, 3]);
    assert_eq!(
        decode_enrol_response(&out).unwrap(),
        Some((resp, out.len()))
    );
    let mut dec = EnrolDecoder::default();
    dec.push(&out).unwrap();
    assert!(matches!(
        dec.next_message().unwrap(),
        Some(EnrolMessage::Response(_))
    ));
    assert_eq!(dec.next_message().unwrap(), None);
    assert!(matches!(
        decode_enrol_request(&out),
        Err(DecodeError::UnexpectedType { msg_type: 0x11, .. })
    ));
}

#[test]
fn join_token_never_appears_in_debug_output() {
    let req = enrol_req();
    for dbg in [
        format!("{req:?}"),
        format!("{req:#?}"),
        format!("{:?}", EnrolMessage::Request(req.clone())),
    ] {
        assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
        assert!(!dbg.contains("abcdef."), "{dbg}");
        assert!(dbg.contains("EnrolRequest"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(dbg.contains("edge-a1"), "{dbg}");
        assert!(dbg.contains("<5 bytes>"), "{dbg}");
        assert!(dbg.contains("protocol_version"), "{dbg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Datagrams: reserved bytes, IHL, IPv6 checks.

fn vxlan_with(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    p.extend_from_slice(&[0x02, 0xfa, 0, 0, 0, 1]);
    p.extend_from_slice(&[0x02, 0xfa, 0, 0, 0, 2]);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(l3);
    p
}

fn ipv4_header(first: u8) -> Vec<u8> {
    let mut ip = vec![first, 0, 0, 20, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&[10, 244, 1, 5]);
    ip.extend_from_slice(&[10, 244, 7, 9]);
    ip
}

fn ipv6_header(first: u8) -> Vec<u8> {
    let mut ip = vec![first, 0, 0, 0, 0, 0, 59, 64];
    ip.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
    ip.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
    ip
}

#[test]
fn every_reserved_vxlan_byte_is_checked() {
    let ok = vxlan_with(ETHERTYPE_IPV4, &ipv4_header(0x45));
    assert!(VxlanFrame::from_vxlan_payload(&ok).is_ok());
    let sets: [&[usize]; 8] = [&[1], &[2], &[3], &[7], &[1, 2], &[2, 3], &[3, 7], &[1, 7]];
    for bytes in sets {
        for value in [0x01u8, 0x80, 0xff] {
            let mut bad = ok.clone();
            for &i in bytes {
                bad[i] = value;
            }
            assert_eq!(
                VxlanFrame::from_vxlan_payload(&bad),
                Err(DatagramError::ReservedBitsSet),
                "bytes {bytes:?} = {value:#x}"
            );
        }
    }
    // The VNI bytes are not reserved.
    let mut vni = ok.clone();
    vni[4] = 0xab;
    vni[5] = 0xcd;
    vni[6] = 0xef;
    assert_eq!(
        VxlanFrame::from_vxlan_payload(&vni).unwrap().vni(),
        0xab_cdef
    );
    for flags in [0x00, 0x09, 0x0c, 0x88] {
        let mut bad = ok.clone();
        bad[0] = flags;
        assert_eq!(
            VxlanFrame::from_vxlan_payload(&bad),
            Err(DatagramError::BadVxlanFlags(flags))
        );
    }
    let reasons = [
        (DatagramError::Empty, "empty"),
        (DatagramError::UnknownKind(2), "unknown_kind"),
        (DatagramError::Truncated, "truncated"),
        (DatagramError::BadVxlanFlags(0), "bad_vxlan_flags"),
        (DatagramError::ReservedBitsSet, "vxlan_reserved_bits"),
        (DatagramError::FrameTooShort(3), "frame_too_short"),
    ];
    for (e, label) in reasons {
        assert_eq!(e.reason(), label);
    }
    // The header is 8 bytes and the inner frame at least 14.
    assert_eq!(
        VxlanFrame::from_vxlan_payload(&ok[..7]),
        Err(DatagramError::Truncated)
    );
    assert_eq!(
        VxlanFrame::from_vxlan_payload(&ok[..8 + 13]),
        Err(DatagramError::FrameTooShort(13))
    );
    let f = VxlanFrame::from_vxlan_payload(&ok[..8 + 14]).unwrap();
    assert_eq!(f.l3(), &[] as &[u8]);
    assert_eq!(f.inner_ip_src(), None);
}

#[test]
fn ipv4_ihl_below_five_and_version_are_refused() {
    for first in [0x40, 0x41, 0x44, 0x35, 0x55, 0x65] {
        let pkt = vxlan_with(ETHERTYPE_IPV4, &ipv4_header(first));
        let f = VxlanFrame::from_vxlan_payload(&pkt).unwrap();
        assert_eq!(f.inner_ipv4_src(), None, "{first:#x}");
        assert_eq!(f.inner_ipv4_dst(), None, "{first:#x}");
        assert_eq!(f.inner_ip_src(), None, "{first:#x}");
    }
    for first in [0x45, 0x46, 0x4f] {
        let pkt = vxlan_with(ETHERTYPE_IPV4, &ipv4_header(first));
        let f = VxlanFrame::from_vxlan_payload(&pkt).unwrap();
        assert_eq!(f.inner_ipv4_src(), Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(
            f.inner_ip_dst(),
            Some(IpAddr::V4(Ipv4Addr::new(10, 244, 7, 9)))
        );
    }
    // An IPv4 header under an ARP or IPv6 ethertype has no IPv4 source.
    let pkt = vxlan_with(0x86dd, &ipv4_header(0x45));
    assert_eq!(
        VxlanFrame::from_vxlan_payload(&pkt)
            .unwrap()
            .inner_ipv4_src(),
        None
    );
    let pkt = vxlan_with(0x0842, &ipv4_header(0x45));
    assert_eq!(
        VxlanFrame::from_vxlan_payload(&pkt).unwrap().inner_ip_src(),
        None
    );
}

#[test]
fn ipv6_header_checks() {
    let v6 = vxlan_with(0x86dd, &ipv6_header(0x60));
    let f = VxlanFrame::from_vxlan_payload(&v6).unwrap();
    assert_eq!(f.inner_ipv6_src(), Some("fd00::1".parse().unwrap()));
    assert_eq!(f.inner_ipv6_dst(), Some("fd00::2".parse().unwrap()));
    assert_eq!(f.inner_ip_src(), Some(ip("fd00::1")));
    assert_eq!(f.inner_ip_dst(), Some(ip("fd00::2")));
    assert_eq!(f.inner_ipv4_dst(), None);
    // Traffic class bits in the low nibble do not matter; the version does.
    let f2 = vxlan_with(0x86dd, &ipv6_header(0x6f));
    assert!(VxlanFrame::from_vxlan_payload(&f2)
        .unwrap()
        .inner_ipv6_src()
        .is_some());
    for first in [0x40, 0x45, 0x70, 0x00] {
        let pkt = vxlan_with(0x86dd, &ipv6_header(first));
        let f = VxlanFrame::from_vxlan_payload(&pkt).unwrap();
        assert_eq!(f.inner_ipv6_src(), None, "{first:#x}");
        assert_eq!(f.inner_ipv6_dst(), None, "{first:#x}");
        assert_eq!(f.inner_ip_dst(), None, "{first:#x}");
    }
    // 39 bytes are not an IPv6 header.
    let short = vxlan_with(0x86dd, &ipv6_header(0x60)[..39]);
    let f = VxlanFrame::from_vxlan_payload(&short).unwrap();
    assert_eq!(f.inner_ipv6_src(), None);
    assert_eq!(f.inner_ipv6_dst(), None);
    // An IPv6 header under the IPv4 ethertype is neither.
    let wrong = vxlan_with(ETHERTYPE_IPV4, &ipv6_header(0x60));
    let f = VxlanFrame::from_vxlan_payload(&wrong).unwrap();
    assert_eq!(f.inner_ipv6_src(), None);
    assert_eq!(f.inner_ip_src(), None);
}

#[test]
fn arp_needs_the_exact_ethernet_ipv4_header() {
    let arp = |hdr: [u8; 6]| {
        let mut a = hdr.to_vec();
        a.extend_from_slice(&[0, 1]);
        a.extend_from_slice(&[0x02, 0xfa, 0, 0, 0, 2]);
        a.extend_from_slice(&[10, 244, 1, 7]);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&[10, 244, 3, 9]);
        vxlan_with(ETHERTYPE_ARP, &a)
    };
    let good = arp([0, 1, 8, 0, 6, 4]);
    let f = VxlanFrame::from_vxlan_payload(&good).unwrap();
    assert_eq!(
        f.arp_ipv4(),
        Some((Ipv4Addr::new(10, 244, 1, 7), Ipv4Addr::new(10, 244, 3, 9)))
    );
    assert_eq!(f.inner_ip_dst(), Some(ip("10.244.3.9")));
    for bad in [
        [0, 6, 8, 0, 6, 4],
        [0, 1, 0x86, 0xdd, 6, 4],
        [0, 1, 8, 0, 6, 16],
    ] {
        let f_bad = arp(bad);
        let f = VxlanFrame::from_vxlan_payload(&f_bad).unwrap();
        assert_eq!(f.arp_ipv4(), None);
        assert_eq!(f.inner_ipv4_src(), None);
    }
    // An ARP body under the IPv4 ethertype is no ARP.
    let mut ipv4 = good.clone();
    ipv4[8 + 12] = 0x08;
    ipv4[8 + 13] = 0x00;
    assert_eq!(
        VxlanFrame::from_vxlan_payload(&ipv4).unwrap().arp_ipv4(),
        None
    );
}

#[test]
fn datagram_envelope() {
    let pkt = vxlan_with(ETHERTYPE_IPV4, &ipv4_header(0x45));
    let mut dg = Vec::new();
    write_vxlan_datagram(&pkt, &mut dg);
    assert_eq!(dg[0], 1);
    assert_eq!(&dg[1..], &pkt[..]);
    let f = parse_datagram(&dg).unwrap();
    assert_eq!(f.vxlan_bytes(), &pkt[..]);
    assert_eq!(f.inner(), &pkt[8..]);
    assert_eq!(f.l3(), &pkt[22..]);
    assert_eq!(f.dst_mac(), MacAddr([0x02, 0xfa, 0, 0, 0, 1]));
    assert_eq!(f.src_mac(), MacAddr([0x02, 0xfa, 0, 0, 0, 2]));
    assert_eq!(f.ethertype(), 0x0800);
    assert_eq!(f.vni(), 1);
    let mut again = vec![0xaa];
    f.write_datagram(&mut again);
    assert_eq!(&again[1..], &dg[..]);
    assert_eq!(
        parse_datagram(&[2, 8, 0, 0, 0]),
        Err(DatagramError::UnknownKind(2))
    );
    assert_eq!(parse_datagram(&[0]), Err(DatagramError::UnknownKind(0)));
    assert_eq!(
        encode_vxlan_header(0xffff_ffff),
        [8, 0, 0, 0, 0xff, 0xff, 0xff, 0]
    );
    assert_eq!(
        encode_vxlan_header(0x0012_3456),
        [8, 0, 0, 0, 0x12, 0x34, 0x56, 0]
    );
}

// ---------------------------------------------------------------------------------------------
// Types.

#[test]
fn mac_address_classes_and_text() {
    assert!(MacAddr([0xff; 6]).is_broadcast());
    assert!(!MacAddr([0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]).is_broadcast());
    assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
    assert!(MacAddr([0x03, 0, 0, 0, 0, 0]).is_multicast());
    assert!(MacAddr([0xff; 6]).is_multicast());
    assert!(!MacAddr([0x02, 0xfa, 0, 0, 0, 1]).is_multicast());
    assert!(!MacAddr([0x00, 0x01, 0x01, 0x01, 0x01, 0x01]).is_multicast());
    assert_eq!(MacAddr([1, 2, 3, 4, 5, 6]).octets(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        MacAddr::from([1, 2, 3, 4, 5, 6]),
        MacAddr([1, 2, 3, 4, 5, 6])
    );
    assert_eq!(MacAddr::BROADCAST, MacAddr([0xff; 6]));
    assert_eq!(
        "0A:1b:2c:3D:4e:5f".parse::<MacAddr>().unwrap(),
        MacAddr([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f])
    );
    assert_eq!(
        MacAddr([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]).to_string(),
        "0a:1b:2c:3d:4e:5f"
    );
    assert_eq!(
        format!("{:?}", MacAddr([0, 0, 0, 0, 0, 1])),
        "MacAddr(00:00:00:00:00:01)"
    );
    for bad in [
        "",
        "0a:1b:2c:3d:4e",
        "0a:1b:2c:3d:4e:5f:60",
        "0a:1b:2c:3d:4e:5",
        "0a:1b:2c:3d:4e:5ff",
        "0a:1b:2c:3d:4e:gg",
        "+a:1b:2c:3d:4e:5f",
        "0a-1b-2c-3d-4e-5f",
    ] {
        let e = bad.parse::<MacAddr>().unwrap_err();
        assert_eq!(e.input, bad);
    }
    let long = "x".repeat(100);
    assert_eq!(long.parse::<MacAddr>().unwrap_err().input.len(), 64);
}

#[test]
fn cidrs_by_hand() {
    let c = |s: &str| s.parse::<IpCidr>();
    let v4 = c("10.244.0.0/16").unwrap();
    assert_eq!(v4.addr(), ip("10.244.0.0"));
    assert_eq!(v4.prefix(), 16);
    assert!(v4.is_ipv4());
    assert!(v4.contains(ip("10.244.255.255")));
    assert!(v4.contains(ip("10.244.0.0")));
    assert!(!v4.contains(ip("10.245.0.0")));
    assert!(!v4.contains(ip("10.243.255.255")));
    assert!(!v4.contains(ip("::ffff:10.244.0.1")));
    assert_eq!(format!("{v4}"), "10.244.0.0/16");
    assert_eq!(format!("{v4:?}"), "IpCidr(10.244.0.0/16)");
    let all = c("0.0.0.0/0").unwrap();
    assert!(all.contains(ip("255.255.255.255")));
    assert!(!all.contains(ip("::1")));
    let host = c("10.0.0.1/32").unwrap();
    assert!(host.contains(ip("10.0.0.1")));
    assert!(!host.contains(ip("10.0.0.0")));
    assert!(!host.contains(ip("10.0.0.3")));
    let v6 = c("fd00:10:244::/48").unwrap();
    assert!(!v6.is_ipv4());
    assert!(v6.contains(ip("fd00:10:244:ffff::1")));
    assert!(!v6.contains(ip("fd00:10:245::1")));
    assert!(!v6.contains(ip("10.244.0.1")));
    assert!(c("::/0").unwrap().contains(ip("ffff::1")));
    assert!(c("fd00::1/128").unwrap().contains(ip("fd00::1")));
    assert!(!c("fd00::1/128").unwrap().contains(ip("fd00::2")));
    // Errors: prefix too long, host bits, syntax.
    assert_eq!(
        c("10.0.0.0/33"),
        Err(CidrError::PrefixTooLong {
            prefix: 33,
            max: 32
        })
    );
    assert_eq!(
        c("fd00::/129"),
        Err(CidrError::PrefixTooLong {
            prefix: 129,
            max: 128
        })
    );
    assert!(c("fd00::/128").is_ok());
    assert_eq!(
        c("10.244.1.5/24"),
        Err(CidrError::HostBitsSet {
            addr: ip("10.244.1.5"),
            prefix: 24,
            network: ip("10.244.1.0")
        })
    );
    assert!(matches!(
        c("fd00::1/64"),
        Err(CidrError::HostBitsSet { network, .. }) if network == ip("fd00::")
    ));
    for bad in [
        "10.0.0.0",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "10.0.0.0/0008",
        "x/8",
        "10.0.0.0/8/8",
    ] {
        assert!(matches!(c(bad), Err(CidrError::Syntax { .. })), "{bad}");
    }
    assert_eq!(
        IpCidr::new_truncating(ip("10.244.1.5"), 16).unwrap(),
        c("10.244.0.0/16").unwrap()
    );
    assert_eq!(
        IpCidr::new_truncating(ip("fd00::1:2"), 112).unwrap(),
        c("fd00::1:0/112").unwrap()
    );
    assert_eq!(
        IpCidr::new_truncating(ip("10.1.2.3"), 0).unwrap(),
        c("0.0.0.0/0").unwrap()
    );
    assert_eq!(
        IpCidr::new_truncating(ip("10.1.2.3"), 33),
        Err(CidrError::PrefixTooLong {
            prefix: 33,
            max: 32
        })
    );
    assert!(IpCidr::new_truncating(ip("fd00::1"), 129).is_err());
    assert_eq!(
        IpCidr::new_truncating(ip("fd00::1"), 128).unwrap().addr(),
        ip("fd00::1")
    );
}
