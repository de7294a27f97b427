//! The node role: on every cloud node (and on Express Connect nodes) it makes traffic for
//! public-site pod CIDRs reach the active hub, with each site's MTU, and keeps it that way when
//! Flannel or anyone else rewrites the node's networking. It never touches Flannel's own objects:
//! policy rules and a table of our own win over Flannel's main-table routes (see
//! `petrel-datapath`).
//!
//! On the hub's own node the relay is local (the hub listens on the relay port); elsewhere it is
//! the hub node's underlay address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use petrel_datapath::{Datapath, DatapathConfig, DesiredState, HookMode, PeerRoute, Relay};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::inventory::{Inventory, SiteKind};

#[derive(Debug, thiserror::Error)]
pub enum NodeRoleError {
    #[error("node {0:?} is not in the inventory")]
    UnknownNode(String),
    #[error("node {node:?} is in a {kind} site; the node role runs on cloud and Express Connect nodes (public-site nodes run the edge agent)")]
    WrongSite { node: String, kind: &'static str },
    #[error("no hub: pass --hub-address or mark a node `gateway = true` in the inventory")]
    NoHub,
    #[error(transparent)]
    Datapath(#[from] petrel_datapath::DatapathError),
}

/// What the node role needs to know.
#[derive(Debug, Clone)]
pub struct NodeRoleConfig {
    pub node_name: String,
    /// The active hub's underlay address (IPv4).
    pub hub_address: Option<Ipv4Addr>,
    /// The active hub's node (Kubernetes mode: the Lease holder); default: the inventory's
    /// first gateway. Ignored when `hub_address` is set (except to recognise this node).
    pub hub_node: Option<String>,
    pub site_mtu: u16,
    /// Every hub carries traffic (file inventory: every `gateway = true` node runs one): each
    /// public site's CIDRs go to the hub that owns the site (`petrel_proto::ownership`), not
    /// all to one hub. Ignored when `hub_address` is set.
    pub active_active: bool,
    pub datapath: DatapathConfig,
    /// What the admin endpoint shows (`/readyz`, `/status`, `/metrics`).
    pub status: Arc<NodeRoleStatus>,
}

/// The node role's state for its admin endpoint: ready once the routes the inventory asks for
/// are applied, and not while they cannot be.
#[derive(Debug, Default)]
pub struct NodeRoleStatus {
    inner: Mutex<StatusInner>,
    repairs: AtomicU64,
    apply_errors: AtomicU64,
}

#[derive(Debug, Default)]
struct StatusInner {
    node: String,
    hooks: Option<String>,
    relay: Option<String>,
    peers: usize,
    /// `None` once applied; otherwise why the node's routes are not (yet) what they should be.
    problem: Option<NodeRoleNotReady>,
    applied_once: bool,
    /// Active-active: hubs that do not answer their relay probes (their sites go elsewhere).
    hubs_down: std::collections::BTreeSet<String>,
}

impl NodeRoleStatus {
    pub fn new(node: &str) -> Arc<Self> {
        let s = Self::default();
        if let Ok(mut i) = s.inner.lock() {
            i.node = node.to_string();
            i.problem = Some(NodeRoleNotReady::Starting);
        }
        Arc::new(s)
    }

    /// Not applied yet, and why (e.g. waiting for the cluster's Nodes or the hub Lease).
    pub fn set_waiting(&self, why: &str) {
        if let Ok(mut i) = self.inner.lock() {
            if !i.applied_once {
                i.problem = Some(NodeRoleNotReady::Waiting(why.to_string()));
            }
        }
    }

    pub fn set_hubs_down(&self, down: &std::collections::BTreeSet<String>) {
        if let Ok(mut i) = self.inner.lock() {
            i.hubs_down = down.clone();
        }
    }

    fn opened(&self, hooks: &str) {
        if let Ok(mut i) = self.inner.lock() {
            i.hooks = Some(hooks.to_string());
        }
    }

    fn applied(
        &self,
        desired: &DesiredState,
        result: Result<bool, &petrel_datapath::DatapathError>,
    ) {
        if let Ok(mut i) = self.inner.lock() {
            i.relay = Some(match desired.relay {
                Relay::Local => "local".to_string(),
                Relay::Remote(ip) => ip.to_string(),
            });
            i.peers = desired.peers.len();
            match result {
                Ok(changed) => {
                    if changed && i.applied_once {
                        self.repairs.fetch_add(1, Ordering::Relaxed);
                    }
                    i.applied_once = true;
                    i.problem = None;
                }
                Err(e) => {
                    self.apply_errors.fetch_add(1, Ordering::Relaxed);
                    i.problem = Some(NodeRoleNotReady::CannotApply(e.to_string()));
                }
            }
        }
    }
}

/// Why the node role's `/readyz` says not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeRoleNotReady {
    #[error("starting")]
    Starting,
    /// Not applied yet: waiting for something (the cluster's Nodes, the hub Lease, the data plane).
    #[error("{0}")]
    Waiting(String),
    /// The last apply failed (the data plane's error).
    #[error("cannot apply the node's routes: {0}")]
    CannotApply(String),
    #[error("state lock poisoned")]
    LockPoisoned,
}

impl petrel_transport::admin::AdminState for NodeRoleStatus {
    type NotReady = NodeRoleNotReady;

    fn ready(&self) -> Result<(), NodeRoleNotReady> {
        let i = self
            .inner
            .lock()
            .map_err(|_| NodeRoleNotReady::LockPoisoned)?;
        match &i.problem {
            None => Ok(()),
            Some(p) => Err(p.clone()),
        }
    }

    fn status(&self) -> serde_json::Value {
        let i = self.inner.lock();
        let Ok(i) = i else {
            return serde_json::Value::Null;
        };
        serde_json::json!({
            "role": "node",
            "node": i.node,
            "hooks": i.hooks,
            "relay": i.relay,
            "peers": i.peers,
            "ready": i.problem.is_none(),
            "not_ready_reason": i.problem.as_ref().map(ToString::to_string),
            "repairs": self.repairs.load(Ordering::Relaxed),
            "apply_errors": self.apply_errors.load(Ordering::Relaxed),
            "hubs_down": i.hubs_down,
        })
    }

    fn metrics(&self) -> String {
        let (ready, peers, hooks) = self
            .inner
            .lock()
            .map(|i| {
                (
                    i.problem.is_none(),
                    i.peers,
                    i.hooks.clone().unwrap_or_else(|| "none".into()),
                )
            })
            .unwrap_or((false, 0, "none".into()));
        format!(
            "# HELP petrel_node_role_ready 1 when this node's routes to the hub are applied (hooks: the kernel hook in use)\n\
             # TYPE petrel_node_role_ready gauge\n\
             petrel_node_role_ready{{hooks=\"{hooks}\"}} {}\n\
             # HELP petrel_node_role_peers Public-site pod CIDRs routed to the hub\n\
             # TYPE petrel_node_role_peers gauge\n\
             petrel_node_role_peers {peers}\n\
             # HELP petrel_node_role_repairs Times the node's routes had to be re-applied after something changed them\n\
             # TYPE petrel_node_role_repairs counter\n\
             petrel_node_role_repairs_total {}\n\
             # HELP petrel_node_role_apply_errors Failed applications of the node's routes\n\
             # TYPE petrel_node_role_apply_errors counter\n\
             petrel_node_role_apply_errors_total {}\n\
             # EOF\n",
            u8::from(ready),
            self.repairs.load(Ordering::Relaxed),
            self.apply_errors.load(Ordering::Relaxed),
        )
    }
}

/// The routes this node needs: every public-site node's pod CIDRs through the hub.
pub fn desired_state(inv: &Inventory, cfg: &NodeRoleConfig) -> Result<DesiredState, NodeRoleError> {
    desired_state_without(inv, cfg, &std::collections::BTreeSet::new())
}

/// [`desired_state`] with active-active hubs, `down` being the hubs that do not answer their
/// relay probes: their sites go to the next hub of each site's ranking (all hubs count again
/// when every one of them is down: sending to a hub that may come back beats sending nowhere).
pub fn desired_state_without(
    inv: &Inventory,
    cfg: &NodeRoleConfig,
    down: &std::collections::BTreeSet<String>,
) -> Result<DesiredState, NodeRoleError> {
    let me = inv
        .node(&cfg.node_name)
        .ok_or_else(|| NodeRoleError::UnknownNode(cfg.node_name.clone()))?;
    match inv.site_kind_of(me) {
        Some(SiteKind::Public) => {
            return Err(NodeRoleError::WrongSite {
                node: me.name.clone(),
                kind: "public",
            })
        }
        None => return Err(NodeRoleError::UnknownNode(cfg.node_name.clone())),
        _ => {}
    }
    let hub_node = match &cfg.hub_node {
        Some(name) => inv.node(name),
        None => inv.gateways().next(),
    };
    let relay = match (cfg.hub_address, hub_node) {
        (_, Some(h)) if h.name == me.name => Relay::Local,
        (Some(ip), _) => Relay::Remote(ip),
        (None, Some(h)) => relay_of_node(h, &me.name).ok_or(NodeRoleError::NoHub)?,
        (None, None) => return Err(NodeRoleError::NoHub),
    };
    // Active-active: the hubs by name (the names every party ranks), each with its relay.
    let mut hubs: Vec<(&str, Relay)> = if cfg.active_active && cfg.hub_address.is_none() {
        inv.gateways()
            .filter_map(|g| Some((g.name.as_str(), relay_of_node(g, &me.name)?)))
            .collect()
    } else {
        Vec::new()
    };
    if hubs.iter().any(|h| !down.contains(h.0)) {
        hubs.retain(|h| !down.contains(h.0));
    }
    let mut peers = Vec::new();
    for n in inv
        .nodes()
        .filter(|n| inv.site_kind_of(n) == Some(SiteKind::Public))
    {
        let Some(mac) = n.vtep_mac else { continue };
        let via = petrel_proto::ownership::owner(&n.site, hubs.iter().map(|h| h.0))
            .and_then(|owner| hubs.iter().find(|h| h.0 == owner))
            .map(|h| h.1);
        // A site whose WAN path is smaller than the tunnel's default gets its own MTU.
        let mtu = inv
            .site(&n.site)
            .and_then(|s| s.mtu)
            .map_or(cfg.site_mtu, |m| m.min(cfg.site_mtu));
        for cidr in &n.pod_cidrs {
            if let IpNet::V4(v4) = cidr {
                peers.push(PeerRoute {
                    cidr: *v4,
                    vtep_mac: mac.0,
                    mtu,
                    via,
                });
            }
        }
    }
    Ok(DesiredState { peers, relay })
}

/// Active-active: each hub's name and where its relay answers probes, seen from this node
/// (empty unless several hubs share the work).
pub fn probe_targets(inv: &Inventory, cfg: &NodeRoleConfig) -> Vec<(String, SocketAddr)> {
    if !cfg.active_active || cfg.hub_address.is_some() {
        return Vec::new();
    }
    let targets: Vec<(String, SocketAddr)> = inv
        .gateways()
        .filter_map(|g| {
            let relay = relay_of_node(g, &cfg.node_name)?;
            Some((
                g.name.clone(),
                relay_target(&relay, cfg.datapath.relay_port),
            ))
        })
        .collect();
    if targets.len() < 2 {
        return Vec::new();
    }
    targets
}

/// Probes every hub of `targets` (name, relay address) on its relay port
/// (`petrel_proto::relay_probe`) and publishes the hubs that do not answer. The targets may
/// change (Kubernetes mode: a hub labelled or unlabelled); probing starts afresh for a new set.
pub async fn probe_hubs(
    mut targets_rx: watch::Receiver<Vec<(String, SocketAddr)>>,
    down_tx: watch::Sender<std::collections::BTreeSet<String>>,
    shutdown: CancellationToken,
) {
    use petrel_proto::relay_probe::HubLiveness;
    let sock = match tokio::net::UdpSocket::bind("0.0.0.0:0").await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot open the hub probe socket; a dead hub's sites stay with it");
            return;
        }
    };
    let publish = |down: std::collections::BTreeSet<String>| {
        down_tx.send_if_modified(|cur| {
            if *cur == down {
                return false;
            }
            if down.is_empty() {
                info!("every hub answers its probes; each site goes to its owner");
            } else {
                warn!(
                    ?down,
                    "hubs do not answer their relay probes; their sites go to the next hub"
                );
            }
            *cur = down;
            true
        });
    };
    let mut buf = [0u8; 64];
    loop {
        let targets = targets_rx.borrow_and_update().clone();
        publish(std::collections::BTreeSet::new());
        if targets.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = targets_rx.changed() => if r.is_err() { return } else { continue },
            }
        }
        let mut live = HubLiveness::new(
            targets.iter().map(|t| t.0.clone()),
            rand::random::<u64>(),
            std::time::Instant::now(),
        );
        loop {
            let due = tokio::time::Instant::from_std(live.poll_timeout());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = targets_rx.changed() => {
                    if r.is_err() { return }
                    if *targets_rx.borrow() != targets { break }
                }
                r = sock.recv_from(&mut buf) => {
                    if let Ok((n, _)) = r {
                        if let Some(down) = buf.get(..n).and_then(|b| live.on_reply(b, std::time::Instant::now())) {
                            publish(down);
                        }
                    }
                }
                _ = tokio::time::sleep_until(due) => {
                    let tick = live.tick(std::time::Instant::now());
                    for (hub, probe) in &tick.probes {
                        if let Some((_, addr)) = targets.iter().find(|t| &t.0 == hub) {
                            let _ = sock.send_to(probe, addr).await;
                        }
                    }
                    if let Some(down) = tick.down_changed {
                        publish(down);
                    }
                }
            }
        }
    }
}

/// Where a hub on node `hub` receives relay frames, seen from node `me`.
fn relay_of_node(hub: &crate::inventory::Node, me: &str) -> Option<Relay> {
    if hub.name == me {
        return Some(Relay::Local);
    }
    match hub.public_ip.or_else(|| hub.addresses.first().copied()) {
        Some(IpAddr::V4(ip)) => Some(Relay::Remote(ip)),
        _ => None,
    }
}

/// Where the portable hook's pump sends each frame: by the inner destination MAC (the peer's
/// VtepMAC) when peers have their own relays, else the state's relay.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RelayTargets {
    default: SocketAddr,
    by_mac: std::collections::HashMap<[u8; 6], SocketAddr>,
}

impl RelayTargets {
    fn new(desired: &DesiredState, port: u16) -> Self {
        Self {
            default: relay_target(&desired.relay, port),
            by_mac: desired
                .peers
                .iter()
                .filter_map(|p| Some((p.vtep_mac, relay_target(&p.via?, port))))
                .collect(),
        }
    }

    /// `frame` is a VXLAN payload: 8 bytes of VXLAN header, then the inner Ethernet frame.
    fn for_frame(&self, frame: &[u8]) -> SocketAddr {
        petrel_proto::datagram::inner_dst_mac(frame)
            .and_then(|m| self.by_mac.get(&m))
            .copied()
            .unwrap_or(self.default)
    }
}

fn relay_target(relay: &Relay, port: u16) -> SocketAddr {
    let ip = match relay {
        Relay::Local => Ipv4Addr::LOCALHOST,
        Relay::Remote(ip) => *ip,
    };
    SocketAddr::from((ip, port))
}

/// Runs the node role until `shutdown`, then removes what it added.
pub async fn run(
    inv: Inventory,
    cfg: NodeRoleConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeRoleError> {
    let desired = desired_state(&inv, &cfg)?;
    let (tx, rx) = watch::channel(desired);
    // Active-active: a dead hub's sites move to the next hub once its probes go unanswered.
    // With one hub there is nothing to probe and the state stays as it is.
    let (_targets_tx, targets_rx) = watch::channel(probe_targets(&inv, &cfg));
    let (down_tx, mut down_rx) = watch::channel(std::collections::BTreeSet::new());
    let prober = tokio::spawn(probe_hubs(targets_rx, down_tx, shutdown.clone()));
    let follow_cfg = cfg.clone();
    let follower = tokio::spawn(async move {
        while down_rx.changed().await.is_ok() {
            let down = down_rx.borrow_and_update().clone();
            match desired_state_without(&inv, &follow_cfg, &down) {
                Ok(d) => {
                    follow_cfg.status.set_hubs_down(&down);
                    tx.send_replace(d);
                }
                Err(e) => warn!(error = %e, "cannot recompute the routes for the live hubs"),
            }
        }
    });
    let r = run_desired(cfg, rx, shutdown).await;
    prober.abort();
    follower.abort();
    r
}

/// Runs the node role with a desired state that changes (Kubernetes mode: Nodes come and go,
/// the active hub moves) until `shutdown`, then removes what it added.
pub async fn run_desired(
    cfg: NodeRoleConfig,
    mut desired_rx: watch::Receiver<DesiredState>,
    shutdown: CancellationToken,
) -> Result<(), NodeRoleError> {
    let mut desired = desired_rx.borrow_and_update().clone();
    let mut dp = match Datapath::open(cfg.datapath.clone()).await {
        Ok(dp) => dp,
        Err(e) => {
            cfg.status.set_waiting(&format!("data plane: {e}"));
            return Err(e.into());
        }
    };
    let mode = dp.mode();
    cfg.status.opened(match mode {
        HookMode::Fast => "fast",
        HookMode::Portable => "portable",
    });
    info!(node = %cfg.node_name, hooks = %mode, relay = ?desired.relay, peers = desired.peers.len(), "node role starting");
    let report = match dp.apply(&desired).await {
        Ok(r) => r,
        Err(e) => {
            cfg.status.applied(&desired, Err(&e));
            return Err(e.into());
        }
    };
    cfg.status.applied(&desired, Ok(false));
    debug!(?report, "initial apply");
    // In portable mode userspace carries the frames from the TUN device to the relay.
    let target = Arc::new(RwLock::new(RelayTargets::new(
        &desired,
        cfg.datapath.relay_port,
    )));
    let pump = if mode == HookMode::Portable {
        let to = target.clone();
        let mut source = dp.frame_source()?;
        // Unbound: the relay may move between this node (loopback) and another hub's address.
        let sock = tokio::net::UdpSocket::bind("0.0.0.0:0")
            .await
            .map_err(|e| {
                petrel_datapath::DatapathError::Config(format!("cannot open the relay socket: {e}"))
            })?;
        Some(tokio::spawn(async move {
            let mut buf = vec![0u8; petrel_datapath::FRAME_BUF_LEN];
            loop {
                match source.recv(&mut buf).await {
                    Ok(n) => {
                        if let Some(frame) = buf.get(..n) {
                            let dest = to.read().map(|t| t.for_frame(frame)).ok();
                            if let Some(dest) = dest {
                                let _ = sock.send_to(frame, dest).await;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "TUN read failed; the portable hook stops carrying frames");
                        return;
                    }
                }
            }
        }))
    } else {
        None
    };
    let mut events = dp.change_events()?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = events.changed() => {}
            _ = tick.tick() => {}
            r = desired_rx.changed(), if !desired_rx.is_closed() => {
                if r.is_ok() {
                    let next = desired_rx.borrow_and_update().clone();
                    if next.relay != desired.relay {
                        info!(relay = ?next.relay, "the active hub moved; pointing the relay at it");
                    }
                    desired = next;
                    if let Ok(mut t) = target.write() {
                        *t = RelayTargets::new(&desired, cfg.datapath.relay_port);
                    }
                }
            }
        }
        match dp.apply(&desired).await {
            Ok(r) if r.changed() => {
                info!(report = ?r, "repaired the node's routes");
                cfg.status.applied(&desired, Ok(true));
            }
            Ok(_) => cfg.status.applied(&desired, Ok(false)),
            Err(e) => {
                warn!(error = %e, "cannot apply the node's routes; retrying");
                cfg.status.applied(&desired, Err(&e));
            }
        }
    }
    if let Some(p) = pump {
        p.abort();
    }
    dp.cleanup().await?;
    info!("node role stopped; everything it added is removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(node: &str) -> NodeRoleConfig {
        NodeRoleConfig {
            node_name: node.into(),
            hub_address: None,
            hub_node: None,
            site_mtu: 1380,
            active_active: false,
            datapath: DatapathConfig::default(),
            status: NodeRoleStatus::new(node),
        }
    }

    #[test]
    fn cloud_nodes_route_every_public_site_through_the_hub() {
        let inv = Inventory::embedded_default().unwrap();
        let d = desired_state(&inv, &cfg("cloud-1")).unwrap();
        assert_eq!(d.relay, Relay::Remote("192.168.0.12".parse().unwrap()));
        let cidrs: Vec<String> = d.peers.iter().map(|p| p.cidr.to_string()).collect();
        assert_eq!(
            cidrs,
            vec!["10.244.3.0/24", "10.244.4.0/24", "10.244.5.0/24"]
        );
        assert!(d.peers.iter().all(|p| p.mtu == 1380));
        // The hub's own node relays locally; an Express Connect node like any cloud node.
        assert_eq!(
            desired_state(&inv, &cfg("gw-1")).unwrap().relay,
            Relay::Local
        );
        assert_eq!(desired_state(&inv, &cfg("x1")).unwrap().peers.len(), 3);
        assert!(matches!(
            desired_state(&inv, &cfg("edge-a1")),
            Err(NodeRoleError::WrongSite { .. })
        ));
        assert!(matches!(
            desired_state(&inv, &cfg("nope")),
            Err(NodeRoleError::UnknownNode(_))
        ));
    }

    /// The embedded lab inventory with a second hub, `gw-3` (named so that the two public
    /// sites have different owners: `petrel_proto::ownership` gives site-a to gw-1 and site-b
    /// to gw-3).
    fn two_hubs() -> Inventory {
        let text = format!(
            "{}\n[[nodes]]\nname = \"gw-3\"\nsite = \"vpc\"\naddresses = [\"192.168.0.13\"]\n\
             pod_cidrs = [\"10.244.7.0/24\"]\nvtep_mac = \"02:fa:00:00:00:07\"\n\
             public_ip = \"192.168.0.13\"\ngateway = true\n",
            include_str!("default-inventory.toml")
        );
        Inventory::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn active_active_routes_each_site_to_its_owner_hub() {
        let inv = two_hubs();
        let gw1 = Relay::Remote("192.168.0.12".parse().unwrap());
        let gw3 = Relay::Remote("192.168.0.13".parse().unwrap());
        let via = |d: &DesiredState, cidr: &str| {
            d.peers
                .iter()
                .find(|p| p.cidr.to_string() == cidr)
                .map(|p| (p.via, d.relay_of(&p.vtep_mac)))
                .unwrap()
        };
        let mut c = cfg("cloud-1");
        c.active_active = true;
        let d = desired_state(&inv, &c).unwrap();
        // site-a (edge-a1, edge-a2) to gw-1, site-b (edge-b1) to gw-3.
        assert_eq!(via(&d, "10.244.3.0/24"), (Some(gw1), gw1));
        assert_eq!(via(&d, "10.244.4.0/24"), (Some(gw1), gw1));
        assert_eq!(via(&d, "10.244.5.0/24"), (Some(gw3), gw3));
        // On a hub's own node its sites are local, the other hub's remote.
        let mut c = cfg("gw-3");
        c.active_active = true;
        let d = desired_state(&inv, &c).unwrap();
        assert_eq!(via(&d, "10.244.3.0/24"), (Some(gw1), gw1));
        assert_eq!(via(&d, "10.244.5.0/24"), (Some(Relay::Local), Relay::Local));
        assert!(d.uses_local_relay());
        // Without the switch every site goes to the first hub, as before.
        let d = desired_state(&inv, &cfg("cloud-1")).unwrap();
        assert!(d.peers.iter().all(|p| p.via.is_none()));
        assert_eq!(d.relay, gw1);
        // A configured hub address wins over ownership.
        let mut c = cfg("cloud-1");
        c.active_active = true;
        c.hub_address = Some("10.9.9.9".parse().unwrap());
        let d = desired_state(&inv, &c).unwrap();
        assert!(d.peers.iter().all(|p| p.via.is_none()));
    }

    #[test]
    fn a_hub_that_does_not_answer_loses_its_sites_to_the_next_hub() {
        let inv = two_hubs();
        let mut c = cfg("cloud-1");
        c.active_active = true;
        let gw1 = Some(Relay::Remote("192.168.0.12".parse().unwrap()));
        let gw3 = Some(Relay::Remote("192.168.0.13".parse().unwrap()));
        let via = |down: &[&str]| {
            let down = down.iter().map(|s| s.to_string()).collect();
            let d = desired_state_without(&inv, &c, &down).unwrap();
            let a = d
                .peers
                .iter()
                .find(|p| p.cidr.to_string() == "10.244.3.0/24")
                .unwrap()
                .via;
            let b = d
                .peers
                .iter()
                .find(|p| p.cidr.to_string() == "10.244.5.0/24")
                .unwrap()
                .via;
            (a, b)
        };
        assert_eq!(via(&[]), (gw1, gw3));
        assert_eq!(via(&["gw-3"]), (gw1, gw1));
        assert_eq!(via(&["gw-1"]), (gw3, gw3));
        // Every hub down: the owners as if all were up.
        assert_eq!(via(&["gw-1", "gw-3"]), (gw1, gw3));
        // A name that is not a hub changes nothing.
        assert_eq!(via(&["cloud-1"]), (gw1, gw3));
    }

    #[test]
    fn probes_go_to_every_hubs_relay_only_with_several_hubs() {
        let inv = two_hubs();
        let mut c = cfg("cloud-1");
        assert!(probe_targets(&inv, &c).is_empty());
        c.active_active = true;
        assert_eq!(
            probe_targets(&inv, &c),
            vec![
                ("gw-1".to_string(), "192.168.0.12:8473".parse().unwrap()),
                ("gw-3".to_string(), "192.168.0.13:8473".parse().unwrap()),
            ]
        );
        // On a hub's own node its relay is on loopback.
        let mut on_gw3 = cfg("gw-3");
        on_gw3.active_active = true;
        assert_eq!(
            probe_targets(&inv, &on_gw3)[1],
            ("gw-3".to_string(), "127.0.0.1:8473".parse().unwrap())
        );
        // One hub, or a fixed hub address: nothing to probe.
        let one = Inventory::embedded_default().unwrap();
        assert!(probe_targets(&one, &c).is_empty());
        c.hub_address = Some("10.9.9.9".parse().unwrap());
        assert!(probe_targets(&inv, &c).is_empty());
    }

    #[test]
    fn the_portable_pump_sends_each_frame_to_its_peers_relay() {
        let inv = two_hubs();
        let mut c = cfg("cloud-1");
        c.active_active = true;
        let d = desired_state(&inv, &c).unwrap();
        let t = RelayTargets::new(&d, 8473);
        let frame_to = |mac_last: u8| {
            let mut f = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
            f.extend_from_slice(&[2, 0xfa, 0, 0, 0, mac_last]);
            f.extend_from_slice(&[0; 20]);
            f
        };
        assert_eq!(
            t.for_frame(&frame_to(3)),
            "192.168.0.12:8473".parse().unwrap()
        );
        assert_eq!(
            t.for_frame(&frame_to(5)),
            "192.168.0.13:8473".parse().unwrap()
        );
        // Unknown or short frames go to the state's relay.
        assert_eq!(t.for_frame(&frame_to(9)), t.default);
        assert_eq!(t.for_frame(&[0x08, 0, 0, 0]), t.default);
        assert_eq!(t.default, "192.168.0.12:8473".parse().unwrap());
    }

    #[test]
    fn status_is_ready_only_after_an_apply_and_counts_repairs_and_errors() {
        use petrel_transport::admin::AdminState as _;
        let st = NodeRoleStatus::new("cloud-1");
        assert_eq!(st.ready(), Err(NodeRoleNotReady::Starting));
        assert_eq!(NodeRoleNotReady::Starting.to_string(), "starting");
        st.set_waiting("no hub yet");
        assert_eq!(
            st.ready(),
            Err(NodeRoleNotReady::Waiting("no hub yet".into()))
        );
        let inv = Inventory::embedded_default().unwrap();
        let d = desired_state(&inv, &cfg("cloud-1")).unwrap();
        st.applied(&d, Ok(false));
        assert_eq!(st.ready(), Ok(()));
        st.set_waiting("ignored once applied");
        assert_eq!(st.ready(), Ok(()));
        st.applied(&d, Ok(true));
        st.applied(
            &d,
            Err(&petrel_datapath::DatapathError::Config("EPERM".into())),
        );
        assert_eq!(
            st.ready(),
            Err(NodeRoleNotReady::CannotApply(
                "invalid datapath configuration: EPERM".into()
            ))
        );
        assert_eq!(
            st.ready().unwrap_err().to_string(),
            "cannot apply the node's routes: invalid datapath configuration: EPERM"
        );
        let m = st.metrics();
        assert!(
            m.contains("petrel_node_role_ready{hooks=\"none\"} 0"),
            "{m}"
        );
        assert!(m.contains("petrel_node_role_peers 3"), "{m}");
        assert!(m.contains("petrel_node_role_repairs_total 1"), "{m}");
        assert!(m.contains("petrel_node_role_apply_errors_total 1"), "{m}");
        assert_eq!(st.status()["relay"], "192.168.0.12");
    }
}
