//! No site black-holed by MTU (issue 11, point 8), in the network-namespace lab: site B's NAT
//! router reaches the internet over a 1,400-byte link, so its tunnel fits smaller packets than
//! site A's and the cloud's. Before, TCP from site A to site B stalled (the hub dropped the
//! larger frames as `oversize` and told nobody). Now the hub answers with ICMP frag-needed into
//! the sender's tunnel (or to the sender's VTEP), the sending pod's kernel lowers its path MTU,
//! and 10 MiB cross both ways; a second round needs no more drops. With learning on (the
//! default), the hub learns site B's MTU from its tunnel's path and tells every agent, so a
//! node that never talked to B sends nothing the hub must drop; a declared MTU overrides it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use petrel_e2e::lab::{self, Lab, LabSpec, PingOpts};
use petrel_e2e::lab_petrel::PetrelLab;

const SMALL_LINK: &str = "1400";

/// Narrows site B's WAN link (both ends of the router's WAN veth).
fn narrow_site_b(lab: &Lab) {
    let rt = lab.router("site-b").unwrap();
    let rt_ns = lab.ns(&rt.name).unwrap();
    lab.exec(&rt_ns, &["ip", "link", "set", "wan0", "mtu", SMALL_LINK])
        .unwrap();
    // The switch side of the same veth pair (`p-<router>` in the WAN namespace).
    let wan = lab.wan_ns().to_string();
    let port = format!("p-{}", rt.name);
    lab.exec(&wan, &["ip", "link", "set", &port, "mtu", SMALL_LINK])
        .unwrap();
}

fn transfers_both_ways(lab: &Lab, pairs: &[(&str, &str)]) {
    for (a, b) in pairs {
        for (from, to) in [(a, b), (b, a)] {
            let r = lab
                .tcp_transfer(from, to, 10 << 20)
                .unwrap_or_else(|e| panic!("10 MiB {from} -> {to}: {e:#}"));
            eprintln!("{from} -> {to}: {:.0} Mbit/s", r.mbit_per_s());
        }
    }
}

#[test]
fn a_site_behind_a_smaller_wan_link_is_reachable_both_ways() {
    lab::require_root().unwrap();
    Lab::cleanup_stale().unwrap();
    let lab = Lab::build(LabSpec::default()).unwrap();
    narrow_site_b(&lab);
    let tmp = tempfile::tempdir().unwrap();
    let mut petrel = PetrelLab::start(&lab, "auto", tmp.path()).unwrap();
    let b1 = lab.node("edge-b1").pod_ip;
    lab.wait_reachable("edge-a2", b1, Duration::from_secs(20))
        .unwrap();

    // Learned: the hub reads B's tunnel path (its side of the QUIC path MTU discovery) and
    // announces B's MTU; edge-a2, which never talked to B, routes B at it and the hub drops
    // nothing of its 10 MiB.
    let mut learned = 0;
    lab::wait_until(
        "the hub learns site B's MTU",
        Duration::from_secs(60),
        || {
            let st = petrel.hub_status()?;
            let b = &st["site_mtus"]["site-b"];
            if b["source"] == "learned" {
                learned = b["mtu"].as_u64().unwrap_or(0);
                return Ok(true);
            }
            Ok(false)
        },
    )
    .unwrap();
    eprintln!("site B's learned MTU: {learned}");
    // A 1,400-byte link fits at most 1,372 bytes of UDP: less than the 1,380 the others fit,
    // more than quinn's 1,200-byte start.
    assert!(
        (1177..1350).contains(&learned),
        "learned MTU {learned} for a 1400-byte link"
    );
    let st = petrel.hub_status().unwrap();
    assert!(
        st["site_mtus"].get("site-a").is_none(),
        "site A's path is not smaller: {}",
        st["site_mtus"]
    );
    let b_cidr = lab.node("edge-b1").pod_cidr.to_string();
    let a2_ns = lab.ns("edge-a2").unwrap();
    let routed_at = |mtu: u64| {
        let want = format!("mtu lock {mtu}");
        lab::wait_until(
            &format!("edge-a2 routes site B at {mtu}"),
            Duration::from_secs(15),
            || {
                Ok(lab
                    .exec(&a2_ns, &["ip", "route", "show", "table", "all", &b_cidr])?
                    .stdout
                    .contains(&want))
            },
        )
        .unwrap();
    };
    routed_at(learned);
    let before = petrel.hub_drops("oversize");
    transfers_both_ways(&lab, &[("edge-a2", "edge-b1")]);
    assert_eq!(
        petrel.hub_drops("oversize"),
        before,
        "learned MTU: no drops"
    );

    // Declared: site B's MTU in the inventory file (the hub re-reads it) overrides the learned
    // one, here with a smaller value than the path fits.
    let declared_mtu = learned - 16;
    let inv_path = petrel.dir.join("inventory.toml");
    let inv = std::fs::read_to_string(&inv_path).unwrap();
    let declared = inv.replacen(
        "name = \"site-b\"\nkind = \"public\"",
        &format!("name = \"site-b\"\nkind = \"public\"\nmtu = {declared_mtu}"),
        1,
    );
    assert_ne!(inv, declared, "site-b not found in the lab inventory");
    std::fs::write(&inv_path, declared).unwrap();
    routed_at(declared_mtu);
    let st = petrel.hub_status().unwrap();
    assert_eq!(st["site_mtus"]["site-b"]["source"], "declared");
    assert_eq!(st["site_mtus"]["site-b"]["mtu"], declared_mtu);
    assert_eq!(st["site_mtus"]["site-b"]["path_mtu"], learned);
    let before = petrel.hub_drops("oversize");
    transfers_both_ways(&lab, &[("edge-a2", "edge-b1")]);
    assert_eq!(
        petrel.hub_drops("oversize"),
        before,
        "declared MTU: no drops"
    );

    // Neither learned nor declared: what the hub does for a site nobody told it about. Nodes
    // that never talked to B (edge-a1, cloud-1) send at the full 1380.
    std::fs::write(&inv_path, &inv).unwrap();
    petrel
        .restart_with(&["--learn-site-mtus", "false"], &[])
        .unwrap();
    lab.wait_reachable("edge-a1", b1, Duration::from_secs(20))
        .unwrap();
    lab.wait_reachable("cloud-1", b1, Duration::from_secs(20))
        .unwrap();
    assert!(
        petrel.hub_status().unwrap()["site_mtus"]
            .get("site-b")
            .is_none(),
        "nothing declared, nothing learned"
    );

    // A DF ping larger than site B's tunnel gets frag-needed (from the hub, on B's behalf), and
    // one that fits goes through.
    let big = lab
        .ping_with(
            "edge-a1",
            b1,
            &PingOpts {
                count: 3,
                interval: Duration::from_millis(300),
                reply_timeout: Duration::from_secs(2),
                payload: Some(1340),
                dont_fragment: true,
            },
        )
        .unwrap();
    assert!(
        big.output.contains("Frag needed") || big.output.contains("too long"),
        "a DF ping over B's MTU must learn it: {}",
        big.output
    );

    let before = petrel.hub_drops("oversize");
    transfers_both_ways(&lab, &[("edge-a1", "edge-b1"), ("cloud-1", "edge-b1")]);
    let oversize_after_first = petrel.hub_drops("oversize");
    eprintln!(
        "hub oversize drops in the first round: {}",
        oversize_after_first - before
    );
    // Senders learned the path MTU: the second round drops nothing more.
    transfers_both_ways(&lab, &[("edge-a1", "edge-b1"), ("cloud-1", "edge-b1")]);
    assert_eq!(petrel.hub_drops("oversize"), oversize_after_first);
    petrel.stop().unwrap();
    lab.teardown().unwrap();
}
