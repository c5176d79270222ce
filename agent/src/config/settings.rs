//! What [`Config::validate`](super::Config::validate) makes of a config: the config itself,
//! plus everything in it that is parsed or compiled (keys, globs, regexes, rules), once, so
//! that no part of the agent parses them again.

use std::ops::Deref;

use globset::GlobSet;

use super::{Config, LogMetric, Multiline};
use crate::identity::resolve::Key;

/// A validated config and its compiled parts. Dereferences to the [`Config`] it came from.
#[derive(Debug, Clone)]
pub struct Settings {
    pub(super) config: Config,
    /// `kubernetes.app_keys`, parsed.
    pub app_keys: Vec<Key>,
    /// `kubernetes.user_keys`, parsed.
    pub user_keys: Vec<Key>,
    /// `logs.exclude_namespaces`, compiled.
    pub exclude_namespaces: GlobSet,
    /// `logs.multiline`, compiled.
    pub multiline: Vec<Multiline>,
    /// `logs.log_metrics`, compiled.
    pub log_metrics: Vec<LogMetric>,
    /// With `kubernetes.events.enabled`: the Lease and this agent's name in the election.
    pub events: Option<EventsIdentity>,
}

/// The Events election as this agent takes part in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsIdentity {
    /// The Lease's name (`kubernetes.events.lease_name`).
    pub lease: String,
    /// The Lease's namespace, the agent's own (`POD_NAMESPACE`).
    pub namespace: String,
    /// The agent's pod name (`POD_NAME`): the Lease's `holderIdentity` while it leads.
    pub holder: String,
}

impl Settings {
    /// The config as written (with the values validation derived, such as `node_name`).
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl Deref for Settings {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}
