//! The hub's VXLAN switch with real processes on loopback: agents are library clients holding
//! real tunnels, cloud VTEPs are UDP sockets on 127.0.0.x (the inventory puts the cloud nodes'
//! underlay there). Proves forwarding on every via-hub path, and that spoofed, unknown,
//! malformed and oversize frames are dropped, counted by reason and never delivered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use petrel_e2e::procs::{free_port, wait_until, Hub};
use petrel_e2e::raw_agent::{hub_ca, node_identity, session_as, RawSession};
use petrel_proto::{ControlMessage, MacAddr};

const CLOUD1: &str = "02:fa:00:00:00:01";
const GW1: &str = "02:fa:00:00:00:02";
const A1: &str = "02:fa:00:00:00:03";
const B1: &str = "02:fa:00:00:00:05";

/// A VXLAN payload with an IPv4/UDP packet of `pad` payload bytes, DF set.
fn frame(src_mac: &str, dst_mac: &str, src: &str, dst: &str, pad: usize) -> Vec<u8> {
    let mut f = petrel_proto::encode_vxlan_header(1).to_vec();
    f.extend_from_slice(&dst_mac.parse::<MacAddr>().unwrap().0);
    f.extend_from_slice(&src_mac.parse::<MacAddr>().unwrap().0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(28 + pad).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
    ip.extend_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
    ip.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 8, 0, 0]);
    ip.resize(28 + pad, 0xab);
    f.extend_from_slice(&ip);
    f
}

fn inventory() -> String {
    let inv = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../gateway/src/default-inventory.toml"
    ))
    .unwrap();
    // Put the cloud and Express Connect underlays on loopback so the hub's UDP stays local.
    inv.replace("192.168.0.11", "127.0.0.11")
        .replace("192.168.0.12", "127.0.0.12")
        .replace("192.168.10.2", "127.0.0.16")
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

/// A hub on the loopback inventory with its relay on a free port, the hub node being gw-1.
/// Returns the hub, the relay's address and the flannel port it sends VTEPs' frames to.
fn relay_hub(dir: &std::path::Path) -> (Hub, String, u16) {
    let flannel_port = free_port();
    let relay_port = free_port();
    let inv_path = dir.join("inventory.toml");
    std::fs::write(&inv_path, inventory()).unwrap();
    let hub = Hub::start(
        &dir.join("hub"),
        &[
            "--inventory",
            inv_path.to_str().unwrap(),
            "--relay-listen",
            &format!("127.0.0.1:{relay_port}"),
            "--flannel-port",
            &flannel_port.to_string(),
            "--node-name",
            "gw-1",
        ],
    )
    .unwrap();
    hub.proc
        .wait_for_log("VXLAN relay listening", Duration::from_secs(5))
        .unwrap();
    (hub, format!("127.0.0.1:{relay_port}"), flannel_port)
}

#[test]
fn the_hub_switches_via_hub_paths_and_drops_what_it_must() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, relay, flannel_port) = relay_hub(tmp.path());
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

/// Pings the hub on a raw session's control stream every 250 ms for `for_`; returns the worst
/// round trip and how many pings got no pong within 2 s.
async fn ping_hub(s: &mut RawSession, for_: Duration) -> (Duration, usize) {
    let start = std::time::Instant::now();
    let mut worst = Duration::ZERO;
    let mut lost = 0;
    let mut nonce = 0u64;
    while start.elapsed() < for_ {
        nonce += 1;
        let sent = std::time::Instant::now();
        s.writer
            .send(&ControlMessage::Ping(petrel_proto::Ping {
                nonce,
                sent_at_micros: 0,
            }))
            .await
            .unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match s.reader.next().await {
                    Ok(Some(ControlMessage::Pong(p))) if p.nonce == nonce => return true,
                    Ok(Some(ControlMessage::Ping(p))) => {
                        let _ = s.writer.send(&ControlMessage::Pong(p.pong())).await;
                    }
                    Ok(Some(_)) => {}
                    _ => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if answered {
            worst = worst.max(sent.elapsed());
        } else {
            lost += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (worst, lost)
}

#[test]
fn a_relay_flood_never_starves_the_tunnels() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, relay, _) = relay_hub(tmp.path());
    let ca = hub_ca(&hub).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (a1_cert, a1_key) = node_identity(&ca, "edge-a1").unwrap();
    let (b1_cert, b1_key) = node_identity(&ca, "edge-b1").unwrap();
    let (mut a1, mut b1) = rt.block_on(async {
        (
            session_as(&hub.server(), ca.cert_der(), &a1_cert, &a1_key, "edge-a1")
                .await
                .unwrap(),
            session_as(&hub.server(), ca.cert_der(), &b1_cert, &b1_key, "edge-b1")
                .await
                .unwrap(),
        )
    });
    // A cloud pod sending valid frames to edge-a1's pod as fast as two threads can: more than
    // the hub forwards, for longer than an agent waits before declaring the hub dead (5 s).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let floods: Vec<_> = (0..2)
        .map(|i| {
            let (stop, relay) = (stop.clone(), relay.clone());
            std::thread::spawn(move || {
                let s = UdpSocket::bind(("127.0.0.11", 0)).unwrap();
                let f = frame(CLOUD1, A1, "10.244.1.2", "10.244.3.2", 64 + i);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if s.send_to(&f, &relay).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let ((a_worst, a_lost), (b_worst, b_lost)) = rt.block_on(async {
        let (a, b) = tokio::join!(
            ping_hub(&mut a1, Duration::from_secs(7)),
            ping_hub(&mut b1, Duration::from_secs(7))
        );
        (a, b)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = floods.into_iter().map(|t| t.join().unwrap()).sum();
    let forwarded = petrel_e2e::apiserver::metric(
        &hub.metrics().unwrap(),
        "petrel_hub_frames_forwarded_total{reason=\"vtep_to_agent\"}",
    );
    eprintln!(
        "relay flood: {sent} frames sent in 7 s, {forwarded} forwarded; pings: edge-a1 worst \
         {a_worst:?} ({a_lost} lost), edge-b1 worst {b_worst:?} ({b_lost} lost)"
    );
    assert!(sent > 100_000, "the flood was too small: {sent}");
    // Every tunnel stayed up and answered: the one the flood was for, and one it was not.
    assert_eq!((a_lost, b_lost), (0, 0));
    assert!(hub.agent("edge-a1").is_some() && hub.agent("edge-b1").is_some());
    assert!(
        b_worst < Duration::from_secs(1),
        "edge-b1 worst RTT {b_worst:?}"
    );
}
