//! `nodelens_container_shm_bytes{namespace,pod,container,app,user}`, refreshed every
//! `host.scan_interval`, containers named by [`crate::identity::names`].

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::shm;
use crate::identity::ContainerLabels;
use crate::kube::Names;
use crate::shutdown::Shutdown;

/// Where to look things up.
pub struct Sources {
    /// The host's `/proc`.
    pub proc_root: PathBuf,
    /// How containers are named.
    pub names: Names,
}

/// One refresh: sets the sizes found and removes series of containers gone.
pub fn refresh(
    sources: &Sources,
    family: &Family<ContainerLabels, Gauge>,
    previous: &HashSet<ContainerLabels>,
) -> HashSet<ContainerLabels> {
    let mut current = HashSet::new();
    let mut lookup = sources.names.lookup();
    for (container, bytes) in shm::scan(&sources.proc_root) {
        if let Some(labels) = lookup.by_cgroup(&container) {
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
pub async fn run(sources: Sources, interval: Duration, family: Family<ContainerLabels, Gauge>, shutdown: Shutdown) {
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
        let names = Names { pods_dir: root.path().join("pods"), containers_dir: root.path().join("containers"), pods: None };
        let sources = Sources { proc_root: root.path().join("proc"), names };
        let family = Family::default();
        let exported = refresh(&sources, &family, &HashSet::new());
        let labels = ContainerLabels {
            namespace: "ml".into(),
            pod: "trainer-0".into(),
            container: "main".into(),
            app: "trainer".into(),
            user: String::new(),
        };
        assert_eq!(exported, HashSet::from([labels.clone()]));
        assert_eq!(family.get_or_create(&labels).get(), 64 << 20);

        std::fs::remove_dir_all(&proc_root).unwrap();
        assert!(refresh(&sources, &family, &exported).is_empty(), "the process is gone");
    }
}
