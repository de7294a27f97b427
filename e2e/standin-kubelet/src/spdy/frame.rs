//! SPDY/3.1 frame codec: control frames, data frames and zlib-compressed header blocks.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//! control: |1| version(15) | type(16) | flags(8) | length(24) | payload(length)
//! data:    |0| stream-id(31)           | flags(8) | length(24) | payload(length)
//! ```
//!
//! Header blocks (in SYN_STREAM, SYN_REPLY and HEADERS) are `u32 count` followed by `count`
//! pairs of `u32 len || name` and `u32 len || value` (several values joined by NUL), the whole
//! block deflated. Each direction of a connection keeps ONE zlib stream, primed with the SPDY/3
//! dictionary, for its whole life; every block ends with a sync flush. So the [`FrameDecoder`]
//! and [`FrameEncoder`] of a connection must see every header-carrying frame, in wire order.
//!
//! Decoding never panics on peer input: lengths are checked against [`Limits`] before anything
//! is allocated or awaited, and every read is bounds-checked.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::dictionary;

/// The only protocol version spoken.
pub const SPDY_VERSION: u16 = 3;
/// Largest payload the 24-bit length field can describe.
pub const MAX_FRAME_PAYLOAD: usize = 0x00FF_FFFF;
/// Size of every frame header (control and data alike).
pub const FRAME_HEADER_LEN: usize = 8;

/// FIN flag (data frames, SYN_STREAM, SYN_REPLY, HEADERS).
pub const FLAG_FIN: u8 = 0x01;
/// UNIDIRECTIONAL flag (SYN_STREAM).
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// SETTINGS frame flag: clear previously persisted settings.
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// Control frame type codes.
pub mod frame_type {
    /// SYN_STREAM
    pub const SYN_STREAM: u16 = 1;
    /// SYN_REPLY
    pub const SYN_REPLY: u16 = 2;
    /// RST_STREAM
    pub const RST_STREAM: u16 = 3;
    /// SETTINGS
    pub const SETTINGS: u16 = 4;
    /// PING
    pub const PING: u16 = 6;
    /// GOAWAY
    pub const GOAWAY: u16 = 7;
    /// HEADERS
    pub const HEADERS: u16 = 8;
    /// WINDOW_UPDATE
    pub const WINDOW_UPDATE: u16 = 9;
}

/// RST_STREAM status codes.
pub mod rst_status {
    /// PROTOCOL_ERROR
    pub const PROTOCOL_ERROR: u32 = 1;
    /// INVALID_STREAM
    pub const INVALID_STREAM: u32 = 2;
    /// REFUSED_STREAM
    pub const REFUSED_STREAM: u32 = 3;
    /// CANCEL
    pub const CANCEL: u32 = 5;
    /// INTERNAL_ERROR
    pub const INTERNAL_ERROR: u32 = 6;
    /// STREAM_ALREADY_CLOSED
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
}

/// GOAWAY status codes.
pub mod goaway_status {
    /// OK
    pub const OK: u32 = 0;
    /// PROTOCOL_ERROR
    pub const PROTOCOL_ERROR: u32 = 1;
    /// INTERNAL_ERROR
    pub const INTERNAL_ERROR: u32 = 2;
}

/// Caps applied while decoding, before any allocation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted control-frame payload.
    pub max_control_payload: usize,
    /// Largest accepted data-frame payload.
    pub max_data_payload: usize,
    /// Largest accepted header block after decompression.
    pub max_header_block: usize,
    /// Most name/value pairs in one header block.
    pub max_header_pairs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_control_payload: 256 * 1024,
            max_data_payload: MAX_FRAME_PAYLOAD,
            max_header_block: 256 * 1024,
            max_header_pairs: 1024,
        }
    }
}

/// Errors from decoding or encoding frames. Any of them is fatal to the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A control frame carried a version other than 3.
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    /// A frame declared a payload longer than the configured limit.
    #[error("{kind} frame payload of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// "control" or "data".
        kind: &'static str,
        /// Declared length.
        len: usize,
        /// Limit in force.
        limit: usize,
    },
    /// A control frame's payload does not fit its type.
    #[error("malformed {frame} frame: {reason}")]
    Malformed {
        /// Frame type name.
        frame: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A frame that needs a stream id carried 0.
    #[error("stream id 0 in a {0} frame")]
    ZeroStreamId(&'static str),
    /// A decompressed header block is malformed.
    #[error("malformed header block: {0}")]
    HeaderBlock(&'static str),
    /// A decompressed header block is larger than the limit.
    #[error("header block inflates beyond {0} bytes")]
    HeaderBlockTooLarge(usize),
    /// zlib reported an error.
    #[error("header compression: {0}")]
    Zlib(String),
    /// The frame cannot be encoded (e.g. too long for the 24-bit length field).
    #[error("cannot encode frame: {0}")]
    Encode(&'static str),
}

/// An ordered multimap of lower-case header names to values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    entries: Vec<(String, Vec<String>)>,
}

impl HeaderBlock {
    /// An empty block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder form of [`HeaderBlock::append`].
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.append(name, value);
        self
    }

    /// Adds a value under `name` (lower-cased), after any existing values.
    pub fn append(&mut self, name: &str, value: impl Into<String>) {
        let name = name.to_ascii_lowercase();
        let value = value.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value),
            None => self.entries.push((name, vec![value])),
        }
    }

    /// The first value under `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.first())
            .map(String::as_str)
    }

    /// All values under `name` (case-insensitive).
    pub fn get_all(&self, name: &str) -> &[String] {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }

    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Iterates over `(name, values)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Per-entry flags (persist / persisted).
    pub flags: u8,
    /// 24-bit setting id.
    pub id: u32,
    /// Value.
    pub value: u32,
}

/// A decoded SPDY/3 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// New stream id (odd from clients, even from servers).
        stream_id: u32,
        /// Stream this one is associated to (0 = none).
        associated_to: u32,
        /// Priority 0 (highest) ..= 7.
        priority: u8,
        /// Credential slot.
        slot: u8,
        /// Sender half-closes immediately.
        fin: bool,
        /// Receiver may not send on the stream.
        unidirectional: bool,
        /// Headers.
        headers: HeaderBlock,
    },
    /// Accepts a stream.
    SynReply {
        /// Stream id.
        stream_id: u32,
        /// Sender half-closes immediately.
        fin: bool,
        /// Headers.
        headers: HeaderBlock,
    },
    /// Aborts a stream.
    RstStream {
        /// Stream id.
        stream_id: u32,
        /// Status code, see [`rst_status`].
        status: u32,
    },
    /// Connection settings.
    Settings {
        /// Clear previously persisted settings.
        clear_persisted: bool,
        /// Entries.
        entries: Vec<Setting>,
    },
    /// Liveness probe; the receiver echoes pings it did not send.
    Ping {
        /// Odd from clients, even from servers.
        id: u32,
    },
    /// The sender accepts no new streams.
    GoAway {
        /// Highest stream id the sender processed.
        last_good_stream_id: u32,
        /// Status, see [`goaway_status`].
        status: u32,
    },
    /// Extra headers on a stream.
    Headers {
        /// Stream id.
        stream_id: u32,
        /// Half-close.
        fin: bool,
        /// Headers.
        headers: HeaderBlock,
    },
    /// Flow-control credit.
    WindowUpdate {
        /// Stream id.
        stream_id: u32,
        /// Additional window.
        delta: u32,
    },
    /// Stream payload.
    Data {
        /// Stream id.
        stream_id: u32,
        /// Sender half-closes after this payload.
        fin: bool,
        /// Payload.
        data: Bytes,
    },
    /// A control frame type this codec skips (NOOP, CREDENTIAL, unknown); the spec says ignore.
    Ignored {
        /// Type code.
        frame_type: u16,
        /// Flags.
        flags: u8,
        /// Payload length that was skipped.
        length: usize,
    },
}

/// Inflates header blocks with the connection's single zlib stream.
pub struct HeaderInflater {
    z: Decompress,
    limits: Limits,
}

impl std::fmt::Debug for HeaderInflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderInflater")
            .field("total_in", &self.z.total_in())
            .finish()
    }
}

impl HeaderInflater {
    /// A fresh zlib stream (expects a zlib header naming the SPDY dictionary).
    pub fn new(limits: Limits) -> Self {
        HeaderInflater {
            z: Decompress::new(true),
            limits,
        }
    }

    /// Inflates one compressed header block and parses it.
    pub fn decode(&mut self, compressed: &[u8]) -> Result<HeaderBlock, FrameError> {
        let raw = self.inflate(compressed)?;
        parse_header_block(&raw, self.limits.max_header_pairs)
    }

    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, FrameError> {
        let max = self.limits.max_header_block;
        // One byte over the limit is enough to detect "too large".
        let hard_cap = max.saturating_add(1);
        let mut out: Vec<u8> =
            Vec::with_capacity(input.len().saturating_mul(4).clamp(64, hard_cap));
        let mut consumed = 0usize;
        loop {
            if out.len() >= hard_cap {
                return Err(FrameError::HeaderBlockTooLarge(max));
            }
            if out.len() == out.capacity() {
                let extra = out.capacity().max(64).min(hard_cap - out.len());
                out.reserve_exact(extra);
            }
            let in_before = self.z.total_in();
            let out_before = out.len();
            let rest = input.get(consumed..).unwrap_or(&[]);
            let res = self.z.decompress_vec(rest, &mut out, FlushDecompress::Sync);
            let used = usize::try_from(self.z.total_in() - in_before)
                .map_err(|_| FrameError::Zlib("input counter overflow".into()))?;
            consumed = consumed.saturating_add(used);
            match res {
                Ok(Status::StreamEnd) => break,
                Ok(Status::Ok) | Ok(Status::BufError) => {
                    let progressed = used > 0 || out.len() > out_before;
                    let room_left = out.len() < out.capacity();
                    if consumed >= input.len() && room_left {
                        break;
                    }
                    if !progressed && room_left {
                        return Err(FrameError::Zlib("inflate made no progress".into()));
                    }
                }
                Err(e) => {
                    if e.needs_dictionary().is_some() {
                        self.z
                            .set_dictionary(dictionary())
                            .map_err(|e| FrameError::Zlib(format!("set dictionary: {e}")))?;
                    } else {
                        return Err(FrameError::Zlib(e.to_string()));
                    }
                }
            }
        }
        if out.len() > max {
            return Err(FrameError::HeaderBlockTooLarge(max));
        }
        Ok(out)
    }
}

/// Deflates header blocks with the connection's single zlib stream.
pub struct HeaderDeflater {
    z: Compress,
}

impl std::fmt::Debug for HeaderDeflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDeflater")
            .field("total_out", &self.z.total_out())
            .finish()
    }
}

impl HeaderDeflater {
    /// A fresh zlib stream primed with the SPDY/3 dictionary.
    pub fn new() -> Result<Self, FrameError> {
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(dictionary())
            .map_err(|e| FrameError::Zlib(format!("set dictionary: {e}")))?;
        Ok(HeaderDeflater { z })
    }

    /// Appends the compressed form of `headers` (ending in a sync flush) to `out`.
    pub fn encode(&mut self, headers: &HeaderBlock, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let raw = serialize_header_block(headers)?;
        let mut consumed = 0usize;
        loop {
            out.reserve(raw.len() / 2 + 64);
            let in_before = self.z.total_in();
            let rest = raw.get(consumed..).unwrap_or(&[]);
            self.z
                .compress_vec(rest, out, FlushCompress::Sync)
                .map_err(|e| FrameError::Zlib(e.to_string()))?;
            let used = usize::try_from(self.z.total_in() - in_before)
                .map_err(|_| FrameError::Zlib("input counter overflow".into()))?;
            consumed = consumed.saturating_add(used);
            // zlib has finished the flush once all input is in and output space was left over.
            if consumed >= raw.len() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

fn serialize_header_block(headers: &HeaderBlock) -> Result<Vec<u8>, FrameError> {
    let too_long = || FrameError::Encode("header block field longer than u32");
    let mut raw = Vec::new();
    raw.put_u32(u32::try_from(headers.len()).map_err(|_| too_long())?);
    for (name, values) in headers.iter() {
        raw.put_u32(u32::try_from(name.len()).map_err(|_| too_long())?);
        raw.put_slice(name.as_bytes());
        let joined = values.join("\0");
        raw.put_u32(u32::try_from(joined.len()).map_err(|_| too_long())?);
        raw.put_slice(joined.as_bytes());
    }
    Ok(raw)
}

/// Bounds-checked reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
}

fn parse_header_block(raw: &[u8], max_pairs: usize) -> Result<HeaderBlock, FrameError> {
    let truncated = FrameError::HeaderBlock("truncated");
    let mut c = Cursor { buf: raw };
    let count = c.u32().ok_or(FrameError::HeaderBlock("truncated"))? as usize;
    if count > max_pairs {
        return Err(FrameError::HeaderBlock("too many header pairs"));
    }
    // Every pair needs at least two 4-byte lengths: check before allocating.
    if count.saturating_mul(8) > c.remaining() {
        return Err(truncated);
    }
    let mut block = HeaderBlock {
        entries: Vec::with_capacity(count),
    };
    for _ in 0..count {
        let name_len = c.u32().ok_or(FrameError::HeaderBlock("truncated"))? as usize;
        let name = c
            .take(name_len)
            .ok_or(FrameError::HeaderBlock("name runs past the block"))?;
        if name.is_empty() {
            return Err(FrameError::HeaderBlock("empty header name"));
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| FrameError::HeaderBlock("header name is not UTF-8"))?;
        let value_len = c.u32().ok_or(FrameError::HeaderBlock("truncated"))? as usize;
        let value = c
            .take(value_len)
            .ok_or(FrameError::HeaderBlock("value runs past the block"))?;
        let value = String::from_utf8_lossy(value);
        for v in value.split('\0') {
            block.append(name, v);
        }
    }
    Ok(block)
}

/// Splits a byte stream into frames, inflating header blocks in wire order.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    inflater: HeaderInflater,
}

impl FrameDecoder {
    /// A decoder with a fresh zlib stream.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            inflater: HeaderInflater::new(limits),
        }
    }

    /// Takes one complete frame off the front of `buf`, or returns `Ok(None)` if more bytes are
    /// needed (after reserving room for the declared, already size-checked, frame).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let first = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let flags = buf[4];
        let len = (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
        let control = first & 0x8000_0000 != 0;
        let (kind, limit) = if control {
            ("control", self.limits.max_control_payload)
        } else {
            ("data", self.limits.max_data_payload)
        };
        if control {
            let version = ((first >> 16) & 0x7fff) as u16;
            if version != SPDY_VERSION {
                return Err(FrameError::UnsupportedVersion(version));
            }
        }
        if len > limit {
            return Err(FrameError::TooLarge { kind, len, limit });
        }
        let total = FRAME_HEADER_LEN + len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        if control {
            let ftype = (first & 0xffff) as u16;
            self.parse_control(ftype, flags, payload).map(Some)
        } else {
            let stream_id = first & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(FrameError::ZeroStreamId("DATA"));
            }
            Ok(Some(Frame::Data {
                stream_id,
                fin: flags & FLAG_FIN != 0,
                data: payload,
            }))
        }
    }

    fn parse_control(
        &mut self,
        ftype: u16,
        flags: u8,
        payload: Bytes,
    ) -> Result<Frame, FrameError> {
        let fin = flags & FLAG_FIN != 0;
        let mut c = Cursor { buf: &payload };
        let malformed = |frame, reason| FrameError::Malformed { frame, reason };
        match ftype {
            frame_type::SYN_STREAM => {
                let short = || malformed("SYN_STREAM", "shorter than 10 bytes");
                let stream_id = c.u32().ok_or_else(short)? & 0x7fff_ffff;
                let associated_to = c.u32().ok_or_else(short)? & 0x7fff_ffff;
                let priority = c.u8().ok_or_else(short)? >> 5;
                let slot = c.u8().ok_or_else(short)?;
                let headers = self.inflater.decode(c.buf)?;
                if stream_id == 0 {
                    return Err(FrameError::ZeroStreamId("SYN_STREAM"));
                }
                Ok(Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    slot,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                })
            }
            frame_type::SYN_REPLY | frame_type::HEADERS => {
                let name = if ftype == frame_type::SYN_REPLY {
                    "SYN_REPLY"
                } else {
                    "HEADERS"
                };
                let stream_id = c
                    .u32()
                    .ok_or_else(|| malformed(name, "shorter than 4 bytes"))?
                    & 0x7fff_ffff;
                let headers = self.inflater.decode(c.buf)?;
                if stream_id == 0 {
                    return Err(FrameError::ZeroStreamId(name));
                }
                Ok(if ftype == frame_type::SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                })
            }
            frame_type::RST_STREAM => {
                if payload.len() != 8 {
                    return Err(malformed("RST_STREAM", "length is not 8"));
                }
                let stream_id =
                    c.u32().ok_or_else(|| malformed("RST_STREAM", "short"))? & 0x7fff_ffff;
                let status = c.u32().ok_or_else(|| malformed("RST_STREAM", "short"))?;
                if stream_id == 0 {
                    return Err(FrameError::ZeroStreamId("RST_STREAM"));
                }
                Ok(Frame::RstStream { stream_id, status })
            }
            frame_type::SETTINGS => {
                let count = c
                    .u32()
                    .ok_or_else(|| malformed("SETTINGS", "shorter than 4 bytes"))?
                    as usize;
                if count.saturating_mul(8) != c.remaining() {
                    return Err(malformed("SETTINGS", "entry count does not match length"));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let word = c.u32().ok_or_else(|| malformed("SETTINGS", "short"))?;
                    let value = c.u32().ok_or_else(|| malformed("SETTINGS", "short"))?;
                    entries.push(Setting {
                        flags: (word >> 24) as u8,
                        id: word & 0x00ff_ffff,
                        value,
                    });
                }
                Ok(Frame::Settings {
                    clear_persisted: flags & FLAG_SETTINGS_CLEAR != 0,
                    entries,
                })
            }
            frame_type::PING => {
                if payload.len() != 4 {
                    return Err(malformed("PING", "length is not 4"));
                }
                let id = c.u32().ok_or_else(|| malformed("PING", "short"))?;
                Ok(Frame::Ping { id })
            }
            frame_type::GOAWAY => {
                // SPDY/3 GOAWAY is 8 bytes; tolerate the 4-byte SPDY/2 form.
                if payload.len() != 8 && payload.len() != 4 {
                    return Err(malformed("GOAWAY", "length is not 8"));
                }
                let last_good_stream_id =
                    c.u32().ok_or_else(|| malformed("GOAWAY", "short"))? & 0x7fff_ffff;
                let status = c.u32().unwrap_or(goaway_status::OK);
                Ok(Frame::GoAway {
                    last_good_stream_id,
                    status,
                })
            }
            frame_type::WINDOW_UPDATE => {
                if payload.len() != 8 {
                    return Err(malformed("WINDOW_UPDATE", "length is not 8"));
                }
                let stream_id =
                    c.u32().ok_or_else(|| malformed("WINDOW_UPDATE", "short"))? & 0x7fff_ffff;
                let delta =
                    c.u32().ok_or_else(|| malformed("WINDOW_UPDATE", "short"))? & 0x7fff_ffff;
                Ok(Frame::WindowUpdate { stream_id, delta })
            }
            other => Ok(Frame::Ignored {
                frame_type: other,
                flags,
                length: payload.len(),
            }),
        }
    }
}

/// Serializes frames, deflating header blocks in wire order.
#[derive(Debug)]
pub struct FrameEncoder {
    deflater: HeaderDeflater,
}

impl FrameEncoder {
    /// An encoder with a fresh zlib stream.
    pub fn new() -> Result<Self, FrameError> {
        Ok(FrameEncoder {
            deflater: HeaderDeflater::new()?,
        })
    }

    /// Appends the wire form of `frame` to `dst`.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                if *stream_id == 0 || *stream_id > 0x7fff_ffff {
                    return Err(FrameError::Encode("invalid stream id"));
                }
                if data.len() > MAX_FRAME_PAYLOAD {
                    return Err(FrameError::Encode("data payload longer than 2^24-1"));
                }
                dst.reserve(FRAME_HEADER_LEN + data.len());
                dst.put_u32(*stream_id);
                dst.put_u32((u32::from(flag(*fin, FLAG_FIN)) << 24) | data.len() as u32);
                dst.put_slice(data);
                Ok(())
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                slot,
                fin,
                unidirectional,
                headers,
            } => {
                let mut body = Vec::with_capacity(64);
                body.put_u32(*stream_id & 0x7fff_ffff);
                body.put_u32(*associated_to & 0x7fff_ffff);
                body.put_u8((*priority & 0x07) << 5);
                body.put_u8(*slot);
                self.deflater.encode(headers, &mut body)?;
                let flags = flag(*fin, FLAG_FIN) | flag(*unidirectional, FLAG_UNIDIRECTIONAL);
                put_control(dst, frame_type::SYN_STREAM, flags, &body)
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => {
                let mut body = Vec::with_capacity(32);
                body.put_u32(*stream_id & 0x7fff_ffff);
                self.deflater.encode(headers, &mut body)?;
                put_control(dst, frame_type::SYN_REPLY, flag(*fin, FLAG_FIN), &body)
            }
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let mut body = Vec::with_capacity(32);
                body.put_u32(*stream_id & 0x7fff_ffff);
                self.deflater.encode(headers, &mut body)?;
                put_control(dst, frame_type::HEADERS, flag(*fin, FLAG_FIN), &body)
            }
            Frame::RstStream { stream_id, status } => {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                body[4..].copy_from_slice(&status.to_be_bytes());
                put_control(dst, frame_type::RST_STREAM, 0, &body)
            }
            Frame::Settings {
                clear_persisted,
                entries,
            } => {
                let mut body = Vec::with_capacity(4 + entries.len() * 8);
                body.put_u32(
                    u32::try_from(entries.len())
                        .map_err(|_| FrameError::Encode("too many settings"))?,
                );
                for e in entries {
                    body.put_u32((u32::from(e.flags) << 24) | (e.id & 0x00ff_ffff));
                    body.put_u32(e.value);
                }
                put_control(
                    dst,
                    frame_type::SETTINGS,
                    flag(*clear_persisted, FLAG_SETTINGS_CLEAR),
                    &body,
                )
            }
            Frame::Ping { id } => put_control(dst, frame_type::PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&(last_good_stream_id & 0x7fff_ffff).to_be_bytes());
                body[4..].copy_from_slice(&status.to_be_bytes());
                put_control(dst, frame_type::GOAWAY, 0, &body)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                body[4..].copy_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
                put_control(dst, frame_type::WINDOW_UPDATE, 0, &body)
            }
            Frame::Ignored { .. } => Err(FrameError::Encode("ignored frames are not encoded")),
        }
    }
}

fn flag(set: bool, bit: u8) -> u8 {
    if set {
        bit
    } else {
        0
    }
}

fn put_control(dst: &mut BytesMut, ftype: u16, flags: u8, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME_PAYLOAD {
        return Err(FrameError::Encode("control payload longer than 2^24-1"));
    }
    dst.reserve(FRAME_HEADER_LEN + body.len());
    dst.put_u16(0x8000 | SPDY_VERSION);
    dst.put_u16(ftype);
    dst.put_u32((u32::from(flags) << 24) | body.len() as u32);
    dst.put_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frames: &[Frame]) -> Vec<Frame> {
        let mut enc = FrameEncoder::new().expect("encoder");
        let mut wire = BytesMut::new();
        for f in frames {
            enc.encode(f, &mut wire).expect("encode");
        }
        let mut dec = FrameDecoder::new(Limits::default());
        let mut out = Vec::new();
        while let Some(f) = dec.decode(&mut wire).expect("decode") {
            out.push(f);
        }
        assert!(wire.is_empty(), "left over bytes");
        out
    }

    fn sample_frames() -> Vec<Frame> {
        let h1 = HeaderBlock::new()
            .with("streamType", "stdout")
            .with("port", "8080")
            .with("requestid", "0");
        let h2 = HeaderBlock::new()
            .with("streamtype", "error")
            .with("x-multi", "a")
            .with("x-multi", "b");
        vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 3,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: h1.clone(),
            },
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: HeaderBlock::new(),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 1,
                priority: 7,
                slot: 2,
                fin: true,
                unidirectional: true,
                headers: h2,
            },
            Frame::Headers {
                stream_id: 3,
                fin: true,
                headers: h1,
            },
            Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: rst_status::CANCEL,
            },
            Frame::Settings {
                clear_persisted: true,
                entries: vec![Setting {
                    flags: 1,
                    id: 7,
                    value: 65536,
                }],
            },
            Frame::Ping { id: 1 },
            Frame::GoAway {
                last_good_stream_id: 3,
                status: goaway_status::OK,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 1000,
            },
        ]
    }

    #[test]
    fn frames_round_trip_through_one_zlib_stream_each_way() {
        let frames = sample_frames();
        let got = round_trip(&frames);
        assert_eq!(got.len(), frames.len());
        for (a, b) in frames.iter().zip(&got) {
            match (a, b) {
                (Frame::SynStream { headers: ha, .. }, Frame::SynStream { headers: hb, .. }) => {
                    // Names come back lower-cased.
                    assert_eq!(ha.get("streamtype"), hb.get("streamtype"));
                    assert_eq!(ha.get_all("x-multi"), hb.get_all("x-multi"));
                    assert_eq!(ha.len(), hb.len());
                }
                _ => assert_eq!(a, b),
            }
        }
        if let Frame::SynStream { headers, .. } = &got[0] {
            assert_eq!(headers.get("StreamType"), Some("stdout"));
        }
        if let Frame::SynStream {
            headers,
            fin,
            unidirectional,
            priority,
            ..
        } = &got[2]
        {
            assert_eq!(
                headers.get_all("x-multi"),
                ["a".to_string(), "b".to_string()]
            );
            assert!(*fin && *unidirectional);
            assert_eq!(*priority, 7);
        }
    }

    #[test]
    fn header_block_uses_zlib_with_the_spdy_dictionary() {
        let mut enc = HeaderDeflater::new().expect("deflater");
        let mut out = Vec::new();
        enc.encode(&HeaderBlock::new().with("streamtype", "error"), &mut out)
            .expect("encode");
        // zlib header: CMF 0x78, FLG with FDICT (0x20), then the dictionary's Adler-32.
        assert_eq!(out[0], 0x78);
        assert!(out[1] & 0x20 != 0, "FDICT must be set");
        assert_eq!(((u16::from(out[0]) << 8) | u16::from(out[1])) % 31, 0);
        let dict_id = u32::from_be_bytes([out[2], out[3], out[4], out[5]]);
        let mut a: u32 = 1;
        let mut b: u32 = 0;
        for &x in dictionary() {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(dict_id, (b << 16) | a);
        // A sync flush ends every block with an empty stored block.
        assert!(out.ends_with(&[0x00, 0x00, 0xff, 0xff]));

        // Later blocks continue the same stream: no new zlib header.
        let mut second = Vec::new();
        enc.encode(&HeaderBlock::new().with("streamtype", "error"), &mut second)
            .expect("encode");
        assert!(
            second.len() < out.len(),
            "second block benefits from history"
        );

        let mut inf = HeaderInflater::new(Limits::default());
        assert_eq!(
            inf.decode(&out).expect("first").get("streamtype"),
            Some("error")
        );
        assert_eq!(
            inf.decode(&second).expect("second").get("streamtype"),
            Some("error")
        );
    }

    #[test]
    fn inflater_rejects_a_block_from_a_fresh_stream_mid_connection() {
        let mut enc = HeaderDeflater::new().expect("deflater");
        let mut first = Vec::new();
        enc.encode(&HeaderBlock::new().with("a", "b"), &mut first)
            .expect("encode");
        let mut inf = HeaderInflater::new(Limits::default());
        inf.decode(&first).expect("first");
        // A second zlib header in the middle of the stream is garbage to the inflater.
        assert!(inf.decode(&first).is_err());
    }

    #[test]
    fn partial_input_waits_for_more_bytes() {
        let mut enc = FrameEncoder::new().expect("encoder");
        let mut wire = BytesMut::new();
        for f in sample_frames() {
            enc.encode(&f, &mut wire).expect("encode");
        }
        let all = wire.freeze();
        let mut dec = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut n = 0;
        // Feed one byte at a time.
        for b in all.iter() {
            buf.put_u8(*b);
            while let Some(_f) = dec.decode(&mut buf).expect("decode") {
                n += 1;
            }
        }
        assert_eq!(n, sample_frames().len());
    }

    #[test]
    fn oversized_frames_are_rejected_before_allocation() {
        let mut dec = FrameDecoder::new(Limits {
            max_data_payload: 1024,
            ..Limits::default()
        });
        let mut buf = BytesMut::from(&[0x00, 0x00, 0x00, 0x01, 0x00, 0xff, 0xff, 0xff][..]);
        match dec.decode(&mut buf) {
            Err(FrameError::TooLarge { len, limit, .. }) => {
                assert_eq!(len, 0xff_ffff);
                assert_eq!(limit, 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(
            buf.capacity() < 4096,
            "no allocation for the declared length"
        );

        let mut dec = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::from(&[0x80, 0x03, 0x00, 0x01, 0x00, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge {
                kind: "control",
                ..
            })
        ));
    }

    #[test]
    fn header_pair_count_is_checked_against_the_block_before_allocation() {
        // count = 0x7fffffff with no pairs following.
        let raw = [0x7f, 0xff, 0xff, 0xff];
        assert!(parse_header_block(&raw, usize::MAX).is_err());
        // count within limit but more than the bytes can hold.
        let raw = [0x00, 0x00, 0x00, 0x10, 0, 0, 0, 1, b'a'];
        assert!(parse_header_block(&raw, 1024).is_err());
        // name length running past the end.
        let raw = [0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(parse_header_block(&raw, 1024).is_err());
        // too many pairs.
        let raw = [
            0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 1, b'b', 0, 0, 0, 0,
        ];
        assert!(parse_header_block(&raw, 1).is_err());
        assert_eq!(parse_header_block(&raw, 2).expect("valid").len(), 2);
    }

    #[test]
    fn header_block_inflating_past_the_limit_is_rejected() {
        let big = "x".repeat(10_000);
        let mut enc = HeaderDeflater::new().expect("deflater");
        let mut out = Vec::new();
        enc.encode(&HeaderBlock::new().with("big", big), &mut out)
            .expect("encode");
        let mut inf = HeaderInflater::new(Limits {
            max_header_block: 1000,
            ..Limits::default()
        });
        assert!(matches!(
            inf.decode(&out),
            Err(FrameError::HeaderBlockTooLarge(1000))
        ));
    }

    #[test]
    fn malformed_control_frames_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            // wrong version
            vec![0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1],
            // PING with 3-byte payload
            vec![0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1],
            // RST_STREAM too short
            vec![0x80, 0x03, 0x00, 0x03, 0, 0, 0, 4, 0, 0, 0, 1],
            // RST_STREAM on stream 0
            vec![0x80, 0x03, 0x00, 0x03, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            // SETTINGS whose count disagrees with the length
            vec![0x80, 0x03, 0x00, 0x04, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
            // SYN_STREAM too short
            vec![0x80, 0x03, 0x00, 0x01, 0, 0, 0, 2, 0, 1],
            // SYN_STREAM with garbage header block
            vec![
                0x80, 0x03, 0x00, 0x01, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
            ],
            // SYN_REPLY with an empty header block
            vec![0x80, 0x03, 0x00, 0x02, 0, 0, 0, 4, 0, 0, 0, 1],
            // DATA on stream 0
            vec![0, 0, 0, 0, 0, 0, 0, 1, 0xaa],
            // WINDOW_UPDATE too long
            vec![
                0x80, 0x03, 0x00, 0x09, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0, 0, 1, 0,
            ],
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let mut dec = FrameDecoder::new(Limits::default());
            let mut buf = BytesMut::from(&case[..]);
            assert!(dec.decode(&mut buf).is_err(), "case {i} should fail");
        }
    }

    #[test]
    fn unknown_control_frames_are_skipped() {
        let mut dec = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::from(
            &[
                0x80, 0x03, 0x00, 0x0a, 0x00, 0, 0, 2, 9, 9, 0, 0, 0, 1, 0, 0, 0, 0,
            ][..],
        );
        assert_eq!(
            dec.decode(&mut buf).expect("ok"),
            Some(Frame::Ignored {
                frame_type: 10,
                flags: 0,
                length: 2
            })
        );
        assert_eq!(
            dec.decode(&mut buf).expect("ok"),
            Some(Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::new()
            })
        );
    }

    #[test]
    fn random_garbage_never_panics() {
        // A small deterministic xorshift generator: no dependency needed.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = {
            let mut enc = FrameEncoder::new().expect("encoder");
            let mut wire = BytesMut::new();
            for f in sample_frames() {
                enc.encode(&f, &mut wire).expect("encode");
            }
            wire.freeze()
        };
        for round in 0..2000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                // Mutate a valid stream.
                let mut v = valid.to_vec();
                let flips = (next() % 8 + 1) as usize;
                for _ in 0..flips {
                    let i = (next() as usize) % v.len();
                    v[i] ^= (next() & 0xff) as u8 | 1;
                }
                let cut = (next() as usize) % (v.len() + 1);
                v.truncate(cut);
                v
            } else {
                let n = (next() % 300) as usize;
                (0..n).map(|_| (next() & 0xff) as u8).collect()
            };
            if round % 3 == 0 && bytes.len() > 8 {
                // Make it look like a SPDY/3 control frame with a small length.
                bytes[0] = 0x80;
                bytes[1] = 0x03;
                bytes[5] = 0;
                bytes[6] = 0;
                bytes[7] = ((bytes.len() - 8) & 0xff) as u8;
            }
            let mut dec = FrameDecoder::new(Limits {
                max_data_payload: 4096,
                max_control_payload: 4096,
                ..Limits::default()
            });
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
