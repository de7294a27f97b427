//! Zero-touch enrolment: the active hub is the signer `petrel.io/edge-tunnel` of
//! `certificates.k8s.io/v1` CertificateSigningRequests (Kubernetes 1.19+).
//!
//! An edge agent makes its key on the node and creates a CSR for its node name with the node's
//! own kubelet credentials, so the API server stamps the request with `spec.username =
//! system:node:<name>` and group `system:nodes`: an identity only that node holds, which the
//! requester cannot choose. The active hub watches the CSRs of its signer and decides each with
//! [`decide_csr`] (pure): the requester must be a node, the CSR must ask for that node's name
//! and nothing else, and the Node must be one the hub admits (an edge node in a public site, as
//! for tunnels) and not revoked. It then approves (`/approval`) and signs (`/status`,
//! `status.certificate` = the node certificate followed by Petrel's CA), or denies with a reason
//! and message on the CSR plus a Kubernetes Event. The key never leaves the node; the agent reads
//! `status.certificate`.
//!
//! Writes are replaces with the object's resourceVersion, so two hubs that both think they are
//! active for a moment cannot approve or sign one request twice; a CSR whose write failed for a
//! transient reason is retried every [`RETRY`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use petrel_transport::pki::{der_to_pem, pem_to_der, CsrRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::hub::signer::NodeSigner;
use crate::inventory::{AdmissionError, Inventory};
use crate::inventory_store::InventoryReader;
use crate::k8s::election::{ElectionState, Role};
use crate::k8s::status::NODE_EVENTS_NAMESPACE;
use crate::k8s::{bounded, KubeError};
use crate::log_budget::LogBudget;
use crate::metrics::HubMetrics;
use crate::revocation::{RevocationList, Revocations};

/// Petrel's signer name.
pub const SIGNER_NAME: &str = "petrel.io/edge-tunnel";
/// The user prefix and group the API server gives a node's kubelet credentials.
pub const NODE_USER_PREFIX: &str = "system:node:";
pub const NODES_GROUP: &str = "system:nodes";
/// Usages a CSR may ask for; `client auth` is required (the certificate is a tunnel client's).
pub const ALLOWED_USAGES: &[&str] = &["client auth", "digital signature", "key encipherment"];
/// Largest `spec.request` read (a CSR for one name is well under 2 KiB).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// How often CSRs whose handling failed for a transient reason are tried again.
pub const RETRY: Duration = Duration::from_secs(2);
/// Most CSRs waiting for a retry; beyond it new ones wait for the next relist.
const MAX_RETRY: usize = 4096;
const CALL: Duration = Duration::from_secs(10);

/// What the hub reads off one CSR object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CsrFacts {
    pub name: String,
    pub signer: String,
    pub username: String,
    pub groups: Vec<String>,
    pub usages: Vec<String>,
    /// `spec.request` (PEM).
    pub request: Vec<u8>,
    pub approved: bool,
    /// Denied or Failed.
    pub finished: bool,
    pub has_certificate: bool,
}

impl CsrFacts {
    pub fn of(csr: &CertificateSigningRequest) -> Self {
        let status = csr.status.as_ref();
        let has = |t: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == t && c.status != "False"))
        };
        Self {
            name: csr.metadata.name.clone().unwrap_or_default(),
            signer: csr.spec.signer_name.clone(),
            username: csr.spec.username.clone().unwrap_or_default(),
            groups: csr.spec.groups.clone().unwrap_or_default(),
            usages: csr.spec.usages.clone().unwrap_or_default(),
            request: csr.spec.request.0.clone(),
            approved: has("Approved"),
            finished: has("Denied") || has("Failed"),
            has_certificate: status
                .and_then(|s| s.certificate.as_ref())
                .is_some_and(|c| !c.0.is_empty()),
        }
    }
}

/// What to do with a CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not ours, or already decided.
    Ignore,
    /// Cannot decide yet (the hub has not read its revocation list); try again later.
    Later(String),
    /// Approve (unless already approved) and sign a certificate for `node` with the CSR's key.
    Sign { node: String, csr_der: Vec<u8> },
    /// Refuse: `reason` is a CamelCase condition reason, `message` says why for operators.
    Refuse {
        reason: &'static str,
        message: String,
        node: Option<String>,
    },
}

fn refuse(reason: &'static str, message: String, node: Option<&str>) -> Decision {
    Decision::Refuse {
        reason,
        message,
        node: node.map(str::to_string),
    }
}

/// The signer's policy (pure: everything it looks at is an argument).
pub fn decide_csr(
    csr: &CsrFacts,
    inventory: &Inventory,
    revocations: Option<&RevocationList>,
) -> Decision {
    if csr.signer != SIGNER_NAME || csr.finished || csr.has_certificate {
        return Decision::Ignore;
    }
    // Who asked: only the API server sets spec.username, from the credentials it verified.
    let node = match csr.username.strip_prefix(NODE_USER_PREFIX) {
        Some(n) if csr.groups.iter().any(|g| g == NODES_GROUP) && !n.is_empty() => n,
        _ => {
            return refuse(
                "NotANode",
                format!(
                    "requested by {:?}, which is not a node's identity ({NODE_USER_PREFIX}<name> in group {NODES_GROUP}); only a node's kubelet credentials can ask for its tunnel certificate",
                    csr.username
                ),
                None,
            )
        }
    };
    if !crate::inventory::valid_node_name(node) {
        return refuse(
            "NotANode",
            format!("requested by {:?}: not a valid node name", csr.username),
            None,
        );
    }
    // What it asks for: exactly its own name.
    if csr.request.len() > MAX_REQUEST_BYTES {
        return refuse(
            "BadRequest",
            format!(
                "the request is {} bytes, more than {MAX_REQUEST_BYTES}",
                csr.request.len()
            ),
            Some(node),
        );
    }
    let parsed = std::str::from_utf8(&csr.request)
        .map_err(|_| "the request is not PEM".to_string())
        .and_then(|pem| pem_to_der(pem, "CERTIFICATE REQUEST").map_err(|e| e.to_string()))
        .and_then(|der| {
            CsrRequest::parse(&der)
                .map(|r| (der, r))
                .map_err(|e| e.to_string())
        });
    let (csr_der, req) = match parsed {
        Ok(p) => p,
        Err(e) => return refuse("BadRequest", e, Some(node)),
    };
    if req.common_name.as_deref() != Some(node) {
        return refuse(
            "WrongNode",
            format!(
                "{} asked for a certificate naming {}; a node may only ask for its own name",
                csr.username,
                req.common_name
                    .as_deref()
                    .map_or_else(|| "no name".to_string(), |n| format!("{n:?}"))
            ),
            Some(node),
        );
    }
    if req.other_sans > 0 || req.dns_names.iter().any(|d| d != node) {
        return refuse(
            "WrongNode",
            format!(
                "{} asked for other names ({:?} and {} non-DNS names) besides its own",
                csr.username, req.dns_names, req.other_sans
            ),
            Some(node),
        );
    }
    if !csr.usages.iter().any(|u| u == "client auth")
        || csr
            .usages
            .iter()
            .any(|u| !ALLOWED_USAGES.contains(&u.as_str()))
    {
        return refuse(
            "BadUsages",
            format!(
                "usages {:?}: a tunnel certificate needs \"client auth\" and may add only {:?}",
                csr.usages, ALLOWED_USAGES
            ),
            Some(node),
        );
    }
    // Whether the hub would admit that node's tunnel.
    let Some(revocations) = revocations else {
        return Decision::Later("the revocation list has not been read yet".into());
    };
    if let Err(e) = crate::revocation::check_enrolment(revocations, node) {
        return refuse("Revoked", e.to_string(), Some(node));
    }
    if let Err(e) = inventory.admit_agent(node) {
        let reason = match e {
            AdmissionError::UnknownNode(_) => "UnknownNode",
            AdmissionError::NotPublicSite { .. } => "NotAnEdgeNode",
        };
        return refuse(
            reason,
            format!("{e}; only an existing edge node of a public site gets a tunnel certificate"),
            Some(node),
        );
    }
    Decision::Sign {
        node: node.to_string(),
        csr_der,
    }
}

/// The metric outcome of a refusal reason.
fn outcome(reason: &str) -> &'static str {
    match reason {
        "NotANode" => "denied_not_a_node",
        "BadRequest" => "denied_bad_request",
        "WrongNode" => "denied_wrong_node",
        "BadUsages" => "denied_bad_usages",
        "Revoked" => "denied_revoked",
        "UnknownNode" => "denied_unknown_node",
        "NotAnEdgeNode" => "denied_not_edge",
        _ => "denied_other",
    }
}

fn condition(type_: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

fn push_condition(csr: &mut CertificateSigningRequest, c: CertificateSigningRequestCondition) {
    csr.status
        .get_or_insert_with(Default::default)
        .conditions
        .get_or_insert_with(Vec::new)
        .push(c);
}

/// Why handling a CSR stopped short.
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error("{0}")]
    Later(String),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// What the CSR signer uses of the hub: the node signer, the revocation list, the inventory,
/// its counters and the log budget.
#[derive(Debug, Clone)]
pub struct CsrParts {
    pub signer: Arc<NodeSigner>,
    pub revocations: Arc<Revocations>,
    pub inventory: InventoryReader,
    pub metrics: Arc<HubMetrics>,
    pub log_budget: Arc<LogBudget>,
}

/// The signer: runs while this hub is the active one, until `shutdown`.
pub async fn run(
    ctx: CsrParts,
    client: kube::Client,
    mut election: watch::Receiver<ElectionState>,
    shutdown: CancellationToken,
) {
    let api: kube::Api<CertificateSigningRequest> = kube::Api::all(client.clone());
    let events: kube::Api<Event> = kube::Api::namespaced(client, NODE_EVENTS_NAMESPACE);
    loop {
        // Wait to be the active hub.
        loop {
            if election.borrow_and_update().role == Role::Active {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = election.changed() => if r.is_err() { return },
            }
        }
        info!(
            signer = SIGNER_NAME,
            "signing CertificateSigningRequests of edge nodes"
        );
        let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
        let stream = watcher(api.clone(), config)
            .default_backoff()
            .applied_objects();
        futures_util::pin_mut!(stream);
        let mut retry: BTreeSet<String> = BTreeSet::new();
        let mut tick = tokio::time::interval(RETRY);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = election.changed() => {
                    if r.is_err() { return }
                    if election.borrow_and_update().role != Role::Active {
                        info!("no longer the active hub; leaving CertificateSigningRequests to the new one");
                        break;
                    }
                }
                item = stream.next() => match item {
                    Some(Ok(csr)) => {
                        let name = csr.metadata.name.clone().unwrap_or_default();
                        if let Err(e) = handle(&ctx, &api, &events, csr).await {
                            debug!(csr = %name, error = %e, "CertificateSigningRequest not handled yet; will retry");
                            if retry.len() < MAX_RETRY {
                                retry.insert(name);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            warn!(error = %msg, "watching CertificateSigningRequests failed; retrying");
                            last_error = Some(msg);
                        }
                    }
                    None => break,
                },
                _ = tick.tick(), if !retry.is_empty() => {
                    for name in std::mem::take(&mut retry) {
                        let again = match bounded(CALL, api.get_opt(&name)).await {
                            Ok(Some(csr)) => handle(&ctx, &api, &events, csr).await.is_err(),
                            Ok(None) => false,
                            Err(_) => true,
                        };
                        if again {
                            retry.insert(name);
                        }
                    }
                }
            }
        }
    }
}

async fn handle(
    ctx: &CsrParts,
    api: &kube::Api<CertificateSigningRequest>,
    events: &kube::Api<Event>,
    csr: CertificateSigningRequest,
) -> Result<(), HandleError> {
    let facts = CsrFacts::of(&csr);
    let decision = {
        let revocations = ctx.revocations.current();
        let inv = ctx.inventory.snapshot();
        decide_csr(&facts, &inv, revocations.as_deref())
    };
    let name = facts.name.clone();
    match decision {
        Decision::Ignore => Ok(()),
        Decision::Later(why) => Err(HandleError::Later(why)),
        Decision::Refuse {
            reason,
            message,
            node,
        } => {
            HubMetrics::inc_outcome(&ctx.metrics.csrs, outcome(reason));
            // Anyone with a node's credentials can provoke this: the log and the Events are
            // bounded by the hub's log budget, the metric counts every one.
            let noisy = ctx.log_budget.allow("CertificateSigningRequest refused");
            if noisy {
                warn!(csr = %name, user = %facts.username, reason, %message, "CertificateSigningRequest refused");
            }
            let mut csr = csr;
            if facts.approved {
                // Approved by someone else, but not by Petrel's policy: fail it, never sign.
                push_condition(&mut csr, condition("Failed", reason, message.clone()));
                bounded(
                    CALL,
                    api.replace_subresource("status", &name, &PostParams::default(), &csr),
                )
                .await
                .map_err(ignore_conflict)?;
            } else {
                push_condition(&mut csr, condition("Denied", reason, message.clone()));
                bounded(
                    CALL,
                    api.replace_subresource("approval", &name, &PostParams::default(), &csr),
                )
                .await
                .map_err(ignore_conflict)?;
            }
            if noisy {
                record_event(
                    events,
                    &csr,
                    true,
                    "PetrelCSRDenied",
                    format!("{message} (node {})", node.as_deref().unwrap_or("-")),
                );
            }
            Ok(())
        }
        Decision::Sign { node, csr_der } => {
            let mut csr = csr;
            if !facts.approved {
                push_condition(
                    &mut csr,
                    condition(
                        "Approved",
                        "PetrelNodeVerified",
                        format!(
                            "requested by {} for its own name; Node {node} is an edge node of a public site",
                            facts.username
                        ),
                    ),
                );
                csr = bounded(
                    CALL,
                    api.replace_subresource("approval", &name, &PostParams::default(), &csr),
                )
                .await
                .map_err(ignore_conflict)?;
            }
            let now = SystemTime::now();
            let cert = ctx
                .signer
                .sign(&csr_der, &node, now)
                .map_err(|e| HandleError::Sign(e.to_string()))?;
            let mut chain = der_to_pem(&cert, "CERTIFICATE");
            chain.push_str(&der_to_pem(ctx.signer.ca_der(), "CERTIFICATE"));
            csr.status.get_or_insert_with(Default::default).certificate =
                Some(ByteString(chain.into_bytes()));
            bounded(
                CALL,
                api.replace_subresource("status", &name, &PostParams::default(), &csr),
            )
            .await
            .map_err(ignore_conflict)?;
            HubMetrics::inc_outcome(&ctx.metrics.csrs, "signed");
            info!(csr = %name, node = %node, "signed a tunnel certificate for a node's CertificateSigningRequest");
            record_event(
                events,
                &csr,
                false,
                "PetrelCSRSigned",
                format!("signed a Petrel tunnel certificate for node {node}"),
            );
            Ok(())
        }
    }
}

/// A conflict means the CSR changed under us (another hub, or the requester deleted it): the
/// watcher delivers the new version, so there is nothing to retry.
fn ignore_conflict(e: KubeError) -> HandleError {
    if matches!(e.status(), Some(409) | Some(404)) {
        HandleError::Later(format!("changed meanwhile: {e}"))
    } else {
        HandleError::Kube(e)
    }
}

/// An Event about the CSR (cluster-scoped, so in `default`), in the background.
fn record_event(
    events: &kube::Api<Event>,
    csr: &CertificateSigningRequest,
    warning: bool,
    reason: &str,
    message: String,
) {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(NODE_EVENTS_NAMESPACE.into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("certificates.k8s.io/v1".into()),
            kind: Some("CertificateSigningRequest".into()),
            name: Some(name),
            uid: csr.metadata.uid.clone(),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        source: Some(EventSource {
            component: Some("petrel-gateway".into()),
            host: None,
        }),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        reporting_component: Some("petrel-gateway".into()),
        ..Default::default()
    };
    let events = events.clone();
    tokio::spawn(async move {
        if let Err(e) = bounded(CALL, events.create(&PostParams::default(), &ev)).await {
            debug!(error = %e, "cannot record the CertificateSigningRequest event");
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use petrel_transport::pki::NodeKey;

    const INVENTORY: &str = r#"
[[sites]]
name = "site-a"
kind = "public"
[[sites]]
name = "cloud"
kind = "cloud"
[[nodes]]
name = "edge-a1"
site = "site-a"
[[nodes]]
name = "cloud-1"
site = "cloud"
"#;

    fn inventory() -> Inventory {
        Inventory::from_toml(INVENTORY, "test").unwrap()
    }

    fn request(cn: &str) -> Vec<u8> {
        let key = NodeKey::generate().unwrap();
        der_to_pem(&key.csr_der(cn).unwrap(), "CERTIFICATE REQUEST").into_bytes()
    }

    fn facts(user: &str, cn: &str) -> CsrFacts {
        CsrFacts {
            name: "petrel-x".into(),
            signer: SIGNER_NAME.into(),
            username: user.into(),
            groups: vec![NODES_GROUP.into(), "system:authenticated".into()],
            usages: vec!["client auth".into(), "digital signature".into()],
            request: request(cn),
            ..Default::default()
        }
    }

    fn reason(d: Decision) -> &'static str {
        match d {
            Decision::Refuse { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_node_gets_its_own_name_only() {
        let inv = inventory();
        let none = RevocationList::new();
        let ok = decide_csr(&facts("system:node:edge-a1", "edge-a1"), &inv, Some(&none));
        assert!(
            matches!(ok, Decision::Sign { ref node, .. } if node == "edge-a1"),
            "{ok:?}"
        );
        // Another node's name.
        let d = decide_csr(&facts("system:node:edge-a1", "edge-b1"), &inv, Some(&none));
        assert_eq!(reason(d), "WrongNode");
        // A cloud node asking for itself.
        let d = decide_csr(&facts("system:node:cloud-1", "cloud-1"), &inv, Some(&none));
        assert_eq!(reason(d), "NotAnEdgeNode");
        // A Node the hub does not know.
        let d = decide_csr(&facts("system:node:ghost", "ghost"), &inv, Some(&none));
        assert_eq!(reason(d), "UnknownNode");
        // Not a node: a user, or the node user without the nodes group.
        let d = decide_csr(&facts("alice", "edge-a1"), &inv, Some(&none));
        assert_eq!(reason(d), "NotANode");
        let mut f = facts("system:node:edge-a1", "edge-a1");
        f.groups = vec!["system:authenticated".into()];
        assert_eq!(reason(decide_csr(&f, &inv, Some(&none))), "NotANode");
    }

    #[test]
    fn requests_are_checked_before_anything_is_signed() {
        let inv = inventory();
        let none = RevocationList::new();
        let mut f = facts("system:node:edge-a1", "edge-a1");
        f.usages = vec!["server auth".into(), "client auth".into()];
        assert_eq!(reason(decide_csr(&f, &inv, Some(&none))), "BadUsages");
        f.usages = vec!["digital signature".into()];
        assert_eq!(reason(decide_csr(&f, &inv, Some(&none))), "BadUsages");
        let mut f = facts("system:node:edge-a1", "edge-a1");
        f.request =
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .to_vec();
        assert_eq!(reason(decide_csr(&f, &inv, Some(&none))), "BadRequest");
        f.request = vec![b'x'; MAX_REQUEST_BYTES + 1];
        assert_eq!(reason(decide_csr(&f, &inv, Some(&none))), "BadRequest");
        // Someone else's signer, or already decided: not ours to touch.
        let mut f = facts("system:node:edge-a1", "edge-a1");
        f.signer = "kubernetes.io/kube-apiserver-client".into();
        assert_eq!(decide_csr(&f, &inv, Some(&none)), Decision::Ignore);
        let mut f = facts("system:node:edge-a1", "edge-a1");
        f.finished = true;
        assert_eq!(decide_csr(&f, &inv, Some(&none)), Decision::Ignore);
        let mut f = facts("system:node:edge-a1", "edge-a1");
        f.has_certificate = true;
        assert_eq!(decide_csr(&f, &inv, Some(&none)), Decision::Ignore);
    }

    #[test]
    fn revoked_nodes_are_refused_and_an_unread_list_waits() {
        let inv = inventory();
        let f = facts("system:node:edge-a1", "edge-a1");
        assert!(matches!(decide_csr(&f, &inv, None), Decision::Later(_)));
        let mut list = RevocationList::new();
        crate::revocation::revoke(&mut list, "edge-a1", "stolen", SystemTime::now());
        assert_eq!(reason(decide_csr(&f, &inv, Some(&list))), "Revoked");
        crate::revocation::lift(&mut list, "edge-a1", SystemTime::now());
        assert!(matches!(
            decide_csr(&f, &inv, Some(&list)),
            Decision::Sign { .. }
        ));
    }

    #[test]
    fn facts_read_conditions_and_certificate() {
        let mut csr = CertificateSigningRequest::default();
        csr.spec.signer_name = SIGNER_NAME.into();
        assert!(!CsrFacts::of(&csr).approved);
        push_condition(&mut csr, condition("Approved", "X", "m".into()));
        let f = CsrFacts::of(&csr);
        assert!(f.approved && !f.finished && !f.has_certificate);
        push_condition(&mut csr, condition("Failed", "X", "m".into()));
        assert!(CsrFacts::of(&csr).finished);
        assert_eq!(outcome("WrongNode"), "denied_wrong_node");
    }
}
