//! Petrel's network-namespace lab: a Kubernetes edge cluster on Flannel's VXLAN backend, built
//! from namespaces, veths and bridges, with NAT'd public edge sites, an Express Connect site, a
//! WAN, and helpers to probe it.
//!
//! ```text
//!                          VPC 192.168.0.0/24 (L2: bridge br0 in ns `vpc`)
//!   cloud-1 .11 ----+       ns `vpc` is also the VPC router: 192.168.0.1 on br0,
//!   gw-1    .12 ----+-br0   192.168.10.1 on `to-x` (routed leased line, no NAT) ---- x1 192.168.10.2
//!  [gw-3    .13 ----+]      no default route: the VPC cannot reach the edge LANs      (site-x, express-connect)
//!   apiserver .100 -+
//!   gw-1 wan0 203.0.113.10 ----+  [gw-3 wan0 203.0.113.11]
//!                              |  WAN 203.0.113.0/24 (bridge br0 in ns `wan`, 203.0.113.1)
//!        rt-a wan0 203.0.113.2 +  (rebinds to .102)     rt-b wan0 203.0.113.3 (rebinds to .103)
//!        masquerade, WAN->LAN ct established,related     same
//!        lan0 10.0.1.1/24                                lan0 10.0.2.1/24
//!          edge-a1 10.0.1.2   edge-a2 10.0.1.3             edge-b1 10.0.2.2
//!
//!       [rt-c wan0 203.0.113.4 (rebinds to .104), `masquerade random`, same firewall
//!        lan0 10.0.3.1/24
//!          edge-c1 10.0.3.2]
//! ```
//!
//! Bracketed parts are optional: `gw-3` with [`LabSpec::second_hub`], site-c (`rt-c`,
//! `edge-c1`) with [`LabSpec::third_site`]. `rt-a` and `rt-b` masquerade port-preserving (a
//! flow keeps its source port when free: hole punching works); `rt-c` picks a new source port
//! per destination ([`NatMapping::RandomPorts`], like a symmetric NAT: hole punching fails).
//!
//! | node    | site   | kind            | eth0 (= flannel public-ip) | pod CIDR      | pod IP     | VtepMAC           |
//! |---------|--------|-----------------|----------------------------|---------------|------------|-------------------|
//! | cloud-1 | vpc    | cloud           | 192.168.0.11               | 10.244.1.0/24 | 10.244.1.2 | 02:fa:00:00:00:01 |
//! | gw-1    | vpc    | cloud (gateway) | 192.168.0.12, wan0 203.0.113.10 | 10.244.2.0/24 | 10.244.2.2 | 02:fa:00:00:00:02 |
//! | edge-a1 | site-a | public          | 10.0.1.2                   | 10.244.3.0/24 | 10.244.3.2 | 02:fa:00:00:00:03 |
//! | edge-a2 | site-a | public          | 10.0.1.3                   | 10.244.4.0/24 | 10.244.4.2 | 02:fa:00:00:00:04 |
//! | edge-b1 | site-b | public          | 10.0.2.2                   | 10.244.5.0/24 | 10.244.5.2 | 02:fa:00:00:00:05 |
//! | x1      | site-x | express-connect | 192.168.10.2               | 10.244.6.0/24 | 10.244.6.2 | 02:fa:00:00:00:06 |
//! | gw-3 (optional) | vpc | cloud (gateway) | 192.168.0.13, wan0 203.0.113.11 | 10.244.7.0/24 | 10.244.7.2 | 02:fa:00:00:00:07 |
//! | edge-c1 (optional) | site-c | public  | 10.0.3.2                   | 10.244.8.0/24 | 10.244.8.2 | 02:fa:00:00:00:08 |
//!
//! Every node is programmed exactly as flanneld's VXLAN backend does it: `flannel.1` (VNI 1,
//! dstport 8472, nolearning, MTU underlay-50, local = public-ip, dev eth0) with
//! `<podCIDR>.0/32`, and for **every** other node, reachable or not, a permanent neighbour entry,
//! a permanent FDB entry pointing at the peer's public-ip and an onlink route; plus `cni0`
//! (`<podCIDR>.1/24`) and one pod namespace (`<node>-pod`, veth MTU 1450, default via cni0).
//! Edge nodes advertise their *private* LAN address as public-ip (what flanneld does behind
//! NAT), which is why cloud->edge and edge->other-site VXLAN fail until Petrel exists.
//!
//! Namespaces are named `pt<4 hex>-<name>`; nothing is created in the root namespace (veth
//! ends are created directly inside their namespaces). [`Lab`]'s `Drop` kills every process
//! inside its namespaces and deletes them, also when a test panics; [`Lab::cleanup_stale`]
//! removes what a killed test process left behind (see [`netns`] for the registry that tells
//! live labs from dead ones). Helpers that run Rust code inside a namespace (TCP/UDP probes)
//! use a thread that `setns(2)`s into it; commands run through `ip netns exec`.
//!
//! Naming rule for helper arguments: `exec`/`spawn`/`snapshot`-style helpers take a
//! *namespace*, full (`pt1a2b-rt-a`) or short (`rt-a`, `edge-a1`, `edge-a1-pod`); the pod
//! helpers (`ping`, `tcp_transfer`, ...) take an *endpoint*: a node name means that node's
//! pod, anything else is a namespace as above.

pub mod build;
pub mod cmd;
pub mod layout;
pub mod netns;
pub mod snapshot;
pub mod traffic;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};

pub use cmd::{never_within, wait_until, ChildGuard, CmdOutput};
pub use layout::{Host, Ipv4Cidr, LabSpec, Layout, NatMapping, Node, Router, Site, SiteKind};
pub use netns::{in_netns, is_root, require_root, spawn_in_netns, LabStatus, NetnsTask};
pub use snapshot::NodeNetState;
pub use traffic::{
    vxlan_icmp_echo, LinkStats, PingOpts, PingReport, TransferOpts, TransferReport, UdpExchange,
};

use cmd::{command, run, run_checked, DEFAULT_TIMEOUT};

/// Result of [`Lab::rebind_site_nat`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatRebind {
    /// Site whose router changed address.
    pub site: String,
    /// Masquerade address before.
    pub old: Ipv4Addr,
    /// Masquerade address now.
    pub new: Ipv4Addr,
}

/// A built lab. Dropping it tears everything down (unless [`Lab::keep`] was called).
pub struct Lab {
    layout: Layout,
    workdir: PathBuf,
    persistent: bool,
    torn_down: bool,
    nat: Mutex<HashMap<String, Ipv4Addr>>,
    spawn_seq: AtomicU32,
    build_time: Duration,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.layout.prefix)
            .field("persistent", &self.persistent)
            .finish()
    }
}

fn random_u16() -> u16 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    (h.finish() & 0xffff) as u16
}

fn pick_prefix() -> Result<String> {
    for _ in 0..64 {
        let p = format!("{}{:04x}", layout::PREFIX_STEM, random_u16());
        if netns::claim_prefix(&p, false)? {
            return Ok(p);
        }
    }
    bail!("could not find a free lab prefix in 64 tries; run `petrel-lab cleanup`")
}

impl Lab {
    /// Builds the lab described by `spec` (about a second). On error everything created so far
    /// is removed again.
    pub fn build(spec: LabSpec) -> Result<Lab> {
        require_root()?;
        Layout::new(&format!("{}0000", layout::PREFIX_STEM), &spec).context("invalid LabSpec")?;
        let start = Instant::now();
        let prefix = match &spec.prefix {
            Some(p) => {
                if !layout::is_valid_prefix(p) {
                    bail!(
                        "lab prefix {p:?} is not `{}` + 4 lowercase hex digits",
                        layout::PREFIX_STEM
                    );
                }
                if !netns::claim_prefix(p, false)? {
                    bail!("lab prefix {p} is in use (see `petrel-lab list`)");
                }
                p.clone()
            }
            None => pick_prefix()?,
        };
        let layout = match Layout::new(&prefix, &spec) {
            Ok(l) => l,
            Err(e) => {
                let _ = netns::destroy_lab(&prefix);
                return Err(e);
            }
        };
        // From here on, dropping `lab` removes whatever exists.
        let mut lab = Lab {
            nat: Mutex::new(
                layout
                    .routers
                    .iter()
                    .map(|r| (r.name.clone(), r.wan_ip))
                    .collect(),
            ),
            workdir: netns::workdir(&prefix),
            layout,
            persistent: false,
            torn_down: false,
            spawn_seq: AtomicU32::new(0),
            build_time: Duration::ZERO,
        };
        std::fs::create_dir_all(&lab.workdir)
            .with_context(|| format!("creating {}", lab.workdir.display()))?;
        build::build(&lab.layout).with_context(|| format!("building lab {prefix}"))?;
        lab.build_time = start.elapsed();
        Ok(lab)
    }

    /// Removes labs left behind by test processes that died (owner gone, not kept on purpose),
    /// returning their prefixes. Live labs of other tests, in this or other processes, and labs
    /// started with `petrel-lab up` are left alone. Call it at the start of every test.
    pub fn cleanup_stale() -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        for lab in netns::list_labs()? {
            if lab.is_stale() {
                match netns::destroy_lab(&lab.prefix) {
                    Ok(()) => removed.push(lab.prefix),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
        if !errors.is_empty() {
            bail!("cleaning up stale labs: {}", errors.join("; "));
        }
        Ok(removed)
    }

    /// Every lab on this machine, live, kept or stale.
    pub fn list() -> Result<Vec<LabStatus>> {
        netns::list_labs()
    }

    /// Tears down lab `prefix` whoever owns it.
    pub fn destroy(prefix: &str) -> Result<()> {
        if !layout::is_valid_prefix(prefix) {
            bail!("{prefix:?} is not a lab prefix");
        }
        netns::destroy_lab(prefix)
    }

    /// Leaves the lab up after this value is dropped (for `petrel-lab up`); returns its prefix.
    /// Remove it later with [`Lab::destroy`].
    pub fn keep(mut self) -> Result<String> {
        netns::mark_persistent(self.prefix())?;
        self.persistent = true;
        Ok(self.prefix().to_owned())
    }

    /// Tears down now, reporting errors (`Drop` can only print them).
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        netns::destroy_lab(self.prefix())
    }

    // ---- accessors ------------------------------------------------------------------------

    /// `pt` + 4 hex digits; every namespace name starts with `<prefix>-`.
    pub fn prefix(&self) -> &str {
        &self.layout.prefix
    }

    /// The full address plan.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Work directory (`/run/petrel-lab/<prefix>`): logs of spawned processes; removed on
    /// teardown.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// How long [`Lab::build`] took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// All nodes, in index order.
    pub fn nodes(&self) -> &[Node] {
        &self.layout.nodes
    }

    /// All node names.
    pub fn node_names(&self) -> Vec<&str> {
        self.layout.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    /// The node called `name`; panics with the list of nodes if there is none (test helper).
    pub fn node(&self, name: &str) -> &Node {
        match self.try_node(name) {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        }
    }

    /// The node called `name`.
    pub fn try_node(&self, name: &str) -> Result<&Node> {
        self.layout.node(name).ok_or_else(|| {
            anyhow!(
                "lab {} has no node {name:?} (nodes: {})",
                self.prefix(),
                self.node_names().join(", ")
            )
        })
    }

    /// All sites.
    pub fn sites(&self) -> &[Site] {
        &self.layout.sites
    }

    /// The site called `name`.
    pub fn site(&self, name: &str) -> Result<&Site> {
        self.layout
            .site(name)
            .ok_or_else(|| anyhow!("lab {} has no site {name:?}", self.prefix()))
    }

    /// NAT routers.
    pub fn routers(&self) -> &[Router] {
        &self.layout.routers
    }

    /// The NAT router of public site `site` (or the router called `site`).
    pub fn router(&self, site: &str) -> Result<&Router> {
        self.layout
            .router(site)
            .ok_or_else(|| anyhow!("lab {} has no NAT router for {site:?}", self.prefix()))
    }

    /// The API server stand-in (a host in the VPC).
    pub fn apiserver(&self) -> &Host {
        &self.layout.apiserver
    }

    /// The node labelled cloud-gateway (`gw-1`).
    pub fn gateway(&self) -> &Node {
        match self.layout.gateway() {
            Some(g) => g,
            None => panic!("layout has no gateway node"),
        }
    }

    /// gw-1's public (WAN) address, the one edge sites dial.
    pub fn gateway_public_ip(&self) -> Ipv4Addr {
        self.gateway().wan_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// The WAN ("internet") namespace.
    pub fn wan_ns(&self) -> &str {
        &self.layout.wan_ns
    }

    /// The VPC switch/router namespace.
    pub fn vpc_ns(&self) -> &str {
        &self.layout.vpc_ns
    }

    /// Every namespace of the lab.
    pub fn namespaces(&self) -> Vec<String> {
        self.layout.namespaces()
    }

    /// Resolves a namespace name, full or short (`rt-a`, `edge-a1`, `edge-a1-pod`).
    pub fn ns(&self, name: &str) -> Result<String> {
        let all = self.layout.namespaces();
        if all.iter().any(|n| n == name) {
            return Ok(name.to_owned());
        }
        let full = format!("{}-{name}", self.prefix());
        if all.contains(&full) {
            return Ok(full);
        }
        let short: Vec<&str> = all.iter().map(|n| &n[self.prefix().len() + 1..]).collect();
        bail!(
            "{name:?} is not a namespace of lab {} (known: {})",
            self.prefix(),
            short.join(", ")
        )
    }

    /// Resolves an endpoint: a node name means its pod's namespace, anything else a namespace.
    pub fn endpoint_ns(&self, name: &str) -> Result<String> {
        match self.layout.node(name) {
            Some(n) => Ok(n.pod_ns.clone()),
            None => self.ns(name),
        }
    }

    // ---- commands -------------------------------------------------------------------------

    /// `ip netns exec <ns> cmd...`: a [`Command`] to adjust and run or spawn.
    pub fn command(&self, ns: &str, program: &str) -> Result<Command> {
        let ns = self.ns(ns)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns, program]);
        Ok(c)
    }

    /// Runs `cmd` in `ns` (30 s limit); a non-zero exit is an error carrying the command line,
    /// status, stderr and stdout.
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Result<CmdOutput> {
        self.exec_timeout(ns, cmd, DEFAULT_TIMEOUT)
    }

    /// [`Lab::exec`] with an explicit time limit.
    pub fn exec_timeout(&self, ns: &str, cmd: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let (program, args) = cmd.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut c = self.command(ns, program)?;
        c.args(args);
        run_checked(c, None, timeout)
    }

    /// Runs `cmd` in `ns` (30 s limit) and returns its output whatever the exit status.
    pub fn exec_unchecked(&self, ns: &str, cmd: &[&str]) -> Result<CmdOutput> {
        let (program, args) = cmd.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut c = self.command(ns, program)?;
        c.args(args);
        run(c, None, DEFAULT_TIMEOUT)
    }

    /// Starts `cmd` in `ns` in the background. The guard kills it (and its process group) when
    /// dropped; output goes to a log in the lab's work directory.
    pub fn spawn(&self, ns: &str, cmd: &[&str]) -> Result<ChildGuard> {
        let (program, args) = cmd.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut c = self.command(ns, program)?;
        c.args(args);
        let label = format!(
            "{}-{}",
            self.ns(ns)?,
            Path::new(program)
                .file_name()
                .map_or("cmd".into(), |f| f.to_string_lossy())
        );
        self.spawn_command(&label, c)
    }

    /// Starts an arbitrary command (e.g. from [`Lab::command`] with extra env) with its log in
    /// the work directory, named after `label`.
    pub fn spawn_command(&self, label: &str, cmd: Command) -> Result<ChildGuard> {
        let seq = self.spawn_seq.fetch_add(1, Ordering::Relaxed);
        let safe: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        ChildGuard::spawn(
            cmd,
            self.workdir
                .join("logs")
                .join(format!("{seq:03}-{safe}.log")),
        )
    }

    // ---- traffic --------------------------------------------------------------------------

    /// Whether `from` (an endpoint: node name = its pod) gets an ICMP echo reply from `to`:
    /// 3 requests 200 ms apart, 1 s per reply, so at most ~1.5 s. Panics if ping cannot run at
    /// all (unknown namespace, missing binary), so a typo never passes as "unreachable".
    pub fn ping(&self, from: &str, to: Ipv4Addr) -> bool {
        match self.ping_with(from, to, &PingOpts::default()) {
            Ok(r) => r.reachable(),
            Err(e) => panic!("ping {from} -> {to} could not run: {e:#}"),
        }
    }

    /// Waits up to `within` until one ping from `from`'s pod to `to` gets a reply (300 ms per
    /// try), for paths coming back after a fault or a re-programming.
    pub fn wait_reachable(&self, from: &str, to: Ipv4Addr, within: Duration) -> Result<()> {
        let opts = PingOpts {
            count: 1,
            reply_timeout: Duration::from_millis(300),
            ..PingOpts::default()
        };
        wait_until(&format!("{from} reaches {to}"), within, || {
            self.ping_with(from, to, &opts).map(|r| r.reachable())
        })
    }

    /// `ping` with options, returning counts, RTT and the raw output.
    pub fn ping_with(&self, from: &str, to: Ipv4Addr, opts: &PingOpts) -> Result<PingReport> {
        traffic::ping(&self.endpoint_ns(from)?, to, opts)
    }

    /// Sends `bytes` pseudo-random bytes over TCP from pod `from` to pod `to` (node names, or
    /// `from` any endpoint) and checks both ends computed the same checksum. A broken path fails
    /// within the connect timeout (3 s); see [`TransferOpts::new`] for the other limits.
    pub fn tcp_transfer(&self, from: &str, to: &str, bytes: u64) -> Result<TransferReport> {
        self.tcp_transfer_with(from, to, &TransferOpts::new(bytes))
    }

    /// [`Lab::tcp_transfer`] with explicit options; `to` is a node (its pod receives).
    pub fn tcp_transfer_with(
        &self,
        from: &str,
        to: &str,
        opts: &TransferOpts,
    ) -> Result<TransferReport> {
        let node = self.try_node(to)?;
        self.tcp_transfer_to(from, &node.pod_ns, node.pod_ip, opts)
    }

    /// Checksummed TCP transfer to a receiver in any namespace `to_ns` listening on `to_ip`.
    pub fn tcp_transfer_to(
        &self,
        from: &str,
        to_ns: &str,
        to_ip: Ipv4Addr,
        opts: &TransferOpts,
    ) -> Result<TransferReport> {
        traffic::tcp_transfer(&self.endpoint_ns(from)?, &self.ns(to_ns)?, to_ip, opts)
    }

    /// Sends UDP datagrams from endpoint `from` (bound to `bind`, if given) to `to`.
    pub fn send_udp(
        &self,
        from: &str,
        bind: Option<SocketAddrV4>,
        to: SocketAddrV4,
        payloads: Vec<Vec<u8>>,
    ) -> Result<()> {
        traffic::send_udp(&self.endpoint_ns(from)?, bind, to, payloads)
    }

    /// Whether UDP sent from endpoint `from` to `to` reaches a socket bound to `listen` in
    /// namespace `listen_ns` within `window` (proving a negative takes the whole window).
    pub fn udp_delivered(
        &self,
        from: &str,
        to: SocketAddrV4,
        listen_ns: &str,
        listen: SocketAddrV4,
        window: Duration,
    ) -> Result<bool> {
        traffic::udp_delivered(
            &self.endpoint_ns(from)?,
            to,
            &self.ns(listen_ns)?,
            listen,
            window,
        )
    }

    /// A client-first UDP request/response; tells which source address the server saw (the
    /// NAT mapping) and whether the reply got back.
    pub fn udp_exchange(
        &self,
        client: &str,
        server_ns: &str,
        server: SocketAddrV4,
        timeout: Duration,
    ) -> Result<UdpExchange> {
        traffic::udp_exchange(
            &self.endpoint_ns(client)?,
            &self.ns(server_ns)?,
            server,
            timeout,
        )
    }

    /// Counters of interface `dev` in namespace `ns`.
    pub fn link_stats(&self, ns: &str, dev: &str) -> Result<LinkStats> {
        traffic::link_stats(&self.ns(ns)?, dev)
    }

    // ---- flannel state ----------------------------------------------------------------------

    /// Normalized routing/VXLAN state of `node` (see [`NodeNetState`]).
    pub fn snapshot(&self, node: &str) -> Result<NodeNetState> {
        let n = self.try_node(node)?;
        NodeNetState::capture(&n.name, &n.ns)
    }

    /// What flanneld does on every other node after a lease event for `node` (or a flanneld
    /// restart): neighbour, FDB (overwriting any override, port included) and route `replace`.
    pub fn reapply_flannel(&self, node: &str) -> Result<()> {
        let peer = self.try_node(node)?;
        for on in self.layout.nodes.iter().filter(|n| n.name != peer.name) {
            self.run_flannel_commands(&on.ns, &build::flannel_peer_commands(peer), false)
                .with_context(|| format!("re-programming {} on {}", peer.name, on.name))?;
        }
        Ok(())
    }

    /// Programs peer `peer` on node `on`, as flanneld does when it learns `peer`'s lease.
    pub fn flannel_program_peer(&self, on: &str, peer: &str) -> Result<()> {
        let (on, peer) = (self.try_node(on)?, self.try_node(peer)?);
        self.run_flannel_commands(&on.ns, &build::flannel_peer_commands(peer), false)
    }

    /// Removes peer `peer` from node `on`, as flanneld does when `peer`'s lease expires
    /// (entries already gone are fine).
    pub fn flannel_remove_peer(&self, on: &str, peer: &str) -> Result<()> {
        let (on, peer) = (self.try_node(on)?, self.try_node(peer)?);
        self.run_flannel_commands(&on.ns, &build::flannel_peer_removal(peer), true)
    }

    fn run_flannel_commands(
        &self,
        ns: &str,
        cmds: &[(&str, String)],
        tolerate_missing: bool,
    ) -> Result<()> {
        for (tool, args) in cmds {
            let mut full = vec!["-n", ns];
            full.extend(args.split_whitespace());
            let out = run(command(tool, &full), None, DEFAULT_TIMEOUT)?;
            let acceptable = out.success() || (tolerate_missing && is_missing_error(&out.stderr));
            if !acceptable {
                out.check()?;
            }
        }
        Ok(())
    }

    // ---- inventory ----------------------------------------------------------------------------

    /// The lab as a Petrel inventory (TOML).
    pub fn inventory_toml(&self) -> String {
        self.layout.inventory_toml()
    }

    /// Writes [`Lab::inventory_toml`] to `path`.
    pub fn write_inventory(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.inventory_toml())
            .with_context(|| format!("writing inventory {}", path.display()))
    }

    // ---- NAT ------------------------------------------------------------------------------------

    /// The address site `site`'s router currently masquerades to.
    pub fn site_public_ip(&self, site: &str) -> Result<Ipv4Addr> {
        let r = self.router(site)?;
        let nat = self.nat.lock().unwrap_or_else(PoisonError::into_inner);
        nat.get(&r.name)
            .copied()
            .ok_or_else(|| anyhow!("no NAT state for {}", r.name))
    }

    /// Flushes the conntrack table of site `site`'s router: every NAT mapping is forgotten, so
    /// the next outbound packet of a flow gets a new mapping (usually a new source port).
    pub fn flush_site_conntrack(&self, site: &str) -> Result<()> {
        let r = self.router(site)?;
        run_checked(
            command("ip", &["netns", "exec", &r.ns, "conntrack", "-F"]),
            None,
            DEFAULT_TIMEOUT,
        )
        .map(drop)
    }

    /// Drops (or, `block` false, stops dropping) UDP between site `site`'s NAT and `peer` (a WAN
    /// address), both ways, in the site's router: a path between two sites broken in a NAT,
    /// while both still reach the hub.
    pub fn block_udp_in_nat(&self, site: &str, peer: Ipv4Addr, block: bool) -> Result<()> {
        let ns = self.ns(&self.router(site)?.name)?;
        if !block {
            self.exec(&ns, &["nft", "delete", "table", "ip", "petrel_block"])?;
            return Ok(());
        }
        let rules = format!(
            "table ip petrel_block {{\n  chain block {{\n    type filter hook forward priority -10; policy accept;\n    ip daddr {peer} meta l4proto udp counter drop\n    ip saddr {peer} meta l4proto udp counter drop\n  }}\n}}\n"
        );
        let file = self.workdir.join(format!("block-{site}.nft"));
        std::fs::write(&file, rules)?;
        let path = file
            .to_str()
            .ok_or_else(|| anyhow!("non-UTF-8 path {}", file.display()))?;
        self.exec(&ns, &["nft", "-f", path])?;
        Ok(())
    }

    /// NAT rebinding, as when a home router reconnects: site `site`'s router gets a new WAN
    /// address (toggling between [`Router::wan_ip`] and [`Router::alt_wan_ip`]), the old one
    /// disappears, and its conntrack table is flushed. Existing flows from the site then arrive
    /// at the hub from a new address and port.
    pub fn rebind_site_nat(&self, site: &str) -> Result<NatRebind> {
        let r = self.router(site)?;
        let mut nat = self.nat.lock().unwrap_or_else(PoisonError::into_inner);
        let old = nat.get(&r.name).copied().unwrap_or(r.wan_ip);
        let new = if old == r.wan_ip {
            r.alt_wan_ip
        } else {
            r.wan_ip
        };
        let len = r.wan_net.prefix_len;
        let script = format!(
            "addr add {new}/{len} dev {dev}\naddr del {old}/{len} dev {dev}\nroute replace default via {gw} dev {dev}\n",
            dev = layout::WAN_DEV,
            gw = r.wan_gw
        );
        build::ip_batch(Some(&r.ns), &script)
            .with_context(|| format!("rebinding NAT of {site}"))?;
        nat.insert(r.name.clone(), new);
        drop(nat);
        self.flush_site_conntrack(site)?;
        let out = run_checked(
            command(
                "ip",
                &[
                    "-n",
                    &r.ns,
                    "-4",
                    "-o",
                    "addr",
                    "show",
                    "dev",
                    layout::WAN_DEV,
                ],
            ),
            None,
            DEFAULT_TIMEOUT,
        )?;
        if !out.stdout.contains(&format!(" {new}/")) || out.stdout.contains(&format!(" {old}/")) {
            bail!(
                "after rebinding, {} {} shows:\n{}",
                r.name,
                layout::WAN_DEV,
                out.stdout
            );
        }
        Ok(NatRebind {
            site: r.site.clone(),
            old,
            new,
        })
    }
}

fn is_missing_error(stderr: &str) -> bool {
    [
        "No such file",
        "No such process",
        "Cannot find",
        "not found",
        "ESRCH",
        "ENOENT",
    ]
    .iter()
    .any(|m| stderr.contains(m))
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.persistent || self.torn_down {
            return;
        }
        if let Err(e) = netns::destroy_lab(self.prefix()) {
            eprintln!(
                "petrel-lab: tearing down lab {} failed: {e:#}",
                self.prefix()
            );
        }
    }
}
