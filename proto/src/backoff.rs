//! Sans-IO reconnect backoff: capped exponential delays with "equal jitter" (half fixed, half
//! random) so thousands of agents that lost the same hub do not reconnect in lockstep. The
//! caller supplies the random bits and the times, which keeps tests deterministic.
//!
//! The attempt counter resets only after a session that stayed up for `stable_after`: a hub
//! that accepts and then immediately drops an agent must not reset it to the fastest retry.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackoffPolicy {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Cap on the delay (before jitter).
    pub max: Duration,
    /// Growth factor per attempt; values below 1 are treated as 1.
    pub multiplier: u32,
    /// A session this long counts as healthy and resets the attempt counter.
    pub stable_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2,
            stable_after: Duration::from_secs(60),
        }
    }
}

impl BackoffPolicy {
    /// The edge agent's reconnect policy (and the load generator's, which models it): first retry
    /// after 100 ms, doubling up to `max`; a session of 10 s counts as healthy.
    pub fn agent_reconnect(max: Duration) -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max,
            multiplier: 2,
            stable_after: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempts: u32,
    connected_at: Option<Instant>,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff {
            policy,
            attempts: 0,
            connected_at: None,
        }
    }

    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// The un-jittered delay for the current attempt: `initial * multiplier^attempts`, capped.
    pub fn current_base(&self) -> Duration {
        let cap = self.policy.max;
        let mult = self.policy.multiplier.max(1);
        let mut d = self.policy.initial.min(cap);
        for _ in 0..self.attempts {
            if d >= cap || mult == 1 || d.is_zero() {
                break;
            }
            d = d.checked_mul(mult).map_or(cap, |x| x.min(cap));
        }
        d
    }

    /// The delay before the next attempt, uniformly in `[d/2, d]` for the capped exponential
    /// `d`, chosen by `jitter`. Counts an attempt.
    pub fn next_delay(&mut self, jitter: u64) -> Duration {
        let d = self.current_base();
        self.attempts = self.attempts.saturating_add(1);
        let total = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let half = total / 2;
        let span = total - half;
        let extra = match span.checked_add(1) {
            Some(n) => jitter % n,
            None => jitter,
        };
        Duration::from_nanos(half.saturating_add(extra))
    }

    pub fn on_connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    pub fn on_disconnected(&mut self, now: Instant) {
        if let Some(since) = self.connected_at.take() {
            if now.saturating_duration_since(since) >= self.policy.stable_after {
                self.attempts = 0;
            }
        }
    }

    /// Attempts counted since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Forgets all history, e.g. after an operator-triggered reconnect.
    pub fn reset(&mut self) {
        self.attempts = 0;
        self.connected_at = None;
    }
}

/// How long an agent that lost its hub without a goodbye waits before its first attempt: a
/// `jitter` share (in `[0, 1)`) of the hub's `spread` ([`crate::HubView::reconnect_spread`]),
/// counted from when it last heard the hub, so less the `since_heard` already gone.
///
/// Agents notice a dead hub at different times (the next ping meets a reset, or the silence
/// timer fires), up to a keepalive interval apart; counting from the last word heard makes the
/// fleet's arrivals uniform over `spread` after the loss rather than over `spread` plus that
/// interval. The hub sizes `spread` to its fleet: thousands of agents that all come back at
/// once overflow its handshake queue, and every attempt that times out there costs both ends
/// a new Initial, Retry and handshake (docs/performance.md, session 20).
pub fn herd_delay(spread: Duration, since_heard: Duration, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    spread.mul_f64(jitter).saturating_sub(since_heard)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: 100 * MS,
            max: 2000 * MS,
            multiplier: 2,
            stable_after: 10_000 * MS,
        }
    }

    #[test]
    fn a_herd_delay_is_a_share_of_the_spread_less_the_time_since_the_hub_was_heard() {
        let spread = 6_000 * MS;
        assert_eq!(herd_delay(spread, Duration::ZERO, 0.5), 3_000 * MS);
        // Noticed 1.2 s after the last word: 1.2 s of the share has already gone by.
        assert_eq!(herd_delay(spread, 1_200 * MS, 0.5), 1_800 * MS);
        // A share smaller than the time already gone: at once.
        assert_eq!(herd_delay(spread, 2_000 * MS, 0.25), Duration::ZERO);
        // No spread (a hub from before it, a small fleet): at once, as before.
        assert_eq!(
            herd_delay(Duration::ZERO, Duration::ZERO, 0.9),
            Duration::ZERO
        );
        // Jitter outside [0, 1] is clamped; NaN counts as 0.
        assert_eq!(herd_delay(spread, Duration::ZERO, 7.0), spread);
        assert_eq!(herd_delay(spread, Duration::ZERO, -1.0), Duration::ZERO);
        assert_eq!(herd_delay(spread, Duration::ZERO, f64::NAN), Duration::ZERO);
        // 1,000 agents that noticed the loss up to 2 s after they last heard the hub: every
        // one starts within the spread of that last word (plain jitter after noticing would
        // take up to 8 s), and no second of the window gets more than 1.6 times its share.
        let mut per_second = [0u32; 6];
        for (j, h) in (0..40u32).flat_map(|j| (0..25u32).map(move |h| (j, h))) {
            let jitter = f64::from(j) / 40.0;
            let heard = Duration::from_millis(u64::from(h * 80));
            // When the agent starts its attempt, counted from the last word heard.
            let start = heard + herd_delay(spread, heard, jitter);
            assert!(start <= spread, "{start:?}");
            per_second[(start.as_secs() as usize).min(5)] += 1;
        }
        assert!(per_second.iter().all(|n| *n <= 267), "{per_second:?}");
    }

    #[test]
    fn grows_exponentially_and_caps() {
        let mut b = Backoff::new(policy());
        let maxed: Vec<_> = (0..8).map(|_| b.next_delay(u64::MAX - 1)).collect();
        let bases = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for (got, base) in maxed.iter().zip(bases) {
            let base = u64::try_from(base).unwrap_or(0) * 1_000_000;
            assert!(got.as_nanos() <= u128::from(base), "{got:?} > {base}");
            assert!(got.as_nanos() >= u128::from(base / 2), "{got:?} < {base}/2");
        }
        assert_eq!(b.attempts(), 8);
        for _ in 0..1000 {
            assert!(b.next_delay(u64::MAX) <= 2000 * MS);
        }
    }

    #[test]
    fn jitter_bounds_are_reachable() {
        let mut b = Backoff::new(policy());
        assert_eq!(b.next_delay(0), 50 * MS);
        let mut b = Backoff::new(policy());
        // span + 1 = 50_000_001 possible values; jitter = span hits the top.
        assert_eq!(b.next_delay(50_000_000), 100 * MS);
        let mut b = Backoff::new(policy());
        for j in [1u64, 7, 1 << 40, u64::MAX] {
            let d = b.next_delay(j);
            b.reset();
            assert!(d >= 50 * MS && d <= 100 * MS, "{d:?}");
        }
    }

    #[test]
    fn resets_only_after_stable_session() {
        let t0 = Instant::now();
        let mut b = Backoff::new(policy());
        for _ in 0..5 {
            b.next_delay(0);
        }
        b.on_connected(t0);
        b.on_disconnected(t0 + 9_999 * MS);
        assert_eq!(b.attempts(), 5);
        b.on_connected(t0 + 10_000 * MS);
        b.on_disconnected(t0 + 20_000 * MS);
        assert_eq!(b.attempts(), 0);
        // A disconnect without a connect changes nothing.
        b.next_delay(0);
        b.on_disconnected(t0 + 90_000 * MS);
        assert_eq!(b.attempts(), 1);
    }

    #[test]
    fn degenerate_policies() {
        let mut b = Backoff::new(BackoffPolicy {
            initial: Duration::MAX,
            max: Duration::MAX,
            multiplier: 0,
            stable_after: Duration::ZERO,
        });
        for _ in 0..3 {
            let d = b.next_delay(u64::MAX);
            assert!(d >= Duration::from_nanos(u64::MAX / 2));
        }
        let mut b = Backoff::new(BackoffPolicy {
            initial: Duration::ZERO,
            ..policy()
        });
        assert_eq!(b.next_delay(12345), Duration::ZERO);
        let mut b = Backoff::new(BackoffPolicy {
            multiplier: 1,
            ..policy()
        });
        b.next_delay(0);
        assert_eq!(b.next_delay(0), 50 * MS);
        let mut b = Backoff::new(BackoffPolicy {
            initial: 5000 * MS,
            ..policy()
        });
        assert_eq!(b.current_base(), 2000 * MS);
        let mut b2 = Backoff::new(BackoffPolicy {
            multiplier: u32::MAX,
            ..policy()
        });
        b2.next_delay(0);
        assert_eq!(b2.current_base(), 2000 * MS);
        b.on_connected(Instant::now());
    }
}

#[cfg(test)]
#[path = "backoff_tests.rs"]
mod mutant_tests;
