//! The agent's shared state ([`AgentShared`]): its identity, the status of every link, the data
//! plane once open, the proxy's state and the endpoints it learned, and what the admin endpoint
//! shows of them. The supervisor ([`crate::agent`]), the links ([`crate::link`]) and the admin
//! server depend on it; it depends on none of them.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use petrel_transport::admin::AdminState;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::identity::{AgentState, Identity};
use crate::metrics::AgentMetrics;

/// Where one link is in its life (`state` in `/status`, as the lower-case word).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    #[default]
    Connecting,
    Connected,
    /// The last attempt failed; waiting before the next.
    Backoff,
    /// The session ended; reconnecting.
    Disconnected,
    /// Reaches the same hub as another link of this agent: waiting before trying again.
    Parked,
    Stopped,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Backoff => "backoff",
            Self::Disconnected => "disconnected",
            Self::Parked => "parked",
            Self::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the agent's `/readyz` says not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentNotReady {
    #[error("state lock poisoned")]
    LockPoisoned,
    /// The data plane was asked for and is not doing its job.
    #[error("{0}")]
    Dataplane(String),
    #[error("not connected to any hub yet")]
    NotConnected,
    /// Not connected, with each link's last error (`endpoint: error`).
    #[error("not connected to any hub ({})", .0.join("; "))]
    LinksFailing(Vec<String>),
}

/// One row of `petrel-edge-agent status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    pub endpoint: String,
    pub state: LinkState,
    pub hub: Option<String>,
    pub remote: Option<String>,
    pub connected_since_unix: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub last_error: Option<String>,
    pub attempts: u32,
}

pub(crate) type PendingView = (
    Vec<(String, quinn::Connection)>,
    Option<petrel_proto::HubView>,
);

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
    /// The data plane, once the node's Flannel device is there (unset with `--hooks none`).
    pub dataplane: std::sync::OnceLock<Arc<crate::dataplane::AgentDataplane>>,
    /// Why the data plane could not be opened yet (e.g. `flannel.1` missing).
    pub dataplane_error: Mutex<Option<String>>,
    /// Open tunnels by endpoint: (hub, connection), for quinn's path statistics.
    pub tunnels: Mutex<BTreeMap<String, (String, quinn::Connection)>>,
    /// Tunnels (by hub) and the latest view, for a data plane that is not open yet.
    pending_view: Mutex<PendingView>,
    /// Proxied streams: the hub's latest egress policy, pending-dial bound, metrics.
    pub proxy: Arc<crate::proxy::ProxyState>,
    new_endpoints: mpsc::UnboundedSender<String>,
}

impl AgentShared {
    /// The state of an agent with this configuration and identity; endpoints it learns are sent
    /// to `new_endpoints` (the supervisor starts a link for each).
    pub fn new(
        config: AgentConfig,
        state: AgentState,
        identity: Identity,
        new_endpoints: mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            state,
            identity: RwLock::new(Arc::new(identity)),
            links: Mutex::new(BTreeMap::new()),
            metrics: AgentMetrics::new(),
            renewing: AtomicBool::new(false),
            dataplane: std::sync::OnceLock::new(),
            dataplane_error: Mutex::new(None),
            tunnels: Mutex::new(BTreeMap::new()),
            pending_view: Mutex::new(PendingView::default()),
            proxy: Arc::new(crate::proxy::ProxyState::new()),
            new_endpoints,
            config,
        }
    }

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
            let connected = links
                .values()
                .filter(|l| l.state == LinkState::Connected)
                .count();
            self.metrics.hubs_connected.set(connected as i64);
        }
    }

    /// Remembers the tunnel to `hub` and the latest hub view for a data plane that is not
    /// open yet.
    pub fn remember_view(&self, hub: &str, conn: &quinn::Connection, view: &petrel_proto::HubView) {
        if let Ok(mut p) = self.pending_view.lock() {
            p.0.retain(|(h, _)| h != hub);
            p.0.push((hub.to_string(), conn.clone()));
            p.1 = Some(view.clone());
        }
    }

    pub(crate) fn take_pending_view(&self) -> PendingView {
        self.pending_view
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Records (or with `None` forgets) the open tunnel of `endpoint`.
    pub fn track_tunnel(&self, endpoint: &str, tunnel: Option<(&str, &quinn::Connection)>) {
        if let Ok(mut t) = self.tunnels.lock() {
            match tunnel {
                Some((hub, conn)) => {
                    t.insert(endpoint.to_string(), (hub.to_string(), conn.clone()));
                }
                None => {
                    t.remove(endpoint);
                }
            }
        }
    }

    /// Why the data plane is not doing its job, when one was asked for (not `--hooks none`).
    pub fn dataplane_problem(&self) -> Option<String> {
        self.config.datapath.as_ref()?;
        match self.dataplane.get() {
            Some(dp) => dp.apply_error(),
            None => Some(format!(
                "data plane not ready: {}",
                self.dataplane_error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .unwrap_or_else(|| "still opening".into())
            )),
        }
    }

    /// Links, other than `except`, connected to hub `hub`.
    pub fn other_link_on_hub(&self, hub: &str, except: &str) -> Option<String> {
        let links = self.links.lock().ok()?;
        links
            .values()
            .find(|l| {
                l.endpoint != except
                    && l.state == LinkState::Connected
                    && l.hub.as_deref() == Some(hub)
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
    type NotReady = AgentNotReady;

    fn ready(&self) -> Result<(), AgentNotReady> {
        let links = self.links.lock().map_err(|_| AgentNotReady::LockPoisoned)?;
        // Connected is not enough: the data plane must be programmed too (unless --hooks none).
        if let Some(why) = self.dataplane_problem() {
            return Err(AgentNotReady::Dataplane(why));
        }
        if links.values().any(|l| l.state == LinkState::Connected) {
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
                AgentNotReady::NotConnected
            } else {
                AgentNotReady::LinksFailing(errors)
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
        let dataplane = match (self.dataplane.get(), &self.config.datapath) {
            (Some(d), _) => serde_json::to_value(d.status()).unwrap_or_default(),
            // Asked for but not open: say why (status shows it, /readyz refuses).
            (None, Some(cfg)) => serde_json::json!({
                "hooks": cfg.hook.to_string(),
                "ready": false,
                "error": self.dataplane_problem(),
            }),
            (None, None) => serde_json::Value::Null,
        };
        serde_json::json!({
            "dataplane": dataplane,
            "node": id.node_name(),
            "certificate_not_after_unix": id.info.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "links": links,
        })
    }

    fn metrics(&self) -> String {
        let text = crate::proxy::merge_metrics(self.metrics.encode(), &self.proxy);
        let live = crate::metrics::LiveState {
            dataplane_ready: self
                .config
                .datapath
                .as_ref()
                .map(|_| self.dataplane_problem().is_none()),
            dataplane: self.dataplane.get().map(|d| d.as_ref()),
            tunnels: self
                .tunnels
                .lock()
                .map(|t| {
                    t.iter()
                        .map(|(ep, (hub, c))| (ep.clone(), hub.clone(), c.stats()))
                        .collect()
                })
                .unwrap_or_default(),
            certificate_not_after: self.identity().info.not_after,
        };
        let extra = crate::metrics::render_live(&live);
        match text.strip_suffix("# EOF\n") {
            Some(head) => format!("{head}{extra}# EOF\n"),
            None => format!("{text}{extra}"),
        }
    }
}
