//! The end-to-end tests, as one test binary: the built `mayfly` binary and in-process agents
//! on real sockets, against real clients. One module per area; the shared harness and fixtures
//! are in `common`.

mod common;

mod attest;
mod ca_rotation;
mod cli;
mod cluster;
mod delegation;
mod durability;
mod envoy;
mod federation;
mod health;
mod jwt;
mod k8s;
mod limits;
mod mtls;
mod policy;
mod python_clients;
mod remote_admin;
mod run;
mod sds;
mod wit;
mod workload_api;
