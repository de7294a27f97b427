//! Active-active hubs (issue 14) in Kubernetes mode, against a real kube-apiserver, in the
//! network lab with three gateway nodes (gw-1, cloud-1, gw-3), every hub and node role run with
//! `--hub-mode active-active`.
//!
//! 1. Two labelled hubs (gw-1, cloud-1) are both active; `petrel_proto::ownership` gives site-a
//!    to gw-1 and site-b to cloud-1, and the hubs' frame counters show each site's traffic
//!    crossing its owner only; the owners are in every hub's status, on the hub Nodes
//!    (`petrel.io/owned-sites`) and in Events. 10 MiB both ways site to site.
//! 2. Split brain: cloud-1 loses the API server (but still forwards). Its Lease goes stale, so
//!    the other hub and the node roles move site-b to gw-1; site-b's probes (every 10 ms) see no
//!    black hole meanwhile; reconnected, site-b returns to cloud-1.
//! 3. A third hub (gw-3 labelled) takes site-b; `kill -9` of gw-3 during probes: site-b comes
//!    back through the next hub without operator action (gap printed; the bench has the
//!    file-mode figure), site-a's probes are not interrupted; every party converges on the two
//!    live hubs.
//! 4. Label removal of cloud-1 (now site-b's owner) loses no probe: make before break.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use petrel_e2e::failover_probe::{flowing, Probe};
use petrel_e2e::k8s_lab::K8sLab;
use petrel_e2e::lab::{self, Lab, LabSpec};
use petrel_e2e::procs::wait_until;

const MIB: u64 = 1 << 20;

fn active_hubs(k: &K8sLab, hub: &str) -> BTreeSet<String> {
    k.hub_status(hub)
        .ok()
        .and_then(|s| {
            Some(
                s["kubernetes"]["active_hubs"]
                    .as_array()?
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            )
        })
        .unwrap_or_default()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn hubs_down(k: &K8sLab, node: &str) -> BTreeSet<String> {
    k.hubs_down(node)
        .ok()
        .and_then(|v| {
            Some(
                v.as_array()?
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// Waits until every hub in `hubs` sees exactly `hubs` active and the node roles on `roles`
/// take none of them as down.
fn converged(k: &K8sLab, hubs: &[&str], roles: &[&str], within: Duration) {
    let want = set(hubs);
    wait_until(within, &format!("every party on hubs {hubs:?}"), || {
        let ok = hubs.iter().all(|h| active_hubs(k, h) == want)
            && roles.iter().all(|r| {
                let down = hubs_down(k, r);
                want.iter().all(|h| !down.contains(h))
            });
        ok.then_some(())
    })
    .unwrap_or_else(|e| {
        let seen: Vec<String> = hubs
            .iter()
            .map(|h| format!("{h}: {:?}", active_hubs(k, h)))
            .chain(
                roles
                    .iter()
                    .map(|r| format!("{r} down: {:?}", hubs_down(k, r))),
            )
            .collect();
        panic!("{e}: {seen:?}\n{}", k.logs())
    });
}

/// Which of `hubs` switched frames while `a` and `b` pinged each other.
fn crossing(k: &K8sLab, hubs: &[&str], a: &str, b: &str) -> Vec<String> {
    let lab = k.lab;
    let before: Vec<u64> = hubs.iter().map(|h| k.frames_via(h)).collect();
    assert!(lab.ping(a, lab.node(b).pod_ip), "{a} -> {b}\n{}", k.logs());
    assert!(lab.ping(b, lab.node(a).pod_ip), "{b} -> {a}\n{}", k.logs());
    hubs.iter()
        .zip(before)
        .filter(|(h, n)| k.frames_via(h) > *n)
        .map(|(h, _)| h.to_string())
        .collect()
}

#[test]
fn every_labelled_hub_carries_the_sites_it_owns() {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec {
        second_hub: true,
        ..Default::default()
    })
    .unwrap();
    // The owners the lab's names give (every party computes the same).
    let two = ["gw-1", "cloud-1"];
    let three = ["gw-1", "cloud-1", "gw-3"];
    assert_eq!(petrel_proto::ownership::owner("site-a", two), Some("gw-1"));
    assert_eq!(
        petrel_proto::ownership::owner("site-b", two),
        Some("cloud-1")
    );
    assert_eq!(
        petrel_proto::ownership::owner("site-a", three),
        Some("gw-1")
    );
    assert_eq!(
        petrel_proto::ownership::owner("site-b", three),
        Some("gw-3")
    );
    // Site-to-site traffic crosses the owners here: direct paths (direct_paths_lab) off, for
    // the hubs and the agents alike (the node roles take the same extra arguments, so the
    // environment, read by both, not a flag). Set before any thread of this test starts.
    std::env::set_var("PETREL_DIRECT_PATHS", "false");
    let tmp = tempfile::tempdir().unwrap();
    let mut k = K8sLab::start_with(
        &lab,
        "fast",
        tmp.path(),
        &three,
        &["--hub-mode", "active-active"],
    )
    .unwrap();
    let edges = ["edge-a1", "edge-a2", "edge-b1"];

    // 1. Label gw-1 and cloud-1: both active, the agents on both.
    k.label_gateway("gw-1", true).unwrap();
    k.label_gateway("cloud-1", true).unwrap();
    for h in two {
        wait_until(Duration::from_secs(10), &format!("{h} active"), || {
            (k.hub_role(h).as_deref() == Some("active")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    }
    k.start_agents("gw-1").unwrap();
    wait_until(Duration::from_secs(20), "agents on cloud-1 too", || {
        let c = k.hub_agents("cloud-1");
        edges.iter().all(|e| c.iter().any(|x| x == e)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    converged(&k, &two, &["x1", "gw-3"], Duration::from_secs(10));
    for h in two {
        let s = k.hub_status(h).unwrap();
        assert_eq!(s["site_owners"]["site-a"], "gw-1", "{h}: {s}");
        assert_eq!(s["site_owners"]["site-b"], "cloud-1", "{h}: {s}");
    }
    wait_until(Duration::from_secs(10), "owned sites on the Nodes", || {
        let owned = |n: &str| {
            k.cluster.get_json(&["node", n]).ok()?["metadata"]["annotations"]
                ["petrel.io/owned-sites"]
                .as_str()
                .map(str::to_string)
        };
        (owned("gw-1").as_deref() == Some("site-a")
            && owned("cloud-1").as_deref() == Some("site-b"))
        .then_some(())
    })
    .unwrap();
    let ip = |n: &str| lab.node(n).pod_ip;
    lab.wait_reachable("gw-3", ip("edge-b1"), Duration::from_secs(20))
        .unwrap();
    lab.wait_reachable("edge-a1", ip("edge-b1"), Duration::from_secs(20))
        .unwrap();
    // gw-3 is an unlabelled cloud node here; x1 an Express Connect node.
    assert_eq!(crossing(&k, &two, "gw-3", "edge-a1"), ["gw-1"]);
    assert_eq!(crossing(&k, &two, "gw-3", "edge-b1"), ["cloud-1"]);
    assert_eq!(crossing(&k, &two, "x1", "edge-b1"), ["cloud-1"]);
    assert_eq!(
        crossing(&k, &two, "edge-a1", "edge-b1"),
        ["gw-1", "cloud-1"]
    );
    for (a, b) in [("edge-a1", "edge-b1"), ("gw-3", "edge-b1")] {
        for (from, to) in [(a, b), (b, a)] {
            let t = lab
                .tcp_transfer(from, to, 10 * MIB)
                .unwrap_or_else(|e| panic!("10 MiB {from} -> {to}: {e:#}\n{}", k.logs()));
            assert_eq!(t.bytes_received, 10 * MIB);
        }
    }

    // 2. Split brain: cloud-1 cut off from the API server, still forwarding. The others drop it
    // once its Lease is stale; site-b never goes dark meanwhile.
    let b_probe = Probe::start(&lab, "x1", "edge-b1", 7402).unwrap();
    let a_probe = Probe::start(&lab, "gw-3", "edge-a1", 7403).unwrap();
    flowing(&[&b_probe, &a_probe], Duration::from_secs(10)).unwrap();
    let t0 = Instant::now();
    k.cut_off_api("cloud-1", true).unwrap();
    wait_until(
        Duration::from_secs(15),
        "cloud-1 out of the live set",
        || {
            (active_hubs(&k, "gw-1") == set(&["gw-1"]) && hubs_down(&k, "x1").contains("cloud-1"))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    let moved = t0.elapsed();
    let silence = b_probe.silence_after(t0).expect("site-b's probes stopped");
    eprintln!(
        "cloud-1 cut off from the API server: site-b moved to gw-1 after {moved:?}; site-b's longest silence {:.0} ms",
        silence.as_secs_f64() * 1000.0
    );
    assert!(
        silence < Duration::from_secs(1),
        "site-b silent for {silence:?} while its hub lost the API server"
    );
    // (Its window closed with site-b's above.)
    let a_silence = a_probe
        .longest_silence(t0, Instant::now())
        .expect("site-a's probes stopped");
    assert!(
        a_silence < Duration::from_secs(1),
        "site-a silent {a_silence:?}"
    );
    // (site-a's probes cross gw-1: stopped before counting which hub site-b crosses.)
    drop(a_probe);
    assert_eq!(crossing(&k, &two, "x1", "edge-b1"), ["gw-1"]);
    // The cut-off hub keeps its last view (it cannot read the Leases): it still serves.
    assert_eq!(k.hub_role("cloud-1").as_deref(), Some("active"));
    k.cut_off_api("cloud-1", false).unwrap();
    converged(&k, &two, &["x1", "gw-3"], Duration::from_secs(20));
    let mut last = Vec::new();
    wait_until(Duration::from_secs(10), "site-b back on cloud-1", || {
        last = crossing(&k, &two, "x1", "edge-b1");
        (last == ["cloud-1"]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: crossed {last:?}\n{}", k.logs()));

    // 3. A third hub: gw-3 takes site-b. kill -9 of gw-3 during probes.
    k.label_gateway("gw-3", true).unwrap();
    converged(&k, &three, &["x1"], Duration::from_secs(20));
    wait_until(Duration::from_secs(20), "agents on gw-3", || {
        let c = k.hub_agents("gw-3");
        edges.iter().all(|e| c.iter().any(|x| x == e)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    wait_until(Duration::from_secs(10), "site-b through gw-3", || {
        (crossing(&k, &three, "x1", "edge-b1") == ["gw-3"]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    let x_probe = Probe::start(&lab, "x1", "edge-a1", 7404).unwrap();
    flowing(&[&b_probe, &x_probe], Duration::from_secs(10)).unwrap();
    let t0 = Instant::now();
    k.hubs.get_mut("gw-3").unwrap().kill().unwrap();
    let gap = b_probe
        .back_after(t0, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("site-b back: {e}\n{}", k.logs()));
    let survivor = x_probe.silence_after(t0).expect("site-a's probes stopped");
    eprintln!(
        "kill -9 gw-3: site-b back after {:.0} ms; site-a (owned by gw-1) longest silence {:.0} ms",
        gap.as_secs_f64() * 1000.0,
        survivor.as_secs_f64() * 1000.0
    );
    assert!(
        survivor < Duration::from_secs(1),
        "site-a silent for {survivor:?} though its hub survived"
    );
    drop(x_probe);
    // Every party converges on the two live hubs (the Lease of gw-3 goes stale).
    converged(&k, &two, &["x1"], Duration::from_secs(15));
    assert_eq!(crossing(&k, &two, "x1", "edge-b1"), ["cloud-1"]);
    k.label_gateway("gw-3", false).unwrap();
    drop(k.hubs.remove("gw-3"));

    // 4. Label removal of site-b's owner: make before break, no probe lost.
    let t0 = Instant::now();
    k.label_gateway("cloud-1", false).unwrap();
    // It hands its sites over, then tells its agents to go.
    wait_until(Duration::from_secs(10), "cloud-1 holds no tunnels", || {
        k.hub_agents("cloud-1").is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    assert_eq!(k.hub_role("cloud-1").as_deref(), Some("not-serving"));
    let silence = b_probe
        .silence_after(t0)
        .expect("site-b's probes stopped after the label removal");
    eprintln!(
        "label removed from cloud-1: site-b's longest silence {:.0} ms",
        silence.as_secs_f64() * 1000.0
    );
    assert!(
        silence < Duration::from_millis(500),
        "site-b silent for {silence:?} when its hub's label was removed"
    );
    assert_eq!(
        crossing(&k, &["gw-1", "cloud-1"], "x1", "edge-b1"),
        ["gw-1"]
    );
    // The ownership changes were recorded as Events.
    let events = k
        .cluster
        .kubectl(&["get", "events", "-n", "default", "-o", "json"], None)
        .unwrap();
    assert!(events.contains("HubOwnership"), "no HubOwnership Event");
    drop(b_probe);
    k.stop().unwrap();
}
