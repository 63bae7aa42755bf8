//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf compiler, so building
//! mayfly needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const WORKLOAD: &str = "proto/workload.proto";
    const ADMIN: &str = "proto/mayfly/admin/v1/admin.proto";
    const DELEGATION: &str = "proto/mayfly/delegation/v1/delegation.proto";
    for p in [WORKLOAD, ADMIN, DELEGATION] {
        println!("cargo:rerun-if-changed={p}");
    }
    // The Workload API's streams stay open for as long as their workloads run: its codec
    // keeps a small encode buffer per stream (see `proto::WorkloadCodec`).
    tonic_prost_build::configure()
        .codec_path("crate::proto::WorkloadCodec")
        .compile_fds(protox::compile([WORKLOAD], ["proto"])?)?;
    // The Delegation service answers with the admin API's `Lease`, generated once, with the
    // admin API. Compiling it also writes the admin package's file (empty: its types are
    // extern here), so the admin API comes after, and writes that file whole.
    tonic_prost_build::configure()
        .extern_path(".mayfly.admin.v1", "crate::proto::admin")
        .compile_fds(protox::compile([DELEGATION], ["proto"])?)?;
    tonic_prost_build::configure().compile_fds(protox::compile([ADMIN], ["proto"])?)?;
    Ok(())
}
