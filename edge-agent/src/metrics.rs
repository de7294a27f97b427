//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    pub hubs_connected: Gauge,
    /// Of those, tunnels on the TCP fallback.
    pub hubs_connected_over_tcp: Gauge,
    pub connect_attempts: Family<Outcome, Counter>,
    pub sessions_ended: Family<Outcome, Counter>,
    pub renewals: Family<Outcome, Counter>,
    /// Failed connection attempts by reason ([`crate::link::ConnectError::reason`]).
    pub handshake_failures: Family<Reason, Counter>,
    /// Direct paths to peers of other public sites (`crate::direct_paths`).
    pub direct: DirectMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("petrel_agent");
        let hubs_connected = Gauge::default();
        let hubs_connected_over_tcp = Gauge::default();
        let connect_attempts = Family::<Outcome, Counter>::default();
        let sessions_ended = Family::<Outcome, Counter>::default();
        let renewals = Family::<Outcome, Counter>::default();
        let handshake_failures = Family::<Reason, Counter>::default();
        registry.register(
            "hubs_connected",
            "Hubs this agent holds a tunnel to",
            hubs_connected.clone(),
        );
        registry.register(
            "hubs_connected_over_tcp",
            "Of the hubs this agent holds a tunnel to, those reached over the TCP fallback (QUIC over TLS on TCP, while UDP gets no answer)",
            hubs_connected_over_tcp.clone(),
        );
        registry.register(
            "connect_attempts",
            "Tunnel connection attempts, by outcome",
            connect_attempts.clone(),
        );
        registry.register(
            "sessions_ended",
            "Tunnel sessions that ended, by cause",
            sessions_ended.clone(),
        );
        registry.register(
            "renewals",
            "Certificate renewals, by outcome",
            renewals.clone(),
        );
        registry.register(
            "handshake_failures",
            "Failed tunnel connection attempts, by reason (no_answer, resolve, tls, refused, no_welcome, other)",
            handshake_failures.clone(),
        );
        let direct = DirectMetrics::default();
        registry.register(
            "direct_paths",
            "Peers of other public sites whose frames go straight to them now, not through the hub",
            direct.direct.clone(),
        );
        registry.register(
            "direct_attempts",
            "Direct paths by outcome: established, failed (no connection within the punch timeout: NAT or firewall), lost (closed or silent after it was up)",
            direct.attempts.clone(),
        );
        registry.register(
            "peer_bytes_sent",
            "VXLAN payload bytes this node sent to peers of other public sites the hub offered, by path (direct, hub): rate(direct) / rate(both) is the share of site-to-site traffic that goes direct",
            direct.bytes_sent.clone(),
        );
        registry.register(
            "peer_refused",
            "What was refused from peer agents: handshakes (not_offered, wrong_peer, unknown_peer, too_many_peers, busy) and frames failing the switch's checks (peer_frame)",
            direct.refused.clone(),
        );
        // Series that alerts rate() over exist from the start (at 0).
        for family in [&connect_attempts, &renewals] {
            let _ = family.get_or_create(&Outcome {
                outcome: "ok".to_string(),
            });
        }
        Self {
            registry,
            hubs_connected,
            hubs_connected_over_tcp,
            connect_attempts,
            sessions_ended,
            renewals,
            handshake_failures,
            direct,
        }
    }

    pub fn inc(family: &Family<Outcome, Counter>, outcome: &str) {
        family
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One family of the text exposition: `# HELP`, `# TYPE` and its samples. Counters get the
/// `_total` suffix on their samples (OpenMetrics).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    let sample = if kind == "counter" {
        format!("{name}_total")
    } else {
        name.to_string()
    };
    for (labels, v) in samples {
        out.push_str(&format!("{sample}{labels} {v}\n"));
    }
}

fn label(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// What [`render_live`] reads from the agent's live state, gathered by the agent at scrape time.
#[derive(Debug)]
pub struct LiveState<'a> {
    /// `Some(ready)` when a data plane was asked for (not `--hooks none`).
    pub dataplane_ready: Option<bool>,
    /// The data plane, once open.
    pub dataplane: Option<&'a crate::dataplane::AgentDataplane>,
    /// Endpoint, hub and quinn's path statistics of each open tunnel.
    pub tunnels: Vec<(String, String, quinn::ConnectionStats)>,
    pub certificate_not_after: std::time::SystemTime,
}

/// Metrics read at scrape time from the agent's live state: the data plane (readiness, frames
/// and bytes each way, drops by reason, peers, route MTU per site), each tunnel's path as quinn
/// measures it (RTT, packets sent and lost), and the certificate's remaining lifetime.
pub fn render_live(live: &LiveState<'_>) -> String {
    let mut out = String::new();
    if let Some(ready) = live.dataplane_ready {
        let hooks = live.dataplane.map(|d| d.hooks_name()).unwrap_or("none");
        family(
            &mut out,
            "petrel_agent_dataplane_ready",
            "gauge",
            "1 when the data plane is programmed as the hub's view asks (hooks: the kernel hook in use; none while not open)",
            &[(label(&[("hooks", hooks)]), f64::from(u8::from(ready)))],
        );
    }
    if let Some(dp) = live.dataplane {
        let st = dp.status();
        let dirs = |a: u64, b: u64| {
            vec![
                (label(&[("direction", "to_hub")]), a as f64),
                (label(&[("direction", "from_hub")]), b as f64),
            ]
        };
        family(
            &mut out,
            "petrel_agent_dataplane_frames",
            "counter",
            "VXLAN frames carried through the tunnel, by direction",
            &dirs(st.frames_to_hub, st.frames_from_hub),
        );
        family(
            &mut out,
            "petrel_agent_dataplane_bytes",
            "counter",
            "VXLAN payload bytes carried through the tunnel, by direction",
            &dirs(st.bytes_to_hub, st.bytes_from_hub),
        );
        let drops: Vec<(String, f64)> = st
            .dropped
            .iter()
            .map(|(r, n)| (label(&[("reason", r)]), *n as f64))
            .collect();
        family(
            &mut out,
            "petrel_agent_dataplane_dropped",
            "counter",
            "Frames the agent dropped, by reason (no_hub, tunnel_down, oversize, not_for_this_node, inject_failed, ...)",
            &drops,
        );
        family(
            &mut out,
            "petrel_agent_dataplane_peers",
            "gauge",
            "Pod CIDRs routed through the hub",
            &[(String::new(), st.peers as f64)],
        );
        let mtus: Vec<(String, f64)> = st
            .site_mtu
            .iter()
            .map(|(site, m)| (label(&[("site", site)]), f64::from(*m)))
            .collect();
        family(
            &mut out,
            "petrel_agent_route_mtu_bytes",
            "gauge",
            "Inner MTU of the routes toward each site reached through the hub",
            &mtus,
        );
    }
    let per = |f: &dyn Fn(&quinn::ConnectionStats) -> f64| -> Vec<(String, f64)> {
        live.tunnels
            .iter()
            .map(|(ep, hub, s)| (label(&[("endpoint", ep), ("hub", hub)]), f(s)))
            .collect()
    };
    family(
        &mut out,
        "petrel_agent_tunnel_rtt_seconds",
        "gauge",
        "Round-trip time of each open tunnel as quinn estimates it",
        &per(&|s| s.path.rtt.as_secs_f64()),
    );
    family(
        &mut out,
        "petrel_agent_tunnel_sent_packets",
        "counter",
        "UDP packets sent on each open tunnel (since it connected)",
        &per(&|s| s.path.sent_packets as f64),
    );
    family(
        &mut out,
        "petrel_agent_tunnel_lost_packets",
        "counter",
        "Packets quinn declared lost on each open tunnel (since it connected)",
        &per(&|s| s.path.lost_packets as f64),
    );
    family(
        &mut out,
        "petrel_agent_tunnel_congestion_events",
        "counter",
        "Congestion events on each open tunnel (since it connected)",
        &per(&|s| s.path.congestion_events as f64),
    );
    let not_after = live.certificate_not_after;
    let now = std::time::SystemTime::now();
    let left = match not_after.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    family(
        &mut out,
        "petrel_agent_certificate_expiry_seconds",
        "gauge",
        "Seconds until this node's certificate expires (negative: expired); renewed at two thirds of its lifetime",
        &[(String::new(), left)],
    );
    out
}

/// The direct paths' metrics (`crate::direct_paths`; clones of the agent's series).
#[derive(Debug, Clone, Default)]
pub struct DirectMetrics {
    /// Peers whose frames go direct now.
    pub direct: Gauge,
    /// Punches and direct connections by outcome: established, failed (no connection within
    /// the punch timeout), lost (closed or silent after it was up).
    pub attempts: Family<Outcome, Counter>,
    /// What was refused from peers: handshakes (not_offered, wrong_peer, unknown_peer,
    /// too_many_peers) and frames (peer_spoofed_mac, peer_spoofed_source, ...).
    pub refused: Family<Reason, Counter>,
    /// VXLAN payload bytes sent to offered peers, by path (`direct`, `hub`): the share of
    /// site-to-site traffic that goes direct.
    pub bytes_sent: Family<PathLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

impl DirectMetrics {
    pub(crate) fn attempt(&self, outcome: &str) {
        self.attempts
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub(crate) fn refuse(&self, reason: &str, n: u64) {
        self.refused
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }
}
