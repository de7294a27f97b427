//! What Petrel writes into the cluster for operators: annotations on Nodes and Events.
//!
//! * On each edge Node, one annotation per hub, `tunnel.petrel.io/<hub node>`:
//!   `connected since 2026-01-01T10:00:00Z from 203.0.113.2:40123` or
//!   `disconnected at 2026-01-01T10:05:00Z: <reason>`; `kubectl describe node` shows them.
//! * On each gateway candidate's Node, `petrel.io/gateway-endpoints` (what agents dial) and
//!   `petrel.io/hub-role` (`active`, `standby`, `not-serving`).
//! * Events on the gateway's Node when its election role changes (`HubActive`, `HubStandby`,
//!   `HubNotCandidate`), in namespace `default` (where Events about Nodes must be).
//!
//! Writes are JSON merge patches of single annotation keys (no read-modify-write, no conflicts
//! with kubelet or other hubs), coalesced per node and retried while the API server is away.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Event, EventSource, Node as KubeNode, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{bounded, keys};
use crate::agent_registry::{AgentEntry, TunnelObserver};

const CALL: Duration = Duration::from_secs(10);
const RETRY: Duration = Duration::from_secs(2);

/// `tunnel.petrel.io/<hub>`; names longer than 63 characters are shortened with a hash.
pub fn tunnel_key(hub: &str) -> String {
    let name = if hub.len() <= 63 {
        hub.to_string()
    } else {
        let h = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(hub.as_bytes()));
        format!("{}-{}", hub[..54].trim_end_matches(['.', '-']), &h[..8])
    };
    format!("{}{name}", keys::TUNNEL_PREFIX)
}

type Change = (String, String, Option<String>);

/// Sets and removes annotations on Nodes, in the background.
#[derive(Debug, Clone)]
pub struct Annotator {
    tx: mpsc::UnboundedSender<Change>,
}

impl Annotator {
    pub fn spawn(client: kube::Client, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_annotator(kube::Api::all(client), rx, shutdown));
        Self { tx }
    }

    /// `Some(v)` sets `key` on `node`, `None` removes it.
    pub fn set(&self, node: &str, key: &str, value: Option<String>) {
        let _ = self.tx.send((node.into(), key.into(), value));
    }
}

async fn run_annotator(
    nodes: kube::Api<KubeNode>,
    mut rx: mpsc::UnboundedReceiver<Change>,
    shutdown: CancellationToken,
) {
    let mut pending: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut last_error: Option<String> = None;
    loop {
        let wait = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            c = rx.recv() => match c {
                Some((node, key, value)) => {
                    pending.entry(node).or_default().insert(key, value);
                    while let Ok((node, key, value)) = rx.try_recv() {
                        pending.entry(node).or_default().insert(key, value);
                    }
                    if retry_at.is_some() {
                        continue;
                    }
                }
                None => return,
            },
            _ = wait => {}
        }
        retry_at = None;
        let batch = std::mem::take(&mut pending);
        for (node, changes) in batch {
            let annotations: serde_json::Map<String, serde_json::Value> = changes
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.clone()
                            .map(serde_json::Value::String)
                            .unwrap_or(serde_json::Value::Null),
                    )
                })
                .collect();
            let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
            match bounded(
                CALL,
                nodes.patch(&node, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await
            {
                Ok(_) => {
                    debug!(node = %node, ?changes, "annotated node");
                    last_error = None;
                }
                Err(e) if e.status() == Some(404) => {
                    debug!(node = %node, "node gone; annotation dropped");
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        warn!(node = %node, error = %msg, "cannot annotate node; retrying");
                        last_error = Some(msg);
                    }
                    // Newer changes that arrived meanwhile win.
                    let slot = pending.entry(node).or_default();
                    for (k, v) in changes {
                        slot.entry(k).or_insert(v);
                    }
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            }
        }
    }
}

/// Writes each agent's tunnel state onto its Node.
#[derive(Debug)]
pub struct TunnelAnnotations {
    pub annotator: Annotator,
    pub key: String,
}

impl TunnelObserver for TunnelAnnotations {
    fn connected(&self, entry: &AgentEntry) {
        self.annotator.set(
            &entry.node,
            &self.key,
            Some(format!(
                "connected since {} from {}",
                super::rfc3339(entry.since),
                entry.remote()
            )),
        );
    }

    fn disconnected(&self, node: &str, reason: &str) {
        let mut reason = reason.replace(['\n', '\r'], " ");
        if reason.len() > 200 {
            let mut cut = 200;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        self.annotator.set(
            node,
            &self.key,
            Some(format!(
                "disconnected at {}: {reason}",
                super::rfc3339(SystemTime::now())
            )),
        );
    }
}

/// Records core/v1 Events about one Node the way kubelet does: in namespace `default` (the
/// API server requires it for cluster-scoped objects) with `involvedObject.uid` = the node name,
/// so `kubectl describe node` lists them.
#[derive(Debug, Clone)]
pub struct EventRecorder {
    events: kube::Api<Event>,
    node: String,
}

/// Where Events about Nodes must live.
pub const NODE_EVENTS_NAMESPACE: &str = "default";

impl EventRecorder {
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self {
            events: kube::Api::namespaced(client, NODE_EVENTS_NAMESPACE),
            node: node.into(),
        }
    }

    /// Records in the background; failures are logged, never fatal.
    pub fn record(&self, warning: bool, reason: &str, message: String) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", self.node)),
                namespace: Some(NODE_EVENTS_NAMESPACE.into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                kind: Some("Node".into()),
                name: Some(self.node.clone()),
                uid: Some(self.node.clone()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            source: Some(EventSource {
                component: Some("petrel-gateway".into()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            reporting_component: Some("petrel-gateway".into()),
            reporting_instance: Some(self.node.clone()),
            ..Default::default()
        };
        let events = self.events.clone();
        let reason = reason.to_string();
        tokio::spawn(async move {
            if let Err(e) = bounded(CALL, events.create(&PostParams::default(), &ev)).await {
                debug!(reason = %reason, error = %e, "cannot record event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_keys_are_valid_annotation_keys() {
        assert_eq!(tunnel_key("gw-1"), "tunnel.petrel.io/gw-1");
        let long = "a".repeat(40) + "." + &"b".repeat(40);
        let k = tunnel_key(&long);
        assert!(super::super::valid_label_key(&k), "{k}");
        assert!(k.len() <= "tunnel.petrel.io/".len() + 63);
    }
}
