//! `petrel-demo` (`make demo`, as root): the README's first command. Builds the network-namespace
//! lab (a VPC, two NAT'd public sites and an Express Connect site, every node programmed as
//! flanneld would), shows what Flannel alone cannot do, starts Petrel the way an operator would
//! (hub on gw-1, node role on the cloud and Express Connect nodes, enrolled agents on the edge
//! nodes), prints who reaches whom over which path, sends a `kubectl logs`-style request from the
//! API server's side through the hub to a kubelet behind NAT, then stops Petrel and checks every
//! node is back to exactly what Flannel made. To explore by hand, `petrel-lab up`
//! builds the same lab and leaves it running.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use petrel_e2e::apiserver::{uds_connect, TestPki};
use petrel_e2e::lab::{self, Lab, LabSpec};
use petrel_e2e::lab_petrel::PetrelLab;
use petrel_e2e::procs::bin;

const MIB: u64 = 1 << 20;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hooks = args
        .iter()
        .position(|a| a == "--hooks")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "auto".into());
    lab::require_root().context("the demo builds network namespaces")?;
    Lab::cleanup_stale()?;
    let lab = Lab::build(LabSpec::default())?;
    println!(
        "== the lab ({}; nothing outside its namespaces is touched)\n{}",
        lab.prefix(),
        lab.layout().render_table()
    );
    let ip = |n: &str| lab.node(n).pod_ip;
    let before: Vec<_> = lab
        .node_names()
        .iter()
        .map(|n| (n.to_string(), lab.snapshot(n)))
        .collect();

    println!("== Flannel alone");
    for (a, b) in [
        ("cloud-1", "edge-a1"),
        ("edge-a1", "edge-b1"),
        ("edge-a1", "edge-a2"),
        ("cloud-1", "x1"),
    ] {
        println!(
            "   {a:<8} -> {b:<8} {}",
            if lab.ping(a, ip(b)) {
                "reachable"
            } else {
                "UNREACHABLE"
            }
        );
    }

    let tmp = tempfile::tempdir()?;
    let sock = tmp.path().join("egress.sock");
    let sock_s = sock.to_str().context("path")?.to_string();
    println!("\n== starting Petrel ({hooks} hooks): hub on gw-1, node roles on cloud-1/gw-1/x1, agents enrol on edge-a1/a2/b1");
    let petrel = PetrelLab::start_with(&lab, &hooks, tmp.path(), &["--egress-uds", &sock_s])?;
    let hooks_used = petrel.agent_status("edge-a1")?["dataplane"]["hooks"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    println!("   edge agents use the {hooks_used} hook");

    println!("\n== reachability with Petrel (ICMP both ways, 4 MiB checksummed TCP both ways)");
    println!(
        "   {:<8} {:<8} {:<10} {:<5} {:>10} {:>10}  PATH",
        "FROM", "TO", "ICMP", "", "TCP ->", "TCP <-"
    );
    for (a, b) in [
        ("cloud-1", "edge-a1"),
        ("gw-1", "edge-b1"),
        ("edge-a1", "edge-b1"),
        ("x1", "edge-b1"),
        ("cloud-1", "x1"),
        ("edge-a1", "edge-a2"),
    ] {
        let via0 = petrel.frames_via_hub()?;
        let icmp = lab.ping(a, ip(b)) && lab.ping(b, ip(a));
        let t1 = lab.tcp_transfer(a, b, 4 * MIB);
        let t2 = lab.tcp_transfer(b, a, 4 * MIB);
        let via = petrel.frames_via_hub()? - via0;
        let show = |t: &anyhow::Result<petrel_e2e::lab::TransferReport>| match t {
            Ok(r) => format!("{:.0} Mb/s", r.mbit_per_s()),
            Err(_) => "FAILED".into(),
        };
        let path = if via > 0 {
            format!("through the hub ({via} frames)")
        } else {
            "Flannel VXLAN, direct (0 frames via the hub)".into()
        };
        println!(
            "   {a:<8} {b:<8} {:<10} {:<5} {:>10} {:>10}  {path}",
            if icmp { "ok" } else { "FAILED" },
            "",
            show(&t1),
            show(&t2)
        );
    }

    println!("\n== petrel-gateway status (on gw-1)");
    let gw = bin("petrel-gateway")?;
    print!(
        "{}",
        lab.exec(
            "gw-1",
            &[
                gw.to_str().context("path")?,
                "status",
                "--admin-addr",
                petrel_e2e::lab_petrel::HUB_ADMIN
            ]
        )?
        .stdout
    );

    println!("\n== kubectl-logs-style request: API server -> hub (CONNECT over its Unix socket) -> QUIC -> edge-a1's agent -> kubelet");
    let pki = TestPki::new("demo kubelet CA")?;
    let (cert, key) = pki.leaf("edge-a1", &["edge-a1", "10.0.1.2"], true)?;
    std::fs::write(tmp.path().join("kubelet.crt"), &cert)?;
    std::fs::write(tmp.path().join("kubelet.key"), &key)?;
    let kubelet_bin = bin("petrel-standin-kubelet")?;
    let crt = tmp.path().join("kubelet.crt");
    let keyp = tmp.path().join("kubelet.key");
    let mut kubelet = lab.spawn(
        "edge-a1",
        &[
            kubelet_bin.to_str().context("path")?,
            "--address",
            "10.0.1.2:10250",
            "--cert",
            crt.to_str().context("path")?,
            "--key",
            keyp.to_str().context("path")?,
            "--pod",
            "default/demo:app",
        ],
    )?;
    kubelet.wait_for_log("listening https", Duration::from_secs(10))?;
    let (code, line, stream) = uds_connect(&sock, "edge-a1:10250")?;
    println!("   CONNECT edge-a1:10250 -> {line}");
    if code != 200 {
        bail!("CONNECT refused: {line}");
    }
    let cfg = petrel_e2e::apiserver::tls_client(&pki.ca_pem, None)?;
    let conn =
        rustls::ClientConnection::new(cfg, rustls_pki_types::ServerName::try_from("edge-a1")?)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    write!(tls, "GET /containerLogs/default/demo/app?tailLines=3 HTTP/1.1\r\nHost: edge-a1:10250\r\nConnection: close\r\n\r\n")?;
    tls.flush()?;
    let reader = BufReader::new(tls);
    let mut in_body = false;
    for l in reader.lines() {
        let l = match l {
            Ok(l) => l,
            Err(_) => break,
        };
        if in_body && !l.trim().is_empty() && !l.chars().all(|c| c.is_ascii_hexdigit()) {
            println!("   | {l}");
        }
        if l.is_empty() {
            in_body = true;
        }
    }
    drop(kubelet);

    println!("\n== stopping Petrel");
    petrel.stop()?;
    let mut clean = true;
    for (n, snap) in before {
        let (Ok(b), Ok(a)) = (snap, lab.snapshot(&n)) else {
            continue;
        };
        let diff = b.diff(&a);
        if !diff.is_empty() {
            clean = false;
            println!("   {n}: not back to Flannel's state:\n{diff}");
        }
    }
    println!(
        "   every node's rules, routes, FDB and neighbours are exactly what Flannel made: {}",
        if clean { "yes" } else { "NO" }
    );
    if !clean {
        bail!("Petrel left state behind");
    }
    Ok(())
}
