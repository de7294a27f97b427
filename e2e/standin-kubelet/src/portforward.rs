//! `portForward` over SPDY (`portforward.k8s.io`).
//!
//! For every forwarded connection the client opens a pair of streams with headers
//! `streamType` (`error` then `data`), `port` and `requestID`. Once both halves of a pair are
//! there, the stand-in dials `127.0.0.1:<port>` in its own network namespace (a real TCP
//! connection) and copies both ways, passing half-closes through: the client's FIN on the data
//! stream becomes a TCP write shutdown, the target's EOF becomes a FIN on the data stream. When
//! both directions are done the error stream is closed empty. A failed dial writes the reason
//! on the error stream (kubectl prints it) and closes both streams.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::spdy::frame::rst_status;
use crate::spdy::{Incoming, Session, SessionError, Stream};
use crate::state::{GaugeKind, State};

/// Port-forward protocols.
pub const PORT_FORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

/// How long dialing the target may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Pending {
    data: Option<Stream>,
    error: Option<Stream>,
    since: Option<Instant>,
}

/// Serves one upgraded port-forward connection until the client closes it.
pub async fn serve(
    session: Session,
    mut incoming: Incoming,
    pod: String,
    state: Arc<State>,
    stream_creation_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            s = incoming.recv() => match s {
                Some(s) => accept_stream(s, &mut pending, &mut tasks, &pod, &state).await,
                None => break,
            },
            _ = sweep.tick() => {
                let now = Instant::now();
                let expired: Vec<String> = pending
                    .iter()
                    .filter(|(_, p)| p.since.is_some_and(|t| now.duration_since(t) > stream_creation_timeout))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in expired {
                    if let Some(p) = pending.remove(&k) {
                        tracing::warn!(request_id = %k, "timed out waiting for the other stream of a port-forward pair");
                        for s in [p.data, p.error].into_iter().flatten() {
                            let _ = s.writer().reset(rst_status::CANCEL).await;
                        }
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::debug!(pod = %pod, "port-forward connection ended");
    tasks.abort_all();
    session.abort();
}

async fn accept_stream(
    stream: Stream,
    pending: &mut HashMap<String, Pending>,
    tasks: &mut JoinSet<()>,
    pod: &str,
    state: &Arc<State>,
) {
    let h = stream.headers();
    let port = h
        .get("port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0);
    let stream_type = h.get("streamtype").unwrap_or("").to_string();
    let (Some(port), "data" | "error") = (port, stream_type.as_str()) else {
        tracing::warn!(headers = ?h, "rejecting port-forward stream with bad port or streamType");
        let _ = stream.writer().reset(rst_status::CANCEL).await;
        return;
    };
    // Old clients send no requestID: pair by stream id, as the kubelet does.
    let request_id = match h.get("requestid") {
        Some(id) if !id.is_empty() => id.to_string(),
        _ if stream_type == "data" => stream.id().saturating_sub(2).to_string(),
        _ => stream.id().to_string(),
    };
    if stream.reply(false).await.is_err() {
        return;
    }
    let entry = pending.entry(request_id.clone()).or_default();
    entry.since.get_or_insert_with(Instant::now);
    let slot = if stream_type == "data" {
        &mut entry.data
    } else {
        &mut entry.error
    };
    if slot.is_some() {
        tracing::warn!(request_id = %request_id, stream_type = %stream_type, "duplicate port-forward stream");
        let _ = stream.writer().reset(rst_status::PROTOCOL_ERROR).await;
        return;
    }
    *slot = Some(stream);
    if entry.data.is_some() && entry.error.is_some() {
        if let Some(Pending {
            data: Some(data),
            error: Some(error),
            ..
        }) = pending.remove(&request_id)
        {
            let pod = pod.to_string();
            let state = state.clone();
            tasks.spawn(async move { forward(data, error, port, pod, state).await });
        }
    }
}

async fn forward(data: Stream, error: Stream, port: u16, pod: String, state: Arc<State>) {
    let _gauge = state.open(GaugeKind::PortForward);
    // The client half-closes the error stream at once and never writes to it.
    let (_error_reader, error_writer) = error.split();
    let (mut from_client, to_client) = data.split();

    let tcp =
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                fail(
                    &state,
                    &error_writer,
                    &to_client,
                    &pod,
                    port,
                    &e.to_string(),
                )
                .await;
                return;
            }
            Err(_) => {
                fail(
                    &state,
                    &error_writer,
                    &to_client,
                    &pod,
                    port,
                    "dial timed out",
                )
                .await;
                return;
            }
        };
    let _ = tcp.set_nodelay(true);
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();

    let up = async {
        loop {
            match from_client.read().await? {
                Some(chunk) => {
                    tcp_wr.write_all(&chunk).await?;
                    state
                        .pf_bytes_to_target
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                None => {
                    tcp_wr.shutdown().await?;
                    return Ok::<(), CopyError>(());
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = tcp_rd.read(&mut buf).await?;
            if n == 0 {
                to_client.close().await?;
                return Ok::<(), CopyError>(());
            }
            to_client.write(&buf[..n]).await?;
            state
                .pf_bytes_from_target
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let failed = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r.err() }
            r = &mut down, if !down_done => { down_done = true; r.err() }
        };
        if let Some(e) = failed {
            tracing::debug!(port, error = %e, "port-forward copy ended early");
            if !down_done {
                let _ = to_client.close().await;
            }
            break;
        }
    }
    let _ = error_writer.close().await;
}

async fn fail(
    state: &State,
    error_writer: &crate::spdy::StreamWriter,
    to_client: &crate::spdy::StreamWriter,
    pod: &str,
    port: u16,
    reason: &str,
) {
    state.pf_dial_errors.fetch_add(1, Ordering::Relaxed);
    let msg = format!("error forwarding port {port} to pod {pod}, uid : failed to dial 127.0.0.1:{port}: {reason}");
    tracing::info!("{msg}");
    let _ = error_writer.write(msg.as_bytes()).await;
    let _ = error_writer.close().await;
    let _ = to_client.close().await;
}

/// Why a copy direction stopped.
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
