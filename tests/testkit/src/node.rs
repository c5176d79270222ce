//! A node's directories for one end-to-end test: a temporary root holding `pods/` (the
//! kubelet's log tree), `state/` (the agent's `state_dir`) and the agent's config file.

use std::path::PathBuf;

use crate::kubelet::ContainerLog;

/// A node's temporary root with an empty `pods/`.
pub struct Node {
    /// The root; removed when the node is dropped.
    pub dir: tempfile::TempDir,
}

impl Node {
    /// A fresh root with `pods/`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pods")).unwrap();
        Node { dir }
    }

    /// `name` under the root.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The kubelet's `pods/` directory.
    pub fn pods(&self) -> PathBuf {
        self.path("pods")
    }

    /// The agent's `state_dir`.
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Starts `container` of pod `pod` (namespace `ml`, uid `uid-<pod>`), restart 0.
    pub fn container(&self, pod: &str, container: &str) -> ContainerLog {
        ContainerLog::create(&self.pods(), "ml", pod, &format!("uid-{pod}"), container, 0).unwrap()
    }
}
