//! Active-active membership in Kubernetes mode: a `coordination.k8s.io/v1` Lease per hub.
//!
//! Every labelled hub renews its own Lease (`<lease-name>-<node>`, label
//! `petrel.io/hub-lease=<lease-name>`, holder = its node) every `renew`; it clears the holder
//! when it loses the label or stops (a released Lease counts for nobody). Hubs and node roles watch these Leases into a
//! [`LeaseBook`], and the live hubs are the labelled candidates whose Lease is in it and fresh.
//!
//! "Fresh" is judged against the newest renewal this party has seen of *any* hub, on its own
//! clock (so clock skew between nodes does not matter): a hub whose Lease has not changed for
//! `leaseDurationSeconds` while another's has is gone, for example because it lost the API
//! server. When no Lease changes at all (the API server is down for this party, or every hub
//! is), nothing is taken away: the last live set stays. That is the rule that keeps a hub
//! partitioned from the API server out of everyone else's set (it cannot renew) without a
//! party that is itself cut off from the API server dropping every hub.
//!
//! Speed comes from the data path, not from here: node roles probe the hubs' relay ports and
//! agents watch their tunnels, both within a second; the Leases give every party the same
//! membership within `leaseDurationSeconds`.

use std::collections::{BTreeMap, BTreeSet};
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

use super::bounded;

/// Label on every hub's Lease; its value is the base Lease name.
pub const HUB_LEASE_LABEL: &str = "petrel.io/hub-lease";

/// The name of `node`'s own Lease. Object names are DNS subdomains of at most 253 characters;
/// a longer combination is named by a hash of the node name instead.
pub fn lease_name(base: &str, node: &str) -> String {
    let name = format!("{base}-{node}");
    if name.len() <= 253 {
        name
    } else {
        format!("{base}-{:016x}", petrel_proto::ownership::score(node, ""))
    }
}

/// What was last seen of one hub's Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    holder: String,
    /// The renewal as written (`renewTime`); a new value is a renewal.
    renew: Option<String>,
    /// When (this party's clock) `renew` last changed.
    changed_at: Instant,
    duration: Duration,
    /// Seen in the current listing (cleared at the start of a relist).
    confirmed: bool,
}

/// What one party knows of the hub Leases, by Lease name. Pure: observations and `now` in,
/// the live hubs out.
#[derive(Debug, Default)]
pub struct LeaseBook {
    leases: BTreeMap<String, Seen>,
}

impl LeaseBook {
    /// A Lease as read (an add, a change, or a listing's item). A Lease without a holder, or
    /// whose name is not its holder's, counts for nobody.
    pub fn observe(
        &mut self,
        name: &str,
        base: &str,
        holder: Option<&str>,
        renew: Option<String>,
        duration: Duration,
        now: Instant,
    ) {
        let Some(holder) = holder.filter(|h| lease_name(base, h) == name) else {
            self.leases.remove(name);
            return;
        };
        let changed_at = match self.leases.get(name) {
            Some(s) if s.holder == holder && s.renew == renew => s.changed_at,
            _ => now,
        };
        self.leases.insert(
            name.to_string(),
            Seen {
                holder: holder.to_string(),
                renew,
                changed_at,
                duration,
                confirmed: true,
            },
        );
    }

    /// A Lease was deleted: its hub left (or was stopped).
    pub fn deleted(&mut self, name: &str) {
        self.leases.remove(name);
    }

    /// A relist begins: what it does not list again is gone at [`relisted`](Self::relisted).
    pub fn relisting(&mut self) {
        for s in self.leases.values_mut() {
            s.confirmed = false;
        }
    }

    pub fn relisted(&mut self) {
        self.leases.retain(|_, s| s.confirmed);
    }

    /// The hubs whose Lease is fresh: renewed within its duration of the newest renewal seen.
    pub fn live(&self) -> BTreeSet<String> {
        let Some(newest) = self.leases.values().map(|s| s.changed_at).max() else {
            return BTreeSet::new();
        };
        self.leases
            .values()
            // A duration too large to add to an instant (read from the API) never expires.
            .filter(|s| {
                s.changed_at
                    .checked_add(s.duration)
                    .is_none_or(|t| t >= newest)
            })
            .map(|s| s.holder.clone())
            .collect()
    }
}

/// The hubs that carry traffic: the labelled candidates whose Lease is live. While no
/// candidate has a live Lease (every hub starting, or none renewing yet), every candidate: a
/// party with no membership yet must not route to nobody.
pub fn active_hubs<'a>(
    candidates: impl IntoIterator<Item = &'a str>,
    live: Option<&BTreeSet<String>>,
) -> BTreeSet<String> {
    let all: BTreeSet<String> = candidates.into_iter().map(str::to_string).collect();
    let Some(live) = live else { return all };
    let both: BTreeSet<String> = all.intersection(live).cloned().collect();
    if both.is_empty() {
        all
    } else {
        both
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Settings of a hub's own Lease.
#[derive(Debug, Clone)]
pub struct RenewerConfig {
    pub namespace: String,
    /// The base Lease name (`--lease-name`); the hub's own is [`lease_name`] of it.
    pub base: String,
    pub node: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// Renews this hub's Lease every `renew` while `candidate` says so and releases it (holder
/// cleared) when the hub stops being a candidate or `shutdown` fires (then the task ends). Only
/// get, create and update, the verbs the single hub Lease already needs. API errors are logged
/// once per outage and retried at the next tick: without its renewals this hub drops out of
/// everyone else's live set, which is the point.
pub fn spawn_renewer(
    client: kube::Client,
    cfg: RenewerConfig,
    mut candidate: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let leases: kube::Api<Lease> = kube::Api::namespaced(client, &cfg.namespace);
    let name = lease_name(&cfg.base, &cfg.node);
    let limit = cfg.renew.max(Duration::from_millis(500));
    tokio::spawn(async move {
        let mut r = Renewer {
            leases,
            name,
            cfg,
            limit,
            last: None,
            held: false,
            failing: false,
        };
        loop {
            let want = *candidate.borrow_and_update();
            if want {
                r.renew().await;
            } else if r.held {
                r.release().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                c = candidate.changed() => if c.is_err() { break },
                _ = tokio::time::sleep(r.cfg.renew) => {}
            }
        }
        if r.held {
            r.release().await;
        }
    })
}

struct Renewer {
    leases: kube::Api<Lease>,
    name: String,
    cfg: RenewerConfig,
    limit: Duration,
    /// The Lease as last written (its resourceVersion makes the next write conditional).
    last: Option<Lease>,
    held: bool,
    failing: bool,
}

impl Renewer {
    fn spec(&self, holder: bool) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.then(|| self.cfg.node.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.cfg.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            renew_time: Some(now_micro()),
            ..Default::default()
        }
    }

    /// Writes the Lease with `holder` set or cleared: an update of the last one written, else
    /// of the one read, else a create.
    async fn write(&mut self, holder: bool) -> Result<(), super::KubeError> {
        let base = match self.last.take() {
            Some(l) => Some(l),
            None => bounded(self.limit, self.leases.get_opt(&self.name)).await?,
        };
        let written = match base {
            Some(mut l) => {
                l.spec = Some(self.spec(holder));
                l.metadata
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert(HUB_LEASE_LABEL.to_string(), self.cfg.base.clone());
                bounded(
                    self.limit,
                    self.leases.replace(&self.name, &PostParams::default(), &l),
                )
                .await?
            }
            None => {
                let l = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            HUB_LEASE_LABEL.to_string(),
                            self.cfg.base.clone(),
                        )])),
                        ..Default::default()
                    },
                    spec: Some(self.spec(holder)),
                };
                bounded(self.limit, self.leases.create(&PostParams::default(), &l)).await?
            }
        };
        self.last = Some(written);
        Ok(())
    }

    async fn renew(&mut self) {
        match self.write(true).await {
            Ok(()) => {
                if !self.held || self.failing {
                    info!(lease = %self.name, "renewing this hub's membership lease");
                }
                self.held = true;
                self.failing = false;
            }
            Err(e) => {
                // A conflict (someone else wrote it) is read afresh at the next tick.
                if !self.failing && e.status() != Some(409) {
                    warn!(lease = %self.name, error = %e, "cannot renew this hub's membership lease; other parties drop this hub once it expires");
                    self.failing = true;
                }
            }
        }
    }

    async fn release(&mut self) {
        match self.write(false).await {
            Ok(()) => info!(lease = %self.name, "released this hub's membership lease"),
            Err(e) => {
                warn!(lease = %self.name, error = %e, "cannot release this hub's membership lease; it expires")
            }
        }
        self.held = false;
    }
}

/// Follows every hub's Lease: the receiver holds the live hubs (by node name), `None` until
/// the first listing. Published only when the set changes.
pub fn follow(
    client: kube::Client,
    namespace: &str,
    base: &str,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<BTreeSet<String>>> {
    let (tx, rx) = watch::channel(None);
    let api: kube::Api<Lease> = kube::Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().labels(&format!("{HUB_LEASE_LABEL}={base}"));
    let tx = Arc::new(tx);
    let base = base.to_string();
    tokio::spawn(async move {
        let stream = watcher::watcher(api, cfg).default_backoff();
        futures_util::pin_mut!(stream);
        let mut book = LeaseBook::default();
        let mut listed = false;
        let mut last_error: Option<String> = None;
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = stream.next() => match ev { Some(ev) => ev, None => return },
            };
            let now = Instant::now();
            let observe = |book: &mut LeaseBook, l: &Lease| {
                let Some(name) = l.metadata.name.as_deref() else {
                    return;
                };
                let spec = l.spec.as_ref();
                let duration = spec
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(Duration::from_secs(3), Duration::from_secs);
                book.observe(
                    name,
                    &base,
                    spec.and_then(|s| s.holder_identity.as_deref()),
                    spec.and_then(|s| s.renew_time.as_ref())
                        .map(|t| t.0.to_string()),
                    duration,
                    now,
                );
            };
            match ev {
                Ok(watcher::Event::Init) => book.relisting(),
                Ok(watcher::Event::InitApply(l)) => observe(&mut book, &l),
                Ok(watcher::Event::InitDone) => {
                    book.relisted();
                    listed = true;
                    last_error = None;
                }
                Ok(watcher::Event::Apply(l)) => observe(&mut book, &l),
                Ok(watcher::Event::Delete(l)) => {
                    if let Some(name) = l.metadata.name.as_deref() {
                        book.deleted(name);
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        warn!(error = %msg, "hub lease watch failed; keeping the last live hubs");
                        last_error = Some(msg);
                    }
                    continue;
                }
            }
            if !listed {
                continue;
            }
            let live = book.live();
            tx.send_if_modified(|cur| {
                if cur.as_ref() != Some(&live) {
                    debug!(?live, "live hubs");
                    *cur = Some(live.clone());
                    true
                } else {
                    false
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const D: Duration = Duration::from_secs(3);

    #[test]
    fn lease_names_are_per_node_and_bounded() {
        assert_eq!(lease_name("petrel-hub", "gw-1"), "petrel-hub-gw-1");
        let long = "a".repeat(250);
        let n = lease_name("petrel-hub", &long);
        assert!(n.len() <= 253 && n.starts_with("petrel-hub-"), "{n}");
        assert_ne!(n, lease_name("petrel-hub", &"b".repeat(250)));
    }

    #[test]
    fn a_hub_that_stops_renewing_while_another_renews_drops_out() {
        let t0 = Instant::now();
        let mut b = LeaseBook::default();
        let renew = |b: &mut LeaseBook, hub: &str, n: u32, at: Duration| {
            b.observe(
                &lease_name("petrel-hub", hub),
                "petrel-hub",
                Some(hub),
                Some(format!("r{n}")),
                D,
                t0 + at,
            );
        };
        renew(&mut b, "gw-1", 0, Duration::ZERO);
        renew(&mut b, "cloud-1", 0, Duration::ZERO);
        assert_eq!(b.live(), names(&["cloud-1", "gw-1"]));
        // gw-1 keeps renewing, cloud-1 does not (cut off from the API server).
        for s in 1..=3 {
            renew(&mut b, "gw-1", s, Duration::from_secs(s.into()));
            assert_eq!(b.live(), names(&["cloud-1", "gw-1"]), "at {s} s");
        }
        // The same renewal read again (a relist) is not a renewal.
        renew(&mut b, "cloud-1", 0, Duration::from_secs(4));
        renew(&mut b, "gw-1", 4, Duration::from_millis(3_100));
        assert_eq!(b.live(), names(&["gw-1"]));
        // cloud-1 renews again: back at once.
        renew(&mut b, "cloud-1", 1, Duration::from_secs(5));
        assert_eq!(b.live(), names(&["cloud-1", "gw-1"]));
    }

    #[test]
    fn when_nothing_renews_nobody_is_dropped() {
        // This party lost the API server (or every hub stopped renewing at once): the last
        // set stays, however long it lasts; the data-path probes judge the hubs meanwhile.
        let t0 = Instant::now();
        let mut b = LeaseBook::default();
        for hub in ["gw-1", "cloud-1"] {
            b.observe(
                &lease_name("p", hub),
                "p",
                Some(hub),
                Some("r".into()),
                D,
                t0,
            );
        }
        assert_eq!(b.live(), names(&["cloud-1", "gw-1"]));
    }

    #[test]
    fn released_deleted_foreign_and_unlisted_leases_count_for_nobody() {
        let t0 = Instant::now();
        let mut b = LeaseBook::default();
        let obs = |b: &mut LeaseBook, name: &str, holder: Option<&str>| {
            b.observe(name, "p", holder, Some("r".into()), D, t0);
        };
        obs(&mut b, "p-gw-1", Some("gw-1"));
        obs(&mut b, "p-cloud-1", Some("cloud-1"));
        obs(&mut b, "p-gw-3", Some("gw-1")); // not gw-1's own Lease
        assert_eq!(b.live(), names(&["cloud-1", "gw-1"]));
        obs(&mut b, "p-gw-1", None); // released
        assert_eq!(b.live(), names(&["cloud-1"]));
        b.deleted("p-cloud-1");
        assert!(b.live().is_empty());
        obs(&mut b, "p-gw-1", Some("gw-1"));
        obs(&mut b, "p-cloud-1", Some("cloud-1"));
        b.relisting();
        obs(&mut b, "p-gw-1", Some("gw-1"));
        b.relisted();
        assert_eq!(b.live(), names(&["gw-1"]));
    }

    #[test]
    fn active_hubs_are_live_candidates_or_every_candidate_before_any_lease() {
        let c = ["gw-1", "cloud-1", "gw-3"];
        assert_eq!(active_hubs(c, None), names(&c));
        assert_eq!(active_hubs(c, Some(&names(&[]))), names(&c));
        assert_eq!(
            active_hubs(c, Some(&names(&["gw-1", "x"]))),
            names(&["gw-1"])
        );
        // A live Lease of a node that lost its label does not make it a hub.
        assert_eq!(active_hubs(c, Some(&names(&["x"]))), names(&c));
        assert_eq!(
            active_hubs(c, Some(&names(&["gw-3", "cloud-1"]))),
            names(&["cloud-1", "gw-3"])
        );
    }
}
