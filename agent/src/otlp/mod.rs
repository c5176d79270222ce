//! OTLP export, shared by the log sink and the metrics push: the wire (OTLP/HTTP with protobuf
//! bodies, or OTLP/gRPC) and what a receiver's answer means.
//!
//! Requests are built by the callers as encoded `Export*ServiceRequest` bytes from the
//! official protos (`opentelemetry-proto`), so batching and acknowledgement stay in our
//! pipeline: the log sink from its batches' packed pieces, compressed once when the records
//! were encoded ([`crate::packed`]), the metrics push from one message. Both are compressed
//! at gzip level 1; over gRPC the message goes in the one length-prefixed frame of a unary
//! call, framed here. An answer is accepted (any 2xx / OK, perhaps with some records rejected, as the
//! receiver's `partial_success` says), or a [`Failure`] of one of the [`FailureKind`]s, with
//! the delay the receiver asked for in `Retry-After` or `RetryInfo`.

mod grpc;
pub mod logs;
pub mod metrics;
mod status;

use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};

use prost::Message;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::config::{redact_url, Compression, OtlpProtocol};
use crate::packed::{Body, Chunks, Packed, Packer};

/// What is exported: decides the path and the answer's message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `ExportLogsServiceRequest`.
    Logs,
    /// `ExportMetricsServiceRequest`.
    Metrics,
}

impl Signal {
    fn http_path(self) -> &'static str {
        match self {
            Signal::Logs => "/v1/logs",
            Signal::Metrics => "/v1/metrics",
        }
    }

    fn grpc_path(self) -> &'static str {
        match self {
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }

    /// The rejected count and message of an encoded success answer.
    fn partial_success(self, body: &[u8]) -> Result<(u64, String), prost::DecodeError> {
        use opentelemetry_proto::tonic::collector::{logs::v1 as logs, metrics::v1 as metrics};
        Ok(match self {
            Signal::Logs => logs::ExportLogsServiceResponse::decode(body)?
                .partial_success
                .map(|p| (p.rejected_log_records.max(0) as u64, p.error_message))
                .unwrap_or_default(),
            Signal::Metrics => metrics::ExportMetricsServiceResponse::decode(body)?
                .partial_success
                .map(|p| (p.rejected_data_points.max(0) as u64, p.error_message))
                .unwrap_or_default(),
        })
    }
}

/// Where and how to export: the config of `sinks.otlp` or `metrics.otlp`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config key, for messages (`sinks.otlp`).
    pub key: &'static str,
    /// The receiver's URL.
    pub endpoint: String,
    /// HTTP or gRPC.
    pub protocol: OtlpProtocol,
    /// Headers or metadata sent with every request.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Body compression.
    pub compression: Compression,
    /// PEM file of a private CA.
    pub ca_file: String,
    /// Timeout of one request.
    pub timeout: Duration,
}

/// The receiver took the request.
#[derive(Debug, Default)]
pub struct Accepted {
    /// Items it rejected (`partial_success`); the rest are delivered.
    pub rejected: u64,
    /// Its reason for them.
    pub message: String,
}

/// The request failed.
#[derive(Debug, thiserror::Error)]
#[error("{endpoint}: {reason}")]
pub struct Failure {
    /// The endpoint, credentials hidden.
    pub endpoint: String,
    /// The status and the receiver's message, or the connection error.
    pub reason: String,
    /// What sending it again can do.
    pub kind: FailureKind,
    /// How long the receiver asked us to wait.
    pub retry_after: Option<Duration>,
}

/// What a failure means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Send it again, however long it takes: no answer, an answer OTLP calls retryable (429,
    /// 502, 503, 504, UNAVAILABLE, ...), and answers about the endpoint rather than the data
    /// (401, 403, 404, a proxy's 5xx, UNAUTHENTICATED, UNIMPLEMENTED, ...), which a fixed
    /// token or route ends; meanwhile the files wait on disk.
    Retry,
    /// The receiver refused the data itself (HTTP 400, INVALID_ARGUMENT).
    Refused,
    /// Too large to be taken whole (HTTP 413; RESOURCE_EXHAUSTED without RetryInfo, which
    /// is how a collector refuses a message over its size limit): send it in parts.
    TooLarge,
}

/// A request body as an [`Exporter`] sends it: compressed as configured, framed for gRPC.
/// Clones share the bytes.
#[derive(Debug, Clone)]
pub struct Payload {
    body: Chunks,
}

impl Payload {
    /// Bytes sent.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether it is empty (never, once made).
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }
}

/// Sends export requests; clones share connections.
#[derive(Clone)]
pub struct Exporter {
    signal: Signal,
    shown: String,
    gzip: bool,
    /// Longest an export may take, its answer read whole.
    timeout: Duration,
    transport: Transport,
}

#[derive(Clone)]
enum Transport {
    /// The URL parsed once, not per request.
    Http {
        client: reqwest::Client,
        url: reqwest::Url,
    },
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
    },
}

impl Exporter {
    /// Builds the exporter; reads `ca_file` now, so a bad path fails start-up. Connections are
    /// made on first use: a receiver that is down at start is not an error.
    pub fn new(settings: &Settings, signal: Signal) -> anyhow::Result<Exporter> {
        let key = settings.key;
        let ca = match settings.ca_file.as_str() {
            "" => None,
            path => Some(std::fs::read(path).map_err(|e| anyhow::anyhow!("{key}.ca_file {path}: {e}"))?),
        };
        let endpoint = settings.endpoint.trim_end_matches('/');
        let transport = match settings.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
                for (name, value) in &settings.headers {
                    let name = HeaderName::from_str(name).map_err(|e| anyhow::anyhow!("{key}.headers.{name}: {e}"))?;
                    let mut value = HeaderValue::from_str(value).map_err(|e| anyhow::anyhow!("{key}.headers.{name}: {e}"))?;
                    value.set_sensitive(true);
                    headers.insert(name, value);
                }
                let mut builder = reqwest::Client::builder()
                    .default_headers(headers)
                    .user_agent(concat!("nodelens/", env!("CARGO_PKG_VERSION")))
                    // A redirected POST turns into a GET: better the 3xx as an error to see.
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(settings.timeout)
                    .connect_timeout(Duration::from_secs(5))
                    .pool_idle_timeout(Duration::from_secs(30));
                if let Some(pem) = &ca {
                    for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| anyhow::anyhow!("{key}.ca_file: {e}"))? {
                        builder = builder.add_root_certificate(cert);
                    }
                }
                let path = signal.http_path();
                let url = if endpoint.ends_with(path) { endpoint.to_string() } else { format!("{endpoint}{path}") };
                let url = reqwest::Url::parse(&url).map_err(|e| anyhow::anyhow!("{key}.endpoint: {e}"))?;
                Transport::Http { client: builder.build()?, url }
            }
            OtlpProtocol::Grpc => {
                let mut metadata = MetadataMap::new();
                for (name, value) in &settings.headers {
                    // gRPC metadata keys are lower case.
                    let name =
                        MetadataKey::from_str(&name.to_ascii_lowercase()).map_err(|e| anyhow::anyhow!("{key}.headers.{name}: {e}"))?;
                    let value = MetadataValue::try_from(value.as_str()).map_err(|e| anyhow::anyhow!("{key}.headers: {e}"))?;
                    metadata.insert(name, value);
                }
                let mut channel = Channel::from_shared(endpoint.to_string())
                    .map_err(|e| anyhow::anyhow!("{key}.endpoint: {e}"))?
                    .timeout(settings.timeout)
                    .connect_timeout(Duration::from_secs(5))
                    .user_agent(concat!("nodelens/", env!("CARGO_PKG_VERSION")))
                    .map_err(|e| anyhow::anyhow!("{key}: {e}"))?
                    // HTTP/2 pings find a collector that vanished without a reset in seconds,
                    // not when TCP gives up minutes later.
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .keep_alive_while_idle(true)
                    .tcp_keepalive(Some(Duration::from_secs(60)));
                if endpoint.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &ca {
                        tls = tls.ca_certificate(Certificate::from_pem(pem));
                    }
                    channel = channel.tls_config(tls).map_err(|e| anyhow::anyhow!("{key}: TLS: {e}"))?;
                }
                Transport::Grpc { channel: channel.connect_lazy(), metadata }
            }
        };
        Ok(Exporter {
            signal,
            shown: redact_url(endpoint),
            gzip: settings.compression == Compression::Gzip,
            timeout: settings.timeout,
            transport,
        })
    }

    /// The `Export*ServiceRequest` made of `parts` (pieces packed as this exporter
    /// compresses: fields of the request), ready to send as often as needed; small pieces
    /// are compressed together here, with `packer`.
    pub fn payload<'a>(&self, parts: impl IntoIterator<Item = &'a Packed> + Clone, packer: &mut Packer) -> Payload {
        let count = parts.clone().into_iter().count();
        let mut body = self.body(count, packer);
        for part in parts {
            body.push(part);
        }
        self.finish(body)
    }

    /// Whether bodies are compressed.
    pub fn gzip(&self) -> bool {
        self.gzip
    }

    /// The encoded `Export*ServiceRequest` `message`, compressed (at level 1, as the log
    /// sink's pieces; tonic would compress at level 6) and framed as this exporter sends it.
    pub fn payload_of(&self, message: &[u8]) -> Payload {
        Packer::with(|packer| {
            let mut body = self.body(1, packer);
            body.push_plain(message);
            self.finish(body)
        })
    }

    /// An empty body of `parts` pieces, compressed as configured, with room for the gRPC
    /// frame header over gRPC.
    fn body<'p>(&self, parts: usize, packer: &'p mut Packer) -> Body<'p> {
        let prefix = if matches!(self.transport, Transport::Grpc { .. }) { grpc::FRAME_HEADER } else { 0 };
        Body::new(self.gzip, prefix, parts, packer)
    }

    fn finish(&self, body: Body) -> Payload {
        let gzip = self.gzip;
        let body = match self.transport {
            Transport::Grpc { .. } => body.finish_with_prefix(|header, len| grpc::frame_header(header, len, gzip)),
            Transport::Http { .. } => body.finish(),
        };
        Payload { body }
    }

    /// Sends one request; returns how long the receiver took.
    pub async fn export(&self, payload: &Payload) -> Result<(Accepted, Duration), Failure> {
        let failure = |reason: String, kind: FailureKind, retry_after: Option<Duration>| Failure {
            endpoint: self.shown.clone(),
            reason,
            kind,
            retry_after,
        };
        let retry = FailureKind::Retry;
        match &self.transport {
            Transport::Http { client, url } => {
                let mut post = client.post(url.clone());
                if self.gzip {
                    post = post.header(CONTENT_ENCODING, "gzip");
                }
                let started = Instant::now();
                let reply = post
                    .body(reqwest::Body::wrap(payload.body.http_body()))
                    .send()
                    .await
                    .map_err(|e| failure(describe(&e), retry, None))?;
                let status = reply.status();
                let retry_after = reply.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
                let protobuf = reply.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/x-protobuf"));
                let body = reply.bytes().await.map_err(|e| failure(describe(&e), retry, None))?;
                let took = started.elapsed();
                if status.is_success() {
                    // A 2xx is acceptance, whatever the body (a gateway may answer `{}`): only
                    // a protobuf body can tell of rejected records.
                    return Ok((self.accepted(protobuf.then_some(&body[..])), took));
                }
                let message =
                    if protobuf { status::message(&body) } else { String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned() };
                let kind = match status.as_u16() {
                    400 => FailureKind::Refused,
                    413 => FailureKind::TooLarge,
                    _ => retry,
                };
                Err(failure(format!("{status}: {}", message.trim()), kind, retry_after))
            }
            Transport::Grpc { channel, metadata } => {
                let gzip = self.gzip;
                let started = Instant::now();
                match grpc::unary(channel, metadata, self.signal.grpc_path(), &payload.body, gzip, self.timeout).await {
                    Ok(reply) => Ok((self.accepted(Some(&reply)), started.elapsed())),
                    Err(status) => {
                        let retry_after = status::retry_delay(status.details());
                        let kind = match status.code() {
                            tonic::Code::InvalidArgument => FailureKind::Refused,
                            tonic::Code::ResourceExhausted if retry_after.is_none() => FailureKind::TooLarge,
                            _ => retry,
                        };
                        Err(failure(format!("{:?}: {}", status.code(), status.message()), kind, retry_after))
                    }
                }
            }
        }
    }
}

impl Exporter {
    /// What a success answer's body says of rejected items; an answer that cannot be read
    /// still accepted the request (sending it again would duplicate it).
    fn accepted(&self, body: Option<&[u8]>) -> Accepted {
        match body.map(|b| self.signal.partial_success(b)) {
            Some(Ok((rejected, message))) => Accepted { rejected, message },
            Some(Err(e)) => {
                tracing::debug!(endpoint = %self.shown, error = %e, "OTLP success answer is not an Export*ServiceResponse; taken as full success");
                Accepted::default()
            }
            None => Accepted::default(),
        }
    }
}

/// A string attribute, or one of another type.
pub(crate) fn kv(key: impl Into<String>, value: Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// A string attribute value.
pub(crate) fn text(value: &str) -> Value {
    Value::StringValue(value.to_string())
}

/// Appends a string attribute for each pair whose value is not empty.
pub(crate) fn push_present<'a>(out: &mut Vec<KeyValue>, pairs: impl IntoIterator<Item = (&'static str, &'a String)>) {
    out.extend(pairs.into_iter().filter(|(_, value)| !value.is_empty()).map(|(key, value)| kv(key, text(value))));
}

/// Nanoseconds since the epoch, as OTLP timestamps are.
pub(crate) fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A reqwest error with its causes (the bare error says only "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After` in seconds; an HTTP date (rare from collectors) is taken as no advice.
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s.min(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_and_bounded() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("999999"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
    }

    #[test]
    fn partial_success_is_read_per_signal() {
        use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
        let body = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess { rejected_log_records: 3, error_message: "too old".into() }),
        }
        .encode_to_vec();
        assert_eq!(Signal::Logs.partial_success(&body).unwrap(), (3, "too old".to_string()));
        assert_eq!(Signal::Logs.partial_success(&[]).unwrap(), (0, String::new()), "an empty answer is full success");
        assert!(Signal::Logs.partial_success(&[0xff, 0xff]).is_err());
    }

    #[tokio::test]
    async fn a_payload_is_its_pieces_joined_as_they_are_for_http_and_in_one_frame_for_grpc() {
        use std::io::Read;

        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        use opentelemetry_proto::tonic::logs::v1::ResourceLogs;
        // Three batches' ResourceLogs, packed as the encoder packs them.
        let mut packer = Packer::new();
        let pieces: Vec<Packed> = (0..3)
            .map(|i| {
                let part = ResourceLogs { schema_url: format!("batch {i} ").repeat(3000), ..Default::default() }.encode_to_vec();
                packer.pack_with(true, |plain| {
                    logs::frame(&part, plain);
                    Vec::new()
                })
            })
            .collect();
        let packed: usize = pieces.iter().map(Packed::packed_len).sum();
        let plain: usize = pieces.iter().map(Packed::plain_len).sum();
        for (protocol, prefix) in [(OtlpProtocol::HttpProtobuf, 0), (OtlpProtocol::Grpc, grpc::FRAME_HEADER)] {
            let settings = Settings {
                key: "sinks.otlp",
                endpoint: "http://collector:4317".into(),
                protocol,
                headers: Default::default(),
                compression: Compression::Gzip,
                ca_file: String::new(),
                timeout: Duration::from_secs(1),
            };
            let payload = Exporter::new(&settings, Signal::Logs).unwrap().payload(&pieces, &mut Packer::new());
            // The regression guard for memory: a request holds the compressed pieces, no more.
            assert_eq!(payload.len(), prefix + packed + crate::packed::GZIP_OVERHEAD, "{protocol:?}");
            assert!(payload.len() * 5 < plain, "{} bytes for {plain} plain", payload.len());
            let sent = payload.body.to_vec();
            let member = &sent[prefix..];
            let shared = payload.body.parts().iter().filter(|part| pieces.iter().any(|p| p.shares(part))).count();
            assert_eq!(shared, 3, "the pieces are sent as they are held, not copied");
            if prefix > 0 {
                assert_eq!(sent[0], 1, "compressed flag");
                assert_eq!(u32::from_be_bytes(sent[1..5].try_into().unwrap()) as usize, member.len());
            }
            let mut message = Vec::new();
            flate2::read::GzDecoder::new(member).read_to_end(&mut message).unwrap();
            let request = ExportLogsServiceRequest::decode(&message[..]).unwrap();
            let urls: Vec<&str> = request.resource_logs.iter().map(|r| &r.schema_url[..8]).collect();
            assert_eq!(urls, ["batch 0 ", "batch 1 ", "batch 2 "]);
        }
    }

    #[test]
    fn http_paths_are_appended_unless_given() {
        let settings = |endpoint: &str| Settings {
            key: "sinks.otlp",
            endpoint: endpoint.into(),
            protocol: OtlpProtocol::HttpProtobuf,
            headers: Default::default(),
            compression: Compression::Gzip,
            ca_file: String::new(),
            timeout: Duration::from_secs(1),
        };
        for (endpoint, want) in [
            ("http://collector:4318", "http://collector:4318/v1/logs"),
            ("http://collector:4318/", "http://collector:4318/v1/logs"),
            ("https://vendor.example/otlp/v1/logs", "https://vendor.example/otlp/v1/logs"),
        ] {
            let Transport::Http { url, .. } = Exporter::new(&settings(endpoint), Signal::Logs).unwrap().transport else { panic!() };
            assert_eq!(url.as_str(), want);
        }
    }
}
