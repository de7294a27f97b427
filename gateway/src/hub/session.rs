//! One agent's tunnel session on the hub: admission (certificate name, inventory, the agent's
//! Hello), the Welcome with the hub's view, then the control loop: keepalive pings and RTT,
//! certificate renewal, going-away, and commands from the hub (leave, push an update).
//!
//! Identity comes only from the verified client certificate; what the Hello says about the node
//! is compared with it and with the inventory, and a mismatch is refused, not believed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use petrel_proto::{
    ControlMessage, GoingAway, GoingAwayReason, Hello, HubView, Keepalive, KeepaliveAction,
    RenewResponse, Welcome, ALPN_TUNNEL,
};
use petrel_transport::close_code;
use petrel_transport::control_stream::{ControlReader, ControlWriter, StreamError};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::registry::{AgentCounters, AgentEntry, SessionCommand};
use super::route_sync::{PlanKind, PACE_ABOVE_BYTES};
use super::HubContext;
use crate::metrics::HubMetrics;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

fn refuse(ctx: &HubContext, conn: &quinn::Connection, reason: &'static str, message: String) {
    warn!(remote = %conn.remote_address(), reason, "tunnel refused: {message}");
    HubMetrics::inc_reason(&ctx.metrics.agent_refusals, reason);
    conn.close(close_code::UNAUTHORIZED.into(), message.as_bytes());
}

pub(super) async fn serve(ctx: Arc<HubContext>, conn: quinn::Connection) {
    let Some(node) = petrel_transport::tls::peer_node_name(&conn) else {
        refuse(&ctx, &conn, "no_client_certificate", "a client certificate from the Petrel CA is required for petrel/1; run `petrel-edge-agent join` first".into());
        return;
    };
    if !crate::revocation::admit_tunnel(&ctx, &conn, &node) {
        return;
    }
    let (site, keepalive_every) = {
        let Ok(inv) = ctx.inventory.read() else {
            return;
        };
        match inv.admit_agent(&node) {
            Ok((_, site)) => (site.name.clone(), ctx.config.keepalive),
            Err(e) => {
                drop(inv);
                refuse(
                    &ctx,
                    &conn,
                    "not_admitted",
                    format!("certificate names {node:?}, but {e}"),
                );
                return;
            }
        }
    };
    // The certificate is verified and its node admitted: from here on the tunnel gets windows
    // sized for what it carries instead of the pre-authentication budget.
    petrel_transport::quic::AuthenticatedLimits::default().apply(&conn);
    let opened = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, recv) = conn.accept_bi().await?;
        let mut reader = ControlReader::new(recv);
        let first = reader.next().await;
        Ok::<_, quinn::ConnectionError>((ControlWriter::new(send), reader, first))
    })
    .await;
    let (mut writer, mut reader, first) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            debug!(node = %node, error = %e, "agent left before its hello");
            return;
        }
        Err(_) => {
            refuse(
                &ctx,
                &conn,
                "no_hello",
                format!("no hello from {node:?} within {HELLO_TIMEOUT:?}"),
            );
            return;
        }
    };
    let hello = match first {
        Ok(Some(ControlMessage::Hello(h))) => h,
        Ok(Some(other)) => {
            refuse(
                &ctx,
                &conn,
                "protocol_error",
                format!("expected hello, got {}", other.name()),
            );
            return;
        }
        Ok(None) => return,
        Err(e) => {
            refuse(
                &ctx,
                &conn,
                "protocol_error",
                format!("malformed hello: {e}"),
            );
            return;
        }
    };
    if let Err(message) = check_hello(&hello, &node) {
        let reason = if hello.node_name != node {
            "identity_mismatch"
        } else {
            "protocol_error"
        };
        let _ = writer
            .send(&ControlMessage::GoingAway(GoingAway {
                reason: GoingAwayReason::Unauthorized,
                retry_after_ms: 0,
                message: message.clone(),
            }))
            .await;
        writer.finish();
        // Let the going-away arrive before the close discards it; the close reason repeats it.
        let _ = tokio::time::timeout(Duration::from_millis(300), conn.closed()).await;
        refuse(&ctx, &conn, reason, message);
        return;
    }
    let epoch = ctx.view_epoch();
    let route_sync = hello.routes_digest.is_some();
    let view = ctx.hub_view(&node, route_sync);
    let digest = super::view_digest(&view);
    let welcome = Welcome {
        protocol_version: petrel_proto::PROTOCOL_VERSION,
        hub_id: ctx.config.hub_name.clone(),
        node_name: node.clone(),
        site: site.clone(),
        keepalive_interval_ms: u32::try_from(keepalive_every.as_millis()).unwrap_or(u32::MAX),
        view,
    };
    let sent = writer.send_counted(&ControlMessage::Welcome(welcome)).await;
    if let Ok(n) = sent {
        ctx.metrics.welcome_bytes.set(n as i64);
    }
    if let Err(e) = sent {
        match e {
            // The view does not fit a control frame: a hub-side limit, not the agent's doing.
            // Both sides must see why, or the agent retries forever against an empty reason.
            StreamError::Encode(e) => {
                let message = format!("the hub cannot send this node's view: {e}");
                error!(node = %node, "{message}");
                HubMetrics::inc_reason(&ctx.metrics.agent_refusals, "view_too_large");
                conn.close(close_code::PROTOCOL_ERROR.into(), message.as_bytes());
            }
            e => debug!(node = %node, error = %e, "agent left before the welcome"),
        }
        return;
    }

    let (commands, mut command_rx) = mpsc::channel(16);
    let entry = Arc::new(AgentEntry {
        id: ctx.registry.next_id(),
        node: node.clone(),
        site: site.clone(),
        agent_version: printable(&hello.agent_version),
        datapath: printable(&hello.self_view.datapath),
        since: SystemTime::now(),
        connection: conn.clone(),
        commands,
        counters: AgentCounters::default(),
        route_sync,
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
    ctx.record_pushed(entry.id, digest);
    if ctx.view_epoch() != epoch {
        ctx.refresh_agent(&entry);
    }
    if let Some(o) = ctx.observer.get() {
        o.connected(&entry);
    }
    let pump = tokio::spawn(super::dataplane::pump_agent(ctx.clone(), entry.clone()));

    let routes = hello.routes_digest.map(|held| RouteSyncState {
        held,
        changed: ctx.routes_changed.subscribe(),
    });
    let reason = control_loop(
        &ctx,
        &entry,
        &mut reader,
        &mut writer,
        &mut command_rx,
        routes,
    )
    .await;
    pump.abort();
    ctx.forget_pushed(entry.id);
    if ctx.registry.remove(&node, entry.id) {
        ctx.metrics.agents_connected.set(ctx.registry.len() as i64);
        info!(node = %node, reason = %reason, "agent disconnected");
        if let Some(o) = ctx.observer.get() {
            o.disconnected(&node, &reason);
        }
    } else {
        debug!(node = %node, reason = %reason, "replaced tunnel closed");
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

fn check_hello(hello: &Hello, cert_node: &str) -> Result<(), String> {
    petrel_proto::check_protocol_version(hello.protocol_version).map_err(|e| e.to_string())?;
    if hello.alpn.as_bytes() != ALPN_TUNNEL {
        return Err(format!(
            "hello names ALPN {:?}, expected {:?}",
            hello.alpn,
            String::from_utf8_lossy(ALPN_TUNNEL)
        ));
    }
    if hello.node_name != cert_node {
        return Err(format!(
            "the agent presents itself as {:?} but its certificate names {cert_node:?}; a certificate is valid only for its own node",
            hello.node_name
        ));
    }
    Ok(())
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
    fn plan(ctx: &HubContext, held: u64) -> Result<Self, String> {
        let planned = ctx
            .routes
            .read()
            .map_err(|_| "route table lock poisoned".to_string())
            .and_then(|r| r.plan_wire(held).map_err(|e| e.to_string()));
        let (kind, frames, held_after) = planned.map_err(|e| {
            error!(error = %e, "cannot build the route sync");
            format!("cannot build the route sync: {e}")
        })?;
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

    fn on_slot(&mut self, ctx: &HubContext, slot: tokio::sync::OwnedSemaphorePermit) {
        self.slot = Some(slot);
        self.schedule(ctx);
    }

    fn schedule(&mut self, ctx: &HubContext) {
        let now = Instant::now();
        let at = match (self.paced, self.frames.get(self.next)) {
            (true, Some(chunk)) => ctx
                .route_pacer
                .lock()
                .map(|mut p| p.reserve(chunk.len(), now))
                .unwrap_or(now),
            _ => now,
        };
        self.send_at = Some(tokio::time::Instant::from_std(at));
    }

    /// Queues the next chunk on the writer; `Some(digest)` once the agent has been sent
    /// everything.
    fn enqueue_next(&mut self, ctx: &HubContext, writer: &mut ControlWriter) -> Option<u64> {
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

/// Queues `msg` for the agent, unless too much is queued already (it stopped reading).
fn enqueue(writer: &mut ControlWriter, msg: &ControlMessage) -> Result<(), String> {
    if writer.pending_bytes() > MAX_QUEUED_BYTES + petrel_proto::MAX_CONTROL_FRAME {
        return Err(format!(
            "agent does not read its control stream: {} bytes queued",
            writer.pending_bytes()
        ));
    }
    writer.enqueue(msg).map(|_| ()).map_err(|e| e.to_string())
}

async fn control_loop(
    ctx: &HubContext,
    entry: &AgentEntry,
    reader: &mut ControlReader,
    writer: &mut ControlWriter,
    commands: &mut mpsc::Receiver<SessionCommand>,
    mut routes: Option<RouteSyncState>,
) -> String {
    let conn = &entry.connection;
    let mut outgoing = None;
    if let Some(r) = routes.as_mut() {
        r.changed.borrow_and_update();
        match OutgoingSync::plan(ctx, r.held) {
            Ok(o) => outgoing = Some(o),
            Err(e) => return e,
        }
    }
    let interval = ctx.config.keepalive;
    // Agents ping every couple of seconds; the hub probes only a quiet one (and each new one
    // once). `status` shows quinn's RTT, which is current whoever pings.
    let mut keepalive = Keepalive::when_quiet(interval, ctx.config.idle_timeout, Instant::now());
    let mut renewals = RenewalBudget::new(ctx.config.agent_cert_ttl);
    let mut deadline = tokio::time::Instant::now();
    loop {
        tokio::select! {
            // Reader first: a loop that wakes late (a busy hub) with the agent's message waiting
            // and the keepalive deadline past must count the message before the keepalive
            // declares the agent dead. An agent cannot starve the other branches this way for
            // long: what it makes the hub queue is capped (`MAX_QUEUED_BYTES`).
            biased;
            msg = reader.next() => {
                keepalive.on_receive(Instant::now());
                match msg {
                    Ok(Some(msg)) => if let Err(reason) = on_message(ctx, entry, &mut keepalive, &mut renewals, writer, msg).await { return reason },
                    Ok(None) => return "agent finished its control stream".into(),
                    Err(StreamError::Read(e)) => return format!("{e}"),
                    Err(e) => {
                        conn.close(close_code::PROTOCOL_ERROR.into(), e.to_string().as_bytes());
                        return format!("protocol error: {e}");
                    }
                }
            }
            cmd = commands.recv() => match cmd {
                Some(SessionCommand::Leave(ga)) => {
                    let why = ga.message.clone();
                    let code = if ga.reason == GoingAwayReason::Replaced { close_code::REPLACED } else { close_code::GOING_AWAY };
                    if writer.enqueue(&ControlMessage::GoingAway(ga)).is_ok() {
                        let _ = tokio::time::timeout(Duration::from_millis(500), writer.flush()).await;
                    }
                    ctx.metrics.going_away_sent.inc();
                    writer.finish();
                    // Give the agent a moment to read it and close first (its close is cleaner
                    // for both sides); then close anyway.
                    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
                    conn.close(code.into(), why.as_bytes());
                    return format!("going away: {why}");
                }
                Some(SessionCommand::Send(msg)) => if let Err(e) = enqueue(writer, &msg) { return e },
                None => return "hub dropped the session".into(),
            },
            _ = tokio::time::sleep_until(deadline) => match keepalive.poll(Instant::now()) {
                KeepaliveAction::SendPing(ping) => {
                    if let Err(e) = enqueue(writer, &ControlMessage::Ping(ping)) { return e }
                    deadline = tokio::time::Instant::now() + interval;
                }
                KeepaliveAction::TimedOut => {
                    conn.close(close_code::KEEPALIVE_TIMEOUT.into(), b"no keepalive answer");
                    return "keepalive timeout".into();
                }
                KeepaliveAction::Wait(at) => deadline = tokio::time::Instant::from_std(at),
            },
            // A change is planned only once the sync in progress is done: the plan then starts
            // from the table that one left the agent with (a delta, not another snapshot).
            Ok(()) = async {
                match routes.as_mut() {
                    Some(r) => r.changed.changed().await,
                    None => std::future::pending().await,
                }
            }, if outgoing.is_none() => {
                if let Some(r) = routes.as_mut() {
                    r.changed.borrow_and_update();
                    match OutgoingSync::plan(ctx, r.held) {
                        Ok(o) => outgoing = Some(o),
                        Err(e) => return e,
                    }
                }
            },
            Ok(slot) = ctx.route_sync_slots.clone().acquire_owned(), if outgoing.as_ref().is_some_and(OutgoingSync::wants_slot) => {
                if let Some(o) = outgoing.as_mut() {
                    o.on_slot(ctx, slot);
                }
            },
            // The next route chunk, once its time has come and the one before has gone out.
            _ = tokio::time::sleep_until(outgoing.as_ref().and_then(|o| o.send_at).unwrap_or(deadline)), if !writer.has_pending() && outgoing.as_ref().is_some_and(|o| o.send_at.is_some()) => {
                if let Some(o) = outgoing.as_mut() {
                    if let Some(held) = o.enqueue_next(ctx, writer) {
                        if let Some(r) = routes.as_mut() {
                            r.held = held;
                        }
                        outgoing = None;
                    }
                }
            },
            // Whatever is queued drains while the loop keeps reading (pings stay answered and
            // the keepalive sees them) however slowly the agent reads.
            written = writer.write_pending(), if writer.has_pending() => if let Err(e) = written { return e.to_string() },
            closed = conn.closed() => return closed.to_string(),
        }
    }
}

/// How often one tunnel may have its certificate renewed: an agent renews once per certificate
/// life (at two thirds of it), so more than one renewal per quarter of the TTL (at most a
/// minute apart) is a client spending the hub's signing work, and is refused with a reason.
#[derive(Debug)]
struct RenewalBudget {
    min_interval: Duration,
    last: Option<Instant>,
}

impl RenewalBudget {
    fn new(ttl: Duration) -> Self {
        Self {
            min_interval: (ttl / 4).min(Duration::from_secs(60)),
            last: None,
        }
    }

    /// Spends a renewal at `now`, or says how long until the next one is allowed.
    fn spend(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(last) = self.last {
            let since = now.saturating_duration_since(last);
            if since < self.min_interval {
                return Err(self.min_interval - since);
            }
        }
        self.last = Some(now);
        Ok(())
    }
}

async fn on_message(
    ctx: &HubContext,
    entry: &AgentEntry,
    keepalive: &mut Keepalive,
    renewals: &mut RenewalBudget,
    writer: &mut ControlWriter,
    msg: ControlMessage,
) -> Result<(), String> {
    match msg {
        ControlMessage::Ping(p) => enqueue(writer, &ControlMessage::Pong(p.pong())),
        ControlMessage::Pong(p) => {
            keepalive.on_pong(&p, Instant::now());
            Ok(())
        }
        ControlMessage::RenewRequest(_) if renewals.spend(Instant::now()).is_err() => {
            HubMetrics::inc_outcome(&ctx.metrics.renewals, "rate_limited");
            let message = format!(
                "renewal refused: this tunnel renewed less than {:?} ago",
                renewals.min_interval
            );
            enqueue(
                writer,
                &ControlMessage::RenewResponse(RenewResponse {
                    result: Err(petrel_proto::ErrorInfo { code: 2, message }),
                }),
            )
        }
        ControlMessage::RenewRequest(req) => {
            let result = ctx
                .ca
                .sign_node_csr(
                    &req.csr_der,
                    &entry.node,
                    SystemTime::now(),
                    ctx.config.agent_cert_ttl,
                )
                .map(|cert| petrel_proto::CertBundle {
                    cert_der: cert.to_vec(),
                    ca_der: ctx.ca.cert_der().to_vec(),
                })
                .map_err(|e| petrel_proto::ErrorInfo {
                    code: 1,
                    message: e.to_string(),
                });
            match &result {
                Ok(_) => {
                    info!(node = %entry.node, "renewed node certificate");
                    HubMetrics::inc_outcome(&ctx.metrics.renewals, "ok");
                }
                Err(e) => {
                    if ctx.log_budget.allow("certificate renewal refused") {
                        warn!(node = %entry.node, error = %e.message, "certificate renewal refused");
                    }
                    HubMetrics::inc_outcome(&ctx.metrics.renewals, "bad_csr");
                }
            }
            enqueue(
                writer,
                &ControlMessage::RenewResponse(RenewResponse { result }),
            )
        }
        ControlMessage::GoingAway(ga) => {
            Err(format!("agent going away: {:?} {}", ga.reason, ga.message))
        }
        ControlMessage::Unknown { msg_type } => {
            debug!(node = %entry.node, msg_type, "ignoring unknown optional control message");
            Ok(())
        }
        other @ (ControlMessage::Hello(_)
        | ControlMessage::Welcome(_)
        | ControlMessage::Update(_)
        | ControlMessage::Routes(_)
        | ControlMessage::RenewResponse(_)) => {
            entry.connection.close(
                close_code::PROTOCOL_ERROR.into(),
                format!("unexpected {} from agent", other.name()).as_bytes(),
            );
            Err(format!(
                "protocol error: unexpected {} from agent",
                other.name()
            ))
        }
    }
}

impl HubContext {
    /// What an agent on `node` is told: the gateways to dial, its routes (none for a
    /// route-sync agent: it derives them from the route table), its site's MTU.
    pub fn hub_view(&self, node: &str, route_sync: bool) -> HubView {
        let routes = if route_sync {
            Vec::new()
        } else {
            self.inventory
                .read()
                .map(|inv| inv.routes_for(node))
                .unwrap_or_default()
        };
        HubView {
            gateways: self.gateway_endpoints(),
            routes,
            site_mtu: self.config.site_mtu,
            egress: crate::egress::policy_for(self, node),
            site_mtus: self
                .inventory
                .read()
                .map(|inv| inv.site_mtus())
                .unwrap_or_default(),
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

    #[test]
    fn renewals_are_limited_per_tunnel() {
        let t0 = Instant::now();
        let mut b = RenewalBudget::new(Duration::from_secs(12));
        assert_eq!(b.min_interval, Duration::from_secs(3));
        assert_eq!(b.spend(t0), Ok(()));
        assert_eq!(
            b.spend(t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(2))
        );
        assert_eq!(b.spend(t0 + Duration::from_secs(3)), Ok(()));
        // A long TTL caps the interval at a minute.
        let b = RenewalBudget::new(Duration::from_secs(90 * 86400));
        assert_eq!(b.min_interval, Duration::from_secs(60));
    }
}
