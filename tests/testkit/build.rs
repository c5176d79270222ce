//! Generates the kubelet pod-resources gRPC server from the proto the agent's client uses, so
//! the fake kubelet and the agent speak the same wire contract.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../agent/proto/podresources.proto";
    println!("cargo:rerun-if-changed={proto}");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().build_client(false).compile_protos(&[proto], &["../../agent/proto"])?;
    Ok(())
}
