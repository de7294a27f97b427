//! Whether this hub takes new tunnels and enrolments. In file mode it always does; in
//! Kubernetes mode only once the node list has arrived and while this node is a cloud gateway.
//! Stopping tells every connected agent to go away (and when to come back), so agents move to
//! another hub at once instead of waiting for a keepalive to fail.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use petrel_proto::{GoingAway, GoingAwayReason};
use petrel_transport::close_code;
use tracing::{info, warn};

use crate::agent_registry::{AgentRegistry, SessionCommand};

/// Why a hub does not accept new tunnels and enrolments (Kubernetes mode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServing {
    #[error("waiting for the node list from the API server")]
    Starting,
    #[error("node {node} is not a cloud gateway (it needs the label {label} and must not be an edge node)")]
    NotCandidate { node: String, label: String },
    #[error("hub state lock poisoned")]
    LockPoisoned,
}

#[derive(Debug)]
pub struct ServingGate {
    state: RwLock<Result<(), NotServing>>,
    registry: Arc<AgentRegistry>,
    /// When agents sent away should come back.
    restart_hint: Duration,
}

impl ServingGate {
    /// A gate that serves, telling agents of `registry` to go away when it stops.
    pub fn new(registry: Arc<AgentRegistry>, restart_hint: Duration) -> Self {
        Self {
            state: RwLock::new(Ok(())),
            registry,
            restart_hint,
        }
    }

    /// Whether new tunnels are accepted (`Err` says why not).
    pub fn serving(&self) -> Result<(), NotServing> {
        self.state
            .read()
            .map(|s| s.clone())
            .unwrap_or(Err(NotServing::LockPoisoned))
    }

    /// Starts or stops serving. Stopping tells every connected agent to go away.
    pub fn set(&self, serving: Result<(), NotServing>) {
        let was = self.serving();
        if let Ok(mut s) = self.state.write() {
            *s = serving.clone();
        }
        match (&was, &serving) {
            (Ok(()), Err(why)) => {
                if self.registry.is_empty() {
                    info!(reason = %why, "hub not serving");
                } else {
                    warn!(reason = %why, "hub stops serving; telling agents to go away");
                }
                let retry_after_ms =
                    u32::try_from(self.restart_hint.as_millis()).unwrap_or(u32::MAX);
                let why = why.to_string();
                for agent in self.registry.all() {
                    let leave = GoingAway {
                        reason: GoingAwayReason::Shutdown,
                        retry_after_ms,
                        message: why.clone(),
                    };
                    if agent
                        .commands
                        .try_send(SessionCommand::Leave(leave))
                        .is_err()
                    {
                        agent
                            .connection
                            .close(close_code::GOING_AWAY.into(), why.as_bytes());
                    }
                }
            }
            (Err(_), Ok(())) => info!("hub serving"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_gate_says_why_it_is_closed_and_opens_again() {
        let gate = ServingGate::new(Arc::default(), Duration::from_secs(5));
        assert_eq!(gate.serving(), Ok(()));
        gate.set(Err(NotServing::Starting));
        assert_eq!(gate.serving(), Err(NotServing::Starting));
        let not = NotServing::NotCandidate {
            node: "cloud-1".into(),
            label: "node-role.alibabacloud.com/cloud-gateway".into(),
        };
        gate.set(Err(not.clone()));
        assert_eq!(gate.serving(), Err(not));
        gate.set(Ok(()));
        assert_eq!(gate.serving(), Ok(()));
    }
}
