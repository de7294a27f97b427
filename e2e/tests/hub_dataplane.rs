//! The hub's VXLAN switch with real processes on loopback: agents are library clients holding
//! real tunnels, cloud VTEPs are UDP sockets on 127.0.0.x (the inventory puts the cloud nodes'
//! underlay there). Proves forwarding on every via-hub path, and that spoofed, unknown,
//! malformed and oversize frames are dropped, counted by reason and never delivered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::time::Duration;

use petrel_e2e::attack::{
    relay_flood, relay_hub, vxlan_frame, RelayFloodConfig, MAC_A1, MAC_B1, MAC_CLOUD1, MAC_GW1,
};
use petrel_e2e::procs::{wait_until, Hub};
use petrel_e2e::raw_agent::{hub_ca, node_identity, session_as, RawSession};
use petrel_proto::ControlMessage;

const CLOUD1: &str = MAC_CLOUD1;
const GW1: &str = MAC_GW1;
const A1: &str = MAC_A1;
const B1: &str = MAC_B1;

/// A VXLAN payload with an IPv4/UDP packet of `pad` payload bytes, DF set.
fn frame(src_mac: &str, dst_mac: &str, src: &str, dst: &str, pad: usize) -> Vec<u8> {
    vxlan_frame(src_mac, dst_mac, src, dst, pad).unwrap()
}

async fn datagram(s: &RawSession, within: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(within, s.conn.read_datagram())
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|b| b.to_vec())
}

fn drops(hub: &Hub, node: &str, reason: &str) -> u64 {
    hub.agent(node)
        .and_then(|a| a["datagrams_dropped"][reason].as_u64())
        .unwrap_or(0)
}

#[test]
fn the_hub_switches_via_hub_paths_and_drops_what_it_must() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, relay, flannel_port) = relay_hub(tmp.path()).unwrap();
    let ca = hub_ca(&hub).unwrap();
    // cloud-1's flannel.1, as far as the hub can tell.
    let cloud1 = UdpSocket::bind(("127.0.0.11", flannel_port)).unwrap();
    cloud1
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (a1_cert, a1_key) = node_identity(&ca, "edge-a1").unwrap();
    let (b1_cert, b1_key) = node_identity(&ca, "edge-b1").unwrap();
    let (a1, b1) = rt.block_on(async {
        let a1 = session_as(&hub.server(), ca.cert_der(), &a1_cert, &a1_key, "edge-a1")
            .await
            .unwrap();
        let b1 = session_as(&hub.server(), ca.cert_der(), &b1_cert, &b1_key, "edge-b1")
            .await
            .unwrap();
        assert!(
            matches!(a1.first, ControlMessage::Welcome(_))
                && matches!(b1.first, ControlMessage::Welcome(_))
        );
        (a1, b1)
    });
    // Wait for path MTU discovery so full-size frames fit.
    wait_until(Duration::from_secs(5), "PMTU discovery", || {
        (a1.conn.max_datagram_size().unwrap_or(0) > 1400).then_some(())
    })
    .unwrap();

    // cloud-1 pod -> edge-a1 pod: UDP into the relay, out as a datagram to edge-a1, byte for byte.
    let f = frame(CLOUD1, A1, "10.244.1.2", "10.244.3.2", 100);
    cloud1.send_to(&f, &relay).unwrap();
    let got = rt
        .block_on(datagram(&a1, Duration::from_secs(3)))
        .expect("edge-a1 receives the frame");
    assert_eq!(got[0], petrel_proto::DATAGRAM_KIND_VXLAN);
    assert_eq!(&got[1..], &f[..]);

    // edge-a1 pod -> cloud-1 pod: a datagram in, UDP to cloud-1's flannel port out.
    let f = frame(A1, CLOUD1, "10.244.3.2", "10.244.1.2", 200);
    let mut d = vec![petrel_proto::DATAGRAM_KIND_VXLAN];
    d.extend_from_slice(&f);
    a1.conn.send_datagram(d.into()).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = cloud1.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
    assert_eq!(from.to_string(), relay);

    // edge-a1 -> edge-b1 through the hub; and the hub node's own pod (from loopback) -> edge-b1.
    let f = frame(A1, B1, "10.244.3.2", "10.244.5.2", 300);
    let mut d = vec![1u8];
    d.extend_from_slice(&f);
    a1.conn.send_datagram(d.into()).unwrap();
    assert_eq!(
        &rt.block_on(datagram(&b1, Duration::from_secs(3)))
            .expect("edge-b1 receives")[1..],
        &f[..]
    );
    let gw = UdpSocket::bind("127.0.0.1:0").unwrap();
    let f = frame(GW1, B1, "10.244.2.2", "10.244.5.2", 50);
    gw.send_to(&f, &relay).unwrap();
    assert_eq!(
        &rt.block_on(datagram(&b1, Duration::from_secs(3)))
            .expect("edge-b1 receives from gw-1")[1..],
        &f[..]
    );

    // edge-a1 spoofs edge-b1's source MAC, then an unknown destination, then garbage.
    for (bytes, reason) in [
        (
            frame(B1, CLOUD1, "10.244.5.2", "10.244.1.2", 10),
            "spoofed_source",
        ),
        (
            frame(A1, CLOUD1, "10.244.9.9", "10.244.1.2", 10),
            "spoofed_source",
        ),
        (
            frame(A1, "02:00:00:00:00:77", "10.244.3.2", "10.244.1.2", 10),
            "unknown_destination",
        ),
    ] {
        let mut d = vec![1u8];
        d.extend_from_slice(&bytes);
        a1.conn.send_datagram(d.into()).unwrap();
        wait_until(Duration::from_secs(3), reason, || {
            (drops(&hub, "edge-a1", reason) > 0).then_some(())
        })
        .unwrap();
    }
    a1.conn.send_datagram(vec![0x7f, 1, 2, 3].into()).unwrap();
    wait_until(Duration::from_secs(3), "unknown kind counted", || {
        (drops(&hub, "edge-a1", "unknown_kind") > 0).then_some(())
    })
    .unwrap();
    // Nothing of it reached cloud-1 or edge-b1.
    cloud1
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        cloud1.recv_from(&mut buf).is_err(),
        "a dropped frame reached cloud-1"
    );
    assert!(
        rt.block_on(datagram(&b1, Duration::from_millis(300)))
            .is_none(),
        "a dropped frame reached edge-b1"
    );

    // Too big for edge-a1's tunnel: dropped, counted, and cloud-1 gets ICMP frag-needed.
    cloud1
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let big = frame(CLOUD1, A1, "10.244.1.2", "10.244.3.2", 1450 - 28);
    cloud1.send_to(&big, &relay).unwrap();
    let (n, _) = cloud1
        .recv_from(&mut buf)
        .expect("ICMP frag-needed back to cloud-1");
    let reply = petrel_proto::VxlanFrame::from_vxlan_payload(&buf[..n]).unwrap();
    assert_eq!(reply.dst_mac().to_string(), CLOUD1);
    let l3 = reply.l3();
    assert_eq!(&l3[20..22], &[3, 4], "ICMP type 3 code 4");
    let mtu = u16::from_be_bytes([l3[26], l3[27]]);
    assert!((1300..1450).contains(&mtu), "advertised MTU {mtu}");
    assert!(hub.metrics().unwrap().contains("reason=\"oversize\""));
    let m = hub.metrics().unwrap();
    assert!(
        m.contains("petrel_hub_frames_forwarded_total{reason=\"vtep_to_agent\"}"),
        "{m}"
    );
    drop((a1, b1));
}

#[test]
fn a_relay_flood_never_starves_the_tunnels() {
    let tmp = tempfile::tempdir().unwrap();
    // A cloud pod sending valid frames to edge-a1's pod as fast as two threads can: more than
    // the hub forwards, for longer than an agent waits before declaring the hub dead (5 s).
    // edge-a1 and edge-b1 ping the hub on their control streams every 250 ms meanwhile.
    let r = relay_flood(
        tmp.path(),
        &RelayFloodConfig {
            threads: 2,
            idle_secs: 1.0,
            flood_secs: 7.0,
            ping_every_ms: 250,
        },
    )
    .unwrap();
    let (a, b) = (&r.tunnels[0], &r.tunnels[1]);
    eprintln!(
        "relay flood: {} frames sent in 7 s, {} forwarded; pings: edge-a1 worst {:.1} ms ({} \
         lost), edge-b1 worst {:.1} ms ({} lost); idle worst {:.1} / {:.1} ms",
        r.frames_sent,
        r.frames_forwarded,
        a.flood.max_ms,
        a.flood_lost,
        b.flood.max_ms,
        b.flood_lost,
        a.idle.max_ms,
        b.idle.max_ms
    );
    assert!(
        r.frames_sent > 100_000,
        "the flood was too small: {}",
        r.frames_sent
    );
    // Every tunnel stayed up and answered: the one the flood was for, and one it was not.
    assert_eq!((a.node.as_str(), b.node.as_str()), ("edge-a1", "edge-b1"));
    assert_eq!((a.flood_lost, b.flood_lost), (0, 0));
    assert!(a.still_connected && b.still_connected);
    assert!(
        b.flood.max_ms < 1000.0,
        "edge-b1 worst RTT {} ms",
        b.flood.max_ms
    );
}
