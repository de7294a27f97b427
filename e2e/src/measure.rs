//! Measuring primitives shared by the attack tools here ([`crate::attack`]) and the bench
//! (`petrel-bench`): the nearest-rank percentile of sorted samples, and a flag that stops a
//! measuring or serving thread when it is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The `p`th percentile (nearest rank) of sorted values.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    if sorted.len().is_multiple_of(2) && (p - 50.0).abs() < f64::EPSILON {
        let m = sorted.len() / 2;
        return (sorted[m - 1] + sorted[m]) / 2.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Stops a server thread when dropped.
pub struct StopFlag(pub Arc<AtomicBool>);

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
