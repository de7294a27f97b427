//! The agent's half of the VXLAN data plane: it programs this node (via `petrel-datapath`) so
//! that frames for pod CIDRs behind the hub reach the agent, sends them to the hub as QUIC
//! datagrams, and injects the hub's datagrams into Flannel's `flannel.1`. Frames for a peer of
//! another public site with a direct connection up (`crate::direct_paths`) go to that
//! connection instead, and what such a peer sends is checked as the hub's switch would
//! (`deliver_from_peer`) before it is injected.
//!
//! Routes come from the hub's view (the inventory), never from local guesses. Their MTU is the
//! site MTU the hub announces, lowered to what fits a QUIC datagram on the current path and
//! re-checked whenever quinn's datagram size changes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt as _;
use petrel_datapath::{
    Datapath, DatapathConfig, DesiredState, FrameBatch, HookMode, Injector, PeerRoute, Relay,
};
use petrel_proto::types::{IpCidr, MacAddr};
use petrel_proto::{HubView, RoutePath, DATAGRAM_KIND_VXLAN};
use petrel_transport::udp_batch::UdpBatch;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Datagrams [`AgentDataplane::deliver`] takes from the tunnel in one call.
const DRAIN_BATCH: usize = 64;

/// Captured frames taken with one system call.
const CAPTURE_BATCH: usize = 64;
/// Room per captured frame: above any QUIC datagram (quinn's path MTU discovery stops at 1452
/// bytes of UDP payload), so a frame that does not fit could not be sent anyway and is dropped
/// as oversize, as `send_datagram` would.
const CAPTURE_SLOT: usize = 4096;

/// What `status` shows about the data plane.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DataplaneStatus {
    pub hooks: String,
    pub peers: usize,
    pub mtu: Option<u16>,
    pub frames_to_hub: u64,
    pub frames_from_hub: u64,
    /// VXLAN payload bytes sent to the hub, and received from it for this node.
    pub bytes_to_hub: u64,
    pub bytes_from_hub: u64,
    pub dropped: BTreeMap<String, u64>,
    /// Whether the last application of the routes succeeded.
    pub ready: bool,
    /// Why the last application failed.
    pub error: Option<String>,
    /// The route MTU toward each site reached through the hub.
    pub site_mtu: BTreeMap<String, u16>,
    /// With several active hubs: the one that owns this site (its frames to the cloud go
    /// there).
    pub site_owner: Option<String>,
    /// Frames and VXLAN payload bytes sent straight to peers of other public sites
    /// (`crate::direct_paths`), and received from them.
    pub frames_direct_out: u64,
    pub bytes_direct_out: u64,
    pub frames_direct_in: u64,
    pub bytes_direct_in: u64,
    /// VXLAN payload bytes to peers the hub offered a direct path to that went through the hub
    /// (punching, backing off, or a frame too large for the direct path).
    pub bytes_to_peers_via_hub: u64,
    /// Of the bytes this node sent to such peers, the share that went direct (0 to 1; `None`
    /// before any).
    pub direct_share: Option<f64>,
}

/// Where delivered frames came from: which checks they get and which counters they go to.
#[derive(Debug, Clone, Copy)]
enum Origin<'a> {
    Hub,
    /// A direct peer, held to what its frames may carry.
    Peer(&'a PeerAuthority),
}

/// What [`AgentDataplane::stage`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staged {
    Queued,
    /// Not injected (malformed, not for this node, the kernel would not take it).
    Dropped,
    /// From a peer, failing the checks the hub's switch would make.
    Refused,
}

/// What a direct peer's frames must carry to be delivered here
/// (`petrel_proto::direct::check_peer_frame`): its VtepMAC, a source inside its pod CIDRs, a
/// destination inside this node's (`mine`). From the hub's view; re-derived when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthority {
    pub mac: MacAddr,
    pub cidrs: Vec<IpCidr>,
    pub mine: Vec<IpCidr>,
}

/// The tunnels captured frames may go to, by hub name: the one the hubs' views mark active
/// (Kubernetes mode: the Lease holder), else the most recently connected one; with several
/// active hubs, per frame by its [`crate::hub_choice::HubChoice`].
#[derive(Default)]
struct Tunnels {
    by_hub: BTreeMap<String, quinn::Connection>,
    preferred: Option<String>,
    last: Option<String>,
    /// Several active hubs: which one each frame goes to.
    choice: Option<crate::hub_choice::HubChoice>,
    /// Hubs that stopped answering while frames went to them (`SilenceWatch`): skipped.
    silent: std::collections::BTreeSet<String>,
}

impl Tunnels {
    fn open(&self, hub: &str) -> Option<&quinn::Connection> {
        self.by_hub.get(hub).filter(|c| c.close_reason().is_none())
    }

    /// The tunnel for `frame`: with several active hubs the first of its ranking that is open,
    /// else (or when none of them is) as [`Tunnels::pick`].
    fn pick_for(&self, frame: &[u8]) -> Option<quinn::Connection> {
        let ranked = self.choice.as_ref().map(|c| c.ranked(frame)).unwrap_or(&[]);
        ranked
            .iter()
            .filter(|h| !self.silent.contains(*h))
            .find_map(|h| self.open(h))
            .or_else(|| ranked.iter().find_map(|h| self.open(h)))
            .cloned()
            .or_else(|| self.pick())
    }

    fn pick(&self) -> Option<quinn::Connection> {
        let open = |h: &Option<String>| {
            h.as_ref()
                .and_then(|h| self.by_hub.get(h))
                .filter(|c| c.close_reason().is_none())
                .cloned()
        };
        open(&self.preferred)
            .or_else(|| open(&self.last))
            .or_else(|| {
                self.by_hub
                    .values()
                    .find(|c| c.close_reason().is_none())
                    .cloned()
            })
    }
}

pub struct AgentDataplane {
    datapath: tokio::sync::Mutex<Datapath>,
    injector: Injector,
    mode: HookMode,
    vtep_mac: [u8; 6],
    active: RwLock<Tunnels>,
    view: Mutex<Option<HubView>>,
    /// This node's site (from the welcome): which hub owns it, with active-active hubs.
    site: Mutex<Option<String>>,
    applied: Mutex<Option<DesiredState>>,
    frames_to_hub: AtomicU64,
    frames_from_hub: AtomicU64,
    bytes_to_hub: AtomicU64,
    bytes_from_hub: AtomicU64,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
    /// Why the last `apply` failed; `None` after a success.
    apply_error: Mutex<Option<String>>,
    /// The injection batch, kept between calls for its buffer.
    inject_batch: Mutex<Option<UdpBatch>>,
    /// Peers of other public sites the hub offered, by VtepMAC: `Some` while their direct
    /// connection is up (frames go there), `None` while they go through the hub.
    peers: RwLock<std::collections::HashMap<[u8; 6], Option<quinn::Connection>>>,
    frames_direct_out: AtomicU64,
    bytes_direct_out: AtomicU64,
    frames_direct_in: AtomicU64,
    bytes_direct_in: AtomicU64,
    bytes_to_peers_via_hub: AtomicU64,
    /// The same two byte counts as metrics (direct, via the hub), once the agent wires them.
    peer_byte_metrics: std::sync::OnceLock<(Counter, Counter)>,
}

impl std::fmt::Debug for AgentDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentDataplane")
            .field("mode", &self.mode)
            .finish()
    }
}

impl AgentDataplane {
    pub async fn open(cfg: DatapathConfig) -> Result<Arc<Self>, petrel_datapath::DatapathError> {
        let dp = Datapath::open(cfg).await?;
        let injector = dp.injector()?;
        Ok(Arc::new(Self {
            mode: dp.mode(),
            vtep_mac: dp.vtep_mac(),
            datapath: tokio::sync::Mutex::new(dp),
            injector,
            active: RwLock::new(Tunnels::default()),
            view: Mutex::new(None),
            site: Mutex::new(None),
            applied: Mutex::new(None),
            frames_to_hub: AtomicU64::new(0),
            frames_from_hub: AtomicU64::new(0),
            bytes_to_hub: AtomicU64::new(0),
            bytes_from_hub: AtomicU64::new(0),
            dropped: Mutex::new(BTreeMap::new()),
            apply_error: Mutex::new(None),
            inject_batch: Mutex::new(None),
            peers: RwLock::new(std::collections::HashMap::new()),
            frames_direct_out: AtomicU64::new(0),
            bytes_direct_out: AtomicU64::new(0),
            frames_direct_in: AtomicU64::new(0),
            bytes_direct_in: AtomicU64::new(0),
            bytes_to_peers_via_hub: AtomicU64::new(0),
            peer_byte_metrics: std::sync::OnceLock::new(),
        }))
    }

    pub fn mode(&self) -> HookMode {
        self.mode
    }

    /// Short name for the hello and status.
    pub fn hooks_name(&self) -> &'static str {
        match self.mode {
            HookMode::Fast => "fast",
            HookMode::Portable => "portable",
        }
    }

    pub fn vtep_mac(&self) -> [u8; 6] {
        self.vtep_mac
    }

    fn drop_frame(&self, reason: &'static str) {
        self.drop_frames(reason, 1);
    }

    fn drop_frames(&self, reason: &'static str, n: u64) {
        if let Ok(mut d) = self.dropped.lock() {
            *d.entry(reason).or_default() += n;
        }
    }

    /// Why the data plane is not programmed as the hub's view asks, if it is not.
    pub fn apply_error(&self) -> Option<String> {
        self.apply_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn status(&self) -> DataplaneStatus {
        let applied = self.applied.lock().ok().and_then(|a| a.clone());
        let error = self.apply_error();
        let mtu = applied
            .as_ref()
            .and_then(|a| a.peers.first().map(|p| p.mtu));
        // The MTU each site's routes were applied with (sites may declare a smaller one).
        let mut site_mtu: BTreeMap<String, u16> = BTreeMap::new();
        if let (Some(applied), Some(view)) = (
            applied.as_ref(),
            self.view.lock().ok().and_then(|v| v.clone()),
        ) {
            let by_cidr: std::collections::HashMap<ipnet::Ipv4Net, u16> =
                applied.peers.iter().map(|p| (p.cidr, p.mtu)).collect();
            for r in view.routes.iter().filter(|r| r.path == RoutePath::ViaHub) {
                let std::net::IpAddr::V4(a) = r.pod_cidr.addr() else {
                    continue;
                };
                let Some(m) = ipnet::Ipv4Net::new(a, r.pod_cidr.prefix())
                    .ok()
                    .and_then(|c| by_cidr.get(&c))
                else {
                    continue;
                };
                let e = site_mtu.entry(r.site.clone()).or_insert(*m);
                *e = (*e).min(*m);
            }
        }
        let bytes_direct_out = self.bytes_direct_out.load(Ordering::Relaxed);
        let bytes_to_peers_via_hub = self.bytes_to_peers_via_hub.load(Ordering::Relaxed);
        let to_peers = bytes_direct_out + bytes_to_peers_via_hub;
        DataplaneStatus {
            frames_direct_out: self.frames_direct_out.load(Ordering::Relaxed),
            bytes_direct_out,
            frames_direct_in: self.frames_direct_in.load(Ordering::Relaxed),
            bytes_direct_in: self.bytes_direct_in.load(Ordering::Relaxed),
            bytes_to_peers_via_hub,
            direct_share: (to_peers > 0).then(|| bytes_direct_out as f64 / to_peers as f64),
            bytes_to_hub: self.bytes_to_hub.load(Ordering::Relaxed),
            bytes_from_hub: self.bytes_from_hub.load(Ordering::Relaxed),
            ready: error.is_none(),
            error,
            site_mtu,
            site_owner: self.active.read().ok().and_then(|t| {
                t.choice
                    .as_ref()
                    .and_then(|c| c.own_owner().map(str::to_string))
            }),
            hooks: self.mode.to_string(),
            peers: applied.as_ref().map(|a| a.peers.len()).unwrap_or(0),
            mtu,
            frames_to_hub: self.frames_to_hub.load(Ordering::Relaxed),
            frames_from_hub: self.frames_from_hub.load(Ordering::Relaxed),
            dropped: self
                .dropped
                .lock()
                .map(|d| d.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default(),
        }
    }

    /// Registers `conn`, the tunnel to hub `hub`; frames go to it unless the hubs mark another
    /// hub active.
    pub fn set_active(&self, hub: &str, conn: &quinn::Connection) {
        if let Ok(mut a) = self.active.write() {
            a.by_hub.insert(hub.to_string(), conn.clone());
            a.last = Some(hub.to_string());
        }
    }

    /// Forgets `conn`.
    pub fn clear_active(&self, conn: &quinn::Connection) {
        if let Ok(mut a) = self.active.write() {
            a.by_hub.retain(|_, c| c.stable_id() != conn.stable_id());
            if a.last.as_ref().is_some_and(|l| !a.by_hub.contains_key(l)) {
                a.last = None;
            }
        }
    }

    fn active_conn(&self) -> Option<quinn::Connection> {
        self.active.read().ok()?.pick()
    }

    fn desired(&self) -> Option<DesiredState> {
        let view = self.view.lock().ok()?.clone()?;
        let mtu = self
            .active_conn()
            .and_then(|c| c.max_datagram_size())
            .map_or(view.site_mtu, petrel_proto::datagram::inner_mtu)
            .min(view.site_mtu)
            .max(petrel_proto::control::MIN_SITE_MTU);
        // A destination site with a smaller WAN path than ours is routed at its MTU.
        let site_mtus: std::collections::HashMap<&str, u16> = view
            .site_mtus
            .iter()
            .map(|m| (m.site.as_str(), m.mtu))
            .collect();
        let peers =
            view.routes
                .iter()
                .filter(|r| r.path == RoutePath::ViaHub)
                .filter_map(|r| match r.pod_cidr.addr() {
                    std::net::IpAddr::V4(a) => ipnet::Ipv4Net::new(a, r.pod_cidr.prefix())
                        .ok()
                        .map(|cidr| PeerRoute {
                            cidr,
                            vtep_mac: r.vtep_mac.0,
                            mtu: site_mtus
                                .get(r.site.as_str())
                                .map_or(mtu, |m| (*m).min(mtu))
                                .max(petrel_proto::control::MIN_SITE_MTU),
                            via: None,
                        }),
                    std::net::IpAddr::V6(_) => None,
                })
                .collect();
        Some(DesiredState {
            peers,
            relay: Relay::Local,
        })
    }

    /// Whether a view was applied (a later one whose routes are still to come must not
    /// replace it).
    pub fn has_view(&self) -> bool {
        self.view.lock().map(|v| v.is_some()).unwrap_or(false)
    }

    /// This node's site, as the hubs' welcome names it.
    pub fn set_site(&self, site: &str) {
        let changed = match self.site.lock() {
            Ok(mut s) if s.as_deref() != Some(site) => {
                *s = Some(site.to_string());
                true
            }
            _ => false,
        };
        if !changed {
            return;
        }
        // A view applied before (the welcome's) is ranked again for the site; under the view's
        // lock, so a view being set meanwhile is not ranked with a stale site or replaced.
        let Ok(view) = self.view.lock() else { return };
        if let Some(view) = view.as_ref() {
            let choice = crate::hub_choice::HubChoice::from_view(view, Some(site));
            if let Ok(mut a) = self.active.write() {
                a.choice = choice;
            }
        }
    }

    /// Takes the hub's view (after a welcome or an update): the hub choice now, the kernel
    /// state at the next reconcile. The view and the choice made from it are set under one
    /// lock, so two links setting views at once never leave one's view with the other's choice.
    pub fn set_view(&self, view: &HubView) {
        let Ok(mut stored) = self.view.lock() else {
            return;
        };
        *stored = Some(view.clone());
        let site = self.site.lock().ok().and_then(|s| s.clone());
        let choice = crate::hub_choice::HubChoice::from_view(view, site.as_deref());
        if let Ok(mut a) = self.active.write() {
            if choice.as_ref().map(|c| c.own_owner()) != a.choice.as_ref().map(|c| c.own_owner()) {
                if let Some(owner) = choice.as_ref().and_then(|c| c.own_owner()) {
                    info!(hub = %owner, "active-active hubs: this site's frames go to the hub that owns it, other sites' to theirs");
                }
            }
            a.choice = choice;
            if let Some(active) = view.gateways.iter().find(|g| g.active) {
                if a.preferred.as_deref() != Some(active.name.as_str()) {
                    info!(hub = %active.name, "frames go to the active hub");
                    a.preferred = Some(active.name.clone());
                }
            }
        }
    }

    /// Applies the view it holds to the kernel now (one the data-plane slot just set, or
    /// handed over when it opened).
    pub async fn reconcile_now(&self) {
        self.reconcile(true).await;
    }

    async fn reconcile(&self, log_all: bool) {
        // The view is read under the kernel lock, not before it: a reconcile that read an
        // older view (the welcome's, routes still to come) and then waited for the lock would
        // otherwise apply it after a newer one, emptying the routes until the next reconcile.
        let mut dp = self.datapath.lock().await;
        let Some(desired) = self.desired() else {
            return;
        };
        let mtu_changed = self
            .applied
            .lock()
            .map(|a| {
                a.as_ref().map(|a| a.peers.first().map(|p| p.mtu))
                    != Some(desired.peers.first().map(|p| p.mtu))
            })
            .unwrap_or(true);
        match dp.apply(&desired).await {
            Ok(report) => {
                if report.changed() || log_all || mtu_changed {
                    info!(peers = desired.peers.len(), mtu = ?desired.peers.first().map(|p| p.mtu), ?report, "routes to the hub applied");
                }
                if let Ok(mut a) = self.applied.lock() {
                    *a = Some(desired);
                }
                if let Ok(mut err) = self.apply_error.lock() {
                    *err = None;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot apply routes to the hub; retrying");
                if let Ok(mut err) = self.apply_error.lock() {
                    *err = Some(format!("cannot apply the routes to the hub: {e}"));
                }
            }
        }
    }

    /// Counts the bytes sent to offered peers into `direct` and `via_hub` too (metrics).
    pub fn count_peer_bytes(&self, direct: Counter, via_hub: Counter) {
        let _ = self.peer_byte_metrics.set((direct, via_hub));
    }

    /// What `node`'s frames must carry, from the hub's routes (`None`: not a node of the view).
    pub fn peer_authority(&self, node: &str) -> Option<PeerAuthority> {
        let view = self.view.lock().ok()?;
        let routes: Vec<&petrel_proto::Route> = view
            .as_ref()?
            .routes
            .iter()
            .filter(|r| r.node_name == node)
            .collect();
        let mac = routes.first()?.vtep_mac;
        let view = view.as_ref()?;
        // This node's pod CIDRs: its site's (the egress policy) less the other nodes' of the
        // site (which are routes).
        let mine: Vec<IpCidr> = view
            .egress
            .pod_cidrs
            .iter()
            .filter(|c| !view.routes.iter().any(|r| r.pod_cidr == **c))
            .copied()
            .collect();
        if mine.is_empty() {
            return None;
        }
        Some(PeerAuthority {
            mac,
            cidrs: routes.iter().map(|r| r.pod_cidr).collect(),
            mine,
        })
    }

    /// Frames for the peer with VtepMAC `mac` go to `direct` from now on, or (`None`) through
    /// the hub, counted as site-to-site bytes that did not go direct.
    pub fn set_peer_route(&self, mac: MacAddr, direct: Option<quinn::Connection>) {
        if let Ok(mut p) = self.peers.write() {
            p.insert(mac.0, direct);
        }
    }

    /// A datagram from a direct peer's connection: delivered like the hub's, after the checks
    /// the hub's switch would have made ([`petrel_proto::direct::check_peer_frame`]); a refused
    /// frame is counted by reason, never injected. Drains what else is ready on `conn`.
    pub async fn deliver_from_peer(
        &self,
        conn: &quinn::Connection,
        datagram: Bytes,
        peer: &PeerAuthority,
    ) -> u64 {
        let mut batch = UdpBatch::new();
        let mut refused = 0;
        let mut next = Some(datagram);
        let mut taken = 0;
        while let Some(d) = next.take() {
            taken += 1;
            if self.stage(d, &mut batch, Origin::Peer(peer)).await == Staged::Refused {
                refused += 1;
            }
            if taken < DRAIN_BATCH {
                next = conn.read_datagram().now_or_never().and_then(Result::ok);
            }
        }
        self.flush(&mut batch, Origin::Peer(peer)).await;
        refused
    }

    /// A datagram from the hub: into flannel.1 if it is for this node. Datagrams already
    /// waiting on the same tunnel (`conn`, the one that read `datagram`) are delivered in the
    /// same call (up to a bound), instead of one per turn of the link's receiver, and go to the
    /// kernel in as few sends as UDP GSO allows.
    pub async fn deliver(&self, conn: &quinn::Connection, datagram: Bytes) {
        let mut batch = self
            .inject_batch
            .lock()
            .ok()
            .and_then(|mut b| b.take())
            .unwrap_or_default();
        self.stage(datagram, &mut batch, Origin::Hub).await;
        for _ in 0..DRAIN_BATCH {
            match conn.read_datagram().now_or_never() {
                Some(Ok(d)) => {
                    self.stage(d, &mut batch, Origin::Hub).await;
                }
                // Nothing ready, or the connection ended: the link's receiver sees it next.
                _ => break,
            }
        }
        self.flush(&mut batch, Origin::Hub).await;
        if let Ok(mut b) = self.inject_batch.lock() {
            *b = Some(batch);
        }
    }

    /// Checks one datagram (parsed once: from a peer, against what the hub's switch would
    /// check; from the hub, that it is for this node) and adds its frame to `batch` (sending
    /// what is there first if it cannot join).
    async fn stage(&self, datagram: Bytes, batch: &mut UdpBatch, from: Origin<'_>) -> Staged {
        let frame = match petrel_proto::parse_datagram(&datagram) {
            Ok(f) => f,
            Err(e) => {
                self.drop_frame(e.reason());
                return if matches!(from, Origin::Peer(_)) {
                    Staged::Refused
                } else {
                    Staged::Dropped
                };
            }
        };
        let me = MacAddr(self.vtep_mac);
        match from {
            Origin::Peer(peer) => {
                let mine = petrel_proto::direct::Receiver {
                    mac: me,
                    cidrs: &peer.mine,
                };
                if let Err(r) =
                    petrel_proto::direct::check_peer_frame(&frame, mine, peer.mac, &peer.cidrs)
                {
                    self.drop_frame(r.label());
                    return Staged::Refused;
                }
            }
            Origin::Hub if frame.dst_mac() != me => {
                self.drop_frame("not_for_this_node");
                return Staged::Dropped;
            }
            Origin::Hub => {}
        }
        let payload = frame.vxlan_bytes();
        if let Err(e) = self.injector.validate(payload) {
            debug!(error = %e, "inject failed");
            self.drop_frame("inject_failed");
            return Staged::Dropped;
        }
        if !batch.accepts(payload.len(), None) {
            self.flush(batch, from).await;
        }
        self.received(from)
            .1
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        // The VXLAN payload is the datagram after its kind byte (it parsed, so it is longer
        // than that): a slice of the same buffer, not a copy.
        batch.push(datagram.slice(petrel_proto::DATAGRAM_OVERHEAD..), None);
        Staged::Queued
    }

    /// The frame and byte counters of what came from `from`.
    fn received(&self, from: Origin<'_>) -> (&AtomicU64, &AtomicU64) {
        match from {
            Origin::Hub => (&self.frames_from_hub, &self.bytes_from_hub),
            Origin::Peer(_) => (&self.frames_direct_in, &self.bytes_direct_in),
        }
    }

    async fn flush(&self, batch: &mut UdpBatch, from: Origin<'_>) {
        let f = self.injector.send_batch(batch).await;
        self.received(from)
            .0
            .fetch_add(f.sent as u64, Ordering::Relaxed);
        if f.failed > 0 {
            if let Some(e) = &f.error {
                debug!(error = %e, "inject failed");
            }
            self.drop_frames("inject_failed", f.failed as u64);
        }
    }

    /// Carries frames the kernel hands us to the active hub, until `shutdown`.
    pub async fn run_capture(self: Arc<Self>, shutdown: CancellationToken) {
        let source = { self.datapath.lock().await.frame_source() };
        let mut source = match source {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot capture frames; pods cannot reach the hub");
                return;
            }
        };
        let mut batch = FrameBatch::new(CAPTURE_BATCH, CAPTURE_SLOT);
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = source.recv_batch(&mut batch) => r,
            };
            if let Err(e) = r {
                warn!(error = %e, "frame capture failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if batch.oversize() > 0 {
                self.drop_frames("oversize", batch.oversize() as u64);
            }
            if batch.is_empty() {
                continue;
            }
            // One tunnel lookup and one allocation per batch: every datagram is a slice of the
            // same buffer. With several active hubs, a lookup per frame (by its destination);
            // with peers the hub offered a direct path to, one more lookup per frame.
            let (single, chooser) = match self.active.read() {
                Ok(t) if t.choice.is_some() => (None, Some(t)),
                Ok(t) => (t.pick(), None),
                Err(_) => (None, None),
            };
            let peers = self.peers.read().ok().filter(|p| !p.is_empty());
            if single.is_none() && chooser.is_none() && peers.is_none() {
                self.drop_frames("no_hub", batch.len() as u64);
                continue;
            }
            let mut out = BytesMut::with_capacity(batch.bytes() + batch.len());
            let (mut sent, mut sent_bytes, mut oversize, mut down) = (0u64, 0u64, 0u64, 0u64);
            let (mut direct, mut direct_bytes, mut peer_via_hub) = (0u64, 0u64, 0u64);
            let mut no_hub = 0u64;
            for frame in batch.frames() {
                // A peer's frame goes straight to it while its direct connection takes it; one
                // the direct path cannot take (too large for its MTU, closed) goes via the hub.
                let peer = peers.as_ref().and_then(|p| {
                    let mac: [u8; 6] = frame.get(8..14)?.try_into().ok()?;
                    p.get(&mac)
                });
                if let Some(Some(conn)) = peer {
                    // Until the direct path's MTU discovery has raised its datagram size, a
                    // full-size frame goes via the hub (checked before copying it).
                    if frame.len() < conn.max_datagram_size().unwrap_or(0) {
                        out.put_u8(DATAGRAM_KIND_VXLAN);
                        out.extend_from_slice(frame);
                        if conn.send_datagram(out.split().freeze()).is_ok() {
                            direct += 1;
                            direct_bytes += frame.len() as u64;
                            continue;
                        }
                    }
                }
                let picked;
                let conn = match (&single, &chooser) {
                    (Some(c), _) => c,
                    (None, Some(t)) => match t.pick_for(frame) {
                        Some(c) => {
                            picked = c;
                            &picked
                        }
                        None => {
                            no_hub += 1;
                            continue;
                        }
                    },
                    (None, None) => {
                        no_hub += 1;
                        continue;
                    }
                };
                out.put_u8(DATAGRAM_KIND_VXLAN);
                out.extend_from_slice(frame);
                match conn.send_datagram(out.split().freeze()) {
                    Ok(()) => {
                        sent += 1;
                        sent_bytes += frame.len() as u64;
                        if peer.is_some() {
                            peer_via_hub += frame.len() as u64;
                        }
                    }
                    Err(quinn::SendDatagramError::TooLarge) => oversize += 1,
                    Err(_) => down += 1,
                }
            }
            drop(peers);
            self.frames_direct_out.fetch_add(direct, Ordering::Relaxed);
            self.bytes_direct_out
                .fetch_add(direct_bytes, Ordering::Relaxed);
            self.bytes_to_peers_via_hub
                .fetch_add(peer_via_hub, Ordering::Relaxed);
            if let Some((d, h)) = self.peer_byte_metrics.get() {
                d.inc_by(direct_bytes);
                h.inc_by(peer_via_hub);
            }
            self.frames_to_hub.fetch_add(sent, Ordering::Relaxed);
            self.bytes_to_hub.fetch_add(sent_bytes, Ordering::Relaxed);
            if oversize > 0 {
                self.drop_frames("oversize", oversize);
            }
            if down > 0 {
                self.drop_frames("tunnel_down", down);
            }
            if no_hub > 0 {
                self.drop_frames("no_hub", no_hub);
            }
        }
    }

    /// With several active hubs: every 50 ms, which tunnels were sent packets and heard
    /// nothing back for a while (`SilenceWatch`); their hubs are skipped until they answer.
    pub async fn run_silence_watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut watches: BTreeMap<u64, crate::hub_choice::SilenceWatch> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let conns: Vec<(String, quinn::Connection)> = match self.active.read() {
                Ok(t) if t.choice.is_some() => t
                    .by_hub
                    .iter()
                    .map(|(h, c)| (h.clone(), c.clone()))
                    .collect(),
                _ => {
                    watches.clear();
                    continue;
                }
            };
            let now = std::time::Instant::now();
            let mut silent = std::collections::BTreeSet::new();
            for (hub, conn) in &conns {
                let stats = conn.stats();
                let w = watches.entry(conn.stable_id() as u64).or_default();
                // Frames the hub must acknowledge (an ACK-only packet of ours is not answered,
                // so counting every packet sent would take a live hub for a silent one).
                let eliciting =
                    stats.frame_tx.datagram + stats.frame_tx.stream + stats.frame_tx.ping;
                if w.observe(eliciting, stats.udp_rx.datagrams, conn.rtt(), now) {
                    silent.insert(hub.clone());
                }
            }
            watches.retain(|id, _| conns.iter().any(|(_, c)| c.stable_id() as u64 == *id));
            if let Ok(mut t) = self.active.write() {
                if t.silent != silent {
                    for hub in silent.difference(&t.silent) {
                        warn!(%hub, "hub silent while frames go to it; its sites' frames go to the next hub");
                    }
                    for hub in t.silent.difference(&silent) {
                        info!(%hub, "hub answers again");
                    }
                    t.silent = silent;
                }
            }
        }
    }

    /// Re-applies on kernel changes and once a second (also picks up a new datagram size).
    pub async fn run_reconcile(self: Arc<Self>, shutdown: CancellationToken) {
        let events = { self.datapath.lock().await.change_events() };
        let mut events = match events {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(error = %e, "no netlink change events; reconciling once a second only");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = async { match events.as_mut() { Some(e) => { e.changed().await; } None => std::future::pending::<()>().await } } => {}
            }
            self.reconcile(false).await;
        }
    }

    pub async fn cleanup(&self) {
        let mut dp = self.datapath.lock().await;
        match dp.cleanup().await {
            Ok(()) => info!("removed this node's routes to the hub"),
            Err(e) => warn!(error = %e, "cleanup failed; run `petrel-edge-agent cleanup`"),
        }
    }
}
