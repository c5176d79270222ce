//! GPU run reports into the log sinks: one batch per report, to the
//! `sinks.elasticsearch.gpu_runs_data_stream` data stream (ECS) and as an OTLP LogRecord, each
//! with the report's deterministic id. The committer sets the report's `delivered` flag once
//! every sink has acknowledged it; the GPU side then remembers the container as reported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use crate::gpu::runs::report::Report;
use crate::gpu::runs::Delivery;
use crate::logs::ack::AckMsg;
use crate::node_logs::Feed;
use crate::otlp::{kv, push_present, text};
use crate::packed::Packer;
use crate::sinks::ecs::Documents;
use crate::sinks::Batch;

/// Hands every report from `reports` to the sinks until `stop` is set or the GPU side is gone.
pub fn run(feed: Feed, reports: Receiver<Delivery>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match reports.recv_timeout(Duration::from_millis(100)) {
            Ok(delivery) => {
                if !send(&feed, &delivery) {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// One report as one batch; false when the pipeline is gone.
fn send(feed: &Feed, delivery: &Delivery) -> bool {
    let report = &delivery.report;
    let source = report.source();
    let mut docs = Documents::default();
    if feed.formats.documents() {
        report.encode(&feed.node, &feed.cluster, &mut docs.bytes);
        docs.ends.push(docs.bytes.len() as u32);
        docs.offsets.push(0);
    }
    let mut otlp = Vec::new();
    if feed.formats.otlp_records() {
        let observed = crate::otlp::unix_nanos(std::time::SystemTime::now());
        encode_otlp(report, &feed.node, &feed.cluster, observed, &mut otlp);
    }
    let seq = feed.seq.fetch_add(1, Ordering::Relaxed);
    let sinks = feed.sinks.len() as u32;
    let index = Some(feed.index.clone());
    let batch = Arc::new(Packer::with(|packer| Batch::new(seq, source, 1, index).packed(&mut docs, &otlp, feed.formats, packer)));
    if feed.acks.blocking_send(AckMsg::RegisterNotify { seq, done: delivery.delivered.clone(), sinks }).is_err() {
        return false;
    }
    feed.sinks.iter().all(|sink| sink.blocking_send(batch.clone()).is_ok())
}

/// Appends one `ResourceLogs` whose resource is the container and whose one record is the
/// report: `nodelens.run.*` attributes as in the ECS document, `log.record.uid` its id.
pub fn encode_otlp(report: &Report, node: &str, cluster: &str, observed: u64, out: &mut Vec<u8>) {
    let w = &report.who;
    let mut resource = vec![kv("k8s.node.name", text(node)), kv("host.name", text(node))];
    if !cluster.is_empty() {
        resource.push(kv("k8s.cluster.name", text(cluster)));
    }
    push_present(
        &mut resource,
        [
            ("k8s.namespace.name", &w.namespace),
            ("k8s.pod.name", &w.pod),
            ("k8s.pod.uid", &w.pod_uid),
            ("k8s.container.name", &w.container),
            ("container.id", &w.container_id),
            ("container.image.name", &w.image),
            ("service.name", &w.app),
            ("user.name", &w.user),
        ],
    );
    let mut attributes = vec![
        kv("event.dataset", text("nodelens.gpu_run")),
        kv("log.record.uid", Value::StringValue(format!("{:032x}", report.source().record_id(0)))),
    ];
    for (key, value) in report.fields() {
        let value = match value {
            serde_json::Value::String(s) => Value::StringValue(s),
            serde_json::Value::Number(n) if n.is_i64() => Value::IntValue(n.as_i64().unwrap_or_default()),
            serde_json::Value::Number(n) => Value::DoubleValue(n.as_f64().unwrap_or_default()),
            _ => continue,
        };
        attributes.push(kv(format!("nodelens.run.{key}"), value));
    }
    for (name, value) in &report.log_metrics {
        attributes.push(kv(format!("nodelens.run.log_metrics.{name}"), Value::DoubleValue(*value)));
    }
    let ended = (report.ended.max(0.0) * 1e9) as u64;
    let logs = ResourceLogs {
        resource: Some(Resource { attributes: resource, ..Default::default() }),
        scope_logs: vec![ScopeLogs {
            scope: Some(InstrumentationScope { name: "nodelens".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }),
            log_records: vec![LogRecord {
                time_unix_nano: ended,
                observed_time_unix_nano: observed,
                body: Some(AnyValue { value: Some(Value::StringValue(report.message())) }),
                attributes,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    };
    logs.encode(out).expect("a Vec grows");
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;

    use super::*;

    #[test]
    fn a_report_is_one_otlp_record_of_its_container_with_numbers_as_numbers() {
        let report = crate::gpu::runs::report::tests::report();
        let mut part = Vec::new();
        encode_otlp(&report, "gpu-7", "", 5, &mut part);
        let request = ExportLogsServiceRequest::decode(&crate::otlp::logs::request([part.as_slice()])[..]).unwrap();
        let logs = &request.resource_logs[0];
        let resource = &logs.resource.as_ref().unwrap().attributes;
        let pod = resource.iter().find(|a| a.key == "k8s.pod.name").and_then(|a| a.value.clone()).and_then(|v| v.value);
        assert_eq!(pod, Some(text("trainer-0")));
        let r = &logs.scope_logs[0].log_records[0];
        assert_eq!(r.time_unix_nano, 1_764_803_600_000_000_000);
        let attr = |k: &str| r.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()).and_then(|v| v.value);
        assert_eq!(attr("nodelens.run.exit_code"), Some(Value::IntValue(137)));
        assert_eq!(attr("nodelens.run.exit_reason"), Some(text("OOMKilled")));
        assert_eq!(attr("nodelens.run.gpu_seconds"), Some(Value::DoubleValue(1800.0)));
        assert_eq!(attr("nodelens.run.log_metrics.loss"), Some(Value::DoubleValue(0.53)));
        assert_eq!(attr("log.record.uid"), Some(text(&format!("{:032x}", report.source().record_id(0)))));
    }
}
