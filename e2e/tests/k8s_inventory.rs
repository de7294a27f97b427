//! The inventory from Node objects, in the network lab against a real kube-apiserver: a new edge
//! Node reaches the hub's switch table, the agents' routes and the cloud nodes' routes within
//! 2 s, and leaves them when deleted, after which its agent is refused; certificates naming a
//! node that does not exist, or a cloud node, are refused with a clear message; with the API
//! server stopped, tunnels and the data plane keep working and a restarted agent reconnects with
//! the endpoints it knew.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use petrel_e2e::k8s_lab::{edge_like_node, K8sLab, HUB_PORT};
use petrel_e2e::lab::{self, Lab, LabSpec};
use petrel_e2e::procs::{bin, wait_until};
use petrel_transport::pki::{der_to_pem, CertificateAuthority};

const NEW_CIDR: &str = "10.244.9.0/24";
const NEW_MAC: &str = "02:fa:00:00:00:09";

fn peers(k: &K8sLab, agent: &str) -> u64 {
    k.agent_status(agent)
        .ok()
        .and_then(|s| s["dataplane"]["peers"].as_u64())
        .unwrap_or(0)
}

/// (switch table has edge-c1 with its MAC and is current, edge-a1 routes, cloud-1 kernel route)
fn new_node_seen(k: &K8sLab) -> (bool, u64, bool) {
    let s = k.hub_status("gw-1").unwrap();
    let current = s["switch_table"]["generation"] == s["hub"]["inventory_generation"];
    let in_table = current && s["switch_table"]["vtep_macs"]["edge-c1"] == NEW_MAC;
    let kernel = k
        .lab
        .exec("cloud-1", &["ip", "route", "show", "table", "7473"])
        .map(|o| o.stdout.contains(NEW_CIDR))
        .unwrap_or(false);
    (in_table, peers(k, "edge-a1"), kernel)
}

/// A state directory for an agent holding a certificate from the hub CA for `node`, that
/// `join` would never have issued.
fn forged_state(dir: &Path, ca: &CertificateAuthority, node: &str, server: &str) {
    let (cert, key) = petrel_e2e::raw_agent::node_identity(ca, node).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut pem = key.to_pem();
    pem.push_str(&der_to_pem(&cert, "CERTIFICATE"));
    for (f, body) in [
        ("node.pem", pem),
        ("ca.crt", ca.cert_pem()),
        ("endpoints.json", format!("[\"{server}\"]")),
    ] {
        std::fs::write(dir.join(f), body).unwrap();
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// The last error of an agent's only link.
fn link_error(k: &K8sLab, ns: &str, admin: &str) -> String {
    let b = bin("petrel-edge-agent").unwrap();
    k.lab
        .exec_unchecked(
            ns,
            &[
                b.to_str().unwrap(),
                "status",
                "--json",
                "--admin-addr",
                admin,
            ],
        )
        .ok()
        .and_then(|o| serde_json::from_str::<serde_json::Value>(&o.stdout).ok())
        .and_then(|s| {
            s["links"]
                .as_array()?
                .iter()
                .find_map(|l| l["last_error"].as_str().map(str::to_string))
        })
        .unwrap_or_default()
}

#[test]
fn nodes_come_and_go_and_the_api_server_may_go_away() {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut k = K8sLab::start(&lab, "fast", tmp.path()).unwrap();
    k.label_gateway("gw-1", true).unwrap();
    wait_until(Duration::from_secs(5), "gw-1 active", || {
        (k.hub_role("gw-1").as_deref() == Some("active")).then_some(())
    })
    .unwrap();
    k.start_agents("gw-1").unwrap();
    let server = format!("{}:{HUB_PORT}", lab.gateway_public_ip());
    let peers0 = peers(&k, "edge-a1");
    assert_eq!(new_node_seen(&k), (false, peers0, false));

    // A new edge Node in a new pool: the switch table, edge-a1's routes (via the hub: another
    // site) and cloud-1's kernel routes follow within 2 s.
    let mut labels = serde_json::Map::new();
    labels.insert("openyurt.io/is-edge-worker".into(), "true".into());
    labels.insert("apps.openyurt.io/nodepool".into(), "site-c".into());
    let mut ann = serde_json::Map::new();
    ann.insert(
        "flannel.alpha.coreos.com/backend-data".into(),
        format!("{{\"VNI\":1,\"VtepMAC\":\"{NEW_MAC}\"}}").into(),
    );
    ann.insert(
        "flannel.alpha.coreos.com/public-ip".into(),
        "10.0.3.2".into(),
    );
    let t = Instant::now();
    k.cluster
        .create(&edge_like_node(
            "edge-c1", labels, ann, NEW_CIDR, "10.0.3.2", 10250,
        ))
        .unwrap();
    wait_until(
        Duration::from_secs(2),
        "edge-c1 in the switch table and the routes",
        || (new_node_seen(&k) == (true, peers0 + 1, true)).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", new_node_seen(&k), k.logs()));
    eprintln!(
        "new edge Node: switch table, agent routes and cloud routes after {:?}",
        t.elapsed()
    );

    // Its agent (no data plane; it runs in edge-b1's namespace) enrols and connects.
    k.start_agent_in("edge-c1", "edge-b1", "none", "127.0.0.1:9472")
        .unwrap();
    wait_until(Duration::from_secs(10), "edge-c1 connected", || {
        k.hub_agents("gw-1")
            .contains(&"edge-c1".to_string())
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    wait_until(
        Duration::from_secs(5),
        "edge-c1's tunnel state on its Node",
        || {
            let n = k.cluster.get_json(&["node", "edge-c1"]).ok()?;
            n["metadata"]["annotations"]["tunnel.petrel.io/gw-1"]
                .as_str()?
                .starts_with("connected since")
                .then_some(())
        },
    )
    .unwrap();

    // Delete it: gone from the table and the routes within 2 s, its agent disconnected and
    // refused from then on.
    let t = Instant::now();
    k.cluster
        .kubectl(&["delete", "node", "edge-c1"], None)
        .unwrap();
    wait_until(Duration::from_secs(2), "edge-c1 removed everywhere", || {
        let (table, p, kernel) = new_node_seen(&k);
        let gone = !table
            && p == peers0
            && !kernel
            && !k.hub_agents("gw-1").contains(&"edge-c1".to_string());
        gone.then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", new_node_seen(&k), k.logs()));
    eprintln!("deleted edge Node: removed after {:?}", t.elapsed());
    wait_until(Duration::from_secs(6), "edge-c1's agent refused", || {
        let e = link_error(&k, "edge-b1", "127.0.0.1:9472");
        e.contains("\"edge-c1\" is not in the inventory")
            .then_some(e)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.logs()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!k.hub_agents("gw-1").contains(&"edge-c1".to_string()));
    k.agents.remove("edge-c1");

    // Certificates from the real CA (read from its Secret) naming a node that does not exist, or
    // a cloud node: refused, and the agent says why.
    let pem = |key: &str| {
        k.cluster
            .kubectl(
                &[
                    "get",
                    "secret",
                    "-n",
                    "kube-system",
                    "petrel-ca",
                    "-o",
                    &format!("go-template={{{{index .data \"{key}\" | base64decode}}}}"),
                ],
                None,
            )
            .unwrap()
    };
    let ca = CertificateAuthority::from_pem(&pem("tls.crt"), &pem("tls.key")).unwrap();
    let agent_bin = bin("petrel-edge-agent").unwrap();
    let mut forged = Vec::new();
    for (node, admin, why) in [
        (
            "ghost",
            "127.0.0.1:9473",
            "\"ghost\" is not in the inventory",
        ),
        ("cloud-1", "127.0.0.1:9474", "is in cloud site \"cloud\""),
    ] {
        let dir = tmp.path().join(format!("forged-{node}"));
        forged_state(&dir, &ca, node, &server);
        let g = lab
            .spawn(
                "edge-a2",
                &[
                    agent_bin.to_str().unwrap(),
                    "run",
                    "--state-dir",
                    dir.to_str().unwrap(),
                    "--admin-addr",
                    admin,
                    "--hooks",
                    "none",
                ],
            )
            .unwrap();
        let msg = wait_until(Duration::from_secs(10), &format!("{node} refused"), || {
            let e = link_error(&k, "edge-a2", admin);
            e.contains(why).then_some(e)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_tail(20)));
        eprintln!("certificate for {node}: {msg}");
        forged.push(g);
    }
    assert!(!k
        .hub_agents("gw-1")
        .iter()
        .any(|a| a == "ghost" || a == "cloud-1"));
    drop(forged);

    // The API server goes away: tunnels stay, the hub stays active, traffic flows, and a
    // restarted agent reconnects with the endpoints it knew.
    let edges: Vec<String> = ["edge-a1", "edge-a2", "edge-b1"].map(String::from).to_vec();
    k.cluster.stop_apiserver().unwrap();
    wait_until(
        Duration::from_secs(10),
        "the hub notices the API server is gone",
        || {
            let s = k.hub_status("gw-1").ok()?;
            (s["kubernetes"]["api_reachable"] == false).then_some(())
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(4)); // longer than the lease
    assert_eq!(k.hub_role("gw-1").as_deref(), Some("active"));
    let mut connected = k.hub_agents("gw-1");
    connected.sort();
    assert_eq!(connected, edges);
    let ip = |n: &str| lab.node(n).pod_ip;
    for (a, b) in [
        ("cloud-1", "edge-a1"),
        ("edge-a1", "edge-b1"),
        ("x1", "edge-a2"),
    ] {
        assert!(
            lab.ping(a, ip(b)),
            "{a} -> {b} without the API server\n{}",
            k.logs()
        );
    }
    let t = lab.tcp_transfer("edge-b1", "cloud-1", 2 << 20).unwrap();
    assert_eq!(t.bytes_received, 2 << 20);
    let known = std::fs::read_to_string(tmp.path().join("agent-edge-b1/endpoints.json")).unwrap();
    assert!(known.contains(&server), "{known}");
    k.agents.get_mut("edge-b1").unwrap().kill().unwrap();
    k.agents.remove("edge-b1");
    let hooks = k.hooks.clone();
    let t = Instant::now();
    k.start_agent_in(
        "edge-b1",
        "edge-b1",
        &hooks,
        petrel_e2e::k8s_lab::AGENT_ADMIN,
    )
    .unwrap();
    k.wait_agents("gw-1", &edges, Duration::from_secs(15))
        .unwrap();
    assert!(lab.ping("edge-b1", ip("cloud-1")));
    assert!(lab.ping("edge-a1", ip("edge-b1")));
    eprintln!(
        "agent restarted without the API server: reconnected with its known endpoints in {:?}",
        t.elapsed()
    );

    k.stop().unwrap();
}
