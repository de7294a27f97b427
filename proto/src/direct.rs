//! Direct site-to-site paths (issue 15), the parts that need no I/O: what a receiving agent
//! accepts from a peer agent, and one peer path's life as a state machine (offered by the hub,
//! punching, direct, lost, retried with backoff).
//!
//! A frame that arrives on a direct connection is held to the rules the hub's switch applies to
//! a frame from an agent ([`check_peer_frame`]): it must carry the peer's VtepMAC as its source,
//! an inner source address inside the peer's pod CIDRs, and be addressed to this node's own
//! VtepMAC (a peer never relays through another agent). Anything else is refused and counted by
//! reason, never injected.
//!
//! [`DirectPath`] decides, from events and `now`, whether frames for the peer go direct or via
//! the hub; the driver does the dialing and reports back. Traffic always has a path: until the
//! direct connection is up, and from the moment it is lost, frames go through the hub.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::datagram::{ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use crate::types::{IpCidr, MacAddr};
use crate::VxlanFrame;

/// Why a frame from a direct peer was refused (the label counts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFrameRefusal {
    /// Not addressed to this node's VtepMAC.
    NotForThisNode,
    /// Source MAC is not the peer's VtepMAC.
    SpoofedMac,
    /// Inner source address outside the peer's pod CIDRs (or none).
    SpoofedSource,
    /// Inner destination outside this node's pod CIDRs (or none): the hub's switch would not
    /// have delivered it here either, and the kernel would route it on (the node's host
    /// network, its LAN).
    ForeignDestination,
    /// Neither IPv4 nor IPv6 inside.
    UnsupportedEthertype,
}

impl PeerFrameRefusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::NotForThisNode => "peer_not_for_this_node",
            Self::SpoofedMac => "peer_spoofed_mac",
            Self::SpoofedSource => "peer_spoofed_source",
            Self::ForeignDestination => "peer_foreign_destination",
            Self::UnsupportedEthertype => "peer_unsupported_ethertype",
        }
    }
}

/// This node, as the receiving end of a direct path: its VtepMAC and its own pod CIDRs.
#[derive(Debug, Clone, Copy)]
pub struct Receiver<'a> {
    pub mac: MacAddr,
    pub cidrs: &'a [IpCidr],
}

/// Whether `frame`, from the direct peer whose VtepMAC is `peer_mac` and whose pod CIDRs are
/// `peer_cidrs`, may be delivered on this node (`me`): the rules the hub's switch applies to a
/// frame from an agent, for the one destination a peer may reach.
pub fn check_peer_frame(
    frame: &VxlanFrame<'_>,
    me: Receiver<'_>,
    peer_mac: MacAddr,
    peer_cidrs: &[IpCidr],
) -> Result<(), PeerFrameRefusal> {
    if frame.dst_mac() != me.mac {
        return Err(PeerFrameRefusal::NotForThisNode);
    }
    if frame.src_mac() != peer_mac {
        return Err(PeerFrameRefusal::SpoofedMac);
    }
    let (src, dst): (Option<IpAddr>, Option<IpAddr>) = match frame.ethertype() {
        ETHERTYPE_IPV4 => (
            frame.inner_ipv4_src().map(IpAddr::V4),
            frame.inner_ipv4_dst().map(IpAddr::V4),
        ),
        ETHERTYPE_IPV6 => (
            frame.inner_ipv6_src().map(IpAddr::V6),
            frame.inner_ipv6_dst().map(IpAddr::V6),
        ),
        _ => return Err(PeerFrameRefusal::UnsupportedEthertype),
    };
    if !src.is_some_and(|ip| peer_cidrs.iter().any(|c| c.contains(ip))) {
        return Err(PeerFrameRefusal::SpoofedSource);
    }
    if !dst.is_some_and(|ip| me.cidrs.iter().any(|c| c.contains(ip))) {
        return Err(PeerFrameRefusal::ForeignDestination);
    }
    Ok(())
}

/// How long punching may take before the attempt counts as failed.
pub const PUNCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait after a failed or lost direct path; doubled each time, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A direct path that lasted this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Where frames for the peer go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Hub,
    Direct,
}

/// What the driver should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAction {
    /// Dial the peer's offered address (and accept it) from the tunnel's socket.
    Punch,
    /// The punch took too long: stop dialing and accepting (frames never left the hub).
    GiveUp,
    /// Send the peer's frames this way from now on.
    Route(Route),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No offer, or waiting for the hub to offer again.
    Idle,
    Punching {
        since: Instant,
    },
    Direct {
        since: Instant,
    },
    Backoff {
        until: Instant,
    },
}

/// One peer's direct path (sans-IO: events and `now` in, actions out).
///
/// Punches start only on an offer: the hub offers both ends of a pair at the same time, which is
/// what makes their punches overlap. A backoff that runs out returns to idle and waits for the
/// next offer (the hub repeats it while the pair's traffic crosses it), rather than punching on
/// its own timer, which would drift apart from the peer's.
#[derive(Debug, Clone)]
pub struct DirectPath {
    state: State,
    backoff: Duration,
    /// Attempts that failed in a row.
    pub failures: u32,
}

impl Default for DirectPath {
    fn default() -> Self {
        Self::new()
    }
}

impl DirectPath {
    pub fn new() -> Self {
        Self {
            state: State::Idle,
            backoff: FIRST_BACKOFF,
            failures: 0,
        }
    }

    /// Where the peer's frames go in the current state.
    pub fn route(&self) -> Route {
        match self.state {
            State::Direct { .. } => Route::Direct,
            _ => Route::Hub,
        }
    }

    /// Whether a punch is under way.
    pub fn is_punching(&self) -> bool {
        matches!(self.state, State::Punching { .. })
    }

    /// The hub offered the peer (its observed address): punch unless already direct, punching
    /// or backing off.
    pub fn offered(&mut self, now: Instant) -> Option<PathAction> {
        match self.state {
            State::Idle => {
                self.state = State::Punching { since: now };
                Some(PathAction::Punch)
            }
            State::Backoff { until } if now >= until => {
                self.state = State::Punching { since: now };
                Some(PathAction::Punch)
            }
            _ => None,
        }
    }

    /// The direct connection is up (the peer authenticated as the offered node).
    pub fn established(&mut self, now: Instant) -> Option<PathAction> {
        match self.state {
            State::Punching { .. } | State::Idle | State::Backoff { .. } => {
                self.state = State::Direct { since: now };
                Some(PathAction::Route(Route::Direct))
            }
            State::Direct { .. } => None,
        }
    }

    /// The punch failed, or the direct connection was lost (closed, silent): back to the hub
    /// at once (or stop punching), and try again on an offer after the backoff.
    pub fn failed(&mut self, now: Instant) -> Option<PathAction> {
        let action = match self.state {
            State::Direct { since } => {
                if now.saturating_duration_since(since) >= STABLE_AFTER {
                    self.backoff = FIRST_BACKOFF;
                    self.failures = 0;
                }
                PathAction::Route(Route::Hub)
            }
            State::Punching { .. } => PathAction::GiveUp,
            State::Idle | State::Backoff { .. } => return None,
        };
        self.failures = self.failures.saturating_add(1);
        self.state = State::Backoff {
            until: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(action)
    }

    /// When [`poll`](Self::poll) wants to run next, if anything is pending.
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Punching { since } => Some(since + PUNCH_TIMEOUT),
            State::Backoff { until } => Some(until),
            State::Idle | State::Direct { .. } => None,
        }
    }

    /// Time passed: a punch that took too long failed ([`PathAction::GiveUp`]); a backoff that
    /// ran out waits for the next offer.
    pub fn poll(&mut self, now: Instant) -> Option<PathAction> {
        match self.state {
            State::Punching { since } if now >= since + PUNCH_TIMEOUT => self.failed(now),
            State::Backoff { until } if now >= until => {
                self.state = State::Idle;
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::datagram::encode_vxlan_header;

    const ME: MacAddr = MacAddr([2, 0xfa, 0, 0, 0, 5]);
    const PEER: MacAddr = MacAddr([2, 0xfa, 0, 0, 0, 3]);
    const OTHER: MacAddr = MacAddr([2, 0xfa, 0, 0, 0, 4]);

    fn frame(dst: MacAddr, src: MacAddr, ethertype: u16, src_ip: [u8; 4]) -> Vec<u8> {
        let mut f = encode_vxlan_header(1).to_vec();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        // A minimal IPv4 header: version/IHL, ..., source at 12, destination at 16.
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[12..16].copy_from_slice(&src_ip);
        ip[16..20].copy_from_slice(&[10, 244, 5, 2]);
        f.extend_from_slice(&ip);
        f
    }

    fn frame6(src_ip: &str, dst_ip: &str) -> Vec<u8> {
        let mut f = encode_vxlan_header(1).to_vec();
        f.extend_from_slice(&ME.0);
        f.extend_from_slice(&PEER.0);
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        let src: std::net::Ipv6Addr = src_ip.parse().unwrap();
        ip[8..24].copy_from_slice(&src.octets());
        ip[24..40].copy_from_slice(&dst_ip.parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&ip);
        f
    }

    fn check(bytes: &[u8]) -> Result<(), PeerFrameRefusal> {
        let cidrs = [
            IpCidr::new("10.244.3.0".parse().unwrap(), 24).unwrap(),
            IpCidr::new("fd00:3::".parse().unwrap(), 64).unwrap(),
        ];
        let mine = [
            IpCidr::new("10.244.5.0".parse().unwrap(), 24).unwrap(),
            IpCidr::new("fd00:5::".parse().unwrap(), 64).unwrap(),
        ];
        let f = VxlanFrame::from_vxlan_payload(bytes).unwrap();
        check_peer_frame(
            &f,
            Receiver {
                mac: ME,
                cidrs: &mine,
            },
            PEER,
            &cidrs,
        )
    }

    #[test]
    fn a_peer_may_send_only_its_own_pods_frames_to_this_node() {
        assert_eq!(
            check(&frame(ME, PEER, ETHERTYPE_IPV4, [10, 244, 3, 2])),
            Ok(())
        );
        assert_eq!(
            check(&frame(OTHER, PEER, ETHERTYPE_IPV4, [10, 244, 3, 2])),
            Err(PeerFrameRefusal::NotForThisNode)
        );
        assert_eq!(
            check(&frame(ME, OTHER, ETHERTYPE_IPV4, [10, 244, 3, 2])),
            Err(PeerFrameRefusal::SpoofedMac)
        );
        assert_eq!(
            check(&frame(ME, PEER, ETHERTYPE_IPV4, [10, 244, 4, 2])),
            Err(PeerFrameRefusal::SpoofedSource)
        );
        assert_eq!(
            check(&frame(ME, PEER, 0x0806, [10, 244, 3, 2])),
            Err(PeerFrameRefusal::UnsupportedEthertype)
        );
        // Only to this node's own pods: not its host network, its LAN, another node's pods.
        for dst in [[10, 244, 6, 2], [192, 168, 1, 5], [169, 254, 169, 254]] {
            let mut f = frame(ME, PEER, ETHERTYPE_IPV4, [10, 244, 3, 2]);
            let at = f.len() - 4;
            f[at..].copy_from_slice(&dst);
            assert_eq!(
                check(&f),
                Err(PeerFrameRefusal::ForeignDestination),
                "{dst:?}"
            );
        }
        // A truncated IP header has neither address.
        let mut short = frame(ME, PEER, ETHERTYPE_IPV4, [10, 244, 3, 2]);
        short.truncate(short.len() - 6);
        assert_eq!(check(&short), Err(PeerFrameRefusal::SpoofedSource));
        // IPv6 pods by the same rules.
        assert_eq!(check(&frame6("fd00:3::2", "fd00:5::2")), Ok(()));
        assert_eq!(
            check(&frame6("fd00:4::2", "fd00:5::2")),
            Err(PeerFrameRefusal::SpoofedSource)
        );
        assert_eq!(
            check(&frame6("fd00:3::2", "fd00:6::2")),
            Err(PeerFrameRefusal::ForeignDestination)
        );
        let labels = [
            PeerFrameRefusal::NotForThisNode,
            PeerFrameRefusal::SpoofedMac,
            PeerFrameRefusal::SpoofedSource,
            PeerFrameRefusal::ForeignDestination,
            PeerFrameRefusal::UnsupportedEthertype,
        ]
        .map(PeerFrameRefusal::label);
        assert_eq!(
            labels
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            5
        );
    }

    #[test]
    fn a_path_goes_direct_falls_back_at_once_and_retries_on_offers_with_backoff() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = DirectPath::new();
        assert_eq!(p.route(), Route::Hub);
        assert_eq!(p.next_timeout(), None);
        assert!(!p.is_punching());
        // Offered: punch; a second offer meanwhile does nothing.
        assert_eq!(p.offered(at(0)), Some(PathAction::Punch));
        assert!(p.is_punching());
        assert_eq!(p.offered(at(1)), None);
        assert_eq!(p.poll(at(1)), None, "punching, not timed out yet");
        assert_eq!(p.route(), Route::Hub);
        assert_eq!(p.next_timeout(), Some(at(0) + PUNCH_TIMEOUT));
        // Up: direct.
        assert_eq!(p.established(at(2)), Some(PathAction::Route(Route::Direct)));
        assert_eq!(p.route(), Route::Direct);
        assert!(!p.is_punching());
        assert_eq!(p.established(at(3)), None);
        assert_eq!(p.offered(at(4)), None, "direct: offers change nothing");
        assert_eq!(p.poll(at(100)), None);
        assert_eq!(p.next_timeout(), None);
        // Lost after 10 s: back to the hub at once; no punch before the backoff ran out.
        assert_eq!(p.failed(at(12)), Some(PathAction::Route(Route::Hub)));
        assert_eq!(p.route(), Route::Hub);
        assert_eq!(p.failures, 1);
        assert_eq!(p.next_timeout(), Some(at(12) + FIRST_BACKOFF));
        assert_eq!(p.poll(at(13)), None);
        assert_eq!(
            p.offered(at(13)),
            None,
            "an offer does not skip the backoff"
        );
        // An offer once the backoff ran out punches.
        let mut q = p.clone();
        assert_eq!(q.offered(at(14)), Some(PathAction::Punch));
        // The backoff running out alone does not: it waits (idle) for the hub's next offer,
        // which both ends get at once.
        assert_eq!(p.poll(at(14)), None);
        assert_eq!(p.next_timeout(), None);
        assert!(!p.is_punching());
        assert_eq!(p.offered(at(20)), Some(PathAction::Punch));
        // The punch times out: give up (frames never left the hub), a longer backoff.
        assert_eq!(p.poll(at(20) + PUNCH_TIMEOUT), Some(PathAction::GiveUp));
        assert!(!p.is_punching());
        assert_eq!(p.failures, 2);
        assert_eq!(
            p.next_timeout(),
            Some(at(20) + PUNCH_TIMEOUT + FIRST_BACKOFF * 2)
        );
        // Backoffs double up to the cap.
        let mut now = at(20) + PUNCH_TIMEOUT;
        for _ in 0..20 {
            now = p.next_timeout().unwrap();
            assert_eq!(p.offered(now), Some(PathAction::Punch));
            now += PUNCH_TIMEOUT;
            assert_eq!(p.poll(now), Some(PathAction::GiveUp));
        }
        assert_eq!(p.next_timeout(), Some(now + MAX_BACKOFF));
        // A direct path that did not last keeps the backoff where it was.
        let up = p.next_timeout().unwrap();
        assert_eq!(p.offered(up), Some(PathAction::Punch));
        assert_eq!(p.established(up), Some(PathAction::Route(Route::Direct)));
        let failures = p.failures;
        assert_eq!(
            p.failed(up + Duration::from_secs(1)),
            Some(PathAction::Route(Route::Hub))
        );
        assert_eq!(p.failures, failures + 1);
        assert_eq!(
            p.next_timeout(),
            Some(up + Duration::from_secs(1) + MAX_BACKOFF)
        );
        // A direct path that lasted resets the backoff.
        let up = p.next_timeout().unwrap();
        assert_eq!(p.offered(up), Some(PathAction::Punch));
        assert_eq!(p.established(up), Some(PathAction::Route(Route::Direct)));
        let lost = up + STABLE_AFTER;
        assert_eq!(p.failed(lost), Some(PathAction::Route(Route::Hub)));
        assert_eq!(p.failures, 1);
        assert_eq!(p.next_timeout(), Some(lost + FIRST_BACKOFF));
        // Just short of the stable time: the backoff keeps doubling.
        let mut r = DirectPath::new();
        r.offered(at(0));
        r.established(at(0));
        r.failed(at(0) + STABLE_AFTER - Duration::from_secs(1));
        r.poll(at(100));
        r.offered(at(100));
        r.established(at(100));
        assert_eq!(r.failed(at(101)), Some(PathAction::Route(Route::Hub)));
        assert_eq!(r.failures, 2);
        assert_eq!(r.next_timeout(), Some(at(101) + FIRST_BACKOFF * 2));
        // Failure reports with nothing in flight change nothing.
        let mut idle = DirectPath::default();
        assert_eq!(idle.failed(at(0)), None);
        assert_eq!(idle.poll(at(1000)), None);
        assert_eq!(idle.failures, 0);
    }
}
