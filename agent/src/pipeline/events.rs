//! Kubernetes Event records into the log sinks, on the route the node's logs and the GPU run
//! reports take: the records waiting at a moment make one batch (ECS documents for
//! `sinks.elasticsearch.events_data_stream`, one OTLP `ResourceLogs`), numbered with every
//! other batch and registered with the committer before any sink has it. Each document's id
//! comes from the Event's UID and resourceVersion.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::events::EventRecord;
use crate::logs::ack::AckMsg;
use crate::logs::source::FileId;
use crate::node_logs::Feed;
use crate::otlp::{kv, text};
use crate::packed::Packer;
use crate::sinks::ecs::Documents;
use crate::sinks::Batch;

/// The most records in one batch.
const MAX_BATCH: usize = 500;

/// The source of every Event record: with a record's [`EventRecord::id`] as its offset, its
/// document id.
pub const SOURCE: FileId = FileId { container: 0x6b38_735f_6576_656e, fingerprint: 0x7473_2f63_6f72_6576 };

/// Hands the records arriving on `records` to every sink until `stop` fires or the Events
/// part is gone; what waits at `stop` is sent first.
pub async fn run(feed: Feed, mut records: mpsc::Receiver<EventRecord>, mut stop: oneshot::Receiver<()>) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            first = records.recv() => first,
            _ = &mut stop => {
                records.close();
                while let Ok(record) = records.try_recv() {
                    batch.push(record);
                }
                if !batch.is_empty() {
                    send(&feed, batch).await;
                }
                return;
            }
        };
        let Some(first) = first else { return };
        // Room for what waits already (the last batch's went with it to be encoded).
        batch.reserve(records.len().min(MAX_BATCH - 1) + 1);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match records.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        if !send(&feed, std::mem::take(&mut batch)).await {
            return;
        }
    }
}

/// `records` as one batch to every sink; false when the pipeline is gone.
async fn send(feed: &Feed, records: Vec<EventRecord>) -> bool {
    let seq = feed.seq.fetch_add(1, Ordering::Relaxed);
    let sinks = feed.sinks.len() as u32;
    let (index, formats, cluster) = (Some(feed.index.clone()), feed.formats, feed.cluster.clone());
    let observed = crate::otlp::unix_nanos(std::time::SystemTime::now());
    // Encoding and compressing up to 500 Events, off the async threads: a new leader sends
    // every Event it listed, thousands of them.
    let pack = move || {
        let mut docs = Documents::default();
        if formats.documents() {
            for record in &records {
                record.encode(&cluster, &mut docs.bytes);
                docs.ends.push(docs.bytes.len() as u32);
                docs.offsets.push(record.id());
            }
        }
        let mut otlp = Vec::new();
        if formats.otlp_records() {
            encode_otlp(&records, &cluster, observed, &mut otlp);
        }
        Packer::with(|packer| Batch::new(seq, SOURCE, records.len(), index).packed(&mut docs, &otlp, formats, packer))
    };
    let Ok(batch) = tokio::task::spawn_blocking(pack).await else { return false };
    let batch = Arc::new(batch);
    // Events keep no position: a record lost in a crash is listed again by the next leader.
    let done = Arc::new(AtomicBool::new(false));
    if feed.acks.send(AckMsg::RegisterNotify { seq, done, sinks }).await.is_err() {
        return false;
    }
    for sink in &feed.sinks {
        if sink.send(batch.clone()).await.is_err() {
            return false;
        }
    }
    true
}

/// Appends one `ResourceLogs` (the cluster) holding `records`: each with its time, severity
/// (`WARN` for a Warning), `log.record.uid` (the Elasticsearch `_id`), `event.dataset`,
/// `kubernetes.event.*` and, for a pod's Events, the pod's `k8s.*`, `service.name` and
/// `user.name` as attributes.
pub fn encode_otlp(records: &[EventRecord], cluster: &str, observed: u64, out: &mut Vec<u8>) {
    let mut resource = Vec::new();
    if !cluster.is_empty() {
        resource.push(kv("k8s.cluster.name", text(cluster)));
    }
    let log_records = records
        .iter()
        .map(|r| {
            let mut attributes = vec![
                kv("event.dataset", text("kubernetes.event")),
                kv("log.record.uid", Value::StringValue(format!("{:032x}", SOURCE.record_id(r.id())))),
            ];
            attributes.extend(r.resource().into_iter().map(|(k, v)| kv(k, Value::StringValue(v))));
            for (key, value) in r.fields() {
                let value = match value {
                    serde_json::Value::String(s) => Value::StringValue(s),
                    serde_json::Value::Number(n) => Value::IntValue(n.as_i64().unwrap_or_default()),
                    _ => continue,
                };
                attributes.push(kv(format!("kubernetes.event.{key}"), value));
            }
            let (severity, severity_text) =
                if r.kind == "Warning" { (SeverityNumber::Warn, "WARN") } else { (SeverityNumber::Info, "INFO") };
            LogRecord {
                time_unix_nano: u64::try_from(r.timestamp_us).unwrap_or(0).saturating_mul(1000),
                observed_time_unix_nano: observed,
                severity_number: severity as i32,
                severity_text: severity_text.into(),
                body: Some(AnyValue { value: Some(Value::StringValue(r.message.clone())) }),
                attributes,
                ..Default::default()
            }
        })
        .collect();
    let logs = ResourceLogs {
        resource: Some(Resource { attributes: resource, ..Default::default() }),
        scope_logs: vec![ScopeLogs {
            scope: Some(InstrumentationScope { name: "nodelens".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }),
            log_records,
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
    use crate::events::record::tests::pod_event;

    #[test]
    fn a_pods_event_is_an_otlp_record_with_the_pods_attributes_and_the_documents_id() {
        let record = pod_event();
        let mut part = Vec::new();
        encode_otlp(std::slice::from_ref(&record), "prod", 5, &mut part);
        let request = ExportLogsServiceRequest::decode(&crate::otlp::logs::request([part.as_slice()])[..]).unwrap();
        let logs = &request.resource_logs[0];
        let resource = &logs.resource.as_ref().unwrap().attributes;
        assert_eq!(resource.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(), ["k8s.cluster.name"]);
        let r = &logs.scope_logs[0].log_records[0];
        let attr = |k: &str| r.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()).and_then(|v| v.value);
        assert_eq!(r.time_unix_nano, 1_764_849_600_123_456_000);
        assert_eq!(r.severity_text, "WARN");
        assert_eq!(attr("event.dataset"), Some(text("kubernetes.event")));
        assert_eq!(attr("kubernetes.event.reason"), Some(text("BackOff")));
        assert_eq!(attr("kubernetes.event.count"), Some(Value::IntValue(7)));
        assert_eq!(attr("k8s.pod.name"), Some(text("web-7d9f8b6c5d-x2k4p")));
        assert_eq!(attr("k8s.node.name"), Some(text("gpu-3")));
        assert_eq!(attr("service.name"), Some(text("web")));
        assert_eq!(attr("user.name"), Some(text("alice")));
        assert_eq!(attr("log.record.uid"), Some(text(&format!("{:032x}", SOURCE.record_id(record.id())))));
    }
}
