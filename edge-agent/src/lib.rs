//! Petrel's edge agent: enrols the device (`join`), keeps a mutually authenticated QUIC tunnel to
//! every known hub (`run`), and (with the data-plane and egress work) carries the site's VXLAN
//! frames and serves the API server's proxied streams to targets inside its own site.

#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod identity;
pub mod join;
pub mod kube_enrol;
pub mod link;
pub mod metrics;
pub mod proxy;
pub mod shared;
pub mod status;
