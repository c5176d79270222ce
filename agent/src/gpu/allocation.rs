//! Which container the kubelet gave which GPU: `v1.PodResourcesLister/List` on the kubelet's
//! pod-resources unix socket (`kubernetes.pod_resources_socket`), and the device ids it
//! reports turned into the GPUs NVML knows: device-plugin ids (`nvidia.com/gpu`,
//! `nvidia.com/mig-*`) and the devices of Dynamic Resource Allocation claims prepared by
//! NVIDIA's DRA driver (`gpu.nvidia.com`).

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

/// The driver name of NVIDIA's DRA driver for GPUs and MIG devices.
pub const NVIDIA_DRA_DRIVER: &str = "gpu.nvidia.com";

/// One device id allocated to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// The device id as the device plugin advertised it, or the DRA driver's device name.
    pub device_id: String,
    /// Where the id comes from.
    pub source: Source,
}

/// Who allocated a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A device plugin (`ContainerResources.devices`).
    DevicePlugin,
    /// A DRA claim (`ContainerResources.dynamic_resources`).
    Dra,
}

impl Allocation {
    /// The GPU or MIG instance the id names.
    pub fn device(&self) -> Option<DeviceRef> {
        match self.source {
            Source::DevicePlugin => parse_device_id(&self.device_id),
            Source::Dra => parse_dra_device(&self.device_id),
        }
    }
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
                let plugin = gpus.flat_map(|d| d.device_ids).map(|id| (id, Source::DevicePlugin));
                let claimed = container.dynamic_resources.into_iter().flat_map(|claim| claim.claim_resources);
                let dra = claimed
                    .filter(|r| r.driver_name == NVIDIA_DRA_DRIVER)
                    .filter_map(|r| dra_device_name(&r))
                    .map(|name| (name, Source::Dra));
                for (device_id, source) in plugin.chain(dra) {
                    allocations.push(Allocation {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: container.name.clone(),
                        device_id,
                        source,
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
    /// A GPU by minor number (`/dev/nvidiaN`): the DRA driver's `gpu-<minor>`.
    Minor(u32),
    /// A MIG instance by its parent's minor number, GPU instance profile id and placement
    /// start: the DRA driver's `gpu-<minor>-mig-<profile>-<profile id>-<start>`.
    MigPlacement {
        /// The physical GPU's minor number.
        parent_minor: u32,
        /// GPU instance profile id.
        profile_id: u32,
        /// First memory slice of the placement.
        start: u32,
    },
}

/// The device name of a DRA claim's device; from its CDI device name
/// (`k8s.gpu.nvidia.com/claim=<claim uid>-<device name>` or `.../device=<device name>`) where a
/// kubelet does not report the name itself.
fn dra_device_name(resource: &proto::ClaimResource) -> Option<String> {
    if !resource.device_name.is_empty() {
        return Some(resource.device_name.clone());
    }
    resource.cdi_devices.iter().find_map(|cdi| {
        let (_, device) = cdi.name.split_once('=')?;
        let name = match cdi.name.split_once("/claim=") {
            // A claim uid is 36 characters, then `-`.
            Some(_) => device.get(37..)?,
            None => device,
        };
        name.starts_with("gpu-").then(|| name.to_string())
    })
}

/// Parses a device name of NVIDIA's DRA driver: `gpu-<minor>`, `gpu-<minor>-mig-<profile
/// name>-<profile id>-<placement start>` (v25.12 and later), or the earlier
/// `gpu-<minor>-mig-<profile id>-<placement start>-<placement size>`.
pub fn parse_dra_device(name: &str) -> Option<DeviceRef> {
    let rest = name.strip_prefix("gpu-")?;
    let Some((minor, mig)) = rest.split_once("-mig-") else {
        return rest.parse().ok().map(DeviceRef::Minor);
    };
    let parent_minor = minor.parse().ok()?;
    let parts: Vec<&str> = mig.split('-').collect();
    let number = |i: usize| parts.get(i).and_then(|p| p.parse::<u32>().ok());
    let all_numbers = parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let (profile_id, start) = if all_numbers && parts.len() == 3 {
        (number(0)?, number(1)?)
    } else {
        let n = parts.len();
        (n >= 3).then_some(())?;
        (number(n - 2)?, number(n - 1)?)
    };
    Some(DeviceRef::MigPlacement { parent_minor, profile_id, start })
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

    #[test]
    fn dra_device_names_of_both_driver_generations_name_minor_numbers_and_placements() {
        assert_eq!(parse_dra_device("gpu-3"), Some(DeviceRef::Minor(3)));
        let mig = |parent_minor, profile_id, start| Some(DeviceRef::MigPlacement { parent_minor, profile_id, start });
        assert_eq!(parse_dra_device("gpu-2-mig-1g24gb-19-0"), mig(2, 19, 0));
        assert_eq!(parse_dra_device("gpu-1-mig-1g12gb-me-15-6"), mig(1, 15, 6), "`+me` profiles become `-me`");
        assert_eq!(parse_dra_device("gpu-1-mig-19-4-1"), mig(1, 19, 4), "the older numeric form: profile, start, size");
        for bad in ["gpu-", "gpu-x", "gpu-1-mig-", "gpu-1-mig-1g10gb", "gpu-vfio-0", "nic-0", "gpu-1-mig-a-b-c"] {
            assert_eq!(parse_dra_device(bad), None, "{bad}");
        }
        let resource = |device_name: &str, cdi: &str| proto::ClaimResource {
            cdi_devices: vec![proto::CdiDevice { name: cdi.into() }],
            driver_name: NVIDIA_DRA_DRIVER.into(),
            pool_name: "node-1".into(),
            device_name: device_name.into(),
            share_id: None,
        };
        assert_eq!(dra_device_name(&resource("gpu-0", "")).as_deref(), Some("gpu-0"));
        let claim = "k8s.gpu.nvidia.com/claim=dab5ab50-d59a-42a6-af16-cfd4628c0f7a-gpu-2-mig-1g24gb-19-0";
        assert_eq!(dra_device_name(&resource("", claim)).as_deref(), Some("gpu-2-mig-1g24gb-19-0"));
        assert_eq!(dra_device_name(&resource("", "k8s.gpu.nvidia.com/device=gpu-4")).as_deref(), Some("gpu-4"));
        assert_eq!(dra_device_name(&resource("", "vendor.com/nic=eth0")), None);
    }
}
