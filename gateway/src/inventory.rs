//! The inventory: which sites and nodes exist, how each site reaches the cloud, and each node's
//! addresses, pod CIDRs and Flannel VTEP. It is a pure index (apply / delete / reset, no I/O)
//! fed by a file today and by Kubernetes watchers later, and it is the only source of authority:
//! what an agent claims about itself is logged, never trusted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use petrel_proto::MacAddr;
use serde::{Deserialize, Serialize};

/// How a site reaches the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    /// The VPC: control plane, cloud nodes, gateway candidates.
    Cloud,
    /// Behind NAT on the public Internet: reachable only through the hub.
    Public,
    /// Routed L3 leased line: plain Flannel VXLAN works; the hub only proxies the API server.
    ExpressConnect,
}

impl SiteKind {
    pub const ALLOWED: &'static str = "cloud, public, express-connect";

    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Cloud => "cloud",
            SiteKind::Public => "public",
            SiteKind::ExpressConnect => "express-connect",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    pub kind: SiteKind,
    /// The inner MTU of traffic toward this site's pods, when its WAN path is smaller than the
    /// hub's `--site-mtu` (a site behind a 1400-byte link or double NAT). Agents and node roles
    /// route the site's CIDRs at the smaller of their own MTU and this. Public sites only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub site: String,
    /// Node addresses (InternalIP/ExternalIP); for NAT'd edge nodes their private LAN address.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// Flannel's VtepMAC (from the `backend-data` annotation).
    #[serde(default, with = "opt_mac")]
    pub vtep_mac: Option<MacAddr>,
    /// Flannel's `public-ip` annotation: the VXLAN underlay address.
    #[serde(default)]
    pub public_ip: Option<IpAddr>,
    #[serde(default = "default_kubelet_port")]
    pub kubelet_port: u16,
    /// Carries the cloud-gateway label: a hub candidate.
    #[serde(default)]
    pub gateway: bool,
}

impl Node {
    /// Whether other nodes get a route to this one: it has a pod CIDR, a VTEP and an underlay
    /// address to send VXLAN to.
    fn routable(&self) -> bool {
        !self.pod_cidrs.is_empty() && self.vtep_mac.is_some() && self.underlay().is_some()
    }

    /// Where VXLAN for this node goes: Flannel's public-ip, else its first address.
    fn underlay(&self) -> Option<IpAddr> {
        self.public_ip.or_else(|| self.addresses.first().copied())
    }
}

fn default_kubelet_port() -> u16 {
    10250
}

mod opt_mac {
    use petrel_proto::MacAddr;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<MacAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(m) => s.serialize_str(&m.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MacAddr>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| {
            s.parse::<MacAddr>().map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid MAC address {s:?} (expected aa:bb:cc:dd:ee:ff)"
                ))
            })
        })
        .transpose()
    }
}

/// Why an inventory (or one change to it) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error("inventory file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("node {node}: site {site:?} is not defined (add it under [[sites]])")]
    UnknownSite { node: String, site: String },
    #[error("node name {0:?} is not a valid Kubernetes node name (lowercase letters, digits, '-' and '.', at most 253)")]
    BadNodeName(String),
    #[error("duplicate {what} {value:?}")]
    Duplicate { what: &'static str, value: String },
    #[error("pod CIDR {cidr} of node {node} overlaps {other_cidr} of node {other}")]
    OverlappingPodCidr {
        node: String,
        cidr: IpNet,
        other: String,
        other_cidr: IpNet,
    },
    #[error("site {0:?} still has nodes")]
    SiteInUse(String),
    #[error("site {site:?}: mtu {mtu} is outside {min}..={max}")]
    BadSiteMtu {
        site: String,
        mtu: u16,
        min: u16,
        max: u16,
    },
}

/// The range a site's `mtu` may take: the IPv4 minimum up to a jumbo underlay's inner MTU.
pub const SITE_MTU_RANGE: std::ops::RangeInclusive<u16> =
    petrel_proto::control::MIN_SITE_MTU..=8950;

fn check_site(site: &Site) -> Result<(), InventoryError> {
    match site.mtu {
        Some(mtu) if !SITE_MTU_RANGE.contains(&mtu) => Err(InventoryError::BadSiteMtu {
            site: site.name.clone(),
            mtu,
            min: *SITE_MTU_RANGE.start(),
            max: *SITE_MTU_RANGE.end(),
        }),
        _ => Ok(()),
    }
}

/// Why a node may not hold a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("node {0:?} is not in the inventory")]
    UnknownNode(String),
    #[error("node {node:?} is in {kind} site {site:?}; only nodes in public-network sites connect to the hub")]
    NotPublicSite {
        node: String,
        site: String,
        kind: &'static str,
    },
}

/// The raw file shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    #[serde(default)]
    pub sites: Vec<Site>,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

/// The lab's inventory, so `petrel-gateway run` starts with no arguments.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-inventory.toml");

/// The index.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    sites: BTreeMap<String, Site>,
    nodes: BTreeMap<String, Node>,
    generation: u64,
    // Derived from `nodes` by `apply_node` / `delete_node`, so that what the hub computes for
    // each connecting agent costs what it returns, not a walk of every node: with 10,000 agents
    // arriving at once after a restart, those walks were a third of the hub's CPU.
    /// Node names per site.
    site_members: BTreeMap<String, BTreeSet<String>>,
    /// Names of the nodes other nodes get a route to ([`Node::routable`]).
    routable: BTreeSet<String>,
    /// Owner of each pod CIDR, by (network, prefix): overlap checks and pod-IP lookups cost a
    /// few map lookups instead of a walk of every node (a 10,000-node inventory took
    /// 50 million CIDR comparisons to load).
    cidrs: BTreeMap<(IpAddr, u8), String>,
    /// Owner of each VtepMAC.
    macs: HashMap<MacAddr, String>,
}

/// The pod CIDR of `cidrs` that overlaps `cidr` (contains it or lies inside it) and belongs to
/// a node other than `except`.
fn overlapping(
    cidrs: &BTreeMap<(IpAddr, u8), String>,
    cidr: &ipnet::IpNet,
    except: &str,
) -> Option<(ipnet::IpNet, String)> {
    let net = cidr.trunc();
    // Existing CIDRs that contain `cidr`: its own network at each shorter (or equal) prefix.
    for p in 0..=net.prefix_len() {
        let Ok(wider) = ipnet::IpNet::new(net.addr(), p).map(|n| n.trunc()) else {
            continue;
        };
        if let Some(owner) = cidrs.get(&(wider.addr(), p)) {
            if owner != except {
                return Some((wider, owner.clone()));
            }
        }
    }
    // Existing CIDRs inside `cidr`: networks between its first and last address, with a
    // longer prefix (an equal one was found above).
    cidrs
        .range((net.network(), 0)..=(net.broadcast(), u8::MAX))
        .find(|((_, p), owner)| *p > net.prefix_len() && owner.as_str() != except)
        .and_then(|((a, p), owner)| Some((ipnet::IpNet::new(*a, *p).ok()?, owner.clone())))
}

pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Inventory {
    /// Parses and validates a TOML inventory; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, InventoryError> {
        let file: InventoryFile = toml::from_str(text).map_err(|e| InventoryError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut inv = Inventory::default();
        inv.reset(file.sites, file.nodes)?;
        Ok(inv)
    }

    pub fn embedded_default() -> Result<Self, InventoryError> {
        Self::from_toml(EMBEDDED_DEFAULT, "<embedded default>")
    }

    /// Replaces everything (a relist). On error nothing changes.
    pub fn reset(&mut self, sites: Vec<Site>, nodes: Vec<Node>) -> Result<(), InventoryError> {
        let mut next = Inventory {
            generation: self.generation,
            ..Default::default()
        };
        for s in sites {
            check_site(&s)?;
            if next.sites.contains_key(&s.name) {
                return Err(InventoryError::Duplicate {
                    what: "site",
                    value: s.name,
                });
            }
            next.sites.insert(s.name.clone(), s);
        }
        for n in nodes {
            if next.nodes.contains_key(&n.name) {
                return Err(InventoryError::Duplicate {
                    what: "node",
                    value: n.name,
                });
            }
            next.apply_node(n)?;
        }
        next.generation = self.generation + 1;
        *self = next;
        Ok(())
    }

    pub fn apply_site(&mut self, site: Site) {
        self.sites.insert(site.name.clone(), site);
        self.generation += 1;
    }

    pub fn delete_site(&mut self, name: &str) -> Result<Option<Site>, InventoryError> {
        if self.site_members.get(name).is_some_and(|m| !m.is_empty()) {
            return Err(InventoryError::SiteInUse(name.to_string()));
        }
        self.generation += 1;
        Ok(self.sites.remove(name))
    }

    /// Adds or replaces a node.
    pub fn apply_node(&mut self, node: Node) -> Result<(), InventoryError> {
        if !valid_node_name(&node.name) {
            return Err(InventoryError::BadNodeName(node.name));
        }
        if !self.sites.contains_key(&node.site) {
            return Err(InventoryError::UnknownSite {
                node: node.name,
                site: node.site,
            });
        }
        for cidr in &node.pod_cidrs {
            if let Some((other_cidr, other)) = overlapping(&self.cidrs, cidr, &node.name) {
                return Err(InventoryError::OverlappingPodCidr {
                    node: node.name.clone(),
                    cidr: *cidr,
                    other,
                    other_cidr,
                });
            }
        }
        if let Some(mac) = node.vtep_mac {
            if self.macs.get(&mac).is_some_and(|owner| *owner != node.name) {
                return Err(InventoryError::Duplicate {
                    what: "VtepMAC",
                    value: mac.to_string(),
                });
            }
        }
        // Overlaps among the node's own CIDRs.
        for (i, a) in node.pod_cidrs.iter().enumerate() {
            if let Some(b) = node
                .pod_cidrs
                .iter()
                .skip(i + 1)
                .find(|b| a.contains(*b) || b.contains(a))
            {
                return Err(InventoryError::OverlappingPodCidr {
                    node: node.name.clone(),
                    cidr: *a,
                    other: node.name.clone(),
                    other_cidr: *b,
                });
            }
        }
        self.unindex(&node.name);
        self.site_members
            .entry(node.site.clone())
            .or_default()
            .insert(node.name.clone());
        if node.routable() {
            self.routable.insert(node.name.clone());
        }
        for c in &node.pod_cidrs {
            let net = c.trunc();
            self.cidrs
                .insert((net.addr(), net.prefix_len()), node.name.clone());
        }
        if let Some(mac) = node.vtep_mac {
            self.macs.insert(mac, node.name.clone());
        }
        self.nodes.insert(node.name.clone(), node);
        self.generation += 1;
        Ok(())
    }

    pub fn delete_node(&mut self, name: &str) -> Option<Node> {
        self.generation += 1;
        self.unindex(name);
        self.nodes.remove(name)
    }

    /// Takes node `name` (as currently stored) out of the derived indexes.
    fn unindex(&mut self, name: &str) {
        let Some(old) = self.nodes.get(name) else {
            return;
        };
        if let Some(members) = self.site_members.get_mut(&old.site) {
            members.remove(name);
            if members.is_empty() {
                self.site_members.remove(&old.site);
            }
        }
        self.routable.remove(name);
        for c in &old.pod_cidrs {
            let net = c.trunc();
            if self
                .cidrs
                .get(&(net.addr(), net.prefix_len()))
                .map(String::as_str)
                == Some(name)
            {
                self.cidrs.remove(&(net.addr(), net.prefix_len()));
            }
        }
        if let Some(mac) = old.vtep_mac {
            if self.macs.get(&mac).map(String::as_str) == Some(name) {
                self.macs.remove(&mac);
            }
        }
    }

    /// The nodes of site `site`, by name.
    pub fn site_nodes<'a>(&'a self, site: &str) -> impl Iterator<Item = &'a Node> + 'a {
        self.site_members
            .get(site)
            .into_iter()
            .flatten()
            .filter_map(|name| self.nodes.get(name))
    }

    /// Bumped on every change, so watchers of the index can tell whether to recompute.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn sites(&self) -> impl Iterator<Item = &Site> {
        self.sites.values()
    }

    /// How many nodes sit outside the cloud (public and Express Connect sites): the agents a
    /// hub may see reconnect at once. Costs a look-up per site, not a walk of the nodes.
    pub fn edge_nodes(&self) -> usize {
        self.sites
            .values()
            .filter(|s| s.kind != SiteKind::Cloud)
            .filter_map(|s| self.site_members.get(&s.name))
            .map(BTreeSet::len)
            .sum()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.get(name)
    }

    pub fn site_kind_of(&self, node: &Node) -> Option<SiteKind> {
        self.sites.get(&node.site).map(|s| s.kind)
    }

    /// Nodes whose addresses include `ip` (more than one across sites is normal: private
    /// address plans overlap between data centres).
    pub fn nodes_by_address(&self, ip: IpAddr) -> Vec<&Node> {
        self.nodes
            .values()
            .filter(|n| n.addresses.contains(&ip))
            .collect()
    }

    /// The node whose pod CIDR contains `ip` (CIDRs never overlap, see `apply_node`).
    pub fn node_by_pod_ip(&self, ip: IpAddr) -> Option<&Node> {
        let host = ipnet::IpNet::from(ip);
        overlapping(&self.cidrs, &host, "").and_then(|(_, owner)| self.nodes.get(&owner))
    }

    pub fn node_by_vtep_mac(&self, mac: MacAddr) -> Option<&Node> {
        self.macs.get(&mac).and_then(|n| self.nodes.get(n))
    }

    /// Gateway candidates (nodes with the cloud-gateway label).
    pub fn gateways(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.gateway)
    }

    /// Whether `name` may hold a tunnel: it must exist and sit in a public-network site.
    pub fn admit_agent(&self, name: &str) -> Result<(&Node, &Site), AdmissionError> {
        let node = self
            .nodes
            .get(name)
            .ok_or_else(|| AdmissionError::UnknownNode(name.to_string()))?;
        let site = self
            .sites
            .get(&node.site)
            .ok_or_else(|| AdmissionError::UnknownNode(name.to_string()))?;
        if site.kind != SiteKind::Public {
            return Err(AdmissionError::NotPublicSite {
                node: name.to_string(),
                site: site.name.clone(),
                kind: site.kind.as_str(),
            });
        }
        Ok((node, site))
    }

    /// The routes an agent on `node_name` is told about: every other node with a pod CIDR and a
    /// VTEP, `Direct` inside its own site (Flannel's plain VXLAN keeps working there) and `ViaHub`
    /// for everything else.
    pub fn routes_for(&self, node_name: &str) -> Vec<petrel_proto::Route> {
        let Some(me) = self.nodes.get(node_name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let others = self
            .routable
            .iter()
            .filter(|name| **name != me.name)
            .filter_map(|name| self.nodes.get(name));
        for n in others {
            let (Some(mac), Some(underlay)) = (n.vtep_mac, n.underlay()) else {
                continue;
            };
            for cidr in &n.pod_cidrs {
                let Ok(pod_cidr) = petrel_proto::IpCidr::new(cidr.network(), cidr.prefix_len())
                else {
                    continue;
                };
                out.push(petrel_proto::Route {
                    node_name: n.name.clone(),
                    site: n.site.clone(),
                    pod_cidr,
                    vtep_mac: mac,
                    underlay,
                    path: if n.site == me.site {
                        petrel_proto::RoutePath::Direct
                    } else {
                        petrel_proto::RoutePath::ViaHub
                    },
                });
            }
        }
        out
    }

    /// The cluster route table every route-sync agent derives its routes from (one entry per
    /// routable node with a VtepMAC and an underlay address; the same for every agent).
    pub fn route_entries(&self) -> Vec<petrel_proto::RouteEntry> {
        self.routable
            .iter()
            .filter_map(|name| self.nodes.get(name))
            .filter_map(|n| {
                let (mac, underlay) = (n.vtep_mac?, n.underlay()?);
                Some(petrel_proto::RouteEntry {
                    node_name: n.name.clone(),
                    site: n.site.clone(),
                    pod_cidrs: n
                        .pod_cidrs
                        .iter()
                        .filter_map(|c| petrel_proto::IpCidr::new(c.network(), c.prefix_len()).ok())
                        .collect(),
                    vtep_mac: mac,
                    underlay,
                    mtu: 0,
                })
            })
            .collect()
    }

    /// Sites whose traffic needs a smaller MTU than the hub's default (see [`Site::mtu`]), for
    /// agents' views.
    pub fn site_mtus(&self) -> Vec<petrel_proto::control::SiteMtu> {
        self.sites
            .values()
            .filter_map(|s| {
                Some(petrel_proto::control::SiteMtu {
                    site: s.name.clone(),
                    mtu: s.mtu?,
                })
            })
            .collect()
    }

    /// Serializes back to the file shape (for `inventory show` and tests).
    pub fn to_file(&self) -> InventoryFile {
        InventoryFile {
            sites: self.sites.values().cloned().collect(),
            nodes: self.nodes.values().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn site_mtu_is_read_checked_and_listed() {
        let text = "[[sites]]\nname = \"vpc\"\nkind = \"cloud\"\n\n[[sites]]\nname = \"small\"\nkind = \"public\"\nmtu = 1296\n";
        let inv = Inventory::from_toml(text, "t").unwrap();
        assert_eq!(inv.site("small").unwrap().mtu, Some(1296));
        assert_eq!(
            inv.site_mtus(),
            vec![petrel_proto::control::SiteMtu {
                site: "small".into(),
                mtu: 1296
            }]
        );
        for bad in ["575", "8951"] {
            let t = text.replace("1296", bad);
            assert!(matches!(
                Inventory::from_toml(&t, "t"),
                Err(InventoryError::BadSiteMtu { .. })
            ));
        }
        assert!(Inventory::from_toml(&text.replace("1296", "576"), "t").is_ok());
        assert!(Inventory::from_toml(&text.replace("1296", "8950"), "t").is_ok());
    }

    #[test]
    fn cidr_and_mac_indexes_follow_replacements_and_deletions() {
        let mut inv = Inventory::embedded_default().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            inv.node_by_pod_ip(ip("10.244.3.77")).unwrap().name,
            "edge-a1"
        );
        // edge-a1 moves to another CIDR and MAC: its old ones are free for edge-a2.
        let mut a1 = inv.node("edge-a1").unwrap().clone();
        a1.pod_cidrs = vec!["10.250.0.0/24".parse().unwrap()];
        let old_mac = a1.vtep_mac;
        a1.vtep_mac = Some(MacAddr([2, 0xfa, 0, 0, 0, 0x33]));
        inv.apply_node(a1).unwrap();
        assert!(inv.node_by_pod_ip(ip("10.244.3.77")).is_none());
        assert_eq!(
            inv.node_by_pod_ip(ip("10.250.0.9")).unwrap().name,
            "edge-a1"
        );
        assert!(inv.node_by_vtep_mac(old_mac.unwrap()).is_none());
        let mut a2 = inv.node("edge-a2").unwrap().clone();
        a2.pod_cidrs.push("10.244.3.0/24".parse().unwrap());
        a2.vtep_mac = old_mac;
        inv.apply_node(a2).unwrap();
        assert_eq!(
            inv.node_by_pod_ip(ip("10.244.3.77")).unwrap().name,
            "edge-a2"
        );
        // A wider CIDR covering edge-a1's new one is refused, naming edge-a1.
        let mut b1 = inv.node("edge-b1").unwrap().clone();
        b1.pod_cidrs = vec!["10.250.0.0/16".parse().unwrap()];
        match inv.apply_node(b1) {
            Err(InventoryError::OverlappingPodCidr { other, .. }) => assert_eq!(other, "edge-a1"),
            other => panic!("{other:?}"),
        }
        // Deleting edge-a1 frees its CIDR for the wider one.
        inv.delete_node("edge-a1");
        let mut b1 = inv.node("edge-b1").unwrap().clone();
        b1.pod_cidrs = vec!["10.250.0.0/16".parse().unwrap()];
        inv.apply_node(b1).unwrap();
        assert_eq!(
            inv.node_by_pod_ip(ip("10.250.7.1")).unwrap().name,
            "edge-b1"
        );
    }

    #[test]
    fn embedded_default_loads_and_admits_only_public_edges() {
        let inv = Inventory::embedded_default().unwrap();
        assert!(inv.admit_agent("edge-a1").is_ok());
        assert!(matches!(
            inv.admit_agent("x1"),
            Err(AdmissionError::NotPublicSite { .. })
        ));
        assert!(matches!(
            inv.admit_agent("cloud-1"),
            Err(AdmissionError::NotPublicSite { .. })
        ));
        assert!(matches!(
            inv.admit_agent("nope"),
            Err(AdmissionError::UnknownNode(_))
        ));
        assert_eq!(
            inv.gateways().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            vec!["gw-1"]
        );
    }

    #[test]
    fn routes_are_direct_inside_a_site_and_via_hub_elsewhere() {
        let inv = Inventory::embedded_default().unwrap();
        let routes = inv.routes_for("edge-a1");
        let path = |n: &str| routes.iter().find(|r| r.node_name == n).map(|r| r.path);
        assert_eq!(path("edge-a2"), Some(petrel_proto::RoutePath::Direct));
        assert_eq!(path("edge-b1"), Some(petrel_proto::RoutePath::ViaHub));
        assert_eq!(path("cloud-1"), Some(petrel_proto::RoutePath::ViaHub));
        assert_eq!(path("edge-a1"), None);
    }

    /// The derived indexes (site members, routable nodes) must say what a walk of every node
    /// says, through moves between sites, lost VTEPs, deletions and relists.
    #[test]
    fn indexes_agree_with_a_walk_of_every_node() {
        fn check(inv: &Inventory) {
            for site in inv.sites() {
                let walked: Vec<&str> = inv
                    .nodes()
                    .filter(|n| n.site == site.name)
                    .map(|n| n.name.as_str())
                    .collect();
                let indexed: Vec<&str> = inv
                    .site_nodes(&site.name)
                    .map(|n| n.name.as_str())
                    .collect();
                assert_eq!(indexed, walked, "members of {}", site.name);
            }
            for me in inv.nodes() {
                let walked: Vec<&str> = inv
                    .nodes()
                    .filter(|n| n.name != me.name && n.routable())
                    .map(|n| n.name.as_str())
                    .collect();
                let routes = inv.routes_for(&me.name);
                let routed: Vec<&str> = routes.iter().map(|r| r.node_name.as_str()).collect();
                assert_eq!(routed, walked, "routes for {}", me.name);
            }
        }
        let mut inv = Inventory::embedded_default().unwrap();
        check(&inv);
        let mut a2 = inv.node("edge-a2").unwrap().clone();
        a2.site = "site-b".into();
        inv.apply_node(a2.clone()).unwrap();
        check(&inv);
        assert!(inv.site_nodes("site-a").all(|n| n.name != "edge-a2"));
        a2.vtep_mac = None;
        inv.apply_node(a2).unwrap();
        check(&inv);
        assert!(inv
            .routes_for("edge-a1")
            .iter()
            .all(|r| r.node_name != "edge-a2"));
        inv.delete_node("edge-b1");
        inv.delete_node("edge-a2");
        check(&inv);
        assert_eq!(inv.site_nodes("site-b").count(), 0);
        // site-b is empty now, so it may go; site-a still holds edge-a1.
        assert!(inv.delete_site("site-b").unwrap().is_some());
        assert!(matches!(
            inv.delete_site("site-a"),
            Err(InventoryError::SiteInUse(_))
        ));
        let file = inv.to_file();
        inv.reset(file.sites, file.nodes).unwrap();
        check(&inv);
    }

    #[test]
    fn lookups_by_pod_ip_address_and_mac() {
        let inv = Inventory::embedded_default().unwrap();
        let a1 = inv.node("edge-a1").unwrap().clone();
        let ip = match a1.pod_cidrs[0] {
            IpNet::V4(n) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(n.network()) + 7)),
            IpNet::V6(_) => unreachable!(),
        };
        assert_eq!(inv.node_by_pod_ip(ip).unwrap().name, "edge-a1");
        assert_eq!(
            inv.node_by_vtep_mac(a1.vtep_mac.unwrap()).unwrap().name,
            "edge-a1"
        );
        assert_eq!(inv.nodes_by_address(a1.addresses[0])[0].name, "edge-a1");
    }

    #[test]
    fn typos_and_conflicts_are_clear_errors_and_change_nothing() {
        let err =
            Inventory::from_toml("[[sites]]\nname='a'\nkind='publik'\n", "f.toml").unwrap_err();
        assert!(
            err.to_string().contains("f.toml") && err.to_string().contains("publik"),
            "{err}"
        );
        let err = Inventory::from_toml("[[sites]]\nname='a'\nkind='public'\nbogus=1\n", "f.toml")
            .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Inventory::from_toml("[[nodes]]\nname='n'\nsite='zz'\n", "f").unwrap_err();
        assert_eq!(
            err,
            InventoryError::UnknownSite {
                node: "n".into(),
                site: "zz".into()
            }
        );

        let mut inv = Inventory::embedded_default().unwrap();
        let before = inv.generation();
        let mut clash = inv.node("edge-a1").unwrap().clone();
        clash.name = "edge-a9".into();
        clash.vtep_mac = None;
        assert!(matches!(
            inv.apply_node(clash),
            Err(InventoryError::OverlappingPodCidr { .. })
        ));
        assert_eq!(inv.generation(), before);
        assert!(matches!(
            inv.apply_node(Node {
                name: "Bad_Name".into(),
                ..inv.node("edge-a1").unwrap().clone()
            }),
            Err(InventoryError::BadNodeName(_))
        ));
        assert!(inv.node("edge-a9").is_none());
    }

    #[test]
    fn apply_delete_reset() {
        let mut inv = Inventory::embedded_default().unwrap();
        let mut n = inv.node("edge-b1").unwrap().clone();
        n.name = "edge-b2".into();
        n.pod_cidrs = vec!["10.244.99.0/24".parse().unwrap()];
        n.vtep_mac = Some("02:fa:00:00:00:99".parse().unwrap());
        inv.apply_node(n).unwrap();
        assert!(inv.admit_agent("edge-b2").is_ok());
        assert!(inv.delete_node("edge-b2").is_some());
        assert!(inv.admit_agent("edge-b2").is_err());
        assert!(matches!(
            inv.delete_site("site-a"),
            Err(InventoryError::SiteInUse(_))
        ));
        inv.reset(vec![], vec![]).unwrap();
        assert_eq!(inv.nodes().count(), 0);
    }
}

#[cfg(test)]
#[path = "inventory_tests.rs"]
mod mutant_tests;
