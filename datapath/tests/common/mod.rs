//! Lab helpers for the datapath tests: network namespaces with a Drop guard, Flannel emulation
//! exactly as `shared/netlab/topology.sh` programs it, and a way to run code inside a namespace.
//!
//! Namespace switching: each piece of code that must live in a namespace (the Datapath, its
//! FrameSource/Injector, the pods' TCP sockets) runs on its own OS thread that first calls
//! `setns(CLONE_NEWNET)` on `/run/netns/<name>` (nix) and then, if async, a current-thread
//! tokio runtime. Sockets, netlink and /proc/sys/net bind to that thread's namespace. `ip`,
//! `bridge` and `ping` are run as child processes with `-n <ns>` / `ip netns exec` (tests only;
//! the library never shells out).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use petrel_datapath::{format_mac, DatapathConfig, HookChoice, PeerRoute};

pub const VNI: u32 = 1;
pub const FLANNEL_MTU: u32 = 1450;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Network namespaces `pdp<4hex>-*`, deleted (with everything inside) on drop, even on panic.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    pub state_dir: PathBuf,
}

impl Lab {
    pub fn new() -> Lab {
        assert_eq!(
            run(&["id", "-u"]).trim(),
            "0",
            "the datapath tests create network namespaces: run them as root"
        );
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n =
            (std::process::id() ^ nanos ^ SEQ.fetch_add(0x3c6f, Ordering::Relaxed).rotate_left(7))
                & 0xffff;
        let prefix = format!("pdp{n:04x}-");
        let state_dir = std::env::temp_dir().join(format!("{prefix}state"));
        Lab {
            prefix,
            namespaces: Vec::new(),
            state_dir,
        }
    }

    /// Creates `<prefix><suffix>` with `lo` up.
    pub fn netns(&mut self, suffix: &str) -> String {
        let name = format!("{}{suffix}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip(&name, &["link", "set", "lo", "up"]);
        name
    }

    pub fn config(&self, hook: HookChoice) -> DatapathConfig {
        DatapathConfig {
            hook,
            state_dir: self.state_dir.clone(),
            ..DatapathConfig::default()
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Runs a command, panics with its stderr if it fails; returns stdout.
pub fn run(args: &[&str]) -> String {
    let out = output(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn output(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
}

pub fn ip(ns: &str, args: &[&str]) -> String {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    run(&v)
}

pub fn bridge(ns: &str, args: &[&str]) -> String {
    let mut v = vec!["bridge", "-n", ns];
    v.extend_from_slice(args);
    run(&v)
}

pub fn nsexec(ns: &str, args: &[&str]) -> Output {
    let mut v = vec!["timeout", "30", "ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    output(&v)
}

/// `net.ipv4.conf.flannel/1.rp_filter` -> `/proc/sys/net/ipv4/conf/flannel.1/rp_filter`.
fn proc_path(key: &str) -> String {
    let parts: Vec<String> = key.split('.').map(|p| p.replace('/', ".")).collect();
    format!("/proc/sys/{}", parts.join("/"))
}

/// Sets a sysctl inside `ns` (through /proc: no dependency on procps).
pub fn sysctl_set(ns: &str, key: &str, value: &str) {
    let cmd = format!("echo {value} > {}", proc_path(key));
    let o = nsexec(ns, &["sh", "-c", &cmd]);
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn sysctl_get(ns: &str, key: &str) -> String {
    let o = nsexec(ns, &["cat", &proc_path(key)]);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn mac(i: u8) -> [u8; 6] {
    [0x02, 0xfa, 0, 0, 0, i]
}

/// A node as in topology.sh: index, underlay address and device.
#[derive(Clone)]
pub struct Node {
    pub ns: String,
    pub idx: u8,
    pub ip: String,
}

/// Node sysctls as in topology.sh's node_sysctls (forwarding, strict rp_filter).
pub fn node_sysctls(ns: &str) {
    sysctl_set(ns, "net.ipv4.ip_forward", "1");
    sysctl_set(ns, "net.ipv4.conf.all.rp_filter", "1");
    sysctl_set(ns, "net.ipv4.conf.default.rp_filter", "1");
}

/// An underlay: a veth pair inside the node (u0 carries the address; nothing beyond it).
pub fn underlay(node: &Node) {
    ip(
        &node.ns,
        &["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
    );
    ip(
        &node.ns,
        &["addr", "add", &format!("{}/24", node.ip), "dev", "u0"],
    );
    ip(&node.ns, &["link", "set", "u0", "up"]);
    ip(&node.ns, &["link", "set", "u1", "up"]);
}

/// topology.sh flannel_device().
pub fn flannel_device(node: &Node) {
    let m = format_mac(&mac(node.idx));
    let mtu = FLANNEL_MTU.to_string();
    let vni = VNI.to_string();
    ip(
        &node.ns,
        &[
            "link",
            "add",
            "flannel.1",
            "address",
            &m,
            "mtu",
            &mtu,
            "type",
            "vxlan",
            "id",
            &vni,
            "local",
            &node.ip,
            "dev",
            "u0",
            "dstport",
            "8472",
            "nolearning",
        ],
    );
    ip(
        &node.ns,
        &[
            "addr",
            "add",
            &format!("10.244.{}.0/32", node.idx),
            "dev",
            "flannel.1",
        ],
    );
    ip(&node.ns, &["link", "set", "flannel.1", "up"]);
    sysctl_set(&node.ns, "net.ipv6.conf.flannel/1.accept_ra", "0");
}

/// topology.sh flannel_add_peer(): neighbour, FDB and route for a remote node, all permanent.
pub fn flannel_peer(node: &Node, remote_idx: u8, remote_ip: &str) {
    let gw = format!("10.244.{remote_idx}.0");
    let m = format_mac(&mac(remote_idx));
    ip(
        &node.ns,
        &[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &m,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
    );
    bridge(
        &node.ns,
        &[
            "fdb",
            "replace",
            &m,
            "dev",
            "flannel.1",
            "dst",
            remote_ip,
            "self",
            "permanent",
        ],
    );
    ip(
        &node.ns,
        &[
            "route",
            "replace",
            &format!("10.244.{remote_idx}.0/24"),
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ],
    );
}

/// topology.sh cni_pod(): cni0 bridge + a pod namespace with eth0 (MTU 1450).
pub fn cni_pod(lab: &mut Lab, node: &Node) -> String {
    let i = node.idx;
    let mtu = FLANNEL_MTU.to_string();
    ip(
        &node.ns,
        &["link", "add", "cni0", "mtu", &mtu, "type", "bridge"],
    );
    ip(
        &node.ns,
        &["addr", "add", &format!("10.244.{i}.1/24"), "dev", "cni0"],
    );
    ip(&node.ns, &["link", "set", "cni0", "up"]);
    let pod = lab.netns(&format!("p{i}"));
    let veth = format!("veth-p{i}");
    ip(
        &node.ns,
        &[
            "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns",
            &pod,
        ],
    );
    ip(&node.ns, &["link", "set", &veth, "master", "cni0", "up"]);
    ip(&pod, &["link", "set", "eth0", "mtu", &mtu, "up"]);
    ip(
        &pod,
        &["addr", "add", &format!("10.244.{i}.2/24"), "dev", "eth0"],
    );
    ip(
        &pod,
        &["route", "add", "default", "via", &format!("10.244.{i}.1")],
    );
    pod
}

pub fn peer(idx: u8, mtu: u16) -> PeerRoute {
    PeerRoute {
        cidr: format!("10.244.{idx}.0/24").parse().unwrap(),
        vtep_mac: mac(idx),
        mtu,
        via: None,
    }
}

/// Enters `ns` on the calling thread.
pub fn enter(ns: &str) {
    let f =
        File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// Runs `f` on a new thread inside `ns` with a current-thread tokio runtime; returns its result
/// (panics propagate).
pub fn in_netns<F, Fut, R>(ns: &str, f: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R>,
    R: Send + 'static,
{
    let ns = ns.to_string();
    let h = std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f())
    });
    match h.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Everything `cleanup` must restore exactly.
pub fn snapshot(ns: &str) -> String {
    let mut s = String::new();
    for (title, args) in [
        ("ip rule", vec!["rule"]),
        (
            "ip route show table all",
            vec!["route", "show", "table", "all"],
        ),
        ("ip neigh show", vec!["neigh", "show"]),
        ("ip -o link", vec!["-o", "link", "show"]),
    ] {
        s.push_str(&format!("== {title}\n{}", ip(ns, &args)));
    }
    s.push_str(&format!(
        "== bridge fdb show\n{}",
        bridge(ns, &["fdb", "show"])
    ));
    for key in [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter",
        "net.ipv4.conf.flannel/1.rp_filter",
        "net.ipv4.ip_forward",
    ] {
        s.push_str(&format!("{key} = {}\n", sysctl_get(ns, key)));
    }
    s
}

/// Flannel's own objects (must never change while Petrel runs).
pub fn flannel_snapshot(ns: &str) -> String {
    format!(
        "{}{}{}{}",
        ip(ns, &["-d", "link", "show", "flannel.1"])
            .lines()
            .filter(|l| !l.contains("RX") && !l.contains("TX"))
            .collect::<Vec<_>>()
            .join("\n"),
        ip(ns, &["route", "show", "table", "main"]),
        ip(ns, &["neigh", "show", "dev", "flannel.1"]),
        bridge(ns, &["fdb", "show", "dev", "flannel.1"]),
    )
}

/// Waits (at most 5 s) until IPv6 duplicate address detection finished on every device, so the
/// kernel stops adding routes by itself and snapshots are stable.
pub fn settle(ns: &str) {
    for _ in 0..50 {
        if !ip(ns, &["-6", "addr", "show"]).contains("tentative") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
