//! The log pipeline, wired one way: tailer thread → encoder thread → sinks → committer.
//!
//! The tailer reads and decodes; the encoder enriches, counts and encodes ECS documents; each
//! sink delivers and acknowledges; the committer advances checkpoints in read order. Bounded
//! channels between stages and the tailer's in-flight byte limit keep memory flat however
//! large the backlog on disk.

pub mod counts;
mod encoder;
pub mod events;
pub mod runs;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use self::counts::CountFamilies;
use self::encoder::Encoder;
use crate::config::{Config, Settings, Switch};
use crate::kube::store::PodStore;
use crate::kube::Names;
use crate::logs::ack::{AckMsg, CheckpointMetrics, Committer, Registrations};
use crate::logs::assemble::MultilineRule;
use crate::logs::budget::ReadBudget;
use crate::logs::checkpoint::Checkpoints;
use crate::logs::container::StepLimits;
use crate::logs::derived::{Derived, DerivedFamilies};
use crate::logs::enrich::Enricher;
use crate::logs::tailer::{Tailer, TailerMetrics, TailerSettings};
use crate::logs::wake::Wake;
use crate::node_logs::{self, Feed, NodeLogs};
use crate::sinks::{self, Batch, Formats, SinkMetrics};

/// Chunks between the tailer and the encoder.
const CHUNK_QUEUE: usize = 8;
/// Batches queued for each sink.
const BATCH_QUEUE: usize = 4;

/// The log pipeline's metric handles.
#[derive(Clone, Default)]
pub struct LogMetrics {
    /// Records and bytes read, per application.
    pub counts: CountFamilies,
    /// Tailer gauges and the lost-bytes counter.
    pub tailer: TailerMetrics,
    /// Log-derived metrics.
    pub derived: DerivedFamilies,
    /// Checkpoint write failures and the last success.
    pub checkpoints: CheckpointMetrics,
    /// The node's own logs: XIDs per container, kernel records lost.
    pub node: crate::node_logs::NodeLogMetrics,
}

type SinkTask = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type StartFn = Box<dyn FnOnce(mpsc::Receiver<Arc<Batch>>, mpsc::Sender<AckMsg>, Arc<ReadBudget>) -> SinkTask + Send>;

/// Makes one sink task: it takes batches in read order and acknowledges each, and may look at
/// the read-ahead budget (while reading is held, a request waits for nothing more). The
/// pipeline runs (and owns) the task.
pub struct SinkStarter {
    formats: Formats,
    start: StartFn,
}

impl SinkStarter {
    /// A sink that reads `formats` of each batch, made by `start`.
    pub fn new<F, T>(formats: Formats, start: F) -> SinkStarter
    where
        F: FnOnce(mpsc::Receiver<Arc<Batch>>, mpsc::Sender<AckMsg>, Arc<ReadBudget>) -> T + Send + 'static,
        T: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        SinkStarter { formats, start: Box::new(move |rx, acks, budget| Box::pin(start(rx, acks, budget))) }
    }
}

/// The sinks the config asks for; fails when one cannot be set up (an unreadable CA file).
pub fn configured_sinks(config: &Config, metrics: &SinkMetrics) -> anyhow::Result<Vec<SinkStarter>> {
    let mut sinks = Vec::new();
    let es = &config.sinks.elasticsearch;
    if !es.endpoints.is_empty() {
        let client = sinks::elasticsearch::client::Client::new(es)?;
        let (es, m) = (es.clone(), metrics.clone());
        let formats = Formats { bulk: Some(es.compression), ..Formats::default() };
        sinks.push(SinkStarter::new(formats, move |rx, acks, budget| sinks::elasticsearch::run(es, client, rx, acks, budget, m)));
    }
    let otlp = &config.sinks.otlp;
    if !otlp.endpoint.is_empty() {
        let exporter = crate::otlp::Exporter::new(&sinks::otlp::settings(otlp), crate::otlp::Signal::Logs)?;
        let (otlp, m) = (otlp.clone(), metrics.clone());
        let formats = Formats { otlp: Some(otlp.compression), ..Formats::default() };
        sinks.push(SinkStarter::new(formats, move |rx, acks, budget| sinks::otlp::run(otlp, exporter, rx, acks, budget, m)));
    }
    // Under `auto`, stdout takes container logs, not a metrics-only agent's node logs.
    if config.stdout_enabled() && (config.logs.enabled || config.sinks.stdout.enabled == Switch::On) {
        let m = metrics.clone();
        let formats = Formats { ecs: true, ..Formats::default() };
        sinks.push(SinkStarter::new(formats, move |rx, acks, _| async move {
            sinks::stdout::run(tokio::io::stdout(), rx, acks, m).await.context("stdout sink")
        }));
    }
    Ok(sinks)
}

/// A running log pipeline.
pub struct LogPipeline {
    checkpoints: Arc<Checkpoints>,
    wake: Arc<Wake>,
    /// None with `logs.enabled: false` (node logs only).
    tailer: Option<JoinHandle<()>>,
    /// Without a tailer, the encoder's input, closed at stop.
    idle_chunks: Option<mpsc::Sender<crate::logs::chunk::Chunk>>,
    encoder: JoinHandle<()>,
    /// The sink tasks; one ending before `stop` is a failure.
    sinks: JoinSet<anyhow::Result<()>>,
    committer: tokio::task::JoinHandle<()>,
    node_logs: NodeLogs,
    /// The sinks' inputs for GPU run reports, until [`LogPipeline::deliver_runs`] takes them.
    runs_feed: Option<Feed>,
    /// The thread delivering GPU run reports.
    runs: Option<JoinHandle<()>>,
    runs_stop: Arc<AtomicBool>,
    /// The sinks' inputs for Kubernetes Events, until [`LogPipeline::deliver_events`] takes them.
    events_feed: Option<Feed>,
    /// The task delivering Kubernetes Events, and its stop signal.
    events: Option<(tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>,
}

impl LogPipeline {
    /// Starts every stage, delivering to `sinks`: container logs when `logs.enabled`, and the
    /// node's logs `node_logs` turns on (their XIDs naming GPUs through `gpus`). Must be
    /// called within a tokio runtime.
    pub fn start(
        config: &Settings,
        checkpoints: Arc<Checkpoints>,
        metrics: &LogMetrics,
        pods: Option<Arc<PodStore>>,
        sinks: Vec<SinkStarter>,
        gpus: crate::host::pci::GpuBusIds,
    ) -> anyhow::Result<LogPipeline> {
        anyhow::ensure!(!sinks.is_empty() || !config.logs.enabled, "no sink configured");
        let logs = &config.logs;
        let settings = TailerSettings {
            pods_dir: logs.pods_dir.clone(),
            containers_dir: logs.containers_dir.clone(),
            exclude_namespaces: config.exclude_namespaces.clone(),
            own_pod_uid: crate::identity::cgroup::own_pod_uid(&config.host.proc_root),
            limits: StepLimits {
                max_line_bytes: logs.max_line_bytes,
                partial_timeout: logs.partial_timeout,
                max_records: 2048,
                max_bytes: 256 * 1024,
            },
            rescan_interval: logs.rescan_interval,
            rate_limit: logs.rate_limit.records_per_second,
            metadata_wait: config.kubernetes.metadata_wait,
            max_open_files: crate::logs::tailer::max_open_files(logs.max_open_files, crate::process::max_fds()),
            multiline: config
                .multiline
                .iter()
                .map(|rule| (rule.app.clone(), Arc::new(MultilineRule { start: rule.start.clone(), timeout: rule.timeout })))
                .collect(),
        };
        let budget = Arc::new(ReadBudget::new(logs.max_inflight_bytes));
        let wake = Arc::new(Wake::default());
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNK_QUEUE);
        let (ack_tx, ack_rx) = mpsc::channel(4096);
        let registered = Registrations::default();

        let formats = sinks.iter().fold(Formats::default(), |all, s| all.and(s.formats));
        let mut sink_tasks = JoinSet::new();
        let sink_txs: Vec<_> = sinks
            .into_iter()
            .map(|sink| {
                let (tx, rx) = mpsc::channel(BATCH_QUEUE);
                sink_tasks.spawn((sink.start)(rx, ack_tx.clone(), budget.clone()));
                tx
            })
            .collect();

        let committer = tokio::spawn(Committer::new(checkpoints.clone(), budget.clone(), metrics.checkpoints.clone()).run(
            ack_rx,
            registered.clone(),
            Duration::from_secs(1),
        ));
        let (tailer, idle_chunks) = if logs.enabled {
            let tailer =
                Tailer::new(settings, checkpoints.clone(), budget.clone(), chunk_tx, wake.clone(), metrics.tailer.clone(), pods.clone());
            (Some(std::thread::Builder::new().name("tailer".into()).spawn(move || tailer.run())?), None)
        } else {
            (None, Some(chunk_tx))
        };
        let enricher = Enricher::new(config.node_name.clone(), config.cluster_name.clone());
        let derived = Derived::new(&config.log_metrics, metrics.derived.clone());
        let mut encoder = Encoder::new(enricher, pods.clone(), logs, formats, metrics.counts.clone(), derived, Instant::now());
        if !config.sinks.elasticsearch.endpoints.is_empty() {
            encoder.set_data_streams(crate::sinks::elasticsearch::stream::DataStreams::new(&config.sinks.elasticsearch.data_stream));
        }
        // The node's logs go to every sink, numbered with the containers' batches.
        let feed = {
            let (seq, acks, txs) = (encoder.sequence(), ack_tx.clone(), sink_txs.clone());
            let es = &config.sinks.elasticsearch;
            let (index, node, cluster): (Arc<str>, _, _) =
                (es.node_data_stream.as_str().into(), config.node_name.clone(), config.cluster_name.clone());
            move || Feed {
                formats,
                seq: seq.clone(),
                sinks: txs.clone(),
                acks: acks.clone(),
                index: index.clone(),
                node: node.clone(),
                cluster: cluster.clone(),
            }
        };
        let runs_feed = Feed { index: config.sinks.elasticsearch.gpu_runs_data_stream.as_str().into(), ..feed() };
        let events_feed = Feed { index: config.sinks.elasticsearch.events_data_stream.as_str().into(), ..feed() };
        let names = Names { pods_dir: logs.pods_dir.clone(), containers_dir: logs.containers_dir.clone(), pods };
        let context = node_logs::Context {
            config: config.config().clone(),
            checkpoints: checkpoints.clone(),
            names,
            metrics: metrics.node.clone(),
            gpus,
            stop: Default::default(),
        };
        let node_logs = NodeLogs::start(context, feed)?;
        let encoder = std::thread::Builder::new()
            .name("encoder".into())
            .spawn(move || encoder.run(chunk_rx, sink_txs, ack_tx, registered, budget))?;
        Ok(LogPipeline {
            checkpoints,
            wake,
            tailer,
            idle_chunks,
            encoder,
            sinks: sink_tasks,
            committer,
            node_logs,
            runs_feed: Some(runs_feed),
            runs: None,
            runs_stop: Arc::default(),
            events_feed: Some(events_feed),
            events: None,
        })
    }

    /// Delivers the GPU run reports that arrive on `reports` to every sink.
    pub fn deliver_runs(&mut self, reports: std::sync::mpsc::Receiver<crate::gpu::runs::Delivery>) -> anyhow::Result<()> {
        let Some(feed) = self.runs_feed.take() else { return Ok(()) };
        let stop = self.runs_stop.clone();
        self.runs = Some(std::thread::Builder::new().name("gpu-runs".into()).spawn(move || runs::run(feed, reports, stop))?);
        Ok(())
    }

    /// Delivers the Kubernetes Event records sent to the returned channel to every sink (once;
    /// `None` after the first call).
    pub fn deliver_events(&mut self) -> Option<mpsc::Sender<crate::events::EventRecord>> {
        let feed = self.events_feed.take()?;
        let (tx, rx) = mpsc::channel(crate::events::QUEUE);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        self.events = Some((tokio::spawn(events::run(feed, rx, stopped)), stop));
        Some(tx)
    }

    /// Resolves when a sink ends (with its error or panic); pending forever while all run.
    /// Cancel-safe.
    pub async fn failure(&mut self) -> anyhow::Error {
        match self.sinks.join_next().await {
            None => std::future::pending().await,
            Some(Ok(Err(e))) => e.context("a sink failed"),
            Some(Ok(Ok(()))) => anyhow::anyhow!("a sink stopped"),
            Some(Err(e)) => anyhow::anyhow!("a sink {}", crate::tasks::join_error(e)),
        }
    }

    /// Stops reading, lets the stages drain what was read, and writes the checkpoints.
    pub async fn stop(self, grace: Duration) {
        let checkpoints = self.checkpoints.clone();
        self.wake.shutdown();
        self.node_logs.stop();
        self.runs_stop.store(true, Ordering::Release);
        drop(self.runs_feed);
        drop(self.events_feed);
        drop(self.idle_chunks);
        let events = self.events.map(|(task, stop)| {
            let _ = stop.send(());
            task
        });
        let drain = async {
            if let Some(events) = events {
                let _ = events.await;
            }
            let (node_logs, runs) = (self.node_logs, self.runs);
            let threads = tokio::task::spawn_blocking(move || {
                if let Some(runs) = runs {
                    let _ = runs.join();
                }
                if let Some(tailer) = self.tailer {
                    let _ = tailer.join();
                }
                let _ = self.encoder.join();
                node_logs.join();
            });
            let _ = threads.await;
            let mut sinks = self.sinks;
            while let Some(sink) = sinks.join_next().await {
                match sink {
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "sink failed while draining"),
                    Err(e) => tracing::error!(cause = %crate::tasks::join_error(e), "sink failed while draining"),
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
