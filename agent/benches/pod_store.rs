//! Cost of pod metadata: heap bytes per cached pod and CPU per watch event, with 1,000
//! realistic pods (labels, a last-applied-configuration annotation, managed fields, two
//! containers with statuses) on the node, through the path the watch uses: the event JSON
//! is deserialised into a `Pod`, reduced to the agent's record, and applied to the store.
//!
//! `cargo bench --bench pod_store`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

mod common;

use k8s_openapi::api::core::v1::Pod;
use nodelens::identity::resolve::Key;
use nodelens::kube::meta;
use nodelens::kube::store::PodStore;
use prometheus_client::metrics::family::Family;
use serde_json::{json, Value};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PODS: usize = 1000;
const EVENTS: usize = 20_000;

fn pod_json(i: usize, generation: usize) -> Value {
    let name = format!("train-{}-7d9f8b6c5d-{i:05}", i % 37);
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": format!("team-{}", i % 20), "uid": format!("6f1c2d3e-0000-4a5b-9c8d-{i:012}"),
            "resourceVersion": format!("{}", 1000 + generation * PODS + i),
            "labels": {"app.kubernetes.io/name": format!("train-{}", i % 37), "app.kubernetes.io/instance": "prod", "pod-template-hash": "7d9f8b6c5d",
                       "user": format!("user{}", i % 50), "team": "ml", "tier": "gpu", "generation": generation.to_string()},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(1500), "prometheus.io/scrape": "true", "kubesphere.io/creator": "admin"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("train-{}-7d9f8b6c5d", i % 37), "uid": "rs", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}, "f:spec": {"f:containers": {}}}}]
        },
        "spec": {"nodeName": "gpu-node-1", "containers": [
            {"name": "trainer", "image": "registry.example/ml/trainer:2026.11", "resources": {"limits": {"nvidia.com/gpu": "1"}}, "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "sidecar", "image": "registry.example/proxy:1.2"}]},
        "status": {"phase": "Running", "podIP": "10.42.3.17", "hostIP": "10.0.0.5",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
            "containerStatuses": [
                {"name": "trainer", "image": "registry.example/ml/trainer:2026.11", "imageID": "sha256:abc", "ready": true, "restartCount": 1, "containerID": format!("containerd://{:064x}", i), "lastState": {"terminated": {"exitCode": 1, "containerID": format!("containerd://{:064x}", i + 1_000_000)}}},
                {"name": "sidecar", "image": "registry.example/proxy:1.2", "imageID": "sha256:def", "ready": true, "restartCount": 0, "containerID": format!("containerd://{:064x}", i + 2_000_000)}]}
    })
}

fn main() {
    let keys = |l: &[&str]| l.iter().map(|k| Key::parse(k).unwrap()).collect::<Vec<_>>();
    let store = PodStore::new(
        keys(&["label:app.kubernetes.io/name", "label:app", "label:k8s-app", "owner"]),
        keys(&["label:user", "annotation:kubesphere.io/creator", "label:owner"]),
        Family::default(),
    );
    let apply = |line: &[u8]| {
        let event: Value = serde_json::from_slice(line).unwrap();
        let pod: Pod = serde_json::from_value(event["object"].clone()).unwrap();
        store.apply(meta::from_pod(&pod, |a| store.wants_annotation(a)).unwrap());
    };
    let lines = |generation: usize| -> Vec<Vec<u8>> {
        (0..PODS).map(|i| serde_json::to_vec(&json!({"type": "MODIFIED", "object": pod_json(i, generation)})).unwrap()).collect()
    };

    let first = lines(0);
    let before = LIVE.load(Ordering::Relaxed);
    for line in &first {
        apply(line);
    }
    let held = LIVE.load(Ordering::Relaxed) - before;
    let event_bytes = first.iter().map(Vec::len).sum::<usize>() / PODS;
    drop(first);

    let batches: Vec<Vec<Vec<u8>>> = (1..=EVENTS / PODS).map(lines).collect();
    let start = common::cpu_seconds();
    let wall = Instant::now();
    for batch in &batches {
        for line in batch {
            apply(line);
        }
    }
    let cpu = common::cpu_seconds() - start;
    println!(
        "pod_store: {PODS} pods cached in {:.1} KiB of heap = {:.0} bytes per pod (watch event JSON {event_bytes} bytes); \
         {EVENTS} MODIFIED events: {:.1} µs CPU per event, {:.1}% of a core at 1,000 events/s (wall {:.2} s)",
        held as f64 / 1024.0,
        held as f64 / PODS as f64,
        cpu / EVENTS as f64 * 1e6,
        cpu / EVENTS as f64 * 1000.0 * 100.0,
        wall.elapsed().as_secs_f64()
    );
    assert_eq!(store.len(), PODS);
}
