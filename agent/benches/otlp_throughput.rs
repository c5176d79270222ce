//! Exports a backlog over OTLP/HTTP (protobuf, gzip) through the real pipeline and the real
//! OTLP sink to a receiver that decodes every request, each record enriched with its pod's
//! metadata from a Kubernetes API as on a node (ten labels, an owner, an IP; `--no-k8s`: from
//! the log paths only), and reports the agent's records per CPU-second, the gzip floor on the
//! same requests and the ratio of the two, peak RSS and settled RSS.
//! `cargo bench --bench otlp_throughput -- 64` exports 8 × 64 MiB; `-- grpc` uses OTLP/gRPC
//! instead.
//!
//! The receiver counts the records whose resource carries the pods' labels and application
//! (`service.name` from their app label): the benchmark fails unless all of them do (with
//! `--no-k8s`, none). It keeps each request as it came and decodes it once the agent is done
//! (decoding every record costs it more CPU than the agent spends, which on a small machine
//! would compete with the agent). It keeps the first 64 MiB of requests, decompressed and whole; the gzip
//! floor is what this process spends compressing them again, request by request, at level 1
//! (`flate2`, `Compression::fast()`; the median of three passes), the least any exporter of
//! these requests with gzip spends.
//!
//! With `--otelcol PATH` it also runs the OpenTelemetry Collector (contrib) on the same
//! backlog: the filelog receiver with the `container` operator, exporting with `otlphttp` to
//! the same receiver, and reports its CPU-seconds and peak RSS the same way, from `/proc`.
//!
//! The receiver runs in a child process (this binary again, in its receiver role) so its CPU
//! and memory are not counted, and so does the API server double.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{Endpoint, Seen, APP, CONTAINERS, ROLE};
use nodelens::config::{Config, OtlpProtocol};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("otlp-receiver") {
        return receiver();
    }
    // As the agent does before any thread starts.
    nodelens::memory::limit_arenas();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(64);
    let grpc = args.iter().any(|a| a == "grpc");
    let k8s = !args.iter().any(|a| a == "--no-k8s");
    let otelcol = args.iter().position(|a| a == "--otelcol").and_then(|i| args.get(i + 1)).cloned();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Endpoint::spawn("otlp-receiver", dir.path());
    let [http_port, grpc_port, kubeconfig] = [0, 1, 2].map(|i| child.fields[i].clone());

    let pods = dir.path().join("pods");
    let records = common::generate_backlog(&pods, mib << 20);
    let mut config = Config::default();
    // The machine's own journal and kernel ring stay out of the measurement.
    config.node_logs.journald.enabled = nodelens::config::Switch::Off;
    config.node_logs.kernel.enabled = nodelens::config::Switch::Off;
    config.logs.pods_dir = pods.clone();
    config.state_dir = dir.path().join("state");
    config.sinks.otlp.endpoint = format!("http://127.0.0.1:{}", if grpc { &grpc_port } else { &http_port });
    config.sinks.otlp.protocol = if grpc { OtlpProtocol::Grpc } else { OtlpProtocol::HttpProtobuf };
    common::use_kubernetes(&mut config, k8s.then_some(kubeconfig.as_str()));
    let shipped = common::ship(&config, "otlp", records);
    let report = child.report();
    report.check(records, k8s);
    let received = report.enriched + report.plain;
    let sample_records: u64 = report.sample.iter().map(|body| records_in(body).0).sum();
    let gzip = common::gzip_seconds(&report.sample);
    println!(
        "otlp_throughput ({}): {CONTAINERS} containers x {mib} MiB = {records} CRI records, exported with gzip, {}",
        if grpc { "grpc" } else { "http/protobuf" },
        shipped.summary(records, k8s, &report.sample, sample_records, gzip)
    );
    drop(report);
    if let Some(binary) = otelcol {
        run_collector(Path::new(&binary), dir.path(), &pods, &http_port, received, records);
    }
    drop(child);
}

/// The collector goes when the benchmark does, panics included.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Records the receiver has decoded so far.
fn count(port: &str) -> u64 {
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    stream.write_all(b"GET /count HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply.rsplit("\r\n\r\n").next().unwrap().trim().parse().unwrap()
}

/// Runs the collector on the same files until the receiver has `records` more, and reports
/// its CPU time and peak RSS.
fn run_collector(binary: &Path, dir: &Path, pods: &Path, port: &str, before: u64, records: u64) {
    let config = dir.join("otelcol.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  filelog:\n    include: [{pods}/*/*/*.log]\n    start_at: beginning\n    include_file_path: true\n    operators:\n      - type: container\n        format: containerd\nexporters:\n  otlphttp:\n    endpoint: http://127.0.0.1:{port}\n    compression: gzip\n    sending_queue:\n      enabled: false\nprocessors:\n  batch:\nservice:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    logs:\n      receivers: [filelog]\n      processors: [batch]\n      exporters: [otlphttp]\n",
            pods = pods.display(),
        ),
    )
    .unwrap();
    let start = Instant::now();
    let log_path = dir.join("otelcol.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut collector = KillOnDrop(Command::new(binary).arg("--config").arg(&config).stdout(Stdio::null()).stderr(log).spawn().unwrap());
    let pid = collector.0.id();
    let (mut cpu, mut peak) = (0.0, 0.0);
    let deadline = start + Duration::from_secs(600);
    while count(port) < before + records {
        if Instant::now() > deadline || collector.0.try_wait().unwrap().is_some() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("the collector did not export the backlog ({} of {records}):\n{log}", count(port) - before);
        }
        (cpu, peak) = proc_usage(pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    (cpu, peak) = {
        let (c, p) = proc_usage(pid);
        (f64::max(c, cpu), f64::max(p, peak))
    };
    let wall = start.elapsed().as_secs_f64();
    drop(collector);
    println!(
        "otelcol-contrib (filelog + container operator -> otlphttp gzip), same backlog: {:.0} records/CPU-s, {:.0} records/s wall, CPU {cpu:.2} s, wall {wall:.2} s, peak RSS {peak:.1} MiB",
        records as f64 / cpu,
        records as f64 / wall,
    );
}

/// A process's user+system CPU seconds and peak RSS (MiB), from `/proc`.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name: state is field 0, utime 11, stime 12.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    (cpu, peak)
}

/// An OTLP receiver (HTTP on the first port printed, gRPC on the second) that decodes every
/// request in full, counts its log records with and without the pods' metadata, and answers
/// success; `GET /count` says how many records in all. Beside it the API server double (its
/// kubeconfig printed third).
fn receiver() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let (_api, kubeconfig) = common::serve_pods();
    let received = Arc::new(Seen::default());
    received.answer_reports();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{} {} {}", http.local_addr().unwrap().port(), grpc.local_addr().unwrap().port(), kubeconfig.display());
        std::io::stdout().flush().unwrap();
        tokio::spawn(grpc_receiver(grpc, received.clone()));
        loop {
            let (stream, _) = http.accept().await.unwrap();
            let received = received.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let received = received.clone();
                    async move {
                        if req.method() == hyper::Method::GET {
                            let n = received.records().to_string();
                            return Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(n))));
                        }
                        let protobuf = req.headers().get("content-type").is_some_and(|v| v == "application/x-protobuf");
                        let gzip = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
                        let raw = req.into_body().collect().await?.to_bytes();
                        received.later(move |seen| {
                            assert!(protobuf, "an OTLP/HTTP request is application/x-protobuf");
                            let mut body = Vec::new();
                            if gzip {
                                flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut body).unwrap();
                            } else {
                                body.extend_from_slice(&raw);
                            }
                            counted(seen, &body);
                        });
                        let reply = hyper::Response::builder()
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(Bytes::from(ExportLogsServiceResponse::default().encode_to_vec())))
                            .unwrap();
                        Ok(reply)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
}

/// The log records of a request: all of them, and those whose resource carries the pods'
/// labels and the application they name.
fn records_in(body: &[u8]) -> (u64, u64) {
    let request = ExportLogsServiceRequest::decode(body).expect("a valid ExportLogsServiceRequest");
    let (mut total, mut enriched) = (0, 0);
    for resource_logs in &request.resource_logs {
        let records: u64 = resource_logs.scope_logs.iter().map(|s| s.log_records.len() as u64).sum();
        total += records;
        if resource_logs
            .resource
            .as_ref()
            .is_some_and(|r| attribute(r, "k8s.pod.label.app") == Some(APP) && attribute(r, "service.name") == Some(APP))
        {
            enriched += records;
        }
    }
    (total, enriched)
}

fn attribute<'a>(resource: &'a Resource, key: &str) -> Option<&'a str> {
    match resource.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// Counts the records of a request and keeps it for the sample.
fn counted(seen: &Seen, body: &[u8]) {
    let (total, enriched) = records_in(body);
    seen.count(enriched, total - enriched);
    seen.keep(body);
}

/// The gRPC side: one `LogsService/Export` method over HTTP/2, gzip or not, framed by hand
/// (a 5-byte prefix per message), answering an empty response with `grpc-status: 0`.
async fn grpc_receiver(listener: tokio::net::TcpListener, received: Arc<Seen>) {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let received = received.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let received = received.clone();
                async move {
                    let gzip = req.headers().get("grpc-encoding").is_some_and(|v| v == "gzip");
                    let raw = req.into_body().collect().await?.to_bytes();
                    received.later(move |seen| {
                        let (compressed, len) = (raw[0] == 1, u32::from_be_bytes(raw[1..5].try_into().unwrap()) as usize);
                        assert_eq!(raw.len(), 5 + len, "one message, its length as framed");
                        let message = &raw[5..];
                        let mut body = Vec::new();
                        if compressed {
                            assert!(gzip, "a compressed message needs grpc-encoding");
                            flate2::read::GzDecoder::new(message).read_to_end(&mut body).unwrap();
                        } else {
                            body.extend_from_slice(message);
                        }
                        counted(seen, &body);
                    });
                    let mut framed = vec![0u8, 0, 0, 0, 0];
                    let reply = ExportLogsServiceResponse::default().encode_to_vec();
                    framed[1..5].copy_from_slice(&(reply.len() as u32).to_be_bytes());
                    framed.extend_from_slice(&reply);
                    let body = Full::new(Bytes::from(framed))
                        .map_err(|never: std::convert::Infallible| -> hyper::Error { match never {} })
                        .with_trailers(async {
                            let mut trailers = hyper::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            Some(Ok::<_, hyper::Error>(trailers))
                        });
                    Ok::<_, hyper::Error>(hyper::Response::builder().header("content-type", "application/grpc").body(body).unwrap())
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
