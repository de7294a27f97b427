//! Petrel's end-to-end harness: builds network-namespace labs, runs the real binaries in them and
//! tears everything down again, even when a test fails.

pub mod apiserver;
pub mod bench;
pub mod k8s_lab;
pub mod lab;
pub mod lab_petrel;
pub mod procs;
pub mod raw_agent;
