//! Kernel feature probe for the fast hook: can a VXLAN device have local bypass turned off?
//!
//! We create a throw-away VXLAN device (never brought up, so it binds no UDP port) with
//! `IFLA_VXLAN_LOCALBYPASS = 0`, read it back and delete it. Kernels before 6.6 do not know the
//! attribute and ignore it, so it is absent from the dump (or, should a kernel accept but not
//! honour it, it reads back as 1). Synchronous on purpose: a plain blocking netlink socket in the
//! calling thread's network namespace, usable before any runtime exists.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::error::DatapathError;
use crate::nl::Link;

static PROBE_SEQ: AtomicU32 = AtomicU32::new(1);

/// Whether this kernel can turn off VXLAN local bypass (`IFLA_VXLAN_LOCALBYPASS`, Linux >= 6.6),
/// which the fast hook needs for a local relay. Needs CAP_NET_ADMIN in the current network
/// namespace; creates and deletes a down VXLAN device named `pdprobe<hex>`.
pub fn detect_fast_support() -> Result<bool, DatapathError> {
    let sock = SyncNetlink::open()?;
    let unique = std::process::id()
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
        ^ PROBE_SEQ.fetch_add(0x9e37, Ordering::Relaxed);
    let name = format!("pdprobe{:06x}", unique & 0xff_ffff);
    // A VNI and port nobody uses, so the probe cannot collide with a real device.
    let vni = 0x00ff_f000 | (unique & 0xfff);

    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.clone()));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![
            InfoVxlan::Id(vni),
            InfoVxlan::Port(9),
            InfoVxlan::Learning(false),
            InfoVxlan::Localbypass(false),
        ])),
    ]));
    sock.request(
        RouteNetlinkMessage::NewLink(msg),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(|e| DatapathError::netlink("create probe vxlan", name.clone(), e))?;

    let mut get = LinkMessage::default();
    get.attributes.push(LinkAttribute::IfName(name.clone()));
    let read = sock.request(RouteNetlinkMessage::GetLink(get), 0);

    let mut del = LinkMessage::default();
    del.attributes.push(LinkAttribute::IfName(name.clone()));
    let deleted = sock.request(RouteNetlinkMessage::DelLink(del), NLM_F_ACK);

    let answers = read.map_err(|e| DatapathError::netlink("read probe vxlan", name.clone(), e))?;
    deleted.map_err(|e| DatapathError::netlink("delete probe vxlan", name.clone(), e))?;
    let localbypass = answers.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Link::from_msg(l).vxlan_localbypass(),
        _ => None,
    });
    Ok(localbypass == Some(false))
}

/// A blocking NETLINK_ROUTE socket for one-shot requests.
struct SyncNetlink {
    sock: Socket,
    seq: AtomicU32,
}

impl SyncNetlink {
    fn open() -> Result<Self, DatapathError> {
        let err = |source| DatapathError::Socket {
            what: "NETLINK_ROUTE (probe)".into(),
            source,
        };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(err)?;
        sock.bind_auto().map_err(err)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        Ok(SyncNetlink {
            sock,
            seq: AtomicU32::new(1),
        })
    }

    fn request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.header.sequence_number = seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < data.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zero-length netlink message",
                    ));
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(_) => Err(e.to_io()),
                            None => Ok(out),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        // A non-dump GET answers with one message and no ACK.
                        if flags & NLM_F_ACK == 0 && m.header.flags & 2 == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
