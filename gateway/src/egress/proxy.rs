//! Carrying bytes between a client and its upstream once the reply is sent: the splice
//! ([`super::splice`]) with the open-connection gauges (per path, and per agent in its status
//! row) and the byte counters around it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;

use super::dial::Upstream;
use super::metrics::{DirectionLabels, EgressMetrics, PathLabels};
use super::resolve::Path;
use super::splice;
use crate::agent_registry::AgentEntry;

/// Counts an established connection (per path, and per agent in its status row).
struct OpenGuard {
    metrics: Arc<EgressMetrics>,
    path: Path,
    agent: Option<Arc<AgentEntry>>,
}

impl OpenGuard {
    fn new(metrics: Arc<EgressMetrics>, path: Path, agent: Option<Arc<AgentEntry>>) -> Self {
        let m = &metrics;
        m.streams_opened
            .get_or_create(&PathLabels {
                path: path.as_str(),
            })
            .inc();
        m.streams_open
            .get_or_create(&PathLabels {
                path: path.as_str(),
            })
            .inc();
        if let Some(a) = &agent {
            a.counters.open_streams.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            metrics,
            path,
            agent,
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.metrics
            .streams_open
            .get_or_create(&PathLabels {
                path: self.path.as_str(),
            })
            .dec();
        if let Some(a) = &self.agent {
            let _ =
                a.counters
                    .open_streams
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
        }
    }
}

/// Carries bytes between `client` and `up` until both are done.
pub async fn proxy<C>(metrics: &Arc<EgressMetrics>, client: C, up: Upstream, to_target: Bytes)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let (path, stats) = match up {
        Upstream::Tunnel {
            send,
            recv,
            first,
            agent,
        } => {
            let _open = OpenGuard::new(metrics.clone(), Path::Tunnel, Some(agent));
            let (rd, wr) = tokio::io::split(client);
            let stats = splice::splice_quic(rd, wr, send, recv, first, to_target).await;
            (Path::Tunnel, stats)
        }
        Upstream::Direct(mut tcp, _descriptor) => {
            let _open = OpenGuard::new(metrics.clone(), Path::Direct, None);
            let mut client = client;
            let stats = splice::splice_tcp(&mut client, &mut tcp, to_target).await;
            (Path::Direct, stats)
        }
    };
    let m = metrics;
    for (direction, n) in [
        ("to_target", stats.to_target),
        ("from_target", stats.from_target),
    ] {
        m.bytes
            .get_or_create(&DirectionLabels {
                path: path.as_str(),
                direction,
            })
            .inc_by(n);
    }
    debug!(
        to_target = stats.to_target,
        from_target = stats.from_target,
        aborted = stats.aborted,
        "proxied connection closed"
    );
}
