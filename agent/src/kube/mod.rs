//! Pod metadata from the Kubernetes API: who runs each container on this node (application,
//! user, workload, labels), for log enrichment and metric attribution. Without a cluster the
//! agent runs on what log paths say.

pub mod hami;
pub mod meta;
pub mod store;
pub mod watch;

use std::sync::Arc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::{KubernetesConfig, Switch};
use crate::shutdown::Shutdown;

use self::meta::PodMeta;
use self::store::PodStore;
use crate::identity::names::{self, NamedPod, PodDirectory};
use crate::identity::ContainerLabels;

/// Container names looked up in the pod store, else in the kubelet's directories.
pub type Names = names::Names<PodStore>;

/// One round of [`Names`] lookups.
pub type Lookup<'a> = names::Lookup<'a, PodStore>;

impl PodDirectory for PodStore {
    type Pod = PodMeta;

    fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        PodStore::get(self, uid)
    }

    fn by_name(&self) -> std::collections::HashMap<(String, String), Arc<PodMeta>> {
        PodStore::by_name(self)
    }

    fn is_deleted(&self, uid: &str) -> bool {
        PodStore::is_deleted(self, uid)
    }
}

impl NamedPod for PodMeta {
    fn labels(&self, container: String) -> ContainerLabels {
        ContainerLabels {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            container,
            app: self.app.clone(),
            user: self.user.clone(),
        }
    }

    fn container_name(&self, id: &str) -> Option<String> {
        let id = Some(id);
        self.containers.iter().find(|c| c.id.as_deref() == id || c.last_id.as_deref() == id).map(|c| c.name.clone())
    }
}

/// Connects to the API server: `kubernetes.kubeconfig` when set, else in-cluster, else
/// `$KUBECONFIG`. `None` when `enabled: auto` finds no cluster; an error when `enabled: true`
/// cannot connect.
pub async fn connect(config: &KubernetesConfig) -> anyhow::Result<Option<kube::Client>> {
    if config.enabled == Switch::Off {
        return Ok(None);
    }
    let found = if !config.kubeconfig.is_empty() {
        let kubeconfig = kube::config::Kubeconfig::read_from(&config.kubeconfig)
            .map_err(|e| anyhow::anyhow!("kubernetes.kubeconfig {}: {e}", config.kubeconfig))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.map_err(anyhow::Error::from)
    } else {
        match kube::Config::incluster() {
            Ok(c) => Ok(c),
            Err(in_cluster) => kube::Config::from_kubeconfig(&Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("not in a cluster ({in_cluster}) and no kubeconfig ({e})")),
        }
    };
    match (found, config.enabled) {
        (Ok(mut c), _) => {
            // A list the server accepted but never answers would otherwise hang forever.
            c.read_timeout = Some(config.request_timeout);
            c.reset_reader_on_write = true;
            Ok(Some(kube::Client::try_from(c)?))
        }
        (Err(e), Switch::On) => Err(e.context("kubernetes.enabled is true")),
        (Err(e), _) => {
            tracing::info!(reason = %e, "no Kubernetes API; log metadata comes from file paths only");
            Ok(None)
        }
    }
}

/// Starts the watches feeding `store` in `tasks`: pods always, namespaces when a key needs
/// their labels or `watch_namespaces` asks for their exclude annotation. A deleted pod is kept
/// while `keep_deleted` says its log files are on disk. Each watch has its series in `up` from
/// now. A watch returns only at shutdown.
#[allow(clippy::too_many_arguments)]
pub fn start(
    tasks: &mut crate::tasks::Tasks,
    client: kube::Client,
    node: String,
    store: Arc<PodStore>,
    config: &KubernetesConfig,
    keep_deleted: watch::KeepDeleted,
    up: Family<watch::WatchLabels, Gauge>,
    shutdown: impl Fn() -> Shutdown,
) {
    let watcher = watch::watcher_config(config.request_timeout);
    let namespaces = config.watch_namespaces || store.needs_namespaces();
    store.wait_for_lists(config.metadata_wait, namespaces);
    let pods = watch::pods(client.clone(), watcher.clone(), node, store.clone(), keep_deleted, up.clone(), shutdown());
    tasks.spawn("pod watch", async move {
        pods.await;
        Ok(())
    });
    if namespaces {
        let namespaces = watch::namespaces(client, watcher, store, config.metadata_wait, up, shutdown());
        tasks.spawn("namespace watch", async move {
            namespaces.await;
            Ok(())
        });
    }
}
