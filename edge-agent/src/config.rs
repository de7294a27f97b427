//! The agent's command line, environment and config file, validated into typed configuration.
//! Precedence: flag > environment > config file (`--config`, TOML) > default. Invalid values are
//! a [`ConfigError`] naming the field; `main` exits 64 on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use petrel_transport::quic::CongestionControl;
use petrel_transport::setting_values::{self, parse_congestion, parse_duration, parse_host_port};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "petrel-edge-agent",
    version,
    about = "Petrel edge agent: enrols, dials the cloud hubs, carries the site's tunnel traffic"
)]
pub struct Cli {
    /// Optional TOML config file; flags and environment variables override it.
    #[arg(long, global = true, env = "PETREL_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, global = true, env = "PETREL_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enrol this device with a join token: make a key here, get a certificate for this node.
    Join(JoinArgs),
    /// Run the agent: keep a tunnel to every known hub.
    Run(Box<RunArgs>),
    /// Print this agent's connections (asks the running agent's admin endpoint).
    Status(StatusArgs),
    /// Remove every route, rule and device Petrel added to this node (also after a crash).
    Cleanup(DatapathArgs),
}

#[derive(Debug, Args, Default)]
pub struct JoinArgs {
    /// Hub address, HOST:PORT.
    #[arg(long, env = "PETREL_SERVER")]
    pub server: Option<String>,
    /// The join token from `petrel-gateway token create`.
    #[arg(long, env = "PETREL_JOIN_TOKEN")]
    pub token: Option<String>,
    /// SHA-256 fingerprint of the hub's CA (pins trust before any exists).
    #[arg(long = "ca-sha256", env = "PETREL_CA_SHA256")]
    pub ca_sha256: Option<String>,
    /// This node's name (default: the hostname, as the kubelet uses).
    #[arg(long, env = "PETREL_NODE_NAME")]
    pub node_name: Option<String>,
    #[arg(long, env = "PETREL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Enrol again even if this device already holds a certificate.
    #[arg(long)]
    pub force: bool,
    /// Bound of the whole enrolment; the hub's first answer must come within 3s (else: no
    /// answer, which means a closed port, a firewall or a wrong address).
    #[arg(long, default_value = "15s")]
    pub timeout: String,
}

#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Hub endpoints (HOST:PORT), repeatable or comma-separated; added to those the hubs push.
    #[arg(long = "server", env = "PETREL_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
    #[arg(long, env = "PETREL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Admin endpoint (/metrics, /healthz, /readyz, /status).
    #[arg(long, env = "PETREL_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// Application ping interval (RTT and liveness).
    #[arg(long, env = "PETREL_PING_INTERVAL")]
    pub ping_interval: Option<String>,
    /// Declare a hub dead after this long without hearing from it, and reconnect.
    #[arg(long, env = "PETREL_DEAD_AFTER")]
    pub dead_after: Option<String>,
    /// Cap of the reconnect backoff.
    #[arg(long, env = "PETREL_BACKOFF_MAX")]
    pub backoff_max: Option<String>,
    /// Timeout of one connection attempt.
    #[arg(long, env = "PETREL_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Congestion controller for traffic the agent sends to the hub: bbr (default; keeps its
    /// rate on WANs with random loss), cubic or newreno.
    #[arg(long, env = "PETREL_CONGESTION")]
    pub congestion: Option<String>,
    /// `auto` (default: QUIC over UDP, and QUIC over TLS on TCP while UDP gets no answer),
    /// `udp` or `tcp` (always the TCP fallback: a network known to block UDP).
    #[arg(long, env = "PETREL_TRANSPORT")]
    pub transport: Option<String>,
    /// TCP port of the hubs' fallback listener (on each hub endpoint's host).
    #[arg(long, env = "PETREL_TCP_PORT")]
    pub tcp_port: Option<u16>,
    /// On the TCP fallback, how often UDP is tried again (default 30s).
    #[arg(long, env = "PETREL_UDP_RETRY_INTERVAL")]
    pub udp_retry_interval: Option<String>,
    /// Take the hubs' offers of direct paths to other public sites (default true): frames to
    /// such a peer then go straight to it over QUIC from the tunnel's socket while that works,
    /// else through the hub. Off: everything goes through the hub.
    #[arg(long, env = "PETREL_DIRECT_PATHS")]
    pub direct_paths: Option<bool>,
    /// Zero-touch enrolment: the node's kubelet kubeconfig (e.g. /etc/kubernetes/kubelet.conf
    /// or /var/lib/kubelet/kubeconfig). When this device holds no valid certificate, the agent
    /// asks for one with a CertificateSigningRequest made with these credentials, signed by
    /// the active hub (signer petrel.io/edge-tunnel); no join token is needed.
    #[arg(long, env = "PETREL_KUBELET_KUBECONFIG")]
    pub kubelet_kubeconfig: Option<PathBuf>,
    /// This node's name (zero-touch enrolment; default: the host name, as the kubelet uses).
    #[arg(long, env = "PETREL_NODE_NAME")]
    pub node_name: Option<String>,
    /// How long zero-touch enrolment waits for the hub to sign.
    #[arg(long, env = "PETREL_ENROL_TIMEOUT")]
    pub enrol_timeout: Option<String>,
    #[command(flatten)]
    pub datapath: DatapathArgs,
}

/// Kernel-hook settings (`run` and `cleanup`).
#[derive(Debug, Args, Clone, Default)]
pub struct DatapathArgs {
    /// Kernel hook: auto, fast (kernel VXLAN, local bypass off; kernel >= 6.6), portable (TUN +
    /// policy routing), or none (no data plane: control and proxied streams only).
    #[arg(long, env = "PETREL_HOOKS")]
    pub hooks: Option<String>,
    /// Local UDP port where the kernel hands frames for the hub to the agent.
    #[arg(long, env = "PETREL_RELAY_PORT")]
    pub relay_port: Option<u16>,
    /// Flannel's VXLAN device.
    #[arg(long, env = "PETREL_FLANNEL_DEV")]
    pub flannel_dev: Option<String>,
    /// Routing table that holds Petrel's routes.
    #[arg(long, env = "PETREL_ROUTE_TABLE")]
    pub route_table: Option<u32>,
    /// Preference of Petrel's policy rules.
    #[arg(long, env = "PETREL_RULE_PREF")]
    pub rule_pref: Option<u32>,
}

impl DatapathArgs {
    /// `Ok(None)` when the data plane is off (`--hooks none`).
    pub fn to_config(
        &self,
        file: &FileConfig,
    ) -> Result<Option<petrel_datapath::DatapathConfig>, ConfigError> {
        let hooks = self
            .hooks
            .clone()
            .or_else(|| file.hooks.clone())
            .unwrap_or_else(|| "auto".into());
        if hooks == "none" {
            return Ok(None);
        }
        let hook = hooks.parse().map_err(|_| ConfigError::Invalid {
            field: "hooks",
            value: hooks.clone(),
            allowed: "auto, fast, portable, none".into(),
        })?;
        let mut cfg = petrel_datapath::DatapathConfig {
            hook,
            ..Default::default()
        };
        if let Some(p) = self.relay_port.or(file.relay_port) {
            cfg.relay_port = p;
        }
        if let Some(d) = self
            .flannel_dev
            .clone()
            .or_else(|| file.flannel_dev.clone())
        {
            cfg.flannel_dev = d;
        }
        if let Some(t) = self.route_table.or(file.route_table) {
            cfg.table = t;
        }
        if let Some(p) = self.rule_pref.or(file.rule_pref) {
            cfg.rule_pref = p;
        }
        cfg.validate().map_err(|e| ConfigError::Invalid {
            field: "datapath",
            value: String::new(),
            allowed: e.to_string(),
        })?;
        Ok(Some(cfg))
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, env = "PETREL_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(alias = "state_dir")]
    pub state_dir: Option<PathBuf>,
    #[serde(alias = "admin_addr")]
    pub admin_addr: Option<String>,
    #[serde(alias = "node_name")]
    pub node_name: Option<String>,
    #[serde(alias = "ping_interval")]
    pub ping_interval: Option<String>,
    #[serde(alias = "dead_after")]
    pub dead_after: Option<String>,
    #[serde(alias = "backoff_max")]
    pub backoff_max: Option<String>,
    #[serde(alias = "connect_timeout")]
    pub connect_timeout: Option<String>,
    pub congestion: Option<String>,
    pub transport: Option<String>,
    #[serde(alias = "tcp_port")]
    pub tcp_port: Option<u16>,
    #[serde(alias = "udp_retry_interval")]
    pub udp_retry_interval: Option<String>,
    #[serde(alias = "direct_paths")]
    pub direct_paths: Option<bool>,
    pub log: Option<String>,
    pub hooks: Option<String>,
    #[serde(alias = "relay_port")]
    pub relay_port: Option<u16>,
    #[serde(alias = "flannel_dev")]
    pub flannel_dev: Option<String>,
    #[serde(alias = "route_table")]
    pub route_table: Option<u32>,
    #[serde(alias = "rule_pref")]
    pub rule_pref: Option<u32>,
    #[serde(alias = "kubelet_kubeconfig")]
    pub kubelet_kubeconfig: Option<PathBuf>,
    #[serde(alias = "enrol_timeout")]
    pub enrol_timeout: Option<String>,
}

/// The configuration error both binaries share (see [`setting_values`]).
pub use petrel_transport::setting_values::ConfigError;

/// Where the agent keeps its identity and endpoints when nobody says.
pub fn default_state_dir() -> PathBuf {
    setting_values::default_state_dir("agent")
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9471";

#[derive(Debug, Clone)]
pub struct JoinConfig {
    pub server: (String, u16),
    pub token: String,
    pub ca_sha256: String,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub force: bool,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub servers: Vec<(String, u16)>,
    pub state_dir: PathBuf,
    pub admin_addr: SocketAddr,
    pub ping_interval: Duration,
    pub dead_after: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    pub congestion: CongestionControl,
    /// UDP, TCP, or UDP with the TCP fallback (`crate::transport_choice`).
    pub transport: crate::transport_choice::TransportMode,
    /// The hubs' TCP fallback port.
    pub tcp_port: u16,
    /// On the TCP fallback, how often UDP is tried again.
    pub udp_retry_interval: Duration,
    /// Take direct-path offers (`crate::direct_paths`); only with a data plane.
    pub direct_paths: bool,
    /// `None`: no data plane.
    pub datapath: Option<petrel_datapath::DatapathConfig>,
    /// Zero-touch enrolment from the node's kubelet credentials, if configured.
    pub kube_enrol: Option<KubeEnrolConfig>,
}

/// Zero-touch enrolment settings (see [`crate::kube_enrol`]).
#[derive(Debug, Clone)]
pub struct KubeEnrolConfig {
    pub kubeconfig: PathBuf,
    pub node_name: String,
    pub timeout: Duration,
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

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
}

impl JoinConfig {
    pub fn from_args(args: JoinArgs, file: &FileConfig) -> Result<Self, ConfigError> {
        let server = args.server.ok_or(ConfigError::Missing {
            field: "server",
            hint: "pass --server HOST:PORT (printed by `petrel-gateway token create`)",
        })?;
        let server = parse_host_port("server", &server)?;
        let token = args.token.ok_or(ConfigError::Missing {
            field: "token",
            hint: "pass --token from `petrel-gateway token create`",
        })?;
        let fp = args.ca_sha256.ok_or(ConfigError::Missing {
            field: "ca-sha256",
            hint: "pass --ca-sha256 from `petrel-gateway token create`",
        })?;
        let ca_sha256 = petrel_transport::pki::normalize_fingerprint(&fp).ok_or_else(|| {
            ConfigError::Invalid {
                field: "ca-sha256",
                value: fp.clone(),
                allowed: "64 hex digits (colons and a sha256: prefix are accepted)".into(),
            }
        })?;
        let node_name = node_name(args.node_name, file.node_name.clone(), "pass --node-name")?;
        Ok(Self {
            server,
            token,
            ca_sha256,
            node_name,
            state_dir: args
                .state_dir
                .or_else(|| file.state_dir.clone())
                .unwrap_or_else(default_state_dir),
            force: args.force,
            timeout: parse_duration("timeout", &args.timeout)?,
        })
    }
}

impl AgentConfig {
    pub fn from_args(args: RunArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let datapath = args.datapath.to_config(&file)?;
        let raw = if args.servers.is_empty() {
            file.servers
        } else {
            args.servers
        };
        let servers = raw
            .iter()
            .map(|s| parse_host_port("server", s))
            .collect::<Result<Vec<_>, _>>()?;
        let admin = args
            .admin_addr
            .or(file.admin_addr)
            .unwrap_or_else(|| DEFAULT_ADMIN.into());
        let admin_addr = setting_values::parse_socket_addr("admin-addr", &admin)?;
        let dur = |field, a: Option<String>, f: Option<String>, d: &str| {
            parse_duration(field, &a.or(f).unwrap_or_else(|| d.into()))
        };
        let ping_interval = dur(
            "ping-interval",
            args.ping_interval,
            file.ping_interval,
            "2s",
        )?;
        let dead_after = dur("dead-after", args.dead_after, file.dead_after, "5s")?;
        let backoff_max = dur("backoff-max", args.backoff_max, file.backoff_max, "2s")?;
        let connect_timeout = dur(
            "connect-timeout",
            args.connect_timeout,
            file.connect_timeout,
            "3s",
        )?;
        if ping_interval.is_zero() || dead_after <= ping_interval {
            return Err(ConfigError::Invalid {
                field: "dead-after",
                value: humantime::format_duration(dead_after).to_string(),
                allowed: format!(
                    "longer than ping-interval ({})",
                    humantime::format_duration(ping_interval)
                ),
            });
        }
        let congestion = match args.congestion.or(file.congestion) {
            Some(v) => parse_congestion("congestion", &v)?,
            None => CongestionControl::default(),
        };
        let transport = match args.transport.or(file.transport) {
            None => crate::transport_choice::TransportMode::default(),
            Some(v) => {
                crate::transport_choice::TransportMode::parse(v.trim()).ok_or_else(|| {
                    ConfigError::Invalid {
                        field: "transport",
                        value: v.clone(),
                        allowed: "auto, udp or tcp".into(),
                    }
                })?
            }
        };
        let tcp_port = args.tcp_port.or(file.tcp_port).unwrap_or(443);
        let udp_retry_interval = parse_duration(
            "udp-retry-interval",
            &args
                .udp_retry_interval
                .or(file.udp_retry_interval)
                .unwrap_or_else(|| "30s".into()),
        )?;
        if udp_retry_interval < Duration::from_secs(1)
            || udp_retry_interval > Duration::from_secs(86_400)
        {
            return Err(ConfigError::Invalid {
                field: "udp-retry-interval",
                value: humantime::format_duration(udp_retry_interval).to_string(),
                allowed: "1s to 1d".into(),
            });
        }
        if tcp_port == 0 {
            return Err(ConfigError::Invalid {
                field: "tcp-port",
                value: "0".into(),
                allowed: "1-65535".into(),
            });
        }
        if backoff_max < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                field: "backoff-max",
                value: humantime::format_duration(backoff_max).to_string(),
                allowed: "at least 100ms".into(),
            });
        }
        let kube_enrol = match args.kubelet_kubeconfig.or(file.kubelet_kubeconfig) {
            None => None,
            Some(kubeconfig) => {
                let node_name = node_name(
                    args.node_name,
                    file.node_name.clone(),
                    "pass --node-name (zero-touch enrolment needs this node's name)",
                )?;
                let timeout = dur(
                    "enrol-timeout",
                    args.enrol_timeout,
                    file.enrol_timeout,
                    "10m",
                )?;
                if timeout < Duration::from_secs(1) {
                    return Err(ConfigError::Invalid {
                        field: "enrol-timeout",
                        value: humantime::format_duration(timeout).to_string(),
                        allowed: "at least 1s".into(),
                    });
                }
                Some(KubeEnrolConfig {
                    kubeconfig,
                    node_name,
                    timeout,
                })
            }
        };
        Ok(Self {
            kube_enrol,
            servers,
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(default_state_dir),
            admin_addr,
            ping_interval,
            dead_after,
            backoff_max,
            connect_timeout,
            congestion,
            transport,
            tcp_port,
            udp_retry_interval,
            direct_paths: args.direct_paths.or(file.direct_paths).unwrap_or(true)
                && datapath.is_some(),
            datapath,
        })
    }
}

/// This device's node name: the flag, the config file, else the host name; checked as a
/// Kubernetes node name.
fn node_name(
    flag: Option<String>,
    file: Option<String>,
    hint: &'static str,
) -> Result<String, ConfigError> {
    let name = flag
        .or(file)
        .or_else(hostname)
        .ok_or(ConfigError::Missing {
            field: "node-name",
            hint,
        })?;
    if !petrel_proto::codec::is_valid_node_name(&name) {
        return Err(ConfigError::Invalid {
            field: "node-name",
            value: name,
            allowed: "a Kubernetes node name (lowercase letters, digits, '-', '.')".into(),
        });
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn join_requires_and_validates_its_fields() {
        let base = || JoinArgs {
            server: Some("127.0.0.1:7443".into()),
            token: Some("abcdef.0123456789abcdef".into()),
            ca_sha256: Some("AB".repeat(32)),
            node_name: Some("edge-a1".into()),
            timeout: "15s".into(),
            ..Default::default()
        };
        let c = JoinConfig::from_args(base(), &FileConfig::default()).unwrap();
        assert_eq!(c.ca_sha256, "ab".repeat(32));
        let e = JoinConfig::from_args(
            JoinArgs {
                ca_sha256: Some("xyz".into()),
                ..base()
            },
            &FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ca-sha256"), "{e}");
        let e = JoinConfig::from_args(
            JoinArgs {
                server: None,
                ..base()
            },
            &FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("server"), "{e}");
        let e = JoinConfig::from_args(
            JoinArgs {
                node_name: Some("Edge_A1".into()),
                ..base()
            },
            &FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("node-name"), "{e}");
    }

    #[test]
    fn run_defaults_and_bad_values() {
        let c = AgentConfig::from_args(RunArgs::default(), FileConfig::default()).unwrap();
        assert!(c.dead_after > c.ping_interval);
        assert_eq!(c.congestion, CongestionControl::Bbr);
        let e = AgentConfig::from_args(
            RunArgs {
                congestion: Some("westwood".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("congestion"), "{e}");
        let c = AgentConfig::from_args(
            RunArgs {
                congestion: Some("cubic".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(c.congestion, CongestionControl::Cubic);
        let e = AgentConfig::from_args(
            RunArgs {
                dead_after: Some("1s".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("dead-after"), "{e}");
        let e = toml::from_str::<FileConfig>("servrs = ['a:1']").unwrap_err();
        assert!(e.to_string().contains("servrs"));
    }
}
