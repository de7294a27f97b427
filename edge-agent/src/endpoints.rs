//! Hub endpoints the agent learns from its hubs' views: a new one is persisted in the state
//! directory (so a restarted agent dials it at once) and handed to the supervisor, which starts
//! a link for it.

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::identity::AgentState;

#[derive(Debug)]
pub struct EndpointBook {
    state: AgentState,
    new_endpoints: mpsc::UnboundedSender<String>,
}

impl EndpointBook {
    /// Endpoints learned are saved in `state` and sent to `new_endpoints`.
    pub fn new(state: AgentState, new_endpoints: mpsc::UnboundedSender<String>) -> Self {
        Self {
            state,
            new_endpoints,
        }
    }

    /// Learns endpoints a hub pushed; new ones are persisted and get a link.
    pub fn learn(&self, endpoints: impl IntoIterator<Item = String>) {
        let mut known = self.state.known_endpoints();
        let mut added = Vec::new();
        for ep in endpoints {
            if known.insert(ep.clone()) {
                added.push(ep);
            }
        }
        if added.is_empty() {
            return;
        }
        if let Err(e) = self.state.save_endpoints(&known) {
            warn!(error = %e, "cannot persist learned hub endpoints");
        }
        for ep in added {
            info!(endpoint = %ep, "learned a new hub endpoint");
            let _ = self.new_endpoints.send(ep);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_new_endpoints_are_saved_and_get_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let book = EndpointBook::new(AgentState::new(dir.path()), tx);
        book.learn(["192.0.2.10:7443".to_string(), "192.0.2.11:7443".to_string()]);
        book.learn(["192.0.2.11:7443".to_string()]);
        let mut got = vec![];
        while let Ok(ep) = rx.try_recv() {
            got.push(ep);
        }
        assert_eq!(got, ["192.0.2.10:7443", "192.0.2.11:7443"]);
        let saved = AgentState::new(dir.path()).known_endpoints();
        assert_eq!(saved.len(), 2);
        assert!(saved.contains("192.0.2.11:7443"));
    }
}
