//! Bidirectional UDP probes between two pods of the lab every 10 ms, recording when each side
//! heard the other: how long traffic stopped when a hub died, and whether it stopped at all for
//! the pods whose hub did not. Shared by the failover bench and the lab tests.

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::lab::{spawn_in_netns, Lab};

/// Bidirectional UDP probes between two pods every 10 ms; records when each side last heard.
pub struct Probe {
    stop: Arc<AtomicBool>,
    heard: Arc<Mutex<[Vec<Instant>; 2]>>,
    tasks: Vec<crate::lab::NetnsTask<()>>,
}

/// The port the bench's failover probe uses on both pods.
pub const PROBE_PORT: u16 = 7301;

impl Probe {
    /// Probes between the pods of nodes `a` and `b` on `port` (each pod binds it).
    pub fn start(lab: &Lab, a: &str, b: &str, port: u16) -> Result<Probe> {
        let stop = Arc::new(AtomicBool::new(false));
        let heard: Arc<Mutex<[Vec<Instant>; 2]>> = Arc::new(Mutex::new([Vec::new(), Vec::new()]));
        let ends = [
            (lab.endpoint_ns(a)?, lab.node(a).pod_ip, lab.node(b).pod_ip),
            (lab.endpoint_ns(b)?, lab.node(b).pod_ip, lab.node(a).pod_ip),
        ];
        // Built first: if the second end fails to start, dropping the probe stops the first.
        let mut probe = Probe {
            stop,
            heard,
            tasks: Vec::new(),
        };
        let Probe { stop, heard, tasks } = &mut probe;
        for (i, (ns, me, peer)) in ends.into_iter().enumerate() {
            let (stop, heard) = (stop.clone(), heard.clone());
            let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
            tasks.push(spawn_in_netns(&ns, "failover probe", move || {
                let s = match UdpSocket::bind(SocketAddrV4::new(me, port)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return Ok(());
                    }
                };
                s.set_read_timeout(Some(Duration::from_millis(10)))?;
                let _ = tx.send(Ok(()));
                let to = SocketAddrV4::new(peer, port);
                let mut b = [0u8; 64];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        let _ = s.send_to(b"probe", to);
                        next += Duration::from_millis(10);
                    }
                    if s.recv_from(&mut b).is_ok() {
                        if let Ok(mut h) = heard.lock() {
                            h[i].push(Instant::now());
                        }
                    }
                }
                Ok(())
            })?);
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| anyhow!("probe did not start"))?
                .map_err(|e| anyhow!("probe: {e}"))?;
        }
        Ok(probe)
    }

    /// The first instant at or after `t` by which both sides have heard the other.
    pub fn both_heard_after(&self, t: Instant) -> Option<Instant> {
        let h = self.heard.lock().ok()?;
        let a = h[0].iter().find(|x| **x > t)?;
        let b = h[1].iter().find(|x| **x > t)?;
        Some(*a.max(b))
    }
    /// The longest time either side went without hearing the other between `from` and `to`
    /// (`None` if a side heard nothing at all in that window).
    pub fn longest_silence(&self, from: Instant, to: Instant) -> Option<Duration> {
        let h = self.heard.lock().ok()?;
        let mut worst = Duration::ZERO;
        for side in h.iter() {
            let mut last = from;
            let mut any = false;
            for t in side.iter().filter(|t| **t > from && **t <= to) {
                worst = worst.max(t.duration_since(last));
                last = *t;
                any = true;
            }
            if !any {
                return None;
            }
            worst = worst.max(to.saturating_duration_since(last));
        }
        Some(worst)
    }
}

/// After an event, how long probes keep being recorded before the longest silence is read
/// ([`Probe::silence_after`]): a measurement window, not synchronisation. A silence still under
/// way when it closes counts up to its end, so a stop that never recovers shows as >= this.
pub const SILENCE_WINDOW: Duration = Duration::from_millis(500);

/// Probes that have not heard for this long are not flowing ([`flowing`]).
const FLOWING_WITHIN: Duration = Duration::from_millis(50);

/// A probe still in flight at an event is not evidence of recovery: recovery counts from two
/// probe intervals after it.
const IN_FLIGHT: Duration = Duration::from_millis(20);

impl Probe {
    /// Waits (at most `within`) until both sides heard each other after `t` (ignoring probes
    /// in flight at `t`); returns how long that took from `t`.
    pub fn back_after(&self, t: Instant, within: Duration) -> Result<Duration> {
        let mut back = None;
        crate::lab::wait_until("probes heard both ways again", within, || {
            back = self.both_heard_after(t + IN_FLIGHT);
            Ok(back.is_some())
        })?;
        back.map(|at| at.duration_since(t))
            .ok_or_else(|| anyhow!("probes not heard both ways again"))
    }

    /// The longest silence from `from` to the end of a [`SILENCE_WINDOW`] starting now (`None`
    /// if a side heard nothing at all: the traffic stopped and never came back).
    pub fn silence_after(&self, from: Instant) -> Option<Duration> {
        std::thread::sleep(SILENCE_WINDOW);
        self.longest_silence(from, Instant::now())
    }
}

/// Waits (at most `within`) until every probe of `probes` is heard both ways.
pub fn flowing(probes: &[&Probe], within: Duration) -> Result<()> {
    crate::lab::wait_until("probes flowing", within, || {
        let since = Instant::now() - FLOWING_WITHIN;
        Ok(probes.iter().all(|p| p.both_heard_after(since).is_some()))
    })
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Their sockets must be closed before the next sample binds the same port.
        for t in self.tasks.drain(..) {
            let _ = t.wait(Duration::from_secs(2));
        }
    }
}
