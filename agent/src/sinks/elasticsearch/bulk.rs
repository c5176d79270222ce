//! The `_bulk` wire format: NDJSON bodies of `create` actions with deterministic ids, and the
//! per-item statuses Elasticsearch replies with, in request order.

use std::io::Write;
use std::sync::Arc;

use serde::Deserialize;

use crate::sinks::Batch;

/// One document to index: a record of a batch.
#[derive(Debug, Clone)]
pub struct Item {
    /// The batch holding the document.
    pub batch: Arc<Batch>,
    /// Its index in the batch.
    pub index: u32,
}

impl Item {
    /// The document, newline included.
    pub fn doc(&self) -> &[u8] {
        self.batch.docs.doc(self.index as usize)
    }

    /// The deterministic `_id`: container, file fingerprint and offset.
    pub fn id(&self) -> u128 {
        self.batch.file.record_id(self.batch.docs.offsets[self.index as usize])
    }

    /// Bytes the item takes in a body.
    pub fn body_len(&self) -> usize {
        ACTION_LEN + self.batch.index.as_ref().map_or(0, |i| INDEX_LEN + i.len()) + self.doc().len()
    }
}

/// `{"create":{"_id":"<32 hex digits>"}}\n`
const ACTION_LEN: usize = 18 + 32 + 4;
/// `"_index":"",` added before the `_id` when a batch names its data stream.
const INDEX_LEN: usize = 12;

/// Writes the NDJSON body for `items` (straight into a compressor, when there is one): an
/// action line and a document line each, the last line ending in a newline as the API requires.
pub fn body<W: Write>(items: &[Item], out: &mut W) -> std::io::Result<()> {
    for item in items {
        match &item.batch.index {
            // Data stream names are lower-case letters, digits, `-`, `_` and `.`: nothing to escape.
            Some(index) => writeln!(out, "{{\"create\":{{\"_index\":\"{index}\",\"_id\":\"{:032x}\"}}}}", item.id())?,
            None => writeln!(out, "{{\"create\":{{\"_id\":\"{:032x}\"}}}}", item.id())?,
        }
        out.write_all(item.doc())?;
    }
    Ok(())
}

/// Splits `items` into runs whose bodies stay under `max_bytes` (a single larger item is a
/// run of its own).
pub fn split_by_size(items: &[Item], max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let len = item.body_len();
        if i > start && size + len > max_bytes {
            runs.push(start..i);
            start = i;
            size = 0;
        }
        size += len;
    }
    if start < items.len() {
        runs.push(start..items.len());
    }
    runs
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Created.
    Created,
    /// Already there (409 on `create`): a resend after a crash or a lost reply.
    Duplicate,
    /// 429: Elasticsearch is overloaded; send again later, however long it takes.
    Overloaded,
    /// 5xx: send again later; given up after `item_max_attempts` such answers while
    /// Elasticsearch accepts other records (a shard may fail on this document every time).
    Failed(String),
    /// Any other 4xx: the document will never be accepted.
    Rejected(String),
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    errors: bool,
    #[serde(default)]
    items: Vec<std::collections::HashMap<String, ItemReply>>,
}

#[derive(Deserialize)]
struct ItemReply {
    status: u16,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Reads a `_bulk` reply for `count` items.
pub fn outcomes(reply: &[u8], count: usize) -> Result<Vec<Outcome>, String> {
    let reply: Reply = serde_json::from_slice(reply).map_err(|e| format!("unreadable _bulk reply: {e}"))?;
    if !reply.errors && reply.items.is_empty() {
        return Ok(vec![Outcome::Created; count]);
    }
    if reply.items.len() != count {
        return Err(format!("_bulk reply has {} items for {count} sent", reply.items.len()));
    }
    Ok(reply
        .items
        .into_iter()
        .map(|mut item| {
            let Some((_, item)) = item.drain().next() else { return Outcome::Failed("empty item in the reply".into()) };
            match item.status {
                200..=299 => Outcome::Created,
                409 => Outcome::Duplicate,
                429 => Outcome::Overloaded,
                500..=599 => Outcome::Failed(reason(item.status, item.error.as_ref())),
                _ => Outcome::Rejected(reason(item.status, item.error.as_ref())),
            }
        })
        .collect())
}

fn reason(status: u16, error: Option<&serde_json::Value>) -> String {
    let Some(error) = error else { return format!("status {status}") };
    let kind = error.get("type").and_then(|t| t.as_str()).unwrap_or("error");
    let why = error.get("reason").and_then(|t| t.as_str()).unwrap_or("");
    let cause = error.get("caused_by").and_then(|c| c.get("reason")).and_then(|t| t.as_str());
    match cause {
        Some(cause) => format!("{status} {kind}: {why} ({cause})"),
        None => format!("{status} {kind}: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::source::FileId;
    use crate::sinks::ecs::Documents;

    fn batch(docs: &[&str]) -> Arc<Batch> {
        let mut d = Documents::default();
        for (i, doc) in docs.iter().enumerate() {
            d.bytes.extend_from_slice(doc.as_bytes());
            d.bytes.push(b'\n');
            d.ends.push(d.bytes.len() as u32);
            d.offsets.push(i as u64 * 100);
        }
        Arc::new(Batch { seq: 0, file: FileId { container: 1, fingerprint: 2 }, records: d.len(), docs: d, otlp: Vec::new(), index: None })
    }

    fn items(b: &Arc<Batch>) -> Vec<Item> {
        (0..b.docs.len() as u32).map(|index| Item { batch: b.clone(), index }).collect()
    }

    #[test]
    fn body_is_ndjson_with_create_actions_and_stable_ids() {
        let b = batch(&[r#"{"message":"a"}"#, r#"{"message":"b"}"#]);
        let mut out = Vec::new();
        body(&items(&b), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(text.ends_with('\n'));
        let action: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let id = action["create"]["_id"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(lines[0].len() + 1, ACTION_LEN);
        assert_eq!(lines[1], r#"{"message":"a"}"#);
        let mut again = Vec::new();
        body(&items(&b), &mut again).unwrap();
        assert_eq!(text.as_bytes(), &again[..], "ids are deterministic");
        assert_ne!(lines[0], lines[2], "each record its own id");
    }

    #[test]
    fn a_batch_naming_its_data_stream_carries_it_in_each_action() {
        let plain = batch(&[r#"{"message":"a"}"#]);
        let mut node = Arc::try_unwrap(batch(&[r#"{"message":"k"}"#])).unwrap();
        node.index = Some("logs-kubernetes.node-default".into());
        let node = Arc::new(node);
        let all: Vec<Item> = items(&plain).into_iter().chain(items(&node)).collect();
        let mut out = Vec::new();
        body(&all, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let action: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(action["create"]["_index"], "logs-kubernetes.node-default");
        assert!(serde_json::from_str::<serde_json::Value>(lines[0]).unwrap()["create"].get("_index").is_none());
        assert_eq!(lines[2].len() + 1 + lines[3].len() + 1, all[1].body_len(), "body_len measures the action with its index");
    }

    #[test]
    fn runs_stay_under_the_size_bound() {
        let b = batch(&["x".repeat(100).as_str(), "y".repeat(100).as_str(), "z".repeat(100).as_str(), "w".repeat(1000).as_str()]);
        let runs = split_by_size(&items(&b), 2 * (ACTION_LEN + 101));
        assert_eq!(runs, vec![0..2, 2..3, 3..4]);
    }

    #[test]
    fn item_statuses_map_to_outcomes_in_order() {
        let reply = br#"{"errors":true,"items":[
            {"create":{"status":201}},
            {"create":{"status":409,"error":{"type":"version_conflict_engine_exception","reason":"exists"}}},
            {"create":{"status":429,"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}},
            {"create":{"status":503,"error":{"type":"unavailable_shards_exception","reason":"x"}}},
            {"create":{"status":400,"error":{"type":"document_parsing_exception","reason":"failed to parse","caused_by":{"reason":"bad date"}}}}
        ]}"#;
        let got = outcomes(reply, 5).unwrap();
        assert_eq!(got[..3], [Outcome::Created, Outcome::Duplicate, Outcome::Overloaded]);
        assert_eq!(got[3], Outcome::Failed("503 unavailable_shards_exception: x".into()));
        assert_eq!(got[4], Outcome::Rejected("400 document_parsing_exception: failed to parse (bad date)".into()));
    }

    #[test]
    fn a_clean_filtered_reply_means_all_created_and_a_short_one_is_an_error() {
        assert_eq!(outcomes(br#"{"errors":false}"#, 3).unwrap(), vec![Outcome::Created; 3]);
        assert!(outcomes(br#"{"errors":true,"items":[{"create":{"status":201}}]}"#, 2).is_err());
        assert!(outcomes(b"<html>", 1).is_err());
    }
}
