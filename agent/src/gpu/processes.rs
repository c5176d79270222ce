//! Host PID → container, for the processes NVML reports. `/proc/<pid>/cgroup` is read once per
//! process: the answer is cached under (pid, start time), so a PID reused by a new process is
//! looked up again, and entries of processes no longer on a GPU are dropped each poll.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::identity::cgroup::{self, ContainerCgroup};

/// Resolves PIDs through `host.proc_root`.
pub struct PidResolver {
    proc_root: PathBuf,
    cache: HashMap<u32, (u64, Option<ContainerCgroup>)>,
    seen: Vec<u32>,
}

impl PidResolver {
    /// A resolver reading `proc_root` (the host's `/proc`).
    pub fn new(proc_root: PathBuf) -> PidResolver {
        PidResolver { proc_root, cache: HashMap::new(), seen: Vec::new() }
    }

    /// The container of `pid`; `None` when it runs outside a pod, or has exited and was not
    /// resolved at the last poll. (A process that exits since is still its container's: its
    /// last utilization samples come after it is gone.)
    pub fn resolve(&mut self, pid: u32) -> Option<ContainerCgroup> {
        self.seen.push(pid);
        let dir = self.proc_root.join(pid.to_string());
        let Some(started) = std::fs::read_to_string(dir.join("stat")).ok().and_then(|s| start_time(&s)) else {
            return self.cache.get(&pid).and_then(|(_, container)| container.clone());
        };
        if let Some((at, container)) = self.cache.get(&pid) {
            if *at == started {
                return container.clone();
            }
        }
        let container = std::fs::read_to_string(dir.join("cgroup")).ok().and_then(|c| cgroup::parse(&c));
        self.cache.insert(pid, (started, container.clone()));
        container
    }

    /// Forgets processes not resolved since the last call.
    pub fn end_poll(&mut self) {
        let seen: std::collections::HashSet<u32> = self.seen.drain(..).collect();
        self.cache.retain(|pid, _| seen.contains(pid));
    }

    /// Number of processes cached.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks). The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last `)`.
pub(crate) fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "abcd5c3e2b1a09887766554433221100ffeeddccbbaa99887766554433221100";
    const UID: &str = "6f1c2d3e-0000-4a5b-9c8d-444444444444";

    fn write_proc(root: &std::path::Path, pid: u32, comm: &str, started: u64, cgroup: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let stat = format!("{pid} ({comm}) S 1 1 1 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 4 0 {started} 1000 200 18446744073709551615");
        std::fs::write(dir.join("stat"), stat).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    }

    #[test]
    fn start_time_is_read_after_a_command_name_with_spaces_and_parens() {
        let stat = "77 (python3 (train) x) S 1 1 1 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 4 0 987654 1000 200";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("garbage"), None);
    }

    #[test]
    fn a_reused_pid_is_looked_up_again_and_gone_pids_are_forgotten() {
        let root = tempfile::tempdir().unwrap();
        let pod = format!("0::/kubepods/besteffort/pod{UID}/{ID}\n");
        write_proc(root.path(), 500, "python", 1000, &pod);
        let mut resolver = PidResolver::new(root.path().to_path_buf());
        let expected = ContainerCgroup { pod_uid: UID.into(), container_id: ID.into() };
        assert_eq!(resolver.resolve(500), Some(expected.clone()));

        // Same pid, same start time: the cache answers even though the file changed.
        std::fs::write(root.path().join("500/cgroup"), "0::/user.slice/session-1.scope\n").unwrap();
        assert_eq!(resolver.resolve(500), Some(expected));

        // The pid was reused by a process outside any pod.
        write_proc(root.path(), 500, "bash", 2000, "0::/user.slice/session-1.scope\n");
        assert_eq!(resolver.resolve(500), None);
        resolver.end_poll();
        assert_eq!(resolver.len(), 1);

        resolver.end_poll();
        assert!(resolver.is_empty(), "not seen in the last poll");
        assert_eq!(resolver.resolve(999), None, "no such process");
    }

    #[test]
    fn a_process_that_exits_is_its_containers_until_a_poll_no_longer_sees_it() {
        let root = tempfile::tempdir().unwrap();
        write_proc(root.path(), 500, "python", 1000, &format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"));
        let mut resolver = PidResolver::new(root.path().to_path_buf());
        let expected = ContainerCgroup { pod_uid: UID.into(), container_id: ID.into() };
        assert_eq!(resolver.resolve(500), Some(expected.clone()));
        resolver.end_poll();
        // Gone from /proc; its last samples still come.
        std::fs::remove_dir_all(root.path().join("500")).unwrap();
        assert_eq!(resolver.resolve(500), Some(expected), "its last samples are its container's");
        resolver.end_poll();
        resolver.end_poll();
        assert_eq!(resolver.resolve(500), None, "forgotten once a poll did not see it");
    }
}
