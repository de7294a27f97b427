//! The control stream: the first bidirectional stream the agent opens on its tunnel
//! connection, carrying [`ControlMessage`]s in both directions for the life of the connection.
//! This module owns the message types, their body layouts (see the crate docs for the table),
//! [`encode`], [`decode_frame`] and the incremental [`FrameDecoder`].
//!
//! Each body is written in struct field order. Validation on decode mirrors validation on
//! encode, so a message that encodes always decodes to an equal value on the other side.

use std::net::IpAddr;

use crate::codec::{
    self, is_critical, split_frame, write_frame, DecodeError, EncodeError, FrameBuffer, RawFrame,
    Reader, Writer, MAX_ALPN_LEN, MAX_CERT_LEN, MAX_CSR_LEN, MAX_DATAPATH_LEN, MAX_GATEWAYS,
    MAX_HOST_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_NODE_NAME_LEN, MAX_POD_CIDRS, MAX_ROUTES,
    MAX_SITE_LEN, MAX_UNDERLAY_ADDRS, MAX_VERSION_STRING_LEN, MIN_IP_ADDR_LEN, MIN_IP_CIDR_LEN,
    MIN_STRING_LEN,
};
use crate::types::{IpCidr, MacAddr};
pub use crate::types::{Route, RoutePath};
use crate::MAX_CONTROL_FRAME;

/// Control message type numbers. 0x00–0x7F are critical, 0x80–0xFF optional.
pub mod msg_type {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const UPDATE: u8 = 0x03;
    pub const PING: u8 = 0x04;
    pub const PONG: u8 = 0x05;
    pub const GOING_AWAY: u8 = 0x06;
    pub const RENEW_REQUEST: u8 = 0x07;
    pub const RENEW_RESPONSE: u8 = 0x08;
    /// Hub → agent: a chunk of the cluster route table ([`crate::routes`]).
    pub const ROUTES: u8 = 0x09;
    /// Hub → agent: a peer agent to try a direct path with ([`crate::control::PeerOffer`]).
    /// Optional: a build that does not know it skips it and stays on the hub relay.
    pub const PEER_OFFER: u8 = 0x81;
}

/// Feature bits of [`AgentSelfView::capabilities`].
pub mod capability {
    /// Bit 0: the agent takes [`super::PeerOffer`]s and serves direct paths on its tunnel socket.
    pub const DIRECT_PATHS: u64 = 0b1;
}

/// Smallest MTU a hub may announce; below the IPv4 minimum datagram size nothing works.
pub const MIN_SITE_MTU: u16 = 576;

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Agent → hub, first message.
    Hello(Hello),
    /// Hub → agent, answer to `Hello`.
    Welcome(Welcome),
    /// Hub → agent, a full replacement of the view sent in `Welcome`.
    Update(HubView),
    Ping(Ping),
    Pong(Pong),
    /// Either side, before closing.
    GoingAway(GoingAway),
    /// Agent → hub: certificate rotation over the tunnel.
    RenewRequest(RenewRequest),
    RenewResponse(RenewResponse),
    /// Hub → agent: a chunk of the route table, for agents whose `Hello` said which table they
    /// hold (see [`crate::routes`]); their views then carry no routes.
    Routes(crate::routes::RouteSync),
    /// Hub → agent: try a direct path to this peer.
    PeerOffer(PeerOffer),
    /// An optional (>= 0x80) message type this build does not know; the frame was skipped.
    /// Encoding it writes an empty-bodied frame of that type, which is useful for testing.
    Unknown {
        msg_type: u8,
    },
}

impl ControlMessage {
    /// The wire type number.
    pub fn msg_type(&self) -> u8 {
        match self {
            ControlMessage::Hello(_) => msg_type::HELLO,
            ControlMessage::Welcome(_) => msg_type::WELCOME,
            ControlMessage::Update(_) => msg_type::UPDATE,
            ControlMessage::Ping(_) => msg_type::PING,
            ControlMessage::Pong(_) => msg_type::PONG,
            ControlMessage::GoingAway(_) => msg_type::GOING_AWAY,
            ControlMessage::RenewRequest(_) => msg_type::RENEW_REQUEST,
            ControlMessage::RenewResponse(_) => msg_type::RENEW_RESPONSE,
            ControlMessage::Routes(_) => msg_type::ROUTES,
            ControlMessage::PeerOffer(_) => msg_type::PEER_OFFER,
            ControlMessage::Unknown { msg_type } => *msg_type,
        }
    }

    /// A short name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Hello(_) => "hello",
            ControlMessage::Welcome(_) => "welcome",
            ControlMessage::Update(_) => "update",
            ControlMessage::Ping(_) => "ping",
            ControlMessage::Pong(_) => "pong",
            ControlMessage::GoingAway(_) => "going_away",
            ControlMessage::RenewRequest(_) => "renew_request",
            ControlMessage::RenewResponse(_) => "renew_response",
            ControlMessage::Routes(_) => "routes",
            ControlMessage::PeerOffer(_) => "peer_offer",
            ControlMessage::Unknown { .. } => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub alpn: String,
    pub node_name: String,
    pub agent_version: String,
    pub self_view: AgentSelfView,
    /// Trailing field: the digest of the route table the agent holds
    /// ([`crate::routes::RouteTable::digest`]). `Some` means the agent takes its routes by
    /// route sync (`Routes` messages) instead of in every view; `None` (a hello that ends
    /// before it) is an agent that expects the routes in its views.
    pub routes_digest: Option<u64>,
}

impl Hello {
    /// The hello an agent on `node_name` opens its tunnel with: this protocol version and ALPN,
    /// no self-view (the hub takes the node from its certificate and inventory), and no route
    /// digest (a session that syncs routes fills it in).
    pub fn tunnel(node_name: impl Into<String>, agent_version: impl Into<String>) -> Self {
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            alpn: String::from_utf8_lossy(crate::ALPN_TUNNEL).into_owned(),
            node_name: node_name.into(),
            agent_version: agent_version.into(),
            self_view: AgentSelfView {
                pod_cidrs: vec![],
                vtep_mac: None,
                underlay_addrs: vec![],
                datapath: "none".into(),
                capabilities: 0,
            },
            routes_digest: None,
        }
    }
}

/// What the agent believes about itself. The hub trusts its certificate and inventory over
/// this; it is used for diagnostics and to detect drift.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentSelfView {
    pub pod_cidrs: Vec<IpCidr>,
    pub vtep_mac: Option<MacAddr>,
    pub underlay_addrs: Vec<IpAddr>,
    /// e.g. "fdb", "tun", "none".
    pub datapath: String,
    /// Feature bits; unknown bits must be ignored by the receiver.
    pub capabilities: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub protocol_version: u16,
    pub hub_id: String,
    /// The node name the hub took from the agent's certificate.
    pub node_name: String,
    pub site: String,
    /// Must be non-zero.
    pub keepalive_interval_ms: u32,
    pub view: HubView,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubView {
    pub gateways: Vec<GatewayEndpoint>,
    pub routes: Vec<Route>,
    /// Inner MTU for traffic toward this site; at least [`MIN_SITE_MTU`].
    pub site_mtu: u16,
    /// Trailing field (appended in protocol 1, minor revision "egress"): what the agent may
    /// dial for the hub's proxied streams. A view that ends before it decodes as the empty
    /// policy, which allows nothing.
    pub egress: EgressPolicy,
    /// Trailing field (after `egress`): sites whose traffic needs a smaller inner MTU than
    /// `site_mtu` (a smaller WAN path); the agent routes their CIDRs at the smaller of its own
    /// MTU and this. A view that ends before it lists none. At most [`MAX_SITE_MTUS`].
    pub site_mtus: Vec<SiteMtu>,
    /// Trailing field (after `site_mtus`): the sites that are not public (the cloud and
    /// Express Connect sites), whose nodes the agent reaches through the hub like any other.
    /// With several active hubs an agent sends frames for them to the hub that owns its own
    /// site, and frames for a public site to that site's owner. A view that ends before it
    /// lists none. At most [`MAX_ROUTED_SITES`].
    pub routed_sites: Vec<String>,
    /// Trailing field (after `routed_sites`): how widely, in milliseconds, the hub's agents
    /// spread their return when they lose it together without a goodbye (a crash, a reset):
    /// each waits a random share of it, counted from when it last heard the hub
    /// ([`crate::backoff::herd_delay`]), so a fleet comes back at the rate the hub admits
    /// instead of all at once into a full handshake queue. A view that ends before it says 0
    /// (reconnect at once). Agents honour at most [`MAX_RECONNECT_SPREAD`].
    pub reconnect_spread_ms: u32,
}

/// The widest [`HubView::reconnect_spread_ms`] an agent honours: a misconfigured hub can delay
/// a fleet's return by at most this.
pub const MAX_RECONNECT_SPREAD: std::time::Duration = std::time::Duration::from_secs(60);

impl HubView {
    /// [`HubView::reconnect_spread_ms`], at most [`MAX_RECONNECT_SPREAD`].
    pub fn reconnect_spread(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.reconnect_spread_ms))
            .min(MAX_RECONNECT_SPREAD)
    }
}

/// Most entries of [`HubView::site_mtus`].
pub const MAX_SITE_MTUS: usize = 4096;
/// Most entries of [`HubView::routed_sites`]: with names of at most [`MAX_SITE_LEN`] bytes the
/// list stays under 17 KB, a quarter of a control frame. A hub with more cloud and Express
/// Connect sites lists the first 256; an agent ranks the others by their own names (frames
/// then cross another hub than the agent's own owner: a detour, never a drop).
pub const MAX_ROUTED_SITES: usize = 256;

/// The inner MTU toward one site.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SiteMtu {
    pub site: String,
    /// At least [`MIN_SITE_MTU`].
    pub mtu: u16,
}

/// Most node addresses, and most pod CIDRs, in an [`EgressPolicy`].
pub const MAX_EGRESS_TARGETS: usize = 4096;
/// Most ports in each port list of an [`EgressPolicy`].
pub const MAX_EGRESS_PORTS: usize = 64;

/// The targets an agent may dial for proxied streams: only inside its own site. The hub derives
/// it from its inventory (the agent's node and the other nodes of its site) and its egress
/// configuration; the agent refuses any `StreamOpen` outside it with `NotAllowed`.
///
/// Layout: `node_addresses` (list of `IpAddr`), `pod_cidrs` (list of `IpCidr`), `node_ports`
/// (list of `u16`, each ≠ 0), `pod_ports` (`Option` of a list of `u16`, each ≠ 0; absent means
/// any port). Lists are capped by [`MAX_EGRESS_TARGETS`] and [`MAX_EGRESS_PORTS`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct EgressPolicy {
    /// Addresses of the nodes of the agent's site (its own first).
    pub node_addresses: Vec<IpAddr>,
    /// Pod CIDRs of the nodes of the agent's site.
    pub pod_cidrs: Vec<IpCidr>,
    /// Ports allowed on node addresses (kubelet, read-only kubelet, metrics).
    pub node_ports: Vec<u16>,
    /// Ports allowed on pod IPs; `None` allows any port.
    pub pod_ports: Option<Vec<u16>>,
}

impl EgressPolicy {
    /// Whether `ip:port` is a target this policy allows.
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        if port == 0 {
            return false;
        }
        if self.node_addresses.contains(&ip) && self.node_ports.contains(&port) {
            return true;
        }
        // A CIDR's network address and first host are the node's own interfaces (flannel.1,
        // cni0): the node's ports apply there, not the pods'.
        if self.pod_cidrs.iter().any(|c| c.node_host_address(ip)) {
            return self.node_ports.contains(&port);
        }
        self.pod_cidrs.iter().any(|c| c.contains(ip))
            && self.pod_ports.as_ref().is_none_or(|p| p.contains(&port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayEndpoint {
    pub name: String,
    /// Hostname or IP literal.
    pub host: String,
    /// Must be non-zero.
    pub port: u16,
    pub active: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ping {
    pub nonce: u64,
    pub sent_at_micros: u64,
}

impl Ping {
    /// The reply a peer must send.
    pub fn pong(&self) -> Pong {
        Pong {
            nonce: self.nonce,
            echo_sent_at_micros: self.sent_at_micros,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pong {
    pub nonce: u64,
    pub echo_sent_at_micros: u64,
}

/// A peer agent the hub relays traffic to or from, and the address the hub sees its tunnel come
/// from (its NAT's public mapping). Both ends get an offer naming the other at the same time, so
/// that both dial at once and each one's first packet opens its own NAT for the other's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerOffer {
    pub node: String,
    pub addr: IpAddr,
    pub port: u16,
}

impl PeerOffer {
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addr, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoingAway {
    pub reason: GoingAwayReason,
    /// How long the agent should wait before reconnecting; 0 means use its own backoff.
    pub retry_after_ms: u32,
    pub message: String,
}

/// Why a peer is closing. Wire codes: 1..=6 in declaration order; any other code is `Other`.
/// `Other(c)` with a known `c` decodes as the named variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoingAwayReason {
    Shutdown,
    Restart,
    Replaced,
    Unauthorized,
    NodeRemoved,
    ProtocolError,
    Other(u16),
}

impl GoingAwayReason {
    pub fn code(self) -> u16 {
        match self {
            GoingAwayReason::Shutdown => 1,
            GoingAwayReason::Restart => 2,
            GoingAwayReason::Replaced => 3,
            GoingAwayReason::Unauthorized => 4,
            GoingAwayReason::NodeRemoved => 5,
            GoingAwayReason::ProtocolError => 6,
            GoingAwayReason::Other(c) => c,
        }
    }

    pub fn from_code(code: u16) -> Self {
        match code {
            1 => GoingAwayReason::Shutdown,
            2 => GoingAwayReason::Restart,
            3 => GoingAwayReason::Replaced,
            4 => GoingAwayReason::Unauthorized,
            5 => GoingAwayReason::NodeRemoved,
            6 => GoingAwayReason::ProtocolError,
            c => GoingAwayReason::Other(c),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewRequest {
    pub csr_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewResponse {
    pub result: Result<CertBundle, ErrorInfo>,
}

/// A signed leaf certificate and the CA that signed it, both DER.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertBundle {
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ErrorInfo {
    pub code: u16,
    pub message: String,
}

/// Smallest encoded sizes, for bounding list counts.
const MIN_GATEWAY_LEN: usize = MIN_STRING_LEN * 2 + 2 + 1;
const MIN_ROUTE_LEN: usize = MIN_STRING_LEN * 2 + MIN_IP_CIDR_LEN + 6 + MIN_IP_ADDR_LEN + 1;

/// Appends `msg` as one frame. On error `out` is left unchanged.
pub fn encode(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if let ControlMessage::Unknown { msg_type } = *msg {
        if is_critical(msg_type) || is_known(msg_type) {
            return Err(EncodeError::InvalidValue {
                field: "ControlMessage::Unknown.msg_type",
                reason: format!(
                    "0x{msg_type:02x} is critical or a known type and cannot be sent as unknown"
                ),
            });
        }
    }
    write_frame(out, msg.msg_type(), MAX_CONTROL_FRAME, |w| match msg {
        ControlMessage::Hello(m) => write_hello(w, m),
        ControlMessage::Welcome(m) => write_welcome(w, m),
        ControlMessage::Update(v) => write_view(w, v),
        ControlMessage::Ping(p) => {
            w.u64(p.nonce);
            w.u64(p.sent_at_micros);
            Ok(())
        }
        ControlMessage::Pong(p) => {
            w.u64(p.nonce);
            w.u64(p.echo_sent_at_micros);
            Ok(())
        }
        ControlMessage::GoingAway(g) => {
            w.u16(g.reason.code());
            w.u32(g.retry_after_ms);
            w.string("GoingAway.message", &g.message, MAX_MESSAGE_LEN)
        }
        ControlMessage::RenewRequest(r) => w.blob("RenewRequest.csr_der", &r.csr_der, MAX_CSR_LEN),
        ControlMessage::RenewResponse(r) => match &r.result {
            Ok(bundle) => {
                w.u8(0);
                write_cert_bundle(w, bundle)
            }
            Err(e) => {
                w.u8(1);
                w.u16(e.code);
                w.string("ErrorInfo.message", &e.message, MAX_MESSAGE_LEN)
            }
        },
        ControlMessage::Routes(m) => crate::routes::write_route_sync(w, m),
        ControlMessage::PeerOffer(o) => {
            w.checked_string(
                "PeerOffer.node",
                &o.node,
                MAX_NODE_NAME_LEN,
                codec::check_node_name,
            )?;
            w.ip_addr(o.addr);
            w.u16(o.port);
            Ok(())
        }
        ControlMessage::Unknown { .. } => Ok(()),
    })
}

/// Encodes `msg` into a fresh buffer.
pub fn encode_to_vec(msg: &ControlMessage) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode(msg, &mut out)?;
    Ok(out)
}

fn is_known(t: u8) -> bool {
    (msg_type::HELLO..=msg_type::ROUTES).contains(&t) || t == msg_type::PEER_OFFER
}

/// Decodes the first frame of `buf`. `Ok(None)` when the frame is incomplete; otherwise the
/// message and the number of bytes it occupied.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(ControlMessage, usize)>, DecodeError> {
    match split_frame(buf, MAX_CONTROL_FRAME)? {
        None => Ok(None),
        Some((frame, used)) => Ok(Some((decode_body(frame)?, used))),
    }
}

/// Decodes one already-split frame.
pub fn decode_body(frame: RawFrame<'_>) -> Result<ControlMessage, DecodeError> {
    let mut r = Reader::new(frame.body);
    let r = &mut r;
    Ok(match frame.msg_type {
        msg_type::HELLO => ControlMessage::Hello(read_hello(r)?),
        msg_type::WELCOME => ControlMessage::Welcome(read_welcome(r)?),
        msg_type::UPDATE => ControlMessage::Update(read_view(r)?),
        msg_type::PING => ControlMessage::Ping(Ping {
            nonce: r.u64("Ping.nonce")?,
            sent_at_micros: r.u64("Ping.sent_at_micros")?,
        }),
        msg_type::PONG => ControlMessage::Pong(Pong {
            nonce: r.u64("Pong.nonce")?,
            echo_sent_at_micros: r.u64("Pong.echo_sent_at_micros")?,
        }),
        msg_type::GOING_AWAY => ControlMessage::GoingAway(GoingAway {
            reason: GoingAwayReason::from_code(r.u16("GoingAway.reason")?),
            retry_after_ms: r.u32("GoingAway.retry_after_ms")?,
            message: r.string("GoingAway.message", MAX_MESSAGE_LEN)?,
        }),
        msg_type::RENEW_REQUEST => ControlMessage::RenewRequest(RenewRequest {
            csr_der: r.blob("RenewRequest.csr_der", MAX_CSR_LEN)?,
        }),
        msg_type::RENEW_RESPONSE => {
            let result = if r.flag("RenewResponse.result")? {
                Err(ErrorInfo {
                    code: r.u16("ErrorInfo.code")?,
                    message: r.string("ErrorInfo.message", MAX_MESSAGE_LEN)?,
                })
            } else {
                Ok(read_cert_bundle(r)?)
            };
            ControlMessage::RenewResponse(RenewResponse { result })
        }
        msg_type::ROUTES => ControlMessage::Routes(crate::routes::read_route_sync(r)?),
        msg_type::PEER_OFFER => ControlMessage::PeerOffer(PeerOffer {
            node: r.checked_string("PeerOffer.node", MAX_NODE_NAME_LEN, codec::check_node_name)?,
            addr: r.ip_addr("PeerOffer.addr")?,
            port: r.u16("PeerOffer.port")?,
        }),
        t if is_critical(t) => return Err(DecodeError::UnknownCriticalType(t)),
        t => ControlMessage::Unknown { msg_type: t },
    })
}

fn write_hello(w: &mut Writer<'_>, m: &Hello) -> Result<(), EncodeError> {
    w.u16(m.protocol_version);
    w.string("Hello.alpn", &m.alpn, MAX_ALPN_LEN)?;
    w.checked_string(
        "Hello.node_name",
        &m.node_name,
        MAX_NODE_NAME_LEN,
        codec::check_node_name,
    )?;
    w.string(
        "Hello.agent_version",
        &m.agent_version,
        MAX_VERSION_STRING_LEN,
    )?;
    let v = &m.self_view;
    w.count("AgentSelfView.pod_cidrs", v.pod_cidrs.len(), MAX_POD_CIDRS)?;
    for c in &v.pod_cidrs {
        w.ip_cidr(*c);
    }
    match v.vtep_mac {
        Some(mac) => {
            w.flag(true);
            w.mac(mac);
        }
        None => w.flag(false),
    }
    w.count(
        "AgentSelfView.underlay_addrs",
        v.underlay_addrs.len(),
        MAX_UNDERLAY_ADDRS,
    )?;
    for ip in &v.underlay_addrs {
        w.ip_addr(*ip);
    }
    w.string("AgentSelfView.datapath", &v.datapath, MAX_DATAPATH_LEN)?;
    w.u64(v.capabilities);
    if let Some(d) = m.routes_digest {
        w.u64(d);
    }
    Ok(())
}

fn read_hello(r: &mut Reader<'_>) -> Result<Hello, DecodeError> {
    let protocol_version = r.u16("Hello.protocol_version")?;
    let alpn = r.string("Hello.alpn", MAX_ALPN_LEN)?;
    let node_name =
        r.checked_string("Hello.node_name", MAX_NODE_NAME_LEN, codec::check_node_name)?;
    let agent_version = r.string("Hello.agent_version", MAX_VERSION_STRING_LEN)?;
    let n = r.count("AgentSelfView.pod_cidrs", MAX_POD_CIDRS, MIN_IP_CIDR_LEN)?;
    let mut pod_cidrs = Vec::with_capacity(n);
    for _ in 0..n {
        pod_cidrs.push(r.ip_cidr("AgentSelfView.pod_cidrs")?);
    }
    let vtep_mac = if r.flag("AgentSelfView.vtep_mac")? {
        Some(r.mac("AgentSelfView.vtep_mac")?)
    } else {
        None
    };
    let n = r.count(
        "AgentSelfView.underlay_addrs",
        MAX_UNDERLAY_ADDRS,
        MIN_IP_ADDR_LEN,
    )?;
    let mut underlay_addrs = Vec::with_capacity(n);
    for _ in 0..n {
        underlay_addrs.push(r.ip_addr("AgentSelfView.underlay_addrs")?);
    }
    let datapath = r.string("AgentSelfView.datapath", MAX_DATAPATH_LEN)?;
    let capabilities = r.u64("AgentSelfView.capabilities")?;
    // Fields appended later follow it; fewer than 8 bytes cannot be one.
    let routes_digest = if r.remaining() < 8 {
        None
    } else {
        Some(r.u64("Hello.routes_digest")?)
    };
    Ok(Hello {
        protocol_version,
        alpn,
        node_name,
        agent_version,
        self_view: AgentSelfView {
            pod_cidrs,
            vtep_mac,
            underlay_addrs,
            datapath,
            capabilities,
        },
        routes_digest,
    })
}

fn write_welcome(w: &mut Writer<'_>, m: &Welcome) -> Result<(), EncodeError> {
    w.u16(m.protocol_version);
    w.string("Welcome.hub_id", &m.hub_id, MAX_NAME_LEN)?;
    w.checked_string(
        "Welcome.node_name",
        &m.node_name,
        MAX_NODE_NAME_LEN,
        codec::check_node_name,
    )?;
    w.checked_string(
        "Welcome.site",
        &m.site,
        MAX_SITE_LEN,
        codec::check_site_name,
    )?;
    if m.keepalive_interval_ms == 0 {
        return Err(EncodeError::InvalidValue {
            field: "Welcome.keepalive_interval_ms",
            reason: "must be greater than zero".into(),
        });
    }
    w.u32(m.keepalive_interval_ms);
    write_view(w, &m.view)
}

fn read_welcome(r: &mut Reader<'_>) -> Result<Welcome, DecodeError> {
    let protocol_version = r.u16("Welcome.protocol_version")?;
    let hub_id = r.string("Welcome.hub_id", MAX_NAME_LEN)?;
    let node_name = r.checked_string(
        "Welcome.node_name",
        MAX_NODE_NAME_LEN,
        codec::check_node_name,
    )?;
    let site = r.checked_string("Welcome.site", MAX_SITE_LEN, codec::check_site_name)?;
    let keepalive_interval_ms = r.u32("Welcome.keepalive_interval_ms")?;
    if keepalive_interval_ms == 0 {
        return Err(DecodeError::InvalidValue {
            field: "Welcome.keepalive_interval_ms",
            reason: "must be greater than zero".into(),
        });
    }
    let view = read_view(r)?;
    Ok(Welcome {
        protocol_version,
        hub_id,
        node_name,
        site,
        keepalive_interval_ms,
        view,
    })
}

fn write_view(w: &mut Writer<'_>, v: &HubView) -> Result<(), EncodeError> {
    w.count("HubView.gateways", v.gateways.len(), MAX_GATEWAYS)?;
    for g in &v.gateways {
        w.string("GatewayEndpoint.name", &g.name, MAX_NAME_LEN)?;
        w.checked_string(
            "GatewayEndpoint.host",
            &g.host,
            MAX_HOST_LEN,
            codec::check_host,
        )?;
        if g.port == 0 {
            return Err(EncodeError::InvalidValue {
                field: "GatewayEndpoint.port",
                reason: "port 0 cannot be dialled".into(),
            });
        }
        w.u16(g.port);
        w.flag(g.active);
    }
    w.count("HubView.routes", v.routes.len(), MAX_ROUTES)?;
    for route in &v.routes {
        w.checked_string(
            "Route.node_name",
            &route.node_name,
            MAX_NODE_NAME_LEN,
            codec::check_node_name,
        )?;
        w.checked_string(
            "Route.site",
            &route.site,
            MAX_SITE_LEN,
            codec::check_site_name,
        )?;
        w.ip_cidr(route.pod_cidr);
        w.mac(route.vtep_mac);
        w.ip_addr(route.underlay);
        w.u8(match route.path {
            RoutePath::ViaHub => 0,
            RoutePath::Direct => 1,
        });
    }
    if v.site_mtu < MIN_SITE_MTU {
        return Err(EncodeError::InvalidValue {
            field: "HubView.site_mtu",
            reason: format!("{} is below the minimum of {MIN_SITE_MTU}", v.site_mtu),
        });
    }
    w.u16(v.site_mtu);
    write_egress_policy(w, &v.egress)?;
    w.count("HubView.site_mtus", v.site_mtus.len(), MAX_SITE_MTUS)?;
    for m in &v.site_mtus {
        w.checked_string(
            "SiteMtu.site",
            &m.site,
            MAX_SITE_LEN,
            codec::check_site_name,
        )?;
        if m.mtu < MIN_SITE_MTU {
            return Err(EncodeError::InvalidValue {
                field: "SiteMtu.mtu",
                reason: format!("{} is below the minimum of {MIN_SITE_MTU}", m.mtu),
            });
        }
        w.u16(m.mtu);
    }
    w.count(
        "HubView.routed_sites",
        v.routed_sites.len(),
        MAX_ROUTED_SITES,
    )?;
    for site in &v.routed_sites {
        w.checked_string(
            "HubView.routed_sites",
            site,
            MAX_SITE_LEN,
            codec::check_site_name,
        )?;
    }
    w.u32(v.reconnect_spread_ms);
    Ok(())
}

fn write_ports(w: &mut Writer<'_>, field: &'static str, ports: &[u16]) -> Result<(), EncodeError> {
    w.count(field, ports.len(), MAX_EGRESS_PORTS)?;
    for &p in ports {
        if p == 0 {
            return Err(EncodeError::InvalidValue {
                field,
                reason: "port 0 cannot be dialled".into(),
            });
        }
        w.u16(p);
    }
    Ok(())
}

fn write_egress_policy(w: &mut Writer<'_>, e: &EgressPolicy) -> Result<(), EncodeError> {
    w.count(
        "EgressPolicy.node_addresses",
        e.node_addresses.len(),
        MAX_EGRESS_TARGETS,
    )?;
    for ip in &e.node_addresses {
        w.ip_addr(*ip);
    }
    w.count(
        "EgressPolicy.pod_cidrs",
        e.pod_cidrs.len(),
        MAX_EGRESS_TARGETS,
    )?;
    for c in &e.pod_cidrs {
        w.ip_cidr(*c);
    }
    write_ports(w, "EgressPolicy.node_ports", &e.node_ports)?;
    match &e.pod_ports {
        Some(ports) => {
            w.flag(true);
            write_ports(w, "EgressPolicy.pod_ports", ports)
        }
        None => {
            w.flag(false);
            Ok(())
        }
    }
}

fn read_ports(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u16>, DecodeError> {
    let n = r.count(field, MAX_EGRESS_PORTS, 2)?;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        let p = r.u16(field)?;
        if p == 0 {
            return Err(DecodeError::InvalidValue {
                field,
                reason: "port 0 cannot be dialled".into(),
            });
        }
        ports.push(p);
    }
    Ok(ports)
}

/// The trailing policy of a view; a body that ends before it is the empty policy.
fn read_egress_policy(r: &mut Reader<'_>) -> Result<EgressPolicy, DecodeError> {
    if r.remaining() == 0 {
        return Ok(EgressPolicy::default());
    }
    let n = r.count(
        "EgressPolicy.node_addresses",
        MAX_EGRESS_TARGETS,
        MIN_IP_ADDR_LEN,
    )?;
    let mut node_addresses = Vec::with_capacity(n);
    for _ in 0..n {
        node_addresses.push(r.ip_addr("EgressPolicy.node_addresses")?);
    }
    let n = r.count(
        "EgressPolicy.pod_cidrs",
        MAX_EGRESS_TARGETS,
        MIN_IP_CIDR_LEN,
    )?;
    let mut pod_cidrs = Vec::with_capacity(n);
    for _ in 0..n {
        pod_cidrs.push(r.ip_cidr("EgressPolicy.pod_cidrs")?);
    }
    let node_ports = read_ports(r, "EgressPolicy.node_ports")?;
    let pod_ports = if r.flag("EgressPolicy.pod_ports")? {
        Some(read_ports(r, "EgressPolicy.pod_ports")?)
    } else {
        None
    };
    Ok(EgressPolicy {
        node_addresses,
        pod_cidrs,
        node_ports,
        pod_ports,
    })
}

fn read_view(r: &mut Reader<'_>) -> Result<HubView, DecodeError> {
    let n = r.count("HubView.gateways", MAX_GATEWAYS, MIN_GATEWAY_LEN)?;
    let mut gateways = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.string("GatewayEndpoint.name", MAX_NAME_LEN)?;
        let host = r.checked_string("GatewayEndpoint.host", MAX_HOST_LEN, codec::check_host)?;
        let port = r.u16("GatewayEndpoint.port")?;
        if port == 0 {
            return Err(DecodeError::InvalidValue {
                field: "GatewayEndpoint.port",
                reason: "port 0 cannot be dialled".into(),
            });
        }
        let active = r.flag("GatewayEndpoint.active")?;
        gateways.push(GatewayEndpoint {
            name,
            host,
            port,
            active,
        });
    }
    let n = r.count("HubView.routes", MAX_ROUTES, MIN_ROUTE_LEN)?;
    let mut routes = Vec::with_capacity(n);
    for _ in 0..n {
        let node_name =
            r.checked_string("Route.node_name", MAX_NODE_NAME_LEN, codec::check_node_name)?;
        let site = r.checked_string("Route.site", MAX_SITE_LEN, codec::check_site_name)?;
        let pod_cidr = r.ip_cidr("Route.pod_cidr")?;
        let vtep_mac = r.mac("Route.vtep_mac")?;
        let underlay = r.ip_addr("Route.underlay")?;
        let path = match r.u8("Route.path")? {
            0 => RoutePath::ViaHub,
            1 => RoutePath::Direct,
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "Route.path",
                    reason: format!("unknown route path code {other}"),
                })
            }
        };
        routes.push(Route {
            node_name,
            site,
            pod_cidr,
            vtep_mac,
            underlay,
            path,
        });
    }
    let site_mtu = r.u16("HubView.site_mtu")?;
    if site_mtu < MIN_SITE_MTU {
        return Err(DecodeError::InvalidValue {
            field: "HubView.site_mtu",
            reason: format!("{site_mtu} is below the minimum of {MIN_SITE_MTU}"),
        });
    }
    let egress = read_egress_policy(r)?;
    let mut site_mtus = Vec::new();
    if r.remaining() > 0 {
        let n = r.count("HubView.site_mtus", MAX_SITE_MTUS, MIN_STRING_LEN + 2)?;
        site_mtus.reserve(n);
        for _ in 0..n {
            let site = r.checked_string("SiteMtu.site", MAX_SITE_LEN, codec::check_site_name)?;
            let mtu = r.u16("SiteMtu.mtu")?;
            if mtu < MIN_SITE_MTU {
                return Err(DecodeError::InvalidValue {
                    field: "SiteMtu.mtu",
                    reason: format!("{mtu} is below the minimum of {MIN_SITE_MTU}"),
                });
            }
            site_mtus.push(SiteMtu { site, mtu });
        }
    }
    let mut routed_sites = Vec::new();
    if r.remaining() > 0 {
        let n = r.count("HubView.routed_sites", MAX_ROUTED_SITES, MIN_STRING_LEN)?;
        routed_sites.reserve(n);
        for _ in 0..n {
            routed_sites.push(r.checked_string(
                "HubView.routed_sites",
                MAX_SITE_LEN,
                codec::check_site_name,
            )?);
        }
    }
    let reconnect_spread_ms = if r.remaining() > 0 {
        r.u32("HubView.reconnect_spread_ms")?
    } else {
        0
    };
    Ok(HubView {
        gateways,
        routes,
        site_mtu,
        egress,
        site_mtus,
        routed_sites,
        reconnect_spread_ms,
    })
}

pub(crate) fn write_cert_bundle(w: &mut Writer<'_>, b: &CertBundle) -> Result<(), EncodeError> {
    w.blob("CertBundle.cert_der", &b.cert_der, MAX_CERT_LEN)?;
    w.blob("CertBundle.ca_der", &b.ca_der, MAX_CERT_LEN)
}

pub(crate) fn read_cert_bundle(r: &mut Reader<'_>) -> Result<CertBundle, DecodeError> {
    Ok(CertBundle {
        cert_der: r.blob("CertBundle.cert_der", MAX_CERT_LEN)?,
        ca_der: r.blob("CertBundle.ca_der", MAX_CERT_LEN)?,
    })
}

/// Turns control-stream bytes into messages. Push whatever the stream delivered (at most
/// [`MAX_CONTROL_FRAME`] + 5 bytes per push is always accepted), then call
/// [`next_message`](Self::next_message) until it returns `Ok(None)`. Errors are terminal:
/// the same error is returned again and the connection should be closed.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    frames: FrameBuffer,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        FrameDecoder {
            frames: FrameBuffer::new(MAX_CONTROL_FRAME),
        }
    }

    /// Buffers stream bytes. Refuses a frame header declaring more than
    /// [`MAX_CONTROL_FRAME`] and unread data beyond two maximum frames.
    pub fn push(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        self.frames.push(data)
    }

    /// The next complete message, or `Ok(None)` until more bytes arrive.
    pub fn next_message(&mut self) -> Result<Option<ControlMessage>, DecodeError> {
        self.next_with(decode_body)
    }

    /// The next complete frame through `decode` instead of [`decode_body`] (a reader that needs
    /// less than the whole message), or `Ok(None)` until more bytes arrive.
    pub fn next_with<T>(
        &mut self,
        decode: impl FnOnce(RawFrame<'_>) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        self.frames.next_with(decode)
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.frames.buffered()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    fn view() -> HubView {
        HubView {
            gateways: vec![GatewayEndpoint {
                name: "cloud-7".into(),
                host: "203.0.113.7".into(),
                port: 4433,
                active: true,
            }],
            routes: vec![Route {
                node_name: "edge-1".into(),
                site: "site-a".into(),
                pod_cidr: "10.244.5.0/24".parse().unwrap(),
                vtep_mac: "02:fa:00:00:00:05".parse().unwrap(),
                underlay: "192.168.1.5".parse().unwrap(),
                path: RoutePath::ViaHub,
            }],
            site_mtu: 1400,
            egress: EgressPolicy {
                node_addresses: vec!["192.168.1.5".parse().unwrap()],
                pod_cidrs: vec!["10.244.5.0/24".parse().unwrap()],
                node_ports: vec![10250, 10255],
                pod_ports: None,
            },
            site_mtus: vec![],
            routed_sites: vec![],
            reconnect_spread_ms: 0,
        }
    }

    fn hello() -> Hello {
        Hello {
            protocol_version: 1,
            alpn: "petrel/1".into(),
            node_name: "edge-1".into(),
            agent_version: "0.1.0".into(),
            self_view: AgentSelfView {
                pod_cidrs: vec!["10.244.5.0/24".parse().unwrap()],
                vtep_mac: Some(MacAddr([2, 0xfa, 0, 0, 0, 5])),
                underlay_addrs: vec!["192.168.1.5".parse().unwrap()],
                datapath: "fdb".into(),
                capabilities: 3,
            },
            routes_digest: None,
        }
    }

    fn frame(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn ping_layout_is_stable() {
        let bytes = encode_to_vec(&ControlMessage::Ping(Ping {
            nonce: 1,
            sent_at_micros: 2,
        }))
        .unwrap();
        assert_eq!(
            bytes,
            [4, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
        );
    }

    #[test]
    fn hello_and_welcome_round_trip() {
        for msg in [
            ControlMessage::Hello(hello()),
            ControlMessage::Welcome(Welcome {
                protocol_version: 1,
                hub_id: "hub-a".into(),
                node_name: "edge-1".into(),
                site: "site-a".into(),
                keepalive_interval_ms: 5000,
                view: view(),
            }),
            ControlMessage::Update(view()),
            ControlMessage::PeerOffer(PeerOffer {
                node: "edge-b1".into(),
                addr: "203.0.113.3".parse().unwrap(),
                port: 40001,
            }),
            ControlMessage::PeerOffer(PeerOffer {
                node: "edge-c1".into(),
                addr: "2001:db8::3".parse().unwrap(),
                port: 1,
            }),
        ] {
            let bytes = encode_to_vec(&msg).unwrap();
            assert_eq!(decode_frame(&bytes).unwrap(), Some((msg, bytes.len())));
        }
    }

    #[test]
    fn unknown_critical_type_is_fatal() {
        assert_eq!(
            decode_frame(&frame(0x7f, &[1, 2, 3])),
            Err(DecodeError::UnknownCriticalType(0x7f))
        );
        assert_eq!(
            decode_frame(&frame(0x00, &[])),
            Err(DecodeError::UnknownCriticalType(0))
        );
    }

    #[test]
    fn unknown_optional_type_is_skipped() {
        let mut bytes = frame(0x90, &[1, 2, 3]);
        let ping = ControlMessage::Ping(Ping {
            nonce: 9,
            sent_at_micros: 0,
        });
        encode(&ping, &mut bytes).unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&bytes).unwrap();
        assert_eq!(
            dec.next_message().unwrap(),
            Some(ControlMessage::Unknown { msg_type: 0x90 })
        );
        assert_eq!(dec.next_message().unwrap(), Some(ping));
        assert_eq!(dec.next_message().unwrap(), None);
    }

    #[test]
    fn encoding_unknown() {
        assert!(encode_to_vec(&ControlMessage::Unknown { msg_type: 0x10 }).is_err());
        // An optional type this build knows is not "unknown".
        assert!(encode_to_vec(&ControlMessage::Unknown {
            msg_type: msg_type::PEER_OFFER
        })
        .is_err());
        assert!(encode_to_vec(&ControlMessage::Unknown { msg_type: 0x82 }).is_ok());
        assert_eq!(
            encode_to_vec(&ControlMessage::Unknown { msg_type: 0xa0 }).unwrap(),
            vec![0xa0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn trailing_bytes_in_body_are_ignored() {
        let mut body = 7u64.to_be_bytes().to_vec();
        body.extend_from_slice(&8u64.to_be_bytes());
        body.extend_from_slice(b"future fields");
        let bytes = frame(msg_type::PONG, &body);
        assert_eq!(
            decode_frame(&bytes).unwrap(),
            Some((
                ControlMessage::Pong(Pong {
                    nonce: 7,
                    echo_sent_at_micros: 8
                }),
                bytes.len()
            ))
        );
    }

    #[test]
    fn short_body_is_truncated_error() {
        assert_eq!(
            decode_frame(&frame(msg_type::PING, &[0; 12])),
            Err(DecodeError::Truncated {
                field: "Ping.sent_at_micros",
                needed: 4
            })
        );
    }

    #[test]
    fn oversize_frame_refused_before_body_arrives() {
        let mut hdr = vec![msg_type::UPDATE];
        hdr.extend_from_slice(&u32::try_from(MAX_CONTROL_FRAME + 1).unwrap().to_be_bytes());
        assert!(matches!(
            decode_frame(&hdr),
            Err(DecodeError::TooLong {
                field: "frame body",
                ..
            })
        ));
        let mut dec = FrameDecoder::new();
        assert!(dec.push(&hdr).is_err());
        let mut dec = FrameDecoder::new();
        assert!(matches!(
            dec.push(&vec![0u8; 3 * MAX_CONTROL_FRAME]),
            Err(DecodeError::BufferFull { .. })
        ));
    }

    #[test]
    fn max_size_chunks_never_refused_when_drained() {
        // A maximal frame split so each push is one max frame + header long.
        let msg = ControlMessage::RenewRequest(RenewRequest {
            csr_der: vec![7; MAX_CSR_LEN],
        });
        let mut stream = Vec::new();
        for _ in 0..8 {
            encode(&msg, &mut stream).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut got = 0;
        for chunk in stream.chunks(MAX_CONTROL_FRAME + 5) {
            dec.push(chunk).unwrap();
            while let Some(m) = dec.next_message().unwrap() {
                assert_eq!(m, msg);
                got += 1;
            }
        }
        assert_eq!(got, 8);
    }

    #[test]
    fn invalid_option_tag() {
        let mut bytes = encode_to_vec(&ControlMessage::Hello(Hello {
            self_view: AgentSelfView {
                vtep_mac: None,
                ..hello().self_view
            },
            ..hello()
        }))
        .unwrap();
        // Locate the vtep_mac tag: it follows the pod_cidrs list.
        let tag_pos = 5 + 2 + 10 + 8 + 7 + 2 + 6;
        assert_eq!(bytes[tag_pos], 0);
        bytes[tag_pos] = 2;
        assert!(matches!(
            decode_frame(&bytes),
            Err(DecodeError::InvalidValue {
                field: "AgentSelfView.vtep_mac",
                ..
            })
        ));
    }

    #[test]
    fn invalid_node_name_rejected_both_ways() {
        let bad = Hello {
            node_name: "Edge_1".into(),
            ..hello()
        };
        assert!(matches!(
            encode_to_vec(&ControlMessage::Hello(bad)),
            Err(EncodeError::InvalidValue {
                field: "Hello.node_name",
                ..
            })
        ));
        let mut bytes = encode_to_vec(&ControlMessage::Hello(hello())).unwrap();
        let pos = 5 + 2 + 10 + 2;
        bytes[pos] = b'E';
        assert!(matches!(
            decode_frame(&bytes),
            Err(DecodeError::InvalidValue {
                field: "Hello.node_name",
                ..
            })
        ));
    }

    #[test]
    fn caps_enforced_on_encode() {
        let mut v = view();
        v.gateways = vec![v.gateways[0].clone(); MAX_GATEWAYS + 1];
        assert!(matches!(
            encode_to_vec(&ControlMessage::Update(v)),
            Err(EncodeError::TooLong {
                field: "HubView.gateways",
                ..
            })
        ));
        let msg = ControlMessage::GoingAway(GoingAway {
            reason: GoingAwayReason::Shutdown,
            retry_after_ms: 0,
            message: "x".repeat(MAX_MESSAGE_LEN + 1),
        });
        assert!(encode_to_vec(&msg).is_err());
        let mut v = view();
        v.routes = vec![v.routes[0].clone(); 5000];
        let mut out = vec![1];
        assert!(matches!(
            encode(&ControlMessage::Update(v), &mut out),
            Err(EncodeError::TooLong {
                field: "frame body",
                ..
            })
        ));
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn csr_cap_refused_before_allocation() {
        let mut body = vec![];
        body.extend_from_slice(&u32::try_from(MAX_CSR_LEN + 1).unwrap().to_be_bytes());
        assert_eq!(
            decode_frame(&frame(msg_type::RENEW_REQUEST, &body)),
            Err(DecodeError::TooLong {
                field: "RenewRequest.csr_der",
                len: MAX_CSR_LEN + 1,
                max: MAX_CSR_LEN
            })
        );
    }

    #[test]
    fn route_path_and_reasons() {
        assert_eq!(GoingAwayReason::from_code(3), GoingAwayReason::Replaced);
        assert_eq!(GoingAwayReason::from_code(77), GoingAwayReason::Other(77));
        let v = HubView {
            egress: EgressPolicy::default(),
            ..view()
        };
        let mut bytes = encode_to_vec(&ControlMessage::Update(v)).unwrap();
        // path, site_mtu (2), the empty egress policy (2 + 2 + 2 + 1), no site MTUs (2), no
        // routed sites (2), the reconnect spread.
        let path_pos = bytes.len() - 3 - 7 - 2 - 2 - SPREAD;
        bytes[path_pos] = 9;
        assert!(matches!(
            decode_frame(&bytes),
            Err(DecodeError::InvalidValue {
                field: "Route.path",
                ..
            })
        ));
    }

    #[test]
    fn bad_prefix_and_mtu() {
        let mut bytes = encode_to_vec(&ControlMessage::Update(view())).unwrap();
        // The route's prefix byte: frame header, gateway list, route count, two strings, 4+4.
        let gw = 2 + (2 + 7) + (2 + 11) + 2 + 1;
        let pos = 5 + gw + 2 + (2 + 6) + (2 + 6) + 5;
        assert_eq!(bytes[pos], 24);
        bytes[pos] = 33;
        assert!(matches!(
            decode_frame(&bytes),
            Err(DecodeError::InvalidValue {
                field: "Route.pod_cidr",
                ..
            })
        ));
        let mut v = view();
        v.site_mtu = 0;
        assert!(encode_to_vec(&ControlMessage::Update(v)).is_err());
    }

    /// The bytes of the last trailing field, [`HubView::reconnect_spread_ms`].
    const SPREAD: usize = 4;

    #[test]
    fn reconnect_spread_is_a_trailing_field_agents_cap() {
        let mut v = view();
        v.reconnect_spread_ms = 6_667;
        let bytes = encode_to_vec(&ControlMessage::Update(v.clone())).unwrap();
        assert_eq!(
            decode_frame(&bytes).unwrap(),
            Some((ControlMessage::Update(v.clone()), bytes.len()))
        );
        assert_eq!(v.reconnect_spread(), Duration::from_millis(6_667));
        // A hub from before the field: the view ends after the routed sites; reconnect at once.
        let old = frame(msg_type::UPDATE, &bytes[5..bytes.len() - SPREAD]);
        let mut before = v.clone();
        before.reconnect_spread_ms = 0;
        assert_eq!(
            decode_frame(&old).unwrap().map(|(m, _)| m),
            Some(ControlMessage::Update(before))
        );
        // Part of the field is malformed, not absent.
        let torn = frame(msg_type::UPDATE, &bytes[5..bytes.len() - 1]);
        assert!(decode_frame(&torn).is_err());
        // Any value decodes; an agent waits at most the cap.
        v.reconnect_spread_ms = u32::MAX;
        let bytes = encode_to_vec(&ControlMessage::Update(v.clone())).unwrap();
        assert_eq!(
            decode_frame(&bytes).unwrap(),
            Some((ControlMessage::Update(v.clone()), bytes.len()))
        );
        assert_eq!(v.reconnect_spread(), MAX_RECONNECT_SPREAD);
    }

    #[test]
    fn egress_policy_is_a_trailing_field() {
        // A view from a hub that predates the field: everything up to site_mtu.
        let v = view();
        let full = encode_to_vec(&ControlMessage::Update(v.clone())).unwrap();
        let mut policy = Vec::new();
        write_frame(&mut policy, 0x99, MAX_CONTROL_FRAME, |w| {
            write_egress_policy(w, &v.egress)
        })
        .unwrap();
        let policy_len = policy.len() - 5;
        // ... then the (empty) site MTU and routed-site lists (two-byte counts) and the
        // reconnect spread (four bytes).
        let body_len = full.len() - 5 - policy_len - 2 - 2 - SPREAD;
        let old = frame(msg_type::UPDATE, &full[5..5 + body_len]);
        match decode_frame(&old).unwrap() {
            Some((ControlMessage::Update(got), _)) => {
                assert_eq!(got.egress, EgressPolicy::default());
                assert_eq!(got.routes, v.routes);
            }
            other => panic!("{other:?}"),
        }
        // A hub from before site MTUs: the view ends after the policy.
        let old = frame(msg_type::UPDATE, &full[5..full.len() - 2 - SPREAD]);
        match decode_frame(&old).unwrap() {
            Some((ControlMessage::Update(got), _)) => assert_eq!(got, v),
            other => panic!("{other:?}"),
        }
        // Site MTUs round-trip; one below the minimum is refused both ways.
        let mut v3 = view();
        v3.site_mtus = vec![SiteMtu {
            site: "site-small".into(),
            mtu: 1296,
        }];
        let bytes = encode_to_vec(&ControlMessage::Update(v3.clone())).unwrap();
        assert_eq!(
            decode_frame(&bytes).unwrap(),
            Some((ControlMessage::Update(v3.clone()), bytes.len()))
        );
        v3.site_mtus[0].mtu = MIN_SITE_MTU - 1;
        assert!(encode_to_vec(&ControlMessage::Update(v3)).is_err());
        let mut raw = bytes.clone();
        // The MTU is just before the (empty) routed-site list's two-byte count.
        let n = raw.len() - 2 - SPREAD;
        raw[n - 2..n].copy_from_slice(&(MIN_SITE_MTU - 1).to_be_bytes());
        assert!(matches!(
            decode_frame(&raw),
            Err(DecodeError::InvalidValue {
                field: "SiteMtu.mtu",
                ..
            })
        ));
        // Routed sites round-trip; a hub from before them ends the view after the site MTUs;
        // a bad name and more than the cap are refused.
        let mut v4 = view();
        v4.routed_sites = vec!["vpc".into(), "site-x".into()];
        let bytes = encode_to_vec(&ControlMessage::Update(v4.clone())).unwrap();
        assert_eq!(
            decode_frame(&bytes).unwrap(),
            Some((ControlMessage::Update(v4.clone()), bytes.len()))
        );
        let cut = 2 + 2 + 3 + 2 + 6 + SPREAD;
        let old = frame(msg_type::UPDATE, &bytes[5..bytes.len() - cut]);
        let mut no_list = v4.clone();
        no_list.routed_sites.clear();
        assert_eq!(
            decode_frame(&old).unwrap().map(|(m, _)| m),
            Some(ControlMessage::Update(no_list))
        );
        let mut bad = v4.clone();
        bad.routed_sites = vec!["bad site".into()];
        assert!(encode_to_vec(&ControlMessage::Update(bad)).is_err());
        let mut many = v4.clone();
        many.routed_sites = (0..=MAX_ROUTED_SITES).map(|i| format!("s{i}")).collect();
        assert!(matches!(
            encode_to_vec(&ControlMessage::Update(many.clone())),
            Err(EncodeError::TooLong {
                field: "HubView.routed_sites",
                ..
            })
        ));
        many.routed_sites.pop();
        assert!(encode_to_vec(&ControlMessage::Update(many)).is_ok());
        // Present: round-trips, including an explicit pod port list.
        let mut v2 = view();
        v2.egress.pod_ports = Some(vec![8080]);
        let bytes = encode_to_vec(&ControlMessage::Update(v2.clone())).unwrap();
        assert_eq!(
            decode_frame(&bytes).unwrap(),
            Some((ControlMessage::Update(v2), bytes.len()))
        );
    }

    #[test]
    fn egress_policy_checks_and_caps() {
        let p = view().egress;
        let node: IpAddr = "192.168.1.5".parse().unwrap();
        assert!(p.allows(node, 10250));
        assert!(!p.allows(node, 22));
        assert!(p.allows("10.244.5.9".parse().unwrap(), 8080));
        assert!(!p.allows("10.244.6.9".parse().unwrap(), 8080));
        assert!(!p.allows("10.244.5.9".parse().unwrap(), 0));
        let only = EgressPolicy {
            pod_ports: Some(vec![80]),
            ..p.clone()
        };
        assert!(only.allows("10.244.5.9".parse().unwrap(), 80));
        assert!(!only.allows("10.244.5.9".parse().unwrap(), 81));
        assert!(!EgressPolicy::default().allows(node, 10250));

        let mut v = view();
        v.egress.node_ports = vec![0];
        assert!(matches!(
            encode_to_vec(&ControlMessage::Update(v)),
            Err(EncodeError::InvalidValue {
                field: "EgressPolicy.node_ports",
                ..
            })
        ));
        let mut v = view();
        v.egress.node_ports = vec![1; MAX_EGRESS_PORTS + 1];
        assert!(matches!(
            encode_to_vec(&ControlMessage::Update(v)),
            Err(EncodeError::TooLong {
                field: "EgressPolicy.node_ports",
                ..
            })
        ));
        // A port 0 on the wire is refused, and a huge count is refused before allocating.
        let mut bytes = encode_to_vec(&ControlMessage::Update(view())).unwrap();
        // The empty site MTU and routed-site lists (two-byte counts) and the reconnect spread
        // follow the policy.
        let n = bytes.len() - 4 - SPREAD;
        // ... node_ports: count 2, 10250, 10255; pod_ports: tag 0.
        assert_eq!(&bytes[n - 7..n], &[0, 2, 0x28, 0x0a, 0x28, 0x0f, 0]);
        bytes[n - 5] = 0;
        bytes[n - 4] = 0;
        assert!(matches!(
            decode_frame(&bytes),
            Err(DecodeError::InvalidValue {
                field: "EgressPolicy.node_ports",
                ..
            })
        ));
        bytes[n - 7] = 0xff;
        assert!(matches!(
            decode_frame(&bytes),
            Err(DecodeError::TooLong {
                field: "EgressPolicy.node_ports",
                ..
            })
        ));
    }
}
