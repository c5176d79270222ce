//! `nodelens_container_shm_bytes{namespace,pod,container,app,user}`, refreshed every
//! `host.scan_interval`: the container's identity from the pod store when the API is there,
//! else from the kubelet's log directories (`<ns>_<pod>_<uid>`) and container symlinks.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::cgroup::ContainerCgroup;
use super::shm;
use crate::kube::store::PodStore;
use crate::logs::path;
use crate::shutdown::Shutdown;

/// Labels of `nodelens_container_shm_bytes`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShmLabels {
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

/// Where to look things up.
pub struct Sources {
    /// The host's `/proc`.
    pub proc_root: PathBuf,
    /// The kubelet's pod log directory, for names without the API.
    pub pods_dir: PathBuf,
    /// The kubelet's container symlinks, for container names without the API.
    pub containers_dir: PathBuf,
    /// Pod metadata, when the API is there.
    pub pods: Option<Arc<PodStore>>,
}

/// What the kubelet's directories say without the API, read once per refresh: pods by UID,
/// container names by id.
#[derive(Default)]
struct PathIndex {
    pods: HashMap<String, (String, String)>,
    containers: HashMap<String, String>,
}

impl PathIndex {
    fn read(sources: &Sources) -> PathIndex {
        let names = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir).map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect()).unwrap_or_default()
        };
        let pods = names(&sources.pods_dir)
            .iter()
            .filter_map(|n| path::parse_pod_dir(n).map(|(ns, pod, uid)| (uid.to_string(), (ns.to_string(), pod.to_string()))))
            .collect();
        let containers = names(&sources.containers_dir)
            .iter()
            .filter_map(|n| path::parse_container_link(n).map(|l| (l.id.to_string(), l.container.to_string())))
            .collect();
        PathIndex { pods, containers }
    }
}

/// Names a container found through `/proc`; `None` when it belongs to no known pod.
/// `index` is read on first need only: with the API it usually is not.
fn labels_for(container: &ContainerCgroup, sources: &Sources, index: &mut Option<PathIndex>) -> Option<ShmLabels> {
    if let Some(pod) = sources.pods.as_ref().and_then(|s| s.get(&container.pod_uid)) {
        let id = Some(container.container_id.as_str());
        let name = pod.containers.iter().find(|c| c.id.as_deref() == id || c.last_id.as_deref() == id).map(|c| c.name.clone());
        return Some(ShmLabels {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: name.unwrap_or_default(),
            app: pod.app.clone(),
            user: pod.user.clone(),
        });
    }
    let index = index.get_or_insert_with(|| PathIndex::read(sources));
    let (namespace, pod) = index.pods.get(&container.pod_uid)?.clone();
    Some(ShmLabels {
        container: index.containers.get(&container.container_id).cloned().unwrap_or_default(),
        app: pod.clone(),
        user: String::new(),
        namespace,
        pod,
    })
}

/// One refresh: sets the sizes found and removes series of containers gone.
pub fn refresh(sources: &Sources, family: &Family<ShmLabels, Gauge>, previous: &HashSet<ShmLabels>) -> HashSet<ShmLabels> {
    let mut current = HashSet::new();
    let mut index = None;
    for (container, bytes) in shm::scan(&sources.proc_root) {
        if let Some(labels) = labels_for(&container, sources, &mut index) {
            family.get_or_create(&labels).set(bytes as i64);
            current.insert(labels);
        }
    }
    for gone in previous.difference(&current) {
        family.remove(gone);
    }
    current
}

/// Refreshes every `interval` until shutdown.
pub async fn run(sources: Sources, interval: Duration, family: Family<ShmLabels, Gauge>, shutdown: Shutdown) {
    crate::periodic::every(interval, "shm scan", shutdown, move |previous| refresh(&sources, &family, &previous)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "cccc5c3e2b1a09887766554433221100ffeeddccbbaa99887766554433221100";
    const UID: &str = "6f1c2d3e-0000-4a5b-9c8d-333333333333";

    #[test]
    fn without_the_api_names_come_from_the_log_layout_and_gone_containers_drop_out() {
        let root = tempfile::tempdir().unwrap();
        let proc_root = root.path().join("proc/4242");
        std::fs::create_dir_all(&proc_root).unwrap();
        std::fs::write(proc_root.join("cgroup"), format!("0::/kubepods/burstable/pod{UID}/{ID}\n")).unwrap();
        std::fs::write(proc_root.join("mountinfo"), "1 0 0:1 / /dev/shm rw - tmpfs shm rw,size=65536k\n").unwrap();
        std::fs::create_dir_all(root.path().join(format!("pods/ml_trainer-0_{UID}/main"))).unwrap();
        std::fs::create_dir_all(root.path().join("containers")).unwrap();
        std::os::unix::fs::symlink("/dev/null", root.path().join(format!("containers/trainer-0_ml_main-{ID}.log"))).unwrap();
        let sources = Sources {
            proc_root: root.path().join("proc"),
            pods_dir: root.path().join("pods"),
            containers_dir: root.path().join("containers"),
            pods: None,
        };
        let family = Family::default();
        let exported = refresh(&sources, &family, &HashSet::new());
        let labels = ShmLabels {
            namespace: "ml".into(),
            pod: "trainer-0".into(),
            container: "main".into(),
            app: "trainer-0".into(),
            user: String::new(),
        };
        assert_eq!(exported, HashSet::from([labels.clone()]));
        assert_eq!(family.get_or_create(&labels).get(), 64 << 20);

        std::fs::remove_dir_all(&proc_root).unwrap();
        assert!(refresh(&sources, &family, &exported).is_empty(), "the process is gone");
    }
}
