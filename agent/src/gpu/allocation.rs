//! Which container the kubelet gave which GPU: `v1.PodResourcesLister/List` on the kubelet's
//! pod-resources unix socket (`kubernetes.pod_resources_socket`), and the device ids it
//! reports turned into the GPUs NVML knows.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// The generated protobuf and gRPC client of `proto/podresources.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("v1");
}

use proto::pod_resources_lister_client::PodResourcesListerClient;

/// How long one List call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One device id allocated to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// The device id as the device plugin advertised it.
    pub device_id: String,
}

/// A client of the kubelet's pod-resources service. Connects lazily and reconnects after a
/// kubelet restart.
#[derive(Clone)]
pub struct PodResources {
    client: PodResourcesListerClient<Channel>,
    prefixes: Vec<String>,
}

impl PodResources {
    /// A client for the socket at `socket`, keeping devices of resources named with one of
    /// `prefixes` (e.g. `nvidia.com/gpu`, `nvidia.com/mig-`).
    pub fn new(socket: PathBuf, prefixes: Vec<String>) -> PodResources {
        // The URI is required by the API but unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
            }));
        PodResources { client: PodResourcesListerClient::new(channel), prefixes }
    }

    /// Every GPU device allocated to a container on this node.
    pub async fn list(&mut self) -> Result<Vec<Allocation>, tonic::Status> {
        let reply = self.client.list(proto::ListPodResourcesRequest {}).await?.into_inner();
        let mut allocations = Vec::new();
        for pod in reply.pod_resources {
            for container in pod.containers {
                let gpus = container.devices.into_iter().filter(|d| self.prefixes.iter().any(|p| d.resource_name.starts_with(p.as_str())));
                for device_id in gpus.flat_map(|d| d.device_ids) {
                    allocations.push(Allocation {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: container.name.clone(),
                        device_id,
                    });
                }
            }
        }
        Ok(allocations)
    }
}

/// What a device id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRef {
    /// A GPU or MIG instance by UUID (`GPU-…`, `MIG-…`).
    Uuid(String),
    /// A MIG instance in the pre-R470 form `MIG-GPU-<uuid>/<gi>/<ci>`.
    MigOfGpu {
        /// The physical GPU's UUID.
        parent_uuid: String,
        /// GPU instance id.
        gpu_instance: u32,
    },
    /// A GPU by NVML index (the device plugin's `deviceIDStrategy: index`).
    Index(u32),
}

/// Parses a device id, dropping the `::<n>` replica suffix of a time-sliced GPU: every replica
/// is the same physical device.
pub fn parse_device_id(id: &str) -> Option<DeviceRef> {
    let id = id.split_once("::").map_or(id, |(device, _)| device);
    if let Some(rest) = id.strip_prefix("MIG-GPU-") {
        let mut parts = rest.split('/');
        let parent = parts.next()?;
        let gpu_instance = parts.next()?.parse().ok()?;
        return Some(DeviceRef::MigOfGpu { parent_uuid: format!("GPU-{parent}"), gpu_instance });
    }
    if id.starts_with("GPU-") || id.starts_with("MIG-") {
        return Some(DeviceRef::Uuid(id.to_string()));
    }
    id.parse().ok().map(DeviceRef::Index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_mig_forms_and_indexes_name_the_physical_device() {
        let uuid = "GPU-8f3a6d2c-1b4e-4c8a-9d7f-0a1b2c3d4e5f";
        assert_eq!(parse_device_id(uuid), Some(DeviceRef::Uuid(uuid.into())));
        assert_eq!(parse_device_id(&format!("{uuid}::3")), Some(DeviceRef::Uuid(uuid.into())));
        let mig = "MIG-5c2e1f0a-7b3d-5e9c-8a4f-112233445566";
        assert_eq!(parse_device_id(&format!("{mig}::1")), Some(DeviceRef::Uuid(mig.into())));
        assert_eq!(
            parse_device_id("MIG-GPU-8f3a6d2c-1b4e-4c8a-9d7f-0a1b2c3d4e5f/3/0"),
            Some(DeviceRef::MigOfGpu { parent_uuid: uuid.into(), gpu_instance: 3 })
        );
        assert_eq!(parse_device_id("2"), Some(DeviceRef::Index(2)));
        assert_eq!(parse_device_id("fpga-0"), None);
        assert_eq!(parse_device_id("MIG-GPU-x/notanumber/0"), None);
    }
}
