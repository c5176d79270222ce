//! Fields a record's text carries: a JSON object's message, level, trace and span ids and
//! other keys (`logs.json: auto`), and a W3C `traceparent` anywhere in a line.
//!
//! The record itself is not changed (multi-line rules and log-derived metrics see the text as
//! written): what is found is kept beside it, per chunk, with the ECS fragment already
//! rendered, so the encoders only copy bytes. A line that does not start with `{` costs a
//! look at its first byte: where `00-` is (a `traceparent` may start) is searched for once in
//! the chunk's whole buffer.

use std::borrow::Cow;
use std::ops::Range;

use memchr::memmem::Finder;

use super::chunk::{Chunk, Flags, Occurrences};
use super::json::{self, Member};
use super::level::Level;
pub use crate::config::JsonMode;

/// Most keys kept under `json`.
pub const MAX_KEYS: usize = 64;
/// Most bytes of keys and values kept under `json`.
pub const MAX_BYTES: usize = 8 * 1024;
/// Deepest value kept under `json`: Elasticsearch refuses a `flattened` field nested deeper
/// than its `depth_limit` (20), which would lose the whole record.
const MAX_DEPTH: usize = 19;

/// What one record's text gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// The JSON object's `msg`/`message`, as a JSON string token in [`Structured::buf`].
    pub message: Option<Range<u32>>,
    /// The JSON object's `level`/`severity`/`lvl`.
    pub level: Option<Level>,
    /// `"trace":{..},"span":{..},"json":{..},` in [`Structured::buf`]; empty when none.
    pub ecs: Range<u32>,
    /// The trace id, when it is 32 hex digits (OTLP carries only such ids).
    pub trace_id: Option<[u8; 16]>,
    /// The span id, when it is 16 hex digits.
    pub span_id: Option<[u8; 8]>,
    /// `json_truncated`, when keys were dropped.
    pub flags: Flags,
    /// The message is a JSON object (OTLP sends it as a kvlist body).
    pub object: bool,
}

/// The fields of a chunk's records whose text gave any (most give none), in record order.
#[derive(Debug, Default)]
pub struct Structured {
    /// Backing bytes of the rendered fragments.
    pub buf: Vec<u8>,
    /// Each such record's index in its chunk, and its fields.
    records: Vec<(u32, Fields)>,
}

impl Structured {
    /// Bytes of a range in [`Structured::buf`].
    pub fn bytes(&self, range: &Range<u32>) -> &[u8] {
        &self.buf[range.start as usize..range.end as usize]
    }

    /// The records' fields, asked for in record order.
    pub fn in_order(&self) -> InOrder<'_> {
        InOrder { rest: &self.records, asked: 0 }
    }
}

/// Walks a chunk's [`Structured`] fields along its records.
pub struct InOrder<'a> {
    rest: &'a [(u32, Fields)],
    /// The index last asked for.
    asked: usize,
}

impl<'a> InOrder<'a> {
    /// The fields of record `index`, if its text gave any. Indexes asked for must not go
    /// down: those of the records passed by are let go.
    pub fn of(&mut self, index: usize) -> Option<&'a Fields> {
        debug_assert!(index >= self.asked, "record {index} asked for after record {}", self.asked);
        self.asked = index;
        while let Some(((at, fields), rest)) = self.rest.split_first() {
            match (*at as usize).cmp(&index) {
                std::cmp::Ordering::Less => self.rest = rest,
                std::cmp::Ordering::Equal => return Some(fields),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }
}

/// Finds fields in records; one per encoder.
pub struct Extractor {
    mode: JsonMode,
    /// Reused for every object's members and the ones kept (emptied between records).
    scratch: [Vec<Member<'static>>; 2],
    /// Where a `traceparent` may start in the chunk (`00-`), found in one search.
    starts: Occurrences,
    starts_finder: Finder<'static>,
}

impl Extractor {
    /// An extractor reading JSON messages as `mode` says.
    pub fn new(mode: JsonMode) -> Extractor {
        Extractor { mode, scratch: [Vec::new(), Vec::new()], starts: Occurrences::default(), starts_finder: Finder::new(b"00-") }
    }

    /// The fields of the records of `chunk` whose text gives any, into `out` (emptied first).
    pub fn extract(&mut self, chunk: &Chunk, out: &mut Structured) {
        out.buf.clear();
        out.records.clear();
        let mut starts = std::mem::take(&mut self.starts);
        starts.find(&self.starts_finder, chunk);
        for (index, record) in chunk.records.iter().enumerate() {
            let message = chunk.message(record);
            let fields = match starts.inside(record.message.clone()) {
                Some(found) => self.record_among(message, found, &mut out.buf),
                None => self.record(message, &mut out.buf),
            };
            if let Some(fields) = fields {
                out.records.push((index as u32, fields));
            }
        }
        self.starts = starts;
    }

    /// The fields of one message, their fragments appended to `buf`; `None` when it gives
    /// none (not a JSON object, no `traceparent`). (A chunk's records: [`Extractor::extract`],
    /// which searches the chunk once.)
    pub fn record(&mut self, message: &[u8], buf: &mut Vec<u8>) -> Option<Fields> {
        self.record_among(message, traceparent_starts(message), buf)
    }

    /// As [`Extractor::record`], a `traceparent` looked for at `starts` (where `00-` is).
    fn record_among(&mut self, message: &[u8], starts: impl Iterator<Item = usize>, buf: &mut Vec<u8>) -> Option<Fields> {
        let mut fields = Fields::default();
        let start = buf.len() as u32;
        if self.mode == JsonMode::Auto && message.first() == Some(&b'{') {
            let text = match std::str::from_utf8(message) {
                Ok(text) => Cow::Borrowed(text),
                // Invalid bytes never are JSON's structure: the object reads the same with
                // them replaced, and what is written is valid UTF-8.
                Err(_) => String::from_utf8_lossy(message),
            };
            if json::is_object(&text) {
                let [a, b] = std::mem::take(&mut self.scratch);
                let [a, b] = self.object(&text, [reuse(a), reuse(b)], buf, &mut fields);
                self.scratch = [reuse(a), reuse(b)];
            }
        }
        if fields.trace_id.is_none() && !fields.object {
            if let Some((trace, span)) = traceparent_among(message, starts) {
                write_ids(buf, trace, span, &mut fields);
            }
        }
        if !fields.object && buf.len() as u32 == start {
            return None;
        }
        let end = fields.message.as_ref().map_or(buf.len() as u32, |m| m.start);
        fields.ecs = start..end;
        Some(fields)
    }

    fn object<'a>(&self, text: &'a str, scratch: [Vec<Member<'a>>; 2], buf: &mut Vec<u8>, fields: &mut Fields) -> [Vec<Member<'a>>; 2] {
        let [mut members, mut kept] = scratch;
        fields.object = true;
        json::members(text, &mut members);
        let (mut message, mut trace, mut span) = (None, None, None);
        let mut bytes = 0usize;
        for &Member { key, value } in &members {
            let is_string = value.starts_with('"');
            match key {
                r#""msg""# | r#""message""# if is_string => {
                    message = Some(value);
                    continue;
                }
                r#""trace_id""# | r#""traceId""# | r#""trace.id""# if is_string => {
                    trace = Some(value);
                    continue;
                }
                r#""span_id""# | r#""spanId""# | r#""span.id""# if is_string => {
                    span = Some(value);
                    continue;
                }
                r#""level""# | r#""severity""# | r#""lvl""# => {
                    if let Some(level) = level_of(value) {
                        fields.level = Some(level);
                        continue;
                    }
                }
                _ => {}
            }
            // A repeated key: the last value counts, as most parsers read it (Elasticsearch
            // refuses a document with a repeated key, so only one is written).
            if let Some(same) = kept.iter().position(|m| m.key == key) {
                let old = kept.remove(same);
                bytes -= old.key.len() + old.value.len() + 2;
            }
            let size = key.len() + value.len() + 2;
            if kept.len() >= MAX_KEYS || bytes + size > MAX_BYTES || json::depth(value) > MAX_DEPTH || json::has_duplicate_keys(value) {
                fields.flags.insert(Flags::JSON_TRUNCATED);
                continue;
            }
            kept.push(Member { key, value });
            bytes += size;
        }
        if let Some(trace) = trace {
            buf.extend_from_slice(b"\"trace\":{\"id\":");
            buf.extend_from_slice(trace.as_bytes());
            buf.extend_from_slice(b"},");
            fields.trace_id = hex_id(trace.trim_matches('"'));
        }
        if let Some(span) = span {
            buf.extend_from_slice(b"\"span\":{\"id\":");
            buf.extend_from_slice(span.as_bytes());
            buf.extend_from_slice(b"},");
            fields.span_id = hex_id(span.trim_matches('"'));
        }
        if trace.is_none() && span.is_none() {
            if let Some((t, s)) = find_traceparent(text.as_bytes()) {
                write_ids(buf, t, s, fields);
            }
        }
        if !kept.is_empty() {
            buf.extend_from_slice(b"\"json\":{");
            for (n, m) in kept.iter().enumerate() {
                if n > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(m.key.as_bytes());
                buf.push(b':');
                buf.extend_from_slice(m.value.as_bytes());
            }
            buf.extend_from_slice(b"},");
        }
        // After the fragment, which ends where the message starts.
        if let Some(message) = message {
            let at = buf.len() as u32;
            buf.extend_from_slice(message.as_bytes());
            fields.message = Some(at..buf.len() as u32);
        }
        [members, kept]
    }
}

/// An empty vector of any lifetime, reusing the allocation of `v`.
fn reuse<'a, 'b>(mut v: Vec<Member<'a>>) -> Vec<Member<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("empty")).collect()
}

fn write_ids(buf: &mut Vec<u8>, trace: &[u8], span: &[u8], fields: &mut Fields) {
    buf.extend_from_slice(b"\"trace\":{\"id\":\"");
    buf.extend_from_slice(trace);
    buf.extend_from_slice(b"\"},\"span\":{\"id\":\"");
    buf.extend_from_slice(span);
    buf.extend_from_slice(b"\"},");
    fields.trace_id = hex_id(std::str::from_utf8(trace).unwrap_or_default());
    fields.span_id = hex_id(std::str::from_utf8(span).unwrap_or_default());
}

/// A level value: a level word (`"ERROR"`, `"warning"`) or a pino/bunyan number (10..60).
fn level_of(value: &str) -> Option<Level> {
    if let Some(word) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        return Level::from_word(word.as_bytes());
    }
    Some(match value {
        "10" => Level::Trace,
        "20" => Level::Debug,
        "30" => Level::Info,
        "40" => Level::Warn,
        "50" => Level::Error,
        "60" => Level::Fatal,
        _ => return None,
    })
}

/// The bytes of an id written as hex digits (`N` bytes, not all zero).
fn hex_id<const N: usize>(text: &str) -> Option<[u8; N]> {
    let b = text.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let mut id = [0u8; N];
    for (i, pair) in b.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        id[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    (id != [0; N]).then_some(id)
}

/// The first valid W3C `traceparent` in `text` (`00-<32 hex>-<16 hex>-<2 hex>`, lower case,
/// ids not all zero, not part of a longer hex run): its trace and span ids.
pub fn find_traceparent(text: &[u8]) -> Option<(&[u8], &[u8])> {
    traceparent_among(text, traceparent_starts(text))
}

/// Where `00-` is in `text`, found from the `-` signs: fewer in a log line than `0`s.
fn traceparent_starts(text: &[u8]) -> impl Iterator<Item = usize> + '_ {
    memchr::memchr_iter(b'-', text).filter(|&dash| dash >= 2 && text[dash - 2..dash] == *b"00").map(|dash| dash - 2)
}

/// As [`find_traceparent`], the candidates being `starts`: every place `00-` is, in order.
fn traceparent_among(text: &[u8], starts: impl Iterator<Item = usize>) -> Option<(&[u8], &[u8])> {
    let lower_hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let word = |c: u8| c.is_ascii_alphanumeric();
    for at in starts {
        let Some(candidate) = text.get(at..at + 55) else { break };
        let (trace, span, flags) = (&candidate[3..35], &candidate[36..52], &candidate[53..55]);
        let framed = candidate[35] == b'-' && candidate[52] == b'-';
        let bounded = at.checked_sub(1).is_none_or(|i| !word(text[i])) && text.get(at + 55).is_none_or(|&c| !word(c));
        if framed
            && bounded
            && lower_hex(trace)
            && lower_hex(span)
            && lower_hex(flags)
            && trace.iter().any(|&c| c != b'0')
            && span.iter().any(|&c| c != b'0')
        {
            return Some((trace, span));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_whose_text_gives_fields_are_kept_and_each_is_found_by_its_index() {
        let messages = [
            "plain",
            r#"{"msg":"a","level":"warn"}"#,
            "plain again",
            "x 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 y",
            "{not json",
            "{}",
        ];
        let chunk = Chunk::for_tests(messages.iter().map(|text| (&b""[..], text.as_bytes())));
        let mut out = Structured::default();
        Extractor::new(JsonMode::Auto).extract(&chunk, &mut out);
        assert_eq!(out.records.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 3, 5], "{out:?}");
        let mut in_order = out.in_order();
        let found: Vec<_> = (0..messages.len()).map(|i| in_order.of(i).map(|f| (f.level, f.object, f.trace_id.is_some()))).collect();
        assert_eq!(found, [None, Some((Some(Level::Warn), true, false)), None, Some((None, false, true)), None, Some((None, true, false))]);
        let mut skipping = out.in_order();
        assert_eq!((skipping.of(3).is_some(), skipping.of(4), skipping.of(5).is_some()), (true, None, true), "records passed by");
        assert_eq!(skipping.of(9), None, "past the last");
    }

    fn fields(message: &str) -> (Fields, String, Option<String>) {
        let mut buf = Vec::new();
        let f = Extractor::new(JsonMode::Auto).record(message.as_bytes(), &mut buf).unwrap_or_default();
        let ecs = String::from_utf8(buf[f.ecs.start as usize..f.ecs.end as usize].to_vec()).unwrap();
        let msg = f.message.clone().map(|r| String::from_utf8(buf[r.start as usize..r.end as usize].to_vec()).unwrap());
        (f, ecs, msg)
    }

    #[test]
    fn a_json_object_gives_message_level_ids_and_the_other_keys() {
        let (f, ecs, msg) = fields(
            r#"{"ts":1.5,"level":"WARNING","msg":"disk \"almost\" full","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7","user":{"id":7},"a.b":[1,2]}"#,
        );
        assert_eq!(msg.as_deref(), Some(r#""disk \"almost\" full""#));
        assert_eq!(f.level, Some(Level::Warn));
        assert_eq!(
            ecs,
            r#""trace":{"id":"4bf92f3577b34da6a3ce929d0e0e4736"},"span":{"id":"00f067aa0ba902b7"},"json":{"ts":1.5,"user":{"id":7},"a.b":[1,2]},"#
        );
        assert_eq!(f.trace_id.unwrap()[0], 0x4b);
        assert_eq!(f.span_id.unwrap()[7], 0xb7);
        assert!(f.object && f.flags.is_empty());
    }

    #[test]
    fn text_and_not_quite_json_give_nothing() {
        for line in ["plain text", r#"{"a":1,}"#, r#"{"msg":"x"} and more"#, "{not json}", ""] {
            let (f, ecs, _) = fields(line);
            assert_eq!((f.object, ecs.as_str(), f.message), (false, "", None), "{line}");
        }
        let mut buf = Vec::new();
        assert_eq!(Extractor::new(JsonMode::Off).record(br#"{"msg":"x"}"#, &mut buf), None);
    }

    #[test]
    fn keys_past_64_or_8_kib_are_dropped_and_flagged() {
        let many: Vec<String> = (0..200).map(|i| format!("\"k{i}\":{i}")).collect();
        let (f, ecs, _) = fields(&format!("{{{}}}", many.join(",")));
        assert_eq!(f.flags, Flags::JSON_TRUNCATED);
        let kept: serde_json::Value = serde_json::from_str(&format!("{{{}}}", ecs.trim_end_matches(','))).unwrap();
        let kept = kept["json"].as_object().unwrap();
        assert_eq!(kept.len(), MAX_KEYS);
        assert_eq!(kept["k63"], 63);

        let huge = "x".repeat(10_000);
        let (f, ecs, _) = fields(&format!(r#"{{"big":"{huge}","small":1}}"#));
        assert_eq!((f.flags, ecs.as_str()), (Flags::JSON_TRUNCATED, r#""json":{"small":1},"#));
    }

    #[test]
    fn duplicate_keys_keep_the_last_value_and_deep_values_are_dropped() {
        let (f, ecs, _) = fields(r#"{"a":1,"b":2,"a":3}"#);
        assert_eq!((f.flags, ecs.as_str()), (Flags::default(), r#""json":{"b":2,"a":3},"#));
        let deep = format!("{}1{}", "[".repeat(25), "]".repeat(25));
        let (f, ecs, _) = fields(&format!(r#"{{"deep":{deep},"x":{{"y":{{"z":1}}}},"d":{{"k":1,"k":2}}}}"#));
        assert_eq!((f.flags, ecs.as_str()), (Flags::JSON_TRUNCATED, r#""json":{"x":{"y":{"z":1}}},"#));
    }

    #[test]
    fn invalid_utf8_inside_strings_is_replaced() {
        let mut buf = Vec::new();
        let f = Extractor::new(JsonMode::Auto).record(b"{\"msg\":\"caf\xc3\",\"k\":\"\xff\"}", &mut buf).unwrap();
        assert_eq!(&buf[f.message.clone().unwrap().start as usize..f.message.unwrap().end as usize], "\"caf\u{fffd}\"".as_bytes());
        assert_eq!(&buf[f.ecs.start as usize..f.ecs.end as usize], "\"json\":{\"k\":\"\u{fffd}\"},".as_bytes());
    }

    /// Looked for once in the chunk's whole buffer, `00-` gives each record what a search of
    /// its own message gives: nothing from across a message's edges.
    #[test]
    fn traceparents_found_in_a_whole_chunk_are_each_records_own() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        // (bytes before the message, in a timestamp's place; the message)
        let records = [
            ("0", format!("a {tp} b")),
            ("0", tp[1..].to_string()),
            ("", tp[..40].to_string()),
            (&tp[40..], "plain".to_string()),
            ("", format!("x00-{}", &tp[3..])),
            ("", format!("000-{} {tp}", &tp[3..])),
            ("00", format!("-{}", &tp[3..])),
            ("", format!("{tp}f {tp}")),
            ("", tp.to_string()),
        ];
        let chunk = Chunk::for_tests(records.iter().map(|(before, text)| (before.as_bytes(), text.as_bytes())));
        let mut extractor = Extractor::new(JsonMode::Auto);
        let mut out = Structured::default();
        extractor.extract(&chunk, &mut out);
        let mut in_order = out.in_order();
        let mut found = 0;
        for (i, (_, text)) in records.iter().enumerate() {
            let alone = extractor.record(text.as_bytes(), &mut Vec::new()).map(|f| (f.trace_id, f.span_id));
            assert_eq!(in_order.of(i).map(|f| (f.trace_id, f.span_id)), alone, "{text}");
            found += usize::from(alone.is_some());
        }
        assert_eq!(found, 4, "{out:?}");
    }

    /// A chunk holding more `00-` than are kept is searched message by message.
    #[test]
    fn a_chunk_full_of_candidates_is_searched_message_by_message() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (full, traced) = ("00-".repeat(9000), format!("x {tp}"));
        let chunk = Chunk::for_tests([(&b""[..], full.as_bytes()), (b"", traced.as_bytes())]);
        let mut out = Structured::default();
        Extractor::new(JsonMode::Auto).extract(&chunk, &mut out);
        let mut in_order = out.in_order();
        assert!(in_order.of(0).is_none());
        assert!(in_order.of(1).is_some_and(|f| f.trace_id.is_some()), "{out:?}");
    }

    #[test]
    fn a_traceparent_anywhere_gives_the_ids_and_invalid_ones_none() {
        let (f, ecs, _) = fields("GET /x traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 200");
        assert_eq!(ecs, r#""trace":{"id":"4bf92f3577b34da6a3ce929d0e0e4736"},"span":{"id":"00f067aa0ba902b7"},"#);
        assert!(f.trace_id.is_some() && f.span_id.is_some());
        for line in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "x00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01f",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
        ] {
            assert_eq!(fields(line).1, "", "{line}");
        }
        let (_, ecs, _) = fields(r#"{"msg":"call","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#);
        assert!(ecs.starts_with(r#""trace":{"id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#), "{ecs}");
    }
}
