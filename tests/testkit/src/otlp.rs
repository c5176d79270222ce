//! A strict OTLP receiver double: what an OpenTelemetry Collector's `otlp` receiver does with
//! logs and metrics, over OTLP/HTTP and OTLP/gRPC, checked against the spec
//! (<https://opentelemetry.io/docs/specs/otlp/>). OTLP/HTTP must be a POST to exactly
//! `/v1/logs` or `/v1/metrics` with `Content-Type: application/x-protobuf` (the JSON encoding is
//! not spoken by this double: it gets 415 like any other media type), uncompressed or gzip, and
//! decode as the export request; refusals carry a protobuf `google.rpc.Status` body. OTLP/gRPC is
//! tonic serving the generated `LogsService` and `MetricsService`, gzip accepted. Faults can be
//! injected: a status for one request (throttling with `Retry-After` on HTTP, a
//! `google.rpc.RetryInfo` detail on gRPC), a partial success, a reply lost after the records were
//! stored, a slow reply, an outage, and required credentials. Every request is kept as a
//! [`Seen`], every stored log record as a [`ReceivedLog`] with the moment it arrived.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, Metric};
use prost::Message;

use crate::http::Server;

mod grpc;
mod http;
#[cfg(test)]
mod tests;

/// The `google.rpc` messages OTLP puts on the wire: the error body of OTLP/HTTP and the
/// `grpc-status-details-bin` trailer of OTLP/gRPC.
pub mod rpc {
    /// `google.rpc.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        /// The gRPC status code.
        #[prost(int32, tag = "1")]
        pub code: i32,
        /// What went wrong, for a developer.
        #[prost(string, tag = "2")]
        pub message: String,
        /// Typed details, such as a [`RetryInfo`].
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }

    /// `google.protobuf.Any`: a message with the URL of its type.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        /// `type.googleapis.com/<full message name>`.
        #[prost(string, tag = "1")]
        pub type_url: String,
        /// The encoded message.
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// `google.rpc.RetryInfo`: how long the client should wait before retrying.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        /// The delay.
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<Duration>,
    }

    /// `google.protobuf.Duration`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        /// Whole seconds.
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        /// The nanoseconds beyond them.
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    /// The `type_url` of a packed [`RetryInfo`].
    pub const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";
}

/// A fault applied to one export (logs or metrics). Faults queue and are taken in order, one
/// per well-formed, authorised export; a request refused for its path, method, media type,
/// encoding, body or credentials, or during an outage, leaves the queue as it is.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this HTTP status (with `Retry-After: <seconds>` when set), or over gRPC the
    /// matching code (429 → `RESOURCE_EXHAUSTED`, 503 → `UNAVAILABLE`, 400 →
    /// `INVALID_ARGUMENT`, 500 → `INTERNAL`, ...) with a `google.rpc.RetryInfo` detail when
    /// `retry_after` is set. Nothing is stored.
    Status {
        /// The HTTP status.
        code: u16,
        /// Seconds the client should wait before retrying.
        retry_after: Option<u64>,
    },
    /// Store all but the last `rejected` records (data points for metrics) and say so in
    /// `partial_success`.
    PartialSuccess {
        /// Records refused, counted from the end of the request.
        rejected: usize,
        /// The `error_message` of the reply.
        message: String,
    },
    /// Store the request, then close the connection unanswered (HTTP) or answer `UNAVAILABLE`
    /// (gRPC), so the client believes it failed.
    LoseReply,
    /// Wait this long, then handle the request as usual.
    Slow(Duration),
}

/// One request as the double saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// `"http"` or `"grpc"`.
    pub transport: &'static str,
    /// `"logs"` or `"metrics"`; empty when the HTTP path names neither.
    pub signal: &'static str,
    /// The HTTP path, or the gRPC method path.
    pub path: String,
    /// The `Content-Type` header (`application/grpc` over gRPC).
    pub content_type: Option<String>,
    /// The `Content-Encoding` header, or the `grpc-encoding` metadata over gRPC.
    pub content_encoding: Option<String>,
    /// The `authorization` header or metadata.
    pub authorization: Option<String>,
    /// Log records or metric data points in the request; 0 when it did not decode.
    pub records: usize,
    /// The HTTP status (0 when the reply was lost on purpose) or the gRPC code (0 for OK).
    pub status: i32,
}

/// One stored log record, flattened with its resource and scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedLog {
    /// The resource's attributes.
    pub resource: BTreeMap<String, String>,
    /// The record's attributes.
    pub attributes: BTreeMap<String, String>,
    /// The body: a string as sent, anything else in its `Debug` form.
    pub body: String,
    /// When the event happened.
    pub time_unix_nano: u64,
    /// When the sender observed it.
    pub observed_time_unix_nano: u64,
    /// The `SeverityNumber`.
    pub severity_number: i32,
    /// The severity as text.
    pub severity_text: String,
    /// The instrumentation scope's name.
    pub scope: String,
    /// When the double stored it.
    pub arrived: Instant,
}

impl ReceivedLog {
    /// The `log.record.uid` attribute, which identifies a record across resends.
    pub fn uid(&self) -> Option<&str> {
        self.attributes.get("log.record.uid").map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    logs: Vec<ReceivedLog>,
    metrics: Vec<ExportMetricsServiceRequest>,
    seen: Vec<Seen>,
    faults: VecDeque<Fault>,
    /// Every request is answered 503 / `UNAVAILABLE`, nothing stored.
    outage: bool,
    /// Headers (lower-case names) every request must carry, with these exact values.
    required: Vec<(String, String)>,
}

/// A running double; stops when dropped.
pub struct FakeOtlp {
    state: Arc<Mutex<State>>,
    http: Server,
    grpc: grpc::GrpcServer,
}

impl FakeOtlp {
    /// Starts both listeners on free loopback ports.
    pub fn start() -> FakeOtlp {
        FakeOtlp::start_on(0, 0)
    }

    /// Starts on these ports (e.g. those of a double that was stopped, to model a restart).
    pub fn start_on(http_port: u16, grpc_port: u16) -> FakeOtlp {
        let state = Arc::new(Mutex::new(State::default()));
        let http = http::start(http_port, state.clone());
        let grpc = grpc::GrpcServer::start(grpc_port, state.clone());
        FakeOtlp { state, http, grpc }
    }

    /// `http://127.0.0.1:<port>` of OTLP/HTTP; the signal paths go after it.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http.addr)
    }

    /// `http://127.0.0.1:<port>` of OTLP/gRPC.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc.addr)
    }

    /// The OTLP/HTTP port.
    pub fn http_port(&self) -> u16 {
        self.http.addr.port()
    }

    /// The OTLP/gRPC port.
    pub fn grpc_port(&self) -> u16 {
        self.grpc.addr.port()
    }

    /// Every stored log record in arrival order; a resent record shows up each time.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.state.lock().unwrap().logs.clone()
    }

    /// Number of stored log records.
    pub fn log_count(&self) -> usize {
        self.state.lock().unwrap().logs.len()
    }

    /// Every stored metrics request in arrival order, less the data points a partial success
    /// refused.
    pub fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        self.state.lock().unwrap().metrics.clone()
    }

    /// Requests received so far, over both transports.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Queues a fault for a later export.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push_back(fault);
    }

    /// Starts (`true`) or ends an outage: every request is answered 503 / `UNAVAILABLE`.
    pub fn outage(&self, on: bool) {
        self.state.lock().unwrap().outage = on;
    }

    /// Requires this header (or gRPC metadata) with exactly this value; requests without it
    /// are answered 401 / `UNAUTHENTICATED`. Each call adds a requirement.
    pub fn require_header(&self, name: &str, value: &str) {
        self.state.lock().unwrap().required.push((name.to_ascii_lowercase(), value.to_string()));
    }

    /// Stops listening on both ports and drops the open connections.
    pub fn stop(mut self) {
        self.http.stop();
        self.grpc.stop();
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Signal {
    Logs,
    Metrics,
}

impl Signal {
    fn from_path(path: &str) -> Option<Signal> {
        match path {
            "/v1/logs" => Some(Signal::Logs),
            "/v1/metrics" => Some(Signal::Metrics),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Metrics => "metrics",
        }
    }
}

/// An export request of either signal.
enum Export {
    Logs(ExportLogsServiceRequest),
    Metrics(ExportMetricsServiceRequest),
}

impl Export {
    fn decode(signal: Signal, body: &[u8]) -> Result<Export, prost::DecodeError> {
        Ok(match signal {
            Signal::Logs => Export::Logs(ExportLogsServiceRequest::decode(body)?),
            Signal::Metrics => Export::Metrics(ExportMetricsServiceRequest::decode(body)?),
        })
    }

    /// Log records, or metric data points.
    fn records(&self) -> usize {
        match self {
            Export::Logs(request) => request.resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len()).sum(),
            Export::Metrics(request) => {
                request.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics).map(point_count).sum()
            }
        }
    }

    /// Stores the first `keep` records.
    fn store(self, keep: usize, st: &mut State) {
        let arrived = Instant::now();
        match self {
            Export::Logs(request) => {
                let mut records = Vec::new();
                for resource_logs in request.resource_logs {
                    let resource = attributes(&resource_logs.resource.unwrap_or_default().attributes);
                    for scope_logs in resource_logs.scope_logs {
                        let scope = scope_logs.scope.map(|s| s.name).unwrap_or_default();
                        records.extend(scope_logs.log_records.into_iter().map(|r| ReceivedLog {
                            resource: resource.clone(),
                            attributes: attributes(&r.attributes),
                            body: render(r.body.as_ref()),
                            time_unix_nano: r.time_unix_nano,
                            observed_time_unix_nano: r.observed_time_unix_nano,
                            severity_number: r.severity_number,
                            severity_text: r.severity_text,
                            scope: scope.clone(),
                            arrived,
                        }));
                    }
                }
                st.logs.extend(records.into_iter().take(keep));
            }
            Export::Metrics(mut request) => {
                let mut left = keep;
                let metrics = request.resource_metrics.iter_mut().flat_map(|r| &mut r.scope_metrics).flat_map(|s| &mut s.metrics);
                for metric in metrics {
                    let kept = point_count(metric).min(left);
                    truncate_points(metric, kept);
                    left -= kept;
                }
                st.metrics.push(request);
            }
        }
    }
}

fn point_count(metric: &Metric) -> usize {
    match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

fn truncate_points(metric: &mut Metric, keep: usize) {
    match &mut metric.data {
        Some(Data::Gauge(g)) => g.data_points.truncate(keep),
        Some(Data::Sum(s)) => s.data_points.truncate(keep),
        Some(Data::Histogram(h)) => h.data_points.truncate(keep),
        Some(Data::ExponentialHistogram(h)) => h.data_points.truncate(keep),
        Some(Data::Summary(s)) => s.data_points.truncate(keep),
        None => {}
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter().map(|kv| (kv.key.clone(), render(kv.value.as_ref()))).collect()
}

fn render(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The records refused of a stored export, and why.
struct Partial {
    rejected: usize,
    message: String,
}

fn logs_reply(partial: Option<Partial>) -> ExportLogsServiceResponse {
    ExportLogsServiceResponse {
        partial_success: partial.map(|p| ExportLogsPartialSuccess { rejected_log_records: p.rejected as i64, error_message: p.message }),
    }
}

fn metrics_reply(partial: Option<Partial>) -> ExportMetricsServiceResponse {
    ExportMetricsServiceResponse {
        partial_success: partial.map(|p| ExportMetricsPartialSuccess { rejected_data_points: p.rejected as i64, error_message: p.message }),
    }
}

/// A request refused whole, nothing stored.
struct Refusal {
    /// The HTTP status; gRPC answers the matching code.
    status: u16,
    retry_after: Option<u64>,
    message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal { status, retry_after: None, message: message.into() }
    }
}

/// The gRPC code for an HTTP status, as grpc-gateway and the collector pair them, and 502 as
/// gRPC's own HTTP mapping does, so that the statuses OTLP/HTTP retries (429, 502, 503, 504)
/// keep their meaning (`RESOURCE_EXHAUSTED` is retried only with a `RetryInfo`).
fn grpc_code(status: u16) -> tonic::Code {
    use tonic::Code;
    match status {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        413 | 429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        500 => Code::Internal,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Unknown,
    }
}

/// What became of an export that was admitted.
enum Outcome {
    Stored(Option<Partial>),
    Refused(Refusal),
    /// Stored, but the client must not learn it.
    Lost,
}

/// The checks every request passes first, whatever the transport: the outage, then credentials.
fn admit(st: &State, header: impl Fn(&str) -> Option<String>) -> Result<(), Refusal> {
    if st.outage {
        return Err(Refusal::new(503, "injected outage"));
    }
    match st.required.iter().find(|(name, value)| header(name).as_deref() != Some(value.as_str())) {
        Some((name, _)) => Err(Refusal::new(401, format!("missing or wrong {name}"))),
        None => Ok(()),
    }
}

/// Applies the next fault, if any, to a well-formed export and stores what it lets through.
async fn accept(state: &Mutex<State>, export: Export) -> Outcome {
    let fault = state.lock().unwrap().faults.pop_front();
    if let Some(Fault::Slow(delay)) = &fault {
        tokio::time::sleep(*delay).await;
    }
    let mut st = state.lock().unwrap();
    let records = export.records();
    match fault {
        Some(Fault::Status { code, retry_after }) => {
            Outcome::Refused(Refusal { status: code, retry_after, message: "injected failure".into() })
        }
        Some(Fault::PartialSuccess { rejected, message }) => {
            let rejected = rejected.min(records);
            export.store(records - rejected, &mut st);
            Outcome::Stored(Some(Partial { rejected, message }))
        }
        Some(Fault::LoseReply) => {
            export.store(records, &mut st);
            Outcome::Lost
        }
        Some(Fault::Slow(_)) | None => {
            export.store(records, &mut st);
            Outcome::Stored(None)
        }
    }
}
