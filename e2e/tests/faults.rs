//! Fault injection, each test bounded: a lossy, slow WAN; the hub killed mid-transfer; an agent
//! killed and restarted; the hub's state directory read-only or full; node certificates outside
//! their validity (a skewed clock).
//!
//! NAT rebinding mid-transfer is covered by `dataplane_lab.rs` (both hooks: a 40 MiB transfer
//! across a rebinding completes and the agent never reconnects); it is not repeated here.
//!
//! The lab tests run one at a time (a lock): they share the 2 cores and the lab's namespaces
//! (each starts with `Lab::cleanup_stale`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use petrel_e2e::lab::{self, Lab, LabSpec, PingOpts, TransferOpts};
use petrel_e2e::lab_petrel::PetrelLab;
use petrel_e2e::procs::{bin, join, Agent, Hub};
use petrel_e2e::raw_agent;
use petrel_e2e::{egress_streams, wan};
use petrel_transport::pki::{der_to_pem, CertificateAuthority, NodeKey};

static LAB_LOCK: Mutex<()> = Mutex::new(());

fn lab_lock() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh lab (the caller holds [`lab_lock`]).
fn new_lab() -> Lab {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    Lab::build(LabSpec::default()).unwrap()
}

/// Petrel running in `lab` with the hub's egress proxy on `dir/egress.sock` (a flag, not the
/// process-wide `PETREL_EGRESS_UDS`, which the hubs of the other tests would inherit).
fn start_petrel<'a>(lab: &'a Lab, dir: &Path) -> (PetrelLab<'a>, PathBuf) {
    let uds = dir.join("egress.sock");
    let petrel =
        PetrelLab::start_with(lab, "fast", dir, &["--egress-uds", uds.to_str().unwrap()]).unwrap();
    (petrel, uds)
}

fn agents_connected(p: &PetrelLab) -> usize {
    p.hub_status()
        .ok()
        .and_then(|s| s["agents"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// The hub's status entry for the agent of `node`, if it is connected.
fn hub_agent(p: &PetrelLab, node: &str) -> Option<serde_json::Value> {
    p.hub_status().ok()?["agents"]
        .as_array()?
        .iter()
        .find(|a| a["node"] == node)
        .cloned()
}

/// Throughput (Mbit/s) of one proxied stream to `edge_ip` for `secs`: an upload to its sink or
/// a download from its source.
async fn proxied(uds: PathBuf, edge_ip: Ipv4Addr, upload: bool, secs: f64) -> anyhow::Result<f64> {
    let port = if upload {
        egress_streams::PORT_SINK
    } else {
        egress_streams::PORT_SOURCE
    };
    let s = egress_streams::connect_via(&uds, SocketAddrV4::new(edge_ip, port)).await?;
    egress_streams::stream_throughput(s, upload, secs).await
}

#[test]
fn lossy_slow_wan_transfers_complete() {
    let _l = lab_lock();
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab();
    let (petrel, uds) = start_petrel(&lab, tmp.path());
    let edge_ip = lab.node("edge-a1").pod_ip;
    let _targets = egress_streams::target_servers(&lab, "edge-a1").unwrap();

    let imp = wan::Impairment::start(&lab, Duration::from_millis(100), 5).unwrap();
    let ping = lab
        .ping_with(
            &lab.node("edge-a1").ns,
            lab.gateway_public_ip(),
            &PingOpts {
                count: 10,
                interval: Duration::from_millis(100),
                ..Default::default()
            },
        )
        .unwrap();
    eprintln!(
        "impairment: {}; ping edge-a1 -> hub: {}/{} replies, RTT {:?} ms",
        imp.description, ping.received, ping.transmitted, ping.rtt_avg_ms
    );
    let rtt = ping.rtt_avg_ms.expect("some pings get through 5% loss");
    assert!((95.0..400.0).contains(&rtt), "RTT {rtt} ms");

    // Pod TCP through the packet path (QUIC datagrams: the inner TCP recovers the losses).
    let t = Instant::now();
    let opts = TransferOpts {
        idle_timeout: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(10),
        total_timeout: Duration::from_secs(40),
        ..TransferOpts::new(256 << 10)
    };
    let r = lab.tcp_transfer_with("edge-a1", "cloud-1", &opts).unwrap();
    assert_eq!(r.bytes_received, 256 << 10);
    eprintln!(
        "packet path: 256 KiB edge-a1 pod -> cloud-1 pod in {:?}",
        t.elapsed()
    );

    // A proxied stream (QUIC stream: QUIC recovers the losses), edge -> hub for 3 s.
    let t = Instant::now();
    let mbit = egress_streams::rt()
        .unwrap()
        .block_on(proxied(uds, edge_ip, false, 3.0))
        .unwrap();
    assert!(mbit > 0.05, "stream moved {mbit} Mbit/s");
    eprintln!(
        "proxied stream: {mbit:.2} Mbit/s for 3 s ({:?})",
        t.elapsed()
    );
    assert!(
        imp.counters
            .frames
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100
    );
    drop(imp);
    assert_eq!(agents_connected(&petrel), 3, "no agent lost its tunnel");
    petrel.stop().unwrap();
}

#[test]
fn hub_killed_mid_transfer() {
    let _l = lab_lock();
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab();
    let (mut petrel, uds) = start_petrel(&lab, tmp.path());
    let edge_ip = lab.node("edge-a1").pod_ip;
    let _targets = egress_streams::target_servers(&lab, "edge-a1").unwrap();

    // A proxied upload that would run for a minute; the hub dies under it, once the stream is
    // open and has carried a MiB through the hub.
    let to_edge = |p: &PetrelLab| {
        hub_agent(p, "edge-a1").map_or((0, 0), |a| {
            (
                a["open_streams"].as_u64().unwrap_or(0),
                a["bytes_out"].as_u64().unwrap_or(0),
            )
        })
    };
    let (_, sent_before) = to_edge(&petrel);
    let rt = egress_streams::rt().unwrap();
    let upload = rt.spawn(proxied(uds.clone(), edge_ip, true, 60.0));
    lab::wait_until("the upload under way", Duration::from_secs(10), || {
        assert!(
            !upload.is_finished(),
            "the upload ended before the hub was killed"
        );
        let (open, sent) = to_edge(&petrel);
        Ok(open >= 1 && sent >= sent_before + (1 << 20))
    })
    .unwrap();
    let killed = Instant::now();
    petrel.hub.kill().unwrap();
    let outcome = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), upload).await })
        .expect("the interrupted transfer must end, not hang")
        .unwrap();
    let err = outcome.expect_err("an interrupted transfer must not report success");
    eprintln!(
        "interrupted proxied transfer failed after {:?}: {err:#}",
        killed.elapsed()
    );

    // Restart the hub (same command, same state): agents come back, new transfers work.
    let restarted = Instant::now();
    petrel.kill_hub_and_respawn().unwrap();
    lab::wait_until("all agents back", Duration::from_secs(20), || {
        Ok(agents_connected(&petrel) == 3)
    })
    .unwrap();
    eprintln!(
        "all agents back {:?} after the restart",
        restarted.elapsed()
    );
    lab.wait_reachable("cloud-1", edge_ip, Duration::from_secs(10))
        .unwrap();
    let r = lab.tcp_transfer("cloud-1", "edge-a1", 4 << 20).unwrap();
    assert_eq!(r.bytes_received, 4 << 20);
    let mbit = rt.block_on(proxied(uds, edge_ip, true, 0.5)).unwrap();
    assert!(
        mbit > 1.0,
        "new proxied transfer after the restart: {mbit} Mbit/s"
    );
    petrel.stop().unwrap();
}

#[test]
fn agent_killed_and_restarted() {
    let _l = lab_lock();
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab();
    let (mut petrel, _uds) = start_petrel(&lab, tmp.path());
    let edge_ip = lab.node("edge-a1").pod_ip;
    // Seconds are too coarse to tell sessions apart (a restart can land in the same second);
    // the restarted agent's new socket gives a new remote port.
    let since = |p: &PetrelLab| {
        hub_agent(p, "edge-a1").map(|a| (a["connected_since_unix"].clone(), a["remote"].clone()))
    };
    let before = since(&petrel).expect("edge-a1 connected");
    let t = Instant::now();
    petrel.kill_agent_and_respawn("edge-a1").unwrap();
    // The new session replaces the old one on the hub at once (no wait for the idle timeout).
    lab::wait_until(
        "the restarted agent's session",
        Duration::from_secs(15),
        || Ok(since(&petrel).is_some_and(|s| s != before)),
    )
    .unwrap();
    lab.wait_reachable("cloud-1", edge_ip, Duration::from_secs(10))
        .unwrap();
    eprintln!(
        "edge-a1 back and reachable {:?} after kill -9 of its agent",
        t.elapsed()
    );
    for (a, b) in [("cloud-1", "edge-a1"), ("edge-a1", "edge-b1")] {
        let r = lab.tcp_transfer(a, b, 4 << 20).unwrap();
        assert_eq!(r.bytes_received, 4 << 20, "{a} -> {b}");
    }
    assert_eq!(agents_connected(&petrel), 3);
    petrel.stop().unwrap();
}

/// A mount that is undone on drop.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                opts,
                "petrel-fault",
                at.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs {opts} on {}", at.display());
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn gateway(args: &[&str], state: &Path) -> std::process::Output {
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args(args).arg("--state-dir").arg(state);
    petrel_e2e::procs::run(c, Duration::from_secs(20)).unwrap()
}

/// [`gateway`], which must succeed.
fn gateway_ok(args: &[&str], state: &Path) {
    let out = gateway(args, state);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn state_dir_read_only_is_a_clear_error() {
    lab::require_root().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ro = tmp.path().join("ro");
    let _m = Mount::tmpfs(&ro, "ro,size=1m");
    let state = ro.join("state");
    let out = gateway(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--relay-listen",
            "off",
        ],
        &state,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("hub on a read-only state dir: {}\n{stderr}", out.status);
    assert!(!out.status.success(), "the hub must refuse to run");
    assert!(
        stderr.contains(&*ro.to_string_lossy()),
        "the error must name the path:\n{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("read-only"),
        "the error must say why:\n{stderr}"
    );
}

#[test]
fn state_dir_full_leaves_tokens_intact() {
    lab::require_root().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let _m = Mount::tmpfs(&full, "size=256k");
    let state = full.join("state");
    // A working state directory with one token.
    gateway_ok(&["token", "create", "--node", "edge-a1"], &state);
    let tokens = state.join("tokens.json");
    let before = std::fs::read(&tokens).unwrap();
    serde_json::from_slice::<serde_json::Value>(&before).unwrap();
    // Fill the file system.
    let filler = full.join("filler");
    // (dd itself fails: the file system fills before it has written 4 MB.)
    let dd = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&dd.stderr)
            .to_lowercase()
            .contains("no space"),
        "the file system did not fill: {}",
        String::from_utf8_lossy(&dd.stderr)
    );
    let out = gateway(&["token", "create", "--node", "edge-a2"], &state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("token create on a full disk: {}\n{stderr}", out.status);
    assert!(
        !out.status.success(),
        "token create must fail on a full disk"
    );
    assert!(
        stderr.contains("tokens.json") || stderr.contains(&*state.to_string_lossy()),
        "the error must name the file:\n{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("no space"),
        "the error must say why:\n{stderr}"
    );
    let after = std::fs::read(&tokens).unwrap();
    assert_eq!(before, after, "tokens.json must be untouched");
    // With space again, it works and the old token is still there (tokens.json maps token ids
    // to records).
    std::fs::remove_file(&filler).unwrap();
    gateway_ok(&["token", "create", "--node", "edge-a2"], &state);
    let old: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&before).unwrap();
    let now: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&tokens).unwrap()).unwrap();
    assert!(
        old.len() == 1 && now.len() == 2 && old.keys().all(|k| now.contains_key(k)),
        "both tokens kept: before {old:?}, after {now:?}"
    );
}

/// The hub's CA, from its state directory.
fn ca_of(state: &Path) -> CertificateAuthority {
    CertificateAuthority::from_pem(
        &std::fs::read_to_string(state.join("ca.crt")).unwrap(),
        &std::fs::read_to_string(state.join("ca.key")).unwrap(),
    )
    .unwrap()
}

#[test]
fn clock_skew_beyond_certificate_validity() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("hub");
    let hub = Hub::start(&state, &["--relay-listen", "off"]).unwrap();
    let ca = ca_of(&state);
    let day = Duration::from_secs(86400);
    let now = SystemTime::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // As if the agent's clock (or the hub's) were days off: a certificate that expired
    // yesterday, and one valid only from tomorrow.
    for (what, not_before) in [("expired", now - 3 * day), ("not yet valid", now + 2 * day)] {
        let key = NodeKey::generate().unwrap();
        let cert = ca
            .sign_node_csr(&key.csr_der("edge-a1").unwrap(), "edge-a1", not_before, day)
            .unwrap();
        let r = rt.block_on(raw_agent::session_as(
            &hub.server(),
            ca.cert_der().as_ref(),
            &cert,
            &key,
            "edge-a1",
        ));
        let err = r
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_else(|| panic!("an {what} certificate was accepted"));
        eprintln!("{what} certificate, the agent side sees: {err}");
        assert!(
            err.to_lowercase().contains("certificate"),
            "the refusal must be about the certificate: {err}"
        );
    }
    lab::wait_until("hub logs both refusals", Duration::from_secs(5), || {
        let log = hub.proc.log().to_lowercase();
        Ok(log.contains("expired")
            && (log.contains("notvalidyet")
                || log.contains("not valid yet")
                || log.contains("not yet valid")))
    })
    .unwrap_or_else(|e| panic!("{e}\nhub log:\n{}", hub.proc.log()));
    let log = hub.proc.log();
    for l in log.lines().filter(|l| {
        let l = l.to_lowercase();
        l.contains("expired") || l.contains("notvalidyet") || l.contains("not valid yet")
    }) {
        eprintln!("hub: {l}");
    }

    // The real agent with an expired certificate: it says so and the hub refuses it.
    let (token, fp) = hub.token("edge-a1", &[]).unwrap();
    let agent_state = tmp.path().join("agent");
    let j = join(&hub.server(), "edge-a1", &token, &fp, &agent_state).unwrap();
    assert!(j.success, "{}", j.stderr);
    let pem = std::fs::read_to_string(agent_state.join("node.pem")).unwrap();
    let key = NodeKey::from_pem(&pem).unwrap();
    let expired = ca
        .sign_node_csr(
            &key.csr_der("edge-a1").unwrap(),
            "edge-a1",
            now - 3 * day,
            day,
        )
        .unwrap();
    let mut new_pem = key.to_pem();
    new_pem.push_str(&der_to_pem(&expired, "CERTIFICATE"));
    std::fs::write(agent_state.join("node.pem"), new_pem).unwrap();
    let agent = Agent::start("agent", &agent_state, &[hub.server()], &[]).unwrap();
    agent
        .proc
        .wait_for_log("node certificate has expired", Duration::from_secs(10))
        .unwrap();
    lab::never_within("the hub admits edge-a1", Duration::from_secs(1), || {
        let s = hub.status()?;
        Ok(s["agents"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["node"] == "edge-a1")))
    })
    .unwrap();
    for l in agent
        .proc
        .log()
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("expired") || l.contains("certificate")
        })
        .take(4)
    {
        eprintln!("agent: {l}");
    }
}

/// A hub started with `args`, its CA, a certificate for edge-a1 and a runtime that drives
/// raw sessions (`raw_agent`) against it.
struct RawNode {
    hub: Hub,
    ca: CertificateAuthority,
    cert: Vec<u8>,
    key: NodeKey,
    rt: tokio::runtime::Runtime,
}

impl RawNode {
    fn start(tmp: &Path, args: &[&str]) -> Self {
        let state = tmp.join("hub");
        let hub = Hub::start(&state, args).unwrap();
        let ca = ca_of(&state);
        let (cert, key) = raw_agent::node_identity(&ca, "edge-a1").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Self {
            hub,
            ca,
            cert,
            key,
            rt,
        }
    }

    /// edge-a1 says hello; the hub's first answer.
    fn session(&self) -> anyhow::Result<raw_agent::RawSession> {
        self.rt.block_on(raw_agent::session_as(
            &self.hub.server(),
            self.ca.cert_der().as_ref(),
            &self.cert,
            &self.key,
            "edge-a1",
        ))
    }

    /// `petrel_hub_datagrams_dropped_total{reason}` now.
    fn dropped(&self, reason: &str) -> u64 {
        let series = format!("petrel_hub_datagrams_dropped_total{{reason=\"{reason}\"}} ");
        self.hub
            .metrics()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }
}

/// An admitted node that sends frames before its hello has been answered (a real agent sends
/// them only once welcomed): the tunnel is closed with a reason and counted, instead of the
/// frames waiting in quinn's receive buffer until the session starts reading them. The node
/// then connects as usual.
#[test]
fn a_datagram_before_the_welcome_ends_the_tunnel() {
    let tmp = tempfile::tempdir().unwrap();
    let node = RawNode::start(tmp.path(), &[]);
    let reason = node
        .rt
        .block_on(async {
            let (_ep, conn) = raw_agent::connect(
                &node.hub.server(),
                node.ca.cert_der().as_ref(),
                &node.cert,
                &node.key,
            )
            .await?;
            conn.send_datagram(vec![0u8; 200].into())?;
            let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await?;
            Ok::<_, anyhow::Error>(closed.to_string())
        })
        .unwrap();
    assert!(
        reason.contains("datagrams are not allowed before the welcome"),
        "{reason}; hub log:\n{}",
        node.hub.proc.log()
    );
    assert_eq!(node.dropped("before_welcome"), 1);
    // Nothing else changed: the same node says hello and is welcomed.
    let session = node.session().unwrap();
    assert!(
        matches!(session.first, petrel_proto::ControlMessage::Welcome(_)),
        "{:?}",
        session.first
    );
}

/// A hub without a relay (`--relay-listen off`, only the API server's proxy) still reads an
/// admitted agent's frames: they are counted as `no_relay` drops instead of waiting in quinn's
/// receive buffer, and the tunnel stays up.
#[test]
fn frames_to_a_hub_without_a_relay_are_read_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let node = RawNode::start(tmp.path(), &["--relay-listen", "off"]);
    let session = node.session().unwrap();
    for _ in 0..50 {
        session.conn.send_datagram(vec![0u8; 200].into()).unwrap();
    }
    // Polled inside the runtime, which drives the connection (and sends the datagrams).
    let counted = node.rt.block_on(async {
        for _ in 0..100 {
            if node.dropped("no_relay") == 50 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(
        counted,
        "the hub must count 50 no_relay drops: {}",
        node.hub.metrics().unwrap_or_default()
    );
    assert!(session.conn.close_reason().is_none(), "the tunnel stays up");
}
