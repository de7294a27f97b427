//! Fault injection, each test bounded: a lossy, slow WAN; the hub killed mid-transfer; an agent
//! killed and restarted; the hub's state directory read-only or full; node certificates outside
//! their validity (a skewed clock).
//!
//! NAT rebinding mid-transfer is covered by `dataplane_lab.rs` (both hooks: a 40 MiB transfer
//! across a rebinding completes and the agent never reconnects); it is not repeated here.
//!
//! The lab tests run one at a time (a lock): they share the 2 cores, and the hub takes its egress
//! socket from `PETREL_EGRESS_UDS`, which is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use petrel_e2e::bench::{self, streams, wan};
use petrel_e2e::lab::{self, Lab, LabSpec, PingOpts, TransferOpts};
use petrel_e2e::lab_petrel::PetrelLab;
use petrel_e2e::procs::{bin, join, Agent, Hub};
use petrel_e2e::raw_agent;
use petrel_transport::pki::{der_to_pem, CertificateAuthority, NodeKey};

static LAB_LOCK: Mutex<()> = Mutex::new(());

fn lab_lock() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lab with Petrel running and the egress proxy on `dir/egress.sock`.
fn petrel_lab(dir: &Path) -> (Lab, std::path::PathBuf) {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let uds = dir.join("egress.sock");
    std::env::set_var("PETREL_EGRESS_UDS", &uds);
    (Lab::build(LabSpec::default()).unwrap(), uds)
}

fn agents_connected(p: &PetrelLab) -> usize {
    p.hub_status()
        .ok()
        .and_then(|s| s["agents"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn lossy_slow_wan_transfers_complete() {
    let _l = lab_lock();
    let tmp = tempfile::tempdir().unwrap();
    let (lab, uds) = petrel_lab(tmp.path());
    let petrel = PetrelLab::start(&lab, "fast", tmp.path()).unwrap();
    let edge_ip = lab.node("edge-a1").pod_ip;
    let _targets = streams::target_servers(&lab, "edge-a1").unwrap();

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
    let mbit = streams::rt()
        .unwrap()
        .block_on(async {
            let s = streams::connect_via(&uds, SocketAddrV4::new(edge_ip, streams::PORT_SOURCE))
                .await?;
            streams::stream_throughput(s, false, 3.0).await
        })
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
    let (lab, uds) = petrel_lab(tmp.path());
    let mut petrel = PetrelLab::start(&lab, "fast", tmp.path()).unwrap();
    let edge_ip = lab.node("edge-a1").pod_ip;
    let _targets = streams::target_servers(&lab, "edge-a1").unwrap();

    // A proxied upload that would run for a minute; the hub dies under it.
    let rt = streams::rt().unwrap();
    let uds2 = uds.clone();
    let upload = rt.spawn(async move {
        let s = streams::connect_via(&uds2, SocketAddrV4::new(edge_ip, streams::PORT_SINK)).await?;
        streams::stream_throughput(s, true, 60.0).await
    });
    std::thread::sleep(Duration::from_millis(700));
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
    bench::kill_and_respawn(&lab, &mut petrel.hub, "hub-restarted").unwrap();
    lab::wait_until("all agents back", Duration::from_secs(20), || {
        Ok(agents_connected(&petrel) == 3)
    })
    .unwrap();
    eprintln!(
        "all agents back {:?} after the restart",
        restarted.elapsed()
    );
    lab::wait_until(
        "cloud-1 reaches edge-a1 again",
        Duration::from_secs(10),
        || {
            lab.ping_with(
                "cloud-1",
                edge_ip,
                &PingOpts {
                    count: 1,
                    reply_timeout: Duration::from_millis(300),
                    ..Default::default()
                },
            )
            .map(|r| r.reachable())
        },
    )
    .unwrap();
    let r = lab.tcp_transfer("cloud-1", "edge-a1", 4 << 20).unwrap();
    assert_eq!(r.bytes_received, 4 << 20);
    let mbit = rt
        .block_on(async {
            let s =
                streams::connect_via(&uds, SocketAddrV4::new(edge_ip, streams::PORT_SINK)).await?;
            streams::stream_throughput(s, true, 0.5).await
        })
        .unwrap();
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
    let (lab, _uds) = petrel_lab(tmp.path());
    let mut petrel = PetrelLab::start(&lab, "fast", tmp.path()).unwrap();
    let edge_ip = lab.node("edge-a1").pod_ip;
    let idx = petrel
        .agents
        .iter()
        .position(|(n, _)| n == "edge-a1")
        .unwrap();
    let since = |p: &PetrelLab| {
        p.hub_status().ok().and_then(|s| {
            s["agents"].as_array().and_then(|a| {
                a.iter()
                    .find(|a| a["node"] == "edge-a1")
                    // Seconds are too coarse to tell sessions apart (a restart can land in the
                    // same second); the restarted agent's new socket gives a new remote port.
                    .map(|a| (a["connected_since_unix"].clone(), a["remote"].clone()))
            })
        })
    };
    let before = since(&petrel).expect("edge-a1 connected");
    let t = Instant::now();
    {
        let (_, guard) = &mut petrel.agents[idx];
        bench::kill_and_respawn(&lab, guard, "agent-edge-a1-restarted").unwrap();
    }
    // The new session replaces the old one on the hub at once (no wait for the idle timeout).
    lab::wait_until(
        "the restarted agent's session",
        Duration::from_secs(15),
        || Ok(since(&petrel).is_some_and(|s| s != before)),
    )
    .unwrap();
    lab::wait_until(
        "cloud-1 reaches edge-a1 again",
        Duration::from_secs(10),
        || {
            lab.ping_with(
                "cloud-1",
                edge_ip,
                &PingOpts {
                    count: 1,
                    reply_timeout: Duration::from_millis(300),
                    ..Default::default()
                },
            )
            .map(|r| r.reachable())
        },
    )
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
    let out = gateway(&["token", "create", "--node", "edge-a1"], &state);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens = state.join("tokens.json");
    let before = std::fs::read(&tokens).unwrap();
    serde_json::from_slice::<serde_json::Value>(&before).unwrap();
    // Fill the file system.
    let filler = full.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .output();
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
    serde_json::from_slice::<serde_json::Value>(&after).unwrap();
    // With space again, it works and the old token is still there.
    std::fs::remove_file(&filler).unwrap();
    let out = gateway(&["token", "create", "--node", "edge-a2"], &state);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&tokens).unwrap()).unwrap();
    let n = v
        .as_object()
        .map(|o| {
            o.get("tokens")
                .and_then(|t| t.as_object().map(|t| t.len()))
                .unwrap_or(o.len())
        })
        .unwrap_or(0);
    assert!(n >= 2, "both tokens kept: {v}");
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
    std::thread::sleep(Duration::from_secs(1));
    assert!(hub.agent("edge-a1").is_none(), "the hub must not admit it");
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
