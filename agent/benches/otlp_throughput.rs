//! Exports a backlog over OTLP/HTTP (protobuf, gzip) through the real pipeline and the real
//! OTLP sink to a receiver that decodes every request, and reports the agent's records per
//! CPU-second and peak RSS. `cargo bench --bench otlp_throughput -- 64` exports 8 × 64 MiB;
//! `-- grpc` uses OTLP/gRPC instead.
//!
//! With `--otelcol PATH` it also runs the OpenTelemetry Collector (contrib) on the same
//! backlog: the filelog receiver with the `container` operator, exporting with `otlphttp` to
//! the same receiver, and reports its CPU-seconds and peak RSS the same way, from `/proc`.
//!
//! The receiver runs in a child process (this binary again, in its receiver role) so its CPU
//! and memory are not counted.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::CONTAINERS;
use nodelens::config::{Config, OtlpProtocol};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use prost::Message;

const ROLE: &str = "NODELENS_BENCH_ROLE";

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("otlp-receiver") {
        return receiver();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(64);
    let grpc = args.iter().any(|a| a == "grpc");
    let otelcol = args.iter().position(|a| a == "--otelcol").and_then(|i| args.get(i + 1)).cloned();
    let mut child =
        KillOnDrop(Command::new(std::env::current_exe().unwrap()).env(ROLE, "otlp-receiver").stdout(Stdio::piped()).spawn().unwrap());
    let mut ports = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap()).read_line(&mut ports).unwrap();
    let (http_port, grpc_port) = ports.trim().split_once(' ').unwrap();
    let (http_port, grpc_port) = (http_port.to_string(), grpc_port.to_string());

    let dir = tempfile::tempdir().unwrap();
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
    let (cpu, wall) = common::ship(&config, "otlp", records);
    let received = count(&http_port);
    assert!(received >= records, "the receiver decoded {received} of {records} records");
    println!(
        "otlp_throughput ({}): {CONTAINERS} containers x {mib} MiB = {records} CRI records exported with gzip: {:.0} records/CPU-s, {:.0} records/s wall, CPU {:.2} s, wall {:.2} s, peak RSS {:.1} MiB",
        if grpc { "grpc" } else { "http/protobuf" },
        records as f64 / cpu,
        records as f64 / wall,
        cpu,
        wall,
        common::peak_rss_mib()
    );
    if let Some(binary) = otelcol {
        run_collector(Path::new(&binary), dir.path(), &pods, &http_port, received, records);
    }
    drop(child);
}

/// The receiver goes when the benchmark does, panics included.
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
/// request in full, counts its log records, and answers success; `GET /count` says how many.
fn receiver() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{} {}", http.local_addr().unwrap().port(), grpc.local_addr().unwrap().port());
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
                            let n = received.load(Ordering::Acquire).to_string();
                            return Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(n))));
                        }
                        assert_eq!(req.headers().get("content-type").unwrap(), "application/x-protobuf");
                        let gzip = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
                        let raw = req.into_body().collect().await?.to_bytes();
                        let mut body = Vec::new();
                        if gzip {
                            flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut body).unwrap();
                        } else {
                            body.extend_from_slice(&raw);
                        }
                        received.fetch_add(records_in(&body), Ordering::AcqRel);
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

fn records_in(body: &[u8]) -> u64 {
    let request = ExportLogsServiceRequest::decode(body).expect("a valid ExportLogsServiceRequest");
    request.resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len() as u64).sum()
}

/// The gRPC side: one `LogsService/Export` method over HTTP/2, gzip or not, framed by hand
/// (a 5-byte prefix per message), answering an empty response with `grpc-status: 0`.
async fn grpc_receiver(listener: tokio::net::TcpListener, received: Arc<AtomicU64>) {
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
                    let (compressed, len) = (raw[0] == 1, u32::from_be_bytes(raw[1..5].try_into().unwrap()) as usize);
                    let message = &raw[5..5 + len];
                    let mut body = Vec::new();
                    if compressed {
                        assert!(gzip, "a compressed message needs grpc-encoding");
                        flate2::read::GzDecoder::new(message).read_to_end(&mut body).unwrap();
                    } else {
                        body.extend_from_slice(message);
                    }
                    received.fetch_add(records_in(&body), Ordering::AcqRel);
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
