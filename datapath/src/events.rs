//! Change notifications: an rtnetlink socket subscribed to the multicast groups `RTNLGRP_LINK`,
//! `RTNLGRP_NEIGH`, `RTNLGRP_IPV4_ROUTE` and `RTNLGRP_IPV4_RULE` of the current network
//! namespace. A background task filters the messages down to what can affect our objects
//! (links named like Flannel's or our devices, routes of our table, every IPv4 rule, neighbours
//! and FDB entries on our device) and coalesces them: [`ChangeEvents::changed`] returns once
//! per burst with what kinds of objects changed. Our own `apply` also triggers it; a re-apply
//! that finds nothing to do reports no changes, so a loop of "wait for change, apply" settles.
//! If the kernel drops notifications (socket overrun), the reconcile loop's periodic apply
//! covers it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::RouteAttribute;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::DatapathError;

/// Which kinds of objects changed since the last [`ChangeEvents::changed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Flannel's device or ours appeared, disappeared or changed.
    pub links: bool,
    /// A route of our table changed.
    pub routes: bool,
    /// An IPv4 policy rule changed.
    pub rules: bool,
    /// A neighbour entry on our device changed.
    pub neighbours: bool,
    /// An FDB entry on our device changed.
    pub fdb: bool,
}

impl ChangeSet {
    /// Whether anything is set.
    pub fn any(&self) -> bool {
        self.links || self.routes || self.rules || self.neighbours || self.fdb
    }
    fn merge(&mut self, o: ChangeSet) {
        self.links |= o.links;
        self.routes |= o.routes;
        self.rules |= o.rules;
        self.neighbours |= o.neighbours;
        self.fdb |= o.fdb;
    }
}

#[derive(Default)]
struct Pending {
    set: ChangeSet,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    notify: Notify,
}

/// Fires when something that `apply` manages may have changed. See the module docs.
///
/// ```no_run
/// # async fn demo(mut dp: petrel_datapath::Datapath, desired: petrel_datapath::DesiredState) -> Result<(), petrel_datapath::DatapathError> {
/// let mut events = dp.change_events()?;
/// let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
/// loop {
///     tokio::select! {
///         Some(_) = events.changed() => {}
///         _ = tick.tick() => {}
///     }
///     let report = dp.apply(&desired).await?;
///     if report.changed() { tracing::info!(%report, "repaired datapath"); }
/// }
/// # }
/// ```
pub struct ChangeEvents {
    shared: Arc<Shared>,
    reported_closed: bool,
    conn: JoinHandle<()>,
    filter: JoinHandle<()>,
}

impl std::fmt::Debug for ChangeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeEvents").finish_non_exhaustive()
    }
}

impl Drop for ChangeEvents {
    fn drop(&mut self) {
        self.conn.abort();
        self.filter.abort();
    }
}

impl ChangeEvents {
    /// Waits for the next burst of relevant changes and returns what changed. Bursts are
    /// coalesced: many changes before the call give one answer. Returns `None` once if the
    /// netlink subscription ended; later calls then wait forever, so a `select!` loop with a
    /// periodic apply keeps working (without spinning).
    pub async fn changed(&mut self) -> Option<ChangeSet> {
        if self.reported_closed {
            return std::future::pending().await;
        }
        loop {
            {
                let mut p = match self.shared.pending.lock() {
                    Ok(p) => p,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if p.set.any() {
                    return Some(std::mem::take(&mut p.set));
                }
                if p.closed {
                    self.reported_closed = true;
                    return None;
                }
            }
            self.shared.notify.notified().await;
        }
    }
}

/// What the filter needs to know about our objects.
pub(crate) struct Watch {
    pub names: Vec<String>,
    pub table: u32,
    /// Our hook device's ifindex (0: none yet), kept current by the datapath.
    pub hook_index: Arc<AtomicU32>,
}

pub(crate) fn subscribe(watch: Watch) -> Result<ChangeEvents, DatapathError> {
    let rt = tokio::runtime::Handle::try_current().map_err(|_| DatapathError::NoRuntime {
        what: "change_events",
    })?;
    let (mut conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Rule,
    ])
    .map_err(|source| DatapathError::Socket {
        what: "NETLINK_ROUTE multicast (change events)".into(),
        source,
    })?;
    // Best effort: a bigger buffer makes overruns during neighbour storms less likely.
    let _ = conn.socket_mut().socket_mut().set_rx_buf_sz(1usize << 20);
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        notify: Notify::new(),
    });
    let conn = rt.spawn(conn);
    let s = Arc::clone(&shared);
    let filter = rt.spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(m) = msg.payload else {
                continue;
            };
            let c = classify(&m, &watch);
            if c.any() {
                if let Ok(mut p) = s.pending.lock() {
                    p.set.merge(c);
                }
                s.notify.notify_one();
            }
        }
        if let Ok(mut p) = s.pending.lock() {
            p.closed = true;
        }
        s.notify.notify_one();
    });
    Ok(ChangeEvents {
        shared,
        reported_closed: false,
        conn,
        filter,
    })
}

fn classify(m: &RouteNetlinkMessage, w: &Watch) -> ChangeSet {
    let mut c = ChangeSet::default();
    let hook = w.hook_index.load(Ordering::Relaxed);
    match m {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
            let named = l.attributes.iter().any(|a| match a {
                LinkAttribute::IfName(n) => w.names.iter().any(|x| x == n),
                _ => false,
            });
            c.links = named || (hook != 0 && l.header.index == hook);
        }
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            c.routes = table == w.table;
        }
        RouteNetlinkMessage::NewRule(_) | RouteNetlinkMessage::DelRule(_) => c.rules = true,
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n)
            if hook != 0 && n.header.ifindex == hook =>
        {
            if n.header.family == AddressFamily::Bridge {
                c.fdb = true;
            } else {
                c.neighbours = true;
            }
        }
        _ => {}
    }
    c
}
