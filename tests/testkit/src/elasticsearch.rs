//! A strict Elasticsearch `_bulk` double, speaking the documented protocol over real HTTP:
//! NDJSON with a terminating newline, `Content-Type` checked, gzip bodies accepted, per-item
//! statuses in request order, `create`-only writes to data streams (`index` is refused), a
//! missing `@timestamp` refused, 409 for a `create` of an existing `_id`, and `filter_path`
//! honoured. Faults can be injected: request-level 429/503, item-level 429s, slow replies,
//! replies lost after the write was applied, 413 above a size, mapping rejections, and an
//! outage answering every request with one status until it ends. Each stored document keeps
//! the moment it arrived, so tests can measure write-to-index latency.

use crate::http::LostReply;
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use serde_json::{json, Value};

use crate::http::Server;

/// A fault applied to one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer the whole request with this status (429, 503, ...) without applying it.
    Status(u16),
    /// Apply the request, then close the connection without a reply.
    LoseReply,
    /// Answer every `every`-th item of the request with 429 instead of applying it.
    ItemTooManyRequests {
        /// Period of the refused items.
        every: usize,
    },
    /// Wait this long before answering.
    Slow(Duration),
}

/// One request as the double saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Items in the request.
    pub items: usize,
    /// The body was gzip-compressed.
    pub gzip: bool,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The reply status.
    pub status: u16,
}

#[derive(Default)]
struct State {
    docs: Vec<(String, Value)>,
    /// When each of `docs` was created.
    arrived: Vec<std::time::Instant>,
    /// Documents handed out by `take_docs` and no longer held.
    taken: usize,
    /// `create`s refused with 409 because the `_id` existed.
    conflicts: usize,
    /// Every request is answered with this status, unapplied.
    outage: Option<u16>,
    /// Stored `_id`s, per data stream (ids are unique within an index, as in Elasticsearch).
    ids: HashMap<(String, String), usize>,
    /// The data stream each stored `_id` went to: the request path's, or the action's `_index`.
    streams: HashMap<String, String>,
    /// Field paths mapped so far (objects and leaves), as Elasticsearch counts them against
    /// `index.mapping.total_fields.limit`.
    fields: std::collections::HashSet<String>,
    /// The index template's mapping, when one is installed: its `flattened` fields count as
    /// one, whatever keys they hold, and its settings set the field limit.
    template: Option<Value>,
    /// Documents whose message contains this are answered 500 every time (a shard failing on them).
    fail_containing: Option<String>,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
    required_auth: Option<String>,
    max_body_bytes: Option<usize>,
    /// Records indexed per second, one request after the other (a saturated cluster).
    capacity: Option<f64>,
    /// Held by the request being indexed while `capacity` is set.
    indexer: Arc<tokio::sync::Mutex<()>>,
    reject_containing: Option<String>,
    seq: u64,
}

/// A running double.
pub struct FakeElasticsearch {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tls: bool,
    server: Server,
}

impl FakeElasticsearch {
    /// Starts on a free loopback port.
    pub fn start() -> FakeElasticsearch {
        FakeElasticsearch::start_on(0)
    }

    /// Starts on `port` (e.g. the port of a double that was stopped, to model a restart).
    pub fn start_on(port: u16) -> FakeElasticsearch {
        FakeElasticsearch::serve(port, None)
    }

    /// Starts serving HTTPS with a certificate for `127.0.0.1` issued by a freshly generated
    /// private CA, whose PEM is written to `ca_file`.
    pub fn start_tls(ca_file: &std::path::Path) -> FakeElasticsearch {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "nodelens test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(ca_file, ca.pem()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_cert =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap().signed_by(&server_key, &ca).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![server_cert.der().clone()], key)
            .unwrap();
        FakeElasticsearch::serve(0, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    fn serve(port: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeElasticsearch {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let tls_on = tls.is_some();
        let server = Server::start(port, tls, move |req| handle(req, shared.clone()));
        FakeElasticsearch { addr: server.addr, state, tls: tls_on, server }
    }

    /// `http://127.0.0.1:<port>`, or `https://` when serving TLS.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stored documents in the order they were created, with their ids.
    pub fn docs(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().docs.clone()
    }

    /// Number of documents created (those taken by [`FakeElasticsearch::take_docs`] included).
    pub fn count(&self) -> usize {
        let st = self.state.lock().unwrap();
        st.taken + st.docs.len()
    }

    /// Moves out the documents stored since the last call, with their ids and arrival times,
    /// so a long run does not hold them all. [`FakeElasticsearch::docs`] then holds only
    /// later ones; `_id`s stay known, so a resend still gets 409.
    pub fn take_docs(&self) -> Vec<(String, Value, std::time::Instant)> {
        let mut st = self.state.lock().unwrap();
        let docs = std::mem::take(&mut st.docs);
        let arrived = std::mem::take(&mut st.arrived);
        st.taken += docs.len();
        docs.into_iter().zip(arrived).map(|((id, doc), at)| (id, doc, at)).collect()
    }

    /// The data stream a stored document (by `_id`) was written to.
    pub fn data_stream_of(&self, id: &str) -> Option<String> {
        self.state.lock().unwrap().streams.get(id).cloned()
    }

    /// Stored documents with the moment each arrived.
    pub fn docs_arrived(&self) -> Vec<(String, Value, std::time::Instant)> {
        let st = self.state.lock().unwrap();
        st.docs.iter().cloned().zip(st.arrived.iter().copied()).map(|((id, doc), at)| (id, doc, at)).collect()
    }

    /// `create`s answered 409 (the `_id` was stored already): resends.
    pub fn conflicts(&self) -> usize {
        self.state.lock().unwrap().conflicts
    }

    /// Starts an outage: every request is answered `status` (503, 429, ...) and not applied,
    /// until [`FakeElasticsearch::recover`].
    pub fn outage(&self, status: u16) {
        self.state.lock().unwrap().outage = Some(status);
    }

    /// Ends the outage.
    pub fn recover(&self) {
        self.state.lock().unwrap().outage = None;
    }

    /// Requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Queues a fault for the next request that has none.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push_back(fault);
    }

    /// Requires this exact `Authorization` header; others get 401.
    pub fn require_authorization(&self, header: &str) {
        self.state.lock().unwrap().required_auth = Some(header.to_string());
    }

    /// Answers 413 to bodies (uncompressed) larger than this.
    pub fn limit_body(&self, bytes: usize) {
        self.state.lock().unwrap().max_body_bytes = Some(bytes);
    }

    /// Indexes at most `records_per_second`, one request at a time, each also costing 5 ms of
    /// its own (parsing, routing, the reply), the others waiting their turn: the way a
    /// saturated cluster answers late (queueing) rather than with 429, and why many small
    /// requests cost it more than a few large ones.
    pub fn limit_rate(&self, records_per_second: f64) {
        self.state.lock().unwrap().capacity = Some(records_per_second);
    }

    /// Refuses documents whose message contains `text` with a 400 mapping error.
    pub fn reject_messages_containing(&self, text: &str) {
        self.state.lock().unwrap().reject_containing = Some(text.to_string());
    }

    /// Answers 500 to documents whose message contains `text`, every time they are sent.
    pub fn fail_messages_containing(&self, text: &str) {
        self.state.lock().unwrap().fail_containing = Some(text.to_string());
    }

    /// Installs an index template (the JSON of `PUT _index_template`): its mapping's
    /// `flattened` fields and its `index.mapping.total_fields.limit` apply from now on.
    /// Without one the default limit of 1,000 fields applies and every key is a field.
    pub fn install_index_template(&self, template: Value) {
        self.state.lock().unwrap().template = Some(template);
    }

    /// Stops listening; connections are refused until a new double starts on the port.
    pub fn stop(mut self) {
        self.server.stop();
    }
}

type Reply = Response<Full<Bytes>>;

fn json_reply(status: u16, body: &Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

fn error_reply(status: u16, kind: &str, reason: &str) -> Reply {
    json_reply(
        status,
        &json!({"error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason}, "status": status}),
    )
}

async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>) -> Result<Reply, LostReply> {
    let (parts, body) = req.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let authorization = header("authorization");
    let gzip = header("content-encoding").is_some_and(|e| e == "gzip");
    let raw = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let (reply, lose) = respond(&parts, authorization.clone(), gzip, &raw, &state).await;
    let status = reply.status().as_u16();
    let items = raw_items(&raw, gzip);
    state.lock().unwrap().seen.push(Seen { items, gzip, authorization, status });
    if lose {
        return Err(LostReply);
    }
    Ok(reply)
}

fn raw_items(raw: &[u8], gzip: bool) -> usize {
    decode(raw, gzip).map(|b| b.iter().filter(|&&c| c == b'\n').count() / 2).unwrap_or(0)
}

fn decode(raw: &[u8], gzip: bool) -> Result<Vec<u8>, String> {
    if !gzip {
        return Ok(raw.to_vec());
    }
    // One gzip member, as Elasticsearch reads it: its HTTP decompressor does not go on into
    // a second member (what followed would be lost), so anything after the first is refused.
    let mut out = Vec::new();
    let mut member = flate2::read::GzDecoder::new(raw);
    member.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    member.into_inner().read_to_end(&mut rest).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the gzip member", rest.len()));
    }
    Ok(out)
}

async fn respond(
    parts: &hyper::http::request::Parts,
    authorization: Option<String>,
    gzip: bool,
    raw: &[u8],
    state: &Mutex<State>,
) -> (Reply, bool) {
    let (fault, outage) = {
        let mut st = state.lock().unwrap();
        let outage = st.outage;
        (if outage.is_some() { None } else { st.faults.pop_front() }, outage)
    };
    if let Some(code) = outage {
        return (error_reply(code, "outage", "injected outage"), false);
    }
    if let Some(Fault::Slow(d)) = &fault {
        tokio::time::sleep(*d).await;
    }
    let required = state.lock().unwrap().required_auth.clone();
    if required.is_some() && required != authorization {
        return (error_reply(401, "security_exception", "unable to authenticate user [elastic] for REST request [/_bulk]"), false);
    }
    let path = parts.uri.path();
    let Some(index) = path.strip_suffix("/_bulk").map(|p| p.trim_start_matches('/').to_string()) else {
        return (error_reply(404, "resource_not_found_exception", "no handler"), false);
    };
    if parts.method != hyper::Method::POST && parts.method != hyper::Method::PUT {
        return (error_reply(405, "method_not_allowed", "Incorrect HTTP method for uri [/_bulk]"), false);
    }
    let content_type = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media != "application/json" && media != "application/x-ndjson" {
        return (
            json_reply(406, &json!({"error": format!("Content-Type header [{content_type}] is not supported"), "status": 406})),
            false,
        );
    }
    if let Some(Fault::Status(code)) = fault {
        return (error_reply(code, "injected", "injected request failure"), false);
    }
    let body = match decode(raw, gzip) {
        Ok(body) => body,
        Err(e) => return (error_reply(400, "parse_exception", &format!("bad gzip body: {e}")), false),
    };
    if let Some(limit) = state.lock().unwrap().max_body_bytes {
        if body.len() > limit {
            return (json_reply(413, &json!({"error": "Request Entity Too Large", "status": 413})), false);
        }
    }
    if body.is_empty() {
        return (error_reply(400, "action_request_validation_exception", "Validation Failed: 1: no requests added;"), false);
    }
    if !body.ends_with(b"\n") {
        return (error_reply(400, "illegal_argument_exception", "The bulk request must be terminated by a newline [\\n]"), false);
    }
    let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    if !lines.len().is_multiple_of(2) {
        return (error_reply(400, "illegal_argument_exception", "Malformed action/metadata line: document line missing"), false);
    }
    let item_429 = match fault {
        Some(Fault::ItemTooManyRequests { every }) => Some(every),
        _ => None,
    };
    let (capacity, indexer) = {
        let st = state.lock().unwrap();
        (st.capacity, st.indexer.clone())
    };
    let _turn = match capacity {
        Some(rate) => {
            let turn = indexer.lock_owned().await;
            tokio::time::sleep(Duration::from_millis(5) + Duration::from_secs_f64(lines.len() as f64 / 2.0 / rate)).await;
            Some(turn)
        }
        None => None,
    };
    let mut items = Vec::new();
    let mut errors = false;
    {
        let mut st = state.lock().unwrap();
        for (n, pair) in lines.chunks(2).enumerate() {
            let item = apply(&mut st, &index, pair[0], pair[1], item_429.is_some_and(|every| (n + 1) % every == 0));
            errors |= item.1 >= 300;
            items.push(item.0);
        }
    }
    let reply = json!({"took": 3, "errors": errors, "items": items});
    let filtered = match parts.uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("filter_path="))) {
        Some(filter) => {
            filter_path(&reply, &filter.split(',').map(|p| p.split('.').collect()).collect::<Vec<Vec<&str>>>()).unwrap_or(json!({}))
        }
        None => reply,
    };
    (json_reply(200, &filtered), matches!(fault, Some(Fault::LoseReply)))
}

/// Applies one action; returns the item and its status.
fn apply(st: &mut State, index: &str, action: &[u8], source: &[u8], refuse: bool) -> (Value, u16) {
    let seq = st.seq;
    let item = |op: &str, id: &str, status: u16, error: Option<(&str, String)>| {
        let mut body = json!({"_index": format!(".ds-{index}-2026.11.22-000001"), "_id": id, "status": status});
        match error {
            Some((kind, reason)) => body["error"] = json!({"type": kind, "reason": reason, "index": index}),
            None => {
                body["result"] = json!("created");
                body["_version"] = json!(1);
                body["_seq_no"] = json!(seq);
                body["_primary_term"] = json!(1);
            }
        }
        (json!({ op: body }), status)
    };
    let action: Value = match serde_json::from_slice(action) {
        Ok(Value::Object(a)) if a.len() == 1 => Value::Object(a),
        _ => return item("index", "", 400, Some(("illegal_argument_exception", "Malformed action/metadata line".into()))),
    };
    let (op, meta) = action.as_object().unwrap().iter().next().map(|(k, v)| (k.clone(), v.clone())).unwrap();
    let id = meta.get("_id").and_then(|v| v.as_str()).map(str::to_string).unwrap_or_else(|| format!("auto-{}", st.seq));
    let index = meta.get("_index").and_then(|v| v.as_str()).unwrap_or(index).to_string();
    let index = index.as_str();
    if index.is_empty() {
        return item(&op, &id, 400, Some(("action_request_validation_exception", "Validation Failed: 1: index is missing;".into())));
    }
    if let Err(reason) = valid_index_name(index) {
        return item(&op, &id, 400, Some(("invalid_index_name_exception", format!("Invalid index name [{index}], {reason}"))));
    }
    if op != "create" {
        return item(
            &op,
            &id,
            400,
            Some((
                "illegal_argument_exception",
                format!("only write ops with an op_type of create are allowed in data streams (got [{op}])"),
            )),
        );
    }
    if refuse {
        return item(&op, &id, 429, Some(("es_rejected_execution_exception", "rejected execution of coordinating operation".into())));
    }
    let doc: Value = match serde_json::from_slice(source) {
        Ok(doc @ Value::Object(_)) => doc,
        _ => return item(&op, &id, 400, Some(("document_parsing_exception", "[1:1] failed to parse: not a JSON object".into()))),
    };
    let Some(timestamp) = doc.get("@timestamp") else {
        return item(&op, &id, 400, Some(("document_parsing_exception", "data stream timestamp field [@timestamp] is missing".into())));
    };
    if !timestamp.as_str().is_some_and(valid_date_nanos) {
        return item(
            &op,
            &id,
            400,
            Some(("document_parsing_exception", format!("failed to parse field [@timestamp] of type [date_nanos]: {timestamp}"))),
        );
    }
    if let (Some(bad), Some(msg)) = (&st.reject_containing, doc.get("message").and_then(|m| m.as_str())) {
        if msg.contains(bad.as_str()) {
            return item(
                &op,
                &id,
                400,
                Some(("document_parsing_exception", "[1:40] failed to parse field [message] of type [match_only_text]".into())),
            );
        }
    }
    if let (Some(bad), Some(msg)) = (&st.fail_containing, doc.get("message").and_then(|m| m.as_str())) {
        if msg.contains(bad.as_str()) {
            return item(&op, &id, 500, Some(("illegal_state_exception", "shard failure on this document (injected)".into())));
        }
    }
    if let Err(reason) = map_fields(st, &doc) {
        return item(&op, &id, 400, Some(("illegal_argument_exception", reason)));
    }
    if st.ids.contains_key(&(index.to_string(), id.clone())) {
        st.conflicts += 1;
        return item(
            &op,
            &id,
            409,
            Some(("version_conflict_engine_exception", format!("[{id}]: version conflict, document already exists (current version [1])"))),
        );
    }
    let created = item(&op, &id, 201, None);
    st.seq += 1;
    let at = st.taken + st.docs.len();
    st.ids.insert((index.to_string(), id.clone()), at);
    st.streams.insert(id.clone(), index.to_string());
    st.docs.push((id, doc));
    st.arrived.push(std::time::Instant::now());
    created
}

/// Elasticsearch's rules for index and data stream names (`MetadataCreateIndexService`).
fn valid_index_name(name: &str) -> Result<(), &'static str> {
    if name != name.to_lowercase() {
        return Err("must be lowercase");
    }
    if name.starts_with(['-', '_', '+']) {
        return Err("must not start with '_', '-', or '+'");
    }
    if name == "." || name == ".." {
        return Err("must not be '.' or '..'");
    }
    if name.contains(['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':']) {
        return Err("must not contain the following characters [ , \\, /, *, ?, \", <, >, |, #, :]");
    }
    if name.len() > 255 {
        return Err("index name is too long, (> 255)");
    }
    Ok(())
}

/// What a `date_nanos` field with the default format (`strict_date_optional_time_nanos`)
/// takes from a string written with a zone: a real date and time from 1970 to 2262.
fn valid_date_nanos(t: &str) -> bool {
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| t.get(r).filter(|d| d.bytes().all(|c| c.is_ascii_digit())).and_then(|d| d.parse::<u32>().ok());
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) =
        (num(0..4), num(5..7), num(8..10), num(11..13), num(14..16), num(17..19))
    else {
        return false;
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let shape = b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':';
    let mut rest = &t[19.min(t.len())..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return false;
        }
        rest = &fraction[digits..];
    }
    let zone = rest == "Z" || (rest.len() == 6 && rest.starts_with(['+', '-']) && rest.as_bytes()[3] == b':');
    shape
        && zone
        && (1970..=2262).contains(&year)
        && (1..=12).contains(&month)
        && day >= 1
        && day <= days[(month.max(1) - 1) as usize]
        && hour < 24
        && minute < 60
        && second < 60
}

/// Adds the document's fields to the mapping, refusing it (and mapping nothing) when that
/// would pass the total fields limit, as Elasticsearch does with dynamic mapping.
fn map_fields(st: &mut State, doc: &Value) -> Result<(), String> {
    let mapping = st.template.as_ref().map(|t| t["template"]["mappings"].clone());
    let limit =
        st.template.as_ref().and_then(|t| t["template"]["settings"]["index.mapping.total_fields.limit"].as_u64()).unwrap_or(1000) as usize;
    fn flattened(mapping: Option<&Value>, path: &[&str]) -> bool {
        let Some(mut node) = mapping else { return false };
        for part in path {
            node = &node["properties"][*part];
        }
        node["type"] == "flattened"
    }
    fn walk(value: &Value, path: &mut Vec<String>, mapping: Option<&Value>, out: &mut Vec<String>) {
        let Value::Object(map) = value else { return };
        for (key, child) in map {
            path.push(key.clone());
            out.push(path.join("."));
            let parts: Vec<&str> = path.iter().map(String::as_str).collect();
            if !flattened(mapping, &parts) {
                walk(child, path, mapping, out);
            }
            path.pop();
        }
    }
    let mut paths = Vec::new();
    walk(doc, &mut Vec::new(), mapping.as_ref(), &mut paths);
    let new: Vec<String> = paths.into_iter().filter(|p| !st.fields.contains(p)).collect();
    if st.fields.len() + new.len() > limit {
        return Err(format!("Limit of total fields [{limit}] has been exceeded while adding new fields [{}]", new.len()));
    }
    st.fields.extend(new);
    Ok(())
}

/// Elasticsearch's `filter_path`: keeps the paths given (`*` matches any key; arrays are
/// transparent); `None` when nothing is left.
pub fn filter_path(value: &Value, patterns: &[Vec<&str>]) -> Option<Value> {
    if patterns.iter().any(|p| p.is_empty()) {
        return Some(value.clone());
    }
    match value {
        Value::Array(items) => {
            let kept: Vec<Value> = items.iter().filter_map(|v| filter_path(v, patterns)).collect();
            (!kept.is_empty()).then_some(Value::Array(kept))
        }
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, child) in map {
                let rest: Vec<Vec<&str>> = patterns.iter().filter(|p| p[0] == "*" || p[0] == key).map(|p| p[1..].to_vec()).collect();
                if !rest.is_empty() {
                    if let Some(kept) = filter_path(child, &rest) {
                        out.insert(key.clone(), kept);
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(es: &FakeElasticsearch, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(es.addr).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1;
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    #[test]
    fn the_double_rejects_what_elasticsearch_rejects() {
        let es = FakeElasticsearch::start();
        let path = "/logs-kubernetes.container_logs-default/_bulk";
        let ndjson = "application/x-ndjson";
        let (status, _) = post(&es, path, "text/plain", b"{\"create\":{}}\n{\"@timestamp\":\"2026-11-22T00:00:00Z\"}\n");
        assert_eq!(status, 406, "unsupported content type");
        let (status, reply) = post(&es, path, ndjson, b"{\"create\":{}}\n{\"@timestamp\":\"2026-11-22T00:00:00Z\"}");
        assert_eq!(status, 400, "no final newline");
        assert!(reply["error"]["reason"].as_str().unwrap().contains("terminated by a newline"));
        let body = b"{\"index\":{\"_id\":\"a\"}}\n{\"@timestamp\":\"2026-11-22T00:00:00Z\"}\n{\"create\":{\"_id\":\"b\"}}\n{\"message\":\"no time\"}\n{\"create\":{\"_id\":\"c\"}}\n{\"@timestamp\":\"2026-11-22T00:00:00Z\"}\n{\"create\":{\"_id\":\"c\"}}\n{\"@timestamp\":\"2026-11-22T00:00:00Z\"}\n";
        let (status, reply) = post(&es, path, ndjson, body);
        assert_eq!(status, 200);
        assert_eq!(reply["errors"], true);
        let statuses: Vec<u64> = reply["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_object().unwrap().values().next().unwrap()["status"].as_u64().unwrap())
            .collect();
        assert_eq!(statuses, [400, 400, 201, 409], "index refused on a data stream, missing @timestamp refused, duplicate create is 409");
        assert_eq!(es.count(), 1);
    }

    #[test]
    fn filter_path_keeps_only_the_named_paths() {
        let reply = json!({"took": 3, "errors": true, "items": [
            {"create": {"_id": "a", "status": 201, "result": "created"}},
            {"create": {"_id": "b", "status": 409, "error": {"type": "version_conflict_engine_exception"}}}
        ]});
        let patterns: Vec<Vec<&str>> = "errors,items.*.error,items.*.status".split(',').map(|p| p.split('.').collect()).collect();
        let filtered = filter_path(&reply, &patterns).unwrap();
        assert_eq!(
            filtered,
            json!({"errors": true, "items": [
                {"create": {"status": 201}},
                {"create": {"status": 409, "error": {"type": "version_conflict_engine_exception"}}}
            ]})
        );
    }
}
