//! Direct site-to-site paths (issue 15, acceptance 1 and 2) in the network-namespace lab, with
//! three public sites behind NAT: site A and site B behind port-preserving masquerade (the
//! mapping the hub sees is the one a peer reaches), site C behind `masquerade random` (a new
//! port per destination, like a symmetric NAT). The hub offers each relayed pair the other's
//! address; A and B then carry their traffic to each other directly (the hub's frame counters
//! stay flat), while every pair with C stays on the hub and works. Blocking the A-B path in A's
//! NAT mid-transfer sends the traffic back through the hub and the transfer completes; lifting
//! the block brings the direct path back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use petrel_e2e::failover_probe::Probe;
use petrel_e2e::lab::{self, vxlan_icmp_echo, Lab, LabSpec, PingOpts};
use petrel_e2e::lab_petrel::PetrelLab;

fn agent_to_agent(petrel: &PetrelLab<'_>) -> u64 {
    petrel.hub_status().unwrap()["dataplane"]["frames_forwarded"]["agent_to_agent"]
        .as_u64()
        .unwrap_or(0)
}

fn transfer_both_ways(lab: &Lab, a: &str, b: &str) {
    for (from, to) in [(a, b), (b, a)] {
        let r = lab
            .tcp_transfer(from, to, 10 << 20)
            .unwrap_or_else(|e| panic!("10 MiB {from} -> {to}: {e:#}"));
        eprintln!("{from} -> {to}: {:.0} Mbit/s", r.mbit_per_s());
    }
}

fn rtt_ms(lab: &Lab, from: &str, to: &str) -> f64 {
    let r = lab
        .ping_with(
            from,
            lab.node(to).pod_ip,
            &PingOpts {
                count: 20,
                interval: Duration::from_millis(20),
                ..PingOpts::default()
            },
        )
        .unwrap();
    r.rtt_avg_ms.unwrap_or(f64::NAN)
}

#[test]
fn public_sites_go_direct_where_their_nats_allow_and_fall_back_to_the_hub() {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec {
        third_site: true,
        ..LabSpec::default()
    })
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The fast hook: its capture socket is a UDP port, which the spoofing check below uses.
    let petrel = PetrelLab::start(&lab, "fast", tmp.path()).unwrap();
    let pairs = [
        ("edge-a1", "edge-b1"),
        ("edge-a1", "edge-c1"),
        ("edge-b1", "edge-c1"),
    ];
    for (a, b) in pairs {
        lab.wait_reachable(a, lab.node(b).pod_ip, Duration::from_secs(20))
            .unwrap();
        lab.wait_reachable(b, lab.node(a).pod_ip, Duration::from_secs(20))
            .unwrap();
    }

    // A and B: the traffic above crossed the hub, which offered the pair; both agents punch
    // from their tunnel sockets and go direct.
    let via_hub_ms = rtt_ms(&lab, "edge-a1", "edge-c1");
    petrel
        .wait_direct("edge-a1", "edge-b1", Duration::from_secs(30))
        .unwrap();
    let direct_ms = rtt_ms(&lab, "edge-a1", "edge-b1");
    eprintln!(
        "ICMP RTT a1 -> b1 direct {direct_ms:.3} ms; a1 -> c1 via the hub {via_hub_ms:.3} ms"
    );
    let row = petrel.peer_row("edge-a1", "edge-b1");
    let b_wan = lab.router("site-b").unwrap().wan_ip;
    assert!(
        row["offered_addr"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{b_wan}:")),
        "the hub offered B's NAT address: {row}"
    );

    // 10 MiB both ways, none of it through the hub, once the direct path's MTU discovery lets
    // it take full-size frames (site MTU 1,380 + Ethernet 14 + VXLAN 8; until then larger
    // frames go through the hub, by design).
    let full_frame = 1380 + 14 + 8;
    lab::wait_until(
        "the direct path takes full-size frames",
        Duration::from_secs(10),
        || {
            Ok(["edge-a1", "edge-b1"].iter().all(|n| {
                let peer = if *n == "edge-a1" {
                    "edge-b1"
                } else {
                    "edge-a1"
                };
                petrel.peer_row(n, peer)["max_frame"]
                    .as_u64()
                    .is_some_and(|m| m >= full_frame)
            }))
        },
    )
    .unwrap();
    let hub_before = agent_to_agent(&petrel);
    let a_before = petrel.agent_status("edge-a1").unwrap()["dataplane"]["bytes_direct_out"]
        .as_u64()
        .unwrap_or(0);
    transfer_both_ways(&lab, "edge-a1", "edge-b1");
    let hub_after = agent_to_agent(&petrel);
    let a_st = petrel.agent_status("edge-a1").unwrap();
    let a_after = a_st["dataplane"]["bytes_direct_out"].as_u64().unwrap_or(0);
    assert_eq!(
        hub_after, hub_before,
        "A <-> B frames through the hub while direct"
    );
    assert!(
        a_after - a_before > 10 << 20,
        "edge-a1 sent its 10 MiB (and the ACKs of B's) directly: {} bytes",
        a_after - a_before
    );
    assert!(
        a_st["dataplane"]["frames_direct_in"].as_u64().unwrap_or(0) > 1000,
        "edge-a1 received B's frames directly: {}",
        a_st["dataplane"]
    );

    // A forged frame over the direct path: something on edge-b1 hands its agent (the fast
    // hook's capture port) frames for edge-a1 with another node's VtepMAC, and with a source
    // outside edge-b1's pod CIDR. edge-b1's agent sends them direct; edge-a1 refuses and counts
    // both, injecting neither.
    let capture = std::net::SocketAddrV4::new("127.0.0.1".parse().unwrap(), 8473);
    let a1 = lab.node("edge-a1");
    let spoofed_mac = vxlan_icmp_echo(
        1,
        &a1.vtep_mac,
        &lab.node("x1").vtep_mac,
        lab.node("x1").pod_ip,
        a1.pod_ip,
    )
    .unwrap();
    let spoofed_source = vxlan_icmp_echo(
        1,
        &a1.vtep_mac,
        &lab.node("edge-b1").vtep_mac,
        "10.244.99.9".parse().unwrap(),
        a1.pod_ip,
    )
    .unwrap();
    let dropped = |reason: &str| {
        petrel.agent_status("edge-a1").unwrap()["dataplane"]["dropped"][reason]
            .as_u64()
            .unwrap_or(0)
    };
    let (m0, s0) = (dropped("peer_spoofed_mac"), dropped("peer_spoofed_source"));
    lab.send_udp(
        &lab.node("edge-b1").ns,
        None,
        capture,
        vec![spoofed_mac, spoofed_source],
    )
    .unwrap();
    lab::wait_until(
        "edge-a1 refuses and counts both forged frames",
        Duration::from_secs(5),
        || Ok(dropped("peer_spoofed_mac") > m0 && dropped("peer_spoofed_source") > s0),
    )
    .unwrap();
    let metrics = petrel.agent_metrics("edge-a1").unwrap();
    assert!(
        metrics.contains("petrel_agent_peer_refused_total{reason=\"peer_frame\"}"),
        "{metrics}"
    );
    // The share of site-to-site bytes that went direct, as a metric: A's 10 MiB to B went
    // direct (what went via the hub is C's traffic, not sent yet, and the first pings).
    let sent = |path: &str| {
        petrel_e2e::apiserver::metric(
            &metrics,
            &format!("petrel_agent_peer_bytes_sent_total{{path=\"{path}\"}}"),
        )
    };
    assert!(sent("direct") > f64::from(10u32 << 20), "{metrics}");
    assert!(sent("hub") < sent("direct") / 100.0, "{metrics}");

    // C is behind a NAT that picks a new port per destination: its punches fail, its traffic
    // stays on the hub, and every pair with C still carries 10 MiB both ways.
    let hub_before = agent_to_agent(&petrel);
    transfer_both_ways(&lab, "edge-a1", "edge-c1");
    transfer_both_ways(&lab, "edge-b1", "edge-c1");
    let relayed = agent_to_agent(&petrel) - hub_before;
    assert!(
        relayed > 4 * 7000,
        "40 MiB with C went through the hub: {relayed} frames"
    );
    for (node, peer) in [
        ("edge-c1", "edge-a1"),
        ("edge-a1", "edge-c1"),
        ("edge-c1", "edge-b1"),
    ] {
        let row = petrel.peer_row(node, peer);
        assert_ne!(row["path"], "direct", "{node} -> {peer}: {row}");
    }
    lab::wait_until(
        "C's punches fail and are counted",
        Duration::from_secs(30),
        || {
            lab.ping("edge-c1", lab.node("edge-a1").pod_ip);
            Ok(petrel.peer_row("edge-c1", "edge-a1")["failures"]
                .as_u64()
                .unwrap_or(0)
                >= 1)
        },
    )
    .unwrap();

    // Break A-B in A's NAT mid-transfer: the transfer completes through the hub.
    assert_eq!(petrel.peer_path("edge-a1", "edge-b1"), "direct");
    let probe = Probe::start(&lab, "edge-a1", "edge-b1", 7311).unwrap();
    petrel_e2e::failover_probe::flowing(&[&probe], Duration::from_secs(5)).unwrap();
    let hub_before = agent_to_agent(&petrel);
    let blocked_at = std::thread::scope(|s| {
        // Large enough to be under way when the block lands (direct, it moves ~30 MiB/s here):
        // the block comes once a first MiB of it has gone direct.
        let direct_out = || {
            petrel.agent_status("edge-a1").unwrap()["dataplane"]["bytes_direct_out"]
                .as_u64()
                .unwrap_or(0)
        };
        let out0 = direct_out();
        let transfer = s.spawn(|| lab.tcp_transfer("edge-a1", "edge-b1", 64 << 20));
        lab::wait_until(
            "the transfer is under way on the direct path",
            Duration::from_secs(5),
            || Ok(direct_out() > out0 + (1 << 20)),
        )
        .unwrap();
        lab.block_udp_in_nat("site-a", b_wan, true).unwrap();
        let at = Instant::now();
        let r = transfer.join().unwrap();
        let r = r.unwrap_or_else(|e| panic!("the transfer across the break: {e:#}"));
        eprintln!(
            "64 MiB a1 -> b1 across the break: {:.0} Mbit/s",
            r.mbit_per_s()
        );
        at
    });
    let back = probe
        .back_after(blocked_at, Duration::from_secs(5))
        .unwrap();
    let gap = probe
        .longest_silence(blocked_at, Instant::now())
        .expect("probes heard after the break");
    eprintln!("break: probes back through the hub after {back:?}, longest silence {gap:?}");
    assert!(
        agent_to_agent(&petrel) > hub_before + 1000,
        "the rest of the transfer went through the hub"
    );
    assert_ne!(petrel.peer_path("edge-a1", "edge-b1"), "direct");
    assert!(gap < Duration::from_secs(3), "gap {gap:?}");

    // Lifted: the direct path comes back (after the agents' backoff).
    lab.block_udp_in_nat("site-a", b_wan, false).unwrap();
    petrel
        .wait_direct("edge-a1", "edge-b1", Duration::from_secs(60))
        .unwrap();
    drop(probe);
    petrel.stop().unwrap();
}
