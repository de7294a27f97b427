//! What each agent is told, and what it was last told. A node's view is a pure function of the
//! inventory, this hub's endpoints, the site MTU and the egress policy ([`agent_view`]).
//! [`AgentViews`] keeps what changes views besides the inventory (the endpoint list in
//! Kubernetes mode), the view epoch that every change bumps, the per-epoch egress policy cache,
//! and a digest of the last view each session was sent, so a change is pushed only to the
//! agents whose view it changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use petrel_proto::control::EgressPolicy;
use petrel_proto::{GatewayEndpoint, HubView};

use crate::egress::resolve::PortPolicy;
use crate::egress::SitePolicies;
use crate::inventory::Inventory;

/// The view of the agent on `node`: the hubs to dial, the routes (none for an agent that syncs
/// the cluster route table instead), the site MTU, the egress policy and the sites whose MTU is
/// smaller.
pub fn agent_view(
    inv: &Inventory,
    node: &str,
    route_sync: bool,
    gateways: Vec<GatewayEndpoint>,
    site_mtu: u16,
    egress: EgressPolicy,
) -> HubView {
    HubView {
        gateways,
        routes: if route_sync {
            Vec::new()
        } else {
            inv.routes_for(node)
        },
        site_mtu,
        egress,
        site_mtus: inv.site_mtus(),
    }
}

/// What [`AgentViews`] keeps of a view. Equal views give equal digests; a collision (one in
/// 2^64 per change) would only skip one push until the next change.
pub fn view_digest(view: &HubView) -> u64 {
    use std::hash::BuildHasher;
    std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(view)
}

/// What every view this hub builds shares, from the validated config.
#[derive(Debug, Clone)]
pub struct ViewConfig {
    pub hub_name: String,
    /// This hub's advertised endpoints (file mode's endpoint list).
    pub advertise: Vec<(String, u16)>,
    pub site_mtu: u16,
    pub egress_ports: PortPolicy,
}

#[derive(Debug)]
pub struct AgentViews {
    config: ViewConfig,
    /// Kubernetes mode: every candidate's endpoints, the active hub's marked active.
    gateways: RwLock<Option<Vec<GatewayEndpoint>>>,
    /// A digest of the last view each session (by registry id) was sent. A digest, not the
    /// view: a view lists a route per node, so keeping one per agent would grow with agents
    /// times nodes.
    pushed: Mutex<HashMap<u64, u64>>,
    /// Bumped by every inventory or endpoint change, before the agents are refreshed: a session
    /// that computed its welcome under another epoch refreshes itself once registered.
    epoch: AtomicU64,
    /// Egress policies per site, for the current epoch.
    egress_policies: Mutex<SitePolicies>,
}

impl AgentViews {
    pub fn new(config: ViewConfig) -> Self {
        Self {
            config,
            gateways: RwLock::new(None),
            pushed: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            egress_policies: Mutex::default(),
        }
    }

    /// Changes whenever views may have changed.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Replaces the endpoint list (Kubernetes mode); true if it changed.
    pub fn set_gateways(&self, gateways: Option<Vec<GatewayEndpoint>>) -> bool {
        match self.gateways.write() {
            Ok(mut g) if *g != gateways => {
                *g = gateways;
                true
            }
            _ => false,
        }
    }

    /// The endpoints agents should dial. In file mode, this hub's advertised addresses; in
    /// Kubernetes mode every candidate's, with the Lease holder's marked active.
    pub fn gateway_endpoints(&self) -> Vec<GatewayEndpoint> {
        if let Some(g) = self.gateways.read().ok().and_then(|g| g.clone()) {
            return g;
        }
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

    /// The egress policy the agent on `node` is sent.
    pub fn egress_policy(&self, inventory: &RwLock<Inventory>, node: &str) -> EgressPolicy {
        crate::egress::policy_for(
            &self.egress_policies,
            // Before the inventory is read: see `policy_for`.
            self.epoch(),
            inventory,
            &self.config.egress_ports,
            node,
        )
    }

    /// The view of the agent on `node` now.
    pub fn view_for(&self, inventory: &RwLock<Inventory>, node: &str, route_sync: bool) -> HubView {
        let egress = self.egress_policy(inventory, node);
        let gateways = self.gateway_endpoints();
        match inventory.read() {
            Ok(inv) => agent_view(
                &inv,
                node,
                route_sync,
                gateways,
                self.config.site_mtu,
                egress,
            ),
            Err(_) => HubView {
                gateways,
                routes: Vec::new(),
                site_mtu: self.config.site_mtu,
                egress,
                site_mtus: Vec::new(),
            },
        }
    }

    /// Remembers what session `id` was last sent ([`view_digest`] of it).
    pub fn record_pushed(&self, id: u64, digest: u64) {
        if let Ok(mut p) = self.pushed.lock() {
            p.insert(id, digest);
        }
    }

    pub fn forget_pushed(&self, id: u64) {
        if let Ok(mut p) = self.pushed.lock() {
            p.remove(&id);
        }
    }

    /// Whether a view with `digest` differs from what session `id` was last sent.
    pub fn is_stale(&self, id: u64, digest: u64) -> bool {
        self.pushed
            .lock()
            .map(|p| p.get(&id) != Some(&digest))
            .unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn views() -> AgentViews {
        AgentViews::new(ViewConfig {
            hub_name: "gw-1".into(),
            advertise: vec![("192.0.2.10".into(), 7443)],
            site_mtu: 1400,
            egress_ports: PortPolicy::default(),
        })
    }

    #[test]
    fn a_route_sync_agent_gets_no_routes_in_its_view_and_others_get_theirs() {
        let inv = RwLock::new(Inventory::embedded_default().unwrap());
        let v = views();
        let synced = v.view_for(&inv, "edge-a1", true);
        let classic = v.view_for(&inv, "edge-a1", false);
        assert!(synced.routes.is_empty());
        assert_eq!(classic.routes, inv.read().unwrap().routes_for("edge-a1"));
        assert!(!classic.routes.is_empty());
        assert_eq!(synced.site_mtu, 1400);
        assert_eq!(synced.gateways.len(), 1);
        assert_eq!(synced.gateways[0].name, "gw-1");
        assert!(synced.gateways[0].active);
        // The egress policy is the node's site's.
        let inv = inv.read().unwrap();
        let own = &inv.node("edge-a1").unwrap().addresses;
        assert!(own.iter().any(|a| synced.egress.node_addresses.contains(a)));
    }

    #[test]
    fn kubernetes_endpoints_replace_the_advertised_ones_and_only_a_change_counts() {
        let v = views();
        let list = vec![
            GatewayEndpoint {
                name: "gw-1".into(),
                host: "192.0.2.10".into(),
                port: 7443,
                active: true,
            },
            GatewayEndpoint {
                name: "gw-2".into(),
                host: "192.0.2.11".into(),
                port: 7443,
                active: false,
            },
        ];
        assert!(v.set_gateways(Some(list.clone())));
        assert!(
            !v.set_gateways(Some(list.clone())),
            "the same list is no change"
        );
        assert_eq!(v.gateway_endpoints(), list);
        assert!(v.set_gateways(None));
        assert_eq!(v.gateway_endpoints().len(), 1);
    }

    #[test]
    fn a_session_is_stale_until_it_is_sent_the_current_digest() {
        let inv = RwLock::new(Inventory::embedded_default().unwrap());
        let v = views();
        let digest = view_digest(&v.view_for(&inv, "edge-a1", true));
        assert!(v.is_stale(7, digest), "never sent anything");
        v.record_pushed(7, digest);
        assert!(!v.is_stale(7, digest));
        // Another MTU is another view.
        let other = HubView {
            site_mtu: 1300,
            ..v.view_for(&inv, "edge-a1", true)
        };
        assert!(v.is_stale(7, view_digest(&other)));
        v.forget_pushed(7);
        assert!(v.is_stale(7, digest));
        let e = v.epoch();
        v.bump_epoch();
        assert_eq!(v.epoch(), e + 1);
    }
}
