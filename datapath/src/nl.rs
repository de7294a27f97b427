//! Thin async rtnetlink layer: one request helper (ACK or dump) on top of `rtnetlink::Handle`,
//! message builders for the objects we own, and typed views of what the kernel dumps.
//!
//! We build `netlink-packet-route` messages directly (rather than through rtnetlink's
//! builders) so every flag is explicit: `NLM_F_REPLACE` for neighbours, FDB and routes, the
//! `NTF_SELF` flag of VXLAN FDB entries, `RTAX_LOCK` for the route MTU, the VXLAN attributes.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::StreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric,
    RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use tokio::task::JoinHandle;

use crate::error::DatapathError;

/// `RTAX_MTU`: index of the MTU metric; `RTAX_LOCK` holds a bitmask of locked metrics.
pub(crate) const RTAX_MTU: u32 = 2;

/// An rtnetlink connection whose driver task lives as long as this value.
pub(crate) struct Netlink {
    handle: rtnetlink::Handle,
    task: JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network namespace.
    pub(crate) fn connect() -> Result<Self, DatapathError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| DatapathError::NoRuntime {
            what: "the netlink connection",
        })?;
        let (conn, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(|source| DatapathError::Socket {
                what: "NETLINK_ROUTE".into(),
                source,
            })?;
        let task = rt.spawn(conn);
        Ok(Netlink { handle, task })
    }

    /// Sends one request and collects the answers. Errors carry the kernel's errno.
    async fn request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.finalize();
        let mut handle = self.handle.clone();
        let mut answers = handle
            .request(req)
            .map_err(|_| io::Error::other("netlink connection closed"))?;
        let mut out = Vec::new();
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Done(_) => break,
                _ => {}
            }
        }
        Ok(out)
    }

    async fn ack(
        &self,
        op: &'static str,
        object: impl Into<String>,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), DatapathError> {
        self.request(msg, NLM_F_ACK | flags)
            .await
            .map(|_| ())
            .map_err(|e| DatapathError::netlink(op, object, e))
    }

    async fn dump(
        &self,
        what: &'static str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, DatapathError> {
        self.request(msg, NLM_F_DUMP)
            .await
            .map_err(|e| DatapathError::netlink("dump", what, e))
    }

    // ---------------------------------------------------------------- links

    /// The link called `name`, or `None`.
    pub(crate) async fn link_by_name(&self, name: &str) -> Result<Option<Link>, DatapathError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0).await {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(&l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(DatapathError::netlink("get link", name, e)),
        }
    }

    /// Creates a VXLAN device (down).
    pub(crate) async fn add_vxlan(&self, spec: &VxlanSpec) -> Result<(), DatapathError> {
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::IfName(spec.name.clone()));
        msg.attributes
            .push(LinkAttribute::Address(spec.mac.to_vec()));
        msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(spec.info_data())),
        ]));
        self.ack(
            "create vxlan",
            spec.name.clone(),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .await
    }

    /// Sets MTU, MAC address and the UP flag of an existing link.
    pub(crate) async fn set_link(
        &self,
        index: u32,
        name: &str,
        mtu: Option<u32>,
        mac: Option<[u8; 6]>,
        up: bool,
    ) -> Result<(), DatapathError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if up {
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
        }
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        self.ack("set link", name, RouteNetlinkMessage::SetLink(msg), 0)
            .await
    }

    /// Deletes a link; `Ok(false)` when it did not exist.
    pub(crate) async fn del_link(&self, index: u32, name: &str) -> Result<bool, DatapathError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self
            .ack("delete link", name, RouteNetlinkMessage::DelLink(msg), 0)
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ---------------------------------------------------------------- routes

    /// IPv4 routes of `table`.
    pub(crate) async fn routes(&self, table: u32) -> Result<Vec<Route>, DatapathError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let all = self
            .dump("routes", RouteNetlinkMessage::GetRoute(msg))
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(Route::from_msg(r)),
                _ => None,
            })
            .filter(|r| r.table == table)
            .collect())
    }

    pub(crate) async fn replace_route(&self, want: &WantRoute) -> Result<(), DatapathError> {
        self.ack(
            "replace route",
            want.describe(),
            RouteNetlinkMessage::NewRoute(want.to_msg()),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }

    /// Deletes exactly the route that was dumped (same table, destination, tos, priority,
    /// next hop).
    pub(crate) async fn del_route(&self, route: &Route) -> Result<(), DatapathError> {
        let r = self
            .ack(
                "delete route",
                route.describe(),
                RouteNetlinkMessage::DelRoute(route.msg.clone()),
                0,
            )
            .await;
        ignore_missing(r)
    }

    // ---------------------------------------------------------------- rules

    /// IPv4 policy rules.
    pub(crate) async fn rules(&self) -> Result<Vec<Rule>, DatapathError> {
        let mut msg = RuleMessage::default();
        msg.header.family = AddressFamily::Inet;
        let all = self
            .dump("rules", RouteNetlinkMessage::GetRule(msg))
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(Rule::from_msg(r)),
                _ => None,
            })
            .collect())
    }

    pub(crate) async fn add_rule(
        &self,
        dst: Ipv4Net,
        table: u32,
        pref: u32,
    ) -> Result<(), DatapathError> {
        let mut msg = RuleMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.dst_len = dst.prefix_len();
        msg.header.table = table_byte(table);
        msg.header.action = RuleAction::ToTable;
        msg.attributes
            .push(RuleAttribute::Destination(IpAddr::V4(dst.network())));
        msg.attributes.push(RuleAttribute::Priority(pref));
        msg.attributes.push(RuleAttribute::Table(table));
        let r = self
            .ack(
                "add rule",
                format!("to {dst} lookup {table} pref {pref}"),
                RouteNetlinkMessage::NewRule(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await;
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    pub(crate) async fn del_rule(&self, rule: &Rule) -> Result<(), DatapathError> {
        let r = self
            .ack(
                "delete rule",
                rule.describe(),
                RouteNetlinkMessage::DelRule(rule.msg.clone()),
                0,
            )
            .await;
        ignore_missing(r)
    }

    // ---------------------------------------------------------------- neighbours / FDB

    /// IPv4 neighbours on `ifindex`.
    pub(crate) async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neigh>, DatapathError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        let all = self
            .dump("neighbours", RouteNetlinkMessage::GetNeighbour(msg))
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == ifindex => {
                    Some(Neigh::from_msg(n))
                }
                _ => None,
            })
            .collect())
    }

    pub(crate) async fn replace_neighbour(
        &self,
        ifindex: u32,
        dev: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), DatapathError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = ifindex;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.ack(
            "replace neighbour",
            format!("{ip} lladdr {} dev {dev}", crate::format_mac(&mac)),
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }

    /// Deletes a dumped neighbour or FDB entry.
    pub(crate) async fn del_neighbour(
        &self,
        msg: &NeighbourMessage,
        what: String,
    ) -> Result<(), DatapathError> {
        let r = self
            .ack(
                "delete neighbour",
                what,
                RouteNetlinkMessage::DelNeighbour(msg.clone()),
                0,
            )
            .await;
        ignore_missing(r)
    }

    /// VXLAN FDB entries (`self`) of `ifindex`.
    pub(crate) async fn fdb(&self, ifindex: u32) -> Result<Vec<Fdb>, DatapathError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = ifindex;
        let all = self
            .dump("fdb", RouteNetlinkMessage::GetNeighbour(msg))
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n)
                    if n.header.ifindex == ifindex && n.header.family == AddressFamily::Bridge =>
                {
                    Some(Fdb::from_msg(n))
                }
                _ => None,
            })
            .collect())
    }

    pub(crate) async fn replace_fdb(
        &self,
        ifindex: u32,
        dev: &str,
        mac: [u8; 6],
        dst: Ipv4Addr,
        port: u16,
    ) -> Result<(), DatapathError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = ifindex;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        msg.attributes.push(NeighbourAttribute::Port(port));
        self.ack(
            "replace fdb",
            format!(
                "{} dst {dst} port {port} self permanent dev {dev}",
                crate::format_mac(&mac)
            ),
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }
}

fn ignore_missing(r: Result<(), DatapathError>) -> Result<(), DatapathError> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
        other => other,
    }
}

/// The 8-bit table field of rtmsg/fib_rule_hdr: the table itself when it fits, else
/// `RT_TABLE_UNSPEC` with the real number in the `TABLE` attribute (what iproute2 does).
fn table_byte(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

fn mac6(bytes: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(bytes).ok()
}

// -------------------------------------------------------------------- typed views

/// What we need to know about a link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub index: u32,
    pub kind: Option<InfoKind>,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    pub vxlan: Vec<InfoVxlan>,
}

impl Link {
    pub(crate) fn from_msg(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            kind: None,
            mac: None,
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            vxlan: Vec::new(),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::Address(b) => link.mac = mac6(b),
                LinkAttribute::Mtu(v) => link.mtu = *v,
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => link.kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = v.clone(),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub(crate) fn vxlan_id(&self) -> Option<u32> {
        self.vxlan.iter().find_map(|a| match a {
            InfoVxlan::Id(v) => Some(*v),
            _ => None,
        })
    }
    pub(crate) fn vxlan_port(&self) -> Option<u16> {
        self.vxlan.iter().find_map(|a| match a {
            InfoVxlan::Port(v) => Some(*v),
            _ => None,
        })
    }
    pub(crate) fn vxlan_local(&self) -> Option<Ipv4Addr> {
        self.vxlan.iter().find_map(|a| match a {
            InfoVxlan::Local(v) => Some(*v),
            _ => None,
        })
    }
    pub(crate) fn vxlan_link(&self) -> Option<u32> {
        self.vxlan.iter().find_map(|a| match a {
            InfoVxlan::Link(v) => Some(*v),
            _ => None,
        })
    }
    pub(crate) fn vxlan_learning(&self) -> Option<bool> {
        self.vxlan.iter().find_map(|a| match a {
            InfoVxlan::Learning(v) => Some(*v),
            _ => None,
        })
    }
    /// `None` when the kernel does not know the attribute (< 6.6).
    pub(crate) fn vxlan_localbypass(&self) -> Option<bool> {
        self.vxlan.iter().find_map(|a| match a {
            InfoVxlan::Localbypass(v) => Some(*v),
            _ => None,
        })
    }
}

/// The VXLAN device we want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Option<Ipv4Addr>,
    pub underlay: Option<u32>,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// `Some(false)`: turn local bypass off; `None`: leave the kernel default (attribute absent).
    pub localbypass: Option<bool>,
}

impl VxlanSpec {
    fn info_data(&self) -> Vec<InfoVxlan> {
        let mut v = vec![
            InfoVxlan::Id(self.vni),
            InfoVxlan::Port(self.port),
            InfoVxlan::Learning(false),
        ];
        if let Some(local) = self.local {
            v.push(InfoVxlan::Local(local));
        }
        if let Some(dev) = self.underlay {
            v.push(InfoVxlan::Link(dev));
        }
        if let Some(lb) = self.localbypass {
            v.push(InfoVxlan::Localbypass(lb));
        }
        v
    }

    /// Whether an existing link has every attribute of this spec that cannot be changed in place
    /// (kind, VNI, port, local, underlay, learning, local bypass). MTU, MAC and UP are set in
    /// place by the caller.
    pub(crate) fn matches_immutable(&self, l: &Link) -> bool {
        l.kind == Some(InfoKind::Vxlan)
            && l.vxlan_id() == Some(self.vni)
            && l.vxlan_port() == Some(self.port)
            && l.vxlan_local() == self.local
            && l.vxlan_link() == self.underlay
            && l.vxlan_learning() == Some(false)
            && match self.localbypass {
                Some(want) => l.vxlan_localbypass() == Some(want),
                None => true,
            }
    }
}

/// A route as dumped (the raw message is kept for an exact delete).
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub table: u32,
    pub dst: Option<Ipv4Net>,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: Option<u32>,
    pub mtu_locked: bool,
    pub onlink: bool,
    pub priority: u32,
    pub tos: u8,
    pub kind: RouteType,
    pub msg: RouteMessage,
}

impl Route {
    fn from_msg(msg: RouteMessage) -> Self {
        let mut r = Route {
            table: u32::from(msg.header.table),
            dst: None,
            oif: None,
            gateway: None,
            mtu: None,
            mtu_locked: false,
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
            priority: 0,
            tos: msg.header.tos,
            kind: msg.header.kind,
            msg: RouteMessage::default(),
        };
        let mut dst_addr = None;
        for a in &msg.attributes {
            match a {
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst_addr = Some(*ip),
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.gateway = Some(*ip),
                RouteAttribute::Priority(p) => r.priority = *p,
                RouteAttribute::Metrics(ms) => {
                    for m in ms {
                        match m {
                            RouteMetric::Mtu(v) => r.mtu = Some(*v),
                            RouteMetric::Lock(bits) => r.mtu_locked = bits & (1 << RTAX_MTU) != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let plen = msg.header.destination_prefix_length;
        r.dst = Ipv4Net::new(dst_addr.unwrap_or(Ipv4Addr::UNSPECIFIED), plen).ok();
        r.msg = msg;
        r
    }

    pub(crate) fn describe(&self) -> String {
        let dst = self.dst.map_or_else(|| "?".to_string(), |d| d.to_string());
        format!("{dst} table {}", self.table)
    }

    pub(crate) fn satisfies(&self, want: &WantRoute) -> bool {
        self.dst == Some(want.dst)
            && self.kind == RouteType::Unicast
            && self.oif == Some(want.oif)
            && self.gateway == want.via
            && self.onlink == want.via.is_some()
            && self.mtu == Some(u32::from(want.mtu))
            && self.mtu_locked
            && self.priority == 0
            && self.tos == 0
    }
}

/// A route we want in our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WantRoute {
    pub table: u32,
    pub dst: Ipv4Net,
    pub oif: u32,
    pub dev: String,
    /// `Some(gw)`: `via gw onlink` (fast hook); `None`: `dev` only, scope link (portable).
    pub via: Option<Ipv4Addr>,
    pub mtu: u16,
}

impl WantRoute {
    fn to_msg(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = self.dst.prefix_len();
        msg.header.table = table_byte(self.table);
        msg.header.protocol = RouteProtocol::Static;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if self.via.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        msg.attributes.push(RouteAttribute::Table(self.table));
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                self.dst.network(),
            )));
        if let Some(gw) = self.via {
            msg.header.flags = RouteFlags::Onlink;
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(self.oif));
        msg.attributes.push(RouteAttribute::Metrics(vec![
            RouteMetric::Lock(1 << RTAX_MTU),
            RouteMetric::Mtu(u32::from(self.mtu)),
        ]));
        msg
    }

    pub(crate) fn describe(&self) -> String {
        match self.via {
            Some(gw) => format!(
                "{} via {gw} dev {} onlink mtu lock {} table {}",
                self.dst, self.dev, self.mtu, self.table
            ),
            None => format!(
                "{} dev {} mtu lock {} table {}",
                self.dst, self.dev, self.mtu, self.table
            ),
        }
    }
}

/// A policy rule as dumped.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub table: u32,
    pub priority: u32,
    pub dst: Option<Ipv4Net>,
    /// Any selector besides `to` (from, iif, oif, fwmark, ...), or a non-`lookup` action.
    pub has_other_selectors: bool,
    pub msg: RuleMessage,
}

impl Rule {
    fn from_msg(msg: RuleMessage) -> Self {
        let mut table = u32::from(msg.header.table);
        let mut priority = 0;
        let mut dst_addr = None;
        let mut other = msg.header.src_len != 0
            || msg.header.tos != 0
            || msg.header.action != RuleAction::ToTable;
        for a in &msg.attributes {
            match a {
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Priority(p) => priority = *p,
                RuleAttribute::Destination(IpAddr::V4(ip)) => dst_addr = Some(*ip),
                RuleAttribute::Source(_)
                | RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::FwMark(_)
                | RuleAttribute::Goto(_)
                | RuleAttribute::UidRange(_)
                | RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_)
                | RuleAttribute::TunId(_)
                | RuleAttribute::L3MDev(true) => other = true,
                _ => {}
            }
        }
        let dst = if msg.header.dst_len == 0 && dst_addr.is_none() {
            None
        } else {
            Ipv4Net::new(
                dst_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
                msg.header.dst_len,
            )
            .ok()
        };
        Rule {
            table,
            priority,
            dst,
            has_other_selectors: other,
            msg,
        }
    }

    pub(crate) fn describe(&self) -> String {
        let dst = self
            .dst
            .map_or_else(|| "all".to_string(), |d| d.to_string());
        format!("pref {} to {dst} lookup {}", self.priority, self.table)
    }
}

/// An IPv4 neighbour as dumped.
#[derive(Debug, Clone)]
pub(crate) struct Neigh {
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
    pub msg: NeighbourMessage,
}

impl Neigh {
    fn from_msg(msg: NeighbourMessage) -> Self {
        let mut n = Neigh {
            ip: None,
            mac: None,
            permanent: msg.header.state == NeighbourState::Permanent,
            msg: NeighbourMessage::default(),
        };
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => n.ip = Some(*ip),
                NeighbourAttribute::LinkLayerAddress(b) => n.mac = mac6(b),
                _ => {}
            }
        }
        n.msg = msg;
        n
    }
}

/// A VXLAN FDB entry (one remote) as dumped.
#[derive(Debug, Clone)]
pub(crate) struct Fdb {
    pub mac: Option<[u8; 6]>,
    pub dst: Option<Ipv4Addr>,
    /// `None`: the device's own dstport (the kernel omits NDA_PORT then).
    pub port: Option<u16>,
    /// `None`: the device's VNI.
    pub vni: Option<u32>,
    pub via_ifindex: Option<u32>,
    pub permanent: bool,
    pub msg: NeighbourMessage,
}

impl Fdb {
    fn from_msg(msg: NeighbourMessage) -> Self {
        let mut f = Fdb {
            mac: None,
            dst: None,
            port: None,
            vni: None,
            via_ifindex: None,
            permanent: msg.header.state == NeighbourState::Permanent,
            msg: NeighbourMessage::default(),
        };
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(b) => f.mac = mac6(b),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => f.dst = Some(*ip),
                // AF_BRIDGE messages carry the remote as raw bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    f.dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                }
                NeighbourAttribute::Port(p) => f.port = Some(*p),
                NeighbourAttribute::Vni(v) => f.vni = Some(*v),
                NeighbourAttribute::IfIndex(i) => f.via_ifindex = Some(*i),
                _ => {}
            }
        }
        f.msg = msg;
        f
    }
}
