//! Petrel's wire protocol, sans-IO: typed messages, their encoders and bounded decoders, the
//! keepalive and backoff state machines, and the control-stream sessions of the hub and the
//! agent ([`session`]). Nothing here opens a socket, spawns a task or reads a clock; drivers in
//! `petrel-transport`, `gateway` and `edge-agent` own all I/O and time.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`codec`] | frame header and per-field readers and writers every message is built from; the caps |
//! | [`types`] | small shared value types: MAC addresses, CIDRs, [`Route`] and [`RoutePath`] |
//! | [`control`] | the control stream's messages (Hello, Welcome, Update, Routes, Ping/Pong, GoingAway, renewal) |
//! | [`routes`] | route sync: the cluster route table, its digest, snapshot and delta chunks |
//! | [`enrol`] | the enrolment request and response |
//! | [`stream`] | the proxied stream's header and result |
//! | [`datagram`] | tunnel datagrams and the VXLAN wire format: header writer, quick VNI check, the overheads (`VXLAN_OVERHEAD`, `DATAGRAM_IP_OVERHEAD`) every other crate takes from here |
//! | [`direct`] | direct site-to-site paths without I/O: what an agent accepts from a direct peer, and one peer path's state machine (punch, direct, back to the hub, backoff) |
//! | [`ownership`] | which hub owns a site when several are active: rendezvous hashing with a fixed hash every party computes alike |
//! | [`relay_probe`] | liveness probes on the relay port (wire format, no amplification) and the prober's state machine: which hubs are down |
//! | [`keepalive`], [`backoff`] | the keepalive/RTT and reconnect-backoff state machines |
//! | [`session`] | the control-stream sessions of both ends (hub and agent) as state machines, the close codes; tested against each other in memory |
//!
//! ```
//! use petrel_proto::{encode, ControlMessage, FrameDecoder, Ping};
//!
//! let mut wire = Vec::new();
//! encode(&ControlMessage::Ping(Ping { nonce: 1, sent_at_micros: 0 }), &mut wire)?;
//! let mut decoder = FrameDecoder::new();
//! for chunk in wire.chunks(3) {
//!     // Push whatever the stream delivered, then drain.
//!     decoder.push(chunk)?;
//!     while let Some(msg) = decoder.next_message()? {
//!         assert_eq!(msg.name(), "ping");
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Wire specification (protocol version 1)
//!
//! One mutually-authenticated QUIC connection per agent, ALPN [`ALPN_TUNNEL`]. The agent opens
//! the first bidirectional stream as the **control stream**. The hub opens one bidirectional
//! stream per proxied TCP connection. VXLAN travels in QUIC DATAGRAM frames. Enrolment uses a
//! separate connection with ALPN [`ALPN_ENROL`] and no client certificate: one bi stream, one
//! request, one response. What each end does on the control stream (the hello's checks, the
//! welcome, keepalive, renewal, going-away) is [`session`]; how connections close is under
//! "Closing" below.
//!
//! ## Framing
//!
//! Control, enrolment and stream-header messages are frames:
//! `[msg_type: u8][body_len: u32 BE][body: body_len bytes]`. A `body_len` above the cap
//! ([`MAX_CONTROL_FRAME`] = 64 KiB for control and enrolment,
//! [`stream::MAX_STREAM_HEADER`] = 4 KiB for stream headers) is an error as soon as the header is
//! seen, before anything is buffered for it.
//!
//! ## Versioning
//!
//! * `msg_type` 0x00–0x7F is **critical**: an unknown critical type is
//!   [`DecodeError::UnknownCriticalType`] and the connection must close.
//! * `msg_type` 0x80–0xFF is **optional**: an unknown optional frame is skipped (the control
//!   decoder reports it as [`control::ControlMessage::Unknown`]).
//! * Inside a known body, bytes after the last known field are ignored, so a minor version may
//!   append fields at the end of a body. A body shorter than its fields is
//!   [`DecodeError::Truncated`]. Elements of lists and nested structs have fixed layouts; only
//!   whole bodies grow.
//! * `Hello`, `Welcome` and `EnrolRequest` start with `protocol_version: u16`. Decoders accept
//!   any value so the receiver can refuse it politely with
//!   [`codec::check_protocol_version`] and a `GoingAway`/`EnrolError`.
//!
//! ## Type numbers
//!
//! | type | message | stream | direction |
//! |------|---------|--------|-----------|
//! | 0x01 | `Hello` | control | agent → hub, first |
//! | 0x02 | `Welcome` | control | hub → agent |
//! | 0x03 | `Update` (a full `HubView`) | control | hub → agent |
//! | 0x04 | `Ping` | control | either |
//! | 0x05 | `Pong` | control | either |
//! | 0x06 | `GoingAway` | control | either |
//! | 0x07 | `RenewRequest` | control | agent → hub |
//! | 0x08 | `RenewResponse` | control | hub → agent |
//! | 0x10 | `EnrolRequest` | enrolment | agent → hub |
//! | 0x11 | `EnrolResponse` | enrolment | hub → agent |
//! | 0x20 | `StreamOpen` | proxied stream, first bytes | hub → agent |
//! | 0x21 | `StreamResult` | proxied stream, first bytes | agent → hub |
//!
//! Each decoder accepts only its own types: a critical type from another row is an error on
//! that stream. After a stream header the stream carries raw TCP bytes. The typed stream and
//! enrolment decoders skip optional frames but fail once the bytes before the expected message
//! exceed [`stream::MAX_STREAM_PREAMBLE`] (16 KiB) or [`enrol::MAX_ENROL_PREAMBLE`], so a
//! driver's read buffer stays bounded.
//!
//! ## Primitives
//!
//! | kind | encoding |
//! |------|----------|
//! | integers | big-endian `u8`/`u16`/`u32`/`u64` |
//! | string | `u16` length + UTF-8, per-field cap |
//! | bytes | `u32` length + bytes, per-field cap |
//! | list | `u16` count + elements, per-field cap; count × smallest element must fit in the rest of the body |
//! | `Option<T>` / bool | `u8` tag 0 or 1, anything else is an error; then `T` if 1 |
//! | `IpAddr` | `u8` family (4 or 6) + 4 or 16 bytes |
//! | `IpCidr` | `IpAddr` + prefix `u8`; prefix ≤ 32/128 and no host bits set |
//! | `MacAddr` | 6 bytes |
//! | `Result<T, E>` | `u8` tag 0 = Ok + `T`, 1 = Err + `E` |
//! | reason/error codes | `u16`; unknown codes decode as `Other(code)` |
//! | `RoutePath` | `u8`: 0 `ViaHub`, 1 `Direct`; other values are an error |
//!
//! Bodies are the struct fields in declaration order (see each type). Caps and validation
//! (both enforced on encode too, see [`codec`]): node names are DNS-1123 subdomains ≤ 253;
//! site ≤ 63 (label value); hub id, gateway name and host ≤ 253; ALPN ≤ 32; agent version ≤ 128;
//! datapath ≤ 32; operator messages ≤ 1024; token ≤ 1024; stream `display` ≤ 512; CSR ≤ 4 KiB
//! (16 KiB before issue 11's pre-authentication budget); each certificate ≤ 16 KiB; pod CIDRs ≤ 16; underlay addresses ≤ 16; gateways ≤ 64; routes ≤ 65535
//! (in practice the 64 KiB frame binds first: ~1200 routes with 20-byte names); ports ≠ 0;
//! `keepalive_interval_ms` ≠ 0; `site_mtu` ≥ 576.
//!
//! ## Datagrams
//!
//! `[kind: u8][payload]`. Kind 0x01 ([`datagram::DATAGRAM_KIND_VXLAN`]): payload is an RFC 7348
//! VXLAN packet, byte for byte what flannel.1 sends on UDP 8472: flags 0x08, reserved zero, VNI
//! in bytes 4..7, then the inner Ethernet frame (≥ 14 bytes). Other kinds are dropped.
//!
//! ## Closing
//!
//! Connections end with a QUIC application close: a code for programs and a reason phrase that
//! always carries a sentence for the operator. The codes are [`session::close_code`]
//! (re-exported as `petrel_proto::close_code` and `petrel_transport::close_code`):
//!
//! | code | name | sent when |
//! |------|------|-----------|
//! | 0x00 | `NORMAL` | the agent stops, or closes a connection to reconnect |
//! | 0x01 | `GOING_AWAY` | the hub drains, restarts, no longer admits the node or is not serving; an enrolment is turned away (busy, rate-limited, memory budget) |
//! | 0x10 | `UNAUTHORIZED` | a tunnel is refused before its welcome ([`session::Refusal::close_code`]), or its node is revoked |
//! | 0x11 | `PROTOCOL_ERROR` | a malformed or out-of-place message, a route table over its cap or off its digest, a view too large for a frame, an unsupported ALPN, a bad enrolment request |
//! | 0x12 | `REPLACED` | a newer tunnel from the same node took over |
//! | 0x13 | `KEEPALIVE_TIMEOUT` | nothing from the peer within its timeout |
//! | 0x20 | `ENROL_DONE` | the enrolment's answer was sent |
//!
//! A going-away, and the refusal of a hello that was read, is sent as a `GoingAway` message
//! first; the close follows after a short linger ([`session::Close`]), so the peer reads the
//! reason as a message and not only as a close phrase.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod codec;
pub mod control;
pub mod datagram;
pub mod direct;
pub mod enrol;
pub mod keepalive;
pub mod ownership;
pub mod relay_probe;
pub mod routes;
pub mod session;
pub mod stream;
pub mod types;

/// The protocol version carried in `Hello`, `Welcome` and `EnrolRequest`.
pub const PROTOCOL_VERSION: u16 = 1;
/// ALPN of an agent's tunnel connection.
pub const ALPN_TUNNEL: &[u8] = b"petrel/1";
/// ALPN of an enrolment connection (no client certificate).
pub const ALPN_ENROL: &[u8] = b"petrel-enrol/1";
/// ALPN of the TLS connection of the TCP fallback, which carries QUIC packets
/// (`petrel_transport::stream_carrier`); the tunnel or enrolment handshake runs inside.
pub const ALPN_TCP_CARRIER: &[u8] = b"petrel-tcp/1";
/// Largest encoded control (and enrolment) message body.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

pub use backoff::{Backoff, BackoffPolicy};
pub use codec::{check_protocol_version, DecodeError, EncodeError, FRAME_HEADER_LEN};
pub use control::{
    decode_frame, encode, AgentSelfView, CertBundle, ControlMessage, ErrorInfo, FrameDecoder,
    GatewayEndpoint, GoingAway, GoingAwayReason, Hello, HubView, PeerOffer, Ping, Pong,
    RenewRequest, RenewResponse, Route, RoutePath, Welcome,
};
pub use datagram::{
    encode_vxlan_header, parse_datagram, vxlan_vni, write_vxlan_datagram, DatagramError,
    VxlanFrame, DATAGRAM_IP_OVERHEAD, DATAGRAM_KIND_VXLAN, DATAGRAM_OVERHEAD, VXLAN_HEADER_LEN,
    VXLAN_OVERHEAD,
};
pub use enrol::{
    decode_enrol_request, decode_enrol_response, encode_enrol_request, encode_enrol_response,
    EnrolError, EnrolErrorCode, EnrolMessage, EnrolRequest, EnrolResponse,
};
pub use keepalive::{Keepalive, KeepaliveAction};
pub use routes::{RouteEntry, RouteSync, RouteTable};
pub use session::{close_code, Close};
pub use stream::{
    decode_stream_open, decode_stream_result, encode_stream_open, encode_stream_result, DialError,
    DialErrorCode, StreamOpen, StreamResult, StreamTarget,
};
pub use types::{CidrError, IpCidr, MacAddr, ParseMacError};
