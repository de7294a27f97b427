//! Direct site-to-site paths (issue 15): the agent's side of what the hub offers
//! (`ControlMessage::PeerOffer`). One task per offered peer drives that peer's
//! [`DirectPath`] (offered, punching, direct, lost, backoff): it dials or accepts a QUIC
//! connection on the tunnel's own UDP socket (so the NAT mapping the hub saw is the one the
//! peer reaches), authenticates the peer by its node certificate, tells the data plane to send
//! the peer's frames over it, delivers what arrives after the hub switch's checks, and goes back
//! to the hub at once when the connection closes, stops answering, the peer leaves the hub's
//! view (or its routes change), or its certificate expires.
//!
//! Roles are fixed so that there is one connection per pair: the node whose name sorts lower
//! dials; the other accepts, and while punching it also dials once without using the result,
//! because its first packet toward the dialer is what opens its own NAT for the dialer's
//! retransmitted Initial. Before anything else, an incoming handshake must come from the exact
//! address of a peer this agent was offered and is punching to as the accepting end; anything
//! else is ignored without state and counted (`petrel_agent_peer_refused_total`). A handshake
//! that passes is first sent a QUIC Retry (stateless), so a spoofed Initial from that address
//! never holds the peer's one accept slot.
//!
//! Punches start only on offers, which the hub sends both ends at once; a peer not offered
//! for [`FORGET_AFTER`] and not direct is forgotten (its task ends).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use petrel_proto::control::PeerOffer;
use petrel_proto::direct::{DirectPath, PathAction, Route};
use petrel_transport::peer_tls::{self, PEER_SERVER_NAME};
use petrel_transport::quic::{self, CongestionControl};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::dataplane::{AgentDataplane, PeerAuthority};
use crate::hub_choice::SilenceWatch;
use crate::identity::Identity;
use crate::metrics::DirectMetrics;

/// Peers one agent keeps a path state for; offers beyond are refused (`too_many_peers`).
pub const MAX_PEERS: usize = 256;
/// A peer neither direct nor offered for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How often a direct connection's counters are read for silence (and its status row).
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// Events waiting for one peer's task.
const EVENT_QUEUE: usize = 8;

/// One peer's row in the agent's status.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct PeerPathStatus {
    pub peer: String,
    /// `direct`, `punching`, `hub` (backing off or idle).
    pub path: String,
    /// The address the hub saw the peer's tunnel come from (the last offer).
    pub offered_addr: String,
    pub rtt_ms: Option<f64>,
    /// UDP payload bytes on the direct connection while it was up (the last one).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Direct attempts that failed or were lost in a row.
    pub failures: u32,
    pub direct_since_unix: Option<u64>,
    /// The largest VXLAN frame the direct path takes now (its path MTU as QUIC has discovered
    /// it, less the datagram's overhead); larger frames go through the hub.
    pub max_frame: Option<u64>,
}

/// What a peer's task needs from the rest of the agent; given with each offer, so that a
/// renewed certificate or a reopened data plane is used from the next punch on.
#[derive(Clone)]
pub struct PeerContext {
    pub dataplane: Arc<AgentDataplane>,
    pub identity: Arc<Identity>,
    pub congestion: CongestionControl,
}

enum PeerEvent {
    Offer {
        addr: SocketAddr,
        endpoint: quinn::Endpoint,
        ctx: PeerContext,
    },
    Incoming(Box<quinn::Incoming>),
    /// The hub's view changed: the peer's authority may have.
    Recheck,
}

struct PeerHandle {
    events: mpsc::Sender<PeerEvent>,
    /// The address being punched to (canonical), for the accept filter.
    addr: Arc<Mutex<Option<SocketAddr>>>,
    /// Set by the task while it punches as the accepting end.
    accepting: Arc<std::sync::atomic::AtomicBool>,
    status: Arc<Mutex<PeerPathStatus>>,
}

type Peers = Arc<Mutex<HashMap<String, PeerHandle>>>;

/// Every offered peer of this agent.
pub struct DirectPaths {
    node: String,
    peers: Peers,
    metrics: DirectMetrics,
}

impl std::fmt::Debug for DirectPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectPaths")
            .field("node", &self.node)
            .finish()
    }
}

/// Whether this node dials `peer` (the lower name dials, the other accepts).
pub fn dials(me: &str, peer: &str) -> bool {
    me < peer
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl DirectPaths {
    pub fn new(node: &str, metrics: DirectMetrics) -> Self {
        Self {
            node: node.to_string(),
            peers: Arc::new(Mutex::new(HashMap::new())),
            metrics,
        }
    }

    /// The hub offered `offer` on the link whose socket is `endpoint`.
    pub fn offered(&self, offer: PeerOffer, endpoint: &quinn::Endpoint, ctx: PeerContext) {
        if offer.node == self.node {
            return;
        }
        let addr = canonical(offer.socket_addr());
        let Ok(mut peers) = self.peers.lock() else {
            return;
        };
        if !peers.contains_key(&offer.node) {
            if peers.len() >= MAX_PEERS {
                self.metrics.refuse("too_many_peers", 1);
                return;
            }
            let (tx, rx) = mpsc::channel(EVENT_QUEUE);
            let status = Arc::new(Mutex::new(PeerPathStatus {
                peer: offer.node.clone(),
                path: "hub".into(),
                ..Default::default()
            }));
            let accepting = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let target_addr = Arc::new(Mutex::new(None));
            let task = PeerTask {
                me: self.node.clone(),
                peer: offer.node.clone(),
                peers: self.peers.clone(),
                status: status.clone(),
                accepting: accepting.clone(),
                target_addr: target_addr.clone(),
                metrics: self.metrics.clone(),
                path: DirectPath::new(),
                target: None,
                current: None,
                opener: None,
                last_offer: Instant::now(),
            };
            tokio::spawn(task.run(rx));
            peers.insert(
                offer.node.clone(),
                PeerHandle {
                    events: tx,
                    addr: target_addr,
                    accepting,
                    status,
                },
            );
        }
        let Some(h) = peers.get(&offer.node) else {
            return;
        };
        if let Ok(mut s) = h.status.lock() {
            s.offered_addr = addr.to_string();
        }
        let _ = h.events.try_send(PeerEvent::Offer {
            addr,
            endpoint: endpoint.clone(),
            ctx,
        });
    }

    /// The hub's view changed: every peer re-derives what its frames must carry, and a peer no
    /// longer in the view (or whose VtepMAC or pod CIDRs changed) is no longer direct.
    pub fn view_changed(&self) {
        if let Ok(peers) = self.peers.lock() {
            for h in peers.values() {
                let _ = h.events.try_send(PeerEvent::Recheck);
            }
        }
    }

    /// A handshake arrived on a tunnel socket: passed to the peer it comes from if this agent
    /// is that peer's accepting end and is punching to it; else ignored (no state) and counted.
    pub fn incoming(&self, incoming: quinn::Incoming) {
        let from = canonical(incoming.remote_address());
        let found = self.peers.lock().ok().and_then(|peers| {
            peers
                .iter()
                .find(|(_, h)| h.addr.lock().ok().and_then(|a| *a) == Some(from))
                .map(|(peer, h)| {
                    (
                        dials(&self.node, peer),
                        h.accepting.load(std::sync::atomic::Ordering::Relaxed),
                        h.events.clone(),
                    )
                })
        });
        match found {
            // The peer's own Initials while it punches toward us, the dialing end: expected,
            // and what opened its NAT.
            Some((true, _, _)) => incoming.ignore(),
            Some((false, true, events)) => {
                match events.try_send(PeerEvent::Incoming(Box::new(incoming))) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(PeerEvent::Incoming(i)))
                    | Err(mpsc::error::TrySendError::Closed(PeerEvent::Incoming(i))) => {
                        i.ignore();
                        self.metrics.refuse("busy", 1);
                    }
                    Err(_) => {}
                }
            }
            Some((false, false, _)) | None => {
                debug!(%from, "handshake on the tunnel socket from no peer being punched; ignored");
                incoming.ignore();
                self.metrics.refuse("not_offered", 1);
            }
        }
    }

    /// Serves handshakes arriving on a link's socket until the endpoint closes (the caller
    /// aborts it when the link's session ends).
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            self.incoming(incoming);
        }
    }

    /// Sets the configuration that lets `endpoint` (a link's client endpoint) accept peers,
    /// with `id`'s certificate (again after a renewal).
    pub fn listen_on(
        endpoint: &quinn::Endpoint,
        id: &Identity,
        congestion: CongestionControl,
    ) -> Result<(), petrel_transport::tls::TlsConfigError> {
        let tls = peer_tls::peer_listener_tls(&id.ca_der, vec![id.cert_der.clone()], id.key_der())?;
        let mut server = quic::server_config(tls, &peer_tls::peer_tuning(congestion))?;
        // Peers punch one at a time; a tunnel socket never holds many half-open handshakes.
        server.max_incoming(16);
        endpoint.set_server_config(Some(server));
        Ok(())
    }

    pub fn status(&self) -> Vec<PeerPathStatus> {
        let mut rows: Vec<PeerPathStatus> = self
            .peers
            .lock()
            .map(|p| {
                p.values()
                    .filter_map(|h| h.status.lock().ok().map(|s| s.clone()))
                    .collect()
            })
            .unwrap_or_default();
        rows.sort_by(|a, b| a.peer.cmp(&b.peer));
        rows
    }
}

/// The direct connection of a peer while it is up.
struct Established {
    conn: quinn::Connection,
    authority: PeerAuthority,
    dataplane: Arc<AgentDataplane>,
    receiver: tokio::task::JoinHandle<()>,
    watch: SilenceWatch,
    /// The peer's certificate expires: the path ends then.
    peer_not_after: Option<SystemTime>,
    status: Arc<Mutex<PeerPathStatus>>,
}

struct Target {
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    ctx: PeerContext,
}

/// One peer's path, driven by its own task.
struct PeerTask {
    me: String,
    peer: String,
    peers: Peers,
    status: Arc<Mutex<PeerPathStatus>>,
    accepting: Arc<std::sync::atomic::AtomicBool>,
    /// The address being punched to, shared with the accept filter.
    target_addr: Arc<Mutex<Option<SocketAddr>>>,
    metrics: DirectMetrics,
    path: DirectPath,
    /// Where the current or last punch went: pinned for a punch (a later offer, say from
    /// another hub with another socket's mapping, waits for the next punch).
    target: Option<Target>,
    current: Option<Established>,
    /// The accepting end's own dial while punching: never used, only sent (its Initials open
    /// this end's NAT toward the dialer).
    opener: Option<quinn::Connecting>,
    last_offer: Instant,
}

/// Why a dial or an accept gave no connection.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    /// The dialer's certificate names another node than the offered peer.
    #[error("the dialer is {seen:?}, the offered peer is {offered}")]
    WrongPeer {
        seen: Option<String>,
        offered: String,
    },
    #[error("{0}")]
    Failed(String),
}

type Attempt = BoxFuture<'static, Result<quinn::Connection, AttemptError>>;

impl PeerTask {
    async fn run(mut self, mut events: mpsc::Receiver<PeerEvent>) {
        let mut attempt: Option<Attempt> = None;
        loop {
            let timeout = self.path.next_timeout();
            let forget_at = (self.current.is_none() && !self.path.is_punching())
                .then_some(self.last_offer + FORGET_AFTER);
            tokio::select! {
                ev = events.recv() => match ev {
                    None => break,
                    Some(PeerEvent::Offer { addr, endpoint, ctx }) => {
                        self.last_offer = Instant::now();
                        if let Some(a) = self.path.offered(Instant::now()) {
                            self.target = Some(Target { addr, endpoint, ctx });
                            self.act(a, &mut attempt);
                        }
                    }
                    Some(PeerEvent::Incoming(incoming)) => {
                        if self.current.is_some() || attempt.is_some() || !self.path.is_punching() {
                            incoming.ignore();
                            self.metrics.refuse("busy", 1);
                        } else if !incoming.remote_address_validated() {
                            // Stateless: only a source that receives at this address comes
                            // back, so a spoofed Initial never takes the accept slot.
                            if let Err(e) = incoming.retry() {
                                e.into_incoming().ignore();
                            }
                        } else {
                            attempt = Some(accept(*incoming, self.peer.clone()));
                        }
                    }
                    Some(PeerEvent::Recheck) => self.recheck(),
                },
                r = next_attempt(&mut attempt), if attempt.is_some() => {
                    attempt = None;
                    match r {
                        Ok(conn) => self.established(conn),
                        Err(e @ AttemptError::WrongPeer { .. }) => {
                            warn!(peer = %self.peer, error = %e, "refused a forged peer");
                            self.metrics.refuse("wrong_peer", 1);
                        }
                        // The punch timeout decides; the accepting end may still be reached.
                        Err(e) => debug!(peer = %self.peer, error = %e, "direct attempt failed"),
                    }
                }
                _ = sleep_until(timeout), if timeout.is_some() => {
                    if let Some(a) = self.path.poll(Instant::now()) {
                        self.act(a, &mut attempt);
                    }
                    self.show();
                }
                _ = sleep_until(forget_at), if forget_at.is_some() => break,
                why = silent_or_closed(self.current.as_mut()), if self.current.is_some() => {
                    warn!(peer = %self.peer, why, "direct path lost; its frames go through the hub");
                    self.metrics.attempt("lost");
                    self.drop_current();
                    self.path.failed(Instant::now());
                    self.show();
                }
            }
        }
        self.drop_current();
        self.stop_punching();
        // Forget this peer (unless a newer task took its place).
        if let Ok(mut peers) = self.peers.lock() {
            if peers
                .get(&self.peer)
                .is_some_and(|h| Arc::ptr_eq(&h.status, &self.status))
            {
                peers.remove(&self.peer);
            }
        }
    }

    /// Performs what the path state machine asks.
    fn act(&mut self, action: PathAction, attempt: &mut Option<Attempt>) {
        match action {
            PathAction::Punch => self.punch(attempt),
            PathAction::GiveUp => {
                *attempt = None;
                self.stop_punching();
                self.metrics.attempt("failed");
                info!(peer = %self.peer, "no direct path (punch timed out); its frames stay on the hub");
            }
            PathAction::Route(Route::Hub) => self.drop_current(),
            PathAction::Route(Route::Direct) => {}
        }
        self.show();
    }

    fn punch(&mut self, attempt: &mut Option<Attempt>) {
        *attempt = None;
        self.stop_punching();
        let Some(t) = self.target.as_ref() else {
            return;
        };
        let client = peer_tls::peer_dialer_tls(
            &t.ctx.identity.ca_der,
            vec![t.ctx.identity.cert_der.clone()],
            t.ctx.identity.key_der(),
            &self.peer,
        )
        .map_err(|e| e.to_string())
        .and_then(|tls| {
            quic::client_config(tls, &peer_tls::peer_tuning(t.ctx.congestion))
                .map_err(|e| e.to_string())
        });
        let connecting = client.and_then(|c| {
            t.endpoint
                .connect_with(c, t.addr, PEER_SERVER_NAME)
                .map_err(|e| e.to_string())
        });
        let connecting = match connecting {
            Ok(c) => c,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "cannot dial the peer");
                return;
            }
        };
        if let Ok(mut a) = self.target_addr.lock() {
            *a = Some(t.addr);
        }
        debug!(peer = %self.peer, addr = %t.addr, dials = dials(&self.me, &self.peer), "punching");
        if dials(&self.me, &self.peer) {
            *attempt = Some(
                async move {
                    connecting
                        .await
                        .map_err(|e| AttemptError::Failed(e.to_string()))
                }
                .boxed(),
            );
        } else {
            self.opener = Some(connecting);
            self.accepting
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Not punching any more: the opener goes, the accept filter closes.
    fn stop_punching(&mut self) {
        self.opener = None;
        self.accepting
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// A connection to the peer completed (dialed, or accepted and named): frames go there.
    fn established(&mut self, conn: quinn::Connection) {
        self.stop_punching();
        let Some(t) = self.target.as_ref() else {
            conn.close(0u32.into(), b"no offer");
            return;
        };
        // The peer's frames must carry its VtepMAC and pod addresses, from the hub's routes.
        let Some(authority) = t.ctx.dataplane.peer_authority(&self.peer) else {
            self.metrics.refuse("unknown_peer", 1);
            conn.close(0u32.into(), b"unknown peer");
            return;
        };
        let dataplane = t.ctx.dataplane.clone();
        if self.path.established(Instant::now()).is_none() {
            conn.close(0u32.into(), b"already direct");
            return;
        }
        self.metrics.attempt("established");
        self.metrics.direct.inc();
        info!(peer = %self.peer, remote = %conn.remote_address(), rtt_ms = conn.rtt().as_secs_f64() * 1000.0, "direct path up");
        dataplane.set_peer_route(authority.mac, Some(conn.clone()));
        let receiver = tokio::spawn(receive(
            conn.clone(),
            dataplane.clone(),
            authority.clone(),
            self.metrics.clone(),
        ));
        if let Ok(mut s) = self.status.lock() {
            s.direct_since_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
        }
        let peer_not_after = petrel_transport::tls::peer_certificates(&conn)
            .and_then(|c| c.first().cloned())
            .and_then(|c| petrel_transport::pki::CertInfo::parse(&c).ok())
            .map(|i| i.not_after);
        self.current = Some(Established {
            conn,
            authority,
            dataplane,
            receiver,
            watch: SilenceWatch::default(),
            peer_not_after,
            status: self.status.clone(),
        });
        self.show();
    }

    /// The hub's view changed: a direct peer whose authority changed or that left the view
    /// goes back to the hub (and is punched again on an offer).
    fn recheck(&mut self) {
        let Some(e) = self.current.as_ref() else {
            return;
        };
        let now = e.dataplane.peer_authority(&self.peer);
        if now.as_ref() == Some(&e.authority) {
            return;
        }
        info!(peer = %self.peer, "the peer's routes changed or it left the view; its direct path ends");
        self.metrics.attempt("lost");
        self.drop_current();
        self.path.failed(Instant::now());
        self.show();
    }

    /// Frames go through the hub again; the connection is closed.
    fn drop_current(&mut self) {
        if let Some(e) = self.current.take() {
            e.dataplane.set_peer_route(e.authority.mac, None);
            e.receiver.abort();
            e.conn.close(0u32.into(), b"direct path dropped");
            self.metrics.direct.dec();
        }
    }

    /// Refreshes the status row.
    fn show(&self) {
        let Ok(mut s) = self.status.lock() else {
            return;
        };
        s.failures = self.path.failures;
        s.path = match self.path.route() {
            Route::Direct => "direct",
            Route::Hub if self.path.is_punching() => "punching",
            Route::Hub => "hub",
        }
        .into();
        match &self.current {
            Some(e) => fill(&mut s, &e.conn),
            None => {
                s.direct_since_unix = None;
                s.max_frame = None;
            }
        }
    }
}

/// A direct connection's RTT and bytes into its status row.
fn fill(s: &mut PeerPathStatus, conn: &quinn::Connection) {
    let st = conn.stats();
    s.max_frame = conn
        .max_datagram_size()
        .map(|m| m.saturating_sub(petrel_proto::DATAGRAM_OVERHEAD) as u64);
    s.rtt_ms = Some(conn.rtt().as_secs_f64() * 1000.0);
    s.bytes_sent = st.udp_tx.bytes;
    s.bytes_received = st.udp_rx.bytes;
}

/// The accepting end's half of a punch: the handshake, then the dialer's name must be the peer.
fn accept(incoming: quinn::Incoming, peer: String) -> Attempt {
    async move {
        let failed = |e: &dyn std::fmt::Display| AttemptError::Failed(e.to_string());
        let conn = incoming
            .accept()
            .map_err(|e| failed(&e))?
            .await
            .map_err(|e| failed(&e))?;
        match petrel_transport::tls::peer_node_name(&conn) {
            Some(n) if n == peer => Ok(conn),
            seen => {
                conn.close(0u32.into(), b"not the offered peer");
                Err(AttemptError::WrongPeer {
                    seen,
                    offered: peer,
                })
            }
        }
    }
    .boxed()
}

/// The attempt in flight (pending forever without one; the branch is guarded anyway).
async fn next_attempt(attempt: &mut Option<Attempt>) -> Result<quinn::Connection, AttemptError> {
    match attempt.as_mut() {
        Some(a) => a.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the direct connection closes, stops answering what it is sent (its
/// keepalives every `PEER_KEEP_ALIVE` guarantee there is something to answer) or its peer's
/// certificate expires. Keeps its status row current meanwhile.
async fn silent_or_closed(current: Option<&mut Established>) -> &'static str {
    let Some(e) = current else {
        return std::future::pending().await;
    };
    let conn = e.conn.clone();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    let closed = conn.closed();
    let mut closed: Pin<&mut _> = std::pin::pin!(closed);
    loop {
        tokio::select! {
            _ = &mut closed => return "closed",
            _ = tick.tick() => {
                let st = conn.stats();
                let eliciting = st.frame_tx.datagram + st.frame_tx.ping;
                if e.watch.observe(eliciting, st.udp_rx.datagrams, conn.rtt(), std::time::Instant::now()) {
                    return "silent";
                }
                if e.peer_not_after.is_some_and(|t| SystemTime::now() >= t) {
                    return "the peer's certificate expired";
                }
                if let Ok(mut s) = e.status.lock() {
                    fill(&mut s, &conn);
                }
            }
        }
    }
}

/// Delivers what the peer sends, checked, until the connection ends.
async fn receive(
    conn: quinn::Connection,
    dataplane: Arc<AgentDataplane>,
    authority: PeerAuthority,
    metrics: DirectMetrics,
) {
    while let Ok(d) = conn.read_datagram().await {
        let refused = dataplane.deliver_from_peer(&conn, d, &authority).await;
        if refused > 0 {
            metrics.refuse("peer_frame", refused);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::metrics::Reason;
    use petrel_transport::pki::{CertInfo, CertificateAuthority, NodeKey};

    #[test]
    fn exactly_one_end_of_a_pair_dials() {
        assert!(dials("edge-a1", "edge-b1"));
        assert!(!dials("edge-b1", "edge-a1"));
        assert!(!dials("edge-a1", "edge-a1"));
    }

    fn identity(ca: &CertificateAuthority, name: &str) -> Identity {
        let key = NodeKey::generate().unwrap();
        let cert = ca
            .sign_node_csr(
                &key.csr_der(name).unwrap(),
                name,
                SystemTime::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        Identity {
            info: CertInfo::parse(&cert).unwrap(),
            key,
            cert_der: cert,
            ca_der: ca.cert_der().clone(),
        }
    }

    /// An endpoint on loopback that accepts peers as a tunnel socket does.
    fn listener(id: &Identity) -> quinn::Endpoint {
        let ep = quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        DirectPaths::listen_on(&ep, id, CongestionControl::default()).unwrap();
        ep
    }

    fn endpoint() -> quinn::Endpoint {
        quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    /// A dial in the background; dropped, it stops (no retransmitted Initial reaches a later
    /// step of the test).
    struct Dialing(tokio::task::JoinHandle<()>);

    impl Drop for Dialing {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// `dialer` dials `to` from `from` (expecting the listener to be `listener_name`); the
    /// listener's incoming handshake.
    async fn dial(
        dialer: &Identity,
        from: &quinn::Endpoint,
        listener_name: &str,
        to: &quinn::Endpoint,
    ) -> (quinn::Incoming, Dialing) {
        let tls = peer_tls::peer_dialer_tls(
            &dialer.ca_der,
            vec![dialer.cert_der.clone()],
            dialer.key_der(),
            listener_name,
        )
        .unwrap();
        let cfg =
            quic::client_config(tls, &peer_tls::peer_tuning(CongestionControl::default())).unwrap();
        let connecting = from
            .connect_with(cfg, to.local_addr().unwrap(), PEER_SERVER_NAME)
            .unwrap();
        // Driven in the background: the listener decides.
        let task = Dialing(tokio::spawn(async move {
            let _ = connecting.await;
        }));
        let incoming = tokio::time::timeout(Duration::from_secs(5), to.accept())
            .await
            .unwrap()
            .unwrap();
        (incoming, task)
    }

    /// A peer entry as `offered` makes it, with its events kept by the test instead of a task.
    fn register(
        paths: &DirectPaths,
        peer: &str,
        addr: SocketAddr,
        accepting: bool,
    ) -> mpsc::Receiver<PeerEvent> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        paths.peers.lock().unwrap().insert(
            peer.into(),
            PeerHandle {
                events: tx,
                addr: Arc::new(Mutex::new(Some(addr))),
                accepting: Arc::new(std::sync::atomic::AtomicBool::new(accepting)),
                status: Arc::default(),
            },
        );
        rx
    }

    fn refused(m: &DirectMetrics, reason: &str) -> u64 {
        m.refused
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .get()
    }

    #[tokio::test]
    async fn only_the_offered_peer_is_accepted() {
        petrel_transport::tls::install_default_provider();
        let ca = CertificateAuthority::generate(
            "test ca",
            SystemTime::now(),
            Duration::from_secs(86_400),
        )
        .unwrap();
        // edge-b1 accepts (it sorts after edge-a1, which dials).
        let me = identity(&ca, "edge-b1");
        let ep = listener(&me);
        let metrics = DirectMetrics::default();
        let paths = DirectPaths::new("edge-b1", metrics.clone());
        let forger = identity(&ca, "edge-c1");
        let real = identity(&ca, "edge-a1");
        let (a_socket, other_socket) = (endpoint(), endpoint());
        // Ignored dials stay alive to the end: dropping one sends a close in an Initial packet,
        // which the listener would take for a new handshake. (Their retransmissions come
        // after ~300 ms; this test takes a few milliseconds.)
        let mut keep = Vec::new();

        // Nobody offered: a handshake from anywhere is ignored without state, and counted.
        let (incoming, d) = dial(&forger, &a_socket, "edge-b1", &ep).await;
        paths.incoming(incoming);
        keep.push(d);
        assert_eq!(refused(&metrics, "not_offered"), 1);

        // edge-a1 offered at a_socket's address, not punching yet: ignored.
        let mut rx = register(&paths, "edge-a1", a_socket.local_addr().unwrap(), false);
        let (incoming, d) = dial(&real, &a_socket, "edge-b1", &ep).await;
        paths.incoming(incoming);
        keep.push(d);
        assert_eq!(refused(&metrics, "not_offered"), 2, "not punching yet");
        assert!(rx.try_recv().is_err());
        // Punching as the accepting end: only the exact offered address gets through.
        let mut rx = register(&paths, "edge-a1", a_socket.local_addr().unwrap(), true);
        let (incoming, d) = dial(&real, &other_socket, "edge-b1", &ep).await;
        paths.incoming(incoming);
        keep.push(d);
        assert_eq!(refused(&metrics, "not_offered"), 3, "same IP, another port");
        assert!(rx.try_recv().is_err());
        let (incoming, _forged) = dial(&forger, &a_socket, "edge-b1", &ep).await;
        paths.incoming(incoming);
        let Some(PeerEvent::Incoming(incoming)) = rx.try_recv().ok() else {
            panic!("the handshake was not passed to the peer's task");
        };
        // The address matched, but the certificate is edge-c1's: the handshake completes and
        // the peer is refused by name.
        match accept(*incoming, "edge-a1".into()).await {
            Err(AttemptError::WrongPeer { seen, offered }) => {
                assert_eq!(seen.as_deref(), Some("edge-c1"));
                assert_eq!(offered, "edge-a1");
            }
            other => panic!("a forged peer was accepted: {other:?}"),
        }
        // The real edge-a1 is accepted.
        let (incoming, _real) = dial(&real, &a_socket, "edge-b1", &ep).await;
        paths.incoming(incoming);
        let Some(PeerEvent::Incoming(incoming)) = rx.try_recv().ok() else {
            panic!("the handshake was not passed to the peer's task");
        };
        let conn = accept(*incoming, "edge-a1".into()).await.unwrap();
        assert_eq!(
            petrel_transport::tls::peer_node_name(&conn).as_deref(),
            Some("edge-a1")
        );
        // The dialing end (edge-a1's view of edge-b1) never accepts: the peer's Initials are
        // its punch toward us, ignored and not counted as refusals.
        let paths_a = DirectPaths::new("edge-a1", metrics.clone());
        let mut rx = register(&paths_a, "edge-b1", a_socket.local_addr().unwrap(), true);
        let (incoming, d) = dial(&real, &a_socket, "edge-b1", &ep).await;
        paths_a.incoming(incoming);
        keep.push(d);
        assert!(rx.try_recv().is_err());
        assert_eq!(refused(&metrics, "not_offered"), 3);
    }
}
