//! `petrel-loadgen`: N simulated agents in one process against one hub. Each has its own UDP
//! socket and quinn endpoint, its own key and a real node certificate signed with the hub's CA
//! (read from the hub's state directory), says hello on the control stream like the real agent,
//! answers the hub's pings, and reconnects with jittered backoff when its connection is lost
//! (a restarted hub answers the old connection IDs with a stateless reset, so that is at once).
//!
//! It prints one JSON line per `report_every` on stdout:
//! `{"t_s":..,"connected":..,"connects":..,"failures":..,"last_error":..}`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use petrel_proto::{ControlMessage, ALPN_TUNNEL};
use petrel_transport::control_stream::{ControlReader, ControlWriter};
use petrel_transport::pki::{CertificateAuthority, NodeKey};
use petrel_transport::quic::TransportTuning;
use petrel_transport::{quic, tls, HUB_SERVER_NAME};
use serde::Serialize;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadgenOpts {
    /// The hub's QUIC address.
    pub server: SocketAddr,
    /// The hub's state directory (`ca.crt`, `ca.key`).
    pub hub_state: PathBuf,
    /// Number of simulated agents.
    pub count: usize,
    /// Node names are `<prefix>-<index>` (index from 0, five digits).
    pub prefix: String,
    /// Handshakes in flight at once (the first connect; reconnects are not limited).
    pub parallel: usize,
    pub report_every: Duration,
    /// Stop after this long (`None`: until killed).
    pub run_for: Option<Duration>,
    /// Local address each agent's socket binds to.
    pub bind: SocketAddr,
    /// Certificate validity window start offset and length (for skewed-clock tests).
    pub cert_not_before_offset: Duration,
}

/// Counters shared by all simulated agents.
#[derive(Debug, Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub connects: AtomicU64,
    pub failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// One status line.
#[derive(Debug, Serialize)]
pub struct Line {
    pub t_s: f64,
    pub connected: u64,
    pub connects: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

/// Node names of a load run.
pub fn node_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:05}")
}

/// An inventory with `count` public nodes named like [`node_name`] in one site (no pod CIDRs, no
/// addresses: the hub's view for each stays small), plus whatever `base` holds.
pub fn inventory_toml(prefix: &str, count: usize) -> String {
    let mut s = format!("[[sites]]\nname = \"{prefix}-site\"\nkind = \"public\"\n");
    for i in 0..count {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"{}\"\nsite = \"{prefix}-site\"\n",
            node_name(prefix, i)
        ));
    }
    s
}

struct Identity {
    node: String,
    client: quinn::ClientConfig,
}

fn mint(ca: &CertificateAuthority, node: &str, offset: Duration) -> Result<Identity> {
    let key = NodeKey::generate()?;
    let now = SystemTime::now();
    let start = now.checked_sub(offset).unwrap_or(now);
    let cert = ca.sign_node_csr(&key.csr_der(node)?, node, start, Duration::from_secs(86400))?;
    let cfg = tls::agent_client_tls(
        ca.cert_der(),
        vec![cert.to_vec().into()],
        key.private_key_der(),
        ALPN_TUNNEL,
    )?;
    Ok(Identity {
        node: node.to_string(),
        // The agent's transport settings, except that a simulated agent serves no proxied
        // streams: quinn keeps state for every stream the peer may open (16,384 by default,
        // about 1.3 MiB per connection), which 10,000 of them in one process cannot afford.
        client: quic::client_config(
            cfg,
            &TransportTuning {
                max_concurrent_bidi_streams: 16,
                ..TransportTuning::default()
            },
        )?,
    })
}

fn endpoint(bind: SocketAddr) -> Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let mut cfg = quinn::EndpointConfig::default();
    // Small receive buffers: one endpoint per simulated agent.
    cfg.max_udp_payload_size(1500)?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(cfg, None, socket, runtime)?)
}

/// One session: connect, hello, serve pings until the connection ends.
async fn session(
    ep: &quinn::Endpoint,
    id: &Identity,
    server: SocketAddr,
    counters: &Counters,
    handshake: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), String> {
    let conn = ep
        .connect_with(id.client.clone(), server, HUB_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut writer = ControlWriter::new(send);
    let mut reader = ControlReader::new(recv);
    writer
        .send(&ControlMessage::Hello(crate::raw_agent::hello(&id.node)))
        .await
        .map_err(|e| e.to_string())?;
    match reader.next().await {
        Ok(Some(ControlMessage::Welcome(_))) => {}
        Ok(Some(other)) => {
            return Err(format!(
                "expected welcome, got {}; close reason: {:?}",
                other.name(),
                conn.close_reason().map(|r| r.to_string())
            ))
        }
        Ok(None) => return Err("hub finished the control stream".into()),
        Err(e) => {
            return Err(format!(
                "{e}; close reason: {:?}",
                conn.close_reason().map(|r| r.to_string())
            ))
        }
    }
    drop(handshake);
    counters.connected.fetch_add(1, Ordering::Relaxed);
    counters.connects.fetch_add(1, Ordering::Relaxed);
    let end = loop {
        match reader.next().await {
            Ok(Some(ControlMessage::Ping(p))) => {
                if let Err(e) = writer.send(&ControlMessage::Pong(p.pong())).await {
                    break e.to_string();
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break "hub finished the control stream".into(),
            Err(e) => {
                break conn
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| e.to_string())
            }
        }
    };
    counters.connected.fetch_sub(1, Ordering::Relaxed);
    Err(end)
}

fn jitter(max_ms: u64) -> Duration {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Duration::from_millis(u64::from(n) % max_ms.max(1))
}

/// Runs the simulated agents, printing status lines, until `run_for` passes.
pub async fn run(opts: LoadgenOpts, mut out: impl FnMut(&Line)) -> Result<()> {
    let crt = std::fs::read_to_string(opts.hub_state.join("ca.crt"))
        .with_context(|| format!("reading {}/ca.crt", opts.hub_state.display()))?;
    let key = std::fs::read_to_string(opts.hub_state.join("ca.key"))
        .with_context(|| format!("reading {}/ca.key", opts.hub_state.display()))?;
    let ca = Arc::new(CertificateAuthority::from_pem(&crt, &key)?);
    // Mint on both cores.
    let mut ids: Vec<Identity> = Vec::with_capacity(opts.count);
    let chunks: Vec<Vec<usize>> = {
        let all: Vec<usize> = (0..opts.count).collect();
        all.chunks(opts.count.div_ceil(2).max(1))
            .map(<[usize]>::to_vec)
            .collect()
    };
    let mut handles = Vec::new();
    for chunk in chunks {
        let (ca, prefix, off) = (ca.clone(), opts.prefix.clone(), opts.cert_not_before_offset);
        handles.push(tokio::task::spawn_blocking(move || {
            chunk
                .into_iter()
                .map(|i| mint(&ca, &node_name(&prefix, i), off))
                .collect::<Result<Vec<_>>>()
        }));
    }
    for h in handles {
        ids.extend(h.await??);
    }
    let counters = Arc::new(Counters::default());
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.parallel.max(1)));
    let start = Instant::now();
    for id in ids {
        let ep = endpoint(opts.bind)?;
        let (counters, sem, server) = (counters.clone(), sem.clone(), opts.server);
        tokio::spawn(async move {
            let mut first = true;
            let mut backoff = 100u64;
            loop {
                let permit = if first {
                    sem.clone().acquire_owned().await.ok()
                } else {
                    None
                };
                first = false;
                let t = Instant::now();
                if let Err(e) = session(&ep, &id, server, &counters, permit).await {
                    counters.failures.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = counters.last_error.lock() {
                        *l = Some(e);
                    }
                }
                // A session that lasted resets the backoff (the real agent does the same).
                if t.elapsed() > Duration::from_secs(10) {
                    backoff = 100;
                }
                tokio::time::sleep(Duration::from_millis(backoff / 2) + jitter(backoff)).await;
                backoff = (backoff * 2).min(2000);
            }
        });
    }
    loop {
        tokio::time::sleep(opts.report_every).await;
        let line = Line {
            t_s: start.elapsed().as_secs_f64(),
            connected: counters.connected.load(Ordering::Relaxed),
            connects: counters.connects.load(Ordering::Relaxed),
            failures: counters.failures.load(Ordering::Relaxed),
            last_error: counters.last_error.lock().ok().and_then(|l| l.clone()),
        };
        out(&line);
        if opts.run_for.is_some_and(|d| start.elapsed() >= d) {
            return Ok(());
        }
    }
}
