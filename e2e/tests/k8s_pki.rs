//! The hub's PKI and configuration in Kubernetes mode, on loopback against a real
//! kube-apiserver (no root needed): the CA lives in a Secret that every gateway shares, join
//! tokens are Secrets bound to a node with an expiry and single use, `token create` / `token
//! list` / `ca fingerprint` work in Kubernetes mode, and bad settings exit 64 naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use petrel_e2e::k8s_lab::LabCluster;
use petrel_e2e::procs::{bin, free_port, join, run, wait_until, Proc};

fn gw(kubeconfig: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args(args).args([
        "--inventory-source",
        "kubernetes",
        "--kubeconfig",
        kubeconfig,
    ]);
    c
}

fn out(c: Command) -> (bool, i32, String, String) {
    let o = run(c, Duration::from_secs(30)).unwrap();
    (
        o.status.success(),
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn hub(kubeconfig: &str, node: &str, dir: &std::path::Path) -> (Proc, String, String) {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{port}");
    let relay = format!("127.0.0.1:{}", free_port());
    let state = dir.join(format!("hub-{node}"));
    let c = gw(
        kubeconfig,
        &[
            "run",
            "--node-name",
            node,
            "--listen",
            &listen,
            "--admin-addr",
            &admin,
            "--relay-listen",
            &relay,
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    let p = Proc::spawn(&format!("hub-{node}"), c).unwrap();
    p.wait_for_log("hub listening", Duration::from_secs(20))
        .unwrap();
    (p, listen, admin)
}

fn status(admin: &str) -> serde_json::Value {
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args(["status", "--json", "--admin-addr", admin]);
    serde_json::from_str(&out(c).2).unwrap_or_default()
}

/// `token create` in Kubernetes mode: (token, fingerprint).
fn token(kubeconfig: &str, node: &str, server: &str, extra: &[&str]) -> (String, String, String) {
    let mut args = vec!["token", "create", "--node", node, "--server", server];
    args.extend_from_slice(extra);
    let (ok, _, stdout, stderr) = out(gw(kubeconfig, &args));
    assert!(ok, "{stdout}{stderr}");
    let (token, fingerprint) = petrel_e2e::procs::parse_token_create(&stdout).unwrap();
    (token, fingerprint, stderr)
}

#[test]
fn ca_and_tokens_live_in_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = LabCluster::up(&tmp.path().join("k8s")).unwrap();
    let kc = cluster.kubeconfig.to_str().unwrap().to_string();
    for (name, labels) in [
        (
            "gw-1",
            serde_json::json!({"node-role.alibabacloud.com/cloud-gateway": ""}),
        ),
        (
            "gw-2",
            serde_json::json!({"node-role.alibabacloud.com/cloud-gateway": ""}),
        ),
        (
            "edge-a1",
            serde_json::json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "a"}),
        ),
        (
            "edge-a2",
            serde_json::json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "a"}),
        ),
    ] {
        cluster
            .create(&serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}))
            .unwrap();
    }

    // Bad settings exit 64 and name the field.
    for (args, field) in [
        (vec!["run"], "node-name"),
        (
            vec!["run", "--node-name", "gw-1", "--lease-renew", "2s"],
            "lease-renew",
        ),
        (
            vec!["run", "--node-name", "gw-1", "--lease-duration", "1500ms"],
            "lease-duration",
        ),
        (
            vec!["run", "--node-name", "gw-1", "--hub-name", "other"],
            "hub-name",
        ),
        (
            vec!["run", "--node-name", "gw-1", "--edge-labels", "not a key"],
            "edge-labels",
        ),
        (
            vec!["run", "--node-name", "gw-1", "--k8s-namespace", "Bad_NS"],
            "k8s-namespace",
        ),
        (
            vec!["node", "--node-name", "gw-1", "--gateway-label", "/x"],
            "gateway-label",
        ),
    ] {
        let (ok, code, _, stderr) = out(gw(&kc, &args));
        assert!(
            !ok && code == 64 && stderr.contains(field),
            "{args:?}: {code} {stderr}"
        );
    }
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args(["run", "--inventory-source", "etcd"]);
    let (_, code, _, stderr) = out(c);
    assert!(
        code == 64 && stderr.contains("inventory-source"),
        "{stderr}"
    );

    // Two gateways share one CA (created by whichever starts first, stored in a Secret).
    let (_h1, server1, admin1) = hub(&kc, "gw-1", tmp.path());
    let (_h2, _server2, admin2) = hub(&kc, "gw-2", tmp.path());
    wait_until(Duration::from_secs(10), "one active, one standby", || {
        let roles = [status(&admin1), status(&admin2)]
            .map(|s| s["kubernetes"]["role"].as_str().unwrap_or("").to_string());
        let mut r = roles.to_vec();
        r.sort();
        (r == ["active", "standby"]).then_some(())
    })
    .unwrap();
    let fp1 = status(&admin1)["hub"]["ca_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(status(&admin2)["hub"]["ca_sha256"].as_str().unwrap(), fp1);
    let (ok, _, stdout, _) = out(gw(&kc, &["ca", "fingerprint"]));
    assert!(ok);
    assert_eq!(stdout.trim(), fp1);
    let secret = cluster
        .get_json(&["secret", "-n", "kube-system", "petrel-ca"])
        .unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");

    // Tokens: bound to a node, single use, expiring; the secret part is never stored.
    let (t, fp, _) = token(&kc, "edge-a1", &server1, &[]);
    assert_eq!(fp, fp1);
    let stored = cluster
        .kubectl(
            &[
                "get",
                "secrets",
                "-n",
                "kube-system",
                "-l",
                "petrel.io/join-token=true",
                "-o",
                "json",
            ],
            None,
        )
        .unwrap();
    assert!(stored.contains("petrel-token-") && !stored.contains(&t[7..]));
    let a = join(&server1, "edge-a2", &t, &fp, &tmp.path().join("a2")).unwrap();
    assert!(
        !a.success && a.stderr.contains("bound to node"),
        "{}",
        a.stderr
    );
    let a = join(&server1, "edge-a1", &t, &fp, &tmp.path().join("a1")).unwrap();
    assert!(a.success, "{}", a.stderr);
    let a = join(&server1, "edge-a1", &t, &fp, &tmp.path().join("a1b")).unwrap();
    assert!(
        !a.success && a.stderr.contains("already used"),
        "{}",
        a.stderr
    );
    let (t2, _, _) = token(&kc, "edge-a2", &server1, &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let a = join(&server1, "edge-a2", &t2, &fp, &tmp.path().join("a2")).unwrap();
    assert!(!a.success && a.stderr.contains("expired"), "{}", a.stderr);
    let (t3, _, _) = token(&kc, "edge-a2", &server1, &["--reusable"]);
    for d in ["r1", "r2"] {
        let a = join(&server1, "edge-a2", &t3, &fp, &tmp.path().join(d)).unwrap();
        assert!(a.success, "{}", a.stderr);
    }
    // A token for a node the hub would refuse (a cloud node, a Node that does not exist) is
    // refused, non-zero, with the reason; --force creates it with a warning.
    for (node, why) in [("gw-2", "cloud node"), ("nope", "does not exist")] {
        let (ok, _, stdout, stderr) = out(gw(
            &kc,
            &["token", "create", "--node", node, "--server", &server1],
        ));
        assert!(!ok, "{node}: {stdout}{stderr}");
        assert!(
            stderr.contains(why) && stderr.contains("--force") && !stdout.contains("join"),
            "{node}: {stdout}{stderr}"
        );
        let (_, _, warning) = token(&kc, node, &server1, &["--force"]);
        assert!(warning.contains(why), "{warning}");
    }
    let (ok, _, list, _) = out(gw(&kc, &["token", "list"]));
    assert!(ok);
    let used: Vec<&str> = list.lines().filter(|l| l.contains("edge-a1")).collect();
    assert!(used.len() == 1 && used[0].ends_with("yes"), "{list}");
    // Without --server, the join command names the active hub (from the Lease).
    let (ok, _, printed, _) = out(gw(&kc, &["token", "create", "--node", "edge-a1"]));
    assert!(ok);
    let active = [(&admin1, "gw-1"), (&admin2, "gw-2")]
        .into_iter()
        .find(|(a, _)| status(a)["kubernetes"]["role"] == "active")
        .map(|(a, _)| status(a)["hub"]["listen"].as_str().unwrap().to_string())
        .unwrap();
    assert!(printed.contains(&format!("--server {active}")), "{printed}");
}
