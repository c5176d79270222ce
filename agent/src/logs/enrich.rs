//! Enrichment: the metadata every record of a container carries. From the pod store when
//! the Kubernetes API is there; otherwise from the log path alone, the application then being
//! the pod name without its generated suffixes.

use super::source::ContainerInfo;
use crate::identity::resolve::app_from_pod_name;
use crate::kube::meta::{PodMeta, WorkloadKind};

/// Everything a document says about where a record came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// `kubernetes.namespace`.
    pub namespace: String,
    /// `kubernetes.pod.name`.
    pub pod: String,
    /// `kubernetes.pod.uid`.
    pub pod_uid: String,
    /// `kubernetes.pod.ip`.
    pub pod_ip: Option<String>,
    /// `kubernetes.container.name`.
    pub container: String,
    /// `kubernetes.container.restart_count`.
    pub restart: u32,
    /// `container.id`.
    pub container_id: Option<String>,
    /// `container.runtime`.
    pub runtime: Option<String>,
    /// `container.image.name`.
    pub image: Option<String>,
    /// The pod's labels (as Kubernetes spells the keys; ECS documents de-dot them).
    pub labels: Vec<(String, String)>,
    /// `kubernetes.<kind>.name` of the owning workload.
    pub workload: Option<(WorkloadKind, String)>,
    /// `kubernetes.job.name` for a CronJob's pods.
    pub job: Option<String>,
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

    /// The metadata of a container: from `pod` when the store knows it, else from the path.
    pub fn metadata(&self, info: &ContainerInfo, docker_format: bool, pod: Option<&PodMeta>) -> Metadata {
        let r = &info.reference;
        let mut meta = Metadata {
            namespace: r.namespace.clone(),
            pod: r.pod.clone(),
            pod_uid: r.pod_uid.clone(),
            container: r.container.clone(),
            restart: r.restart,
            container_id: info.container_id.clone(),
            runtime: info.runtime.or(docker_format.then_some("docker")).map(str::to_string),
            app: app_from_pod_name(&r.pod).to_string(),
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            ..Metadata::default()
        };
        let Some(pod) = pod else { return meta };
        meta.pod_ip = pod.ip.clone();
        meta.labels = bounded_labels(&pod.labels);
        if meta.labels.len() < pod.labels.len() {
            tracing::warn!(
                namespace = %pod.namespace, pod = %pod.name, labels = pod.labels.len(), kept = meta.labels.len(),
                "pod has more labels than a document carries; the rest are left out of kubernetes.labels"
            );
        }
        meta.workload = pod.workload.as_ref().map(|w| (w.kind, w.name.clone()));
        meta.job = pod.workload.as_ref().and_then(|w| w.job.clone());
        meta.app = pod.app.clone();
        meta.user = pod.user.clone();
        if let Some(c) = pod.container(&r.container) {
            meta.image = Some(c.image.clone()).filter(|i| !i.is_empty());
            // The status names the current instance and the one before it.
            let id = if c.restart_count == r.restart {
                c.id.clone()
            } else if c.restart_count == r.restart + 1 {
                c.last_id.clone()
            } else {
                None
            };
            meta.container_id = id.or(meta.container_id);
            meta.runtime = c.runtime.clone().or(meta.runtime);
        }
        meta
    }
}

/// Most labels a document carries, and most bytes of them: every record repeats its pod's
/// labels, so a pod with thousands would make every document of it huge (and the agent's
/// memory with them). Kubernetes' own labels are in the first few; the app and user keys are
/// resolved from all of them regardless.
pub const MAX_LABELS: usize = 64;
/// See [`MAX_LABELS`].
pub const MAX_LABEL_BYTES: usize = 8 * 1024;

/// The pod's labels, up to [`MAX_LABELS`] and [`MAX_LABEL_BYTES`] (keys in order).
fn bounded_labels(labels: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut bytes = 0;
    labels
        .iter()
        .take(MAX_LABELS)
        .take_while(|(k, v)| {
            bytes += k.len() + v.len();
            bytes <= MAX_LABEL_BYTES
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
