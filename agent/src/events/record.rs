//! One version of a Kubernetes Event as a record (`event.dataset: kubernetes.event`), and its
//! ECS document.
//!
//! core/v1 Events, not events.k8s.io/v1: every cluster serves core/v1, and it is the shape
//! `kubectl describe` and `kubectl get events` show (`count`, `source`, `lastTimestamp`);
//! events.k8s.io events are served through it too, with `eventTime`, `series` and
//! `reportingComponent` filled instead, which [`EventRecord::from_event`] falls back on.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Event;
use serde_json::{json, Map, Value};

use crate::identity::resolve::dedot;
use crate::kube::meta::PodMeta;

/// The object an Event is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvolvedObject {
    /// `Pod`, `Node`, `Deployment`, ...
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace; empty for cluster-scoped objects (a Node).
    pub namespace: String,
    /// Its UID.
    pub uid: String,
}

/// The pod an Event is about, as far as it could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPod {
    /// The pod's metadata with its application and user resolved; `None` when the pod is
    /// gone (or could not be read): the record then carries only what the Event names.
    pub meta: Option<Arc<PodMeta>>,
    /// The node the pod was scheduled to (`spec.nodeName`), if any.
    pub node: Option<String>,
}

/// One version of an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// The Event's UID.
    pub uid: String,
    /// Its resourceVersion: with the UID, the document's id.
    pub version: String,
    /// The last occurrence, Unix microseconds.
    pub timestamp_us: i64,
    /// `message`.
    pub message: String,
    /// `reason`, e.g. `FailedScheduling`.
    pub reason: String,
    /// `type`: `Normal` or `Warning`.
    pub kind: String,
    /// `count`, or `series.count` (a repeated event.k8s.io Event), when given.
    pub count: Option<i32>,
    /// What it is about.
    pub object: InvolvedObject,
    /// `source.component` (else `reportingComponent`).
    pub component: String,
    /// `source.host` (else `reportingInstance`).
    pub host: String,
    /// For a Pod's Events, the pod.
    pub pod: Option<EventPod>,
}

impl EventRecord {
    /// The record of `event`, without pod metadata; `None` without a UID or resourceVersion
    /// (never so from the API server).
    pub fn from_event(event: &Event) -> Option<EventRecord> {
        let meta = &event.metadata;
        let micros = |t: &k8s_openapi::jiff::Timestamp| t.as_microsecond();
        let timestamp_us = event
            .last_timestamp
            .as_ref()
            .map(|t| micros(&t.0))
            .or_else(|| event.series.as_ref().and_then(|s| s.last_observed_time.as_ref()).map(|t| micros(&t.0)))
            .or_else(|| event.event_time.as_ref().map(|t| micros(&t.0)))
            .or_else(|| event.first_timestamp.as_ref().map(|t| micros(&t.0)))
            .or_else(|| meta.creation_timestamp.as_ref().map(|t| micros(&t.0)))
            .unwrap_or(0);
        let o = &event.involved_object;
        let source = event.source.as_ref();
        let or_empty = |s: Option<&String>| s.cloned().unwrap_or_default();
        let component = source.and_then(|s| s.component.clone()).filter(|c| !c.is_empty());
        let host = source.and_then(|s| s.host.clone()).filter(|h| !h.is_empty());
        Some(EventRecord {
            uid: meta.uid.clone()?,
            version: meta.resource_version.clone()?,
            timestamp_us,
            message: or_empty(event.message.as_ref()),
            reason: or_empty(event.reason.as_ref()),
            kind: or_empty(event.type_.as_ref()),
            // Events recorded through events.k8s.io keep their repeats in `series.count`.
            count: event.count.or_else(|| event.series.as_ref().and_then(|s| s.count)),
            object: InvolvedObject {
                kind: or_empty(o.kind.as_ref()),
                name: or_empty(o.name.as_ref()),
                namespace: or_empty(o.namespace.as_ref()),
                uid: or_empty(o.uid.as_ref()),
            },
            component: component.or_else(|| event.reporting_component.clone()).unwrap_or_default(),
            host: host.or_else(|| event.reporting_instance.clone()).unwrap_or_default(),
            pod: None,
        })
    }

    /// Whether the Event is about a pod (and names it).
    pub fn about_pod(&self) -> bool {
        self.object.kind == "Pod" && !self.object.name.is_empty() && !self.object.namespace.is_empty()
    }

    /// The document id's key: the same UID and resourceVersion always give the same key, so a
    /// version sent again (a relist, a new leader) is answered 409 by Elasticsearch.
    pub fn id(&self) -> u64 {
        let mut key = Vec::with_capacity(self.uid.len() + self.version.len() + 1);
        key.extend_from_slice(self.uid.as_bytes());
        key.push(0);
        key.extend_from_slice(self.version.as_bytes());
        xxhash_rust::xxh3::xxh3_64(&key)
    }

    /// `log.level` of the Event's type.
    pub fn level(&self) -> &'static str {
        if self.kind == "Warning" {
            "warning"
        } else {
            "info"
        }
    }

    /// The Kubernetes part of the record as (key, value) pairs for OTLP resource attributes:
    /// `k8s.namespace.name`, `k8s.pod.name`, `k8s.pod.uid`, `k8s.node.name`, `service.name`,
    /// `user.name` where known.
    pub fn resource(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(pod) = &self.pod {
            out.push(("k8s.namespace.name", self.object.namespace.clone()));
            out.push(("k8s.pod.name", self.object.name.clone()));
            out.push(("k8s.pod.uid", self.object.uid.clone()));
            if let Some(node) = &pod.node {
                out.push(("k8s.node.name", node.clone()));
            }
            if let Some(meta) = &pod.meta {
                out.push(("service.name", meta.app.clone()));
                out.push(("user.name", meta.user.clone()));
            }
        } else if self.object.kind == "Node" {
            out.push(("k8s.node.name", self.object.name.clone()));
        } else if !self.object.namespace.is_empty() {
            out.push(("k8s.namespace.name", self.object.namespace.clone()));
        }
        out.retain(|(_, v)| !v.is_empty());
        out
    }

    /// `kubernetes.event.*` as (key below `kubernetes.event.`, value) pairs, present ones only.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let mut fields = Vec::new();
        let text = [
            ("reason", &self.reason),
            ("type", &self.kind),
            ("involved_object.kind", &self.object.kind),
            ("involved_object.name", &self.object.name),
            ("involved_object.namespace", &self.object.namespace),
            ("involved_object.uid", &self.object.uid),
            ("source.component", &self.component),
            ("source.host", &self.host),
        ];
        fields.extend(text.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k, json!(v))));
        if let Some(count) = self.count {
            fields.push(("count", json!(count)));
        }
        fields
    }

    /// Appends the record's ECS document and a newline to `out`.
    pub fn encode(&self, cluster: &str, out: &mut Vec<u8>) {
        let mut doc = Map::new();
        doc.insert("@timestamp".into(), json!(timestamp(self.timestamp_us)));
        doc.insert("message".into(), json!(self.message));
        doc.insert("event".into(), json!({"dataset": "kubernetes.event", "kind": "event"}));
        doc.insert("log".into(), json!({"level": self.level()}));
        let mut event = Map::new();
        for (key, value) in self.fields() {
            insert_dotted(&mut event, key, value);
        }
        let mut kubernetes = Map::new();
        kubernetes.insert("event".into(), Value::Object(event));
        if let Some(pod) = &self.pod {
            kubernetes.insert("namespace".into(), json!(self.object.namespace));
            kubernetes.insert("pod".into(), json!({"name": self.object.name, "uid": self.object.uid}));
            if let Some(node) = &pod.node {
                kubernetes.insert("node".into(), json!({"name": node}));
            }
            if let Some(meta) = &pod.meta {
                if !meta.labels.is_empty() {
                    let labels: BTreeMap<String, Value> = meta.labels.iter().map(|(k, v)| (dedot(k), json!(v))).collect();
                    kubernetes.insert("labels".into(), json!(labels));
                }
                if let Some(w) = &meta.workload {
                    kubernetes.insert(w.kind.as_str().into(), json!({"name": w.name}));
                    if let Some(job) = &w.job {
                        kubernetes.insert("job".into(), json!({"name": job}));
                    }
                }
                doc.insert("service".into(), json!({"name": meta.app}));
                if !meta.user.is_empty() {
                    doc.insert("user".into(), json!({"name": meta.user}));
                }
            }
        } else if self.object.kind == "Node" && !self.object.name.is_empty() {
            kubernetes.insert("node".into(), json!({"name": self.object.name}));
        } else if !self.object.namespace.is_empty() {
            kubernetes.insert("namespace".into(), json!(self.object.namespace));
        }
        doc.insert("kubernetes".into(), Value::Object(kubernetes));
        if !cluster.is_empty() {
            doc.insert("orchestrator".into(), json!({"cluster": {"name": cluster}}));
        }
        serde_json::to_writer(&mut *out, &Value::Object(doc)).expect("vec write");
        out.push(b'\n');
    }
}

/// RFC 3339 with microseconds, UTC.
fn timestamp(micros: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_microsecond(micros)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000000Z".into())
}

fn insert_dotted(map: &mut Map<String, Value>, key: &str, value: Value) {
    match key.split_once('.') {
        Some((head, rest)) => {
            let inner = map.entry(head).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = inner {
                insert_dotted(inner, rest, value);
            }
        }
        None => {
            map.insert(key.into(), value);
        }
    }
}

#[cfg(test)]
#[path = "record_tests.rs"]
pub(crate) mod tests;
