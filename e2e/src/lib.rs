//! Petrel's end-to-end harness: builds network-namespace labs, runs the real binaries in them and
//! tears everything down again, even when a test fails.
//!
//! The tests are in `tests/`; the benchmarks are not here but in their own crate (`bench/`,
//! `petrel-bench`), which builds on this harness.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`lab`] | the network-namespace lab: its plan, building and tearing it down, commands and probes inside it |
//! | [`lab_petrel`] | Petrel running in the lab: hub, node roles and enrolled agents as real processes |
//! | [`k8s_lab`] | the lab with a real kube-apiserver: Node objects, gateways elected by a Lease, PKI in Secrets |
//! | [`apiserver`] | hubs and agents on loopback for the egress tests, a raw CONNECT client, TCP targets, the kube-apiserver wrapper |
//! | [`procs`] | locating, starting and killing the real binaries; free ports, waiting |
//! | [`raw_agent`] | a tunnel client from the library, for what the real agent never does |
//! | [`attack`] | the attacks of issue 11 against a hub on loopback (unauthenticated connections, spoofed Initials, a relay flood), shared by the hardening tests and the bench |
//! | [`wan`] | delay and loss on the lab's WAN link, for the fault tests and the bench |
//! | [`egress_streams`] | stream targets in an edge pod, a CONNECT client over the hub's Unix socket, one stream's throughput |
//! | [`failover_probe`] | UDP probes every 10 ms both ways between two pods: the gap when a hub dies, for the bench and the lab tests |
//! | [`measure`] | nearest-rank percentiles and a stop-on-drop flag for measuring threads |
//! | `src/bin/petrel-demo.rs` | `make demo` |
//! | `src/bin/petrel-lab.rs` | the lab by hand (`up`, `down`, `cleanup`, `list`, `layout`) |

pub mod apiserver;
pub mod attack;
pub mod egress_streams;
pub mod failover_probe;
pub mod k8s_lab;
pub mod lab;
pub mod lab_petrel;
pub mod measure;
pub mod procs;
pub mod raw_agent;
pub mod wan;
