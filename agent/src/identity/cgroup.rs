//! Which container a host process belongs to, from `/proc/<pid>/cgroup`: the pod UID and the
//! runtime's container id, for cgroup v1 and v2, the systemd and cgroupfs drivers, containerd
//! (`cri-containerd-<id>.scope`), CRI-O (`crio-<id>.scope`) and docker (`docker-<id>.scope`),
//! every QoS class, and paths seen through a cgroup namespace (leading `/..`).

/// A process's container.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerCgroup {
    /// The pod's UID, dashed.
    pub pod_uid: String,
    /// The runtime's container id (64 hex digits).
    pub container_id: String,
}

/// Parses the contents of `/proc/<pid>/cgroup`; `None` for processes outside Kubernetes pods
/// (and for CRI-O's conmon, which lives beside the container).
pub fn parse(contents: &str) -> Option<ContainerCgroup> {
    contents.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        parse_path(path)
    })
}

fn parse_path(path: &str) -> Option<ContainerCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty() && *s != "..").collect();
    if !segments.iter().any(|s| s.starts_with("kubepods")) {
        return None;
    }
    let container_id = container_id(segments.last()?)?;
    let pod_uid = segments.iter().rev().find_map(|s| pod_uid(s))?;
    Some(ContainerCgroup { pod_uid, container_id })
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, or a bare `<id>`.
fn container_id(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"].iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let at = name.rfind("pod")?;
    let uid = &name[at + 3..];
    let valid = uid.len() >= 32 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
    valid.then(|| uid.replace('_', "-"))
}

/// The agent's own pod: `POD_UID` (the DaemonSet passes `metadata.uid`), else the pod named
/// by the agent's own cgroup, `<proc_root>/self/cgroup`, else by the kubelet's per-pod
/// directory in its mounts (`/var/lib/kubelet/pods/<uid>/...` for `/etc/hosts` and volumes),
/// which a cgroup namespace does not hide. `None` outside a pod.
pub fn own_pod_uid(proc_root: &std::path::Path) -> Option<String> {
    if let Some(uid) = std::env::var("POD_UID").ok().filter(|u| !u.trim().is_empty()) {
        return Some(uid.trim().to_string());
    }
    let read = |name: &str| std::fs::read_to_string(proc_root.join("self").join(name)).ok();
    read("cgroup").and_then(|c| parse(&c)).map(|c| c.pod_uid).or_else(|| read("mountinfo").and_then(|m| pod_uid_in_mounts(&m)))
}

/// The pod UID in a kubelet pod directory named by `/proc/<pid>/mountinfo`.
fn pod_uid_in_mounts(mountinfo: &str) -> Option<String> {
    mountinfo.split_whitespace().find_map(|field| {
        let (_, rest) = field.split_once("/kubelet/pods/")?;
        let uid = rest.split('/').next()?;
        let valid = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        valid.then(|| uid.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1d5c3e2b1a09887766554433221100ffeeddccbbaa99887766554433221100";
    const UID: &str = "6f1c2d3e-0000-4a5b-9c8d-111111111111";

    fn expected() -> Option<ContainerCgroup> {
        Some(ContainerCgroup { pod_uid: UID.into(), container_id: ID.into() })
    }

    #[test]
    fn every_driver_runtime_and_qos_class_is_recognised() {
        let u = UID.replace('-', "_");
        let cases = [
            format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n"),
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{ID}.scope\n"),
            format!("0::/kubepods.slice/kubepods-pod{u}.slice/docker-{ID}.scope\n"),
            format!("0::/kubepods/burstable/pod{UID}/{ID}\n"),
            format!("0::/kubepods/pod{UID}/{ID}\n"),
            format!("12:pids:/kubepods/besteffort/pod{UID}/{ID}\n11:memory:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n"),
            format!("5:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n"),
            format!("0::/../../kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n"),
        ];
        for case in cases {
            assert_eq!(parse(&case), expected(), "{case}");
        }
    }

    #[test]
    fn host_processes_and_conmon_are_not_containers() {
        for case in [
            "0::/system.slice/containerd.service\n".to_string(),
            "0::/init.scope\n".to_string(),
            "0::/user.slice/user-1000.slice/session-3.scope\n".to_string(),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-conmon-{ID}.scope\n",
                UID.replace('-', "_")
            ),
            format!("0::/kubepods/burstable/pod{UID}\n"),
            String::new(),
        ] {
            assert_eq!(parse(&case), None, "{case}");
        }
    }

    #[test]
    fn the_agents_own_pod_is_found_in_its_cgroup_or_its_mounts() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("self")).unwrap();
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        std::fs::write(root.path().join("self/cgroup"), systemd).unwrap();
        assert_eq!(own_pod_uid(root.path()).as_deref(), Some(UID));
        // Behind a cgroup namespace the path is `/`; the kubelet's pod directory still shows.
        std::fs::write(root.path().join("self/cgroup"), "0::/\n").unwrap();
        let mounts = format!(
            "1210 1190 0:27 / / rw - overlay overlay rw\n1225 1190 253:1 /var/lib/kubelet/pods/{UID}/etc-hosts /etc/hosts rw - ext4 /dev/vda1 rw\n"
        );
        std::fs::write(root.path().join("self/mountinfo"), mounts).unwrap();
        assert_eq!(own_pod_uid(root.path()).as_deref(), Some(UID));
        std::fs::write(root.path().join("self/mountinfo"), "1210 1190 0:27 / / rw - overlay overlay rw\n").unwrap();
        assert_eq!(own_pod_uid(root.path()), None, "a host process is in no pod");
    }
}
