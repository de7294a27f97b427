//! The running agent's supervisor: keeps one [`crate::link`] per known hub endpoint (from
//! config, from the state directory, and from the lists hubs push), opens the data plane, and
//! hands the admin server the shared state ([`crate::shared`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::AgentConfig;
use crate::identity::{AgentState, IdentityError};
use crate::links::LinkState;
use crate::shared::AgentShared;

/// A prepared agent.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<AgentShared>,
    endpoint_rx: mpsc::UnboundedReceiver<String>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Result<Self, IdentityError> {
        let state = AgentState::new(&config.state_dir);
        let identity = state.load()?;
        let (tx, endpoint_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(AgentShared::new(config, state, identity, tx));
        Ok(Self {
            shared,
            endpoint_rx,
        })
    }

    pub fn shared(&self) -> Arc<AgentShared> {
        self.shared.clone()
    }

    /// Runs links until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let shared = self.shared.clone();
        let mut endpoints: BTreeSet<String> = shared.credentials.state.known_endpoints();
        endpoints.extend(
            shared
                .config
                .servers
                .iter()
                .map(|(h, p)| format!("{h}:{p}")),
        );
        if endpoints.is_empty() {
            warn!("no hub endpoints known; pass --server HOST:PORT or run join");
        }
        info!(node = %shared.credentials.identity().node_name(), endpoints = ?endpoints, "agent starting");
        let dataplane = shared
            .config
            .datapath
            .clone()
            .map(|cfg| tokio::spawn(open_dataplane(shared.clone(), cfg, shutdown.clone())));
        let mut links = JoinSet::new();
        let mut started = BTreeSet::new();
        for ep in endpoints {
            spawn_link(&mut links, &mut started, &shared, ep, &shutdown);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(ep) = self.endpoint_rx.recv() => spawn_link(&mut links, &mut started, &shared, ep, &shutdown),
            }
        }
        while links.join_next().await.is_some() {}
        if let Some(task) = dataplane {
            let _ = task.await;
        }
        if let Some(dp) = shared.dataplane.get() {
            dp.cleanup().await;
        }
        info!("agent stopped");
    }
}

/// Opens the data plane, waiting for Flannel's device if it is not there yet (the agent may
/// start before flanneld), then runs capture and reconcile until `shutdown`.
async fn open_dataplane(
    shared: Arc<AgentShared>,
    cfg: petrel_datapath::DatapathConfig,
    shutdown: CancellationToken,
) {
    let mut last_error = String::new();
    let dp = loop {
        match crate::dataplane::AgentDataplane::open(cfg.clone()).await {
            Ok(dp) => {
                let path = |p: &str| {
                    shared
                        .metrics
                        .direct
                        .bytes_sent
                        .get_or_create(&crate::metrics::PathLabel { path: p.into() })
                        .clone()
                };
                dp.count_peer_bytes(path("direct"), path("hub"));
                break dp;
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    warn!(error = %msg, "data plane not ready; retrying every 2s");
                    shared.dataplane.set_error(msg.clone());
                    last_error = msg;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    };
    info!(hooks = %dp.mode(), vtep_mac = %petrel_datapath::format_mac(&dp.vtep_mac()), "data plane ready");
    // A link that connected before the data plane was ready left its view here.
    if shared.dataplane.opened(dp.clone()) {
        dp.reconcile_now().await;
    }
    let capture = tokio::spawn(dp.clone().run_capture(shutdown.clone()));
    let silence = tokio::spawn(dp.clone().run_silence_watch(shutdown.clone()));
    dp.clone().run_reconcile(shutdown).await;
    let _ = capture.await;
    let _ = silence.await;
}

fn spawn_link(
    links: &mut JoinSet<()>,
    started: &mut BTreeSet<String>,
    shared: &Arc<AgentShared>,
    endpoint: String,
    shutdown: &CancellationToken,
) {
    if !started.insert(endpoint.clone()) {
        return;
    }
    shared
        .links
        .update(&endpoint, |l| l.state = LinkState::Connecting);
    let span = tracing::info_span!("link", endpoint = %endpoint);
    links.spawn(crate::link::run(shared.clone(), endpoint, shutdown.clone()).instrument(span));
}
