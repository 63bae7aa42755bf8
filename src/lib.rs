//! mayfly: a node-local SPIFFE workload identity agent for task-based workloads.
//!
//! Data flows one way: request (`server`) → attestation (`attest`) → selectors → matching
//! leases (`lease`) → SVID cache (`svid`, signing with `authority`) → response (`server`).
//! Lease changes flow back as signals: registry → cache → open streams. `agent` wires it all
//! together; `cli` is the command line and the clients it uses.
// No unsafe code, but for the one commented call into glibc in `agent::memory`.
#![deny(unsafe_code)]

pub mod agent;
pub mod attest;
pub mod audit;
pub mod authority;
pub mod cli;
pub mod config;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod lease;
pub mod policy;
pub mod proto;
pub mod selector;
pub mod server;
pub mod store;
pub mod svid;
pub mod telemetry;
pub mod time;
