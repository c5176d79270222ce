//! What the benchmarks share: a backlog generator, the process's CPU time and RSS, the
//! pipeline run (with the pods' metadata from a Kubernetes API, as on a node), and for the
//! shipping benchmarks the endpoint child: the API server double and what the endpoint saw
//! (records with and without the pods' metadata, a sample of request bodies for the gzip
//! floor).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodelens::agent::Metrics;
use nodelens::config::{Config, Switch};
use nodelens::kube::meta::PodMeta;
use nodelens::kube::store::PodStore;
use nodelens::logs::checkpoint::Checkpoints;
use nodelens::pipeline::{self, LogPipeline};
use nodelens::shutdown::Shutdown;
use nodelens::sinks::SinkOutcomeLabels;
use nodelens::tasks::Tasks;
use serde_json::json;

/// Containers in a generated backlog, one per pod.
pub const CONTAINERS: usize = 8;
/// The pods' namespace.
pub const NAMESPACE: &str = "bench";
/// Their container.
pub const CONTAINER: &str = "worker";
/// Their application: the value of their `app.kubernetes.io/name` and `app` labels, which
/// differs from what a pod's path alone gives (`train-N`).
pub const APP: &str = "llama-pretrain";
/// The node they run on, the agent's.
pub const NODE: &str = "bench-node";
/// Labels per pod.
pub const LABELS: usize = 10;

/// Pod `c`'s name.
pub fn pod_name(c: usize) -> String {
    format!("train-{c}")
}

/// Pod `c`'s uid.
pub fn pod_uid(c: usize) -> String {
    format!("0000000{c}-7d9f-4b6c-9d5e-0123456789ab")
}

/// Writes `bytes` of CRI records per container (training-log lines of varied length) under
/// `pods`, and returns how many records that is.
pub fn generate_backlog(pods: &Path, bytes: u64) -> u64 {
    generate_backlog_with(pods, bytes, false)
}

/// As [`generate_backlog`]; with `half_json`, every other record is a structured JSON line
/// (level, msg, a trace id and the training fields as keys).
pub fn generate_backlog_with(pods: &Path, bytes: u64, half_json: bool) -> u64 {
    let mut total = 0;
    for c in 0..CONTAINERS {
        let dir = pods.join(format!("{NAMESPACE}_{}_{}", pod_name(c), pod_uid(c))).join(CONTAINER);
        std::fs::create_dir_all(&dir).unwrap();
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join("0.log")).unwrap());
        let (mut written, mut i) = (0u64, 0u64);
        while written < bytes {
            let line = if half_json && i % 2 == 1 {
                format!(
                    "2026-11-22T03:{:02}:{:02}.{:09}Z stdout F {{\"level\":\"info\",\"msg\":\"step done\",\"rank\":{c},\"step\":{i},\"loss\":{:.4},\"lr\":0.0003,\"throughput\":{},\"trace_id\":\"{:032x}\",\"span_id\":\"{:016x}\",\"detail\":\"{}\"}}\n",
                    (i / 60_000) % 60,
                    (i / 1000) % 60,
                    i % 1_000_000_000,
                    1.0 / (1.0 + i as f64),
                    1000 + i % 977,
                    0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128 ^ u128::from(i),
                    0x00f0_67aa_0ba9_02b7u64 ^ i,
                    &"detail ".repeat((i % 13) as usize)
                )
            } else {
                format!(
                "2026-11-22T03:{:02}:{:02}.{:09}Z {} F rank={c} step={i} loss={:.4} lr=0.0003 throughput={} samples/s gpu_mem={}MiB {}\n",
                (i / 60_000) % 60,
                (i / 1000) % 60,
                i % 1_000_000_000,
                if i % 10 == 0 { "stderr" } else { "stdout" },
                1.0 / (1.0 + i as f64),
                1000 + i % 977,
                30_000 + i % 4096,
                &"detail ".repeat((i % 13) as usize)
                )
            };
            out.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            i += 1;
        }
        out.flush().unwrap();
        total += i;
    }
    total
}

/// CPU seconds of this process, all threads.
pub fn cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU seconds of the calling thread alone (what else of the process still runs, a runtime
/// winding down, is not counted).
pub fn thread_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The CPU clock `clock`, to the nanosecond: `getrusage` counts in scheduler ticks on some
/// kernels, 4 ms steps that are a tenth of a pass over the floor's sample.
fn clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec it is given.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut now) }, 0, "clock_gettime");
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// Peak RSS of this process's own address space. (`getrusage`'s `ru_maxrss` also counts
/// the image the process replaced at exec, which was a copy of its parent: cargo.)
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") / 1024.0
}

/// Current RSS.
pub fn current_rss_mib() -> f64 {
    status_kib("VmRSS:") / 1024.0
}

fn status_kib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

/// What [`ship`] measured.
pub struct Shipped {
    /// CPU-seconds from the pipeline's start until the last record was delivered.
    pub cpu: f64,
    /// Wall seconds over the same span.
    pub wall: f64,
    /// Peak RSS (MiB) when the last record was delivered.
    pub peak_rss: f64,
    /// RSS (MiB) 2 s after the last record was delivered, the pipeline idle.
    pub settled_rss: f64,
    /// Requests the sinks sent and timed until then.
    pub requests: u64,
}

impl Shipped {
    /// What the shipping benchmarks print after their sink's name: the metadata, the agent's
    /// records/CPU-s against the gzip floor on `sample` (holding `sample_records` records,
    /// compressed in `gzip` CPU-seconds), wall time and memory.
    pub fn summary(&self, records: u64, k8s: bool, sample: &[Vec<u8>], sample_records: u64, gzip: f64) -> String {
        let metadata = if k8s {
            format!("with pod metadata from the API ({LABELS} labels)")
        } else {
            "with metadata from paths only (--no-k8s)".to_string()
        };
        let (agent, floor) = (records as f64 / self.cpu, sample_records as f64 / gzip);
        let sample_mib = sample.iter().map(Vec::len).sum::<usize>() as f64 / f64::from(1 << 20);
        format!(
            "{metadata}: {agent:.0} records/CPU-s, gzip floor {floor:.0} records/CPU-s (level 1, {sample_records} of the records, {sample_mib:.1} MiB), ratio {:.2}, {:.0} records/s wall, CPU {:.2} s, wall {:.2} s, {} requests, peak RSS {:.1} MiB, settled RSS {:.1} MiB",
            agent / floor,
            records as f64 / self.wall,
            self.cpu,
            self.wall,
            self.requests,
            self.peak_rss,
            self.settled_rss,
        )
    }
}

/// Runs the real pipeline with the sinks `config` asks for until `sink` has delivered
/// `records`. When `config` enables Kubernetes, the pods' metadata comes from the API as in
/// the agent (a pod store fed by the node's pod watch, the pod list in before the pipeline
/// starts, so no record waits for it); neither the watch's start nor its list is measured.
pub fn ship(config: &Config, sink: &'static str, records: u64) -> Shipped {
    let config = &config.clone().validate().unwrap();
    // The agent's own runtime, as the binary runs it.
    let runtime = nodelens::agent::runtime().unwrap();
    runtime.block_on(async {
        let metrics = Metrics::new(&config.node_name);
        let (shutdown_tx, _) = tokio::sync::broadcast::channel(1);
        let mut tasks = Tasks::default();
        let pods = match nodelens::kube::connect(&config.kubernetes).await.unwrap() {
            Some(client) => {
                let store = Arc::new(PodStore::new(config.app_keys.clone(), config.user_keys.clone(), metrics.pod_info.clone()));
                let keep_deleted = Arc::new(|_: &PodMeta| true);
                let up = metrics.kube_watch_up.clone();
                let shutdown = || Shutdown::new(shutdown_tx.subscribe());
                nodelens::kube::start(
                    &mut tasks,
                    client,
                    config.node_name.clone(),
                    store.clone(),
                    &config.kubernetes,
                    keep_deleted,
                    up,
                    shutdown,
                );
                let deadline = Instant::now() + Duration::from_secs(30);
                while !(store.is_synced() && store.len() >= CONTAINERS) {
                    assert!(Instant::now() < deadline, "the pod watch listed {} of the {CONTAINERS} pods in 30 s", store.len());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Some(store)
            }
            None => None,
        };
        let checkpoints = Arc::new(Checkpoints::open(&config.state_dir).unwrap());
        let delivered = metrics.sinks.records.get_or_create(&SinkOutcomeLabels { sink, outcome: "delivered" }).clone();
        let start_cpu = cpu_seconds();
        let start = Instant::now();
        let sinks = pipeline::configured_sinks(config, &metrics.sinks).unwrap();
        let pipeline = LogPipeline::start(config, checkpoints, &metrics.logs, pods, sinks, Default::default()).unwrap();
        // Far beyond any run (10,000 records a second at least, ten minutes at least): a
        // pipeline that stopped delivering fails the benchmark rather than hanging it.
        let allowed = Duration::from_secs((records / 10_000).max(600));
        while delivered.get() < records {
            assert!(start.elapsed() < allowed, "{} of {records} records delivered in {allowed:?}", delivered.get());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (cpu, wall) = (cpu_seconds() - start_cpu, start.elapsed().as_secs_f64());
        let requests = requests_sent(&metrics.sinks);
        let peak_rss = peak_rss_mib();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let settled_rss = current_rss_mib();
        pipeline.stop(Duration::from_secs(5)).await;
        let _ = shutdown_tx.send(());
        tasks.stop(Duration::from_secs(5)).await;
        Shipped { cpu, wall, peak_rss, settled_rss, requests }
    })
}

/// Requests the sinks timed, read as a scrape reads them (the histogram's `_count`).
fn requests_sent(sinks: &nodelens::sinks::SinkMetrics) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("requests", "Sink requests.", sinks.request_duration.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines().filter(|l| l.starts_with("requests_count")).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

/// Points `config` at the pods' node and, with `kubeconfig`, at the API server serving them
/// (else Kubernetes is off: metadata from the log paths only).
pub fn use_kubernetes(config: &mut Config, kubeconfig: Option<&str>) {
    config.node_name = NODE.into();
    match kubeconfig {
        Some(path) => {
            config.kubernetes.enabled = Switch::On;
            config.kubernetes.kubeconfig = path.into();
        }
        None => config.kubernetes.enabled = Switch::Off,
    }
}

/// The variable naming a child's role.
pub const ROLE: &str = "NODELENS_BENCH_ROLE";
/// The variable naming the benchmark's directory, for a child.
const DIR: &str = "NODELENS_BENCH_DIR";
/// Request bodies the endpoint keeps for the gzip floor: the first ones, whole, up to this.
pub const SAMPLE_CAP: usize = 64 << 20;

/// In the endpoint child: starts the API server double with the benchmark's pods (as the API
/// server returns them: ten labels, three annotations, an owner, an IP, a running `worker`
/// container, on [`NODE`]) and their namespace, and writes a kubeconfig for it into the
/// benchmark's directory. Returns the server (it serves until dropped) and the kubeconfig's
/// path.
pub fn serve_pods() -> (nodelens_testkit::kubernetes::FakeApiServer, PathBuf) {
    use nodelens_testkit::kubernetes::{namespace, pod_with_ids, FakeApiServer};
    let api = FakeApiServer::start();
    api.apply(namespace(NAMESPACE, json!({"kubernetes.io/metadata.name": NAMESPACE, "team": "ml-platform"}), json!({})));
    for c in 0..CONTAINERS {
        let hash = "7d9f8b6c5d";
        let labels = json!({
            "app": APP,
            "app.kubernetes.io/name": APP,
            "app.kubernetes.io/instance": "llama-pretrain-run-42",
            "app.kubernetes.io/component": "trainer",
            "app.kubernetes.io/version": "2.4.1",
            "app.kubernetes.io/part-of": "foundation-models",
            "app.kubernetes.io/managed-by": "helm",
            "team": "ml-platform",
            "training.example.com/rank": c.to_string(),
            "pod-template-hash": hash,
        });
        assert_eq!(labels.as_object().unwrap().len(), LABELS);
        let id = format!("{:016x}", 0x5e1f_9a3b_c0d2_7e41u64 ^ c as u64).repeat(4);
        let mut pod = pod_with_ids(NAMESPACE, &pod_name(c), &pod_uid(c), NODE, labels, &[(CONTAINER, &id)]);
        pod["metadata"]["annotations"] = json!({
            "kubectl.kubernetes.io/default-container": CONTAINER,
            "kubesphere.io/creator": "alice",
            "prometheus.io/scrape": "true",
        });
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{APP}-{hash}"),
            "uid": "9b2e4c1a-5d3f-4e6a-8b7c-0d1e2f3a4b5c", "controller": true, "blockOwnerDeletion": true,
        }]);
        pod["status"]["podIP"] = json!(format!("10.42.0.{}", 10 + c));
        api.apply(pod);
    }
    let kubeconfig = bench_dir().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    (api, kubeconfig)
}

/// In a child: the benchmark's directory.
pub fn bench_dir() -> PathBuf {
    std::env::var_os(DIR).expect("the benchmark's directory").into()
}

/// What the endpoint child has seen: records with and without the pods' metadata, and the
/// first request bodies (decompressed) up to [`SAMPLE_CAP`].
#[derive(Default)]
pub struct Seen {
    enriched: AtomicU64,
    plain: AtomicU64,
    sample: Mutex<(usize, Vec<Vec<u8>>)>,
    /// Requests kept as they came, to be decoded and counted when the counts are asked for.
    later: Mutex<Vec<Deferred>>,
}

type Deferred = Box<dyn FnOnce(&Seen) + Send>;

impl Seen {
    /// Puts `work` on a request (inflating, decoding and counting it) off until the counts are
    /// asked for: done as requests come, it competes with the agent for the machine's cores
    /// (decoding every record of an OTLP request costs more CPU than the agent spends making
    /// it), while the gzip floor is measured on a quiet machine.
    pub fn later(&self, work: impl FnOnce(&Seen) + Send + 'static) {
        self.later.lock().unwrap().push(Box::new(work));
    }

    /// Does the work put off, in the order the requests came; a request that fails its checks
    /// ends the endpoint, which fails the benchmark.
    fn settle(&self) {
        let work = std::mem::take(&mut *self.later.lock().unwrap());
        for w in work {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w(self))).is_err() {
                std::process::exit(1);
            }
        }
    }

    /// Counts the records of one request.
    pub fn count(&self, enriched: u64, plain: u64) {
        self.enriched.fetch_add(enriched, Ordering::AcqRel);
        self.plain.fetch_add(plain, Ordering::AcqRel);
    }

    /// Records seen so far.
    pub fn records(&self) -> u64 {
        self.settle();
        self.enriched.load(Ordering::Acquire) + self.plain.load(Ordering::Acquire)
    }

    /// Keeps `body` in the sample while it fits whole.
    pub fn keep(&self, body: &[u8]) {
        let mut sample = self.sample.lock().unwrap();
        if sample.0 + body.len() <= SAMPLE_CAP {
            sample.0 += body.len();
            sample.1.push(body.to_vec());
        }
    }

    /// Answers the parent ([`Endpoint::report`]) from a thread of its own: for each line on
    /// stdin, writes the sample into the benchmark's directory and prints the counts.
    pub fn answer_reports(self: &Arc<Self>) {
        let seen = self.clone();
        std::thread::spawn(move || {
            for _ in std::io::stdin().lock().lines().map_while(Result::ok) {
                seen.settle();
                let mut file = BufWriter::new(std::fs::File::create(bench_dir().join("sample")).unwrap());
                for body in &seen.sample.lock().unwrap().1 {
                    file.write_all(&(body.len() as u64).to_le_bytes()).unwrap();
                    file.write_all(body).unwrap();
                }
                file.flush().unwrap();
                let (enriched, plain) = (seen.enriched.load(Ordering::Acquire), seen.plain.load(Ordering::Acquire));
                println!("{enriched} {plain}");
                std::io::stdout().flush().unwrap();
            }
        });
    }
}

/// The endpoint child, seen from the benchmark; killed when dropped, panics included.
pub struct Endpoint {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
    /// What the child printed once it was listening, split at spaces.
    pub fields: Vec<String>,
}

/// What the endpoint had seen when asked.
pub struct Report {
    /// Records that carried the pods' metadata from the API.
    pub enriched: u64,
    /// Records that did not.
    pub plain: u64,
    /// The first request bodies, decompressed, whole, up to [`SAMPLE_CAP`].
    pub sample: Vec<Vec<u8>>,
}

impl Endpoint {
    /// Runs this benchmark's binary again in `role`, with `dir` as the benchmark's directory,
    /// and waits for its first line.
    pub fn spawn(role: &str, dir: &Path) -> Endpoint {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, role)
            .env(DIR, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        let mut endpoint = Endpoint { child, stdin, stdout: BufReader::new(stdout), dir: dir.to_path_buf(), fields: Vec::new() };
        endpoint.fields = endpoint.line().split_whitespace().map(str::to_string).collect();
        endpoint
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the endpoint child ended");
        line
    }

    /// What the endpoint has seen so far.
    pub fn report(&mut self) -> Report {
        self.stdin.write_all(b"report\n").unwrap();
        self.stdin.flush().unwrap();
        let line = self.line();
        let (enriched, plain) = line.trim().split_once(' ').unwrap();
        let mut bytes = Vec::new();
        std::fs::File::open(self.dir.join("sample")).unwrap().read_to_end(&mut bytes).unwrap();
        let (mut sample, mut rest) = (Vec::new(), &bytes[..]);
        while !rest.is_empty() {
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            sample.push(rest[8..8 + len].to_vec());
            rest = &rest[8 + len..];
        }
        Report { enriched: enriched.parse().unwrap(), plain: plain.parse().unwrap(), sample }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Report {
    /// Fails unless every one of the `records` shipped carried the pods' metadata (`k8s`), or
    /// none did: a benchmark that fell back to metadata from the paths must not pass for one
    /// that enriched.
    pub fn check(&self, records: u64, k8s: bool) {
        let (enriched, plain) = (self.enriched, self.plain);
        if k8s {
            assert!(plain == 0 && enriched >= records, "{plain} records without the pods' metadata, {enriched} with it, of {records}");
        } else {
            assert!(
                enriched == 0 && plain >= records,
                "{enriched} records with the pods' metadata (--no-k8s), {plain} without it, of {records}"
            );
        }
    }
}

/// CPU-seconds this thread takes to compress each of `bodies` on its own as gzip at level 1
/// (`Compression::fast()`, the workspace's flate2 backend): the least an agent that ships
/// these bytes compressed must spend. The median of five passes, so one disturbed pass does
/// not set the floor.
pub fn gzip_seconds(bodies: &[Vec<u8>]) -> f64 {
    use flate2::write::GzEncoder;
    use flate2::Compression;
    let mut passes = [0.0; 5].map(|_| {
        let start = thread_cpu_seconds();
        let mut compressed = 0;
        for body in bodies {
            let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), Compression::fast());
            encoder.write_all(body).unwrap();
            compressed += encoder.finish().unwrap().len();
        }
        std::hint::black_box(compressed);
        thread_cpu_seconds() - start
    });
    passes.sort_by(f64::total_cmp);
    passes[2]
}
