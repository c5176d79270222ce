//! Checkpoints: for every file, the offset before which every record has been acknowledged
//! by every sink; for the node's own logs, the journal cursor and the kernel ring's boot and
//! sequence number. Written atomically (temp file, fsync, rename, fsync of the directory) so a
//! crash leaves either the old or the new file, never a torn one.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::source::FileId;

const FILE_NAME: &str = "checkpoints.json";
/// The version written: one more than the number of [`MIGRATIONS`].
const VERSION: u32 = MIGRATIONS.len() as u32 + 1;

/// One step of the upgrade path: a file of version `n` (the step's position + 1), as JSON,
/// turned into version `n + 1`.
type Migration = fn(serde_json::Value) -> Result<serde_json::Value, String>;

/// The upgrade path. A change of the file's shape appends a step here (which bumps
/// [`VERSION`]), so the file of any earlier release is read with every offset kept, never
/// read again from the start (which would send everything twice to every sink that cannot
/// drop duplicates). Fields added with a default (as the node positions were) need no step.
const MIGRATIONS: &[Migration] = &[];

/// Why a checkpoint file cannot be used.
#[derive(Debug)]
enum Unreadable {
    /// Not JSON, or not the shape of its version.
    Corrupt(String),
    /// Written by a later release (a rollback): kept aside for it.
    Newer(u64),
}

/// Reads a checkpoint file of any version up to the current one, through `migrations`.
fn parse(bytes: &[u8], migrations: &[Migration]) -> Result<OnDisk, Unreadable> {
    let current = migrations.len() as u64 + 1;
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Unreadable::Corrupt(e.to_string()))?;
    let version = value.get("version").and_then(serde_json::Value::as_u64).ok_or_else(|| Unreadable::Corrupt("no version".into()))?;
    if version == 0 {
        return Err(Unreadable::Corrupt("version 0".into()));
    }
    if version > current {
        return Err(Unreadable::Newer(version));
    }
    for (from, step) in (version..).zip(&migrations[(version - 1) as usize..]) {
        value = step(value).map_err(|e| Unreadable::Corrupt(format!("upgrading from version {from}: {e}")))?;
        value["version"] = (from + 1).into();
    }
    serde_json::from_value(value).map_err(|e| Unreadable::Corrupt(e.to_string()))
}

/// A checkpoint store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("state_dir {path}: {source}")]
pub struct CheckpointError {
    /// The directory or file involved.
    pub path: PathBuf,
    /// The I/O failure.
    pub source: io::Error,
}

/// What is known about one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Every record starting before this offset (uncompressed bytes) is acknowledged.
    pub offset: u64,
    /// Where the file was when last read; for people reading the state file.
    pub path: PathBuf,
}

/// Where the node's own logs are acknowledged up to. Files written before node logs existed
/// have none: they read as empty positions (the journal and the ring read from their start).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodePositions {
    /// The journal cursor of the last acknowledged entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_cursor: Option<String>,
    /// The last acknowledged kernel record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelPosition>,
}

/// A kernel record's place: sequence numbers restart at every boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelPosition {
    /// `/proc/sys/kernel/random/boot_id` of the boot the record belongs to.
    pub boot_id: String,
    /// The record's sequence number.
    pub seq: u64,
}

/// One acknowledged position of a node log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePosition {
    /// A journal entry's cursor.
    Journal(String),
    /// A kernel record.
    Kernel(KernelPosition),
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    files: HashMap<String, Entry>,
    #[serde(default, skip_serializing_if = "is_default")]
    node: NodePositions,
}

fn is_default(node: &NodePositions) -> bool {
    *node == NodePositions::default()
}

/// The checkpoint table, shared by the tailer (which reads it) and the acknowledgement
/// tracker (which advances it).
pub struct Checkpoints {
    dir: PathBuf,
    table: Mutex<Table>,
    /// An exclusive `flock` on `state_dir/.lock`, held for the agent's life: two agents on
    /// one state directory (a DaemonSet handing a node over, two installs) would read every
    /// file twice and overwrite each other's checkpoints.
    _lock: File,
}

#[derive(Default)]
struct Table {
    entries: HashMap<FileId, Entry>,
    node: NodePositions,
    dirty: bool,
}

impl Checkpoints {
    /// Opens (creating) `state_dir` and loads its checkpoints. A file that does not parse is
    /// moved aside and reading starts over: records may be sent twice, none is lost.
    pub fn open(state_dir: &Path) -> Result<Checkpoints, CheckpointError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError { path, source }
        };
        fs::create_dir_all(state_dir).map_err(err(state_dir))?;
        let file = state_dir.join(FILE_NAME);
        let probe = state_dir.join(".write-test");
        File::create(&probe).and_then(|_| fs::remove_file(&probe)).map_err(err(state_dir))?;
        let lock = lock(state_dir).map_err(err(state_dir))?;
        let (mut entries, mut node) = (HashMap::new(), NodePositions::default());
        match fs::read(&file) {
            Ok(bytes) => match parse(&bytes, MIGRATIONS) {
                Ok(on_disk) => {
                    entries = on_disk.files.into_iter().filter_map(|(k, v)| Some((k.parse().ok()?, v))).collect();
                    node = on_disk.node;
                }
                Err(Unreadable::Newer(version)) => {
                    // A rollback: the file stays for the release that wrote it.
                    let aside = state_dir.join(format!("{FILE_NAME}.v{version}"));
                    tracing::warn!(file = %file.display(), version, known = VERSION, moved_to = %aside.display(), "checkpoint file of a later release; reading all files from the start");
                    fs::rename(&file, &aside).map_err(err(&file))?;
                }
                Err(Unreadable::Corrupt(e)) => {
                    let aside = state_dir.join(format!("{FILE_NAME}.corrupt"));
                    tracing::error!(file = %file.display(), error = %e, moved_to = %aside.display(), "checkpoint file does not parse; reading all files from the start");
                    fs::rename(&file, &aside).map_err(err(&file))?;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&file)(e)),
        }
        Ok(Checkpoints { dir: state_dir.to_path_buf(), table: Mutex::new(Table { entries, node, dirty: false }), _lock: lock })
    }

    /// The acknowledged offset of `id`, if it was ever acknowledged.
    pub fn offset(&self, id: FileId) -> Option<u64> {
        self.table.lock().unwrap().entries.get(&id).map(|e| e.offset)
    }

    /// Records that everything before `offset` in `id` is acknowledged. Offsets only move forward.
    pub fn acknowledge(&self, id: FileId, offset: u64, path: &Path) {
        let mut table = self.table.lock().unwrap();
        let entry = table.entries.entry(id).or_insert_with(|| Entry { offset: 0, path: path.to_path_buf() });
        if offset > entry.offset || entry.path != path {
            entry.offset = entry.offset.max(offset);
            entry.path = path.to_path_buf();
            table.dirty = true;
        }
    }

    /// Where the node's logs are acknowledged up to.
    pub fn node_positions(&self) -> NodePositions {
        self.table.lock().unwrap().node.clone()
    }

    /// Records that a node log is acknowledged up to `position`. Callers acknowledge in read
    /// order; a kernel record of another boot replaces the old boot's position.
    pub fn acknowledge_node(&self, position: NodePosition) {
        let mut table = self.table.lock().unwrap();
        let changed = match position {
            NodePosition::Journal(cursor) => table.node.journal_cursor.replace(cursor.clone()) != Some(cursor),
            NodePosition::Kernel(kernel) => {
                let forward = table.node.kernel.as_ref().is_none_or(|old| old.boot_id != kernel.boot_id || kernel.seq > old.seq);
                if forward {
                    table.node.kernel = Some(kernel);
                }
                forward
            }
        };
        table.dirty |= changed;
    }

    /// Drops the checkpoint of a file that no longer exists.
    pub fn forget(&self, id: FileId) {
        let mut table = self.table.lock().unwrap();
        if table.entries.remove(&id).is_some() {
            table.dirty = true;
        }
    }

    /// Every checkpoint, for start-up reconciliation.
    pub fn snapshot(&self) -> Vec<(FileId, Entry)> {
        self.table.lock().unwrap().entries.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Writes the table if it changed since the last write; `Ok` means the file on disk holds
    /// every acknowledged offset.
    pub fn persist(&self) -> io::Result<()> {
        let on_disk = {
            let mut table = self.table.lock().unwrap();
            if !table.dirty {
                return Ok(());
            }
            table.dirty = false;
            OnDisk {
                version: VERSION,
                files: table.entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                node: table.node.clone(),
            }
        };
        let bytes = serde_json::to_vec(&on_disk).expect("checkpoints serialize");
        let result = write_atomically(&self.dir, FILE_NAME, &bytes);
        if result.is_err() {
            self.table.lock().unwrap().dirty = true;
        }
        result
    }
}

/// Takes `dir/.lock` exclusively; an error of kind `WouldBlock` while another agent holds it.
fn lock(dir: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(".lock"))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(io::ErrorKind::WouldBlock, "another nodelens holds this state_dir")
        } else {
            e
        });
    }
    Ok(file)
}

/// Temp file, fsync, rename over the old file, fsync the directory so the rename is durable.
/// A failed attempt removes its temp file: on a full file system, a half-written one would
/// hold the space the next attempt needs.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, dir.join(name))) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> FileId {
        FileId { container: 7, fingerprint: n }
    }

    #[test]
    fn checkpoints_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(dir.path()).unwrap();
        cp.acknowledge(id(1), 100, Path::new("/p/0.log"));
        cp.acknowledge(id(2), 5, Path::new("/p/1.log"));
        cp.forget(id(2));
        cp.persist().unwrap();
        drop(cp);
        let reopened = Checkpoints::open(dir.path()).unwrap();
        assert_eq!(reopened.offset(id(1)), Some(100));
        assert_eq!(reopened.offset(id(2)), None);
        assert!(
            fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")),
            "temp file renamed away"
        );
    }

    #[test]
    fn a_second_agent_on_the_same_state_dir_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Checkpoints::open(dir.path()).unwrap();
        let err = Checkpoints::open(dir.path()).err().expect("locked");
        assert_eq!(err.source.kind(), io::ErrorKind::WouldBlock, "{err}");
        drop(first);
        assert!(Checkpoints::open(dir.path()).is_ok(), "free again once the first is gone");
    }

    #[test]
    fn offsets_never_move_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(dir.path()).unwrap();
        cp.acknowledge(id(1), 100, Path::new("/p/0.log"));
        cp.acknowledge(id(1), 40, Path::new("/p/0.log.20261122-000000"));
        assert_eq!(cp.offset(id(1)), Some(100));
        assert_eq!(cp.snapshot()[0].1.path, Path::new("/p/0.log.20261122-000000"), "path follows the rename");
    }

    #[test]
    fn a_file_written_before_node_logs_is_read_and_node_positions_are_added() {
        let dir = tempfile::tempdir().unwrap();
        let old = format!(r#"{{"version":1,"files":{{"{}":{{"offset":42,"path":"/p/0.log"}}}}}}"#, id(1));
        fs::write(dir.path().join(FILE_NAME), old).unwrap();
        let cp = Checkpoints::open(dir.path()).unwrap();
        assert_eq!(cp.offset(id(1)), Some(42), "container offsets kept");
        assert_eq!(cp.node_positions(), NodePositions::default(), "no node positions yet: read from the start");
        cp.acknowledge_node(NodePosition::Journal("s=a;i=7".into()));
        cp.acknowledge_node(NodePosition::Kernel(KernelPosition { boot_id: "b1".into(), seq: 9 }));
        cp.acknowledge_node(NodePosition::Kernel(KernelPosition { boot_id: "b1".into(), seq: 3 }));
        cp.persist().unwrap();
        drop(cp);
        let cp = Checkpoints::open(dir.path()).unwrap();
        assert_eq!(cp.offset(id(1)), Some(42));
        let node = cp.node_positions();
        assert_eq!(node.journal_cursor.as_deref(), Some("s=a;i=7"));
        assert_eq!(node.kernel, Some(KernelPosition { boot_id: "b1".into(), seq: 9 }), "a sequence never moves back within a boot");
        cp.acknowledge_node(NodePosition::Kernel(KernelPosition { boot_id: "b2".into(), seq: 0 }));
        assert_eq!(cp.node_positions().kernel, Some(KernelPosition { boot_id: "b2".into(), seq: 0 }), "a new boot replaces the old");
    }

    /// `checkpoints.json` as the release before node logs wrote it.
    const BEFORE_NODE_LOGS: &str = include_str!("testdata/checkpoints-before-node-logs.json");

    #[test]
    fn the_previous_release_file_upgrades_and_the_upgraded_file_still_reads_in_the_previous_release() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), BEFORE_NODE_LOGS).unwrap();
        let cp = Checkpoints::open(dir.path()).unwrap();
        let rotated = FileId { container: 0x9a3c_5e0d_1f2b_4c6e, fingerprint: 0x1122_3344 };
        let live = FileId { container: 0x9a3c_5e0d_1f2b_4c6e, fingerprint: 0xa1b2_c3d4 };
        assert_eq!((cp.offset(live), cp.offset(rotated)), (Some(18446), Some(1_048_576)));
        assert_eq!(cp.node_positions(), NodePositions::default());
        cp.acknowledge_node(NodePosition::Kernel(KernelPosition { boot_id: "b1".into(), seq: 9 }));
        cp.persist().unwrap();
        drop(cp);
        // A rollback to the previous release reads the file with its own shape (no
        // unknown-field check), so it keeps its container offsets.
        #[derive(serde::Deserialize)]
        struct Previous {
            version: u32,
            files: HashMap<String, Entry>,
        }
        let previous: Previous = serde_json::from_slice(&fs::read(dir.path().join(FILE_NAME)).unwrap()).unwrap();
        assert_eq!(previous.version, 1, "same version: the previous release does not discard the file");
        assert_eq!(previous.files[&live.to_string()].offset, 18446);
        assert_eq!(previous.files[&rotated.to_string()].offset, 1_048_576);
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{\"version\":1,\"files\":{tor").unwrap();
        let cp = Checkpoints::open(dir.path()).unwrap();
        assert!(cp.snapshot().is_empty());
        assert!(dir.path().join("checkpoints.json.corrupt").exists());
    }

    #[test]
    fn an_unwritable_state_dir_is_an_error_naming_it() {
        let err = Checkpoints::open(Path::new("/proc/nodelens-cannot-exist")).err().expect("must fail");
        assert!(err.to_string().contains("/proc/nodelens-cannot-exist"), "{err}");
    }

    /// `checkpoints.json` as this release writes it (version 1): three containers' files, one
    /// of them rotated and compressed, and the journal and kernel positions.
    const VERSION_1: &str = include_str!("testdata/checkpoints-v1.json");

    fn v1_offsets() -> Vec<(FileId, u64, &'static str)> {
        let pods = "/var/log/pods/ml_train-7f9c4_0b7c2a9e-5d1f-4c3a-9e8b-2f6d4a1c7e90";
        let id = |s: &str| s.parse::<FileId>().unwrap();
        vec![
            (id("53a89787361250ab-977c7f7ea778cea7"), 1_048_576, "trainer/1.log.20261204-100000.gz"),
            (id("53a89787361250ab-aa2bfe2835206bbb"), 18_446, "trainer/2.log.20261204-110000"),
            (id("53a89787361250ab-3cc78dc81696bbbe"), 7_340_032, "trainer/2.log"),
            (id("420f1a466dca4b00-2acf93667cf75294"), 0, "metrics/0.log"),
        ]
        .into_iter()
        .map(|(id, offset, file)| (id, offset, Box::leak(format!("{pods}/{file}").into_boxed_str()) as &str))
        .collect()
    }

    fn assert_v1_kept(cp: &Checkpoints) {
        for (id, offset, path) in v1_offsets() {
            assert_eq!(cp.offset(id), Some(offset), "{path}");
            assert_eq!(cp.snapshot().into_iter().find(|(i, _)| *i == id).unwrap().1.path, Path::new(path));
        }
        let notebook: FileId = "6e86a5c9d7d02bda-cd107cf665cb1f3b".parse().unwrap();
        assert_eq!(cp.offset(notebook), Some(123_456_789_012));
        assert_eq!(cp.snapshot().len(), 5);
        let node = cp.node_positions();
        assert!(node.journal_cursor.as_deref().is_some_and(|c| c.starts_with("s=8a1f0b6c") && c.ends_with(";x=9f8e7d6c5b4a3921")));
        assert_eq!(node.kernel, Some(KernelPosition { boot_id: "3f1c2b4a-5d6e-4f70-8192-a3b4c5d6e7f8".into(), seq: 48_213 }));
    }

    #[test]
    fn todays_checkpoint_file_loads_with_every_offset_and_node_position_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), VERSION_1).unwrap();
        assert_v1_kept(&Checkpoints::open(dir.path()).unwrap());
    }

    #[test]
    fn an_older_version_is_migrated_step_by_step_with_every_offset_kept() {
        // A future release: version 2 moved `files` under `containers`, version 3 moved it back
        // beside a new `events` position. Today's file goes through both steps.
        fn to_v2(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
            let files = v.as_object_mut().ok_or("not an object")?.remove("files").ok_or("no files")?;
            v["containers"] = serde_json::json!({ "files": files });
            Ok(v)
        }
        fn to_v3(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
            let containers = v.as_object_mut().ok_or("not an object")?.remove("containers").ok_or("no containers")?;
            v["files"] = containers["files"].clone();
            v["events"] = serde_json::json!({});
            Ok(v)
        }
        let migrations: [Migration; 2] = [to_v2, to_v3];
        let on_disk = parse(VERSION_1.as_bytes(), &migrations).unwrap();
        assert_eq!(on_disk.version, 3);
        for (id, offset, path) in v1_offsets() {
            assert_eq!(on_disk.files[&id.to_string()], Entry { offset, path: path.into() });
        }
        assert_eq!(on_disk.node.kernel.as_ref().map(|k| k.seq), Some(48_213));
        // A file of version 2 takes only the second step.
        let v2 = to_v2(serde_json::from_str(VERSION_1).unwrap()).unwrap();
        let mut v2 = v2;
        v2["version"] = 2.into();
        let on_disk = parse(v2.to_string().as_bytes(), &migrations).unwrap();
        assert_eq!(on_disk.files.len(), 5);
        // A step that fails is a corrupt file, never a silent start over.
        let broken: [Migration; 1] = [|_| Err("bad".into())];
        assert!(matches!(parse(VERSION_1.as_bytes(), &broken), Err(Unreadable::Corrupt(e)) if e.contains("from version 1")));
    }

    #[test]
    fn a_file_of_a_later_release_is_kept_aside_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let later = VERSION_1.replacen("\"version\":1", "\"version\":7", 1);
        fs::write(dir.path().join(FILE_NAME), &later).unwrap();
        let cp = Checkpoints::open(dir.path()).unwrap();
        assert!(cp.snapshot().is_empty(), "its shape is unknown: read from the start");
        assert_eq!(fs::read_to_string(dir.path().join("checkpoints.json.v7")).unwrap(), later, "kept for a roll forward");
    }
}
