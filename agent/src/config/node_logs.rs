//! The `node_logs` section: the node's own logs (journal, kernel ring).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Switch;

/// The node's own logs, shipped like container logs (same sinks, checkpoints, exactly once).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeLogsConfig {
    /// The host's systemd journal (kubelet, container runtime).
    pub journald: JournaldConfig,
    /// The kernel ring (`/dev/kmsg`): driver errors such as GPU XIDs, OOM kills.
    pub kernel: KernelConfig,
}

/// The host's systemd journal, read through `journalctl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournaldConfig {
    /// `auto`: on when a journal is found under `path` (or `/run/log/journal`).
    pub enabled: Switch,
    /// The host's journal directory (`<path>/<machine-id>/*.journal`); when it holds no
    /// journal, `/run/log/journal` (a volatile journal) is read instead.
    pub path: PathBuf,
    /// Units shipped (`_SYSTEMD_UNIT`); empty = every entry of the journal.
    pub units: Vec<String>,
}

impl Default for JournaldConfig {
    fn default() -> Self {
        JournaldConfig {
            enabled: Switch::Auto,
            path: PathBuf::from("/var/log/journal"),
            units: ["kubelet.service", "containerd.service", "crio.service", "docker.service"].map(String::from).to_vec(),
        }
    }
}

/// The kernel ring buffer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// `auto`: on when `path` can be opened for reading (it needs `CAP_SYSLOG` where
    /// `kernel.dmesg_restrict` is set).
    pub enabled: Switch,
    /// The kernel's record device: one record per read,
    /// `<prio>,<seq>,<usec since boot>,<flags>;<text>` with indented continuation lines.
    pub path: PathBuf,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig { enabled: Switch::Auto, path: PathBuf::from("/dev/kmsg") }
    }
}
