//! Command line, environment and config file, validated into typed configuration.
//!
//! Precedence: flag > environment variable > config file (`--config`, TOML, same keys as the long
//! flags with `-` or `_`) > built-in default. Any invalid value is a [`ConfigError`] naming the
//! field and what is allowed; `main` exits 64 (EX_USAGE) on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use petrel_transport::quic::CongestionControl;
use petrel_transport::setting_values::{
    self, parse_congestion, parse_duration, parse_host_port, parse_socket_addr,
};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "petrel-gateway",
    version,
    about = "Petrel cloud gateway: QUIC tunnel hub for edge sites"
)]
pub struct Cli {
    /// Optional TOML config file; flags and environment variables override it.
    #[arg(long, global = true, env = "PETREL_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `petrel_gateway=debug`.
    #[arg(long, global = true, env = "PETREL_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub.
    Run(Box<RunArgs>),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the connected agents (asks the running hub's admin endpoint).
    Status(StatusArgs),
    /// CA information.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run the node role on a cloud or Express Connect node: route public-site pod CIDRs to the hub.
    Node(NodeArgs),
    /// Remove every route, rule and device Petrel added to this node (also after a crash).
    Cleanup(DatapathArgs),
    /// Revoke a node's certificates (hubs close its tunnel and refuse it), lift a revocation,
    /// or list them.
    Revoke(RevokeArgs),
}

/// Kernel-hook settings shared by `node` and `cleanup`.
#[derive(Debug, Args, Clone, Default)]
pub struct DatapathArgs {
    /// Kernel hook: auto, fast (kernel VXLAN, local bypass off; kernel >= 6.6) or portable (TUN + policy routing).
    #[arg(long, env = "PETREL_HOOKS", default_value = "auto")]
    pub hooks: String,
    /// UDP port of the hub's VXLAN relay.
    #[arg(long, env = "PETREL_RELAY_PORT", default_value_t = 8473)]
    pub relay_port: u16,
    /// Flannel's VXLAN device.
    #[arg(long, env = "PETREL_FLANNEL_DEV", default_value = "flannel.1")]
    pub flannel_dev: String,
    /// Routing table that holds Petrel's routes.
    #[arg(long, env = "PETREL_ROUTE_TABLE", default_value_t = 7473)]
    pub route_table: u32,
    /// Preference of Petrel's policy rules (before Flannel's main table).
    #[arg(long, env = "PETREL_RULE_PREF", default_value_t = 100)]
    pub rule_pref: u32,
}

impl DatapathArgs {
    pub fn to_config(&self) -> Result<petrel_datapath::DatapathConfig, ConfigError> {
        let hook = self.hooks.parse().map_err(|_| ConfigError::Invalid {
            field: "hooks",
            value: self.hooks.clone(),
            allowed: "auto, fast, portable".into(),
        })?;
        let cfg = petrel_datapath::DatapathConfig {
            hook,
            relay_port: self.relay_port,
            flannel_dev: self.flannel_dev.clone(),
            table: self.route_table,
            rule_pref: self.rule_pref,
            ..Default::default()
        };
        cfg.validate().map_err(|e| ConfigError::Invalid {
            field: "datapath",
            value: String::new(),
            allowed: e.to_string(),
        })?;
        Ok(cfg)
    }
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// This node's inventory name.
    #[arg(long, env = "PETREL_NODE_NAME")]
    pub node_name: String,
    /// Inventory file (TOML). Without it the embedded lab inventory is used.
    #[arg(long, env = "PETREL_INVENTORY")]
    pub inventory: Option<PathBuf>,
    /// Underlay IPv4 address of the active hub (default: the inventory's gateway node; in
    /// Kubernetes mode the node holding the hub Lease).
    #[arg(long, env = "PETREL_HUB_ADDRESS")]
    pub hub_address: Option<std::net::Ipv4Addr>,
    /// Every hub carries traffic: each public site's pod CIDRs go to the hub that owns the site
    /// (the hubs are the inventory's `gateway = true` nodes; docs/architecture.md,
    /// "Active-active hubs"). Default: every site to the one hub.
    #[arg(long, env = "PETREL_ACTIVE_ACTIVE")]
    pub active_active: bool,
    /// Inner MTU toward public sites (what fits a QUIC datagram on the path).
    #[arg(long, env = "PETREL_SITE_MTU", default_value_t = 1380)]
    pub site_mtu: u16,
    /// TCP address of the node role's admin server (/metrics, /healthz, /readyz, /status).
    #[arg(long, env = "PETREL_NODE_ADMIN_ADDR", default_value = DEFAULT_NODE_ADMIN)]
    pub admin_addr: String,
    #[command(flatten)]
    pub datapath: DatapathArgs,
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
}

#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// UDP address the QUIC hub listens on.
    #[arg(long, env = "PETREL_LISTEN")]
    pub listen: Option<String>,
    /// TCP address of the admin server (/metrics, /healthz, /readyz, /status).
    #[arg(long, env = "PETREL_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// Directory for the CA, tokens and the hub secret.
    #[arg(long, env = "PETREL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Inventory file (TOML). Without it the embedded lab inventory is used.
    #[arg(long, env = "PETREL_INVENTORY")]
    pub inventory: Option<PathBuf>,
    /// Endpoints (HOST:PORT) agents are told to dial; repeatable. Default: the listen address.
    #[arg(long = "advertise", env = "PETREL_ADVERTISE", value_delimiter = ',')]
    pub advertise: Vec<String>,
    /// This hub's name in status and in the endpoint list.
    #[arg(long, env = "PETREL_HUB_NAME")]
    pub hub_name: Option<String>,
    /// Active-active hubs with a file inventory: every hub as NAME=HOST:PORT (the inventory's
    /// `gateway = true` node it runs on, and the endpoint agents dial), this one included;
    /// repeatable or comma-separated. Every hub listed carries traffic (docs/architecture.md,
    /// "Active-active hubs"); run the node roles with `--active-active`.
    #[arg(long = "hubs", env = "PETREL_HUBS", value_delimiter = ',')]
    pub hubs: Vec<String>,
    /// Lifetime of node certificates (renewed over the tunnel at two thirds of it).
    #[arg(long, env = "PETREL_AGENT_CERT_TTL")]
    pub agent_cert_ttl: Option<String>,
    /// Keepalive interval: the hub pings an agent that sent nothing for this long (agents
    /// ping every 2 s by default, so a healthy agent is never pinged), and tells agents this
    /// interval in the welcome.
    #[arg(long, env = "PETREL_KEEPALIVE")]
    pub keepalive: Option<String>,
    /// QUIC idle timeout.
    #[arg(long, env = "PETREL_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Congestion controller for traffic the hub sends to agents: bbr (default; keeps its rate
    /// on WANs with random loss), cubic or newreno.
    #[arg(long, env = "PETREL_CONGESTION")]
    pub congestion: Option<String>,
    /// On shutdown, how long to wait for agents to leave before closing.
    #[arg(long, env = "PETREL_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// What the going-away message tells agents: come back after this long.
    #[arg(long, env = "PETREL_RESTART_HINT")]
    pub restart_hint: Option<String>,
    /// Inner MTU announced to public sites (what fits a QUIC datagram on the path).
    #[arg(long, env = "PETREL_SITE_MTU")]
    pub site_mtu: Option<u16>,
    /// Learn each public site's MTU from its tunnels' paths and tell every agent (default
    /// true); a site's `mtu` in the inventory (or `petrel.io/site-mtu`) overrides it.
    #[arg(long, env = "PETREL_LEARN_SITE_MTUS")]
    pub learn_site_mtus: Option<bool>,
    /// Send QUIC packets in batches with UDP segmentation offload (default true). Off costs
    /// relay throughput and, with the quinn Petrel carries, saves no memory (docs/operations.md,
    /// sizing).
    #[arg(long, env = "PETREL_QUIC_GSO")]
    pub quic_gso: Option<bool>,
    /// Offer agents of two public sites that exchange traffic through this hub each other's
    /// address, so that they can try a direct path (default true; docs/architecture.md,
    /// "Direct paths"). Off: all site-to-site traffic stays on the hub relay.
    #[arg(long, env = "PETREL_DIRECT_PATHS")]
    pub direct_paths: Option<bool>,
    /// Above this resident memory the hub refuses new handshakes and enrolments (connected
    /// agents are kept): `auto` (default: 85% of the cgroup's memory limit, none without one),
    /// `off`, or a size such as 400MiB or 2GiB.
    #[arg(long, env = "PETREL_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// Byte rate of large route syncs (snapshots of the cluster's route table) over all
    /// agents, per second: `off`, or a size such as 64MiB (default). Keeps a fleet connecting
    /// at once from queueing gigabytes ahead of the handshakes of agents still connecting.
    #[arg(long, env = "PETREL_ROUTE_SYNC_RATE")]
    pub route_sync_rate: Option<String>,
    /// Agents per second this hub admits when its whole fleet reconnects at once (after a
    /// crash or a restart without a goodbye): agents spread their return over (edge nodes /
    /// this rate) seconds, at most 60 s. `off` (every agent at once), or a number; default
    /// 1500, about what two cores admit (docs/operations.md, sizing).
    #[arg(long, env = "PETREL_RECONNECT_RATE")]
    pub reconnect_rate: Option<String>,
    /// UDP address where cloud and Express Connect nodes send VXLAN frames for public sites
    /// (their `petrel.1` FDB points here): `auto` (default: this node's underlay address, the
    /// one the node roles send to, and 127.0.0.1 for this node's own kernel, port 8473), a
    /// comma-separated list of IP:PORT, or `off` (no data plane).
    #[arg(long, env = "PETREL_RELAY_LISTEN")]
    pub relay_listen: Option<String>,
    /// TCP address of the fallback listener for agents whose network blocks outbound UDP
    /// (QUIC carried over TLS on TCP, usually `0.0.0.0:443`), or `off` (the default).
    #[arg(long, env = "PETREL_TCP_LISTEN")]
    pub tcp_listen: Option<String>,
    /// The inventory name of the node this hub runs on: its own pods' frames arrive from
    /// loopback with this node's authority, and the relay binds its underlay address. Never
    /// guessed: without it loopback frames speak for nobody.
    #[arg(long, env = "PETREL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Flannel's VXLAN VNI.
    #[arg(long, env = "PETREL_VNI")]
    pub vni: Option<u32>,
    /// Flannel's VXLAN UDP port.
    #[arg(long, env = "PETREL_FLANNEL_PORT")]
    pub flannel_port: Option<u16>,
    /// The API server's egress proxy (CONNECT over a Unix socket or mTLS TCP, SNI passthrough).
    #[command(flatten)]
    pub egress: crate::egress::EgressArgs,
    /// Kubernetes mode: Nodes, the hub Lease, the CA and tokens in Secrets.
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token bound to a node name and print the join command.
    Create(TokenCreateArgs),
    /// List tokens (ids, nodes, expiry, use; never secrets).
    List(StoreArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// Node name the token is bound to.
    #[arg(long, required_unless_present = "pool", conflicts_with = "pool")]
    pub node: Option<String>,
    /// A fleet token instead: any edge node of this node pool (site) may enrol with it, each
    /// node once, up to --max-uses nodes, until it expires.
    #[arg(long)]
    pub pool: Option<String>,
    /// How many nodes a fleet token may enrol.
    #[arg(long, requires = "pool", default_value_t = 100)]
    pub max_uses: u32,
    /// Lifetime, e.g. 30m, 1h, 2d.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Allow the token to be used more than once (until it expires).
    #[arg(long)]
    pub reusable: bool,
    /// Hub address to put in the printed join command (default: the first advertised endpoint).
    #[arg(long, env = "PETREL_JOIN_SERVER")]
    pub server: Option<String>,
    /// Inventory file (TOML) the node is checked against, the hub's (default: `inventory` of
    /// --config; without either, the embedded demo inventory).
    #[arg(long, env = "PETREL_INVENTORY")]
    pub inventory: Option<PathBuf>,
    /// Create the token even if the inventory says the hub would refuse the node (unknown, or
    /// not in a public-network site).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
}

#[derive(Debug, Args, Clone, Default)]
pub struct StateArgs {
    #[arg(long, env = "PETREL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Where the CA and tokens are: the state directory, or (Kubernetes mode) Secrets.
#[derive(Debug, Args, Clone, Default)]
pub struct StoreArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
}

/// `petrel-gateway revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The node whose certificates are revoked.
    #[arg(long)]
    pub node: Option<String>,
    /// Why (kept with the revocation, shown in refusals).
    #[arg(long, default_value = "revoked by an operator")]
    pub reason: String,
    /// Let a revoked node enrol again (its old certificates stay refused).
    #[arg(long)]
    pub lift: bool,
    /// Print the revocation list.
    #[arg(long, conflicts_with_all = ["node", "lift"])]
    pub list: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, env = "PETREL_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA's SHA-256 fingerprint (what `join --ca-sha256` pins).
    Fingerprint(StoreArgs),
}

/// The optional config file. Unknown keys are errors: a typo must not silently fall back to a
/// default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    #[serde(alias = "listen")]
    pub listen: Option<String>,
    #[serde(alias = "admin_addr")]
    pub admin_addr: Option<String>,
    #[serde(alias = "state_dir")]
    pub state_dir: Option<PathBuf>,
    pub inventory: Option<PathBuf>,
    #[serde(default)]
    pub advertise: Vec<String>,
    #[serde(alias = "hub_name")]
    pub hub_name: Option<String>,
    #[serde(default)]
    pub hubs: Vec<String>,
    #[serde(alias = "agent_cert_ttl")]
    pub agent_cert_ttl: Option<String>,
    pub keepalive: Option<String>,
    #[serde(alias = "idle_timeout")]
    pub idle_timeout: Option<String>,
    pub congestion: Option<String>,
    #[serde(alias = "drain_timeout")]
    pub drain_timeout: Option<String>,
    #[serde(alias = "restart_hint")]
    pub restart_hint: Option<String>,
    #[serde(alias = "site_mtu")]
    pub site_mtu: Option<u16>,
    #[serde(alias = "learn_site_mtus")]
    pub learn_site_mtus: Option<bool>,
    #[serde(alias = "quic_gso")]
    pub quic_gso: Option<bool>,
    #[serde(alias = "direct_paths")]
    pub direct_paths: Option<bool>,
    #[serde(alias = "memory_budget")]
    pub memory_budget: Option<String>,
    #[serde(alias = "route_sync_rate")]
    pub route_sync_rate: Option<String>,
    #[serde(alias = "reconnect_rate")]
    pub reconnect_rate: Option<String>,
    pub log: Option<String>,
    #[serde(alias = "relay_listen")]
    pub relay_listen: Option<String>,
    #[serde(alias = "tcp_listen")]
    pub tcp_listen: Option<String>,
    #[serde(alias = "node_name")]
    pub node_name: Option<String>,
    pub vni: Option<u32>,
    #[serde(alias = "flannel_port")]
    pub flannel_port: Option<u16>,
    #[serde(default)]
    pub egress: crate::egress::EgressFileConfig,
    /// `file` or `kubernetes`.
    #[serde(alias = "inventory_source")]
    pub inventory_source: Option<String>,
    #[serde(default)]
    pub kubernetes: crate::k8s::KubeFileConfig,
}

/// The configuration error both binaries share (see [`setting_values`]).
pub use petrel_transport::setting_values::ConfigError;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9470";
/// Route snapshots per second over all agents at the default rate: ~140 of a 10,000-node table.
pub const DEFAULT_ROUTE_SYNC_RATE: u64 = 64 << 20;
/// Agents per second a fleet's return is spread for by default: about what a hub on two
/// cores admits (docs/performance.md, session 20).
pub const DEFAULT_RECONNECT_RATE: u32 = 1500;
/// The node role's admin server (`petrel-gateway node`).
pub const DEFAULT_NODE_ADMIN: &str = "127.0.0.1:9472";

/// Validated hub configuration.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub listen: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state_dir: PathBuf,
    pub inventory: Option<PathBuf>,
    pub advertise: Vec<(String, u16)>,
    /// `advertise` was configured (not derived from `listen`). In Kubernetes mode an unset
    /// advertise list means: this Node's ExternalIP (else InternalIP) with the listen port.
    pub advertise_given: bool,
    pub hub_name: String,
    /// File mode, active-active: every hub's name and endpoint (this one's included); empty
    /// for one hub, and in Kubernetes mode (the candidates are the labelled nodes).
    pub hubs: Vec<StaticHub>,
    pub agent_cert_ttl: Duration,
    pub keepalive: Duration,
    pub idle_timeout: Duration,
    pub congestion: CongestionControl,
    pub drain_timeout: Duration,
    pub restart_hint: Duration,
    pub site_mtu: u16,
    /// Learn smaller site MTUs from the tunnels' paths (`hub::path_mtu`).
    pub learn_site_mtus: bool,
    /// UDP segmentation offload for QUIC sends (`TransportTuning::segmentation_offload`).
    pub quic_gso: bool,
    /// Offer direct paths between public sites (`hub::rendezvous`).
    pub direct_paths: bool,
    /// `None`: automatic (85% of the cgroup limit); `Some(0)`: no budget; else bytes.
    pub memory_budget: Option<u64>,
    /// Bytes per second of large route syncs over all agents; 0 = unpaced.
    pub route_sync_rate: u64,
    /// Agents per second a fleet's return is spread for (`HubView::reconnect_spread_ms`);
    /// 0 = no spread.
    pub reconnect_rate: u32,
    pub relay_listen: RelayListen,
    /// The TCP fallback listener (`None`: off).
    pub tcp_listen: Option<SocketAddr>,
    pub node_name: Option<String>,
    pub vni: u32,
    pub flannel_port: u16,
    /// The API server's egress proxy, validated with the rest (off when no listener is set).
    pub egress: crate::egress::EgressConfig,
    /// `Some`: Kubernetes mode (`node_name` is set and `hub_name` equals it).
    pub kube: Option<crate::k8s::KubeSettings>,
}

pub fn load_file(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Where the hub's VXLAN relay listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayListen {
    /// No data plane.
    Off,
    /// The hub node's underlay address and 127.0.0.1, on this port: not every address of the
    /// host, so frames sent to its public address never reach the relay.
    Auto { port: u16 },
    /// Exactly these.
    Addrs(Vec<SocketAddr>),
}

/// The relay port node roles send to.
pub const DEFAULT_RELAY_PORT: u16 = 8473;

impl RelayListen {
    fn parse(v: Option<&str>) -> Result<Self, ConfigError> {
        match v.map(str::trim) {
            None | Some("auto") => Ok(Self::Auto {
                port: DEFAULT_RELAY_PORT,
            }),
            Some("off") => Ok(Self::Off),
            Some(list) => {
                let addrs = list
                    .split(',')
                    .map(|a| parse_socket_addr("relay-listen", a.trim()))
                    .collect::<Result<Vec<_>, _>>()?;
                if addrs.len() > 8 {
                    return Err(ConfigError::Invalid {
                        field: "relay-listen",
                        value: list.into(),
                        allowed: "at most 8 addresses".into(),
                    });
                }
                Ok(Self::Addrs(addrs))
            }
        }
    }

    /// The addresses to bind, given this node's underlay address. `auto` without one (no
    /// `--node-name`, or a node the inventory has no address for) falls back to every address,
    /// so an existing hub keeps relaying after an upgrade: `Err` carries that list and why.
    pub fn resolve(
        &self,
        underlay: Option<std::net::IpAddr>,
    ) -> Result<Vec<SocketAddr>, (Vec<SocketAddr>, &'static str)> {
        match self {
            Self::Off => Ok(Vec::new()),
            Self::Addrs(a) => Ok(a.clone()),
            Self::Auto { port } => match underlay {
                Some(ip) if ip.is_loopback() => Ok(vec![SocketAddr::new(ip, *port)]),
                Some(ip) => Ok(vec![
                    SocketAddr::new(ip, *port),
                    SocketAddr::from(([127, 0, 0, 1], *port)),
                ]),
                None => Err((
                    vec![SocketAddr::from(([0, 0, 0, 0], *port))],
                    "this node's underlay address is not known (no --node-name, or the inventory has no address for it)",
                )),
            },
        }
    }
}

impl std::fmt::Display for RelayListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off (no data plane)"),
            Self::Auto { port } => write!(
                f,
                "auto (this node's underlay address and 127.0.0.1, port {port})"
            ),
            Self::Addrs(a) => {
                let list: Vec<String> = a.iter().map(ToString::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

impl HubConfig {
    /// Several hubs carry traffic at once: a static hub list (file mode) or
    /// `hub-mode = active-active` (Kubernetes mode).
    pub fn active_active(&self) -> bool {
        !self.hubs.is_empty() || self.kube.as_ref().is_some_and(|k| k.active_active)
    }

    pub fn from_args(args: RunArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let listen = parse_socket_addr(
            "listen",
            &args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.into()),
        )?;
        let admin_addr = parse_socket_addr(
            "admin-addr",
            &args
                .admin_addr
                .or(file.admin_addr)
                .unwrap_or_else(|| DEFAULT_ADMIN.into()),
        )?;
        let state_dir = args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| setting_values::default_state_dir("gateway"));
        let inventory = args.inventory.or(file.inventory);
        let advertise_raw = if args.advertise.is_empty() {
            file.advertise
        } else {
            args.advertise
        };
        let mut advertise = advertise_raw
            .iter()
            .map(|a| parse_host_port("advertise", a))
            .collect::<Result<Vec<_>, _>>()?;
        let advertise_given = !advertise.is_empty();
        if advertise.is_empty() {
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                listen.ip().to_string()
            };
            advertise.push((host, listen.port()));
        }
        let kube = args
            .kube
            .resolve(file.inventory_source.as_deref(), &file.kubernetes)?;
        let node_name = args.node_name.or(file.node_name);
        let hub_name_arg = args.hub_name.or(file.hub_name);
        if kube.is_some() {
            let Some(node) = node_name.as_deref() else {
                return Err(ConfigError::Invalid {
                    field: "node-name",
                    value: String::new(),
                    allowed: "required with --inventory-source kubernetes: the Node this hub runs on (set PETREL_NODE_NAME from spec.nodeName)".into(),
                });
            };
            if !crate::inventory::valid_node_name(node) {
                return Err(ConfigError::Invalid {
                    field: "node-name",
                    value: node.into(),
                    allowed: "a Kubernetes node name".into(),
                });
            }
            if let Some(h) = hub_name_arg.as_deref().filter(|h| *h != node) {
                return Err(ConfigError::Invalid {
                    field: "hub-name",
                    value: h.into(),
                    allowed: format!("in Kubernetes mode the hub is named after its node ({node}); leave hub-name unset"),
                });
            }
        }
        let hub_name = hub_name_arg
            .or_else(|| kube.as_ref().and(node_name.clone()))
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "hub".into())
            });
        let hubs = parse_hubs(
            if args.hubs.is_empty() {
                &file.hubs
            } else {
                &args.hubs
            },
            &hub_name,
            kube.is_some(),
        )?;
        let dur = |field, a: Option<String>, f: Option<String>, d: &str| {
            parse_duration(field, &a.or(f).unwrap_or_else(|| d.into()))
        };
        let agent_cert_ttl = dur(
            "agent-cert-ttl",
            args.agent_cert_ttl,
            file.agent_cert_ttl,
            "30d",
        )?;
        let keepalive = dur("keepalive", args.keepalive, file.keepalive, "5s")?;
        let idle_timeout = dur("idle-timeout", args.idle_timeout, file.idle_timeout, "15s")?;
        let drain_timeout = dur(
            "drain-timeout",
            args.drain_timeout,
            file.drain_timeout,
            "10s",
        )?;
        let restart_hint = dur("restart-hint", args.restart_hint, file.restart_hint, "1s")?;
        if agent_cert_ttl < Duration::from_secs(10) {
            return Err(ConfigError::Invalid {
                field: "agent-cert-ttl",
                value: format!("{agent_cert_ttl:?}"),
                allowed: "at least 10s".into(),
            });
        }
        if keepalive.is_zero() || keepalive >= idle_timeout {
            return Err(ConfigError::Invalid {
                field: "keepalive",
                value: humantime::format_duration(keepalive).to_string(),
                allowed: format!(
                    "more than 0 and less than idle-timeout ({})",
                    humantime::format_duration(idle_timeout)
                ),
            });
        }
        let congestion = match args.congestion.or(file.congestion) {
            Some(v) => parse_congestion("congestion", &v)?,
            None => CongestionControl::default(),
        };
        let site_mtu = args.site_mtu.or(file.site_mtu).unwrap_or(1380);
        if !(576..=1450).contains(&site_mtu) {
            return Err(ConfigError::Invalid {
                field: "site-mtu",
                value: site_mtu.to_string(),
                allowed: "576 to 1450".into(),
            });
        }
        let relay_listen = RelayListen::parse(args.relay_listen.or(file.relay_listen).as_deref())?;
        let tcp_listen = match args
            .tcp_listen
            .or(file.tcp_listen)
            .as_deref()
            .map(str::trim)
        {
            None | Some("off") => None,
            Some(a) => Some(parse_socket_addr("tcp-listen", a)?),
        };
        let vni = args.vni.or(file.vni).unwrap_or(1);
        if vni == 0 || vni > 0x00ff_ffff {
            return Err(ConfigError::Invalid {
                field: "vni",
                value: vni.to_string(),
                allowed: "1 to 16777215 (Flannel's default is 1)".into(),
            });
        }
        let flannel_port = args.flannel_port.or(file.flannel_port).unwrap_or(8472);
        let memory_budget = match args.memory_budget.or(file.memory_budget).as_deref() {
            None | Some("auto") => None,
            Some("off") => Some(0),
            Some(v) => Some(
                setting_values::size(v)
                    .filter(|b| *b >= 16 << 20)
                    .ok_or_else(|| ConfigError::Invalid {
                        field: "memory-budget",
                        value: v.to_string(),
                        allowed: "auto, off, or a size of at least 16MiB such as 400MiB or 2GiB"
                            .into(),
                    })?,
            ),
        };
        let route_sync_rate = match args.route_sync_rate.or(file.route_sync_rate).as_deref() {
            None => DEFAULT_ROUTE_SYNC_RATE,
            Some("off") => 0,
            Some(v) => setting_values::size(v)
                .filter(|b| *b >= 1 << 20)
                .ok_or_else(|| ConfigError::Invalid {
                    field: "route-sync-rate",
                    value: v.to_string(),
                    allowed: "off, or a size of at least 1MiB (per second) such as 64MiB".into(),
                })?,
        };
        let reconnect_rate = match args.reconnect_rate.or(file.reconnect_rate).as_deref() {
            None => DEFAULT_RECONNECT_RATE,
            Some("off") => 0,
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|r| *r > 0)
                .ok_or_else(|| ConfigError::Invalid {
                    field: "reconnect-rate",
                    value: v.to_string(),
                    allowed: "off, or agents per second (a whole number above 0) such as 1500"
                        .into(),
                })?,
        };
        // Last, as before egress moved in here: a bad egress value is reported after the hub's
        // own settings.
        let egress = crate::egress::EgressConfig::from_parts(&args.egress, &file.egress)?;
        Ok(Self {
            memory_budget,
            route_sync_rate,
            reconnect_rate,
            kube,
            relay_listen,
            tcp_listen,
            node_name,
            vni,
            flannel_port,
            listen,
            admin_addr,
            state_dir,
            inventory,
            advertise,
            advertise_given,
            hubs,
            hub_name,
            agent_cert_ttl,
            keepalive,
            idle_timeout,
            congestion,
            drain_timeout,
            restart_hint,
            site_mtu,
            learn_site_mtus: args
                .learn_site_mtus
                .or(file.learn_site_mtus)
                .unwrap_or(true),
            quic_gso: args.quic_gso.or(file.quic_gso).unwrap_or(true),
            direct_paths: args.direct_paths.or(file.direct_paths).unwrap_or(true),
            egress,
        })
    }
}

/// One entry of the static hub list: the hub's (node) name and the endpoint agents dial.
pub type StaticHub = (String, (String, u16));

/// `NAME=HOST:PORT` entries of the static hub list (`hubs`): at least two, names unique and
/// valid node names, this hub among them; file inventories only.
fn parse_hubs(raw: &[String], me: &str, kube: bool) -> Result<Vec<StaticHub>, ConfigError> {
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let invalid = |value: String, allowed: String| ConfigError::Invalid {
        field: "hubs",
        value,
        allowed,
    };
    if kube {
        return Err(invalid(
            raw.join(","),
            "only with a file inventory: in Kubernetes mode the hubs are the labelled nodes".into(),
        ));
    }
    let mut out: Vec<StaticHub> = Vec::with_capacity(raw.len());
    for entry in raw {
        let Some((name, endpoint)) = entry.trim().split_once('=') else {
            return Err(invalid(entry.clone(), "NAME=HOST:PORT".into()));
        };
        if !crate::inventory::valid_node_name(name) {
            return Err(invalid(
                entry.clone(),
                "NAME must be the hub's node name in the inventory".into(),
            ));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(invalid(entry.clone(), format!("{name} listed twice")));
        }
        out.push((name.to_string(), parse_host_port("hubs", endpoint)?));
    }
    if out.len() < 2 {
        return Err(invalid(
            raw.join(","),
            "at least two hubs (one hub needs no list)".into(),
        ));
    }
    if !out.iter().any(|(n, _)| n == me) {
        return Err(invalid(
            raw.join(","),
            format!("the list must include this hub, {me} (hub-name)"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn memory_budget_values() {
        let with = |v: &str| {
            HubConfig::from_args(
                RunArgs {
                    memory_budget: Some(v.into()),
                    ..Default::default()
                },
                FileConfig::default(),
            )
        };
        assert_eq!(with("auto").unwrap().memory_budget, None);
        assert_eq!(with("off").unwrap().memory_budget, Some(0));
        assert_eq!(with("400MiB").unwrap().memory_budget, Some(400 << 20));
        assert_eq!(with("2G").unwrap().memory_budget, Some(2 << 30));
        assert!(with("8MiB").is_err(), "below 16MiB");
        for bad in ["12MiB", "lots", "5TiB", "-1"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("memory-budget"), "{bad}: {e}");
        }
    }

    #[test]
    fn reconnect_rate_values() {
        let with = |args: Option<&str>, file: Option<&str>| {
            HubConfig::from_args(
                RunArgs {
                    reconnect_rate: args.map(Into::into),
                    ..Default::default()
                },
                FileConfig {
                    reconnect_rate: file.map(Into::into),
                    ..Default::default()
                },
            )
        };
        assert_eq!(
            with(None, None).unwrap().reconnect_rate,
            DEFAULT_RECONNECT_RATE
        );
        assert_eq!(with(Some("off"), None).unwrap().reconnect_rate, 0);
        assert_eq!(with(Some(" 4000 "), None).unwrap().reconnect_rate, 4000);
        // The flag wins over the file.
        assert_eq!(with(Some("200"), Some("9")).unwrap().reconnect_rate, 200);
        assert_eq!(with(None, Some("9")).unwrap().reconnect_rate, 9);
        for bad in ["0", "-5", "fast", "1.5", "5000000000"] {
            let e = with(Some(bad), None).unwrap_err().to_string();
            assert!(e.contains("reconnect-rate"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = HubConfig::from_args(RunArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.advertise, vec![("127.0.0.1".to_string(), 7443)]);
    }

    #[test]
    fn bad_values_name_the_field_and_what_is_allowed() {
        let e = HubConfig::from_args(
            RunArgs {
                listen: Some("nope".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("listen") && e.to_string().contains("IP:PORT"),
            "{e}"
        );
        let e = HubConfig::from_args(
            RunArgs {
                keepalive: Some("5 parsecs".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("keepalive"), "{e}");
        let e = HubConfig::from_args(
            RunArgs {
                keepalive: Some("20s".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("less than idle-timeout"), "{e}");
        let e = HubConfig::from_args(
            RunArgs {
                advertise: vec!["host".into()],
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("advertise"), "{e}");
        let e = HubConfig::from_args(
            RunArgs {
                congestion: Some("vegas".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("congestion") && e.to_string().contains("bbr"),
            "{e}"
        );
        let c = HubConfig::from_args(RunArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.congestion, CongestionControl::Bbr);
        let file: FileConfig = toml::from_str("congestion = 'Cubic'\n").unwrap();
        let c = HubConfig::from_args(RunArgs::default(), file).unwrap();
        assert_eq!(c.congestion, CongestionControl::Cubic);
    }

    #[test]
    fn the_static_hub_list_is_parsed_and_checked() {
        let with = |hubs: &[&str], name: &str| {
            HubConfig::from_args(
                RunArgs {
                    hubs: hubs.iter().map(|s| s.to_string()).collect(),
                    hub_name: Some(name.into()),
                    ..Default::default()
                },
                FileConfig::default(),
            )
        };
        let c = with(
            &["gw-1=203.0.113.10:7443", "gw-3=203.0.113.11:7444"],
            "gw-3",
        )
        .unwrap();
        assert_eq!(
            c.hubs,
            vec![
                ("gw-1".to_string(), ("203.0.113.10".to_string(), 7443)),
                ("gw-3".to_string(), ("203.0.113.11".to_string(), 7444)),
            ]
        );
        assert!(with(&[], "gw-1").unwrap().hubs.is_empty());
        for (hubs, name, why) in [
            (&["gw-1=203.0.113.10:7443"][..], "gw-1", "at least two"),
            (&["gw-1=a:1", "gw-3=b:1"][..], "gw-9", "include this hub"),
            (&["gw-1=a:1", "gw-1=b:1"][..], "gw-1", "twice"),
            (&["gw-1=a:1", "b:1"][..], "gw-1", "NAME=HOST:PORT"),
            (&["gw-1=a:1", "GW 3=b:1"][..], "gw-1", "node name"),
            (&["gw-1=a:1", "gw-3=b"][..], "gw-1", "hubs"),
        ] {
            let e = with(hubs, name).unwrap_err().to_string();
            assert!(e.contains(why), "{hubs:?}: {e}");
        }
        let file: FileConfig =
            toml::from_str("hubs = ['gw-1=a:1', 'gw-3=b:2']\nhub-name = 'gw-1'\n").unwrap();
        assert_eq!(
            HubConfig::from_args(RunArgs::default(), file)
                .unwrap()
                .hubs
                .len(),
            2
        );
    }

    #[test]
    fn quic_gso_defaults_on_and_file_and_flag_turn_it_off() {
        let c = HubConfig::from_args(RunArgs::default(), FileConfig::default()).unwrap();
        assert!(c.quic_gso);
        let file: FileConfig = toml::from_str("quic-gso = false\n").unwrap();
        assert!(
            !HubConfig::from_args(RunArgs::default(), file)
                .unwrap()
                .quic_gso
        );
        let file: FileConfig = toml::from_str("quic-gso = false\n").unwrap();
        let flag = RunArgs {
            quic_gso: Some(true),
            ..Default::default()
        };
        assert!(HubConfig::from_args(flag, file).unwrap().quic_gso);
    }

    #[test]
    fn file_values_apply_and_flags_win_and_typos_are_errors() {
        let file: FileConfig =
            toml::from_str("listen = '127.0.0.1:1'\nidle-timeout = '30s'\n").unwrap();
        let c = HubConfig::from_args(
            RunArgs {
                listen: Some("127.0.0.1:2".into()),
                ..Default::default()
            },
            file,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        let e = toml::from_str::<FileConfig>("listn = '127.0.0.1:1'\n").unwrap_err();
        assert!(e.to_string().contains("listn"));
    }
}
