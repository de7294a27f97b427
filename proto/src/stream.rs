//! Proxied TCP streams: the [`StreamOpen`] header the hub writes first on a bidirectional
//! stream it opens toward an agent, and the agent's single [`StreamResult`] reply once its dial
//! finished. After each header the stream carries raw TCP bytes, so the decoders report how many
//! bytes the header used and never look past it: the driver hands the rest through untouched.
//!
//! Both headers use the control framing with their own types and a smaller body cap
//! ([`MAX_STREAM_HEADER`]), because a header is tiny and a stream that starts with more is not
//! speaking this protocol.

use std::net::IpAddr;

use crate::codec::{
    is_critical, split_frame, write_frame, DecodeError, EncodeError, RawFrame, Reader,
    MAX_DISPLAY_LEN, MAX_MESSAGE_LEN,
};

/// Largest body of a stream header frame.
pub const MAX_STREAM_HEADER: usize = 4 * 1024;

/// Most bytes a stream may start with before its header is complete (optional frames plus the
/// header). Decoders fail beyond it, so a driver never buffers more than this.
pub const MAX_STREAM_PREAMBLE: usize = 16 * 1024;

/// Stream header type numbers (critical range).
pub mod msg_type {
    pub const STREAM_OPEN: u8 = 0x20;
    pub const STREAM_RESULT: u8 = 0x21;
}

/// Hub → agent: dial this target inside your site.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamOpen {
    pub target: StreamTarget,
    /// 0 means "use the agent's default".
    pub connect_timeout_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamTarget {
    pub ip: IpAddr,
    /// Must be non-zero.
    pub port: u16,
    /// What the API server asked for (e.g. "edge-1:10250"), for logs only.
    pub display: String,
}

/// Agent → hub: whether the dial succeeded. On success the stream then carries TCP bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamResult {
    pub result: Result<(), DialError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialError {
    pub code: DialErrorCode,
    pub message: String,
}

/// Wire codes: 1..=6 in declaration order; any other code is `Other`. `Other(c)` with a known
/// `c` decodes as the named variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialErrorCode {
    Refused,
    Timeout,
    Unreachable,
    NotAllowed,
    TooManyPending,
    Internal,
    Other(u16),
}

impl DialErrorCode {
    pub fn code(self) -> u16 {
        match self {
            DialErrorCode::Refused => 1,
            DialErrorCode::Timeout => 2,
            DialErrorCode::Unreachable => 3,
            DialErrorCode::NotAllowed => 4,
            DialErrorCode::TooManyPending => 5,
            DialErrorCode::Internal => 6,
            DialErrorCode::Other(c) => c,
        }
    }

    pub fn from_code(code: u16) -> Self {
        match code {
            1 => DialErrorCode::Refused,
            2 => DialErrorCode::Timeout,
            3 => DialErrorCode::Unreachable,
            4 => DialErrorCode::NotAllowed,
            5 => DialErrorCode::TooManyPending,
            6 => DialErrorCode::Internal,
            c => DialErrorCode::Other(c),
        }
    }
}

/// Appends the header frame. On error `out` is left unchanged.
pub fn encode_stream_open(open: &StreamOpen, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    write_frame(out, msg_type::STREAM_OPEN, MAX_STREAM_HEADER, |w| {
        if open.target.port == 0 {
            return Err(EncodeError::InvalidValue {
                field: "StreamTarget.port",
                reason: "port 0 cannot be dialled".into(),
            });
        }
        w.ip_addr(open.target.ip);
        w.u16(open.target.port);
        w.string(
            "StreamTarget.display",
            &open.target.display,
            MAX_DISPLAY_LEN,
        )?;
        w.u32(open.connect_timeout_ms);
        Ok(())
    })
}

/// Appends the result frame. On error `out` is left unchanged.
pub fn encode_stream_result(res: &StreamResult, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    write_frame(
        out,
        msg_type::STREAM_RESULT,
        MAX_STREAM_HEADER,
        |w| match &res.result {
            Ok(()) => {
                w.u8(0);
                Ok(())
            }
            Err(e) => {
                w.u8(1);
                w.u16(e.code.code());
                w.string("DialError.message", &e.message, MAX_MESSAGE_LEN)
            }
        },
    )
}

/// Splits off the first frame of the expected type, skipping optional unknown frames; returns
/// the body of the expected frame and the total bytes consumed.
fn expect_frame(buf: &[u8], want: u8) -> Result<Option<(RawFrame<'_>, usize)>, DecodeError> {
    let mut consumed = 0;
    loop {
        let rest = buf.get(consumed..).unwrap_or_default();
        let Some((frame, used)) = split_frame(rest, MAX_STREAM_HEADER)? else {
            if buf.len() > MAX_STREAM_PREAMBLE {
                return Err(preamble_too_long(buf.len()));
            }
            return Ok(None);
        };
        if consumed + used > MAX_STREAM_PREAMBLE {
            return Err(preamble_too_long(consumed + used));
        }
        if frame.msg_type == want {
            return Ok(Some((frame, consumed + used)));
        }
        if is_critical(frame.msg_type) {
            return Err(
                if frame.msg_type == msg_type::STREAM_OPEN
                    || frame.msg_type == msg_type::STREAM_RESULT
                {
                    DecodeError::UnexpectedType {
                        context: "this side of a proxied stream",
                        msg_type: frame.msg_type,
                    }
                } else {
                    DecodeError::UnknownCriticalType(frame.msg_type)
                },
            );
        }
        consumed += used;
    }
}

fn preamble_too_long(len: usize) -> DecodeError {
    DecodeError::TooLong {
        field: "stream preamble (optional frames + header)",
        len,
        max: MAX_STREAM_PREAMBLE,
    }
}

/// Decodes the header at the start of a stream; `Ok(None)` until it is complete. The returned
/// length is where the proxied bytes begin.
pub fn decode_stream_open(buf: &[u8]) -> Result<Option<(StreamOpen, usize)>, DecodeError> {
    let Some((frame, used)) = expect_frame(buf, msg_type::STREAM_OPEN)? else {
        return Ok(None);
    };
    let r = &mut Reader::new(frame.body);
    let ip = r.ip_addr("StreamTarget.ip")?;
    let port = r.u16("StreamTarget.port")?;
    if port == 0 {
        return Err(DecodeError::InvalidValue {
            field: "StreamTarget.port",
            reason: "port 0 cannot be dialled".into(),
        });
    }
    let display = r.string("StreamTarget.display", MAX_DISPLAY_LEN)?;
    let connect_timeout_ms = r.u32("StreamOpen.connect_timeout_ms")?;
    Ok(Some((
        StreamOpen {
            target: StreamTarget { ip, port, display },
            connect_timeout_ms,
        },
        used,
    )))
}

/// Decodes the agent's reply; `Ok(None)` until it is complete. The returned length is where the
/// proxied bytes begin.
pub fn decode_stream_result(buf: &[u8]) -> Result<Option<(StreamResult, usize)>, DecodeError> {
    let Some((frame, used)) = expect_frame(buf, msg_type::STREAM_RESULT)? else {
        return Ok(None);
    };
    let r = &mut Reader::new(frame.body);
    let result = if r.flag("StreamResult.result")? {
        Err(DialError {
            code: DialErrorCode::from_code(r.u16("DialError.code")?),
            message: r.string("DialError.message", MAX_MESSAGE_LEN)?,
        })
    } else {
        Ok(())
    };
    Ok(Some((StreamResult { result }, used)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn open() -> StreamOpen {
        StreamOpen {
            target: StreamTarget {
                ip: "10.244.5.7".parse().unwrap(),
                port: 10250,
                display: "edge-1:10250".into(),
            },
            connect_timeout_ms: 5000,
        }
    }

    #[test]
    fn header_then_payload_untouched() {
        let mut buf = Vec::new();
        encode_stream_open(&open(), &mut buf).unwrap();
        let header_len = buf.len();
        buf.extend_from_slice(b"GET /pods HTTP/1.1\r\n");
        let (got, used) = decode_stream_open(&buf).unwrap().unwrap();
        assert_eq!((got, used), (open(), header_len));
        assert_eq!(&buf[used..], b"GET /pods HTTP/1.1\r\n");
        for cut in 0..header_len {
            assert_eq!(decode_stream_open(&buf[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn result_round_trip() {
        for res in [
            StreamResult { result: Ok(()) },
            StreamResult {
                result: Err(DialError {
                    code: DialErrorCode::NotAllowed,
                    message: "port 22 is not an allowed destination".into(),
                }),
            },
        ] {
            let mut buf = Vec::new();
            encode_stream_result(&res, &mut buf).unwrap();
            assert_eq!(decode_stream_result(&buf).unwrap(), Some((res, buf.len())));
        }
    }

    #[test]
    fn wrong_side_and_caps() {
        let mut buf = Vec::new();
        encode_stream_open(&open(), &mut buf).unwrap();
        assert!(matches!(
            decode_stream_result(&buf),
            Err(DecodeError::UnexpectedType { msg_type: 0x20, .. })
        ));
        assert!(matches!(
            decode_stream_open(&[0x20, 0, 0, 0x10, 1]),
            Err(DecodeError::TooLong {
                field: "frame body",
                ..
            })
        ));
        // A raw TCP stream that never spoke the protocol: "GET " is type 0x47, critical.
        assert_eq!(
            decode_stream_open(b"GET / HTTP/1.1"),
            Err(DecodeError::TooLong {
                field: "frame body",
                len: 0x4554_202f,
                max: MAX_STREAM_HEADER
            })
        );
        let zero_port = StreamOpen {
            target: StreamTarget {
                port: 0,
                ..open().target
            },
            ..open()
        };
        assert!(encode_stream_open(&zero_port, &mut Vec::new()).is_err());
    }

    #[test]
    fn optional_prefix_frames_are_skipped() {
        let mut buf = vec![0x81, 0, 0, 0, 2, 9, 9];
        encode_stream_result(&StreamResult { result: Ok(()) }, &mut buf).unwrap();
        let (res, used) = decode_stream_result(&buf).unwrap().unwrap();
        assert_eq!(res.result, Ok(()));
        assert_eq!(used, buf.len());
        // Endless optional frames are cut off at the preamble cap.
        let mut endless = Vec::new();
        while endless.len() <= MAX_STREAM_PREAMBLE {
            endless.extend_from_slice(&[0x81, 0, 0, 0, 100]);
            endless.extend_from_slice(&[0; 100]);
        }
        assert!(matches!(
            decode_stream_result(&endless),
            Err(DecodeError::TooLong {
                max: MAX_STREAM_PREAMBLE,
                ..
            })
        ));
        assert!(matches!(
            decode_stream_result(&endless[..MAX_STREAM_PREAMBLE + 1]),
            Err(DecodeError::TooLong {
                max: MAX_STREAM_PREAMBLE,
                ..
            })
        ));
        assert_eq!(
            decode_stream_result(&endless[..MAX_STREAM_PREAMBLE - 200]),
            Ok(None)
        );
        assert_eq!(
            decode_stream_result(&[0x22, 0, 0, 0, 0]),
            Err(DecodeError::UnknownCriticalType(0x22))
        );
    }
}
