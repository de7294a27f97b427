//! The admin HTTP server both binaries run: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive), `/readyz` (the component's own notion of ready, with the reason when it is
//! not) and `/status` (JSON that the `status` subcommands render as a table). Plain HTTP/1.1 on a
//! separate port that is meant for loopback or the node network, never the tunnel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What a binary exposes on its admin port.
pub trait AdminState: Send + Sync + 'static {
    /// Why the component is not ready: its own typed reason; `/readyz` shows its text.
    type NotReady: std::fmt::Display;
    /// `Ok` when ready; otherwise why not.
    fn ready(&self) -> Result<(), Self::NotReady>;
    /// The `/status` document.
    fn status(&self) -> serde_json::Value;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// Serves the admin endpoints on `listener` until `shutdown` fires.
pub async fn serve<S: AdminState>(
    listener: TcpListener,
    state: Arc<S>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        let same_host = stream
            .local_addr()
            .is_ok_and(|local| same_host(peer.ip(), local.ip()));
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&*state, &req, same_host)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%peer, error = %e, "admin connection ended") },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// Whether a client at `peer` that connected to `local` runs on this host: it came from the
/// address it connected to (a host's connection to its own address) or from 127.0.0.1 / ::1.
/// Only such clients get `/status`, which names nodes, addresses and VTEP MACs; `/metrics` and
/// the probes answer anyone who can reach the port.
pub fn same_host(peer: std::net::IpAddr, local: std::net::IpAddr) -> bool {
    let canonical = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let (peer, local) = (canonical(peer), canonical(local));
    peer == local
        || peer == std::net::IpAddr::from([127, 0, 0, 1])
        || peer == std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
}

fn route<S: AdminState>(
    state: &S,
    req: &Request<Incoming>,
    same_host: bool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match state.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            // Every admin server also exports build_info and the process_* families.
            let body = crate::process::append_to(state.metrics());
            let mut r = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        "/status" if !same_host => text(
            StatusCode::FORBIDDEN,
            "/status answers only clients on this host (it names nodes and addresses); /metrics, /healthz and /readyz answer anyone\n".into(),
        ),
        "/status" => {
            let body = serde_json::to_vec_pretty(&state.status()).unwrap_or_default();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = "application/json".parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics /healthz /readyz /status\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Renders rows under a header as left-aligned columns two spaces apart (what the `status`
/// subcommands print).
pub fn render_table<R: AsRef<[String]>>(header: &[&str], rows: &[R]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.as_ref()) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = cells
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(&mut header.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.as_ref().iter().map(String::as_str)));
    }
    out
}

/// Why the admin client failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    // `error` is part of the message and deliberately not a `#[source]`: printed with its
    // chain (`{:#}`), a source would repeat it.
    #[error("cannot reach the admin endpoint at {addr}: {error} (is the process running, and is --admin-addr right?)")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("admin request to {addr} failed: {message}")]
    Http { addr: SocketAddr, message: String },
    #[error("admin request to {addr} timed out")]
    Timeout { addr: SocketAddr },
}

/// A one-shot GET against an admin endpoint, for the `status` subcommands and for tests.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), AdminClientError> {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|error| AdminClientError::Connect { addr, error })?;
        let http = |e: hyper::Error| AdminClientError::Http {
            addr,
            message: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| AdminClientError::Http {
                addr,
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| AdminClientError::Timeout { addr })?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct State(AtomicBool);
    impl AdminState for State {
        type NotReady = &'static str;
        fn ready(&self) -> Result<(), &'static str> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("no hub connection")
            }
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({"agents": []})
        }
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
    }

    #[test]
    fn tables_align_columns() {
        let t = render_table(
            &["A", "LONGER"],
            &[vec!["xxxx".to_string(), "y".to_string()]],
        );
        assert_eq!(t, "A     LONGER\nxxxx  y\n");
    }

    #[tokio::test]
    async fn serves_health_readiness_status_and_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State(AtomicBool::new(false)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, state.clone(), stop.clone()));
        assert_eq!(get(addr, "/healthz").await.unwrap().0, StatusCode::OK);
        let (code, body) = get(addr, "/readyz").await.unwrap();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("no hub connection"));
        state.0.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.unwrap().0, StatusCode::OK);
        assert!(get(addr, "/status").await.unwrap().1.contains("agents"));
        // The state's exposition, then build_info and process metrics, one end marker.
        let metrics = get(addr, "/metrics").await.unwrap().1;
        assert!(
            metrics.ends_with("# EOF\n") && metrics.contains("process_resident_memory_bytes"),
            "{metrics}"
        );
        assert_eq!(metrics.matches("# EOF").count(), 1);
        assert_eq!(get(addr, "/nope").await.unwrap().0, StatusCode::NOT_FOUND);
        stop.cancel();
        task.await.unwrap();
    }

    /// A raw GET from `from` (a local address to bind) to `to`.
    async fn get_from(from: &str, to: SocketAddr, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(to).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn status_answers_only_clients_on_this_host() {
        // 127.0.0.2 plays the node's address; 127.0.0.3 another host.
        let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State(AtomicBool::new(true)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, state, stop.clone()));
        assert_eq!(get_from("127.0.0.3", addr, "/status").await, 403);
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert_eq!(get_from("127.0.0.3", addr, path).await, 200, "{path}");
        }
        assert_eq!(get_from("127.0.0.2", addr, "/status").await, 200);
        assert_eq!(get_from("127.0.0.1", addr, "/status").await, 200);
        stop.cancel();
        task.await.unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(same_host(ip("::ffff:10.0.0.5"), ip("10.0.0.5")));
        assert!(same_host(ip("::1"), ip("10.0.0.5")));
        assert!(!same_host(ip("10.0.0.6"), ip("10.0.0.5")));
    }
}
