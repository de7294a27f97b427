//! Keeps connected agents in step with the inventory and the endpoint list: after every change
//! it rebuilds the relay's switch table and the cluster route table (once per change, not per
//! agent), sends `GoingAway NodeRemoved` to agents whose node is gone or no longer a public-site
//! edge node, and pushes an `Update` to every agent whose view changed. Inventory changes come
//! from the store ([`Refresher::follow`] reads every write); endpoint changes come from the
//! Kubernetes integration ([`Refresher::set_gateways`]), learned site MTUs from
//! [`super::path_mtu::learn`] ([`Refresher::set_learned_site_mtus`]).

use std::sync::Arc;

use petrel_proto::{ControlMessage, GatewayEndpoint, GoingAway, GoingAwayReason};
use petrel_transport::close_code;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::cluster_routes::ClusterRoutes;
use super::dataplane::Dataplane;
use super::view::{view_digest, AgentViews};
use crate::agent_registry::{AgentEntry, AgentRegistry, SessionCommand};
use crate::inventory_store::InventoryReader;
use crate::metrics::HubMetrics;

#[derive(Debug)]
pub struct Refresher {
    pub inventory: InventoryReader,
    pub views: Arc<AgentViews>,
    pub routes: Arc<ClusterRoutes>,
    pub registry: Arc<AgentRegistry>,
    pub relay: Option<Arc<Dataplane>>,
    pub metrics: Arc<HubMetrics>,
}

impl Refresher {
    /// Refreshes everything after each inventory write, until `shutdown`.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.inventory.clone();
        changes.mark_seen();
        // A write between the store's creation and this task's start is applied too.
        self.refresh_all();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                c = changes.changed() => if c.is_none() { return },
            }
            self.refresh_all();
        }
    }

    /// Replaces the endpoint list pushed to agents (Kubernetes mode) and pushes it.
    pub fn set_gateways(&self, gateways: Option<Vec<GatewayEndpoint>>) {
        if self.views.set_gateways(gateways) {
            self.refresh_all();
        }
    }

    /// Replaces the site MTUs learned from the tunnels' paths and, if they changed, pushes the
    /// views that change with them. True if they changed.
    pub fn set_learned_site_mtus(&self, learned: Vec<petrel_proto::control::SiteMtu>) -> bool {
        let count = learned.len();
        let changed = self.views.set_learned_site_mtus(learned);
        if changed {
            self.metrics.sites_mtu_learned.set(count as i64);
            self.refresh_all();
        }
        changed
    }

    /// After an inventory or endpoint change: the switch table, the route table, then every
    /// connected agent.
    pub fn refresh_all(&self) {
        // Before anything is read: a session that welcomes its agent under the old epoch
        // refreshes itself once registered (see session.rs).
        self.views.bump_epoch();
        let inv = self.inventory.snapshot();
        if let Some(relay) = &self.relay {
            relay.refresh(&inv);
        }
        if let Some(len) = self.routes.replace(inv.route_entries()) {
            self.metrics.route_table_entries.set(len as i64);
        }
        for agent in self.registry.all() {
            self.refresh_agent(&agent);
        }
    }

    /// Checks one connected agent against the current inventory and view: disconnects it if
    /// its node is no longer admitted, pushes an `Update` if its view changed.
    pub fn refresh_agent(&self, agent: &AgentEntry) {
        let inv = self.inventory.snapshot();
        if let Err(why) = inv.admit_agent(&agent.node) {
            let why = why.to_string();
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
        let view = self.views.view_for(&inv, &agent.node, agent.route_sync);
        let digest = view_digest(&view);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::egress::resolve::PortPolicy;
    use crate::hub::view::ViewConfig;
    use crate::inventory::Inventory;

    #[tokio::test]
    async fn every_inventory_write_rebuilds_the_route_table_and_moves_the_epoch() {
        let (writer, reader) = crate::inventory_store::store(Inventory::default());
        let views = Arc::new(AgentViews::new(ViewConfig {
            hub_name: "gw-1".into(),
            advertise: vec![("192.0.2.10".into(), 7443)],
            hubs: Vec::new(),
            site_mtu: 1400,
            egress_ports: PortPolicy::default(),
            reconnect_rate: 1500,
        }));
        let routes = Arc::new(ClusterRoutes::new(Vec::new(), 0));
        let metrics = Arc::new(HubMetrics::new());
        let refresher = Arc::new(Refresher {
            inventory: reader,
            views: views.clone(),
            routes: routes.clone(),
            registry: Arc::default(),
            relay: None,
            metrics: metrics.clone(),
        });
        let shutdown = CancellationToken::new();
        let follow = tokio::spawn(refresher.clone().follow(shutdown.clone()));
        let epoch = views.epoch();
        let demo = Inventory::embedded_default().unwrap();
        let expected = demo.route_entries().len();
        assert!(expected > 0);
        writer.replace(demo);
        tokio::time::timeout(Duration::from_secs(5), async {
            while routes.len() != expected {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert!(views.epoch() > epoch);
        assert_eq!(metrics.route_table_entries.get(), expected as i64);

        // An endpoint change refreshes too; the same list again does not.
        let list = vec![GatewayEndpoint {
            name: "gw-2".into(),
            host: "192.0.2.11".into(),
            port: 7443,
            active: true,
        }];
        let before = views.epoch();
        refresher.set_gateways(Some(list.clone()));
        assert_eq!(views.epoch(), before + 1);
        refresher.set_gateways(Some(list));
        assert_eq!(views.epoch(), before + 1);

        // The writer gone, the follower ends.
        drop(writer);
        tokio::time::timeout(Duration::from_secs(5), follow)
            .await
            .unwrap()
            .unwrap();
    }
}
