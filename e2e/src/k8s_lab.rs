//! Petrel in the network-namespace lab with its inventory, election and PKI in a real
//! kube-apiserver (1.20, `e2e/k8s/control-plane.sh`): the lab's nodes exist as Node objects
//! (labels, Flannel annotations, pod CIDRs, addresses, kubelet port), gateways run on gw-1 and
//! cloud-1 (which gets a WAN leg, 203.0.113.21, so agents can reach a second hub), the node role
//! on every cloud and Express Connect node, agents on every public-site node.
//!
//! The API server listens on 127.0.0.1 of the root namespace; [`ApiForwarder`] makes it
//! reachable as `https://127.0.0.1:6443` inside the lab namespaces that need it (the serving
//! certificate covers 127.0.0.1), so the gateways use an ordinary kubeconfig.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::apiserver::ControlPlane;
use crate::lab::{ChildGuard, Lab, PingOpts, SiteKind};
use crate::procs::{bin, wait_until};

pub const HUB_PORT: u16 = 7443;
pub const HUB_ADMIN: &str = "127.0.0.1:9470";
pub const AGENT_ADMIN: &str = "127.0.0.1:9471";
/// Where lab processes reach the API server.
pub const API_PORT: u16 = 6443;
pub const GATEWAY_LABEL: &str = "node-role.alibabacloud.com/cloud-gateway";
pub const NAMESPACE: &str = "kube-system";
/// cloud-1's WAN address (gw-1's is 203.0.113.10; gw-3 of `LabSpec::second_hub` is .11).
pub const CLOUD1_WAN: &str = "203.0.113.21";

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

/// Forwards TCP from `127.0.0.1:<port>` inside a namespace to `target` in the root namespace
/// (sockets keep the namespace they were created in, so one thread can join both).
pub struct ApiForwarder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiForwarder {
    pub fn start(ns: &str, port: u16, target: SocketAddr) -> Result<Self> {
        let listener = crate::lab::in_netns(ns, Duration::from_secs(5), move || {
            let l = TcpListener::bind(("127.0.0.1", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inner, _)) => {
                        let _ = inner.set_nonblocking(false);
                        let Ok(outer) = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                        else {
                            continue;
                        };
                        pipe(inner, outer);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        copy(a, b2);
        copy(b, a2);
    }
}

impl Drop for ApiForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The Node object of lab node `name`, as kubelet and flanneld would leave it. Edge nodes carry
/// the ACK labels (site-a) or the OpenYurt ones (site-b); x1 declares its Express Connect site
/// with an annotation. No node carries the gateway label: tests add it.
pub fn node_object(lab: &Lab, name: &str) -> Result<serde_json::Value> {
    let n = lab.try_node(name)?;
    let mut labels = serde_json::Map::new();
    let mut annotations = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), name.into());
    match (n.site_kind, n.site.as_str()) {
        (SiteKind::Cloud, _) => {}
        (_, "site-a") => {
            labels.insert("alibabacloud.com/is-edge-worker".into(), "true".into());
            labels.insert("alibabacloud.com/nodepool-id".into(), n.site.clone().into());
        }
        (kind, _) => {
            labels.insert("openyurt.io/is-edge-worker".into(), "true".into());
            labels.insert("apps.openyurt.io/nodepool".into(), n.site.clone().into());
            if kind == SiteKind::ExpressConnect {
                annotations.insert("petrel.io/site-network".into(), "express-connect".into());
            }
        }
    }
    annotations.insert(
        "flannel.alpha.coreos.com/backend-data".into(),
        format!("{{\"VNI\":1,\"VtepMAC\":\"{}\"}}", n.vtep_mac).into(),
    );
    annotations.insert(
        "flannel.alpha.coreos.com/backend-type".into(),
        "vxlan".into(),
    );
    annotations.insert(
        "flannel.alpha.coreos.com/kube-subnet-manager".into(),
        "true".into(),
    );
    annotations.insert(
        "flannel.alpha.coreos.com/public-ip".into(),
        n.public_ip.to_string().into(),
    );
    Ok(edge_like_node(
        name,
        labels,
        annotations,
        &n.pod_cidr.to_string(),
        &n.underlay_ip.to_string(),
        n.kubelet_port,
    ))
}

/// A Node object from parts.
pub fn edge_like_node(
    name: &str,
    labels: serde_json::Map<String, serde_json::Value>,
    annotations: serde_json::Map<String, serde_json::Value>,
    pod_cidr: &str,
    address: &str,
    kubelet_port: u16,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}}
        }
    })
}

/// A kube-apiserver for a lab, with kubectl (the cached 1.20 one) and a kubeconfig for the lab's
/// namespaces.
pub struct LabCluster {
    pub cp: ControlPlane,
    /// Root-namespace kubeconfig (what `control-plane.sh` wrote).
    pub kubeconfig: PathBuf,
    /// The same credentials with `server: https://127.0.0.1:6443` (through [`ApiForwarder`]).
    pub lab_kubeconfig: PathBuf,
    pub server: SocketAddr,
    forwarders: Vec<ApiForwarder>,
}

impl LabCluster {
    pub fn up(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cp = ControlPlane::up(dir, &[], None)?;
        let kubeconfig = PathBuf::from(cp.var("KUBECONFIG")?);
        let server_url = cp.var("K8S_SERVER")?;
        let server: SocketAddr = server_url
            .trim_start_matches("https://")
            .parse()
            .with_context(|| format!("K8S_SERVER {server_url}"))?;
        let text = std::fs::read_to_string(&kubeconfig)?;
        let lab_kubeconfig = dir.join("lab-kubeconfig");
        std::fs::write(
            &lab_kubeconfig,
            text.replace(&server_url, &format!("https://127.0.0.1:{API_PORT}")),
        )?;
        Ok(Self {
            cp,
            kubeconfig,
            lab_kubeconfig,
            server,
            forwarders: Vec::new(),
        })
    }

    /// Makes the API server reachable from namespace `ns`.
    pub fn expose_in(&mut self, ns: &str) -> Result<()> {
        self.forwarders
            .push(ApiForwarder::start(ns, API_PORT, self.server)?);
        Ok(())
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let kubectl = self
            .cp
            .var("K8S_KUBECTL")
            .unwrap_or_else(|_| "kubectl".into());
        let mut c = std::process::Command::new(kubectl);
        c.env("KUBECONFIG", &self.kubeconfig).args(args);
        let out = crate::lab::cmd::run(c, stdin, Duration::from_secs(30))?;
        if !out.success() {
            bail!("kubectl {args:?} failed: {}{}", out.stdout, out.stderr);
        }
        Ok(out.stdout)
    }

    pub fn create(&self, obj: &serde_json::Value) -> Result<()> {
        self.kubectl(&["create", "-f", "-"], Some(&obj.to_string()))?;
        Ok(())
    }

    pub fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&a, None)?)?)
    }

    /// Stops the API server and etcd (for the "API server gone" tests). Not reversible: `up`
    /// starts from an empty etcd.
    pub fn stop_apiserver(&self) -> Result<()> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("k8s/control-plane.sh");
        let mut c = std::process::Command::new(script);
        c.arg("down").arg(&self.cp.dir);
        let out = crate::lab::cmd::run(c, None, Duration::from_secs(60))?;
        if !out.success() {
            bail!("control-plane down failed: {}", out.stderr);
        }
        Ok(())
    }
}

/// Petrel's processes in a lab, in Kubernetes mode.
pub struct K8sLab<'a> {
    pub lab: &'a Lab,
    pub cluster: LabCluster,
    pub hooks: String,
    pub dir: PathBuf,
    pub hubs: BTreeMap<String, ChildGuard>,
    pub node_roles: Vec<(String, ChildGuard)>,
    pub agents: BTreeMap<String, ChildGuard>,
    /// Extra arguments of every hub and node role (e.g. `--hub-mode active-active`).
    pub extra_args: Vec<String>,
}

impl<'a> K8sLab<'a> {
    /// Starts the API server with the lab's Nodes (none labelled cloud-gateway), a gateway on
    /// gw-1 and on cloud-1, and the node roles. Agents start with [`K8sLab::start_agents`] once
    /// a hub serves.
    pub fn start(lab: &'a Lab, hooks: &str, dir: &Path) -> Result<Self> {
        Self::start_with(lab, hooks, dir, &["gw-1", "cloud-1"], &[])
    }

    /// [`K8sLab::start`] with gateways on `hubs` and `extra` arguments for every hub and node
    /// role.
    pub fn start_with(
        lab: &'a Lab,
        hooks: &str,
        dir: &Path,
        hubs: &[&str],
        extra: &[&str],
    ) -> Result<Self> {
        let mut cluster = LabCluster::up(&dir.join("k8s"))?;
        for n in lab
            .nodes()
            .iter()
            .filter(|n| n.site_kind != SiteKind::Public)
        {
            cluster.expose_in(&n.ns)?;
        }
        // cloud-1's WAN leg, like gw-1's.
        let c1 = lab.node("cloud-1").ns.clone();
        crate::lab::cmd::run_checked(
            crate::lab::cmd::command(
                "ip",
                &[
                    "link",
                    "add",
                    "name",
                    "p-cloud-1",
                    "netns",
                    lab.wan_ns(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "wan0",
                    "netns",
                    &c1,
                ],
            ),
            None,
            Duration::from_secs(10),
        )?;
        lab.exec(
            "wan",
            &["ip", "link", "set", "p-cloud-1", "master", "br0", "up"],
        )?;
        lab.exec(
            "cloud-1",
            &[
                "ip",
                "addr",
                "add",
                &format!("{CLOUD1_WAN}/24"),
                "dev",
                "wan0",
            ],
        )?;
        lab.exec("cloud-1", &["ip", "link", "set", "wan0", "up"])?;
        for n in lab.nodes() {
            cluster.create(&node_object(lab, &n.name)?)?;
        }
        let mut me = Self {
            lab,
            cluster,
            hooks: hooks.into(),
            dir: dir.to_path_buf(),
            hubs: BTreeMap::new(),
            node_roles: Vec::new(),
            agents: BTreeMap::new(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        for gw in hubs {
            me.start_hub(gw)?;
        }
        let gw = bin("petrel-gateway")?;
        let kc = path_str(&me.cluster.lab_kubeconfig)?.to_string();
        for n in lab
            .nodes()
            .iter()
            .filter(|n| n.site_kind != SiteKind::Public)
        {
            let mut argv = vec![
                path_str(&gw)?,
                "node",
                "--node-name",
                &n.name,
                "--inventory-source",
                "kubernetes",
                "--kubeconfig",
                &kc,
                "--hooks",
                hooks,
            ];
            argv.extend(me.extra_args.iter().map(String::as_str));
            let g = lab.spawn(&n.name, &argv)?;
            me.node_roles.push((n.name.clone(), g));
        }
        Ok(me)
    }

    /// The WAN address of a gateway node's hub.
    pub fn hub_public(&self, node: &str) -> String {
        match node {
            "cloud-1" => CLOUD1_WAN.to_string(),
            "gw-1" => self.lab.gateway_public_ip().to_string(),
            other => self
                .lab
                .try_node(other)
                .ok()
                .and_then(|n| n.wan_ip)
                .unwrap_or_else(|| self.lab.gateway_public_ip())
                .to_string(),
        }
    }

    /// (Re)starts the gateway (`run`) on `node`.
    pub fn start_hub(&mut self, node: &str) -> Result<()> {
        let gw = bin("petrel-gateway")?;
        let kc = path_str(&self.cluster.lab_kubeconfig)?.to_string();
        let state = self.dir.join(format!("hub-{node}"));
        let advertise = format!("{}:{HUB_PORT}", self.hub_public(node));
        let listen = format!("0.0.0.0:{HUB_PORT}");
        let mut argv: Vec<&str> = vec![
            path_str(&gw)?,
            "run",
            "--inventory-source",
            "kubernetes",
            "--kubeconfig",
            &kc,
            "--node-name",
            node,
            "--listen",
            &listen,
            "--advertise",
            &advertise,
            "--admin-addr",
            HUB_ADMIN,
            "--state-dir",
            path_str(&state)?,
        ];
        argv.extend(self.extra_args.iter().map(String::as_str));
        let mut g = self.lab.spawn(node, &argv)?;
        g.wait_for_log("hub listening", Duration::from_secs(20))
            .with_context(|| format!("hub on {node}"))?;
        self.hubs.insert(node.into(), g);
        Ok(())
    }

    pub fn label_gateway(&self, node: &str, on: bool) -> Result<()> {
        let arg = if on {
            format!("{GATEWAY_LABEL}=")
        } else {
            format!("{GATEWAY_LABEL}-")
        };
        self.cluster.kubectl(&["label", "node", node, &arg], None)?;
        Ok(())
    }

    fn json(&self, node: &str, bin_name: &str, admin: &str) -> Result<serde_json::Value> {
        let b = bin(bin_name)?;
        let out = self.lab.exec(
            node,
            &[path_str(&b)?, "status", "--json", "--admin-addr", admin],
        )?;
        Ok(serde_json::from_str(&out.stdout)?)
    }

    pub fn hub_status(&self, node: &str) -> Result<serde_json::Value> {
        self.json(node, "petrel-gateway", HUB_ADMIN)
    }

    /// `active`, `standby`, `not-serving` or `starting`.
    pub fn hub_role(&self, node: &str) -> Option<String> {
        self.hub_status(node).ok()?["kubernetes"]["role"]
            .as_str()
            .map(str::to_string)
    }

    /// Active-active: the hubs the node role on `node` sends no site to (no live Lease, or no
    /// answer to its relay probes).
    pub fn hubs_down(&self, node: &str) -> Result<serde_json::Value> {
        Ok(self.json(node, "petrel-gateway", crate::lab_petrel::NODE_ADMIN)?["hubs_down"].clone())
    }

    /// Cuts namespace `node` off from the API server (`on`), or reconnects it: every packet to
    /// or from the forwarded API port is dropped, so open watches go silent and calls time out.
    pub fn cut_off_api(&self, node: &str, on: bool) -> Result<()> {
        if on {
            for cmd in [
                "add table inet petrel_api".to_string(),
                "add chain inet petrel_api out { type filter hook output priority 0 ; }"
                    .to_string(),
                format!("add rule inet petrel_api out tcp dport {API_PORT} drop"),
                format!("add rule inet petrel_api out tcp sport {API_PORT} drop"),
            ] {
                self.lab.exec(node, &["nft", &cmd])?;
            }
        } else {
            self.lab
                .exec(node, &["nft", "delete table inet petrel_api"])?;
        }
        Ok(())
    }

    pub fn agent_status(&self, node: &str) -> Result<serde_json::Value> {
        self.json(node, "petrel-edge-agent", AGENT_ADMIN)
    }

    /// Agents connected to the hub on `hub`.
    pub fn hub_agents(&self, hub: &str) -> Vec<String> {
        self.hub_status(hub)
            .ok()
            .and_then(|s| {
                Some(
                    s["agents"]
                        .as_array()?
                        .iter()
                        .filter_map(|a| a["node"].as_str().map(str::to_string))
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    /// Frames a hub switched, all paths together.
    pub fn frames_via(&self, hub: &str) -> u64 {
        self.hub_status(hub)
            .ok()
            .and_then(|s| {
                Some(
                    s["dataplane"]["frames_forwarded"]
                        .as_object()?
                        .values()
                        .filter_map(|v| v.as_u64())
                        .sum(),
                )
            })
            .unwrap_or(0)
    }

    /// Creates a join token in the cluster (`token create` in Kubernetes mode) and returns the
    /// printed join arguments.
    pub fn join_args(&self, node: &str, server: &str) -> Result<Vec<String>> {
        let gw = bin("petrel-gateway")?;
        let out = crate::lab::cmd::run_checked(
            crate::lab::cmd::command(
                path_str(&gw)?,
                &[
                    "token",
                    "create",
                    "--node",
                    node,
                    "--inventory-source",
                    "kubernetes",
                    "--kubeconfig",
                    path_str(&self.cluster.kubeconfig)?,
                    "--server",
                    server,
                ],
            ),
            None,
            Duration::from_secs(20),
        )?;
        let join = out
            .stdout
            .lines()
            .find(|l| l.starts_with("petrel-edge-agent join"))
            .ok_or_else(|| anyhow!("no join command: {}", out.stdout))?;
        // The printed command leaves the token to the environment (`export PETREL_JOIN_TOKEN`);
        // the lab runs it through `ip netns exec`, so it passes it as the flag instead.
        let (token, _) = crate::procs::parse_token_create(&out.stdout)?;
        let mut args: Vec<String> = join
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect();
        args.extend(["--token".to_string(), token]);
        Ok(args)
    }

    /// Enrols and starts the agent of edge node `node` inside namespace `ns` (its own, or
    /// another edge namespace with `--hooks none`).
    pub fn start_agent_in(&mut self, node: &str, ns: &str, hooks: &str, admin: &str) -> Result<()> {
        let agent = bin("petrel-edge-agent")?;
        let server = format!("{}:{HUB_PORT}", self.lab.gateway_public_ip());
        let state = self.dir.join(format!("agent-{node}"));
        if !state.join("node.pem").exists() {
            let mut args = self.join_args(node, &server)?;
            args.extend(["--state-dir".to_string(), path_str(&state)?.to_string()]);
            let mut cmd: Vec<&str> = vec![path_str(&agent)?];
            cmd.extend(args.iter().map(String::as_str));
            self.lab
                .exec(ns, &cmd)
                .with_context(|| format!("join {node}"))?;
        }
        let g = self.lab.spawn(
            ns,
            &[
                path_str(&agent)?,
                "run",
                "--state-dir",
                path_str(&state)?,
                "--admin-addr",
                admin,
                "--hooks",
                hooks,
            ],
        )?;
        self.agents.insert(node.into(), g);
        Ok(())
    }

    /// Enrols and starts every public-site agent, and waits until each is connected to `hub`
    /// and has applied its routes at the site MTU.
    pub fn start_agents(&mut self, hub: &str) -> Result<()> {
        let names: Vec<String> = self
            .lab
            .nodes()
            .iter()
            .filter(|n| n.site_kind == SiteKind::Public)
            .map(|n| n.name.clone())
            .collect();
        let hooks = self.hooks.clone();
        for n in &names {
            self.start_agent_in(n, n, &hooks, AGENT_ADMIN)?;
        }
        self.wait_agents(hub, &names, Duration::from_secs(20))
    }

    /// Waits until every agent in `names` is connected to `hub` with routes at the site MTU.
    pub fn wait_agents(&self, hub: &str, names: &[String], timeout: Duration) -> Result<()> {
        wait_until(
            timeout,
            "agents connected with routes at the site MTU",
            || {
                let connected = self.hub_agents(hub);
                let ok = names.iter().all(|n| {
                    connected.contains(n)
                        && self.agent_status(n).ok().is_some_and(|s| {
                            s["dataplane"]["peers"].as_u64().unwrap_or(0) > 0
                                && s["dataplane"]["mtu"].as_u64() == Some(1380)
                        })
                });
                ok.then_some(())
            },
        )
        .map_err(|e| anyhow!("{e}\n{}", self.logs()))
    }

    /// Time since `start` until `from`'s pod gets an echo reply from `to`'s pod that crossed
    /// the hub on `via` (150 ms probes; `via` = `None`: any path), at most `limit`.
    pub fn time_to_reach(
        &self,
        from: &str,
        to: &str,
        via: Option<&str>,
        start: Instant,
        limit: Duration,
    ) -> Result<Duration> {
        let ip = self.lab.node(to).pod_ip;
        let probe = PingOpts {
            count: 1,
            reply_timeout: Duration::from_millis(150),
            ..PingOpts::default()
        };
        loop {
            let before = via.map(|h| self.frames_via(h));
            if self.lab.ping_with(from, ip, &probe)?.reachable() {
                let at = start.elapsed();
                match (via, before) {
                    (Some(h), Some(b)) if self.frames_via(h) <= b => {}
                    _ => return Ok(at),
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "{from} -> {to} not restored within {limit:?}\n{}",
                    self.logs()
                );
            }
        }
    }

    /// The last log lines of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (n, g) in &self.hubs {
            out.push_str(&format!("--- hub {n}:\n{}\n", g.log_tail(25)));
        }
        for (n, g) in &self.node_roles {
            out.push_str(&format!("--- node role {n}:\n{}\n", g.log_tail(10)));
        }
        for (n, g) in &self.agents {
            out.push_str(&format!("--- agent {n}:\n{}\n", g.log_tail(12)));
        }
        out
    }

    /// SIGTERM to everything (agents, node roles, hubs), each must exit cleanly.
    pub fn stop(mut self) -> Result<()> {
        let mut failures = Vec::new();
        let mut all: Vec<(String, &mut ChildGuard)> = Vec::new();
        for (n, g) in self.agents.iter_mut() {
            all.push((format!("agent {n}"), g));
        }
        for (n, g) in self.node_roles.iter_mut() {
            all.push((format!("node role {n}"), g));
        }
        for (n, g) in self.hubs.iter_mut() {
            all.push((format!("hub {n}"), g));
        }
        for (name, g) in all {
            match g.terminate(Duration::from_secs(15)) {
                Ok(s) if s.success() => {}
                Ok(s) => failures.push(format!("{name} exited {s}: {}", g.log_tail(10))),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        if !failures.is_empty() {
            bail!("unclean stop: {}", failures.join("; "));
        }
        Ok(())
    }
}
