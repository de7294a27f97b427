//! The tunnel hub: one QUIC endpoint (ALPN `petrel/1` for tunnels, `petrel-enrol/1` for
//! enrolment) on the cloud-gateway node. It owns the accept loop, hands each connection to the
//! enrolment or tunnel session in its own task and tracing span, and on shutdown tells every
//! agent to go away (and when to come back), then drains under a deadline. [`Hub::bind`] builds
//! the hub's parts (inventory store, registry, views, refresher, cluster routes, serving gate,
//! signer, revocation gate, relay) and gives each consumer a struct of exactly what it uses;
//! `main` takes the ones other components need from the bound [`Hub`].

pub mod admission;
pub mod cluster_routes;
pub mod dataplane;
pub mod enrol;
pub mod memory;
pub mod path_mtu;
pub mod refresh;
pub mod rendezvous;
pub mod revoked;
pub mod route_sync;
pub mod serving;
pub mod session;
pub mod signer;
pub mod status;
pub mod tcp_carrier;
pub mod view;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use petrel_proto::{GoingAway, GoingAwayReason, ALPN_ENROL, ALPN_TUNNEL};
use petrel_transport::quic::TransportTuning;
use petrel_transport::{close_code, quic, tls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::agent_registry::{AgentRegistry, SessionCommand};
use crate::config::HubConfig;
use crate::hub_store::HubStore;
use crate::inventory::Inventory;
use crate::inventory_store::{InventoryReader, InventoryWriter};
use crate::log_budget::LogBudget;
use crate::metrics::HubMetrics;
use crate::pki_store::{CaStore, StateDir, StoreError};

use admission::PreAuthState;
use dataplane::Relay;
use enrol::EnrolParts;
use memory::MemoryGate;
use refresh::Refresher;
use revoked::RevocationGate;
use serving::ServingGate;
use session::SessionParts;
use signer::NodeSigner;
use status::{ClusterStatus, HubStatus};
use view::AgentViews;

pub use serving::NotServing;

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

/// Receive and send buffer asked for the relay socket (4 MiB, as for the data plane's).
const RELAY_SOCKET_BUFFER: usize = 4 << 20;

/// A bound hub, ready to run: its QUIC endpoint and the parts it is made of. `main` takes the
/// parts other components need (the inventory writer, the egress, Kubernetes and revocation
/// parts, the admin status) and wires them; [`Hub::run`] serves the endpoint.
#[derive(Debug)]
pub struct Hub {
    endpoint: quinn::Endpoint,
    /// The TCP fallback: its listener and the second endpoint its connections' packets reach.
    tcp: Option<TcpFallback>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) config: HubConfig,
    /// What each accepted connection is served with.
    accept: Arc<Acceptor>,
    pub(crate) registry: Arc<AgentRegistry>,
    pub(crate) refresher: Arc<Refresher>,
    relay: Option<Arc<Relay>>,
    memory: Arc<MemoryGate>,
    listening: Arc<AtomicBool>,
    /// Until `main` takes it ([`Hub::take_inventory_writer`]).
    inventory_writer: Option<InventoryWriter>,
    pub(crate) inventory: InventoryReader,
    store: HubStore,
    pub(crate) signer: Arc<NodeSigner>,
    pub(crate) revocation: RevocationGate,
    pub(crate) serving: Arc<ServingGate>,
    views: Arc<AgentViews>,
    pub(crate) cluster_status: Arc<ClusterStatus>,
    pub(crate) metrics: Arc<HubMetrics>,
    pub(crate) log_budget: Arc<LogBudget>,
}

/// The TCP fallback listener, bound, and what serves it (`tcp_carrier`).
#[derive(Debug)]
struct TcpFallback {
    listener: std::net::TcpListener,
    endpoint: quinn::Endpoint,
    socket: Arc<petrel_transport::stream_carrier::CarrierSocket>,
    tls: Arc<rustls::ServerConfig>,
}

/// What a connection is served with once its handshake is done: the serving gate, then the
/// enrolment or the tunnel session by ALPN.
#[derive(Debug)]
struct Acceptor {
    serving: Arc<ServingGate>,
    session: Arc<SessionParts>,
    enrol: Arc<EnrolParts>,
    pre_auth: Arc<PreAuthState>,
    metrics: Arc<HubMetrics>,
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
            segmentation_offload: config.quic_gso,
            ..Default::default()
        }
        // Every connection starts with the pre-authentication budget (one stream, a tiny
        // window); an admitted tunnel is raised by `AuthenticatedLimits` (hub/session.rs).
        // quinn also pre-allocates per stream the peer may open, so few streams save memory.
        .pre_auth(quic::PreAuthLimits::default());
        let tcp_tls = match config.tcp_listen {
            Some(_) => Some(tls::hub_server_tls(
                ca.cert_der(),
                chain.clone(),
                key.clone_key(),
                &[petrel_proto::ALPN_TCP_CARRIER],
            )?),
            None => None,
        };
        let tls_cfg = tls::hub_server_tls(ca.cert_der(), chain, key, &[ALPN_TUNNEL, ALPN_ENROL])?;
        let mut server = quic::server_config(tls_cfg, &tuning)?;
        quic::issue_address_tokens(&mut server, &secret);
        let tcp = match (config.tcp_listen, tcp_tls) {
            (Some(addr), Some(tcp_tls)) => {
                let bind_err = |source| HubError::Bind { addr, source };
                let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
                listener.set_nonblocking(true).map_err(bind_err)?;
                let socket = petrel_transport::stream_carrier::CarrierSocket::new();
                let endpoint = petrel_transport::stream_carrier::endpoint(
                    socket.clone(),
                    quic::hub_endpoint_config(&secret),
                    Some(server.clone()),
                )
                .map_err(bind_err)?;
                info!(listen = %addr, "TCP fallback listening (QUIC over TLS on TCP)");
                Some(TcpFallback {
                    listener,
                    endpoint,
                    socket,
                    tls: Arc::new(tcp_tls),
                })
            }
            _ => None,
        };
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
        let metrics = Arc::new(HubMetrics::new());
        let routes = Arc::new(cluster_routes::ClusterRoutes::new(
            inventory.route_entries(),
            config.route_sync_rate,
        ));
        metrics.route_table_entries.set(routes.len() as i64);
        let views = Arc::new(AgentViews::new(view::ViewConfig {
            hub_name: config.hub_name.clone(),
            advertise: config.advertise.clone(),
            hubs: config.hubs.clone(),
            site_mtu: config.site_mtu,
            egress_ports: config.egress.ports.clone(),
            reconnect_rate: config.reconnect_rate,
        }));
        if !config.hubs.is_empty() {
            // Node roles rank the inventory's gateways, agents the hubs this list names: the
            // two must be the same names or they disagree on owners (a detour, not a drop).
            let gateways: std::collections::BTreeSet<&str> =
                inventory.gateways().map(|g| g.name.as_str()).collect();
            let listed: std::collections::BTreeSet<&str> =
                config.hubs.iter().map(|h| h.0.as_str()).collect();
            if gateways != listed {
                warn!(?listed, ?gateways, "the hubs list and the inventory's gateway nodes differ: node roles and agents will pick different owners for some sites");
            }
        }
        let (inventory_writer, inventory) = crate::inventory_store::store(inventory);
        let registry = Arc::new(AgentRegistry::new());
        let relay = dataplane.map(|dp| {
            Arc::new(Relay {
                dp: Arc::new(dp),
                registry: registry.clone(),
                metrics: metrics.clone(),
                direct_paths: config.direct_paths,
            })
        });
        let refresher = Arc::new(Refresher {
            inventory: inventory.clone(),
            views: views.clone(),
            routes: routes.clone(),
            registry: registry.clone(),
            relay: relay.as_ref().map(|r| r.dp.clone()),
            metrics: metrics.clone(),
        });
        let log_budget: Arc<LogBudget> = Arc::default();
        let revocation = RevocationGate {
            revocations: Arc::new(revocations),
            registry: registry.clone(),
            metrics: metrics.clone(),
            log_budget: log_budget.clone(),
        };
        let signer = Arc::new(NodeSigner::new(ca, config.agent_cert_ttl));
        let memory: Arc<MemoryGate> = Arc::default();
        let pre_auth = Arc::new(PreAuthState::new(admission::PreAuthBudget::default()));
        let serving = Arc::new(ServingGate::new(registry.clone(), config.restart_hint));
        let accept = Arc::new(Acceptor {
            serving: serving.clone(),
            session: Arc::new(SessionParts {
                machine: session::machine_config(
                    &config.hub_name,
                    config.keepalive,
                    config.idle_timeout,
                    config.agent_cert_ttl,
                ),
                registry: registry.clone(),
                views: views.clone(),
                inventory: inventory.clone(),
                refresher: refresher.clone(),
                routes,
                revocation: revocation.clone(),
                signer: signer.clone(),
                relay: relay.clone(),
                metrics: metrics.clone(),
                log_budget: log_budget.clone(),
            }),
            enrol: Arc::new(EnrolParts {
                pre_auth: pre_auth.clone(),
                memory: memory.clone(),
                store: state.clone(),
                revocations: revocation.revocations.clone(),
                inventory: inventory.clone(),
                signer: signer.clone(),
                metrics: metrics.clone(),
                log_budget: log_budget.clone(),
            }),
            pre_auth,
            metrics: metrics.clone(),
        });
        Ok(Self {
            endpoint,
            tcp,
            local_addr,
            config,
            accept,
            registry,
            refresher,
            relay,
            memory,
            listening: Arc::new(AtomicBool::new(true)),
            inventory_writer: Some(inventory_writer),
            inventory,
            store: state,
            signer,
            revocation,
            serving,
            views,
            cluster_status: Arc::default(),
            metrics,
            log_budget,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> Arc<HubMetrics> {
        self.metrics.clone()
    }

    /// A reader of the hub's inventory store.
    pub fn inventory(&self) -> InventoryReader {
        self.inventory.clone()
    }

    /// The store's one writer, for whoever keeps the inventory current (the file watcher or
    /// the Kubernetes integration); `None` once taken.
    pub fn take_inventory_writer(&mut self) -> Option<InventoryWriter> {
        self.inventory_writer.take()
    }

    /// The VXLAN relay, if this hub runs one (active-active: whether it answers node roles'
    /// liveness probes is switched from outside when the hub joins or leaves).
    pub fn relay_dataplane(&self) -> Option<Arc<dataplane::Dataplane>> {
        self.relay.as_ref().map(|r| r.dp.clone())
    }

    /// What the egress proxy is built from.
    pub fn egress_parts(&self) -> crate::egress::EgressParts {
        crate::egress::EgressParts {
            registry: self.registry.clone(),
            inventory: self.inventory.clone(),
            metrics: self.metrics.egress.clone(),
            log_budget: self.log_budget.clone(),
            petrel_ca_der: self.signer.ca_der().clone(),
        }
    }

    /// The revocation list as enforced, and the store it is read from (for
    /// [`RevocationGate::watch`]).
    pub fn revocation_parts(&self) -> (RevocationGate, HubStore) {
        (self.revocation.clone(), self.store.clone())
    }

    /// What the admin endpoint serves.
    pub fn status(&self) -> Arc<HubStatus> {
        Arc::new(HubStatus {
            hub_name: self.config.hub_name.clone(),
            listen: self.local_addr,
            ca_sha256: self.signer.fingerprint(),
            listening: self.listening.clone(),
            inventory: self.inventory.clone(),
            serving: self.serving.clone(),
            views: self.views.clone(),
            registry: self.registry.clone(),
            cluster: self.cluster_status.clone(),
            relay: self.relay.as_ref().map(|r| r.dp.clone()),
            metrics: self.metrics.clone(),
        })
    }

    /// Accepts connections until `shutdown`, then drains.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let tcp_endpoint = self.tcp.as_ref().map(|t| t.endpoint.clone());
        let tcp_stop = CancellationToken::new();
        if let Some(t) = self.tcp.take() {
            match tokio::net::TcpListener::from_std(t.listener) {
                Ok(listener) => {
                    tokio::spawn(tcp_carrier::serve(
                        listener,
                        tcp_carrier::TcpCarrierParts {
                            socket: t.socket,
                            tls: t.tls,
                            pre_auth: self.accept.pre_auth.clone(),
                            metrics: self.metrics.clone(),
                            log_budget: self.log_budget.clone(),
                            limits: tcp_carrier::TcpCarrierLimits::default(),
                        },
                        tcp_stop.clone(),
                    ));
                }
                Err(e) => warn!(error = %e, "TCP fallback listener cannot run"),
            }
        }
        // The relay outlives the accept loop: it carries frames until the drain is over (with
        // active-active hubs, until this hub's sites have moved to the others).
        let relay_stop = CancellationToken::new();
        let relay = self
            .relay
            .clone()
            .map(|r| tokio::spawn(dataplane::run_relay(r, relay_stop.clone())));
        let refresh = tokio::spawn(self.refresher.clone().follow(shutdown.clone()));
        let learn_mtus = self.config.learn_site_mtus.then(|| {
            tokio::spawn(path_mtu::learn(
                self.registry.clone(),
                self.inventory.clone(),
                self.refresher.clone(),
                self.config.site_mtu,
                shutdown.clone(),
            ))
        });
        let memory_watch = match memory::resolve(self.config.memory_budget) {
            Some(budget) => {
                info!(budget_mib = budget.limit >> 20, "memory budget");
                Some(tokio::spawn(memory::watch(
                    self.memory.clone(),
                    budget,
                    self.metrics.clone(),
                    shutdown.clone(),
                )))
            }
            None => {
                info!("no memory budget (no cgroup limit and none configured)");
                None
            }
        };
        let heap_release = tokio::spawn(memory::release_freed_heap(
            self.metrics.clone(),
            shutdown.clone(),
        ));
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES_IN_FLIGHT));
        let mut waiting = admission::HandshakeQueue::new(HANDSHAKE_QUEUE, HANDSHAKE_QUEUE_WAIT);
        let queue_drop = |why: admission::QueueDrop, incoming: quinn::Incoming| {
            HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, why.label());
            incoming.ignore();
        };
        loop {
            // Every change to the queue is followed by a turn of this loop.
            self.metrics.handshakes_queued.set(waiting.len() as i64);
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                // A slot for the newest waiting handshake.
                Ok(slot) = handshakes.clone().acquire_owned(), if !waiting.is_empty() => {
                    let next = waiting.pop(std::time::Instant::now(), |i| queue_drop(admission::QueueDrop::Expired, i));
                    if let Some(incoming) = next {
                        // It was admitted up to 1.5 s ago; the memory budget is checked again, as
                        // for a handshake that arrives now.
                        if self.memory.is_over() {
                            HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, "memory_budget");
                            incoming.refuse();
                        } else {
                            HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, "dequeued");
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
                // Connections over the TCP fallback take the same admission as over UDP.
                Some(i) = async { match &tcp_endpoint { Some(e) => e.accept().await, None => std::future::pending().await } } => i,
            };
            // Admission control: a handshake the hub cannot finish before the agent gives up
            // (3 s) is wasted work, and after a restart a whole fleet arrives at once. Beyond
            // the cap an Initial is ignored, not refused: the agent retransmits it after its
            // probe timeout and gets in once a slot is free, within the same attempt. Once
            // handshakes pile up, a source must first prove it receives at its address (QUIC
            // Retry, stateless): spoofed Initials then cost one small packet and no slot.
            if self.memory.is_over() {
                // Stateless: CONNECTION_REFUSED, no state kept. Connected agents stay.
                HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, "memory_budget");
                incoming.refuse();
                continue;
            }
            if incoming.remote_address_validated() && incoming.may_retry() {
                // Validated without a Retry: the Initial carried one of this hub's (or its
                // predecessor's) address tokens. After a restart, agents coming back this way
                // skip a round trip (`quic::issue_address_tokens`).
                HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, "address_token");
            }
            let in_flight = MAX_HANDSHAKES_IN_FLIGHT - handshakes.available_permits();
            let remote_ip = incoming.remote_address().ip();
            let verdict = admission::decide_handshake(
                &self.accept.pre_auth.budget,
                in_flight,
                MAX_HANDSHAKES_IN_FLIGHT,
                incoming.remote_address_validated(),
                incoming.may_retry(),
                || self.accept.pre_auth.spend_handshake(remote_ip),
            );
            match verdict {
                admission::HandshakeVerdict::Accept => {}
                admission::HandshakeVerdict::Retry => {
                    HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, "retry_sent");
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
                    HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, why);
                    incoming.ignore();
                    continue;
                }
            }
            // Newest first (see `admission::HandshakeQueue`): a free slot goes to what just
            // arrived.
            match handshakes.clone().try_acquire_owned().ok() {
                Some(slot) => self.spawn_handshake(incoming, slot),
                None if incoming.remote_address_validated() => {
                    self.queue_handshake(&mut waiting, incoming, &queue_drop)
                }
                None => {
                    HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, "deferred");
                    incoming.ignore();
                }
            }
        }
        while let Some(i) = waiting.pop(std::time::Instant::now(), quinn::Incoming::ignore) {
            i.ignore();
        }
        if let Some(e) = &tcp_endpoint {
            e.set_server_config(None);
        }
        self.drain().await;
        if let Some(e) = &tcp_endpoint {
            e.close(close_code::GOING_AWAY.into(), b"hub shut down");
        }
        tcp_stop.cancel();
        relay_stop.cancel();
        if let Some(t) = relay {
            t.abort();
        }
        refresh.abort();
        if let Some(t) = learn_mtus {
            t.abort();
        }
        if let Some(t) = memory_watch {
            t.abort();
        }
        heap_release.abort();
    }

    fn spawn_handshake(&self, incoming: quinn::Incoming, slot: tokio::sync::OwnedSemaphorePermit) {
        let accept = self.accept.clone();
        let span = tracing::info_span!("conn", remote = %incoming.remote_address());
        tokio::spawn(handle_incoming(accept, incoming, slot).instrument(span));
    }

    fn queue_handshake(
        &self,
        waiting: &mut admission::HandshakeQueue<quinn::Incoming>,
        incoming: quinn::Incoming,
        queue_drop: &impl Fn(admission::QueueDrop, quinn::Incoming),
    ) {
        HubMetrics::inc_outcome(&self.metrics.tunnel_handshakes, "queued");
        if let Some(oldest) = waiting.push(std::time::Instant::now(), incoming) {
            queue_drop(admission::QueueDrop::Full, oldest);
        }
    }

    async fn drain(self) {
        self.listening.store(false, Ordering::SeqCst);
        // New handshakes are refused from here on; agents go to another hub or come back.
        self.endpoint.set_server_config(None);
        // Active-active: make before break. Node roles move this hub's sites once it stops
        // answering their relay probes; it keeps relaying (and its agents keep their tunnels)
        // until they have, then tells the agents, whose frames go to the next hub at once.
        if self.config.active_active() {
            if let Some(r) = &self.relay {
                r.dp.set_answering_probes(false);
                info!(handover = ?ACTIVE_ACTIVE_HANDOVER, "active-active: handing this hub's sites over before stopping");
                tokio::time::sleep(ACTIVE_ACTIVE_HANDOVER).await;
            }
        }
        let retry_after_ms =
            u32::try_from(self.config.restart_hint.as_millis()).unwrap_or(u32::MAX);
        let agents = self.registry.all();
        info!(agents = agents.len(), deadline = ?self.config.drain_timeout, "hub shutting down; telling agents to go away");
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
        let deadline = tokio::time::Instant::now() + self.config.drain_timeout;
        loop {
            let changed = self.registry.changed();
            if self.registry.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                warn!(
                    remaining = self.registry.len(),
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

/// How long a stopping active-active hub keeps relaying after it stops answering probes: node
/// roles take it as gone after `DEAD_AFTER` without an answer and probe every `PROBE_INTERVAL`.
pub const ACTIVE_ACTIVE_HANDOVER: Duration = petrel_proto::relay_probe::DEAD_AFTER
    .saturating_add(petrel_proto::relay_probe::PROBE_INTERVAL)
    .saturating_add(petrel_proto::relay_probe::PROBE_INTERVAL);

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
    ctx: Arc<Acceptor>,
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
    ctx.metrics.handshakes_in_flight.inc();
    let done = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake).await;
    ctx.metrics.handshakes_in_flight.dec();
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
    if let Err(why) = ctx.serving.serving() {
        debug!(remote = %conn.remote_address(), reason = %why, "connection refused: hub not serving");
        HubMetrics::inc_reason(&ctx.metrics.agent_refusals, "not_serving");
        conn.close(
            close_code::GOING_AWAY.into(),
            format!("this hub is not serving: {why}").as_bytes(),
        );
        return;
    }
    match tls::negotiated_alpn(&conn).as_deref() {
        Some(ALPN_ENROL) => enrol::serve(ctx.enrol.clone(), conn).await,
        Some(ALPN_TUNNEL) => session::serve(ctx.session.clone(), conn).await,
        other => {
            debug!(alpn = ?other.map(String::from_utf8_lossy), "unknown ALPN");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"unsupported ALPN");
        }
    }
}

/// Reads and discards the datagrams of a connection whose datagrams have nowhere to go (a
/// tunnel of a hub without a relay: `no_relay`), counting them as `reason`, so they never wait
/// in quinn's receive buffer. Returns when the connection closes.
pub(crate) async fn discard_datagrams(
    metrics: &HubMetrics,
    conn: &quinn::Connection,
    reason: &'static str,
) {
    while conn.read_datagram().await.is_ok() {
        HubMetrics::inc_reason(&metrics.datagrams_dropped, reason);
    }
}

/// Completes when `conn` receives a datagram, and never once it is closed: a connection that
/// must not be sent any (an enrolment; a tunnel before its welcome) is ended by the caller when
/// this completes. Datagrams would otherwise wait in quinn's receive buffer, which is fixed at
/// the handshake (the tunnels' 8 MiB), until someone reads them.
pub(crate) async fn first_datagram(conn: quinn::Connection) {
    if conn.read_datagram().await.is_err() {
        std::future::pending::<()>().await;
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
