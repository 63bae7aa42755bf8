//! Everything that speaks a wire protocol to callers: the Unix socket listeners (`listen`),
//! the SPIFFE Workload API (`workload_api`), Envoy's SDS (`sds`), delegation (`delegation`), the
//! admin API (`admin`) and the health endpoint (`health`). Protocol types stay here; each server chooses its status codes in one place.

pub mod admin;
pub mod delegation;
pub mod health;
pub mod listen;
pub mod remote_admin;
pub mod sds;
pub mod workload_api;
