//! mayfly: a node-local SPIFFE workload identity agent for task-based workloads.
//!
//! Data flows one way: request → attestation (`attest`) → selectors → matching leases
//! (`lease`) → SVID cache (`svid`, signing with `ca`) → response (`workload_api`). Lease
//! changes flow back as signals: registry → cache → open streams.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod attest;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod jwt;
pub mod k8s;
pub mod lease;
pub mod listen;
pub mod policy;
pub mod proto;
pub mod run;
pub mod store;
pub mod svid;
pub mod telemetry;
pub mod time;
pub mod workload_api;
