//! `petrel-standin-kubelet`: a stand-in kubelet HTTPS server for Petrel's end-to-end tests.
//!
//! Prints `listening https on ADDR` (and `listening read-only on ADDR`) on stdout once ready,
//! then serves until SIGINT or SIGTERM.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use petrel_standin_kubelet::{Config, PemSource, PodSpec, TlsSettings};

/// A stand-in kubelet: logs, exec, attach and port-forward over HTTPS/SPDY for tests.
#[derive(Debug, Parser)]
#[command(name = "petrel-standin-kubelet", version)]
struct Args {
    /// HTTPS listen address (port 0 picks a free port).
    #[arg(long, default_value = "0.0.0.0:10250", env = "STANDIN_KUBELET_ADDRESS")]
    address: SocketAddr,
    /// Serving certificate (PEM, leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// Serving private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Require client certificates signed by this CA (PEM), like kubelet --client-ca-file.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Plain-HTTP read-only port on the same IP as --address (/healthz, /metrics, /pods,
    /// /standin/state, POST /standin/log/NS/POD/CONTAINER). 0 picks a free port.
    #[arg(long)]
    read_only_port: Option<u16>,
    /// Period of generated lines in follow streams, in milliseconds (0: only pushed lines).
    #[arg(long, default_value_t = 100)]
    follow_interval_ms: u64,
    /// Deterministic lines each container log starts with.
    #[arg(long, default_value_t = 10)]
    log_lines: usize,
    /// Seconds exec/port-forward clients have to create their streams.
    #[arg(long, default_value_t = 30)]
    stream_creation_timeout_secs: u64,
    /// Pod listed by /pods, as NAMESPACE/NAME[:CONTAINER,...] (repeatable).
    #[arg(long = "pod")]
    pods: Vec<PodSpec>,
    /// Node name reported by /pods and /metrics.
    #[arg(long, default_value = "standin-node")]
    node_name: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = Config::new(
        args.address,
        TlsSettings {
            cert: PemSource::File(args.cert),
            key: PemSource::File(args.key),
            client_ca: args.client_ca.map(PemSource::File),
        },
    );
    config.read_only_address = args
        .read_only_port
        .map(|p| SocketAddr::new(args.address.ip(), p));
    config.follow_interval = Duration::from_millis(args.follow_interval_ms);
    config.initial_log_lines = args.log_lines;
    config.stream_creation_timeout = Duration::from_secs(args.stream_creation_timeout_secs);
    config.pods = args.pods;
    config.node_name = args.node_name;

    let running = match petrel_standin_kubelet::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("petrel-standin-kubelet: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening https on {}", running.https_addr());
        if let Some(a) = running.read_only_addr() {
            let _ = writeln!(out, "listening read-only on {a}");
        }
        let _ = out.flush();
    }
    wait_for_signal().await;
    running.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
