//! Everything the gateway and the edge agent share below the application: the one rustls crypto
//! provider (ring), Petrel's small PKI (CA, CSRs, node certificates, fingerprint pinning), the
//! QUIC transport parameters both ends must agree on, private-file storage, and the admin HTTP
//! server that serves `/metrics`, `/healthz`, `/readyz` and `/status` for both binaries.
//!
//! It holds no protocol logic (that is `petrel-proto`) and no policy (that is the gateway's).

#![forbid(unsafe_code)]

pub mod admin;
pub mod pki;
pub mod private_files;
pub mod quic;
pub mod tls;

/// SAN that every hub certificate carries and every agent checks. Agents dial hubs by IP or by
/// whatever name the operator gave; the name they verify is always this one, so a hub's identity
/// does not change when its address does (NAT, failover, DNS).
pub const HUB_SERVER_NAME: &str = "hub.petrel.internal";
