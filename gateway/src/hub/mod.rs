//! The tunnel hub: one QUIC endpoint (ALPN `petrel/1` for tunnels, `petrel-enrol/1` for
//! enrolment) on the cloud-gateway node. It owns the accept loop, hands each connection to the
//! enrolment or tunnel session in its own task and tracing span, and on shutdown tells every
//! agent to go away (and when to come back), then drains under a deadline.

pub mod admission;
pub mod dataplane;
pub mod enrol;
pub mod memory;
pub mod revoked;
pub mod route_sync;
pub mod session;
pub mod view;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use petrel_proto::{
    ControlMessage, GatewayEndpoint, GoingAway, GoingAwayReason, ALPN_ENROL, ALPN_TUNNEL,
};
use petrel_transport::admin::AdminState;
use petrel_transport::pki::CertificateAuthority;
use petrel_transport::quic::TransportTuning;
use petrel_transport::{close_code, quic, tls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::agent_registry::{AgentEntry, AgentRegistry, SessionCommand, TunnelObserver};
use crate::config::HubConfig;
use crate::hub_store::HubStore;
use crate::inventory::Inventory;
use crate::metrics::HubMetrics;
use crate::pki_store::{CaStore, StateDir, StoreError};

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("state directory {dir}: {source}")]
    State { dir: String, source: StoreError },
    #[error("hub certificate: {0}")]
    Pki(#[from] petrel_transport::pki::PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] petrel_transport::tls::TlsConfigError),
    #[error("cannot listen on UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a hub does not accept new tunnels and enrolments (Kubernetes mode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServing {
    #[error("waiting for the node list from the API server")]
    Starting,
    #[error("node {node} is not a cloud gateway (it needs the label {label} and must not be an edge node)")]
    NotCandidate { node: String, label: String },
    #[error("hub state lock poisoned")]
    LockPoisoned,
}

/// Why the hub's `/readyz` says not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubNotReady {
    #[error("hub is shutting down")]
    ShuttingDown,
    #[error("inventory is empty")]
    EmptyInventory,
    #[error("inventory lock poisoned")]
    LockPoisoned,
}

/// Shared state of a running hub.
#[derive(Debug)]
pub struct HubContext {
    pub config: HubConfig,
    pub ca: CertificateAuthority,
    /// Join tokens (and, in file mode, where the CA came from).
    pub state: HubStore,
    pub inventory: Arc<RwLock<Inventory>>,
    pub registry: Arc<AgentRegistry>,
    pub metrics: HubMetrics,
    pub listening: AtomicBool,
    pub local_addr: SocketAddr,
    pub dataplane: Option<dataplane::Dataplane>,
    /// `Err(why)`: new tunnels and enrolments are refused (Kubernetes mode: this node is not a
    /// cloud gateway, or the node list has not arrived yet).
    serving: RwLock<Result<(), NotServing>>,
    /// Views: what each agent is told and was last sent (see [`view`]).
    pub views: view::AgentViews,
    pub observer: OnceLock<Arc<dyn TunnelObserver>>,
    /// Extra `/status` section (Kubernetes mode: role, lease holder, rejected nodes).
    pub cluster_status: RwLock<Option<serde_json::Value>>,
    /// Budgets for connections that have not authenticated yet.
    pub pre_auth: PreAuthState,
    /// Log lines about refusals anyone can provoke (the metrics count each one).
    pub log_budget: Arc<crate::log_budget::LogBudget>,
    /// The cluster route table for route-sync agents, with recent changes.
    pub routes: RwLock<route_sync::RouteHistory>,
    /// The current table's digest; sessions watch it and send what changed.
    pub routes_changed: tokio::sync::watch::Sender<u64>,
    /// Large route syncs in progress at once (see [`route_sync::SyncPacer`]).
    pub route_sync_slots: Arc<tokio::sync::Semaphore>,
    /// The byte rate of large route syncs over all sessions.
    pub route_pacer: Mutex<route_sync::SyncPacer>,
    /// Set while the hub is over its memory budget (see [`memory`]).
    pub memory: Arc<memory::MemoryGate>,
    /// Revoked node certificates (see [`crate::revocation`]).
    pub revocations: crate::revocation::Revocations,
}

/// The pre-authentication budgets and their live counters (see [`admission`]).
#[derive(Debug)]
pub struct PreAuthState {
    pub budget: admission::PreAuthBudget,
    pub handshakes: Mutex<admission::SourceRateLimit>,
    pub enrolments: Mutex<admission::SourceRateLimit>,
    pub enrol_slots: Arc<tokio::sync::Semaphore>,
}

impl PreAuthState {
    pub fn new(budget: admission::PreAuthBudget) -> Self {
        Self {
            handshakes: Mutex::new(admission::SourceRateLimit::new(
                budget.handshake_burst,
                budget.handshakes_per_second,
                budget.max_sources,
            )),
            enrolments: Mutex::new(admission::SourceRateLimit::new(
                budget.enrol_burst,
                budget.enrolments_per_second,
                budget.max_sources,
            )),
            enrol_slots: Arc::new(tokio::sync::Semaphore::new(budget.max_enrolments)),
            budget,
        }
    }

    fn spend(
        limiter: &Mutex<admission::SourceRateLimit>,
        ip: std::net::IpAddr,
    ) -> Result<(), admission::RateRefusal> {
        match limiter.lock() {
            Ok(mut l) => l.check(ip, std::time::Instant::now()),
            Err(_) => Err(admission::RateRefusal::TableFull),
        }
    }

    pub fn spend_handshake(&self, ip: std::net::IpAddr) -> Result<(), admission::RateRefusal> {
        Self::spend(&self.handshakes, ip)
    }

    pub fn spend_enrolment(&self, ip: std::net::IpAddr) -> Result<(), admission::RateRefusal> {
        Self::spend(&self.enrolments, ip)
    }
}

impl HubContext {
    /// What the egress proxy is built from (`main` wires it).
    pub fn egress_parts(&self) -> crate::egress::EgressParts {
        crate::egress::EgressParts {
            registry: self.registry.clone(),
            inventory: self.inventory.clone(),
            metrics: self.metrics.egress.clone(),
            log_budget: self.log_budget.clone(),
            petrel_ca_der: self.ca.cert_der().clone(),
        }
    }

    /// Whether new tunnels are accepted (`Err` says why not).
    pub fn serving(&self) -> Result<(), NotServing> {
        self.serving
            .read()
            .map(|s| s.clone())
            .unwrap_or(Err(NotServing::LockPoisoned))
    }

    /// Starts or stops serving. Stopping tells every connected agent to go away.
    pub fn set_serving(&self, serving: Result<(), NotServing>) {
        let was = self.serving();
        if let Ok(mut s) = self.serving.write() {
            *s = serving.clone();
        }
        match (&was, &serving) {
            (Ok(()), Err(why)) => {
                if self.registry.is_empty() {
                    info!(reason = %why, "hub not serving");
                } else {
                    warn!(reason = %why, "hub stops serving; telling agents to go away");
                }
                let retry_after_ms =
                    u32::try_from(self.config.restart_hint.as_millis()).unwrap_or(u32::MAX);
                let why = why.to_string();
                for agent in self.registry.all() {
                    let leave = GoingAway {
                        reason: GoingAwayReason::Shutdown,
                        retry_after_ms,
                        message: why.clone(),
                    };
                    if agent
                        .commands
                        .try_send(SessionCommand::Leave(leave))
                        .is_err()
                    {
                        agent
                            .connection
                            .close(close_code::GOING_AWAY.into(), why.as_bytes());
                    }
                }
            }
            (Err(_), Ok(())) => info!("hub serving"),
            _ => {}
        }
    }

    /// Replaces the endpoint list pushed to agents (Kubernetes mode) and pushes it.
    pub fn set_gateways(&self, gateways: Option<Vec<GatewayEndpoint>>) {
        if self.views.set_gateways(gateways) {
            self.refresh_agents();
        }
    }

    /// Replaces the inventory (Kubernetes mode: after every Node change), then refreshes the
    /// switch table and every connected agent.
    pub fn replace_inventory(&self, inventory: Inventory) {
        if let Ok(mut inv) = self.inventory.write() {
            *inv = inventory;
        }
        self.refresh_agents();
    }

    /// After an inventory or endpoint change: rebuilds the switch table, sends `GoingAway
    /// NodeRemoved` to agents whose node is gone or no longer a public-site edge node, and
    /// pushes an `Update` to every agent whose view changed.
    pub fn refresh_agents(&self) {
        self.views.bump_epoch();
        if let (Some(dp), Ok(inv)) = (self.dataplane.as_ref(), self.inventory.read()) {
            dp.refresh(&inv);
        }
        self.refresh_routes();
        for agent in self.registry.all() {
            self.refresh_agent(&agent);
        }
    }

    /// Rebuilds the cluster route table from the inventory (once per change, not per agent);
    /// if it changed, every route-sync session sends its agent what changed.
    fn refresh_routes(&self) {
        let entries = match self.inventory.read() {
            Ok(inv) => inv.route_entries(),
            Err(_) => return,
        };
        let changed = self.routes.write().map(|mut r| {
            let changed = r.replace(entries);
            self.metrics.route_table_entries.set(r.len() as i64);
            changed.then(|| r.digest())
        });
        if let Ok(Some(digest)) = changed {
            self.routes_changed.send_replace(digest);
        }
    }

    /// Checks one connected agent against the current inventory and view: disconnects it if
    /// its node is no longer admitted, pushes an `Update` if its view changed.
    pub fn refresh_agent(&self, agent: &AgentEntry) {
        let admitted = self
            .inventory
            .read()
            .map(|inv| {
                inv.admit_agent(&agent.node)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .unwrap_or(Ok(()));
        if let Err(why) = admitted {
            info!(node = %agent.node, reason = %why, "node no longer admitted; disconnecting its agent");
            let leave = GoingAway {
                reason: GoingAwayReason::NodeRemoved,
                retry_after_ms: 0,
                message: why.clone(),
            };
            if agent
                .commands
                .try_send(SessionCommand::Leave(leave))
                .is_err()
            {
                agent
                    .connection
                    .close(close_code::UNAUTHORIZED.into(), why.as_bytes());
            }
            return;
        }
        let view = self
            .views
            .view_for(&self.inventory, &agent.node, agent.route_sync);
        let digest = view::view_digest(&view);
        if self.views.is_stale(agent.id, digest) {
            debug!(node = %agent.node, routes = view.routes.len(), "pushing an update");
            if agent
                .commands
                .try_send(SessionCommand::Send(Box::new(ControlMessage::Update(view))))
                .is_ok()
            {
                self.views.record_pushed(agent.id, digest);
            }
        }
    }
}

/// Receive and send buffer asked for the relay socket (4 MiB, as for the data plane's).
const RELAY_SOCKET_BUFFER: usize = 4 << 20;

/// A bound hub, ready to run.
#[derive(Debug)]
pub struct Hub {
    ctx: Arc<HubContext>,
    endpoint: quinn::Endpoint,
}

impl Hub {
    /// Loads or creates the CA, issues this hub's certificate and binds the UDP port.
    pub fn bind(config: HubConfig, inventory: Inventory) -> Result<Self, HubError> {
        let store = HubStore::Dir(StateDir::new(&config.state_dir));
        Self::bind_with(config, inventory, store)
    }

    /// [`Hub::bind`] with the CA and tokens in `store` (Kubernetes mode: Secrets). The hub
    /// secret (QUIC stateless resets) always stays in the local state directory.
    pub fn bind_with(
        config: HubConfig,
        inventory: Inventory,
        store: HubStore,
    ) -> Result<Self, HubError> {
        let local = StateDir::new(&config.state_dir);
        let state_err = |source| HubError::State {
            dir: config.state_dir.display().to_string(),
            source,
        };
        let now = SystemTime::now();
        let ca = store.load_or_create(now).map_err(state_err)?;
        let secret = local.hub_secret().map_err(state_err)?;
        let state = store;
        // File mode reads the revocation list before the port opens; Kubernetes mode refuses
        // tunnels until `revoked::watch` has read it from the Secret.
        let revocations = match &state {
            HubStore::Dir(d) => crate::revocation::Revocations::loaded(
                crate::revocation::FileRevocations::new(d.path())
                    .load()
                    .map_err(state_err)?,
            ),
            HubStore::Kube(_) => crate::revocation::Revocations::default(),
        };
        let hosts: Vec<String> = config.advertise.iter().map(|(h, _)| h.clone()).collect();
        let (chain, key) =
            ca.issue_hub_certificate(&hosts, now, Duration::from_secs(90 * 86400))?;
        let tuning = TransportTuning {
            keep_alive: config.keepalive,
            idle_timeout: config.idle_timeout,
            congestion: config.congestion,
            ..Default::default()
        }
        // Every connection starts with the pre-authentication budget (one stream, a tiny
        // window); an admitted tunnel is raised by `AuthenticatedLimits` (hub/session.rs).
        // quinn also pre-allocates per stream the peer may open, so few streams save memory.
        .pre_auth(quic::PreAuthLimits::default());
        let tls_cfg = tls::hub_server_tls(ca.cert_der(), chain, key, &[ALPN_TUNNEL, ALPN_ENROL])?;
        let server = quic::server_config(tls_cfg, &tuning)?;
        let endpoint = quic::server_endpoint(config.listen, server, &secret).map_err(|source| {
            HubError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| HubError::Bind {
            addr: config.listen,
            source,
        })?;
        // The local node's authority over loopback frames comes only from configuration (never
        // from the host name, which would let a mislabelled host speak for a node).
        let local_node = config
            .node_name
            .clone()
            .filter(|n| inventory.node(n).is_some());
        let underlay = local_node
            .as_deref()
            .and_then(|n| inventory.node(n))
            .and_then(|n| n.public_ip.or_else(|| n.addresses.first().copied()));
        let relay_addrs = config
            .relay_listen
            .resolve(underlay)
            .unwrap_or_else(|(fallback, why)| {
                warn!(relay = ?fallback, "VXLAN relay listens on every address: {why}; set --node-name (or --relay-listen IP:PORT[,IP:PORT]) so that only the node's underlay address and loopback receive frames");
                fallback
            });
        let dataplane = if relay_addrs.is_empty() {
            None
        } else {
            if local_node.is_none() {
                warn!("no --node-name (in the inventory): VXLAN frames from this host's own kernel (loopback) are dropped as unknown_vtep; set it on a hub whose node has pods");
            }
            let mut sockets = Vec::with_capacity(relay_addrs.len());
            for addr in relay_addrs {
                let bind_err = |source: std::io::Error| HubError::Bind { addr, source };
                let std_sock = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
                // Every cloud and Express Connect VTEP sends here, for every agent: room for
                // their bursts, like the agents' capture sockets.
                petrel_transport::socket_buffers::request(&std_sock, RELAY_SOCKET_BUFFER);
                std_sock.set_nonblocking(true).map_err(bind_err)?;
                sockets.push(tokio::net::UdpSocket::from_std(std_sock).map_err(bind_err)?);
            }
            let dp = dataplane::Dataplane::new(
                sockets,
                &inventory,
                local_node.clone(),
                config.vni,
                config.flannel_port,
            );
            info!(relay = ?dp.local_addrs(), node = ?local_node, vni = config.vni, "VXLAN relay listening");
            Some(dp)
        };
        info!(listen = %local_addr, ca_sha256 = %ca.fingerprint(), hub = %config.hub_name, "hub listening");
        let routes = route_sync::RouteHistory::new(inventory.route_entries());
        let route_sync_rate = config.route_sync_rate;
        let (routes_changed, _) = tokio::sync::watch::channel(routes.digest());
        let metrics = HubMetrics::new();
        metrics.route_table_entries.set(routes.len() as i64);
        let views = view::AgentViews::new(view::ViewConfig {
            hub_name: config.hub_name.clone(),
            advertise: config.advertise.clone(),
            site_mtu: config.site_mtu,
            egress_ports: config.egress.ports.clone(),
        });
        let ctx = Arc::new(HubContext {
            config,
            ca,
            state,
            inventory: Arc::new(RwLock::new(inventory)),
            registry: Arc::new(AgentRegistry::new()),
            metrics,
            listening: AtomicBool::new(true),
            local_addr,
            dataplane,
            serving: RwLock::new(Ok(())),
            views,
            observer: OnceLock::new(),
            cluster_status: RwLock::new(None),
            pre_auth: PreAuthState::new(admission::PreAuthBudget::default()),
            log_budget: Arc::default(),
            routes: RwLock::new(routes),
            routes_changed,
            route_sync_slots: Arc::new(tokio::sync::Semaphore::new(route_sync::PACED_SYNC_SLOTS)),
            route_pacer: Mutex::new(route_sync::SyncPacer::new(
                route_sync_rate,
                route_sync::PACE_BURST_BYTES,
            )),
            memory: Arc::default(),
            revocations,
        });
        Ok(Self { ctx, endpoint })
    }

    pub fn context(&self) -> Arc<HubContext> {
        self.ctx.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.ctx.local_addr
    }

    /// Accepts connections until `shutdown`, then drains.
    pub async fn run(self, shutdown: CancellationToken) {
        let relay = tokio::spawn(dataplane::run_relay(self.ctx.clone(), shutdown.clone()));
        let inventory_file = match (&self.ctx.config.inventory, &self.ctx.config.kube) {
            (Some(path), None) => Some(tokio::spawn(watch_inventory_file(
                self.ctx.clone(),
                path.clone(),
                shutdown.clone(),
            ))),
            _ => None,
        };
        let memory_watch = match memory::resolve(self.ctx.config.memory_budget) {
            Some(budget) => {
                info!(budget_mib = budget.limit >> 20, "memory budget");
                Some(tokio::spawn(memory::watch(
                    self.ctx.memory.clone(),
                    budget,
                    shutdown.clone(),
                )))
            }
            None => {
                info!("no memory budget (no cgroup limit and none configured)");
                None
            }
        };
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES_IN_FLIGHT));
        let mut waiting = admission::HandshakeQueue::new(HANDSHAKE_QUEUE, HANDSHAKE_QUEUE_WAIT);
        let queue_drop = |why: admission::QueueDrop, incoming: quinn::Incoming| {
            HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, why.label());
            incoming.ignore();
        };
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                // A slot for the oldest waiting handshake.
                Ok(slot) = handshakes.clone().acquire_owned(), if !waiting.is_empty() => {
                    let next = waiting.pop(std::time::Instant::now(), |i| queue_drop(admission::QueueDrop::Expired, i));
                    if let Some(incoming) = next {
                        // It was admitted up to 1.5 s ago; the memory budget is checked again, as
                        // for a handshake that arrives now.
                        if self.ctx.memory.is_over() {
                            HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, "memory_budget");
                            incoming.refuse();
                        } else {
                            HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, "dequeued");
                            self.spawn_handshake(incoming, slot);
                        }
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(waiting.next_expiry().map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)), if !waiting.is_empty() => {
                    waiting.expire(std::time::Instant::now(), |i| queue_drop(admission::QueueDrop::Expired, i));
                    continue;
                }
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
            };
            // Admission control: a handshake the hub cannot finish before the agent gives up
            // (3 s) is wasted work, and after a restart a whole fleet arrives at once. Beyond
            // the cap an Initial is ignored, not refused: the agent retransmits it after its
            // probe timeout and gets in once a slot is free, within the same attempt. Once
            // handshakes pile up, a source must first prove it receives at its address (QUIC
            // Retry, stateless): spoofed Initials then cost one small packet and no slot.
            if self.ctx.memory.is_over() {
                // Stateless: CONNECTION_REFUSED, no state kept. Connected agents stay.
                HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, "memory_budget");
                incoming.refuse();
                continue;
            }
            let in_flight = MAX_HANDSHAKES_IN_FLIGHT - handshakes.available_permits();
            let remote_ip = incoming.remote_address().ip();
            let verdict = admission::decide_handshake(
                &self.ctx.pre_auth.budget,
                in_flight,
                MAX_HANDSHAKES_IN_FLIGHT,
                incoming.remote_address_validated(),
                incoming.may_retry(),
                || self.ctx.pre_auth.spend_handshake(remote_ip),
            );
            match verdict {
                admission::HandshakeVerdict::Accept => {}
                admission::HandshakeVerdict::Retry => {
                    HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, "retry_sent");
                    if let Err(e) = incoming.retry() {
                        // Only if the source already answered a Retry (`may_retry` was false).
                        e.into_incoming().ignore();
                    }
                    continue;
                }
                admission::HandshakeVerdict::Ignore("deferred")
                    if incoming.remote_address_validated() =>
                {
                    self.queue_handshake(&mut waiting, incoming, &queue_drop);
                    continue;
                }
                admission::HandshakeVerdict::Ignore(why) => {
                    HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, why);
                    incoming.ignore();
                    continue;
                }
            }
            // First come, first served: nobody passes the queue.
            let slot = if waiting.is_empty() {
                handshakes.clone().try_acquire_owned().ok()
            } else {
                None
            };
            match slot {
                Some(slot) => self.spawn_handshake(incoming, slot),
                None if incoming.remote_address_validated() => {
                    self.queue_handshake(&mut waiting, incoming, &queue_drop)
                }
                None => {
                    HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, "deferred");
                    incoming.ignore();
                }
            }
        }
        while let Some(i) = waiting.pop(std::time::Instant::now(), quinn::Incoming::ignore) {
            i.ignore();
        }
        self.drain().await;
        relay.abort();
        if let Some(t) = inventory_file {
            t.abort();
        }
        if let Some(t) = memory_watch {
            t.abort();
        }
    }

    fn spawn_handshake(&self, incoming: quinn::Incoming, slot: tokio::sync::OwnedSemaphorePermit) {
        let ctx = self.ctx.clone();
        let span = tracing::info_span!("conn", remote = %incoming.remote_address());
        tokio::spawn(handle_incoming(ctx, incoming, slot).instrument(span));
    }

    fn queue_handshake(
        &self,
        waiting: &mut admission::HandshakeQueue<quinn::Incoming>,
        incoming: quinn::Incoming,
        queue_drop: &impl Fn(admission::QueueDrop, quinn::Incoming),
    ) {
        match waiting.push(std::time::Instant::now(), incoming) {
            Ok(()) => HubMetrics::inc_outcome(&self.ctx.metrics.tunnel_handshakes, "queued"),
            Err((why, incoming)) => queue_drop(why, incoming),
        }
    }

    async fn drain(self) {
        let ctx = &self.ctx;
        ctx.listening.store(false, Ordering::SeqCst);
        // New handshakes are refused from here on; agents go to another hub or come back.
        self.endpoint.set_server_config(None);
        let retry_after_ms = u32::try_from(ctx.config.restart_hint.as_millis()).unwrap_or(u32::MAX);
        let agents = ctx.registry.all();
        info!(agents = agents.len(), deadline = ?ctx.config.drain_timeout, "hub shutting down; telling agents to go away");
        for agent in &agents {
            let leave = GoingAway {
                reason: GoingAwayReason::Restart,
                retry_after_ms,
                message: "hub is restarting".into(),
            };
            if agent
                .commands
                .try_send(SessionCommand::Leave(leave))
                .is_err()
            {
                agent
                    .connection
                    .close(close_code::GOING_AWAY.into(), b"hub is restarting");
            }
        }
        let deadline = tokio::time::Instant::now() + ctx.config.drain_timeout;
        loop {
            let changed = ctx.registry.changed();
            if ctx.registry.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                warn!(
                    remaining = ctx.registry.len(),
                    "drain deadline passed; closing remaining tunnels"
                );
                break;
            }
        }
        self.endpoint
            .close(close_code::GOING_AWAY.into(), b"hub shut down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!("hub stopped");
    }
}

/// How often a file inventory is checked for changes.
const INVENTORY_POLL: Duration = Duration::from_secs(2);

/// File-inventory mode: re-reads the inventory when the file changes (its modification time or
/// size), so adding a node or a site needs no hub restart; agents get what changed, as in
/// Kubernetes mode. A file that does not parse is logged and the hub keeps the inventory it has.
async fn watch_inventory_file(
    ctx: Arc<HubContext>,
    path: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INVENTORY_POLL) => {}
        }
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                Inventory::from_toml(&text, &path.display().to_string()).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(inv) => {
                info!(path = %path.display(), nodes = inv.nodes().count(), "inventory file changed; applying it");
                ctx.replace_inventory(inv);
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "inventory file changed but cannot be used; keeping the current inventory");
            }
        }
    }
}

/// QUIC handshakes the hub runs at once. Enough to keep both cores busy across WAN round trips
/// (about 850 handshakes per second at 300 ms each), few enough that each finishes well inside
/// an agent's 3 s connect timeout when the hub is saturated.
const MAX_HANDSHAKES_IN_FLIGHT: usize = 256;

/// Address-validated handshakes that may wait for a slot (each holds its Initial packet, about
/// 1.2 KB), and for how long: an agent gives up after 3 s without an answer, and the handshake
/// itself needs some of that.
const HANDSHAKE_QUEUE: usize = 1024;
const HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_millis(1500);

/// A handshake still open after this long is abandoned: the agent gave up after its connect
/// timeout (3 s by default) and will come back on a new socket, and the slot is needed. Without
/// it a half-open handshake would hold its slot until the idle timeout.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

async fn handle_incoming(
    ctx: Arc<HubContext>,
    incoming: quinn::Incoming,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let handshake = match incoming.accept() {
        Ok(h) => h,
        Err(e) => {
            debug!(error = %e, "cannot accept the connection");
            HubMetrics::inc_outcome(&ctx.metrics.tunnel_handshakes, handshake_outcome(&e));
            return;
        }
    };
    let done = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake).await;
    drop(slot);
    let conn = match done {
        Ok(Ok(c)) => c,
        Err(_) => {
            debug!("handshake abandoned after {HANDSHAKE_DEADLINE:?}");
            HubMetrics::inc_outcome(&ctx.metrics.tunnel_handshakes, "timeout");
            return;
        }
        Ok(Err(e)) => {
            // Foreign or expired certificates, wrong fingerprints and broken handshakes all end
            // here with the TLS alert that explains them.
            info!(error = %e, "handshake failed");
            HubMetrics::inc_outcome(&ctx.metrics.tunnel_handshakes, handshake_outcome(&e));
            return;
        }
    };
    if let Err(why) = ctx.serving() {
        debug!(remote = %conn.remote_address(), reason = %why, "connection refused: hub not serving");
        HubMetrics::inc_reason(&ctx.metrics.agent_refusals, "not_serving");
        conn.close(
            close_code::GOING_AWAY.into(),
            format!("this hub is not serving: {why}").as_bytes(),
        );
        return;
    }
    match tls::negotiated_alpn(&conn).as_deref() {
        Some(ALPN_ENROL) => enrol::serve(ctx, conn).await,
        Some(ALPN_TUNNEL) => session::serve(ctx, conn).await,
        other => {
            debug!(alpn = ?other.map(String::from_utf8_lossy), "unknown ALPN");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"unsupported ALPN");
        }
    }
}

/// Reads and discards the datagrams of a connection that may not send any (enrolment, or a
/// tunnel before admission), counting them, so they never wait in quinn's receive buffer.
/// Returns when the connection closes.
pub(crate) async fn discard_datagrams(ctx: &HubContext, conn: &quinn::Connection) {
    while conn.read_datagram().await.is_ok() {
        HubMetrics::inc_reason(&ctx.metrics.datagrams_dropped, "not_admitted");
    }
}

/// The metric outcome of a failed handshake. A TLS failure of ours (our rustls refused the
/// agent's certificate or handshake) is told by the TLS alert the transport error carries.
fn handshake_outcome(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TransportError(_) if tls::tls_alert(e).is_some() => "tls_error",
        quinn::ConnectionError::TimedOut => "timeout",
        quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::ApplicationClosed(_) => "closed_by_peer",
        _ => "error",
    }
}

impl AdminState for HubContext {
    type NotReady = HubNotReady;

    fn ready(&self) -> Result<(), HubNotReady> {
        if !self.listening.load(Ordering::SeqCst) {
            return Err(HubNotReady::ShuttingDown);
        }
        match self.inventory.read() {
            Ok(inv) if inv.nodes().next().is_some() => Ok(()),
            Ok(_) => Err(HubNotReady::EmptyInventory),
            Err(_) => Err(HubNotReady::LockPoisoned),
        }
    }

    fn status(&self) -> serde_json::Value {
        let generation = self.inventory.read().map(|i| i.generation()).unwrap_or(0);
        serde_json::json!({
            "hub": {
                "name": self.config.hub_name,
                "listen": self.local_addr.to_string(),
                "ca_sha256": self.ca.fingerprint(),
                "inventory_generation": generation,
                "ready": self.ready().is_ok(),
                "serving": self.serving().is_ok(),
                "not_serving_reason": self.serving().err().map(|e| e.to_string()),
                "endpoints": self.views.gateway_endpoints().iter().map(|g| format!("{}:{}", g.host, g.port)).collect::<Vec<_>>(),
            },
            "agents": self.registry.status(),
            "kubernetes": self.cluster_status.read().ok().and_then(|s| s.clone()),
            "dataplane": self.dataplane.as_ref().map(|d| d.stats.to_json()),
            "switch_table": self.dataplane.as_ref().map(|d| {
                let table = d.table();
                let nodes: std::collections::BTreeMap<String, String> = self
                    .inventory
                    .read()
                    .map(|inv| {
                        inv.nodes()
                            .filter_map(|n| Some((n.name.clone(), table.mac_of(&n.name)?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
                serde_json::json!({ "generation": table.generation(), "vtep_macs": nodes })
            }),
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

#[cfg(test)]
mod policy_cache_tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::{FileConfig, HubConfig, RunArgs};
    use crate::hub::Hub;
    use crate::inventory::Inventory;

    /// The per-site cache must follow every inventory replacement, even one whose inventory
    /// counts the same generation as the one it replaces (each index counts its own).
    #[tokio::test]
    async fn site_policies_follow_inventory_replacements() {
        let dir = tempfile::tempdir().unwrap();
        let config = HubConfig::from_args(
            RunArgs {
                listen: Some("127.0.0.1:0".into()),
                relay_listen: Some("off".into()),
                state_dir: Some(dir.path().to_path_buf()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        let inv = Inventory::embedded_default().unwrap();
        let hub = Hub::bind(config, inv.clone()).unwrap();
        let ctx = hub.context();
        let a2: std::net::IpAddr = "10.0.1.3".parse().unwrap();
        assert!(ctx
            .views
            .egress_policy(&ctx.inventory, "edge-a1")
            .allows(a2, 10250));

        // Same generation, different content: edge-a2 moved out of site-a.
        let mut moved = inv.clone();
        let mut node = moved.node("edge-a2").unwrap().clone();
        node.site = "site-b".into();
        moved.apply_node(node).unwrap();
        let mut replacement = Inventory::default();
        let file = moved.to_file();
        replacement.reset(file.sites, file.nodes).unwrap();
        assert_eq!(replacement.generation(), inv.generation());
        ctx.replace_inventory(replacement);
        assert!(!ctx
            .views
            .egress_policy(&ctx.inventory, "edge-a1")
            .allows(a2, 10250));
        assert!(ctx
            .views
            .egress_policy(&ctx.inventory, "edge-b1")
            .allows(a2, 10250));
    }
}
