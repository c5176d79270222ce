//! The pods on this node, as the watch reports them, with their application and user
//! resolved. Shared by the log encoder (enrichment) and the metrics (`nodelens_pod_info`).
//! A deleted pod stays while its log files are on disk (at least [`KEEP_DELETED`]), so its
//! last lines are still enriched, however late they are read.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::meta::{PodMeta, EXCLUDE};
use crate::identity::resolve::{self, Key, Sources};

/// The least time a deleted pod's metadata is kept, whether or not its files are still there.
pub const KEEP_DELETED: Duration = Duration::from_secs(60);

/// Labels of `nodelens_pod_info`: the join target for cAdvisor and kube-state-metrics series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodInfoLabels {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID.
    pub uid: String,
    /// Application.
    pub app: String,
    /// User.
    pub user: String,
    /// `deployment`, `statefulset`, ... or empty.
    pub workload_kind: String,
    /// The workload's name, or empty.
    pub workload: String,
}

/// A namespace as far as the agent cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceMeta {
    /// Its labels (for `namespace_label:` keys).
    pub labels: BTreeMap<String, String>,
    /// `nodelens.io/exclude: "true"` is set on it.
    pub excluded: bool,
}

struct Entry {
    meta: Arc<PodMeta>,
    deleted_at: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    pods: HashMap<String, Entry>,
    namespaces: HashMap<String, NamespaceMeta>,
    synced: bool,
    /// The pod watch failed and has not listed again since: a pod created meanwhile is not
    /// known until it does.
    watch_down: bool,
    /// Namespaces are watched (for exclusion or labels), and their first list has arrived.
    namespaces_expected: bool,
    namespaces_synced: bool,
    /// Waiting for the first lists gives up at this instant (`kubernetes.metadata_wait` after
    /// the watches started).
    lists_deadline: Option<Instant>,
}

impl Inner {
    fn waited_out(&self) -> bool {
        self.lists_deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The namespaces are listed, not watched, or waited for in vain (their list is denied).
    fn namespaces_ready(&self) -> bool {
        !self.namespaces_expected || self.namespaces_synced || self.waited_out()
    }
}

/// The pod store.
pub struct PodStore {
    inner: Mutex<Inner>,
    app_keys: Vec<Key>,
    user_keys: Vec<Key>,
    pod_info: Family<PodInfoLabels, Gauge>,
}

impl PodStore {
    /// An empty store resolving with these keys and exporting `pod_info`.
    pub fn new(app_keys: Vec<Key>, user_keys: Vec<Key>, pod_info: Family<PodInfoLabels, Gauge>) -> PodStore {
        PodStore { inner: Mutex::default(), app_keys, user_keys, pod_info }
    }

    /// Annotations worth keeping from a pod: the ones the keys name, and `nodelens.io/*`.
    pub fn wants_annotation(&self, name: &str) -> bool {
        name.starts_with("nodelens.io/")
            || self.app_keys.iter().chain(&self.user_keys).any(|k| matches!(k, Key::Annotation(a) if a == name))
    }

    /// Whether any key needs namespace labels.
    pub fn needs_namespaces(&self) -> bool {
        self.app_keys.iter().chain(&self.user_keys).any(|k| matches!(k, Key::NamespaceLabel(_)))
    }

    /// The pod with `uid`, deleted or not.
    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.inner.lock().unwrap().pods.get(uid).map(|e| e.meta.clone())
    }

    /// Whether the pod with `uid` was deleted (its metadata is still kept).
    pub fn is_deleted(&self, uid: &str) -> bool {
        self.inner.lock().unwrap().pods.get(uid).is_some_and(|e| e.deleted_at.is_some())
    }

    /// Every pod by (namespace, name); where a deleted pod and a live one share a name (a
    /// StatefulSet pod recreated), the live one.
    pub fn by_name(&self) -> HashMap<(String, String), Arc<PodMeta>> {
        let inner = self.inner.lock().unwrap();
        let mut pods = HashMap::with_capacity(inner.pods.len());
        for e in inner.pods.values().filter(|e| e.deleted_at.is_some()).chain(inner.pods.values().filter(|e| e.deleted_at.is_none())) {
            pods.insert((e.meta.namespace.clone(), e.meta.name.clone()), e.meta.clone());
        }
        pods
    }

    /// Whether the namespace carries `nodelens.io/exclude: "true"`.
    pub fn namespace_excluded(&self, namespace: &str) -> bool {
        self.inner.lock().unwrap().namespaces.get(namespace).is_some_and(|n| n.excluded)
    }

    /// Whether the pods' first list has arrived, and the namespaces' where they are watched
    /// (or `kubernetes.metadata_wait` has passed without it: pods go on without them).
    pub fn is_synced(&self) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.synced && inner.namespaces_ready()
    }

    /// Whether the namespaces' first list has arrived, they are not watched, or
    /// `kubernetes.metadata_wait` has passed without it.
    pub fn namespaces_ready(&self) -> bool {
        self.inner.lock().unwrap().namespaces_ready()
    }

    /// Whether `kubernetes.metadata_wait` has passed since the watches started (see
    /// [`PodStore::wait_for_lists`]): waiting longer for a first list cannot help.
    pub fn waited_out(&self) -> bool {
        self.inner.lock().unwrap().waited_out()
    }

    /// Whether namespaces are watched and their first list has not arrived (yet).
    pub fn namespaces_missing(&self) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.namespaces_expected && !inner.namespaces_synced
    }

    /// Whether the pods' first list has arrived (the namespaces' may still be to come).
    pub fn pods_listed(&self) -> bool {
        self.inner.lock().unwrap().synced
    }

    /// Whether the first list has arrived and the pod watch has not failed since its last
    /// list: a pod missing from the store is then most likely not on the node (or its event is
    /// a moment away), rather than unheard of.
    pub fn is_current(&self) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.synced && !inner.watch_down
    }

    /// The pod watch failed (`false`) or listed again (`true`).
    pub fn set_watch_up(&self, up: bool) {
        self.inner.lock().unwrap().watch_down = !up;
    }

    /// The watches start now, of namespaces too where `namespaces`: the store is synced once
    /// the pods are listed and, where namespaces are watched, the namespaces too (so a
    /// namespace's `nodelens.io/exclude` and labels hold from the first record), or once
    /// `wait` has passed without them.
    pub fn wait_for_lists(&self, wait: Duration, namespaces: bool) {
        let mut inner = self.inner.lock().unwrap();
        inner.lists_deadline = Instant::now().checked_add(wait);
        inner.namespaces_expected = namespaces;
    }

    /// The namespace watch's first list is complete.
    pub fn namespaces_listed(&self) {
        self.inner.lock().unwrap().namespaces_synced = true;
    }

    /// Number of pods held, deleted ones included.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().pods.len()
    }

    /// Whether no pod is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A pod was added or changed.
    pub fn apply(&self, pod: PodMeta) {
        let mut inner = self.inner.lock().unwrap();
        self.apply_locked(&mut inner, pod, false);
    }

    /// A pod was deleted: its metadata stays (see [`PodStore::prune`]), its `pod_info`
    /// series goes now.
    pub fn delete(&self, uid: &str) {
        self.delete_at(uid, Instant::now());
    }

    fn delete_at(&self, uid: &str, now: Instant) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(entry) = inner.pods.get_mut(uid) {
            if entry.deleted_at.is_none() {
                entry.deleted_at = Some(now);
                self.pod_info.remove(&info_labels(&entry.meta));
            }
        }
    }

    /// A full list (after a start, a reconnect or a 410 Gone): pods not in it were deleted.
    pub fn relist(&self, pods: Vec<PodMeta>) {
        let mut inner = self.inner.lock().unwrap();
        let listed: std::collections::HashSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
        let gone: Vec<String> =
            inner.pods.iter().filter(|(uid, e)| e.deleted_at.is_none() && !listed.contains(*uid)).map(|(uid, _)| uid.clone()).collect();
        for pod in pods {
            self.apply_locked(&mut inner, pod, false);
        }
        inner.synced = true;
        drop(inner);
        for uid in gone {
            self.delete(&uid);
        }
    }

    /// A namespace was added or changed: its pods are resolved again.
    pub fn apply_namespace(&self, name: &str, meta: NamespaceMeta) {
        let mut inner = self.inner.lock().unwrap();
        if inner.namespaces.get(name) == Some(&meta) {
            return;
        }
        let exclusion_changed = inner.namespaces.get(name).is_none_or(|old| old.excluded != meta.excluded);
        inner.namespaces.insert(name.to_string(), meta);
        let pods: Vec<PodMeta> =
            inner.pods.values().filter(|e| e.meta.namespace == name && e.deleted_at.is_none()).map(|e| (*e.meta).clone()).collect();
        for pod in pods {
            // A new entry even when the pod resolves the same, so enrichment looks again and
            // the namespace's exclusion applies to containers already being read.
            self.apply_locked(&mut inner, pod, exclusion_changed);
        }
    }

    /// A namespace was deleted: it is forgotten and its remaining pods resolve without its
    /// labels (they are being deleted too).
    pub fn delete_namespace(&self, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        if inner.namespaces.remove(name).is_none() {
            return;
        }
        let pods: Vec<PodMeta> =
            inner.pods.values().filter(|e| e.meta.namespace == name && e.deleted_at.is_none()).map(|e| (*e.meta).clone()).collect();
        for pod in pods {
            self.apply_locked(&mut inner, pod, true);
        }
    }

    /// A full namespace list: namespaces not in it were deleted while the watch was away.
    pub fn relist_namespaces(&self, listed: &std::collections::HashSet<String>) {
        let gone: Vec<String> = self.inner.lock().unwrap().namespaces.keys().filter(|n| !listed.contains(*n)).cloned().collect();
        for name in gone {
            self.delete_namespace(&name);
        }
    }

    /// The namespaces known, sorted.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.lock().unwrap().namespaces.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// Drops pods deleted at least [`KEEP_DELETED`] before `now` for which `keep` (asked
    /// without the lock held: it may look at the disk) is false — `keep` says whether the
    /// pod's log files are still there to be read.
    pub fn prune(&self, now: Instant, keep: impl Fn(&PodMeta) -> bool) {
        let candidates: Vec<(Arc<PodMeta>, Instant)> = {
            let inner = self.inner.lock().unwrap();
            inner
                .pods
                .values()
                .filter_map(|e| Some((e.meta.clone(), e.deleted_at.filter(|at| now.duration_since(*at) >= KEEP_DELETED)?)))
                .collect()
        };
        let gone: Vec<(Arc<PodMeta>, Instant)> = candidates.into_iter().filter(|(meta, _)| !keep(meta)).collect();
        if gone.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        for (meta, deleted_at) in gone {
            // Unless the watch reported it again meanwhile.
            if inner.pods.get(&meta.uid).is_some_and(|e| e.deleted_at == Some(deleted_at)) {
                inner.pods.remove(&meta.uid);
            }
        }
    }

    /// `pod` (of any node) with its application and user resolved as the store resolves its
    /// own pods: with these keys and the namespace's labels. The store keeps nothing of it.
    pub fn resolve(&self, mut pod: PodMeta) -> PodMeta {
        self.resolve_locked(&self.inner.lock().unwrap(), &mut pod);
        pod
    }

    fn resolve_locked(&self, inner: &Inner, pod: &mut PodMeta) {
        let empty = BTreeMap::new();
        let namespace_labels = inner.namespaces.get(&pod.namespace).map_or(&empty, |n| &n.labels);
        let sources = Sources {
            labels: &pod.labels,
            annotations: &pod.annotations,
            namespace_labels,
            owner: pod.workload.as_ref().map(|w| w.name.as_str()),
        };
        pod.app = resolve::app(&self.app_keys, &sources, &pod.name);
        pod.user = resolve::user(&self.user_keys, &sources);
    }

    fn apply_locked(&self, inner: &mut Inner, mut pod: PodMeta, force: bool) {
        self.resolve_locked(inner, &mut pod);
        let new_labels = info_labels(&pod);
        // Once per pod and value, not at every update of the pod.
        if let Some(Err(why)) = &pod.hami {
            if inner.pods.get(&pod.uid).is_none_or(|old| old.meta.hami != pod.hami) {
                tracing::warn!(
                    namespace = %pod.namespace, pod = %pod.name, error = %why,
                    "HAMi's allocation annotation cannot be read; its GPU slices are attributed by their processes only, without grants"
                );
            }
        }
        if let Some(old) = inner.pods.get(&pod.uid) {
            if *old.meta == pod && old.deleted_at.is_none() && !force {
                return;
            }
            let old_labels = info_labels(&old.meta);
            if old_labels != new_labels {
                self.pod_info.remove(&old_labels);
            }
        }
        self.pod_info.get_or_create(&new_labels).set(1);
        inner.pods.insert(pod.uid.clone(), Entry { meta: Arc::new(pod), deleted_at: None });
    }
}

/// Whether a namespace's annotations exclude it.
pub fn namespace_meta(labels: BTreeMap<String, String>, annotations: &BTreeMap<String, String>) -> NamespaceMeta {
    NamespaceMeta { labels, excluded: annotations.get(EXCLUDE).is_some_and(|v| v == "true") }
}

fn info_labels(pod: &PodMeta) -> PodInfoLabels {
    PodInfoLabels {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        uid: pod.uid.clone(),
        app: pod.app.clone(),
        user: pod.user.clone(),
        workload_kind: pod.workload.as_ref().map_or("", |w| w.kind.as_str()).to_string(),
        workload: pod.workload.as_ref().map_or(String::new(), |w| w.name.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ns: &str, labels: &[(&str, &str)]) -> PodMeta {
        PodMeta {
            namespace: ns.into(),
            name: format!("pod-{uid}"),
            uid: uid.into(),
            ip: None,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            annotations: BTreeMap::new(),
            workload: None,
            containers: Vec::new(),
            app: String::new(),
            user: String::new(),
            hami: None,
            evicted: false,
        }
    }

    fn store() -> (PodStore, Family<PodInfoLabels, Gauge>) {
        let family = Family::default();
        let keys = |l: &[&str]| l.iter().map(|k| Key::parse(k).unwrap()).collect();
        (PodStore::new(keys(&["label:app"]), keys(&["label:user", "namespace_label:owner"]), family.clone()), family)
    }

    fn series(family: &Family<PodInfoLabels, Gauge>) -> usize {
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("pod_info", "", family.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines().filter(|l| l.starts_with("pod_info{")).count()
    }

    #[test]
    fn labels_resolve_and_relabelling_replaces_the_info_series() {
        let (s, family) = store();
        s.apply(pod("u1", "ml", &[("app", "resnet"), ("user", "alice")]));
        assert_eq!((s.get("u1").unwrap().app.as_str(), s.get("u1").unwrap().user.as_str()), ("resnet", "alice"));
        s.apply(pod("u1", "ml", &[("app", "resnet-v2"), ("user", "alice")]));
        assert_eq!(s.get("u1").unwrap().app, "resnet-v2");
        assert_eq!(series(&family), 1, "the old series is removed");
    }

    #[test]
    fn namespace_labels_reach_pods_and_follow_relabelling() {
        let (s, _) = store();
        s.apply(pod("u1", "team-a", &[]));
        assert_eq!(s.get("u1").unwrap().user, "");
        s.apply_namespace("team-a", NamespaceMeta { labels: [("owner".to_string(), "carol".to_string())].into(), excluded: false });
        assert_eq!(s.get("u1").unwrap().user, "carol");
        s.apply_namespace("team-a", NamespaceMeta { labels: [("owner".to_string(), "dave".to_string())].into(), excluded: true });
        assert_eq!(s.get("u1").unwrap().user, "dave");
        assert!(s.namespace_excluded("team-a"));
    }

    #[test]
    fn deleted_pods_stay_for_their_last_lines_but_leave_pod_info() {
        let (s, family) = store();
        s.apply(pod("u1", "ml", &[("app", "a")]));
        s.delete("u1");
        assert!(s.get("u1").is_some());
        assert_eq!(series(&family), 0);
        s.prune(Instant::now(), |_| false);
        assert!(s.get("u1").is_some(), "kept for a while");
        s.prune(Instant::now() + KEEP_DELETED, |_| false);
        assert!(s.get("u1").is_none());
    }

    #[test]
    fn a_relist_deletes_what_it_no_longer_lists() {
        let (s, family) = store();
        s.apply(pod("u1", "ml", &[]));
        s.apply(pod("u2", "ml", &[]));
        s.relist(vec![pod("u2", "ml", &[]), pod("u3", "ml", &[])]);
        assert!(s.is_synced());
        assert_eq!(series(&family), 2);
        s.prune(Instant::now() + KEEP_DELETED, |_| false);
        assert!(s.get("u1").is_none() && s.get("u3").is_some());
    }

    #[test]
    fn a_deleted_pod_is_kept_while_its_log_directory_exists() {
        let (s, _) = store();
        let pods_dir = tempfile::tempdir().unwrap();
        let dir = crate::identity::path::pod_dir(pods_dir.path(), "ml", "pod-u1", "u1");
        std::fs::create_dir(&dir).unwrap();
        let keep = |p: &PodMeta| crate::identity::path::pod_dir(pods_dir.path(), &p.namespace, &p.name, &p.uid).exists();
        s.apply(pod("u1", "ml", &[("app", "a")]));
        let deleted = Instant::now();
        s.delete_at("u1", deleted);
        s.prune(deleted + KEEP_DELETED * 30, keep);
        assert_eq!(s.get("u1").map(|p| p.app.clone()).as_deref(), Some("a"), "its files are still on disk");
        std::fs::remove_dir(&dir).unwrap();
        s.prune(deleted + KEEP_DELETED / 2, keep);
        assert!(s.get("u1").is_some(), "kept at least KEEP_DELETED");
        s.prune(deleted + KEEP_DELETED, keep);
        assert!(s.get("u1").is_none(), "dropped once the directory is gone");
    }

    #[test]
    fn a_pod_back_before_the_prune_is_not_dropped() {
        let (s, _) = store();
        s.apply(pod("u1", "ml", &[]));
        let deleted = Instant::now();
        s.delete_at("u1", deleted);
        s.prune(deleted + KEEP_DELETED, |_| {
            // A relist reports the pod again while the prune looks at the disk.
            s.apply(pod("u1", "ml", &[("app", "back")]));
            false
        });
        assert_eq!(s.get("u1").map(|p| p.app.clone()).as_deref(), Some("back"));
    }

    #[test]
    fn a_namespace_list_that_does_not_come_within_the_wait_is_given_up() {
        let (s, _) = store();
        s.wait_for_lists(Duration::from_secs(3600), true);
        s.relist(vec![pod("u1", "team-a", &[])]);
        assert!(!s.is_synced() && !s.waited_out());
        s.wait_for_lists(Duration::ZERO, true);
        assert!(s.waited_out());
        assert!(s.is_synced() && s.namespaces_ready(), "pods go on without the namespaces");
        assert!(s.namespaces_missing(), "still missing, for the warning");
    }

    #[test]
    fn the_store_is_synced_once_namespaces_are_listed_and_an_exclusion_reaches_known_pods() {
        let (s, _) = store();
        s.wait_for_lists(Duration::from_secs(3600), true);
        assert!(!s.pods_listed());
        s.relist(vec![pod("u1", "team-a", &[])]);
        assert!(s.pods_listed());
        assert!(!s.is_synced(), "pods listed, namespaces not yet: exclusion unknown");
        assert!(s.is_current(), "the pods' watch is up, whatever the namespaces'");
        assert!(s.namespaces_missing() && !s.namespaces_ready());
        s.apply_namespace("team-a", NamespaceMeta::default());
        s.namespaces_listed();
        assert!(s.is_synced());
        let before = s.get("u1").unwrap();
        s.apply_namespace("team-a", NamespaceMeta { labels: BTreeMap::new(), excluded: true });
        let after = s.get("u1").unwrap();
        assert!(!Arc::ptr_eq(&before, &after), "a new entry, so the encoder renders the pod again");
        assert!(s.namespace_excluded("team-a"));
    }
}
