//! Site MTUs learned from the tunnels' paths. The hub's side of every agent's QUIC connection
//! runs path MTU discovery toward that agent, so the largest datagram the hub can send it
//! (`max_datagram_size`) says how large an inner packet can reach that site. [`PathMtuBook`]
//! keeps, per node, a fit smaller than the default site MTU; [`PathMtuBook::learned`] gives
//! each such site the smallest fit of its nodes, and views carry those sites (a site MTU
//! declared in the inventory overrides what is learned, see [`super::view::agent_view`]), so
//! every agent routes a site behind a smaller WAN path at that site's MTU before any frame is
//! dropped. [`learn`] samples the connected agents every few seconds; a connection is sampled
//! only once discovery has had time to settle ([`SETTLE`]), so its first, lower guess is not
//! announced to the whole cluster and then taken back.
//!
//! Only smaller fits are kept: the book grows with the nodes behind small paths, not with the
//! cluster. A node's entry stays while it is disconnected (its last path is the best guess for
//! its return) and goes when the node leaves the inventory, changes site, or is measured at the
//! default again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use petrel_proto::control::{SiteMtu, MAX_SITE_MTUS};
use petrel_proto::datagram::inner_mtu;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::refresh::Refresher;
use crate::agent_registry::AgentRegistry;
use crate::inventory_store::InventoryReader;

/// How long a connection runs before its path MTU is read: quinn's discovery probes upward
/// from 1200 bytes right after the handshake and takes a few round trips per step (a lost probe
/// is declared lost after about three), so 15 s covers a WAN round trip of a few hundred ms.
pub const SETTLE: Duration = Duration::from_secs(15);

/// How often connected agents are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The nodes whose tunnel fits less than the default site MTU, with their site and fit.
#[derive(Debug, Default)]
pub struct PathMtuBook {
    small: HashMap<String, (String, u16)>,
}

impl PathMtuBook {
    /// Records what the tunnel to `node` (of `site`) fits now. A fit at or above `default`
    /// removes the node: it does not narrow its site.
    pub fn observe(&mut self, node: &str, site: &str, fit: u16, default: u16) {
        if fit >= default {
            self.small.remove(node);
        } else {
            self.small.insert(node.to_string(), (site.to_string(), fit));
        }
    }

    /// Keeps the nodes `keep(node, site)` accepts (still in the inventory, same site).
    pub fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        self.small.retain(|node, (site, _)| keep(node, site));
    }

    pub fn len(&self) -> usize {
        self.small.len()
    }

    pub fn is_empty(&self) -> bool {
        self.small.is_empty()
    }

    /// Each site with a node behind a smaller path, at the smallest fit of its nodes, sorted
    /// by site. At most [`MAX_SITE_MTUS`] (the smallest MTUs first when there are more).
    pub fn learned(&self) -> Vec<SiteMtu> {
        let mut sites: BTreeMap<&str, u16> = BTreeMap::new();
        for (site, fit) in self.small.values() {
            let e = sites.entry(site.as_str()).or_insert(*fit);
            *e = (*e).min(*fit);
        }
        let mut out: Vec<SiteMtu> = sites
            .into_iter()
            .map(|(site, mtu)| SiteMtu {
                site: site.to_string(),
                mtu,
            })
            .collect();
        if out.len() > MAX_SITE_MTUS {
            out.sort_by_key(|m| m.mtu);
            out.truncate(MAX_SITE_MTUS);
            out.sort_by(|a, b| a.site.cmp(&b.site));
        }
        out
    }
}

/// Samples every connected agent's path every [`SAMPLE_EVERY`] and hands the learned site
/// MTUs to the refresher, which pushes views only when they change. Until `shutdown`.
pub async fn learn(
    registry: Arc<AgentRegistry>,
    inventory: InventoryReader,
    refresher: Arc<Refresher>,
    default_mtu: u16,
    shutdown: CancellationToken,
) {
    let mut book = PathMtuBook::default();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        for agent in registry.all() {
            let settled = now.duration_since(agent.since).is_ok_and(|up| up >= SETTLE);
            if !settled {
                continue;
            }
            if let Some(max) = agent.connection.max_datagram_size() {
                book.observe(&agent.node, &agent.site, inner_mtu(max), default_mtu);
            }
        }
        let inv = inventory.snapshot();
        book.retain(|node, site| inv.node(node).is_some_and(|n| n.site == site));
        let learned = book.learned();
        if refresher.set_learned_site_mtus(learned.clone()) {
            info!(sites = ?learned.iter().map(|m| (m.site.as_str(), m.mtu)).collect::<Vec<_>>(), "site MTUs learned from the tunnels' paths changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtu(site: &str, mtu: u16) -> SiteMtu {
        SiteMtu {
            site: site.to_string(),
            mtu,
        }
    }

    #[test]
    fn a_site_takes_the_smallest_fit_of_its_nodes_behind_smaller_paths() {
        let mut book = PathMtuBook::default();
        book.observe("b1", "site-b", 1310, 1380);
        book.observe("b2", "site-b", 1296, 1380);
        book.observe("a1", "site-a", 1380, 1380);
        book.observe("c1", "site-c", 1379, 1380);
        assert_eq!(
            book.learned(),
            vec![mtu("site-b", 1296), mtu("site-c", 1379)]
        );
        // Only the smaller fits are kept.
        assert_eq!(book.len(), 3);
    }

    #[test]
    fn a_node_measured_at_the_default_again_no_longer_narrows_its_site() {
        let mut book = PathMtuBook::default();
        book.observe("b1", "site-b", 1296, 1380);
        book.observe("b2", "site-b", 1310, 1380);
        book.observe("b1", "site-b", 1380, 1380);
        assert_eq!(book.learned(), vec![mtu("site-b", 1310)]);
        book.observe("b2", "site-b", 1400, 1380);
        assert!(book.learned().is_empty());
        assert!(book.is_empty());
        // A later, different measurement replaces the earlier one.
        book.observe("b1", "site-b", 1200, 1380);
        book.observe("b1", "site-b", 1300, 1380);
        assert_eq!(book.learned(), vec![mtu("site-b", 1300)]);
    }

    #[test]
    fn nodes_that_left_the_inventory_or_their_site_are_forgotten() {
        let mut book = PathMtuBook::default();
        book.observe("b1", "site-b", 1296, 1380);
        book.observe("b2", "site-b", 1310, 1380);
        book.observe("c1", "site-c", 1200, 1380);
        // b1 moved to site-d, c1 is gone.
        book.retain(|node, site| matches!((node, site), ("b1", "site-d") | ("b2", "site-b")));
        assert_eq!(book.learned(), vec![mtu("site-b", 1310)]);
    }

    #[test]
    fn more_learned_sites_than_a_view_carries_keep_the_smallest() {
        let mut book = PathMtuBook::default();
        for i in 0..=MAX_SITE_MTUS {
            // Site 0 has the largest fit; every other site a smaller one.
            let fit = if i == 0 { 1379 } else { 1200 };
            book.observe(&format!("n{i}"), &format!("s{i:05}"), fit, 1380);
        }
        let learned = book.learned();
        assert_eq!(learned.len(), MAX_SITE_MTUS);
        assert!(learned.iter().all(|m| m.mtu == 1200));
        assert!(learned.windows(2).all(|w| w[0].site < w[1].site));
    }
}
