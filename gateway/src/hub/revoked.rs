//! The revocation list applied to the running hub: tunnel admission refuses a revoked node's
//! certificate, and [`RevocationGate::watch`] follows the stored list (`petrel-gateway revoke` writes it from
//! another process) and closes the tunnels it now refuses. The list itself, its storage and
//! its checks are [`crate::revocation`]'s.

use std::sync::Arc;

use petrel_transport::close_code;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent_registry::AgentRegistry;
use crate::hub_store::HubStore;
use crate::log_budget::LogBudget;
use crate::metrics::HubMetrics;
use crate::revocation::{Revocations, POLL};

/// The list as the hub enforces it: what admission checks and what closes revoked tunnels.
#[derive(Debug, Clone)]
pub struct RevocationGate {
    pub revocations: Arc<Revocations>,
    pub registry: Arc<AgentRegistry>,
    pub metrics: Arc<HubMetrics>,
    pub log_budget: Arc<LogBudget>,
}

impl RevocationGate {
    /// Tunnel admission: `false` (and the connection closed, counted, logged within the hub's log
    /// budget: anyone holding a revoked certificate can provoke it) if `node`'s certificate is
    /// revoked.
    pub fn admit_tunnel(&self, conn: &quinn::Connection, node: &str) -> bool {
        match self.revocations.check_peer(conn, node) {
            Ok(()) => true,
            Err(e) => {
                HubMetrics::inc_reason(&self.metrics.agent_refusals, e.label());
                if self.log_budget.allow("tunnel refused: revoked") {
                    warn!(remote = %conn.remote_address(), node = %node, reason = %e, "tunnel refused");
                }
                conn.close(close_code::UNAUTHORIZED.into(), e.to_string().as_bytes());
                false
            }
        }
    }

    /// Follows the stored list until `shutdown`: applies every change and closes the tunnels of
    /// nodes whose certificate it now refuses.
    pub async fn watch(self, store: HubStore, shutdown: CancellationToken) {
        let mut last_error: Option<String> = None;
        loop {
            match store.load_revocations().await {
                Ok(list) => {
                    last_error = None;
                    let n = list.len();
                    if self.revocations.set(list) {
                        info!(entries = n, "revocation list loaded");
                        self.close_revoked();
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        warn!(error = %msg, "cannot read the revocation list; keeping the last one");
                        last_error = Some(msg);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Closes every connected tunnel whose certificate the current list refuses.
    pub fn close_revoked(&self) {
        for agent in self.registry.all() {
            if let Err(e) = self.revocations.check_peer(&agent.connection, &agent.node) {
                info!(node = %agent.node, reason = %e, "closing the tunnel of a revoked node");
                HubMetrics::inc_reason(&self.metrics.agent_refusals, e.label());
                agent
                    .connection
                    .close(close_code::UNAUTHORIZED.into(), e.to_string().as_bytes());
            }
        }
    }
}
