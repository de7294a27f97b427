//! The hub's data-plane driver: moves VXLAN frames between agents' tunnels (QUIC datagrams) and
//! the cloud and Express Connect VTEPs (plain UDP: frames arrive on the relay port from the
//! nodes' `petrel.1` devices, and leave to each node's flannel.1 on 8472). Every decision is the
//! pure [`SwitchTable`]'s; this module does the I/O and the counting, over a [`Relay`] (the
//! sockets and table, the registry, the counters), not the whole hub.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt as _;
use petrel_proto::{VxlanFrame, DATAGRAM_KIND_VXLAN, DATAGRAM_OVERHEAD};
use petrel_transport::udp_batch::UdpBatch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::agent_registry::{AgentEntry, AgentRegistry, SessionCommand};
use crate::inventory::Inventory;
use crate::metrics::HubMetrics;
use crate::switch::{icmp, DropReason, Ingress, SwitchTable, Verdict};

/// Totals for `/status` (the metrics carry the same by label).
#[derive(Debug, Default)]
pub struct DataplaneStats {
    forwarded: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    dropped: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl DataplaneStats {
    fn bump(
        map: &std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
        key: &'static str,
    ) {
        Self::bump_by(map, key, 1);
    }

    fn bump_by(
        map: &std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
        key: &'static str,
        n: u64,
    ) {
        if let Ok(mut m) = map.lock() {
            *m.entry(key).or_default() += n;
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let read = |m: &std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>| {
            m.lock().map(|m| m.clone()).unwrap_or_default()
        };
        serde_json::json!({ "frames_forwarded": read(&self.forwarded), "frames_dropped": read(&self.dropped) })
    }
}

/// The relay sockets and the switching table.
#[derive(Debug)]
pub struct Dataplane {
    pub stats: DataplaneStats,
    /// Frames go out to VTEPs from the first (the underlay address by default); each receives.
    sockets: Vec<Arc<tokio::net::UdpSocket>>,
    table: RwLock<Arc<SwitchTable>>,
    local_node: Option<String>,
    vni: u32,
    flannel_port: u16,
    /// Cleared when a stopping hub hands its sites over (active-active): node roles take a hub
    /// that stops answering as gone and move its sites, while it still relays.
    answer_probes: std::sync::atomic::AtomicBool,
}

impl Dataplane {
    /// Stops (or resumes) answering relay liveness probes; frames are relayed either way.
    pub fn set_answering_probes(&self, answer: bool) {
        self.answer_probes
            .store(answer, std::sync::atomic::Ordering::SeqCst);
    }

    fn answers_probes(&self) -> bool {
        self.answer_probes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn new(
        sockets: Vec<tokio::net::UdpSocket>,
        inv: &Inventory,
        local_node: Option<String>,
        vni: u32,
        flannel_port: u16,
    ) -> Self {
        let table = SwitchTable::from_inventory(inv, local_node.as_deref(), vni, flannel_port);
        Self {
            stats: DataplaneStats::default(),
            sockets: sockets.into_iter().map(Arc::new).collect(),
            table: RwLock::new(Arc::new(table)),
            answer_probes: std::sync::atomic::AtomicBool::new(true),
            local_node,
            vni,
            flannel_port,
        }
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// The socket frames to VTEPs leave from.
    fn send_socket(&self) -> Option<&tokio::net::UdpSocket> {
        self.sockets.first().map(|s| &**s)
    }

    pub fn table(&self) -> Arc<SwitchTable> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Rebuilds the table after an inventory change.
    pub fn refresh(&self, inv: &Inventory) {
        let table = Arc::new(SwitchTable::from_inventory(
            inv,
            self.local_node.as_deref(),
            self.vni,
            self.flannel_port,
        ));
        if let Ok(mut t) = self.table.write() {
            *t = table;
        }
    }
}

fn count_drop(relay: &Relay, from_agent: Option<&AgentEntry>, reason: DropReason) {
    HubMetrics::inc_reason(&relay.metrics.datagrams_dropped, reason.label());
    DataplaneStats::bump(&relay.dp.stats.dropped, reason.label());
    if let Some(a) = from_agent {
        a.counters.count_drop(reason.label());
    }
}

/// Forwarded-frame counts of one pump, added to the metrics and `/status` in one go whenever the
/// pump has nothing more to read at once (and every [`FLUSH_EVERY`] frames), instead of taking
/// two locks and allocating a label per frame. Counters are exact whenever the hub is idle.
#[derive(Default)]
struct Forwarded {
    by_path: [u64; PATHS.len()],
    since_flush: u32,
}

/// Frames a data-plane loop handles before it yields to the scheduler.
const YIELD_EVERY: usize = 64;

const PATHS: [&str; 3] = ["agent_to_agent", "vtep_to_agent", "agent_to_vtep"];
const FLUSH_EVERY: u32 = 256;

impl Forwarded {
    fn count(&mut self, relay: &Relay, path: &'static str) {
        self.count_n(relay, path, 1);
    }

    fn count_n(&mut self, relay: &Relay, path: &'static str, n: usize) {
        if let Some(i) = PATHS.iter().position(|p| *p == path) {
            self.by_path[i] += n as u64;
        }
        self.since_flush = self
            .since_flush
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if self.since_flush >= FLUSH_EVERY {
            self.flush(relay);
        }
    }

    fn flush(&mut self, relay: &Relay) {
        self.since_flush = 0;
        for (i, n) in self.by_path.iter_mut().enumerate() {
            if *n == 0 {
                continue;
            }
            relay
                .metrics
                .frames_forwarded
                .get_or_create(&crate::metrics::Reason {
                    reason: PATHS[i].to_string(),
                })
                .inc_by(*n);
            DataplaneStats::bump_by(&relay.dp.stats.forwarded, PATHS[i], *n);
            *n = 0;
        }
    }
}

/// Hands `payload` (a VXLAN payload) to the agent `node`, or drops it with ICMP frag-needed back
/// to `reply_to` when it does not fit the tunnel. `datagram`, when the frame came from another
/// agent's tunnel, is that tunnel datagram (kind byte + the same payload): it is passed on as it
/// is, without a copy.
#[allow(clippy::too_many_arguments)]
fn to_agent(
    relay: &Relay,
    node: &str,
    frame: &VxlanFrame<'_>,
    datagram: Option<&Bytes>,
    from_agent: Option<&AgentEntry>,
    reply_to: Option<(&tokio::net::UdpSocket, SocketAddr)>,
    forwarded: &mut Forwarded,
) {
    let Some(dest) = relay.registry.get(node) else {
        count_drop(relay, from_agent, DropReason::AgentNotConnected);
        return;
    };
    let payload = frame.vxlan_bytes();
    let max = dest.connection.max_datagram_size().unwrap_or(0);
    if payload.len() + 1 > max {
        count_drop(relay, from_agent, DropReason::Oversize);
        let mtu = petrel_proto::datagram::inner_mtu(max);
        // Answer like a router on the path, whoever sent it: a VTEP gets the ICMP on UDP, an
        // agent in its own tunnel (its agent injects it into flannel.1 like any frame). The
        // sending pod's kernel lowers its path MTU to that destination and TCP adapts.
        if let Some(icmp) = icmp::frag_needed(frame, mtu) {
            let sent = match (reply_to, from_agent) {
                // Back out of the socket the frame came in on (loopback answers loopback).
                (Some((sock, to)), _) => sock.try_send_to(&icmp, to).is_ok(),
                (None, Some(sender)) => {
                    let mut b = BytesMut::with_capacity(icmp.len() + 1);
                    b.put_u8(DATAGRAM_KIND_VXLAN);
                    b.extend_from_slice(&icmp);
                    sender.connection.send_datagram(b.freeze()).is_ok()
                }
                (None, None) => false,
            };
            if sent {
                relay
                    .metrics
                    .frames_forwarded
                    .get_or_create(&crate::metrics::Reason {
                        reason: "icmp_frag_needed".to_string(),
                    })
                    .inc();
            }
        }
        return;
    }
    let out = match datagram {
        Some(d) if d.len() == payload.len() + 1 && d.first() == Some(&DATAGRAM_KIND_VXLAN) => {
            d.clone()
        }
        _ => {
            let mut b = BytesMut::with_capacity(payload.len() + 1);
            b.put_u8(DATAGRAM_KIND_VXLAN);
            b.extend_from_slice(payload);
            b.freeze()
        }
    };
    match dest.connection.send_datagram(out) {
        Ok(()) => forwarded.count(
            relay,
            if from_agent.is_some() {
                "agent_to_agent"
            } else {
                "vtep_to_agent"
            },
        ),
        Err(e) => {
            debug!(node, error = %e, "cannot hand a frame to the agent");
            count_drop(relay, from_agent, DropReason::SendFailed);
        }
    }
}

/// What the frame-moving loops use: the relay sockets and switch table, the connected agents
/// frames are handed to, and the counters.
#[derive(Debug, Clone)]
pub struct Relay {
    pub dp: Arc<Dataplane>,
    pub registry: Arc<AgentRegistry>,
    pub metrics: Arc<HubMetrics>,
    /// Offer relayed pairs of public sites a direct path (`super::rendezvous`).
    pub direct_paths: bool,
}

/// A frame from `from` was relayed to agent `dest`: offer the pair a direct path if it is due
/// and may have one.
fn maybe_offer(
    relay: &Relay,
    pacer: &mut super::rendezvous::OfferPacer,
    from: &AgentEntry,
    dest: &str,
) {
    if !relay.direct_paths || !from.direct_paths || !pacer.due(dest, Instant::now()) {
        return;
    }
    let Some(to) = relay.registry.get(dest) else {
        return;
    };
    fn end(e: &AgentEntry) -> super::rendezvous::End<'_> {
        super::rendezvous::End {
            node: &e.node,
            site: &e.site,
            capable: e.direct_paths,
            addr: e.connection.remote_address(),
        }
    }
    let outcome = match super::rendezvous::eligible(end(from), end(&to)) {
        Ok((to_from, to_dest)) => {
            for (entry, offer) in [(from, to_from), (&*to, to_dest)] {
                let msg = Box::new(petrel_proto::ControlMessage::PeerOffer(offer));
                // A full command queue means the session is busy with more important things;
                // the pair is offered again after the interval.
                let _ = entry.commands.try_send(SessionCommand::Send(msg));
            }
            debug!(a = %from.node, b = %to.node, "offered a direct path");
            "sent"
        }
        Err(why) => why.label(),
    };
    relay
        .metrics
        .peer_offers
        .get_or_create(&crate::metrics::Outcome {
            outcome: outcome.to_string(),
        })
        .inc();
}

/// Frames from one agent's tunnel. Ends when the connection does.
pub async fn pump_agent(relay: Arc<Relay>, entry: Arc<AgentEntry>) {
    let dp = &*relay.dp;
    let mut forwarded = Forwarded::default();
    // Frames for VTEPs, sent together (UDP GSO) when the next datagram is not ready at once or
    // cannot join.
    let mut batch = UdpBatch::new();
    let mut since_yield = 0usize;
    let mut pacer = super::rendezvous::OfferPacer::default();
    loop {
        // Fairness, as in the relay: one busy tunnel must not hold a worker.
        since_yield += 1;
        if since_yield >= YIELD_EVERY {
            since_yield = 0;
            flush_vtep_batch(&relay, dp, &entry, &mut batch, &mut forwarded).await;
            tokio::task::yield_now().await;
        }
        // Take what is ready without yielding; send, count and wait only when nothing is.
        let next = match entry.connection.read_datagram().now_or_never() {
            Some(r) => r,
            None => {
                flush_vtep_batch(&relay, dp, &entry, &mut batch, &mut forwarded).await;
                forwarded.flush(&relay);
                entry.connection.read_datagram().await
            }
        };
        let datagram: Bytes = match next {
            Ok(d) => d,
            Err(e) => {
                flush_vtep_batch(&relay, dp, &entry, &mut batch, &mut forwarded).await;
                forwarded.flush(&relay);
                debug!(node = %entry.node, error = %e, "datagram pump stopped");
                return;
            }
        };
        let frame = match petrel_proto::parse_datagram(&datagram) {
            Ok(f) => f,
            Err(e) => {
                count_drop(&relay, Some(&entry), DropReason::Malformed(e.reason()));
                continue;
            }
        };
        let table = dp.table();
        let verdict = table.decide(Ingress::Agent(&entry.node), &frame, |n| {
            relay.registry.get(n).is_some()
        });
        match verdict {
            Verdict::ToAgent(node) => {
                // An oversize frame is answered with ICMP frag-needed into the sender's tunnel
                // (a destination site with a smaller path MTU than the sender's).
                to_agent(
                    &relay,
                    node,
                    &frame,
                    Some(&datagram),
                    Some(&entry),
                    None,
                    &mut forwarded,
                );
                maybe_offer(&relay, &mut pacer, &entry, node);
            }
            Verdict::ToVtep(addr) => {
                let len = frame.vxlan_bytes().len();
                if !batch.accepts(len, Some(addr)) {
                    flush_vtep_batch(&relay, dp, &entry, &mut batch, &mut forwarded).await;
                }
                // The VXLAN payload is the datagram after its kind byte (it parsed, so it is
                // longer than that): a slice of the same buffer, not a copy.
                batch.push(datagram.slice(DATAGRAM_OVERHEAD..), Some(addr));
            }
            Verdict::Drop(reason) => count_drop(&relay, Some(&entry), reason),
        }
    }
}

/// Sends the frames waiting for a VTEP and counts them.
async fn flush_vtep_batch(
    relay: &Relay,
    dp: &Dataplane,
    entry: &AgentEntry,
    batch: &mut UdpBatch,
    forwarded: &mut Forwarded,
) {
    if batch.is_empty() {
        return;
    }
    let Some(sock) = dp.send_socket() else {
        return;
    };
    let f = batch.flush(sock).await;
    forwarded.count_n(relay, "agent_to_vtep", f.sent);
    if f.failed > 0 {
        if let Some(e) = &f.error {
            debug!(error = %e, "cannot send a frame to a VTEP");
        }
        // Rare (a VTEP the kernel cannot route to): per frame, through the one drop path.
        for _ in 0..f.failed {
            count_drop(relay, Some(entry), DropReason::SendFailed);
        }
    }
}

/// Frames from cloud and Express Connect nodes on the relay port.
pub async fn run_relay(relay: Arc<Relay>, shutdown: CancellationToken) {
    let dp = &*relay.dp;
    let loops: Vec<_> = dp
        .sockets
        .iter()
        .map(|sock| tokio::spawn(relay_loop(relay.clone(), sock.clone(), shutdown.clone())))
        .collect();
    for l in loops {
        let _ = l.await;
    }
}

/// One relay socket's receive loop.
async fn relay_loop(
    relay: Arc<Relay>,
    socket: Arc<tokio::net::UdpSocket>,
    shutdown: CancellationToken,
) {
    let dp = &*relay.dp;
    let mut buf = vec![0u8; 65536];
    let mut forwarded = Forwarded::default();
    let mut since_yield = 0usize;
    loop {
        if shutdown.is_cancelled() {
            forwarded.flush(&relay);
            return;
        }
        // Fairness: while frames keep arriving this loop never waits, and a worker that never
        // returns to the scheduler starves what is queued behind it (the QUIC endpoint driver,
        // every tunnel's keepalives). Give way every batch.
        since_yield += 1;
        if since_yield >= YIELD_EVERY {
            since_yield = 0;
            forwarded.flush(&relay);
            tokio::task::yield_now().await;
        }
        // Take what is ready without yielding; count and wait only when nothing is.
        let ready = match socket.try_recv_from(&mut buf) {
            Ok(v) => Some(v),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => {
                warn!(error = %e, "relay socket receive failed");
                None
            }
        };
        let (len, from) = match ready {
            Some(v) => v,
            None => {
                forwarded.flush(&relay);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = socket.recv_from(&mut buf) => match r {
                        Ok(v) => v,
                        Err(e) => {
                            warn!(error = %e, "relay socket receive failed");
                            continue;
                        }
                    },
                }
            }
        };
        let Some(bytes) = buf.get(..len) else {
            continue;
        };
        // A node role asking whether this hub is alive (active-active hubs): answered, as long
        // as the request, only to addresses the switch knows as VTEPs.
        // A stopping hub stays silent on purpose: its sites move while it still relays.
        if let Some(reply) = petrel_proto::relay_probe::reply_to(bytes) {
            if !dp.table().is_vtep(from.ip()) {
                count_drop(&relay, None, DropReason::UnknownSender);
            } else if dp.answers_probes() {
                relay.metrics.relay_probes_answered.inc();
                let _ = socket.try_send_to(&reply, from);
            }
            continue;
        }
        let frame = match VxlanFrame::from_vxlan_payload(bytes) {
            Ok(f) => f,
            Err(e) => {
                count_drop(&relay, None, DropReason::Malformed(e.reason()));
                continue;
            }
        };
        let table = dp.table();
        match table.decide(Ingress::Vtep(from.ip()), &frame, |n| {
            relay.registry.get(n).is_some()
        }) {
            Verdict::ToAgent(node) => {
                // The sender's flannel.1 listens on the flannel port of the address it sent from.
                let reply_to = SocketAddr::new(from.ip(), table_flannel_port(dp));
                to_agent(
                    &relay,
                    node,
                    &frame,
                    None,
                    None,
                    Some((&*socket, reply_to)),
                    &mut forwarded,
                );
            }
            Verdict::ToVtep(_) => count_drop(&relay, None, DropReason::NotViaHub),
            Verdict::Drop(reason) => count_drop(&relay, None, reason),
        }
    }
}

fn table_flannel_port(dp: &Dataplane) -> u16 {
    dp.flannel_port
}
