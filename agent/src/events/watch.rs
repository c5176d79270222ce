//! The leader's one watch of the cluster's Events: kube-runtime's watcher lists them (every
//! Event the cluster holds, however old: its current version is shipped, and one already
//! shipped by an earlier leader is a 409 in Elasticsearch), then watches from the list's
//! resourceVersion with bookmarks. A 410 Gone or a broken watch ends the stream; it is
//! started again with a fresh list after a [`Retry`] delay. DELETED (an Event's TTL ran out)
//! ships nothing.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::runtime::watcher::{self, Event as Change};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::pods::Pods;
use super::record::EventRecord;
use super::EventMetrics;
use crate::kube::watch::{Retry, WatchLabels};

/// Ships Events into `out` until `out` closes (the pipeline stopped). Meant to be dropped when
/// leadership ends.
pub async fn ship(client: kube::Client, config: watcher::Config, pods: &mut Pods, out: &mpsc::Sender<EventRecord>, metrics: &EventMetrics) {
    let api: kube::Api<Event> = kube::Api::all(client);
    let up = metrics.watch_up.get_or_create(&WatchLabels { resource: "events" }).clone();
    let _series = Series(metrics.watch_up.clone());
    up.set(0);
    let mut retry = Retry::default();
    let mut lists = 0u64;
    loop {
        let stream = watcher::watcher(api.clone(), config.clone());
        futures_util::pin_mut!(stream);
        let mut listed = 0usize;
        let error = loop {
            let change = match stream.next().await {
                Some(Ok(change)) => change,
                Some(Err(e)) => break e,
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
                    up.set(1);
                    retry.reset();
                    continue;
                }
                Change::Delete(_) => continue,
                Change::InitApply(event) => (event, false),
                Change::Apply(event) => (event, true),
            };
            let Some(mut record) = EventRecord::from_event(&event) else { continue };
            listed += usize::from(!watched);
            if watched {
                metrics.count(&record);
            }
            if record.about_pod() {
                let o = &record.object;
                record.pod = Some(pods.find(&o.namespace, &o.name, &o.uid).await);
            }
            if out.send(record).await.is_err() {
                return;
            }
            metrics.records.inc();
        };
        up.set(0);
        let delay = retry.next_delay();
        tracing::warn!(error = %error, retry_in = ?delay, "Event watch failed; listing again");
        tokio::time::sleep(delay).await;
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
