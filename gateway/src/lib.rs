//! Petrel's cloud gateway. On the node labelled cloud-gateway it is the **hub**: the QUIC
//! endpoint edge agents dial, the registry of connected agents, the PKI that enrols them, and
//! (with the data-plane and egress work) the VXLAN switch and the API server's egress proxy.

#![forbid(unsafe_code)]

pub mod config;
pub mod egress;
pub mod fd_limit;
pub mod hub;
pub mod hub_store;
pub mod inventory;
pub mod k8s;
pub mod metrics;
pub mod node_role;
pub mod pki_store;
pub mod revocation;
pub mod status;
pub mod switch;
