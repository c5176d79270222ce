//! Records as OTLP `LogRecord`s, with OpenTelemetry's semantic conventions: one `Resource` per
//! container (`k8s.*`, `container.*`, `service.name`, `user.name`), and per record the
//! runtime's timestamp, the detected severity, `log.iostream`, `log.file.path` and
//! `log.record.uid` (the Elasticsearch `_id`, so a resend after a crash is recognisable).
//!
//! A chunk is one container's records, so it becomes one `ResourceLogs`; its resource is
//! encoded once per container ([`ResourceTemplate`]). An `ExportLogsServiceRequest` is the
//! `ResourceLogs` of several chunks one after another ([`request`]), which protobuf defines as
//! the repeated field, so requests are put together without decoding anything.

use std::sync::LazyLock;
use std::time::SystemTime;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::encoding::{encode_varint, WireType};
use prost::Message;

use crate::logs::chunk::{Chunk, Record, StreamKind};
use crate::logs::enrich::Metadata;
use crate::logs::level::Level;
use crate::logs::source::FileId;
use crate::logs::structured::{Fields, Structured};
use crate::logs::timestamp::Seconds;
use crate::otlp::{kv, text, unix_nanos};
use crate::packed::{Piece, KEPT_BUFFER, SPILL_BYTES};

/// A container's `Resource`, encoded.
#[derive(Debug, Clone)]
pub struct ResourceTemplate {
    resource: Vec<u8>,
}

impl ResourceTemplate {
    /// The resource attributes of `meta`.
    pub fn new(meta: &Metadata) -> ResourceTemplate {
        let mut attributes = vec![
            kv("k8s.namespace.name", text(&meta.namespace)),
            kv("k8s.pod.name", text(&meta.pod)),
            kv("k8s.pod.uid", text(&meta.pod_uid)),
            kv("k8s.container.name", text(&meta.container)),
            kv("k8s.container.restart_count", Value::IntValue(meta.restart.into())),
            kv("k8s.node.name", text(&meta.node)),
            kv("host.name", text(&meta.node)),
            kv("service.name", text(&meta.app)),
        ];
        let optional = [
            ("k8s.cluster.name", Some(meta.cluster.as_str()).filter(|c| !c.is_empty())),
            ("user.name", Some(meta.user.as_str()).filter(|u| !u.is_empty())),
            ("k8s.pod.ip", meta.pod_ip.as_deref()),
            ("container.id", meta.container_id.as_deref()),
            ("container.image.name", meta.image.as_deref()),
            ("container.runtime.name", meta.runtime.as_deref()),
            ("k8s.job.name", meta.job.as_deref()),
        ];
        attributes.extend(optional.into_iter().filter_map(|(key, value)| Some(kv(key, text(value?)))));
        if let Some((kind, name)) = &meta.workload {
            attributes.push(kv(format!("k8s.{}.name", kind.as_str()), text(name)));
        }
        attributes.extend(meta.labels.iter().map(|(k, v)| kv(format!("k8s.pod.label.{k}"), text(v))));
        ResourceTemplate { resource: Resource { attributes, ..Default::default() }.encode_to_vec() }
    }
}

/// `LogRecord.severity_number` and `severity_text` of a detected level.
fn severity(level: Level) -> (SeverityNumber, &'static str) {
    match level {
        Level::Trace => (SeverityNumber::Trace, "TRACE"),
        Level::Debug => (SeverityNumber::Debug, "DEBUG"),
        Level::Info => (SeverityNumber::Info, "INFO"),
        Level::Warn => (SeverityNumber::Warn, "WARN"),
        Level::Error => (SeverityNumber::Error, "ERROR"),
        Level::Fatal => (SeverityNumber::Fatal, "FATAL"),
    }
}

/// What [`encode_chunk`] works out before it writes (each record's length goes before the
/// record, and the chunk's before the chunk), kept for the next chunk.
#[derive(Debug, Default)]
pub struct Layout {
    records: Vec<Planned>,
    /// Records built as `LogRecord`s (those whose text gave fields), encoded back to back.
    encoded: Vec<u8>,
    /// What is written before it goes into the piece.
    out: Vec<u8>,
}

#[derive(Debug)]
struct Planned {
    level: Option<Level>,
    /// `time_unix_nano`, parsed once.
    time: u64,
    /// The record's encoded length.
    len: u32,
    /// Where its bytes end in [`Layout::encoded`], when built by prost; written field by
    /// field otherwise.
    encoded_end: Option<u32>,
    /// Its message is valid UTF-8, the body as it is (checked once).
    text: bool,
}

/// The attributes of a chunk's records (fields 6 of a `LogRecord`), encoded once per chunk
/// and stream: `log.iostream`, `log.file.path`, and `log.record.uid` up to its 32 hex digits.
struct Fixed {
    attributes: [Vec<u8>; 2],
    /// The file, whose id and a record's offset make `log.record.uid`.
    file: FileId,
}

impl Fixed {
    fn new(path: &str, file: FileId) -> Fixed {
        let attributes = [StreamKind::Stdout, StreamKind::Stderr].map(|stream| {
            let mut out = Vec::with_capacity(path.len() + 96);
            string_attribute(b"log.iostream", stream.as_str().as_bytes(), &mut out);
            string_attribute(b"log.file.path", path.as_bytes(), &mut out);
            string_attribute(b"log.record.uid", &[0; UID_LEN], &mut out);
            out.truncate(out.len() - UID_LEN);
            out
        });
        Fixed { attributes, file }
    }

    fn attributes(&self, stream: StreamKind) -> &[u8] {
        &self.attributes[usize::from(stream == StreamKind::Stderr)]
    }
}

/// Writes the chunk as one `resource_logs` field of an `ExportLogsServiceRequest` (such
/// fields back to back are the request): its `ResourceLogs`, every record, `levels[i]` being
/// record i's level, observed at `observed`. A record is written field by field in the order
/// prost writes a `LogRecord` (the same bytes, without building one); one whose text gave
/// trace ids, a JSON object or flags is built as a `LogRecord` and encoded by prost.
///
/// The lengths are worked out first, so the records are written in their final place, once.
/// The bytes go into `piece` every [`SPILL_BYTES`] and at the end, while still in the CPU's
/// cache: the chunk is never held whole.
pub fn encode_chunk(
    chunk: &Chunk,
    resource: &ResourceTemplate,
    levels: &[Option<Level>],
    structured: &Structured,
    observed: SystemTime,
    layout: &mut Layout,
    piece: &mut Piece<'_>,
) {
    let observed = unix_nanos(observed);
    let path = chunk.source.path.to_string_lossy();
    let fixed = Fixed::new(&path, chunk.source.id);
    layout.records.clear();
    layout.encoded.clear();
    // ScopeLogs { scope = 1; log_records = 2 }.
    let mut scope_len = SCOPE.len();
    let mut in_order = structured.in_order();
    let mut seconds = Seconds::default();
    for (i, record) in chunk.records.iter().enumerate() {
        let level = levels.get(i).copied().flatten();
        let time = record_time(chunk, record, &mut seconds);
        let fields = in_order.of(i).filter(|f| f.trace_id.is_some() || f.span_id.is_some() || f.object || !f.flags.is_empty());
        let planned = if fields.is_some() || !record.flags.is_empty() {
            let mut log = log_record(chunk, record, level, &path, observed, time);
            if let Some(fields) = fields {
                add_structured(&mut log, chunk.message(record), fields);
            }
            let start = layout.encoded.len();
            log.encode_raw(&mut layout.encoded);
            Planned { level, time, len: (layout.encoded.len() - start) as u32, encoded_end: Some(layout.encoded.len() as u32), text: true }
        } else {
            let message = chunk.message(record);
            let text = simdutf8::basic::from_utf8(message).is_ok();
            let body_len = if text { message.len() } else { lossy_len(message) };
            let len = plain_record_len(time, level, body_len, record.stream, &fixed, observed);
            Planned { level, time, len: len as u32, encoded_end: None, text }
        };
        scope_len += 1 + prost::encoding::encoded_len_varint(u64::from(planned.len)) + planned.len as usize;
        layout.records.push(planned);
    }
    // ResourceLogs { resource = 1; scope_logs = 2 }, the resource already encoded.
    let resource = &resource.resource;
    let resource_logs_len = string_field_len(1, resource.len()) + string_field_len(2, scope_len);
    let out = &mut layout.out;
    out.clear();
    let piece_start = piece.written();
    out.reserve(resource_logs_len.min(2 * SPILL_BYTES) + 16);
    key(1, WireType::LengthDelimited, out);
    varint(resource_logs_len as u64, out);
    string_field(1, resource, out);
    key(2, WireType::LengthDelimited, out);
    varint(scope_len as u64, out);
    out.extend_from_slice(&SCOPE);
    let mut encoded_start = 0;
    for (record, planned) in chunk.records.iter().zip(&layout.records) {
        // The record, its key and its length: grown once, not field by field.
        out.reserve(planned.len as usize + 6);
        key(2, WireType::LengthDelimited, out);
        varint(u64::from(planned.len), out);
        let before = out.len();
        match planned.encoded_end {
            Some(end) => {
                out.extend_from_slice(&layout.encoded[encoded_start..end as usize]);
                encoded_start = end as usize;
            }
            None => {
                let message = chunk.message(record);
                let lossy;
                let body = if planned.text {
                    message
                } else {
                    lossy = String::from_utf8_lossy(message);
                    lossy.as_bytes()
                };
                plain_record(record, planned.level, planned.time, body, &fixed, observed, out)
            }
        }
        debug_assert_eq!(out.len() - before, planned.len as usize, "{record:?}");
        piece.spill(out);
    }
    let written = piece.written() - piece_start + out.len();
    assert_eq!(written, 1 + prost::encoding::encoded_len_varint(resource_logs_len as u64) + resource_logs_len, "lengths worked out");
    piece.write(out);
    out.clear();
    // A chunk of huge lines does not leave its buffers behind.
    if out.capacity() > KEPT_BUFFER || layout.encoded.capacity() > KEPT_BUFFER {
        *layout = Layout::default();
    }
}

/// `ScopeLogs.scope`: the agent as the instrumentation scope, encoded once.
static SCOPE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let scope = InstrumentationScope { name: "nodelens".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
    let mut out = Vec::new();
    prost::encoding::message::encode(1, &scope, &mut out);
    out
});

/// Writes a record without flags or fields from its text as prost writes its `LogRecord`:
/// time (1), severity (2, 3), body (5), the `log.iostream`, `log.file.path` and
/// `log.record.uid` attributes (6), observed time (11). [`plain_record_len`] is its length.
/// `body` is the message, valid UTF-8.
fn plain_record(record: &Record, level: Option<Level>, time: u64, body: &[u8], fixed: &Fixed, observed: u64, out: &mut Vec<u8>) {
    if time != 0 {
        key(1, WireType::SixtyFourBit, out);
        out.extend_from_slice(&time.to_le_bytes());
    }
    if let Some((number, name)) = level.map(severity) {
        key(2, WireType::Varint, out);
        varint(number as u64, out);
        string_field(3, name.as_bytes(), out);
    }
    // AnyValue { string_value = 1 }.
    key(5, WireType::LengthDelimited, out);
    varint(string_field_len(1, body.len()) as u64, out);
    string_field(1, body, out);
    out.extend_from_slice(fixed.attributes(record.stream));
    crate::logs::source::push_hex_id(fixed.file.record_id(record.offset), out);
    if observed != 0 {
        key(11, WireType::SixtyFourBit, out);
        out.extend_from_slice(&observed.to_le_bytes());
    }
}

/// The length of what [`plain_record`] writes for a body of `body_len` bytes (after any
/// replacement of invalid UTF-8).
fn plain_record_len(time: u64, level: Option<Level>, body_len: usize, stream: StreamKind, fixed: &Fixed, observed: u64) -> usize {
    let fixed64 = |value: u64| if value != 0 { 1 + 8 } else { 0 };
    let severity = level
        .map(severity)
        .map_or(0, |(number, name)| 1 + prost::encoding::encoded_len_varint(number as u64) + string_field_len(3, name.len()));
    fixed64(time)
        + severity
        + string_field_len(5, string_field_len(1, body_len))
        + fixed.attributes(stream).len()
        + UID_LEN
        + fixed64(observed)
}

/// The length of `String::from_utf8_lossy(bytes)`, without building it: each invalid
/// sequence becomes one U+FFFD (three bytes).
fn lossy_len(bytes: &[u8]) -> usize {
    bytes.utf8_chunks().map(|c| c.valid().len() + if c.invalid().is_empty() { 0 } else { char::REPLACEMENT_CHARACTER.len_utf8() }).sum()
}

/// `log.record.uid`: 32 hex digits.
const UID_LEN: usize = 32;

/// Appends a `LogRecord` attribute (field 6) of a string value.
fn string_attribute(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    // KeyValue { key = 1; value = 2: AnyValue { string_value = 1 } }.
    key(6, WireType::LengthDelimited, out);
    varint(key_value_len(name.len(), value.len()) as u64, out);
    string_field(1, name, out);
    key(2, WireType::LengthDelimited, out);
    varint(string_field_len(1, value.len()) as u64, out);
    string_field(1, value, out);
}

/// The encoded length of a `KeyValue` of a string value.
fn key_value_len(key: usize, value: usize) -> usize {
    string_field_len(1, key) + string_field_len(2, string_field_len(1, value))
}

/// A length-delimited field `tag` (below 16) holding `bytes`.
#[inline]
fn string_field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    key(tag, WireType::LengthDelimited, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Appends the key of field `tag` of wire type `wire`, as prost's `encode_key` does: one byte
/// for tags below 16, which are all the fields written here have.
fn key(tag: u8, wire: WireType, out: &mut Vec<u8>) {
    // Checked in release builds too (the tags are constants: the check compiles away): a
    // longer key would be written short, and the whole request refused.
    assert!(tag < 16, "tag {tag} takes more than one byte");
    out.push(tag << 3 | wire as u8);
}

/// Appends `value` as prost's `encode_varint` does: one or two bytes (the lengths of most
/// records and their fields) written here, in line, the rest by prost.
#[inline]
fn varint(value: u64, out: &mut Vec<u8>) {
    if value < 0x80 {
        out.push(value as u8);
    } else if value < 0x4000 {
        out.extend_from_slice(&[value as u8 | 0x80, (value >> 7) as u8]);
    } else {
        encode_varint(value, out);
    }
}

/// The encoded size of such a field (tags below 16).
fn string_field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The record's time from its runtime timestamp; 0 (unset) when it has none usable, and the
/// receiver uses the observed time, as the spec says.
fn record_time(chunk: &Chunk, record: &Record, seconds: &mut Seconds) -> u64 {
    parse_timestamp(chunk.timestamp(record), seconds).unwrap_or(0)
}

fn log_record(chunk: &Chunk, record: &Record, level: Option<Level>, path: &str, observed: u64, time: u64) -> LogRecord {
    let message = chunk.message(record);
    let body = match std::str::from_utf8(message) {
        Ok(text) => text.to_string(),
        Err(_) => String::from_utf8_lossy(message).into_owned(),
    };
    let mut attributes = vec![
        kv("log.iostream", text(record.stream.as_str())),
        kv("log.file.path", text(path)),
        kv("log.record.uid", Value::StringValue(format!("{:032x}", chunk.source.id.record_id(record.offset)))),
    ];
    if !record.flags.is_empty() {
        let flags = record.flags.names().map(|name| AnyValue { value: Some(text(name)) }).collect();
        attributes.push(kv("nodelens.log.flags", Value::ArrayValue(ArrayValue { values: flags })));
    }
    let (severity_number, severity_text) = level.map(severity).unwrap_or((SeverityNumber::Unspecified, ""));
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: observed,
        severity_number: severity_number as i32,
        severity_text: severity_text.to_string(),
        body: Some(AnyValue { value: Some(Value::StringValue(body)) }),
        attributes,
        ..Default::default()
    }
}

/// What the record's text gave: trace and span ids on the record, a JSON object as a kvlist
/// body, `json_truncated` beside the other flags.
fn add_structured(log: &mut LogRecord, message: &[u8], fields: &Fields) {
    if let Some(id) = fields.trace_id {
        log.trace_id = id.to_vec();
    }
    if let Some(id) = fields.span_id {
        log.span_id = id.to_vec();
    }
    if fields.object {
        let object = match std::str::from_utf8(message) {
            Ok(text) => serde_json::from_str::<serde_json::Value>(text),
            Err(_) => serde_json::from_str(&String::from_utf8_lossy(message)),
        };
        if let Ok(object) = object {
            log.body = Some(any_value(object));
        }
    }
    if !fields.flags.is_empty() {
        let names = fields.flags.names().map(|name| AnyValue { value: Some(text(name)) });
        match log.attributes.iter_mut().find(|kv| kv.key == "nodelens.log.flags") {
            Some(KeyValue { value: Some(AnyValue { value: Some(Value::ArrayValue(list)) }), .. }) => list.values.extend(names),
            _ => log.attributes.push(kv("nodelens.log.flags", Value::ArrayValue(ArrayValue { values: names.collect() }))),
        }
    }
}

/// A JSON value as an OTLP `AnyValue`: objects as kvlists, arrays as arrays.
fn any_value(value: serde_json::Value) -> AnyValue {
    use serde_json::Value as Json;
    let value = match value {
        Json::Null => None,
        Json::Bool(b) => Some(Value::BoolValue(b)),
        Json::Number(n) => Some(match n.as_i64() {
            Some(i) => Value::IntValue(i),
            None => Value::DoubleValue(n.as_f64().unwrap_or_default()),
        }),
        Json::String(s) => Some(Value::StringValue(s)),
        Json::Array(items) => Some(Value::ArrayValue(ArrayValue { values: items.into_iter().map(any_value).collect() })),
        Json::Object(map) => Some(Value::KvlistValue(KeyValueList {
            values: map.into_iter().map(|(key, v)| KeyValue { key, value: Some(any_value(v)), ..Default::default() }).collect(),
        })),
    };
    AnyValue { value }
}

/// Nanoseconds since the epoch of a runtime's RFC 3339 timestamp (`Z` or a `±hh:mm` offset);
/// `None` when it is not one, which leaves `time_unix_nano` unset (the receiver then uses
/// the observed time, as the spec says). `seconds`: the second last read, kept by the caller.
fn parse_timestamp(text: &[u8], seconds: &mut Seconds) -> Option<u64> {
    u64::try_from(seconds.unix_nanos(text)?).ok()
}

/// An `ExportLogsServiceRequest` of the encoded `ResourceLogs` in `parts`.
pub fn request<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        frame(part, &mut out);
    }
    out
}

/// Appends `part` (one encoded `ResourceLogs`) as a field of `ExportLogsServiceRequest`:
/// such fields back to back are the request.
pub fn frame(part: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&frame_head(part.len()));
    out.extend_from_slice(part);
}

/// The key and length that go before a `ResourceLogs` of `len` bytes in
/// `ExportLogsServiceRequest`.
pub fn frame_head(len: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(11);
    key(1, WireType::LengthDelimited, &mut head);
    varint(len as u64, &mut head);
    head
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use std::time::UNIX_EPOCH;

    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;

    use super::*;
    use crate::logs::chunk::Flags;
    use crate::logs::source::Source;
    use crate::packed::Packer;
    use crate::test_numbers::Numbers;

    fn meta() -> Metadata {
        Metadata {
            namespace: "ml".into(),
            pod: "trainer-0".into(),
            pod_uid: "uid-1".into(),
            pod_ip: Some("10.0.0.7".into()),
            container: "worker".into(),
            restart: 2,
            container_id: Some("containerd://abc".into()),
            runtime: Some("containerd".into()),
            image: Some("registry/trainer:3".into()),
            labels: vec![("app.kubernetes.io/name".into(), "trainer".into())],
            workload: Some((crate::kube::meta::WorkloadKind::CronJob, "nightly".into())),
            job: Some("nightly-29123456".into()),
            app: "trainer".into(),
            user: "alice".into(),
            node: "gpu-1".into(),
            cluster: "prod".into(),
        }
    }

    fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
        list.iter()
            .map(|kv| {
                let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => s.clone(),
                    Some(Value::IntValue(i)) => format!("int:{i}"),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), value)
            })
            .collect()
    }

    #[test]
    fn keys_and_varints_are_the_bytes_prost_writes() {
        for tag in 1..16u8 {
            for wire in [WireType::Varint, WireType::SixtyFourBit, WireType::LengthDelimited, WireType::ThirtyTwoBit] {
                let (mut ours, mut prost) = (Vec::new(), Vec::new());
                key(tag, wire, &mut ours);
                prost::encoding::encode_key(u32::from(tag), wire, &mut prost);
                assert_eq!(ours, prost, "tag {tag} {wire:?}");
            }
        }
        let steps = (0..64).flat_map(|bit| [1u64 << bit, (1u64 << bit) - 1, (1u64 << bit) + 1]);
        for value in steps.chain([0, 300, 0x3fff, 0x4000, u64::MAX]) {
            let (mut ours, mut prost) = (vec![0xaa], vec![0xaa]);
            varint(value, &mut ours);
            encode_varint(value, &mut prost);
            assert_eq!(ours, prost, "{value:#x}");
        }
    }

    #[test]
    fn timestamps_are_read_with_nanoseconds_and_offsets() {
        let parse_timestamp = |text: &[u8]| parse_timestamp(text, &mut Seconds::default());
        assert_eq!(parse_timestamp(b"1970-01-01T00:00:01.000000042Z"), Some(1_000_000_042));
        assert_eq!(parse_timestamp(b"2026-11-22T03:16:40.123456789Z"), Some(1_795_317_400_123_456_789));
        assert_eq!(parse_timestamp(b"2026-11-22T05:16:40.123456789+02:00"), Some(1_795_317_400_123_456_789));
        assert_eq!(parse_timestamp(b"2026-11-21T22:46:40.5-04:30"), Some(1_795_317_400_500_000_000));
        assert_eq!(parse_timestamp(b"2026-11-22T03:16:40Z"), Some(1_795_317_400_000_000_000));
        assert_eq!(parse_timestamp(b"yesterday"), None);
        assert_eq!(parse_timestamp(b""), None);
    }

    #[test]
    fn json_records_carry_their_ids_and_the_object_as_a_kvlist_body() {
        let mut chunk = Chunk::new(Arc::new(Source::for_tests()));
        let timestamp = chunk.push_bytes(b"2026-11-22T03:16:40Z");
        let message = chunk
            .push_bytes(br#"{"msg":"hi","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","n":{"a":[1,true]}}"#);
        chunk.records.push(Record { timestamp, message, stream: StreamKind::Stdout, offset: 0, flags: Flags::default() });
        let mut structured = Structured::default();
        crate::logs::structured::Extractor::new(Default::default()).extract(&chunk, &mut structured);
        let one = encoded(&chunk, &ResourceTemplate::new(&meta()), &[None], &structured, UNIX_EPOCH);
        let decoded = ExportLogsServiceRequest::decode(one.as_slice()).unwrap();
        let record = &decoded.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(hex(&record.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&record.span_id), "00f067aa0ba902b7");
        let Some(Value::KvlistValue(body)) = record.body.as_ref().and_then(|b| b.value.clone()) else { panic!("{record:?}") };
        let keys: Vec<&str> = body.values.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["msg", "n", "span_id", "trace_id"]);
        let Some(Value::KvlistValue(n)) = body.values[1].value.as_ref().and_then(|v| v.value.clone()) else { panic!() };
        let Some(Value::ArrayValue(a)) = n.values[0].value.as_ref().and_then(|v| v.value.clone()) else { panic!() };
        assert_eq!(a.values[0].value, Some(Value::IntValue(1)));
        assert_eq!(a.values[1].value, Some(Value::BoolValue(true)));
    }

    #[test]
    fn a_plain_record_is_written_as_prost_writes_its_log_record() {
        // A path as long as kubelet's (its attribute's length takes two bytes).
        let source = Source { path: format!("/var/log/pods/{}/worker/0.log", "ns_pod-".repeat(20)).into(), ..Source::for_tests() };
        let mut chunk = Chunk::new(Arc::new(source));
        let cases: [(&[u8], &[u8], StreamKind); 5] = [
            (b"2026-11-22T03:16:40.123456789Z", b"step=1 loss=0.5", StreamKind::Stdout),
            (b"2026-11-22T05:16:40.5+02:00", b"bad \xff byte", StreamKind::Stderr),
            (b"not a time", b"", StreamKind::Stdout),
            (b"1969-12-31T23:59:59Z", &[b'x'; 300], StreamKind::Stderr),
            (b"2026-11-22T03:16:41Z", "ünïcødé ✓".as_bytes(), StreamKind::Stdout),
        ];
        for (i, (time, message, stream)) in cases.into_iter().enumerate() {
            let timestamp = chunk.push_bytes(time);
            let message = chunk.push_bytes(message);
            chunk.records.push(Record { timestamp, message, stream, offset: 1000 * i as u64 + 7, flags: Flags::default() });
        }
        let path = chunk.source.path.to_string_lossy().into_owned();
        let fixed = Fixed::new(&path, chunk.source.id);
        for (observed, level) in [(0, None), (1_800_000_000_000_000_000, Some(Level::Warn)), (5, Some(Level::Fatal))] {
            for record in &chunk.records {
                let mut ours = Vec::new();
                let time = record_time(&chunk, record, &mut Seconds::default());
                let body = String::from_utf8_lossy(chunk.message(record));
                plain_record(record, level, time, body.as_bytes(), &fixed, observed, &mut ours);
                let prost = log_record(&chunk, record, level, &path, observed, time).encode_to_vec();
                assert_eq!(ours, prost, "{record:?} {level:?} {observed}");
                assert_eq!(plain_record_len(time, level, body.len(), record.stream, &fixed, observed), ours.len(), "{record:?}");
            }
        }
    }

    /// The chunk's `ExportLogsServiceRequest` field, written into a plain piece.
    fn encoded(
        chunk: &Chunk,
        resource: &ResourceTemplate,
        levels: &[Option<Level>],
        structured: &Structured,
        observed: SystemTime,
    ) -> Vec<u8> {
        let mut packer = Packer::new();
        let mut piece = packer.piece(false);
        encode_chunk(chunk, resource, levels, structured, observed, &mut Layout::default(), &mut piece);
        piece.finish(Vec::new()).plain().into_owned()
    }

    #[test]
    fn a_chunk_past_the_spill_size_is_compressed_as_it_is_written_and_reads_whole() {
        let mut chunk = Chunk::new(Arc::new(Source::for_tests()));
        let text = "rank=3 step=1 loss=0.25 throughput=1200 samples/s ".repeat(3);
        for i in 0..3000u64 {
            let timestamp = chunk.push_bytes(b"2026-11-22T03:16:40.123456789Z");
            let message = if i == 1500 { chunk.push_bytes(b"bad \xff byte") } else { chunk.push_bytes(text.as_bytes()) };
            let flags = if i == 2000 { Flags::TRUNCATED } else { Flags::default() };
            chunk.records.push(Record { timestamp, message, stream: StreamKind::Stdout, offset: i * 200, flags });
        }
        let (resource, levels) = (ResourceTemplate::new(&meta()), vec![Some(Level::Info); 3000]);
        let plain = encoded(&chunk, &resource, &levels, &Structured::default(), UNIX_EPOCH);
        assert!(plain.len() > 6 * SPILL_BYTES, "{} bytes: written in several parts", plain.len());
        let mut packer = Packer::new();
        let mut piece = packer.piece(true);
        encode_chunk(&chunk, &resource, &levels, &Structured::default(), UNIX_EPOCH, &mut Layout::default(), &mut piece);
        let packed = piece.finish(Vec::new());
        assert!(packed.is_compressed() && packed.packed_len() < plain.len() / 4);
        assert_eq!(packed.plain(), plain, "the same bytes, compressed");
        let decoded = ExportLogsServiceRequest::decode(plain.as_slice()).unwrap();
        let records = &decoded.resource_logs[0].scope_logs[0].log_records;
        assert_eq!(records.len(), 3000);
        assert_eq!(records[1500].body.as_ref().unwrap().value, Some(Value::StringValue("bad \u{fffd} byte".into())));
        assert!(attributes(&records[2000].attributes)["nodelens.log.flags"].contains("truncated"));
        assert_eq!(attributes(&records[2999].attributes)["log.record.uid"], format!("{:032x}", chunk.source.id.record_id(2999 * 200)));
    }

    /// A message of `len` bytes or so: text, text with invalid UTF-8, multi-byte text, JSON
    /// objects with and without trace context, or a W3C `traceparent` in text.
    fn message(n: &mut Numbers, len: usize) -> Vec<u8> {
        let text: Vec<u8> = (0..len).map(|i| b"abc xyz=0123456789 .,:;"[(i * 7 + len) % 23]).collect();
        match n.below(7) {
            0 | 1 => text,
            2 => {
                let mut bad = text;
                for _ in 0..=n.below(3) {
                    let at = n.below(bad.len() + 1);
                    let junk: &[u8] = n.pick(&[&b"\xff"[..], b"\xe2\x82", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x80"]);
                    bad.splice(at..at, junk.iter().copied());
                }
                bad
            }
            3 => "ünïcødé ✓ 日本語 ".repeat(len / 24 + 1).into_bytes(),
            4 => format!(
                r#"{{"level":"{}","msg":"{}","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7"}}"#,
                n.pick(&["warn", "ERROR", "x"]),
                String::from_utf8(text).unwrap()
            )
            .into_bytes(),
            5 => format!(r#"{{"msg":"{}","n":[1,2.5,true,null,{{"a":"b"}}],"s":"\u00e9\ud83d\ude00"}}"#, String::from_utf8(text).unwrap())
                .into_bytes(),
            _ => format!("{} traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", String::from_utf8(text).unwrap())
                .into_bytes(),
        }
    }

    #[test]
    fn random_chunks_are_written_as_prost_writes_them_and_as_long_as_worked_out() {
        // Lengths at the varints' steps (127/128, 16383/16384 bytes) on body, record and
        // chunk; every timestamp form; invalid UTF-8; JSON with trace context; every flag.
        let lengths = [0, 1, 5, 100, 110, 115, 120, 125, 127, 128, 129, 200, 1000, 16_300, 16_340, 16_383, 16_384, 16_400];
        let times: [&[u8]; 9] = [
            b"2026-11-22T03:16:40.123456789Z",
            b"2026-11-22T03:16:41.000000001Z",
            b"2026-11-22T05:16:40.5+02:00",
            b"2026-11-22t03:16:40z",
            b"2026-11-22T03:16:40Z",
            b"1969-12-31T23:59:59.999999999Z",
            b"2262-04-11T23:47:16.854775808Z",
            b"not a time",
            b"",
        ];
        let levels = [None, Some(Level::Trace), Some(Level::Info), Some(Level::Error), Some(Level::Fatal)];
        let flags = [Flags::TRUNCATED, Flags::PARTIAL, Flags::MALFORMED, Flags::BAD_TIMESTAMP];
        let mut n = Numbers(32);
        for round in 0..40 {
            let path = if round % 2 == 0 {
                "/var/log/pods/ns_p_uid/c/0.log".to_string()
            } else {
                format!("/var/log/pods/{}/c/0.log", "ns_pod-".repeat(20))
            };
            let mut chunk = Chunk::new(Arc::new(Source { path: path.into(), ..Source::for_tests() }));
            let mut chunk_levels = Vec::new();
            // The last round's chunk passes 2 MiB: its length takes a four-byte varint.
            let count = if round == 39 { 140 } else { 1 + n.below(60) };
            for _ in 0..count {
                let timestamp = chunk.push_bytes(n.pick(&times[..]));
                let len = if round == 39 { 16_384 } else { n.pick(&lengths[..]) };
                let text = message(&mut n, len);
                let message = chunk.push_bytes(&text);
                let mut record_flags = Flags::default();
                for flag in flags {
                    if n.below(8) == 0 {
                        record_flags.insert(flag);
                    }
                }
                let stream = if n.below(2) == 0 { StreamKind::Stdout } else { StreamKind::Stderr };
                chunk.records.push(Record { timestamp, message, stream, offset: n.next() >> n.below(64), flags: record_flags });
                chunk_levels.push(n.pick(&levels[..]));
            }
            let mut structured = Structured::default();
            crate::logs::structured::Extractor::new(Default::default()).extract(&chunk, &mut structured);
            let observed = n.pick(&[UNIX_EPOCH, UNIX_EPOCH + std::time::Duration::from_nanos(1_800_000_000_123_456_789)]);
            let resource = ResourceTemplate::new(&meta());
            // Written by encode_chunk, which asserts its length as worked out.
            let ours = encoded(&chunk, &resource, &chunk_levels, &structured, observed);
            assert!(round != 39 || ours.len() > 2 << 20, "{} bytes", ours.len());

            let path = chunk.source.path.to_string_lossy().into_owned();
            let mut in_order = structured.in_order();
            let log_records = chunk
                .records
                .iter()
                .zip(&chunk_levels)
                .enumerate()
                .map(|(i, (record, level))| {
                    let mut log = log_record(
                        &chunk,
                        record,
                        *level,
                        &path,
                        unix_nanos(observed),
                        record_time(&chunk, record, &mut Seconds::default()),
                    );
                    if let Some(fields) = in_order.of(i) {
                        add_structured(&mut log, chunk.message(record), fields);
                    }
                    log
                })
                .collect();
            let scope = InstrumentationScope { name: "nodelens".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
            let reference = opentelemetry_proto::tonic::logs::v1::ResourceLogs {
                resource: Some(Resource::decode(resource.resource.as_slice()).unwrap()),
                scope_logs: vec![opentelemetry_proto::tonic::logs::v1::ScopeLogs {
                    scope: Some(scope),
                    log_records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            };
            assert_eq!(ours, request([reference.encode_to_vec().as_slice()]), "round {round}: the bytes prost writes");
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_chunk_becomes_one_resource_logs_with_the_semantic_conventions() {
        let mut chunk = Chunk::new(Arc::new(Source::for_tests()));
        for (i, (message, stream, flags)) in
            [(&b"step=1 loss=0.5"[..], StreamKind::Stdout, Flags::default()), (&b"bad \xff byte"[..], StreamKind::Stderr, Flags::TRUNCATED)]
                .into_iter()
                .enumerate()
        {
            let timestamp = chunk.push_bytes(b"2026-11-22T03:16:40.123456789Z");
            let message = chunk.push_bytes(message);
            chunk.records.push(Record { timestamp, message, stream, offset: 100 * i as u64, flags });
        }
        let template = ResourceTemplate::new(&meta());
        let observed = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let one = encoded(&chunk, &template, &[None, Some(Level::Error)], &Structured::default(), observed);
        let body = [one.as_slice(), one.as_slice()].concat();
        let decoded = ExportLogsServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(decoded.resource_logs.len(), 2, "chunks concatenate into the repeated field");

        let resource = attributes(&decoded.resource_logs[0].resource.as_ref().unwrap().attributes);
        let want: BTreeMap<String, String> = [
            ("k8s.namespace.name", "ml"),
            ("k8s.pod.name", "trainer-0"),
            ("k8s.pod.uid", "uid-1"),
            ("k8s.container.name", "worker"),
            ("k8s.container.restart_count", "int:2"),
            ("k8s.node.name", "gpu-1"),
            ("host.name", "gpu-1"),
            ("k8s.cluster.name", "prod"),
            ("service.name", "trainer"),
            ("user.name", "alice"),
            ("k8s.pod.ip", "10.0.0.7"),
            ("container.id", "containerd://abc"),
            ("container.image.name", "registry/trainer:3"),
            ("container.runtime.name", "containerd"),
            ("k8s.cronjob.name", "nightly"),
            ("k8s.job.name", "nightly-29123456"),
            ("k8s.pod.label.app.kubernetes.io/name", "trainer"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(resource, want);

        let scope = &decoded.resource_logs[0].scope_logs[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "nodelens");
        let [first, second] = &scope.log_records[..] else { panic!("two records: {scope:?}") };
        assert_eq!(first.time_unix_nano, 1_795_317_400_123_456_789);
        assert_eq!(first.observed_time_unix_nano, 1_800_000_000_000_000_000);
        assert_eq!((first.severity_number, first.severity_text.as_str()), (0, ""));
        assert_eq!(first.body.as_ref().unwrap().value, Some(Value::StringValue("step=1 loss=0.5".into())));
        let attrs = attributes(&first.attributes);
        assert_eq!(attrs["log.iostream"], "stdout");
        assert_eq!(attrs["log.file.path"], "/var/log/pods/ns_pod_uid/c/0.log");
        assert_eq!(attrs["log.record.uid"], format!("{:032x}", chunk.source.id.record_id(0)));
        assert!(!attrs.contains_key("nodelens.log.flags"));

        assert_eq!((second.severity_number, second.severity_text.as_str()), (SeverityNumber::Error as i32, "ERROR"));
        assert_eq!(second.body.as_ref().unwrap().value, Some(Value::StringValue("bad \u{fffd} byte".into())));
        let attrs = attributes(&second.attributes);
        assert_eq!(attrs["log.iostream"], "stderr");
        assert_eq!(attrs["log.record.uid"], format!("{:032x}", chunk.source.id.record_id(100)));
        assert!(attrs["nodelens.log.flags"].contains("truncated"), "{attrs:?}");
        let resource_logs = decoded.resource_logs[0].encode_to_vec();
        assert_eq!(one, request([resource_logs.as_slice()]), "the bytes prost writes");
    }
}
