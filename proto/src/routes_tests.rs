//! Route-sync edges the first tests left open: chunk boundaries at the frame budget and at the
//! item cap, every entry field on the wire, the decoder's caps, `apply`'s order, a pinned digest
//! of a non-empty table.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::control::{decode_frame, encode_to_vec, ControlMessage};
use crate::DecodeError;

fn entry(name: &str, cidrs: usize) -> RouteEntry {
    RouteEntry {
        node_name: name.into(),
        site: "s".into(),
        pod_cidrs: (0..cidrs)
            .map(|i| {
                IpCidr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, i as u8, 0, 0)), 16).unwrap()
            })
            .collect(),
        vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        underlay: IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        mtu: 0,
    }
}

fn body_len(m: &RouteSync) -> usize {
    encode_to_vec(&ControlMessage::Routes(m.clone()))
        .unwrap()
        .len()
        - crate::FRAME_HEADER_LEN
}

#[test]
fn chunks_fill_the_frame_budget_and_never_pass_it() {
    // Long names: few entries per chunk, so the budget (not the item cap) splits.
    let entries: Vec<RouteEntry> = (0..600)
        .map(|i| entry(&format!("{}-{i:03}", "n".repeat(240)), 16))
        .collect();
    let per = encoded_entry_len(&entries[0]).unwrap();
    let msgs = delta(entries, vec![], 7).unwrap();
    assert!(msgs.len() > 2);
    let budget = MAX_CONTROL_FRAME - CHUNK_OVERHEAD;
    for m in &msgs[..msgs.len() - 1] {
        let used: usize = m
            .upserts
            .iter()
            .map(|e| encoded_entry_len(e).unwrap())
            .sum();
        assert!(used <= budget, "{used} > {budget}");
        // Full: one more entry would not have fit.
        assert!(
            used + per > budget,
            "chunk of {used} bytes left room for {per}"
        );
        assert!(body_len(m) <= MAX_CONTROL_FRAME);
    }
    assert_eq!(msgs.last().unwrap().digest, Some(7));
    assert!(msgs[..msgs.len() - 1]
        .iter()
        .all(|m| m.digest.is_none() && !m.reset));
}

#[test]
fn many_short_removals_split_within_the_budget_and_the_item_cap() {
    let removals: Vec<String> = (0..MAX_ROUTE_SYNC_ITEMS + 1)
        .map(|i| format!("r{i}"))
        .collect();
    let msgs = delta(vec![], removals.clone(), 1).unwrap();
    assert_eq!(msgs.len(), 2);
    for m in &msgs {
        assert!(m.removals.len() <= MAX_ROUTE_SYNC_ITEMS);
        assert!(body_len(m) <= MAX_CONTROL_FRAME);
    }
    // Nothing lost or reordered across the split.
    let joined: Vec<String> = msgs.iter().flat_map(|m| m.removals.clone()).collect();
    assert_eq!(joined, removals);
    // Upserts then removals share a chunk while both fit.
    let msgs = delta(vec![entry("a", 1)], vec!["b".into()], 2).unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!((msgs[0].upserts.len(), msgs[0].removals.len()), (1, 1));
}

#[test]
fn every_entry_field_crosses_the_wire() {
    let e = RouteEntry {
        node_name: "edge-7.example".into(),
        site: "site-z".into(),
        pod_cidrs: vec![
            IpCidr::new("10.1.2.0".parse().unwrap(), 24).unwrap(),
            IpCidr::new("fd00:1::".parse().unwrap(), 64).unwrap(),
        ],
        vtep_mac: MacAddr([2, 0xfa, 1, 2, 3, 4]),
        underlay: "2001:db8::7".parse().unwrap(),
        mtu: 1296,
    };
    let m = RouteSync {
        reset: true,
        upserts: vec![e],
        removals: vec!["gone".into()],
        digest: Some(u64::MAX - 1),
    };
    let bytes = encode_to_vec(&ControlMessage::Routes(m.clone())).unwrap();
    assert_eq!(
        decode_frame(&bytes).unwrap(),
        Some((ControlMessage::Routes(m), bytes.len()))
    );
    // No digest: the flag byte is 0 and nothing follows it.
    let none = encode_to_vec(&ControlMessage::Routes(RouteSync::default())).unwrap();
    assert_eq!(&none[crate::FRAME_HEADER_LEN..], &[0, 0, 0, 0, 0, 0]);
}

#[test]
fn decoder_refuses_counts_over_the_caps_and_bad_names() {
    let frame = |body: &[u8]| {
        let mut f = vec![crate::control::msg_type::ROUTES];
        f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        f.extend_from_slice(body);
        f
    };
    // reset 0, upserts count MAX+1.
    let n = u16::try_from(MAX_ROUTE_SYNC_ITEMS + 1)
        .unwrap()
        .to_be_bytes();
    let mut body = vec![0, n[0], n[1]];
    body.resize(body.len() + 64, 0);
    assert!(matches!(
        decode_frame(&frame(&body)),
        Err(DecodeError::TooLong { .. } | DecodeError::Truncated { .. })
    ));
    // One removal with an invalid node name.
    let body = [0, 0, 0, 0, 1, 0, 0, 0, 1, b'A', 0];
    assert!(decode_frame(&frame(&body)).is_err());
    // A pod CIDR count over MAX_POD_CIDRS is refused when encoding.
    let too_many = RouteSync {
        upserts: vec![entry("a", crate::codec::MAX_POD_CIDRS + 1)],
        ..Default::default()
    };
    assert!(encode_to_vec(&ControlMessage::Routes(too_many)).is_err());
}

#[test]
fn apply_resets_removes_then_upserts() {
    let mut t = RouteTable::from_entries([entry("a", 1), entry("b", 1)]);
    // A message that removes and re-adds "a" keeps it (removals first).
    t.apply(&RouteSync {
        upserts: vec![entry("a", 2)],
        removals: vec!["a".into(), "b".into()],
        ..Default::default()
    });
    assert_eq!(t.len(), 1);
    assert_eq!(t.get("a").unwrap().pod_cidrs.len(), 2);
    t.apply(&RouteSync {
        reset: true,
        upserts: vec![entry("c", 1)],
        ..Default::default()
    });
    assert_eq!(
        t.entries()
            .map(|e| e.node_name.as_str())
            .collect::<Vec<_>>(),
        ["c"]
    );
    assert!(!t.is_empty());
}

#[test]
fn the_digest_of_a_table_is_pinned() {
    // Hubs and agents of different builds compare digests: the canonical encoding and the hash
    // must not drift. Recompute this constant only with a protocol change.
    let t = RouteTable::from_entries([entry("a", 1), entry("b", 2)]);
    assert_eq!(t.digest(), PINNED);
    let mut other = t.clone();
    other.apply(&RouteSync {
        upserts: vec![RouteEntry {
            mtu: 1,
            ..entry("b", 2)
        }],
        ..Default::default()
    });
    assert_ne!(other.digest(), PINNED);
}

const PINNED: u64 = 7_986_796_063_799_211_364;

/// The smallest entry the decoder can meet: one-character names, no pod CIDR, an IPv4 underlay.
fn minimal_entry() -> RouteEntry {
    RouteEntry {
        node_name: "a".into(),
        site: "b".into(),
        pod_cidrs: vec![],
        vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        underlay: IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        mtu: 0,
    }
}

#[test]
fn the_count_bound_is_the_smallest_real_entry() {
    // The decoder bounds a count by MIN_ENTRY_LEN bytes per entry before allocating: that must
    // be exactly what the smallest entry encodes to (larger refuses real tables, smaller lets a
    // lying count reserve more than the frame can hold).
    let smallest = encoded_entry_len(&minimal_entry()).unwrap();
    assert_eq!(smallest, 21, "one-character names, no CIDR, IPv4 underlay");
    assert_eq!(MIN_ENTRY_LEN, smallest);
    // A count of k entries over fewer than k smallest entries' bytes is refused at the count,
    // saying how many bytes are missing.
    for (k, have) in [(1usize, 20usize), (3, 62), (100, 2000)] {
        let mut body = vec![0u8]; // reset: false
        body.extend_from_slice(&u16::try_from(k).unwrap().to_be_bytes());
        body.extend(std::iter::repeat_n(0u8, have));
        let err = read_route_sync(&mut crate::codec::Reader::new(&body)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                field: "RouteSync.upserts",
                needed: k * smallest - have
            },
            "count {k} over {have} bytes"
        );
    }
    // Exactly k smallest entries (then no removals, no digest) decode.
    let sync = RouteSync {
        reset: false,
        upserts: (0..50)
            .map(|i| RouteEntry {
                node_name: char::from(b'a' + (i % 26) as u8).to_string(),
                ..minimal_entry()
            })
            .collect(),
        removals: vec![],
        digest: None,
    };
    let wire = encode_to_vec(&ControlMessage::Routes(sync.clone())).unwrap();
    assert_eq!(
        wire.len() - crate::FRAME_HEADER_LEN,
        1 + 2 + 50 * smallest + 2 + 1
    );
    assert_eq!(
        decode_frame(&wire).unwrap(),
        Some((ControlMessage::Routes(sync), wire.len()))
    );
}

#[test]
fn long_removed_names_split_over_chunks_within_the_frame() {
    // 3,000 removals of 200-character names (600 KB) stay under the item cap: only the byte
    // budget per name splits them, and every chunk must still fit one frame.
    let removals: Vec<String> = (0..3000)
        .map(|i| format!("{}-{i:04}", "r".repeat(195)))
        .collect();
    let msgs = delta(vec![], removals.clone(), 9).unwrap();
    assert!(msgs.len() >= 9, "{} chunks for 600 KB", msgs.len());
    let mut seen = Vec::new();
    for m in &msgs {
        assert!(body_len(m) <= crate::MAX_CONTROL_FRAME, "{}", body_len(m));
        seen.extend(m.removals.iter().cloned());
    }
    assert_eq!(seen, removals);
    assert_eq!(msgs.last().unwrap().digest, Some(9));
}

#[test]
fn a_table_counts_its_entries() {
    let empty = RouteTable::new();
    assert!(empty.is_empty());
    assert_eq!(empty.len(), 0);
    let t = RouteTable::from_entries((0..3).map(|i| entry(&format!("n{i}"), 1)));
    assert!(!t.is_empty());
    assert_eq!(t.len(), 3);
}

#[test]
fn the_item_cap_alone_splits_many_tiny_removals() {
    // 8,193 one-character removals are 41 KB: under the byte budget, one past the item cap.
    let removals = vec!["a".to_string(); MAX_ROUTE_SYNC_ITEMS + 1];
    let msgs = delta(vec![], removals, 3).unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].removals.len(), MAX_ROUTE_SYNC_ITEMS);
    assert_eq!(msgs[1].removals.len(), 1);
}

#[test]
fn a_chunk_holds_exactly_its_budget() {
    // Removals whose budgeted sizes add up to exactly the chunk budget fit one chunk; one more
    // byte's worth starts a second.
    let budget = MAX_CONTROL_FRAME - CHUNK_OVERHEAD;
    let name = |bytes: usize| "r".repeat(bytes - encoded_name_len(""));
    let full = 254;
    let mut names: Vec<String> = Vec::new();
    let mut used = 0;
    while budget - used >= 2 * full {
        names.push(name(full));
        used += full;
    }
    // What is left (between 254 and 507 bytes) in two names of at most 254 bytes each.
    let left = budget - used;
    let a = left / 2;
    names.push(name(a));
    names.push(name(left - a));
    let sizes: usize = names.iter().map(|n| encoded_name_len(n)).sum();
    assert_eq!(sizes, budget);
    assert_eq!(delta(vec![], names.clone(), 1).unwrap().len(), 1);
    names.push("x".into());
    assert_eq!(delta(vec![], names, 1).unwrap().len(), 2);
}
