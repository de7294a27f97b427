//! The agent's links as the rest of the agent sees them: each link's state and last error
//! (`/status`, `petrel-edge-agent status`, readiness), the open tunnels for quinn's path
//! statistics, and the `hubs_connected` gauge. Links write their row; the admin endpoint and
//! the supervisor read.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

/// Where one link is in its life (`state` in `/status`, as the lower-case word).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    #[default]
    Connecting,
    Connected,
    /// The last attempt failed; waiting before the next.
    Backoff,
    /// The session ended; reconnecting.
    Disconnected,
    /// Reaches the same hub as another link of this agent: waiting before trying again.
    Parked,
    Stopped,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Backoff => "backoff",
            Self::Disconnected => "disconnected",
            Self::Parked => "parked",
            Self::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `petrel-edge-agent status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    pub endpoint: String,
    pub state: LinkState,
    pub hub: Option<String>,
    pub remote: Option<String>,
    pub connected_since_unix: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub last_error: Option<String>,
    pub attempts: u32,
    /// What carries the tunnel (`udp`, or `tcp`: the fallback), while connected.
    #[serde(default)]
    pub transport: Option<String>,
}

/// Every link's row and open tunnel.
#[derive(Debug, Default)]
pub struct LinkBoard {
    rows: Mutex<BTreeMap<String, LinkStatus>>,
    /// Open tunnels by endpoint: (hub, connection).
    tunnels: Mutex<BTreeMap<String, (String, quinn::Connection)>>,
    /// Links connected now.
    connected: Gauge,
    /// Of those, links on the TCP fallback.
    over_tcp: Gauge,
}

/// Why no link is up, for readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoLink {
    /// No link has failed yet (still connecting).
    NotYet,
    /// Each failing link's last error (`endpoint: error`).
    Failing(Vec<String>),
}

impl LinkBoard {
    /// A board that keeps `connected` at the number of connected links.
    pub fn new(connected: Gauge) -> Self {
        Self {
            connected,
            ..Default::default()
        }
    }

    /// [`LinkBoard::new`], also keeping `over_tcp` at the connected links on the TCP fallback.
    pub fn with_tcp_gauge(connected: Gauge, over_tcp: Gauge) -> Self {
        Self {
            connected,
            over_tcp,
            ..Default::default()
        }
    }

    /// Changes the row of `endpoint` (created on first use).
    pub fn update(&self, endpoint: &str, f: impl FnOnce(&mut LinkStatus)) {
        if let Ok(mut rows) = self.rows.lock() {
            let entry = rows
                .entry(endpoint.to_string())
                .or_insert_with(|| LinkStatus {
                    endpoint: endpoint.to_string(),
                    ..Default::default()
                });
            f(entry);
            let connected = rows.values().filter(|l| l.state == LinkState::Connected);
            let (mut all, mut tcp) = (0i64, 0i64);
            for l in connected {
                all += 1;
                tcp += i64::from(l.transport.as_deref() == Some("tcp"));
            }
            self.connected.set(all);
            self.over_tcp.set(tcp);
        }
    }

    /// A link other than `except` connected to hub `hub`.
    pub fn other_on_hub(&self, hub: &str, except: &str) -> Option<String> {
        let rows = self.rows.lock().ok()?;
        rows.values()
            .find(|l| {
                l.endpoint != except
                    && l.state == LinkState::Connected
                    && l.hub.as_deref() == Some(hub)
            })
            .map(|l| l.endpoint.clone())
    }

    /// `Ok` if a link is connected, else why not.
    pub fn any_connected(&self) -> Result<(), NoLink> {
        let rows = self.rows.lock().map_err(|_| NoLink::NotYet)?;
        if rows.values().any(|l| l.state == LinkState::Connected) {
            return Ok(());
        }
        let errors: Vec<String> = rows
            .values()
            .filter_map(|l| {
                l.last_error
                    .as_ref()
                    .map(|e| format!("{}: {e}", l.endpoint))
            })
            .collect();
        Err(if errors.is_empty() {
            NoLink::NotYet
        } else {
            NoLink::Failing(errors)
        })
    }

    pub fn rows(&self) -> Vec<LinkStatus> {
        self.rows
            .lock()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Records (or with `None` forgets) the open tunnel of `endpoint`.
    pub fn track_tunnel(&self, endpoint: &str, tunnel: Option<(&str, &quinn::Connection)>) {
        if let Ok(mut t) = self.tunnels.lock() {
            match tunnel {
                Some((hub, conn)) => {
                    t.insert(endpoint.to_string(), (hub.to_string(), conn.clone()));
                }
                None => {
                    t.remove(endpoint);
                }
            }
        }
    }

    /// (endpoint, hub, path statistics) of every open tunnel.
    pub fn tunnel_stats(&self) -> Vec<(String, String, quinn::ConnectionStats)> {
        self.tunnels
            .lock()
            .map(|t| {
                t.iter()
                    .map(|(ep, (hub, c))| (ep.clone(), hub.clone(), c.stats()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rows_count_connected_links_and_find_another_on_the_same_hub() {
        let gauge = Gauge::default();
        let board = LinkBoard::new(gauge.clone());
        assert_eq!(board.any_connected(), Err(NoLink::NotYet));
        board.update("a:7443", |l| l.state = LinkState::Connecting);
        board.update("b:7443", |l| l.last_error = Some("timed out".into()));
        assert_eq!(
            board.any_connected(),
            Err(NoLink::Failing(vec!["b:7443: timed out".into()]))
        );
        board.update("a:7443", |l| {
            l.state = LinkState::Connected;
            l.hub = Some("gw-1".into());
        });
        assert_eq!(gauge.get(), 1);
        assert_eq!(board.any_connected(), Ok(()));
        assert_eq!(board.other_on_hub("gw-1", "b:7443"), Some("a:7443".into()));
        assert_eq!(board.other_on_hub("gw-1", "a:7443"), None, "not itself");
        assert_eq!(board.other_on_hub("gw-2", "b:7443"), None);
        board.update("b:7443", |l| {
            l.state = LinkState::Connected;
            l.hub = Some("gw-1".into());
        });
        assert_eq!(gauge.get(), 2);
        board.update("a:7443", |l| l.state = LinkState::Parked);
        assert_eq!(gauge.get(), 1);
        assert_eq!(
            board.other_on_hub("gw-1", "b:7443"),
            None,
            "parked is not connected"
        );
        let rows = board.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].endpoint, "a:7443");
        assert_eq!(rows[0].state.as_str(), "parked");
        assert!(board.tunnel_stats().is_empty());
    }

    #[test]
    fn the_tcp_gauge_counts_connected_links_on_the_fallback() {
        let (all, tcp) = (Gauge::default(), Gauge::default());
        let board = LinkBoard::with_tcp_gauge(all.clone(), tcp.clone());
        board.update("a:7443", |l| {
            l.state = LinkState::Connected;
            l.transport = Some("udp".into());
        });
        board.update("b:7443", |l| {
            l.state = LinkState::Connected;
            l.transport = Some("tcp".into());
        });
        assert_eq!((all.get(), tcp.get()), (2, 1));
        board.update("b:7443", |l| {
            l.state = LinkState::Disconnected;
            l.transport = None;
        });
        assert_eq!((all.get(), tcp.get()), (1, 0));
    }
}
