//! Request heads built by hand at and one past every cap, odd ports, control characters and
//! Host names, and the status codes and replies. Each cap is tested on its own, so none is
//! only backed by another.

#![allow(clippy::unwrap_used)]

use super::*;

/// `CONNECT a:1 HTTP/1.1` then `headers`, then the empty line.
fn connect_with(headers: &[Vec<u8>]) -> Vec<u8> {
    let mut h = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
    for line in headers {
        h.extend_from_slice(line);
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// A header line of exactly `len` bytes before its CRLF.
fn header_line(len: usize) -> Vec<u8> {
    let mut l = b"X-Pad: ".to_vec();
    l.resize(len, b'p');
    l
}

#[test]
fn cap_constants() {
    assert_eq!(MAX_HEAD, 8192);
    assert_eq!(MAX_REQUEST_LINE, 1024);
    assert_eq!(MAX_HEADER_LINE, 2048);
    assert_eq!(MAX_HEADERS, 32);
}

#[test]
fn complete_request_line_at_and_past_its_cap() {
    // The line counts its CR: 1023 bytes + CR is at the cap, one more is past it.
    let line = |len: usize| {
        let mut l = b"CONNECT ".to_vec();
        let host_len = len - b"CONNECT :1 HTTP/1.1".len();
        l.extend(std::iter::repeat_n(b'a', host_len.min(253)));
        l.extend(std::iter::repeat_n(b'.', host_len.saturating_sub(253)));
        l.extend_from_slice(b":1 HTTP/1.1\r\n\r\n");
        l
    };
    // A target that is too long a host is still a complete line within the cap: the line cap
    // passes and the host check refuses it, so the outcome tells the two apart.
    let at = line(MAX_REQUEST_LINE - 1);
    assert_eq!(at.iter().position(|&b| b == b'\n'), Some(MAX_REQUEST_LINE));
    assert_eq!(
        parse_connect(&at),
        Err(HeadError::BadTarget("bad host name"))
    );
    let past = line(MAX_REQUEST_LINE);
    assert_eq!(parse_connect(&past), Err(HeadError::LineTooLong));
    // Incomplete: 1024 bytes without a newline may still end well; 1025 cannot.
    assert_eq!(parse_connect(&at[..MAX_REQUEST_LINE]), Ok(None));
    assert_eq!(
        parse_connect(&past[..MAX_REQUEST_LINE + 1]),
        Err(HeadError::LineTooLong)
    );
    // A plain request line through parse_host.
    let mut get = b"GET /".to_vec();
    get.resize(MAX_REQUEST_LINE - b" HTTP/1.1".len() - 1, b'x');
    get.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(parse_host(&get).unwrap().is_some());
    let mut get = b"GET /".to_vec();
    get.resize(MAX_REQUEST_LINE - b" HTTP/1.1".len(), b'x');
    get.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(parse_host(&get), Err(HeadError::LineTooLong));
}

#[test]
fn complete_header_line_at_and_past_its_cap() {
    let at = connect_with(&[header_line(MAX_HEADER_LINE - 1)]);
    let (c, used) = parse_connect(&at).unwrap().unwrap();
    assert_eq!((c.host.as_str(), c.port, used), ("a", 1, at.len()));
    let past = connect_with(&[header_line(MAX_HEADER_LINE)]);
    assert_eq!(parse_connect(&past), Err(HeadError::HeaderTooLong));
    // The same for a later header, after a short one.
    let past = connect_with(&[b"Host: a".to_vec(), header_line(MAX_HEADER_LINE)]);
    assert_eq!(parse_connect(&past), Err(HeadError::HeaderTooLong));
    // Incomplete header line: 2048 bytes may still end; 2049 cannot.
    let mut partial = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
    let start = partial.len();
    partial.extend(header_line(MAX_HEADER_LINE));
    assert_eq!(parse_connect(&partial), Ok(None));
    partial.push(b'p');
    assert_eq!(partial.len() - start, MAX_HEADER_LINE + 1);
    assert_eq!(parse_connect(&partial), Err(HeadError::HeaderTooLong));
}

#[test]
fn header_count_at_and_past_its_cap() {
    let lines = |n: usize| {
        (0..n)
            .map(|i| format!("X-{i}: v").into_bytes())
            .collect::<Vec<_>>()
    };
    assert!(parse_connect(&connect_with(&lines(MAX_HEADERS)))
        .unwrap()
        .is_some());
    assert_eq!(
        parse_connect(&connect_with(&lines(MAX_HEADERS + 1))),
        Err(HeadError::TooManyHeaders)
    );
    let mut get = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for l in lines(MAX_HEADERS - 1) {
        get.extend_from_slice(&l);
        get.extend_from_slice(b"\r\n");
    }
    get.extend_from_slice(b"\r\n");
    assert!(parse_host(&get).unwrap().is_some());
}

#[test]
fn complete_head_at_and_past_its_cap() {
    // Five 1500-byte headers and padding: the complete head is exactly 8192 bytes.
    let make = |total: usize| {
        let fixed = b"CONNECT a:1 HTTP/1.1\r\n".len() + 2;
        let mut headers = vec![header_line(1500); 5];
        let used: usize = fixed + headers.iter().map(|h| h.len() + 2).sum::<usize>();
        headers.push(header_line(total - used - 2));
        let head = connect_with(&headers);
        assert_eq!(head.len(), total);
        head
    };
    let at = make(MAX_HEAD);
    let mut with_tls = at.clone();
    with_tls.extend_from_slice(b"\x16\x03\x01");
    assert_eq!(
        parse_connect(&with_tls).unwrap(),
        Some((
            Connect {
                host: "a".into(),
                port: 1
            },
            MAX_HEAD
        ))
    );
    // One byte more, all in one buffer: every line is complete and within its own cap, so
    // only the head cap can refuse it.
    assert_eq!(
        parse_connect(&make(MAX_HEAD + 1)),
        Err(HeadError::HeadTooLong)
    );
    // Incomplete: short lines only, the total past the head cap.
    let mut partial = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
    while partial.len() <= MAX_HEAD {
        partial.extend_from_slice(&header_line(1000));
        partial.extend_from_slice(b"\r\n");
    }
    partial.truncate(MAX_HEAD + 1);
    assert_eq!(parse_connect(&partial), Err(HeadError::HeadTooLong));
    partial.truncate(MAX_HEAD);
    assert_eq!(parse_connect(&partial), Ok(None));
}

#[test]
fn odd_ports_are_refused() {
    for bad in [
        "edge-a1:+443",
        "edge-a1:-443",
        "edge-a1:010250",
        "edge-a1:0443",
        "edge-a1:00",
        "edge-a1:0",
        "edge-a1:",
        "edge-a1:65536",
        "edge-a1:99999",
        "edge-a1:1e3",
        "edge-a1: 443",
        "edge-a1:0x1bb",
        "[fd00::1]:+443",
        "[fd00::1]:0443",
        "[fd00::1]",
        "[fd00::1]443",
        "edge-a1",
    ] {
        assert!(
            matches!(parse_authority(bad), Err(HeadError::BadTarget(_))),
            "{bad}"
        );
    }
    for (good, port) in [
        ("edge-a1:1", 1),
        ("edge-a1:443", 443),
        ("edge-a1:10250", 10250),
        ("edge-a1:65535", 65535),
        ("[fd00::1]:10", 10),
    ] {
        assert_eq!(parse_authority(good).unwrap().port, port, "{good}");
    }
    assert_eq!(
        parse_authority("edge-a1:0"),
        Err(HeadError::BadTarget("port 0"))
    );
    // Each check on its own: empty, more than five digits, not digits, a leading zero.
    for bad in [
        "edge-a1:",
        "edge-a1:123456",
        "edge-a1:+443",
        "edge-a1:0443",
        "[fd00::1]:",
    ] {
        assert_eq!(
            parse_authority(bad),
            Err(HeadError::BadTarget("bad port")),
            "{bad}"
        );
    }
    assert_eq!(
        parse_authority("edge-a1:65536"),
        Err(HeadError::BadTarget("port out of range"))
    );
    // Through the whole parser.
    assert!(parse_connect(b"CONNECT edge-a1:+443 HTTP/1.1\r\n\r\n").is_err());
    assert!(parse_connect(b"CONNECT edge-a1:010250 HTTP/1.1\r\n\r\n").is_err());
}

#[test]
fn connect_hosts() {
    let c = parse_authority("Edge_A1.Example:80").unwrap();
    assert_eq!(c.host, "edge_a1.example");
    assert_eq!(c.display(), "edge_a1.example:80");
    let long = format!("{}:1", "h".repeat(253));
    assert_eq!(parse_authority(&long).unwrap().host.len(), 253);
    let longer = format!("{}:1", "h".repeat(254));
    assert_eq!(
        parse_authority(&longer),
        Err(HeadError::BadTarget("bad host name"))
    );
    for bad in [
        ":1",
        "a b:1",
        "a/b:1",
        "a@b:1",
        "a%b:1",
        "[fd00::1:1",
        "[zz]:1",
        "[10.0.0.1]:1",
    ] {
        assert!(parse_authority(bad).is_err(), "{bad}");
    }
    let c = parse_authority("[FD00::A]:443").unwrap();
    assert_eq!(c.host, "fd00::a");
    assert_eq!(c.display(), "[fd00::a]:443");
}

#[test]
fn control_characters_in_header_values_are_refused() {
    for bad in [
        &b"X: a\x01b"[..],
        b"X: a\x00",
        b"X: a\x7fb",
        b"X: a\rb",
        b"X: \x1b[0m",
        b"X:\x0b",
    ] {
        let head = connect_with(&[bad.to_vec()]);
        assert_eq!(
            parse_connect(&head),
            Err(HeadError::BadHeader),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        let mut get = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        get.extend_from_slice(bad);
        get.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_host(&get), Err(HeadError::BadHeader));
    }
    // Tabs inside and around a value are fine, as are empty values and obs-text in UTF-8.
    for good in [
        &b"X: a\tb"[..],
        b"X:\tv\t",
        b"X:",
        b"X:   ",
        "X: caf\u{e9}".as_bytes(),
    ] {
        assert!(
            parse_connect(&connect_with(&[good.to_vec()]))
                .unwrap()
                .is_some(),
            "{:?}",
            String::from_utf8_lossy(good)
        );
    }
    // Header names are tokens; a value is not UTF-8: refused.
    for bad in [&b": v"[..], b"X Y: v", b"X\x01: v", b"X(: v", b"X: \xff"] {
        assert_eq!(
            parse_connect(&connect_with(&[bad.to_vec()])),
            Err(HeadError::BadHeader)
        );
    }
    assert!(
        parse_connect(&connect_with(&[b"A!#$%&'*+-.^_`|~z: v".to_vec()]))
            .unwrap()
            .is_some()
    );
}

#[test]
fn host_header_names() {
    let host = |value: &[u8]| {
        let mut get = b"GET / HTTP/1.1\r\nHost: ".to_vec();
        get.extend_from_slice(value);
        get.extend_from_slice(b"\r\n\r\n");
        parse_host(&get).map(|r| r.map(|(h, _)| h))
    };
    assert_eq!(host(b"Edge-A1"), Ok(Some("edge-a1".into())));
    assert_eq!(host(b"edge-a1.:10255"), Ok(Some("edge-a1".into())));
    assert_eq!(host(b"10.0.1.2:10255"), Ok(Some("10.0.1.2".into())));
    assert_eq!(host(b"[FD00::1]:10255"), Ok(Some("fd00::1".into())));
    assert_eq!(host(b"[fd00::1]"), Ok(Some("fd00::1".into())));
    assert_eq!(
        host(&[b'h'; 253]),
        Ok(Some(String::from_utf8(vec![b'h'; 253]).unwrap()))
    );
    for bad in [
        &b""[..],
        b":10255",
        b".",
        b"[",
        b"[]:1",
        b"[zz]:1",
        b"[fd00::1]x",
        b"[fd00::1]:+1",
        b"edge-a1:+443",
        b"edge-a1:010250",
        b"edge-a1:0",
        b"edge-a1:65536",
        b"user@edge-a1",
        b"edge a1",
        b"edge/a1",
        b"fd00::1",
    ] {
        assert!(
            matches!(host(bad), Err(HeadError::BadTarget(_))),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(matches!(host(&[b'h'; 254]), Err(HeadError::BadTarget(_))));
    // Two Host headers, or none, are refused; the name is case-insensitive.
    assert_eq!(
        parse_host(b"GET / HTTP/1.1\r\nHost: a\r\nhOST: b\r\n\r\n"),
        Err(HeadError::BadHeader)
    );
    assert_eq!(
        parse_host(b"GET / HTTP/1.1\r\nHOST: b\r\n\r\n").unwrap(),
        Some(("b".into(), 27))
    );
    assert_eq!(
        parse_host(b"GET / HTTP/1.1\r\nHostname: b\r\n\r\n"),
        Err(HeadError::NoHost)
    );
    // The request line is checked too.
    assert!(matches!(
        parse_host(b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n"),
        Err(HeadError::BadRequestLine(_))
    ));
    assert!(matches!(
        parse_host(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
        Err(HeadError::BadRequestLine(_))
    ));
    assert!(parse_host(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        .unwrap()
        .is_some());
}

#[test]
fn request_lines() {
    for (bad, why) in [
        (
            &b"CONNECT a:1\r\n\r\n"[..],
            "expected METHOD SP TARGET SP HTTP/1.1",
        ),
        (
            b"CONNECT a:1 HTTP/1.1 x\r\n\r\n",
            "expected METHOD SP TARGET SP HTTP/1.1",
        ),
        (
            b"CONNECT a:1 http/1.1\r\n\r\n",
            "version must be HTTP/1.1 or HTTP/1.0",
        ),
        (b"CONNECT  HTTP/1.1\r\n\r\n", "bad request target"),
        (b"CONNECT a\x01:1 HTTP/1.1\r\n\r\n", "bad request target"),
        (b"CONNECT a:1 HTTP/1.1\n\r\n", "lines must end in CRLF"),
    ] {
        assert_eq!(
            parse_connect(bad),
            Err(HeadError::BadRequestLine(why)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        parse_host(b"\r\n\r\n"),
        Err(HeadError::BadRequestLine("empty request line"))
    );
    assert_eq!(
        parse_host(b"G@T / HTTP/1.1\r\n\r\n"),
        Err(HeadError::BadRequestLine("bad method"))
    );
    assert_eq!(
        parse_host(b"GET / HTTP/1.1\r\nHost: a\n\r\n"),
        Err(HeadError::BadHeader)
    );
    // The method is refused at the first space, before the head completes, and cut to 16.
    assert_eq!(
        parse_connect(b"POST "),
        Err(HeadError::Method("POST".into()))
    );
    assert_eq!(
        parse_connect(b"CONNECTCONNECTCONNECT x"),
        Err(HeadError::Method("CONNECTCONNECTCO".into()))
    );
    assert_eq!(
        parse_connect(b"connect a:1 HTTP/1.1\r\n\r\n"),
        Err(HeadError::Method("connect".into()))
    );
    // Without a space: 8 bytes may still become `CONNECT `, 9 cannot.
    assert_eq!(parse_connect(b"CONNECTX"), Ok(None));
    assert_eq!(
        parse_connect(b"CONNECTXY"),
        Err(HeadError::BadRequestLine(
            "expected CONNECT host:port HTTP/1.1"
        ))
    );
    assert_eq!(parse_connect(b""), Ok(None));
}

#[test]
fn statuses_and_replies() {
    let cases = [
        (HeadError::HeadTooLong, 431),
        (HeadError::HeaderTooLong, 431),
        (HeadError::TooManyHeaders, 431),
        (HeadError::LineTooLong, 414),
        (HeadError::Method("GET".into()), 405),
        (HeadError::BadRequestLine("x"), 400),
        (HeadError::BadHeader, 400),
        (HeadError::BadTarget("x"), 400),
        (HeadError::NoHost, 400),
    ];
    for (e, code) in cases {
        assert_eq!(e.status(), (code, "bad_request"), "{e}");
    }
    assert_eq!(ESTABLISHED, b"HTTP/1.1 200 Connection established\r\n\r\n");
    for (status, title) in [
        (400, "Bad Request"),
        (403, "Forbidden"),
        (404, "Not Found"),
        (405, "Method Not Allowed"),
        (408, "Request Timeout"),
        (409, "Conflict"),
        (414, "URI Too Long"),
        (431, "Request Header Fields Too Large"),
        (502, "Bad Gateway"),
        (503, "Service Unavailable"),
        (504, "Gateway Timeout"),
        (418, "Error"),
    ] {
        let r = String::from_utf8(error_response(status, "why")).unwrap();
        let body = format!("{status} {title}: why\n");
        let want = format!(
            "HTTP/1.1 {status} {title}: why\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n{body}",
            body.len(),
            if status == 503 { "Retry-After: 1\r\n" } else { "" }
        );
        assert_eq!(r, want);
    }
    // The reason is one printable line of at most 300 characters.
    let r = String::from_utf8(error_response(
        400,
        &format!("a\tb\u{e9}{}", "x".repeat(400)),
    ))
    .unwrap();
    let status_line = r.lines().next().unwrap();
    assert_eq!(
        status_line,
        format!("HTTP/1.1 400 Bad Request: a?b?{}", "x".repeat(296))
    );
}
