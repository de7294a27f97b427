//! The hub's end of one agent's control stream: the hello checks, the welcome, then keepalive,
//! renewal (rate-limited per tunnel), pushes from the hub (updates) and going-away (drain,
//! replacement). The driver has already verified the agent's certificate and admitted its node
//! before it creates the machine; the machine decides everything that follows from messages.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{close_code, Close};
use crate::{
    CertBundle, ControlMessage, DecodeError, EncodeError, ErrorInfo, GoingAway, GoingAwayReason,
    Hello, HubView, Keepalive, KeepaliveAction, RenewResponse, Welcome, ALPN_TUNNEL,
};

/// How long the hub lets a refused agent read the going-away that says why before it closes.
const REFUSAL_LINGER: Duration = Duration::from_millis(300);
/// How long a leaving session lets its going-away arrive and the agent close first.
const LEAVE_LINGER: Duration = Duration::from_millis(500);
/// The `code` of a renewal refused because this tunnel renewed too recently.
pub const RENEWAL_RATE_LIMITED: u16 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSessionConfig {
    /// This hub's name, as the welcome tells it.
    pub hub_id: String,
    /// Ping a quiet agent after this long.
    pub keepalive: Duration,
    /// Nothing from the agent for this long: it is gone.
    pub idle_timeout: Duration,
    /// The agent's hello must arrive within this long of the connection.
    pub hello_timeout: Duration,
    /// At most one renewal per this long per tunnel (see [`HubSessionConfig::renewal_interval`]).
    pub renewal_min_interval: Duration,
}

impl HubSessionConfig {
    /// An agent renews once per certificate life (at two thirds of it), so more than one
    /// renewal per quarter of the TTL (at most a minute apart) is a client spending the hub's
    /// signing work.
    pub fn renewal_interval(cert_ttl: Duration) -> Duration {
        (cert_ttl / 4).min(Duration::from_secs(60))
    }
}

/// Why the hub turned a tunnel down before welcoming it. [`Refusal::label`] is the `reason`
/// label of the hub's refusal counter; the display text is the close reason the agent reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("a client certificate from the Petrel CA is required for petrel/1; run `petrel-edge-agent join` first")]
    NoClientCertificate,
    #[error("certificate names {node:?}, but {why}")]
    NotAdmitted { node: String, why: String },
    #[error("no hello from {node:?} within {within:?}")]
    NoHello { node: String, within: Duration },
    #[error("expected hello, got {0}")]
    NotHello(&'static str),
    #[error("malformed hello: {0}")]
    MalformedHello(DecodeError),
    #[error(transparent)]
    Version(DecodeError),
    #[error("hello names ALPN {0:?}, expected \"petrel/1\"")]
    WrongAlpn(String),
    #[error("the agent presents itself as {claimed:?} but its certificate names {certificate:?}; a certificate is valid only for its own node")]
    IdentityMismatch {
        claimed: String,
        certificate: String,
    },
    /// The node's view does not fit a control frame: a hub-side limit, not the agent's doing,
    /// said to both sides so the agent does not retry against an empty reason.
    #[error("the hub cannot send this node's view: {0}")]
    ViewTooLarge(EncodeError),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no_client_certificate",
            Self::NotAdmitted { .. } => "not_admitted",
            Self::NoHello { .. } => "no_hello",
            Self::NotHello(_) | Self::MalformedHello(_) | Self::Version(_) | Self::WrongAlpn(_) => {
                "protocol_error"
            }
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::ViewTooLarge(_) => "view_too_large",
        }
    }

    pub fn close_code(&self) -> u32 {
        match self {
            Self::ViewTooLarge(_) => close_code::PROTOCOL_ERROR,
            _ => close_code::UNAUTHORIZED,
        }
    }

    /// A hello that was read but refused is answered with a going-away first, so the agent
    /// reads the reason as a message and not only as a close phrase.
    fn tells_agent_first(&self) -> bool {
        matches!(
            self,
            Self::Version(_) | Self::WrongAlpn(_) | Self::IdentityMismatch { .. }
        )
    }
}

/// How a hub session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubSessionEnd {
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("agent finished its control stream")]
    AgentFinished,
    #[error("agent going away: {reason:?} {message}")]
    AgentGoingAway {
        reason: GoingAwayReason,
        message: String,
    },
    #[error("keepalive timeout")]
    KeepaliveTimeout,
    #[error("protocol error: unexpected {0} from agent")]
    Unexpected(&'static str),
    #[error("protocol error: {0}")]
    Malformed(DecodeError),
    /// The hub told the agent to go (drain, replacement by a newer tunnel).
    #[error("going away: {message}")]
    Left {
        reason: GoingAwayReason,
        message: String,
    },
}

/// What the driver does for the machine, in the order given.
// As with `AgentAction`: a few actions live in a short queue per session, and boxing every
// message would cost more than the slack in the small variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubAction {
    /// The hello passed its checks: build the node's view and call [`HubSession::welcome`]
    /// (or [`HubSession::welcome_undeliverable`] if it cannot be sent).
    Admitted(Box<Hello>),
    Send(ControlMessage),
    /// Sign this CSR for the session's node and hand the result to
    /// [`HubSession::renewal_signed`].
    Sign {
        csr_der: Vec<u8>,
    },
    /// A renewal was refused without signing: the tunnel renewed too recently.
    RenewalRateLimited,
    Close(Close),
    /// The session is over; the last action.
    Ended(HubSessionEnd),
}

#[derive(Debug)]
enum State {
    AwaitingHello {
        by: Instant,
    },
    Admitting,
    Running {
        keepalive: Keepalive,
        check_at: Instant,
    },
    Ended,
}

#[derive(Debug)]
pub struct HubSession {
    node: String,
    config: HubSessionConfig,
    state: State,
    last_renewal: Option<Instant>,
    actions: VecDeque<HubAction>,
}

impl HubSession {
    /// A session for an agent whose certificate names `node`, which the driver admitted.
    pub fn new(node: String, config: HubSessionConfig, now: Instant) -> Self {
        let by = now.checked_add(config.hello_timeout).unwrap_or(now);
        HubSession {
            node,
            config,
            state: State::AwaitingHello { by },
            last_renewal: None,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<HubAction> {
        let next = self.actions.pop_front();
        if next.is_none() {
            // Drained: give the queue's room back. A hub keeps one session per agent for days,
            // and the four slots a queue keeps are 1.1 KB (11 MB at 10,000 agents).
            self.actions = VecDeque::new();
        }
        next
    }

    /// Room the action queue holds now (see [`HubSession::poll_action`]).
    #[cfg(test)]
    pub(super) fn action_room(&self) -> usize {
        self.actions.capacity()
    }

    /// When [`HubSession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingHello { by } => Some(*by),
            State::Running { check_at, .. } => Some(*check_at),
            State::Admitting | State::Ended => None,
        }
    }

    pub fn is_ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::AwaitingHello { by } if now >= *by => self.refuse(Refusal::NoHello {
                node: self.node.clone(),
                within: self.config.hello_timeout,
            }),
            State::Running {
                keepalive,
                check_at,
            } => loop {
                match keepalive.poll(now) {
                    KeepaliveAction::SendPing(p) => self
                        .actions
                        .push_back(HubAction::Send(ControlMessage::Ping(p))),
                    KeepaliveAction::Wait(at) => {
                        *check_at = at;
                        break;
                    }
                    KeepaliveAction::TimedOut => {
                        self.end(
                            Some(Close::now(
                                close_code::KEEPALIVE_TIMEOUT,
                                "no keepalive answer",
                            )),
                            HubSessionEnd::KeepaliveTimeout,
                        );
                        break;
                    }
                }
            },
            _ => {}
        }
    }

    pub fn handle_message(&mut self, msg: ControlMessage, now: Instant) {
        match &mut self.state {
            State::Ended => {}
            State::AwaitingHello { .. } => match msg {
                ControlMessage::Hello(hello) => match self.check_hello(&hello) {
                    Ok(()) => {
                        self.state = State::Admitting;
                        self.actions.push_back(HubAction::Admitted(Box::new(hello)));
                    }
                    Err(refusal) => self.refuse(refusal),
                },
                other => self.refuse(Refusal::NotHello(other.name())),
            },
            // The driver welcomes before it reads again; a message here is a driver bug, and
            // the agent would not have sent it before a welcome either way.
            State::Admitting => self.protocol_error(msg.name()),
            State::Running { keepalive, .. } => {
                keepalive.on_receive(now);
                match msg {
                    ControlMessage::Ping(p) => self
                        .actions
                        .push_back(HubAction::Send(ControlMessage::Pong(p.pong()))),
                    ControlMessage::Pong(p) => {
                        keepalive.on_pong(&p, now);
                    }
                    ControlMessage::RenewRequest(req) => self.on_renew_request(req.csr_der, now),
                    ControlMessage::GoingAway(ga) => self.end(
                        None,
                        HubSessionEnd::AgentGoingAway {
                            reason: ga.reason,
                            message: ga.message,
                        },
                    ),
                    ControlMessage::Unknown { .. } => {}
                    other @ (ControlMessage::Hello(_)
                    | ControlMessage::Welcome(_)
                    | ControlMessage::Update(_)
                    | ControlMessage::Routes(_)
                    | ControlMessage::PeerOffer(_)
                    | ControlMessage::RenewResponse(_)) => self.protocol_error(other.name()),
                }
            }
        }
    }

    /// The control stream carried something that does not decode.
    pub fn handle_malformed(&mut self, e: DecodeError) {
        match self.state {
            State::Ended => {}
            State::AwaitingHello { .. } => self.refuse(Refusal::MalformedHello(e)),
            _ => {
                let close = Close::now(close_code::PROTOCOL_ERROR, e.to_string());
                self.end(Some(close), HubSessionEnd::Malformed(e));
            }
        }
    }

    /// The agent finished its control stream.
    pub fn handle_finished(&mut self) {
        if !self.is_ended() {
            self.end(None, HubSessionEnd::AgentFinished);
        }
    }

    /// Welcomes the admitted agent with its view (after [`HubAction::Admitted`]).
    pub fn welcome(&mut self, site: String, view: HubView, now: Instant) {
        if !matches!(self.state, State::Admitting) {
            return;
        }
        // Agents ping every couple of seconds; the hub probes only a quiet one (and each new
        // one once, for an early RTT).
        let keepalive = Keepalive::when_quiet(self.config.keepalive, self.config.idle_timeout, now);
        self.state = State::Running {
            keepalive,
            check_at: now,
        };
        let keepalive_interval_ms =
            u32::try_from(self.config.keepalive.as_millis()).unwrap_or(u32::MAX);
        self.actions
            .push_back(HubAction::Send(ControlMessage::Welcome(Welcome {
                protocol_version: crate::PROTOCOL_VERSION,
                hub_id: self.config.hub_id.clone(),
                node_name: self.node.clone(),
                site,
                keepalive_interval_ms,
                view,
            })));
    }

    /// The welcome could not be encoded (the view is over the frame cap).
    pub fn welcome_undeliverable(&mut self, e: EncodeError) {
        if !self.is_ended() {
            self.refuse(Refusal::ViewTooLarge(e));
        }
    }

    /// Pushes a message from the hub (an update). False when the session is not running.
    pub fn push(&mut self, msg: ControlMessage) -> bool {
        if !matches!(self.state, State::Running { .. }) {
            return false;
        }
        self.actions.push_back(HubAction::Send(msg));
        true
    }

    /// Tells the agent to go (the hub drains, or a newer tunnel from the same node replaced
    /// this one) and closes.
    pub fn leave(&mut self, going_away: GoingAway) {
        if self.is_ended() {
            return;
        }
        let code = if going_away.reason == GoingAwayReason::Replaced {
            close_code::REPLACED
        } else {
            close_code::GOING_AWAY
        };
        let end = HubSessionEnd::Left {
            reason: going_away.reason,
            message: going_away.message.clone(),
        };
        let close = Close {
            code,
            reason: going_away.message.clone(),
            linger: LEAVE_LINGER,
        };
        self.actions
            .push_back(HubAction::Send(ControlMessage::GoingAway(going_away)));
        self.end(Some(close), end);
    }

    /// The answer to a [`HubAction::Sign`].
    pub fn renewal_signed(&mut self, result: Result<CertBundle, ErrorInfo>) {
        self.push(ControlMessage::RenewResponse(RenewResponse { result }));
    }

    fn on_renew_request(&mut self, csr_der: Vec<u8>, now: Instant) {
        let min = self.config.renewal_min_interval;
        if let Some(last) = self.last_renewal {
            if now.saturating_duration_since(last) < min {
                self.actions.push_back(HubAction::RenewalRateLimited);
                self.actions
                    .push_back(HubAction::Send(ControlMessage::RenewResponse(
                        RenewResponse {
                            result: Err(ErrorInfo {
                                code: RENEWAL_RATE_LIMITED,
                                message: format!(
                                    "renewal refused: this tunnel renewed less than {min:?} ago"
                                ),
                            }),
                        },
                    )));
                return;
            }
        }
        self.last_renewal = Some(now);
        self.actions.push_back(HubAction::Sign { csr_der });
    }

    fn check_hello(&self, hello: &Hello) -> Result<(), Refusal> {
        crate::check_protocol_version(hello.protocol_version).map_err(Refusal::Version)?;
        if hello.alpn.as_bytes() != ALPN_TUNNEL {
            return Err(Refusal::WrongAlpn(hello.alpn.clone()));
        }
        if hello.node_name != self.node {
            return Err(Refusal::IdentityMismatch {
                claimed: hello.node_name.clone(),
                certificate: self.node.clone(),
            });
        }
        Ok(())
    }

    fn refuse(&mut self, refusal: Refusal) {
        let message = refusal.to_string();
        let mut close = Close::now(refusal.close_code(), message.clone());
        if refusal.tells_agent_first() {
            self.actions
                .push_back(HubAction::Send(ControlMessage::GoingAway(GoingAway {
                    reason: GoingAwayReason::Unauthorized,
                    retry_after_ms: 0,
                    message,
                })));
            close.linger = REFUSAL_LINGER;
        }
        self.end(Some(close), HubSessionEnd::Refused(refusal));
    }

    fn protocol_error(&mut self, got: &'static str) {
        let close = Close::now(
            close_code::PROTOCOL_ERROR,
            format!("unexpected {got} from agent"),
        );
        self.end(Some(close), HubSessionEnd::Unexpected(got));
    }

    fn end(&mut self, close: Option<Close>, end: HubSessionEnd) {
        self.state = State::Ended;
        if let Some(close) = close {
            self.actions.push_back(HubAction::Close(close));
        }
        self.actions.push_back(HubAction::Ended(end));
    }
}
