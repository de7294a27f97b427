//! Kubernetes mode: the inventory, the hub election, the PKI and the tunnel status all live in
//! the cluster's API.
//!
//! * [`translate`]: a `core/v1` Node becomes an inventory node and its site (pure, unit-tested);
//!   [`translate::ClusterIndex`] keeps the pure [`crate::inventory::Inventory`] in step with the
//!   Nodes (apply / delete / reset on relist).
//! * [`nodes`]: the kube-runtime watcher (with backoff) feeding that index.
//! * [`election`]: the `coordination.k8s.io/v1` Lease that picks the active hub among the nodes
//!   labelled cloud-gateway, and the read-only follower the node role uses.
//! * [`membership`]: with `hub-mode = active-active`, a Lease per hub and the live set every
//!   hub and node role reads from them.
//! * [`pki`]: the CA in a Secret, join tokens as Secrets (like bootstrap tokens), the revocation
//!   list in a Secret.
//! * [`status`]: annotations on Nodes (tunnel state, gateway endpoints, hub role) and Events.
//! * [`crate::kube_hub`] (a sibling, not a child): the glue that runs all of it beside a
//!   [`crate::hub::Hub`], and the signer `petrel.io/edge-tunnel` (zero-touch enrolment of edge
//!   nodes from their kubelet credentials).
//! * [`node`]: the glue for the node role.
//!
//! When the API server cannot be reached nothing changes: the last inventory, the last known
//! active hub and the connected agents stay as they are; watchers retry with backoff.

pub mod election;
pub mod membership;
pub mod node;
pub mod nodes;
pub mod pki;
pub mod status;
pub mod translate;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use petrel_transport::setting_values::ConfigError;

/// Default label keys and names (documented in `docs/operations.md`).
pub mod defaults {
    pub const EDGE_LABELS: &[&str] = &[
        "alibabacloud.com/is-edge-worker",
        "openyurt.io/is-edge-worker",
    ];
    pub const NODEPOOL_LABELS: &[&str] =
        &["alibabacloud.com/nodepool-id", "apps.openyurt.io/nodepool"];
    pub const SITE_NETWORK_KEY: &str = "petrel.io/site-network";
    pub const GATEWAY_LABEL: &str = "node-role.alibabacloud.com/cloud-gateway";
    pub const CLOUD_SITE: &str = "cloud";
    pub const NAMESPACE: &str = "kube-system";
    pub const LEASE_NAME: &str = "petrel-hub";
    pub const LEASE_DURATION: &str = "3s";
    pub const LEASE_RENEW: &str = "1s";
    pub const CA_SECRET: &str = "petrel-ca";
}

/// Annotations and labels Petrel writes.
pub mod keys {
    /// On a gateway candidate's Node: the endpoints agents dial, `host:port[,host:port]`.
    pub const GATEWAY_ENDPOINTS: &str = "petrel.io/gateway-endpoints";
    /// On a gateway candidate's Node: `active`, `standby` or `not-serving`.
    pub const HUB_ROLE: &str = "petrel.io/hub-role";
    /// On a hub's Node, active-active: the public sites it owns, comma-separated.
    pub const OWNED_SITES: &str = "petrel.io/owned-sites";
    /// Prefix of the per-hub tunnel state on edge Nodes: `tunnel.petrel.io/<hub node>`.
    pub const TUNNEL_PREFIX: &str = "tunnel.petrel.io/";
    /// On the Lease: the active hub's endpoints.
    pub const LEASE_ENDPOINTS: &str = "petrel.io/gateway-endpoints";
    /// Label on join-token Secrets.
    pub const TOKEN_LABEL: &str = "petrel.io/join-token";
    /// Secret type of join tokens.
    pub const TOKEN_SECRET_TYPE: &str = "petrel.io/join-token";
    /// Name prefix of join-token Secrets (`petrel-token-<id>`).
    pub const TOKEN_SECRET_PREFIX: &str = "petrel-token-";
    /// The Flannel annotations.
    pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
    pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
    /// On an edge Node (label or annotation): the inner MTU toward its site when its WAN path
    /// is smaller than the hub's `--site-mtu`; the smallest its nodes declare wins.
    pub const SITE_MTU: &str = "petrel.io/site-mtu";
}

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("no Kubernetes configuration: not in a cluster (no KUBERNETES_SERVICE_HOST) and no --kubeconfig: {0}")]
    NoConfig(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{what} {name}: {message}")]
    Corrupt {
        what: &'static str,
        name: String,
        message: String,
    },
}

impl KubeError {
    /// The HTTP status of an API error (404, 409, ...).
    pub fn status(&self) -> Option<u16> {
        match self {
            KubeError::Api(kube::Error::Api(s)) => Some(s.code),
            _ => None,
        }
    }
}

/// Runs an API call with a deadline, so a dead API server never stalls a loop.
pub async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, KubeError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(KubeError::from),
        Err(_) => Err(KubeError::Timeout(limit)),
    }
}

/// How Nodes are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelKeys {
    /// A Node with any of these labels set to `true` is an edge node.
    pub edge: Vec<String>,
    /// The first of these labels a Node has names its site (node pool).
    pub nodepool: Vec<String>,
    /// Label or annotation with the site's network type: `public` or `express-connect`.
    pub site_network: String,
    /// Presence of this label makes a cloud node a hub candidate.
    pub gateway: String,
    /// The site all cloud (non-edge) nodes belong to.
    pub cloud_site: String,
}

impl Default for LabelKeys {
    fn default() -> Self {
        Self {
            edge: defaults::EDGE_LABELS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            nodepool: defaults::NODEPOOL_LABELS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            site_network: defaults::SITE_NETWORK_KEY.into(),
            gateway: defaults::GATEWAY_LABEL.into(),
            cloud_site: defaults::CLOUD_SITE.into(),
        }
    }
}

/// Validated Kubernetes settings.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// `None`: in-cluster configuration, or `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Where the Lease, the CA Secret, the token Secrets and the Events live.
    pub namespace: String,
    pub lease_name: String,
    /// The Lease's `leaseDurationSeconds` (whole seconds).
    pub lease_duration: Duration,
    /// How often the active hub renews.
    pub renew_interval: Duration,
    /// How often a standby looks at the Lease.
    pub retry_interval: Duration,
    pub ca_secret: String,
    pub keys: LabelKeys,
    /// Every labelled hub carries traffic (`hub-mode = active-active`): each renews its own
    /// Lease ([`membership`]); the single Lease then only picks the hub that signs
    /// CertificateSigningRequests and tidies annotations.
    pub active_active: bool,
}

impl Default for KubeSettings {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            namespace: defaults::NAMESPACE.into(),
            lease_name: defaults::LEASE_NAME.into(),
            lease_duration: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            retry_interval: Duration::from_millis(250),
            ca_secret: defaults::CA_SECRET.into(),
            keys: LabelKeys::default(),
            active_active: false,
        }
    }
}

/// Where the inventory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InventorySource {
    File,
    Kubernetes,
}

/// Kubernetes flags, shared by `run`, `node` and `token`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeArgs {
    /// Where nodes, sites and the active hub come from: `file` (the inventory file) or
    /// `kubernetes` (Node objects, the hub Lease, the CA and tokens in Secrets).
    #[arg(long, env = "PETREL_INVENTORY_SOURCE")]
    pub inventory_source: Option<String>,
    /// kubeconfig for `kubernetes` mode (default: in-cluster, else $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "PETREL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the hub Lease, the CA and token Secrets and Petrel's Events.
    #[arg(long = "k8s-namespace", env = "PETREL_NAMESPACE")]
    pub namespace: Option<String>,
    /// Name of the coordination.k8s.io/v1 Lease that elects the active hub.
    #[arg(long, env = "PETREL_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Lease duration (whole seconds): a standby takes over this long after the last renewal.
    #[arg(long, env = "PETREL_LEASE_DURATION")]
    pub lease_duration: Option<String>,
    /// How often the active hub renews the Lease (less than a third of the duration).
    #[arg(long, env = "PETREL_LEASE_RENEW")]
    pub lease_renew: Option<String>,
    /// Labels marking edge nodes (value `true`), comma-separated.
    #[arg(
        long = "edge-labels",
        env = "PETREL_EDGE_LABELS",
        value_delimiter = ','
    )]
    pub edge_labels: Vec<String>,
    /// Node-pool labels naming a node's site, comma-separated, first match wins.
    #[arg(
        long = "nodepool-labels",
        env = "PETREL_NODEPOOL_LABELS",
        value_delimiter = ','
    )]
    pub nodepool_labels: Vec<String>,
    /// Label or annotation with a site's network type (`public` or `express-connect`).
    #[arg(long, env = "PETREL_SITE_NETWORK_KEY")]
    pub site_network_key: Option<String>,
    /// Label whose presence makes a cloud node a hub candidate.
    #[arg(long, env = "PETREL_GATEWAY_LABEL")]
    pub gateway_label: Option<String>,
    /// Site name of all cloud (non-edge) nodes.
    #[arg(long, env = "PETREL_CLOUD_SITE")]
    pub cloud_site: Option<String>,
    /// Secret holding the hub CA (`tls.crt`, `tls.key`).
    #[arg(long, env = "PETREL_CA_SECRET")]
    pub ca_secret: Option<String>,
    /// `active-standby` (default: the Lease holder carries all traffic, the other labelled
    /// hubs stand by) or `active-active` (every labelled hub carries the sites it owns; set it
    /// on the hubs and the node roles alike; docs/architecture.md, "Active-active hubs").
    #[arg(long, env = "PETREL_HUB_MODE")]
    pub hub_mode: Option<String>,
}

/// The `[kubernetes]` table of the config file (same names as the flags, without `k8s-`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KubeFileConfig {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: Option<String>,
    pub lease_name: Option<String>,
    pub lease_duration: Option<String>,
    pub lease_renew: Option<String>,
    pub edge_labels: Option<Vec<String>>,
    pub nodepool_labels: Option<Vec<String>>,
    pub site_network_key: Option<String>,
    pub gateway_label: Option<String>,
    pub cloud_site: Option<String>,
    pub ca_secret: Option<String>,
    pub hub_mode: Option<String>,
}

/// A DNS-1123 label (namespaces): lowercase alphanumerics and '-', at most 63.
pub fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (object names).
pub fn valid_dns_subdomain(s: &str) -> bool {
    crate::inventory::valid_node_name(s)
}

/// The name part of a qualified name: at most 63, alphanumerics, '-', '_', '.', alphanumeric at
/// both ends.
fn valid_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn valid_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => valid_dns_subdomain(prefix) && valid_qualified_name_part(name),
        None => valid_qualified_name_part(s),
    }
}

impl KubeArgs {
    /// `Ok(None)` in file mode.
    pub fn resolve(
        &self,
        source_from_file: Option<&str>,
        file: &KubeFileConfig,
    ) -> Result<Option<KubeSettings>, ConfigError> {
        let source = self
            .inventory_source
            .as_deref()
            .or(source_from_file)
            .unwrap_or("file");
        match source {
            "file" => return Ok(None),
            "kubernetes" | "k8s" => {}
            other => {
                return Err(ConfigError::Invalid {
                    field: "inventory-source",
                    value: other.into(),
                    allowed: "file or kubernetes".into(),
                })
            }
        }
        let d = KubeSettings::default();
        let namespace = self
            .namespace
            .clone()
            .or(file.namespace.clone())
            .unwrap_or(d.namespace);
        if !valid_dns_label(&namespace) {
            return Err(ConfigError::Invalid {
                field: "k8s-namespace",
                value: namespace,
                allowed: "a namespace name (lowercase letters, digits, '-', at most 63)".into(),
            });
        }
        let name = |field: &'static str, a: &Option<String>, f: &Option<String>, d: String| {
            let v = a.clone().or(f.clone()).unwrap_or(d);
            if valid_dns_subdomain(&v) {
                Ok(v)
            } else {
                Err(ConfigError::Invalid {
                    field,
                    value: v,
                    allowed: "an object name (lowercase letters, digits, '-', '.')".into(),
                })
            }
        };
        let lease_name = name(
            "lease-name",
            &self.lease_name,
            &file.lease_name,
            d.lease_name,
        )?;
        let ca_secret = name("ca-secret", &self.ca_secret, &file.ca_secret, d.ca_secret)?;
        let cloud_site = name(
            "cloud-site",
            &self.cloud_site,
            &file.cloud_site,
            d.keys.cloud_site,
        )?;
        let dur = |field: &'static str, a: &Option<String>, f: &Option<String>, d: &str| {
            petrel_transport::setting_values::parse_duration(
                field,
                &a.clone().or(f.clone()).unwrap_or_else(|| d.to_string()),
            )
        };
        let lease_duration = dur(
            "lease-duration",
            &self.lease_duration,
            &file.lease_duration,
            defaults::LEASE_DURATION,
        )?;
        if lease_duration < Duration::from_secs(1) || lease_duration.subsec_nanos() != 0 {
            return Err(ConfigError::Invalid {
                field: "lease-duration",
                value: humantime::format_duration(lease_duration).to_string(),
                allowed: "whole seconds, at least 1s (the Lease holds leaseDurationSeconds)".into(),
            });
        }
        let renew_interval = dur(
            "lease-renew",
            &self.lease_renew,
            &file.lease_renew,
            defaults::LEASE_RENEW,
        )?;
        if renew_interval < Duration::from_millis(100) || renew_interval * 3 > lease_duration {
            return Err(ConfigError::Invalid {
                field: "lease-renew",
                value: humantime::format_duration(renew_interval).to_string(),
                allowed: format!(
                    "at least 100ms and at most a third of lease-duration ({})",
                    humantime::format_duration(lease_duration)
                ),
            });
        }
        let keys_list = |field: &'static str,
                         a: &Vec<String>,
                         f: &Option<Vec<String>>,
                         d: Vec<String>|
         -> Result<Vec<String>, ConfigError> {
            let v: Vec<String> = if !a.is_empty() {
                a.clone()
            } else {
                f.clone().unwrap_or(d)
            };
            let v: Vec<String> = v
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if v.is_empty() {
                return Err(ConfigError::Invalid {
                    field,
                    value: String::new(),
                    allowed: "one or more label keys".into(),
                });
            }
            if let Some(bad) = v.iter().find(|k| !valid_label_key(k)) {
                return Err(ConfigError::Invalid {
                    field,
                    value: bad.clone(),
                    allowed: "label keys like example.com/name".into(),
                });
            }
            Ok(v)
        };
        let edge = keys_list(
            "edge-labels",
            &self.edge_labels,
            &file.edge_labels,
            d.keys.edge,
        )?;
        let nodepool = keys_list(
            "nodepool-labels",
            &self.nodepool_labels,
            &file.nodepool_labels,
            d.keys.nodepool,
        )?;
        let one_key = |field: &'static str, a: &Option<String>, f: &Option<String>, d: String| {
            let v = a.clone().or(f.clone()).unwrap_or(d);
            if valid_label_key(&v) {
                Ok(v)
            } else {
                Err(ConfigError::Invalid {
                    field,
                    value: v,
                    allowed: "a label key like example.com/name".into(),
                })
            }
        };
        let site_network = one_key(
            "site-network-key",
            &self.site_network_key,
            &file.site_network_key,
            d.keys.site_network,
        )?;
        let gateway = one_key(
            "gateway-label",
            &self.gateway_label,
            &file.gateway_label,
            d.keys.gateway,
        )?;
        let active_active = match self
            .hub_mode
            .as_deref()
            .or(file.hub_mode.as_deref())
            .unwrap_or("active-standby")
        {
            "active-standby" => false,
            "active-active" => true,
            other => {
                return Err(ConfigError::Invalid {
                    field: "hub-mode",
                    value: other.into(),
                    allowed: "active-standby or active-active".into(),
                })
            }
        };
        Ok(Some(KubeSettings {
            active_active,
            kubeconfig: self.kubeconfig.clone().or(file.kubeconfig.clone()),
            namespace,
            lease_name,
            lease_duration,
            renew_interval,
            retry_interval: (renew_interval / 4).max(Duration::from_millis(100)),
            ca_secret,
            keys: LabelKeys {
                edge,
                nodepool,
                site_network,
                gateway,
                cloud_site,
            },
        }))
    }
}

/// Builds a client: the kubeconfig given, else in-cluster, else `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(settings: &KubeSettings) -> Result<kube::Client, KubeError> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::NoConfig(e.to_string()))?,
    };
    // Fail fast when the API server is gone: loops retry, nothing waits for minutes.
    config.connect_timeout = Some(Duration::from_secs(3));
    config.read_timeout = config.read_timeout.or(Some(Duration::from_secs(300)));
    kube::Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// Why the hub would refuse an agent on `node`, judged from its Node alone (for `token create`).
pub async fn admission_warning(
    client: &kube::Client,
    settings: &KubeSettings,
    node: &str,
) -> Option<String> {
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    match bounded(Duration::from_secs(10), api.get_opt(node)).await {
        Err(e) => Some(format!("cannot check Node {node}: {e}")),
        Ok(None) => Some(format!(
            "Node {node} does not exist (yet); the hub refuses its agent until it does"
        )),
        Ok(Some(n)) => match translate::translate(&n, &settings.keys) {
            Err(e) => Some(format!("Node {node}: {e}; the hub refuses its agent")),
            Ok(t) if !t.edge => Some(format!(
                "Node {node} is a cloud node (no edge label {}); only edge nodes in public sites connect",
                settings.keys.edge.join(" or ")
            )),
            Ok(t) if t.declared_kind == Some(crate::inventory::SiteKind::ExpressConnect) => {
                Some(format!(
                    "Node {node} is in an express-connect site; only public sites connect"
                ))
            }
            Ok(_) => None,
        },
    }
}

/// The active hub's first endpoint, from the hub Lease's annotation.
pub async fn active_endpoint(client: &kube::Client, settings: &KubeSettings) -> Option<String> {
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), &settings.namespace);
    let lease = bounded(Duration::from_secs(10), api.get_opt(&settings.lease_name))
        .await
        .ok()??;
    let value = lease
        .metadata
        .annotations?
        .get(keys::LEASE_ENDPOINTS)?
        .clone();
    let first = translate::parse_endpoints(&value).into_iter().next()?;
    Some(translate::format_endpoints(&[first]))
}

/// RFC 3339 with seconds, UTC.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn settings_defaults_and_bad_values() {
        let args = KubeArgs {
            inventory_source: Some("kubernetes".into()),
            ..Default::default()
        };
        let s = args
            .resolve(None, &KubeFileConfig::default())
            .unwrap()
            .unwrap();
        assert_eq!(s.namespace, "kube-system");
        assert_eq!(s.lease_duration, Duration::from_secs(3));
        assert_eq!(s.renew_interval, Duration::from_secs(1));
        assert_eq!(s.keys, LabelKeys::default());
        assert!(KubeArgs::default()
            .resolve(None, &KubeFileConfig::default())
            .unwrap()
            .is_none());
        let bad = |f: fn(&mut KubeArgs)| {
            let mut a = args.clone();
            f(&mut a);
            a.resolve(None, &KubeFileConfig::default())
                .unwrap_err()
                .to_string()
        };
        assert!(bad(|a| a.inventory_source = Some("etcd".into())).contains("inventory-source"));
        assert!(bad(|a| a.namespace = Some("Kube_System".into())).contains("k8s-namespace"));
        assert!(bad(|a| a.lease_duration = Some("2500ms".into())).contains("whole seconds"));
        assert!(bad(|a| a.lease_renew = Some("2s".into())).contains("lease-renew"));
        assert!(bad(|a| a.edge_labels = vec!["bad key!".into()]).contains("edge-labels"));
        assert!(bad(|a| a.gateway_label = Some("/x".into())).contains("gateway-label"));
        assert!(bad(|a| a.hub_mode = Some("both".into())).contains("hub-mode"));
        assert!(!s.active_active);
        let mut aa = args.clone();
        aa.hub_mode = Some("active-active".into());
        assert!(
            aa.resolve(None, &KubeFileConfig::default())
                .unwrap()
                .unwrap()
                .active_active
        );
        assert!(valid_label_key("node-role.alibabacloud.com/cloud-gateway"));
        assert!(valid_label_key("plain"));
        assert!(!valid_label_key("a/b/c"));
    }
}
