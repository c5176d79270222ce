//! Every part's metric handles, made and handed to the registry ([`crate::metrics`]) under
//! the names SPEC.md fixes; the agent gives each part its handles.

use std::sync::Arc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::certs::CertMetrics;
use crate::events::EventMetrics;
use crate::gpu::export::{self, GpuExport};
use crate::gpu::runs::RunSeconds;
use crate::identity::ContainerLabels;
use crate::kube::store::PodInfoLabels;
use crate::kube::watch::WatchLabels;
use crate::logs::derived::Totals;
use crate::metrics::{Exposition, Registrar};
use crate::pipeline::LogMetrics;
use crate::process::{self, ProcessCollector};
use crate::sinks::SinkMetrics;

/// All metrics and the registry that serves them.
pub struct Metrics {
    /// The registry `/metrics` encodes and the OTLP push sends.
    pub exposition: Arc<Exposition>,
    /// Log pipeline metrics.
    pub logs: LogMetrics,
    /// Sink metrics.
    pub sinks: SinkMetrics,
    /// `nodelens_pod_info`.
    pub pod_info: Family<PodInfoLabels, Gauge>,
    /// Certificate expiry.
    pub certs: CertMetrics,
    /// `nodelens_kubernetes_watch_up`: a series per watch started.
    pub kube_watch_up: Family<WatchLabels, Gauge>,
    /// `nodelens_container_shm_bytes`.
    pub shm: Family<ContainerLabels, Gauge>,
    /// GPU and GPU attribution series.
    pub gpu: GpuExport,
    /// `nodelens_gpu_run_seconds_total`.
    pub gpu_run_seconds: RunSeconds,
    /// `nodelens_gpu_run_reports_dropped_total`.
    pub gpu_run_reports_dropped: prometheus_client::metrics::counter::Counter,
    /// The Kubernetes Events' election and watch.
    pub events: EventMetrics,
}

impl Metrics {
    /// Registers every metric, labelled with `node`.
    pub fn new(node: &str) -> Metrics {
        let mut r = Registrar::new(node);
        let mut logs = LogMetrics::default();
        logs.counts.throttled = logs.tailer.throttled.clone();
        let sinks = SinkMetrics::default();
        r.add("log_records", "Log records read, by namespace, app, stream and level", logs.counts.records.clone());
        r.add("log_bytes", "Message bytes of log records read", logs.counts.bytes.clone());
        r.add("log_records_flagged", "Records shipped truncated, partial or malformed", logs.counts.flagged.clone());
        r.add("log_records_dropped", "Records not delivered, by reason", sinks.dropped.clone());
        r.add("log_files_tailed", "Container instances whose log is followed", logs.tailer.files_tailed.clone());
        r.add("log_files_open", "Log files held open (idle ones are closed)", logs.tailer.files_open.clone());
        r.add("log_backlog_bytes", "Bytes of log files on disk not yet acknowledged by the sinks", logs.tailer.backlog_bytes.clone());
        r.add("log_records_throttled", "Records that waited on disk for their container's rate limit", logs.tailer.throttled.clone());
        r.add("log_lost_bytes", "Bytes removed by log rotation before they were read", logs.tailer.lost_bytes.clone());
        r.add(
            "log_files_lost",
            "Log files gone (rotated away, deleted, unreadable) before they were read to their end",
            logs.tailer.files_lost.clone(),
        );
        r.add(
            "log_files_truncated",
            "Log files truncated in place (copytruncate) and read again from the start",
            logs.tailer.truncated.clone(),
        );
        r.add(
            "checkpoint_write_errors",
            "Attempts to write the checkpoint file that failed (retried every second; shipping goes on)",
            logs.checkpoints.write_errors.clone(),
        );
        r.add(
            "checkpoint_last_success_timestamp_seconds",
            "When the checkpoint file last held every acknowledged offset, Unix seconds",
            logs.checkpoints.last_success.clone(),
        );
        r.add(
            "state_dir_lock_waiting",
            "1 while start-up waits for another agent to release state_dir's lock (not ready meanwhile)",
            logs.checkpoints.lock_waiting.clone(),
        );
        r.add(
            "log_paths_skipped",
            "Entries under pods_dir skipped because they cannot be a pod's (counted once per path)",
            logs.tailer.paths_skipped.clone(),
        );
        r.add(
            "node_log_records",
            "Records of the node's own logs read, by source (kernel, journald) and syslog level",
            logs.node.records.clone(),
        );
        r.add(
            "log_lost_records",
            "Records of the node's logs lost before they were read (kernel: overwritten in the ring)",
            logs.node.lost.clone(),
        );
        r.add(
            "container_gpu_xid_errors",
            "GPU XIDs read from the kernel log since the agent started, by the container whose process raised them",
            logs.node.xid_errors.clone(),
        );
        r.add("log_metric", "Log-derived gauges: the last value matched", logs.derived.gauges.clone());
        r.add_collector(Box::new(Totals(logs.derived.totals.clone())), &["nodelens_log_metric_total"]);
        r.add(
            "log_metric_series_refused",
            "Log-derived series not created because the rule's max_series was reached",
            logs.derived.refused.clone(),
        );
        r.add("sink_records", "Records handed to sinks, by outcome", sinks.records.clone());
        r.add("sink_request_duration_seconds", "Duration of sink requests", sinks.request_duration.clone());
        r.add("sink_retries", "Sink requests retried after a failure", sinks.retries.clone());
        r.add("otlp_metric_points", "Data points of the OTLP metrics push, by outcome", sinks.pushed_points.clone());
        let pod_info = Family::default();
        r.add("pod_info", "1 for every pod on the node, with its application, user and workload", pod_info.clone());
        let kube_watch_up = Family::default();
        r.add(
            "kubernetes_watch_up",
            "1 while the watch of this resource is listed and running, 0 while it fails and is retried",
            kube_watch_up.clone(),
        );
        let certs = CertMetrics::default();
        r.add("certificate_not_after_seconds", "Expiry of each certificate found, in Unix seconds", certs.not_after.clone());
        r.add("certificate_errors", "Certificate files that could not be read or held no valid certificate", certs.errors.clone());
        let shm = Family::default();
        r.add("container_shm_bytes", "Size of each running container's /dev/shm", shm.clone());
        let gpu = GpuExport::default();
        let gpu_run_seconds = RunSeconds::default();
        r.add(
            "gpu_run_seconds",
            "GPU-seconds (each GPU's share times the time held) of container runs that ended, by outcome",
            gpu_run_seconds.clone(),
        );
        let gpu_run_reports_dropped = prometheus_client::metrics::counter::Counter::default();
        r.add(
            "gpu_run_reports_dropped",
            "GPU run reports dropped unsent because too many waited for the sinks",
            gpu_run_reports_dropped.clone(),
        );
        let events = EventMetrics { watch_up: kube_watch_up.clone(), ..EventMetrics::default() };
        r.add(
            "events_leader",
            "1 while this agent holds the Events Lease and ships the cluster's Kubernetes Events, 0 on the others",
            events.leader.clone(),
        );
        r.add(
            "kubernetes_events",
            "Versions of Kubernetes Events received from the leader's watch, by type and reason (known reasons, else other)",
            events.events.clone(),
        );
        r.add("kubernetes_event_records", "Kubernetes Event records handed to the sinks, listed ones included", events.records.clone());
        r.add(
            "kubernetes_event_relists",
            "Lists of the Events after the first of a leadership (410 Gone, a broken watch, an API outage)",
            events.relists.clone(),
        );
        r.add_collector(Box::new(gpu.clone()), export::NAMES);
        r.add_collector(Box::new(ProcessCollector), process::NAMES);
        let exposition = Arc::new(r.finish());
        Metrics { exposition, logs, sinks, pod_info, kube_watch_up, certs, shm, gpu, gpu_run_seconds, gpu_run_reports_dropped, events }
    }

    /// Every metric name the agent exports (as series are named: counters end in `_total`),
    /// whether or not it has series yet.
    pub fn names(&self) -> &[String] {
        self.exposition.names()
    }

    /// The registry in the text exposition format.
    pub fn encode(&self) -> String {
        self.exposition.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::counts::RecordLabels;

    #[test]
    fn every_series_carries_node_and_the_spec_names() {
        let m = Metrics::new("gpu-7");
        m.logs
            .counts
            .records
            .get_or_create(&RecordLabels { namespace: "ml".into(), app: "a".into(), stream: "stdout", level: "unknown" })
            .inc();
        m.logs.tailer.files_tailed.set(3);
        let text = m.encode();
        assert!(text.contains(r#"nodelens_build_info{node="gpu-7",version=""#), "{text}");
        assert!(
            text.contains(r#"nodelens_log_records_total{node="gpu-7",namespace="ml",app="a",stream="stdout",level="unknown"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"nodelens_log_files_tailed{node="gpu-7"} 3"#), "{text}");
        assert!(text.contains("nodelens_log_backlog_bytes{"), "{text}");
        assert!(text.contains("nodelens_log_lost_bytes_total{"), "{text}");
        assert!(text.contains("nodelens_log_files_truncated_total{"), "{text}");
        for name in [
            "nodelens_log_files_lost_total",
            "nodelens_log_paths_skipped_total",
            "nodelens_checkpoint_write_errors_total",
            "nodelens_checkpoint_last_success_timestamp_seconds",
            "nodelens_state_dir_lock_waiting",
            "nodelens_process_open_fds",
            "nodelens_process_max_fds",
        ] {
            assert!(text.contains(&format!("{name}{{node=\"gpu-7\"}} ")), "{name} exported from the start:\n{text}");
        }
        assert!(text.contains(r#"nodelens_process_cpu_seconds_total{node="gpu-7"} "#), "{text}");
        assert!(!text.contains("nodelens_events_leader{"), "no series without Events (a 0 would read as no leader):\n{text}");
        m.events.leader.get_or_create(&crate::events::LeaderLabels {}).set(1);
        let mut warning = crate::events::record::tests::pod_event();
        m.events.count(&warning);
        warning.reason = "SomethingNew".into();
        m.events.count(&warning);
        let text = m.encode();
        assert!(text.contains(r#"nodelens_kubernetes_events_total{node="gpu-7",type="Warning",reason="BackOff"} 1"#), "{text}");
        assert!(text.contains(r#"nodelens_events_leader{node="gpu-7"} 1"#), "{text}");
        assert!(text.contains(r#"nodelens_kubernetes_events_total{node="gpu-7",type="Warning",reason="other"} 1"#), "{text}");
        assert!(text.contains(r#"nodelens_process_resident_memory_bytes{node="gpu-7"} "#), "{text}");
    }
}
