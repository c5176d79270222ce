use super::*;
use crate::kube::meta::{Workload, WorkloadKind};

fn event(json: Value) -> Event {
    serde_json::from_value(json).unwrap()
}

/// A pod's BackOff Warning, its pod found on node `gpu-3`.
pub(crate) fn pod_event() -> EventRecord {
    let mut record = EventRecord::from_event(&event(json!({
        "metadata": {"name": "web-7d9f8b6c5d-x2k4p.181d3c4a", "namespace": "prod", "uid": "ev-1", "resourceVersion": "4711"},
        "involvedObject": {"kind": "Pod", "name": "web-7d9f8b6c5d-x2k4p", "namespace": "prod", "uid": "pod-1", "fieldPath": "spec.containers{app}"},
        "reason": "BackOff", "message": "Back-off restarting failed container app", "type": "Warning", "count": 7,
        "firstTimestamp": "2025-12-04T11:00:00Z", "lastTimestamp": "2025-12-04T12:00:00.123456Z",
        "source": {"component": "kubelet", "host": "gpu-3"}
    })))
    .unwrap();
    let meta = PodMeta {
        namespace: "prod".into(),
        name: "web-7d9f8b6c5d-x2k4p".into(),
        uid: "pod-1".into(),
        ip: None,
        labels: [("app.kubernetes.io/name".to_string(), "web".to_string())].into(),
        annotations: BTreeMap::new(),
        workload: Some(Workload { kind: WorkloadKind::Deployment, name: "web".into(), job: None }),
        containers: Vec::new(),
        app: "web".into(),
        user: "alice".into(),
        hami: None,
        evicted: false,
    };
    record.pod = Some(EventPod { meta: Some(Arc::new(meta)), node: Some("gpu-3".into()) });
    record
}

fn document(record: &EventRecord) -> Value {
    let mut out = Vec::new();
    record.encode("prod-cluster", &mut out);
    assert!(out.ends_with(b"\n"));
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn a_pods_event_carries_the_event_and_the_pods_kubernetes_fields_app_and_user() {
    let doc = document(&pod_event());
    assert_eq!(doc["@timestamp"], "2025-12-04T12:00:00.123456Z", "lastTimestamp");
    assert_eq!(doc["message"], "Back-off restarting failed container app");
    assert_eq!(doc["event"]["dataset"], "kubernetes.event");
    assert_eq!(doc["log"]["level"], "warning");
    let e = &doc["kubernetes"]["event"];
    assert_eq!((e["reason"].as_str(), e["type"].as_str()), (Some("BackOff"), Some("Warning")));
    assert_eq!(e["count"], 7, "an integer");
    assert_eq!(e["involved_object"], json!({"kind": "Pod", "name": "web-7d9f8b6c5d-x2k4p", "namespace": "prod", "uid": "pod-1"}));
    assert_eq!(e["source"], json!({"component": "kubelet", "host": "gpu-3"}));
    let k = &doc["kubernetes"];
    assert_eq!(k["namespace"], "prod");
    assert_eq!(k["pod"], json!({"name": "web-7d9f8b6c5d-x2k4p", "uid": "pod-1"}));
    assert_eq!(k["node"]["name"], "gpu-3", "the pod's node, not the leader's");
    assert_eq!(k["labels"]["app_kubernetes_io/name"], "web", "de-dotted");
    assert_eq!(k["deployment"]["name"], "web");
    assert_eq!((doc["service"]["name"].as_str(), doc["user"]["name"].as_str()), (Some("web"), Some("alice")));
    assert_eq!(doc["orchestrator"]["cluster"]["name"], "prod-cluster");
}

#[test]
fn a_gone_pods_event_still_names_the_pod_from_the_involved_object() {
    let mut record = pod_event();
    record.pod = Some(EventPod { meta: None, node: None });
    let doc = document(&record);
    assert_eq!(doc["kubernetes"]["namespace"], "prod");
    assert_eq!(doc["kubernetes"]["pod"]["uid"], "pod-1");
    assert!(doc.get("service").is_none() && doc.get("user").is_none() && doc["kubernetes"].get("node").is_none(), "{doc}");
}

#[test]
fn the_timestamp_falls_back_to_the_series_then_the_event_time_and_scheduler_events_need_no_source() {
    let scheduler = EventRecord::from_event(&event(json!({
        "metadata": {"name": "x", "namespace": "ml", "uid": "ev-2", "resourceVersion": "9"},
        "involvedObject": {"kind": "Pod", "name": "trainer-0", "namespace": "ml", "uid": "p"},
        "reason": "FailedScheduling", "message": "0/8 nodes are available: 8 Insufficient nvidia.com/gpu.", "type": "Warning",
        "eventTime": "2025-12-04T12:00:00.000001Z", "reportingComponent": "default-scheduler", "reportingInstance": "default-scheduler-cp-1",
        "series": {"count": 3, "lastObservedTime": "2025-12-04T12:05:00.500000Z"}
    })))
    .unwrap();
    assert_eq!(scheduler.count, Some(3), "a repeated scheduler Event counts in its series");
    let doc = document(&scheduler);
    assert_eq!(doc["@timestamp"], "2025-12-04T12:05:00.500000Z", "series.lastObservedTime before eventTime");
    assert_eq!(doc["kubernetes"]["event"]["count"], 3);
    assert_eq!(doc["kubernetes"]["event"]["source"]["component"], "default-scheduler", "reportingComponent without a source");
    let once = EventRecord::from_event(&event(json!({
        "metadata": {"uid": "ev-3", "resourceVersion": "1"}, "involvedObject": {}, "eventTime": "2025-12-04T12:00:00.000001Z"
    })))
    .unwrap();
    assert_eq!(document(&once)["@timestamp"], "2025-12-04T12:00:00.000001Z", "eventTime alone");
    assert!(document(&once)["kubernetes"]["event"].get("count").is_none(), "no count, no series: none");
}

#[test]
fn a_nodes_event_has_no_namespace_and_names_the_node() {
    let record = EventRecord::from_event(&event(json!({
        "metadata": {"name": "gpu-3.1", "namespace": "default", "uid": "ev-4", "resourceVersion": "12"},
        "involvedObject": {"kind": "Node", "name": "gpu-3", "uid": "gpu-3"},
        "reason": "NodeNotReady", "message": "Node gpu-3 status is now: NodeNotReady", "type": "Normal", "count": 1,
        "lastTimestamp": "2025-12-04T12:00:00Z", "source": {"component": "node-controller"}
    })))
    .unwrap();
    assert!(!record.about_pod());
    let doc = document(&record);
    assert!(doc["kubernetes"]["event"]["involved_object"].get("namespace").is_none());
    assert!(doc["kubernetes"].get("namespace").is_none());
    assert_eq!(doc["kubernetes"]["node"]["name"], "gpu-3");
    assert_eq!(doc["log"]["level"], "info");
    assert_eq!(doc["kubernetes"]["event"]["source"], json!({"component": "node-controller"}));
}

#[test]
fn the_id_is_the_same_for_a_version_and_differs_between_versions_and_events() {
    let a = pod_event();
    assert_eq!(a.id(), pod_event().id());
    let mut next = pod_event();
    next.version = "4712".into();
    assert_ne!(a.id(), next.id());
    let mut other = pod_event();
    other.uid = "ev-9".into();
    assert_ne!(a.id(), other.id());
    // The separator keeps ("ab", "1") and ("a", "b1") apart.
    let (mut x, mut y) = (pod_event(), pod_event());
    (x.uid, x.version, y.uid, y.version) = ("ab".into(), "1".into(), "a".into(), "b1".into());
    assert_ne!(x.id(), y.id());
}

#[test]
fn every_field_of_an_event_document_is_mapped_by_the_events_index_template() {
    let template: Value = serde_json::from_str(include_str!("../../../deploy/elasticsearch/events-index-template.json")).unwrap();
    assert_eq!(template["index_patterns"], json!(["logs-kubernetes.event-*"]));
    let mappings = &template["template"]["mappings"]["properties"];
    let mut fields = Vec::new();
    leaves(&document(&pod_event()), "", &mut fields);
    assert!(fields.len() > 20, "{fields:?}");
    for field in fields.iter().filter(|f| !f.starts_with("kubernetes.labels.")) {
        let mapped = field.split('.').try_fold(mappings, |m, part| m.get(part).map(|p| p.get("properties").unwrap_or(p)));
        assert!(mapped.is_some(), "{field} is not mapped by events-index-template.json");
    }
    assert_eq!(mappings["kubernetes"]["properties"]["labels"]["type"], "flattened");
    assert_eq!(mappings["kubernetes"]["properties"]["event"]["properties"]["count"]["type"], "long");
}

fn leaves(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                leaves(v, &if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}
