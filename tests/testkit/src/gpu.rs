//! GPU test doubles: the fake NVML library (and an "older driver" copy lacking a function), a
//! fake kubelet pod-resources gRPC server on a unix socket, and a fake `/proc` whose processes
//! sit in the cgroups of every runtime, driver and QoS class the agent must recognise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use nodelens_fake_nvml::scenario;

mod proto {
    tonic::include_proto!("v1");
}

use proto::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use proto::{
    CdiDevice, ClaimResource, ContainerDevices, ContainerResources, DynamicResource, ListPodResourcesRequest, ListPodResourcesResponse,
    PodResources,
};

const LIBRARY: &str = "libnodelens_fake_nvml.so";

/// The fake NVML library cargo built beside the running test or bench binary.
pub fn nvml_library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the binary's directory");
    let candidates = [deps.join(LIBRARY), deps.parent().map(|p| p.join(LIBRARY)).unwrap_or_default()];
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| panic!("{LIBRARY} not built beside {}", exe.display()))
}

/// A copy of `library` in `dir` in which `symbol` cannot be found, as in a driver older than
/// that function: its name in the dynamic string table is changed, so `dlsym` finds every
/// other function but not this one.
pub fn without_symbol(library: &Path, symbol: &str, dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(library).expect("read the fake library");
    let needle = [b"\0", symbol.as_bytes(), b"\0"].concat();
    let mut renamed = 0;
    let mut from = 0;
    while let Some(at) = bytes[from..].windows(needle.len()).position(|w| w == needle) {
        let name = from + at + 1;
        bytes[name] = b'X';
        renamed += 1;
        from = name;
    }
    assert!(renamed > 0, "{symbol} not found in {}", library.display());
    let out = dir.join(format!("libnvidia-ml-without-{symbol}.so"));
    std::fs::write(&out, bytes).expect("write the older library");
    out
}

/// Devices of one resource allocated to one container.
#[derive(Debug, Clone)]
pub struct Allocated {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Extended resource, e.g. `nvidia.com/gpu`.
    pub resource: String,
    /// Device ids as the device plugin advertised them; for a claim, the DRA driver's
    /// device names.
    pub device_ids: Vec<String>,
    /// Set for devices of a DRA ResourceClaim: the claim's name (`resource` is then the DRA
    /// driver's name).
    pub claim: Option<String>,
}

impl Allocated {
    /// Devices of `resource` given to `namespace/pod/container`.
    pub fn new(namespace: &str, pod: &str, container: &str, resource: &str, device_ids: &[&str]) -> Allocated {
        Allocated {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            resource: resource.into(),
            device_ids: device_ids.iter().map(|d| d.to_string()).collect(),
            claim: None,
        }
    }

    /// A HAMi slice as the kubelet lists it: HAMi's NVIDIA device plugin registers every GPU
    /// `splits` times under `nvidia.com/gpu` (`GetPluginDevices`: `for i := uint(0); i < count;
    /// i++ { id := fmt.Sprintf("%v-%v", dev.ID, i)`), and with its default
    /// `enablegetpreferredallocation: false` the kubelet picks the ids, so `gpu_uuid` may
    /// name another GPU than the one HAMi placed the container on.
    pub fn hami(namespace: &str, pod: &str, container: &str, gpu_uuid: &str, replica: u32) -> Allocated {
        Allocated::new(namespace, pod, container, "nvidia.com/gpu", &[&format!("{gpu_uuid}-{replica}")])
    }

    /// Devices of the ResourceClaim `claim` (in the pod's namespace), prepared by NVIDIA's DRA
    /// driver, used by `namespace/pod/container`. Several containers may share one claim.
    pub fn claim(namespace: &str, pod: &str, container: &str, claim: &str, device_names: &[&str]) -> Allocated {
        Allocated { claim: Some(claim.into()), ..Allocated::new(namespace, pod, container, "gpu.nvidia.com", device_names) }
    }

    /// The claim's devices as the kubelet reports them: driver, pool (the node), device name,
    /// and the CDI device the driver prepared (`k8s.gpu.nvidia.com/claim=<claim uid>-<name>`).
    fn dynamic_resource(&self, claim: &str) -> DynamicResource {
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            claim.len(),
            claim.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))) & 0xffff_ffff_ffff
        );
        DynamicResource {
            claim_name: claim.into(),
            claim_namespace: self.namespace.clone(),
            claim_resources: self
                .device_ids
                .iter()
                .map(|name| ClaimResource {
                    cdi_devices: vec![CdiDevice { name: format!("k8s.{}/claim={uid}-{name}", self.resource) }],
                    driver_name: self.resource.clone(),
                    pool_name: "node".into(),
                    device_name: name.clone(),
                    share_id: None,
                })
                .collect(),
        }
    }
}

#[derive(Clone, Default)]
struct Lister {
    allocated: Arc<Mutex<Vec<Allocated>>>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl PodResourcesLister for Lister {
    async fn list(&self, _: tonic::Request<ListPodResourcesRequest>) -> Result<tonic::Response<ListPodResourcesResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Pods → containers → devices, as the kubelet groups them; CPU-only containers are
        // listed too, without devices.
        type Resources = (Vec<ContainerDevices>, Vec<DynamicResource>);
        let mut pods: BTreeMap<(String, String), BTreeMap<String, Resources>> = BTreeMap::new();
        for a in self.allocated.lock().unwrap().iter() {
            let containers = pods.entry((a.namespace.clone(), a.pod.clone())).or_default();
            let (devices, claims) = containers.entry(a.container.clone()).or_default();
            match &a.claim {
                Some(claim) => claims.push(a.dynamic_resource(claim)),
                None if a.device_ids.is_empty() => {}
                None => {
                    devices.push(ContainerDevices { resource_name: a.resource.clone(), device_ids: a.device_ids.clone(), topology: None })
                }
            }
        }
        let pod_resources = pods
            .into_iter()
            .map(|((namespace, name), containers)| PodResources {
                name,
                namespace,
                containers: containers
                    .into_iter()
                    .map(|(name, (devices, dynamic_resources))| ContainerResources {
                        name,
                        devices,
                        cpu_ids: vec![],
                        memory: vec![],
                        dynamic_resources,
                    })
                    .collect(),
            })
            .collect();
        Ok(tonic::Response::new(ListPodResourcesResponse { pod_resources }))
    }
}

/// The kubelet's pod-resources service on a unix socket; stops when dropped.
pub struct FakePodResources {
    /// The socket path.
    pub socket: PathBuf,
    lister: Lister,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakePodResources {
    /// Serves on a new socket at `socket`.
    pub fn start(socket: &Path) -> FakePodResources {
        let _ = std::fs::remove_file(socket);
        let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind the pod-resources socket");
        listener.set_nonblocking(true).unwrap();
        let lister = Lister::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let service = PodResourcesListerServer::new(lister.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(tokio::net::UnixListener::from_std(listener).unwrap());
                let stop = async {
                    let _ = stop_rx.await;
                };
                let _ = tonic::transport::Server::builder().serve_with_incoming_shutdown(service, incoming, stop).await;
            });
        });
        FakePodResources { socket: socket.to_path_buf(), lister, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Replaces what List returns.
    pub fn set(&self, allocated: Vec<Allocated>) {
        *self.lister.allocated.lock().unwrap() = allocated;
    }

    /// List calls answered so far.
    pub fn calls(&self) -> usize {
        self.lister.calls.load(Ordering::SeqCst)
    }
}

impl Drop for FakePodResources {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A workload pod of a simulated GPU node: its name, uid, app and user labels, its one
/// container's id, the pid of its GPU process (`None`: it holds a GPU and runs nothing on
/// it) and how that process's cgroup names the container.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Pod name.
    pub pod: &'static str,
    /// Pod uid.
    pub uid: &'static str,
    /// Its `app` label.
    pub app: &'static str,
    /// Its `user` label.
    pub user: &'static str,
    /// Its container's id: 64 times one hex digit.
    pub id: String,
    /// Its GPU process.
    pub pid: Option<u32>,
    /// The cgroup layout of that process.
    pub cgroup: Cgroup,
}

impl Workload {
    /// A workload whose container id is `digit` repeated 64 times.
    pub fn new(
        pod: &'static str,
        uid: &'static str,
        app: &'static str,
        user: &'static str,
        digit: char,
        pid: Option<u32>,
        cgroup: Cgroup,
    ) -> Workload {
        Workload { pod, uid, app, user, id: digit.to_string().repeat(64), pid, cgroup }
    }

    /// Its GPU process in `proc`, if it has one (start time `777000 + pid`).
    pub fn add_process(&self, proc: &FakeProc) {
        if let Some(pid) = self.pid {
            proc.add(pid, 777_000 + u64::from(pid), &self.cgroup.render(self.uid, &self.id));
        }
    }
}

/// How a process's `/proc/<pid>/cgroup` names its container.
#[derive(Debug, Clone, Copy)]
pub enum Cgroup {
    /// cgroup v2, systemd driver, containerd, burstable.
    V2SystemdContainerd,
    /// cgroup v2, systemd driver, CRI-O, best-effort.
    V2SystemdCrio,
    /// cgroup v1, cgroupfs driver, docker (bare id), guaranteed QoS (no class segment).
    V1CgroupfsGuaranteed,
    /// cgroup v2 seen through a cgroup namespace: the path starts with `/..`.
    V2Namespaced,
}

impl Cgroup {
    /// The file's contents for a container of the pod `pod_uid`.
    pub fn render(self, pod_uid: &str, container_id: &str) -> String {
        let u = pod_uid.replace('-', "_");
        match self {
            Cgroup::V2SystemdContainerd => format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{container_id}.scope\n"
            ),
            Cgroup::V2SystemdCrio => {
                format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{container_id}.scope\n")
            }
            Cgroup::V1CgroupfsGuaranteed => format!(
                "12:memory:/kubepods/pod{pod_uid}/{container_id}\n11:devices:/kubepods/pod{pod_uid}/{container_id}\n1:name=systemd:/kubepods/pod{pod_uid}/{container_id}\n"
            ),
            Cgroup::V2Namespaced => format!("0::/../../kubepods-burstable-pod{u}.slice/cri-containerd-{container_id}.scope\n"),
        }
    }
}

/// A `/proc` tree with just what the agent reads of a process: `stat` and `cgroup`.
pub struct FakeProc {
    /// Its root, for `host.proc_root`.
    pub root: PathBuf,
}

impl FakeProc {
    /// An empty tree at `root`.
    pub fn new(root: &Path) -> FakeProc {
        std::fs::create_dir_all(root).unwrap();
        FakeProc { root: root.to_path_buf() }
    }

    /// Adds process `pid`, started at `started` clock ticks, in the cgroup `cgroup`.
    pub fn add(&self, pid: u32, started: u64, cgroup: &str) {
        let dir = self.root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let stat = format!(
            "{pid} (python3) S 1 {pid} {pid} 0 -1 4194560 9000 0 0 0 500 30 0 0 20 0 12 0 {started} 9000000 4000 18446744073709551615"
        );
        std::fs::write(dir.join("stat"), stat).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    }

    /// The process exited.
    pub fn remove(&self, pid: u32) {
        let _ = std::fs::remove_dir_all(self.root.join(pid.to_string()));
    }
}
