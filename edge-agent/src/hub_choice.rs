//! Which hub each frame goes to when the hubs' view marks several active (active-active hubs).
//!
//! Each public site is owned by one live hub (`petrel_proto::ownership`, which the node roles
//! compute the same way): a frame to another public site's node goes to that site's owner, and
//! everything else (cloud and Express Connect nodes) to the owner of this agent's own site, so
//! all of a site's traffic with the cloud crosses one hub both ways. The ranking is also the
//! failover order: the driver takes the first ranked hub whose tunnel is open. Any hub can
//! deliver any frame (every agent keeps a tunnel to every hub), so two parties that disagree for
//! a moment cost a detour, never a drop.
//!
//! [`SilenceWatch`] is the fast half of failover on this side: a hub that stops answering while
//! frames go to it is skipped after a few hundred milliseconds.
//!
//! The view lists the sites that are not public (`HubView::routed_sites`: cloud and Express
//! Connect); from a hub that does not send that list, the hubs' own site (hub names are node
//! names) is the only one known, and an Express Connect site is ranked by its own name like a
//! public one (its frames still go straight from that hub to its VTEP).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_proto::control::HubView;
use petrel_proto::types::RoutePath;

/// The hubs, in order, for frames by their inner destination MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubChoice {
    by_mac: HashMap<[u8; 6], Arc<[String]>>,
    own: Arc<[String]>,
}

impl HubChoice {
    /// `None` unless the view marks at least two hubs active (then there is nothing to choose:
    /// frames go to the active hub as before).
    pub fn from_view(view: &HubView, own_site: Option<&str>) -> Option<Self> {
        let mut live: Vec<&str> = view
            .gateways
            .iter()
            .filter(|g| g.active)
            .map(|g| g.name.as_str())
            .collect();
        live.sort_unstable();
        live.dedup();
        if live.len() < 2 {
            return None;
        }
        // The sites that are not public: as the hub lists them, and (for a hub from before
        // that list) at least the hubs' own site.
        let not_public: HashSet<&str> = view
            .routed_sites
            .iter()
            .map(String::as_str)
            .chain(
                view.routes
                    .iter()
                    .filter(|r| live.contains(&r.node_name.as_str()))
                    .map(|r| r.site.as_str()),
            )
            .collect();
        let rank = |site: &str| -> Arc<[String]> {
            petrel_proto::ownership::rank(site, live.iter().copied())
                .into_iter()
                .map(str::to_string)
                .collect()
        };
        // Before a welcome named its site (never in practice: views come with or after it),
        // what is not another site's goes by the ranking of the empty name.
        let own = rank(own_site.unwrap_or(""));
        let mut per_site: HashMap<&str, Arc<[String]>> = HashMap::new();
        let mut by_mac = HashMap::new();
        for r in view.routes.iter().filter(|r| r.path == RoutePath::ViaHub) {
            let site = r.site.as_str();
            if not_public.contains(site) || Some(site) == own_site {
                continue;
            }
            let ranked = per_site.entry(site).or_insert_with(|| rank(site)).clone();
            by_mac.insert(r.vtep_mac.0, ranked);
        }
        Some(Self { by_mac, own })
    }

    /// The hubs for `frame` (a VXLAN payload: 8 bytes of header, then the inner Ethernet
    /// frame, whose destination is the peer's VtepMAC), owner first.
    pub fn ranked(&self, frame: &[u8]) -> &[String] {
        petrel_proto::datagram::inner_dst_mac(frame)
            .and_then(|m| self.by_mac.get(&m))
            .unwrap_or(&self.own)
    }

    /// The hub that owns this agent's own site (status).
    pub fn own_owner(&self) -> Option<&str> {
        self.own.first().map(String::as_str)
    }
}

/// Shortest silence after which a hub that is sent something is taken as gone.
pub const MIN_SILENCE: Duration = Duration::from_millis(300);

/// Notices a hub that stopped answering while it is sent something: the tunnel carried frames
/// the hub must acknowledge (datagrams, stream data, pings; not ACK-only packets, which nobody
/// answers) since the last packet that came from the hub, and nothing has come back for
/// `max(MIN_SILENCE, 3 x RTT)`. quinn acknowledges what it receives within its ack delay
/// (25 ms), so a live hub that is sent anything answers; a dead one stays silent, and without
/// this its sites' frames would go to it until the session's own timeout (5 s). Fed from the
/// connection's packet counters; it costs nothing while the tunnel is idle.
#[derive(Debug, Default, Clone)]
pub struct SilenceWatch {
    last_tx: u64,
    last_rx: u64,
    unanswered_since: Option<Instant>,
}

impl SilenceWatch {
    /// The tunnel's counters now (`tx`: ack-eliciting frames sent, `rx`: packets received);
    /// true while the hub is silent.
    pub fn observe(&mut self, tx: u64, rx: u64, rtt: Duration, now: Instant) -> bool {
        if rx != self.last_rx {
            self.last_rx = rx;
            self.last_tx = tx;
            self.unanswered_since = None;
            return false;
        }
        if tx != self.last_tx {
            self.last_tx = tx;
            self.unanswered_since.get_or_insert(now);
        }
        self.unanswered_since
            .is_some_and(|t| now.saturating_duration_since(t) >= (rtt * 3).max(MIN_SILENCE))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use petrel_proto::control::{EgressPolicy, GatewayEndpoint};
    use petrel_proto::types::{IpCidr, MacAddr, Route};

    fn route(node: &str, site: &str, n: u8, path: RoutePath) -> Route {
        Route {
            node_name: node.into(),
            site: site.into(),
            pod_cidr: IpCidr::new(format!("10.244.{n}.0").parse().unwrap(), 24).unwrap(),
            vtep_mac: MacAddr([2, 0xfa, 0, 0, 0, n]),
            underlay: format!("192.168.0.{n}").parse().unwrap(),
            path,
        }
    }

    fn gw(name: &str, active: bool) -> GatewayEndpoint {
        GatewayEndpoint {
            name: name.into(),
            host: "192.0.2.1".into(),
            port: 7443,
            active,
        }
    }

    /// The lab with two hubs: gw-1 owns site-a, gw-3 owns site-b (`ownership` known answers).
    fn view(gateways: Vec<GatewayEndpoint>) -> HubView {
        HubView {
            gateways,
            routes: vec![
                route("cloud-1", "vpc", 1, RoutePath::ViaHub),
                route("gw-1", "vpc", 2, RoutePath::ViaHub),
                route("edge-a1", "site-a", 3, RoutePath::Direct),
                route("edge-a2", "site-a", 4, RoutePath::Direct),
                route("edge-b1", "site-b", 5, RoutePath::ViaHub),
                route("x1", "site-x", 6, RoutePath::ViaHub),
                route("gw-3", "vpc", 7, RoutePath::ViaHub),
            ],
            site_mtu: 1380,
            egress: EgressPolicy::default(),
            site_mtus: Vec::new(),
            routed_sites: vec!["vpc".into(), "site-x".into()],
            reconnect_spread_ms: 0,
        }
    }

    fn frame_to(n: u8) -> Vec<u8> {
        let mut f = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        f.extend_from_slice(&[2, 0xfa, 0, 0, 0, n]);
        f.extend_from_slice(&[0; 20]);
        f
    }

    #[test]
    fn frames_go_to_the_owner_of_the_destination_site_or_of_their_own() {
        let a1 = Some("site-a");
        let c = HubChoice::from_view(&view(vec![gw("gw-1", true), gw("gw-3", true)]), a1).unwrap();
        // To site-b: its owner, gw-3, then gw-1.
        assert_eq!(c.ranked(&frame_to(5)), ["gw-3", "gw-1"]);
        // To the cloud (hub nodes and others): site-a's owner, gw-1.
        assert_eq!(c.own_owner(), Some("gw-1"));
        for n in [1, 2, 7] {
            assert_eq!(c.ranked(&frame_to(n)), ["gw-1", "gw-3"], "node {n}");
        }
        // Express Connect (listed as not public): this site's owner too.
        assert_eq!(c.ranked(&frame_to(6)), ["gw-1", "gw-3"]);
        // From a hub that does not list the sites that are not public, an Express Connect
        // site is ranked by its own name; the hubs' own site is still known.
        let mut old_hub = view(vec![gw("gw-1", true), gw("gw-3", true)]);
        old_hub.routed_sites.clear();
        let c_old = HubChoice::from_view(&old_hub, a1).unwrap();
        assert_eq!(
            c_old.ranked(&frame_to(6)),
            petrel_proto::ownership::rank("site-x", ["gw-1", "gw-3"])
        );
        assert_eq!(c_old.ranked(&frame_to(1)), ["gw-1", "gw-3"]);
        // An unknown MAC or a short frame: its own site's owner.
        assert_eq!(c.ranked(&frame_to(99)), ["gw-1", "gw-3"]);
        assert_eq!(c.ranked(&[0x08, 0, 0]), ["gw-1", "gw-3"]);
        // Seen from site-b, site-a's nodes go to gw-1 and the cloud to gw-3.
        let b1 = Some("site-b");
        let mut v = view(vec![gw("gw-1", true), gw("gw-3", true)]);
        v.routes[2].path = RoutePath::ViaHub;
        v.routes[4].path = RoutePath::Direct;
        let c = HubChoice::from_view(&v, b1).unwrap();
        assert_eq!(c.ranked(&frame_to(3)), ["gw-1", "gw-3"]);
        assert_eq!(c.ranked(&frame_to(1)), ["gw-3", "gw-1"]);
        assert_eq!(c.own_owner(), Some("gw-3"));
        // A node alone in its site (no route names the site): the welcome's site still counts.
        let mut alone = view(vec![gw("gw-1", true), gw("gw-3", true)]);
        alone.routes.retain(|r| r.site != "site-b");
        let c = HubChoice::from_view(&alone, b1).unwrap();
        assert_eq!(c.own_owner(), Some("gw-3"));
        assert_eq!(c.ranked(&frame_to(1)), ["gw-3", "gw-1"]);
        // Without a site: the empty name's ranking.
        let c = HubChoice::from_view(&alone, None).unwrap();
        assert_eq!(
            c.own_owner(),
            petrel_proto::ownership::owner("", ["gw-1", "gw-3"])
        );
    }

    #[test]
    fn a_hub_that_is_sent_packets_and_answers_none_is_silent() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(20);
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = SilenceWatch::default();
        // Traffic both ways: never silent.
        assert!(!w.observe(10, 10, rtt, ms(0)));
        assert!(!w.observe(20, 20, rtt, ms(50)));
        // Idle (nothing sent, nothing heard): not silent, however long.
        assert!(!w.observe(20, 20, rtt, ms(5_000)));
        // Sent at 5,000 ms, nothing back: silent from 5,300 ms (MIN_SILENCE), not before.
        assert!(!w.observe(25, 20, rtt, ms(5_000)));
        assert!(!w.observe(30, 20, rtt, ms(5_299)));
        assert!(w.observe(31, 20, rtt, ms(5_300)));
        assert!(w.observe(31, 20, rtt, ms(6_000)));
        // Anything heard ends it.
        assert!(!w.observe(31, 21, rtt, ms(6_050)));
        assert!(!w.observe(31, 21, rtt, ms(9_000)));
        // A long path waits three round trips.
        let mut w = SilenceWatch::default();
        let slow = Duration::from_millis(200);
        assert!(!w.observe(1, 1, slow, ms(0)));
        assert!(!w.observe(2, 1, slow, ms(0)));
        assert!(!w.observe(3, 1, slow, ms(599)));
        assert!(w.observe(3, 1, slow, ms(600)));
    }

    #[test]
    fn one_active_hub_or_a_standby_means_no_choice() {
        let a1 = Some("site-a");
        assert_eq!(
            HubChoice::from_view(&view(vec![gw("gw-1", true)]), a1),
            None
        );
        assert_eq!(
            HubChoice::from_view(&view(vec![gw("gw-1", true), gw("gw-3", false)]), a1),
            None
        );
        // Two endpoints of one hub are one hub.
        assert_eq!(
            HubChoice::from_view(&view(vec![gw("gw-1", true), gw("gw-1", true)]), a1),
            None
        );
        let three = HubChoice::from_view(
            &view(vec![gw("gw-1", true), gw("gw-2", true), gw("gw-3", true)]),
            a1,
        )
        .unwrap();
        assert_eq!(three.ranked(&frame_to(5)).len(), 3);
        assert_eq!(three.ranked(&frame_to(5))[0], "gw-3");
    }
}
