//! Hub election with a `coordination.k8s.io/v1` Lease.
//!
//! Candidates are the cloud nodes carrying the cloud-gateway label. The holder renews every
//! `renew` (1 s); a standby reads the Lease every `retry` (250 ms) and takes it over once it has
//! seen no renewal for `leaseDurationSeconds` (3 s) of its *own* clock (the time it observed the
//! last change, as client-go does, so clock skew between nodes does not matter). A holder whose
//! node loses the label releases the Lease (holder cleared), and a standby takes it at its next
//! look; a hub stopped gracefully releases it too. Every write carries the resourceVersion it
//! read, so two standbys never both win.
//!
//! Without the API server nothing changes: the active hub stays active (it cannot renew, but
//! nobody else can take over either), so agents and the data plane keep working.
//!
//! [`follow`] is the read-only side for the node role: a watch on the Lease that yields the
//! holder.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::status::EventRecorder;
use super::{bounded, keys, KubeError};

/// This hub's part in the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node list has not arrived yet.
    Starting,
    /// The node has no cloud-gateway label (or is not a cloud node): never serves.
    NotCandidate,
    Standby,
    Active,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::NotCandidate => "not-serving",
            Role::Standby => "standby",
            Role::Active => "active",
        }
    }
}

/// What the elector publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionState {
    pub role: Role,
    /// The Lease holder as last seen (`None`: free, or never read).
    pub holder: Option<String>,
    /// The last call to the API server succeeded.
    pub api_ok: bool,
}

/// Election settings.
#[derive(Debug, Clone)]
pub struct ElectorConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This hub's identity: its node name.
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
    pub retry: Duration,
    /// Written into the Lease's `petrel.io/gateway-endpoints` annotation while holding it.
    pub endpoints: String,
}

fn call_limit(cfg: &ElectorConfig) -> Duration {
    cfg.renew.max(Duration::from_millis(500))
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn holder_of(l: &Lease) -> Option<String> {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

/// What identifies one renewal of a Lease.
fn fingerprint(l: &Lease) -> (Option<String>, Option<String>, Option<i32>) {
    let spec = l.spec.as_ref();
    (
        holder_of(l),
        spec.and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string()),
        spec.and_then(|s| s.lease_transitions),
    )
}

struct Elector {
    cfg: ElectorConfig,
    leases: kube::Api<Lease>,
    events: EventRecorder,
    /// The last Lease read and when (our clock) its renewal last changed.
    observed: Option<(Lease, Instant)>,
    state: ElectionState,
    tx: watch::Sender<ElectionState>,
}

/// Starts the elector. `candidate` is `None` until the node list is known, then whether this
/// node may serve. The state starts as [`Role::Starting`].
pub fn spawn(
    client: kube::Client,
    cfg: ElectorConfig,
    candidate: watch::Receiver<Option<bool>>,
    shutdown: CancellationToken,
) -> (watch::Receiver<ElectionState>, tokio::task::JoinHandle<()>) {
    let initial = ElectionState {
        role: Role::Starting,
        holder: None,
        api_ok: false,
    };
    let (tx, rx) = watch::channel(initial.clone());
    let e = Elector {
        leases: kube::Api::namespaced(client.clone(), &cfg.namespace),
        events: EventRecorder::new(client, &cfg.identity),
        cfg,
        observed: None,
        state: initial,
        tx,
    };
    let task = tokio::spawn(e.run(candidate, shutdown));
    (rx, task)
}

impl Elector {
    async fn run(
        mut self,
        mut candidate: watch::Receiver<Option<bool>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let cand = *candidate.borrow_and_update();
            let pause = match cand {
                None => None,
                Some(c) => Some(self.step(c).await),
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = candidate.changed() => if r.is_err() { break },
                _ = async { match pause { Some(p) => tokio::time::sleep(p).await, None => std::future::pending().await } } => {}
            }
        }
        if self.state.role == Role::Active {
            match self.release().await {
                Ok(()) => info!(lease = %self.lease_ref(), "released the hub lease"),
                Err(e) => {
                    warn!(error = %e, "cannot release the hub lease; a standby takes over when it expires")
                }
            }
        }
    }

    fn lease_ref(&self) -> String {
        format!("{}/{}", self.cfg.namespace, self.cfg.lease_name)
    }

    fn publish(&mut self, role: Role, holder: Option<String>, api_ok: bool) {
        let before = self.state.clone();
        self.state = ElectionState {
            role,
            holder,
            api_ok,
        };
        if before.role != role {
            let who = |h: &Option<String>| h.clone().unwrap_or_else(|| "nobody".into());
            match role {
                Role::Active => {
                    let msg = format!(
                        "{} is the active Petrel hub (lease {}; previous holder {})",
                        self.cfg.identity,
                        self.lease_ref(),
                        who(&before.holder)
                    );
                    info!("{msg}");
                    self.events.record(false, "HubActive", msg);
                }
                Role::Standby => {
                    let msg = format!(
                        "{} is a standby Petrel hub; the active hub is {}",
                        self.cfg.identity,
                        who(&self.state.holder)
                    );
                    info!("{msg}");
                    self.events
                        .record(before.role == Role::Active, "HubStandby", msg);
                }
                Role::NotCandidate => {
                    let msg = format!(
                        "{} is not a Petrel hub candidate (no cloud-gateway label, or not a cloud node); it serves no tunnels",
                        self.cfg.identity
                    );
                    info!("{msg}");
                    if before.role != Role::Starting {
                        self.events.record(false, "HubNotCandidate", msg);
                    }
                }
                Role::Starting => {}
            }
        }
        let s = self.state.clone();
        self.tx.send_if_modified(|cur| {
            if *cur != s {
                *cur = s;
                true
            } else {
                false
            }
        });
    }

    fn spec_for_me(&self, prev: Option<&LeaseSpec>, acquire: bool) -> LeaseSpec {
        let now = now_micro();
        let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.cfg.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if acquire {
                Some(now.clone())
            } else {
                prev.and_then(|p| p.acquire_time.clone())
                    .or_else(|| Some(now.clone()))
            },
            renew_time: Some(now),
            lease_transitions: Some(if acquire && prev.is_some() {
                transitions + 1
            } else {
                transitions
            }),
            ..Default::default()
        }
    }

    fn with_annotation(&self, mut meta: ObjectMeta) -> ObjectMeta {
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(keys::LEASE_ENDPOINTS.into(), self.cfg.endpoints.clone());
        meta
    }

    /// One look at the Lease and whatever follows; returns how long to wait before the next.
    async fn step(&mut self, candidate: bool) -> Duration {
        let limit = call_limit(&self.cfg);
        let lease = match bounded(limit, self.leases.get_opt(&self.cfg.lease_name)).await {
            Ok(l) => l,
            Err(e) => {
                // Sticky: without the API server, whoever was active stays active.
                if self.state.api_ok {
                    warn!(error = %e, "cannot read the hub lease; keeping the current role");
                }
                let role = match (self.state.role, candidate) {
                    (_, false) => Role::NotCandidate,
                    (Role::Active, true) => Role::Active,
                    (_, true) => Role::Standby,
                };
                let holder = self.state.holder.clone();
                self.publish(role, holder, false);
                return self.cfg.retry;
            }
        };
        let Some(lease) = lease else {
            self.observed = None;
            if !candidate {
                self.publish(Role::NotCandidate, None, true);
                return self.cfg.retry;
            }
            let new = Lease {
                metadata: self.with_annotation(ObjectMeta {
                    name: Some(self.cfg.lease_name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                }),
                spec: Some(self.spec_for_me(None, true)),
            };
            return match bounded(limit, self.leases.create(&PostParams::default(), &new)).await {
                Ok(l) => {
                    self.observed = Some((l, Instant::now()));
                    self.publish(Role::Active, Some(self.cfg.identity.clone()), true);
                    self.cfg.renew
                }
                Err(e) if e.status() == Some(409) => {
                    debug!("someone else created the hub lease first");
                    Duration::from_millis(20)
                }
                Err(e) => {
                    if self.state.api_ok || self.state.role == Role::Starting {
                        warn!(error = %e, lease = %self.lease_ref(), "cannot create the hub lease");
                    }
                    self.state.api_ok = false;
                    self.cfg.retry
                }
            };
        };
        let now = Instant::now();
        let changed_at = match &self.observed {
            Some((prev, at)) if fingerprint(prev) == fingerprint(&lease) => *at,
            _ => now,
        };
        self.observed = Some((lease.clone(), changed_at));
        let holder = holder_of(&lease);
        let spec = lease.spec.clone();
        let me = self.cfg.identity.clone();
        if holder.as_deref() == Some(me.as_str()) {
            if candidate {
                let mut l = lease.clone();
                l.metadata = self.with_annotation(l.metadata);
                l.spec = Some(self.spec_for_me(spec.as_ref(), false));
                return self.write(l, Role::Active, "renew").await;
            }
            let mut l = lease.clone();
            if let Some(a) = l.metadata.annotations.as_mut() {
                a.remove(keys::LEASE_ENDPOINTS);
            }
            l.spec = Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                renew_time: Some(now_micro()),
                acquire_time: spec.as_ref().and_then(|s| s.acquire_time.clone()),
                lease_transitions: spec.as_ref().and_then(|s| s.lease_transitions),
                ..Default::default()
            });
            let pause = self.write(l, Role::NotCandidate, "release").await;
            self.state.holder = None;
            return pause;
        }
        let duration = spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.duration);
        let expired = holder.is_none() || now.duration_since(changed_at) >= duration;
        if candidate && expired {
            let mut l = lease.clone();
            l.metadata = self.with_annotation(l.metadata);
            l.spec = Some(self.spec_for_me(spec.as_ref(), true));
            if let Some(h) = &holder {
                info!(previous = %h, "hub lease expired; taking over");
            }
            return self.write(l, Role::Active, "acquire").await;
        }
        let role = if candidate {
            Role::Standby
        } else {
            Role::NotCandidate
        };
        self.publish(role, holder, true);
        self.cfg.retry
    }

    /// Writes `l` (with the resourceVersion it was read with). On success the role becomes
    /// `role`; on a conflict someone else wrote first: look again at once.
    async fn write(&mut self, l: Lease, role: Role, what: &str) -> Duration {
        let limit = call_limit(&self.cfg);
        match bounded(
            limit,
            self.leases
                .replace(&self.cfg.lease_name, &PostParams::default(), &l),
        )
        .await
        {
            Ok(written) => {
                let holder = holder_of(&written);
                self.observed = Some((written, Instant::now()));
                self.publish(role, holder, true);
                if role == Role::Active {
                    self.cfg.renew
                } else {
                    self.cfg.retry
                }
            }
            Err(e) if e.status() == Some(409) => {
                debug!(what, "hub lease changed meanwhile; reading it again");
                Duration::from_millis(20)
            }
            Err(e) => {
                if self.state.api_ok {
                    warn!(what, error = %e, "cannot write the hub lease; keeping the current role");
                }
                self.state.api_ok = false;
                self.cfg.retry
            }
        }
    }

    async fn release(&mut self) -> Result<(), KubeError> {
        let limit = call_limit(&self.cfg);
        let Some(mut l) = bounded(limit, self.leases.get_opt(&self.cfg.lease_name)).await? else {
            return Ok(());
        };
        if holder_of(&l).as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        let spec = l.spec.clone().unwrap_or_default();
        if let Some(a) = l.metadata.annotations.as_mut() {
            a.remove(keys::LEASE_ENDPOINTS);
        }
        l.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(now_micro()),
            acquire_time: spec.acquire_time,
            lease_transitions: spec.lease_transitions,
            ..Default::default()
        });
        bounded(
            limit,
            self.leases
                .replace(&self.cfg.lease_name, &PostParams::default(), &l),
        )
        .await?;
        Ok(())
    }
}

/// Follows the Lease (read-only): the receiver holds the current holder, `None` while the Lease
/// is free or unknown.
pub fn follow(
    client: kube::Client,
    namespace: &str,
    lease_name: &str,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    let api: kube::Api<Lease> = kube::Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={lease_name}"));
    let tx = Arc::new(tx);
    tokio::spawn(async move {
        let stream = watcher::watcher(api, cfg).default_backoff();
        futures_util::pin_mut!(stream);
        let mut last_error: Option<String> = None;
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = stream.next() => match ev { Some(ev) => ev, None => return },
            };
            let holder = match ev {
                Ok(watcher::Event::Apply(l)) | Ok(watcher::Event::InitApply(l)) => {
                    last_error = None;
                    holder_of(&l)
                }
                Ok(_) => None,
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        warn!(error = %msg, "hub lease watch failed; keeping the last known hub");
                        last_error = Some(msg);
                    }
                    None
                }
            };
            // A released Lease (no holder) keeps the last hub: a standby takes it within moments.
            if let Some(h) = holder {
                tx.send_if_modified(|cur| {
                    if cur.as_deref() != Some(h.as_str()) {
                        info!(hub = %h, "active hub");
                        *cur = Some(h.clone());
                        true
                    } else {
                        false
                    }
                });
            }
        }
    });
    rx
}
