//! The `host` section: the host's paths as the agent sees them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

/// Paths of the host as the agent sees them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The host's `/proc` (the pod runs with `hostPID`); tests point it at a fake tree.
    pub proc_root: PathBuf,
    /// How often host processes are scanned (container `/dev/shm` sizes).
    #[serde(with = "duration")]
    pub scan_interval: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig { proc_root: PathBuf::from("/proc"), scan_interval: Duration::from_secs(30) }
    }
}
