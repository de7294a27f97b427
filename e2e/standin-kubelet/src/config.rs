//! Configuration of a stand-in kubelet (what the CLI flags fill in).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// PEM material, from a file or inline.
#[derive(Debug, Clone)]
pub enum PemSource {
    /// Read from this path at start.
    File(PathBuf),
    /// PEM text.
    Inline(String),
}

/// Serving certificate, key, and optionally the CA that client certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Serving certificate chain (leaf first).
    pub cert: PemSource,
    /// Serving private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PemSource,
    /// When set, every HTTPS client must present a certificate signed by this CA (the API
    /// server's kubelet-client certificate), as a kubelet with `--client-ca-file` requires.
    pub client_ca: Option<PemSource>,
}

/// A pod listed by `GET /pods` (`ns/name[:c1,c2]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Container names (default: one named after the pod).
    pub containers: Vec<String>,
}

impl FromStr for PodSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, containers) = match s.split_once(':') {
            Some((p, c)) => (
                p,
                c.split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            None => (s, Vec::new()),
        };
        let (namespace, name) = path
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| format!("pod {s:?} is not NAMESPACE/NAME[:CONTAINER,...]"))?;
        let containers = if containers.is_empty() {
            vec![name.to_string()]
        } else {
            containers
        };
        Ok(PodSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            containers,
        })
    }
}

/// Everything [`crate::start`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTPS listen address (kubelet default `0.0.0.0:10250`; port 0 picks one).
    pub address: SocketAddr,
    /// TLS material.
    pub tls: TlsSettings,
    /// Plain-HTTP read-only listener (`/healthz`, `/metrics`, `/pods`, `/standin/...`).
    pub read_only_address: Option<SocketAddr>,
    /// Generated-line period for `follow=true` (zero: only pushed lines).
    pub follow_interval: Duration,
    /// Deterministic lines every container log starts with.
    pub initial_log_lines: usize,
    /// How long exec/port-forward clients have to open their streams.
    pub stream_creation_timeout: Duration,
    /// How long a finished exec waits for the client to close the connection.
    pub linger: Duration,
    /// Pods listed by `/pods` (besides those that have logs).
    pub pods: Vec<PodSpec>,
    /// Node name reported in `/pods`.
    pub node_name: String,
}

impl Config {
    /// Defaults for everything but the address and TLS material.
    pub fn new(address: SocketAddr, tls: TlsSettings) -> Config {
        Config {
            address,
            tls,
            read_only_address: None,
            follow_interval: Duration::from_millis(100),
            initial_log_lines: 10,
            stream_creation_timeout: Duration::from_secs(30),
            linger: Duration::from_secs(5),
            pods: Vec::new(),
            node_name: "standin-node".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_specs_parse() {
        let p: PodSpec = "default/web:app,sidecar".parse().expect("ok");
        assert_eq!(p.containers, vec!["app", "sidecar"]);
        let p: PodSpec = "kube-system/dns".parse().expect("ok");
        assert_eq!(p.containers, vec!["dns"]);
        assert!("nonamespace".parse::<PodSpec>().is_err());
        assert!("a/b/c".parse::<PodSpec>().is_err());
    }
}
