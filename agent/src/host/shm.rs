//! The size of each running container's `/dev/shm`, seen through a process of it
//! (`/proc/<pid>`, with hostPID): training pods die with "bus error" when it is the 64 MiB
//! default. The size comes from the mount's `size=` option in `/proc/<pid>/mountinfo`, or
//! from `statvfs` of `/proc/<pid>/root/dev/shm` when the option is absent.

use std::collections::HashMap;
use std::path::Path;

use crate::identity::cgroup::{self, ContainerCgroup};

/// `/dev/shm` sizes by container, from one pass over `proc_root`.
pub fn scan(proc_root: &Path) -> HashMap<ContainerCgroup, u64> {
    let mut sizes = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return sizes };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let pid_dir = entry.path();
        let Some(container) = std::fs::read_to_string(pid_dir.join("cgroup")).ok().and_then(|c| cgroup::parse(&c)) else { continue };
        if sizes.contains_key(&container) {
            continue;
        }
        if let Some(size) = shm_size(&pid_dir) {
            sizes.insert(container, size);
        }
    }
    sizes
}

/// The `/dev/shm` size of the process whose `/proc` directory is `pid_dir`.
fn shm_size(pid_dir: &Path) -> Option<u64> {
    let mountinfo = std::fs::read_to_string(pid_dir.join("mountinfo")).ok()?;
    let options = mountinfo.lines().find_map(shm_mount_options)?;
    options.split(',').find_map(|o| o.strip_prefix("size=")).and_then(parse_size).or_else(|| statvfs_size(&pid_dir.join("root/dev/shm")))
}

/// The super options of a mountinfo line whose mount point is `/dev/shm`.
fn shm_mount_options(line: &str) -> Option<&str> {
    // <id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fs> <source> <super options>
    let mut fields = line.split_whitespace();
    let mount_point = fields.nth(4)?;
    if mount_point != "/dev/shm" {
        return None;
    }
    let (_, after) = line.split_once(" - ")?;
    after.split_whitespace().nth(2)
}

/// `65536k`, `64m`, `1g` or plain bytes, as tmpfs writes them.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().ok()?;
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return None,
    };
    Some(n * multiplier)
}

fn statvfs_size(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-parameter of the right type.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_blocks as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "aaaa5c3e2b1a09887766554433221100ffeeddccbbaa99887766554433221100";
    const ID_B: &str = "bbbb5c3e2b1a09887766554433221100ffeeddccbbaa99887766554433221100";
    const UID: &str = "6f1c2d3e-0000-4a5b-9c8d-111111111111";

    fn process(root: &Path, pid: u32, cgroup: &str, shm_options: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        let mountinfo = format!(
            "1200 1100 0:120 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/x\n1210 1200 0:125 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm {shm_options}\n"
        );
        std::fs::write(dir.join("mountinfo"), mountinfo).unwrap();
    }

    #[test]
    fn shm_sizes_come_from_the_mount_options_of_one_process_per_container() {
        let root = tempfile::tempdir().unwrap();
        process(root.path(), 100, &format!("0::/kubepods/burstable/pod{UID}/{ID_A}\n"), "rw,size=65536k,inode64");
        process(root.path(), 101, &format!("0::/kubepods/burstable/pod{UID}/{ID_A}\n"), "rw,size=65536k,inode64");
        process(root.path(), 200, &format!("0::/kubepods/burstable/pod{UID}/{ID_B}\n"), "rw,size=8g");
        process(root.path(), 1, "0::/init.scope\n", "rw,size=1k");
        std::fs::create_dir_all(root.path().join("self")).unwrap();
        let sizes = scan(root.path());
        assert_eq!(sizes.len(), 2);
        assert_eq!(sizes[&ContainerCgroup { pod_uid: UID.into(), container_id: ID_A.into() }], 64 << 20);
        assert_eq!(sizes[&ContainerCgroup { pod_uid: UID.into(), container_id: ID_B.into() }], 8 << 30);
    }

    #[test]
    fn without_a_size_option_the_filesystem_is_asked() {
        let root = tempfile::tempdir().unwrap();
        process(root.path(), 300, &format!("0::/kubepods/pod{UID}/{ID_A}\n"), "rw,inode64");
        std::fs::create_dir_all(root.path().join("300/root/dev/shm")).unwrap();
        let sizes = scan(root.path());
        assert!(sizes.values().next().copied().unwrap_or(0) > 0, "statvfs of the process's /dev/shm");
    }

    #[test]
    fn sizes_parse_as_tmpfs_writes_them() {
        assert_eq!(parse_size("65536k"), Some(64 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("10%"), None);
    }
}
