//! Wakes the tailer thread: inotify reports which pod directories changed (bounded; an
//! overflow turns into a full rescan), and shutdown is one more reason to wake.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};

use crate::identity::path::Generation;
use notify::{EventKind, RecursiveMode, Watcher};

/// More distinct directories than this between two tailer passes become a full rescan.
const MAX_DIRTY: usize = 4096;

/// What happened since the tailer last looked.
#[derive(Debug, Default)]
pub struct Changes {
    /// Pod directories whose files were created, renamed or removed.
    pub rescan: HashSet<PathBuf>,
    /// Pod directories whose files were written to.
    pub written: HashSet<PathBuf>,
    /// Live log files (`<restart>.log`) renamed away, with how often: rotations, counted so
    /// files created and deleted between two looks are noticed (see the tailer).
    pub renamed: HashMap<PathBuf, u64>,
    /// Too many changes to list, or the watcher lost events: rescan everything.
    pub rescan_all: bool,
    /// Stop.
    pub shutdown: bool,
}

/// A condition variable over pending [`Changes`].
#[derive(Default)]
pub struct Wake {
    changes: Mutex<Changes>,
    signal: Condvar,
}

impl Wake {
    /// Asks the tailer to stop.
    pub fn shutdown(&self) {
        self.changes.lock().unwrap().shutdown = true;
        self.signal.notify_all();
    }

    /// Waits up to `timeout` for something to happen and takes what did.
    pub fn wait(&self, timeout: Duration) -> Changes {
        let mut changes = self.changes.lock().unwrap();
        if changes.rescan.is_empty() && changes.written.is_empty() && !changes.rescan_all && !changes.shutdown {
            changes = self.signal.wait_timeout(changes, timeout).unwrap().0;
        }
        let shutdown = changes.shutdown;
        let taken = std::mem::take(&mut *changes);
        changes.shutdown = shutdown;
        taken
    }

    fn note_rename(&self, live: &Path) {
        let mut changes = self.changes.lock().unwrap();
        // Beyond the bound renames go uncounted: files lost then are missed, never invented.
        if changes.renamed.len() < MAX_DIRTY || changes.renamed.contains_key(live) {
            *changes.renamed.entry(live.to_path_buf()).or_default() += 1;
        }
    }

    fn note(&self, pod_dir: Option<PathBuf>, structural: bool) {
        let mut changes = self.changes.lock().unwrap();
        match pod_dir {
            Some(dir) if changes.rescan.len() + changes.written.len() < MAX_DIRTY => {
                if structural {
                    changes.rescan.insert(dir);
                } else {
                    changes.written.insert(dir);
                }
            }
            _ => changes.rescan_all = true,
        }
        self.signal.notify_all();
    }
}

/// Watches `pods_dir` recursively and feeds `wake`. `None` where inotify is unavailable or
/// the directory does not exist yet; the periodic rescan covers for it.
pub fn watch(pods_dir: &Path, wake: std::sync::Arc<Wake>) -> Option<notify::RecommendedWatcher> {
    let root = pods_dir.to_path_buf();
    let handler = move |event: notify::Result<notify::Event>| match event {
        // Opens and reads are the tailer's own (a rescan opens pods_dir): waking on them
        // would make every scan trigger the next. Only a writer's close says anything.
        Ok(event) if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write)) => {}
        Ok(event) => {
            let structural = !matches!(event.kind, EventKind::Modify(notify::event::ModifyKind::Data(_)) | EventKind::Access(_));
            if event.need_rescan() {
                wake.note(None, true);
            }
            if matches!(event.kind, EventKind::Modify(ModifyKind::Name(RenameMode::From))) {
                let live = |p: &&PathBuf| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(crate::identity::path::parse_file_name)
                        .is_some_and(|(_, g)| g == Generation::Live)
                };
                for path in event.paths.iter().filter(live) {
                    wake.note_rename(path);
                }
            }
            for path in &event.paths {
                let pod_dir = path.strip_prefix(&root).ok().and_then(|rel| rel.iter().next()).map(|first| root.join(first));
                // No pod directory (an event on pods_dir itself): rescan everything.
                wake.note(pod_dir, structural);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "inotify error; falling back to a full rescan");
            wake.note(None, true);
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; relying on periodic rescans");
            return None;
        }
    };
    match watcher.watch(pods_dir, RecursiveMode::Recursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            if pods_dir.is_dir() {
                tracing::warn!(dir = %pods_dir.display(), error = %e, "cannot watch pods_dir (inotify limit?); new lines wait for the periodic rescan until it works");
            } else {
                tracing::debug!(dir = %pods_dir.display(), error = %e, "cannot watch pods_dir yet");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_the_watched_tree_does_not_wake_the_tailer() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("ml_train-0_uid");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("0.log"), "x\n").unwrap();
        let wake = std::sync::Arc::new(Wake::default());
        let _watcher = watch(dir.path(), wake.clone()).expect("inotify works here");
        for _ in 0..3 {
            let _ = std::fs::read_dir(dir.path()).unwrap().count();
            let _ = std::fs::read(pod.join("0.log")).unwrap();
        }
        let changes = wake.wait(Duration::from_millis(300));
        assert!(!changes.rescan_all && changes.rescan.is_empty() && changes.written.is_empty(), "{changes:?}");

        std::fs::write(pod.join("0.log"), "x\ny\n").unwrap();
        let changes = wake.wait(Duration::from_secs(5));
        assert!(
            changes.written.contains(&pod) || changes.rescan.contains(&pod) || changes.rescan_all,
            "a write still wakes it: {changes:?}"
        );
    }

    #[test]
    fn renames_of_live_files_are_counted_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let container = dir.path().join("ml_train-0_uid/main");
        std::fs::create_dir_all(&container).unwrap();
        let wake = std::sync::Arc::new(Wake::default());
        let _watcher = watch(dir.path(), wake.clone()).expect("inotify works here");
        for i in 0..3 {
            std::fs::write(container.join("0.log"), "x\n").unwrap();
            std::fs::rename(container.join("0.log"), container.join(format!("0.log.20261122-00000{i}"))).unwrap();
        }
        std::fs::rename(container.join("0.log.20261122-000000"), container.join("0.log.20261122-000000.gz")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let changes = wake.wait(Duration::from_secs(5));
        assert_eq!(changes.renamed.get(&container.join("0.log")), Some(&3), "{changes:?}");
        assert_eq!(changes.renamed.len(), 1, "a rotated file renamed is no rotation: {changes:?}");
    }
}
