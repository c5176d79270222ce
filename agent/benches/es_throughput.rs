//! Ships a backlog to a fast local `_bulk` endpoint through the real pipeline and the real
//! Elasticsearch sink (gzip bodies, deterministic ids), each record enriched with its pod's
//! metadata from a Kubernetes API as on a node (ten labels, an owner, an IP; `--no-k8s`: from
//! the log paths only), and reports the agent's records per CPU-second, the gzip floor on
//! the same documents and the ratio of the two, peak RSS and settled RSS.
//!
//! The endpoint runs in a child process (this binary again, in its endpoint role) so its CPU
//! and memory are not counted, and so does the API server double. The endpoint parses every
//! document and counts those carrying the pods' labels and application (`service.name` from
//! their app label): the benchmark fails unless all of them do (with `--no-k8s`, none). It
//! keeps the first 64 MiB of request bodies, decompressed and whole; the gzip floor is what
//! this process spends compressing them again, request by request, at level 1 (`flate2`,
//! `Compression::fast()`; the median of three passes), the least any shipper of these
//! documents with gzip spends.
//!
//! `cargo bench --bench es_throughput -- 64` ships 8 × 64 MiB; `-- 16 --no-k8s` 8 × 16 MiB
//! without the API.

use std::borrow::Cow;
use std::io::{Read, Write};

mod common;

use common::{Endpoint, APP, CONTAINERS, ROLE};
use nodelens::config::Config;

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("bulk-endpoint") {
        return endpoint();
    }
    // As the agent does before any thread starts.
    nodelens::memory::limit_arenas();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(64);
    let k8s = !args.iter().any(|a| a == "--no-k8s");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Endpoint::spawn("bulk-endpoint", dir.path());
    let (port, kubeconfig) = (child.fields[0].clone(), child.fields[1].clone());

    let pods = dir.path().join("pods");
    let records = common::generate_backlog(&pods, mib << 20);
    let mut config = Config::default();
    // The machine's own journal and kernel ring stay out of the measurement.
    config.node_logs.journald.enabled = nodelens::config::Switch::Off;
    config.node_logs.kernel.enabled = nodelens::config::Switch::Off;
    config.logs.pods_dir = pods;
    config.state_dir = dir.path().join("state");
    config.sinks.elasticsearch.endpoints = vec![format!("http://127.0.0.1:{port}")];
    common::use_kubernetes(&mut config, k8s.then_some(kubeconfig.as_str()));
    let shipped = common::ship(&config, "elasticsearch", records);
    let report = child.report();
    drop(child);
    report.check(records, k8s);
    // Each document follows its action line.
    let sample_records = report.sample.iter().map(|body| memchr::memchr_iter(b'\n', body).count() as u64 / 2).sum::<u64>();
    let gzip = common::gzip_seconds(&report.sample);
    println!(
        "es_throughput: {CONTAINERS} containers x {mib} MiB = {records} CRI records, shipped with gzip and deterministic ids, {}",
        shipped.summary(records, k8s, &report.sample, sample_records, gzip)
    );
}

/// The parts of a document that show its pod's metadata came from the API.
#[derive(serde::Deserialize)]
struct Doc<'a> {
    #[serde(borrow)]
    service: Option<Service<'a>>,
    #[serde(borrow)]
    kubernetes: Option<Kubernetes<'a>>,
}

#[derive(serde::Deserialize)]
struct Service<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct Kubernetes<'a> {
    #[serde(borrow)]
    labels: Option<Labels<'a>>,
}

#[derive(serde::Deserialize)]
struct Labels<'a> {
    #[serde(borrow)]
    app: Option<Cow<'a, str>>,
}

/// Whether a document carries its pod's labels and the application they name.
fn enriched(doc: &[u8]) -> bool {
    let doc: Doc = serde_json::from_slice(doc).expect("a JSON document");
    let labelled = doc.kubernetes.and_then(|k| k.labels).and_then(|l| l.app).is_some_and(|app| app == APP);
    labelled && doc.service.is_some_and(|s| s.name == APP)
}

/// A `_bulk` endpoint that checks what it must (newline-terminated NDJSON, gzip), counts the
/// documents with and without the pods' metadata, and answers at once that every item was
/// created; beside it the API server double.
fn endpoint() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let (_api, kubeconfig) = common::serve_pods();
    let seen = std::sync::Arc::new(common::Seen::default());
    seen.answer_reports();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{} {}", listener.local_addr().unwrap().port(), kubeconfig.display());
        std::io::stdout().flush().unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let gzip = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
                        let raw = req.into_body().collect().await?.to_bytes();
                        let mut body = Vec::new();
                        if gzip {
                            flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut body).unwrap();
                        } else {
                            body.extend_from_slice(&raw);
                        }
                        assert!(body.ends_with(b"\n"), "bulk body must end with a newline");
                        let docs = body.split(|b| *b == b'\n').skip(1).step_by(2).filter(|d| !d.is_empty());
                        let (total, with) = docs.fold((0, 0), |(total, with), doc| (total + 1, with + u64::from(enriched(doc))));
                        seen.count(with, total - with);
                        seen.keep(&body);
                        // What Elasticsearch answers under the sink's `filter_path`: a status per item.
                        let mut reply = Vec::with_capacity(32 + total as usize * 26);
                        reply.extend_from_slice(br#"{"errors":false,"items":["#);
                        for i in 0..total {
                            reply.extend_from_slice(if i == 0 {
                                &br#"{"create":{"status":201}}"#[..]
                            } else {
                                &br#",{"create":{"status":201}}"#[..]
                            });
                        }
                        reply.extend_from_slice(b"]}");
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(reply))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
}
