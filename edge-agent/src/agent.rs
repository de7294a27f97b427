//! The running agent: shared state, the supervisor that keeps one [`crate::link`] per known hub
//! endpoint (from config, from the state directory, and from the lists hubs push), and what the
//! admin endpoint shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use petrel_transport::admin::AdminState;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::AgentConfig;
use crate::identity::{AgentState, Identity, IdentityError};
use crate::metrics::AgentMetrics;

/// One row of `petrel-edge-agent status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    pub endpoint: String,
    pub state: String,
    pub hub: Option<String>,
    pub remote: Option<String>,
    pub connected_since_unix: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub last_error: Option<String>,
    pub attempts: u32,
}

/// State shared by the supervisor, the links and the admin server.
#[derive(Debug)]
pub struct AgentShared {
    pub config: AgentConfig,
    pub state: AgentState,
    pub identity: RwLock<Arc<Identity>>,
    pub links: Mutex<BTreeMap<String, LinkStatus>>,
    pub metrics: AgentMetrics,
    /// One renewal at a time, whichever link notices first.
    pub renewing: AtomicBool,
    new_endpoints: mpsc::UnboundedSender<String>,
}

impl AgentShared {
    pub fn identity(&self) -> Arc<Identity> {
        self.identity
            .read()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_identity(&self, id: Identity) {
        if let Ok(mut slot) = self.identity.write() {
            *slot = Arc::new(id);
        }
    }

    pub fn update_link(&self, endpoint: &str, f: impl FnOnce(&mut LinkStatus)) {
        if let Ok(mut links) = self.links.lock() {
            let entry = links
                .entry(endpoint.to_string())
                .or_insert_with(|| LinkStatus {
                    endpoint: endpoint.to_string(),
                    ..Default::default()
                });
            f(entry);
            let connected = links.values().filter(|l| l.state == "connected").count();
            self.metrics.hubs_connected.set(connected as i64);
        }
    }

    /// Links, other than `except`, connected to hub `hub`.
    pub fn other_link_on_hub(&self, hub: &str, except: &str) -> Option<String> {
        let links = self.links.lock().ok()?;
        links
            .values()
            .find(|l| {
                l.endpoint != except && l.state == "connected" && l.hub.as_deref() == Some(hub)
            })
            .map(|l| l.endpoint.clone())
    }

    /// Learns endpoints a hub pushed; new ones are persisted and get a link.
    pub fn learn_endpoints(&self, endpoints: impl IntoIterator<Item = String>) {
        let mut known = self.state.known_endpoints();
        let mut added = Vec::new();
        for ep in endpoints {
            if known.insert(ep.clone()) {
                added.push(ep);
            }
        }
        if added.is_empty() {
            return;
        }
        if let Err(e) = self.state.save_endpoints(&known) {
            warn!(error = %e, "cannot persist learned hub endpoints");
        }
        for ep in added {
            info!(endpoint = %ep, "learned a new hub endpoint");
            let _ = self.new_endpoints.send(ep);
        }
    }
}

impl AdminState for AgentShared {
    fn ready(&self) -> Result<(), String> {
        let links = self
            .links
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        if links.values().any(|l| l.state == "connected") {
            Ok(())
        } else {
            let errors: Vec<String> = links
                .values()
                .filter_map(|l| {
                    l.last_error
                        .as_ref()
                        .map(|e| format!("{}: {e}", l.endpoint))
                })
                .collect();
            Err(if errors.is_empty() {
                "not connected to any hub yet".into()
            } else {
                format!("not connected to any hub ({})", errors.join("; "))
            })
        }
    }

    fn status(&self) -> serde_json::Value {
        let id = self.identity();
        let links: Vec<LinkStatus> = self
            .links
            .lock()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default();
        serde_json::json!({
            "node": id.node_name(),
            "certificate_not_after_unix": id.info.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "links": links,
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

/// A prepared agent.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<AgentShared>,
    endpoint_rx: mpsc::UnboundedReceiver<String>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Result<Self, IdentityError> {
        let state = AgentState::new(&config.state_dir);
        let identity = state.load()?;
        let (tx, endpoint_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(AgentShared {
            state,
            identity: RwLock::new(Arc::new(identity)),
            links: Mutex::new(BTreeMap::new()),
            metrics: AgentMetrics::new(),
            renewing: AtomicBool::new(false),
            new_endpoints: tx,
            config,
        });
        Ok(Self {
            shared,
            endpoint_rx,
        })
    }

    pub fn shared(&self) -> Arc<AgentShared> {
        self.shared.clone()
    }

    /// Runs links until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let shared = self.shared.clone();
        let mut endpoints: BTreeSet<String> = shared.state.known_endpoints();
        endpoints.extend(
            shared
                .config
                .servers
                .iter()
                .map(|(h, p)| format!("{h}:{p}")),
        );
        if endpoints.is_empty() {
            warn!("no hub endpoints known; pass --server HOST:PORT or run join");
        }
        info!(node = %shared.identity().node_name(), endpoints = ?endpoints, "agent starting");
        let mut links = JoinSet::new();
        let mut started = BTreeSet::new();
        for ep in endpoints {
            spawn_link(&mut links, &mut started, &shared, ep, &shutdown);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(ep) = self.endpoint_rx.recv() => spawn_link(&mut links, &mut started, &shared, ep, &shutdown),
            }
        }
        while links.join_next().await.is_some() {}
        info!("agent stopped");
    }
}

fn spawn_link(
    links: &mut JoinSet<()>,
    started: &mut BTreeSet<String>,
    shared: &Arc<AgentShared>,
    endpoint: String,
    shutdown: &CancellationToken,
) {
    if !started.insert(endpoint.clone()) {
        return;
    }
    shared.update_link(&endpoint, |l| l.state = "connecting".into());
    let span = tracing::info_span!("link", endpoint = %endpoint);
    links.spawn(crate::link::run(shared.clone(), endpoint, shutdown.clone()).instrument(span));
}
