//! From `core/v1` Nodes to the inventory: a pure translation of one Node ([`translate`]) and the
//! index that keeps an [`Inventory`] equal to the set of Nodes ([`ClusterIndex`]: apply, delete,
//! reset on relist). No I/O here; the watcher in [`super::nodes`] feeds it.
//!
//! | inventory        | from the Node |
//! |------------------|---------------|
//! | edge or cloud    | any edge label (`alibabacloud.com/is-edge-worker`, `openyurt.io/is-edge-worker`) = `true` |
//! | site             | cloud nodes: the cloud site (`cloud`); edge nodes: the first node-pool label (`alibabacloud.com/nodepool-id`, `apps.openyurt.io/nodepool`), else the node's own name (a site of its own) |
//! | site kind        | cloud; for edge sites the label or annotation `petrel.io/site-network` (`public` or `express-connect`) of the site's nodes (the first node by name that sets it), default `public` |
//! | pod CIDRs        | `spec.podCIDRs`, else `spec.podCIDR` |
//! | VtepMAC          | `flannel.alpha.coreos.com/backend-data` `{"VtepMAC": ...}` |
//! | public IP        | `flannel.alpha.coreos.com/public-ip` |
//! | addresses        | `status.addresses`: InternalIP first, then ExternalIP |
//! | kubelet port     | `status.daemonEndpoints.kubeletEndpoint.port` (10250 if unset) |
//! | gateway          | a cloud node with the label `node-role.alibabacloud.com/cloud-gateway` (any value) |
//!
//! A Node that cannot be translated (a malformed pod CIDR, an unknown site network type, ...) or
//! that conflicts with another (overlapping pod CIDR, duplicate VtepMAC) is left out of the
//! inventory (its agent is refused) and listed in [`ClusterIndex::rejected`] with the reason.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node as KubeNode;
use petrel_proto::MacAddr;

use super::{keys, LabelKeys};
use crate::inventory::{Inventory, Node, Site, SiteKind};

/// Why a Node is not in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("the Node has no name")]
    NoName,
    #[error("pod CIDR {value:?} is not a CIDR")]
    BadPodCidr { value: String },
    #[error("{key}={value:?}: the site network type must be public or express-connect")]
    BadSiteNetwork { key: String, value: String },
    #[error("annotation {}: {message}", keys::FLANNEL_BACKEND_DATA)]
    BadBackendData { message: String },
    #[error(
        "annotation {}={value:?} is not an IP address",
        keys::FLANNEL_PUBLIC_IP
    )]
    BadPublicIp { value: String },
    #[error("{}={value:?} is not an MTU in {}..={}", keys::SITE_MTU, crate::inventory::SITE_MTU_RANGE.start(), crate::inventory::SITE_MTU_RANGE.end())]
    BadSiteMtu { value: String },
    #[error("edge node pool {pool:?} has the name of the cloud site; rename the pool or set --cloud-site")]
    PoolIsCloudSite { pool: String },
    #[error("{0}")]
    Conflict(String),
}

/// One Node, translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// The inventory node (its `site` filled in).
    pub node: Node,
    pub edge: bool,
    /// The site network type this Node declares (edge nodes only).
    pub declared_kind: Option<SiteKind>,
    /// The site MTU this Node declares (edge nodes only, `petrel.io/site-mtu`).
    pub declared_mtu: Option<u16>,
    /// The gateway endpoints a hub on this node published (`petrel.io/gateway-endpoints`).
    pub endpoints: Vec<(String, u16)>,
    /// Carries the cloud-gateway label (also on an edge node, where it is ignored).
    pub gateway_label: bool,
    /// The node's addresses, ExternalIP first (what a hub advertises by default).
    pub public_first: Vec<IpAddr>,
    /// Tunnel states hubs wrote on this Node (`tunnel.petrel.io/<hub>` = state).
    pub tunnel_states: BTreeMap<String, String>,
}

/// Parses `host:port[,host:port...]`, skipping malformed entries.
pub fn parse_endpoints(value: &str) -> Vec<(String, u16)> {
    value
        .split(',')
        .filter_map(|e| petrel_transport::setting_values::host_port(e.trim()).ok())
        .collect()
}

/// Formats endpoints for the annotation.
pub fn format_endpoints(eps: &[(String, u16)]) -> String {
    eps.iter()
        .map(|(h, p)| {
            if h.contains(':') {
                format!("[{h}]:{p}")
            } else {
                format!("{h}:{p}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_kind(key: &str, value: &str) -> Result<SiteKind, TranslateError> {
    match value.trim() {
        "public" => Ok(SiteKind::Public),
        "express-connect" => Ok(SiteKind::ExpressConnect),
        other => Err(TranslateError::BadSiteNetwork {
            key: key.into(),
            value: other.into(),
        }),
    }
}

/// Translates one Node. Pure.
pub fn translate(kn: &KubeNode, keys: &LabelKeys) -> Result<Translated, TranslateError> {
    let name = kn.metadata.name.clone().ok_or(TranslateError::NoName)?;
    let empty = BTreeMap::new();
    let labels = kn.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = kn.metadata.annotations.as_ref().unwrap_or(&empty);
    let edge = keys.edge.iter().any(|k| {
        labels
            .get(k)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    });
    let gateway_label = labels.contains_key(&keys.gateway);
    let (site, declared_kind) = if edge {
        let pool = keys
            .nodepool
            .iter()
            .find_map(|k| labels.get(k).filter(|v| !v.is_empty()).cloned());
        if let Some(p) = &pool {
            if *p == keys.cloud_site {
                return Err(TranslateError::PoolIsCloudSite { pool: p.clone() });
            }
        }
        let declared = labels
            .get(&keys.site_network)
            .or_else(|| annotations.get(&keys.site_network))
            .map(|v| parse_kind(&keys.site_network, v))
            .transpose()?;
        (pool.unwrap_or_else(|| name.clone()), declared)
    } else {
        (keys.cloud_site.clone(), None)
    };

    let spec = kn.spec.as_ref();
    let cidr_strings: Vec<String> = match spec.and_then(|s| s.pod_cidrs.clone()) {
        Some(v) if !v.is_empty() => v,
        _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    let mut pod_cidrs = Vec::new();
    for c in cidr_strings {
        let net: IpNet = c
            .parse()
            .map_err(|_| TranslateError::BadPodCidr { value: c.clone() })?;
        pod_cidrs.push(net.trunc());
    }

    let vtep_mac =
        match annotations.get(keys::FLANNEL_BACKEND_DATA) {
            None => None,
            Some(raw) if raw.trim().is_empty() || raw.trim() == "null" => None,
            Some(raw) => {
                let v: serde_json::Value =
                    serde_json::from_str(raw).map_err(|e| TranslateError::BadBackendData {
                        message: format!("not JSON: {e}"),
                    })?;
                match v.get("VtepMAC") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(m)) => Some(m.parse::<MacAddr>().map_err(
                        |_| TranslateError::BadBackendData {
                            message: format!("VtepMAC {m:?} is not a MAC address"),
                        },
                    )?),
                    Some(other) => {
                        return Err(TranslateError::BadBackendData {
                            message: format!("VtepMAC {other} is not a string"),
                        })
                    }
                }
            }
        };
    let public_ip = match annotations.get(keys::FLANNEL_PUBLIC_IP) {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<IpAddr>()
                .map_err(|_| TranslateError::BadPublicIp { value: v.clone() })?,
        ),
    };

    let status = kn.status.as_ref();
    let of_kinds = |kinds: [&str; 2]| {
        let mut out: Vec<IpAddr> = Vec::new();
        for kind in kinds {
            for a in status
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == kind)
            {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    if !out.contains(&ip) {
                        out.push(ip);
                    }
                }
            }
        }
        out
    };
    let addresses = of_kinds(["InternalIP", "ExternalIP"]);
    let public_first = of_kinds(["ExternalIP", "InternalIP"]);
    let kubelet_port = status
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .and_then(|e| u16::try_from(e.port).ok())
        .filter(|p| *p != 0)
        .unwrap_or(10250);
    let endpoints = annotations
        .get(keys::GATEWAY_ENDPOINTS)
        .map(|v| parse_endpoints(v))
        .unwrap_or_default();
    let declared_mtu = if edge {
        labels
            .get(keys::SITE_MTU)
            .or_else(|| annotations.get(keys::SITE_MTU))
            .map(|v| {
                v.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|m| crate::inventory::SITE_MTU_RANGE.contains(m))
                    .ok_or_else(|| TranslateError::BadSiteMtu { value: v.clone() })
            })
            .transpose()?
    } else {
        None
    };

    Ok(Translated {
        node: Node {
            name,
            site,
            addresses,
            pod_cidrs,
            vtep_mac,
            public_ip,
            kubelet_port,
            gateway: gateway_label && !edge,
        },
        edge,
        declared_kind,
        declared_mtu,
        endpoints,
        gateway_label,
        public_first,
        tunnel_states: annotations
            .iter()
            .filter(|(k, _)| k.starts_with(keys::TUNNEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// A hub candidate: a cloud node with the gateway label, and what it published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub endpoints: Vec<(String, u16)>,
}

/// The inventory kept equal to the cluster's Nodes.
#[derive(Debug, Clone)]
pub struct ClusterIndex {
    keys: LabelKeys,
    seen: BTreeMap<String, Result<Translated, TranslateError>>,
    rejected: BTreeMap<String, TranslateError>,
    inventory: Inventory,
}

impl ClusterIndex {
    pub fn new(keys: LabelKeys) -> Self {
        Self {
            keys,
            seen: BTreeMap::new(),
            rejected: BTreeMap::new(),
            inventory: Inventory::default(),
        }
    }

    pub fn keys(&self) -> &LabelKeys {
        &self.keys
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Nodes left out of the inventory, and why.
    pub fn rejected(&self) -> &BTreeMap<String, TranslateError> {
        &self.rejected
    }

    /// The translation of a Node, as last seen.
    pub fn translated(&self, name: &str) -> Option<&Result<Translated, TranslateError>> {
        self.seen.get(name)
    }

    /// Tunnel-state annotations by Node.
    pub fn tunnel_states(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.seen
            .iter()
            .filter_map(|(n, t)| {
                let t = t.as_ref().ok()?;
                (!t.tunnel_states.is_empty()).then(|| (n.clone(), t.tunnel_states.clone()))
            })
            .collect()
    }

    /// Every translated Node's addresses, ExternalIP first.
    pub fn public_addresses(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.seen
            .iter()
            .filter_map(|(n, t)| Some((n.clone(), t.as_ref().ok()?.public_first.clone())))
            .collect()
    }

    /// Hub candidates in the inventory (cloud nodes with the gateway label), by name.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.inventory
            .gateways()
            .map(|n| Candidate {
                name: n.name.clone(),
                endpoints: self
                    .seen
                    .get(&n.name)
                    .and_then(|t| t.as_ref().ok())
                    .map(|t| t.endpoints.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The kind of `site` from its nodes: the cloud site is cloud; an edge site takes the type
    /// the first of its nodes (by name) declares, else public.
    fn site_kind(&self, site: &str) -> SiteKind {
        if site == self.keys.cloud_site {
            return SiteKind::Cloud;
        }
        self.seen
            .values()
            .filter_map(|t| t.as_ref().ok())
            .filter(|t| t.node.site == site)
            .find_map(|t| t.declared_kind)
            .unwrap_or(SiteKind::Public)
    }

    /// The MTU of `site` from its nodes: the smallest any of them declares.
    fn site_mtu(&self, site: &str) -> Option<u16> {
        self.seen
            .values()
            .filter_map(|t| t.as_ref().ok())
            .filter(|t| t.node.site == site)
            .filter_map(|t| t.declared_mtu)
            .min()
    }

    /// Adds or replaces a Node. Returns whether the inventory changed.
    pub fn apply(&mut self, kn: &KubeNode) -> bool {
        let Some(name) = kn.metadata.name.clone() else {
            return false;
        };
        let t = translate(kn, &self.keys);
        if self.seen.get(&name) == Some(&t) {
            return false;
        }
        let before = self.inventory.generation();
        self.seen.insert(name.clone(), t);
        self.sync(&name);
        self.retry_rejected(&name);
        self.inventory.generation() != before
    }

    /// Removes a Node. Returns whether the inventory changed.
    pub fn delete(&mut self, name: &str) -> bool {
        let before = self.inventory.generation();
        self.seen.remove(name);
        self.rejected.remove(name);
        self.sync(name);
        self.retry_rejected(name);
        self.inventory.generation() != before
    }

    /// Replaces everything with `nodes` (a relist). Nodes that conflict are rejected one by one
    /// (in name order), never the whole list.
    pub fn reset(&mut self, nodes: &[KubeNode]) {
        self.seen = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, translate(n, &self.keys))))
            .collect();
        self.rejected.clear();
        let mut scratch = Inventory::default();
        let mut sites: BTreeMap<String, Site> = BTreeMap::new();
        let mut accepted = Vec::new();
        let names: Vec<String> = self.seen.keys().cloned().collect();
        for name in names {
            let t = match self.seen.get(&name) {
                Some(Ok(t)) => t.clone(),
                Some(Err(e)) => {
                    self.rejected.insert(name, e.clone());
                    continue;
                }
                None => continue,
            };
            let site = Site {
                name: t.node.site.clone(),
                kind: self.site_kind(&t.node.site),
                mtu: self.site_mtu(&t.node.site),
            };
            if scratch.site(&site.name).is_none() {
                scratch.apply_site(site.clone());
            }
            match scratch.apply_node(t.node.clone()) {
                Ok(()) => {
                    sites.insert(site.name.clone(), site);
                    accepted.push(t.node);
                }
                Err(e) => {
                    self.rejected
                        .insert(name, TranslateError::Conflict(e.to_string()));
                }
            }
        }
        if let Err(e) = self
            .inventory
            .reset(sites.into_values().collect(), accepted)
        {
            // Cannot happen: every node was applied to a scratch inventory first.
            tracing::error!(error = %e, "inventory relist refused");
        }
    }

    /// Brings `name` in the inventory in line with its translation.
    fn sync(&mut self, name: &str) {
        let old_site = self.inventory.node(name).map(|n| n.site.clone());
        match self.seen.get(name).cloned() {
            None => {
                if self.inventory.node(name).is_some() {
                    self.inventory.delete_node(name);
                }
            }
            Some(Err(e)) => {
                if self.inventory.node(name).is_some() {
                    self.inventory.delete_node(name);
                }
                self.rejected.insert(name.to_string(), e);
            }
            Some(Ok(t)) => {
                let kind = self.site_kind(&t.node.site);
                let mtu = self.site_mtu(&t.node.site);
                let site_now = self.inventory.site(&t.node.site).map(|s| (s.kind, s.mtu));
                if site_now != Some((kind, mtu)) {
                    self.inventory.apply_site(Site {
                        name: t.node.site.clone(),
                        kind,
                        mtu,
                    });
                }
                if self.inventory.node(name) != Some(&t.node) {
                    match self.inventory.apply_node(t.node.clone()) {
                        Ok(()) => {
                            self.rejected.remove(name);
                        }
                        Err(e) => {
                            if self.inventory.node(name).is_some() {
                                self.inventory.delete_node(name);
                            }
                            self.rejected
                                .insert(name.to_string(), TranslateError::Conflict(e.to_string()));
                        }
                    }
                } else {
                    self.rejected.remove(name);
                }
            }
        }
        if let Some(old) = old_site {
            let still_used = self.inventory.nodes().any(|n| n.site == old);
            if !still_used && self.inventory.site(&old).is_some() {
                let _ = self.inventory.delete_site(&old);
            } else if let Some(site) = self.inventory.site(&old).cloned() {
                // The node that left may have been the one declaring the site's MTU.
                let mtu = self.site_mtu(&old);
                if site.mtu != mtu {
                    self.inventory.apply_site(Site { mtu, ..site });
                }
            }
        }
    }

    /// A change may have lifted a conflict: try the rejected nodes again.
    fn retry_rejected(&mut self, except: &str) {
        let retry: Vec<String> = self
            .rejected
            .iter()
            .filter(|(n, e)| n.as_str() != except && matches!(e, TranslateError::Conflict(_)))
            .map(|(n, _)| n.clone())
            .collect();
        for n in retry {
            self.sync(&n);
        }
    }
}

#[cfg(test)]
mod site_mtu_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn edge(name: &str, mtu: Option<&str>) -> KubeNode {
        let mut labels =
            json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "small"});
        if let Some(m) = mtu {
            labels["petrel.io/site-mtu"] = json!(m);
        }
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    #[test]
    fn the_smallest_declared_mtu_is_the_sites_and_follows_its_nodes() {
        let keys = LabelKeys::default();
        let mut idx = ClusterIndex::new(keys.clone());
        idx.apply(&edge("a", Some("1400")));
        idx.apply(&edge("b", Some("1296")));
        idx.apply(&edge("c", None));
        assert_eq!(idx.inventory().site("small").unwrap().mtu, Some(1296));
        idx.delete("b");
        assert_eq!(idx.inventory().site("small").unwrap().mtu, Some(1400));
        assert!(matches!(
            translate(&edge("d", Some("9000")), &keys),
            Err(TranslateError::BadSiteMtu { .. })
        ));
        assert!(matches!(
            translate(&edge("d", Some("abc")), &keys),
            Err(TranslateError::BadSiteMtu { .. })
        ));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn node(v: serde_json::Value) -> KubeNode {
        serde_json::from_value(v).unwrap()
    }

    /// A Node like the lab's, as kubelet and flanneld would leave it.
    fn lab_node(name: &str, index: u8, ip: &str, labels: serde_json::Value) -> KubeNode {
        node(json!({
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {
                    "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"02:fa:00:00:00:{index:02x}\"}}"),
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/public-ip": ip,
                }
            },
            "spec": { "podCIDR": format!("10.244.{index}.0/24"), "podCIDRs": [format!("10.244.{index}.0/24")] },
            "status": {
                "addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}
            }
        }))
    }

    fn lab() -> Vec<KubeNode> {
        vec![
            lab_node("cloud-1", 1, "192.168.0.11", json!({})),
            lab_node(
                "gw-1",
                2,
                "192.168.0.12",
                json!({"node-role.alibabacloud.com/cloud-gateway": ""}),
            ),
            lab_node(
                "edge-a1",
                3,
                "10.0.1.2",
                json!({"alibabacloud.com/is-edge-worker": "true", "alibabacloud.com/nodepool-id": "site-a"}),
            ),
            lab_node(
                "edge-a2",
                4,
                "10.0.1.3",
                json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "site-a"}),
            ),
            lab_node(
                "edge-b1",
                5,
                "10.0.2.2",
                json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "site-b"}),
            ),
            lab_node(
                "x1",
                6,
                "192.168.10.2",
                json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "site-x", "petrel.io/site-network": "express-connect"}),
            ),
        ]
    }

    #[test]
    fn translates_a_flannel_edge_node() {
        let keys = LabelKeys::default();
        let t = translate(&lab()[2], &keys).unwrap();
        assert!(t.edge && !t.node.gateway && t.declared_kind.is_none());
        assert_eq!(t.node.site, "site-a");
        assert_eq!(
            t.node.addresses,
            vec!["10.0.1.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            t.node.pod_cidrs,
            vec!["10.244.3.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(t.node.vtep_mac.unwrap().to_string(), "02:fa:00:00:00:03");
        assert_eq!(t.node.public_ip, Some("10.0.1.2".parse().unwrap()));
        assert_eq!(t.node.kubelet_port, 10250);
        let gw = translate(&lab()[1], &keys).unwrap();
        assert!(!gw.edge && gw.node.gateway && gw.node.site == "cloud");
    }

    #[test]
    fn defaults_and_fallbacks() {
        let keys = LabelKeys::default();
        // No pool: a site of its own; annotation sets the network type; podCIDR only;
        // ExternalIP after InternalIP; a custom kubelet port; no flannel annotations yet.
        let n = node(json!({
            "metadata": {"name": "lonely", "labels": {"openyurt.io/is-edge-worker": "true"},
                         "annotations": {"petrel.io/site-network": "express-connect"}},
            "spec": {"podCIDR": "10.9.0.7/24"},
            "status": {"addresses": [{"type": "ExternalIP", "address": "198.51.100.1"},
                                     {"type": "InternalIP", "address": "10.1.1.1"}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": 10255}}}
        }));
        let t = translate(&n, &keys).unwrap();
        assert_eq!(t.node.site, "lonely");
        assert_eq!(t.declared_kind, Some(SiteKind::ExpressConnect));
        assert_eq!(t.node.pod_cidrs[0].to_string(), "10.9.0.0/24");
        assert_eq!(
            t.node.addresses,
            vec![
                "10.1.1.1".parse::<IpAddr>().unwrap(),
                "198.51.100.1".parse().unwrap()
            ]
        );
        assert_eq!(t.node.kubelet_port, 10255);
        assert_eq!(
            t.public_first,
            vec![
                "198.51.100.1".parse::<IpAddr>().unwrap(),
                "10.1.1.1".parse().unwrap()
            ]
        );
        assert!(t.node.vtep_mac.is_none() && t.node.public_ip.is_none());
        // is-edge-worker=false is a cloud node; the gateway label on an edge node is ignored.
        let n = node(
            json!({"metadata": {"name": "c", "labels": {"openyurt.io/is-edge-worker": "false"}}}),
        );
        assert_eq!(translate(&n, &keys).unwrap().node.site, "cloud");
        let n = node(
            json!({"metadata": {"name": "e", "labels": {"openyurt.io/is-edge-worker": "true", "node-role.alibabacloud.com/cloud-gateway": ""}}}),
        );
        let t = translate(&n, &keys).unwrap();
        assert!(t.gateway_label && !t.node.gateway);
        // Configurable keys.
        let custom = LabelKeys {
            edge: vec!["example.com/edge".into()],
            nodepool: vec!["example.com/pool".into()],
            site_network: "example.com/net".into(),
            gateway: "example.com/gw".into(),
            cloud_site: "vpc".into(),
        };
        let n = node(
            json!({"metadata": {"name": "e", "labels": {"example.com/edge": "true", "example.com/pool": "p", "example.com/net": "public"}}}),
        );
        let t = translate(&n, &custom).unwrap();
        assert_eq!(
            (t.node.site.as_str(), t.declared_kind),
            ("p", Some(SiteKind::Public))
        );
        let n = node(json!({"metadata": {"name": "g", "labels": {"example.com/gw": "yes"}}}));
        let t = translate(&n, &custom).unwrap();
        assert!(t.node.gateway && t.node.site == "vpc");
    }

    #[test]
    fn malformed_nodes_are_errors() {
        let keys = LabelKeys::default();
        let edge = json!({"openyurt.io/is-edge-worker": "true"});
        let bad = [
            (
                json!({"metadata": {"name": "a", "labels": edge}, "spec": {"podCIDR": "10.0.0.0/33"}}),
                "pod CIDR",
            ),
            (
                json!({"metadata": {"name": "a", "labels": {"openyurt.io/is-edge-worker": "true", "petrel.io/site-network": "private"}}}),
                "public or express-connect",
            ),
            (
                json!({"metadata": {"name": "a", "annotations": {"flannel.alpha.coreos.com/backend-data": "{"}}}),
                "not JSON",
            ),
            (
                json!({"metadata": {"name": "a", "annotations": {"flannel.alpha.coreos.com/backend-data": "{\"VtepMAC\":\"zz\"}"}}}),
                "not a MAC",
            ),
            (
                json!({"metadata": {"name": "a", "annotations": {"flannel.alpha.coreos.com/public-ip": "nope"}}}),
                "not an IP",
            ),
            (
                json!({"metadata": {"name": "a", "labels": {"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "cloud"}}}),
                "cloud site",
            ),
        ];
        for (v, needle) in bad {
            let e = translate(&node(v), &keys).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }

    #[test]
    fn index_matches_the_embedded_lab_inventory() {
        let mut idx = ClusterIndex::new(LabelKeys::default());
        idx.reset(&lab());
        assert!(idx.rejected().is_empty(), "{:?}", idx.rejected());
        let inv = idx.inventory();
        let file = Inventory::embedded_default().unwrap();
        for n in file.nodes() {
            let mut expect = n.clone();
            if expect.site == "vpc" {
                expect.site = "cloud".into();
            }
            assert_eq!(inv.node(&n.name), Some(&expect), "{}", n.name);
        }
        assert_eq!(inv.site("site-x").unwrap().kind, SiteKind::ExpressConnect);
        assert_eq!(inv.site("site-a").unwrap().kind, SiteKind::Public);
        assert_eq!(inv.site("cloud").unwrap().kind, SiteKind::Cloud);
        assert!(inv.admit_agent("edge-a1").is_ok());
        assert!(inv.admit_agent("x1").is_err() && inv.admit_agent("gw-1").is_err());
        assert_eq!(
            idx.candidates(),
            vec![Candidate {
                name: "gw-1".into(),
                endpoints: vec![]
            }]
        );
        // Same routes as the file inventory.
        let a: Vec<_> = file
            .routes_for("edge-a1")
            .into_iter()
            .map(|r| (r.node_name, r.pod_cidr, r.path))
            .collect();
        let b: Vec<_> = inv
            .routes_for("edge-a1")
            .into_iter()
            .map(|r| (r.node_name, r.pod_cidr, r.path))
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn apply_delete_and_conflicts() {
        let mut idx = ClusterIndex::new(LabelKeys::default());
        idx.reset(&lab());
        let g0 = idx.inventory().generation();
        // Re-applying an identical Node changes nothing (kubelet status updates).
        assert!(!idx.apply(&lab()[2]));
        assert_eq!(idx.inventory().generation(), g0);
        // A new edge node in a new pool.
        let c1 = lab_node(
            "edge-c1",
            7,
            "10.0.3.2",
            json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "site-c"}),
        );
        assert!(idx.apply(&c1));
        assert!(idx.inventory().admit_agent("edge-c1").is_ok());
        assert!(idx
            .inventory()
            .routes_for("edge-a1")
            .iter()
            .any(|r| r.node_name == "edge-c1" && r.pod_cidr.to_string() == "10.244.7.0/24"));
        // A node whose pod CIDR overlaps edge-c1's is rejected; deleting edge-c1 admits it.
        let clash = lab_node(
            "edge-c2",
            7,
            "10.0.3.3",
            json!({"openyurt.io/is-edge-worker": "true", "apps.openyurt.io/nodepool": "site-c"}),
        );
        let mut clash = clash;
        clash.metadata.annotations.as_mut().unwrap().insert(
            keys::FLANNEL_BACKEND_DATA.into(),
            "{\"VtepMAC\":\"02:fa:00:00:00:77\"}".into(),
        );
        idx.apply(&clash);
        assert!(
            matches!(idx.rejected().get("edge-c2"), Some(TranslateError::Conflict(m)) if m.contains("overlaps"))
        );
        assert!(idx.inventory().node("edge-c2").is_none());
        assert!(idx.delete("edge-c1"));
        assert!(idx.rejected().is_empty());
        assert!(idx.inventory().admit_agent("edge-c2").is_ok());
        assert!(idx.inventory().node("edge-c1").is_none());
        // Deleting the last node of a site removes the site.
        assert!(idx.delete("edge-c2"));
        assert!(idx.inventory().site("site-c").is_none());
        // Switching a pool to express-connect re-kinds the site: its agents are no longer admitted.
        let mut b1 = lab()[4].clone();
        b1.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("petrel.io/site-network".into(), "express-connect".into());
        assert!(idx.apply(&b1));
        assert!(idx.inventory().admit_agent("edge-b1").is_err());
        // A node that becomes malformed leaves the inventory.
        let mut a2 = lab()[3].clone();
        a2.spec.as_mut().unwrap().pod_cidrs = Some(vec!["junk".into()]);
        assert!(idx.apply(&a2));
        assert!(idx.inventory().node("edge-a2").is_none());
        assert!(matches!(
            idx.rejected().get("edge-a2"),
            Some(TranslateError::BadPodCidr { .. })
        ));
        // Losing the gateway label.
        let mut gw = lab()[1].clone();
        gw.metadata.labels = None;
        assert!(idx.apply(&gw));
        assert!(idx.candidates().is_empty());
    }

    #[test]
    fn endpoints_round_trip() {
        let eps = vec![
            ("203.0.113.10".to_string(), 7443),
            ("2001:db8::1".to_string(), 7443),
        ];
        let s = format_endpoints(&eps);
        assert_eq!(s, "203.0.113.10:7443,[2001:db8::1]:7443");
        assert_eq!(parse_endpoints(&s), eps);
        assert_eq!(
            parse_endpoints("junk,gw.example.com:1"),
            vec![("gw.example.com".to_string(), 1)]
        );
    }
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod mutant_tests;
