//! The hub in Kubernetes mode: the Node watcher feeds the hub's inventory (and through it the
//! switch table, the agents' routes and admission), the elector decides whether this hub serves
//! and which hub is active, and what changes is written back onto the Nodes; [`csr`] signs edge
//! nodes' CertificateSigningRequests while this hub is the active one.
//!
//! It sits above both [`crate::k8s`] (the API-side parts) and [`crate::hub`] (the running hub),
//! so neither of those depends on the other's wiring.

pub mod csr;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use petrel_proto::GatewayEndpoint;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agent_registry::AgentRegistry;
use crate::hub::dataplane::Dataplane;
use crate::hub::refresh::Refresher;
use crate::hub::serving::ServingGate;
use crate::hub::status::ClusterStatus;
use crate::hub::{Hub, NotServing};
use crate::inventory::{Inventory, SiteKind};
use crate::inventory_store::InventoryWriter;
use crate::k8s::election::{self, ElectionState, ElectorConfig, Role};
use crate::k8s::membership::{self, RenewerConfig};
use crate::k8s::nodes::{self, ClusterView};
use crate::k8s::status::{tunnel_key, Annotator, EventRecorder, TunnelAnnotations};
use crate::k8s::translate::format_endpoints;
use crate::k8s::{keys, KubeSettings};
use crate::metrics::HubMetrics;

/// The endpoint list agents are sent: every candidate's published endpoints (this hub's own
/// from its configuration until its annotation shows up), those of the `active` hubs marked
/// active (the Lease holder; active-active: every live hub).
pub fn gateway_list(
    view: &ClusterView,
    me: &str,
    my_endpoints: &[(String, u16)],
    active: &BTreeSet<String>,
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
                active: active.contains(&c.name),
            });
        }
    }
    out
}

/// The public sites of `inv` and the hub of `active` that owns each (`petrel_proto::ownership`,
/// as agents and node roles compute it).
pub fn site_owners(inv: &Inventory, active: &BTreeSet<String>) -> BTreeMap<String, String> {
    inv.sites()
        .filter(|s| s.kind == SiteKind::Public)
        .filter_map(|s| {
            let owner = petrel_proto::ownership::owner(&s.name, active.iter().map(String::as_str))?;
            Some((s.name.clone(), owner.to_string()))
        })
        .collect()
}

/// `site=hub` pairs for an Event's message.
fn owners_text(owners: &BTreeMap<String, String>) -> String {
    let v: Vec<String> = owners.iter().map(|(s, h)| format!("{s}={h}")).collect();
    if v.is_empty() {
        "no public sites".into()
    } else {
        v.join(", ")
    }
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
    /// The VXLAN relay, whose answers to node roles' liveness probes follow this hub's label
    /// in active-active mode.
    pub relay: Option<Arc<Dataplane>>,
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
            relay: hub.relay_dataplane(),
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
    let mut published_role: Option<&'static str> = None;
    // Active-active: this hub's own Lease while it is labelled, and every hub's.
    let active_active = settings.active_active;
    let (member_tx, member_rx) = watch::channel(false);
    let renewer_stop = CancellationToken::new();
    let renewer = active_active.then(|| {
        membership::spawn_renewer(
            client.clone(),
            RenewerConfig {
                namespace: settings.namespace.clone(),
                base: settings.lease_name.clone(),
                node: node.clone(),
                duration: settings.lease_duration,
                renew: settings.renew_interval,
            },
            member_rx,
            renewer_stop.clone(),
        )
    });
    let (_live_keep, idle_live) = watch::channel(None);
    let mut live_rx = if active_active {
        membership::follow(
            client.clone(),
            &settings.namespace,
            &settings.lease_name,
            shutdown.clone(),
        )
    } else {
        idle_live
    };
    let events = EventRecorder::new(client.clone(), &node);
    let mut shown_active: Option<BTreeSet<String>> = None;
    let mut shown_owned: Option<String> = None;
    // Active-active, label removed: serving until then, while the others take the sites.
    let mut leaving_until: Option<tokio::time::Instant> = None;
    let mut was_member = false;
    loop {
        let view = view_rx.borrow_and_update().clone();
        let election: ElectionState = election_rx.borrow_and_update().clone();
        let live = live_rx.borrow_and_update().clone();
        let candidate = view.synced && view.is_candidate(&node);
        if active_active && view.synced {
            // Make before break: without the label this hub stops answering probes and drops
            // its Lease at once, so node roles and the other hubs move its sites, and it keeps
            // relaying and serving its tunnels until they have.
            if was_member && !candidate && leaving_until.is_none() {
                info!(handover = ?crate::hub::ACTIVE_ACTIVE_HANDOVER, "cloud-gateway label removed: handing this hub's sites over before it stops serving");
                leaving_until =
                    Some(tokio::time::Instant::now() + crate::hub::ACTIVE_ACTIVE_HANDOVER);
            }
            if candidate {
                leaving_until = None;
            }
            was_member = candidate;
            member_tx.send_if_modified(|m| std::mem::replace(m, candidate) != candidate);
            if let Some(r) = &ctx.relay {
                r.set_answering_probes(candidate);
            }
        }
        let leaving = leaving_until.is_some_and(|t| tokio::time::Instant::now() < t);
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
        let active: BTreeSet<String> = if active_active {
            membership::active_hubs(
                view.candidates.iter().map(|c| c.name.as_str()),
                live.as_ref(),
            )
        } else {
            election.holder.iter().cloned().collect()
        };
        ctx.refresher
            .set_gateways(Some(gateway_list(&view, &node, &my_endpoints, &active)));
        let serving = if leaving {
            Ok(())
        } else {
            serving_for(election.role, &node, &settings.keys.gateway)
        };
        // Active-active: every labelled hub that serves is active; the Lease holder only signs.
        let role = if active_active && serving.is_ok() && candidate {
            "active"
        } else {
            election.role.as_str()
        };
        ctx.serving.set(serving);
        let carries = if active_active {
            active.contains(&node) && candidate
        } else {
            election.role == Role::Active
        };
        ctx.metrics.active.set(i64::from(carries && view.synced));
        ctx.metrics
            .agents_expected
            .set(crate::metrics::public_site_nodes(&view.inventory));
        was_active = election.role == Role::Active && view.synced;
        if published_role != Some(role) && election.role != Role::Starting {
            annotator.set(&node, keys::HUB_ROLE, Some(role.into()));
            published_role = Some(role);
        }
        let owners = (active_active && view.synced).then(|| site_owners(&view.inventory, &active));
        if let Some(owners) = &owners {
            // Which hub owns which site: an Event on this hub's Node when the live set
            // changes, and the sites it owns on its Node.
            if shown_active.as_ref() != Some(&active) {
                let msg = format!(
                    "active Petrel hubs: {}; site owners: {}",
                    active.iter().cloned().collect::<Vec<_>>().join(", "),
                    owners_text(owners)
                );
                info!("{msg}");
                if shown_active.is_some() {
                    events.record(false, "HubOwnership", msg);
                }
                shown_active = Some(active.clone());
            }
            let mine: Vec<&str> = owners
                .iter()
                .filter(|(_, h)| **h == node && candidate)
                .map(|(s, _)| s.as_str())
                .collect();
            let mine = mine.join(",");
            if shown_owned.as_deref() != Some(mine.as_str()) {
                annotator.set(&node, keys::OWNED_SITES, Some(mine.clone()));
                shown_owned = Some(mine);
            }
        }
        ctx.cluster_status.set(serde_json::json!({
                "node": node,
                "role": role,
                "hub_mode": if active_active { "active-active" } else { "active-standby" },
                "active_hubs": active,
                "leaving": leaving,
                "lease": format!("{}/{}", settings.namespace, settings.lease_name),
                "lease_holder": election.holder,
                "api_reachable": election.api_ok,
                "nodes_synced": view.synced,
                "candidates": view.candidates.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                "rejected_nodes": view.rejected,
        }));
        let leave_at = leaving_until.filter(|_| leaving);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = view_rx.changed() => if r.is_err() { break },
            r = election_rx.changed() => if r.is_err() { break },
            r = live_rx.changed() => if r.is_err() { break },
            _ = async { match leave_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
        }
    }
    // Active-active: the own Lease goes first, so the others drop this hub while it drains.
    renewer_stop.cancel();
    if let Some(r) = renewer {
        let _ = r.await;
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
            &BTreeSet::from(["cloud-1".to_string()]),
        );
        assert_eq!(l.len(), 2);
        assert!(l[0].active && l[0].name == "cloud-1");
        assert!(!l[1].active && l[1].host == "203.0.113.10");
        // Another candidate without published endpoints is left out.
        let l = gateway_list(&view, "x", &[], &BTreeSet::from(["gw-1".to_string()]));
        assert_eq!(l.len(), 1);
        // Active-active: every hub of the set is active.
        let both = BTreeSet::from(["gw-1".to_string(), "cloud-1".to_string()]);
        let l = gateway_list(&view, "gw-1", &[("203.0.113.10".into(), 7443)], &both);
        assert!(l.iter().all(|g| g.active), "{l:?}");
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
