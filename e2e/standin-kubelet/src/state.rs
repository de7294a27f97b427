//! Counters and recent history that tests observe through `GET /standin/state` (read-only
//! port), `/metrics`, or [`crate::Running::state`] in-process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// Completed exec/attach sessions kept in the history.
const HISTORY: usize = 100;

/// One finished exec or attach session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRecord {
    /// "exec" or "attach".
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Pod.
    pub pod: String,
    /// Container.
    pub container: String,
    /// argv (empty for attach).
    pub command: Vec<String>,
    /// Negotiated `X-Stream-Protocol-Version`.
    pub protocol: String,
    /// Exit status; `None` if the client went away first.
    pub exit_code: Option<i32>,
    /// Bytes read from the stdin stream.
    pub stdin_bytes: u64,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
}

/// Terminal size sent on a resize stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TerminalSize {
    /// Columns.
    #[serde(rename = "Width", alias = "width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height", alias = "height")]
    pub height: u16,
}

/// A point-in-time copy of [`State`], as served by `GET /standin/state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateSnapshot {
    /// Requests served on the HTTPS port.
    pub https_requests_total: u64,
    /// Requests served on the read-only port.
    pub read_only_requests_total: u64,
    /// `containerLogs?follow=true` responses currently streaming.
    pub follow_streams_open: u64,
    /// Follow streams ever opened.
    pub follow_streams_total: u64,
    /// Open follow streams per `ns/pod/container`.
    pub follow_streams_by_container: BTreeMap<String, u64>,
    /// Log lines received on `POST /standin/log/...`.
    pub log_lines_pushed_total: u64,
    /// SPDY connections currently upgraded.
    pub spdy_connections_open: u64,
    /// SPDY connections ever upgraded.
    pub spdy_connections_total: u64,
    /// Exec/attach sessions currently running.
    pub exec_sessions_open: u64,
    /// Exec/attach sessions ever started.
    pub exec_sessions_total: u64,
    /// Port-forward data/error stream pairs currently forwarding.
    pub port_forward_streams_open: u64,
    /// Port-forward stream pairs ever started.
    pub port_forward_streams_total: u64,
    /// Port-forward dials that failed.
    pub port_forward_dial_errors_total: u64,
    /// Bytes copied client -> target by port-forward.
    pub port_forward_bytes_to_target: u64,
    /// Bytes copied target -> client by port-forward.
    pub port_forward_bytes_from_target: u64,
    /// WebSocket upgrade attempts answered with 400 (so kubectl falls back to SPDY).
    pub websocket_upgrades_refused_total: u64,
    /// Client-certificate common names seen on the HTTPS port, with connection counts.
    pub https_client_common_names: BTreeMap<String, u64>,
    /// Last terminal size received on a resize stream.
    pub last_terminal_size: Option<TerminalSize>,
    /// The most recent finished exec/attach sessions, oldest first.
    pub exec_history: Vec<ExecRecord>,
}

#[derive(Default)]
struct Locked {
    follow_by_container: BTreeMap<String, u64>,
    client_cns: BTreeMap<String, u64>,
    last_terminal_size: Option<TerminalSize>,
    exec_history: VecDeque<ExecRecord>,
}

/// Live counters shared by all connections.
#[derive(Default)]
pub struct State {
    /// See [`StateSnapshot::https_requests_total`].
    pub https_requests: AtomicU64,
    /// See [`StateSnapshot::read_only_requests_total`].
    pub read_only_requests: AtomicU64,
    follow_open: AtomicU64,
    follow_total: AtomicU64,
    /// See [`StateSnapshot::log_lines_pushed_total`].
    pub log_lines_pushed: AtomicU64,
    spdy_open: AtomicU64,
    spdy_total: AtomicU64,
    exec_open: AtomicU64,
    exec_total: AtomicU64,
    pf_open: AtomicU64,
    pf_total: AtomicU64,
    /// See [`StateSnapshot::port_forward_dial_errors_total`].
    pub pf_dial_errors: AtomicU64,
    /// See [`StateSnapshot::port_forward_bytes_to_target`].
    pub pf_bytes_to_target: AtomicU64,
    /// See [`StateSnapshot::port_forward_bytes_from_target`].
    pub pf_bytes_from_target: AtomicU64,
    /// See [`StateSnapshot::websocket_upgrades_refused_total`].
    pub websocket_refused: AtomicU64,
    locked: Mutex<Locked>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

/// Which gauge a [`Gauge`] guard holds up.
#[derive(Debug, Clone, Copy)]
pub enum GaugeKind {
    /// Upgraded SPDY connections.
    Spdy,
    /// Exec/attach sessions.
    Exec,
    /// Port-forward stream pairs.
    PortForward,
}

/// Increments a gauge (and its total) on creation, decrements it on drop.
#[derive(Debug)]
pub struct Gauge {
    state: Arc<State>,
    kind: GaugeKind,
}

/// Holds one open follow stream for a container; decrements the counters on drop.
#[derive(Debug)]
pub struct FollowGuard {
    state: Arc<State>,
    container: String,
}

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.state.follow_open.fetch_sub(1, Ordering::SeqCst);
        let mut l = self.state.lock();
        if let Some(n) = l.follow_by_container.get_mut(&self.container) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                l.follow_by_container.remove(&self.container);
            }
        }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.state.gauge(self.kind).0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.locked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gauge(&self, kind: GaugeKind) -> (&AtomicU64, &AtomicU64) {
        match kind {
            GaugeKind::Spdy => (&self.spdy_open, &self.spdy_total),
            GaugeKind::Exec => (&self.exec_open, &self.exec_total),
            GaugeKind::PortForward => (&self.pf_open, &self.pf_total),
        }
    }

    /// Starts counting one open item of `kind` until the guard drops.
    pub fn open(self: &Arc<Self>, kind: GaugeKind) -> Gauge {
        let (open, total) = self.gauge(kind);
        open.fetch_add(1, Ordering::SeqCst);
        total.fetch_add(1, Ordering::SeqCst);
        Gauge {
            state: self.clone(),
            kind,
        }
    }

    /// Starts counting one follow stream for `container` (`ns/pod/name`).
    pub fn open_follow(self: &Arc<Self>, container: &str) -> FollowGuard {
        self.follow_open.fetch_add(1, Ordering::SeqCst);
        self.follow_total.fetch_add(1, Ordering::SeqCst);
        *self
            .lock()
            .follow_by_container
            .entry(container.to_string())
            .or_insert(0) += 1;
        FollowGuard {
            state: self.clone(),
            container: container.to_string(),
        }
    }

    /// Follow streams open right now.
    pub fn follow_streams_open(&self) -> u64 {
        self.follow_open.load(Ordering::SeqCst)
    }

    /// Records a client certificate common name.
    pub fn record_client(&self, cn: &str) {
        *self.lock().client_cns.entry(cn.to_string()).or_insert(0) += 1;
    }

    /// Records the latest terminal size.
    pub fn record_terminal_size(&self, size: TerminalSize) {
        self.lock().last_terminal_size = Some(size);
    }

    /// Appends a finished exec/attach session to the history.
    pub fn record_exec(&self, rec: ExecRecord) {
        let mut l = self.lock();
        if l.exec_history.len() >= HISTORY {
            l.exec_history.pop_front();
        }
        l.exec_history.push_back(rec);
    }

    /// A consistent-enough copy of everything.
    pub fn snapshot(&self) -> StateSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let l = self.lock();
        StateSnapshot {
            https_requests_total: get(&self.https_requests),
            read_only_requests_total: get(&self.read_only_requests),
            follow_streams_open: get(&self.follow_open),
            follow_streams_total: get(&self.follow_total),
            follow_streams_by_container: l.follow_by_container.clone(),
            log_lines_pushed_total: get(&self.log_lines_pushed),
            spdy_connections_open: get(&self.spdy_open),
            spdy_connections_total: get(&self.spdy_total),
            exec_sessions_open: get(&self.exec_open),
            exec_sessions_total: get(&self.exec_total),
            port_forward_streams_open: get(&self.pf_open),
            port_forward_streams_total: get(&self.pf_total),
            port_forward_dial_errors_total: get(&self.pf_dial_errors),
            port_forward_bytes_to_target: get(&self.pf_bytes_to_target),
            port_forward_bytes_from_target: get(&self.pf_bytes_from_target),
            websocket_upgrades_refused_total: get(&self.websocket_refused),
            https_client_common_names: l.client_cns.clone(),
            last_terminal_size: l.last_terminal_size,
            exec_history: l.exec_history.iter().cloned().collect(),
        }
    }
}
