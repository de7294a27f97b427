//! The hub's Prometheus metrics. Labels are bounded sets (outcomes and reasons), never node
//! names: per-agent detail lives in `/status`, so 10,000 agents do not mean 10,000 series each.

use std::sync::Arc;

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
    /// QUIC handshakes the hub is running now (at most `MAX_HANDSHAKES_IN_FLIGHT`): at the cap,
    /// the hub is saturated and new handshakes queue or wait for their Initial's retransmission.
    pub handshakes_in_flight: Gauge,
    /// Address-validated handshakes waiting for a slot (at most `HANDSHAKE_QUEUE`).
    pub handshakes_queued: Gauge,
    pub agent_refusals: Family<Reason, Counter>,
    pub agents_replaced: Counter,
    /// Liveness probes from node roles answered on the relay port (active-active hubs).
    pub relay_probes_answered: Counter,
    pub enrolments: Family<Outcome, Counter>,
    pub renewals: Family<Outcome, Counter>,
    /// CertificateSigningRequests of Petrel's signer, by outcome (signed, `denied_<reason>`).
    pub csrs: Family<Outcome, Counter>,
    pub datagrams_dropped: Family<Reason, Counter>,
    pub frames_forwarded: Family<Reason, Counter>,
    pub going_away_sent: Counter,
    /// Bytes of freed heap the hub gave back to the kernel (its RSS before minus after each
    /// release; see `hub::memory`).
    pub heap_released_bytes: Counter,
    /// 1 when this hub carries traffic (Kubernetes mode: the Lease holder, or with active-active
    /// hubs every live labelled hub; always in file mode), else 0.
    pub active: Gauge,
    /// Nodes of public-network sites in the inventory: the agents this hub expects.
    pub agents_expected: Gauge,
    /// Route-sync batches sent to agents, by kind (current, delta, snapshot).
    pub route_sync_batches: Family<Outcome, Counter>,
    /// Bytes of route-sync messages sent to agents, by kind.
    pub route_sync_bytes: Family<Outcome, Counter>,
    /// Routable nodes in the cluster route table.
    pub route_table_entries: Gauge,
    /// Encoded size of the last Welcome sent.
    pub welcome_bytes: Gauge,
    /// Sites whose MTU was learned from their tunnels' paths as smaller than the site MTU (each
    /// is in `/status` under `site_mtus`).
    pub sites_mtu_learned: Gauge,
    /// TCP fallback connections by outcome (accepted, rate_limited, too_many, tls_failed, ...).
    pub tcp_connections: Family<Outcome, Counter>,
    /// TCP fallback connections open now.
    pub tcp_open: Gauge,
    /// QUIC packets the TCP fallback lost, by reason (send_queue_full, receive_queue_full,
    /// bad_frame: a stream ended by a frame that is no QUIC packet).
    pub tcp_packets_dropped: Family<Reason, Counter>,
    /// Direct-path offers (`hub::rendezvous`): `sent` (one per pair, to both ends), or why a
    /// relayed pair was not offered (`not_capable`, `tcp_fallback`, `address_family`).
    pub peer_offers: Family<Outcome, Counter>,
    /// The API server's egress proxy (`petrel_hub_egress_*`).
    pub egress: Arc<crate::egress::metrics::EgressMetrics>,
}

impl HubMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("petrel_hub");
        let m = Self {
            agents_connected: Gauge::default(),
            tunnel_handshakes: Family::default(),
            handshakes_in_flight: Gauge::default(),
            handshakes_queued: Gauge::default(),
            agent_refusals: Family::default(),
            agents_replaced: Counter::default(),
            relay_probes_answered: Counter::default(),
            tcp_connections: Family::default(),
            tcp_open: Gauge::default(),
            tcp_packets_dropped: Family::default(),
            peer_offers: Family::default(),
            enrolments: Family::default(),
            renewals: Family::default(),
            csrs: Family::default(),
            datagrams_dropped: Family::default(),
            frames_forwarded: Family::default(),
            going_away_sent: Counter::default(),
            heap_released_bytes: Counter::default(),
            active: Gauge::default(),
            agents_expected: Gauge::default(),
            route_sync_batches: Family::default(),
            route_sync_bytes: Family::default(),
            route_table_entries: Gauge::default(),
            welcome_bytes: Gauge::default(),
            sites_mtu_learned: Gauge::default(),
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
            "handshakes_in_flight",
            "QUIC handshakes the hub is running now (256 at most)",
            m.handshakes_in_flight.clone(),
        );
        registry.register(
            "handshakes_queued",
            "Address-validated handshakes waiting for a slot (1,024 at most)",
            m.handshakes_queued.clone(),
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
            "csrs",
            "CertificateSigningRequests of the petrel.io/edge-tunnel signer, by outcome",
            m.csrs.clone(),
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
            "heap_released_bytes",
            "Bytes of freed heap given back to the kernel (RSS before minus after each release)",
            m.heap_released_bytes.clone(),
        );
        registry.register(
            "frames_forwarded",
            "VXLAN frames switched by the hub, by path",
            m.frames_forwarded.clone(),
        );
        registry.register(
            "active",
            "1 when this hub carries traffic (the Lease holder; with active-active hubs every live labelled hub; always in file mode)",
            m.active.clone(),
        );
        registry.register(
            "agents_expected",
            "Nodes of public-network sites in the inventory (agents expected to connect)",
            m.agents_expected.clone(),
        );
        registry.register(
            "route_sync_batches",
            "Route-sync batches sent to agents, by kind (current, delta, snapshot)",
            m.route_sync_batches.clone(),
        );
        registry.register(
            "route_sync_bytes",
            "Bytes of route-sync messages sent to agents, by kind",
            m.route_sync_bytes.clone(),
        );
        registry.register(
            "welcome_bytes",
            "Encoded size of the last Welcome sent to an agent",
            m.welcome_bytes.clone(),
        );
        registry.register(
            "relay_probes_answered",
            "Liveness probes from node roles answered on the relay port (probes from unknown addresses are dropped as unknown_sender)",
            m.relay_probes_answered.clone(),
        );
        registry.register(
            "tcp_connections",
            "Connections to the TCP fallback listener by outcome (accepted, rate_limited, too_many, tls_failed, tls_timeout)",
            m.tcp_connections.clone(),
        );
        registry.register(
            "peer_offers",
            "Direct-path offers to pairs of agents whose traffic this hub relays: sent (to both ends), or why not (not_capable, tcp_fallback, address_family)",
            m.peer_offers.clone(),
        );
        registry.register(
            "tcp_open",
            "TCP fallback connections open now (each carries one agent's QUIC packets)",
            m.tcp_open.clone(),
        );
        registry.register(
            "tcp_packets_dropped",
            "QUIC packets the TCP fallback lost, by reason (send_queue_full: a connection's writer behind; receive_queue_full: the hub's endpoint behind; bad_frame: a stream ended by a frame that is no QUIC packet)",
            m.tcp_packets_dropped.clone(),
        );
        registry.register(
            "sites_mtu_learned",
            "Sites whose tunnels' paths fit less than the site MTU (learned; see /status site_mtus)",
            m.sites_mtu_learned.clone(),
        );
        registry.register(
            "route_table_entries",
            "Routable nodes in the cluster route table",
            m.route_table_entries.clone(),
        );
        m.egress
            .register(registry.sub_registry_with_prefix("egress"));
        // Series that alerts and dashboards rate() over exist from the start (at 0), so an
        // increase from nothing is seen and the families are visible before the first event.
        for outcome in ["ok"] {
            for family in [&m.tunnel_handshakes, &m.enrolments, &m.renewals] {
                let _ = family.get_or_create(&Outcome {
                    outcome: outcome.to_string(),
                });
            }
        }
        let _ = m.agent_refusals.get_or_create(&Reason {
            reason: "not_admitted".to_string(),
        });
        let _ = m.datagrams_dropped.get_or_create(&Reason {
            reason: "spoofed_source".to_string(),
        });
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

/// Nodes of public-network sites in `inv`: the agents a hub expects
/// ([`HubMetrics::agents_expected`]).
pub fn public_site_nodes(inv: &crate::inventory::Inventory) -> i64 {
    let n = inv
        .nodes()
        .filter(|n| inv.site_kind_of(n) == Some(crate::inventory::SiteKind::Public))
        .count();
    i64::try_from(n).unwrap_or(i64::MAX)
}
