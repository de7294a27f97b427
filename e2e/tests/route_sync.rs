//! A cluster of 10,000 Flannel nodes (issue 11, point 3) with the real hub and agent on
//! loopback: every agent connects (a view listing every node used to exceed the 64 KiB frame cap
//! at about 1,750 nodes, and then no agent could connect), the Welcome stays small, the route
//! table arrives in bounded chunks, an agent that holds the current table is sent nothing but its
//! digest, and an inventory change costs each agent the bytes of what changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use petrel_e2e::apiserver::{loopback_inventory, metric, start_agent, start_hub, within};
use petrel_e2e::raw_agent::{hello, hub_ca, node_identity, session_with_hello, RawSession};
use petrel_proto::{ControlMessage, Hello, RouteSync, RouteTable};

const BIG: u32 = 10_000;

/// The lab's loopback inventory plus `BIG` edge nodes of a public site, each with a VtepMAC and a
/// public IP (so every one is routable). `moved` gives node 0 another public IP.
fn big_inventory(moved: bool) -> String {
    let mut inv = loopback_inventory(&[]);
    inv.push_str("\n[[sites]]\nname = \"site-big\"\nkind = \"public\"\n");
    for i in 0..BIG {
        let (hi, lo) = ((i >> 8) as u8, i as u8);
        let public = if moved && i == 0 {
            "198.51.100.200".to_string()
        } else {
            format!("100.64.{hi}.{lo}")
        };
        inv.push_str(&format!(
            "\n[[nodes]]\nname = \"big-{i:05}\"\nsite = \"site-big\"\naddresses = [\"100.64.{hi}.{lo}\"]\n\
             pod_cidrs = [\"10.{}.{}.0/24\"]\nvtep_mac = \"02:bb:00:{:02x}:{:02x}:01\"\npublic_ip = \"{public}\"\n",
            100 + (i >> 8),
            lo,
            hi,
            lo
        ));
    }
    inv
}

/// Reads route chunks until one carries a digest; returns them.
async fn read_batch(s: &mut RawSession) -> Vec<RouteSync> {
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), s.reader.next())
            .await
            .expect("route chunks in time")
            .unwrap()
            .unwrap();
        match m {
            ControlMessage::Routes(r) => {
                let last = r.digest.is_some();
                out.push(r);
                if last {
                    return out;
                }
            }
            ControlMessage::Ping(_) | ControlMessage::Pong(_) | ControlMessage::Update(_) => {}
            other => panic!("unexpected {}", other.name()),
        }
    }
}

fn wire_len(chunks: &[RouteSync]) -> usize {
    chunks
        .iter()
        .map(|c| {
            petrel_proto::control::encode_to_vec(&ControlMessage::Routes(c.clone()))
                .unwrap()
                .len()
        })
        .sum()
}

#[test]
fn ten_thousand_nodes_connect_and_a_change_costs_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = start_hub(tmp.path(), &big_inventory(false), &[]).unwrap();
    // A real agent connects and syncs the whole table.
    let _agent = start_agent(&hub, "edge-a1", tmp.path()).unwrap();
    within(Duration::from_secs(20), "snapshot sent", || {
        metric(
            &hub.metrics().unwrap(),
            "petrel_hub_route_sync_batches_total{outcome=\"snapshot\"}",
        ) >= 1.0
    })
    .unwrap();
    let m = hub.metrics().unwrap();
    assert_eq!(metric(&m, "petrel_hub_route_table_entries"), f64::from(BIG));
    let snapshot_bytes = metric(
        &m,
        "petrel_hub_route_sync_bytes_total{outcome=\"snapshot\"}",
    );
    eprintln!("snapshot of {BIG} nodes: {snapshot_bytes} bytes");

    // A raw session as edge-a2 sees the same: small welcome, bounded chunks, the whole table.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = hub_ca(&hub).unwrap();
    let (cert, key) = node_identity(&ca, "edge-a2").unwrap();
    let ca_der = ca.cert_der().to_vec();
    let server = hub.server();
    let empty = RouteTable::new().digest();
    let with_digest = |d: u64| Hello {
        routes_digest: Some(d),
        ..hello("edge-a2")
    };
    let (table, welcome_len, chunks) = rt.block_on(async {
        let mut s = session_with_hello(&server, &ca_der, &cert, &key, with_digest(empty))
            .await
            .unwrap();
        let ControlMessage::Welcome(w) = &s.first else {
            panic!("{:?}", s.first)
        };
        assert!(
            w.view.routes.is_empty(),
            "a route-sync agent's view lists no routes"
        );
        let welcome_len = petrel_proto::control::encode_to_vec(&s.first)
            .unwrap()
            .len();
        let batch = read_batch(&mut s).await;
        let mut t = RouteTable::new();
        for c in &batch {
            t.apply(c);
        }
        s.conn.close(0u32.into(), b"done");
        (t, welcome_len, batch)
    });
    eprintln!(
        "welcome {welcome_len} bytes; snapshot {} chunks, {} bytes",
        chunks.len(),
        wire_len(&chunks)
    );
    assert!(welcome_len < 2048, "welcome of {welcome_len} bytes");
    assert_eq!(table.len(), BIG as usize);
    assert_eq!(chunks.last().unwrap().digest, Some(table.digest()));
    assert!(chunks.len() > 1 && chunks[0].reset);
    // Routes the agent derives: every other node via the hub (its site has no routable nodes).
    assert_eq!(table.routes_for("edge-a2", "site-a").len(), BIG as usize);

    // Reconnecting with the current table costs one chunk with the digest and no entries.
    let held = table.digest();
    let (current, mut s) = rt.block_on(async {
        let mut s = session_with_hello(&server, &ca_der, &cert, &key, with_digest(held))
            .await
            .unwrap();
        (read_batch(&mut s).await, s)
    });
    assert_eq!(current.len(), 1);
    assert!(current[0].upserts.is_empty() && current[0].removals.is_empty());

    // One node changes its public IP in the inventory file: the hub picks the file up and every
    // agent gets that node's entry, not the table.
    let before_delta = metric(
        &hub.metrics().unwrap(),
        "petrel_hub_route_sync_bytes_total{outcome=\"delta\"}",
    );
    std::fs::write(tmp.path().join("inventory.toml"), big_inventory(true)).unwrap();
    let delta = rt.block_on(read_batch(&mut s));
    let delta_bytes = wire_len(&delta);
    eprintln!("a one-node change: {delta_bytes} bytes per agent");
    assert_eq!(delta.len(), 1);
    assert_eq!(delta[0].upserts.len(), 1);
    assert_eq!(delta[0].upserts[0].node_name, "big-00000");
    assert_eq!(delta[0].upserts[0].underlay.to_string(), "198.51.100.200");
    assert!(delta_bytes < 200, "{delta_bytes} bytes");
    let mut t = table;
    for c in &delta {
        t.apply(c);
    }
    assert_eq!(Some(t.digest()), delta[0].digest);
    // The real agent got the same delta (both sessions: twice the bytes of one).
    within(Duration::from_secs(5), "real agent's delta", || {
        metric(
            &hub.metrics().unwrap(),
            "petrel_hub_route_sync_bytes_total{outcome=\"delta\"}",
        ) >= before_delta + 2.0 * delta_bytes as f64
    })
    .unwrap();
    assert!(
        hub.agent("edge-a1").is_some(),
        "the real agent stayed connected"
    );
    drop(s);
}
