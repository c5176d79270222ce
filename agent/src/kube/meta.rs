//! A pod as the agent keeps it: only what enrichment, attribution and `nodelens_pod_info`
//! need, so a thousand pods cost little memory (whole `Pod` objects with managed fields and
//! status run to tens of kilobytes each).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::hami;

/// The kind of workload that owns a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Through a ReplicaSet.
    Deployment,
    /// A ReplicaSet not owned by a Deployment (rare).
    ReplicaSet,
    /// A StatefulSet.
    StatefulSet,
    /// A DaemonSet.
    DaemonSet,
    /// A Job not created by a CronJob.
    Job,
    /// A Job created by a CronJob.
    CronJob,
}

impl WorkloadKind {
    /// Lower-case kind, as in `kubernetes.<kind>.name` and the `workload_kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::ReplicaSet => "replicaset",
            WorkloadKind::StatefulSet => "statefulset",
            WorkloadKind::DaemonSet => "daemonset",
            WorkloadKind::Job => "job",
            WorkloadKind::CronJob => "cronjob",
        }
    }
}

/// The owning workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Its kind.
    pub kind: WorkloadKind,
    /// Its name.
    pub name: String,
    /// For a CronJob's pods: the Job's name (`kubernetes.job.name`).
    pub job: Option<String>,
}

/// One container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMeta {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// The runtime's id of the current instance (`containerd://<id>` split).
    pub id: Option<String>,
    /// The previous instance's id (`lastState.terminated`).
    pub last_id: Option<String>,
    /// `containerd`, `cri-o`, `docker`, ...
    pub runtime: Option<String>,
    /// The kubelet's restart count of the current instance.
    pub restart_count: u32,
}

/// A pod, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Pod IP.
    pub ip: Option<String>,
    /// Labels, keys as written.
    pub labels: BTreeMap<String, String>,
    /// Annotations the agent reads (those the config names, and `nodelens.io/*`).
    pub annotations: BTreeMap<String, String>,
    /// The owning workload.
    pub workload: Option<Workload>,
    /// Containers, init containers included.
    pub containers: Vec<ContainerMeta>,
    /// The application (`service.name`), resolved with the namespace's labels.
    pub app: String,
    /// The user (`user.name`).
    pub user: String,
    /// HAMi's placement and grants of the pod's GPU slices (`hami.io/vgpu-devices-allocated`),
    /// or why that annotation could not be read; `None` without it.
    pub hami: Option<hami::PodGrants>,
}

impl PodMeta {
    /// The container `name` of this pod.
    pub fn container(&self, name: &str) -> Option<&ContainerMeta> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// Whether `container`'s logs are excluded by the pod's annotations.
    pub fn excludes(&self, container: &str) -> bool {
        self.annotations.get(EXCLUDE).is_some_and(|v| v == "true")
            || self.annotations.get(EXCLUDE_CONTAINERS).is_some_and(|list| list.split(',').any(|c| c.trim() == container))
    }
}

/// `nodelens.io/exclude: "true"` on a pod or namespace skips its logs.
pub const EXCLUDE: &str = "nodelens.io/exclude";
/// `nodelens.io/exclude-containers: "a,b"` skips those containers' logs.
pub const EXCLUDE_CONTAINERS: &str = "nodelens.io/exclude-containers";

/// Reduces a `Pod`; `keep_annotation` says which annotations are worth keeping. `app` and
/// `user` are left empty for the store to resolve. `None` for a pod without name or uid.
pub fn from_pod(pod: &Pod, keep_annotation: impl Fn(&str) -> bool) -> Option<PodMeta> {
    let meta = &pod.metadata;
    let labels: BTreeMap<String, String> = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.iter().flatten().filter(|(k, _)| keep_annotation(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let workload = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true)).and_then(|owner| {
        let (kind, name, job) = match owner.kind.as_str() {
            "ReplicaSet" => match labels.get("pod-template-hash").and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => (WorkloadKind::Deployment, deployment.to_string(), None),
                None => (WorkloadKind::ReplicaSet, owner.name.clone(), None),
            },
            "StatefulSet" => (WorkloadKind::StatefulSet, owner.name.clone(), None),
            "DaemonSet" => (WorkloadKind::DaemonSet, owner.name.clone(), None),
            "Job" => match cronjob_of(&owner.name) {
                Some(cronjob) => (WorkloadKind::CronJob, cronjob.to_string(), Some(owner.name.clone())),
                None => (WorkloadKind::Job, owner.name.clone(), None),
            },
            _ => return None,
        };
        Some(Workload { kind, name, job })
    });
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let statuses: Vec<_> =
        status.iter().flat_map(|s| s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten())).collect();
    let containers = spec
        .iter()
        .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
        .map(|c| {
            let st = statuses.iter().find(|s| s.name == c.name);
            let split = |id: &str| id.split_once("://").map(|(rt, id)| (rt.to_string(), id.to_string()));
            let current = st.and_then(|s| s.container_id.as_deref()).and_then(split);
            let last = st.and_then(|s| s.last_state.as_ref()?.terminated.as_ref()?.container_id.as_deref()).and_then(split);
            ContainerMeta {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                runtime: current.as_ref().or(last.as_ref()).map(|(rt, _)| rt.clone()),
                id: current.map(|(_, id)| id),
                last_id: last.map(|(_, id)| id),
                restart_count: st.map_or(0, |s| s.restart_count.max(0) as u32),
            }
        })
        .collect();
    let hami = meta.annotations.as_ref().and_then(|a| a.get(hami::ALLOCATED)).map(|value| {
        fn names(list: Option<&Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<&str> {
            list.into_iter().flatten().map(|c| c.name.as_str()).collect()
        }
        hami::grants(value, &names(spec.and_then(|s| s.init_containers.as_ref())), &names(spec.map(|s| &s.containers)))
    });
    Some(PodMeta {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
        ip: status.and_then(|s| s.pod_ip.clone()),
        labels,
        annotations,
        workload,
        containers,
        app: String::new(),
        user: String::new(),
        hami,
    })
}

/// A CronJob names its Jobs `<cronjob>-<scheduled minute since the epoch>`.
fn cronjob_of(job: &str) -> Option<&str> {
    let (prefix, suffix) = job.rsplit_once('-')?;
    (suffix.len() >= 8 && suffix.bytes().all(|b| b.is_ascii_digit())).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn deployment_pods_name_their_deployment_through_the_template_hash() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web-7d9f8b6c5d-x2k4p", "namespace": "prod", "uid": "u1",
                "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5d"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "nodelens.io/exclude-containers": "sidecar"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8b6c5d", "uid": "rs", "controller": true}]},
            "spec": {"containers": [{"name": "app", "image": "registry/web:1.2"}, {"name": "sidecar", "image": "envoy:1"}]},
            "status": {"podIP": "10.1.2.3", "containerStatuses": [
                {"name": "app", "containerID": "containerd://abc123", "image": "registry/web:1.2", "imageID": "", "ready": true, "restartCount": 2,
                 "lastState": {"terminated": {"exitCode": 1, "containerID": "containerd://old999"}}}
            ]}
        }));
        let meta = from_pod(&p, |k| k.starts_with("nodelens.io/")).unwrap();
        assert_eq!(meta.workload, Some(Workload { kind: WorkloadKind::Deployment, name: "web".into(), job: None }));
        assert_eq!(meta.ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(meta.annotations.len(), 1, "only wanted annotations are kept");
        let app = meta.container("app").unwrap();
        assert_eq!(
            (app.id.as_deref(), app.last_id.as_deref(), app.runtime.as_deref(), app.restart_count),
            (Some("abc123"), Some("old999"), Some("containerd"), 2)
        );
        assert_eq!(app.image, "registry/web:1.2");
        assert!(meta.excludes("sidecar") && !meta.excludes("app"));
    }

    #[test]
    fn hamis_allocation_annotation_is_read_against_init_containers_and_containers() {
        let uuid = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
        let p = pod(serde_json::json!({
            "metadata": {"name": "p", "uid": "u", "annotations": {
                "hami.io/vgpu-devices-allocated": format!(";{uuid},NVIDIA,8000,30:;"),
                "hami.io/vgpu-devices-to-allocate": ";;"}},
            "spec": {"initContainers": [{"name": "fetch"}], "containers": [{"name": "main"}]}
        }));
        let meta = from_pod(&p, |_| false).unwrap();
        assert!(meta.annotations.is_empty(), "kept parsed, not as text");
        let grants = meta.hami.unwrap().unwrap();
        assert_eq!(grants.keys().collect::<Vec<_>>(), ["main"], "the init container's entry comes first (HAMi v2.9 on)");
        assert_eq!(grants["main"][0].memory_mib, 8000);
        let mut broken = p.clone();
        broken.metadata.annotations.as_mut().unwrap().insert(hami::ALLOCATED.into(), "GPU-x,NVIDIA".into());
        assert!(from_pod(&broken, |_| false).unwrap().hami.unwrap().is_err());
        assert_eq!(from_pod(&pod(serde_json::json!({"metadata": {"name": "p", "uid": "u"}})), |_| false).unwrap().hami, None);
    }

    #[test]
    fn cronjob_jobs_name_both_the_job_and_the_cronjob() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "nightly-29123456-abcde", "uid": "u", "namespace": "ml",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-29123456", "uid": "j", "controller": true}]}
        }));
        let w = from_pod(&p, |_| false).unwrap().workload.unwrap();
        assert_eq!((w.kind, w.name.as_str(), w.job.as_deref()), (WorkloadKind::CronJob, "nightly", Some("nightly-29123456")));
        let plain = pod(
            serde_json::json!({"metadata": {"name": "p", "uid": "u", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "train-once", "uid": "j", "controller": true}]}}),
        );
        assert_eq!(from_pod(&plain, |_| false).unwrap().workload.unwrap().kind, WorkloadKind::Job);
    }

    #[test]
    fn statefulset_daemonset_and_unowned_pods() {
        for (kind, expected) in
            [("StatefulSet", Some(WorkloadKind::StatefulSet)), ("DaemonSet", Some(WorkloadKind::DaemonSet)), ("Node", None)]
        {
            let p = pod(
                serde_json::json!({"metadata": {"name": "p", "uid": "u", "ownerReferences": [{"apiVersion": "v1", "kind": kind, "name": "w", "uid": "o", "controller": true}]}}),
            );
            assert_eq!(from_pod(&p, |_| false).unwrap().workload.map(|w| w.kind), expected, "{kind}");
        }
        let exclude = pod(serde_json::json!({"metadata": {"name": "p", "uid": "u", "annotations": {"nodelens.io/exclude": "true"}}}));
        assert!(from_pod(&exclude, |k| k.starts_with("nodelens.io/")).unwrap().excludes("any"));
    }
}
