//! The tunnel hub: one QUIC endpoint (ALPN `petrel/1` for tunnels, `petrel-enrol/1` for
//! enrolment) on the cloud-gateway node. It owns the accept loop, hands each connection to the
//! enrolment or tunnel session in its own task and tracing span, and on shutdown tells every
//! agent to go away (and when to come back), then drains under a deadline.

pub mod dataplane;
pub mod enrol;
pub mod registry;
pub mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use petrel_proto::{GatewayEndpoint, GoingAway, GoingAwayReason, ALPN_ENROL, ALPN_TUNNEL};
use petrel_transport::admin::AdminState;
use petrel_transport::pki::CertificateAuthority;
use petrel_transport::quic::TransportTuning;
use petrel_transport::{close_code, quic, tls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::HubConfig;
use crate::inventory::Inventory;
use crate::metrics::HubMetrics;
use crate::pki_store::{CaStore, StateDir, StoreError};
use registry::{AgentRegistry, SessionCommand};

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

/// Shared state of a running hub.
#[derive(Debug)]
pub struct HubContext {
    pub config: HubConfig,
    pub ca: CertificateAuthority,
    pub state: StateDir,
    pub inventory: RwLock<Inventory>,
    pub registry: AgentRegistry,
    pub metrics: HubMetrics,
    pub listening: AtomicBool,
    pub local_addr: SocketAddr,
    pub dataplane: Option<dataplane::Dataplane>,
}

impl HubContext {
    /// The endpoints agents should dial. In file mode, this hub's advertised addresses.
    pub fn gateway_endpoints(&self) -> Vec<GatewayEndpoint> {
        self.config
            .advertise
            .iter()
            .map(|(host, port)| GatewayEndpoint {
                name: self.config.hub_name.clone(),
                host: host.clone(),
                port: *port,
                active: true,
            })
            .collect()
    }
}

/// A bound hub, ready to run.
#[derive(Debug)]
pub struct Hub {
    ctx: Arc<HubContext>,
    endpoint: quinn::Endpoint,
}

impl Hub {
    /// Loads or creates the CA, issues this hub's certificate and binds the UDP port.
    pub fn bind(config: HubConfig, inventory: Inventory) -> Result<Self, HubError> {
        let state = StateDir::new(&config.state_dir);
        let state_err = |source| HubError::State {
            dir: config.state_dir.display().to_string(),
            source,
        };
        let now = SystemTime::now();
        let ca = state.load_or_create(now).map_err(state_err)?;
        let secret = state.hub_secret().map_err(state_err)?;
        let hosts: Vec<String> = config.advertise.iter().map(|(h, _)| h.clone()).collect();
        let (chain, key) =
            ca.issue_hub_certificate(&hosts, now, Duration::from_secs(90 * 86400))?;
        let tuning = TransportTuning {
            keep_alive: config.keepalive,
            idle_timeout: config.idle_timeout,
            ..Default::default()
        };
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
        let dataplane = match config.relay_listen {
            Some(addr) => {
                let std_sock = std::net::UdpSocket::bind(addr)
                    .map_err(|source| HubError::Bind { addr, source })?;
                std_sock
                    .set_nonblocking(true)
                    .map_err(|source| HubError::Bind { addr, source })?;
                let sock = tokio::net::UdpSocket::from_std(std_sock)
                    .map_err(|source| HubError::Bind { addr, source })?;
                let local_node = config.node_name.clone().or_else(|| {
                    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .ok()?
                        .trim()
                        .to_string();
                    inventory.node(&host).map(|n| n.name.clone())
                });
                let dp = dataplane::Dataplane::new(
                    sock,
                    &inventory,
                    local_node.clone(),
                    config.vni,
                    config.flannel_port,
                );
                info!(relay = ?dp.local_addr(), node = ?local_node, vni = config.vni, "VXLAN relay listening");
                Some(dp)
            }
            None => None,
        };
        info!(listen = %local_addr, ca_sha256 = %ca.fingerprint(), hub = %config.hub_name, "hub listening");
        let ctx = Arc::new(HubContext {
            config,
            ca,
            state,
            inventory: RwLock::new(inventory),
            registry: AgentRegistry::new(),
            metrics: HubMetrics::new(),
            listening: AtomicBool::new(true),
            local_addr,
            dataplane,
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
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
            };
            let ctx = self.ctx.clone();
            let span = tracing::info_span!("conn", remote = %incoming.remote_address());
            tokio::spawn(handle_incoming(ctx, incoming).instrument(span));
        }
        self.drain().await;
        relay.abort();
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

async fn handle_incoming(ctx: Arc<HubContext>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Foreign or expired certificates, wrong fingerprints and broken handshakes all end
            // here with the TLS alert that explains them.
            info!(error = %e, "handshake failed");
            HubMetrics::inc_outcome(&ctx.metrics.tunnel_handshakes, handshake_outcome(&e));
            return;
        }
    };
    match tls::negotiated_alpn(&conn).as_deref() {
        Some(ALPN_ENROL) => enrol::serve(ctx, conn).await,
        Some(ALPN_TUNNEL) => session::serve(ctx, conn).await,
        other => {
            debug!(alpn = ?other.map(String::from_utf8_lossy), "unknown ALPN");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"unsupported ALPN");
        }
    }
}

fn handshake_outcome(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TransportError(t)
            if t.code.to_string().contains("crypto") || t.to_string().contains("certificate") =>
        {
            "tls_error"
        }
        quinn::ConnectionError::TimedOut => "timeout",
        quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::ApplicationClosed(_) => "closed_by_peer",
        _ => "error",
    }
}

impl AdminState for HubContext {
    fn ready(&self) -> Result<(), String> {
        if !self.listening.load(Ordering::SeqCst) {
            return Err("hub is shutting down".into());
        }
        match self.inventory.read() {
            Ok(inv) if inv.nodes().next().is_some() => Ok(()),
            Ok(_) => Err("inventory is empty".into()),
            Err(_) => Err("inventory lock poisoned".into()),
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
                "endpoints": self.gateway_endpoints().iter().map(|g| format!("{}:{}", g.host, g.port)).collect::<Vec<_>>(),
            },
            "agents": self.registry.status(),
            "dataplane": self.dataplane.as_ref().map(|d| d.stats.to_json()),
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}
