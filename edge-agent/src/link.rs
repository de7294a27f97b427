//! One link: the agent's tunnel to one hub endpoint, kept up forever. Connect (mutual TLS with the
//! node certificate, ALPN `petrel/1`), then pump [`petrel_proto::session::AgentSession`] (hello,
//! welcome, pings for RTT and liveness, updates and route sync, renewal, going-away) and perform
//! what it asks. When it ends, wait as [`AgentSessionEnd::next_attempt`] says (the hub's
//! `retry_after` after a going-away, else capped jittered exponential backoff that resets after
//! a stable session) and connect again.
//!
//! Each connection's receive path is its own task (`receive`): datagrams go to the data plane
//! and the hub's streams to the proxy without passing through the control loop.
//!
//! State changes are logged once at info; retries of the same failure go to debug, so a hub that
//! is down for an hour does not fill the journal.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use petrel_proto::session::{
    AgentAction, AgentSession, AgentSessionConfig, AgentSessionEnd, NextAttempt,
};
use petrel_proto::{Backoff, BackoffPolicy, Hello, HubView, RouteTable, Welcome, ALPN_TUNNEL};
use petrel_transport::control_stream::{ControlReader, ControlWriter, StreamError};
use petrel_transport::pki::{CertInfo, NodeKey};
use petrel_transport::quic::TransportTuning;
use petrel_transport::{close_code, quic, tls, HUB_SERVER_NAME};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::identity::Identity;
use crate::links::LinkState;
use crate::metrics::AgentMetrics;
use crate::shared::AgentShared;
use crate::transport_choice::{Carrier, TransportChoice};

/// How a link's session ended.
#[derive(Debug, thiserror::Error)]
enum LinkEnd {
    #[error(transparent)]
    Session(#[from] AgentSessionEnd),
    /// The connection or the stream failed under the session.
    #[error("{0}")]
    Lost(String),
}

pub async fn run(shared: Arc<AgentShared>, endpoint: String, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(BackoffPolicy::agent_reconnect(shared.config.backoff_max));
    let mut delay = Duration::ZERO;
    let mut last_logged_error: Option<String> = None;
    // The cluster route table as this link last synced it; kept across reconnects, so a hub
    // that still has the same table sends nothing (see petrel_proto::routes).
    let mut routes = RouteTable::new();
    let mut choice = TransportChoice::new(shared.config.transport);
    // The hub's address tokens (QUIC NEW_TOKEN), kept across this link's attempts: the next
    // connect presents one and skips the Retry round trip a busy hub (one just restarted, with
    // a whole fleet reconnecting) would otherwise ask for. One store per link, because tokens
    // are filed under the server name, which every hub shares, and one hub's token is
    // worthless at another.
    let address_tokens: Arc<dyn quinn::TokenStore> = Arc::new(quinn::TokenMemoryCache::default());
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
        shared.links.update(&endpoint, |l| {
            l.state = LinkState::Connecting;
            l.attempts += 1;
        });
        let carrier = choice.next();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            // connect() bounds itself: connect_timeout for an answer, then ADMITTED_GRACE.
            r = connect(&shared, &endpoint, &mut routes, carrier, &address_tokens) => r,
        };
        let connected = match attempt {
            Ok(v) => v,
            Err(e) => {
                let was_tcp = choice.next() == Carrier::Tcp;
                choice.failed(carrier, !matches!(e, ConnectError::NoAnswer(_)));
                if !was_tcp && choice.next() == Carrier::Tcp {
                    warn!(
                        tcp_port = shared.config.tcp_port,
                        "no answer over UDP; trying the TCP fallback (QUIC over TLS on TCP)"
                    );
                }
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
                shared.links.update(&endpoint, |l| {
                    l.state = LinkState::Backoff;
                    l.last_error = Some(e);
                });
                continue;
            }
        };
        let Connected {
            conn,
            reader,
            writer,
            session,
            welcome,
            carrier: carrier_guard,
            endpoint: udp_endpoint,
        } = connected;
        choice.connected(carrier);
        // On the TCP fallback, UDP is tried again in the background; once it answers this
        // tunnel is closed and the next attempt is UDP.
        let udp_retry = choice
            .retries_udp(carrier)
            .then(|| tokio::spawn(retry_udp(shared.clone(), endpoint.clone(), conn.clone())));
        AgentMetrics::inc(&shared.metrics.connect_attempts, "ok");
        last_logged_error = None;
        backoff.on_connected(Instant::now());
        let since = SystemTime::now();
        info!(hub = %welcome.hub_id, remote = %conn.remote_address(), site = %welcome.site, "connected to hub");
        shared.links.update(&endpoint, |l| {
            l.state = LinkState::Connected;
            l.hub = Some(welcome.hub_id.clone());
            l.remote = Some(conn.remote_address().to_string());
            l.connected_since_unix = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            l.rtt_ms = Some(conn.rtt().as_secs_f64() * 1000.0);
            l.last_error = None;
            l.transport = Some(carrier.as_str().to_string());
        });
        shared
            .links
            .track_tunnel(&endpoint, Some((&welcome.hub_id, &conn)));
        shared.dataplane.set_site(&welcome.site);
        shared.dataplane.tunnel_up(&welcome.hub_id, &conn);
        let hub_id = welcome.hub_id.clone();
        let receiver = tokio::spawn(receive(shared.clone(), conn.clone()));
        // Peers the hub offers reach this agent on the tunnel's own socket (the NAT mapping
        // the hub saw): it accepts them while this session lasts.
        let direct_endpoint = udp_endpoint.as_ref().filter(|_| shared.config.direct_paths);
        let mut listener_cert = None;
        let peer_server = direct_endpoint.and_then(|ep| {
            let id = shared.credentials.identity();
            match crate::direct_paths::DirectPaths::listen_on(ep, &id, shared.config.congestion) {
                Ok(()) => {
                    listener_cert = Some(id.cert_der.clone());
                    Some(tokio::spawn(shared.direct.clone().serve(ep.clone())))
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept direct paths on the tunnel socket");
                    None
                }
            }
        });
        let mut link = Link {
            shared: &shared,
            endpoint: &endpoint,
            conn: &conn,
            writer,
            session,
            pending_key: None,
            udp_endpoint: direct_endpoint,
            listener_cert,
        };
        let end = link.pump(reader, &shutdown).await;
        // Lost without a goodbye, the whole fleet may have lost this hub at once: the first
        // attempt waits for its share of the hub's spread (petrel_proto::backoff::herd_delay).
        let herd = link
            .session
            .herd_delay(Instant::now(), rand::rng().random());
        routes = link.session.into_routes();
        receiver.abort();
        if let Some(t) = peer_server {
            t.abort();
        }
        if let Some(ep) = &udp_endpoint {
            ep.set_server_config(None);
        }
        if let Some(t) = udp_retry {
            if !t.is_finished() {
                t.abort();
            } else if matches!(t.await, Ok(true)) {
                info!("UDP answers again: leaving the TCP fallback");
                choice.udp_answers();
            }
        }
        drop(carrier_guard);
        shared.links.track_tunnel(&endpoint, None);
        shared.dataplane.tunnel_down(&conn);
        backoff.on_disconnected(Instant::now());
        shared.links.update(&endpoint, |l| {
            l.state = LinkState::Disconnected;
            l.rtt_ms = None;
            l.connected_since_unix = None;
            l.transport = None;
        });
        let same_hub_link = match &end {
            LinkEnd::Session(AgentSessionEnd::GoingAway { .. }) => {
                shared.links.other_on_hub(&hub_id, &endpoint)
            }
            _ => None,
        };
        let next = match &end {
            LinkEnd::Session(e) => e.next_attempt(same_hub_link.is_some(), rand::rng().random()),
            LinkEnd::Lost(_) => NextAttempt::Backoff,
        };
        match next {
            NextAttempt::Stop => {
                conn.close(close_code::NORMAL.into(), b"agent stopping");
                break;
            }
            NextAttempt::Park(wait) => {
                AgentMetrics::inc(&shared.metrics.sessions_ended, "going_away");
                let other = same_hub_link.unwrap_or_default();
                info!(other = %other, "this endpoint reaches the same hub as another link; parking it");
                shared.links.update(&endpoint, |l| {
                    l.state = LinkState::Parked;
                    l.last_error = Some(format!("same hub as {other}"));
                });
                delay = wait;
            }
            NextAttempt::After(wait) => {
                AgentMetrics::inc(&shared.metrics.sessions_ended, "going_away");
                info!(reason = %end, retry_in = ?wait, "hub is going away; will reconnect");
                let why = match &end {
                    LinkEnd::Session(AgentSessionEnd::GoingAway { message, .. }) => message.clone(),
                    other => other.to_string(),
                };
                shared.links.update(&endpoint, |l| {
                    l.last_error = Some(format!("hub going away: {why}"))
                });
                delay = wait;
            }
            NextAttempt::Backoff => {
                AgentMetrics::inc(&shared.metrics.sessions_ended, "lost");
                let why = end.to_string();
                delay = backoff.next_delay(rand::rng().random()).max(herd);
                info!(reason = %why, retry_in = ?delay, "tunnel to hub lost; reconnecting");
                shared.links.update(&endpoint, |l| l.last_error = Some(why));
            }
        }
        conn.close(close_code::NORMAL.into(), b"reconnecting");
    }
    shared
        .links
        .update(&endpoint, |l| l.state = LinkState::Stopped);
}

/// A connection the hub welcomed.
struct Connected {
    conn: quinn::Connection,
    reader: ControlReader,
    writer: ControlWriter,
    /// Running; its queue still holds the welcome's view.
    session: AgentSession,
    welcome: Welcome,
    /// The TCP fallback's carrier, if this tunnel rides it.
    carrier: Option<CarrierGuard>,
    /// The tunnel's UDP endpoint (`None` on the TCP fallback): direct paths use its socket.
    endpoint: Option<quinn::Endpoint>,
}

/// The connection's receive path, apart from the control loop, one handler per direction of
/// traffic the hub starts: its datagrams to the data plane (drained from this connection, the
/// one that read them), its streams to the proxy. Each loop waits on one thing only, so a
/// datagram costs no polls of anything else.
async fn receive(shared: Arc<AgentShared>, conn: quinn::Connection) {
    // Aborted with this task too (the control loop aborts it when the session ends, which may
    // be before the connection closes).
    let _streams = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(accept_streams(
        shared.clone(),
        conn.clone(),
    )));
    // The control loop sees the connection end and reports it.
    while let Ok(d) = conn.read_datagram().await {
        if let Some(dp) = shared.dataplane.get() {
            dp.deliver(&conn, d).await;
        }
    }
}

/// The hub opens one bidirectional stream per proxied TCP connection.
async fn accept_streams(shared: Arc<AgentShared>, conn: quinn::Connection) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let span = tracing::debug_span!("stream", id = %send.id());
        tokio::spawn(tracing::Instrument::instrument(
            crate::proxy::serve_stream(shared.proxy.clone(), send, recv),
            span,
        ));
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
    /// The TCP fallback's TCP or TLS connection failed.
    #[error("TCP fallback to {addr}: {message}")]
    Tcp {
        addr: std::net::SocketAddr,
        message: String,
    },
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
            Self::Tcp { .. } => "tcp",
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
    routes: &mut RouteTable,
    carrier: Carrier,
    address_tokens: &Arc<dyn quinn::TokenStore>,
) -> Result<Connected, ConnectError> {
    let id = shared.credentials.identity();
    if id.is_expired(SystemTime::now()) {
        // Still try: the clock may be wrong rather than the certificate; the hub's answer will say.
        warn!(not_after = %humantime::format_rfc3339_seconds(id.info.not_after), "node certificate has expired; re-enrol with `petrel-edge-agent join --force` if the clock is right");
    }
    let within = shared.config.connect_timeout;
    let addr = resolve(endpoint, within).await?;
    let mut client = tunnel_client_config(&id, shared.config.congestion)?;
    client.token_store(address_tokens.clone());
    let (ep, addr, carrier_task) = match carrier {
        // A fresh UDP socket per attempt: a new source port also means a new NAT mapping,
        // which is what a stuck mapping needs.
        Carrier::Udp => (udp_endpoint(addr)?, addr, None),
        Carrier::Tcp => {
            let tcp_addr = std::net::SocketAddr::new(addr.ip(), shared.config.tcp_port);
            let (ep, carried, task) = tcp_carrier(&id, tcp_addr, within).await?;
            // Guarded from here: an attempt that fails below ends its TCP connection too.
            (ep, carried, Some(CarrierGuard(task)))
        }
    };
    let mut connecting = ep.connect_with(client, addr, HUB_SERVER_NAME)?;
    quic::await_answer(&mut connecting, within)
        .await
        .map_err(|e| match e {
            quic::DialError::Connection(e) => ConnectError::Connection(e),
            quic::DialError::NoAnswer(d) => ConnectError::NoAnswer(d),
        })?;
    let config = AgentSessionConfig {
        ping_interval: shared.config.ping_interval,
        dead_after: shared.config.dead_after,
    };
    // The table goes into the session and comes back out whatever happens to the attempt.
    let mut session = AgentSession::new(
        hello(&id, shared.config.direct_paths),
        std::mem::take(routes),
        config,
    );
    let welcomed = tokio::time::timeout(quic::ADMITTED_GRACE, welcome(connecting, &mut session))
        .await
        .map_err(|_| ConnectError::NoWelcome(quic::ADMITTED_GRACE))
        .and_then(|r| r);
    match welcomed {
        Ok((conn, reader, writer, welcome)) => Ok(Connected {
            conn,
            reader,
            writer,
            session,
            welcome,
            endpoint: carrier_task.is_none().then_some(ep),
            carrier: carrier_task,
        }),
        Err(e) => {
            *routes = session.into_routes();
            Err(e)
        }
    }
}

/// While a tunnel rides the TCP fallback: every `udp-retry-interval`, a QUIC handshake over
/// UDP to the same endpoint; once one completes, closes the TCP tunnel (the link then
/// reconnects over UDP) and returns true.
async fn retry_udp(
    shared: Arc<AgentShared>,
    endpoint: String,
    tcp_conn: quinn::Connection,
) -> bool {
    loop {
        tokio::select! {
            _ = tcp_conn.closed() => return false,
            _ = tokio::time::sleep(shared.config.udp_retry_interval) => {}
        }
        if udp_answers(&shared, &endpoint).await {
            tcp_conn.close(close_code::NORMAL.into(), b"moving back to UDP");
            return true;
        }
    }
}

/// Resolves `host:port` (brackets allowed around an IPv6 host) within `within`.
async fn resolve(endpoint: &str, within: Duration) -> Result<std::net::SocketAddr, ConnectError> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| ConnectError::BadEndpoint(endpoint.into()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| ConnectError::BadPort(endpoint.into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    tokio::time::timeout(within, tokio::net::lookup_host((host, port)))
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
        .ok_or_else(|| ConnectError::ResolvesToNothing(endpoint.into()))
}

/// The tunnel's QUIC client configuration: this node's certificate, the hub CA, ALPN
/// `petrel/1`.
fn tunnel_client_config(
    id: &Identity,
    congestion: petrel_transport::quic::CongestionControl,
) -> Result<quinn::ClientConfig, ConnectError> {
    let tls_cfg = tls::agent_client_tls(
        &id.ca_der,
        vec![id.cert_der.clone()],
        id.key_der(),
        ALPN_TUNNEL,
    )?;
    let tuning = TransportTuning {
        congestion,
        ..TransportTuning::default()
    };
    Ok(quic::client_config(tls_cfg, &tuning)?)
}

/// A client endpoint on a fresh UDP socket of `addr`'s family.
fn udp_endpoint(addr: std::net::SocketAddr) -> Result<quinn::Endpoint, ConnectError> {
    let bind = if addr.is_ipv4() {
        std::net::SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    quic::client_endpoint(bind).map_err(ConnectError::Socket)
}

/// Whether a QUIC handshake over UDP to `endpoint` completes (then closed at once, before any
/// hello: the hub counts an agent that left before its welcome, nothing else).
async fn udp_answers(shared: &AgentShared, endpoint: &str) -> bool {
    let within = shared.config.connect_timeout;
    let attempt = async {
        let addr = resolve(endpoint, within).await?;
        let client =
            tunnel_client_config(&shared.credentials.identity(), shared.config.congestion)?;
        let connecting = udp_endpoint(addr)?.connect_with(client, addr, HUB_SERVER_NAME)?;
        Ok::<_, ConnectError>(connecting)
    };
    let Ok(connecting) = attempt.await else {
        return false;
    };
    match tokio::time::timeout(within, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(close_code::NORMAL.into(), b"udp probe");
            true
        }
        _ => false,
    }
}

/// Ends the TCP fallback's carrier task (and so its TCP connection) with the tunnel.
#[derive(Debug)]
struct CarrierGuard(tokio::task::JoinHandle<()>);

impl Drop for CarrierGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The TCP fallback: a TLS connection to the hub's TCP listener (mutual: this node's
/// certificate, the hub's identity checked as over QUIC), carrying QUIC packets for a client
/// endpoint of its own. Returns the endpoint, the address to dial on it and the carrier task.
async fn tcp_carrier(
    id: &Identity,
    addr: std::net::SocketAddr,
    within: Duration,
) -> Result<
    (
        quinn::Endpoint,
        std::net::SocketAddr,
        tokio::task::JoinHandle<()>,
    ),
    ConnectError,
> {
    let fail = |message: String| ConnectError::Tcp { addr, message };
    let tls_cfg = tls::agent_client_tls(
        &id.ca_der,
        vec![id.cert_der.clone()],
        id.key_der(),
        petrel_proto::ALPN_TCP_CARRIER,
    )?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg));
    let name =
        rustls_pki_types::ServerName::try_from(HUB_SERVER_NAME).map_err(|e| fail(e.to_string()))?;
    let stream = tokio::time::timeout(within, async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))
    })
    .await
    .map_err(|_| fail(format!("no answer within {within:?}")))??;
    let socket = petrel_transport::stream_carrier::CarrierSocket::new();
    let (carried, task) = socket.attach(stream);
    let ep =
        petrel_transport::stream_carrier::endpoint(socket, quinn::EndpointConfig::default(), None)
            .map_err(ConnectError::Socket)?;
    Ok((ep, carried, task))
}

fn hello(id: &Identity, direct_paths: bool) -> Hello {
    // The session fills in the digest of the table it is given.
    let mut h = Hello::tunnel(id.node_name(), env!("CARGO_PKG_VERSION"));
    if direct_paths {
        h.self_view.capabilities |= petrel_proto::control::capability::DIRECT_PATHS;
    }
    h
}

/// The rest of a connect once the hub answered: the handshake, the session's hello, the hub's
/// welcome (or its refusal).
async fn welcome(
    connecting: quinn::Connecting,
    session: &mut AgentSession,
) -> Result<(quinn::Connection, ControlReader, ControlWriter, Welcome), ConnectError> {
    let conn = connecting.await.map_err(ConnectError::Connection)?;
    let (send, recv) = conn.open_bi().await.map_err(ConnectError::Connection)?;
    let mut writer = ControlWriter::new(send);
    let mut reader = ControlReader::new(recv);
    let closed = |conn: &quinn::Connection| match conn.close_reason() {
        Some(reason) => ConnectError::Connection(reason),
        None => ConnectError::ClosedBeforeWelcome,
    };
    loop {
        while let Some(action) = session.poll_action() {
            match action {
                AgentAction::Send(msg) => writer.send(&msg).await?,
                AgentAction::Welcomed(w) => return Ok((conn, reader, writer, *w)),
                AgentAction::Close(c) => conn.close(c.code.into(), c.reason.as_bytes()),
                AgentAction::Ended(AgentSessionEnd::Refused(why)) => {
                    return Err(ConnectError::Refused(why))
                }
                AgentAction::Ended(AgentSessionEnd::Unexpected(name)) => {
                    return Err(ConnectError::Unexpected(name))
                }
                AgentAction::Ended(_) => return Err(closed(&conn)),
                // Only after the welcome.
                AgentAction::ApplyView(_)
                | AgentAction::ApplyViewRoutesPending(_)
                | AgentAction::Rtt(_)
                | AgentAction::RenewalAnswered(_)
                | AgentAction::PeerOffered(_) => {}
            }
        }
        match reader.next().await {
            Ok(Some(msg)) => session.handle_message(msg, Instant::now()),
            Ok(None) => session.handle_finished(),
            Err(StreamError::Decode(e)) => session.handle_malformed(e),
            Err(_) => return Err(closed(&conn)),
        }
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

/// One welcomed session of a link and what its actions are performed on.
struct Link<'a> {
    shared: &'a Arc<AgentShared>,
    endpoint: &'a str,
    conn: &'a quinn::Connection,
    writer: ControlWriter,
    session: AgentSession,
    /// The key of the renewal in flight.
    pending_key: Option<NodeKey>,
    /// The tunnel's UDP endpoint, where direct paths the hub offers are dialed from, while
    /// direct paths are on.
    udp_endpoint: Option<&'a quinn::Endpoint>,
    /// The certificate the endpoint accepts peers with.
    listener_cert: Option<rustls_pki_types::CertificateDer<'static>>,
}

impl Link<'_> {
    async fn pump(&mut self, mut reader: ControlReader, shutdown: &CancellationToken) -> LinkEnd {
        loop {
            if let Err(end) = self.perform().await {
                return end;
            }
            // At least once a second, to see whether the certificate is due for renewal.
            let soon = Instant::now() + Duration::from_secs(1);
            let timer = self.session.poll_timeout().map_or(soon, |t| t.min(soon));
            tokio::select! {
                // In this order: shutdown, then the hub's messages before the keepalive
                // deadline, so a loop that wakes late with a message waiting does not declare
                // the hub silent.
                biased;
                _ = shutdown.cancelled(), if !self.session.is_ended() => self.session.shutdown(),
                msg = reader.next() => match msg {
                    Ok(Some(msg)) => self.session.handle_message(msg, Instant::now()),
                    Ok(None) => self.session.handle_finished(),
                    Err(StreamError::Decode(e)) => self.session.handle_malformed(e),
                    Err(e) => return LinkEnd::Lost(match self.conn.close_reason() {
                        Some(r) => describe_connection_error(&r),
                        None => e.to_string(),
                    }),
                },
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(timer)) => {
                    self.session.handle_timeout(Instant::now());
                    if !self.session.is_renewing() && !self.session.is_ended() {
                        self.maybe_start_renewal();
                        self.refresh_peer_listener();
                    }
                }
                closed = self.conn.closed() => return LinkEnd::Lost(describe_connection_error(&closed)),
            }
        }
    }

    /// Performs every queued action; `Err` once the session is over.
    async fn perform(&mut self) -> Result<(), LinkEnd> {
        while let Some(action) = self.session.poll_action() {
            match action {
                AgentAction::Send(msg) => self
                    .writer
                    .send(&msg)
                    .await
                    .map_err(|e| LinkEnd::Lost(e.to_string()))?,
                AgentAction::ApplyView(view) => self.apply_view(&view, true).await,
                AgentAction::ApplyViewRoutesPending(view) => self.apply_view(&view, false).await,
                AgentAction::Rtt(rtt) => self.shared.links.update(self.endpoint, |l| {
                    l.rtt_ms = Some(rtt.as_secs_f64() * 1000.0)
                }),
                AgentAction::RenewalAnswered(resp) => {
                    finish_renewal(self.shared, self.pending_key.take(), resp)
                }
                AgentAction::Close(close) => {
                    self.writer.finish();
                    if !close.linger.is_zero() {
                        // Let the going-away arrive and the hub close first.
                        let _ = tokio::time::timeout(close.linger, self.conn.closed()).await;
                    }
                    self.conn.close(close.code.into(), close.reason.as_bytes());
                }
                AgentAction::Ended(end) => {
                    if self.pending_key.take().is_some() {
                        self.shared.credentials.end_renewal();
                    }
                    return Err(end.into());
                }
                AgentAction::PeerOffered(offer) => self.peer_offered(offer),
                // Taken by the connect.
                AgentAction::Welcomed(_) => {}
            }
        }
        Ok(())
    }

    /// The hub offers a direct path to a peer: taken when this tunnel is on UDP, direct paths
    /// are on and the data plane is open (the offer comes again while traffic crosses the hub).
    fn peer_offered(&self, offer: petrel_proto::PeerOffer) {
        let (Some(endpoint), true, Some(dp)) = (
            self.udp_endpoint,
            self.shared.config.direct_paths,
            self.shared.dataplane.get(),
        ) else {
            return;
        };
        self.shared.direct.offered(
            offer,
            endpoint,
            crate::direct_paths::PeerContext {
                dataplane: dp.clone(),
                identity: self.shared.credentials.identity(),
                congestion: self.shared.config.congestion,
            },
        );
    }

    /// A view from the hub (its welcome, an update, a synced route table): the egress policy,
    /// the endpoints to dial, and the data plane. A view whose routes are still to come
    /// (`routes_known` false: this link's table is not synced yet) does not replace the
    /// routes the data plane has from another link; it is taken only when there are none.
    async fn apply_view(&self, view: &HubView, routes_known: bool) {
        let shared = self.shared;
        shared.proxy.set_policy(&view.egress);
        shared.endpoints.learn(
            view.gateways
                .iter()
                .map(|g| format!("{}:{}", g.host, g.port)),
        );
        if let Some(dp) = shared.dataplane.view(view, routes_known) {
            dp.reconcile_now().await;
            // Direct peers re-derive what their frames must carry.
            shared.direct.view_changed();
        }
    }

    /// After a renewal, peers must see the new certificate on this tunnel's socket.
    fn refresh_peer_listener(&mut self) {
        let Some(ep) = self.udp_endpoint else {
            return;
        };
        let id = self.shared.credentials.identity();
        if self.listener_cert.as_ref() == Some(&id.cert_der) {
            return;
        }
        match crate::direct_paths::DirectPaths::listen_on(ep, &id, self.shared.config.congestion) {
            Ok(()) => self.listener_cert = Some(id.cert_der.clone()),
            Err(e) => warn!(error = %e, "cannot accept direct paths with the renewed certificate"),
        }
    }

    /// Starts a renewal when the certificate is two thirds through its life and no other link
    /// is already renewing. A new key is made for each renewal.
    fn maybe_start_renewal(&mut self) {
        let shared = self.shared;
        let id = shared.credentials.identity();
        if SystemTime::now() < id.info.renew_at() {
            return;
        }
        if !shared.credentials.start_renewal() {
            return;
        }
        let csr = NodeKey::generate()
            .map_err(|e| e.to_string())
            .and_then(|key| {
                key.csr_der(id.node_name())
                    .map(|csr| (key, csr))
                    .map_err(|e| e.to_string())
            });
        let (key, csr) = match csr {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot make a key and CSR for renewal");
                shared.credentials.end_renewal();
                return;
            }
        };
        if !self.session.start_renewal(csr) {
            shared.credentials.end_renewal();
            return;
        }
        info!(not_after = %humantime::format_rfc3339_seconds(id.info.not_after), "renewing node certificate");
        self.pending_key = Some(key);
    }
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
    shared.credentials.end_renewal();
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
    let current = shared.credentials.identity();
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
        shared
            .credentials
            .state
            .store(&key, &bundle.cert_der, &bundle.ca_der)?;
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
            shared.credentials.set_identity(id);
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
