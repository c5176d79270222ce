//! The log pipeline, wired one way: tailer thread → encoder thread → sinks → committer.
//!
//! The tailer reads and decodes; the encoder enriches, counts and encodes ECS documents; each
//! sink delivers and acknowledges; the committer advances checkpoints in read order. Bounded
//! channels between stages and the tailer's in-flight byte limit keep memory flat however
//! large the backlog on disk.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::logs::ack::{AckMsg, Committer};
use crate::logs::checkpoint::Checkpoints;
use crate::logs::chunk::{Chunk, Flags, StreamKind};
use crate::logs::container::StepLimits;
use crate::logs::enrich::Enricher;
use crate::logs::fingerprint::Format;
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
        let tailer = Tailer::new(settings, checkpoints.clone(), inflight, chunk_tx, wake.clone(), metrics.logs.tailer.clone());
        let tailer = std::thread::Builder::new().name("tailer".into()).spawn(move || tailer.run())?;
        let mut encoder = Encoder::new(Enricher::new(config.node_name.clone(), config.cluster_name.clone()), metrics.logs.clone());
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

/// The encoder stage: metadata, counters and ECS documents for each chunk.
struct Encoder {
    enricher: Enricher,
    metrics: LogMetrics,
    templates: HashMap<ContainerRef, CachedTemplate>,
    seq: u64,
    last_prune: Instant,
}

struct CachedTemplate {
    template: Arc<Template>,
    labels: AppLabels,
    used: Instant,
}

const TEMPLATE_IDLE: Duration = Duration::from_secs(600);

impl Encoder {
    fn new(enricher: Enricher, metrics: LogMetrics) -> Encoder {
        Encoder { enricher, metrics, templates: HashMap::new(), seq: 0, last_prune: Instant::now() }
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

    /// Encodes one chunk; public to the crate for the throughput benchmark.
    fn encode(&mut self, chunk: &Chunk) -> Batch {
        let now = Instant::now();
        if now.duration_since(self.last_prune) > TEMPLATE_IDLE {
            self.templates.retain(|_, t| now.duration_since(t.used) < TEMPLATE_IDLE);
            self.last_prune = now;
        }
        let info = &chunk.source.container;
        let cached = self.templates.entry(info.reference.clone()).or_insert_with(|| {
            let meta = self.enricher.metadata(info, chunk.source.format == Format::Docker);
            CachedTemplate {
                template: Arc::new(Template::new(&meta)),
                labels: AppLabels { namespace: meta.namespace, app: meta.app },
                used: now,
            }
        });
        cached.used = now;
        let mut docs = Documents::default();
        ecs::encode_chunk(chunk, &cached.template, &mut docs);
        count(&self.metrics, &cached.labels, chunk);
        let batch = Batch { seq: self.seq, file: chunk.source.id, docs };
        self.seq += 1;
        batch
    }
}

fn count(metrics: &LogMetrics, labels: &AppLabels, chunk: &Chunk) {
    if chunk.records.is_empty() {
        return;
    }
    let (mut stdout, mut stderr, mut bytes) = (0u64, 0u64, 0u64);
    let mut flagged = [0u64; 3];
    for record in &chunk.records {
        match record.stream {
            StreamKind::Stdout => stdout += 1,
            StreamKind::Stderr => stderr += 1,
        }
        bytes += u64::from(record.message.end - record.message.start);
        for (i, flag) in [Flags::TRUNCATED, Flags::PARTIAL, Flags::MALFORMED].into_iter().enumerate() {
            flagged[i] += u64::from(record.flags.contains(flag));
        }
    }
    for (stream, n) in [("stdout", stdout), ("stderr", stderr)] {
        if n > 0 {
            let key = RecordLabels { namespace: labels.namespace.clone(), app: labels.app.clone(), stream, level: "unknown" };
            metrics.records.get_or_create(&key).inc_by(n);
        }
    }
    metrics.bytes.get_or_create(labels).inc_by(bytes);
    for (flag, n) in ["truncated", "partial", "malformed"].into_iter().zip(flagged) {
        if n > 0 {
            metrics.flagged.get_or_create(&FlagLabels { flag }).inc_by(n);
        }
    }
}
