//! Everything the gateway and the edge agent share below the application: the one rustls crypto
//! provider (ring), Petrel's small PKI (CA, CSRs, node certificates, fingerprint pinning), the
//! QUIC transport parameters both ends must agree on, private-file storage, and the admin HTTP
//! server that serves `/metrics`, `/healthz`, `/readyz` and `/status` for both binaries.
//!
//! It holds no protocol logic (that is `petrel-proto`) and no policy (that is the gateway's).
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`tls`] | the rustls configurations of both ends, the one crypto provider, TLS alerts of failed handshakes |
//! | [`peer_tls`] | TLS between two agents for direct site-to-site paths: both node certificates, each checked to be the expected node |
//! | [`pki`] | the CA, CSRs, node and hub certificates, fingerprints |
//! | [`quic`] | QUIC transport parameters, endpoints, the pre-authentication and authenticated limits |
//! | [`control_stream`] | drivers of the framed control and enrolment streams |
//! | [`splice`] | byte-stream <-> QUIC-stream copy |
//! | [`stream_carrier`] | QUIC packets over a byte stream (the TCP fallback): an `AsyncUdpSocket` over length-framed streams |
//! | [`udp_batch`] | UDP batching for the data plane: GSO sends and `recvmmsg` (no netlink) |
//! | [`socket_buffers`] | kernel buffer sizes of UDP sockets |
//! | [`setting_values`] | the value layer of both binaries' configuration and their shared `ConfigError` |
//! | [`private_files`] | writing secrets to disk |
//! | [`admin`], [`process`] | the admin HTTP server and the metrics every process exports |
//! | `test_pki` (tests only) | the CA, hub and node certificates the crate's tests use |

#![forbid(unsafe_code)]

pub mod admin;
pub mod control_stream;
pub mod peer_tls;
pub mod pki;
pub mod private_files;
pub mod process;
pub mod quic;
pub mod setting_values;
pub mod socket_buffers;
pub mod splice;
pub mod stream_carrier;
pub mod tls;
pub mod udp_batch;

#[cfg(test)]
mod test_pki;

/// SAN that every hub certificate carries and every agent checks. Agents dial hubs by IP or by
/// whatever name the operator gave; the name they verify is always this one, so a hub's identity
/// does not change when its address does (NAT, failover, DNS).
pub const HUB_SERVER_NAME: &str = "hub.petrel.internal";

/// QUIC application close codes: wire constants, so they live in proto; here for the drivers.
pub use petrel_proto::close_code;
