//! Enrichment: the metadata every record of a container carries. Without the Kubernetes API
//! it comes from the log path alone; the application falls back to the pod name.

use super::source::ContainerInfo;

/// Everything a document says about where a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// `kubernetes.namespace`.
    pub namespace: String,
    /// `kubernetes.pod.name`.
    pub pod: String,
    /// `kubernetes.pod.uid`.
    pub pod_uid: String,
    /// `kubernetes.container.name`.
    pub container: String,
    /// `kubernetes.container.restart_count`.
    pub restart: u32,
    /// `container.id`.
    pub container_id: Option<String>,
    /// `container.runtime`.
    pub runtime: Option<String>,
    /// `service.name`: the application.
    pub app: String,
    /// `user.name`: the user who owns the workload (empty when unknown).
    pub user: String,
    /// `kubernetes.node.name` and `host.name`.
    pub node: String,
    /// `orchestrator.cluster.name` (omitted when empty).
    pub cluster: String,
}

/// Builds [`Metadata`] for containers.
pub struct Enricher {
    node: String,
    cluster: String,
}

impl Enricher {
    /// An enricher for records of this node and cluster.
    pub fn new(node: String, cluster: String) -> Enricher {
        Enricher { node, cluster }
    }

    /// The metadata of a container known from its path (and symlinks) only.
    pub fn metadata(&self, info: &ContainerInfo, docker_format: bool) -> Metadata {
        let r = &info.reference;
        let runtime = info.runtime.or(docker_format.then_some("docker")).map(str::to_string);
        Metadata {
            namespace: r.namespace.clone(),
            pod: r.pod.clone(),
            pod_uid: r.pod_uid.clone(),
            container: r.container.clone(),
            restart: r.restart,
            container_id: info.container_id.clone(),
            runtime,
            app: r.pod.clone(),
            user: String::new(),
            node: self.node.clone(),
            cluster: self.cluster.clone(),
        }
    }
}
