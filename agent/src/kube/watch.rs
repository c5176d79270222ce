//! One watch of the pods on this node (`fieldSelector=spec.nodeName=<node>`), and of
//! namespaces when a key needs their labels. kube-runtime's watcher does the protocol: list,
//! then watch from the list's resourceVersion with bookmarks, relist on 410 Gone. Never a GET
//! per pod.
//!
//! A failed request ends the watch: it is marked down (`nodelens_kubernetes_watch_up`), and
//! started again with a fresh list after a [`Retry`] delay of at most [`RETRY_MAX`]. The list
//! is what tells the API is back (a resumed watch that brings no event would not), and it
//! brings the pods created during the outage, whose events were never received.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::meta::{self, PodMeta};
use super::store::{self, PodStore};
use crate::shutdown::Shutdown;

/// Says whether a deleted pod's log files are still on disk (its metadata is then kept).
pub type KeepDeleted = Arc<dyn Fn(&PodMeta) -> bool + Send + Sync>;

/// Labels of `nodelens_kubernetes_watch_up`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// `pods` or `namespaces`.
    pub resource: &'static str,
}

/// The first delay before a watch is started again.
const RETRY_MIN: Duration = Duration::from_millis(250);
/// The longest: the API back, the agent learns of pods created meanwhile within this (plus a
/// list), not half a minute later as with kube-runtime's default backoff.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// Delays between attempts: doubling from [`RETRY_MIN`] to [`RETRY_MAX`], each drawn between
/// half and all of its step so a fleet of agents does not reconnect in step after an API
/// restart. Reset by a successful list.
#[derive(Debug)]
pub struct Retry {
    step: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry { step: RETRY_MIN }
    }
}

impl Retry {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(RETRY_MAX);
        step.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// A list went through: the next failure starts from the shortest delay again.
    pub fn reset(&mut self) {
        self.step = RETRY_MIN;
    }
}

/// Whether one watch is up, in its gauge and in the log (one warning per outage).
struct Health {
    resource: &'static str,
    gauge: Gauge,
    down_since: Option<Instant>,
}

impl Health {
    fn new(resource: &'static str, up: &Family<WatchLabels, Gauge>) -> Health {
        let gauge = up.get_or_create(&WatchLabels { resource }).clone();
        gauge.set(0);
        Health { resource, gauge, down_since: None }
    }

    fn up(&mut self) {
        self.gauge.set(1);
        if let Some(since) = self.down_since.take() {
            tracing::info!(resource = self.resource, down_for = ?since.elapsed(), "Kubernetes watch back");
        }
    }

    fn down(&mut self, error: &watcher::Error) {
        self.gauge.set(0);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(resource = self.resource, error = %error, retry_within = ?RETRY_MAX, "Kubernetes watch failed; retrying");
        } else {
            tracing::debug!(resource = self.resource, error = %error, "Kubernetes watch still failing");
        }
    }
}

/// The watches' settings: the server ends each watch after five sixths of the client's read
/// timeout (`kubernetes.request_timeout`), so a healthy watch always has a byte to read within
/// it and only a stalled one times out (and is retried with a fresh list).
pub fn watcher_config(request_timeout: Duration) -> watcher::Config {
    let secs = (request_timeout.as_secs() * 5 / 6).clamp(1, 290);
    watcher::Config::default().timeout(u32::try_from(secs).unwrap_or(290))
}

/// Watches this node's pods into `store` until shutdown; every 10 s drops deleted pods that
/// `keep` no longer holds. `up` gets the `pods` series, 0 until the first list.
pub async fn pods(
    client: Client,
    watcher: watcher::Config,
    node: String,
    store: Arc<PodStore>,
    keep: KeepDeleted,
    up: Family<WatchLabels, Gauge>,
    mut shutdown: Shutdown,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher.fields(&format!("spec.nodeName={node}"));
    let mut health = Health::new("pods", &up);
    let mut retry = Retry::default();
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    let reduce = |pod: &Pod| meta::from_pod(pod, |a| store.wants_annotation(a));
    loop {
        let stream = watcher::watcher(api.clone(), config.clone());
        futures_util::pin_mut!(stream);
        let mut listed = Vec::new();
        let error = loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(Event::Init)) => listed.clear(),
                    Some(Ok(Event::InitApply(pod))) => listed.extend(reduce(&pod)),
                    Some(Ok(Event::InitDone)) => {
                        tracing::info!(pods = listed.len(), node = %node, "pod list received");
                        store.relist(std::mem::take(&mut listed));
                        store.set_watch_up(true);
                        health.up();
                        retry.reset();
                    }
                    Some(Ok(Event::Apply(pod))) => {
                        if let Some(p) = reduce(&pod) {
                            store.apply(p);
                        }
                    }
                    Some(Ok(Event::Delete(pod))) => {
                        if let Some(uid) = pod.metadata.uid.as_deref() {
                            store.delete(uid);
                        }
                    }
                    Some(Err(e)) => break e,
                    None => return,
                },
                _ = prune.tick() => {
                    let (store, keep) = (store.clone(), keep.clone());
                    // `keep` looks at the disk.
                    let _ = tokio::task::spawn_blocking(move || store.prune(Instant::now(), &*keep)).await;
                }
                _ = shutdown.recv() => return,
            }
        };
        store.set_watch_up(false);
        health.down(&error);
        tokio::select! {
            _ = tokio::time::sleep(retry.next_delay()) => {}
            _ = shutdown.recv() => return,
        }
    }
}

/// Watches namespaces (labels and the exclude annotation) into `store` until shutdown. `up`
/// gets the `namespaces` series, 0 until the first list. Without a first list after `wait`
/// (`kubernetes.metadata_wait`), says once that records go on without namespace labels.
pub async fn namespaces(
    client: Client,
    watcher: watcher::Config,
    store: Arc<PodStore>,
    wait: Duration,
    up: Family<WatchLabels, Gauge>,
    shutdown: Shutdown,
) {
    // Said once, `wait` after the start, while the watch goes on.
    let give_up = async {
        tokio::time::sleep(wait).await;
        warn_unlisted(&store, wait);
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = watch_namespaces(client, watcher, &store, up, shutdown) => {}
        _ = give_up => {}
    }
}

async fn watch_namespaces(
    client: Client,
    watcher: watcher::Config,
    store: &PodStore,
    up: Family<WatchLabels, Gauge>,
    mut shutdown: Shutdown,
) {
    let api: Api<Namespace> = Api::all(client);
    let mut health = Health::new("namespaces", &up);
    let mut retry = Retry::default();
    loop {
        let stream = watcher::watcher(api.clone(), watcher.clone());
        futures_util::pin_mut!(stream);
        let mut listed = std::collections::HashSet::new();
        let error = loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = shutdown.recv() => return,
            };
            match event {
                Some(Ok(Event::Init)) => listed.clear(),
                Some(Ok(Event::Apply(ns))) => apply_namespace(store, &ns),
                Some(Ok(Event::InitApply(ns))) => {
                    apply_namespace(store, &ns);
                    listed.extend(ns.metadata.name);
                }
                Some(Ok(Event::Delete(ns))) => {
                    if let Some(name) = ns.metadata.name.as_deref() {
                        store.delete_namespace(name);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    // A relist after an outage or a 410: what it no longer lists is gone.
                    store.relist_namespaces(&std::mem::take(&mut listed));
                    store.namespaces_listed();
                    health.up();
                    retry.reset();
                }
                Some(Err(e)) => break e,
                None => return,
            }
        };
        health.down(&error);
        tokio::select! {
            _ = tokio::time::sleep(retry.next_delay()) => {}
            _ = shutdown.recv() => return,
        }
    }
}

/// `kubernetes.metadata_wait` has passed since the watches started: says so where the
/// namespaces have not been listed (records go on without them from now).
fn warn_unlisted(store: &PodStore, wait: Duration) {
    if store.namespaces_missing() {
        tracing::warn!(waited = ?wait, "no namespace list from the Kubernetes API yet; reading logs and shipping Events without namespace labels (a user named by one is missing, namespace exclusion cannot be honoured until it arrives)");
    }
}

fn apply_namespace(store: &PodStore, ns: &Namespace) {
    let Some(name) = ns.metadata.name.as_deref() else { return };
    let annotations = ns.metadata.annotations.clone().unwrap_or_default();
    store.apply_namespace(name, store::namespace_meta(ns.metadata.labels.clone().unwrap_or_default(), &annotations));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_five_seconds_with_jitter_and_start_over_after_a_list() {
        let mut retry = Retry::default();
        let delays: Vec<Duration> = (0..12).map(|_| retry.next_delay()).collect();
        let steps = [250, 500, 1000, 2000, 4000, 5000, 5000, 5000, 5000, 5000, 5000, 5000];
        for (delay, step) in delays.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(*delay >= step / 2 && *delay <= step, "{delay:?} against a step of {step:?}");
        }
        assert!(delays.iter().all(|d| *d <= RETRY_MAX));
        let late: std::collections::HashSet<Duration> = delays[6..].iter().copied().collect();
        assert!(late.len() > 1, "jittered, not all equal: {late:?}");
        retry.reset();
        assert!(retry.next_delay() <= RETRY_MIN);
    }

    async fn wait_for(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn deleted_namespaces_leave_the_store_on_their_event_and_on_a_relist() {
        use nodelens_testkit::kubernetes::{namespace, FakeApiServer};
        use serde_json::json;

        let api = FakeApiServer::start();
        for name in ["team-a", "team-b", "team-c"] {
            api.apply(namespace(name, json!({"owner": "carol"}), json!({})));
        }
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&api.kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        let client = Client::try_from(config).unwrap();
        let store = Arc::new(PodStore::new(Vec::new(), Vec::new(), Family::default()));
        let (stop, _) = tokio::sync::broadcast::channel(1);
        let watch = tokio::spawn(namespaces(
            client,
            watcher_config(Duration::from_secs(60)),
            store.clone(),
            Duration::from_secs(60),
            Family::default(),
            Shutdown::new(stop.subscribe()),
        ));
        wait_for("the first list", || store.namespace_names() == ["team-a", "team-b", "team-c"]).await;

        api.delete("Namespace", "", "team-b");
        wait_for("the DELETED event to remove team-b", || store.namespace_names() == ["team-a", "team-c"]).await;

        // A deletion whose event never arrives: the relist after a 410 Gone reconciles it.
        api.apply(namespace("team-d", json!({}), json!({})));
        api.delete_unannounced("Namespace", "", "team-c");
        api.compact();
        api.drop_watches();
        wait_for("the relist to drop team-c", || store.namespace_names() == ["team-a", "team-d"]).await;

        stop.send(()).unwrap();
        watch.await.unwrap();
    }
}
