//! The node role in Kubernetes mode: routes for every public-site Node's pod CIDRs, relayed to
//! the node that holds the hub Lease. Both come from watches, so a new edge Node or a hub
//! failover reaches the kernel within moments. When the API server is unreachable the last
//! state stays applied.

use petrel_datapath::DesiredState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{election, nodes, KubeSettings};
use crate::node_role::{desired_state, run_desired, NodeRoleConfig, NodeRoleError};

fn compute(
    cfg: &NodeRoleConfig,
    view: &nodes::ClusterView,
    holder: &Option<String>,
) -> Result<DesiredState, NodeRoleError> {
    let mut c = cfg.clone();
    // One Lease-elected hub in Kubernetes mode: active-active needs each hub's own liveness
    // (a Lease per hub), which is not built yet; `--active-active` is for file inventories.
    c.active_active = false;
    if c.hub_address.is_none() {
        c.hub_node = holder.clone();
    }
    desired_state(&view.inventory, &c)
}

/// Runs the node role until `shutdown`.
pub async fn run(
    client: kube::Client,
    settings: KubeSettings,
    cfg: NodeRoleConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeRoleError> {
    let mut view_rx = nodes::spawn(client.clone(), settings.keys.clone(), shutdown.clone());
    let mut holder_rx = election::follow(
        client,
        &settings.namespace,
        &settings.lease_name,
        shutdown.clone(),
    );
    // The first state: wait for the node list (and the Lease, if there is one).
    let mut last_error = String::new();
    let first: DesiredState = loop {
        let view = view_rx.borrow_and_update().clone();
        let holder = holder_rx.borrow_and_update().clone();
        if !view.synced {
            cfg.status.set_waiting("waiting for the list of Nodes");
        }
        if view.synced {
            match compute(&cfg, &view, &holder) {
                Ok(d) => break d,
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
            _ = view_rx.changed() => {}
            _ = holder_rx.changed() => {}
        }
    };
    info!(node = %cfg.node_name, hub = ?holder_rx.borrow().clone(), "node role following the cluster");
    let (tx, rx) = watch::channel(first);
    let stop = shutdown.clone();
    let task_cfg = cfg.clone();
    tokio::spawn(async move {
        let mut last_error = String::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = view_rx.changed() => if r.is_err() { return },
                r = holder_rx.changed() => if r.is_err() { return },
            }
            let view = view_rx.borrow_and_update().clone();
            let holder = holder_rx.borrow_and_update().clone();
            match compute(&task_cfg, &view, &holder) {
                Ok(d) => {
                    last_error.clear();
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
