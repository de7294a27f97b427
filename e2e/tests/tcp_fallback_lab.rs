//! The TCP fallback (issue 15) in the network lab: site-b's firewall (its NAT router) drops
//! outbound UDP to the hub. The hub serves QUIC over TLS on TCP 443 beside UDP 7443; edge-b1's
//! agent (`transport = auto`) gets no answer over UDP, falls back to TCP by itself, and pod
//! traffic with the cloud and with site-a works over it (10 MiB TCP both ways, the kernel VXLAN
//! frames riding QUIC datagrams inside the TCP connection). When the block is lifted, the agent
//! finds UDP answering again and moves back. Site-a, never blocked, stays on UDP throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use petrel_e2e::lab::{self, Lab, LabSpec};
use petrel_e2e::lab_petrel::PetrelLab;

const MIB: u64 = 1 << 20;

fn transport(p: &PetrelLab, node: &str) -> Option<String> {
    let s = p.agent_status(node).ok()?;
    s["links"]
        .as_array()?
        .iter()
        .find(|l| l["state"] == "connected")?["transport"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn a_site_without_udp_rides_the_tcp_fallback_and_returns_to_udp() {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut petrel =
        PetrelLab::start_with(&lab, "auto", tmp.path(), &["--tcp-listen", "0.0.0.0:443"]).unwrap();
    petrel
        .restart_with(
            &[],
            &["--connect-timeout", "1s", "--udp-retry-interval", "2s"],
        )
        .unwrap();
    for n in ["edge-a1", "edge-b1"] {
        assert_eq!(transport(&petrel, n).as_deref(), Some("udp"), "{n}");
    }

    // site-b's router drops UDP to the hub's port; its agent starts afresh behind it.
    let rt_b = lab.router("site-b").unwrap().ns.clone();
    for cmd in [
        "add table inet petrel_noudp",
        "add chain inet petrel_noudp blockudp { type filter hook forward priority 0 ; }",
        "add rule inet petrel_noudp blockudp udp dport 7443 drop",
    ] {
        lab.exec(&rt_b, &["nft", cmd]).unwrap();
    }
    let t0 = Instant::now();
    petrel.kill_agent_and_respawn("edge-b1").unwrap();
    lab::wait_until(
        "edge-b1 connected over the TCP fallback",
        Duration::from_secs(40),
        || Ok(transport(&petrel, "edge-b1").as_deref() == Some("tcp")),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", petrel.hub.log_tail(30)));
    eprintln!(
        "edge-b1 on the TCP fallback {:?} after its start",
        t0.elapsed()
    );
    let hub = petrel.hub_status().unwrap();
    let row = hub["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["node"] == "edge-b1")
        .cloned()
        .unwrap();
    assert_eq!(row["transport"], "tcp", "{row}");
    assert_eq!(transport(&petrel, "edge-a1").as_deref(), Some("udp"));

    // Pod traffic over it: with the cloud and with the other site, 10 MiB each way.
    let ip = |n: &str| lab.node(n).pod_ip;
    lab.wait_reachable("cloud-1", ip("edge-b1"), Duration::from_secs(20))
        .unwrap();
    for (a, b) in [("cloud-1", "edge-b1"), ("edge-a1", "edge-b1")] {
        for (from, to) in [(a, b), (b, a)] {
            let t = lab
                .tcp_transfer(from, to, 10 * MIB)
                .unwrap_or_else(|e| panic!("10 MiB {from} -> {to} over the fallback: {e:#}"));
            eprintln!(
                "{from} -> {to} over the TCP fallback: {:.0} Mbit/s",
                t.mbit_per_s()
            );
            assert_eq!(t.bytes_received, 10 * MIB);
        }
    }

    // The block lifted: back on UDP by itself.
    lab.exec(&rt_b, &["nft", "delete table inet petrel_noudp"])
        .unwrap();
    let t1 = Instant::now();
    lab::wait_until("edge-b1 back on UDP", Duration::from_secs(30), || {
        Ok(transport(&petrel, "edge-b1").as_deref() == Some("udp"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", petrel.hub.log_tail(30)));
    eprintln!(
        "edge-b1 back on UDP {:?} after the block was lifted",
        t1.elapsed()
    );
    lab.wait_reachable("cloud-1", ip("edge-b1"), Duration::from_secs(20))
        .unwrap();
    petrel.stop().unwrap();
}
