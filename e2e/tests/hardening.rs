//! The hub as an attacker on the internet sees it (issue 11), with the real binaries on
//! loopback: unauthenticated enrolment connections that send junk, kubelet certificates on the
//! egress mutual-TLS listener, a flood of unfinished ClientHellos beside the API server's
//! CONNECTs, health endpoints while every cap is full, and a dead direct target beside a live
//! one. Each test checks that the attack is bounded and counted, and that legitimate work goes
//! on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_e2e::apiserver::{
    blackhole, checksum_exchange, checksum_server, connect_on, loopback_inventory, metric,
    start_agent, start_hub, tls_client, tls_connect, uds_connect, within, TestPki,
};
use petrel_e2e::attack::{
    datagram_on_enrolment, initial_flood, junk_enrolments, InitialFloodConfig,
};
use petrel_e2e::procs::{free_port, http_status, Hub};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn hub_metric(hub: &Hub, series: &str) -> f64 {
    metric(&hub.metrics().unwrap(), series)
}

fn write_pem(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn egress_mtls_admits_identities_not_every_certificate_of_the_ca() {
    let srv = checksum_server(ip("127.1.1.7"), 1000).unwrap();
    let cloud = checksum_server(ip("127.0.9.1"), 1000).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestPki::new("cluster-ca").unwrap();
    let (scert, skey) = cluster
        .leaf("petrel-egress", &["127.0.0.1", "petrel-egress"], true)
        .unwrap();
    let apiserver = cluster
        .leaf("kube-apiserver-egress", &["kube-apiserver"], false)
        .unwrap();
    // What the cluster CA also signs: every kubelet's client certificate, and other clients.
    let kubelet = cluster
        .leaf("system:node:edge-a1", &["edge-a1"], false)
        .unwrap();
    let admin = cluster.leaf("cluster-admin", &["admin"], false).unwrap();
    let (cert, key, ca) = (
        write_pem(tmp.path(), "tls.crt", &scert),
        write_pem(tmp.path(), "tls.key", &skey),
        write_pem(tmp.path(), "ca.crt", &cluster.ca_pem),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let hub = start_hub(
        tmp.path(),
        &loopback_inventory(&[]),
        &[
            "--egress-listen",
            &listen,
            "--egress-tls-cert",
            &cert,
            "--egress-tls-key",
            &key,
            "--egress-client-ca",
            &ca,
            "--egress-node-ports",
            &format!("10250,{}", cloud.port()),
        ],
    )
    .unwrap();
    let _agent = start_agent(&hub, "edge-a1", tmp.path()).unwrap();
    let addr: SocketAddr = listen.parse().unwrap();
    let targets = [
        format!("127.1.1.7:{}", srv.port()),
        format!("cloud-1:{}", cloud.port()),
        "127.9.1.5:22".to_string(),
    ];
    for (who, client, outcome) in [
        ("kubelet certificate", &kubelet, "client_kubelet"),
        ("unlisted client", &admin, "client_not_allowed"),
    ] {
        for target in &targets {
            let mut t = tls_connect(
                tls_client(&cluster.ca_pem, Some(client)).unwrap(),
                addr,
                "petrel-egress",
            )
            .unwrap();
            let (code, line) = connect_on(&mut t, target).unwrap();
            assert_eq!(code, 403, "{who} -> {target}: {line}");
        }
        let series =
            format!("petrel_hub_egress_requests_total{{listener=\"tcp\",outcome=\"{outcome}\"}}");
        assert_eq!(hub_metric(&hub, &series), 3.0, "{who}");
    }
    // Nothing was proxied for them.
    let m = hub.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_streams_opened_total{path=\"tunnel\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "petrel_hub_egress_streams_opened_total{path=\"direct\"}"
        ),
        0.0
    );
    // The API server's identity works, and the hub logs who it was.
    let mut t = tls_connect(
        tls_client(&cluster.ca_pem, Some(&apiserver)).unwrap(),
        addr,
        "petrel-egress",
    )
    .unwrap();
    let (code, line) = connect_on(&mut t, &targets[0]).unwrap();
    assert_eq!(code, 200, "{line}");
    checksum_exchange(&mut t, 1000, 1000, |t| {
        t.conn.send_close_notify();
        t.conn.complete_io(&mut t.sock).map(|_| ())
    })
    .unwrap();
    hub.proc
        .wait_for_log(
            "client=\"kube-apiserver-egress\"}:connect",
            Duration::from_secs(3),
        )
        .unwrap();
}

#[test]
fn a_flood_of_unfinished_client_hellos_never_locks_out_the_api_server() {
    let srv = checksum_server(ip("127.1.1.7"), 1000).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("egress.sock");
    let sni = format!("127.0.0.1:{}", free_port());
    let sock_s = sock.display().to_string();
    let hub = start_hub(
        tmp.path(),
        &loopback_inventory(&[]),
        &[
            "--egress-uds",
            &sock_s,
            "--egress-sni-listen",
            &sni,
            "--egress-max-unauthenticated",
            "64",
            "--egress-request-timeout",
            "30s",
        ],
    )
    .unwrap();
    hub.proc
        .wait_for_log("egress TLS passthrough listening", Duration::from_secs(5))
        .unwrap();
    let _agent = start_agent(&hub, "edge-a1", tmp.path()).unwrap();
    // 500 connections that send half a ClientHello and then nothing (the request timeout is
    // long on purpose: they hold whatever they get).
    let mut flood = Vec::new();
    for _ in 0..500 {
        if let Ok(mut c) = TcpStream::connect(sni.as_str()) {
            let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
            flood.push(c);
        }
    }
    within(Duration::from_secs(5), "unauthenticated pool full", || {
        hub_metric(
            &hub,
            "petrel_hub_egress_requests_total{listener=\"sni\",outcome=\"too_many_connections\"}",
        ) >= 400.0
    })
    .unwrap();
    // The API server's CONNECTs on the Unix socket still go through, and the probes answer.
    for _ in 0..5 {
        let (code, line, mut c) = uds_connect(&sock, &format!("127.1.1.7:{}", srv.port())).unwrap();
        assert_eq!(code, 200, "{line}");
        checksum_exchange(&mut c, 1000, 1000, |c| {
            c.shutdown(std::net::Shutdown::Write)
        })
        .unwrap();
    }
    assert_eq!(http_status(hub.admin, "/healthz").unwrap(), 200);
    assert_eq!(http_status(hub.admin, "/readyz").unwrap(), 200);
    // The refusals are counted, not logged one line each.
    let refused_lines = hub
        .proc
        .log()
        .matches("egress connection refused: too many connections")
        .count();
    assert!(
        refused_lines < 50,
        "{refused_lines} log lines for the flood"
    );
    drop(flood);
}

#[test]
fn one_dead_direct_target_does_not_refuse_dials_to_another() {
    let (hole, _listener, _fill) = blackhole(ip("127.0.9.1")).unwrap();
    let live = checksum_server(ip("127.0.9.1"), 1000).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("egress.sock");
    let sock_s = sock.display().to_string();
    let ports = format!("{},{}", hole.port(), live.port());
    let hub = start_hub(
        tmp.path(),
        &loopback_inventory(&[]),
        &[
            "--egress-uds",
            &sock_s,
            "--egress-node-ports",
            &ports,
            "--egress-max-pending-per-agent",
            "8",
            "--egress-connect-timeout",
            "10s",
        ],
    )
    .unwrap();
    hub.proc
        .wait_for_log(
            "egress CONNECT listening on unix socket",
            Duration::from_secs(5),
        )
        .unwrap();
    // 8 dials hang on the dead target: its per-target budget is spent...
    let mut hung = Vec::new();
    for _ in 0..8 {
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        c.write_all(
            format!(
                "CONNECT cloud-1:{} HTTP/1.1\r\nHost: x\r\n\r\n",
                hole.port()
            )
            .as_bytes(),
        )
        .unwrap();
        hung.push(c);
    }
    within(Duration::from_secs(3), "8 dials pending", || {
        hub_metric(&hub, "petrel_hub_egress_pending_dials") == 8.0
    })
    .unwrap();
    let (code, _, _) = uds_connect(&sock, &format!("cloud-1:{}", hole.port())).unwrap();
    assert_eq!(code, 503, "the dead target's own budget is spent");
    // ...and another target of the same site is dialed at once.
    let started = Instant::now();
    let (code, line, mut c) = uds_connect(&sock, &format!("cloud-1:{}", live.port())).unwrap();
    assert_eq!(code, 200, "{line}");
    assert!(started.elapsed() < Duration::from_secs(2));
    checksum_exchange(&mut c, 1000, 1000, |c| {
        c.shutdown(std::net::Shutdown::Write)
    })
    .unwrap();
    drop(hung);
}

#[test]
fn unauthenticated_enrolment_connections_cost_a_small_fixed_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = start_hub(tmp.path(), &loopback_inventory(&[]), &[]).unwrap();
    let (_, fp) = hub.token("edge-a1", &[]).unwrap();
    // Warm up the hub's allocator and tasks with one real enrolment first.
    let _agent = start_agent(&hub, "edge-a2", tmp.path()).unwrap();
    let n = 32;
    let junk = junk_enrolments(&hub, &fp, n).unwrap();
    let (grown_kib, per_conn) = (junk.grown_kib(), junk.kib_per_connection);
    eprintln!(
        "hub RSS grew {grown_kib} KiB for {n} junk enrolment connections ({per_conn:.0} KiB each; {} still open)",
        junk.held_open
    );
    // The documented budget (docs/security.md): 128 KiB of RSS per unauthenticated connection
    // at most (measured 35-70 KiB: quinn's and rustls's state, the session task and the
    // request held, ~34 KB of heap each); at most
    // `max_enrolments` (32) of them at once. Before, one such connection grew the hub by ~89 MB.
    // The 64 KiB goal is a bench row (`petrel-bench`, attack section).
    assert!(per_conn <= 128.0, "{per_conn} KiB per connection");
    assert_eq!(
        junk.held_open,
        usize::from(n),
        "the hub holds every one of them until its deadline"
    );
    // More streams would each get a window: the hub allows one before authentication.
    assert_eq!(
        junk.second_stream_allowed, 0,
        "a second stream was allowed before authentication"
    );
    // A datagram before authentication ends an enrolment connection, counted.
    let closed = datagram_on_enrolment(&hub, &fp).unwrap();
    assert!(
        closed
            .as_deref()
            .is_some_and(|r| r.contains("datagrams are not allowed")),
        "{closed:?}; hub log:\n{}",
        hub.proc.log()
    );
    assert_eq!(
        hub_metric(&hub, "petrel_hub_enrolments_total{outcome=\"datagram\"}"),
        1.0
    );
    // Nothing was lost: a real enrolment still works.
    let _a1 = start_agent(&hub, "edge-a1", tmp.path()).unwrap();
}

#[test]
fn enrolment_attempts_are_limited_per_address_and_in_total() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = start_hub(tmp.path(), &loopback_inventory(&[]), &[]).unwrap();
    let (_, fp) = hub.token("edge-a1", &[]).unwrap();
    // 40 attempts from one address: 16 (the burst) are served, the rest closed with a reason.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server: SocketAddr = hub.server().parse().unwrap();
    let reasons: Vec<String> = rt.block_on(async {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..40 {
            let tls =
                petrel_transport::tls::enrol_client_tls(&fp, petrel_proto::ALPN_ENROL).unwrap();
            let cfg = petrel_transport::quic::client_config(
                tls,
                &petrel_transport::quic::TransportTuning::default(),
            )
            .unwrap();
            let ep =
                petrel_transport::quic::client_endpoint("127.0.7.1:0".parse().unwrap()).unwrap();
            let conn = ep
                .connect_with(cfg, server, petrel_transport::HUB_SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            keep.push((ep, conn));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (_, c) in &keep {
            out.push(c.close_reason().map(|r| r.to_string()).unwrap_or_default());
        }
        out
    });
    let limited = reasons
        .iter()
        .filter(|r| r.contains("too many enrolment attempts from this address"))
        .count();
    // 16 at once, plus what the budget refilled (2 per second) while the 40 connected.
    assert!(
        (20..=24).contains(&limited),
        "{limited} limited: {reasons:?}"
    );
    assert_eq!(
        hub_metric(
            &hub,
            "petrel_hub_enrolments_total{outcome=\"source_rate_limited\"}"
        ),
        limited as f64
    );
    // Another address is not affected.
    let _agent = start_agent(&hub, "edge-a1", tmp.path()).unwrap();
}

#[test]
fn real_agents_get_in_during_a_flood_of_spoofed_initials() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = start_hub(tmp.path(), &loopback_inventory(&[]), &[]).unwrap();
    // Initials of handshakes nobody will finish, 200 per second for at least 6 s, from 256
    // silent source addresses; real agents connect 5 at a time, like a site coming back. A
    // debug-build hub beside the other tests on two cores is the limit here: the issue's
    // 2,000/s is measured against a release-build hub by `petrel-bench` (attack section).
    let flood = initial_flood(
        &hub,
        &InitialFloodConfig {
            rate_per_s: 200,
            min_secs: 6.0,
            sources: 256,
            rounds: 8,
            per_round: 5,
        },
    )
    .unwrap();
    let (ok, total) = (flood.within_3s, flood.handshakes);
    eprintln!(
        "{ok}/{total} real handshakes within 3 s during a flood of {} abandoned handshakes \
         ({:.0}/s; {} datagrams from 256 silent addresses); {} Retry packets sent",
        flood.initials, flood.achieved_rate_per_s, flood.datagrams_forwarded, flood.retries_sent
    );
    assert!(
        flood.initials >= 300,
        "the flood was too small: {}",
        flood.initials
    );
    // Under load the hub asks unvalidated sources for a Retry first: the silent ones never
    // answer, so they never take a handshake slot (the landed hub sent none and gave each a
    // slot for 5 s).
    assert!(
        flood.retries_sent > 0.0,
        "the hub never asked for address validation"
    );
    // The bar: at least 95% of real handshakes within 3 s.
    assert!(
        ok * 100 >= total * 95,
        "{ok}/{total} real handshakes within 3 s"
    );
}

#[test]
fn over_its_memory_budget_the_hub_refuses_new_handshakes_and_counts_them() {
    let tmp = tempfile::tempdir().unwrap();
    // A budget below what any hub holds: over it from the first check.
    let hub = start_hub(
        tmp.path(),
        &loopback_inventory(&[]),
        &["--memory-budget", "16MiB"],
    )
    .unwrap();
    hub.proc
        .wait_for_log("memory budget reached", Duration::from_secs(5))
        .unwrap();
    // New handshakes are refused statelessly (QUIC CONNECTION_REFUSED), counted; the admin
    // endpoint still answers.
    let (token, fp) = hub.token("edge-a2", &[]).unwrap();
    let out = petrel_e2e::procs::join(
        &hub.server(),
        "edge-a2",
        &token,
        &fp,
        &tmp.path().join("agent-edge-a2"),
    )
    .unwrap();
    assert!(!out.success, "join must fail: {}", out.stdout);
    within(Duration::from_secs(3), "refusals counted", || {
        hub_metric(
            &hub,
            "petrel_hub_tunnel_handshakes_total{outcome=\"memory_budget\"}",
        ) >= 1.0
    })
    .unwrap();
    assert_eq!(http_status(hub.admin, "/healthz").unwrap(), 200);
}

/// The hub's certificate check, 2 s slow: the agent answers the hub's first flight only after
/// it, so the hub's side of the handshake stays in flight that long.
#[derive(Debug)]
struct SlowHubCheck(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for SlowHubCheck {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        std::thread::sleep(Duration::from_secs(2));
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An operator can see whether the hub's handshake admission is saturated (issue 11, the
/// reconnect storm): `petrel_hub_handshakes_in_flight` counts a handshake while it lasts and
/// drops back once it is done, and nothing is queued on a quiet hub.
#[test]
fn the_handshake_gauges_count_a_handshake_while_it_lasts() {
    use petrel_transport::{quic, tls, HUB_SERVER_NAME};
    let tmp = tempfile::tempdir().unwrap();
    let hub = start_hub(tmp.path(), &loopback_inventory(&[]), &[]).unwrap();
    let in_flight = "petrel_hub_handshakes_in_flight";
    let text = hub.metrics().unwrap();
    assert!(
        text.lines().any(|l| l == format!("{in_flight} 0")),
        "no idle {in_flight} gauge in:\n{text}"
    );
    let ca = petrel_e2e::raw_agent::hub_ca(&hub).unwrap();
    let (cert, key) = petrel_e2e::raw_agent::node_identity(&ca, "edge-a1").unwrap();
    let server: SocketAddr = hub.server().parse().unwrap();
    let ca_der = ca.cert_der().clone();
    let agent = std::thread::spawn(move || -> anyhow::Result<()> {
        let webpki = petrel_e2e::raw_agent::hub_certificate_check(&ca_der)?;
        let mut cfg = tls::agent_client_tls(
            &ca_der,
            vec![cert.into()],
            key.private_key_der(),
            petrel_proto::ALPN_TUNNEL,
        )?;
        cfg.dangerous()
            .set_certificate_verifier(Arc::new(SlowHubCheck(webpki)));
        let client = quic::client_config(cfg, &quic::TransportTuning::default())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let endpoint = quic::client_endpoint("127.0.0.1:0".parse()?)?;
            let conn = endpoint
                .connect_with(client, server, HUB_SERVER_NAME)?
                .await?;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            Ok(())
        })
    });
    // Polled while the agent sits in its 2 s check; joined before any assertion, so a failure
    // leaves no thread behind.
    let seen = within(
        Duration::from_secs(5),
        "the stalled handshake in flight",
        || hub_metric(&hub, in_flight) == 1.0,
    );
    agent.join().unwrap().unwrap();
    seen.unwrap();
    within(
        Duration::from_secs(5),
        "no handshake in flight once it is done",
        || hub_metric(&hub, in_flight) == 0.0,
    )
    .unwrap();
    assert_eq!(hub_metric(&hub, "petrel_hub_handshakes_queued"), 0.0);
}
