//! One agent's tunnel session on the hub, as a pump around [`petrel_proto::session::HubSession`]:
//! admission before any message (certificate name, revocation, inventory), then the machine
//! decides (hello checks, welcome, keepalive, renewal rate, going-away) and this file performs
//! what it asks: builds the node's view, signs, writes, closes, registers the agent and counts.
//! Route sync stays here: its chunks are encoded once for all sessions and paced over the hub.
//!
//! Identity comes only from the verified client certificate; what the Hello says about the node
//! is compared with it and with the inventory, and a mismatch is refused, not believed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use petrel_proto::session::{
    Close, HubAction, HubSession, HubSessionConfig, HubSessionEnd, Refusal,
};
use petrel_proto::{ControlMessage, EncodeError, GoingAway, GoingAwayReason, Hello};
use petrel_transport::close_code;
use petrel_transport::control_stream::{ControlReader, ControlWriter, StreamError};
use tracing::{debug, error, info, warn, Instrument};

use super::cluster_routes::{ClusterRoutes, PlanError};
use super::dataplane::Relay;
use super::refresh::Refresher;
use super::revoked::RevocationGate;
use super::route_sync::{PlanKind, PACE_ABOVE_BYTES};
use super::signer::NodeSigner;
use super::view::AgentViews;
use crate::agent_registry::{
    AgentCounters, AgentEntry, AgentRegistry, CommandQueue, SessionCommand,
};
use crate::inventory_store::InventoryReader;
use crate::log_budget::LogBudget;
use crate::metrics::HubMetrics;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session's pump stopped.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    /// The state machine ended it.
    #[error(transparent)]
    Session(#[from] HubSessionEnd),
    #[error("agent does not read its control stream: {0} bytes queued")]
    NotReading(usize),
    #[error("cannot encode a message for the agent: {0}")]
    Encode(EncodeError),
    #[error(transparent)]
    RouteSync(#[from] PlanError),
    #[error(transparent)]
    Stream(StreamError),
    #[error("{0}")]
    Connection(quinn::ConnectionError),
}

/// What a tunnel session uses of the hub, and nothing more (`Hub::bind` builds it).
#[derive(Debug)]
pub struct SessionParts {
    /// The machine's settings (hub name, keepalive, idle timeout, renewal interval).
    pub machine: HubSessionConfig,
    pub registry: Arc<AgentRegistry>,
    pub views: Arc<AgentViews>,
    pub inventory: InventoryReader,
    /// Brings a session registered after a change up to date.
    pub refresher: Arc<Refresher>,
    pub routes: Arc<ClusterRoutes>,
    pub revocation: RevocationGate,
    pub signer: Arc<NodeSigner>,
    /// The VXLAN relay, when this hub runs one: each session pumps its agent's frames.
    pub relay: Option<Arc<Relay>>,
    pub metrics: Arc<HubMetrics>,
    pub log_budget: Arc<LogBudget>,
}

/// The session machine's settings for a hub with these timings and agent certificate lifetime.
pub fn machine_config(
    hub_name: &str,
    keepalive: Duration,
    idle_timeout: Duration,
    agent_cert_ttl: Duration,
) -> HubSessionConfig {
    HubSessionConfig {
        hub_id: hub_name.to_string(),
        keepalive,
        idle_timeout,
        hello_timeout: HELLO_TIMEOUT,
        renewal_min_interval: HubSessionConfig::renewal_interval(agent_cert_ttl),
    }
}

/// Counts and logs a refusal and closes with its reason (after `close.linger` for the agent to
/// read a going-away sent before it).
async fn refused(
    ctx: &SessionParts,
    conn: &quinn::Connection,
    refusal: &Refusal,
    close: Option<Close>,
) {
    match refusal {
        Refusal::ViewTooLarge(_) => error!(remote = %conn.remote_address(), "{refusal}"),
        _ => {
            warn!(remote = %conn.remote_address(), reason = refusal.label(), "tunnel refused: {refusal}")
        }
    }
    HubMetrics::inc_reason(&ctx.metrics.agent_refusals, refusal.label());
    let close = close.unwrap_or_else(|| Close {
        code: refusal.close_code(),
        reason: refusal.to_string(),
        linger: Duration::ZERO,
    });
    close_after_linger(conn, &close).await;
}

async fn close_after_linger(conn: &quinn::Connection, close: &Close) {
    if !close.linger.is_zero() {
        // Let what was sent arrive before the close discards it; the close reason repeats it.
        let _ = tokio::time::timeout(close.linger, conn.closed()).await;
    }
    conn.close(close.code.into(), close.reason.as_bytes());
}

fn deadline(at: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(at)
}

pub(super) async fn serve(ctx: Arc<SessionParts>, conn: quinn::Connection) {
    let Some(node) = petrel_transport::tls::peer_node_name(&conn) else {
        refused(&ctx, &conn, &Refusal::NoClientCertificate, None).await;
        return;
    };
    if !ctx.revocation.admit_tunnel(&conn, &node) {
        return;
    }
    let admitted = ctx
        .inventory
        .snapshot()
        .admit_agent(&node)
        .map(|(_, site)| site.name.clone())
        .map_err(|e| e.to_string());
    let site = match admitted {
        Ok(site) => site,
        Err(why) => {
            refused(&ctx, &conn, &Refusal::NotAdmitted { node, why }, None).await;
            return;
        }
    };
    // The certificate is verified and its node admitted: from here on the tunnel gets windows
    // sized for what it carries instead of the pre-authentication budget.
    petrel_transport::quic::AuthenticatedLimits::default().apply(&conn);
    let mut session = HubSession::new(node.clone(), ctx.machine.clone(), Instant::now());
    let hello_by = session
        .poll_timeout()
        .map(deadline)
        .unwrap_or_else(tokio::time::Instant::now);
    // An agent sends frames only once welcomed, and until the datagram pump runs nobody reads
    // them: one that comes before the welcome ends the session. (On a connection error it stays
    // pending and the other branch sees the error, so it never completes twice.)
    let early_datagram = super::first_datagram(conn.clone());
    tokio::pin!(early_datagram);
    let opened = tokio::select! {
        biased;
        opened = tokio::time::timeout_at(hello_by, async {
            let (send, recv) = conn.accept_bi().await?;
            let mut reader = ControlReader::new(recv);
            let first = reader.next().await;
            Ok::<_, quinn::ConnectionError>((ControlWriter::new(send), reader, first))
        }) => opened,
        () = &mut early_datagram => return datagram_before_welcome(&ctx, &conn, &node),
    };
    let (mut writer, reader) = match opened {
        Ok(Ok((writer, reader, first))) => {
            match first {
                Ok(Some(msg)) => session.handle_message(msg, Instant::now()),
                Ok(None) => return,
                Err(StreamError::Decode(e)) => session.handle_malformed(e),
                Err(e) => {
                    debug!(node = %node, error = %e, "agent left before its hello");
                    return;
                }
            }
            (writer, reader)
        }
        Ok(Err(e)) => {
            debug!(node = %node, error = %e, "agent left before its hello");
            return;
        }
        Err(_) => {
            session.handle_timeout(Instant::now());
            let mut close = None;
            while let Some(action) = session.poll_action() {
                match action {
                    HubAction::Close(c) => close = Some(c),
                    HubAction::Ended(HubSessionEnd::Refused(r)) => {
                        refused(&ctx, &conn, &r, close.take()).await
                    }
                    _ => {}
                }
            }
            return;
        }
    };
    // The welcome first: once written, `welcome` returns in the same poll, so a datagram seen
    // here came before the agent could have read it.
    let welcomed = tokio::select! {
        biased;
        welcomed = welcome(&ctx, &conn, &mut session, &mut writer, &site) => welcomed,
        () = &mut early_datagram => return datagram_before_welcome(&ctx, &conn, &node),
    };
    let Some(welcomed) = welcomed else {
        return;
    };
    // The steady state runs as its own task, holding only what it needs: the task that did the
    // handshake and the welcome (and was sized for them) ends here. 10,000 agents live for days.
    let running = register(ctx, conn, session, welcomed, site, reader, writer);
    tokio::spawn(running.run().in_current_span());
}

/// A datagram before the welcome: the session ends with `PROTOCOL_ERROR`, counted as a
/// dropped datagram (`before_welcome`).
fn datagram_before_welcome(ctx: &SessionParts, conn: &quinn::Connection, node: &str) {
    warn!(node = %node, remote = %conn.remote_address(), "tunnel closed: a datagram before the welcome");
    HubMetrics::inc_reason(&ctx.metrics.datagrams_dropped, "before_welcome");
    conn.close(
        close_code::PROTOCOL_ERROR.into(),
        b"datagrams are not allowed before the welcome",
    );
}

/// An agent the hub has welcomed: its hello, the digest of the view it was sent and the view
/// epoch that view was built under.
struct Welcomed {
    hello: Hello,
    digest: u64,
    epoch: u64,
}

/// Performs what the machine asked after the first message: a welcome (the hello passed) or
/// a refusal. `Some` once the welcome is on its way.
async fn welcome(
    ctx: &SessionParts,
    conn: &quinn::Connection,
    session: &mut HubSession,
    writer: &mut ControlWriter,
    site: &str,
) -> Option<Welcomed> {
    let mut admitted = None;
    let mut close = None;
    while let Some(action) = session.poll_action() {
        match action {
            HubAction::Admitted(hello) => {
                // Read before the view: a change after it makes the registered session
                // refresh itself (see `run`).
                let epoch = ctx.views.epoch();
                let view = ctx.views.view_for(
                    &ctx.inventory.snapshot(),
                    session.node(),
                    hello.routes_digest.is_some(),
                );
                let digest = super::view::view_digest(&view);
                session.welcome(site.to_string(), view, Instant::now());
                admitted = Some(Welcomed {
                    hello: *hello,
                    digest,
                    epoch,
                });
            }
            HubAction::Send(msg) => {
                let is_welcome = matches!(msg, ControlMessage::Welcome(_));
                match writer.send_counted(&msg).await {
                    Ok(n) if is_welcome => {
                        ctx.metrics.welcome_bytes.set(n as i64);
                    }
                    Ok(_) => {}
                    Err(StreamError::Encode(e)) if is_welcome => session.welcome_undeliverable(e),
                    Err(e) => {
                        debug!(node = %session.node(), error = %e, "agent left before the welcome");
                        return None;
                    }
                }
                if !is_welcome {
                    writer.finish();
                }
            }
            HubAction::Close(c) => close = Some(c),
            HubAction::Ended(HubSessionEnd::Refused(r)) => {
                refused(ctx, conn, &r, close.take()).await;
                return None;
            }
            HubAction::Ended(e) => {
                debug!(node = %session.node(), reason = %e, "session ended before the welcome");
                return None;
            }
            HubAction::Sign { .. } | HubAction::RenewalRateLimited => {}
        }
    }
    admitted
}

/// Registers the welcomed agent and starts its datagram pump; [`Running::run`] is the rest.
fn register(
    ctx: Arc<SessionParts>,
    conn: quinn::Connection,
    session: HubSession,
    welcomed: Welcomed,
    site: String,
    reader: ControlReader,
    writer: ControlWriter,
) -> Running {
    let node = session.node().to_string();
    let Welcomed {
        hello,
        digest,
        epoch,
    } = welcomed;
    let route_sync = hello.routes_digest.is_some();
    let entry = Arc::new(AgentEntry {
        id: ctx.registry.next_id(),
        node: node.clone(),
        site: site.clone(),
        agent_version: printable(&hello.agent_version),
        datapath: printable(&hello.self_view.datapath),
        since: SystemTime::now(),
        connection: conn.clone(),
        commands: CommandQueue::default(),
        counters: AgentCounters::default(),
        route_sync,
        direct_paths: hello.self_view.capabilities
            & petrel_proto::control::capability::DIRECT_PATHS
            != 0,
    });
    if let Some(old) = ctx.registry.insert(entry.clone()) {
        info!(node = %node, old_remote = %old.remote(), new_remote = %conn.remote_address(), "agent reconnected; replacing its previous tunnel");
        ctx.metrics.agents_replaced.inc();
        let leave = GoingAway {
            reason: GoingAwayReason::Replaced,
            retry_after_ms: 0,
            message: "replaced by a newer connection from the same node".into(),
        };
        if old.commands.try_send(SessionCommand::Leave(leave)).is_err() {
            old.connection.close(
                close_code::REPLACED.into(),
                b"replaced by a newer connection",
            );
        }
    } else {
        info!(node = %node, site = %site, remote = %conn.remote_address(), agent_version = %entry.agent_version, "agent connected");
    }
    ctx.metrics.agents_connected.set(ctx.registry.len() as i64);
    HubMetrics::inc_outcome(&ctx.metrics.tunnel_handshakes, "ok");
    // The inventory or the endpoints may have changed between the welcome and the
    // registration, and the refresh that followed did not see this session yet: do its part.
    ctx.views.record_pushed(entry.id, digest);
    if ctx.views.epoch() != epoch {
        ctx.refresher.refresh_agent(&entry);
    }
    // The agent's frames go to the relay; without one (a hub that only proxies the API
    // server) they are read, counted and dropped, so they never wait in quinn's buffer.
    let pump = match ctx.relay.clone() {
        Some(relay) => tokio::spawn(super::dataplane::pump_agent(relay, entry.clone())),
        None => {
            let (metrics, conn) = (ctx.metrics.clone(), entry.connection.clone());
            tokio::spawn(async move {
                super::discard_datagrams(&metrics, &conn, "no_relay").await;
            })
        }
    };
    let routes = hello.routes_digest.map(|held| RouteSyncState {
        held,
        changed: ctx.routes.subscribe(),
    });
    Running {
        ctx,
        entry,
        session,
        reader,
        writer,
        routes,
        pump,
    }
}

/// An agent-supplied string as it may appear in logs and status: printable ASCII only (others
/// become `?`), so newlines or terminal escape codes cannot forge log lines.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A route-sync session's state: the digest of the table its agent holds (what it said in its
/// hello, then what it was last sent) and the hub's change signal.
struct RouteSyncState {
    held: u64,
    changed: tokio::sync::watch::Receiver<u64>,
}

/// A route sync on its way to the agent, one chunk per turn of the session loop, so pings and
/// commands are answered between chunks; a large one waits for a paced slot
/// ([`super::route_sync::SyncPacer`]) and then for the pacer before each chunk.
struct OutgoingSync {
    kind: PlanKind,
    frames: Arc<Vec<bytes::Bytes>>,
    next: usize,
    held_after: u64,
    paced: bool,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// When the next chunk may be written; `None` until it has a slot.
    send_at: Option<tokio::time::Instant>,
}

impl OutgoingSync {
    /// Plans what the agent holding `held` lacks.
    fn plan(ctx: &SessionParts, held: u64) -> Result<Self, SessionEnd> {
        let planned = ctx.routes.plan_wire(held).map_err(SessionEnd::RouteSync);
        let (kind, frames, held_after) =
            planned.inspect_err(|e| error!(error = %e, "cannot build the route sync"))?;
        let bytes: usize = frames.iter().map(bytes::Bytes::len).sum();
        let paced = bytes > PACE_ABOVE_BYTES;
        Ok(Self {
            kind,
            frames,
            next: 0,
            held_after,
            paced,
            slot: None,
            send_at: (!paced).then(tokio::time::Instant::now),
        })
    }

    fn wants_slot(&self) -> bool {
        self.paced && self.slot.is_none()
    }

    fn on_slot(&mut self, ctx: &SessionParts, slot: tokio::sync::OwnedSemaphorePermit) {
        self.slot = Some(slot);
        self.schedule(ctx);
    }

    fn schedule(&mut self, ctx: &SessionParts) {
        let now = Instant::now();
        let at = match (self.paced, self.frames.get(self.next)) {
            (true, Some(chunk)) => ctx.routes.reserve(chunk.len(), now),
            _ => now,
        };
        self.send_at = Some(tokio::time::Instant::from_std(at));
    }

    /// Queues the next chunk on the writer; `Some(digest)` once the agent has been sent
    /// everything.
    fn enqueue_next(&mut self, ctx: &SessionParts, writer: &mut ControlWriter) -> Option<u64> {
        let Some(chunk) = self.frames.get(self.next) else {
            return Some(self.held_after);
        };
        let bytes = writer.enqueue_encoded(chunk.clone());
        ctx.metrics
            .route_sync_bytes
            .get_or_create(&crate::metrics::Outcome {
                outcome: self.kind.label().to_string(),
            })
            .inc_by(bytes as u64);
        self.next += 1;
        if self.next < self.frames.len() {
            self.schedule(ctx);
            return None;
        }
        HubMetrics::inc_outcome(&ctx.metrics.route_sync_batches, self.kind.label());
        Some(self.held_after)
    }
}

/// Bytes a session may have queued for its agent besides the route chunk in progress (pongs,
/// updates, renewal answers): an agent that stops reading its control stream cannot make the
/// hub buffer without bound.
const MAX_QUEUED_BYTES: usize = 256 * 1024;

/// A welcomed agent's session: the machine and what its actions are performed on.
struct Running {
    ctx: Arc<SessionParts>,
    entry: Arc<AgentEntry>,
    session: HubSession,
    reader: ControlReader,
    writer: ControlWriter,
    routes: Option<RouteSyncState>,
    /// The agent's datagram pump, stopped with the session.
    pump: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Runs the session until it ends, then forgets the agent. An `async` block, not an `async
    /// fn`: an `async fn` keeps its argument and the local it is moved to, this struct twice.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl std::future::Future<Output = ()> {
        async move {
            let reason = match self.pump().await {
                Ok(never) => match never {},
                Err(end) => end,
            };
            self.pump.abort();
            let (ctx, entry) = (&self.ctx, &self.entry);
            ctx.views.forget_pushed(entry.id);
            if ctx.registry.remove(&entry.node, entry.id, &reason) {
                ctx.metrics.agents_connected.set(ctx.registry.len() as i64);
                info!(node = %entry.node, reason = %reason, "agent disconnected");
            } else {
                debug!(node = %entry.node, reason = %reason, "replaced tunnel closed");
            }
        }
    }

    /// Performs every queued action; `Err` once the session is over.
    async fn perform(&mut self, ctx: &SessionParts) -> Result<(), SessionEnd> {
        while let Some(action) = self.session.poll_action() {
            match action {
                HubAction::Send(msg) => self.enqueue(&msg)?,
                HubAction::Sign { csr_der } => {
                    let result = self.sign(&csr_der);
                    self.session.renewal_signed(result);
                }
                HubAction::RenewalRateLimited => {
                    HubMetrics::inc_outcome(&ctx.metrics.renewals, "rate_limited")
                }
                HubAction::Close(close) => {
                    // Boxed: a session closes once, and its task should not carry the size of
                    // these futures for the days it runs.
                    Box::pin(async {
                        if !close.linger.is_zero() {
                            // The machine lingers only when it queued a message (a going-away)
                            // before the close: give it a moment to leave.
                            let _ = tokio::time::timeout(close.linger, self.writer.flush()).await;
                            self.writer.finish();
                        }
                        close_after_linger(&self.entry.connection, &close).await;
                    })
                    .await;
                }
                HubAction::Ended(end) => {
                    if matches!(end, HubSessionEnd::Left { .. }) {
                        ctx.metrics.going_away_sent.inc();
                    }
                    return Err(end.into());
                }
                // Only before the welcome.
                HubAction::Admitted(_) => {}
            }
        }
        Ok(())
    }

    /// Queues `msg` for the agent, unless too much is queued already (it stopped reading).
    fn enqueue(&mut self, msg: &ControlMessage) -> Result<(), SessionEnd> {
        let queued = self.writer.pending_bytes();
        if queued > MAX_QUEUED_BYTES + petrel_proto::MAX_CONTROL_FRAME {
            return Err(SessionEnd::NotReading(queued));
        }
        self.writer
            .enqueue(msg)
            .map(|_| ())
            .map_err(SessionEnd::Encode)
    }

    fn sign(&self, csr_der: &[u8]) -> Result<petrel_proto::CertBundle, petrel_proto::ErrorInfo> {
        let ctx = &*self.ctx;
        let result = ctx
            .signer
            .bundle(csr_der, &self.entry.node, SystemTime::now())
            .map_err(|e| petrel_proto::ErrorInfo {
                code: 1,
                message: e.to_string(),
            });
        match &result {
            Ok(_) => {
                info!(node = %self.entry.node, "renewed node certificate");
                HubMetrics::inc_outcome(&ctx.metrics.renewals, "ok");
            }
            Err(e) => {
                if ctx.log_budget.allow("certificate renewal refused") {
                    warn!(node = %self.entry.node, error = %e.message, "certificate renewal refused");
                }
                HubMetrics::inc_outcome(&ctx.metrics.renewals, "bad_csr");
            }
        }
        result
    }

    async fn pump(&mut self) -> Result<std::convert::Infallible, SessionEnd> {
        let ctx = self.ctx.clone();
        let ctx = &*ctx;
        let conn = self.entry.connection.clone();
        let mut outgoing = None;
        if let Some(r) = self.routes.as_mut() {
            r.changed.borrow_and_update();
            outgoing = Some(OutgoingSync::plan(ctx, r.held)?);
        }
        // One timer for both the machine's deadline and the next route chunk, moved rather than
        // built anew on every turn of the loop (a turn per ping: thousands a second per hub).
        let wake = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(wake);
        loop {
            self.perform(ctx).await?;
            let timer = deadline(
                self.session
                    .poll_timeout()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            // The next route chunk, once its time has come and the one before has gone out.
            let chunk_at = outgoing
                .as_ref()
                .and_then(|o: &OutgoingSync| o.send_at)
                .filter(|_| !self.writer.has_pending());
            let at = chunk_at.map_or(timer, |c| c.min(timer));
            if wake.deadline() != at {
                wake.as_mut().reset(at);
            }
            tokio::select! {
                // Reader first: a loop that wakes late (a busy hub) with the agent's message
                // waiting and the keepalive deadline past must count the message before the
                // keepalive declares the agent dead. An agent cannot starve the other branches
                // this way for long: what it makes the hub queue is capped (`MAX_QUEUED_BYTES`).
                biased;
                msg = self.reader.next() => match msg {
                    Ok(Some(msg)) => self.session.handle_message(msg, Instant::now()),
                    Ok(None) => self.session.handle_finished(),
                    Err(StreamError::Decode(e)) => self.session.handle_malformed(e),
                    Err(e) => return Err(SessionEnd::Stream(e)),
                },
                cmd = self.entry.commands.recv() => match cmd {
                    SessionCommand::Leave(going_away) => self.session.leave(going_away),
                    SessionCommand::Send(msg) => { self.session.push(*msg); }
                },
                () = &mut wake => {
                    let now = tokio::time::Instant::now();
                    if now >= timer {
                        self.session.handle_timeout(Instant::now());
                    }
                    if chunk_at.is_some_and(|c| now >= c) {
                        if let Some(held) = outgoing.as_mut().and_then(|o| o.enqueue_next(ctx, &mut self.writer)) {
                            if let Some(r) = self.routes.as_mut() {
                                r.held = held;
                            }
                            outgoing = None;
                        }
                    }
                },
                // A change is planned only once the sync in progress is done: the plan then
                // starts from the table that one left the agent with (a delta, not another
                // snapshot).
                Ok(()) = async {
                    match self.routes.as_mut() {
                        Some(r) => r.changed.changed().await,
                        None => std::future::pending().await,
                    }
                }, if outgoing.is_none() => {
                    if let Some(r) = self.routes.as_mut() {
                        r.changed.borrow_and_update();
                        outgoing = Some(OutgoingSync::plan(ctx, r.held)?);
                    }
                },
                slot = ctx.routes.slot(), if outgoing.as_ref().is_some_and(OutgoingSync::wants_slot) => {
                    if let Some(o) = outgoing.as_mut() {
                        o.on_slot(ctx, slot);
                    }
                },
                // Whatever is queued drains while the loop keeps reading (pings stay answered
                // and the keepalive sees them) however slowly the agent reads.
                written = self.writer.write_pending(), if self.writer.has_pending() => if let Err(e) = written { return Err(SessionEnd::Stream(e)) },
                closed = conn.closed() => return Err(SessionEnd::Connection(closed)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_replaces_control_and_non_ascii() {
        assert_eq!(printable("0.1.0"), "0.1.0");
        assert_eq!(
            printable("1.0\nlevel=ERROR forged\x1b[31m"),
            "1.0?level=ERROR forged?[31m"
        );
        assert_eq!(printable("v\u{e9}"), "v?");
    }
}
