//! The node role in Kubernetes mode: routes for every public-site Node's pod CIDRs, relayed to
//! the node that holds the hub Lease, or with `hub-mode = active-active` each site's to the
//! live hub that owns it. All of it comes from watches (Nodes, the hub Lease or every hub's
//! Lease) and, active-active, from probes of every hub's relay port, so a new edge Node, a
//! failover or a dead hub reaches the kernel within moments. When the API server is
//! unreachable the last state stays applied (the probes still move a dead hub's sites).

use std::collections::BTreeSet;

use petrel_datapath::DesiredState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{election, membership, nodes, KubeSettings};
use crate::node_role::{
    desired_state_without, probe_hubs, probe_targets, run_desired, NodeRoleConfig, NodeRoleError,
};

/// What the routes are computed from.
struct Inputs {
    view: nodes::ClusterView,
    /// The single Lease's holder (active-standby).
    holder: Option<String>,
    /// Active-active: the hubs whose own Lease is live (`None` before the first listing).
    live: Option<BTreeSet<String>>,
    /// Active-active: the hubs that do not answer their relay probes.
    probe_down: BTreeSet<String>,
}

/// The hubs whose sites go elsewhere: those not live by their Lease, and those that do not
/// answer probes. (Every hub down means every hub counts again: `desired_state_without`.)
fn hubs_down(cfg: &NodeRoleConfig, inp: &Inputs) -> BTreeSet<String> {
    if !cfg.active_active {
        return BTreeSet::new();
    }
    let candidates = inp.view.inventory.gateways().map(|g| g.name.as_str());
    let active = membership::active_hubs(candidates, inp.live.as_ref());
    inp.view
        .inventory
        .gateways()
        .map(|g| g.name.clone())
        .filter(|g| !active.contains(g) || inp.probe_down.contains(g))
        .collect()
}

fn compute(
    cfg: &NodeRoleConfig,
    inp: &Inputs,
) -> Result<(DesiredState, BTreeSet<String>), NodeRoleError> {
    let mut c = cfg.clone();
    if c.hub_address.is_none() {
        c.hub_node = inp.holder.clone();
    }
    let down = hubs_down(&c, inp);
    Ok((desired_state_without(&inp.view.inventory, &c, &down)?, down))
}

/// Runs the node role until `shutdown`.
pub async fn run(
    client: kube::Client,
    settings: KubeSettings,
    mut cfg: NodeRoleConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeRoleError> {
    // `--active-active` on the node role, or the cluster's hub mode.
    cfg.active_active |= settings.active_active;
    let view_rx = nodes::spawn(client.clone(), settings.keys.clone(), shutdown.clone());
    let holder_rx = election::follow(
        client.clone(),
        &settings.namespace,
        &settings.lease_name,
        shutdown.clone(),
    );
    let (_live_keep, idle_live) = watch::channel(None);
    let live_rx = if cfg.active_active {
        membership::follow(
            client,
            &settings.namespace,
            &settings.lease_name,
            shutdown.clone(),
        )
    } else {
        idle_live
    };
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    let (down_tx, down_rx) = watch::channel(BTreeSet::new());
    if cfg.active_active {
        tokio::spawn(probe_hubs(targets_rx, down_tx, shutdown.clone()));
    }
    let mut w = Watches {
        view_rx,
        holder_rx,
        live_rx,
        down_rx,
        targets_tx,
        cfg: cfg.clone(),
    };
    // The first state: wait for the node list (and the Lease, if there is one).
    let mut last_error = String::new();
    let first: DesiredState = loop {
        let inp = w.read();
        if !inp.view.synced {
            cfg.status.set_waiting("waiting for the list of Nodes");
        } else {
            match compute(&cfg, &inp) {
                Ok((d, down)) => {
                    cfg.status.set_hubs_down(&down);
                    break d;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        warn!(error = %msg, "node role waiting for the cluster");
                        cfg.status
                            .set_waiting(&format!("waiting for the cluster: {msg}"));
                        last_error = msg;
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = w.changed() => {}
        }
    };
    info!(node = %cfg.node_name, hub = ?w.holder_rx.borrow().clone(), active_active = cfg.active_active, "node role following the cluster");
    let (tx, rx) = watch::channel(first);
    let stop = shutdown.clone();
    let task_cfg = cfg.clone();
    tokio::spawn(async move {
        let mut last_error = String::new();
        let mut last_down: Option<BTreeSet<String>> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                open = w.changed() => if !open { return },
            }
            let inp = w.read();
            match compute(&task_cfg, &inp) {
                Ok((d, down)) => {
                    last_error.clear();
                    if last_down.as_ref() != Some(&down) {
                        if task_cfg.active_active {
                            info!(?down, live = ?inp.live, "hubs whose sites go to the next hub");
                        }
                        task_cfg.status.set_hubs_down(&down);
                        last_down = Some(down);
                    }
                    tx.send_if_modified(|cur| {
                        if *cur != d {
                            *cur = d;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        warn!(error = %msg, "keeping the node's current routes");
                        last_error = msg;
                    }
                }
            }
        }
    });
    run_desired(cfg, rx, shutdown).await
}

/// Everything the routes follow, and where the probe targets go.
struct Watches {
    view_rx: watch::Receiver<std::sync::Arc<nodes::ClusterView>>,
    holder_rx: watch::Receiver<Option<String>>,
    live_rx: watch::Receiver<Option<BTreeSet<String>>>,
    down_rx: watch::Receiver<BTreeSet<String>>,
    targets_tx: watch::Sender<Vec<(String, std::net::SocketAddr)>>,
    cfg: NodeRoleConfig,
}

impl Watches {
    /// The inputs now; the hubs to probe follow the Node list.
    fn read(&mut self) -> Inputs {
        let view = self.view_rx.borrow_and_update().as_ref().clone();
        if view.synced {
            let targets = probe_targets(&view.inventory, &self.cfg);
            self.targets_tx
                .send_if_modified(|t| std::mem::replace(t, targets.clone()) != targets);
        }
        Inputs {
            view,
            holder: self.holder_rx.borrow_and_update().clone(),
            live: self.live_rx.borrow_and_update().clone(),
            probe_down: self.down_rx.borrow_and_update().clone(),
        }
    }

    /// Waits for any input to change; false once one of them is gone for good.
    async fn changed(&mut self) -> bool {
        tokio::select! {
            r = self.view_rx.changed() => r.is_ok(),
            r = self.holder_rx.changed() => r.is_ok(),
            r = self.live_rx.changed() => r.is_ok(),
            r = self.down_rx.changed() => r.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn inputs(live: Option<&[&str]>, probe_down: &[&str]) -> Inputs {
        // The lab inventory with cloud-1 labelled too: two hubs. x1 runs the node role.
        let text = include_str!("../default-inventory.toml").replace(
            "public_ip = \"192.168.0.11\"\n",
            "public_ip = \"192.168.0.11\"\ngateway = true\n",
        );
        let inv = crate::inventory::Inventory::from_toml(&text, "test").unwrap();
        Inputs {
            view: nodes::ClusterView {
                inventory: inv,
                synced: true,
                ..Default::default()
            },
            holder: Some("gw-1".into()),
            live: live.map(names),
            probe_down: names(probe_down),
        }
    }

    fn cfg(active_active: bool) -> NodeRoleConfig {
        NodeRoleConfig {
            node_name: "x1".into(),
            hub_address: None,
            hub_node: None,
            site_mtu: 1380,
            active_active,
            datapath: petrel_datapath::DatapathConfig::default(),
            status: crate::node_role::NodeRoleStatus::new("x1"),
        }
    }

    #[test]
    fn hubs_without_a_live_lease_or_answers_lose_their_sites() {
        // Active-standby: nothing is down, the Lease holder carries everything.
        assert!(hubs_down(&cfg(false), &inputs(Some(&["gw-1"]), &["cloud-1"])).is_empty());
        let c = cfg(true);
        // Before any Lease listing, and with every Lease live: only probes count.
        assert!(hubs_down(&c, &inputs(None, &[])).is_empty());
        assert!(hubs_down(&c, &inputs(Some(&["gw-1", "cloud-1"]), &[])).is_empty());
        assert_eq!(
            hubs_down(&c, &inputs(Some(&["gw-1", "cloud-1"]), &["gw-1"])),
            names(&["gw-1"])
        );
        // cloud-1 lost the API server (its Lease is stale): its sites move although it
        // answers probes.
        assert_eq!(
            hubs_down(&c, &inputs(Some(&["gw-1"]), &[])),
            names(&["cloud-1"])
        );
        // No live Lease at all: every candidate counts.
        assert!(hubs_down(&c, &inputs(Some(&[]), &[])).is_empty());
    }
}
