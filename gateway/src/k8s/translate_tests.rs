//! Translation details a mutation run showed untested: an empty `podCIDRs` falls back to
//! `podCIDR`, an empty or `null` flannel backend-data annotation means "no VTEP yet", and the
//! index reports the label keys it was built with.

#![allow(clippy::unwrap_used)]

use super::*;
use serde_json::json;

fn node(v: serde_json::Value) -> KubeNode {
    serde_json::from_value(v).unwrap()
}

#[test]
fn empty_pod_cidrs_fall_back_to_pod_cidr() {
    let keys = LabelKeys::default();
    let n = node(json!({
        "metadata": {"name": "c1"},
        "spec": {"podCIDR": "10.9.0.0/24", "podCIDRs": []}
    }));
    let t = translate(&n, &keys).unwrap();
    assert_eq!(
        t.node.pod_cidrs,
        vec!["10.9.0.0/24".parse::<IpNet>().unwrap()]
    );
    // podCIDRs wins when it has entries (dual stack).
    let n = node(json!({
        "metadata": {"name": "c1"},
        "spec": {"podCIDR": "10.9.0.0/24", "podCIDRs": ["10.9.0.0/24", "fd00:9::/64"]}
    }));
    assert_eq!(translate(&n, &keys).unwrap().node.pod_cidrs.len(), 2);
    // Neither: no pod CIDR.
    let n = node(json!({"metadata": {"name": "c1"}, "spec": {}}));
    assert!(translate(&n, &keys).unwrap().node.pod_cidrs.is_empty());
}

#[test]
fn empty_or_null_backend_data_is_no_vtep_yet() {
    let keys = LabelKeys::default();
    for raw in ["", "  ", "null", " null ", "{}", "{\"VtepMAC\":null}"] {
        let n = node(json!({
            "metadata": {"name": "c1", "annotations": {"flannel.alpha.coreos.com/backend-data": raw}}
        }));
        let t = translate(&n, &keys).unwrap();
        assert_eq!(t.node.vtep_mac, None, "{raw:?}");
    }
    let n = node(json!({
        "metadata": {"name": "c1", "annotations": {"flannel.alpha.coreos.com/backend-data": "{\"VtepMAC\":7}"}}
    }));
    assert!(matches!(
        translate(&n, &keys),
        Err(TranslateError::BadBackendData { .. })
    ));
}

#[test]
fn index_keeps_its_keys() {
    let custom = LabelKeys {
        edge: vec!["example.com/edge".into()],
        nodepool: vec!["example.com/pool".into()],
        site_network: "example.com/net".into(),
        gateway: "example.com/gw".into(),
        cloud_site: "vpc".into(),
    };
    let idx = ClusterIndex::new(custom.clone());
    assert_eq!(idx.keys(), &custom);
    assert_ne!(idx.keys(), &LabelKeys::default());
}

#[test]
fn index_reports_tunnel_states_and_public_addresses() {
    let prefix = keys::TUNNEL_PREFIX;
    let mut idx = ClusterIndex::new(LabelKeys::default());
    idx.reset(&[
        node(json!({
            "metadata": {"name": "e1",
                         "labels": {"openyurt.io/is-edge-worker": "true"},
                         "annotations": {format!("{prefix}hub-1"): "connected", "other": "x"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.2"},
                                     {"type": "ExternalIP", "address": "203.0.113.2"}]}
        })),
        node(json!({
            "metadata": {"name": "c1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.11"}]}
        })),
        // Malformed: neither its states nor its addresses are reported.
        node(json!({
            "metadata": {"name": "bad", "annotations": {format!("{prefix}hub-1"): "connected"}},
            "spec": {"podCIDR": "junk"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.99"}]}
        })),
    ]);
    assert!(matches!(idx.translated("e1"), Some(Ok(t)) if t.edge));
    assert!(matches!(
        idx.translated("bad"),
        Some(Err(TranslateError::BadPodCidr { .. }))
    ));
    assert!(idx.translated("ghost").is_none());
    let states = idx.tunnel_states();
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(
        states["e1"],
        BTreeMap::from([(format!("{prefix}hub-1"), "connected".to_string())])
    );
    let addrs = idx.public_addresses();
    assert_eq!(
        addrs,
        BTreeMap::from([
            (
                "c1".to_string(),
                vec!["192.168.0.11".parse::<IpAddr>().unwrap()]
            ),
            (
                "e1".to_string(),
                vec![
                    "203.0.113.2".parse::<IpAddr>().unwrap(),
                    "10.0.1.2".parse().unwrap()
                ]
            ),
        ])
    );
}
