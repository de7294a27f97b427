//! A stand-in kubelet for Petrel's end-to-end tests.
//!
//! It speaks enough of the kubelet's HTTPS API that a real kube-apiserver (reaching it through
//! Petrel's tunnel) and a real kubectl can run `logs`, `logs -f`, `exec`, `attach` and
//! `port-forward` against it:
//!
//! - container logs with deterministic lines, `tailLines`/`timestamps`/`limitBytes`/
//!   `sinceSeconds`/`follow` ([`logs`]),
//! - exec and attach over SPDY/3.1 with the `channel.k8s.io` protocols v1-v4 and a tiny command
//!   interpreter ([`exec`]),
//! - port-forward over SPDY/3.1 (`portforward.k8s.io`) to real TCP ports on 127.0.0.1
//!   ([`portforward`]),
//! - a from-scratch SPDY/3.1 implementation, including a minimal client for tests ([`spdy`]),
//! - a plain-HTTP read-only port with `/standin/state` and `/standin/log/...` so tests can
//!   observe and drive it ([`server`]).
//!
//! Start it in-process with [`start`], or run the `petrel-standin-kubelet` binary.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod exec;
pub mod logs;
pub mod portforward;
pub mod query;
pub mod server;
pub mod spdy;
pub mod state;
pub mod tls;

use std::net::SocketAddr;

pub use config::{Config, PemSource, PodSpec, TlsSettings};
pub use server::{start, Running};
pub use state::StateSnapshot;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// PEM text could not be parsed.
    #[error("bad PEM in {what}: {detail}")]
    Pem {
        /// Which input.
        what: String,
        /// Parser message.
        detail: String,
    },
    /// No certificate in a PEM input.
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    /// The client CA is unusable.
    #[error("client CA: {0}")]
    ClientCa(String),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}
