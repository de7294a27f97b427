//! The hub's memory budget: above it the hub takes no new work (handshakes are refused with
//! QUIC's CONNECTION_REFUSED, enrolments closed with a reason) until it is back under, so a
//! surge ends in refusals the operator can see in a counter instead of the kernel's OOM killer
//! taking every tunnel down. Connected agents are never cut for it.
//!
//! The budget is given (`--memory-budget`) or, by default, 85% of the cgroup's memory limit
//! (v2 `memory.max`, v1 `memory.limit_in_bytes`), none without a limit. The decision is pure
//! (`MemoryBudget::over`, with hysteresis); reading RSS and the cgroup files is a thin shell.
//!
//! It also gives freed heap back to the kernel ([`release_freed_heap`]): glibc keeps what was
//! freed between live allocations (route-table snapshots sent to thousands of agents, quinn's
//! transmit buffers after a burst), and that counts in RSS, the cgroup's limit and this budget
//! like live memory. Every few seconds, if the allocator holds more than a few MiB free, the hub
//! returns its whole free pages (`petrel_datapath::heap`), and it does so once more before it
//! declares itself over budget.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A budget in bytes and where the hub resumes (90% of it, so it does not flap at the line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    pub limit: u64,
    pub resume_below: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            resume_below: limit / 10 * 9,
        }
    }

    /// The default: 85% of the cgroup limit.
    pub fn from_cgroup_limit(cgroup_limit: u64) -> Self {
        Self::new(cgroup_limit / 100 * 85)
    }

    /// Whether the hub is over budget at `rss`, given whether it was before.
    pub fn over(&self, rss: u64, was_over: bool) -> bool {
        if was_over {
            rss >= self.resume_below
        } else {
            rss >= self.limit
        }
    }
}

/// The memory limit of the cgroup named in `proc_self_cgroup` (the text of
/// `/proc/self/cgroup`), read through `read` (a path under `/sys/fs/cgroup` to its contents).
/// `None` when there is no limit.
pub fn cgroup_limit(proc_self_cgroup: &str, read: impl Fn(&Path) -> Option<String>) -> Option<u64> {
    let parse = |s: String| {
        let v = s.trim();
        if v == "max" {
            return None;
        }
        // v1 reports "no limit" as a huge page-aligned number.
        v.parse::<u64>().ok().filter(|n| *n < (1u64 << 60))
    };
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: the unified hierarchy.
            let p = PathBuf::from("/sys/fs/cgroup").join(rel).join("memory.max");
            if let Some(limit) = read(&p).and_then(parse) {
                return Some(limit);
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let p = PathBuf::from("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.limit_in_bytes");
            if let Some(limit) = read(&p).and_then(parse) {
                return Some(limit);
            }
        }
    }
    None
}

/// This process's resident set, in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The budget in force: the configured one (`Some(0)` means none), else the cgroup default.
pub fn resolve(configured: Option<u64>) -> Option<MemoryBudget> {
    match configured {
        Some(0) => None,
        Some(limit) => Some(MemoryBudget::new(limit)),
        None => {
            let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
            cgroup_limit(&cg, |p| std::fs::read_to_string(p).ok())
                .map(MemoryBudget::from_cgroup_limit)
        }
    }
}

/// Shared "over budget" flag, set by [`watch`] and read on every admission.
#[derive(Debug, Default)]
pub struct MemoryGate {
    over: AtomicBool,
}

impl MemoryGate {
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    fn set(&self, over: bool) {
        self.over.store(over, Ordering::Relaxed);
    }
}

/// Checks RSS against `budget` every half second until `shutdown`, logging each crossing.
pub async fn watch(
    gate: std::sync::Arc<MemoryGate>,
    budget: MemoryBudget,
    metrics: std::sync::Arc<crate::metrics::HubMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
        let Some(mut rss) = rss_bytes() else { continue };
        let was = gate.is_over();
        if !was && budget.over(rss, was) {
            // Freed-but-kept heap is not work the hub must refuse for: give it back first.
            rss = release_and_count(&metrics, rss).await.unwrap_or(rss);
        }
        let now = budget.over(rss, was);
        if now != was {
            if now {
                tracing::warn!(
                    rss_mib = rss >> 20,
                    budget_mib = budget.limit >> 20,
                    "memory budget reached: refusing new handshakes and enrolments until below {} MiB",
                    budget.resume_below >> 20
                );
            } else {
                tracing::info!(
                    rss_mib = rss >> 20,
                    "back under the memory budget; accepting new work"
                );
            }
            gate.set(now);
        }
    }
}

/// How often the hub looks at its free heap.
const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Free heap below this is not worth a release (each walks every arena under its lock: 2-15 ms
/// at 10,000 agents), nor is a change smaller than this since the last one.
const RELEASE_ABOVE_BYTES: u64 = 4 << 20;

/// The heap as the release loop sees it: the allocator's free bytes and the process's RSS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapReading {
    pub free: u64,
    pub rss: u64,
}

/// Whether a release is due `now`, given the reading right after the last one. Due when enough
/// is free and something moved since: more freed, or RSS grown (freed pages written again).
/// After a release the free bytes stay counted (the pages go, the free chunks stay), so without
/// the second condition an idle hub would walk its arenas every time for nothing.
pub fn release_due(now: HeapReading, after_last: Option<HeapReading>) -> bool {
    if now.free < RELEASE_ABOVE_BYTES {
        return false;
    }
    match after_last {
        None => true,
        Some(last) => {
            now.free >= last.free + RELEASE_ABOVE_BYTES || now.rss >= last.rss + RELEASE_ABOVE_BYTES
        }
    }
}

/// Gives freed heap back every [`RELEASE_EVERY`] when [`release_due`], counting what RSS fell
/// by. Returns at shutdown, or at once with an allocator that cannot say how much it holds free.
pub async fn release_freed_heap(
    metrics: std::sync::Arc<crate::metrics::HubMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if petrel_datapath::heap::free_heap_bytes().is_none() {
        return;
    }
    let mut after_last = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RELEASE_EVERY) => {}
        }
        let (Some(free), Some(rss)) = (petrel_datapath::heap::free_heap_bytes(), rss_bytes())
        else {
            continue;
        };
        if !release_due(HeapReading { free, rss }, after_last) {
            continue;
        }
        let started = std::time::Instant::now();
        if let Some(after) = release_and_count(&metrics, rss).await {
            tracing::debug!(
                free_kib = free >> 10,
                released_kib = rss.saturating_sub(after) >> 10,
                rss_mib = after >> 20,
                took_us = started.elapsed().as_micros() as u64,
                "gave freed heap back"
            );
            after_last = petrel_datapath::heap::free_heap_bytes()
                .map(|free| HeapReading { free, rss: after });
        }
    }
}

/// Releases the free heap off the runtime's workers (it holds the allocator's locks for a few
/// milliseconds at 10,000 agents) and counts what RSS fell by; the RSS after.
async fn release_and_count(metrics: &crate::metrics::HubMetrics, before: u64) -> Option<u64> {
    tokio::task::spawn_blocking(petrel_datapath::heap::release_free_heap)
        .await
        .ok()?;
    let after = rss_bytes()?;
    metrics
        .heap_released_bytes
        .inc_by(before.saturating_sub(after));
    Some(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_is_due_when_enough_is_free_and_something_moved_since_the_last() {
        const MIB: u64 = 1 << 20;
        let r = |free, rss| HeapReading {
            free: free * MIB,
            rss: rss * MIB,
        };
        // The first: from 4 MiB free.
        assert!(!release_due(
            HeapReading {
                free: 4 * MIB - 1,
                rss: 100 * MIB
            },
            None
        ));
        assert!(release_due(r(4, 100), None));
        // Nothing moved since the last release: not again.
        let last = Some(r(50, 100));
        assert!(!release_due(r(53, 103), last));
        // 4 MiB more freed, or RSS 4 MiB higher (freed pages written again): due.
        assert!(release_due(r(54, 100), last));
        assert!(release_due(r(50, 104), last));
        // Never below the floor, whatever moved.
        assert!(!release_due(
            HeapReading {
                free: 4 * MIB - 1,
                rss: 500 * MIB
            },
            Some(r(0, 100))
        ));
    }

    #[test]
    fn hysteresis() {
        let b = MemoryBudget::new(1000);
        assert!(!b.over(999, false));
        assert!(b.over(1000, false));
        assert!(b.over(950, true), "stays over until under 90%");
        assert!(!b.over(899, true));
        assert_eq!(
            MemoryBudget::from_cgroup_limit(512 << 20).limit,
            (512 << 20) / 100 * 85
        );
    }

    #[test]
    fn cgroup_limits_v1_and_v2() {
        let files = |p: &Path| -> Option<String> {
            match p.to_str()? {
                "/sys/fs/cgroup/kubepods/pod1/memory.max" => Some("536870912\n".into()),
                "/sys/fs/cgroup/unlimited/memory.max" => Some("max\n".into()),
                "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes" => {
                    Some("167772160\n".into())
                }
                "/sys/fs/cgroup/memory/free/memory.limit_in_bytes" => {
                    Some("9223372036854771712\n".into())
                }
                _ => None,
            }
        };
        assert_eq!(
            cgroup_limit("0::/kubepods/pod1\n", files),
            Some(536_870_912)
        );
        assert_eq!(cgroup_limit("0::/unlimited\n", files), None);
        assert_eq!(
            cgroup_limit("4:memory:/docker/abc\n1:cpu:/\n0::/\n", files),
            Some(167_772_160)
        );
        assert_eq!(cgroup_limit("4:memory:/free\n0::/\n", files), None);
        assert_eq!(cgroup_limit("garbage", files), None);
    }

    #[test]
    fn rss_is_readable_here() {
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }
}
