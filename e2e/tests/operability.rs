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
