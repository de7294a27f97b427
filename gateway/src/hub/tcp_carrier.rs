//! The TCP fallback listener: TLS connections (ALPN `petrel-tcp/1`, on 443 where agents' UDP
//! is blocked) whose bytes are QUIC packets for a second quinn endpoint of the hub
//! (`petrel_transport::stream_carrier`). The tunnel or enrolment handshake runs inside,
//! mutually authenticated, and every connection then takes the same path as one over UDP:
//! admission, the pre-authentication budget, sessions.
//!
//! What a TCP connection may cost before it has proved anything: a slot of
//! [`TcpCarrierLimits::max_connections`] (refused beyond, counted), one token of the per-address
//! handshake rate limit the UDP port uses, and a TLS handshake that must finish within
//! [`TcpCarrierLimits::tls_deadline`]. Once carrying, a stream silent for
//! [`TcpCarrierLimits::idle`] is closed (an agent pings every few seconds).

use std::sync::Arc;
use std::time::Duration;

use petrel_transport::stream_carrier::CarrierSocket;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::admission::PreAuthState;
use crate::log_budget::LogBudget;
use crate::metrics::HubMetrics;

/// Bounds of the TCP listener.
#[derive(Debug, Clone, Copy)]
pub struct TcpCarrierLimits {
    pub max_connections: usize,
    pub tls_deadline: Duration,
    pub idle: Duration,
}

impl Default for TcpCarrierLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            tls_deadline: Duration::from_secs(5),
            idle: Duration::from_secs(30),
        }
    }
}

/// What the listener needs from the hub.
#[derive(Debug, Clone)]
pub struct TcpCarrierParts {
    pub socket: Arc<CarrierSocket>,
    pub tls: Arc<rustls::ServerConfig>,
    pub pre_auth: Arc<PreAuthState>,
    pub metrics: Arc<HubMetrics>,
    pub log_budget: Arc<LogBudget>,
    pub limits: TcpCarrierLimits,
}

/// Copies the carrier socket's drop counters into the hub's metrics every second (they are
/// atomics the socket bumps on its hot path), until `shutdown`.
async fn export_drops(parts: TcpCarrierParts, shutdown: CancellationToken) {
    use std::sync::atomic::Ordering;
    let mut seen = [0u64; 3];
    loop {
        let stats = &parts.socket.stats;
        let now = [
            stats.dropped_out.load(Ordering::Relaxed),
            stats.dropped_in.load(Ordering::Relaxed),
            stats.bad_frames.load(Ordering::Relaxed),
        ];
        for ((reason, n), before) in ["send_queue_full", "receive_queue_full", "bad_frame"]
            .into_iter()
            .zip(now)
            .zip(seen)
        {
            if n > before {
                parts
                    .metrics
                    .tcp_packets_dropped
                    .get_or_create(&crate::metrics::Reason {
                        reason: reason.to_string(),
                    })
                    .inc_by(n - before);
            }
        }
        seen = now;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Accepts TCP fallback connections on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, parts: TcpCarrierParts, shutdown: CancellationToken) {
    tokio::spawn(export_drops(parts.clone(), shutdown.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(parts.limits.max_connections));
    let acceptor = tokio_rustls::TlsAcceptor::from(parts.tls.clone());
    let mut backoff = Duration::from_millis(50);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => { backoff = Duration::from_millis(50); v }
                Err(e) => {
                    if parts.log_budget.allow("tcp accept failed") {
                        warn!(error = %e, "TCP fallback: accept failed");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
        };
        let outcome = |o: &str| HubMetrics::inc_outcome(&parts.metrics.tcp_connections, o);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            outcome("too_many");
            continue;
        };
        if parts.pre_auth.spend_handshake(peer.ip()).is_err() {
            outcome("rate_limited");
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let (acceptor, parts) = (acceptor.clone(), parts.clone());
        tokio::spawn(async move {
            let outcome = |o: &str| HubMetrics::inc_outcome(&parts.metrics.tcp_connections, o);
            let tls =
                match tokio::time::timeout(parts.limits.tls_deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        outcome("tls_failed");
                        debug!(%peer, error = %e, "TCP fallback: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        outcome("tls_timeout");
                        return;
                    }
                };
            outcome("accepted");
            parts.metrics.tcp_open.inc();
            let (addr, task) = parts.socket.attach_with_idle(tls, Some(parts.limits.idle));
            info!(%peer, carrier = %addr, "TCP fallback connection carrying QUIC");
            let _ = task.await;
            parts.metrics.tcp_open.dec();
            debug!(%peer, "TCP fallback connection closed");
            drop(slot);
        });
    }
}
