//! Node records as OTLP: one `ResourceLogs` per batch whose resource is the node
//! (`k8s.node.name`, `host.name`, `k8s.cluster.name`), each record with its time, syslog
//! severity, `log.record.uid` (the Elasticsearch `_id`) and the fields of its ECS document as
//! attributes (`systemd.unit`, `process.pid`, `nodelens.gpu.xid`, and for an attributed XID the
//! container's `k8s.*`, `service.name`, `user.name`).

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::record::NodeRecord;
use crate::logs::source::FileId;
use crate::otlp::{kv, push_present, text};

/// OTLP's severity of a syslog level (0 emergency … 7 debug).
fn severity(priority: u8) -> (SeverityNumber, &'static str) {
    match priority {
        0 | 1 => (SeverityNumber::Fatal, "FATAL"),
        2 | 3 => (SeverityNumber::Error, "ERROR"),
        4 => (SeverityNumber::Warn, "WARN"),
        5 | 6 => (SeverityNumber::Info, "INFO"),
        _ => (SeverityNumber::Debug, "DEBUG"),
    }
}

/// Appends one `ResourceLogs` holding `records` (of `source`) to `out`.
pub fn encode(records: &[NodeRecord], source: FileId, node: &str, cluster: &str, observed: u64, out: &mut Vec<u8>) {
    let mut resource = vec![kv("k8s.node.name", text(node)), kv("host.name", text(node))];
    if !cluster.is_empty() {
        resource.push(kv("k8s.cluster.name", text(cluster)));
    }
    let log_records = records.iter().map(|r| record(r, source, observed)).collect();
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

fn record(r: &NodeRecord, source: FileId, observed: u64) -> LogRecord {
    let mut attributes =
        vec![kv("event.dataset", text(r.dataset)), kv("log.record.uid", Value::StringValue(format!("{:032x}", source.record_id(r.id))))];
    let optional = [("systemd.unit", r.unit.as_deref()), ("process.executable.name", r.process_name.as_deref())];
    attributes.extend(optional.into_iter().filter_map(|(key, value)| Some(kv(key, text(value?)))));
    if let Some(pid) = r.pid {
        attributes.push(kv("process.pid", Value::IntValue(pid.into())));
    }
    if let Some(gpu) = &r.gpu {
        attributes.push(kv("error.code", text(&gpu.xid.to_string())));
        attributes.push(kv("nodelens.gpu.xid", Value::IntValue(gpu.xid.into())));
        attributes.push(kv("nodelens.gpu.pci_bus_id", text(&gpu.pci_bus_id)));
        if let Some(uuid) = &gpu.uuid {
            attributes.push(kv("nodelens.gpu.uuid", text(uuid)));
        }
        if let Some(c) = &gpu.container {
            let l = &c.labels;
            push_present(
                &mut attributes,
                [
                    ("k8s.namespace.name", &l.namespace),
                    ("k8s.pod.name", &l.pod),
                    ("k8s.pod.uid", &c.pod_uid),
                    ("k8s.container.name", &l.container),
                    ("container.id", &c.container_id),
                    ("service.name", &l.app),
                    ("user.name", &l.user),
                ],
            );
        }
    }
    let (severity_number, severity_text) = r.priority.map(severity).unwrap_or((SeverityNumber::Unspecified, ""));
    LogRecord {
        time_unix_nano: r.timestamp_us.saturating_mul(1000),
        observed_time_unix_nano: observed,
        severity_number: severity_number as i32,
        severity_text: severity_text.into(),
        body: Some(AnyValue { value: Some(Value::StringValue(r.message.clone())) }),
        attributes,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;

    use super::*;
    use crate::node_logs::record::GpuError;

    #[test]
    fn a_batch_is_one_resource_of_the_node_and_decodes_as_a_request_part() {
        let record = NodeRecord {
            dataset: "node.kernel",
            timestamp_us: 1_000_000,
            message: "NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error".into(),
            priority: Some(3),
            unit: None,
            pid: None,
            process_name: None,
            truncated: false,
            id: 7,
            gpu: Some(GpuError { xid: 48, pci_bus_id: "0000:3b:00".into(), uuid: None, container: None }),
        };
        let mut part = Vec::new();
        let source = FileId { container: 1, fingerprint: 0 };
        encode(&[record], source, "gpu-7", "", 5, &mut part);
        let request = ExportLogsServiceRequest::decode(&crate::otlp::logs::request([part.as_slice()])[..]).unwrap();
        let logs = &request.resource_logs[0];
        let node = logs.resource.as_ref().unwrap().attributes.iter().find(|a| a.key == "k8s.node.name").unwrap();
        assert_eq!(node.value.as_ref().unwrap().value, Some(text("gpu-7")));
        let r = &logs.scope_logs[0].log_records[0];
        assert_eq!((r.time_unix_nano, r.severity_text.as_str()), (1_000_000_000, "ERROR"));
        let attr = |k: &str| r.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()).and_then(|v| v.value);
        assert_eq!(attr("nodelens.gpu.xid"), Some(Value::IntValue(48)));
        assert_eq!(attr("log.record.uid"), Some(text(&format!("{:032x}", source.record_id(7)))));
        assert_eq!(attr("k8s.pod.name"), None, "no container: GPU fields only");
    }
}
