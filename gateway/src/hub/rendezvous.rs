//! The hub as rendezvous for direct site-to-site paths (issue 15): when it relays a frame from
//! one agent to an agent of another public site, it tells both ends the other's address as it
//! sees it (each tunnel's NAT mapping), at most once per pair per [`OFFER_INTERVAL`], so that
//! both dial each other at the same time from their tunnel sockets (docs/architecture.md,
//! "Direct paths").
//!
//! The pacing is per sending agent and lives in that agent's datagram pump ([`OfferPacer`]):
//! no lock on the relay path, and a bounded table. Whether a pair may be offered at all is the
//! pure [`eligible`]. A pair that went direct stops crossing the hub and so stops being
//! offered; one whose punch failed keeps being offered, and each agent's own backoff
//! (`petrel_proto::direct::DirectPath`) decides when it tries again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use petrel_proto::control::PeerOffer;

/// How often one pair is offered while its traffic crosses the hub.
pub const OFFER_INTERVAL: Duration = Duration::from_secs(10);
/// Destinations one pump remembers; beyond it the table is emptied (an offer is then sent
/// again sooner than the interval, which costs one control message).
pub const MAX_PACED: usize = 1024;

/// When one sending agent's pairs were last offered.
#[derive(Debug, Default)]
pub struct OfferPacer {
    last: HashMap<String, Instant>,
}

impl OfferPacer {
    /// Whether the pair (this pump's agent, `dest`) is due an offer at `now`; if so, records it.
    pub fn due(&mut self, dest: &str, now: Instant) -> bool {
        if let Some(t) = self.last.get_mut(dest) {
            if now.saturating_duration_since(*t) < OFFER_INTERVAL {
                return false;
            }
            *t = now;
            return true;
        }
        if self.last.len() >= MAX_PACED {
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < OFFER_INTERVAL);
            if self.last.len() >= MAX_PACED {
                self.last.clear();
            }
        }
        self.last.insert(dest.to_string(), now);
        true
    }
}

/// One end of a relayed pair, as the hub knows it.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    pub node: &'a str,
    pub site: &'a str,
    /// The agent announced `capability::DIRECT_PATHS`.
    pub capable: bool,
    /// Where its tunnel comes from.
    pub addr: SocketAddr,
}

/// Why a relayed pair is not offered (the metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOffered {
    /// One end does not take offers (an older agent, or direct paths off on it).
    NotCapable,
    /// One end's tunnel is on the TCP fallback: its network blocks UDP.
    TcpFallback,
    /// One is on IPv4 and the other on IPv6.
    AddressFamily,
    /// Both are in the same site (Flannel carries that, never the hub).
    SameSite,
}

impl NotOffered {
    pub fn label(self) -> &'static str {
        match self {
            NotOffered::NotCapable => "not_capable",
            NotOffered::TcpFallback => "tcp_fallback",
            NotOffered::AddressFamily => "address_family",
            NotOffered::SameSite => "same_site",
        }
    }
}

/// The two offers for a pair (to `a`: about `b`; to `b`: about `a`), or why there are none.
pub fn eligible(a: End<'_>, b: End<'_>) -> Result<(PeerOffer, PeerOffer), NotOffered> {
    if !a.capable || !b.capable {
        return Err(NotOffered::NotCapable);
    }
    if petrel_transport::stream_carrier::is_carried(a.addr)
        || petrel_transport::stream_carrier::is_carried(b.addr)
    {
        return Err(NotOffered::TcpFallback);
    }
    // A dual-stack socket reports IPv4 peers as mapped IPv6: compare what they really are.
    let canonical = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    let (aa, ba) = (canonical(a.addr), canonical(b.addr));
    if aa.is_ipv4() != ba.is_ipv4() {
        return Err(NotOffered::AddressFamily);
    }
    if a.site == b.site {
        return Err(NotOffered::SameSite);
    }
    let offer = |node: &str, addr: SocketAddr| PeerOffer {
        node: node.to_string(),
        addr: addr.ip(),
        port: addr.port(),
    };
    Ok((offer(b.node, ba), offer(a.node, aa)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn end<'a>(node: &'a str, site: &'a str, addr: &str) -> End<'a> {
        End {
            node,
            site,
            capable: true,
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn pacer_offers_a_pair_once_per_interval() {
        let mut p = OfferPacer::default();
        let t0 = Instant::now();
        assert!(p.due("edge-b1", t0));
        assert!(!p.due("edge-b1", t0 + Duration::from_secs(1)));
        assert!(
            p.due("edge-c1", t0 + Duration::from_secs(1)),
            "another pair"
        );
        assert!(!p.due("edge-b1", t0 + OFFER_INTERVAL - Duration::from_millis(1)));
        assert!(p.due("edge-b1", t0 + OFFER_INTERVAL));
        assert!(!p.due("edge-b1", t0 + OFFER_INTERVAL + Duration::from_secs(1)));
    }

    #[test]
    fn pacer_table_is_bounded() {
        let mut p = OfferPacer::default();
        let t0 = Instant::now();
        for i in 0..MAX_PACED * 3 {
            assert!(p.due(&format!("n{i}"), t0));
            assert!(p.last.len() <= MAX_PACED);
        }
        // Old entries make room first: after the interval the table is pruned, not cleared.
        let later = t0 + OFFER_INTERVAL;
        let mut p = OfferPacer::default();
        for i in 0..MAX_PACED - 1 {
            p.due(&format!("old{i}"), t0);
        }
        p.due("fresh", later - Duration::from_secs(1));
        assert!(p.due("new", later));
        assert_eq!(
            p.last.len(),
            2,
            "only the fresh entry and the new one remain"
        );
        assert!(!p.due("fresh", later));
    }

    #[test]
    fn both_ends_get_the_other_ones_observed_address() {
        let (to_a, to_b) = eligible(
            end("edge-a1", "site-a", "203.0.113.2:40001"),
            end("edge-b1", "site-b", "203.0.113.3:50002"),
        )
        .unwrap();
        assert_eq!(to_a.node, "edge-b1");
        assert_eq!(
            to_a.socket_addr(),
            "203.0.113.3:50002".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(to_b.node, "edge-a1");
        assert_eq!(
            to_b.socket_addr(),
            "203.0.113.2:40001".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn mapped_ipv4_is_offered_as_ipv4() {
        let (to_a, _) = eligible(
            end("edge-a1", "site-a", "[::ffff:203.0.113.2]:40001"),
            end("edge-b1", "site-b", "[::ffff:203.0.113.3]:50002"),
        )
        .unwrap();
        assert_eq!(
            to_a.socket_addr(),
            "203.0.113.3:50002".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            eligible(
                end("edge-a1", "site-a", "[::ffff:203.0.113.2]:40001"),
                end("edge-b1", "site-b", "203.0.113.3:50002"),
            )
            .map(|_| ()),
            Ok(())
        );
    }

    #[test]
    fn pairs_that_cannot_go_direct_are_not_offered() {
        let a = end("edge-a1", "site-a", "203.0.113.2:40001");
        let b = end("edge-b1", "site-b", "203.0.113.3:50002");
        let old = End {
            capable: false,
            ..b
        };
        assert_eq!(eligible(a, old).unwrap_err(), NotOffered::NotCapable);
        assert_eq!(eligible(old, a).unwrap_err(), NotOffered::NotCapable);
        let tcp = End {
            addr: "[fd70:6574:7463:7000::5]:443".parse().unwrap(),
            ..b
        };
        assert_eq!(eligible(a, tcp).unwrap_err(), NotOffered::TcpFallback);
        assert_eq!(eligible(tcp, a).unwrap_err(), NotOffered::TcpFallback);
        let v6 = end("edge-b1", "site-b", "[2001:db8::3]:50002");
        assert_eq!(eligible(a, v6).unwrap_err(), NotOffered::AddressFamily);
        let same = end("edge-a2", "site-a", "203.0.113.2:40002");
        assert_eq!(eligible(a, same).unwrap_err(), NotOffered::SameSite);
        for r in [
            NotOffered::NotCapable,
            NotOffered::TcpFallback,
            NotOffered::AddressFamily,
            NotOffered::SameSite,
        ] {
            assert!(!r.label().is_empty());
        }
    }
}
