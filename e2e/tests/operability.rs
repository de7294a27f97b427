//! What an operator sees, checked against the real binaries on loopback: readiness that reflects
//! the data plane, the metrics each binary exports (and that every name the monitoring overlay
//! queries is one of them), build and process metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use petrel_e2e::procs::{bin, http_get, join, run, wait_until, Agent, Hub};

fn enrolled(hub: &Hub, node: &str, dir: &Path) -> PathBuf {
    let (token, fp) = hub.token(node, &[]).unwrap();
    let state = dir.join(node);
    let out = join(&hub.server(), node, &token, &fp, &state).unwrap();
    assert!(out.success, "join {node}: {}\n{}", out.stdout, out.stderr);
    state
}

/// The body of a GET, whatever its status.
fn get_any(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// An agent whose data plane cannot open (here: its Flannel device does not exist, as when
/// flanneld is not running) holds a tunnel but is not ready, and `/readyz`, `/status`, the
/// status table and the metrics say why. Only the device lookup runs: nothing on the host
/// changes.
#[test]
fn an_agent_whose_data_plane_failed_is_not_ready_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let state = enrolled(&hub, "edge-a1", tmp.path());
    let agent = Agent::start(
        "agent",
        &state,
        &[hub.server()],
        &["--hooks", "auto", "--flannel-dev", "ptmissing0"],
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "edge-a1 connected", || {
        hub.agent("edge-a1")
    })
    .unwrap();
    let (code, body) = wait_until(Duration::from_secs(5), "a data plane error", || {
        let (code, body) = get_any(agent.admin, "/readyz");
        body.contains("ptmissing0").then_some((code, body))
    })
    .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("data plane not ready") && body.contains("ptmissing0 not found"),
        "{body}"
    );
    // Still connected: readiness is about the data plane, not the tunnel alone.
    let st = agent.status().unwrap();
    assert_eq!(st["links"][0]["state"], "connected", "{st}");
    assert_eq!(st["dataplane"]["ready"], false, "{st}");
    assert!(
        st["dataplane"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("ptmissing0 not found"),
        "{st}"
    );
    let mut cmd = Command::new(bin("petrel-edge-agent").unwrap());
    cmd.args(["status", "--admin-addr", &agent.admin.to_string()]);
    let out = run(cmd, Duration::from_secs(10)).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("NOT READY") && table.contains("ptmissing0 not found"),
        "{table}"
    );
    let m = http_get(agent.admin, "/metrics").unwrap();
    assert!(
        m.contains("petrel_agent_dataplane_ready{hooks=\"none\"} 0"),
        "{m}"
    );

    // The same agent without a data plane (--hooks none) is ready once connected.
    drop(agent);
    let agent = Agent::start("agent-none", &state, &[hub.server()], &["--hooks", "none"]).unwrap();
    wait_until(Duration::from_secs(10), "ready with --hooks none", || {
        agent.ready().then_some(())
    })
    .unwrap();
    assert!(agent.status().unwrap()["dataplane"].is_null());
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Metric names (`petrel_*`, `process_*`) that a file mentions.
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (rest.starts_with("petrel_") || rest.starts_with("process_")) {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
                .count();
            out.insert(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `exposition` exports `name`: a sample of that name, or (a counter or histogram not
/// incremented yet) its family declared by `# TYPE`.
fn exports(exposition: &str, name: &str) -> bool {
    let sample = exposition.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|r| r.starts_with(['{', ' ']))
    });
    let family = ["_total", "_bucket", "_sum", "_count", "_info"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .chain(std::iter::once(name))
        .any(|f| {
            exposition.lines().any(|l| {
                l.strip_prefix("# TYPE ")
                    .and_then(|r| r.split_whitespace().next())
                    == Some(f)
            })
        });
    sample || family
}

/// In the lab with the real data plane (hub on gw-1, node roles, agents, a ping through the
/// hub): the node role serves /readyz (ready once its routes are applied), /status and
/// /metrics on its admin port; the three kinds of process export build_info and process
/// metrics; the agent's data-plane and tunnel families carry samples; and every metric name
/// that deploy/monitoring/ (alerts and dashboard) queries is exported by one of them.
#[test]
fn every_metric_the_monitoring_overlay_queries_is_exported() {
    use petrel_e2e::lab::{self, in_netns, Lab, LabSpec};
    use petrel_e2e::lab_petrel::{PetrelLab, AGENT_ADMIN, HUB_ADMIN};
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("egress.sock");
    let petrel = PetrelLab::start_with(
        &lab,
        "auto",
        tmp.path(),
        &["--egress-uds", sock.to_str().unwrap()],
    )
    .unwrap();
    let pod_ip = lab.node("edge-a1").pod_ip;
    assert!(
        lab.ping("cloud-1", pod_ip),
        "cloud-1 -> edge-a1 through the hub"
    );
    // One proxied connection, API server -> hub -> agent -> a pod on edge-a1, for the egress
    // and proxy families.
    let listener = in_netns(
        &lab.ns("edge-a1-pod").unwrap(),
        Duration::from_secs(5),
        move || Ok(std::net::TcpListener::bind((pod_ip, 8080))?),
    )
    .unwrap();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut c, _) = listener.accept().unwrap();
        c.write_all(b"hello through the tunnel\n").unwrap();
    });
    let (code, line, mut stream) =
        petrel_e2e::apiserver::uds_connect(&sock, &format!("{pod_ip}:8080")).unwrap();
    assert_eq!(code, 200, "{line}");
    let mut got = String::new();
    std::io::Read::read_to_string(&mut stream, &mut got).unwrap();
    assert_eq!(got, "hello through the tunnel\n");
    drop(stream);
    server.join().unwrap();
    let get = |node: &str, addr: &str, path: &str| -> (u16, String) {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let path = path.to_string();
        in_netns(&lab.ns(node).unwrap(), Duration::from_secs(10), move || {
            Ok(get_any(addr, &path))
        })
        .unwrap()
    };
    let node_admin = "127.0.0.1:9472";
    let (code, body) = wait_until(Duration::from_secs(10), "node role ready", || {
        let r = get("cloud-1", node_admin, "/readyz");
        (r.0 == 200).then_some(r)
    })
    .unwrap();
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (_, st) = get("cloud-1", node_admin, "/status");
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["node"], "cloud-1", "{st}");
    assert_eq!(st["peers"], 3, "{st}");
    assert_eq!(st["relay"], "192.168.0.12", "{st}");
    // `petrel-gateway status` renders a node role's admin port too.
    let gw = bin("petrel-gateway").unwrap();
    let out = lab
        .exec(
            "cloud-1",
            &[gw.to_str().unwrap(), "status", "--admin-addr", node_admin],
        )
        .unwrap();
    assert!(
        out.stdout.contains("node role on cloud-1")
            && out.stdout.contains("): ready")
            && out
                .stdout
                .contains("relay 192.168.0.12, 3 public-site pod CIDRs"),
        "{}",
        out.stdout
    );

    // The hub counts a proxied connection's bytes when it ends.
    let hub = wait_until(Duration::from_secs(5), "egress bytes counted", || {
        let m = get(&lab.gateway().name, HUB_ADMIN, "/metrics").1;
        m.contains("petrel_hub_egress_bytes_total{").then_some(m)
    })
    .unwrap();
    let node = get("cloud-1", node_admin, "/metrics").1;
    let agent = get("edge-a1", AGENT_ADMIN, "/metrics").1;
    for (what, text, binary) in [
        ("hub", &hub, "petrel-gateway"),
        ("node role", &node, "petrel-gateway"),
        ("agent", &agent, "petrel-edge-agent"),
    ] {
        assert!(
            text.contains(&format!(
                "petrel_build_info{{binary=\"{binary}\",version=\"{}\"",
                env!("CARGO_PKG_VERSION")
            )),
            "{what}: no build_info:\n{text}"
        );
        for family in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_cpu_seconds_total",
            "process_start_time_seconds",
        ] {
            assert!(exports(text, family), "{what}: no {family}");
        }
        assert!(
            text.ends_with("# EOF\n"),
            "{what}: exposition does not end with # EOF"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{what}");
    }
    assert!(
        node.contains("petrel_node_role_ready{hooks=\"fast\"} 1")
            || node.contains("petrel_node_role_ready{hooks=\"portable\"} 1"),
        "{node}"
    );
    assert!(hub.contains("petrel_hub_active 1"), "{hub}");
    assert!(hub.contains("petrel_hub_agents_expected 3"), "{hub}");
    // The agent's live families carry samples once frames flowed.
    for sample in [
        "petrel_agent_dataplane_frames_total{direction=\"to_hub\"}",
        "petrel_agent_dataplane_frames_total{direction=\"from_hub\"}",
        "petrel_agent_dataplane_bytes_total{direction=\"from_hub\"}",
        "petrel_agent_tunnel_rtt_seconds{",
        "petrel_agent_tunnel_lost_packets_total{",
        "petrel_agent_route_mtu_bytes{site=\"site-b\"} 1380",
        "petrel_agent_certificate_expiry_seconds ",
    ] {
        assert!(agent.contains(sample), "agent: no {sample}:\n{agent}");
    }
    let value = |text: &str, prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(
        value(
            &agent,
            "petrel_agent_dataplane_frames_total{direction=\"from_hub\"}"
        ) >= 1.0,
        "{agent}"
    );
    let expiry = value(&agent, "petrel_agent_certificate_expiry_seconds");
    assert!(
        expiry > 29.0 * 86400.0 && expiry <= 30.0 * 86400.0,
        "certificate expiry {expiry}"
    );

    let all = [hub.as_str(), node.as_str(), agent.as_str()];
    let monitoring = repo().join("deploy/monitoring");
    let mut checked = 0;
    let mut missing = Vec::new();
    for file in ["prometheusrule.yaml", "dashboard.json"] {
        let text = std::fs::read_to_string(monitoring.join(file)).unwrap();
        let names = names_in(&text);
        assert!(names.len() > 5, "{file}: {names:?}");
        for n in names {
            checked += 1;
            if !all.iter().any(|e| exports(e, &n)) {
                missing.push(format!("{file}: {n}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but exported by no binary:\n{}",
        missing.join("\n")
    );
    println!("{checked} metric names of deploy/monitoring are exported");
    drop(petrel);
}

#[test]
fn names_in_finds_metric_names_only() {
    let names = names_in(
        "expr: sum(rate(petrel_hub_x_total[5m])) / process_open_fds{a=\"b\"} and mypetrel_y",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["petrel_hub_x_total", "process_open_fds"]
    );
    assert!(exports(
        "# TYPE petrel_a counter\n# EOF\n",
        "petrel_a_total"
    ));
    assert!(exports("petrel_b{x=\"1\"} 2\n", "petrel_b"));
    assert!(!exports("petrel_bc 2\n", "petrel_b"));
}

/// An agent whose hub does not answer counts the failed attempts by reason.
#[test]
fn an_agent_counts_handshake_failures_by_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let state = enrolled(&hub, "edge-a1", tmp.path());
    drop(hub);
    let silent = format!("127.0.0.1:{}", petrel_e2e::procs::free_port());
    let agent = Agent::start("agent", &state, &[silent], &["--connect-timeout", "1s"]).unwrap();
    let m = wait_until(Duration::from_secs(15), "a no_answer failure", || {
        let m = http_get(agent.admin, "/metrics").ok()?;
        m.contains("petrel_agent_handshake_failures_total{reason=\"no_answer\"}")
            .then_some(m)
    })
    .unwrap();
    assert!(!m.contains("reason=\"other\""), "{m}");
}
