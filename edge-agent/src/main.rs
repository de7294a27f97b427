//! `petrel-edge-agent`: join, run, status.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Parser as _;
use petrel_edge_agent::agent::Agent;
use petrel_edge_agent::config::{self, AgentConfig, Cli, Command, ConfigError, JoinConfig};
use petrel_edge_agent::identity::IdentityError;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    petrel_transport::process::set_build_info(petrel_transport::process::BuildInfo {
        binary: "petrel-edge-agent",
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
    let filter = cli
        .log
        .clone()
        .or(file.log.clone())
        .unwrap_or_else(|| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    petrel_transport::tls::install_default_provider();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("petrel-edge-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = match cli.command {
        Command::Join(args) => match JoinConfig::from_args(args, &file) {
            Ok(cfg) => rt.block_on(async {
                let joined = petrel_edge_agent::join::join(&cfg).await?;
                if joined.already {
                    println!(
                        "already enrolled as node {} (certificate valid until {}); nothing to do",
                        joined.node_name,
                        humantime::format_rfc3339_seconds(joined.not_after)
                    );
                } else {
                    println!(
                        "enrolled as node {}; certificate valid until {}; identity stored in {}",
                        joined.node_name,
                        humantime::format_rfc3339_seconds(joined.not_after),
                        cfg.state_dir.display()
                    );
                    println!(
                        "start the agent with: petrel-edge-agent run --state-dir {}",
                        cfg.state_dir.display()
                    );
                }
                Ok(())
            }),
            Err(e) => return config_error(&e),
        },
        Command::Run(args) => match AgentConfig::from_args(*args, file) {
            Ok(cfg) => rt.block_on(run(cfg)),
            Err(e) => return config_error(&e),
        },
        Command::Status(args) => {
            rt.block_on(status(args.admin_addr.or(file.admin_addr), args.json))
        }
        Command::Cleanup(args) => match args.to_config(&file) {
            Ok(Some(cfg)) => rt
                .block_on(petrel_datapath::cleanup_all(&cfg))
                .map(|()| println!("removed Petrel's routes, rules and devices from this node"))
                .map_err(Into::into),
            Ok(None) => Ok(()),
            Err(e) => return config_error(&e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(IdentityError::NotEnrolled(_)) = e.downcast_ref::<IdentityError>() {
                eprintln!("petrel-edge-agent: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("petrel-edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("petrel-edge-agent: configuration error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    if let Some(k) = &cfg.kube_enrol {
        // Zero-touch: a device with no valid certificate asks the cluster for one. A restart
        // with a valid identity on the host does not enrol again.
        let state = petrel_edge_agent::identity::AgentState::new(&cfg.state_dir);
        if petrel_edge_agent::kube_enrol::needs_enrolment(&state, &k.node_name, SystemTime::now())?
        {
            let not_after = petrel_edge_agent::kube_enrol::enrol(k, &state).await?;
            info!(node = %k.node_name, valid_until = %humantime::format_rfc3339_seconds(not_after), "enrolled");
        }
    }
    let admin_addr = cfg.admin_addr;
    let agent = Agent::new(cfg)?;
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot bind admin address {admin_addr}"))?;
    let admin_addr = admin.local_addr().unwrap_or(admin_addr);
    let shutdown = CancellationToken::new();
    let admin_task = tokio::spawn(petrel_transport::admin::serve(
        admin,
        agent.shared(),
        shutdown.clone(),
    ));
    info!(admin = %admin_addr, "admin endpoint serving /metrics /healthz /readyz /status");
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                info!("signal received; stopping");
                signals.cancel();
            }
            _ => error!("cannot install signal handlers"),
        }
    });
    agent.run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = admin_task.await;
    Ok(())
}

async fn status(admin: Option<String>, json: bool) -> anyhow::Result<()> {
    let raw = admin.unwrap_or_else(|| config::DEFAULT_ADMIN.into());
    let addr = petrel_transport::setting_values::parse_socket_addr("admin-addr", &raw)
        .map_err(ConfigError::from)?;
    let (code, body) = petrel_transport::admin::get(addr, "/status").await?;
    if !code.is_success() {
        anyhow::bail!("agent admin endpoint answered {code}: {body}");
    }
    if json {
        println!("{body}");
    } else {
        let doc: serde_json::Value =
            serde_json::from_str(&body).context("agent /status is not JSON")?;
        print!(
            "{}",
            petrel_edge_agent::status::render(&doc, SystemTime::now())
        );
    }
    Ok(())
}
