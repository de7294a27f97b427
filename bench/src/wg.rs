//! The WireGuard anchor: boringtun (userspace WireGuard over TUN, configured with `wg`) in a
//! hub-and-spoke like Raven's: one instance on each public-site node and one on the gateway
//! node, carrying the same pod-to-pod traffic Petrel carries:
//! `edge pod -> edge node -> boringtun -> WAN (NAT) -> boringtun on gw-1 -> Flannel VXLAN ->
//! cloud pod`, and site to site `edge pod -> boringtun -> gw-1's boringtun (decrypt, route,
//! encrypt) -> boringtun on the other edge -> edge pod`. Policy rules at preference 50 (before
//! Petrel's 100) send the pod CIDRs through the WireGuard devices while they exist; everything
//! is removed on drop.

use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

use petrel_e2e::lab::{ChildGuard, Lab};

const TABLE: &str = "51820";
const PREF: &str = "50";

/// boringtun on each edge node and on the gateway, with routes for `edge pod <-> cloud pod` and
/// between the edges' pods.
pub struct WireGuard<'a> {
    lab: &'a Lab,
    /// (node, device, process), the gateway's last.
    procs: Vec<(String, String, ChildGuard)>,
    rules: Vec<(String, Vec<String>)>,
}

impl WireGuard<'_> {
    /// Process ids of every boringtun instance.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|(_, _, p)| p.pid()).collect()
    }
}

fn keypair() -> Result<(String, String)> {
    let private = petrel_e2e::lab::cmd::run_checked(
        petrel_e2e::lab::cmd::command::<&str>("wg", &["genkey"]),
        None,
        Duration::from_secs(5),
    )
    .context("`wg genkey` (apt-get install wireguard-tools)")?
    .stdout
    .trim()
    .to_string();
    let public = petrel_e2e::lab::cmd::run_checked(
        petrel_e2e::lab::cmd::command("wg", &["pubkey"]),
        Some(&format!("{private}\n")),
        Duration::from_secs(5),
    )?
    .stdout
    .trim()
    .to_string();
    Ok((private, public))
}

/// Starts boringtun on each of `edges` (public-site nodes) and on the gateway, for traffic
/// between the pods of the edges and of `cloud` (a cloud node other than the gateway), and
/// between the edges' pods through the gateway. `threads`: boringtun's `--threads` (its default
/// is 4).
pub fn start<'a>(lab: &'a Lab, edges: &[&str], cloud: &str, threads: u32) -> Result<WireGuard<'a>> {
    let gw = lab.gateway().name.clone();
    let c = lab.try_node(cloud)?.clone();
    let g = lab.gateway().clone();
    let dir = lab.workdir().join("wg");
    std::fs::create_dir_all(&dir)?;
    let gw_wan = g
        .wan_ip
        .ok_or_else(|| anyhow!("the gateway has no WAN address"))?;
    let mut me = WireGuard {
        lab,
        procs: Vec::new(),
        rules: Vec::new(),
    };
    // Interface names are per lab (boringtun's UAPI sockets live in /var/run/wireguard, shared
    // by all network namespaces).
    let mut nodes: Vec<(String, String)> = edges
        .iter()
        .enumerate()
        .map(|(i, e)| (e.to_string(), format!("{}e{i}", lab.prefix())))
        .collect();
    nodes.push((gw.clone(), format!("{}g", lab.prefix())));
    let mut keys = Vec::new();
    for (node, dev) in &nodes {
        let (private, public) = keypair()?;
        let key = dir.join(format!("{dev}.key"));
        std::fs::write(&key, format!("{private}\n"))?;
        keys.push((key.display().to_string(), public));
        let mut cmd = lab.command(node, "boringtun-cli")?;
        cmd.args([
            dev.as_str(),
            "--foreground",
            "--disable-drop-privileges",
            "--threads",
            &threads.to_string(),
            "--log",
            "/dev/null",
        ]);
        let p = lab.spawn_command(&format!("boringtun-{node}"), cmd)?;
        me.procs.push((node.clone(), dev.clone(), p));
    }
    let sock = |dev: &str| format!("/var/run/wireguard/{dev}.sock");
    petrel_e2e::lab::wait_until("boringtun UAPI sockets", Duration::from_secs(10), || {
        Ok(nodes
            .iter()
            .all(|(_, dev)| std::path::Path::new(&sock(dev)).exists()))
    })
    .context("boringtun-cli did not start (cargo install boringtun-cli)")?;
    let gw_dev = nodes[nodes.len() - 1].1.clone();
    let (gw_key, gw_pub) = keys[keys.len() - 1].clone();
    let edge_cidrs: Vec<String> = edges
        .iter()
        .map(|e| lab.try_node(e).map(|n| n.pod_cidr.to_string()))
        .collect::<Result<_>>()?;
    // Each edge: one peer (the gateway) that owns the cloud pod CIDR and the other edges'.
    for (i, (node, dev)) in nodes[..edges.len()].iter().enumerate() {
        let mut allowed = vec![c.pod_cidr.to_string()];
        allowed.extend(
            edge_cidrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, c)| c.clone()),
        );
        lab.exec(
            node,
            &[
                "wg",
                "set",
                dev,
                "private-key",
                &keys[i].0,
                "listen-port",
                "51820",
                "peer",
                &gw_pub,
                "endpoint",
                &format!("{gw_wan}:51821"),
                "allowed-ips",
                &allowed.join(","),
                "persistent-keepalive",
                "1",
            ],
        )?;
    }
    // The gateway: one peer per edge, owning that edge's pod CIDR.
    lab.exec(
        &gw,
        &[
            "wg",
            "set",
            &gw_dev,
            "private-key",
            &gw_key,
            "listen-port",
            "51821",
        ],
    )?;
    for (i, cidr) in edge_cidrs.iter().enumerate() {
        lab.exec(
            &gw,
            &[
                "wg",
                "set",
                &gw_dev,
                "peer",
                &keys[i].1,
                "allowed-ips",
                cidr,
            ],
        )?;
    }
    // wg-quick's default MTU.
    for (node, dev) in &nodes {
        lab.exec(node, &["ip", "link", "set", dev, "mtu", "1420", "up"])?;
    }
    let add = |me: &mut WireGuard, node: &str, to: String, route: Vec<String>| -> Result<()> {
        let mut r = vec![
            "ip".to_string(),
            "route".into(),
            "replace".into(),
            to.clone(),
        ];
        r.extend(route);
        r.extend(["table".into(), TABLE.into()]);
        let rr: Vec<&str> = r.iter().map(String::as_str).collect();
        lab.exec(node, &rr)?;
        lab.exec(
            node,
            &[
                "ip", "rule", "add", "to", &to, "lookup", TABLE, "pref", PREF,
            ],
        )?;
        me.rules.push((node.to_string(), vec![to]));
        Ok(())
    };
    for (i, (node, dev)) in nodes[..edges.len()].iter().enumerate() {
        add(
            &mut me,
            node,
            c.pod_cidr.to_string(),
            vec!["dev".into(), dev.clone()],
        )?;
        for (j, cidr) in edge_cidrs.iter().enumerate() {
            if j != i {
                add(&mut me, node, cidr.clone(), vec!["dev".into(), dev.clone()])?;
            }
        }
    }
    for cidr in &edge_cidrs {
        add(
            &mut me,
            &gw,
            cidr.clone(),
            vec!["dev".into(), gw_dev.clone()],
        )?;
        // The cloud node sends the edge pod CIDRs to the gateway over Flannel's VXLAN.
        add(
            &mut me,
            cloud,
            cidr.clone(),
            vec![
                "via".into(),
                g.vtep_ip.to_string(),
                "dev".into(),
                "flannel.1".into(),
                "onlink".into(),
            ],
        )?;
    }
    // The handshakes (edges first: they are behind NAT), then a ping across each path.
    let mut targets: Vec<(String, std::net::Ipv4Addr)> =
        edges.iter().map(|e| (e.to_string(), c.pod_ip)).collect();
    if edges.len() > 1 {
        targets.push((edges[0].to_string(), lab.try_node(edges[1])?.pod_ip));
    }
    for (from, to) in targets {
        petrel_e2e::lab::wait_until(
            "a ping across the WireGuard path",
            Duration::from_secs(10),
            || {
                lab.ping_with(
                    &from,
                    to,
                    &petrel_e2e::lab::PingOpts {
                        count: 1,
                        reply_timeout: Duration::from_millis(500),
                        ..Default::default()
                    },
                )
                .map(|r| r.reachable())
            },
        )
        .with_context(|| format!("boringtun path {from} pod -> {to}"))?;
    }
    Ok(me)
}

impl Drop for WireGuard<'_> {
    fn drop(&mut self) {
        for (node, tos) in &self.rules {
            for to in tos {
                let _ = self.lab.exec(
                    node,
                    &["ip", "rule", "del", "to", to, "lookup", TABLE, "pref", PREF],
                );
            }
            let _ = self
                .lab
                .exec(node, &["ip", "route", "flush", "table", TABLE]);
        }
        for (_, dev, p) in &mut self.procs {
            let _ = p.kill();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{dev}.sock"));
        }
    }
}
