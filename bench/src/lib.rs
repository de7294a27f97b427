//! `petrel-bench`: Petrel beside kernel VXLAN and userspace WireGuard (boringtun) in one run, in
//! the network-namespace lab, plus the egress proxy's streams, a WAN with delay and loss, hub
//! scale with simulated agents, failover after `kill -9` of the hub, and the hub under the
//! attacks of issue 11 (unauthenticated connections, spoofed Initials, a relay flood).
//!
//! Every section is measured independently: a failure becomes an `error` in its row (and in the
//! table), never a missing row, so the JSON always has the same shape ([`Report::row_ids`]).
//!
//! The benchmarks measure; they are not tests of end-to-end behaviour. They build on the
//! end-to-end harness (`petrel-e2e`) for everything they share with its tests: the lab and
//! Petrel in it, hubs and agents on loopback, the attacks of issue 11
//! (`petrel_e2e::attack`), the WAN impairment (`petrel_e2e::wan`) and the egress stream
//! targets and CONNECT client (`petrel_e2e::egress_streams`). Nothing in `petrel-e2e` depends on
//! this crate, though the lab's stream targets are served by this crate's `petrel-loadgen
//! targets` (a separate process per pod, see [`streams`]).
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | this file | [`BenchConfig`] (`full`, `smoke`), the [`Report`] and its rows, the human table ([`render`]), the run ([`run`]): the packet paths (iperf3, request/response, CPU per Gbit), WAN, failover and attack sections |
//! | [`streams`] | the egress proxy's stream figures: CONNECT setup, single-stream throughput, concurrent streams with memory per stream, head-of-line isolation, the direct TCP baseline of the WAN rows |
//! | [`scale`] | hub scale: one hub on loopback, `petrel-loadgen` with N simulated agents; connect, memory and CPU at idle, reconnect after `kill -9` |
//! | [`loadgen`] | the simulated agents `petrel-loadgen` runs (real QUIC connections and node certificates, one UDP socket per site of 100) |
//! | [`wg`] | the WireGuard anchor: boringtun hub-and-spoke through gw-1, configured with `wg` |
//! | [`util`] | process and machine CPU and memory from /proc, summary statistics, iperf3 runs, the request/response probe, `raise_nofile`, `have` |
//! | `src/bin/petrel-bench.rs` | the command line of `make bench`: table on stdout, JSON to `target/petrel-bench.json` |
//! | `src/bin/petrel-loadgen.rs` | the load generator's command line, and `petrel-loadgen targets` (the stream targets in a pod) |

pub mod loadgen;
pub mod scale;
pub mod streams;
pub mod util;
pub mod wg;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use serde::Serialize;

use petrel_e2e::failover_probe::{Probe, PROBE_PORT};
use petrel_e2e::lab::{Lab, LabSpec};
use petrel_e2e::lab_petrel::PetrelLab;
use petrel_e2e::measure::StopFlag;
use petrel_e2e::{attack, egress_streams, wan};
use util::{IperfRun, Latency, Stat};

/// What to measure and for how long.
#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    /// Seconds per iperf3 run.
    pub secs: u32,
    /// iperf3 repetitions per figure.
    pub reps: u32,
    /// Request/response round trips per path.
    pub rr_n: usize,
    /// CONNECT setups measured.
    pub setup_n: usize,
    /// Seconds per stream throughput figure.
    pub stream_secs: f64,
    /// Concurrent-stream counts.
    pub concurrent: Vec<usize>,
    /// Simulated-agent counts.
    pub scale: Vec<usize>,
    /// Seconds the hub idles with all agents connected (CPU at idle).
    pub scale_idle_secs: u64,
    /// WAN emulation: RTT, loss and seconds per figure.
    pub wan_rtt_ms: u64,
    pub wan_loss_pct: u32,
    pub wan_secs: f64,
    /// Hub kill/restart samples.
    pub failover_samples: usize,
    /// Petrel's kernel hooks.
    pub hooks: String,
    /// boringtun's --threads.
    pub boringtun_threads: u32,
    /// QUIC congestion controller for hub and agents (`--congestion`); `None`: Petrel's default.
    pub congestion: Option<String>,
    /// Unauthenticated enrolment connections held at once (the hub admits 32 at a time).
    pub unauth_connections: u8,
    /// Spoofed Initials and the real handshakes timed during them.
    pub initial_flood: attack::InitialFloodConfig,
    /// The relay flood beside two tunnels.
    pub relay_flood: attack::RelayFloodConfig,
    /// Sections to skip: `paths`, `boringtun`, `streams`, `wan`, `failover`, `scale`, `attack`.
    pub skip: Vec<String>,
}

impl BenchConfig {
    /// The full run `make bench` does.
    pub fn full() -> Self {
        BenchConfig {
            secs: 5,
            reps: 3,
            rr_n: 2000,
            setup_n: 200,
            stream_secs: 4.0,
            concurrent: vec![1000, 10_000],
            scale: vec![1000, 10_000],
            scale_idle_secs: 10,
            wan_rtt_ms: 100,
            wan_loss_pct: 1,
            wan_secs: 10.0,
            failover_samples: 3,
            hooks: "fast".into(),
            boringtun_threads: 4,
            congestion: None,
            // The hub's cap on enrolments at once: every one is held, none refused.
            unauth_connections: 32,
            // The rate, 100 real handshakes in rounds of 10.
            initial_flood: attack::InitialFloodConfig {
                rate_per_s: 2000,
                min_secs: 8.0,
                sources: 256,
                rounds: 10,
                per_round: 10,
            },
            // Longer than an agent's 5 s before it declares the hub dead; 10 pings a second.
            relay_flood: attack::RelayFloodConfig {
                threads: 2,
                idle_secs: 3.0,
                flood_secs: 8.0,
                ping_every_ms: 100,
            },
            skip: Vec::new(),
        }
    }

    /// Seconds instead of minutes: every code path, tiny numbers (CI's smoke run).
    pub fn smoke() -> Self {
        BenchConfig {
            secs: 1,
            reps: 1,
            rr_n: 50,
            setup_n: 10,
            stream_secs: 0.5,
            // 10,000: every stream of a burst on one agent fits the open-file limit (a
            // descriptor budget once cut it to 9,156 under a 20,000 limit).
            concurrent: vec![50, 10_000],
            scale: vec![10, 20],
            scale_idle_secs: 1,
            wan_rtt_ms: 100,
            wan_loss_pct: 1,
            wan_secs: 1.5,
            failover_samples: 1,
            hooks: "fast".into(),
            boringtun_threads: 2,
            congestion: None,
            unauth_connections: 4,
            initial_flood: attack::InitialFloodConfig {
                rate_per_s: 200,
                min_secs: 1.5,
                sources: 16,
                rounds: 2,
                per_round: 3,
            },
            relay_flood: attack::RelayFloodConfig {
                threads: 1,
                idle_secs: 0.5,
                flood_secs: 1.5,
                ping_every_ms: 100,
            },
            skip: Vec::new(),
        }
    }

    fn runs(&self, section: &str) -> bool {
        !self.skip.iter().any(|s| s == section)
    }
}

/// The machine the numbers come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub build_profile: String,
    pub iperf3: String,
    pub boringtun: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mem_kib = util::meminfo_kib("MemTotal:").unwrap_or(0) as f64;
    let version = |p: &str, a: &str| {
        std::process::Command::new(p)
            .arg(a)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "not installed".into())
    };
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        memory_gib: (mem_kib / 1048576.0 * 10.0).round() / 10.0,
        build_profile: if cfg!(debug_assertions) {
            "debug".into()
        } else {
            "release".into()
        },
        iperf3: version("iperf3", "--version"),
        boringtun: version("boringtun-cli", "--version"),
    }
}

/// One packet path.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PathRow {
    pub id: String,
    pub label: String,
    pub from: String,
    pub to: String,
    /// iperf3, one TCP flow, Gbit/s.
    pub single_gbit: Option<Stat>,
    /// iperf3, four TCP flows, Gbit/s.
    pub multi_gbit: Option<Stat>,
    pub retransmits_single: Option<Stat>,
    pub retransmits_multi: Option<Stat>,
    /// 64-byte TCP request/response.
    pub rr: Option<Latency>,
    /// CPU seconds of the tunnel processes per Gbit carried (single-flow runs).
    pub tunnel_cpu_s_per_gbit: Option<f64>,
    /// Busy CPU seconds of the whole machine per Gbit (single-flow runs; includes iperf3).
    pub machine_cpu_s_per_gbit: Option<f64>,
    /// Which processes `tunnel_cpu_s_per_gbit` counts.
    pub tunnel_processes: String,
    pub single_vs_kernel: Option<f64>,
    pub single_vs_boringtun: Option<f64>,
    pub cpu_per_gbit_vs_boringtun: Option<f64>,
    pub error: Option<String>,
}

/// The egress proxy's streams.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamsReport {
    pub setup: Option<streams::Setup>,
    pub single_stream: Option<streams::SingleStream>,
    pub concurrent: Vec<streams::Concurrent>,
    pub head_of_line: Option<streams::HeadOfLine>,
    pub errors: Vec<String>,
}

/// 100 ms RTT, 1 % loss on the WAN.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WanReport {
    pub impairment: String,
    /// RTT edge node -> hub WAN address seen by ping.
    pub ping_rtt_ms: Option<f64>,
    /// The kernel's TCP congestion control in the lab (what the direct TCP baseline uses).
    pub kernel_tcp_congestion: String,
    /// Direct TCP edge node -> gw-1's WAN address over the same links, Mbit/s at gw-1.
    pub direct_tcp_mbit: Option<f64>,
    /// One entry per QUIC congestion controller Petrel was run with (hub and agents).
    pub variants: Vec<WanVariant>,
    pub error: Option<String>,
}

/// Petrel over the impaired WAN with one congestion controller.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WanVariant {
    pub congestion: String,
    /// Proxied stream target (edge pod) -> agent -> hub -> client, Mbit/s at the client.
    pub stream_mbit: Option<f64>,
    pub stream_vs_direct: Option<f64>,
    /// Pod TCP through the packet path (edge pod -> cloud pod), one flow, Mbit/s.
    pub packet_path_mbit: Option<f64>,
    pub packet_path_retransmits: Option<u64>,
    pub error: Option<String>,
}

/// Failover: `kill -9` of the hub, restarted at once (no Kubernetes standby yet).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverReport {
    pub method: String,
    /// Kill to traffic flowing again in both directions, seconds.
    pub samples_s: Vec<f64>,
    pub median_s: Option<f64>,
    pub error: Option<String>,
}

/// Direct site-to-site paths (issue 15): edge-a1 <-> edge-b1, both behind port-preserving NAT.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DirectReport {
    pub method: String,
    /// ICMP RTT edge-a1 pod -> edge-b1 pod (mean of 50 pings 20 ms apart), through the hub
    /// (agents with direct paths off) and direct.
    pub icmp_rtt_via_hub_ms: Option<f64>,
    pub icmp_rtt_direct_ms: Option<f64>,
    /// Direct / via the hub (< 1: direct is faster).
    pub rtt_direct_vs_hub: Option<f64>,
    /// From the first ping after the agents started to both agents showing the path direct.
    pub direct_after_s: Option<f64>,
    /// UDP dropped between the two sites in site A's NAT: how long 10 ms probes both ways went
    /// unheard before the traffic flowed through the hub (goal < 1 s), one per sample.
    pub break_gap_ms: Vec<f64>,
    pub break_gap_median_ms: Option<f64>,
    /// After the block is lifted, until both agents show the path direct again.
    pub back_direct_after_s: Vec<f64>,
    pub error: Option<String>,
}

/// Goal for the direct path's break gap (issue 15).
pub const GOAL_DIRECT_BREAK_MS: f64 = 1000.0;

/// Active-active hubs (issue 14, file mode): the lab with a second gateway, each hub owning one
/// public site (site-a: gw-1, site-b: gw-3).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ActiveActiveReport {
    pub method: String,
    /// kill -9 of site-b's hub -> site-b's probes flowing both ways again, seconds.
    pub gap_samples_s: Vec<f64>,
    pub gap_median_s: Option<f64>,
    /// During each kill, the longest time site-a's probes (their hub survived) went unheard, ms.
    pub survivor_silence_ms: Vec<f64>,
    /// A graceful stop of site-b's hub: the longest time site-b's probes went unheard, ms.
    pub graceful_silence_ms: Option<f64>,
    /// edge-a1 -> cloud-1 and edge-b1 -> x1 at once (one flow each), summed, Gbit/s: every site
    /// on one hub (the other stopped), and each hub carrying its own, each pinned to a core.
    pub one_hub_gbit: Option<f64>,
    pub two_hubs_gbit: Option<f64>,
    pub two_vs_one: Option<f64>,
    /// The same with every hub process held to [`HUB_CPU_CAP_PCT`] of its core (cgroup CPU
    /// quota), so that the hubs, not the agents, iperf3 and the kernel sharing the machine, are
    /// the bottleneck: what adding a hub adds when hubs are what runs out.
    pub hub_cpu_cap_pct: u32,
    pub one_hub_capped_gbit: Option<f64>,
    pub two_hubs_capped_gbit: Option<f64>,
    pub two_vs_one_capped: Option<f64>,
    pub error: Option<String>,
}

/// The CPU quota of each hub in the hub-bound active-active rows, percent of one core.
pub const HUB_CPU_CAP_PCT: u32 = 25;

/// Issue 14's goals.
pub const GOAL_AA_GAP_S: f64 = 1.0;
pub const GOAL_AA_TWO_VS_ONE: f64 = 1.7;

/// The issue 11 goals the attack rows are compared with.
pub const GOAL_UNAUTH_KIB: f64 = 64.0;
pub const GOAL_HANDSHAKES_WITHIN_3S_PCT: f64 = 95.0;

/// The hub under attack (a hub of this build on loopback, one per attack).
#[derive(Clone, Debug, Default, Serialize)]
pub struct AttackReport {
    /// RSS per unauthenticated enrolment connection.
    pub unauthenticated: Option<attack::JunkEnrolments>,
    /// `kib_per_connection` / the 64 KiB goal (<= 1 meets it).
    pub unauthenticated_vs_goal: Option<f64>,
    /// Real handshakes during a flood of spoofed Initials.
    pub initial_flood: Option<attack::InitialFlood>,
    /// Share within 3 s / the 95 % goal (>= 1 meets it).
    pub initial_flood_vs_goal: Option<f64>,
    /// Tunnels' round trips during a relay flood, against the same tunnels idle.
    pub relay_flood: Option<attack::RelayFlood>,
    pub errors: Vec<String>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub config: BenchConfig,
    pub started_unix: u64,
    pub duration_s: f64,
    /// /proc/loadavg before and after: other work on the machine makes every figure noisier.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub paths: Vec<PathRow>,
    pub streams: StreamsReport,
    pub wan: WanReport,
    pub scale: Vec<scale::ScaleRow>,
    pub failover: FailoverReport,
    pub active_active: ActiveActiveReport,
    pub direct: DirectReport,
    pub attack: AttackReport,
}

/// Ids of the packet-path rows, in table order.
pub const PATH_IDS: [&str; 7] = [
    "kernel-vxlan",
    "petrel-site-to-cloud",
    "petrel-site-to-site",
    "petrel-tcp-fallback",
    "petrel-site-to-site-direct",
    "boringtun",
    "boringtun-site-to-site",
];

impl Report {
    /// Every row id the report carries (for the smoke test).
    pub fn row_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.paths.iter().map(|p| p.id.clone()).collect();
        v.extend(
            self.streams
                .concurrent
                .iter()
                .map(|c| format!("streams-{}", c.streams)),
        );
        v.extend(self.scale.iter().map(|s| format!("scale-{}", s.agents)));
        let a = &self.attack;
        for (id, present) in [
            ("attack-unauthenticated", a.unauthenticated.is_some()),
            ("attack-initial-flood", a.initial_flood.is_some()),
            ("attack-relay-flood", a.relay_flood.is_some()),
        ] {
            if present {
                v.push(id.into());
            }
        }
        v
    }
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn stat(s: &Option<Stat>, digits: usize) -> String {
    s.as_ref().map_or_else(
        || "-".into(),
        |s| {
            if s.samples.len() > 1 {
                format!("{:.d$} ({:.d$}-{:.d$})", s.median, s.min, s.max, d = digits)
            } else {
                format!("{:.digits$}", s.median)
            }
        },
    )
}

/// The human table (the same numbers as the JSON).
pub fn render(r: &Report) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "petrel-bench: {} vCPU ({}), kernel {}, {:.0} GiB, {} build, {}, {}; {:.0} s",
        m.cpus,
        m.cpu_model,
        m.kernel,
        m.memory_gib,
        m.build_profile,
        m.iperf3,
        m.boringtun,
        r.duration_s
    );
    let _ = writeln!(
        s,
        "load average at start {} / at end {}",
        r.loadavg_start, r.loadavg_end
    );
    let _ = writeln!(
        s,
        "\nPacket path (iperf3 TCP, {} s x {} reps: median (min-max); RR = 64-byte TCP request/response; Petrel: {} hook, QUIC congestion control {})",
        r.config.secs,
        r.config.reps,
        r.config.hooks,
        r.config.congestion.as_deref().unwrap_or("default")
    );
    let header = [
        "path",
        "1 flow Gbit/s",
        "4 flows Gbit/s",
        "retr 1/4",
        "RR p50/p99 us",
        "tunnel CPU s/Gbit",
        "machine CPU s/Gbit",
        "x kernel",
        "x boringtun",
        "CPU/Gbit x bt",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for p in &r.paths {
        if let Some(e) = &p.error {
            if p.single_gbit.is_none() {
                rows.push(vec![p.id.clone(), format!("ERROR: {e}")]);
                continue;
            }
        }
        rows.push(vec![
            p.id.clone(),
            stat(&p.single_gbit, 2),
            stat(&p.multi_gbit, 2),
            format!(
                "{}/{}",
                p.retransmits_single
                    .as_ref()
                    .map_or("-".into(), |s| format!("{:.0}", s.median)),
                p.retransmits_multi
                    .as_ref()
                    .map_or("-".into(), |s| format!("{:.0}", s.median))
            ),
            p.rr.as_ref()
                .map_or("-".into(), |l| format!("{:.0}/{:.0}", l.p50_us, l.p99_us)),
            f(p.tunnel_cpu_s_per_gbit, 2),
            f(p.machine_cpu_s_per_gbit, 2),
            f(p.single_vs_kernel, 3),
            f(p.single_vs_boringtun, 2),
            f(p.cpu_per_gbit_vs_boringtun, 2),
        ]);
    }
    s.push_str(&columns(&rows));
    for p in &r.paths {
        let _ = writeln!(
            s,
            "  {}: {} ({} -> {}); tunnel CPU = {}",
            p.id, p.label, p.from, p.to, p.tunnel_processes
        );
    }

    let st = &r.streams;
    let _ = writeln!(
        s,
        "\nStreams (CONNECT over the hub's Unix socket -> QUIC stream -> agent -> edge pod)"
    );
    if let Some(x) = &st.setup {
        let _ = writeln!(
            s,
            "  setup to first byte: CONNECT p50 {:.0} us p99 {:.0} us; direct TCP from {} p50 {:.0} us p99 {:.0} us (n={})",
            x.connect_via_proxy.p50_us,
            x.connect_via_proxy.p99_us,
            x.direct_from,
            x.direct_tcp.p50_us,
            x.direct_tcp.p99_us,
            x.connect_via_proxy.n
        );
    }
    if let Some(x) = &st.single_stream {
        let _ = writeln!(
            s,
            "  one stream: to target {:.0} Mbit/s, from target {:.0} Mbit/s",
            x.to_target_mbit, x.from_target_mbit
        );
    }
    for c in &st.concurrent {
        let _ = writeln!(
            s,
            "  {} concurrent streams on one agent: {} established, {} echoed ({:.1}%), opened in {:.1} s; agent +{} KiB ({:.1} KiB/stream), hub +{} KiB ({:.1} KiB/stream){}",
            c.streams,
            c.established,
            c.echoed,
            c.success_rate * 100.0,
            c.open_all_s,
            c.agent_rss_delta_kib,
            c.agent_kib_per_stream,
            c.hub_rss_delta_kib,
            c.hub_kib_per_stream,
            c.first_error
                .as_ref()
                .map_or(String::new(), |e| format!("; first error: {e}"))
        );
    }
    if let Some(h) = &st.head_of_line {
        let _ = writeln!(
            s,
            "  head-of-line: bulk alone {:.0} Mbit/s, beside a stalled reader {:.0} Mbit/s ({:.2}x)",
            h.bulk_alone_mbit, h.bulk_with_stalled_mbit, h.ratio
        );
    }
    for e in &st.errors {
        let _ = writeln!(s, "  ERROR: {e}");
    }

    let w = &r.wan;
    let _ = writeln!(s, "\nWAN emulation: {}", w.impairment);
    let _ = writeln!(
        s,
        "  ping RTT edge -> hub {} ms; direct TCP edge -> hub (kernel, {}) {} Mbit/s",
        f(w.ping_rtt_ms, 1),
        if w.kernel_tcp_congestion.is_empty() {
            "-"
        } else {
            &w.kernel_tcp_congestion
        },
        f(w.direct_tcp_mbit, 1),
    );
    for v in &w.variants {
        let _ = writeln!(
            s,
            "  Petrel with QUIC {:<7}: proxied stream {} Mbit/s ({}x direct TCP); pod TCP through the packet path {} Mbit/s ({} retransmits){}",
            v.congestion,
            f(v.stream_mbit, 1),
            f(v.stream_vs_direct, 2),
            f(v.packet_path_mbit, 1),
            v.packet_path_retransmits.map_or("-".into(), |r| r.to_string()),
            v.error.as_deref().map_or(String::new(), |e| format!("; ERROR: {e}"))
        );
    }
    if let Some(e) = &w.error {
        let _ = writeln!(s, "  ERROR: {e}");
    }

    let _ = writeln!(
        s,
        "\nScale (petrel-loadgen: simulated agents with real certificates, one UDP socket per site of 100, one hub on loopback)"
    );
    let mut rows: Vec<Vec<String>> = vec![[
        "agents",
        "connect all s",
        "hub RSS MiB",
        "routes synced s",
        "KiB/agent: +2 s",
        "idle",
        "hub CPU idle %",
        "reconnect all s",
        "welcome B",
        "routes B/agent: first",
        "1-node change",
        "reconnect",
        "error",
    ]
    .iter()
    .map(|h| h.to_string())
    .collect()];
    for x in &r.scale {
        rows.push(vec![
            x.agents.to_string(),
            f(x.connect_all_s, 1),
            f(x.hub_rss_kib.map(|k| k as f64 / 1024.0), 1),
            f(x.routes_synced_s, 1),
            f(x.kib_per_agent_after_sync, 1),
            f(x.kib_per_agent, 1),
            f(x.hub_cpu_idle_pct, 1),
            f(x.reconnect_all_s, 1),
            x.welcome_bytes
                .map_or_else(|| "-".into(), |b| b.to_string()),
            f(x.snapshot_bytes_per_agent, 0),
            f(x.change_bytes_per_agent, 0),
            f(x.reconnect_bytes_per_agent, 0),
            x.error.clone().unwrap_or_default(),
        ]);
    }
    s.push_str(&columns(&rows));

    let fo = &r.failover;
    let _ = writeln!(s, "\nFailover: {}", fo.method);
    let _ = writeln!(
        s,
        "  kill -9 -> traffic both ways: median {} s, samples {:?}{}",
        f(fo.median_s, 2),
        fo.samples_s
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        fo.error
            .as_ref()
            .map_or(String::new(), |e| format!("; ERROR: {e}"))
    );
    if r.config.runs("paths") {
        let d = &r.direct;
        let _ = writeln!(s, "\nDirect site-to-site paths: {}", d.method);
        let _ = writeln!(
            s,
            "  ICMP RTT via the hub {} ms, direct {} ms, x {}; direct {} s after the first packet",
            f(d.icmp_rtt_via_hub_ms, 3),
            f(d.icmp_rtt_direct_ms, 3),
            f(d.rtt_direct_vs_hub, 2),
            f(d.direct_after_s, 2),
        );
        let _ = writeln!(
            s,
            "  path broken in a NAT -> traffic through the hub: median {} ms (goal < {GOAL_DIRECT_BREAK_MS:.0} ms), samples {:?}; direct again {:?} s after the block is lifted{}",
            f(d.break_gap_median_ms, 0),
            d.break_gap_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
            d.back_direct_after_s.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
            d.error.as_ref().map_or(String::new(), |e| format!("; ERROR: {e}"))
        );
    }
    let aa = &r.active_active;
    if r.config.runs("active-active") {
        let _ = writeln!(s, "\nActive-active hubs: {}", aa.method);
        let _ = writeln!(
            s,
            "  kill -9 of site-b's hub -> site-b both ways: median {} s (goal < {GOAL_AA_GAP_S} s), samples {:?}; site-a (its hub survived), longest silence meanwhile: {:?} ms",
            f(aa.gap_median_s, 2),
            aa.gap_samples_s.iter().map(|v| (v * 100.0).round() / 100.0).collect::<Vec<_>>(),
            aa.survivor_silence_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
        );
        let _ = writeln!(
            s,
            "  graceful stop of site-b's hub: site-b's longest silence {} ms (probes every 10 ms)",
            f(aa.graceful_silence_ms, 0)
        );
        let _ = writeln!(
            s,
            "  two sites -> cloud at once: one hub {} Gbit/s, two hubs {} Gbit/s, x {} (goal >= {GOAL_AA_TWO_VS_ONE}){}",
            f(aa.one_hub_gbit, 2),
            f(aa.two_hubs_gbit, 2),
            f(aa.two_vs_one, 2),
            aa.error.as_ref().map_or(String::new(), |e| format!("; ERROR: {e}"))
        );
        let _ = writeln!(
            s,
            "  the same, each hub held to {}% of its core (hub-bound): one hub {} Gbit/s, two hubs {} Gbit/s, x {} (goal >= {GOAL_AA_TWO_VS_ONE})",
            aa.hub_cpu_cap_pct,
            f(aa.one_hub_capped_gbit, 2),
            f(aa.two_hubs_capped_gbit, 2),
            f(aa.two_vs_one_capped, 2),
        );
    }

    if r.config.runs("attack") {
        render_attack(&mut s, &r.attack);
    }
    s
}

/// The attack rows: each figure beside its goal from issue 11, as a ratio.
fn render_attack(s: &mut String, a: &AttackReport) {
    let _ = writeln!(
        s,
        "\nAttacks (issue 11; a fresh hub of this build on loopback per attack; x goal: <= 1 meets a <= goal, >= 1 a >= goal)"
    );
    let mut rows: Vec<Vec<String>> = vec![["attack", "figure", "goal", "x goal"]
        .iter()
        .map(|h| h.to_string())
        .collect()];
    if let Some(j) = &a.unauthenticated {
        rows.push(vec![
            format!(
                "{} unauthenticated enrolment connections held ({} open at the reading)",
                j.connections, j.held_open
            ),
            format!("{:.1} KiB hub RSS per connection", j.kib_per_connection),
            format!("<= {GOAL_UNAUTH_KIB:.0} KiB"),
            f(a.unauthenticated_vs_goal, 2),
        ]);
    }
    if let Some(x) = &a.initial_flood {
        rows.push(vec![
            format!(
                "spoofed Initials at {:.0}/s for {:.1} s, from silent addresses",
                x.achieved_rate_per_s, x.flood_secs
            ),
            format!(
                "{:.1}% of {} real handshakes within 3 s",
                x.share_within_3s_pct(),
                x.handshakes
            ),
            format!(">= {GOAL_HANDSHAKES_WITHIN_3S_PCT:.0}%"),
            f(a.initial_flood_vs_goal, 2),
        ]);
    }
    s.push_str(&columns(&rows));
    if let Some(j) = &a.unauthenticated {
        let _ = writeln!(
            s,
            "  unauthenticated: each from its own address: handshake for petrel-enrol/1, the largest request minus one byte, a second stream tried ({} allowed) (a datagram would end the connection: tested in e2e hardening); hub RSS {} -> {} KiB",
            j.second_stream_allowed, j.rss_before_kib, j.rss_during_kib
        );
    }
    if let Some(x) = &a.initial_flood {
        let _ = writeln!(
            s,
            "  spoofed Initials: {} abandoned handshakes, {} datagrams to the hub (with the clients' retransmissions), {:.0} Retry packets sent; real handshakes p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            x.initials,
            x.datagrams_forwarded,
            x.retries_sent,
            x.handshake.p50_ms,
            x.handshake.p99_ms,
            x.handshake.max_ms
        );
    }
    if let Some(rf) = &a.relay_flood {
        let _ = writeln!(
            s,
            "  relay flood: valid frames from cloud-1's VTEP to edge-a1's pod as fast as the senders go: {} sent ({:.0}/s), {:.0} forwarded; tunnels dropped: {}",
            rf.frames_sent,
            rf.frames_per_s,
            rf.frames_forwarded,
            rf.tunnels_dropped()
        );
        let mut rows: Vec<Vec<String>> = vec![[
            "tunnel",
            "idle RTT p50/p99/max ms",
            "flood RTT p50/p99/max ms",
            "p99 x idle",
            "pings lost idle/flood",
            "up after",
        ]
        .iter()
        .map(|h| h.to_string())
        .collect()];
        let ms = |m: &attack::Millis| format!("{:.2}/{:.2}/{:.2}", m.p50_ms, m.p99_ms, m.max_ms);
        for t in &rf.tunnels {
            rows.push(vec![
                format!(
                    "{}{}",
                    t.node,
                    if t.flood_target {
                        " (flood's target)"
                    } else {
                        ""
                    }
                ),
                ms(&t.idle),
                ms(&t.flood),
                f(
                    (t.idle.p99_ms > 0.0).then(|| t.flood.p99_ms / t.idle.p99_ms),
                    1,
                ),
                format!("{}/{}", t.idle_lost, t.flood_lost),
                if t.still_connected { "yes" } else { "NO" }.to_string(),
            ]);
        }
        s.push_str(&columns(&rows));
    }
    for e in &a.errors {
        let _ = writeln!(s, "  ERROR: {e}");
    }
}

fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter(|r| r.len() == n)
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if r.len() == n {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    c.clone()
                }
            })
            .collect();
        let _ = writeln!(s, "  {}", line.join("  ").trim_end());
    }
    s
}

// ---- packet paths ------------------------------------------------------------------------------

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7001;

fn measure_path(
    lab: &Lab,
    cfg: &BenchConfig,
    row: &mut PathRow,
    to_ip: Ipv4Addr,
    pids: &[u32],
) -> Result<()> {
    let mut single: Vec<IperfRun> = Vec::new();
    let mut multi: Vec<IperfRun> = Vec::new();
    // This row's own server, killed when the row ends (or fails): nothing a previous row's
    // runs left behind can answer "busy" here.
    let mut server = util::IperfServer::start(lab, &row.to, IPERF_PORT)?;
    // Warm-up (PMTU discovery, ARP, tunnel handshakes).
    let _ = server.run(lab, &row.from, to_ip, 1, 1, pids);
    for _ in 0..cfg.reps {
        single.push(server.run(lab, &row.from, to_ip, 1, cfg.secs, pids)?);
        multi.push(server.run(lab, &row.from, to_ip, 4, cfg.secs, pids)?);
    }
    drop(server);
    let gbit = |v: &[IperfRun]| Stat::of(v.iter().map(|r| r.gbit_per_s).collect());
    let retr = |v: &[IperfRun]| Stat::of(v.iter().map(|r| r.retransmits as f64).collect());
    row.single_gbit = Some(gbit(&single));
    row.multi_gbit = Some(gbit(&multi));
    row.retransmits_single = Some(retr(&single));
    row.retransmits_multi = Some(retr(&multi));
    let carried: f64 = single.iter().map(|r| r.gbit).sum();
    if carried > 0.0 {
        if !pids.is_empty() {
            row.tunnel_cpu_s_per_gbit =
                Some(single.iter().map(|r| r.tunnel_cpu_s).sum::<f64>() / carried);
        }
        row.machine_cpu_s_per_gbit =
            Some(single.iter().map(|r| r.machine_cpu_s).sum::<f64>() / carried);
    }
    let ns = lab.endpoint_ns(&row.from)?;
    row.rr = Some(util::rr_client(
        &ns,
        SocketAddr::V4(SocketAddrV4::new(to_ip, RR_PORT)),
        cfg.rr_n,
    )?);
    Ok(())
}

/// `--congestion CC` for hub and agents when the run asks for one (else Petrel's default).
fn congestion_args(cfg: &BenchConfig) -> Vec<&str> {
    match &cfg.congestion {
        Some(cc) => vec!["--congestion", cc],
        None => Vec::new(),
    }
}

/// The tunnel processes whose CPU the Petrel rows count: the hub and every agent.
fn petrel_pids(petrel: &PetrelLab<'_>) -> Vec<u32> {
    let mut pids = vec![petrel.hub.pid()];
    pids.extend(petrel.agents.iter().map(|(_, g)| g.pid()));
    pids
}

fn path_row(id: &str, label: &str, from: &str, to: &str, procs: &str) -> PathRow {
    PathRow {
        id: id.into(),
        label: label.into(),
        from: from.into(),
        to: to.into(),
        tunnel_processes: procs.into(),
        ..Default::default()
    }
}

/// Request/response echo servers in the pods of `nodes`, for the whole run: they serve each
/// connection on a thread of its own, so no row can find one busy. iperf3 servers, which run
/// one test at a time, are per row ([`util::IperfServer`]).
struct PodServers {
    _rr: Vec<StopFlag>,
}

fn pod_servers(lab: &Lab, nodes: &[&str]) -> Result<PodServers> {
    let mut rr = Vec::new();
    for n in nodes {
        rr.push(util::rr_server(&lab.endpoint_ns(n)?, RR_PORT)?);
    }
    Ok(PodServers { _rr: rr })
}

fn run_row(lab: &Lab, cfg: &BenchConfig, mut row: PathRow, pids: &[u32]) -> PathRow {
    eprintln!("petrel-bench: measuring {} ...", row.id);
    let to_ip = lab.node(&row.to).pod_ip;
    if let Err(e) = measure_path(lab, cfg, &mut row, to_ip, pids) {
        row.error = Some(format!("{e:#}"));
    }
    row
}

fn add_ratios(paths: &mut [PathRow]) {
    let single = |id: &str| {
        paths
            .iter()
            .find(|p| p.id == id)
            .and_then(|p| p.single_gbit.as_ref().map(|s| s.median))
    };
    let cpu = |id: &str| {
        paths
            .iter()
            .find(|p| p.id == id)
            .and_then(|p| p.tunnel_cpu_s_per_gbit)
    };
    let k = single("kernel-vxlan");
    // Site-to-site rows (two tunnel hops through the hub, or the direct path between the same
    // two pods) compare with boringtun's two hops through the same gateway (WireGuard's
    // hub-and-spoke, what operators run today); every other row with boringtun's one hop to the
    // cloud.
    let anchor = |id: &str| {
        let a = if id.contains("site-to-site") {
            "boringtun-site-to-site"
        } else {
            "boringtun"
        };
        (single(a), cpu(a))
    };
    let anchors: Vec<_> = paths.iter().map(|p| anchor(&p.id)).collect();
    for (p, (b, bc)) in paths.iter_mut().zip(anchors) {
        let mine = p.single_gbit.as_ref().map(|s| s.median);
        p.single_vs_kernel = mine.zip(k).map(|(a, b)| a / b);
        p.single_vs_boringtun = mine.zip(b).map(|(a, b)| a / b);
        p.cpu_per_gbit_vs_boringtun = p.tunnel_cpu_s_per_gbit.zip(bc).map(|(a, b)| a / b);
    }
}

// ---- direct paths ------------------------------------------------------------------------------

/// Mean ICMP RTT from `from`'s pod to `to`'s: 50 pings 20 ms apart.
fn icmp_rtt_ms(lab: &Lab, from: &str, to: &str) -> Result<f64> {
    let r = lab.ping_with(
        from,
        lab.node(to).pod_ip,
        &petrel_e2e::lab::PingOpts {
            count: 50,
            interval: Duration::from_millis(20),
            ..Default::default()
        },
    )?;
    r.rtt_avg_ms
        .ok_or_else(|| anyhow!("no ICMP reply {from} -> {to}: {}", r.output))
}

/// The direct path's RTT, and its breaks: UDP between the two NATs dropped in site A's router
/// under 10 ms probes both ways; the gap until the probes flow through the hub, then the time
/// until the path is direct again once the block is lifted.
fn measure_direct(cfg: &BenchConfig, petrel: &PetrelLab<'_>, r: &mut DirectReport) -> Result<()> {
    use petrel_e2e::failover_probe::{flowing, Probe};
    let lab = petrel.lab;
    r.icmp_rtt_direct_ms = Some(icmp_rtt_ms(lab, "edge-a1", "edge-b1")?);
    r.rtt_direct_vs_hub = r
        .icmp_rtt_direct_ms
        .zip(r.icmp_rtt_via_hub_ms)
        .map(|(d, h)| d / h);
    let b_wan = lab.router("site-b")?.wan_ip;
    for _ in 0..cfg.failover_samples.max(1) {
        let probe = Probe::start(lab, "edge-a1", "edge-b1", 7321)?;
        flowing(&[&probe], Duration::from_secs(10))?;
        let t0 = Instant::now();
        lab.block_udp_in_nat("site-a", b_wan, true)?;
        let back = probe.back_after(t0, Duration::from_secs(10));
        let gap = probe.longest_silence(t0, Instant::now());
        drop(probe);
        lab.block_udp_in_nat("site-a", b_wan, false)?;
        back?;
        r.break_gap_ms.push(
            gap.ok_or_else(|| anyhow!("no probe heard after the break"))?
                .as_secs_f64()
                * 1000.0,
        );
        r.back_direct_after_s.push(
            petrel
                .wait_direct("edge-a1", "edge-b1", Duration::from_secs(60))?
                .as_secs_f64(),
        );
    }
    let mut g = r.break_gap_ms.clone();
    g.sort_by(f64::total_cmp);
    r.break_gap_median_ms = g.get(g.len() / 2).copied();
    Ok(())
}

// ---- failover ---------------------------------------------------------------------------------

/// Kills the hub with SIGKILL and starts it again at once with the same command; returns the
/// seconds until traffic flows both ways between a cloud pod and an edge pod.
pub fn failover_once(petrel: &mut PetrelLab<'_>, cloud: &str, edge: &str) -> Result<f64> {
    let lab = petrel.lab;
    let probe = Probe::start(lab, cloud, edge, PROBE_PORT)?;
    petrel_e2e::lab::wait_until(
        "probes flowing before the kill",
        Duration::from_secs(5),
        || {
            Ok(probe
                .both_heard_after(Instant::now() - Duration::from_millis(50))
                .is_some())
        },
    )?;
    let t0 = Instant::now();
    petrel.kill_hub_and_respawn()?;
    let mut flowing = None;
    petrel_e2e::lab::wait_until(
        "traffic both ways after the hub restart",
        Duration::from_secs(60),
        || {
            flowing = probe.both_heard_after(t0 + Duration::from_millis(20));
            Ok(flowing.is_some())
        },
    )
    .with_context(|| format!("hub log:\n{}", petrel.hub.log_tail(20)))?;
    let at = flowing.ok_or_else(|| anyhow!("no traffic"))?;
    // Let every agent come back before the next sample.
    let names: Vec<String> = petrel.agents.iter().map(|(n, _)| n.clone()).collect();
    petrel_e2e::lab::wait_until("all agents back", Duration::from_secs(30), || {
        Ok(petrel
            .hub_status()
            .ok()
            .and_then(|s| s["agents"].as_array().map(|a| a.len()))
            == Some(names.len()))
    })?;
    Ok(at.duration_since(t0).as_secs_f64())
}

// ---- active-active hubs ------------------------------------------------------------------------

fn active_active_section(cfg: &BenchConfig, work: &Path) -> ActiveActiveReport {
    let mut r = ActiveActiveReport {
        method: "file mode, gw-1 and gw-3 with the same --hubs list, node roles --active-active; site-a owned by gw-1, site-b by gw-3; UDP probes every 10 ms both ways (cloud-1 <-> edge-b1, x1 <-> edge-a1); iperf3 one flow per site, each hub process pinned to its own core with taskset; the hub-bound rows also hold each hub to a CPU quota (cgroup)".into(),
        ..Default::default()
    };
    eprintln!("petrel-bench: active-active hubs ...");
    if let Err(e) = measure_active_active(cfg, work, &mut r) {
        r.error = Some(format!("{e:#}"));
    }
    r
}

/// A CPU quota on one process (all its threads, present and future): a cgroup v2 child with
/// `cpu.max`, or a cgroup v1 `cpu` child with `cpu.cfs_quota_us`. Removed on drop (the process
/// goes back to the root group first).
/// The quota period: short, so a capped hub is slowed evenly rather than stopped for most of
/// every 100 ms (which TCP above it would read as loss).
const CAP_PERIOD_US: u32 = 10_000;

struct CpuCap {
    dir: PathBuf,
    root_procs: PathBuf,
    pid: u32,
}

impl CpuCap {
    fn new(pid: u32, percent: u32) -> Result<Self> {
        let name = format!("petrel-bench-{pid}");
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let (root, quota_file, quota) = if v2.exists()
            && std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
        {
            (
                PathBuf::from("/sys/fs/cgroup"),
                "cpu.max",
                format!("{} {CAP_PERIOD_US}", percent * CAP_PERIOD_US / 100),
            )
        } else {
            (
                PathBuf::from("/sys/fs/cgroup/cpu"),
                "cpu.cfs_quota_us",
                (percent * CAP_PERIOD_US / 100).to_string(),
            )
        };
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let me = Self {
            root_procs: root.join("cgroup.procs"),
            dir,
            pid,
        };
        if quota_file == "cpu.cfs_quota_us" {
            std::fs::write(me.dir.join("cpu.cfs_period_us"), CAP_PERIOD_US.to_string())
                .with_context(|| format!("setting cpu.cfs_period_us in {}", me.dir.display()))?;
        }
        std::fs::write(me.dir.join(quota_file), quota)
            .with_context(|| format!("setting {quota_file} in {}", me.dir.display()))?;
        std::fs::write(me.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", me.dir.display()))?;
        Ok(me)
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.root_procs, self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn pin(pid: u32, core: u32) -> Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .output()?;
    if !out.status.success() {
        anyhow::bail!("taskset {pid}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn measure_active_active(cfg: &BenchConfig, work: &Path, r: &mut ActiveActiveReport) -> Result<()> {
    use petrel_e2e::failover_probe::{flowing, Probe};
    std::fs::create_dir_all(work)?;
    let lab = Lab::build(LabSpec {
        second_hub: true,
        ..Default::default()
    })?;
    let (petrel, mut hub3) = PetrelLab::start_active_active(&lab, &cfg.hooks, work, &[])?;
    let ip = |n: &str| lab.node(n).pod_ip;
    let mut to_cloud = util::IperfServer::start(&lab, "cloud-1", 5311)?;
    let mut to_x = util::IperfServer::start(&lab, "x1", 5312)?;
    let mut both_sites = |lab: &Lab| -> Result<f64> {
        std::thread::scope(|sc| {
            let a = sc.spawn(|| to_cloud.run(lab, "edge-a1", ip("cloud-1"), 1, cfg.secs, &[]));
            let b = sc.spawn(|| to_x.run(lab, "edge-b1", ip("x1"), 1, cfg.secs, &[]));
            let a = a.join().map_err(|_| anyhow!("iperf thread panicked"))??;
            let b = b.join().map_err(|_| anyhow!("iperf thread panicked"))??;
            Ok(a.gbit_per_s + b.gbit_per_s)
        })
    };
    // Two hubs, each carrying its own site.
    pin(petrel.hub.pid(), 0)?;
    pin(hub3.proc.pid(), 1)?;
    lab.wait_reachable("cloud-1", ip("edge-b1"), Duration::from_secs(20))?;
    r.two_hubs_gbit = Some(both_sites(&lab)?);
    r.hub_cpu_cap_pct = HUB_CPU_CAP_PCT;
    {
        let _caps = (
            CpuCap::new(petrel.hub.pid(), HUB_CPU_CAP_PCT)?,
            CpuCap::new(hub3.proc.pid(), HUB_CPU_CAP_PCT)?,
        );
        r.two_hubs_capped_gbit = Some(both_sites(&lab)?);
    }
    // kill -9 of gw-3 (site-b's owner), as many times as the single hub's failover row.
    for _ in 0..cfg.failover_samples.max(1) {
        let b_probe = Probe::start(&lab, "cloud-1", "edge-b1", 7302)?;
        let a_probe = Probe::start(&lab, "x1", "edge-a1", 7303)?;
        flowing(&[&b_probe, &a_probe], Duration::from_secs(10))?;
        let t0 = Instant::now();
        hub3.proc.kill()?;
        let gap = b_probe.back_after(t0, Duration::from_secs(30))?;
        r.gap_samples_s.push(gap.as_secs_f64());
        if let Some(sil) = a_probe.silence_after(t0) {
            r.survivor_silence_ms.push(sil.as_secs_f64() * 1000.0);
        }
        drop((a_probe, b_probe));
        hub3.respawn(&lab)?;
        petrel.wait_both_hubs(&hub3)?;
        pin(hub3.proc.pid(), 1)?;
        // Node roles take it back at their next answered probe.
        petrel_e2e::lab::wait_until("node roles take gw-3 back", Duration::from_secs(10), || {
            Ok(petrel.hubs_down("cloud-1")? == serde_json::json!([])
                && petrel.hubs_down("x1")? == serde_json::json!([]))
        })?;
    }
    let mut g = r.gap_samples_s.clone();
    g.sort_by(f64::total_cmp);
    r.gap_median_s = g.get(g.len() / 2).copied();
    // A graceful stop of gw-3: site-b moves before it goes.
    let b_probe = Probe::start(&lab, "cloud-1", "edge-b1", 7302)?;
    flowing(&[&b_probe], Duration::from_secs(10))?;
    let t0 = Instant::now();
    hub3.proc.terminate(Duration::from_secs(20))?;
    r.graceful_silence_ms = b_probe.silence_after(t0).map(|d| d.as_secs_f64() * 1000.0);
    drop(b_probe);
    // One hub carrying both sites (gw-3 stopped; its sites went to gw-1).
    r.one_hub_gbit = Some(both_sites(&lab)?);
    r.two_vs_one = r
        .two_hubs_gbit
        .zip(r.one_hub_gbit)
        .map(|(two, one)| two / one);
    {
        let _cap = CpuCap::new(petrel.hub.pid(), HUB_CPU_CAP_PCT)?;
        r.one_hub_capped_gbit = Some(both_sites(&lab)?);
    }
    r.two_vs_one_capped = r
        .two_hubs_capped_gbit
        .zip(r.one_hub_capped_gbit)
        .map(|(two, one)| two / one);
    petrel.stop()?;
    Ok(())
}

// ---- attacks ---------------------------------------------------------------------------------

/// The attacks of issue 11, each against a fresh hub of this build on loopback, outside the lab:
/// what is measured is the hub's own cost, and no attack leaves state behind for the next.
fn attack_section(cfg: &BenchConfig, work: &Path) -> AttackReport {
    let mut a = AttackReport::default();
    eprintln!("petrel-bench: unauthenticated enrolment connections ...");
    match unauthenticated(cfg, &work.join("unauthenticated")) {
        Ok(j) => {
            a.unauthenticated_vs_goal = Some(j.kib_per_connection / GOAL_UNAUTH_KIB);
            a.unauthenticated = Some(j);
        }
        Err(e) => a.errors.push(format!("unauthenticated connections: {e:#}")),
    }
    eprintln!(
        "petrel-bench: spoofed Initials at {}/s ...",
        cfg.initial_flood.rate_per_s
    );
    let flood = work.join("initial-flood");
    match petrel_e2e::apiserver::start_hub(
        &flood,
        &petrel_e2e::apiserver::loopback_inventory(&[]),
        &[],
    )
    .and_then(|hub| attack::initial_flood(&hub, &cfg.initial_flood))
    {
        Ok(x) => {
            a.initial_flood_vs_goal = Some(x.share_within_3s_pct() / GOAL_HANDSHAKES_WITHIN_3S_PCT);
            a.initial_flood = Some(x);
        }
        Err(e) => a.errors.push(format!("spoofed Initials: {e:#}")),
    }
    eprintln!("petrel-bench: relay flood ...");
    match attack::relay_flood(&work.join("relay-flood"), &cfg.relay_flood) {
        Ok(x) => a.relay_flood = Some(x),
        Err(e) => a.errors.push(format!("relay flood: {e:#}")),
    }
    a
}

fn unauthenticated(cfg: &BenchConfig, dir: &Path) -> Result<attack::JunkEnrolments> {
    let hub = petrel_e2e::apiserver::start_hub(
        dir,
        &petrel_e2e::apiserver::loopback_inventory(&[]),
        &[],
    )?;
    let (_, fingerprint) = hub.token("edge-a1", &[])?;
    // One real enrolment and tunnel first, as in the hardening test: the hub's allocator and
    // first-use growth are not charged to the attackers.
    let _agent = petrel_e2e::apiserver::start_agent(&hub, "edge-a2", dir)?;
    attack::junk_enrolments(&hub, &fingerprint, cfg.unauth_connections)
}

// ---- the run ----------------------------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs everything `cfg` asks for; `work` holds state directories and the egress socket.
pub fn run(cfg: &BenchConfig, work: &Path) -> Result<Report> {
    petrel_e2e::lab::require_root()?;
    Lab::cleanup_stale()?;
    let started = Instant::now();
    // 10,000 streams: client and target sockets here, streams in the agent and the hub (which
    // inherit this limit).
    util::raise_nofile(262_144)?;
    let uds = work.join("egress.sock");
    let mut report = Report {
        machine: machine(),
        config: cfg.clone(),
        started_unix: now_unix(),
        duration_s: 0.0,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        paths: Vec::new(),
        streams: StreamsReport::default(),
        wan: WanReport::default(),
        scale: Vec::new(),
        failover: FailoverReport {
            method: "kill -9 of the single hub, restarted at once with the same state; UDP probes every 10 ms both ways between the pods of cloud-1 and edge-a1 (the Kubernetes standby hub is measured by e2e/tests/k8s_election.rs)".into(),
            ..Default::default()
        },
        active_active: ActiveActiveReport::default(),
        direct: DirectReport {
            method: "edge-a1 <-> edge-b1 (sites A and B, each behind port-preserving masquerade), the paths lab; the break drops UDP between the two NATs in site A's router while both still reach the hub".into(),
            ..Default::default()
        },
        attack: AttackReport::default(),
    };
    // The lab is built only for the sections that run in it.
    let in_lab = ["paths", "streams", "wan", "failover"];
    let labs_result = if in_lab.iter().any(|s| cfg.runs(s)) {
        run_lab_sections(cfg, work, &uds, &mut report)
    } else {
        Ok(())
    };
    if let Err(e) = labs_result {
        // Rows not measured carry the error.
        let msg = format!("{e:#}");
        for id in PATH_IDS {
            if !report.paths.iter().any(|p| p.id == id) {
                report.paths.push(PathRow {
                    id: id.into(),
                    error: Some(msg.clone()),
                    ..Default::default()
                });
            }
        }
        report.streams.errors.push(msg.clone());
        report.wan.error.get_or_insert(msg.clone());
        report.failover.error.get_or_insert(msg.clone());
        if cfg.runs("paths") {
            report.direct.error.get_or_insert(msg);
        }
    }
    if cfg.runs("active-active") {
        report.active_active = active_active_section(cfg, &work.join("active-active"));
    }
    if cfg.runs("attack") {
        report.attack = attack_section(cfg, &work.join("attack"));
    }
    if cfg.runs("scale") {
        for &n in &cfg.scale {
            eprintln!("petrel-bench: scale with {n} simulated agents ...");
            report.scale.push(scale::run(
                n,
                cfg.scale_idle_secs,
                &work.join(format!("scale-{n}")),
            ));
        }
    }
    report.duration_s = started.elapsed().as_secs_f64();
    report.loadavg_end = loadavg();
    Ok(report)
}

fn run_lab_sections(cfg: &BenchConfig, work: &Path, uds: &Path, report: &mut Report) -> Result<()> {
    let lab = Lab::build(LabSpec::default())?;
    let _servers = pod_servers(&lab, &["x1", "cloud-1", "edge-b1"])?;

    // (1) the ceiling: plain Flannel VXLAN between two directly connected nodes.
    if cfg.runs("paths") {
        report.paths.push(run_row(
            &lab,
            cfg,
            path_row(
                "kernel-vxlan",
                "pod to pod over kernel VXLAN (Flannel), no Petrel on the path",
                "cloud-1",
                "x1",
                "none (kernel softirq; see machine CPU)",
            ),
            &[],
        ));
    }

    let petrel_dir = work.join("petrel");
    std::fs::create_dir_all(&petrel_dir)?;
    let uds_arg = uds
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", uds.display()))?;
    let mut petrel =
        PetrelLab::start_with(&lab, &cfg.hooks, &petrel_dir, &["--egress-uds", uds_arg])?;
    let cc_args = congestion_args(cfg);
    // The rows "through the hub" are that: agents with direct paths off (the direct row and
    // the direct section below turn them on).
    let mut hub_relay_args = cc_args.clone();
    hub_relay_args.extend(["--direct-paths", "false"]);
    if cfg.runs("paths") {
        petrel.restart_with(&cc_args, &hub_relay_args)?;
    } else if !cc_args.is_empty() {
        petrel.restart_with(&cc_args, &cc_args)?;
    }
    let pids = petrel_pids(&petrel);

    // (2) Petrel through the hub.
    if cfg.runs("paths") {
        report.paths.push(run_row(
            &lab,
            cfg,
            path_row(
                "petrel-site-to-cloud",
                "public-site pod to cloud pod through the hub",
                "edge-a1",
                "cloud-1",
                "hub + agents",
            ),
            &pids,
        ));
        report.paths.push(run_row(
            &lab,
            cfg,
            path_row(
                "petrel-site-to-site",
                "public-site pod to public-site pod through the hub (direct paths off)",
                "edge-a1",
                "edge-b1",
                "hub + agents",
            ),
            &pids,
        ));
        // (2b) The same site-to-cloud path with every agent's tunnel on the TCP fallback (QUIC
        // over TLS on TCP 443), beside the QUIC row above; then back to QUIC.
        let row = path_row(
            "petrel-tcp-fallback",
            "public-site pod to cloud pod through the hub, the agent's tunnel over the TCP fallback (compare with petrel-site-to-cloud)",
            "edge-a1",
            "cloud-1",
            "hub + agents",
        );
        let mut hub_extra = vec!["--tcp-listen", "0.0.0.0:443"];
        hub_extra.extend(cc_args.iter().copied());
        let mut agent_extra = vec!["--transport", "tcp"];
        agent_extra.extend(cc_args.iter().copied());
        eprintln!("petrel-bench: agents on the TCP fallback ...");
        match petrel.restart_with(&hub_extra, &agent_extra) {
            Ok(()) => {
                let pids = petrel_pids(&petrel);
                report.paths.push(run_row(&lab, cfg, row, &pids));
            }
            Err(e) => report.paths.push(PathRow {
                error: Some(format!("{e:#}")),
                ..row
            }),
        }
        // Still through the hub (the TCP fallback never goes direct): the RTT to compare.
        report.direct.icmp_rtt_via_hub_ms = icmp_rtt_ms(&lab, "edge-a1", "edge-b1").ok();
        // (2c) Direct paths on (the default): edge-a1 <-> edge-b1 straight between the sites.
        petrel.restart_with(&cc_args, &cc_args)?;
        let row = path_row(
            "petrel-site-to-site-direct",
            "public-site pod to public-site pod over the direct path the hub brokered (both sites behind NAT)",
            "edge-a1",
            "edge-b1",
            "hub + agents",
        );
        match petrel.wait_direct("edge-a1", "edge-b1", Duration::from_secs(60)) {
            Ok(after) => {
                report.direct.direct_after_s = Some(after.as_secs_f64());
                let pids = petrel_pids(&petrel);
                report.paths.push(run_row(&lab, cfg, row, &pids));
                if let Err(e) = measure_direct(cfg, &petrel, &mut report.direct) {
                    report.direct.error = Some(format!("{e:#}"));
                }
            }
            Err(e) => {
                report.direct.error = Some(format!("{e:#}"));
                report.paths.push(PathRow {
                    error: Some(format!("{e:#}")),
                    ..row
                });
            }
        }
    }

    // (3) boringtun between the same namespaces, hub-and-spoke through gw-1 like Petrel.
    if cfg.runs("paths") && cfg.runs("boringtun") {
        let rows = [
            path_row(
                "boringtun",
                "public-site pod to cloud pod over boringtun (edge-a1 <-> gw-1, then Flannel VXLAN)",
                "edge-a1",
                "cloud-1",
                "the boringtun-cli processes",
            ),
            path_row(
                "boringtun-site-to-site",
                "public-site pod to public-site pod over boringtun through gw-1 (two WireGuard hops; the anchor of Petrel's site-to-site row)",
                "edge-a1",
                "edge-b1",
                "the boringtun-cli processes",
            ),
        ];
        match wg::start(
            &lab,
            &["edge-a1", "edge-b1"],
            "cloud-1",
            cfg.boringtun_threads,
        ) {
            Ok(w) => {
                for row in rows {
                    report.paths.push(run_row(&lab, cfg, row, &w.pids()));
                }
                drop(w);
            }
            Err(e) => {
                for row in rows {
                    report.paths.push(PathRow {
                        error: Some(format!("{e:#}")),
                        ..row
                    });
                }
            }
        }
    }
    add_ratios(&mut report.paths);

    // Streams.
    let edge_ip = lab.node("edge-a1").pod_ip;
    let targets = egress_streams::target_servers(&lab, "edge-a1")?;
    let agent_pid = petrel
        .agents
        .iter()
        .find(|(n, _)| n == "edge-a1")
        .map(|(_, g)| g.pid())
        .ok_or_else(|| anyhow!("no agent on edge-a1"))?;
    if cfg.runs("streams") {
        eprintln!("petrel-bench: streams ...");
        let st = &mut report.streams;
        let hello = SocketAddrV4::new(edge_ip, egress_streams::PORT_HELLO);
        let cloud_pod = lab.endpoint_ns("cloud-1")?;
        match streams::setup_via_proxy(uds, hello, cfg.setup_n).and_then(|via| {
            Ok(streams::Setup {
                connect_via_proxy: via,
                direct_tcp: streams::setup_direct(&cloud_pod, hello, cfg.setup_n)?,
                direct_from: "cloud-1's pod over the packet path".into(),
            })
        }) {
            Ok(s) => st.setup = Some(s),
            Err(e) => st.errors.push(format!("setup: {e:#}")),
        }
        match streams::single_stream(uds, edge_ip, cfg.stream_secs) {
            Ok(s) => st.single_stream = Some(s),
            Err(e) => st.errors.push(format!("single stream: {e:#}")),
        }
        for &n in &cfg.concurrent {
            eprintln!("petrel-bench: {n} concurrent streams ...");
            match streams::concurrent(uds, hello, n, 32, agent_pid, petrel.hub.pid()) {
                Ok(c) => st.concurrent.push(c),
                Err(e) => st.concurrent.push(streams::Concurrent {
                    streams: n,
                    first_error: Some(format!("{e:#}")),
                    ..Default::default()
                }),
            }
            // Let the closes settle: the hub counts no open stream any more (best effort; the
            // next figure still runs if it does not get there).
            let _ = petrel_e2e::lab::wait_until(
                "the streams closed on the hub",
                Duration::from_secs(30),
                || {
                    Ok(petrel.hub_status().ok().is_some_and(|s| {
                        s["agents"].as_array().is_some_and(|a| {
                            a.iter().all(|a| a["open_streams"].as_u64() == Some(0))
                        })
                    }))
                },
            );
        }
        match streams::head_of_line(uds, edge_ip, cfg.stream_secs) {
            Ok(h) => st.head_of_line = Some(h),
            Err(e) => st.errors.push(format!("head of line: {e:#}")),
        }
    }

    // WAN emulation.
    if cfg.runs("wan") {
        eprintln!("petrel-bench: WAN emulation ...");
        if let Err(e) = wan_section(&lab, cfg, uds, edge_ip, &mut petrel, &mut report.wan) {
            report.wan.error = Some(format!("{e:#}"));
        }
    }

    // Failover.
    if cfg.runs("failover") {
        eprintln!("petrel-bench: failover ...");
        for _ in 0..cfg.failover_samples {
            match failover_once(&mut petrel, "cloud-1", "edge-a1") {
                Ok(s) => report.failover.samples_s.push(s),
                Err(e) => {
                    report.failover.error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        if !report.failover.samples_s.is_empty() {
            report.failover.median_s = Some(Stat::of(report.failover.samples_s.clone()).median);
        }
    }
    let _ = petrel.stop();
    drop(targets);
    drop(_servers);
    lab.teardown()?;
    Ok(())
}

fn wan_section(
    lab: &Lab,
    cfg: &BenchConfig,
    uds: &Path,
    edge_ip: Ipv4Addr,
    petrel: &mut PetrelLab<'_>,
    w: &mut WanReport,
) -> Result<()> {
    let imp = wan::Impairment::start(lab, Duration::from_millis(cfg.wan_rtt_ms), cfg.wan_loss_pct)?;
    w.impairment = imp.description.clone();
    let gw_wan = lab.gateway_public_ip();
    // From the edge node (the pod's address is not masqueraded by the site router).
    let ping = lab.ping_with(
        &lab.node("edge-a1").ns,
        gw_wan,
        &petrel_e2e::lab::PingOpts {
            count: 5,
            interval: Duration::from_millis(200),
            ..Default::default()
        },
    )?;
    w.ping_rtt_ms = ping.rtt_avg_ms;
    w.kernel_tcp_congestion = lab
        .exec(
            "edge-a1",
            &["sysctl", "-n", "net.ipv4.tcp_congestion_control"],
        )
        .map(|o| o.stdout.trim().to_string())
        .unwrap_or_default();
    w.direct_tcp_mbit = Some(streams::direct_tcp_upload(
        &lab.gateway().ns,
        SocketAddrV4::new(gw_wan, 7401),
        &lab.node("edge-a1").ns,
        cfg.wan_secs,
    )?);
    // Hub and agents restarted with each controller, then back to the run's configuration for
    // the sections that follow.
    for cc in ["cubic", "bbr"] {
        let mut v = WanVariant {
            congestion: cc.to_string(),
            ..Default::default()
        };
        let extra = ["--congestion", cc];
        if let Err(e) = petrel
            .restart_with(&extra, &extra)
            .and_then(|()| wan_variant(lab, cfg, uds, edge_ip, petrel, w, &mut v))
        {
            v.error = Some(format!("{e:#}"));
        }
        w.variants.push(v);
    }
    drop(imp);
    let restore = congestion_args(cfg);
    petrel.restart_with(&restore, &restore)?;
    Ok(())
}

fn wan_variant(
    lab: &Lab,
    cfg: &BenchConfig,
    uds: &Path,
    edge_ip: Ipv4Addr,
    petrel: &PetrelLab<'_>,
    w: &WanReport,
    v: &mut WanVariant,
) -> Result<()> {
    let secs = cfg.wan_secs;
    let uds2 = uds.to_path_buf();
    // Edge -> hub, the direction a direct TCP connection out of the NAT'd site can carry,
    // counted by the receiver over the same window.
    v.stream_mbit = Some(egress_streams::rt()?.block_on(async move {
        let s = egress_streams::connect_via(
            &uds2,
            SocketAddrV4::new(edge_ip, egress_streams::PORT_SOURCE),
        )
        .await?;
        egress_streams::stream_throughput(s, false, secs).await
    })?);
    v.stream_vs_direct =
        v.stream_mbit
            .zip(w.direct_tcp_mbit)
            .map(|(a, b)| if b > 0.0 { a / b } else { 0.0 });
    let pids = petrel_pids(petrel);
    let mut server = util::IperfServer::start(lab, "cloud-1", IPERF_PORT)?;
    let r = server.run(
        lab,
        "edge-a1",
        lab.node("cloud-1").pod_ip,
        1,
        secs.ceil() as u32,
        &pids,
    )?;
    v.packet_path_mbit = Some(r.gbit_per_s * 1000.0);
    v.packet_path_retransmits = Some(r.retransmits);
    Ok(())
}

/// Where the JSON goes by default.
pub fn default_json_path() -> PathBuf {
    PathBuf::from("target/petrel-bench.json")
}
