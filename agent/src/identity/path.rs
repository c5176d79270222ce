//! What the kubelet's directory layout says about a log file:
//! `<pods_dir>/<namespace>_<pod>_<uid>/<container>/<restart>.log[.<YYYYmmdd-HHMMSS>[.gz]]`.

use std::path::{Path, PathBuf};

/// The container instance a log file belongs to, read from its path alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerRef {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container name.
    pub container: String,
    /// The kubelet's restart count: `<restart>.log`.
    pub restart: u32,
}

/// Where a file stands in its container's rotation chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Generation {
    /// Renamed away at this time (`YYYYmmddHHMMSS` as a number), plain or gzip-compressed.
    Rotated {
        /// Rotation time; orders rotated files oldest first.
        at: u64,
        /// The kubelet has compressed it (`.gz`).
        gzip: bool,
    },
    /// `<restart>.log`, the file the runtime writes now. Sorts after every rotation.
    Live,
}

impl Generation {
    /// Whether the content is gzip-compressed.
    pub fn is_gzip(self) -> bool {
        matches!(self, Generation::Rotated { gzip: true, .. })
    }
}

/// Parses a pod directory name `<namespace>_<pod>_<uid>`. Namespaces and pod names are DNS
/// names and cannot contain `_`, so the split is unambiguous.
pub fn parse_pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.splitn(3, '_');
    let (ns, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    (!ns.is_empty() && !pod.is_empty() && !uid.is_empty() && !uid.contains('_')).then_some((ns, pod, uid))
}

/// A pod's log directory, `<pods_dir>/<namespace>_<pod>_<uid>`.
pub fn pod_dir(pods_dir: &Path, namespace: &str, pod: &str, uid: &str) -> PathBuf {
    pods_dir.join(format!("{namespace}_{pod}_{uid}"))
}

/// Parses a log file name into its restart count and generation. Everything else in a
/// container directory (the kubelet's `.tmp` files mid-compression, strangers) yields `None`.
pub fn parse_file_name(name: &str) -> Option<(u32, Generation)> {
    let (restart, rest) = name.split_once(".log")?;
    let restart: u32 = restart.parse().ok()?;
    if rest.is_empty() {
        return Some((restart, Generation::Live));
    }
    let rest = rest.strip_prefix('.')?;
    let (stamp, gzip) = match rest.strip_suffix(".gz") {
        Some(stamp) => (stamp, true),
        None => (rest, false),
    };
    let (date, time) = stamp.split_once('-')?;
    let all_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(date, 8) || !all_digits(time, 6) {
        return None;
    }
    let at = format!("{date}{time}").parse().ok()?;
    Some((restart, Generation::Rotated { at, gzip }))
}

/// Reads a log file's container from its path relative to `pods_dir`.
pub fn parse(pods_dir: &Path, file: &Path) -> Option<(ContainerRef, Generation)> {
    let rel = file.strip_prefix(pods_dir).ok()?;
    let mut parts = rel.iter().map(|p| p.to_str());
    let (pod_dir, container, name) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    let (namespace, pod, pod_uid) = parse_pod_dir(pod_dir)?;
    let (restart, generation) = parse_file_name(name)?;
    Some((
        ContainerRef { namespace: namespace.into(), pod: pod.into(), pod_uid: pod_uid.into(), container: container.into(), restart },
        generation,
    ))
}

/// The parts of a kubelet container symlink name, `<pod>_<namespace>_<container>-<id>.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerLink<'a> {
    /// Pod name.
    pub pod: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Container name.
    pub container: &'a str,
    /// The runtime's container id.
    pub id: &'a str,
}

/// Parses a symlink name of the kubelet's `containers_dir`. Pod, namespace and container
/// names are DNS names without `_`; the id is the 64 hex digits after the last `-`.
pub fn parse_container_link(name: &str) -> Option<ContainerLink<'_>> {
    let (rest, id) = name.strip_suffix(".log")?.rsplit_once('-')?;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut parts = rest.splitn(3, '_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    (!pod.is_empty() && !namespace.is_empty() && !container.is_empty() && !container.contains('_')).then_some(ContainerLink {
        pod,
        namespace,
        container,
        id,
    })
}

/// Finds a container id (64 hex digits) in a path, as docker's
/// `/var/lib/docker/containers/<id>/<id>-json.log` and the kubelet's
/// `/var/log/containers/<pod>_<ns>_<container>-<id>.log` both carry one.
pub fn container_id_in(path: &str) -> Option<&str> {
    let bytes = path.as_bytes();
    let mut run = 0;
    for (i, b) in bytes.iter().enumerate() {
        if b.is_ascii_hexdigit() && !b.is_ascii_uppercase() {
            run += 1;
            let ends = bytes.get(i + 1).is_none_or(|n| !n.is_ascii_hexdigit());
            if run == 64 && ends {
                return Some(&path[i + 1 - 64..=i]);
            }
        } else {
            run = 0;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_file_names_parse_into_restart_and_generation() {
        assert_eq!(parse_file_name("0.log"), Some((0, Generation::Live)));
        assert_eq!(parse_file_name("3.log"), Some((3, Generation::Live)));
        assert_eq!(parse_file_name("0.log.20261122-031640"), Some((0, Generation::Rotated { at: 20261122031640, gzip: false })));
        assert_eq!(parse_file_name("1.log.20261122-031640.gz"), Some((1, Generation::Rotated { at: 20261122031640, gzip: true })));
    }

    #[test]
    fn compression_temporaries_and_strangers_are_ignored() {
        for name in ["0.log.20261122-031640.tmp", "0.log.20261122-031640.gz.tmp", "x.log", "0.log.old", "0.txt", "0.log.2026-1122"] {
            assert_eq!(parse_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn rotated_files_sort_oldest_first_and_live_last() {
        let mut gens: Vec<Generation> = ["0.log", "0.log.20261122-031702.gz", "0.log.20261122-031801", "0.log.20261121-235959.gz"]
            .iter()
            .map(|n| parse_file_name(n).unwrap().1)
            .collect();
        gens.sort();
        assert_eq!(gens[0], Generation::Rotated { at: 20261121235959, gzip: true });
        assert_eq!(gens[3], Generation::Live);
    }

    #[test]
    fn full_path_yields_pod_and_container() {
        let (c, g) = parse(Path::new("/var/log/pods"), Path::new("/var/log/pods/ml_trainer-0_0f3c-11aa/worker/2.log")).unwrap();
        assert_eq!((c.namespace.as_str(), c.pod.as_str(), c.pod_uid.as_str()), ("ml", "trainer-0", "0f3c-11aa"));
        assert_eq!((c.container.as_str(), c.restart, g), ("worker", 2, Generation::Live));
        assert!(parse(Path::new("/var/log/pods"), Path::new("/var/log/pods/not-a-pod-dir/c/0.log")).is_none());
        assert!(parse(Path::new("/var/log/pods"), Path::new("/var/log/pods/a_b_c/c/d/0.log")).is_none());
    }

    #[test]
    fn kubelet_container_links_parse_into_their_parts() {
        let id = "4f1d5c3e2b1a09887766554433221100ffeeddccbbaa99887766554433221100";
        let name = format!("web-7d9f8b6c5d-x2k4p_prod_app-server-{id}.log");
        assert_eq!(
            parse_container_link(&name),
            Some(ContainerLink { pod: "web-7d9f8b6c5d-x2k4p", namespace: "prod", container: "app-server", id })
        );
        assert_eq!(parse_container_link("pod_ns_c-abc.log"), None, "short id");
        assert_eq!(parse_container_link(&format!("pod_ns-{id}.log")), None, "no container");
        assert_eq!(parse_container_link(&format!("pod_ns_c-{id}.txt")), None);
    }

    #[test]
    fn container_ids_are_found_in_runtime_paths() {
        let id = "4f1d5c3e2b1a09887766554433221100ffeeddccbbaa99887766554433221100";
        assert_eq!(container_id_in(&format!("/var/lib/docker/containers/{id}/{id}-json.log")), Some(id));
        assert_eq!(container_id_in(&format!("/var/log/containers/web-1_ns_app-{id}.log")), Some(id));
        assert_eq!(container_id_in("/var/log/pods/ns_pod_uid/c/0.log"), None);
        assert_eq!(container_id_in(&format!("/x/{id}0/y")), None, "65 digits is not an id");
    }
}
