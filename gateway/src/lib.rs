//! Petrel's cloud gateway. On the node labelled cloud-gateway it is the **hub**: the QUIC
//! endpoint edge agents dial, the registry of connected agents, the PKI that enrols them, and
//! (with the data-plane and egress work) the VXLAN switch and the API server's egress proxy.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the command line, environment and config file, validated into typed configs (`HubConfig` holds the validated `EgressConfig`) |
//! | [`hub`] | the QUIC endpoint and its parts, each given only what it uses: admission, enrolment (`EnrolParts`), tunnel sessions (pumps around `petrel_proto::session`, `SessionParts`), the refresher that follows inventory writes, views, site MTUs learned from the tunnels' paths, cluster routes, the serving gate, the node signer, the revocation gate, the relay driver, the rendezvous for direct paths (`hub::rendezvous`), the memory budget, the admin status (`HubStatus`) |
//! | [`agent_registry`] | the connected agents by node name, their counters and command channels, and the tunnel observer it tells of each registration and removal |
//! | [`switch`] | the VXLAN switch and ICMP frag-needed, pure |
//! | [`egress`] | the API server's egress proxy: config, listeners, resolution, SNI/HTTP parsing, splicing; built from `EgressParts` (registry, inventory, its metrics, the log budget, the CA), not from the hub |
//! | [`inventory`] | the pure index of sites and nodes |
//! | [`inventory_store`] | the inventory as a writer/store pair: one writer, readers taking `Arc` snapshots with a revision |
//! | [`inventory_file`] | file mode's writer: re-reads a changed inventory file |
//! | [`k8s`] | Kubernetes mode, API side: Node watcher and translation, Lease election, Secrets PKI, status annotations and Events |
//! | [`kube_hub`] | the hub in Kubernetes mode: from `KubeParts` (the inventory writer, the serving gate, the refresher, ...) it drives the watchers, the election and the CSR signer (`kube_hub::csr`) |
//! | [`pki_store`] | the CA/token store traits and the state-directory backend |
//! | [`hub_store`] | the choice between the state directory and the Secrets backend |
//! | [`revocation`] | the revocation list, its stores and checks |
//! | [`log_budget`] | the shared budget for log lines anyone can provoke |
//! | [`node_role`] | routes on cloud and Express Connect nodes |
//! | [`metrics`], [`status`], [`fd_limit`] | the hub's metrics, the status table, the open-file limit |
//!
//! A tunnel session (`hub/session.rs`) is a pump around [`petrel_proto::session::HubSession`]:
//! it admits the tunnel before any message is read (certificate name, revocation, inventory),
//! then performs the machine's actions (builds the node's view, signs renewals, writes, closes,
//! registers the agent) and keeps what needs the whole hub or the QUIC stream: route-sync pacing
//! and the write queue's byte cap.
//!
//! Modules form no import cycle (`.ci/module-cycles` checks it in `make test`): parts point
//! down, `hub` and `kube_hub` sit above the parts they drive, and `main` wires them.

#![forbid(unsafe_code)]

pub mod agent_registry;
pub mod config;
pub mod egress;
pub mod fd_limit;
pub mod hub;
pub mod hub_store;
pub mod inventory;
pub mod inventory_file;
pub mod inventory_store;
pub mod k8s;
pub mod kube_hub;
pub mod log_budget;
pub mod metrics;
pub mod node_role;
pub mod pki_store;
pub mod revocation;
pub mod status;
pub mod switch;
