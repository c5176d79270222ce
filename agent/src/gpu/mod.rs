//! GPU metrics: per GPU from NVML, and per container, application and user from the kubelet's
//! allocations and the GPU processes' cgroups.
//!
//! One GPU sample flows: [`nvml`] (a dedicated thread, the only code that calls the driver)
//! → [`reading::Reading`] on a watch channel → [`attribution`] (joined with the kubelet's
//! [`allocation`]s and the processes' containers) → [`export::GpuView`], which `/metrics`
//! encodes at scrape time.

pub mod allocation;
pub mod attribution;
pub mod export;
pub mod health;
pub mod nvml;
pub mod processes;
pub mod reading;
pub mod runs;
pub mod shares;
pub mod unattributed;

use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, Switch};
use crate::kube::Names;
use crate::shutdown::Shutdown;
use allocation::PodResources;
use export::GpuExport;
use reading::Reading;
use runs::Runs;

/// What GPU run reports need: the log-derived gauges, the counter, and where reports go.
pub struct RunsContext {
    /// The pods' log-derived gauges.
    pub gauges: crate::logs::derived::PodGauges,
    /// `nodelens_gpu_run_seconds_total`.
    pub seconds: runs::RunSeconds,
    /// `nodelens_gpu_run_reports_dropped_total`.
    pub dropped: prometheus_client::metrics::counter::Counter,
    /// The log pipeline's input for reports (see [`runs::channel`]), `None` inside without a
    /// log pipeline; set once the pipeline started. Runs are tracked from then on: their state
    /// file is read only after the pipeline took `state_dir`'s lock.
    pub out: Arc<std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<runs::Delivery>>>>,
}

/// The tracker, once the log pipeline decided where reports go.
struct RunsSlot {
    runs: Option<Runs>,
    waiting: Option<(runs::state::StateFile, Arc<crate::kube::store::PodStore>, RunsContext, std::time::Duration)>,
}

impl RunsSlot {
    fn get(&mut self) -> Option<&mut Runs> {
        if self.runs.is_none() {
            let out = self.waiting.as_ref()?.2.out.get()?.clone();
            let (file, pods, context, poll_interval) = self.waiting.take()?;
            self.runs = Some(Runs::new(file, pods, context.gauges, (context.seconds, context.dropped), out, poll_interval));
        }
        self.runs.as_mut()
    }
}

/// Starts GPU collection unless `gpu.enabled` is false. With `auto`, a node without NVML or
/// without GPUs logs one line and runs without GPU metrics; with `true` that is an error.
///
/// `bus_ids` is filled with the GPUs' PCI addresses. With pod metadata from the API, every
/// container holding a GPU gets a run report when it ends. The task returned ends after
/// `shutdown`, once the run state is written.
pub async fn start(
    config: &Config,
    names: Names,
    export: GpuExport,
    bus_ids: crate::host::pci::GpuBusIds,
    runs: RunsContext,
    shutdown: Shutdown,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if config.gpu.enabled == Switch::Off {
        return Ok(None);
    }
    let settings = nvml::Settings {
        library: config.gpu.nvml_library.clone(),
        poll_interval: config.gpu.poll_interval,
        proc_root: config.host.proc_root.clone(),
        bus_ids,
    };
    let (readings_tx, readings) = watch::channel(None);
    let (started_tx, started) = oneshot::channel();
    std::thread::Builder::new().name("nvml".into()).spawn(move || nvml::run(settings, readings_tx, started_tx))?;
    match started.await {
        Ok(Ok(found)) => {
            tracing::info!(gpus = found.gpus, mig_instances = found.mig_instances, driver = %found.driver_version, "GPU metrics on");
        }
        Ok(Err(why)) if config.gpu.enabled == Switch::On => anyhow::bail!("gpu.enabled is true, but {why}"),
        Ok(Err(why)) => {
            tracing::info!("GPU metrics off: {why}");
            return Ok(None);
        }
        Err(_) => anyhow::bail!("the NVML thread ended during start-up"),
    }
    let pod_resources = PodResources::new(config.kubernetes.pod_resources_socket.clone(), config.gpu.resource_prefixes.clone());
    let runs = names.pods.clone().map(|pods| {
        let file = runs::state::StateFile::new(&config.state_dir);
        Arc::new(Mutex::new(RunsSlot { runs: None, waiting: Some((file, pods, runs, config.gpu.poll_interval)) }))
    });
    Ok(Some(tokio::spawn(attribute(readings, pod_resources, names, export, runs, shutdown))))
}

/// Joins each reading with the kubelet's allocations and publishes the result. Dropping
/// `readings` at shutdown stops the NVML thread.
async fn attribute(
    mut readings: watch::Receiver<Option<Arc<Reading>>>,
    mut pod_resources: PodResources,
    names: Names,
    export: GpuExport,
    runs: Option<Arc<Mutex<RunsSlot>>>,
    mut shutdown: Shutdown,
) {
    let mut allocations = Arc::new(Vec::new());
    let (mut errors, mut failing, mut listed) = (0, false, false);
    loop {
        tokio::select! {
            changed = readings.changed() => if changed.is_err() { break },
            _ = shutdown.recv() => break,
        }
        let Some(reading) = readings.borrow_and_update().clone() else { continue };
        match pod_resources.list().await {
            Ok(list) => {
                if failing {
                    tracing::info!("kubelet pod-resources API answering again");
                }
                failing = false;
                listed = true;
                allocations = Arc::new(list);
            }
            Err(e) => {
                errors += 1;
                if !failing {
                    tracing::warn!(error = %e.message(), "kubelet pod-resources API not answering; GPU allocations stay as last known");
                }
                failing = true;
            }
        }
        let (names, allocations, runs) = (names.clone(), allocations.clone(), runs.clone());
        let composed = tokio::task::spawn_blocking(move || {
            let view = attribution::compose(&reading, &allocations, &names);
            if let Some(runs) = runs {
                if let Some(runs) = runs.lock().unwrap_or_else(|e| e.into_inner()).get() {
                    runs.observe(&reading, &view, runs::unix_now());
                }
            }
            view
        });
        match composed.await {
            Ok(mut view) => {
                view.pod_resources_errors = errors;
                view.unattributed.iter_mut().for_each(|u| u.allocations_known = listed);
                export.publish(view);
            }
            Err(e) => tracing::error!(error = %e, "GPU attribution panicked"),
        }
    }
    // Reports the pipeline delivered while it drained are remembered; running totals kept.
    if let Some(runs) = runs {
        let finish = move || {
            if let Some(runs) = runs.lock().unwrap_or_else(|e| e.into_inner()).runs.as_mut() {
                runs.finish();
            }
        };
        let _ = tokio::task::spawn_blocking(finish).await;
    }
}
