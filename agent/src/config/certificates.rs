//! The `certificates` section: certificate expiry checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

/// Certificate expiry checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertificatesConfig {
    /// Globs (`**` allowed) of PEM files, or kubeconfigs with embedded certificates, whose
    /// expiry is exported.
    pub paths: Vec<String>,
    /// How often the files are read again.
    #[serde(with = "duration")]
    pub interval: Duration,
}

impl Default for CertificatesConfig {
    fn default() -> Self {
        CertificatesConfig { paths: Vec::new(), interval: Duration::from_secs(300) }
    }
}
