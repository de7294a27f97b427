//! The wire primitives every framed message is built from: the frame header, the per-field
//! caps, the bounded `Reader` and the `Writer`, the shared semantic validators (node names,
//! site names, hosts), the typed [`DecodeError`]/[`EncodeError`] and the [`FrameBuffer`] that
//! turns a byte stream into whole frames. The layout itself is specified in the crate docs.
//!
//! Every length read from the wire is compared with a cap *before* any allocation, and a list
//! count is compared with what the remaining body could possibly hold, so a hostile peer cannot
//! make us reserve memory it did not send. The encoder enforces the same caps and validators,
//! so anything we can encode the peer can decode.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::types::{IpCidr, MacAddr};

/// `[msg_type: u8][body_len: u32 BE]`.
pub const FRAME_HEADER_LEN: usize = 5;
/// First optional message type: unknown types at or above this are skipped, below it they are
/// fatal.
pub const FIRST_OPTIONAL_TYPE: u8 = 0x80;

/// Kubernetes node names (DNS-1123 subdomain).
pub const MAX_NODE_NAME_LEN: usize = 253;
/// Gateway endpoint names and hub ids.
pub const MAX_NAME_LEN: usize = 253;
/// Gateway hosts: a DNS name or an IP literal.
pub const MAX_HOST_LEN: usize = 253;
/// Site names (a Kubernetes label value).
pub const MAX_SITE_LEN: usize = 63;
/// The ALPN string echoed in `Hello`.
pub const MAX_ALPN_LEN: usize = 32;
/// Agent build/version strings.
pub const MAX_VERSION_STRING_LEN: usize = 128;
/// Datapath names such as "fdb", "tun", "none".
pub const MAX_DATAPATH_LEN: usize = 32;
/// Free-text messages for operators (going-away, errors).
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Join tokens.
pub const MAX_TOKEN_LEN: usize = 1024;
/// What the API server asked to connect to, kept for logs.
pub const MAX_DISPLAY_LEN: usize = 512;
/// A PKCS#10 certificate request in DER. An agent's (P-256) is about 250 bytes and one for an
/// RSA-4096 key under 1.8 KB; the cap matters because the hub holds an enrolment request, from
/// a peer that has proved nothing yet, until it is complete (16 KiB before issue 11's budget).
pub const MAX_CSR_LEN: usize = 4096;
/// One X.509 certificate in DER (leaf or CA).
pub const MAX_CERT_LEN: usize = 16 * 1024;
/// Pod CIDRs an agent reports about itself.
pub const MAX_POD_CIDRS: usize = 16;
/// Underlay addresses an agent reports about itself.
pub const MAX_UNDERLAY_ADDRS: usize = 16;
/// Gateway endpoints in one view.
pub const MAX_GATEWAYS: usize = 64;
/// Routes in one view; in practice the frame cap binds first (see the crate docs).
pub const MAX_ROUTES: usize = 65_535;

/// A decoder refused its input. Every variant names the field so an operator can tell which
/// peer sent what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated message: {field} needs {needed} more byte(s) than the frame holds")]
    Truncated { field: &'static str, needed: usize },
    #[error("{field} is {len} long, over the protocol limit of {max}; refusing it")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error(
        "unknown critical message type 0x{0:02x}: the peer speaks a newer or different protocol \
         and this connection cannot continue"
    )]
    UnknownCriticalType(u8),
    #[error("message type 0x{msg_type:02x} is not allowed on {context}")]
    UnexpectedType { context: &'static str, msg_type: u8 },
    #[error("invalid {field}: {reason}")]
    InvalidValue { field: &'static str, reason: String },
    #[error("peer speaks protocol version {got}, this build supports version {supported}")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error(
        "refusing to buffer {len} bytes of unread stream data (capacity {capacity}); the reader \
         must drain decoded messages before pushing more"
    )]
    BufferFull { len: usize, capacity: usize },
}

/// A value cannot be encoded because it breaks a cap or a validation rule. Encoders never
/// truncate: they refuse and leave the output buffer as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode {field}: length {len} is over the protocol limit of {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("cannot encode {field}: {reason}")]
    InvalidValue { field: &'static str, reason: String },
}

/// Returns `Err(UnsupportedVersion)` unless `got` is [`crate::PROTOCOL_VERSION`]. Decoders
/// deliberately do not call this: the version field is decoded first so the receiver can
/// answer with a clear error instead of a parse failure.
pub fn check_protocol_version(got: u16) -> Result<(), DecodeError> {
    if got == crate::PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedVersion {
            got,
            supported: crate::PROTOCOL_VERSION,
        })
    }
}

/// True for message types whose unknown presence must close the connection.
pub const fn is_critical(msg_type: u8) -> bool {
    msg_type < FIRST_OPTIONAL_TYPE
}

/// Checks a Kubernetes node name: a DNS-1123 subdomain (lowercase alphanumerics, '-' and '.',
/// each dot-separated part starting and ending with an alphanumeric, at most 253 bytes).
/// Label length is not limited to 63 because Kubernetes does not limit it for node names.
pub fn check_node_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("node name is empty");
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err("node name is longer than 253 bytes");
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
            return Err("node name has an empty dot-separated part");
        };
        if !bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("node name may only contain lowercase letters, digits, '-' and '.'");
        }
        if *first == b'-' || *last == b'-' {
            return Err("each part of a node name must start and end with a letter or digit");
        }
    }
    Ok(())
}

/// True when [`check_node_name`] accepts `name`.
pub fn is_valid_node_name(name: &str) -> bool {
    check_node_name(name).is_ok()
}

/// Checks a site name: a Kubernetes label value (empty, or up to 63 of `[A-Za-z0-9._-]`
/// starting and ending with an alphanumeric).
pub fn check_site_name(site: &str) -> Result<(), &'static str> {
    let bytes = site.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Ok(());
    };
    if bytes.len() > MAX_SITE_LEN {
        return Err("site name is longer than 63 bytes");
    }
    if !bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("site name may only contain letters, digits, '-', '_' and '.'");
    }
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("site name must start and end with a letter or digit");
    }
    Ok(())
}

/// Checks a dialable host: a non-empty DNS name or IP literal, printable ASCII without spaces.
pub fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("host is empty");
    }
    if !host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("host must be printable ASCII without spaces");
    }
    Ok(())
}

/// Reads primitives from one frame body. Every read is bounds-checked and reports the field
/// it was reading; nothing here can panic.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                field,
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        <[u8; N]>::try_from(bytes).map_err(|_| DecodeError::Truncated { field, needed: N })
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// u16 length + UTF-8; the cap is checked before the bytes are touched.
    pub(crate) fn string(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        let bytes = self.take(len, field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// A string that must also pass a semantic validator.
    pub(crate) fn checked_string(
        &mut self,
        field: &'static str,
        max: usize,
        check: fn(&str) -> Result<(), &'static str>,
    ) -> Result<String, DecodeError> {
        let s = self.string(field, max)?;
        check(&s).map_err(|reason| DecodeError::InvalidValue {
            field,
            reason: reason.to_owned(),
        })?;
        Ok(s)
    }

    /// u32 length + bytes; the cap is checked before allocating.
    pub(crate) fn blob(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, DecodeError> {
        let len = usize::try_from(self.u32(field)?).unwrap_or(usize::MAX);
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        Ok(self.take(len, field)?.to_vec())
    }

    /// u16 element count, checked against the cap and against the smallest possible encoding
    /// of `count` elements so `Vec::with_capacity(count)` is bounded by what was received.
    pub(crate) fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_elem_len: usize,
    ) -> Result<usize, DecodeError> {
        let n = usize::from(self.u16(field)?);
        if n > max {
            return Err(DecodeError::TooLong { field, len: n, max });
        }
        let min_total = n.saturating_mul(min_elem_len);
        if min_total > self.remaining() {
            return Err(DecodeError::Truncated {
                field,
                needed: min_total - self.remaining(),
            });
        }
        Ok(n)
    }

    /// Option/bool tag: exactly 0 or 1.
    pub(crate) fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue {
                field,
                reason: format!("tag byte must be 0 or 1, got {other}"),
            }),
        }
    }

    pub(crate) fn ip_addr(&mut self, field: &'static str) -> Result<IpAddr, DecodeError> {
        match self.u8(field)? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>(field)?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>(field)?))),
            other => Err(DecodeError::InvalidValue {
                field,
                reason: format!("address family must be 4 or 6, got {other}"),
            }),
        }
    }

    pub(crate) fn ip_cidr(&mut self, field: &'static str) -> Result<IpCidr, DecodeError> {
        let addr = self.ip_addr(field)?;
        let prefix = self.u8(field)?;
        IpCidr::new(addr, prefix).map_err(|e| DecodeError::InvalidValue {
            field,
            reason: e.to_string(),
        })
    }

    pub(crate) fn mac(&mut self, field: &'static str) -> Result<MacAddr, DecodeError> {
        Ok(MacAddr(self.array(field)?))
    }
}

/// Smallest encodings, used to bound list counts.
pub(crate) const MIN_STRING_LEN: usize = 2;
pub(crate) const MIN_IP_ADDR_LEN: usize = 5;
pub(crate) const MIN_IP_CIDR_LEN: usize = MIN_IP_ADDR_LEN + 1;

/// Appends primitives to an output buffer, enforcing the same caps the [`Reader`] does.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn string(
        &mut self,
        field: &'static str,
        s: &str,
        max: usize,
    ) -> Result<(), EncodeError> {
        let len = s.len();
        let wire_len = u16::try_from(len)
            .ok()
            .filter(|_| len <= max)
            .ok_or(EncodeError::TooLong { field, len, max })?;
        self.u16(wire_len);
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    pub(crate) fn checked_string(
        &mut self,
        field: &'static str,
        s: &str,
        max: usize,
        check: fn(&str) -> Result<(), &'static str>,
    ) -> Result<(), EncodeError> {
        if s.len() > max {
            return Err(EncodeError::TooLong {
                field,
                len: s.len(),
                max,
            });
        }
        check(s).map_err(|reason| EncodeError::InvalidValue {
            field,
            reason: reason.to_owned(),
        })?;
        self.string(field, s, max)
    }

    pub(crate) fn blob(
        &mut self,
        field: &'static str,
        b: &[u8],
        max: usize,
    ) -> Result<(), EncodeError> {
        let len = b.len();
        let wire_len = u32::try_from(len)
            .ok()
            .filter(|_| len <= max)
            .ok_or(EncodeError::TooLong { field, len, max })?;
        self.u32(wire_len);
        self.out.extend_from_slice(b);
        Ok(())
    }

    pub(crate) fn count(
        &mut self,
        field: &'static str,
        n: usize,
        max: usize,
    ) -> Result<(), EncodeError> {
        let wire = u16::try_from(n)
            .ok()
            .filter(|_| n <= max)
            .ok_or(EncodeError::TooLong { field, len: n, max })?;
        self.u16(wire);
        Ok(())
    }

    pub(crate) fn flag(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    pub(crate) fn ip_addr(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.out.extend_from_slice(&v6.octets());
            }
        }
    }

    pub(crate) fn ip_cidr(&mut self, c: IpCidr) {
        self.ip_addr(c.addr());
        self.u8(c.prefix());
    }

    pub(crate) fn mac(&mut self, m: MacAddr) {
        self.out.extend_from_slice(&m.0);
    }
}

/// Appends one frame: writes the header, lets `body` write the body, then patches the length.
/// On any error (including a body over `max_body`) `out` is restored to its original length.
pub(crate) fn write_frame(
    out: &mut Vec<u8>,
    msg_type: u8,
    max_body: usize,
    body: impl FnOnce(&mut Writer<'_>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.push(msg_type);
    out.extend_from_slice(&[0; 4]);
    let body_start = out.len();
    let result = body(&mut Writer::new(out)).and_then(|()| {
        let len = out.len() - body_start;
        u32::try_from(len)
            .ok()
            .filter(|_| len <= max_body)
            .ok_or(EncodeError::TooLong {
                field: "frame body",
                len,
                max: max_body,
            })
    });
    match result {
        Ok(len) => {
            if let Some(slot) = out.get_mut(start + 1..body_start) {
                slot.copy_from_slice(&len.to_be_bytes());
            }
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// One complete frame borrowed from an input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub msg_type: u8,
    pub body: &'a [u8],
}

/// Splits the first frame off `buf`. `Ok(None)` while the header or body is incomplete; an
/// over-cap length is refused as soon as the header is visible, before waiting for the body.
pub fn split_frame(
    buf: &[u8],
    max_body: usize,
) -> Result<Option<(RawFrame<'_>, usize)>, DecodeError> {
    let Some((&msg_type, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let Some(len_bytes) = rest.get(..4) else {
        return Ok(None);
    };
    let mut len_arr = [0u8; 4];
    len_arr.copy_from_slice(len_bytes);
    let body_len = usize::try_from(u32::from_be_bytes(len_arr)).unwrap_or(usize::MAX);
    if body_len > max_body {
        return Err(DecodeError::TooLong {
            field: "frame body",
            len: body_len,
            max: max_body,
        });
    }
    let Some(body) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len) else {
        return Ok(None);
    };
    Ok(Some((
        RawFrame { msg_type, body },
        FRAME_HEADER_LEN + body_len,
    )))
}

/// Accumulates stream bytes and hands out whole frames. It refuses input that would grow the
/// unread data past `capacity` (two maximum frames by default), which a reader that pushes at
/// most one maximum frame at a time and drains after each push never hits, and it refuses an
/// over-cap frame length as soon as the header arrives.
#[derive(Debug, Clone)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    max_body: usize,
    capacity: usize,
}

impl FrameBuffer {
    /// A buffer for frames with bodies up to `max_body`.
    pub fn new(max_body: usize) -> Self {
        FrameBuffer {
            buf: Vec::new(),
            start: 0,
            max_body,
            capacity: max_body.saturating_add(FRAME_HEADER_LEN).saturating_mul(2),
        }
    }

    /// The most unread bytes this buffer will hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes pushed but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends stream bytes.
    pub fn push(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        let len = self.buffered().saturating_add(data.len());
        if len > self.capacity {
            return Err(DecodeError::BufferFull {
                len,
                capacity: self.capacity,
            });
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // Exactly what is needed, never past the capacity: a peer that sends a frame to the
        // cap and stops must not make the buffer round up to twice its size.
        self.buf.reserve_exact(data.len());
        self.buf.extend_from_slice(data);
        // Fail fast on an oversized header instead of waiting for bytes that will never fit.
        split_frame(&self.buf, self.max_body).map(|_| ())
    }

    /// The next complete frame, if one is buffered. The frame is consumed only when `decode`
    /// succeeds, so an error is sticky: the stream is unusable after it.
    pub fn next_with<T>(
        &mut self,
        decode: impl FnOnce(RawFrame<'_>) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let Some((frame, used)) = split_frame(pending, self.max_body)? else {
            return Ok(None);
        };
        let value = decode(frame)?;
        self.start += used;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            // Drained after a large frame: do not keep its capacity for a session that mostly
            // carries pings.
            if self.buf.capacity() > 4096 {
                self.buf = Vec::new();
            }
        }
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn node_names() {
        for ok in [
            "a",
            "edge-1",
            "edge-1.site-a.example",
            "0",
            "x".repeat(253).as_str(),
        ] {
            assert!(is_valid_node_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Edge",
            "-edge",
            "edge-",
            "edge..a",
            ".edge",
            "edge.",
            "edge_1",
            "édge",
            "x".repeat(254).as_str(),
        ] {
            assert!(!is_valid_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn site_names() {
        for ok in ["", "a", "Site_A.1-x", "x".repeat(63).as_str()] {
            assert!(check_site_name(ok).is_ok(), "{ok}");
        }
        for bad in ["-a", "a-", "a b", "x".repeat(64).as_str(), "ü"] {
            assert!(check_site_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn string_cap_checked_before_bytes() {
        // Declares 60000 bytes but sends none: must be TooLong, not Truncated.
        let mut r = Reader::new(&[0xea, 0x60]);
        assert_eq!(
            r.string("f", 253),
            Err(DecodeError::TooLong {
                field: "f",
                len: 60000,
                max: 253
            })
        );
    }

    #[test]
    fn blob_cap_checked_before_allocation() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            r.blob("csr", MAX_CSR_LEN),
            Err(DecodeError::TooLong {
                len: 0xffff_ffff,
                ..
            })
        ));
    }

    #[test]
    fn count_bounded_by_remaining_bytes() {
        let mut r = Reader::new(&[0x00, 0x10, 1, 2, 3]);
        assert_eq!(
            r.count("routes", MAX_ROUTES, 22),
            Err(DecodeError::Truncated {
                field: "routes",
                needed: 16 * 22 - 3
            })
        );
        let mut r = Reader::new(&[0x00, 0x41]);
        assert!(matches!(
            r.count("gateways", MAX_GATEWAYS, 1),
            Err(DecodeError::TooLong {
                len: 65,
                max: 64,
                ..
            })
        ));
    }

    #[test]
    fn flag_and_family() {
        assert!(Reader::new(&[2]).flag("f").is_err());
        assert!(matches!(
            Reader::new(&[5, 1, 2, 3, 4]).ip_addr("ip"),
            Err(DecodeError::InvalidValue { .. })
        ));
        assert!(matches!(
            Reader::new(&[4, 10, 0, 0, 0, 33]).ip_cidr("cidr"),
            Err(DecodeError::InvalidValue { .. })
        ));
        assert!(matches!(
            Reader::new(&[4, 10, 0, 0, 1, 8]).ip_cidr("cidr"),
            Err(DecodeError::InvalidValue { .. })
        ));
        assert_eq!(
            Reader::new(&[4, 10, 0, 0, 0, 8])
                .ip_cidr("cidr")
                .unwrap()
                .to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(
            Reader::new(&[0, 2, 0xc3, 0x28]).string("msg", 10),
            Err(DecodeError::InvalidUtf8 { field: "msg" })
        );
    }

    #[test]
    fn write_frame_rolls_back_on_error() {
        let mut out = vec![9, 9];
        let err = write_frame(&mut out, 1, 4, |w| {
            w.u64(1);
            Ok(())
        });
        assert!(matches!(
            err,
            Err(EncodeError::TooLong {
                field: "frame body",
                ..
            })
        ));
        assert_eq!(out, vec![9, 9]);
        let err = write_frame(&mut out, 1, 100, |w| w.string("s", "toolong", 3));
        assert!(err.is_err());
        assert_eq!(out, vec![9, 9]);
    }

    #[test]
    fn split_frame_refuses_oversize_header_early() {
        assert_eq!(split_frame(&[1, 0, 0], 10), Ok(None));
        assert!(matches!(
            split_frame(&[1, 0, 0, 0, 11], 10),
            Err(DecodeError::TooLong {
                len: 11,
                max: 10,
                ..
            })
        ));
        assert_eq!(split_frame(&[1, 0, 0, 0, 2, 7], 10), Ok(None));
        let (f, n) = split_frame(&[1, 0, 0, 0, 1, 7, 8], 10).unwrap().unwrap();
        assert_eq!((f.msg_type, f.body, n), (1, &[7u8][..], 6));
    }

    #[test]
    fn frame_buffer_capacity() {
        let mut fb = FrameBuffer::new(10);
        assert_eq!(fb.capacity(), 30);
        assert!(matches!(
            fb.push(&[0; 31]),
            Err(DecodeError::BufferFull { .. })
        ));
        assert!(fb.push(&[1, 0, 0, 0, 11]).is_err());
        let mut fb = FrameBuffer::new(10);
        fb.push(&[1, 0, 0, 0, 1, 5, 2, 0]).unwrap();
        assert_eq!(fb.next_with(|f| Ok(f.body.to_vec())), Ok(Some(vec![5])));
        assert_eq!(fb.next_with(|f| Ok(f.body.to_vec())), Ok(None));
        fb.push(&[0, 0, 0]).unwrap();
        assert_eq!(fb.next_with(|f| Ok(f.msg_type)), Ok(Some(2)));
        assert_eq!(fb.buffered(), 0);
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod mutant_tests;
