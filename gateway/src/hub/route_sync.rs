//! The hub's side of route sync (`petrel_proto::routes`): the current cluster route table, its
//! digest, and the last few changes, so that each agent is sent only what it lacks: nothing but
//! the digest when it holds the current table (a hub restart with an unchanged inventory), the
//! merged changes since the table it holds when that is recent, a snapshot otherwise. What the
//! hub keeps per agent is one digest (the table it last sent), not a view.
//!
//! Pure: the inventory's entries in, chunks out.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};

use petrel_proto::routes::{self, RouteEntry, RouteSync, RouteTable};
use petrel_proto::EncodeError;

/// Changes remembered. An agent further behind (it was away for more changes than this) gets a
/// snapshot.
const MAX_STEPS: usize = 32;

#[derive(Debug, Clone)]
struct Step {
    from: u64,
    upserts: Vec<RouteEntry>,
    removals: Vec<String>,
}

/// How a plan brings an agent up to date (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    /// The agent holds the current table: one chunk with the digest.
    Current,
    /// The changes since the agent's table.
    Delta,
    /// The whole table.
    Snapshot,
}

impl PlanKind {
    pub fn label(self) -> &'static str {
        match self {
            PlanKind::Current => "current",
            PlanKind::Delta => "delta",
            PlanKind::Snapshot => "snapshot",
        }
    }
}

/// The current table and recent history.
#[derive(Debug, Default)]
pub struct RouteHistory {
    table: RouteTable,
    digest: u64,
    steps: VecDeque<Step>,
    /// The current table's snapshot chunks, built once and shared: a fleet connecting for the
    /// first time all get the same chunks.
    snapshot: OnceLock<Arc<Vec<RouteSync>>>,
    /// The same, encoded: every session writes these very bytes (quinn holds a reference per
    /// connection until acknowledged, not a copy).
    snapshot_wire: OnceLock<Arc<Vec<bytes::Bytes>>>,
}

/// Encodes chunks as control frames.
pub fn encode_chunks(chunks: &[RouteSync]) -> Result<Vec<bytes::Bytes>, EncodeError> {
    chunks
        .iter()
        .map(|c| {
            petrel_proto::control::encode_to_vec(&petrel_proto::ControlMessage::Routes(c.clone()))
                .map(bytes::Bytes::from)
        })
        .collect()
}

impl RouteHistory {
    pub fn new(entries: Vec<RouteEntry>) -> Self {
        let table = RouteTable::from_entries(entries);
        Self {
            digest: table.digest(),
            table,
            steps: VecDeque::new(),
            snapshot: OnceLock::new(),
            snapshot_wire: OnceLock::new(),
        }
    }

    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Replaces the table with `entries`; returns whether it changed.
    pub fn replace(&mut self, entries: Vec<RouteEntry>) -> bool {
        let new = RouteTable::from_entries(entries);
        let digest = new.digest();
        if digest == self.digest && new == self.table {
            return false;
        }
        let (upserts, removals) = self.table.diff(&new);
        self.steps.push_back(Step {
            from: self.digest,
            upserts,
            removals,
        });
        while self.steps.len() > MAX_STEPS {
            self.steps.pop_front();
        }
        self.table = new;
        self.digest = digest;
        self.snapshot = OnceLock::new();
        self.snapshot_wire = OnceLock::new();
        true
    }

    /// [`plan`](Self::plan), encoded, with the digest the agent holds afterwards.
    pub fn plan_wire(
        &self,
        held: u64,
    ) -> Result<(PlanKind, Arc<Vec<bytes::Bytes>>, u64), EncodeError> {
        let (kind, chunks) = self.plan(held)?;
        let wire = match kind {
            PlanKind::Snapshot => match self.snapshot_wire.get() {
                Some(w) => w.clone(),
                None => {
                    let built = Arc::new(encode_chunks(&chunks)?);
                    self.snapshot_wire.get_or_init(|| built).clone()
                }
            },
            PlanKind::Current | PlanKind::Delta => Arc::new(encode_chunks(&chunks)?),
        };
        Ok((kind, wire, self.digest))
    }

    /// What to send an agent that holds the table with digest `held`.
    pub fn plan(&self, held: u64) -> Result<(PlanKind, Arc<Vec<RouteSync>>), EncodeError> {
        if held == self.digest {
            return Ok((
                PlanKind::Current,
                Arc::new(routes::delta(vec![], vec![], self.digest)?),
            ));
        }
        // The most recent step that starts from what the agent holds (a table can recur).
        if let Some(start) = self.steps.iter().rposition(|s| s.from == held) {
            let mut merged: BTreeMap<&str, Option<&RouteEntry>> = BTreeMap::new();
            for step in self.steps.iter().skip(start) {
                for r in &step.removals {
                    merged.insert(r, None);
                }
                for u in &step.upserts {
                    merged.insert(&u.node_name, Some(u));
                }
            }
            let mut upserts = Vec::new();
            let mut removals = Vec::new();
            for (name, entry) in merged {
                match entry {
                    Some(e) => upserts.push(e.clone()),
                    None => removals.push(name.to_string()),
                }
            }
            return Ok((
                PlanKind::Delta,
                Arc::new(routes::delta(upserts, removals, self.digest)?),
            ));
        }
        if let Some(s) = self.snapshot.get() {
            return Ok((PlanKind::Snapshot, s.clone()));
        }
        let built = Arc::new(self.table.snapshot()?);
        Ok((
            PlanKind::Snapshot,
            self.snapshot.get_or_init(|| built).clone(),
        ))
    }
}

/// Route syncs larger than this are paced by [`SyncPacer`]; a delta of a few nodes is not.
pub const PACE_ABOVE_BYTES: usize = 4096;

/// How far ahead of the rate large syncs may go after a quiet spell: a few snapshots of a
/// 10,000-node table.
pub const PACE_BURST_BYTES: u64 = 2 << 20;

/// Paced route syncs in progress at once; the others wait their turn, so a fleet connecting
/// together gets its snapshots in arrival order, not all of them at the end.
pub const PACED_SYNC_SLOTS: usize = 64;

/// Paces large route syncs (snapshots of a big table, large deltas) over all sessions at a
/// byte rate. Without it a fleet of 10,000 agents connecting at once puts 10,000 half-megabyte
/// snapshots in flight together, and the handshakes of agents still connecting wait behind
/// gigabytes of queued packets until they time out and start again, with another snapshot.
///
/// Generic cell rate: each reservation moves the theoretical arrival time on by its bytes over
/// the rate; up to `burst` bytes may go ahead of it. Pure: `now` in, a send time out.
#[derive(Debug)]
pub struct SyncPacer {
    /// Bytes per second; 0 = unpaced.
    rate: u64,
    /// How far ahead of the rate a sender may be.
    tolerance: std::time::Duration,
    next_free: Option<std::time::Instant>,
}

impl SyncPacer {
    pub fn new(rate: u64, burst: u64) -> Self {
        let tolerance = if rate == 0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(burst as f64 / rate as f64)
        };
        Self {
            rate,
            tolerance,
            next_free: None,
        }
    }

    /// Reserves `bytes`: returns when they may be written (`now` or later).
    pub fn reserve(&mut self, bytes: usize, now: std::time::Instant) -> std::time::Instant {
        if self.rate == 0 {
            return now;
        }
        let tat = self.next_free.map_or(now, |t| t.max(now));
        let cost = std::time::Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        self.next_free = Some(tat + cost);
        tat.checked_sub(self.tolerance).map_or(now, |t| t.max(now))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use petrel_proto::{IpCidr, MacAddr};

    fn entry(i: u32, underlay: [u8; 4]) -> RouteEntry {
        RouteEntry {
            node_name: format!("node-{i}"),
            site: format!("site-{}", i % 3),
            pod_cidrs: vec![IpCidr::new(
                std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8))),
                24,
            )
            .unwrap()],
            vtep_mac: MacAddr([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            underlay: std::net::IpAddr::V4(underlay.into()),
            mtu: 0,
        }
    }

    fn entries(n: u32) -> Vec<RouteEntry> {
        (0..n).map(|i| entry(i, [192, 0, 2, 1])).collect()
    }

    /// Applies a plan to what an agent holds.
    fn run(agent: &mut RouteTable, plan: &[RouteSync]) {
        for m in plan {
            agent.apply(m);
        }
        assert_eq!(plan.last().unwrap().digest, Some(agent.digest()));
    }

    #[test]
    fn the_pacer_lets_a_burst_through_then_holds_to_the_rate() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        // 1 MB/s, 100 kB burst.
        let mut p = SyncPacer::new(1_000_000, 100_000);
        // The first 100 kB (and the reservation that crosses the line) go at once.
        for _ in 0..2 {
            assert_eq!(p.reserve(50_000, t0), t0);
        }
        assert_eq!(p.reserve(50_000, t0), t0);
        // Then each 50 kB waits 50 ms more.
        assert_eq!(p.reserve(50_000, t0), t0 + Duration::from_millis(50));
        assert_eq!(p.reserve(50_000, t0), t0 + Duration::from_millis(100));
        // Idle time refills the burst, never beyond it.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.reserve(100_000, later), later);
        assert_eq!(p.reserve(100_000, later), later);
        assert_eq!(p.reserve(1, later), later + Duration::from_millis(100));
        // Rate 0: unpaced.
        let mut off = SyncPacer::new(0, 0);
        assert_eq!(off.reserve(usize::MAX, t0), t0);
    }

    #[test]
    fn an_agent_gets_nothing_a_delta_or_a_snapshot_as_it_needs() {
        let mut h = RouteHistory::new(entries(1000));
        // New agent: snapshot.
        let mut agent = RouteTable::new();
        let (kind, plan) = h.plan(agent.digest()).unwrap();
        assert_eq!(kind, PlanKind::Snapshot);
        run(&mut agent, &plan);
        // Up to date: the digest only.
        let (kind, plan) = h.plan(agent.digest()).unwrap();
        assert_eq!((kind, plan.len()), (PlanKind::Current, 1));
        assert!(plan[0].upserts.is_empty() && plan[0].removals.is_empty());
        // Two changes while the agent was away: one merged delta of what changed.
        let mut e = entries(1000);
        e[5] = entry(5, [192, 0, 2, 55]);
        assert!(h.replace(e.clone()));
        e.remove(7);
        e[5] = entry(5, [192, 0, 2, 56]);
        assert!(h.replace(e.clone()));
        assert!(!h.replace(e.clone()), "same table: no change");
        let (kind, plan) = h.plan(agent.digest()).unwrap();
        assert_eq!(kind, PlanKind::Delta);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].upserts, vec![entry(5, [192, 0, 2, 56])]);
        assert_eq!(plan[0].removals, vec!["node-7".to_string()]);
        run(&mut agent, &plan);
        assert_eq!(agent, RouteTable::from_entries(e));
    }

    #[test]
    fn an_unknown_or_forgotten_table_gets_a_snapshot() {
        let mut h = RouteHistory::new(entries(10));
        let old = h.digest();
        for i in 0..=MAX_STEPS as u32 {
            let mut e = entries(10);
            e[0] = entry(0, [198, 51, 100, (i % 250) as u8]);
            h.replace(e);
        }
        assert_eq!(h.plan(old).unwrap().0, PlanKind::Snapshot);
        assert_eq!(h.plan(12345).unwrap().0, PlanKind::Snapshot);
    }

    #[test]
    fn a_change_costs_each_agent_what_changed_at_ten_thousand_nodes() {
        let mut h = RouteHistory::new(entries(10_000));
        let held = h.digest();
        let mut e = entries(10_000);
        e[9_999] = entry(9_999, [203, 0, 113, 9]);
        h.replace(e);
        let (kind, plan) = h.plan(held).unwrap();
        assert_eq!(kind, PlanKind::Delta);
        let bytes: usize = plan
            .iter()
            .map(|m| {
                petrel_proto::control::encode_to_vec(&petrel_proto::ControlMessage::Routes(
                    m.clone(),
                ))
                .unwrap()
                .len()
            })
            .sum();
        assert!(bytes < 200, "{bytes} bytes for one node's change");
    }
}
