//! The agent: start every part, wait for a signal or a failure, stop in order.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::broadcast;

use crate::certs;
use crate::config::{Config, Settings, Switch};
use crate::host::shm_metrics;
use crate::identity::path;
use crate::kube::meta::PodMeta;
use crate::kube::Names;
use crate::kube::{self, store::PodStore};
use crate::logs::checkpoint::Checkpoints;
use crate::otlp;
use crate::pipeline::{self, LogPipeline};
use crate::server::{self, Health};
use crate::shutdown::Shutdown;
use crate::tasks::Tasks;

pub mod metrics;

pub use self::metrics::Metrics;

/// How long the pipeline may take to drain at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long the other tasks may take to stop after it (the last metrics push).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for the Events task to stop shipping and release the Lease.
const EVENTS_RELEASE_GRACE: Duration = Duration::from_secs(5);

/// The async runtime the agent runs on, for the binary and for the benchmarks that run the
/// pipeline in process: two worker threads.
///
/// What takes CPU steadily has a thread of its own (tailer, encoder, NVML, journal and kernel
/// readers, GPU runs) or goes to the blocking pool (checkpoints, the metrics' encoding,
/// requests put together from many small pieces, Events encoded, long `_bulk` replies read
/// unless all created), but bursts still run on the workers: a list of many pods or Events is
/// decoded on them, page by page. One worker measured a fifth fewer context switches at full
/// speed and 0–5 % less CPU, but during such a burst the probes, the Lease and the sinks would
/// wait behind it; the second worker serves them.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
}

/// Runs the agent until `stop` resolves (a signal) or a part fails.
pub async fn run(config: Settings, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new(&config.node_name));
    let health = Arc::new(Health::default());
    let (shutdown_tx, _) = broadcast::channel(1);

    let listener = server::bind(config.metrics.listen).await.with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
    let limits = server::Limits::default();
    // Every task is owned here: one that ends before shutdown fails /healthz with its cause.
    let mut tasks = Tasks::default();
    tasks.spawn(
        "metrics endpoint",
        until_shutdown(server::serve(listener, metrics.exposition.clone(), health.clone(), limits, Shutdown::new(shutdown_tx.subscribe()))),
    );
    tasks.spawn("memory trim", until_shutdown(crate::memory::run(Shutdown::new(shutdown_tx.subscribe()))));

    let client = kube::connect(&config.kubernetes).await?;
    let pods = match client.clone() {
        Some(client) => {
            let store = Arc::new(PodStore::new(config.app_keys.clone(), config.user_keys.clone(), metrics.pod_info.clone()));
            let pods_dir = config.logs.pods_dir.clone();
            let keep_deleted = Arc::new(move |pod: &PodMeta| path::pod_dir(&pods_dir, &pod.namespace, &pod.name, &pod.uid).exists());
            let shutdown = || Shutdown::new(shutdown_tx.subscribe());
            let up = metrics.kube_watch_up.clone();
            kube::start(&mut tasks, client, config.node_name.clone(), store.clone(), &config.kubernetes, keep_deleted, up, shutdown);
            tracing::info!(node = %config.node_name, "watching this node's pods");
            Some(store)
        }
        None => None,
    };

    if !config.certificates.paths.is_empty() {
        let (paths, interval) = (config.certificates.paths.clone(), config.certificates.interval);
        tasks.spawn(
            "certificate check",
            until_shutdown(certs::run(paths, interval, metrics.certs.clone(), Shutdown::new(shutdown_tx.subscribe()))),
        );
    }

    let names = Names { pods_dir: config.logs.pods_dir.clone(), containers_dir: config.logs.containers_dir.clone(), pods: pods.clone() };
    if config.host.proc_root.is_dir() {
        let sources = shm_metrics::Sources { proc_root: config.host.proc_root.clone(), names: names.clone() };
        tasks.spawn(
            "shm sizes",
            until_shutdown(shm_metrics::run(
                sources,
                config.host.scan_interval,
                metrics.shm.clone(),
                Shutdown::new(shutdown_tx.subscribe()),
            )),
        );
    }

    let gpu_bus_ids = crate::host::pci::GpuBusIds::default();
    // GPUs before the log pipeline: the XIDs it replays from the kernel's ring buffer at start
    // get their GPU labels. Run reports wait for the pipeline (see below).
    let run_reports = Arc::new(std::sync::OnceLock::new());
    let runs = crate::gpu::RunsContext {
        gauges: metrics.logs.derived.by_pod.clone(),
        seconds: metrics.gpu_run_seconds.clone(),
        dropped: metrics.gpu_run_reports_dropped.clone(),
        out: run_reports.clone(),
    };
    crate::gpu::start(&config, names, metrics.gpu.clone(), gpu_bus_ids.clone(), runs, &mut tasks, Shutdown::new(shutdown_tx.subscribe()))
        .await?;

    let push = &config.metrics.otlp;
    if !push.endpoint.is_empty() {
        let exporter = otlp::Exporter::new(&otlp::metrics::settings(push), otlp::Signal::Metrics)?;
        let origin = otlp::metrics::Origin { node: config.node_name.clone(), cluster: config.cluster_name.clone() };
        let shutdown = Shutdown::new(shutdown_tx.subscribe());
        tracing::info!(endpoint = %crate::config::redact_url(&push.endpoint), interval = ?push.interval, "pushing metrics over OTLP");
        let push =
            otlp::metrics::run(push.interval, exporter, metrics.exposition.clone(), metrics.sinks.pushed_points.clone(), origin, shutdown);
        tasks.spawn("OTLP metrics push", until_shutdown(push));
    }

    // The pipeline (checkpoints, sinks) runs for container logs, node logs, or both: the node
    // logs' XID metric is wanted on a metrics-only agent too.
    let node_logs = config.node_logs.journald.enabled != Switch::Off || config.node_logs.kernel.enabled != Switch::Off;
    let mut pipeline = if config.logs.enabled {
        let checkpoints = Arc::new(open_checkpoints(&config, &health, &metrics.logs.checkpoints.lock_waiting).await?);
        let sinks = pipeline::configured_sinks(&config, &metrics.sinks)?;
        let pipeline = LogPipeline::start(&config, checkpoints, &metrics.logs, pods.clone(), sinks, gpu_bus_ids.clone())?;
        tracing::info!(pods_dir = %config.logs.pods_dir.display(), node = %config.node_name, "tailing container logs");
        Some(pipeline)
    } else if node_logs {
        // Without container logs a state_dir that cannot be opened (a metrics-only install
        // without one) turns node logs off, not the agent.
        let started = async {
            let checkpoints = Arc::new(open_checkpoints(&config, &health, &metrics.logs.checkpoints.lock_waiting).await?);
            let sinks = pipeline::configured_sinks(&config, &metrics.sinks)?;
            LogPipeline::start(&config, checkpoints, &metrics.logs, pods.clone(), sinks, gpu_bus_ids.clone())
        };
        match started.await {
            Ok(pipeline) => Some(pipeline),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "node logs off: their checkpoints or sinks cannot be set up");
                None
            }
        }
    } else {
        None
    };
    // After the pipeline, which holds state_dir's lock: an agent handing the node over has
    // written its GPU run state by then, and runs are read from it only now. Without a log
    // pipeline no sink takes reports: they are only counted.
    let out = match pipeline.as_mut() {
        Some(pipeline) => {
            let (out, out_rx) = crate::gpu::runs::channel();
            pipeline.deliver_runs(out_rx)?;
            Some(out)
        }
        None => None,
    };
    let _ = run_reports.set(out);
    // The Events task's own stop, and word that it released the Lease.
    let mut events_stop: Option<(broadcast::Sender<()>, tokio::sync::oneshot::Receiver<()>)> = None;
    if let Some(identity) = config.events.clone() {
        match (client, pods.clone(), pipeline.as_mut().and_then(|p| p.deliver_events())) {
            (Some(client), Some(store), Some(out)) => {
                tracing::info!(lease = %identity.lease, namespace = %identity.namespace, holder = %identity.holder, "taking part in the Events election");
                let context = crate::events::Context {
                    client,
                    identity,
                    store,
                    node: config.node_name.clone(),
                    request_timeout: config.kubernetes.request_timeout,
                    exclude_namespaces: config.exclude_namespaces.clone(),
                    out,
                    metrics: metrics.events.clone(),
                };
                // Stopped before the pipeline drains: the Lease is released at once, not after
                // the drain, and the next agent's leadership starts as this one's shipping ends.
                let (stop_tx, stop) = broadcast::channel(1);
                let (done, released) = tokio::sync::oneshot::channel();
                events_stop = Some((stop_tx, released));
                tasks.spawn(
                    "Kubernetes Events",
                    until_shutdown(async move {
                        crate::events::run(context, Shutdown::new(stop)).await;
                        let _ = done.send(());
                    }),
                );
            }
            (None, ..) => tracing::warn!("kubernetes.events.enabled, but no Kubernetes API: Events are not shipped"),
            _ => tracing::warn!("kubernetes.events.enabled, but no log pipeline runs: Events are not shipped"),
        }
    }
    health.ready.store(true, Ordering::Release);

    let failure = async {
        match pipeline.as_mut() {
            Some(p) => p.failure().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        _ = stop => Ok(()),
        err = failure => {
            health.fail(format!("{err:#}"));
            Err(err)
        }
        never = record_deaths(&mut tasks, &health) => match never {},
    };
    tracing::info!("shutting down");
    if let Some((stop, released)) = events_stop.take() {
        let _ = stop.send(());
        if tokio::time::timeout(EVENTS_RELEASE_GRACE, released).await.is_err() {
            tracing::warn!("the Events Lease was not released in time; the next agent takes over once it expires");
        }
    }
    if let Some(pipeline) = pipeline {
        pipeline.stop(DRAIN_GRACE).await;
    }
    let _ = shutdown_tx.send(());
    // The metrics push's last push carries the final counts; a receiver that is away does
    // not hold up the exit.
    tasks.stop(STOP_GRACE).await;
    result
}

/// A task meant to run until shutdown, as a task of [`Tasks`].
async fn until_shutdown(task: impl Future<Output = ()>) -> anyhow::Result<()> {
    task.await;
    Ok(())
}

/// Logs each task that dies, with its cause, and fails `/healthz` naming it. The agent goes
/// on (its logs keep flowing) until the kubelet's liveness probe restarts it.
async fn record_deaths(tasks: &mut Tasks, health: &Health) -> std::convert::Infallible {
    loop {
        let death = tasks.death().await;
        tracing::error!(task = death.task, cause = %death.cause, "a part of the agent died; /healthz fails until the agent is restarted");
        health.fail(death.to_string());
    }
}

/// Opens `state_dir`. Only the built-in default falls back to a per-user directory, so a
/// plain `nodelens` runs on a laptop without root. While another agent holds its lock, the
/// wait shows in `/readyz` and in `waiting` (1).
async fn open_checkpoints(config: &Config, health: &Health, waiting: &Gauge) -> anyhow::Result<Checkpoints> {
    let default = Config::default().state_dir;
    let started = tokio::time::Instant::now();
    let mut warned = false;
    let opened = loop {
        match Checkpoints::open(&config.state_dir) {
            Err(e) if e.source.kind() == std::io::ErrorKind::WouldBlock => {
                // The pod this one replaces on the node is still shutting down: wait, not ready.
                waiting.set(1);
                health.wait_for(Some(format!("another agent to release the lock on state_dir {}", config.state_dir.display())));
                // Once, and again every minute, so a wait that never ends is not a single line.
                let waited = started.elapsed();
                if !warned || waited.as_secs() % 60 == 0 {
                    tracing::warn!(error = %e, waited = ?Duration::from_secs(waited.as_secs()), "waiting for the other agent to release state_dir");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => break other,
        }
    };
    if warned {
        tracing::info!(waited = ?started.elapsed(), "state_dir released by the other agent");
    }
    waiting.set(0);
    health.wait_for(None);
    match opened {
        Ok(c) => Ok(c),
        Err(e) if config.state_dir == default && e.source.kind() == std::io::ErrorKind::PermissionDenied => {
            let home = std::env::var_os("HOME").map(PathBuf::from).context("no HOME for a fallback state_dir")?;
            let fallback = home.join(".local/state/nodelens");
            tracing::warn!(error = %e, fallback = %fallback.display(), "default state_dir not writable; using a per-user one");
            Ok(Checkpoints::open(&fallback)?)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_held_state_dir_lock_shows_in_readyz_and_a_gauge_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { state_dir: dir.path().join("state"), ..Config::default() };
        let other_agent = Checkpoints::open(&config.state_dir).unwrap();
        let (health, waiting) = (Arc::new(Health::default()), Gauge::default());
        let opening = {
            let (config, health, waiting) = (config.clone(), health.clone(), waiting.clone());
            tokio::spawn(async move { open_checkpoints(&config, &health, &waiting).await })
        };

        tokio::time::sleep(Duration::from_secs(90)).await;
        assert!(!opening.is_finished(), "still waiting for the lock");
        assert_eq!(waiting.get(), 1);
        let (status, body) = health.readyz();
        assert_eq!(status, hyper::StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("release the lock on state_dir") && body.contains("state"), "{body}");

        drop(other_agent);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(opening.await.unwrap().is_ok());
        assert_eq!(waiting.get(), 0, "no longer waiting");
        assert_eq!(health.readyz().1, "starting\n", "the reason is gone once the lock is taken");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_dies_fails_healthz_naming_it_and_its_cause() {
        let health = Health::default();
        let mut tasks = Tasks::default();
        tasks.spawn("metrics endpoint", until_shutdown(std::future::pending()));
        tasks.spawn("shm sizes", async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            panic!("a mount line the parser did not expect")
        });
        tasks.spawn("pod watch", until_shutdown(tokio::time::sleep(Duration::from_secs(60))));
        let recording = tokio::time::timeout(Duration::from_secs(10), record_deaths(&mut tasks, &health)).await;
        assert!(recording.is_err());
        assert_eq!(health.healthz().0, hyper::StatusCode::OK, "healthy while every task runs");

        let _ = tokio::time::timeout(Duration::from_secs(120), record_deaths(&mut tasks, &health)).await;
        let (status, body) = health.healthz();
        assert_eq!(status, hyper::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "failed: task shm sizes ended: panicked: a mount line the parser did not expect\nfailed: task pod watch ended: it returned\n"
        );
    }
}
