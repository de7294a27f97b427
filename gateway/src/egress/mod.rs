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
//!
//! # A connection, top to bottom
//!
//! `listen` binds and accepts (bounded per pool) → `handle` reads the head with [`http`] or
//! [`sni`] → [`dial`] resolves it with [`resolve`] and dials (a stream to the owning agent, or TCP
//! from the hub) → `handle` replies → [`proxy`] splices ([`splice`]) and counts. Each step calls
//! down into the next module and returns; none calls back up.

pub mod config;
pub mod dial;
mod handle;
pub mod http;
pub mod identity;
mod listen;
pub mod metrics;
pub mod proxy;
pub mod resolve;
pub mod sni;
pub mod splice;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

pub use config::{EgressArgs, EgressConfig, EgressFileConfig};

use crate::agent_registry::AgentRegistry;
use crate::inventory_store::InventoryReader;
use crate::log_budget::LogBudget;
use metrics::EgressMetrics;

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

/// What the egress proxy takes from the running hub, and nothing more: the connected agents it
/// dials through, the inventory it resolves targets from, its metrics, the shared log budget
/// and the Petrel CA (whose client certificates the mutual-TLS listener refuses).
#[derive(Debug, Clone)]
pub struct EgressParts {
    pub registry: Arc<AgentRegistry>,
    pub inventory: InventoryReader,
    pub metrics: Arc<EgressMetrics>,
    pub log_budget: Arc<LogBudget>,
    pub petrel_ca_der: rustls_pki_types::CertificateDer<'static>,
}

/// The running proxy, shared by its listeners.
#[derive(Debug)]
pub struct Egress {
    parts: EgressParts,
    cfg: EgressConfig,
    dialer: dial::Dialer,
    /// The API server's listeners (Unix socket, authenticated mutual TLS).
    connections: Arc<Semaphore>,
    /// Descriptors the API server's listeners hold: one per connection, one per direct dial.
    api_descriptors: Arc<Semaphore>,
    /// Mutual-TLS handshakes in progress.
    tls_handshakes: Arc<Semaphore>,
    /// SNI passthrough and Host-routed HTTP.
    unauthenticated: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl Egress {
    pub fn new(parts: EgressParts, cfg: EgressConfig) -> Self {
        Self {
            dialer: dial::Dialer::new(parts.clone(), cfg.clone()),
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            api_descriptors: Arc::new(Semaphore::new(cfg.api_descriptors)),
            tls_handshakes: Arc::new(Semaphore::new(cfg.max_tls_handshakes)),
            unauthenticated: Arc::new(Semaphore::new(cfg.max_unauthenticated)),
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
            api_descriptors = cfg.api_descriptors,
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
