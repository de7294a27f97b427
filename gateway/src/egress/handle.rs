//! One egress connection from its first byte to its last, top to bottom: read the request head
//! (CONNECT, a TLS ClientHello's SNI, or a plain HTTP `Host`), resolve and dial the target
//! ([`super::dial`]), reply (`200` or a status with a reason), then splice ([`super::proxy`]).
//! The listeners ([`super::listen`]) accept, bound and hand connections here.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, Instrument};

use super::http::{self, HeadError};
use super::sni::{self, SniError};
use super::{log_refusal, proxy, Egress, Refusal};

/// Why the first bytes of a connection could not be used.
pub(super) enum ReadHead<E> {
    Parse(E),
    Closed,
    Io(std::io::Error),
    Timeout,
}

/// Reads until `parse` accepts or refuses what arrived; bounded by `parse`'s own caps (it must
/// fail once the buffer is beyond them) and by `timeout`.
pub(super) async fn read_head<S, T, E>(
    io: &mut S,
    timeout: std::time::Duration,
    parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
) -> Result<(T, Vec<u8>), ReadHead<E>>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 2048];
        loop {
            let n = io.read(&mut chunk).await.map_err(ReadHead::Io)?;
            if n == 0 {
                return Err(ReadHead::Closed);
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if let Some(v) = parse(&buf).map_err(ReadHead::Parse)? {
                return Ok(v);
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(v)) => Ok((v, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ReadHead::Timeout),
    }
}

pub(super) async fn reply_error<S: AsyncWrite + Unpin>(
    io: &mut S,
    listener: &'static str,
    eg: &Egress,
    r: &Refusal,
) {
    log_refusal(listener, r);
    eg.parts.metrics.request(listener, r.outcome);
    let _ = io
        .write_all(&http::error_response(r.status, &r.message))
        .await;
    let _ = io.shutdown().await;
}

fn head_refusal(e: &HeadError) -> Refusal {
    let (status, outcome) = e.status();
    Refusal::new(status, outcome, e.to_string())
}

/// Serves one CONNECT client (Unix socket or mutual TLS).
pub(super) async fn handle_connect<S>(eg: &Arc<Egress>, mut io: S, listener: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let timeout = eg.cfg.request_timeout;
    let ((req, used), buf) = match read_head(&mut io, timeout, http::parse_connect).await {
        Ok(v) => v,
        Err(ReadHead::Parse(e)) => {
            return reply_error(&mut io, listener, eg, &head_refusal(&e)).await
        }
        Err(ReadHead::Timeout) => {
            let r = Refusal::new(
                408,
                "timeout",
                format!("no complete CONNECT request within {timeout:?}"),
            );
            return reply_error(&mut io, listener, eg, &r).await;
        }
        Err(ReadHead::Closed) => {
            eg.parts.metrics.request(listener, "closed");
            debug!("client closed before a complete request");
            return;
        }
        Err(ReadHead::Io(e)) => {
            eg.parts.metrics.request(listener, "closed");
            debug!(error = %e, "client connection failed before a complete request");
            return;
        }
    };
    let shown = req.display();
    let span = tracing::info_span!("connect", target = %shown);
    async {
        let to_target = Bytes::copy_from_slice(buf.get(used..).unwrap_or_default());
        let target = match eg.dialer.resolve(&req.host, req.port) {
            Ok(t) => t,
            Err(r) => return reply_error(&mut io, listener, eg, &r).await,
        };
        let up = match eg.dialer.connect(&target, &shown, Some(&eg.api_descriptors)).await {
            Ok(u) => u,
            Err(r) => return reply_error(&mut io, listener, eg, &r).await,
        };
        if let Err(e) = io.write_all(http::ESTABLISHED).await {
            eg.parts.metrics.request(listener, "closed");
            debug!(error = %e, "client left before the 200");
            return;
        }
        eg.parts.metrics.request(listener, "ok");
        info!(node = %target.node, kind = target.kind, path = target.path.as_str(), ip = %target.ip, "egress connection established");
        proxy::proxy(&eg.parts.metrics, io, up, to_target).await;
    }
    .instrument(span)
    .await
}

/// Serves one TLS passthrough connection: the SNI names the node, the target is its kubelet.
pub(super) async fn handle_sni(eg: &Arc<Egress>, mut tcp: tokio::net::TcpStream) {
    let timeout = eg.cfg.request_timeout;
    let (name, buf) = match read_head(&mut tcp, timeout, sni::peek_server_name).await {
        Ok(v) => v,
        Err(ReadHead::Parse(e)) => {
            let outcome = match e {
                SniError::NoServerName => "no_sni",
                _ => "bad_request",
            };
            eg.parts.metrics.request("sni", outcome);
            info!(outcome, "egress TLS passthrough refused: {e}");
            return;
        }
        Err(ReadHead::Timeout) => {
            eg.parts.metrics.request("sni", "timeout");
            info!("egress TLS passthrough refused: no ClientHello within {timeout:?}");
            return;
        }
        Err(ReadHead::Closed | ReadHead::Io(_)) => {
            eg.parts.metrics.request("sni", "closed");
            return;
        }
    };
    let span = tracing::info_span!("sni", server_name = %name);
    async {
        let refuse = |r: Refusal| {
            log_refusal("sni", &r);
            eg.parts.metrics.request("sni", r.outcome);
        };
        let Some(port) = eg.dialer.kubelet_port(&name) else {
            return refuse(Refusal::new(404, "unknown_destination", format!("server name {name} is not a node in the inventory")));
        };
        let target = match eg.dialer.resolve(&name, port) {
            Ok(t) => t,
            Err(r) => return refuse(r),
        };
        let up = match eg
            .dialer
            .connect(&target, &format!("{name}:{port} (sni)"), None)
            .await {
            Ok(u) => u,
            Err(r) => return refuse(r),
        };
        eg.parts.metrics.request("sni", "ok");
        info!(node = %target.node, path = target.path.as_str(), "egress TLS passthrough established");
        proxy::proxy(&eg.parts.metrics, tcp, up, Bytes::from(buf)).await;
    }
    .instrument(span)
    .await
}

/// Serves one plain HTTP connection for the read-only kubelet port, routed by `Host`.
pub(super) async fn handle_http(eg: &Arc<Egress>, mut tcp: tokio::net::TcpStream) {
    let timeout = eg.cfg.request_timeout;
    let ((host, _), buf) = match read_head(&mut tcp, timeout, http::parse_host).await {
        Ok(v) => v,
        Err(ReadHead::Parse(e)) => {
            return reply_error(&mut tcp, "http", eg, &head_refusal(&e)).await
        }
        Err(ReadHead::Timeout) => {
            let r = Refusal::new(
                408,
                "timeout",
                format!("no complete request within {timeout:?}"),
            );
            return reply_error(&mut tcp, "http", eg, &r).await;
        }
        Err(ReadHead::Closed | ReadHead::Io(_)) => {
            eg.parts.metrics.request("http", "closed");
            return;
        }
    };
    let port = eg.cfg.http_port;
    let span = tracing::info_span!("http", host = %host);
    async {
        let target = match eg.dialer.resolve(&host, port) {
            Ok(t) => t,
            Err(r) => return reply_error(&mut tcp, "http", eg, &r).await,
        };
        let up = match eg
            .dialer
            .connect(&target, &format!("{host}:{port} (http)"), None)
            .await {
            Ok(u) => u,
            Err(r) => return reply_error(&mut tcp, "http", eg, &r).await,
        };
        eg.parts.metrics.request("http", "ok");
        info!(node = %target.node, path = target.path.as_str(), "egress HTTP connection established");
        proxy::proxy(&eg.parts.metrics, tcp, up, Bytes::from(buf)).await;
    }
    .instrument(span)
    .await
}
