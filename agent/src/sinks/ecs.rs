//! Encodes records as Elastic Common Schema documents, with the field layout Filebeat's
//! container input and `add_kubernetes_metadata` write, so existing Kibana views keep working.
//!
//! Everything that is the same for all records of a container is rendered once into a
//! [`Template`]; per record only the timestamp, message, stream, offset and flags are written.

use std::io::Write;

use serde_json::{json, Map, Value};

use crate::identity::resolve::dedot;
use crate::logs::chunk::{Chunk, Flags, Record};
use crate::logs::enrich::Metadata;
use crate::logs::level::Level;
use crate::logs::structured::{Fields, Structured};
use crate::packed::{Piece, SPILL_BYTES};

/// The fixed part of a container's documents, pre-rendered as JSON.
#[derive(Debug, Clone)]
pub struct Template {
    /// `"container":{..},"kubernetes":{..},...}`: the document's tail after the `log` object.
    tail: Vec<u8>,
}

impl Template {
    /// Renders the fixed fields of `meta`.
    pub fn new(meta: &Metadata) -> Template {
        let mut container = Map::new();
        if let Some(id) = &meta.container_id {
            container.insert("id".into(), json!(id));
        }
        if let Some(runtime) = &meta.runtime {
            container.insert("runtime".into(), json!(runtime));
        }
        if let Some(image) = &meta.image {
            container.insert("image".into(), json!({"name": image}));
        }
        let mut doc = Map::new();
        if !container.is_empty() {
            doc.insert("container".into(), Value::Object(container));
        }
        let mut kubernetes = json!({
            "namespace": meta.namespace,
            "pod": {"name": meta.pod, "uid": meta.pod_uid},
            "container": {"name": meta.container, "restart_count": meta.restart},
            "node": {"name": meta.node},
        });
        if let Some(ip) = &meta.pod_ip {
            kubernetes["pod"]["ip"] = json!(ip);
        }
        if !meta.labels.is_empty() {
            kubernetes["labels"] = Value::Object(meta.labels.iter().map(|(k, v)| (dedot(k), json!(v))).collect());
        }
        if let Some((kind, name)) = &meta.workload {
            kubernetes[kind.as_str()] = json!({"name": name});
        }
        if let Some(job) = &meta.job {
            kubernetes["job"] = json!({"name": job});
        }
        doc.insert("kubernetes".into(), kubernetes);
        doc.insert("host".into(), json!({"name": meta.node}));
        if !meta.cluster.is_empty() {
            doc.insert("orchestrator".into(), json!({"cluster": {"name": meta.cluster}}));
        }
        doc.insert("service".into(), json!({"name": meta.app}));
        if !meta.user.is_empty() {
            doc.insert("user".into(), json!({"name": meta.user}));
        }
        let rendered = serde_json::to_vec(&Value::Object(doc)).expect("metadata serializes");
        Template { tail: rendered[1..].to_vec() }
    }
}

/// Documents of one chunk, each followed by a newline (NDJSON).
#[derive(Debug, Default)]
pub struct Documents {
    /// The documents, back to back.
    pub bytes: Vec<u8>,
    /// End of each document (after its newline) in `bytes`.
    pub ends: Vec<u32>,
    /// Each document's source offset, for its deterministic id.
    pub offsets: Vec<u64>,
}

impl Documents {
    /// Empties it, keeping its buffers.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.offsets.clear();
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Document `i` with its newline.
    pub fn doc(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }
}

/// Encodes every record of `chunk` with `template` into `out`; `levels[i]` is record i's
/// `log.level`, when known, and `structured` what the records' text gives.
/// `before` writes what precedes each document (given its offset): nothing, or its `_bulk`
/// action line when the documents are rendered for Elasticsearch alone. With `spill`, the
/// rendered bytes go into that piece every [`SPILL_BYTES`] and at the end (`out` keeps each
/// record's end and offset, counted from the chunk's first byte, and no bytes): the chunk's
/// documents are never held whole.
pub fn encode_chunk(
    chunk: &Chunk,
    template: &Template,
    levels: &[Option<Level>],
    structured: &Structured,
    out: &mut Documents,
    mut before: impl FnMut(u64, &mut Vec<u8>),
    mut spill: Option<&mut Piece<'_>>,
) {
    let mut file = Vec::with_capacity(64);
    file.extend_from_slice(b",\"file\":{\"path\":");
    serde_json::to_writer(&mut file, &chunk.source.path.to_string_lossy()).expect("vec write");
    file.extend_from_slice(b"}},");
    let estimate = chunk.buf.len() + chunk.records.len() * (template.tail.len() + file.len() + 96);
    out.bytes.reserve(if spill.is_some() { estimate.min(2 * SPILL_BYTES) } else { estimate });
    let piece_start = spill.as_deref().map_or(0, Piece::written);
    let mut in_order = structured.in_order();
    for (i, record) in chunk.records.iter().enumerate() {
        let fields = in_order.of(i).map(|f| (structured, f));
        before(record.offset, &mut out.bytes);
        encode_record(chunk, record, levels.get(i).copied().flatten(), fields, &file, template, &mut out.bytes);
        // Bytes already spilled.
        let spilled = spill.as_deref().map_or(0, Piece::written) - piece_start;
        out.ends.push((spilled + out.bytes.len()) as u32);
        out.offsets.push(record.offset);
        if let Some(piece) = spill.as_deref_mut() {
            piece.spill(&mut out.bytes);
        }
    }
    if let Some(piece) = spill {
        piece.write(&out.bytes);
        out.bytes.clear();
    }
}

fn encode_record(
    chunk: &Chunk,
    record: &Record,
    level: Option<Level>,
    fields: Option<(&Structured, &Fields)>,
    file: &[u8],
    template: &Template,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"{\"@timestamp\":\"");
    // Decoders only accept timestamps made of digits, `-:.TZ+`: safe unescaped.
    out.extend_from_slice(chunk.timestamp(record));
    out.extend_from_slice(b"\",\"message\":");
    // A JSON object's own message: already a JSON string token.
    if let Some((structured, Fields { message: Some(token), .. })) = fields {
        out.extend_from_slice(structured.bytes(token));
    } else {
        json_message(chunk.message(record), out);
    }
    let mut flags = record.flags;
    if let Some((_, extracted)) = fields {
        flags.insert(extracted.flags);
    }
    out.extend_from_slice(b",\"stream\":\"");
    out.extend_from_slice(record.stream.as_str().as_bytes());
    out.extend_from_slice(b"\",\"log\":{\"offset\":");
    out.extend_from_slice(itoa::Buffer::new().format(record.offset).as_bytes());
    if let Some(level) = level {
        out.extend_from_slice(b",\"level\":\"");
        out.extend_from_slice(level.as_str().as_bytes());
        out.push(b'"');
    }
    if !flags.is_empty() {
        write_flags(flags, out);
    }
    out.extend_from_slice(file);
    // `"trace":..,"span":..,"json":..,` found in the text.
    if let Some((structured, extracted)) = fields {
        out.extend_from_slice(structured.bytes(&extracted.ecs));
    }
    out.extend_from_slice(&template.tail);
    out.push(b'\n');
}

/// Writes a message as a JSON string, escaped as serde_json escapes it, invalid UTF-8
/// replaced as `String::from_utf8_lossy` does. Log lines are nearly always ASCII with nothing
/// to escape: one scan, eight bytes at a time, finds both the bytes to escape and where the
/// text stops being ASCII; only from there is it checked as UTF-8.
fn json_message(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + 2);
    out.push(b'"');
    if let Some(at) = escape::<true>(message, out) {
        // An ASCII prefix ends on a character boundary: the rest reads the same alone.
        let rest = &message[at..];
        match std::str::from_utf8(rest) {
            Ok(_) => escape::<false>(rest, out),
            Err(_) => escape::<false>(String::from_utf8_lossy(rest).as_bytes(), out),
        };
    }
    out.push(b'"');
}

/// Appends `bytes` escaped for a JSON string. With `ASCII`, stops at the first byte past
/// ASCII, written up to there, and returns where it is.
fn escape<const ASCII: bool>(bytes: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let mut start = 0;
    while let Some(at) = next_to_escape::<ASCII>(&bytes[start..]).map(|i| start + i) {
        out.extend_from_slice(&bytes[start..at]);
        match bytes[at] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x80.. => return Some(at),
            control => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(control >> 4)]);
                out.push(HEX[usize::from(control & 0xf)]);
            }
        }
        start = at + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    None
}

/// Where the first byte JSON needs escaped (`"`, `\\`, or below 0x20) is, or with `ASCII`
/// the first past ASCII.
fn next_to_escape<const ASCII: bool>(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Has a zero byte: (x - 1s) & !x & 0x80s (a set bit may be a false alarm past a true
    // one, never a miss); below 0x20 likewise with 0x20s. A word with any goes byte by byte.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let high = if ASCII { HIGH } else { 0 };
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        if x & high | x.wrapping_sub(ONES * 0x20) & !x & HIGH | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\')))
            != 0
        {
            break;
        }
        at += 8;
    }
    bytes[at..].iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\' || (ASCII && b >= 0x80)).map(|i| at + i)
}

fn write_flags(flags: Flags, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"flags\":[");
    for (i, name) in flags.names().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write!(out, "\"{name}\"").expect("vec write");
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = [
            "",
            "plain text of some length",
            "\"",
            "a\\b",
            "tab\there\nnew\rline",
            "\u{1}\u{1f}\u{7f}\u{8}\u{c}",
            "ünïcødé ✓ \"quoted\" 😀",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every byte value that can stand alone in UTF-8, at every position of an eight-byte word.
        for b in 0u8..0x80 {
            for at in 0..17 {
                let mut text = "x".repeat(at);
                text.push(char::from(b));
                text.push_str(&"y".repeat(20 - at));
                cases.push(text);
            }
        }
        for text in cases {
            let mut ours = Vec::new();
            super::json_message(text.as_bytes(), &mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn messages_past_ascii_are_escaped_and_invalid_bytes_replaced_as_serde_json_and_lossy_do() {
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for tail in ["ünïcødé \"✓\"\n".as_bytes(), b"bad \xff\xfe \"x\"\t", b"\xe2\x9c", "✓".as_bytes(), b"\x80"] {
            for at in 0..17 {
                // Every alignment within a word, some after a byte escaped.
                let mut text = if at % 3 == 0 { format!("\\{}", "x".repeat(at)) } else { "x".repeat(at) }.into_bytes();
                text.extend_from_slice(tail);
                text.extend_from_slice(b"y\x01z");
                cases.push(text);
            }
        }
        for bytes in cases {
            let mut ours = Vec::new();
            super::json_message(&bytes, &mut ours);
            let want = serde_json::to_string(&String::from_utf8_lossy(&bytes)).unwrap();
            assert_eq!(String::from_utf8(ours).unwrap(), want, "{bytes:?}");
        }
    }

    use super::*;
    use crate::logs::chunk::StreamKind;
    use crate::logs::source::Source;

    fn meta() -> Metadata {
        Metadata {
            namespace: "ml".into(),
            pod: "trainer-0".into(),
            pod_uid: "uid-1".into(),
            pod_ip: Some("10.0.0.7".into()),
            container: "worker".into(),
            restart: 2,
            container_id: Some("abc".into()),
            image: Some("registry/trainer:3".into()),
            labels: vec![("app_kubernetes_io/name".into(), "trainer".into())],
            workload: Some((crate::kube::meta::WorkloadKind::CronJob, "nightly".into())),
            job: Some("nightly-29123456".into()),
            app: "trainer".into(),
            user: "alice".into(),
            node: "gpu-1".into(),
            cluster: "prod".into(),
            ..Metadata::default()
        }
    }

    fn chunk_with(message: &[u8], flags: Flags) -> Chunk {
        let mut chunk = Chunk::new(Arc::new(Source::for_tests()));
        let timestamp = chunk.push_bytes(b"2026-11-22T03:16:40.123456789Z");
        let message = chunk.push_bytes(message);
        chunk.records.push(Record { timestamp, message, stream: StreamKind::Stderr, offset: 4242, flags });
        chunk
    }

    fn encode_one(chunk: &Chunk) -> Value {
        let mut docs = Documents::default();
        encode_chunk(chunk, &Template::new(&meta()), &[Some(Level::Warn)], &Structured::default(), &mut docs, |_, _| {}, None);
        assert_eq!(docs.len(), 1);
        assert_eq!(*docs.doc(0).last().unwrap(), b'\n');
        serde_json::from_slice(docs.doc(0)).expect("valid JSON")
    }

    #[test]
    fn documents_carry_the_ecs_fields_of_the_spec() {
        let doc = encode_one(&chunk_with(b"loss=0.53 \"quoted\"\ttab", Flags::default()));
        assert_eq!(doc["@timestamp"], "2026-11-22T03:16:40.123456789Z");
        assert_eq!(doc["message"], "loss=0.53 \"quoted\"\ttab");
        assert_eq!(doc["stream"], "stderr");
        assert_eq!(doc["log"]["offset"], 4242);
        assert_eq!(doc["log"]["file"]["path"], "/var/log/pods/ns_pod_uid/c/0.log");
        assert!(doc["log"].get("flags").is_none());
        assert_eq!(doc["kubernetes"]["namespace"], "ml");
        assert_eq!(doc["kubernetes"]["pod"]["name"], "trainer-0");
        assert_eq!(doc["kubernetes"]["pod"]["uid"], "uid-1");
        assert_eq!(doc["kubernetes"]["container"]["name"], "worker");
        assert_eq!(doc["kubernetes"]["node"]["name"], "gpu-1");
        assert_eq!(doc["container"]["id"], "abc");
        assert_eq!(doc["host"]["name"], "gpu-1");
        assert_eq!(doc["orchestrator"]["cluster"]["name"], "prod");
        assert_eq!(doc["service"]["name"], "trainer");
        assert_eq!(doc["user"]["name"], "alice");
        assert_eq!(doc["log"]["level"], "warn");
        assert_eq!(doc["kubernetes"]["pod"]["ip"], "10.0.0.7");
        assert_eq!(doc["kubernetes"]["labels"]["app_kubernetes_io/name"], "trainer");
        assert_eq!(doc["kubernetes"]["cronjob"]["name"], "nightly");
        assert_eq!(doc["kubernetes"]["job"]["name"], "nightly-29123456");
        assert_eq!(doc["container"]["image"]["name"], "registry/trainer:3");
    }

    #[test]
    fn invalid_utf8_is_replaced_and_flags_are_listed() {
        let doc = encode_one(&chunk_with(b"ok \xff\xfe end", Flags::TRUNCATED));
        assert_eq!(doc["message"], "ok \u{fffd}\u{fffd} end");
        assert_eq!(doc["log"]["flags"], json!(["truncated"]));
    }
}

#[cfg(test)]
mod template_tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;
    use crate::logs::chunk::StreamKind;
    use crate::logs::source::Source;

    fn mapped(mapping: &Value, path: &[&str]) -> bool {
        if path.len() == 3 && path[..2] == ["kubernetes", "labels"] {
            // One flattened field, whatever the keys: they cannot grow the mapping.
            return mapping["properties"]["kubernetes"]["properties"]["labels"]["type"] == "flattened";
        }
        if path.len() >= 2 && path[0] == "json" {
            return mapping["properties"]["json"]["type"] == "flattened";
        }
        let Some((first, rest)) = path.split_first() else { return true };
        match mapping.get("properties").and_then(|p| p.get(*first)) {
            Some(field) if rest.is_empty() => field.get("type").is_some() || field.get("properties").is_some(),
            Some(field) => mapped(field, rest),
            None => false,
        }
    }

    fn leaves(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    prefix.push(k.clone());
                    leaves(v, prefix, out);
                    prefix.pop();
                }
            }
            _ => out.push(prefix.clone()),
        }
    }

    #[test]
    fn every_field_written_is_mapped_by_the_index_template() {
        let template: Value = serde_json::from_str(include_str!("../../../deploy/elasticsearch/index-template.json")).unwrap();
        let mappings = &template["template"]["mappings"];
        let meta = Metadata {
            namespace: "ns".into(),
            pod: "p".into(),
            pod_uid: "u".into(),
            pod_ip: Some("10.0.0.1".into()),
            container: "c".into(),
            restart: 1,
            container_id: Some("id".into()),
            runtime: Some("containerd".into()),
            image: Some("img".into()),
            labels: vec![("app_kubernetes_io/name".into(), "x".into())],
            workload: Some((crate::kube::meta::WorkloadKind::Deployment, "d".into())),
            job: Some("j".into()),
            app: "a".into(),
            user: "bob".into(),
            node: "n".into(),
            cluster: "k".into(),
        };
        let mut chunk = Chunk::new(Arc::new(Source::for_tests()));
        let timestamp = chunk.push_bytes(b"2026-11-22T03:16:40Z");
        let message =
            chunk.push_bytes(br#"{"msg":"m","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","k":{"a":[1]}}"#);
        chunk.records.push(Record { timestamp, message, stream: StreamKind::Stdout, offset: 1, flags: Flags::PARTIAL });
        let mut docs = Documents::default();
        let mut structured = Structured::default();
        crate::logs::structured::Extractor::new(Default::default()).extract(&chunk, &mut structured);
        encode_chunk(&chunk, &Template::new(&meta), &[Some(Level::Error)], &structured, &mut docs, |_, _| {}, None);
        let doc: Value = serde_json::from_slice(docs.doc(0)).unwrap();
        let mut fields = Vec::new();
        leaves(&doc, &mut Vec::new(), &mut fields);
        assert!(fields.len() >= 18, "{fields:?}");
        assert!(fields.iter().any(|f| f == &["json", "k", "a"]) && fields.iter().any(|f| f == &["trace", "id"]), "{fields:?}");
        for field in fields {
            let path: Vec<&str> = field.iter().map(String::as_str).collect();
            assert!(mapped(mappings, &path), "field {} is not in the index template", path.join("."));
        }
    }
}
