//! The agent: start every part, wait for a signal or a failure, stop in order.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
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

pub mod metrics;

pub use self::metrics::Metrics;

/// How long the pipeline may take to drain at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs the agent until `stop` resolves (a signal) or a part fails.
pub async fn run(config: Settings, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new(&config.node_name));
    let health = Arc::new(Health::default());
    let (shutdown_tx, _) = broadcast::channel(1);

    let listener = server::bind(config.metrics.listen).await.with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
    let limits = server::Limits::default();
    let server =
        tokio::spawn(server::serve(listener, metrics.exposition.clone(), health.clone(), limits, Shutdown::new(shutdown_tx.subscribe())));
    tokio::spawn(crate::memory::run(Shutdown::new(shutdown_tx.subscribe())));

    let pods = match kube::connect(&config.kubernetes).await? {
        Some(client) => {
            let store = Arc::new(PodStore::new(config.app_keys.clone(), config.user_keys.clone(), metrics.pod_info.clone()));
            let pods_dir = config.logs.pods_dir.clone();
            let keep_deleted = Arc::new(move |pod: &PodMeta| path::pod_dir(&pods_dir, &pod.namespace, &pod.name, &pod.uid).exists());
            let shutdown = || Shutdown::new(shutdown_tx.subscribe());
            let up = metrics.kube_watch_up.clone();
            kube::start(client, config.node_name.clone(), store.clone(), &config.kubernetes, keep_deleted, up, shutdown);
            tracing::info!(node = %config.node_name, "watching this node's pods");
            Some(store)
        }
        None => None,
    };

    if !config.certificates.paths.is_empty() {
        let (paths, interval) = (config.certificates.paths.clone(), config.certificates.interval);
        tokio::spawn(certs::run(paths, interval, metrics.certs.clone(), Shutdown::new(shutdown_tx.subscribe())));
    }

    let names = Names { pods_dir: config.logs.pods_dir.clone(), containers_dir: config.logs.containers_dir.clone(), pods: pods.clone() };
    if config.host.proc_root.is_dir() {
        let sources = shm_metrics::Sources { proc_root: config.host.proc_root.clone(), names: names.clone() };
        tokio::spawn(shm_metrics::run(sources, config.host.scan_interval, metrics.shm.clone(), Shutdown::new(shutdown_tx.subscribe())));
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
    let gpu =
        crate::gpu::start(&config, names, metrics.gpu.clone(), gpu_bus_ids.clone(), runs, Shutdown::new(shutdown_tx.subscribe())).await?;

    let push = &config.metrics.otlp;
    let metrics_push = if push.endpoint.is_empty() {
        None
    } else {
        let exporter = otlp::Exporter::new(&otlp::metrics::settings(push), otlp::Signal::Metrics)?;
        let origin = otlp::metrics::Origin { node: config.node_name.clone(), cluster: config.cluster_name.clone() };
        let shutdown = Shutdown::new(shutdown_tx.subscribe());
        tracing::info!(endpoint = %crate::config::redact_url(&push.endpoint), interval = ?push.interval, "pushing metrics over OTLP");
        Some(tokio::spawn(otlp::metrics::run(
            push.interval,
            exporter,
            metrics.exposition.clone(),
            metrics.sinks.pushed_points.clone(),
            origin,
            shutdown,
        )))
    };

    // The pipeline (checkpoints, sinks) runs for container logs, node logs, or both: the node
    // logs' XID metric is wanted on a metrics-only agent too.
    let node_logs = config.node_logs.journald.enabled != Switch::Off || config.node_logs.kernel.enabled != Switch::Off;
    let mut pipeline = if config.logs.enabled {
        let checkpoints = Arc::new(open_checkpoints(&config).await?);
        let sinks = pipeline::configured_sinks(&config, &metrics.sinks)?;
        let pipeline = LogPipeline::start(&config, checkpoints, &metrics.logs, pods.clone(), sinks, gpu_bus_ids.clone())?;
        tracing::info!(pods_dir = %config.logs.pods_dir.display(), node = %config.node_name, "tailing container logs");
        Some(pipeline)
    } else if node_logs {
        // Without container logs a state_dir that cannot be opened (a metrics-only install
        // without one) turns node logs off, not the agent.
        let started = async {
            let checkpoints = Arc::new(open_checkpoints(&config).await?);
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
            health.failed.store(true, Ordering::Release);
            Err(err)
        }
    };
    tracing::info!("shutting down");
    if let Some(pipeline) = pipeline {
        pipeline.stop(DRAIN_GRACE).await;
    }
    let _ = shutdown_tx.send(());
    if let Some(gpu) = gpu {
        // Writes the GPU run state, with the reports the pipeline delivered while draining.
        let _ = tokio::time::timeout(Duration::from_secs(5), gpu).await;
    }
    if let Some(push) = metrics_push {
        // The last push carries the final counts; a receiver that is away does not hold up the exit.
        let _ = tokio::time::timeout(Duration::from_secs(5), push).await;
    }
    let _ = server.await;
    result
}

/// Opens `state_dir`. Only the built-in default falls back to a per-user directory, so a
/// plain `nodelens` runs on a laptop without root.
async fn open_checkpoints(config: &Config) -> anyhow::Result<Checkpoints> {
    let default = Config::default().state_dir;
    let mut waited = false;
    let opened = loop {
        match Checkpoints::open(&config.state_dir) {
            Err(e) if e.source.kind() == std::io::ErrorKind::WouldBlock => {
                // The pod this one replaces on the node is still shutting down: wait, not ready.
                if !waited {
                    tracing::warn!(error = %e, "waiting for the other agent to release state_dir");
                    waited = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => break other,
        }
    };
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
