//! Listeners and HTTP routing.
//!
//! HTTPS port (the kubelet's 10250 API):
//! - `GET /healthz`, `GET /metrics`, `GET /pods`
//! - `GET /containerLogs/{ns}/{pod}/{container}`
//! - `GET|POST /exec/{ns}/{pod}[/{uid}]/{container}?command=...&input=1&output=1&error=1&tty=0`
//! - `GET|POST /attach/{ns}/{pod}[/{uid}]/{container}?...`
//! - `GET|POST /portForward/{ns}/{pod}[/{uid}]`
//!
//! Read-only plain-HTTP port (like 10255): `GET /healthz`, `GET /metrics`, `GET /pods`,
//! `GET /standin/state` (JSON [`StateSnapshot`]) and
//! `POST /standin/log/{ns}/{pod}/{container}` (body appended to that container's log and pushed
//! to its followers at once).
//!
//! WebSocket upgrades (newer kubectl tries `v5.channel.k8s.io` and
//! `SPDY/3.1+portforward.k8s.io` over WebSocket first) are refused with `400 Bad Request`, as
//! a 1.20 kubelet refuses protocols it does not know; kubectl treats a non-101 answer as an
//! upgrade failure and falls back to SPDY/3.1.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming as Body;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::exec::{self, ExecRequest, Kind, StreamOptions, Timeouts, EXEC_PROTOCOLS};
use crate::logs::{self, container_key, LogOptions, LogStore};
use crate::portforward::{self, PORT_FORWARD_PROTOCOLS};
use crate::query::Query;
use crate::spdy::{Incoming, Role, Session, SessionConfig};
use crate::state::{GaugeKind, State, StateSnapshot};
use crate::{tls, Error};

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// Largest body accepted by `POST /standin/log/...`.
const MAX_PUSH_BODY: usize = 1024 * 1024;
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct App {
    config: Config,
    state: Arc<State>,
    logs: LogStore,
    shutdown: CancellationToken,
}

/// A running stand-in kubelet.
#[derive(Debug)]
pub struct Running {
    https_addr: SocketAddr,
    read_only_addr: Option<SocketAddr>,
    state: Arc<State>,
    app: Arc<AppHandle>,
    tasks: Vec<JoinHandle<()>>,
}

/// Opaque handle kept by [`Running`] (keeps the log store reachable).
struct AppHandle(Arc<App>);

impl std::fmt::Debug for AppHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl Running {
    /// The bound HTTPS address.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The bound read-only address, if enabled.
    pub fn read_only_addr(&self) -> Option<SocketAddr> {
        self.read_only_addr
    }

    /// Current counters.
    pub fn state(&self) -> StateSnapshot {
        self.state.snapshot()
    }

    /// Appends `text` to a container's log and pushes it to its followers (what
    /// `POST /standin/log/...` does).
    pub fn push_log(&self, namespace: &str, pod: &str, container: &str, text: &str) -> usize {
        let n = self
            .app
            .0
            .logs
            .append(&container_key(namespace, pod, container), text);
        self.state
            .log_lines_pushed
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Resolves when [`Running::shutdown`] has been called.
    pub async fn stopped(&self) {
        self.app.0.shutdown.cancelled().await;
    }

    /// Stops the listeners and ends every connection, stream and session.
    pub async fn shutdown(self) {
        self.app.0.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, Error> {
    let tls_config = tls::server_config(&config.tls)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    let https = TcpListener::bind(config.address)
        .await
        .map_err(|source| Error::Bind {
            addr: config.address,
            source,
        })?;
    let https_addr = https.local_addr().map_err(|source| Error::Bind {
        addr: config.address,
        source,
    })?;
    let read_only = match config.read_only_address {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            Some((l, bound))
        }
        None => None,
    };
    let app = Arc::new(App {
        logs: LogStore::new(config.initial_log_lines),
        config,
        state: Arc::new(State::default()),
        shutdown: CancellationToken::new(),
    });
    let mut tasks = vec![tokio::spawn(serve_https(https, acceptor, app.clone()))];
    let read_only_addr = read_only.as_ref().map(|(_, a)| *a);
    if let Some((listener, _)) = read_only {
        tasks.push(tokio::spawn(serve_read_only(listener, app.clone())));
    }
    tracing::info!(%https_addr, ?read_only_addr, "stand-in kubelet listening");
    Ok(Running {
        https_addr,
        read_only_addr,
        state: app.state.clone(),
        app: Arc::new(AppHandle(app)),
        tasks,
    })
}

async fn serve_https(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, app: Arc<App>) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = app.shutdown.cancelled() => return,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let cn = tls::peer_common_name(tls.get_ref().1);
            if let Some(cn) = &cn {
                app.state.record_client(cn);
            }
            tracing::debug!(%peer, client = ?cn, "HTTPS connection");
            let shutdown = app.shutdown.clone();
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(route_https(req, app).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades();
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTPS connection ended with error");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn serve_read_only(listener: TcpListener, app: Arc<App>) {
    loop {
        let (tcp, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = app.shutdown.cancelled() => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let shutdown = app.shutdown.clone();
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(route_read_only(req, app).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<RespBody> {
    full(status, "text/plain; charset=utf-8", body.into())
}

fn not_found() -> Response<RespBody> {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

async fn route_https(mut req: Request<Body>, app: Arc<App>) -> Response<RespBody> {
    app.state.https_requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let stream_method = method == Method::GET || method == Method::POST;
    tracing::debug!(%method, %path, "HTTPS request");
    match segs.as_slice() {
        ["healthz"] if method == Method::GET => text(StatusCode::OK, "ok"),
        ["metrics"] if method == Method::GET => metrics(&app),
        ["pods"] if method == Method::GET => pods(&app),
        ["containerLogs", ns, pod, container] if method == Method::GET => {
            container_logs(&req, &app, ns, pod, container)
        }
        ["exec", ns, pod, container] | ["exec", ns, pod, _, container] if stream_method => {
            remote_command(&mut req, &app, Kind::Exec, ns, pod, container)
        }
        ["attach", ns, pod, container] | ["attach", ns, pod, _, container] if stream_method => {
            remote_command(&mut req, &app, Kind::Attach, ns, pod, container)
        }
        ["portForward", ns, pod] | ["portForward", ns, pod, _] if stream_method => {
            port_forward(&mut req, &app, ns, pod)
        }
        _ => not_found(),
    }
}

async fn route_read_only(req: Request<Body>, app: Arc<App>) -> Response<RespBody> {
    app.state.read_only_requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match segs.as_slice() {
        ["healthz"] if method == Method::GET => text(StatusCode::OK, "ok"),
        ["metrics"] if method == Method::GET => metrics(&app),
        ["pods"] if method == Method::GET => pods(&app),
        ["standin", "state"] if method == Method::GET => {
            let json = serde_json::to_string_pretty(&app.state.snapshot()).unwrap_or_default();
            full(StatusCode::OK, "application/json", json)
        }
        ["standin", "log", ns, pod, container] if method == Method::POST => {
            let key = container_key(ns, pod, container);
            match Limited::new(req.into_body(), MAX_PUSH_BODY).collect().await {
                Ok(body) => {
                    let body = body.to_bytes();
                    let n = app.logs.append(&key, &String::from_utf8_lossy(&body));
                    app.state
                        .log_lines_pushed
                        .fetch_add(n as u64, Ordering::Relaxed);
                    text(StatusCode::OK, format!("appended {n} line(s) to {key}\n"))
                }
                Err(e) => text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("reading body: {e}\n"),
                ),
            }
        }
        _ => not_found(),
    }
}

fn metrics(app: &App) -> Response<RespBody> {
    let s = app.state.snapshot();
    let pods = pod_index(app).len();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "kubelet_running_pods",
        "gauge",
        "Number of pods that have a running pod sandbox",
        &[("", pods as u64)],
    );
    metric(
        "kubelet_node_name",
        "gauge",
        "The node's name. The count is always 1.",
        &[(&format!("{{node=\"{}\"}}", app.config.node_name), 1)],
    );
    metric(
        "standin_kubelet_http_requests_total",
        "counter",
        "HTTP requests served, by port.",
        &[
            ("{port=\"https\"}", s.https_requests_total),
            ("{port=\"read-only\"}", s.read_only_requests_total),
        ],
    );
    metric(
        "standin_kubelet_follow_streams_open",
        "gauge",
        "Log follow streams currently open.",
        &[("", s.follow_streams_open)],
    );
    metric(
        "standin_kubelet_spdy_connections_total",
        "counter",
        "SPDY connections upgraded.",
        &[("", s.spdy_connections_total)],
    );
    metric(
        "standin_kubelet_exec_sessions_total",
        "counter",
        "Exec and attach sessions started.",
        &[("", s.exec_sessions_total)],
    );
    metric(
        "standin_kubelet_port_forward_streams_total",
        "counter",
        "Port-forward stream pairs started.",
        &[("", s.port_forward_streams_total)],
    );
    metric(
        "standin_kubelet_websocket_upgrades_refused_total",
        "counter",
        "WebSocket upgrade attempts refused.",
        &[("", s.websocket_upgrades_refused_total)],
    );
    full(StatusCode::OK, "text/plain; version=0.0.4", out)
}

/// Configured pods plus every pod that has a log, with their containers.
fn pod_index(app: &App) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut pods: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for p in &app.config.pods {
        pods.entry((p.namespace.clone(), p.name.clone()))
            .or_default()
            .extend(p.containers.iter().cloned());
    }
    for key in app.logs.containers() {
        let mut parts = key.splitn(3, '/');
        if let (Some(ns), Some(pod), Some(c)) = (parts.next(), parts.next(), parts.next()) {
            pods.entry((ns.to_string(), pod.to_string()))
                .or_default()
                .insert(c.to_string());
        }
    }
    pods
}

fn pods(app: &App) -> Response<RespBody> {
    let items: Vec<serde_json::Value> = pod_index(app)
        .into_iter()
        .map(|((ns, name), containers)| {
            serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "uid": format!("standin-{ns}-{name}")},
                "spec": {
                    "nodeName": app.config.node_name,
                    "containers": containers.iter().map(|c| serde_json::json!({"name": c, "image": "standin"})).collect::<Vec<_>>(),
                },
                "status": {"phase": "Running"},
            })
        })
        .collect();
    let list =
        serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items});
    full(StatusCode::OK, "application/json", list.to_string())
}

fn container_logs(
    req: &Request<Body>,
    app: &App,
    ns: &str,
    pod: &str,
    container: &str,
) -> Response<RespBody> {
    let q = Query::parse(req.uri().query());
    if q.flag("previous") {
        return text(
            StatusCode::BAD_REQUEST,
            format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
        );
    }
    let opts = LogOptions {
        follow: q.flag("follow"),
        tail_lines: q
            .get("tailLines")
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(|n| usize::try_from(n).ok()),
        timestamps: q.flag("timestamps"),
        limit_bytes: q.get("limitBytes").and_then(|v| v.parse::<usize>().ok()),
        since_seconds: q.get("sinceSeconds").and_then(|v| v.parse::<u64>().ok()),
    };
    let key = container_key(ns, pod, container);
    if opts.follow {
        let body = logs::follow(
            &app.logs,
            &app.state,
            &key,
            opts,
            app.config.follow_interval,
            app.shutdown.clone(),
        );
        let mut resp = Response::new(body.boxed_unsync());
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    } else {
        let (lines, _) = app.logs.snapshot_and_subscribe(&key);
        text(StatusCode::OK, logs::render(&lines, &opts))
    }
}

fn header_has_token(req: &Request<Body>, name: hyper::header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

fn is_websocket(req: &Request<Body>) -> bool {
    header_has_token(req, UPGRADE, "websocket")
}

fn refuse_websocket(app: &App) -> Response<RespBody> {
    app.state.websocket_refused.fetch_add(1, Ordering::Relaxed);
    let mut resp = text(
        StatusCode::BAD_REQUEST,
        "unable to upgrade: the stand-in kubelet does not serve WebSocket streams; use SPDY/3.1\n",
    );
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The protocol negotiation of `httpstream.Handshake`: the first client protocol (in client
/// order) that the server supports.
fn negotiate(
    req: &Request<Body>,
    supported: &[&'static str],
) -> Result<String, Box<Response<RespBody>>> {
    let client: Vec<String> = req
        .headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .collect();
    if client.is_empty() {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: X-Stream-Protocol-Version is required\n",
        )));
    }
    if let Some(p) = client.iter().find(|p| supported.contains(&p.as_str())) {
        return Ok(p.clone());
    }
    let mut resp = text(
        StatusCode::FORBIDDEN,
        format!("unable to upgrade: unable to negotiate protocol: client supports {client:?}, server accepts {supported:?}\n"),
    );
    for s in supported {
        resp.headers_mut().append(
            "x-accepted-stream-protocol-versions",
            HeaderValue::from_static(s),
        );
    }
    Err(Box::new(resp))
}

/// Answers `101 Switching Protocols` and runs `serve` on the upgraded connection.
fn spdy_upgrade<F, Fut>(
    req: &mut Request<Body>,
    app: &Arc<App>,
    protocol: String,
    serve: F,
) -> Response<RespBody>
where
    F: FnOnce(Session, Incoming) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let on_upgrade = hyper::upgrade::on(req);
    let app2 = app.clone();
    tokio::spawn(async move {
        let upgraded = tokio::select! {
            r = on_upgrade => r,
            _ = app2.shutdown.cancelled() => return,
        };
        let upgraded = match upgraded {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP upgrade failed");
                return;
            }
        };
        let _gauge = app2.state.open(GaugeKind::Spdy);
        match Session::start(
            TokioIo::new(upgraded),
            Role::Server,
            SessionConfig::default(),
        ) {
            Ok((session, incoming)) => {
                let handle = session.clone();
                tokio::select! {
                    _ = serve(session, incoming) => {}
                    _ = app2.shutdown.cancelled() => handle.abort(),
                }
            }
            Err(e) => tracing::warn!(error = %e, "starting SPDY session failed"),
        }
    });
    let mut resp = Response::new(Empty::new().boxed_unsync());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if let Ok(v) = HeaderValue::from_str(&protocol) {
        h.insert("x-stream-protocol-version", v);
    }
    resp
}

/// Sends `resp` in answer to an upgrade request we refuse. hyper hands the connection over
/// after any answer to an `Upgrade:` request, so take it and close it with a TLS close_notify
/// instead of just dropping it.
fn refuse_upgrade(req: &mut Request<Body>, resp: Response<RespBody>) -> Response<RespBody> {
    let mut resp = resp;
    if req.headers().contains_key(UPGRADE) {
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let _ = tokio::time::timeout(Duration::from_secs(5), io.shutdown()).await;
            }
        });
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Checks shared by exec, attach and port-forward; returns the negotiated protocol.
fn check_upgrade(
    req: &Request<Body>,
    app: &App,
    supported: &[&'static str],
) -> Result<String, Box<Response<RespBody>>> {
    if is_websocket(req) {
        return Err(Box::new(refuse_websocket(app)));
    }
    if !header_has_token(req, CONNECTION, "upgrade") || !header_has_token(req, UPGRADE, "SPDY/3.1")
    {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request\n",
        )));
    }
    negotiate(req, supported)
}

fn remote_command(
    req: &mut Request<Body>,
    app: &Arc<App>,
    kind: Kind,
    ns: &str,
    pod: &str,
    container: &str,
) -> Response<RespBody> {
    let q = Query::parse(req.uri().query());
    let options = match StreamOptions::from_query(&q) {
        Ok(o) => o,
        Err(msg) => return refuse_upgrade(req, text(StatusCode::BAD_REQUEST, format!("{msg}\n"))),
    };
    let protocol = match check_upgrade(req, app, EXEC_PROTOCOLS) {
        Ok(p) => p,
        Err(resp) => return refuse_upgrade(req, *resp),
    };
    let exec_req = ExecRequest {
        kind,
        namespace: ns.to_string(),
        pod: pod.to_string(),
        container: container.to_string(),
        command: if kind == Kind::Exec {
            q.get_all("command")
        } else {
            Vec::new()
        },
        options,
        protocol_name: protocol.clone(),
    };
    tracing::info!(kind = ?kind, pod = %format!("{ns}/{pod}/{container}"), command = ?exec_req.command, %protocol, "remote command");
    let state = app.state.clone();
    let timeouts = Timeouts {
        stream_creation: app.config.stream_creation_timeout,
        linger: app.config.linger,
    };
    spdy_upgrade(req, app, protocol, move |session, incoming| {
        exec::serve(session, incoming, exec_req, state, timeouts)
    })
}

fn port_forward(
    req: &mut Request<Body>,
    app: &Arc<App>,
    ns: &str,
    pod: &str,
) -> Response<RespBody> {
    let protocol = match check_upgrade(req, app, PORT_FORWARD_PROTOCOLS) {
        Ok(p) => p,
        Err(resp) => return refuse_upgrade(req, *resp),
    };
    tracing::info!(pod = %format!("{ns}/{pod}"), "port-forward");
    let state = app.state.clone();
    let timeout = app.config.stream_creation_timeout;
    let shutdown = app.shutdown.clone();
    let pod_name = format!("{ns}/{pod}");
    spdy_upgrade(req, app, protocol, move |session, incoming| {
        portforward::serve(session, incoming, pod_name, state, timeout, shutdown)
    })
}
