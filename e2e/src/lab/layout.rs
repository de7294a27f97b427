//! The lab's address plan: pure data computed from a [`LabSpec`] and a prefix, with no side
//! effects, so it can be printed (`petrel-lab layout`) and unit-tested without root.
//!
//! Every name here is a *short* name (`edge-a1`, `rt-a`, `wan`); the namespace that holds it is
//! `<prefix>-<short>`, and a node's pod lives in `<prefix>-<node>-pod`.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

/// Flannel's VXLAN network identifier.
pub const VXLAN_VNI: u32 = 1;
/// Flannel's VXLAN UDP port (the kernel default flanneld leaves in place).
pub const VXLAN_PORT: u16 = 8472;
/// Kubelet port written to the inventory.
pub const KUBELET_PORT: u16 = 10250;
/// Flannel's VXLAN device.
pub const FLANNEL_DEV: &str = "flannel.1";
/// The CNI bridge on every node.
pub const CNI_BRIDGE: &str = "cni0";
/// A node's underlay interface (flanneld `--iface`), also a pod's and a host's only interface.
pub const UNDERLAY_DEV: &str = "eth0";
/// The interface facing the WAN on `gw-1` and on the NAT routers.
pub const WAN_DEV: &str = "wan0";
/// The LAN bridge on a NAT router.
pub const LAN_BRIDGE: &str = "lan0";
/// The host side of a node's pod veth.
pub const POD_VETH: &str = "veth0";
/// The bridge in the `vpc` and `wan` switch namespaces.
pub const SWITCH_BRIDGE: &str = "br0";
/// The interface of the VPC router toward Express Connect site X.
pub const EXPRESS_CONNECT_DEV: &str = "to-x";

/// Prefix every lab namespace name starts with, followed by 4 lowercase hex digits and `-`.
pub const PREFIX_STEM: &str = "pt";

/// What kind of site a node is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// The cloud VPC.
    Cloud,
    /// A site on the public internet behind NAT: only outbound connections work.
    Public,
    /// A data centre joined to the VPC by a routed leased line: plain VXLAN works.
    ExpressConnect,
}

impl SiteKind {
    /// The inventory spelling: `cloud`, `public` or `express-connect`.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Cloud => "cloud",
            SiteKind::Public => "public",
            SiteKind::ExpressConnect => "express-connect",
        }
    }
}

impl fmt::Display for SiteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a NAT router picks the source port of an outbound flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatMapping {
    /// Linux `masquerade`: the flow keeps its source port whenever that port is free on the
    /// WAN address, so one inside `address:port` appears as the same outside port toward every
    /// destination (endpoint-independent mapping in practice, what home routers do). UDP hole
    /// punching works through it.
    PortPreserving,
    /// Linux `masquerade random` (`NF_NAT_RANGE_PROTO_RANDOM`): the source port is never kept;
    /// every new conntrack entry gets a new pseudo-random port, so one inside `address:port`
    /// appears with a different outside port toward each destination (and a new one once its
    /// entry expired or was flushed), like a symmetric NAT. A port learned from one peer (the
    /// hub) is useless to another, so UDP hole punching through it fails.
    RandomPorts,
}

impl NatMapping {
    /// The nftables statement that implements it: `masquerade` or `masquerade random`.
    pub fn nft_statement(self) -> &'static str {
        match self {
            NatMapping::PortPreserving => "masquerade",
            NatMapping::RandomPorts => "masquerade random",
        }
    }
}

/// An IPv4 prefix such as `10.244.3.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The network address (host bits zero).
    pub network: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// `a.b.c.0/len`; host bits of `addr` are cleared.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len.min(32)))
        };
        Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len: prefix_len.min(32),
        }
    }

    /// The `n`th address of the prefix (`nth(0)` is the network address).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(n))
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Ipv4Cidr::new(ip, self.prefix_len).network == self.network
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// What to build. `LabSpec::default()` is the standard topology (see the module docs of
/// [`crate::lab`]).
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Fixed prefix (`pt` + 4 lowercase hex digits); `None` picks a free random one.
    pub prefix: Option<String>,
    /// MTU of every underlay link; flannel.1, cni0 and pods get `underlay_mtu - 50`.
    pub underlay_mtu: u32,
    /// A second gateway node, `gw-3` in the VPC with its own WAN address, for active-active
    /// hubs (named so that `petrel_proto::ownership` gives site-a to gw-1 and site-b to gw-3).
    pub second_hub: bool,
    /// A third public site, `site-c` (underlay 10.0.3.0/24, router `rt-c` at 203.0.113.4, one
    /// node `edge-c1` with index 8), for direct site-to-site path tests: unlike `rt-a` and
    /// `rt-b` its NAT randomises source ports per destination ([`NatMapping::RandomPorts`]),
    /// so UDP hole punching to or from it fails.
    pub third_site: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            prefix: None,
            underlay_mtu: 1500,
            second_hub: false,
            third_site: false,
        }
    }
}

/// A site: the VPC, a public NAT'd site or an Express Connect site.
#[derive(Clone, Debug)]
pub struct Site {
    /// Inventory name (`vpc`, `site-a`, `site-b`, `site-x`, optionally `site-c`).
    pub name: String,
    /// Cloud, public or Express Connect.
    pub kind: SiteKind,
    /// The site's underlay subnet (node addresses).
    pub underlay: Ipv4Cidr,
    /// Short name of the site's NAT router, for public sites.
    pub router: Option<String>,
}

/// A Kubernetes node as flanneld sees it, plus where it lives in the lab.
#[derive(Clone, Debug)]
pub struct Node {
    /// Node name (`cloud-1`, `gw-1`, `edge-a1`, `edge-a2`, `edge-b1`, `x1`, optionally `gw-3`
    /// and `edge-c1`).
    pub name: String,
    /// Small number that also picks the pod CIDR (`10.244.<index>.0/24`) and the VtepMAC.
    pub index: u8,
    /// Site name.
    pub site: String,
    /// Kind of the node's site.
    pub site_kind: SiteKind,
    /// Namespace of the node itself.
    pub ns: String,
    /// Namespace of the node's one pod.
    pub pod_ns: String,
    /// Underlay interface (flanneld `--iface`).
    pub underlay_dev: String,
    /// Node address (InternalIP). For edge nodes, the private LAN address.
    pub underlay_ip: Ipv4Addr,
    /// The underlay subnet.
    pub underlay_net: Ipv4Cidr,
    /// The node's default gateway.
    pub default_gw: Ipv4Addr,
    /// Flannel's `public-ip` annotation (VXLAN underlay address); equals `underlay_ip`, which
    /// for NAT'd edge nodes is a private address nobody outside the site can reach.
    pub public_ip: Ipv4Addr,
    /// Address on the WAN, for the gateway node only (the address edge sites dial).
    pub wan_ip: Option<Ipv4Addr>,
    /// The node's pod CIDR.
    pub pod_cidr: Ipv4Cidr,
    /// The pod's address (`.2`).
    pub pod_ip: Ipv4Addr,
    /// flannel.1's address (`.0/32`), also the next hop other nodes route the CIDR through.
    pub vtep_ip: Ipv4Addr,
    /// cni0's address (`.1/24`), the pod's default gateway.
    pub cni_ip: Ipv4Addr,
    /// flannel.1's MAC (`backend-data` VtepMAC), `02:fa:00:00:00:NN`.
    pub vtep_mac: String,
    /// Whether the node carries the cloud-gateway label.
    pub gateway: bool,
    /// Kubelet port.
    pub kubelet_port: u16,
}

/// A public site's NAT router: masquerade, stateful firewall, nothing new enters from the WAN.
#[derive(Clone, Debug)]
pub struct Router {
    /// Short name (`rt-a`, `rt-b`, optionally `rt-c`).
    pub name: String,
    /// Site it serves.
    pub site: String,
    /// Namespace.
    pub ns: String,
    /// WAN address at build time (the masquerade address).
    pub wan_ip: Ipv4Addr,
    /// The address [`crate::lab::Lab::rebind_site_nat`] switches to (and back from).
    pub alt_wan_ip: Ipv4Addr,
    /// The WAN subnet.
    pub wan_net: Ipv4Cidr,
    /// Its default gateway on the WAN.
    pub wan_gw: Ipv4Addr,
    /// LAN address (the edge nodes' default gateway).
    pub lan_ip: Ipv4Addr,
    /// LAN subnet.
    pub lan_net: Ipv4Cidr,
    /// How its masquerade maps source ports (`rt-a`, `rt-b`: port-preserving; `rt-c`: random).
    pub nat: NatMapping,
}

/// A plain host (the API server stand-in).
#[derive(Clone, Debug)]
pub struct Host {
    /// Short name.
    pub name: String,
    /// Namespace.
    pub ns: String,
    /// Address on the VPC.
    pub ip: Ipv4Addr,
    /// Its subnet.
    pub net: Ipv4Cidr,
    /// Default gateway.
    pub default_gw: Ipv4Addr,
}

/// One veth pair; both ends are created directly inside their namespaces.
#[derive(Clone, Debug)]
pub struct VethPair {
    /// Namespace of end A.
    pub a_ns: String,
    /// Interface name of end A.
    pub a_dev: String,
    /// Namespace of end B.
    pub b_ns: String,
    /// Interface name of end B.
    pub b_dev: String,
    /// MTU of both ends.
    pub mtu: u32,
}

/// The complete address plan of one lab.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `pt` + 4 hex digits.
    pub prefix: String,
    /// MTU of underlay links.
    pub underlay_mtu: u32,
    /// MTU of flannel.1, cni0 and pod interfaces (`underlay_mtu - 50`).
    pub flannel_mtu: u32,
    /// Sites, VPC first.
    pub sites: Vec<Site>,
    /// Nodes in index order.
    pub nodes: Vec<Node>,
    /// NAT routers of the public sites.
    pub routers: Vec<Router>,
    /// The API server stand-in in the VPC.
    pub apiserver: Host,
    /// The "internet": a bridge joining gw-1's WAN side and the routers' WAN sides.
    pub wan_ns: String,
    /// Address of the WAN namespace's bridge (routers' default gateway).
    pub wan_ip: Ipv4Addr,
    /// WAN subnet.
    pub wan_net: Ipv4Cidr,
    /// The VPC switch and router: bridges the VPC subnet, routes to Express Connect site X.
    pub vpc_ns: String,
    /// VPC router address on the VPC subnet.
    pub vpc_router_ip: Ipv4Addr,
    /// VPC router address on the leased line to site X.
    pub express_router_ip: Ipv4Addr,
}

/// Whether `prefix` has the harness form `pt` + 4 lowercase hex digits.
pub fn is_valid_prefix(prefix: &str) -> bool {
    prefix.len() == PREFIX_STEM.len() + 4
        && prefix.starts_with(PREFIX_STEM)
        && prefix[PREFIX_STEM.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The lab prefix a namespace name belongs to, if it is a harness namespace.
pub fn prefix_of_namespace(ns: &str) -> Option<&str> {
    let (prefix, rest) = ns.split_at_checked(PREFIX_STEM.len() + 4)?;
    (is_valid_prefix(prefix) && rest.starts_with('-') && rest.len() > 1).then_some(prefix)
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

struct NodeDef {
    name: &'static str,
    index: u8,
    site: &'static str,
    kind: SiteKind,
    underlay: Ipv4Addr,
    net: Ipv4Cidr,
    gw: Ipv4Addr,
    wan: Option<Ipv4Addr>,
    gateway: bool,
}

impl Layout {
    /// The standard topology under `prefix`.
    pub fn new(prefix: &str, spec: &LabSpec) -> Result<Layout> {
        if !is_valid_prefix(prefix) {
            bail!(
                "lab prefix {prefix:?} is not `{PREFIX_STEM}` followed by 4 lowercase hex digits"
            );
        }
        if !(1280..=9000).contains(&spec.underlay_mtu) {
            bail!(
                "underlay MTU {} out of range 1280..=9000",
                spec.underlay_mtu
            );
        }
        let ns = |short: &str| format!("{prefix}-{short}");
        let vpc_net = Ipv4Cidr::new(ip(192, 168, 0, 0), 24);
        let x_net = Ipv4Cidr::new(ip(192, 168, 10, 0), 24);
        let wan_net = Ipv4Cidr::new(ip(203, 0, 113, 0), 24);
        let a_net = Ipv4Cidr::new(ip(10, 0, 1, 0), 24);
        let b_net = Ipv4Cidr::new(ip(10, 0, 2, 0), 24);
        let c_net = Ipv4Cidr::new(ip(10, 0, 3, 0), 24);
        let vpc_router_ip = vpc_net.nth(1);
        let express_router_ip = x_net.nth(1);

        let mut sites = vec![
            Site {
                name: "vpc".into(),
                kind: SiteKind::Cloud,
                underlay: vpc_net,
                router: None,
            },
            Site {
                name: "site-a".into(),
                kind: SiteKind::Public,
                underlay: a_net,
                router: Some("rt-a".into()),
            },
            Site {
                name: "site-b".into(),
                kind: SiteKind::Public,
                underlay: b_net,
                router: Some("rt-b".into()),
            },
            Site {
                name: "site-x".into(),
                kind: SiteKind::ExpressConnect,
                underlay: x_net,
                router: None,
            },
        ];
        let mut defs = vec![
            NodeDef {
                name: "cloud-1",
                index: 1,
                site: "vpc",
                kind: SiteKind::Cloud,
                underlay: vpc_net.nth(11),
                net: vpc_net,
                gw: vpc_router_ip,
                wan: None,
                gateway: false,
            },
            NodeDef {
                name: "gw-1",
                index: 2,
                site: "vpc",
                kind: SiteKind::Cloud,
                underlay: vpc_net.nth(12),
                net: vpc_net,
                gw: vpc_router_ip,
                wan: Some(wan_net.nth(10)),
                gateway: true,
            },
            NodeDef {
                name: "edge-a1",
                index: 3,
                site: "site-a",
                kind: SiteKind::Public,
                underlay: a_net.nth(2),
                net: a_net,
                gw: a_net.nth(1),
                wan: None,
                gateway: false,
            },
            NodeDef {
                name: "edge-a2",
                index: 4,
                site: "site-a",
                kind: SiteKind::Public,
                underlay: a_net.nth(3),
                net: a_net,
                gw: a_net.nth(1),
                wan: None,
                gateway: false,
            },
            NodeDef {
                name: "edge-b1",
                index: 5,
                site: "site-b",
                kind: SiteKind::Public,
                underlay: b_net.nth(2),
                net: b_net,
                gw: b_net.nth(1),
                wan: None,
                gateway: false,
            },
            NodeDef {
                name: "x1",
                index: 6,
                site: "site-x",
                kind: SiteKind::ExpressConnect,
                underlay: x_net.nth(2),
                net: x_net,
                gw: express_router_ip,
                wan: None,
                gateway: false,
            },
        ];
        if spec.second_hub {
            defs.push(NodeDef {
                name: "gw-3",
                index: 7,
                site: "vpc",
                kind: SiteKind::Cloud,
                underlay: vpc_net.nth(13),
                net: vpc_net,
                gw: vpc_router_ip,
                wan: Some(wan_net.nth(11)),
                gateway: true,
            });
        }
        if spec.third_site {
            sites.push(Site {
                name: "site-c".into(),
                kind: SiteKind::Public,
                underlay: c_net,
                router: Some("rt-c".into()),
            });
            // Index 8 whether or not gw-3 (7) exists, so edge-c1's addresses never shift.
            defs.push(NodeDef {
                name: "edge-c1",
                index: 8,
                site: "site-c",
                kind: SiteKind::Public,
                underlay: c_net.nth(2),
                net: c_net,
                gw: c_net.nth(1),
                wan: None,
                gateway: false,
            });
        }
        let nodes = defs
            .iter()
            .map(|d| {
                let pod_cidr = Ipv4Cidr::new(ip(10, 244, d.index, 0), 24);
                Node {
                    name: d.name.into(),
                    index: d.index,
                    site: d.site.into(),
                    site_kind: d.kind,
                    ns: ns(d.name),
                    pod_ns: ns(&format!("{}-pod", d.name)),
                    underlay_dev: UNDERLAY_DEV.into(),
                    underlay_ip: d.underlay,
                    underlay_net: d.net,
                    default_gw: d.gw,
                    public_ip: d.underlay,
                    wan_ip: d.wan,
                    pod_cidr,
                    pod_ip: pod_cidr.nth(2),
                    vtep_ip: pod_cidr.nth(0),
                    cni_ip: pod_cidr.nth(1),
                    vtep_mac: format!("02:fa:00:00:00:{:02x}", d.index),
                    gateway: d.gateway,
                    kubelet_port: KUBELET_PORT,
                }
            })
            .collect();
        let router = |name: &str, site: &str, host: u8, lan: Ipv4Cidr, nat: NatMapping| Router {
            name: name.into(),
            site: site.into(),
            ns: ns(name),
            wan_ip: wan_net.nth(u32::from(host)),
            alt_wan_ip: wan_net.nth(100 + u32::from(host)),
            wan_net,
            wan_gw: wan_net.nth(1),
            lan_ip: lan.nth(1),
            lan_net: lan,
            nat,
        };
        let mut routers = vec![
            router("rt-a", "site-a", 2, a_net, NatMapping::PortPreserving),
            router("rt-b", "site-b", 3, b_net, NatMapping::PortPreserving),
        ];
        if spec.third_site {
            routers.push(router("rt-c", "site-c", 4, c_net, NatMapping::RandomPorts));
        }
        Ok(Layout {
            prefix: prefix.into(),
            underlay_mtu: spec.underlay_mtu,
            flannel_mtu: spec.underlay_mtu - 50,
            sites,
            nodes,
            routers,
            apiserver: Host {
                name: "apiserver".into(),
                ns: ns("apiserver"),
                ip: vpc_net.nth(100),
                net: vpc_net,
                default_gw: vpc_router_ip,
            },
            wan_ns: ns("wan"),
            wan_ip: wan_net.nth(1),
            wan_net,
            vpc_ns: ns("vpc"),
            vpc_router_ip,
            express_router_ip,
        })
    }

    /// Every namespace of the lab, infrastructure first, pods last.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![
            self.wan_ns.clone(),
            self.vpc_ns.clone(),
            self.apiserver.ns.clone(),
        ];
        v.extend(self.routers.iter().map(|r| r.ns.clone()));
        v.extend(self.nodes.iter().map(|n| n.ns.clone()));
        v.extend(self.nodes.iter().map(|n| n.pod_ns.clone()));
        v
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The site called `name`.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// The NAT router of site `site` (or the router called `site`).
    pub fn router(&self, site: &str) -> Option<&Router> {
        self.routers
            .iter()
            .find(|r| r.site == site || r.name == site)
    }

    /// The node labelled cloud-gateway.
    pub fn gateway(&self) -> Option<&Node> {
        self.nodes.iter().find(|n| n.gateway)
    }

    /// Every veth pair of the lab.
    pub fn veth_pairs(&self) -> Vec<VethPair> {
        let m = self.underlay_mtu;
        let pair = |a_ns: &str, a_dev: &str, b_ns: &str, b_dev: &str, mtu: u32| VethPair {
            a_ns: a_ns.into(),
            a_dev: a_dev.into(),
            b_ns: b_ns.into(),
            b_dev: b_dev.into(),
            mtu,
        };
        let mut v = Vec::new();
        for n in &self.nodes {
            let port = format!("p-{}", n.name);
            match n.site_kind {
                SiteKind::Cloud => v.push(pair(&self.vpc_ns, &port, &n.ns, UNDERLAY_DEV, m)),
                SiteKind::ExpressConnect => v.push(pair(
                    &self.vpc_ns,
                    EXPRESS_CONNECT_DEV,
                    &n.ns,
                    UNDERLAY_DEV,
                    m,
                )),
                SiteKind::Public => {
                    if let Some(r) = self.router(&n.site) {
                        v.push(pair(&r.ns, &port, &n.ns, UNDERLAY_DEV, m));
                    }
                }
            }
            if n.wan_ip.is_some() {
                v.push(pair(&self.wan_ns, &port, &n.ns, WAN_DEV, m));
            }
            v.push(pair(
                &n.ns,
                POD_VETH,
                &n.pod_ns,
                UNDERLAY_DEV,
                self.flannel_mtu,
            ));
        }
        v.push(pair(
            &self.vpc_ns,
            &format!("p-{}", self.apiserver.name),
            &self.apiserver.ns,
            UNDERLAY_DEV,
            m,
        ));
        for r in &self.routers {
            v.push(pair(
                &self.wan_ns,
                &format!("p-{}", r.name),
                &r.ns,
                WAN_DEV,
                m,
            ));
        }
        v
    }

    /// The Petrel inventory (TOML) describing this lab.
    pub fn inventory_toml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Petrel inventory of network-namespace lab {} (generated by petrel-e2e).",
            self.prefix
        );
        for site in &self.sites {
            let _ = writeln!(
                s,
                "\n[[sites]]\nname = {}\nkind = {}",
                toml_str(&site.name),
                toml_str(site.kind.as_str())
            );
        }
        for n in &self.nodes {
            let _ = write!(
                s,
                "\n[[nodes]]\nname = {}\nsite = {}\naddresses = [{}]\npod_cidrs = [{}]\nvtep_mac = {}\n\
                 public_ip = {}\nkubelet_port = {}\ngateway = {}\n",
                toml_str(&n.name),
                toml_str(&n.site),
                toml_str(&n.underlay_ip.to_string()),
                toml_str(&n.pod_cidr.to_string()),
                toml_str(&n.vtep_mac),
                toml_str(&n.public_ip.to_string()),
                n.kubelet_port,
                n.gateway,
            );
        }
        s
    }

    /// A human-readable table of the layout.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lab {}: underlay MTU {}, flannel MTU {}, VXLAN VNI {} port {}; namespaces `{}-<name>`",
            self.prefix, self.underlay_mtu, self.flannel_mtu, VXLAN_VNI, VXLAN_PORT, self.prefix
        );
        let mut rows: Vec<[String; 9]> = vec![[
            "NODE".into(),
            "SITE".into(),
            "KIND".into(),
            "UNDERLAY (eth0)".into(),
            "PUBLIC-IP".into(),
            "WAN".into(),
            "POD CIDR".into(),
            "POD IP".into(),
            "VTEP MAC".into(),
        ]];
        for n in &self.nodes {
            rows.push([
                format!("{}{}", n.name, if n.gateway { " *" } else { "" }),
                n.site.clone(),
                n.site_kind.to_string(),
                format!("{}/{}", n.underlay_ip, n.underlay_net.prefix_len),
                n.public_ip.to_string(),
                n.wan_ip.map_or_else(
                    || "-".into(),
                    |w| format!("{w}/{}", self.wan_net.prefix_len),
                ),
                n.pod_cidr.to_string(),
                n.pod_ip.to_string(),
                n.vtep_mac.clone(),
            ]);
        }
        let widths: Vec<usize> = (0..9)
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(s, "{}", line.join("  ").trim_end());
        }
        let _ = writeln!(
            s,
            "(* = cloud-gateway label; a node's pod namespace is `<node>-pod`)\n"
        );
        let _ = writeln!(
            s,
            "vpc        switch {} {}/{} (VPC router, no default route), {} {}/{} leased line to site-x",
            SWITCH_BRIDGE,
            self.vpc_router_ip,
            self.sites[0].underlay.prefix_len,
            EXPRESS_CONNECT_DEV,
            self.express_router_ip,
            self.site("site-x").map_or(24, |x| x.underlay.prefix_len),
        );
        let _ = writeln!(
            s,
            "apiserver  {} {}/{} via {}",
            UNDERLAY_DEV,
            self.apiserver.ip,
            self.apiserver.net.prefix_len,
            self.apiserver.default_gw
        );
        let _ = writeln!(
            s,
            "wan        switch {} {}/{} (the internet; routes nothing)",
            SWITCH_BRIDGE, self.wan_ip, self.wan_net.prefix_len
        );
        for r in &self.routers {
            let _ = writeln!(
                s,
                "{:<10} {} {}/{} (rebinds to {}), {} {} LAN {}; {}, WAN->LAN only ct established,related",
                r.name,
                WAN_DEV,
                r.wan_ip,
                r.wan_net.prefix_len,
                r.alt_wan_ip,
                r.site,
                LAN_BRIDGE,
                r.lan_net,
                r.nat.nft_statement()
            );
        }
        s
    }
}

/// A TOML basic string.
fn toml_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{:04X}", u32::from(c));
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        match Layout::new("pt0abc", &LabSpec::default()) {
            Ok(l) => l,
            Err(e) => panic!("{e:#}"),
        }
    }

    #[test]
    fn prefixes() {
        assert!(is_valid_prefix("pt0abc"));
        assert!(!is_valid_prefix("pt0ABC"));
        assert!(!is_valid_prefix("pt0ab"));
        assert!(!is_valid_prefix("xx0abc"));
        assert_eq!(prefix_of_namespace("pt12ef-edge-a1-pod"), Some("pt12ef"));
        assert_eq!(prefix_of_namespace("pt12ef-"), None);
        assert_eq!(prefix_of_namespace("fl-n1"), None);
        assert_eq!(prefix_of_namespace("pt12efx-a"), None);
    }

    #[test]
    fn addresses() {
        let l = layout();
        let a1 = l.node("edge-a1").map(|n| {
            (
                n.underlay_ip,
                n.pod_cidr.to_string(),
                n.vtep_mac.clone(),
                n.public_ip,
            )
        });
        assert_eq!(
            a1,
            Some((
                ip(10, 0, 1, 2),
                "10.244.3.0/24".to_string(),
                "02:fa:00:00:00:03".into(),
                ip(10, 0, 1, 2)
            ))
        );
        assert_eq!(
            l.gateway().map(|g| g.wan_ip),
            Some(Some(ip(203, 0, 113, 10)))
        );
        assert_eq!(l.flannel_mtu, 1450);
        assert_eq!(l.namespaces().len(), 17);
        let mut names = l.namespaces();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 17, "namespace names are unique");
        for p in l.veth_pairs() {
            assert!(p.a_dev.len() <= 15 && p.b_dev.len() <= 15, "{p:?}");
        }
        assert!(Ipv4Cidr::new(ip(10, 244, 3, 7), 24).contains(ip(10, 244, 3, 200)));
        assert_eq!(
            Ipv4Cidr::new(ip(10, 244, 3, 7), 24).to_string(),
            "10.244.3.0/24"
        );
    }

    #[test]
    fn inventory_shape() {
        let inv = layout().inventory_toml();
        let expected =
            "[[nodes]]\nname = \"edge-a1\"\nsite = \"site-a\"\naddresses = [\"10.0.1.2\"]\n\
                        pod_cidrs = [\"10.244.3.0/24\"]\nvtep_mac = \"02:fa:00:00:00:03\"\n\
                        public_ip = \"10.0.1.2\"\nkubelet_port = 10250\ngateway = false\n";
        assert!(inv.contains(expected), "{inv}");
        assert!(
            inv.contains("[[sites]]\nname = \"vpc\"\nkind = \"cloud\"\n"),
            "{inv}"
        );
        assert!(
            inv.contains("[[sites]]\nname = \"site-x\"\nkind = \"express-connect\"\n"),
            "{inv}"
        );
        assert!(
            inv.contains("name = \"gw-1\"\nsite = \"vpc\"\naddresses = [\"192.168.0.12\"]"),
            "{inv}"
        );
        assert_eq!(inv.matches("gateway = true").count(), 1);
        assert_eq!(inv.matches("[[nodes]]").count(), 6);
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }

    #[test]
    fn table_mentions_every_node() {
        let t = layout().render_table();
        for n in [
            "cloud-1",
            "gw-1 *",
            "edge-a1",
            "edge-a2",
            "edge-b1",
            "x1",
            "rt-a",
            "rt-b",
            "203.0.113.10/24",
        ] {
            assert!(t.contains(n), "{n} missing from\n{t}");
        }
        for n in ["edge-c1", "rt-c", "gw-3", "masquerade random"] {
            assert!(!t.contains(n), "{n} in the default table\n{t}");
        }
    }

    fn layout_with(second_hub: bool, third_site: bool) -> Layout {
        let spec = LabSpec {
            second_hub,
            third_site,
            ..LabSpec::default()
        };
        match Layout::new("pt0abc", &spec) {
            Ok(l) => l,
            Err(e) => panic!("{e:#}"),
        }
    }

    #[test]
    fn nat_mappings() {
        let l = layout();
        assert_eq!(l.routers.len(), 2);
        assert!(l
            .routers
            .iter()
            .all(|r| r.nat == NatMapping::PortPreserving));
        assert!(l.site("site-c").is_none() && l.router("site-c").is_none());
        assert!(l.node("edge-c1").is_none());
        assert_eq!(NatMapping::PortPreserving.nft_statement(), "masquerade");
        assert_eq!(NatMapping::RandomPorts.nft_statement(), "masquerade random");
    }

    #[test]
    fn third_site() {
        for second_hub in [false, true] {
            let l = layout_with(second_hub, true);
            let c = l
                .site("site-c")
                .map(|s| (s.kind, s.underlay.to_string(), s.router.clone()));
            assert_eq!(
                c,
                Some((SiteKind::Public, "10.0.3.0/24".into(), Some("rt-c".into())))
            );
            let n = match l.node("edge-c1") {
                Some(n) => n,
                None => panic!("no edge-c1"),
            };
            assert_eq!(
                (
                    n.index,
                    n.site.as_str(),
                    n.site_kind,
                    n.underlay_ip,
                    n.public_ip,
                    n.default_gw,
                    n.pod_cidr.to_string(),
                    n.pod_ip,
                    n.vtep_mac.as_str(),
                    n.wan_ip,
                    n.gateway,
                ),
                (
                    8,
                    "site-c",
                    SiteKind::Public,
                    ip(10, 0, 3, 2),
                    ip(10, 0, 3, 2),
                    ip(10, 0, 3, 1),
                    "10.244.8.0/24".into(),
                    ip(10, 244, 8, 2),
                    "02:fa:00:00:00:08",
                    None,
                    false,
                )
            );
            let r = match l.router("site-c") {
                Some(r) => r,
                None => panic!("no rt-c"),
            };
            assert_eq!(
                (
                    r.name.as_str(),
                    r.wan_ip,
                    r.alt_wan_ip,
                    r.lan_ip,
                    r.lan_net,
                    r.nat
                ),
                (
                    "rt-c",
                    ip(203, 0, 113, 4),
                    ip(203, 0, 113, 104),
                    ip(10, 0, 3, 1),
                    Ipv4Cidr::new(ip(10, 0, 3, 0), 24),
                    NatMapping::RandomPorts
                )
            );
            assert_eq!(
                l.router("rt-a").map(|r| r.nat),
                Some(NatMapping::PortPreserving)
            );
            assert_eq!(
                l.router("rt-b").map(|r| r.nat),
                Some(NatMapping::PortPreserving)
            );
            // The other nodes keep their indices; nodes stay in index order.
            let indices: Vec<u8> = l.nodes.iter().map(|n| n.index).collect();
            let expected: Vec<u8> = if second_hub {
                vec![1, 2, 3, 4, 5, 6, 7, 8]
            } else {
                vec![1, 2, 3, 4, 5, 6, 8]
            };
            assert_eq!(indices, expected);
            assert_eq!(l.gateway().map(|g| g.name.as_str()), Some("gw-1"));
            // rt-c, edge-c1, edge-c1-pod (and gw-3, gw-3-pod).
            let count = 17 + 3 + if second_hub { 2 } else { 0 };
            let mut names = l.namespaces();
            assert_eq!(names.len(), count);
            names.sort();
            names.dedup();
            assert_eq!(names.len(), count, "namespace names are unique");
            for ns in ["pt0abc-rt-c", "pt0abc-edge-c1", "pt0abc-edge-c1-pod"] {
                assert!(names.iter().any(|n| n == ns), "{ns} missing");
            }
            let pairs = l.veth_pairs();
            for p in &pairs {
                assert!(p.a_dev.len() <= 15 && p.b_dev.len() <= 15, "{p:?}");
            }
            let has = |a_ns: &str, a_dev: &str, b_ns: &str, b_dev: &str| {
                pairs.iter().any(|p| {
                    (
                        p.a_ns.as_str(),
                        p.a_dev.as_str(),
                        p.b_ns.as_str(),
                        p.b_dev.as_str(),
                    ) == (a_ns, a_dev, b_ns, b_dev)
                })
            };
            assert!(has(
                "pt0abc-rt-c",
                "p-edge-c1",
                "pt0abc-edge-c1",
                UNDERLAY_DEV
            ));
            assert!(has("pt0abc-wan", "p-rt-c", "pt0abc-rt-c", WAN_DEV));
            assert!(has(
                "pt0abc-edge-c1",
                POD_VETH,
                "pt0abc-edge-c1-pod",
                UNDERLAY_DEV
            ));
            // WAN and pod addresses are unique.
            let mut wan: Vec<Ipv4Addr> = l
                .routers
                .iter()
                .flat_map(|r| [r.wan_ip, r.alt_wan_ip])
                .chain(l.nodes.iter().filter_map(|n| n.wan_ip))
                .chain([l.wan_ip])
                .collect();
            let all = wan.len();
            wan.sort();
            wan.dedup();
            assert_eq!(wan.len(), all, "WAN addresses are unique");
            let inv = l.inventory_toml();
            assert!(
                inv.contains("[[sites]]\nname = \"site-c\"\nkind = \"public\"\n"),
                "{inv}"
            );
            assert!(
                inv.contains(
                    "[[nodes]]\nname = \"edge-c1\"\nsite = \"site-c\"\naddresses = [\"10.0.3.2\"]\n\
                     pod_cidrs = [\"10.244.8.0/24\"]\nvtep_mac = \"02:fa:00:00:00:08\"\n\
                     public_ip = \"10.0.3.2\"\nkubelet_port = 10250\ngateway = false\n"
                ),
                "{inv}"
            );
            assert_eq!(
                inv.matches("[[nodes]]").count(),
                if second_hub { 8 } else { 7 }
            );
            let t = l.render_table();
            for s in [
                "edge-c1",
                "site-c",
                "10.0.3.2/24",
                "10.244.8.0/24",
                "02:fa:00:00:00:08",
                "rt-c       wan0 203.0.113.4/24 (rebinds to 203.0.113.104), site-c lan0 LAN 10.0.3.0/24; masquerade random,",
                "rt-a       wan0 203.0.113.2/24 (rebinds to 203.0.113.102), site-a lan0 LAN 10.0.1.0/24; masquerade,",
            ] {
                assert!(t.contains(s), "{s} missing from\n{t}");
            }
        }
    }
}
