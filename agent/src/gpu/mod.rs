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

use crate::config::{Config, Switch};
use crate::kube::Names;
use crate::shutdown::Shutdown;
use allocation::PodResources;
use export::{GpuExport, GpuView};
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
/// `bus_ids` is filled with the GPUs' PCI addresses. Attribution runs in `tasks`. With pod
/// metadata from the API, every container holding a GPU gets a run report when it ends; the
/// task writes the run state before it ends at `shutdown`.
pub async fn start(
    config: &Config,
    names: Names,
    export: GpuExport,
    bus_ids: crate::host::pci::GpuBusIds,
    runs: RunsContext,
    tasks: &mut crate::tasks::Tasks,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    start_with(config, names, export, bus_ids, runs, tasks, shutdown, nvml::run).await
}

/// [`start`] with `thread` as the NVML thread's body.
#[allow(clippy::too_many_arguments)]
async fn start_with(
    config: &Config,
    names: Names,
    export: GpuExport,
    bus_ids: crate::host::pci::GpuBusIds,
    runs: RunsContext,
    tasks: &mut crate::tasks::Tasks,
    shutdown: Shutdown,
    thread: impl FnOnce(nvml::Settings, watch::Sender<Option<Arc<Reading>>>, oneshot::Sender<Result<nvml::Found, String>>) + Send + 'static,
) -> anyhow::Result<()> {
    if config.gpu.enabled == Switch::Off {
        return Ok(());
    }
    let settings = nvml::Settings {
        library: config.gpu.nvml_library.clone(),
        poll_interval: config.gpu.poll_interval,
        mig_refresh: nvml::MIG_REFRESH,
        proc_root: config.host.proc_root.clone(),
        bus_ids,
    };
    let (readings_tx, readings) = watch::channel(None);
    let (started_tx, started) = oneshot::channel();
    let nvml = std::thread::Builder::new().name("nvml".into()).spawn(move || thread(settings, readings_tx, started_tx))?;
    match started.await {
        Ok(Ok(found)) => {
            tracing::info!(gpus = found.gpus, mig_instances = found.mig_instances, driver = %found.driver_version, "GPU metrics on");
        }
        Ok(Err(why)) if config.gpu.enabled == Switch::On => anyhow::bail!("gpu.enabled is true, but {why}"),
        Ok(Err(why)) => {
            tracing::info!("GPU metrics off: {why}");
            return Ok(());
        }
        Err(_) => anyhow::bail!("the NVML thread ended during start-up"),
    }
    let pod_resources = PodResources::new(config.kubernetes.pod_resources_socket.clone(), config.gpu.resource_prefixes.clone());
    let runs = names.pods.clone().map(|pods| {
        let file = runs::state::StateFile::new(&config.state_dir);
        Arc::new(Mutex::new(RunsSlot { runs: None, waiting: Some((file, pods, runs, config.gpu.poll_interval)) }))
    });
    tasks.spawn("gpu", async move {
        if attribute(readings, pod_resources, names, export.clone(), runs, shutdown).await == Ended::Shutdown {
            return Ok(());
        }
        // The last view would stay published, every GPU up at its last values: take it down.
        export.publish(GpuView::default());
        let cause = match tokio::task::spawn_blocking(move || nvml.join()).await {
            Ok(Err(panic)) => crate::tasks::panic_message(&*panic),
            _ => "ended".into(),
        };
        anyhow::bail!("the NVML thread {cause}; GPU metrics are gone until the agent restarts")
    });
    Ok(())
}

/// Why [`attribute`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Shutdown,
    /// The NVML thread is gone.
    NvmlGone,
}

/// The fake NVML library keeps one scenario per process: its tests take turns.
#[cfg(test)]
pub(crate) static FAKE_NVML: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Joins each reading with the kubelet's allocations and publishes the result. Dropping
/// `readings` at shutdown stops the NVML thread.
async fn attribute(
    mut readings: watch::Receiver<Option<Arc<Reading>>>,
    mut pod_resources: PodResources,
    names: Names,
    export: GpuExport,
    runs: Option<Arc<Mutex<RunsSlot>>>,
    mut shutdown: Shutdown,
) -> Ended {
    let mut allocations = Arc::new(Vec::new());
    let (mut errors, mut failing, mut listed) = (0, false, false);
    let ended = loop {
        tokio::select! {
            changed = readings.changed() => if changed.is_err() { break Ended::NvmlGone },
            _ = shutdown.recv() => break Ended::Shutdown,
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
    };
    // Reports the pipeline delivered while it drained are remembered; running totals kept.
    if let Some(runs) = runs {
        let finish = move || {
            if let Some(runs) = runs.lock().unwrap_or_else(|e| e.into_inner()).runs.as_mut() {
                runs.finish();
            }
        };
        let _ = tokio::task::spawn_blocking(finish).await;
    }
    ended
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nodelens_testkit::gpu::nvml_library;
    use nodelens_testkit::gpu::scenario::{Gpu, Scenario, SCENARIO_ENV};

    use super::*;
    use crate::tasks::Tasks;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_the_nvml_thread_dies_its_gpu_series_go_and_the_task_fails_with_the_panic() {
        let _fake = FAKE_NVML.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let scenario = dir.path().join("scenario.json");
        let gpu = Gpu { uuid: "GPU-aaaa".into(), name: "NVIDIA H100 80GB HBM3".into(), memory_total_bytes: 80 << 30, ..Gpu::default() };
        Scenario { driver_version: "560.35.03".into(), gpus: vec![gpu] }.write(&scenario).unwrap();
        std::env::set_var(SCENARIO_ENV, &scenario);
        let mut config = Config::default();
        config.gpu.enabled = Switch::On;
        config.gpu.nvml_library = nvml_library().display().to_string();
        config.gpu.poll_interval = Duration::from_millis(50);
        config.host.proc_root = dir.path().join("proc");
        config.kubernetes.pod_resources_socket = dir.path().join("kubelet.sock");
        let names = Names { pods_dir: dir.path().join("pods"), containers_dir: dir.path().join("containers"), pods: None };
        let export = GpuExport::default();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(export.clone()));
        let seen = export.clone();
        let (_stop, stopping) = tokio::sync::broadcast::channel(1);
        let mut tasks = Tasks::default();
        // The real collector on the fake driver until its GPU is published, then a bug.
        let nvml_with_a_bug = move |settings, out: watch::Sender<_>, started| {
            let (inner, mut readings) = watch::channel(None);
            let collector = std::thread::spawn(move || nvml::run(settings, inner, started));
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            while seen.view().gpus.is_empty() && runtime.block_on(readings.changed()).is_ok() {
                let reading = readings.borrow_and_update().clone();
                let _ = out.send(reading);
            }
            drop(readings);
            collector.join().unwrap();
            panic!("index out of bounds: the len is 1 but the index is 1");
        };
        let runs =
            RunsContext { gauges: Default::default(), seconds: Default::default(), dropped: Default::default(), out: Default::default() };
        start_with(&config, names, export.clone(), Default::default(), runs, &mut tasks, Shutdown::new(stopping), nvml_with_a_bug)
            .await
            .unwrap();

        let death = tokio::time::timeout(Duration::from_secs(30), tasks.death()).await.expect("the GPU task ends");
        assert_eq!(death.task, "gpu");
        assert_eq!(
            death.cause,
            "the NVML thread panicked: index out of bounds: the len is 1 but the index is 1; GPU metrics are gone until the agent restarts"
        );
        assert!(export.view().gpus.is_empty(), "no GPU left at its last values");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("gpu_up") && !text.contains("gpu_up{"), "no gpu_up series:\n{text}");
    }
}
