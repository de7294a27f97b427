//! The foundation, end to end with the real binaries on loopback: enrolment and its refusals,
//! the tunnel and its refusals, status, replacement of a reconnecting node, hub restarts, renewal
//! and configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use petrel_e2e::procs::{bin, join, run, wait_until, Agent, Hub};
use petrel_e2e::raw_agent::{hub_ca, session_as};
use petrel_proto::{ControlMessage, GoingAwayReason};
use petrel_transport::pki::{CertificateAuthority, NodeKey};

fn enrolled(hub: &Hub, node: &str, dir: &Path) -> std::path::PathBuf {
    let (token, fp) = hub.token(node, &[]).unwrap();
    let state = dir.join(node);
    let out = join(&hub.server(), node, &token, &fp, &state).unwrap();
    assert!(
        out.success,
        "join {node} failed: {}\n{}",
        out.stdout, out.stderr
    );
    state
}

fn connected_since(hub: &Hub, node: &str) -> Option<u64> {
    hub.agent(node)
        .and_then(|a| a.get("connected_since_unix").and_then(|v| v.as_u64()))
}

#[test]
fn enrol_connect_and_status_show_rtt_within_5s() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let started = Instant::now();
    let state = enrolled(&hub, "edge-a1", tmp.path());
    let agent = Agent::start("agent", &state, &[], &[]).unwrap();
    let row = wait_until(
        Duration::from_secs(5),
        "edge-a1 connected with an RTT",
        || {
            hub.agent("edge-a1")
                .filter(|a| a.get("rtt_ms").and_then(|r| r.as_f64()).is_some())
        },
    )
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5) + Duration::from_secs(2));
    assert_eq!(row["site"], "site-a");
    // The human table shows the same.
    let mut cmd = Command::new(bin("petrel-gateway").unwrap());
    cmd.args(["status", "--admin-addr", &hub.admin.to_string()]);
    let table = String::from_utf8(run(cmd, Duration::from_secs(10)).unwrap().stdout).unwrap();
    assert!(
        table.contains("edge-a1") && table.contains("site-a") && table.contains("ms"),
        "{table}"
    );
    // The agent is ready and reports the hub; its files are private.
    wait_until(Duration::from_secs(5), "agent ready", || {
        agent.ready().then_some(())
    })
    .unwrap();
    let st = agent.status().unwrap();
    assert_eq!(st["links"][0]["state"], "connected");
    assert_eq!(st["links"][0]["hub"], "test-hub");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in ["node.pem", "ca.crt", "endpoints.json"] {
        assert_eq!(
            std::fs::metadata(state.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{f}"
        );
    }
    let mut cmd = Command::new(bin("petrel-edge-agent").unwrap());
    cmd.args(["status", "--admin-addr", &agent.admin.to_string()]);
    let table = String::from_utf8(run(cmd, Duration::from_secs(10)).unwrap().stdout).unwrap();
    assert!(
        table.contains("connected") && table.contains(&hub.server()),
        "{table}"
    );
    assert_eq!(
        petrel_e2e::procs::http_status(hub.admin, "/readyz").unwrap(),
        200
    );
    assert!(hub
        .metrics()
        .unwrap()
        .contains("petrel_hub_agents_connected 1"));
}

#[test]
fn enrolment_refusals_are_clear_store_nothing_and_leave_the_hub_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let state_a = enrolled(&hub, "edge-a1", tmp.path());
    let _agent = Agent::start("agent-a1", &state_a, &[], &[]).unwrap();
    let since = wait_until(Duration::from_secs(5), "edge-a1 connected", || {
        connected_since(&hub, "edge-a1")
    })
    .unwrap();
    let (_, fp) = hub.token("edge-b1", &[]).unwrap();

    let check = |label: &str,
                 token: &str,
                 node: &str,
                 fingerprint: &str,
                 expect_agent: &str,
                 expect_hub: Option<&str>| {
        let dir = tmp.path().join(format!("refused-{label}"));
        let out = join(&hub.server(), node, token, fingerprint, &dir).unwrap();
        assert!(!out.success, "{label}: join should fail: {}", out.stdout);
        assert!(
            out.stderr.contains(expect_agent),
            "{label}: agent said {:?}, expected {:?}",
            out.stderr,
            expect_agent
        );
        assert!(
            !dir.join("node.pem").exists() && !dir.join("ca.crt").exists(),
            "{label}: something was stored"
        );
        if let Some(h) = expect_hub {
            hub.proc.wait_for_log(h, Duration::from_secs(5)).unwrap();
        }
    };
    check(
        "unknown",
        "abcdef.0123456789abcdef",
        "edge-b1",
        &fp,
        "join token is not valid",
        Some("enrolment refused"),
    );
    let (expiring, _) = hub.token("edge-b1", &["--ttl", "1s"]).unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // wall-clock expiry is the point here
    check(
        "expired",
        &expiring,
        "edge-b1",
        &fp,
        "join token expired",
        Some("expired"),
    );
    let (other_node, _) = hub.token("edge-a2", &[]).unwrap();
    check(
        "other-node",
        &other_node,
        "edge-b1",
        &fp,
        "bound to node \"edge-a2\"",
        Some("bound to node"),
    );
    let (t, _) = hub.token("edge-b1", &[]).unwrap();
    let wrong_fp = "00".repeat(32);
    check(
        "wrong-ca",
        &t,
        "edge-b1",
        &wrong_fp,
        "CA fingerprint mismatch",
        None,
    );
    // `token create` refuses such nodes; --force makes the tokens so the hub's refusal is tested.
    let (not_inventory, _) = hub.token("ghost-1", &["--force"]).unwrap();
    check(
        "unknown-node",
        &not_inventory,
        "ghost-1",
        &fp,
        "not in the inventory",
        Some("not in the inventory"),
    );
    let (cloud, _) = hub.token("cloud-1", &["--force"]).unwrap();
    check(
        "cloud-node",
        &cloud,
        "cloud-1",
        &fp,
        "only nodes in public-network sites",
        None,
    );
    // The token t survived the wrong-CA attempt (the hub never saw it) and works once.
    let good = tmp.path().join("good");
    let out = join(&hub.server(), "edge-b1", &t, &fp, &good).unwrap();
    assert!(out.success, "{}", out.stderr);
    check(
        "reused",
        &t,
        "edge-b1",
        &fp,
        "already used",
        Some("already used"),
    );

    // The connected agent never noticed.
    assert_eq!(connected_since(&hub, "edge-a1"), Some(since));
    let metrics = hub.metrics().unwrap();
    for outcome in [
        "invalid_token",
        "expired_token",
        "wrong_node",
        "unknown_node",
        "token_already_used",
    ] {
        assert!(
            metrics.contains(&format!("outcome=\"{outcome}\"")),
            "{outcome} missing in {metrics}"
        );
    }
}

#[test]
fn tunnel_refusals_and_garbage_leave_the_hub_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let state_a = enrolled(&hub, "edge-a1", tmp.path());
    let agent = Agent::start("agent-a1", &state_a, &[], &[]).unwrap();
    let since = wait_until(Duration::from_secs(5), "edge-a1 connected", || {
        connected_since(&hub, "edge-a1")
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = hub_ca(&hub).unwrap();
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);

    // A certificate from a foreign CA fails the handshake.
    let foreign = CertificateAuthority::generate("foreign", now, day).unwrap();
    let key = NodeKey::generate().unwrap();
    let cert = foreign
        .sign_node_csr(&key.csr_der("edge-b1").unwrap(), "edge-b1", now, day)
        .unwrap();
    let err = rt
        .block_on(session_as(
            &hub.server(),
            ca.cert_der(),
            &cert,
            &key,
            "edge-b1",
        ))
        .err()
        .map(|e| format!("{e:#}"))
        .expect("foreign CA must fail");
    assert!(
        err.contains("UnknownCA") || err.contains("certificate"),
        "{err}"
    );
    hub.proc
        .wait_for_log("handshake failed", Duration::from_secs(5))
        .unwrap();

    // An expired certificate from the right CA fails the handshake too.
    let old = now - 10 * day;
    let cert = ca
        .sign_node_csr(&key.csr_der("edge-b1").unwrap(), "edge-b1", old, day)
        .unwrap();
    let err = rt
        .block_on(session_as(
            &hub.server(),
            ca.cert_der(),
            &cert,
            &key,
            "edge-b1",
        ))
        .err()
        .map(|e| format!("{e:#}"))
        .expect("expired must fail");
    assert!(
        err.contains("CertificateExpired") || err.to_lowercase().contains("expired"),
        "{err}"
    );

    // A valid certificate for edge-b1 presenting itself as edge-a2.
    let cert = ca
        .sign_node_csr(&key.csr_der("edge-b1").unwrap(), "edge-b1", now, day)
        .unwrap();
    let reply = rt
        .block_on(session_as(
            &hub.server(),
            ca.cert_der(),
            &cert,
            &key,
            "edge-a2",
        ))
        .map(|s| s.first);
    match reply {
        Ok(ControlMessage::GoingAway(ga)) => {
            assert_eq!(ga.reason, GoingAwayReason::Unauthorized);
            assert!(
                ga.message.contains("presents itself as \"edge-a2\""),
                "{}",
                ga.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    hub.proc
        .wait_for_log("identity_mismatch", Duration::from_secs(5))
        .unwrap();

    // Valid certificates for nodes the hub must not serve: a cloud node and an unknown node.
    for node in ["cloud-1", "ghost-9"] {
        let cert = ca
            .sign_node_csr(&key.csr_der(node).unwrap(), node, now, day)
            .unwrap();
        let reply = rt.block_on(session_as(&hub.server(), ca.cert_der(), &cert, &key, node));
        let err = reply
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_else(|| panic!("{node} must be refused"));
        assert!(
            err.contains("public-network") || err.contains("not in the inventory"),
            "{node}: {err}"
        );
    }

    // Non-QUIC garbage and truncated handshakes on the UDP port.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x1234_5678_u64;
    for i in 0..300 {
        let len = 1 + (i * 37) % 1400;
        let mut buf = vec![0u8; len];
        for b in buf.iter_mut() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (seed >> 33) as u8;
        }
        if i % 3 == 0 {
            // Long-header QUIC v1 Initial, cut short.
            buf.splice(0..0, [0xc3, 0, 0, 0, 1, 8]);
            buf.truncate(40.min(buf.len()));
        }
        sock.send_to(&buf, hub.server()).unwrap();
    }

    // The hub kept serving: the first agent never dropped, a new node enrols and connects.
    let state_b = enrolled(&hub, "edge-b1", tmp.path());
    let _b = Agent::start("agent-b1", &state_b, &[], &[]).unwrap();
    wait_until(Duration::from_secs(5), "edge-b1 connected", || {
        connected_since(&hub, "edge-b1")
    })
    .unwrap();
    assert_eq!(connected_since(&hub, "edge-a1"), Some(since));
    assert!(agent.ready());
    let m = hub.metrics().unwrap();
    assert!(
        m.contains("reason=\"identity_mismatch\"") && m.contains("reason=\"not_admitted\""),
        "{m}"
    );
}

#[test]
fn a_reconnect_of_the_same_node_replaces_the_old_tunnel() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let ca = hub_ca(&hub).unwrap();
    let key = NodeKey::generate().unwrap();
    let now = SystemTime::now();
    let cert = ca
        .sign_node_csr(
            &key.csr_der("edge-a2").unwrap(),
            "edge-a2",
            now,
            Duration::from_secs(3600),
        )
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut first = session_as(&hub.server(), ca.cert_der(), &cert, &key, "edge-a2")
            .await
            .unwrap();
        assert!(matches!(first.first, ControlMessage::Welcome(_)));
        let second = session_as(&hub.server(), ca.cert_der(), &cert, &key, "edge-a2")
            .await
            .unwrap();
        assert!(matches!(second.first, ControlMessage::Welcome(_)));
        // The first session is told it was replaced.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), first.reader.next())
                .await
                .expect("first session told in time")
            {
                Ok(Some(ControlMessage::GoingAway(ga))) => {
                    assert_eq!(ga.reason, GoingAwayReason::Replaced);
                    break;
                }
                Ok(Some(ControlMessage::Ping(_))) => continue,
                other => panic!("expected going-away, got {other:?}"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), first.conn.closed()).await;
        // Exactly one registry entry: the second connection.
        let second_port = second.endpoint.local_addr().unwrap().port();
        let rows: Vec<_> = hub
            .agents()
            .into_iter()
            .filter(|a| a["node"] == "edge-a2")
            .collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(
            rows[0]["remote"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{second_port}")),
            "{rows:?}"
        );
        drop(second);
    });
    assert!(hub
        .metrics()
        .unwrap()
        .contains("petrel_hub_agents_replaced_total 1"));
}

fn all_connected(hub: &Hub, nodes: &[&str]) -> bool {
    let agents = hub.agents();
    nodes.iter().all(|n| agents.iter().any(|a| a["node"] == *n))
}

/// At least `agents` handshakes on `hub` came with a valid address token (QUIC NEW_TOKEN).
fn assert_tokens_taken(hub: &Hub, agents: usize) {
    let text = hub.metrics().unwrap();
    let taken = petrel_e2e::apiserver::metric(
        &text,
        "petrel_hub_tunnel_handshakes_total{outcome=\"address_token\"}",
    );
    assert!(
        taken >= agents as f64,
        "{taken} handshakes validated by an address token, expected {agents}:\n{}",
        text.lines()
            .filter(|l| l.starts_with("petrel_hub_tunnel_handshakes_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The lab's three edge agents.
const THREE_AGENTS: [&str; 3] = ["edge-a1", "edge-a2", "edge-b1"];

/// A hub in `hub_dir` (with `args`) and an enrolled agent on each of `nodes`, all connected.
fn hub_with_agents(dir: &Path, hub_dir: &Path, args: &[&str], nodes: &[&str]) -> (Hub, Vec<Agent>) {
    let hub = Hub::start(hub_dir, args).unwrap();
    let agents = nodes
        .iter()
        .map(|n| Agent::start(n, &enrolled(&hub, n, dir), &[], &[]).unwrap())
        .collect();
    wait_until(Duration::from_secs(10), "all agents connected", || {
        all_connected(&hub, nodes).then_some(())
    })
    .unwrap();
    (hub, agents)
}

#[test]
fn agents_return_within_3s_of_a_restarted_hub_listening() {
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hub");
    let nodes = THREE_AGENTS;
    let (mut hub, _agents) = hub_with_agents(tmp.path(), &hub_dir, &[], &nodes);
    let (port, admin) = (hub.port, hub.admin.port());

    // 1. Graceful: SIGTERM sends going-away with a restart hint; the hub is back after ~1 s.
    hub.proc.signal("TERM");
    let status = hub.proc.wait_exit(Duration::from_secs(15)).unwrap();
    assert!(
        status.success(),
        "graceful stop should exit 0: {status:?}\n{}",
        hub.proc.log()
    );
    assert!(hub.proc.log().contains("telling agents to go away"));
    std::thread::sleep(Duration::from_millis(800)); // the hub is down; that is the scenario
    let hub2 = Hub::start_on(&hub_dir, port, admin, &[]).unwrap();
    let listening = Instant::now();
    wait_until(
        Duration::from_secs(3),
        "all agents back after a graceful restart",
        || all_connected(&hub2, &nodes).then_some(()),
    )
    .unwrap();
    eprintln!(
        "graceful restart: all agents back {:?} after the hub listened",
        listening.elapsed()
    );
    // Each agent came back with an address token its link kept from the hub before, which the
    // restarted hub (same state directory, so the same token key) took as proof of address.
    assert_tokens_taken(&hub2, nodes.len());

    // 2. Crash: kill -9, down for 2 s, back on the same port with the same state.
    let mut hub2 = hub2;
    hub2.proc.signal("KILL");
    hub2.proc.wait_exit(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let hub3 = Hub::start_on(&hub_dir, port, admin, &[]).unwrap();
    let listening = Instant::now();
    wait_until(
        Duration::from_secs(3),
        "all agents back after a crash",
        || all_connected(&hub3, &nodes).then_some(()),
    )
    .unwrap();
    eprintln!(
        "crash restart: all agents back {:?} after the hub listened",
        listening.elapsed()
    );
    assert_tokens_taken(&hub3, nodes.len());
    hub = hub3;
    drop(hub);
}

/// The lab inventory with `extra` more edge nodes in site-a (none of them runs an agent): a
/// fleet large enough for a spread that the test can see.
fn inventory_with_edge_nodes(extra: u8) -> String {
    let mut inv = include_str!("../../gateway/src/default-inventory.toml").to_string();
    for i in 0..extra {
        let n = 10 + u32::from(i);
        inv.push_str(&format!(
            "\n[[nodes]]\nname = \"edge-z{n}\"\nsite = \"site-a\"\naddresses = [\"10.0.1.{n}\"]\n\
             pod_cidrs = [\"10.250.{n}.0/24\"]\nvtep_mac = \"02:fb:00:00:00:{n:02x}\"\n\
             public_ip = \"10.0.1.{n}\"\n"
        ));
    }
    inv
}

/// `retry_in=...` of a log line, as tracing prints a Duration (`812.5ms`, `3.2s`).
fn retry_in(line: &str) -> Option<Duration> {
    let v = line.split("retry_in=").nth(1)?.split_whitespace().next()?;
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
    let num: f64 = num.parse().ok()?;
    let secs = match unit {
        "s" => num,
        "ms" => num / 1e3,
        "µs" => num / 1e6,
        "ns" => num / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

#[test]
fn a_fleet_that_lost_its_hub_comes_back_spread_over_the_hubs_window() {
    // 31 edge nodes at 2 agents a second: every view tells agents to spread over 16 s.
    let tmp = tempfile::tempdir().unwrap();
    let inv = tmp.path().join("inventory.toml");
    std::fs::write(&inv, inventory_with_edge_nodes(27)).unwrap();
    let inv = inv.display().to_string();
    let args = ["--inventory", inv.as_str(), "--reconnect-rate", "2"];
    let spread = Duration::from_secs(16);
    let hub_dir = tmp.path().join("hub");
    let nodes = THREE_AGENTS;
    let (mut hub, agents) = hub_with_agents(tmp.path(), &hub_dir, &args, &nodes);
    let (port, admin) = (hub.port, hub.admin.port());

    // A crash (no goodbye), and the hub back at once.
    hub.proc.signal("KILL");
    hub.proc.wait_exit(Duration::from_secs(5)).unwrap();
    let killed = Instant::now();
    let hub2 = Hub::start_on(&hub_dir, port, admin, &args).unwrap();
    wait_until(
        spread + Duration::from_secs(8),
        "all agents back within the spread",
        || all_connected(&hub2, &nodes).then_some(()),
    )
    .unwrap();
    eprintln!("all agents back {:?} after the kill", killed.elapsed());
    // Each agent waited its own share of the spread, never more; without the spread every
    // first retry is at most the backoff's 100 ms. (All three shares under 0.2 s past the
    // moment each noticed: about one run in 2,500.)
    let waits: Vec<Duration> = agents
        .iter()
        .map(|a| {
            let log = a.proc.log();
            log.lines()
                .rev()
                .filter(|l| l.contains("tunnel to hub lost; reconnecting"))
                .find_map(retry_in)
                .unwrap_or_else(|| panic!("no reconnect logged:\n{log}"))
        })
        .collect();
    eprintln!("first retries: {waits:?}");
    assert!(waits.iter().all(|w| *w <= spread), "{waits:?}");
    assert!(
        waits.iter().any(|w| *w > Duration::from_millis(200)),
        "{waits:?}"
    );
    drop(hub2);
}

#[test]
fn certificates_are_renewed_over_the_live_tunnel() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &["--agent-cert-ttl", "12s"]).unwrap();
    let state = enrolled(&hub, "edge-a1", tmp.path());
    let before = std::fs::read(state.join("node.pem")).unwrap();
    let agent = Agent::start("agent", &state, &[], &[]).unwrap();
    let since = wait_until(Duration::from_secs(5), "connected", || {
        connected_since(&hub, "edge-a1")
    })
    .unwrap();
    agent
        .proc
        .wait_for_log("node certificate renewed", Duration::from_secs(20))
        .unwrap();
    let after = std::fs::read(state.join("node.pem")).unwrap();
    assert_ne!(
        before, after,
        "node.pem must hold the renewed key and certificate"
    );
    // Renewal happens on the live connection: no reconnect.
    assert_eq!(connected_since(&hub, "edge-a1"), Some(since));
    assert!(hub
        .metrics()
        .unwrap()
        .contains("petrel_hub_renewals_total{outcome=\"ok\"}"));
}

#[test]
fn bad_configuration_exits_64_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = bin("petrel-gateway").unwrap();
    let agent = bin("petrel-edge-agent").unwrap();
    let cfg = tmp.path().join("gw.toml");
    std::fs::write(&cfg, "listn = '127.0.0.1:1'\n").unwrap();
    let inv = tmp.path().join("inv.toml");
    std::fs::write(&inv, "[[sites]]\nname = 'a'\nkind = 'publik'\n").unwrap();
    let cases: Vec<(Command, &str)> = vec![
        (
            {
                let mut c = Command::new(&gw);
                c.args(["run", "--listen", "nowhere"]);
                c
            },
            "listen",
        ),
        (
            {
                let mut c = Command::new(&gw);
                c.args(["run", "--keepalive", "forever"]);
                c
            },
            "keepalive",
        ),
        (
            {
                let mut c = Command::new(&gw);
                c.arg("--config").arg(&cfg).arg("run");
                c
            },
            "listn",
        ),
        (
            {
                let mut c = Command::new(&gw);
                c.args(["run", "--admin-addr", "127.0.0.1:0"])
                    .arg("--state-dir")
                    .arg(tmp.path().join("s"))
                    .arg("--inventory")
                    .arg(&inv);
                c
            },
            "publik",
        ),
        (
            {
                let mut c = Command::new(&gw);
                c.args(["run", "--bogus-flag"]);
                c
            },
            "bogus-flag",
        ),
        (
            {
                let mut c = Command::new(&agent);
                c.args([
                    "join",
                    "--server",
                    "127.0.0.1:1",
                    "--token",
                    "a.b",
                    "--ca-sha256",
                    "xyz",
                    "--node-name",
                    "n",
                ]);
                c
            },
            "ca-sha256",
        ),
        (
            {
                let mut c = Command::new(&agent);
                c.args(["run", "--dead-after", "1ms"])
                    .arg("--state-dir")
                    .arg(tmp.path());
                c
            },
            "dead-after",
        ),
        (
            {
                let mut c = Command::new(&agent);
                c.arg("run")
                    .arg("--state-dir")
                    .arg(tmp.path().join("never-joined"));
                c
            },
            "not enrolled",
        ),
    ];
    for (cmd, field) in cases {
        let dbg = format!("{cmd:?}");
        let out = run(cmd, Duration::from_secs(10)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{dbg}: {stderr}");
        assert!(
            stderr.contains(field),
            "{dbg}: stderr does not name {field:?}: {stderr}"
        );
    }
}
