//! Starts the stand-in kubelet in-process and drives exec, port-forward, logs and the guard
//! rails through the crate's own SPDY client over mutually authenticated TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_standin_kubelet::spdy::client::{upgrade, UpgradeError, Upgraded};
use petrel_standin_kubelet::spdy::{HeaderBlock, SessionConfig, StreamReader};
use petrel_standin_kubelet::{Config, PemSource, Running, StateSnapshot, TlsSettings};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    rogue_cert: String,
    rogue_key: String,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(issuer: &Issuer<'static, KeyPair>, cn: &str, server: bool) -> (String, String) {
    let sans = if server {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        vec![]
    };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let (ca_pem, issuer) = ca("standin-test-ca");
    let (server_cert, server_key) = leaf(&issuer, "standin-kubelet", true);
    let (client_cert, client_key) = leaf(&issuer, "kube-apiserver-kubelet-client", false);
    let (_, rogue_issuer) = ca("rogue-ca");
    let (rogue_cert, rogue_key) = leaf(&rogue_issuer, "rogue", false);
    Pki {
        ca: ca_pem,
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    }
}

struct Harness {
    pki: Pki,
    kubelet: Running,
}

async fn start(follow_interval: Duration) -> Harness {
    let pki = pki();
    let mut config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        TlsSettings {
            cert: PemSource::Inline(pki.server_cert.clone()),
            key: PemSource::Inline(pki.server_key.clone()),
            client_ca: Some(PemSource::Inline(pki.ca.clone())),
        },
    );
    config.read_only_address = Some("127.0.0.1:0".parse().unwrap());
    config.follow_interval = follow_interval;
    config.initial_log_lines = 5;
    config.linger = Duration::from_secs(2);
    config.stream_creation_timeout = Duration::from_secs(5);
    let kubelet = petrel_standin_kubelet::start(config).await.unwrap();
    Harness { pki, kubelet }
}

impl Harness {
    async fn tls(&self) -> TlsStream<TcpStream> {
        self.tls_as(&self.pki.client_cert, &self.pki.client_key)
            .await
            .unwrap()
    }

    async fn tls_as(&self, cert: &str, key: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pki.ca.as_bytes()).unwrap())
            .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.kubelet.https_addr()).await?;
        connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    async fn upgrade(&self, path: &str, protocols: &[&str]) -> Result<Upgraded, UpgradeError> {
        let io = self.tls().await;
        upgrade(
            io,
            "POST",
            path,
            "localhost",
            protocols,
            SessionConfig::default(),
        )
        .await
    }

    async fn state(&self) -> StateSnapshot {
        let addr = self.kubelet.read_only_addr().unwrap();
        let (status, body) = http_request(
            TcpStream::connect(addr).await.unwrap(),
            "GET",
            "/standin/state",
            "",
        )
        .await;
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and raw body (chunked bodies
/// are de-chunked).
async fn http_request<IO: AsyncRead + AsyncWrite + Unpin>(
    mut io: IO,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Vec<u8>) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    io.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    io.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

const ALL_EXEC: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

fn stream_type(t: &str) -> HeaderBlock {
    HeaderBlock::new().with("streamType", t)
}

async fn read_all(r: &mut StreamReader) -> Vec<u8> {
    r.read_to_end(64 << 20).await.unwrap()
}

struct ExecResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    error: String,
}

/// Runs a command without stdin, like `kubectl exec POD -- CMD`.
async fn exec(h: &Harness, command: &[&str], protocols: &[&str]) -> (String, ExecResult) {
    let mut path = "/exec/default/pod1/main?output=1&error=1".to_string();
    for c in command {
        path.push_str("&command=");
        for b in c.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                path.push(char::from(b));
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
    }
    let up = h.upgrade(&path, protocols).await.unwrap();
    let s = &up.session;
    let error = s.open_stream(stream_type("error")).await.unwrap();
    let stdout = s.open_stream(stream_type("stdout")).await.unwrap();
    let stderr = s.open_stream(stream_type("stderr")).await.unwrap();
    let (mut out_r, _) = stdout.split();
    let (mut err_r, _) = stderr.split();
    let (mut e_r, _) = error.split();
    let (stdout, stderr) = tokio::join!(read_all(&mut out_r), read_all(&mut err_r));
    let error = String::from_utf8(read_all(&mut e_r).await).unwrap();
    s.abort();
    (
        up.protocol,
        ExecResult {
            stdout,
            stderr,
            error,
        },
    )
}

fn exit_code_of(status_json: &str) -> i32 {
    let v: serde_json::Value = serde_json::from_str(status_json).unwrap();
    if v["status"] == "Success" {
        return 0;
    }
    assert_eq!(v["reason"], "NonZeroExitCode", "{status_json}");
    assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
    v["details"]["causes"][0]["message"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_cat_echoes_10_mib_of_random_bytes() {
    let h = start(Duration::from_millis(100)).await;
    let up = h
        .upgrade(
            "/exec/default/pod1/main?command=cat&input=1&output=1&error=1",
            ALL_EXEC,
        )
        .await
        .unwrap();
    assert_eq!(up.protocol, "v4.channel.k8s.io");
    let s = up.session.clone();
    // Same order as client-go: error, stdin, stdout, stderr.
    let error = s.open_stream(stream_type("error")).await.unwrap();
    let stdin = s.open_stream(stream_type("stdin")).await.unwrap();
    let stdout = s.open_stream(stream_type("stdout")).await.unwrap();
    let stderr = s.open_stream(stream_type("stderr")).await.unwrap();

    let mut data = vec![0u8; 10 << 20];
    rand::rng().fill_bytes(&mut data);
    let want = Sha256::digest(&data);
    let stdin_w = stdin.writer();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(32 * 1024) {
            stdin_w.write(chunk).await.unwrap();
        }
        stdin_w.close().await.unwrap();
    });
    let (mut out_r, _) = stdout.split();
    let mut hasher = Sha256::new();
    let mut n = 0usize;
    while let Some(chunk) = out_r.read().await.unwrap() {
        n += chunk.len();
        hasher.update(&chunk);
    }
    writer.await.unwrap();
    assert_eq!(n, 10 << 20);
    assert_eq!(hasher.finalize(), want);
    let (mut err_r, _) = stderr.split();
    assert!(read_all(&mut err_r).await.is_empty());
    let (mut e_r, _) = error.split();
    let status = String::from_utf8(read_all(&mut e_r).await).unwrap();
    assert_eq!(status, r#"{"metadata":{},"status":"Success"}"#);
    // The server ends the connection after the status.
    tokio::time::timeout(Duration::from_secs(5), s.closed())
        .await
        .unwrap();

    let st = h.state().await;
    let rec = st.exec_history.last().unwrap();
    assert_eq!(rec.command, vec!["cat"]);
    assert_eq!(rec.exit_code, Some(0));
    assert_eq!(rec.stdin_bytes, 10 << 20);
    assert_eq!(rec.stdout_bytes, 10 << 20);
    assert_eq!(
        st.https_client_common_names
            .get("kube-apiserver-kubelet-client"),
        Some(&1)
    );
    h.kubelet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reports_exit_codes_and_output() {
    let h = start(Duration::from_millis(100)).await;

    let (proto, r) = exec(&h, &["sh", "-c", "exit 3"], ALL_EXEC).await;
    assert_eq!(proto, "v4.channel.k8s.io");
    assert_eq!(exit_code_of(&r.error), 3);
    assert!(
        r.error
            .contains("command terminated with non-zero exit code"),
        "{}",
        r.error
    );

    let (_, r) = exec(&h, &["false"], ALL_EXEC).await;
    assert_eq!(exit_code_of(&r.error), 1);

    let (_, r) = exec(&h, &["echo", "hello", "world"], ALL_EXEC).await;
    assert_eq!(exit_code_of(&r.error), 0);
    assert_eq!(r.stdout, b"hello world\n");

    let (_, r) = exec(
        &h,
        &["sh", "-c", "echo 'a b'; echo c && false || exit 7"],
        ALL_EXEC,
    )
    .await;
    assert_eq!(r.stdout, b"a b\nc\n");
    assert_eq!(exit_code_of(&r.error), 7);

    let (_, r) = exec(&h, &["no-such-binary", "x"], ALL_EXEC).await;
    assert_eq!(exit_code_of(&r.error), 127);
    assert!(String::from_utf8_lossy(&r.stderr).contains("no-such-binary: command not found"));

    let started = Instant::now();
    let (_, r) = exec(&h, &["sleep", "0.3"], ALL_EXEC).await;
    assert_eq!(exit_code_of(&r.error), 0);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Older protocols: the failure message is plain text and success writes nothing.
    let (proto, r) = exec(
        &h,
        &["sh", "-c", "exit 4"],
        &["v3.channel.k8s.io", "v2.channel.k8s.io"],
    )
    .await;
    assert_eq!(proto, "v3.channel.k8s.io");
    assert_eq!(
        r.error,
        "command terminated with non-zero exit code: exit status 4"
    );
    let (proto, r) = exec(&h, &["true"], &["v2.channel.k8s.io"]).await;
    assert_eq!(proto, "v2.channel.k8s.io");
    assert_eq!(r.error, "");

    // Sessions end once the client has closed its side after the status.
    let deadline = Instant::now() + Duration::from_secs(3);
    let st = loop {
        let st = h.state().await;
        if st.exec_sessions_open == 0 || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(st.exec_sessions_open, 0);
    assert_eq!(st.exec_sessions_total, 8);
    h.kubelet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_cat_and_tty_resize_is_recorded() {
    let h = start(Duration::from_millis(100)).await;
    let up = h
        .upgrade("/attach/default/pod1/main?input=1&output=1&tty=1", ALL_EXEC)
        .await
        .unwrap();
    let s = up.session.clone();
    let error = s.open_stream(stream_type("error")).await.unwrap();
    let stdin = s.open_stream(stream_type("stdin")).await.unwrap();
    let stdout = s.open_stream(stream_type("stdout")).await.unwrap();
    let resize = s.open_stream(stream_type("resize")).await.unwrap();
    resize
        .writer()
        .write(br#"{"Width":120,"Height":40}"#)
        .await
        .unwrap();
    stdin.writer().write(b"typed\n").await.unwrap();
    let (mut out_r, _) = stdout.split();
    assert_eq!(&out_r.read().await.unwrap().unwrap()[..], b"typed\n");
    stdin.writer().close().await.unwrap();
    assert_eq!(out_r.read().await.unwrap(), None);
    let (mut e_r, _) = error.split();
    assert_eq!(
        exit_code_of(&String::from_utf8(read_all(&mut e_r).await).unwrap()),
        0
    );
    let st = h.state().await;
    let size = st.last_terminal_size.unwrap();
    assert_eq!((size.width, size.height), (120, 40));
    assert_eq!(st.exec_history.last().unwrap().kind, "attach");
    h.kubelet.shutdown().await;
}

/// A target service: reads everything until EOF, then answers with the SHA-256 of it and closes.
async fn hashing_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                c.read_to_end(&mut got).await.unwrap();
                let reply = format!("{:x} {}\n", Sha256::digest(&got), got.len());
                c.write_all(reply.as_bytes()).await.unwrap();
                c.shutdown().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_copies_both_ways_with_half_close() {
    let h = start(Duration::from_millis(100)).await;
    let target = hashing_server().await;
    let port = target.port().to_string();
    let up = h
        .upgrade("/portForward/default/pod1", &["portforward.k8s.io"])
        .await
        .unwrap();
    assert_eq!(up.protocol, "portforward.k8s.io");
    let s = up.session.clone();

    for request_id in 0..3 {
        let headers = |t: &str| {
            HeaderBlock::new()
                .with("streamType", t)
                .with("port", port.clone())
                .with("requestID", request_id.to_string())
        };
        // kubectl's order: error stream (half-closed at once), then data.
        let error = s.open_stream(headers("error")).await.unwrap();
        error.writer().close().await.unwrap();
        let data = s.open_stream(headers("data")).await.unwrap();
        let mut payload = vec![0u8; 1 << 20];
        rand::rng().fill_bytes(&mut payload);
        let want = format!("{:x} {}\n", Sha256::digest(&payload), payload.len());
        let (mut data_r, data_w) = data.split();
        let w = tokio::spawn(async move {
            data_w.write(&payload).await.unwrap();
            // Half-close: the target only answers after EOF.
            data_w.close().await.unwrap();
        });
        let got = read_all(&mut data_r).await;
        w.await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), want);
        let (mut e_r, _) = error.split();
        assert!(read_all(&mut e_r).await.is_empty());
    }

    // A port nobody listens on: the reason arrives on the error stream.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let headers = |t: &str| {
        HeaderBlock::new()
            .with("streamType", t)
            .with("port", dead.to_string())
            .with("requestID", "9")
    };
    let error = s.open_stream(headers("error")).await.unwrap();
    let data = s.open_stream(headers("data")).await.unwrap();
    let (mut e_r, _) = error.split();
    let msg = String::from_utf8(read_all(&mut e_r).await).unwrap();
    assert!(
        msg.contains(&format!("error forwarding port {dead}")),
        "{msg}"
    );
    let (mut d_r, _) = data.split();
    assert!(read_all(&mut d_r).await.is_empty());

    // A stream without a port is refused.
    let err = s
        .open_stream(HeaderBlock::new().with("streamType", "data"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reset"), "{err}");

    let st = h.state().await;
    assert_eq!(st.port_forward_streams_total, 4);
    assert_eq!(st.port_forward_dial_errors_total, 1);
    assert_eq!(st.port_forward_bytes_to_target, 3 << 20);
    s.abort();
    h.kubelet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_guard_rails() {
    let h = start(Duration::from_millis(100)).await;
    // WebSocket is refused with 400 so kubectl falls back to SPDY.
    let mut io = h.tls().await;
    io.write_all(
        b"GET /exec/default/pod1/main?command=true&output=1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    io.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("WebSocket"));

    // Unknown protocol: 403 with the accepted list.
    match h
        .upgrade(
            "/exec/default/pod1/main?command=true&output=1",
            &["v9.channel.k8s.io"],
        )
        .await
    {
        Err(UpgradeError::Refused {
            status, headers, ..
        }) => {
            assert_eq!(status, 403);
            assert!(headers.iter().any(
                |(n, v)| n == "x-accepted-stream-protocol-versions" && v == "v4.channel.k8s.io"
            ));
        }
        other => panic!("expected 403, got {other:?}"),
    }
    // No stream requested: 400.
    match h
        .upgrade("/exec/default/pod1/main?command=true", ALL_EXEC)
        .await
    {
        Err(UpgradeError::Refused { status, .. }) => assert_eq!(status, 400),
        other => panic!("expected 400, got {other:?}"),
    }

    // A client certificate from another CA is rejected during the handshake.
    let rogue = h.tls_as(&h.pki.rogue_cert, &h.pki.rogue_key).await;
    let rejected = match rogue {
        Err(_) => true,
        Ok(mut io) => {
            // TLS 1.3: the alert may only show on the first read.
            let _ = io
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            io.read_to_end(&mut buf).await.is_err() || buf.is_empty()
        }
    };
    assert!(rejected);

    let st = h.state().await;
    assert_eq!(st.websocket_upgrades_refused_total, 1);
    h.kubelet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_follow_push_and_close_detection() {
    // No generated lines: only pushed ones, and no writes that would reveal a dead client.
    let h = start(Duration::ZERO).await;
    let (status, body) = http_request(
        h.tls().await,
        "GET",
        "/containerLogs/ns1/pod1/c1?tailLines=2",
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "standin-kubelet log line 4 for ns1/pod1/c1\nstandin-kubelet log line 5 for ns1/pod1/c1\n"
    );

    // Follow.
    let mut io = h.tls().await;
    io.write_all(
        b"GET /containerLogs/ns1/pod1/c1?follow=true&tailLines=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    read_until(&mut io, &mut seen, "log line 5 for ns1/pod1/c1\n").await;
    assert_eq!(h.state().await.follow_streams_open, 1);

    let ro = h.kubelet.read_only_addr().unwrap();
    let pushed_at = Instant::now();
    let (status, _) = http_request(
        TcpStream::connect(ro).await.unwrap(),
        "POST",
        "/standin/log/ns1/pod1/c1",
        "pushed line at T\n",
    )
    .await;
    assert_eq!(status, 200);
    read_until(&mut io, &mut seen, "pushed line at T\n").await;
    let latency = pushed_at.elapsed();
    assert!(
        latency < Duration::from_millis(200),
        "pushed line took {latency:?}"
    );

    // Closing the client closes the stream at the kubelet promptly.
    drop(io);
    let closed_at = Instant::now();
    loop {
        if h.state().await.follow_streams_open == 0 {
            break;
        }
        assert!(
            closed_at.elapsed() < Duration::from_secs(1),
            "follow stream still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The pushed line is now part of the log.
    let (_, body) = http_request(
        h.tls().await,
        "GET",
        "/containerLogs/ns1/pod1/c1?tailLines=1",
        "",
    )
    .await;
    assert_eq!(body, b"pushed line at T\n");
    h.kubelet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_generates_lines_and_read_only_endpoints_answer() {
    let h = start(Duration::from_millis(20)).await;
    let mut io = h.tls().await;
    io.write_all(b"GET /containerLogs/ns1/pod1/c1?follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut io, &mut seen, "log line 8 for ns1/pod1/c1\n").await;
    drop(io);

    let ro = h.kubelet.read_only_addr().unwrap();
    let (status, body) =
        http_request(TcpStream::connect(ro).await.unwrap(), "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    assert!(
        metrics.contains("standin_kubelet_http_requests_total{port=\"https\"} 1"),
        "{metrics}"
    );
    let (status, body) =
        http_request(TcpStream::connect(ro).await.unwrap(), "GET", "/pods", "").await;
    assert_eq!(status, 200);
    let pods: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(pods["kind"], "PodList");
    assert_eq!(pods["items"][0]["metadata"]["name"], "pod1");
    let (status, body) = http_request(h.tls().await, "GET", "/healthz", "").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    let (status, _) = http_request(
        TcpStream::connect(ro).await.unwrap(),
        "GET",
        "/containerLogs/a/b/c",
        "",
    )
    .await;
    assert_eq!(status, 404, "logs are not served on the read-only port");
    h.kubelet.shutdown().await;
}

async fn read_until<IO: AsyncRead + Unpin>(io: &mut IO, seen: &mut Vec<u8>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, io.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {needle:?}; got {:?}",
                    String::from_utf8_lossy(seen)
                )
            })
            .unwrap();
        assert!(n > 0, "EOF before {needle:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_echoed_and_garbage_closes_only_that_connection() {
    use bytes::BytesMut;
    use petrel_standin_kubelet::spdy::client::read_response_head;
    use petrel_standin_kubelet::spdy::{Frame, FrameDecoder, FrameEncoder, Limits};

    let h = start(Duration::from_millis(100)).await;
    let mut io = h.tls().await;
    io.write_all(
        b"POST /portForward/default/pod1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
X-Stream-Protocol-Version: portforward.k8s.io\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_response_head(&mut io).await.unwrap();
    assert_eq!(head.status, 101);
    assert_eq!(
        head.header("x-stream-protocol-version"),
        Some("portforward.k8s.io")
    );

    // A client-initiated (odd) ping comes back unchanged; SETTINGS and WINDOW_UPDATE are ignored.
    let mut enc = FrameEncoder::new().unwrap();
    let mut wire = BytesMut::new();
    for f in [
        Frame::Settings {
            clear_persisted: false,
            entries: vec![],
        },
        Frame::WindowUpdate {
            stream_id: 1,
            delta: 1000,
        },
        Frame::Ping { id: 7 },
    ] {
        enc.encode(&f, &mut wire).unwrap();
    }
    io.write_all(&wire).await.unwrap();
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let frame = loop {
        if let Some(f) = dec.decode(&mut buf).unwrap() {
            break f;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), io.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
    };
    assert_eq!(frame, Frame::Ping { id: 7 });

    // Garbage: a control frame with version 2. The server gives up on this connection only.
    io.write_all(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest))
        .await
        .unwrap();
    let (status, body) = http_request(h.tls().await, "GET", "/healthz", "").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    h.kubelet.shutdown().await;
}
