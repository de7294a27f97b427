//! No site black-holed by MTU (issue 11, point 8), in the network-namespace lab: site B's NAT
//! router reaches the internet over a 1,400-byte link, so its tunnel fits smaller packets than
//! site A's and the cloud's. Before, TCP from site A to site B stalled (the hub dropped the
//! larger frames as `oversize` and told nobody). Now the hub answers with ICMP frag-needed into
//! the sender's tunnel (or to the sender's VTEP), the sending pod's kernel lowers its path MTU,
//! and 10 MiB cross both ways; a second round needs no more drops. With the site's MTU declared
//! in the inventory, nothing is dropped at all.

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
    let petrel = PetrelLab::start(&lab, "auto", tmp.path()).unwrap();
    let b1 = lab.node("edge-b1").pod_ip;
    lab.wait_reachable("edge-a1", b1, Duration::from_secs(20))
        .unwrap();
    lab.wait_reachable("cloud-1", b1, Duration::from_secs(20))
        .unwrap();

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

    transfers_both_ways(&lab, &[("edge-a1", "edge-b1"), ("cloud-1", "edge-b1")]);
    let oversize_after_first = petrel.hub_drops("oversize");
    eprintln!("hub oversize drops after the first round: {oversize_after_first}");
    // Senders learned the path MTU: the second round drops nothing more.
    transfers_both_ways(&lab, &[("edge-a1", "edge-b1"), ("cloud-1", "edge-b1")]);
    assert_eq!(petrel.hub_drops("oversize"), oversize_after_first);

    // Declared: site B's MTU in the inventory file (the hub re-reads it). Agents now route site
    // B at that MTU, so a node that never talked to B (edge-a2, no path MTU learned) sends
    // nothing the hub must drop.
    let inv_path = petrel.dir.join("inventory.toml");
    let inv = std::fs::read_to_string(&inv_path).unwrap();
    let declared = inv.replacen(
        "name = \"site-b\"\nkind = \"public\"",
        "name = \"site-b\"\nkind = \"public\"\nmtu = 1296",
        1,
    );
    assert_ne!(inv, declared, "site-b not found in the lab inventory");
    std::fs::write(&inv_path, declared).unwrap();
    let b_cidr = lab.node("edge-b1").pod_cidr.to_string();
    let a2_ns = lab.ns("edge-a2").unwrap();
    lab::wait_until(
        "edge-a2 routes site B at 1296",
        Duration::from_secs(15),
        || {
            Ok(lab
                .exec(&a2_ns, &["ip", "route", "show", "table", "all", &b_cidr])?
                .stdout
                .contains("mtu lock 1296"))
        },
    )
    .unwrap();
    let before = petrel.hub_drops("oversize");
    transfers_both_ways(&lab, &[("edge-a2", "edge-b1")]);
    assert_eq!(
        petrel.hub_drops("oversize"),
        before,
        "declared MTU: no drops"
    );
    petrel.stop().unwrap();
    lab.teardown().unwrap();
}
