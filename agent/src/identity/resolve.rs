//! Who a pod belongs to: its application and its user, from ordered key lists such as
//! `["label:app.kubernetes.io/name", "label:app", "owner"]`. The first key with a non-empty
//! value wins; the application falls back to the owning workload's name, then the pod name
//! without the suffixes controllers generate; the user falls back to empty.

use std::collections::BTreeMap;

/// One place a name can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A pod label.
    Label(String),
    /// A pod annotation.
    Annotation(String),
    /// A label of the pod's namespace (needs the namespace watch).
    NamespaceLabel(String),
    /// The owning workload's name (Deployment, StatefulSet, DaemonSet, Job, CronJob).
    Owner,
}

impl Key {
    /// Parses `label:K`, `annotation:K`, `namespace_label:K` or `owner`.
    pub fn parse(text: &str) -> Result<Key, String> {
        match text.split_once(':') {
            Some(("label", k)) if !k.is_empty() => Ok(Key::Label(k.into())),
            Some(("annotation", k)) if !k.is_empty() => Ok(Key::Annotation(k.into())),
            Some(("namespace_label", k)) if !k.is_empty() => Ok(Key::NamespaceLabel(k.into())),
            None if text == "owner" => Ok(Key::Owner),
            _ => Err(format!("`{text}` is not label:K, annotation:K, namespace_label:K or owner")),
        }
    }
}

/// What the keys are looked up in.
pub struct Sources<'a> {
    /// Pod labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: &'a BTreeMap<String, String>,
    /// Namespace labels (empty without the namespace watch).
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// The owning workload's name.
    pub owner: Option<&'a str>,
}

/// The value of the first key that has one.
pub fn first(keys: &[Key], sources: &Sources) -> Option<String> {
    keys.iter().find_map(|key| {
        let value = match key {
            Key::Label(k) => sources.labels.get(k).map(String::as_str),
            Key::Annotation(k) => sources.annotations.get(k).map(String::as_str),
            Key::NamespaceLabel(k) => sources.namespace_labels.get(k).map(String::as_str),
            Key::Owner => sources.owner,
        };
        value.filter(|v| !v.is_empty()).map(str::to_string)
    })
}

/// The application: the first key's value, else the workload, else [`app_from_pod_name`].
pub fn app(keys: &[Key], sources: &Sources, pod: &str) -> String {
    first(keys, sources).or_else(|| sources.owner.map(str::to_string)).unwrap_or_else(|| app_from_pod_name(pod).to_string())
}

/// The characters of Kubernetes' random names (`k8s.io/apimachinery/pkg/util/rand`): no
/// vowels, no easily confused digits.
const RAND_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The application a pod's name stands for when nothing else names it: the name without
/// the suffixes its controller generated, so every pod of one workload counts as one
/// application. `web-7d9f8b6c5d-x2k4p` (a Deployment's: pod-template-hash and random
/// suffix), `agent-x2k4p` (a DaemonSet's or Job's), `nightly-29100480-x2k4p` (a CronJob's
/// Job), `indexed-3-x2k4p` (an indexed Job's), `db-3` (a StatefulSet's ordinal) and
/// `wf-1234567890` (an Argo workflow step's) all lose them; names without one stay.
pub fn app_from_pod_name(pod: &str) -> &str {
    let is_rand = |s: &str, len: std::ops::RangeInclusive<usize>| len.contains(&s.len()) && s.bytes().all(|b| RAND_ALPHABET.contains(&b));
    let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some((head, last)) = pod.rsplit_once('-') else { return pod };
    if is_rand(last, 5..=5) {
        // Before the random suffix: a ReplicaSet's template hash, a CronJob's schedule
        // time or an indexed Job's index.
        return match head.rsplit_once('-') {
            Some((name, part)) if is_rand(part, 6..=10) || is_number(part) => name,
            _ => head,
        };
    }
    if is_number(last) {
        return head;
    }
    pod
}

/// The user: the first key's value, else empty.
pub fn user(keys: &[Key], sources: &Sources) -> String {
    first(keys, sources).unwrap_or_default()
}

/// Label keys as Elasticsearch field names: dots would make nested objects, so they become
/// underscores (`app.kubernetes.io/name` → `app_kubernetes_io/name`), as Filebeat does.
pub fn dedot(key: &str) -> String {
    key.replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn keys(list: &[&str]) -> Vec<Key> {
        list.iter().map(|k| Key::parse(k).unwrap()).collect()
    }

    #[test]
    fn every_key_kind_resolves() {
        let labels = map(&[("app", "web"), ("team", "")]);
        let annotations = map(&[("kubesphere.io/creator", "alice")]);
        let ns = map(&[("user", "bob")]);
        let s = Sources { labels: &labels, annotations: &annotations, namespace_labels: &ns, owner: Some("web-deploy") };
        assert_eq!(first(&keys(&["label:app"]), &s).as_deref(), Some("web"));
        assert_eq!(first(&keys(&["annotation:kubesphere.io/creator"]), &s).as_deref(), Some("alice"));
        assert_eq!(first(&keys(&["namespace_label:user"]), &s).as_deref(), Some("bob"));
        assert_eq!(first(&keys(&["owner"]), &s).as_deref(), Some("web-deploy"));
    }

    #[test]
    fn order_decides_and_empty_values_do_not_count() {
        let labels = map(&[("app.kubernetes.io/name", "resnet"), ("app", "other"), ("team", "")]);
        let empty = BTreeMap::new();
        let s = Sources { labels: &labels, annotations: &empty, namespace_labels: &empty, owner: None };
        assert_eq!(app(&keys(&["label:app.kubernetes.io/name", "label:app"]), &s, "pod"), "resnet");
        assert_eq!(app(&keys(&["label:app", "label:app.kubernetes.io/name"]), &s, "pod"), "other");
        assert_eq!(user(&keys(&["label:team", "label:missing"]), &s), "", "empty label skipped, no fallback");
    }

    #[test]
    fn app_falls_back_to_workload_then_pod_and_user_to_empty() {
        let empty = BTreeMap::new();
        let with_owner = Sources { labels: &empty, annotations: &empty, namespace_labels: &empty, owner: Some("trainer") };
        let bare = Sources { labels: &empty, annotations: &empty, namespace_labels: &empty, owner: None };
        let ks = keys(&["label:app"]);
        assert_eq!(app(&ks, &with_owner, "trainer-0"), "trainer");
        assert_eq!(app(&ks, &bare, "lonely-pod"), "lonely-pod");
        assert_eq!(app(&ks, &bare, "nightly-29100480-x2k4p"), "nightly", "generated suffixes go");
        assert_eq!(user(&keys(&["label:user", "namespace_label:user"]), &bare), "");
    }

    #[test]
    fn generated_suffixes_are_stripped_from_pod_names() {
        for (pod, expected) in [
            ("web-7d9f8b6c5d-x2k4p", "web"),
            ("api-gateway-5c7b9d4f68-q2w5z", "api-gateway"),
            ("web-64948c8f-8zvxc", "web"),
            ("node-exporter-x2k4p", "node-exporter"),
            ("train-once-7bq2t", "train-once"),
            ("nightly-29100480-x2k4p", "nightly"),
            ("indexed-3-x2k4p", "indexed"),
            ("postgres-3", "postgres"),
            ("kafka-broker-12", "kafka-broker"),
            ("wf-1234567890", "wf"),
            ("redis", "redis"),
            ("lonely-pod", "lonely-pod"),
            ("nvidia-dcgm-x2k4p", "nvidia-dcgm"),
            ("my-app-v2", "my-app-v2"),
            ("web-server", "web-server"),
            ("cache-abcde", "cache-abcde"),
            ("x2k4p", "x2k4p"),
        ] {
            assert_eq!(app_from_pod_name(pod), expected, "{pod}");
        }
    }

    #[test]
    fn keys_parse_strictly() {
        assert_eq!(Key::parse("owner"), Ok(Key::Owner));
        assert_eq!(Key::parse("label:a/b.c"), Ok(Key::Label("a/b.c".into())));
        for bad in ["labels:app", "label:", "app", "owner:x", ""] {
            assert!(Key::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dedotting_follows_filebeat() {
        assert_eq!(dedot("app.kubernetes.io/name"), "app_kubernetes_io/name");
        assert_eq!(dedot("app"), "app");
    }
}
