//! The leader's one watch of the cluster's Events: kube-runtime's watcher lists them (every
//! Event the cluster holds, however old: its current version is shipped, and one already
//! shipped by an earlier leader is a 409 in Elasticsearch), then watches from the list's
//! resourceVersion with bookmarks. After a broken watch or an API error it resumes from the
//! last version seen, after a [`Retry`] delay; only a 410 Gone makes it list again. DELETED (an
//! Event's TTL ran out) ships nothing.

use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::runtime::watcher::{self, Event as Change};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::pods::{Found, Pods};
use super::record::EventRecord;
use super::{EventMetrics, Excluded};
use crate::kube::watch::{Retry, WatchLabels};

/// Pod lookups run at once.
const LOOKUPS: usize = 32;

/// A record waiting for its pod's lookup (`None`: it needed none).
type Lookup = std::pin::Pin<Box<dyn std::future::Future<Output = (EventRecord, Option<Found>)> + Send>>;

/// How long a watch resumed after an error must go without one to count as up again.
const RESUMED_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Ships Events into `out` until `out` closes (the pipeline stopped). Meant to be dropped when
/// leadership ends.
pub async fn ship(
    client: kube::Client,
    config: watcher::Config,
    pods: &mut Pods,
    excluded: &Excluded,
    out: &mpsc::Sender<EventRecord>,
    metrics: &EventMetrics,
) {
    let api: kube::Api<Event> = kube::Api::all(client);
    let up = metrics.watch_up.get_or_create(&WatchLabels { resource: "events" }).clone();
    let _series = Series(metrics.watch_up.clone());
    up.set(0);
    let mut retry = Retry::default();
    let mut lists = 0u64;
    // One stream for the whole leadership: after an error the watcher resumes from the last
    // version it saw, and lists again (Init) only after a 410 Gone.
    let stream = watcher::watcher(api, config);
    futures_util::pin_mut!(stream);
    let mut listed = 0usize;
    let mut failing = false;
    // Records leave in the order their Events came, each once its pod is looked up; up to
    // LOOKUPS lookups run at once (a new leader's list can concern thousands of pods).
    let mut lookups: FuturesOrdered<Lookup> = FuturesOrdered::new();
    loop {
        let next = tokio::select! {
            biased;
            Some((mut record, found)) = lookups.next(), if !lookups.is_empty() => {
                if let Some(found) = found {
                    pods.remember(&found);
                    record.pod = Some(found.pod);
                }
                if out.send(record).await.is_err() {
                    return;
                }
                metrics.records.inc();
                continue;
            }
            next = async {
                if failing {
                    tokio::time::timeout(RESUMED_AFTER, stream.next()).await.ok()
                } else {
                    Some(stream.next().await)
                }
            }, if lookups.len() < LOOKUPS => next,
        };
        // A resumed watch that stays quiet is a working one: the watcher reports nothing until
        // the next Event, and a failing one fails within moments.
        let Some(next) = next else {
            tracing::info!("Event watch resumed");
            failing = false;
            up.set(1);
            retry.reset();
            continue;
        };
        let change = match next {
            Some(Ok(change)) => change,
            Some(Err(error)) => {
                up.set(0);
                let delay = retry.next_delay();
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %error, retry_in = ?delay, "Event watch failed; resuming");
                }
                tokio::time::sleep(delay).await;
                continue;
            }
            None => return,
        };
        let (event, watched) = match change {
            Change::Init => {
                lists += 1;
                if lists > 1 {
                    metrics.relists.inc();
                }
                listed = 0;
                continue;
            }
            Change::InitDone => {
                tracing::info!(events = listed, "Event list received and shipped; watching");
                (failing, listed) = (false, 0);
                up.set(1);
                retry.reset();
                continue;
            }
            Change::Delete(_) => continue,
            Change::InitApply(event) => (event, false),
            Change::Apply(event) => (event, true),
        };
        if watched && std::mem::take(&mut failing) {
            tracing::info!("Event watch resumed");
            up.set(1);
            retry.reset();
        }
        let Some(mut record) = EventRecord::from_event(&event) else { continue };
        if excluded.excludes(&record.object.namespace) {
            continue;
        }
        listed += usize::from(!watched);
        if watched {
            metrics.count(&record);
        }
        if record.about_pod() {
            let o = &record.object;
            match pods.known(&o.namespace, &o.name, &o.uid) {
                Some(pod) => record.pod = Some(pod),
                None => {
                    let fetch = pods.fetcher().get(o.namespace.clone(), o.name.clone(), o.uid.clone());
                    lookups.push_back(Box::pin(async move { (record, Some(fetch.await)) }));
                    continue;
                }
            }
        }
        lookups.push_back(Box::pin(std::future::ready((record, None))));
    }
}

/// Removes the `events` series of `nodelens_kubernetes_watch_up` when shipping ends: only the
/// leader has the watch.
struct Series(prometheus_client::metrics::family::Family<WatchLabels, Gauge>);

impl Drop for Series {
    fn drop(&mut self) {
        self.0.remove(&WatchLabels { resource: "events" });
    }
}
