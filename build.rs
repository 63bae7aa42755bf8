//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf compiler, so building
//! mayfly needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const WORKLOAD: &str = "proto/workload.proto";
    const ADMIN: &str = "proto/mayfly/admin/v1/admin.proto";
    for p in [WORKLOAD, ADMIN] {
        println!("cargo:rerun-if-changed={p}");
    }
    // The Workload API's streams stay open for as long as their workloads run: its codec
    // keeps a small encode buffer per stream (see `proto::WorkloadCodec`).
    tonic_prost_build::configure()
        .codec_path("crate::proto::WorkloadCodec")
        .compile_fds(protox::compile([WORKLOAD], ["proto"])?)?;
    tonic_prost_build::configure().compile_fds(protox::compile([ADMIN], ["proto"])?)?;
    Ok(())
}
