//! Petrel's edge agent: enrols the device (`join`), keeps a mutually authenticated QUIC tunnel to
//! every known hub (`run`), and (with the data-plane and egress work) carries the site's VXLAN
//! frames and serves the API server's proxied streams to targets inside its own site.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the command line, environment and config file, validated into typed configs |
//! | [`shared`] | [`shared::AgentShared`]: the parts below, the metrics and the proxy state; `/status` and `/readyz` |
//! | [`credentials`] | the identity, the one renewal in flight, the state directory |
//! | [`links`] | each link's row ([`links::LinkState`]), the open tunnels, `hubs_connected` |
//! | [`dataplane_slot`] | the data plane once open, why not yet, the view kept for it |
//! | [`endpoints`] | learned hub endpoints, saved and handed to the supervisor |
//! | [`agent`] | the supervisor: one link per endpoint, the data plane's opening |
//! | [`link`] | one tunnel to one hub: connect ([`link::ConnectError`]); the pump around [`petrel_proto::session::AgentSession`] (views applied, renewal, the next attempt); each connection's receive path (`receive`, its own task: datagrams to the data plane, the hub's streams to the proxy) |
//! | [`transport_choice`] | whether a link's next attempt is QUIC over UDP or the TCP fallback (QUIC over TLS on TCP), and when to go back to UDP |
//! | [`hub_choice`] | with several active hubs: which hub each frame goes to (the owner of its destination site, or of this site), in failover order |
//! | [`direct_paths`] | direct paths to peers of other public sites the hub offered: one task per peer around [`petrel_proto::direct::DirectPath`] (punch from the tunnel's socket, the peer's certificate, the silence watch), the accept filter on the tunnel sockets |
//! | [`dataplane`] | the agent's data plane over `petrel-datapath`: captured frames to the active hub (or, active-active, each to its [`hub_choice`]); [`dataplane::AgentDataplane::deliver`] injects the datagrams a connection read (draining that connection) into flannel.1 |
//! | [`proxy`] | proxied streams: the hub's policy, the dial, the splice |
//! | [`identity`], [`join`], [`kube_enrol`] | the identity on disk and the two ways to get one |
//! | [`metrics`], [`status`] | the agent's metrics and the status table |
//!
//! `shared` and its parts depend on neither `agent` nor `link`; those two depend on them. `proxy`
//! and `dataplane` take their own state (`ProxyState`, `AgentDataplane`) and know nothing of
//! `shared`.

#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod credentials;
pub mod dataplane;
pub mod dataplane_slot;
pub mod direct_paths;
pub mod endpoints;
pub mod hub_choice;
pub mod identity;
pub mod join;
pub mod kube_enrol;
pub mod link;
pub mod links;
pub mod metrics;
pub mod proxy;
pub mod shared;
pub mod status;
pub mod transport_choice;
