//! The cloud-gateway label elects the hub, against a real kube-apiserver, in the network lab:
//! labelling gw-1 makes it the active hub within 3 s and the data-plane matrix passes with the
//! inventory from Node objects; with cloud-1 labelled too, `kill -9` of the active hub moves
//! cloud <-> edge traffic to the standby within 5 s (measured and printed); removing the label
//! from the active node hands over the same way; an unlabelled node never serves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use petrel_e2e::k8s_lab::K8sLab;
use petrel_e2e::lab::{self, Lab, LabSpec};
use petrel_e2e::procs::wait_until;

const MIB: u64 = 1 << 20;

/// (from, to, path): "hub" must cross the active hub; "flannel" must not touch it; "peer" (two
/// public sites) crosses the hub until the pair's direct path is up, then goes straight.
const MATRIX: &[(&str, &str, &str)] = &[
    ("cloud-1", "edge-a1", "hub"),
    ("gw-1", "edge-b1", "hub"),
    ("edge-a1", "edge-b1", "peer"),
    ("x1", "edge-b1", "hub"),
    ("cloud-1", "x1", "flannel"),
    ("edge-a1", "edge-a2", "flannel"),
];

/// Waits until the hub on `node` exports `series` with `value` (petrel_hub_active and
/// petrel_hub_agents_expected follow the election and the Node list).
fn hub_metric_is(k: &K8sLab, node: &str, series: &str, value: f64) {
    let ns = k.lab.ns(node).unwrap();
    let addr: std::net::SocketAddr = petrel_e2e::k8s_lab::HUB_ADMIN.parse().unwrap();
    let mut last = f64::NAN;
    wait_until(
        Duration::from_secs(5),
        &format!("{node}: {series} {value}"),
        || {
            let text = lab::in_netns(&ns, Duration::from_secs(5), move || {
                petrel_e2e::procs::http_get(addr, "/metrics")
            })
            .ok()?;
            last = petrel_e2e::apiserver::metric(&text, series);
            (last == value).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e} (last {last})"));
}

fn role_is(k: &K8sLab, node: &str, role: &str, within: Duration) -> Duration {
    let t = Instant::now();
    wait_until(within, &format!("{node} {role}"), || {
        (k.hub_role(node).as_deref() == Some(role)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    t.elapsed()
}

fn matrix(k: &K8sLab, hub: &str) {
    let lab = k.lab;
    let ip = |n: &str| lab.node(n).pod_ip;
    let mut table = Vec::new();
    for &(a, b, path) in MATRIX {
        let before = k.frames_via(hub);
        let there = lab.ping(a, ip(b));
        let back = lab.ping(b, ip(a));
        let t1 = lab
            .tcp_transfer(a, b, 4 * MIB)
            .unwrap_or_else(|e| panic!("{a} -> {b} TCP: {e:#}\n{}", k.logs()));
        let t2 = lab
            .tcp_transfer(b, a, 4 * MIB)
            .unwrap_or_else(|e| panic!("{b} -> {a} TCP: {e:#}\n{}", k.logs()));
        let via = k.frames_via(hub) - before;
        table.push(format!(
            "{a:<8} {b:<8} {path:<8} icmp {} tcp {:>6.0}/{:<6.0} Mb/s via {hub}: {via}",
            if there && back { "ok" } else { "FAIL" },
            t1.mbit_per_s(),
            t2.mbit_per_s()
        ));
        assert!(there && back, "{a} <-> {b} ping\n{}", k.logs());
        assert_eq!((t1.bytes_received, t2.bytes_received), (4 * MIB, 4 * MIB));
        match path {
            "hub" => assert!(via > 500, "{a} <-> {b} must cross {hub}, saw {via} frames"),
            "peer" => {
                let direct = k.agent_status(a).ok().is_some_and(|s| {
                    s["peers"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|r| r["peer"] == b && r["path"] == "direct"))
                });
                assert!(
                    via > 500 || direct,
                    "{a} <-> {b} must cross {hub} or go direct, saw {via} frames and no direct path"
                );
            }
            _ => assert_eq!(via, 0, "{a} <-> {b} must stay on Flannel's direct path"),
        }
    }
    eprintln!(
        "matrix with the inventory from the API server:\n{}",
        table.join("\n")
    );
}

#[test]
fn cloud_gateway_label_elects_the_hub_and_a_standby_takes_over() {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut k = K8sLab::start(&lab, "fast", tmp.path()).unwrap();

    // Nobody is labelled: both gateways run, neither serves.
    for n in ["gw-1", "cloud-1"] {
        role_is(&k, n, "not-serving", Duration::from_secs(15));
        let s = k.hub_status(n).unwrap();
        assert_eq!(s["hub"]["serving"], false, "{s}");
        assert!(
            s["hub"]["not_serving_reason"]
                .as_str()
                .unwrap_or("")
                .contains("node-role.alibabacloud.com/cloud-gateway"),
            "{s}"
        );
    }

    // 1. Label gw-1: the active hub within 3 s; agents enrol (tokens are Secrets) and connect.
    let t = Instant::now();
    k.label_gateway("gw-1", true).unwrap();
    role_is(&k, "gw-1", "active", Duration::from_secs(3));
    eprintln!("gw-1 active {:?} after `kubectl label`", t.elapsed());
    assert_eq!(k.hub_role("cloud-1").as_deref(), Some("not-serving"));
    // The monitoring overlay's "no active hub" and "agents disconnected" alerts read these.
    hub_metric_is(&k, "gw-1", "petrel_hub_active", 1.0);
    hub_metric_is(&k, "cloud-1", "petrel_hub_active", 0.0);
    hub_metric_is(&k, "gw-1", "petrel_hub_agents_expected", 3.0);
    k.start_agents("gw-1").unwrap();
    matrix(&k, "gw-1");

    // What the cluster shows: the tunnel state on each edge Node, the hub's role and endpoints
    // on its own, an Event, the Lease.
    let a1 = k.cluster.get_json(&["node", "edge-a1"]).unwrap();
    let state = a1["metadata"]["annotations"]["tunnel.petrel.io/gw-1"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(state.starts_with("connected since "), "{a1}");
    let gw = k.cluster.get_json(&["node", "gw-1"]).unwrap();
    assert_eq!(
        gw["metadata"]["annotations"]["petrel.io/hub-role"],
        "active"
    );
    assert_eq!(
        gw["metadata"]["annotations"]["petrel.io/gateway-endpoints"],
        "203.0.113.10:7443"
    );
    let lease = k
        .cluster
        .get_json(&["lease", "-n", "kube-system", "petrel-hub"])
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "gw-1");
    let describe = k
        .cluster
        .kubectl(&["describe", "node", "gw-1"], None)
        .unwrap();
    assert!(describe.contains("HubActive"), "{describe}");
    let describe = k
        .cluster
        .kubectl(&["describe", "node", "edge-a1"], None)
        .unwrap();
    assert!(
        describe.contains("tunnel.petrel.io/gw-1: connected since"),
        "{describe}"
    );

    // 2. Label cloud-1: a standby; agents learn its endpoint from the pushed list and connect.
    k.label_gateway("cloud-1", true).unwrap();
    role_is(&k, "cloud-1", "standby", Duration::from_secs(5));
    let edges = ["edge-a1", "edge-a2", "edge-b1"];
    wait_until(
        Duration::from_secs(15),
        "agents connected to the standby",
        || {
            let c = k.hub_agents("cloud-1");
            edges.iter().all(|e| c.iter().any(|x| x == e)).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    // Traffic still goes through the active hub only.
    let (g0, c0) = (k.frames_via("gw-1"), k.frames_via("cloud-1"));
    assert!(lab.ping("cloud-1", lab.node("edge-a1").pod_ip));
    assert!(lab.ping("edge-a1", lab.node("edge-b1").pod_ip));
    assert!(k.frames_via("gw-1") > g0);
    assert_eq!(
        k.frames_via("cloud-1"),
        c0,
        "the standby must not carry traffic"
    );

    // kill -9 the active hub: cloud <-> edge traffic resumes through the standby.
    let killed = Instant::now();
    k.hubs.get_mut("gw-1").unwrap().kill().unwrap();
    let d = k
        .time_to_reach(
            "cloud-1",
            "edge-a1",
            Some("cloud-1"),
            killed,
            Duration::from_secs(10),
        )
        .unwrap();
    eprintln!("FAILOVER after kill -9 of the active hub: cloud-1 pod -> edge-a1 pod answers again after {d:?}");
    assert!(d < Duration::from_secs(5), "failover took {d:?}");
    let d2 = k
        .time_to_reach(
            "edge-b1",
            "gw-1",
            Some("cloud-1"),
            killed,
            Duration::from_secs(10),
        )
        .unwrap();
    eprintln!("                                          edge-b1 pod -> gw-1 pod after {d2:?}");
    assert!(d2 < Duration::from_secs(5), "failover took {d2:?}");
    assert!(
        k.frames_via("cloud-1") > c0,
        "traffic must go through the standby"
    );
    role_is(&k, "cloud-1", "active", Duration::from_secs(1));
    hub_metric_is(&k, "cloud-1", "petrel_hub_active", 1.0);
    assert!(lab.ping("edge-a1", lab.node("edge-b1").pod_ip));

    // gw-1's gateway comes back: a standby; the agents return to it.
    k.start_hub("gw-1").unwrap();
    role_is(&k, "gw-1", "standby", Duration::from_secs(10));
    wait_until(Duration::from_secs(15), "agents back on gw-1", || {
        let c = k.hub_agents("gw-1");
        edges.iter().all(|e| c.iter().any(|x| x == e)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));

    // 3. Remove the label from the active node: it stops serving, gw-1 takes over.
    let g1 = k.frames_via("gw-1");
    let t = Instant::now();
    k.label_gateway("cloud-1", false).unwrap();
    let d = k
        .time_to_reach(
            "cloud-1",
            "edge-a1",
            Some("gw-1"),
            t,
            Duration::from_secs(10),
        )
        .unwrap();
    role_is(&k, "gw-1", "active", Duration::from_secs(2));
    eprintln!("HANDOVER after removing the label from the active node: traffic after {d:?}, gw-1 active after {:?}", t.elapsed());
    assert!(d < Duration::from_secs(5), "handover took {d:?}");
    role_is(&k, "cloud-1", "not-serving", Duration::from_secs(2));
    assert!(k.frames_via("gw-1") > g1);
    wait_until(Duration::from_secs(5), "cloud-1 holds no tunnels", || {
        k.hub_agents("cloud-1").is_empty().then_some(())
    })
    .unwrap();
    assert!(lab.ping("edge-a2", lab.node("x1").pod_ip));
    // cloud-1 is no candidate any more: the active hub removes its tunnel states (cloud-1's own
    // last "disconnected" writes may land after a first removal; each Node change makes the
    // active hub look again, so allow for a loaded machine's API server).
    wait_until(
        Duration::from_secs(15),
        "cloud-1's tunnel states removed",
        || {
            let n = k.cluster.get_json(&["node", "edge-a1"]).ok()?;
            let ann = &n["metadata"]["annotations"];
            (ann["tunnel.petrel.io/cloud-1"].is_null()
                && ann["tunnel.petrel.io/gw-1"]
                    .as_str()?
                    .starts_with("connected since"))
            .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    let lease = k
        .cluster
        .get_json(&["lease", "-n", "kube-system", "petrel-hub"])
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "gw-1");

    k.stop().unwrap();
}
