//! The hub's Prometheus metrics. Labels are bounded sets (outcomes and reasons), never node
//! names: per-agent detail lives in `/status`, so 10,000 agents do not mean 10,000 series each.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Debug)]
pub struct HubMetrics {
    registry: Registry,
    pub agents_connected: Gauge,
    pub tunnel_handshakes: Family<Outcome, Counter>,
    pub agent_refusals: Family<Reason, Counter>,
    pub agents_replaced: Counter,
    pub enrolments: Family<Outcome, Counter>,
    pub renewals: Family<Outcome, Counter>,
    pub datagrams_dropped: Family<Reason, Counter>,
    pub frames_forwarded: Family<Reason, Counter>,
    pub going_away_sent: Counter,
    /// The API server's egress proxy (`petrel_hub_egress_*`).
    pub egress: crate::egress::metrics::EgressMetrics,
}

impl HubMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("petrel_hub");
        let m = Self {
            agents_connected: Gauge::default(),
            tunnel_handshakes: Family::default(),
            agent_refusals: Family::default(),
            agents_replaced: Counter::default(),
            enrolments: Family::default(),
            renewals: Family::default(),
            datagrams_dropped: Family::default(),
            frames_forwarded: Family::default(),
            going_away_sent: Counter::default(),
            egress: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "agents_connected",
            "Agents with an established tunnel",
            m.agents_connected.clone(),
        );
        registry.register(
            "tunnel_handshakes",
            "QUIC handshakes on the hub port, by outcome",
            m.tunnel_handshakes.clone(),
        );
        registry.register(
            "agent_refusals",
            "Tunnel connections refused after the handshake, by reason",
            m.agent_refusals.clone(),
        );
        registry.register(
            "agents_replaced",
            "Tunnels replaced by a newer connection from the same node",
            m.agents_replaced.clone(),
        );
        registry.register(
            "enrolments",
            "Enrolment attempts, by outcome",
            m.enrolments.clone(),
        );
        registry.register(
            "renewals",
            "Certificate renewals over the tunnel, by outcome",
            m.renewals.clone(),
        );
        registry.register(
            "datagrams_dropped",
            "Datagrams from agents dropped, by reason",
            m.datagrams_dropped.clone(),
        );
        registry.register(
            "going_away_sent",
            "Going-away messages sent to agents",
            m.going_away_sent.clone(),
        );
        registry.register(
            "frames_forwarded",
            "VXLAN frames switched by the hub, by path",
            m.frames_forwarded.clone(),
        );
        m.egress
            .register(registry.sub_registry_with_prefix("egress"));
        Self { registry, ..m }
    }

    pub fn inc_outcome(family: &Family<Outcome, Counter>, outcome: &str) {
        family
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn inc_reason(family: &Family<Reason, Counter>, reason: &str) {
        family
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for HubMetrics {
    fn default() -> Self {
        Self::new()
    }
}
