//! One watch of the pods on this node (`fieldSelector=spec.nodeName=<node>`), and of
//! namespaces when a key needs their labels. kube-runtime's watcher does the protocol: list,
//! then watch from the list's resourceVersion with bookmarks, relist on 410 Gone, reconnect
//! with backoff. Never a GET per pod.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

use super::meta::{self, PodMeta};
use super::store::{self, PodStore};
use crate::shutdown::Shutdown;

/// Says whether a deleted pod's log files are still on disk (its metadata is then kept).
pub type KeepDeleted = Arc<dyn Fn(&PodMeta) -> bool + Send + Sync>;

/// Watches this node's pods into `store` until shutdown; every 10 s drops deleted pods that
/// `keep` no longer holds.
pub async fn pods(client: Client, node: String, store: Arc<PodStore>, keep: KeepDeleted, mut shutdown: Shutdown) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(api, config).default_backoff();
    futures_util::pin_mut!(stream);
    let mut listed = Vec::new();
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    let reduce = |pod: &Pod| meta::from_pod(pod, |a| store.wants_annotation(a));
    loop {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(Event::Init)) => listed.clear(),
                Some(Ok(Event::InitApply(pod))) => listed.extend(reduce(&pod)),
                Some(Ok(Event::InitDone)) => {
                    tracing::info!(pods = listed.len(), node = %node, "pod list received");
                    store.relist(std::mem::take(&mut listed));
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
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying with backoff"),
                None => return,
            },
            _ = prune.tick() => {
                let (store, keep) = (store.clone(), keep.clone());
                // `keep` looks at the disk.
                let _ = tokio::task::spawn_blocking(move || store.prune(Instant::now(), &*keep)).await;
            }
            _ = shutdown.recv() => return,
        }
    }
}

/// Watches namespaces (labels and the exclude annotation) into `store` until shutdown.
pub async fn namespaces(client: Client, store: Arc<PodStore>, mut shutdown: Shutdown) {
    let api: Api<Namespace> = Api::all(client);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = shutdown.recv() => return,
        };
        match event {
            Some(Ok(Event::Apply(ns) | Event::InitApply(ns))) => {
                let Some(name) = ns.metadata.name.clone() else { continue };
                let annotations = ns.metadata.annotations.clone().unwrap_or_default();
                store.apply_namespace(&name, store::namespace_meta(ns.metadata.labels.clone().unwrap_or_default(), &annotations));
            }
            Some(Ok(Event::InitDone)) => store.namespaces_listed(),
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "namespace watch failed; retrying with backoff"),
            None => return,
        }
    }
}
