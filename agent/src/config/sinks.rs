//! The `sinks` section: Elasticsearch, OTLP and stdout.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, redacted, redacted_map, redacted_url, redacted_urls, Switch};

/// Where log records go.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    /// Elasticsearch `_bulk`.
    pub elasticsearch: ElasticsearchConfig,
    /// OTLP log export (OpenTelemetry Collector, Alloy, vendors).
    pub otlp: OtlpSinkConfig,
    /// One ECS JSON document per line on standard output.
    pub stdout: StdoutConfig,
}

/// The Elasticsearch sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticsearchConfig {
    /// Base URLs tried in turn (failover); empty = sink off. A password in a URL is used for
    /// basic auth and never printed or logged.
    #[serde(serialize_with = "redacted_urls")]
    pub endpoints: Vec<String>,
    /// Data stream written with `create` operations.
    pub data_stream: String,
    /// Data stream of the node's own logs (journal and kernel); one `_bulk` request may carry
    /// records of both streams.
    pub node_data_stream: String,
    /// Data stream of the GPU run reports (one record per container that held a GPU, when it
    /// ends).
    pub gpu_runs_data_stream: String,
    /// Data stream of the cluster's Kubernetes Events (written by the elected agent only).
    pub events_data_stream: String,
    /// Basic-auth user; the password comes from `password` or `password_file`.
    pub username: String,
    /// Basic-auth password (prefer `password_file` or the environment).
    #[serde(serialize_with = "redacted")]
    pub password: String,
    /// File holding the basic-auth password (a mounted Secret).
    pub password_file: String,
    /// `Authorization: ApiKey <api_key>` (the base64 `id:key` form).
    #[serde(serialize_with = "redacted")]
    pub api_key: String,
    /// PEM file of a private CA to trust.
    pub ca_file: String,
    /// Request body compression.
    pub compression: Compression,
    /// Largest `_bulk` body before compression.
    pub batch_max_bytes: usize,
    /// Longest a record waits for its batch to fill.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// Timeout of one `_bulk` request.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// `_bulk` requests in flight at once (checkpoints still advance in read order).
    pub max_concurrent_requests: usize,
    /// How many 5xx answers a record may get, while Elasticsearch accepts other records,
    /// before it is given up (counted as `retries_exhausted`). During an outage, when nothing
    /// is accepted, records are kept and sent again without end, as are 429s.
    pub item_max_attempts: u32,
}

impl Default for ElasticsearchConfig {
    fn default() -> Self {
        ElasticsearchConfig {
            endpoints: Vec::new(),
            data_stream: "logs-kubernetes.container_logs-default".into(),
            node_data_stream: "logs-kubernetes.node-default".into(),
            gpu_runs_data_stream: "logs-nodelens.gpu_runs-default".into(),
            events_data_stream: "logs-kubernetes.event-default".into(),
            username: String::new(),
            password: String::new(),
            password_file: String::new(),
            api_key: String::new(),
            ca_file: String::new(),
            compression: Compression::Gzip,
            batch_max_bytes: 5 * 1024 * 1024,
            flush_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4,
            item_max_attempts: 5,
        }
    }
}

/// The OTLP log sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpSinkConfig {
    /// The receiver: `http://host:4318` (OTLP/HTTP; `/v1/logs` is appended unless the URL
    /// already ends with it) or `http://host:4317` (gRPC); `https://` for TLS. Empty = sink off.
    #[serde(serialize_with = "redacted_url")]
    pub endpoint: String,
    /// `http/protobuf` or `grpc`.
    pub protocol: OtlpProtocol,
    /// Sent with every request (HTTP headers or gRPC metadata), e.g. `Authorization`. Values
    /// are never printed.
    #[serde(serialize_with = "redacted_map")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Request body compression.
    pub compression: Compression,
    /// PEM file of a private CA to trust.
    pub ca_file: String,
    /// Largest request before compression. Collectors refuse gRPC messages over 4 MiB by default.
    pub batch_max_bytes: usize,
    /// Longest a record waits for its request to fill.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// Timeout of one export request.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Export requests in flight at once (checkpoints still advance in read order).
    pub max_concurrent_requests: usize,
    /// How often a request whose data the receiver refuses (HTTP 400, INVALID_ARGUMENT) is
    /// tried before its records are given up and counted as `rejected`. Every other failure
    /// (429, 5xx, 401/403/404, UNAVAILABLE, no answer) is retried without end.
    pub max_attempts: u32,
}

impl Default for OtlpSinkConfig {
    fn default() -> Self {
        OtlpSinkConfig {
            endpoint: String::new(),
            protocol: OtlpProtocol::HttpProtobuf,
            headers: Default::default(),
            compression: Compression::Gzip,
            ca_file: String::new(),
            batch_max_bytes: 2 * 1024 * 1024,
            flush_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4,
            max_attempts: 5,
        }
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with binary protobuf bodies.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC.
    #[serde(rename = "grpc")]
    Grpc,
}

/// Request body compression.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `Content-Encoding: gzip`.
    Gzip,
    /// Plain bodies.
    None,
}

/// The stdout sink.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutConfig {
    /// `auto`: on when no other sink is configured.
    pub enabled: Switch,
}
