//! The agent's shared state ([`AgentShared`]) as the parts the supervisor ([`crate::agent`]),
//! the links ([`crate::link`]) and the admin server use: the node's credentials
//! ([`crate::credentials`]), the links' rows ([`crate::links`]), the data plane once open
//! ([`crate::dataplane_slot`]), learned endpoints ([`crate::endpoints`]), the metrics and the
//! proxy's state; and what the admin endpoint shows of them. It depends on none of its users.

use std::sync::Arc;

use petrel_transport::admin::AdminState;
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::credentials::Credentials;
use crate::dataplane_slot::DataplaneSlot;
use crate::endpoints::EndpointBook;
use crate::identity::{AgentState, Identity};
use crate::links::{LinkBoard, LinkStatus, NoLink};
use crate::metrics::AgentMetrics;

/// Why the agent's `/readyz` says not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentNotReady {
    /// The data plane was asked for and is not doing its job.
    #[error("{0}")]
    Dataplane(String),
    #[error("not connected to any hub yet")]
    NotConnected,
    /// Not connected, with each link's last error (`endpoint: error`).
    #[error("not connected to any hub ({})", .0.join("; "))]
    LinksFailing(Vec<String>),
}

/// State shared by the supervisor, the links and the admin server, as parts: each has its own
/// methods and its own file, and none knows the others.
#[derive(Debug)]
pub struct AgentShared {
    pub config: AgentConfig,
    pub credentials: Credentials,
    pub links: LinkBoard,
    pub dataplane: DataplaneSlot,
    pub endpoints: EndpointBook,
    pub metrics: AgentMetrics,
    /// Proxied streams: the hub's latest egress policy, pending-dial bound, metrics.
    pub proxy: Arc<crate::proxy::ProxyState>,
    /// Direct paths to peers the hubs offered.
    pub direct: Arc<crate::direct_paths::DirectPaths>,
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
        let metrics = AgentMetrics::new();
        Self {
            links: LinkBoard::with_tcp_gauge(
                metrics.hubs_connected.clone(),
                metrics.hubs_connected_over_tcp.clone(),
            ),
            dataplane: DataplaneSlot::new(config.datapath.is_some()),
            endpoints: EndpointBook::new(state.clone(), new_endpoints),
            direct: Arc::new(crate::direct_paths::DirectPaths::new(
                identity.node_name(),
                metrics.direct.clone(),
            )),
            credentials: Credentials::new(state, identity),
            metrics,
            proxy: Arc::new(crate::proxy::ProxyState::new()),
            config,
        }
    }
}

impl AdminState for AgentShared {
    type NotReady = AgentNotReady;

    fn ready(&self) -> Result<(), AgentNotReady> {
        // Connected is not enough: the data plane must be programmed too (unless --hooks none).
        if let Some(why) = self.dataplane.problem() {
            return Err(AgentNotReady::Dataplane(why));
        }
        self.links.any_connected().map_err(|no| match no {
            NoLink::NotYet => AgentNotReady::NotConnected,
            NoLink::Failing(errors) => AgentNotReady::LinksFailing(errors),
        })
    }

    fn status(&self) -> serde_json::Value {
        let id = self.credentials.identity();
        let links: Vec<LinkStatus> = self.links.rows();
        let dataplane = match (self.dataplane.get(), &self.config.datapath) {
            (Some(d), _) => serde_json::to_value(d.status()).unwrap_or_default(),
            // Asked for but not open: say why (status shows it, /readyz refuses).
            (None, Some(cfg)) => serde_json::json!({
                "hooks": cfg.hook.to_string(),
                "ready": false,
                "error": self.dataplane.problem(),
            }),
            (None, None) => serde_json::Value::Null,
        };
        serde_json::json!({
            "dataplane": dataplane,
            "node": id.node_name(),
            "certificate_not_after_unix": id.info.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "links": links,
            "peers": self.direct.status(),
        })
    }

    fn metrics(&self) -> String {
        let text = crate::proxy::merge_metrics(self.metrics.encode(), &self.proxy);
        let live = crate::metrics::LiveState {
            dataplane_ready: self
                .config
                .datapath
                .as_ref()
                .map(|_| self.dataplane.problem().is_none()),
            dataplane: self.dataplane.get().map(|d| d.as_ref()),
            tunnels: self.links.tunnel_stats(),
            certificate_not_after: self.credentials.identity().info.not_after,
        };
        let extra = crate::metrics::render_live(&live);
        match text.strip_suffix("# EOF\n") {
            Some(head) => format!("{head}{extra}# EOF\n"),
            None => format!("{text}{extra}"),
        }
    }
}
