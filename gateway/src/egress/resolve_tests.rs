//! The egress policy sent to agents must fail closed: configured pod ports, custom kubelet
//! ports and every cap (targets, node ports, pod ports) are pinned here, with the resolver's
//! error texts and status codes.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::inventory::{Node, Site};
use petrel_proto::control::{MAX_EGRESS_PORTS, MAX_EGRESS_TARGETS};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str, site: &str, addrs: &[&str], cidrs: &[&str], kubelet_port: u16) -> Node {
    Node {
        name: name.into(),
        site: site.into(),
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        vtep_mac: None,
        public_ip: None,
        kubelet_port,
        gateway: false,
    }
}

/// site-a (public): e1 on 10250, e2 on a custom kubelet port 10443; vpc (cloud): c1.
fn inv() -> Inventory {
    let mut inv = Inventory::default();
    inv.reset(
        vec![
            Site {
                name: "site-a".into(),
                kind: SiteKind::Public,
                mtu: None,
            },
            Site {
                name: "vpc".into(),
                kind: SiteKind::Cloud,
                mtu: None,
            },
        ],
        vec![
            node("e1", "site-a", &["10.0.1.2"], &["10.244.3.0/24"], 10250),
            node(
                "e2",
                "site-a",
                &["10.0.1.3", "10.0.1.2"],
                &["10.244.4.0/24", "fd00:4::/64"],
                10443,
            ),
            node("c1", "vpc", &["192.168.0.11"], &["10.244.1.0/24"], 10250),
            node("bare", "vpc", &[], &[], 10250),
        ],
    )
    .unwrap();
    inv
}

fn strict() -> PortPolicy {
    PortPolicy {
        node_ports: vec![10250],
        pod_ports: Some(vec![8080, 9090]),
    }
}

#[test]
fn configured_pod_ports_reach_the_agent_policy() {
    let pol = policy_for(&inv(), "e1", &strict());
    assert_eq!(pol.pod_ports, Some(vec![8080, 9090]));
    assert!(pol.allows(ip("10.244.4.7"), 8080));
    assert!(pol.allows(ip("fd00:4::7"), 9090));
    // Fail closed: a pod port not in the list is refused by the agent too.
    assert!(!pol.allows(ip("10.244.4.7"), 22));
    assert!(!pol.allows(ip("10.244.3.7"), 10443));
    // Only when nothing is configured are pod ports open.
    let open = policy_for(&inv(), "e1", &PortPolicy::default());
    assert_eq!(open.pod_ports, None);
    assert!(open.allows(ip("10.244.4.7"), 22));
    // An explicitly empty list allows no pod port at all.
    let none = PortPolicy {
        pod_ports: Some(vec![]),
        ..strict()
    };
    let pol = policy_for(&inv(), "e1", &none);
    assert_eq!(pol.pod_ports, Some(vec![]));
    assert!(!pol.allows(ip("10.244.4.7"), 8080));
}

#[test]
fn custom_kubelet_ports_are_node_ports() {
    let pol = policy_for(&inv(), "e1", &strict());
    assert_eq!(pol.node_ports, vec![10250, 10443]);
    assert_eq!(
        pol.node_addresses,
        vec![ip("10.0.1.2"), ip("10.0.1.3")],
        "addresses once each, in node order"
    );
    assert_eq!(
        pol.pod_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        vec!["10.244.3.0/24", "10.244.4.0/24", "fd00:4::/64"]
    );
    assert!(pol.allows(ip("10.0.1.3"), 10443));
    assert!(!pol.allows(ip("10.0.1.3"), 10255));
    // The resolver agrees: e2 answers on 10443, e1 does not.
    let r = resolve(&inv(), "e2", 10443, &strict()).unwrap();
    assert_eq!((r.ip, r.port, r.kind), (ip("10.0.1.3"), 10443, "node"));
    let e = resolve(&inv(), "e1", 10443, &strict()).unwrap_err();
    assert_eq!(
        e,
        ResolveError::NodePort {
            node: "e1".into(),
            port: 10443,
            allowed: "10250".into()
        }
    );
    // The allowed list names the node's own port, sorted, once.
    let e = resolve(&inv(), "e2", 22, &strict()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "port 22 is not allowed on node e2 (allowed: 10250, 10443)"
    );
    let e = resolve(&inv(), "e1", 22, &PortPolicy::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "port 22 is not allowed on node e1 (allowed: 10250, 10255)"
    );
    // A kubelet port 0 (unknown) is never sent; a configured 0 is dropped too.
    let mut i = inv();
    let mut zero = i.node("e1").unwrap().clone();
    zero.kubelet_port = 0;
    i.apply_node(zero).unwrap();
    let with_zero = PortPolicy {
        node_ports: vec![0, 10250],
        pod_ports: Some(vec![0, 8080]),
    };
    let pol = policy_for(&i, "e1", &with_zero);
    assert_eq!(pol.node_ports, vec![10250, 10443]);
    assert_eq!(pol.pod_ports, Some(vec![8080]));
    // What is sent always encodes.
    let view = petrel_proto::HubView {
        gateways: vec![],
        routes: vec![],
        site_mtu: 1400,
        egress: pol,
        site_mtus: vec![],
        routed_sites: vec![],
        reconnect_spread_ms: 0,
    };
    assert!(
        petrel_proto::control::encode_to_vec(&petrel_proto::ControlMessage::Update(view)).is_ok()
    );
}

#[test]
fn port_caps_are_exact() {
    let i = inv();
    // 62 configured + 10443 = 63 < 64 ... build exactly 64 and 65 distinct ports.
    let ports = |n: u16| PortPolicy {
        node_ports: (20_000..20_000 + n).collect(),
        pod_ports: Some((30_000..30_000 + 70).chain([0]).collect()),
    };
    // 62 + 10250 + 10443 = 64: complete.
    let at = site_policy(&i, "site-a", &ports(62));
    assert_eq!(at.policy.node_ports.len(), MAX_EGRESS_PORTS);
    assert!(at.complete);
    // 63 + 2 = 65: cut to 64, incomplete.
    let past = site_policy(&i, "site-a", &ports(63));
    assert_eq!(past.policy.node_ports.len(), MAX_EGRESS_PORTS);
    assert!(!past.complete);
    // Pod ports: zero dropped, cut to 64 (the pod port cap alone does not make it incomplete).
    let pod = at.policy.pod_ports.unwrap();
    assert_eq!(pod.len(), MAX_EGRESS_PORTS);
    assert!(!pod.contains(&0));
    assert_eq!(pod[0], 30_000);
    assert_eq!(pod[63], 30_063);
}

#[test]
fn pod_cidr_cap_is_exact_and_own_node_comes_first() {
    let mut i = inv();
    let cidrs = |base: u32, n: u32| -> Vec<ipnet::IpNet> {
        (0..n)
            .map(|k| {
                ipnet::IpNet::V4(
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(base + (k << 8)), 24).unwrap(),
                )
            })
            .collect()
    };
    // site-b: one node with 4090 CIDRs and one with 6: exactly 4096.
    i.apply_site(Site {
        name: "site-b".into(),
        kind: SiteKind::Public,
        mtu: None,
    });
    let mut big = node("b1", "site-b", &["10.9.0.1"], &[], 10250);
    big.pod_cidrs = cidrs(0x0b00_0000, 4090);
    i.apply_node(big).unwrap();
    let mut small = node("b2", "site-b", &["10.9.0.2"], &[], 10250);
    small.pod_cidrs = cidrs(0x0c00_0000, 6);
    i.apply_node(small).unwrap();
    let at = site_policy(&i, "site-b", &PortPolicy::default());
    assert!(at.complete);
    assert_eq!(at.policy.pod_cidrs.len(), MAX_EGRESS_TARGETS);
    // One more CIDR on b2: cut, incomplete, and b2's agent gets its own CIDRs first.
    let mut small = i.node("b2").unwrap().clone();
    small.pod_cidrs = cidrs(0x0c00_0000, 7);
    i.apply_node(small).unwrap();
    let past = site_policy(&i, "site-b", &PortPolicy::default());
    assert!(!past.complete);
    assert_eq!(past.policy.pod_cidrs.len(), MAX_EGRESS_TARGETS);
    let b2_last: IpAddr = ip("12.0.6.7");
    assert!(!past.policy.allows(b2_last, 80));
    let own = policy_for(&i, "b2", &PortPolicy::default());
    assert_eq!(own.pod_cidrs.len(), MAX_EGRESS_TARGETS);
    assert!(own.allows(b2_last, 80));
    assert_eq!(own.pod_cidrs[0].to_string(), "12.0.0.0/24");
    assert_eq!(own.node_addresses[0], ip("10.9.0.2"));
    // b1's agent gets the site order (b1 first anyway).
    let b1 = policy_for(&i, "b1", &PortPolicy::default());
    assert_eq!(b1.pod_cidrs[0].to_string(), "11.0.0.0/24");
}

#[test]
fn resolver_paths_and_refusals() {
    let i = inv();
    let p = strict();
    // A trailing dot is the same name; a shared address within one site is not ambiguous.
    let r = resolve(&i, "e1.", 10250, &p).unwrap();
    assert_eq!(
        r,
        Resolved {
            node: "e1".into(),
            site: "site-a".into(),
            ip: ip("10.0.1.2"),
            port: 10250,
            path: Path::Tunnel,
            kind: "node",
        }
    );
    let r = resolve(&i, "10.0.1.2", 10250, &p).unwrap();
    assert_eq!((r.node.as_str(), r.site.as_str()), ("e1", "site-a"));
    // Pod IPs: the policy's pod ports, the owning node, the site's path.
    let r = resolve(&i, "fd00:4::9", 9090, &p).unwrap();
    assert_eq!(
        (r.node.as_str(), r.kind, r.path, r.ip),
        ("e2", "pod", Path::Tunnel, ip("fd00:4::9"))
    );
    let r = resolve(&i, "10.244.1.9", 8080, &p).unwrap();
    assert_eq!((r.node.as_str(), r.path), ("c1", Path::Direct));
    let e = resolve(&i, "10.244.3.9", 22, &p).unwrap_err();
    assert_eq!(
        e,
        ResolveError::PodPort {
            ip: ip("10.244.3.9"),
            node: "e1".into(),
            port: 22,
            allowed: "8080, 9090".into()
        }
    );
    assert_eq!(e.status(), (403, "port_not_allowed"));
    // A node without addresses cannot be dialled by name.
    let e = resolve(&i, "bare", 10250, &p).unwrap_err();
    assert_eq!(e, ResolveError::NoAddress("bare".into()));
    assert_eq!(e.status(), (502, "no_address"));
    let e = resolve(&i, "ghost", 10250, &p).unwrap_err();
    assert_eq!(e, ResolveError::Unknown("ghost".into()));
    assert_eq!(e.status(), (404, "unknown_destination"));
    let e = resolve(&i, "10.99.0.1", 10250, &p).unwrap_err();
    assert_eq!(e, ResolveError::Unknown("10.99.0.1".into()));
    assert_eq!(
        ResolveError::Ambiguous {
            host: "h".into(),
            candidates: "c".into()
        }
        .status(),
        (409, "ambiguous")
    );
    assert_eq!(
        ResolveError::NodePort {
            node: "n".into(),
            port: 1,
            allowed: String::new()
        }
        .status(),
        (403, "port_not_allowed")
    );
    assert_eq!(Path::Tunnel.as_str(), "tunnel");
    assert_eq!(Path::Direct.as_str(), "direct");
    assert_eq!(
        PortPolicy::default(),
        PortPolicy {
            node_ports: vec![10250, 10255],
            pod_ports: None
        }
    );
    let n = i.node("e2").unwrap();
    assert!(p.node_port_allowed(n, 10443));
    assert!(p.node_port_allowed(n, 10250));
    assert!(!p.node_port_allowed(n, 10255));
    assert!(p.pod_port_allowed(8080));
    assert!(!p.pod_port_allowed(8081));
    assert!(PortPolicy::default().pod_port_allowed(1));
}
