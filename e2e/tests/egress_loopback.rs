//! The egress proxy end to end with the real hub and agent binaries on loopback: CONNECT over
//! the Unix socket and over mutual TLS, resolution by node name, node address and pod IP,
//! half-close, refusals, direct dials for cloud and Express Connect targets, head-of-line
//! isolation, a flood of CONNECTs to a blackholed target, SNI passthrough and Host routing.
//! Node addresses and pod CIDRs are 127.x addresses (see `loopback_inventory`), so the agent
//! really dials every target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_e2e::apiserver::{
    blackhole, checksum_exchange, checksum_server, connect_on, firehose_server, loopback_inventory,
    metric, read_response_head, rss_kib, start_agent, start_hub, tls_client, tls_connect,
    uds_connect, within, TestPki,
};
use petrel_e2e::procs::{free_port, http_status, Agent, Hub};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn uds_half_close(s: &mut UnixStream) -> std::io::Result<()> {
    s.shutdown(Shutdown::Write)
}

fn hub_metrics(hub: &Hub) -> String {
    hub.metrics().unwrap()
}

fn agent_metrics(agent: &Agent) -> String {
    petrel_e2e::procs::http_get(agent.admin, "/metrics").unwrap()
}

fn open_streams(hub: &Hub, node: &str) -> u64 {
    hub.agent(node)
        .and_then(|a| a["open_streams"].as_u64())
        .unwrap_or(u64::MAX)
}

struct Setup {
    _tmp: tempfile::TempDir,
    hub: Hub,
    sock: std::path::PathBuf,
    agents: Vec<Agent>,
}

fn setup(
    node_ports: &[u16],
    extra: &[&str],
    kubelet_ports: &[(&str, u16)],
    agents: &[&str],
) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("egress.sock");
    let ports = node_ports
        .iter()
        .chain(&[10250, 10255])
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let sock_s = sock.display().to_string();
    let mut args = vec![
        "--egress-uds",
        sock_s.as_str(),
        "--egress-node-ports",
        ports.as_str(),
    ];
    args.extend_from_slice(extra);
    let hub = start_hub(tmp.path(), &loopback_inventory(kubelet_ports), &args).unwrap();
    hub.proc
        .wait_for_log(
            "egress CONNECT listening on unix socket",
            Duration::from_secs(5),
        )
        .unwrap();
    let agents = agents
        .iter()
        .map(|n| start_agent(&hub, n, tmp.path()).unwrap())
        .collect();
    Setup {
        _tmp: tmp,
        hub,
        sock,
        agents,
    }
}

#[test]
fn tunnel_by_node_name_address_and_pod_ip_with_half_close() {
    let node_srv = checksum_server(ip("127.0.1.1"), 10 << 20).unwrap();
    let pod_srv = checksum_server(ip("127.1.1.5"), 1000).unwrap();
    let other_pod = checksum_server(ip("127.1.2.7"), 1000).unwrap();
    let s = setup(&[node_srv.port()], &[], &[], &["edge-a1"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&s.sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // By node name: 10 MiB up, 10 MiB down, each direction closed on its own.
    let started = Instant::now();
    let (code, line, mut c) =
        uds_connect(&s.sock, &format!("edge-a1:{}", node_srv.port())).unwrap();
    assert_eq!(code, 200, "{line}");
    checksum_exchange(&mut c, 10 << 20, 10 << 20, uds_half_close).unwrap();
    eprintln!(
        "10 MiB each way through the tunnel in {:?}",
        started.elapsed()
    );
    // By node address, by pod IP, and a pod of edge-a2 (no agent of its own: edge-a1 carries it).
    for target in [
        format!("127.0.1.1:{}", node_srv.port()),
        format!("127.1.1.5:{}", pod_srv.port()),
        format!("127.1.2.7:{}", other_pod.port()),
    ] {
        let (code, line, mut c) = uds_connect(&s.sock, &target).unwrap();
        assert_eq!(code, 200, "{target}: {line}");
        let down = if target.starts_with("127.0.1.1") {
            10 << 20
        } else {
            1000
        };
        checksum_exchange(&mut c, 4096, down, uds_half_close).unwrap();
    }
    let m = hub_metrics(&s.hub);
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_streams_opened_total{path=\"tunnel\"}"
        ),
        4.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_requests_total{listener=\"uds\",outcome=\"ok\"}"
        ),
        4.0
    );
    assert!(
        metric(
            &m,
            "petrel_hub_egress_bytes_total{path=\"tunnel\",direction=\"to_target\"}"
        ) >= (10 << 20) as f64
    );
    within(Duration::from_secs(3), "streams closed at the hub", || {
        open_streams(&s.hub, "edge-a1") == 0
    })
    .unwrap();
    within(
        Duration::from_secs(3),
        "streams closed at the agent",
        || {
            let am = agent_metrics(&s.agents[0]);
            metric(&am, "petrel_agent_proxy_streams_total{outcome=\"ok\"}") == 4.0
                && metric(&am, "petrel_agent_proxy_streams_open") == 0.0
        },
    )
    .unwrap();
}

#[test]
fn closing_the_client_closes_the_target_within_a_second() {
    // A target that holds the connection open and reports when it sees EOF.
    let l = TcpListener::bind("127.1.1.11:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.write_all(b"line 1\n");
            let mut b = [0u8; 64];
            while matches!(c.read(&mut b), Ok(n) if n > 0) {}
            flag.store(true, Ordering::SeqCst);
        }
    });
    let s = setup(&[], &[], &[], &["edge-a1"]);
    let (code, _, mut c) = uds_connect(&s.sock, &format!("127.1.1.11:{port}")).unwrap();
    assert_eq!(code, 200);
    let mut first = [0u8; 7];
    c.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"line 1\n");
    assert_eq!(open_streams(&s.hub, "edge-a1"), 1);
    drop(c);
    let took = within(Duration::from_secs(1), "target saw EOF", || {
        closed.load(Ordering::SeqCst)
    })
    .unwrap();
    eprintln!("target saw the close after {took:?}");
}

#[test]
fn refusals_are_clear_logged_and_leave_the_hub_healthy() {
    let srv = checksum_server(ip("127.1.1.6"), 10).unwrap();
    let s = setup(
        &[],
        &[
            "--egress-request-timeout",
            "1s",
            "--egress-pod-ports",
            &srv.port().to_string(),
        ],
        &[],
        &["edge-a1"],
    );
    let expect = |target: &str, code: u16, words: &[&str]| {
        let (got, line, _) = uds_connect(&s.sock, target).unwrap();
        assert_eq!(got, code, "{target}: {line}");
        for w in words {
            assert!(line.contains(w), "{target}: {line:?} lacks {w:?}");
        }
    };
    expect("nope:10250", 404, &["unknown destination"]);
    expect("8.8.8.8:53", 404, &["unknown destination"]);
    expect("edge-a1:22", 403, &["port 22 is not allowed", "10250"]);
    expect("127.1.1.6:22", 403, &["port 22 is not allowed on pod IP"]);
    expect(
        "127.0.2.1:10250",
        409,
        &["edge-b1 in site-b", "x1 in site-x", "node name"],
    );
    expect("edge-c1:10250", 503, &["no agent of site site-c"]);
    // Nothing listens on edge-a1's kubelet port here: the agent's dial is refused.
    expect("edge-a1:10250", 502, &["refused"]);
    // Malformed requests.
    let raw = |bytes: &[u8]| {
        let mut c = UnixStream::connect(&s.sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(bytes).unwrap();
        read_response_head(&mut c).unwrap()
    };
    assert_eq!(raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").0, 405);
    assert_eq!(raw(b"CONNECT edge-a1 HTTP/1.1\r\n\r\n").0, 400);
    assert_eq!(raw(b"CONNECT edge-a1:10250 HTTP/1.1\n\n").0, 400);
    assert_eq!(raw(b"\x16\x03\x01\x00\x05hello").0, 400);
    assert_eq!(raw(&[b'C'; 5000]).0, 400);
    let mut long = b"CONNECT edge-a1:10250 HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        long.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    assert_eq!(raw(&long).0, 431);
    // A client that never finishes its request gets 408 after the request timeout.
    let started = Instant::now();
    assert_eq!(raw(b"CONNECT edge-a1:").0, 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    // Each refusal has a log line; the hub still serves.
    within(Duration::from_secs(2), "refusal log lines", || {
        s.hub.proc.log().matches("egress refused").count() >= 14
    })
    .unwrap();
    assert_eq!(http_status(s.hub.admin, "/healthz").unwrap(), 200);
    let (code, line, mut c) = uds_connect(&s.sock, &format!("127.1.1.6:{}", srv.port())).unwrap();
    assert_eq!(code, 200, "{line}");
    checksum_exchange(&mut c, 100, 10, uds_half_close).unwrap();
    let m = hub_metrics(&s.hub);
    for (outcome, n) in [
        ("unknown_destination", 2.0),
        ("port_not_allowed", 2.0),
        ("ambiguous", 1.0),
        ("agent_unavailable", 1.0),
        ("dial_refused", 1.0),
        ("timeout", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!(
                    "petrel_hub_egress_requests_total{{listener=\"uds\",outcome=\"{outcome}\"}}"
                )
            ),
            n,
            "{outcome}\n{m}"
        );
    }
}

#[test]
fn mutual_tls_listener_requires_a_client_certificate_from_its_ca() {
    let srv = checksum_server(ip("127.1.1.7"), 1 << 20).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestPki::new("cluster-ca").unwrap();
    let foreign = TestPki::new("foreign-ca").unwrap();
    let (scert, skey) = cluster
        .leaf("petrel-egress", &["127.0.0.1", "petrel-egress"], true)
        .unwrap();
    let client = cluster
        .leaf("kube-apiserver-egress", &["kube-apiserver"], false)
        .unwrap();
    let stranger = foreign
        .leaf("kube-apiserver-egress", &["kube-apiserver"], false)
        .unwrap();
    let w = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (cert, key, ca) = (
        w("tls.crt", &scert),
        w("tls.key", &skey),
        w("ca.crt", &cluster.ca_pem),
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let s = setup(
        &[],
        &[
            "--egress-listen",
            &listen,
            "--egress-tls-cert",
            &cert,
            "--egress-tls-key",
            &key,
            "--egress-client-ca",
            &ca,
        ],
        &[],
        &["edge-a1"],
    );
    let addr: SocketAddr = listen.parse().unwrap();
    // With the cluster CA's client certificate: works.
    let mut t = tls_connect(
        tls_client(&cluster.ca_pem, Some(&client)).unwrap(),
        addr,
        "petrel-egress",
    )
    .unwrap();
    let (code, line) = connect_on(&mut t, &format!("127.1.1.7:{}", srv.port())).unwrap();
    assert_eq!(code, 200, "{line}");
    checksum_exchange(&mut t, 1 << 20, 1 << 20, |t| {
        t.conn.send_close_notify();
        t.conn.complete_io(&mut t.sock).map(|_| ())
    })
    .unwrap();
    // Without a client certificate, and with one from a foreign CA: refused, nothing proxied.
    for (label, cfg, outcome) in [
        (
            "no client certificate",
            tls_client(&cluster.ca_pem, None).unwrap(),
            "tls_no_client_cert",
        ),
        (
            "foreign CA",
            tls_client(&cluster.ca_pem, Some(&stranger)).unwrap(),
            "tls_bad_client_cert",
        ),
    ] {
        let attempt = tls_connect(cfg, addr, "petrel-egress")
            .and_then(|mut t| connect_on(&mut t, &format!("127.1.1.7:{}", srv.port())));
        assert!(attempt.is_err(), "{label}: {attempt:?}");
        within(Duration::from_secs(3), outcome, || {
            metric(
                &hub_metrics(&s.hub),
                &format!(
                    "petrel_hub_egress_requests_total{{listener=\"tcp\",outcome=\"{outcome}\"}}"
                ),
            ) == 1.0
        })
        .unwrap();
    }
    s.hub
        .proc
        .wait_for_log("egress TLS handshake refused", Duration::from_secs(2))
        .unwrap();
    assert_eq!(
        metric(
            &hub_metrics(&s.hub),
            "petrel_hub_egress_streams_opened_total{path=\"tunnel\"}"
        ),
        1.0
    );
    // Still serving.
    let mut t = tls_connect(
        tls_client(&cluster.ca_pem, Some(&client)).unwrap(),
        addr,
        "petrel-egress",
    )
    .unwrap();
    assert_eq!(
        connect_on(&mut t, &format!("127.1.1.7:{}", srv.port()))
            .unwrap()
            .0,
        200
    );
}

#[test]
fn cloud_and_express_connect_targets_are_dialed_by_the_hub_without_a_stream() {
    let cloud = checksum_server(ip("127.0.9.1"), 1 << 20).unwrap();
    let x_pod = checksum_server(ip("127.3.1.9"), 1000).unwrap();
    let s = setup(&[cloud.port()], &[], &[], &["edge-a1"]);
    for (target, down) in [
        (format!("cloud-1:{}", cloud.port()), 1 << 20),
        (format!("127.3.1.9:{}", x_pod.port()), 1000),
    ] {
        let (code, line, mut c) = uds_connect(&s.sock, &target).unwrap();
        assert_eq!(code, 200, "{target}: {line}");
        checksum_exchange(&mut c, 1 << 20, down, uds_half_close).unwrap();
    }
    let m = hub_metrics(&s.hub);
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_streams_opened_total{path=\"direct\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_streams_opened_total{path=\"tunnel\"}"
        ),
        0.0,
        "{m}"
    );
    let am = agent_metrics(&s.agents[0]);
    assert!(
        !am.contains("petrel_agent_proxy_streams_total{"),
        "the agent saw a stream: {am}"
    );
    assert_eq!(open_streams(&s.hub, "edge-a1"), 0);
}

#[test]
fn a_stalled_stream_does_not_hold_up_another_on_the_same_agent() {
    let hose = firehose_server(ip("127.1.1.8")).unwrap();
    let srv = checksum_server(ip("127.1.1.8"), 10 << 20).unwrap();
    let s = setup(&[], &[], &[], &["edge-a1"]);
    // Stream A: the target writes without end, the client never reads.
    let (code, _, stalled) = uds_connect(&s.sock, &format!("127.1.1.8:{}", hose.port())).unwrap();
    assert_eq!(code, 200);
    // Let every buffer on A's path fill up (client socket, hub, QUIC stream window, agent).
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let (code, _, mut c) = uds_connect(&s.sock, &format!("127.1.1.8:{}", srv.port())).unwrap();
    assert_eq!(code, 200);
    checksum_exchange(&mut c, 10 << 20, 10 << 20, uds_half_close).unwrap();
    let took = started.elapsed();
    eprintln!("10 MiB each way beside a stalled stream in {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(open_streams(&s.hub, "edge-a1"), 1);
    drop(stalled);
    within(Duration::from_secs(3), "stalled stream closed", || {
        open_streams(&s.hub, "edge-a1") == 0
    })
    .unwrap();
}

#[test]
fn ten_thousand_connects_to_a_blackhole_stay_bounded() {
    let (hole, _listener, _fill) = blackhole(ip("127.1.1.9")).unwrap();
    let srv = checksum_server(ip("127.1.1.10"), 100).unwrap();
    let s = setup(
        &[],
        &[
            "--egress-connect-timeout",
            "2s",
            "--egress-max-pending-per-agent",
            "64",
        ],
        &[],
        &["edge-a1"],
    );
    let pid = s.hub.proc.pid();
    let rss_before = rss_kib(pid);
    // Sample the pending gauges while the flood runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, admin, agent_admin) = (stop.clone(), s.hub.admin, s.agents[0].admin);
        std::thread::spawn(move || {
            let (mut hub_max, mut agent_max, mut rss_max) = (0.0f64, 0.0f64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                if let Ok(m) = petrel_e2e::procs::http_get(admin, "/metrics") {
                    hub_max = hub_max.max(metric(&m, "petrel_hub_egress_pending_dials"));
                }
                if let Ok(m) = petrel_e2e::procs::http_get(agent_admin, "/metrics") {
                    agent_max = agent_max.max(metric(&m, "petrel_agent_proxy_pending_dials"));
                }
                rss_max = rss_max.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (hub_max, agent_max, rss_max)
        })
    };
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let codes = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let gate = Arc::new(tokio::sync::Semaphore::new(400));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..10_000 {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let sock = s.sock.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let r = async {
                    let mut c = tokio::net::UnixStream::connect(&sock).await?;
                    c.write_all(
                        format!("CONNECT 127.1.1.9:{} HTTP/1.1\r\n\r\n", hole.port()).as_bytes(),
                    )
                    .await?;
                    let mut buf = [0u8; 12];
                    c.read_exact(&mut buf).await?;
                    Ok::<_, std::io::Error>(
                        String::from_utf8_lossy(&buf[9..12])
                            .parse::<u16>()
                            .unwrap_or(0),
                    )
                };
                tokio::time::timeout(Duration::from_secs(30), r)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0)
            });
        }
        let mut codes = std::collections::BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            *codes.entry(r.unwrap_or(0)).or_insert(0u32) += 1;
        }
        codes
    });
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (hub_max, agent_max, rss_max) = sampler.join().unwrap();
    eprintln!("10,000 CONNECTs in {took:?}: {codes:?}; max pending hub {hub_max} agent {agent_max}; hub RSS {rss_before} -> max {rss_max} KiB");
    assert_eq!(codes.values().sum::<u32>(), 10_000);
    assert!(
        !codes.contains_key(&200) && !codes.contains_key(&0),
        "{codes:?}"
    );
    assert!(codes.get(&503).copied().unwrap_or(0) > 5_000, "{codes:?}");
    assert!(codes.get(&504).copied().unwrap_or(0) >= 64, "{codes:?}");
    assert!(
        hub_max <= 64.0 && agent_max <= 64.0,
        "pending hub {hub_max}, agent {agent_max}"
    );
    assert!(
        rss_max < rss_before + 96 * 1024,
        "hub RSS grew from {rss_before} to {rss_max} KiB"
    );
    assert!(took < Duration::from_secs(45), "{took:?}");
    // Later requests still work, and nothing is left pending.
    let (code, line, mut c) = uds_connect(&s.sock, &format!("127.1.1.10:{}", srv.port())).unwrap();
    assert_eq!(code, 200, "{line}");
    checksum_exchange(&mut c, 1000, 100, uds_half_close).unwrap();
    within(Duration::from_secs(5), "no dial pending", || {
        metric(&hub_metrics(&s.hub), "petrel_hub_egress_pending_dials") == 0.0
    })
    .unwrap();
}

/// A TLS server standing in for a kubelet: answers one line with its own name.
fn tls_kubelet(addr: &str, pki: &TestPki) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let (cert, key) = pki.leaf("edge-a1", &["edge-a1"], true).unwrap();
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(petrel_transport::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let l = TcpListener::bind(addr).unwrap();
    let local = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut t = rustls::StreamOwned::new(conn, c);
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while !line.ends_with(b"\n") {
                    match t.read(&mut b) {
                        Ok(1) => line.push(b[0]),
                        _ => return,
                    }
                }
                if line.starts_with(b"GET ") {
                    while !line.ends_with(b"\r\n\r\n") {
                        match t.read(&mut b) {
                            Ok(1) => line.push(b[0]),
                            _ => return,
                        }
                    }
                    let body = "kubelet edge-a1 metrics\n";
                    let _ = write!(
                        t,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                } else {
                    let _ = write!(t, "kubelet edge-a1 got {}", String::from_utf8_lossy(&line));
                }
                t.conn.send_close_notify();
                let _ = t.flush();
            });
        }
    });
    local
}

fn tls_line(pki: &TestPki, hub: SocketAddr, name: &str) -> anyhow::Result<String> {
    let mut t = tls_connect(tls_client(&pki.ca_pem, None)?, hub, name)?;
    t.write_all(b"hello\n")?;
    let mut out = String::new();
    let _ = t.read_to_string(&mut out);
    Ok(out)
}

#[test]
fn sni_passthrough_and_host_routed_http_reach_the_node() {
    let pki = TestPki::new("kubelet-ca").unwrap();
    let kubelet = tls_kubelet("127.0.1.1:0", &pki);
    // The read-only port: a plain HTTP server on the node address.
    let ro = TcpListener::bind("127.0.1.1:0").unwrap();
    let ro_port = ro.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in ro.incoming() {
            let Ok(mut c) = c else { continue };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).map(|n| n == 1).unwrap_or(false) {
                head.push(b[0]);
            }
            let body = "kubelet_running_pods 3\n";
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let (sni_port, http_port) = (free_port(), free_port());
    let (sni, http) = (
        format!("127.0.0.1:{sni_port}"),
        format!("127.0.0.1:{http_port}"),
    );
    let ro_s = ro_port.to_string();
    let s = setup(
        &[ro_port],
        &[
            "--egress-sni-listen",
            &sni,
            "--egress-http-listen",
            &http,
            "--egress-http-port",
            &ro_s,
        ],
        &[("edge-a1", kubelet.port())],
        &["edge-a1"],
    );
    let sni_addr: SocketAddr = sni.parse().unwrap();
    // The client verifies the kubelet's own certificate through the hub: TLS is not terminated.
    let got = tls_line(&pki, sni_addr, "edge-a1").unwrap();
    assert_eq!(got, "kubelet edge-a1 got hello\n");
    // An unknown server name and a non-TLS client are closed without proxying.
    assert!(tls_line(&pki, sni_addr, "ghost")
        .map(|s| s.is_empty())
        .unwrap_or(true));
    let mut c = TcpStream::connect(sni_addr).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.read_to_end(&mut buf);
    assert!(buf.is_empty());
    let m = hub_metrics(&s.hub);
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_requests_total{listener=\"sni\",outcome=\"ok\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_requests_total{listener=\"sni\",outcome=\"unknown_destination\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_requests_total{listener=\"sni\",outcome=\"bad_request\"}"
        ),
        1.0,
        "{m}"
    );
    // Plain HTTP by Host.
    let get = |host: &str| {
        let mut c = TcpStream::connect(&http).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    let ok = get(&format!("edge-a1:{ro_port}"));
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("kubelet_running_pods 3\n"),
        "{ok}"
    );
    assert!(get("ghost").starts_with("HTTP/1.1 404"));
    assert!(
        metric(
            &hub_metrics(&s.hub),
            "petrel_hub_egress_streams_opened_total{path=\"tunnel\"}"
        ) >= 2.0
    );
}

/// What docs/egress.md tells scrapers (metrics-server, Prometheus) to do: HTTPS_PROXY at the
/// mutual-TLS CONNECT listener, with a client certificate from the cluster CA; the kubelet's
/// TLS runs end to end through the tunnel. Tested with curl, as the docs show it.
#[test]
fn a_scraper_with_https_proxy_reaches_an_edge_kubelet() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestPki::new("cluster-ca").unwrap();
    let kubelet = tls_kubelet("127.0.1.1:0", &cluster);
    let (scert, skey) = cluster.leaf("petrel-egress", &["127.0.0.1"], true).unwrap();
    let (ccert, ckey) = cluster.leaf("prometheus", &["prometheus"], false).unwrap();
    let w = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (cert, key, ca, cc, ck) = (
        w("s.crt", &scert),
        w("s.key", &skey),
        w("ca.crt", &cluster.ca_pem),
        w("c.crt", &ccert),
        w("c.key", &ckey),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let s = setup(
        &[],
        &[
            "--egress-listen",
            &listen,
            "--egress-tls-cert",
            &cert,
            "--egress-tls-key",
            &key,
            "--egress-client-ca",
            &ca,
            // A scraper is not the API server: it is admitted by name.
            "--egress-client-names",
            "kube-apiserver,prometheus",
        ],
        &[("edge-a1", kubelet.port())],
        &["edge-a1"],
    );
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "--proxy-cacert",
        &ca,
        "--proxy-cert",
        &cc,
        "--proxy-key",
        &ck,
    ])
    .arg(format!("https://edge-a1:{}/metrics", kubelet.port()))
    .env("HTTPS_PROXY", format!("https://{listen}"));
    let out = petrel_e2e::procs::run(cmd, Duration::from_secs(20)).unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(body, "kubelet edge-a1 metrics\n");
    assert_eq!(
        metric(
            &hub_metrics(&s.hub),
            "petrel_hub_egress_streams_opened_total{path=\"tunnel\"}"
        ),
        1.0
    );
}
