//! Ships a backlog to a fast local `_bulk` endpoint through the real pipeline and the real
//! Elasticsearch sink (gzip bodies, deterministic ids), and reports the agent's records per
//! CPU-second and peak RSS.
//!
//! The endpoint runs in a child process (this binary again, in its endpoint role) so its CPU
//! and memory are not counted. `cargo bench --bench es_throughput -- 64` ships 8 × 64 MiB.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

mod common;

use common::CONTAINERS;
use nodelens::config::Config;

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
    let records = common::generate_backlog(&pods, mib << 20);
    let mut config = Config::default();
    // The machine's own journal and kernel ring stay out of the measurement.
    config.node_logs.journald.enabled = nodelens::config::Switch::Off;
    config.node_logs.kernel.enabled = nodelens::config::Switch::Off;
    config.logs.pods_dir = pods;
    config.state_dir = dir.path().join("state");
    config.sinks.elasticsearch.endpoints = vec![format!("http://127.0.0.1:{}", port.trim())];
    let (cpu, wall) = common::ship(&config, "elasticsearch", records);
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "es_throughput: {CONTAINERS} containers x {mib} MiB = {records} CRI records shipped with gzip and deterministic ids: {:.0} records/CPU-s, {:.0} records/s wall, CPU {:.2} s, wall {:.2} s, peak RSS {:.1} MiB",
        records as f64 / cpu,
        records as f64 / wall,
        cpu,
        wall,
        common::peak_rss_mib()
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
