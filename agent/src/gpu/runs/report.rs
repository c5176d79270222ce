//! A GPU run report: what one container did with its GPUs, written once when it ends, and its
//! ECS document (`event.dataset: nodelens.gpu_run`).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::logs::source::FileId;

/// How a run ended, the `outcome` label of `nodelens_gpu_run_seconds_total`.
pub const OUTCOMES: [&str; 5] = ["succeeded", "failed", "oomkilled", "evicted", "unknown"];

/// The container a run belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Who {
    /// The runtime's container id (the report's `_id` derives from it).
    pub container_id: String,
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container name.
    pub container: String,
    /// Image reference.
    pub image: String,
    /// Application (`service.name`).
    pub app: String,
    /// User (`user.name`).
    pub user: String,
}

/// One ended run, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Whose run.
    pub who: Who,
    /// `state.running.startedAt`, Unix seconds.
    pub started: Option<f64>,
    /// When it ended (`state.terminated.finishedAt`, else when the agent saw it end), Unix seconds.
    pub ended: f64,
    /// GPU-seconds: each GPU's share times the time it was held.
    pub gpu_seconds: f64,
    /// The largest number of GPUs held at once, counted by share.
    pub gpus: f64,
    /// Time-weighted mean of the container's SM utilization, over its GPUs.
    pub sm_utilization_mean: Option<f64>,
    /// Time-weighted mean of GPM SM activity, where the container held its GPU (or MIG
    /// instance) alone.
    pub sm_active_mean: Option<f64>,
    /// The same for tensor-core activity.
    pub tensor_active_mean: Option<f64>,
    /// The most device memory its processes held at once, over all its GPUs.
    pub memory_used_peak_bytes: Option<f64>,
    /// Its share of its GPUs' energy, joules.
    pub energy_joules: Option<f64>,
    /// XIDs on its GPUs while it held them.
    pub xid_errors: u64,
    /// Seconds its GPUs ran with clocks held down (power, thermal, hardware slowdown).
    pub throttled_seconds: f64,
    /// The exit code, when the kubelet reported one.
    pub exit_code: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`, ...; `unknown` when the container's end was not
    /// reported (its pod deleted first).
    pub exit_reason: String,
    /// One of [`OUTCOMES`].
    pub outcome: String,
    /// The last value of each log-derived gauge of its pod, by rule name.
    pub log_metrics: Vec<(String, f64)>,
}

impl Report {
    /// The report's source, whose record 0 is the report: the document id
    /// (`source().record_id(0)`) is the same for the same container, so a report sent again is
    /// recognised as a duplicate.
    pub fn source(&self) -> FileId {
        let id = self.who.container_id.as_bytes();
        FileId { container: xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x6770_755f_7275_6e73), fingerprint: xxhash_rust::xxh3::xxh3_64(id) }
    }

    /// Seconds from start to end, when the start is known.
    pub fn duration_seconds(&self) -> Option<f64> {
        self.started.map(|s| (self.ended - s).max(0.0))
    }

    /// One line of text for `message`.
    pub fn message(&self) -> String {
        let w = &self.who;
        format!(
            "GPU run of {}/{} container {} ended ({}): {:.1} GPU-hours",
            w.namespace,
            w.pod,
            w.container,
            self.exit_reason,
            self.gpu_seconds / 3600.0
        )
    }

    /// The `nodelens.run` object's fields, in document order; absent values left out.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let time =
            |s: f64| humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(s.max(0.0))).to_string();
        let mut fields = Vec::new();
        if let Some(started) = self.started {
            fields.push(("started", json!(time(started))));
        }
        fields.push(("ended", json!(time(self.ended))));
        if let Some(d) = self.duration_seconds() {
            fields.push(("duration_seconds", json!(d)));
        }
        fields.push(("gpu_seconds", json!(self.gpu_seconds)));
        // For Kibana's sums, which cannot divide.
        fields.push(("gpu_hours", json!(self.gpu_seconds / 3600.0)));
        fields.push(("gpus", json!(self.gpus)));
        let optional = [
            ("sm_utilization_mean", self.sm_utilization_mean),
            ("sm_active_mean", self.sm_active_mean),
            ("tensor_active_mean", self.tensor_active_mean),
            ("memory_used_peak_bytes", self.memory_used_peak_bytes),
            ("energy_joules", self.energy_joules),
        ];
        fields.extend(optional.into_iter().filter_map(|(k, v)| Some((k, json!(v?)))));
        fields.push(("xid_errors", json!(self.xid_errors)));
        fields.push(("throttled_seconds", json!(self.throttled_seconds)));
        if let Some(code) = self.exit_code {
            fields.push(("exit_code", json!(code)));
        }
        fields.push(("exit_reason", json!(self.exit_reason)));
        fields.push(("outcome", json!(self.outcome)));
        fields
    }

    /// Appends the report's ECS document and a newline to `out`.
    pub fn encode(&self, node: &str, cluster: &str, out: &mut Vec<u8>) {
        let w = &self.who;
        let mut run: Map<String, Value> = self.fields().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if !self.log_metrics.is_empty() {
            run.insert("log_metrics".into(), self.log_metrics.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>().into());
        }
        let mut doc = Map::new();
        doc.insert("@timestamp".into(), run["ended"].clone());
        doc.insert("message".into(), json!(self.message()));
        doc.insert("event".into(), json!({"dataset": "nodelens.gpu_run", "kind": "event", "outcome": if self.outcome == "succeeded" { "success" } else { "failure" }}));
        let mut container = json!({"id": w.container_id});
        if !w.image.is_empty() {
            container["image"] = json!({"name": w.image});
        }
        doc.insert("container".into(), container);
        doc.insert(
            "kubernetes".into(),
            json!({"namespace": w.namespace, "pod": {"name": w.pod, "uid": w.pod_uid}, "container": {"name": w.container}, "node": {"name": node}}),
        );
        doc.insert("service".into(), json!({"name": w.app}));
        if !w.user.is_empty() {
            doc.insert("user".into(), json!({"name": w.user}));
        }
        doc.insert("host".into(), json!({"name": node}));
        if !cluster.is_empty() {
            doc.insert("orchestrator".into(), json!({"cluster": {"name": cluster}}));
        }
        doc.insert("nodelens".into(), json!({"run": run}));
        serde_json::to_writer(&mut *out, &Value::Object(doc)).expect("vec write");
        out.push(b'\n');
    }
}

/// The outcome of a container's end: `reason` as the kubelet gave it (`None`: no end seen).
pub fn outcome(evicted: bool, exit: Option<(i32, &str)>) -> &'static str {
    match exit {
        _ if evicted => "evicted",
        // The kubelet lost the container (its node restarted): how it ended is not known.
        None | Some((_, "ContainerStatusUnknown")) => "unknown",
        Some((_, "OOMKilled")) => "oomkilled",
        Some((_, "Evicted")) => "evicted",
        Some((0, "Completed" | "")) => "succeeded",
        Some(_) => "failed",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn report() -> Report {
        Report {
            who: Who {
                container_id: "a".repeat(64),
                namespace: "ml".into(),
                pod: "trainer-0".into(),
                pod_uid: "u-1".into(),
                container: "main".into(),
                image: "registry/trainer:1".into(),
                app: "resnet".into(),
                user: "alice".into(),
            },
            started: Some(1_764_800_000.0),
            ended: 1_764_803_600.0,
            gpu_seconds: 1800.0,
            gpus: 0.5,
            sm_utilization_mean: Some(0.3),
            sm_active_mean: Some(0.25),
            tensor_active_mean: Some(0.1),
            memory_used_peak_bytes: Some(1e10),
            energy_joules: Some(360_000.0),
            xid_errors: 1,
            throttled_seconds: 12.0,
            exit_code: Some(137),
            exit_reason: "OOMKilled".into(),
            outcome: "oomkilled".into(),
            log_metrics: vec![("loss".into(), 0.53)],
        }
    }

    #[test]
    fn a_report_is_one_ecs_document_every_field_of_which_the_index_template_maps() {
        let mut out = Vec::new();
        report().encode("gpu-7", "prod", &mut out);
        assert!(out.ends_with(b"\n"));
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["event"]["dataset"], "nodelens.gpu_run");
        assert_eq!(doc["@timestamp"], "2025-12-03T23:13:20.000Z");
        let run = &doc["nodelens"]["run"];
        assert_eq!(run["started"], "2025-12-03T22:13:20.000Z");
        assert_eq!(run["duration_seconds"], 3600.0);
        assert_eq!(run["exit_code"], 137, "a number");
        assert_eq!(run["exit_reason"], "OOMKilled");
        assert_eq!(run["log_metrics"]["loss"], 0.53);
        assert_eq!((doc["service"]["name"].as_str(), doc["user"]["name"].as_str()), (Some("resnet"), Some("alice")));
        assert_eq!(doc["kubernetes"]["pod"]["uid"], "u-1");
        let template: Value = serde_json::from_str(include_str!("../../../../deploy/elasticsearch/gpu-runs-index-template.json")).unwrap();
        let mappings = &template["template"]["mappings"]["properties"];
        let mut fields = Vec::new();
        leaves(&doc, "", &mut fields);
        assert!(fields.len() > 25, "{fields:?}");
        for field in fields.iter().filter(|f| !f.starts_with("nodelens.run.log_metrics.")) {
            let mapped = field.split('.').try_fold(mappings, |m, part| m.get(part).map(|p| p.get("properties").unwrap_or(p)));
            assert!(mapped.is_some(), "{field} is not mapped by gpu-runs-index-template.json");
        }
        assert_eq!(report().source().record_id(0), report().source().record_id(0));
        let mut other = report();
        other.who.container_id = "b".repeat(64);
        assert_ne!(report().source().record_id(0), other.source().record_id(0), "the id is the container's");
    }

    #[test]
    fn outcomes_follow_the_kubelets_reason_and_an_eviction() {
        assert_eq!(outcome(false, Some((0, "Completed"))), "succeeded");
        assert_eq!(outcome(false, Some((1, "Error"))), "failed");
        assert_eq!(outcome(false, Some((137, "OOMKilled"))), "oomkilled");
        assert_eq!(outcome(true, Some((137, "Error"))), "evicted");
        assert_eq!(outcome(false, None), "unknown");
        assert_eq!(outcome(false, Some((137, "ContainerStatusUnknown"))), "unknown");
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
}
