//! Enrolment: the one request/response exchanged on a bidirectional stream of an
//! [`ALPN_ENROL`](crate::ALPN_ENROL) connection, before the agent has a certificate. Frames use
//! the control-stream framing and rules (critical/optional types, trailing bytes ignored) with
//! their own type numbers, so one [`EnrolMessage`] enum and one [`EnrolDecoder`] serve both
//! sides; the typed `encode_enrol_*`/`decode_enrol_*` helpers wrap them.
//!
//! The join token is a secret: [`EnrolRequest`]'s `Debug` output redacts it.

use std::fmt;

use crate::codec::{
    self, is_critical, split_frame, write_frame, DecodeError, EncodeError, FrameBuffer, RawFrame,
    Reader, FRAME_HEADER_LEN, MAX_CSR_LEN, MAX_MESSAGE_LEN, MAX_NODE_NAME_LEN, MAX_TOKEN_LEN,
};
use crate::control::{read_cert_bundle, write_cert_bundle, CertBundle};
use crate::MAX_CONTROL_FRAME;

/// Enrolment type numbers (critical range).
pub mod msg_type {
    pub const ENROL_REQUEST: u8 = 0x10;
    pub const ENROL_RESPONSE: u8 = 0x11;
}

const CONTEXT: &str = "an enrolment stream";

/// Most bytes the typed decoders accept before the expected message is complete (optional
/// frames plus the message), so a driver accumulating a buffer for them stays bounded.
pub const MAX_ENROL_PREAMBLE: usize = 2 * (MAX_CONTROL_FRAME + FRAME_HEADER_LEN);

/// The largest body an enrolment request can have: its version and each field at its cap
/// (4-byte length prefixes, the widest the codec uses). The hub reads requests with a decoder
/// capped here ([`EnrolDecoder::for_requests`]) instead of at the generic 64 KiB frame cap: an
/// enrolment connection is unauthenticated, so what it may make the hub buffer stays small.
pub const MAX_ENROL_REQUEST_BODY: usize =
    2 + (4 + MAX_TOKEN_LEN) + (4 + MAX_NODE_NAME_LEN) + (4 + MAX_CSR_LEN);

/// Agent → hub: "here is my join token and CSR, sign it for this node".
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolRequest {
    pub protocol_version: u16,
    /// Secret; never logged.
    pub token: String,
    pub node_name: String,
    pub csr_der: Vec<u8>,
}

impl fmt::Debug for EnrolRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrolRequest")
            .field("protocol_version", &self.protocol_version)
            .field("token", &"<redacted>")
            .field("node_name", &self.node_name)
            .field("csr_der", &format_args!("<{} bytes>", self.csr_der.len()))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolResponse {
    pub result: Result<CertBundle, EnrolError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnrolError {
    pub code: EnrolErrorCode,
    pub message: String,
}

/// Wire codes: 1..=8 in declaration order; any other code is `Other`. `Other(c)` with a known
/// `c` decodes as the named variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnrolErrorCode {
    InvalidToken,
    ExpiredToken,
    TokenAlreadyUsed,
    WrongNode,
    UnknownNode,
    BadCsr,
    UnsupportedVersion,
    Internal,
    Other(u16),
}

impl EnrolErrorCode {
    pub fn code(self) -> u16 {
        match self {
            EnrolErrorCode::InvalidToken => 1,
            EnrolErrorCode::ExpiredToken => 2,
            EnrolErrorCode::TokenAlreadyUsed => 3,
            EnrolErrorCode::WrongNode => 4,
            EnrolErrorCode::UnknownNode => 5,
            EnrolErrorCode::BadCsr => 6,
            EnrolErrorCode::UnsupportedVersion => 7,
            EnrolErrorCode::Internal => 8,
            EnrolErrorCode::Other(c) => c,
        }
    }

    pub fn from_code(code: u16) -> Self {
        match code {
            1 => EnrolErrorCode::InvalidToken,
            2 => EnrolErrorCode::ExpiredToken,
            3 => EnrolErrorCode::TokenAlreadyUsed,
            4 => EnrolErrorCode::WrongNode,
            5 => EnrolErrorCode::UnknownNode,
            6 => EnrolErrorCode::BadCsr,
            7 => EnrolErrorCode::UnsupportedVersion,
            8 => EnrolErrorCode::Internal,
            c => EnrolErrorCode::Other(c),
        }
    }
}

/// Any frame on an enrolment stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrolMessage {
    Request(EnrolRequest),
    Response(EnrolResponse),
    /// An optional (>= 0x80) type this build does not know; skipped.
    Unknown {
        msg_type: u8,
    },
}

/// Appends one enrolment frame. On error `out` is left unchanged.
pub fn encode_enrol(msg: &EnrolMessage, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match msg {
        EnrolMessage::Request(r) => encode_enrol_request(r, out),
        EnrolMessage::Response(r) => encode_enrol_response(r, out),
        EnrolMessage::Unknown { msg_type } => {
            if is_critical(*msg_type) {
                return Err(EncodeError::InvalidValue {
                    field: "EnrolMessage::Unknown.msg_type",
                    reason: format!("0x{msg_type:02x} is in the critical range"),
                });
            }
            write_frame(out, *msg_type, MAX_CONTROL_FRAME, |_| Ok(()))
        }
    }
}

pub fn encode_enrol_request(req: &EnrolRequest, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    write_frame(out, msg_type::ENROL_REQUEST, MAX_CONTROL_FRAME, |w| {
        w.u16(req.protocol_version);
        w.string("EnrolRequest.token", &req.token, MAX_TOKEN_LEN)?;
        w.checked_string(
            "EnrolRequest.node_name",
            &req.node_name,
            MAX_NODE_NAME_LEN,
            codec::check_node_name,
        )?;
        w.blob("EnrolRequest.csr_der", &req.csr_der, MAX_CSR_LEN)
    })
}

pub fn encode_enrol_response(resp: &EnrolResponse, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    write_frame(
        out,
        msg_type::ENROL_RESPONSE,
        MAX_CONTROL_FRAME,
        |w| match &resp.result {
            Ok(bundle) => {
                w.u8(0);
                write_cert_bundle(w, bundle)
            }
            Err(e) => {
                w.u8(1);
                w.u16(e.code.code());
                w.string("EnrolError.message", &e.message, MAX_MESSAGE_LEN)
            }
        },
    )
}

/// Decodes one already-split enrolment frame.
pub fn decode_enrol_body(frame: RawFrame<'_>) -> Result<EnrolMessage, DecodeError> {
    let r = &mut Reader::new(frame.body);
    Ok(match frame.msg_type {
        msg_type::ENROL_REQUEST => EnrolMessage::Request(EnrolRequest {
            protocol_version: r.u16("EnrolRequest.protocol_version")?,
            token: r.string("EnrolRequest.token", MAX_TOKEN_LEN)?,
            node_name: r.checked_string(
                "EnrolRequest.node_name",
                MAX_NODE_NAME_LEN,
                codec::check_node_name,
            )?,
            csr_der: r.blob("EnrolRequest.csr_der", MAX_CSR_LEN)?,
        }),
        msg_type::ENROL_RESPONSE => {
            let result = if r.flag("EnrolResponse.result")? {
                Err(EnrolError {
                    code: EnrolErrorCode::from_code(r.u16("EnrolError.code")?),
                    message: r.string("EnrolError.message", MAX_MESSAGE_LEN)?,
                })
            } else {
                Ok(read_cert_bundle(r)?)
            };
            EnrolMessage::Response(EnrolResponse { result })
        }
        t if is_critical(t) => return Err(DecodeError::UnknownCriticalType(t)),
        t => EnrolMessage::Unknown { msg_type: t },
    })
}

/// Decodes the first enrolment frame of `buf`; `Ok(None)` while incomplete.
pub fn decode_enrol_frame(buf: &[u8]) -> Result<Option<(EnrolMessage, usize)>, DecodeError> {
    match split_frame(buf, MAX_CONTROL_FRAME)? {
        None => Ok(None),
        Some((frame, used)) => Ok(Some((decode_enrol_body(frame)?, used))),
    }
}

/// Skips optional unknown frames and returns the first known message with the total bytes
/// consumed (including skipped frames).
fn decode_first_known(buf: &[u8]) -> Result<Option<(EnrolMessage, usize)>, DecodeError> {
    let mut consumed = 0;
    loop {
        let rest = buf.get(consumed..).unwrap_or_default();
        let step = decode_enrol_frame(rest)?;
        let total = step.as_ref().map_or(buf.len(), |(_, used)| consumed + used);
        if total > MAX_ENROL_PREAMBLE {
            return Err(DecodeError::TooLong {
                field: "enrolment preamble (optional frames + message)",
                len: total,
                max: MAX_ENROL_PREAMBLE,
            });
        }
        match step {
            None => return Ok(None),
            Some((EnrolMessage::Unknown { .. }, used)) => consumed += used,
            Some((msg, used)) => return Ok(Some((msg, consumed + used))),
        }
    }
}

/// Decodes the request at the start of `buf` (skipping optional frames); `Ok(None)` while
/// incomplete, `UnexpectedType` if the peer sent a response instead.
pub fn decode_enrol_request(buf: &[u8]) -> Result<Option<(EnrolRequest, usize)>, DecodeError> {
    match decode_first_known(buf)? {
        None => Ok(None),
        Some((EnrolMessage::Request(r), used)) => Ok(Some((r, used))),
        Some(_) => Err(DecodeError::UnexpectedType {
            context: CONTEXT,
            msg_type: msg_type::ENROL_RESPONSE,
        }),
    }
}

/// Decodes the response at the start of `buf` (skipping optional frames); `Ok(None)` while
/// incomplete, `UnexpectedType` if the peer sent a request instead.
pub fn decode_enrol_response(buf: &[u8]) -> Result<Option<(EnrolResponse, usize)>, DecodeError> {
    match decode_first_known(buf)? {
        None => Ok(None),
        Some((EnrolMessage::Response(r), used)) => Ok(Some((r, used))),
        Some(_) => Err(DecodeError::UnexpectedType {
            context: CONTEXT,
            msg_type: msg_type::ENROL_REQUEST,
        }),
    }
}

/// Incremental decoder for an enrolment stream, with the same contract as
/// [`FrameDecoder`](crate::control::FrameDecoder).
#[derive(Debug, Clone)]
pub struct EnrolDecoder {
    frames: FrameBuffer,
}

impl Default for EnrolDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl EnrolDecoder {
    pub fn new() -> Self {
        EnrolDecoder {
            frames: FrameBuffer::new(MAX_CONTROL_FRAME),
        }
    }

    /// The hub's decoder: frames up to [`MAX_ENROL_REQUEST_BODY`], so at most about twice that
    /// is ever buffered for one unauthenticated stream.
    pub fn for_requests() -> Self {
        EnrolDecoder {
            frames: FrameBuffer::new(MAX_ENROL_REQUEST_BODY),
        }
    }

    /// The most unread bytes this decoder will hold.
    pub fn capacity(&self) -> usize {
        self.frames.capacity()
    }

    pub fn push(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        self.frames.push(data)
    }

    pub fn next_message(&mut self) -> Result<Option<EnrolMessage>, DecodeError> {
        self.frames.next_with(decode_enrol_body)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn req() -> EnrolRequest {
        EnrolRequest {
            protocol_version: 1,
            token: "s3cret-token".into(),
            node_name: "edge-1".into(),
            csr_der: vec![0x30, 0x82, 1, 2],
        }
    }

    #[test]
    fn a_request_at_every_cap_fits_the_request_decoder_and_one_byte_more_does_not() {
        let big = EnrolRequest {
            protocol_version: 1,
            token: "t".repeat(MAX_TOKEN_LEN),
            node_name: format!(
                "{}.{}.{}.{}",
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(61)
            ),
            csr_der: vec![0x30; MAX_CSR_LEN],
        };
        let mut out = Vec::new();
        encode_enrol_request(&big, &mut out).unwrap();
        assert!(out.len() - FRAME_HEADER_LEN <= MAX_ENROL_REQUEST_BODY);
        let mut dec = EnrolDecoder::for_requests();
        assert_eq!(
            dec.capacity(),
            2 * (MAX_ENROL_REQUEST_BODY + FRAME_HEADER_LEN)
        );
        dec.push(&out).unwrap();
        assert_eq!(
            dec.next_message().unwrap(),
            Some(EnrolMessage::Request(big))
        );
        // A frame header announcing one byte more than the cap is refused at once.
        let mut header = vec![msg_type::ENROL_REQUEST];
        header.extend_from_slice(
            &u32::try_from(MAX_ENROL_REQUEST_BODY + 1)
                .unwrap()
                .to_be_bytes(),
        );
        assert!(EnrolDecoder::for_requests().push(&header).is_err());
        let mut header = vec![msg_type::ENROL_REQUEST];
        header.extend_from_slice(&u32::try_from(MAX_ENROL_REQUEST_BODY).unwrap().to_be_bytes());
        assert!(EnrolDecoder::for_requests().push(&header).is_ok());
    }

    #[test]
    fn request_round_trip_and_redaction() {
        let mut out = Vec::new();
        encode_enrol_request(&req(), &mut out).unwrap();
        assert_eq!(out[0], msg_type::ENROL_REQUEST);
        assert_eq!(
            decode_enrol_request(&out).unwrap(),
            Some((req(), out.len()))
        );
        assert_eq!(decode_enrol_request(&out[..out.len() - 1]).unwrap(), None);
        assert!(matches!(
            decode_enrol_response(&out),
            Err(DecodeError::UnexpectedType { .. })
        ));
        let dbg = format!("{:?}", req());
        assert!(!dbg.contains("s3cret"), "{dbg}");
    }

    #[test]
    fn response_skips_optional_frames() {
        let resp = EnrolResponse {
            result: Err(EnrolError {
                code: EnrolErrorCode::ExpiredToken,
                message: "token expired 3m ago".into(),
            }),
        };
        let mut out = Vec::new();
        encode_enrol(&EnrolMessage::Unknown { msg_type: 0xc0 }, &mut out).unwrap();
        encode_enrol_response(&resp, &mut out).unwrap();
        assert_eq!(
            decode_enrol_response(&out).unwrap(),
            Some((resp, out.len()))
        );
        assert_eq!(
            decode_enrol_frame(&[0x12, 0, 0, 0, 0]),
            Err(DecodeError::UnknownCriticalType(0x12))
        );
    }

    #[test]
    fn endless_optional_frames_are_bounded() {
        let mut buf = Vec::new();
        for _ in 0..3 {
            buf.extend_from_slice(&[0x90, 0, 0, 0xea, 0x60]);
            buf.extend_from_slice(&[0; 60000]);
        }
        assert!(matches!(
            decode_enrol_request(&buf),
            Err(DecodeError::TooLong {
                max: MAX_ENROL_PREAMBLE,
                ..
            })
        ));
        assert_eq!(decode_enrol_request(&buf[..120_010]), Ok(None));
    }

    #[test]
    fn token_cap() {
        let big = EnrolRequest {
            token: "t".repeat(MAX_TOKEN_LEN + 1),
            ..req()
        };
        assert!(matches!(
            encode_enrol_request(&big, &mut Vec::new()),
            Err(EncodeError::TooLong {
                field: "EnrolRequest.token",
                ..
            })
        ));
    }

    #[test]
    fn codes() {
        for c in 0..20u16 {
            assert_eq!(EnrolErrorCode::from_code(c).code(), c);
        }
        assert_eq!(EnrolErrorCode::from_code(6), EnrolErrorCode::BadCsr);
    }
}
