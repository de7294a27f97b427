//! Liveness probes on the hub's relay port, for active-active hubs: a node role asks every hub
//! "are you there" every [`PROBE_INTERVAL`] and, after [`DEAD_AFTER`] without an answer, routes
//! that hub's sites to the next hub of their ranking (`crate::ownership`); an answer brings it
//! back. This is how the cloud side notices a dead hub in well under a second without waiting
//! for anything else (a Kubernetes Lease, a tunnel timeout).
//!
//! Wire format: 16 bytes, an 8-byte tag and the prober's 8-byte nonce. A request starts
//! `PTRLPRB?`, the answer `PTRLPRB!` with the same nonce: exactly as long as the request, so the
//! relay port cannot be used to amplify. Neither can be mistaken for VXLAN (whose first byte is
//! the flags byte `0x08`). The hub answers only addresses it knows as VTEPs.
//!
//! [`HubLiveness`] is the prober's state machine (time in, probes and changes out); the node
//! role's driver only sends what it says and feeds back what arrives.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Length of a probe and of its answer.
pub const PROBE_LEN: usize = 16;
const REQUEST_TAG: [u8; 8] = *b"PTRLPRB?";
const REPLY_TAG: [u8; 8] = *b"PTRLPRB!";
/// How often each hub is asked.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A hub that has not answered for this long is taken as dead (three probes and some slack).
pub const DEAD_AFTER: Duration = Duration::from_millis(700);
/// Answers to probes older than this many rounds are ignored.
const ROUNDS_ACCEPTED: u64 = 8;

/// A probe with `nonce`.
pub fn request(nonce: u64) -> [u8; PROBE_LEN] {
    tagged(REQUEST_TAG, nonce)
}

fn tagged(tag: [u8; 8], nonce: u64) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    out[..8].copy_from_slice(&tag);
    out[8..].copy_from_slice(&nonce.to_be_bytes());
    out
}

fn nonce_after(tag: [u8; 8], datagram: &[u8]) -> Option<u64> {
    if datagram.len() != PROBE_LEN || datagram.get(..8)? != tag {
        return None;
    }
    Some(u64::from_be_bytes(datagram.get(8..)?.try_into().ok()?))
}

/// The answer the hub sends, if `datagram` is a probe request.
pub fn reply_to(datagram: &[u8]) -> Option<[u8; PROBE_LEN]> {
    nonce_after(REQUEST_TAG, datagram).map(|n| tagged(REPLY_TAG, n))
}

/// The nonce of a probe answer.
pub fn parse_reply(datagram: &[u8]) -> Option<u64> {
    nonce_after(REPLY_TAG, datagram)
}

/// Whether `datagram` looks like a probe or an answer (the hub counts other junk as malformed
/// VXLAN).
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.get(..7) == Some(&REQUEST_TAG[..7])
}

#[derive(Debug, Clone)]
struct Hub {
    name: String,
    /// The last answer, or when probing started (a hub is taken as live until it has had
    /// [`DEAD_AFTER`] to answer).
    heard: Instant,
    live: bool,
}

/// Which hubs answer their probes.
#[derive(Debug, Clone)]
pub struct HubLiveness {
    hubs: Vec<Hub>,
    /// Nonces are `base + round * 2^16 + index`; `base` is the driver's random number, so a
    /// blind third party cannot answer for a dead hub.
    base: u64,
    round: u64,
    next_probe: Instant,
}

/// What the driver does after [`HubLiveness::tick`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tick {
    /// Probes to send now, by hub name.
    pub probes: Vec<(String, [u8; PROBE_LEN])>,
    /// The hubs taken as dead, when that set changed.
    pub down_changed: Option<BTreeSet<String>>,
}

impl HubLiveness {
    /// Probing of `hubs` (at most 65,536) starting at `now`; every hub is live until it had its
    /// chance to answer.
    pub fn new(hubs: impl IntoIterator<Item = String>, base: u64, now: Instant) -> Self {
        let hubs = hubs
            .into_iter()
            .take(1 << 16)
            .map(|name| Hub {
                name,
                heard: now,
                live: true,
            })
            .collect();
        Self {
            hubs,
            base,
            round: 0,
            next_probe: now,
        }
    }

    /// When [`HubLiveness::tick`] is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_probe
    }

    /// The hubs taken as dead now.
    pub fn down(&self) -> BTreeSet<String> {
        self.hubs
            .iter()
            .filter(|h| !h.live)
            .map(|h| h.name.clone())
            .collect()
    }

    /// An answer arrived: the hub it names is live from `now` (an unknown or stale nonce
    /// changes nothing). Returns the new dead set when it changed.
    pub fn on_reply(&mut self, datagram: &[u8], now: Instant) -> Option<BTreeSet<String>> {
        let offset = parse_reply(datagram)?.wrapping_sub(self.base);
        let (round, index) = (offset >> 16, (offset & 0xffff) as usize);
        if round > self.round || self.round - round > ROUNDS_ACCEPTED {
            return None;
        }
        let hub = self.hubs.get_mut(index)?;
        hub.heard = now;
        if hub.live {
            return None;
        }
        hub.live = true;
        Some(self.down())
    }

    /// Sends the round's probes when due and takes hubs silent for [`DEAD_AFTER`] as dead.
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut out = Tick::default();
        let mut changed = false;
        for h in &mut self.hubs {
            if h.live && now.saturating_duration_since(h.heard) >= DEAD_AFTER {
                h.live = false;
                changed = true;
            }
        }
        if now >= self.next_probe {
            self.round += 1;
            for (i, h) in self.hubs.iter().enumerate() {
                let nonce = self
                    .base
                    .wrapping_add(self.round << 16)
                    .wrapping_add(i as u64);
                out.probes.push((h.name.clone(), request(nonce)));
            }
            self.next_probe = now + PROBE_INTERVAL;
        }
        if changed {
            out.down_changed = Some(self.down());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_wire_format_round_trips_and_nothing_else_parses() {
        let r = request(0x0102_0304_0506_0708);
        assert_eq!(&r[..8], b"PTRLPRB?");
        assert_eq!(&r[8..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let answer = reply_to(&r).unwrap();
        assert_eq!(&answer[..8], b"PTRLPRB!");
        assert_eq!(answer.len(), r.len(), "no amplification");
        assert_eq!(parse_reply(&answer), Some(0x0102_0304_0506_0708));
        // An answer is not a request, a request not an answer.
        assert_eq!(reply_to(&answer), None);
        assert_eq!(parse_reply(&r), None);
        // Wrong lengths, wrong tags, VXLAN.
        assert_eq!(reply_to(&r[..15]), None);
        let mut long = r.to_vec();
        long.push(0);
        assert_eq!(reply_to(&long), None);
        let mut bad = r;
        bad[0] = b'Q';
        assert_eq!(reply_to(&bad), None);
        let mut bad = r;
        bad[7] = b'.';
        assert_eq!(reply_to(&bad), None);
        assert_eq!(
            reply_to(&[0x08, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
        assert!(is_probe(&r) && is_probe(&answer));
        assert!(!is_probe(&[0x08, 0, 0, 0, 0, 0, 1, 0]));
        assert!(!is_probe(b"PTRLPR"));
    }

    fn answer(t: &Tick, hub: &str) -> [u8; PROBE_LEN] {
        let (_, probe) = t.probes.iter().find(|(h, _)| h == hub).unwrap();
        reply_to(probe).unwrap()
    }

    #[test]
    fn a_silent_hub_is_down_after_dead_after_and_an_answer_brings_it_back() {
        let t0 = Instant::now();
        let mut l = HubLiveness::new(["gw-1".to_string(), "gw-3".to_string()], 77, t0);
        assert_eq!(l.poll_timeout(), t0);
        let mut now = t0;
        let mut last = l.tick(now);
        assert_eq!(last.probes.len(), 2);
        assert_eq!(last.down_changed, None);
        assert_eq!(l.poll_timeout(), t0 + PROBE_INTERVAL);
        // gw-1 answers every probe, gw-3 none.
        let mut went_down = None;
        while now < t0 + Duration::from_secs(2) {
            assert_eq!(l.on_reply(&answer(&last, "gw-1"), now), None);
            now = l.poll_timeout();
            last = l.tick(now);
            if let Some(d) = last.down_changed.take() {
                went_down.get_or_insert((now, d));
            }
        }
        let (when, down) = went_down.unwrap();
        assert_eq!(down, BTreeSet::from(["gw-3".to_string()]));
        assert!(when - t0 >= DEAD_AFTER && when - t0 <= DEAD_AFTER + PROBE_INTERVAL);
        assert_eq!(l.down(), down);
        // Its answer to a recent probe brings it back at once.
        assert_eq!(
            l.on_reply(&answer(&last, "gw-3"), now),
            Some(BTreeSet::new())
        );
        assert!(l.down().is_empty());
        // Exactly at DEAD_AFTER after the last answer it is down again (gw-1 answered).
        assert_eq!(l.on_reply(&answer(&last, "gw-1"), now), None);
        let t = l.tick(now + DEAD_AFTER - MS);
        assert_eq!(t.down_changed, None);
        let t = l.tick(now + DEAD_AFTER);
        assert_eq!(t.down_changed.unwrap().len(), 2);
    }

    #[test]
    fn stale_forged_or_unknown_answers_change_nothing() {
        let t0 = Instant::now();
        let mut l = HubLiveness::new(["gw-1".to_string()], 1 << 40, t0);
        let first = l.tick(t0);
        let old = answer(&first, "gw-1");
        let t = l.tick(t0 + DEAD_AFTER);
        assert!(t.down_changed.is_some());
        // Another base (a blind guess), a future round, an unknown index: ignored.
        assert_eq!(l.on_reply(&tagged(REPLY_TAG, 5), t0 + DEAD_AFTER), None);
        let future = (1u64 << 40) + (50 << 16);
        assert_eq!(
            l.on_reply(&tagged(REPLY_TAG, future), t0 + DEAD_AFTER),
            None
        );
        let unknown_hub = (1u64 << 40) + (1 << 16) + 3;
        assert_eq!(
            l.on_reply(&tagged(REPLY_TAG, unknown_hub), t0 + DEAD_AFTER),
            None
        );
        assert_eq!(l.down().len(), 1);
        // Rounds go by; the first round's answer is then too old.
        let mut now = t0 + DEAD_AFTER;
        for _ in 0..ROUNDS_ACCEPTED {
            now += PROBE_INTERVAL;
            l.tick(now);
        }
        assert_eq!(l.on_reply(&old, now), None);
        assert_eq!(l.down().len(), 1);
        // The newest round's answer counts.
        let t = l.tick(now + PROBE_INTERVAL);
        assert_eq!(
            l.on_reply(&answer(&t, "gw-1"), now + PROBE_INTERVAL),
            Some(BTreeSet::new())
        );
        // A round exactly ROUNDS_ACCEPTED old still counts.
        let t0 = Instant::now();
        let mut l = HubLiveness::new(["gw-1".to_string()], 9, t0);
        let first = l.tick(t0);
        let mut now = t0;
        for _ in 0..ROUNDS_ACCEPTED {
            now += PROBE_INTERVAL;
            l.tick(now);
        }
        assert_eq!(l.down().len(), 1);
        assert_eq!(
            l.on_reply(&answer(&first, "gw-1"), now),
            Some(BTreeSet::new())
        );
    }
}
