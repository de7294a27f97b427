//! Programs a [`Layout`] into namespaces: underlay links, NAT routers, and on every node exactly
//! what flanneld's VXLAN backend and the flannel CNI (bridge plugin) would program.
//!
//! Phases (each batched per namespace, namespaces in parallel):
//! 1. `ip netns add` for all namespaces (one root `ip -batch`).
//! 2. sysctls (before any interface exists, so `default.*` values are inherited): IPv6 off on
//!    every new interface (keeps `ip route show table all` free of link-local noise; `lo` keeps
//!    `::1`), forwarding and strict rp_filter on nodes, forwarding and `promote_secondaries` on
//!    routers.
//! 3. veth pairs, each end created directly in its namespace (nothing ever exists in the root
//!    namespace).
//! 4. per-namespace `ip -batch`: addresses, bridges, default routes, flannel.1, cni0, and the
//!    per-peer neighbour entries; then `bridge -batch` for the per-peer FDB entries; then the
//!    per-peer routes; then nftables (node conntrack hook, router NAT + firewall).

use std::fmt::Write as _;
use std::thread;

use anyhow::{anyhow, Context as _, Result};

use super::cmd::{command, run_checked, DEFAULT_TIMEOUT};
use super::layout::{
    Layout, Node, SiteKind, CNI_BRIDGE, EXPRESS_CONNECT_DEV, FLANNEL_DEV, LAN_BRIDGE, POD_VETH,
    SWITCH_BRIDGE, UNDERLAY_DEV, VXLAN_PORT, VXLAN_VNI, WAN_DEV,
};
use super::netns::write_sysctls;

/// Runs `ip [-n ns] -batch -` with `script`.
pub(crate) fn ip_batch(ns: Option<&str>, script: &str) -> Result<()> {
    batch("ip", ns, script)
}

/// Runs `bridge [-n ns] -batch -` with `script`.
pub(crate) fn bridge_batch(ns: Option<&str>, script: &str) -> Result<()> {
    batch("bridge", ns, script)
}

fn batch(tool: &str, ns: Option<&str>, script: &str) -> Result<()> {
    if script.trim().is_empty() {
        return Ok(());
    }
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    run_checked(command(tool, &args), Some(script), DEFAULT_TIMEOUT).map(drop)
}

/// `nft -f -` inside `ns`.
pub(crate) fn nft(ns: &str, ruleset: &str) -> Result<()> {
    run_checked(
        command("ip", &["netns", "exec", ns, "nft", "-f", "-"]),
        Some(ruleset),
        DEFAULT_TIMEOUT,
    )
    .map(drop)
}

/// Runs `f` for every item on its own thread; all errors are reported together.
fn parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    let errors: Vec<anyhow::Error> = thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|it| s.spawn(|| f(it))).collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(r) => r.err(),
                Err(_) => Some(anyhow!("configuration thread panicked")),
            })
            .collect()
    });
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors
            .into_iter()
            .next()
            .unwrap_or_else(|| anyhow!("unknown error"))),
        n => {
            let all: Vec<String> = errors
                .iter()
                .enumerate()
                .map(|(i, e)| format!("({}) {e:#}", i + 1))
                .collect();
            Err(anyhow!("{n} steps failed:\n{}", all.join("\n")))
        }
    }
}

/// The three commands flanneld runs on one node for peer `peer`, in flanneld's order
/// (AddARP, AddFDB, route), as `(tool, arguments)`.
pub(crate) fn flannel_peer_commands(peer: &Node) -> [(&'static str, String); 3] {
    [
        (
            "ip",
            format!(
                "neigh replace {} lladdr {} dev {FLANNEL_DEV} nud permanent",
                peer.vtep_ip, peer.vtep_mac
            ),
        ),
        (
            "bridge",
            format!(
                "fdb replace {} dev {FLANNEL_DEV} dst {} self permanent",
                peer.vtep_mac, peer.public_ip
            ),
        ),
        (
            "ip",
            format!(
                "route replace {} via {} dev {FLANNEL_DEV} onlink",
                peer.pod_cidr, peer.vtep_ip
            ),
        ),
    ]
}

/// What flanneld removes when a peer's lease goes away (DelARP, DelFDB, route delete).
pub(crate) fn flannel_peer_removal(peer: &Node) -> [(&'static str, String); 3] {
    [
        (
            "ip",
            format!("neigh del {} dev {FLANNEL_DEV}", peer.vtep_ip),
        ),
        (
            "bridge",
            format!(
                "fdb del {} dev {FLANNEL_DEV} dst {} self",
                peer.vtep_mac, peer.public_ip
            ),
        ),
        (
            "ip",
            format!("route del {} dev {FLANNEL_DEV}", peer.pod_cidr),
        ),
    ]
}

/// Builds every namespace of `layout`. On error the caller tears down by prefix.
pub(crate) fn build(layout: &Layout) -> Result<()> {
    let namespaces = layout.namespaces();

    // 1. namespaces
    let script: String = namespaces
        .iter()
        .map(|n| format!("netns add {n}\n"))
        .collect();
    ip_batch(None, &script).context("creating namespaces")?;

    // 2. sysctls
    let sysctls: Vec<(String, Vec<(&str, &str)>)> = namespaces
        .iter()
        .map(|ns| {
            let mut s = vec![("net.ipv6.conf.default.disable_ipv6", "1")];
            if layout.nodes.iter().any(|n| &n.ns == ns) {
                s.extend([
                    ("net.ipv4.ip_forward", "1"),
                    ("net.ipv4.conf.all.rp_filter", "1"),
                    ("net.ipv4.conf.default.rp_filter", "1"),
                ]);
            } else if layout.routers.iter().any(|r| &r.ns == ns) {
                s.extend([
                    ("net.ipv4.ip_forward", "1"),
                    ("net.ipv4.conf.all.promote_secondaries", "1"),
                    ("net.ipv4.conf.default.promote_secondaries", "1"),
                ]);
            } else if *ns == layout.vpc_ns {
                s.push(("net.ipv4.ip_forward", "1"));
            }
            (ns.clone(), s)
        })
        .collect();
    parallel(&sysctls, |(ns, s)| write_sysctls(ns, s)).context("setting sysctls")?;

    // 3. veth pairs
    let mut script = String::new();
    for p in layout.veth_pairs() {
        let _ = writeln!(
            script,
            "link add name {} netns {} mtu {} type veth peer name {} netns {} mtu {}",
            p.a_dev, p.a_ns, p.mtu, p.b_dev, p.b_ns, p.mtu
        );
    }
    ip_batch(None, &script).context("creating veth pairs")?;

    // 4. addressing, bridges, flannel, NAT
    let mut jobs: Vec<(String, String)> = Vec::new();
    jobs.push((layout.vpc_ns.clone(), vpc_script(layout)));
    jobs.push((layout.wan_ns.clone(), wan_script(layout)));
    let api = &layout.apiserver;
    jobs.push((
        api.ns.clone(),
        host_script(
            &format!("{}/{}", api.ip, api.net.prefix_len),
            &api.default_gw.to_string(),
        ),
    ));
    for r in &layout.routers {
        jobs.push((r.ns.clone(), router_script(layout, r)));
    }
    for n in &layout.nodes {
        jobs.push((
            n.pod_ns.clone(),
            host_script(
                &format!("{}/{}", n.pod_ip, n.pod_cidr.prefix_len),
                &n.cni_ip.to_string(),
            ),
        ));
    }
    parallel(&jobs, |(ns, script)| {
        ip_batch(Some(ns), script).with_context(|| format!("configuring {ns}"))
    })?;
    parallel(&layout.nodes, |n| {
        build_node(layout, n).with_context(|| format!("configuring node {}", n.name))
    })?;
    parallel(&layout.routers, |r| {
        nft(&r.ns, &router_nft(r)).with_context(|| format!("NAT rules of {}", r.name))
    })?;
    Ok(())
}

fn vpc_script(layout: &Layout) -> String {
    let mut s = format!(
        "link set lo up\nlink add {SWITCH_BRIDGE} mtu {m} type bridge\naddr add {ip}/{len} dev {SWITCH_BRIDGE}\n\
         link set {SWITCH_BRIDGE} up\n",
        m = layout.underlay_mtu,
        ip = layout.vpc_router_ip,
        len = layout.sites[0].underlay.prefix_len,
    );
    let ports = layout
        .nodes
        .iter()
        .filter(|n| n.site_kind == SiteKind::Cloud)
        .map(|n| n.name.as_str())
        .chain([layout.apiserver.name.as_str()]);
    for p in ports {
        let _ = writeln!(
            s,
            "link set p-{p} master {SWITCH_BRIDGE}\nlink set p-{p} up"
        );
    }
    if let Some(x) = layout
        .sites
        .iter()
        .find(|s| s.kind == SiteKind::ExpressConnect)
    {
        let _ = writeln!(
            s,
            "addr add {}/{} dev {EXPRESS_CONNECT_DEV}\nlink set {EXPRESS_CONNECT_DEV} up",
            layout.express_router_ip, x.underlay.prefix_len
        );
    }
    s
}

fn wan_script(layout: &Layout) -> String {
    let mut s = format!(
        "link set lo up\nlink add {SWITCH_BRIDGE} mtu {} type bridge\naddr add {}/{} dev {SWITCH_BRIDGE}\n\
         link set {SWITCH_BRIDGE} up\n",
        layout.underlay_mtu, layout.wan_ip, layout.wan_net.prefix_len
    );
    let ports = layout
        .nodes
        .iter()
        .filter(|n| n.wan_ip.is_some())
        .map(|n| n.name.as_str())
        .chain(layout.routers.iter().map(|r| r.name.as_str()));
    for p in ports {
        let _ = writeln!(
            s,
            "link set p-{p} master {SWITCH_BRIDGE}\nlink set p-{p} up"
        );
    }
    s
}

fn host_script(cidr_addr: &str, gw: &str) -> String {
    format!(
        "link set lo up\naddr add {cidr_addr} dev {UNDERLAY_DEV}\nlink set {UNDERLAY_DEV} up\n\
         route add default via {gw} dev {UNDERLAY_DEV}\n"
    )
}

fn router_script(layout: &Layout, r: &super::layout::Router) -> String {
    let mut s = format!(
        "link set lo up\naddr add {}/{} dev {WAN_DEV}\nlink set {WAN_DEV} up\nroute add default via {} dev {WAN_DEV}\n\
         link add {LAN_BRIDGE} mtu {} type bridge\naddr add {}/{} dev {LAN_BRIDGE}\nlink set {LAN_BRIDGE} up\n",
        r.wan_ip, r.wan_net.prefix_len, r.wan_gw, layout.underlay_mtu, r.lan_ip, r.lan_net.prefix_len
    );
    for n in layout.nodes.iter().filter(|n| n.site == r.site) {
        let _ = writeln!(
            s,
            "link set p-{0} master {LAN_BRIDGE}\nlink set p-{0} up",
            n.name
        );
    }
    s
}

/// A home/office router: masquerade to whatever address the WAN side has (`masquerade`, or
/// `masquerade random` for [`NatMapping::RandomPorts`]), a stateful firewall that lets nothing
/// new in from the WAN (neither forwarded nor to the router itself). The `iifname lan0 accept`
/// also covers LAN-to-LAN frames if br_netfilter is loaded.
///
/// [`NatMapping::RandomPorts`]: super::layout::NatMapping::RandomPorts
fn router_nft(r: &super::layout::Router) -> String {
    format!(
        "table ip petrel_nat {{
  chain postrouting_nat {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {lan} oifname \"{WAN_DEV}\" counter {masquerade}
  }}
  chain forward_filter {{
    type filter hook forward priority filter; policy drop;
    iifname \"{LAN_BRIDGE}\" accept
    iifname \"{WAN_DEV}\" ct state established,related counter accept
    iifname \"{WAN_DEV}\" counter drop
  }}
  chain input_filter {{
    type filter hook input priority filter; policy accept;
    iifname \"{WAN_DEV}\" ct state established,related accept
    iifname \"{WAN_DEV}\" counter drop
  }}
}}
",
        lan = r.lan_net,
        masquerade = r.nat.nft_statement(),
    )
}

/// On a real node conntrack is always active (kube-proxy, flannel's masquerade rules); in a
/// fresh namespace it is only hooked in when some rule needs it. This makes it real.
const NODE_NFT: &str = "table ip petrel_ct {
  chain out {
    type filter hook output priority 0; policy accept;
    ct state new counter
  }
}
";

fn build_node(layout: &Layout, n: &Node) -> Result<()> {
    let f = layout.flannel_mtu;
    let mut s = format!(
        "link set lo up\naddr add {ip}/{len} dev {UNDERLAY_DEV}\nlink set {UNDERLAY_DEV} up\n",
        ip = n.underlay_ip,
        len = n.underlay_net.prefix_len
    );
    if let Some(wan) = n.wan_ip {
        let _ = writeln!(
            s,
            "addr add {wan}/{} dev {WAN_DEV}\nlink set {WAN_DEV} up",
            layout.wan_net.prefix_len
        );
    }
    let _ = writeln!(
        s,
        "route add default via {} dev {UNDERLAY_DEV}",
        n.default_gw
    );
    // flanneld: netlink.Vxlan{VxlanId: 1, VtepDevIndex: extIface, SrcAddr: public-ip, Port: 8472,
    // Learning: false, MTU: extMTU-50, HardwareAddr: VtepMAC}; addr <podCIDR>.0/32; up.
    let _ = writeln!(
        s,
        "link add {FLANNEL_DEV} address {mac} mtu {f} type vxlan id {VXLAN_VNI} local {local} dev {dev} \
         dstport {VXLAN_PORT} nolearning\naddr add {vtep}/32 dev {FLANNEL_DEV}\nlink set {FLANNEL_DEV} up",
        mac = n.vtep_mac,
        local = n.public_ip,
        dev = n.underlay_dev,
        vtep = n.vtep_ip,
    );
    // flannel CNI -> bridge plugin: cni0 with the pod gateway address, pod veth attached.
    let _ = writeln!(
        s,
        "link add {CNI_BRIDGE} mtu {f} type bridge\naddr add {cni}/{len} dev {CNI_BRIDGE}\nlink set {CNI_BRIDGE} up\n\
         link set {POD_VETH} master {CNI_BRIDGE}\nlink set {POD_VETH} up",
        cni = n.cni_ip,
        len = n.pod_cidr.prefix_len,
    );
    // flanneld, for every other node lease, reachable or not: AddARP, AddFDB, route.
    let peers: Vec<&Node> = layout.nodes.iter().filter(|p| p.name != n.name).collect();
    let (mut fdb, mut routes) = (String::new(), String::new());
    for p in &peers {
        let [(_, neigh), (_, f), (_, r)] = flannel_peer_commands(p);
        let _ = writeln!(s, "{neigh}");
        let _ = writeln!(fdb, "{f}");
        let _ = writeln!(routes, "{r}");
    }
    ip_batch(Some(&n.ns), &s)?;
    write_sysctls(&n.ns, &[("net.ipv6.conf.flannel/1.accept_ra", "0")])?;
    bridge_batch(Some(&n.ns), &fdb)?;
    ip_batch(Some(&n.ns), &routes)?;
    nft(&n.ns, NODE_NFT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::layout::{LabSpec, NatMapping};

    #[test]
    fn router_nat_rules() {
        let spec = LabSpec {
            third_site: true,
            ..LabSpec::default()
        };
        let l = match Layout::new("pt0abc", &spec) {
            Ok(l) => l,
            Err(e) => panic!("{e:#}"),
        };
        for r in &l.routers {
            let rules = router_nft(r);
            let line = format!(
                "ip saddr {} oifname \"{WAN_DEV}\" counter {}\n",
                r.lan_net,
                r.nat.nft_statement()
            );
            assert!(rules.contains(&line), "{}: {rules}", r.name);
            assert_eq!(
                rules.contains("masquerade random"),
                r.nat == NatMapping::RandomPorts,
                "{}: {rules}",
                r.name
            );
        }
        assert_eq!(
            l.routers
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["rt-a", "rt-b", "rt-c"]
        );
    }
}
