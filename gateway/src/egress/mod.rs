//! The API server's egress proxy: HTTP CONNECT (kube-apiserver `EgressSelectorConfiguration`,
//! `HTTPConnect` over a Unix socket or mutual-TLS TCP), TLS passthrough routed by SNI, and plain
//! HTTP routed by `Host`. Each target resolves from the inventory ([`resolve`]) to the agent that
//! owns it, which gets one QUIC bidirectional stream per connection (`StreamOpen`, then its
//! `StreamResult`, then raw bytes), or, for cloud and Express Connect sites, to a TCP dial by the
//! hub itself.
//!
//! The reply to a CONNECT is `200` only once the target connection exists; otherwise a status
//! and a reason phrase ([`http::error_response`]): 400/405/408/414/431 malformed request, 403
//! port not allowed or refused by the agent's policy, 404 unknown destination, 409 address
//! ambiguous across sites, 502 dial refused/unreachable or agent error, 503 agent not connected
//! or too many pending dials, 504 dial timeout. Never an open proxy: only inventory targets on
//! allowed ports. Dials in progress are bounded per agent and in total; connections handled at
//! once are bounded too.

pub mod config;
pub mod http;
pub mod identity;
mod listen;
pub mod metrics;
pub mod resolve;
pub mod sni;
pub mod splice;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel_proto::control::EgressPolicy;
use petrel_proto::stream::MAX_STREAM_PREAMBLE;
use petrel_proto::{DialErrorCode, StreamOpen, StreamTarget};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

pub use config::{EgressArgs, EgressConfig, EgressFileConfig};
use metrics::{DirectionLabels, PathLabels};
use resolve::{Path, Resolved};

use crate::agent_registry::AgentEntry;
use crate::agent_registry::AgentRegistry;
use crate::inventory::Inventory;
use crate::log_budget::LogBudget;
use metrics::EgressMetrics;
use resolve::PortPolicy;

/// Extra time the hub waits for an agent's answer beyond the connect timeout it asked for.
const RESULT_GRACE: Duration = Duration::from_secs(5);

/// Why the egress proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("egress TLS: {0}")]
    Tls(#[from] EgressTlsError),
}

/// Why the mutual-TLS CONNECT listener's TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum EgressTlsError {
    #[error("{field} {}: {source}", path.display())]
    Pem {
        field: &'static str,
        path: std::path::PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{field} {}: no {what} in the file", path.display())]
    Empty {
        field: &'static str,
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("egress-client-ca {}: {source}", path.display())]
    ClientCa {
        path: std::path::PathBuf,
        source: rustls::Error,
    },
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Provider(rustls::Error),
    #[error("egress-tls-cert/egress-tls-key: {0}")]
    KeyPair(rustls::Error),
    #[error("Petrel CA: {0}")]
    PetrelCa(petrel_transport::tls::TlsConfigError),
}

/// The policy sent to the agent on `node` in its view: its own site's targets and the ports.
/// Every agent of a site gets the same policy (unless caps cut it), and after a hub restart a
/// whole site connects at once: the site's policy is computed once per view epoch (which every
/// inventory replacement bumps; an inventory's own generation is not unique across
/// replacements).
///
/// `epoch` must be read before the inventory: a replacement writes the inventory, then bumps
/// the epoch, so a policy can only be cached under an epoch older than the inventory it came
/// from, never the reverse.
pub fn policy_for(
    cache: &Mutex<SitePolicies>,
    epoch: u64,
    inventory: &RwLock<Inventory>,
    ports: &PortPolicy,
    node: &str,
) -> EgressPolicy {
    let Ok(inv) = inventory.read() else {
        return EgressPolicy::default();
    };
    let Some(me) = inv.node(node) else {
        return EgressPolicy::default();
    };
    let cached = cache.lock().ok().and_then(|mut c| {
        if c.epoch != epoch {
            c.epoch = epoch;
            c.sites.clear();
        }
        let entry = c
            .sites
            .entry(me.site.clone())
            .or_insert_with(|| resolve::site_policy(&inv, &me.site, ports));
        entry.complete.then(|| entry.policy.clone())
    });
    cached.unwrap_or_else(|| resolve::own_node_first(&inv, me, ports))
}

/// Per-site egress policies for one view epoch (see [`policy_for`]).
#[derive(Debug, Default)]
pub struct SitePolicies {
    epoch: u64,
    sites: std::collections::HashMap<String, resolve::SitePolicy>,
}

/// A refusal: status code, metric outcome, reason.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub outcome: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(status: u16, outcome: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            outcome,
            message: message.into(),
        }
    }
}

/// An established upstream connection.
pub enum Upstream {
    Tunnel {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// Bytes the agent sent right after its result.
        first: Bytes,
        agent: Arc<AgentEntry>,
    },
    Direct(TcpStream),
}

/// What the egress proxy takes from the running hub, and nothing more: the connected agents it
/// dials through, the inventory it resolves targets from, its metrics, the shared log budget
/// and the Petrel CA (whose client certificates the mutual-TLS listener refuses).
#[derive(Debug, Clone)]
pub struct EgressParts {
    pub registry: Arc<AgentRegistry>,
    pub inventory: Arc<RwLock<Inventory>>,
    pub metrics: Arc<EgressMetrics>,
    pub log_budget: Arc<LogBudget>,
    pub petrel_ca_der: rustls_pki_types::CertificateDer<'static>,
}

/// The running proxy, shared by its listeners.
#[derive(Debug)]
pub struct Egress {
    parts: EgressParts,
    cfg: EgressConfig,
    pending_total: Arc<Semaphore>,
    pending_by_agent: Mutex<HashMap<String, usize>>,
    /// The API server's listeners (Unix socket, authenticated mutual TLS).
    connections: Arc<Semaphore>,
    /// Mutual-TLS handshakes in progress.
    tls_handshakes: Arc<Semaphore>,
    /// SNI passthrough and Host-routed HTTP.
    unauthenticated: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// Holds one per-agent pending slot; releases it on drop.
struct AgentSlot<'a> {
    eg: &'a Egress,
    key: String,
}

impl Drop for AgentSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.eg.pending_by_agent.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

/// Counts a dial in progress in the gauge.
struct PendingGauge<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> PendingGauge<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for PendingGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

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

fn map_dial_error(code: DialErrorCode, message: String) -> Refusal {
    match code {
        DialErrorCode::Refused => {
            Refusal::new(502, "dial_refused", format!("dial refused: {message}"))
        }
        DialErrorCode::Timeout => {
            Refusal::new(504, "dial_timeout", format!("dial timeout: {message}"))
        }
        DialErrorCode::Unreachable => Refusal::new(
            502,
            "dial_unreachable",
            format!("target unreachable: {message}"),
        ),
        DialErrorCode::NotAllowed => Refusal::new(
            403,
            "not_allowed",
            format!("refused by the agent: {message}"),
        ),
        DialErrorCode::TooManyPending => Refusal::new(
            503,
            "too_many_pending",
            format!("agent has too many dials in progress: {message}"),
        ),
        DialErrorCode::Internal | DialErrorCode::Other(_) => {
            Refusal::new(502, "agent_error", format!("agent error: {message}"))
        }
    }
}

impl Egress {
    pub fn new(parts: EgressParts, cfg: EgressConfig) -> Self {
        Self {
            pending_total: Arc::new(Semaphore::new(cfg.max_pending)),
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            tls_handshakes: Arc::new(Semaphore::new(cfg.max_tls_handshakes)),
            unauthenticated: Arc::new(Semaphore::new(cfg.max_unauthenticated)),
            pending_by_agent: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            parts,
            cfg,
        }
    }

    pub fn config(&self) -> &EgressConfig {
        &self.cfg
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Resolves `host:port` against the current inventory.
    pub fn resolve(&self, host: &str, port: u16) -> Result<Resolved, Refusal> {
        let inv = self
            .parts
            .inventory
            .read()
            .map_err(|_| Refusal::new(503, "error", "inventory unavailable"))?;
        resolve::resolve(&inv, host, port, &self.cfg.ports).map_err(|e| {
            let (status, outcome) = e.status();
            Refusal::new(status, outcome, e.to_string())
        })
    }

    /// The kubelet port of node `name`, if it is a node.
    pub fn kubelet_port(&self, name: &str) -> Option<u16> {
        self.parts
            .inventory
            .read()
            .ok()?
            .node(name)
            .map(|n| n.kubelet_port)
    }

    fn agent_slot(&self, key: &str) -> Result<AgentSlot<'_>, Refusal> {
        let mut m = self
            .pending_by_agent
            .lock()
            .map_err(|_| Refusal::new(503, "error", "pending-dial table unavailable"))?;
        let n = m.entry(key.to_string()).or_insert(0);
        if *n >= self.cfg.max_pending_per_agent {
            return Err(Refusal::new(
                503,
                "too_many_pending",
                format!(
                    "{} dials to {key} already in progress (egress-max-pending-per-agent)",
                    self.cfg.max_pending_per_agent
                ),
            ));
        }
        *n += 1;
        Ok(AgentSlot {
            eg: self,
            key: key.to_string(),
        })
    }

    /// The agent that carries streams for `target`: its own node's, else any connected agent
    /// of the same site (every agent may dial anything inside its site).
    fn pick_agent(&self, target: &Resolved) -> Result<Arc<AgentEntry>, Refusal> {
        if let Some(a) = self.parts.registry.get(&target.node) {
            return Ok(a);
        }
        let mut same_site: Vec<_> = self
            .parts
            .registry
            .all()
            .into_iter()
            .filter(|a| a.site == target.site)
            .collect();
        same_site.sort_by(|a, b| a.node.cmp(&b.node));
        match same_site.into_iter().next() {
            Some(a) => {
                debug!(owner = %target.node, via = %a.node, "owner's agent not connected; using another agent of its site");
                Ok(a)
            }
            None => Err(Refusal::new(
                503,
                "agent_unavailable",
                format!(
                    "no agent of site {} is connected (node {} has no tunnel)",
                    target.site, target.node
                ),
            )),
        }
    }

    /// Opens the upstream connection for `target`, bounded and timed.
    pub async fn connect(&self, target: &Resolved, display: &str) -> Result<Upstream, Refusal> {
        let started = Instant::now();
        let _total = self
            .pending_total
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Refusal::new(
                    503,
                    "too_many_pending",
                    format!(
                        "{} dials already in progress (egress-max-pending)",
                        self.cfg.max_pending
                    ),
                )
            })?;
        let up = match target.path {
            Path::Tunnel => {
                let agent = self.pick_agent(target)?;
                let _slot = self.agent_slot(&agent.node)?;
                let _pending = PendingGauge::new(&self.parts.metrics.pending_dials);
                self.open_stream(agent, target, display).await?
            }
            Path::Direct => {
                // Per target, not per site: hung dials to one dead node must not refuse dials
                // to the site's other nodes.
                let _slot = self.agent_slot(&format!(
                    "direct:{}",
                    std::net::SocketAddr::new(target.ip, target.port)
                ))?;
                let _pending = PendingGauge::new(&self.parts.metrics.pending_dials);
                let addr = std::net::SocketAddr::new(target.ip, target.port);
                let tcp =
                    match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr))
                        .await
                    {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            let code = match e.kind() {
                                std::io::ErrorKind::ConnectionRefused => DialErrorCode::Refused,
                                std::io::ErrorKind::TimedOut => DialErrorCode::Timeout,
                                _ => DialErrorCode::Unreachable,
                            };
                            return Err(map_dial_error(code, format!("hub dial {addr}: {e}")));
                        }
                        Err(_) => {
                            return Err(map_dial_error(
                                DialErrorCode::Timeout,
                                format!(
                                    "hub dial {addr}: no answer within {:?}",
                                    self.cfg.connect_timeout
                                ),
                            ))
                        }
                    };
                let _ = tcp.set_nodelay(true);
                Upstream::Direct(tcp)
            }
        };
        self.parts
            .metrics
            .dial_seconds
            .get_or_create(&PathLabels {
                path: target.path.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        Ok(up)
    }

    async fn open_stream(
        &self,
        agent: Arc<AgentEntry>,
        target: &Resolved,
        display: &str,
    ) -> Result<Upstream, Refusal> {
        let open = StreamOpen {
            target: StreamTarget {
                ip: target.ip,
                port: target.port,
                display: display
                    .chars()
                    .take(petrel_proto::codec::MAX_DISPLAY_LEN / 4)
                    .collect(),
            },
            connect_timeout_ms: u32::try_from(self.cfg.connect_timeout.as_millis())
                .unwrap_or(u32::MAX),
        };
        let mut header = Vec::new();
        petrel_proto::encode_stream_open(&open, &mut header).map_err(|e| {
            Refusal::new(
                502,
                "error",
                format!("cannot encode the stream header: {e}"),
            )
        })?;
        let node = agent.node.clone();
        let unavailable = |e: String| {
            Refusal::new(
                503,
                "agent_unavailable",
                format!("cannot open a stream to the agent of {node}: {e}"),
            )
        };
        let exchange = async {
            let (mut send, mut recv) = agent
                .connection
                .open_bi()
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            send.write_all(&header)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let room = MAX_STREAM_PREAMBLE + 1 - buf.len().min(MAX_STREAM_PREAMBLE);
                match recv.read_chunk(room, true).await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                    Ok(None) => {
                        return Err(Refusal::new(
                            502,
                            "agent_error",
                            format!("the agent of {node} closed the stream without a result"),
                        ))
                    }
                    Err(e) => {
                        return Err(Refusal::new(
                            502,
                            "agent_error",
                            format!("the agent of {node} refused the stream: {e}"),
                        ))
                    }
                }
                match petrel_proto::decode_stream_result(&buf) {
                    Ok(Some((res, used))) => {
                        let first = Bytes::copy_from_slice(buf.get(used..).unwrap_or_default());
                        return Ok((send, recv, res, first));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = send.reset(splice::STREAM_ABORTED.into());
                        return Err(Refusal::new(
                            502,
                            "agent_error",
                            format!("the agent of {node} sent a malformed result: {e}"),
                        ));
                    }
                }
            }
        };
        let wait = self.cfg.connect_timeout + RESULT_GRACE;
        let (send, recv, res, first) = match tokio::time::timeout(wait, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Refusal::new(
                    504,
                    "dial_timeout",
                    format!("no answer from the agent of {} within {wait:?}", agent.node),
                ))
            }
        };
        match res.result {
            Ok(()) => Ok(Upstream::Tunnel {
                send,
                recv,
                first,
                agent,
            }),
            Err(e) => Err(map_dial_error(e.code, e.message)),
        }
    }

    /// Carries bytes between `client` and `up` until both are done.
    pub async fn proxy<C>(self: &Arc<Self>, client: C, up: Upstream, to_target: Bytes)
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
                let _open = OpenGuard::new(self.parts.metrics.clone(), Path::Tunnel, Some(agent));
                let (rd, wr) = tokio::io::split(client);
                let stats = splice::splice_quic(rd, wr, send, recv, first, to_target).await;
                (Path::Tunnel, stats)
            }
            Upstream::Direct(mut tcp) => {
                let _open = OpenGuard::new(self.parts.metrics.clone(), Path::Direct, None);
                let mut client = client;
                let stats = splice::splice_tcp(&mut client, &mut tcp, to_target).await;
                (Path::Direct, stats)
            }
        };
        let m = &self.parts.metrics;
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
}

/// Starts the egress listeners configured in the hub's config (validated with the rest of it
/// by `main`); returns when `shutdown` fires, or at once with the error when a listener cannot
/// start (`main` then stops the hub: it was asked for egress).
pub async fn run(
    parts: EgressParts,
    mut cfg: EgressConfig,
    shutdown: CancellationToken,
) -> Result<(), EgressError> {
    if !cfg.enabled() {
        debug!("egress proxy not configured");
        shutdown.cancelled().await;
        return Ok(());
    }
    fit_caps_to_descriptors(&mut cfg);
    let eg = Arc::new(Egress::new(parts, cfg));
    listen::serve(eg, shutdown).await.inspect_err(|e| {
        error!(error = %e, "egress proxy cannot start");
    })
}

/// Descriptors kept out of the egress budget: the admin endpoint (health probes must answer
/// when every egress cap is full), the Kubernetes client, state files, the hub's sockets.
const RESERVED_DESCRIPTORS: u64 = 256;

/// Checks the egress caps against the process's open-file limit (raising the soft limit to the
/// hard one first) and lowers them, with a warning that names the numbers, if they would not
/// fit: past the limit `accept` fails, and so would the health endpoint and the state files.
fn fit_caps_to_descriptors(cfg: &mut EgressConfig) {
    let limit = crate::fd_limit::raise_to_hard();
    let budget = limit.saturating_sub(RESERVED_DESCRIPTORS);
    let need = cfg.descriptors_needed();
    if cfg.fit_descriptors(budget) {
        tracing::warn!(
            open_file_limit = limit,
            needed = need,
            max_connections = cfg.max_connections,
            max_unauthenticated = cfg.max_unauthenticated,
            max_tls_handshakes = cfg.max_tls_handshakes,
            "egress caps lowered to fit the open-file limit (raise LimitNOFILE / ulimit -n to keep them)"
        );
    } else {
        info!(
            open_file_limit = limit,
            needed = need,
            "egress caps fit the open-file limit"
        );
    }
}

fn log_refusal(listener: &'static str, r: &Refusal) {
    info!(
        listener,
        status = r.status,
        outcome = r.outcome,
        "egress refused: {}",
        r.message
    );
}
