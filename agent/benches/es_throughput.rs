//! Ships a backlog to a fast local `_bulk` endpoint through the real pipeline and the real
//! Elasticsearch sink (gzip bodies, deterministic ids), and reports the agent's records per
//! CPU-second and peak RSS.
//!
//! The endpoint runs in a child process (this binary again, in its endpoint role) so its CPU
//! and memory are not counted. `cargo bench --bench es_throughput -- 64` ships 8 × 64 MiB.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodelens::config::Config;
use nodelens::logs::checkpoint::Checkpoints;
use nodelens::metrics::{Metrics, SinkOutcomeLabels};
use nodelens::pipeline::{self, LogPipeline};

const CONTAINERS: usize = 8;
const ROLE: &str = "NODELENS_BENCH_ROLE";

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("bulk-endpoint") {
        return endpoint();
    }
    let mib: u64 = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(64);
    let mut child = Command::new(std::env::current_exe().unwrap()).env(ROLE, "bulk-endpoint").stdout(Stdio::piped()).spawn().unwrap();
    let mut port = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut port).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("pods");
    let records = generate(&pods, mib << 20);
    let mut config = Config::default();
    config.logs.pods_dir = pods;
    config.state_dir = dir.path().join("state");
    config.sinks.elasticsearch.endpoints = vec![format!("http://127.0.0.1:{}", port.trim())];
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (cpu, wall) = runtime.block_on(async {
        let metrics = Metrics::new("bench");
        let checkpoints = Arc::new(Checkpoints::open(&config.state_dir).unwrap());
        let delivered = metrics.sinks.records.get_or_create(&SinkOutcomeLabels { sink: "elasticsearch", outcome: "delivered" }).clone();
        let start_cpu = cpu_seconds();
        let start = Instant::now();
        let sinks = pipeline::configured_sinks(&config, &metrics).unwrap();
        let pipeline = LogPipeline::start(&config, checkpoints, &metrics, None, sinks).unwrap();
        while delivered.get() < records {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let result = (cpu_seconds() - start_cpu, start.elapsed().as_secs_f64());
        pipeline.stop(Duration::from_secs(5)).await;
        result
    });
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "es_throughput: {CONTAINERS} containers x {mib} MiB = {records} CRI records shipped with gzip and deterministic ids: {:.0} records/CPU-s, {:.0} records/s wall, CPU {:.2} s, wall {:.2} s, peak RSS {:.1} MiB",
        records as f64 / cpu,
        records as f64 / wall,
        cpu,
        wall,
        peak_rss_mib()
    );
}

/// A `_bulk` endpoint that checks what it must (newline-terminated NDJSON, gzip) and answers
/// at once that every item was created.
fn endpoint() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let gzip = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
                    let raw = req.into_body().collect().await?.to_bytes();
                    let mut body = Vec::new();
                    if gzip {
                        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut body).unwrap();
                    } else {
                        body.extend_from_slice(&raw);
                    }
                    assert!(body.ends_with(b"\n"), "bulk body must end with a newline");
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from_static(br#"{"errors":false}"#))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
}

/// Writes `bytes` of CRI records per container.
fn generate(pods: &Path, bytes: u64) -> u64 {
    let mut total = 0;
    for c in 0..CONTAINERS {
        let dir = pods.join(format!("bench_train-{c}_uid-{c}")).join("worker");
        std::fs::create_dir_all(&dir).unwrap();
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join("0.log")).unwrap());
        let (mut written, mut i) = (0u64, 0u64);
        while written < bytes {
            let line = format!(
                "2026-11-22T03:{:02}:{:02}.{:09}Z {} F step={i} loss={:.4} lr=0.0003 throughput={} samples/s gpu_mem={}MiB {}\n",
                (i / 60_000) % 60,
                (i / 1000) % 60,
                i % 1_000_000_000,
                if i % 10 == 0 { "stderr" } else { "stdout" },
                1.0 / (1.0 + i as f64),
                1000 + i % 977,
                30_000 + i % 4096,
                &"detail ".repeat((i % 13) as usize)
            );
            out.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            i += 1;
        }
        out.flush().unwrap();
        total += i;
    }
    total
}

fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Peak RSS of this process's own address space. (`getrusage`'s `ru_maxrss` also counts
/// the image the process replaced at exec, which was a copy of its parent: cargo.)
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}
