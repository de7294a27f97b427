//! Egress flags, the `[egress]` table of the config file, and their validation into
//! [`EgressConfig`]. Precedence as everywhere: flag > environment > file > default; a bad value
//! is a [`ConfigError`] naming the field (`egress-...`) and what is allowed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use petrel_transport::setting_values::{parse_duration, parse_socket_addr};

use super::resolve::PortPolicy;
use petrel_transport::setting_values::ConfigError;

/// Egress flags (flattened into `petrel-gateway run`).
#[derive(Debug, Args, Default, Clone)]
pub struct EgressArgs {
    /// Unix socket for kube-apiserver's egress (HTTPConnect over `uds`).
    #[arg(id = "egress-uds", long = "egress-uds", env = "PETREL_EGRESS_UDS")]
    pub uds: Option<PathBuf>,
    /// Permissions of the egress Unix socket, octal (default 0600).
    #[arg(
        id = "egress-uds-mode",
        long = "egress-uds-mode",
        env = "PETREL_EGRESS_UDS_MODE"
    )]
    pub uds_mode: Option<String>,
    /// TCP address of the mutual-TLS CONNECT listener (HTTPConnect over `tcp` with `tlsConfig`).
    #[arg(
        id = "egress-listen",
        long = "egress-listen",
        env = "PETREL_EGRESS_LISTEN"
    )]
    pub listen: Option<String>,
    /// Serving certificate chain (PEM) of the mutual-TLS CONNECT listener.
    #[arg(
        id = "egress-tls-cert",
        long = "egress-tls-cert",
        env = "PETREL_EGRESS_TLS_CERT"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the mutual-TLS CONNECT listener.
    #[arg(
        id = "egress-tls-key",
        long = "egress-tls-key",
        env = "PETREL_EGRESS_TLS_KEY"
    )]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to (the cluster CA that signed the
    /// API server's egress client certificate). Required with --egress-listen.
    #[arg(
        id = "egress-client-ca",
        long = "egress-client-ca",
        env = "PETREL_EGRESS_CLIENT_CA"
    )]
    pub client_ca: Option<PathBuf>,
    /// Client identities admitted on the mutual-TLS listener, comma-separated: a certificate is
    /// accepted only if its subject CN or one of its DNS names is on the list (default
    /// kube-apiserver,kube-apiserver-kubelet-client,kube-apiserver-proxy-client,
    /// kube-apiserver-egress). The client CA is usually the cluster CA, which also signs every
    /// kubelet's certificate: kubelet identities (`system:node:*`, group `system:nodes`) and
    /// Petrel's own node certificates are refused whatever this says.
    #[arg(
        id = "egress-client-names",
        long = "egress-client-names",
        env = "PETREL_EGRESS_CLIENT_NAMES"
    )]
    pub client_names: Option<String>,
    /// TCP address of the TLS passthrough listener that routes by SNI (node name) to the node's
    /// kubelet port, e.g. 0.0.0.0:10250.
    #[arg(
        id = "egress-sni-listen",
        long = "egress-sni-listen",
        env = "PETREL_EGRESS_SNI_LISTEN"
    )]
    pub sni_listen: Option<String>,
    /// TCP address of the plain-HTTP listener that routes by Host (node name) to the node's
    /// read-only kubelet port, e.g. 0.0.0.0:10255.
    #[arg(
        id = "egress-http-listen",
        long = "egress-http-listen",
        env = "PETREL_EGRESS_HTTP_LISTEN"
    )]
    pub http_listen: Option<String>,
    /// Port the Host-routed plain-HTTP listener forwards to on the node (default 10255).
    #[arg(
        id = "egress-http-port",
        long = "egress-http-port",
        env = "PETREL_EGRESS_HTTP_PORT"
    )]
    pub http_port: Option<u16>,
    /// Ports allowed on node names and addresses, comma-separated (default 10250,10255; each
    /// node's kubelet port from the inventory is always allowed).
    #[arg(
        id = "egress-node-ports",
        long = "egress-node-ports",
        env = "PETREL_EGRESS_NODE_PORTS"
    )]
    pub node_ports: Option<String>,
    /// Ports allowed on pod IPs: `any` (default) or a comma-separated list.
    #[arg(
        id = "egress-pod-ports",
        long = "egress-pod-ports",
        env = "PETREL_EGRESS_POD_PORTS"
    )]
    pub pod_ports: Option<String>,
    /// Connect timeout for one proxied dial (agent or hub), e.g. 10s.
    #[arg(
        id = "egress-connect-timeout",
        long = "egress-connect-timeout",
        env = "PETREL_EGRESS_CONNECT_TIMEOUT"
    )]
    pub connect_timeout: Option<String>,
    /// Time a client has to send its request head (or TLS ClientHello), e.g. 10s.
    #[arg(
        id = "egress-request-timeout",
        long = "egress-request-timeout",
        env = "PETREL_EGRESS_REQUEST_TIMEOUT"
    )]
    pub request_timeout: Option<String>,
    /// Dials in progress per agent (default 64); more are answered 503 at once.
    #[arg(
        id = "egress-max-pending-per-agent",
        long = "egress-max-pending-per-agent",
        env = "PETREL_EGRESS_MAX_PENDING_PER_AGENT"
    )]
    pub max_pending_per_agent: Option<usize>,
    /// Dials in progress in total (default 1024).
    #[arg(
        id = "egress-max-pending",
        long = "egress-max-pending",
        env = "PETREL_EGRESS_MAX_PENDING"
    )]
    pub max_pending: Option<usize>,
    /// Connections being handled by the egress listeners at once, established ones included
    /// (default 16384); more are closed at once.
    #[arg(
        id = "egress-max-connections",
        long = "egress-max-connections",
        env = "PETREL_EGRESS_MAX_CONNECTIONS"
    )]
    pub max_connections: Option<usize>,
    /// Connections the unauthenticated listeners (SNI passthrough, Host-routed HTTP) handle at
    /// once (default 1024), counted apart from the API server's, so a flood on them never
    /// takes a slot the API server's CONNECTs need.
    #[arg(
        id = "egress-max-unauthenticated",
        long = "egress-max-unauthenticated",
        env = "PETREL_EGRESS_MAX_UNAUTHENTICATED"
    )]
    pub max_unauthenticated: Option<usize>,
    /// Mutual-TLS handshakes in progress at once (default 256); the TLS listener's connections
    /// count against egress-max-connections only once their client is authenticated.
    #[arg(
        id = "egress-max-tls-handshakes",
        long = "egress-max-tls-handshakes",
        env = "PETREL_EGRESS_MAX_TLS_HANDSHAKES"
    )]
    pub max_tls_handshakes: Option<usize>,
}

/// Ports in the config file: a list, or a string ("any" or "80,443").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortsValue {
    List(Vec<u16>),
    Text(String),
}

/// The `[egress]` table of the config file (same names as the flags without `egress-`).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EgressFileConfig {
    pub uds: Option<PathBuf>,
    pub uds_mode: Option<String>,
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub client_names: Option<NamesValue>,
    pub sni_listen: Option<String>,
    pub http_listen: Option<String>,
    pub http_port: Option<u16>,
    pub node_ports: Option<PortsValue>,
    pub pod_ports: Option<PortsValue>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub max_pending_per_agent: Option<usize>,
    pub max_pending: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_unauthenticated: Option<usize>,
    pub max_tls_handshakes: Option<usize>,
}

/// Names in the config file: a list, or a comma-separated string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NamesValue {
    List(Vec<String>),
    Text(String),
}

/// What a kube-apiserver presents for egress in the common setups: kubeadm's kubelet-client
/// certificate, and the names the egress guides give a dedicated proxy-client certificate.
pub const DEFAULT_CLIENT_NAMES: [&str; 4] = [
    "kube-apiserver",
    "kube-apiserver-kubelet-client",
    "kube-apiserver-proxy-client",
    "kube-apiserver-egress",
];

/// The mutual-TLS CONNECT listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Client identities admitted (subject CN or DNS SAN).
    pub client_names: Vec<String>,
}

fn parse_client_names(text: &str) -> Result<Vec<String>, ConfigError> {
    let names: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    let kubelet = |n: &String| n.starts_with("system:node:") || n == "system:nodes";
    if names.is_empty() || names.len() > 64 || names.iter().any(|n| n.len() > 253 || kubelet(n)) {
        return Err(invalid(
            "egress-client-names",
            text,
            "a comma-separated list of certificate names (CN or DNS SAN), at most 64; kubelet identities (system:node:*) are never allowed",
        ));
    }
    Ok(names)
}

/// Validated egress configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    pub uds: Option<PathBuf>,
    pub uds_mode: u32,
    pub tls: Option<TlsListener>,
    pub sni_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub http_port: u16,
    pub ports: PortPolicy,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_pending_per_agent: usize,
    pub max_pending: usize,
    /// Connections of the API server's listeners (Unix socket, mutual TLS once authenticated).
    pub max_connections: usize,
    /// Connections of the SNI and Host-routed listeners.
    pub max_unauthenticated: usize,
    /// Mutual-TLS handshakes in progress.
    pub max_tls_handshakes: usize,
    /// File descriptors the API server's listeners may hold at once: one per connection (its
    /// client socket) and one more per direct dial (cloud and Express Connect targets). Set by
    /// [`fit_descriptors`](Self::fit_descriptors) from the open-file limit; a stream to an edge
    /// node rides the agent's tunnel and needs no second descriptor, so this is shared rather
    /// than reserved twice per connection.
    pub api_descriptors: usize,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            uds: None,
            uds_mode: 0o600,
            tls: None,
            sni_listen: None,
            http_listen: None,
            http_port: 10255,
            ports: PortPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_pending_per_agent: 64,
            max_pending: 1024,
            max_connections: 16384,
            max_unauthenticated: 1024,
            max_tls_handshakes: 256,
            api_descriptors: 2 * 16384,
        }
    }
}

fn invalid(field: &'static str, value: impl Into<String>, allowed: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.into(),
        allowed: allowed.into(),
    }
}

fn parse_port_list(field: &'static str, text: &str) -> Result<Vec<u16>, ConfigError> {
    let allowed = "a comma-separated list of ports 1-65535, e.g. 10250,10255";
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u16>() {
            Ok(p) if p != 0 => out.push(p),
            _ => return Err(invalid(field, text, allowed)),
        }
    }
    if out.is_empty() || out.len() > petrel_proto::control::MAX_EGRESS_PORTS {
        return Err(invalid(field, text, allowed));
    }
    Ok(out)
}

fn ports_value(field: &'static str, v: PortsValue) -> Result<Vec<u16>, ConfigError> {
    match v {
        PortsValue::Text(t) => parse_port_list(field, &t),
        PortsValue::List(l) => {
            let text = l.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
            parse_port_list(field, &text)
        }
    }
}

impl EgressConfig {
    /// Validates flags over file values over defaults.
    pub fn from_parts(args: &EgressArgs, file: &EgressFileConfig) -> Result<Self, ConfigError> {
        let d = EgressConfig::default();
        let addr = |field, a: &Option<String>, f: &Option<String>| {
            a.clone()
                .or_else(|| f.clone())
                .map(|v| parse_socket_addr(field, &v))
                .transpose()
        };
        let uds_mode = match args.uds_mode.clone().or_else(|| file.uds_mode.clone()) {
            None => d.uds_mode,
            Some(m) => {
                let digits = m.trim_start_matches("0o");
                match u32::from_str_radix(digits, 8) {
                    Ok(v) if v <= 0o777 && !digits.is_empty() => v,
                    _ => {
                        return Err(invalid(
                            "egress-uds-mode",
                            m,
                            "an octal file mode such as 0600 or 0660",
                        ))
                    }
                }
            }
        };
        let listen = addr("egress-listen", &args.listen, &file.listen)?;
        let tls = match listen {
            None => None,
            Some(listen) => {
                let need = |field: &'static str, a: &Option<PathBuf>, f: &Option<PathBuf>| {
                    a.clone().or_else(|| f.clone()).ok_or_else(|| {
                        invalid(
                            field,
                            "",
                            "a PEM file path; required with egress-listen (the CONNECT listener always uses mutual TLS)",
                        )
                    })
                };
                let client_names = match (&args.client_names, &file.client_names) {
                    (Some(a), _) => parse_client_names(a)?,
                    (None, Some(NamesValue::Text(t))) => parse_client_names(t)?,
                    (None, Some(NamesValue::List(l))) => parse_client_names(&l.join(","))?,
                    (None, None) => DEFAULT_CLIENT_NAMES.iter().map(|s| s.to_string()).collect(),
                };
                Some(TlsListener {
                    listen,
                    cert: need("egress-tls-cert", &args.tls_cert, &file.tls_cert)?,
                    key: need("egress-tls-key", &args.tls_key, &file.tls_key)?,
                    client_ca: need("egress-client-ca", &args.client_ca, &file.client_ca)?,
                    client_names,
                })
            }
        };
        let node_ports = match (&args.node_ports, &file.node_ports) {
            (Some(a), _) => parse_port_list("egress-node-ports", a)?,
            (None, Some(f)) => ports_value("egress-node-ports", f.clone())?,
            (None, None) => d.ports.node_ports.clone(),
        };
        let pod_ports_raw = match (&args.pod_ports, &file.pod_ports) {
            (Some(a), _) => Some(PortsValue::Text(a.clone())),
            (None, f) => f.clone(),
        };
        let pod_ports = match pod_ports_raw {
            None => None,
            Some(PortsValue::Text(t)) if t.trim().eq_ignore_ascii_case("any") => None,
            Some(v) => Some(ports_value("egress-pod-ports", v)?),
        };
        let dur = |field, a: &Option<String>, f: &Option<String>, def: Duration| match a
            .clone()
            .or_else(|| f.clone())
        {
            None => Ok(def),
            Some(v) => {
                let parsed = parse_duration(field, &v)?;
                if parsed.is_zero() || parsed > Duration::from_secs(300) {
                    return Err(invalid(field, v, "more than 0 and at most 5m"));
                }
                Ok(parsed)
            }
        };
        let count = |field, a: Option<usize>, f: Option<usize>, def: usize, max: usize| {
            let v = a.or(f).unwrap_or(def);
            if v == 0 || v > max {
                return Err(invalid(
                    field,
                    v.to_string(),
                    &format!("between 1 and {max}"),
                ));
            }
            Ok(v)
        };
        let http_port = args.http_port.or(file.http_port).unwrap_or(d.http_port);
        if http_port == 0 {
            return Err(invalid("egress-http-port", "0", "a port 1-65535"));
        }
        let max_connections = count(
            "egress-max-connections",
            args.max_connections,
            file.max_connections,
            d.max_connections,
            1 << 20,
        )?;
        Ok(Self {
            uds: args.uds.clone().or_else(|| file.uds.clone()),
            uds_mode,
            tls,
            sni_listen: addr("egress-sni-listen", &args.sni_listen, &file.sni_listen)?,
            http_listen: addr("egress-http-listen", &args.http_listen, &file.http_listen)?,
            http_port,
            ports: PortPolicy {
                node_ports,
                pod_ports,
            },
            connect_timeout: dur(
                "egress-connect-timeout",
                &args.connect_timeout,
                &file.connect_timeout,
                d.connect_timeout,
            )?,
            request_timeout: dur(
                "egress-request-timeout",
                &args.request_timeout,
                &file.request_timeout,
                d.request_timeout,
            )?,
            max_pending_per_agent: count(
                "egress-max-pending-per-agent",
                args.max_pending_per_agent,
                file.max_pending_per_agent,
                d.max_pending_per_agent,
                65_536,
            )?,
            max_pending: count(
                "egress-max-pending",
                args.max_pending,
                file.max_pending,
                d.max_pending,
                1 << 20,
            )?,
            max_connections,
            max_unauthenticated: count(
                "egress-max-unauthenticated",
                args.max_unauthenticated,
                file.max_unauthenticated,
                d.max_unauthenticated,
                1 << 20,
            )?,
            max_tls_handshakes: count(
                "egress-max-tls-handshakes",
                args.max_tls_handshakes,
                file.max_tls_handshakes,
                d.max_tls_handshakes,
                1 << 16,
            )?,
            // The worst case until `fit_descriptors` knows the open-file limit.
            api_descriptors: max_connections.saturating_mul(2),
        })
    }

    /// File descriptors the listeners may hold at once when every cap is full: each
    /// unauthenticated connection and TLS handshake its client socket and perhaps a direct dial
    /// (reserved: a flood there must never take the API server's), plus the API server's
    /// [`api_descriptors`](Self::api_descriptors).
    pub fn descriptors_needed(&self) -> u64 {
        self.unauthenticated_descriptors()
            .saturating_add(self.api_descriptors as u64)
    }

    fn unauthenticated_descriptors(&self) -> u64 {
        ((self.max_unauthenticated + self.max_tls_handshakes) as u64).saturating_mul(2)
    }

    /// Fits the caps into `budget` descriptors. The unauthenticated pools keep two descriptors
    /// per connection, reserved, but at most a quarter of the budget (scaled down in proportion,
    /// each at least 1); the API server's listeners share what is left between client sockets
    /// and direct dials, and their connection cap is lowered only if it exceeds that. Returns
    /// whether any cap changed.
    ///
    /// Counting the API server's connections twice each (the worst case: every target a cloud
    /// node) would refuse an edge-only burst at half the open-file limit, though such streams
    /// hold one descriptor each.
    pub fn fit_descriptors(&mut self, budget: u64) -> bool {
        let before = (
            self.max_connections,
            self.max_unauthenticated,
            self.max_tls_handshakes,
            self.api_descriptors,
        );
        let unauth = self.unauthenticated_descriptors();
        let quarter = budget / 4;
        if unauth > quarter {
            let scale = |v: usize| {
                let scaled = (v as u128 * u128::from(quarter) / u128::from(unauth.max(1))) as usize;
                scaled.max(1)
            };
            self.max_unauthenticated = scale(self.max_unauthenticated);
            self.max_tls_handshakes = scale(self.max_tls_handshakes);
        }
        let left = budget
            .saturating_sub(self.unauthenticated_descriptors())
            .max(1);
        let left = usize::try_from(left).unwrap_or(usize::MAX);
        self.api_descriptors = self.api_descriptors.min(left).max(1);
        self.max_connections = self.max_connections.min(self.api_descriptors);
        before
            != (
                self.max_connections,
                self.max_unauthenticated,
                self.max_tls_handshakes,
                self.api_descriptors,
            )
    }

    /// Whether any listener is configured.
    pub fn enabled(&self) -> bool {
        self.uds.is_some()
            || self.tls.is_some()
            || self.sni_listen.is_some()
            || self.http_listen.is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_coexist_with_the_hub_flags() {
        use clap::CommandFactory;
        crate::config::Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_precedence() {
        let c =
            EgressConfig::from_parts(&EgressArgs::default(), &EgressFileConfig::default()).unwrap();
        assert_eq!(c, EgressConfig::default());
        assert!(!c.enabled());
        let file: EgressFileConfig = toml::from_str(
            "uds = '/run/x.sock'\nnode-ports = [10250]\npod-ports = 'any'\nuds-mode = '0660'\n",
        )
        .unwrap();
        let args = EgressArgs {
            node_ports: Some("10250,9100".into()),
            ..Default::default()
        };
        let c = EgressConfig::from_parts(&args, &file).unwrap();
        assert_eq!(c.ports.node_ports, vec![10250, 9100]);
        assert_eq!(c.ports.pod_ports, None);
        assert_eq!(c.uds_mode, 0o660);
        assert!(c.enabled());
        let file: EgressFileConfig = toml::from_str("pod-ports = [8080, 443]\n").unwrap();
        let c = EgressConfig::from_parts(&EgressArgs::default(), &file).unwrap();
        assert_eq!(c.ports.pod_ports, Some(vec![8080, 443]));
    }

    #[test]
    fn bad_values_name_the_field() {
        let bad = |args: EgressArgs, field: &str| {
            let e = EgressConfig::from_parts(&args, &EgressFileConfig::default()).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        };
        bad(
            EgressArgs {
                listen: Some("127.0.0.1:1".into()),
                ..Default::default()
            },
            "egress-tls-cert",
        );
        bad(
            EgressArgs {
                node_ports: Some("10250,x".into()),
                ..Default::default()
            },
            "egress-node-ports",
        );
        bad(
            EgressArgs {
                uds_mode: Some("999".into()),
                ..Default::default()
            },
            "egress-uds-mode",
        );
        bad(
            EgressArgs {
                max_pending: Some(0),
                ..Default::default()
            },
            "egress-max-pending",
        );
        bad(
            EgressArgs {
                connect_timeout: Some("0s".into()),
                ..Default::default()
            },
            "egress-connect-timeout",
        );
        assert!(toml::from_str::<EgressFileConfig>("udss = 'x'\n").is_err());
        bad(
            EgressArgs {
                listen: Some("127.0.0.1:1".into()),
                tls_cert: Some("c".into()),
                tls_key: Some("k".into()),
                client_ca: Some("ca".into()),
                client_names: Some("kube-apiserver,system:node:edge-a1".into()),
                ..Default::default()
            },
            "egress-client-names",
        );
    }

    #[test]
    fn client_names_default_and_configured() {
        let tls_args = |names: Option<&str>| EgressArgs {
            listen: Some("127.0.0.1:1".into()),
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            client_ca: Some("ca".into()),
            client_names: names.map(String::from),
            ..Default::default()
        };
        let c = EgressConfig::from_parts(&tls_args(None), &EgressFileConfig::default()).unwrap();
        assert_eq!(
            c.tls.unwrap().client_names,
            DEFAULT_CLIENT_NAMES.map(String::from).to_vec()
        );
        let c = EgressConfig::from_parts(&tls_args(Some(" a , b ")), &EgressFileConfig::default())
            .unwrap();
        assert_eq!(c.tls.unwrap().client_names, vec!["a", "b"]);
        let file: EgressFileConfig = toml::from_str("client-names = ['x', 'y']\n").unwrap();
        let mut args = tls_args(None);
        args.client_names = None;
        let c = EgressConfig::from_parts(&args, &file).unwrap();
        assert_eq!(c.tls.unwrap().client_names, vec!["x", "y"]);
    }

    #[test]
    fn caps_fit_the_descriptor_budget() {
        let mut c = EgressConfig::default();
        assert_eq!(c.descriptors_needed(), 2 * (16384 + 1024 + 256));
        assert!(!c.fit_descriptors(u64::MAX));
        assert_eq!(c.descriptors_needed(), 2 * (16384 + 1024 + 256));
        assert!(c.fit_descriptors(1000));
        assert!(c.descriptors_needed() <= 1000, "{}", c.descriptors_needed());
        // The unauthenticated pools get at most a quarter; proportions kept, each at least 1.
        assert!(2 * (c.max_unauthenticated + c.max_tls_handshakes) <= 250);
        assert!(c.max_unauthenticated > c.max_tls_handshakes);
        assert!(c.max_tls_handshakes >= 1);
        assert!(c.max_connections > c.max_unauthenticated);
        assert_eq!(c.api_descriptors, c.max_connections);
        assert!(c.api_descriptors >= 750, "{}", c.api_descriptors);
    }

    #[test]
    fn an_edge_burst_fits_a_limit_below_twice_the_cap() {
        // The lab's open-file limit (20,000 less the reserve): 10,000 streams to edge nodes
        // hold one descriptor each and must all fit; the unauthenticated pools keep theirs.
        let mut c = EgressConfig::default();
        assert!(c.fit_descriptors(20_000 - 256));
        assert_eq!(c.max_connections, 16384);
        assert_eq!((c.max_unauthenticated, c.max_tls_handshakes), (1024, 256));
        assert_eq!(c.api_descriptors, 20_000 - 256 - 2 * (1024 + 256));
        assert!(c.descriptors_needed() <= 20_000 - 256);
    }
}
