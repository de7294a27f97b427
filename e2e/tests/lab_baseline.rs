//! The lab's baseline, before any Petrel component runs: what Flannel's VXLAN backend can and
//! cannot do in this topology, plus the harness's own guarantees (teardown on panic, stale
//! cleanup, snapshots, flannel re-programming, NAT rebinding).
//!
//! Needs root (CI runs as root). Each test builds its own lab (~0.1 s) and they run in
//! parallel; the whole file takes a few seconds, dominated by negative probes that must wait
//! out their windows.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use petrel_e2e::lab::{self, never_within, vxlan_icmp_echo, wait_until, Lab, LabSpec, PingOpts};

const MIB: u64 = 1 << 20;

/// Root check, stale cleanup, build.
fn lab() -> Result<Lab> {
    lab::require_root()?;
    Lab::cleanup_stale()?;
    Lab::build(LabSpec::default())
}

#[test]
fn plain_vxlan_works_where_the_underlay_reaches() -> Result<()> {
    let lab = lab()?;
    let ip = |n: &str| lab.node(n).pod_ip;

    // Express Connect: cloud <-> x1 over plain kernel VXLAN on UDP 8472, routed through the VPC.
    assert!(lab.ping("cloud-1", ip("x1")), "cloud-1 pod -> x1 pod");
    assert!(lab.ping("x1", ip("cloud-1")), "x1 pod -> cloud-1 pod");
    let full = PingOpts {
        payload: Some(1450 - 28),
        dont_fragment: true,
        ..PingOpts::default()
    };
    let r = lab.ping_with("cloud-1", ip("x1"), &full)?;
    assert!(
        r.reachable(),
        "a full 1450-byte DF packet fits the VXLAN path:\n{}",
        r.output
    );
    let over = PingOpts {
        payload: Some(1450 - 27),
        dont_fragment: true,
        count: 1,
        ..PingOpts::default()
    };
    let r = lab.ping_with("cloud-1", ip("x1"), &over)?;
    assert!(
        !r.reachable() && r.output.contains("message too long"),
        "pod MTU is 1450:\n{}",
        r.output
    );

    let t = lab.tcp_transfer("cloud-1", "x1", 10 * MIB)?;
    assert_eq!(t.bytes_received, 10 * MIB);
    eprintln!(
        "cloud-1 -> x1: 10 MiB in {:?} ({:.0} Mbit/s)",
        t.elapsed,
        t.mbit_per_s()
    );
    let t = lab.tcp_transfer("x1", "cloud-1", MIB)?;
    assert_eq!(
        t.peer_seen.ip(),
        std::net::IpAddr::V4(ip("x1")),
        "no NAT on the leased line"
    );

    // Inside the VPC and inside one public site, VXLAN is direct too.
    assert!(lab.ping("cloud-1", ip("gw-1")), "cloud-1 pod -> gw-1 pod");
    assert!(
        lab.ping("edge-a1", ip("edge-a2")),
        "edge-a1 pod -> edge-a2 pod (same LAN)"
    );
    assert!(
        lab.ping("edge-a2", ip("edge-a1")),
        "edge-a2 pod -> edge-a1 pod (same LAN)"
    );
    lab.tcp_transfer("edge-a1", "edge-a2", MIB)
        .context("same-site TCP")?;

    // The API server reaches Express Connect nodes directly (the hub proxies only edge sites).
    assert!(
        lab.ping(&lab.apiserver().ns, lab.node("x1").underlay_ip),
        "apiserver -> x1 node"
    );
    Ok(())
}

#[test]
fn flannel_vxlan_cannot_cross_nat() -> Result<()> {
    let lab = lab()?;
    let ip = |n: &str| lab.node(n).pod_ip;
    let cloud = &lab.node("cloud-1").ns;
    let tx_before = lab.link_stats(cloud, "flannel.1")?.tx_packets;

    // Each failing probe waits out its timeout, so run them side by side.
    let api = lab.apiserver().ns.clone();
    let probes: [(&str, &str, Ipv4Addr); 5] = [
        ("cloud-1 pod -> edge-a1 pod", "cloud-1", ip("edge-a1")),
        ("edge-a1 pod -> cloud-1 pod", "edge-a1", ip("cloud-1")),
        (
            "edge-a1 pod -> edge-b1 pod (other public site)",
            "edge-a1",
            ip("edge-b1"),
        ),
        ("x1 pod -> edge-b1 pod", "x1", ip("edge-b1")),
        (
            "apiserver -> edge-a1 node",
            &api,
            lab.node("edge-a1").underlay_ip,
        ),
    ];
    let t0 = Instant::now();
    let lab_ref = &lab;
    let transfer = thread::scope(|s| {
        let transfer = s.spawn(|| lab_ref.tcp_transfer("cloud-1", "edge-a1", MIB));
        let pings: Vec<_> = probes
            .iter()
            .map(|(what, from, to)| (*what, s.spawn(move || lab_ref.ping(from, *to))))
            .collect();
        for (what, h) in pings {
            assert!(
                !h.join().unwrap_or(true),
                "{what} must fail before Petrel exists"
            );
        }
        transfer.join()
    });
    // Flannel did try: flannel.1 encapsulated toward edge-a1's private address (its public-ip).
    let tx_after = lab.link_stats(cloud, "flannel.1")?.tx_packets;
    assert!(
        tx_after > tx_before,
        "flannel.1 on cloud-1 sent VXLAN ({tx_before} -> {tx_after})"
    );

    // A broken path fails fast, it does not hang.
    let err = match transfer {
        Ok(Ok(r)) => bail!("TCP cloud-1 -> edge-a1 unexpectedly worked: {r:?}"),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => bail!("the transfer thread panicked"),
    };
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "failed in {:?}: {err}",
        t0.elapsed()
    );
    assert!(err.contains("connecting to"), "{err}");
    Ok(())
}

#[test]
fn nothing_enters_an_edge_site_from_the_wan() -> Result<()> {
    let lab = lab()?;
    let a1 = lab.node("edge-a1");
    let rt_a = lab.router("site-a")?;
    let gw_ns = &lab.gateway().ns;
    let quiet = Duration::from_millis(700);

    // Positive control: edge-first UDP works, and the hub sees the router's public address.
    let hub = SocketAddrV4::new(lab.gateway_public_ip(), 7000);
    let ex = lab.udp_exchange(&a1.ns, gw_ns, hub, Duration::from_secs(3))?;
    assert!(
        ex.reply_received,
        "edge-first UDP to the hub gets its reply back"
    );
    assert_eq!(
        *ex.seen_source.ip(),
        rt_a.wan_ip,
        "the hub sees site A's masquerade address"
    );

    // Inbound UDP from the hub's public address to the router's public address: dropped.
    let listen = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000);
    let to_router = SocketAddrV4::new(rt_a.wan_ip, 9000);
    assert!(
        !lab.udp_delivered(gw_ns, to_router, &a1.ns, listen, quiet)?,
        "WAN -> {to_router} reached edge-a1"
    );

    // Even routed straight at the private address (a WAN neighbour with a route via rt-a), the
    // stateful firewall drops it.
    let wan = lab.wan_ns().to_owned();
    lab.exec(
        &wan,
        &[
            "ip",
            "route",
            "replace",
            &rt_a.lan_net.to_string(),
            "via",
            &rt_a.wan_ip.to_string(),
        ],
    )?;
    let to_private = SocketAddrV4::new(a1.underlay_ip, 9000);
    assert!(
        !lab.udp_delivered(&wan, to_private, &a1.ns, listen, quiet)?,
        "WAN -> {to_private} reached edge-a1"
    );
    let fw = lab
        .exec(
            &rt_a.ns,
            &["nft", "list", "chain", "ip", "petrel_nat", "forward_filter"],
        )?
        .stdout;
    let drops = fw
        .lines()
        .find(|l| l.contains("iifname \"wan0\" counter packets") && l.trim_end().ends_with("drop"))
        .and_then(|l| {
            l.split("packets ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    assert!(drops >= 3, "rt-a's firewall counted the drops:\n{fw}");

    // Inbound VXLAN (what cloud-side kernel VXLAN would send): never decapsulated on edge-a1.
    let frame = vxlan_icmp_echo(
        1,
        &a1.vtep_mac,
        &lab.node("cloud-1").vtep_mac,
        lab.node("cloud-1").pod_ip,
        a1.pod_ip,
    )?;
    let rx = || -> Result<u64> { Ok(lab.link_stats(&a1.ns, "flannel.1")?.rx_packets) };
    let rx0 = rx()?;
    lab.send_udp(
        gw_ns,
        None,
        SocketAddrV4::new(rt_a.wan_ip, 8472),
        vec![frame.clone(); 3],
    )?;
    lab.send_udp(
        &wan,
        None,
        SocketAddrV4::new(a1.underlay_ip, 8472),
        vec![frame.clone(); 3],
    )?;
    never_within("inbound VXLAN was decapsulated on edge-a1", quiet, || {
        Ok(rx()? != rx0)
    })?;

    // Control: the same frame from inside the LAN is decapsulated (so the probe is valid).
    let a2_ns = lab.node("edge-a2").ns.clone();
    lab.send_udp(
        &a2_ns,
        None,
        SocketAddrV4::new(a1.underlay_ip, 8472),
        vec![frame; 1],
    )?;
    wait_until(
        "the LAN-injected frame to arrive on edge-a1's flannel.1",
        Duration::from_secs(3),
        || Ok(rx()? > rx0),
    )?;
    Ok(())
}

#[test]
fn snapshot_sees_overrides_and_reapply_restores_flannel() -> Result<()> {
    let lab = lab()?;
    let cloud_ns = lab.node("cloud-1").ns.clone();
    let a1 = lab.node("edge-a1").clone();
    let before = lab.snapshot("cloud-1")?;
    let gw_before = lab.snapshot("gw-1")?;
    assert_eq!(
        before.fdb.len(),
        5,
        "one FDB entry per other node:\n{before}"
    );
    assert_eq!(before.neigh.len(), 5, "{before}");
    assert!(
        before.fdb.contains(&format!(
            "{} dst {} self permanent",
            a1.vtep_mac, a1.public_ip
        )),
        "{before}"
    );
    assert!(
        before.routes.contains(&format!(
            "{} via {} dev flannel.1 onlink",
            a1.pod_cidr, a1.vtep_ip
        )),
        "{before}"
    );

    // What Petrel's node role might do: redirect the FDB entry and add a per-site policy route.
    lab.exec(
        &cloud_ns,
        &[
            "bridge",
            "fdb",
            "replace",
            &a1.vtep_mac,
            "dev",
            "flannel.1",
            "dst",
            "127.0.0.1",
            "port",
            "9999",
            "self",
            "permanent",
        ],
    )?;
    let cidr = a1.pod_cidr.to_string();
    lab.exec(
        &cloud_ns,
        &[
            "ip", "rule", "add", "to", &cidr, "lookup", "100", "pref", "100",
        ],
    )?;
    let via = a1.vtep_ip.to_string();
    lab.exec(
        &cloud_ns,
        &[
            "ip",
            "route",
            "replace",
            &cidr,
            "via",
            &via,
            "dev",
            "flannel.1",
            "onlink",
            "mtu",
            "lock",
            "1400",
            "table",
            "100",
        ],
    )?;
    let changed = lab.snapshot("cloud-1")?;
    let diff = before.diff(&changed);
    assert_ne!(before, changed);
    assert!(
        diff.contains("127.0.0.1 port 9999")
            && diff.contains("lookup 100")
            && diff.contains("table 100"),
        "{diff}"
    );

    // flanneld re-programs edge-a1 everywhere (lease event): the FDB override is gone, port
    // included; the policy rule/table (not Flannel's) stay until removed.
    lab.reapply_flannel("edge-a1")?;
    let after = lab.snapshot("cloud-1")?;
    assert_eq!(before.fdb, after.fdb, "{}", before.diff(&after));
    lab.exec(&cloud_ns, &["ip", "rule", "del", "pref", "100"])?;
    lab.exec(&cloud_ns, &["ip", "route", "flush", "table", "100"])?;
    let restored = lab.snapshot("cloud-1")?;
    assert_eq!(before, restored, "{}", before.diff(&restored));
    assert_eq!(
        gw_before,
        lab.snapshot("gw-1")?,
        "re-programming is idempotent on untouched nodes"
    );

    // Lease expiry and return.
    lab.flannel_remove_peer("cloud-1", "edge-a1")?;
    let gone = lab.snapshot("cloud-1")?;
    assert_eq!(gone.fdb.len(), 4, "{gone}");
    lab.flannel_remove_peer("cloud-1", "edge-a1")?; // already gone: fine
    lab.flannel_program_peer("cloud-1", "edge-a1")?;
    assert_eq!(before, lab.snapshot("cloud-1")?);
    Ok(())
}

#[test]
fn nat_rebinding_changes_what_the_hub_sees() -> Result<()> {
    let lab = lab()?;
    let a1_ns = lab.node("edge-a1").ns.clone();
    let gw_ns = lab.gateway().ns.clone();
    let rt = lab.router("site-a")?.clone();
    let hub = SocketAddrV4::new(lab.gateway_public_ip(), 7001);
    let seen = |lab: &Lab| -> Result<Ipv4Addr> {
        let ex = lab.udp_exchange(&a1_ns, &gw_ns, hub, Duration::from_secs(3))?;
        ensure!(ex.reply_received, "no reply through the NAT: {ex:?}");
        Ok(*ex.seen_source.ip())
    };
    assert_eq!(seen(&lab)?, rt.wan_ip);
    let r = lab.rebind_site_nat("site-a")?;
    assert_eq!((r.old, r.new), (rt.wan_ip, rt.alt_wan_ip));
    assert_eq!(lab.site_public_ip("site-a")?, rt.alt_wan_ip);
    assert_eq!(
        seen(&lab)?,
        rt.alt_wan_ip,
        "after rebinding the hub sees the new address"
    );
    // Site B is untouched.
    let ex = lab.udp_exchange(&lab.node("edge-b1").ns, &gw_ns, hub, Duration::from_secs(3))?;
    assert_eq!(*ex.seen_source.ip(), lab.router("site-b")?.wan_ip);
    let back = lab.rebind_site_nat("site-a")?;
    assert_eq!(back.new, rt.wan_ip);
    assert_eq!(seen(&lab)?, rt.wan_ip);
    lab.flush_site_conntrack("site-b")?;
    Ok(())
}

#[test]
fn inventory_file_describes_the_lab() -> Result<()> {
    let lab = lab()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("inventory.toml");
    lab.write_inventory(&path)?;
    let text = std::fs::read_to_string(&path)?;
    for n in lab.nodes() {
        let block = format!(
            "[[nodes]]\nname = \"{}\"\nsite = \"{}\"\naddresses = [\"{}\"]\npod_cidrs = [\"{}\"]\nvtep_mac = \"{}\"\n\
             public_ip = \"{}\"\nkubelet_port = 10250\ngateway = {}\n",
            n.name, n.site, n.underlay_ip, n.pod_cidr, n.vtep_mac, n.public_ip, n.gateway
        );
        assert!(text.contains(&block), "missing:\n{block}\nin:\n{text}");
    }
    assert_eq!(text.matches("[[sites]]").count(), 4);
    assert!(text.contains("name = \"site-x\"\nkind = \"express-connect\""));
    Ok(())
}

fn lab_leftovers(prefix: &str) -> Result<Vec<String>> {
    Ok(lab::netns::list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect())
}

#[test]
fn a_panicking_test_leaves_nothing_behind() -> Result<()> {
    lab::require_root()?;
    Lab::cleanup_stale()?;
    let (tx, rx) = mpsc::channel();
    let body = thread::Builder::new()
        .name("deliberately-panicking-test".into())
        .spawn(move || -> Result<()> {
            let lab = Lab::build(LabSpec::default())?;
            // A process inside the lab whose guard is leaked: the lab itself must kill it.
            let guard = lab.spawn(&lab.node("edge-a1").ns, &["sleep", "60"])?;
            let _ = tx.send((lab.prefix().to_owned(), guard.pid()));
            std::mem::forget(guard);
            panic!("deliberate panic with a live lab (expected in this test)");
        })?;
    let (prefix, pid) = rx
        .recv_timeout(Duration::from_secs(30))
        .context("lab in the panicking thread never came up")?;
    assert!(body.join().is_err(), "the test body panicked");
    assert_eq!(
        lab_leftovers(&prefix)?,
        Vec::<String>::new(),
        "namespaces of {prefix} left behind"
    );
    assert!(
        !Path::new(&format!("{}/{prefix}.json", lab::netns::STATE_DIR)).exists(),
        "registry record left behind"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "process {pid} spawned in the lab still runs: {stat}"
    );
    Ok(())
}

#[test]
fn cleanup_stale_removes_a_dead_runs_namespaces() -> Result<()> {
    lab::require_root()?;
    // A crashed run: namespaces with the harness prefix, a process inside, no live owner. While
    // it is being set up this process owns the prefix (so concurrent cleaners leave it alone);
    // then the registry record is removed, which is what a dead owner looks like.
    let prefix = (0..256u16)
        .map(|i| {
            format!(
                "pt{:04x}",
                (std::process::id() as u16).wrapping_mul(31).wrapping_add(i)
            )
        })
        .find(|p| lab::netns::claim_prefix(p, false).unwrap_or(false))
        .context("no free prefix")?;
    let ns = format!("{prefix}-orphan");
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()?
        .success();
    ensure!(ok, "ip netns add {ns}");
    let ok = std::process::Command::new("ip")
        .args([
            "-n", &ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ])
        .status()?
        .success();
    ensure!(ok, "veth in {ns}");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns, "sleep", "60"]);
    let mut sleeper = lab::ChildGuard::spawn(
        cmd,
        std::env::temp_dir().join(format!("{prefix}-sleeper.log")),
    )?;
    wait_until(
        "the sleeper to enter the namespace",
        Duration::from_secs(5),
        || {
            Ok(std::fs::read_link(format!("/proc/{}/exe", sleeper.pid()))?
                .to_string_lossy()
                .contains("sleep"))
        },
    )?;

    std::fs::remove_file(format!("{}/{prefix}.json", lab::netns::STATE_DIR))?;
    Lab::cleanup_stale()?; // another test may race us to it; either way it must be gone
    assert_eq!(lab_leftovers(&prefix)?, Vec::<String>::new());
    sleeper
        .wait_timeout(Duration::from_secs(5))
        .context("the process inside the stale lab was killed")?;
    let _ = std::fs::remove_file(sleeper.log_path());
    Ok(())
}
