//! Generates the kubelet pod-resources gRPC client from `proto/podresources.proto`, parsed by
//! `protox` (a protobuf compiler in Rust, the one prometheus-client's build uses here too), so
//! no protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/podresources.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(descriptors)?;
    Ok(())
}
