//! The sans-IO keepalive and RTT state machine for one control stream. The driver feeds it the
//! current time and inbound events and acts on what [`Keepalive::poll`] returns; the machine
//! never reads a clock, so tests drive it with synthetic `Instant`s.
//!
//! The first ping is due immediately so RTT is known as soon as a session starts. A peer is dead
//! when *nothing* (not only pongs) arrived for `timeout`, since a busy peer whose pongs queue
//! behind large updates is still alive. RTT is smoothed like TCP's SRTT (RFC 6298, gain 1/8)
//! and measured against our own recorded send time, never the echoed timestamp, so a peer
//! cannot fake it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::control::{Ping, Pong};

/// Pings whose pongs we still accept; older ones are forgotten (their RTT would be stale).
const MAX_OUTSTANDING: usize = 8;
/// Keeps `Instant + Duration` far from overflow and an interval of zero from spinning.
const MIN_INTERVAL: Duration = Duration::from_millis(1);
const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveAction {
    /// Send this ping on the control stream, then poll again.
    SendPing(Ping),
    /// Nothing was received for the timeout: close the connection.
    TimedOut,
    /// Nothing to do until this instant (or until a message arrives).
    Wait(Instant),
}

#[derive(Debug, Clone)]
pub struct Keepalive {
    interval: Duration,
    timeout: Duration,
    epoch: Instant,
    next_ping: Instant,
    last_rx: Instant,
    next_nonce: u64,
    outstanding: VecDeque<(u64, Instant)>,
    srtt: Option<Duration>,
    latest_rtt: Option<Duration>,
    /// Ping only after `interval` with nothing received (see [`Keepalive::when_quiet`]).
    when_quiet: bool,
}

fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

impl Keepalive {
    /// `interval` between pings, `timeout` of silence before the peer is declared dead.
    /// Both are clamped to [1 ms, 24 h].
    pub fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Keepalive {
            interval: interval.clamp(MIN_INTERVAL, MAX_PERIOD),
            timeout: timeout.clamp(MIN_INTERVAL, MAX_PERIOD),
            epoch: now,
            next_ping: now,
            last_rx: now,
            next_nonce: 1,
            outstanding: VecDeque::with_capacity(MAX_OUTSTANDING),
            srtt: None,
            latest_rtt: None,
            when_quiet: false,
        }
    }

    /// Like [`Keepalive::new`], but after the first ping (due at once, for an early RTT) it
    /// pings only when nothing arrived for `interval`. The side that answers a peer's regular
    /// pings uses it: those pings already prove the peer alive, and a hub with 10,000 agents
    /// otherwise spends a quarter of its idle CPU on pings nobody needs.
    pub fn when_quiet(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Keepalive {
            when_quiet: true,
            ..Self::new(interval, timeout, now)
        }
    }

    pub fn poll(&mut self, now: Instant) -> KeepaliveAction {
        let dead_at = later(self.last_rx, self.timeout);
        if now >= dead_at {
            return KeepaliveAction::TimedOut;
        }
        if now >= self.next_ping {
            let nonce = self.next_nonce;
            self.next_nonce = self.next_nonce.wrapping_add(1);
            // Scheduled from `now`, not from the missed deadline, so a stalled driver does not
            // fire a burst of catch-up pings.
            self.next_ping = later(now, self.interval);
            if self.outstanding.len() == MAX_OUTSTANDING {
                self.outstanding.pop_front();
            }
            self.outstanding.push_back((nonce, now));
            return KeepaliveAction::SendPing(Ping {
                nonce,
                sent_at_micros: self.micros_since_epoch(now),
            });
        }
        KeepaliveAction::Wait(self.next_ping.min(dead_at))
    }

    /// Feeds a pong. Returns the RTT sample if it answers one of our recent pings.
    pub fn on_pong(&mut self, pong: &Pong, now: Instant) -> Option<Duration> {
        self.on_receive(now);
        let idx = self
            .outstanding
            .iter()
            .position(|&(nonce, _)| nonce == pong.nonce)?;
        let (_, sent) = *self.outstanding.get(idx)?;
        if pong.echo_sent_at_micros != self.micros_since_epoch(sent) {
            return None;
        }
        // Pongs arrive in order, so anything older than this one is lost.
        self.outstanding.drain(..=idx);
        let sample = now.saturating_duration_since(sent);
        self.latest_rtt = Some(sample);
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(srtt) => srtt
                .checked_mul(7)
                .and_then(|d| d.checked_add(sample))
                .map_or(sample, |d| d / 8),
        });
        Some(sample)
    }

    /// Any inbound message proves the peer alive.
    pub fn on_receive(&mut self, now: Instant) {
        if now > self.last_rx {
            self.last_rx = now;
        }
        if self.when_quiet {
            self.next_ping = self.next_ping.max(later(self.last_rx, self.interval));
        }
    }

    /// Smoothed RTT, once a sample exists.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The most recent raw RTT sample.
    pub fn latest_rtt(&self) -> Option<Duration> {
        self.latest_rtt
    }

    /// The last time anything was received.
    pub fn last_receive(&self) -> Instant {
        self.last_rx
    }

    fn micros_since_epoch(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ping(action: KeepaliveAction) -> Ping {
        match action {
            KeepaliveAction::SendPing(p) => p,
            other => panic!("expected a ping, got {other:?}"),
        }
    }

    #[test]
    fn pings_on_schedule_with_increasing_nonces() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(1000 * MS, 5000 * MS, t0);
        let p1 = ping(k.poll(t0));
        assert_eq!(p1.sent_at_micros, 0);
        assert_eq!(k.poll(t0), KeepaliveAction::Wait(t0 + 1000 * MS));
        assert_eq!(k.poll(t0 + 999 * MS), KeepaliveAction::Wait(t0 + 1000 * MS));
        k.on_receive(t0 + 900 * MS);
        let p2 = ping(k.poll(t0 + 1000 * MS));
        assert_eq!(p2.nonce, p1.nonce + 1);
        assert_eq!(p2.sent_at_micros, 1_000_000);
    }

    #[test]
    fn when_quiet_pings_only_after_silence() {
        let t0 = Instant::now();
        let mut k = Keepalive::when_quiet(1000 * MS, 5000 * MS, t0);
        // The first ping is due at once, for an RTT.
        ping(k.poll(t0));
        // The peer's own traffic (here every 800 ms) keeps pushing the next ping out.
        for i in 1..=10u32 {
            let now = t0 + 800 * i * MS;
            k.on_receive(now);
            assert_eq!(k.poll(now), KeepaliveAction::Wait(now + 1000 * MS));
        }
        // Silence: a ping once `interval` has passed since the last message, then on schedule.
        let last = t0 + 8000 * MS;
        assert_eq!(
            k.poll(last + 999 * MS),
            KeepaliveAction::Wait(last + 1000 * MS)
        );
        let p = ping(k.poll(last + 1000 * MS));
        assert_eq!(p.sent_at_micros, 9_000_000);
        ping(k.poll(last + 2000 * MS));
        // And the peer is still declared dead after `timeout` of silence.
        assert_eq!(k.poll(last + 5000 * MS), KeepaliveAction::TimedOut);
        // A plain keepalive pings on schedule whatever arrives.
        let mut plain = Keepalive::new(1000 * MS, 5000 * MS, t0);
        ping(plain.poll(t0));
        plain.on_receive(t0 + 900 * MS);
        ping(plain.poll(t0 + 1000 * MS));
    }

    #[test]
    fn rtt_sample_and_smoothing() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(1000 * MS, 5000 * MS, t0);
        let p = ping(k.poll(t0));
        assert_eq!(k.rtt(), None);
        assert_eq!(k.on_pong(&p.pong(), t0 + 40 * MS), Some(40 * MS));
        assert_eq!(k.rtt(), Some(40 * MS));
        // Duplicate pong: already consumed.
        assert_eq!(k.on_pong(&p.pong(), t0 + 50 * MS), None);
        let p = ping(k.poll(t0 + 1000 * MS));
        assert_eq!(k.on_pong(&p.pong(), t0 + 1120 * MS), Some(120 * MS));
        assert_eq!(k.rtt(), Some(50 * MS));
        assert_eq!(k.latest_rtt(), Some(120 * MS));
    }

    #[test]
    fn unknown_or_forged_pongs_ignored() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(1000 * MS, 5000 * MS, t0);
        let p = ping(k.poll(t0));
        let unknown = Pong {
            nonce: 999,
            echo_sent_at_micros: 0,
        };
        assert_eq!(k.on_pong(&unknown, t0 + MS), None);
        let forged = Pong {
            nonce: p.nonce,
            echo_sent_at_micros: 12345,
        };
        assert_eq!(k.on_pong(&forged, t0 + MS), None);
        assert_eq!(k.rtt(), None);
        // The genuine pong still counts.
        assert!(k.on_pong(&p.pong(), t0 + 2 * MS).is_some());
    }

    #[test]
    fn older_pings_forgotten_after_newer_pong() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(1000 * MS, 60_000 * MS, t0);
        let p1 = ping(k.poll(t0));
        let p2 = ping(k.poll(t0 + 1000 * MS));
        assert!(k.on_pong(&p2.pong(), t0 + 1010 * MS).is_some());
        assert_eq!(k.on_pong(&p1.pong(), t0 + 1020 * MS), None);
    }

    #[test]
    fn times_out_without_traffic_and_not_with_it() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(1000 * MS, 3000 * MS, t0);
        let _ = ping(k.poll(t0));
        let _ = ping(k.poll(t0 + 1000 * MS));
        k.on_receive(t0 + 2500 * MS);
        let _ = ping(k.poll(t0 + 3000 * MS));
        assert_eq!(
            k.poll(t0 + 3000 * MS),
            KeepaliveAction::Wait(t0 + 4000 * MS)
        );
        let _ = ping(k.poll(t0 + 4000 * MS));
        assert_eq!(
            k.poll(t0 + 4500 * MS),
            KeepaliveAction::Wait(t0 + 5000 * MS)
        );
        let _ = ping(k.poll(t0 + 5000 * MS));
        assert_eq!(
            k.poll(t0 + 5000 * MS),
            KeepaliveAction::Wait(t0 + 5500 * MS)
        );
        assert_eq!(k.poll(t0 + 5500 * MS), KeepaliveAction::TimedOut);
        assert_eq!(k.poll(t0 + 9000 * MS), KeepaliveAction::TimedOut);
    }

    #[test]
    fn outstanding_is_bounded() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(MS, 3_600_000 * MS, t0);
        let first = ping(k.poll(t0));
        for i in 1..100u32 {
            let _ = ping(k.poll(t0 + i * MS));
        }
        assert!(k.outstanding.len() <= MAX_OUTSTANDING);
        assert_eq!(k.on_pong(&first.pong(), t0 + 200 * MS), None);
    }

    #[test]
    fn extreme_durations_do_not_panic() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(Duration::ZERO, Duration::MAX, t0);
        let _ = ping(k.poll(t0));
        assert!(matches!(k.poll(t0), KeepaliveAction::Wait(_)));
        let mut k = Keepalive::new(Duration::MAX, Duration::ZERO, t0);
        assert_eq!(k.poll(t0 + MS), KeepaliveAction::TimedOut);
    }
}
