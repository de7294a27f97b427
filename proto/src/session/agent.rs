//! The agent's end of its control stream to one hub: the hello, the welcome, then keepalive
//! (the agent pings; the hub answers), the hub's updates and route-sync chunks applied to the
//! link's route table, renewal answers, and the hub's going-away; and, once it ends, when to
//! try again ([`AgentSessionEnd::next_attempt`]).
//!
//! The route table outlives a session (a hub that still has the same table sends nothing on
//! reconnect): the driver hands it in with [`AgentSession::new`] and takes it back with
//! [`AgentSession::into_routes`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{close_code, Close};
use crate::routes::MAX_ROUTE_TABLE;
use crate::{
    ControlMessage, DecodeError, GoingAway, GoingAwayReason, Hello, HubView, Keepalive,
    KeepaliveAction, RenewRequest, RenewResponse, RouteTable, Welcome,
};

/// After a hub reports that our tunnel was replaced by another link of ours, wait this long
/// before trying again (two endpoints that name the same hub must not fight over it).
pub const DUPLICATE_PARK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSessionConfig {
    pub ping_interval: Duration,
    /// Nothing from the hub for this long: the tunnel is dead.
    pub dead_after: Duration,
}

/// How an agent session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentSessionEnd {
    /// The hub sent a going-away instead of a welcome.
    #[error("hub refused the tunnel: {0}")]
    Refused(String),
    #[error("hub closed the control stream before welcoming us")]
    FinishedBeforeWelcome,
    #[error("hub going away ({reason:?}): {message}")]
    GoingAway {
        reason: GoingAwayReason,
        retry_after: Duration,
        message: String,
    },
    #[error("hub silent for {0:?}")]
    HubSilent(Duration),
    #[error("the hub sent more than {MAX_ROUTE_TABLE} routes")]
    RouteTableTooLarge,
    #[error("route table digest mismatch; reconnecting for a fresh table")]
    RouteDigestMismatch,
    #[error("hub finished the control stream")]
    HubFinished,
    #[error("hub sent unexpected {0}")]
    Unexpected(&'static str),
    #[error("hub sent a malformed message: {0}")]
    Malformed(DecodeError),
    #[error("agent stopping")]
    Shutdown,
}

/// When a link tries again after a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAttempt {
    /// The agent is stopping.
    Stop,
    /// Another link of ours holds this hub: leave it alone for this long.
    Park(Duration),
    /// The hub said when (plus a spread so a fleet does not return at one instant).
    After(Duration),
    /// The link's own backoff decides.
    Backoff,
}

impl AgentSessionEnd {
    /// `same_hub_as_other_link`: another link of this agent is connected to the hub that
    /// ended this session. `jitter` in `[0, 1)`.
    pub fn next_attempt(&self, same_hub_as_other_link: bool, jitter: f64) -> NextAttempt {
        match self {
            Self::Shutdown => NextAttempt::Stop,
            Self::GoingAway {
                reason: GoingAwayReason::Replaced,
                ..
            } if same_hub_as_other_link => NextAttempt::Park(DUPLICATE_PARK),
            Self::GoingAway { retry_after, .. } => {
                // Spread a fleet's return over a quarter of the hint (at least 100 ms).
                let spread = (*retry_after / 4).max(Duration::from_millis(100));
                NextAttempt::After(*retry_after + spread.mul_f64(jitter.clamp(0.0, 1.0)))
            }
            _ => NextAttempt::Backoff,
        }
    }
}

/// What the driver does for the machine, in the order given.
// A few actions live in a short queue per session; boxing every message would cost more
// than the slack in the small variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum AgentAction {
    Send(ControlMessage),
    /// The hub welcomed us: the link is up (its view follows as [`AgentAction::ApplyView`]).
    Welcomed(Box<Welcome>),
    /// The view the data plane, the egress policy and the endpoint list take now: the hub's
    /// last view with its routes from the synced table (or as sent, from a hub that sends
    /// routes in views).
    ApplyView(Box<HubView>),
    /// A view whose routes are not known yet: this link's first connection to a hub that
    /// syncs its route table, before the table arrives. Its egress policy and endpoints apply;
    /// its (empty) routes must not replace routes another link already applied (a new hub
    /// joining would otherwise empty every agent's routes until its table came).
    ApplyViewRoutesPending(Box<HubView>),
    /// A new smoothed round-trip time.
    Rtt(Duration),
    /// The hub answered the renewal started with [`AgentSession::start_renewal`].
    RenewalAnswered(RenewResponse),
    /// The hub offered a direct path to a peer agent (see [`crate::direct`]).
    PeerOffered(crate::control::PeerOffer),
    Close(Close),
    /// The session is over; the last action.
    Ended(AgentSessionEnd),
}

/// A complete view, or one whose routes are still to come.
fn view_action(routes_known: bool, view: HubView) -> AgentAction {
    if routes_known {
        AgentAction::ApplyView(Box::new(view))
    } else {
        AgentAction::ApplyViewRoutesPending(Box::new(view))
    }
}

#[derive(Debug)]
enum State {
    Welcoming,
    Running {
        keepalive: Box<Keepalive>,
        check_at: Instant,
        node: String,
        site: String,
        /// The last view (welcome or update) that the table's routes complete.
        base: Box<HubView>,
    },
    Ended,
}

#[derive(Debug)]
pub struct AgentSession {
    config: AgentSessionConfig,
    state: State,
    routes: RouteTable,
    /// Whether `routes` are a table the hub confirmed (its digest matched, in this session or
    /// the link's last) or the hub sends routes in its views.
    routes_known: bool,
    renewing: bool,
    actions: VecDeque<AgentAction>,
    /// The last view's [`HubView::reconnect_spread`], and when the hub was last heard (any
    /// message after the welcome): what [`AgentSession::herd_delay`] needs once the session
    /// is over.
    reconnect_spread: Duration,
    last_heard: Option<Instant>,
}

impl AgentSession {
    /// Starts a session on a fresh connection: queues the hello, which says which route
    /// table this link holds.
    pub fn new(mut hello: Hello, routes: RouteTable, config: AgentSessionConfig) -> Self {
        hello.routes_digest = Some(routes.digest());
        let mut actions = VecDeque::new();
        actions.push_back(AgentAction::Send(ControlMessage::Hello(hello)));
        AgentSession {
            config,
            state: State::Welcoming,
            // A table kept from the link's last session was confirmed then.
            routes_known: !routes.is_empty(),
            routes,
            renewing: false,
            actions,
            reconnect_spread: Duration::ZERO,
            last_heard: None,
        }
    }

    /// When the hub was last heard (its welcome or any later message).
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// How long to wait before the first attempt after this session ended without a goodbye
    /// ([`crate::backoff::herd_delay`] of the last view's spread, counted from the last word
    /// from the hub); zero for a session that was never welcomed. `jitter` in `[0, 1)`.
    pub fn herd_delay(&self, now: Instant, jitter: f64) -> Duration {
        match self.last_heard {
            Some(heard) => crate::backoff::herd_delay(
                self.reconnect_spread,
                now.saturating_duration_since(heard),
                jitter,
            ),
            None => Duration::ZERO,
        }
    }

    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }

    /// When [`AgentSession::handle_timeout`] should be called next. Before the welcome the
    /// driver bounds the wait itself (it also covers the QUIC handshake).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Running { check_at, .. } => Some(*check_at),
            _ => None,
        }
    }

    pub fn is_ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The route table, for the next session of this link.
    pub fn into_routes(self) -> RouteTable {
        self.routes
    }

    /// The smoothed round-trip time, once a pong has come back.
    pub fn rtt(&self) -> Option<Duration> {
        match &self.state {
            State::Running { keepalive, .. } => keepalive.rtt(),
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let State::Running {
            keepalive,
            check_at,
            ..
        } = &mut self.state
        else {
            return;
        };
        loop {
            match keepalive.poll(now) {
                KeepaliveAction::SendPing(p) => self
                    .actions
                    .push_back(AgentAction::Send(ControlMessage::Ping(p))),
                KeepaliveAction::Wait(at) => {
                    *check_at = at;
                    return;
                }
                KeepaliveAction::TimedOut => {
                    let dead_after = self.config.dead_after;
                    self.end(
                        Some(Close::now(
                            close_code::KEEPALIVE_TIMEOUT,
                            "hub unresponsive",
                        )),
                        AgentSessionEnd::HubSilent(dead_after),
                    );
                    return;
                }
            }
        }
    }

    pub fn handle_message(&mut self, msg: ControlMessage, now: Instant) {
        match &mut self.state {
            State::Ended => {}
            State::Welcoming => match msg {
                ControlMessage::Welcome(w) => self.on_welcome(w, now),
                ControlMessage::GoingAway(ga) => {
                    self.end(None, AgentSessionEnd::Refused(ga.message))
                }
                other => self.protocol_error(other.name()),
            },
            State::Running {
                keepalive,
                node,
                site,
                base,
                ..
            } => {
                keepalive.on_receive(now);
                self.last_heard = Some(now);
                match msg {
                    ControlMessage::Ping(p) => self
                        .actions
                        .push_back(AgentAction::Send(ControlMessage::Pong(p.pong()))),
                    ControlMessage::Pong(p) => {
                        if keepalive.on_pong(&p, now).is_some() {
                            if let Some(rtt) = keepalive.rtt() {
                                self.actions.push_back(AgentAction::Rtt(rtt));
                            }
                        }
                    }
                    ControlMessage::Update(view) => {
                        // A hub that sends routes in its views does not sync a table.
                        self.routes_known |= !view.routes.is_empty();
                        self.reconnect_spread = view.reconnect_spread();
                        let applied = effective_view(&view, &self.routes, node, site);
                        **base = view;
                        let action = view_action(self.routes_known, applied);
                        self.actions.push_back(action);
                    }
                    ControlMessage::Routes(chunk) => {
                        self.routes.apply(&chunk);
                        if self.routes.len() > MAX_ROUTE_TABLE {
                            return self.reset_routes(
                                "route table too large",
                                AgentSessionEnd::RouteTableTooLarge,
                            );
                        }
                        let Some(expected) = chunk.digest else {
                            return;
                        };
                        if self.routes.digest() != expected {
                            // Something was lost or misapplied: start over with a snapshot.
                            return self.reset_routes(
                                "route table digest mismatch",
                                AgentSessionEnd::RouteDigestMismatch,
                            );
                        }
                        self.routes_known = true;
                        let applied = effective_view(base, &self.routes, node, site);
                        self.actions
                            .push_back(AgentAction::ApplyView(Box::new(applied)));
                    }
                    ControlMessage::GoingAway(ga) => self.end(
                        None,
                        AgentSessionEnd::GoingAway {
                            reason: ga.reason,
                            retry_after: Duration::from_millis(u64::from(ga.retry_after_ms)),
                            message: ga.message,
                        },
                    ),
                    // An answer nobody asked for changes nothing.
                    ControlMessage::RenewResponse(resp) => {
                        if std::mem::take(&mut self.renewing) {
                            self.actions.push_back(AgentAction::RenewalAnswered(resp));
                        }
                    }
                    ControlMessage::PeerOffer(offer) => {
                        self.actions.push_back(AgentAction::PeerOffered(offer))
                    }
                    ControlMessage::Unknown { .. } => {}
                    other @ (ControlMessage::Hello(_)
                    | ControlMessage::Welcome(_)
                    | ControlMessage::RenewRequest(_)) => self.protocol_error(other.name()),
                }
            }
        }
    }

    /// The control stream carried something that does not decode.
    pub fn handle_malformed(&mut self, e: DecodeError) {
        if !self.is_ended() {
            let close = Close::now(close_code::PROTOCOL_ERROR, e.to_string());
            self.end(Some(close), AgentSessionEnd::Malformed(e));
        }
    }

    /// The hub finished the control stream.
    pub fn handle_finished(&mut self) {
        match self.state {
            State::Ended => {}
            State::Welcoming => self.end(None, AgentSessionEnd::FinishedBeforeWelcome),
            State::Running { .. } => self.end(None, AgentSessionEnd::HubFinished),
        }
    }

    /// Asks the hub to sign `csr_der`. False (and nothing sent) before the welcome or while
    /// another renewal is waiting for its answer.
    pub fn start_renewal(&mut self, csr_der: Vec<u8>) -> bool {
        if self.renewing || !matches!(self.state, State::Running { .. }) {
            return false;
        }
        self.renewing = true;
        self.actions
            .push_back(AgentAction::Send(ControlMessage::RenewRequest(
                RenewRequest { csr_der },
            )));
        true
    }

    pub fn is_renewing(&self) -> bool {
        self.renewing
    }

    /// The agent stops: tell the hub, then close.
    pub fn shutdown(&mut self) {
        if self.is_ended() {
            return;
        }
        self.actions
            .push_back(AgentAction::Send(ControlMessage::GoingAway(GoingAway {
                reason: GoingAwayReason::Shutdown,
                retry_after_ms: 0,
                message: "agent stopping".into(),
            })));
        let close = Close {
            code: close_code::NORMAL,
            reason: "agent stopping".into(),
            linger: Duration::from_millis(200),
        };
        self.end(Some(close), AgentSessionEnd::Shutdown);
    }

    fn on_welcome(&mut self, welcome: Welcome, now: Instant) {
        self.routes_known |= !welcome.view.routes.is_empty();
        self.reconnect_spread = welcome.view.reconnect_spread();
        self.last_heard = Some(now);
        let applied = effective_view(
            &welcome.view,
            &self.routes,
            &welcome.node_name,
            &welcome.site,
        );
        self.state = State::Running {
            keepalive: Box::new(Keepalive::new(
                self.config.ping_interval,
                self.config.dead_after,
                now,
            )),
            check_at: now,
            node: welcome.node_name.clone(),
            site: welcome.site.clone(),
            base: Box::new(welcome.view.clone()),
        };
        self.actions
            .push_back(AgentAction::Welcomed(Box::new(welcome)));
        let action = view_action(self.routes_known, applied);
        self.actions.push_back(action);
    }

    fn reset_routes(&mut self, reason: &str, end: AgentSessionEnd) {
        self.routes = RouteTable::new();
        self.end(Some(Close::now(close_code::PROTOCOL_ERROR, reason)), end);
    }

    fn protocol_error(&mut self, got: &'static str) {
        let close = Close::now(close_code::PROTOCOL_ERROR, format!("unexpected {got}"));
        self.end(Some(close), AgentSessionEnd::Unexpected(got));
    }

    fn end(&mut self, close: Option<Close>, end: AgentSessionEnd) {
        self.state = State::Ended;
        self.renewing = false;
        if let Some(close) = close {
            self.actions.push_back(AgentAction::Close(close));
        }
        self.actions.push_back(AgentAction::Ended(end));
    }
}

/// The view the data plane applies: a hub that sends routes in its views (an older hub) is
/// taken as it is; otherwise the routes come from the synced table.
pub fn effective_view(view: &HubView, table: &RouteTable, node: &str, site: &str) -> HubView {
    if !view.routes.is_empty() || table.is_empty() {
        return view.clone();
    }
    HubView {
        routes: table.routes_for(node, site),
        ..view.clone()
    }
}
