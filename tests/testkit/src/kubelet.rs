//! Writes container logs the way the container runtime and the kubelet do:
//! `<pods_dir>/<ns>_<pod>_<uid>/<container>/<restart>.log`, rotated by renaming to
//! `<restart>.log.<YYYYmmdd-HHMMSS>`, a new live file opened, older rotations compressed to
//! `.gz` through a `.tmp` file, and the oldest removed beyond `max_files`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// One container's log directory, as the runtime and kubelet manage it.
pub struct ContainerLog {
    dir: PathBuf,
    restart: u32,
    live: File,
    /// Rotated file names, oldest first.
    rotated: Vec<String>,
    /// Files kept, the live one included (kubelet's `containerLogMaxFiles`).
    pub max_files: usize,
    clock: u64,
    /// Next nanosecond timestamp handed out.
    nanos: u64,
}

impl ContainerLog {
    /// Creates the directories and the live file of `restart`.
    pub fn create(pods_dir: &Path, namespace: &str, pod: &str, uid: &str, container: &str, restart: u32) -> io::Result<ContainerLog> {
        let dir = pods_dir.join(format!("{namespace}_{pod}_{uid}")).join(container);
        fs::create_dir_all(&dir)?;
        let live = open_append(&dir.join(format!("{restart}.log")))?;
        Ok(ContainerLog { dir, restart, live, rotated: Vec::new(), max_files: 5, clock: 0, nanos: 0 })
    }

    /// The container's log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the live file.
    pub fn live_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.restart))
    }

    /// A fresh, strictly increasing RFC 3339 timestamp.
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
