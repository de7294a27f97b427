//! Target resolution, pure: a CONNECT host (node name, node address or pod IP) and port become
//! the node that owns the target, the address to dial and the path (an agent's QUIC stream for
//! public-network sites, a direct TCP dial by the hub for cloud and Express Connect sites), or a
//! refusal with the reason. Nothing outside the inventory is ever a target.

use std::net::IpAddr;

use crate::inventory::{Inventory, SiteKind};

/// Which ports the policy allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    /// Ports allowed on node names and node addresses (plus each node's own kubelet port).
    pub node_ports: Vec<u16>,
    /// Ports allowed on pod IPs; `None` allows any.
    pub pod_ports: Option<Vec<u16>>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        Self {
            node_ports: vec![10250, 10255],
            pod_ports: None,
        }
    }
}

impl PortPolicy {
    pub fn node_port_allowed(&self, node: &crate::inventory::Node, port: u16) -> bool {
        port == node.kubelet_port || self.node_ports.contains(&port)
    }

    pub fn pod_port_allowed(&self, port: u16) -> bool {
        self.pod_ports.as_ref().is_none_or(|p| p.contains(&port))
    }
}

/// How the hub reaches a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A QUIC stream to the agent of the node (or of its site).
    Tunnel,
    /// A TCP connection from the hub itself (cloud and Express Connect sites).
    Direct,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Tunnel => "tunnel",
            Path::Direct => "direct",
        }
    }
}

/// A resolved target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The node that owns the target (for a pod IP, the node whose pod CIDR holds it).
    pub node: String,
    pub site: String,
    pub ip: IpAddr,
    pub port: u16,
    pub path: Path,
    /// "node" or "pod", for logs.
    pub kind: &'static str,
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("unknown destination {0}: not a node name, node address or pod IP in the inventory")]
    Unknown(String),
    #[error("{host} matches nodes in more than one site ({candidates}); use the node name")]
    Ambiguous { host: String, candidates: String },
    #[error("port {port} is not allowed on node {node} (allowed: {allowed})")]
    NodePort {
        node: String,
        port: u16,
        allowed: String,
    },
    #[error("port {port} is not allowed on pod IP {ip} of node {node} (allowed: {allowed})")]
    PodPort {
        ip: IpAddr,
        node: String,
        port: u16,
        allowed: String,
    },
    #[error("node {0} has no address in the inventory")]
    NoAddress(String),
}

impl ResolveError {
    /// Status code and metric outcome.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            ResolveError::Unknown(_) => (404, "unknown_destination"),
            ResolveError::Ambiguous { .. } => (409, "ambiguous"),
            ResolveError::NodePort { .. } | ResolveError::PodPort { .. } => {
                (403, "port_not_allowed")
            }
            ResolveError::NoAddress(_) => (502, "no_address"),
        }
    }
}

fn path_of(kind: SiteKind) -> Path {
    match kind {
        SiteKind::Public => Path::Tunnel,
        SiteKind::Cloud | SiteKind::ExpressConnect => Path::Direct,
    }
}

fn list_ports(node: &crate::inventory::Node, ports: &PortPolicy) -> String {
    let mut all = ports.node_ports.clone();
    if !all.contains(&node.kubelet_port) {
        all.push(node.kubelet_port);
    }
    all.sort_unstable();
    all.iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn node_target(
    inv: &Inventory,
    node: &crate::inventory::Node,
    ip: IpAddr,
    port: u16,
    ports: &PortPolicy,
) -> Result<Resolved, ResolveError> {
    if !ports.node_port_allowed(node, port) {
        return Err(ResolveError::NodePort {
            node: node.name.clone(),
            port,
            allowed: list_ports(node, ports),
        });
    }
    let kind = inv.site_kind_of(node).unwrap_or(SiteKind::Cloud);
    Ok(Resolved {
        node: node.name.clone(),
        site: node.site.clone(),
        ip,
        port,
        path: path_of(kind),
        kind: "node",
    })
}

/// Whether `ip` is the network address or the first host of `cidr`: on a Flannel node those
/// are its own interfaces (flannel.1 takes `.0`, the cni0 bridge `.1`), not pods.
pub fn is_node_host_address(cidr: &ipnet::IpNet, ip: IpAddr) -> bool {
    petrel_proto::IpCidr::new(cidr.network(), cidr.prefix_len())
        .is_ok_and(|c| c.node_host_address(ip))
}

/// Resolves `host:port`. `host` is lowercase, without brackets.
pub fn resolve(
    inv: &Inventory,
    host: &str,
    port: u16,
    ports: &PortPolicy,
) -> Result<Resolved, ResolveError> {
    let host = host.trim_end_matches('.');
    if let Ok(ip) = host.parse::<IpAddr>() {
        let nodes = inv.nodes_by_address(ip);
        if let Some(first) = nodes.first() {
            let mut sites: Vec<&str> = nodes.iter().map(|n| n.site.as_str()).collect();
            sites.sort_unstable();
            sites.dedup();
            if sites.len() > 1 {
                return Err(ResolveError::Ambiguous {
                    host: ip.to_string(),
                    candidates: nodes
                        .iter()
                        .map(|n| format!("{} in {}", n.name, n.site))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            return node_target(inv, first, ip, port, ports);
        }
        if let Some(node) = inv.node_by_pod_ip(ip) {
            // A pod CIDR's network address and first host are the node itself (flannel.1 and
            // cni0 carry them): they get the node's port allowlist, not the pods'.
            if node.pod_cidrs.iter().any(|c| is_node_host_address(c, ip)) {
                return node_target(inv, node, ip, port, ports);
            }
            if !ports.pod_port_allowed(port) {
                return Err(ResolveError::PodPort {
                    ip,
                    node: node.name.clone(),
                    port,
                    allowed: ports
                        .pod_ports
                        .iter()
                        .flatten()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            let kind = inv.site_kind_of(node).unwrap_or(SiteKind::Cloud);
            return Ok(Resolved {
                node: node.name.clone(),
                site: node.site.clone(),
                ip,
                port,
                path: path_of(kind),
                kind: "pod",
            });
        }
        return Err(ResolveError::Unknown(ip.to_string()));
    }
    let Some(node) = inv.node(host) else {
        return Err(ResolveError::Unknown(host.to_string()));
    };
    let ip = node
        .addresses
        .first()
        .copied()
        .ok_or_else(|| ResolveError::NoAddress(node.name.clone()))?;
    node_target(inv, node, ip, port, ports)
}

/// The egress policy an agent on `node` is sent: the addresses and pod CIDRs of every node of
/// its site, the node ports (configured plus each site node's kubelet port), the pod ports.
/// Where a cap cuts the lists, the agent's own node comes first so that it survives them.
pub fn policy_for(
    inv: &Inventory,
    node: &str,
    ports: &PortPolicy,
) -> petrel_proto::control::EgressPolicy {
    let Some(me) = inv.node(node) else {
        return Default::default();
    };
    let site = site_policy(inv, &me.site, ports);
    if site.complete {
        return site.policy;
    }
    own_node_first(inv, me, ports)
}

/// The policy of `me`'s site with `me` first, for a site whose policy the caps cut.
pub fn own_node_first(
    inv: &Inventory,
    me: &crate::inventory::Node,
    ports: &PortPolicy,
) -> petrel_proto::control::EgressPolicy {
    build_policy(
        std::iter::once(me).chain(inv.site_nodes(&me.site).filter(|n| n.name != me.name)),
        ports,
    )
    .policy
}

/// What every agent of one site is sent, unless a cap cut it (then each agent's own node must
/// come first; see [`policy_for`]).
#[derive(Debug, Clone)]
pub struct SitePolicy {
    pub policy: petrel_proto::control::EgressPolicy,
    /// No cap cut anything, so the policy holds every node of the site.
    pub complete: bool,
}

/// The policy of a whole site, its nodes in name order.
pub fn site_policy(inv: &Inventory, site: &str, ports: &PortPolicy) -> SitePolicy {
    build_policy(inv.site_nodes(site), ports)
}

fn build_policy<'a>(
    nodes: impl Iterator<Item = &'a crate::inventory::Node>,
    ports: &PortPolicy,
) -> SitePolicy {
    use petrel_proto::control::{EgressPolicy, MAX_EGRESS_PORTS, MAX_EGRESS_TARGETS};
    let mut policy = EgressPolicy {
        node_ports: ports.node_ports.clone(),
        pod_ports: ports.pod_ports.clone(),
        ..Default::default()
    };
    let mut complete = true;
    // Addresses repeat across a site's nodes rarely, but a linear `contains` per address made a
    // large site quadratic.
    let mut seen = std::collections::HashSet::new();
    for n in nodes {
        for ip in &n.addresses {
            if seen.insert(*ip) {
                if policy.node_addresses.len() < MAX_EGRESS_TARGETS {
                    policy.node_addresses.push(*ip);
                } else {
                    complete = false;
                }
            }
        }
        for c in &n.pod_cidrs {
            if policy.pod_cidrs.len() < MAX_EGRESS_TARGETS {
                if let Ok(c) = petrel_proto::IpCidr::new(c.network(), c.prefix_len()) {
                    policy.pod_cidrs.push(c);
                }
            } else {
                complete = false;
            }
        }
        if n.kubelet_port != 0 && !policy.node_ports.contains(&n.kubelet_port) {
            policy.node_ports.push(n.kubelet_port);
        }
    }
    policy.node_ports.retain(|p| *p != 0);
    if policy.node_ports.len() > MAX_EGRESS_PORTS {
        policy.node_ports.truncate(MAX_EGRESS_PORTS);
        complete = false;
    }
    if let Some(p) = policy.pod_ports.as_mut() {
        p.retain(|p| *p != 0);
        p.truncate(MAX_EGRESS_PORTS);
    }
    SitePolicy { policy, complete }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn inv() -> Inventory {
        let mut inv = Inventory::embedded_default().unwrap();
        // A second data centre reusing edge-a1's private address.
        let mut b2 = inv.node("edge-b1").unwrap().clone();
        b2.name = "edge-b2".into();
        b2.addresses = vec!["10.0.1.2".parse().unwrap()];
        b2.pod_cidrs = vec!["10.244.50.0/24".parse().unwrap()];
        b2.vtep_mac = None;
        inv.apply_node(b2).unwrap();
        inv
    }

    #[test]
    fn a_pod_cidrs_node_addresses_get_the_node_port_allowlist() {
        let inv = inv();
        let cidr = inv.node("edge-a1").unwrap().pod_cidrs[0];
        let net = cidr.network();
        let IpAddr::V4(v4) = net else {
            panic!("IPv4 lab")
        };
        let first = IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) + 1));
        let pod = IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) + 7));
        let p = PortPolicy::default();
        for node_ip in [net, first] {
            // Port 22 is fine on a pod (any pod port by default) but not on the node itself.
            let e = resolve(&inv, &node_ip.to_string(), 22, &p).unwrap_err();
            assert!(
                matches!(e, ResolveError::NodePort { .. }),
                "{node_ip}: {e:?}"
            );
            let r = resolve(&inv, &node_ip.to_string(), 10250, &p).unwrap();
            assert_eq!((r.node.as_str(), r.kind), ("edge-a1", "node"));
        }
        let r = resolve(&inv, &pod.to_string(), 22, &p).unwrap();
        assert_eq!(r.kind, "pod");
    }

    #[test]
    fn names_addresses_and_pod_ips() {
        let inv = inv();
        let p = PortPolicy::default();
        let r = resolve(&inv, "edge-a1", 10250, &p).unwrap();
        assert_eq!(
            (r.node.as_str(), r.path, r.ip),
            ("edge-a1", Path::Tunnel, "10.0.1.2".parse().unwrap())
        );
        let r = resolve(&inv, "10.0.2.2", 10255, &p).unwrap();
        assert_eq!(r.node, "edge-b1");
        let r = resolve(&inv, "10.244.4.9", 8080, &p).unwrap();
        assert_eq!((r.node.as_str(), r.kind), ("edge-a2", "pod"));
        let r = resolve(&inv, "x1", 10250, &p).unwrap();
        assert_eq!(r.path, Path::Direct);
        let r = resolve(&inv, "10.244.1.5", 443, &p).unwrap();
        assert_eq!((r.node.as_str(), r.path), ("cloud-1", Path::Direct));
    }

    #[test]
    fn refusals() {
        let inv = inv();
        let p = PortPolicy::default();
        let e = resolve(&inv, "10.0.1.2", 10250, &p).unwrap_err();
        assert_eq!(e.status().0, 409);
        let msg = e.to_string();
        assert!(
            msg.contains("edge-a1 in site-a") && msg.contains("edge-b2 in site-b"),
            "{msg}"
        );
        // Node names always work.
        assert!(resolve(&inv, "edge-b2", 10250, &p).is_ok());
        assert_eq!(
            resolve(&inv, "edge-a1", 22, &p).unwrap_err().status().0,
            403
        );
        assert_eq!(
            resolve(&inv, "nope", 10250, &p).unwrap_err().status().0,
            404
        );
        assert_eq!(
            resolve(&inv, "8.8.8.8", 53, &p).unwrap_err().status().0,
            404
        );
        let strict = PortPolicy {
            pod_ports: Some(vec![8080]),
            ..p
        };
        assert!(resolve(&inv, "10.244.4.9", 8080, &strict).is_ok());
        assert_eq!(
            resolve(&inv, "10.244.4.9", 22, &strict)
                .unwrap_err()
                .status()
                .0,
            403
        );
    }

    #[test]
    fn agent_policy_covers_its_site_only() {
        let inv = inv();
        let pol = policy_for(&inv, "edge-a1", &PortPolicy::default());
        assert!(pol.allows("10.0.1.2".parse().unwrap(), 10250));
        assert!(pol.allows("10.0.1.3".parse().unwrap(), 10250));
        assert!(pol.allows("10.244.4.7".parse().unwrap(), 9000));
        assert!(!pol.allows("10.0.2.2".parse().unwrap(), 10250));
        assert!(!pol.allows("10.244.5.7".parse().unwrap(), 9000));
        assert!(!pol.allows("10.0.1.3".parse().unwrap(), 22));
        assert_eq!(
            policy_for(&inv, "ghost", &PortPolicy::default()),
            Default::default()
        );
    }

    /// A site larger than the caps: every agent's own node survives them, and the policy says
    /// the same whether it comes from the site's cached policy or not.
    #[test]
    fn own_node_survives_the_caps_of_a_large_site() {
        use petrel_proto::control::MAX_EGRESS_TARGETS;
        let mut inv = Inventory::embedded_default().unwrap();
        let template = inv.node("edge-a1").unwrap().clone();
        let n = MAX_EGRESS_TARGETS + 10;
        for i in 0..n {
            let mut node = template.clone();
            node.name = format!("big-{i:05}");
            node.addresses = vec![IpAddr::from([10, 9, (i / 256) as u8, (i % 256) as u8])];
            node.pod_cidrs = vec![];
            node.vtep_mac = None;
            inv.apply_node(node).unwrap();
        }
        let ports = PortPolicy::default();
        let site = site_policy(&inv, &template.site, &ports);
        assert!(!site.complete);
        assert_eq!(site.policy.node_addresses.len(), MAX_EGRESS_TARGETS);
        let last = format!("big-{:05}", n - 1);
        let last_ip = inv.node(&last).unwrap().addresses[0];
        assert!(!site.policy.node_addresses.contains(&last_ip));
        let pol = policy_for(&inv, &last, &ports);
        assert_eq!(pol.node_addresses.len(), MAX_EGRESS_TARGETS);
        assert_eq!(pol.node_addresses[0], last_ip);
        assert!(pol.allows(last_ip, 10250));
        // A small site is complete, and every agent of it gets the site's policy.
        let small = site_policy(&inv, "site-b", &ports);
        assert!(small.complete);
        assert_eq!(policy_for(&inv, "edge-b1", &ports), small.policy);
    }
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod mutant_tests;
