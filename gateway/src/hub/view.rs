//! What each agent is told, and what it was last told. A node's view is a pure function of the
//! inventory, this hub's endpoints, the site MTU, the site MTUs learned from the tunnels' paths
//! and the egress policy ([`agent_view`]).
//! [`AgentViews`] keeps what changes views besides the inventory (the endpoint list in
//! Kubernetes mode, the learned site MTUs), the view epoch that every change bumps, the egress policy cache per
//! inventory revision,
//! and a digest of the last view each session was sent, so a change is pushed only to the
//! agents whose view it changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use petrel_proto::control::{EgressPolicy, SiteMtu, MAX_SITE_MTUS};
use petrel_proto::{GatewayEndpoint, HubView};

use crate::egress::resolve::PortPolicy;
use crate::inventory::Inventory;
use crate::inventory_store::InventorySnapshot;

/// The view of the agent on `node`: the hubs to dial, the routes (none for an agent that syncs
/// the cluster route table instead), the site MTU, the egress policy and the sites whose MTU is
/// smaller: those declared in the inventory, then those `learned` from the tunnels' paths
/// (a declared MTU overrides a learned one; at most [`MAX_SITE_MTUS`] in all), and the sites
/// that are not public (for agents choosing among several active hubs). The reconnect spread
/// is the fleet's, not the node's: [`AgentViews::view_for`] sets it.
pub fn agent_view(
    inv: &Inventory,
    node: &str,
    route_sync: bool,
    gateways: Vec<GatewayEndpoint>,
    site_mtu: u16,
    egress: EgressPolicy,
    learned: &[SiteMtu],
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
        site_mtus: site_mtus(inv.site_mtus(), learned),
        routed_sites: inv
            .sites()
            .filter(|s| s.kind != crate::inventory::SiteKind::Public)
            .map(|s| s.name.clone())
            .take(petrel_proto::control::MAX_ROUTED_SITES)
            .collect(),
        // The fleet's, not the node's: set by AgentViews::view_for, once per revision.
        reconnect_spread_ms: 0,
    }
}

/// How widely a fleet of `agents` spreads its return to admit `rate` of them a second
/// (`HubView::reconnect_spread_ms`), rounded to the nearest second: a node more or less then
/// changes no agent's view (every view that changes is pushed to its agent, and one node must
/// cost O(what changed), not an update to every agent), only every `rate` nodes does. 0 when
/// `rate` is 0 (no spread) or the fleet needs less than half a second; at most the agents' cap.
pub fn reconnect_spread_ms(agents: usize, rate: u32) -> u32 {
    if rate == 0 {
        return 0;
    }
    let cap =
        u64::try_from(petrel_proto::control::MAX_RECONNECT_SPREAD.as_millis()).unwrap_or(u64::MAX);
    let ms = u64::try_from(agents)
        .unwrap_or(u64::MAX)
        .saturating_mul(1000)
        / u64::from(rate);
    let seconds = ms.saturating_add(500) / 1000;
    u32::try_from(seconds.saturating_mul(1000).min(cap)).unwrap_or(u32::MAX)
}

/// The declared site MTUs, then the learned ones of undeclared sites, at most [`MAX_SITE_MTUS`].
fn site_mtus(mut declared: Vec<SiteMtu>, learned: &[SiteMtu]) -> Vec<SiteMtu> {
    let room = MAX_SITE_MTUS.saturating_sub(declared.len());
    let extra: Vec<SiteMtu> = learned
        .iter()
        .filter(|l| !declared.iter().any(|d| d.site == l.site))
        .take(room)
        .cloned()
        .collect();
    declared.extend(extra);
    declared.truncate(MAX_SITE_MTUS);
    declared
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
    /// File mode, active-active: every hub's name and endpoint, all active (`hubs`).
    pub hubs: Vec<crate::config::StaticHub>,
    pub site_mtu: u16,
    pub egress_ports: PortPolicy,
    /// Agents per second a fleet's return is spread for (0: no spread).
    pub reconnect_rate: u32,
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
    /// Egress policies per site, for one inventory revision.
    egress_policies: Mutex<SitePolicies>,
    /// Sites behind a smaller path than the site MTU, learned by [`super::path_mtu::learn`].
    learned_mtus: RwLock<Vec<SiteMtu>>,
    /// The reconnect spread for one inventory revision (revision, milliseconds): counting the
    /// edge nodes costs a look-up per site, too much to repeat for every agent's view.
    spread: Mutex<Option<(u64, u32)>>,
}

impl AgentViews {
    pub fn new(config: ViewConfig) -> Self {
        Self {
            config,
            gateways: RwLock::new(None),
            pushed: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            egress_policies: Mutex::default(),
            learned_mtus: RwLock::new(Vec::new()),
            spread: Mutex::new(None),
        }
    }

    /// Replaces the learned site MTUs; true if they changed.
    pub fn set_learned_site_mtus(&self, learned: Vec<SiteMtu>) -> bool {
        match self.learned_mtus.write() {
            Ok(mut l) if *l != learned => {
                *l = learned;
                true
            }
            _ => false,
        }
    }

    pub fn learned_site_mtus(&self) -> Vec<SiteMtu> {
        self.learned_mtus
            .read()
            .map(|l| l.clone())
            .unwrap_or_default()
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

    /// The endpoints agents should dial. In file mode, this hub's advertised addresses, or
    /// with a static hub list every hub's, all active (each carries the sites it owns); in
    /// Kubernetes mode every candidate's, with the Lease holder's marked active.
    pub fn gateway_endpoints(&self) -> Vec<GatewayEndpoint> {
        if let Some(g) = self.gateways.read().ok().and_then(|g| g.clone()) {
            return g;
        }
        if !self.config.hubs.is_empty() {
            return self
                .config
                .hubs
                .iter()
                .map(|(name, (host, port))| GatewayEndpoint {
                    name: name.clone(),
                    host: host.clone(),
                    port: *port,
                    active: true,
                })
                .collect();
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
    pub fn egress_policy(&self, inv: &InventorySnapshot, node: &str) -> EgressPolicy {
        policy_for(&self.egress_policies, inv, &self.config.egress_ports, node)
    }

    /// The view of the agent on `node` now.
    pub fn view_for(&self, inv: &InventorySnapshot, node: &str, route_sync: bool) -> HubView {
        let view = agent_view(
            inv,
            node,
            route_sync,
            self.gateway_endpoints(),
            self.config.site_mtu,
            self.egress_policy(inv, node),
            &self.learned_site_mtus(),
        );
        HubView {
            reconnect_spread_ms: self.reconnect_spread_ms(inv),
            ..view
        }
    }

    /// [`reconnect_spread_ms`] of `inv`'s edge nodes at the configured rate.
    fn reconnect_spread_ms(&self, inv: &InventorySnapshot) -> u32 {
        let compute = || reconnect_spread_ms(inv.edge_nodes(), self.config.reconnect_rate);
        let Ok(mut cached) = self.spread.lock() else {
            return compute();
        };
        match *cached {
            Some((revision, ms)) if revision == inv.revision => ms,
            _ => {
                let ms = compute();
                *cached = Some((inv.revision, ms));
                ms
            }
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

/// The policy sent to the agent on `node` in its view: its own site's targets and the ports.
/// Every agent of a site gets the same policy (unless caps cut it), and after a hub restart a
/// whole site connects at once: the site's policy is computed once per inventory revision (an
/// inventory's own generation is not unique across replacements; the revision is, and it comes
/// with the snapshot it describes, so a policy can never be cached under another inventory's).
fn policy_for(
    cache: &Mutex<SitePolicies>,
    inv: &InventorySnapshot,
    ports: &PortPolicy,
    node: &str,
) -> EgressPolicy {
    let Some(me) = inv.node(node) else {
        return EgressPolicy::default();
    };
    let cached = cache.lock().ok().and_then(|mut c| {
        if c.revision != inv.revision {
            c.revision = inv.revision;
            c.sites.clear();
        }
        let entry = c
            .sites
            .entry(me.site.clone())
            .or_insert_with(|| crate::egress::resolve::site_policy(inv, &me.site, ports));
        entry.complete.then(|| entry.policy.clone())
    });
    cached.unwrap_or_else(|| crate::egress::resolve::own_node_first(inv, me, ports))
}

/// Per-site egress policies for one inventory revision (see [`policy_for`]).
#[derive(Debug, Default)]
struct SitePolicies {
    revision: u64,
    sites: std::collections::HashMap<String, crate::egress::resolve::SitePolicy>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn views() -> AgentViews {
        AgentViews::new(ViewConfig {
            hub_name: "gw-1".into(),
            advertise: vec![("192.0.2.10".into(), 7443)],
            hubs: Vec::new(),
            site_mtu: 1400,
            egress_ports: PortPolicy::default(),
            reconnect_rate: 1500,
        })
    }

    #[test]
    fn the_reconnect_spread_follows_the_edge_fleet_and_the_rate() {
        // Whole seconds, so that one node more changes no view; a new second every 1,500.
        assert_eq!(reconnect_spread_ms(10_000, 1500), 7_000);
        assert_eq!(reconnect_spread_ms(10_001, 1500), 7_000);
        assert_eq!(reconnect_spread_ms(9_749, 1500), 6_000);
        assert_eq!(reconnect_spread_ms(9_750, 1500), 7_000);
        assert_eq!(reconnect_spread_ms(749, 1500), 0);
        assert_eq!(reconnect_spread_ms(750, 1500), 1_000);
        assert_eq!(reconnect_spread_ms(0, 1500), 0);
        // Off, and capped at what agents honour.
        assert_eq!(reconnect_spread_ms(10_000, 0), 0);
        assert_eq!(reconnect_spread_ms(10_000_000, 1), 60_000);
        assert_eq!(reconnect_spread_ms(usize::MAX, 1), 60_000);
        // The lab inventory: its edge nodes (public and Express Connect sites, not the cloud's).
        let (_writer, reader) =
            crate::inventory_store::store(Inventory::embedded_default().unwrap());
        let inv = reader.snapshot();
        let edge = inv
            .nodes()
            .filter(|n| inv.site_kind_of(n) != Some(crate::inventory::SiteKind::Cloud))
            .count();
        assert!(edge > 0 && edge < inv.nodes().count());
        assert_eq!(inv.edge_nodes(), edge);
        // A small fleet: no spread.
        let v = views().view_for(&inv, "edge-a1", true);
        assert_eq!(v.reconnect_spread_ms, 0);
        // At one agent a second the lab's fleet spreads over as many seconds as it has edge
        // nodes, and a new inventory revision is counted again.
        let slow = AgentViews::new(ViewConfig {
            reconnect_rate: 1,
            ..views().config
        });
        let edge_ms = u32::try_from(edge * 1000).unwrap();
        assert_eq!(
            slow.view_for(&inv, "edge-a1", true).reconnect_spread_ms,
            edge_ms
        );
        let mut fewer = Inventory::embedded_default().unwrap();
        fewer.delete_node("edge-a2");
        let (_w, r) = crate::inventory_store::store(fewer);
        let mut fewer = r.snapshot();
        fewer.revision = inv.revision + 1;
        assert_eq!(
            slow.view_for(&fewer, "edge-a1", true).reconnect_spread_ms,
            edge_ms - 1000
        );
    }

    #[test]
    fn a_route_sync_agent_gets_no_routes_in_its_view_and_others_get_theirs() {
        let (_writer, reader) =
            crate::inventory_store::store(Inventory::embedded_default().unwrap());
        let inv = reader.snapshot();
        let v = views();
        let synced = v.view_for(&inv, "edge-a1", true);
        let classic = v.view_for(&inv, "edge-a1", false);
        assert!(synced.routes.is_empty());
        assert_eq!(classic.routes, inv.routes_for("edge-a1"));
        assert!(!classic.routes.is_empty());
        assert_eq!(synced.site_mtu, 1400);
        assert_eq!(synced.gateways.len(), 1);
        assert_eq!(synced.gateways[0].name, "gw-1");
        assert!(synced.gateways[0].active);
        // The sites that are not public: the cloud and Express Connect.
        assert_eq!(
            synced.routed_sites,
            vec!["site-x".to_string(), "vpc".to_string()]
        );
        // The egress policy is the node's site's.
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
        let (_writer, reader) =
            crate::inventory_store::store(Inventory::embedded_default().unwrap());
        let inv = reader.snapshot();
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

    fn mtu(site: &str, mtu: u16) -> SiteMtu {
        SiteMtu {
            site: site.to_string(),
            mtu,
        }
    }

    #[test]
    fn learned_site_mtus_reach_every_view_and_a_declared_one_overrides_them() {
        let mut inv = Inventory::embedded_default().unwrap();
        let mut site_b = inv.site("site-b").unwrap().clone();
        site_b.mtu = Some(1350);
        inv.apply_site(site_b);
        let (_writer, reader) = crate::inventory_store::store(inv);
        let inv = reader.snapshot();
        let v = views();
        let before = v.view_for(&inv, "edge-a1", true);
        assert_eq!(before.site_mtus, vec![mtu("site-b", 1350)]);

        assert!(v.set_learned_site_mtus(vec![mtu("site-b", 1296), mtu("site-c", 1310)]));
        assert!(
            !v.set_learned_site_mtus(vec![mtu("site-b", 1296), mtu("site-c", 1310)]),
            "the same list is no change"
        );
        let after = v.view_for(&inv, "edge-a1", true);
        // site-b's declared 1350 stands although its path fits less: the operator's word.
        assert_eq!(
            after.site_mtus,
            vec![mtu("site-b", 1350), mtu("site-c", 1310)]
        );
        assert_ne!(view_digest(&before), view_digest(&after));
        assert_eq!(
            v.view_for(&inv, "edge-b1", false).site_mtus,
            after.site_mtus
        );

        assert!(v.set_learned_site_mtus(Vec::new()));
        assert_eq!(v.view_for(&inv, "edge-a1", true), before);
    }

    #[test]
    fn declared_and_learned_site_mtus_together_stay_within_what_a_view_carries() {
        let declared: Vec<SiteMtu> = (0..MAX_SITE_MTUS - 1)
            .map(|i| mtu(&format!("d{i}"), 1300))
            .collect();
        let learned = vec![mtu("l1", 1200), mtu("d0", 1100), mtu("l2", 1200)];
        let all = site_mtus(declared.clone(), &learned);
        assert_eq!(all.len(), MAX_SITE_MTUS);
        assert_eq!(all[..MAX_SITE_MTUS - 1], declared[..]);
        assert_eq!(all[MAX_SITE_MTUS - 1], mtu("l1", 1200));
        let full: Vec<SiteMtu> = (0..MAX_SITE_MTUS + 1)
            .map(|i| mtu(&format!("d{i}"), 1300))
            .collect();
        assert_eq!(site_mtus(full, &learned).len(), MAX_SITE_MTUS);
        assert_eq!(
            site_mtus(Vec::new(), &learned),
            vec![mtu("l1", 1200), mtu("d0", 1100), mtu("l2", 1200)]
        );
    }

    /// The per-site policy cache must follow every inventory write, even one whose inventory
    /// counts the same generation as the one it replaces (each index counts its own).
    #[test]
    fn site_policies_follow_every_inventory_write() {
        let inv = Inventory::embedded_default().unwrap();
        let (writer, reader) = crate::inventory_store::store(inv.clone());
        let v = views();
        let a2: std::net::IpAddr = "10.0.1.3".parse().unwrap();
        assert!(v
            .egress_policy(&reader.snapshot(), "edge-a1")
            .allows(a2, 10250));

        // Same generation, different content: edge-a2 moved out of site-a.
        let mut moved = inv.clone();
        let mut node = moved.node("edge-a2").unwrap().clone();
        node.site = "site-b".into();
        moved.apply_node(node).unwrap();
        let mut replacement = Inventory::default();
        let file = moved.to_file();
        replacement.reset(file.sites, file.nodes).unwrap();
        assert_eq!(replacement.generation(), inv.generation());
        writer.replace(replacement);
        let now = reader.snapshot();
        assert!(!v.egress_policy(&now, "edge-a1").allows(a2, 10250));
        assert!(v.egress_policy(&now, "edge-b1").allows(a2, 10250));
    }
}
