//! The `_bulk` wire format: NDJSON bodies of `create` actions with deterministic ids, and the
//! per-item statuses Elasticsearch replies with, in request order.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;

use crate::logs::source::FileId;
use crate::packed::{Body, Chunks, Packer, INLINE_WORK};
use crate::sinks::ecs::Documents;
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
    /// Where its lines (action and document) are in the batch's plain `_bulk` lines.
    fn span(&self) -> std::ops::Range<usize> {
        let ends = self.batch.bulk.ends();
        let i = self.index as usize;
        (if i == 0 { 0 } else { ends[i - 1] as usize })..ends[i] as usize
    }

    /// Bytes the item takes in a body, before compression.
    pub fn body_len(&self) -> usize {
        self.span().len()
    }
}

/// Writes the `_bulk` lines of `docs` (records of `file`, into the data stream `index` when
/// named) to `out`: a `create` action with the record's deterministic `_id` and the document,
/// each line ending in a newline as the API requires. Returns where each record's lines end.
pub fn lines(file: FileId, index: Option<&str>, docs: &Documents, out: &mut Vec<u8>) -> Vec<u32> {
    let mut ends = Vec::with_capacity(docs.len());
    out.reserve(docs.bytes.len() + docs.len() * (ACTION_LEN + index.map_or(0, |i| INDEX_LEN + i.len())));
    for (i, offset) in docs.offsets.iter().enumerate() {
        action(file, index, *offset, out);
        out.extend_from_slice(docs.doc(i));
        ends.push(out.len() as u32);
    }
    ends
}

/// Writes the `create` action line of the record of `file` at `offset`, into the data
/// stream `index` when named.
pub fn action(file: FileId, index: Option<&str>, offset: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"create\":{");
    if let Some(index) = index {
        // Data stream names are lower-case letters, digits, `-`, `_` and `.`: nothing to escape.
        out.extend_from_slice(b"\"_index\":\"");
        out.extend_from_slice(index.as_bytes());
        out.extend_from_slice(b"\",");
    }
    out.extend_from_slice(b"\"_id\":\"");
    crate::logs::source::push_hex_id(file.record_id(offset), out);
    out.extend_from_slice(b"\"}}\n");
}

/// `{"create":{"_id":"<32 hex digits>"}}\n`
const ACTION_LEN: usize = 18 + 32 + 4;
/// `"_index":"",` added before the `_id` when a batch names its data stream.
const INDEX_LEN: usize = 12;

/// The body for `items`: where they are a whole batch, its packed lines as they are; where
/// some of a batch's records (sent again alone, or half of a split), its lines inflated once
/// and those records' compressed again with `packer`, together with the small pieces next
/// to them.
pub fn body(items: &[Item], gzip: bool, packer: &mut Packer) -> Chunks {
    let runs = runs(items);
    let mut body = Body::new(gzip, 0, runs.len(), packer);
    // The plain lines of the last batch some of whose records went in: a batch's runs follow
    // each other, so each is inflated once.
    let mut inflated: Option<(&Arc<Batch>, Cow<'_, [u8]>)> = None;
    for run in &runs {
        let batch = &run.0.batch;
        if whole(run) {
            body.push(&batch.bulk);
            continue;
        }
        if !inflated.as_ref().is_some_and(|(b, _)| Arc::ptr_eq(b, batch)) {
            inflated = Some((batch, batch.bulk.plain()));
        }
        let lines = &inflated.as_ref().expect("set above").1;
        body.push_plain(&lines[run.0.span().start..run.1.span().end]);
    }
    body.finish()
}

/// Runs of items of one batch, in order, one after another: (first item, last item).
fn runs(items: &[Item]) -> Vec<(&Item, &Item)> {
    let mut runs = Vec::new();
    let mut rest = items;
    while let Some(first) = rest.first() {
        let run = rest.iter().zip(first.index..).take_while(|(item, i)| Arc::ptr_eq(&item.batch, &first.batch) && item.index == *i).count();
        runs.push((first, &rest[run - 1]));
        rest = &rest[run..];
    }
    runs
}

/// Whether a run is all of its batch.
fn whole((first, last): &(&Item, &Item)) -> bool {
    first.index == 0 && last.index as usize + 1 == first.batch.bulk.ends().len()
}

/// Plain bytes that putting the body for `items` together compresses or inflates: none
/// where it is made of whole batches already compressed (or is not compressed at all).
pub fn body_work(items: &[Item], gzip: bool) -> usize {
    runs(items)
        .iter()
        .map(|run| {
            let piece = &run.0.batch.bulk;
            match whole(run) {
                true => piece.work(gzip),
                // Inflated, when compressed, then compressed again, when the body is.
                false => {
                    let inflate = if piece.is_compressed() { piece.plain_len() } else { 0 };
                    inflate + if gzip { run.0.span().start.abs_diff(run.1.span().end) } else { 0 }
                }
            }
        })
        .sum()
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

/// A `_bulk` reply's items, read where some failed.
#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    items: Vec<std::collections::HashMap<String, ItemReply>>,
}

#[derive(Deserialize)]
struct ItemReply {
    status: u16,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// A `_bulk` reply read only for whether any item failed, and how many items it has.
#[derive(Deserialize)]
struct Summary {
    #[serde(default)]
    errors: bool,
    #[serde(default)]
    items: Vec<serde::de::IgnoredAny>,
}

/// Reads a `_bulk` reply for `count` items: `None` when every item was created (`errors:
/// false`, as for nearly every request; the items are then only counted, not read), else
/// each item's outcome.
pub fn outcomes(reply: &[u8], count: usize) -> Result<Option<Vec<Outcome>>, String> {
    if all_created(reply, count) {
        return Ok(None);
    }
    parse_outcomes(reply, count)
}

/// As [`outcomes`], the reply parsed whatever its form.
fn parse_outcomes(reply: &[u8], count: usize) -> Result<Option<Vec<Outcome>>, String> {
    let unreadable = |e: serde_json::Error| format!("unreadable _bulk reply: {e}");
    let summary: Summary = serde_json::from_slice(reply).map_err(unreadable)?;
    if !summary.errors && summary.items.len() == count {
        return Ok(None);
    }
    if summary.items.is_empty() {
        // Under the sink's `filter_path` Elasticsearch lists every item; a reply without them
        // (a proxy, a wrong path) says nothing of the records.
        return Err(format!("_bulk reply without items for {count} sent"));
    }
    let reply: Reply = serde_json::from_slice(reply).map_err(unreadable)?;
    if reply.items.len() != count {
        return Err(format!("_bulk reply has {} items for {count} sent", reply.items.len()));
    }
    Ok(Some(
        reply
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
            .collect(),
    ))
}

/// As [`outcomes`], a long reply other than the compact all-created answer parsed on the
/// blocking pool. Reading thousands of items (a replay after a restart answers 409 for each,
/// a new Events leader sends again what the last one shipped) takes milliseconds that would
/// hold a runtime worker the probes, the Lease and the other sinks need.
pub async fn outcomes_off_the_runtime(reply: Vec<u8>, count: usize) -> Result<Option<Vec<Outcome>>, String> {
    if all_created(&reply, count) {
        return Ok(None);
    }
    if reply.len() <= INLINE_WORK {
        return parse_outcomes(&reply, count);
    }
    let reply = Arc::new(reply);
    let owned = reply.clone();
    match tokio::task::spawn_blocking(move || parse_outcomes(&owned, count)).await {
        Ok(read) => read,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime shutting down refuses the task: read it here.
        Err(_) => parse_outcomes(&reply, count),
    }
}

/// Whether `reply` is, byte for byte, Elasticsearch's compact answer under the sink's
/// `filter_path` for `count` items all created:
/// `{"errors":false,"items":[{"create":{"status":201}},...]}`. Nearly every reply is this,
/// and comparing it costs a tenth of parsing it; any other form is parsed.
fn all_created(reply: &[u8], count: usize) -> bool {
    const HEAD: &[u8] = br#"{"errors":false,"items":["#;
    const ITEM: &[u8] = br#"{"create":{"status":201}}"#;
    let Some(items) = reply.strip_prefix(HEAD).and_then(|r| r.strip_suffix(b"]}")) else { return false };
    count > 0
        && items.len() == count * (ITEM.len() + 1) - 1
        && items.chunks(ITEM.len() + 1).all(|item| item[..ITEM.len()] == *ITEM && item.get(ITEM.len()).is_none_or(|&c| c == b','))
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
    use std::io::Read;

    use super::*;
    use crate::config::Compression;
    use crate::sinks::Formats;

    fn batch_in(docs: &[&str], index: Option<&str>, gzip: bool) -> Arc<Batch> {
        let mut d = Documents::default();
        for (i, doc) in docs.iter().enumerate() {
            d.bytes.extend_from_slice(doc.as_bytes());
            d.bytes.push(b'\n');
            d.ends.push(d.bytes.len() as u32);
            d.offsets.push(i as u64 * 100);
        }
        let compression = if gzip { Compression::Gzip } else { Compression::None };
        let formats = Formats { bulk: Some(compression), ..Formats::default() };
        let file = FileId { container: 1, fingerprint: 2 };
        Arc::new(Batch::new(0, file, docs.len(), index.map(Arc::from)).packed(&mut d, &[], formats, &mut Packer::new()))
    }

    fn batch(docs: &[&str]) -> Arc<Batch> {
        batch_in(docs, None, true)
    }

    fn items(b: &Arc<Batch>) -> Vec<Item> {
        (0..b.records as u32).map(|index| Item { batch: b.clone(), index }).collect()
    }

    fn text(items: &[Item]) -> String {
        let mut out = String::new();
        flate2::read::GzDecoder::new(&body(items, true, &mut Packer::new()).to_vec()[..]).read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn body_is_ndjson_with_create_actions_and_stable_ids() {
        let b = batch(&[r#"{"message":"a"}"#, r#"{"message":"b"}"#]);
        let text = text(&items(&b));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(text.ends_with('\n'));
        let action: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let id = action["create"]["_id"].as_str().unwrap();
        assert_eq!(id, format!("{:032x}", b.file.record_id(0)));
        assert_eq!(lines[0].len() + 1, ACTION_LEN);
        assert_eq!(lines[1], r#"{"message":"a"}"#);
        assert_eq!(text, super::tests::text(&items(&b)), "ids are deterministic");
        assert_ne!(lines[0], lines[2], "each record its own id");
        let plain = batch_in(&[r#"{"message":"a"}"#, r#"{"message":"b"}"#], None, false);
        assert_eq!(body(&items(&plain), false, &mut Packer::new()).to_vec(), text.as_bytes(), "the same lines without gzip");
    }

    #[test]
    fn a_batch_naming_its_data_stream_carries_it_in_each_action() {
        let plain = batch(&[r#"{"message":"a"}"#]);
        let node = batch_in(&[r#"{"message":"k"}"#], Some("logs-kubernetes.node-default"), true);
        let all: Vec<Item> = items(&plain).into_iter().chain(items(&node)).collect();
        let text = text(&all);
        let lines: Vec<&str> = text.lines().collect();
        let action: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(action["create"]["_index"], "logs-kubernetes.node-default");
        assert!(serde_json::from_str::<serde_json::Value>(lines[0]).unwrap()["create"].get("_index").is_none());
        assert_eq!(lines[2].len() + 1 + lines[3].len() + 1, all[1].body_len(), "body_len measures the action with its index");
    }

    #[test]
    fn some_records_of_a_batch_are_sent_again_alone_from_its_packed_lines() {
        let docs: Vec<String> = (0..50).map(|i| format!("{{\"message\":\"line {i}\"}}")).collect();
        let b = batch(&docs.iter().map(String::as_str).collect::<Vec<_>>());
        let other = batch(&[r#"{"message":"other"}"#]);
        let all = items(&b);
        // A 429 for records 3, 4 and 40: they go again, alone, with their own ids.
        let again = vec![all[3].clone(), all[4].clone(), items(&other)[0].clone(), all[40].clone()];
        let text = text(&again);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8);
        assert_eq!(
            [lines[1], lines[3], lines[5], lines[7]],
            [r#"{"message":"line 3"}"#, r#"{"message":"line 4"}"#, r#"{"message":"other"}"#, r#"{"message":"line 40"}"#]
        );
        let id = |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap()["create"]["_id"].as_str().unwrap().to_string();
        assert_eq!(id(lines[6]), format!("{:032x}", b.file.record_id(4000)));
    }

    #[test]
    fn records_scattered_through_a_batch_sent_again_are_compressed_together() {
        // A shard's 429s fall on every other record: the resend is one piece, not one a record.
        let docs: Vec<String> =
            (0..1000).map(|i| format!("{{\"message\":\"step {i} of the training run\",\"host\":{{\"name\":\"gpu-7\"}}}}")).collect();
        let b = batch(&docs.iter().map(String::as_str).collect::<Vec<_>>());
        let again: Vec<Item> = items(&b).into_iter().step_by(2).collect();
        let request = body(&again, true, &mut Packer::new());
        assert!(request.len() < b.bulk.packed_len(), "{} bytes to send half of a batch packed in {}", request.len(), b.bulk.packed_len());
        assert_eq!(text(&again).lines().count(), 1000);
    }

    #[test]
    fn a_request_of_whole_batches_holds_only_their_compressed_bytes() {
        // The regression guard for memory: neither a batch nor a request built from whole
        // batches holds the uncompressed lines.
        let tail = r#""kubernetes":{"namespace":"ml","pod":{"name":"trainer-0","uid":"0f9e8d7c-6b5a-4d3c-2b1a-0123456789ab"},"container":{"name":"worker"},"labels":{"app":"resnet","team":"vision"}},"host":{"name":"gpu-node-7"},"service":{"name":"resnet"},"user":{"name":"alice"}"#;
        let docs: Vec<String> = (0..2000).map(|i| format!("{{\"message\":\"step {i} loss {}\",{tail}}}", 1.0 / f64::from(i + 1))).collect();
        let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let batches = [batch(&docs[..1000]), batch(&docs[1000..])];
        let plain: usize = batches.iter().map(|b| b.bulk.plain_len()).sum();
        let held: usize = batches.iter().map(|b| b.bulk.held_bytes()).sum();
        assert!(held * 4 < plain, "batches hold {held} bytes for {plain} plain");
        let all: Vec<Item> = batches.iter().flat_map(items).collect();
        let request = body(&all, true, &mut Packer::new());
        let pieces: usize = batches.iter().map(|b| b.bulk.packed_len()).sum();
        assert_eq!(request.len(), pieces + crate::packed::GZIP_OVERHEAD, "the pieces as they are, nothing compressed again");
        let shared = request.parts().iter().filter(|part| batches.iter().any(|b| b.bulk.shares(part))).count();
        assert_eq!(shared, 2, "the pieces are sent as the batches hold them, not copied");
        assert_eq!(text(&all).lines().count(), 4000);
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
        let got = outcomes(reply, 5).unwrap().unwrap();
        assert_eq!(got[..3], [Outcome::Created, Outcome::Duplicate, Outcome::Overloaded]);
        assert_eq!(got[3], Outcome::Failed("503 unavailable_shards_exception: x".into()));
        assert_eq!(got[4], Outcome::Rejected("400 document_parsing_exception: failed to parse (bad date)".into()));
    }

    /// A reply of `count` items, every `every`th answering 409, the others 201.
    fn reply_with_duplicates(count: usize, every: usize) -> Vec<u8> {
        let items: Vec<&str> = (0..count)
            .map(|i| {
                if i % every == 0 {
                    r#"{"create":{"status":409,"error":{"type":"version_conflict_engine_exception","reason":"exists"}}}"#
                } else {
                    r#"{"create":{"status":201}}"#
                }
            })
            .collect();
        format!(r#"{{"errors":true,"items":[{}]}}"#, items.join(",")).into_bytes()
    }

    #[test]
    fn a_long_reply_with_errors_is_read_off_the_runtime_and_reads_the_same() {
        // One runtime thread and one blocking thread, held until a task spawned after the
        // reading one has run: that task runs before the reading ends exactly when the reading
        // waits for the blocking pool, whatever the timing.
        let runtime = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).build().unwrap();
        let read = |reply: Vec<u8>, count: usize| {
            runtime.block_on(async move {
                let (release, held) = std::sync::mpsc::channel::<()>();
                let holder = tokio::task::spawn_blocking(move || held.recv());
                let ticked = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let reading = tokio::spawn({
                    let ticked = ticked.clone();
                    async move {
                        let outcomes = outcomes_off_the_runtime(reply, count).await;
                        (outcomes, ticked.load(std::sync::atomic::Ordering::SeqCst))
                    }
                });
                let ticker = tokio::spawn(async move {
                    ticked.store(true, std::sync::atomic::Ordering::SeqCst);
                    release.send(()).unwrap();
                });
                let read = reading.await.unwrap();
                ticker.await.unwrap();
                holder.await.unwrap().unwrap();
                read
            })
        };
        let long = reply_with_duplicates(4000, 3);
        assert!(long.len() > INLINE_WORK);
        let (outcomes, waited) = read(long.clone(), 4000);
        assert_eq!(outcomes, super::outcomes(&long, 4000));
        assert_eq!(outcomes.unwrap().unwrap().iter().filter(|o| **o == Outcome::Duplicate).count(), 1334);
        assert!(waited, "read on the blocking pool");
        // Short replies, and long ones all created (compared, not parsed), are read in place.
        let short = reply_with_duplicates(10, 3);
        assert_eq!(read(short.clone(), 10), (super::outcomes(&short, 10), false));
        let created = format!(r#"{{"errors":false,"items":[{}]}}"#, vec![r#"{"create":{"status":201}}"#; 4000].join(","));
        assert_eq!(read(created.into_bytes(), 4000), (Ok(None), false));
    }

    #[test]
    fn a_clean_filtered_reply_means_all_created_and_a_short_one_is_an_error() {
        assert!(outcomes(br#"{"errors":false}"#, 3).unwrap_err().contains("without items"));
        assert!(outcomes(b"{}", 1).is_err(), "a reply that is not Elasticsearch's");
        let clean = br#"{"errors":false,"items":[{"create":{"status":201}},{"create":{"status":201}}]}"#;
        assert_eq!(outcomes(clean, 2).unwrap(), None);
        assert!(outcomes(clean, 3).unwrap_err().contains("2 items for 3 sent"));
        assert!(outcomes(br#"{"errors":false,"items":[{"create":{"status":201}},{"create":"#, 2).is_err(), "cut short");
        assert!(outcomes(br#"{"errors":true,"items":[{"create":{"status":201}}]}"#, 2).is_err());
        assert!(outcomes(b"<html>", 1).is_err());
    }

    #[test]
    fn the_compact_all_created_reply_is_recognised_exactly() {
        let compact = |statuses: &[&str]| {
            let items: Vec<String> = statuses.iter().map(|s| format!(r#"{{"create":{{"status":{s}}}}}"#)).collect();
            format!(r#"{{"errors":false,"items":[{}]}}"#, items.join(","))
        };
        let clean = compact(&["201"; 3]);
        assert!(all_created(clean.as_bytes(), 3));
        assert_eq!(outcomes(clean.as_bytes(), 3).unwrap(), None);
        // Not the exact form: left to the parser, which decides as before.
        assert!(!all_created(clean.as_bytes(), 2) && !all_created(clean.as_bytes(), 4));
        assert!(outcomes(clean.as_bytes(), 4).is_err());
        let other = compact(&["201", "200", "201"]);
        assert!(!all_created(other.as_bytes(), 3));
        assert_eq!(outcomes(other.as_bytes(), 3).unwrap(), None, "errors false: all created, read by the parser");
        let spaced = clean.replace(",{", ", {");
        assert!(!all_created(spaced.as_bytes(), 3));
        assert_eq!(outcomes(spaced.as_bytes(), 3).unwrap(), None);
        let failed = compact(&["201", "429", "201"]).replace("false", "true");
        assert!(!all_created(failed.as_bytes(), 3));
        assert_eq!(outcomes(failed.as_bytes(), 3).unwrap().unwrap()[1], Outcome::Overloaded);
        let separators = clean.replace("}},{", "}};{");
        assert!(!all_created(separators.as_bytes(), 3) && outcomes(separators.as_bytes(), 3).is_err());
        assert!(!all_created(br#"{"errors":false,"items":[]}"#, 0));
    }
}
