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
    pub connect_attempts: Family<Outcome, Counter>,
    pub sessions_ended: Family<Outcome, Counter>,
    pub renewals: Family<Outcome, Counter>,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("petrel_agent");
        let hubs_connected = Gauge::default();
        let connect_attempts = Family::<Outcome, Counter>::default();
        let sessions_ended = Family::<Outcome, Counter>::default();
        let renewals = Family::<Outcome, Counter>::default();
        registry.register(
            "hubs_connected",
            "Hubs this agent holds a tunnel to",
            hubs_connected.clone(),
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
        Self {
            registry,
            hubs_connected,
            connect_attempts,
            sessions_ended,
            renewals,
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
