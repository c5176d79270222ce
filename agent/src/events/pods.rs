//! The pods Events are about, for their records' `kubernetes.*`, `service.name` and
//! `user.name`: pods of this node from the pod store, others read from the API server's cache
//! (`resourceVersion=0`), up to 32 at once in the order their Events came, and kept
//! for [`TTL`] in a cache of at most [`CAPACITY`] pods (a pod that is gone is remembered as
//! gone for as long, so a burst of its Events costs one GET).
//!
//! Bounded GETs rather than a cluster-wide pod watch: a watch would hold every pod of the
//! cluster (tens of megabytes at 10,000 pods) on the leader and list them all at each
//! handover, while Events concern few pods at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::time::Instant;

use super::record::EventPod;
use crate::kube::meta;
use crate::kube::store::PodStore;

/// How long a pod read is used for its Events.
pub const TTL: Duration = Duration::from_secs(60);
/// The most pods kept.
pub const CAPACITY: usize = 4096;
/// The longest a GET may take before the record ships without the pod's metadata.
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// Pods read, by UID, with when they were read.
#[derive(Default)]
pub struct PodCache {
    pods: HashMap<String, (EventPod, Instant)>,
}

impl PodCache {
    /// The pod `uid` if it was read less than [`TTL`] before `now`.
    pub fn get(&self, uid: &str, now: Instant) -> Option<EventPod> {
        self.pods.get(uid).filter(|(_, at)| now.duration_since(*at) < TTL).map(|(pod, _)| pod.clone())
    }

    /// Keeps `pod` as read at `now`. When full, expired pods go first, then the oldest one.
    pub fn insert(&mut self, uid: String, pod: EventPod, now: Instant) {
        if self.pods.len() >= CAPACITY && !self.pods.contains_key(&uid) {
            self.pods.retain(|_, (_, at)| now.duration_since(*at) < TTL);
            if self.pods.len() >= CAPACITY {
                if let Some(oldest) = self.pods.iter().min_by_key(|(_, (_, at))| *at).map(|(uid, _)| uid.clone()) {
                    self.pods.remove(&oldest);
                }
            }
        }
        self.pods.insert(uid, (pod, now));
    }

    /// Pods held.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// Finds the pods Events are about.
pub struct Pods {
    fetch: Fetch,
    node: String,
    cache: PodCache,
    /// GETs made (for the tests and the benchmark's API load).
    pub gets: u64,
}

/// What a pod read needs, cheap to clone into each of the lookups running at once.
#[derive(Clone)]
pub struct Fetch {
    client: kube::Client,
    store: Arc<PodStore>,
}

/// A pod looked up: the key it is cached under (`None`: not to be cached) and what was found.
pub struct Found {
    /// The cache key, when the answer may be kept.
    pub key: Option<String>,
    /// The pod.
    pub pod: EventPod,
}

impl Pods {
    /// Pods through `client`, this node's (`node`) from `store`, which also resolves
    /// applications and users.
    pub fn new(client: kube::Client, store: Arc<PodStore>, node: String) -> Pods {
        Pods { fetch: Fetch { client, store }, node, cache: PodCache::default(), gets: 0 }
    }

    /// The pod `namespace/name` with UID `uid` when this node's store or the cache knows it.
    pub fn known(&self, namespace: &str, name: &str, uid: &str) -> Option<EventPod> {
        if let Some(meta) = self.fetch.store.get(uid) {
            return Some(EventPod { meta: Some(meta), node: Some(self.node.clone()) });
        }
        self.cache.get(&key(namespace, name, uid), Instant::now())
    }

    /// A lookup of the pod to run (counted as a GET).
    pub fn fetcher(&mut self) -> Fetch {
        self.gets += 1;
        self.fetch.clone()
    }

    /// Keeps what a lookup found.
    pub fn remember(&mut self, found: &Found) {
        if let Some(key) = &found.key {
            self.cache.insert(key.clone(), found.pod.clone(), Instant::now());
        }
    }

    /// The pod `namespace/name` with UID `uid`; without metadata when it is gone, has another
    /// UID (a new pod of the same name), or cannot be read.
    pub async fn find(&mut self, namespace: &str, name: &str, uid: &str) -> EventPod {
        if let Some(pod) = self.known(namespace, name, uid) {
            return pod;
        }
        let found = self.fetcher().get(namespace.to_string(), name.to_string(), uid.to_string()).await;
        self.remember(&found);
        found.pod
    }
}

/// The cache key of a pod: its UID, or its name where the Event names none.
fn key(namespace: &str, name: &str, uid: &str) -> String {
    if uid.is_empty() {
        format!("{namespace}/{name}")
    } else {
        uid.to_string()
    }
}

impl Fetch {
    /// Reads the pod from the API server's cache (`resourceVersion=0`: no etcd read, and a
    /// pod just created may be missed, as a list would miss it).
    pub async fn get(self, namespace: String, name: String, uid: String) -> Found {
        let api = kube::Api::<Pod>::namespaced(self.client.clone(), &namespace);
        let read = tokio::time::timeout(GET_TIMEOUT, api.get_with(&name, &kube::api::GetParams::any())).await;
        let pod = match read {
            Ok(Ok(pod)) if uid.is_empty() || pod.metadata.uid.as_deref() == Some(uid.as_str()) => {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                let meta = meta::from_pod(&pod, |a| self.store.wants_annotation(a)).map(|m| Arc::new(self.store.resolve(m)));
                EventPod { meta, node }
            }
            Ok(Ok(_)) => EventPod { meta: None, node: None },
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => EventPod { meta: None, node: None },
            Ok(Err(e)) => {
                tracing::debug!(namespace, pod = name, error = %e, "cannot read the pod of an Event");
                // Not cached: the next Event of the pod tries again.
                return Found { key: None, pod: EventPod { meta: None, node: None } };
            }
            Err(_) => return Found { key: None, pod: EventPod { meta: None, node: None } },
        };
        Found { key: Some(key(&namespace, &name, &uid)), pod }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::resolve::Key;

    fn pod(node: &str) -> EventPod {
        EventPod { meta: None, node: Some(node.into()) }
    }

    #[test]
    fn cached_pods_expire_after_the_ttl_and_the_cache_never_holds_more_than_its_capacity() {
        let start = Instant::now();
        let mut cache = PodCache::default();
        cache.insert("u1".into(), pod("a"), start);
        assert_eq!(cache.get("u1", start + TTL - Duration::from_millis(1)), Some(pod("a")));
        assert_eq!(cache.get("u1", start + TTL), None, "expired");

        for i in 0..CAPACITY + 10 {
            cache.insert(format!("p{i}"), pod("b"), start + Duration::from_millis(i as u64));
        }
        assert_eq!(cache.len(), CAPACITY);
        assert_eq!(cache.get("p0", start + Duration::from_secs(10)), None, "the oldest went first");
        let last = format!("p{}", CAPACITY + 9);
        assert_eq!(cache.get(&last, start + Duration::from_secs(10)), Some(pod("b")));

        // Past the TTL every entry is expired: one insert makes room by dropping them all.
        cache.insert("late".into(), pod("c"), start + TTL * 2);
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn a_pod_is_read_once_resolved_like_the_nodes_own_and_a_gone_or_replaced_pod_gives_no_metadata() {
        use nodelens_testkit::kubernetes::{namespace, pod as api_pod, FakeApiServer};
        use serde_json::json;

        let api = FakeApiServer::start();
        api.apply(namespace("ml", json!({"user": "alice"}), json!({})));
        api.apply(api_pod("ml", "trainer-0", "uid-trainer", "gpu-far", json!({"app": "resnet"}), &["main"]));
        api.apply(api_pod("ml", "reborn-0", "uid-new", "gpu-far", json!({"app": "x"}), &["main"]));
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&api.kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let keys = |k: &[&str]| k.iter().map(|k| Key::parse(k).unwrap()).collect::<Vec<_>>();
        let store = Arc::new(PodStore::new(keys(&["label:app"]), keys(&["namespace_label:user"]), Default::default()));
        store.apply_namespace(
            "ml",
            crate::kube::store::namespace_meta([("user".to_string(), "alice".to_string())].into(), &Default::default()),
        );
        let local = meta::from_pod(
            &serde_json::from_value(api_pod("ml", "local-0", "uid-local", "this-node", json!({"app": "mine"}), &["main"])).unwrap(),
            |_| false,
        )
        .unwrap();
        store.apply(local);
        let mut pods = Pods::new(client, store, "this-node".into());

        let found = pods.find("ml", "trainer-0", "uid-trainer").await;
        let meta = found.meta.clone().expect("read with a GET");
        assert_eq!((meta.app.as_str(), meta.user.as_str(), found.node.as_deref()), ("resnet", "alice", Some("gpu-far")));
        assert_eq!(pods.find("ml", "trainer-0", "uid-trainer").await, found);
        assert_eq!(pods.gets, 1, "the second Event of the pod is answered from the cache");

        let local = pods.find("ml", "local-0", "uid-local").await;
        assert_eq!((local.meta.unwrap().app.as_str(), local.node.as_deref()), ("mine", Some("this-node")));
        assert_eq!(pods.gets, 1, "this node's pods come from the store");

        let gone = pods.find("ml", "deleted-0", "uid-deleted").await;
        assert_eq!(gone, EventPod { meta: None, node: None });
        pods.find("ml", "deleted-0", "uid-deleted").await;
        assert_eq!(pods.gets, 2, "a gone pod is remembered as gone");

        let replaced = pods.find("ml", "reborn-0", "uid-old").await;
        assert_eq!(replaced.meta, None, "a new pod of the same name is not the Event's");
        let gets: Vec<String> = api.requests().into_iter().filter(|r| r.contains("/pods/")).collect();
        assert_eq!(
            gets,
            [
                "GET /api/v1/namespaces/ml/pods/trainer-0?&resourceVersion=0",
                "GET /api/v1/namespaces/ml/pods/deleted-0?&resourceVersion=0",
                "GET /api/v1/namespaces/ml/pods/reborn-0?&resourceVersion=0"
            ]
        );
    }
}
