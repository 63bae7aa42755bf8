//! Generated protobuf and gRPC code. Protocol types stay at the edge (`workload_api`, `admin`).
#![allow(clippy::all, missing_docs)]

/// The SPIFFE Workload API (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}

/// mayfly's admin API.
pub mod admin {
    tonic::include_proto!("mayfly.admin.v1");
}
