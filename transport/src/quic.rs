//! QUIC transport parameters and endpoints. Both ends take their timers from here so that a hub
//! and an agent of the same release agree on keepalive and idle timeout, and stream windows are
//! sized for WAN round trips (a 100 ms path at 100 Mbit/s needs ~1.25 MB in flight per stream).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{EndpointConfig, TransportConfig, VarInt};

/// Which congestion controller quinn runs on a tunnel connection (each end governs what it
/// sends). BBR is the default: edge sites reach the hub over the public internet, where random
/// loss that is not congestion is normal, and a loss-based controller collapses there — in the
/// benchmark's 100 ms / 1 % loss WAN a proxied stream got 1.3 Mbit/s with Cubic and 125 Mbit/s
/// with BBR, while on the clean lab path both carry the same ~2.2 Gbit/s (docs/performance.md).
/// Cubic (quinn's own default, like Linux TCP's classic default) and NewReno stay selectable for
/// paths where the tunnel must yield to other loss-based traffic; quinn calls its BBR
/// experimental, which is why the choice is a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionControl {
    Cubic,
    NewReno,
    #[default]
    Bbr,
}

/// Timers and windows of a Petrel QUIC connection.
#[derive(Debug, Clone)]
pub struct TransportTuning {
    /// QUIC PING cadence; also keeps NAT mappings alive (most home/enterprise NATs drop idle UDP
    /// mappings after 30 s or more).
    pub keep_alive: Duration,
    /// A connection that hears nothing for this long is dead.
    pub idle_timeout: Duration,
    /// Initial RTT estimate before the first sample. quinn's default (333 ms) makes the first
    /// Initial retransmit wait ~1 s; a lower guess makes reconnects after a hub restart faster,
    /// at the cost of a spurious Initial retransmit on very long paths.
    pub initial_rtt: Duration,
    pub stream_receive_window: u32,
    pub connection_receive_window: u32,
    /// Most unacknowledged data this end has in flight on the connection.
    pub send_window: u64,
    pub max_concurrent_bidi_streams: u32,
    pub max_concurrent_uni_streams: u32,
    pub datagram_buffer: usize,
    pub congestion: CongestionControl,
    /// Send up to ten packets per system call (UDP generic segmentation offload). quinn keeps a
    /// transmit buffer of ten packets per connection for it (~13 KiB, measured with heaptrack on
    /// the hub), so a hub with many mostly idle tunnels may trade relay throughput for memory.
    pub segmentation_offload: bool,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            initial_rtt: Duration::from_millis(100),
            stream_receive_window: 4 << 20,
            connection_receive_window: 64 << 20,
            send_window: 64 << 20,
            max_concurrent_bidi_streams: 16_384,
            max_concurrent_uni_streams: 16,
            datagram_buffer: 8 << 20,
            congestion: CongestionControl::default(),
            segmentation_offload: true,
        }
    }
}

/// What a hub connection gets before it has proved anything. Transport parameters are fixed
/// when quinn accepts a handshake, before the ALPN (tunnel or enrolment) or any token is known,
/// so every connection starts with these; a tunnel is raised to [`AuthenticatedLimits`] once its
/// node is admitted. Memory a peer can make the hub hold for it is bounded by the connection
/// receive window (stream data, in order or not) and by the datagrams the hub has not read yet,
/// which the hub drains and discards on connections that are not tunnels.
#[derive(Debug, Clone, Copy)]
pub struct PreAuthLimits {
    /// Connection-level flow-control window: the most stream data a peer may send that the hub
    /// has not read. An enrolment request (token, node name, CSR) is read as it arrives, so
    /// this bounds buffering, not the request's size.
    pub connection_receive_window: u32,
    /// Bidirectional streams the peer may open (the control or enrolment stream).
    pub bidi_streams: u32,
}

impl Default for PreAuthLimits {
    fn default() -> Self {
        Self {
            connection_receive_window: 16 << 10,
            bidi_streams: 1,
        }
    }
}

/// What an admitted tunnel gets: windows sized for what it carries (proxied streams from the
/// agent, over WAN round trips).
#[derive(Debug, Clone, Copy)]
pub struct AuthenticatedLimits {
    pub connection_receive_window: u32,
    pub bidi_streams: u32,
}

impl Default for AuthenticatedLimits {
    fn default() -> Self {
        Self {
            connection_receive_window: 64 << 20,
            // The agent opens its control stream; the hub opens proxied streams (limited by
            // the agent). A few spare for a control stream reopened by a future agent.
            bidi_streams: 4,
        }
    }
}

impl AuthenticatedLimits {
    /// Raises a connection that proved its identity from the pre-authentication limits.
    pub fn apply(&self, conn: &quinn::Connection) {
        conn.set_receive_window(VarInt::from_u32(self.connection_receive_window));
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.bidi_streams));
    }
}

impl TransportTuning {
    /// The hub's handshake-time parameters: this tuning with the pre-authentication limits.
    pub fn pre_auth(mut self, limits: PreAuthLimits) -> Self {
        self.connection_receive_window = limits.connection_receive_window;
        self.max_concurrent_bidi_streams = limits.bidi_streams;
        self.max_concurrent_uni_streams = 0;
        self
    }

    pub fn transport_config(&self) -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(
            VarInt::from_u32(u32::try_from(self.idle_timeout.as_millis()).unwrap_or(u32::MAX))
                .into(),
        ));
        t.initial_rtt(self.initial_rtt);
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window));
        t.receive_window(VarInt::from_u32(self.connection_receive_window));
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams));
        t.datagram_receive_buffer_size(Some(self.datagram_buffer));
        t.datagram_send_buffer_size(self.datagram_buffer);
        t.enable_segmentation_offload(self.segmentation_offload);
        match self.congestion {
            CongestionControl::Cubic => {
                t.congestion_controller_factory(Arc::new(CubicConfig::default()));
            }
            CongestionControl::NewReno => {
                t.congestion_controller_factory(Arc::new(NewRenoConfig::default()));
            }
            CongestionControl::Bbr => {
                t.congestion_controller_factory(Arc::new(BbrConfig::default()));
            }
        }
        Arc::new(t)
    }
}

/// Builds a quinn server config from a rustls one.
pub fn server_config(
    tls: rustls::ServerConfig,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, crate::tls::TlsConfigError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| crate::tls::TlsConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(tuning.transport_config());
    // Edge NATs rebind: an agent whose public address changes keeps its connection (QUIC
    // connection migration) instead of reconnecting.
    cfg.migration(true);
    cfg.retry_token_lifetime(RETRY_TOKEN_LIFETIME);
    // What a client may have buffered before the hub accepts or drops its attempt (its
    // Initial's retransmissions while it waits in the hub's handshake queue; anything it sends
    // meanwhile). quinn's defaults, 10 MiB per attempt and 100 MiB in all, are far above the
    // pre-authentication budget (docs/security.md).
    cfg.incoming_buffer_size(INCOMING_BUFFER);
    cfg.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    // No address-validation tokens unless a server opts in (`issue_address_tokens`): quinn's
    // default would send them and keep a 10 MiB replay log on every endpoint.
    let mut tokens = quinn::ValidationTokenConfig::default();
    tokens.sent(0).log(Arc::new(quinn_proto::NoneTokenLog));
    cfg.validation_token_config(tokens);
    Ok(cfg)
}

/// Makes `cfg` hand each client address-validation tokens (QUIC NEW_TOKEN) keyed by `secret`,
/// which the hub keeps in its state. A reconnecting agent presents one in its first Initial, so
/// the hub knows its address already and does not send it a Retry even when handshakes pile
/// up: after a hub restart an agent's first attempt skips a round trip (100-300 ms on an edge
/// site's path), a Retry packet and a second Initial key derivation, and cannot lose its
/// attempt to a retry token that expired while the Initial waited in a busy hub's socket. (It
/// does not shorten the loopback reconnect storm of the scale bench, which is CPU-bound:
/// docs/performance.md, session 19.) The key survives restarts because it is derived from the
/// secret (quinn's default key is random per process).
///
/// What a token is worth to someone else: it binds the client's IP address (not its port), it
/// is accepted once (`ADDRESS_TOKEN_LOG_BYTES` of replay log, a Bloom filter past a few
/// thousand entries; a token it cannot tell from a used one is treated as no token, i.e. the
/// source gets a Retry as before), and it only skips address validation: certificates and
/// enrolment tokens are checked as before.
pub fn issue_address_tokens(cfg: &mut quinn::ServerConfig, secret: &[u8]) {
    let key =
        ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"petrel address token key").extract(secret);
    cfg.token_key(Arc::new(key));
    let log = quinn_proto::BloomTokenLog::new_expected_items(
        ADDRESS_TOKEN_LOG_BYTES,
        ADDRESS_TOKEN_LOG_EXPECTED,
    );
    // quinn's Bloom log keeps two periods of one token lifetime and anchors them at the expiry
    // of the first token it is shown; a token that expires before that anchor is then refused
    // as "too far in past". In a fresh hub that first token is whichever agent came back first,
    // so every agent whose token was issued earlier (about half a returning fleet, in the
    // restart test of e2e/tests/foundation.rs) was sent a Retry after all. Showing it a token
    // that expires now anchors the periods where every still-valid token fits.
    if let Some(expired_now) = std::time::SystemTime::now().checked_sub(ADDRESS_TOKEN_LIFETIME) {
        let _ = quinn::TokenLog::check_and_insert(&log, 0, expired_now, ADDRESS_TOKEN_LIFETIME);
    }
    let mut tokens = quinn::ValidationTokenConfig::default();
    tokens
        .sent(ADDRESS_TOKENS_SENT)
        .lifetime(ADDRESS_TOKEN_LIFETIME)
        .log(Arc::new(log));
    cfg.validation_token_config(tokens);
}

/// Address tokens the hub sends each client when its handshake completes: each is good for one
/// later connection, so an agent whose first reconnect attempt fails still has one. quinn queues
/// this many again for each Handshake packet of the client's that it processes after sending
/// the first ones, so a connection usually brings twice as many (an agent keeps two).
pub const ADDRESS_TOKENS_SENT: u32 = 2;
/// How long an address token is good for. quinn sends tokens once per connection, so an agent
/// connected for longer than this comes back through a Retry, as without tokens.
pub const ADDRESS_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 86400);
/// Memory for the log of used tokens (quinn's default is 10 MiB). It grows with use, up to this.
pub const ADDRESS_TOKEN_LOG_BYTES: usize = 2 << 20;
/// Token uses the log is sized for within one lifetime before its false positives (a fresh
/// token taken for a used one: that agent gets a Retry) climb.
pub const ADDRESS_TOKEN_LOG_EXPECTED: u64 = 200_000;

/// Bytes quinn buffers for one connection attempt not yet accepted: a few Initials (a
/// ClientHello with a post-quantum key share takes two).
pub const INCOMING_BUFFER: u64 = 8 << 10;
/// Bytes quinn buffers for all attempts not yet accepted; beyond it their packets are dropped
/// (their clients retransmit). The hub's handshake queue holds at most 1,024 attempts.
pub const INCOMING_BUFFER_TOTAL: u64 = 16 << 20;

/// How long the answer to a QUIC Retry is accepted (quinn's default is 15 s). A client sends
/// its token straight back, then again on each probe timeout: about 1 s and 3 s later. An agent
/// gives up a connect attempt after 3 s without the server's first flight, so in a reconnect
/// storm the hub served the 3 s retransmissions only for the agent to close the handshake a
/// moment later: 4,000 of 14,000 handshakes started for 10,000 agents. An Initial whose token
/// is older than this is answered with a stateless INVALID_TOKEN close instead, which also tells
/// the agent at once to start a fresh attempt. quinn stamps tokens in whole seconds (the issue
/// time rounded down), so a token is accepted for between 2 and 3 s: always for the first
/// retransmission, rarely for the second.
pub const RETRY_TOKEN_LIFETIME: Duration = Duration::from_secs(3);

/// Builds a quinn client config from a rustls one.
pub fn client_config(
    tls: rustls::ClientConfig,
    tuning: &TransportTuning,
) -> Result<quinn::ClientConfig, crate::tls::TlsConfigError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| crate::tls::TlsConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(tuning.transport_config());
    Ok(cfg)
}

/// A server endpoint whose stateless-reset key and connection-ID validation key are derived from
/// `secret`. Because the hub keeps that secret in its state, a restarted hub recognises the
/// connection IDs its predecessor issued as its own and answers their packets with a valid
/// stateless reset: agents learn at once that they must reconnect instead of waiting for a
/// timeout. (With quinn's default random keys the new hub silently drops such packets as
/// "invalid CID".)
pub fn server_endpoint(
    bind: SocketAddr,
    config: quinn::ServerConfig,
    secret: &[u8],
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    crate::socket_buffers::request(&socket, HUB_SOCKET_BUFFER);
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(hub_endpoint_config(secret), Some(config), socket, runtime)
}

/// The hub's endpoint settings, keyed by its secret: stateless resets and connection IDs a
/// restarted hub (or its TCP fallback endpoint) recognises.
pub fn hub_endpoint_config(secret: &[u8]) -> EndpointConfig {
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let cid_key = {
        let tag = ring::hmac::sign(&reset_key, b"petrel connection id key");
        let mut k = [0u8; 8];
        k.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_le_bytes(k)
    };
    let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // quinn sends at most one stateless reset per 20 ms (per pass of its endpoint driver, which
    // reads a whole batch of datagrams at one `now`): after a restart, 10,000 agents would learn
    // of it at 50 per second, and most would sit out their idle timeout instead. The limit guards
    // against reflecting garbage; here only packets whose connection ID carries this hub's keyed
    // signature (`validate`, 40 bits) get a reset at all, and a reset is always smaller than the
    // packet that provoked it (no amplification, and no reset loop between two endpoints).
    endpoint_config.min_reset_interval(Duration::ZERO);
    endpoint_config
}

/// Kernel buffer the hub asks for on its QUIC socket, each direction. The default (208 KiB on
/// most distributions) holds ~150 full datagrams: a burst of reconnecting agents after a hub
/// restart, or one agent's GSO train while the hub's thread is busy, overflows it and every
/// dropped Initial costs that agent a retransmit timeout.
pub const HUB_SOCKET_BUFFER: usize = 8 << 20;
/// An agent carries one connection; 2 MiB absorbs a few milliseconds at line rate.
pub const AGENT_SOCKET_BUFFER: usize = 2 << 20;

/// The socket an agent's endpoint uses: bound to `bind`, buffers sized for one tunnel.
pub fn client_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(bind)?;
    crate::socket_buffers::request(&socket, AGENT_SOCKET_BUFFER);
    Ok(socket)
}

/// A client-only endpoint with agent-sized socket buffers.
pub fn client_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = client_socket(bind)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(EndpointConfig::default(), None, socket, runtime)
}

/// How long an agent gives the rest of the handshake, its hello and the hub's welcome once the
/// hub has answered its Initial (see [`await_answer`]).
pub const ADMITTED_GRACE: Duration = Duration::from_secs(10);

/// Why [`await_answer`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
}

/// Waits up to `within` for the hub's first flight (its TLS ServerHello and certificate). A hub
/// that sent it has admitted the attempt and done the costly half of the handshake, so the
/// caller then gives the rest [`ADMITTED_GRACE`] rather than what is left of `within`. With one
/// bound for the whole exchange, agents of a fleet reconnecting at once (a hub restart) gave up
/// on handshakes the busy hub had already started, and the hub spent half its work on
/// connections nobody waited for.
pub async fn await_answer(
    connecting: &mut quinn::Connecting,
    within: Duration,
) -> Result<(), DialError> {
    match tokio::time::timeout(within, connecting.handshake_data()).await {
        Err(_) => Err(DialError::NoAnswer(within)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::test_pki;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    /// A clock for quinn's token timestamps: the first reading (the Retry's issue time) is
    /// `base`, every later one (the token's check) `base + later`.
    #[derive(Debug)]
    struct JumpingClock {
        base: SystemTime,
        later: Duration,
        reads: AtomicUsize,
    }

    impl quinn::TimeSource for JumpingClock {
        fn now(&self) -> SystemTime {
            if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
                self.base
            } else {
                self.base + self.later
            }
        }
    }

    /// Connects once through a Retry whose token is `token_age` old when it comes back.
    async fn connect_with_token_age(token_age: Duration) -> Result<(), quinn::ConnectionError> {
        let now = SystemTime::now();
        // Tokens carry whole seconds: issue on a second boundary so the age is exact.
        let issued = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                now.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let ca = test_pki::ca("retry-ca");
        let hub_cert = test_pki::hub(&ca);
        let tls =
            crate::tls::hub_server_tls(ca.cert_der(), hub_cert.chain, hub_cert.key, &[b"petrel/1"])
                .unwrap();
        let mut server = server_config(tls, &TransportTuning::default()).unwrap();
        server.time_source(Arc::new(JumpingClock {
            base: issued,
            later: token_age,
            reads: AtomicUsize::new(0),
        }));
        let endpoint =
            quinn::Endpoint::server(server, SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let hub = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = hub.accept().await {
                if incoming.remote_address_validated() {
                    if let Ok(connecting) = incoming.accept() {
                        tokio::spawn(async move {
                            if let Ok(conn) = connecting.await {
                                conn.closed().await;
                            }
                        });
                    }
                } else {
                    incoming.retry().unwrap();
                }
            }
        });
        let node = test_pki::node(&ca, "edge-a1");
        let tls =
            crate::tls::agent_client_tls(ca.cert_der(), node.chain, node.key, b"petrel/1").unwrap();
        let mut client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        client.set_default_client_config(client_config(tls, &TransportTuning::default()).unwrap());
        let result = client
            .connect(addr, crate::HUB_SERVER_NAME)
            .unwrap()
            .await
            .map(|conn| conn.close(0u32.into(), b"done"));
        endpoint.close(0u32.into(), b"done");
        result
    }

    #[tokio::test]
    async fn a_retry_token_is_accepted_for_three_seconds() {
        connect_with_token_age(RETRY_TOKEN_LIFETIME - Duration::from_millis(100))
            .await
            .unwrap();
        let late = connect_with_token_age(RETRY_TOKEN_LIFETIME + Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(&late, quinn::ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn_proto::TransportErrorCode::INVALID_TOKEN),
            "{late:?}"
        );
    }

    /// A client's token store that counts what the server sent and can hand the same token out
    /// twice (which quinn's own store never does), to show the hub's replay log.
    #[derive(Default)]
    struct Tokens {
        held: std::sync::Mutex<Vec<bytes::Bytes>>,
        received: AtomicUsize,
        replay: std::sync::atomic::AtomicBool,
    }

    impl quinn::TokenStore for Tokens {
        fn insert(&self, _: &str, token: bytes::Bytes) {
            self.held.lock().unwrap().push(token);
            self.received.fetch_add(1, Ordering::SeqCst);
        }
        fn take(&self, _: &str) -> Option<bytes::Bytes> {
            let mut held = self.held.lock().unwrap();
            if self.replay.load(Ordering::SeqCst) {
                held.first().cloned()
            } else {
                held.pop()
            }
        }
    }

    /// A hub-like server that accepts everything, echoes one stream per connection, and
    /// reports, per incoming handshake, whether quinn saw a valid address token in it; it issues
    /// tokens keyed by `secret` if given.
    fn token_server(
        ca: &crate::pki::CertificateAuthority,
        secret: Option<&[u8]>,
    ) -> (quinn::Endpoint, tokio::sync::mpsc::UnboundedReceiver<bool>) {
        token_server_behind(ca, secret, Duration::ZERO)
    }

    /// A clock `behind` the real one.
    #[derive(Debug)]
    struct BehindClock(Duration);

    impl quinn::TimeSource for BehindClock {
        fn now(&self) -> SystemTime {
            SystemTime::now() - self.0
        }
    }

    /// `token_server` whose clock runs `behind` the real one (its tokens look issued earlier).
    fn token_server_behind(
        ca: &crate::pki::CertificateAuthority,
        secret: Option<&[u8]>,
        behind: Duration,
    ) -> (quinn::Endpoint, tokio::sync::mpsc::UnboundedReceiver<bool>) {
        let hub_cert = test_pki::hub(ca);
        let tls =
            crate::tls::hub_server_tls(ca.cert_der(), hub_cert.chain, hub_cert.key, &[b"petrel/1"])
                .unwrap();
        let mut server = server_config(tls, &TransportTuning::default()).unwrap();
        if let Some(secret) = secret {
            issue_address_tokens(&mut server, secret);
        }
        server.time_source(Arc::new(BehindClock(behind)));
        let endpoint = server_endpoint(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            server,
            secret.unwrap_or(b"reset key only"),
        )
        .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let hub = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = hub.accept().await {
                let _ = tx.send(incoming.remote_address_validated());
                if let Ok(connecting) = incoming.accept() {
                    tokio::spawn(async move {
                        let Ok(conn) = connecting.await else { return };
                        if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                            if let Ok(data) = recv.read_to_end(64).await {
                                let _ = send.write_all(&data).await;
                                let _ = send.finish();
                            }
                        }
                        conn.closed().await;
                    });
                }
            }
        });
        (endpoint, rx)
    }

    /// Connects once with `tokens` as the client's store; returns whether the server found a
    /// valid address token in the first Initial, and checks that the connection brought tokens
    /// (at least `ADDRESS_TOKENS_SENT`) or, without `expect_tokens`, none. The server queues its
    /// NEW_TOKEN frames when the client's Handshake packets arrive and quinn writes them ahead
    /// of stream data, so once the echo of a stream sent after the handshake is back, the
    /// tokens have arrived: no waiting on a timer.
    async fn connect_with_tokens(
        ca: &crate::pki::CertificateAuthority,
        server: &mut (quinn::Endpoint, tokio::sync::mpsc::UnboundedReceiver<bool>),
        tokens: &Arc<Tokens>,
        expect_tokens: bool,
    ) -> bool {
        let node = test_pki::node(ca, "edge-a1");
        let tls =
            crate::tls::agent_client_tls(ca.cert_der(), node.chain, node.key, b"petrel/1").unwrap();
        let mut client_cfg = client_config(tls, &TransportTuning::default()).unwrap();
        client_cfg.token_store(tokens.clone());
        let client = client_endpoint(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let before = tokens.received.load(Ordering::SeqCst);
        let conn = client
            .connect_with(
                client_cfg,
                server.0.local_addr().unwrap(),
                crate::HUB_SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        let validated = server.1.recv().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"round trip").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"round trip");
        let came = tokens.received.load(Ordering::SeqCst) - before;
        if expect_tokens {
            assert!(
                came >= ADDRESS_TOKENS_SENT as usize,
                "{came} address tokens came"
            );
        } else {
            assert_eq!(came, 0, "address tokens from a server that issues none");
        }
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        validated
    }

    #[tokio::test]
    async fn address_tokens_skip_address_validation_once_and_survive_a_restart() {
        let ca = test_pki::ca("token-ca");
        let secret = b"hub secret one, from the state directory";
        let tokens = Arc::new(Tokens::default());
        let mut hub = token_server(&ca, Some(secret));
        assert!(
            !connect_with_tokens(&ca, &mut hub, &tokens, true).await,
            "a first connection has no token"
        );
        assert!(
            connect_with_tokens(&ca, &mut hub, &tokens, true).await,
            "the next one presents a token the hub sent"
        );
        // A restarted hub with the same secret (its state directory) takes its predecessor's
        // tokens: the reconnect after a restart is the one that matters.
        hub.0.close(0u32.into(), b"restart");
        let mut restarted = token_server(&ca, Some(secret));
        assert!(connect_with_tokens(&ca, &mut restarted, &tokens, true).await);
        // Another hub's key: the token is worthless there, and the client is simply not
        // validated (no error).
        let mut other = token_server(&ca, Some(b"another hub's secret entirely"));
        assert!(!connect_with_tokens(&ca, &mut other, &tokens, true).await);
        // A token is good once: the same token shown again is not taken.
        let replayed = Arc::new(Tokens::default());
        assert!(!connect_with_tokens(&ca, &mut restarted, &replayed, true).await);
        replayed.replay.store(true, Ordering::SeqCst);
        assert!(connect_with_tokens(&ca, &mut restarted, &replayed, true).await);
        assert!(
            !connect_with_tokens(&ca, &mut restarted, &replayed, true).await,
            "a replayed token must not validate an address twice"
        );
    }

    #[tokio::test]
    async fn a_server_without_address_tokens_sends_none() {
        let ca = test_pki::ca("no-token-ca");
        let mut server = token_server(&ca, None);
        let tokens = Arc::new(Tokens::default());
        assert!(!connect_with_tokens(&ca, &mut server, &tokens, false).await);
    }

    #[tokio::test]
    async fn a_restarted_hub_takes_tokens_issued_before_the_first_it_is_shown() {
        // After a restart the agents come back in any order; quinn's replay log once refused
        // every token that expired before the first one it was shown.
        let ca = test_pki::ca("token-order-ca");
        let secret = b"hub secret, token order";
        let early = Arc::new(Tokens::default());
        let late = Arc::new(Tokens::default());
        let mut an_hour_ago = token_server_behind(&ca, Some(secret), Duration::from_secs(3600));
        connect_with_tokens(&ca, &mut an_hour_ago, &early, true).await;
        let mut now = token_server(&ca, Some(secret));
        connect_with_tokens(&ca, &mut now, &late, true).await;
        let mut restarted = token_server(&ca, Some(secret));
        assert!(connect_with_tokens(&ca, &mut restarted, &late, true).await);
        assert!(
            connect_with_tokens(&ca, &mut restarted, &early, true).await,
            "a token issued an hour before the first one shown must still be taken"
        );
    }
}
