//! Writes container logs the way the container runtime and the kubelet do, through a node's
//! whole day: `<pods_dir>/<ns>_<pod>_<uid>/<container>/<restart>.log`, created empty when the
//! container starts and written when the process logs; rotated by renaming to
//! `<restart>.log.<YYYYmmdd-HHMMSS>`, a new live file opened, older rotations compressed to
//! `.gz` through a `.tmp` file, and the oldest removed beyond `max_files`; on a restart the
//! previous instance's files kept beside the new `<restart+1>.log` (for `kubectl logs
//! --previous`) and older instances' files removed; truncated in place (copytruncate, `> 0.log`);
//! and the whole pod directory removed when the pod is deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A pod's log directory, `<pods_dir>/<ns>_<pod>_<uid>`, with one directory per container.
pub struct PodLogs {
    dir: PathBuf,
    namespace: String,
    name: String,
    uid: String,
}

impl PodLogs {
    /// Creates the pod's directory, as the kubelet does when the pod is admitted.
    pub fn create(pods_dir: &Path, namespace: &str, name: &str, uid: &str) -> io::Result<PodLogs> {
        let dir = pods_dir.join(format!("{namespace}_{name}_{uid}"));
        fs::create_dir_all(&dir)?;
        Ok(PodLogs { dir, namespace: namespace.to_string(), name: name.to_string(), uid: uid.to_string() })
    }

    /// Starts a container: its directory and an empty `0.log`, written when the process logs.
    pub fn start_container(&self, container: &str) -> io::Result<ContainerLog> {
        ContainerLog::open_instance(self.dir.join(container), 0)
    }

    /// The pod's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's UID.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The pod was deleted: the kubelet removes its whole log directory, every container's
    /// files with it.
    pub fn delete(self) -> io::Result<()> {
        fs::remove_dir_all(&self.dir)
    }
}

/// One container's log directory, as the runtime and kubelet manage it.
pub struct ContainerLog {
    dir: PathBuf,
    restart: u32,
    live: File,
    /// Rotated file names of the running instance, oldest first.
    rotated: Vec<String>,
    /// Files kept, the live one included (kubelet's `containerLogMaxFiles`).
    pub max_files: usize,
    clock: u64,
    /// Next nanosecond timestamp handed out.
    nanos: u64,
}

impl ContainerLog {
    /// Creates the directories and the (empty) live file of `restart`.
    pub fn create(pods_dir: &Path, namespace: &str, pod: &str, uid: &str, container: &str, restart: u32) -> io::Result<ContainerLog> {
        ContainerLog::open_instance(pods_dir.join(format!("{namespace}_{pod}_{uid}")).join(container), restart)
    }

    fn open_instance(dir: PathBuf, restart: u32) -> io::Result<ContainerLog> {
        fs::create_dir_all(&dir)?;
        let live = open_append(&dir.join(format!("{restart}.log")))?;
        Ok(ContainerLog { dir, restart, live, rotated: Vec::new(), max_files: 5, clock: 0, nanos: 0 })
    }

    /// The container's log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pod's log directory (the container directory's parent).
    pub fn pod_dir(&self) -> &Path {
        self.dir.parent().expect("a container directory sits in a pod directory")
    }

    /// Path of the live file.
    pub fn live_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.restart))
    }

    /// The running instance: how often the container was restarted.
    pub fn restart_count(&self) -> u32 {
        self.restart
    }

    /// Names of the files in the container's directory, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// A fresh, strictly increasing RFC 3339 timestamp (also across restarts and truncations,
    /// so no two files of the container start with the same line).
    pub fn timestamp(&mut self) -> String {
        self.nanos += 1;
        let secs = self.nanos / 1_000_000;
        format!("2026-11-22T{:02}:{:02}:{:02}.{:09}Z", (secs / 3600) % 24, (secs / 60) % 60, secs % 60, self.nanos % 1_000_000_000)
    }

    /// Appends one whole CRI record.
    pub fn write_cri(&mut self, stream: &str, message: &str) -> io::Result<()> {
        let line = format!("{} {stream} F {message}\n", self.timestamp());
        self.live.write_all(line.as_bytes())
    }

    /// Appends raw bytes (partial parts, garbage, invalid UTF-8).
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.live.write_all(bytes)
    }

    /// Rotates as the kubelet does: rename the live file, reopen, compress all rotations but
    /// the newest, and remove the oldest beyond `max_files`.
    pub fn rotate(&mut self) -> io::Result<()> {
        self.clock += 1;
        let stamp = format!("20261122-{:06}", self.clock);
        let rotated = format!("{}.log.{stamp}", self.restart);
        fs::rename(self.live_path(), self.dir.join(&rotated))?;
        self.live = open_append(&self.live_path())?;
        for name in self.rotated.iter_mut() {
            if !name.ends_with(".gz") {
                compress(&self.dir, name)?;
                name.push_str(".gz");
            }
        }
        self.rotated.push(rotated);
        while self.rotated.len() + 1 > self.max_files {
            let oldest = self.rotated.remove(0);
            fs::remove_file(self.dir.join(oldest))?;
        }
        Ok(())
    }

    /// The container exited and the kubelet started the next instance: the runtime creates an
    /// empty `<restart+1>.log`; the exited instance's files stay for `kubectl logs --previous`,
    /// and the container garbage collector removes the files of every instance before it.
    /// Called in a loop, this is a crash loop.
    pub fn restart(&mut self) -> io::Result<()> {
        let previous = self.restart;
        for name in self.files() {
            let instance = name.split('.').next().and_then(|n| n.parse::<u32>().ok());
            if instance.is_some_and(|n| n < previous) {
                fs::remove_file(self.dir.join(name))?;
            }
        }
        self.restart += 1;
        self.rotated.clear();
        self.live = open_append(&self.live_path())?;
        Ok(())
    }

    /// Truncates the live file in place, as logrotate's `copytruncate` or a shell's `> 0.log`
    /// does: same path, same inode, size 0; the runtime's next write lands at offset 0.
    pub fn truncate(&mut self) -> io::Result<()> {
        self.live.set_len(0)
    }

    /// The pod was deleted: the kubelet removes its whole log directory.
    pub fn delete_pod(self) -> io::Result<()> {
        fs::remove_dir_all(self.pod_dir())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The kubelet's compressLog: gzip into `<name>.tmp`, rename to `<name>.gz`, remove `<name>`.
fn compress(dir: &Path, name: &str) -> io::Result<()> {
    let plain = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut encoder = flate2::write::GzEncoder::new(File::create(&tmp)?, flate2::Compression::default());
    io::copy(&mut File::open(&plain)?, &mut encoder)?;
    encoder.finish()?.sync_all()?;
    fs::rename(&tmp, dir.join(format!("{name}.gz")))?;
    fs::remove_file(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_keeps_the_previous_instance_and_removes_older_ones() {
        let root = tempfile::tempdir().unwrap();
        let pod = PodLogs::create(root.path(), "ml", "train", "uid-1").unwrap();
        let mut log = pod.start_container("main").unwrap();
        assert_eq!(log.files(), ["0.log"], "created empty at start");
        assert_eq!(fs::metadata(log.live_path()).unwrap().len(), 0);
        log.write_cri("stdout", "a").unwrap();
        log.rotate().unwrap();
        log.restart().unwrap();
        assert_eq!(log.files(), ["0.log", "0.log.20261122-000001", "1.log"]);
        log.write_cri("stdout", "b").unwrap();
        log.restart().unwrap();
        assert_eq!(log.files(), ["1.log", "2.log"], "instance 0 collected, 1 kept for --previous");
        assert_eq!(log.restart_count(), 2);
        log.write_cri("stdout", "c").unwrap();
        log.truncate().unwrap();
        log.write_cri("stdout", "d").unwrap();
        let text = fs::read_to_string(log.live_path()).unwrap();
        assert!(text.ends_with(" stdout F d\n") && text.lines().count() == 1, "{text}");
        pod.delete().unwrap();
        assert!(!root.path().join("ml_train_uid-1").exists());
    }
}
