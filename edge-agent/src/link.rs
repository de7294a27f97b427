//! One link: the agent's tunnel to one hub endpoint, kept up forever. Connect (mutual TLS with the
//! node certificate, ALPN `petrel/1`), say Hello, get Welcome, then run the session: pings for
//! RTT and liveness, updates from the hub, certificate renewal, going-away. When it ends, wait
//! (the hub's `retry_after` after a going-away, else capped jittered exponential backoff that
//! resets after a stable session) and connect again.
//!
//! State changes are logged once at info; retries of the same failure go to debug, so a hub that
//! is down for an hour does not fill the journal.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use petrel_proto::{
    AgentSelfView, Backoff, BackoffPolicy, ControlMessage, GoingAwayReason, Hello, HubView,
    Keepalive, KeepaliveAction, RenewRequest, RouteTable, Welcome, ALPN_TUNNEL,
};
use petrel_transport::control_stream::{ControlReader, ControlWriter};
use petrel_transport::pki::{CertInfo, NodeKey};
use petrel_transport::quic::TransportTuning;
use petrel_transport::{close_code, quic, tls, HUB_SERVER_NAME};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::identity::Identity;
use crate::metrics::AgentMetrics;
use crate::shared::{AgentShared, LinkState};

/// After a hub reports that our tunnel was replaced by another link of ours, wait this long
/// before trying again (two endpoints that name the same hub must not fight over it).
const DUPLICATE_PARK: Duration = Duration::from_secs(60);

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    GoingAway {
        reason: GoingAwayReason,
        retry_after: Duration,
        message: String,
    },
    Lost(String),
    Shutdown,
}

pub async fn run(shared: Arc<AgentShared>, endpoint: String, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(BackoffPolicy::agent_reconnect(shared.config.backoff_max));
    let mut delay = Duration::ZERO;
    let mut last_logged_error: Option<String> = None;
    // The cluster route table as this link last synced it; kept across reconnects, so a hub
    // that still has the same table sends nothing (see petrel_proto::routes).
    let mut routes = RouteTable::new();
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        shared.update_link(&endpoint, |l| {
            l.state = LinkState::Connecting;
            l.attempts += 1;
        });
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            // connect() bounds itself: connect_timeout for an answer, then ADMITTED_GRACE.
            r = connect(&shared, &endpoint, routes.digest()) => r,
        };
        let (conn, reader, writer, welcome) = match attempt {
            Ok(v) => v,
            Err(e) => {
                AgentMetrics::inc(&shared.metrics.connect_attempts, "failed");
                shared
                    .metrics
                    .handshake_failures
                    .get_or_create(&crate::metrics::Reason {
                        reason: e.reason().to_string(),
                    })
                    .inc();
                let e = e.to_string();
                if last_logged_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "cannot connect to hub; retrying with backoff");
                    last_logged_error = Some(e.clone());
                } else {
                    debug!(error = %e, attempt = backoff.attempts(), "connect failed again");
                }
                delay = backoff.next_delay(rand::rng().random());
                shared.update_link(&endpoint, |l| {
                    l.state = LinkState::Backoff;
                    l.last_error = Some(e);
                });
                continue;
            }
        };
        AgentMetrics::inc(&shared.metrics.connect_attempts, "ok");
        last_logged_error = None;
        backoff.on_connected(Instant::now());
        let since = SystemTime::now();
        info!(hub = %welcome.hub_id, remote = %conn.remote_address(), site = %welcome.site, "connected to hub");
        shared.update_link(&endpoint, |l| {
            l.state = LinkState::Connected;
            l.hub = Some(welcome.hub_id.clone());
            l.remote = Some(conn.remote_address().to_string());
            l.connected_since_unix = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            l.rtt_ms = Some(conn.rtt().as_secs_f64() * 1000.0);
            l.last_error = None;
        });
        shared.track_tunnel(&endpoint, Some((&welcome.hub_id, &conn)));
        shared.proxy.set_policy(&welcome.view.egress);
        shared.learn_endpoints(
            welcome
                .view
                .gateways
                .iter()
                .map(|g| format!("{}:{}", g.host, g.port)),
        );
        let me = Me {
            node: welcome.node_name.clone(),
            site: welcome.site.clone(),
        };
        let view = effective_view(&welcome.view, &routes, &me);
        match shared.dataplane.get() {
            Some(dp) => {
                dp.set_active(&welcome.hub_id, &conn);
                dp.on_view(&view).await;
            }
            None => shared.remember_view(&welcome.hub_id, &conn, &view),
        }
        let hub_id = welcome.hub_id.clone();
        let end = session(
            &shared,
            &endpoint,
            &welcome.hub_id,
            &conn,
            reader,
            writer,
            &shutdown,
            RouteState {
                table: &mut routes,
                me: &me,
                base: welcome.view,
            },
        )
        .await;
        shared.track_tunnel(&endpoint, None);
        if let Some(dp) = shared.dataplane.get() {
            dp.clear_active(&conn);
        }
        backoff.on_disconnected(Instant::now());
        shared.update_link(&endpoint, |l| {
            l.state = LinkState::Disconnected;
            l.rtt_ms = None;
            l.connected_since_unix = None;
        });
        match end {
            SessionEnd::Shutdown => {
                conn.close(close_code::NORMAL.into(), b"agent stopping");
                break;
            }
            SessionEnd::GoingAway {
                reason,
                retry_after,
                message,
            } => {
                AgentMetrics::inc(&shared.metrics.sessions_ended, "going_away");
                let duplicate = (reason == GoingAwayReason::Replaced)
                    .then(|| shared.other_link_on_hub(&hub_id, &endpoint))
                    .flatten();
                if let Some(other) = duplicate {
                    info!(other = %other, "this endpoint reaches the same hub as another link; parking it");
                    shared.update_link(&endpoint, |l| {
                        l.state = LinkState::Parked;
                        l.last_error = Some(format!("same hub as {other}"));
                    });
                    delay = DUPLICATE_PARK;
                } else {
                    info!(?reason, retry_after = ?retry_after, %message, "hub is going away; will reconnect");
                    // Spread a fleet's return over a quarter of the hint (at least 100 ms).
                    let spread = (retry_after / 4).max(Duration::from_millis(100));
                    delay = retry_after + spread.mul_f64(rand::rng().random::<f64>());
                    shared.update_link(&endpoint, |l| {
                        l.last_error = Some(format!("hub going away: {message}"))
                    });
                }
            }
            SessionEnd::Lost(why) => {
                AgentMetrics::inc(&shared.metrics.sessions_ended, "lost");
                info!(reason = %why, "tunnel to hub lost; reconnecting");
                delay = backoff.next_delay(rand::rng().random());
                shared.update_link(&endpoint, |l| l.last_error = Some(why));
            }
        }
        conn.close(close_code::NORMAL.into(), b"reconnecting");
    }
    shared.update_link(&endpoint, |l| l.state = LinkState::Stopped);
}

type Connected = (quinn::Connection, ControlReader, ControlWriter, Welcome);

/// Who this agent is, as the hub's welcome said.
struct Me {
    node: String,
    site: String,
}

/// A session's route-sync state: the link's table, and the last view (welcome or update) that
/// the table's routes complete.
struct RouteState<'a> {
    table: &'a mut RouteTable,
    me: &'a Me,
    base: HubView,
}

/// The view the data plane applies: a hub that sends routes in its views (an older hub) is
/// taken as it is; otherwise the routes come from the synced table.
fn effective_view(view: &HubView, table: &RouteTable, me: &Me) -> HubView {
    if !view.routes.is_empty() || table.is_empty() {
        return view.clone();
    }
    HubView {
        routes: table.routes_for(&me.node, &me.site),
        ..view.clone()
    }
}

/// Why one connection attempt to a hub failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad endpoint {0}")]
    BadEndpoint(String),
    #[error("bad port in {0}")]
    BadPort(String),
    #[error("cannot resolve {endpoint} within {within:?}")]
    ResolveTimeout { endpoint: String, within: Duration },
    #[error("cannot resolve {endpoint}: {source}")]
    Resolve {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("{0} resolves to nothing")]
    ResolvesToNothing(String),
    /// Our own TLS or QUIC configuration (the identity on disk) cannot be used.
    #[error(transparent)]
    Config(#[from] petrel_transport::tls::TlsConfigError),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    /// Nothing came back: port closed, firewall, wrong address.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error("{}", describe_connection_error(.0))]
    Connection(quinn::ConnectionError),
    #[error("hub answered but did not welcome us within {0:?}")]
    NoWelcome(Duration),
    #[error(transparent)]
    Stream(#[from] petrel_transport::control_stream::StreamError),
    /// The hub sent GoingAway instead of a Welcome.
    #[error("hub refused the tunnel: {0}")]
    Refused(String),
    #[error("hub sent {0} instead of welcome")]
    Unexpected(&'static str),
    #[error("hub closed the control stream before welcoming us")]
    ClosedBeforeWelcome,
}

impl ConnectError {
    /// The `reason` label of `petrel_agent_handshake_failures_total`: `no_answer`, `resolve`,
    /// `tls` (our TLS configuration, or a TLS alert from either side: another CA, an expired
    /// certificate), `refused` (the hub answered and turned the tunnel down), `no_welcome` (it
    /// answered but never welcomed), `other`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoAnswer(_) => "no_answer",
            Self::ResolveTimeout { .. } | Self::Resolve { .. } | Self::ResolvesToNothing(_) => {
                "resolve"
            }
            Self::Config(_) => "tls",
            Self::Connection(e) if tls::tls_alert(e).is_some() => "tls",
            Self::NoWelcome(_) => "no_welcome",
            Self::Refused(_)
            | Self::Connection(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::ConnectionClosed(_),
            ) => "refused",
            _ => "other",
        }
    }
}

async fn connect(
    shared: &AgentShared,
    endpoint: &str,
    routes_digest: u64,
) -> Result<Connected, ConnectError> {
    let id = shared.identity();
    if id.is_expired(SystemTime::now()) {
        // Still try: the clock may be wrong rather than the certificate; the hub's answer will say.
        warn!(not_after = %humantime::format_rfc3339_seconds(id.info.not_after), "node certificate has expired; re-enrol with `petrel-edge-agent join --force` if the clock is right");
    }
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| ConnectError::BadEndpoint(endpoint.into()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| ConnectError::BadPort(endpoint.into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let within = shared.config.connect_timeout;
    let addr = tokio::time::timeout(within, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| ConnectError::ResolveTimeout {
            endpoint: endpoint.into(),
            within,
        })?
        .map_err(|source| ConnectError::Resolve {
            endpoint: endpoint.into(),
            source,
        })?
        .next()
        .ok_or_else(|| ConnectError::ResolvesToNothing(endpoint.into()))?;
    let tls_cfg = tls::agent_client_tls(
        &id.ca_der,
        vec![id.cert_der.clone()],
        id.key_der(),
        ALPN_TUNNEL,
    )?;
    let tuning = TransportTuning {
        congestion: shared.config.congestion,
        ..TransportTuning::default()
    };
    let client = quic::client_config(tls_cfg, &tuning)?;
    let bind = if addr.is_ipv4() {
        std::net::SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    // A fresh UDP socket per attempt: a new source port also means a new NAT mapping, which is
    // what a stuck mapping needs.
    let ep = quic::client_endpoint(bind).map_err(ConnectError::Socket)?;
    let mut connecting = ep.connect_with(client, addr, HUB_SERVER_NAME)?;
    quic::await_answer(&mut connecting, within)
        .await
        .map_err(|e| match e {
            quic::DialError::Connection(e) => ConnectError::Connection(e),
            quic::DialError::NoAnswer(d) => ConnectError::NoAnswer(d),
        })?;
    tokio::time::timeout(
        quic::ADMITTED_GRACE,
        welcome(connecting, &id, routes_digest),
    )
    .await
    .map_err(|_| ConnectError::NoWelcome(quic::ADMITTED_GRACE))?
}

/// The rest of a connect once the hub answered: the handshake, our hello, its welcome.
async fn welcome(
    connecting: quinn::Connecting,
    id: &Identity,
    routes_digest: u64,
) -> Result<Connected, ConnectError> {
    let conn = connecting.await.map_err(ConnectError::Connection)?;
    let (send, recv) = conn.open_bi().await.map_err(ConnectError::Connection)?;
    let mut writer = ControlWriter::new(send);
    let mut reader = ControlReader::new(recv);
    let hello = Hello {
        protocol_version: petrel_proto::PROTOCOL_VERSION,
        alpn: String::from_utf8_lossy(ALPN_TUNNEL).into_owned(),
        node_name: id.node_name().to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        self_view: AgentSelfView {
            pod_cidrs: vec![],
            vtep_mac: None,
            underlay_addrs: vec![],
            datapath: "none".into(),
            capabilities: 0,
        },
        routes_digest: Some(routes_digest),
    };
    writer.send(&ControlMessage::Hello(hello)).await?;
    match reader.next().await {
        Ok(Some(ControlMessage::Welcome(w))) => Ok((conn, reader, writer, w)),
        Ok(Some(ControlMessage::GoingAway(ga))) => Err(ConnectError::Refused(ga.message)),
        Ok(Some(other)) => Err(ConnectError::Unexpected(other.name())),
        Ok(None) | Err(_) => Err(match conn.close_reason() {
            Some(reason) => ConnectError::Connection(reason),
            None => ConnectError::ClosedBeforeWelcome,
        }),
    }
}

/// Turns quinn's errors into a sentence: a hub's refusal carries its reason phrase.
fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "hub closed the connection: {}",
            String::from_utf8_lossy(&c.reason)
        ),
        quinn::ConnectionError::ConnectionClosed(c) => format!("hub closed the connection: {c}"),
        other => other.to_string(),
    }
}

// The session's inputs; the sans-IO rework (issue 13) turns them into one state machine.
#[allow(clippy::too_many_arguments)]
async fn session(
    shared: &Arc<AgentShared>,
    endpoint: &str,
    hub_id: &str,
    conn: &quinn::Connection,
    mut reader: ControlReader,
    mut writer: ControlWriter,
    shutdown: &CancellationToken,
    mut routes: RouteState<'_>,
) -> SessionEnd {
    let interval = shared.config.ping_interval;
    let mut keepalive = Keepalive::new(interval, shared.config.dead_after, Instant::now());
    let mut deadline = tokio::time::Instant::now();
    let mut pending_key: Option<NodeKey> = None;
    loop {
        tokio::select! {
            // In this order: shutdown, then the hub's messages before the keepalive deadline, so
            // a loop that wakes late with a message waiting does not declare the hub silent.
            biased;
            _ = shutdown.cancelled() => {
                let _ = writer.send(&ControlMessage::GoingAway(petrel_proto::GoingAway {
                    reason: GoingAwayReason::Shutdown, retry_after_ms: 0, message: "agent stopping".into(),
                })).await;
                writer.finish();
                return SessionEnd::Shutdown;
            }
            msg = reader.next() => {
                keepalive.on_receive(Instant::now());
                match msg {
                    Ok(Some(ControlMessage::Ping(p))) => if let Err(e) = writer.send(&ControlMessage::Pong(p.pong())).await { return SessionEnd::Lost(e.to_string()) },
                    Ok(Some(ControlMessage::Pong(p))) => {
                        if keepalive.on_pong(&p, Instant::now()).is_some() {
                            let rtt = keepalive.rtt();
                            shared.update_link(endpoint, |l| l.rtt_ms = rtt.map(|r| r.as_secs_f64() * 1000.0));
                        }
                    }
                    Ok(Some(ControlMessage::Update(update))) => {
                        debug!(routes = update.routes.len(), gateways = update.gateways.len(), "hub pushed an update");
                        let view = effective_view(&update, routes.table, routes.me);
                        match shared.dataplane.get() {
                            Some(dp) => dp.on_view(&view).await,
                            None => shared.remember_view(hub_id, conn, &view),
                        }
                        shared.proxy.set_policy(&view.egress);
                        shared.learn_endpoints(view.gateways.iter().map(|g| format!("{}:{}", g.host, g.port)));
                        routes.base = update;
                    }
                    Ok(Some(ControlMessage::Routes(chunk))) => {
                        routes.table.apply(&chunk);
                        if routes.table.len() > petrel_proto::routes::MAX_ROUTE_TABLE {
                            *routes.table = RouteTable::new();
                            conn.close(close_code::PROTOCOL_ERROR.into(), b"route table too large");
                            return SessionEnd::Lost(format!("the hub sent more than {} routes", petrel_proto::routes::MAX_ROUTE_TABLE));
                        }
                        if let Some(expected) = chunk.digest {
                            if routes.table.digest() != expected {
                                // Something was lost or misapplied: start over with a snapshot.
                                *routes.table = RouteTable::new();
                                conn.close(close_code::PROTOCOL_ERROR.into(), b"route table digest mismatch");
                                return SessionEnd::Lost("route table digest mismatch; reconnecting for a fresh table".into());
                            }
                            debug!(nodes = routes.table.len(), "route table synced");
                            let view = effective_view(&routes.base, routes.table, routes.me);
                            match shared.dataplane.get() {
                                Some(dp) => dp.on_view(&view).await,
                                None => shared.remember_view(hub_id, conn, &view),
                            }
                        }
                    }
                    Ok(Some(ControlMessage::GoingAway(ga))) => {
                        return SessionEnd::GoingAway { reason: ga.reason, retry_after: Duration::from_millis(u64::from(ga.retry_after_ms)), message: ga.message };
                    }
                    Ok(Some(ControlMessage::RenewResponse(resp))) => {
                        finish_renewal(shared, pending_key.take(), resp);
                    }
                    Ok(Some(ControlMessage::Unknown { msg_type })) => debug!(msg_type, "ignoring unknown optional message"),
                    Ok(Some(other)) => {
                        conn.close(close_code::PROTOCOL_ERROR.into(), format!("unexpected {}", other.name()).as_bytes());
                        return SessionEnd::Lost(format!("hub sent unexpected {}", other.name()));
                    }
                    Ok(None) => return SessionEnd::Lost("hub finished the control stream".into()),
                    Err(e) => return SessionEnd::Lost(match conn.close_reason() { Some(r) => describe_connection_error(&r), None => e.to_string() }),
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                match keepalive.poll(Instant::now()) {
                    KeepaliveAction::SendPing(ping) => {
                        if let Err(e) = writer.send(&ControlMessage::Ping(ping)).await { return SessionEnd::Lost(e.to_string()) }
                        deadline = tokio::time::Instant::now();
                    }
                    KeepaliveAction::TimedOut => {
                        conn.close(close_code::KEEPALIVE_TIMEOUT.into(), b"hub unresponsive");
                        return SessionEnd::Lost(format!("hub silent for {:?}", shared.config.dead_after));
                    }
                    KeepaliveAction::Wait(at) => deadline = tokio::time::Instant::from_std(at).min(tokio::time::Instant::now() + Duration::from_secs(1)),
                }
                if pending_key.is_none() {
                    pending_key = maybe_start_renewal(shared, &mut writer).await;
                }
            }
            datagram = conn.read_datagram() => match datagram {
                Ok(d) => if let Some(dp) = shared.dataplane.get() { dp.deliver(d).await },
                Err(e) => return SessionEnd::Lost(describe_connection_error(&e)),
            },
            stream = conn.accept_bi() => match stream {
                // The hub opens one bidirectional stream per proxied TCP connection.
                Ok((send, recv)) => {
                    let span = tracing::debug_span!("stream", id = %send.id());
                    tokio::spawn(tracing::Instrument::instrument(crate::proxy::serve_stream(shared.proxy.clone(), send, recv), span));
                }
                Err(e) => return SessionEnd::Lost(describe_connection_error(&e)),
            },
            closed = conn.closed() => return SessionEnd::Lost(describe_connection_error(&closed)),
        }
    }
}

/// Starts a renewal when the certificate is two thirds through its life and no other link is
/// already renewing. A new key is made for each renewal.
async fn maybe_start_renewal(shared: &AgentShared, writer: &mut ControlWriter) -> Option<NodeKey> {
    let id = shared.identity();
    if SystemTime::now() < id.info.renew_at() {
        return None;
    }
    if shared.renewing.swap(true, Ordering::SeqCst) {
        return None;
    }
    let key = match NodeKey::generate() {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "cannot make a key for renewal");
            shared.renewing.store(false, Ordering::SeqCst);
            return None;
        }
    };
    let csr = match key.csr_der(id.node_name()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot make a CSR for renewal");
            shared.renewing.store(false, Ordering::SeqCst);
            return None;
        }
    };
    info!(not_after = %humantime::format_rfc3339_seconds(id.info.not_after), "renewing node certificate");
    if writer
        .send(&ControlMessage::RenewRequest(RenewRequest { csr_der: csr }))
        .await
        .is_err()
    {
        shared.renewing.store(false, Ordering::SeqCst);
        return None;
    }
    Some(key)
}

/// Why a renewed certificate from the hub is not taken.
#[derive(Debug, thiserror::Error)]
enum RenewalRejected {
    #[error("renewal came back with a different CA")]
    OtherCa,
    #[error("renewed certificate is not for the new key")]
    OtherKey,
    #[error(transparent)]
    Unreadable(#[from] petrel_transport::pki::PkiError),
    #[error("renewed certificate names {0:?}")]
    OtherNode(String),
    #[error(transparent)]
    Store(#[from] crate::identity::IdentityError),
}

fn finish_renewal(shared: &AgentShared, key: Option<NodeKey>, resp: petrel_proto::RenewResponse) {
    shared.renewing.store(false, Ordering::SeqCst);
    let Some(key) = key else {
        warn!("renewal response without a pending request; ignored");
        return;
    };
    let bundle = match resp.result {
        Ok(b) => b,
        Err(e) => {
            AgentMetrics::inc(&shared.metrics.renewals, "refused");
            warn!(error = %e.message, "hub refused certificate renewal");
            return;
        }
    };
    let current = shared.identity();
    let checked = (|| {
        if bundle.ca_der.as_slice() != current.ca_der.as_ref() {
            return Err(RenewalRejected::OtherCa);
        }
        if !key.matches(&bundle.cert_der) {
            return Err(RenewalRejected::OtherKey);
        }
        let info = CertInfo::parse(&bundle.cert_der)?;
        if info.node_name != current.node_name() {
            return Err(RenewalRejected::OtherNode(info.node_name));
        }
        shared.state.store(&key, &bundle.cert_der, &bundle.ca_der)?;
        Ok(Identity {
            key,
            cert_der: bundle.cert_der.clone().into(),
            ca_der: current.ca_der.clone(),
            info,
        })
    })();
    match checked {
        Ok(id) => {
            info!(not_after = %humantime::format_rfc3339_seconds(id.info.not_after), "node certificate renewed");
            AgentMetrics::inc(&shared.metrics.renewals, "ok");
            shared.set_identity(id);
        }
        Err(e) => {
            AgentMetrics::inc(&shared.metrics.renewals, "invalid");
            warn!(error = %e, "renewed certificate rejected; keeping the current one");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_are_classified_by_variant() {
        let peer_alert = |alert: u8| {
            ConnectError::Connection(quinn::ConnectionError::ConnectionClosed(
                quinn::ConnectionClose {
                    error_code: quinn::TransportErrorCode::crypto(alert),
                    frame_type: None,
                    reason: bytes::Bytes::from_static(b"invalid peer certificate"),
                },
            ))
        };
        assert_eq!(
            ConnectError::NoAnswer(Duration::from_secs(3)).reason(),
            "no_answer"
        );
        let resolve = ConnectError::Resolve {
            endpoint: "hub.example:7443".into(),
            source: std::io::Error::other("no such host"),
        };
        assert_eq!(resolve.reason(), "resolve");
        assert_eq!(
            ConnectError::ResolvesToNothing("h:1".into()).reason(),
            "resolve"
        );
        // The hub's rustls refused our certificate: unknown CA, bad certificate, expired.
        for alert in [48, 42, 45] {
            assert_eq!(peer_alert(alert).reason(), "tls", "{alert}");
        }
        assert_eq!(
            ConnectError::Refused("node edge-x is not admitted".into()).reason(),
            "refused"
        );
        let closed = ConnectError::Connection(quinn::ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: quinn::VarInt::from_u32(0x10),
                reason: bytes::Bytes::from_static(b"not admitted"),
            },
        ));
        assert_eq!(closed.reason(), "refused");
        assert_eq!(
            closed.to_string(),
            "hub closed the connection: not admitted"
        );
        assert_eq!(
            ConnectError::NoWelcome(Duration::from_secs(10)).reason(),
            "no_welcome"
        );
        assert_eq!(
            ConnectError::Socket(std::io::Error::other("EMFILE")).reason(),
            "other"
        );
        assert_eq!(
            ConnectError::Connection(quinn::ConnectionError::TimedOut).reason(),
            "other"
        );
    }
}
