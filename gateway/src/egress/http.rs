//! The HTTP/1.1 bits of the egress proxy, sans-IO: a strict, bounded parser for the CONNECT
//! request kube-apiserver sends (`CONNECT host:port HTTP/1.1`, a few headers, an empty line),
//! the `Host` header of a plain request (for the read-only kubelet port), and the responses.
//!
//! Caps are checked before anything grows: the whole head ([`MAX_HEAD`]), the request line
//! ([`MAX_REQUEST_LINE`]), each header line ([`MAX_HEADER_LINE`]) and the number of headers
//! ([`MAX_HEADERS`]). Lines must end in CRLF; anything else is a [`HeadError`].

/// Largest request head (request line, headers, empty line).
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request line.
pub const MAX_REQUEST_LINE: usize = 1024;
/// Largest header line.
pub const MAX_HEADER_LINE: usize = 2048;
/// Most header lines.
pub const MAX_HEADERS: usize = 32;

/// Why a request head was refused. Each maps to a status code and a reason phrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("request line longer than {MAX_REQUEST_LINE} bytes")]
    LineTooLong,
    #[error("header line longer than {MAX_HEADER_LINE} bytes")]
    HeaderTooLong,
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("malformed request line: {0}")]
    BadRequestLine(&'static str),
    #[error("method {0:?} is not supported; only CONNECT is")]
    Method(String),
    #[error("malformed header line")]
    BadHeader,
    #[error("malformed CONNECT target: {0}")]
    BadTarget(&'static str),
    #[error("no Host header")]
    NoHost,
}

impl HeadError {
    /// Status code and short metric label.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HeadError::HeadTooLong | HeadError::HeaderTooLong | HeadError::TooManyHeaders => {
                (431, "bad_request")
            }
            HeadError::LineTooLong => (414, "bad_request"),
            HeadError::Method(_) => (405, "bad_request"),
            _ => (400, "bad_request"),
        }
    }
}

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The host part as given: a DNS name, an IPv4 literal or an IPv6 literal without brackets.
    pub host: String,
    pub port: u16,
}

impl Connect {
    /// `host:port` as the client wrote it (brackets restored for IPv6), for logs.
    pub fn display(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A complete head: its lines (without CRLF) and the number of bytes it used.
type Head<'a> = (Vec<&'a [u8]>, usize);

/// Splits the head off `buf`: `Ok(None)` until the empty line arrives.
fn split_head(buf: &[u8]) -> Result<Option<Head<'_>>, HeadError> {
    let mut lines = Vec::new();
    let mut pos = 0;
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let limit = if lines.is_empty() {
            MAX_REQUEST_LINE
        } else {
            MAX_HEADER_LINE
        };
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            // Incomplete line: refuse as soon as it cannot fit any more.
            if rest.len() > limit {
                return Err(if lines.is_empty() {
                    HeadError::LineTooLong
                } else {
                    HeadError::HeaderTooLong
                });
            }
            if buf.len() > MAX_HEAD {
                return Err(HeadError::HeadTooLong);
            }
            return Ok(None);
        };
        if nl > limit {
            return Err(if lines.is_empty() {
                HeadError::LineTooLong
            } else {
                HeadError::HeaderTooLong
            });
        }
        let line = rest.get(..nl).unwrap_or_default();
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err(if lines.is_empty() {
                HeadError::BadRequestLine("lines must end in CRLF")
            } else {
                HeadError::BadHeader
            });
        };
        pos += nl + 1;
        if pos > MAX_HEAD {
            return Err(HeadError::HeadTooLong);
        }
        if line.is_empty() {
            if lines.is_empty() {
                return Err(HeadError::BadRequestLine("empty request line"));
            }
            return Ok(Some((lines, pos)));
        }
        if lines.len() > MAX_HEADERS {
            return Err(HeadError::TooManyHeaders);
        }
        lines.push(line);
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a header line and returns (name, trimmed value).
fn header(line: &[u8]) -> Result<(&str, &str), HeadError> {
    let text = std::str::from_utf8(line).map_err(|_| HeadError::BadHeader)?;
    let (name, value) = text.split_once(':').ok_or(HeadError::BadHeader)?;
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(HeadError::BadHeader);
    }
    let value = value.trim_matches(|c| c == ' ' || c == '\t');
    if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(HeadError::BadHeader);
    }
    Ok((name, value))
}

fn request_line(line: &[u8]) -> Result<(&str, &str, &str), HeadError> {
    let text = std::str::from_utf8(line).map_err(|_| HeadError::BadRequestLine("not ASCII"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::BadRequestLine(
            "expected METHOD SP TARGET SP HTTP/1.1",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(HeadError::BadRequestLine("bad method"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::BadRequestLine(
            "version must be HTTP/1.1 or HTTP/1.0",
        ));
    }
    if target.is_empty() || target.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(HeadError::BadRequestLine("bad request target"));
    }
    Ok((method, target, version))
}

/// Parses `host:port` (authority form). Hosts are DNS names, IPv4 literals or bracketed IPv6
/// literals; no user info, no path, port 1-65535 in decimal.
pub fn parse_authority(target: &str) -> Result<Connect, HeadError> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or(HeadError::BadTarget("IPv6 literal must be [addr]:port"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(HeadError::BadTarget("bad IPv6 literal"));
        }
        (h, p)
    } else {
        let (h, p) = target
            .rsplit_once(':')
            .ok_or(HeadError::BadTarget("expected host:port"))?;
        if !is_host_name(h) {
            return Err(HeadError::BadTarget("bad host name"));
        }
        (h, p)
    };
    let port = parse_port(port)?;
    Ok(Connect {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// A DNS name (or IPv4 literal) as a target: 1-253 of `[A-Za-z0-9._-]`.
fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// A port in plain decimal, 1-65535: no sign, no leading zero (`+443`, `010250` and `0443`
/// are refused rather than guessed at).
fn parse_port(port: &str) -> Result<u16, HeadError> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadError::BadTarget("bad port"));
    }
    if port == "0" {
        return Err(HeadError::BadTarget("port 0"));
    }
    if port.starts_with('0') {
        return Err(HeadError::BadTarget("bad port"));
    }
    port.parse()
        .map_err(|_| HeadError::BadTarget("port out of range"))
}

/// Parses a CONNECT request head at the start of `buf`; `Ok(None)` until it is complete. The
/// returned length is where the tunnelled bytes begin.
pub fn parse_connect(buf: &[u8]) -> Result<Option<(Connect, usize)>, HeadError> {
    // Fail fast on a wrong method before waiting for the whole head.
    if let Some(sp) = buf.iter().position(|&b| b == b' ') {
        let method = buf.get(..sp).unwrap_or_default();
        if method != b"CONNECT" {
            return Err(HeadError::Method(
                String::from_utf8_lossy(method.get(..16.min(method.len())).unwrap_or_default())
                    .into_owned(),
            ));
        }
    } else if buf.len() > 8 {
        return Err(HeadError::BadRequestLine(
            "expected CONNECT host:port HTTP/1.1",
        ));
    }
    let Some((lines, used)) = split_head(buf)? else {
        return Ok(None);
    };
    let (method, target, _) = request_line(lines.first().copied().unwrap_or_default())?;
    if method != "CONNECT" {
        return Err(HeadError::Method(method.to_string()));
    }
    for line in lines.iter().skip(1) {
        header(line)?;
    }
    Ok(Some((parse_authority(target)?, used)))
}

/// Parses a plain HTTP request head and returns the host of its `Host` header (port removed,
/// lowercased) and the head's length. The head itself is forwarded unchanged.
pub fn parse_host(buf: &[u8]) -> Result<Option<(String, usize)>, HeadError> {
    let Some((lines, used)) = split_head(buf)? else {
        return Ok(None);
    };
    request_line(lines.first().copied().unwrap_or_default())?;
    let mut host = None;
    for line in lines.iter().skip(1) {
        let (name, value) = header(line)?;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HeadError::BadHeader);
            }
            host = Some(value);
        }
    }
    let host = host.ok_or(HeadError::NoHost)?;
    // `host [":" port]`, the host a DNS name, an IPv4 literal or a bracketed IPv6 literal.
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or(HeadError::BadTarget("bad IPv6 literal"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(HeadError::BadTarget("bad IPv6 literal"));
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or(HeadError::BadTarget("bad IPv6 literal"))?,
            ),
        };
        (h, port)
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        parse_port(port)?;
    }
    let name = name.trim_end_matches('.');
    if !host.starts_with('[') && !is_host_name(name) {
        return Err(HeadError::BadTarget("bad host name"));
    }
    Ok(Some((name.to_ascii_lowercase(), used)))
}

/// The success reply: nothing follows it but the tunnelled bytes.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// An error reply. The reason phrase carries the explanation, because kube-apiserver puts the
/// status line (and only it) into the error it reports; the body repeats it for humans.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    let clean: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(300)
        .collect();
    let title = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("{status} {title}: {clean}\n");
    let mut out = format!(
        "HTTP/1.1 {status} {title}: {clean}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 503 {
        out.push_str("Retry-After: 1\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn apiserver_connect_parses_with_trailing_bytes() {
        let req = b"CONNECT edge-a1:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\x16\x03\x01";
        let (c, used) = parse_connect(req).unwrap().unwrap();
        assert_eq!(
            c,
            Connect {
                host: "edge-a1".into(),
                port: 10250
            }
        );
        assert_eq!(&req[used..], b"\x16\x03\x01");
        for cut in 0..used {
            assert_eq!(parse_connect(&req[..cut]).unwrap(), None, "cut {cut}");
        }
        let (c, _) = parse_connect(b"CONNECT [fd00::1]:8080 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(c.host, "fd00::1");
        assert_eq!(c.display(), "[fd00::1]:8080");
        let (c, _) = parse_connect(b"CONNECT 10.0.1.2:10250 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(c.display(), "10.0.1.2:10250");
    }

    #[test]
    fn malformed_requests_are_refused() {
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n\r\n",
            b"CONNECT edge-a1 HTTP/1.1\r\n\r\n",
            b"CONNECT edge-a1:0 HTTP/1.1\r\n\r\n",
            b"CONNECT edge-a1:99999 HTTP/1.1\r\n\r\n",
            b"CONNECT edge-a1:10250 HTTP/2\r\n\r\n",
            b"CONNECT edge-a1:10250  HTTP/1.1\r\n\r\n",
            b"CONNECT edge-a1:10250 HTTP/1.1\n\n",
            b"CONNECT user@edge:1 HTTP/1.1\r\n\r\n",
            b"CONNECT edge-a1:10250/x HTTP/1.1\r\n\r\n",
            b"CONNECT [zz]:1 HTTP/1.1\r\n\r\n",
            b"CONNECT edge-a1:10250 HTTP/1.1\r\nno colon\r\n\r\n",
            b"CONNECT edge-a1:10250 HTTP/1.1\r\nbad name: x\r\n\r\n",
            b"\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ];
        for b in bad {
            assert!(
                parse_connect(b).is_err(),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        assert!(matches!(parse_connect(b"GET"), Ok(None)));
        assert!(matches!(parse_connect(b"GET "), Err(HeadError::Method(_))));
    }

    #[test]
    fn caps_apply_before_the_head_is_complete() {
        let mut long = b"CONNECT ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_REQUEST_LINE + 1));
        assert_eq!(parse_connect(&long), Err(HeadError::LineTooLong));
        let mut many = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS + 1 {
            many.extend_from_slice(b"X: y\r\n");
        }
        assert_eq!(parse_connect(&many), Err(HeadError::TooManyHeaders));
        let mut big = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_HEADER_LINE + 1));
        assert_eq!(parse_connect(&big), Err(HeadError::HeaderTooLong));
        let mut huge = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        while huge.len() <= MAX_HEAD {
            huge.extend_from_slice(&[b'x'; 1000]);
            huge.extend_from_slice(b": y\r\n");
        }
        assert!(parse_connect(&huge).is_err());
    }

    #[test]
    fn host_header_routes_plain_requests() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: Edge-A1:10255\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            parse_host(req).unwrap(),
            Some(("edge-a1".into(), req.len()))
        );
        assert_eq!(
            parse_host(b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n"),
            Err(HeadError::NoHost)
        );
        assert_eq!(parse_host(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap(), None);
    }

    #[test]
    fn error_responses_are_single_line_reasons() {
        let r = String::from_utf8(error_response(404, "unknown\r\ndestination")).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 404 Not Found: unknown??destination\r\n"),
            "{r}"
        );
        assert!(r.contains("Connection: close"));
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod mutant_tests;
