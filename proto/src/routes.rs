//! Route sync: how the cluster's route table reaches agents without growing any single message
//! with the cluster. The table (one [`RouteEntry`] per routable node) is the same for every
//! agent; each agent derives its own routes from it ([`RouteTable::routes_for`]: its own node
//! left out, its own site's nodes direct, every other via the hub). The hub sends it as
//! [`RouteSync`] messages, each a bounded chunk (at most [`MAX_CONTROL_FRAME`] encoded):
//!
//! - a **snapshot** (`reset` on the first chunk) when the agent has nothing the hub can build on;
//! - a **delta** (upserts by node, removals by node name) after each inventory change, so a
//!   change costs each agent bytes in proportion to what changed, not to the cluster;
//! - nothing but the digest when the agent already holds the current table: an agent says in
//!   its `Hello` which table it holds ([`RouteTable::digest`]), so a hub restart with an
//!   unchanged inventory costs no route bytes at all.
//!
//! The last chunk of every batch carries the digest of the table after it; an agent whose table
//! then disagrees discards it and reconnects for a snapshot. The digest is FNV-1a over the
//! canonical encoding in node-name order: stable across builds and platforms, and not a security
//! boundary (the table comes over the authenticated tunnel).
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::codec::{
    self, DecodeError, EncodeError, Reader, Writer, MAX_NODE_NAME_LEN, MAX_POD_CIDRS, MAX_SITE_LEN,
    MIN_IP_ADDR_LEN, MIN_IP_CIDR_LEN, MIN_STRING_LEN,
};
use crate::types::{IpCidr, MacAddr, Route, RoutePath};
use crate::MAX_CONTROL_FRAME;

/// Most entries (and most removals) one [`RouteSync`] may carry; the frame cap binds first for
/// real names, this bounds what a decoder pre-allocates.
pub const MAX_ROUTE_SYNC_ITEMS: usize = 8192;

/// Most nodes an agent's route table holds. Far above any cluster Kubernetes supports; a hub
/// that sends more is refused rather than letting an agent's memory grow without bound.
pub const MAX_ROUTE_TABLE: usize = 100_000;

/// Room left in a frame for a chunk's own fields (flags, counts, digest).
const CHUNK_OVERHEAD: usize = 64;

/// One routable node: where its pod CIDRs live and how to reach its VTEP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteEntry {
    pub node_name: String,
    pub site: String,
    pub pod_cidrs: Vec<IpCidr>,
    pub vtep_mac: MacAddr,
    pub underlay: IpAddr,
    /// The inner MTU of the node's site when it differs from the receiver's (0: not known, use
    /// the receiver's own). Reserved for per-site MTU; carried so older tables stay decodable.
    pub mtu: u16,
}

/// One chunk of a route sync.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RouteSync {
    /// Start from an empty table (first chunk of a snapshot).
    pub reset: bool,
    /// Entries to insert or replace, by node name.
    pub upserts: Vec<RouteEntry>,
    /// Node names to remove.
    pub removals: Vec<String>,
    /// On the last chunk of a batch: the digest of the table once the batch is applied.
    pub digest: Option<u64>,
}

/// Smallest encoded entry, for bounding counts: two one-byte strings, no CIDR, a MAC, an IPv4
/// address, the MTU.
const MIN_ENTRY_LEN: usize = MIN_STRING_LEN * 2 + 4 + 6 + MIN_IP_ADDR_LEN + 2;

pub(crate) fn write_entry(w: &mut Writer<'_>, e: &RouteEntry) -> Result<(), EncodeError> {
    w.checked_string(
        "RouteEntry.node_name",
        &e.node_name,
        MAX_NODE_NAME_LEN,
        codec::check_node_name,
    )?;
    w.checked_string(
        "RouteEntry.site",
        &e.site,
        MAX_SITE_LEN,
        codec::check_site_name,
    )?;
    w.count("RouteEntry.pod_cidrs", e.pod_cidrs.len(), MAX_POD_CIDRS)?;
    for c in &e.pod_cidrs {
        w.ip_cidr(*c);
    }
    w.mac(e.vtep_mac);
    w.ip_addr(e.underlay);
    w.u16(e.mtu);
    Ok(())
}

fn read_entry(r: &mut Reader<'_>) -> Result<RouteEntry, DecodeError> {
    let node_name = r.checked_string(
        "RouteEntry.node_name",
        MAX_NODE_NAME_LEN,
        codec::check_node_name,
    )?;
    let site = r.checked_string("RouteEntry.site", MAX_SITE_LEN, codec::check_site_name)?;
    let n = r.count("RouteEntry.pod_cidrs", MAX_POD_CIDRS, MIN_IP_CIDR_LEN)?;
    let mut pod_cidrs = Vec::with_capacity(n);
    for _ in 0..n {
        pod_cidrs.push(r.ip_cidr("RouteEntry.pod_cidrs")?);
    }
    Ok(RouteEntry {
        node_name,
        site,
        pod_cidrs,
        vtep_mac: r.mac("RouteEntry.vtep_mac")?,
        underlay: r.ip_addr("RouteEntry.underlay")?,
        mtu: r.u16("RouteEntry.mtu")?,
    })
}

pub(crate) fn write_route_sync(w: &mut Writer<'_>, m: &RouteSync) -> Result<(), EncodeError> {
    w.flag(m.reset);
    w.count("RouteSync.upserts", m.upserts.len(), MAX_ROUTE_SYNC_ITEMS)?;
    for e in &m.upserts {
        write_entry(w, e)?;
    }
    w.count("RouteSync.removals", m.removals.len(), MAX_ROUTE_SYNC_ITEMS)?;
    for n in &m.removals {
        w.checked_string(
            "RouteSync.removals",
            n,
            MAX_NODE_NAME_LEN,
            codec::check_node_name,
        )?;
    }
    match m.digest {
        Some(d) => {
            w.flag(true);
            w.u64(d);
        }
        None => w.flag(false),
    }
    Ok(())
}

pub(crate) fn read_route_sync(r: &mut Reader<'_>) -> Result<RouteSync, DecodeError> {
    let reset = r.flag("RouteSync.reset")?;
    let n = r.count("RouteSync.upserts", MAX_ROUTE_SYNC_ITEMS, MIN_ENTRY_LEN)?;
    let mut upserts = Vec::with_capacity(n);
    for _ in 0..n {
        upserts.push(read_entry(r)?);
    }
    let n = r.count("RouteSync.removals", MAX_ROUTE_SYNC_ITEMS, MIN_STRING_LEN)?;
    let mut removals = Vec::with_capacity(n);
    for _ in 0..n {
        removals.push(r.checked_string(
            "RouteSync.removals",
            MAX_NODE_NAME_LEN,
            codec::check_node_name,
        )?);
    }
    let digest = if r.flag("RouteSync.digest")? {
        Some(r.u64("RouteSync.digest")?)
    } else {
        None
    };
    Ok(RouteSync {
        reset,
        upserts,
        removals,
        digest,
    })
}

fn encoded_entry_len(e: &RouteEntry) -> Result<usize, EncodeError> {
    let mut buf = Vec::new();
    write_entry(&mut Writer::new(&mut buf), e)?;
    Ok(buf.len())
}

fn encoded_name_len(n: &str) -> usize {
    // A length prefix and the bytes (the widest prefix the codec uses).
    4 + n.len()
}

/// The cluster's route table, by node name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    entries: BTreeMap<String, RouteEntry>,
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_entries(entries: impl IntoIterator<Item = RouteEntry>) -> Self {
        Self {
            entries: entries
                .into_iter()
                .map(|e| (e.node_name.clone(), e))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, node: &str) -> Option<&RouteEntry> {
        self.entries.get(node)
    }

    pub fn entries(&self) -> impl Iterator<Item = &RouteEntry> {
        self.entries.values()
    }

    /// Applies one chunk.
    pub fn apply(&mut self, m: &RouteSync) {
        if m.reset {
            self.entries.clear();
        }
        for n in &m.removals {
            self.entries.remove(n);
        }
        for e in &m.upserts {
            self.entries.insert(e.node_name.clone(), e.clone());
        }
    }

    /// FNV-1a (64-bit) over the canonical encoding of every entry in node-name order.
    pub fn digest(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = OFFSET;
        let mut buf = Vec::with_capacity(128);
        for e in self.entries.values() {
            buf.clear();
            if write_entry(&mut Writer::new(&mut buf), e).is_err() {
                // An entry that cannot be encoded can never be sent; it still changes the hash.
                buf.extend_from_slice(e.node_name.as_bytes());
            }
            for b in &buf {
                h ^= u64::from(*b);
                h = h.wrapping_mul(PRIME);
            }
        }
        h
    }

    /// What turns `self` into `new`: entries to upsert (new or changed) and names to remove.
    pub fn diff(&self, new: &RouteTable) -> (Vec<RouteEntry>, Vec<String>) {
        let upserts = new
            .entries
            .iter()
            .filter(|(k, v)| self.entries.get(*k) != Some(*v))
            .map(|(_, v)| v.clone())
            .collect();
        let removals = self
            .entries
            .keys()
            .filter(|k| !new.entries.contains_key(*k))
            .cloned()
            .collect();
        (upserts, removals)
    }

    /// The whole table as chunks: `reset` on the first, this table's digest on the last.
    pub fn snapshot(&self) -> Result<Vec<RouteSync>, EncodeError> {
        let mut msgs = chunk(self.entries.values().cloned().collect(), Vec::new())?;
        if let Some(first) = msgs.first_mut() {
            first.reset = true;
        }
        if let Some(last) = msgs.last_mut() {
            last.digest = Some(self.digest());
        }
        Ok(msgs)
    }

    /// The routes an agent on `node` (in `site`) programs: every other node's pod CIDRs, its
    /// own site's direct (Flannel's own path), the rest via the hub.
    pub fn routes_for(&self, node: &str, site: &str) -> Vec<Route> {
        let mut out = Vec::new();
        for e in self.entries.values().filter(|e| e.node_name != node) {
            for c in &e.pod_cidrs {
                out.push(Route {
                    node_name: e.node_name.clone(),
                    site: e.site.clone(),
                    pod_cidr: *c,
                    vtep_mac: e.vtep_mac,
                    underlay: e.underlay,
                    path: if e.site == site {
                        RoutePath::Direct
                    } else {
                        RoutePath::ViaHub
                    },
                });
            }
        }
        out
    }
}

/// A delta as chunks, `digest` (the table's after the delta) on the last. An empty delta is one
/// chunk carrying only the digest.
pub fn delta(
    upserts: Vec<RouteEntry>,
    removals: Vec<String>,
    digest: u64,
) -> Result<Vec<RouteSync>, EncodeError> {
    let mut msgs = chunk(upserts, removals)?;
    if let Some(last) = msgs.last_mut() {
        last.digest = Some(digest);
    }
    Ok(msgs)
}

/// Splits upserts and removals into chunks whose encoding fits one control frame. Always at
/// least one chunk.
fn chunk(upserts: Vec<RouteEntry>, removals: Vec<String>) -> Result<Vec<RouteSync>, EncodeError> {
    let mut c = Chunker {
        msgs: vec![RouteSync::default()],
        used: 0,
        items: 0,
    };
    for e in upserts {
        let len = encoded_entry_len(&e)?;
        c.room(len).upserts.push(e);
    }
    for n in removals {
        let len = encoded_name_len(&n);
        c.room(len).removals.push(n);
    }
    Ok(c.msgs)
}

/// The chunks being filled and what the last one holds.
struct Chunker {
    msgs: Vec<RouteSync>,
    used: usize,
    items: usize,
}

impl Chunker {
    /// The chunk an item of `len` encoded bytes goes into: the last one, or a new one when the
    /// frame budget or the item cap would be passed.
    fn room(&mut self, len: usize) -> &mut RouteSync {
        let budget = MAX_CONTROL_FRAME - CHUNK_OVERHEAD;
        if self.used + len > budget || self.items == MAX_ROUTE_SYNC_ITEMS {
            self.msgs.push(RouteSync::default());
            self.used = 0;
            self.items = 0;
        }
        self.used += len;
        self.items += 1;
        if self.msgs.is_empty() {
            self.msgs.push(RouteSync::default());
        }
        let last = self.msgs.len() - 1;
        &mut self.msgs[last]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::control::{encode, ControlMessage};
    use crate::FrameDecoder;

    fn entry(i: u32, site: &str) -> RouteEntry {
        RouteEntry {
            node_name: format!("edge-node-{i:05}.site.example.internal"),
            site: site.into(),
            pod_cidrs: vec![IpCidr::new(
                IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8))),
                24,
            )
            .unwrap()],
            vtep_mac: MacAddr([0x02, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1]),
            underlay: IpAddr::V4(std::net::Ipv4Addr::from(0xc0a8_0000 + i)),
            mtu: 0,
        }
    }

    fn table(n: u32) -> RouteTable {
        RouteTable::from_entries((0..n).map(|i| entry(i, &format!("site-{}", i % 50))))
    }

    fn wire_round_trip(msgs: &[RouteSync]) -> Vec<RouteSync> {
        let mut bytes = Vec::new();
        for m in msgs {
            let before = bytes.len();
            encode(&ControlMessage::Routes(m.clone()), &mut bytes).unwrap();
            assert!(bytes.len() - before <= MAX_CONTROL_FRAME + crate::FRAME_HEADER_LEN);
        }
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(7000) {
            dec.push(piece).unwrap();
            while let Some(m) = dec.next_message().unwrap() {
                let ControlMessage::Routes(r) = m else {
                    panic!("{m:?}")
                };
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn a_ten_thousand_node_snapshot_fits_bounded_chunks_and_rebuilds_the_table() {
        let t = table(10_000);
        let msgs = t.snapshot().unwrap();
        assert!(msgs.len() > 1, "{} chunks", msgs.len());
        assert!(msgs[0].reset && msgs[1..].iter().all(|m| !m.reset));
        assert!(msgs[..msgs.len() - 1].iter().all(|m| m.digest.is_none()));
        let mut agent = table(3); // stale content is replaced by the reset
        for m in wire_round_trip(&msgs) {
            agent.apply(&m);
        }
        assert_eq!(agent, t);
        assert_eq!(msgs.last().unwrap().digest, Some(agent.digest()));
    }

    #[test]
    fn a_change_costs_what_changed() {
        let old = table(10_000);
        let mut new = old.clone();
        let mut moved = new
            .get("edge-node-00042.site.example.internal")
            .unwrap()
            .clone();
        moved.underlay = "192.0.2.99".parse().unwrap();
        new.entries.insert(moved.node_name.clone(), moved.clone());
        new.entries.remove("edge-node-00043.site.example.internal");
        let added = entry(20_000, "site-new");
        new.entries.insert(added.node_name.clone(), added.clone());
        let (ups, rem) = old.diff(&new);
        assert_eq!(ups.len(), 2);
        assert!(ups.contains(&moved) && ups.contains(&added));
        assert_eq!(
            rem,
            vec!["edge-node-00043.site.example.internal".to_string()]
        );
        let msgs = delta(ups, rem, new.digest()).unwrap();
        assert_eq!(msgs.len(), 1);
        let bytes = crate::control::encode_to_vec(&ControlMessage::Routes(msgs[0].clone()))
            .unwrap()
            .len();
        assert!(bytes < 300, "{bytes} bytes for a three-node change");
        let mut agent = old.clone();
        for m in wire_round_trip(&msgs) {
            agent.apply(&m);
        }
        assert_eq!(agent, new);
        assert_eq!(agent.digest(), new.digest());
    }

    #[test]
    fn digest_is_order_independent_and_content_sensitive() {
        let a = table(100);
        let b =
            RouteTable::from_entries(a.entries().cloned().collect::<Vec<_>>().into_iter().rev());
        assert_eq!(a.digest(), b.digest());
        let mut c = a.clone();
        let mut e = c
            .get("edge-node-00007.site.example.internal")
            .unwrap()
            .clone();
        e.mtu = 1280;
        c.entries.insert(e.node_name.clone(), e);
        assert_ne!(a.digest(), c.digest());
        assert_ne!(RouteTable::new().digest(), a.digest());
        // Pinned: agents and hubs of different builds must agree.
        assert_eq!(RouteTable::new().digest(), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn an_empty_delta_is_one_chunk_with_the_digest() {
        let msgs = delta(vec![], vec![], 42).unwrap();
        assert_eq!(
            msgs,
            vec![RouteSync {
                digest: Some(42),
                ..Default::default()
            }]
        );
        let t = RouteTable::new();
        assert_eq!(t.snapshot().unwrap().len(), 1);
    }

    #[test]
    fn routes_for_leaves_out_the_node_and_keeps_its_site_direct() {
        let t = RouteTable::from_entries([entry(1, "site-a"), entry(2, "site-a"), entry(3, "vpc")]);
        let r = t.routes_for("edge-node-00001.site.example.internal", "site-a");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].path, RoutePath::Direct);
        assert_eq!(r[1].path, RoutePath::ViaHub);
        assert!(r
            .iter()
            .all(|r| r.node_name != "edge-node-00001.site.example.internal"));
    }

    #[test]
    fn decoder_refuses_counts_past_the_cap() {
        let m = RouteSync {
            removals: vec!["a".into(); MAX_ROUTE_SYNC_ITEMS + 1],
            ..Default::default()
        };
        assert!(encode(&ControlMessage::Routes(m), &mut Vec::new()).is_err());
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod edge_tests;
