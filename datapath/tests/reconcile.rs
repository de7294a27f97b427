//! Idempotence, exact cleanup (also after a crash) and reconciliation on change events, in
//! network namespaces this test creates and always deletes. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use petrel_datapath::{
    cleanup_all, detect_fast_support, ApplyReport, ChangeEvents, Datapath, DesiredState,
    HookChoice, HookMode, Relay,
};

/// One node with a Flannel-like setup (flannel.1 as topology.sh programs it, two peers).
fn flannel_node(lab: &mut Lab) -> Node {
    let ns = lab.netns("n1");
    let node = Node {
        ns,
        idx: 1,
        ip: "192.168.50.1".into(),
    };
    node_sysctls(&node.ns);
    underlay(&node);
    flannel_device(&node);
    flannel_peer(&node, 2, "192.168.50.2");
    flannel_peer(&node, 3, "192.168.50.3");
    settle(&node.ns);
    node
}

fn localbypass_of(dev: &'static str) -> impl std::future::Future<Output = Option<bool>> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo};
    async move {
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        let task = tokio::spawn(conn);
        let mut links = handle.link().get().match_name(dev.to_string()).execute();
        let msg = links.try_next().await.unwrap().unwrap();
        task.abort();
        msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(v)) => v.iter().find_map(|x| match x {
                    InfoVxlan::Localbypass(b) => Some(*b),
                    _ => None,
                }),
                _ => None,
            }),
            _ => None,
        })
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let r = run(&["uname", "-r"]);
    let mut it = r
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

fn idempotence_and_exact_cleanup(hook: HookChoice) {
    let mut lab = Lab::new();
    let node = flannel_node(&mut lab);
    let ns = node.ns.clone();
    let before = snapshot(&ns);
    let flannel_before = flannel_snapshot(&ns);
    let cfg = lab.config(hook);
    let expect_fast = hook == HookChoice::Fast;

    let ns2 = ns.clone();
    let cfg2 = cfg.clone();
    in_netns(&ns, move || async move {
        let ns = ns2;
        if kernel_at_least(6, 6) {
            assert!(
                detect_fast_support().unwrap(),
                "kernel >= 6.6 must support localbypass off"
            );
        }
        let mut dp = Datapath::open(cfg2.clone()).await.unwrap();
        assert_eq!(
            dp.mode(),
            if expect_fast {
                HookMode::Fast
            } else {
                HookMode::Portable
            }
        );
        assert_eq!(dp.vtep_mac(), mac(1));
        let desired = DesiredState {
            peers: vec![peer(2, 1400), peer(3, 1400)],
            relay: Relay::Local,
        };
        let r1 = dp.apply(&desired).await.unwrap();
        assert!(r1.changed());
        assert_eq!((r1.rules_added, r1.routes_added), (2, 2), "{r1}");
        if expect_fast {
            assert_eq!((r1.neighbours_added, r1.fdb_added), (2, 2), "{r1}");
        }
        assert_eq!(
            r1.sysctls, 1,
            "strict rp_filter on flannel.1 must be loosened: {r1}"
        );
        let r2 = dp.apply(&desired).await.unwrap();
        assert_eq!(
            r2,
            ApplyReport::default(),
            "second apply must change nothing: {r2}"
        );

        // The expected objects, as iproute2 sees them.
        let rules = ip(&ns, &["rule"]);
        for c in ["10.244.2.0/24", "10.244.3.0/24"] {
            assert!(
                rules.contains(&format!("100:\tfrom all to {c} lookup 7473")),
                "{rules}"
            );
        }
        let routes = ip(&ns, &["route", "show", "table", "7473"]);
        if expect_fast {
            let link = ip(&ns, &["-d", "link", "show", "petrel.1"]);
            for want in [
                "mtu 1450",
                "link/ether 02:fa:00:00:00:01",
                "vxlan id 1 local 192.168.50.1 dev u0",
                "dstport 8474",
                "nolearning",
                "state UNKNOWN",
            ] {
                assert!(link.contains(want), "petrel.1 lacks {want:?}: {link}");
            }
            assert_eq!(
                localbypass_of("petrel.1").await,
                Some(false),
                "localbypass must be off"
            );
            for i in [2, 3] {
                let r = format!("10.244.{i}.0/24 via 10.244.{i}.0 dev petrel.1 proto static onlink mtu lock 1400");
                assert!(routes.contains(&r), "missing {r:?} in {routes}");
            }
            let neigh = ip(&ns, &["neigh", "show", "dev", "petrel.1"]);
            let fdb = bridge(&ns, &["fdb", "show", "dev", "petrel.1"]);
            for i in [2, 3] {
                let n = format!("10.244.{i}.0 lladdr 02:fa:00:00:00:0{i} PERMANENT");
                assert!(neigh.contains(&n), "missing {n:?} in {neigh}");
                let f = format!("02:fa:00:00:00:0{i} dst 127.0.0.1 port 8473 self permanent");
                assert!(fdb.contains(&f), "missing {f:?} in {fdb}");
            }
            assert!(
                !fdb.contains("00:00:00:00:00:00"),
                "no default FDB entry: {fdb}"
            );
        } else {
            let link = ip(&ns, &["-d", "link", "show", "petrel0"]);
            assert!(link.contains("mtu 1450") && link.contains("tun"), "{link}");
            for i in [2, 3] {
                let r =
                    format!("10.244.{i}.0/24 dev petrel0 proto static scope link mtu lock 1400");
                assert!(routes.contains(&r), "missing {r:?} in {routes}");
            }
        }
        assert_eq!(
            sysctl_get(&ns, "net.ipv4.conf.flannel/1.rp_filter"),
            "2",
            "rp_filter on flannel.1"
        );
        assert_eq!(
            flannel_snapshot(&ns),
            flannel_before,
            "Flannel's objects must not change"
        );

        // One peer removed, the other's MTU changed.
        let desired2 = DesiredState {
            peers: vec![peer(2, 1350)],
            relay: Relay::Local,
        };
        let r3 = dp.apply(&desired2).await.unwrap();
        assert_eq!(
            (
                r3.rules_removed,
                r3.routes_updated,
                r3.routes_removed,
                r3.rules_added,
                r3.routes_added
            ),
            (1, 1, 1, 0, 0),
            "{r3}"
        );
        if expect_fast {
            assert_eq!((r3.neighbours_removed, r3.fdb_removed), (1, 1), "{r3}");
        }
        assert_eq!(dp.apply(&desired2).await.unwrap(), ApplyReport::default());
        let rules = ip(&ns, &["rule"]);
        assert!(
            rules.contains("to 10.244.2.0/24 lookup 7473") && !rules.contains("10.244.3.0"),
            "{rules}"
        );
        let routes = ip(&ns, &["route", "show", "table", "7473"]);
        assert!(
            routes.contains("10.244.2.0/24") && routes.contains("mtu lock 1350"),
            "{routes}"
        );
        assert!(
            !routes.contains("10.244.3.0") && !routes.contains("1400"),
            "{routes}"
        );
        if expect_fast {
            let neigh = ip(&ns, &["neigh", "show", "dev", "petrel.1"]);
            let fdb = bridge(&ns, &["fdb", "show", "dev", "petrel.1"]);
            assert!(
                neigh.contains("10.244.2.0") && !neigh.contains("10.244.3.0"),
                "{neigh}"
            );
            assert!(
                fdb.contains("02:fa:00:00:00:02") && !fdb.contains("02:fa:00:00:00:03"),
                "{fdb}"
            );
        }
        // Relay moves to a remote hub (fast: the FDB entries follow).
        if expect_fast {
            let remote = DesiredState {
                peers: vec![peer(2, 1350)],
                relay: Relay::Remote("192.168.50.9".parse().unwrap()),
            };
            let r = dp.apply(&remote).await.unwrap();
            assert_eq!(r.fdb_updated, 1, "{r}");
            let fdb = bridge(&ns, &["fdb", "show", "dev", "petrel.1"]);
            assert!(
                fdb.contains("02:fa:00:00:00:02 dst 192.168.50.9 port 8473 self permanent"),
                "{fdb}"
            );
            assert_eq!(dp.apply(&remote).await.unwrap(), ApplyReport::default());
            // Active-active hubs: each site's peers point at the hub that owns the site.
            let mut owned_elsewhere = peer(3, 1300);
            owned_elsewhere.via = Some(Relay::Remote("192.168.50.10".parse().unwrap()));
            let split = DesiredState {
                peers: vec![peer(2, 1350), owned_elsewhere],
                relay: Relay::Remote("192.168.50.9".parse().unwrap()),
            };
            let r = dp.apply(&split).await.unwrap();
            assert_eq!(r.fdb_added, 1, "{r}");
            let fdb = bridge(&ns, &["fdb", "show", "dev", "petrel.1"]);
            assert!(
                fdb.contains("02:fa:00:00:00:02 dst 192.168.50.9 port 8473 self permanent")
                    && fdb.contains("02:fa:00:00:00:03 dst 192.168.50.10 port 8473 self permanent"),
                "{fdb}"
            );
            assert_eq!(dp.apply(&split).await.unwrap(), ApplyReport::default());
            // The owner moves: only that entry is rewritten.
            let mut moved = split.clone();
            moved.peers[1].via = None;
            let r = dp.apply(&moved).await.unwrap();
            assert_eq!(
                (r.fdb_updated, r.fdb_added, r.fdb_removed),
                (1, 0, 0),
                "{r}"
            );
            let fdb = bridge(&ns, &["fdb", "show", "dev", "petrel.1"]);
            assert!(
                fdb.contains("02:fa:00:00:00:03 dst 192.168.50.9 port 8473 self permanent")
                    && !fdb.contains("192.168.50.10"),
                "{fdb}"
            );
            // Two CIDRs of one VtepMAC toward two relays cannot be programmed: refused.
            let mut second = peer(2, 1350);
            second.cidr = "10.244.12.0/24".parse().unwrap();
            second.via = Some(Relay::Remote("192.168.50.10".parse().unwrap()));
            let conflict = DesiredState {
                peers: vec![peer(2, 1350), second],
                relay: Relay::Remote("192.168.50.9".parse().unwrap()),
            };
            let e = dp.apply(&conflict).await.unwrap_err();
            assert!(e.to_string().contains("one relay per VtepMAC"), "{e}");
            dp.apply(&remote).await.unwrap();
        }
        assert_eq!(
            flannel_snapshot(&ns),
            flannel_before,
            "Flannel's objects must not change"
        );
        dp.cleanup().await.unwrap();
    });
    assert_eq!(
        snapshot(&ns),
        before,
        "cleanup must restore the namespace exactly"
    );

    // Crash: a datapath dropped without cleanup, then the stateless cleanup_all.
    let ns2 = ns.clone();
    let cfg2 = cfg.clone();
    in_netns(&ns, move || async move {
        let mut dp = Datapath::open(cfg2.clone()).await.unwrap();
        let r = dp
            .apply(&DesiredState {
                peers: vec![peer(2, 1400), peer(3, 1300)],
                relay: Relay::Local,
            })
            .await
            .unwrap();
        assert!(r.changed());
        drop(dp);
        let rules = ip(&ns2, &["rule"]);
        assert!(
            rules.contains("lookup 7473"),
            "rules survive a crash: {rules}"
        );
    });
    assert_ne!(snapshot(&ns), before);
    let cfg2 = cfg.clone();
    in_netns(
        &ns,
        move || async move { cleanup_all(&cfg2).await.unwrap() },
    );
    assert_eq!(
        snapshot(&ns),
        before,
        "cleanup_all must restore the namespace exactly"
    );
    // And it is harmless when there is nothing to clean.
    let cfg2 = cfg.clone();
    in_netns(
        &ns,
        move || async move { cleanup_all(&cfg2).await.unwrap() },
    );
    assert_eq!(snapshot(&ns), before);
}

#[test]
fn fast_apply_is_idempotent_and_cleanup_is_exact() {
    idempotence_and_exact_cleanup(HookChoice::Fast);
}

#[test]
fn portable_apply_is_idempotent_and_cleanup_is_exact() {
    idempotence_and_exact_cleanup(HookChoice::Portable);
}

#[test]
fn missing_flannel_is_a_clear_error() {
    let mut lab = Lab::new();
    let ns = lab.netns("n1");
    let cfg = lab.config(HookChoice::Auto);
    let err = in_netns(&ns, move || async move {
        Datapath::open(cfg).await.unwrap_err()
    });
    assert!(err.to_string().contains("flannel.1 not found"), "{err}");
}

/// Waits up to `within` for a change notification.
async fn next_change(
    ev: &mut ChangeEvents,
    within: Duration,
) -> Option<petrel_datapath::ChangeSet> {
    tokio::time::timeout(within, ev.changed())
        .await
        .ok()
        .flatten()
}

/// Swallows the notifications our own apply caused.
async fn drain(ev: &mut ChangeEvents) {
    while next_change(ev, Duration::from_millis(200)).await.is_some() {}
}

/// Pings a via-hub address from the node itself and waits for the frame on the FrameSource
/// task's channel (the ping itself gets no answer: nobody plays the hub here).
async fn frame_captured(ns: &str, frames: &mut tokio::sync::mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    while frames.try_recv().is_ok() {}
    let ns = ns.to_string();
    let pinger = tokio::task::spawn_blocking(move || {
        nsexec(&ns, &["ping", "-c", "1", "-W", "1", "10.244.2.5"]);
    });
    let f = tokio::time::timeout(Duration::from_secs(3), frames.recv())
        .await
        .expect("a frame within 3 s")
        .expect("frame source alive");
    pinger.await.unwrap();
    f
}

fn reconcile(hook: HookChoice) {
    let mut lab = Lab::new();
    let node = flannel_node(&mut lab);
    let ns = node.ns.clone();
    let before = snapshot(&ns);
    let cfg = lab.config(hook);
    let fast = hook == HookChoice::Fast;
    in_netns(&ns.clone(), move || async move {
        let mut dp = Datapath::open(cfg).await.unwrap();
        let desired = DesiredState {
            peers: vec![peer(2, 1400), peer(3, 1400)],
            relay: Relay::Local,
        };
        dp.apply(&desired).await.unwrap();
        let mut ev = dp.change_events().unwrap();
        drain(&mut ev).await;
        let second = Duration::from_secs(1);
        let dev = if fast { "petrel.1" } else { "petrel0" };

        // Frames for a via-hub destination reach the FrameSource, as flannel.1 would send them.
        let mut src = dp.frame_source().unwrap();
        let (tx, mut frames) = tokio::sync::mpsc::channel(64);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; petrel_datapath::FRAME_BUF_LEN];
            while let Ok(n) = src.recv(&mut buf).await {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
        let f = frame_captured(&ns, &mut frames).await;
        assert_eq!(&f[..8], &[8, 0, 0, 0, 0, 0, 1, 0], "VXLAN header, VNI 1");
        assert_eq!(&f[8..14], &mac(2), "inner dst = peer VtepMAC");
        assert_eq!(&f[14..20], &mac(1), "inner src = our VtepMAC");
        assert_eq!(&f[20..22], &[8, 0]);
        assert_eq!(&f[38..42], &[10, 244, 2, 5], "inner IPv4 destination");

        // A route of our table deleted from outside.
        ip(&ns, &["route", "del", "10.244.2.0/24", "table", "7473"]);
        let c = next_change(&mut ev, second)
            .await
            .expect("route deletion must be notified within 1 s");
        assert!(c.routes, "{c:?}");
        let r = dp.apply(&desired).await.unwrap();
        assert_eq!((r.routes_added, r.total()), (1, 1), "{r}");
        assert!(
            ip(&ns, &["route", "show", "table", "7473"]).contains(&format!(
                "10.244.2.0/24 {}dev {dev}",
                if fast { "via 10.244.2.0 " } else { "" }
            ))
        );
        drain(&mut ev).await;

        // One of our rules deleted.
        ip(
            &ns,
            &[
                "rule",
                "del",
                "pref",
                "100",
                "to",
                "10.244.3.0/24",
                "table",
                "7473",
            ],
        );
        let c = next_change(&mut ev, second)
            .await
            .expect("rule deletion must be notified within 1 s");
        assert!(c.rules, "{c:?}");
        let r = dp.apply(&desired).await.unwrap();
        assert_eq!((r.rules_added, r.total()), (1, 1), "{r}");
        assert!(ip(&ns, &["rule"]).contains("to 10.244.3.0/24 lookup 7473"));
        drain(&mut ev).await;

        if fast {
            // An FDB entry on petrel.1 deleted, a neighbour overwritten.
            bridge(
                &ns,
                &["fdb", "del", "02:fa:00:00:00:02", "dev", "petrel.1", "self"],
            );
            ip(
                &ns,
                &[
                    "neigh",
                    "replace",
                    "10.244.3.0",
                    "lladdr",
                    "02:fa:00:00:00:99",
                    "dev",
                    "petrel.1",
                    "nud",
                    "permanent",
                ],
            );
            let c = next_change(&mut ev, second)
                .await
                .expect("fdb/neigh change must be notified within 1 s");
            assert!(c.fdb || c.neighbours, "{c:?}");
            let r = dp.apply(&desired).await.unwrap();
            assert_eq!(
                (r.fdb_added, r.neighbours_updated, r.total()),
                (1, 1, 2),
                "{r}"
            );
            drain(&mut ev).await;
        }

        // Our device deleted: it and everything on it come back, and the FrameSource keeps
        // delivering (portable: it switches to the new TUN descriptor by itself).
        ip(&ns, &["link", "del", dev]);
        let c = next_change(&mut ev, second)
            .await
            .expect("link deletion must be notified within 1 s");
        assert!(c.links, "{c:?}");
        let r = dp.apply(&desired).await.unwrap();
        assert!(r.device >= 1 && r.routes_added == 2, "{r}");
        if fast {
            assert_eq!((r.neighbours_added, r.fdb_added), (2, 2), "{r}");
        }
        assert_eq!(dp.apply(&desired).await.unwrap(), ApplyReport::default());
        let f = frame_captured(&ns, &mut frames).await;
        assert_eq!(&f[8..14], &mac(2));
        drain(&mut ev).await;

        // Unrelated churn (Flannel's main-table routes) is filtered out.
        ip(
            &ns,
            &[
                "route",
                "replace",
                "10.244.9.0/24",
                "via",
                "10.244.9.0",
                "dev",
                "flannel.1",
                "onlink",
            ],
        );
        ip(&ns, &["route", "del", "10.244.9.0/24"]);
        assert!(next_change(&mut ev, Duration::from_millis(300))
            .await
            .is_none());

        dp.cleanup().await.unwrap();
        reader.abort();
    });
    assert_eq!(snapshot(&node.ns), before);
}

#[test]
fn fast_change_events_fire_and_apply_repairs() {
    reconcile(HookChoice::Fast);
}

#[test]
fn portable_change_events_fire_and_apply_repairs() {
    reconcile(HookChoice::Portable);
}
