//! OTLP/HTTP: binary protobuf over HTTP/1.1 POSTs to `/v1/logs` and `/v1/metrics`, checked in
//! the order the collector checks them, on the shared [`crate::http::Server`].

use crate::http::LostReply;
use std::borrow::Cow;
use std::io::Read;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response};
use prost::Message;

use crate::http::Server;

use super::{accept, admit, grpc_code, logs_reply, metrics_reply, rpc, Export, Outcome, Partial, Refusal, Seen, Signal, State};

type Reply = Response<Full<Bytes>>;

pub(super) const PROTOBUF: &str = "application/x-protobuf";

/// Serves OTLP/HTTP on loopback `port` (0: any).
pub(super) fn start(port: u16, state: Arc<Mutex<State>>) -> Server {
    Server::start(port, None, move |req| serve(req, state.clone()))
}

async fn serve(req: Request<Incoming>, state: Arc<Mutex<State>>) -> Result<Reply, LostReply> {
    let (parts, body) = req.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let raw = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let signal = Signal::from_path(parts.uri.path());
    let content_encoding = header("content-encoding");
    // Decoded up front so that refused requests are counted too; nothing is stored yet.
    let export = signal.map(|signal| inflate(content_encoding.as_deref(), &raw).and_then(|body| decode(signal, &body)));
    let records = match &export {
        Some(Ok(export)) => export.records(),
        _ => 0,
    };
    let admitted = admit(&state.lock().unwrap(), header);
    let outcome = match admitted.and_then(|()| check(&parts, export)) {
        Ok(export) => accept(&state, export).await,
        Err(refusal) => Outcome::Refused(refusal),
    };
    let reply = match &outcome {
        Outcome::Stored(_) | Outcome::Lost => None,
        Outcome::Refused(refusal) => Some(error_reply(refusal)),
    };
    let status = match (&outcome, &reply) {
        (_, Some(reply)) => reply.status().as_u16() as i32,
        (Outcome::Lost, _) => 0,
        _ => 200,
    };
    state.lock().unwrap().seen.push(Seen {
        transport: "http",
        signal: signal.map_or("", Signal::name),
        path: parts.uri.path().to_string(),
        content_type: header("content-type"),
        content_encoding,
        authorization: header("authorization"),
        records,
        status,
    });
    match outcome {
        Outcome::Refused(_) => Ok(reply.unwrap()),
        Outcome::Lost => Err(LostReply),
        Outcome::Stored(partial) => Ok(protobuf_reply(200, encode_reply(signal.unwrap(), partial))),
    }
}

/// The collector's order: route by path, then method, media type, and finally the body.
fn check(parts: &Parts, export: Option<Result<Export, Refusal>>) -> Result<Export, Refusal> {
    let Some(export) = export else {
        return Err(Refusal::new(404, format!("no OTLP signal at {}", parts.uri.path())));
    };
    if parts.method != Method::POST {
        return Err(Refusal::new(405, format!("{} not allowed, only POST", parts.method)));
    }
    let content_type = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case(PROTOBUF) {
        return Err(Refusal::new(415, format!("unsupported media type {content_type:?}, only {PROTOBUF}")));
    }
    export
}

fn inflate<'a>(encoding: Option<&str>, raw: &'a [u8]) -> Result<Cow<'a, [u8]>, Refusal> {
    match encoding {
        None => Ok(Cow::Borrowed(raw)),
        Some(e) if e.eq_ignore_ascii_case("identity") => Ok(Cow::Borrowed(raw)),
        Some(e) if e.eq_ignore_ascii_case("gzip") => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(raw)
                .read_to_end(&mut out)
                .map_err(|e| Refusal::new(400, format!("body does not inflate as gzip: {e}")))?;
            Ok(Cow::Owned(out))
        }
        Some(e) => Err(Refusal::new(400, format!("unsupported Content-Encoding {e:?}"))),
    }
}

fn decode(signal: Signal, body: &[u8]) -> Result<Export, Refusal> {
    Export::decode(signal, body).map_err(|e| Refusal::new(400, format!("body is not an OTLP {} export request: {e}", signal.name())))
}

fn protobuf_reply(status: u16, body: Vec<u8>) -> Reply {
    Response::builder().status(status).header("content-type", PROTOBUF).body(Full::new(Bytes::from(body))).unwrap()
}

fn error_reply(refusal: &Refusal) -> Reply {
    let status = rpc::Status { code: grpc_code(refusal.status).into(), message: refusal.message.clone(), details: vec![] };
    let mut reply = protobuf_reply(refusal.status, status.encode_to_vec());
    if let Some(seconds) = refusal.retry_after {
        reply.headers_mut().insert("retry-after", seconds.into());
    }
    reply
}

fn encode_reply(signal: Signal, partial: Option<Partial>) -> Vec<u8> {
    match signal {
        Signal::Logs => logs_reply(partial).encode_to_vec(),
        Signal::Metrics => metrics_reply(partial).encode_to_vec(),
    }
}
