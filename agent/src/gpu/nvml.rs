//! The NVML thread: loads the library, finds the GPUs (and MIG instances), and every
//! `gpu.poll_interval` reads them into a [`Reading`] it publishes on a watch channel. Between
//! polls it waits on an NVML event set, so critical XID errors are counted as they happen.
//!
//! On GPUs with GPM (Hopper and newer, `gpm.rs`) each poll also takes a GPM sample of the GPU and of each
//! MIG instance; the profiling metrics are computed between it and the previous poll's sample,
//! so they cover the whole poll interval.
//!
//! Every driver call is made here, never on the async runtime. A call that fails degrades one
//! value, not the collector: a function missing from an older driver turns its metric off (one
//! warning), `NOT_SUPPORTED` leaves it out for that GPU, and "GPU is lost" marks that GPU down
//! while the others go on.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
use nvml_wrapper::gpm::GpmSample;
use nvml_wrapper::{Device, EventSet, Nvml};
use tokio::sync::{oneshot, watch};

use super::health::{self, Links};
use super::processes::PidResolver;
use super::reading::{GpuGauge, GpuId, GpuReading, MigId, ProcessUse, Reading, RemappedRows};
use super::shares::{Sample, ShareWindow};

mod gpm;

/// The library loaded when `gpu.nvml_library` is empty: the driver's runtime name (the
/// unversioned `libnvidia-ml.so` exists only where development packages are installed).
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// The longest the thread waits before checking whether the agent is stopping.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// How often the per-process utilization samples are fetched: more often than the driver's
/// buffer of them turns over, whatever the poll interval.
const SAMPLE_FETCH: Duration = Duration::from_secs(1);
/// How often every GPU's MIG instances are enumerated again (instances made or destroyed, as
/// DRA drivers do when they prepare a claim; MIG mode turned on or off).
pub const MIG_REFRESH: Duration = Duration::from_secs(60);

/// What the thread needs.
pub struct Settings {
    /// `gpu.nvml_library`, or empty.
    pub library: String,
    /// `gpu.poll_interval`.
    pub poll_interval: Duration,
    /// How often MIG instances are enumerated again: [`MIG_REFRESH`].
    pub mig_refresh: Duration,
    /// `host.proc_root`.
    pub proc_root: PathBuf,
    /// Filled with each GPU's PCI address, for the kernel log's XIDs.
    pub bus_ids: crate::host::pci::GpuBusIds,
}

/// What start-up found, for the log line.
#[derive(Debug)]
pub struct Found {
    /// Physical GPUs.
    pub gpus: usize,
    /// MIG instances.
    pub mig_instances: usize,
    /// The driver's version.
    pub driver_version: String,
}

/// Runs the thread: reports start-up on `started`, then publishes readings until every
/// receiver of `out` is gone.
pub fn run(settings: Settings, out: watch::Sender<Option<Arc<Reading>>>, started: oneshot::Sender<Result<Found, String>>) {
    let library = if settings.library.is_empty() { DEFAULT_LIBRARY } else { settings.library.as_str() };
    let nvml = match Nvml::builder().lib_path(OsStr::new(library)).init() {
        Ok(nvml) => nvml,
        Err(e) => {
            let _ = started.send(Err(format!("NVML did not load from {library}: {e}")));
            return;
        }
    };
    let mut collector = Collector::discover(&nvml, PidResolver::new(settings.proc_root), settings.poll_interval, settings.mig_refresh);
    if collector.devices.is_empty() {
        let _ = started.send(Err(format!("NVML loaded from {library} but reports no GPU")));
        return;
    }
    for gpu in &collector.devices {
        // Before start-up is reported, so XIDs already in the kernel ring are named too.
        match nvml.device_by_index(gpu.index).and_then(|d| d.pci_info()) {
            Ok(pci) => settings.bus_ids.insert(&pci.bus_id, crate::host::pci::GpuRef { index: gpu.index, uuid: gpu.id.uuid.clone() }),
            Err(e) => tracing::debug!(gpu = gpu.index, error = %e, "no PCI bus id; its XIDs in the kernel log name no GPU"),
        }
    }
    let found = Found {
        gpus: collector.devices.len(),
        mig_instances: collector.devices.iter().map(|d| d.migs.len()).sum(),
        driver_version: collector.driver_version.clone(),
    };
    if started.send(Ok(found)).is_err() {
        return;
    }
    let mut next = Instant::now();
    loop {
        if out.send(Some(Arc::new(collector.poll()))).is_err() {
            return;
        }
        next += settings.poll_interval;
        let now = Instant::now();
        if next < now {
            next = now + settings.poll_interval;
        }
        if !collector.wait_events(next, &out) {
            return;
        }
    }
}

/// One physical GPU.
struct Gpu<'n> {
    index: u32,
    /// `None` while NVML cannot give a handle (lost before the agent started).
    device: Option<Device<'n>>,
    id: GpuId,
    migs: Vec<Mig<'n>>,
    /// Per-process samples between polls, for the SM shares.
    shares: ShareWindow,
    /// GPM is read on this GPU.
    gpm: bool,
    /// The previous GPM sample of the GPU (`None`) and of each MIG instance (its GPU instance
    /// id), with when it was taken.
    gpm_samples: HashMap<Option<u32>, (GpmSample<'n>, Instant)>,
    /// Traffic since the agent started: (transmitted, received) bytes.
    pcie_bytes: Option<(f64, f64)>,
    nvlink_bytes: Option<(f64, f64)>,
    /// When the legacy PCIe throughput was last read, per direction (one per poll, in turn).
    pcie_read_at: [Option<Instant>; 2],
    /// Polls so far, to take turns.
    polls: u64,
    /// NVLink links and their last error counts.
    links: Links,
}

/// A MIG device (a compute instance in a GPU instance).
struct Mig<'n> {
    device: Device<'n>,
    id: GpuId,
    /// The GPU instance id, `None` where NVML would not say.
    gpu_instance: Option<u32>,
}

impl Gpu<'_> {
    /// Forgets what spans polls: the GPU was lost, and its counters restart when it is back.
    fn forget_windows(&mut self) {
        self.shares.reset();
        self.gpm_samples.clear();
        self.pcie_read_at = [None, None];
        self.links = Links::default();
    }
}

/// A GPU that answered "lost" in this poll.
pub struct Lost;

/// Bookkeeping of failed calls.
#[derive(Default)]
pub struct Calls {
    /// Functions the library lacks.
    missing: HashSet<&'static str>,
    /// (function, GPU index) pairs the device does not support.
    unsupported: HashSet<(&'static str, u32)>,
    /// Other failures, by function.
    errors: HashMap<&'static str, u64>,
}

impl Calls {
    /// Makes one call unless it is known to be missing or unsupported. `Err(Lost)` when the
    /// GPU is gone; `Ok(None)` when there is no value.
    pub fn call<T>(&mut self, name: &'static str, gpu: u32, f: impl FnOnce() -> Result<T, NvmlError>) -> Result<Option<T>, Lost> {
        if !self.is_on(name, gpu) {
            return Ok(None);
        }
        self.answer(name, gpu, f())
    }

    /// Whether a call is still made for this GPU (not missing from the library, not refused).
    pub fn is_on(&self, name: &'static str, gpu: u32) -> bool {
        !self.missing.contains(name) && !self.unsupported.contains(&(name, gpu))
    }

    /// Books one answer (of a call, or of one field of a field-values call).
    pub fn answer<T>(&mut self, name: &'static str, gpu: u32, result: Result<T, NvmlError>) -> Result<Option<T>, Lost> {
        match result {
            Ok(v) => Ok(Some(v)),
            Err(NvmlError::GpuLost) => Err(Lost),
            Err(NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound) => {
                tracing::warn!(function = name, "this NVML library lacks the function; the metrics read with it are off");
                self.missing.insert(name);
                Ok(None)
            }
            Err(NvmlError::NotSupported) => {
                // An answer, not an error: the GPU has no such reading. Said once per GPU.
                tracing::info!(function = name, gpu, "not supported by this GPU; the metric read with it is off for it");
                self.unsupported.insert((name, gpu));
                Ok(None)
            }
            Err(NvmlError::NoPermission) => {
                tracing::warn!(
                    function = name,
                    gpu,
                    "NVML refuses this call to the agent (no permission); the metrics read with it are off"
                );
                self.unsupported.insert((name, gpu));
                Ok(None)
            }
            Err(e) => {
                tracing::debug!(function = name, gpu, error = %e, "NVML call failed");
                *self.errors.entry(name).or_default() += 1;
                Ok(None)
            }
        }
    }
}

/// The collector's state between polls.
struct Collector<'n> {
    nvml: &'n Nvml,
    driver_version: String,
    devices: Vec<Gpu<'n>>,
    calls: Calls,
    events: Option<EventSet<'n>>,
    /// The library has the GPM functions.
    gpm_library: bool,
    /// Critical XID events counted: (GPU position, xid) → count.
    xids: HashMap<(usize, u64), u64>,
    /// When samples were last fetched and MIG devices last enumerated.
    fetched_at: Instant,
    migs_at: Instant,
    /// A MIG placement was missing (said once).
    placement_warned: bool,
    /// `gpu.poll_interval`.
    poll_interval: Duration,
    /// How often MIG instances are enumerated again.
    mig_refresh: Duration,
    pids: PidResolver,
}

impl<'n> Collector<'n> {
    fn discover(nvml: &'n Nvml, pids: PidResolver, poll_interval: Duration, mig_refresh: Duration) -> Collector<'n> {
        let count = nvml.device_count().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "NVML could not count the GPUs");
            0
        });
        let mut collector = Collector {
            nvml,
            driver_version: nvml.sys_driver_version().unwrap_or_default(),
            devices: Vec::new(),
            calls: Calls::default(),
            events: None,
            gpm_library: gpm::gpm_library(nvml),
            xids: HashMap::new(),
            fetched_at: Instant::now(),
            migs_at: Instant::now(),
            placement_warned: false,
            poll_interval,
            mig_refresh,
            pids,
        };
        for index in 0..count {
            let mut gpu = placeholder(index);
            collector.identify(&mut gpu);
            collector.devices.push(gpu);
        }
        collector.events = collector.register_events();
        collector
    }

    /// Gets a handle for `gpu`, with its identity and MIG instances; leaves it without one
    /// (reported down) when NVML cannot give one.
    fn identify(&mut self, gpu: &mut Gpu<'n>) {
        let device = match self.nvml.device_by_index(gpu.index) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(gpu = gpu.index, error = %e, "GPU not usable");
                return;
            }
        };
        gpu.id.uuid = device.uuid().unwrap_or_default();
        gpu.id.model = device.name().unwrap_or_default();
        gpu.id.minor = device.minor_number().ok();
        gpu.migs = self.migs_of(&device, &gpu.id);
        gpu.gpm = self.gpm_library
            && match device.gpm_support() {
                Ok(true) => true,
                Ok(false) => {
                    tracing::info!(gpu = gpu.index, model = %gpu.id.model, "no GPM on this GPU (Hopper and newer have it): SM, tensor and DRAM activity are not exported for it");
                    false
                }
                Err(e) => {
                    tracing::info!(gpu = gpu.index, error = %e, "GPM support unknown; profiling metrics off for this GPU");
                    false
                }
            };
        gpu.device = Some(device);
    }

    /// The MIG devices of a GPU in MIG mode, with their GPU instance ids and placements.
    fn migs_of(&mut self, device: &Device<'n>, parent: &GpuId) -> Vec<Mig<'n>> {
        let mut migs = Vec::new();
        if !device.mig_mode().is_ok_and(|m| m.current == 1) {
            return migs;
        }
        let slots = device.mig_device_count().unwrap_or(0);
        for slot in 0..slots {
            let Ok(mig) = device.mig_device_by_index(slot) else { continue };
            let name = mig.name().unwrap_or_default();
            let profile = name.rsplit_once(" MIG ").map(|(_, p)| p.to_string()).unwrap_or(name);
            let gpu_instance = gpu_instance_id(self.nvml, &mig);
            let placement = gpu_instance.and_then(|gi| gpu_instance_placement(self.nvml, device, gi));
            if placement.is_none() && !self.placement_warned {
                self.placement_warned = true;
                tracing::warn!(
                    gpu = parent.index,
                    "NVML does not give MIG instance placements to the agent: GPUs of DRA claims on MIG devices are not attributed"
                );
            }
            let id = GpuId {
                index: parent.index,
                uuid: mig.uuid().unwrap_or_default(),
                model: parent.model.clone(),
                mig: Some(MigId { profile, gpu_instance: gpu_instance.unwrap_or(0), parent_uuid: parent.uuid.clone(), placement }),
                minor: parent.minor,
            };
            migs.push(Mig { device: mig, id, gpu_instance });
        }
        migs
    }

    /// Enumerates the MIG devices of every GPU again: a GPU in MIG mode may have had no
    /// instance before (a DRA driver creates them when it prepares a claim), or have lost them
    /// all, and MIG mode may have been turned on or off.
    fn refresh_migs(&mut self) {
        for position in 0..self.devices.len() {
            let Some(device) = self.devices[position].device.take() else { continue };
            let id = self.devices[position].id.clone();
            let migs = self.migs_of(&device, &id);
            let gpu = &mut self.devices[position];
            let before: Vec<&str> = gpu.migs.iter().map(|m| m.id.uuid.as_str()).collect();
            if before != migs.iter().map(|m| m.id.uuid.as_str()).collect::<Vec<_>>() {
                tracing::info!(gpu = gpu.index, before = before.len(), now = migs.len(), "MIG devices changed");
                // Shares and GPM windows were taken over the old instances.
                gpu.forget_windows();
                gpu.migs = migs;
            }
            self.devices[position].device = Some(device);
        }
    }

    /// Fetches the per-process utilization samples of every GPU that has them, so that none
    /// turns over in the driver's buffer before a poll counts it.
    fn fetch_samples(&mut self) {
        self.fetched_at = Instant::now();
        for gpu in self.devices.iter_mut().filter(|g| g.migs.is_empty()) {
            // A lost GPU is found lost by the next poll.
            let _ = fetch_process_samples(&mut self.calls, gpu);
        }
    }

    /// An event set with every GPU that supports critical-XID events registered. A failed
    /// registration frees the set (NVML's rule), so the set is rebuilt without that GPU.
    fn register_events(&self) -> Option<EventSet<'n>> {
        let mut wanted: Vec<&Device<'n>> = self
            .devices
            .iter()
            .filter_map(|g| g.device.as_ref())
            .filter(|d| d.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR)))
            .collect();
        'rebuild: while !wanted.is_empty() {
            let mut set = self.nvml.create_event_set().ok()?;
            for (i, device) in wanted.iter().enumerate() {
                match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(s) => set = s,
                    Err(e) => {
                        tracing::warn!(error = %e.error, "XID events not available for a GPU");
                        wanted.remove(i);
                        continue 'rebuild;
                    }
                }
            }
            return Some(set);
        }
        None
    }

    /// Reads every GPU once.
    fn poll(&mut self) -> Reading {
        let mut reading = Reading { driver_version: self.driver_version.clone(), ..Reading::default() };
        if self.migs_at.elapsed() >= self.mig_refresh {
            self.migs_at = Instant::now();
            self.refresh_migs();
        }
        for position in 0..self.devices.len() {
            if self.devices[position].device.is_none() {
                let mut gpu = std::mem::replace(&mut self.devices[position], placeholder(position as u32));
                self.identify(&mut gpu);
                self.devices[position] = gpu;
            }
            let Collector { devices, calls, pids, xids, poll_interval, .. } = self;
            let gpu = &mut devices[position];
            let mut xid_counts: Vec<(u64, u64)> = xids.iter().filter(|((p, _), _)| *p == position).map(|((_, x), n)| (*x, *n)).collect();
            xid_counts.sort_unstable();
            let mut readings =
                match read_gpu(calls, gpu, *poll_interval).and_then(|r| read_processes(calls, gpu, pids, &mut reading).map(|()| r)) {
                    Ok(gpu_readings) => gpu_readings,
                    Err(Lost) => {
                        gpu.forget_windows();
                        let mut lost = vec![GpuReading::new(gpu.id.clone(), false)];
                        lost.extend(gpu.migs.iter().map(|m| GpuReading::new(m.id.clone(), false)));
                        lost
                    }
                };
            readings[0].xids = xid_counts;
            reading.gpus.extend(readings);
        }
        self.pids.end_poll();
        let mut errors: Vec<_> = self.calls.errors.iter().map(|(k, v)| (*k, *v)).collect();
        errors.sort_unstable();
        reading.errors = errors;
        reading
    }

    /// Waits for XID events until `until`; false when the agent is stopping.
    fn wait_events(&mut self, until: Instant, out: &watch::Sender<Option<Arc<Reading>>>) -> bool {
        loop {
            if out.is_closed() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            if self.fetched_at.elapsed() >= SAMPLE_FETCH {
                self.fetch_samples();
            }
            let slice = left.min(STOP_CHECK);
            let Some(set) = &self.events else {
                std::thread::sleep(slice);
                continue;
            };
            match set.wait(slice.as_millis() as u32) {
                Ok(event) => {
                    let Some(xid) = event.event_data else { continue };
                    let xid = match xid {
                        XidError::Value(v) => v,
                        XidError::Unknown => 999,
                    };
                    // SAFETY: handles are only compared, never used to build a second owner.
                    let handle = unsafe { event.device.handle() };
                    let position = self.devices.iter().position(|g| g.device.as_ref().is_some_and(|d| unsafe { d.handle() } == handle));
                    if let Some(position) = position {
                        tracing::warn!(gpu = self.devices[position].index, xid, "GPU reported a critical XID error");
                        *self.xids.entry((position, xid)).or_default() += 1;
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "waiting for NVML events failed");
                    std::thread::sleep(slice);
                }
            }
        }
    }
}

/// GPU `index` before NVML has given a handle for it.
fn placeholder(index: u32) -> Gpu<'static> {
    Gpu {
        index,
        device: None,
        id: GpuId { index, uuid: String::new(), model: String::new(), mig: None, minor: None },
        migs: Vec::new(),
        shares: ShareWindow::default(),
        gpm: false,
        gpm_samples: HashMap::new(),
        pcie_bytes: None,
        nvlink_bytes: None,
        pcie_read_at: [None, None],
        polls: 0,
        links: Links::default(),
    }
}

/// `nvmlDeviceGetRemappedRows` (not wrapped by `nvml-wrapper`).
fn remapped_rows(device: &Device) -> Result<RemappedRows, NvmlError> {
    let function = nvml_sym(device.nvml().lib().nvmlDeviceGetRemappedRows.as_ref())?;
    let (mut correctable, mut uncorrectable, mut pending, mut failed) = (0, 0, 0, 0);
    // SAFETY: a valid device handle and four valid out-pointers, as nvml.h requires.
    nvml_try(unsafe { function(device.handle(), &mut correctable, &mut uncorrectable, &mut pending, &mut failed) })?;
    Ok(RemappedRows { correctable, uncorrectable, pending: pending != 0, failed: failed != 0 })
}

/// The GPU instance id of a MIG device (not wrapped by `nvml-wrapper`).
fn gpu_instance_id(nvml: &Nvml, mig: &Device) -> Option<u32> {
    let function = nvml.lib().nvmlDeviceGetGpuInstanceId.as_ref().ok()?;
    let mut id = 0;
    // SAFETY: a valid MIG handle and a valid out-pointer, as nvml.h requires.
    let status = unsafe { function(mig.handle(), &mut id) };
    (status == 0).then_some(id)
}

/// The profile id and placement start of a GPU instance (not wrapped by `nvml-wrapper`).
fn gpu_instance_placement(nvml: &Nvml, parent: &Device, gpu_instance: u32) -> Option<(u32, u32)> {
    let lib = nvml.lib();
    let (by_id, get_info) = (lib.nvmlDeviceGetGpuInstanceById.as_ref().ok()?, lib.nvmlGpuInstanceGetInfo.as_ref().ok()?);
    let mut instance = std::ptr::null_mut();
    // SAFETY: a valid device handle and out-pointers, as nvml.h requires; the instance handle
    // is only passed back to the library.
    unsafe {
        if by_id(parent.handle(), gpu_instance, &mut instance) != 0 {
            return None;
        }
        let mut info = std::mem::zeroed();
        if get_info(instance, &mut info) != 0 {
            return None;
        }
        Some((info.profileId, info.placement.start))
    }
}

/// The board-level readings of a GPU, then one reading per MIG instance.
fn read_gpu(calls: &mut Calls, gpu: &mut Gpu, poll_interval: Duration) -> Result<Vec<GpuReading>, Lost> {
    let Some(d) = &gpu.device else { return Err(Lost) };
    let i = gpu.index;
    let mut r = GpuReading::new(gpu.id.clone(), true);
    let utilization = calls.call("utilization_rates", i, || d.utilization_rates())?;
    r.set(GpuGauge::Utilization, utilization.as_ref().map(|u| f64::from(u.gpu) / 100.0));
    r.set(GpuGauge::MemoryUtilization, utilization.as_ref().map(|u| f64::from(u.memory) / 100.0));
    let memory = calls.call("memory_info", i, || d.memory_info())?;
    r.set(GpuGauge::MemoryUsed, memory.as_ref().map(|m| m.used as f64));
    r.set(GpuGauge::MemoryTotal, memory.as_ref().map(|m| m.total as f64));
    r.set(GpuGauge::Temperature, calls.call("temperature", i, || d.temperature(TemperatureSensor::Gpu))?.map(f64::from));
    r.set(GpuGauge::Power, calls.call("power_usage", i, || d.power_usage())?.map(|mw| f64::from(mw) / 1000.0));
    r.set(GpuGauge::PowerLimit, calls.call("enforced_power_limit", i, || d.enforced_power_limit())?.map(|mw| f64::from(mw) / 1000.0));
    r.set(GpuGauge::SmClock, calls.call("clock_info", i, || d.clock_info(Clock::SM))?.map(|mhz| f64::from(mhz) * 1e6));
    r.energy_joules = calls.call("total_energy_consumption", i, || d.total_energy_consumption())?.map(|mj| mj as f64 / 1000.0);
    r.throttle_reasons = calls.call("current_throttle_reasons", i, || d.current_throttle_reasons())?.map(|t| t.bits());
    r.ecc = (
        calls.call("total_ecc_errors", i, || d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile))?,
        calls.call("total_ecc_errors", i, || d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile))?,
    );
    r.remapped_rows = calls.call("remapped_rows", i, || remapped_rows(d))?;
    health::read(calls, d, i, &mut gpu.links, &mut r)?;
    let mut readings = vec![r];
    for mig in &gpu.migs {
        let mut m = GpuReading::new(mig.id.clone(), true);
        let memory = calls.call("memory_info", i, || mig.device.memory_info())?;
        m.set(GpuGauge::MemoryUsed, memory.as_ref().map(|m| m.used as f64));
        m.set(GpuGauge::MemoryTotal, memory.as_ref().map(|m| m.total as f64));
        readings.push(m);
    }
    gpm::read_traffic_and_gpm(calls, gpu, &mut readings, poll_interval)?;
    gpu.polls += 1;
    Ok(readings)
}

/// Fetches the per-process utilization samples the driver holds that are newer than the last
/// fetch into the GPU's share window; false where the GPU does not sample per process.
fn fetch_process_samples(calls: &mut Calls, gpu: &mut Gpu) -> Result<bool, Lost> {
    let Some(d) = &gpu.device else { return Err(Lost) };
    let since = gpu.shares.since();
    // Before the call: a slow call must not stretch what the read is taken to have seen.
    let read_at = now_us();
    // NOT_FOUND means no process ran a kernel since: idle, not an error.
    let samples = calls.call("process_utilization_stats", gpu.index, || match d.process_utilization_stats(since) {
        Err(NvmlError::NotFound) => Ok(Vec::new()),
        other => other,
    })?;
    let Some(samples) = samples else { return Ok(false) };
    gpu.shares.add(samples.into_iter().map(|s| Sample { pid: s.pid, at_us: s.timestamp, sm_percent: s.sm_util }), read_at);
    Ok(true)
}

/// Wall-clock microseconds, the driver's timestamps' clock.
fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The processes on a GPU with their memory and SM utilization since the last poll, added to
/// `reading`.
fn read_processes(calls: &mut Calls, gpu: &mut Gpu, pids: &mut PidResolver, reading: &mut Reading) -> Result<(), Lost> {
    let Some(d) = &gpu.device else { return Err(Lost) };
    let i = gpu.index;
    let running = calls.call("running_compute_processes", i, || d.running_compute_processes())?.unwrap_or_default();
    let fetched = gpu.migs.is_empty() && fetch_process_samples(calls, gpu)?;
    // Not sampled where the window is unknown (the clock stepped back): no share, not idle.
    let shares = if fetched { gpu.shares.close(now_us()) } else { None };
    let sampled = shares.is_some();
    let shares = shares.unwrap_or_default();
    if sampled {
        reading.sampled.push(gpu.id.uuid.clone());
    }
    let sm_ratio = |pid: u32| -> Option<f64> { sampled.then(|| shares.get(&pid).copied().unwrap_or(0.0)) };
    let uses = &mut reading.processes;
    for p in &running {
        let uuid = match p.gpu_instance_id {
            Some(gi) => gpu.migs.iter().find(|m| m.gpu_instance == Some(gi)).map(|m| m.id.uuid.clone()),
            None => None,
        };
        let memory_bytes = match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        };
        let sm_ratio = if uuid.is_some() { None } else { sm_ratio(p.pid) };
        uses.push(ProcessUse {
            uuid: uuid.unwrap_or_else(|| gpu.id.uuid.clone()),
            pid: p.pid,
            container: pids.resolve(p.pid),
            memory_bytes,
            sm_ratio,
        });
    }
    // Processes sampled but without a compute context (graphics work) still used the SMs.
    for (&pid, _) in shares.iter().filter(|(pid, _)| !running.iter().any(|p| p.pid == **pid)) {
        uses.push(ProcessUse { uuid: gpu.id.uuid.clone(), pid, container: pids.resolve(pid), memory_bytes: None, sm_ratio: sm_ratio(pid) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nodelens_testkit::gpu::nvml_library;
    use nodelens_testkit::gpu::scenario::{Gpu as FakeGpu, MigInstance, Scenario, SCENARIO_ENV};

    use super::*;

    fn instance(uuid: &str, gpu_instance: u32) -> MigInstance {
        MigInstance {
            uuid: uuid.into(),
            profile: "1g.10gb".into(),
            gpu_instance,
            profile_id: 19,
            placement_start: gpu_instance,
            placement_size: 1,
            memory_total_bytes: 10 << 30,
            ..MigInstance::default()
        }
    }

    /// Two H100s in MIG mode with these instances.
    fn node(first: Vec<MigInstance>, second: Vec<MigInstance>) -> Scenario {
        let gpu = |uuid: &str, mig| FakeGpu {
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            mig_mode: true,
            mig,
            ..FakeGpu::default()
        };
        Scenario { driver_version: "560.35.03".into(), gpus: vec![gpu("GPU-aaaa", first), gpu("GPU-bbbb", second)] }
    }

    /// (parent, instance) of each MIG instance in a reading.
    fn migs(reading: &Reading) -> Vec<(String, String)> {
        let mut migs: Vec<_> =
            reading.gpus.iter().filter_map(|g| Some((g.id.mig.as_ref()?.parent_uuid.clone(), g.id.uuid.clone()))).collect();
        migs.sort();
        migs
    }

    #[test]
    fn mig_instances_made_after_start_or_after_all_were_destroyed_are_found() {
        let _fake = crate::gpu::FAKE_NVML.blocking_lock();
        let dir = tempfile::tempdir().unwrap();
        let scenario = dir.path().join("scenario.json");
        node(Vec::new(), vec![instance("MIG-b1", 1)]).write(&scenario).unwrap();
        std::env::set_var(SCENARIO_ENV, &scenario);
        let settings = Settings {
            library: nvml_library().display().to_string(),
            poll_interval: Duration::from_millis(50),
            mig_refresh: Duration::from_millis(100),
            proc_root: dir.path().join("proc"),
            bus_ids: Default::default(),
        };
        let (out, mut readings) = watch::channel(None);
        let (started_tx, started) = oneshot::channel();
        let thread = std::thread::spawn(move || run(settings, out, started_tx));
        assert_eq!(started.blocking_recv().unwrap().unwrap().mig_instances, 1);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut wait_for = |what: &str, now: Option<Scenario>, want: &[(&str, &str)]| {
            let want: Vec<(String, String)> = want.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                // Written again until seen: the fake notices a change by the file's mtime.
                if let Some(now) = &now {
                    now.write(&scenario).unwrap();
                }
                runtime.block_on(readings.changed()).expect("the NVML thread runs");
                let seen = migs(readings.borrow_and_update().as_ref().unwrap());
                if seen == want {
                    return;
                }
                assert!(Instant::now() < deadline, "{what}: {seen:?}");
            }
        };
        wait_for("the instances at start", None, &[("GPU-bbbb", "MIG-b1")]);

        // A DRA driver prepares claims on the GPU that had no instance, and the other GPU's
        // only instance is destroyed.
        let now = node(vec![instance("MIG-a1", 1), instance("MIG-a2", 2)], Vec::new());
        wait_for("instances made on a GPU that had none", Some(now), &[("GPU-aaaa", "MIG-a1"), ("GPU-aaaa", "MIG-a2")]);

        let now = node(vec![instance("MIG-a1", 1), instance("MIG-a2", 2)], vec![instance("MIG-b2", 3)]);
        wait_for(
            "an instance made on a GPU whose instances had all gone",
            Some(now),
            &[("GPU-aaaa", "MIG-a1"), ("GPU-aaaa", "MIG-a2"), ("GPU-bbbb", "MIG-b2")],
        );
        drop(readings);
        thread.join().unwrap();
    }
}
