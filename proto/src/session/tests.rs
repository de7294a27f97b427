//! Both ends driven against each other in memory, the way quinn-proto's tests drive two
//! endpoints: every message goes through the real encoder and decoder, each direction has a
//! one-way delay on a simulated clock, and either direction can be cut (a dead path).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::agent::DUPLICATE_PARK;
use super::hub::RENEWAL_RATE_LIMITED;
use super::*;
use crate::control::EgressPolicy;
use crate::routes::RouteEntry;
use crate::{
    decode_frame, CertBundle, ControlMessage, ErrorInfo, GatewayEndpoint, GoingAway,
    GoingAwayReason, Hello, HubView, IpCidr, MacAddr, RenewResponse, RouteSync, RouteTable,
};

const NODE: &str = "edge-a1.site-a.example.internal";
const SITE: &str = "site-a";
const MS: Duration = Duration::from_millis(1);
const ONE_WAY: Duration = Duration::from_millis(20);
const STEP: Duration = Duration::from_millis(10);

fn hub_config() -> HubSessionConfig {
    HubSessionConfig {
        hub_id: "gw-1".into(),
        keepalive: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(15),
        hello_timeout: Duration::from_secs(10),
        renewal_min_interval: Duration::from_secs(60),
    }
}

fn agent_config() -> AgentSessionConfig {
    AgentSessionConfig {
        ping_interval: Duration::from_secs(2),
        dead_after: Duration::from_secs(6),
    }
}

fn hello(node: &str) -> Hello {
    Hello::tunnel(node, "test")
}

fn view(mtu: u16) -> HubView {
    HubView {
        gateways: vec![GatewayEndpoint {
            name: "gw-1".into(),
            host: "192.0.2.10".into(),
            port: 7443,
            active: true,
        }],
        routes: vec![],
        site_mtu: mtu,
        egress: EgressPolicy {
            node_addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 10, 11))],
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            node_ports: vec![10250],
            pod_ports: Some(vec![8080]),
        },
        site_mtus: vec![],
        routed_sites: vec![],
        reconnect_spread_ms: 0,
    }
}

fn entry(i: u8, site: &str) -> RouteEntry {
    RouteEntry {
        node_name: format!("node-{i}.{site}.example.internal"),
        site: site.into(),
        pod_cidrs: vec![IpCidr::new(IpAddr::V4(Ipv4Addr::new(10, 244, i, 0)), 24).unwrap()],
        vtep_mac: MacAddr([0x02, 0, 0, 0, 0, i]),
        underlay: IpAddr::V4(Ipv4Addr::new(192, 168, 10, i)),
        mtu: 0,
    }
}

/// One direction of the connection: encoded frames with the time they arrive.
#[derive(Default)]
struct Path {
    in_flight: VecDeque<(Instant, Vec<u8>)>,
    cut: bool,
}

impl Path {
    fn send(&mut self, msg: &ControlMessage, now: Instant) {
        let wire =
            crate::control::encode_to_vec(msg).expect("every message the machines send encodes");
        if !self.cut {
            self.in_flight.push_back((now + ONE_WAY, wire));
        }
    }

    fn arrived(&mut self, now: Instant) -> Option<ControlMessage> {
        if self.in_flight.front()?.0 > now {
            return None;
        }
        let (_, wire) = self.in_flight.pop_front()?;
        let (msg, used) = decode_frame(&wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        Some(msg)
    }
}

/// What the hub's driver would do with [`HubAction::Admitted`] and [`HubAction::Sign`].
struct HubEnvironment {
    view: HubView,
    signed: usize,
}

impl HubEnvironment {
    fn sign(&mut self, csr_der: &[u8]) -> Result<CertBundle, ErrorInfo> {
        self.signed += 1;
        if csr_der.is_empty() {
            return Err(ErrorInfo {
                code: 1,
                message: "empty CSR".into(),
            });
        }
        Ok(CertBundle {
            cert_der: [b"cert for ", csr_der].concat(),
            ca_der: b"ca".to_vec(),
        })
    }
}

struct Pair {
    now: Instant,
    hub: HubSession,
    agent: AgentSession,
    env: HubEnvironment,
    to_hub: Path,
    to_agent: Path,
    /// Everything but sends, in order.
    hub_did: Vec<HubAction>,
    agent_did: Vec<AgentAction>,
    /// Pings each side sent.
    hub_pings: usize,
    agent_pings: usize,
}

impl Pair {
    fn new(cert_node: &str, hello: Hello, routes: RouteTable) -> Self {
        let now = Instant::now();
        Pair {
            now,
            hub: HubSession::new(cert_node.into(), hub_config(), now),
            agent: AgentSession::new(hello, routes, agent_config()),
            env: HubEnvironment {
                view: view(1400),
                signed: 0,
            },
            to_hub: Path::default(),
            to_agent: Path::default(),
            hub_did: vec![],
            agent_did: vec![],
            hub_pings: 0,
            agent_pings: 0,
        }
    }

    /// A pair that has exchanged hello and welcome.
    fn connected() -> Self {
        let mut p = Pair::new(NODE, hello(NODE), RouteTable::new());
        p.advance(100 * MS);
        assert!(p.agent_welcomed(), "{:?}", p.agent_did);
        p
    }

    fn agent_welcomed(&self) -> bool {
        self.agent_did
            .iter()
            .any(|a| matches!(a, AgentAction::Welcomed(_)))
    }

    /// Performs every queued action and delivers what has arrived, until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some(a) = self.hub.poll_action() {
                moved = true;
                match a {
                    HubAction::Send(m) => {
                        self.hub_pings += usize::from(matches!(m, ControlMessage::Ping(_)));
                        self.to_agent.send(&m, self.now);
                    }
                    HubAction::Admitted(hello) => {
                        self.hub_did.push(HubAction::Admitted(hello));
                        self.hub
                            .welcome(SITE.into(), self.env.view.clone(), self.now);
                    }
                    HubAction::Sign { csr_der } => {
                        let signed = self.env.sign(&csr_der);
                        self.hub_did.push(HubAction::Sign { csr_der });
                        self.hub.renewal_signed(signed);
                    }
                    other => self.hub_did.push(other),
                }
            }
            while let Some(a) = self.agent.poll_action() {
                moved = true;
                match a {
                    AgentAction::Send(m) => {
                        self.agent_pings += usize::from(matches!(m, ControlMessage::Ping(_)));
                        self.to_hub.send(&m, self.now);
                    }
                    other => self.agent_did.push(other),
                }
            }
            while let Some(m) = self.to_hub.arrived(self.now) {
                moved = true;
                self.hub.handle_message(m, self.now);
            }
            while let Some(m) = self.to_agent.arrived(self.now) {
                moved = true;
                self.agent.handle_message(m, self.now);
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs the simulated clock forward by `d` in small steps, firing each side's timer.
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        self.settle();
        while self.now < until {
            self.now = (self.now + STEP).min(until);
            if self.hub.poll_timeout().is_some_and(|t| t <= self.now) {
                self.hub.handle_timeout(self.now);
            }
            if self.agent.poll_timeout().is_some_and(|t| t <= self.now) {
                self.agent.handle_timeout(self.now);
            }
            self.settle();
        }
    }

    /// Advances until `done` holds (at most `limit`); returns the simulated time it did.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Pair) -> bool) -> Instant {
        let until = self.now + limit;
        while !done(self) {
            assert!(self.now < until, "not done within {limit:?}");
            self.advance(STEP);
        }
        self.now
    }

    fn hub_end(&self) -> Option<&HubSessionEnd> {
        self.hub_did.iter().find_map(|a| match a {
            HubAction::Ended(e) => Some(e),
            _ => None,
        })
    }

    fn hub_close(&self) -> Option<&Close> {
        self.hub_did.iter().find_map(|a| match a {
            HubAction::Close(c) => Some(c),
            _ => None,
        })
    }

    fn agent_end(&self) -> Option<&AgentSessionEnd> {
        self.agent_did.iter().find_map(|a| match a {
            AgentAction::Ended(e) => Some(e),
            _ => None,
        })
    }

    fn agent_close(&self) -> Option<&Close> {
        self.agent_did.iter().find_map(|a| match a {
            AgentAction::Close(c) => Some(c),
            _ => None,
        })
    }

    fn last_view(&self) -> Option<&HubView> {
        self.agent_did.iter().rev().find_map(|a| match a {
            AgentAction::ApplyView(v) => Some(&**v),
            _ => None,
        })
    }

    /// The last view whose routes were still to come.
    fn last_pending_view(&self) -> Option<&HubView> {
        self.agent_did.iter().rev().find_map(|a| match a {
            AgentAction::ApplyViewRoutesPending(v) => Some(&**v),
            _ => None,
        })
    }

    fn renewal_answers(&self) -> Vec<&RenewResponse> {
        self.agent_did
            .iter()
            .filter_map(|a| match a {
                AgentAction::RenewalAnswered(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn hello_is_welcomed_with_the_hubs_view_and_certificate_identity() {
    let p = Pair::connected();
    let welcome = p
        .agent_did
        .iter()
        .find_map(|a| match a {
            AgentAction::Welcomed(w) => Some(w),
            _ => None,
        })
        .unwrap();
    assert_eq!(welcome.hub_id, "gw-1");
    assert_eq!(welcome.node_name, NODE);
    assert_eq!(welcome.site, SITE);
    assert_eq!(welcome.keepalive_interval_ms, 5000);
    // A fresh link of a route-syncing hub: the view's routes are still to come.
    assert_eq!(p.last_pending_view(), Some(&view(1400)));
    assert_eq!(p.last_view(), None);
    // The hub saw the hello with the digest of the (empty) table the agent holds.
    let Some(HubAction::Admitted(h)) = p.hub_did.first() else {
        panic!("{:?}", p.hub_did)
    };
    assert_eq!(h.node_name, NODE);
    assert_eq!(h.routes_digest, Some(RouteTable::new().digest()));
    assert!(!p.hub.is_ended() && !p.agent.is_ended());
}

#[test]
fn a_live_pair_stays_up_and_the_hub_does_not_ping_an_agent_that_pings() {
    let mut p = Pair::connected();
    p.advance(Duration::from_secs(600));
    assert_eq!(p.hub_end(), None);
    assert_eq!(p.agent_end(), None);
    // The agent pings every 2 s; the hub only once (its first, for an early RTT).
    assert!((299..=302).contains(&p.agent_pings), "{}", p.agent_pings);
    assert_eq!(p.hub_pings, 1);
    // Between pings the hub's session holds no room for actions.
    assert_eq!(p.hub.action_room(), 0);
    // Measured on the simulated clock: two one-way delays.
    let rtt = p.agent.rtt().unwrap();
    assert!(rtt >= 2 * ONE_WAY && rtt <= 2 * ONE_WAY + STEP, "{rtt:?}");
    assert!(p
        .agent_did
        .iter()
        .any(|a| matches!(a, AgentAction::Rtt(r) if *r == rtt)));
}

#[test]
fn a_hub_that_goes_silent_is_declared_dead_after_the_timeout() {
    let mut p = Pair::connected();
    p.advance(Duration::from_secs(5));
    p.to_agent.cut = true;
    let cut_at = p.now;
    let ended_at = p.run_until(Duration::from_secs(20), |p| p.agent_end().is_some());
    // Dead 6 s after the last thing that arrived: the last pong was at most one ping interval
    // (2 s) before the cut, and what was in flight still arrived.
    let after = ended_at - cut_at;
    assert!(
        after >= Duration::from_secs(4) && after <= Duration::from_secs(6) + ONE_WAY + STEP,
        "{after:?}"
    );
    assert_eq!(
        p.agent_end(),
        Some(&AgentSessionEnd::HubSilent(Duration::from_secs(6)))
    );
    assert_eq!(p.agent_close().unwrap().code, close_code::KEEPALIVE_TIMEOUT);
    assert_eq!(
        p.agent_end().unwrap().next_attempt(false, 0.5),
        NextAttempt::Backoff
    );
}

#[test]
fn a_lost_hubs_spread_counts_from_the_last_word_heard_and_updates_change_it() {
    let mut p = Pair::new(NODE, hello(NODE), RouteTable::new());
    // Never welcomed: no spread to honour.
    assert_eq!(p.agent.herd_delay(p.now, 0.5), Duration::ZERO);
    p.env.view.reconnect_spread_ms = 6_000;
    p.advance(100 * MS);
    assert!(p.agent_welcomed());
    // Heard within the 100 ms since the hello (the welcome, the hub's first probe): half the
    // spread less that.
    let d = p.agent.herd_delay(p.now, 0.5);
    assert!(d > 2_900 * MS && d < 3_000 * MS, "{d:?}");
    p.advance(Duration::from_secs(5));
    p.to_agent.cut = true;
    let ended_at = p.run_until(Duration::from_secs(20), |p| p.agent_end().is_some());
    // The last pong arrived at most a ping interval before the cut, and the silence timer
    // fired 6 s after it: half the spread (3 s) is long gone.
    assert_eq!(p.agent.herd_delay(ended_at, 0.5), Duration::ZERO);
    // Even the whole spread is (within a step of the clock) used up by 6 s of silence.
    assert!(p.agent.herd_delay(ended_at, 1.0) <= STEP);

    // Noticed at once (a reset meeting the next ping): the full share.
    let mut p = Pair::new(NODE, hello(NODE), RouteTable::new());
    p.env.view.reconnect_spread_ms = 6_000;
    p.advance(Duration::from_secs(3));
    let heard = p.now;
    // Every message counts, not only the welcome: the pong to the ping sent at 2 s came back
    // since.
    assert!(
        heard - last_word(&p) < Duration::from_secs(1),
        "{:?}",
        heard - last_word(&p)
    );
    assert_eq!(
        p.agent.herd_delay(heard, 0.5),
        Duration::from_secs(3) - (heard - last_word(&p))
    );
    // An update with another spread (the fleet grew) replaces it.
    let mut grown = view(1400);
    grown.reconnect_spread_ms = 10_000;
    assert!(p.hub.push(ControlMessage::Update(grown)));
    p.advance(100 * MS);
    let now = p.now;
    assert_eq!(
        p.agent.herd_delay(now, 0.5),
        Duration::from_secs(5) - (now - last_word(&p))
    );
    // Capped: a hub cannot hold its fleet off for longer than MAX_RECONNECT_SPREAD.
    let mut absurd = view(1400);
    absurd.reconnect_spread_ms = u32::MAX;
    assert!(p.hub.push(ControlMessage::Update(absurd)));
    p.advance(100 * MS);
    let now = p.now;
    assert_eq!(
        p.agent.herd_delay(now, 1.0),
        crate::control::MAX_RECONNECT_SPREAD - (now - last_word(&p))
    );
}

/// When the agent last received anything from the hub, as the machine counts it: the
/// arrival of the last message delivered (messages arrive on STEP boundaries, one way after
/// being sent).
fn last_word(p: &Pair) -> Instant {
    p.agent.last_heard().expect("welcomed")
}

#[test]
fn an_agent_that_goes_silent_is_dropped_by_the_hub_after_its_idle_timeout() {
    let mut p = Pair::connected();
    p.advance(Duration::from_secs(5));
    p.to_hub.cut = true;
    let cut_at = p.now;
    let pings_before = p.hub_pings;
    let ended_at = p.run_until(Duration::from_secs(40), |p| p.hub_end().is_some());
    let after = ended_at - cut_at;
    assert!(
        after >= Duration::from_secs(13) && after <= Duration::from_secs(15) + ONE_WAY + STEP,
        "{after:?}"
    );
    assert_eq!(p.hub_end(), Some(&HubSessionEnd::KeepaliveTimeout));
    assert_eq!(p.hub_close().unwrap().code, close_code::KEEPALIVE_TIMEOUT);
    // The hub probed the quiet agent (every 5 s) before giving up on it.
    assert!(
        p.hub_pings - pings_before >= 2,
        "{}",
        p.hub_pings - pings_before
    );
}

#[test]
fn a_hello_for_another_node_is_refused_with_its_reason_to_both_sides() {
    let mut p = Pair::new(
        NODE,
        hello("edge-b1.site-a.example.internal"),
        RouteTable::new(),
    );
    p.advance(Duration::from_secs(1));
    let Some(HubSessionEnd::Refused(refusal)) = p.hub_end() else {
        panic!("{:?}", p.hub_did)
    };
    assert_eq!(refusal.label(), "identity_mismatch");
    let close = p.hub_close().unwrap();
    assert_eq!(close.code, close_code::UNAUTHORIZED);
    assert_eq!(close.linger, Duration::from_millis(300));
    // The agent read the reason as a going-away before any close.
    let Some(AgentSessionEnd::Refused(why)) = p.agent_end() else {
        panic!("{:?}", p.agent_did)
    };
    assert!(why.contains("its certificate names"), "{why}");
    assert_eq!(why, &close.reason);
    assert!(!p.agent_welcomed());
    assert!(!p
        .hub_did
        .iter()
        .any(|a| matches!(a, HubAction::Admitted(_))));
}

#[test]
fn hellos_with_another_version_or_alpn_are_protocol_errors() {
    let mut old = hello(NODE);
    old.protocol_version = 2;
    let mut alpn = hello(NODE);
    alpn.alpn = "petrel-enrol/1".into();
    for (h, want) in [(old, "version 2"), (alpn, "ALPN")] {
        let mut p = Pair::new(NODE, h, RouteTable::new());
        p.advance(Duration::from_secs(1));
        let Some(HubSessionEnd::Refused(r)) = p.hub_end() else {
            panic!("{:?}", p.hub_did)
        };
        assert_eq!(r.label(), "protocol_error");
        assert!(
            matches!(p.agent_end(), Some(AgentSessionEnd::Refused(m)) if m.contains(want)),
            "{:?}",
            p.agent_end()
        );
    }
}

#[test]
fn no_hello_in_time_and_a_first_message_that_is_not_a_hello_are_refused() {
    let t0 = Instant::now();
    let mut hub = HubSession::new(NODE.into(), hub_config(), t0);
    assert_eq!(hub.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    hub.handle_timeout(t0 + Duration::from_secs(9));
    assert_eq!(hub.poll_action(), None);
    hub.handle_timeout(t0 + Duration::from_secs(10));
    let Some(HubAction::Close(close)) = hub.poll_action() else {
        panic!()
    };
    assert_eq!(close.code, close_code::UNAUTHORIZED);
    let Some(HubAction::Ended(HubSessionEnd::Refused(r))) = hub.poll_action() else {
        panic!()
    };
    assert_eq!(r.label(), "no_hello");

    let mut hub = HubSession::new(NODE.into(), hub_config(), t0);
    hub.handle_message(
        ControlMessage::Ping(crate::Ping {
            nonce: 1,
            sent_at_micros: 0,
        }),
        t0,
    );
    // No going-away for something that never was a hello: only the close says why.
    assert!(
        matches!(hub.poll_action(), Some(HubAction::Close(c)) if c.reason == "expected hello, got ping")
    );
    assert_eq!(
        hub.poll_action(),
        Some(HubAction::Ended(HubSessionEnd::Refused(Refusal::NotHello(
            "ping"
        ))))
    );
    // Whatever follows an ended session is ignored.
    hub.handle_message(
        ControlMessage::Hello(Box::new(hello(NODE)).as_ref().clone()),
        t0,
    );
    assert_eq!(hub.poll_action(), None);

    let mut hub = HubSession::new(NODE.into(), hub_config(), t0);
    hub.handle_malformed(crate::DecodeError::UnknownCriticalType(0x7f));
    assert!(
        matches!(hub.poll_action(), Some(HubAction::Close(c)) if c.code == close_code::UNAUTHORIZED)
    );
    assert!(
        matches!(hub.poll_action(), Some(HubAction::Ended(HubSessionEnd::Refused(r))) if r.label() == "protocol_error")
    );
}

#[test]
fn a_view_over_the_frame_cap_is_refused_as_the_hubs_limit() {
    let mut p = Pair::new(NODE, hello(NODE), RouteTable::new());
    p.hub
        .handle_message(ControlMessage::Hello(hello(NODE)), p.now);
    assert!(matches!(p.hub.poll_action(), Some(HubAction::Admitted(_))));
    p.hub.welcome_undeliverable(crate::EncodeError::TooLong {
        field: "welcome",
        len: 70_000,
        max: 65_536,
    });
    let Some(HubAction::Close(close)) = p.hub.poll_action() else {
        panic!()
    };
    assert_eq!(close.code, close_code::PROTOCOL_ERROR);
    assert!(close
        .reason
        .starts_with("the hub cannot send this node's view"));
    assert!(
        matches!(p.hub.poll_action(), Some(HubAction::Ended(HubSessionEnd::Refused(r))) if r.label() == "view_too_large")
    );
}

#[test]
fn peer_offers_reach_the_agent_and_never_go_the_other_way() {
    let mut p = Pair::connected();
    let offer = crate::control::PeerOffer {
        node: "edge-b1".into(),
        addr: "203.0.113.3".parse().unwrap(),
        port: 40001,
    };
    assert!(p.hub.push(ControlMessage::PeerOffer(offer.clone())));
    p.advance(100 * MS);
    assert!(
        p.agent_did
            .iter()
            .any(|a| matches!(a, AgentAction::PeerOffered(o) if *o == offer)),
        "{:?}",
        p.agent_did
    );
    assert!(p.agent_end().is_none());
    // An agent has no business offering peers: the hub ends the session.
    p.to_hub.send(&ControlMessage::PeerOffer(offer), p.now);
    p.advance(100 * MS);
    assert!(
        matches!(p.hub_end(), Some(HubSessionEnd::Unexpected("peer_offer"))),
        "{:?}",
        p.hub_end()
    );
}

#[test]
fn updates_reach_the_agent_as_views() {
    let mut p = Pair::connected();
    let mut changed = view(1300);
    changed.egress.pod_ports = None;
    assert!(p.hub.push(ControlMessage::Update(changed.clone())));
    p.advance(100 * MS);
    assert_eq!(p.last_pending_view(), Some(&changed));
    // A hub that sends routes in its views: they are complete from then on.
    let mut with_routes = view(1300);
    with_routes.routes = RouteTable::from_entries([entry(4, "vpc")]).routes_for(NODE, SITE);
    assert!(p.hub.push(ControlMessage::Update(with_routes.clone())));
    p.advance(100 * MS);
    assert_eq!(p.last_view(), Some(&with_routes));
    assert!(p.hub.push(ControlMessage::Update(changed.clone())));
    p.advance(100 * MS);
    assert_eq!(p.last_view(), Some(&changed));
}

#[test]
fn a_fresh_links_views_wait_for_its_table_and_a_kept_table_counts() {
    let mut p = Pair::connected();
    assert!(p.hub.push(ControlMessage::Update(view(1300))));
    p.advance(100 * MS);
    assert_eq!(p.last_view(), None, "{:?}", p.agent_did);
    assert_eq!(p.last_pending_view().unwrap().site_mtu, 1300);
    // A chunk without a digest (mid-snapshot) completes nothing.
    let table = RouteTable::from_entries([entry(1, SITE), entry(2, "vpc")]);
    let mut chunks = table.snapshot().unwrap();
    let last = chunks.pop().unwrap();
    assert!(last.digest.is_some());
    let mut partial = last.clone();
    partial.digest = None;
    assert!(p.hub.push(ControlMessage::Routes(partial)));
    p.advance(100 * MS);
    assert_eq!(p.last_view(), None);
    // An update mid-snapshot is still pending, whatever the table holds so far.
    assert!(p.hub.push(ControlMessage::Update(view(1250))));
    p.advance(100 * MS);
    assert_eq!(p.last_view(), None);
    assert_eq!(p.last_pending_view().unwrap().site_mtu, 1250);
    // The digest confirms the table: complete, and so is every later view.
    assert!(p.hub.push(ControlMessage::Routes(last)));
    p.advance(100 * MS);
    assert_eq!(p.last_view().unwrap().routes.len(), 2);
    assert!(p.hub.push(ControlMessage::Update(view(1200))));
    p.advance(100 * MS);
    assert_eq!(p.last_view().unwrap().site_mtu, 1200);
    // The link's next session starts from the confirmed table: its welcome is complete.
    let routes = std::mem::replace(
        &mut p.agent,
        AgentSession::new(hello(NODE), RouteTable::new(), agent_config()),
    )
    .into_routes();
    let again = Pair::new(NODE, hello(NODE), routes);
    let mut again = again;
    again.advance(100 * MS);
    assert_eq!(again.last_view().unwrap().routes.len(), 2);
    assert_eq!(again.last_pending_view(), None);
}

#[test]
fn route_sync_builds_the_agents_table_and_a_digest_mismatch_starts_over() {
    let mut p = Pair::connected();
    let table = RouteTable::from_entries([entry(1, SITE), entry(2, SITE), entry(3, "vpc")]);
    for chunk in table.snapshot().unwrap() {
        assert!(p.hub.push(ControlMessage::Routes(chunk)));
    }
    let welcome_view = p.last_view().cloned();
    p.advance(100 * MS);
    assert_eq!(p.agent.routes().digest(), table.digest());
    let applied = p.last_view().unwrap();
    assert_ne!(Some(applied), welcome_view.as_ref());
    assert_eq!(applied.routes, table.routes_for(NODE, SITE));
    assert_eq!(applied.routes.len(), 3);
    assert_eq!(
        applied.site_mtu, 1400,
        "the routes complete the welcome's view"
    );

    // A later update without routes keeps the synced ones.
    p.hub.push(ControlMessage::Update(view(1300)));
    p.advance(100 * MS);
    assert_eq!(p.last_view().unwrap().routes.len(), 3);
    assert_eq!(p.last_view().unwrap().site_mtu, 1300);

    // The next session of this link says which table it holds.
    let held = std::mem::replace(
        &mut p.agent,
        AgentSession::new(hello(NODE), RouteTable::new(), agent_config()),
    );
    let routes = held.into_routes();
    let mut again = Pair::new(NODE, hello(NODE), routes);
    again.advance(100 * MS);
    let Some(HubAction::Admitted(h)) = again.hub_did.first() else {
        panic!()
    };
    assert_eq!(h.routes_digest, Some(table.digest()));
    // The welcome (no routes in it) already carries the held table's routes.
    assert_eq!(again.last_view().unwrap().routes.len(), 3);

    // A delta whose digest does not match what the agent ends up with.
    again.hub.push(ControlMessage::Routes(RouteSync {
        removals: vec![entry(1, SITE).node_name],
        digest: Some(table.digest()),
        ..Default::default()
    }));
    again.advance(100 * MS);
    assert_eq!(
        again.agent_end(),
        Some(&AgentSessionEnd::RouteDigestMismatch)
    );
    assert_eq!(
        again.agent_close().unwrap().code,
        close_code::PROTOCOL_ERROR
    );
    assert!(
        again.agent.routes().is_empty(),
        "the next session starts from a snapshot"
    );
}

#[test]
fn renewal_is_signed_once_and_a_second_within_the_interval_is_refused_unsigned() {
    let mut p = Pair::connected();
    assert!(p.agent.start_renewal(b"csr-1".to_vec()));
    assert!(
        !p.agent.start_renewal(b"csr-2".to_vec()),
        "one renewal at a time"
    );
    p.advance(100 * MS);
    let answers = p.renewal_answers();
    assert_eq!(answers.len(), 1);
    assert_eq!(
        answers[0].result.as_ref().unwrap().cert_der,
        b"cert for csr-1".to_vec()
    );
    assert_eq!(p.env.signed, 1);

    assert!(p.agent.start_renewal(b"csr-3".to_vec()));
    p.advance(100 * MS);
    let answers = p.renewal_answers();
    assert_eq!(answers.len(), 2);
    assert_eq!(
        answers[1].result.as_ref().unwrap_err().code,
        RENEWAL_RATE_LIMITED
    );
    assert_eq!(p.env.signed, 1, "a rate-limited renewal costs no signature");
    assert!(p.hub_did.contains(&HubAction::RenewalRateLimited));

    p.advance(Duration::from_secs(60));
    assert!(p.agent.start_renewal(b"csr-4".to_vec()));
    p.advance(100 * MS);
    assert_eq!(p.env.signed, 2);
    assert!(p.renewal_answers()[2].result.is_ok());
    assert_eq!(p.agent_end(), None);
}

#[test]
fn an_unsolicited_renewal_answer_is_ignored() {
    let mut p = Pair::connected();
    p.hub.renewal_signed(Ok(CertBundle {
        cert_der: b"x".to_vec(),
        ca_der: b"ca".to_vec(),
    }));
    p.advance(100 * MS);
    assert!(p.renewal_answers().is_empty());
    assert_eq!(p.agent_end(), None);
}

#[test]
fn a_restarting_hub_sends_the_agent_away_with_its_retry_hint() {
    let mut p = Pair::connected();
    p.hub.leave(GoingAway {
        reason: GoingAwayReason::Restart,
        retry_after_ms: 5000,
        message: "hub restarting".into(),
    });
    p.advance(100 * MS);
    let close = p.hub_close().unwrap();
    assert_eq!(close.code, close_code::GOING_AWAY);
    assert_eq!(close.linger, Duration::from_millis(500));
    assert!(matches!(
        p.hub_end(),
        Some(HubSessionEnd::Left {
            reason: GoingAwayReason::Restart,
            ..
        })
    ));
    let end = p.agent_end().unwrap();
    assert_eq!(
        end,
        &AgentSessionEnd::GoingAway {
            reason: GoingAwayReason::Restart,
            retry_after: Duration::from_secs(5),
            message: "hub restarting".into()
        }
    );
    // Back after the hint plus up to a quarter of it, spread over the fleet.
    assert_eq!(
        end.next_attempt(false, 0.0),
        NextAttempt::After(Duration::from_secs(5))
    );
    assert_eq!(
        end.next_attempt(false, 0.5),
        NextAttempt::After(Duration::from_millis(5625))
    );
    assert!(
        !p.hub.push(ControlMessage::Update(view(1300))),
        "an ended session takes no pushes"
    );
}

#[test]
fn a_replaced_tunnel_parks_only_when_another_link_holds_the_same_hub() {
    let mut p = Pair::connected();
    p.hub.leave(GoingAway {
        reason: GoingAwayReason::Replaced,
        retry_after_ms: 0,
        message: "replaced by a newer connection from the same node".into(),
    });
    p.advance(100 * MS);
    assert_eq!(p.hub_close().unwrap().code, close_code::REPLACED);
    let end = p.agent_end().unwrap();
    assert!(matches!(
        end,
        AgentSessionEnd::GoingAway {
            reason: GoingAwayReason::Replaced,
            ..
        }
    ));
    assert_eq!(
        end.next_attempt(true, 0.3),
        NextAttempt::Park(DUPLICATE_PARK)
    );
    // Alone on that hub (the node restarted): back within the 100 ms spread.
    assert_eq!(
        end.next_attempt(false, 1.0),
        NextAttempt::After(Duration::from_millis(100))
    );
}

#[test]
fn an_agent_that_stops_says_so_and_the_hub_ends_cleanly() {
    let mut p = Pair::connected();
    p.agent.shutdown();
    p.advance(100 * MS);
    assert_eq!(p.agent_end(), Some(&AgentSessionEnd::Shutdown));
    assert_eq!(p.agent_close().unwrap().code, close_code::NORMAL);
    assert_eq!(
        p.agent_end().unwrap().next_attempt(false, 0.0),
        NextAttempt::Stop
    );
    assert_eq!(
        p.hub_end(),
        Some(&HubSessionEnd::AgentGoingAway {
            reason: GoingAwayReason::Shutdown,
            message: "agent stopping".into()
        })
    );
    assert_eq!(p.hub_close(), None, "the agent's close is the clean one");
}

#[test]
fn messages_out_of_place_close_with_a_protocol_error_and_unknown_optional_ones_do_not() {
    let mut p = Pair::connected();
    p.agent
        .handle_message(ControlMessage::Unknown { msg_type: 0x90 }, p.now);
    p.hub
        .handle_message(ControlMessage::Unknown { msg_type: 0x91 }, p.now);
    p.advance(100 * MS);
    assert_eq!((p.hub_end(), p.agent_end()), (None, None));

    p.hub
        .handle_message(ControlMessage::Update(view(1400)), p.now);
    p.agent
        .handle_message(ControlMessage::Hello(hello(NODE)), p.now);
    p.settle();
    assert_eq!(p.hub_end(), Some(&HubSessionEnd::Unexpected("update")));
    assert_eq!(p.hub_close().unwrap().code, close_code::PROTOCOL_ERROR);
    assert_eq!(p.agent_end(), Some(&AgentSessionEnd::Unexpected("hello")));
    assert_eq!(p.agent_close().unwrap().reason, "unexpected hello");

    // Before its welcome, an agent takes nothing but a welcome or a refusal.
    let mut agent = AgentSession::new(hello(NODE), RouteTable::new(), agent_config());
    assert!(matches!(
        agent.poll_action(),
        Some(AgentAction::Send(ControlMessage::Hello(_)))
    ));
    assert!(
        !agent.start_renewal(b"csr".to_vec()),
        "no renewal before the welcome"
    );
    agent.handle_message(ControlMessage::Update(view(1400)), Instant::now());
    assert!(
        matches!(agent.poll_action(), Some(AgentAction::Close(c)) if c.code == close_code::PROTOCOL_ERROR)
    );
    assert_eq!(
        agent.poll_action(),
        Some(AgentAction::Ended(AgentSessionEnd::Unexpected("update")))
    );
}

#[test]
fn finished_streams_and_malformed_frames_end_each_side_with_a_typed_reason() {
    let mut agent = AgentSession::new(hello(NODE), RouteTable::new(), agent_config());
    let _hello = agent.poll_action();
    agent.handle_finished();
    assert_eq!(
        agent.poll_action(),
        Some(AgentAction::Ended(AgentSessionEnd::FinishedBeforeWelcome))
    );

    let mut p = Pair::connected();
    p.hub.handle_finished();
    p.agent
        .handle_malformed(crate::DecodeError::UnknownCriticalType(0x42));
    p.settle();
    assert_eq!(p.hub_end(), Some(&HubSessionEnd::AgentFinished));
    assert!(matches!(p.agent_end(), Some(AgentSessionEnd::Malformed(_))));
    assert_eq!(p.agent_close().unwrap().code, close_code::PROTOCOL_ERROR);
}

#[test]
fn the_renewal_interval_is_a_quarter_of_the_certificate_life_at_most_a_minute() {
    assert_eq!(
        HubSessionConfig::renewal_interval(Duration::from_secs(12)),
        Duration::from_secs(3)
    );
    assert_eq!(
        HubSessionConfig::renewal_interval(Duration::from_secs(90 * 86400)),
        Duration::from_secs(60)
    );
}

#[test]
fn each_side_reports_its_node_and_whether_it_ended() {
    let mut p = Pair::connected();
    assert_eq!(p.hub.node(), NODE);
    assert!(!p.hub.is_ended() && !p.agent.is_ended());
    p.agent.shutdown();
    p.advance(100 * MS);
    assert!(p.agent.is_ended(), "{:?}", p.agent_did);
    assert!(p.hub.is_ended(), "{:?}", p.hub_did);
    // A second stop of an ended agent sends nothing more.
    p.agent.shutdown();
    assert_eq!(p.agent.poll_action(), None);
}

#[test]
fn a_route_table_at_its_cap_is_kept_and_one_entry_past_it_ends_the_session() {
    fn entries(from: usize, to: usize) -> Vec<RouteEntry> {
        (from..to)
            .map(|i| RouteEntry {
                node_name: format!("n{i}"),
                site: "vpc".into(),
                pod_cidrs: vec![],
                vtep_mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
                underlay: IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
                mtu: 0,
            })
            .collect()
    }
    let mut p = Pair::connected();
    let cap = crate::routes::MAX_ROUTE_TABLE;
    // Straight into the agent: a chunk this size is over the frame cap on the wire.
    p.agent.handle_message(
        ControlMessage::Routes(RouteSync {
            reset: true,
            upserts: entries(0, cap),
            ..Default::default()
        }),
        p.now,
    );
    p.settle();
    assert_eq!(p.agent_end(), None, "exactly the cap is allowed");
    assert_eq!(p.agent.routes().len(), cap);
    p.agent.handle_message(
        ControlMessage::Routes(RouteSync {
            upserts: entries(cap, cap + 1),
            ..Default::default()
        }),
        p.now,
    );
    p.settle();
    assert_eq!(p.agent_end(), Some(&AgentSessionEnd::RouteTableTooLarge));
    assert!(p.agent.routes().is_empty());
}

#[test]
fn the_agent_knows_when_a_renewal_is_outstanding() {
    let mut p = Pair::connected();
    assert!(!p.agent.is_renewing());
    assert!(p.agent.start_renewal(b"csr-1".to_vec()));
    assert!(p.agent.is_renewing());
    p.advance(100 * MS);
    assert_eq!(p.renewal_answers().len(), 1);
    assert!(!p.agent.is_renewing(), "the answer ends the renewal");
}

#[test]
fn routes_in_an_older_hubs_view_win_over_the_synced_table() {
    let mut p = Pair::connected();
    let table = RouteTable::from_entries([entry(1, SITE), entry(2, "vpc")]);
    for chunk in table.snapshot().unwrap() {
        assert!(p.hub.push(ControlMessage::Routes(chunk)));
    }
    p.advance(100 * MS);
    assert_eq!(p.last_view().unwrap().routes.len(), 2);
    let mut with_routes = view(1400);
    with_routes.routes = table.routes_for(NODE, SITE)[..1].to_vec();
    p.hub.push(ControlMessage::Update(with_routes.clone()));
    p.advance(100 * MS);
    assert_eq!(p.last_view(), Some(&with_routes));
}

#[test]
fn a_malformed_frame_after_the_end_changes_nothing() {
    let mut p = Pair::connected();
    p.hub.handle_finished();
    p.settle();
    assert_eq!(p.hub_end(), Some(&HubSessionEnd::AgentFinished));
    p.hub
        .handle_malformed(crate::DecodeError::UnknownCriticalType(0x42));
    assert_eq!(p.hub.poll_action(), None);
}

#[test]
fn a_renewal_exactly_one_interval_after_the_last_is_signed() {
    let now = Instant::now();
    let mut hub = HubSession::new(NODE.into(), hub_config(), now);
    hub.handle_message(ControlMessage::Hello(hello(NODE)), now);
    while let Some(a) = hub.poll_action() {
        if matches!(a, HubAction::Admitted(_)) {
            hub.welcome(SITE.into(), view(1400), now);
        }
    }
    let renew = |hub: &mut HubSession, at: Instant| {
        hub.handle_message(
            ControlMessage::RenewRequest(crate::RenewRequest {
                csr_der: b"csr".to_vec(),
            }),
            at,
        );
        std::iter::from_fn(|| hub.poll_action()).collect::<Vec<_>>()
    };
    let first = renew(&mut hub, now);
    assert!(first.iter().any(|a| matches!(a, HubAction::Sign { .. })));
    let min = hub_config().renewal_min_interval;
    let early = renew(&mut hub, now + min - MS);
    assert!(early.contains(&HubAction::RenewalRateLimited), "{early:?}");
    let on_time = renew(&mut hub, now + min);
    assert!(
        on_time.iter().any(|a| matches!(a, HubAction::Sign { .. })),
        "{on_time:?}"
    );
}
