//! Inventory rules a mutation run showed untested: overlapping pod CIDRs in either direction
//! (a /16 over another node's /24 and the reverse), the generation bump of every change
//! including `reset` and `delete_site`, node-name labels, routability and the lookups.

#![allow(clippy::unwrap_used)]

use super::*;

fn site(name: &str, kind: SiteKind) -> Site {
    Site {
        name: name.into(),
        kind,
        mtu: None,
    }
}

fn node(name: &str, site: &str, cidrs: &[&str]) -> Node {
    Node {
        name: name.into(),
        site: site.into(),
        addresses: vec![],
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        vtep_mac: None,
        public_ip: None,
        kubelet_port: 10250,
        gateway: false,
    }
}

fn two_sites() -> Inventory {
    let mut inv = Inventory::default();
    inv.reset(
        vec![site("a", SiteKind::Public), site("c", SiteKind::Cloud)],
        vec![],
    )
    .unwrap();
    inv
}

#[test]
fn a_wider_cidr_over_a_narrower_one_is_refused_in_both_orders() {
    // The /16 arrives second and covers the first node's /24.
    let mut inv = two_sites();
    inv.apply_node(node("n1", "a", &["10.244.3.0/24"])).unwrap();
    let gen = inv.generation();
    let err = inv
        .apply_node(node("n2", "a", &["10.244.0.0/16"]))
        .unwrap_err();
    assert_eq!(
        err,
        InventoryError::OverlappingPodCidr {
            node: "n2".into(),
            cidr: "10.244.0.0/16".parse().unwrap(),
            other: "n1".into(),
            other_cidr: "10.244.3.0/24".parse().unwrap(),
        }
    );
    assert_eq!(inv.generation(), gen);
    assert!(inv.node("n2").is_none());
    // The /24 arrives second, inside the first node's /16.
    let mut inv = two_sites();
    inv.apply_node(node("n1", "a", &["10.244.0.0/16"])).unwrap();
    assert!(matches!(
        inv.apply_node(node("n2", "c", &["10.244.3.0/24"])),
        Err(InventoryError::OverlappingPodCidr { .. })
    ));
    // IPv6 too, and an overlap in the second CIDR of a node.
    let mut inv = two_sites();
    inv.apply_node(node("n1", "a", &["fd00:1::/64"])).unwrap();
    assert!(inv
        .apply_node(node("n2", "a", &["10.1.0.0/16", "fd00::/16"]))
        .is_err());
    // Adjacent and disjoint ranges are fine; a node may replace its own CIDR with a wider one.
    let mut inv = two_sites();
    inv.apply_node(node("n1", "a", &["10.244.3.0/24"])).unwrap();
    inv.apply_node(node("n2", "a", &["10.244.4.0/24"])).unwrap();
    inv.apply_node(node("n3", "a", &["10.245.0.0/16", "fd00:2::/64"]))
        .unwrap();
    inv.apply_node(node("n1", "a", &["10.244.0.0/23"])).unwrap();
    assert_eq!(
        inv.node("n1").unwrap().pod_cidrs,
        vec!["10.244.0.0/23".parse::<IpNet>().unwrap()]
    );
    // Through reset as well: nothing changes on error.
    let gen = inv.generation();
    let err = inv.reset(
        vec![site("a", SiteKind::Public)],
        vec![
            node("x", "a", &["10.0.0.0/24"]),
            node("y", "a", &["10.0.0.0/8"]),
        ],
    );
    assert!(matches!(
        err,
        Err(InventoryError::OverlappingPodCidr { .. })
    ));
    assert_eq!(inv.generation(), gen);
    assert!(inv.node("n1").is_some());
}

#[test]
fn duplicate_vtep_macs_are_refused_but_none_is_not_a_duplicate() {
    let mut inv = two_sites();
    let mut a = node("n1", "a", &[]);
    a.vtep_mac = Some(MacAddr([2, 0, 0, 0, 0, 1]));
    inv.apply_node(a.clone()).unwrap();
    let mut b = node("n2", "a", &[]);
    b.vtep_mac = a.vtep_mac;
    assert_eq!(
        inv.apply_node(b),
        Err(InventoryError::Duplicate {
            what: "VtepMAC",
            value: "02:00:00:00:00:01".into()
        })
    );
    // Two nodes without a VTEP are no clash; the same node may keep its MAC.
    inv.apply_node(node("n3", "a", &[])).unwrap();
    inv.apply_node(node("n4", "a", &[])).unwrap();
    inv.apply_node(a).unwrap();
}

#[test]
fn every_change_bumps_the_generation() {
    let mut inv = Inventory::default();
    assert_eq!(inv.generation(), 0);
    inv.reset(vec![site("a", SiteKind::Public)], vec![])
        .unwrap();
    let g1 = inv.generation();
    assert!(g1 > 0);
    // A relist with identical content is still a new generation (the index swaps on change).
    inv.reset(vec![site("a", SiteKind::Public)], vec![])
        .unwrap();
    let g2 = inv.generation();
    assert!(g2 > g1, "{g2} > {g1}");
    // A relist with nodes ends strictly above the previous generation.
    inv.reset(
        vec![site("a", SiteKind::Public)],
        vec![node("n1", "a", &[]), node("n2", "a", &[])],
    )
    .unwrap();
    let g3 = inv.generation();
    assert!(g3 > g2);
    inv.apply_site(site("b", SiteKind::Cloud));
    let g4 = inv.generation();
    assert!(g4 > g3);
    assert_eq!(
        inv.delete_site("b").unwrap(),
        Some(site("b", SiteKind::Cloud))
    );
    let g5 = inv.generation();
    assert!(g5 > g4);
    // Deleting an absent site still reports a change attempt consistently.
    assert_eq!(inv.delete_site("b").unwrap(), None);
    assert!(inv.generation() >= g5);
    let g6 = inv.generation();
    inv.apply_node(node("n3", "a", &[])).unwrap();
    let g7 = inv.generation();
    assert!(g7 > g6);
    assert!(inv.delete_node("n3").is_some());
    assert!(inv.generation() > g7);
    // A refused change leaves it alone.
    let g8 = inv.generation();
    assert!(inv.delete_site("a").is_err());
    assert!(inv.apply_node(node("n9", "zz", &[])).is_err());
    assert_eq!(inv.generation(), g8);
    // A failed reset too.
    assert!(inv
        .reset(
            vec![site("a", SiteKind::Public), site("a", SiteKind::Cloud)],
            vec![]
        )
        .is_err());
    assert_eq!(inv.generation(), g8);
    assert!(inv
        .reset(
            vec![site("a", SiteKind::Public)],
            vec![node("n1", "a", &[]), node("n1", "a", &[])]
        )
        .is_err());
    assert_eq!(inv.generation(), g8);
}

#[test]
fn site_in_use_only_while_it_has_nodes() {
    let mut inv = two_sites();
    inv.apply_node(node("n1", "a", &[])).unwrap();
    assert_eq!(
        inv.delete_site("a"),
        Err(InventoryError::SiteInUse("a".into()))
    );
    // Moving the node away empties the site.
    inv.apply_node(node("n1", "c", &[])).unwrap();
    assert_eq!(inv.site_nodes("a").count(), 0);
    assert_eq!(
        inv.site_nodes("c")
            .map(|n| n.name.clone())
            .collect::<Vec<_>>(),
        vec!["n1".to_string()]
    );
    assert_eq!(
        inv.delete_site("a").unwrap(),
        Some(site("a", SiteKind::Public))
    );
    assert!(inv.site("a").is_none());
    assert_eq!(inv.site("c"), Some(&site("c", SiteKind::Cloud)));
}

#[test]
fn node_names_follow_dns_1123_with_63_byte_labels() {
    let l63 = "a".repeat(63);
    let ok = [
        "a".to_string(),
        "0".to_string(),
        "edge-a1".to_string(),
        "a.b-c.d".to_string(),
        l63.clone(),
        format!("{l63}.{l63}.{l63}.{}", "b".repeat(61)),
    ];
    for n in &ok {
        assert!(valid_node_name(n), "{n}");
    }
    assert_eq!(ok[5].len(), 253);
    let bad = [
        String::new(),
        "a".repeat(64),
        format!("{l63}.{l63}.{l63}.{}", "b".repeat(62)),
        "-a".into(),
        "a-".into(),
        "a.-b".into(),
        "a..b".into(),
        ".a".into(),
        "a.".into(),
        "A".into(),
        "a_b".into(),
        "a b".into(),
    ];
    for n in &bad {
        assert!(!valid_node_name(n), "{n:?}");
    }
    let mut inv = two_sites();
    assert_eq!(
        inv.apply_node(node(&"a".repeat(64), "a", &[])),
        Err(InventoryError::BadNodeName("a".repeat(64)))
    );
}

#[test]
fn routes_need_a_cidr_a_vtep_and_an_underlay() {
    let mut inv = two_sites();
    inv.apply_site(site("b", SiteKind::Public));
    let full = |name: &str, site: &str, cidr: &str, mac: u8| {
        let mut n = node(name, site, &[cidr]);
        n.vtep_mac = Some(MacAddr([2, 0, 0, 0, 0, mac]));
        n.addresses = vec![format!("192.0.2.{mac}").parse().unwrap()];
        n
    };
    inv.apply_node(full("me", "a", "10.1.0.0/24", 1)).unwrap();
    inv.apply_node(full("peer", "a", "10.2.0.0/24", 2)).unwrap();
    let mut far = full("far", "b", "10.3.0.0/24", 3);
    far.public_ip = Some("203.0.113.3".parse().unwrap());
    far.pod_cidrs.push("fd00:3::/64".parse().unwrap());
    inv.apply_node(far).unwrap();
    let mut no_cidr = full("nocidr", "b", "10.4.0.0/24", 4);
    no_cidr.pod_cidrs.clear();
    inv.apply_node(no_cidr).unwrap();
    let mut no_mac = full("nomac", "b", "10.5.0.0/24", 5);
    no_mac.vtep_mac = None;
    inv.apply_node(no_mac).unwrap();
    let mut no_addr = full("noaddr", "b", "10.6.0.0/24", 6);
    no_addr.addresses.clear();
    inv.apply_node(no_addr).unwrap();

    let routes = inv.routes_for("me");
    let got: Vec<(String, String, petrel_proto::RoutePath, String)> = routes
        .iter()
        .map(|r| {
            (
                r.node_name.clone(),
                r.pod_cidr.to_string(),
                r.path,
                r.underlay.to_string(),
            )
        })
        .collect();
    use petrel_proto::RoutePath::{Direct, ViaHub};
    assert_eq!(
        got,
        vec![
            (
                "far".into(),
                "10.3.0.0/24".into(),
                ViaHub,
                "203.0.113.3".into()
            ),
            (
                "far".into(),
                "fd00:3::/64".into(),
                ViaHub,
                "203.0.113.3".into()
            ),
            (
                "peer".into(),
                "10.2.0.0/24".into(),
                Direct,
                "192.0.2.2".into()
            ),
        ]
    );
    assert_eq!(routes[2].vtep_mac, MacAddr([2, 0, 0, 0, 0, 2]));
    assert_eq!(routes[2].site, "a");
    assert!(inv.routes_for("ghost").is_empty());
    // The cluster table for route sync: every routable node, the asking one included.
    let table: Vec<(String, Vec<String>, String)> = inv
        .route_entries()
        .into_iter()
        .map(|e| {
            (
                e.node_name,
                e.pod_cidrs.iter().map(|c| c.to_string()).collect(),
                e.underlay.to_string(),
            )
        })
        .collect();
    assert_eq!(
        table,
        vec![
            (
                "far".to_string(),
                vec!["10.3.0.0/24".to_string(), "fd00:3::/64".to_string()],
                "203.0.113.3".to_string()
            ),
            (
                "me".to_string(),
                vec!["10.1.0.0/24".to_string()],
                "192.0.2.1".to_string()
            ),
            (
                "peer".to_string(),
                vec!["10.2.0.0/24".to_string()],
                "192.0.2.2".to_string()
            ),
        ]
    );
}

#[test]
fn lookups_and_admission() {
    let mut inv = two_sites();
    let mut n1 = node("n1", "a", &["10.1.0.0/24"]);
    n1.addresses = vec!["192.0.2.1".parse().unwrap()];
    n1.vtep_mac = Some(MacAddr([2, 0, 0, 0, 0, 1]));
    inv.apply_node(n1).unwrap();
    let mut n2 = node("n2", "c", &["10.2.0.0/24"]);
    n2.addresses = vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()];
    n2.gateway = true;
    inv.apply_node(n2).unwrap();
    let names = |v: Vec<&Node>| v.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(inv.nodes_by_address("192.0.2.1".parse().unwrap())),
        vec!["n1", "n2"]
    );
    assert_eq!(
        names(inv.nodes_by_address("192.0.2.2".parse().unwrap())),
        vec!["n2"]
    );
    assert!(inv
        .nodes_by_address("192.0.2.3".parse().unwrap())
        .is_empty());
    assert_eq!(
        inv.node_by_pod_ip("10.2.0.255".parse().unwrap())
            .unwrap()
            .name,
        "n2"
    );
    assert!(inv.node_by_pod_ip("10.3.0.1".parse().unwrap()).is_none());
    assert_eq!(
        inv.node_by_vtep_mac(MacAddr([2, 0, 0, 0, 0, 1]))
            .unwrap()
            .name,
        "n1"
    );
    assert!(inv.node_by_vtep_mac(MacAddr([2, 0, 0, 0, 0, 9])).is_none());
    assert_eq!(
        inv.gateways().map(|n| n.name.clone()).collect::<Vec<_>>(),
        vec!["n2"]
    );
    let (node, site) = inv.admit_agent("n1").unwrap();
    assert_eq!((node.name.as_str(), site.name.as_str()), ("n1", "a"));
    assert_eq!(
        inv.admit_agent("n2"),
        Err(AdmissionError::NotPublicSite {
            node: "n2".into(),
            site: "c".into(),
            kind: "cloud"
        })
    );
    assert_eq!(
        inv.site_kind_of(inv.node("n1").unwrap()),
        Some(SiteKind::Public)
    );
    assert_eq!(SiteKind::Cloud.as_str(), "cloud");
    assert_eq!(SiteKind::Public.as_str(), "public");
    assert_eq!(SiteKind::ExpressConnect.as_str(), "express-connect");
    assert_eq!(inv.sites().count(), 2);
    let file = inv.to_file();
    assert_eq!(file.sites.len(), 2);
    assert_eq!(file.nodes.len(), 2);
}

#[test]
fn file_defaults_and_mac_syntax() {
    let text = "[[sites]]\nname='a'\nkind='express-connect'\n[[nodes]]\nname='n'\nsite='a'\nvtep_mac='02:FA:00:00:00:0a'\n";
    let inv = Inventory::from_toml(text, "t").unwrap();
    let n = inv.node("n").unwrap();
    assert_eq!(n.kubelet_port, 10250);
    assert_eq!(n.vtep_mac, Some(MacAddr([2, 0xfa, 0, 0, 0, 10])));
    assert!(!n.gateway);
    assert_eq!(inv.site("a").unwrap().kind, SiteKind::ExpressConnect);
    let shown = toml::to_string(&inv.to_file()).unwrap();
    assert!(
        shown.contains("vtep_mac = \"02:fa:00:00:00:0a\""),
        "{shown}"
    );
    let again = Inventory::from_toml(&shown, "again").unwrap();
    assert_eq!(again.node("n"), inv.node("n"));
    let err = Inventory::from_toml(
        "[[sites]]\nname='a'\nkind='public'\n[[nodes]]\nname='n'\nsite='a'\nvtep_mac='02:fa'\n",
        "t",
    )
    .unwrap_err();
    assert!(err.to_string().contains("invalid MAC address"), "{err}");
}

#[test]
fn a_node_may_widen_its_own_cidr_but_not_overlap_itself() {
    // Replacing its own /24 with the /16 around it is not an overlap with itself.
    let mut inv = two_sites();
    inv.apply_node(node("n1", "a", &["10.244.3.0/24"])).unwrap();
    inv.apply_node(node("n1", "a", &["10.244.0.0/16"])).unwrap();
    assert_eq!(
        inv.node("n1").unwrap().pod_cidrs,
        vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
    );
    // And back to a narrower one inside it.
    inv.apply_node(node("n1", "a", &["10.244.7.0/24"])).unwrap();
    // Another node still cannot take the old range.
    inv.apply_node(node("n2", "a", &["10.244.0.0/24"])).unwrap();
    assert!(inv.apply_node(node("n3", "a", &["10.244.0.0/16"])).is_err());
    // A node's own CIDRs must not overlap each other, in either order.
    for cidrs in [
        ["10.9.0.0/16", "10.9.1.0/24"],
        ["10.9.1.0/24", "10.9.0.0/16"],
        ["fd00::/48", "fd00:0:0:1::/64"],
    ] {
        let err = inv.apply_node(node("n4", "a", &cidrs)).unwrap_err();
        assert!(
            matches!(
                &err,
                InventoryError::OverlappingPodCidr { node, other, .. } if node == "n4" && other == "n4"
            ),
            "{err:?}"
        );
    }
    inv.apply_node(node("n4", "a", &["10.9.0.0/24", "10.9.1.0/24"]))
        .unwrap();
}
