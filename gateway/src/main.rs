//! `petrel-gateway`: run the hub, create join tokens, show status.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Parser as _;
use petrel_gateway::config::{
    self, CaCommand, Cli, Command, ConfigError, HubConfig, StateArgs, StoreArgs, TokenCommand,
};
use petrel_gateway::hub::Hub;
use petrel_gateway::hub_store::HubStore;
use petrel_gateway::inventory::Inventory;
use petrel_gateway::k8s::pki::KubeStore;
use petrel_gateway::k8s::KubeSettings;
use petrel_gateway::kube_hub::KubeParts;
use petrel_gateway::pki_store::{CaStore, StateDir, TokenRecord, TokenStore};
use petrel_transport::setting_values;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// EX_USAGE: the configuration is wrong, retrying will not help.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    petrel_transport::process::set_build_info(petrel_transport::process::BuildInfo {
        binary: "petrel-gateway",
        version: env!("CARGO_PKG_VERSION"),
        // Set by `make image` and release builds (git rev-parse HEAD); empty otherwise.
        revision: option_env!("PETREL_GIT_REVISION").unwrap_or(""),
    });
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    let file = match config::load_file(cli.config.as_deref()) {
        Ok(f) => f,
        Err(e) => return config_error(&e),
    };
    init_logging(cli.log.as_deref().or(file.log.as_deref()));
    petrel_transport::tls::install_default_provider();
    let result = match cli.command {
        Command::Run(args) => {
            let state_given = args.state_dir.is_some() || file.state_dir.is_some();
            match HubConfig::from_args(*args, file) {
                Ok(cfg) => run(cfg, state_given),
                Err(e) => return config_error(&e),
            }
        }
        Command::Token(TokenCommand::Create(args)) => token_create(args, &file),
        Command::Token(TokenCommand::List(args)) => token_list(&args, &file),
        Command::Status(args) => status(args.admin_addr.or(file.admin_addr.clone()), args.json),
        Command::Node(args) => node(args, &file),
        Command::Cleanup(args) => match args.to_config() {
            Ok(cfg) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(petrel_datapath::cleanup_all(&cfg))
                        .map_err(anyhow::Error::from)
                })
                .map(|()| println!("removed Petrel's routes, rules and devices from this node")),
            Err(e) => return config_error(&e),
        },
        Command::Ca(CaCommand::Fingerprint(args)) => ca_fingerprint(&args, &file),
        Command::Revoke(args) => revoke(&args, &file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<ConfigError>() {
                return config_error(ce);
            }
            if let Some(f) = e.downcast_ref::<RunFailure>() {
                return f.report();
            }
            eprintln!("petrel-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("petrel-gateway: configuration error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging(filter: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or("info"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn state_dir(args: &StateArgs, file: &config::FileConfig) -> std::path::PathBuf {
    args.state_dir
        .clone()
        .or(file.state_dir.clone())
        .unwrap_or_else(|| setting_values::default_state_dir("gateway"))
}

fn load_inventory(path: Option<&std::path::Path>) -> anyhow::Result<Inventory> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read inventory {}", p.display()))?;
            Inventory::from_toml(&text, &p.display().to_string())?
        }
        None => Inventory::embedded_default()?,
    })
}

/// The warning every command prints when it falls back to the embedded demo inventory.
const DEMO_INVENTORY_WARNING: &str = "no inventory given (--inventory, PETREL_INVENTORY, `inventory` in --config, or --inventory-source kubernetes): using the EMBEDDED DEMO INVENTORY (the lab's nodes gw-1, cloud-1, edge-a1, ...); real nodes are unknown to it";

/// How an inventory source is named in logs.
fn inventory_source(kube: Option<&KubeSettings>, path: Option<&std::path::Path>) -> String {
    match (kube, path) {
        (Some(k), _) => format!(
            "kubernetes (Node objects; Lease and Secrets in namespace {})",
            k.namespace
        ),
        (None, Some(p)) => format!("file {}", p.display()),
        (None, None) => "embedded demo inventory".into(),
    }
}

/// Where the state directory came from, for the start-up log.
fn state_dir_origin(given: bool) -> &'static str {
    if given {
        "configured"
    } else if std::env::var_os("STATE_DIRECTORY").is_some() {
        "default: systemd StateDirectory"
    } else if setting_values::default_state_dir("x").starts_with("/var/lib/petrel") {
        "default for root (HOME and XDG_STATE_HOME are not used)"
    } else {
        "default for a non-root user (XDG_STATE_HOME or ~/.local/state)"
    }
}

/// Kubernetes mode of a one-shot command: its settings, if any.
fn kube_settings(
    args: &petrel_gateway::k8s::KubeArgs,
    file: &config::FileConfig,
) -> anyhow::Result<Option<KubeSettings>> {
    Ok(args.resolve(file.inventory_source.as_deref(), &file.kubernetes)?)
}

/// A client and the Secret store, with the CA loaded (created on first use).
async fn kube_store(
    settings: &KubeSettings,
) -> anyhow::Result<(
    kube::Client,
    KubeStore,
    petrel_transport::pki::CertificateAuthority,
)> {
    let client = petrel_gateway::k8s::client(settings).await?;
    let store = KubeStore::new(client.clone(), &settings.namespace, &settings.ca_secret);
    let ca = store.load_or_create_ca(SystemTime::now()).await?;
    Ok((client, store, ca))
}

/// An inventory of just this node, read from its Node object (`None` if it cannot be read or
/// translated: the relay then says what is missing).
async fn local_node_inventory(
    client: &kube::Client,
    settings: &KubeSettings,
    node: &str,
) -> Option<Inventory> {
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let kn = match petrel_gateway::k8s::bounded(std::time::Duration::from_secs(10), api.get(node))
        .await
    {
        Ok(kn) => kn,
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot read this hub's Node");
            return None;
        }
    };
    let mut index = petrel_gateway::k8s::translate::ClusterIndex::new(settings.keys.clone());
    index.apply(&kn);
    Some(index.inventory().clone())
}

fn run(cfg: HubConfig, state_given: bool) -> anyhow::Result<()> {
    // Every setting, egress included, was validated into `cfg` before any port is bound: a bad
    // value is a configuration error (64), never hidden behind a bind error.
    if cfg.kube.is_none() && cfg.inventory.is_none() {
        tracing::warn!("{DEMO_INVENTORY_WARNING}");
    }
    info!(
        inventory = %inventory_source(cfg.kube.as_ref(), cfg.inventory.as_deref()),
        state_dir = %cfg.state_dir.display(),
        state_dir_from = state_dir_origin(state_given),
        node = cfg.node_name.as_deref().unwrap_or("(none: loopback frames speak for no node)"),
        relay = %cfg.relay_listen,
        "hub configuration"
    );
    let inventory = if cfg.kube.is_some() {
        Inventory::default()
    } else {
        // A broken inventory file is a configuration error, not a crash.
        load_inventory(cfg.inventory.as_deref()).map_err(RunFailure::Inventory)?
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let admin_addr = cfg.admin_addr;
        let admin = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot bind admin address {admin_addr}"))?;
        let admin_addr = admin.local_addr().unwrap_or(admin_addr);
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("signal received; shutting down");
            signals.cancel();
        });
        let kube = cfg.kube.clone();
        let node_name = cfg.node_name.clone().unwrap_or_default();
        let inventory_path = cfg.inventory.clone();
        let egress_config = cfg.egress.clone();
        let (mut hub, kube_client) = match &kube {
            None => (Hub::bind(cfg, inventory)?, None),
            Some(settings) => {
                // The CA lives in a Secret: wait for the API server (a hub without it has no
                // inventory either).
                let mut last = String::new();
                let (client, store) = loop {
                    match kube_store(settings).await {
                        Ok((client, store, _)) => break (client, store),
                        Err(e) => {
                            let msg = format!("{e:#}");
                            if msg != last {
                                error!(error = %msg, "cannot load the hub CA from the API server; retrying");
                                last = msg;
                            }
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    }
                };
                // `--relay-listen auto` binds this node's underlay address: learn it from the
                // Node before binding (the node watcher fills in the rest of the inventory).
                let inventory = local_node_inventory(&client, settings, &node_name)
                    .await
                    .unwrap_or(inventory);
                (
                    Hub::bind_with(cfg, inventory, HubStore::Kube(Box::new(store)))?,
                    Some(client),
                )
            }
        };
        // Follows `petrel-gateway revoke` (another process) and closes revoked tunnels.
        let (revocation, store) = hub.revocation_parts();
        tokio::spawn(revocation.watch(store, shutdown.clone()));
        let metrics = hub.metrics();
        let kube_task = match (kube, kube_client) {
            (Some(settings), Some(client)) => KubeParts::from_hub(&mut hub).map(|parts| {
                tokio::spawn(petrel_gateway::kube_hub::run(
                    parts,
                    client,
                    settings,
                    node_name,
                    shutdown.clone(),
                ))
            }),
            _ => {
                // File mode: one hub, always the active one. A changed inventory file is
                // re-read and applied, so the expected agents are counted again every few
                // seconds.
                metrics.active.set(1);
                if let (Some(path), Some(writer)) = (inventory_path, hub.take_inventory_writer()) {
                    tokio::spawn(petrel_gateway::inventory_file::watch(
                        writer,
                        path,
                        shutdown.clone(),
                    ));
                }
                let (inventory, stop) = (hub.inventory(), shutdown.clone());
                tokio::spawn(async move {
                    loop {
                        metrics
                            .agents_expected
                            .set(petrel_gateway::metrics::public_site_nodes(
                                &inventory.snapshot(),
                            ));
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                        }
                    }
                });
                None
            }
        };
        let admin_task = tokio::spawn(petrel_transport::admin::serve(
            admin,
            hub.status(),
            shutdown.clone(),
        ));
        info!(admin = %admin_addr, "admin endpoint serving /metrics /healthz /readyz /status");
        let mut egress = tokio::spawn(petrel_gateway::egress::run(
            hub.egress_parts(),
            egress_config,
            shutdown.clone(),
        ));
        let hub_run = hub.run(shutdown.clone());
        tokio::pin!(hub_run);
        // An egress proxy that cannot start stops the hub at once (it was asked for, and a hub
        // without it would look healthy); otherwise it runs until shutdown like the hub.
        let egress_result = tokio::select! {
            () = &mut hub_run => {
                shutdown.cancel();
                egress.await
            }
            r = &mut egress => match r {
                Ok(Err(e)) => return Err(RunFailure::Egress(e).into()),
                r => {
                    hub_run.await;
                    shutdown.cancel();
                    r
                }
            },
        };
        match egress_result {
            Ok(Err(e)) => error!(error = %e, "egress proxy failed"),
            Err(e) => error!(error = %e, "egress proxy task failed"),
            Ok(Ok(())) => {}
        }
        shutdown.cancel();
        if let Some(t) = kube_task {
            // Releases the hub Lease; bounded: the API server may be gone.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        let _ = admin_task.await;
        Ok(())
    });
    if result.is_err() {
        // Stopped early (the egress proxy could not start): tasks still running are not waited
        // for, as an exit would not have.
        rt.shutdown_background();
    }
    result
}

/// Failures of `run` and `node` that `main` reports with their own exit status.
#[derive(Debug, thiserror::Error)]
enum RunFailure {
    /// The inventory file cannot be used: a configuration error (64).
    #[error("{0:#}")]
    Inventory(anyhow::Error),
    /// The egress proxy could not start: 1 for a listener that cannot bind, else 64.
    #[error("egress proxy: {0}")]
    Egress(petrel_gateway::egress::EgressError),
    /// This node cannot run the node role with this inventory: a configuration error (64).
    #[error(transparent)]
    NodeRole(petrel_gateway::node_role::NodeRoleError),
}

impl RunFailure {
    fn report(&self) -> ExitCode {
        match self {
            Self::Inventory(e) => {
                eprintln!("petrel-gateway: configuration error: {e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
            Self::NodeRole(e) => {
                eprintln!("petrel-gateway: configuration error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
            Self::Egress(e) => {
                eprintln!("petrel-gateway: egress proxy: {e}");
                match e {
                    petrel_gateway::egress::EgressError::Listen { .. } => ExitCode::FAILURE,
                    _ => ExitCode::from(EXIT_CONFIG),
                }
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

fn node(args: config::NodeArgs, file: &config::FileConfig) -> anyhow::Result<()> {
    let datapath = args.datapath.to_config()?;
    if !(576..=1450).contains(&args.site_mtu) {
        return Err(ConfigError::Invalid {
            field: "site-mtu",
            value: args.site_mtu.to_string(),
            allowed: "576 to 1450".into(),
        }
        .into());
    }
    // The config file's inventory settings apply to the node role as to the hub.
    let kube = args
        .kube
        .resolve(file.inventory_source.as_deref(), &file.kubernetes)?;
    let inventory_path = args.inventory.clone().or(file.inventory.clone());
    let admin_addr = setting_values::parse_socket_addr("admin-addr", &args.admin_addr)
        .map_err(ConfigError::from)?;
    if kube.is_none() && inventory_path.is_none() {
        tracing::warn!("{DEMO_INVENTORY_WARNING}");
    }
    info!(
        node = %args.node_name,
        inventory = %inventory_source(kube.as_ref(), inventory_path.as_deref()),
        hooks = %args.datapath.hooks,
        admin = %admin_addr,
        "node role configuration"
    );
    let status = petrel_gateway::node_role::NodeRoleStatus::new(&args.node_name);
    let cfg = petrel_gateway::node_role::NodeRoleConfig {
        node_name: args.node_name,
        hub_address: args.hub_address,
        hub_node: None,
        site_mtu: args.site_mtu,
        active_active: args.active_active,
        datapath,
        status: status.clone(),
    };
    // The admin server (probes, metrics) runs for the whole life of the node role.
    let serve_admin = move |shutdown: CancellationToken| async move {
        let listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot bind admin address {admin_addr}"))?;
        info!(admin = %listener.local_addr().unwrap_or(admin_addr), "admin endpoint serving /metrics /healthz /readyz /status");
        tokio::spawn(petrel_transport::admin::serve(listener, status, shutdown));
        anyhow::Ok(())
    };
    if let Some(settings) = kube {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(async move {
            let shutdown = CancellationToken::new();
            let signals = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                info!("signal received; removing the node's routes");
                signals.cancel();
            });
            serve_admin(shutdown.clone()).await?;
            let client = petrel_gateway::k8s::client(&settings).await?;
            petrel_gateway::k8s::node::run(client, settings, cfg, shutdown).await?;
            Ok(())
        });
    }
    let inventory = load_inventory(inventory_path.as_deref()).map_err(RunFailure::Inventory)?;
    petrel_gateway::node_role::desired_state(&inventory, &cfg).map_err(RunFailure::NodeRole)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("signal received; removing the node's routes");
            signals.cancel();
        });
        serve_admin(shutdown.clone()).await?;
        petrel_gateway::node_role::run(inventory, cfg, shutdown).await?;
        Ok(())
    })
}

fn token_create(args: config::TokenCreateArgs, file: &config::FileConfig) -> anyhow::Result<()> {
    let ttl = setting_values::parse_duration("ttl", &args.ttl).map_err(ConfigError::from)?;
    if let Some(pool) = &args.pool {
        return fleet_token_create(&args, pool, ttl, file);
    }
    let node = args.node.clone().unwrap_or_default();
    if !petrel_gateway::inventory::valid_node_name(&node) {
        return Err(ConfigError::Invalid {
            field: "node",
            value: node,
            allowed: "a Kubernetes node name (lowercase letters, digits, '-', '.')".into(),
        }
        .into());
    }
    let args = config::TokenCreateArgs {
        node: Some(node.clone()),
        ..args
    };
    let kube = kube_settings(&args.kube, file)?;
    // A token for a node the hub would refuse is a mistake (a typo, the wrong inventory):
    // refused unless --force.
    let refuse = |why: String| -> anyhow::Result<()> {
        if args.force {
            eprintln!("warning: {why}; creating the token anyway (--force)");
            Ok(())
        } else {
            anyhow::bail!("{why}. No token created; pass --force to create it anyway")
        }
    };
    if kube.is_none() {
        let path = args.inventory.clone().or(file.inventory.clone());
        let inventory = load_inventory(path.as_deref())?;
        if let Err(e) = inventory.admit_agent(&node) {
            let source = match &path {
                Some(p) => format!("the inventory {}", p.display()),
                None => "the EMBEDDED DEMO INVENTORY (no --inventory given; pass the hub's inventory file)".into(),
            };
            refuse(format!(
                "the hub would refuse this node: {e} (checked against {source})"
            ))?;
        }
    }
    let mut server_hint = args
        .server
        .clone()
        .or_else(|| file.advertise.first().cloned());
    let (ca, token) = match &kube {
        None => {
            let store = StateDir::new(state_dir(&args.state, file));
            let ca = store.load_or_create(SystemTime::now())?;
            let token = store.create(&node, ttl, !args.reusable, SystemTime::now())?;
            (ca, token)
        }
        Some(settings) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let (client, store, ca) = kube_store(settings).await?;
                if let Some(w) =
                    petrel_gateway::k8s::admission_warning(&client, settings, &node).await
                {
                    refuse(w)?;
                }
                if server_hint.is_none() {
                    server_hint = petrel_gateway::k8s::active_endpoint(&client, settings).await;
                }
                let token = store
                    .create_token(&node, ttl, !args.reusable, SystemTime::now())
                    .await?;
                anyhow::Ok((ca, token))
            })?,
    };
    let server = join_server(server_hint)?;
    println!(
        "# join token for node {} (expires {}, {})",
        token.node,
        humantime::format_rfc3339_seconds(token.expires),
        if token.single_use {
            "single use"
        } else {
            "reusable until it expires"
        }
    );
    if let Some(note) = agent_not_on_path_note() {
        eprintln!("{note}");
    }
    // The token goes into the environment, not the command line, where `ps` and the audit log
    // of every process on the device would show it.
    println!("export PETREL_JOIN_TOKEN={}", token.token);
    println!(
        "petrel-edge-agent join --server {server} --node-name {} --ca-sha256 {}",
        token.node,
        ca.fingerprint()
    );
    Ok(())
}

/// The hub address the printed join command names.
fn join_server(server_hint: Option<String>) -> anyhow::Result<String> {
    Ok(match server_hint {
        Some(s) => {
            setting_values::parse_host_port("server", &s).map_err(ConfigError::from)?;
            s
        }
        None => {
            let local = format!(
                "127.0.0.1:{}",
                config::DEFAULT_LISTEN.rsplit(':').next().unwrap_or("7443")
            );
            eprintln!(
                "note: no --server given and no `advertise` configured: the join command names {local}, which reaches a hub on this machine only; pass --server HOST:PORT (the address devices reach the hub at)"
            );
            local
        }
    })
}

/// `token create --pool`: a fleet token for any edge node of one node pool (site).
fn fleet_token_create(
    args: &config::TokenCreateArgs,
    pool: &str,
    ttl: std::time::Duration,
    file: &config::FileConfig,
) -> anyhow::Result<()> {
    if !petrel_gateway::inventory::valid_node_name(pool) {
        return Err(ConfigError::Invalid {
            field: "pool",
            value: pool.into(),
            allowed: "a node pool (site) name (lowercase letters, digits, '-', '.')".into(),
        }
        .into());
    }
    if !(1..=petrel_gateway::k8s::pki::MAX_FLEET_USES).contains(&args.max_uses) {
        return Err(ConfigError::Invalid {
            field: "max-uses",
            value: args.max_uses.to_string(),
            allowed: format!("1 to {}", petrel_gateway::k8s::pki::MAX_FLEET_USES),
        }
        .into());
    }
    let kube = kube_settings(&args.kube, file)?;
    let mut server_hint = args
        .server
        .clone()
        .or_else(|| file.advertise.first().cloned());
    let (ca, token) = match &kube {
        None => {
            let path = args.inventory.clone().or(file.inventory.clone());
            let inventory = load_inventory(path.as_deref())?;
            let public = inventory
                .site(pool)
                .is_some_and(|s| s.kind == petrel_gateway::inventory::SiteKind::Public);
            if !public && !args.force {
                anyhow::bail!("the inventory has no public site {pool:?}; no token created (pass --force to create it anyway)");
            }
            let store = StateDir::new(state_dir(&args.state, file));
            let ca = store.load_or_create(SystemTime::now())?;
            let token = store.create_fleet(pool, ttl, args.max_uses, SystemTime::now())?;
            (ca, token)
        }
        Some(settings) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let (client, store, ca) = kube_store(settings).await?;
                if server_hint.is_none() {
                    server_hint = petrel_gateway::k8s::active_endpoint(&client, settings).await;
                }
                let token = store
                    .create_fleet_token(pool, ttl, args.max_uses, SystemTime::now())
                    .await?;
                anyhow::Ok((ca, token))
            })?,
    };
    let server = join_server(server_hint)?;
    println!(
        "# fleet token for node pool {pool} (expires {}; enrols up to {} edge nodes of the pool, each once)",
        humantime::format_rfc3339_seconds(token.expires),
        args.max_uses
    );
    println!("export PETREL_JOIN_TOKEN={}", token.token);
    println!(
        "petrel-edge-agent join --server {server} --ca-sha256 {}   # --node-name defaults to the host name",
        ca.fingerprint()
    );
    Ok(())
}

/// `petrel-gateway revoke`: changes the stored list; every hub applies it within a second.
fn revoke(args: &config::RevokeArgs, file: &config::FileConfig) -> anyhow::Result<()> {
    use petrel_gateway::revocation;
    if let Some(node) = &args.node {
        if !petrel_gateway::inventory::valid_node_name(node) {
            return Err(ConfigError::Invalid {
                field: "node",
                value: node.clone(),
                allowed: "a Kubernetes node name (lowercase letters, digits, '-', '.')".into(),
            }
            .into());
        }
    } else if !args.list {
        return Err(ConfigError::Invalid {
            field: "node",
            value: String::new(),
            allowed: "a node name: pass --node NAME (or --list)".into(),
        }
        .into());
    }
    let now = SystemTime::now();
    let change = |list: &mut revocation::RevocationList| -> bool {
        match (&args.node, args.lift) {
            (Some(node), false) => {
                revocation::revoke(list, node, &args.reason, now);
                true
            }
            (Some(node), true) => revocation::lift(list, node, now),
            (None, _) => true,
        }
    };
    let (changed, list) = match kube_settings(&args.store.kube, file)? {
        None => {
            let store = revocation::FileRevocations::new(state_dir(&args.store.state, file));
            if args.list {
                (true, store.load()?)
            } else {
                store.update(change)?
            }
        }
        Some(settings) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let client = petrel_gateway::k8s::client(&settings).await?;
                let store = KubeStore::new(client, &settings.namespace, &settings.ca_secret);
                anyhow::Ok(if args.list {
                    (true, store.load_revocations().await?)
                } else {
                    store.update_revocations(change).await?
                })
            })?,
    };
    match (&args.node, args.lift) {
        (Some(node), false) => println!(
            "revoked node {node}: hubs close its tunnel and refuse its certificates within a second, and refuse to enrol it until `petrel-gateway revoke --node {node} --lift`"
        ),
        (Some(node), true) if changed => println!(
            "lifted the revocation of node {node}: it may enrol again (a new token or CSR); certificates issued before the revocation stay refused"
        ),
        (Some(node), true) => anyhow::bail!("node {node} is not revoked"),
        (None, _) => print!("{}", revocation::describe(&list)),
    }
    Ok(())
}

/// `petrel-gateway status` against a node role's admin port.
fn render_node_role(doc: &serde_json::Value) -> String {
    let s = |k: &str| doc[k].as_str().unwrap_or("-").to_string();
    let n = |k: &str| doc[k].as_u64().unwrap_or(0);
    let state = match doc["not_ready_reason"].as_str() {
        None => "ready".to_string(),
        Some(why) => format!("NOT READY: {why}"),
    };
    format!(
        "node role on {} (hooks: {}): {state}\nrelay {}, {} public-site pod CIDRs routed, {} repairs, {} failed applies\n",
        s("node"),
        s("hooks"),
        s("relay"),
        n("peers"),
        n("repairs"),
        n("apply_errors"),
    )
}

/// The printed join command names `petrel-edge-agent`; when this machine has none on its PATH
/// (a build tree, a hub host), say where one is, or that the command is for the device.
fn agent_not_on_path_note() -> Option<String> {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("petrel-edge-agent").is_file()));
    if on_path {
        return None;
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("petrel-edge-agent")))
        .filter(|p| p.is_file());
    Some(match sibling {
        Some(p) => format!(
            "note: petrel-edge-agent is not on this machine's PATH; here it is {} (run the command below with that path, or on the device where the agent is installed)",
            p.display()
        ),
        None => "note: petrel-edge-agent is not on this machine's PATH: run the command below on the edge device, where deploy/edge/install.sh puts it in /usr/local/bin".into(),
    })
}

fn ca_fingerprint(args: &StoreArgs, file: &config::FileConfig) -> anyhow::Result<()> {
    let ca = match kube_settings(&args.kube, file)? {
        None => StateDir::new(state_dir(&args.state, file)).load_or_create(SystemTime::now())?,
        Some(settings) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async { anyhow::Ok(kube_store(&settings).await?.2) })?,
    };
    println!("{}", ca.fingerprint());
    Ok(())
}

fn token_list(args: &StoreArgs, file: &config::FileConfig) -> anyhow::Result<()> {
    let tokens: std::collections::BTreeMap<String, TokenRecord> =
        match kube_settings(&args.kube, file)? {
            None => StateDir::new(state_dir(&args.state, file)).list()?,
            Some(settings) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let client = petrel_gateway::k8s::client(&settings).await?;
                    let store = KubeStore::new(client, &settings.namespace, &settings.ca_secret);
                    anyhow::Ok(store.list_tokens().await?)
                })?,
        };
    println!(
        "{:<8} {:<24} {:<22} {:<10} USED",
        "ID", "NODE", "EXPIRES", "USE"
    );
    for (id, t) in tokens {
        let exp = humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.expires_unix),
        );
        // A fleet token shows its pool and how many of its nodes enrolled.
        let (scope, usage) = match &t.pool {
            Some(pool) => (
                format!(
                    "pool:{pool} {}/{}",
                    t.used_by.len(),
                    t.max_uses.unwrap_or(0)
                ),
                "fleet",
            ),
            None => (
                t.node.clone(),
                if t.single_use { "single" } else { "reusable" },
            ),
        };
        println!(
            "{id:<8} {scope:<24} {:<22} {usage:<10} {}",
            exp.to_string(),
            t.used_unix.map(|_| "yes").unwrap_or("no")
        );
    }
    Ok(())
}

fn status(admin_addr: Option<String>, json: bool) -> anyhow::Result<()> {
    let addr = setting_values::parse_socket_addr(
        "admin-addr",
        admin_addr.as_deref().unwrap_or(config::DEFAULT_ADMIN),
    )
    .map_err(ConfigError::from)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (code, body) = rt.block_on(petrel_transport::admin::get(addr, "/status"))?;
    if !code.is_success() {
        anyhow::bail!("hub admin endpoint answered {code}: {body}");
    }
    if json {
        println!("{body}");
    } else {
        let doc: serde_json::Value =
            serde_json::from_str(&body).context("hub /status is not JSON")?;
        if doc["role"] == "node" {
            // A node role's admin port (petrel-gateway node, 9472).
            print!("{}", render_node_role(&doc));
        } else {
            print!(
                "{}",
                petrel_gateway::status::render(&doc, SystemTime::now())
            );
        }
    }
    Ok(())
}
