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

use crate::agent::AgentShared;
use crate::identity::Identity;
use crate::metrics::AgentMetrics;

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
            l.state = "connecting".into();
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
                        reason: crate::metrics::handshake_failure_reason(&e).to_string(),
                    })
                    .inc();
                if last_logged_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "cannot connect to hub; retrying with backoff");
                    last_logged_error = Some(e.clone());
                } else {
                    debug!(error = %e, attempt = backoff.attempts(), "connect failed again");
                }
                delay = backoff.next_delay(rand::rng().random());
                shared.update_link(&endpoint, |l| {
                    l.state = "backoff".into();
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
            l.state = "connected".into();
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
            l.state = "disconnected".into();
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
                        l.state = "parked".into();
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
    shared.update_link(&endpoint, |l| l.state = "stopped".into());
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

async fn connect(
    shared: &AgentShared,
    endpoint: &str,
    routes_digest: u64,
) -> Result<Connected, String> {
    let id = shared.identity();
    if id.is_expired(SystemTime::now()) {
        // Still try: the clock may be wrong rather than the certificate; the hub's answer will say.
        warn!(not_after = %humantime::format_rfc3339_seconds(id.info.not_after), "node certificate has expired; re-enrol with `petrel-edge-agent join --force` if the clock is right");
    }
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("bad endpoint {endpoint}"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port in {endpoint}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let within = shared.config.connect_timeout;
    let addr = tokio::time::timeout(within, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| format!("cannot resolve {endpoint} within {within:?}"))?
        .map_err(|e| format!("cannot resolve {endpoint}: {e}"))?
        .next()
        .ok_or_else(|| format!("{endpoint} resolves to nothing"))?;
    let tls_cfg = tls::agent_client_tls(
        &id.ca_der,
        vec![id.cert_der.clone()],
        id.key_der(),
        ALPN_TUNNEL,
    )
    .map_err(|e| e.to_string())?;
    let tuning = TransportTuning {
        congestion: shared.config.congestion,
        ..TransportTuning::default()
    };
    let client = quic::client_config(tls_cfg, &tuning).map_err(|e| e.to_string())?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    // A fresh UDP socket per attempt: a new source port also means a new NAT mapping, which is
    // what a stuck mapping needs.
    let ep = quic::client_endpoint(bind.parse().map_err(|_| "bad bind address".to_string())?)
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    let mut connecting = ep
        .connect_with(client, addr, HUB_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    quic::await_answer(&mut connecting, within)
        .await
        .map_err(|e| match e {
            quic::DialError::Connection(e) => describe_connection_error(&e),
            other => other.to_string(),
        })?;
    tokio::time::timeout(
        quic::ADMITTED_GRACE,
        welcome(connecting, &id, routes_digest),
    )
    .await
    .map_err(|_| {
        format!(
            "hub answered but did not welcome us within {:?}",
            quic::ADMITTED_GRACE
        )
    })?
}

/// The rest of a connect once the hub answered: the handshake, our hello, its welcome.
async fn welcome(
    connecting: quinn::Connecting,
    id: &Identity,
    routes_digest: u64,
) -> Result<Connected, String> {
    let conn = connecting
        .await
        .map_err(|e| describe_connection_error(&e))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| describe_connection_error(&e))?;
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
    writer
        .send(&ControlMessage::Hello(hello))
        .await
        .map_err(|e| e.to_string())?;
    match reader.next().await {
        Ok(Some(ControlMessage::Welcome(w))) => Ok((conn, reader, writer, w)),
        Ok(Some(ControlMessage::GoingAway(ga))) => {
            Err(format!("hub refused the tunnel: {}", ga.message))
        }
        Ok(Some(other)) => Err(format!("hub sent {} instead of welcome", other.name())),
        Ok(None) | Err(_) => Err(match conn.close_reason() {
            Some(reason) => describe_connection_error(&reason),
            None => "hub closed the control stream before welcoming us".into(),
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
                    tokio::spawn(tracing::Instrument::instrument(crate::proxy::serve_stream(shared.clone(), send, recv), span));
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
            return Err("renewal came back with a different CA".to_string());
        }
        if !key.matches(&bundle.cert_der) {
            return Err("renewed certificate is not for the new key".to_string());
        }
        let info = CertInfo::parse(&bundle.cert_der).map_err(|e| e.to_string())?;
        if info.node_name != current.node_name() {
            return Err(format!("renewed certificate names {:?}", info.node_name));
        }
        shared
            .state
            .store(&key, &bundle.cert_der, &bundle.ca_der)
            .map_err(|e| e.to_string())?;
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
