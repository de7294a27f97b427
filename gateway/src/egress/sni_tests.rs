//! Hand-built ClientHellos: server-name validation, record type and version, every cap at and
//! one past its value (record length, collected handshake, ClientHello length, peek), the
//! 24-bit ClientHello length above 255 and 65535, and malformed fields.

#![allow(clippy::unwrap_used)]

use super::*;

fn u16be(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap().to_be_bytes()
}

/// The server_name extension with `(name_type, name)` entries.
fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (t, name) in entries {
        list.push(*t);
        list.extend_from_slice(&u16be(name.len()));
        list.extend_from_slice(name);
    }
    let mut data = u16be(list.len()).to_vec();
    data.extend_from_slice(&list);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&u16be(data.len()));
    ext.extend_from_slice(&data);
    ext
}

/// An extension of another type with `len` bytes of data.
fn other_ext(kind: u16, len: usize) -> Vec<u8> {
    let mut ext = kind.to_be_bytes().to_vec();
    ext.extend_from_slice(&u16be(len));
    ext.extend(std::iter::repeat_n(0x5a, len));
    ext
}

/// A ClientHello body: version, random, empty session id, one suite, null compression, then
/// the extensions block (omitted when `exts` is `None`).
fn hello_body(exts: Option<&[u8]>) -> Vec<u8> {
    let mut b = vec![3, 3];
    b.extend_from_slice(&[7; 32]);
    b.push(0);
    b.extend_from_slice(&[0, 2, 0x13, 0x01]);
    b.extend_from_slice(&[1, 0]);
    if let Some(e) = exts {
        b.extend_from_slice(&u16be(e.len()));
        b.extend_from_slice(e);
    }
    b
}

/// Handshake message: type 1, 24-bit length, body.
fn handshake(body: &[u8]) -> Vec<u8> {
    let n = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut h = vec![1, n[1], n[2], n[3]];
    h.extend_from_slice(body);
    h
}

fn record(body: &[u8]) -> Vec<u8> {
    let mut r = vec![22, 3, 1];
    r.extend_from_slice(&u16be(body.len()));
    r.extend_from_slice(body);
    r
}

/// The handshake split into records of `sizes` bytes (the last takes the rest).
fn records(hs: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = hs;
    for &s in sizes {
        let (a, b) = rest.split_at(s);
        out.extend_from_slice(&record(a));
        rest = b;
    }
    if !rest.is_empty() {
        out.extend_from_slice(&record(rest));
    }
    out
}

fn hello_for(name: &[u8]) -> Vec<u8> {
    record(&handshake(&hello_body(Some(&sni_ext(&[(0, name)])))))
}

/// A hello of exactly `body_len` bytes naming `edge-a1`, padded with another extension.
fn padded_hello(body_len: usize) -> Vec<u8> {
    let base = hello_body(Some(&sni_ext(&[(0, b"edge-a1")]))).len();
    let pad = body_len - base - 4;
    let mut exts = other_ext(21, pad);
    exts.extend_from_slice(&sni_ext(&[(0, b"edge-a1")]));
    let body = hello_body(Some(&exts));
    assert_eq!(body.len(), body_len);
    handshake(&body)
}

fn edge() -> Result<Option<String>, SniError> {
    Ok(Some("edge-a1".into()))
}

#[test]
fn cap_constants() {
    assert_eq!(MAX_CLIENT_HELLO, 16_384);
    assert_eq!(MAX_PEEK, 16_384 + 320);
}

#[test]
fn hand_built_hello_yields_the_lowercase_name() {
    assert_eq!(peek_server_name(&hello_for(b"edge-a1")), edge());
    assert_eq!(peek_server_name(&hello_for(b"Edge-A1.")), edge());
    assert_eq!(
        peek_server_name(&hello_for(b"a.b-c.0")),
        Ok(Some("a.b-c.0".into()))
    );
    let full = hello_for(b"edge-a1");
    for cut in 0..full.len() {
        assert_eq!(peek_server_name(&full[..cut]), Ok(None), "cut {cut}");
    }
    // Bytes after the hello (the rest of the flight) do not matter.
    let mut more = full.clone();
    more.extend_from_slice(&record(&[2, 0, 0, 0]));
    assert_eq!(peek_server_name(&more), edge());
}

#[test]
fn server_names_are_validated() {
    let n253 = vec![b'a'; 253];
    assert_eq!(
        peek_server_name(&hello_for(&n253)),
        Ok(Some("a".repeat(253)))
    );
    let mut n253_dot = n253.clone();
    n253_dot.push(b'.');
    assert_eq!(
        peek_server_name(&hello_for(&n253_dot)),
        Ok(Some("a".repeat(253)))
    );
    for bad in [
        &[b'a'; 254][..],
        b"",
        b".",
        b"edge_a1",
        b"edge a1",
        b"edge/a1",
        b"edge\0a1",
        b"edge-a1:10250",
        b"10.0.0.1/8",
        "\u{e9}dge".as_bytes(),
    ] {
        assert_eq!(
            peek_server_name(&hello_for(bad)),
            Err(SniError::Malformed("server name is not a DNS name")),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        peek_server_name(&hello_for(b"edge\xff")),
        Err(SniError::Malformed("server name is not ASCII"))
    );
}

#[test]
fn name_types_and_other_extensions() {
    // Other extensions first; a non-host_name entry first in the list is skipped.
    let mut exts = other_ext(10, 6);
    exts.extend_from_slice(&other_ext(0xff01, 0));
    exts.extend_from_slice(&sni_ext(&[(1, b"ignored"), (0, b"edge-a1")]));
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(peek_server_name(&record(&hs)), edge());
    // Only other name types: no server name.
    let exts = sni_ext(&[(1, b"edge-a1"), (2, b"x")]);
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(peek_server_name(&record(&hs)), Err(SniError::NoServerName));
    // An empty list, no server_name extension, no extensions at all.
    let hs = handshake(&hello_body(Some(&sni_ext(&[]))));
    assert_eq!(peek_server_name(&record(&hs)), Err(SniError::NoServerName));
    let hs = handshake(&hello_body(Some(&other_ext(16, 3))));
    assert_eq!(peek_server_name(&record(&hs)), Err(SniError::NoServerName));
    let hs = handshake(&hello_body(Some(&[])));
    assert_eq!(peek_server_name(&record(&hs)), Err(SniError::NoServerName));
    let hs = handshake(&hello_body(None));
    assert_eq!(peek_server_name(&record(&hs)), Err(SniError::NoServerName));
    // The first host_name wins.
    let exts = sni_ext(&[(0, b"edge-a1"), (0, b"other")]);
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(peek_server_name(&record(&hs)), edge());
}

#[test]
fn malformed_fields() {
    let good = hello_body(Some(&sni_ext(&[(0, b"edge-a1")])));
    // Cut the body inside each fixed field.
    for (cut, what) in [
        (1, "version"),
        (20, "random"),
        (34, "session id"),
        (36, "cipher suites"),
        (39, "compression methods"),
        (42, "extensions"),
    ] {
        let hs = handshake(&good[..cut]);
        assert_eq!(
            peek_server_name(&record(&hs)),
            Err(SniError::Malformed(what)),
            "cut {cut}"
        );
    }
    // A session id claiming more than is there.
    let mut b = good.clone();
    b[34] = 200;
    assert_eq!(
        peek_server_name(&record(&handshake(&b))),
        Err(SniError::Malformed("session id"))
    );
    // Extension data and name lengths past their block.
    let mut exts = sni_ext(&[(0, b"edge-a1")]);
    exts[3] += 1;
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(
        peek_server_name(&record(&hs)),
        Err(SniError::Malformed("extension data"))
    );
    let mut exts = sni_ext(&[(0, b"edge-a1")]);
    exts[8] += 1;
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(
        peek_server_name(&record(&hs)),
        Err(SniError::Malformed("server name"))
    );
    let mut exts = sni_ext(&[(0, b"edge-a1")]);
    exts[5] += 1;
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(
        peek_server_name(&record(&hs)),
        Err(SniError::Malformed("server name list"))
    );
    let exts = [0u8, 0, 0, 1, 0];
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(
        peek_server_name(&record(&hs)),
        Err(SniError::Malformed("server name list"))
    );
    let exts = [0u8];
    let hs = handshake(&hello_body(Some(&exts)));
    assert_eq!(
        peek_server_name(&record(&hs)),
        Err(SniError::Malformed("extension type"))
    );
    // Not a ClientHello.
    let mut hs = handshake(&good);
    hs[0] = 2;
    assert_eq!(
        peek_server_name(&record(&hs)),
        Err(SniError::Malformed(
            "first handshake message is not a ClientHello"
        ))
    );
}

#[test]
fn record_type_version_and_length() {
    let good = hello_for(b"edge-a1");
    // Not a handshake record, or not TLS major version 3: not TLS at all.
    for (i, v) in [(0usize, 23u8), (0, 21), (1, 2), (1, 4), (1, 0)] {
        let mut bad = good.clone();
        bad[i] = v;
        assert_eq!(peek_server_name(&bad), Err(SniError::NotTls), "[{i}] = {v}");
    }
    // Any minor version is fine.
    let mut tls10 = good.clone();
    tls10[2] = 0;
    assert_eq!(peek_server_name(&tls10), edge());
    // The same on a later record.
    let hs = handshake(&hello_body(Some(&sni_ext(&[(0, b"edge-a1")]))));
    let two = records(&hs, &[10]);
    assert_eq!(peek_server_name(&two), edge());
    let second = 5 + 10;
    for (off, v) in [(0usize, 23u8), (1, 2)] {
        let mut bad = two.clone();
        bad[second + off] = v;
        assert_eq!(
            peek_server_name(&bad),
            Err(SniError::Malformed(
                "record after the first is not a handshake record"
            ))
        );
    }
    // Short inputs: a non-handshake first byte is known at once; a handshake byte waits.
    assert_eq!(peek_server_name(b"G"), Err(SniError::NotTls));
    assert_eq!(peek_server_name(b"GET"), Err(SniError::NotTls));
    assert_eq!(peek_server_name(&[22, 3]), Ok(None));
    assert_eq!(peek_server_name(&[]), Ok(None));
    // Record lengths: 0 and 16385 are refused, 16384 is accepted.
    assert_eq!(
        peek_server_name(&[22, 3, 1, 0, 0]),
        Err(SniError::Malformed("bad record length"))
    );
    assert_eq!(
        peek_server_name(&[22, 3, 1, 0x40, 0x01]),
        Err(SniError::Malformed("bad record length"))
    );
    assert_eq!(peek_server_name(&[22, 3, 1, 0x40, 0x00]), Ok(None));
    let hs = padded_hello(16_380);
    assert_eq!(hs.len(), 16_384);
    assert_eq!(peek_server_name(&record(&hs)), edge());
}

#[test]
fn client_hello_lengths_above_255_and_65535() {
    // Bodies of 300 and 5000 bytes: the middle length byte counts.
    for len in [256, 300, 5000, 16_380] {
        let hs = padded_hello(len);
        assert_eq!(peek_server_name(&record(&hs)), edge(), "{len}");
        // One byte short of the declared length: waits.
        let r = record(&hs[..hs.len() - 1]);
        assert_eq!(peek_server_name(&r), Ok(None), "{len}");
    }
    // Exactly 16384 (needs two records), and 16385 refused from its 4-byte header alone.
    let hs = padded_hello(MAX_CLIENT_HELLO);
    assert_eq!(peek_server_name(&records(&hs, &[16_000])), edge());
    assert_eq!(
        peek_server_name(&record(&[1, 0, 0x40, 0x01])),
        Err(SniError::TooLong)
    );
    assert_eq!(peek_server_name(&record(&[1, 0, 0x40, 0x00])), Ok(None));
    // A top length byte of 1 (65536 + n) is far too long, whatever the low bytes say.
    assert_eq!(
        peek_server_name(&record(&[1, 1, 0, 0])),
        Err(SniError::TooLong)
    );
    assert_eq!(
        peek_server_name(&record(&[1, 1, 0, 5, 0, 0, 0, 0, 0])),
        Err(SniError::TooLong)
    );
}

#[test]
fn collected_handshake_cap() {
    // The whole 16384-byte hello plus its 4-byte header is 16388 collected bytes: accepted.
    let hs = padded_hello(MAX_CLIENT_HELLO);
    assert_eq!(hs.len(), MAX_CLIENT_HELLO + 4);
    let mut flight = record(&hs[..16_384]);
    flight.extend_from_slice(&record(&hs[16_384..]));
    assert_eq!(peek_server_name(&flight), edge());
    // One more byte in the same record (the start of the next message): refused.
    let mut tail = hs[16_384..].to_vec();
    tail.push(2);
    let mut flight = record(&hs[..16_384]);
    flight.extend_from_slice(&record(&tail));
    assert_eq!(peek_server_name(&flight), Err(SniError::TooLong));
}

/// `n` records of one handshake byte each, starting a ClientHello of `hlen` bytes.
fn one_byte_records(n: usize, hs: &[u8]) -> Vec<u8> {
    hs[..n].iter().flat_map(|&b| record(&[b])).collect()
}

#[test]
fn peek_cap_after_many_small_records() {
    let hs = padded_hello(4000);
    // 2784 one-byte records are exactly MAX_PEEK bytes.
    assert_eq!(6 * 2784, MAX_PEEK);
    let at = one_byte_records(2784, &hs);
    assert_eq!(peek_server_name(&at), Ok(None));
    // The rest of the hello in one more record: found, the peek limit was not passed before.
    let mut done = at.clone();
    done.extend_from_slice(&record(&hs[2784..]));
    assert_eq!(peek_server_name(&done), edge());
    // One byte past MAX_PEEK while waiting for a record header: refused.
    let mut past = at.clone();
    past.push(22);
    assert_eq!(peek_server_name(&past), Err(SniError::TooLong));
    // One more small record takes the records past MAX_PEEK: refused even though the rest of
    // the hello follows.
    let mut over = one_byte_records(2785, &hs);
    over.extend_from_slice(&record(&hs[2785..]));
    assert_eq!(peek_server_name(&over), Err(SniError::TooLong));
    // Waiting for a record body: MAX_PEEK bytes in all waits, one more is refused.
    let mut body_wait = one_byte_records(2783, &hs);
    body_wait.extend_from_slice(&[22, 3, 1, 0x10, 0x00, hs[2783]]);
    assert_eq!(body_wait.len(), MAX_PEEK);
    assert_eq!(peek_server_name(&body_wait), Ok(None));
    body_wait.push(hs[2784]);
    assert_eq!(peek_server_name(&body_wait), Err(SniError::TooLong));
}
