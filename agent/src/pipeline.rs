//! The log pipeline, wired one way: tailer thread → encoder thread → sinks → committer.
//!
//! The tailer reads and decodes; the encoder enriches, counts and encodes ECS documents; each
//! sink delivers and acknowledges; the committer advances checkpoints in read order. Bounded
//! channels between stages and the tailer's in-flight byte limit keep memory flat however
//! large the backlog on disk.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::{Config, LogsConfig};
use crate::kube::meta::PodMeta;
use crate::kube::store::PodStore;
use crate::logs::ack::{AckMsg, Committer};
use crate::logs::assemble::MultilineRule;
use crate::logs::checkpoint::Checkpoints;
use crate::logs::chunk::{Chunk, Flags, StreamKind};
use crate::logs::container::StepLimits;
use crate::logs::derived::{Derived, DerivedFamilies, PodLabels};
use crate::logs::enrich::Enricher;
use crate::logs::fingerprint::Format;
use crate::logs::level::{self, Level};
use crate::logs::path::ContainerRef;
use crate::logs::tailer::{Tailer, TailerSettings};
use crate::logs::wake::Wake;
use crate::metrics::{AppLabels, FlagLabels, LogMetrics, Metrics, RecordLabels};
use crate::sinks::ecs::{self, Documents, Template};
use crate::sinks::{self, Batch};

/// Chunks between the tailer and the encoder.
const CHUNK_QUEUE: usize = 8;
/// Batches queued for each sink.
const BATCH_QUEUE: usize = 4;

/// Starts one sink task: it takes batches in read order and acknowledges each.
pub type SinkStarter =
    Box<dyn FnOnce(mpsc::Receiver<Arc<Batch>>, mpsc::Sender<AckMsg>) -> tokio::task::JoinHandle<anyhow::Result<()>> + Send>;

/// The sinks the config asks for; fails when one cannot be set up (an unreadable CA file).
pub fn configured_sinks(config: &Config, metrics: &Metrics) -> anyhow::Result<Vec<SinkStarter>> {
    let mut sinks: Vec<SinkStarter> = Vec::new();
    let es = &config.sinks.elasticsearch;
    if !es.endpoints.is_empty() {
        let client = sinks::elasticsearch::client::Client::new(es)?;
        let (es, m) = (es.clone(), metrics.sinks.clone());
        sinks.push(Box::new(move |rx, acks| tokio::spawn(sinks::elasticsearch::run(es, client, rx, acks, m))));
    }
    if config.stdout_enabled() {
        let m = metrics.sinks.clone();
        sinks.push(Box::new(move |rx, acks| {
            tokio::spawn(async move { sinks::stdout::run(tokio::io::stdout(), rx, acks, m).await.context("stdout sink") })
        }));
    }
    Ok(sinks)
}

/// A running log pipeline.
pub struct LogPipeline {
    checkpoints: Arc<Checkpoints>,
    wake: Arc<Wake>,
    tailer: JoinHandle<()>,
    encoder: JoinHandle<()>,
    sinks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    committer: tokio::task::JoinHandle<()>,
}

impl LogPipeline {
    /// Starts every stage, delivering to `sinks`. Must be called within a tokio runtime.
    pub fn start(
        config: &Config,
        checkpoints: Arc<Checkpoints>,
        metrics: &Metrics,
        pods: Option<Arc<PodStore>>,
        sinks: Vec<SinkStarter>,
    ) -> anyhow::Result<LogPipeline> {
        anyhow::ensure!(!sinks.is_empty(), "no sink configured");
        let logs = &config.logs;
        let mut exclude = globset::GlobSetBuilder::new();
        for glob in &logs.exclude_namespaces {
            exclude.add(globset::Glob::new(glob)?);
        }
        let settings = TailerSettings {
            pods_dir: logs.pods_dir.clone(),
            containers_dir: logs.containers_dir.clone(),
            exclude_namespaces: exclude.build()?,
            limits: StepLimits {
                max_line_bytes: logs.max_line_bytes,
                partial_timeout: logs.partial_timeout,
                max_records: 2048,
                max_bytes: 256 * 1024,
            },
            rescan_interval: logs.rescan_interval,
            max_inflight_bytes: logs.max_inflight_bytes,
            multiline: logs
                .multiline
                .iter()
                .map(|rule| {
                    let glob = globset::Glob::new(&rule.app)?.compile_matcher();
                    let start = regex::bytes::Regex::new(&rule.start_pattern)?;
                    Ok((glob, Arc::new(MultilineRule { start, timeout: rule.timeout })))
                })
                .collect::<anyhow::Result<_>>()?,
        };
        let inflight = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Wake::default());
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNK_QUEUE);
        let (ack_tx, ack_rx) = mpsc::channel(4096);

        let (sink_txs, sinks): (Vec<_>, Vec<_>) = sinks
            .into_iter()
            .map(|start| {
                let (tx, rx) = mpsc::channel(BATCH_QUEUE);
                (tx, start(rx, ack_tx.clone()))
            })
            .unzip();

        let committer = tokio::spawn(Committer::new(checkpoints.clone(), inflight.clone()).run(ack_rx, Duration::from_secs(1)));
        let tailer =
            Tailer::new(settings, checkpoints.clone(), inflight, chunk_tx, wake.clone(), metrics.logs.tailer.clone(), pods.clone());
        let tailer = std::thread::Builder::new().name("tailer".into()).spawn(move || tailer.run())?;
        let enricher = Enricher::new(config.node_name.clone(), config.cluster_name.clone());
        let mut encoder = Encoder::new(enricher, pods, logs, metrics.logs.clone(), metrics.logs.derived.clone());
        let encoder = std::thread::Builder::new().name("encoder".into()).spawn(move || encoder.run(chunk_rx, sink_txs, ack_tx))?;
        Ok(LogPipeline { checkpoints, wake, tailer, encoder, sinks, committer })
    }

    /// Resolves when a sink fails (returns its error); pending forever while all run.
    pub async fn failure(&mut self) -> anyhow::Error {
        loop {
            let Some(i) = self.sinks.iter().position(|s| s.is_finished()) else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            return match self.sinks.remove(i).await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => anyhow::anyhow!("a sink stopped"),
                Err(e) => anyhow::anyhow!("a sink panicked: {e}"),
            };
        }
    }

    /// Stops reading, lets the stages drain what was read, and writes the checkpoints.
    pub async fn stop(self, grace: Duration) {
        let checkpoints = self.checkpoints.clone();
        self.wake.shutdown();
        let drain = async {
            let threads = tokio::task::spawn_blocking(move || {
                let _ = self.tailer.join();
                let _ = self.encoder.join();
            });
            let _ = threads.await;
            for sink in self.sinks {
                match sink.await {
                    Ok(Err(e)) => tracing::error!(error = %e, "sink failed while draining"),
                    Err(e) => tracing::error!(error = %e, "sink panicked while draining"),
                    Ok(Ok(())) => {}
                }
            }
            let _ = self.committer.await;
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(?grace, "pipeline did not drain in time; unacknowledged records will be read again on start");
        }
        // What was acknowledged before the deadline is kept, whether or not the drain finished.
        if let Err(e) = tokio::task::spawn_blocking(move || checkpoints.persist()).await.unwrap_or(Ok(())) {
            tracing::error!(error = %e, "cannot write checkpoints at shutdown");
        }
    }
}

/// How long the encoder waits, once per container, for the watch to report a pod it has not
/// seen yet (a container can log before the watch event arrives).
const POD_WAIT: Duration = Duration::from_secs(1);

/// The encoder stage: metadata, counters and ECS documents for each chunk.
struct Encoder {
    enricher: Enricher,
    pods: Option<Arc<PodStore>>,
    /// Where pod directories are, to tell gone pods without the API.
    pods_dir: PathBuf,
    /// How often log-derived series are checked for pods that are gone (the rescan period).
    sweep_every: Duration,
    metrics: LogMetrics,
    derived: Derived,
    templates: HashMap<ContainerRef, CachedTemplate>,
    seq: u64,
    last_prune: Instant,
    last_sweep: Instant,
}

struct CachedTemplate {
    /// The pod metadata the template was rendered from; a new one re-renders it.
    pod: Option<Arc<PodMeta>>,
    template: Arc<Template>,
    labels: AppLabels,
    excluded: bool,
    /// The log-metric rules of the container's application, and the labels they add.
    rules: Vec<usize>,
    pod_labels: PodLabels,
    used: Instant,
}

const TEMPLATE_IDLE: Duration = Duration::from_secs(600);

impl Encoder {
    fn new(enricher: Enricher, pods: Option<Arc<PodStore>>, logs: &LogsConfig, metrics: LogMetrics, derived: DerivedFamilies) -> Encoder {
        let now = Instant::now();
        Encoder {
            enricher,
            pods,
            pods_dir: logs.pods_dir.clone(),
            sweep_every: logs.rescan_interval,
            metrics,
            derived: Derived::new(&logs.log_metrics, derived),
            templates: HashMap::new(),
            seq: 0,
            last_prune: now,
            last_sweep: now,
        }
    }

    fn run(&mut self, mut chunks: mpsc::Receiver<Chunk>, sinks: Vec<mpsc::Sender<Arc<Batch>>>, acks: mpsc::Sender<AckMsg>) {
        while let Some(chunk) = chunks.blocking_recv() {
            let batch = Arc::new(self.encode(&chunk));
            let targets = if batch.docs.is_empty() { 0 } else { sinks.len() as u32 };
            let register = AckMsg::Register {
                seq: batch.seq,
                file: batch.file,
                path: chunk.source.path.clone(),
                offset: chunk.commit_offset,
                read_bytes: chunk.read_bytes,
                sinks: targets,
            };
            if acks.blocking_send(register).is_err() {
                return;
            }
            if targets > 0 && sinks.iter().any(|sink| sink.blocking_send(batch.clone()).is_err()) {
                tracing::error!("a sink is gone; stopping the encoder");
                return;
            }
        }
    }

    fn encode(&mut self, chunk: &Chunk) -> Batch {
        let now = Instant::now();
        if now.duration_since(self.last_prune) > TEMPLATE_IDLE {
            self.templates.retain(|_, t| now.duration_since(t.used) < TEMPLATE_IDLE);
            self.last_prune = now;
        }
        if !self.derived.is_empty() && now.duration_since(self.last_sweep) > self.sweep_every {
            self.sweep_derived();
            self.last_sweep = now;
        }
        let info = &chunk.source.container;
        let known = self.templates.get(&info.reference).map(|t| t.pod.clone());
        let pod = self.pods.as_ref().and_then(|store| match &known {
            // Seen before: whatever the store says now, without waiting.
            Some(_) => store.get(&info.reference.pod_uid),
            None => store.wait_for(&info.reference.pod_uid, POD_WAIT),
        });
        let stale = known.is_none_or(|k| !same_pod(&k, &pod));
        if stale {
            let meta = self.enricher.metadata(info, chunk.source.format == Format::Docker, pod.as_deref());
            let excluded = pod.as_ref().is_some_and(|p| p.excludes(&info.reference.container))
                || self.pods.as_ref().is_some_and(|s| s.namespace_excluded(&info.reference.namespace));
            if excluded {
                tracing::info!(namespace = %meta.namespace, pod = %meta.pod, container = %meta.container, "logs excluded by annotation");
            }
            let pod_labels = PodLabels {
                namespace: meta.namespace.clone(),
                pod: meta.pod.clone(),
                uid: meta.pod_uid.clone(),
                app: meta.app.clone(),
                user: meta.user.clone(),
            };
            let cached = CachedTemplate {
                pod,
                template: Arc::new(Template::new(&meta)),
                rules: self.derived.rules_for(&meta.app),
                labels: AppLabels { namespace: meta.namespace, app: meta.app },
                pod_labels,
                excluded,
                used: now,
            };
            self.templates.insert(info.reference.clone(), cached);
        }
        let cached = self.templates.get_mut(&info.reference).expect("inserted above");
        cached.used = now;
        let mut docs = Documents::default();
        if !cached.excluded {
            let levels: Vec<Option<Level>> = chunk.records.iter().map(|r| level::detect(chunk.message(r))).collect();
            ecs::encode_chunk(chunk, &cached.template, &levels, &mut docs);
            count(&self.metrics, &cached.labels, chunk, &levels);
            if !cached.rules.is_empty() {
                for record in &chunk.records {
                    self.derived.observe(&cached.rules, &cached.pod_labels, chunk.message(record));
                }
            }
        }
        let batch = Batch { seq: self.seq, file: chunk.source.id, docs };
        self.seq += 1;
        batch
    }
}

impl Encoder {
    /// Removes log-derived series of pods that are gone: deleted from the API (after the
    /// store's grace), or, without the API, whose log directory is gone.
    fn sweep_derived(&mut self) {
        let alive: std::collections::HashSet<String> = self
            .templates
            .keys()
            .filter(|r| match &self.pods {
                Some(store) => store.get(&r.pod_uid).is_some(),
                None => self.pods_dir.join(format!("{}_{}_{}", r.namespace, r.pod, r.pod_uid)).exists(),
            })
            .map(|r| r.pod_uid.clone())
            .collect();
        self.derived.retain_pods(|uid| alive.contains(uid));
    }
}

fn same_pod(a: &Option<Arc<PodMeta>>, b: &Option<Arc<PodMeta>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn count(metrics: &LogMetrics, labels: &AppLabels, chunk: &Chunk, levels: &[Option<Level>]) {
    if chunk.records.is_empty() {
        return;
    }
    // [stream][level or unknown]
    let mut records = [[0u64; Level::ALL.len() + 1]; 2];
    let mut bytes = 0u64;
    let mut flagged = [0u64; 3];
    for (record, level) in chunk.records.iter().zip(levels) {
        let stream = usize::from(record.stream == StreamKind::Stderr);
        let level = level.map_or(Level::ALL.len(), |l| Level::ALL.iter().position(|x| *x == l).expect("listed"));
        records[stream][level] += 1;
        bytes += u64::from(record.message.end - record.message.start);
        for (i, flag) in [Flags::TRUNCATED, Flags::PARTIAL, Flags::MALFORMED].into_iter().enumerate() {
            flagged[i] += u64::from(record.flags.contains(flag));
        }
    }
    for (stream, per_level) in ["stdout", "stderr"].into_iter().zip(records) {
        for (i, n) in per_level.into_iter().enumerate() {
            if n > 0 {
                let level = Level::ALL.get(i).map_or("unknown", |l| l.as_str());
                let key = RecordLabels { namespace: labels.namespace.clone(), app: labels.app.clone(), stream, level };
                metrics.records.get_or_create(&key).inc_by(n);
            }
        }
    }
    metrics.bytes.get_or_create(labels).inc_by(bytes);
    for (flag, n) in ["truncated", "partial", "malformed"].into_iter().zip(flagged) {
        if n > 0 {
            metrics.flagged.get_or_create(&FlagLabels { flag }).inc_by(n);
        }
    }
}
