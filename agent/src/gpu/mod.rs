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
pub mod hami;
pub mod health;
pub mod nvml;
pub mod processes;
pub mod reading;
pub mod shares;
pub mod unattributed;

use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::config::{Config, Switch};
use crate::host::names::Names;
use crate::shutdown::Shutdown;
use allocation::PodResources;
use export::GpuExport;
use reading::Reading;

/// Starts GPU collection unless `gpu.enabled` is false. With `auto`, a node without NVML or
/// without GPUs logs one line and runs without GPU metrics; with `true` that is an error.
///
/// `bus_ids` is filled with the GPUs' PCI addresses. Attribution runs in `tasks`.
pub async fn start(
    config: &Config,
    names: Names,
    export: GpuExport,
    bus_ids: crate::host::pci::GpuBusIds,
    tasks: &mut crate::tasks::Tasks,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    if config.gpu.enabled == Switch::Off {
        return Ok(());
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
            return Ok(());
        }
        Err(_) => anyhow::bail!("the NVML thread ended during start-up"),
    }
    let pod_resources = PodResources::new(config.kubernetes.pod_resources_socket.clone(), config.gpu.resource_prefixes.clone());
    tasks.spawn("gpu attribution", async move {
        attribute(readings, pod_resources, names, export, shutdown).await;
        Ok(())
    });
    Ok(())
}

/// Joins each reading with the kubelet's allocations and publishes the result. Dropping
/// `readings` at shutdown stops the NVML thread.
async fn attribute(
    mut readings: watch::Receiver<Option<Arc<Reading>>>,
    mut pod_resources: PodResources,
    names: Names,
    export: GpuExport,
    mut shutdown: Shutdown,
) {
    let mut allocations = Arc::new(Vec::new());
    let (mut errors, mut failing, mut listed) = (0, false, false);
    loop {
        tokio::select! {
            changed = readings.changed() => if changed.is_err() { return },
            _ = shutdown.recv() => return,
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
        let (names, allocations) = (names.clone(), allocations.clone());
        match tokio::task::spawn_blocking(move || attribution::compose(&reading, &allocations, &names)).await {
            Ok(mut view) => {
                view.pod_resources_errors = errors;
                view.unattributed.iter_mut().for_each(|u| u.allocations_known = listed);
                export.publish(view);
            }
            Err(e) => tracing::error!(error = %e, "GPU attribution panicked"),
        }
    }
}
