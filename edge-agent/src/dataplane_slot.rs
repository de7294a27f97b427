//! Where the agent's data plane is while it runs: unset until Flannel's device is there (the
//! agent may start before flanneld), the last reason it could not open, and what links learned
//! before it opened (their tunnels and the latest view), handed over when it does.

use std::sync::{Arc, Mutex, OnceLock};

use crate::dataplane::AgentDataplane;

/// Tunnels (hub, connection) and the latest view, kept for a data plane that is not open yet.
pub type PendingView = (
    Vec<(String, quinn::Connection)>,
    Option<petrel_proto::HubView>,
);

#[derive(Debug, Default)]
pub struct DataplaneSlot {
    /// Whether a data plane was asked for (not `--hooks none`).
    wanted: bool,
    dataplane: OnceLock<Arc<AgentDataplane>>,
    /// Why the data plane could not be opened yet (e.g. `flannel.1` missing).
    error: Mutex<Option<String>>,
    pending: Mutex<PendingView>,
    /// This node's site, from the hubs' welcome (which hub owns it, with active-active hubs).
    site: Mutex<Option<String>>,
}

impl DataplaneSlot {
    pub fn new(wanted: bool) -> Self {
        Self {
            wanted,
            ..Default::default()
        }
    }

    pub fn get(&self) -> Option<&Arc<AgentDataplane>> {
        self.dataplane.get()
    }

    /// Opening failed (it is retried).
    pub fn set_error(&self, why: String) {
        if let Ok(mut e) = self.error.lock() {
            *e = Some(why);
        }
    }

    /// The data plane opened: it is kept, and what links left for it is returned.
    pub fn opened(&self, dp: Arc<AgentDataplane>) -> PendingView {
        if let Some(site) = self.site.lock().ok().and_then(|s| s.clone()) {
            dp.set_site(&site);
        }
        let _ = self.dataplane.set(dp);
        if let Ok(mut e) = self.error.lock() {
            *e = None;
        }
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// This node's site, as a hub's welcome names it: kept, and given to the data plane.
    pub fn set_site(&self, site: &str) {
        if let Ok(mut s) = self.site.lock() {
            *s = Some(site.to_string());
        }
        if let Some(dp) = self.dataplane.get() {
            dp.set_site(site);
        }
    }

    /// Remembers the tunnel to `hub` and the latest hub view for a data plane that is not
    /// open yet.
    /// A view whose routes are still to come (`routes_known` false) is kept only when there is
    /// none yet.
    pub fn remember_view(
        &self,
        hub: &str,
        conn: &quinn::Connection,
        view: &petrel_proto::HubView,
        routes_known: bool,
    ) {
        if let Ok(mut p) = self.pending.lock() {
            p.0.retain(|(h, _)| h != hub);
            p.0.push((hub.to_string(), conn.clone()));
            if routes_known || p.1.is_none() {
                p.1 = Some(view.clone());
            }
        }
    }

    /// Why the data plane is not doing its job, when one was asked for.
    pub fn problem(&self) -> Option<String> {
        if !self.wanted {
            return None;
        }
        match self.dataplane.get() {
            Some(dp) => dp.apply_error(),
            None => Some(format!(
                "data plane not ready: {}",
                self.error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .unwrap_or_else(|| "still opening".into())
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_plane_not_asked_for_is_no_problem_and_one_not_open_says_why() {
        assert_eq!(DataplaneSlot::new(false).problem(), None);
        let slot = DataplaneSlot::new(true);
        assert_eq!(
            slot.problem().as_deref(),
            Some("data plane not ready: still opening")
        );
        slot.set_error("flannel.1 not found".into());
        assert_eq!(
            slot.problem().as_deref(),
            Some("data plane not ready: flannel.1 not found")
        );
        assert!(slot.get().is_none());
    }
}
