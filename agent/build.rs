//! Generates the kubelet pod-resources gRPC client from `proto/podresources.proto` with the
//! protoc that ships inside `protoc-bin-vendored`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/podresources.proto";
    println!("cargo:rerun-if-changed={proto}");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().build_server(false).compile_protos(&[proto], &["proto"])?;
    Ok(())
}
