//! The `kubernetes` section: pod metadata from the API server.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, Switch};

/// Pod metadata from the Kubernetes API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// `auto`: on when in-cluster config or a kubeconfig is found.
    pub enabled: Switch,
    /// Kubeconfig path; empty = in-cluster, then `$KUBECONFIG`.
    pub kubeconfig: String,
    /// Ordered keys that name a pod's application (`label:K`, `annotation:K`, `namespace_label:K`, `owner`).
    pub app_keys: Vec<String>,
    /// Ordered keys that name a pod's user.
    pub user_keys: Vec<String>,
    /// Also watch namespaces for their `nodelens.io/exclude` annotation (needs list/watch on
    /// namespaces). Namespaces are watched anyway when a key is `namespace_label:`.
    pub watch_namespaces: bool,
    /// The kubelet's pod-resources gRPC socket.
    pub pod_resources_socket: PathBuf,
    /// How long log reading waits at start for the first pod list, so every record carries
    /// its pod's metadata and `nodelens.io/exclude` holds from the first record. Past it (the
    /// API unreachable) records ship with metadata from their paths; the files on disk are
    /// the buffer meanwhile.
    #[serde(with = "duration")]
    pub metadata_wait: Duration,
    /// How long a request to the API server may go without a byte of its answer: a list the
    /// server accepted but never answers, or a watch gone silent, is then retried (and shows
    /// in `nodelens_kubernetes_watch_up`) instead of hanging. Watches ask the server to end
    /// them sooner (five sixths of it), so a healthy watch is never idle this long.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Kubernetes Events shipped to the log sinks by one agent of the cluster at a time.
    pub events: EventsConfig,
}

/// The cluster's Events (`kubernetes.events`): one agent, elected through a Lease, lists and
/// watches them and ships each version as a record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Take part in the election and, while elected, ship Events (needs `POD_NAME` and
    /// `POD_NAMESPACE` from the downward API, events list/watch, pods get, and leases
    /// get/create/update in the agent's namespace).
    pub enabled: bool,
    /// The `coordination.k8s.io/v1` Lease in the agent's namespace (`POD_NAMESPACE`) that
    /// elects the agent shipping Events.
    pub lease_name: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { enabled: false, lease_name: "nodelens-events".into() }
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: Switch::Auto,
            kubeconfig: String::new(),
            app_keys: ["label:app.kubernetes.io/name", "label:app", "label:k8s-app", "owner"].map(String::from).to_vec(),
            user_keys: ["label:user", "annotation:kubesphere.io/creator", "label:owner", "namespace_label:user"].map(String::from).to_vec(),
            watch_namespaces: false,
            pod_resources_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
            metadata_wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            events: EventsConfig::default(),
        }
    }
}
