//! The egress proxy's Prometheus metrics, registered under `petrel_hub_egress_`. Labels are
//! bounded sets (listener, outcome, path, direction), never node names or targets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub path: &'static str,
    pub direction: &'static str,
}

type HistogramCtor = fn() -> Histogram;

fn dial_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Egress counters; cloned handles share the same values.
#[derive(Debug, Clone)]
pub struct EgressMetrics {
    /// Every connection a listener accepted, by listener and final outcome (`ok` when the
    /// tunnel was established).
    pub requests: Family<RequestLabels, Counter>,
    /// Proxied connections established, by path (`tunnel`: a QUIC stream to an agent;
    /// `direct`: a TCP dial by the hub).
    pub streams_opened: Family<PathLabels, Counter>,
    /// Proxied connections open now, by path.
    pub streams_open: Family<PathLabels, Gauge>,
    /// Dials in progress (agent streams awaiting their result, direct dials).
    pub pending_dials: Gauge,
    /// Bytes carried, by path and direction (`to_target`, `from_target`).
    pub bytes: Family<DirectionLabels, Counter>,
    /// Time from resolution to an established target connection, by path.
    pub dial_seconds: Family<PathLabels, Histogram, HistogramCtor>,
}

impl Default for EgressMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            streams_opened: Family::default(),
            streams_open: Family::default(),
            pending_dials: Gauge::default(),
            bytes: Family::default(),
            dial_seconds: Family::new_with_constructor(dial_histogram as HistogramCtor),
        }
    }
}

impl EgressMetrics {
    /// Registers every family in `registry` (the hub passes its `egress` sub-registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "Connections accepted by the egress listeners, by listener and outcome",
            self.requests.clone(),
        );
        registry.register(
            "streams_opened",
            "Proxied connections established, by path (tunnel: QUIC stream to an agent; direct: dialed by the hub)",
            self.streams_opened.clone(),
        );
        registry.register(
            "streams_open",
            "Proxied connections open now, by path",
            self.streams_open.clone(),
        );
        registry.register(
            "pending_dials",
            "Dials to proxied targets in progress",
            self.pending_dials.clone(),
        );
        registry.register(
            "bytes",
            "Bytes carried by proxied connections, by path and direction",
            self.bytes.clone(),
        );
        registry.register(
            "dial_seconds",
            "Time to establish the target connection, by path",
            self.dial_seconds.clone(),
        );
    }

    pub fn request(&self, listener: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { listener, outcome })
            .inc();
    }
}
