//! A node log record and its ECS document.

use serde_json::{json, Map, Value};

use crate::identity::ContainerLabels;

/// The container a kernel record is attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributed {
    /// Its names.
    pub labels: ContainerLabels,
    /// The pod's UID.
    pub pod_uid: String,
    /// The runtime's container id.
    pub container_id: String,
}

/// A GPU error (XID) named by a kernel record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuError {
    /// The XID number.
    pub xid: u32,
    /// The GPU's PCI bus id as the driver wrote it.
    pub pci_bus_id: String,
    /// The GPU's UUID, when known.
    pub uuid: Option<String>,
    /// The container that raised it, when its process was found in one.
    pub container: Option<Attributed>,
}

/// One record of the journal or the kernel ring.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// `node.journald` or `node.kernel`.
    pub dataset: &'static str,
    /// Unix microseconds.
    pub timestamp_us: u64,
    /// The message.
    pub message: String,
    /// The syslog level.
    pub priority: Option<u8>,
    /// `_SYSTEMD_UNIT`.
    pub unit: Option<String>,
    /// `_PID`.
    pub pid: Option<u32>,
    /// `_COMM`.
    pub process_name: Option<String>,
    /// The message was cut at the bound.
    pub truncated: bool,
    /// With the source's id, the document id: the journal cursor's hash, the kernel sequence.
    pub id: u64,
    /// A GPU error the record reports.
    pub gpu: Option<GpuError>,
}

impl NodeRecord {
    /// Appends the record's ECS document and a newline to `out`.
    pub fn encode(&self, node: &str, cluster: &str, out: &mut Vec<u8>) {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(self.timestamp_us);
        let mut doc = Map::new();
        doc.insert("@timestamp".into(), json!(humantime::format_rfc3339_micros(time).to_string()));
        doc.insert("message".into(), json!(self.message));
        doc.insert("event".into(), json!({"dataset": self.dataset}));
        let mut log = Map::new();
        if let Some(priority) = self.priority {
            log.insert("syslog".into(), json!({"priority": priority}));
        }
        if self.truncated {
            log.insert("flags".into(), json!(["truncated"]));
        }
        if !log.is_empty() {
            doc.insert("log".into(), Value::Object(log));
        }
        if let Some(unit) = &self.unit {
            doc.insert("systemd".into(), json!({"unit": unit}));
        }
        let mut process = Map::new();
        if let Some(pid) = self.pid {
            process.insert("pid".into(), json!(pid));
        }
        if let Some(name) = &self.process_name {
            process.insert("name".into(), json!(name));
        }
        if !process.is_empty() {
            doc.insert("process".into(), Value::Object(process));
        }
        doc.insert("host".into(), json!({"name": node}));
        let mut kubernetes = json!({"node": {"name": node}});
        if !cluster.is_empty() {
            doc.insert("orchestrator".into(), json!({"cluster": {"name": cluster}}));
        }
        if let Some(gpu) = &self.gpu {
            doc.insert("error".into(), json!({"code": gpu.xid.to_string()}));
            let mut fields = json!({"xid": gpu.xid, "pci_bus_id": gpu.pci_bus_id});
            if let Some(uuid) = &gpu.uuid {
                fields["uuid"] = json!(uuid);
            }
            doc.insert("nodelens".into(), json!({"gpu": fields}));
            if let Some(c) = &gpu.container {
                let l = &c.labels;
                kubernetes["namespace"] = json!(l.namespace);
                kubernetes["pod"] = json!({"name": l.pod, "uid": c.pod_uid});
                kubernetes["container"] = json!({"name": l.container});
                doc.insert("container".into(), json!({"id": c.container_id}));
                doc.insert("service".into(), json!({"name": l.app}));
                if !l.user.is_empty() {
                    doc.insert("user".into(), json!({"name": l.user}));
                }
            }
        }
        doc.insert("kubernetes".into(), kubernetes);
        serde_json::to_writer(&mut *out, &Value::Object(doc)).expect("vec write");
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attributed_xid_carries_the_container_and_gpu_fields_and_every_field_is_mapped() {
        let labels = ContainerLabels {
            namespace: "ml".into(),
            pod: "trainer-0".into(),
            container: "main".into(),
            app: "resnet".into(),
            user: "alice".into(),
        };
        let record = NodeRecord {
            dataset: "node.kernel",
            timestamp_us: 1_764_800_000_123_456,
            message: "NVRM: Xid (PCI:0000:3b:00): 79, pid=7, name=python3, GPU has fallen off the bus.".into(),
            priority: Some(4),
            unit: None,
            pid: None,
            process_name: None,
            truncated: false,
            id: 12,
            gpu: Some(GpuError {
                xid: 79,
                pci_bus_id: "0000:3b:00".into(),
                uuid: None,
                container: Some(Attributed { labels, pod_uid: "u-1".into(), container_id: "c".repeat(64) }),
            }),
        };
        let mut out = Vec::new();
        record.encode("gpu-7", "prod", &mut out);
        assert!(out.ends_with(b"\n"));
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["@timestamp"], "2025-12-03T22:13:20.123456Z");
        assert_eq!(doc["error"]["code"], "79", "text");
        assert_eq!(doc["nodelens"]["gpu"]["xid"], 79, "number");
        assert_eq!(doc["nodelens"]["gpu"]["pci_bus_id"], "0000:3b:00");
        assert_eq!(doc["log"]["syslog"]["priority"], 4);
        assert_eq!(doc["kubernetes"]["namespace"], "ml");
        assert_eq!(doc["kubernetes"]["pod"]["name"], "trainer-0");
        assert_eq!(doc["kubernetes"]["container"]["name"], "main");
        assert_eq!(doc["kubernetes"]["node"]["name"], "gpu-7");
        assert_eq!(doc["service"]["name"], "resnet");
        assert_eq!(doc["user"]["name"], "alice");
        assert_eq!(doc["orchestrator"]["cluster"]["name"], "prod");
        assert_eq!(doc["event"]["dataset"], "node.kernel");

        let journal = NodeRecord {
            dataset: "node.journald",
            unit: Some("kubelet.service".into()),
            pid: Some(1),
            process_name: Some("kubelet".into()),
            truncated: true,
            gpu: None,
            ..record
        };
        let mut out = Vec::new();
        journal.encode("gpu-7", "prod", &mut out);
        let template: Value = serde_json::from_str(include_str!("../../../deploy/elasticsearch/node-index-template.json")).unwrap();
        let mappings = &template["template"]["mappings"]["properties"];
        let mut fields = Vec::new();
        leaves(&doc, "", &mut fields);
        leaves(&serde_json::from_slice(&out).unwrap(), "", &mut fields);
        assert!(fields.len() > 20, "{fields:?}");
        for field in fields {
            let mapped = field.split('.').try_fold(mappings, |m, part| m.get(part).map(|p| p.get("properties").unwrap_or(p)));
            assert!(mapped.is_some(), "{field} is not mapped by node-index-template.json");
        }
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
