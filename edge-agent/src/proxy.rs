//! Proxied streams: the hub opens one QUIC bidirectional stream per TCP connection the API
//! server asked for. The agent reads the `StreamOpen` header (bounded by
//! [`petrel_proto::stream::MAX_STREAM_PREAMBLE`] and [`HEADER_TIMEOUT`]), checks that the target
//! lies inside its own site (the [`EgressPolicy`] the hub sent in its view: the site's node
//! addresses on the kubelet/metrics ports, the site's pod CIDRs on the allowed pod ports), dials
//! it with the connect timeout, answers with a `StreamResult`, and then copies bytes both ways.
//!
//! Half-close travels in both directions (a QUIC FIN becomes a TCP `shutdown(Write)` and a TCP
//! EOF becomes a QUIC FIN); an error on either side aborts both (QUIC reset/stop-sending, TCP
//! close). Established streams have no idle timeout of their own: `logs -f` and an idle `exec`
//! live as long as both ends want. Dials in progress are bounded ([`MAX_PENDING_DIALS`]); the
//! hub bounds them too, this is the agent's own guard.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use petrel_proto::control::EgressPolicy;
use petrel_proto::stream::MAX_STREAM_PREAMBLE;
use petrel_proto::{DialError, DialErrorCode, StreamOpen, StreamResult};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// How long the hub has to send the whole `StreamOpen` after opening a stream.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout when the hub asks for "the agent's default" (0).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest connect timeout the hub may ask for.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Dials in progress at once; more are answered `TooManyPending` at once.
pub const MAX_PENDING_DIALS: usize = 256;

/// QUIC application error codes on proxied streams (reset / stop-sending).
pub mod stream_code {
    /// The other side of the proxied connection failed; abort.
    pub const ABORTED: u32 = petrel_transport::splice::STREAM_ABORTED;
    /// The stream header was malformed or late.
    pub const BAD_HEADER: u32 = 0x02;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: String,
}

/// The agent's proxied-stream metrics (`petrel_agent_proxy_*`).
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    streams: Family<Outcome, Counter>,
    open: Gauge,
    pending: Gauge,
    bytes: Family<Direction, Counter>,
}

impl ProxyMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("petrel_agent_proxy");
        let m = Self {
            registry: Registry::default(),
            streams: Family::default(),
            open: Gauge::default(),
            pending: Gauge::default(),
            bytes: Family::default(),
        };
        registry.register(
            "streams",
            "Proxied streams the hub opened, by outcome of the dial",
            m.streams.clone(),
        );
        registry.register(
            "streams_open",
            "Proxied streams established and not yet closed",
            m.open.clone(),
        );
        registry.register(
            "pending_dials",
            "Dials to proxied targets in progress",
            m.pending.clone(),
        );
        registry.register(
            "bytes",
            "Bytes carried by proxied streams (to_target: hub to target)",
            m.bytes.clone(),
        );
        Self { registry, ..m }
    }

    fn outcome(&self, outcome: &str) {
        self.streams
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    fn add_bytes(&self, direction: &str, n: u64) {
        self.bytes
            .get_or_create(&Direction {
                direction: direction.to_string(),
            })
            .inc_by(n);
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Proxy state shared by all links: the latest policy a hub sent, the pending-dial bound and
/// the metrics.
#[derive(Debug)]
pub struct ProxyState {
    policy: RwLock<Arc<EgressPolicy>>,
    pending: Arc<Semaphore>,
    pub metrics: ProxyMetrics,
    next_id: AtomicU64,
}

impl Default for ProxyState {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyState {
    pub fn new() -> Self {
        Self {
            policy: RwLock::new(Arc::new(EgressPolicy::default())),
            pending: Arc::new(Semaphore::new(MAX_PENDING_DIALS)),
            metrics: ProxyMetrics::new(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Takes the policy from a hub's Welcome or Update.
    pub fn set_policy(&self, policy: &EgressPolicy) {
        if let Ok(mut slot) = self.policy.write() {
            if **slot != *policy {
                debug!(
                    node_addresses = policy.node_addresses.len(),
                    pod_cidrs = policy.pod_cidrs.len(),
                    node_ports = ?policy.node_ports,
                    "proxied-stream policy updated"
                );
                *slot = Arc::new(policy.clone());
            }
        }
    }

    pub fn policy(&self) -> Arc<EgressPolicy> {
        self.policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// The agent's metrics text with the proxy's families appended (one OpenMetrics document).
pub fn merge_metrics(agent: String, proxy: &ProxyState) -> String {
    let head = agent.strip_suffix("# EOF\n").unwrap_or(&agent);
    format!("{head}{}", proxy.metrics.encode())
}

/// Why a proxied stream ended before any byte was proxied.
#[derive(Debug, thiserror::Error)]
enum HeaderError {
    #[error("no stream header within {0:?}")]
    Timeout(Duration),
    #[error("malformed stream header: {0}")]
    Decode(#[from] petrel_proto::DecodeError),
    #[error("hub finished the stream before its header was complete")]
    Eof,
    #[error("reading the stream header: {0}")]
    Read(#[from] quinn::ReadError),
}

/// Serves one stream the hub opened.
pub async fn serve_stream(
    state: Arc<ProxyState>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let state = &*state;
    let id = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let (open, leftover) = match read_header(&mut recv).await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "proxied stream refused");
            state.metrics.outcome("bad_header");
            let _ = send.reset(stream_code::BAD_HEADER.into());
            let _ = recv.stop(stream_code::BAD_HEADER.into());
            return;
        }
    };
    let span = tracing::info_span!("proxy", id, target = %open.target.display, ip = %open.target.ip, port = open.target.port);
    tracing::Instrument::instrument(dial_and_proxy(state, open, leftover, send, recv), span).await;
}

async fn read_header(recv: &mut quinn::RecvStream) -> Result<(StreamOpen, Bytes), HeaderError> {
    let mut buf: Vec<u8> = Vec::new();
    let read = async {
        loop {
            // Never hold more than the preamble cap (the decoder fails past it).
            let room = MAX_STREAM_PREAMBLE + 1 - buf.len().min(MAX_STREAM_PREAMBLE);
            match recv.read_chunk(room, true).await? {
                Some(chunk) => buf.extend_from_slice(&chunk.bytes),
                None => return Err(HeaderError::Eof),
            }
            if let Some((open, used)) = petrel_proto::decode_stream_open(&buf)? {
                let rest = Bytes::copy_from_slice(buf.get(used..).unwrap_or_default());
                return Ok((open, rest));
            }
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, read)
        .await
        .map_err(|_| HeaderError::Timeout(HEADER_TIMEOUT))?
}

fn dial_error(code: DialErrorCode, message: String) -> StreamResult {
    StreamResult {
        result: Err(DialError { code, message }),
    }
}

fn outcome_name(code: DialErrorCode) -> &'static str {
    match code {
        DialErrorCode::Refused => "refused",
        DialErrorCode::Timeout => "timeout",
        DialErrorCode::Unreachable => "unreachable",
        DialErrorCode::NotAllowed => "not_allowed",
        DialErrorCode::TooManyPending => "too_many_pending",
        DialErrorCode::Internal | DialErrorCode::Other(_) => "error",
    }
}

/// Maps a failed connect to the wire code.
pub fn classify_io_error(e: &io::Error) -> DialErrorCode {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => DialErrorCode::Refused,
        io::ErrorKind::TimedOut => DialErrorCode::Timeout,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::NetworkDown => DialErrorCode::Unreachable,
        _ => DialErrorCode::Unreachable,
    }
}

async fn write_result(send: &mut quinn::SendStream, result: &StreamResult) -> bool {
    let mut buf = Vec::new();
    if petrel_proto::encode_stream_result(result, &mut buf).is_err() {
        return false;
    }
    send.write_all(&buf).await.is_ok()
}

async fn refuse(
    state: &ProxyState,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    code: DialErrorCode,
    message: String,
) {
    let outcome = outcome_name(code);
    if matches!(
        code,
        DialErrorCode::NotAllowed | DialErrorCode::TooManyPending
    ) {
        warn!(outcome, "proxied stream refused: {message}");
    } else {
        info!(outcome, "dial failed: {message}");
    }
    state.metrics.outcome(outcome);
    write_result(&mut send, &dial_error(code, message)).await;
    let _ = send.finish();
    drop(recv);
}

async fn dial_and_proxy(
    state: &ProxyState,
    open: StreamOpen,
    leftover: Bytes,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let target = SocketAddr::new(open.target.ip, open.target.port);
    let policy = state.policy();
    if !policy.allows(open.target.ip, open.target.port) {
        let why = describe_refusal(&policy, open.target.ip, open.target.port);
        refuse(state, send, recv, DialErrorCode::NotAllowed, why).await;
        return;
    }
    let Ok(permit) = state.pending.clone().try_acquire_owned() else {
        let msg = format!("agent already has {MAX_PENDING_DIALS} dials in progress");
        refuse(state, send, recv, DialErrorCode::TooManyPending, msg).await;
        return;
    };
    let timeout = match open.connect_timeout_ms {
        0 => DEFAULT_CONNECT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)).min(MAX_CONNECT_TIMEOUT),
    };
    state.metrics.pending.inc();
    let dialed = tokio::time::timeout(timeout, TcpStream::connect(target)).await;
    state.metrics.pending.dec();
    drop(permit);
    let tcp = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let code = classify_io_error(&e);
            refuse(state, send, recv, code, format!("dial {target}: {e}")).await;
            return;
        }
        Err(_) => {
            let msg = format!("dial {target}: no answer within {timeout:?}");
            refuse(state, send, recv, DialErrorCode::Timeout, msg).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if !write_result(&mut send, &StreamResult { result: Ok(()) }).await {
        debug!("hub went away before the dial result");
        return;
    }
    state.metrics.outcome("ok");
    state.metrics.open.inc();
    debug!("proxied stream established");
    let (rd, wr) = tcp.into_split();
    let stats =
        petrel_transport::splice::splice_quic(rd, wr, send, recv, leftover, Bytes::new()).await;
    state.metrics.open.dec();
    state.metrics.add_bytes("to_target", stats.stream_to_io);
    state.metrics.add_bytes("from_target", stats.io_to_stream);
    debug!(
        to_target = stats.stream_to_io,
        from_target = stats.io_to_stream,
        aborted = stats.aborted,
        "proxied stream closed"
    );
}

fn describe_refusal(policy: &EgressPolicy, ip: IpAddr, port: u16) -> String {
    if policy.node_addresses.contains(&ip) {
        format!(
            "port {port} is not allowed on node address {ip} (allowed: {:?})",
            policy.node_ports
        )
    } else if policy.pod_cidrs.iter().any(|c| c.contains(ip)) {
        format!("port {port} is not allowed on pod IP {ip}")
    } else {
        format!("{ip} is not a node address or pod IP of this agent's site")
    }
}
