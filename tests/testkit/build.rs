//! Generates the kubelet pod-resources gRPC server from the proto the agent's client uses, so
//! the fake kubelet and the agent speak the same wire contract (parsed by `protox`: no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../agent/proto/podresources.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../../agent/proto"])?;
    tonic_prost_build::configure().build_client(false).compile_fds(descriptors)?;
    Ok(())
}
