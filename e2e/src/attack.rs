//! The attacks of issue 11 against a real hub on loopback, in one place for the hardening tests
//! (which assert bounds, `e2e/tests/hardening.rs` and `e2e/tests/hub_dataplane.rs`) and for
//! `petrel-bench`'s attack rows (which measure the same thing in a release build):
//!
//! * [`junk_enrolments`]: unauthenticated `petrel-enrol/1` connections that each park the
//!   largest request minus one byte, try a second stream and send datagrams, all held open while
//!   the hub's RSS is read;
//! * [`initial_flood`]: QUIC Initials of handshakes nobody finishes, from many silent source
//!   addresses ([`spoofing_forwarder`]), while real agents' handshakes are timed;
//! * [`relay_flood`]: valid VXLAN frames from a cloud VTEP into the hub's relay port as fast as
//!   the sender threads go, while two agents' tunnels ping the hub.
//!
//! Each returns what it measured and judges nothing: the bounds are the callers' business.
//! Every process is a [`Hub`] (killed on drop) and every socket is on 127.0.0.0/8.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use petrel_proto::{ControlMessage, MacAddr};
use serde::Serialize;

use crate::apiserver::{metric, rss_kib};
use crate::procs::{free_port, Hub};
use crate::raw_agent::{hub_ca, node_identity, session_as, RawSession};

/// A runtime for one attack: two workers, like the 2-core machines the bench runs on.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Percentiles of round trips or handshake times, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Millis {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Millis {
    pub fn of(d: &[Duration]) -> Millis {
        let mut v: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        Millis {
            n: v.len(),
            p50_ms: crate::measure::percentile_sorted(&v, 50.0),
            p99_ms: crate::measure::percentile_sorted(&v, 99.0),
            max_ms: v.last().copied().unwrap_or(0.0),
        }
    }
}

// ---- unauthenticated enrolment connections ---------------------------------------------------

/// What [`junk_enrolments`] saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JunkEnrolments {
    /// Connections opened (each from its own loopback address).
    pub connections: usize,
    /// Still open when the RSS was read (the hub holds them until its enrolment deadline).
    pub held_open: usize,
    /// The hub's RSS before the first and with all of them open, KiB.
    pub rss_before_kib: u64,
    pub rss_during_kib: u64,
    /// Growth divided by `connections`.
    pub kib_per_connection: f64,
    /// Connections on which the hub allowed a second stream (it allows one before
    /// authentication).
    pub second_stream_allowed: usize,
}

impl JunkEnrolments {
    pub fn grown_kib(&self) -> u64 {
        self.rss_during_kib.saturating_sub(self.rss_before_kib)
    }
}

/// The most an unauthenticated enrolment connection can make the hub hold: each of `n`
/// clients (from 127.0.6.1, .2, ...: the per-address enrolment limit is not what is measured)
/// completes the handshake for `petrel-enrol/1`, opens a stream, announces
/// the largest request the hub accepts and sends all of it but the last byte (so the hub must
/// keep it) and tries a second stream. The hub's RSS is read while all are open.
pub fn junk_enrolments(hub: &Hub, fingerprint: &str, n: u8) -> Result<JunkEnrolments> {
    let rt = runtime()?;
    let server: SocketAddr = hub.server().parse()?;
    let pid = hub.proc.pid();
    let before = settled_rss_kib(pid);
    rt.block_on(async {
        let mut conns = Vec::new();
        for i in 0..n {
            let tls =
                petrel_transport::tls::enrol_client_tls(fingerprint, petrel_proto::ALPN_ENROL)?;
            let cfg = petrel_transport::quic::client_config(
                tls,
                &petrel_transport::quic::TransportTuning::default(),
            )?;
            let bind = SocketAddr::from((Ipv4Addr::new(127, 0, 6, i.saturating_add(1)), 0));
            let ep = petrel_transport::quic::client_endpoint(bind)?;
            let conn = ep
                .connect_with(cfg, server, petrel_transport::HUB_SERVER_NAME)?
                .await
                .with_context(|| format!("enrolment handshake {i} from {bind}"))?;
            conns.push((ep, conn));
        }
        let second_streams = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for (_, conn) in &conns {
            let (conn, second_streams) = (conn.clone(), second_streams.clone());
            // No datagrams: the hub closes an enrolment connection at its first one
            // ([`datagram_on_enrolment`]), so a client that wants to be held sends none.
            writers.push(tokio::spawn(async move {
                let body = petrel_proto::enrol::MAX_ENROL_REQUEST_BODY;
                let mut held = vec![petrel_proto::enrol::msg_type::ENROL_REQUEST];
                held.extend_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_be_bytes());
                held.resize(held.len() + body - 1, 0x5a);
                if let Ok((mut send, _recv)) = conn.open_bi().await {
                    // Side by side: each further stream would get a window of its own, and the
                    // write may wait on the hub's small window.
                    let (_, more) = tokio::join!(
                        send.write_all(&held),
                        tokio::time::timeout(Duration::from_secs(1), conn.open_bi())
                    );
                    if matches!(more, Ok(Ok(_))) {
                        second_streams.fetch_add(1, Ordering::SeqCst);
                    }
                    std::future::pending::<()>().await;
                }
            }));
        }
        // Let the writers push what the hub lets them (and the second stream time out), then
        // measure with all still open.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let during = rss_kib(pid);
        let held_open = conns
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .count();
        for w in writers {
            w.abort();
        }
        for (ep, c) in conns {
            c.close(0u32.into(), b"done");
            ep.wait_idle().await;
        }
        let connections = usize::from(n);
        Ok(JunkEnrolments {
            connections,
            held_open,
            rss_before_kib: before,
            rss_during_kib: during,
            kib_per_connection: during.saturating_sub(before) as f64 / connections.max(1) as f64,
            second_stream_allowed: second_streams.load(Ordering::SeqCst),
        })
    })
}

/// One enrolment connection (from 127.0.7.1) that sends datagrams after its handshake: the
/// close reason the hub gives it, within 3 s (`None` if it stays open).
pub fn datagram_on_enrolment(hub: &Hub, fingerprint: &str) -> Result<Option<String>> {
    let rt = runtime()?;
    let server: SocketAddr = hub.server().parse()?;
    rt.block_on(async {
        let tls = petrel_transport::tls::enrol_client_tls(fingerprint, petrel_proto::ALPN_ENROL)?;
        let cfg = petrel_transport::quic::client_config(
            tls,
            &petrel_transport::quic::TransportTuning::default(),
        )?;
        let bind = SocketAddr::from((Ipv4Addr::new(127, 0, 7, 1), 0));
        let ep = petrel_transport::quic::client_endpoint(bind)?;
        let conn = ep
            .connect_with(cfg, server, petrel_transport::HUB_SERVER_NAME)?
            .await
            .context("enrolment handshake")?;
        // One every 100 ms until the hub answers: one that arrives before the hub's side of
        // the handshake is done may be lost, as datagrams may.
        let send = async {
            loop {
                conn.send_datagram(vec![0x01u8; 1000].into())
                    .context("the hub offers datagrams (for tunnels) at the handshake")?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            tokio::select! {
                e = conn.closed() => Ok(e),
                r = send => r,
            }
        })
        .await;
        let closed = match closed {
            Ok(Ok(e)) => Some(e),
            Ok(Err(e)) => return Err(e),
            Err(_) => None,
        };
        // A connection the hub left open (what the caller asserts against) is closed here: its
        // keepalives would otherwise keep `wait_idle` waiting, and the test would hang instead
        // of failing.
        conn.close(0u32.into(), b"probe done");
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        Ok(closed.map(|e| e.to_string()))
    })
}

/// The hub's RSS once it has stopped moving (two readings 250 ms apart within 16 KiB, at most
/// 5 s): what the warm-up left behind (an agent that just connected is still being sent its
/// routes and renewing) is not charged to the connections measured after it.
fn settled_rss_kib(pid: u32) -> u64 {
    let until = Instant::now() + Duration::from_secs(5);
    let mut last = rss_kib(pid);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_kib(pid);
        if now.abs_diff(last) <= 16 || Instant::now() >= until {
            return now;
        }
        last = now;
    }
}

// ---- spoofed Initials ------------------------------------------------------------------------

/// Sends every datagram that arrives on `front` to `hub`, each from the next of `sources`
/// (sockets on their own loopback addresses), and never forwards an answer back: to the hub,
/// every Initial comes from a different address that then stays silent, as spoofed ones do.
/// Returns how many datagrams it forwarded.
pub fn spoofing_forwarder(
    front: UdpSocket,
    sources: Vec<UdpSocket>,
    hub: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let _ = front.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 2048];
        let mut sent = 0u64;
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, _)) = front.recv_from(&mut buf) {
                let s = &sources[i % sources.len()];
                i += 1;
                if s.send_to(&buf[..n], hub).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    })
}

/// How hard [`initial_flood`] floods and how many real handshakes it times.
#[derive(Clone, Debug, Serialize)]
pub struct InitialFloodConfig {
    /// New abandoned handshakes per second (each one Initial, then the client's own
    /// retransmissions of it).
    pub rate_per_s: u32,
    /// The flood lasts at least this long, and until the last real handshake is done.
    pub min_secs: f64,
    /// Silent source addresses the Initials come from.
    pub sources: u32,
    /// Rounds of real handshakes, `per_round` at once (a site's agents coming back), 300 ms
    /// apart, starting 1 s into the flood.
    pub rounds: usize,
    pub per_round: usize,
}

/// What [`initial_flood`] saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InitialFlood {
    /// Abandoned handshakes started, and per second over the flood.
    pub initials: u64,
    pub achieved_rate_per_s: f64,
    /// Datagrams the forwarder sent to the hub (Initials and their retransmissions).
    pub datagrams_forwarded: u64,
    pub flood_secs: f64,
    /// Real handshakes tried and finished within the agent's 3 s.
    pub handshakes: usize,
    pub within_3s: usize,
    /// Handshake times of those that finished.
    pub handshake: Millis,
    /// Retry packets the hub sent (`petrel_hub_tunnel_handshakes_total{outcome="retry_sent"}`).
    pub retries_sent: f64,
}

impl InitialFlood {
    /// Share of real handshakes within 3 s, in percent.
    pub fn share_within_3s_pct(&self) -> f64 {
        if self.handshakes == 0 {
            return 0.0;
        }
        self.within_3s as f64 * 100.0 / self.handshakes as f64
    }
}

/// Floods `hub` with Initials of `petrel-enrol/1` handshakes that are never finished, each from
/// one of `cfg.sources` silent addresses (127.0.8.x, 127.0.9.x, ...), and times real agents'
/// handshakes (an edge-a1 node certificate from the hub's CA, from 127.0.0.1) meanwhile.
pub fn initial_flood(hub: &Hub, cfg: &InitialFloodConfig) -> Result<InitialFlood> {
    let server: SocketAddr = hub.server().parse()?;
    let ca = hub_ca(hub)?;
    let (cert, key) = node_identity(&ca, "edge-a1")?;
    let rt = runtime()?;
    let front = UdpSocket::bind("127.0.0.1:0")?;
    let front_addr = front.local_addr()?;
    let sources = (0..cfg.sources.max(1))
        .map(|i| {
            let a = Ipv4Addr::new(
                127,
                0,
                u8::try_from(8 + i / 200).unwrap_or(255),
                1 + (i % 200) as u8,
            );
            UdpSocket::bind((a, 0)).with_context(|| format!("binding {a}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    // Stops the forwarder on every way out, a panic included.
    let _stop_on_drop = crate::measure::StopFlag(stop.clone());
    let forwarder = spoofing_forwarder(front, sources, server, stop.clone());
    let result = rt.block_on(async {
        let flooder = petrel_transport::quic::client_endpoint("127.0.0.1:0".parse()?)?;
        // The flood's own transport parameters matter to nobody (the hub sees an Initial and
        // never hears from its source again), but an agent's would make quinn set up 16,384
        // stream slots per connection: ~3 ms and most of a MiB each, which held the flood to
        // ~300/s. One stream and small windows let one core make thousands a second.
        let flood_tuning = petrel_transport::quic::TransportTuning {
            stream_receive_window: 16 << 10,
            connection_receive_window: 16 << 10,
            send_window: 16 << 10,
            max_concurrent_bidi_streams: 1,
            max_concurrent_uni_streams: 0,
            datagram_buffer: 0,
            ..Default::default()
        };
        let enrol_cfg = petrel_transport::quic::client_config(
            petrel_transport::tls::enrol_client_tls(&ca.fingerprint(), petrel_proto::ALPN_ENROL)?,
            &flood_tuning,
        )?;
        let agents_done = Arc::new(AtomicBool::new(false));
        let flood_task = tokio::spawn({
            let (flooder, agents_done) = (flooder.clone(), agents_done.clone());
            let (rate, min_secs) = (cfg.rate_per_s, cfg.min_secs);
            async move {
                // Paced in 10 ms ticks; a late tick bursts to catch up, so the average holds
                // as long as the machine can make ClientHellos that fast.
                let per_tick = (f64::from(rate) / 100.0).max(0.0);
                let mut pending = Vec::new();
                let mut n = 0u64;
                let mut owed = 0.0f64;
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while start.elapsed().as_secs_f64() < min_secs
                    || !agents_done.load(Ordering::SeqCst)
                {
                    tick.tick().await;
                    owed += per_tick;
                    while owed >= 1.0 {
                        owed -= 1.0;
                        let c = flooder
                            .connect_with(
                                enrol_cfg.clone(),
                                front_addr,
                                petrel_transport::HUB_SERVER_NAME,
                            )
                            .map_err(|e| anyhow!("flood connect: {e}"))?;
                        pending.push(c);
                        n += 1;
                    }
                }
                let secs = start.elapsed().as_secs_f64();
                drop(pending);
                anyhow::Ok((n, secs))
            }
        });
        // Let the flood build up, then real agents connect, several at a time, like a site
        // coming back: each must finish its handshake within the agent's 3 s.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let agent_cfg = petrel_transport::quic::client_config(
            petrel_transport::tls::agent_client_tls(
                &ca.cert_der().to_vec().into(),
                vec![cert.clone().into()],
                key.private_key_der(),
                petrel_proto::ALPN_TUNNEL,
            )?,
            &petrel_transport::quic::TransportTuning::default(),
        )?;
        let mut times = Vec::new();
        let mut total = 0usize;
        for _round in 0..cfg.rounds {
            let mut tries = Vec::new();
            for _ in 0..cfg.per_round {
                let ep = petrel_transport::quic::client_endpoint("127.0.0.1:0".parse()?)?;
                let connecting =
                    ep.connect_with(agent_cfg.clone(), server, petrel_transport::HUB_SERVER_NAME)?;
                tries.push(tokio::spawn(async move {
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(Duration::from_secs(3), connecting).await;
                    let took = t0.elapsed();
                    let done = matches!(r, Ok(Ok(_)));
                    if let Ok(Ok(c)) = r {
                        c.close(0u32.into(), b"done");
                    }
                    drop(ep);
                    done.then_some(took)
                }));
            }
            for t in tries {
                total += 1;
                if let Some(took) = t.await? {
                    times.push(took);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        agents_done.store(true, Ordering::SeqCst);
        let (initials, flood_secs) = flood_task.await??;
        anyhow::Ok(InitialFlood {
            initials,
            achieved_rate_per_s: initials as f64 / flood_secs.max(1e-9),
            flood_secs,
            handshakes: total,
            within_3s: times.len(),
            handshake: Millis::of(&times),
            ..Default::default()
        })
    });
    stop.store(true, Ordering::Relaxed);
    let forwarded = forwarder
        .join()
        .map_err(|_| anyhow!("the forwarder thread panicked"))?;
    let mut out = result?;
    out.datagrams_forwarded = forwarded;
    out.retries_sent = metric(
        &hub.metrics()?,
        "petrel_hub_tunnel_handshakes_total{outcome=\"retry_sent\"}",
    );
    Ok(out)
}

// ---- the VXLAN relay -------------------------------------------------------------------------

/// VtepMACs of the default inventory's nodes (`gateway/src/default-inventory.toml`).
pub const MAC_CLOUD1: &str = "02:fa:00:00:00:01";
pub const MAC_GW1: &str = "02:fa:00:00:00:02";
pub const MAC_A1: &str = "02:fa:00:00:00:03";
pub const MAC_B1: &str = "02:fa:00:00:00:05";

/// A VXLAN payload (VNI 1) carrying an IPv4/UDP packet of `pad` payload bytes, DF set.
pub fn vxlan_frame(
    src_mac: &str,
    dst_mac: &str,
    src: &str,
    dst: &str,
    pad: usize,
) -> Result<Vec<u8>> {
    let mut f = petrel_proto::encode_vxlan_header(1).to_vec();
    f.extend_from_slice(
        &dst_mac
            .parse::<MacAddr>()
            .map_err(|e| anyhow!("{dst_mac}: {e}"))?
            .0,
    );
    f.extend_from_slice(
        &src_mac
            .parse::<MacAddr>()
            .map_err(|e| anyhow!("{src_mac}: {e}"))?
            .0,
    );
    f.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(28 + pad)?;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.parse::<Ipv4Addr>()?.octets());
    ip.extend_from_slice(&dst.parse::<Ipv4Addr>()?.octets());
    ip.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 8, 0, 0]);
    ip.resize(28 + pad, 0xab);
    f.extend_from_slice(&ip);
    Ok(f)
}

/// The default inventory with the cloud and Express Connect underlays on loopback
/// (cloud-1 127.0.0.11, gw-1 127.0.0.12, x1 127.0.0.16), so the hub's relay traffic stays local.
pub fn loopback_vtep_inventory() -> String {
    include_str!("../../gateway/src/default-inventory.toml")
        .replace("192.168.0.11", "127.0.0.11")
        .replace("192.168.0.12", "127.0.0.12")
        .replace("192.168.10.2", "127.0.0.16")
}

/// A hub on [`loopback_vtep_inventory`] with its relay on a free port, the hub node being gw-1.
/// Returns the hub, the relay's address and the flannel port it sends VTEPs' frames to.
pub fn relay_hub(dir: &Path) -> Result<(Hub, String, u16)> {
    let flannel_port = free_port();
    let relay_port = free_port();
    std::fs::create_dir_all(dir)?;
    let inv_path = dir.join("inventory.toml");
    std::fs::write(&inv_path, loopback_vtep_inventory())?;
    let inv = inv_path
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", inv_path.display()))?;
    let hub = Hub::start(
        &dir.join("hub"),
        &[
            "--inventory",
            inv,
            "--relay-listen",
            &format!("127.0.0.1:{relay_port}"),
            "--flannel-port",
            &flannel_port.to_string(),
            "--node-name",
            "gw-1",
        ],
    )?;
    hub.proc
        .wait_for_log("VXLAN relay listening", Duration::from_secs(5))?;
    Ok((hub, format!("127.0.0.1:{relay_port}"), flannel_port))
}

/// Round trips of control-stream pings on one tunnel.
#[derive(Clone, Debug, Default)]
pub struct Pings {
    /// Round trips of the answered pings.
    pub rtts: Vec<Duration>,
    /// Pings with no pong within 2 s (or a broken stream).
    pub lost: usize,
}

impl Pings {
    pub fn worst(&self) -> Duration {
        self.rtts.iter().copied().max().unwrap_or_default()
    }
}

/// Pings the hub on a raw session's control stream every `every` for `for_` (answering the
/// hub's own keepalive pings meanwhile).
pub async fn ping_hub(s: &mut RawSession, for_: Duration, every: Duration) -> Pings {
    let start = Instant::now();
    let mut out = Pings::default();
    let mut nonce = 0u64;
    while start.elapsed() < for_ {
        nonce += 1;
        let sent = Instant::now();
        let ping = ControlMessage::Ping(petrel_proto::Ping {
            nonce,
            sent_at_micros: 0,
        });
        if s.writer.send(&ping).await.is_err() {
            out.lost += 1;
            tokio::time::sleep(every).await;
            continue;
        }
        let answered = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match s.reader.next().await {
                    Ok(Some(ControlMessage::Pong(p))) if p.nonce == nonce => return true,
                    Ok(Some(ControlMessage::Ping(p))) => {
                        let _ = s.writer.send(&ControlMessage::Pong(p.pong())).await;
                    }
                    Ok(Some(_)) => {}
                    _ => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if answered {
            out.rtts.push(sent.elapsed());
        } else {
            out.lost += 1;
        }
        tokio::time::sleep(every).await;
    }
    out
}

/// How [`relay_flood`] floods.
#[derive(Clone, Debug, Serialize)]
pub struct RelayFloodConfig {
    /// Sender threads, each as fast as it goes.
    pub threads: usize,
    /// Pings before the flood (the idle baseline) and during it.
    pub idle_secs: f64,
    pub flood_secs: f64,
    pub ping_every_ms: u64,
}

/// One tunnel's round trips to the hub, idle and during the flood.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TunnelUnderFlood {
    pub node: String,
    /// Whether the flood's frames were addressed to this node.
    pub flood_target: bool,
    pub idle: Millis,
    pub idle_lost: usize,
    pub flood: Millis,
    pub flood_lost: usize,
    /// The tunnel was still open and listed by the hub after the flood.
    pub still_connected: bool,
}

/// What [`relay_flood`] saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayFlood {
    /// Frames the senders got into the relay socket, and per second.
    pub frames_sent: u64,
    pub frames_per_s: f64,
    /// `petrel_hub_frames_forwarded_total{reason="vtep_to_agent"}` after the flood.
    pub frames_forwarded: f64,
    pub tunnels: Vec<TunnelUnderFlood>,
}

impl RelayFlood {
    /// Tunnels that lost a ping during the flood or were gone after it.
    pub fn tunnels_dropped(&self) -> usize {
        self.tunnels
            .iter()
            .filter(|t| t.flood_lost > 0 || !t.still_connected)
            .count()
    }
}

/// A hub ([`relay_hub`]) with edge-a1's and edge-b1's tunnels (library clients): both ping the
/// hub for `idle_secs`, then cloud-1's VTEP (127.0.0.11) sends valid frames for edge-a1's pod
/// into the relay port from `threads` threads as fast as they go (more than the hub forwards,
/// for longer than an agent waits before declaring the hub dead when `flood_secs` > 5) while
/// both keep pinging. `dir` holds the hub's state.
pub fn relay_flood(dir: &Path, cfg: &RelayFloodConfig) -> Result<RelayFlood> {
    let (hub, relay, _) = relay_hub(dir)?;
    let ca = hub_ca(&hub)?;
    let rt = runtime()?;
    let (a1_cert, a1_key) = node_identity(&ca, "edge-a1")?;
    let (b1_cert, b1_key) = node_identity(&ca, "edge-b1")?;
    let server = hub.server();
    let (mut a1, mut b1) = rt.block_on(async {
        let a1 = session_as(&server, ca.cert_der(), &a1_cert, &a1_key, "edge-a1").await;
        let b1 = session_as(&server, ca.cert_der(), &b1_cert, &b1_key, "edge-b1").await;
        match (a1, b1) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (a, b) => Err(anyhow!(
                "tunnels: edge-a1 {:?}, edge-b1 {:?}",
                a.err(),
                b.err()
            )),
        }
    })?;
    let every = Duration::from_millis(cfg.ping_every_ms.max(1));
    let (a_idle, b_idle) = rt.block_on(async {
        let idle = Duration::from_secs_f64(cfg.idle_secs);
        tokio::join!(
            ping_hub(&mut a1, idle, every),
            ping_hub(&mut b1, idle, every)
        )
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Stops the senders on every way out, a panic included.
    let _stop_on_drop = crate::measure::StopFlag(stop.clone());
    let flood = vxlan_frame(MAC_CLOUD1, MAC_A1, "10.244.1.2", "10.244.3.2", 64)?;
    let started = Instant::now();
    let senders: Vec<_> = (0..cfg.threads.max(1))
        .map(|_| {
            let (stop, relay, f) = (stop.clone(), relay.clone(), flood.clone());
            std::thread::spawn(move || -> Result<u64> {
                let s = UdpSocket::bind(("127.0.0.11", 0))?;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if s.send_to(&f, &relay).is_ok() {
                        n += 1;
                    }
                }
                Ok(n)
            })
        })
        .collect();
    let (a_flood, b_flood) = rt.block_on(async {
        let d = Duration::from_secs_f64(cfg.flood_secs);
        tokio::join!(ping_hub(&mut a1, d, every), ping_hub(&mut b1, d, every))
    });
    stop.store(true, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let mut sent = 0u64;
    for t in senders {
        sent += t.join().map_err(|_| anyhow!("a flood thread panicked"))??;
    }
    let forwarded = metric(
        &hub.metrics()?,
        "petrel_hub_frames_forwarded_total{reason=\"vtep_to_agent\"}",
    );
    let tunnel = |node: &str, s: &RawSession, idle: Pings, flood: Pings| TunnelUnderFlood {
        node: node.into(),
        flood_target: node == "edge-a1",
        idle: Millis::of(&idle.rtts),
        idle_lost: idle.lost,
        flood: Millis::of(&flood.rtts),
        flood_lost: flood.lost,
        still_connected: s.conn.close_reason().is_none() && hub.agent(node).is_some(),
    };
    let out = RelayFlood {
        frames_sent: sent,
        frames_per_s: sent as f64 / secs.max(1e-9),
        frames_forwarded: forwarded,
        tunnels: vec![
            tunnel("edge-a1", &a1, a_idle, a_flood),
            tunnel("edge-b1", &b1, b_idle, b_flood),
        ],
    };
    if sent == 0 {
        bail!("the flood sent nothing to {relay}");
    }
    drop((a1, b1));
    Ok(out)
}
