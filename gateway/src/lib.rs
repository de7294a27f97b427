//! Petrel's cloud gateway. On the node labelled cloud-gateway it is the **hub**: the QUIC
//! endpoint edge agents dial, the registry of connected agents, the PKI that enrols them, and
//! (with the data-plane and egress work) the VXLAN switch and the API server's egress proxy.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the command line, environment and config file, validated into typed configs (`HubConfig` holds the validated `EgressConfig`) |
//! | [`hub`] | the QUIC endpoint, admission, enrolment, tunnel sessions, the registry, route sync, the relay driver, the memory budget; `HubContext` |
//! | [`switch`] | the VXLAN switch and ICMP frag-needed, pure |
//! | [`egress`] | the API server's egress proxy: config, listeners, resolution, SNI/HTTP parsing, splicing |
//! | [`inventory`] | the pure index of sites and nodes |
//! | [`k8s`] | Kubernetes mode: Node watcher and translation, Lease election, Secrets PKI, CSR signer, status |
//! | [`pki_store`] | the CA/token store traits and the state-directory backend |
//! | [`hub_store`] | the choice between the state directory and the Secrets backend |
//! | [`revocation`] | the revocation list, its stores, its watcher |
//! | [`node_role`] | routes on cloud and Express Connect nodes |
//! | [`metrics`], [`status`], [`fd_limit`] | the hub's metrics, the status table, the open-file limit |
//!
//! Modules form no import cycle except through `HubContext` (egress, k8s and revocation take it
//! whole; see `.ci/module-cycles`).

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
