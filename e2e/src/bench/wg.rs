//! The WireGuard anchor: boringtun (userspace WireGuard over TUN, configured with `wg`) between
//! a public-site node and the gateway node, carrying the same pod-to-pod traffic Petrel carries:
//! `edge pod -> edge node -> boringtun -> WAN (NAT) -> boringtun on gw-1 -> Flannel VXLAN ->
//! cloud pod`. Policy rules at preference 50 (before Petrel's 100) send the pod CIDRs through
//! the WireGuard devices while they exist; everything is removed on drop.

use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

use crate::lab::{ChildGuard, Lab};

const TABLE: &str = "51820";
const PREF: &str = "50";

/// boringtun on `edge` and on the gateway, with routes for `edge pod <-> cloud pod`.
pub struct WireGuard<'a> {
    lab: &'a Lab,
    pub edge_proc: ChildGuard,
    pub gw_proc: ChildGuard,
    edge: String,
    cloud: String,
    edge_dev: String,
    gw_dev: String,
    rules: Vec<(String, Vec<String>)>,
}

impl WireGuard<'_> {
    /// Process ids of both boringtun instances.
    pub fn pids(&self) -> Vec<u32> {
        vec![self.edge_proc.pid(), self.gw_proc.pid()]
    }
}

fn keypair() -> Result<(String, String)> {
    let private = crate::lab::cmd::run_checked(
        crate::lab::cmd::command::<&str>("wg", &["genkey"]),
        None,
        Duration::from_secs(5),
    )
    .context("`wg genkey` (apt-get install wireguard-tools)")?
    .stdout
    .trim()
    .to_string();
    let public = crate::lab::cmd::run_checked(
        crate::lab::cmd::command("wg", &["pubkey"]),
        Some(&format!("{private}\n")),
        Duration::from_secs(5),
    )?
    .stdout
    .trim()
    .to_string();
    Ok((private, public))
}

/// Starts boringtun on node `edge` (a public-site node) and on the gateway, for traffic between
/// the pods of `edge` and `cloud` (a cloud node other than the gateway). `threads`: boringtun's
/// `--threads` (its default is 4).
pub fn start<'a>(lab: &'a Lab, edge: &str, cloud: &str, threads: u32) -> Result<WireGuard<'a>> {
    let gw = lab.gateway().name.clone();
    let (e, c) = (lab.try_node(edge)?.clone(), lab.try_node(cloud)?.clone());
    let g = lab.gateway().clone();
    // Interface names are per lab (boringtun's UAPI sockets live in /var/run/wireguard, shared
    // by all network namespaces).
    let edge_dev = format!("{}e", lab.prefix());
    let gw_dev = format!("{}g", lab.prefix());
    let dir = lab.workdir().join("wg");
    std::fs::create_dir_all(&dir)?;
    let (e_priv, e_pub) = keypair()?;
    let (g_priv, g_pub) = keypair()?;
    let (e_key, g_key) = (dir.join("edge.key"), dir.join("gw.key"));
    std::fs::write(&e_key, format!("{e_priv}\n"))?;
    std::fs::write(&g_key, format!("{g_priv}\n"))?;
    let spawn = |node: &str, dev: &str| -> Result<ChildGuard> {
        let mut cmd = lab.command(node, "boringtun-cli")?;
        cmd.args([
            dev,
            "--foreground",
            "--disable-drop-privileges",
            "--threads",
            &threads.to_string(),
            "--log",
            "/dev/null",
        ]);
        lab.spawn_command(&format!("boringtun-{node}"), cmd)
    };
    let edge_proc = spawn(edge, &edge_dev)?;
    let gw_proc = spawn(&gw, &gw_dev)?;
    let sock = |dev: &str| format!("/var/run/wireguard/{dev}.sock");
    crate::lab::wait_until("boringtun UAPI sockets", Duration::from_secs(10), || {
        Ok(std::path::Path::new(&sock(&edge_dev)).exists()
            && std::path::Path::new(&sock(&gw_dev)).exists())
    })
    .context("boringtun-cli did not start (cargo install boringtun-cli)")?;
    let gw_wan = g
        .wan_ip
        .ok_or_else(|| anyhow!("the gateway has no WAN address"))?;
    let s = |p: &std::path::Path| p.display().to_string();
    lab.exec(
        edge,
        &[
            "wg",
            "set",
            &edge_dev,
            "private-key",
            &s(&e_key),
            "listen-port",
            "51820",
            "peer",
            &g_pub,
            "endpoint",
            &format!("{gw_wan}:51821"),
            "allowed-ips",
            &c.pod_cidr.to_string(),
            "persistent-keepalive",
            "1",
        ],
    )?;
    lab.exec(
        &gw,
        &[
            "wg",
            "set",
            &gw_dev,
            "private-key",
            &s(&g_key),
            "listen-port",
            "51821",
            "peer",
            &e_pub,
            "allowed-ips",
            &e.pod_cidr.to_string(),
        ],
    )?;
    let mut me = WireGuard {
        lab,
        edge_proc,
        gw_proc,
        edge: edge.to_string(),
        cloud: cloud.to_string(),
        edge_dev: edge_dev.clone(),
        gw_dev: gw_dev.clone(),
        rules: Vec::new(),
    };
    // wg-quick's default MTU.
    for (node, dev) in [(edge, &edge_dev), (gw.as_str(), &gw_dev)] {
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
    add(
        &mut me,
        edge,
        c.pod_cidr.to_string(),
        vec!["dev".into(), edge_dev.clone()],
    )?;
    add(
        &mut me,
        &gw,
        e.pod_cidr.to_string(),
        vec!["dev".into(), gw_dev.clone()],
    )?;
    // The cloud node sends the edge pod CIDR to the gateway over Flannel's VXLAN.
    add(
        &mut me,
        cloud,
        e.pod_cidr.to_string(),
        vec![
            "via".into(),
            g.vtep_ip.to_string(),
            "dev".into(),
            "flannel.1".into(),
            "onlink".into(),
        ],
    )?;
    // The handshake (edge first: it is behind NAT), then a ping across.
    crate::lab::wait_until(
        "a ping across the WireGuard path",
        Duration::from_secs(10),
        || {
            lab.ping_with(
                edge,
                c.pod_ip,
                &crate::lab::PingOpts {
                    count: 1,
                    reply_timeout: Duration::from_millis(500),
                    ..Default::default()
                },
            )
            .map(|r| r.reachable())
        },
    )
    .with_context(|| format!("boringtun path {} pod -> {} pod", me.edge, me.cloud))?;
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
        let _ = self.edge_proc.kill();
        let _ = self.gw_proc.kill();
        for dev in [&self.edge_dev, &self.gw_dev] {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{dev}.sock"));
        }
    }
}
