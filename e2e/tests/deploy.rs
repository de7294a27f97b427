//! The deployment artefacts in `deploy/`, checked against the real things:
//!
//! * the kustomize entry point applies (`--dry-run=server`, then for real) to kube-apiserver 1.20
//!   from `e2e/k8s`, with the system kubectl and kubectl 1.20 (its old built-in kustomize), and
//!   the ServiceAccount gets exactly the access docs/operations.md lists; the API server starts
//!   with the sample `EgressSelectorConfiguration` (it validates it at start-up);
//! * `gateway.toml` (the ConfigMap) is accepted by the real `petrel-gateway run`, and every
//!   `PETREL_*` variable of the DaemonSet is one its container's subcommand reads;
//! * `deploy/edge/install.sh` against a scratch `--root`, with the real agent binary and a real hub
//!   on loopback: files, modes, the unit, idempotence, refusals, the installed config really
//!   connects, and `--uninstall` / `--uninstall --purge` leave nothing behind;
//! * the unit passes `systemd-analyze verify` and the script passes shellcheck, where those tools
//!   are installed (apt packages `systemd` and `shellcheck`); otherwise the test says why it
//!   skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use petrel_e2e::apiserver::{metric, ControlPlane};
use petrel_e2e::procs::{bin, free_port, http_status, run, wait_until, Hub, Proc};
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A short temporary directory (Unix socket paths must stay under ~107 bytes).
fn short_tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pdep")
        .tempdir_in("/tmp")
        .unwrap()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    })
}

// ---- Kubernetes ------------------------------------------------------------------------------

fn kubectl_with(cp: &ControlPlane, kubectl: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(kubectl);
    c.env("KUBECONFIG", cp.var("KUBECONFIG").unwrap())
        .args(args);
    run(c, Duration::from_secs(60)).unwrap()
}

#[test]
fn manifests_apply_to_a_real_apiserver_with_least_privilege() {
    let tmp = short_tmp();
    // The API server validates the egress selector configuration at start-up and refuses to
    // start on a bad one, so `up` succeeding is the check of the sample file.
    let egress = deploy("apiserver/egress-selector-configuration.yaml");
    let cp = ControlPlane::up(
        tmp.path(),
        &[("EGRESS_SELECTOR_CONFIG", egress.display().to_string())],
        None,
    )
    .unwrap();

    let mut kubectls: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(k) = which("kubectl") {
        kubectls.push(("system kubectl", k));
    }
    if let Ok(k) = cp.var("K8S_KUBECTL") {
        kubectls.push(("kubectl 1.20", PathBuf::from(k)));
    }
    assert!(!kubectls.is_empty(), "no kubectl at all");
    let (_, main_kubectl) = kubectls[0].clone();
    let dir = repo().join("deploy");
    let dir = dir.to_str().unwrap();

    // A server-side dry run cannot create namespaced objects in a namespace that does not exist
    // yet (the Namespace itself is only dry-run), so the namespace comes first, as it does on
    // any second apply.
    let out = kubectl_with(
        &cp,
        &main_kubectl,
        &["apply", "-f", deploy("namespace.yaml").to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));

    for (name, kubectl) in &kubectls {
        let out = kubectl_with(&cp, kubectl, &["apply", "--dry-run=server", "-k", dir]);
        let all = text(&out);
        assert!(out.status.success(), "{name}: {all}");
        println!("{name}: apply --dry-run=server -k deploy/:\n{all}");
        for object in [
            "serviceaccount/petrel-gateway",
            "clusterrole.rbac.authorization.k8s.io/petrel-gateway",
            "clusterrolebinding.rbac.authorization.k8s.io/petrel-gateway",
            "role.rbac.authorization.k8s.io/petrel-gateway",
            "rolebinding.rbac.authorization.k8s.io/petrel-gateway",
            "role.rbac.authorization.k8s.io/petrel-gateway-node-events",
            "rolebinding.rbac.authorization.k8s.io/petrel-gateway-node-events",
            "configmap/petrel-gateway-config-",
            "daemonset.apps/petrel-gateway",
        ] {
            assert!(
                all.lines()
                    .any(|l| l.starts_with(object) && l.ends_with("(server dry run)")),
                "{name}: {object} missing from the dry run:\n{all}"
            );
        }
    }

    // For real, twice: the second apply changes nothing.
    let out = kubectl_with(&cp, &main_kubectl, &["apply", "-k", dir]);
    assert!(out.status.success(), "{}", text(&out));
    let out = kubectl_with(&cp, &main_kubectl, &["apply", "-k", dir]);
    let again = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        again.lines().count() == 10 && again.lines().all(|l| l.ends_with(" unchanged")),
        "second apply changed something:\n{again}"
    );

    // The DaemonSet as the API server stored it.
    let out = kubectl_with(
        &cp,
        &main_kubectl,
        &[
            "get",
            "daemonset",
            "-n",
            "petrel-system",
            "petrel-gateway",
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let ds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "petrel-gateway");
    let container = |name: &str| -> &serde_json::Value {
        pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    };
    // Capabilities: none for the hub, NET_ADMIN (NET_RAW at most) for the node role; nothing
    // privileged, every default capability dropped.
    for (name, want_net_admin) in [("hub", false), ("node-role", true)] {
        let sc = &container(name)["securityContext"];
        assert_eq!(sc["privileged"], false, "{name}: {sc}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}: {sc}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}: {sc}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}: {sc}"
        );
        let added: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
            .unwrap_or_default();
        assert_eq!(
            added.contains(&"NET_ADMIN"),
            want_net_admin,
            "{name}: {added:?}"
        );
        assert!(
            added.iter().all(|a| ["NET_ADMIN", "NET_RAW"].contains(a)),
            "{name}: capabilities beyond NET_ADMIN/NET_RAW: {added:?}"
        );
    }
    let hub = container("hub");
    let ports: Vec<(u64, &str)> = hub["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [(7443, "UDP"), (8473, "UDP"), (9470, "TCP")] {
        assert!(ports.contains(&want), "port {want:?} missing: {ports:?}");
    }
    assert_eq!(hub["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(hub["readinessProbe"]["httpGet"]["port"], 9470);
    assert_eq!(hub["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(hub["livenessProbe"]["httpGet"]["port"], 9470);
    // The node role has its own admin port with probes.
    let node_role = container("node-role");
    assert_eq!(node_role["ports"][0]["containerPort"], 9472, "{node_role}");
    assert_eq!(node_role["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(node_role["readinessProbe"]["httpGet"]["port"], 9472);
    assert_eq!(node_role["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(node_role["livenessProbe"]["httpGet"]["port"], 9472);
    // Every PETREL_* variable is one the binary reads for that container's subcommand, and the
    // node name comes from the downward API.
    for name in ["hub", "node-role"] {
        let c = container(name);
        let env = c["env"].as_array().unwrap();
        let node_name = env
            .iter()
            .find(|e| e["name"] == "PETREL_NODE_NAME")
            .unwrap_or_else(|| panic!("{name}: no PETREL_NODE_NAME"));
        assert_eq!(
            node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
            "{name}: {node_name}"
        );
        assert_eq!(
            c["command"],
            serde_json::json!(["/usr/local/bin/petrel-gateway"])
        );
        let sub = c["args"][0].as_str().unwrap();
        let help = {
            let mut cmd = Command::new(bin("petrel-gateway").unwrap());
            cmd.args([sub, "--help"]);
            let out = run(cmd, Duration::from_secs(10)).unwrap();
            assert!(out.status.success(), "{name}: {}", text(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let kube_mode = help.contains("--inventory-source");
        for e in env {
            let var = e["name"].as_str().unwrap();
            if !var.starts_with("PETREL_") {
                continue;
            }
            if !kube_mode && ["PETREL_INVENTORY_SOURCE", "PETREL_NAMESPACE"].contains(&var) {
                println!("{name}: {var} not checked: this petrel-gateway has no Kubernetes mode");
                continue;
            }
            assert!(
                help.contains(&format!("[env: {var}=")),
                "{name}: `petrel-gateway {sub}` does not read {var}:\n{help}"
            );
        }
    }
    let tolerated: Vec<&str> = pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["key"].as_str())
        .collect();
    for taint in [
        "node-role.kubernetes.io/master",
        "node-role.kubernetes.io/control-plane",
    ] {
        assert!(tolerated.contains(&taint), "{taint} not tolerated");
    }
    // Edge workers are excluded by the cloud-node term (NotIn "true" for both label keys).
    let terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .unwrap();
    let cloud_term = terms[0]["matchExpressions"].as_array().unwrap();
    for key in [
        "alibabacloud.com/is-edge-worker",
        "openyurt.io/is-edge-worker",
    ] {
        assert!(
            cloud_term.iter().any(|e| e["key"] == key
                && e["operator"] == "NotIn"
                && e["values"] == serde_json::json!(["true"])),
            "{key} is not excluded: {cloud_term:?}"
        );
    }
    // The DaemonSet mounts the generated ConfigMap, and it holds gateway.toml unchanged.
    let cm = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap()["configMap"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(cm.starts_with("petrel-gateway-config-"), "{cm}");
    let out = kubectl_with(
        &cp,
        &main_kubectl,
        &["get", "configmap", "-n", "petrel-system", &cm, "-o", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let cm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        cm["data"]["gateway.toml"].as_str().unwrap(),
        std::fs::read_to_string(deploy("gateway.toml")).unwrap()
    );

    // Least privilege: what the ServiceAccount may and may not do (docs/operations.md, RBAC).
    let sa = "--as=system:serviceaccount:petrel-system:petrel-gateway";
    let cases: &[(&str, &str, &str, bool)] = &[
        ("get", "nodes", "", true),
        ("list", "nodes", "", true),
        ("watch", "nodes", "", true),
        ("patch", "nodes", "", true),
        ("delete", "nodes", "", false),
        ("update", "nodes/status", "", false),
        (
            "create",
            "leases.coordination.k8s.io",
            "petrel-system",
            true,
        ),
        (
            "update",
            "leases.coordination.k8s.io",
            "petrel-system",
            true,
        ),
        (
            "delete",
            "leases.coordination.k8s.io",
            "petrel-system",
            false,
        ),
        ("create", "leases.coordination.k8s.io", "kube-system", false),
        ("get", "secrets", "petrel-system", true),
        ("list", "secrets", "petrel-system", true),
        ("create", "secrets", "petrel-system", true),
        ("update", "secrets", "petrel-system", true),
        ("delete", "secrets", "petrel-system", true),
        ("watch", "secrets", "petrel-system", false),
        ("get", "secrets", "kube-system", false),
        ("list", "secrets", "default", false),
        ("get", "configmaps", "petrel-system", false),
        ("get", "configmaps", "kube-system", false),
        ("create", "events", "default", true),
        ("patch", "events", "default", false),
        ("list", "events", "default", false),
        ("create", "events", "petrel-system", false),
        ("create", "events", "kube-system", false),
        ("list", "events", "petrel-system", false),
        ("list", "pods", "petrel-system", false),
        ("create", "pods", "petrel-system", false),
        ("get", "services", "default", false),
        // Zero-touch enrolment: the signer reads CSRs, never creates or deletes them.
        (
            "get",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            true,
        ),
        (
            "list",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            true,
        ),
        (
            "watch",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            true,
        ),
        (
            "create",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            false,
        ),
        (
            "delete",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            false,
        ),
        (
            "update",
            "certificatesigningrequests.certificates.k8s.io",
            "",
            false,
        ),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, ns, want) in cases {
        let mut args = vec!["auth", "can-i", verb, resource, sa];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        let out = kubectl_with(&cp, &main_kubectl, &args);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if (answer == "yes") != *want || !["yes", "no"].contains(&answer.as_str()) {
            wrong.push(format!(
                "{verb} {resource} -n {ns:?}: {answer:?}, want {want}"
            ));
        }
    }
    // The CSR subresources (approve/deny, write the certificate) and Petrel's signer only.
    for (verb, resource, sub, want) in [
        (
            "update",
            "certificatesigningrequests.certificates.k8s.io",
            "approval",
            true,
        ),
        (
            "update",
            "certificatesigningrequests.certificates.k8s.io",
            "status",
            true,
        ),
        (
            "patch",
            "certificatesigningrequests.certificates.k8s.io",
            "approval",
            false,
        ),
    ] {
        let mut args = vec!["auth", "can-i", verb, resource, sa];
        let flag = format!("--subresource={sub}");
        if !sub.is_empty() {
            args.push(&flag);
        }
        let out = kubectl_with(&cp, &main_kubectl, &args);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if (answer == "yes") != want {
            wrong.push(format!("{verb} {resource} {sub}: {answer:?}, want {want}"));
        }
    }
    // Signers: `kubectl auth can-i` cannot name a signer (its name has a slash), so ask the API
    // server with a SubjectAccessReview, as it does itself when the hub approves or signs.
    for (verb, signer, want) in [
        ("approve", "petrel.io/edge-tunnel", true),
        ("sign", "petrel.io/edge-tunnel", true),
        (
            "approve",
            "kubernetes.io/kube-apiserver-client-kubelet",
            false,
        ),
        ("sign", "kubernetes.io/kubelet-serving", false),
        ("approve", "kubernetes.io/kube-apiserver-client", false),
    ] {
        let review = serde_json::json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": "system:serviceaccount:petrel-system:petrel-gateway",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:petrel-system", "system:authenticated"],
                "resourceAttributes": {
                    "group": "certificates.k8s.io",
                    "resource": "signers",
                    "name": signer,
                    "verb": verb,
                },
            },
        });
        let file = tmp.path().join("sar.json");
        std::fs::write(&file, review.to_string()).unwrap();
        let out = kubectl_with(
            &cp,
            &main_kubectl,
            &["create", "-o", "json", "-f", file.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", text(&out));
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if answer["status"]["allowed"].as_bool().unwrap_or(false) != want {
            wrong.push(format!(
                "{verb} signer {signer}: {}, want {want}",
                answer["status"]
            ));
        }
    }
    // What a node may do with CSRs under `Node,RBAC` (the Node authorizer): create and read
    // them with its kubelet credentials, nothing more.
    for (verb, want) in [
        ("create", true),
        ("get", true),
        ("list", true),
        ("watch", true),
        ("delete", false),
        ("update", false),
    ] {
        let out = kubectl_with(
            &cp,
            &main_kubectl,
            &[
                "auth",
                "can-i",
                verb,
                "certificatesigningrequests.certificates.k8s.io",
                "--as=system:node:edge-a1",
                "--as-group=system:nodes",
            ],
        );
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if (answer == "yes") != want {
            wrong.push(format!("node: {verb} csr: {answer:?}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "RBAC differs:\n{}", wrong.join("\n"));

    // The edge-agent DaemonSet (deploy/edge-agent/, applied after deploy/): dry run with every
    // kubectl, then for real.
    let edge_dir = deploy("edge-agent");
    let edge_dir = edge_dir.to_str().unwrap();
    for (name, kubectl) in &kubectls {
        let out = kubectl_with(&cp, kubectl, &["apply", "--dry-run=server", "-k", edge_dir]);
        let all = text(&out);
        assert!(out.status.success(), "{name}: {all}");
        assert!(
            all.lines()
                .any(|l| l.starts_with("daemonset.apps/petrel-edge-agent")
                    && l.ends_with("(server dry run)")),
            "{name}: {all}"
        );
    }
    let out = kubectl_with(&cp, &main_kubectl, &["apply", "-k", edge_dir]);
    assert!(out.status.success(), "{}", text(&out));
    let out = kubectl_with(
        &cp,
        &main_kubectl,
        &[
            "get",
            "daemonset",
            "-n",
            "petrel-system",
            "petrel-edge-agent",
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let ds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let agent = &pod["containers"][0];
    assert_eq!(
        agent["image"], "localhost/petrel/petrel-edge-agent:0.1.0",
        "{agent}"
    );
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{sc}"
    );
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"]),
        "{sc}"
    );
    // Edge nodes of public sites only: every term requires an edge label and excludes
    // Express Connect sites.
    let terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .unwrap();
    let mut edge_keys = Vec::new();
    for t in terms {
        let exprs = t["matchExpressions"].as_array().unwrap();
        let edge = exprs.iter().find(|e| {
            e["key"].as_str().unwrap().ends_with("/is-edge-worker")
                && e["operator"] == "In"
                && e["values"] == serde_json::json!(["true"])
        });
        edge_keys.push(edge.map(|e| e["key"].as_str().unwrap().to_string()));
        assert!(
            exprs.iter().any(|e| e["key"] == "petrel.io/site-network"
                && e["operator"] == "NotIn"
                && e["values"] == serde_json::json!(["express-connect"])),
            "{t}"
        );
    }
    assert_eq!(
        edge_keys,
        vec![
            Some("alibabacloud.com/is-edge-worker".to_string()),
            Some("openyurt.io/is-edge-worker".to_string())
        ]
    );
    // The identity is kept on the host; the kubelet's kubeconfig and its client certificate are
    // mounted read-only.
    let host_path = |name: &str| -> String {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))["hostPath"]["path"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(host_path("state"), "/var/lib/petrel/agent");
    assert_eq!(host_path("kubelet-conf"), "/etc/kubernetes/kubelet.conf");
    let env = agent["env"].as_array().unwrap();
    let help = {
        let mut cmd = Command::new(bin("petrel-edge-agent").unwrap());
        cmd.args(["run", "--help"]);
        let out = run(cmd, Duration::from_secs(10)).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for e in env {
        let var = e["name"].as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {var}=")),
            "`petrel-edge-agent run` does not read {var}:\n{help}"
        );
    }
    let node_name = env
        .iter()
        .find(|e| e["name"] == "PETREL_NODE_NAME")
        .unwrap();
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
}

/// kubectl 1.20 from `e2e/k8s` when it has been built on this machine (its cache), else None.
fn cached_kubectl_1_20() -> Option<PathBuf> {
    let cache = std::env::var_os("PETREL_K8S_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/petrel-k8s")))?;
    let k = cache.join("bin/kubectl");
    k.is_file().then_some(k)
}

fn kustomize(kubectl: &Path, dir: &Path) -> (Output, Vec<serde_json::Value>) {
    let mut c = Command::new(kubectl);
    c.arg("kustomize").arg(dir);
    let out = run(c, Duration::from_secs(60)).unwrap();
    assert!(
        out.status.success(),
        "kustomize {}: {}",
        dir.display(),
        text(&out)
    );
    // The rendered stream as JSON without a YAML parser or a server: a local no-op label
    // removal prints each object as kubectl read it.
    let mut c = Command::new(kubectl);
    let rendered = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rendered.path(), &out.stdout).unwrap();
    c.args(["label", "--local", "-o", "json", "-f"])
        .arg(rendered.path())
        .arg("petrel.test/none-")
        .env("KUBECONFIG", "/dev/null");
    let json = run(c, Duration::from_secs(60)).unwrap();
    assert!(json.status.success(), "{}", text(&json));
    // One JSON object per document, concatenated.
    let objects: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&json.stdout)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .flat_map(|v| {
            if v["kind"] == "List" {
                v["items"].as_array().unwrap().clone()
            } else {
                vec![v]
            }
        })
        .collect();
    (out, objects)
}

fn images_of(objects: &[serde_json::Value]) -> Vec<String> {
    objects
        .iter()
        .filter_map(|o| o["spec"]["template"]["spec"]["containers"].as_array())
        .flatten()
        .map(|c| c["image"].as_str().unwrap().to_string())
        .collect()
}

/// `kubectl kustomize deploy/` with this machine's kubectl prints no warning (no deprecated
/// fields), also with the opt-in privileged patch enabled; the namespace carries Pod Security
/// labels that admit the DaemonSet (hostNetwork and NET_ADMIN are beyond `baseline`); and the
/// one `images:` entry names the image of every container, so one edit moves the install.
#[test]
fn kustomize_renders_without_warnings_with_pod_security_and_one_image_name() {
    let Some(kubectl) = which("kubectl") else {
        println!("SKIPPED: no kubectl on PATH");
        return;
    };
    let mut kubectls = vec![("system kubectl", kubectl.clone())];
    if let Some(k) = cached_kubectl_1_20() {
        kubectls.push(("kubectl 1.20", k));
    } else {
        println!(
            "kubectl 1.20 not built yet (e2e/k8s/build-kube-apiserver.sh): system kubectl only"
        );
    }
    for (name, k) in &kubectls {
        let (out, objects) = kustomize(k, &repo().join("deploy"));
        assert!(
            out.stderr.is_empty(),
            "{name}: kubectl kustomize deploy/ warned:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = objects
            .iter()
            .find(|o| o["kind"] == "Namespace")
            .expect("no Namespace");
        let labels = &ns["metadata"]["labels"];
        // The pod needs hostNetwork and NET_ADMIN: only `privileged` admits that.
        let ds = objects
            .iter()
            .find(|o| o["kind"] == "DaemonSet")
            .expect("no DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        for mode in ["enforce", "warn", "audit"] {
            assert_eq!(
                labels[format!("pod-security.kubernetes.io/{mode}")],
                "privileged",
                "{name}: {mode}: {labels}"
            );
            assert_eq!(
                labels[format!("pod-security.kubernetes.io/{mode}-version")],
                "latest",
                "{name}: {labels}"
            );
        }
        let images = images_of(&objects);
        assert_eq!(images.len(), 2, "{images:?}");
        assert!(
            images.iter().all(|i| i
                == &format!(
                    "localhost/petrel/petrel-gateway:{}",
                    env!("CARGO_PKG_VERSION")
                )),
            "{name}: the images are not the one `make image` builds: {images:?}"
        );
    }

    // A copy of deploy/ with the one `images:` entry changed, and with the opt-in patch
    // enabled: still no warning (system kubectl: `patches:` is kustomize >= 3), every
    // container moves to the new name, the node role is privileged.
    let tmp = short_tmp();
    let copy = tmp.path().join("deploy");
    let mut c = Command::new("cp");
    c.arg("-r").arg(repo().join("deploy")).arg(&copy);
    assert!(run(c, Duration::from_secs(10)).unwrap().status.success());
    let kfile = copy.join("kustomization.yaml");
    let k = std::fs::read_to_string(&kfile).unwrap();
    let edited = k
        .replace(
            "newName: localhost/petrel/petrel-gateway",
            "newName: registry.example.com/team/petrel-gateway",
        )
        .replace(
            "# patches:\n# - path: optional/privileged.yaml",
            "patches:\n- path: optional/privileged.yaml",
        );
    assert_ne!(
        edited.matches("registry.example.com/team").count(),
        0,
        "images entry not found"
    );
    assert!(
        edited.contains("\npatches:\n- path:"),
        "commented patch not found:\n{k}"
    );
    std::fs::write(&kfile, edited).unwrap();
    let (out, objects) = kustomize(&kubectl, &copy);
    assert!(
        out.stderr.is_empty(),
        "with the privileged patch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = images_of(&objects);
    assert_eq!(images.len(), 2, "{images:?}");
    assert!(
        images
            .iter()
            .all(|i| i.starts_with("registry.example.com/team/petrel-gateway:")),
        "{images:?}"
    );
    let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let node_role = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "node-role")
        .unwrap();
    assert_eq!(node_role["securityContext"]["privileged"], true);

    // The monitoring overlay renders too, without a warning, with the objects it promises;
    // its Service selects the DaemonSet's pods and names the two admin ports it exposes.
    let (out, objects) = kustomize(&kubectl, &repo().join("deploy/monitoring"));
    assert!(
        out.stderr.is_empty(),
        "deploy/monitoring: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in ["Service", "ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    let (_, base) = kustomize(&kubectl, &repo().join("deploy"));
    let ds = base.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let svc = objects.iter().find(|o| o["kind"] == "Service").unwrap();
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &ds["spec"]["template"]["metadata"]["labels"][k], v,
            "selector {k}"
        );
    }
    let container_ports: Vec<u64> = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    for p in svc["spec"]["ports"].as_array().unwrap() {
        assert!(
            container_ports.contains(&p["targetPort"].as_u64().unwrap()),
            "{p} is no container port of the DaemonSet: {container_ports:?}"
        );
    }
    let cm = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(cm["data"]["petrel.json"].as_str().unwrap()).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() > 10);
}

// ---- the gateway's config file -----------------------------------------------------------------

#[test]
fn gateway_config_file_is_accepted_by_the_real_binary() {
    let tmp = short_tmp();
    let file = deploy("gateway.toml");
    // Every value of the file applies except the host paths and addresses a test cannot use,
    // which flags override (flags beat the file).
    let sock = tmp.path().join("egress.sock");
    let hub = Hub::start(
        &tmp.path().join("state"),
        &[
            "--config",
            file.to_str().unwrap(),
            "--egress-uds",
            sock.to_str().unwrap(),
        ],
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "hub /readyz", || {
        (http_status(hub.admin, "/readyz").ok() == Some(200)).then_some(())
    })
    .unwrap();
    assert_eq!(http_status(hub.admin, "/healthz").unwrap(), 200);
    // [egress] uds-mode = "0600" from the file.
    let mode = wait_until(Duration::from_secs(5), "the egress socket", || {
        std::fs::symlink_metadata(&sock).ok()
    })
    .unwrap()
    .permissions()
    .mode();
    assert_eq!(mode & 0o777, 0o600, "egress socket mode {mode:o}");
    assert!(hub
        .metrics()
        .unwrap()
        .contains("petrel_hub_agents_connected"));
}

// ---- the edge install script -------------------------------------------------------------------

/// One entry of a directory tree: type and mode, content digest or link target, inode, mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    content: String,
    ino: u64,
    mtime_ns: i128,
}

fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let (kind, content) = if md.file_type().is_symlink() {
                (
                    'l',
                    std::fs::read_link(&path)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                )
            } else if md.is_dir() {
                ('d', String::new())
            } else {
                (
                    'f',
                    hex::encode(Sha256::digest(std::fs::read(&path).unwrap())),
                )
            };
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    content,
                    ino: md.ino(),
                    mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
                },
            );
            if md.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

fn install_sh(args: &[&str]) -> Output {
    let mut c = Command::new("bash");
    c.arg(deploy("edge/install.sh"))
        .args(args)
        .env_remove("PETREL_JOIN_TOKEN")
        .env_remove("PETREL_CA_SHA256")
        .env_remove("PETREL_AGENT_CONFIG");
    run(c, Duration::from_secs(60)).unwrap()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn enrolment_attempts(hub: &Hub) -> f64 {
    hub.metrics()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("petrel_hub_enrolments_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn enrolled_ok(hub: &Hub) -> f64 {
    metric(
        &hub.metrics().unwrap(),
        "petrel_hub_enrolments_total{outcome=\"ok\"}",
    )
}

#[test]
fn edge_install_is_idempotent_and_uninstall_leaves_nothing() {
    let tmp = short_tmp();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let agent_bin = bin("petrel-edge-agent").unwrap();
    let agent_bin = agent_bin.to_str().unwrap();
    let server = hub.server();
    let (token, fp) = hub.token("edge-a1", &[]).unwrap();
    let base = |root: &Path, token: &str, node: &str| -> Vec<String> {
        [
            "--binary",
            agent_bin,
            "--server",
            &server,
            "--token",
            token,
            "--ca-sha256",
            &fp,
            "--node-name",
            node,
            "--root",
            root.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // Refusals before anything is written: bad arguments exit 64, a wrong binary or a refused
    // join exit 1, and a refused join leaves the root as it was (empty).
    let bad_root = tmp.path().join("bad-root");
    let out = install_sh(&[
        "--binary",
        agent_bin,
        "--server",
        &server,
        "--root",
        bad_root.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
    let out = install_sh(&args(&base(&bad_root, &token, "Edge_A1")));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let mut wrong_bin = base(&bad_root, &token, "edge-a1");
    wrong_bin[1] = bin("petrel-gateway").unwrap().display().to_string();
    let out = install_sh(&args(&wrong_bin));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not petrel-edge-agent"),
        "{}",
        text(&out)
    );
    let out = install_sh(&args(&base(
        &bad_root,
        "abcdef.0123456789abcdef",
        "edge-a1",
    )));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not valid"),
        "{}",
        text(&out)
    );
    assert!(
        snapshot(&bad_root).is_empty(),
        "a refused join left files: {:?}",
        snapshot(&bad_root).keys()
    );
    let attempts_before = enrolment_attempts(&hub);

    // Install.
    let root = tmp.path().join("root");
    let install = base(&root, &token, "edge-a1");
    let out = install_sh(&args(&install));
    assert!(out.status.success(), "{}", text(&out));
    println!("first install:\n{}", text(&out));
    assert_eq!(enrolled_ok(&hub), 1.0);
    assert_eq!(enrolment_attempts(&hub), attempts_before + 1.0);

    let first = snapshot(&root);
    let expect: &[(&str, char, u32)] = &[
        ("etc", 'd', 0o755),
        ("etc/petrel", 'd', 0o755),
        ("etc/petrel/agent.toml", 'f', 0o644),
        ("etc/systemd", 'd', 0o755),
        ("etc/systemd/system", 'd', 0o755),
        ("etc/systemd/system/petrel-edge-agent.service", 'f', 0o644),
        ("etc/systemd/system/multi-user.target.wants", 'd', 0o755),
        (
            "etc/systemd/system/multi-user.target.wants/petrel-edge-agent.service",
            'l',
            0o777,
        ),
        ("usr", 'd', 0o755),
        ("usr/local", 'd', 0o755),
        ("usr/local/bin", 'd', 0o755),
        ("usr/local/bin/petrel-edge-agent", 'f', 0o755),
        ("var", 'd', 0o755),
        ("var/lib", 'd', 0o755),
        ("var/lib/petrel", 'd', 0o755),
        ("var/lib/petrel/agent", 'd', 0o700),
        ("var/lib/petrel/agent/ca.crt", 'f', 0o600),
        ("var/lib/petrel/agent/endpoints.json", 'f', 0o600),
        ("var/lib/petrel/agent/node.pem", 'f', 0o600),
    ];
    let got: Vec<(String, char, u32)> = first
        .iter()
        .map(|(p, e)| (p.clone(), e.kind, e.mode))
        .collect();
    let mut want: Vec<(String, char, u32)> = expect
        .iter()
        .map(|(p, k, m)| (p.to_string(), *k, *m))
        .collect();
    want.sort();
    assert_eq!(got, want, "installed tree differs");
    let read = |rel: &str| std::fs::read(root.join(rel)).unwrap();
    assert_eq!(
        read("usr/local/bin/petrel-edge-agent"),
        std::fs::read(agent_bin).unwrap()
    );
    let unit = std::fs::read_to_string(deploy("edge/petrel-edge-agent.service")).unwrap();
    assert_eq!(
        read("etc/systemd/system/petrel-edge-agent.service"),
        unit.as_bytes()
    );
    assert_eq!(
        first["etc/systemd/system/multi-user.target.wants/petrel-edge-agent.service"].content,
        "/etc/systemd/system/petrel-edge-agent.service"
    );
    assert_eq!(
        String::from_utf8(read("etc/petrel/agent.toml")).unwrap(),
        format!(
            "# Written by install.sh (Petrel edge agent); rerun it to change this file.\n\
             # Keys are the long flags of `petrel-edge-agent run` (see its --help).\n\
             node-name = \"edge-a1\"\nservers = [\"{server}\"]\n\
             state-dir = \"/var/lib/petrel/agent\"\nadmin-addr = \"127.0.0.1:9471\"\n"
        )
    );
    check_unit(&unit);

    // Idempotent: the same command again changes nothing and joins nothing. `join` rewrites
    // endpoints.json with the same content (so the identity directory's mtime moves); every
    // file the script itself writes keeps its inode and mtime.
    let out = install_sh(&args(&install));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for what in [
        "the binary unchanged",
        "the config unchanged",
        "the unit unchanged",
    ] {
        assert!(stdout.contains(what), "{what}: {}", text(&out));
    }
    assert!(stdout.contains("already enrolled"), "{}", text(&out));
    assert!(!stdout.contains("installed "), "{}", text(&out));
    assert_eq!(enrolment_attempts(&hub), attempts_before + 1.0);
    let second = snapshot(&root);
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        second.keys().collect::<Vec<_>>()
    );
    for (path, a) in &first {
        let b = &second[path];
        if path.starts_with("var/lib/petrel/agent") {
            assert_eq!(
                (a.kind, a.mode, &a.content),
                (b.kind, b.mode, &b.content),
                "{path} changed"
            );
        } else {
            assert_eq!(a, b, "{path} changed");
        }
    }

    // The same device under another node name is refused, and nothing changes.
    let (token2, _) = hub.token("edge-a2", &[]).unwrap();
    let out = install_sh(&args(&base(&root, &token2, "edge-a2")));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--rejoin"),
        "{}",
        text(&out)
    );
    assert_eq!(enrolment_attempts(&hub), attempts_before + 1.0);
    let third = snapshot(&root);
    for (path, a) in &first {
        assert_eq!(
            (a.kind, a.mode, &a.content),
            (third[path].kind, third[path].mode, &third[path].content),
            "{path} changed by a refused install"
        );
    }

    // What was installed works: the installed binary with the installed config (which names
    // the hub) and identity connects. Only the state directory is redirected into the root;
    // --hooks none because the test has no Flannel device and is not root.
    let admin = format!("127.0.0.1:{}", free_port());
    let mut run_agent = Command::new(root.join("usr/local/bin/petrel-edge-agent"));
    run_agent
        .arg("--config")
        .arg(root.join("etc/petrel/agent.toml"))
        .arg("run")
        .arg("--state-dir")
        .arg(root.join("var/lib/petrel/agent"))
        .args(["--hooks", "none", "--admin-addr", &admin]);
    let mut agent = Proc::spawn("installed-agent", run_agent).unwrap();
    wait_until(Duration::from_secs(10), "edge-a1 connected", || {
        hub.agent("edge-a1")
    })
    .unwrap();
    agent.kill();

    // Uninstall keeps the identity; --purge removes it; the root is empty; both are idempotent.
    let root_arg = root.to_str().unwrap();
    let out = install_sh(&["--uninstall", "--root", root_arg]);
    assert!(out.status.success(), "{}", text(&out));
    println!("uninstall:\n{}", text(&out));
    let left: Vec<String> = snapshot(&root).into_keys().collect();
    assert_eq!(
        left,
        [
            "var",
            "var/lib",
            "var/lib/petrel",
            "var/lib/petrel/agent",
            "var/lib/petrel/agent/ca.crt",
            "var/lib/petrel/agent/endpoints.json",
            "var/lib/petrel/agent/node.pem",
        ]
    );
    let out = install_sh(&["--uninstall", "--purge", "--root", root_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        snapshot(&root).is_empty(),
        "left behind: {:?}",
        snapshot(&root).keys()
    );
    let out = install_sh(&["--uninstall", "--purge", "--root", root_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(snapshot(&root).is_empty());
}

/// An enrolled device is upgraded with `--binary` alone: no token, no `--server`; every setting
/// of the earlier install (servers, node name, hooks, admin address) is kept and the script says
/// so; a new `--server` list replaces the old one and names what it dropped; a node name other
/// than the enrolled one is refused without touching anything. Nothing dials the hub.
#[test]
fn edge_install_upgrades_an_enrolled_device_without_a_token_and_keeps_its_servers() {
    let tmp = short_tmp();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let agent_bin = bin("petrel-edge-agent").unwrap();
    let agent_s = agent_bin.to_str().unwrap();
    let server = hub.server();
    let spare = "hub-b.example.com:7443";
    let (token, fp) = hub.token("edge-a1", &[]).unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap();
    let out = install_sh(&[
        "--binary",
        agent_s,
        "--server",
        &server,
        "--server",
        spare,
        "--token",
        &token,
        "--ca-sha256",
        &fp,
        "--node-name",
        "edge-a1",
        "--hooks",
        "none",
        "--admin-addr",
        "127.0.0.1:19471",
        "--root",
        root_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let config = || std::fs::read_to_string(root.join("etc/petrel/agent.toml")).unwrap();
    let installed = config();
    assert!(
        installed.contains(&format!("servers = [\"{server}\", \"{spare}\"]"))
            && installed.contains("hooks = \"none\"")
            && installed.contains("admin-addr = \"127.0.0.1:19471\""),
        "{installed}"
    );
    let attempts = enrolment_attempts(&hub);

    // A new build of the agent (any different bytes will do: an ELF runs with a trailer).
    let new_bin = tmp.path().join("petrel-edge-agent");
    let mut bytes = std::fs::read(&agent_bin).unwrap();
    bytes.extend_from_slice(b"petrel-upgrade-test");
    std::fs::write(&new_bin, &bytes).unwrap();
    std::fs::set_permissions(&new_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let new_s = new_bin.to_str().unwrap();

    // Upgrade: the binary alone.
    let out = install_sh(&["--binary", new_s, "--root", root_s]);
    assert!(
        out.status.success(),
        "upgrade without a token: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for what in [
        "upgrading an enrolled device",
        &format!("servers: keeping the configured {server} {spare}"),
        "node name: keeping the configured edge-a1",
        "hooks: keeping the configured none",
        "installed the binary",
        "the config unchanged",
    ] {
        assert!(stdout.contains(what), "{what:?} missing: {}", text(&out));
    }
    assert_eq!(config(), installed, "the upgrade rewrote the config");
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/petrel-edge-agent")).unwrap(),
        bytes
    );
    assert_eq!(
        enrolment_attempts(&hub),
        attempts,
        "the upgrade dialled the hub"
    );

    // A new server list replaces the old one, and the script names what it drops.
    let out = install_sh(&["--binary", new_s, "--server", &server, "--root", root_s]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("dropping the configured {spare}")),
        "{}",
        text(&out)
    );
    let now = config();
    assert!(
        now.contains(&format!("servers = [\"{server}\"]\n")) && now.contains("hooks = \"none\""),
        "{now}"
    );

    // Another node name needs a token and --rejoin: refused, nothing changes.
    let before = snapshot(&root);
    let out = install_sh(&[
        "--binary",
        new_s,
        "--node-name",
        "edge-a2",
        "--root",
        root_s,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--rejoin"),
        "{}",
        text(&out)
    );
    let after = snapshot(&root);
    for (path, a) in &before {
        assert_eq!(
            (a.kind, a.mode, &a.content),
            (after[path].kind, after[path].mode, &after[path].content),
            "{path} changed by a refused upgrade"
        );
    }
    assert_eq!(enrolment_attempts(&hub), attempts);

    // A device that is not enrolled still needs the token.
    let fresh = tmp.path().join("fresh");
    let out = install_sh(&[
        "--binary",
        agent_s,
        "--server",
        &server,
        "--root",
        fresh.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
}

/// The hardening the unit promises (see its comments and docs/operations.md).
fn check_unit(unit: &str) {
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    for (key, want) in [
        (
            "ExecStart",
            "/usr/local/bin/petrel-edge-agent --config /etc/petrel/agent.toml run",
        ),
        ("Restart", "always"),
        ("RestartPreventExitStatus", "64"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "petrel/agent"),
        ("StateDirectoryMode", "0700"),
        ("RuntimeDirectory", "petrel"),
        (
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_NETLINK AF_UNIX",
        ),
        ("SystemCallArchitectures", "native"),
        ("DeviceAllow", "/dev/net/tun rw"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(values(key), [want], "{key}");
    }
    let allowed = ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"];
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let caps: Vec<String> = values(key)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect();
        assert!(
            caps.contains(&"CAP_NET_ADMIN".to_string())
                && caps.iter().all(|c| allowed.contains(&c.as_str())),
            "{key}: {caps:?}"
        );
    }
    assert!(values("User").is_empty() || values("User") == ["root"]);
    assert!(
        values("PrivateDevices").is_empty(),
        "would hide /dev/net/tun"
    );
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        println!("SKIPPED: systemd-analyze is not installed (apt package `systemd`)");
        return;
    };
    let tmp = short_tmp();
    // verify checks that ExecStart's binary exists: point it at the built agent, nothing else
    // changes. The file keeps the unit's name (verify takes the unit name from it).
    let unit = std::fs::read_to_string(deploy("edge/petrel-edge-agent.service")).unwrap();
    let exec = "ExecStart=/usr/local/bin/petrel-edge-agent ";
    assert_eq!(unit.matches(exec).count(), 1);
    let agent = bin("petrel-edge-agent").unwrap();
    let copy = tmp.path().join("petrel-edge-agent.service");
    std::fs::write(
        &copy,
        unit.replace(exec, &format!("ExecStart={} ", agent.display())),
    )
    .unwrap();
    let mut c = Command::new(&analyze);
    c.arg("verify").arg(&copy);
    let out = run(c, Duration::from_secs(60)).unwrap();
    println!("systemd-analyze verify:\n{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    // verify exits 0 on unknown keys and bad values ("ignoring"): any line about the unit
    // file is a mistake in it.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("petrel-edge-agent.service"))
        .collect();
    assert!(about_unit.is_empty(), "{}", about_unit.join("\n"));

    // The exposure score, where this systemd can rate a unit file offline (v250+).
    let mut c = Command::new(&analyze);
    c.args(["security", "--offline=true", "--no-pager"])
        .arg(&copy);
    let out = run(c, Duration::from_secs(60)).unwrap();
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    match all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.rsplit(": ").next())
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
    {
        Some(score) => {
            println!("systemd-analyze security: exposure {score} (0 = locked down, 10 = unsafe)");
            assert!(score <= 3.0, "exposure {score} > 3.0:\n{all}");
        }
        None => println!(
            "systemd-analyze security --offline is not supported here; exposure not checked:\n{}",
            text(&out)
        ),
    }
}

#[test]
fn install_script_is_shellcheck_clean() {
    let Some(shellcheck) = which("shellcheck") else {
        println!("SKIPPED: shellcheck is not installed (apt package `shellcheck`)");
        return;
    };
    let mut c = Command::new(shellcheck);
    c.arg(deploy("edge/install.sh"));
    let out = run(c, Duration::from_secs(60)).unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

// ---- the images -----------------------------------------------------------------------------

/// A private copy of a built binary (another build may replace target/debug's meanwhile).
fn copy_binary(binary: &str, dir: &Path) -> PathBuf {
    let copy = dir.join(binary);
    if !copy.exists() {
        std::fs::copy(bin(binary).unwrap(), &copy).unwrap();
    }
    copy
}

fn build_image(binary: &Path, user: &str, out: &Path) -> Output {
    let name = binary.file_name().unwrap().to_str().unwrap();
    let mut c = Command::new("bash");
    c.arg(deploy("image/build-oci.sh"))
        .arg("--binary")
        .arg(binary)
        .args([
            "--name",
            &format!("localhost/petrel/{name}"),
            "--tag",
            env!("CARGO_PKG_VERSION"),
            "--user",
            user,
            "--revision",
            "0123abcd",
        ])
        .arg("--out")
        .arg(out);
    run(c, Duration::from_secs(300)).unwrap()
}

/// `deploy/image/build-oci.sh` (what `make image` runs on the release binaries) builds an OCI
/// archive per binary, byte for byte the same twice, with the name containerd imports it under,
/// OCI labels (version, revision), the gateway as a non-root user and the agent as root; and
/// `deploy/image/smoke.sh` runs both from their own unpacked root file systems: `--version`, a
/// hub from the gateway image, an agent from the agent image that enrols and connects.
#[test]
fn oci_images_build_reproducibly_and_run_from_their_own_root_filesystems() {
    if !petrel_e2e::lab::is_root() {
        println!("SKIPPED: the image smoke test chroots (needs root)");
        return;
    }
    let tmp = short_tmp();
    let gw = tmp.path().join("gw.oci.tar");
    let agent = tmp.path().join("agent.oci.tar");
    for (binary, user, out) in [
        ("petrel-gateway", "65532:65532", &gw),
        ("petrel-edge-agent", "0:0", &agent),
    ] {
        let o = build_image(&copy_binary(binary, tmp.path()), user, out);
        assert!(o.status.success(), "{binary}: {}", text(&o));
        println!("{}", String::from_utf8_lossy(&o.stdout).trim());
    }
    // Reproducible.
    let again = tmp.path().join("gw2.oci.tar");
    let o = build_image(
        &copy_binary("petrel-gateway", tmp.path()),
        "65532:65532",
        &again,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        Sha256::digest(std::fs::read(&gw).unwrap()),
        Sha256::digest(std::fs::read(&again).unwrap()),
        "two builds of the same binary differ"
    );
    // What a registry and a runtime read.
    let x = tmp.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let mut c = Command::new("tar");
    c.arg("-xf").arg(&gw).arg("-C").arg(&x);
    assert!(run(c, Duration::from_secs(60)).unwrap().status.success());
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let blob = |d: &serde_json::Value| {
        x.join("blobs/sha256")
            .join(d.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let index = json(&x.join("index.json"));
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        format!(
            "localhost/petrel/petrel-gateway:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        env!("CARGO_PKG_VERSION")
    );
    let manifest = json(&blob(&m["digest"]));
    let config = json(&blob(&manifest["config"]["digest"]));
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/petrel-gateway"])
    );
    let labels = &config["config"]["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.revision"], "0123abcd");
    let layer = blob(&manifest["layers"][0]["digest"]);
    assert_eq!(
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(std::fs::read(&layer).unwrap()))
        ),
        manifest["layers"][0]["digest"].as_str().unwrap()
    );
    // Run them.
    let mut c = Command::new("bash");
    c.arg(deploy("image/smoke.sh")).arg(&gw).arg(&agent);
    let o = run(c, Duration::from_secs(120)).unwrap();
    println!("{}", text(&o));
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("smoke.sh: OK"));
}

#[test]
fn image_scripts_are_shellcheck_clean() {
    let Some(shellcheck) = which("shellcheck") else {
        println!("SKIPPED: shellcheck is not installed (apt package `shellcheck`)");
        return;
    };
    for script in ["image/build-oci.sh", "image/smoke.sh"] {
        let mut c = Command::new(&shellcheck);
        c.arg(deploy(script));
        let out = run(c, Duration::from_secs(60)).unwrap();
        assert!(out.status.success(), "{script}: {}", text(&out));
    }
}

/// The alert rules are valid PromQL (`promtool check rules`) and fire when they should, and only
/// then (`promtool test rules` with deploy/monitoring/rules-test.yaml), where promtool is
/// available: on PATH or at `PETREL_PROMTOOL` (`.ci/run` unpacks it from Debian's `prometheus`
/// package).
#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = std::env::var_os("PETREL_PROMTOOL")
        .map(PathBuf::from)
        .or_else(|| which("promtool"))
    else {
        println!("SKIPPED: no promtool (PATH or PETREL_PROMTOOL; Debian package `prometheus`)");
        return;
    };
    let tmp = short_tmp();
    // The PrometheusRule's spec is a plain rules file, indented by two.
    let rule = std::fs::read_to_string(deploy("monitoring/prometheusrule.yaml")).unwrap();
    let spec: Vec<&str> = rule.lines().skip_while(|l| *l != "spec:").skip(1).collect();
    assert!(!spec.is_empty() && spec.iter().all(|l| l.is_empty() || l.starts_with("  ")));
    let rules: String = spec
        .iter()
        .map(|l| format!("{}\n", l.get(2..).unwrap_or("")))
        .collect();
    std::fs::write(tmp.path().join("rules.yaml"), rules).unwrap();
    std::fs::copy(
        deploy("monitoring/rules-test.yaml"),
        tmp.path().join("rules-test.yaml"),
    )
    .unwrap();
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "rules-test.yaml"],
    ] {
        let mut c = Command::new(&promtool);
        c.args(args).current_dir(tmp.path());
        let out = run(c, Duration::from_secs(60)).unwrap();
        println!("promtool {}:\n{}", args.join(" "), text(&out));
        assert!(
            out.status.success(),
            "promtool {}: {}",
            args.join(" "),
            text(&out)
        );
    }
}
