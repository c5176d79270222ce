//! Who a container is — namespace, pod, container, app, user — for metrics about containers
//! found outside the log pipeline (through `/proc` or the kubelet's pod-resources API): from
//! the pod store when the API is there, else from the kubelet's log directories
//! (`<ns>_<pod>_<uid>`) and container symlinks, the application then being the pod's name
//! without its generated suffixes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

use super::cgroup::ContainerCgroup;
use super::path;
use super::resolve::app_from_pod_name;

/// A container's identity as metric labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ContainerLabels {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name (empty when nothing names it).
    pub container: String,
    /// Application.
    pub app: String,
    /// User.
    pub user: String,
}

/// Pods by namespace and name.
pub type ByName<P> = HashMap<(String, String), Arc<P>>;

/// Pod metadata as naming reads it; the pod store (`kube::store::PodStore`) is the one.
pub trait PodDirectory {
    /// One pod's metadata.
    type Pod: NamedPod;
    /// The pod with this UID, if known.
    fn get(&self, uid: &str) -> Option<Arc<Self::Pod>>;
    /// Every known pod by namespace and name.
    fn by_name(&self) -> ByName<Self::Pod>;
    /// Whether the pod with this UID was deleted (its metadata kept a while).
    fn is_deleted(&self, uid: &str) -> bool;
}

/// What naming reads of one pod's metadata.
pub trait NamedPod {
    /// The labels of the pod's container `container`.
    fn labels(&self, container: String) -> ContainerLabels;
    /// The name of the container whose current or previous instance has this runtime id.
    fn container_name(&self, id: &str) -> Option<String>;
}

/// Where names are looked up.
pub struct Names<D> {
    /// The kubelet's pod log directory, for names without the API.
    pub pods_dir: PathBuf,
    /// The kubelet's container symlinks, for container names without the API.
    pub containers_dir: PathBuf,
    /// Pod metadata, when the API is there.
    pub pods: Option<Arc<D>>,
}

impl<D> Clone for Names<D> {
    fn clone(&self) -> Self {
        Names { pods_dir: self.pods_dir.clone(), containers_dir: self.containers_dir.clone(), pods: self.pods.clone() }
    }
}

/// What the kubelet's directories say without the API: pods by UID, container names by id.
#[derive(Default)]
struct PathIndex {
    pods: HashMap<String, (String, String)>,
    containers: HashMap<String, String>,
}

impl PathIndex {
    fn read<D>(names: &Names<D>) -> PathIndex {
        let entries = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir).map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect()).unwrap_or_default()
        };
        let pods = entries(&names.pods_dir)
            .iter()
            .filter_map(|n| path::parse_pod_dir(n).map(|(ns, pod, uid)| (uid.to_string(), (ns.to_string(), pod.to_string()))))
            .collect();
        let containers = entries(&names.containers_dir)
            .iter()
            .filter_map(|n| path::parse_container_link(n).map(|l| (l.id.to_string(), l.container.to_string())))
            .collect();
        PathIndex { pods, containers }
    }
}

impl<D: PodDirectory> Names<D> {
    /// Lookups for one round (one scan, one GPU poll): what is read or indexed is read once,
    /// on first need, and reused for the rest of the round.
    pub fn lookup(&self) -> Lookup<'_, D> {
        Lookup { names: self, paths: None, pods_by_name: None }
    }
}

/// One round of lookups.
pub struct Lookup<'a, D: PodDirectory> {
    names: &'a Names<D>,
    paths: Option<PathIndex>,
    pods_by_name: Option<ByName<D::Pod>>,
}

impl<D: PodDirectory> Lookup<'_, D> {
    /// Names the container a process runs in; `None` when it belongs to no known pod.
    pub fn by_cgroup(&mut self, container: &ContainerCgroup) -> Option<ContainerLabels> {
        if let Some(pod) = self.names.pods.as_ref().and_then(|s| s.get(&container.pod_uid)) {
            return Some(pod.labels(pod.container_name(&container.container_id).unwrap_or_default()));
        }
        let names = self.names;
        let index = self.paths.get_or_insert_with(|| PathIndex::read(names));
        let (namespace, pod) = index.pods.get(&container.pod_uid)?.clone();
        Some(ContainerLabels {
            container: index.containers.get(&container.container_id).cloned().unwrap_or_default(),
            app: app_from_pod_name(&pod).to_string(),
            user: String::new(),
            namespace,
            pod,
        })
    }

    /// The pod's metadata, when the API is there and knows it.
    pub fn pod(&mut self, namespace: &str, pod: &str) -> Option<Arc<D::Pod>> {
        let store = self.names.pods.as_ref()?;
        let by_name = self.pods_by_name.get_or_insert_with(|| store.by_name());
        by_name.get(&(namespace.to_string(), pod.to_string())).cloned()
    }

    /// Whether the pod a process's cgroup names is no longer on the node: deleted (its
    /// metadata is kept a while for its last log lines) or known neither to the API nor to
    /// the kubelet's log directories.
    pub fn pod_gone(&mut self, container: &ContainerCgroup) -> bool {
        if let Some(store) = &self.names.pods {
            if store.is_deleted(&container.pod_uid) {
                return true;
            }
        }
        self.by_cgroup(container).is_none()
    }

    /// Names a container the kubelet reported by namespace, pod and container name.
    pub fn by_name(&mut self, namespace: &str, pod: &str, container: &str) -> ContainerLabels {
        match self.pod(namespace, pod) {
            Some(meta) => meta.labels(container.to_string()),
            None => ContainerLabels {
                namespace: namespace.to_string(),
                pod: pod.to_string(),
                container: container.to_string(),
                app: app_from_pod_name(pod).to_string(),
                user: String::new(),
            },
        }
    }
}
