//! The `gpu` section: GPU metrics from NVML.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, Switch};

/// GPU metrics from NVML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// `auto`: on when NVML loads.
    pub enabled: Switch,
    /// Path to `libnvidia-ml.so.1`; empty = the system's.
    pub nvml_library: String,
    /// Extended resource names that are GPUs or GPU slices.
    pub resource_prefixes: Vec<String>,
    /// How often NVML is sampled.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: Switch::Auto,
            nvml_library: String::new(),
            resource_prefixes: vec!["nvidia.com/gpu".into(), "nvidia.com/mig-".into()],
            poll_interval: Duration::from_secs(5),
        }
    }
}
