//! The cluster's Kubernetes Events into the log sinks, from one agent of the cluster at a
//! time. Every events-enabled agent takes part in the election (`lease.rs`) and exports
//! `nodelens_events_leader`; the one that leads lists and watches every Event
//! (`watch.rs`), adds the pod's metadata to a pod's Events (`pods.rs`), and hands each version
//! to the pipeline as an [`EventRecord`] (`record.rs`). The others hold no Event watch.
//!
//! Shutdown: shipping stops first (the pipeline has stopped taking records), then the Lease is
//! released so the next agent takes over without waiting for it to expire.

pub mod lease;
pub mod pods;
pub mod record;
pub mod watch;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use self::lease::{Elector, KubeLeases};
use self::pods::Pods;
pub use self::record::EventRecord;
use crate::config::EventsIdentity;
use crate::kube::store::PodStore;
use crate::kube::watch::WatchLabels;
use crate::shutdown::Shutdown;

/// Records waiting for the pipeline.
pub const QUEUE: usize = 1024;

/// Reasons that get their own series in `nodelens_kubernetes_events_total`; any other is
/// counted as `other`, so a controller inventing reasons cannot grow the series without end.
pub const REASONS: &[&str] = &[
    "BackOff",
    "Created",
    "ErrImagePull",
    "Evicted",
    "FailedAttachVolume",
    "FailedCreatePodSandBox",
    "FailedKillPod",
    "FailedMount",
    "FailedScheduling",
    "Failed",
    "ImagePullBackOff",
    "Killing",
    "NodeHasDiskPressure",
    "NodeHasInsufficientMemory",
    "NodeNotReady",
    "NodeReady",
    "OOMKilling",
    "Preempted",
    "Preempting",
    "ProbeWarning",
    "Pulled",
    "Pulling",
    "Rebooted",
    "Scheduled",
    "Started",
    "SystemOOM",
    "Unhealthy",
    "FailedCreate",
    "SuccessfulCreate",
    "SuccessfulDelete",
    "ScalingReplicaSet",
    "SawCompletedJob",
    "Completed",
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "FailedGetResourceMetric",
    "FailedComputeMetricsReplicas",
    "NetworkNotReady",
    "EvictionThresholdMet",
];

/// Labels of `nodelens_kubernetes_events_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `Normal`, `Warning` (or `other`).
    pub r#type: &'static str,
    /// One of [`REASONS`], or `other`.
    pub reason: &'static str,
}

/// `nodelens_events_leader`'s (no) labels: a family, so that an agent without Events exports
/// no series (0 would read as "no leader" in `sum by (cluster)`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaderLabels {}

/// The Events' metric handles.
#[derive(Clone, Default)]
pub struct EventMetrics {
    /// `nodelens_events_leader`: 1 while this agent holds the Lease and ships, 0 while it
    /// follows; no series on an agent without Events.
    pub leader: Family<LeaderLabels, Gauge>,
    /// `nodelens_kubernetes_events_total{type, reason}`: versions received from the watch
    /// (not from lists, so a relist or a handover counts nothing twice).
    pub events: Family<EventLabels, Counter>,
    /// `nodelens_kubernetes_event_records_total`: records handed to the sinks, listed ones
    /// included.
    pub records: Counter,
    /// `nodelens_kubernetes_event_relists_total`: lists after the first of a leadership (410
    /// Gone, a broken watch, an API outage).
    pub relists: Counter,
    /// `nodelens_kubernetes_watch_up`, shared with the pod watches: the `events` series
    /// exists on the leader only.
    pub watch_up: Family<WatchLabels, Gauge>,
}

impl EventMetrics {
    /// Counts one watched version of an Event.
    pub fn count(&self, record: &EventRecord) {
        let kind = match record.kind.as_str() {
            "Normal" => "Normal",
            "Warning" => "Warning",
            _ => "other",
        };
        let reason = REASONS.iter().find(|r| **r == record.reason).copied().unwrap_or("other");
        self.events.get_or_create(&EventLabels { r#type: kind, reason }).inc();
    }
}

/// Namespaces whose Events are not shipped: those whose logs are not (`logs.exclude_namespaces`,
/// and a namespace's `nodelens.io/exclude` annotation where namespaces are watched).
pub struct Excluded {
    globs: globset::GlobSet,
    store: Arc<PodStore>,
}

impl Excluded {
    /// Whether Events about objects of `namespace` stay out (a Node's, with none, never do).
    pub fn excludes(&self, namespace: &str) -> bool {
        !namespace.is_empty() && (self.globs.is_match(namespace) || self.store.namespace_excluded(namespace))
    }
}

/// What the Events part needs.
pub struct Context {
    /// The API server.
    pub client: kube::Client,
    /// The Lease and this agent's name in the election.
    pub identity: EventsIdentity,
    /// This node's pods, and the keys and namespace labels resolving applications and users.
    pub store: Arc<PodStore>,
    /// This node's name.
    pub node: String,
    /// `kubernetes.request_timeout`, for the watch's server-side timeout.
    pub request_timeout: std::time::Duration,
    /// `logs.exclude_namespaces`: their Events are not shipped either.
    pub exclude_namespaces: globset::GlobSet,
    /// Where records go (the pipeline).
    pub out: mpsc::Sender<EventRecord>,
    /// Metric handles.
    pub metrics: EventMetrics,
}

/// Takes part in the election until shutdown, shipping Events while leading; then stops
/// shipping and releases the Lease.
pub async fn run(context: Context, mut shutdown: Shutdown) {
    let Context { client, identity, store, node, request_timeout, exclude_namespaces, out, metrics } = context;
    let excluded = Excluded { globs: exclude_namespaces, store: store.clone() };
    let leases = KubeLeases::new(client.clone(), &identity.namespace, &identity.lease);
    let mut elector = Elector::new(leases, identity.holder.clone());
    let (leading_tx, mut leading) = tokio::sync::watch::channel(false);
    let leader = metrics.leader.get_or_create(&LeaderLabels {}).clone();
    leader.set(0);
    let config = crate::kube::watch::watcher_config(request_timeout);
    let mut pods = Pods::new(client.clone(), store, node);
    let shipping = async {
        loop {
            let elected = leading.wait_for(|l| *l).await.is_ok();
            if !elected {
                return;
            }
            let ship = async {
                // A namespace's exclusion and labels hold from the first Event: wait for the
                // namespaces' first list (up to `kubernetes.metadata_wait` from start).
                while !excluded.store.namespaces_ready() {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                watch::ship(client.clone(), config.clone(), &mut pods, &excluded, &out, &metrics).await
            };
            let pipeline_gone = tokio::select! {
                _ = ship => true,
                _ = async { let _ = leading.wait_for(|l| !*l).await; } => false,
            };
            if pipeline_gone {
                // Shutdown is under way: nothing more to ship.
                std::future::pending::<()>().await;
            }
            tracing::info!("Event shipping stopped: no longer leading");
        }
    };
    tokio::select! {
        _ = lease::campaign(&mut elector, &leading_tx, &leader, shutdown.recv()) => {}
        _ = shipping => {}
    }
    // Shipping has stopped (its future is dropped): only now may another agent take over.
    leader.set(0);
    elector.release().await;
}
