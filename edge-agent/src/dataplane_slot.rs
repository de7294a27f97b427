//! Where the agent's data plane is while it runs: unset until Flannel's device is there (the
//! agent may start before flanneld), the last reason it could not open, and what links learned
//! before it opened (their tunnels, the latest view and the site), handed over when it does.
//!
//! A link may be welcomed just before the data plane opens and see its view just after, so
//! the hand-over and every link's report go through one lock, under which a view is also set
//! on the open data plane: a tunnel, a view or a site reaches the data plane exactly once,
//! either kept here and handed over by [`DataplaneSlot::opened`] or given to the open data
//! plane, and a view checked before another is never set after it. (Before, a tunnel welcomed
//! in that window was never registered: every frame went to another hub, or with one hub
//! nowhere.)

use std::sync::{Arc, Mutex, OnceLock};

use crate::dataplane::AgentDataplane;

/// What the slot hands to an open data plane ([`AgentDataplane`]; a recording fake in tests).
pub trait Plane {
    type Tunnel: Clone;
    fn same_tunnel(a: &Self::Tunnel, b: &Self::Tunnel) -> bool;
    fn set_site(&self, site: &str);
    fn set_active(&self, hub: &str, tunnel: &Self::Tunnel);
    fn clear_active(&self, tunnel: &Self::Tunnel);
    fn set_view(&self, view: &petrel_proto::HubView);
    fn has_view(&self) -> bool;
    fn apply_error(&self) -> Option<String>;
}

impl Plane for AgentDataplane {
    type Tunnel = quinn::Connection;
    fn same_tunnel(a: &quinn::Connection, b: &quinn::Connection) -> bool {
        a.stable_id() == b.stable_id()
    }
    fn set_site(&self, site: &str) {
        AgentDataplane::set_site(self, site);
    }
    fn set_active(&self, hub: &str, tunnel: &quinn::Connection) {
        AgentDataplane::set_active(self, hub, tunnel);
    }
    fn clear_active(&self, tunnel: &quinn::Connection) {
        AgentDataplane::clear_active(self, tunnel);
    }
    fn set_view(&self, view: &petrel_proto::HubView) {
        AgentDataplane::set_view(self, view);
    }
    fn has_view(&self) -> bool {
        AgentDataplane::has_view(self)
    }
    fn apply_error(&self) -> Option<String> {
        AgentDataplane::apply_error(self)
    }
}

/// What links learned before the data plane opened.
#[derive(Debug)]
struct BeforeOpen<T> {
    /// Tunnels by hub name.
    tunnels: Vec<(String, T)>,
    view: Option<petrel_proto::HubView>,
    /// This node's site, from the hubs' welcome (which hub owns it, with active-active hubs).
    site: Option<String>,
}

impl<T> Default for BeforeOpen<T> {
    fn default() -> Self {
        Self {
            tunnels: Vec::new(),
            view: None,
            site: None,
        }
    }
}

#[derive(Debug)]
pub struct DataplaneSlot<D: Plane = AgentDataplane> {
    /// Whether a data plane was asked for (not `--hooks none`).
    wanted: bool,
    dataplane: OnceLock<Arc<D>>,
    /// Why the data plane could not be opened yet (e.g. `flannel.1` missing).
    error: Mutex<Option<String>>,
    /// Held while the data plane is published and while links report to it.
    before_open: Mutex<BeforeOpen<D::Tunnel>>,
}

impl<D: Plane> DataplaneSlot<D> {
    pub fn new(wanted: bool) -> Self {
        Self {
            wanted,
            dataplane: OnceLock::new(),
            error: Mutex::new(None),
            before_open: Mutex::new(BeforeOpen::default()),
        }
    }

    pub fn get(&self) -> Option<&Arc<D>> {
        self.dataplane.get()
    }

    /// Opening failed (it is retried).
    pub fn set_error(&self, why: String) {
        if let Ok(mut e) = self.error.lock() {
            *e = Some(why);
        }
    }

    /// The data plane opened: what links left for it is handed over (the site, the tunnels and
    /// the view, in that order) and it is published. True when it was given a view: the caller
    /// then applies it to the kernel ([`AgentDataplane::reconcile_now`]).
    pub fn opened(&self, dp: Arc<D>) -> bool {
        let Ok(mut guard) = self.before_open.lock() else {
            let _ = self.dataplane.set(dp);
            return false;
        };
        let before = std::mem::take(&mut *guard);
        if let Some(site) = &before.site {
            dp.set_site(site);
        }
        for (hub, conn) in &before.tunnels {
            dp.set_active(hub, conn);
        }
        if let Some(view) = &before.view {
            dp.set_view(view);
        }
        let _ = self.dataplane.set(dp);
        drop(guard);
        if let Ok(mut e) = self.error.lock() {
            *e = None;
        }
        before.view.is_some()
    }

    /// This node's site, as a hub's welcome names it.
    pub fn set_site(&self, site: &str) {
        if let Ok(mut before) = self.before_open.lock() {
            match self.dataplane.get() {
                Some(dp) => dp.set_site(site),
                None => before.site = Some(site.to_string()),
            }
        }
    }

    /// A link's tunnel to `hub` is up (welcomed).
    pub fn tunnel_up(&self, hub: &str, conn: &D::Tunnel) {
        if let Ok(mut before) = self.before_open.lock() {
            match self.dataplane.get() {
                Some(dp) => dp.set_active(hub, conn),
                None => {
                    before.tunnels.retain(|(h, _)| h != hub);
                    before.tunnels.push((hub.to_string(), conn.clone()));
                }
            }
        }
    }

    /// A link's tunnel is down.
    pub fn tunnel_down(&self, conn: &D::Tunnel) {
        if let Ok(mut before) = self.before_open.lock() {
            match self.dataplane.get() {
                Some(dp) => dp.clear_active(conn),
                None => before.tunnels.retain(|(_, c)| !D::same_tunnel(c, conn)),
            }
        }
    }

    /// A hub's view. Kept while the data plane is not open (a view whose routes are still to
    /// come, `routes_known` false, only when there is none yet); else set on the data plane
    /// when it should be (with its routes, or when the data plane has no view at all), under
    /// the lock, so a routes-pending view checked before a synced one cannot be set after it.
    /// Returns the data plane that took it: the caller applies it to the kernel.
    pub fn view(&self, view: &petrel_proto::HubView, routes_known: bool) -> Option<Arc<D>> {
        let mut before = self.before_open.lock().ok()?;
        match self.dataplane.get() {
            Some(dp) if routes_known || !dp.has_view() => {
                dp.set_view(view);
                Some(dp.clone())
            }
            Some(_) => None,
            None => {
                if routes_known || before.view.is_none() {
                    before.view = Some(view.clone());
                }
                None
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Records what the slot handed over.
    #[derive(Default)]
    struct Recorder {
        site: Mutex<Option<String>>,
        active: Mutex<Vec<(String, u32)>>,
        views: Mutex<Vec<petrel_proto::HubView>>,
    }

    impl Plane for Recorder {
        type Tunnel = u32;
        fn same_tunnel(a: &u32, b: &u32) -> bool {
            a == b
        }
        fn set_site(&self, site: &str) {
            *self.site.lock().unwrap() = Some(site.into());
        }
        fn set_active(&self, hub: &str, tunnel: &u32) {
            let mut a = self.active.lock().unwrap();
            a.retain(|(h, _)| h != hub);
            a.push((hub.into(), *tunnel));
        }
        fn clear_active(&self, tunnel: &u32) {
            self.active.lock().unwrap().retain(|(_, t)| t != tunnel);
        }
        fn set_view(&self, view: &petrel_proto::HubView) {
            self.views.lock().unwrap().push(view.clone());
        }
        fn has_view(&self) -> bool {
            !self.views.lock().unwrap().is_empty()
        }
        fn apply_error(&self) -> Option<String> {
            None
        }
    }

    fn view_naming(hub: &str) -> petrel_proto::HubView {
        petrel_proto::HubView {
            gateways: vec![petrel_proto::control::GatewayEndpoint {
                name: hub.into(),
                host: "203.0.113.10".into(),
                port: 7443,
                active: true,
            }],
            routes: Vec::new(),
            site_mtu: 1380,
            egress: Default::default(),
            site_mtus: Vec::new(),
            routed_sites: Vec::new(),
            reconnect_spread_ms: 0,
        }
    }

    /// These tests call the slot from one thread: they pin down what is handed over and when,
    /// not the locking (which is what makes the same hold when links run at once).
    ///
    /// The race that left an agent without its first tunnel: welcomed before the data plane
    /// opened, its (routes-pending) view arriving after. The tunnel and the site are handed
    /// over, and the view goes to the open data plane, which had none.
    #[test]
    fn a_tunnel_welcomed_just_before_the_data_plane_opens_is_registered() {
        let slot: DataplaneSlot<Recorder> = DataplaneSlot::new(true);
        slot.set_site("site-b");
        slot.tunnel_up("gw-1", &1);
        let dp = Arc::new(Recorder::default());
        assert!(!slot.opened(dp.clone()), "no view was kept");
        assert_eq!(*dp.active.lock().unwrap(), vec![("gw-1".to_string(), 1)]);
        assert_eq!(dp.site.lock().unwrap().as_deref(), Some("site-b"));
        let to = slot.view(&view_naming("gw-1"), false).unwrap();
        assert!(Arc::ptr_eq(&to, &dp));
        assert_eq!(dp.views.lock().unwrap().len(), 1, "set by the slot");
        // After the open, tunnels go straight to the data plane, and away from it.
        slot.tunnel_up("gw-3", &3);
        slot.tunnel_down(&1);
        assert_eq!(*dp.active.lock().unwrap(), vec![("gw-3".to_string(), 3)]);
        assert_eq!(slot.problem(), None);
    }

    /// Before the open: a tunnel that went down is not handed over; a view with routes
    /// replaces a routes-pending one, a routes-pending one replaces nothing; after the open,
    /// a routes-pending view does not replace the data plane's view.
    #[test]
    fn what_links_learn_before_the_open_is_handed_over_once_and_latest_first() {
        let slot: DataplaneSlot<Recorder> = DataplaneSlot::new(true);
        slot.tunnel_up("gw-1", &1);
        slot.tunnel_up("gw-3", &3);
        slot.tunnel_down(&1);
        // A reconnect to the same hub replaces its tunnel.
        slot.tunnel_up("gw-3", &4);
        assert!(slot.view(&view_naming("pending-1"), false).is_none());
        assert!(slot.view(&view_naming("pending-2"), false).is_none());
        assert!(slot.view(&view_naming("synced"), true).is_none());
        assert!(slot.view(&view_naming("pending-3"), false).is_none());
        let dp = Arc::new(Recorder::default());
        assert!(slot.opened(dp.clone()));
        assert_eq!(*dp.active.lock().unwrap(), vec![("gw-3".to_string(), 4)]);
        let views = dp.views.lock().unwrap().clone();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].gateways[0].name, "synced");
        assert!(slot.view(&view_naming("pending-4"), false).is_none());
        assert!(slot.view(&view_naming("synced-2"), true).is_some());
        let names: Vec<String> = dp
            .views
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.gateways[0].name.clone())
            .collect();
        assert_eq!(names, ["synced", "synced-2"]);
    }

    #[test]
    fn a_data_plane_not_asked_for_is_no_problem_and_one_not_open_says_why() {
        assert_eq!(DataplaneSlot::<Recorder>::new(false).problem(), None);
        let slot: DataplaneSlot<Recorder> = DataplaneSlot::new(true);
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
