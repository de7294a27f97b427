//! The hub in Kubernetes mode: the Node watcher feeds the hub's inventory (and through it the
//! switch table, the agents' routes and admission), the elector decides whether this hub serves
//! and which hub is active, and what changes is written back onto the Nodes; [`csr`] signs edge
//! nodes' CertificateSigningRequests while this hub is the active one.
//!
//! It sits above both [`crate::k8s`] (the API-side parts) and [`crate::hub`] (the running hub),
//! so neither of those depends on the other's wiring.

pub mod csr;

use std::sync::Arc;

use petrel_proto::GatewayEndpoint;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agent_registry::AgentRegistry;
use crate::hub::refresh::Refresher;
use crate::hub::serving::ServingGate;
use crate::hub::status::ClusterStatus;
use crate::hub::{Hub, NotServing};
use crate::inventory_store::InventoryWriter;
use crate::k8s::election::{self, ElectionState, ElectorConfig, Role};
use crate::k8s::nodes::{self, ClusterView};
use crate::k8s::status::{tunnel_key, Annotator, TunnelAnnotations};
use crate::k8s::translate::format_endpoints;
use crate::k8s::{keys, KubeSettings};
use crate::metrics::HubMetrics;

/// The endpoint list agents are sent: every candidate's published endpoints (this hub's own
/// from its configuration until its annotation shows up), the Lease holder's marked active.
pub fn gateway_list(
    view: &ClusterView,
    me: &str,
    my_endpoints: &[(String, u16)],
    holder: Option<&str>,
) -> Vec<GatewayEndpoint> {
    let mut out = Vec::new();
    for c in &view.candidates {
        let eps = if c.name == me && c.endpoints.is_empty() {
            my_endpoints.to_vec()
        } else {
            c.endpoints.clone()
        };
        for (host, port) in eps {
            out.push(GatewayEndpoint {
                name: c.name.clone(),
                host,
                port,
                active: holder == Some(c.name.as_str()),
            });
        }
    }
    out
}

/// Why a hub in `role` does not serve, if it does not.
pub fn serving_for(role: Role, node: &str, gateway_label: &str) -> Result<(), NotServing> {
    match role {
        Role::Active | Role::Standby => Ok(()),
        Role::Starting => Err(NotServing::Starting),
        Role::NotCandidate => Err(NotServing::NotCandidate {
            node: node.into(),
            label: gateway_label.into(),
        }),
    }
}

/// What the Kubernetes integration is given of a bound hub .
#[derive(Debug)]
pub struct KubeParts {
    pub inventory: InventoryWriter,
    pub serving: Arc<ServingGate>,
    pub refresher: Arc<Refresher>,
    pub registry: Arc<AgentRegistry>,
    pub cluster_status: Arc<ClusterStatus>,
    pub metrics: Arc<HubMetrics>,
    /// For CertificateSigningRequests.
    pub csr: csr::CsrParts,
    /// This hub's endpoints and whether they were configured (else the Node's address is
    /// advertised), and its UDP port.
    pub advertise: Vec<(String, u16)>,
    pub advertise_given: bool,
    pub port: u16,
}

impl KubeParts {
    /// What the Kubernetes integration is given, with the inventory writer; `None` if the
    /// writer was taken.
    pub fn from_hub(hub: &mut Hub) -> Option<Self> {
        Some(Self {
            inventory: hub.take_inventory_writer()?,
            serving: hub.serving.clone(),
            refresher: hub.refresher.clone(),
            registry: hub.registry.clone(),
            cluster_status: hub.cluster_status.clone(),
            metrics: hub.metrics.clone(),
            csr: csr::CsrParts {
                signer: hub.signer.clone(),
                revocations: hub.revocation.revocations.clone(),
                inventory: hub.inventory.clone(),
                metrics: hub.metrics.clone(),
                log_budget: hub.log_budget.clone(),
            },
            advertise: hub.config.advertise.clone(),
            advertise_given: hub.config.advertise_given,
            port: hub.local_addr.port(),
        })
    }
}

/// Runs the Kubernetes side of a bound hub until `shutdown`. `node` is this hub's node name.
pub async fn run(
    ctx: KubeParts,
    client: kube::Client,
    settings: KubeSettings,
    node: String,
    shutdown: CancellationToken,
) {
    ctx.serving
        .set(serving_for(Role::Starting, &node, &settings.keys.gateway));
    let mut my_endpoints = ctx.advertise.clone();
    let mut endpoints_value = format_endpoints(&my_endpoints);
    let mut view_rx = nodes::spawn(client.clone(), settings.keys.clone(), shutdown.clone());
    if !ctx.advertise_given {
        // Advertise this Node's ExternalIP (else InternalIP) once the node list is here.
        let port = ctx.port;
        let found = view_rx.wait_for(|v| v.synced).await.ok().and_then(|v| {
            v.public_addresses
                .get(&node)
                .and_then(|a| a.first().copied())
        });
        match found {
            Some(ip) => {
                my_endpoints = vec![(ip.to_string(), port)];
                endpoints_value = format_endpoints(&my_endpoints);
                info!(endpoint = %endpoints_value, "advertising this node's address (no --advertise)");
            }
            None => tracing::warn!(
                node = %node,
                "this Node has no ExternalIP or InternalIP; advertising {endpoints_value} (set --advertise)"
            ),
        }
    }
    let (candidate_tx, candidate_rx) = watch::channel(None::<bool>);
    let elector_stop = CancellationToken::new();
    let (mut election_rx, elector) = election::spawn(
        client.clone(),
        ElectorConfig {
            namespace: settings.namespace.clone(),
            lease_name: settings.lease_name.clone(),
            identity: node.clone(),
            duration: settings.lease_duration,
            renew: settings.renew_interval,
            retry: settings.retry_interval,
            endpoints: endpoints_value.clone(),
        },
        candidate_rx,
        elector_stop.clone(),
    );
    // The active hub signs (or denies) edge nodes' CertificateSigningRequests.
    tokio::spawn(csr::run(
        ctx.csr.clone(),
        client.clone(),
        election_rx.clone(),
        shutdown.clone(),
    ));
    let annotator = Annotator::spawn(client.clone(), shutdown.clone());
    ctx.registry.set_observer(Arc::new(TunnelAnnotations {
        annotator: annotator.clone(),
        key: tunnel_key(&node),
    }));
    let my_key = tunnel_key(&node);
    let mut was_active = false;
    let mut applied: Option<Arc<ClusterView>> = None;
    let mut published_role: Option<Role> = None;
    loop {
        let view = view_rx.borrow_and_update().clone();
        let election: ElectionState = election_rx.borrow_and_update().clone();
        if view.synced {
            if applied.is_none() {
                // Before serving: tunnels this hub had before it restarted are gone.
                for (n, states) in &view.tunnel_states {
                    let stale = states.get(&my_key).is_some_and(|v| {
                        v.starts_with("connected") && ctx.registry.get(n).is_none()
                    });
                    if stale {
                        annotator.set(
                            n,
                            &my_key,
                            Some(format!(
                                "disconnected at {}: hub restarted",
                                crate::k8s::rfc3339(std::time::SystemTime::now())
                            )),
                        );
                    }
                }
            }
            let view_changed = !applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, &view));
            if election.role == Role::Active && (view_changed || !was_active) {
                // The active hub removes what hubs that are no longer candidates left behind.
                let live: Vec<String> = view
                    .candidates
                    .iter()
                    .map(|c| tunnel_key(&c.name))
                    .collect();
                for (n, states) in &view.tunnel_states {
                    for k in states.keys().filter(|k| !live.contains(k) && **k != my_key) {
                        annotator.set(n, k, None);
                    }
                }
            }
            if !applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, &view)) {
                let generation_changed = applied
                    .as_ref()
                    .is_none_or(|a| a.inventory.generation() != view.inventory.generation());
                if generation_changed {
                    ctx.inventory.replace(view.inventory.clone());
                }
                // Publish (or repair) this hub's endpoints on its own Node.
                let mine = view
                    .inventory
                    .node(&node)
                    .map(|_| view.candidates.iter().find(|c| c.name == node));
                if let Some(c) = mine {
                    let shown = c.map(|c| format_endpoints(&c.endpoints));
                    if c.is_none() || shown.as_deref() != Some(endpoints_value.as_str()) {
                        annotator.set(
                            &node,
                            keys::GATEWAY_ENDPOINTS,
                            Some(endpoints_value.clone()),
                        );
                    }
                }
                applied = Some(view.clone());
            }
            candidate_tx.send_if_modified(|c| {
                let now = Some(view.is_candidate(&node));
                if *c != now {
                    *c = now;
                    true
                } else {
                    false
                }
            });
        }
        ctx.refresher.set_gateways(Some(gateway_list(
            &view,
            &node,
            &my_endpoints,
            election.holder.as_deref(),
        )));
        ctx.serving
            .set(serving_for(election.role, &node, &settings.keys.gateway));
        ctx.metrics
            .active
            .set(i64::from(election.role == Role::Active && view.synced));
        ctx.metrics
            .agents_expected
            .set(crate::metrics::public_site_nodes(&view.inventory));
        was_active = election.role == Role::Active && view.synced;
        if published_role != Some(election.role) && election.role != Role::Starting {
            annotator.set(&node, keys::HUB_ROLE, Some(election.role.as_str().into()));
            published_role = Some(election.role);
        }
        ctx.cluster_status.set(serde_json::json!({
                "node": node,
                "role": election.role.as_str(),
                "lease": format!("{}/{}", settings.namespace, settings.lease_name),
                "lease_holder": election.holder,
                "api_reachable": election.api_ok,
                "nodes_synced": view.synced,
                "candidates": view.candidates.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                "rejected_nodes": view.rejected,
        }));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = view_rx.changed() => if r.is_err() { break },
            r = election_rx.changed() => if r.is_err() { break },
        }
    }
    // Release the Lease so a standby takes over at once.
    elector_stop.cancel();
    let _ = elector.await;
    info!("Kubernetes integration stopped");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::k8s::translate::Candidate;

    #[test]
    fn gateway_list_marks_the_holder_active() {
        let view = ClusterView {
            candidates: vec![
                Candidate {
                    name: "cloud-1".into(),
                    endpoints: vec![("203.0.113.11".into(), 7443)],
                },
                Candidate {
                    name: "gw-1".into(),
                    endpoints: vec![],
                },
            ],
            ..Default::default()
        };
        let l = gateway_list(
            &view,
            "gw-1",
            &[("203.0.113.10".into(), 7443)],
            Some("cloud-1"),
        );
        assert_eq!(l.len(), 2);
        assert!(l[0].active && l[0].name == "cloud-1");
        assert!(!l[1].active && l[1].host == "203.0.113.10");
        // Another candidate without published endpoints is left out.
        let l = gateway_list(&view, "x", &[], Some("gw-1"));
        assert_eq!(l.len(), 1);
        assert_eq!(
            serving_for(Role::NotCandidate, "n", "k"),
            Err(NotServing::NotCandidate {
                node: "n".into(),
                label: "k".into()
            })
        );
        assert!(serving_for(Role::NotCandidate, "n", "k")
            .unwrap_err()
            .to_string()
            .contains("label k"));
        assert!(serving_for(Role::Standby, "n", "k").is_ok());
    }
}
