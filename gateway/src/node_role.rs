//! The node role: on every cloud node (and on Express Connect nodes) it makes traffic for
//! public-site pod CIDRs reach the active hub, with each site's MTU, and keeps it that way when
//! Flannel or anyone else rewrites the node's networking. It never touches Flannel's own objects:
//! policy rules and a table of our own win over Flannel's main-table routes (see
//! `petrel-datapath`).
//!
//! On the hub's own node the relay is local (the hub listens on the relay port); elsewhere it is
//! the hub node's underlay address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
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
    pub datapath: DatapathConfig,
}

/// The routes this node needs: every public-site node's pod CIDRs through the hub.
pub fn desired_state(inv: &Inventory, cfg: &NodeRoleConfig) -> Result<DesiredState, NodeRoleError> {
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
        (None, Some(h)) => match h.public_ip.or_else(|| h.addresses.first().copied()) {
            Some(IpAddr::V4(ip)) => Relay::Remote(ip),
            _ => return Err(NodeRoleError::NoHub),
        },
        (None, None) => return Err(NodeRoleError::NoHub),
    };
    let mut peers = Vec::new();
    for n in inv
        .nodes()
        .filter(|n| inv.site_kind_of(n) == Some(SiteKind::Public))
    {
        let Some(mac) = n.vtep_mac else { continue };
        for cidr in &n.pod_cidrs {
            if let IpNet::V4(v4) = cidr {
                peers.push(PeerRoute {
                    cidr: *v4,
                    vtep_mac: mac.0,
                    mtu: cfg.site_mtu,
                });
            }
        }
    }
    Ok(DesiredState { peers, relay })
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
    let (_keep, rx) = watch::channel(desired);
    run_desired(cfg, rx, shutdown).await
}

/// Runs the node role with a desired state that changes (Kubernetes mode: Nodes come and go,
/// the active hub moves) until `shutdown`, then removes what it added.
pub async fn run_desired(
    cfg: NodeRoleConfig,
    mut desired_rx: watch::Receiver<DesiredState>,
    shutdown: CancellationToken,
) -> Result<(), NodeRoleError> {
    let mut desired = desired_rx.borrow_and_update().clone();
    let mut dp = Datapath::open(cfg.datapath.clone()).await?;
    let mode = dp.mode();
    info!(node = %cfg.node_name, hooks = %mode, relay = ?desired.relay, peers = desired.peers.len(), "node role starting");
    let report = dp.apply(&desired).await?;
    debug!(?report, "initial apply");
    // In portable mode userspace carries the frames from the TUN device to the relay.
    let target = Arc::new(RwLock::new(relay_target(
        &desired.relay,
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
                            let dest = to.read().map(|t| *t).ok();
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
                        *t = relay_target(&desired.relay, cfg.datapath.relay_port);
                    }
                }
            }
        }
        match dp.apply(&desired).await {
            Ok(r) if r.changed() => info!(report = ?r, "repaired the node's routes"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot apply the node's routes; retrying"),
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
            datapath: DatapathConfig::default(),
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
}
