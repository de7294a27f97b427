//! The Node watcher: a kube-runtime watcher (list + watch, relist on expiry, exponential backoff
//! while the API server is unreachable) feeding [`ClusterIndex`], and publishing a
//! [`ClusterView`] after every change. Consumers (the hub, the node role) read the latest view;
//! bursts (a relist of a thousand Nodes) coalesce into one.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::translate::{Candidate, ClusterIndex};
use super::LabelKeys;
use crate::inventory::Inventory;

/// What the cluster says, at one moment.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub inventory: Inventory,
    /// Cloud nodes with the gateway label, and their published endpoints.
    pub candidates: Vec<Candidate>,
    /// Nodes left out of the inventory, and why.
    pub rejected: BTreeMap<String, String>,
    /// The first complete list has arrived.
    pub synced: bool,
    /// Every Node's addresses, ExternalIP first.
    pub public_addresses: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Tunnel-state annotations (`tunnel.petrel.io/<hub>`) by Node.
    pub tunnel_states: BTreeMap<String, BTreeMap<String, String>>,
}

impl ClusterView {
    pub fn is_candidate(&self, node: &str) -> bool {
        self.candidates.iter().any(|c| c.name == node)
    }
}

fn view_of(index: &ClusterIndex, synced: bool) -> ClusterView {
    ClusterView {
        inventory: index.inventory().clone(),
        candidates: index.candidates(),
        rejected: index
            .rejected()
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        synced,
        public_addresses: index.public_addresses(),
        tunnel_states: index.tunnel_states(),
    }
}

/// Starts the watcher; the receiver holds the latest view (unsynced and empty at first).
pub fn spawn(
    client: kube::Client,
    keys: LabelKeys,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<ClusterView>> {
    let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
    tokio::spawn(run(client, keys, tx, shutdown));
    rx
}

async fn run(
    client: kube::Client,
    keys: LabelKeys,
    tx: watch::Sender<Arc<ClusterView>>,
    shutdown: CancellationToken,
) {
    let api: kube::Api<KubeNode> = kube::Api::all(client);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    let mut index = ClusterIndex::new(keys);
    let mut buffer: Vec<KubeNode> = Vec::new();
    let mut synced = false;
    let mut last_error: Option<String> = None;
    let mut last_rejected: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = stream.next() => match ev { Some(ev) => ev, None => return },
        };
        let changed = match ev {
            Ok(Event::Init) => {
                buffer.clear();
                false
            }
            Ok(Event::InitApply(n)) => {
                buffer.push(n);
                false
            }
            Ok(Event::InitDone) => {
                index.reset(&buffer);
                buffer.clear();
                if last_error.take().is_some() || !synced {
                    info!(
                        nodes = index.inventory().nodes().count(),
                        sites = index.inventory().sites().count(),
                        candidates = ?index.candidates().iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                        "node list from the API server"
                    );
                }
                synced = true;
                true
            }
            Ok(Event::Apply(n)) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                let c = index.apply(&n);
                if c {
                    debug!(node = %name, "node changed");
                }
                c || candidates_changed(&tx, &index)
            }
            Ok(Event::Delete(n)) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                info!(node = %name, "node deleted");
                index.delete(&name)
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    warn!(error = %msg, "node watch failed; keeping the last inventory and retrying with backoff");
                    last_error = Some(msg);
                }
                false
            }
        };
        if changed {
            let view = view_of(&index, synced);
            for (n, why) in &view.rejected {
                if last_rejected.get(n) != Some(why) {
                    warn!(node = %n, reason = %why, "node left out of the inventory (its agent is refused)");
                }
            }
            last_rejected = view.rejected.clone();
            tx.send_replace(Arc::new(view));
        }
    }
}

fn candidates_changed(tx: &watch::Sender<Arc<ClusterView>>, index: &ClusterIndex) -> bool {
    tx.borrow().candidates != index.candidates()
}
