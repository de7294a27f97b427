//! Zero-touch enrolment against a real kube-apiserver (1.20, `Node,RBAC` authorization; no root
//! needed): an agent holding only its node's kubelet-style credentials (minted here from the
//! API server's CA, `CN=system:node:<name>, O=system:nodes`, as a kubelet's are) enrols through
//! a CertificateSigningRequest that the active hub signs, and connects with no token; the same
//! credentials asking for another node, a cloud node, and a user that is not a node are refused
//! with the reason in the agent's log, on the CSR and as an Event. Fleet tokens enrol nodes of
//! their pool once each. A revoked node's tunnel is closed and stays refused after a hub
//! restart.
//!
//! Nodes are modelled as a 1.34 API server would accept them: private (global-unicast)
//! InternalIPs, never loopback, and DNS-label names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use petrel_e2e::k8s_lab::{edge_like_node, LabCluster};
use petrel_e2e::procs::{bin, free_port, join, run, wait_until, Agent, Proc};
use petrel_transport::pki::{pem_to_der, CertInfo};

const GATEWAY_LABEL: &str = "node-role.alibabacloud.com/cloud-gateway";

fn gw(kubeconfig: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args(args)
        .args(["--inventory-source", "kubernetes", "--kubeconfig"])
        .arg(kubeconfig);
    c
}

fn out(c: Command) -> (bool, String, String) {
    let o = run(c, Duration::from_secs(30)).unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A hub on gw-1: (process, QUIC address, admin address).
struct HubProc {
    proc: Proc,
    listen: String,
    admin: String,
}

fn start_hub(kubeconfig: &Path, dir: &Path, listen: Option<String>) -> HubProc {
    let listen = listen.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
    let admin = format!("127.0.0.1:{}", free_port());
    let state = dir.join("hub-gw-1");
    let c = gw(
        kubeconfig,
        &[
            "run",
            "--node-name",
            "gw-1",
            "--listen",
            &listen,
            "--admin-addr",
            &admin,
            "--relay-listen",
            "off",
            "--advertise",
            &listen,
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    let proc = Proc::spawn("hub-gw-1", c).unwrap();
    proc.wait_for_log("hub listening", Duration::from_secs(20))
        .unwrap();
    let h = HubProc {
        proc,
        listen,
        admin,
    };
    wait_until(Duration::from_secs(15), "gw-1 active", || {
        (status(&h)["kubernetes"]["role"] == "active").then_some(())
    })
    .unwrap();
    h
}

fn status(h: &HubProc) -> serde_json::Value {
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args(["status", "--json", "--admin-addr", &h.admin]);
    serde_json::from_str(&out(c).1).unwrap_or_default()
}

fn connected(h: &HubProc) -> Vec<String> {
    status(h)["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn metric(h: &HubProc, series: &str) -> f64 {
    let text = petrel_e2e::procs::http_get(h.admin.parse().unwrap(), "/metrics").unwrap();
    petrel_e2e::apiserver::metric(&text, series)
}

/// A Node as kubelet and flanneld leave it: edge nodes with a node pool, private addresses.
fn node(name: &str, pool: Option<&str>, index: u8) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), name.into());
    match pool {
        Some(p) => {
            labels.insert("openyurt.io/is-edge-worker".into(), "true".into());
            labels.insert("apps.openyurt.io/nodepool".into(), p.into());
        }
        None if name.starts_with("gw-") => {
            labels.insert(GATEWAY_LABEL.into(), "".into());
        }
        None => {}
    }
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        "flannel.alpha.coreos.com/backend-data".into(),
        format!("{{\"VNI\":1,\"VtepMAC\":\"02:fa:00:00:01:{index:02x}\"}}").into(),
    );
    annotations.insert(
        "flannel.alpha.coreos.com/public-ip".into(),
        format!("192.168.50.{index}").into(),
    );
    edge_like_node(
        name,
        labels,
        annotations,
        &format!("10.244.{index}.0/24"),
        &format!("192.168.50.{index}"),
        10250,
    )
}

/// Kubelet-style client credentials for `cn` in `org`, signed by the API server's CA, and a
/// kubeconfig naming the API server the way a kubelet's does (files for the key and cert, as
/// /var/lib/kubelet/pki/kubelet-client-current.pem).
fn kubelet_kubeconfig(cluster: &LabCluster, dir: &Path, cn: &str, org: &str) -> PathBuf {
    let d = dir.join(format!("kubelet-{}", cn.replace(':', "_")));
    std::fs::create_dir_all(&d).unwrap();
    let (key, csr, crt) = (
        d.join("client.key"),
        d.join("client.csr"),
        d.join("client.crt"),
    );
    let ca_crt = cluster.cp.var("K8S_CA_CRT").unwrap();
    let ca_key = cluster.cp.var("K8S_CA_KEY").unwrap();
    let ok = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
        ])
        .arg(format!("/O={org}/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    // X.509 v3 (with extensions), as kubelet client certificates are; rustls refuses v1.
    let ext = d.join("ext.cnf");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    ok(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-extfile"])
        .arg(&ext)
        .arg("-in")
        .arg(&csr)
        .args(["-CA", &ca_crt, "-CAkey", &ca_key, "-CAcreateserial", "-out"])
        .arg(&crt));
    let server = cluster.cp.var("K8S_SERVER").unwrap();
    let kc = d.join("kubelet.conf");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: default-cluster\n  cluster:\n    certificate-authority: {ca_crt}\n    server: {server}\ncontexts:\n- name: default-context\n  context:\n    cluster: default-cluster\n    namespace: default\n    user: default-auth\ncurrent-context: default-context\nusers:\n- name: default-auth\n  user:\n    client-certificate: {}\n    client-key: {}\n",
            crt.display(),
            key.display()
        ),
    )
    .unwrap();
    kc
}

/// An agent that enrols from `kubeconfig` as `node` (the DaemonSet's way).
fn zero_touch_agent(name: &str, kubeconfig: &Path, node: &str, state: &Path, hub: &str) -> Agent {
    Agent::start(
        name,
        state,
        &[hub.to_string()],
        &[
            "--kubelet-kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            node,
            "--enrol-timeout",
            "60s",
        ],
    )
    .unwrap()
}

/// CSRs of Petrel's signer, by requesting user.
fn csrs(cluster: &LabCluster) -> Vec<serde_json::Value> {
    cluster.get_json(&["csr"]).unwrap()["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["spec"]["signerName"] == "petrel.io/edge-tunnel")
        .collect()
}

/// Warning Events about CSRs (in `default`).
fn csr_events(cluster: &LabCluster, reason: &str) -> Vec<String> {
    cluster.get_json(&["events", "-n", "default"]).unwrap()["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e["involvedObject"]["kind"] == "CertificateSigningRequest" && e["reason"] == reason
        })
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

/// Waits for a refused agent to exit non-zero, returning its log.
fn refused(mut a: Agent) -> String {
    let status = a.proc.wait_exit(Duration::from_secs(40)).unwrap();
    assert!(!status.success(), "{}", a.proc.log());
    a.proc.log()
}

#[test]
fn zero_touch_enrolment_fleet_tokens_and_revocation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = LabCluster::up(&dir.join("k8s")).unwrap();
    let admin_kc = cluster.kubeconfig.clone();
    for (i, (name, pool)) in [
        ("gw-1", None),
        ("cloud-1", None),
        ("edge-a1", Some("site-a")),
        ("edge-a2", Some("site-a")),
        ("edge-a3", Some("site-a")),
        ("edge-b1", Some("site-b")),
        ("edge-a4", Some("site-a")),
    ]
    .into_iter()
    .enumerate()
    {
        cluster.create(&node(name, pool, 10 + i as u8)).unwrap();
    }
    let mut hub = start_hub(&admin_kc, dir, None);

    // (1) Only the node's kubelet credentials: enrols and connects, no token.
    let kc_a1 = kubelet_kubeconfig(&cluster, dir, "system:node:edge-a1", "system:nodes");
    let state_a1 = dir.join("agent-a1");
    let a1 = zero_touch_agent("agent-a1", &kc_a1, "edge-a1", &state_a1, &hub.listen);
    wait_until(Duration::from_secs(30), "edge-a1 connected", || {
        connected(&hub)
            .contains(&"edge-a1".to_string())
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a1.proc.log(), hub.proc.log()));
    let pem = std::fs::read_to_string(state_a1.join("node.pem")).unwrap();
    let info = CertInfo::parse(&pem_to_der(&pem, "CERTIFICATE").unwrap()).unwrap();
    assert_eq!(info.node_name, "edge-a1");
    let mine: Vec<_> = csrs(&cluster)
        .into_iter()
        .filter(|c| c["spec"]["username"] == "system:node:edge-a1")
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let conditions = mine[0]["status"]["conditions"].to_string();
    assert!(
        conditions.contains("Approved") && conditions.contains("PetrelNodeVerified"),
        "{conditions}"
    );
    assert!(!csr_events(&cluster, "PetrelCSRSigned").is_empty());
    assert!(metric(&hub, "petrel_hub_csrs_total{outcome=\"signed\"}") >= 1.0);
    // A restart keeps the identity on the host: no second CSR.
    drop(a1);
    let a1 = zero_touch_agent("agent-a1", &kc_a1, "edge-a1", &state_a1, &hub.listen);
    wait_until(Duration::from_secs(20), "edge-a1 back", || {
        connected(&hub)
            .contains(&"edge-a1".to_string())
            .then_some(())
    })
    .unwrap();
    let count = csrs(&cluster)
        .iter()
        .filter(|c| c["spec"]["username"] == "system:node:edge-a1")
        .count();
    assert_eq!(count, 1, "a restart enrolled again");

    // (3) The agent binary with the edge DaemonSet's command, arguments and environment (as
    // kubectl renders deploy/edge-agent/), its host paths mapped into this test's directory,
    // the hub endpoint patched in as docs/operations.md says, and no data plane (no Flannel
    // outside a lab).
    let rendered = cluster
        .kubectl(
            &[
                "create",
                "--dry-run=client",
                "-o",
                "json",
                "-k",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../deploy/edge-agent")
                    .to_str()
                    .unwrap(),
            ],
            None,
        )
        .unwrap();
    let rendered: serde_json::Value = serde_json::from_str(&rendered).unwrap();
    let ds = if rendered["kind"] == "List" {
        rendered["items"][0].clone()
    } else {
        rendered
    };
    assert_eq!(ds["kind"], "DaemonSet");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let kc_a4 = kubelet_kubeconfig(&cluster, dir, "system:node:edge-a4", "system:nodes");
    let state_a4 = dir.join("host-a4/var/lib/petrel/agent");
    let command: Vec<String> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["args"].as_array().unwrap())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[0], "/usr/local/bin/petrel-edge-agent");
    let mut cmd = Command::new(bin("petrel-edge-agent").unwrap());
    cmd.args(&command[1..]).env_clear();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (name, e["value"].as_str()) {
            ("PETREL_NODE_NAME", None) => {
                assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
                "edge-a4".to_string()
            }
            ("PETREL_KUBELET_KUBECONFIG", Some(v)) => {
                assert_eq!(v, "/etc/kubernetes/kubelet.conf");
                kc_a4.display().to_string()
            }
            ("PETREL_STATE_DIR", Some(v)) => {
                assert_eq!(v, "/var/lib/petrel/agent");
                state_a4.display().to_string()
            }
            ("PETREL_SERVERS", Some(_)) => hub.listen.clone(),
            ("PETREL_ADMIN_ADDR", Some(_)) => format!("127.0.0.1:{}", free_port()),
            ("PETREL_HOOKS", Some(_)) => "none".into(),
            (n, v) => panic!("unexpected variable {n}={v:?} in the DaemonSet"),
        };
        cmd.env(name, value);
    }
    let ds_agent = Proc::spawn("agent-daemonset-a4", cmd).unwrap();
    wait_until(Duration::from_secs(30), "edge-a4 connected", || {
        connected(&hub)
            .contains(&"edge-a4".to_string())
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", ds_agent.log()));
    drop(ds_agent);

    // (2) The same credentials asking for another node's certificate: denied, with the reason
    // in the agent's log, on the CSR, and as an Event.
    let log = refused(zero_touch_agent(
        "agent-a1-as-b1",
        &kc_a1,
        "edge-b1",
        &dir.join("agent-a1-as-b1"),
        &hub.listen,
    ));
    assert!(
        log.contains("WrongNode") && log.contains("may only ask for its own name"),
        "{log}"
    );
    assert!(!dir.join("agent-a1-as-b1/node.pem").exists());
    // A cloud node's own credentials.
    let kc_cloud = kubelet_kubeconfig(&cluster, dir, "system:node:cloud-1", "system:nodes");
    let log = refused(zero_touch_agent(
        "agent-cloud-1",
        &kc_cloud,
        "cloud-1",
        &dir.join("agent-cloud-1"),
        &hub.listen,
    ));
    assert!(
        log.contains("NotAnEdgeNode") && log.contains("cloud"),
        "{log}"
    );
    // A user that is not a node: the API server itself refuses it (no CSR rights)...
    let kc_alice = kubelet_kubeconfig(&cluster, dir, "alice", "developers");
    let log = refused(zero_touch_agent(
        "agent-alice",
        &kc_alice,
        "edge-a2",
        &dir.join("agent-alice"),
        &hub.listen,
    ));
    assert!(
        log.contains("refused the CertificateSigningRequest") && log.contains("forbidden"),
        "{log}"
    );
    // ... and with the rights to create CSRs (a bootstrapper), the hub refuses it.
    cluster
        .kubectl(
            &[
                "create",
                "clusterrolebinding",
                "alice-bootstrapper",
                "--clusterrole=system:node-bootstrapper",
                "--user=alice",
            ],
            None,
        )
        .unwrap();
    let log = refused(zero_touch_agent(
        "agent-alice-2",
        &kc_alice,
        "edge-a2",
        &dir.join("agent-alice-2"),
        &hub.listen,
    ));
    assert!(log.contains("NotANode") && log.contains("alice"), "{log}");
    wait_until(Duration::from_secs(10), "three denial Events", || {
        let ev = csr_events(&cluster, "PetrelCSRDenied");
        let all = ev.join("\n");
        (all.contains("edge-b1") && all.contains("cloud-1") && all.contains("alice")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", csr_events(&cluster, "PetrelCSRDenied")));
    for outcome in ["denied_wrong_node", "denied_not_edge", "denied_not_a_node"] {
        assert!(
            metric(
                &hub,
                &format!("petrel_hub_csrs_total{{outcome=\"{outcome}\"}}")
            ) >= 1.0,
            "{outcome}"
        );
    }

    // (4) A fleet token for pool site-a: two nodes of the pool enrol; another pool's node and a
    // second use by the same node are refused.
    let (ok, stdout, stderr) = out(gw(
        &admin_kc,
        &[
            "token",
            "create",
            "--pool",
            "site-a",
            "--max-uses",
            "5",
            "--ttl",
            "1h",
            "--server",
            &hub.listen,
        ],
    ));
    assert!(ok, "{stdout}{stderr}");
    let (token, fp) = petrel_e2e::procs::parse_token_create(&stdout).unwrap();
    for n in ["edge-a2", "edge-a3"] {
        let j = join(&hub.listen, n, &token, &fp, &dir.join(format!("fleet-{n}"))).unwrap();
        assert!(j.success, "{n}: {}", j.stderr);
    }
    let j = join(&hub.listen, "edge-b1", &token, &fp, &dir.join("fleet-b1")).unwrap();
    assert!(
        !j.success && j.stderr.contains("node pool \"site-a\""),
        "{}",
        j.stderr
    );
    let j = join(
        &hub.listen,
        "edge-a2",
        &token,
        &fp,
        &dir.join("fleet-a2-again"),
    )
    .unwrap();
    assert!(
        !j.success && j.stderr.contains("already enrolled node \"edge-a2\""),
        "{}",
        j.stderr
    );
    let secret = out(gw(&admin_kc, &["token", "list"])).1;
    assert!(
        secret.contains("pool:site-a 2/5") && secret.contains("fleet"),
        "{secret}"
    );

    // (5) Revocation: the connected tunnel is closed, and refused after a hub restart.
    let refusals = metric(&hub, "petrel_hub_agent_refusals_total{reason=\"revoked\"}");
    let (ok, stdout, stderr) = out(gw(
        &admin_kc,
        &["revoke", "--node", "edge-a1", "--reason", "device stolen"],
    ));
    assert!(
        ok && stdout.contains("revoked node edge-a1"),
        "{stdout}{stderr}"
    );
    wait_until(Duration::from_secs(10), "edge-a1 disconnected", || {
        (!connected(&hub).contains(&"edge-a1".to_string())).then_some(())
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "reconnects refused", || {
        (metric(&hub, "petrel_hub_agent_refusals_total{reason=\"revoked\"}") > refusals + 1.0)
            .then_some(())
    })
    .unwrap();
    assert!(
        hub.proc.log().contains("device stolen"),
        "{}",
        hub.proc.log()
    );
    let listen = hub.listen.clone();
    hub.proc.kill();
    drop(hub);
    let hub = start_hub(&admin_kc, dir, Some(listen));
    wait_until(Duration::from_secs(15), "refused after the restart", || {
        (metric(&hub, "petrel_hub_agent_refusals_total{reason=\"revoked\"}") >= 2.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", hub.proc.log(), a1.proc.log()));
    assert!(!connected(&hub).contains(&"edge-a1".to_string()));
    assert!(
        a1.proc.log().contains("revoked"),
        "the agent does not say why: {}",
        a1.proc.log()
    );
    // A revoked node cannot enrol again through a CSR either, until lifted.
    let log = refused(zero_touch_agent(
        "agent-a1-again",
        &kc_a1,
        "edge-a1",
        &dir.join("agent-a1-again"),
        &hub.listen,
    ));
    assert!(log.contains("Revoked"), "{log}");
    let (ok, stdout, _) = out(gw(&admin_kc, &["revoke", "--list"]));
    assert!(
        ok && stdout.contains("edge-a1") && stdout.contains("device stolen"),
        "{stdout}"
    );
}
