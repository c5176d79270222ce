use super::http::PROTOBUF;
use super::*;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{Gauge, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum};
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::io::Read;
use tonic::codec::CompressionEncoding;

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// One pod's records, one per body, each with its uid.
fn logs_request(bodies: &[&str]) -> ExportLogsServiceRequest {
    let log_records = bodies
        .iter()
        .enumerate()
        .map(|(n, body)| LogRecord {
            time_unix_nano: 1_700_000_000_000_000_000 + n as u64,
            observed_time_unix_nano: 1_700_000_001_000_000_000,
            severity_number: 9,
            severity_text: "INFO".to_string(),
            body: Some(AnyValue { value: Some(Value::StringValue(body.to_string())) }),
            attributes: vec![
                kv("log.record.uid", Value::StringValue(format!("uid-{n}"))),
                kv("log.iostream", Value::StringValue("stdout".into())),
            ],
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    kv("k8s.pod.name", Value::StringValue("web-0".into())),
                    kv("k8s.container.restart_count", Value::IntValue(2)),
                ],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope { name: "nodelens".to_string(), ..Default::default() }),
                log_records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A gauge with two points and a sum with one.
fn metrics_request() -> ExportMetricsServiceRequest {
    let point = |v: f64| NumberDataPoint {
        value: Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(v)),
        ..Default::default()
    };
    let gauge = Metric {
        name: "gpu.utilization".into(),
        data: Some(Data::Gauge(Gauge { data_points: vec![point(0.5), point(0.7)] })),
        ..Default::default()
    };
    let sum = Metric {
        name: "gpu.energy".into(),
        data: Some(Data::Sum(Sum { data_points: vec![point(9.0)], ..Default::default() })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics { metrics: vec![gauge, sum], ..Default::default() }],
            ..Default::default()
        }],
    }
}

struct HttpReply {
    status: u16,
    /// Lower-case names.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// One HTTP/1.1 exchange written by hand; `None` when the connection closed unanswered.
fn send(otlp: &FakeOtlp, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<HttpReply> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(otlp.http.addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8(response[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string())).collect();
    Some(HttpReply { status, headers, body: response[split + 4..].to_vec() })
}

fn post_protobuf(otlp: &FakeOtlp, path: &str, body: &[u8]) -> HttpReply {
    send(otlp, "POST", path, &[("Content-Type", PROTOBUF)], body).expect("a reply")
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

fn bodies(otlp: &FakeOtlp) -> Vec<String> {
    otlp.logs().into_iter().map(|l| l.body).collect()
}

#[test]
fn http_protobuf_export_stores_each_record_with_its_resource_and_scope() {
    let otlp = FakeOtlp::start();
    let reply = post_protobuf(&otlp, "/v1/logs", &logs_request(&["hello", "world"]).encode_to_vec());
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], PROTOBUF);
    assert_eq!(ExportLogsServiceResponse::decode(&reply.body[..]).unwrap(), ExportLogsServiceResponse { partial_success: None });
    let logs = otlp.logs();
    assert_eq!(logs.len(), 2);
    let first = &logs[0];
    assert_eq!(first.body, "hello");
    assert_eq!(first.uid(), Some("uid-0"));
    assert_eq!(first.attributes["log.iostream"], "stdout");
    let resource: BTreeMap<String, String> =
        [("k8s.container.restart_count", "2"), ("k8s.pod.name", "web-0")].map(|(k, v)| (k.to_string(), v.to_string())).into();
    assert_eq!(first.resource, resource);
    assert_eq!(first.scope, "nodelens");
    assert_eq!((first.time_unix_nano, first.observed_time_unix_nano), (1_700_000_000_000_000_000, 1_700_000_001_000_000_000));
    assert_eq!((first.severity_number, first.severity_text.as_str()), (9, "INFO"));
    assert_eq!(logs[1].uid(), Some("uid-1"));
    assert_eq!(
        otlp.seen(),
        [Seen {
            transport: "http",
            signal: "logs",
            path: "/v1/logs".into(),
            content_type: Some(PROTOBUF.into()),
            content_encoding: None,
            authorization: None,
            records: 2,
            status: 200,
        }]
    );
}

#[test]
fn http_gzip_body_is_inflated_and_an_empty_request_is_accepted() {
    let otlp = FakeOtlp::start();
    let body = gzip(&logs_request(&["a", "b", "c"]).encode_to_vec());
    let reply = send(&otlp, "POST", "/v1/logs", &[("Content-Type", PROTOBUF), ("Content-Encoding", "gzip")], &body).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(bodies(&otlp), ["a", "b", "c"]);
    assert_eq!(otlp.seen()[0].content_encoding.as_deref(), Some("gzip"));
    assert_eq!(post_protobuf(&otlp, "/v1/logs", &[]).status, 200, "an empty request is no error");
    assert_eq!((otlp.log_count(), otlp.seen()[1].records), (3, 0));
}

#[test]
fn http_refuses_what_the_collector_refuses_without_using_up_a_fault() {
    let otlp = FakeOtlp::start();
    otlp.inject(Fault::Status { code: 503, retry_after: None });
    let body = logs_request(&["x"]).encode_to_vec();
    let status_of = |reply: HttpReply| {
        assert_eq!(reply.headers["content-type"], PROTOBUF);
        (reply.status, rpc::Status::decode(&reply.body[..]).unwrap().code)
    };
    let json = send(&otlp, "POST", "/v1/logs", &[("Content-Type", "application/json")], b"{}").unwrap();
    assert_eq!(status_of(json), (415, 2));
    let get = send(&otlp, "GET", "/v1/logs", &[("Content-Type", PROTOBUF)], b"").unwrap();
    assert_eq!(status_of(get), (405, 2));
    assert_eq!(status_of(post_protobuf(&otlp, "/v1/traces", &body)), (404, 5));
    assert_eq!(status_of(post_protobuf(&otlp, "/v1/logs/", &body)), (404, 5));
    let garbage = post_protobuf(&otlp, "/v1/logs", b"\xff\xff\xff\xff not protobuf");
    assert_eq!(status_of(garbage), (400, 3));
    let not_gzip = send(&otlp, "POST", "/v1/logs", &[("Content-Type", PROTOBUF), ("Content-Encoding", "gzip")], &body).unwrap();
    assert_eq!(status_of(not_gzip), (400, 3));
    let brotli = send(&otlp, "POST", "/v1/logs", &[("Content-Type", PROTOBUF), ("Content-Encoding", "br")], &body).unwrap();
    assert_eq!(status_of(brotli), (400, 3));
    assert_eq!(otlp.log_count(), 0);
    let statuses: Vec<i32> = otlp.seen().iter().map(|s| s.status).collect();
    assert_eq!(statuses, [415, 405, 404, 404, 400, 400, 400]);
    assert_eq!(post_protobuf(&otlp, "/v1/logs", &body).status, 503, "the fault waited for a well-formed export");
    assert_eq!(post_protobuf(&otlp, "/v1/logs", &body).status, 200);
    assert_eq!(otlp.log_count(), 1);
}

#[test]
fn status_fault_answers_retry_after_and_stores_nothing() {
    let otlp = FakeOtlp::start();
    otlp.inject(Fault::Status { code: 429, retry_after: Some(7) });
    let body = logs_request(&["x"]).encode_to_vec();
    let reply = post_protobuf(&otlp, "/v1/logs", &body);
    assert_eq!(reply.status, 429);
    assert_eq!(reply.headers["retry-after"], "7");
    assert_eq!(rpc::Status::decode(&reply.body[..]).unwrap().code, i32::from(tonic::Code::ResourceExhausted));
    assert_eq!(otlp.log_count(), 0);
    assert_eq!(otlp.seen()[0].records, 1);
    assert_eq!(post_protobuf(&otlp, "/v1/logs", &body).status, 200);
    assert_eq!(otlp.log_count(), 1);
}

#[test]
fn partial_success_stores_all_but_the_last_rejected_records() {
    let otlp = FakeOtlp::start();
    otlp.inject(Fault::PartialSuccess { rejected: 1, message: "too long".into() });
    let reply = post_protobuf(&otlp, "/v1/logs", &logs_request(&["a", "b", "c"]).encode_to_vec());
    assert_eq!(reply.status, 200);
    let partial = ExportLogsServiceResponse::decode(&reply.body[..]).unwrap().partial_success;
    assert_eq!(partial, Some(ExportLogsPartialSuccess { rejected_log_records: 1, error_message: "too long".into() }));
    assert_eq!(bodies(&otlp), ["a", "b"]);

    otlp.inject(Fault::PartialSuccess { rejected: 2, message: "stale".into() });
    let reply = post_protobuf(&otlp, "/v1/metrics", &metrics_request().encode_to_vec());
    let partial = ExportMetricsServiceResponse::decode(&reply.body[..]).unwrap().partial_success;
    assert_eq!(partial, Some(ExportMetricsPartialSuccess { rejected_data_points: 2, error_message: "stale".into() }));
    let stored = otlp.metrics();
    let points: Vec<(String, usize)> =
        stored[0].resource_metrics[0].scope_metrics[0].metrics.iter().map(|m| (m.name.clone(), point_count(m))).collect();
    assert_eq!(points, [("gpu.utilization".to_string(), 1), ("gpu.energy".to_string(), 0)]);
    assert_eq!(otlp.seen()[1].records, 3);
}

#[test]
fn lost_reply_stores_the_records_and_closes_the_connection() {
    let otlp = FakeOtlp::start();
    otlp.inject(Fault::LoseReply);
    let body = logs_request(&["once"]).encode_to_vec();
    assert!(send(&otlp, "POST", "/v1/logs", &[("Content-Type", PROTOBUF)], &body).is_none());
    assert_eq!(post_protobuf(&otlp, "/v1/logs", &body).status, 200);
    assert_eq!(bodies(&otlp), ["once", "once"], "the resend is kept beside the first copy");
    assert_eq!(otlp.seen().iter().map(|s| s.status).collect::<Vec<_>>(), [0, 200]);
}

#[test]
fn outage_and_missing_credentials_are_refused_over_http() {
    let otlp = FakeOtlp::start();
    otlp.require_header("Authorization", "Bearer s3cret");
    let body = logs_request(&["x"]).encode_to_vec();
    assert_eq!(post_protobuf(&otlp, "/v1/logs", &body).status, 401);
    let with = |otlp: &FakeOtlp| {
        send(otlp, "POST", "/v1/logs", &[("Content-Type", PROTOBUF), ("Authorization", "Bearer s3cret")], &body).unwrap().status
    };
    otlp.outage(true);
    assert_eq!(with(&otlp), 503);
    otlp.outage(false);
    assert_eq!(with(&otlp), 200);
    assert_eq!(otlp.log_count(), 1);
    assert_eq!(otlp.seen()[2].authorization.as_deref(), Some("Bearer s3cret"));
}

#[tokio::test]
async fn grpc_export_is_stored_and_a_throttle_carries_retry_info() {
    let otlp = FakeOtlp::start();
    otlp.require_header("authorization", "Bearer s3cret");
    let mut client = LogsServiceClient::connect(otlp.grpc_url()).await.unwrap().send_compressed(CompressionEncoding::Gzip);
    let request = |bodies: &[&str], auth: bool| {
        let mut request = tonic::Request::new(logs_request(bodies));
        if auth {
            request.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        }
        request
    };
    let unauthenticated = client.export(request(&["x"], false)).await.unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    let reply = client.export(request(&["a", "b"], true)).await.unwrap().into_inner();
    assert_eq!(reply.partial_success, None);
    assert_eq!(bodies(&otlp), ["a", "b"]);
    assert_eq!(otlp.logs()[0].resource["k8s.pod.name"], "web-0");

    otlp.inject(Fault::Status { code: 503, retry_after: Some(3) });
    let throttled = client.export(request(&["c"], true)).await.unwrap_err();
    assert_eq!(throttled.code(), tonic::Code::Unavailable);
    let status = rpc::Status::decode(throttled.details()).unwrap();
    assert_eq!((status.code, status.details.len()), (i32::from(tonic::Code::Unavailable), 1));
    assert_eq!(status.details[0].type_url, "type.googleapis.com/google.rpc.RetryInfo");
    let retry = rpc::RetryInfo::decode(&status.details[0].value[..]).unwrap();
    assert_eq!(retry.retry_delay, Some(rpc::Duration { seconds: 3, nanos: 0 }));

    otlp.inject(Fault::PartialSuccess { rejected: 1, message: "dropped".into() });
    let reply = client.export(request(&["d", "e"], true)).await.unwrap().into_inner();
    assert_eq!(reply.partial_success, Some(ExportLogsPartialSuccess { rejected_log_records: 1, error_message: "dropped".into() }));
    otlp.inject(Fault::LoseReply);
    assert_eq!(client.export(request(&["f"], true)).await.unwrap_err().code(), tonic::Code::Unavailable);
    assert_eq!(bodies(&otlp), ["a", "b", "d", "f"]);

    let seen = otlp.seen();
    let codes: Vec<i32> = seen.iter().map(|s| s.status).collect();
    assert_eq!(codes, [16, 0, 14, 0, 14]);
    let second = &seen[1];
    assert_eq!((second.transport, second.signal, second.records), ("grpc", "logs", 2));
    assert_eq!(second.path, "/opentelemetry.proto.collector.logs.v1.LogsService/Export");
    assert_eq!(second.content_encoding.as_deref(), Some("gzip"));
    assert_eq!(second.authorization.as_deref(), Some("Bearer s3cret"));
    assert!(second.content_type.as_deref().is_some_and(|t| t.starts_with("application/grpc")), "{:?}", second.content_type);
}

#[tokio::test]
async fn grpc_metrics_are_routed_to_the_metrics_service_and_an_outage_is_unavailable() {
    let otlp = FakeOtlp::start();
    let mut client = MetricsServiceClient::connect(otlp.grpc_url()).await.unwrap();
    otlp.outage(true);
    let refused = client.export(metrics_request()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    otlp.outage(false);
    otlp.inject(Fault::Status { code: 502, retry_after: None });
    let bad_gateway = client.export(metrics_request()).await.unwrap_err();
    assert_eq!((bad_gateway.code(), bad_gateway.details().len()), (tonic::Code::Unavailable, 0));
    let reply = client.export(metrics_request()).await.unwrap().into_inner();
    assert_eq!(reply.partial_success, None);
    assert_eq!(otlp.metrics(), [metrics_request()]);
    assert_eq!(
        otlp.seen().iter().map(|s| (s.signal, s.records, s.status)).collect::<Vec<_>>(),
        [("metrics", 3, 14), ("metrics", 3, 14), ("metrics", 3, 0)]
    );
    assert_eq!(otlp.log_count(), 0);
}
