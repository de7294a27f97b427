//! Active-active hubs (issue 14), file-inventory mode, in the network-namespace lab with a
//! second gateway node (`gw-3`): both hubs run with the same static list (`--hubs`), the node
//! roles with `--active-active`. Each public site is owned by one hub (`petrel_proto::ownership`
//! gives site-a to gw-1 and site-b to gw-3), and the hubs' own frame counters show that each
//! site's traffic with the cloud crosses its owner and only its owner, that site-to-site traffic
//! crosses the destination's owner (so both hubs carry traffic at once), and 10 MiB go both ways
//! for every pair.
//!
//! Then `kill -9` of gw-3 during UDP probes every 10 ms: site-b's traffic comes back through gw-1
//! with no operator action (the gap is printed; the bench's figure), site-a's is not interrupted,
//! and when gw-3 returns its sites go back to it; a graceful stop loses nothing; and a relay port
//! blocked from one cloud node only moves that node's routes; and the API server's CONNECTs
//! work through either hub. Kubernetes mode: `e2e/tests/k8s_active_active.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use petrel_e2e::failover_probe::Probe;
use petrel_e2e::lab::{self, Lab, LabSpec};
use petrel_e2e::lab_petrel::PetrelLab;

#[test]
fn two_hubs_each_carry_the_sites_they_own() {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec {
        second_hub: true,
        ..Default::default()
    })
    .unwrap();
    // The lab's names are chosen so that the two sites have different owners.
    let hubs = ["gw-1", "gw-3"];
    assert_eq!(petrel_proto::ownership::owner("site-a", hubs), Some("gw-1"));
    assert_eq!(petrel_proto::ownership::owner("site-b", hubs), Some("gw-3"));
    let tmp = tempfile::tempdir().unwrap();
    // Each hub serves the API server's egress on a socket of its own.
    let sock1 = tmp.path().join("egress-gw-1.sock");
    let sock3 = tmp.path().join("egress-gw-3.sock");
    let (s1, s3) = (sock1.display().to_string(), sock3.display().to_string());
    let (petrel, mut hub3) = PetrelLab::start_active_active_with(
        &lab,
        "auto",
        tmp.path(),
        // Site-to-site traffic crosses the owners here: direct paths (direct_paths_lab) off.
        &["--egress-uds", &s1, "--direct-paths", "false"],
        &["--egress-uds", &s3, "--direct-paths", "false"],
    )
    .unwrap();
    assert_eq!(hub3.node, "gw-3");

    // Every agent dials the second hub from the list it was pushed, and knows its site's owner.
    let agents = ["edge-a1", "edge-a2", "edge-b1"];
    lab::wait_until(
        "every agent connected to both hubs",
        Duration::from_secs(30),
        || {
            let on3 = petrel.hub_status_on("gw-3")?["agents"]
                .as_array()
                .map_or(0, Vec::len);
            let owners_known = agents.iter().all(|n| {
                petrel.agent_status(n).ok().is_some_and(|s| {
                    s["dataplane"]["site_owner"].as_str().is_some()
                        && s["links"].as_array().is_some_and(|l| {
                            l.iter().filter(|l| l["state"] == "connected").count() == 2
                        })
                })
            });
            Ok(on3 == agents.len() && owners_known)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nhub gw-3:\n{}", hub3.proc.log_tail(30)));
    // Joining the second hub (a new link whose route table is still to come) never emptied an
    // agent's routes: once applied with peers, no later apply has none.
    for (n, g) in &petrel.agents {
        let log = g.log();
        let applies: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("routes to the hub applied"))
            .skip_while(|l| l.contains("peers=0"))
            .collect();
        assert!(!applies.is_empty(), "{n}: no routes applied:\n{log}");
        assert!(
            applies.iter().all(|l| !l.contains("peers=0")),
            "{n}: routes emptied after they were applied:\n{}",
            applies.join("\n")
        );
    }
    for (n, owner) in [
        ("edge-a1", "gw-1"),
        ("edge-a2", "gw-1"),
        ("edge-b1", "gw-3"),
    ] {
        assert_eq!(
            petrel.agent_status(n).unwrap()["dataplane"]["site_owner"],
            owner,
            "{n}"
        );
    }
    for hub in hubs {
        let owners = &petrel.hub_status_on(hub).unwrap()["site_owners"];
        assert_eq!(owners["site-a"], "gw-1", "{hub}: {owners}");
        assert_eq!(owners["site-b"], "gw-3", "{hub}: {owners}");
    }

    let ip = |n: &str| lab.node(n).pod_ip;
    lab.wait_reachable("cloud-1", ip("edge-b1"), Duration::from_secs(20))
        .unwrap();
    lab.wait_reachable("edge-a1", ip("edge-b1"), Duration::from_secs(20))
        .unwrap();
    let counts = || {
        (
            petrel.frames_via_hub_on("gw-1").unwrap(),
            petrel.frames_via_hub_on("gw-3").unwrap(),
        )
    };
    // (from, to, crosses gw-1, crosses gw-3)
    let cases = [
        ("cloud-1", "edge-a1", true, false),
        ("cloud-1", "edge-b1", false, true),
        ("x1", "edge-b1", false, true),
        ("edge-a1", "edge-b1", true, true),
    ];
    for (a, b, via1, via3) in cases {
        let before = counts();
        assert!(lab.ping(a, ip(b)), "{a} -> {b}");
        assert!(lab.ping(b, ip(a)), "{b} -> {a}");
        let after = counts();
        let (d1, d3) = (after.0 - before.0, after.1 - before.1);
        eprintln!("{a} <-> {b}: gw-1 {d1} frames, gw-3 {d3} frames");
        if (d1 > 0, d3 > 0) != (via1, via3) {
            // Which hub each end chose, and why, for a failure in CI.
            for n in [a, b] {
                if let Some((_, g)) = petrel.agents.iter().find(|(name, _)| name == n) {
                    eprintln!("{n} status: {:?}", petrel.agent_status(n));
                    let log = g.log();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("{n} log:");
                    tail.iter().rev().for_each(|l| eprintln!("{l}"));
                }
            }
        }
        assert_eq!(d1 > 0, via1, "{a} <-> {b}: gw-1 switched {d1} frames");
        assert_eq!(d3 > 0, via3, "{a} <-> {b}: gw-3 switched {d3} frames");
    }
    // The API server may use either hub: a CONNECT through each reaches a pod of each site
    // (every hub holds a tunnel to every agent).
    let _targets_a = petrel_e2e::egress_streams::target_servers(&lab, "edge-a1").unwrap();
    let _targets_b = petrel_e2e::egress_streams::target_servers(&lab, "edge-b1").unwrap();
    let rt = petrel_e2e::egress_streams::rt().unwrap();
    for sock in [&sock1, &sock3] {
        for pod in ["edge-a1", "edge-b1"] {
            let target =
                std::net::SocketAddrV4::new(ip(pod), petrel_e2e::egress_streams::PORT_HELLO);
            let first = rt
                .block_on(async {
                    use tokio::io::AsyncReadExt;
                    let mut s = petrel_e2e::egress_streams::connect_via(sock, target).await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    Ok::<_, anyhow::Error>(b[0])
                })
                .unwrap_or_else(|e| panic!("CONNECT {target} via {}: {e:#}", sock.display()));
            assert_eq!(first, b'H', "{pod} via {}", sock.display());
        }
    }

    // Site to site, each direction through the destination's owner.
    let before = counts();
    let r = lab.tcp_transfer("edge-a1", "edge-b1", 10 << 20).unwrap();
    let mid = counts();
    let r2 = lab.tcp_transfer("edge-b1", "edge-a1", 10 << 20).unwrap();
    let after = counts();
    eprintln!(
        "edge-a1 -> edge-b1 {:.0} Mbit/s, back {:.0} Mbit/s; gw-1 {} / {} frames, gw-3 {} / {}",
        r.mbit_per_s(),
        r2.mbit_per_s(),
        mid.0 - before.0,
        after.0 - mid.0,
        mid.1 - before.1,
        after.1 - mid.1
    );
    // Data to b1 crosses gw-3 (acks back to a1 cross gw-1), and the other way round.
    assert!(mid.1 - before.1 > 5_000, "gw-3 carries a1 -> b1");
    assert!(after.0 - mid.0 > 5_000, "gw-1 carries b1 -> a1");
    for (a, b) in [("cloud-1", "edge-a1"), ("cloud-1", "edge-b1")] {
        for (from, to) in [(a, b), (b, a)] {
            lab.tcp_transfer(from, to, 10 << 20)
                .unwrap_or_else(|e| panic!("10 MiB {from} -> {to}: {e:#}"));
        }
    }

    // Split view: gw-3's relay port unreachable from cloud-1 only. cloud-1's node role takes
    // gw-3 as down and sends site-b to gw-1; x1's keeps gw-3; cloud-1 still reaches site-b both
    // ways (gw-3 still sends to cloud-1's flannel port, which is not blocked); unblocked, it
    // returns to gw-3.
    let cloud1 = lab.node("cloud-1").underlay_ip.to_string();
    for cmd in [
        "add table inet petrel_split".to_string(),
        "add chain inet petrel_split input { type filter hook input priority 0 ; }".to_string(),
        format!("add rule inet petrel_split input ip saddr {cloud1} udp dport 8473 drop"),
    ] {
        lab.exec("gw-3", &["nft", &cmd]).unwrap();
    }
    lab::wait_until(
        "cloud-1 takes gw-3 as down",
        Duration::from_secs(10),
        || Ok(petrel.hubs_down("cloud-1")? == serde_json::json!(["gw-3"])),
    )
    .unwrap();
    assert_eq!(petrel.hubs_down("x1").unwrap(), serde_json::json!([]));
    let before = counts();
    assert!(
        lab.ping("cloud-1", ip("edge-b1")),
        "cloud-1 -> edge-b1 with gw-3 unreachable"
    );
    assert!(
        lab.ping("edge-b1", ip("cloud-1")),
        "edge-b1 -> cloud-1 with gw-3 unreachable"
    );
    let after = counts();
    assert!(
        after.0 > before.0,
        "gw-1 carries cloud-1 -> site-b meanwhile"
    );
    lab.exec("gw-3", &["nft", "delete table inet petrel_split"])
        .unwrap();
    lab::wait_until("cloud-1 takes gw-3 back", Duration::from_secs(10), || {
        Ok(petrel.hubs_down("cloud-1")? == serde_json::json!([]))
    })
    .unwrap();

    // kill -9 of gw-3 during probes every 10 ms: site-b's traffic moves to gw-1 without any
    // operator action (node roles: gw-3 stops answering its relay probes; agents: its tunnel
    // is silent while frames go to it); site-a, owned by the survivor, is not interrupted.
    let b_probe = Probe::start(&lab, "cloud-1", "edge-b1", 7302).unwrap();
    let a_probe = Probe::start(&lab, "x1", "edge-a1", 7303).unwrap();
    petrel_e2e::failover_probe::flowing(&[&b_probe, &a_probe], Duration::from_secs(10)).unwrap();
    let t0 = Instant::now();
    hub3.proc.kill().unwrap();
    let gap = b_probe
        .back_after(t0, Duration::from_secs(20))
        .unwrap_or_else(|e| {
            panic!(
                "site-b's traffic through the surviving hub: {e}\nhub gw-1:\n{}",
                petrel.hub.log_tail(20)
            )
        });
    let survivor = a_probe
        .silence_after(t0)
        .expect("site-a's probes stopped when gw-3 died");
    eprintln!(
        "kill -9 gw-3: site-b (owned by gw-3) back after {:.0} ms; site-a (owned by gw-1) longest silence {:.0} ms",
        gap.as_secs_f64() * 1000.0,
        survivor.as_secs_f64() * 1000.0
    );
    assert!(
        survivor < Duration::from_secs(1),
        "site-a's traffic stopped for {survivor:?} though its hub survived"
    );
    // The node roles say which hub is down.
    assert_eq!(
        petrel.hubs_down("cloud-1").unwrap(),
        serde_json::json!(["gw-3"])
    );
    drop(a_probe);

    // gw-3 comes back: its sites return to it.
    hub3.respawn(&lab).unwrap();
    lab::wait_until("gw-3 carries site-b again", Duration::from_secs(30), || {
        let before = petrel.frames_via_hub_on("gw-3").unwrap_or(0);
        let _ = lab.ping("cloud-1", ip("edge-b1"));
        let after = petrel.frames_via_hub_on("gw-3").unwrap_or(0);
        Ok(after > before && petrel.hubs_down("cloud-1")? == serde_json::json!([]))
    })
    .unwrap_or_else(|e| panic!("{e}\nhub gw-3:\n{}", hub3.proc.log_tail(20)));
    // Every agent back on gw-3 (a tunnel is how site-b's agent sends to the cloud via its owner).
    lab::wait_until("every agent back on gw-3", Duration::from_secs(30), || {
        Ok(petrel.hub_status_on("gw-3")?["agents"]
            .as_array()
            .map_or(0, Vec::len)
            == agents.len())
    })
    .unwrap();

    // A graceful stop of gw-3 hands its sites over before it goes: it stops answering the node
    // roles' probes but keeps relaying until they have moved, then tells its agents to go.
    let t0 = Instant::now();
    let status = hub3.proc.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "gw-3 exited {status}");
    let silence = b_probe
        .silence_after(t0)
        .expect("site-b's probes stopped for good after gw-3's graceful stop");
    eprintln!(
        "graceful stop of gw-3: site-b's longest silence {:.0} ms",
        silence.as_secs_f64() * 1000.0
    );
    assert!(
        silence < Duration::from_millis(500),
        "site-b's traffic stopped for {silence:?} during a graceful stop"
    );
    assert_eq!(
        petrel.hubs_down("cloud-1").unwrap(),
        serde_json::json!(["gw-3"])
    );
    drop(b_probe);

    petrel.stop().unwrap();
}
