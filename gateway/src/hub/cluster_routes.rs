//! The cluster route table the hub serves to route-sync agents, shared by every session: the
//! table with its recent changes ([`RouteHistory`]), a signal sessions watch to send what
//! changed, and the pacing of large syncs over all sessions (slots and a byte rate). The
//! refresher writes it once per inventory change; sessions only read and plan.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use petrel_proto::routes::RouteEntry;
use petrel_proto::EncodeError;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::route_sync::{PlanKind, RouteHistory, SyncPacer, PACED_SYNC_SLOTS, PACE_BURST_BYTES};

/// Why a sync could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot build the route sync: {0}")]
    Encode(#[from] EncodeError),
    #[error("route table lock poisoned")]
    Poisoned,
}

/// An encoded plan: its kind, the frames, and the digest the agent holds afterwards.
pub type WirePlan = (PlanKind, Arc<Vec<bytes::Bytes>>, u64);

#[derive(Debug)]
pub struct ClusterRoutes {
    table: RwLock<RouteHistory>,
    changed: watch::Sender<u64>,
    slots: Arc<Semaphore>,
    pacer: Mutex<SyncPacer>,
}

impl ClusterRoutes {
    /// A table of `entries`, large syncs paced at `rate` bytes per second (0: unpaced).
    pub fn new(entries: Vec<RouteEntry>, rate: u64) -> Self {
        let table = RouteHistory::new(entries);
        let (changed, _) = watch::channel(table.digest());
        Self {
            table: RwLock::new(table),
            changed,
            slots: Arc::new(Semaphore::new(PACED_SYNC_SLOTS)),
            pacer: Mutex::new(SyncPacer::new(rate, PACE_BURST_BYTES)),
        }
    }

    /// Replaces the table; if it changed, returns its length and tells every watching session.
    pub fn replace(&self, entries: Vec<RouteEntry>) -> Option<usize> {
        let (digest, len) = {
            let mut t = self.table.write().ok()?;
            if !t.replace(entries) {
                return None;
            }
            (t.digest(), t.len())
        };
        self.changed.send_replace(digest);
        Some(len)
    }

    pub fn len(&self) -> usize {
        self.table.read().map(|t| t.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes of the table's digest.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// What an agent holding the table with digest `held` lacks, encoded.
    pub fn plan_wire(&self, held: u64) -> Result<WirePlan, PlanError> {
        Ok(self
            .table
            .read()
            .map_err(|_| PlanError::Poisoned)?
            .plan_wire(held)?)
    }

    /// A slot for one large sync (at most [`PACED_SYNC_SLOTS`] at once).
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        // The semaphore is never closed.
        loop {
            if let Ok(p) = self.slots.clone().acquire_owned().await {
                return p;
            }
        }
    }

    /// When `bytes` of a large sync may be written.
    pub fn reserve(&self, bytes: usize, now: Instant) -> Instant {
        self.pacer
            .lock()
            .map(|mut p| p.reserve(bytes, now))
            .unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::inventory::Inventory;

    #[test]
    fn only_a_change_is_signalled_and_plans_follow_the_table() {
        let inv = Inventory::embedded_default().unwrap();
        let routes = ClusterRoutes::new(Vec::new(), 0);
        let mut rx = routes.subscribe();
        rx.mark_unchanged();
        assert!(routes.is_empty());
        let entries = inv.route_entries();
        let n = entries.len();
        assert_eq!(routes.replace(entries.clone()), Some(n));
        assert!(rx.has_changed().unwrap());
        let digest = *rx.borrow_and_update();
        assert_eq!(routes.replace(entries), None, "the same table is no change");
        assert!(!rx.has_changed().unwrap());
        let (kind, _, after) = routes.plan_wire(0).unwrap();
        assert_eq!((kind, after), (PlanKind::Snapshot, digest));
        let (kind, _, _) = routes.plan_wire(digest).unwrap();
        assert_eq!(kind, PlanKind::Current);
    }
}
