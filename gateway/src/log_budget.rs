//! A budget for log lines about refusals anyone on the internet can provoke (handshakes,
//! enrolments, egress connections, CertificateSigningRequests): one shared by every part of the
//! hub that logs them, so a flood shows in the log as a few lines and a count, never as the
//! flood itself.

use std::time::{Duration, Instant};

/// Log lines about refusals anyone on the internet can provoke: at most `per_window` per
/// window, and a line saying how many were left out when the next window opens. The counters in
/// the metrics count every refusal; the log only has to show that they happen.
#[derive(Debug)]
pub struct LogBudget {
    per_window: u32,
    window: Duration,
    state: std::sync::Mutex<LogWindow>,
}

#[derive(Debug)]
struct LogWindow {
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: std::sync::Mutex::new(LogWindow {
                started: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line about `what` may be logged now.
    pub fn allow(&self, what: &str) -> bool {
        let (ok, suppressed) = self.allow_at(Instant::now());
        if suppressed > 0 {
            tracing::warn!(
                suppressed,
                "{what}: {suppressed} similar log lines left out in the last window (see the metrics)"
            );
        }
        ok
    }

    /// Pure core of [`allow`](Self::allow): whether to log, and how many lines the window that
    /// just closed left out (reported once).
    pub fn allow_at(&self, now: Instant) -> (bool, u64) {
        let Ok(mut s) = self.state.lock() else {
            return (false, 0);
        };
        let mut reported = 0;
        let expired = s
            .started
            .is_none_or(|t| now.saturating_duration_since(t) >= self.window);
        if expired {
            reported = std::mem::take(&mut s.suppressed);
            s.started = Some(now);
            s.used = 0;
        }
        if s.used < self.per_window {
            s.used += 1;
            (true, reported)
        } else {
            s.suppressed += 1;
            (false, reported)
        }
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new(5, Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_budget_limits_lines_and_reports_what_it_left_out() {
        let t0 = Instant::now();
        let lb = LogBudget::new(2, Duration::from_secs(1));
        assert_eq!(lb.allow_at(t0), (true, 0));
        assert_eq!(lb.allow_at(t0), (true, 0));
        assert_eq!(lb.allow_at(t0), (false, 0));
        assert_eq!(lb.allow_at(t0 + Duration::from_millis(999)), (false, 0));
        // Next window: allowed again, and the two left out are reported once.
        assert_eq!(lb.allow_at(t0 + Duration::from_secs(1)), (true, 2));
        assert_eq!(lb.allow_at(t0 + Duration::from_secs(1)), (true, 0));
    }
}
