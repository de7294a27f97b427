//! WAN impairment for the lab without netem (this kernel has none): **delay** by a userspace
//! link written here, **loss** by nftables `numgen random`.
//!
//! Delay: in the `wan` namespace, gw-1's bridge port `p-gw-1` is taken off the bridge and a
//! veth pair `dly0`/`dly1` is put in its place (`dly1` on the bridge). Two threads move every
//! frame between `p-gw-1` and `dly0` through AF_PACKET sockets, each holding it for the one-way
//! delay in a timed queue. So every packet between the hub's WAN address and the internet (the
//! edge sites) waits `rtt/2` each way. Offloads are turned off where frames enter the forwarder
//! (gw-1's `wan0` and `dly1` transmit): it must see wire-sized frames with real checksums.
//!
//! Loss: `numgen random mod 100 < N drop` in gw-1 on `wan0`, both directions (prerouting and
//! postrouting), so every WAN packet of the hub is dropped with probability N %.
//!
//! [`Impairment`] restores everything when dropped.

#![allow(unsafe_code)] // one call: building the `sockaddr_ll` AF_PACKET sockets bind to.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::addr::{SocketAddrLen, SocketAddrStorage};
use rustix::net::{
    bind, eth, recv, send, socket_with, AddressFamily, RecvFlags, SendFlags, SocketAddrAny,
    SocketFlags, SocketType,
};

use crate::lab::{spawn_in_netns, Lab, NetnsTask};

const LOSS_TABLE: &str = "petrel_bench_loss";

/// `struct sockaddr_ll` (linux/if_packet.h).
#[repr(C)]
struct SockaddrLl {
    family: u16,
    protocol_be: u16,
    ifindex: i32,
    hatype: u16,
    pkttype: u8,
    halen: u8,
    addr: [u8; 8],
}

/// An AF_PACKET socket bound to `ifindex`, receiving frames of ethertype `proto` (0: none, for a
/// send-only socket). Only *incoming* frames reach protocol-specific packet sockets, so the
/// forwarder never reads back what it sent.
fn packet_socket(ifindex: i32, proto: u16) -> Result<OwnedFd> {
    let protocol = match proto {
        0x0800 => Some(eth::IP),
        0x0806 => Some(eth::ARP),
        _ => None,
    };
    let fd = socket_with(
        AddressFamily::PACKET,
        SocketType::RAW,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        protocol,
    )
    .context("AF_PACKET socket")?;
    let ll = SockaddrLl {
        family: AddressFamily::PACKET.as_raw(),
        protocol_be: proto.to_be(),
        ifindex,
        hatype: 0,
        pkttype: 0,
        halen: 0,
        addr: [0; 8],
    };
    // SAFETY: `ll` is a complete, initialised `sockaddr_ll`; `read` copies `len` bytes of it.
    let addr = unsafe {
        SocketAddrAny::read(
            (&ll as *const SockaddrLl).cast::<SocketAddrStorage>(),
            std::mem::size_of::<SockaddrLl>() as SocketAddrLen,
        )
    };
    bind(&fd, &addr).with_context(|| format!("binding AF_PACKET to ifindex {ifindex}"))?;
    Ok(fd)
}

fn ifindex(lab: &Lab, ns: &str, dev: &str) -> Result<i32> {
    let out = lab.exec(ns, &["ip", "-o", "link", "show", "dev", dev])?;
    out.stdout
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .ok_or_else(|| anyhow!("no ifindex for {dev} in {ns}: {}", out.stdout))
}

/// Counters of the delay link.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub frames: AtomicU64,
    pub send_errors: AtomicU64,
}

/// One direction: frames from `rx` (IP and ARP sockets) go out of `tx` `delay` later.
fn pump(
    rx: [OwnedFd; 2],
    tx: OwnedFd,
    delay: Duration,
    stop: Arc<AtomicBool>,
    counters: Arc<LinkCounters>,
) {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while let Some((due, _)) = queue.front() {
            if *due > now {
                break;
            }
            if let Some((_, f)) = queue.pop_front() {
                if send(&tx, &f, SendFlags::empty()).is_err() {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                }
                counters.frames.fetch_add(1, Ordering::Relaxed);
            }
        }
        let wait = queue
            .front()
            .map(|(due, _)| due.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        let ts = Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(wait.subsec_nanos()).max(100_000),
        };
        let mut fds = [
            PollFd::new(&rx[0], PollFlags::IN),
            PollFd::new(&rx[1], PollFlags::IN),
        ];
        if poll(&mut fds, Some(&ts)).is_err() {
            continue;
        }
        for s in &rx {
            // Drain what is there.
            for _ in 0..256 {
                match recv(s.as_fd(), &mut buf[..], RecvFlags::DONTWAIT) {
                    Ok((n, _)) if n > 0 => {
                        queue.push_back((Instant::now() + delay, buf[..n].to_vec()));
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Delay and/or loss on gw-1's WAN link, undone on drop.
pub struct Impairment<'a> {
    lab: &'a Lab,
    stop: Arc<AtomicBool>,
    /// The two forwarder threads (joined on drop, before their devices are removed).
    pumps: Vec<NetnsTask<()>>,
    delayed: bool,
    lossy: bool,
    /// Frames forwarded by the delay link.
    pub counters: Arc<LinkCounters>,
    /// What was applied, for reports.
    pub description: String,
}

impl<'a> Impairment<'a> {
    /// Adds `rtt` of round-trip delay (half each way) and `loss_pct` % loss in each direction on
    /// the link between gw-1 and the WAN. Either may be zero.
    pub fn start(lab: &'a Lab, rtt: Duration, loss_pct: u32) -> Result<Impairment<'a>> {
        let gw = lab.gateway().name.clone();
        let wan = lab.wan_ns().to_string();
        let port = format!("p-{gw}");
        let mut me = Impairment {
            lab,
            stop: Arc::new(AtomicBool::new(false)),
            pumps: Vec::new(),
            delayed: false,
            lossy: false,
            counters: Arc::new(LinkCounters::default()),
            description: String::new(),
        };
        let mut what = Vec::new();
        if !rtt.is_zero() {
            me.delayed = true;
            // Wire-sized frames with real checksums out of gw-1 and out of the bridge.
            lab.exec(
                &gw,
                &[
                    "ethtool", "-K", "wan0", "tx", "off", "tso", "off", "gso", "off",
                ],
            )
            .context("ethtool (apt-get install ethtool)")?;
            lab.exec(&wan, &["ip", "link", "set", &port, "nomaster"])?;
            lab.exec(
                &wan,
                &[
                    "ip", "link", "add", "dly0", "mtu", "1500", "type", "veth", "peer", "name",
                    "dly1", "mtu", "1500",
                ],
            )?;
            lab.exec(
                &wan,
                &[
                    "ethtool", "-K", "dly1", "tx", "off", "tso", "off", "gso", "off",
                ],
            )?;
            lab.exec(
                &wan,
                &[
                    "ethtool", "-K", "dly0", "tx", "off", "tso", "off", "gso", "off",
                ],
            )?;
            lab.exec(&wan, &["ip", "link", "set", "dly1", "master", "br0", "up"])?;
            lab.exec(&wan, &["ip", "link", "set", "dly0", "up"])?;
            lab.exec(&wan, &["ip", "link", "set", &port, "promisc", "on"])?;
            let (a, b) = (ifindex(lab, &wan, &port)?, ifindex(lab, &wan, "dly0")?);
            let one_way = rtt / 2;
            for (from, to, name) in [(a, b, "gw->wan"), (b, a, "wan->gw")] {
                let (stop, counters) = (me.stop.clone(), me.counters.clone());
                let (tx_ready, rx_ready) = std::sync::mpsc::channel();
                let task = spawn_in_netns(&wan, &format!("delay link {name}"), move || {
                    let socks = (|| -> Result<_> {
                        Ok((
                            [packet_socket(from, 0x0800)?, packet_socket(from, 0x0806)?],
                            packet_socket(to, 0)?,
                        ))
                    })();
                    match socks {
                        Ok((rx, tx)) => {
                            let _ = tx_ready.send(Ok(()));
                            pump(rx, tx, one_way, stop, counters);
                            Ok(())
                        }
                        Err(e) => {
                            let _ = tx_ready.send(Err(format!("{e:#}")));
                            Err(e)
                        }
                    }
                })?;
                me.pumps.push(task);
                rx_ready
                    .recv_timeout(Duration::from_secs(5))
                    .map_err(|_| anyhow!("delay link {name} did not start"))?
                    .map_err(|e| anyhow!("delay link {name}: {e}"))?;
            }
            what.push(format!(
                "{} ms RTT by a userspace AF_PACKET delay link on gw-1's WAN port ({} ms each way)",
                rtt.as_millis(),
                one_way.as_millis()
            ));
        }
        if loss_pct > 0 {
            me.lossy = true;
            let rules = format!(
                "table ip {LOSS_TABLE} {{\n  chain pre {{ type filter hook prerouting priority -300; policy accept; \
                 iifname \"wan0\" numgen random mod 100 < {loss_pct} counter drop; }}\n  chain post {{ type filter hook \
                 postrouting priority 300; policy accept; oifname \"wan0\" numgen random mod 100 < {loss_pct} counter drop; }}\n}}\n"
            );
            crate::lab::cmd::run_checked(
                crate::lab::cmd::command("ip", &["netns", "exec", &lab.ns(&gw)?, "nft", "-f", "-"]),
                Some(&rules),
                Duration::from_secs(10),
            )?;
            what.push(format!(
                "{loss_pct}% loss each way by nftables `numgen random mod 100 < {loss_pct} drop` on gw-1 wan0"
            ));
        }
        me.description = what.join("; ");
        Ok(me)
    }
}

impl Drop for Impairment<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let gw = self.lab.gateway().name.clone();
        let wan = self.lab.wan_ns().to_string();
        if self.lossy {
            let _ = self
                .lab
                .exec(&gw, &["nft", "delete", "table", "ip", LOSS_TABLE]);
        }
        // The forwarders see `stop` within one poll (at most 50 ms).
        for t in self.pumps.drain(..) {
            let _ = t.wait(Duration::from_secs(2));
        }
        if self.delayed {
            let port = format!("p-{gw}");
            let _ = self.lab.exec(&wan, &["ip", "link", "del", "dly0"]);
            let _ = self
                .lab
                .exec(&wan, &["ip", "link", "set", &port, "promisc", "off"]);
            let _ = self
                .lab
                .exec(&wan, &["ip", "link", "set", &port, "master", "br0"]);
            let _ = self.lab.exec(
                &gw,
                &[
                    "ethtool", "-K", "wan0", "tx", "on", "tso", "on", "gso", "on",
                ],
            );
        }
    }
}
