//! `petrel-loadgen`: N simulated agents in one process against one hub. Each has its own key
//! and a real node certificate signed with the hub's CA (read from the hub's state directory),
//! and runs the real agent's link loop without a dataplane: a connect attempt with a 3 s
//! timeout, hello, then pings every 2 s, answers to the hub's pings, the hub declared dead
//! after 5 s of silence, and jittered exponential backoff (100 ms to 2 s) between attempts. A
//! restarted hub answers the old connection IDs with a stateless reset, so agents notice on
//! their next packet.
//!
//! Where the simulation differs from a fleet, it is to spend less of the two cores the hub
//! being measured runs on; none changes what the hub does per agent:
//! - The agents of a site (100, as in [`inventory_toml`]) share one UDP socket and quinn
//!   endpoint, at one address per site, as a NAT'd site's nodes share its public address (the
//!   real agent has a socket of its own and opens a fresh one per attempt). One endpoint per
//!   agent meant 10,000 sockets and endpoint tasks; in a reconnect storm this process then used
//!   more CPU than the hub (issue 11, session 17: 8.4-10.6 s against the hub's 7.5-9.1 s).
//! - The hub's certificate is verified once and then recognised, and its handshake signature
//!   is not checked ([`KnownHub`]).
//! - Route chunks are decoded once per process ([`ChunkDigests`]).
//!
//! It prints one JSON line per `report_every` on stdout:
//! `{"t_s":..,"connected":..,"connects":..,"failures":..,"last_error":..,"failure_kinds":{..}}`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use petrel_proto::codec::RawFrame;
use petrel_proto::control::{decode_body, msg_type};
use petrel_proto::{
    Backoff, BackoffPolicy, ControlMessage, DecodeError, Keepalive, KeepaliveAction, ALPN_TUNNEL,
};
use petrel_transport::control_stream::{ControlReader, ControlWriter, StreamError};
use petrel_transport::pki::{CertificateAuthority, NodeKey};
use petrel_transport::quic::TransportTuning;
use petrel_transport::{close_code, quic, tls, HUB_SERVER_NAME};
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
    /// Failures by kind (the message up to its first digit: durations and addresses vary).
    pub failure_kinds: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Agents by the digest of the route table they hold: the bench waits for every agent to
    /// hold the hub's new table before it measures the next step.
    pub tables: Mutex<std::collections::HashMap<u64, u64>>,
}

impl Counters {
    /// An agent now holds the table with digest `now` (and no longer the one with `was`).
    fn hold_table(&self, was: Option<u64>, now: u64) {
        if let Ok(mut t) = self.tables.lock() {
            if let Some(n) = was.and_then(|was| t.get_mut(&was)) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.retain(|_, n| *n > 0);
                }
            }
            *t.entry(now).or_default() += 1;
        }
    }

    /// The route tables the most agents hold (at most four), by hex digest.
    fn largest_tables(&self) -> std::collections::BTreeMap<String, u64> {
        let mut held: Vec<(u64, u64)> = self
            .tables
            .lock()
            .map(|t| t.iter().map(|(d, n)| (*d, *n)).collect())
            .unwrap_or_default();
        held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        held.into_iter()
            .take(4)
            .map(|(d, n)| (format!("{d:016x}"), n))
            .collect()
    }
}

/// One status line.
#[derive(Debug, Serialize)]
pub struct Line {
    pub t_s: f64,
    pub connected: u64,
    pub connects: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Failures so far by kind: a session lost ("reset by peer": the hub restarted) or a
    /// connect attempt that failed ("no answer within", "invalid Retry Token", ...).
    pub failure_kinds: std::collections::BTreeMap<String, u64>,
    /// Agents by the route table they hold (hex digest; the four most held).
    pub tables: std::collections::BTreeMap<String, u64>,
}

/// Node names of a load run.
pub fn node_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:05}")
}

/// An inventory with `count` public nodes named like [`node_name`] in one site (no pod CIDRs, no
/// addresses: the hub's view for each stays small), plus whatever `base` holds.
pub fn inventory_toml(prefix: &str, count: usize) -> String {
    inventory_toml_with(prefix, count, None)
}

/// The inventory of `count` simulated agents, each a real Flannel node (a pod CIDR, a VtepMAC
/// and a public IP), so the hub's cluster route table has one entry per node. `moved` gives
/// that node another public IP (an inventory change that touches one node).
pub fn inventory_toml_with(prefix: &str, count: usize, moved: Option<usize>) -> String {
    // Sites of 100 nodes, as edge clusters have many small sites: each agent's view carries
    // its own site's egress policy.
    let mut s = String::new();
    for site in 0..count.div_ceil(SITE_SIZE) {
        s.push_str(&format!(
            "[[sites]]\nname = \"{prefix}-site-{site}\"\nkind = \"public\"\n\n"
        ));
    }
    for i in 0..count {
        let (hi, lo) = ((i >> 8) & 0xff, i & 0xff);
        let public = if moved == Some(i) {
            "198.51.100.7".to_string()
        } else {
            format!("100.64.{hi}.{lo}")
        };
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"{}\"\nsite = \"{prefix}-site-{}\"\npod_cidrs = [\"10.{hi}.{lo}.0/24\"]\n\
             vtep_mac = \"02:cc:00:{hi:02x}:{lo:02x}:01\"\npublic_ip = \"{public}\"\n",
            node_name(prefix, i),
            i / SITE_SIZE
        ));
    }
    s
}

/// Simulated agents per site.
const SITE_SIZE: usize = 100;

struct Identity {
    node: String,
    client: quinn::ClientConfig,
}

/// How the simulated agents check the hub, shared by all of them. The hub's certificate chain
/// is verified in full (webpki, against the hub's CA) the first time a certificate is seen, and
/// recognised byte for byte after that; the hub's TLS 1.3 handshake signature is not checked.
/// Both are the agents' CPU, not the hub's: a real fleet spends it on 10,000 machines, and here
/// it came out of the two cores the hub being measured runs on (12% of this process's CPU in a
/// reconnect storm, two ECDSA verifications per attempt). The hub's side of every handshake is
/// unchanged: it still signs, and still verifies each agent's certificate and signature.
#[derive(Debug)]
struct KnownHub {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    /// Hub certificates verified once (a hub restarted from the same state presents the same).
    verified: Mutex<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

impl KnownHub {
    fn new(ca: &CertificateAuthority) -> Result<Self> {
        Ok(Self {
            webpki: petrel_e2e::raw_agent::hub_certificate_check(ca.cert_der())?,
            verified: Mutex::new(Vec::new()),
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for KnownHub {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let known = |v: &Vec<rustls::pki_types::CertificateDer<'static>>| {
            v.iter().any(|c| c.as_ref() == end_entity.as_ref())
        };
        if self.verified.lock().is_ok_and(|v| known(&v)) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        let ok = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Ok(mut v) = self.verified.lock() {
            if v.len() < 16 && !known(&v) {
                v.push(end_entity.clone().into_owned());
            }
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn mint(
    ca: &CertificateAuthority,
    hub: &Arc<KnownHub>,
    node: &str,
    offset: Duration,
) -> Result<Identity> {
    let key = NodeKey::generate()?;
    let now = SystemTime::now();
    let start = now.checked_sub(offset).unwrap_or(now);
    let cert = ca.sign_node_csr(&key.csr_der(node)?, node, start, Duration::from_secs(86400))?;
    let mut cfg = tls::agent_client_tls(
        ca.cert_der(),
        vec![cert.to_vec().into()],
        key.private_key_der(),
        ALPN_TUNNEL,
    )?;
    cfg.dangerous().set_certificate_verifier(hub.clone());
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

/// Where the agents of site `site` bind: on loopback each site gets its own address
/// (127.100.x.y), as a NAT'd edge site's nodes share its public address, so the hub's
/// per-address budgets see a fleet of sites and not one source; any other bind address is used
/// as given.
fn site_bind(bind: SocketAddr, site: usize) -> SocketAddr {
    match bind.ip() {
        std::net::IpAddr::V4(v4) if v4 == std::net::Ipv4Addr::LOCALHOST => SocketAddr::from((
            [
                127,
                100,
                ((site / 250) & 0xff) as u8,
                (1 + site % 250) as u8,
            ],
            bind.port(),
        )),
        _ => bind,
    }
}

fn endpoint(bind: SocketAddr) -> Result<quinn::Endpoint> {
    // The agent's socket (`quic::client_socket`: bound, kernel buffers asked for like the agent;
    // a buffer size is a limit, not an allocation).
    let socket = quic::client_socket(bind)?;
    let mut cfg = quinn::EndpointConfig::default();
    // Small userspace receive buffers: one endpoint per simulated site.
    cfg.max_udp_payload_size(1500)?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(cfg, None, socket, runtime)?)
}

/// The real agent's link settings (`petrel-edge-agent` defaults, `edge-agent/src/link.rs`):
/// application ping every 2 s, hub declared dead after 5 s of silence, a connect attempt (QUIC
/// handshake to Welcome) gives up after 3 s, reconnect backoff 100 ms doubling to 2 s with
/// jitter (half the base plus up to the other half), reset after a session of 10 s; after a
/// hub lost without a goodbye, the first attempt no sooner than a random share of the hub's
/// reconnect spread, counted from the last word heard.
const PING_INTERVAL: Duration = Duration::from_secs(2);
const DEAD_AFTER: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection, its control stream, and the welcome's reconnect spread.
type Connected = (quinn::Connection, ControlWriter, SimReader, Duration);

/// The digests that route chunks carry, by chunk: every agent is sent the same encoded chunks
/// (the hub encodes the table once), so each distinct chunk is decoded once per process.
#[derive(Default)]
struct ChunkDigests(Mutex<std::collections::HashMap<(usize, u64), Option<u64>>>);

impl ChunkDigests {
    fn digest_of(&self, frame: RawFrame<'_>) -> Result<Option<u64>, DecodeError> {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        frame.body.hash(&mut h);
        let key = (frame.body.len(), h.finish());
        if let Some(d) = self.0.lock().ok().and_then(|m| m.get(&key).copied()) {
            return Ok(d);
        }
        let digest = match decode_body(frame)? {
            ControlMessage::Routes(chunk) => chunk.digest,
            _ => None,
        };
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= 4096 {
                m.clear();
            }
            m.insert(key, digest);
        }
        Ok(digest)
    }
}

/// The agent's control-stream reader, except for route chunks: a simulated agent keeps only
/// the digest a batch ends with, so it takes it from [`ChunkDigests`] instead of decoding
/// every chunk itself. Decoding 10,000 copies of a 470 KB snapshot in this one process was
/// 40% of its CPU in the 10,000-agent run, and the hub's own agents decode theirs on their own
/// machines. Every other message is decoded in full, like the agent does.
struct SimReader {
    reader: ControlReader,
    digests: Arc<ChunkDigests>,
}

impl SimReader {
    fn new(recv: quinn::RecvStream, digests: Arc<ChunkDigests>) -> Self {
        Self {
            reader: ControlReader::new(recv),
            digests,
        }
    }

    /// The next message; a route chunk comes back with only its digest. Cancel-safe.
    async fn next(&mut self) -> Result<Option<ControlMessage>, StreamError> {
        let digests = &self.digests;
        self.reader
            .next_with(|f| {
                if f.msg_type == msg_type::ROUTES {
                    Ok(ControlMessage::Routes(petrel_proto::RouteSync {
                        digest: digests.digest_of(f)?,
                        ..Default::default()
                    }))
                } else {
                    decode_body(f)
                }
            })
            .await
    }
}

/// Why a simulated agent's connect attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectFailure {
    #[error(transparent)]
    Dial(#[from] quinn::ConnectError),
    #[error("{0}")]
    NoAnswer(quic::DialError),
    #[error("no welcome within {0:?} of the answer")]
    NoWelcome(Duration),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error("{error}; close reason: {close:?}")]
    Stream {
        error: StreamError,
        close: Option<quinn::ConnectionError>,
    },
    #[error("expected welcome, got {got}; close reason: {close:?}")]
    Unexpected {
        got: &'static str,
        close: Option<quinn::ConnectionError>,
    },
    #[error("hub finished the control stream")]
    Finished,
}

/// One connect attempt like the agent's: the handshake, hello, welcome.
async fn connect(
    ep: &quinn::Endpoint,
    id: &Identity,
    server: SocketAddr,
    digests: &Arc<ChunkDigests>,
    routes_digest: u64,
) -> Result<Connected, ConnectFailure> {
    let mut connecting = ep.connect_with(id.client.clone(), server, HUB_SERVER_NAME)?;
    // The agent's two bounds: an answer within CONNECT_TIMEOUT, then ADMITTED_GRACE.
    quic::await_answer(&mut connecting, CONNECT_TIMEOUT)
        .await
        .map_err(ConnectFailure::NoAnswer)?;
    tokio::time::timeout(
        quic::ADMITTED_GRACE,
        welcome(connecting, id, digests, routes_digest),
    )
    .await
    .map_err(|_| ConnectFailure::NoWelcome(quic::ADMITTED_GRACE))?
}

async fn welcome(
    connecting: quinn::Connecting,
    id: &Identity,
    digests: &Arc<ChunkDigests>,
    routes_digest: u64,
) -> Result<Connected, ConnectFailure> {
    let conn = connecting.await?;
    let (send, recv) = conn.open_bi().await?;
    let mut writer = ControlWriter::new(send);
    let mut reader = SimReader::new(recv, digests.clone());
    // Route sync like the real agent; a simulated agent keeps only the digest the hub
    // confirms (not 10,000 tables in one process), which is what it presents next time.
    let hello = petrel_proto::Hello {
        routes_digest: Some(routes_digest),
        ..petrel_e2e::raw_agent::hello(&id.node)
    };
    let stream_failed = |error, conn: &quinn::Connection| ConnectFailure::Stream {
        error,
        close: conn.close_reason(),
    };
    writer
        .send(&ControlMessage::Hello(hello))
        .await
        .map_err(|e| stream_failed(e, &conn))?;
    match reader.next().await {
        Ok(Some(ControlMessage::Welcome(w))) => {
            let spread = w.view.reconnect_spread();
            Ok((conn, writer, reader, spread))
        }
        Ok(Some(other)) => Err(ConnectFailure::Unexpected {
            got: other.name(),
            close: conn.close_reason(),
        }),
        Ok(None) => Err(ConnectFailure::Finished),
        Err(e) => Err(stream_failed(e, &conn)),
    }
}

/// How a session ended: lost, or the hub said when to come back.
enum End {
    Lost(String),
    GoingAway { retry_after: Duration, why: String },
}

/// The agent's session loop: answer pings, ping the hub, give up on silence.
async fn session(
    conn: &quinn::Connection,
    writer: &mut ControlWriter,
    reader: &mut SimReader,
    routes_digest: &mut u64,
    spread: &mut Duration,
    counters: &Counters,
) -> (End, Instant) {
    let mut keepalive = Keepalive::new(PING_INTERVAL, DEAD_AFTER, Instant::now());
    let mut deadline = tokio::time::Instant::now();
    let end = loop {
        tokio::select! {
            // Reader first: when the loop wakes late (CPU starvation at 10,000 sessions) with a
            // message waiting *and* the keepalive deadline past, the message must count before
            // the keepalive decides the hub is silent.
            biased;
            msg = reader.next() => {
                keepalive.on_receive(Instant::now());
                match msg {
                    Ok(Some(ControlMessage::Ping(p))) => {
                        if let Err(e) = writer.send(&ControlMessage::Pong(p.pong())).await {
                            break End::Lost(e.to_string());
                        }
                    }
                    Ok(Some(ControlMessage::Pong(p))) => {
                        keepalive.on_pong(&p, Instant::now());
                    }
                    Ok(Some(ControlMessage::Routes(chunk))) => {
                        if let Some(d) = chunk.digest {
                            counters.hold_table(Some(*routes_digest), d);
                            *routes_digest = d;
                        }
                    }
                    Ok(Some(ControlMessage::Update(view))) => {
                        *spread = view.reconnect_spread();
                    }
                    Ok(Some(ControlMessage::GoingAway(ga))) => {
                        break End::GoingAway {
                            retry_after: Duration::from_millis(u64::from(ga.retry_after_ms)),
                            why: ga.message,
                        };
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break End::Lost("hub finished the control stream".into()),
                    Err(e) => {
                        break End::Lost(
                            conn.close_reason()
                                .map(|r| r.to_string())
                                .unwrap_or_else(|| e.to_string()),
                        )
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => match keepalive.poll(Instant::now()) {
                KeepaliveAction::SendPing(ping) => {
                    if let Err(e) = writer.send(&ControlMessage::Ping(ping)).await {
                        break End::Lost(e.to_string());
                    }
                    deadline = tokio::time::Instant::now();
                }
                KeepaliveAction::TimedOut => {
                    conn.close(close_code::KEEPALIVE_TIMEOUT.into(), b"hub unresponsive");
                    break End::Lost(format!("hub silent for {DEAD_AFTER:?}"));
                }
                // The real agent also wakes at least once a second (to check its certificate for
                // renewal); a simulated one has nothing to renew, so 10,000 of them sleep until
                // the keepalive's next deadline.
                KeepaliveAction::Wait(at) => deadline = tokio::time::Instant::from_std(at),
            },
            closed = conn.closed() => break End::Lost(closed.to_string()),
        }
    };
    (end, keepalive.last_receive())
}

/// A small per-agent PRNG for backoff jitter (splitmix64): independent streams per agent, so a
/// fleet that lost its hub at the same instant does not come back in lockstep.
struct Jitter(u64);

impl Jitter {
    fn new(i: usize) -> Self {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter(t ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fraction(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn record_failure(counters: &Counters, e: String) {
    counters.failures.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut k) = counters.failure_kinds.lock() {
        let kind: String = e
            .chars()
            .take_while(|c| !c.is_ascii_digit())
            .take(80)
            .collect();
        *k.entry(kind.trim_end().to_string()).or_default() += 1;
    }
    if let Ok(mut l) = counters.last_error.lock() {
        *l = Some(e);
    }
}

/// One simulated agent, forever: the real agent's `link::run` without a dataplane.
async fn agent(
    i: usize,
    id: Identity,
    endpoint: quinn::Endpoint,
    server: SocketAddr,
    counters: Arc<Counters>,
    digests: Arc<ChunkDigests>,
    mut first: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut backoff = Backoff::new(BackoffPolicy::agent_reconnect(Duration::from_secs(2)));
    let mut rng = Jitter::new(i);
    let mut delay = Duration::ZERO;
    let mut routes_digest = petrel_proto::RouteTable::new().digest();
    counters.hold_table(None, routes_digest);
    loop {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let attempt = connect(&endpoint, &id, server, &digests, routes_digest).await;
        drop(first.take());
        let (conn, mut writer, mut reader, mut spread) = match attempt {
            Ok(v) => v,
            Err(e) => {
                record_failure(&counters, e.to_string());
                delay = backoff.next_delay(rng.next());
                continue;
            }
        };
        backoff.on_connected(Instant::now());
        counters.connected.fetch_add(1, Ordering::Relaxed);
        counters.connects.fetch_add(1, Ordering::Relaxed);
        let (end, last_heard) = session(
            &conn,
            &mut writer,
            &mut reader,
            &mut routes_digest,
            &mut spread,
            &counters,
        )
        .await;
        counters.connected.fetch_sub(1, Ordering::Relaxed);
        backoff.on_disconnected(Instant::now());
        match end {
            End::Lost(why) => {
                record_failure(&counters, why);
                // As the real agent: the first attempt waits for its share of the hub's
                // reconnect spread, counted from the last word heard.
                let herd =
                    petrel_proto::backoff::herd_delay(spread, last_heard.elapsed(), rng.fraction());
                delay = backoff.next_delay(rng.next()).max(herd);
            }
            End::GoingAway { retry_after, why } => {
                record_failure(&counters, format!("hub going away: {why}"));
                let spread = (retry_after / 4).max(Duration::from_millis(100));
                delay = retry_after + spread.mul_f64(rng.fraction());
            }
        }
        conn.close(close_code::NORMAL.into(), b"reconnecting");
    }
}

/// Runs the simulated agents, printing status lines, until `run_for` passes.
pub async fn run(opts: LoadgenOpts, mut out: impl FnMut(&Line)) -> Result<()> {
    let crt = std::fs::read_to_string(opts.hub_state.join("ca.crt"))
        .with_context(|| format!("reading {}/ca.crt", opts.hub_state.display()))?;
    let key = std::fs::read_to_string(opts.hub_state.join("ca.key"))
        .with_context(|| format!("reading {}/ca.key", opts.hub_state.display()))?;
    let ca = Arc::new(CertificateAuthority::from_pem(&crt, &key)?);
    let hub = Arc::new(KnownHub::new(&ca)?);
    // Mint on both cores: each half of the index range on its own blocking thread.
    let mut ids: Vec<Identity> = Vec::with_capacity(opts.count);
    let half = opts.count.div_ceil(2);
    let mut handles = Vec::new();
    for range in [0..half, half..opts.count] {
        let (ca, prefix, off) = (ca.clone(), opts.prefix.clone(), opts.cert_not_before_offset);
        let hub = hub.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            range
                .map(|i| mint(&ca, &hub, &node_name(&prefix, i), off))
                .collect::<Result<Vec<_>>>()
        }));
    }
    for h in handles {
        ids.extend(h.await??);
    }
    let counters = Arc::new(Counters::default());
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.parallel.max(1)));
    let digests = Arc::new(ChunkDigests::default());
    let endpoints = (0..opts.count.div_ceil(SITE_SIZE))
        .map(|site| endpoint(site_bind(opts.bind, site)))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    for (i, id) in ids.into_iter().enumerate() {
        let (counters, sem, server) = (counters.clone(), sem.clone(), opts.server);
        let digests = digests.clone();
        let endpoint = endpoints[i / SITE_SIZE].clone();
        tokio::spawn(async move {
            // The first connect waits for a slot (the bench's ramp); reconnects do not.
            let permit = sem.acquire_owned().await.ok();
            agent(i, id, endpoint, server, counters, digests, permit).await;
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
            failure_kinds: counters
                .failure_kinds
                .lock()
                .map(|k| k.clone())
                .unwrap_or_default(),
            tables: counters.largest_tables(),
        };
        out(&line);
        if opts.run_for.is_some_and(|d| start.elapsed() >= d) {
            return Ok(());
        }
    }
}
