//! The egress proxy with a real kube-apiserver 1.20 (`e2e/k8s/control-plane.sh`), a real
//! kubectl and the stand-in kubelet: API server -> hub -> QUIC stream -> agent -> kubelet, with
//! the API server's `EgressSelectorConfiguration` (selection `cluster`, HTTPConnect) over the Unix
//! socket and over mutual TLS, and through the SNI passthrough listener (node names resolving
//! to the hub, no egress configuration). Everything runs on this host. For the egress-selector
//! variants the edge Node looks like a real cluster's: its InternalIP is a global-unicast
//! address (`edge_a1_address`, on `lo`) where the stand-in kubelet listens, and its name
//! resolves to it from the API server's host (a private /etc/hosts in the API server's mount
//! namespace), as Kubernetes 1.34+ requires before node proxy dials through the egress selector
//! (1.20, which these tests run, does not check). In the SNI test the name resolves to the
//! hub's (global-unicast) address instead, where its SNI listener is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use petrel_e2e::apiserver::{
    checksum_exchange, checksum_server, loopback_inventory, metric, pattern, start_agent,
    start_agent_with, start_hub, within, ControlPlane, LoopbackAlias, Standin,
};
use petrel_e2e::procs::{free_port, Agent, Hub};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Uds,
    Tls,
}

/// A tiny HTTP server standing in for an application in an edge pod.
fn pod_server(addr: &str) {
    let l = TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && c.read(&mut b).map(|n| n == 1).unwrap_or(false)
                {
                    head.push(b[0]);
                }
                let body = "hello from an edge pod\n";
                let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            });
        }
    });
}

/// edge-a1's InternalIP in the egress-selector tests: global unicast (not loopback, link-local
/// or unspecified), from the benchmarking range 198.18.0.0/15, added to `lo` for the test; one
/// per variant, as the tests run side by side.
fn edge_a1_address(variant: Variant, over_tcp: bool) -> &'static str {
    match (variant, over_tcp) {
        (Variant::Uds, false) => "198.18.0.11",
        (Variant::Tls, _) => "198.18.0.12",
        (Variant::Uds, true) => "198.18.0.13",
    }
}

/// A command prefix that runs the API server in its own mount namespace with `hosts` bound
/// over /etc/hosts.
fn with_hosts(hosts: &std::path::Path) -> Vec<String> {
    vec![
        "unshare".to_string(),
        "-m".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!(
            "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
            hosts.display()
        ),
    ]
}

fn agent_metric(agent: &Agent, series: &str) -> f64 {
    metric(
        &petrel_e2e::procs::http_get(agent.admin, "/metrics").unwrap_or_default(),
        series,
    )
}

struct Cluster {
    cp: ControlPlane,
    standin: Standin,
    hub: Hub,
    agent: Agent,
    dir: std::path::PathBuf,
    _node_address: LoopbackAlias,
    _tmp: tempfile::TempDir,
}

/// `over_tcp`: the agent reaches the hub only over the TCP fallback (QUIC over TLS on TCP), as
/// from a site whose firewall blocks UDP.
fn cluster(variant: Variant, pod_ip: &str, over_tcp: bool) -> Cluster {
    // Keep the directory short: the Unix socket path must fit in sun_path.
    let tmp = tempfile::Builder::new()
        .prefix("pe")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let sock = dir.join("hub.sock");
    let tls_port = free_port();
    let cp_dir = dir.join("cp");
    // The control plane's PKI is made by `up`; the egress config only names paths inside it.
    let pki = cp_dir.join("pki");
    let transport = match variant {
        Variant::Uds => format!("uds:\n        udsName: {}", sock.display()),
        Variant::Tls => format!(
            "tcp:\n        url: https://127.0.0.1:{tls_port}\n        tlsConfig:\n          caBundle: {}\n          clientCert: {}\n          clientKey: {}",
            pki.join("ca.crt").display(),
            pki.join("proxy-client.crt").display(),
            pki.join("proxy-client.key").display()
        ),
    };
    let egress = dir.join("egress.yaml");
    std::fs::write(
        &egress,
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n      {transport}\n"
        ),
    )
    .unwrap();
    // The Node's name resolves on the API server's host, to its InternalIP.
    let edge_a1 = edge_a1_address(variant, over_tcp);
    let node_address = LoopbackAlias::add(edge_a1).unwrap();
    let hosts = dir.join("hosts");
    let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    text.push_str(&format!("\n{edge_a1} edge-a1\n"));
    std::fs::write(&hosts, text).unwrap();
    let cp = ControlPlane::up(
        &cp_dir,
        &[
            ("EGRESS_SELECTOR_CONFIG", egress.display().to_string()),
            ("KUBELET_SERVING_SANS", format!("DNS:edge-a1,IP:{edge_a1}")),
            ("PROXY_SERVING_SANS", "IP:127.0.0.1".into()),
        ],
        Some(with_hosts(&hosts)),
    )
    .unwrap();
    for f in ["ca.crt", "proxy-client.crt", "proxy-client.key"] {
        assert!(pki.join(f).exists(), "control plane has no {f}");
    }
    let standin = Standin::start(&cp, edge_a1).unwrap();
    let kport = standin.https.port();
    let sock_s = sock.display().to_string();
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let (cert, key, ca) = (
        cp.var("K8S_PROXY_SERVER_CERT").unwrap(),
        cp.var("K8S_PROXY_SERVER_KEY").unwrap(),
        cp.var("K8S_CA_CRT").unwrap(),
    );
    let args: Vec<&str> = match variant {
        Variant::Uds => vec!["--egress-uds", &sock_s],
        Variant::Tls => vec![
            "--egress-listen",
            &tls_listen,
            "--egress-tls-cert",
            &cert,
            "--egress-tls-key",
            &key,
            "--egress-client-ca",
            &ca,
        ],
    };
    let tcp_port = free_port().to_string();
    let tcp_listen = format!("127.0.0.1:{tcp_port}");
    let mut args = args;
    let mut agent_args: Vec<&str> = Vec::new();
    if over_tcp {
        args.extend(["--tcp-listen", tcp_listen.as_str()]);
        agent_args.extend(["--transport", "tcp", "--tcp-port", tcp_port.as_str()]);
    }
    let hub = start_hub(
        &dir.join("h"),
        &loopback_inventory(&[("edge-a1", kport)])
            .replace("\"127.0.1.1\"", &format!("\"{edge_a1}\"")),
        &args,
    )
    .unwrap();
    let agent = start_agent_with(&hub, "edge-a1", dir, &agent_args).unwrap();
    if over_tcp {
        let row = hub.agent("edge-a1").unwrap();
        assert_eq!(row["transport"], "tcp", "{row}");
    }
    cp.create_node_and_pod(
        "edge-a1",
        &[("Hostname", "edge-a1"), ("InternalIP", edge_a1)],
        kport,
        "p1",
        pod_ip,
    )
    .unwrap();
    Cluster {
        cp,
        standin,
        hub,
        agent,
        dir: dir.to_path_buf(),
        _node_address: node_address,
        _tmp: tmp,
    }
}

fn logs_follow_exec_port_forward_metrics_and_pod_proxy(
    c: &Cluster,
    variant: Variant,
    pod_ip: &str,
) {
    let started = Instant::now();
    let listener = match variant {
        Variant::Uds => "uds",
        Variant::Tls => "tcp",
    };
    // 1. logs
    let out = c.cp.kubectl_ok(&["logs", "p1"], None).unwrap();
    assert_eq!(out.lines().count(), 10, "{out}");
    assert!(
        out.contains("standin-kubelet log line 10 for default/p1/c1"),
        "{out}"
    );

    // 1b. logs -f: a pushed line arrives within 200 ms; stopping kubectl closes the stream at
    // the agent and at the kubelet within 1 s.
    let mut follow =
        c.cp.kubectl()
            .unwrap()
            .args(["logs", "-f", "p1", "--tail=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    {
        let lines = lines.clone();
        let out = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push((Instant::now(), l));
            }
        });
    }
    let seen = |needle: &str| {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    };
    within(Duration::from_secs(10), "logs -f shows line 10", || {
        seen("log line 10").is_some()
    })
    .unwrap();
    let open_before = agent_metric(&c.agent, "petrel_agent_proxy_streams_open");
    for i in 0..3 {
        let marker = format!("pushed-{i}-{}", std::process::id());
        let t0 = Instant::now();
        c.standin.push_log("p1", &marker).unwrap();
        within(Duration::from_secs(2), &marker, || seen(&marker).is_some()).unwrap();
        let latency = seen(&marker).unwrap().saturating_duration_since(t0);
        eprintln!("[{variant:?}] logs -f: pushed line arrived after {latency:?}");
        assert!(latency < Duration::from_millis(200), "{latency:?}");
    }
    assert_eq!(c.standin.state().unwrap()["follow_streams_open"], 1);
    let _ = follow.kill();
    let _ = follow.wait();
    let t = within(
        Duration::from_secs(1),
        "follow stream closed at the kubelet",
        || {
            c.standin
                .state()
                .map(|s| s["follow_streams_open"] == 0)
                .unwrap_or(false)
        },
    )
    .unwrap();
    let t2 = within(
        Duration::from_secs(1),
        "follow stream closed at the agent",
        || agent_metric(&c.agent, "petrel_agent_proxy_streams_open") < open_before,
    )
    .unwrap();
    eprintln!("[{variant:?}] after kubectl stopped: kubelet closed in {t:?}, agent in {t2:?}");

    // 2. exec -i cat: 10 MiB of random bytes round trip; exit statuses come back.
    let data: Vec<u8> = pattern(0x5eed, 10 << 20);
    let out =
        c.cp.kubectl_run(
            &["exec", "-i", "p1", "--", "cat"],
            Some(&data),
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "exec cat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&data));
    let out =
        c.cp.kubectl_run(
            &["exec", "p1", "--", "sh", "-c", "exit 3"],
            None,
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        c.cp.kubectl_ok(&["exec", "p1", "--", "echo", "hi"], None)
            .unwrap(),
        "hi\n"
    );

    // 3. port-forward: 10 MiB each way, with checksums. The stand-in dials 127.0.0.1:PORT.
    let target = checksum_server("127.0.0.1".parse().unwrap(), 10 << 20).unwrap();
    let mut pf =
        c.cp.kubectl()
            .unwrap()
            .args(["port-forward", "pod/p1", &format!(":{}", target.port())])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(c.dir.join("port-forward.err")).unwrap())
            .spawn()
            .unwrap();
    let mut first = String::new();
    let mut pf_out = BufReader::new(pf.stdout.take().unwrap());
    pf_out.read_line(&mut first).unwrap();
    // Keep reading: kubectl prints a line per connection and dies of SIGPIPE without a reader.
    std::thread::spawn(move || for _ in pf_out.lines() {});
    let local: u16 = first
        .strip_prefix("Forwarding from 127.0.0.1:")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("port-forward said {first:?}"));
    let mut s = TcpStream::connect(("127.0.0.1", local)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t0 = Instant::now();
    if let Err(e) = checksum_exchange(&mut s, 10 << 20, 10 << 20, |s| s.shutdown(Shutdown::Write)) {
        panic!(
            "port-forward transfer: {e}\nkubectl: {}\nstand-in: {}",
            std::fs::read_to_string(c.dir.join("port-forward.err")).unwrap_or_default(),
            c.standin.proc.log()
        );
    }
    eprintln!(
        "[{variant:?}] port-forward: 10 MiB each way in {:?}",
        t0.elapsed()
    );
    let _ = pf.kill();
    let _ = pf.wait();

    // 3b. The kubelet's metrics through the node proxy, and a pod-IP proxy to an edge pod.
    let m =
        c.cp.kubectl_ok(
            &["get", "--raw", "/api/v1/nodes/edge-a1/proxy/metrics"],
            None,
        )
        .unwrap();
    assert!(!m.trim().is_empty());
    let body =
        c.cp.kubectl_ok(
            &[
                "get",
                "--raw",
                "/api/v1/namespaces/default/pods/p1:8080/proxy/",
            ],
            None,
        )
        .unwrap();
    assert_eq!(body, "hello from an edge pod\n");

    // Everything went through the hub's listener and QUIC streams; the apiserver's kubelet
    // client identity reached the kubelet.
    let hm = c.hub.metrics().unwrap();
    assert!(
        metric(
            &hm,
            &format!("petrel_hub_egress_requests_total{{listener=\"{listener}\",outcome=\"ok\"}}")
        ) >= 6.0,
        "{hm}"
    );
    assert!(
        metric(
            &hm,
            "petrel_hub_egress_streams_opened_total{path=\"tunnel\"}"
        ) >= 6.0,
        "{hm}"
    );
    assert_eq!(
        metric(
            &hm,
            "petrel_hub_egress_streams_opened_total{path=\"direct\"}"
        ),
        0.0
    );
    let st = c.standin.state().unwrap();
    assert!(
        st["https_client_common_names"]["kube-apiserver-kubelet-client"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{st}"
    );
    let _ = pod_ip;
    eprintln!("[{variant:?}] all checks in {:?}", started.elapsed());
}

#[test]
fn kubectl_through_the_unix_socket_egress() {
    let pod_ip = "198.18.1.21";
    let _alias = LoopbackAlias::add(pod_ip).unwrap();
    pod_server(&format!("{pod_ip}:8080"));
    let c = cluster(Variant::Uds, pod_ip, false);
    logs_follow_exec_port_forward_metrics_and_pod_proxy(&c, Variant::Uds, pod_ip);
}

/// The same through an agent whose site blocks UDP: its tunnel rides the TCP fallback.
#[test]
fn kubectl_through_the_unix_socket_egress_over_the_tcp_fallback() {
    let pod_ip = "198.18.1.23";
    let _alias = LoopbackAlias::add(pod_ip).unwrap();
    pod_server(&format!("{pod_ip}:8080"));
    let c = cluster(Variant::Uds, pod_ip, true);
    logs_follow_exec_port_forward_metrics_and_pod_proxy(&c, Variant::Uds, pod_ip);
}

#[test]
fn kubectl_through_the_mutual_tls_egress() {
    let pod_ip = "198.18.1.22";
    let _alias = LoopbackAlias::add(pod_ip).unwrap();
    pod_server(&format!("{pod_ip}:8080"));
    let c = cluster(Variant::Tls, pod_ip, false);
    logs_follow_exec_port_forward_metrics_and_pod_proxy(&c, Variant::Tls, pod_ip);
}

/// Managed API servers cannot take an egress configuration: node names resolve to the hub
/// (here a private /etc/hosts in the apiserver's own mount namespace) and the hub routes each
/// TLS connection by its SNI, never terminating it.
#[test]
fn kubectl_through_sni_passthrough() {
    let tmp = tempfile::Builder::new()
        .prefix("ps")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let sni_port = free_port();
    // Node names resolve to the hub's node address: global unicast, as a real one (and 1.34+
    // node proxy) needs; the SNI listener is there.
    let hub_address = "198.18.0.13";
    let _hub_address = LoopbackAlias::add(hub_address).unwrap();
    let hosts = dir.join("hosts");
    let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    text.push_str(&format!("\n{hub_address} edge-a1\n"));
    std::fs::write(&hosts, text).unwrap();
    let wrap = with_hosts(&hosts);
    let cp = ControlPlane::up(
        &dir.join("cp"),
        &[
            ("KUBELET_SERVING_SANS", "DNS:edge-a1,IP:127.0.1.1".into()),
            (
                "APISERVER_EXTRA_FLAGS",
                "--kubelet-preferred-address-types=Hostname".into(),
            ),
        ],
        Some(wrap),
    )
    .unwrap();
    let standin = Standin::start(&cp, "127.0.1.1").unwrap();
    let sni = format!("{hub_address}:{sni_port}");
    let hub = start_hub(
        &dir.join("h"),
        &loopback_inventory(&[("edge-a1", standin.https.port())]),
        &["--egress-sni-listen", &sni],
    )
    .unwrap();
    let agent = start_agent(&hub, "edge-a1", dir).unwrap();
    // The Node's kubelet endpoint is the hub's SNI port; its only address is its name.
    cp.create_node_and_pod(
        "edge-a1",
        &[("Hostname", "edge-a1")],
        sni_port,
        "p1",
        "127.1.1.23",
    )
    .unwrap();
    let out = cp.kubectl_ok(&["logs", "p1"], None).unwrap();
    assert!(
        out.contains("standin-kubelet log line 10 for default/p1/c1"),
        "{out}"
    );
    let data = pattern(0xabc, 1 << 20);
    let out = cp
        .kubectl_run(
            &["exec", "-i", "p1", "--", "cat"],
            Some(&data),
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&data));
    let out = cp
        .kubectl_run(
            &["exec", "p1", "--", "sh", "-c", "exit 4"],
            None,
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    // The API server verified the stand-in's own serving certificate (it runs with
    // --kubelet-certificate-authority) and the stand-in saw the API server's client certificate.
    let st = standin.state().unwrap();
    assert!(
        st["https_client_common_names"]["kube-apiserver-kubelet-client"]
            .as_u64()
            .unwrap_or(0)
            >= 2,
        "{st}"
    );
    let hm = hub.metrics().unwrap();
    assert!(
        metric(
            &hm,
            "petrel_hub_egress_requests_total{listener=\"sni\",outcome=\"ok\"}"
        ) >= 3.0,
        "{hm}"
    );
    assert!(agent_metric(&agent, "petrel_agent_proxy_streams_total{outcome=\"ok\"}") >= 3.0);
}
