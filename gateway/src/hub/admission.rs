//! Pre-authentication admission: what an address that has not proved a token or a certificate
//! may cost the hub. The hub's UDP port faces the internet, so every path before authentication
//! has a count budget here (per source address and in total) on top of the memory budget the
//! transport sets (`petrel_transport::quic::PreAuthLimits`) and the deadlines of each phase.
//!
//! Pure logic, sans-IO: callers pass `now`; nothing here reads a clock or a socket, so the
//! buckets are tested with a simulated clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket per source address, with a bounded table. Each address may spend `burst`
/// attempts at once and gets `per_second` back over time. When the table is full, entries that
/// are full again (idle long enough to have refilled) are forgotten first; if none are, the
/// attempt is refused: an attacker spraying spoofed sources fills the table and is then refused
/// as a whole, while the memory stays at `max_sources` entries.
#[derive(Debug)]
pub struct SourceRateLimit {
    burst: f64,
    per_second: f64,
    max_sources: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Why an attempt was not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateRefusal {
    /// This address spent its budget.
    SourceOverBudget,
    /// Too many distinct addresses are over budget or recently active at once.
    TableFull,
}

impl RateRefusal {
    pub fn label(self) -> &'static str {
        match self {
            RateRefusal::SourceOverBudget => "source_rate_limited",
            RateRefusal::TableFull => "rate_table_full",
        }
    }
}

impl SourceRateLimit {
    pub fn new(burst: u32, per_second: u32, max_sources: usize) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_second),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Spends one attempt for `ip` at `now`, or says why not.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), RateRefusal> {
        let ip = canonical(ip);
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_sources {
            self.forget_refilled(now);
            if self.buckets.len() >= self.max_sources {
                return Err(RateRefusal::TableFull);
            }
        }
        let (burst, rate) = (self.burst, self.per_second);
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(RateRefusal::SourceOverBudget)
        }
    }

    /// Addresses currently remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn forget_refilled(&mut self, now: Instant) {
        let (burst, rate) = (self.burst, self.per_second);
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
    }
}

/// IPv4-mapped IPv6 sources count as their IPv4 address (a dual-stack socket reports both).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Limits before authentication, with their defaults (docs/security.md explains each).
#[derive(Debug, Clone)]
pub struct PreAuthBudget {
    /// Handshakes per source address: burst, then per second. A NAT'd site's agents share one
    /// public address and all come back at once after a hub restart, so the burst is generous.
    pub handshake_burst: u32,
    pub handshakes_per_second: u32,
    /// Enrolment attempts per source address.
    pub enrol_burst: u32,
    pub enrolments_per_second: u32,
    /// Addresses remembered by each limiter.
    pub max_sources: usize,
    /// Enrolment connections served at once; more are closed with a reason.
    pub max_enrolments: usize,
    /// Handshakes in flight above which unvalidated sources must first answer a QUIC Retry.
    pub retry_above: usize,
    /// An enrolment connection must deliver its request within this.
    pub enrol_deadline: Duration,
}

impl Default for PreAuthBudget {
    fn default() -> Self {
        Self {
            handshake_burst: 512,
            handshakes_per_second: 128,
            enrol_burst: 16,
            enrolments_per_second: 2,
            max_sources: 16_384,
            max_enrolments: 32,
            retry_above: 16,
            enrol_deadline: Duration::from_secs(5),
        }
    }
}

/// What to do with an incoming handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeVerdict {
    Accept,
    /// Ask the source to prove it receives at its address (QUIC Retry): costs the hub one
    /// stateless packet and no slot.
    Retry,
    /// Drop silently: the agent retransmits its Initial and gets in once there is room.
    Ignore(&'static str),
}

/// Decides an incoming handshake from what is known before any state is created. `rate` spends
/// the source's budget; it is called only for a handshake that is not sent a Retry first, so a
/// spoofed source (which never answers the Retry) spends nobody's budget.
pub fn decide_handshake(
    budget: &PreAuthBudget,
    in_flight: usize,
    max_in_flight: usize,
    address_validated: bool,
    may_retry: bool,
    rate: impl FnOnce() -> Result<(), RateRefusal>,
) -> HandshakeVerdict {
    if !address_validated && may_retry && in_flight >= budget.retry_above {
        return HandshakeVerdict::Retry;
    }
    if let Err(r) = rate() {
        return HandshakeVerdict::Ignore(r.label());
    }
    if in_flight >= max_in_flight {
        return HandshakeVerdict::Ignore("deferred");
    }
    HandshakeVerdict::Accept
}

/// Address-validated handshakes waiting for a slot, newest first. Without it a handshake that
/// arrives while every slot is busy is ignored and its agent waits for its own retransmission
/// (about a second, then two): after a hub restart a fleet then spent most of its 3 s connect
/// budget waiting on timers while slots were freeing up. Only sources that proved their address
/// are queued (they answered a Retry or presented an unused address token; a spoofed address
/// can do neither), the queue is bounded, and an entry older than
/// `max_wait` is dropped (its agent has given up or is about to), so it costs at most
/// `capacity` held Initial packets.
///
/// Newest first because the queue only fills when the hub is saturated, and then every agent
/// behind the head of a first-come queue has waited nearly `max_wait`: the hub answered
/// Initials whose agents gave up a moment later, and in a 10,000-agent reconnect storm 60% of
/// the handshakes it started were closed by an agent that no longer waited. The newest Initial
/// has the most of its agent's patience left. For the same reason a full queue drops its oldest
/// entry to make room. The agents that lose out come back with a fresh attempt, which is then
/// the newest.
#[derive(Debug)]
pub struct HandshakeQueue<T> {
    capacity: usize,
    max_wait: Duration,
    /// Oldest at the front, newest at the back.
    waiting: std::collections::VecDeque<(Instant, T)>,
}

/// Why a handshake left the queue without a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueDrop {
    /// The queue was full and a newer handshake took its place.
    Full,
    /// It waited longer than `max_wait`.
    Expired,
}

impl QueueDrop {
    pub fn label(self) -> &'static str {
        match self {
            QueueDrop::Full => "queue_full",
            QueueDrop::Expired => "queue_expired",
        }
    }
}

impl<T> HandshakeQueue<T> {
    pub fn new(capacity: usize, max_wait: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            max_wait,
            waiting: std::collections::VecDeque::new(),
        }
    }

    /// Queues `item`; when the queue is full, the oldest waiting handshake makes room and is
    /// handed back.
    pub fn push(&mut self, now: Instant, item: T) -> Option<T> {
        let pushed_out = if self.waiting.len() >= self.capacity {
            self.waiting.pop_front().map(|(_, old)| old)
        } else {
            None
        };
        self.waiting.push_back((now, item));
        pushed_out
    }

    /// The newest handshake; the expired ones go to `expired` first.
    pub fn pop(&mut self, now: Instant, expired: impl FnMut(T)) -> Option<T> {
        self.expire(now, expired);
        self.waiting.pop_back().map(|(_, item)| item)
    }

    /// Drops what has waited longer than `max_wait` (exactly `max_wait` is still in time).
    pub fn expire(&mut self, now: Instant, mut expired: impl FnMut(T)) {
        while self
            .waiting
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.max_wait)
        {
            if let Some((_, item)) = self.waiting.pop_front() {
                expired(item);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// When the oldest entry expires, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.waiting.front().map(|(at, _)| *at + self.max_wait)
    }
}

/// The pre-authentication budgets and their live counters .
#[derive(Debug)]
pub struct PreAuthState {
    pub budget: PreAuthBudget,
    pub handshakes: Mutex<SourceRateLimit>,
    pub enrolments: Mutex<SourceRateLimit>,
    pub enrol_slots: Arc<tokio::sync::Semaphore>,
}

impl PreAuthState {
    pub fn new(budget: PreAuthBudget) -> Self {
        Self {
            handshakes: Mutex::new(SourceRateLimit::new(
                budget.handshake_burst,
                budget.handshakes_per_second,
                budget.max_sources,
            )),
            enrolments: Mutex::new(SourceRateLimit::new(
                budget.enrol_burst,
                budget.enrolments_per_second,
                budget.max_sources,
            )),
            enrol_slots: Arc::new(tokio::sync::Semaphore::new(budget.max_enrolments)),
            budget,
        }
    }

    fn spend(limiter: &Mutex<SourceRateLimit>, ip: std::net::IpAddr) -> Result<(), RateRefusal> {
        match limiter.lock() {
            Ok(mut l) => l.check(ip, std::time::Instant::now()),
            Err(_) => Err(RateRefusal::TableFull),
        }
    }

    pub fn spend_handshake(&self, ip: std::net::IpAddr) -> Result<(), RateRefusal> {
        Self::spend(&self.handshakes, ip)
    }

    pub fn spend_enrolment(&self, ip: std::net::IpAddr) -> Result<(), RateRefusal> {
        Self::spend(&self.enrolments, ip)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn handshake_queue_serves_the_newest_pushes_out_the_oldest_and_expires() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = HandshakeQueue::new(2, Duration::from_secs(2));
        assert!(q.is_empty());
        assert_eq!(q.push(t0, 1), None);
        assert_eq!(q.push(t0 + ms(500), 2), None);
        // Full: the oldest makes room for the newest.
        assert_eq!(q.push(t0 + ms(600), 3), Some(1));
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_expiry(), Some(t0 + ms(2500)));
        let mut expired = Vec::new();
        // Newest first.
        assert_eq!(q.pop(t0 + ms(700), |x| expired.push(x)), Some(3));
        assert_eq!(q.push(t0 + ms(800), 4), None);
        // Exactly at max_wait 2 is still in time, yet 4 is newer.
        assert_eq!(q.pop(t0 + ms(2500), |x| expired.push(x)), Some(4));
        assert!(expired.is_empty());
        assert_eq!(q.len(), 1);
        // Just past max_wait it is dropped rather than served.
        assert_eq!(q.pop(t0 + ms(2501), |x| expired.push(x)), None);
        assert_eq!(expired, vec![2]);
        assert!(q.is_empty());
        assert_eq!(q.next_expiry(), None);
    }

    #[test]
    fn handshake_queue_expire_keeps_the_fresh_ones() {
        let t0 = Instant::now();
        let mut q = HandshakeQueue::new(8, Duration::from_secs(1));
        for (i, ms) in [0u64, 100, 900, 1500].into_iter().enumerate() {
            assert_eq!(q.push(t0 + Duration::from_millis(ms), i), None);
        }
        let mut expired = Vec::new();
        q.expire(t0 + Duration::from_millis(1101), |x| expired.push(x));
        assert_eq!(expired, vec![0, 1]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_expiry(), Some(t0 + Duration::from_millis(1900)));
        assert_eq!(QueueDrop::Full.label(), "queue_full");
        assert_eq!(QueueDrop::Expired.label(), "queue_expired");
    }

    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, n))
    }

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut rl = SourceRateLimit::new(3, 2, 16);
        for _ in 0..3 {
            assert_eq!(rl.check(ip(1), t0), Ok(()));
        }
        assert_eq!(rl.check(ip(1), t0), Err(RateRefusal::SourceOverBudget));
        // Another source has its own bucket.
        assert_eq!(rl.check(ip(2), t0), Ok(()));
        // 2 per second: after 499 ms not yet one token (refusals spend nothing), after 600 ms one.
        assert_eq!(
            rl.check(ip(1), t0 + Duration::from_millis(499)),
            Err(RateRefusal::SourceOverBudget)
        );
        assert_eq!(rl.check(ip(1), t0 + Duration::from_millis(600)), Ok(()));
        assert_eq!(
            rl.check(ip(1), t0 + Duration::from_millis(600)),
            Err(RateRefusal::SourceOverBudget)
        );
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(rl.check(ip(1), later), Ok(()));
        }
        assert_eq!(rl.check(ip(1), later), Err(RateRefusal::SourceOverBudget));
    }

    #[test]
    fn table_is_bounded_and_forgets_refilled_sources_first() {
        let t0 = Instant::now();
        let mut rl = SourceRateLimit::new(2, 1, 2);
        assert_eq!(rl.check(ip(1), t0), Ok(()));
        assert_eq!(rl.check(ip(2), t0), Ok(()));
        // Full, nobody refilled: a third source is refused, the table does not grow.
        assert_eq!(rl.check(ip(3), t0), Err(RateRefusal::TableFull));
        assert_eq!(rl.len(), 2);
        // After a second both have refilled to the burst and may be forgotten.
        assert_eq!(rl.check(ip(3), t0 + Duration::from_secs(1)), Ok(()));
        assert!(rl.len() <= 2);
    }

    #[test]
    fn mapped_ipv6_counts_as_its_ipv4_address() {
        let t0 = Instant::now();
        let mut rl = SourceRateLimit::new(1, 0, 16);
        assert_eq!(rl.check(ip(7), t0), Ok(()));
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped());
        assert_eq!(rl.check(mapped, t0), Err(RateRefusal::SourceOverBudget));
        let other = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(rl.check(other, t0), Ok(()));
    }

    #[test]
    fn handshake_verdicts() {
        let b = PreAuthBudget {
            retry_above: 4,
            ..Default::default()
        };
        // Quiet hub: accept without a Retry round trip.
        assert_eq!(
            decide_handshake(&b, 3, 256, false, true, || Ok(())),
            HandshakeVerdict::Accept
        );
        // Busy: unvalidated sources must answer a Retry first...
        assert_eq!(
            decide_handshake(&b, 4, 256, false, true, || panic!(
                "a Retry spends no budget"
            )),
            HandshakeVerdict::Retry
        );
        // ...validated ones (they came back with the token) are admitted.
        assert_eq!(
            decide_handshake(&b, 4, 256, true, false, || Ok(())),
            HandshakeVerdict::Accept
        );
        // Full: validated sources wait for a slot.
        assert_eq!(
            decide_handshake(&b, 256, 256, true, false, || Ok(())),
            HandshakeVerdict::Ignore("deferred")
        );
        // Over its own budget: ignored with the reason, whatever the load.
        assert_eq!(
            decide_handshake(&b, 0, 256, true, false, || Err(
                RateRefusal::SourceOverBudget
            )),
            HandshakeVerdict::Ignore("source_rate_limited")
        );
    }
}
