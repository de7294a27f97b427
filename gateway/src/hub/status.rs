//! What the admin endpoint shows of a running hub: `/readyz` (listening and an inventory with
//! nodes), `/status` (this hub, its endpoints, the connected agents, the Kubernetes section, the
//! relay's counters and switch table) and `/metrics`. It only reads the parts it is given.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use petrel_transport::admin::AdminState;

use super::dataplane::Dataplane;
use super::serving::ServingGate;
use super::view::AgentViews;
use crate::agent_registry::AgentRegistry;
use crate::inventory_store::InventoryReader;
use crate::metrics::HubMetrics;

/// Why the hub's `/readyz` says not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubNotReady {
    #[error("hub is shutting down")]
    ShuttingDown,
    #[error("inventory is empty")]
    EmptyInventory,
}

/// The `/status` section the Kubernetes integration writes (role, Lease holder, candidates,
/// rejected nodes); empty in file mode.
#[derive(Debug, Default)]
pub struct ClusterStatus(RwLock<Option<serde_json::Value>>);

impl ClusterStatus {
    pub fn set(&self, value: serde_json::Value) {
        if let Ok(mut s) = self.0.write() {
            *s = Some(value);
        }
    }

    pub fn get(&self) -> Option<serde_json::Value> {
        self.0.read().ok().and_then(|s| s.clone())
    }
}

#[derive(Debug)]
pub struct HubStatus {
    pub hub_name: String,
    pub listen: std::net::SocketAddr,
    pub ca_sha256: String,
    /// Cleared when the hub starts draining.
    pub listening: Arc<AtomicBool>,
    pub inventory: InventoryReader,
    pub serving: Arc<ServingGate>,
    pub views: Arc<AgentViews>,
    pub registry: Arc<AgentRegistry>,
    pub cluster: Arc<ClusterStatus>,
    pub relay: Option<Arc<Dataplane>>,
    pub metrics: Arc<HubMetrics>,
}

/// With several active hubs, the hub that owns each public site (`petrel_proto::ownership`,
/// computed as the agents and node roles compute it); `None` with one.
fn site_owners(
    inv: &crate::inventory::Inventory,
    endpoints: &[petrel_proto::control::GatewayEndpoint],
) -> Option<std::collections::BTreeMap<String, String>> {
    let mut live: Vec<&str> = endpoints
        .iter()
        .filter(|g| g.active)
        .map(|g| g.name.as_str())
        .collect();
    live.sort_unstable();
    live.dedup();
    if live.len() < 2 {
        return None;
    }
    Some(
        inv.nodes()
            .filter(|n| inv.site_kind_of(n) == Some(crate::inventory::SiteKind::Public))
            .filter_map(|n| {
                let owner = petrel_proto::ownership::owner(&n.site, live.iter().copied())?;
                Some((n.site.clone(), owner.to_string()))
            })
            .collect(),
    )
}

/// Each site with an MTU below the site MTU: declared in the inventory (which wins) or learned
/// from its tunnels' paths (`path_mtu` is what the paths fit, also when a declaration overrides
/// it).
fn site_mtus_status(
    declared: &[petrel_proto::control::SiteMtu],
    learned: &[petrel_proto::control::SiteMtu],
) -> serde_json::Value {
    let mut sites = serde_json::Map::new();
    for d in declared {
        sites.insert(
            d.site.clone(),
            serde_json::json!({"mtu": d.mtu, "source": "declared"}),
        );
    }
    for l in learned {
        match sites.get_mut(&l.site) {
            Some(entry) => entry["path_mtu"] = serde_json::json!(l.mtu),
            None => {
                sites.insert(
                    l.site.clone(),
                    serde_json::json!({"mtu": l.mtu, "source": "learned", "path_mtu": l.mtu}),
                );
            }
        }
    }
    serde_json::Value::Object(sites)
}

impl AdminState for HubStatus {
    type NotReady = HubNotReady;

    fn ready(&self) -> Result<(), HubNotReady> {
        if !self.listening.load(Ordering::SeqCst) {
            return Err(HubNotReady::ShuttingDown);
        }
        if self.inventory.snapshot().nodes().next().is_none() {
            return Err(HubNotReady::EmptyInventory);
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let inv = self.inventory.snapshot();
        let serving = self.serving.serving();
        serde_json::json!({
            "hub": {
                "name": self.hub_name,
                "listen": self.listen.to_string(),
                "ca_sha256": self.ca_sha256,
                "inventory_generation": inv.generation(),
                "inventory_revision": inv.revision,
                "ready": self.ready().is_ok(),
                "serving": serving.is_ok(),
                "not_serving_reason": serving.err().map(|e| e.to_string()),
                "endpoints": self.views.gateway_endpoints().iter().map(|g| format!("{}:{}", g.host, g.port)).collect::<Vec<_>>(),
            },
            "site_mtus": site_mtus_status(&inv.site_mtus(), &self.views.learned_site_mtus()),
            "site_owners": site_owners(&inv, &self.views.gateway_endpoints()),
            "agents": self.registry.status(),
            "kubernetes": self.cluster.get(),
            "dataplane": self.relay.as_ref().map(|d| d.stats.to_json()),
            "switch_table": self.relay.as_ref().map(|d| {
                let table = d.table();
                let nodes: std::collections::BTreeMap<String, String> = inv
                    .nodes()
                    .filter_map(|n| Some((n.name.clone(), table.mac_of(&n.name)?.to_string())))
                    .collect();
                serde_json::json!({ "generation": table.generation(), "vtep_macs": nodes })
            }),
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use petrel_proto::control::SiteMtu;

    #[test]
    fn site_owners_are_listed_only_with_several_active_hubs() {
        let inv = crate::inventory::Inventory::embedded_default().unwrap();
        let gw = |name: &str, active| petrel_proto::control::GatewayEndpoint {
            name: name.into(),
            host: "192.0.2.1".into(),
            port: 7443,
            active,
        };
        assert_eq!(site_owners(&inv, &[gw("gw-1", true)]), None);
        assert_eq!(
            site_owners(&inv, &[gw("gw-1", true), gw("gw-3", false)]),
            None
        );
        let owners = site_owners(&inv, &[gw("gw-1", true), gw("gw-3", true)]).unwrap();
        assert_eq!(
            owners,
            [("site-a", "gw-1"), ("site-b", "gw-3")]
                .into_iter()
                .map(|(s, h)| (s.to_string(), h.to_string()))
                .collect()
        );
    }

    #[test]
    fn site_mtus_show_their_source_and_a_declared_one_its_path_too() {
        let m = |site: &str, mtu| SiteMtu {
            site: site.into(),
            mtu,
        };
        let v = site_mtus_status(
            &[m("site-b", 1350), m("site-d", 1200)],
            &[m("site-b", 1296), m("site-c", 1310)],
        );
        assert_eq!(
            v,
            serde_json::json!({
                "site-b": {"mtu": 1350, "source": "declared", "path_mtu": 1296},
                "site-c": {"mtu": 1310, "source": "learned", "path_mtu": 1310},
                "site-d": {"mtu": 1200, "source": "declared"},
            })
        );
    }
}
