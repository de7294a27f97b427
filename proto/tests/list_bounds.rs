//! More tests from the mutation run: list counts are bounded by the smallest encoding of their
//! elements exactly (a gateway is at least 7 bytes, a route at least 22, a site MTU 4), the enrolment
//! request cap has the value its documentation computes, and the keepalive keeps the last 8
//! pings and clamps its periods to 24 hours.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use petrel_proto::control::{decode_frame, msg_type, SiteMtu};
use petrel_proto::enrol::MAX_ENROL_REQUEST_BODY;
use petrel_proto::*;

fn frame(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An Update body declaring `gateways` and `routes` elements, followed by `rest` bytes.
fn update(gateways: u16, routes: Option<u16>, rest: &[u8]) -> Vec<u8> {
    let mut body = gateways.to_be_bytes().to_vec();
    if let Some(r) = routes {
        body.extend_from_slice(&r.to_be_bytes());
    }
    body.extend_from_slice(rest);
    frame(msg_type::UPDATE, &body)
}

#[test]
fn a_gateway_needs_at_least_seven_bytes() {
    // name "" (2), host length (2), port (2), active (1): one byte short is refused by the count.
    assert_eq!(
        decode_frame(&update(1, None, &[0; 6])),
        Err(DecodeError::Truncated {
            field: "HubView.gateways",
            needed: 1
        })
    );
    // Seven bytes pass the count; the empty host is refused by its own check.
    assert!(matches!(
        decode_frame(&update(1, None, &[0; 7])),
        Err(DecodeError::InvalidValue {
            field: "GatewayEndpoint.host",
            ..
        })
    ));
    // Two gateways need 14.
    assert_eq!(
        decode_frame(&update(2, None, &[0; 13])),
        Err(DecodeError::Truncated {
            field: "HubView.gateways",
            needed: 1
        })
    );
}

#[test]
fn a_route_needs_at_least_twenty_two_bytes() {
    // node name "a" (3), site "" (2), 10.0.0.0/8 (6), MAC (6), 1.2.3.4 (5): 22 bytes, no path.
    let mut route = vec![0, 1, b'a', 0, 0, 4, 10, 0, 0, 0, 8];
    route.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    route.extend_from_slice(&[4, 1, 2, 3, 4]);
    assert_eq!(route.len(), 22);
    assert_eq!(
        decode_frame(&update(0, Some(1), &route[..21])),
        Err(DecodeError::Truncated {
            field: "HubView.routes",
            needed: 1
        })
    );
    assert_eq!(
        decode_frame(&update(0, Some(1), &route)),
        Err(DecodeError::Truncated {
            field: "Route.path",
            needed: 1
        })
    );
    assert_eq!(
        decode_frame(&update(0, Some(2), &[route.clone(), route].concat()[..43])),
        Err(DecodeError::Truncated {
            field: "HubView.routes",
            needed: 1
        })
    );
}

/// An Update body with no gateways, no routes, site MTU 1400, the empty egress policy, then a
/// site MTU list of `count` entries made of `entries`.
fn update_with_site_mtus(count: u16, entries: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0, 0, 0, 0x05, 0x78];
    // Egress policy: no node addresses, no pod CIDRs, no node ports, pod ports absent.
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    body.extend_from_slice(&count.to_be_bytes());
    body.extend_from_slice(entries);
    frame(msg_type::UPDATE, &body)
}

#[test]
fn a_site_mtu_needs_at_least_four_bytes() {
    // site "" (2) and MTU 576 = 0x0240 (2): the smallest entry is 4 bytes.
    let entry = [0, 0, 0x02, 0x40];
    let (m, _) = decode_frame(&update_with_site_mtus(2, &entry.repeat(2)))
        .unwrap()
        .unwrap();
    let ControlMessage::Update(v) = m else {
        panic!("{m:?}")
    };
    assert_eq!(v.site_mtu, 1400);
    assert_eq!(
        v.site_mtus,
        vec![
            SiteMtu {
                site: String::new(),
                mtu: 576
            };
            2
        ]
    );
    // One byte short of two entries is refused by the count, before any entry is read.
    assert_eq!(
        decode_frame(&update_with_site_mtus(2, &entry.repeat(2)[..7])),
        Err(DecodeError::Truncated {
            field: "HubView.site_mtus",
            needed: 1
        })
    );
    assert_eq!(
        decode_frame(&update_with_site_mtus(1, &entry[..3])),
        Err(DecodeError::Truncated {
            field: "HubView.site_mtus",
            needed: 1
        })
    );
}

#[test]
fn enrolment_request_cap_is_each_field_at_its_cap() {
    // Version, then token, node name and CSR at their caps with 4-byte length prefixes.
    assert_eq!(MAX_ENROL_REQUEST_BODY, 2 + 4 + 1024 + 4 + 253 + 4 + 4_096);
    assert_eq!(MAX_ENROL_REQUEST_BODY, 5_387);
}

const MS: Duration = Duration::from_millis(1);

fn sent(action: KeepaliveAction) -> Ping {
    match action {
        KeepaliveAction::SendPing(p) => p,
        other => panic!("expected a ping, got {other:?}"),
    }
}

#[test]
fn keepalive_accepts_pongs_for_its_last_eight_pings() {
    let t0 = Instant::now();
    let mut k = Keepalive::new(100 * MS, 60_000 * MS, t0);
    let mut pings = Vec::new();
    for i in 0..9u32 {
        pings.push(sent(k.poll(t0 + 100 * i * MS)));
    }
    let now = t0 + 1000 * MS;
    // The first of nine was forgotten.
    assert_eq!(k.on_pong(&pings[0].pong(), now), None);
    // The second is still known, 900 ms ago.
    assert_eq!(k.on_pong(&pings[1].pong(), now), Some(900 * MS));
    // And the latest, answered after 200 ms.
    assert_eq!(k.on_pong(&pings[8].pong(), now), Some(200 * MS));
    // Two outstanding pings: the older one's pong still counts.
    let mut k = Keepalive::new(100 * MS, 60_000 * MS, t0);
    let a = sent(k.poll(t0));
    let _b = sent(k.poll(t0 + 100 * MS));
    assert_eq!(k.on_pong(&a.pong(), t0 + 150 * MS), Some(150 * MS));
    assert_eq!(k.rtt(), Some(150 * MS));
}

#[test]
fn keepalive_periods_are_clamped_to_a_day() {
    let t0 = Instant::now();
    let day = Duration::from_secs(24 * 3600);
    let mut k = Keepalive::new(2 * day, 3 * day, t0);
    sent(k.poll(t0));
    assert_eq!(k.poll(t0), KeepaliveAction::Wait(t0 + day));
    let mut k = Keepalive::new(Duration::ZERO, Duration::ZERO, t0);
    sent(k.poll(t0));
    assert_eq!(k.poll(t0), KeepaliveAction::Wait(t0 + MS));
    assert_eq!(k.poll(t0 + MS), KeepaliveAction::TimedOut);
}
