//! The data plane in the lab, end to end, with each kernel hook: Flannel-programmed nodes, NAT'd
//! public sites, an Express Connect site, and Petrel's real processes. Before Petrel, the seeds'
//! constraints hold; with it, every pair reaches every other (ICMP and 10 MiB checksummed TCP,
//! both directions) over the path it should take; the site MTU is learned by ICMP; Petrel repairs
//! its routes within 1 s; NAT rebinding does not break a transfer; spoofed frames go nowhere; and
//! stopping Petrel leaves every node's rules, routes, FDB and neighbours exactly as they were.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use petrel_e2e::lab::{self, vxlan_icmp_echo, Lab, LabSpec, PingOpts};
use petrel_e2e::lab_petrel::PetrelLab;

const MIB: u64 = 1 << 20;

/// (from, to, path): "hub" must cross the hub; "flannel" must not touch it.
const MATRIX: &[(&str, &str, &str)] = &[
    ("cloud-1", "edge-a1", "hub"),
    ("gw-1", "edge-b1", "hub"),
    ("edge-a1", "edge-b1", "hub"),
    ("x1", "edge-b1", "hub"),
    ("cloud-1", "x1", "flannel"),
    ("edge-a1", "edge-a2", "flannel"),
];

fn run_matrix(hooks: &str) {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec::default()).unwrap();
    let ip = |n: &str| lab.node(n).pod_ip;
    let nodes: Vec<String> = lab.node_names().iter().map(|s| s.to_string()).collect();
    let before: BTreeMap<String, _> = nodes
        .iter()
        .map(|n| (n.clone(), lab.snapshot(n).unwrap()))
        .collect();

    // The seeds' table before Petrel: cloud -> public site and site -> site fail, same site works.
    assert!(
        !lab.ping("cloud-1", ip("edge-a1")),
        "cloud-1 must not reach edge-a1 before Petrel"
    );
    assert!(
        !lab.ping("edge-a1", ip("edge-b1")),
        "edge-a1 must not reach edge-b1 before Petrel"
    );
    assert!(
        lab.ping("edge-a1", ip("edge-a2")),
        "same site works before Petrel"
    );

    let tmp = tempfile::tempdir().unwrap();
    // The matrix is the hub's relay: direct paths between the public sites (their own test,
    // direct_paths_lab) are off here, so site-to-site traffic crosses the hub.
    let mut petrel =
        PetrelLab::start_with(&lab, hooks, tmp.path(), &["--direct-paths", "false"]).unwrap();
    let modes: Vec<String> = ["edge-a1", "edge-b1"]
        .iter()
        .map(|n| {
            petrel.agent_status(n).unwrap()["dataplane"]["hooks"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        modes.iter().all(|m| m.starts_with(hooks)),
        "agents must use the {hooks} hook: {modes:?}"
    );

    // The matrix.
    let mut table = vec![format!(
        "{:<8} {:<8} {:<8} {:>5} {:>5} {:>12} {:>12} {:>10}",
        "FROM", "TO", "PATH", "ICMP", "ICMP<", "TCP->", "TCP<-", "VIA HUB"
    )];
    for &(a, b, path) in MATRIX {
        let hub_before = petrel.frames_via_hub().unwrap();
        let there = lab.ping(a, ip(b));
        let back = lab.ping(b, ip(a));
        let t1 = lab
            .tcp_transfer(a, b, 10 * MIB)
            .unwrap_or_else(|e| panic!("{a} -> {b} TCP ({hooks}): {e:#}"));
        let t2 = lab
            .tcp_transfer(b, a, 10 * MIB)
            .unwrap_or_else(|e| panic!("{b} -> {a} TCP ({hooks}): {e:#}"));
        let via_hub = petrel.frames_via_hub().unwrap() - hub_before;
        table.push(format!(
            "{a:<8} {b:<8} {path:<8} {:>5} {:>5} {:>7.0}Mb/s {:>7.0}Mb/s {via_hub:>10}",
            if there { "ok" } else { "FAIL" },
            if back { "ok" } else { "FAIL" },
            t1.mbit_per_s(),
            t2.mbit_per_s()
        ));
        assert!(there && back, "{a} <-> {b} ping ({hooks})");
        assert_eq!((t1.bytes_received, t2.bytes_received), (10 * MIB, 10 * MIB));
        match path {
            "hub" => assert!(
                via_hub > 1000,
                "{a} <-> {b} must cross the hub, saw {via_hub} frames"
            ),
            _ => assert_eq!(via_hub, 0, "{a} <-> {b} must stay on Flannel's direct path"),
        }
    }
    eprintln!("reachability matrix ({hooks} hooks):\n{}", table.join("\n"));

    // The relay listens on the gateway node's underlay address and loopback only (`--relay-listen
    // auto`): frames sent to its WAN address never reach the relay.
    let gw = lab.gateway();
    let listening = lab
        .exec(&gw.ns, &["ss", "-Hlun", "sport = :8473"])
        .unwrap()
        .stdout;
    let mut bound: Vec<String> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect();
    bound.sort();
    let mut want = vec![
        format!("{}:8473", gw.public_ip),
        "127.0.0.1:8473".to_string(),
    ];
    want.sort();
    assert_eq!(bound, want, "relay sockets ({hooks}): {listening}");
    assert_ne!(Some(gw.public_ip), gw.wan_ip);

    // MTU: a full 1450-byte DF packet toward a public site is refused with the site MTU.
    let df = PingOpts {
        payload: Some(1450 - 28),
        dont_fragment: true,
        count: 2,
        ..PingOpts::default()
    };
    let r = lab.ping_with("cloud-1", ip("edge-a1"), &df).unwrap();
    // Either the ICMP frag-needed itself ("mtu = 1380"), or the path MTU the pod already learned
    // from one during the transfers ("mtu=1380").
    assert!(
        r.output.contains("mtu = 1380") || r.output.contains("mtu=1380"),
        "DF ping must learn the site MTU:\n{}",
        r.output
    );
    let fits = PingOpts {
        payload: Some(1380 - 28),
        dont_fragment: true,
        count: 2,
        ..PingOpts::default()
    };
    assert!(
        lab.ping_with("cloud-1", ip("edge-a1"), &fits)
            .unwrap()
            .reachable(),
        "a packet at the site MTU passes"
    );
    assert_eq!(
        petrel.hub_drops("oversize"),
        0,
        "nothing dropped as oversize"
    );

    // Reconcile: flanneld re-programs edge-a1 everywhere; and someone deletes one of our rules.
    lab.reapply_flannel("edge-a1").unwrap();
    let t0 = Instant::now();
    // cloud-1 -> edge-a1 after flannel re-programmed it
    lab.wait_reachable("cloud-1", ip("edge-a1"), Duration::from_secs(1))
        .unwrap();
    let cidr = lab.node("edge-a1").pod_cidr.to_string();
    lab.exec(
        "cloud-1",
        &[
            "ip", "rule", "del", "to", &cidr, "lookup", "7473", "pref", "100",
        ],
    )
    .unwrap();
    let t1 = Instant::now();
    lab::wait_until(
        "Petrel restores its rule on cloud-1",
        Duration::from_millis(1500),
        || {
            lab.exec("cloud-1", &["ip", "rule", "show", "pref", "100"])
                .map(|o| o.stdout.contains(&cidr))
        },
    )
    .unwrap();
    eprintln!(
        "recovered after flannel re-programming in {:?}; rule restored in {:?}",
        t0.elapsed(),
        t1.elapsed()
    );
    assert!(lab.ping("cloud-1", ip("edge-a1")));

    // Spoofing (fast hook: the agent's capture socket is a UDP port): edge-a1's agent carries a
    // frame with edge-b1's source MAC, and one to an unknown MAC. The hub drops and counts both.
    if hooks == "fast" {
        let spoofed = vxlan_icmp_echo(
            1,
            &lab.node("cloud-1").vtep_mac,
            &lab.node("edge-b1").vtep_mac,
            ip("edge-b1"),
            ip("cloud-1"),
        )
        .unwrap();
        let unknown = vxlan_icmp_echo(
            1,
            "02:00:00:00:00:99",
            &lab.node("edge-a1").vtep_mac,
            ip("edge-a1"),
            ip("cloud-1"),
        )
        .unwrap();
        let relay = SocketAddrV4::new("127.0.0.1".parse().unwrap(), 8473);
        let (s0, u0) = (
            petrel.hub_drops("spoofed_source"),
            petrel.hub_drops("unknown_destination"),
        );
        let via0 = petrel.frames_via_hub().unwrap();
        lab.send_udp(&lab.node("edge-a1").ns, None, relay, vec![spoofed, unknown])
            .unwrap();
        lab::wait_until(
            "spoofed and unknown frames counted",
            Duration::from_secs(3),
            || {
                Ok(petrel.hub_drops("spoofed_source") > s0
                    && petrel.hub_drops("unknown_destination") > u0)
            },
        )
        .unwrap();
        assert_eq!(
            petrel.frames_via_hub().unwrap(),
            via0,
            "a dropped frame was forwarded"
        );
        let a1 = petrel.hub_status().unwrap()["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["node"] == "edge-a1")
            .cloned()
            .unwrap();
        assert!(
            a1["datagrams_dropped"]["spoofed_source"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{a1}"
        );
    }

    // NAT rebinding mid-transfer: site A's router changes its public address and forgets its
    // mappings; QUIC migrates, the transfer completes, the agent never reconnects.
    let since = |p: &PetrelLab| {
        p.hub_status().unwrap()["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["node"] == "edge-a1")
            .map(|a| {
                (
                    a["connected_since_unix"].clone(),
                    a["remote"].as_str().unwrap_or("").to_string(),
                )
            })
            .unwrap()
    };
    let (since0, remote0) = since(&petrel);
    let transfer = std::thread::scope(|s| {
        let h = s.spawn(|| lab.tcp_transfer("edge-a1", "cloud-1", 40 * MIB));
        std::thread::sleep(Duration::from_millis(150));
        let r = lab.rebind_site_nat("site-a").unwrap();
        eprintln!("site-a rebound {} -> {}", r.old, r.new);
        // Pings keep flowing through the hub from the new address.
        h.join().unwrap()
    });
    let t = transfer.unwrap_or_else(|e| panic!("transfer across NAT rebinding ({hooks}): {e:#}"));
    assert_eq!(t.bytes_received, 40 * MIB);
    lab::wait_until(
        "hub sees edge-a1 from its new address",
        Duration::from_secs(5),
        || Ok(since(&petrel).1 != remote0),
    )
    .unwrap();
    assert_eq!(
        since(&petrel).0,
        since0,
        "the agent must not have reconnected"
    );

    // A crashed agent and a crashed node role leave their rules and routes behind; the cleanup
    // subcommands remove exactly what Petrel added.
    let gw_bin = petrel_e2e::procs::bin("petrel-gateway").unwrap();
    let agent_bin = petrel_e2e::procs::bin("petrel-edge-agent").unwrap();
    for (node, bin, roles) in [("edge-b1", &agent_bin, false), ("cloud-1", &gw_bin, true)] {
        let list = if roles {
            &mut petrel.node_roles
        } else {
            &mut petrel.agents
        };
        let i = list.iter().position(|(n, _)| n == node).unwrap();
        let (_, mut guard) = list.remove(i);
        guard.kill().unwrap();
        assert!(
            !before[node].diff(&lab.snapshot(node).unwrap()).is_empty(),
            "a killed process on {node} leaves state behind"
        );
        let out = lab
            .exec(node, &[bin.to_str().unwrap(), "cleanup", "--hooks", hooks])
            .unwrap();
        assert!(
            out.stdout.contains("removed Petrel's routes"),
            "{}",
            out.stdout
        );
        let diff = before[node].diff(&lab.snapshot(node).unwrap());
        assert!(diff.is_empty(), "{node} after `cleanup` ({hooks}):\n{diff}");
    }

    // Stop Petrel: every node's networking is exactly what Flannel made.
    petrel.stop().unwrap();
    for n in &nodes {
        let after = lab.snapshot(n).unwrap();
        let diff = before[n].diff(&after);
        assert!(
            diff.is_empty(),
            "{n} differs after Petrel stopped ({hooks}):\n{diff}"
        );
    }
}

#[test]
fn matrix_with_fast_hooks() {
    run_matrix("fast");
}

#[test]
fn matrix_with_portable_hooks() {
    run_matrix("portable");
}
