//! Dialing a resolved target: resolution against the inventory, the bounds on dials in
//! progress (in total and per agent or per direct target), and the upstream itself: one QUIC
//! stream to the agent that owns the target (its `StreamOpen`, then its `StreamResult`) or, for
//! cloud and Express Connect targets, a TCP connection from the hub. The CONNECT, SNI and HTTP
//! handlers (`super::handle`) call it between reading a request and replying to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel_proto::stream::MAX_STREAM_PREAMBLE;
use petrel_proto::{DialErrorCode, StreamOpen, StreamTarget};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::metrics::PathLabels;
use super::resolve::{self, Path, Resolved};
use super::{splice, EgressConfig, EgressParts, Refusal};
use crate::agent_registry::AgentEntry;

/// Extra time the hub waits for an agent's answer beyond the connect timeout it asked for.
const RESULT_GRACE: Duration = Duration::from_secs(5);

/// An established upstream connection.
pub enum Upstream {
    Tunnel {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// Bytes the agent sent right after its result.
        first: Bytes,
        agent: Arc<AgentEntry>,
    },
    /// A socket the hub dialled itself, and the API server's descriptor it holds (`None` for
    /// the unauthenticated listeners, whose descriptors are reserved per connection).
    Direct(TcpStream, Option<OwnedSemaphorePermit>),
}

/// Resolves and dials targets for every listener; owns the dial bounds.
#[derive(Debug)]
pub struct Dialer {
    parts: EgressParts,
    cfg: EgressConfig,
    pending_total: Arc<Semaphore>,
    pending_by_agent: Mutex<HashMap<String, usize>>,
}

/// Holds one per-agent pending slot; releases it on drop.
struct AgentSlot<'a> {
    dialer: &'a Dialer,
    key: String,
}

impl Drop for AgentSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.dialer.pending_by_agent.lock() {
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

impl Dialer {
    pub fn new(parts: EgressParts, cfg: EgressConfig) -> Self {
        Self {
            pending_total: Arc::new(Semaphore::new(cfg.max_pending)),
            pending_by_agent: Mutex::new(HashMap::new()),
            parts,
            cfg,
        }
    }

    /// Resolves `host:port` against the current inventory.
    pub fn resolve(&self, host: &str, port: u16) -> Result<Resolved, Refusal> {
        let inv = self.parts.inventory.snapshot();
        resolve::resolve(&inv, host, port, &self.cfg.ports).map_err(|e| {
            let (status, outcome) = e.status();
            Refusal::new(status, outcome, e.to_string())
        })
    }

    /// The kubelet port of node `name`, if it is a node.
    pub fn kubelet_port(&self, name: &str) -> Option<u16> {
        self.parts
            .inventory
            .snapshot()
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
            dialer: self,
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

    /// Opens the upstream connection for `target`, bounded and timed. A direct dial takes one
    /// permit from `descriptors` when given (the API server's listeners share theirs between
    /// client sockets and direct dials).
    pub async fn connect(
        &self,
        target: &Resolved,
        display: &str,
        descriptors: Option<&Arc<Semaphore>>,
    ) -> Result<Upstream, Refusal> {
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
                let descriptor = match descriptors {
                    Some(d) => Some(d.clone().try_acquire_owned().map_err(|_| {
                        Refusal::new(
                            503,
                            "too_many_connections",
                            "no file descriptor left for a direct dial (open-file limit; see egress-max-connections)",
                        )
                    })?),
                    None => None,
                };
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
                Upstream::Direct(tcp, descriptor)
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
}
