//! The registry of connected agents, keyed by the node name in their client certificate.
//!
//! A node holds at most one tunnel. A reconnect (new NAT mapping, agent restart, a half-dead old
//! connection the hub has not noticed yet) replaces the old entry atomically under the lock; the
//! caller then tells the old session to leave. A session removes its entry on exit only if it is
//! still the current one, so a late exit of a replaced session never unregisters its successor.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use petrel_proto::GoingAway;
use serde::Serialize;
use tokio::sync::Notify;

/// What the hub asks a session to do.
#[derive(Debug)]
pub enum SessionCommand {
    /// Send going-away and close.
    Leave(GoingAway),
    /// Push a control message (an inventory update, a peer offer).
    Send(Box<petrel_proto::ControlMessage>),
}

/// A session's inbox of [`SessionCommand`]s: bounded, one reader (the session), and nothing
/// allocated until a command arrives. A tokio `mpsc` channel allocates a block of 32 slots per
/// channel up front, ~1.5 KB per agent for an inbox that is empty nearly all its life.
#[derive(Debug, Default)]
pub struct CommandQueue {
    queue: Mutex<VecDeque<SessionCommand>>,
    arrived: Notify,
}

impl CommandQueue {
    /// Commands a session may have waiting; a sender finding it full gets its command back (the
    /// session is not keeping up: leave-senders then close the connection, update-senders retry
    /// on the next change).
    pub const CAPACITY: usize = 16;

    pub fn try_send(&self, cmd: SessionCommand) -> Result<(), SessionCommand> {
        {
            let Ok(mut q) = self.queue.lock() else {
                return Err(cmd);
            };
            if q.len() >= Self::CAPACITY {
                return Err(cmd);
            }
            q.push_back(cmd);
        }
        // A permit is stored if the session is not waiting, so the next `recv` sees it.
        self.arrived.notify_one();
        Ok(())
    }

    /// The next command, in order. Cancel-safe: a command is taken only when this resolves.
    pub async fn recv(&self) -> SessionCommand {
        loop {
            if let Some(cmd) = self.queue.lock().ok().and_then(|mut q| q.pop_front()) {
                return cmd;
            }
            self.arrived.notified().await;
        }
    }
}

/// Counters a session updates and `status` reads.
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub open_streams: AtomicU64,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
}

impl AgentCounters {
    pub fn count_drop(&self, reason: &'static str) {
        if let Ok(mut d) = self.dropped.lock() {
            *d.entry(reason).or_default() += 1;
        }
    }

    pub fn drops(&self) -> BTreeMap<&'static str, u64> {
        self.dropped.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// One connected agent.
#[derive(Debug)]
pub struct AgentEntry {
    pub id: u64,
    pub node: String,
    pub site: String,
    pub agent_version: String,
    pub datapath: String,
    pub since: SystemTime,
    pub connection: quinn::Connection,
    pub commands: CommandQueue,
    pub counters: AgentCounters,
    /// The agent takes its routes by route sync; its views carry none.
    pub route_sync: bool,
    /// The agent takes peer offers (its hello's `capability::DIRECT_PATHS`).
    pub direct_paths: bool,
}

/// A row of `petrel-gateway status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AgentStatus {
    pub node: String,
    pub site: String,
    pub remote: String,
    pub connected_since_unix: u64,
    pub rtt_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_dropped: BTreeMap<String, u64>,
    pub open_streams: u64,
    pub agent_version: String,
    pub datapath: String,
    /// `udp`, or `tcp` for a tunnel over the TCP fallback.
    #[serde(default)]
    pub transport: String,
}

impl AgentEntry {
    pub fn status(&self) -> AgentStatus {
        let stats = self.connection.stats();
        // quinn's smoothed RTT: current whoever pings (the hub pings only quiet agents).
        let rtt = self.connection.rtt();
        AgentStatus {
            node: self.node.clone(),
            site: self.site.clone(),
            remote: self.connection.remote_address().to_string(),
            transport: if petrel_transport::stream_carrier::is_carried(
                self.connection.remote_address(),
            ) {
                "tcp".into()
            } else {
                "udp".into()
            },
            connected_since_unix: self
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            rtt_ms: Some(rtt.as_secs_f64() * 1000.0),
            bytes_in: stats.udp_rx.bytes,
            bytes_out: stats.udp_tx.bytes,
            datagrams_dropped: self
                .counters
                .drops()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            open_streams: self.counters.open_streams.load(Ordering::Relaxed),
            agent_version: self.agent_version.clone(),
            datapath: self.datapath.clone(),
        }
    }

    pub fn remote(&self) -> SocketAddr {
        self.connection.remote_address()
    }
}

/// Told when tunnels come and go (Kubernetes mode writes it onto the Nodes).
pub trait TunnelObserver: Send + Sync + std::fmt::Debug {
    fn connected(&self, entry: &AgentEntry);
    fn disconnected(&self, node: &str, reason: &str);
}

#[derive(Debug, Default)]
pub struct AgentRegistry {
    agents: Mutex<HashMap<String, Arc<AgentEntry>>>,
    next_id: AtomicU64,
    changed: tokio::sync::Notify,
    /// Told of every registration and removal (set once, by the Kubernetes integration).
    observer: std::sync::OnceLock<Arc<dyn TunnelObserver>>,
}

impl AgentRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Who is told when tunnels come and go; the first observer set stays (false if one was).
    pub fn set_observer(&self, observer: Arc<dyn TunnelObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Registers `entry`, returning the entry it replaced, and tells the observer.
    pub fn insert(&self, entry: Arc<AgentEntry>) -> Option<Arc<AgentEntry>> {
        let old = self
            .agents
            .lock()
            .ok()?
            .insert(entry.node.clone(), entry.clone());
        if let Some(o) = self.observer.get() {
            o.connected(&entry);
        }
        old
    }

    /// Removes `node` if its current entry is `id` (a replaced session's end removes nothing),
    /// and tells the observer why it left.
    pub fn remove(&self, node: &str, id: u64, reason: &dyn std::fmt::Display) -> bool {
        let removed = {
            let Ok(mut agents) = self.agents.lock() else {
                return false;
            };
            agents.get(node).is_some_and(|e| e.id == id) && agents.remove(node).is_some()
        };
        if removed {
            self.changed.notify_waiters();
            if let Some(o) = self.observer.get() {
                o.disconnected(node, &reason.to_string());
            }
        }
        removed
    }

    /// Resolves after the next removal. Created before checking a condition, it cannot miss
    /// a removal that happens after the check.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn get(&self, node: &str) -> Option<Arc<AgentEntry>> {
        self.agents.lock().ok()?.get(node).cloned()
    }

    pub fn len(&self) -> usize {
        self.agents.lock().map(|a| a.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<AgentEntry>> {
        self.agents
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn status(&self) -> Vec<AgentStatus> {
        let mut rows: Vec<_> = self.all().iter().map(|e| e.status()).collect();
        rows.sort_by(|a, b| a.node.cmp(&b.node));
        rows
    }
}
